"""Read NVLM-D model directories with whatever transformers this interpreter has, as an engine would.

Run by tests/test_config_compat.py in small environments holding other transformers releases (vLLM reads a model
directory's `configuration_nvlm_d.py` under the transformers it pins). Imports nothing from `nvlm_d` and needs no
torch: only transformers' `AutoConfig` with `trust_remote_code=True`, as vLLM calls it.

    python config_probe.py OUT.json SAVE_DIR MODEL_DIR [MODEL_DIR ...]

For each MODEL_DIR: load the config, describe it, save it to SAVE_DIR/<index> and describe what was written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def describe(config) -> dict:
    text = config.get_text_config()
    rope = dict(getattr(text, "rope_parameters", None) or {})
    return {
        "class": type(config).__name__,
        "model_type": config.model_type,
        "architectures": config.architectures,
        "text_config_class": type(text).__name__,
        "text_model_type": text.model_type,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "rope_theta": rope.get("rope_theta"),
        "rope_type": rope.get("rope_type", rope.get("type")),
        "rope_factor": rope.get("factor"),
        "vision_model_type": config.vision_config.model_type,
        "vision_hidden_size": config.vision_config.hidden_size,
        "num_dummy_heads": config.vision_config.num_dummy_heads,
        "num_image_token": config.num_image_token,
        "max_dynamic_patch": config.max_dynamic_patch,
    }


def main(argv: list[str]) -> int:
    out, save_root, *model_dirs = argv
    import transformers
    from transformers import AutoConfig

    report = {"transformers": transformers.__version__, "models": []}
    for index, model_dir in enumerate(model_dirs):
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
        saved = Path(save_root) / str(index)
        config.save_pretrained(saved)
        report["models"].append(
            {
                "loaded": describe(config),
                "saved_dir": str(saved),
                "saved_json": json.loads((saved / "config.json").read_text()),
            }
        )
    Path(out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
