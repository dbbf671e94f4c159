"""NVLM-D's benchmark evaluation on lmms-eval, as the model card runs it (docs/evaluation.md).

- `prompts`: NVLM's per-task prompts and the first-line cut;
- `scoring`: the `nvlm` (Megatron NVLM-1.0) and `standard` (official) scoring profiles;
- `tasks/`: the `nvlm_*` lmms-eval task pack (YAML + functions);
- `lmms_model`: the lmms-eval model `nvlm_d` (entry point `lmms_eval.models`), over `backends` (`hf`, `openai`);
- `runner.run_evaluation`: the card's `run_eval.py`; `results`: the files it writes.

Needs the `[eval]` extra (lmms-eval, anls, pycocoevalcap); importing this package imports none of them.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
