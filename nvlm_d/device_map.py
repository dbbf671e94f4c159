"""Where NVLM-D's modules go on several GPUs: the model card's `split_model`, made correct for today's transformers."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import warnings

import torch
from accelerate import init_empty_weights
from accelerate.utils import CustomDtype, infer_auto_device_map
from torch import nn

from .configuration_nvlm_d import NVLM_D_Config
from .modeling_nvlm_d import NVLM_D_Model
from .sizing import (
    CUDA_OVERHEAD_BYTES,
    DECODER_LAYER,
    DEFAULT_GPU_MEMORY,
    GIB,
    decoder_activation_bytes,
    kv_cache_bytes_per_layer,
    parse_memory,
    quantized_tensor_dtypes,
    tensor_bytes,
    vision_activation_bytes,
)

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


# ----------------------------------------------------------------------------------------------------------------------
# A weight-free memory planner
# ----------------------------------------------------------------------------------------------------------------------

# The decoder's output end: with the `balanced` strategy it goes with the last decoder layers (every other module
# that is not a decoder layer stays on GPU 0, as FIRST_GPU_MODULES says).
DECODER_TAIL = ("language_model.model.norm", "language_model.lm_head")
STRATEGIES = ("balanced", "sequential")
PLAN_DTYPES = ("bf16", "fp16", "int8", "int4")  # what accelerate places (bitsandbytes on the decoder's linears)


@dataclasses.dataclass(frozen=True)
class GpuUsage:
    """What one GPU holds under a plan, in bytes."""

    index: int
    decoder_layers: list[int]
    other_modules: list[str]
    weight_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    capacity_bytes: int

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.weight_bytes - self.kv_cache_bytes - self.activation_bytes


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """A device map for `from_pretrained(device_map=...)` and what it leaves on each GPU."""

    device_map: dict[str, int | str]
    gpus: list[GpuUsage]
    dtype: str
    context: int
    batch: int
    strategy: str

    @property
    def fits(self) -> bool:
        on_gpus = all(isinstance(device, int) for device in self.device_map.values())
        return on_gpus and all(gpu.free_bytes >= 0 for gpu in self.gpus)


def build_meta_model(config: NVLM_D_Config | None = None) -> nn.Module:
    """NVLM-D (the 72B by default) on the meta device: shapes and names, no memory."""
    with init_empty_weights():
        return NVLM_D_Model(config if config is not None else NVLM_D_Config())


def _device_of(name: str, device_map: dict[str, int | str]) -> int | str:
    """The device of a tensor or module: that of its longest prefix in the map ("" covers everything)."""
    while name not in device_map:
        name = name.rpartition(".")[0]
    return device_map[name]


def _usage(
    model: nn.Module,
    device_map: dict[str, int | str],
    tensor_bytes: dict[str, int],
    reserve: list[int],
    kv_per_layer: int,
    capacity: int,
) -> list[GpuUsage]:
    tensors = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
    usage = []
    for index, activation in enumerate(reserve):
        on_gpu = [name for name in tensors if _device_of(name, device_map) == index]
        layers = sorted({int(m.group(1)) for name in on_gpu if (m := re.match(DECODER_LAYER, name))})
        usage.append(
            GpuUsage(
                index=index,
                decoder_layers=layers,
                other_modules=[m for m in FIRST_GPU_MODULES if _device_of(m, device_map) == index],
                weight_bytes=int(sum(tensor_bytes[name] for name in on_gpu)),
                kv_cache_bytes=kv_per_layer * len(layers),
                activation_bytes=activation,
                capacity_bytes=capacity,
            )
        )
    return usage


@contextlib.contextmanager
def _quiet_accelerate():
    """Planning is for GPUs this machine may not have: silence accelerate's 'Device N is not available'."""
    accelerate_logger = logging.getLogger("accelerate.utils.modeling")
    level = accelerate_logger.level
    accelerate_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # offload-buffer warnings for plans that spill to disk
            yield
    finally:
        accelerate_logger.setLevel(level)


def plan_device_map(
    num_gpus: int,
    gpu_memory: int | str = DEFAULT_GPU_MEMORY,
    dtype: str = "bf16",
    context: int = 8192,
    batch: int = 1,
    tiles: int = 13,
    model: nn.Module | None = None,
    strategy: str = "balanced",
) -> DevicePlan:
    """Place NVLM-D on `num_gpus` GPUs of `gpu_memory` each, without loading any weight.

    Each GPU reserves the KV cache of its decoder layers for `batch` x `context` tokens, the prefill activations of
    one decoder layer, the vision tower's activations on `tiles` tiles (on GPU 0, which holds it) and 1 GiB of CUDA
    overhead. The vision tower, the projector and the embeddings stay together on GPU 0; a decoder layer and the
    vision tower are never split. Then, by `strategy`:

    * `balanced` (the default, as accelerate's `device_map="balanced"` means it): the decoder layers are spread
      over all `num_gpus` GPUs so that every GPU uses about the same memory, leaving headroom on each; the final
      norm and the LM head go with the last layers.
    * `sequential`: accelerate's `infer_auto_device_map` fills GPU 0, then GPU 1, ...; later GPUs may stay empty.
      The KV reserve depends on the layers placed, so placement is repeated until it settles.

    Args:
        num_gpus: GPUs to plan for.
        gpu_memory: memory of each GPU (`80GiB`, `141GB`, bytes).
        dtype: `bf16`, `fp16`, `int8` or `int4` (bitsandbytes on the decoder's linear layers).
        context: tokens per sequence (prompt and answer) to reserve KV cache for.
        batch: sequences decoded together.
        tiles: the most image tiles one forward pass encodes (12 + thumbnail by default).
        model: the model on the meta device (`build_meta_model()`, the 72B, by default).
        strategy: `balanced` or `sequential`.

    Raises:
        ValueError: a non-positive count, size, context or batch, or an unknown dtype or strategy.
    """
    for name, value in (("num_gpus", num_gpus), ("context", context), ("batch", batch), ("tiles", tiles)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if dtype not in PLAN_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(PLAN_DTYPES)}, got {dtype!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    capacity = parse_memory(gpu_memory)
    model = model if model is not None else build_meta_model()
    config = model.config
    element_dtype = torch.float16 if dtype == "fp16" else torch.bfloat16
    special = quantized_tensor_dtypes(model, dtype)
    sizes = tensor_bytes(model, dtype)
    kv_per_layer = kv_cache_bytes_per_layer(config.llm_config, context, batch)
    decoder_reserve = decoder_activation_bytes(config.llm_config, context, batch) + CUDA_OVERHEAD_BYTES
    reserve = [decoder_reserve + (vision_activation_bytes(config, tiles) if i == 0 else 0) for i in range(num_gpus)]

    if strategy == "balanced":
        device_map = _balanced_device_map(model, sizes, reserve, kv_per_layer)
    else:
        device_map = _sequential_device_map(model, sizes, reserve, kv_per_layer, capacity, element_dtype, special)
    gpus = _usage(model, device_map, sizes, reserve, kv_per_layer, capacity)
    return DevicePlan(device_map=device_map, gpus=gpus, dtype=dtype, context=context, batch=batch, strategy=strategy)


def _sequential_device_map(
    model: nn.Module,
    sizes: dict[str, int],
    reserve: list[int],
    kv_per_layer: int,
    capacity: int,
    element_dtype: torch.dtype,
    special: dict[str, torch.dtype | CustomDtype],
) -> dict[str, int | str]:
    """accelerate's in-order placement within what each GPU has left after its reserves."""
    num_gpus = len(reserve)
    num_layers = model.config.llm_config.num_hidden_layers
    layers_on = [math.ceil(num_layers / num_gpus)] * num_gpus
    for _ in range(10):
        budgets = {i: max(capacity - reserve[i] - kv_per_layer * layers_on[i], 0) for i in range(num_gpus)}
        with _quiet_accelerate():
            device_map = dict(
                infer_auto_device_map(
                    model,
                    max_memory=budgets,
                    no_split_module_classes=list(model._no_split_modules),
                    dtype=element_dtype,
                    special_dtypes=special,
                )
            )
        placed = [len(gpu.decoder_layers) for gpu in _usage(model, device_map, sizes, reserve, kv_per_layer, 0)]
        if placed == layers_on:
            break
        layers_on = placed
    return device_map


def _balanced_device_map(
    model: nn.Module, sizes: dict[str, int], reserve: list[int], kv_per_layer: int
) -> dict[str, int | str]:
    """Every module that is not a decoder layer on GPU 0 (the tail on the last GPU); the decoder layers in order,
    as many on each GPU as water-filling gives: one layer at a time to the GPU that uses the least memory so far
    (weights, KV cache and reserves), which minimises the most any GPU uses, as the layers are all the same size."""
    num_gpus = len(reserve)
    num_layers = model.config.llm_config.num_hidden_layers
    layer_names = [f"language_model.model.layers.{k}" for k in range(num_layers)]
    units = [name for name, _ in model.named_children()]
    while True:  # expand the modules that hold decoder layers, until the layers are units of their own
        expandable = [name for name in units if name not in layer_names and _holds_a_layer(name, layer_names)]
        if not expandable:
            break
        name = expandable[0]
        children = [f"{name}.{child}" for child, _ in model.get_submodule(name).named_children()]
        units[units.index(name) : units.index(name) + 1] = children
    last = num_gpus - 1
    device_map: dict[str, int | str] = {}
    used = list(reserve)
    for name in units:
        if name not in layer_names:
            device = last if name in DECODER_TAIL else 0
            device_map[name] = device
            used[device] += sizes[name]
    counts = [0] * num_gpus
    for name in layer_names:
        gpu = min(range(num_gpus), key=lambda i: (used[i], i))
        counts[gpu] += 1
        used[gpu] += sizes[name] + kv_per_layer
    layer = 0
    for gpu, count in enumerate(counts):
        for name in layer_names[layer : layer + count]:
            device_map[name] = gpu
        layer += count
    return device_map


def _holds_a_layer(name: str, layer_names: list[str]) -> bool:
    return any(layer.startswith(name + ".") for layer in layer_names)


def smallest_gpu_count(max_gpus: int = 64, **plan_kwargs) -> DevicePlan | None:
    """The plan on the fewest GPUs that fits, or None if `max_gpus` are not enough. Takes the arguments of
    `plan_device_map` but `num_gpus` (`strategy` included: the count is the fewest on which that strategy fits)."""
    model = plan_kwargs.pop("model", None) or build_meta_model()
    weights = tensor_bytes(model, plan_kwargs.get("dtype", "bf16"))[""]
    fewest = max(1, math.ceil(weights / parse_memory(plan_kwargs.get("gpu_memory", DEFAULT_GPU_MEMORY))))
    for num_gpus in range(fewest, max_gpus + 1):
        plan = plan_device_map(num_gpus, model=model, **plan_kwargs)
        if plan.fits:
            return plan
    return None


def format_plan(plan: DevicePlan) -> str:
    """A per-GPU table: decoder layers, other modules, GiB of weights, KV cache, activations and free memory."""
    header = (
        f"{'GPU':>3}  {'decoder layers':<16}{'weights':>9}{'KV cache':>10}{'act.+CUDA':>11}{'free':>9}  other modules"
    )
    lines = [f"{plan.strategy}, dtype {plan.dtype}, context {plan.context} tokens x batch {plan.batch} (GiB)", header]
    for gpu in plan.gpus:
        layers = (
            f"{gpu.decoder_layers[0]}-{gpu.decoder_layers[-1]} ({len(gpu.decoder_layers)})"
            if gpu.decoder_layers
            else "-"
        )
        others = ", ".join(name.removeprefix("language_model.") for name in gpu.other_modules) or "-"
        lines.append(
            f"{gpu.index:>3}  {layers:<16}{gpu.weight_bytes / GIB:>9.1f}{gpu.kv_cache_bytes / GIB:>10.2f}"
            f"{gpu.activation_bytes / GIB:>11.2f}{gpu.free_bytes / GIB:>9.1f}  {others}"
        )
    offloaded = sorted({str(device) for device in plan.device_map.values() if not isinstance(device, int)})
    if offloaded:
        lines.append(f"does not fit: some modules would go to {', '.join(offloaded)}")
    elif not plan.fits:
        lines.append("does not fit: a GPU would run out of memory (negative free)")
    return "\n".join(lines)
