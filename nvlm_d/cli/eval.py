"""`nvlm-d eval` (and the card's `python run_eval.py`): NVLM-D's benchmarks on lmms-eval, with NVLM's prompts and
both scoring profiles; see docs/evaluation.md. Parses, calls nvlm_d.evaluation.runner.run_evaluation, prints the
results table."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..model_source import RELEASED_MODEL
from .common import CLIError, Parser, add_placement_options, positive_int, resolve_placement, say

DEFAULT_CONFIG = "eval/full_eval.yaml"


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The card's flags and the options around them: shared by `nvlm-d eval` and run_eval.py."""
    parser.add_argument(
        "--config-path", default=DEFAULT_CONFIG, metavar="YAML", help=f"the settings file (default: {DEFAULT_CONFIG})"
    )
    parser.add_argument(
        "--result-save-path", required=True, metavar="DIR", help="where results go; a killed run resumes from it"
    )
    parser.add_argument(
        "--zero-shot-eval-tasks",
        nargs="+",
        required=True,
        metavar="TASK",
        help="card task names (chartqa, mmmu, docvqa_test, ...); duplicates are run once",
    )
    parser.add_argument(
        "--model", default=RELEASED_MODEL, metavar="PATH", help="model directory or Hub id (hf backend)"
    )
    parser.add_argument(
        "--backend",
        choices=("hf", "openai"),
        default="hf",
        help="hf: this package's model; "
        "openai: a running OpenAI-compatible server such as `nvlm-d serve` (default: hf)",
    )
    parser.add_argument("--base-url", metavar="URL", help="openai backend: the server, e.g. http://localhost:8000/v1")
    parser.add_argument("--served-model-name", metavar="NAME", help="openai backend: the model name the server uses")
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, metavar="N", help="questions a batch (hf; default: 8)"
    )
    parser.add_argument("--limit", type=positive_int, metavar="N", help="only the first N samples of each task")
    parser.add_argument("--data-dir", metavar="DIR", help="read DIR/<task>/<split>.jsonl instead of the Hub")
    parser.add_argument("--bits", type=int, choices=(4, 8), help="quantize the decoder (bitsandbytes) to 4 or 8 bits")
    add_placement_options(parser, max_new_tokens=None)
    parser._option_string_actions[
        "--max-new-tokens"
    ].help = "override every task's token limit (default: each task's own, 16; 64 for captions)"


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval",
        help="the model card's benchmark evaluation (lmms-eval, NVLM's prompts and scorers)",
        description="Run NVLM-D's benchmarks as the model card does; --gpus N per replica, torchrun for several.",
    )
    add_eval_arguments(parser)
    parser.set_defaults(handler=run)


def _request(args: argparse.Namespace):
    from ..evaluation.runner import EvalRequest

    gpus = device = None
    if args.backend == "hf":
        placement = resolve_placement(args)
        gpus = args.gpus
        device = None if args.gpus else placement.device
    elif not args.base_url or not args.served_model_name:
        raise CLIError("--backend openai needs --base-url and --served-model-name")
    return EvalRequest(
        config_path=args.config_path,
        result_save_path=args.result_save_path,
        tasks=args.zero_shot_eval_tasks,
        model_path=args.model,
        backend=args.backend,
        batch_size=args.batch_size,
        limit=args.limit,
        data_dir=args.data_dir,
        gpus=gpus,
        device=device,
        dtype=args.dtype,
        bits=args.bits,
        base_url=args.base_url,
        served_model_name=args.served_model_name,
        max_new_tokens=args.max_new_tokens,
    )


def run(args: argparse.Namespace) -> int:
    from ..evaluation.results import markdown_table
    from ..evaluation.runner import run_evaluation

    try:
        collected = run_evaluation(_request(args))
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if collected is not None:
        print(markdown_table(collected), end="")
        say(f"results in {args.result_save_path} (summary.json, results.md, results.png, samples/)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """run_eval.py's entry point: the same flags as `nvlm-d eval`, errors as one line."""
    parser = Parser(prog="run_eval.py", description="NVLM-D's benchmark evaluation, as the model card runs it.")
    add_eval_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CLIError as exc:
        say(f"run_eval.py: error: {exc}")
        return exc.exit_code
