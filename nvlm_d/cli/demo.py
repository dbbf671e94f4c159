"""`nvlm-d demo`: the whole pipeline offline, on a cached tiny model with random weights.

The tiny checkpoint and the sample image come from `nvlm_d.demo_assets`; this module tiles, asks, and prints what
each step did and took."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..demo_assets import SAMPLE_IMAGE_SIZE, CacheError, ensure_sample_image, ensure_tiny_checkpoint
from ..image_inputs import (
    TileSpec,
    check_placeholders,
    open_image_file,
    stack_images,
    tile_image,
    with_image_placeholders,
)
from .common import (
    CLIError,
    ModelSource,
    TokenCounter,
    add_max_num,
    add_placement_options,
    load_model,
    model_option,
    quiet_transformers,
    resolve_placement,
)

DEMO_MAX_NEW_TOKENS = 16
DEMO_QUESTION = "Describe the image."
REAL_MODEL_HINT = 'nvlm-d chat --model nvidia/NVLM-D-72B --gpus 8 --image photo.jpg "Describe the image."'


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="run the whole pipeline offline on a cached tiny model with random weights",
        description=(
            "Build (once, cached) a seeded tiny NVLM-D with random weights, tile a generated sample image, "
            "and chat about it, printing the tiling, the prompt size and timings. The answer is gibberish: the "
            "weights are random. --model runs the same on a real model."
        ),
    )
    parser.add_argument("--model", metavar="PATH", help="a real model directory (or Hub id) instead of the tiny one")
    parser.add_argument("--image", metavar="FILE", help="your image instead of the generated sample scene")
    parser.add_argument("--question", default=DEMO_QUESTION, help=f"default: {DEMO_QUESTION!r}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny model's random weights (default: 0)")
    add_max_num(parser)
    add_placement_options(parser, DEMO_MAX_NEW_TOKENS)
    parser.set_defaults(handler=_run_demo)


def tiny_checkpoint(seed: int = 0) -> tuple[Path, bool]:
    """`ensure_tiny_checkpoint` without transformers' progress bars; an unwritable cache as a one-line error.
    Returns (the checkpoint directory, whether it was built now)."""
    quiet_transformers()  # no "Writing model shards" bar
    try:
        return ensure_tiny_checkpoint(seed)
    except CacheError as exc:
        raise CLIError(str(exc)) from None


def _sample_image() -> Path:
    try:
        return ensure_sample_image()
    except CacheError as exc:
        raise CLIError(str(exc)) from None


def _prompt_tokens(model: Any, tokenizer: Any, question: str, num_patches_list: list[int] | None) -> tuple[int, int]:
    """(prompt tokens, image tokens) of the prompt `chat` builds for this question (`model.chat_prompt`)."""
    tokens_per_tile = TileSpec.of(model.config).tokens
    prompt = model.chat_prompt(question, num_patches_list or [])
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    return len(ids), sum(num_patches_list or []) * tokens_per_tile


def _run_demo(args: argparse.Namespace) -> int:
    tiny = args.model is None
    source = model_option(args.model) if not tiny else None
    started = time.perf_counter()
    opened = open_image_file(args.image) if args.image is not None else None  # a bad image fails before the model loads
    open_seconds = time.perf_counter() - started
    placement = resolve_placement(args)
    out = sys.stdout

    def row(label: str, text: str) -> None:
        print(f"{label:<11} {text}", file=out, flush=True)

    if tiny:
        print(
            f"NVLM-D demo: a tiny NVLM-D with RANDOM weights (seed {args.seed}) on the real code path: "
            "tiling, prompt, vision tower, projector, decoder.\n",
            file=out,
        )
        started = time.perf_counter()
        checkpoint, built = tiny_checkpoint(args.seed)
        source = ModelSource(str(checkpoint))
        note = f"built now in {time.perf_counter() - started:.1f} s, cached for next time" if built else "cached"
        row("checkpoint", f"{checkpoint} ({note})")
    else:
        print(f"NVLM-D demo on {source.path}\n", file=out)
        row("model", source.path)
    if opened is None:
        sample = _sample_image()
        row("image", f"{sample} ({SAMPLE_IMAGE_SIZE[0]}x{SAMPLE_IMAGE_SIZE[1]}, generated sample scene)")
        started = time.perf_counter()
        opened = open_image_file(sample)
        open_seconds = time.perf_counter() - started
    else:
        row("image", f"{opened.name} ({opened.image.size[0]}x{opened.image.size[1]})")

    started = time.perf_counter()
    model, tokenizer = load_model(source, placement, args.gpus)
    load_seconds = time.perf_counter() - started

    started = time.perf_counter()
    image = tile_image(opened, args.max_num, TileSpec.of(model.config))
    preprocess_seconds = open_seconds + time.perf_counter() - started
    row("tiling", f"--max-num {args.max_num} -> {image.describe()}")

    question = with_image_placeholders(args.question, 1)
    check_placeholders(question, 1)
    pixel_values, num_patches_list = stack_images([image])
    prompt_tokens, image_tokens = _prompt_tokens(model, tokenizer, question, num_patches_list)
    row(
        "prompt",
        f"{prompt_tokens} tokens, {image_tokens} of them image tokens ({image.num_tiles} tiles x {image.spec.tokens})",
    )
    row("question", args.question)

    counter = TokenCounter()
    generation_config = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    answer = model.chat(
        tokenizer, pixel_values, question, generation_config, num_patches_list=num_patches_list, streamer=counter
    )
    generate_seconds = time.perf_counter() - counter.started
    row("answer", "\n            ".join(answer.splitlines()) if answer else "(empty)")
    first = (counter.first_token_at or counter.started) - counter.started
    decode_seconds = (counter.finished_at or time.perf_counter()) - (counter.first_token_at or counter.started)
    decode_rate = f", decode {(counter.count - 1) / decode_seconds:.1f} tokens/s" if counter.count > 1 else ""
    row(
        "timings",
        f"load {load_seconds:.2f} s | preprocess {preprocess_seconds:.2f} s | generate "
        f"{generate_seconds:.2f} s: {counter.count} tokens, {counter.count / generate_seconds:.1f} tokens/s "
        f"(first token after {first:.2f} s{decode_rate}) on {placement.description}",
    )
    if tiny:
        print(
            "\nThe weights are random, so the answer is gibberish: this shows that the pipeline runs, not what it "
            "says.\nWith the real weights (nvidia/NVLM-D-72B: 159 GB in bf16, split over N GPUs by --gpus N; "
            "a Hub id or a local copy):\n"
            f"  {REAL_MODEL_HINT}\n"
            '  nvlm-d chat --model /path/to/NVLM-D-72B --gpus 8 --image photo.jpg "Describe the image."\n'
            "  nvlm-d demo --model /path/to/NVLM-D-72B --gpus 8",
            file=out,
        )
    return 0
