"""How much GPU memory fine-tuning NVLM-D takes, planned without weights (the model is built on the meta device).

Per GPU, for a recipe sharded over `gpus` data-parallel ranks (DeepSpeed ZeRO-3 or FSDP2; QLoRA is not sharded):

- model states, divided by `gpus`: 16 bytes per trained parameter (the parameter and its gradient, fp32 master
  weights and AdamW's two moments: 2 + 2 + 4 + 8 in bf16 mixed precision, 4 + 4 + 8 with float32 weights and
  autocast) and the stored size of each frozen one (bf16: 2 bytes; QLoRA's 4-bit decoder: 0.5);
- gathered weights (sharded recipes): the largest shard unit twice (the one computing and the one prefetched) plus
  the LM head, which FSDP2's plan keeps whole between forward and backward;
- activations with activation checkpointing, for `batch` sequences of `context` tokens: each decoder layer's input
  (bf16), one layer recomputed with its gradients (twice the forward activations of one layer), the logits over the
  152,064-token vocabulary (bf16 logits, their float32 copy for the loss and its gradient: 10 bytes a logit), and the
  vision tower on `tiles` tiles: its inference peak when frozen, else each ViT layer's input plus one layer
  recomputed;
- 1 GiB of CUDA context and workspaces, and 10% of the rest for allocator fragmentation.

These are estimates from formulas, not measurements; they say which recipe fits where, to the nearest GPU count.
"""

from __future__ import annotations

import dataclasses
import math

from torch import nn

from .. import sizing
from ..device_map import build_meta_model
from ..sizing import CUDA_OVERHEAD_BYTES, DEFAULT_GPU_MEMORY, FRAGMENTATION, GIB, TRAINED_STATE_BYTES, parse_memory
from .lora import lora_target_pattern

RECIPES = ("lora", "qlora", "full")


@dataclasses.dataclass(frozen=True)
class TrainingMemory:
    """What one GPU holds when fine-tuning with `recipe` on `gpus` GPUs, in bytes."""

    recipe: str
    gpus: int
    trained_params: int
    states_bytes: int
    gathered_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        subtotal = self.states_bytes + self.gathered_bytes + self.activation_bytes + CUDA_OVERHEAD_BYTES
        return int(subtotal * (1 + FRAGMENTATION))


def _parts(name: str) -> str:
    if name.startswith("vision_model."):
        return "vision"
    return "mlp1" if name.startswith("mlp1.") else "llm"


def lora_parameters(model: nn.Module, rank: int, parts: set[str]) -> int:
    """Parameters of rank-`rank` LoRA adapters on the layers `apply_lora` adapts in `parts`: r x (in + out) each."""
    return sizing.lora_parameters(model, rank, lora_target_pattern(parts & {"llm", "vision"}))


def training_memory(
    recipe: str,
    gpus: int,
    context: int = 4096,
    batch: int = 1,
    tiles: int = 7,
    lora_rank: int = 128,
    frozen: tuple[str, ...] = ("vision",),
    model: nn.Module | None = None,
) -> TrainingMemory:
    """Per-GPU memory of fine-tuning with `recipe` ("lora", "qlora" or "full", as `nvlm-d finetune` runs them) on
    `gpus` GPUs, with `frozen` parts not trained (LoRA: no adapters there) and `mlp1` trained unless frozen.

    Raises:
        ValueError: an unknown recipe, QLoRA on more than one GPU (it is not sharded), or counts below 1.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    for name, value in (("gpus", gpus), ("context", context), ("batch", batch), ("tiles", tiles)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if recipe == "qlora" and gpus != 1:
        raise ValueError("QLoRA keeps a whole 4-bit copy on each GPU (not sharded): plan it on 1 GPU")
    model = model if model is not None else build_meta_model()
    frozen_parts = set(frozen)
    stored = sizing.tensor_bytes(model, "int4" if recipe == "qlora" else "bf16")
    counts = {"vision": 0, "mlp1": 0, "llm": 0}
    for name, param in model.named_parameters():
        counts[_parts(name)] += param.numel()
    trained_full = sum(
        counts[part] for part in counts if part not in frozen_parts and (recipe == "full" or part == "mlp1")
    )
    adapters = 0 if recipe == "full" else lora_parameters(model, lora_rank, {"llm", "vision"} - frozen_parts)
    trained = trained_full + adapters
    frozen_bytes = stored[""] - trained_full * 2  # the trained parameters are counted in their 16 bytes instead
    states = (trained * TRAINED_STATE_BYTES + frozen_bytes) // gpus
    gathered = 0
    if gpus > 1:
        gathered = 2 * sizing.largest_shard_unit_bytes(model, stored) + stored["language_model.lm_head"]
    activations = sizing.training_activation_bytes(model.config, "vision" not in frozen_parts, context, batch, tiles)
    return TrainingMemory(recipe, gpus, trained, int(states), int(gathered), int(activations))


def fewest_gpus(
    recipe: str, gpu_memory: int | str = DEFAULT_GPU_MEMORY, max_gpus: int = 512, **kwargs
) -> TrainingMemory | None:
    """The plan on the fewest GPUs (a power of two up to 8, then whole 8-GPU nodes) whose per-GPU memory fits in
    `gpu_memory`, or None. Takes `training_memory`'s other arguments."""
    capacity = parse_memory(gpu_memory)
    model = kwargs.pop("model", None) or build_meta_model()
    counts = [1] if recipe == "qlora" else [1, 2, 4, *range(8, max_gpus + 1, 8)]
    for gpus in counts:
        plan = training_memory(recipe, gpus, model=model, **kwargs)
        if plan.total_bytes <= capacity:
            return plan
    return None


def format_memory(plan: TrainingMemory) -> str:
    """One line: recipe, GPUs, trained parameters, and the per-GPU GiB of each term."""
    nodes = f" ({math.ceil(plan.gpus / 8)} nodes of 8)" if plan.gpus > 8 else ""
    return (
        f"{plan.recipe:<6}{plan.gpus:>4} GPU(s){nodes}: trained {plan.trained_params / 1e9:.2f}B params; per GPU "
        f"states {plan.states_bytes / GIB:.1f} + gathered {plan.gathered_bytes / GIB:.1f} + activations "
        f"{plan.activation_bytes / GIB:.1f} GiB -> {plan.total_bytes / GIB:.1f} GiB with CUDA and fragmentation"
    )
