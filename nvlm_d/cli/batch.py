"""`nvlm-d batch`: a JSONL file of requests, answered resumably and crash-safely."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..conversation import IMAGE_PLACEHOLDER
from ..image_inputs import ImageInputError, TileSpec, open_image_file, stack_images, tile_image, with_image_placeholders
from .batching import (
    GROUP_BATCHES,
    InOrderWriter,
    LoadedRequest,
    Prefetcher,
    SeededSampler,
    plan_batches,
    sampling_settings,
    seeded_sampling_applies,
    window_size,
    windows,
)
from .common import (
    DEFAULT_MAX_NEW_TOKENS,
    PROG,
    CLIError,
    add_max_num,
    add_placement_options,
    fsync_dir,
    is_int,
    is_number,
    load_model,
    model_option,
    non_negative_int,
    one_line,
    positive_int,
    resolve_placement,
    say,
)

DEFAULT_BATCH_SIZE = 8
DEFAULT_PREFETCH = GROUP_BATCHES  # batches loaded ahead: the whole next window is ready when the model wants it
LOAD_WORKERS = min(4, os.cpu_count() or 1)  # threads decoding and tiling images

# Generation settings a batch request may carry, with their checks.
_REQUEST_GENERATION_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_new_tokens": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "min_new_tokens": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "top_p": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "num_beams": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "repetition_penalty": (lambda v: is_number(v) and v > 0, "a number > 0"),
}
# The other keys a request may have; `metadata` holds anything of the user's (not read, not copied).
_REQUEST_KEYS = ("id", "question", "image", "metadata")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "batch",
        help="answer a JSONL file of requests, resumably and crash-safely",
        description=(
            "Answer every request of --input (one JSON object a line: id, question, optional image path or "
            "list of paths, optional generation settings, optional metadata of your own; any other key is an "
            "error, as a misspelled keyword argument is in Python) into --output, one record a line, each flushed to "
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
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULT_BATCH_SIZE,
        metavar="B",
        help=(
            f"answer up to B requests together (default: {DEFAULT_BATCH_SIZE}); requests are grouped by length "
            f"within windows of {GROUP_BATCHES} x B, and requests with other generation settings never share a batch"
        ),
    )
    parser.add_argument(
        "--prefetch",
        type=non_negative_int,
        default=DEFAULT_PREFETCH,
        metavar="N",
        help=(
            f"decode and tile the images of up to N batches ahead, in worker threads, while the model works "
            f"(default: {DEFAULT_PREFETCH}; 0: load on the model's thread). At most ({GROUP_BATCHES} + N) x B "
            "requests' images are in memory at once"
        ),
    )
    add_max_num(parser)
    add_placement_options(parser, DEFAULT_MAX_NEW_TOKENS)
    parser.set_defaults(handler=_run_batch)


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
    _check_not_one_document(path, raw)
    requests: list[BatchRequest] = []
    first_line_of: dict[tuple, int] = {}
    objects = 0
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
        objects += 1
        if "id" not in record or record["id"] is None:
            requests.append(BatchRequest(number, line_key, error=f"line {number} has no id"))
            continue
        request_id = record["id"]
        if not (isinstance(request_id, str) or is_int(request_id)):
            requests.append(
                BatchRequest(
                    number, line_key, error=f"line {number}: id must be a string or an integer, got {request_id!r}"
                )
            )
            continue
        key = _id_key(request_id)
        if key in first_line_of:
            requests.append(
                BatchRequest(
                    number,
                    line_key,
                    error=(
                        f"line {number}: duplicate id {request_id!r} (first on line {first_line_of[key]}); line skipped"
                    ),
                )
            )
            continue
        first_line_of[key] = number
        requests.append(_parse_request(record, number, key, path.absolute().parent))
    if requests and not objects:
        raise CLIError(f"--input {path} is not JSON Lines (one JSON object a line): {requests[0].error}")
    return requests


def _check_not_one_document(path: Path, raw: bytes) -> None:
    """A file that is one JSON document over several lines (an array of requests, a pretty-printed object) is not
    JSON Lines, even where some of its lines happen to parse: say so once, instead of an error per line."""
    if raw.strip().count(b"\n") == 0:
        return
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return
    kind = "array" if isinstance(document, list) else "object" if isinstance(document, dict) else "value"
    raise CLIError(f"--input {path} is one JSON {kind} over several lines, not JSON Lines: write one request a line")


def _parse_request(record: dict, number: int, key: tuple, base: Path) -> BatchRequest:
    request = BatchRequest(number, key, id=record["id"])
    unknown = [name for name in record if name not in _REQUEST_KEYS and name not in _REQUEST_GENERATION_KEYS]
    if unknown:
        request.error = _unknown_key(unknown[0])
        return request
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        request.error = (
            "missing question" if question is None else f"question must be a non-empty string, got {question!r}"
        )
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
    sampling = [name for name in ("temperature", "top_p", "top_k") if name in request.generation]
    if sampling and "do_sample" not in request.generation:  # as chat refuses them (see docs/cli.md)
        request.error = (
            f'{", ".join(sampling)} only act when sampling and do_sample is not set: add "do_sample": true to '
            'sample, or "do_sample": false to answer greedily'
        )
        return request
    question = with_image_placeholders(question, len(paths))
    if question.count(IMAGE_PLACEHOLDER) != len(paths):
        request.error = (
            f"the question has {question.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} marker(s) "
            f"but {len(paths)} image(s) were given"
        )
        return request
    request.question = question
    return request


def _unknown_key(name: str) -> str:
    known = [*_REQUEST_KEYS, *_REQUEST_GENERATION_KEYS]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {name!r}{hint}; a request takes {', '.join(known)}"


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
            fsync_dir(self.path.parent.resolve())  # the new file's name survives a power loss too
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
        if record["id"] is None and not is_int(record.get("line")):
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
        fsync_dir(self.path.parent.resolve())
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
    source = model_option(args.model)
    requests = read_requests(input_path)
    placement = resolve_placement(args)

    log = ResultLog(output_path)
    try:
        if log.repaired_bytes:
            say(f"{PROG} batch: cut a half-written last record ({log.repaired_bytes} bytes) from {output_path}")
        if args.retry_errors:
            dropped = log.drop_errors()
            if dropped:
                say(f"{PROG} batch: retrying {dropped} request(s) that had failed")
        todo = [request for request in requests if request.key not in log.done]
        say(
            f"{PROG} batch: {len(requests)} request(s) in {input_path}, {len(requests) - len(todo)} already in "
            f"{output_path}, {len(todo)} to do"
        )
        if any(request.error is None for request in todo):
            started = time.perf_counter()
            model, tokenizer = load_model(source, placement, args.gpus)
            say(
                f"{PROG} batch: loaded {source.path} in {time.perf_counter() - started:.1f} s ({placement.description})"
            )
            _answer_all(todo, log, model, tokenizer, args)
        else:
            for request in todo:
                log.append({"id": request.id, "line": request.line, "error": request.error})
        say(f"{PROG} batch: {output_path} holds {log.answered} answer(s) and {log.errors} error record(s)")
        return 1 if log.errors else 0
    finally:
        log.close()


def _answer_all(todo: list[BatchRequest], log: ResultLog, model: Any, tokenizer: Any, args: argparse.Namespace) -> None:
    """Answer `todo` through the pipeline of `batching`: loaded ahead, grouped, batched, written in input order."""
    from tqdm.auto import tqdm

    spec = TileSpec.of(model.config)
    ahead = args.prefetch * args.batch_size
    prefetcher = Prefetcher(
        enumerate(todo),
        functools.partial(_load_request, spec=spec, max_num=args.max_num, max_new_tokens=args.max_new_tokens),
        ahead=ahead,
        workers=max(1, min(ahead, LOAD_WORKERS)),
    )
    writer = InOrderWriter(log.append)
    total_tokens, total_seconds = 0, 0.0
    with tqdm(total=len(todo), file=sys.stderr, unit="req", desc="batch", dynamic_ncols=True) as progress:
        try:
            for window in windows(prefetcher, window_size(args.batch_size)):
                ready = []
                for loaded in window:
                    if loaded.error is None:
                        ready.append(loaded)
                    else:
                        progress.update(writer.put(loaded.position, _error_record(loaded.request, loaded.error)))
                for batch in plan_batches(ready, args.batch_size, model.generation_config):
                    started = time.perf_counter()
                    answered = _answer_batch(model, tokenizer, batch, args.seed)
                    total_seconds += time.perf_counter() - started
                    for loaded, record in answered:
                        loaded.pixel_values = None  # the batch is done: its images may go
                        if "answer" in record:
                            total_tokens += len(tokenizer(record["answer"], add_special_tokens=False).input_ids)
                        progress.update(writer.put(loaded.position, record))
                    progress.set_postfix_str(f"{total_tokens / total_seconds:.1f} tok/s, errors {log.errors}")
        finally:
            prefetcher.close()


def _error_record(request: BatchRequest, error: str) -> dict:
    return {"id": request.id, "line": request.line, "error": error}


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
            return [answered for loaded in batch for answered in _answer_batch(model, tokenizer, [loaded], seed)]
        return [(batch[0], _error_record(batch[0].request, f"{type(exc).__name__}: {one_line(exc)}"))]
    seconds = round(time.perf_counter() - started, 3)
    return [
        (loaded, {"id": loaded.request.id, "answer": answer, "seconds": seconds})
        for loaded, answer in zip(batch, answers, strict=True)
    ]


def request_seed(base_seed: int, request_id: Any) -> int:
    """The seed of a request's sampled answer: from --seed and its id, so that a resumed run samples as an
    uninterrupted one, whatever the batch the request lands in."""
    return base_seed + zlib.crc32(json.dumps(request_id).encode())


def _generate(model: Any, tokenizer: Any, batch: list[LoadedRequest], seed: int) -> list[str]:
    """`batch_chat` on a batch whose requests share their generation settings (see `batching.batch_key`)."""
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
