"""`nvlm-d chat`: one question, or an interactive session with history, images and streaming."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from ..image_inputs import (
    ImageInputError,
    TiledImage,
    TileSpec,
    check_placeholders,
    open_image_file,
    stack_images,
    tile_image,
    with_image_placeholders,
)
from .common import (
    DEFAULT_MAX_NEW_TOKENS,
    PROG,
    CLIError,
    add_max_num,
    add_placement_options,
    load_model,
    model_option,
    one_line,
    resolve_placement,
    say,
    stream_answer,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
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
        "--image",
        action="append",
        default=[],
        metavar="FILE",
        help="an image for the (first) question; repeat for several images",
    )
    add_max_num(parser)
    add_placement_options(parser, DEFAULT_MAX_NEW_TOKENS)
    parser.set_defaults(handler=_run_chat)


# --------------------------------------------------------------------------------------------------------
# nvlm-d chat
# --------------------------------------------------------------------------------------------------------

_CHAT_HELP = (
    "type a question and press Enter. /image PATH adds an image to your next question, "
    "/reset starts a new conversation, /quit (or Ctrl-D) ends; Ctrl-C stops an answer."
)
_STOPPED = (
    "(answer stopped by Ctrl-C; the question and the answer as far as shown stay in the conversation, "
    "/reset starts a new one)"
)


class _StopWhenSet:
    """A stopping criterion (transformers' `StoppingCriteria` protocol) that ends generation once `event` is set:
    Ctrl-C sets it from the main thread while `generate` runs in another, which then ends cleanly after its step,
    its streamer closed and the session's cache consistent."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@contextlib.contextmanager
def _ctrl_c_sets(event: threading.Event) -> Iterator[None]:
    """While the block runs, Ctrl-C (SIGINT) sets `event` instead of raising KeyboardInterrupt: raised in the main
    thread, that would leave the generating thread running while the interpreter shuts down (the process then aborts,
    exit 134). A second Ctrl-C, while the answer is still stopping, exits at once."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        if event.is_set():
            say(f"{PROG}: interrupted")
            os._exit(130)  # no interpreter shutdown under a running generation thread
        event.set()

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stoppable(generation_config: dict, stop: threading.Event) -> dict:
    """`generation_config` with a stopping criterion that `stop` triggers (chat and sessions pass it to generate)."""
    from transformers import StoppingCriteriaList

    return {**generation_config, "stopping_criteria": StoppingCriteriaList([_StopWhenSet(stop)])}


def _run_chat(args: argparse.Namespace) -> int:
    source = model_option(args.model)
    one_shot = args.question is not None
    if one_shot:
        if not args.question.strip():
            raise CLIError("the question is empty")
        question = with_image_placeholders(args.question, len(args.image))
        check_placeholders(question, len(args.image))
    opened = [open_image_file(path) for path in args.image]  # a bad image fails at once, not after the long load
    placement = resolve_placement(args)
    model, tokenizer = load_model(source, placement, args.gpus)
    spec = TileSpec.of(model.config)
    images = [tile_image(image, args.max_num, spec) for image in opened]
    generation_config = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    if not one_shot:
        return _interactive_chat(model, tokenizer, generation_config, images, args.max_num)

    pixel_values, num_patches_list = stack_images(images)
    if sys.stdout.isatty():  # a person is watching: show the tokens as they come
        stop = threading.Event()
        settings = _stoppable(generation_config, stop)

        def answer(streamer: Any) -> str:
            return model.chat(
                tokenizer, pixel_values, question, settings, num_patches_list=num_patches_list, streamer=streamer
            )

        with _ctrl_c_sets(stop):
            stream_answer(tokenizer, answer)
        if stop.is_set():
            say(f"{PROG}: interrupted")
            return 130
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


def _interactive_chat(
    model: Any, tokenizer: Any, generation_config: dict, initial_images: list[TiledImage], max_num: int
) -> int:
    """Questions from stdin, streamed answers on stdout, status lines on stderr.

    The conversation is a `model.start_chat` session: every turn prefills only its own tokens, on top of the KV
    cache of the turns before it, and each image goes through the vision tower once, in the turn it comes with.
    The answers are those of `chat(history=...)` with all the conversation's images (earlier questions keep their
    `<image>` markers, so a follow-up can refer to them).

    Ctrl-C while an answer streams stops it after the current token; the turn stays in the conversation as it was
    shown (the question and the answer so far, which is what the next turn's prompt and the KV cache hold), and the
    session goes on.
    """
    stop = threading.Event()
    session = model.start_chat(tokenizer, _stoppable(generation_config, stop))
    in_conversation = 0  # images already in the conversation
    pending: list[TiledImage] = list(initial_images)  # added for the next question
    say(f"{PROG} chat: {_CHAT_HELP}")
    for number, image in enumerate(pending, start=1):
        say(f"image {number} added: {image.name}, {image.describe()}")
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
                session.reset()
                in_conversation, pending = 0, []
                say("conversation cleared")
            elif command == "/image":
                if not argument:
                    say(f"{PROG}: error: /image needs a path")
                    continue
                try:
                    image = tile_image(
                        open_image_file(os.path.expanduser(argument)), max_num, TileSpec.of(model.config)
                    )
                except ImageInputError as exc:
                    say(f"{PROG}: error: {exc}")
                    continue
                pending.append(image)
                say(
                    f"image {in_conversation + len(pending)} added: {image.name}, {image.describe()}; "
                    "it goes with your next question"
                )
            elif command == "/help":
                say(_CHAT_HELP)
            else:
                say(f"{PROG}: error: unknown command {command} (/image PATH, /reset, /quit, /help)")
            continue

        question = with_image_placeholders(
            text, len(pending), first_index=in_conversation + 1, label=bool(in_conversation) or len(pending) > 1
        )
        try:
            check_placeholders(question, len(pending))
        except ImageInputError as exc:
            say(f"{PROG}: error: {exc}")
            continue
        pixel_values, num_patches_list = stack_images(pending)
        stop.clear()
        try:
            with _ctrl_c_sets(stop):
                stream_answer(
                    tokenizer,
                    lambda streamer: session.ask(question, pixel_values, num_patches_list, streamer=streamer),
                )
        except ValueError as exc:  # the conversation outgrew the session's token limit
            say(f"{PROG}: error: {one_line(exc)} (type /reset to start a new conversation)")
            continue
        except Exception as exc:  # e.g. out of memory on a long answer: the session goes on, as it was
            say(f"{PROG}: error: {type(exc).__name__}: {one_line(exc)}")
            continue
        in_conversation, pending = in_conversation + len(pending), []
        if stop.is_set():
            say(_STOPPED)
    return 0
