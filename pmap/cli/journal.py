"""The journal of `pmap run --journal`: what finished, so a rerun resumes without redoing
or duplicating an item."""
from __future__ import annotations

import json
import os
import time
from typing import Iterator

from .common import UsageError

UNORDERED_JOURNAL_SLACK = 1 << 24  # how far past its entries an unordered index may lie when the total is unknown

class Bits:
    """A growable set of small non-negative integers, one bit each."""

    def __init__(self):
        self.bytes = bytearray()
        self.count = 0

    def add(self, n: int) -> None:
        byte, bit = divmod(n, 8)
        if byte >= len(self.bytes):
            self.bytes.extend(bytes(byte + 1 - len(self.bytes) + len(self.bytes) // 2))
        if not self.bytes[byte] >> bit & 1:
            self.bytes[byte] |= 1 << bit
            self.count += 1

    def __contains__(self, n: int) -> bool:
        byte, bit = divmod(n, 8)
        return byte < len(self.bytes) and bool(self.bytes[byte] >> bit & 1)

    def __len__(self) -> int:
        return self.count


class Journal:
    """Which items are finished, and what each wrote: a header naming the command, then one
    JSON line per finished item, appended with one write() per batch.

    It is the single source of truth for a resumed run: the run writes its whole output
    again, the journaled lines first, so output left behind by a killed run never needs
    repair, and nothing is duplicated or missing. A kill can only tear the last line; that
    line is dropped (its item runs again) and the file is cut back to the last whole line.
    It survives the death of the process, not of the machine (no fsync)."""

    VERSION = 1
    FLUSH_ITEMS = 256
    FLUSH_SECONDS = 0.2

    def __init__(self, path: str, command: dict, ordered: bool, total: int | None = None):
        self.path = path
        self.command = command
        self.ordered = ordered
        self.total = total            # items in the input, when known: every index must be below it
        self.done = Bits()
        self.failed = 0
        self.entries = 0
        self.buffer: list[bytes] = []
        self.last_flush = time.monotonic()
        self.fd: int | None = None

    def open(self) -> None:
        """Lock the journal (one run at a time), read what an earlier run left (checking it is
        this command's), and open it to append."""
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except IsADirectoryError:
            raise UsageError(f"journal {self.path!r} is a directory") from None
        except OSError as exc:
            raise UsageError(f"cannot write journal {self.path!r}: {exc.strerror}") from None
        try:
            self._lock()
            with open(self.path, "rb") as stream:
                good_end = self._scan(stream)
        except OSError as exc:
            self.close()
            raise UsageError(f"cannot read journal {self.path!r}: {exc.strerror}") from None
        except UsageError:
            self.close()
            raise
        os.ftruncate(self.fd, good_end)
        if good_end == 0:
            header = {"pmap_journal": self.VERSION, "command": self.command}
            os.write(self.fd, (json.dumps(header) + "\n").encode())

    def _lock(self) -> None:
        """An exclusive lock for the life of the run: a second run on the same journal would
        interleave its entries with ours. The lock goes with the process, also when killed."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not a POSIX system: no lock
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"journal {self.path!r} is in use by another pmap run; wait for it to end, "
                             "or give this run another journal") from None

    def _valid(self, entry) -> bool:
        """An entry as this run writes it: a new index within the input, and its output line."""
        if not isinstance(entry, dict):
            return False
        index = entry.get("i")
        if type(index) is not int or index < 0 or index in self.done:
            return False
        if self.ordered and index != self.entries:
            return False  # ordered runs journal in input order: a gap means damage
        limit = self.total if self.total is not None else self.entries + UNORDERED_JOURNAL_SLACK
        if index >= limit:
            return False
        if "error" in entry:
            return isinstance(entry["error"], str) and isinstance(entry.get("record"), str)
        return isinstance(entry.get("out"), str)

    def _scan(self, stream) -> int:
        """Check the header and entries; return the offset just after the last whole entry."""
        header_line = stream.readline()
        if not header_line.endswith(b"\n"):
            return 0  # empty, or killed while writing the header: start afresh
        try:
            header = json.loads(header_line)
        except (ValueError, RecursionError):
            header = None
        if not isinstance(header, dict) or header.get("pmap_journal") != self.VERSION:
            raise UsageError(f"{self.path!r} is not a pmap journal; pick another file")
        theirs = header.get("command")
        theirs = theirs if isinstance(theirs, dict) else {}
        if theirs != self.command:
            differ = sorted(k for k in set(theirs) | set(self.command) if theirs.get(k) != self.command.get(k))
            raise UsageError(f"journal {self.path!r} belongs to a different command ({', '.join(differ)} "
                             "differ); use another journal file, or delete it to start over")
        end = len(header_line)
        for number, line in enumerate(stream, 2):
            if not line.endswith(b"\n"):
                break  # torn by a kill mid-write
            try:
                entry = json.loads(line)
            except (ValueError, RecursionError):
                entry = None
            if not self._valid(entry):
                raise UsageError(f"journal {self.path!r} is damaged at line {number}; delete it to start over")
            self.done.add(entry["i"])
            self.entries += 1
            self.failed += "error" in entry
            end += len(line)
        return end

    def replay(self) -> Iterator[dict]:
        """The entries an earlier run journaled, in the order they were written."""
        if not self.entries:
            return
        with open(self.path, "rb") as stream:
            stream.readline()
            for _ in range(self.entries):
                yield json.loads(stream.readline())

    def record(self, index: int, line: str | None, error: str | None = None, record: str | None = None) -> None:
        entry = {"i": index, "out": line} if error is None else {"i": index, "error": error, "record": record}
        self.buffer.append((json.dumps(entry, ensure_ascii=False) + "\n").encode())
        if len(self.buffer) >= self.FLUSH_ITEMS or time.monotonic() - self.last_flush >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.buffer and self.fd is not None:
            data = b"".join(self.buffer)
            self.buffer.clear()
            while data:
                data = data[os.write(self.fd, data):]
        self.last_flush = time.monotonic()

    def close(self) -> None:
        if self.fd is not None:
            self.flush()
            os.close(self.fd)
            self.fd = None
