"""Hand-made evaluation records (each dataset's schema, generated images, as local files) and a model with fixed
answers: shared by tests/test_evaluation*.py and the torchrun worker tests/distributed/eval_data_parallel.py."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

# question -> the model's fixed raw answer (before NVLM's first-line cut)
ANSWERS = {
    "Share of red?": "45%\nbecause the bar says so",  # truth 45: nvlm right (% stripped), standard wrong (0.45)
    "Sales in May?": "10.4",  # truth 10: within 5% in both
    "Is it rising?": "No",  # truth yes: wrong in both
    "What animal?": "cat",  # 2 of 10 annotators said cat: nvlm 2/3, standard 0.6
    "What is written?": "cat and dog",  # both truths found: nvlm 2 points, standard 1
    "What is printed?": "nothing",
    "Which colour?": "(A)",  # right
    "Which shape?": "B",  # truth A
    "What is the title?": "Annual Report\n\nmore",
}


def _write(directory: Path, task: str, split: str, records: list[dict]) -> None:
    folder = directory / task
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for index, record in enumerate(records):
        for field in ("image", "image_1"):
            if record.get(field) == "make":
                Image.new("RGB", (64, 48), (30 * index, 100, 200)).save(folder / "images" / f"{index}.png")
                record[field] = f"images/{index}.png"
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def write_records(directory: Path) -> Path:
    """The records of chartqa, textvqa, ocrbench, mmmu and docvqa_test under `directory` (--data-dir layout)."""
    _write(directory, "chartqa", "test", [
        {"image": "make", "question": "Share of red?", "answer": "45", "type": "human_test"},
        {"image": "make", "question": "Sales in May?", "answer": "10", "type": "augmented_test"},
        {"image": "make", "question": "Is it rising?", "answer": "yes", "type": "human_test"},
    ])  # fmt: skip
    _write(directory, "textvqa", "validation", [
        {"image": "make", "question": "What animal?", "answers": ["cat"] * 2 + ["dog"] * 8, "question_id": 5},
    ])  # fmt: skip
    _write(directory, "ocrbench", "test", [
        {"image": "make", "question": "What is written?", "answer": ["cat", "dog"], "dataset": "docVQA",
         "question_type": "Doc-oriented VQA"},
        {"image": "make", "question": "What is printed?", "answer": ["stop"], "dataset": "IIIT5K",
         "question_type": "Regular Text Recognition"},
    ])  # fmt: skip
    _write(directory, "mmmu", "validation", [
        {"image_1": "make", "id": "validation_Art_1", "question": "<image 1> Which colour?",
         "options": "['red', 'blue']", "answer": "A", "question_type": "multiple-choice"},
        {"image_1": "make", "id": "validation_Art_2", "question": "Which shape?", "options": "['round', 'square']",
         "answer": "A", "question_type": "multiple-choice"},
    ])  # fmt: skip
    _write(directory, "docvqa_test", "test", [
        {"image": "make", "question": "What is the title?", "answers": None, "questionId": 101},
    ])  # fmt: skip
    return directory


class FixedAnswers:
    """Stands in for NVLM-D where only the answers matter: `batch_chat` answers each question from ANSWERS and
    counts the questions it was asked."""

    dtype = None
    device = "cpu"
    name_or_path = "fixed-answers"  # what the answer journal knows the model by

    def __init__(self):
        import torch

        self.dtype = torch.float32
        self.asked: list[str] = []

    def batch_chat(self, tokenizer, pixel_values, questions, config, num_patches_list):
        answers = []
        for question in questions:
            self.asked.append(question)
            answers.append(next(answer for key, answer in ANSWERS.items() if key in question))
        return answers
