"""Write the repository root's `config.json` and `processor_config.json`: NVLM-D-72B's architecture as
`NVLM_D_Config` writes it, and its processor as `NVLM_D_Processor` writes it.

The released checkpoint's config.json is not copied: this file is generated from the package's defaults (which are
NVLM-D-72B's), and tests/test_configuration.py checks that it describes the same model as the checkpoint's.
With them, the repository root is a model directory that `AutoConfig` and `AutoProcessor` load and that accelerate
can plan on the meta device without weights. (The root's tokenizer files are links into nvlm_d/tokenizer/, whose
chat template the processor takes.)

    python tools/build_config.py [--output DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from nvlm_d.configuration_nvlm_d import NVLM_D_Config
from nvlm_d.processing_nvlm_d import NVLM_D_Processor

REPO_ROOT = Path(__file__).resolve().parent.parent


def build_config() -> NVLM_D_Config:
    config = NVLM_D_Config(dtype="bfloat16", architectures=["NVLM_D"])
    config.vision_config.dtype = config.dtype
    config.vision_config.architectures = ["InternVisionModel"]
    return config


def processor_config(config: NVLM_D_Config) -> dict:
    """What `NVLM_D_Processor.save_pretrained` writes into processor_config.json for this config."""
    tokenizer = AutoTokenizer.from_pretrained(REPO_ROOT / "nvlm_d" / "tokenizer")
    with tempfile.TemporaryDirectory() as directory:
        NVLM_D_Processor.from_model_config(config, tokenizer).save_pretrained(directory)
        return json.loads((Path(directory) / "processor_config.json").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=REPO_ROOT, help="directory to write the files into")
    args = parser.parse_args(argv)
    config = build_config()
    config.to_json_file(args.output / "config.json", use_diff=False)
    text = json.dumps(processor_config(config), indent=2, sort_keys=True) + "\n"
    (args.output / "processor_config.json").write_text(text)


if __name__ == "__main__":
    main()
