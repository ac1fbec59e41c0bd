"""Where the items come from: arguments, a file or stdin (one per line), or `--range`."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator

from .common import InputError, UsageError

@dataclass
class Source:
    """The items of a run: lazily read, with their count when known, and an identity for the journal."""

    items: Iterable
    total: int | None
    identity: dict


def parse_range(text: str) -> range:
    parts = text.split(":")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = None
    if numbers is None or not 1 <= len(numbers) <= 3 or (len(numbers) == 3 and numbers[2] == 0):
        raise UsageError(f"--range takes N or START:STOP[:STEP] with whole numbers, got {text!r}")
    numbers = range(*numbers)
    try:
        len(numbers)
    except OverflowError:
        raise UsageError(f"--range {text} has more items than can be counted here (at most {sys.maxsize:,})") from None
    return numbers


def _parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        column = f" (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise InputError(f"{where} is not valid JSON: {message}{column}") from None
    except RecursionError:
        raise InputError(f"{where} is JSON nested too deeply to read") from None


def _lines(stream, name: str, lossless: bool) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line that is not blank, without its line ending. With
    `lossless` (commands: items are often file names), bytes that are not UTF-8 are kept as
    surrogates and reach the command as they were; otherwise such a line is an input error."""
    for number, raw in enumerate(stream, 1):
        if raw.endswith(b"\n"):
            raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        if not raw.strip():
            continue  # a blank line is not an item, in text and JSON alike
        if lossless:
            yield number, raw.decode("utf-8", "surrogateescape")
            continue
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{name} line {number} is not valid UTF-8: {exc.reason}") from None


def _open_input(path: str):
    return (sys.stdin.buffer if path == "-" else open(path, "rb")), ("stdin" if path == "-" else path)


def _read_lines(path: str, as_json: bool, lossless: bool = False) -> Iterator:
    """Items of a file or stdin, one per line; blank lines are skipped."""
    stream, name = _open_input(path)
    try:
        for number, text in _lines(stream, name, lossless):
            yield _parse_json(text, f"{name} line {number}") if as_json else text
    finally:
        if path != "-":
            stream.close()


class Records:
    """CSV or TSV records as dicts keyed by the header: the csv module reads quoted line breaks,
    a byte order mark and CRLF line ends; a blank line is not a record. The header is read when
    the reader is made (also from stdin), so the columns are known before the run."""

    def __init__(self, path: str, delimiter: str):
        self.path = path
        self.name = "stdin" if path == "-" else path
        if path == "-":
            self.stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", newline="")
        else:
            self.stream = open(path, encoding="utf-8-sig", newline="")
        self.reader = csv.reader(self.stream, delimiter=delimiter)
        try:
            header = self._next()
            while header is not None and not header:
                header = self._next()
        except InputError:
            self.close()
            raise
        if header is None:
            self.close()
            raise InputError(f"{self.name} is empty: CSV input starts with a header line naming its columns")
        duplicates = sorted({column for column in header if header.count(column) > 1})
        if duplicates:
            self.close()
            raise InputError(f"{self.name}: the header names column {duplicates[0]!r} more than once")
        self.header = header

    def _next(self):
        try:
            return next(self.reader, None)
        except UnicodeDecodeError as exc:
            raise InputError(f"{self.name} is not valid UTF-8: {exc.reason}") from None
        except csv.Error as exc:
            raise InputError(f"{self.name} line {self.reader.line_num}: {exc}") from None

    def __iter__(self) -> Iterator[dict]:
        header = self.header
        try:
            while True:
                row = self._next()
                if row is None:
                    return
                if not row:
                    continue
                if len(row) != len(header):
                    raise InputError(f"{self.name} record ending at line {self.reader.line_num} has {len(row)} "
                                     f"field(s); the header has {len(header)}")
                yield dict(zip(header, row))
        finally:
            self.close()

    def close(self) -> None:
        if self.stream is None:
            return
        if self.path == "-":
            self.stream.detach()  # stdin's buffer stays open
        else:
            self.stream.close()
        self.stream = None


def _count_file(path: str, input_format: str) -> int:
    """Items in a regular file. With JSON or CSV this also checks every record, so a bad one stops
    the run before any work rather than after the records before it."""
    if input_format == "json":
        return sum(1 for _ in _read_lines(path, True))
    if input_format in DELIMITERS:
        return sum(1 for _ in Records(path, DELIMITERS[input_format]))
    count = 0
    with open(path, "rb") as stream:
        for line in stream:
            count += bool(line.strip())
    return count


DELIMITERS = {"csv": ",", "tsv": "\t"}


def build_source(items: list[str] | None, input_path: str | None, range_text: str | None,
                 input_format: str = "text", lossless: bool = False) -> Source:
    """The items of a run. `input_format` is text, json, csv or tsv; `lossless` keeps bytes that
    are not UTF-8 in text items (for commands)."""
    given = [name for name, value in (("ITEMS", items), ("--input", input_path), ("--range", range_text))
             if value]
    if len(given) > 1:
        raise UsageError(f"give the items one way: {' and '.join(given)} were both given")
    if not given:
        raise UsageError("no input: give ITEMS, --input FILE (- for stdin) or --range N")
    delimiter = DELIMITERS.get(input_format)
    if delimiter is not None and not input_path:
        raise UsageError(f"--{input_format} reads records with a header from --input FILE (- for stdin)")
    if range_text:
        numbers = parse_range(range_text)
        return Source(numbers, len(numbers), {"range": [numbers.start, numbers.stop, numbers.step]})
    as_json = input_format == "json"
    if items:
        values = [_parse_json(text, f"item {k + 1} ({text!r})") for k, text in enumerate(items)] if as_json \
            else list(items)
        digest = hashlib.sha256(json.dumps(items).encode()).hexdigest()
        return Source(values, len(values), {"items": digest})
    if input_path != "-":
        if not os.path.exists(input_path):
            raise UsageError(f"input file {input_path!r} does not exist")
        if os.path.isdir(input_path):
            raise UsageError(f"input {input_path!r} is a directory, not a file")
    identity = {"input": "-" if input_path == "-" else os.path.abspath(input_path)}
    if delimiter is not None:
        identity[input_format] = True
        try:
            reader = Records(input_path, delimiter)
        except OSError as exc:
            raise UsageError(f"cannot read {input_path!r}: {exc.strerror}") from None
    else:
        reader = _read_lines(input_path, as_json, lossless)
    if input_path == "-":
        return Source(reader, None, identity)
    try:
        total = _count_file(input_path, input_format) if os.path.isfile(input_path) else None
    except OSError as exc:
        raise UsageError(f"cannot read {input_path!r}: {exc.strerror}") from None
    return Source(reader, total, identity)


class Sized:
    """An iterable with a known length, so the engine and auto mode know the total."""

    def __init__(self, iterable: Iterable, length: int):
        self.iterable = iterable
        self.length = length

    def __iter__(self):
        return iter(self.iterable)

    def __len__(self) -> int:
        return self.length
