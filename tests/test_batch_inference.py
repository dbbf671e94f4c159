"""`nvlm_d.batch_inference` used from Python, without the command: what `nvlm-d batch` does (tested end to end in
test_cli.py) is reachable with typed settings and library errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nvlm_d.batch_inference import (
    BatchSettings,
    RequestFileError,
    ResultLog,
    ResultLogError,
    answer_requests,
    read_requests,
)
from nvlm_d.image_inputs import ImageInputError, open_image_file


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_answer_requests_writes_what_chat_answers_and_resumes_without_repeating(tiny_model, tokenizer, tmp_path):
    requests_file = write_jsonl(
        tmp_path / "requests.jsonl",
        [{"id": "a", "question": "Hello?"}, {"id": 2, "question": "Who are you?", "max_new_tokens": 2}, {"id": "x"}],
    )
    requests = read_requests(requests_file)
    with ResultLog(tmp_path / "answers.jsonl") as log:
        settings = BatchSettings(max_num=1, max_new_tokens=4)
        progress = answer_requests(log.pending(requests), log, tiny_model, tokenizer, settings)
    with ResultLog(tmp_path / "answers.jsonl") as reopened:
        assert reopened.pending(requests) == []  # a rerun has nothing left to do
    records = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert progress.records == 3
    assert [record["id"] for record in records] == ["a", 2, "x"]
    greedy = {"do_sample": False}
    assert records[0]["answer"] == tiny_model.chat(tokenizer, None, "Hello?", {"max_new_tokens": 4, **greedy})
    assert records[1]["answer"] == tiny_model.chat(tokenizer, None, "Who are you?", {"max_new_tokens": 2, **greedy})
    assert records[2] == {"id": "x", "line": 3, "error": "missing question"}


@pytest.mark.parametrize(
    "changes, error",
    [
        ({"max_num": 0}, ValueError),
        ({"batch_size": 2.0}, TypeError),
        ({"prefetch": -1}, ValueError),
        ({"max_new_tokens": True}, TypeError),
    ],
)
def test_batch_settings_refuse_values_the_command_line_would_refuse(changes, error):
    with pytest.raises(error, match=next(iter(changes))):
        BatchSettings(**{"max_num": 6, "max_new_tokens": 8, **changes})


def test_a_requests_file_that_is_one_json_array_raises_naming_the_file(tmp_path):
    path = tmp_path / "requests.json"
    path.write_text('[\n  {"id": 1, "question": "Hello?"}\n]\n')
    with pytest.raises(RequestFileError, match=re.escape(f"{path} is one JSON array over several lines")):
        read_requests(path)


def test_a_result_log_with_a_foreign_line_is_refused_naming_the_file_as_asked(tmp_path):
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"note": "mine"}, {"id": 1, "answer": "x", "seconds": 1}])
    with pytest.raises(ResultLogError, match="^my log line 1 is not an nvlm-d batch record"):
        ResultLog(answers, name="my log")


def test_opening_a_missing_image_file_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "absent.png"
    with pytest.raises(ImageInputError, match=f"^{re.escape(f'image not found: {missing}')}$"):
        open_image_file(missing)
