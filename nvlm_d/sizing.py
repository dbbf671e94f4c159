"""The one sizing model of NVLM-D: how many bytes each part takes, for inference and for training.

`nvlm-d plan` (nvlm_d.device_map), `nvlm-d serve`'s memory check and the fine-tuning planner (nvlm_d.training.memory)
all ask this module, so that a change to how a KV cache, an activation or a quantized layer is sized is made once
and the three agree. It sizes a model built on the meta device (`nvlm_d.device_map.build_meta_model`): shapes and
names, no weights. It imports nothing from the planners, the training code or the command line.

What it counts:
- weights: every tensor at the bytes of a dtype (`bf16`, `fp16`, `fp32`) or, for bitsandbytes `int8`/`int4`, the
  decoder's linear layers at 1 or 0.5 bytes and everything else (vision tower, projector, embeddings, norms, LM
  head) at bf16 (see nvlm_d.quantization); quantization scales (about 1/64 of the int4 weights) are left out, as
  transformers' own planning does. `component_bytes` groups them as the placements need them;
- the KV cache per token of one decoder layer;
- activations (SDPA, so no score matrix): the vision tower and projector on a number of tiles, one decoder layer's
  prefill of a number of tokens, and what training with activation checkpointing keeps;
- training's extras: LoRA adapters' parameters, model states (16 bytes per trained parameter), gathered shard units.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from accelerate.utils import CustomDtype, compute_module_sizes
from torch import nn
from transformers import PreTrainedConfig

# Re-exported: the sizes the planners compare with, from the light parser the commands check their options with.
from .memory_size import DEFAULT_GPU_MEMORY as DEFAULT_GPU_MEMORY
from .memory_size import GIB as GIB
from .memory_size import parse_memory as parse_memory

# Bytes a weight takes in memory, by the dtype names the commands use. int8/int4 apply to the decoder's linear
# layers only (QUANTIZED_WEIGHTS); the rest of a quantized model stays in bf16.
WEIGHT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "int8": 1, "int4": 0.5}
TORCH_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}  # vLLM's and torch's spellings
_STORAGE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}  # what the unquantized tensors are stored in
QUANTIZED_WEIGHTS = r"^language_model\.model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$"
DECODER_LAYER = r"^language_model\.model\.layers\.(\d+)\."
CUDA_OVERHEAD_BYTES = 1 << 30  # CUDA context, cuBLAS workspaces and allocator slack, per GPU
TRAINED_STATE_BYTES = 16  # parameter + gradient + fp32 master + two AdamW moments (2 + 2 + 4 + 8, or 4 + 4 + 8)
FRAGMENTATION = 0.10  # the allocator's share on top of what training holds
LOGIT_TRAINING_BYTES = 10  # a bf16 logit, its float32 copy for the loss and that copy's gradient

# The model's parts, by module name, as `component_bytes` reports them.
VISION, PROJECTOR = "vision_model", "mlp1"
EMBEDDINGS, NORM, HEAD = "language_model.model.embed_tokens", "language_model.model.norm", "language_model.lm_head"


def weight_dtype(dtype: str) -> str:
    """The commands' name of a weight dtype (`bf16`, `fp16`, `fp32`, `int8`, `int4`); torch's spellings
    (`bfloat16`, ...) are accepted too.

    Raises:
        ValueError: an unknown dtype.
    """
    name = TORCH_DTYPE_NAMES.get(dtype, dtype)
    if name not in WEIGHT_BYTES:
        raise ValueError(f"dtype must be one of {sorted(WEIGHT_BYTES)}, got {dtype!r}")
    return name


def tensor_bytes(model: nn.Module, dtype: str = "bf16") -> dict[str, int]:
    """Bytes of every module and tensor of `model` (by name; "" is the whole model) stored in `dtype`.

    Raises:
        ValueError: an unknown dtype.
    """
    name = weight_dtype(dtype)
    storage = _STORAGE_DTYPES.get(name, torch.bfloat16)
    return compute_module_sizes(model, dtype=storage, special_dtypes=quantized_tensor_dtypes(model, name))


def quantized_tensor_dtypes(model: nn.Module, dtype: str) -> dict[str, torch.dtype | CustomDtype]:
    """The tensors bitsandbytes quantizes under `dtype` (int8/int4: the decoder's linear weights), with their
    storage dtype, as accelerate's sizing and placement take them (`special_dtypes`); empty for float dtypes."""
    if dtype not in ("int8", "int4"):
        return {}
    quantized = torch.int8 if dtype == "int8" else CustomDtype.INT4
    return {name: quantized for name, _ in model.named_parameters() if re.match(QUANTIZED_WEIGHTS, name)}


@dataclasses.dataclass(frozen=True)
class ComponentBytes:
    """The weights of NVLM-D's parts in one dtype, in bytes."""

    vision: int  # the vision tower
    projector: int  # mlp1
    embeddings: int  # the decoder's token embeddings
    layers: list[int]  # each decoder layer
    norm: int  # the decoder's final norm
    head: int  # the LM head
    other: int  # the rest (the rotary embedding's buffers)

    @property
    def total(self) -> int:
        parts = (self.vision, self.projector, self.embeddings, self.norm, self.head, self.other)
        return sum(parts) + sum(self.layers)


def component_bytes(model: nn.Module, dtype: str = "bf16") -> ComponentBytes:
    """The bytes of each part of `model` (built on the meta device) stored in `dtype` (see `tensor_bytes`)."""
    sizes = tensor_bytes(model, dtype)
    num_layers = model.config.llm_config.num_hidden_layers
    layers = [sizes[f"language_model.model.layers.{k}"] for k in range(num_layers)]
    named = {part: sizes.get(part, 0) for part in (VISION, PROJECTOR, EMBEDDINGS, NORM, HEAD)}
    other = sizes[""] - sum(named.values()) - sum(layers)
    return ComponentBytes(named[VISION], named[PROJECTOR], named[EMBEDDINGS], layers, named[NORM], named[HEAD], other)


def kv_cache_bytes_per_token(llm_config: PreTrainedConfig, element_bytes: int = 2) -> int:
    """K and V of one token in one decoder layer (Qwen2-72B: 8 KV heads x 128 x 2 x 2 bytes = 4 KiB)."""
    head_dim = getattr(llm_config, "head_dim", None) or llm_config.hidden_size // llm_config.num_attention_heads
    return 2 * llm_config.num_key_value_heads * head_dim * element_bytes


def kv_cache_bytes_per_layer(llm_config: PreTrainedConfig, context: int, batch: int, element_bytes: int = 2) -> int:
    """K and V of one decoder layer for `batch` sequences of `context` tokens."""
    return kv_cache_bytes_per_token(llm_config, element_bytes) * context * batch


def _vision_tokens_per_tile(config: PreTrainedConfig) -> int:
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1  # patches and the class token


def vision_activation_bytes(config: PreTrainedConfig, tiles: int, element_bytes: int = 2) -> int:
    """Peak activations of the vision tower and projector on `tiles` tiles with SDPA (no score matrix): one
    layer's input, q/k/v, and the MLP's two intermediates; then the projector's hidden layer."""
    vision, llm = config.vision_config, config.llm_config
    padded = (vision.num_attention_heads + vision.num_dummy_heads) * vision.head_dim
    per_token = 4 * vision.hidden_size + 3 * padded + 2 * vision.intermediate_size
    projector = tiles * config.num_image_token * 2 * llm.intermediate_size
    return (tiles * _vision_tokens_per_tile(config) * per_token + projector) * element_bytes


def decoder_activation_bytes(llm_config: PreTrainedConfig, context: int, batch: int, element_bytes: int = 2) -> int:
    """Peak activations of one decoder layer during the prefill of `batch` x `context` tokens with SDPA: the
    residual stream and its norm, q/k/v/o, and the MLP's gate, up and product."""
    per_token = 6 * llm_config.hidden_size + 3 * llm_config.intermediate_size
    return batch * context * per_token * element_bytes


def training_activation_bytes(
    config: PreTrainedConfig, vision_trained: bool, context: int, batch: int, tiles: int
) -> int:
    """Activations of a training step with activation checkpointing, in bf16, for `batch` sequences of `context`
    tokens and `tiles` tiles: each decoder layer's input, one layer recomputed with its gradients (twice its
    forward activations), the logits over the vocabulary (`LOGIT_TRAINING_BYTES` each), and the vision tower: its
    inference peak when frozen, else each ViT layer's input plus one layer recomputed."""
    llm, vision = config.llm_config, config.vision_config
    layer_inputs = llm.num_hidden_layers * batch * context * llm.hidden_size * 2
    recomputed = 2 * decoder_activation_bytes(llm, context, batch)
    logits = batch * context * llm.vocab_size * LOGIT_TRAINING_BYTES
    if vision_trained:
        vision_bytes = vision.num_hidden_layers * tiles * _vision_tokens_per_tile(config) * vision.hidden_size * 2
        vision_bytes += 2 * vision_activation_bytes(config, tiles)
    else:
        vision_bytes = vision_activation_bytes(config, tiles)
    return layer_inputs + recomputed + logits + vision_bytes


def lora_parameters(model: nn.Module, rank: int, target_pattern: str) -> int:
    """Parameters of rank-`rank` LoRA adapters on the linear layers whose full names match `target_pattern` (as
    peft matches it): r x (in + out) each."""
    pattern = re.compile(target_pattern)
    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and pattern.fullmatch(name)
    )


def largest_shard_unit_bytes(model: nn.Module, sizes: dict[str, int]) -> int:
    """The largest FSDP2 shard unit of `model.fsdp_plan` in `sizes` (a decoder layer for the 72B; the ViT's are
    smaller): what a sharded step gathers whole, twice (the unit computing and the one prefetched)."""
    largest = 0
    for name, _ in model.named_modules():
        rule = re.sub(r"\.\d+(?=\.|$)", ".*", name)
        if name and model.fsdp_plan.get(rule) == "free_full_weight":
            largest = max(largest, sizes[name])
    return largest
