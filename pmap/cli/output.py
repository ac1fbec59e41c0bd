"""Writing results: one line each, strict JSON or text, to stdout or a file, around the bar."""
from __future__ import annotations

import contextlib
import csv
import io
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
    """Strict JSON: NaN and infinity, and objects without a JSON form, raise ValueError. Text that
    holds bytes which were not UTF-8 (kept as surrogates) is written with \\u escapes."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, default=_json_fallback)
    except RecursionError:
        raise ValueError("the result is nested too deeply to write as JSON") from None
    except (TypeError, ValueError) as exc:
        from ..errors import short_repr
        raise ValueError(f"the result {short_repr(value)} is not JSON: {exc}") from None
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = json.dumps(value, ensure_ascii=True, allow_nan=False, default=_json_fallback)
    return text


def _cell(value) -> str:
    """A value as one CSV cell: text as it is, None empty, anything else as JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return to_json(value)


def csv_line(cells: list, delimiter: str) -> str:
    """One CSV (or TSV) record, without its line end; quoted by the csv module where needed."""
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=delimiter, lineterminator="\n").writerow(cells)
    return buffer.getvalue()[:-1]


def command_value(stdout: str) -> str:
    """A command's stdout as a value (JSON, a CSV cell): less its final line end, as $(...) would."""
    if stdout.endswith("\r\n"):
        return stdout[:-2]
    return stdout[:-1] if stdout.endswith("\n") else stdout


class Renderer:
    """The output line of one result, made in the worker so a result that cannot be written fails
    its own item. Formats: text (str(result), one line; a command's stdout as it is), json, csv, tsv.
    A top-level class, so process and remote backends pickle it by reference."""

    __slots__ = ("format", "with_index", "tag", "command", "item_columns", "failures")

    def __init__(self, format: str, with_index: bool = False, tag: bool = False, command: bool = False,
                 item_columns: list | None = None, failures: bool = False):
        self.format = format
        self.with_index = with_index
        self.tag = tag
        self.command = command
        self.item_columns = item_columns  # a CSV input's header: the item's columns in CSV output
        self.failures = failures          # CSV output has an error column (--on-error return)

    def __reduce__(self):
        return (type(self), (self.format, self.with_index, self.tag, self.command, self.item_columns,
                             self.failures))

    def columns(self) -> list:
        """The CSV header: the index, the item's fields, the result, and the error if failures are written."""
        names = (["index"] if self.with_index else []) + list(self.item_columns or ["item"])
        result = "result"
        while result in names:
            result += "_"
        names.append(result)
        if self.failures:
            error = "error"
            while error in names:
                error += "_"
            names.append(error)
        return names

    def _item_cells(self, item) -> list:
        if self.item_columns is not None and isinstance(item, dict):
            return [_cell(item.get(name)) for name in self.item_columns]
        return [_cell(item)]

    def row(self, index: int, item, result_cell: str, error: str | None) -> str:
        cells = ([str(index)] if self.with_index else []) + self._item_cells(item) + [result_cell]
        if self.failures:
            cells.append(error or "")
        return csv_line(cells, "," if self.format == "csv" else "\t")

    def __call__(self, index: int, item, result) -> str:
        if self.format in ("csv", "tsv"):
            value = command_value(result) if self.command else result
            return self.row(index, item, _cell(value), None)
        if self.format == "json":
            value = command_value(result) if self.command else result
            if self.tag:
                return to_json({"item": item, "result": value})
            return to_json({"index": index, "result": value} if self.with_index else value)
        if self.command:
            return self._prefixed(index, item, result)
        text = str(result)
        if "\n" in text or "\r" in text:
            from ..errors import short_repr
            raise ValueError(f"the result {short_repr(text)} holds a line break, and text output writes one "
                             "result per line; use --json to write it whole")
        return self._prefix(index, item) + text

    def _prefix(self, index: int, item) -> str:
        prefix = f"{index}\t" if self.with_index else ""
        if self.tag:
            prefix += _tag_text(item) + "\t"
        return prefix

    def _prefixed(self, index: int, item, stdout: str) -> str:
        """A command's stdout as it is, each line prefixed by --with-index and --tag."""
        prefix = self._prefix(index, item)
        if not prefix or not stdout:
            return stdout
        return "".join(prefix + line for line in stdout.splitlines(keepends=True))


def _tag_text(item) -> str:
    if isinstance(item, dict):
        text = "\t".join(_cell(v) for v in item.values())
    elif isinstance(item, (list, tuple)):
        text = "\t".join(_cell(v) for v in item)
    else:
        text = _cell(item)
    return text.replace("\n", "\\n").replace("\r", "\\r")


def render_failure(index: int, item, failure, renderer: Renderer | None = None) -> str:
    """What `--on-error return` writes in the failed item's place: a JSON object, or in CSV a row
    whose error column says what went wrong."""
    exc = failure.exception
    if renderer is not None and renderer.format in ("csv", "tsv"):
        return renderer.row(index, item, "", f"{type(exc).__name__}: {exc}")
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
    """Results to stdout or a file, each flushed at once so readers see results as they come.
    Text is written as UTF-8 with every byte a command printed kept as it was (surrogateescape).
    A line result gets a line end; a raw one (a command's stdout in text mode) is written as it is.
    A progress bar on the same terminal is cleared while a result is written, then redrawn."""

    def __init__(self, path: str | None, raw: bool = False):
        self.path = path
        self.raw = raw
        self.file = None
        self.bar = None
        if path is not None:
            try:
                self.file = open(path, "wb")
            except OSError as exc:
                raise UsageError(f"cannot write {path!r}: {exc.strerror}") from None
            self.stream = self.file
        else:
            sys.stdout.flush()
            self.stream = getattr(sys.stdout, "buffer", None)
        self.text_stream = sys.stdout if self.stream is None else None  # a stdout without bytes (rare)

    def share_terminal_with(self, bar) -> None:
        target = self.file if self.file is not None else sys.stdout
        if bar is not None and bar.terminal and is_terminal(target):
            self.bar = bar

    def header(self, text: str) -> None:
        self._write(text + "\n")

    def line(self, text: str) -> None:
        self._write(text if self.raw else text + "\n")

    def _write(self, text: str) -> None:
        if not text:
            return
        try:
            with _above(self.bar):
                if self.text_stream is not None:
                    self.text_stream.write(text)
                    self.text_stream.flush()
                else:
                    self.stream.write(text.encode("utf-8", "surrogateescape"))
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
