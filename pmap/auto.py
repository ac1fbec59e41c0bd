"""Auto mode: run the first items in the calling thread while measuring them, then pick the
backend, workers and chunk size from a small cost model, and say why.

Probed items are ordinary items of the run: their results are kept and never re-run.
"""
from __future__ import annotations

import itertools
import math
import os
import pickle
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

try:
    import resource
except ImportError:  # Windows
    pass

from ._worker import is_async
from .backends.base import fork_supported, resolve_backend_class, usable_cpus
from .engine import SLICED_TYPES, RunSpec, RunStats, execute

PROBE_MIN_ITEMS = 2
PROBE_SECONDS = 0.02        # serial probe budget: enough items to measure, a small share of any run worth parallelising
PROBE_SHARE = 0.02          # with a known length, the probe stops at this share of the estimated serial time
PROBE_MIN_SECONDS = 0.00025 # ...but only once it has measured this much
PROBE_CHECK_SECONDS = 0.0005  # how much work passes between two looks at the clock
PROBE_MAX_SECONDS = 0.25    # one slow item stops the probe at once
PROBE_CHUNK_SECONDS = 0.002 # the probe reads items in chunks of about this much work
GIL_PROBE_MIN_ITEM = 5e-4   # below this, running two items in two threads measures noise
# CPU seconds per wall second of two threads: above 1, both ran at once (1.25 leaves room for
# a busy machine; a machine whose cores are all taken hides the overlap, and auto then picks
# processes, which still run in parallel)
GIL_RELEASED_OVERLAP = 1.25
CPU_BOUND_SHARE = 0.3       # CPU share of wall time from which work counts as CPU-bound
PARALLEL_MARGIN = 0.8       # a parallel plan must promise this fraction of serial time or better
MAX_IO_THREADS = 64
# Threads per "wait / CPU" of an item. Exactly that many leave the GIL idle whenever waits
# bunch up, and a first item's one-off costs (imports, a first connection) inflate its CPU.
IO_THREAD_HEADROOM = 2
ASSUMED_UNKNOWN_ITEMS = 10_000  # input of unknown length that outlived the probe: assume it is long

# Costs of this machine's kind, seconds (bench/auto.py measures them).
FORK_START = 0.01
PROCESS_START_COLD = 0.25
THREAD_START = 0.001
PROCESS_PER_ITEM = 4e-6     # engine, pickling and pipe per item, with adaptive chunks
THREAD_PER_ITEM = 2e-6
TRANSFER_BYTES_PER_SECOND = 1.0e9


@dataclass
class Plan:
    """What auto chose, the measurements behind it, and the reason in one sentence."""

    backend: str
    workers: int
    chunksize: int | None
    reason: str
    probed_items: int = 0
    item_wall: float | None = None
    item_cpu: float | None = None
    gil_released: bool | None = None
    item_bytes: int | None = None
    estimates: dict = field(default_factory=dict)

    def __str__(self) -> str:
        def ms(v):
            if v is None:
                return "-"
            return f"{v * 1e6:.3f} us" if v < 1e-4 else f"{v * 1e3:.3f} ms"  # tiny items read as 0.000 ms
        lines = [f"backend: {self.backend} (workers {self.workers}, chunksize "
                 f"{self.chunksize if self.chunksize else 'adaptive'})",
                 f"reason: {self.reason}",
                 f"measured on {self.probed_items} probe item(s): wall {ms(self.item_wall)}, "
                 f"cpu {ms(self.item_cpu)} per item"
                 + (f", {self.item_bytes} bytes pickled per item" if self.item_bytes else "")
                 + ("" if self.gil_released is None else f", GIL released: {'yes' if self.gil_released else 'no'}")]
        if self.estimates:
            lines.append("estimated time of the rest: " + ", ".join(
                f"{name} {seconds:.3f}s" for name, seconds in sorted(self.estimates.items(), key=lambda kv: kv[1])))
        return "\n".join(lines)


class _Meter:
    """Measures the probe as a whole: wall time less the time spent waiting for a core, and
    this thread's CPU time. Timing each call would cost more than a trivial function does."""

    def __init__(self):
        self.calls = 0
        self.wall = 0.0
        self.cpu = 0.0
        self.bytes = 0
        self.started = self.cpu_started = self.queued_at_start = 0.0
        self.blocked_at_start = None

    def size(self, item, result) -> None:
        """Transfer cost: what a process backend would pickle for one item and its result."""
        try:
            self.bytes = len(pickle.dumps(item, pickle.HIGHEST_PROTOCOL)) + len(
                pickle.dumps(result, pickle.HIGHEST_PROTOCOL))
        except Exception:
            self.bytes = 0

    def start(self) -> None:
        self.queued_at_start = _run_queue_seconds()
        self.blocked_at_start = _voluntary_switches()
        self.started, self.cpu_started = time.perf_counter(), time.thread_time()  # last: the reads above are not the function's

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def queued(self) -> float:
        """Seconds this thread waited for a core since start(): not the probe's own time."""
        return _run_queue_seconds() - self.queued_at_start

    def stop(self, calls: int) -> None:
        self.calls = calls
        if not calls:
            return
        self.cpu = time.thread_time() - self.cpu_started
        self.wall = max(self.cpu, self.elapsed() - self.queued())
        blocked = _voluntary_switches()
        if blocked is not None and self.blocked_at_start is not None and blocked == self.blocked_at_start:
            self.wall = self.cpu  # the thread never blocked: it waited on nothing, whatever the clock says


def _voluntary_switches() -> int | None:
    """How often this thread gave up its core by blocking (Linux); None where unknown."""
    try:
        return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
    except (NameError, AttributeError, OSError):  # NameError: no resource module (Windows)
        return None


def _run_queue_seconds() -> float:
    """This thread's time spent waiting for a core (Linux schedstat); 0 where unknown."""
    try:
        fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)  # no text layer: half the cost of open()
    except OSError:
        return 0.0
    try:
        return int(os.read(fd, 256).split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0
    finally:
        os.close(fd)


class _Budgeted:
    """Hands the probe items from the shared iterator until its budget is spent: PROBE_SECONDS,
    or with a known length a small share of the estimated serial time, so that tiny work is
    not probed longer than it takes. Time spent waiting for a core does not count. Items go
    out in small batches, so the clock is read per batch, not per item."""

    def __init__(self, source: Iterator, meter: _Meter, total: int | None):
        self.source = source
        self.meter = meter
        self.total = total
        self.exhausted = False
        self.given = 0
        self.first = None

    def _over(self, spent: float) -> bool:
        if spent >= PROBE_MAX_SECONDS:
            return True
        if self.given < PROBE_MIN_ITEMS and spent < PROBE_SECONDS:  # one item that spent the budget is enough
            return False
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
            batch = list(itertools.islice(self.source, step))
            if not self.given and batch:
                self.first = batch[0]
            self.given += len(batch)
            yield batch
            if len(batch) < step:
                self.exhausted = True
                return
            per_item = meter.elapsed() / self.given
            step = max(1, min(step * 4, int(PROBE_CHECK_SECONDS / per_item) if per_item > 0 else step * 4))


def _flat(batches) -> list:
    return list(itertools.chain.from_iterable(batches))


def _free_threaded() -> bool:
    is_gil_enabled = getattr(sys, "_is_gil_enabled", None)
    return is_gil_enabled is not None and not is_gil_enabled()


def _picklable(fn) -> str | None:
    import cloudpickle
    try:
        cloudpickle.dumps(fn)
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _coroutine_plan(workers: int | None) -> Plan:
    workers = workers or resolve_backend_class("asyncio").default_workers()
    return Plan("asyncio", workers, None, "the function is a coroutine function (async def)")


def decide(meter: _Meter, remaining: int | None, fn, workers: int | None,
           gil_released: bool | None) -> Plan:
    """The cost model: estimate the rest of the run on serial, threads and processes; pick the least."""
    n = meter.calls
    wall = meter.wall / n if n else 0.0
    cpu = meter.cpu / n if n else 0.0  # never above wall: _Meter.stop sees to it
    item_bytes = meter.bytes
    common = dict(probed_items=n, item_wall=wall if n else None, item_cpu=cpu if n else None,
                  gil_released=gil_released, item_bytes=item_bytes or None)
    if remaining == 0:
        return Plan("serial", 1, None, "the probe finished the whole input", **common)
    if n == 0:
        return Plan("serial", 1, None, "nothing was measured", **common)
    rest = remaining if remaining is not None else ASSUMED_UNKNOWN_ITEMS
    serial_time = rest * wall
    too_small = (f"the rest of the work (~{serial_time:.3f}s serial) is too small for parallel start-up "
                 "and transfer to pay off")
    # The per-item cost of any parallel backend alone, before start-up and however many cores:
    # when even that loses, the answer is serial, and counting cores is not free.
    parallel_floor = rest * min(THREAD_PER_ITEM, PROCESS_PER_ITEM)
    if parallel_floor > PARALLEL_MARGIN * serial_time:
        return Plan("serial", 1, None, too_small,
                    estimates={"serial": serial_time, "any parallel backend, at least": parallel_floor}, **common)
    cores = usable_cpus()
    wait = max(wall - cpu, 0.0)
    cpu_bound = cpu >= CPU_BOUND_SHARE * wall

    # Processes: CPU spreads over the cores; waits overlap across workers.
    proc_workers = workers or (cores if wait <= cpu else min(4 * cores, max(cores, round(cores * wall / max(cpu, 1e-9)))))
    # Threads: CPU is serialised by the GIL unless the code releases it; waits overlap.
    thread_cpu_lanes = cores if (gil_released or _free_threaded()) else 1
    thread_workers = workers or (max(cores, min(MAX_IO_THREADS, math.ceil(
        IO_THREAD_HEADROOM * thread_cpu_lanes * wall / max(cpu, wall / MAX_IO_THREADS)))) if not cpu_bound else cores)
    thread_workers = min(thread_workers, max(1, rest)) if remaining is not None else thread_workers
    proc_workers = min(proc_workers, max(1, rest)) if remaining is not None else proc_workers

    thread_time = THREAD_START + rest * THREAD_PER_ITEM + max(rest * cpu / min(thread_cpu_lanes, thread_workers),
                                                             rest * wall / thread_workers)
    transfer = item_bytes / TRANSFER_BYTES_PER_SECOND
    fork_safe = fork_supported() and threading.active_count() == 1
    estimates = {"serial": serial_time, "thread": thread_time}
    process_name = "fork" if fork_safe else "process"
    # Processes cannot start faster than a fork: when even that loses to serial, skip the
    # picklability check, which costs more than tiny work.
    could_win = FORK_START + rest * PROCESS_PER_ITEM < PARALLEL_MARGIN * serial_time
    unpicklable = _picklable(fn) if could_win else None
    if could_win and (unpicklable is None or fork_safe):
        process_class = resolve_backend_class(process_name)
        if process_class.unavailable_reason() is None:
            if fork_safe:
                start = FORK_START
            else:
                start = 0.0 if process_class.is_warm(proc_workers) else PROCESS_START_COLD
            estimates[process_name] = start + rest * (PROCESS_PER_ITEM + transfer) + max(
                rest * cpu / min(cores, proc_workers), rest * wall / proc_workers)

    best = min(estimates, key=estimates.get)
    if best != "serial" and estimates[best] > PARALLEL_MARGIN * serial_time:
        best = "serial"
    if best == "serial":
        return Plan("serial", 1, None, too_small, estimates=estimates, **common)
    if best == "thread":
        if _free_threaded() and cpu_bound:
            why = "CPU-bound work on a free-threaded interpreter runs in parallel threads"
        elif cpu_bound and gil_released:
            why = "CPU-bound work that releases the GIL runs in parallel threads without transferring data"
        elif cpu_bound:
            why = "moving the data to processes costs more than the computation saves"
        else:
            why = (f"IO-bound work ({wait / wall:.0%} of each item is waiting): "
                   f"{thread_workers} threads overlap the waits")
        if unpicklable and cpu_bound:
            why += f"; the function cannot be pickled ({unpicklable})"
        return Plan("thread", thread_workers, None, why, estimates=estimates, **common)
    if cpu_bound:
        why = f"CPU-bound work ({cpu / wall:.0%} of each item is computing) runs on {proc_workers} processes"
    else:
        why = f"mixed CPU and waiting: {proc_workers} processes overlap the waits and spread the CPU"
    if process_name == "fork":
        why += "; fork is safe here (no other threads) and needs no pickling of the function"
    else:
        why += "; loky's processes, since fork is not safe here (other threads run)" if fork_supported() else ""
    return Plan(process_name, proc_workers, None, why, estimates=estimates, **common)


class _Overlap:
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

    def cpu_per_wall(self) -> float:
        if len(self.spans) < 2:
            return 0.0
        wall = max(end for _, end, _ in self.spans) - min(start for start, _, _ in self.spans)
        return sum(cpu for _, _, cpu in self.spans) / wall if wall > 0 else 0.0


def _probe_gil(source: Iterator, spec: RunSpec, stats: RunStats, offset: int):
    """Run the next two items at once in two threads; their CPU overlap tells whether the
    function releases the GIL. Returns (results, items consumed, released?)."""
    pair = list(itertools.islice(source, 2))
    if len(pair) < 2:  # one item left: nothing to compare, run it as the probe ran the others
        serial = resolve_backend_class("serial")()
        return _flat(execute(serial, replace(spec, items=pair, start_index=offset), stats)), pair, None
    overlap = _Overlap(spec.fn)
    thread = resolve_backend_class("thread")(workers=2)
    thread.open()
    try:
        results = _flat(execute(thread, replace(spec, fn=overlap, items=pair, start_index=offset,
                                                chunksize=1), stats))
    finally:
        thread.close()
    return results, pair, overlap.cpu_per_wall() >= GIL_RELEASED_OVERLAP


def _probe(spec: RunSpec, stats: RunStats, workers: int | None):
    """Run the probe. Returns (probe results, the rest of the source, items used, plan)."""
    source = iter(spec.items)
    meter = _Meter()
    budget = _Budgeted(source, meter, spec.total)
    serial = resolve_backend_class("serial")()
    serial.open()
    # small chunks, so the budget is checked often without paying the engine per item
    probe = replace(spec, items=budget, chunk_seconds=PROBE_CHUNK_SECONDS)
    results = _flat(execute(serial, probe, stats))
    meter.stop(budget.given)
    if results and budget.given:
        meter.size(budget.first, results[0])
    used = meter.calls
    gil_released = None
    wall = meter.wall / used if used else 0.0
    cpu_bound = used and meter.cpu >= CPU_BOUND_SHARE * meter.wall
    if (not budget.exhausted and cpu_bound and wall >= GIL_PROBE_MIN_ITEM and usable_cpus() > 1
            and not _free_threaded()):
        more, consumed, gil_released = _probe_gil(source, spec, stats, used)
        results.extend(more)
        used += len(consumed)
        if len(consumed) < 2:
            budget.exhausted = True
    remaining = 0 if budget.exhausted else (spec.total - used if spec.total is not None else None)
    plan = decide(meter, remaining, spec.fn, workers, gil_released)
    plan.probed_items = used
    return results, source, used, plan, meter


def start_auto_run(spec: RunSpec, stats: RunStats, *, workers=None, initializer=None, initargs=()):
    """The generator of an auto run and the backend it ends on (None until it is chosen)."""
    from .api import make_backend
    if is_async(spec.fn):
        stats.plan = _coroutine_plan(workers)
        backend = make_backend("asyncio", workers=stats.plan.workers, initializer=initializer,
                               initargs=initargs)
        backend.open()
        return execute(backend, spec, stats), backend
    holder = _Holder()

    def run() -> Iterator:
        if initializer is not None:  # the probe runs in this thread, so the initializer does too
            initializer(*initargs)
        probe_started = time.perf_counter()
        results, source, used, plan, meter = _probe(spec, stats, workers)
        stats.probe_seconds = time.perf_counter() - probe_started
        stats.plan = plan
        if results:
            yield results
        # the initializer already ran in this thread for the probe; a serial rest needs no second run
        rest_backend = make_backend(plan.backend, workers=plan.workers,
                                    initializer=None if plan.backend == "serial" else initializer,
                                    initargs=initargs)
        holder.backend = rest_backend
        rest_backend.open()
        # a list or tuple is handed on whole, to be sliced; the probe used its first `used` entries
        sliced = type(spec.items) in SLICED_TYPES
        rest = replace(spec, items=spec.items if sliced else source, items_offset=used if sliced else 0,
                       start_index=used, measured=(meter.calls, meter.wall) if meter.calls else None)
        yield from execute(rest_backend, rest, stats)

    return run(), holder


class _Holder:
    """Stands for the backend an auto run will choose, so the caller can close it."""

    backend = None

    def close(self, kill: bool = False) -> None:
        if self.backend is not None:
            self.backend.close(kill=kill)


def explain(func, items, *, workers=None, timeout=None, retries=0, on_error="return", **_ignored) -> Plan:
    """What `backend="auto"` would choose for `func` over `items`, and why.

    This runs the function on the first few items (the probe) in the calling thread.
    """
    from .api import _total, check_options
    check_options(func, workers=workers, timeout=timeout, retries=retries, on_error=on_error)
    if is_async(func):
        return _coroutine_plan(workers)
    total = _total(items)
    spec = RunSpec(fn=func, items=items, timeout=timeout, retries=retries, on_error=on_error, total=total,
                   chunksize=1 if timeout else None)
    _, _, _, plan, _ = _probe(spec, RunStats(), workers)
    return plan
