"""The results a run leaves under `--result-save-path`:

- `samples/<card task>.jsonl`: one record per sample (document id, record id, prompt, raw output, cut answer,
  score in each profile);
- `summary.json`: per task the split, the score in each profile, the card's number and the difference, the sample
  count, the run's settings;
- `results.md`: the same as a Markdown table;
- `results.png`: each task's score beside the card's;
- `submissions/<card task>.json`: for the splits only a server scores (MMMU test, DocVQA test), the answers in the
  form the server takes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import TaskSettings
from .prompts import first_line

PROFILES = ("nvlm", "standard")


@dataclasses.dataclass
class TaskResult:
    name: str
    task: str
    split: str
    samples: int
    scores: dict[str, float | None]  # profile -> score (None: scored by a server)
    card: float | None
    card_split: str | None = None
    submission: str | None = None
    breakdown: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # group -> profile -> score

    def difference(self, profile: str) -> float | None:
        score = self.scores.get(profile)
        return None if score is None or self.card is None else score - self.card


def _metric(task_results: dict[str, Any], name: str) -> float | None:
    for key, value in task_results.items():
        if key.split(",")[0] == name and isinstance(value, (int, float)):
            return float(value)
    return None


def sample_record(sample: dict[str, Any]) -> dict[str, Any]:
    """One sample as the run keeps it: ids, the prompt, the model's raw output, the cut answer, the scores."""
    raw = sample["resps"][0]
    raw = raw[0] if isinstance(raw, list) else raw
    arguments = sample.get("arguments") or []
    first = arguments[0] if arguments else None
    prompt = first[0] if isinstance(first, (list, tuple)) and first else first
    doc = sample.get("doc") or {}
    record = {
        "doc_id": sample["doc_id"],
        "record_id": next(
            (doc[key] for key in ("question_id", "questionId", "id", "pid", "index", "img_id") if key in doc), None
        ),
        "prompt": prompt if isinstance(prompt, str) else None,
        "raw_output": raw,
        "answer": first_line(raw),
    }
    for profile in (*PROFILES, "submission"):
        if profile in sample:
            value = sample[profile]
            record[profile] = value if not isinstance(value, dict) else None
    return record


def _group_of(task: str, doc: dict[str, Any]) -> str | None:
    """MMMU's subject (from ids like `validation_Art_Theory_12`) and OCRBench's category: the benchmarks' own
    breakdowns."""
    if task.startswith(("nvlm_mmmu", "nvlm_mmmu_pro")) and isinstance(doc.get("id"), str) and "_" in doc["id"]:
        return "_".join(doc["id"].split("_")[1:-1]) or None
    if task == "nvlm_ocrbench":
        return doc.get("question_type")
    return None


def breakdown(task: str, samples: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per group, each profile's score: points for OCRBench, else the mean in %."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for sample in samples:
        group = _group_of(task, sample.get("doc") or {})
        if group is not None:
            groups.setdefault(group, []).append(sample)
    scores: dict[str, dict[str, float]] = {}
    for group, members in sorted(groups.items()):
        scores[group] = {}
        for profile in PROFILES:
            values = [float(sample[profile]) for sample in members if isinstance(sample.get(profile), (int, float))]
            if values:
                total = sum(values)
                scores[group][profile] = total if task == "nvlm_ocrbench" else 100.0 * total / len(values)
    return scores


def collect(results: dict[str, Any], chosen: Sequence[TaskSettings]) -> list[TaskResult]:
    """lmms-eval's results (simple_evaluate's return value) as one TaskResult per card task."""
    collected = []
    configs = results.get("configs", {})
    for settings in chosen:
        metrics = results["results"].get(settings.task, {})
        split = settings.split or configs.get(settings.task, {}).get("test_split", "")
        samples = len(results.get("samples", {}).get(settings.task, []))
        if settings.server:
            scores: dict[str, float | None] = {profile: None for profile in PROFILES}
        else:
            scores = {profile: _metric(metrics, profile) for profile in PROFILES}
        groups = breakdown(settings.task, results.get("samples", {}).get(settings.task, []))
        collected.append(
            TaskResult(
                settings.name,
                settings.task,
                split,
                samples,
                scores,
                settings.card,
                settings.card_split,
                settings.server,
                groups,
            )
        )
    return collected


def write_samples(directory: Path, name: str, samples: Sequence[dict[str, Any]]) -> Path:
    path = directory / "samples" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    records = sorted((sample_record(sample) for sample in samples), key=lambda record: record["doc_id"])
    _write_atomically(path, "".join(json.dumps(record, ensure_ascii=False, default=str) + "\n" for record in records))
    return path


def write_submission(directory: Path, name: str, samples: Sequence[dict[str, Any]]) -> Path:
    """The answers of a server-only split: a JSON list of {questionId/id, answer} in document order."""
    path = directory / "submissions" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = []
    for sample in sorted(samples, key=lambda sample: sample["doc_id"]):
        submitted = sample.get("submission") or {}
        key, _, value = str(submitted.get("id", "")).partition("=")
        entries.append(
            {key or "doc_id": _maybe_int(value) if key else sample["doc_id"], "answer": submitted.get("answer", "")}
        )
    _write_atomically(path, json.dumps(entries, ensure_ascii=False, indent=1) + "\n")
    return path


def _maybe_int(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def _format(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def markdown_table(collected: Sequence[TaskResult]) -> str:
    lines = [
        "| task | split | samples | nvlm | standard | card | nvlm - card | standard - card |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in collected:
        card = _format(result.card) + (f" ({result.card_split})" if result.card_split else "")
        if result.submission:
            scores = ["server", "server"]
            differences = ["-", "-"]
        else:
            scores = [_format(result.scores[profile]) for profile in PROFILES]
            differences = [_format(result.difference(profile), signed=True) for profile in PROFILES]
        lines.append(
            f"| {result.name} | {result.split} | {result.samples} | {scores[0]} | {scores[1]} | {card} | "
            f"{differences[0]} | {differences[1]} |"
        )
    return "\n".join(lines) + "\n"


def summary(collected: Sequence[TaskResult], settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "settings": settings,
        "tasks": {
            result.name: {
                "task": result.task,
                "split": result.split,
                "samples": result.samples,
                "scores": result.scores,
                "card": result.card,
                "card_split": result.card_split,
                "difference": {profile: result.difference(profile) for profile in PROFILES},
                "submission_server": result.submission,
                "breakdown": result.breakdown,
            }
            for result in collected
        },
    }


def chart(collected: Sequence[TaskResult], path: Path) -> Path:
    """A PNG bar chart: per task, the `nvlm` and `standard` scores beside the card's number (OCRBench out of 1000
    is drawn as a percentage). Drawn with Pillow, which the package already needs."""
    from PIL import Image, ImageDraw

    rows = [result for result in collected if not result.submission]
    colours = {"nvlm": (46, 117, 182), "standard": (112, 173, 71), "card": (160, 160, 160)}
    label_width, bar_width, bar_height, gap = 190, 500, 12, 14
    height = 50 + max(1, len(rows)) * (3 * bar_height + gap)
    image = Image.new("RGB", (label_width + bar_width + 80, height), "white")
    draw = ImageDraw.Draw(image)
    x = label_width
    for name, colour in colours.items():
        draw.rectangle([x, 10, x + 12, 22], fill=colour)
        draw.text((x + 16, 10), name, fill="black")
        x += 110
    y = 40
    for result in rows:
        scale = 10.0 if result.name.startswith("ocrbench") else 1.0
        draw.text((8, y + bar_height), result.name, fill="black")
        for offset, key in enumerate(("nvlm", "standard", "card")):
            value = result.card if key == "card" else result.scores.get(key)
            top = y + offset * bar_height
            if value is not None:
                length = max(0.0, min(100.0, value / scale)) / 100.0 * bar_width
                draw.rectangle([label_width, top, label_width + length, top + bar_height - 2], fill=colours[key])
                draw.text((label_width + length + 4, top), f"{value:.1f}", fill="black")
        y += 3 * bar_height + gap
    partial = path.with_name(path.name + ".partial")
    image.save(partial, format="PNG")
    os.replace(partial, path)
    return path


def write_results(
    directory: str | os.PathLike, results: dict[str, Any], chosen: Sequence[TaskSettings], settings: dict[str, Any]
) -> list[TaskResult]:
    """Write every result file of a run; returns the per-task results."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    collected = collect(results, chosen)
    for task_settings in chosen:
        samples = results.get("samples", {}).get(task_settings.task, [])
        write_samples(directory, task_settings.name, samples)
        if task_settings.server:
            write_submission(directory, task_settings.name, samples)
    _write_atomically(directory / "summary.json", json.dumps(summary(collected, settings), indent=2) + "\n")
    _write_atomically(directory / "results.md", markdown_table(collected))
    chart(collected, directory / "results.png")
    return collected


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
