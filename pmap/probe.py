"""Measuring the first items of an auto run: wall time against this thread's and the
process's CPU time, time spent waiting for a core, the bytes a process backend would move,
and whether two items in two threads overlap (the GIL probe). `auto` decides from these."""
from __future__ import annotations

import itertools
import threading
import time
from typing import Iterator

try:
    import resource
except ImportError:  # Windows
    pass

import cloudpickle

from . import native
from ._transfer import measure as measure_pickle

PROBE_MIN_ITEMS = 2
PROBE_SECONDS = 0.02        # serial probe budget: enough items to measure, a small share of any run worth parallelising
PROBE_SHARE = 0.02          # with a known length, the probe stops at this share of the estimated serial time
PROBE_MIN_SECONDS = 0.00025 # ...but only once it has measured this much
PROBE_CHECK_SECONDS = 0.0005  # how much work passes between two looks at the clock
PROBE_MAX_SECONDS = 0.25    # one slow item stops the probe at once
IO_PROBE_MIN_SECONDS = 0.001  # a first item that waited this long, mostly idle, is probe enough
PROBE_CHUNK_SECONDS = 0.002 # the probe reads items in chunks of about this much work
GIL_PROBE_MIN_ITEM = 5e-4   # below this, running two items in two threads measures noise
# CPU seconds per wall second of two threads: above 1, both ran at once (1.25 leaves room for
# a busy machine; a machine whose cores are all taken hides the overlap, and auto then picks
# processes, which still run in parallel)
GIL_RELEASED_OVERLAP = 1.25
# ...and for items that ran native threads: the BLAS helpers the serial probe woke still spin for
# a while, taking a core from the two threads (with the GIL held the sum stays at most 1)
NATIVE_GIL_RELEASED_OVERLAP = 1.1
CPU_BOUND_SHARE = 0.3       # CPU share of wall time from which work counts as CPU-bound
# Process CPU from this share of the thread's CPU on: the item ran native threads (BLAS, OpenMP)
NATIVE_THREADS_SHARE = 1.2
# ...if that extra CPU is also this share of the item's wall time: the process's other threads
# (a progress bar, a library's helpers) spend a little CPU during any probe
NATIVE_CPU_SHARE = 0.2
TRANSFER_BYTES_PER_SECOND = 1.0e9
SHARED_MEMORY_BYTES_PER_SECOND = 2.0e10  # one copy into shared memory; the reader maps it


class Meter:
    """Measures the probe as a whole: wall time less the time spent waiting for a core, and
    this thread's CPU time. Timing each call would cost more than a trivial function does."""

    def __init__(self):
        self.calls = 0
        self.wall = 0.0
        self.cpu = 0.0
        self.process_cpu = 0.0  # every thread's, native pools' included
        self.clocks: native.CpuClocks | None = None
        self.bytes = 0
        self.unpicklable: str | None = None  # why a process backend could not take the items
        self.started = self.queued_at_start = 0.0
        self.switches_at_start: tuple[int, int] | None = None

    def size(self, item, result) -> None:
        """Transfer cost: what a process backend would pickle for one item and its result, in
        pipe bytes; buffers that go through shared memory count at their (far lower) cost.
        When either cannot be pickled, `unpicklable` says which and why: no process can take
        the work."""
        piped = shared = 0
        for what, obj in (("item", item), ("result", result)):
            try:
                sizes = _pickled_size(obj)
            except Exception as exc:  # whatever pickling raises, a process backend would meet it too
                self.unpicklable = f"the first {what} cannot be pickled ({type(exc).__name__}: {exc})"
                self.bytes = 0
                return
            piped, shared = piped + sizes[0], shared + sizes[1]
        self.bytes = piped + int(shared * TRANSFER_BYTES_PER_SECOND / SHARED_MEMORY_BYTES_PER_SECOND)

    def start(self) -> None:
        self.queued_at_start = _run_queue_seconds()
        self.switches_at_start = _context_switches()
        self.started, self.clocks = time.perf_counter(), native.CpuClocks()  # last: the reads above are not the function's

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def cpu_so_far(self) -> float:
        return time.thread_time() - self.clocks.thread

    def queued(self) -> float:
        """Seconds this thread waited for a core since start(): not the probe's own time."""
        switches = _context_switches()
        if switches is not None and switches == self.switches_at_start:
            return 0.0  # it never left its core (and the read below costs more than tiny items)
        return _run_queue_seconds() - self.queued_at_start

    def stop(self, calls: int) -> None:
        self.calls = calls
        if not calls:
            return
        self.cpu, self.process_cpu = native.CpuClocks().since(self.clocks)
        switches = _context_switches()
        if switches is not None and self.switches_at_start is not None and switches[0] == self.switches_at_start[0]:
            self.wall = self.cpu  # the thread never blocked: it waited on nothing, whatever the clock says
        else:
            self.wall = max(self.cpu, self.elapsed() - self.queued())


def _pickled_size(obj) -> tuple[int, int]:
    """`_transfer.measure` in the order the backends pickle: plain pickle, then cloudpickle."""
    try:
        return measure_pickle(obj)
    except Exception:  # lambdas, local classes, __main__ objects, a user __reduce__ that raises anything: cloudpickle's turn
        return measure_pickle(obj, cloudpickle)


def ran_native_threads(meter: Meter) -> bool:
    """The probed items ran native threads (BLAS, OpenMP) beside their own: CPU-bound items
    whose process CPU exceeds their thread's by a share of their wall time."""
    extra = meter.process_cpu - meter.cpu
    return (meter.calls > 0 and meter.cpu >= CPU_BOUND_SHARE * meter.wall
            and meter.process_cpu >= NATIVE_THREADS_SHARE * meter.cpu and extra >= NATIVE_CPU_SHARE * meter.wall)


def _context_switches() -> tuple[int, int] | None:
    """How often this thread gave up its core by blocking, and by being preempted (Linux);
    None where unknown."""
    try:
        usage = resource.getrusage(resource.RUSAGE_THREAD)
    except (NameError, AttributeError, OSError):  # NameError: no resource module (Windows)
        return None
    return usage.ru_nvcsw, usage.ru_nivcsw


def _run_queue_seconds() -> float:
    """This thread's time spent waiting for a core (Linux schedstat); 0 where unknown."""
    return native.schedstat_seconds("/proc/thread-self/schedstat", native.SCHEDSTAT_WAITING) or 0.0


class Budgeted:
    """Hands the probe items from the iterator until its budget is spent: PROBE_SECONDS, or
    with a known length a small share of the estimated serial time, so that tiny work is not
    probed longer than it takes. Time spent waiting for a core does not count. Items go out in
    small batches, so the clock is read per batch, not per item.

    `watch` (auto's early start) is asked before any item after the first is read
    (`watch.ended()`): True ends the probe there."""

    def __init__(self, source: Iterator, meter: Meter, total: int | None, watch=None):
        self.source = source
        self.meter = meter
        self.total = total
        self.watch = watch
        self.exhausted = False
        self.given = 0
        self.first = None

    def _over(self, spent: float) -> bool:
        if not self.given:
            return False  # time before the first item is not the function's (another thread may hold the GIL)
        if spent >= PROBE_MAX_SECONDS:
            return True
        if self.given < PROBE_MIN_ITEMS and spent < PROBE_SECONDS:  # one item that spent the budget is enough
            # ...and so is one item that waited most of a millisecond or more: IO-bound work
            # goes to threads whose count adapts, and a second serial wait only delays them
            return spent >= IO_PROBE_MIN_SECONDS and self.meter.cpu_so_far() < CPU_BOUND_SHARE * spent
        budget = PROBE_SECONDS
        if self.total is not None and spent >= PROBE_MIN_SECONDS:
            budget = min(budget, PROBE_SHARE * self.total * spent / self.given)
        return spent >= budget

    def __iter__(self):
        return itertools.chain.from_iterable(self._batches())  # per item at C speed

    def _batches(self):
        meter = self.meter
        meter.start()  # from the first item on: the engine's set-up is not the function's cost
        step = 1
        while True:
            spent = meter.elapsed()
            # read the run queue only once the clock says stop: preemption is not the probe's time
            if self._over(spent) and self._over(spent - meter.queued()):
                return
            if self.given == 1 and self.watch is not None and self.watch.ended():
                return
            batch = list(itertools.islice(self.source, step))
            if not self.given and batch:
                self.first = batch[0]
            self.given += len(batch)
            if len(batch) < step:
                self.exhausted = True
            yield batch
            if self.exhausted:
                return
            per_item = meter.elapsed() / self.given
            step = max(1, min(step * 4, int(PROBE_CHECK_SECONDS / per_item) if per_item > 0 else step * 4))


class Overlap:
    """Wraps the function for the GIL probe: both calls start together (a barrier), and each
    records its span and its thread's CPU time."""

    def __init__(self, fn):
        self.fn = fn
        self.barrier = threading.Barrier(2)
        self.spans = []

    def __call__(self, item):
        try:
            self.barrier.wait(timeout=1.0)
        except threading.BrokenBarrierError:
            pass
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        try:
            return self.fn(item)
        finally:
            self.spans.append((wall0, time.perf_counter(), time.thread_time() - cpu0))

    def item_cpu(self) -> float | None:
        return sum(cpu for _, _, cpu in self.spans) / len(self.spans) if self.spans else None

    def cpu_per_wall(self) -> float:
        if len(self.spans) < 2:
            return 0.0
        wall = max(end for _, end, _ in self.spans) - min(start for start, _, _ in self.spans)
        return sum(cpu for _, _, cpu in self.spans) / wall if wall > 0 else 0.0
