"""What answers the chat page: the model in this process, or an OpenAI-compatible server (`nvlm-d serve`, vLLM).

Both hand out one `Conversation` per browser session. `Conversation.ask` is a generator of the answer so far, token
by token, whose last value is the whole answer; `stats` then holds the turn's numbers. Bad input raises
`UserFacingError` (a ValueError) with a message for the page; the server keeps serving.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import mimetypes
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ..conversation import IMAGE_PLACEHOLDER, get_conv_template
from ..image_inputs import with_image_placeholders
from .uploads import TiledUpload, UploadError, tile_uploads

MAX_TILES_RANGE = (1, 12)


class UserFacingError(ValueError):
    """Bad input or an unusable backend, with a message meant for the page."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """The page's generation settings. Greedy unless `do_sample`; `seed` makes sampling reproducible."""

    max_tiles: int = 6
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = None

    def __post_init__(self) -> None:
        low, high = MAX_TILES_RANGE
        if isinstance(self.max_tiles, bool) or not isinstance(self.max_tiles, int) or not low <= self.max_tiles <= high:
            raise UserFacingError(f"max tiles must be an integer from {low} to {high}, got {self.max_tiles!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UserFacingError(f"max new tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.do_sample and not self.temperature > 0:
            raise UserFacingError(f"temperature must be > 0 when sampling, got {self.temperature!r}")
        if self.do_sample and not 0 < self.top_p <= 1:
            raise UserFacingError(f"top-p must be in (0, 1] when sampling, got {self.top_p!r}")

    def generation_config(self) -> dict:
        """`chat`'s generation_config for these settings."""
        if not self.do_sample:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }


@dataclasses.dataclass
class TurnStats:
    """The numbers shown under the chat for the last answer."""

    prompt_tokens: int | None = None
    image_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: float | None = None

    def describe(self) -> str:
        parts = []
        if self.prompt_tokens is not None:
            parts.append(f"prompt {self.prompt_tokens} tokens ({self.image_tokens} image tokens)")
        else:
            parts.append(f"{self.image_tokens} image tokens")
        rate = self.new_tokens / self.seconds if self.seconds > 0 else 0.0
        parts.append(f"answer {self.new_tokens} tokens in {self.seconds:.2f} s ({rate:.1f} tokens/s)")
        if self.first_token_seconds is not None:
            parts.append(f"first token after {self.first_token_seconds:.2f} s")
        return " | ".join(parts)


@dataclasses.dataclass
class Turn:
    """A question as the user typed it, the images it added, the text the model got (with the images'
    placeholders) and the answer; `complete` once the backend has answered (maybe stopped early)."""

    question: str
    images: list[TiledUpload]
    text: str = ""
    answer: str = ""
    complete: bool = False


def _check_question(question: Any, images: Sequence[str]) -> str:
    if not isinstance(question, str) or not question.strip():
        raise UserFacingError("Type a question" + (" about the image." if images else "."))
    return question


def _check_placeholders(text: str, num_new: int) -> None:
    found = text.count(IMAGE_PLACEHOLDER)
    if found != num_new:
        raise UserFacingError(
            f"The question has {found} {IMAGE_PLACEHOLDER} marker(s) but {num_new} image(s) were added: use one marker "
            "per new image, or none to have them put in front."
        )


class Conversation:
    """One browser session's conversation. Subclasses implement `_answer`; one turn runs at a time."""

    def __init__(self, tile_size: int, tokens_per_tile: int) -> None:
        self.tile_size = tile_size
        self.tokens_per_tile = tokens_per_tile
        self.turns: list[Turn] = []
        self.stats = TurnStats()
        self.last_used = 0.0  # set by the SessionStore's clock on every use
        self._stop = threading.Event()
        self._busy = threading.Lock()

    @property
    def busy(self) -> bool:
        """Whether an answer is being generated."""
        return self._busy.locked()

    @property
    def num_images(self) -> int:
        return sum(len(turn.images) for turn in self.turns)

    def ask(self, question: str, image_paths: Sequence[str], settings: Settings) -> Iterator[str]:
        """Answer `question` about the images added now (file paths). Checks the question and the images at once
        (UserFacingError), then returns a generator of the answer so far, whose last value is the answer."""
        question = _check_question(question, image_paths)
        images = self._tile(image_paths, settings)
        # One image alone gets `<image>\n` as `chat` adds it; once the conversation holds several, numbered lines.
        text = with_image_placeholders(question, len(images), self.num_images + 1, label=self.num_images > 0)
        _check_placeholders(text, len(images))
        return self._run(Turn(question, images, text), settings, regenerate=False)

    def regenerate(self, settings: Settings) -> Iterator[str]:
        """Answer the last question again, with these settings (its images tiled again with `max_tiles`); as `ask`."""
        if not self.turns:
            raise UserFacingError("There is no answer to regenerate yet.")
        last = self.turns[-1]
        images = self._tile([image.path for image in last.images], settings)
        return self._run(Turn(last.question, images, last.text), settings, regenerate=True)

    def _tile(self, image_paths: Sequence[str], settings: Settings) -> list[TiledUpload]:
        try:
            return tile_uploads(image_paths, settings.max_tiles, self.tile_size, self.tokens_per_tile)
        except UploadError as exc:
            raise UserFacingError(str(exc)) from None

    def _run(self, turn: Turn, settings: Settings, regenerate: bool) -> Iterator[str]:
        if not self._busy.acquire(blocking=False):
            raise UserFacingError("An answer is still being generated: wait for it or press Stop.")
        try:
            self._stop.clear()
            earlier = self.turns[:-1] if regenerate else self.turns
            yield from self._answer(turn, settings, earlier)
        finally:  # also when the page went away mid-answer: what the backend answered is recorded
            if turn.complete:
                self.turns = [*earlier, turn]
                self.stats.image_tokens = sum(image.image_tokens for t in self.turns for image in t.images)
            elif regenerate:  # the backend forgot the turn it was to answer again
                self.turns = earlier
            self._busy.release()

    def _answer(self, turn: Turn, settings: Settings, earlier: list[Turn]) -> Iterator[str]:
        """Generate `turn`'s answer after the `earlier` turns: yield it as it grows, set `turn.answer`,
        `turn.complete` and `self.stats` (before the last yield, which is the answer)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the answer being generated; it ends where it is."""
        self._stop.set()

    def clear(self) -> None:
        """Start over: forget every turn."""
        self.stop()
        with self._busy:
            self.turns = []
            self.stats = TurnStats()
            self._forget()

    def _forget(self) -> None:
        """Drop what the backend keeps about the conversation."""

    def close(self) -> None:
        """The session ended: stop and free what the conversation holds."""
        self.stop()
        with self._busy:
            self.turns = []
            self._forget()


# --------------------------------------------------------------------------------------------------------
# In this process: a ChatSession per conversation
# --------------------------------------------------------------------------------------------------------


class _StopOnEvent:
    """A stopping criterion that ends generation once the event is set (the Stop button)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class InProcessBackend:
    """Answers with a model loaded in this process; each conversation is a `model.start_chat` session, so a
    follow-up prefills only its new tokens and answers as `model.chat(history=...)` does.

    `max_tokens` bounds a conversation's prompt plus answer (default: the decoder's context). The page runs a
    bounded number of answers at once (the queue's concurrency); seeded sampling is reproducible when that is 1.
    """

    kind = "in-process"

    def __init__(self, model: Any, tokenizer: Any, max_tokens: int | None = None, name: str = "NVLM-D") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.name = name
        self.tile_size = int(model.config.force_image_size)
        self.tokens_per_tile = int(model.num_image_token)

    def new_conversation(self) -> InProcessConversation:
        return InProcessConversation(self)


class _CountingStreamer:
    """A TextIteratorStreamer that also counts the prompt's and the answer's tokens and times the first token."""

    def __init__(self, tokenizer: Any) -> None:
        from transformers import TextIteratorStreamer

        self.text = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.prompt_tokens: int | None = None
        self.new_tokens = 0
        self.first_token_at: float | None = None

    def put(self, value: Any) -> None:
        if self.prompt_tokens is None:
            self.prompt_tokens = int(value.numel())
        else:
            self.new_tokens += int(value.numel())
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
        self.text.put(value)

    def end(self) -> None:
        self.text.end()


class InProcessConversation(Conversation):
    def __init__(self, backend: InProcessBackend) -> None:
        super().__init__(backend.tile_size, backend.tokens_per_tile)
        from transformers import StoppingCriteriaList

        self.backend = backend
        self.session = backend.model.start_chat(
            backend.tokenizer,
            {"max_new_tokens": 1, "stopping_criteria": StoppingCriteriaList([_StopOnEvent(self._stop)])},
            backend.max_tokens,
        )

    def _forget(self) -> None:
        self.session.reset()

    def _apply(self, settings: Settings) -> None:
        config = copy.deepcopy(self.session.config)
        config.update(**settings.generation_config())
        if not settings.do_sample:
            config.temperature, config.top_p = None, None
        self.session.config = config

    def _answer(self, turn: Turn, settings: Settings, earlier: list[Turn]) -> Iterator[str]:
        import torch

        pixel_values = torch.cat([image.pixel_values for image in turn.images]) if turn.images else None
        counts = [image.num_tiles for image in turn.images] or None
        self._apply(settings)
        if len(earlier) < len(self.session.history):  # regenerate: the session forgets the last turn first
            self.session.pop_turn()
        streamer = _CountingStreamer(self.backend.tokenizer)
        result: dict[str, Any] = {}

        def generate() -> None:
            try:
                if settings.do_sample and settings.seed is not None:
                    torch.manual_seed(settings.seed)
                result["answer"] = self.session.ask(turn.text, pixel_values, counts, streamer=streamer)
            except BaseException as exc:  # handed to the page; end the stream so the reader does not wait forever
                result["error"] = exc
                streamer.end()

        started = time.perf_counter()
        thread = threading.Thread(target=generate, name="nvlm_d-web-generate", daemon=True)
        thread.start()
        partial = ""
        try:
            for piece in streamer.text:
                partial += piece
                yield partial.strip()
        finally:  # also when the page went away (a closed tab): end the generation and wait for it
            self._stop.set()
            thread.join()
            if "answer" in result:
                turn.answer, turn.complete = result["answer"], True
                self.stats = TurnStats(
                    prompt_tokens=streamer.prompt_tokens,
                    new_tokens=streamer.new_tokens,
                    seconds=time.perf_counter() - started,
                    first_token_seconds=None if streamer.first_token_at is None else streamer.first_token_at - started,
                )
        error = result.get("error")
        if isinstance(error, ValueError) and "max_tokens" in str(error):
            raise UserFacingError(
                f"This conversation is past the model's context ({error}). Press Clear to start over."
            )
        if isinstance(error, (ValueError, TypeError)):
            raise UserFacingError(str(error))
        if error is not None:
            raise error
        yield turn.answer


# --------------------------------------------------------------------------------------------------------
# In front of an OpenAI-compatible server (nvlm-d serve, i.e. vLLM)
# --------------------------------------------------------------------------------------------------------


class OpenAIBackend:
    """Answers through an OpenAI-compatible chat completions server: `base_url` as OpenAI clients take it
    (`http://host:8000/v1`). Every request carries NVLM's system message and the conversation's images as
    `image_url` data URLs in the turns that added them. The server tiles the images itself, with the limit it was
    started with (`server_max_tiles`: `nvlm-d serve --max-num`, 6 by default); a page setting that differs goes as
    vLLM's per-request `mm_processor_kwargs.max_dynamic_patch`, which vLLM accepts only from a server started with
    `--trust-request-mm-kwargs` (it refuses every request that carries it otherwise). The page's preview and
    image-token count are the package's tiling, which vLLM's NVLM-D processor follows.

    `timeout` bounds connecting and each wait for the next piece of the stream, so a server that is down or stuck
    gives a message instead of a hang.
    """

    kind = "openai"

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 60.0,
        template: str = "chatml",
        tile_size: int = 448,
        tokens_per_tile: int = 256,
        server_max_tiles: int = 6,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"the server URL must start with http:// or https://, got {base_url!r}")
        self.server_max_tiles = server_max_tiles
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self.timeout = timeout
        self.system_message = get_conv_template(template).system_message
        self.tile_size = tile_size
        self.tokens_per_tile = tokens_per_tile
        self.name = f"{model or 'the model'} at {self.base_url}"
        self._model_lock = threading.Lock()

    def new_conversation(self) -> OpenAIConversation:
        return OpenAIConversation(self)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self) -> Any:
        import httpx

        return httpx.Client(timeout=httpx.Timeout(self.timeout), headers=self.headers())

    def model_name(self, client: Any) -> str:
        """`model`, or the first model the server lists (asked once)."""
        with self._model_lock:
            if self.model is None:
                response = client.get(f"{self.base_url}/models")
                _raise_for_status(response, self.base_url)
                models = response.json().get("data") or []
                if not models:
                    raise UserFacingError(f"The server at {self.base_url} lists no model.")
                self.model = str(models[0]["id"])
            return self.model

    def request_body(self, model: str, turns: Sequence[Turn], settings: Settings) -> dict:
        """The chat completions request for the last of `turns` (the others are its history)."""
        messages: list[dict] = [{"role": "system", "content": self.system_message}]
        for turn in turns:
            content: list[dict] = [
                {"type": "image_url", "image_url": {"url": _data_url(image.path)}} for image in turn.images
            ]
            content.append({"type": "text", "text": _strip_placeholders(turn.text, len(turn.images))})
            messages.append({"role": "user", "content": content})
            if turn is not turns[-1]:
                messages.append({"role": "assistant", "content": turn.answer})
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": settings.max_new_tokens,
        }
        if settings.max_tiles != self.server_max_tiles:
            body["mm_processor_kwargs"] = {"max_dynamic_patch": settings.max_tiles}
        if settings.do_sample:
            body.update(temperature=settings.temperature, top_p=settings.top_p)
            if settings.seed is not None:
                body["seed"] = settings.seed
        else:
            body["temperature"] = 0.0
        return body


def _strip_placeholders(text: str, num_images: int) -> str:
    """The user's text without the `<image>` lines the page put in front: the server places each image itself,
    before the text, from the message's image parts."""
    if num_images == 0:
        return text
    lines = text.split("\n")
    while lines and lines[0].endswith(IMAGE_PLACEHOLDER) and len(lines) > 1:
        lines.pop(0)
    return "\n".join(lines)


def _data_url(path: str) -> str:
    """The file as a `data:` URL, its bytes unchanged (the server decodes them as the package would)."""
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    if not mime.startswith("image/"):
        from PIL import Image

        with Image.open(path) as image:
            mime = Image.MIME.get(image.format or "", "image/png")
    with open(path, "rb") as handle:
        return f"data:{mime};base64,{base64.b64encode(handle.read()).decode('ascii')}"


def _raise_for_status(response: Any, base_url: str) -> None:
    if response.status_code < 400:
        return
    try:
        detail = response.json()
        detail = detail.get("error", detail).get("message", detail) if isinstance(detail, dict) else detail
    except ValueError:
        detail = response.text
    text = " ".join(str(detail).split())[:400]
    if "mm_processor_kwargs" in text:
        text += (
            " (the page asks for a tile limit other than the server's: set max tiles to the server's --max-num, or "
            "start the server with --trust-request-mm-kwargs)"
        )
    raise UserFacingError(f"The server at {base_url} answered HTTP {response.status_code}: {text}")


class OpenAIConversation(Conversation):
    def __init__(self, backend: OpenAIBackend) -> None:
        super().__init__(backend.tile_size, backend.tokens_per_tile)
        self.backend = backend

    def _answer(self, turn: Turn, settings: Settings, earlier: list[Turn]) -> Iterator[str]:
        import httpx

        backend = self.backend
        started = time.perf_counter()
        answer, usage, first = "", {}, None
        try:
            with backend.client() as client:
                body = backend.request_body(backend.model_name(client), [*earlier, turn], settings)
                with client.stream("POST", f"{backend.base_url}/chat/completions", json=body) as response:
                    if response.status_code >= 400:
                        response.read()
                        _raise_for_status(response, backend.base_url)
                    for line in response.iter_lines():
                        if self._stop.is_set():
                            break
                        if not line.startswith("data:"):
                            continue
                        data = line[len("data:") :].strip()
                        if data == "[DONE]":
                            break
                        chunk = json.loads(data)
                        usage = chunk.get("usage") or usage
                        for choice in chunk.get("choices") or []:
                            piece = (choice.get("delta") or {}).get("content") or ""
                            if piece:
                                first = first or time.perf_counter()
                                answer += piece
                                yield answer.strip()
        except httpx.ConnectError as exc:
            raise UserFacingError(
                f"Cannot reach the server at {backend.base_url} ({exc}): is it running (nvlm-d serve)?"
            ) from None
        except httpx.TimeoutException:
            raise UserFacingError(
                f"The server at {backend.base_url} did not answer within {backend.timeout:g} s: it may be overloaded "
                "or stuck; try again later."
            ) from None
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            raise UserFacingError(f"The server at {backend.base_url} failed: {type(exc).__name__}: {exc}") from None
        turn.answer, turn.complete = answer.strip(), True
        self.stats = TurnStats(
            prompt_tokens=usage.get("prompt_tokens"),
            new_tokens=int(usage.get("completion_tokens") or 0),
            seconds=time.perf_counter() - started,
            first_token_seconds=None if first is None else first - started,
        )
        yield turn.answer
