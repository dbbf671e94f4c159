"""Where NVLM-D's inputs go and what they must be: the checks at the model's boundary (`__init__`, `forward`,
`generate`) and the image shape checks its chat API (`chat_nvlm_d`) shares. The model (`modeling_nvlm_d`) and the
chat API must not import each other, so both import these from here; this module imports neither.
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


def check_vision_batch_size(vision_batch_size: Any) -> None:
    """`vision_batch_size` (tiles per vision tower pass) is a positive int or None (all tiles at once)."""
    if vision_batch_size is None:
        return
    if isinstance(vision_batch_size, bool) or not isinstance(vision_batch_size, int) or vision_batch_size < 1:
        raise ValueError(f"vision_batch_size must be a positive int or None, got {vision_batch_size!r}")


def check_input_ids(input_ids: Any) -> torch.LongTensor:
    """`input_ids` if it is an integer tensor [batch, prompt_length > 0]; else a TypeError or ValueError."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int):
        raise TypeError(
            f"input_ids must be an integer torch.Tensor, got {getattr(input_ids, 'dtype', type(input_ids))}"
        )
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [batch, prompt_length > 0], got {list(input_ids.shape)}")
    return input_ids


def uncached_tokens(input_ids: torch.LongTensor, cache: Any | None) -> torch.LongTensor:
    """The tokens of `input_ids` that `cache` does not hold yet (generation continued from a cache)."""
    return input_ids[:, cache.get_seq_length() :] if cache is not None else input_ids


def check_generate_inputs(
    input_ids: Any, pixel_values: Any, visual_features: Any, generate_kwargs: dict, image_token_id: int
) -> None:
    """`generate`'s prompt is `input_ids` (images for every image token the cache in `generate_kwargs` does not
    hold yet) or `generate_kwargs["inputs_embeds"]` with the image features merged in (no images)."""
    has_images = pixel_values is not None or visual_features is not None
    cache = generate_kwargs.get("cache", generate_kwargs.get("past_key_values"))
    if input_ids is None:
        if generate_kwargs.get("inputs_embeds") is None:
            raise ValueError("generate needs input_ids (or inputs_embeds)")
        if has_images:
            raise ValueError("Pass images with input_ids, not with inputs_embeds (their features are merged in)")
        return
    check_input_ids(input_ids)
    if not has_images and bool((uncached_tokens(input_ids, cache) == image_token_id).any()):
        raise ValueError(f"The prompt has image tokens (id {image_token_id}) but no pixel_values were given")


def check_forward_inputs(input_ids: Any, inputs_embeds: Any, pixel_values: Any, visual_features: Any) -> None:
    """`forward` takes exactly one of `input_ids` and `inputs_embeds`, at most one of `pixel_values` and
    `visual_features`, and `input_ids` with images (to find the `<|vision_pad|>` positions)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds")
    if pixel_values is not None and visual_features is not None:
        raise ValueError("Pass pixel_values or visual_features, not both")
    if (pixel_values is not None or visual_features is not None) and input_ids is None:
        raise ValueError("Images need input_ids, to find the <|vision_pad|> positions their features replace")


def check_training_inputs(labels: Any, loss_weight: Any, statistics: Any, loss_reduction_all_gather: bool) -> None:
    """Of InternVL's training keywords, `forward` honours `loss_weight` (with `labels`) and refuses, rather than
    ignores, `statistics` (packed-batch logging) and `loss_reduction_all_gather` (a collective inside forward)."""
    if statistics is not None:
        raise ValueError(
            "statistics is InternVL's logging of packed batches; NVLM-D does not use it: leave it out of the batch"
        )
    if loss_reduction_all_gather:
        raise ValueError(
            "loss_reduction_all_gather would need a collective inside forward, which NVLM-D does not do: average "
            "the loss weights across ranks in the data pipeline instead"
        )
    if loss_weight is not None and labels is None:
        raise ValueError("loss_weight weighs the loss of labels: pass labels too")


def check_packed_rows_uncached(use_cache: bool | None, attention_mask: Any, position_ids: Any) -> None:
    """Packed rows (several examples in one row: `position_ids` [batch, tokens] restart inside a row, no
    `attention_mask`) need `use_cache=False`: a KV cache stops transformers from isolating the examples' attention."""
    if not use_cache or attention_mask is not None or position_ids is None:
        return
    if position_ids.ndim == 2 and position_ids.shape[1] >= 2 and bool((position_ids.diff(dim=-1) != 1).any()):
        raise ValueError(
            "position_ids restart inside a row (packed examples) and use_cache=True: a KV cache stops transformers "
            "from isolating the examples' attention; pass use_cache=False"
        )


def real_tiles(features: torch.Tensor, image_flags: torch.Tensor | None) -> torch.Tensor:
    """The rows of `features` [tiles, ...] whose `image_flags` ([tiles] or [tiles, 1]) are 1: a training batch's
    padding tiles (flag 0, added so that the vision tower runs in every step) dropped. All rows without flags."""
    if image_flags is None:
        return features
    flags = image_flags.reshape(-1)
    if flags.shape[0] != features.shape[0]:
        raise ValueError(f"image_flags has {flags.shape[0]} entries but there are {features.shape[0]} tiles")
    return features[flags.to(features.device) == 1]
