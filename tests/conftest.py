"""Shared fixtures: where the reference facts live, the repository root as a model directory, and a tiny
checkpoint that goes through the real save/load path."""

from __future__ import annotations

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


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA; without it they are skipped, never failed (CI has no GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
