"""Shared fixtures: where the reference facts live, the repository root as a model directory, and a tiny
checkpoint that goes through the real save/load path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from nvlm_d.tiny import save_tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_DIR = Path(os.environ.get("NVLM_D_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The facts about the released checkpoint (../shared/reference); tests that need them skip without them."""
    if not (REFERENCE_DIR / "nvlm_d_72b_config.json").is_file():
        pytest.skip(f"reference data not found at {REFERENCE_DIR} (set NVLM_D_REFERENCE_DIR)")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A seeded tiny NVLM-D saved as a self-contained model directory (remote code, safetensors, tokenizer)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"), seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint, trust_remote_code=True, use_fast=False)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny checkpoint loaded through `trust_remote_code`, in float32, as a user would load it."""
    return AutoModel.from_pretrained(tiny_checkpoint, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(autouse=True)
def pillow_strict_about_truncated_images(monkeypatch):
    """Every test starts with Pillow's default (truncated images are errors): lmms-eval, which the evaluation tests
    import, turns the tolerance on for the whole process when its task module is first loaded."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA; without it they are skipped, never failed (CI has no GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Conversation records for the fine-tuning tests, in the JSONL format InternVL and LLaVA users have. Images are
# 64 px squares: one tile each, so that an example stays near 300 tokens (logits over the 152,064-token vocabulary
# dominate the tests' memory and time).
CONVERSATIONS = [
    {
        "image": "red.png",
        "conversations": [{"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Red."}],
    },
    {
        "conversations": [
            {"from": "human", "value": "Say hello."},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "And goodbye?"},
            {"from": "gpt", "value": "Goodbye, see you."},
        ]
    },
    {
        "image": ["red.png", "blue.png"],
        "conversations": [
            {"from": "human", "value": "First: <image>\nSecond: <image>\nSame colour?"},
            {"from": "gpt", "value": "No: red and blue."},
        ],
    },
    {
        "image": "blue.png",
        "conversations": [
            {"from": "system", "value": "You name colours."},
            {"from": "human", "value": "<image>\nColour?"},
            {"from": "gpt", "value": "Blue."},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "Yes."},
        ],
    },
]


def write_conversations(directory: Path, records: list[dict] = CONVERSATIONS) -> Path:
    """`records` as `directory`/train.jsonl, with the red and blue images they name beside it."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (220, 30, 30)).save(directory / "red.png")
    Image.new("RGB", (64, 64), (30, 30, 220)).save(directory / "blue.png")
    path = directory / "train.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="session")
def conversations_file(tmp_path_factory) -> Path:
    """A JSONL file of `CONVERSATIONS`: one image, text only over two turns, two images, a system turn."""
    return write_conversations(tmp_path_factory.mktemp("conversations"))
