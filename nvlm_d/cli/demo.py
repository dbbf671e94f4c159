"""`nvlm-d demo`: the whole pipeline offline, on a cached tiny model with random weights."""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import __version__
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
    fsync_dir,
    load_model,
    model_option,
    one_line,
    quiet_transformers,
    resolve_placement,
)

DEMO_MAX_NEW_TOKENS = 16
DEMO_QUESTION = "Describe the image."
SAMPLE_IMAGE_SIZE = (1600, 900)
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


# --------------------------------------------------------------------------------------------------------
# nvlm-d demo
# --------------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Where the demo keeps its tiny checkpoint and sample image: $NVLM_D_CACHE, else ~/.cache/nvlm_d."""
    configured = os.environ.get("NVLM_D_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "nvlm_d"


def _cache_error(root: Path, exc: OSError) -> CLIError:
    """An unusable cache directory, with the fix that applies: NVLM_D_CACHE may be the cause, not the cure."""
    reason = exc.strerror or one_line(exc)
    if os.environ.get("NVLM_D_CACHE"):
        return CLIError(
            f"cannot write to the cache directory {root} ({reason}), which NVLM_D_CACHE names: "
            "point NVLM_D_CACHE at a directory you can write to"
        )
    return CLIError(
        f"cannot write to the cache directory {root} ({reason}): set NVLM_D_CACHE to a directory you can write to"
    )


def _source_fingerprint() -> str:
    """A short hash of the code a tiny checkpoint is made of, so an edited (editable) install rebuilds it."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent.parent
    for name in (
        "configuration_nvlm_d.py",
        "modeling_nvlm_d.py",
        "modeling_intern_vit.py",
        "conversation.py",
        "tiny.py",
        "tokenizer/tokenizer_config.json",
    ):
        file = package / name
        digest.update(name.encode() + b"\0" + (file.read_bytes() if file.is_file() else b"") + b"\0")
    return digest.hexdigest()[:8]


def _fsync_tree(directory: Path) -> None:
    for file in directory.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(directory)


def ensure_tiny_checkpoint(seed: int = 0) -> tuple[Path, bool]:
    """The cached tiny checkpoint for this package version, code and seed; built once. Returns (dir, built now).

    Built in a temporary directory beside its final place and renamed into it, so the cache never holds a
    half-written checkpoint (a crash leaves only a `.tmp-*` directory, ignored and removed on the next build);
    two processes building at once both succeed and one copy wins.
    """
    from ..tiny import save_tiny_checkpoint

    root = cache_root()
    final = root / f"tiny-{__version__}-seed{seed}-{_source_fingerprint()}"
    required = ("config.json", "model.safetensors", "tokenizer.json")
    if all((final / name).is_file() for name in required):
        return final, False
    try:
        root.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    except OSError as exc:
        raise _cache_error(root, exc) from None
    try:
        if final.exists():  # incomplete (e.g. files removed by hand): rebuild it
            shutil.rmtree(final, ignore_errors=True)
        for stale in root.glob(f".tmp-{final.name}-*"):
            if time.time() - stale.stat().st_mtime > 3600:  # an old crash's leftovers, not a concurrent build
                shutil.rmtree(stale, ignore_errors=True)
        quiet_transformers()  # no "Writing model shards" bar
        save_tiny_checkpoint(building, seed=seed)
        building.chmod(0o755)
        _fsync_tree(building)
        try:
            os.rename(building, final)
        except OSError:
            if not all((final / name).is_file() for name in required):
                raise
            shutil.rmtree(building, ignore_errors=True)  # another process finished first: use its copy
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return final, True


def draw_sample_image(size: tuple[int, int] = SAMPLE_IMAGE_SIZE):
    """A deterministic 16:9 scene (sky and ground gradients, sun, mountains, a house, a tree, a bar chart, text),
    so the demo needs no image file or network. Returns an RGB PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    horizon = int(height * 0.62)

    def lerp(a: tuple[int, ...], b: tuple[int, ...], t: float) -> tuple[int, ...]:
        return tuple(round(x + (y - x) * t) for x, y in zip(a, b, strict=True))

    for y in range(horizon):
        draw.line([(0, y), (width, y)], fill=lerp((38, 84, 170), (250, 205, 160), y / horizon))
    for y in range(horizon, height):
        draw.line([(0, y), (width, y)], fill=lerp((92, 150, 70), (40, 90, 40), (y - horizon) / (height - horizon)))
    sx, sy, sr = int(width * 0.78), int(height * 0.2), int(height * 0.08)
    draw.ellipse([sx - sr, sy - sr, sx + sr, sy + sr], fill=(255, 214, 90), outline=(255, 170, 40), width=6)
    draw.polygon([(0, horizon), (width * 0.18, height * 0.28), (width * 0.4, horizon)], fill=(96, 96, 120))
    draw.polygon([(width * 0.25, horizon), (width * 0.48, height * 0.22), (width * 0.7, horizon)], fill=(80, 80, 104))
    draw.polygon(
        [(width * 0.44, height * 0.3), (width * 0.48, height * 0.22), (width * 0.52, height * 0.3)],
        fill=(240, 240, 250),
    )
    # a house: walls, roof, door, windows
    hx, hy, hw, hh = int(width * 0.08), int(height * 0.55), int(width * 0.16), int(height * 0.2)
    draw.rectangle([hx, hy, hx + hw, hy + hh], fill=(200, 60, 50), outline=(60, 20, 20), width=4)
    draw.polygon([(hx - 20, hy), (hx + hw // 2, hy - hh * 0.7), (hx + hw + 20, hy)], fill=(90, 50, 30))
    draw.rectangle([hx + hw * 0.42, hy + hh * 0.45, hx + hw * 0.58, hy + hh], fill=(70, 40, 20))
    for wx in (hx + hw * 0.12, hx + hw * 0.68):
        draw.rectangle([wx, hy + hh * 0.2, wx + hw * 0.2, hy + hh * 0.45], fill=(180, 220, 255), outline=(40, 40, 40))
    # a tree
    tx, ty = int(width * 0.33), int(height * 0.6)
    draw.rectangle([tx - 12, ty, tx + 12, ty + height * 0.14], fill=(100, 60, 30))
    draw.ellipse([tx - 70, ty - 120, tx + 70, ty + 20], fill=(30, 120, 50))
    # a road
    draw.polygon(
        [(width * 0.55, height), (width * 0.62, horizon), (width * 0.66, horizon), (width * 0.85, height)],
        fill=(70, 70, 70),
    )
    # a bar chart on a card, with labels
    cx, cy, cw, ch = int(width * 0.74), int(height * 0.42), int(width * 0.22), int(height * 0.36)
    draw.rounded_rectangle([cx, cy, cx + cw, cy + ch], radius=16, fill=(250, 250, 245), outline=(30, 30, 30), width=3)
    small = ImageFont.load_default(size=max(12, height // 40))
    big = ImageFont.load_default(size=max(16, height // 12))
    values = (0.35, 0.8, 0.55, 0.95)
    bar_w = cw // (2 * len(values) + 1)
    for k, value in enumerate(values):
        x0 = cx + bar_w * (2 * k + 1)
        y0 = cy + ch - 40 - int((ch - 90) * value)
        draw.rectangle(
            [x0, y0, x0 + bar_w, cy + ch - 40], fill=((60, 110, 200), (220, 120, 40), (60, 160, 90), (170, 60, 160))[k]
        )
        draw.text((x0 + bar_w // 2, cy + ch - 20), "Q" + str(k + 1), fill=(20, 20, 20), font=small, anchor="mm")
    draw.text((cx + cw // 2, cy + 24), "Sales 2024", fill=(20, 20, 20), font=small, anchor="mm")
    draw.text(
        (width * 0.04, height * 0.06),
        "NVLM-D demo",
        fill=(255, 255, 255),
        font=big,
        stroke_width=3,
        stroke_fill=(20, 20, 60),
    )
    draw.text(
        (width * 0.04, height * 0.06 + big.size * 1.3),
        f"a {width}x{height} sample scene",
        fill=(255, 255, 255),
        font=small,
        stroke_width=2,
        stroke_fill=(20, 20, 60),
    )
    return image


def ensure_sample_image() -> Path:
    """The demo's sample scene as a PNG in the cache (written once, atomically)."""
    root = cache_root()
    path = root / f"sample-{SAMPLE_IMAGE_SIZE[0]}x{SAMPLE_IMAGE_SIZE[1]}-v1.png"
    if path.is_file():
        return path
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".tmp-sample-", suffix=".png", dir=root)
    except OSError as exc:
        raise _cache_error(root, exc) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            draw_sample_image().save(handle, format="PNG")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


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
        checkpoint, built = ensure_tiny_checkpoint(args.seed)
        source = ModelSource(str(checkpoint))
        note = f"built now in {time.perf_counter() - started:.1f} s, cached for next time" if built else "cached"
        row("checkpoint", f"{checkpoint} ({note})")
    else:
        print(f"NVLM-D demo on {source.path}\n", file=out)
        row("model", source.path)
    if opened is None:
        sample = ensure_sample_image()
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
