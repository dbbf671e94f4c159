"""Where NVLM-D's modules go on several GPUs: the model card's `split_model`, made correct for today's transformers."""

from __future__ import annotations

import math

import torch

# Modules that stay on GPU 0 beside the vision tower: the decoder's input and output ends, so that image features,
# embeddings, the final norm and the logits never cross devices, and the rotary embedding every layer reads.
FIRST_GPU_MODULES = (
    "vision_model",
    "mlp1",
    "language_model.model.embed_tokens",
    "language_model.model.rotary_emb",
    "language_model.model.norm",
    "language_model.lm_head",
)


def split_model(num_gpus: int | None = None, num_layers: int = 80) -> dict[str, int]:
    """The model card's device map: decoder layers spread over `num_gpus` GPUs, GPU 0 counted as half a GPU
    because it also holds the vision tower, the projector, the embeddings, the final norm, the LM head, the
    rotary embedding and the last decoder layer.

    Unlike the card's function, it maps only modules that exist (no `tok_embeddings`/`output` keys, no layers
    past `num_layers`) and includes `rotary_emb`, so every tensor and buffer has a device.

    Args:
        num_gpus: GPUs to use; defaults to the visible CUDA devices.
        num_layers: decoder layers (80 for NVLM-D-72B).

    Raises:
        ValueError: no GPU is visible (and none was asked for), or a count below 1.
    """
    if num_gpus is None:
        num_gpus = torch.cuda.device_count()
        if num_gpus == 0:
            raise ValueError("split_model found no CUDA device; load the model on the CPU or pass num_gpus")
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 1:
        raise ValueError(f"num_gpus must be a positive int, got {num_gpus!r}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")

    layers_per_gpu = math.ceil(num_layers / (num_gpus - 0.5))
    counts = [math.ceil(layers_per_gpu * 0.5)] + [layers_per_gpu] * (num_gpus - 1)
    device_map: dict[str, int] = {}
    layer = 0
    for gpu, count in enumerate(counts):
        for _ in range(count):
            if layer < num_layers:
                device_map[f"language_model.model.layers.{layer}"] = gpu
                layer += 1
    for name in FIRST_GPU_MODULES:
        device_map[name] = 0
    device_map[f"language_model.model.layers.{num_layers - 1}"] = 0
    return device_map
