"""`nvlm-d`: NVLM-D-72B from the command line.

    nvlm-d demo                                   the whole pipeline offline, on a cached tiny random model
    nvlm-d chat --model PATH [--image F] [Q]      one question, or an interactive session (stdin)
    nvlm-d tiles IMAGE [--out tiles.png]          how an image is tiled, and what it costs in tokens
    nvlm-d batch --model PATH --input R.jsonl --output A.jsonl
                                                  resumable, crash-safe batch inference
    nvlm-d plan [--gpus N] [--gpu-memory 80GiB]   how NVLM-D-72B fits on GPUs, without weights

Adding a command: write `_add_<name>(commands)` (a subparser whose defaults set `handler`) and list it in
`COMMANDS`. Handlers take the parsed arguments and return an exit code; they raise `CLIError` for bad input,
which `main` prints as one line (`nvlm-d: error: ...`) without a traceback.

Heavy imports (torch, transformers) happen inside the handlers, so `--help` and argument errors are instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .conversation import IMAGE_PLACEHOLDER, image_prompt, tile_tags

PROG = "nvlm-d"
TILE_SIZE = 448  # NVLM-D's tile side in pixels
TOKENS_PER_TILE = 256  # image tokens per tile after the pixel shuffle
DEFAULT_MAX_NUM = 6  # tiles per image at most (the model card's example uses 6; load_image's default is 12)
DEFAULT_MAX_NEW_TOKENS = 1024  # the model card's generation_config
DEMO_MAX_NEW_TOKENS = 16
DEMO_QUESTION = "Describe the image."
SAMPLE_IMAGE_SIZE = (1600, 900)
PACKAGE_TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
REAL_MODEL_HINT = 'nvlm-d chat --model nvidia/NVLM-D-72B --gpus 8 --image photo.jpg "Describe the image."'

# Layout of the PNG written by `nvlm-d tiles` (public so tests can find the grid lines).
PNG_MARGIN = 24  # left, right and bottom margin
PNG_HEADER = 64  # band above the tiles holding the title; the grid starts at y = PNG_HEADER
PNG_GAP = 48  # between the tile grid and the thumbnail
PNG_BACKGROUND = (255, 255, 255)
GRID_COLOR = (255, 0, 255)  # grid lines: 3 px wide, centred on each tile boundary, drawn last
THUMBNAIL_COLOR = (0, 170, 255)  # outline of the thumbnail

# Generation settings a batch request may carry, with their checks.
_REQUEST_GENERATION_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "min_new_tokens": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "num_beams": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "repetition_penalty": (lambda v: _is_number(v) and v > 0, "a number > 0"),
}

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


class CLIError(Exception):
    """Bad input or an unusable environment: printed as one `nvlm-d: error: ...` line, exit code 2."""

    exit_code = 2


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (transformers' loading errors span several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _say(*parts: object) -> None:
    """A status line on stderr (stdout carries the answers)."""
    print(*parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (no usage block), as every other CLI error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{PROG}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _add_placement_options(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--gpus", type=_positive_int, metavar="N",
        help="spread the model over GPUs 0..N-1 with the model card's layer split (nvlm_d.device_map.split_model)",
    )
    where.add_argument(
        "--device", metavar="DEVICE",
        help="put the whole model on one device: cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"),
        help="weights' dtype (default: bf16 on a GPU, fp32 on the CPU)",
    )
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, default=max_new_tokens, metavar="N",
        help=f"generate at most N tokens per answer (default: {max_new_tokens})",
    )


def _add_max_num(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-num", type=_positive_int, default=DEFAULT_MAX_NUM, metavar="N",
        help=f"at most N tiles of 448x448 per image, thumbnail not counted (default: {DEFAULT_MAX_NUM})",
    )


def _add_demo(commands: argparse._SubParsersAction) -> None:
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
    _add_max_num(parser)
    _add_placement_options(parser, DEMO_MAX_NEW_TOKENS)
    parser.set_defaults(handler=_run_demo)


def _add_chat(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "chat",
        help="ask a question (one-shot) or chat interactively, with images",
        description=(
            "With a QUESTION: answer it and exit. Without: an interactive session reading questions from stdin, "
            "streaming the answers and keeping the history; /image PATH adds an image to the next question, "
            "/reset clears the conversation, /quit (or end of input) ends it. Several images are numbered "
            "'Image-1: <image>' ... unless the question places its own <image> markers."
        ),
    )
    parser.add_argument("question", nargs="?", metavar="QUESTION", help="ask this and exit (omit for a session)")
    parser.add_argument("--model", required=True, metavar="PATH", help="model directory (with config.json) or Hub id")
    parser.add_argument(
        "--image", action="append", default=[], metavar="FILE",
        help="an image for the (first) question; repeat for several images",
    )
    _add_max_num(parser)
    _add_placement_options(parser, DEFAULT_MAX_NEW_TOKENS)
    parser.set_defaults(handler=_run_chat)


def _add_tiles(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "tiles",
        help="show how an image is tiled and how many tokens it costs",
        description=(
            "Print the tile grid NVLM-D chooses for IMAGE, the tile count (thumbnail included) and the prompt "
            "tokens it costs, and write a PNG of the resized image with the grid drawn over it, beside the "
            "448x448 thumbnail. Needs no model."
        ),
    )
    parser.add_argument("image", metavar="IMAGE")
    _add_max_num(parser)
    parser.add_argument("--out", metavar="PNG", help="where to write the picture (default: <image name>.tiles.png)")
    parser.set_defaults(handler=_run_tiles)


def _add_batch(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "batch",
        help="answer a JSONL file of requests, resumably and crash-safely",
        description=(
            "Answer every request of --input (one JSON object a line: id, question, optional image path or "
            "list of paths, optional generation settings) into --output, one record a line, each flushed to "
            "disk as it is made. Run again with the same --output to resume: ids already answered are skipped, "
            "a line half-written by a crash is cut off first. A bad request becomes an error record and the "
            "run goes on; error records are final unless --retry-errors is given. Exit code 1 if the output "
            "holds any error record."
        ),
    )
    parser.add_argument("--model", required=True, metavar="PATH", help="model directory (with config.json) or Hub id")
    parser.add_argument("--input", required=True, metavar="JSONL", help="requests, one JSON object a line")
    parser.add_argument("--output", required=True, metavar="JSONL", help="answers; appended to, and resumed from")
    parser.add_argument("--retry-errors", action="store_true", help="drop earlier error records and retry them")
    parser.add_argument("--seed", type=int, default=0, help="base seed for sampled answers (per-id, so resumes agree)")
    _add_max_num(parser)
    _add_placement_options(parser, DEFAULT_MAX_NEW_TOKENS)
    parser.set_defaults(handler=_run_batch)


def _add_plan(commands: argparse._SubParsersAction) -> None:
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
    parser.add_argument("--gpus", type=_positive_int, metavar="N", help="GPUs to plan for (default: the fewest that fit)")
    parser.add_argument("--gpu-memory", default="80GiB", metavar="SIZE", help="memory per GPU (default: 80GiB)")
    parser.add_argument(
        "--dtype", choices=("bf16", "fp16", "int8", "int4"), default="bf16",
        help="weights: bf16 (default), fp16, or bitsandbytes int8/int4 on the decoder (vision tower stays bf16)",
    )
    parser.add_argument("--context", type=_positive_int, default=8192, metavar="TOKENS",
                        help="tokens per sequence to reserve KV cache for (default: 8192)")
    parser.add_argument("--batch", type=_positive_int, default=1, metavar="N", help="sequences at once (default: 1)")
    parser.add_argument("--tiles", type=_positive_int, default=13, metavar="N",
                        help="most tiles one forward pass encodes (default: 13 = max_num 12 + thumbnail)")
    parser.add_argument("--model", metavar="PATH", help="plan this model's config.json (default: NVLM-D-72B's)")
    parser.add_argument("--save", metavar="JSON", help="write the device map, for from_pretrained(device_map=...)")
    parser.set_defaults(handler=_run_plan)


# The subcommands, in the order `--help` lists them. A new command is one `_add_<name>` function more.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_demo, _add_chat, _add_tiles, _add_batch, _add_plan]


def build_parser() -> argparse.ArgumentParser:
    """The `nvlm-d` argument parser: one subparser per entry of `COMMANDS`, each setting `handler`."""
    parser = _Parser(
        prog=PROG,
        description="NVLM-D-72B (InternViT-6B + Qwen2-72B) from the command line.",
        epilog=f"Start with '{PROG} demo' (offline, no weights needed). '{PROG} COMMAND --help' describes a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for add_command in COMMANDS:
        add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `nvlm-d` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except CLIError as exc:
        _say(f"{PROG}: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _say(f"{PROG}: interrupted")
        return 130
    except BrokenPipeError:  # stdout closed early (`nvlm-d ... | head`)
        sys.stderr.close()
        return 141
    except Exception as exc:  # an unexpected failure: still one line, the traceback on request
        if os.environ.get("NVLM_D_DEBUG"):
            raise
        _say(f"{PROG}: error: {type(exc).__name__}: {_one_line(exc)} (set NVLM_D_DEBUG=1 for the traceback)")
        return 1


# --------------------------------------------------------------------------------------------------------
# Images: tiling decision and pixel values
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TiledImage:
    """An image as the model gets it: its tiles' pixel values and how they were cut."""

    name: str
    size: tuple[int, int]  # original width, height
    grid: tuple[int, int]  # cols, rows
    pixel_values: Any  # float32 tensor [num_tiles, 3, 448, 448]

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])

    def describe(self) -> str:
        cols, rows = self.grid
        if cols * rows == 1:
            return f"grid 1x1 = 1 tile (a single tile doubles as the thumbnail; {TOKENS_PER_TILE} image tokens)"
        return (
            f"grid {cols}x{rows} (cols x rows, resized to {cols * TILE_SIZE}x{rows * TILE_SIZE}) + thumbnail "
            f"= {self.num_tiles} tiles ({self.num_tiles * TOKENS_PER_TILE} image tokens)"
        )


def _open_image_checked(path: str):
    """Open and decode an image file with the image module's checks, as a CLIError on failure."""
    from PIL import Image

    if not os.path.exists(path):
        raise CLIError(f"image not found: {path}")
    if os.path.isdir(path):
        raise CLIError(f"image is a directory, not a file: {path}")
    try:
        image = Image.open(path)
        image.load()
    except Image.DecompressionBombError as exc:
        raise CLIError(f"image too large: {path}: {_one_line(exc)}") from None
    except Exception as exc:
        raise CLIError(f"cannot read image {path}: {_one_line(exc)}") from None
    if image.size[0] == 0 or image.size[1] == 0:
        raise CLIError(f"image has no pixels: {path}")
    return image


def load_tiled_image(path: str | os.PathLike, max_num: int) -> TiledImage:
    """`load_image(path, max_num=max_num)` plus the grid it chose; bad files raise CLIError (one clear line)."""
    from .image_processing_nvlm_d import load_image, select_grid

    path = os.fspath(path)
    if not os.path.exists(path):
        raise CLIError(f"image not found: {path}")
    if os.path.isdir(path):
        raise CLIError(f"image is a directory, not a file: {path}")
    try:
        pixel_values = load_image(path, max_num=max_num)
    except (OSError, ValueError) as exc:  # InvalidImageError is an OSError, ImageTooLargeError a ValueError
        raise CLIError(f"cannot read image {path}: {_one_line(exc)}") from None
    from PIL import Image

    with Image.open(path) as image:  # the header only: the size for the grid
        size = image.size
    return TiledImage(path, size, select_grid(*size, max_num=max_num), pixel_values)


def with_image_placeholders(question: str, num_new_images: int, first_index: int = 1, label: bool = False) -> str:
    """The question with one `<image>` per new image in front, unless it already places its own.

    One image gets `<image>\\n` (as `chat` itself adds); several, or `label=True`, get numbered lines
    `Image-k: <image>\\n` starting at `first_index` (the InternVL/NVLM multi-image convention).
    """
    if num_new_images == 0 or IMAGE_PLACEHOLDER in question:
        return question
    if num_new_images == 1 and not label:
        return f"{IMAGE_PLACEHOLDER}\n{question}"
    lines = "".join(f"Image-{first_index + k}: {IMAGE_PLACEHOLDER}\n" for k in range(num_new_images))
    return lines + question


def _check_placeholders(question: str, num_images: int) -> None:
    found = question.count(IMAGE_PLACEHOLDER)
    if found != num_images:
        raise CLIError(
            f"the question has {found} {IMAGE_PLACEHOLDER} marker(s) but {num_images} image(s) were given: "
            f"use one marker per image, or none to have them put in front"
        )


def _stack(images: Sequence[TiledImage]) -> tuple[Any, list[int] | None]:
    """pixel_values and num_patches_list for `chat` (None, None without images)."""
    if not images:
        return None, None
    import torch

    return torch.cat([image.pixel_values for image in images]), [image.num_tiles for image in images]


# --------------------------------------------------------------------------------------------------------
# Models: paths, placement, loading, generation helpers
# --------------------------------------------------------------------------------------------------------


def resolve_model_path(path: str) -> str:
    """A local model directory (must hold config.json) or, when no such path exists, a Hub repo id."""
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise CLIError(f"--model {path}: not a model directory (no config.json in it)")
        return str(local)
    if local.exists():
        raise CLIError(f"--model {path}: is a file; expected a model directory (with config.json)")
    if _HUB_ID.fullmatch(path):
        return path  # from the Hugging Face cache, or downloaded when online
    raise CLIError(f"--model {path}: no such directory")


@dataclasses.dataclass
class Placement:
    device_map: Any  # None (CPU), {"": device} or split_model's map
    device: str  # where inputs go first ("cpu", "cuda:0", ...)
    dtype: Any  # torch dtype
    description: str


def resolve_placement(args: argparse.Namespace) -> Placement:
    """Where and in which dtype to load, from --gpus / --device / --dtype; CLIError when impossible here."""
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    cuda = torch.cuda.is_available()
    if args.gpus is not None:
        if not cuda:
            raise CLIError(f"--gpus {args.gpus}: no CUDA device is available here; use --device cpu")
        if args.gpus > torch.cuda.device_count():
            raise CLIError(f"--gpus {args.gpus}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        dtype = dtypes[args.dtype or "bf16"]
        return Placement("split", "cuda:0", dtype, f"{args.gpus} GPU(s), {args.dtype or 'bf16'}")
    device = args.device or ("cuda" if cuda else "cpu")
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {device}: not a device (try cpu, cuda or cuda:1)") from None
    if kind == "cuda" and not cuda:
        raise CLIError(f"--device {device}: no CUDA device is available here; use --device cpu")
    dtype_name = args.dtype or ("fp32" if kind == "cpu" else "bf16")
    device_map = None if kind == "cpu" else {"": device}
    return Placement(device_map, device, dtypes[dtype_name], f"{device}, {dtype_name}")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(path: str, placement: Placement, gpus: int | None = None) -> tuple[Any, Any]:
    """`AutoModel.from_pretrained(path, trust_remote_code=True, ...)` and its tokenizer, quietly; CLIError on failure."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        kwargs: dict[str, Any] = {"trust_remote_code": True, "dtype": placement.dtype}
        if placement.device_map == "split":
            from .device_map import split_model

            config = AutoConfig.from_pretrained(path, trust_remote_code=True)
            num_layers = config.llm_config.num_hidden_layers
            kwargs["device_map"] = split_model(gpus, num_layers=num_layers)
        elif placement.device_map is not None:
            kwargs["device_map"] = placement.device_map
        model = AutoModel.from_pretrained(path, **kwargs).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    except CLIError:
        raise
    except Exception as exc:
        raise CLIError(f"cannot load the model from {path}: {_one_line(exc)}") from None
    if not callable(getattr(model, "chat", None)):
        raise CLIError(f"{path} is not an NVLM-D model ({type(model).__name__} has no chat method)")
    return model, tokenizer


class TokenCounter:
    """A generation streamer that only counts: new tokens, and when the first one came (prefill done)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.count = 0
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate's first call carries the prompt
            self._prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.count += int(value.numel())

    def end(self) -> None:
        self.finished_at = time.perf_counter()


def stream_chat(model: Any, tokenizer: Any, pixel_values: Any, question: str, generation_config: dict,
                history: list, num_patches_list: list[int] | None, out=None) -> tuple[str, list]:
    """`model.chat` with its tokens printed to `out` as they come (TextIteratorStreamer, generation in a thread).

    Returns (answer, new history). An exception in the generation thread is re-raised here.
    """
    from transformers import TextIteratorStreamer

    out = out or sys.stdout
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict[str, Any] = {}

    def generate() -> None:
        try:
            result["value"] = model.chat(
                tokenizer, pixel_values, question, generation_config, history=history,
                return_history=True, num_patches_list=num_patches_list, streamer=streamer,
            )
        except BaseException as exc:  # handed to the caller; end the stream so the reader does not wait forever
            result["error"] = exc
            streamer.end()

    thread = threading.Thread(target=generate, name="nvlm_d-generate", daemon=True)
    thread.start()
    # Print exactly the answer `chat` returns (which is stripped): no leading whitespace, and trailing
    # whitespace held back until more text follows it.
    started, held = False, ""
    for text in streamer:
        if not started:
            text = text.lstrip()
            started = bool(text)
        text = held + text
        body = text.rstrip()
        held = text[len(body):]
        out.write(body)
        out.flush()
    thread.join()
    out.write("\n")
    out.flush()
    if "error" in result:
        raise result["error"]
    return result["value"]


# --------------------------------------------------------------------------------------------------------
# nvlm-d demo
# --------------------------------------------------------------------------------------------------------


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("nvlm-d")
    except Exception:
        return "0+unknown"


def cache_root() -> Path:
    """Where the demo keeps its tiny checkpoint and sample image: $NVLM_D_CACHE, else ~/.cache/nvlm_d."""
    configured = os.environ.get("NVLM_D_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "nvlm_d"


def _source_fingerprint() -> str:
    """A short hash of the code a tiny checkpoint is made of, so an edited (editable) install rebuilds it."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for name in ("configuration_nvlm_d.py", "modeling_nvlm_d.py", "modeling_intern_vit.py", "conversation.py",
                 "tiny.py", "tokenizer/tokenizer_config.json"):
        file = package / name
        digest.update(name.encode() + b"\0" + (file.read_bytes() if file.is_file() else b"") + b"\0")
    return digest.hexdigest()[:8]


def _fsync_tree(directory: Path) -> None:
    for file in directory.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(fd)


def ensure_tiny_checkpoint(seed: int = 0) -> tuple[Path, bool]:
    """The cached tiny checkpoint for this package version, code and seed; built once. Returns (dir, built now).

    Built in a temporary directory beside its final place and renamed into it, so the cache never holds a
    half-written checkpoint (a crash leaves only a `.tmp-*` directory, ignored and removed on the next build);
    two processes building at once both succeed and one copy wins.
    """
    from .tiny import save_tiny_checkpoint

    root = cache_root()
    final = root / f"tiny-{_package_version()}-seed{seed}-{_source_fingerprint()}"
    required = ("config.json", "model.safetensors", "tokenizer.json")
    if all((final / name).is_file() for name in required):
        return final, False
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create the cache directory {root} ({exc.strerror}); set NVLM_D_CACHE") from None
    if final.exists():  # incomplete (e.g. files removed by hand): rebuild it
        shutil.rmtree(final, ignore_errors=True)
    for stale in root.glob(f".tmp-{final.name}-*"):
        if time.time() - stale.stat().st_mtime > 3600:  # an old crash's leftovers, not a concurrent build
            shutil.rmtree(stale, ignore_errors=True)
    building = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        _quiet_transformers()  # no "Writing model shards" bar
        save_tiny_checkpoint(building, seed=seed)
        building.chmod(0o755)
        _fsync_tree(building)
        try:
            os.rename(building, final)
        except OSError:
            if not all((final / name).is_file() for name in required):
                raise
            shutil.rmtree(building, ignore_errors=True)  # another process finished first: use its copy
        _fsync_dir(root)
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
        return tuple(round(x + (y - x) * t) for x, y in zip(a, b))

    for y in range(horizon):
        draw.line([(0, y), (width, y)], fill=lerp((38, 84, 170), (250, 205, 160), y / horizon))
    for y in range(horizon, height):
        draw.line([(0, y), (width, y)], fill=lerp((92, 150, 70), (40, 90, 40), (y - horizon) / (height - horizon)))
    sx, sy, sr = int(width * 0.78), int(height * 0.2), int(height * 0.08)
    draw.ellipse([sx - sr, sy - sr, sx + sr, sy + sr], fill=(255, 214, 90), outline=(255, 170, 40), width=6)
    draw.polygon([(0, horizon), (width * 0.18, height * 0.28), (width * 0.4, horizon)], fill=(96, 96, 120))
    draw.polygon([(width * 0.25, horizon), (width * 0.48, height * 0.22), (width * 0.7, horizon)], fill=(80, 80, 104))
    draw.polygon([(width * 0.44, height * 0.3), (width * 0.48, height * 0.22), (width * 0.52, height * 0.3)],
                 fill=(240, 240, 250))
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
    draw.polygon([(width * 0.55, height), (width * 0.62, horizon), (width * 0.66, horizon), (width * 0.85, height)],
                 fill=(70, 70, 70))
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
        draw.rectangle([x0, y0, x0 + bar_w, cy + ch - 40], fill=((60, 110, 200), (220, 120, 40), (60, 160, 90),
                                                                 (170, 60, 160))[k])
        draw.text((x0 + bar_w // 2, cy + ch - 20), "Q" + str(k + 1), fill=(20, 20, 20), font=small, anchor="mm")
    draw.text((cx + cw // 2, cy + 24), "Sales 2024", fill=(20, 20, 20), font=small, anchor="mm")
    draw.text((width * 0.04, height * 0.06), "NVLM-D demo", fill=(255, 255, 255), font=big,
              stroke_width=3, stroke_fill=(20, 20, 60))
    draw.text((width * 0.04, height * 0.06 + big.size * 1.3), f"a {width}x{height} sample scene", fill=(255, 255, 255),
              font=small, stroke_width=2, stroke_fill=(20, 20, 60))
    return image


def ensure_sample_image() -> Path:
    """The demo's sample scene as a PNG in the cache (written once, atomically)."""
    root = cache_root()
    path = root / f"sample-{SAMPLE_IMAGE_SIZE[0]}x{SAMPLE_IMAGE_SIZE[1]}-v1.png"
    if path.is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".tmp-sample-", suffix=".png", dir=root)
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
    """(prompt tokens, image tokens) of the prompt `chat` builds for this question (conversation.build_prompt)."""
    from .conversation import build_prompt

    prompt = build_prompt(
        question, num_patches_list or [], None, template=model.template, system_message=model.system_message,
        num_image_token=model.num_image_token,
    )
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    image_tokens = sum(num_patches_list or []) * model.num_image_token
    return len(ids), image_tokens


def _run_demo(args: argparse.Namespace) -> int:
    tiny = args.model is None
    model_path = resolve_model_path(args.model) if not tiny else None
    if args.image is not None and not os.path.isfile(args.image):
        raise CLIError(f"image not found: {args.image}")
    placement = resolve_placement(args)
    out = sys.stdout

    def row(label: str, text: str) -> None:
        print(f"{label:<11} {text}", file=out, flush=True)

    if tiny:
        print(f"NVLM-D demo: a tiny NVLM-D with RANDOM weights (seed {args.seed}) on the real code path: "
              "tiling, prompt, vision tower, projector, decoder.\n", file=out)
        started = time.perf_counter()
        model_path, built = ensure_tiny_checkpoint(args.seed)
        note = f"built now in {time.perf_counter() - started:.1f} s, cached for next time" if built else "cached"
        row("checkpoint", f"{model_path} ({note})")
    else:
        print(f"NVLM-D demo on {model_path}\n", file=out)
        row("model", model_path)
    if args.image is None:
        image_path = ensure_sample_image()
        row("image", f"{image_path} ({SAMPLE_IMAGE_SIZE[0]}x{SAMPLE_IMAGE_SIZE[1]}, generated sample scene)")
    else:
        image_path = Path(args.image)

    started = time.perf_counter()
    model, tokenizer = load_model(str(model_path), placement, args.gpus)
    load_seconds = time.perf_counter() - started

    started = time.perf_counter()
    image = load_tiled_image(image_path, args.max_num)
    preprocess_seconds = time.perf_counter() - started
    if args.image is not None:
        row("image", f"{image_path} ({image.size[0]}x{image.size[1]})")
    row("tiling", f"--max-num {args.max_num} -> {image.describe()}")

    question = with_image_placeholders(args.question, 1)
    _check_placeholders(question, 1)
    pixel_values, num_patches_list = _stack([image])
    prompt_tokens, image_tokens = _prompt_tokens(model, tokenizer, question, num_patches_list)
    row("prompt", f"{prompt_tokens} tokens, {image_tokens} of them image tokens "
                  f"({image.num_tiles} tiles x {model.num_image_token})")
    row("question", args.question)

    counter = TokenCounter()
    generation_config = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    answer = model.chat(tokenizer, pixel_values, question, generation_config, num_patches_list=num_patches_list,
                        streamer=counter)
    generate_seconds = time.perf_counter() - counter.started
    row("answer", "\n            ".join(answer.splitlines()) if answer else "(empty)")
    first = (counter.first_token_at or counter.started) - counter.started
    decode_seconds = (counter.finished_at or time.perf_counter()) - (counter.first_token_at or counter.started)
    decode_rate = f", decode {(counter.count - 1) / decode_seconds:.1f} tokens/s" if counter.count > 1 else ""
    row("timings", f"load {load_seconds:.2f} s | preprocess {preprocess_seconds:.2f} s | generate "
                   f"{generate_seconds:.2f} s: {counter.count} tokens, {counter.count / generate_seconds:.1f} tokens/s "
                   f"(first token after {first:.2f} s{decode_rate}) on {placement.description}")
    if tiny:
        print(
            "\nThe weights are random, so the answer is gibberish: this shows that the pipeline runs, not what it "
            "says.\nWith the real weights (nvidia/NVLM-D-72B: 159 GB in bf16, split over N GPUs by --gpus N; "
            "a Hub id or a local copy):\n"
            f"  {REAL_MODEL_HINT}\n"
            "  nvlm-d chat --model /path/to/NVLM-D-72B --gpus 8 --image photo.jpg \"Describe the image.\"\n"
            "  nvlm-d demo --model /path/to/NVLM-D-72B --gpus 8",
            file=out,
        )
    return 0


# --------------------------------------------------------------------------------------------------------
# nvlm-d chat
# --------------------------------------------------------------------------------------------------------

_CHAT_HELP = (
    "type a question and press Enter. /image PATH adds an image to your next question, "
    "/reset starts a new conversation, /quit (or Ctrl-D) ends."
)


def _run_chat(args: argparse.Namespace) -> int:
    model_path = resolve_model_path(args.model)
    for path in args.image:
        if not os.path.exists(path):
            raise CLIError(f"image not found: {path}")
    one_shot = args.question is not None
    if one_shot:
        if not args.question.strip():
            raise CLIError("the question is empty")
        question = with_image_placeholders(args.question, len(args.image))
        _check_placeholders(question, len(args.image))
    placement = resolve_placement(args)
    images = [load_tiled_image(path, args.max_num) for path in args.image]  # bad images fail before the long load
    model, tokenizer = load_model(model_path, placement, args.gpus)
    generation_config = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    if not one_shot:
        return _interactive_chat(model, tokenizer, generation_config, images, args.max_num)

    pixel_values, num_patches_list = _stack(images)
    if sys.stdout.isatty():  # a person is watching: show the tokens as they come
        stream_chat(model, tokenizer, pixel_values, question, generation_config, None, num_patches_list)
    else:
        answer = model.chat(tokenizer, pixel_values, question, generation_config, num_patches_list=num_patches_list)
        print(answer, flush=True)
    return 0


def _read_line(prompt: str) -> str | None:
    """The next line from stdin (None at end of input); a prompt only when a person is typing."""
    if sys.stdin.isatty():
        try:
            return input(prompt)
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def _interactive_chat(model: Any, tokenizer: Any, generation_config: dict, initial_images: list[TiledImage],
                      max_num: int) -> int:
    """Questions from stdin, streamed answers on stdout, status lines on stderr.

    Every image of the conversation stays in it: each turn passes all of them (earlier questions keep their
    `<image>` markers in the history, and `chat` expands every marker), so a follow-up can refer to them.
    """
    history: list[tuple[str, str]] = []
    images: list[TiledImage] = []  # images already in the conversation
    pending: list[TiledImage] = list(initial_images)  # added for the next question
    _say(f"{PROG} chat: {_CHAT_HELP}")
    for image in pending:
        _say(f"image {len(images) + pending.index(image) + 1} added: {image.name}, {image.describe()}")
    while True:
        line = _read_line("you> ")
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            argument = argument.strip()
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                history, images, pending = [], [], []
                _say("conversation cleared")
            elif command == "/image":
                if not argument:
                    _say(f"{PROG}: error: /image needs a path")
                    continue
                try:
                    image = load_tiled_image(os.path.expanduser(argument), max_num)
                except CLIError as exc:
                    _say(f"{PROG}: error: {exc}")
                    continue
                pending.append(image)
                _say(f"image {len(images) + len(pending)} added: {image.name}, {image.describe()}; "
                     "it goes with your next question")
            elif command == "/help":
                _say(_CHAT_HELP)
            else:
                _say(f"{PROG}: error: unknown command {command} (/image PATH, /reset, /quit, /help)")
            continue

        question = with_image_placeholders(
            text, len(pending), first_index=len(images) + 1, label=bool(images) or len(pending) > 1
        )
        try:
            _check_placeholders(question, len(pending))
        except CLIError as exc:
            _say(f"{PROG}: error: {exc}")
            continue
        pixel_values, num_patches_list = _stack(images + pending)
        try:
            _, history = stream_chat(model, tokenizer, pixel_values, question, generation_config, history,
                                     num_patches_list)
        except (ValueError, TypeError) as exc:
            _say(f"{PROG}: error: {_one_line(exc)}")
            continue
        images, pending = images + pending, []
    return 0


# --------------------------------------------------------------------------------------------------------
# nvlm-d tiles
# --------------------------------------------------------------------------------------------------------


def count_image_tokens(num_tiles: int) -> int | None:
    """Exact prompt tokens of one image of `num_tiles` tiles (`conversation.image_prompt`), counted with the
    package's tokenizer files; None when they are not installed."""
    if not (PACKAGE_TOKENIZER_DIR / "tokenizer_config.json").is_file():
        return None
    _quiet_transformers()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(PACKAGE_TOKENIZER_DIR))
    return len(tokenizer(image_prompt(num_tiles), add_special_tokens=False).input_ids)


def render_tiles_png(tiles: Sequence[Any], grid: tuple[int, int], title: str):
    """The tiles as the model sees them: the grid (resized image) with 3 px `GRID_COLOR` lines on every tile
    boundary and a tag label in each tile, beside the thumbnail (when there is one), under a title line. The
    picture is widened (white on the right) only when the title is wider than the tiles.

    The grid's top-left pixel is at (PNG_MARGIN, PNG_HEADER); the thumbnail's at
    (PNG_MARGIN + cols*448 + PNG_GAP, PNG_HEADER).
    """
    from PIL import Image, ImageDraw, ImageFont

    cols, rows = grid
    size = TILE_SIZE
    thumbnail = tiles[-1] if len(tiles) > cols * rows else None
    title_font = ImageFont.load_default(size=20)
    label_font = ImageFont.load_default(size=16)
    title_width = int(title_font.getlength(title))
    width = 2 * PNG_MARGIN + max(cols * size + (PNG_GAP + size if thumbnail is not None else 0), title_width)
    height = PNG_HEADER + rows * size + PNG_MARGIN
    canvas = Image.new("RGB", (width, height), PNG_BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((PNG_MARGIN, PNG_HEADER // 2), title, fill=(0, 0, 0), font=title_font, anchor="lm")

    def label(x: int, y: int, text: str) -> None:
        box = draw.textbbox((x + 8, y + 8), text, font=label_font)
        draw.rectangle([box[0] - 4, box[1] - 3, box[2] + 4, box[3] + 3], fill=(0, 0, 0))
        draw.text((x + 8, y + 8), text, fill=(255, 255, 255), font=label_font)

    tags = tile_tags(len(tiles))
    for k in range(cols * rows):
        x, y = PNG_MARGIN + (k % cols) * size, PNG_HEADER + (k // cols) * size
        canvas.paste(tiles[k].convert("RGB"), (x, y))
        label(x, y, f"{k + 1}: {tags[k]}")
    if thumbnail is not None:
        x = PNG_MARGIN + cols * size + PNG_GAP
        canvas.paste(thumbnail.convert("RGB"), (x, PNG_HEADER))
        label(x, PNG_HEADER, f"{len(tiles)}: {tags[-1]} (whole image)")
        draw.rectangle([x - 2, PNG_HEADER - 2, x + size + 1, PNG_HEADER + size + 1], outline=THUMBNAIL_COLOR, width=2)
    for c in range(cols + 1):  # lines last, so nothing covers them
        x = PNG_MARGIN + c * size
        draw.rectangle([x - 1, PNG_HEADER - 1, x + 1, PNG_HEADER + rows * size + 1], fill=GRID_COLOR)
    for r in range(rows + 1):
        y = PNG_HEADER + r * size
        draw.rectangle([PNG_MARGIN - 1, y - 1, PNG_MARGIN + cols * size + 1, y + 1], fill=GRID_COLOR)
    return canvas


def _run_tiles(args: argparse.Namespace) -> int:
    from .image_processing_nvlm_d import dynamic_preprocess, select_grid

    image = _open_image_checked(args.image)
    if image.mode != "RGB":  # as load_image: to RGB first, then tiled (a "P" image would otherwise be resized nearest)
        image = image.convert("RGB")
    width, height = image.size
    cols, rows = select_grid(width, height, max_num=args.max_num)
    tiles = dynamic_preprocess(image, min_num=1, max_num=args.max_num, image_size=TILE_SIZE, use_thumbnail=True)
    n = len(tiles)

    print(f"image       {args.image}: {width}x{height} (aspect {width / height:.3f}), --max-num {args.max_num}")
    if n == 1:
        print("grid        1x1 (cols x rows), resized to 448x448")
        print("tiles       1 (a single tile is also the thumbnail: no separate thumbnail)")
    else:
        print(f"grid        {cols}x{rows} (cols x rows), resized to {cols * TILE_SIZE}x{rows * TILE_SIZE}")
        print(f"tiles       {n} = {cols * rows} grid tiles + 1 thumbnail (448x448 each)")
    exact = count_image_tokens(n)
    pads = n * TOKENS_PER_TILE
    if exact is None:
        print(f"tokens      {pads} image tokens ({n} x {TOKENS_PER_TILE}) + the <Image>/<tile_k> tags, not counted: "
              f"the tokenizer files are missing from {PACKAGE_TOKENIZER_DIR}")
        tokens_text = f"{pads}+ tokens"
    else:
        print(f"tokens      {exact} = {pads} image tokens ({n} x {TOKENS_PER_TILE}) + {exact - pads} tag/wrapper tokens")
        tokens_text = f"{exact} tokens"

    out = Path(args.out) if args.out else Path(Path(args.image).stem + ".tiles.png")
    grid_text = f"grid {cols}x{rows}" + (" + thumbnail" if n > 1 else "")
    title = f"{Path(args.image).name}  {width}x{height}  ->  {grid_text} = {n} tiles of 448x448, {tokens_text}"
    picture = render_tiles_png(tiles, (cols, rows), title)
    try:
        picture.save(out, format="PNG")
    except OSError as exc:
        raise CLIError(f"cannot write {out}: {exc.strerror or _one_line(exc)}") from None
    print(f"wrote       {out} ({picture.size[0]}x{picture.size[1]})")
    return 0


# --------------------------------------------------------------------------------------------------------
# nvlm-d batch
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BatchRequest:
    """One input line. `key` identifies it in the output: ("id", type, id) for the first line of an id,
    ("line", n) for a line without a usable id (bad JSON, no id, a duplicate id)."""

    line: int
    key: tuple
    id: Any = None
    question: str | None = None
    images: list[str] = dataclasses.field(default_factory=list)
    generation: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None


def _id_key(request_id: Any) -> tuple:
    return ("id", type(request_id).__name__, request_id)


def read_requests(path: Path) -> list[BatchRequest]:
    """Parse a requests file; bad lines become requests carrying an `error` (never an exception). Blank lines are
    skipped. Relative image paths resolve against the file's directory."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read --input {path}: {exc.strerror}") from None
    requests: list[BatchRequest] = []
    first_line_of: dict[tuple, int] = {}
    for number, data in enumerate(raw.split(b"\n"), start=1):
        if not data.strip():
            continue
        line_key = ("line", number)
        try:
            record = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            requests.append(BatchRequest(number, line_key, error=f"line {number} is not valid JSON: {exc}"))
            continue
        if not isinstance(record, dict):
            requests.append(BatchRequest(number, line_key, error=f"line {number} is not a JSON object"))
            continue
        if "id" not in record or record["id"] is None:
            requests.append(BatchRequest(number, line_key, error=f"line {number} has no id"))
            continue
        request_id = record["id"]
        if not (isinstance(request_id, str) or _is_int(request_id)):
            requests.append(BatchRequest(
                number, line_key, error=f"line {number}: id must be a string or an integer, got {request_id!r}"
            ))
            continue
        key = _id_key(request_id)
        if key in first_line_of:
            requests.append(BatchRequest(
                number, line_key,
                error=f"line {number}: duplicate id {request_id!r} (first on line {first_line_of[key]}); line skipped",
            ))
            continue
        first_line_of[key] = number
        requests.append(_parse_request(record, number, key, path.absolute().parent))
    return requests


def _parse_request(record: dict, number: int, key: tuple, base: Path) -> BatchRequest:
    request = BatchRequest(number, key, id=record["id"])
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        request.error = "missing question" if question is None else f"question must be a non-empty string, got {question!r}"
        return request
    image = record.get("image")
    paths = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        request.error = f"image must be a path or a list of paths, got {image!r}"
        return request
    request.images = [str(base / os.path.expanduser(p)) for p in paths]  # base / absolute == absolute
    for name, (valid, expected) in _REQUEST_GENERATION_KEYS.items():
        if name in record:
            if not valid(record[name]):
                request.error = f"{name} must be {expected}, got {record[name]!r}"
                return request
            request.generation[name] = record[name]
    question = with_image_placeholders(question, len(paths))
    if question.count(IMAGE_PLACEHOLDER) != len(paths):
        request.error = (f"the question has {question.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} marker(s) "
                         f"but {len(paths)} image(s) were given")
        return request
    request.question = question
    return request


class ResultLog:
    """The output JSONL: an append-only log of one record per request, safe against `kill -9` and power loss.

    * Every record is one line, written with a single `os.write` on an O_APPEND descriptor and `fsync`ed before
      the next request starts: a record on disk is complete, and records reach the disk in order.
    * So the only damage a crash can leave is a torn LAST line (a prefix of a record, without its newline, or
      NUL bytes a power loss left at the end of the file). Opening the log cuts the file back to the end of its
      last complete, parsable line (`ftruncate` + `fsync`) before anything is appended; the torn request is
      simply answered again. Any other unreadable line is not something this writer produces, so it is an
      error, never silently dropped.
    * A failed write (disk full, ...) is cut back to the previous end of the file before the error is raised.
    * An exclusive `flock` stops a second run from interleaving with this one; the kernel drops it when the
      process dies, so a killed run never leaves a stale lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._open()

    def _open(self) -> None:
        self.done: set[tuple] = set()
        self.answered = 0
        self.errors = 0
        self.repaired_bytes = 0
        existed = self.path.exists()
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise CLIError(f"cannot open --output {self.path}: {exc.strerror}") from None
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            os.close(self.fd)
            raise CLIError(f"another process is writing to --output {self.path}") from None
        if not existed:
            _fsync_dir(self.path.parent.resolve())  # the new file's name survives a power loss too
        self._load()

    def _read_all(self) -> bytes:
        chunks, offset = [], 0
        while True:
            chunk = os.pread(self.fd, 1 << 20, offset)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            offset += len(chunk)

    def _load(self) -> None:
        data = self._read_all()
        lines = data.split(b"\n")  # the last item is what follows the last newline: b"" or a torn record
        keep = len(data) - len(lines[-1])
        records = []
        for index, raw in enumerate(lines[:-1]):
            if not raw.strip():  # a blank line (an edit by hand): not a record
                continue
            record = self._parse(raw)
            if record is None:
                if index == len(lines) - 2 and not lines[-1].strip(b"\0") and not self._is_json(raw):
                    keep -= len(raw) + 1  # an unparsable last line (e.g. NULs from a power loss): cut it too
                    break
                raise CLIError(
                    f"--output {self.path} line {index + 1} is not an nvlm-d batch record; "
                    "fix or remove that line (or use another --output)"
                )
            records.append(record)
        if keep < len(data):
            os.ftruncate(self.fd, keep)
            os.fsync(self.fd)
            self.repaired_bytes = len(data) - keep
        self.size = keep
        for record in records:
            self._count(record)

    @staticmethod
    def _is_json(raw: bytes) -> bool:
        try:
            json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return False
        return True

    @staticmethod
    def _parse(raw: bytes) -> dict | None:
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(record, dict) or "id" not in record or not ("answer" in record or "error" in record):
            return None
        if record["id"] is None and not _is_int(record.get("line")):
            return None
        return record

    @staticmethod
    def key(record: dict) -> tuple:
        return _id_key(record["id"]) if record["id"] is not None else ("line", record["line"])

    def _count(self, record: dict) -> None:
        self.done.add(self.key(record))
        if "error" in record:
            self.errors += 1
        else:
            self.answered += 1

    def drop_errors(self) -> int:
        """Rewrite the log without its error records (atomically: temp file, fsync, rename); returns how many."""
        if not self.errors:
            return 0
        kept = [raw for raw in self._read_all().split(b"\n")[:-1] if raw.strip() and "error" not in self._parse(raw)]
        dropped = self.errors
        fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(b"".join(raw + b"\n" for raw in kept))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        _fsync_dir(self.path.parent.resolve())
        os.close(self.fd)  # the lock goes with the old file; take it on the new one
        self._open()
        return dropped

    def append(self, record: dict) -> None:
        """Write one record as one line and fsync it before returning."""
        try:
            text = json.dumps(record, ensure_ascii=False)
            data = (text + "\n").encode("utf-8")
        except UnicodeEncodeError:
            data = (json.dumps(record) + "\n").encode("ascii")
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
            os.fsync(self.fd)
        except BaseException:
            os.ftruncate(self.fd, self.size)  # never leave a partial line for the next append to glue onto
            raise
        self.size += len(data)
        self._count(record)

    def close(self) -> None:
        os.close(self.fd)


def _run_batch(args: argparse.Namespace) -> int:
    input_path, output_path = Path(args.input), Path(args.output)
    if not input_path.is_file():
        raise CLIError(f"--input {args.input}: no such file")
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise CLIError("--output must not be the --input file")
    if output_path.is_dir():
        raise CLIError(f"--output {args.output}: is a directory")
    model_path = resolve_model_path(args.model)
    requests = read_requests(input_path)
    placement = resolve_placement(args)

    log = ResultLog(output_path)
    try:
        if log.repaired_bytes:
            _say(f"{PROG} batch: cut a half-written last record ({log.repaired_bytes} bytes) from {output_path}")
        if args.retry_errors:
            dropped = log.drop_errors()
            if dropped:
                _say(f"{PROG} batch: retrying {dropped} request(s) that had failed")
        todo = [request for request in requests if request.key not in log.done]
        _say(f"{PROG} batch: {len(requests)} request(s) in {input_path}, {len(requests) - len(todo)} already in "
             f"{output_path}, {len(todo)} to do")
        if any(request.error is None for request in todo):
            started = time.perf_counter()
            model, tokenizer = load_model(model_path, placement, args.gpus)
            _say(f"{PROG} batch: loaded {model_path} in {time.perf_counter() - started:.1f} s "
                 f"({placement.description})")
            _answer_all(todo, log, model, tokenizer, args)
        else:
            for request in todo:
                log.append({"id": request.id, "line": request.line, "error": request.error})
        _say(f"{PROG} batch: {output_path} holds {log.answered} answer(s) and {log.errors} error record(s)")
        return 1 if log.errors else 0
    finally:
        log.close()


def _answer_all(todo: list[BatchRequest], log: ResultLog, model: Any, tokenizer: Any, args: argparse.Namespace) -> None:
    import torch
    from tqdm.auto import tqdm

    total_tokens, total_seconds = 0, 0.0
    with tqdm(total=len(todo), file=sys.stderr, unit="req", desc="batch", dynamic_ncols=True) as progress:
        for request in todo:
            started = time.perf_counter()
            if request.error is not None:
                record = {"id": request.id, "line": request.line, "error": request.error}
            else:
                counter = TokenCounter()
                try:
                    images = [load_tiled_image(path, args.max_num) for path in request.images]
                    pixel_values, num_patches_list = _stack(images)
                    generation = {"max_new_tokens": args.max_new_tokens, "do_sample": False, **request.generation}
                    if generation.get("do_sample"):  # the same answer for an id, whether or not the run resumed
                        torch.manual_seed(args.seed + zlib.crc32(json.dumps(request.id).encode()))
                    answer = model.chat(tokenizer, pixel_values, request.question, generation,
                                        num_patches_list=num_patches_list, streamer=counter)
                    seconds = time.perf_counter() - started
                    record = {"id": request.id, "answer": answer, "seconds": round(seconds, 3)}
                    total_tokens += counter.count
                    total_seconds += seconds
                except CLIError as exc:
                    record = {"id": request.id, "line": request.line, "error": str(exc)}
                except Exception as exc:  # one request's failure (e.g. out of memory) must not end the run
                    record = {"id": request.id, "line": request.line, "error": f"{type(exc).__name__}: {_one_line(exc)}"}
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
            log.append(record)
            progress.update(1)
            if total_seconds:
                progress.set_postfix_str(f"{total_tokens / total_seconds:.1f} tok/s, errors {log.errors}")




# --------------------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------------------


def _run_plan(args: argparse.Namespace) -> int:
    from .device_map import build_meta_model, format_plan, parse_memory, plan_device_map, smallest_gpu_count

    try:
        parse_memory(args.gpu_memory)
    except ValueError as exc:
        raise CLIError(f"--gpu-memory: {exc}") from None
    config = None
    if args.model:
        from transformers import AutoConfig

        path = resolve_model_path(args.model)
        _quiet_transformers()
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        except Exception as exc:
            raise CLIError(f"cannot read the config of {path}: {_one_line(exc)}") from None
        if getattr(config, "model_type", None) != "NVLM_D":
            raise CLIError(f"{path} is not an NVLM-D model (model_type {getattr(config, 'model_type', None)!r})")
    model = build_meta_model(config)
    settings = {"gpu_memory": args.gpu_memory, "dtype": args.dtype, "context": args.context,
                "batch": args.batch, "tiles": args.tiles, "model": model}
    plan = plan_device_map(args.gpus, **settings) if args.gpus else smallest_gpu_count(**settings)
    if plan is None:
        print(f"NVLM-D does not fit on any number of GPUs of {args.gpu_memory} up to 64 (one decoder layer, "
              "the vision tower or their reserves exceed one GPU)")
        return 1
    print(f"{len(plan.gpus)} GPU(s) of {args.gpu_memory}:")
    print(format_plan(plan))
    if not plan.fits:
        needed = smallest_gpu_count(**settings)
        advice = f"it needs {len(needed.gpus)} GPUs of {args.gpu_memory}" if needed else "no GPU count up to 64 fits"
        print(f"NVLM-D does not fit on {args.gpus} GPU(s) of {args.gpu_memory} ({args.dtype}): {advice}")
        return 1
    if args.save:
        Path(args.save).write_text(json.dumps(plan.device_map, indent=1) + "\n")
        print(f"device map written to {args.save}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
