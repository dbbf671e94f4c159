"""What the `nvlm-d` commands share: errors, options, image and model loading, streamed answers."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..conversation import IMAGE_PLACEHOLDER
from ..loading import Placement
from ..loading import load_model as load_placed_model
from ..loading import resolve_placement as placement_for
from ..model_source import ModelSource, one_line, resolve_model

PROG = "nvlm-d"
DEFAULT_MAX_NUM = 6  # tiles per image at most (the model card's example uses 6; load_image's default is 12)
DEFAULT_MAX_NEW_TOKENS = 1024  # the model card's generation_config


class CLIError(Exception):
    """Bad input or an unusable environment: printed as one `nvlm-d: error: ...` line, exit code 2."""

    exit_code = 2


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def say(*parts: object) -> None:
    """A status line on stderr (stdout carries the answers)."""
    print(*parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (no usage block), as every other CLI error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{PROG}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def add_placement_options(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--gpus",
        type=positive_int,
        metavar="N",
        help="spread the model over GPUs 0..N-1 with the model card's layer split (nvlm_d.device_map.split_model)",
    )
    where.add_argument(
        "--device",
        metavar="DEVICE",
        help="put the whole model on one device: cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        help="weights' dtype (default: bf16 on a GPU, fp32 on the CPU)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=max_new_tokens,
        metavar="N",
        help=f"generate at most N tokens per answer (default: {max_new_tokens})",
    )


def add_max_num(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-num",
        type=positive_int,
        default=DEFAULT_MAX_NUM,
        metavar="N",
        help=f"at most N tiles per image, thumbnail not counted (default: {DEFAULT_MAX_NUM})",
    )


def fsync_dir(directory: Path) -> None:
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


# --------------------------------------------------------------------------------------------------------
# Images: tiling decision and pixel values
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TileSpec:
    """How a model cuts images: the tile side in pixels and the image tokens each tile becomes."""

    size: int
    tokens: int

    @classmethod
    def of(cls, config: Any) -> TileSpec:
        """From an NVLM-D config (`force_image_size`, `num_image_token`)."""
        return cls(int(config.force_image_size), int(config.num_image_token))

    @classmethod
    def default(cls) -> TileSpec:
        """NVLM-D-72B's (its config's defaults): for commands that load no model."""
        from ..image_tiling import TILE_SIZE, TOKENS_PER_TILE

        return cls(TILE_SIZE, TOKENS_PER_TILE)


@dataclasses.dataclass
class TiledImage:
    """An image as the model gets it: its tiles' pixel values and how they were cut."""

    name: str
    size: tuple[int, int]  # original width, height
    grid: tuple[int, int]  # cols, rows
    pixel_values: Any  # float32 tensor [num_tiles, 3, tile size, tile size]
    spec: TileSpec

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])

    def describe(self) -> str:
        cols, rows = self.grid
        tokens = self.num_tiles * self.spec.tokens
        if cols * rows == 1:
            return f"grid 1x1 = 1 tile (a single tile doubles as the thumbnail; {tokens} image tokens)"
        side = self.spec.size
        return (
            f"grid {cols}x{rows} (cols x rows, resized to {cols * side}x{rows * side}) + thumbnail "
            f"= {self.num_tiles} tiles ({tokens} image tokens)"
        )


@dataclasses.dataclass
class OpenedImage:
    """An image file, decoded and converted to RGB (as `load_image` converts it), with the path it came from."""

    name: str
    image: Any  # PIL.Image.Image, mode RGB


def open_image(path: str | os.PathLike) -> OpenedImage:
    """Decode an image file with the library's `open_image` (as `load_image` decodes it), or raise CLIError with
    one line saying why not. Every command opens images here, so the same bad file gives the same message
    everywhere. Decoding needs no model: commands call this before loading one, so that a bad image fails at once."""
    from ..image_tiling import ImageTooLargeError, InvalidImageError
    from ..image_tiling import open_image as decode

    name = os.fspath(path)
    try:
        return OpenedImage(name, decode(name))
    except FileNotFoundError:
        raise CLIError(f"image not found: {name}") from None
    except IsADirectoryError:
        raise CLIError(f"image is a directory, not a file: {name}") from None
    except ImageTooLargeError as exc:
        raise CLIError(f"image too large: {name}: {_about_the_image(exc, name)}") from None
    except InvalidImageError as exc:
        raise CLIError(f"cannot read image {name}: {_about_the_image(exc, name)}") from None
    except OSError as exc:  # the file system's error (permission denied, ...), not the data's
        raise CLIError(f"cannot read image {name}: {exc.strerror or one_line(exc)}") from None
    except ValueError as exc:  # no pixels, or a mode that does not convert to RGB
        raise CLIError(f"cannot read image {name}: {_about_the_image(exc, name)}") from None


def _about_the_image(exc: Exception, name: str) -> str:
    """The library's message without the image's name in front (the CLI's message names the path itself)."""
    return one_line(exc).removeprefix(f"{name!r}: ")


def tile_image(opened: OpenedImage, max_num: int, spec: TileSpec) -> TiledImage:
    """The pixel values `load_image` gives for this image (`load_image(path, spec.size, max_num)`), and its grid."""
    from ..image_processing_nvlm_d import load_image, select_grid

    width, height = opened.image.size
    pixel_values = load_image(opened.image, input_size=spec.size, max_num=max_num)
    grid = select_grid(width, height, max_num=max_num, image_size=spec.size)
    return TiledImage(opened.name, (width, height), grid, pixel_values, spec)


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


def check_placeholders(question: str, num_images: int) -> None:
    found = question.count(IMAGE_PLACEHOLDER)
    if found != num_images:
        raise CLIError(
            f"the question has {found} {IMAGE_PLACEHOLDER} marker(s) but {num_images} image(s) were given: "
            f"use one marker per image, or none to have them put in front"
        )


def stack_images(images: Sequence[TiledImage]) -> tuple[Any, list[int] | None]:
    """pixel_values and num_patches_list for `chat` (None, None without images)."""
    if not images:
        return None, None
    import torch

    return torch.cat([image.pixel_values for image in images]), [image.num_tiles for image in images]


# --------------------------------------------------------------------------------------------------------
# Models: paths, placement, loading, generation helpers
# --------------------------------------------------------------------------------------------------------


def model_option(name: str, contact_hub: bool = True) -> ModelSource:
    """`--model`: `nvlm_d.model_source.resolve_model`, its errors as one `--model ...` line, its note on stderr."""
    try:
        source = resolve_model(name, contact_hub)
    except ValueError as exc:
        raise CLIError(f"--model {exc}") from None
    if source.note:
        say(f"{PROG}: {source.note}")
    return source


def resolve_placement(args: argparse.Namespace) -> Placement:
    """--gpus / --device / --dtype: `nvlm_d.loading.resolve_placement`, its errors as one line."""
    try:
        return placement_for(args.gpus, args.device, args.dtype)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(source: ModelSource, placement: Placement, gpus: int | None = None) -> tuple[Any, Any]:
    """`nvlm_d.loading.load_model`, quietly: the model and its tokenizer.

    Raises CLIError when either cannot be loaded, or the model is not NVLM-D (the commands need its `chat`)."""
    quiet_transformers()
    try:
        model, tokenizer = load_placed_model(source, placement, gpus)
    except Exception as exc:
        raise CLIError(f"cannot load the model from {source.path}: {one_line(exc)}") from None
    if not callable(getattr(model, "chat", None)):
        raise CLIError(f"{source.path} is not an NVLM-D model ({type(model).__name__} has no chat method)")
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


def stream_answer(tokenizer: Any, answer: Callable[[Any], str], out=None) -> str:
    """Print an answer to `out` token by token as it is generated, and return it.

    `answer(streamer)` generates with the streamer (`model.chat(..., streamer=streamer)`,
    `session.ask(..., streamer=streamer)`) and returns the answer; it runs in a thread while this one prints the
    TextIteratorStreamer's text. An exception in that thread is re-raised here.
    """
    from transformers import TextIteratorStreamer

    out = out or sys.stdout
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict[str, Any] = {}

    def generate() -> None:
        try:
            result["value"] = answer(streamer)
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
        held = text[len(body) :]
        out.write(body)
        out.flush()
    thread.join()
    if started or "error" not in result:  # a failure before the first token printed nothing: no empty line
        out.write("\n")
        out.flush()
    if "error" in result:
        raise result["error"]
    return result["value"]
