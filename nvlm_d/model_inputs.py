"""Where NVLM-D's inputs go and what shapes its images must have: shared by the model (`modeling_nvlm_d`) and its
chat API (`chat_nvlm_d`), which must not import each other, so both import these from here.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from .configuration_nvlm_d import NVLM_D_Config


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: accelerate's execution device when a device map placed or offloaded it (its weights
    may then be on `meta`), else the device of its first real parameter."""
    for submodule in module.modules():
        hook = getattr(submodule, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    for tensor in itertools.chain(module.parameters(), module.buffers()):  # lazily: often the first one answers
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def check_pixel_values(pixel_values: Any, config: NVLM_D_Config) -> torch.Tensor:
    """`pixel_values` if it is a float tensor [tiles >= 1, channels, image_size, image_size] for `config`'s vision
    tower; else a TypeError or ValueError that names the expected shape."""
    vision = config.vision_config
    expected = f"[num_tiles, {vision.num_channels}, {vision.image_size}, {vision.image_size}]"
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor of shape {expected}, got {type(pixel_values).__name__}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be a floating-point tensor, got dtype {pixel_values.dtype}")
    shape = tuple(pixel_values.shape)
    if len(shape) != 4 or shape[0] == 0 or shape[1:] != (vision.num_channels, vision.image_size, vision.image_size):
        raise ValueError(f"pixel_values must have shape {expected}, got {list(shape)}")
    return pixel_values


def check_visual_features(visual_features: Any, config: NVLM_D_Config) -> torch.Tensor:
    """`visual_features` if it is a tensor [tiles >= 1, image tokens per tile, pixel-shuffled ViT width] (what
    `get_visual_features` returns); else a TypeError or ValueError that names the expected shape."""
    width = config.vision_config.hidden_size * round(1 / config.downsample_ratio) ** 2
    expected = f"[num_tiles, {config.num_image_token}, {width}]"
    if not isinstance(visual_features, torch.Tensor):
        raise TypeError(
            f"visual_features must be a torch.Tensor of shape {expected}, got {type(visual_features).__name__}"
        )
    shape = tuple(visual_features.shape)
    if len(shape) != 3 or shape[0] == 0 or shape[1:] != (config.num_image_token, width):
        raise ValueError(
            f"visual_features must have shape {expected} (pixel-shuffled ViT outputs, see get_visual_features), "
            f"got {list(shape)}"
        )
    return visual_features
