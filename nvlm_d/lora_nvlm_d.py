"""InternVL's LoRA helpers for NVLM-D (`wrap_llm_lora`, `wrap_backbone_lora`), as a mixin of the model class.

They are remote code, not only training code: a checkpoint saved with unmerged adapters records them in its config
(`use_llm_lora = r`, `llm_lora_alpha`, ...), and the model's `__init__` rebuilds them (`_wrap_saved_lora`) so that
`from_pretrained` loads the adapters' weights, also where only the model directory's code is available.
`nvlm_d.training.lora` (peft's `apply_lora`, merging) uses the same target layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .configuration_nvlm_d import NVLM_D_Config

# The layers InternVL's LoRA helpers adapt (peft `target_modules`, matched as name suffixes): every linear layer of
# the decoder's blocks, and of the ViT's blocks.
LLM_LORA_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
VISION_LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _wrap_with_lora(
    module: nn.Module, r: int, lora_alpha: int, lora_dropout: float, targets: Sequence[str], task_type: str | None
) -> nn.Module:
    """`module` inside a peft `PeftModel` with LoRA adapters of rank `r` on `targets` (peft is needed only here)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError(
            "LoRA needs peft: pip install peft (or, in a clone of this repository, pip install -e '.[train]')"
        ) from None
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(targets), task_type=task_type
    )
    # peft's new dropout layers start in training mode; keep the mode the module was in (eval after loading)
    return get_peft_model(module, config).train(module.training)


def _record_lora_settings(
    config: NVLM_D_Config, tower: str, r: int, lora_alpha: float, lora_dropout: float, targets: Sequence[str]
) -> None:
    """Write a wrapped tower's LoRA settings into `config` (`use_{tower}_lora` and its companions)."""
    setattr(config, f"use_{tower}_lora", r)
    setattr(config, f"{tower}_lora_alpha", lora_alpha)
    setattr(config, f"{tower}_lora_dropout", lora_dropout)
    setattr(config, f"{tower}_lora_target_modules", list(targets))


def _saved_lora_settings(config: NVLM_D_Config, tower: str) -> dict[str, Any]:
    """The `wrap_{tower}_lora` arguments that rebuild the adapters `config` records; where a checkpoint predates
    the companions of `use_{tower}_lora` (InternVL's own), InternVL's convention: alpha 2r, dropout 0.05."""
    r = getattr(config, f"use_{tower}_lora")
    alpha = getattr(config, f"{tower}_lora_alpha", None)
    dropout = getattr(config, f"{tower}_lora_dropout", None)
    targets = getattr(config, f"{tower}_lora_target_modules", None)
    settings: dict[str, Any] = {
        "r": r,
        "lora_alpha": 2 * r if alpha is None else alpha,
        "lora_dropout": 0.05 if dropout is None else dropout,
    }
    if targets is not None:
        settings["target_modules"] = targets
    return settings


class NVLMLoraMixin:
    """`wrap_backbone_lora` and `wrap_llm_lora` for a model with `vision_model`, `language_model` and an
    `NVLM_D_Config` as `config`."""

    config: NVLM_D_Config
    vision_model: nn.Module
    language_model: nn.Module

    def _wrap_saved_lora(self) -> None:
        """An unmerged InternVL-style LoRA checkpoint: build the adapters its weights belong to, with the settings
        they were saved with, so that `from_pretrained` loads them instead of leaving them randomly initialised."""
        if self.config.use_backbone_lora:
            self.wrap_backbone_lora(**_saved_lora_settings(self.config, "backbone"))
        if self.config.use_llm_lora:
            self.wrap_llm_lora(**_saved_lora_settings(self.config, "llm"))

    def wrap_backbone_lora(
        self,
        r: int = 128,
        lora_alpha: float = 256,
        lora_dropout: float = 0.05,
        target_modules: Sequence[str] = VISION_LORA_TARGETS,
    ) -> None:
        """InternVL's helper: LoRA adapters (peft) on the ViT's `attn.qkv`, `attn.proj`, `mlp.fc1` and `mlp.fc2`;
        everything else in the tower is frozen. Records the adapters' settings in the config (`use_backbone_lora = r`,
        `backbone_lora_alpha`, `..._dropout`, `..._target_modules`), so that a checkpoint saved without merging
        (`save_pretrained`) reloads with the same adapters. Merge with `nvlm_d.training.merge_lora` for a plain
        checkpoint."""
        self.vision_model = _wrap_with_lora(self.vision_model, r, lora_alpha, lora_dropout, target_modules, None)
        _record_lora_settings(self.config, "backbone", r, lora_alpha, lora_dropout, target_modules)

    def wrap_llm_lora(
        self,
        r: int = 128,
        lora_alpha: float = 256,
        lora_dropout: float = 0.05,
        target_modules: Sequence[str] = LLM_LORA_TARGETS,
    ) -> None:
        """InternVL's helper: LoRA adapters (peft, `CAUSAL_LM`) on every linear layer of the decoder's blocks
        (`q/k/v/o_proj`, `gate/up/down_proj`); the rest of the decoder is frozen. Records the adapters' settings in
        the config (`use_llm_lora = r`, `llm_lora_alpha`, ...; see `wrap_backbone_lora`)."""
        self.language_model = _wrap_with_lora(
            self.language_model, r, lora_alpha, lora_dropout, target_modules, "CAUSAL_LM"
        )
        self.language_model.enable_input_require_grads()
        _record_lora_settings(self.config, "llm", r, lora_alpha, lora_dropout, target_modules)
