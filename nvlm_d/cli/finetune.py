"""`nvlm-d finetune`: fine-tune NVLM-D on JSONL conversations with transformers' Trainer.

One process: `nvlm-d finetune --model M --data D --output O [...]`. Several GPUs or machines: the same command under
`torchrun --nproc-per-node 8 -m nvlm_d.cli finetune ...` (or `accelerate launch`), with `--deepspeed` or `--fsdp` to
shard the model. Checkpoints go to OUTPUT/checkpoint-N; running the same command again resumes from the newest
complete one (also after kill -9), and does nothing (and says so) once the run has finished. The result is a plain
NVLM-D model directory in OUTPUT (LoRA adapters merged; the adapter alone in OUTPUT/adapter).

The run itself is `nvlm_d.training.finetune.finetune`; this module parses the options, resolves --model, and says
how the run went.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Any

from .common import CLIError, model_option, positive_int, say

# nvlm_d.training.lora.PARTS, named here so that parsing the command imports no torch
PARTS = ("vision", "mlp1", "llm")


def _parts(text: str) -> list[str]:
    parts = [part.strip() for part in text.split(",") if part.strip()] if text != "none" else []
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown parts {unknown}: choose from {', '.join(PARTS)} (or none)")
    return parts


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "finetune",
        help="fine-tune on JSONL conversations (LoRA, QLoRA or full; one GPU to many machines)",
        description=(
            "Fine-tune NVLM-D with transformers' Trainer on InternVL/LLaVA-style JSONL records ({'image': path or "
            "[paths], 'conversations': [{'from': 'human', 'value': '<image>\\n...'}, {'from': 'gpt', 'value': "
            "'...'}]}); the loss covers the answers only. Launch it as is on one device, or under torchrun / "
            "accelerate launch on many. Running it again with the same --output resumes from the newest complete "
            "checkpoint. See docs/finetuning.md."
        ),
    )
    parser.add_argument("--model", required=True, metavar="PATH", help="the NVLM-D model directory (or Hub id)")
    parser.add_argument("--data", required=True, metavar="JSONL", help="training records, one JSON object a line")
    parser.add_argument("--output", required=True, metavar="DIR", help="checkpoints and the fine-tuned model")
    parser.add_argument("--eval-data", metavar="JSONL", help="records to report the evaluation loss on")
    parser.add_argument("--image-folder", metavar="DIR", help="where image paths start (default: each file's folder)")
    parser.add_argument(
        "--lora", type=positive_int, metavar="R", help="train LoRA adapters of rank R (alpha 2R) instead of all weights"
    )
    parser.add_argument(
        "--qlora", action="store_true", help="with --lora: load the decoder in 4-bit NF4 (bitsandbytes, CUDA)"
    )
    parser.add_argument(
        "--freeze",
        type=_parts,
        default=["vision"],
        metavar="PARTS",
        help="comma-separated parts not to train: vision, mlp1, llm, or none (default: vision)",
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_positive_float, default=1.0, metavar="N", help="passes over the data")
    length.add_argument("--max-steps", type=positive_int, metavar="N", help="optimizer steps (instead of --epochs)")
    parser.add_argument("--batch-size", type=positive_int, default=1, metavar="N", help="examples per device a step")
    parser.add_argument("--grad-accum", type=positive_int, default=1, metavar="N", help="micro-batches per step")
    parser.add_argument(
        "--lr", type=_positive_float, metavar="RATE", help="peak learning rate (default: 1e-4 with LoRA, else 1e-5)"
    )
    parser.add_argument("--warmup-steps", type=int, default=0, metavar="N", help="linear warm-up steps (default: 0)")
    parser.add_argument(
        "--max-length",
        type=positive_int,
        default=8192,
        metavar="TOKENS",
        help="longest example, image tokens included; longer ones are left out with a warning (default: 8192)",
    )
    parser.add_argument("--max-tiles", type=positive_int, metavar="N", help="tiles per image (default: the config's)")
    parser.add_argument("--pack", action="store_true", help="pack several examples into rows of --max-length tokens")
    parser.add_argument(
        "--bad-records",
        choices=("error", "skip"),
        default="error",
        help="a bad record stops with an error naming its line (default), or is skipped and counted",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    shard = parser.add_mutually_exclusive_group()
    shard.add_argument(
        "--deepspeed",
        nargs="?",
        const="zero3",
        metavar="CONFIG",
        help="DeepSpeed with this JSON config (no value: the shipped ZeRO-3 config)",
    )
    shard.add_argument(
        "--fsdp",
        nargs="?",
        const="fsdp2",
        metavar="CONFIG",
        help="FSDP2 with this fsdp_config JSON (no value: the shipped one, ViT and decoder layers as units)",
    )
    parser.add_argument(
        "--dtype", choices=("bf16", "fp32"), help="training precision (default: bf16 on GPUs, fp32 on the CPU)"
    )
    parser.add_argument("--save-steps", type=positive_int, default=500, metavar="N", help="checkpoint every N steps")
    parser.add_argument(
        "--save-total-limit", type=positive_int, default=2, metavar="N", help="checkpoints kept (>= 2; default: 2)"
    )
    parser.add_argument("--eval-steps", type=positive_int, metavar="N", help="evaluate every N steps (default: save)")
    parser.add_argument("--logging-steps", type=positive_int, default=10, metavar="N", help="log every N steps")
    parser.add_argument("--seed", type=int, default=42, help="seed for weights of new adapters, shuffling, dropout")
    parser.add_argument("--workers", type=int, default=2, metavar="N", help="data-loading processes (default: 2)")
    parser.add_argument("--no-merge", action="store_true", help="with --lora: save the adapter only, do not merge")
    parser.set_defaults(handler=run)


def _summary(steps_before: int, global_step: int, mean_loss: float) -> str:
    if global_step == steps_before:
        return f"no steps left to train (step {global_step} was the last)"
    if steps_before:
        return f"trained steps {steps_before + 1}-{global_step}, mean training loss of these steps {mean_loss:.4f}"
    return f"trained {global_step} steps, mean training loss {mean_loss:.4f}"


def _options(args: argparse.Namespace) -> Any:
    """The run's FinetuneOptions from the command line; impossible settings as one-line errors."""
    from ..training.finetune import FinetuneError, FinetuneOptions

    try:
        return FinetuneOptions(
            **{field.name: getattr(args, field.name) for field in dataclasses.fields(FinetuneOptions)}
        )
    except FinetuneError as exc:
        raise CLIError(str(exc)) from None


def _go_offline() -> None:
    """A cached Hub model and no Hub: every load in this run reads the cache only."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"  # for processes started from here
    constants.HF_HUB_OFFLINE = True  # read once, at import, by huggingface_hub and transformers


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from ..training.finetune import FinetuneError, Outcome, finetune

    options = _options(args)  # impossible settings are reported before the model is looked for
    source = model_option(args.model)
    options = dataclasses.replace(options, model=source.path)
    if source.local_files_only:
        _go_offline()
    hf_logging.set_verbosity_warning()
    try:
        result = finetune(options, report=say)
    except FinetuneError as exc:
        raise CLIError(str(exc)) from None
    where = f"{result.output}" + (f", adapter in {result.adapter}" if result.adapter else "")
    if result.outcome is Outcome.ALREADY_FINISHED:  # said by every process, as nothing was started
        length = f"--max-steps {args.max_steps}" if args.max_steps is not None else f"--epochs {args.epochs:g}"
        say(
            f"{result.output} already holds this finished run: {result.global_step} steps ({length}); nothing to do. "
            "Raise --max-steps (or --epochs) to train further, or choose a new --output to start over"
        )
    elif result.main_process and result.outcome is Outcome.EXPORTED:
        say(f"model of step {result.global_step} in {where}")
    elif result.main_process:
        say(f"{_summary(result.steps_before, result.global_step, result.mean_loss)}; model in {where}")
    return 0
