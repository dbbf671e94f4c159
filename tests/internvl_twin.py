"""NVLM-D's weights inside transformers' own InternVL (`InternVLForConditionalGeneration`), for tests and benchmarks.

transformers' InternVL is an implementation of the same architecture that this project did not write: holding the
same weights, it must give the same features and logits. Two conditions make the weights transferable: the dummy
attention heads are zero (as in the released checkpoint; the twin has none), and the decoder's intermediate size
equals its hidden size (transformers' projector maps to the hidden size, NVLM's to the intermediate size); the
twin's projector biases, which NVLM lacks, are zero.
"""

from __future__ import annotations

import re

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration

from nvlm_d.modeling_nvlm_d import NVLM_D_Model

# transformers' InternVL converter renames, applied in order (reference_facts.md, section J).
RENAMES = (
    (r"^vision_model\.", "model.vision_tower."),
    (r"\.encoder\.layers\.", ".encoder.layer."),
    (r"embeddings\.class_embedding", "embeddings.cls_token"),
    (r"embeddings\.position_embedding", "embeddings.position_embeddings"),
    (r"embeddings\.patch_embedding", "embeddings.patch_embeddings.projection"),
    (r"\.ls(\d)$", r".lambda_\1"),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
    (r"^mlp1\.0\.", "model.multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "model.multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "model.multi_modal_projector.linear_2."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
)


def internvl_config(model: NVLM_D_Model) -> InternVLConfig:
    vision, llm = model.config.vision_config, model.config.llm_config
    if llm.intermediate_size != llm.hidden_size:
        raise ValueError("the InternVL twin needs llm_config.intermediate_size == llm_config.hidden_size")
    return InternVLConfig(
        vision_config={
            "hidden_size": vision.hidden_size,
            "num_hidden_layers": vision.num_hidden_layers,
            "num_attention_heads": vision.num_attention_heads,
            "intermediate_size": vision.intermediate_size,
            "attention_bias": vision.qkv_bias,
            "use_qk_norm": vision.qk_normalization,
            "norm_type": vision.norm_type,
            "layer_norm_eps": vision.layer_norm_eps,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "hidden_act": vision.hidden_act,
            "use_mean_pooling": True,  # no final norm, as in NVLM
        },
        text_config=llm.to_dict(),
        image_token_id=model.config.image_token_id,
        downsample_ratio=model.config.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=model.config.select_layer,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def internvl_state_dict(model: NVLM_D_Model) -> dict[str, torch.Tensor]:
    """NVLM's tensors under InternVL's names, with the padded attention cut back to the real heads: q, k and v
    start at rows 0, P and 2P of the padded qkv (P = padded width)."""
    vision = model.config.vision_config
    real = vision.hidden_size
    padded = (vision.num_attention_heads + vision.num_dummy_heads) * vision.head_dim
    converted = {}
    for name, tensor in model.state_dict().items():
        for pattern, replacement in RENAMES:
            name = re.sub(pattern, replacement, name)
        if name.endswith("attention.qkv.weight"):
            prefix = name[: -len("qkv.weight")]
            for block, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                converted[f"{prefix}{proj}.weight"] = tensor[block * padded : block * padded + real]
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            converted[name] = tensor[:real]
        elif name.endswith("projection_layer.weight"):
            converted[name] = tensor[:, :real]
        else:
            converted[name] = tensor
    return converted


def internvl_twin(model: NVLM_D_Model) -> InternVLForConditionalGeneration:
    """transformers' InternVL holding `model`'s weights (see the module docstring for the conditions)."""
    twin = InternVLForConditionalGeneration(internvl_config(model)).to(model.dtype).eval()
    weights = internvl_state_dict(model)
    missing = {k: torch.zeros_like(v) for k, v in twin.state_dict().items() if k not in weights}
    if sorted(missing) != ["model.multi_modal_projector.linear_1.bias", "model.multi_modal_projector.linear_2.bias"]:
        raise ValueError(f"unexpected tensors without a counterpart: {sorted(missing)}")
    twin.load_state_dict({**weights, **missing}, strict=True)
    twin.config._attn_implementation = model.config._attn_implementation
    return twin
