"""The `pmap` command line (typer): `run`, `bench`, `backends`, `worker`.

Exit status of `pmap run` and `pmap bench`: 0 all items ok (bench: all backends agree);
1 some items failed (bench: a backend disagreed or failed); 2 bad usage or input, with a
one-line message and no traceback; 130 Ctrl-C; 141 the reader of stdout went away; 143 SIGTERM.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, is_dataclass
from typing import Annotated, Callable, Iterable, Iterator, List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="Run a Python function over many inputs in parallel.")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
EXIT_TERMINATED = 143
ON_ERROR_CHOICES = ("raise", "skip", "record")


class UsageError(Exception):
    """Bad usage or input: reported as one line, exit status 2."""


class InputError(UsageError):
    """A bad input line, found while reading; raised through the run after the results before it."""


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so the run stops cleanly and the journal is flushed."""


def _error_exit(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    typer.echo(f"pmap: error: {message}", err=True)
    return typer.Exit(code)


# ---- the function to run --------------------------------------------------------------
def _on_path(directory: str) -> None:
    """Make `directory` importable here and in worker processes started later (spawn, forkserver)."""
    if directory not in sys.path:
        sys.path.insert(0, directory)
    parts = os.environ.get("PYTHONPATH", "").split(os.pathsep) if os.environ.get("PYTHONPATH") else []
    if directory not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([directory] + parts)


def _describe_exception(exc: BaseException) -> str:
    """`Type: message`, plus where it was raised (SyntaxError already says where)."""
    text = f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, SyntaxError):
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            text += f" ({os.path.basename(tb.tb_frame.f_code.co_filename)}, line {tb.tb_lineno})"
    return text


def _import_module(name: str):
    _on_path(os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise UsageError(f"no module named {name!r} (looked in the current directory and on "
                             "sys.path; set PYTHONPATH to add a directory)") from None
        raise UsageError(f"importing {name!r} failed: {_describe_exception(exc)}") from None
    except (Exception, SystemExit) as exc:
        raise UsageError(f"importing {name!r} failed: {_describe_exception(exc)}") from None


def _import_file(path: str):
    if not os.path.isfile(path):
        raise UsageError(f"no such file: {path}")
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    _on_path(directory)  # so the file can import its neighbours, here and in workers
    stem = os.path.splitext(os.path.basename(path))[0]
    # Import it under its own name, so process workers import it the same way; a name that
    # would clash gets a private one, and then the function travels by value (cloudpickle).
    by_value = (not stem.isidentifier() or stem in sys.modules
                or stem in getattr(sys, "stdlib_module_names", ()))
    name = f"_pmap_target_{abs(hash(path)):x}_{stem}" if by_value else stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        raise UsageError(f"importing {os.path.basename(path)} failed: {_describe_exception(exc)}") from None
    if by_value:
        import cloudpickle
        cloudpickle.register_pickle_by_value(module)
    return module


def load_target(target: str) -> Callable:
    """The function named by `package.module:function` or `path/to/file.py:function`."""
    module_part, sep, attribute = target.rpartition(":")
    if not sep or not module_part or not attribute:
        raise UsageError(f"target {target!r} must be MODULE:FUNCTION or path/to/file.py:FUNCTION")
    if module_part.endswith(".py") or "/" in module_part or os.sep in module_part:
        module = _import_file(module_part)
    else:
        module = _import_module(module_part)
    obj = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            known = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
            import difflib
            close = difflib.get_close_matches(attribute, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            where = module_part if module_part.endswith(".py") else f"module {module_part!r}"
            raise UsageError(f"{where} has no function {attribute!r}{hint}") from None
    if not callable(obj):
        raise UsageError(f"{target} is not callable (it is a {type(obj).__name__})")
    return obj


class Call:
    """Applies the user's function to one item: a JSON array is spread as positional
    arguments and an object as keyword arguments when `star` is set. With `indexed`,
    items arrive as (index, item) and results leave as (index, result), so the index
    survives unordered output, skipped failures and resumed runs."""

    __slots__ = ("func", "star", "indexed")

    def __init__(self, func: Callable, star: bool = False, indexed: bool = False):
        self.func = func
        self.star = star
        self.indexed = indexed

    def __reduce__(self):
        return (type(self), (self.func, self.star, self.indexed))

    def _apply(self, item):
        if self.star:
            if isinstance(item, (list, tuple)):
                return self.func(*item)
            if isinstance(item, dict):
                return self.func(**item)
        return self.func(item)

    def __call__(self, item):
        if self.indexed:
            index, item = item
            return index, self._apply(item)
        return self._apply(item)


class AsyncCall(Call):
    """`Call` for an `async def` function, so backends still see a coroutine function."""

    __slots__ = ()

    async def __call__(self, item):
        if self.indexed:
            index, item = item
            return index, await self._apply(item)
        return await self._apply(item)


def make_call(func: Callable, star: bool, indexed: bool) -> Callable:
    from ._worker import is_async
    return (AsyncCall if is_async(func) else Call)(func, star, indexed)


# ---- input ----------------------------------------------------------------------------
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
    return range(*numbers)


def _parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        column = f" (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise InputError(f"{where} is not valid JSON: {message}{column}") from None


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


# ---- options --------------------------------------------------------------------------
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


def check_numbers(workers=None, chunksize=None, timeout=None, retries=None, repeat=None) -> None:
    for flag, value in (("--workers", workers), ("--chunksize", chunksize), ("--repeat", repeat)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if retries is not None and retries < 0:
        raise UsageError(f"--retries must be 0 or more, got {retries}")
    if timeout is not None and not timeout > 0:
        raise UsageError(f"--timeout must be a positive number of seconds, got {timeout:g}")
    if timeout is not None and chunksize is not None and chunksize > 1:
        raise UsageError("--timeout is per item, so it needs --chunksize 1 (or none)")


def check_backend(name: str) -> None:
    """Unknown or unavailable backends are usage errors, found before any file is written."""
    if name == "auto":
        return
    from .backends.base import resolve_backend_class
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


# ---- output ---------------------------------------------------------------------------
def _json_fallback(obj):
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    return str(obj)


def to_json(value) -> str:
    return json.dumps(value, ensure_ascii=False, default=_json_fallback)


def render_result(index: int, result, as_json: bool, with_index: bool) -> str:
    if as_json:
        return to_json({"index": index, "result": result} if with_index else result)
    return f"{index}\t{result}" if with_index else str(result)


def render_failure(index: int, item, failure) -> str:
    """What `--on-error record` writes in the failed item's place: always a JSON object."""
    exc = failure.exception
    return to_json({"index": index, "item": item,
                    "error": {"type": type(exc).__name__, "message": str(exc), "kind": failure.kind}})


def describe_failure(index: int, item, failure) -> str:
    from .errors import short_repr
    exc = failure.exception
    return f"item {index} ({short_repr(item)}) failed: {type(exc).__name__}: {exc}"


class Output:
    """Result lines to stdout or a file, each flushed at once so readers see results as they come.
    Looks stdout up on every write: a progress bar may redirect it to print above the bar."""

    def __init__(self, path: str | None):
        self.path = path
        self.file = None
        if path is not None:
            try:
                self.file = open(path, "w", encoding="utf-8")
            except OSError as exc:
                raise UsageError(f"cannot write {path!r}: {exc.strerror}") from None

    def line(self, text: str) -> None:
        stream = self.file if self.file is not None else sys.stdout
        stream.write(text + "\n")
        stream.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ---- the journal ----------------------------------------------------------------------
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

    def __init__(self, path: str, command: dict, ordered: bool):
        self.path = path
        self.command = command
        self.ordered = ordered
        self.done = Bits()
        self.failed = 0
        self.entries = 0
        self.buffer: list[bytes] = []
        self.last_flush = time.monotonic()
        self.fd: int | None = None

    def open(self) -> None:
        """Read what an earlier run left (checking it is this command's), then open to append."""
        good_end = 0
        try:
            with open(self.path, "rb") as stream:
                good_end = self._scan(stream)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise UsageError(f"journal {self.path!r} is a directory") from None
        except OSError as exc:
            raise UsageError(f"cannot read journal {self.path!r}: {exc.strerror}") from None
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot write journal {self.path!r}: {exc.strerror}") from None
        os.ftruncate(self.fd, good_end)
        if good_end == 0:
            header = {"pmap_journal": self.VERSION, "command": self.command}
            os.write(self.fd, (json.dumps(header) + "\n").encode())

    def _scan(self, stream) -> int:
        """Check the header and entries; return the offset just after the last whole entry."""
        header_line = stream.readline()
        if not header_line.endswith(b"\n"):
            return 0  # empty, or killed while writing the header: start afresh
        try:
            header = json.loads(header_line)
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("pmap_journal") != self.VERSION:
            raise UsageError(f"{self.path!r} is not a pmap journal; pick another file")
        theirs = header.get("command", {})
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
                index = entry["i"]
                ok = isinstance(index, int) and index >= 0 and index not in self.done
            except (ValueError, KeyError, TypeError):
                ok = False
            if ok and self.ordered and index != self.entries:
                ok = False  # ordered runs journal in input order: a gap means damage
            if not ok:
                raise UsageError(f"journal {self.path!r} is damaged at line {number}; delete it to start over")
            self.done.add(index)
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


# ---- pmap run -------------------------------------------------------------------------
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
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", "-j", help="number of workers")]
ChunksizeOpt = Annotated[Optional[int], typer.Option("--chunksize", help="items per task (default adaptive)")]
OptionOpt = Annotated[Optional[List[str]], typer.Option("--option", "-o", metavar="KEY=VALUE",
                                                        help="backend option; VALUE is parsed as JSON if it can be")]
GeventOpt = Annotated[bool, typer.Option("--gevent-patch",
                                         help="gevent.monkey.patch_all() before importing the function")]


@app.command("run")
def run_command(
    target: TargetArg,
    items: ItemsArg = None,
    input_path: InputOpt = None,
    range_text: RangeOpt = None,
    as_json: JsonOpt = False,
    star: StarOpt = False,
    unordered: Annotated[bool, typer.Option("--unordered", help="write results as they finish")] = False,
    with_index: Annotated[bool, typer.Option("--with-index", help="write each result with its item's index")] = False,
    output_path: Annotated[Optional[str], typer.Option("--output", metavar="FILE",
                                                       help="write results to FILE instead of stdout")] = None,
    backend: Annotated[str, typer.Option("--backend", "-b", help="backend name, or auto")] = "auto",
    workers: WorkersOpt = None,
    chunksize: ChunksizeOpt = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="seconds per item")] = None,
    retries: Annotated[int, typer.Option("--retries", help="re-runs of an item that failed")] = 0,
    on_error: Annotated[str, typer.Option("--on-error", metavar="raise|skip|record",
                                          help="stop at the first failure, leave failed items out, "
                                               "or write each failure as a JSON object")] = "raise",
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress",
                                                     help="progress bar on stderr [default: when stderr "
                                                          "is a terminal]", show_default=False)] = None,
    explain: Annotated[bool, typer.Option("--explain", help="print what auto mode would choose and why, "
                                                            "from a probe of the first items, and exit")] = False,
    journal_path: Annotated[Optional[str], typer.Option("--journal", metavar="FILE",
                                                        help="record finished items; run the same command "
                                                             "again to resume")] = None,
    option: OptionOpt = None,
    gevent: GeventOpt = False,
) -> None:
    """Map TARGET over the items: one result per line, in input order."""
    try:
        code = _run(target, items, input_path, range_text, as_json, star, unordered, with_index, output_path,
                    backend, workers, chunksize, timeout, retries, on_error, progress, explain, journal_path,
                    option, gevent)
    except UsageError as exc:
        raise _error_exit(str(exc)) from None
    raise typer.Exit(code)


def _run(target, items, input_path, range_text, as_json, star, unordered, with_index, output_path, backend,
         workers, chunksize, timeout, retries, on_error, progress, explain, journal_path, option, gevent) -> int:
    # Everything that can be wrong with the command is checked before a file is written.
    check_numbers(workers=workers, chunksize=chunksize, timeout=timeout, retries=retries)
    if on_error not in ON_ERROR_CHOICES:
        raise UsageError(f"--on-error must be raise, skip or record, got {on_error!r}")
    check_backend(backend)
    backend_options = parse_backend_options(option)
    if journal_path and output_path and os.path.abspath(journal_path) == os.path.abspath(output_path):
        raise UsageError("--journal and --output must be different files")
    source = build_source(items, input_path, range_text, as_json or star)
    if gevent:
        gevent_patch()
    func = make_call(load_target(target), star, indexed=True)

    if explain:
        return _explain(func, source, backend, workers, timeout, retries)

    journal = None
    if journal_path:
        identity = {"target": target, "input": source.identity, "json": as_json, "star": star,
                    "with_index": with_index, "ordered": not unordered}
        journal = Journal(journal_path, identity, ordered=not unordered)
        journal.open()
    output = Output(output_path)
    try:
        return _stream(func, source, journal, output, as_json=as_json, with_index=with_index,
                       ordered=not unordered, on_error=on_error, progress=progress,
                       options=dict(backend=backend, workers=workers, chunksize=chunksize, timeout=timeout,
                                    retries=retries, **backend_options))
    finally:
        if journal is not None:
            journal.close()
        output.close()


def _explain(func, source: Source, backend: str, workers, timeout, retries) -> int:
    import pmap
    pairs = enumerate(source.items)
    items = Sized(pairs, source.total) if source.total is not None else pairs
    try:
        plan = pmap.explain(func, items, workers=workers, timeout=timeout, retries=retries)
    except InputError as exc:
        raise UsageError(str(exc)) from None
    typer.echo(str(plan))
    if backend != "auto":
        typer.echo(f"note: --backend {backend} was given, so a run would use {backend}, not this plan")
    return 0


def _stream(func, source: Source, journal: Journal | None, output: Output, *, as_json, with_index, ordered,
            on_error, progress, options) -> int:
    import pmap
    from .errors import Failure, PmapError
    failed = 0
    done = journal.done if journal is not None else Bits()

    def pending() -> Iterator:
        for index, item in enumerate(source.items):
            if index not in done:
                yield index, item

    remaining = None if source.total is None else max(0, source.total - len(done))
    pairs = pending() if remaining is None else Sized(pending(), remaining)
    bar = None
    if progress is None:
        progress = sys.stderr.isatty()
    if progress:
        from .progress import ProgressBar
        bar = ProgressBar("pmap run")
        already = len(done)

        def progress(count, _total):
            bar(already + count, source.total)

    previous_sigterm = _catch_sigterm()
    results = None
    try:
        if journal is not None:  # the journaled part of the output, written again in full
            for entry in journal.replay():
                if "error" not in entry:
                    output.line(entry["out"])
                    continue
                failed += 1
                if on_error == "record":
                    output.line(entry["record"])
                elif on_error == "raise":
                    typer.echo(f"pmap: {entry['error']} (journaled by an earlier run; delete the journal "
                               "to run it again)", err=True)
                    return EXIT_FAILED
        results = pmap.imap(func, pairs, ordered=ordered, on_error="return", progress=progress or False,
                            **options)
        if bar is not None:
            bar.stats = results.stats
        for value in results:
            if type(value) is tuple:
                index, result = value
                line = render_result(index, result, as_json, with_index)
                if journal is not None:  # journal first: a line written out is never missing from it
                    journal.record(index, line)
                output.line(line)
                continue
            if not isinstance(value, Failure):  # pragma: no cover - the wrapper always returns a pair
                raise RuntimeError(f"unexpected result {value!r}")
            index, item = value.item
            message = describe_failure(index, item, value)
            if on_error == "raise":
                if value.traceback:
                    sys.stderr.write(value.traceback)
                typer.echo(f"pmap: {message}\npmap: stopped at the first failure "
                           "(--on-error skip or record goes on past failed items)", err=True)
                return EXIT_FAILED
            failed += 1
            typer.echo(f"pmap: {message}", err=True)
            record = render_failure(index, item, value)
            if journal is not None:
                journal.record(index, None, error=message, record=record)
            if on_error == "record":
                output.line(record)
    except (TypeError, ValueError, PmapError) as exc:
        if results is not None and not isinstance(exc, PmapError):
            raise  # not from checking the arguments: a bug, keep its traceback
        raise UsageError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    except ModuleNotFoundError as exc:
        if exc.name != "pmap.auto":
            raise
        raise UsageError("backend 'auto' is not available in this build; pass --backend") from None
    except InputError as exc:
        typer.echo(f"pmap: error: {exc}", err=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        typer.echo("pmap: interrupted", err=True)
        return EXIT_INTERRUPTED
    except _Terminated:
        typer.echo("pmap: terminated", err=True)
        return EXIT_TERMINATED
    except BrokenPipeError:
        # Whoever read our output is gone; stop quietly, as `yes | head` does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    finally:
        if results is not None:
            results.close()
        if bar is not None:
            bar.close()
        _restore_sigterm(previous_sigterm)
    if failed:
        typer.echo(f"pmap: {failed} item(s) failed", err=True)
        return EXIT_FAILED
    return 0


def _catch_sigterm():
    if threading.current_thread() is not threading.main_thread():
        return None

    owner = os.getpid()

    def on_sigterm(signum, frame):
        if os.getpid() != owner:  # a forked worker inherited this handler: die as by default
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise _Terminated()
    return signal.signal(signal.SIGTERM, on_sigterm)


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


# ---- pmap bench -----------------------------------------------------------------------
@app.command("bench")
def bench_command(
    target: TargetArg,
    items: ItemsArg = None,
    input_path: InputOpt = None,
    range_text: RangeOpt = None,
    as_json: JsonOpt = False,
    star: StarOpt = False,
    backends: Annotated[Optional[str], typer.Option("--backends", metavar="A,B,...",
                                                    help="backends to time (default: every local one); "
                                                         "serial always runs as the reference")] = None,
    repeat: Annotated[int, typer.Option("--repeat", "-r", help="runs per backend; the median is shown")] = 1,
    unordered: Annotated[bool, typer.Option("--unordered", help="run unordered; compare results as multisets")] = False,
    workers: WorkersOpt = None,
    chunksize: ChunksizeOpt = None,
    option: OptionOpt = None,
    gevent: GeventOpt = False,
) -> None:
    """Time TARGET on several backends; check the results agree."""
    try:
        code = _bench(target, items, input_path, range_text, as_json, star, backends, repeat, unordered,
                      workers, chunksize, option, gevent)
    except UsageError as exc:
        raise _error_exit(str(exc)) from None
    except KeyboardInterrupt:
        typer.echo("pmap: interrupted", err=True)
        code = EXIT_INTERRUPTED
    raise typer.Exit(code)


def _bench(target, items, input_path, range_text, as_json, star, backends, repeat, unordered, workers,
           chunksize, option, gevent) -> int:
    from .comparison import compare
    check_numbers(workers=workers, chunksize=chunksize, repeat=repeat)
    names = None
    if backends is not None:
        names = [name.strip() for name in backends.split(",") if name.strip()]
        if not names:
            raise UsageError("--backends needs at least one name")
        from .backends.base import resolve_backend_class
        for name in names:
            if name != "auto":
                try:
                    resolve_backend_class(name)
                except ValueError as exc:
                    raise UsageError(str(exc)) from None
    backend_options = parse_backend_options(option)
    source = build_source(items, input_path, range_text, as_json or star)
    if gevent:
        gevent_patch()
    func = load_target(target)
    if star:
        func = make_call(func, star=True, indexed=False)
    try:
        values = list(source.items)
    except InputError as exc:
        raise UsageError(str(exc)) from None
    options = {k: v for k, v in (("workers", workers), ("chunksize", chunksize)) if v is not None}
    comparison = compare(func, values, names, repeat=repeat, ordered=not unordered, check=False,
                         **options, **backend_options)
    typer.echo(str(comparison))
    return 0 if comparison.ok else EXIT_FAILED


# ---- pmap backends --------------------------------------------------------------------
@app.command("backends")
def backends_command() -> None:
    """List the backends, which run here (or why not), and guarantees."""
    from . import backends
    header = ("backend", "kind", "available", "workers", "guarantees")
    rows = [header]
    for info in backends():
        notes = info.guarantees if info.available else f"unavailable: {info.reason}"
        rows.append((info.name, info.kind, "yes" if info.available else "no",
                     str(info.default_workers or "-"), notes))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        typer.echo("  ".join([cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]))


@app.command("worker")
def worker_command(
    address: str = typer.Argument(..., help="HOST:PORT of a run using backend='manager'"),
    authkey_file: str = typer.Option(..., "--authkey-file", help="file holding the run's authkey"),
    processes: int = typer.Option(1, "--processes", min=1, help="worker processes on this host"),
) -> None:
    """Join a manager run from this host and work until the driver ends."""
    from .backends.manager import run_worker
    raise typer.Exit(run_worker(address, authkey_file, processes))


@app.callback()
def main_callback() -> None:
    pass


def main() -> None:
    app()
