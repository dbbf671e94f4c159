"""Configuration of NVLM-D: an InternViT-6B vision tower, a pixel-shuffle projector and a Qwen2 decoder.

The defaults are NVLM-D-72B's, so `NVLM_D_Config()` describes the released model, and the checkpoint's own
`config.json` (with its legacy keys: `llm_config.model_type == "llama"`, `rope_scaling`, generation settings)
loads unchanged.

This module is also run by engines that read a model directory under their own transformers: vLLM runs it under
the transformers it pins (5.16.1 and later). So it imports and builds on every transformers 5.x from 5.16.1 on,
detecting features rather than checking versions, and what it writes keeps the released checkpoint's keys:
`architectures: ["NVLM_D"]` (the name vLLM knows) and, in `llm_config`, the legacy `rope_theta`/`rope_scaling`
beside transformers 5's `rope_parameters`.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig, Qwen2Config
from transformers.utils import logging

try:  # transformers >= 5.20 declares sub-configs as specs, each with its own defaults
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # 5.16 - 5.19: a plain {key: config class} map
    SubConfigSpec = None

logger = logging.get_logger(__name__)

# NVLM-D-72B's decoder is Qwen2-72B-Instruct.
QWEN2_72B = {
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 152064,
    "hidden_size": 8192,
    "intermediate_size": 29568,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "dynamic", "factor": 3.0},
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "dtype": "bfloat16",
}


# The architecture name of the released checkpoint: what engines (vLLM) key their NVLM-D implementation on.
ARCHITECTURE = "NVLM_D"
# The name `save_pretrained` writes instead (the model class's), read as ARCHITECTURE.
MODEL_CLASS_NAME = "NVLM_D_Model"

# How a model directory maps transformers' Auto classes to this remote code: the released config.json's three
# entries, and the class `pipeline("image-text-to-text")` loads.
AUTO_MAP = {
    "AutoConfig": "configuration_nvlm_d.NVLM_D_Config",
    "AutoModel": "modeling_nvlm_d.NVLM_D_Model",
    "AutoModelForCausalLM": "modeling_nvlm_d.NVLM_D_Model",
    "AutoModelForImageTextToText": "modeling_nvlm_d.NVLM_D_Model",
}


class InternVisionConfig(PreTrainedConfig):
    """InternViT-6B-448px-V1-5 as NVLM-D stores it.

    NVLM pads the 25 attention heads with `num_dummy_heads` extra heads (7, so that 32 heads split evenly over
    8 tensor-parallel ranks). The dummy heads' weights are zero in the released checkpoint, so the output is
    that of the unpadded InternViT; the padded shapes are kept so that the checkpoint loads as it is.
    `use_flash_attn` is a legacy key kept for round-trips: the attention kernel follows transformers'
    `attn_implementation`.
    """

    model_type = "intern_vit_6b"
    base_config_key = "vision_config"
    # FSDP2 shard units for transformers' native sharding (`from_pretrained(distributed_config=...)`): each layer.
    base_model_fsdp_plan = {"encoder.layers.*": "free_full_weight"}

    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 448
    hidden_size: int = 3200
    intermediate_size: int = 12800
    num_hidden_layers: int = 45
    num_attention_heads: int = 25
    num_dummy_heads: int = 7
    qkv_bias: bool = False
    qk_normalization: bool = True
    hidden_act: str = "gelu"
    norm_type: str = "rms_norm"
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path_rate: float = 0.0
    initializer_range: float = 1e-10
    initializer_factor: float = 0.1
    use_flash_attn: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.norm_type != "rms_norm":
            raise ValueError(f"InternViT in NVLM-D uses norm_type 'rms_norm', got {self.norm_type!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.num_dummy_heads < 0:
            raise ValueError(f"num_dummy_heads must be >= 0, got {self.num_dummy_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# The companions of `use_backbone_lora`/`use_llm_lora`: the rest of an unmerged LoRA's settings.
LORA_SETTING_KEYS = tuple(
    f"{tower}_lora_{setting}" for tower in ("backbone", "llm") for setting in ("alpha", "dropout", "target_modules")
)


class NVLM_D_Config(PreTrainedConfig):
    """NVLM-D: `vision_config` (InternViT), `llm_config` (Qwen2) and how images become decoder tokens.

    `select_layer` picks the ViT hidden state fed to the projector (-1: the last); `downsample_ratio` and
    `ps_version` define the pixel shuffle (v2 keeps the row-major grid; v1, the original InternVL order, yields
    the transposed grid); `force_image_size` is the tile size; `template` names the conversation template;
    `dynamic_image_size`, `use_thumbnail`, `min_dynamic_patch` and `max_dynamic_patch` describe the tiling
    the model was trained with (the card's `load_image` is called with `max_num=max_dynamic_patch`).
    `image_token_id` is the id of `<|vision_pad|>`, whose embeddings are replaced by image features.
    `use_backbone_lora`/`use_llm_lora` are the ranks of unmerged InternVL-style LoRA adapters (0: none), and
    `{backbone,llm}_lora_{alpha,dropout,target_modules}` the rest of their settings, so that they reload as saved.
    """

    model_type = "NVLM_D"
    # The projector is a shard unit of its own; the towers' layers come from their own configs' plans.
    base_model_fsdp_plan = {"mlp1": "free_full_weight"}
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            "vision_config": SubConfigSpec(config_class=InternVisionConfig),
            "llm_config": SubConfigSpec(config_class=Qwen2Config, init_kwargs=QWEN2_72B),
        }
    else:
        sub_configs = {"vision_config": InternVisionConfig, "llm_config": Qwen2Config}

    vision_config: dict | PreTrainedConfig | None = None
    llm_config: dict | PreTrainedConfig | None = None
    use_backbone_lora: int = 0
    use_llm_lora: int = 0
    # The rest of an unmerged InternVL-style LoRA (`wrap_backbone_lora`/`wrap_llm_lora`), beside its rank above;
    # None (checkpoints saved before they were recorded, InternVL's own): alpha 2r, dropout 0.05, the package's
    # target modules.
    backbone_lora_alpha: float | None = None
    backbone_lora_dropout: float | None = None
    backbone_lora_target_modules: list[str] | None = None
    llm_lora_alpha: float | None = None
    llm_lora_dropout: float | None = None
    llm_lora_target_modules: list[str] | None = None
    select_layer: int = -1
    force_image_size: int | None = 448
    downsample_ratio: float = 0.5
    template: str = "chatml"
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    ps_version: str = "v2"
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    image_token_id: int = 151654

    def __post_init__(self, **kwargs):
        # Built here rather than by the base class, which does it only from transformers 5.20 on.
        if not isinstance(self.vision_config, PreTrainedConfig):
            self.vision_config = InternVisionConfig(**(self.vision_config or {}))
        if not isinstance(self.llm_config, PreTrainedConfig):
            self.llm_config = Qwen2Config(**(self.llm_config if self.llm_config is not None else QWEN2_72B))
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(AUTO_MAP)
        architectures = self.llm_config.architectures or ["Qwen2ForCausalLM"]
        if architectures[0] != "Qwen2ForCausalLM":
            raise ValueError(f"NVLM-D's decoder must be Qwen2ForCausalLM, got llm_config.architectures={architectures}")
        self.llm_config.architectures = architectures
        # The checkpoint's llm_config says `model_type: "llama"` (a leftover); the decoder is Qwen2, and an instance
        # attribute would shadow Qwen2Config.model_type for code that dispatches on it.
        self.llm_config.__dict__.pop("model_type", None)
        if self.ps_version not in ("v1", "v2"):
            raise ValueError(f"ps_version must be 'v1' or 'v2', got {self.ps_version!r}")
        if not 0 < self.downsample_ratio <= 1 or round(1 / self.downsample_ratio) != 1 / self.downsample_ratio:
            raise ValueError(f"downsample_ratio must be 1/k for a whole k, got {self.downsample_ratio}")
        if self.force_image_size is None:
            self.force_image_size = self.vision_config.image_size
        if self.force_image_size != self.vision_config.image_size:
            raise ValueError(
                f"force_image_size ({self.force_image_size}) must equal vision_config.image_size "
                f"({self.vision_config.image_size}): InternViT's position embeddings are not interpolated"
            )
        grid = self.vision_config.image_size // self.vision_config.patch_size
        if (grid * self.downsample_ratio) % 1:
            raise ValueError(f"the {grid}x{grid} patch grid cannot be pixel-shuffled by {self.downsample_ratio}")

    @property
    def num_image_token(self) -> int:
        """Decoder tokens per tile: 256 for 448 px tiles, patch 14 and downsample 0.5."""
        grid = self.vision_config.image_size // self.vision_config.patch_size
        return int(grid * self.downsample_ratio) ** 2

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The decoder's config, which generation and caches read (NVLM names it `llm_config`)."""
        return self.llm_config

    def __setattr__(self, key: str, value: Any) -> None:
        # `save_pretrained` records the model class's name; the checkpoint format is named `NVLM_D`, which is what
        # vLLM and the released config.json say.
        if key == "architectures" and value is not None:
            value = [ARCHITECTURE if name == MODEL_CLASS_NAME else name for name in value]
        super().__setattr__(key, value)

    def to_dict(self) -> dict[str, Any]:
        """The config as a dict, with `llm_config` also carrying the legacy `rope_theta`/`rope_scaling` keys of
        the released config.json, so that readers that predate `rope_parameters` (transformers 4.x and the tools
        built on it) see NVLM-D's rope (theta 1e6, dynamic scaling x3) rather than their defaults."""
        output = super().to_dict()
        output["llm_config"].update(legacy_rope_keys(output["llm_config"].get("rope_parameters")))
        for key in LORA_SETTING_KEYS:  # written only for a checkpoint with unmerged adapters
            if output.get(key) is None:
                output.pop(key, None)
        return output


def legacy_rope_keys(rope_parameters: dict[str, Any] | None) -> dict[str, Any]:
    """`rope_theta` and `rope_scaling` as transformers 4.x wrote them, from transformers 5's `rope_parameters`.

    Transformers 5 reads them back into the same `rope_parameters` (`rope_scaling` wins over a stale
    `rope_parameters`, so the two must agree, which they do by construction here)."""
    if not rope_parameters or "rope_theta" not in rope_parameters:
        return {}
    scaling = {key: value for key, value in rope_parameters.items() if key != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return {"rope_theta": rope_parameters["rope_theta"], "rope_scaling": None}
    scaling.setdefault("type", rope_type)
    return {"rope_theta": rope_parameters["rope_theta"], "rope_scaling": scaling}


NVLM_D_Config.register_for_auto_class()
