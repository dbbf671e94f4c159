"""Reading a batch's requests: a JSON Lines file, one request a line, every bad line a request that carries its
error (so that it becomes an error record and the run goes on) instead of an exception.

A request is `{"id": ..., "question": ..., "image": path or [paths], generation settings..., "metadata": ...}`; any
other key is an error, as a misspelled keyword argument is in Python. Only a file that is not JSON Lines at all
raises (`RequestFileError`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..conversation import IMAGE_PLACEHOLDER
from ..image_inputs import with_image_placeholders


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Generation settings a request may carry, with their checks.
GENERATION_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "min_new_tokens": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "num_beams": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "repetition_penalty": (lambda v: _is_number(v) and v > 0, "a number > 0"),
}
# The other keys a request may have; `metadata` holds anything of the user's (not read, not copied).
REQUEST_KEYS = ("id", "question", "image", "metadata")


class RequestFileError(ValueError):
    """The requests file cannot be read, or is not JSON Lines at all (a CSV file, one JSON document over several
    lines): one message for the whole file instead of an error record per line."""


@dataclasses.dataclass
class BatchRequest:
    """One input line. `key` identifies it in the output: ("id", type, id) for the first line of an id,
    ("line", n) for a line without a usable id (bad JSON, no id, a duplicate id)."""

    line: int
    key: tuple
    id: Any = None
    question: str | None = None  # with one <image> marker per image
    images: list[str] = dataclasses.field(default_factory=list)  # paths
    generation: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None


def id_key(request_id: Any) -> tuple:
    """How a request id is told apart from others in a run: 1 and "1" are two ids."""
    return ("id", type(request_id).__name__, request_id)


def read_requests(path: str | os.PathLike, name: str | None = None) -> list[BatchRequest]:
    """Parse a requests file; bad lines become requests carrying an `error` (never an exception). Blank lines are
    skipped. Relative image paths resolve against the file's directory.

    Raises RequestFileError (its message calls the file `name`, default: its path) when the file cannot be read, or
    is one JSON document over several lines, or holds no JSON object at all.
    """
    path = Path(path)
    name = name or str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RequestFileError(f"cannot read {name}: {exc.strerror}") from None
    _check_not_one_document(name, raw)
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
        error = _id_error(record, number, first_line_of)
        if error is not None:
            requests.append(BatchRequest(number, line_key, error=error))
            continue
        key = id_key(record["id"])
        first_line_of[key] = number
        requests.append(_parse_request(record, number, key, path.absolute().parent))
    if requests and not objects:
        raise RequestFileError(f"{name} is not JSON Lines (one JSON object a line): {requests[0].error}")
    return requests


def _id_error(record: dict, number: int, first_line_of: dict[tuple, int]) -> str | None:
    """Why a line's id cannot identify it (missing, of the wrong type, already taken), or None."""
    if "id" not in record or record["id"] is None:
        return f"line {number} has no id"
    request_id = record["id"]
    if not (isinstance(request_id, str) or _is_int(request_id)):
        return f"line {number}: id must be a string or an integer, got {request_id!r}"
    first = first_line_of.get(id_key(request_id))
    if first is not None:
        return f"line {number}: duplicate id {request_id!r} (first on line {first}); line skipped"
    return None


def _check_not_one_document(name: str, raw: bytes) -> None:
    """A file that is one JSON document over several lines (an array of requests, a pretty-printed object) is not
    JSON Lines, even where some of its lines happen to parse: say so once, instead of an error per line."""
    if raw.strip().count(b"\n") == 0:
        return
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return
    kind = "array" if isinstance(document, list) else "object" if isinstance(document, dict) else "value"
    raise RequestFileError(f"{name} is one JSON {kind} over several lines, not JSON Lines: write one request a line")


def _parse_request(record: dict, number: int, key: tuple, base: Path) -> BatchRequest:
    request = BatchRequest(number, key, id=record["id"])
    unknown = [name for name in record if name not in REQUEST_KEYS and name not in GENERATION_KEYS]
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
    request.error = _read_generation(record, request.generation)
    if request.error is not None:
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


def _read_generation(record: dict, generation: dict[str, Any]) -> str | None:
    """Copy the record's generation settings into `generation`; the first problem with them, or None."""
    for name, (valid, expected) in GENERATION_KEYS.items():
        if name in record:
            if not valid(record[name]):
                return f"{name} must be {expected}, got {record[name]!r}"
            generation[name] = record[name]
    sampling = [name for name in ("temperature", "top_p", "top_k") if name in generation]
    if sampling and "do_sample" not in generation:  # as chat refuses them (see docs/cli.md)
        return (
            f'{", ".join(sampling)} only act when sampling and do_sample is not set: add "do_sample": true to '
            'sample, or "do_sample": false to answer greedily'
        )
    return None


def _unknown_key(name: str) -> str:
    known = [*REQUEST_KEYS, *GENERATION_KEYS]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {name!r}{hint}; a request takes {', '.join(known)}"
