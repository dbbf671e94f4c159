"""Answering a batch's requests: images loaded ahead in worker threads, requests grouped into batches of similar
length, batches answered together with `batch_chat`, records appended to the result log in input order.

    requests (input order) --Prefetcher--> loaded requests --windows of GROUP_BATCHES x B--> plan_batches
        --> answer each batch (`batch_chat`) --> InOrderWriter --> ResultLog

* Loading (decoding, tiling, normalising) runs in worker threads at most `prefetch x batch_size` requests in front of
  the model, so at most `(GROUP_BATCHES + prefetch) x batch_size` requests' pixel values are in memory at any time.
* A request that cannot be answered (a bad line, an unreadable image, a batch that fails alone) becomes an error
  record and the run goes on; a batch that fails is answered again one request at a time, so that one bad request
  (or a batch too large for the memory) costs only its own record.

Imports torch and transformers only inside functions: a command that parses arguments first starts at once.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any

from ..image_inputs import ImageInputError, TileSpec, open_image_file, stack_images, tile_image
from ..messages import one_line
from .planning import GROUP_BATCHES, InOrderWriter, LoadedRequest, plan_batches, window_size, windows
from .prefetch import Prefetcher
from .requests import BatchRequest
from .results import ResultLog
from .sampling import SeededSampler, request_seed, sampling_settings, seeded_sampling_applies

DEFAULT_BATCH_SIZE = 8
DEFAULT_PREFETCH = GROUP_BATCHES  # batches loaded ahead: the whole next window is ready when the model wants it
LOAD_WORKERS = min(4, os.cpu_count() or 1)  # threads decoding and tiling images


@dataclasses.dataclass(frozen=True)
class BatchSettings:
    """How `answer_requests` answers.

    max_num: at most this many tiles per image (thumbnail not counted), as `load_image`'s `max_num`.
    max_new_tokens: a request's answer length unless it sets its own.
    batch_size: requests answered together at most.
    prefetch: batches whose images are loaded ahead, in worker threads (0: on the model's thread).
    seed: the run's seed; a sampled request's seed is this plus a hash of its id (`sampling.request_seed`).
    """

    max_num: int
    max_new_tokens: int
    batch_size: int = DEFAULT_BATCH_SIZE
    prefetch: int = DEFAULT_PREFETCH
    seed: int = 0

    def __post_init__(self) -> None:
        for name, minimum in (
            ("max_num", 1),
            ("max_new_tokens", 1),
            ("batch_size", 1),
            ("prefetch", 0),
            ("seed", None),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"BatchSettings.{name} must be an int, got {type(value).__name__} ({value!r})")
            if minimum is not None and value < minimum:
                raise ValueError(f"BatchSettings.{name} must be >= {minimum}, got {value}")


@dataclasses.dataclass
class BatchProgress:
    """What a run of `answer_requests` has done so far: handed to its `on_progress` after records are written and
    after every batch."""

    records: int = 0  # records this run has written (answers and errors)
    answer_tokens: int = 0  # tokens of the answers written
    model_seconds: float = 0.0  # time spent answering batches

    @property
    def tokens_per_second(self) -> float:
        return self.answer_tokens / self.model_seconds if self.model_seconds else 0.0


def error_record(request: BatchRequest, error: str) -> dict:
    """The record of a request that was not answered: its id (None for a line without a usable one), line and why."""
    return {"id": request.id, "line": request.line, "error": error}


def record_errors(requests: list[BatchRequest], log: ResultLog) -> None:
    """Write the error record of every request (each must carry an `error`): a run that needs no model."""
    for request in requests:
        log.append(error_record(request, request.error))


def answer_requests(
    requests: list[BatchRequest],
    log: ResultLog,
    model: Any,
    tokenizer: Any,
    settings: BatchSettings,
    on_progress: Callable[[BatchProgress], None] | None = None,
) -> BatchProgress:
    """Answer `requests` (those the log does not hold yet: `log.pending(...)`) into `log`, in input order.

    `model` is an NVLM-D model (its `batch_chat` and config's tile size are used), `tokenizer` its tokenizer.
    Requests carrying an `error`, and those whose images cannot be read, become error records. Returns what was done.
    """
    if not isinstance(settings, BatchSettings):
        raise TypeError(f"settings must be a BatchSettings, got {type(settings).__name__}")
    spec = TileSpec.of(model.config)
    ahead = settings.prefetch * settings.batch_size
    prefetcher = Prefetcher(
        enumerate(requests),
        functools.partial(_load_request, spec=spec, max_num=settings.max_num, max_new_tokens=settings.max_new_tokens),
        ahead=ahead,
        workers=max(1, min(ahead, LOAD_WORKERS)),
    )
    writer = InOrderWriter(log.append)
    progress = BatchProgress()
    report = on_progress or (lambda progress: None)

    def write(loaded: LoadedRequest, record: dict) -> None:
        progress.records += writer.put(loaded.position, record)
        report(progress)

    try:
        for window in windows(prefetcher, window_size(settings.batch_size)):
            for loaded in window:
                if loaded.error is not None:
                    write(loaded, error_record(loaded.request, loaded.error))
            ready = [loaded for loaded in window if loaded.error is None]
            for batch in plan_batches(ready, settings.batch_size, model.generation_config):
                started = time.perf_counter()
                answered = _answer_batch(model, tokenizer, batch, settings.seed)
                progress.model_seconds += time.perf_counter() - started
                for loaded, record in answered:
                    loaded.pixel_values = None  # the batch is done: its images may go
                    if "answer" in record:
                        progress.answer_tokens += len(tokenizer(record["answer"], add_special_tokens=False).input_ids)
                    write(loaded, record)
    finally:
        prefetcher.close()
    return progress


def _load_request(item: tuple[int, BatchRequest], spec: TileSpec, max_num: int, max_new_tokens: int) -> LoadedRequest:
    """A request's images decoded and tiled (in a loader thread): a LoadedRequest, or one carrying the error."""
    position, request = item
    loaded = LoadedRequest(position, request, error=request.error)
    if request.error is not None:
        return loaded
    try:
        images = [tile_image(open_image_file(path), max_num, spec) for path in request.images]
    except ImageInputError as exc:
        loaded.error = str(exc)
        return loaded
    except Exception as exc:  # e.g. out of memory on a huge image: this request's error record, not the run's end
        loaded.error = f"{type(exc).__name__}: {one_line(exc)}"
        return loaded
    loaded.pixel_values, num_patches = stack_images(images)
    loaded.num_patches = num_patches or []
    loaded.image_tokens = sum(loaded.num_patches) * spec.tokens
    loaded.question = request.question
    loaded.generation = {"max_new_tokens": max_new_tokens, "do_sample": False, **request.generation}
    return loaded


def _answer_batch(
    model: Any, tokenizer: Any, batch: list[LoadedRequest], seed: int
) -> list[tuple[LoadedRequest, dict]]:
    """Answer a batch together; if that fails, each of its requests alone, so that one bad request (or a batch
    too large for the memory) costs only its own error record."""
    import torch

    started = time.perf_counter()
    try:
        answers = _generate(model, tokenizer, batch, seed)
    except Exception as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(batch) > 1:
            from transformers.utils import logging

            logging.get_logger(__name__).info(
                "a batch of %d failed (%s): answering its requests one at a time", len(batch), one_line(exc)
            )
            return [answered for loaded in batch for answered in _answer_batch(model, tokenizer, [loaded], seed)]
        return [(batch[0], error_record(batch[0].request, f"{type(exc).__name__}: {one_line(exc)}"))]
    seconds = round(time.perf_counter() - started, 3)
    return [
        (loaded, {"id": loaded.request.id, "answer": answer, "seconds": seconds})
        for loaded, answer in zip(batch, answers, strict=True)
    ]


def _generate(model: Any, tokenizer: Any, batch: list[LoadedRequest], seed: int) -> list[str]:
    """`batch_chat` on a batch whose requests share their generation settings (see `planning.batch_key`)."""
    import torch

    generation = dict(batch[0].generation)
    if batch[0].samples:
        seeds = [request_seed(seed, loaded.request.id) for loaded in batch]
        if seeded_sampling_applies(generation, model.generation_config):
            sampling = sampling_settings(generation, model.generation_config)
            for name in sampling:
                generation.pop(name, None)
            generation["do_sample"] = False  # SeededSampler draws the token; generate takes it
            generation["logits_processor"] = [SeededSampler(seeds, **sampling)]
        else:  # alone in its batch: transformers' own sampling, seeded for this request
            torch.manual_seed(seeds[0])
    images = [loaded.pixel_values for loaded in batch if loaded.pixel_values is not None]
    return model.batch_chat(
        tokenizer,
        torch.cat(images) if images else None,
        [loaded.question for loaded in batch],
        generation,
        num_patches_list=[loaded.num_patches for loaded in batch],
    )
