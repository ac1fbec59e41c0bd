"""The journal of `pmap run --journal`: what finished, so a rerun resumes without redoing
or duplicating an item."""
from __future__ import annotations

import json
import os
import time
from array import array
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
    """Which items have a result, which failed, and what each wrote: a header naming the command,
    then one JSON line per finished attempt of an item (its output line, or its failure),
    appended with one write() per batch.

    It is the single source of truth for a resumed run: the run writes its whole output again,
    journaled results in their places, so output left behind by a killed run never needs repair,
    and nothing is duplicated or missing. An item whose last entry is a failure has no result: a
    rerun runs it again (with `keep_failures`, its failure stands, as GNU parallel's --resume).
    A kill can only tear the last line; that line is dropped (its item runs again) and the file is
    cut back to the last whole line. It survives the death of the process, not of the machine
    (no fsync)."""

    VERSION = 1
    FLUSH_ITEMS = 256
    FLUSH_SECONDS = 0.2

    def __init__(self, path: str, command: dict, ordered: bool, total: int | None = None,
                 keep_failures: bool = False):
        self.path = path
        self.command = command
        self.ordered = ordered
        self.total = total            # items in the input, when known: every index must be below it
        self.keep_failures = keep_failures
        self.done = Bits()            # items with a result
        self.failures: dict[int, tuple[int, int]] = {}  # index -> (offset of its last failure, attempts)
        # index and file offset of each result entry, as arrays: a journal may hold millions
        self.finished_index = array("q")
        self.finished_offset = array("q")
        self.entries = 0
        self.buffer: list[bytes] = []
        self.last_flush = time.monotonic()
        self.fd: int | None = None

    def open(self, write: bool = True) -> None:
        """Lock the journal (one run at a time), read what an earlier run left (checking it is
        this command's), and open it to append. Without `write` (a dry run) it is only read, and a
        journal that does not exist yet reads as empty."""
        if not write:
            try:
                with open(self.path, "rb") as stream:
                    self._scan(stream)
            except FileNotFoundError:
                return
            except IsADirectoryError:
                raise UsageError(f"journal {self.path!r} is a directory") from None
            except OSError as exc:
                raise UsageError(f"cannot read journal {self.path!r}: {exc.strerror}") from None
            return
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
        """An entry as a run writes it: an index within the input that has no result yet, and its
        output line or its failure."""
        if not isinstance(entry, dict):
            return False
        index = entry.get("i")
        if type(index) is not int or index < 0 or index in self.done:
            return False
        limit = self.total if self.total is not None else self.entries + UNORDERED_JOURNAL_SLACK
        if index >= limit:
            return False
        if "error" in entry:
            attempts = entry.get("attempts", 1)
            return isinstance(entry["error"], str) and isinstance(entry.get("record"), str) \
                and type(attempts) is int and attempts >= 1
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
            index = entry["i"]
            if "error" in entry:
                earlier = self.failures.get(index, (0, 0))[1]
                self.failures[index] = (end, earlier + entry.get("attempts", 1))
            else:
                self.done.add(index)
                self.finished_index.append(index)
                self.finished_offset.append(end)
            self.entries += 1
            end += len(line)
        return end

    # ---- what a resumed run does ------------------------------------------------------------
    def failed_without_result(self) -> int:
        """Items whose last entry is a failure."""
        return sum(1 for index in self.failures if index not in self.done)

    def settled(self) -> "Bits | _Union":
        """Items this run does not run: those with a result, and with `keep_failures` those that failed."""
        if not self.keep_failures:
            return self.done
        return _Union(self.done, {i for i in self.failures if i not in self.done})

    def earlier_attempts(self, index: int) -> int:
        """Failed attempts journaled for an item by earlier runs."""
        entry = self.failures.get(index)
        return entry[1] if entry is not None else 0

    def replay(self) -> Iterator[dict]:
        """The settled entries of earlier runs: each result (and with `keep_failures` each item's
        last failure), in input order for an ordered run, else in the order they were written."""
        indices, offsets = self.finished_index, self.finished_offset
        if self.keep_failures:
            kept = [(i, offset) for i, (offset, _) in self.failures.items() if i not in self.done]
            if kept:
                indices, offsets = array("q", indices), array("q", offsets)
                indices.extend(i for i, _ in kept)
                offsets.extend(offset for _, offset in kept)
        if not offsets:
            return
        keys = indices if self.ordered else offsets
        if any(keys[k] > keys[k + 1] for k in range(len(keys) - 1)):  # a resumed run's entries follow
            order = sorted(range(len(keys)), key=keys.__getitem__)
            offsets = array("q", (offsets[k] for k in order))
        with open(self.path, "rb") as stream:
            position = None
            for offset in offsets:
                if offset != position:
                    stream.seek(offset)
                line = stream.readline()
                position = offset + len(line)
                yield json.loads(line)

    # ---- writing ----------------------------------------------------------------------------
    def record(self, index: int, line: str | None, error: str | None = None, record: str | None = None,
               attempts: int = 1) -> None:
        if error is None:
            entry = {"i": index, "out": line}
        else:
            entry = {"i": index, "error": error, "record": record}
            if attempts != 1:
                entry["attempts"] = attempts
        text = json.dumps(entry, ensure_ascii=False)
        try:
            data = (text + "\n").encode()
        except UnicodeEncodeError:  # bytes a command printed that are not UTF-8: \\u escapes keep them
            data = (json.dumps(entry) + "\n").encode()
        self.buffer.append(data)
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


class _Union:
    """Membership in either of two sets (results, and failures kept as they are)."""

    def __init__(self, first, second):
        self.first = first
        self.second = second

    def __contains__(self, n: int) -> bool:
        return n in self.first or n in self.second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)
