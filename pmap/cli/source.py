"""Where the items come from: arguments, a file or stdin (one per line), or `--range`."""
from __future__ import annotations

import hashlib
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


def _lines(stream, name: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, without its line ending."""
    for number, raw in enumerate(stream, 1):
        if raw.endswith(b"\n"):
            raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{name} line {number} is not valid UTF-8: {exc.reason}") from None


def _read_lines(path: str, as_json: bool) -> Iterator:
    """Items of a file or stdin, one per line; with JSON, blank lines are skipped."""
    name = "stdin" if path == "-" else path
    stream = sys.stdin.buffer if path == "-" else open(path, "rb")
    try:
        for number, text in _lines(stream, name):
            if not as_json:
                yield text
            elif text.strip():
                yield _parse_json(text, f"{name} line {number}")
    finally:
        if path != "-":
            stream.close()


def _count_file(path: str, as_json: bool) -> int:
    """Items in a regular file. With JSON this also checks every line, so a bad one stops
    the run before any work rather than after the lines before it."""
    if as_json:
        return sum(1 for _ in _read_lines(path, True))
    count, last = 0, b"\n"
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def build_source(items: list[str] | None, input_path: str | None, range_text: str | None,
                 as_json: bool) -> Source:
    given = [name for name, value in (("ITEMS", items), ("--input", input_path), ("--range", range_text))
             if value]
    if len(given) > 1:
        raise UsageError(f"give the items one way: {' and '.join(given)} were both given")
    if not given:
        raise UsageError("no input: give ITEMS, --input FILE (- for stdin) or --range N")
    if range_text:
        numbers = parse_range(range_text)
        return Source(numbers, len(numbers), {"range": [numbers.start, numbers.stop, numbers.step]})
    if items:
        values = [_parse_json(text, f"item {k + 1} ({text!r})") for k, text in enumerate(items)] if as_json \
            else list(items)
        digest = hashlib.sha256(json.dumps(items).encode()).hexdigest()
        return Source(values, len(values), {"items": digest})
    if input_path == "-":
        return Source(_read_lines("-", as_json), None, {"input": "-"})
    if not os.path.exists(input_path):
        raise UsageError(f"input file {input_path!r} does not exist")
    if os.path.isdir(input_path):
        raise UsageError(f"input {input_path!r} is a directory, not a file")
    try:
        total = _count_file(input_path, as_json) if os.path.isfile(input_path) else None
    except OSError as exc:
        raise UsageError(f"cannot read {input_path!r}: {exc.strerror}") from None
    return Source(_read_lines(input_path, as_json), total, {"input": os.path.abspath(input_path)})


class Sized:
    """An iterable with a known length, so the engine and auto mode know the total."""

    def __init__(self, iterable: Iterable, length: int):
        self.iterable = iterable
        self.length = length

    def __iter__(self):
        return iter(self.iterable)

    def __len__(self) -> int:
        return self.length
