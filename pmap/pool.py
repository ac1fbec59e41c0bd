"""pmap.Pool: `multiprocessing.Pool`'s signature and methods, on any pmap backend.

Every method goes through the Pool's one long engine run (`executor.Service`): a call that
crashes its worker or passes its `timeout` fails only its own result, and the Pool goes on.
"""
from __future__ import annotations

import collections
import itertools
import multiprocessing
import multiprocessing.pool
import threading
import traceback
import warnings
from typing import Any, Callable, Iterable, Iterator

from .engine import RunStats
from .errors import RemoteTraceback
from .executor import make_service
from .options import OnError, Options, Workers

_RUN, _CLOSE, _TERMINATE = "RUN", "CLOSE", "TERMINATE"  # multiprocessing.pool's states, by value


def _report_callback_error(what: str) -> None:
    # A callback runs in the Pool's own thread, where raising would end the Pool for everyone:
    # say what went wrong, as an unhandled error in a thread would, and go on.
    warnings.warn(f"pmap.Pool: the {what} raised:\n{traceback.format_exc()}", RuntimeWarning, stacklevel=2)


def _stdlib_cause(error: BaseException) -> BaseException:
    """The worker's traceback as multiprocessing.pool.RemoteTraceback, as a Pool's users read it."""
    cause = error.__cause__
    if isinstance(cause, RemoteTraceback):
        error.__cause__ = multiprocessing.pool.RemoteTraceback(cause.tb_text)
    return error


class ApplyResult:
    """The result of `apply_async`: `get(timeout)`, `wait(timeout)`, `ready()`, `successful()`."""

    def __init__(self, callback: Callable | None = None, error_callback: Callable | None = None):
        self._event = threading.Event()
        self._callback = callback
        self._error_callback = error_callback
        self._success = False
        self._value: Any = None

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        """The value; raises the call's exception, or multiprocessing.TimeoutError after `timeout`."""
        self.wait(timeout)
        if not self.ready():
            raise multiprocessing.TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _set(self, position: int, value: Any, error: BaseException | None) -> None:
        self._success = error is None
        self._value = value if error is None else _stdlib_cause(error)
        self._call_back()
        self._event.set()

    def _call_back(self) -> None:
        # Callbacks run before the result is ready, as in multiprocessing: get() returns after them.
        if self._success and self._callback is not None:
            try:
                self._callback(self._value)
            except Exception:  # reported; see _report_callback_error
                _report_callback_error("callback")
        elif not self._success and self._error_callback is not None:
            try:
                self._error_callback(self._value)
            except Exception:  # reported; see _report_callback_error
                _report_callback_error("error_callback")


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The result of `map_async`/`starmap_async`: ready when every item is done, or at the first
    failure (whose exception `get` raises)."""

    def __init__(self, length: int, callback: Callable | None, error_callback: Callable | None):
        super().__init__(callback, error_callback)
        self._success = True
        self._value = [None] * length
        self._left = length
        self._lock = threading.Lock()
        if length == 0:
            self._call_back()
            self._event.set()

    def _set(self, position: int, value: Any, error: BaseException | None) -> None:
        with self._lock:
            if not self._success:
                return  # the first failure has decided
            if error is None:
                self._value[position] = value
                self._left -= 1
                if self._left:
                    return
            else:
                self._success = False
                self._value = _stdlib_cause(error)
        self._call_back()
        self._event.set()


class IMapIterator(Iterator):
    """The result of `imap`: values in input order; `next(timeout)` raises
    multiprocessing.TimeoutError when the next value is not there in time."""

    def __init__(self, ordered: bool = True):
        self._ordered = ordered
        self._cond = threading.Condition()
        self._values: dict = {}
        self._done: collections.deque = collections.deque()  # unordered: (value, error) as they end
        self._next = 0
        self._length: int | None = None

    def __iter__(self) -> "IMapIterator":
        return self

    def next(self, timeout: float | None = None) -> Any:
        with self._cond:
            while True:
                if self._ordered and self._next in self._values:
                    value, error = self._values.pop(self._next)
                    break
                if not self._ordered and self._done:
                    value, error = self._done.popleft()
                    break
                if self._length is not None and self._next >= self._length:
                    raise StopIteration
                if not self._cond.wait(timeout):
                    raise multiprocessing.TimeoutError
            self._next += 1
        if error is not None:
            raise _stdlib_cause(error)
        return value

    __next__ = next

    def _set(self, position: int, value: Any, error: BaseException | None) -> None:
        with self._cond:
            if self._ordered:
                self._values[position] = (value, error)
            else:
                self._done.append((value, error))
            self._cond.notify_all()

    def _set_length(self, length: int) -> None:
        with self._cond:
            self._length = length
            self._cond.notify_all()


def _start(target: tuple) -> bool:
    return True  # a Pool's calls cannot be cancelled one by one


def _settle(target: tuple, value: Any, error: BaseException | None) -> None:
    result, position = target
    result._set(position, value, error)


class Pool:
    """`multiprocessing.Pool` on any pmap backend, with pmap's guarantees.

    Parameters
    ----------
    processes : int, optional
        Workers to start (the backend's default when None); `workers=` is the same.
    initializer, initargs
        Called as `initializer(*initargs)` in each worker as it starts.
    maxtasksperchild : int, optional
        A worker is replaced after this many calls (backends fork, pool and process; process
        renews its whole executor after `maxtasksperchild` calls per worker). Others refuse it.
    backend : str
        A pmap backend: "process" (the default), "fork", "pool", "thread", "greenlet", "manager",
        "dask" or "serial".
    timeout, retries, retry_on, backoff, on_error, inner_threads, seed, **backend_options
        As for `pmap.Executor`: per call, for every call of the Pool (with `seed`, the n-th call
        submitted to the Pool draws from the streams of `(seed, n)`).

    Raises
    ------
    ValueError
        `processes` (or `maxtasksperchild`) is not a positive integer.
    TypeError
        `initializer` is not callable.
    """

    def __init__(self, processes: int | None = None, initializer: Callable[..., Any] | None = None,
                 initargs: tuple = (), maxtasksperchild: int | None = None, *,
                 backend: str | type = "process", workers: Workers = None, timeout: float | None = None,
                 retries: int = 0, retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
                 backoff: float = 0.0, on_error: OnError = "raise", inner_threads: int | None = None,
                 seed: int | None = None, **backend_options: Any):
        self._state = _TERMINATE  # until the workers are up: __del__ of a half-made Pool says nothing
        if processes is not None and workers is not None:
            raise TypeError("give processes or workers, not both")
        if processes is not None:
            if isinstance(processes, bool) or not isinstance(processes, int):
                raise TypeError(f"processes must be an integer, not {type(processes).__name__}")
            if processes < 1:
                raise ValueError("Number of processes must be at least 1")
            workers = processes
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if maxtasksperchild is not None:
            if isinstance(maxtasksperchild, bool) or not isinstance(maxtasksperchild, int) or maxtasksperchild < 1:
                raise ValueError("maxtasksperchild must be a positive int or None")
            backend_options["max_tasks_per_worker"] = maxtasksperchild
        # A task is one call then, so a worker is replaced after maxtasksperchild calls
        options = Options.from_arguments(locals(), chunksize=1 if maxtasksperchild else None)
        try:
            self._service = make_service(options, _start, _settle, "Pool")
        except TypeError as exc:
            if maxtasksperchild is not None and "max_tasks_per_worker" in str(exc):
                raise TypeError(f"maxtasksperchild needs workers that are processes (backend 'fork', 'pool' or "
                                f"'process'), not backend {backend!r}") from None
            raise
        self._lock = threading.Lock()
        self._state = _RUN

    @property
    def stats(self) -> RunStats:
        """How the Pool's run has gone so far (items, retries, crashes, timeouts)."""
        return self._service.stats

    @property
    def backend(self) -> str:
        return self._service.backend.name

    @property
    def workers(self) -> int:
        return self._service.workers

    def _check_running(self) -> None:
        if self._state != _RUN:
            raise ValueError("Pool not running")

    def _put(self, result: Any, position: int, func: Callable, args: tuple, kwds: dict) -> None:
        self._service.put((result, position), (func, args, kwds))

    # ---- one call -------------------------------------------------------------------------
    def apply(self, func: Callable[..., Any], args: Iterable[Any] = (), kwds: dict | None = None) -> Any:
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Callable[..., Any], args: Iterable[Any] = (), kwds: dict | None = None,
                    callback: Callable[[Any], Any] | None = None,
                    error_callback: Callable[[BaseException], Any] | None = None) -> ApplyResult:
        with self._lock:
            self._check_running()
            result = ApplyResult(callback, error_callback)
            self._put(result, 0, func, tuple(args), dict(kwds or {}))
        return result

    # ---- many calls -----------------------------------------------------------------------
    def map(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int | None = None) -> list:
        return self._map_async(func, iterable, chunksize, None, None, star=False).get()

    def map_async(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int | None = None,
                  callback: Callable[[list], Any] | None = None,
                  error_callback: Callable[[BaseException], Any] | None = None) -> MapResult:
        return self._map_async(func, iterable, chunksize, callback, error_callback, star=False)

    def starmap(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                chunksize: int | None = None) -> list:
        return self._map_async(func, iterable, chunksize, None, None, star=True).get()

    def starmap_async(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                      chunksize: int | None = None, callback: Callable[[list], Any] | None = None,
                      error_callback: Callable[[BaseException], Any] | None = None) -> MapResult:
        return self._map_async(func, iterable, chunksize, callback, error_callback, star=True)

    def _map_async(self, func, iterable, chunksize, callback, error_callback, star) -> MapResult:
        self._check_running()
        _check_chunksize(chunksize)
        items = list(iterable)  # as multiprocessing does: an error of the iterable is raised here
        with self._lock:
            self._check_running()
            result = MapResult(len(items), callback, error_callback)
            for position, item in enumerate(items):
                self._put(result, position, func, tuple(item) if star else (item,), {})
        return result

    def imap(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int = 1) -> IMapIterator:
        return self._imap(func, iterable, chunksize, ordered=True)

    def imap_unordered(self, func: Callable[[Any], Any], iterable: Iterable[Any],
                       chunksize: int = 1) -> IMapIterator:
        return self._imap(func, iterable, chunksize, ordered=False)

    def _imap(self, func, iterable, chunksize, ordered) -> IMapIterator:
        self._check_running()
        _check_chunksize(chunksize, imap=True)
        result = IMapIterator(ordered)
        # The input is read in a thread of its own, as multiprocessing's task handler reads it:
        # imap returns at once, and a slow or endless iterable holds up no one.
        threading.Thread(target=self._feed_imap, args=(func, iter(iterable), chunksize, result),
                         name="pmap-pool-imap", daemon=True).start()
        return result

    def _feed_imap(self, func, items, chunksize: int, result: IMapIterator) -> None:
        position = 0
        try:
            while True:
                # Read a chunk whole before sending it: as in multiprocessing, an error of the
                # iterable takes the place of the chunk it broke, and ends the results.
                chunk = list(itertools.islice(items, chunksize))
                for item in chunk:
                    self._put(result, position, func, (item,), {})
                    position += 1
                if len(chunk) < chunksize:
                    break
        except Exception as exc:  # the iterable failed (or the Pool closed): that is the last value
            result._set(position, None, exc)
            position += 1
        result._set_length(position)

    # ---- life cycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Take no more calls; the workers exit when those queued are done (see `join`)."""
        with self._lock:
            if self._state == _RUN:
                self._state = _CLOSE
                self._service.close()

    def terminate(self) -> None:
        """Stop the workers at once; calls not finished fail (multiprocessing leaves them pending)."""
        with self._lock:
            self._state = _TERMINATE
        self._service.stop()
        self._service.join()  # the workers are gone when it returns

    def join(self) -> None:
        """Wait for the workers to exit; only after `close` or `terminate`."""
        if self._state == _RUN:
            raise ValueError("Pool is still running")
        self._service.join()

    def __enter__(self) -> "Pool":
        self._check_running()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.terminate()  # as multiprocessing.Pool does
        return False

    def __del__(self):
        if getattr(self, "_state", _TERMINATE) == _RUN:
            warnings.warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)
            service = getattr(self, "_service", None)
            if service is not None:
                service.close()

    def __repr__(self) -> str:
        return f"<pmap.Pool state={self._state} backend={self._service.backend.name!r}>"


def _check_chunksize(chunksize: int | None, imap: bool = False) -> None:
    """pmap sizes tasks by measured time; a chunksize is only checked, as multiprocessing does."""
    if chunksize is None and not imap:
        return
    if isinstance(chunksize, bool) or not isinstance(chunksize, int):
        raise TypeError(f"chunksize must be an integer, not {type(chunksize).__name__}")
    if chunksize < 1:
        raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
