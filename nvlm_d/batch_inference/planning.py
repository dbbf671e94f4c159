"""Batch planning: which loaded requests are answered together, and the records handed back in input order.

* A window of GROUP_BATCHES x B consecutive requests is sorted by prompt length (image tokens dominate it) before it
  is cut into batches, so that a 13-tile request is not padded next to a text-only one; requests with different
  generation settings never share a batch.
* Records are written in input order (a reorder buffer of at most one window), so that the output of an
  interrupted run is always a prefix of the requests, and a resumed run's output equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from .requests import BatchRequest
from .sampling import seeded_sampling_applies

# A window of this many batches is sorted by prompt length before it is cut into batches: enough for requests of
# similar length to meet, few enough that the records it holds back (written in input order) stay few.
GROUP_BATCHES = 4

T = TypeVar("T")


def window_size(batch_size: int) -> int:
    """Requests sorted together before they are cut into batches: GROUP_BATCHES batches, or one request when
    batches hold one (sorting would only hold back records)."""
    return GROUP_BATCHES * batch_size if batch_size > 1 else 1


def windows(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last one shorter)."""
    window: list[T] = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


@dataclasses.dataclass
class LoadedRequest:
    """A request ready for the model: its place in the run, question, images' pixel values and generation
    settings, or the error that makes it an error record."""

    position: int  # index among the requests of this run, the order its record is written in
    request: BatchRequest  # the request it came from
    question: str | None = None
    pixel_values: Any = None  # float32 tensor [tiles, 3, s, s], or None without images
    num_patches: list[int] = dataclasses.field(default_factory=list)  # tiles per image
    image_tokens: int = 0  # what the images add to the prompt
    generation: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None

    @property
    def prompt_cost(self) -> int:
        """About the prompt's length, for sorting: its image tokens, which dominate it, plus the question's characters
        (no tokenizer needed)."""
        return self.image_tokens + len(self.question or "")

    @property
    def samples(self) -> bool:
        return bool(self.generation.get("do_sample"))


def batch_key(loaded: LoadedRequest, model_generation_config: Any) -> tuple:
    """Requests with equal keys may share a batch: the same generation settings, and a decoding every row of a
    batch can do with its own seed. A sampled request that `SeededSampler` cannot sample (beam sampling, a
    repetition penalty, which `chat` applies after any other logits processor) gets a key of its own."""
    settings = tuple(sorted(loaded.generation.items()))
    if loaded.samples and not seeded_sampling_applies(loaded.generation, model_generation_config):
        return ("alone", loaded.position)
    return ("together", settings)


def plan_batches(window: list[LoadedRequest], batch_size: int, model_generation_config: Any) -> list[list]:
    """Cut a window into batches of at most `batch_size`: requests grouped by `batch_key`, sorted by prompt length
    within a group, and the batches ordered by their first request, so that records can be written early."""
    groups: dict[tuple, list[LoadedRequest]] = {}
    for loaded in window:
        groups.setdefault(batch_key(loaded, model_generation_config), []).append(loaded)
    batches = []
    for members in groups.values():
        members.sort(key=lambda loaded: loaded.prompt_cost)
        batches += [members[start : start + batch_size] for start in range(0, len(members), batch_size)]
    batches.sort(key=lambda batch: min(loaded.position for loaded in batch))
    return batches


class InOrderWriter:
    """Hands records to `write` in the order of their positions (0, 1, 2, ...), holding back those that come early."""

    def __init__(self, write: Callable[[dict], None]) -> None:
        self._write = write
        self._waiting: dict[int, dict] = {}
        self.next_position = 0

    def put(self, position: int, record: dict) -> int:
        """Take a record; returns how many records were written now."""
        self._waiting[position] = record
        written = 0
        while self.next_position in self._waiting:
            self._write(self._waiting.pop(self.next_position))
            self.next_position += 1
            written += 1
        return written

    @property
    def held_back(self) -> int:
        return len(self._waiting)
