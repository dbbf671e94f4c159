"""What the `nvlm-d` commands share: errors, options, model loading, streamed answers."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..loading import Placement
from ..loading import load_model as load_placed_model
from ..loading import resolve_placement as placement_for
from ..messages import one_line
from ..model_source import ModelSource, resolve_model

PROG = "nvlm-d"
DEFAULT_MAX_NUM = 6  # tiles per image at most (the model card's example uses 6; load_image's default is 12)
DEFAULT_MAX_NEW_TOKENS = 1024  # the model card's generation_config


class CLIError(Exception):
    """Bad input or an unusable environment: printed as one `nvlm-d: error: ...` line, exit code 2."""

    exit_code = 2


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
