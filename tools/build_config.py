"""Write the repository root's `config.json`: NVLM-D-72B's architecture as `NVLM_D_Config` writes it.

The released checkpoint's config.json is not copied: this file is generated from the package's defaults (which are
NVLM-D-72B's), and tests/test_configuration.py checks that it describes the same model as the checkpoint's.
With it, the repository root is a model directory that `AutoConfig` loads and that accelerate can plan on the
meta device without weights.

    python tools/build_config.py [--output DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nvlm_d.configuration_nvlm_d import NVLM_D_Config

REPO_ROOT = Path(__file__).resolve().parent.parent


def build_config() -> NVLM_D_Config:
    config = NVLM_D_Config(dtype="bfloat16", architectures=["NVLM_D"])
    config.vision_config.dtype = config.dtype
    config.vision_config.architectures = ["InternVisionModel"]
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=REPO_ROOT, help="directory to write config.json into")
    args = parser.parse_args(argv)
    build_config().to_json_file(args.output / "config.json", use_diff=False)


if __name__ == "__main__":
    main()
