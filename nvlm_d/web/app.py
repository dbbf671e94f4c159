"""The chat page: a `gr.Blocks` app over a backend (`InProcessBackend` or `OpenAIBackend`).

Each browser session (Gradio's `session_hash`) gets its own conversation from a `SessionStore`; the page shows it
as the store holds it, so two sessions never see each other's turns. Answers run through Gradio's queue with at
most `concurrency` at once (a waiting user sees their place in the queue); Stop, Clear and the tiling preview
skip the queue.

(No `from __future__ import annotations` here: Gradio finds the `gr.Request` parameter by its annotation, which
must be the class itself, and Gradio is imported inside `build_app` so that the backends work without it.)
"""

from collections.abc import Iterator
from typing import Any

from transformers.utils import logging

from .backends import MAX_TILES_RANGE, Conversation, Settings, UserFacingError
from .sessions import SessionStore
from .uploads import UploadError, tile_upload

logger = logging.get_logger(__name__)

DEFAULT_IDLE_TIMEOUT = 1800.0  # seconds
GENERATE = "nvlm_d-generate"  # the queue's concurrency group shared by ask and regenerate


def _messages(turns: list, pending: tuple[str, list[str], str] | None = None) -> list[dict]:
    """The Chatbot's messages for the recorded turns and the one being answered: (question, image paths, answer)."""
    shown = [(turn.question, [image.path for image in turn.images], turn.answer) for turn in turns]
    messages: list[dict] = []
    for question, paths, answer in [*shown, *([pending] if pending else [])]:
        messages.extend({"role": "user", "content": {"path": path}} for path in paths)
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    return messages


def _paths(value: Any) -> list[str]:
    files = (value or {}).get("files") or []
    return [item if isinstance(item, str) else item.get("path") for item in files]


def _settings(max_tiles: Any, max_new_tokens: Any, do_sample: Any, temperature: Any, top_p: Any, seed: Any) -> Settings:
    def integer(value: Any, name: str) -> int:
        if value is None or float(value) != int(float(value)):
            raise UserFacingError(f"{name} must be a whole number, got {value!r}")
        return int(float(value))

    return Settings(
        max_tiles=integer(max_tiles, "max tiles"),
        max_new_tokens=integer(max_new_tokens, "max new tokens"),
        do_sample=bool(do_sample),
        temperature=float(temperature),
        top_p=float(top_p),
        seed=None if seed in (None, "") else integer(seed, "seed"),
    )


def build_app(
    backend: Any,
    *,
    defaults: Settings | None = None,
    max_new_tokens_limit: int = 4096,
    concurrency: int = 1,
    max_queue: int = 64,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    title: str = "NVLM-D",
    note: str = "",
) -> Any:
    """The chat page for `backend`, as a queued `gr.Blocks` (call `.launch()` on it). Its `SessionStore` is
    `app.nvlm_sessions` (tests and operators count the conversations held).

    `concurrency`: answers generated at once (1 for a model in this process; an OpenAI server batches more).
    `max_queue`: requests waiting at most (then "queue full"). `idle_timeout`: seconds after which an unused
    conversation is dropped.
    """
    import gradio as gr

    defaults = defaults or Settings()
    if not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive int, got {concurrency!r}")
    store = SessionStore(backend.new_conversation, idle_timeout)

    def conversation_of(request: gr.Request) -> Conversation:
        return store.get(request.session_hash)

    def preview(value: Any, max_tiles: Any) -> str:
        lines = []
        for path in _paths(value):
            try:
                lines.append(
                    "- " + tile_upload(path, int(max_tiles), backend.tile_size, backend.tokens_per_tile).describe()
                )
            except UploadError as exc:
                lines.append(f"- {exc}")
        return "\n".join(lines)

    def stream(
        earlier: list, question: str, paths: list[str], answers: Iterator[str], conversation: Conversation
    ) -> Iterator[tuple[list, str, str]]:
        """(messages, status, stats) as the answer grows; the error's message when the backend refuses."""
        yield _messages(earlier, (question, paths, "")), "", ""
        try:
            for partial in answers:
                yield _messages(earlier, (question, paths, partial)), "", ""
        except UserFacingError as exc:
            yield _messages(conversation.turns), f"**Error:** {exc}", ""
            return
        except Exception as exc:  # a failure of the backend itself: said on the page, logged, and the page serves on
            logger.exception("nvlm-d web: the answer failed")
            yield _messages(conversation.turns), f"**Error:** the answer failed ({type(exc).__name__}: {exc})", ""
            return
        yield _messages(conversation.turns), "", conversation.stats.describe()

    def respond(
        value: Any,
        max_tiles: Any,
        max_new_tokens: Any,
        do_sample: Any,
        temperature: Any,
        top_p: Any,
        seed: Any,
        request: gr.Request,
    ) -> Iterator[tuple]:
        settings_values = (max_tiles, max_new_tokens, do_sample, temperature, top_p, seed)
        conversation = conversation_of(request)
        value = value or {}
        question, paths = value.get("text", ""), _paths(value)
        try:
            answers = conversation.ask(question, paths, _settings(*settings_values))
        except UserFacingError as exc:
            yield _messages(conversation.turns), value, f"**Error:** {exc}", gr.skip()
            return
        for messages, status, stats in stream(list(conversation.turns), question, paths, answers, conversation):
            yield messages, value if status else gr.MultimodalTextbox(value=None), status, stats  # kept on error
        store.touch(request.session_hash)  # idle from the end of the answer on

    def regenerate(
        max_tiles: Any,
        max_new_tokens: Any,
        do_sample: Any,
        temperature: Any,
        top_p: Any,
        seed: Any,
        request: gr.Request,
    ) -> Iterator[tuple]:
        settings_values = (max_tiles, max_new_tokens, do_sample, temperature, top_p, seed)
        conversation = conversation_of(request)
        try:
            answers = conversation.regenerate(_settings(*settings_values))
        except UserFacingError as exc:
            yield _messages(conversation.turns), f"**Error:** {exc}", gr.skip()
            return
        last = conversation.turns[-1]
        paths = [image.path for image in last.images]
        yield from stream(conversation.turns[:-1], last.question, paths, answers, conversation)
        store.touch(request.session_hash)

    def stop(request: gr.Request) -> None:
        conversation = store.find(request.session_hash)
        if conversation is not None:
            conversation.stop()

    def clear(request: gr.Request) -> tuple[list, str, str]:
        conversation = store.find(request.session_hash)
        if conversation is not None:
            conversation.clear()
        return [], "", ""

    def closed(request: gr.Request) -> None:
        store.drop(request.session_hash)

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"# {title}\n{note}".strip(), elem_id="title")
        chatbot = gr.Chatbot(elem_id="chat", height=420, label="Conversation", buttons=["copy"])
        box = gr.MultimodalTextbox(
            elem_id="question",
            file_count="multiple",
            placeholder="Ask a question; drop, paste or pick images",
            show_label=False,
            sources=["upload"],
        )
        tiling = gr.Markdown(elem_id="tiling")
        with gr.Row():
            stop_button = gr.Button("Stop", elem_id="stop", variant="stop")
            regenerate_button = gr.Button("Regenerate", elem_id="regenerate")
            clear_button = gr.Button("Clear", elem_id="clear")
        status = gr.Markdown(elem_id="status")
        stats = gr.Markdown(elem_id="stats")
        with gr.Accordion("Settings", open=False):
            low, high = MAX_TILES_RANGE
            max_tiles = gr.Slider(low, high, value=defaults.max_tiles, step=1, label="Max tiles per image")
            max_new_tokens = gr.Slider(
                1, max_new_tokens_limit, value=defaults.max_new_tokens, step=1, label="Max new tokens"
            )
            do_sample = gr.Checkbox(value=defaults.do_sample, label="Sample (off: greedy)")
            temperature = gr.Slider(0.05, 2.0, value=defaults.temperature, step=0.05, label="Temperature")
            top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p")
            seed = gr.Number(value=defaults.seed, precision=0, label="Seed (sampling; empty: random)")
        settings = [max_tiles, max_new_tokens, do_sample, temperature, top_p, seed]

        for trigger in (box.change, max_tiles.change):
            trigger(preview, [box, max_tiles], tiling, queue=False, show_progress="hidden", api_visibility="private")
        box.submit(
            respond,
            [box, *settings],
            [chatbot, box, status, stats],
            api_name="ask",
            concurrency_id=GENERATE,
            concurrency_limit=concurrency,
        )
        regenerate_button.click(
            regenerate,
            settings,
            [chatbot, status, stats],
            api_name="regenerate",
            concurrency_id=GENERATE,
            concurrency_limit=concurrency,
        )
        stop_button.click(stop, None, None, api_name="stop", queue=False)
        clear_button.click(clear, None, [chatbot, status, stats], api_name="clear", queue=False)
        app.unload(closed)
    app.queue(max_size=max_queue, default_concurrency_limit=concurrency)
    store.start_sweeper()
    app.nvlm_sessions = store
    return app
