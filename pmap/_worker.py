"""What runs inside a worker: one task's items, and the wire format of tasks and results."""
from __future__ import annotations

import inspect
import os
import pickle
import signal
import sys
import time
import traceback
import weakref

import cloudpickle

from .errors import ItemNotPicklable, portable_exception

_PROTOCOL = pickle.HIGHEST_PROTOCOL


class StarCall:
    """`func(*args)` per item, for starmap; picklable whenever `func` is."""

    __slots__ = ("func",)

    def __init__(self, func):
        self.func = func

    def __call__(self, args):
        return self.func(*args)

    def __reduce__(self):
        return (StarCall, (self.func,))


def run_items(fn, items, catch=Exception):
    """Run `fn` over `items`; return (values, failures, elapsed). Failures hold
    (position, exception, traceback text); a failing item never stops the others.
    An `async def` function runs in an event loop of this worker's own."""
    if is_async(fn):
        return _run_async_items(fn, items, catch)
    values = []
    failures = []
    pending = iter(items)
    start = time.perf_counter()
    while True:
        try:
            values.extend(map(fn, pending))  # stops at a failing item; the values before it stay
            break
        except catch as exc:
            tb = exc.__traceback__.tb_next or exc.__traceback__  # start at the user's frame, not this one
            failures.append((len(values), exc, "".join(traceback.format_exception(type(exc), exc, tb))))
            values.append(None)
    return values, failures, time.perf_counter() - start


def _run_async_items(fn, items, catch):
    import asyncio
    loop = asyncio.new_event_loop()
    try:
        return run_items(lambda item: loop.run_until_complete(fn(item)), items, catch)
    finally:
        loop.close()


def dumps(obj) -> bytes:
    """Plain pickle first (fast); cloudpickle for lambdas, closures and __main__ objects."""
    try:
        return pickle.dumps(obj, _PROTOCOL)
    except Exception:
        pass
    try:
        return cloudpickle.dumps(obj, _PROTOCOL)
    except Exception as exc:
        raise ItemNotPicklable(f"cannot pickle the task to send it to a worker: {type(exc).__name__}: {exc}") from exc


loads = pickle.loads


def encode_result(task_id, values, failures, elapsed) -> bytes:
    """Pickle a task's outcome; an unpicklable value or exception becomes that item's failure."""
    try:
        return pickle.dumps((task_id, values, failures, elapsed), _PROTOCOL)
    except Exception:
        pass
    failures = [(pos, portable_exception(exc), tb) for pos, exc, tb in failures]
    failed = {pos for pos, _, _ in failures}
    for pos, value in enumerate(values):
        if pos in failed:
            continue
        try:
            pickle.dumps(value, _PROTOCOL)
        except Exception as exc:
            values[pos] = None
            error = TypeError(f"result of type {type(value).__name__} cannot be pickled "
                              f"to send it back from the worker: {exc}")
            failures.append((pos, error, ""))
    failures.sort(key=lambda f: f[0])
    return pickle.dumps((task_id, values, failures, elapsed), _PROTOCOL)


# A worker process also isolates SystemExit from one item; KeyboardInterrupt is the caller's.
WORKER_CATCH = (Exception, SystemExit)

_PR_SET_PDEATHSIG = 1


def become_worker_process(own_process_group: bool = True, driver_pid: int | None = None) -> None:
    """Settings every worker process takes: Ctrl-C is the caller's to handle, the worker dies
    with its parent (and with the driver, when a forkserver stands between them), and it leads
    its own process group so a kill reaches its children."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if driver_pid is not None and driver_pid != os.getppid():
        _exit_when_gone(driver_pid)
    if own_process_group and hasattr(os, "setpgid"):
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
    prctl = load_prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_prctl = None


def load_prctl():
    """libc's prctl (Linux), loaded once: a parent that loads it before forking spares every
    forked worker the import of ctypes (a few ms of CPU each)."""
    global _prctl
    if _prctl is None and sys.platform.startswith("linux"):
        try:
            import ctypes
            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        except Exception:
            _prctl = False
    return _prctl or None


def _exit_when_gone(pid: int) -> None:
    """A daemon thread that ends this process as soon as process `pid` ends."""
    import threading

    def watch():
        try:
            fd = os.pidfd_open(pid)
            import select
            select.select([fd], [], [])
        except (AttributeError, OSError):  # no pidfd here: poll
            while True:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    pass
                time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="pmap-driver-watch", daemon=True).start()


def callable_name(fn) -> str:
    """A function's name for messages; starmap's wrapper and functools.partial unwrapped."""
    target = getattr(fn, "func", fn)
    return getattr(target, "__qualname__", None) or type(target).__name__


_ASYNC_SEEN = weakref.WeakKeyDictionary()  # fn -> is_async(fn): asked once per task, so remember


def is_async(fn) -> bool:
    """True for an `async def` function (also behind starmap's StarCall or a callable object)."""
    target = fn.func if isinstance(fn, StarCall) else fn
    try:
        return _ASYNC_SEEN[target]
    except (KeyError, TypeError):
        pass
    answer = inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(getattr(target, "__call__", None))
    try:
        _ASYNC_SEEN[target] = answer
    except TypeError:  # not weak-referenceable or unhashable: ask every time
        pass
    return answer


# ---- workers that receive the function as bytes (process, pool, manager, dask) -----------
_FUNCTIONS: dict = {}
_FUNCTION_CACHE_SIZE = 8


def cached_function(key, fetch_bytes, cache: dict = _FUNCTIONS):
    """The function stored under `key`, unpickled once: `fetch_bytes()` gives its bytes on a
    miss. A long-lived worker serves many runs, so only a few functions are kept."""
    fn = cache.get(key)
    if fn is None:
        if len(cache) >= _FUNCTION_CACHE_SIZE:
            cache.clear()
        fn = cache[key] = loads(fetch_bytes())
    return fn


def every_item_failed(n_items: int, exc: BaseException) -> tuple[list, list]:
    """(values, failures) of a task that could not run at all, for the exception being handled."""
    tb = traceback.format_exc()
    n = max(1, n_items)
    return [None] * n, [(i, exc, tb) for i in range(n)]


def pooled_worker_init(initializer_bytes, driver_pid=None):
    become_worker_process(driver_pid=driver_pid)
    if initializer_bytes is not None:
        initializer, initargs = loads(initializer_bytes)
        initializer(*initargs)


def run_pooled_task(payload: bytes) -> bytes:
    """Run one task. Its start is recorded in a file naming this worker's pid, so the
    parent knows which process to end on a timeout and which task a dead worker held."""
    task_id, key, fn_bytes, items, start_dir = pickle.loads(payload)
    marker = os.path.join(start_dir, str(task_id))
    with open(marker, "w") as handle:
        handle.write(str(os.getpid()))
    fn = cached_function(key, lambda: fn_bytes)
    result = encode_result(task_id, *run_items(fn, items, catch=WORKER_CATCH))
    try:
        os.unlink(marker)
    except OSError:
        pass
    return os.getpid(), result
