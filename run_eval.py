#!/usr/bin/env python
"""The model card's evaluation command:

    python run_eval.py --config-path eval/full_eval.yaml --result-save-path path/to/eval_results/ \
        --zero-shot-eval-tasks chartqa coco_caption ...

A thin layer over nvlm_d.evaluation (needs the package with its `[eval]` extra); `nvlm-d eval` takes the same flags.
"""

import sys

from nvlm_d.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
