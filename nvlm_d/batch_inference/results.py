"""The result log of a batch: one JSON record a line per request, appended and fsynced one at a time, so that a
run killed at any moment (`kill -9`, a power loss) resumes where it stopped, answering no request twice.

A record is `{"id": ..., "answer": ..., "seconds": ...}` or `{"id": ..., "line": ..., "error": ...}` (`id` None for a
line without a usable id, which its `line` then identifies).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..durable_files import fsync_dir
from .requests import BatchRequest, id_key


class ResultLogError(ValueError):
    """The output file cannot be this run's log: it cannot be opened, another process is writing to it, or it holds
    a line this writer did not write."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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

    def __init__(self, path: str | os.PathLike, name: str | None = None) -> None:
        """Open (creating it if need be), lock and repair the log at `path`; its error messages call the file `name`
        (default: its path). Raises ResultLogError when the file cannot be opened, another process holds it, or a
        line other than the last is not a record of this writer."""
        self.path = Path(path)
        self.name = name or str(self.path)
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
            raise ResultLogError(f"cannot open {self.name}: {exc.strerror}") from None
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            os.close(self.fd)
            raise ResultLogError(f"another process is writing to {self.name}") from None
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
                raise ResultLogError(
                    f"{self.name} line {index + 1} is not an nvlm-d batch record; "
                    "fix or remove that line (or use another output file)"
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
        if record["id"] is None and not _is_int(record.get("line")):
            return None
        return record

    @staticmethod
    def key(record: dict) -> tuple:
        return id_key(record["id"]) if record["id"] is not None else ("line", record["line"])

    def _count(self, record: dict) -> None:
        self.done.add(self.key(record))
        if "error" in record:
            self.errors += 1
        else:
            self.answered += 1

    def pending(self, requests: list[BatchRequest]) -> list[BatchRequest]:
        """The requests this log holds no record of yet, in input order: what a resumed run still has to do."""
        return [request for request in requests if request.key not in self.done]

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
        """Release the lock and the file."""
        os.close(self.fd)

    def __enter__(self) -> ResultLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
