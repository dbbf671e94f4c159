"""`nvlm-d plan`: how NVLM-D fits on GPUs, planned without weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..memory_size import DEFAULT_GPU_MEMORY, parse_memory
from ..model_source import read_config
from .common import CLIError, model_option, positive_int, quiet_transformers

MAX_GPUS = 64  # the largest GPU count searched for a plan that fits


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "plan",
        help="plan NVLM-D-72B over GPUs without weights: per-GPU memory, or how many GPUs it needs",
        description=(
            "Build the model on the meta device (no weights, no GPU needed), reserve each GPU's KV cache "
            "(context x batch), activations (the vision tower on --tiles tiles, one decoder layer's prefill) and "
            "1 GiB of CUDA overhead, place the modules in what is left, and print what each GPU holds. Without "
            "--gpus, plan on the fewest GPUs that fit. Exit code 1 if the model does not fit."
        ),
    )
    parser.add_argument(
        "--gpus", type=positive_int, metavar="N", help="GPUs to plan for (default: the fewest that fit)"
    )
    parser.add_argument(
        "--gpu-memory",
        type=_memory,
        default=DEFAULT_GPU_MEMORY,
        metavar="SIZE",
        help=f"memory per GPU (default: {DEFAULT_GPU_MEMORY}, what an 80 GB card shows to torch)",
    )
    parser.add_argument(
        "--strategy",
        choices=("balanced", "sequential"),
        default="balanced",
        help="balanced (default): spread the decoder layers over all the GPUs, the same memory used on each; "
        "sequential: fill GPU 0, then GPU 1, ... (accelerate's infer_auto_device_map), later GPUs may stay empty",
    )
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "int8", "int4"),
        default="bf16",
        help="weights: bf16 (default), fp16, or bitsandbytes int8/int4 on the decoder (vision tower stays bf16)",
    )
    parser.add_argument(
        "--context",
        type=positive_int,
        default=8192,
        metavar="TOKENS",
        help="tokens per sequence to reserve KV cache for (default: 8192)",
    )
    parser.add_argument("--batch", type=positive_int, default=1, metavar="N", help="sequences at once (default: 1)")
    parser.add_argument(
        "--tiles",
        type=positive_int,
        default=13,
        metavar="N",
        help="most tiles one forward pass encodes (default: 13 = max_num 12 + thumbnail)",
    )
    parser.add_argument("--model", metavar="PATH", help="plan this model's config.json (default: NVLM-D-72B's)")
    parser.add_argument("--save", metavar="JSON", help="write the device map, for from_pretrained(device_map=...)")
    parser.set_defaults(handler=_run_plan)


# --------------------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------------------


def _memory(text: str) -> str:
    """`--gpu-memory`, checked while the arguments are parsed (the value stays as written, for the report)."""
    try:
        parse_memory(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _run_plan(args: argparse.Namespace) -> int:
    config = None
    if args.model:
        source = model_option(args.model)
        quiet_transformers()
        try:
            config = read_config(source)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    from ..device_map import build_meta_model, format_plan, plan_device_map, smallest_gpu_count

    model = build_meta_model(config)
    settings = {
        "gpu_memory": args.gpu_memory,
        "dtype": args.dtype,
        "context": args.context,
        "batch": args.batch,
        "tiles": args.tiles,
        "model": model,
        "strategy": args.strategy,
    }
    plan = plan_device_map(args.gpus, **settings) if args.gpus else smallest_gpu_count(MAX_GPUS, **settings)
    if plan is None:
        print(
            f"NVLM-D does not fit on any number of GPUs of {args.gpu_memory} up to {MAX_GPUS} (one decoder layer, "
            "the vision tower or their reserves exceed one GPU)"
        )
        return 1
    print(f"{len(plan.gpus)} GPU(s) of {args.gpu_memory}:")
    print(format_plan(plan))
    if not plan.fits:
        needed = smallest_gpu_count(MAX_GPUS, **settings)
        if needed:
            advice = f"it needs {len(needed.gpus)} GPUs of {args.gpu_memory}"
        else:
            advice = f"no GPU count up to {MAX_GPUS} fits"
        print(f"NVLM-D does not fit on {args.gpus} GPU(s) of {args.gpu_memory} ({args.dtype}): {advice}")
        return 1
    if args.save:
        try:
            Path(args.save).write_text(json.dumps(plan.device_map, indent=1) + "\n")
        except OSError as exc:
            raise CLIError(f"--save {args.save}: cannot write the device map ({exc.strerror or exc})") from None
        print(f"device map written to {args.save}")
    return 0
