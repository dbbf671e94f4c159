"""`nvlm-d batch`'s pipeline: images loaded ahead in worker threads, requests grouped into batches of similar
length, batches answered together, records handed back in input order.

    requests (input order) --Prefetcher--> loaded requests --windows of GROUP_BATCHES x B--> plan_batches
        --> answer each batch (`batch_chat`) --> InOrderWriter --> the result log

* Loading (decoding, tiling, normalising) runs in worker threads at most `ahead` requests in front of the model, so
  at most `(GROUP_BATCHES + prefetch) x batch size` requests' pixel values are in memory at any time.
* A window of GROUP_BATCHES x B consecutive requests is sorted by prompt length (image tokens dominate it) before it
  is cut into batches, so that a 13-tile request is not padded next to a text-only one; requests with different
  generation settings never share a batch.
* Records are written in input order (a reorder buffer of at most one window), so that the output of an
  interrupted run is always a prefix of the requests, and a resumed run's output equals an uninterrupted one.

Imports torch and transformers only inside functions: the CLI's start-up stays light.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

# A window of this many batches is sorted by prompt length before it is cut into batches: enough for requests of
# similar length to meet, few enough that the records it holds back (written in input order) stay few.
GROUP_BATCHES = 4

# What `generate` uses for the sampling settings a request and the model's generation_config leave unset
# (transformers' GenerationConfig defaults; a test compares sampled answers with transformers' own sampling).
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
# Sampling warpers `SeededSampler` does not apply: a model whose generation_config sets one of them to a value
# that changes the distribution samples one request at a time with transformers' own sampling.
_NEUTRAL_WARPERS = {"min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None}

T = TypeVar("T")
R = TypeVar("R")


# --------------------------------------------------------------------------------------------------------
# Loading ahead
# --------------------------------------------------------------------------------------------------------


class Prefetcher(Generic[T, R]):
    """`load(item)` for every item, in a pool of `workers` threads, at most `ahead` items in front of the consumer;
    iterating yields the results in input order (an exception of `load` is raised where its result is taken).

    While the consumer works on item k, items k+1 .. k+ahead are being loaded: never more, so memory is bounded
    by what `ahead` loaded items hold. `ahead=0` loads each item on the consumer's thread when it is taken.
    """

    def __init__(self, items: Iterable[T], load: Callable[[T], R], ahead: int, workers: int) -> None:
        if ahead < 0 or workers < 1:
            raise ValueError(f"need ahead >= 0 and workers >= 1, got ahead={ahead}, workers={workers}")
        self._items = iter(items)
        self._load = load
        self.ahead = ahead
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="nvlm_d-load") if ahead else None
        self._pending: collections.deque[Future] = collections.deque()
        self.submitted = 0  # items handed to `load` so far

    def __iter__(self) -> Iterator[R]:
        if self._pool is None:
            for item in self._items:
                self.submitted += 1
                yield self._load(item)
            return
        try:
            while True:
                for item in itertools.islice(self._items, self.ahead + 1 - len(self._pending)):
                    self._pending.append(self._pool.submit(self._load, item))
                    self.submitted += 1
                if not self._pending:
                    return
                yield self._pending.popleft().result()
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the loads that have not started; a load in progress finishes on its own, unwaited for."""
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


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


# --------------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedRequest:
    """A request ready for the model: its place in the run, question, images' pixel values and generation
    settings, or the error that makes it an error record."""

    position: int  # index among the requests of this run, the order its record is written in
    request: Any  # the BatchRequest it came from
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


# --------------------------------------------------------------------------------------------------------
# Sampling, one generator per request
# --------------------------------------------------------------------------------------------------------


def seeded_sampling_applies(generation: dict, model_generation_config: Any) -> bool:
    """Whether `SeededSampler` samples this request exactly as `generate(do_sample=True)` would."""
    if generation.get("num_beams", 1) != 1 or generation.get("repetition_penalty", 1.0) != 1.0:
        return False
    return all(
        getattr(model_generation_config, name, neutral) in (None, neutral) for name, neutral in _NEUTRAL_WARPERS.items()
    )


def sampling_settings(generation: dict, model_generation_config: Any) -> dict[str, Any]:
    """temperature, top_k and top_p as `generate` resolves them: the request's, else the model's
    generation_config's, else transformers' defaults."""
    resolved = {}
    for name, default in _SAMPLING_DEFAULTS.items():
        value = generation.get(name)
        if value is None:
            value = getattr(model_generation_config, name, None)
        resolved[name] = default if value is None else value
    return resolved


class SeededSampler:
    """A logits processor that samples every batch row from its own `torch.Generator`, so that a request's sampled
    answer depends on its seed and not on which requests share its batch.

    It does what `generate(do_sample=True)` does after its logits processors — temperature, top-k, top-p
    (transformers' own warpers), softmax, `torch.multinomial` of one token — with the row's generator instead of
    the global one, and leaves the drawn token as the row's only finite score: `generate` then runs greedy
    (`do_sample=False`) and takes it. Seeded like `torch.manual_seed(seed)` seeds the global generator, one
    request alone gets exactly the tokens `torch.manual_seed(seed); chat(..., do_sample=True)` gives.
    """

    def __init__(self, seeds: list[int], temperature: float, top_k: int, top_p: float) -> None:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.seeds = seeds
        self._generators: list[Any] | None = None
        self._warpers: list[Any] = []  # in the order transformers applies them
        if temperature != 1.0:
            self._warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            self._warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
        if top_p < 1.0:
            self._warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if scores.shape[0] != len(self.seeds):
            raise ValueError(f"SeededSampler has {len(self.seeds)} seeds but the batch has {scores.shape[0]} rows")
        if self._generators is None:
            self._generators = [torch.Generator(device=scores.device).manual_seed(seed) for seed in self.seeds]
        for warper in self._warpers:
            scores = warper(input_ids, scores)
        probs = torch.nn.functional.softmax(scores, dim=-1)
        tokens = torch.cat(
            [torch.multinomial(probs[row : row + 1], 1, generator=g) for row, g in enumerate(self._generators)]
        )
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, tokens, 0.0)
