"""The `nvlm_*` tasks' functions for lmms-eval (named by `!function utils.NAME` in the YAML files beside this one).

Each task reads the dataset lmms-eval reads (same Hub id, split and schema) or the same schema from local files
(`--data-dir`), asks NVLM's prompt (nvlm_d.evaluation.prompts), cuts the answer to its first line and scores it in
both profiles (nvlm_d.evaluation.scoring): metrics `nvlm` and `standard` side by side.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

from nvlm_d.evaluation import prompts, scoring
from nvlm_d.evaluation.local_data import LocalDataTask  # noqa: F401 (the template's `class`)


class DataError(ValueError):
    """A record the task cannot use (no image, no answer): names the record and what is wrong."""


def _record_id(doc: dict) -> str:
    for key in ("question_id", "questionId", "id", "pid", "index", "img_id", "image_id"):
        if doc.get(key) is not None:
            return f"{key}={doc[key]}"
    return "record " + repr({key: value for key, value in doc.items() if isinstance(value, (str, int))})[:200]


def _open_image(doc: dict, field: str) -> Any:
    """A record's image as PIL RGB: a decoded `datasets` image, `{"bytes", "path"}`, or a file path (local data
    files; `--data-dir` makes it absolute)."""
    from PIL import Image, UnidentifiedImageError

    value = doc.get(field)
    if value is None:
        raise DataError(f"{_record_id(doc)}: no image in field {field!r}")
    try:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict):
            if value.get("bytes"):
                return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
            value = value.get("path")
        if isinstance(value, (str, os.PathLike)):
            with Image.open(value) as image:
                return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{_record_id(doc)}: cannot read the image in {field!r}: {exc}") from None
    raise DataError(f"{_record_id(doc)}: field {field!r} holds no image ({type(value).__name__})")


def _answers(doc: dict, field: str) -> list[str]:
    value = doc.get(field)
    if isinstance(value, str):
        value = [value]
    if not value:
        raise DataError(f"{_record_id(doc)}: no answer in field {field!r}")
    return [item["answer"] if isinstance(item, dict) else str(item) for item in value]


def _cut(results: Sequence[str]) -> str:
    return prompts.first_line(results[0])


def _profiles(nvlm: float, standard: float) -> dict[str, float]:
    return {"nvlm": nvlm, "standard": standard}


# ------------------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------------------


def visual_image(doc: dict) -> list[Any]:
    return [_open_image(doc, "image")]


def visual_decoded_image(doc: dict) -> list[Any]:
    """MathVista."""
    return [_open_image(doc, "decoded_image")]


def visual_image_1(doc: dict) -> list[Any]:
    """MMMU and MMMU-Pro: NVLM evaluated with the first image only."""
    return [_open_image(doc, "image_1")]


# ------------------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------------------


def _kwargs(kwargs: dict | None) -> dict:
    return kwargs or {}


def text_short_answer(doc: dict, kwargs: dict | None = None) -> str:
    """VQAv2, TextVQA, ChartQA, DocVQA: the question and the task's `instruction`."""
    return prompts.short_answer_prompt(doc["question"], _kwargs(kwargs).get("instruction", "\n" + prompts.SHORT_ANSWER))


def text_docvqa(doc: dict, kwargs: dict | None = None) -> str:
    choice = _kwargs(kwargs).get("prompt", "sft")
    return prompts.short_answer_prompt(doc["question"], _named_prompt("docvqa", choice))


def text_realworldqa(doc: dict, kwargs: dict | None = None) -> str:
    choice = _kwargs(kwargs).get("prompt", "dataset")
    return prompts.short_answer_prompt(doc["question"].strip(), _named_prompt("realworldqa", choice))


def _named_prompt(task: str, choice: str) -> str:
    known = prompts.UNPUBLISHED_PROMPTS[task]
    if choice not in known:
        raise ValueError(f"{task}: prompt must be one of {sorted(known)}, got {choice!r}")
    return known[choice]


def text_question(doc: dict, kwargs: dict | None = None) -> str:
    """OCRBench: the question alone."""
    return doc["question"].strip()


def text_caption(doc: dict, kwargs: dict | None = None) -> str:
    return prompts.CAPTION


def text_ai2d(doc: dict, kwargs: dict | None = None) -> str:
    return prompts.lettered_choices_prompt(doc["question"], prompts.options_of(doc["options"]))


def text_mmbench(doc: dict, kwargs: dict | None = None) -> str:
    hint = doc.get("hint")
    hint = hint if isinstance(hint, str) and hint.strip() and hint != "nan" else ""
    return prompts.lettered_choices_prompt(doc["question"], _mmbench_options(doc), hint=hint)


def _mmbench_options(doc: dict) -> list[str]:
    options = []
    for letter in "ABCDEFGHI":
        value = doc.get(letter)
        if value is None or (isinstance(value, float)) or str(value) == "nan":
            break
        options.append(str(value))
    return options


def text_mmmu(doc: dict, kwargs: dict | None = None) -> str:
    multiple_choice = doc.get("question_type", "multiple-choice") == "multiple-choice"
    options = prompts.options_of(doc["options"]) if multiple_choice else []
    return prompts.mmmu_prompt(doc["question"], options, multiple_choice)


def text_mathvista(doc: dict, kwargs: dict | None = None) -> str:
    if doc["question_type"] == "multi_choice":
        return prompts.lettered_choices_prompt(doc["question"], list(doc["choices"]))
    return prompts.mathvista_free_form_prompt(doc["query"])


# ------------------------------------------------------------------------------------------------------------
# Scores: metric `nvlm` and metric `standard`
# ------------------------------------------------------------------------------------------------------------


def score_vqa(doc: dict, results: Sequence[str]) -> dict[str, float]:
    answer, truths = _cut(results), _answers(doc, "answers")
    return _profiles(scoring.vqa_accuracy_nvlm(answer, truths), scoring.vqa_accuracy_standard(answer, truths))


def score_chartqa(doc: dict, results: Sequence[str]) -> dict[str, float]:
    answer, truths = _cut(results), _answers(doc, "answer")
    return _profiles(scoring.relaxed_accuracy_nvlm(answer, truths), scoring.relaxed_accuracy_standard(answer, truths))


def score_anls(doc: dict, results: Sequence[str]) -> dict[str, float]:
    value = scoring.anls(_cut(results), _answers(doc, "answers"))
    return _profiles(value, value)


def score_ocrbench(doc: dict, results: Sequence[str]) -> dict[str, float]:
    answer, truths, dataset = _cut(results), _answers(doc, "answer"), doc.get("dataset", "")
    return _profiles(scoring.ocrbench_nvlm(answer, truths, dataset), scoring.ocrbench_standard(answer, truths, dataset))


def score_ai2d(doc: dict, results: Sequence[str]) -> dict[str, float]:
    options = prompts.options_of(doc["options"])
    if doc.get("answer") in (None, ""):
        raise DataError(f"{_record_id(doc)}: no answer")
    letter = scoring.letters(len(options))[int(doc["answer"])]
    answer = _cut(results)
    return _profiles(
        scoring.letter_exact_match(answer, letter),
        scoring.multiple_choice_accuracy(answer, options, letter, _record_id(doc)),
    )


def score_letter_or_word(doc: dict, results: Sequence[str]) -> dict[str, float]:
    """RealWorldQA: VQA-normalised exact match with the answer (a letter or a word) in both profiles."""
    value = scoring.letter_exact_match(_cut(results), _answers(doc, "answer")[0])
    return _profiles(value, value)


def score_mmbench(doc: dict, results: Sequence[str]) -> dict[str, float]:
    value = scoring.multiple_choice_accuracy(
        _cut(results), _mmbench_options(doc), _answers(doc, "answer")[0], _record_id(doc)
    )
    return _profiles(value, value)


def score_mmmu(doc: dict, results: Sequence[str]) -> dict[str, float]:
    """MMMU and MMMU-Pro: the MMMU repository's parsers in both profiles (Megatron used them too)."""
    answer, truth = _cut(results), _answers(doc, "answer")[0]
    if doc.get("question_type", "multiple-choice") == "multiple-choice":
        value = scoring.multiple_choice_accuracy(answer, prompts.options_of(doc["options"]), truth, _record_id(doc))
    else:
        value = scoring.mmmu_open_accuracy(answer, truth)
    return _profiles(value, value)


def score_mathvista(doc: dict, results: Sequence[str]) -> dict[str, float]:
    answer, truth = _cut(results), _answers(doc, "answer")[0]
    if doc["question_type"] == "multi_choice":
        choices = [str(choice) for choice in doc["choices"]]
        if truth not in choices:
            raise DataError(f"{_record_id(doc)}: answer {truth!r} is not one of the choices")
        letter = scoring.letters(len(choices))[choices.index(truth)]
        value = scoring.multiple_choice_accuracy(answer, choices, letter, _record_id(doc))
    else:
        value = scoring.mathvista_free_form_accuracy(answer, truth)
    return _profiles(value, value)


def _caption_record(doc: dict, results: Sequence[str], field: str, key: str) -> dict[str, Any]:
    record = {"id": str(doc.get(key)), "prediction": _cut(results), "references": _answers(doc, field)}
    return {"nvlm": record, "standard": record}


def caption_coco(doc: dict, results: Sequence[str]) -> dict[str, Any]:
    return _caption_record(doc, results, "answer", "question_id")


def caption_flickr30k(doc: dict, results: Sequence[str]) -> dict[str, Any]:
    return _caption_record(doc, results, "caption", "img_id")


def submission_answer(doc: dict, results: Sequence[str]) -> dict[str, Any]:
    """Server-only splits (DocVQA test, MMMU test): the answer goes to the submission file, no local score."""
    return {"submission": {"id": _record_id(doc), "answer": _cut(results)}}


# ------------------------------------------------------------------------------------------------------------
# Aggregations
# ------------------------------------------------------------------------------------------------------------


def percent(scores: Sequence[float]) -> float:
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


def total(scores: Sequence[float]) -> float:
    """OCRBench: points out of 1000 items."""
    return float(sum(scores))


def cider_percent(records: Sequence[dict]) -> float:
    predictions = {record["id"]: record["prediction"] for record in records}
    references = {record["id"]: record["references"] for record in records}
    return 100.0 * scoring.cider(predictions, references)


def count(records: Sequence[Any]) -> int:
    return len(records)
