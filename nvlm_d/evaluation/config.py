"""The evaluation's settings file (eval/full_eval.yaml): which lmms-eval task each card name runs, with its dataset,
split, prompt choice, token limit and the card's number."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASK_KEYS = {"task", "dataset", "dataset_name", "split", "prompt", "max_new_tokens", "card", "card_split", "server"}


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    """One card task name and what it runs."""

    name: str  # as the card's --zero-shot-eval-tasks spells it
    task: str  # the lmms-eval task (nvlm_*)
    dataset: str | None = None
    dataset_name: str | None = None
    split: str | None = None
    prompt: str | None = None
    max_new_tokens: int | None = None
    card: float | None = None
    card_split: str | None = None
    server: str | None = None

    def overrides(self) -> dict[str, Any]:
        """The lmms-eval task-config keys these settings change."""
        changes: dict[str, Any] = {}
        if self.dataset:
            changes["dataset_path"] = self.dataset
            changes["dataset_name"] = self.dataset_name
        if self.split:
            changes["test_split"] = self.split
        if self.prompt:
            changes["lmms_eval_specific_kwargs"] = {"default": {"prompt": self.prompt}}
        if self.max_new_tokens:
            changes["generation_kwargs"] = {"max_new_tokens": self.max_new_tokens, "temperature": 0, "do_sample": False}
        return changes


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    tasks: dict[str, TaskSettings]
    max_tiles: int = 6
    source: str = ""

    def select(self, names: Sequence[str]) -> list[TaskSettings]:
        """The settings of `names` in order, duplicates dropped (the card's command names chartqa twice).

        Raises:
            ValueError: a name the file does not define (the message lists those it does).
        """
        chosen: list[TaskSettings] = []
        for name in dict.fromkeys(names):
            if name not in self.tasks:
                raise ValueError(f"unknown task {name!r} in {self.source}; known: {', '.join(sorted(self.tasks))}")
            chosen.append(self.tasks[name])
        return chosen


def load_config(path: str | os.PathLike) -> EvalConfig:
    """Read and check a settings file.

    Raises:
        ValueError: the file is missing, is not YAML, or has a task entry without `task` or with unknown keys.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config-path {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict) or not data["tasks"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty `tasks` mapping")
    tasks = {}
    for name, entry in data["tasks"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("task"), str):
            raise ValueError(f"{path}: task {name!r} needs a `task:` (the lmms-eval task it runs)")
        unknown = set(entry) - TASK_KEYS
        if unknown:
            raise ValueError(f"{path}: task {name!r} has unknown keys {sorted(unknown)}; known: {sorted(TASK_KEYS)}")
        tasks[str(name)] = TaskSettings(name=str(name), **entry)
    max_tiles = data.get("max_tiles", 6)
    if not isinstance(max_tiles, int) or max_tiles < 1:
        raise ValueError(f"{path}: max_tiles must be a positive integer, got {max_tiles!r}")
    return EvalConfig(tasks=tasks, max_tiles=max_tiles, source=str(path))
