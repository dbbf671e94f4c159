"""A downloaded `nvidia/NVLM-D-72B` snapshot in miniature, as users have it: the released file layout with tiny
weights, for the tests of what the package does with such a snapshot (tests/test_snapshot.py, tests/test_serving.py).

What is NVIDIA's and what is tiny:
- `config.json`: the released file (`../shared/reference/nvlm_d_72b_config.json`) with every key kept (its three-entry
  `auto_map`, `llm_config.model_type "llama"`, the generation leftovers `top_p 0`, `top_k 1`, ...); only the widths
  and depths are scaled down.
- weights: a seeded tiny NVLM-D under the released tensor names (checked against the released list), stored in the
  released dtypes (float32 where the released shards hold float32, bfloat16 elsewhere), sharded as the released index
  groups them (`model-0000k-of-0000K.safetensors`, one shard for each released shard the tiny tensors come from) with a
  `model.safetensors.index.json`.
- tokenizer: the released `tokenizer_config.json` (Qwen2.5's chat template), `vocab.json` and `merges.txt`; the
  released `tokenizer.json` is not in the reference data, so the package's (the same ids) stands in for it.
- `preprocessor_config.json`: the released `CLIPFeatureExtractor` file; no `processor_config.json`, no
  `generation_config.json`.
- NVIDIA's remote code (`configuration_nvlm_d.py`, `modeling_nvlm_d.py`, ...): stand-ins that fail on import as the
  originals do on transformers 5 (`No module named 'einops'`), so a test fails loudly if any of them is run.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from nvlm_d.cli import main
from nvlm_d.tiny import TOKENIZER_DIR, build_tiny_model

# The released remote-code files and the rest of the repository (reference_facts.md, A.1).
RELEASED_CODE = (
    "configuration_intern_vit.py",
    "configuration_nvlm_d.py",
    "conversation.py",
    "modeling_intern_vit.py",
    "modeling_nvlm_d.py",
)
STAND_IN_CODE = (
    '"""Stands in for NVIDIA\'s transformers-4.39 remote code, which fails to import on transformers 5."""\n\n'
    'raise ModuleNotFoundError("No module named \'einops\'", name="einops")\n'
)
# Released file name -> its copy in the reference data.
REFERENCE_FILES = {
    "config.json": "nvlm_d_72b_config.json",
    "tokenizer_config.json": "nvlm_d_72b_tokenizer_config.json",
    "vocab.json": "nvlm_d_72b_vocab.json",
    "merges.txt": "nvlm_d_72b_merges.txt",
    "preprocessor_config.json": "nvlm_d_72b_preprocessor_config.json",
}
TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_LLM = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def released_tensor_names(reference_dir: Path, vision_layers: int, llm_layers: int) -> set[str]:
    """The released tensor names that a model with this many layers has: the released list without deeper layers."""
    names = set()
    for name in (reference_dir / "nvlm_d_72b_weight_names.txt").read_text().split():
        found = _LAYER.search(name)
        depth = vision_layers if name.startswith("vision_model.") else llm_layers
        if found is None or int(found.group(1)) < depth:
            names.add(name)
    return names


def released_float32_names(reference_dir: Path) -> set[str]:
    """Tensors the released shards store in float32 (reference_facts.md, A.6); the rest are bfloat16."""
    table = (reference_dir / "nvlm_d_72b_weight_dtypes_inferred.tsv").read_text()
    rows = (line.split("\t") for line in table.splitlines())
    return {row[0] for row in rows if len(row) > 2 and row[2].strip().upper() in ("F32", "FLOAT32")}


def build_released_snapshot(
    directory: Path,
    reference_dir: Path,
    seed: int = 0,
    vision_config: dict | None = None,
    llm_config: dict | None = None,
) -> Path:
    """Lay out a released-style NVLM-D-72B snapshot with tiny seeded weights in `directory`; returns it.

    `vision_config`/`llm_config` override the tiny sizes (`TINY_VISION`, `TINY_LLM`)."""
    vision = {**TINY_VISION, **(vision_config or {})}
    llm = {**TINY_LLM, **(llm_config or {})}
    directory.mkdir(parents=True, exist_ok=True)
    for name, reference_name in REFERENCE_FILES.items():
        shutil.copyfile(reference_dir / reference_name, directory / name)
    shutil.copyfile(TOKENIZER_DIR / "tokenizer.json", directory / "tokenizer.json")
    for name in RELEASED_CODE:
        (directory / name).write_text(STAND_IN_CODE)
    (directory / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# NVLM-D-72B (stand-in card)\n")

    config = json.loads((directory / "config.json").read_text())
    config["vision_config"].update(vision)
    config["llm_config"].update(llm)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    model = build_tiny_model(seed, vision_config=vision, llm_config=llm)
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    expected = released_tensor_names(reference_dir, vision["num_hidden_layers"], llm["num_hidden_layers"])
    if set(state) != expected:
        differing = sorted(set(state) ^ expected)
        raise ValueError(f"the tiny model's tensor names differ from the released ones: {differing}")
    float32 = released_float32_names(reference_dir)
    write_released_shards(directory, reference_dir, state, float32)
    return directory


def write_released_shards(directory: Path, reference_dir: Path, state: dict, float32: set[str]) -> None:
    """`state` in the released dtypes, sharded as the released index groups the same names, with an index."""
    released_map = json.loads((reference_dir / "model.safetensors.index.json").read_text())["weight_map"]
    released_shards = sorted({released_map[name] for name in state})
    count = len(released_shards)
    shard_of = {old: f"model-{k:05d}-of-{count:05d}.safetensors" for k, old in enumerate(released_shards, start=1)}
    shards: dict[str, dict[str, torch.Tensor]] = {new: {} for new in shard_of.values()}
    for name, tensor in state.items():
        dtype = torch.float32 if name in float32 else torch.bfloat16
        shards[shard_of[released_map[name]]][name] = tensor.to(dtype).contiguous()
    for file_name, tensors in shards.items():
        save_file(tensors, directory / file_name, metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values())
    weight_map = {name: shard_of[released_map[name]] for name in sorted(state)}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=4) + "\n")


def nvlm_d_cli(*args: str) -> int:
    """`nvlm-d ARGS` in this process; returns the exit code. The CLI quiets transformers' logging for its process:
    the other tests of the session get theirs back."""
    from transformers.utils import logging as hf_logging

    verbosity, progress_bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    try:
        return main(list(args))
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress_bars:
            hf_logging.enable_progress_bar()
