"""A crash-safe journal of answers, so that a run killed with kill -9 resumes without redoing finished samples.

lmms-eval's response cache stores a model's answers only after `generate_until` returns for a whole task, so a
killed run loses everything it generated. The journal stores each batch's answers as soon as they exist: one JSON
line per answer, appended and fsynced, one file per rank (`answers/rank-<r>.jsonl`; every rank reads all files, so
a resumed run may use another number of processes). A line torn by the kill is ignored, and cut from the end of
this rank's file before anything is appended to it (else the next answer would be glued to it and lost).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def answer_key(model: str, task: str, doc_id: int, prompt: str, max_new_tokens: int) -> str:
    """What makes an answer reusable: the model, the task's document, the prompt and the token limit."""
    text = json.dumps([model, task, doc_id, prompt, max_new_tokens], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class AnswerJournal:
    def __init__(self, directory: str | os.PathLike, rank: int = 0) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"rank-{rank}.jsonl"
        self.answers: dict[str, str] = {}
        for path in sorted(self.directory.glob("rank-*.jsonl")):
            self._read(path)
        self._cut_torn_line()

    def _read(self, path: Path) -> None:
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a killed run
                if isinstance(entry, dict) and isinstance(entry.get("answer"), str):
                    self.answers[entry["key"]] = entry["answer"]

    def _cut_torn_line(self) -> None:
        """Drop the unfinished last line a kill left in this rank's file, so that appends start on a line of their
        own."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as journal:
                journal.truncate(data.rfind(b"\n") + 1)
                os.fsync(journal.fileno())

    def get(self, key: str) -> str | None:
        return self.answers.get(key)

    def add(self, entries: list[tuple[str, str]]) -> None:
        """Append (key, answer) pairs and fsync: once this returns, a kill loses none of them."""
        with self.path.open("a", encoding="utf-8") as out:
            for key, answer in entries:
                out.write(json.dumps({"key": key, "answer": answer}, ensure_ascii=False) + "\n")
                self.answers[key] = answer
            out.flush()
            os.fsync(out.fileno())
