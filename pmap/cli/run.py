"""`pmap run`: map a function over the items, or run a command per item; one result per line."""
from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass, replace
from typing import Annotated, Iterator, List, Optional

import typer

from ..options import Options
from ..progress import is_terminal
from .command import CommandFailed, CommandRunner, Template, allow_commands, kill_running_commands
from .common import EXIT_BROKEN_PIPE, EXIT_FAILED, EXIT_HALTED, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, \
    InputError, UsageError, _error_exit, app
from .complete import complete_backend, complete_format, complete_target
from .joblog import JobLog
from .journal import Bits, Journal
from .options import (ChunksizeOpt, GeventOpt, Halt, InputOpt, ItemsArg, JsonOpt, OptionOpt, RangeOpt, StarOpt,
                      WorkersOpt, api_options, check_backend, gevent_patch, parse_initargs, with_user_code)
from .output import Output, OutputFailed, Renderer, _above, _silence_stdout, check_output_path, \
    describe_failure, render_failure
from .source import DELIMITERS, Sized, Source, build_source
from .target import for_backend, load_target, make_call

FORMATS = ("text", "json", "csv", "tsv")
DRY_RUN_SHOWN = 10
EXPLAIN_READ_AHEAD = 100_000   # items of a stream --explain reads to count them, at most

RUN_HELP = """Map TARGET over the items, or run a shell command per item (--cmd).

\b
Examples:
  pmap run score.py:score -i names.txt         # a Python function per line of a file
  pmap run --cmd 'gzip -9 {}' logs/*.txt       # a command per file; {} is the item, quoted
  pmap run --csv -i people.csv --cmd 'mail -s hi {email} < {name}.txt'  # CSV: {column}
  pmap run fetch.py:get -i urls.txt --journal urls.journal --joblog urls.tsv
                                               # run it again to resume: failed items rerun
  pmap run fit.py:fit --range 100 -b manager -o address=0.0.0.0:7000 -o authkey_file=key
                                               # a cluster: hosts join with `pmap worker`

Items come from ITEMS, --input FILE (one per line; - for stdin; blank lines are not items),
--csv/--tsv records (dicts keyed by the header) or --range. Results go to stdout in input order:
one line each (a command's stdout as it printed it), JSON when the input is JSON, CSV when it is
CSV (--to chooses). Placeholders of --cmd: {} {.} {/} {//} {/.} {#} and, for records, {name}
and {1} {2}...; every value is quoted as one shell word. Exit status: 0 all ok, 1 some items
failed, 2 bad usage or input, 3 stopped by --halt, 130 Ctrl-C."""


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so the run stops cleanly and the journal is flushed."""


@dataclass
class Plan:
    """What the command line asks for, checked, before anything runs or is written."""

    func: object
    source: Source
    options: Options
    label: str
    renderer: Renderer
    on_error: str
    halt: Halt | None
    template: Template | None
    identity: dict


@app.command("run", help=RUN_HELP)
def run_command(
    target: Annotated[Optional[str], typer.Argument(
        metavar="TARGET", show_default=False, autocompletion=complete_target,
        help="package.module:function or path/to/file.py:function (not with --cmd)")] = None,
    items: ItemsArg = None,
    command: Annotated[Optional[str], typer.Option(
        "--cmd", metavar="TEMPLATE", help="run this shell command per item instead of a function; "
                                          "placeholders as GNU parallel's")] = None,
    input_path: InputOpt = None,
    range_text: RangeOpt = None,
    as_json: JsonOpt = False,
    star: StarOpt = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="items are CSV records with a header, read as dicts; "
                                                        "results are written as CSV")] = False,
    as_tsv: Annotated[bool, typer.Option("--tsv", help="as --csv, with tabs between fields")] = False,
    to_format: Annotated[Optional[str], typer.Option(
        "--to", metavar="text|json|csv|tsv", autocompletion=complete_format,
        help="the results' format [default: the input's: JSON in, JSON out; CSV in, CSV out]",
        show_default=False)] = None,
    unordered: Annotated[bool, typer.Option("--unordered", help="write results as they finish")] = False,
    with_index: Annotated[bool, typer.Option("--with-index", help="write each result with its item's index")] = False,
    tag: Annotated[bool, typer.Option("--tag", help="start each output line with its item and a tab")] = False,
    output_path: Annotated[Optional[str], typer.Option("--output", metavar="FILE",
                                                       help="write results to FILE instead of stdout")] = None,
    backend: Annotated[Optional[str], typer.Option(
        "--backend", "-b", autocompletion=complete_backend,
        help="backend name, or auto [default: auto; thread with --cmd]", show_default=False)] = None,
    workers: WorkersOpt = None,
    chunksize: ChunksizeOpt = None,
    max_ahead_bytes: Annotated[Optional[str], typer.Option(
        "--max-ahead-bytes", metavar="SIZE",
        help="most bytes of items in flight and results not yet written, before more input is read: "
             "a number of bytes or a size such as 256MB or 1GiB [default: 64MiB]", show_default=False)] = None,
    timeout: Annotated[Optional[float], typer.Option(
        "--timeout", help="seconds per item (per try); a command's whole process group is killed")] = None,
    retries: Annotated[int, typer.Option("--retries", help="re-runs of an item that failed")] = 0,
    retry_on: Annotated[Optional[List[str]], typer.Option(
        "--retry-on", metavar="EXCEPTION[,...]",
        help="retry only these exceptions: builtin names (ValueError) or module:Name / file.py:Name "
             "[default: any Exception]", show_default=False)] = None,
    backoff: Annotated[float, typer.Option("--backoff", help="seconds before the first retry, "
                                                             "doubling each attempt")] = 0.0,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", metavar="N", help="give item i its own random stream from (N, i): pmap.rng(), pmap.item_seed(), "
                                    "and on process backends the module-level random and numpy.random; the "
                                    "same numbers on every backend, worker count and resume")] = None,
    on_error: Annotated[Optional[str], typer.Option(
        "--on-error", metavar="raise|skip|return",
        help="stop at the first failure, leave failed items out, or write each failure in its place "
             "(`record` is an alias of return) [default: raise; skip with --cmd or --halt]",
        show_default=False)] = None,
    halt_text: Annotated[Optional[str], typer.Option(
        "--halt", metavar="[now,|soon,]fail=N[%]",
        help="stop after N failed items, or once N% of finished items failed (exit status 3)")] = None,
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
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print what would run (the count, the first "
                                                            "items and their commands, the backend); run "
                                                            "nothing")] = False,
    explain: Annotated[bool, typer.Option("--explain", help="run the first items for real to measure them "
                                                            "(a probe), print what auto mode would choose and "
                                                            "why, and exit")] = False,
    journal_path: Annotated[Optional[str], typer.Option(
        "--journal", metavar="FILE",
        help="record each item's result or failure; run the same command again to resume: items "
             "without a result (failed or never run) run, finished ones are written again")] = None,
    keep_failures: Annotated[bool, typer.Option(
        "--keep-failures", help="on resume, keep journaled failures as they are instead of running "
                                "those items again")] = False,
    joblog_path: Annotated[Optional[str], typer.Option(
        "--joblog", metavar="FILE", help="append one tab-separated line per attempt (index, item, start, "
                                         "seconds, outcome, exit, attempt, worker, command, error)")] = None,
    option: OptionOpt = None,
    gevent: GeventOpt = False,
) -> None:
    try:
        code = _run(target=target, items=items, command=command, input_path=input_path, range_text=range_text,
                    as_json=as_json, star=star, as_csv=as_csv, as_tsv=as_tsv, to_format=to_format,
                    unordered=unordered, with_index=with_index, tag=tag, output_path=output_path,
                    backend=backend, workers=workers, chunksize=chunksize, max_ahead_bytes=max_ahead_bytes,
                    timeout=timeout, retries=retries,
                    retry_on=retry_on, backoff=backoff, seed=seed, on_error=on_error, halt_text=halt_text,
                    initializer=initializer, initargs=initargs, progress=progress, desc=desc, dry_run=dry_run,
                    explain=explain, journal_path=journal_path, keep_failures=keep_failures,
                    joblog_path=joblog_path, option=option, gevent=gevent)
    except UsageError as exc:
        raise _error_exit(str(exc)) from None
    raise typer.Exit(code)


def _formats(as_json: bool, star: bool, as_csv: bool, as_tsv: bool, to_format: str | None) -> tuple[str, str]:
    """The input's format and the results'."""
    given = [flag for flag, on in (("--json", as_json), ("--csv", as_csv), ("--tsv", as_tsv)) if on]
    if len(given) > 1:
        raise UsageError(f"give one input format: {' and '.join(given)} were both given")
    if star and (as_csv or as_tsv):
        given = "--csv" if as_csv else "--tsv"
        raise UsageError(f"--star reads JSON items; {given} records are dicts already (each call gets the "
                         "record; a function of the columns takes **record)")
    input_format = "csv" if as_csv else "tsv" if as_tsv else "json" if as_json or star else "text"
    if to_format is not None and to_format not in FORMATS:
        raise UsageError(f"--to takes text, json, csv or tsv, got {to_format!r}")
    return input_format, to_format or input_format


def _run(*, target, items, command, input_path, range_text, as_json, star, as_csv, as_tsv, to_format, unordered,
         with_index, tag, output_path, backend, workers, chunksize, max_ahead_bytes, timeout, retries, retry_on,
         backoff, seed, on_error,
         halt_text, initializer, initargs, progress, desc, dry_run, explain, journal_path, keep_failures,
         joblog_path, option, gevent) -> int:
    # Everything that can be wrong with the command is checked before a file is written.
    if command is not None:
        if target is not None:  # with --cmd every positional word is an item
            items = [target] + list(items or [])
        target = None
    elif target is None:
        raise UsageError("give a TARGET (module:function or file.py:function) or --cmd 'COMMAND {}'")
    halt = Halt(halt_text) if halt_text is not None else None
    if on_error is None:
        on_error = "skip" if command is not None or halt is not None else "raise"
    elif halt is not None and on_error == "raise":
        raise UsageError("--halt and --on-error raise both say when to stop; give one of them")
    if backend is None:
        backend = "thread" if command is not None else "auto"
    if command is not None and (initializer or initargs or retry_on or star or seed is not None):
        flag = "--initializer" if initializer else "--initargs" if initargs else "--retry-on" if retry_on \
            else "--star" if star else "--seed"
        raise UsageError(f"{flag} is for a Python function; it has no meaning with --cmd")
    if dry_run and explain:
        raise UsageError("--dry-run runs nothing and --explain runs a probe; give one of them")
    if keep_failures and not journal_path:
        raise UsageError("--keep-failures is about resuming: it needs --journal FILE")
    options = api_options(backend=backend, workers=workers, chunksize=chunksize, timeout=timeout,
                          retries=retries, backoff=backoff, on_error=on_error, option=option, seed=seed,
                          max_ahead_bytes=max_ahead_bytes)
    on_error = options.on_error
    check_backend(backend)
    init_arguments = parse_initargs(initargs)
    if init_arguments and initializer is None:
        raise UsageError("--initargs needs --initializer")
    check_output_path(output_path, input_path, journal_path)
    if joblog_path and (journal_path and os.path.abspath(joblog_path) == os.path.abspath(journal_path) or
                        output_path and os.path.abspath(joblog_path) == os.path.abspath(output_path)):
        raise UsageError("--joblog must be a file of its own (not the --journal or --output)")
    input_format, output_format = _formats(as_json, star, as_csv, as_tsv, to_format)
    source = build_source(items, input_path, range_text, input_format, lossless=command is not None)
    item_columns = getattr(source.items, "header", None)  # a CSV input's columns
    renderer = Renderer(output_format, with_index=with_index, tag=tag, command=command is not None,
                        item_columns=item_columns, failures=on_error == "return")
    template = None
    if command is not None:
        template = Template(command)
        if item_columns is not None:
            missing = [name for name in template.names() if name not in item_columns]
            if missing:
                typer.echo(f"pmap: note: {{{missing[0]}}} is not a column of {input_path} (columns: "
                           f"{', '.join(item_columns)}); it is left as written", err=True)
        func = CommandRunner(template, options.timeout, options.retries, options.backoff, renderer)
        # The runner keeps the timeout and retries itself: per try, with the process group killed.
        options = replace(options, timeout=None, retries=0, backoff=0.0,
                          workers=options.workers if options.workers is not None else _default_command_workers(backend),
                          chunksize=options.chunksize if options.chunksize is not None else 1)
        label = command
    else:
        if gevent:
            gevent_patch()
        func = make_call(for_backend(load_target(target), backend), star, indexed=True, render=renderer,
                         timed=joblog_path is not None)
        options = with_user_code(options, retry_on, initializer, init_arguments)
        label = target
    options = replace(options, ordered=not unordered)
    identity = {"target": target, "input": source.identity, "json": as_json, "star": star,
                "with_index": with_index, "ordered": not unordered}
    if command is not None:
        identity["cmd"] = command
    if seed is not None:  # a resumed run draws the same numbers only under the same seed
        identity["seed"] = options.seed
    if output_format != input_format or tag:
        identity["to"] = output_format + (" tagged" if tag else "")
    plan = Plan(func, source, options, label if desc is None else desc, renderer, on_error, halt, template,
                identity)
    if dry_run:
        return _dry_run(plan, journal_path, keep_failures, output_path)
    if explain:
        return _explain(plan)

    journal = None
    if journal_path:
        journal = Journal(journal_path, identity, ordered=not unordered, total=source.total,
                          keep_failures=keep_failures)
        journal.open()
    joblog = output = None
    try:
        joblog = JobLog(joblog_path) if joblog_path else None
        output = Output(output_path, raw=command is not None and output_format == "text")
        return _stream(plan, journal, joblog, output, progress=progress)
    finally:
        for closing in (journal, joblog, output):
            if closing is not None:
                closing.close()


def _default_command_workers(backend: str) -> int | None:
    """Commands run as many at once as there are cores, as GNU parallel and `xargs -P $(nproc)` do."""
    if backend != "thread":
        return None
    from ..backends.base import usable_cpus
    return usable_cpus()


# ---- --dry-run and --explain ---------------------------------------------------------------
def _dry_run(plan: Plan, journal_path: str | None, keep_failures: bool, output_path: str | None) -> int:
    from ..errors import short_repr
    options = plan.options
    echo = typer.echo
    echo("dry run: nothing runs")
    if plan.template is not None:
        how = "runs directly (no shell needed)" if plan.template.direct else "runs with /bin/sh -c"
        echo(f"command: {plan.template.text}  ({how}; each value quoted as one word)")
    else:
        echo(f"function: {plan.label}")
    echo(f"backend: {_describe_backend(options)}")
    settled = Bits()
    if journal_path:
        journal = Journal(journal_path, plan.identity, ordered=options.ordered, total=plan.source.total,
                          keep_failures=keep_failures)
        journal.open(write=False)
        settled = journal.settled()
        if journal.entries:
            echo(f"journal: {journal_path}: {_resume_summary(journal, plan.source.total)}")
        else:
            echo(f"journal: {journal_path}: nothing journaled yet")
    total = plan.source.total
    if total is not None:
        echo(f"items: {total - len(settled)} would run" + (f" (of {total})" if len(settled) else ""))
    else:
        echo("items: unknown count (a stream: it is read as the run goes); the first ones follow")
    shown = 0
    try:
        for index, item in enumerate(plan.source.items):
            if index in settled:
                continue
            if shown == DRY_RUN_SHOWN:
                echo("..." if total is None else f"... and {total - len(settled) - shown} more")
                break
            if shown == 0:
                echo("first items:")
            if plan.template is not None:
                echo(f"  {index}: {plan.template.shell_text(item, index)}")
            else:
                echo(f"  {index}: {plan.label}({short_repr(item)})")
            shown += 1
    except InputError as exc:
        raise UsageError(str(exc)) from None
    if shown == 0:
        echo("nothing would run")
    echo(f"on error: {plan.on_error}" + (f"; halt: {plan.halt.text}" if plan.halt else "")
         + (f"; results to {output_path}" if output_path else ""))
    return 0


def _describe_backend(options: Options) -> str:
    if options.backend == "auto":
        return "auto (chosen by a probe of the first items when the run starts; --explain shows it)"
    from ..backends.base import resolve_backend_class
    workers = options.workers or resolve_backend_class(options.backend).default_workers()
    return f"{options.backend}, {workers} worker(s), chunksize {options.chunksize or 'adaptive'}"


def _explain(plan: Plan) -> int:
    import itertools
    import pmap
    source, options = plan.source, plan.options
    what = "the command" if plan.template is not None else plan.label
    typer.echo(f"pmap: --explain runs {what} on the first items for real to measure them (their side effects "
               "happen; their results are not written); --dry-run runs nothing", err=True)
    try:
        if source.total is not None:
            pairs, total, note = enumerate(source.items), source.total, f"input: {source.total} item(s)"
        else:  # count what the stream holds, never assume a length it did not show
            read = list(itertools.islice(source.items, EXPLAIN_READ_AHEAD + 1))
            if len(read) > EXPLAIN_READ_AHEAD:
                read.pop()
                note = (f"input: a stream of more than {EXPLAIN_READ_AHEAD:,} items (read no further): the plan "
                        f"is for its first {EXPLAIN_READ_AHEAD:,}; the whole length is unknown")
            else:
                note = f"input: {len(read)} item(s) (the stream was read to its end to count them)"
            pairs, total = enumerate(read), len(read)
        result = pmap.explain(plan.func, Sized(pairs, total), workers=options.workers, timeout=options.timeout,
                              retries=options.retries)
    except InputError as exc:
        raise UsageError(str(exc)) from None
    typer.echo(str(result))
    typer.echo(note)
    typer.echo(f"the probe ran {what} on {result.probed_items} item(s) for real; their results were not written")
    if options.backend != "auto":
        typer.echo(f"note: the run would use --backend {options.backend}"
                   + (" (commands run from threads unless --backend says otherwise)"
                      if plan.template is not None else "") + ", not this plan")
    return 0


# ---- the run -------------------------------------------------------------------------------
def _resume_summary(journal: Journal, total: int | None) -> str:
    results = len(journal.done)
    failed = journal.failed_without_result()
    parts = [f"{results} item(s) have results (kept)"]
    if failed:
        parts.append(f"{failed} failed ({'kept as failed, --keep-failures' if journal.keep_failures else 'retried'})")
    if total is not None:
        parts.append(f"{max(0, total - results - failed)} never ran (run now)")
    else:
        parts.append("the rest of the input runs")
    return ", ".join(parts)


class _Run:
    """The state of one streaming run: counts, the journal, the job log and the output."""

    def __init__(self, plan: Plan, journal: Journal | None, joblog: JobLog | None, output: Output):
        self.plan = plan
        self.journal = journal
        self.joblog = joblog
        self.output = output
        self.failed = 0        # failures written this run (and journaled ones kept as failed)
        self.failed_now = 0    # failures of items run by this run: what --halt counts
        self.finished_now = 0
        self.bar = None
        self.current_items: dict = {}  # index -> item of the items in flight, for the job log

    def write_journaled(self, entry: dict) -> bool:
        """Write an entry of an earlier run; False when it says to stop (a kept failure under raise)."""
        if "error" not in entry:
            self.output.line(entry["out"])
            return True
        self.failed += 1
        if self.plan.on_error == "return":
            self.output.line(entry["record"])
        elif self.plan.on_error == "raise":
            with _above(self.bar):
                typer.echo(f"pmap: {entry['error']} (journaled by an earlier run and kept by --keep-failures; "
                           "run without it to retry the item)", err=True)
            return False
        return True

    def result(self, index: int, line: str, extras: dict | None) -> None:
        self.finished_now += 1
        # The job log first (an attempt that ended is never missing from it, even if Ctrl-C lands
        # here), then the journal (a line written out is never missing from it), then the output.
        if extras and self.joblog is not None:
            earlier = self.journal.earlier_attempts(index) if self.journal is not None else 0
            for number, attempt in enumerate(extras.get("attempts", ()), 1):
                self.joblog.attempt(index, self._item(index), attempt, attempt=earlier + number)
        if self.journal is not None:
            self.journal.record(index, line)
        if extras and extras.get("stderr"):
            self._pass_stderr(extras["stderr"])
        self.output.line(line)

    def _item(self, index: int):
        return self.current_items.get(index)

    def failure(self, value) -> str:
        """Journal, log and report a failed item; returns its message."""
        from ..errors import Failure  # noqa: F401 - the type of `value`
        index, item = value.item
        self.failed += 1
        self.failed_now += 1
        self.finished_now += 1
        exc = value.exception
        message = describe_failure(index, item, value)
        tries = exc.attempts if isinstance(exc, CommandFailed) else []
        attempts = max(1, len(tries), value.attempts or 1)
        record = render_failure(index, item, value, self.plan.renderer)
        earlier = self.journal.earlier_attempts(index) if self.journal is not None else 0
        if self.joblog is not None:
            if tries:
                for number, attempt in enumerate(tries, 1):
                    self.joblog.attempt(index, item, attempt, attempt=earlier + number)
            else:
                self.joblog.attempt(index, item, {"worker": _worker_label(value.worker)},
                                    outcome="failed" if value.kind == "error" else value.kind,
                                    attempt=earlier + attempts, error=f"{type(exc).__name__}: {exc}")
        if self.journal is not None:
            self.journal.record(index, None, error=message, record=record, attempts=attempts)
        return message

    def _pass_stderr(self, text: str) -> None:
        """A successful command's stderr, passed on whole (as GNU parallel groups it)."""
        with _above(self.bar):
            sys.stderr.flush()
            buffer = getattr(sys.stderr, "buffer", None)
            if buffer is not None:
                buffer.write(text.encode("utf-8", "surrogateescape"))
                buffer.flush()
            else:
                sys.stderr.write(text)
                sys.stderr.flush()


def _worker_label(worker) -> str:
    return "" if worker is None else str(worker)


def _stream(plan: Plan, journal: Journal | None, joblog: JobLog | None, output: Output, *, progress) -> int:
    """Run and write: the API returns every failure (on_error="return") and this applies the
    command's --on-error and --halt itself, so a failure is reported, journaled and written in its place."""
    from ..api import imap_with_options
    from ..errors import Failure, PmapError
    source, options, on_error, halt = plan.source, plan.options, plan.on_error, plan.halt
    run = _Run(plan, journal, joblog, output)
    settled = journal.settled() if journal is not None else Bits()
    stop_reading = threading.Event()  # --halt soon: no further items are read
    current = run.current_items
    keep_items = joblog is not None

    def pending() -> Iterator:
        for index, item in enumerate(source.items):
            if stop_reading.is_set():
                return
            if index not in settled:
                if keep_items:
                    current[index] = item
                yield index, item

    remaining = None if source.total is None else max(0, source.total - len(settled))
    pairs = pending() if remaining is None else Sized(pending(), remaining)
    if progress is None:
        progress = is_terminal(sys.stderr)

    previous_sigterm = _catch_sigterm()
    allow_commands()
    results = None
    got_result = False
    halted = None
    ended = False
    try:
        if journal is not None and journal.entries:
            typer.echo(f"pmap: resuming from {journal.path}: {_resume_summary(journal, source.total)}", err=True)
        if plan.renderer.format in DELIMITERS:
            output.header(_csv_header_line(plan))
        replayed = journal.replay() if journal is not None else iter(())
        if not options.ordered:
            for entry in replayed:
                if not run.write_journaled(entry):
                    return EXIT_FAILED
            replayed = iter(())
        next_entry = next(replayed, None)
        callback = None
        if progress:
            from ..progress import ProgressBar
            already = len(settled)
            run.bar = ProgressBar(plan.label, total=source.total, initial=already)  # its clock starts now
            output.share_terminal_with(run.bar)

            def advance_bar(count, _total):
                run.bar(already + count, source.total)
            callback = advance_bar
        results = imap_with_options(plan.func, pairs, replace(options, on_error="return", progress=callback or False),
                                    indexed=True)
        if run.bar is not None:
            run.bar.stats = results.stats
            if options.backend != "auto":  # its workers are started: the ticker may run
                run.bar.start_ticker()
        for value in results:
            got_result = True
            index = value[0] if type(value) is tuple else value.item[0]
            while next_entry is not None and next_entry["i"] < index:  # earlier runs' results in their places
                if not run.write_journaled(next_entry):
                    return EXIT_FAILED
                next_entry = next(replayed, None)
            if type(value) is tuple:
                _, line, extras = value
                run.result(index, line, extras)
                current.pop(index, None)
                continue
            if not isinstance(value, Failure):  # pragma: no cover - the wrapper always returns a tuple
                raise RuntimeError(f"unexpected result {value!r}")
            message = run.failure(value)
            current.pop(index, None)
            if on_error == "raise":
                with _above(run.bar):
                    if value.traceback and not isinstance(value.exception, CommandFailed):
                        sys.stderr.write(value.traceback)
                    typer.echo(f"pmap: {message}\npmap: stopped at the first failure "
                               "(--on-error skip or return goes on past failed items)", err=True)
                return EXIT_FAILED
            with _above(run.bar):
                typer.echo(f"pmap: {message}", err=True)
            if on_error == "return":
                output.line(render_failure(index, value.item[1], value, plan.renderer))
            if halt is not None and halted is None and halt.reached(run.failed_now, run.finished_now):
                halted = halt.describe(run.failed_now, run.finished_now)
                if halt.when == "now":
                    break
                stop_reading.set()
                with _above(run.bar):
                    typer.echo(f"pmap: {halted}: reading no further items; waiting for those started", err=True)
        else:
            if halted is None:
                while next_entry is not None:
                    if not run.write_journaled(next_entry):
                        return EXIT_FAILED
                    next_entry = next(replayed, None)
        ended = True
    except (TypeError, ValueError, PmapError) as exc:
        if got_result and not isinstance(exc, PmapError):
            raise  # not from checking the arguments or preparing the backend: a bug, keep its traceback
        raise UsageError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    except ModuleNotFoundError as exc:
        if exc.name != "pmap.auto":
            raise
        raise UsageError("backend 'auto' is not available in this build; pass --backend") from None
    except (InputError, OutputFailed) as exc:
        with _above(run.bar):
            typer.echo(f"pmap: error: {exc}", err=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        with _above(run.bar):
            typer.echo("pmap: interrupted", err=True)
        return EXIT_INTERRUPTED
    except _Terminated:
        with _above(run.bar):
            typer.echo("pmap: terminated", err=True)
        return EXIT_TERMINATED
    except BrokenPipeError:
        # Whoever read our output is gone; stop quietly, as `yes | head` does.
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    finally:
        if not ended:
            kill_running_commands()  # before closing: a thread waiting on its command returns at once
        if results is not None:
            if halted is not None:
                kill_running_commands()
            results.close()
            if not ended or halted is not None:
                kill_running_commands()  # one a worker thread started while the run was closing
        if run.bar is not None:
            run.bar.close()
        _restore_sigterm(previous_sigterm)
    if halted is not None:
        typer.echo(f"pmap: stopped by {halted} (what finished is written"
                   + (" and journaled: run again to resume" if journal is not None else "") + ")", err=True)
        return EXIT_HALTED
    if run.failed:
        typer.echo(f"pmap: {run.failed} item(s) failed", err=True)
        return EXIT_FAILED
    return 0


def _csv_header_line(plan: Plan) -> str:
    from .output import csv_line
    renderer = plan.renderer
    return csv_line(renderer.columns(), "," if renderer.format == "csv" else "\t")


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
