"""`pmap run`: map a function over the items, one result per line."""
from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from dataclasses import replace
from typing import Annotated, Iterator, List, Optional

import typer

from ..options import Options
from ..progress import is_terminal
from .common import EXIT_BROKEN_PIPE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, \
    InputError, UsageError, _error_exit, app
from .journal import Bits, Journal
from .options import (ChunksizeOpt, GeventOpt, InputOpt, ItemsArg, JsonOpt, OptionOpt, RangeOpt, StarOpt,
                      TargetArg, WorkersOpt, api_options, check_backend, gevent_patch, parse_initargs,
                      with_user_code)
from .output import Output, OutputFailed, _above, _silence_stdout, check_output_path, describe_failure, \
    render_failure, render_result
from .source import Sized, Source, build_source
from .target import for_backend, load_target, make_call


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so the run stops cleanly and the journal is flushed."""


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
    retry_on: Annotated[Optional[List[str]], typer.Option(
        "--retry-on", metavar="EXCEPTION[,...]",
        help="retry only these exceptions: builtin names (ValueError) or module:Name / file.py:Name "
             "[default: any Exception]", show_default=False)] = None,
    backoff: Annotated[float, typer.Option("--backoff", help="seconds before the first retry, "
                                                             "doubling each attempt")] = 0.0,
    on_error: Annotated[str, typer.Option("--on-error", metavar="raise|skip|return",
                                          help="stop at the first failure, leave failed items out, "
                                               "or write each failure as a JSON object in its place "
                                               "(`record` is an alias of return)")] = "raise",
    initializer: Annotated[Optional[str], typer.Option(
        "--initializer", metavar="MODULE:FUNC", help="run once in each worker before its first item "
                                                     "(module:func or path/to/file.py:func)")] = None,
    initargs: Annotated[Optional[str], typer.Option("--initargs", metavar="JSON_ARRAY",
                                                    help="arguments of --initializer, as a JSON array")] = None,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress",
                                                     help="progress on stderr: a bar on a terminal, a line "
                                                          "every few seconds otherwise [default: when stderr "
                                                          "is a terminal]", show_default=False)] = None,
    desc: Annotated[Optional[str], typer.Option("--desc", metavar="TEXT",
                                                help="the progress bar's label [default: TARGET]",
                                                show_default=False)] = None,
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
        code = _run(target, items=items, input_path=input_path, range_text=range_text, as_json=as_json,
                    star=star, unordered=unordered, with_index=with_index, output_path=output_path,
                    backend=backend, workers=workers, chunksize=chunksize, timeout=timeout, retries=retries,
                    retry_on=retry_on, backoff=backoff, on_error=on_error, initializer=initializer,
                    initargs=initargs, progress=progress, desc=desc, explain=explain,
                    journal_path=journal_path, option=option, gevent=gevent)
    except UsageError as exc:
        raise _error_exit(str(exc)) from None
    raise typer.Exit(code)


def _run(target, *, items, input_path, range_text, as_json, star, unordered, with_index, output_path, backend,
         workers, chunksize, timeout, retries, retry_on, backoff, on_error, initializer, initargs, progress,
         desc, explain, journal_path, option, gevent) -> int:
    # Everything that can be wrong with the command is checked before a file is written.
    options = api_options(backend=backend, workers=workers, chunksize=chunksize, timeout=timeout,
                          retries=retries, backoff=backoff, on_error=on_error, option=option)
    check_backend(backend)
    init_arguments = parse_initargs(initargs)
    if init_arguments and initializer is None:
        raise UsageError("--initargs needs --initializer")
    check_output_path(output_path, input_path, journal_path)
    source = build_source(items, input_path, range_text, as_json or star)
    if gevent:
        gevent_patch()
    render = functools.partial(render_result, as_json=as_json, with_index=with_index)
    func = make_call(for_backend(load_target(target), backend), star, indexed=True, render=render)
    if explain:
        return _explain(func, source, options)
    options = with_user_code(options, retry_on, initializer, init_arguments)

    journal = None
    if journal_path:
        identity = {"target": target, "input": source.identity, "json": as_json, "star": star,
                    "with_index": with_index, "ordered": not unordered}
        journal = Journal(journal_path, identity, ordered=not unordered, total=source.total)
        journal.open()
    try:
        output = Output(output_path)
    except UsageError:
        if journal is not None:
            journal.close()
        raise
    try:
        return _stream(func, source, journal, output, replace(options, ordered=not unordered),
                       progress=progress, label=target if desc is None else desc)
    finally:
        if journal is not None:
            journal.close()
        output.close()


def _explain(func, source: Source, options: Options) -> int:
    import pmap
    pairs = enumerate(source.items)
    items = Sized(pairs, source.total) if source.total is not None else pairs
    backend = options.backend
    try:
        plan = pmap.explain(func, items, workers=options.workers, timeout=options.timeout, retries=options.retries)
    except InputError as exc:
        raise UsageError(str(exc)) from None
    typer.echo(str(plan))
    if backend != "auto":
        typer.echo(f"note: --backend {backend} was given, so a run would use {backend}, not this plan")
    return 0


def _replay(journal: Journal, output: Output, on_error: str) -> tuple[int, bool]:
    """Write the journaled part of the output again, in full: (failures, whether to stop)."""
    failed = 0
    for entry in journal.replay():
        if "error" not in entry:
            output.line(entry["out"])
            continue
        failed += 1
        if on_error == "return":
            output.line(entry["record"])
        elif on_error == "raise":
            typer.echo(f"pmap: {entry['error']} (journaled by an earlier run; delete the journal "
                       "to run it again)", err=True)
            return failed, True
    return failed, False


def _stream(func, source: Source, journal: Journal | None, output: Output, options: Options, *, progress,
            label) -> int:
    """Run and write: the API returns every failure (on_error="return") and this applies the
    command's --on-error itself, so a failure is reported, journaled and written in its place."""
    from ..api import imap_with_options
    on_error = options.on_error
    from ..errors import Failure, PmapError
    failed = 0
    done = journal.done if journal is not None else Bits()

    def pending() -> Iterator:
        for index, item in enumerate(source.items):
            if index not in done:
                yield index, item

    remaining = None if source.total is None else max(0, source.total - len(done))
    pairs = pending() if remaining is None else Sized(pending(), remaining)
    bar = callback = None
    if progress is None:
        progress = is_terminal(sys.stderr)

    previous_sigterm = _catch_sigterm()
    results = None
    got_result = False
    try:
        if journal is not None:
            failed, stop = _replay(journal, output, on_error)
            if stop:
                return EXIT_FAILED
        if progress:
            from ..progress import ProgressBar
            already = len(done)
            bar = ProgressBar(label, total=source.total, initial=already)  # drawn now: its clock starts with the run
            output.share_terminal_with(bar)

            def advance_bar(count, _total):
                bar(already + count, source.total)
            callback = advance_bar
        results = imap_with_options(func, pairs, replace(options, on_error="return", progress=callback or False))
        if bar is not None:
            bar.stats = results.stats
            if options.backend != "auto":  # its workers are started: the ticker may run
                bar.start_ticker()
        for value in results:
            got_result = True
            if type(value) is tuple:
                index, line = value
                if journal is not None:  # journal first: a line written out is never missing from it
                    journal.record(index, line)
                output.line(line)
                continue
            if not isinstance(value, Failure):  # pragma: no cover - the wrapper always returns a pair
                raise RuntimeError(f"unexpected result {value!r}")
            index, item = value.item
            message = describe_failure(index, item, value)
            if on_error == "raise":
                with _above(bar):
                    if value.traceback:
                        sys.stderr.write(value.traceback)
                    typer.echo(f"pmap: {message}\npmap: stopped at the first failure "
                               "(--on-error skip or return goes on past failed items)", err=True)
                return EXIT_FAILED
            failed += 1
            with _above(bar):
                typer.echo(f"pmap: {message}", err=True)
            record = render_failure(index, item, value)
            if journal is not None:
                journal.record(index, None, error=message, record=record)
            if on_error == "return":
                output.line(record)
    except (TypeError, ValueError, PmapError) as exc:
        if got_result and not isinstance(exc, PmapError):
            raise  # not from checking the arguments or preparing the backend: a bug, keep its traceback
        raise UsageError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    except ModuleNotFoundError as exc:
        if exc.name != "pmap.auto":
            raise
        raise UsageError("backend 'auto' is not available in this build; pass --backend") from None
    except (InputError, OutputFailed) as exc:
        with _above(bar):
            typer.echo(f"pmap: error: {exc}", err=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        with _above(bar):
            typer.echo("pmap: interrupted", err=True)
        return EXIT_INTERRUPTED
    except _Terminated:
        with _above(bar):
            typer.echo("pmap: terminated", err=True)
        return EXIT_TERMINATED
    except BrokenPipeError:
        # Whoever read our output is gone; stop quietly, as `yes | head` does.
        _silence_stdout()
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
