"""`pmap bench`: time a function on several backends side by side and check they agree."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import EXIT_FAILED, EXIT_INTERRUPTED, InputError, UsageError, _error_exit, app
from .options import (ChunksizeOpt, GeventOpt, InputOpt, ItemsArg, JsonOpt, OptionOpt, RangeOpt, StarOpt,
                      TargetArg, WorkersOpt, api_options, check_repeat, gevent_patch)
from .source import build_source
from .target import load_target, make_call

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
    from ..comparison import compare
    check_repeat(repeat)
    options = api_options(backend="auto", workers=workers, chunksize=chunksize, timeout=None, retries=0,
                          backoff=0.0, on_error="raise", option=option)
    names = None
    if backends is not None:
        names = [name.strip() for name in backends.split(",") if name.strip()]
        if not names:
            raise UsageError("--backends needs at least one name")
        from ..backends.base import resolve_backend_class
        for name in names:
            if name != "auto":
                try:
                    resolve_backend_class(name)
                except ValueError as exc:
                    raise UsageError(str(exc)) from None
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
    given = {k: v for k, v in (("workers", workers), ("chunksize", chunksize)) if v is not None}
    comparison = compare(func, values, names, repeat=repeat, ordered=not unordered, check=False,
                         **given, **options.backend_options)
    typer.echo(str(comparison))
    return 0 if comparison.ok else EXIT_FAILED
