"""Shared fixtures: where the reference facts live, and the repository root as a model directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
