"""`pmap run --joblog FILE`: one line per attempt, as tab-separated values with a header.

Columns: index, item, start (local time), seconds, outcome (ok, failed, timeout, crash,
cancelled), exit (a command's exit status or the signal that killed it), attempt (counted across
resumed runs when a journal is kept), worker (host:pid, and the thread), command (as run, with
placeholders filled), error (the exception, or the tail of a command's stderr).

Lines are appended, a batch per write; a run killed mid-write leaves at most a torn last line,
which the next run cuts off before appending. Tabs, line breaks and backslashes inside a field are
written as \\t, \\n, \\r and \\\\, so each attempt is one line.
"""
from __future__ import annotations

import datetime
import os
import time

from .common import UsageError

COLUMNS = ("index", "item", "start", "seconds", "outcome", "exit", "attempt", "worker", "command", "error")
ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def field(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).translate(ESCAPES)


def local_time(epoch: float | None) -> str:
    if epoch is None:
        return ""
    moment = datetime.datetime.fromtimestamp(epoch)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


class JobLog:
    FLUSH_SECONDS = 0.2

    def __init__(self, path: str):
        self.path = path
        self.buffer: list[str] = []
        self.last_flush = time.monotonic()
        self.fd: int | None = None
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            size = os.fstat(self.fd).st_size
            if size:
                self._cut_torn_line(size)
            else:
                self._write("\t".join(COLUMNS) + "\n")
        except IsADirectoryError:
            raise UsageError(f"--joblog {path!r} is a directory") from None
        except OSError as exc:
            self.close()
            raise UsageError(f"cannot write --joblog {path!r}: {exc.strerror}") from None

    def _cut_torn_line(self, size: int) -> None:
        """Cut the file back to its last whole line (a run killed while writing tears at most one)."""
        with open(self.path, "rb") as stream:
            first = stream.readline()
            if not first.startswith(b"index\titem\t"):
                raise UsageError(f"--joblog {self.path!r} is not a pmap job log; pick another file")
            back = min(size, 1 << 16)
            stream.seek(size - back)
            tail = stream.read(back)
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        if cut < 0:
            raise UsageError(f"--joblog {self.path!r} ends in a line too long to be a job log's; pick another file")
        os.ftruncate(self.fd, size - back + cut + 1)

    def attempt(self, index: int, item, record: dict, outcome: str | None = None, attempt: int | None = None,
                error: str | None = None) -> None:
        exit_status = record.get("exit")
        line = "\t".join((
            str(index), field(_item_text(item)), local_time(record.get("start")), field(record.get("seconds")),
            outcome or record.get("outcome", ""), field(exit_status),
            field(attempt if attempt is not None else record.get("attempt")), field(record.get("worker")),
            field(record.get("command")), field(error if error is not None else record.get("error")),
        ))
        self.buffer.append(line + "\n")
        if time.monotonic() - self.last_flush >= self.FLUSH_SECONDS:
            self.flush()

    def _write(self, text: str) -> None:
        data = text.encode("utf-8", "backslashreplace")
        while data:
            data = data[os.write(self.fd, data):]

    def flush(self) -> None:
        if self.buffer and self.fd is not None:
            text = "".join(self.buffer)
            self.buffer.clear()
            self._write(text)
        self.last_flush = time.monotonic()

    def close(self) -> None:
        if self.fd is not None:
            self.flush()
            os.close(self.fd)
            self.fd = None


def _item_text(item) -> str:
    if isinstance(item, str):
        return item
    import json
    try:
        return json.dumps(item, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(item)
