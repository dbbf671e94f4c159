"""`nvlm-d plan`: how NVLM-D fits on GPUs, planned without weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import CLIError, one_line, positive_int, quiet_transformers, resolve_model_path

MAX_GPUS = 64  # the largest GPU count searched for a plan that fits


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "plan",
        help="plan NVLM-D-72B over GPUs without weights: per-GPU memory, or how many GPUs it needs",
        description=(
            "Build the model on the meta device (no weights, no GPU needed), place it with accelerate after "
            "reserving each GPU's KV cache (context x batch), activations (the vision tower on --tiles tiles, one "
            "decoder layer's prefill) and 1 GiB of CUDA overhead, and print what each GPU holds. Without --gpus, "
            "plan on the fewest GPUs that fit. Exit code 1 if the model does not fit."
        ),
    )
    parser.add_argument(
        "--gpus", type=positive_int, metavar="N", help="GPUs to plan for (default: the fewest that fit)"
    )
    parser.add_argument("--gpu-memory", default="80GiB", metavar="SIZE", help="memory per GPU (default: 80GiB)")
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


def _run_plan(args: argparse.Namespace) -> int:
    from ..device_map import build_meta_model, format_plan, parse_memory, plan_device_map, smallest_gpu_count

    try:
        parse_memory(args.gpu_memory)
    except ValueError as exc:
        raise CLIError(f"--gpu-memory: {exc}") from None
    config = None
    if args.model:
        from transformers import AutoConfig

        path = resolve_model_path(args.model)
        quiet_transformers()
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        except Exception as exc:
            raise CLIError(f"cannot read the config of {path}: {one_line(exc)}") from None
        if getattr(config, "model_type", None) != "NVLM_D":
            raise CLIError(f"{path} is not an NVLM-D model (model_type {getattr(config, 'model_type', None)!r})")
    model = build_meta_model(config)
    settings = {
        "gpu_memory": args.gpu_memory,
        "dtype": args.dtype,
        "context": args.context,
        "batch": args.batch,
        "tiles": args.tiles,
        "model": model,
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
