"""pmap / imap / starmap / Pool: check the arguments, then hand a run to the engine."""
from __future__ import annotations

import itertools
import numbers
import sys
import threading
from typing import Any, Callable, Iterable, Iterator

from ._worker import StarCall
from .backends.base import Backend, resolve_backend_class
from .engine import RunSpec, RunStats, execute
from .progress import make_progress

ON_ERROR_CHOICES = ("raise", "return", "skip")


class ResultList(list):
    """The list `pmap` returns; `.stats` tells how the run went."""

    stats: RunStats


def _check_positive_int(name: str, value: Any, allow_none: bool = True, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def check_options(func, *, workers=None, chunksize=None, ordered=True, timeout=None, retries=0,
                  retry_on=(Exception,), backoff=0.0, on_error="raise", progress=False,
                  initializer=None, initargs=()) -> None:
    """Raise a clear error for any bad argument, before any work starts."""
    if not callable(func):
        raise TypeError(f"func must be callable, not {type(func).__name__}")
    _check_positive_int("workers", workers)
    _check_positive_int("chunksize", chunksize)
    _check_positive_int("retries", retries, allow_none=False, minimum=0)
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {', '.join(map(repr, ON_ERROR_CHOICES))}, got {on_error!r}")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if chunksize is not None and chunksize > 1:
            raise ValueError("timeout is per item, so it needs chunksize=1 (or None); "
                             f"got chunksize={chunksize}")
    if isinstance(backoff, bool) or not isinstance(backoff, numbers.Real) or backoff < 0:
        raise ValueError(f"backoff must be a non-negative number of seconds, got {backoff!r}")
    retry_types = retry_on if isinstance(retry_on, tuple) else (retry_on,)
    if not all(isinstance(t, type) and issubclass(t, BaseException) for t in retry_types):
        raise TypeError("retry_on must be an exception type or a tuple of them")
    if not (isinstance(progress, bool) or callable(progress)):
        raise TypeError("progress must be True, False or a callable taking (done, total)")
    if initializer is not None and not callable(initializer):
        raise TypeError("initializer must be callable")
    if not isinstance(initargs, (tuple, list)):
        raise TypeError("initargs must be a tuple")
    if not isinstance(ordered, bool):
        raise TypeError("ordered must be True or False")


def make_backend(backend: str | type | Backend, workers=None, initializer=None, initargs=(),
                 **options) -> Backend:
    """A backend instance (the caller opens it) from a name, a Backend class, or an instance."""
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str):
        cls = resolve_backend_class(backend)
    elif isinstance(backend, type) and issubclass(backend, Backend):
        cls = backend
    else:
        raise TypeError(f"backend must be a name such as 'process' or 'thread', not {type(backend).__name__}")
    instance = cls(workers=workers, initializer=initializer, initargs=tuple(initargs), **options)
    if instance.workers < 1:
        raise ValueError(f"workers must be at least 1, got {instance.workers}")
    return instance


def _total(items) -> int | None:
    try:
        return len(items)
    except Exception:
        return None


class Results(Iterator):
    """A lazy run: iterate for results; `.stats` is filled as it goes; `close()` stops it."""

    def __init__(self, batches: Iterator[list], stats: RunStats, finish: Callable[[bool], None]):
        self._batches = batches
        self._items = itertools.chain.from_iterable(batches)
        self.stats = stats
        self._finish = finish
        self._closed = False

    def __next__(self):
        if self._closed:
            raise StopIteration
        try:
            return next(self._items)
        except StopIteration:
            self._end(ok=True)
            raise
        except BaseException:
            self._end(ok=False)
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
        except Exception:
            pass


def _run(func, items, *, star, backend, workers, chunksize, ordered, timeout, retries, retry_on,
         backoff, on_error, progress, initializer, initargs, backend_options, pool=None) -> Results:
    check_options(func, workers=workers, chunksize=chunksize, ordered=ordered, timeout=timeout,
                  retries=retries, retry_on=retry_on, backoff=backoff, on_error=on_error,
                  progress=progress, initializer=initializer, initargs=initargs)
    try:
        iter(items)
    except TypeError:
        raise TypeError(f"items must be iterable, not {type(items).__name__}") from None
    fn = StarCall(func) if star else func
    stats = RunStats()
    callback, close_progress = make_progress(progress, stats)
    spec = RunSpec(fn=fn, items=items, ordered=ordered, timeout=timeout, retries=retries,
                   retry_on=retry_on if isinstance(retry_on, tuple) else (retry_on,), backoff=backoff,
                   on_error=on_error, chunksize=1 if timeout is not None else chunksize,
                   progress=callback, total=_total(items))
    if backend == "auto" and pool is None:
        if backend_options:
            raise TypeError(f"backend option(s) {', '.join(sorted(backend_options))} need an explicit "
                            "backend=..., since auto mode may pick any backend")
        from .auto import start_auto_run
        gen, instance = start_auto_run(spec, stats, workers=workers, initializer=initializer,
                                       initargs=initargs)
    else:
        instance = pool if pool is not None else make_backend(
            backend, workers=workers, initializer=initializer, initargs=initargs, **backend_options)
        instance.open()
        gen = execute(instance, spec, stats)
    owned = pool is None

    def finish(ok: bool) -> None:
        close_progress()
        if owned:
            instance.close(kill=not ok)
        elif isinstance(sys.exc_info()[1], KeyboardInterrupt):
            instance.close(kill=True)  # Ctrl-C during a Pool call ends the Pool's workers too

    return Results(gen, stats, finish)


def _collect(results: Results) -> ResultList:
    out = ResultList()
    try:
        for batch in results._batches:  # whole lists: no per-item Python call or iterator step
            out.extend(batch)
    except BaseException:
        results._end(ok=False)
        raise
    results._end(ok=True)
    out.stats = results.stats
    return out


def pmap(func: Callable, items: Iterable, *, backend: str = "auto", workers: int | None = None,
         chunksize: int | None = None, ordered: bool = True, timeout: float | None = None,
         retries: int = 0, retry_on=(Exception,), backoff: float = 0.0, on_error: str = "raise",
         progress=False, initializer: Callable | None = None, initargs: tuple = (),
         **backend_options) -> list:
    """`list(map(func, items))`, in parallel. See the README for every option."""
    return _collect(_run(func, items, star=False, backend=backend, workers=workers, chunksize=chunksize,
                         ordered=ordered, timeout=timeout, retries=retries, retry_on=retry_on,
                         backoff=backoff, on_error=on_error, progress=progress, initializer=initializer,
                         initargs=initargs, backend_options=backend_options))


def imap(func: Callable, items: Iterable, *, backend: str = "auto", workers: int | None = None,
         chunksize: int | None = None, ordered: bool = True, timeout: float | None = None,
         retries: int = 0, retry_on=(Exception,), backoff: float = 0.0, on_error: str = "raise",
         progress=False, initializer: Callable | None = None, initargs: tuple = (),
         **backend_options) -> Results:
    """Lazy `pmap`: reads input as needed, keeps memory bounded, yields as results are ready."""
    return _run(func, items, star=False, backend=backend, workers=workers, chunksize=chunksize,
                ordered=ordered, timeout=timeout, retries=retries, retry_on=retry_on, backoff=backoff,
                on_error=on_error, progress=progress, initializer=initializer, initargs=initargs,
                backend_options=backend_options)


def starmap(func: Callable, arg_tuples: Iterable, *, backend: str = "auto", workers: int | None = None,
            chunksize: int | None = None, ordered: bool = True, timeout: float | None = None,
            retries: int = 0, retry_on=(Exception,), backoff: float = 0.0, on_error: str = "raise",
            progress=False, initializer: Callable | None = None, initargs: tuple = (),
            **backend_options) -> list:
    """`[func(*args) for args in arg_tuples]`, in parallel."""
    return _collect(_run(func, arg_tuples, star=True, backend=backend, workers=workers, chunksize=chunksize,
                         ordered=ordered, timeout=timeout, retries=retries, retry_on=retry_on,
                         backoff=backoff, on_error=on_error, progress=progress, initializer=initializer,
                         initargs=initargs, backend_options=backend_options))


class Pool:
    """Workers kept across calls. Use as a context manager, or call `close()`.

    One call runs at a time: an `imap` must be exhausted or closed before the next call.
    """

    def __init__(self, backend: str = "process", workers: int | None = None,
                 initializer: Callable | None = None, initargs: tuple = (), **options):
        if backend == "auto":
            raise ValueError("Pool needs a concrete backend ('process', 'thread', 'fork', ...); "
                             "use pmap.explain(func, items) to see which one auto would pick")
        _check_positive_int("workers", workers)
        self._backend = make_backend(backend, workers=workers, initializer=initializer,
                                     initargs=initargs, **options)
        self._backend.open()
        self._closed = False
        self._active: Results | None = None
        self._lock = threading.Lock()

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def workers(self) -> int:
        return self._backend.workers

    def _start(self, func, items, star: bool, ordered: bool, options: dict) -> Results:
        with self._lock:
            if self._closed:
                raise ValueError("Pool is closed")
            if self._active is not None and not self._active._closed:
                raise RuntimeError("a previous imap on this Pool is still open; exhaust or close it first")
            defaults = dict(chunksize=None, timeout=None, retries=0, retry_on=(Exception,), backoff=0.0,
                            on_error="raise", progress=False)
            unknown = set(options) - set(defaults)
            if unknown:
                raise TypeError(f"unexpected option(s) for a Pool call: {', '.join(sorted(unknown))}")
            defaults.update(options)
            self._active = _run(func, items, star=star, backend=self._backend.name, workers=None,
                                ordered=ordered, initializer=None, initargs=(), backend_options={},
                                pool=self._backend, **defaults)
            return self._active

    def map(self, func: Callable, items: Iterable, **options) -> list:
        return _collect(self._start(func, items, False, True, options))

    def imap(self, func: Callable, items: Iterable, **options) -> Results:
        return self._start(func, items, False, True, options)

    def imap_unordered(self, func: Callable, items: Iterable, **options) -> Results:
        return self._start(func, items, False, False, options)

    def starmap(self, func: Callable, arg_tuples: Iterable, **options) -> list:
        return _collect(self._start(func, arg_tuples, True, True, options))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._active is not None:
                self._active.close()
        self._backend.close()

    def terminate(self) -> None:
        """End the workers at once."""
        with self._lock:
            self._closed = True
        self._backend.close(kill=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.terminate()
        else:
            self.close()
        return False
