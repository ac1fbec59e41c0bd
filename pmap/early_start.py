"""Auto's early start of IO work. While the probe runs the first item in the calling thread, a
watcher reads that thread's CPU clock. A first item that has waited EARLY_WATCH_SECONDS while
mostly idle is IO: the next items start on threads at once, so an IO run does not wait out its
first item before the rest begin. When the first item ends, the run takes those tasks over.
If the item used enough CPU after the early start that it might be CPU-bound (the early items
then took the GIL from it, and its wall time says little), they finish first, and the probe
measures another item alone (auto._surely_waiting).

Only where the calling thread's CPU clock can be read from another thread (Linux), and only for
lists, tuples and ranges: reading those from the watcher thread has no side effects (a
database cursor, say, may not be read from another thread)."""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable

from .backends.thread import ThreadBackend
from .engine import RunSpec, submit_ahead
from .probe import Budgeted, Meter

EARLY_WATCH_SECONDS = 0.002   # a first item still running this long (then twice, four times...) may be waiting...
EARLY_IO_SHARE = 0.25         # ...if its CPU so far (the probe's bookkeeping included) is below this share
FIRST_THREADS = 4             # started before the tasks are queued; the rest right after
THREADS_PER_LOOK = 8          # threads started ahead between two looks at the first item's CPU clock
EARLY_INPUT_TYPES = (list, tuple, range)


def can_start_early(spec: RunSpec) -> bool:
    return (type(spec.items) in EARLY_INPUT_TYPES and len(spec.items) > 1 and sys.platform.startswith("linux")
            and hasattr(time, "pthread_getcpuclockid"))


class EarlyStart:
    """Watches the probe's first item (see the module's docstring). `count(elapsed, cpu)` says
    how many items to start from the first item's time so far and its CPU; `make_threads()`
    makes the (unopened) thread backend they run on; `threads_ahead(count)`, how many threads
    to have ready for the run that follows."""

    def __init__(self, spec: RunSpec, budget: Budgeted, meter: Meter, count: Callable[[float, float], int],
                 make_threads: Callable[[], ThreadBackend], threads_ahead: Callable[[int], int]):
        self.spec = spec
        self.budget = budget
        self.meter = meter
        self.count = count
        self.make_threads = make_threads
        self.threads_ahead = threads_ahead
        self.caller_clock = time.pthread_getcpuclockid(threading.get_ident())
        self.stopping = threading.Event()
        self.backend: ThreadBackend | None = None
        self.tasks: tuple = ()
        self.started_at = self.cpu_at_start = 0.0  # the first item's time and CPU when the early start began
        # Started before the probe's meter: its CPU, like any thread's that was there, is not the item's.
        self.watcher = threading.Thread(target=self._watch, name="pmap-early-start", daemon=True)
        self.watcher.start()

    def threads(self) -> list[int]:
        """Native ids of the threads that ran beside the first item: the watcher, the workers."""
        ids = [self.watcher.native_id]
        backend = self.backend
        if backend is not None:
            with backend.lock:
                ids.extend(thread.native_id for thread in backend.threads)
        return [native_id for native_id in ids if native_id is not None]

    def finish(self) -> tuple[ThreadBackend, tuple] | None:
        """Stop watching; (the thread backend, the tasks it runs) when items started early."""
        self.stopping.set()
        self.budget.first_given.set()  # wakes a watcher still waiting for the first item
        self.watcher.join()
        if not self.tasks:
            self.close()
            return None
        return self.backend, self.tasks

    def close(self, kill: bool = False) -> None:
        if self.backend is not None:
            self.backend.close(kill=kill)
            self.backend = None

    def _watch(self) -> None:
        try:
            self._start_if_waiting()
        except Exception:  # no thread could start, say: the probe goes on as without us
            pass
        finally:
            self.stopping.wait()  # alive until the meter has read the threads' clocks

    def _start_if_waiting(self) -> None:
        budget, meter = self.budget, self.meter
        budget.first_given.wait()
        look_at = EARLY_WATCH_SECONDS
        while True:  # looks at 2, 4, 8... ms: a first connection's set-up may cost CPU at first
            if self.stopping.wait(max(0.0, meter.started + look_at - time.perf_counter())):
                return  # the probe ended first
            elapsed = time.perf_counter() - meter.started
            cpu = time.clock_gettime(self.caller_clock) - meter.clocks.thread
            # Only the item's own thread counts: an item whose thread waits on native threads
            # reads as IO to the probe too, and other threads' CPU says nothing of the item.
            if cpu < EARLY_IO_SHARE * elapsed:
                break
            look_at *= 2
        self.started_at, self.cpu_at_start = elapsed, cpu
        count = self.count(elapsed, cpu)
        backend = self.make_threads()
        backend.set_concurrency(min(count, FIRST_THREADS))
        try:
            fn = backend.prepare(self.spec.fn, self.spec.timeout)  # opens it
        except BaseException:
            backend.close(kill=True)
            raise
        self.backend = backend
        items = budget.hand_over(count, still_first=lambda: not self.stopping.is_set())
        if not items:
            return  # the first item ended meanwhile: finish() closes the backend
        self.tasks = submit_ahead(backend, fn, items, self.spec.start_index + 1)
        backend.set_concurrency(count, background=False)
        self._start_threads_ahead(backend, count)

    def _start_threads_ahead(self, backend: ThreadBackend, count: int) -> None:
        """Start the threads the run's first rise of its limit will want, while the first item
        still waits: then they take no GIL from it, and none from the run once it goes on."""
        target = min(len(self.spec.items), self.threads_ahead(count))
        cpu_before, before = time.clock_gettime(self.caller_clock), time.perf_counter()
        for threads in range(count + THREADS_PER_LOOK, target + THREADS_PER_LOOK, THREADS_PER_LOOK):
            if self.stopping.is_set():
                return
            cpu, now = time.clock_gettime(self.caller_clock), time.perf_counter()
            if cpu - cpu_before >= EARLY_IO_SHARE * (now - before):
                return  # the first item computes now
            cpu_before, before = cpu, now
            backend.set_concurrency(min(threads, target), background=False)
