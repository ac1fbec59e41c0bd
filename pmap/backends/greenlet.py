"""greenlet: gevent's hub and a gevent.pool.Pool of greenlets, for IO fan-out in the hundreds
or thousands.

Greenlets only take turns where the code yields to gevent's hub: gevent's own sockets and
sleeps, or the standard ones once `gevent.monkey.patch_all()` has run. pmap never patches
anything itself (only a program's entry point may), so it warns once when `socket` or `time`
is not patched, and warns again when a run shows the greenlets running one at a time.

The hub lives in the calling thread and runs only while the engine waits, inside `wait()`.
"""
from __future__ import annotations

import threading
import time

from .._worker import CallerInterrupt, callable_name, caller_interrupts, is_async, run_items
from ..errors import TaskTimeout, warn_user
from .base import Backend, Done, Started

try:
    import gevent
    import gevent.event
    import gevent.pool
    from gevent.monkey import is_module_patched
except ImportError as _exc:  # gevent is a dependency, but a broken install should say so clearly
    gevent = None
    _IMPORT_ERROR = f"gevent cannot be imported ({_exc}); install it with `pip install gevent`"
else:
    _IMPORT_ERROR = None

    class _Cancelled(gevent.GreenletExit):
        """How this backend stops a greenlet; a GreenletExit the function raises itself is only
        that item's error."""

DEFAULT_WORKERS = 256          # sockets open at once by default; far below the fd limit
KILL_GRACE_SECONDS = 1.0       # how long close(kill=True) lets cancelled greenlets unwind
# Run-time check that the calls yield to the hub: judged once this much waiting time has been
# seen with at least two tasks in flight.
BLOCKING_CHECK_SECONDS = 0.5
BLOCKING_MAX_CONCURRENCY = 1.5  # achieved concurrency below this counts as "one at a time"
BLOCKING_MAX_CPU_SHARE = 0.25   # and CPU below this share of wall time: waiting, not computing

_patch_warning_given = False


class NotCooperativeWarning(RuntimeWarning):
    """Greenlets cannot overlap: blocking calls do not yield to gevent's hub."""


class GreenletBackend(Backend):
    name = "greenlet"
    kind = "coroutine"
    guarantees = ("timeout raises TaskTimeout where the item yields to gevent (gevent.Timeout); "
                  "code that never yields cannot be interrupted; crashes take the whole process")
    adaptive_maximum = 1024  # greenlets and coroutines are cheap: the engine's window alone limits them

    @classmethod
    def unavailable_reason(cls):
        return _IMPORT_ERROR

    @classmethod
    def default_workers(cls) -> int:
        return DEFAULT_WORKERS

    def __init__(self, workers=None, initializer=None, initargs=(), **options):
        super().__init__(workers, initializer, initargs, **options)
        self._initialized = False
        self._thread_ident = None     # gevent objects belong to the hub of one thread
        self._pool = None
        self._wake = None
        self._waker = None
        self._events: list = []
        self._outstanding: dict = {}  # task id -> greenlet, from submit until its Done is handed over
        self._cancelled: set = set()  # greenlets told to stop, kept until they are gone
        # Run-time measurement for the "not cooperative" warning.
        self._started_at: dict = {}   # task id -> perf_counter when its greenlet began
        self._spans: list = []        # (start, end) of tasks that finished since the last wait
        self._measured_wall = 0.0
        self._measured_task_seconds = 0.0
        self._measured_cpu = 0.0
        self._blocking_warned = False

    # ---- life cycle ---------------------------------------------------------------------
    def open(self) -> None:
        # Every greenlet shares the calling thread and its globals: the initializer runs once.
        if self.initializer is not None and not self._initialized:
            self.initializer(*self.initargs)
        self._initialized = True

    def prepare(self, fn, timeout=None):
        if is_async(fn):
            raise TypeError(f"backend='greenlet' runs plain functions, and {callable_name(fn)} is an async def "
                            "function: its event loop would stop every greenlet while it runs. "
                            "Use backend='asyncio' for async def functions.")
        self.timeout = timeout
        _warn_if_not_patched()
        self._bind_to_current_thread()
        return fn if timeout is None else _WithDeadline(fn, timeout)

    def _bind_to_current_thread(self) -> None:
        ident = threading.get_ident()
        if ident == self._thread_ident:
            return
        if self._outstanding:
            raise RuntimeError("a greenlet Pool still has work in flight in the thread that started it; "
                               "finish or close that run before using the Pool from another thread")
        self._thread_ident = ident
        self._pool = gevent.pool.Pool(self.workers)
        self._wake = gevent.event.Event()
        # wake() comes from other threads; only the hub's async watcher may be poked from there
        self._waker = gevent.get_hub().loop.async_()
        self._waker.ref = False  # it alone does not keep the hub's loop running
        self._waker.start(self._wake.set)
        self._events = []

    def close(self, kill=False) -> None:
        if self._pool is None or threading.get_ident() != self._thread_ident:
            return  # never touched a hub, or called from another thread (garbage collection)
        # Cancelled greenlets left the pool; wait for them too, so no item still unwinds after the run.
        gevent.killall(list(self._cancelled), _Cancelled, block=True, timeout=KILL_GRACE_SECONDS)
        if kill:
            self._pool.kill(_Cancelled, block=True, timeout=KILL_GRACE_SECONDS)
        else:
            self._pool.join()
        self._outstanding.clear()
        self._cancelled.clear()
        self._started_at.clear()
        self._events = []

    # ---- tasks --------------------------------------------------------------------------
    def capacity(self) -> int:
        return self.workers - len(self._outstanding)

    def submit(self, task) -> None:
        self._outstanding[task.id] = self._pool.spawn(self._run_task, task)

    def _run_task(self, task) -> None:
        me = gevent.getcurrent()
        start = time.perf_counter()
        self._started_at[task.id] = start
        self._events.append(Started(task.id, me.name, time.monotonic()))
        if self.timeout is not None:
            self._wake.set()  # the engine clocks the item's timeout from this event
        try:
            values, failures, elapsed = run_items(task.fn, task.items, passthrough=(CallerInterrupt, _Cancelled))
        except _Cancelled:
            raise  # cancelled: nothing more is reported for this task
        except BaseException as exc:  # a real Ctrl-C belongs to the caller
            self._started_at.pop(task.id, None)
            gevent.get_hub().handle_system_error(type(exc), exc, exc.__traceback__)
            return
        self._started_at.pop(task.id, None)
        self._spans.append((start, time.perf_counter()))
        self._leave_pool(me)  # its slot is free now, not a hub turn later: submit never blocks on it
        self._events.append(Done(task.id, me.name, values, failures, elapsed))
        self._wake.set()

    def _leave_pool(self, greenlet) -> None:
        if greenlet in self._pool:  # Pool.discard frees a slot even for a greenlet it no longer holds
            self._pool.discard(greenlet)

    def wait(self, timeout):
        if not self._events:
            in_flight = len(self._outstanding)
            window_start = time.perf_counter()
            cpu_start = time.thread_time()
            self._spans = []
            if timeout is not None and timeout <= 0:
                with caller_interrupts():
                    gevent.sleep(0)
            else:
                with caller_interrupts():
                    self._wake.wait(timeout)  # the hub runs the greenlets meanwhile
            self._wake.clear()
            if in_flight >= 2 and not self._blocking_warned:
                self._measure(window_start, cpu_start)
        events, self._events = self._events, []
        for event in events:
            if type(event) is Done:
                self._outstanding.pop(event.task_id, None)
        return events

    def wake(self) -> None:
        waker = self._waker
        if waker is not None:
            waker.send()

    def cancel(self, task_id) -> None:
        greenlet = self._outstanding.pop(task_id, None)
        self._started_at.pop(task_id, None)
        if greenlet is None:
            return
        # Out of the pool at once, so its slot is free even if it takes a while to unwind.
        self._leave_pool(greenlet)
        self._cancelled.add(greenlet)
        greenlet.link(self._cancelled.discard)
        greenlet.kill(_Cancelled, block=False)

    def describe_worker(self, worker) -> str:
        return f"greenlet {worker}"

    # ---- the run-time "not cooperative" check -------------------------------------------
    def _measure(self, window_start: float, cpu_start: float) -> None:
        """Add one wait to the tally: wall time, task-seconds run inside it, CPU used."""
        window_end = time.perf_counter()
        task_seconds = sum(end - max(start, window_start) for start, end in self._spans)
        task_seconds += sum(window_end - max(start, window_start) for start in self._started_at.values())
        self._spans = []
        self._measured_wall += window_end - window_start
        self._measured_task_seconds += task_seconds
        self._measured_cpu += time.thread_time() - cpu_start
        if self._measured_wall < BLOCKING_CHECK_SECONDS:
            return
        concurrency = self._measured_task_seconds / self._measured_wall
        cpu_share = self._measured_cpu / self._measured_wall
        self._blocking_warned = True  # judged once per backend, whatever the verdict
        if concurrency < BLOCKING_MAX_CONCURRENCY and cpu_share < BLOCKING_MAX_CPU_SHARE:
            warn_user(f"pmap: the greenlets of backend='greenlet' ran one at a time (achieved concurrency "
                      f"{concurrency:.1f} of {self.workers} workers, CPU {cpu_share:.0%} of wall time): "
                      "the function blocks without yielding to gevent, as time.sleep and socket calls do "
                      "when they are not monkey-patched. Call gevent.monkey.patch_all() at the very start "
                      "of the program, before other imports (`pmap run --gevent-patch` does so), or use "
                      "backend='thread'.",
                      NotCooperativeWarning)


class _WithDeadline:
    """Runs each item under a gevent.Timeout, so a stuck item fails alone with TaskTimeout."""

    __slots__ = ("fn", "seconds")

    def __init__(self, fn, seconds):
        self.fn = fn
        self.seconds = seconds

    def __call__(self, item):
        with gevent.Timeout(self.seconds, TaskTimeout.after(self.seconds)):
            return self.fn(item)


def _warn_if_not_patched() -> None:
    global _patch_warning_given
    if _patch_warning_given:
        return
    _patch_warning_given = True
    missing = [name for name in ("socket", "time") if not is_module_patched(name)]
    if missing:
        names = " and ".join(repr(name) for name in missing)
        warn_user(f"pmap: backend='greenlet' runs on gevent, but {names} "
                  f"{'is' if len(missing) == 1 else 'are'} not monkey-patched, so blocking calls such as "
                  "time.sleep or socket IO stop every greenlet until they return. pmap never patches "
                  "by itself: call gevent.monkey.patch_all() at the very start of the program "
                  "(`pmap run --gevent-patch` does so), or use backend='thread'. Code that only uses "
                  "gevent's own APIs can ignore this warning.",
                  NotCooperativeWarning)


__all__ = ["GreenletBackend", "NotCooperativeWarning"]
