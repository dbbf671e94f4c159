"""Offline data: a task's records from local files instead of the Hub (`--data-dir`), for air-gapped clusters.

Layout: `DATA_DIR/<card task name>/<split>.jsonl` (e.g. `data/chartqa/test.jsonl`), one record a line in the Hub
dataset's own schema (the same field names lmms-eval's task reads), with each image field holding a file path
relative to the JSONL file's folder (or absolute). docs/evaluation.md lists the fields per task.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

IMAGE_FIELDS = ("image", "decoded_image") + tuple(f"image_{index}" for index in range(1, 8))


def local_file(data_dir: str | os.PathLike, name: str, split: str) -> Path:
    """The JSONL file of task `name`'s `split`, or ValueError saying where it was expected."""
    path = Path(data_dir) / name / f"{split}.jsonl"
    if not path.is_file():
        raise ValueError(f"--data-dir: task {name!r} expects its {split!r} records in {path}, which does not exist")
    return path


def _absolute_images(record: dict[str, Any], base: str) -> dict[str, Any]:
    for field in IMAGE_FIELDS:
        value = record.get(field)
        if isinstance(value, str) and value and not os.path.isabs(value):
            record[field] = os.path.join(base, value)
    return record


def absolute_image_paths(dataset: Any, base: str) -> Any:
    """A `process_docs` for lmms-eval: image paths made absolute (relative to the JSONL file's folder)."""
    return dataset.map(functools.partial(_absolute_images, base=base))


def local_overrides(data_dir: str | os.PathLike, name: str, split: str) -> dict[str, Any]:
    """lmms-eval task-config keys that read `split` of task `name` from `data_dir`."""
    path = local_file(data_dir, name, split)
    return {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path)}},
        "test_split": split,
        "process_docs": functools.partial(absolute_image_paths, base=str(path.parent)),
    }
