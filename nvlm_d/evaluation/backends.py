"""Where answers come from: the package's own model (`hf`, batched with `batch_chat`) or a running
OpenAI-compatible server (`openai`, e.g. `nvlm-d serve`'s vLLM). Both take the same requests (NVLM's prompt text, the
images) and return raw answers; lmms-eval's model class (`lmms_model.NVLMD`) only feeds them.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
from collections.abc import Sequence
from typing import Any

from .prompts import MAX_TILES, SYSTEM_MESSAGE

BACKENDS = ("hf", "openai")


@dataclasses.dataclass
class Request:
    """One question: the prompt after the images, the images (PIL, RGB) and the task's token limit."""

    prompt: str
    images: list[Any]
    max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the `hf` backend puts one replica: `gpus` GPUs with the model card's layer split (the replica of rank
    r takes GPUs r*gpus .. r*gpus+gpus-1), or one `device`; `dtype` bf16/fp16/fp32; `bits` 8 or 4 quantizes the
    decoder (bitsandbytes)."""

    gpus: int | None = None
    device: str | None = None
    dtype: str | None = None
    bits: int | None = None


def load_hf_model(path: str, placement: Placement, replica: int = 0) -> tuple[Any, Any]:
    """The model and tokenizer, loaded as the other commands load them (`nvlm_d.loading`), on this replica's own
    GPUs: 8 GPUs, 2 processes, `gpus=4` -> GPUs 0-3 and 4-7; one device per replica otherwise."""
    import torch

    from ..loading import load_model, resolve_placement
    from ..model_source import ModelSource

    device = placement.device
    if placement.gpus is None and device is None:
        device = f"cuda:{replica}" if torch.cuda.is_available() else "cpu"
    resolved = resolve_placement(placement.gpus, device, placement.dtype)
    if placement.gpus is not None and torch.cuda.device_count() < (replica + 1) * placement.gpus:
        raise ValueError(
            f"replica {replica} needs GPUs {replica * placement.gpus}..{(replica + 1) * placement.gpus - 1}, "
            f"but {torch.cuda.device_count()} are visible"
        )
    return load_model(
        ModelSource(path), resolved, placement.gpus, first_gpu=replica * (placement.gpus or 0), bits=placement.bits
    )


def tile_count(image: Any, max_num: int = MAX_TILES) -> int:
    """How many tiles `load_image(image, max_num=max_num)` makes of a PIL image (its grid, plus the thumbnail when
    the grid has more than one tile), from its size alone: no pixel is decoded or resized."""
    from ..image_tiling import select_grid

    if not hasattr(image, "size") or not hasattr(image, "convert"):
        raise TypeError(f"a request's images must be PIL images, got {type(image).__name__}")
    columns, rows = select_grid(*image.size, max_num=max_num)
    return columns * rows + (1 if columns * rows > 1 else 0)


def request_cost(request: Request, max_num: int = MAX_TILES) -> tuple[int, int, int]:
    """What a request costs the `hf` backend, as a sort key: its token limit (requests with different limits never
    share a `batch_chat` call), its tiles (256 prompt tokens and a vision tower pass each), its prompt's length."""
    tiles = sum(tile_count(image, max_num) for image in request.images)
    return request.max_new_tokens, tiles, len(request.prompt)


class HFBackend:
    """The package's model: each request's images tiled as NVLM evaluates (at most 6 tiles plus the thumbnail),
    answered `batch_size` at a time with `batch_chat`, greedy."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 1, max_num: int = MAX_TILES) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_num = max_num

    def batches(self, requests: Sequence[Request]) -> list[list[int]]:
        """The requests' indices in `batch_size` groups of similar cost (`request_cost`), costliest first.

        As lmms-eval's own models sort by length: a batch of like requests pads less (its decode steps attend over,
        and its KV cache holds, the longest row's length for every row), and the first batch is the largest, so an
        out-of-memory error comes at once, not hours in. Greedy answers do not depend on their batch-mates, so the
        order changes no answer."""
        costs = [request_cost(request, self.max_num) for request in requests]
        order = sorted(range(len(requests)), key=lambda index: costs[index], reverse=True)
        return [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]

    def answer(self, requests: Sequence[Request]) -> list[str]:
        """One answer per request, in request order (whatever order `batches` ran them in)."""
        answers: list[str] = [""] * len(requests)
        for batch in self.batches(requests):
            for index, text in zip(batch, self._answer_batch([requests[index] for index in batch]), strict=True):
                answers[index] = text
        return answers

    def _answer_batch(self, requests: Sequence[Request]) -> list[str]:
        """Requests with the same token limit share a `batch_chat` call (greedy answers do not depend on their
        batch-mates; batch_chat's tests check it)."""
        answers: dict[int, str] = {}
        by_limit: dict[int, list[int]] = {}
        for index, request in enumerate(requests):
            by_limit.setdefault(request.max_new_tokens, []).append(index)
        for limit, indices in by_limit.items():
            group = [requests[index] for index in indices]
            for index, text in zip(indices, self._batch_chat(group, limit), strict=True):
                answers[index] = text
        return [answers[index] for index in range(len(requests))]

    def _batch_chat(self, requests: Sequence[Request], max_new_tokens: int) -> list[str]:
        import torch

        from ..image_processing_nvlm_d import load_image

        tiles, patches, questions = [], [], []
        for request in requests:
            counts = []
            for image in request.images:
                pixel_values = load_image(image, max_num=self.max_num)
                tiles.append(pixel_values)
                counts.append(int(pixel_values.shape[0]))
            patches.append(counts if len(counts) != 1 else counts[0])
            placeholders = "".join("<image>\n" for _ in request.images)
            questions.append(placeholders + request.prompt)
        pixel_values = torch.cat(tiles).to(self.model.dtype) if tiles else None
        config = {"max_new_tokens": max_new_tokens, "do_sample": False}
        with torch.inference_mode():
            return list(
                self.model.batch_chat(
                    self.tokenizer,
                    pixel_values,
                    questions,
                    config,
                    num_patches_list=[count if count != [] else 0 for count in patches],
                )
            )


def image_data_url(image: Any) -> str:
    """A PIL image as a PNG data URL (lossless, so the server tiles the same pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_messages(request: Request) -> list[dict[str, Any]]:
    """The request as OpenAI chat messages: NVLM's system message, then the images and the prompt in one user turn
    (vLLM's NVLM-D puts each image's placeholder first, as `model.chat` does)."""
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": image_data_url(image)}} for image in request.images
    ]
    content.append({"type": "text", "text": request.prompt})
    return [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": content}]


class OpenAIBackend:
    """A running OpenAI-compatible server (vLLM serving NVLM-D): greedy chat completions, the task's token limit."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        from openai import OpenAI

        self.model = model
        self.client = OpenAI(
            base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY", "EMPTY"), timeout=timeout
        )

    def answer(self, requests: Sequence[Request]) -> list[str]:
        answers = []
        for request in requests:
            reply = self.client.chat.completions.create(
                model=self.model,
                messages=chat_messages(request),
                max_tokens=request.max_new_tokens,
                temperature=0.0,
            )
            answers.append(reply.choices[0].message.content or "")
        return answers

    def batches(self, requests: Sequence[Request]) -> list[list[int]]:
        """One request at a time, in request order (the server batches concurrent requests itself), so that each
        answer is journaled as soon as it exists."""
        return [[index] for index in range(len(requests))]
