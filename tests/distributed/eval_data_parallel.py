"""torchrun worker: the card's evaluation on N processes (gloo, CPU), each with its own fixed-answer model.
lmms-eval gives each rank its share of the documents and gathers the results on rank 0, which writes the result
files; every rank writes which questions it was asked to ask-<rank>.json.

    torchrun --nproc-per-node 2 eval_data_parallel.py DATA_DIR RESULT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for eval_fixtures

from eval_fixtures import FixedAnswers  # noqa: E402

from nvlm_d.evaluation.runner import EvalRequest, run_evaluation  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "eval" / "full_eval.yaml"


def main(data_dir: str, result_dir: str) -> None:
    model = FixedAnswers()
    run_evaluation(
        EvalRequest(
            config_path=str(CONFIG),
            result_save_path=result_dir,
            tasks=["chartqa", "textvqa", "ocrbench", "mmmu"],
            data_dir=data_dir,
            batch_size=2,
            model=model,
            tokenizer=object(),
        )
    )
    rank = int(os.environ.get("RANK", 0))
    (Path(result_dir) / f"asked-{rank}.json").write_text(json.dumps(model.asked))


if __name__ == "__main__":
    main(*sys.argv[1:3])
