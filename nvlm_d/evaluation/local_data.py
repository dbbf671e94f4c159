"""Offline data: a task's records from local files instead of the Hub (`--data-dir`), for air-gapped clusters.

Layout: `DATA_DIR/<card task name>/<split>.jsonl` (e.g. `data/chartqa/test.jsonl`), one record a line in the Hub
dataset's own schema (the same field names lmms-eval's task reads), with each image field holding a file path
relative to the JSONL file's folder (or absolute). docs/evaluation.md lists the fields per task.

`run_eval.py`/`nvlm-d eval` take the folder as `--data-dir`. lmms-eval's own command line (`python -m lmms_eval
--model nvlm_d --tasks nvlm_chartqa ...`) has no option that changes a task's data source, so there the folder comes
from the environment variable `NVLM_EVAL_DATA_DIR`: every `nvlm_*` task is a `LocalDataTask`, which reads it.
Import this module after `lmms_compat.import_lmms_eval` (it imports lmms-eval's task module).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from lmms_eval.api.task import ConfigurableTask

DATA_DIR_VARIABLE = "NVLM_EVAL_DATA_DIR"
# The folder of each task is named as the card's --zero-shot-eval-tasks names it (eval/full_eval.yaml): the task's
# name without `nvlm_`, but for these.
CARD_NAMES = {"nvlm_ai2d": "ai2diagram", "nvlm_ai2d_nomask": "ai2diagram_nomask"}

IMAGE_FIELDS = ("image", "decoded_image") + tuple(f"image_{index}" for index in range(1, 8))


def local_file(data_dir: str | os.PathLike, name: str, split: str, source: str = "--data-dir") -> Path:
    """The JSONL file of task `name`'s `split`, or ValueError saying where it was expected (and who said so)."""
    path = Path(data_dir) / name / f"{split}.jsonl"
    if not path.is_file():
        raise ValueError(f"{source}: task {name!r} expects its {split!r} records in {path}, which does not exist")
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


def local_overrides(data_dir: str | os.PathLike, name: str, split: str, source: str = "--data-dir") -> dict[str, Any]:
    """lmms-eval task-config keys that read `split` of task `name` from `data_dir` (given by `source`)."""
    path = local_file(data_dir, name, split, source)
    return {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path)}},
        "test_split": split,
        "process_docs": functools.partial(absolute_image_paths, base=str(path.parent)),
    }


def card_name(task: str) -> str:
    """The card's name of lmms-eval task `task`: the name of its folder under the data directory."""
    return CARD_NAMES.get(task, task.removeprefix("nvlm_"))


def with_environment_data_dir(config: dict[str, Any]) -> dict[str, Any]:
    """A task config reading its test split from `$NVLM_EVAL_DATA_DIR` when that is set. A config that already reads
    local JSON files (`--data-dir`, which wins) is left as it is."""
    data_dir = os.environ.get(DATA_DIR_VARIABLE)
    if not data_dir or config.get("dataset_path") == "json":
        return config
    overrides = local_overrides(data_dir, card_name(config["task"]), config["test_split"], DATA_DIR_VARIABLE)
    return {**config, **overrides}


class LocalDataTask(ConfigurableTask):
    """lmms-eval's YAML-configured task, reading local files where `$NVLM_EVAL_DATA_DIR` says so. The `nvlm_*` tasks
    name it as their `class`: the one hook lmms-eval offers between a task's config and its dataset download."""

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        # lmms-eval 0.7.3 hands a python task its whole config, `class` key included, which TaskConfig refuses.
        config = {key: value for key, value in (config or {}).items() if key != "class"}
        super().__init__(config=with_environment_data_dir(config), **kwargs)
