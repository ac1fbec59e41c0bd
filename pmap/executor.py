"""pmap.Executor, a concurrent.futures.Executor, and the long run that serves it and pmap.Pool.

Submitted calls go into an `engine.Feed`; one dispatcher thread per Executor (or Pool) drives
one ordinary engine run over that feed for the executor's whole life, so a submitted call gets
the policy of `pmap.pmap` (retries, timeouts, a crash costing only its own item). The engine
hands each finished item to `Service._deliver`, which settles that call's target (a Future,
or an entry of a Pool's result).
"""
from __future__ import annotations

import atexit
import concurrent.futures as cf
import sys
import threading
import weakref
from typing import Any, Callable, Iterable, Iterator

from ._worker import call_submitted
from .api import _open
from .backends.base import backend_class
from .engine import Feed, RunStats, execute
from .errors import Failure, ItemNotPicklable, failure_exception, short_repr
from .options import OnError, Options


# shutdown(cancel_futures=True) lets the engine take, for this long at most, the calls its workers
# have room for: as a standard executor's workers would have taken them already.
CANCEL_SETTLE_SECONDS = 0.05


class _Shown:
    """How a submitted call reads in a failure's note: `func(1, x=2)`."""

    __slots__ = ("text",)

    def __init__(self, call: tuple):
        func, args, kwargs = call
        name = getattr(func, "__qualname__", None) or type(func).__name__
        parts = [short_repr(a) for a in args] + [f"{k}={short_repr(v)}" for k, v in kwargs.items()]
        self.text = f"{name}({', '.join(parts)})"

    def __repr__(self) -> str:
        return self.text


class _Submissions(Feed):
    """The feed of a Service: (target, call) pairs, of which the engine sees the calls. A target
    cancelled before the engine takes it is dropped; the others are numbered as the engine
    numbers items, so a finished item finds its target."""

    def __init__(self, wake: Callable[[], None], start: Callable[[Any], bool]):
        super().__init__(wake)
        self._start = start
        self.took = threading.Event()  # set as the engine takes entries
        self.targets: dict[int, tuple] = {}  # item index -> (target, call); only the run's thread
        self._taken = 0

    @property
    def stopped(self) -> bool:
        # Also when the program ended on an uncaught Ctrl-C: exit hooks (loky's among them) may
        # wait for running calls, and the run's own thread then ends them (see _end_at_exit).
        return self._stopped or _exiting_after_ctrl_c()

    @stopped.setter
    def stopped(self, value: bool) -> None:
        self._stopped = value

    def admit(self, entries: list) -> list:
        self.took.set()
        calls = []
        for target, call in entries:
            if self._start(target):
                self.targets[self._taken] = (target, call)
                self._taken += 1
                calls.append(call)
        return calls

    def take_pending(self, settle_seconds: float = 0.0) -> list:
        """The entries not yet taken by the engine, removed; first, the engine is given up to
        `settle_seconds` to take what its workers have room for (it may not have run since
        they were put)."""
        if settle_seconds:
            self.took.clear()
            self._wake()
            self.took.wait(settle_seconds)
        with self._lock:
            entries, self._items = list(self._items), type(self._items)()
        return entries


class Service:
    """One long engine run over submitted calls, driven by its own thread.

    `start(target) -> bool` marks a target running as the engine takes it (False: it was
    cancelled, skip it); `settle(target, value, error)` reports its outcome, from the run's thread.
    """

    def __init__(self, options: Options, start: Callable[[Any], bool],
                 settle: Callable[[Any, Any, BaseException | None], None], name: str):
        self.on_error = options.on_error
        self.options = Options(**{**options.as_dict(), "on_error": "return", "ordered": False})
        self.start = start
        self.settle = settle
        self.backend, self.bounds = _open(self.options)
        self.backend.items_hold_functions = True
        # The first workers start here, in the caller's thread: a fork then copies no lock that
        # the dispatcher thread happens to hold.
        self.backend.prepare(call_submitted, self.options.timeout)
        self.feed = _Submissions(self.backend.wake, start)
        self.stats = RunStats()
        self.error: BaseException | None = None  # what ended the run early (an initializer failed)
        self.thread = threading.Thread(target=self._drive, name=f"pmap-{name}-dispatcher", daemon=True)
        self.thread.start()
        _LIVE.add(self)
        _watch_exit()

    @property
    def workers(self) -> int:
        return self.backend.workers

    def put(self, target: Any, call: tuple) -> None:
        """Queue `call` for `target`; RuntimeError once the service is closed or broken."""
        self.feed.put((target, call))

    def close(self) -> None:
        """No more calls; the run ends when those queued are done."""
        self.feed.close()

    def stop(self) -> None:
        """End now: the workers are killed, and every call not finished fails."""
        for target, _ in self.feed.close(stop=True):
            self.settle(target, None, _stopped())

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)

    # ---- the run's thread ----------------------------------------------------------------
    def _drive(self) -> None:
        spec = self.options.run_spec(call_submitted, self.feed, None, concurrency=self.bounds)
        spec.deliver = self._deliver
        error = None
        try:
            for _ in execute(self.backend, spec, self.stats):
                pass  # nothing is yielded: every result goes to _deliver
        except BaseException as exc:  # noqa: B036  (the run cannot go on: its calls fail with this)
            error = exc
        stopped = self.feed.stopped or error is not None
        try:
            self.backend.close(kill=stopped)
        finally:
            self._fail_the_rest(error)

    def _fail_the_rest(self, error: BaseException | None) -> None:
        self.error = error
        left = self.feed.close(stop=True)  # a broken run takes no more calls
        for target, _ in [*self.feed.targets.values(), *left]:
            self.settle(target, None, error if error is not None else _stopped())
        self.feed.targets.clear()
        _LIVE.discard(self)

    def _deliver(self, index: int, value: Any) -> None:
        target, call = self.feed.targets.pop(index)
        if type(value) is not Failure:
            self.settle(target, value, None)
            return
        value.item = _Shown(call)
        exc = value.exception
        if isinstance(exc, ItemNotPicklable) and exc.__cause__ is not None:
            exc = exc.__cause__  # the pickling error itself, as the standard library reports it
        elif self.on_error == "return":
            self.settle(target, value, None)
            return
        else:
            exc = failure_exception(value, self.backend.name)
        self.settle(target, None, exc)


def _stopped() -> BaseException:
    return cf.CancelledError("pmap: the pool or executor was terminated before this call finished")


_LIVE: "weakref.WeakSet[Service]" = weakref.WeakSet()
_exit_watched = False


def _watch_exit() -> None:
    """Run `_end_at_exit` as the interpreter exits. threading's exit hooks (where
    concurrent.futures and loky wait for their running work, and after which loky takes no
    more) run newest first: registered once the first Executor or Pool has opened its backend
    (and loky registered its own hook), ours runs first."""
    global _exit_watched
    if _exit_watched:
        return
    _exit_watched = True
    register = getattr(threading, "_register_atexit", None)  # concurrent.futures' own hook
    try:
        register(_end_at_exit)
    except (TypeError, RuntimeError):  # no such hook here, or the interpreter is already exiting
        atexit.register(_end_at_exit)


def _exiting_after_ctrl_c() -> bool:
    """The interpreter is exiting, and the program ended on an uncaught KeyboardInterrupt."""
    return (getattr(threading, "_SHUTTING_DOWN", False)  # set as threading's exit hooks start
            and isinstance(getattr(sys, "last_exc", getattr(sys, "last_value", None)), KeyboardInterrupt))


def _end_at_exit() -> None:
    """At exit, calls still queued are finished first, as the standard library's executors do;
    after an uncaught Ctrl-C they are dropped and the workers killed at once."""
    interrupted = _exiting_after_ctrl_c()
    for service in list(_LIVE):
        if interrupted:
            service.stop()
        else:
            service.close()
    for service in list(_LIVE):
        service.join()


def _start_future(future: cf.Future) -> bool:
    return future.set_running_or_notify_cancel()


def _settle_future(future: cf.Future, value: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled while still queued: a terminated executor fails only the rest
        return
    if error is None:
        future.set_result(value)
    elif isinstance(error, cf.CancelledError) and future.cancel():
        return
    else:
        future.set_exception(error)


class Executor(cf.Executor):
    """A `concurrent.futures.Executor` on any pmap backend, with pmap's guarantees.

    A call that crashes its worker (segfault, `os._exit`, out of memory) or runs past `timeout`
    fails only its own future, with `pmap.WorkerCrashed` or `pmap.TaskTimeout`; the executor goes
    on with a replacement worker. Calls travel with cloudpickle (lambdas and closures work).

    Parameters
    ----------
    max_workers : int, optional
        Workers to start (the backend's default when None).
    backend : str
        A pmap backend: "process" (loky, the default), "fork", "pool", "thread", "greenlet",
        "manager", "dask" or "serial".
    initializer, initargs
        Called as `initializer(*initargs)` in each worker as it starts.
    timeout : float, optional
        Seconds a call may run, from when its worker starts it; past it the call's future
        fails with `pmap.TaskTimeout` (process backends kill and replace the worker).
    retries, retry_on, backoff
        Re-run a call that raised one of `retry_on`, timed out or lost its worker, up to
        `retries` times, waiting `backoff` seconds (doubling) before each.
    on_error : {"raise", "return"}
        "raise": a failed call's future raises its exception (with the worker's traceback as
        `__cause__`); "return": its result is a `pmap.Failure`.
    inner_threads : int, optional
        Native (BLAS/OpenMP) threads per worker.
    seed : int, optional
        The random streams of the n-th call submitted derive from `(seed, n)` (`pmap.rng()`).
    chunksize : int, optional
        Calls per task. None (the default) groups calls that arrive together by their measured
        time, for throughput; a fast call may then finish with a slow one sent beside it. 1
        runs every call alone, as the standard executors do.
    **backend_options
        Options of the backend (for example `start_method` for "pool").

    Raises
    ------
    ValueError
        `max_workers` is not positive, or an option has a bad value.
    """

    def __init__(self, max_workers: int | None = None, *, backend: str | type = "process",
                 initializer: Callable[..., Any] | None = None, initargs: tuple = (),
                 timeout: float | None = None, retries: int = 0,
                 retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
                 backoff: float = 0.0, on_error: OnError = "raise", inner_threads: int | None = None,
                 seed: int | None = None, chunksize: int | None = None, **backend_options: Any):
        if max_workers is not None and not isinstance(max_workers, bool) and isinstance(max_workers, int) \
                and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        options = Options.from_arguments(locals(), workers=max_workers)
        self._service = make_service(options, _start_future, _settle_future, "Executor")
        self._shutdown = False
        self._shutdown_lock = threading.Lock()

    @property
    def stats(self) -> RunStats:
        """How the executor's run has gone so far (items, retries, crashes, timeouts)."""
        return self._service.stats

    @property
    def backend(self) -> str:
        return self._service.backend.name

    @property
    def workers(self) -> int:
        return self._service.workers

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        future: cf.Future = cf.Future()
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            try:
                self._service.put(future, (fn, args, kwargs))
            except RuntimeError:
                raise cf.BrokenExecutor(f"the executor cannot run more calls: {self._service.error!r}") \
                    from self._service.error
        return future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, **kwargs: Any) -> Iterator[Any]:
        """As `concurrent.futures.Executor.map`. `chunksize` is accepted for compatibility: the
        engine groups calls into tasks by their measured time."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        return super().map(fn, *iterables, timeout=timeout, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._shutdown_lock:
            self._shutdown = True
            if cancel_futures:  # calls the workers have room for start; the others are cancelled
                for future, _ in self._service.feed.take_pending(settle_seconds=CANCEL_SETTLE_SECONDS):
                    future.cancel()
            self._service.close()
        if wait:
            self._service.join()

    def terminate(self) -> None:
        """End at once: the workers are killed, and every future not done is cancelled."""
        with self._shutdown_lock:
            self._shutdown = True
        self._service.stop()
        self._service.join()

    def __exit__(self, exc_type, exc_val, exc_tb) -> bool:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.terminate()  # Ctrl-C: nothing more is waited for
        else:
            self.shutdown(wait=True)
        return False


def make_service(options: Options, start: Callable, settle: Callable, name: str) -> Service:
    if options.backend == "auto":
        raise ValueError(f"a {name} needs a concrete backend ('process', 'thread', 'fork', ...); "
                         "use pmap.explain(func, items) to see which one auto would pick")
    if options.on_error == "skip":
        raise ValueError(f"on_error='skip' has no meaning for a {name}: each call has its own result; "
                         "use 'raise' (the default) or 'return'")
    if backend_class(options.backend).name == "asyncio":
        raise ValueError(f"a {name} runs plain calls, and backend 'asyncio' runs only async def functions: "
                         "use backend='thread', or pmap.apmap / pmap.aimap for async def functions")
    return Service(options, start, settle, name)

