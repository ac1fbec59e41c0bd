"""Writing results: one line each, strict JSON or text, to stdout or a file, around the bar."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict, is_dataclass

from ..progress import is_terminal
from .common import UsageError

def _json_fallback(obj):
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    raise TypeError(f"a {type(obj).__name__} has no JSON form (return numbers, strings, lists, dicts, "
                    "None or dataclasses)")


def to_json(value) -> str:
    """Strict JSON: NaN and infinity, and objects without a JSON form, raise ValueError."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, default=_json_fallback)
    except RecursionError:
        raise ValueError("the result is nested too deeply to write as JSON") from None
    except (TypeError, ValueError) as exc:
        from ..errors import short_repr
        raise ValueError(f"the result {short_repr(value)} is not JSON: {exc}") from None


def render_result(index: int, result, as_json: bool, with_index: bool) -> str:
    """The output line of one result. Text mode writes str(result) and refuses a line break in
    it, since each result is one line; --json writes it whole."""
    if as_json:
        return to_json({"index": index, "result": result} if with_index else result)
    text = str(result)
    if "\n" in text or "\r" in text:
        from ..errors import short_repr
        raise ValueError(f"the result {short_repr(text)} holds a line break, and text output writes one "
                         "result per line; use --json to write it whole")
    return f"{index}\t{text}" if with_index else text


def render_failure(index: int, item, failure) -> str:
    """What `--on-error return` writes in the failed item's place: always a JSON object."""
    exc = failure.exception
    return to_json({"index": index, "item": item,
                    "error": {"type": type(exc).__name__, "message": str(exc), "kind": failure.kind}})


def describe_failure(index: int, item, failure) -> str:
    from ..errors import short_repr
    exc = failure.exception
    return f"item {index} ({short_repr(item)}) failed: {type(exc).__name__}: {exc}"


def same_file(a: str, b: str) -> bool:
    """Whether two paths name the same existing file (links and `..` resolved), or the same path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output_path(output_path: str | None, input_path: str | None, journal_path: str | None) -> None:
    """Writing the output truncates it: refuse a path that is the input or the journal."""
    if output_path is None:
        return
    if input_path not in (None, "-") and os.path.isfile(input_path) and same_file(output_path, input_path):
        raise UsageError(f"--output {output_path!r} is the input file; writing it would erase the items "
                         "before they are read")
    if journal_path and same_file(journal_path, output_path):
        raise UsageError("--journal and --output must be different files")


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what is buffered cannot fail."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


class OutputFailed(UsageError):
    """The results could not be written (a full disk, /dev/full, a closed stdout)."""


class Output:
    """Result lines to stdout or a file, each flushed at once so readers see results as they come.
    A progress bar on the same terminal is cleared while a line is written, then redrawn."""

    def __init__(self, path: str | None):
        self.path = path
        self.file = None
        self.bar = None
        if path is not None:
            try:
                self.file = open(path, "w", encoding="utf-8")
            except OSError as exc:
                raise UsageError(f"cannot write {path!r}: {exc.strerror}") from None
        self.stream = self.file if self.file is not None else sys.stdout

    def share_terminal_with(self, bar) -> None:
        if bar is not None and bar.terminal and is_terminal(self.stream):
            self.bar = bar

    def line(self, text: str) -> None:
        try:
            with _above(self.bar):
                self.stream.write(text + "\n")
                self.stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            self._abandon()
            where = repr(self.path) if self.path is not None else "stdout"
            raise OutputFailed(f"cannot write results to {where}: {exc.strerror or exc}") from None

    def _abandon(self) -> None:
        """After a failed write: drop what is buffered, so closing or exiting does not fail again."""
        if self.file is not None:
            self.close()
        else:
            _silence_stdout()

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:  # what failed was reported when the line was written
                pass
            self.file = None


def _above(bar):
    """Where a message to stderr goes while the bar may be drawn: on a line of its own above it."""
    return bar.printing_above() if bar is not None else contextlib.nullcontext()
