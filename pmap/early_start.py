"""Auto's early start of IO work. While the probe runs the first item in the calling thread, a
watcher thread reads that thread's CPU clock. A first item that has waited EARLY_WATCH_SECONDS
(then twice, four times...) while mostly idle is IO: the watcher begins an ordinary adaptive
engine run of the items after it on threads (`engine.execute(..., dispatch_now=True)`), so an
IO run does not wait out its first item before the rest begin, and the probe ends with that
item. Auto then goes on with that run when it plans threads; otherwise the run takes no more
items, those already started finish, and the rest goes on from there (also when the first
item used enough CPU after the early start that it might be CPU-bound: the early items took
the GIL from it, so its wall time says little, and auto measures another item alone).

Only where the calling thread's CPU clock can be read from another thread (Linux), and only for
lists, tuples and ranges: the run reads them from a second iterator, which has no side effects in
another thread (a database cursor, say, may not be read from another thread)."""
from __future__ import annotations

import itertools
import sys
import threading
import time
from dataclasses import replace
from typing import Callable, Iterator

from . import native
from .backends.thread import ThreadBackend
from .concurrency import Adaptive
from .engine import RunSpec, RunStats, execute
from .probe import Meter

EARLY_WATCH_SECONDS = 0.002   # a first item still running this long (then twice, four times...) may be waiting...
EARLY_IO_SHARE = 0.25         # ...if its CPU so far (the probe's bookkeeping included) is below this share
FIRST_THREADS = 4             # started before the first tasks are queued; the run's controller starts the rest
EARLY_INPUT_TYPES = (list, tuple, range)
# An early start saves at most one item's latency; an IO run of more items than this lasts at
# least 40 latencies even on ThreadBackend.adaptive_maximum threads, and a run this long (or
# one of tiny items) gains less than the watcher thread costs to start (0.06 to 0.3 ms).
EARLY_MAX_ITEMS = 10_000


def can_start_early(spec: RunSpec) -> bool:
    return (type(spec.items) in EARLY_INPUT_TYPES and 1 < len(spec.items) <= EARLY_MAX_ITEMS
            and sys.platform.startswith("linux") and hasattr(time, "pthread_getcpuclockid"))


def _blocked(stat_path: str) -> bool:
    """The thread sleeps (S, D), rather than runs or waits for a core (R); True where unknown."""
    try:
        with open(stat_path, "rb") as stat_file:
            stat = stat_file.read()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2:][:1] in (b"S", b"D")  # the state follows the command's name


class EarlyStart:
    """Watches the probe's first item (see the module's docstring), from the moment the probe's
    meter starts; the probe calls `ended()` before it reads past that item.
    `count(elapsed, cpu)` says how many items to start from the first item's time so far and
    its CPU; `make_threads()` makes the (unopened) thread backend they run on."""

    def __init__(self, spec: RunSpec, stats: RunStats, meter: Meter, count: Callable[[float, float], int],
                 make_threads: Callable[[], ThreadBackend]):
        self.spec = spec
        self.stats = stats
        self.meter = meter
        self.count = count
        self.make_threads = make_threads
        self.caller_clock = time.pthread_getcpuclockid(threading.get_ident())
        task = f"/proc/self/task/{threading.get_native_id()}"
        self.caller_schedstat, self.caller_stat = f"{task}/schedstat", f"{task}/stat"
        self.lock = threading.Lock()  # the first item's end against the early start
        self.first_over = False
        self.stopping = threading.Event()
        self.closed = False  # the run takes no more items
        self.taken = 0       # items the run took, after the first
        self.backend: ThreadBackend | None = None
        self.run: Iterator | None = None  # the engine run of the items after the first
        self.bounds: Adaptive | None = None  # ...and its concurrency
        self.error: BaseException | None = None
        self.items = 0                    # items it started
        self.started_at = self.cpu_at_start = 0.0  # the first item's time and CPU when the early start began
        # Started before the probe's meter: its CPU, like any thread's that was there, is not the item's.
        self.watcher = threading.Thread(target=self._watch, name="pmap-early-start", daemon=True)
        self.watcher.start()

    # ---- what the probe tells it ----------------------------------------------------------
    def ended(self) -> bool:
        """The first item is over: True when the items after it started early (the probe ends
        there). Wakes no thread: the probe's time is not the watcher's."""
        with self.lock:
            self.first_over = True
            return self.backend is not None

    # ---- what auto does with it -------------------------------------------------------------
    def finish(self) -> Iterator | None:
        """Stop watching. The run of the items after the first, when they started early."""
        self.stop()
        if self.backend is not None and self.error is not None:
            raise self.error
        return self.run

    def stop(self) -> None:
        self.ended()
        self.stopping.set()
        self.watcher.join()

    def drain(self) -> list:
        """Start no more items: those started finish here. Their results, in order."""
        self.closed = True
        stats = self.stats
        workers = stats.workers  # the run reports its plan's workers, not these threads
        try:
            return [value for batch in self.run for value in batch]
        finally:
            self.close()
            stats.workers, stats.concurrency = workers, []

    def close(self, kill: bool = False) -> None:
        self.closed = True
        if self.run is not None:
            self.run.close()
        if self.backend is not None:
            self.backend.close(kill=kill)

    # ---- the watcher ------------------------------------------------------------------------
    def _watch(self) -> None:
        try:
            self._start_if_waiting()
        except Exception as exc:  # finish() raises it if items started; else the probe went on as without us
            self.error = exc

    def _start_if_waiting(self) -> None:
        meter = self.meter
        look_at = EARLY_WATCH_SECONDS
        while True:  # looks at 2, 4, 8... ms: a first connection's set-up may cost CPU at first
            # the meter's clocks are set last when the probe starts; until then, wait from now
            began = meter.started if meter.clocks is not None else time.perf_counter()
            if self.stopping.wait(max(0.0, began + look_at - time.perf_counter())) or self.first_over:
                return  # the first item ended first
            if meter.clocks is None or time.perf_counter() - meter.started < look_at:
                continue  # the probe began after this thread: look at the item's own time
            elapsed = time.perf_counter() - meter.started
            cpu = time.clock_gettime(self.caller_clock) - meter.clocks.thread
            # Time the caller's thread spent waiting for a core is not the item's waiting. Only
            # the item's own thread counts: an item whose thread waits on native threads reads
            # as IO to the probe too, and other threads' CPU says nothing of the item.
            queued = (native.schedstat_seconds(self.caller_schedstat, native.SCHEDSTAT_WAITING) or 0.0) \
                - meter.queued_at_start
            # A thread waiting for a core right now has not counted that wait yet: only a
            # blocked one is waiting on something.
            if cpu < EARLY_IO_SHARE * (elapsed - queued) and _blocked(self.caller_stat):
                break
            look_at *= 2
        count = self.count(elapsed, cpu)
        backend = self.make_threads()
        backend.set_concurrency(FIRST_THREADS)
        try:
            backend.open()
        except BaseException:
            backend.close(kill=True)  # the threads that did start
            raise
        with self.lock:
            if self.first_over:
                backend.close()
                return
            self.backend = backend
        self.started_at, self.cpu_at_start = elapsed, cpu
        maximum = ThreadBackend.adaptive_maximum
        self.bounds = Adaptive(start=min(count, maximum), maximum=maximum)
        rest = replace(self.spec, items=self._items_after_first(), start_index=self.spec.start_index + 1,
                       items_offset=0, concurrency=self.bounds)
        self.run = execute(backend, rest, self.stats, dispatch_now=True)
        self.items = self.taken

    def _items_after_first(self) -> Iterator:
        for item in itertools.islice(self.spec.items, 1, None):
            if self.closed:
                return
            self.taken += 1
            yield item

