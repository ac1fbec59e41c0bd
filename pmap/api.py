"""pmap / imap / starmap: check the arguments, then hand a run to the engine."""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator, List, TypeVar

from ._worker import StarCall
from .auto import start_auto_run
from .backends.base import Backend, backend_class, open_backend
from .concurrency import Adaptive
from .engine import RunStats, execute
from .errors import drop_pmap_frames
from .options import OnError, Options, Progress, Workers, check_callable, check_iterable, known_length
from .progress import make_progress

R = TypeVar("R")


class ResultList(List[R]):
    """The list `pmap` returns; `.stats` tells how the run went."""

    stats: RunStats


class Results(Iterator[R]):
    """A lazy run: iterate for results; `.stats` is filled as it goes; `close()` stops it."""

    def __init__(self, batches: Iterator[list], stats: RunStats, finish: Callable[[bool], None]):
        self._batches = batches
        self._items = itertools.chain.from_iterable(batches)
        self.stats = stats
        self._finish = finish
        self._closed = False

    def __next__(self) -> R:
        if self._closed:
            raise StopIteration
        try:
            return next(self._items)
        except StopIteration:
            self._end(ok=True)
            raise
        except BaseException as exc:
            self._end(ok=False)
            if drop_pmap_frames(exc):
                raise exc  # from here on, not from the engine
            raise

    def _end(self, ok: bool) -> None:
        if not self._closed:
            self._closed = True
            self._batches.close()
            self._finish(ok)

    def close(self) -> None:
        """Stop early: queued work is dropped and the workers are released."""
        self._end(ok=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit a finaliser may find the backend half torn down: nothing to release
            pass


def _run(func: Callable, items: Iterable, star: bool, options: Options, indexed: bool = False) -> Results:
    check_callable(func)
    check_iterable(items)
    fn = StarCall(func) if star else func
    stats = RunStats()
    auto = options.backend == "auto"
    if auto and options.backend_options:
        raise TypeError(f"backend option(s) {', '.join(sorted(options.backend_options))} need an "
                        "explicit backend=..., since auto mode may pick any backend")
    instance, bounds = None, None
    if not auto:  # opened before the bar is drawn: a backend that fails leaves no bar
        instance, bounds = _open(options)
    callback, close_progress = make_progress(options.progress, stats, total=known_length(items), auto=auto)
    spec = options.run_spec(fn, items, callback, concurrency=bounds, indexed_items=indexed)
    if auto:
        try:
            gen, instance = start_auto_run(spec, stats, workers=options.workers, initializer=options.initializer,
                                           initargs=options.initargs, inner_threads=options.inner_threads)
        except BaseException:
            close_progress()  # a bar drawn for a run that never started is not left on the screen
            raise
    else:
        gen = execute(instance, spec, stats)

    def finish(ok: bool) -> None:
        close_progress()
        instance.close(kill=not ok)

    return Results(gen, stats, finish)


def _collect(results: Results[R]) -> ResultList[R]:
    out: ResultList[R] = ResultList()
    try:
        for batch in results._batches:  # whole lists: no per-item Python call or iterator step
            out.extend(batch)
    except BaseException as exc:
        results._end(ok=False)
        if drop_pmap_frames(exc):
            raise exc  # from here on, not from the engine
        raise
    results._end(ok=True)
    out.stats = results.stats
    return out


def _open(options: Options) -> tuple[Backend, Adaptive | None]:
    """The opened backend `options` name, and the bounds of its concurrency when it is adaptive."""
    bounds = None
    workers = options.workers
    if options.adaptive:
        cls = backend_class(options.backend)
        bounds = options.adaptive_bounds(cls.adaptive_maximum, cls.name)
        workers = bounds.maximum
    instance = open_backend(options.backend, workers, options.initializer, options.initargs,
                            concurrency=bounds.start if bounds else None, inner_threads=options.inner_threads,
                            **options.backend_options)
    return instance, bounds


# The public signatures spell every option out (for help and type checkers) and hand them,
# by name, to the one declaration in `Options`; tests/test_options.py keeps them in step.

def pmap(func: Callable[[Any], R], items: Iterable[Any], *, backend: str | type | Backend = "auto",
         workers: Workers = None, chunksize: int | None = None, ordered: bool = True,
         timeout: float | None = None, retries: int = 0,
         retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
         backoff: float = 0.0, on_error: OnError = "raise", progress: Progress = False,
         max_ahead_bytes: int | str = "64MiB", initializer: Callable[..., Any] | None = None, initargs: tuple = (),
         inner_threads: int | None = None, seed: int | None = None, **backend_options: Any) -> ResultList[R]:
    """`list(map(func, items))`, in parallel. See the README for the other options.

    Parameters
    ----------
    max_ahead_bytes : int or str, default "64MiB"
        The most bytes of items sent to workers and of results not yet yielded that the run
        holds before it reads more input: an int, or a size such as "256MB" or "1GiB". Chunks
        shrink so every worker still gets its share. Sizes are pickled sizes on process backends,
        `sys.getsizeof` elsewhere; see docs/memory.md. `.stats.peak_bytes_held` reports the peak.
    seed : int, optional
        Gives item i a random stream of its own derived from (seed, i), the same on every backend,
        worker count, chunk size, retry and resume: read it with `pmap.rng()` (a numpy Generator)
        or `pmap.item_seed()`. Where each item runs alone in a process (serial, fork, pool,
        process, manager; dask with one thread per worker) the module-level `random` and
        `numpy.random` are seeded from it too; on thread, greenlet and asyncio they are shared
        by items running at once, so only `pmap.rng()` and `pmap.item_seed()` are reproducible
        (docs/randomness.md). None (the default): no seeding, at no cost.

    Raises
    ------
    ValueError, TypeError
        A bad option (`max_ahead_bytes` of 0, "12 parsecs" or 1.5), before any work starts.
    """
    return _collect(_run(func, items, False, Options.from_arguments(locals())))


def imap(func: Callable[[Any], R], items: Iterable[Any], *, backend: str | type | Backend = "auto",
         workers: Workers = None, chunksize: int | None = None, ordered: bool = True,
         timeout: float | None = None, retries: int = 0,
         retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
         backoff: float = 0.0, on_error: OnError = "raise", progress: Progress = False,
         max_ahead_bytes: int | str = "64MiB", initializer: Callable[..., Any] | None = None, initargs: tuple = (),
         inner_threads: int | None = None, seed: int | None = None, **backend_options: Any) -> Results[R]:
    """Lazy `pmap`: reads input as needed, keeps memory bounded, yields as results are ready.
    `max_ahead_bytes=` and `seed=` as for `pmap.pmap`."""
    return _run(func, items, False, Options.from_arguments(locals()))


def starmap(func: Callable[..., R], arg_tuples: Iterable[Iterable[Any]], *,
            backend: str | type | Backend = "auto", workers: Workers = None,
            chunksize: int | None = None, ordered: bool = True, timeout: float | None = None,
            retries: int = 0, retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
            backoff: float = 0.0, on_error: OnError = "raise", progress: Progress = False,
            max_ahead_bytes: int | str = "64MiB", initializer: Callable[..., Any] | None = None, initargs: tuple = (),
            inner_threads: int | None = None, seed: int | None = None, **backend_options: Any) -> ResultList[R]:
    """`[func(*args) for args in arg_tuples]`, in parallel. `max_ahead_bytes=` and `seed=` as for
    `pmap.pmap`."""
    return _collect(_run(func, arg_tuples, True, Options.from_arguments(locals())))


def imap_with_options(func: Callable[[Any], R], items: Iterable[Any], options: Options,
                      indexed: bool = False) -> Results[R]:
    """`imap` for a caller that already holds its `Options` (the command line). `indexed`: the
    items are (index, item) pairs, and a `seed=` stream follows their index, not their position
    (a resumed run skips the items it has)."""
    return _run(func, items, False, options, indexed=indexed)
