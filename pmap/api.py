"""pmap / imap / starmap: check the arguments, then hand a run to the engine."""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator, List, TypeVar

from ._worker import StarCall, stop_if_importing_the_callers_script
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
        except BaseException as exc:  # whatever ends the iteration ends the run, then goes on up
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
    stop_if_importing_the_callers_script()
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
        except BaseException:  # a run that never started, however it failed, is re-raised
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
    except BaseException as exc:  # whatever ends the collection ends the run, then goes on up
        results._end(ok=False)
        if drop_pmap_frames(exc):
            raise exc  # from here on, not from the engine
        raise
    results._end(ok=True)
    out.stats = results.stats
    return out


def _open(options: Options) -> tuple[Backend, Adaptive | None]:
    """The opened backend `options` name, and the bounds of its concurrency when it is adaptive."""
    stop_if_importing_the_callers_script()  # a Pool or Executor made at the top of an unguarded script
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
    """`list(map(func, items))`, in parallel: results in input order, each failure its item's own.

    Parameters
    ----------
    func : callable
        Called as `func(item)` for every item. A plain function, lambda, closure or
        `functools.partial`; an `async def` function runs in an event loop (`asyncio` backend,
        or inside each worker of a process backend). Process backends pickle it with
        cloudpickle, except `fork`, which inherits it.
    items : iterable
        The inputs, read once, in order; a generator or an endless iterator works (use `imap`
        to stream results from one).
    backend : str, Backend subclass or instance, default "auto"
        Where items run: "serial", "thread", "process" (loky), "pool" (multiprocessing.Pool),
        "fork", "greenlet" (gevent), "asyncio", "manager" (workers on any host), "dask", or
        "auto", which times the first items in the calling thread and picks one (`pmap.explain`
        says what it would pick and why). Aliases: "threads" is "thread", "loky" is "process",
        "gevent" is "greenlet". `pmap.backends()` lists them with their guarantees.
    workers : int, "adaptive", Adaptive or None, default None
        How many items run at once. None: the backend's default (usable CPUs, affinity and
        cgroup aware, for process backends; more for thread, greenlet and asyncio).
        "adaptive" or `pmap.Adaptive(start, minimum, maximum)` lets the engine change the count
        during the run from measured latency and throughput (thread, greenlet, asyncio only).
    chunksize : int or None, default None
        Items per task sent to a worker. None: adaptive, aiming at about 0.1 s of work per task.
    ordered : bool, default True
        False yields results in completion order (a slow item holds nothing back).
    timeout : float or None, default None
        Seconds each item may run, counted from when a worker starts it (items still travel in
        chunks; each has its own deadline). Process backends kill and replace the worker (a
        hard timeout) and run the rest of its chunk elsewhere; thread, serial,
        greenlet and asyncio interrupt the item's Python code where they can. A timed-out item
        fails with `pmap.TaskTimeout` (kind "timeout").
    retries : int, default 0
        Extra attempts for an item that raised one of `retry_on`, timed out, or lost its worker.
    retry_on : exception type or tuple of types, default (Exception,)
        Which raised exceptions are retried; timeouts and crashes always are.
    backoff : float, default 0.0
        Seconds to wait before the first retry of an item, doubling with each further attempt.
    on_error : {"raise", "return", "skip"}, default "raise"
        "raise": the first failure with no retry left re-raises the original exception in the
        caller, its `__cause__` a `pmap.RemoteTraceback` with the worker's traceback and a note
        naming the item, its index and the backend. "return": a `pmap.Failure` takes the failed
        item's place. "skip": the item is left out and counted in `.stats.skipped`.
    progress : bool, str or callable, default False
        True draws a bar on stderr; a string draws one with that label; a callable is called as
        `progress(done, total)` after each result (`total` is None for input of unknown length).
    initializer : callable or None, default None
        Called as `initializer(*initargs)` once in each worker before its first item (under
        auto, also once in the calling thread, which runs the probe items). If it fails, the run
        stops with `pmap.InitializerError`.
    initargs : tuple, default ()
        Arguments for `initializer`.
    inner_threads : int or None, default None
        Native (BLAS, OpenMP, numexpr, numba) threads per worker. None: `max(1, CPUs // workers)`,
        unless you set `OMP_NUM_THREADS` or a similar variable yourself.
    max_ahead_bytes : int or str, default "64MiB"
        The most bytes of items sent to workers and of results not yet yielded that the run
        holds before it reads more input: an int, or a size such as "256MB" or "1GiB". Chunks
        shrink so every worker still gets its share. Sizes are pickled sizes on process backends,
        `sys.getsizeof` elsewhere (the docs' memory page). `.stats.peak_bytes_held` reports the peak.
    seed : int or None, default None
        Gives item i a random stream of its own derived from (seed, i), the same on every backend,
        worker count, chunk size, retry and resume: read it with `pmap.rng()` (a numpy Generator)
        or `pmap.item_seed()`. Where each item runs alone in a process (serial, fork, pool,
        process, manager; dask with one thread per worker) the module-level `random` and
        `numpy.random` are seeded from it too; on thread, greenlet and asyncio they are shared
        by items running at once, so only `pmap.rng()` and `pmap.item_seed()` are reproducible
        (the docs' random numbers page). None: no seeding, at no cost.
    **backend_options
        Options of the chosen backend, which must then be named explicitly: `start_method`
        (pool), `max_tasks_per_worker` (process, pool, fork), `reuse_timeout` (process), `loop`
        (asyncio), `address`, `authkey`, `authkey_file`, `local_workers`, `prefetch`,
        `lease_seconds`, `start_wait` (manager), `client`, `address`, `scheduler_file`,
        `cluster_options`, `connect_timeout`, `worker_wait`, `start_wait`, `tasks_per_thread`
        (dask). The docs' "Choosing a backend" page gives each one's default and meaning.

    Returns
    -------
    ResultList
        A list of the results in input order (completion order with `ordered=False`), less
        skipped items; its `.stats` is the run's `pmap.RunStats`.

    Raises
    ------
    Exception
        With `on_error="raise"`, the first item's exception, of its original type.
    ValueError, TypeError
        A bad option (`max_ahead_bytes` of 0 or "12 parsecs", say), naming it; nothing has run.
    pmap.BackendUnavailable
        The backend cannot run here (a missing package, or its workers cannot start).
    pmap.InitializerError
        The `initializer` failed in a worker.

    See Also
    --------
    imap : the same, lazily, for streams and early exits.
    starmap : `func(*args)` for each tuple of arguments.
    explain : what auto mode would choose, and why.
    Pool : workers kept across calls.

    Examples
    --------
    >>> import pmap
    >>> pmap.pmap(abs, [-1, -2, 3], backend="thread")
    [1, 2, 3]
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

    Takes exactly the arguments of `pmap.pmap`, each with the same meaning and default (see
    `help(pmap.pmap)`). The input is read only as fast as workers need it, so it may be endless.

    Returns
    -------
    Results
        An iterator of the results, in input order (completion order with `ordered=False`).
        Its `.stats` fills in as the run goes. `close()`, leaving a `with` block, or dropping it
        stops the run: queued items are dropped and the workers released.

    Examples
    --------
    >>> import itertools, pmap
    >>> for square in pmap.imap(lambda x: x * x, itertools.count(), backend="thread"):
    ...     if square > 50:
    ...         break
    >>> square
    64
    """
    return _run(func, items, False, Options.from_arguments(locals()))


def starmap(func: Callable[..., R], arg_tuples: Iterable[Iterable[Any]], *,
            backend: str | type | Backend = "auto", workers: Workers = None,
            chunksize: int | None = None, ordered: bool = True, timeout: float | None = None,
            retries: int = 0, retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
            backoff: float = 0.0, on_error: OnError = "raise", progress: Progress = False,
            max_ahead_bytes: int | str = "64MiB", initializer: Callable[..., Any] | None = None, initargs: tuple = (),
            inner_threads: int | None = None, seed: int | None = None, **backend_options: Any) -> ResultList[R]:
    """`[func(*args) for args in arg_tuples]`, in parallel.

    Takes the arguments of `pmap.pmap` (see `help(pmap.pmap)`), with `arg_tuples` in place of
    `items`: each element is an iterable of positional arguments for one call.

    Returns
    -------
    ResultList
        The results, as `pmap.pmap` returns them, with `.stats`.

    Examples
    --------
    >>> import pmap
    >>> pmap.starmap(pow, [(2, 5), (3, 2)], backend="thread")
    [32, 9]
    """
    return _collect(_run(func, arg_tuples, True, Options.from_arguments(locals())))


def imap_with_options(func: Callable[[Any], R], items: Iterable[Any], options: Options,
                      indexed: bool = False) -> Results[R]:
    """`imap` for a caller that already holds its `Options` (the command line). `indexed`: the
    items are (index, item) pairs, and a `seed=` stream follows their index, not their position
    (a resumed run skips the items it has)."""
    return _run(func, items, False, options, indexed=indexed)
