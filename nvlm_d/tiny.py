"""A seeded, tiny NVLM-D for tests, the demo and benchmarks.

It keeps everything that shapes behaviour — 448 px tiles, 14 px patches, the pixel shuffle to 256 tokens a tile,
the dummy attention heads, the real 152,064-token vocabulary and tokenizer — and shrinks only widths and depths,
so that a checkpoint is built, saved and loaded through the real `from_pretrained` path in seconds on a CPU.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .configuration_nvlm_d import QWEN2_72B, NVLM_D_Config
from .modeling_nvlm_d import NVLM_D_Model

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


def tiny_config(**overrides) -> NVLM_D_Config:
    """NVLM-D with tiny widths and depths. `overrides` may hold `vision_config`/`llm_config` dicts, merged into
    the tiny ones, and top-level fields."""
    vision = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "initializer_range": 0.02,
    }
    llm = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "dtype": "float32",
    }
    vision.update(overrides.pop("vision_config", {}))
    llm.update(overrides.pop("llm_config", {}))
    overrides.setdefault("dtype", "float32")
    return NVLM_D_Config(vision_config=vision, llm_config={**QWEN2_72B, **llm}, **overrides)


def randomize_weights_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter from a seeded generator, independent of transformers' init code, so a seed always
    gives the same model. Norm weights and layer-scales are drawn around useful values (1 and 0.5), the rest
    around 0 with std 0.02 (the dummy heads too: they are exercised, not silent)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith((".ls1", ".ls2")):
                values = 0.5 + 0.1 * noise
            elif ("norm" in name and name.endswith(".weight")) or name == "mlp1.0.weight":
                values = 1.0 + 0.1 * noise
            else:
                values = 0.02 * noise
            param.copy_(values.to(param.dtype))
    return model


def zero_dummy_heads_(model: NVLM_D_Model) -> NVLM_D_Model:
    """Zero the dummy heads' weights, as in the released checkpoint: the tower then equals an unpadded InternViT.
    The weights are written by hand, so the vision tower is told to look at them again (it then skips the heads)."""
    vision = model.config.vision_config
    real = vision.hidden_size
    padded = (vision.num_attention_heads + vision.num_dummy_heads) * vision.head_dim
    with torch.no_grad():
        for layer in model.vision_model.encoder.layers:
            attn = layer.attn
            for block in range(3):  # q, k, v
                attn.qkv.weight[block * padded + real : (block + 1) * padded].zero_()
                if attn.qkv.bias is not None:
                    attn.qkv.bias[block * padded + real : (block + 1) * padded].zero_()
            if attn.qk_normalization:
                attn.q_norm.weight[real:].zero_()
                attn.k_norm.weight[real:].zero_()
            attn.proj.weight[:, real:].zero_()
    model.vision_model.detect_silent_dummy_heads()
    return model


# The scaled NVLM-D of the benchmarks: widths 256, 4 + 4 layers, the real 448 px tiles and vocabulary, attention
# padded with dummy heads in NVLM's proportion (8 real + 2 dummy). Its decoder's intermediate size equals its hidden
# size, so that transformers' InternVL can hold the same weights.
BENCHMARK_SCALE = {
    "vision_config": {
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_dummy_heads": 2,
    },
    "llm_config": {
        "hidden_size": 256,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
    },
}


def build_benchmark_model(seed: int = 0) -> NVLM_D_Model:
    """The benchmarks' scaled NVLM-D (`BENCHMARK_SCALE`) with seeded weights, its dummy heads zero as in the
    released checkpoint, in eval mode."""
    overrides = {key: dict(value) for key, value in BENCHMARK_SCALE.items()}
    return zero_dummy_heads_(build_tiny_model(seed, **overrides))


def build_tiny_model(seed: int = 0, **config_overrides) -> NVLM_D_Model:
    """A tiny NVLM-D in float32 with seeded random weights, in eval mode."""
    model = NVLM_D_Model(tiny_config(**config_overrides))
    return randomize_weights_(model, seed).eval()


def copy_tokenizer(directory: str | os.PathLike) -> None:
    """Put NVLM-D's tokenizer files (Qwen2.5's, generated by tools/build_tokenizer.py) into a model directory."""
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DIR / name, Path(directory) / name)


def save_tiny_checkpoint(directory: str | os.PathLike, seed: int = 0, **config_overrides) -> Path:
    """Write a self-contained tiny model directory, as a user's `save_pretrained` calls would: config with
    `auto_map`, the remote-code modules, safetensors weights, the tokenizer and the processor. Returns the
    directory."""
    from transformers import AutoTokenizer

    from .processing_nvlm_d import NVLM_D_Processor

    directory = Path(directory)
    model = build_tiny_model(seed, **config_overrides)
    model.save_pretrained(directory)
    copy_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    NVLM_D_Processor.from_model_config(model.config, tokenizer).save_pretrained(directory)
    return directory
