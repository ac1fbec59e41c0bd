"""The options `run` and `bench` share, and turning the command line's words into values."""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Annotated, List, Optional

import typer

from ..options import FIELD_NAMES, Options
from .common import ON_ERROR_CHOICES, UsageError
from .target import load_target

TargetArg = Annotated[str, typer.Argument(metavar="TARGET", show_default=False,
                                          help="package.module:function or path/to/file.py:function")]
ItemsArg = Annotated[Optional[List[str]], typer.Argument(metavar="ITEMS", show_default=False,
                                                         help="items (strings, or JSON with --json)")]
InputOpt = Annotated[Optional[str], typer.Option("--input", "-i", metavar="FILE",
                                                 help="read items from FILE, one per line (- for stdin)")]
RangeOpt = Annotated[Optional[str], typer.Option("--range", metavar="N|START:STOP[:STEP]",
                                                 help="the integers of range(...)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="items and results are JSON, one per line")]
StarOpt = Annotated[bool, typer.Option("--star", help="call func(*array) / func(**object); "
                                                       "items are read as JSON")]
WorkersOpt = Annotated[Optional[str], typer.Option("--workers", "-j", metavar="N|adaptive",
                                                  help="number of workers, or adaptive: how many run at once "
                                                       "follows measured throughput (thread, greenlet, asyncio)")]
ChunksizeOpt = Annotated[Optional[int], typer.Option("--chunksize", help="items per task (default adaptive)")]
OptionOpt = Annotated[Optional[List[str]], typer.Option("--option", "-o", metavar="KEY=VALUE",
                                                        help="backend option; VALUE is parsed as JSON if it can be")]
GeventOpt = Annotated[bool, typer.Option("--gevent-patch",
                                         help="gevent.monkey.patch_all() before importing the function")]


def parse_backend_options(pairs: list[str]) -> dict:
    """`-o key=value` pairs; a value that parses as JSON is taken as that JSON value."""
    options = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"-o takes key=value, got {pair!r}")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


def api_options(*, backend: str, workers, chunksize, timeout, retries, backoff, on_error, option,
                seed=None, max_ahead_bytes: str | None = None) -> Options:
    """The API's options from the command line's words, checked by the API's own rules before
    anything is imported or written; a bad value is one line naming the flag."""
    if on_error not in ON_ERROR_CHOICES:
        raise UsageError(f"--on-error must be raise, skip or return, got {on_error!r}")
    try:
        return Options(backend=backend, workers=parse_workers(workers), chunksize=chunksize, timeout=timeout, retries=retries,
                       backoff=backoff, on_error="return" if on_error == "record" else on_error,
                       seed=seed, backend_options=parse_backend_options(option),
                       **({} if max_ahead_bytes is None else {"max_ahead_bytes": max_ahead_bytes}))
    except (TypeError, ValueError) as exc:
        raise UsageError(as_flags(str(exc))) from None


def with_user_code(options: Options, retry_on: list[str] | None, initializer: str | None,
                   initargs: tuple) -> Options:
    """`options` with the exception types and initializer the command names, imported now
    (after --gevent-patch, which must come before the user's imports)."""
    retry_types = parse_retry_on(retry_on)
    if retry_types is not None:
        options = replace(options, retry_on=retry_types)
    if initializer is not None:
        options = replace(options, initializer=load_target(initializer, what="initializer"), initargs=initargs)
    return options


def parse_workers(text: str | None) -> int | str | None:
    """`-j 4` or `-j adaptive`."""
    if text is None or text == "adaptive":
        return text
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--workers takes a whole number or 'adaptive', got {text!r}") from None


def as_flags(message: str) -> str:
    """An API message about an option (`workers must be ...`) as the command line says it."""
    name, space, rest = message.partition(" ")
    if space and name in FIELD_NAMES:
        return f"--{name.replace('_', '-')} {rest}"
    return message


def check_repeat(repeat: int) -> None:
    if repeat < 1:
        raise UsageError(f"--repeat must be at least 1, got {repeat}")


def parse_retry_on(names: list[str] | None) -> tuple | None:
    """`--retry-on` names: builtin exception names (`ValueError`) or `module:Name` /
    `path/file.py:Name`, repeated or comma-separated. None when not given (the API's default)."""
    import builtins
    wanted = [name.strip() for text in names or () for name in text.split(",") if name.strip()]
    if not wanted:
        return None
    types = []
    for name in wanted:
        found = load_target(name, what="exception") if ":" in name else getattr(builtins, name, None)
        if not (isinstance(found, type) and issubclass(found, BaseException)):
            raise UsageError(f"--retry-on {name!r} is not an exception type (give a builtin name such as "
                             "ValueError, or module:Name or path/to/file.py:Name)")
        types.append(found)
    return tuple(types)


def parse_initargs(text: str | None) -> tuple:
    if text is None:
        return ()
    try:
        values = json.loads(text)
    except (ValueError, RecursionError):
        values = None
    if not isinstance(values, list):
        raise UsageError(f"--initargs takes a JSON array, such as '[\"db.sqlite\", 5]', got {text!r}")
    return tuple(values)


def check_backend(name: str) -> None:
    """Unknown or unavailable backends are usage errors, found before any file is written."""
    if name == "auto":
        return
    from ..backends.base import resolve_backend_class
    try:
        cls = resolve_backend_class(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    reason = cls.unavailable_reason()
    if reason is not None:
        raise UsageError(f"backend {name!r} is unavailable: {reason}")


def gevent_patch() -> None:
    """gevent's monkey.patch_all(), before the user's module is imported. Only a program's
    entry point may patch; the library never does."""
    try:
        from gevent import monkey
    except ImportError:
        raise UsageError("--gevent-patch needs gevent: pip install gevent") from None
    monkey.patch_all()


class Halt:
    """`--halt [now,|soon,]fail=N` or `fail=N%`: stop once N items failed, or once N% of the items
    finished in this run failed (judged from the third finished item on). `now` (the default)
    stops at once and kills running commands; `soon` reads no further items and lets the ones
    already started finish."""

    MIN_FINISHED_FOR_PERCENT = 3

    def __init__(self, text: str):
        self.text = text
        when, comma, rule = text.partition(",")
        if not comma:
            when, rule = "now", text
        name, equals, value = rule.partition("=")
        percent = value.endswith("%")
        number = value[:-1] if percent else value
        if when not in ("now", "soon") or name != "fail" or not equals or not number.isdigit() \
                or int(number) < 1 or (percent and int(number) > 100):
            raise UsageError(f"--halt takes fail=N or fail=N% (optionally after now, or soon,), such as "
                             f"fail=5 or soon,fail=10%, got {text!r}")
        self.when = when
        self.count = None if percent else int(number)
        self.percent = int(number) if percent else None

    def reached(self, failed: int, finished: int) -> bool:
        if self.count is not None:
            return failed >= self.count
        return finished >= self.MIN_FINISHED_FOR_PERCENT and failed * 100 >= self.percent * finished

    def describe(self, failed: int, finished: int) -> str:
        if self.count is not None:
            return f"--halt {self.text}: {failed} item(s) failed"
        return f"--halt {self.text}: {failed} of {finished} finished item(s) failed"
