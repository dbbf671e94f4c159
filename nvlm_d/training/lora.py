"""LoRA and QLoRA for NVLM-D with peft, and merging adapters back into a plain checkpoint.

The recipe (what `nvlm-d finetune --lora R` does):
- adapters on every linear layer of the decoder's blocks (`q/k/v/o_proj`, `gate/up/down_proj`) and, unless the
  vision tower is frozen, of the ViT's blocks (`attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`), `lora_alpha = 2r`
  as in InternVL;
- the projector `mlp1` trained in full (peft's `modules_to_save`) unless frozen: it is small and it is what aligns
  the two towers;
- everything else frozen.
QLoRA loads the decoder in 4-bit NF4 (`nvlm_d.bitsandbytes_config(4)`, the ViT, projector and LM head in bf16, and
kept there: see `prepare_for_kbit_training`) and trains the same adapters.

The result merges into a plain NVLM-D checkpoint (`merge_lora`, `save_merged`): the released tensor names, no
peft, loadable by this package, by the remote code alone and by vLLM.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..configuration_nvlm_d import LORA_SETTING_KEYS
from ..lora_nvlm_d import LLM_LORA_TARGETS, VISION_LORA_TARGETS
from ..modeling_nvlm_d import NVLM_D_Model

PARTS = ("vision", "mlp1", "llm")  # what --freeze names


def require_peft() -> Any:
    """The peft module, or an ImportError that names the extra to install."""
    try:
        import peft
    except ImportError:
        raise ImportError(
            "LoRA and QLoRA need peft: pip install peft (or pip install -e '.[train]' in the clone)"
        ) from None
    return peft


def lora_target_pattern(parts: Iterable[str]) -> str:
    """A regular expression (peft matches it against full module names) for the linear layers LoRA adapts in
    `parts` ("llm", "vision")."""
    parts = set(parts)
    alternatives = []
    if "llm" in parts:
        names = "|".join(re.escape(name) for name in LLM_LORA_TARGETS)
        alternatives.append(rf"language_model\.model\.layers\.\d+\.(?:{names})")
    if "vision" in parts:
        names = "|".join(re.escape(name) for name in VISION_LORA_TARGETS)
        alternatives.append(rf"vision_model\.encoder\.layers\.\d+\.(?:{names})")
    if not alternatives:
        raise ValueError("LoRA needs at least one of the decoder ('llm') or the vision tower ('vision') unfrozen")
    return "^(?:" + "|".join(alternatives) + ")$"


def apply_lora(
    model: NVLM_D_Model,
    r: int,
    frozen: Iterable[str] = ("vision",),
    lora_alpha: int | None = None,
    lora_dropout: float = 0.0,
) -> nn.Module:
    """`model` inside a peft `PeftModel`: LoRA adapters of rank `r` on the unfrozen towers, `mlp1` trained in full
    unless frozen, all else frozen. `lora_alpha` defaults to 2r. Dropout defaults to 0, so that a run resumed from
    a checkpoint takes exactly the steps of an uninterrupted one whatever the random state.

    Raises:
        ValueError: `r` is not a positive int, an unknown part, or both towers frozen.
    """
    peft = require_peft()
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank must be a positive int, got {r!r}")
    frozen = set(frozen)
    if unknown := frozen - set(PARTS):
        raise ValueError(f"unknown parts to freeze {sorted(unknown)}; choose from {list(PARTS)}")
    config = peft.LoraConfig(
        r=r,
        lora_alpha=lora_alpha if lora_alpha is not None else 2 * r,
        lora_dropout=lora_dropout,
        target_modules=lora_target_pattern({"llm", "vision"} - frozen),
        modules_to_save=None if "mlp1" in frozen else ["mlp1"],
    )
    peft_model = peft.get_peft_model(model, config).train(model.training)
    # Gradients must flow into the decoder from its (frozen) embeddings for gradient checkpointing to work.
    peft_model.enable_input_require_grads()
    return peft_model


def freeze(model: nn.Module, parts: Iterable[str]) -> None:
    """Full fine-tuning: stop gradients to `parts` ("vision", "mlp1", "llm") of an NVLM_D_Model.

    Raises:
        ValueError: an unknown part, or every part frozen.
    """
    parts = set(parts)
    if unknown := parts - set(PARTS):
        raise ValueError(f"unknown parts to freeze {sorted(unknown)}; choose from {list(PARTS)}")
    if parts == set(PARTS):
        raise ValueError("every part is frozen: nothing would train")
    modules = {"vision": model.vision_model, "mlp1": model.mlp1, "llm": model.language_model}
    for part in parts:
        modules[part].requires_grad_(False)


def prepare_for_kbit_training(model: NVLM_D_Model, gradient_checkpointing: bool = True) -> NVLM_D_Model:
    """QLoRA's preparation of a 4-bit model: every base weight frozen and, with `gradient_checkpointing`, activation
    checkpointing on with gradients flowing in from the (frozen) embeddings. Nothing is cast.

    peft's `prepare_model_for_kbit_training` also casts every parameter that is not 4-bit to float32: for
    NVLM-D-72B the vision tower, projector, embeddings and LM head, 9.17B parameters, 34 GiB more than their bf16
    copies (the one-GPU QLoRA recipe would need about 93 GiB instead of 74.5). None of them trains (the adapters,
    which peft creates in float32, and the projector's trained copy do), and compute is bf16 throughout (the 4-bit
    layers' compute dtype), so they stay in bf16 as loaded: the same precision as LoRA on a bf16 model, and what
    the memory planner (nvlm_d.training.memory) counts."""
    model.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def merge_lora(model: nn.Module) -> NVLM_D_Model:
    """The plain NVLM_D_Model with every LoRA adapter merged into its base weights: from a `PeftModel` around the
    whole model (`apply_lora`) and from InternVL-style wrapped towers (`wrap_llm_lora`, `wrap_backbone_lora`).
    The config's `use_llm_lora`/`use_backbone_lora` (and their alpha, dropout and target modules) are reset, so the
    saved checkpoint holds plain tensors under the released names."""
    peft = require_peft()
    if isinstance(model, peft.PeftModel):
        model = model.merge_and_unload()
    if isinstance(model.vision_model, peft.PeftModel):
        model.vision_model = model.vision_model.merge_and_unload()
    if isinstance(model.language_model, peft.PeftModel):
        model.language_model = model.language_model.merge_and_unload()
    model.config.use_llm_lora = 0
    model.config.use_backbone_lora = 0
    for key in LORA_SETTING_KEYS:
        setattr(model.config, key, None)
    return model


def save_merged(
    model: nn.Module,
    output_dir: str | os.PathLike,
    tokenizer: Any = None,
    processor: Any = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Merge the adapters (see `merge_lora`) and save a self-contained model directory: config, remote code,
    safetensors weights, and the tokenizer and processor when given. `dtype` casts the weights first (e.g.
    bfloat16 after training in float32). Returns the directory."""
    merged = merge_lora(model)
    if dtype is not None:
        merged = merged.to(dtype)
    output_dir = Path(output_dir)
    merged.save_pretrained(output_dir)
    for component in (tokenizer, processor):
        if component is not None:
            component.save_pretrained(output_dir)
    return output_dir
