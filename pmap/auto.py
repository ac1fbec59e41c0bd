"""Auto mode: run the first items in the calling thread while measuring them, then pick the
backend, workers and chunk size from a small cost model, and say why.

Probed items are ordinary items of the run: their results are kept and never re-run.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator

from . import native
from ._transfer import measure as measure_pickle
from ._worker import is_async
from .concurrency import Adaptive
from .backends.base import fork_supported, free_threaded, make_backend, open_backend, resolve_backend_class, usable_cpus
from .backends.thread import ThreadBackend
from .early_start import EarlyStart, can_start_early
from .engine import SLICED_TYPES, RunSpec, RunStats, execute
from .options import OnError, Options, Progress, Workers, check_callable
from .probe import (CPU_BOUND_SHARE, GIL_PROBE_MIN_ITEM, GIL_RELEASED_OVERLAP, NATIVE_GIL_RELEASED_OVERLAP,
                    PROBE_CHUNK_SECONDS, TRANSFER_BYTES_PER_SECOND, Budgeted, Meter, Overlap, ran_native_threads)

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


@dataclass
class Plan:
    """What auto chose, the measurements behind it, and the reason in one sentence.

    `str(plan)` is the report `pmap.explain` prints; every auto run keeps its plan in
    `.stats.plan`.

    Attributes
    ----------
    backend : str
        The backend chosen ("serial" when parallel start-up would not pay off).
    workers : int
        Workers it would run (the upper bound, for an adaptive plan).
    chunksize : int or None
        Items per task; None: adaptive.
    reason : str
        Why, in one sentence.
    probed_items : int
        Items the probe ran in the calling thread (their results are kept, not run again).
    item_wall, item_cpu : float or None
        Seconds of wall time and of CPU time per probed item.
    gil_released : bool or None
        Whether two items at once on two threads overlapped their CPU time.
    item_bytes : int or None
        Bytes pickled per item (item and result).
    estimates : dict
        Estimated seconds for the rest of the run on each candidate backend.
    concurrency : Adaptive or None
        The bounds of an adaptive plan.
    native_parallelism : float or None
        Process CPU over thread CPU of items that ran native threads.
    inner_threads : int or None
        Native threads each worker of the plan may run.
    early_items : int
        Items started on threads while the first probe item still waited (IO work).
    """

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
    concurrency: Adaptive | None = None  # the workers follow measured throughput within these bounds
    native_parallelism: float | None = None  # process CPU / thread CPU of items that ran native threads
    inner_threads: int | None = None         # native threads each worker of the plan may run
    early_items: int = 0  # items started on threads while the first probe item still waited

    def __str__(self) -> str:
        def ms(v):
            if v is None:
                return "-"
            return f"{v * 1e6:.3f} us" if v < 1e-4 else f"{v * 1e3:.3f} ms"  # tiny items read as 0.000 ms
        count = (f"adaptive {self.concurrency.start} to {self.concurrency.maximum}" if self.concurrency
                 else self.workers)
        lines = [f"backend: {self.backend} (workers {count}, chunksize "
                 f"{self.chunksize if self.chunksize else 'adaptive'})",
                 f"reason: {self.reason}",
                 f"measured on {self.probed_items} probe item(s): wall {ms(self.item_wall)}, "
                 f"cpu {ms(self.item_cpu)} per item"
                 + (f", {self.item_bytes} bytes pickled per item" if self.item_bytes else "")
                 + ("" if self.gil_released is None else f", GIL released: {'yes' if self.gil_released else 'no'}")]
        if self.native_parallelism is not None:
            lines.append(f"native threads: each item used {self.native_parallelism:.1f} CPUs' worth of its "
                         "thread's time (BLAS/OpenMP)")
        if self.early_items:
            lines.append(f"early start: {self.early_items} item(s) began on threads while the first probe item "
                         "still waited")
        if self.inner_threads is not None:
            lines.append(f"native thread pools: {self.inner_threads} thread(s) per worker")
        if self.estimates:
            lines.append("estimated time of the rest: " + ", ".join(
                f"{name} {seconds:.3f}s" for name, seconds in sorted(self.estimates.items(), key=lambda kv: kv[1])))
        return "\n".join(lines)


def _flat(batches) -> list:
    return list(itertools.chain.from_iterable(batches))


def _picklable(fn) -> str | None:
    import cloudpickle
    try:
        measure_pickle(fn, cloudpickle)  # pickles into a counter: a big closure is not copied
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _coroutine_plan(workers) -> Plan:
    count, bounds = _requested_workers(workers, "asyncio")
    why = "the function is a coroutine function (async def)"
    if bounds is not None:
        return Plan("asyncio", bounds.maximum, None, why + _ADAPTIVE_NOTE, concurrency=bounds)
    return Plan("asyncio", count or resolve_backend_class("asyncio").default_workers(), None, why)


_ADAPTIVE_NOTE = "; how many run at once follows measured throughput and latency"


def _requested_workers(workers, backend: str) -> tuple[int | None, Adaptive | None]:
    """(a fixed count, or adaptive bounds for `backend`) from the `workers=` option."""
    if isinstance(workers, Adaptive):
        return None, workers
    if workers == "adaptive":
        maximum = resolve_backend_class(backend).adaptive_maximum
        return None, Adaptive(maximum=maximum) if maximum else None
    return workers, None


@dataclass
class _Work:
    """What the probe measured, per item, and how many items the plan is for."""

    items_left: int          # the rest of the input (assumed long when its length is unknown)
    wall: float              # seconds per item, waiting for a core left out
    cpu: float               # this thread's CPU seconds per item (never above wall)
    item_bytes: int          # what a process backend would pickle for one item and its result
    gil_released: bool | None
    # An item that ran native threads (BLAS, OpenMP): its CPU in a worker whose native pools are
    # limited, all threads counted. None: the item ran on its own thread only.
    worker_cpu: float | None = None

    @property
    def wait(self) -> float:
        return max(self.wall - self.cpu, 0.0)

    @property
    def cpu_bound(self) -> bool:
        return self.cpu >= CPU_BOUND_SHARE * self.wall

    @property
    def serial_seconds(self) -> float:
        return self.items_left * self.wall

    def compute_seconds(self, workers: int, lanes: int) -> float:
        """The rest on `workers` workers of which at most `lanes` compute at once: bounded by
        the CPU shared among the lanes, and by the items' wall time shared among the workers."""
        cpu, wall = self.cpu, self.wall
        if self.worker_cpu is not None:  # fewer native threads per item: its CPU is its wall time
            cpu = self.worker_cpu
            wall = max(self.wall, cpu)
        return max(self.items_left * cpu / min(lanes, workers), self.items_left * wall / workers)


def _thread_workers(work: _Work, cores: int, lanes: int) -> int:
    """CPU-bound: a thread per core. IO-bound: enough threads to overlap the waits (with headroom)."""
    if work.cpu_bound:
        return cores
    waits_per_compute = work.wall / max(work.cpu, work.wall / MAX_IO_THREADS)
    return max(cores, min(MAX_IO_THREADS, math.ceil(IO_THREAD_HEADROOM * lanes * waits_per_compute)))


def _process_workers(work: _Work, cores: int) -> int:
    """A process per core; more (up to 4 per core) when items wait longer than they compute."""
    if work.wait <= work.cpu:
        return cores
    return min(4 * cores, max(cores, round(cores * work.wall / max(work.cpu, 1e-9))))


def _thread_estimate(work: _Work, workers: int, lanes: int) -> float:
    return THREAD_START + work.items_left * THREAD_PER_ITEM + work.compute_seconds(workers, lanes)


def _process_estimate(work: _Work, workers: int, cores: int, start: float) -> float:
    per_item = PROCESS_PER_ITEM + work.item_bytes / TRANSFER_BYTES_PER_SECOND
    return start + work.items_left * per_item + work.compute_seconds(workers, cores)


def _process_start(process_class, fork_safe: bool, workers: int) -> float:
    if fork_safe:
        return FORK_START
    return 0.0 if process_class.is_warm(workers) else PROCESS_START_COLD


def _thread_reason(work: _Work, workers: int, unpicklable: str | None) -> str:
    if free_threaded() and work.cpu_bound:
        why = "CPU-bound work on a free-threaded interpreter runs in parallel threads"
    elif work.cpu_bound and work.gil_released and work.worker_cpu is not None:
        why = ("native work (BLAS/OpenMP) that releases the GIL runs in threads whose native pools are "
               "limited to share the cores, without transferring data")
    elif work.cpu_bound and work.gil_released:
        why = "CPU-bound work that releases the GIL runs in parallel threads without transferring data"
    elif work.cpu_bound:
        why = "moving the data to processes costs more than the computation saves"
    else:
        why = f"IO-bound work ({work.wait / work.wall:.0%} of each item is waiting): {workers} threads overlap the waits"
    if unpicklable and work.cpu_bound:
        why += f"; the function cannot be pickled ({unpicklable})"
    return why


def _process_reason(work: _Work, workers: int, process_name: str, fork_hazard: str | None = None) -> str:
    if work.cpu_bound:
        why = f"CPU-bound work ({work.cpu / work.wall:.0%} of each item is computing) runs on {workers} processes"
    else:
        why = f"mixed CPU and waiting: {workers} processes overlap the waits and spread the CPU"
    if process_name == "fork":
        return why + "; fork is safe here (no other threads) and needs no pickling of the function"
    if fork_supported():
        unsafe = f"({fork_hazard})" if fork_hazard else "(other threads run)"
        return why + f"; loky's processes, since fork is not safe here {unsafe}"
    return why


def decide(meter: Meter, remaining: int | None, fn, workers,
           gil_released: bool | None, limited_cpu: float | None = None) -> Plan:
    """The cost model: estimate the rest of the run on serial, threads and processes; pick the
    least, unless no parallel plan promises PARALLEL_MARGIN of serial's time. IO-bound work on
    threads gets an adaptive thread count, unless the caller fixed one.

    `limited_cpu`: an item's CPU (all threads) measured with native pools limited as the
    workers' are (the GIL probe), for items that ran native threads."""
    asked_adaptive = workers == "adaptive" or isinstance(workers, Adaptive)
    workers = None if asked_adaptive else workers
    n = meter.calls
    native_parallelism = meter.process_cpu / meter.cpu if n and meter.cpu > 0 else None
    ran_native = ran_native_threads(meter)
    work = _Work(items_left=remaining if remaining is not None else ASSUMED_UNKNOWN_ITEMS,
                 wall=meter.wall / n if n else 0.0, cpu=meter.cpu / n if n else 0.0,
                 item_bytes=meter.bytes, gil_released=gil_released,
                 worker_cpu=(limited_cpu if limited_cpu is not None else meter.process_cpu / n) if ran_native else None)
    common = dict(probed_items=n, item_wall=work.wall if n else None, item_cpu=work.cpu if n else None,
                  gil_released=gil_released, item_bytes=work.item_bytes or None,
                  native_parallelism=native_parallelism if ran_native else None)
    if remaining == 0:
        return Plan("serial", 1, None, "the probe finished the whole input", **common)
    if n == 0:
        return Plan("serial", 1, None, "nothing was measured", **common)
    serial_seconds = work.serial_seconds
    good_enough = PARALLEL_MARGIN * serial_seconds
    too_small = (f"the rest of the work (~{serial_seconds:.3f}s serial) is too small for parallel "
                 "start-up and transfer to pay off")
    if ran_native:
        too_small = ("each item already runs native threads (BLAS/OpenMP) across the cores: no parallel "
                     "plan promises to beat serial")
    # Any parallel backend's per-item cost alone, before start-up and however many cores: when
    # even that loses, the answer is serial, and counting cores is not free.
    parallel_floor = work.items_left * min(THREAD_PER_ITEM, PROCESS_PER_ITEM)
    if parallel_floor > good_enough:
        return Plan("serial", 1, None, too_small, **common,
                    estimates={"serial": serial_seconds, "any parallel backend, at least": parallel_floor})

    cores = usable_cpus()
    most_useful = max(1, work.items_left) if remaining is not None else None  # more workers than items idle

    def capped(count: int) -> int:
        return min(count, most_useful) if most_useful is not None else count

    thread_lanes = cores if (gil_released or free_threaded()) else 1  # the GIL serialises CPU otherwise
    thread_workers = capped(workers or _thread_workers(work, cores, thread_lanes))
    proc_workers = capped(workers or _process_workers(work, cores))
    estimates = {"serial": serial_seconds, "thread": _thread_estimate(work, thread_workers, thread_lanes)}

    threads_left_behind = native.threads_a_fork_leaves_behind()
    fork_hazard = None if threads_left_behind else native.fork_hang_risk()
    fork_safe = fork_supported() and not threads_left_behind and fork_hazard is None
    process_name = "fork" if fork_safe else "process"
    # Processes cannot start faster than a fork: when even that loses to serial, skip the
    # picklability check, which costs more than tiny work.
    could_win = FORK_START + work.items_left * PROCESS_PER_ITEM < good_enough
    # Even fork pickles the items and results: work whose items cannot be pickled stays here.
    untransferable = meter.unpicklable if could_win else None
    unpicklable = _picklable(fn) if could_win and untransferable is None else None
    if could_win and untransferable is None and (unpicklable is None or fork_safe):
        process_class = resolve_backend_class(process_name)
        if process_class.unavailable_reason() is None:
            start = _process_start(process_class, fork_safe, proc_workers)
            estimates[process_name] = _process_estimate(work, proc_workers, cores, start)

    best = min(estimates, key=estimates.get)
    if best == "serial" or estimates[best] > good_enough:
        if untransferable is not None and not ran_native:
            return Plan("serial", 1, None, f"{untransferable}, so no process can take the work, and threads "
                        "do not beat serial here", estimates=estimates, **common)
        return Plan("serial", 1, None, too_small, estimates=estimates, **common)
    if best == "thread":
        why = _thread_reason(work, thread_workers, unpicklable)
        if untransferable is not None and work.cpu_bound:
            why += f"; {untransferable}, so no process can take the work"
        if asked_adaptive or (workers is None and not work.cpu_bound):
            _, bounds = _requested_workers("adaptive" if workers is None else workers, "thread")
            if not asked_adaptive:  # start where the probe says the waits overlap, then adapt
                bounds = replace(bounds, start=max(bounds.minimum, min(thread_workers, bounds.maximum)))
            return Plan("thread", bounds.maximum, None, why + _ADAPTIVE_NOTE, estimates=estimates,
                        concurrency=bounds, **common)
        return Plan("thread", thread_workers, None, why, estimates=estimates, **common)
    why = _process_reason(work, proc_workers, process_name, fork_hazard)
    if asked_adaptive:
        why += "; processes run a fixed count (workers='adaptive' applies to thread, greenlet and asyncio)"
    return Plan(process_name, proc_workers, None, why, estimates=estimates, **common)


def _probe_gil(source: Iterator, spec: RunSpec, stats: RunStats, offset: int):
    """Run the next two items at once in two threads; their CPU overlap tells whether the
    function releases the GIL. The threads' native pools are limited as a thread run's are, so
    BLAS work measures its own overlap, not BLAS filling the cores. Returns (results, items
    consumed, released?, CPU per item). An item's CPU is its own thread's: with the native pools
    limited to one thread BLAS runs in it, and the helpers still spinning from the serial probe
    are no cost of the item."""
    pair = list(itertools.islice(source, 2))
    if len(pair) < 2:  # one item left: nothing to compare, run it as the probe ran the others
        serial = resolve_backend_class("serial")()
        return _flat(execute(serial, replace(spec, items=pair, start_index=offset), stats)), pair, None, None
    overlap = Overlap(spec.fn)
    thread = resolve_backend_class("thread")(workers=2)
    thread.open()
    try:
        results = _flat(execute(thread, replace(spec, fn=overlap, items=pair, start_index=offset,
                                                chunksize=1), stats))
    finally:
        thread.close()
    return results, pair, overlap.cpu_per_wall(), overlap.item_cpu()


def _probe(spec: RunSpec, stats: RunStats, workers: int | None, inner_threads: int | None = None,
           initializer=None, initargs=(), start_early: bool = False):
    """Run the probe. Returns (probe results, the rest of the source, items used, plan, meter,
    and the early start whose run goes on with the rest, or None). With `start_early`, IO
    items start on threads while the first item still waits (pmap.early_start)."""
    source = iter(spec.items)
    meter = Meter()
    early = None
    if start_early and workers is None and can_start_early(spec):
        def make_threads():
            return make_backend("thread", ThreadBackend.adaptive_maximum, initializer, initargs,
                                inner_threads=inner_threads)
        early = EarlyStart(spec, stats, meter, _early_count, make_threads)
    try:
        return _measure_and_decide(spec, stats, workers, inner_threads, source, meter, early)
    except BaseException:
        if early is not None:
            early.stop()
            early.close(kill=True)
        raise


def _early_count(elapsed: float, cpu: float) -> int:
    """Threads for items started early, from the first item's time and CPU so far."""
    work = _Work(items_left=ASSUMED_UNKNOWN_ITEMS, wall=elapsed, cpu=cpu, item_bytes=0, gil_released=None)
    return _thread_workers(work, usable_cpus(), 1)


def _serial_probe(spec: RunSpec, stats: RunStats, budget: Budgeted, first_index: int) -> list:
    serial = resolve_backend_class("serial")()
    serial.open()
    # small chunks, so the budget is checked often without paying the engine per item
    return _flat(execute(serial, replace(spec, items=budget, chunk_seconds=PROBE_CHUNK_SECONDS,
                                         start_index=first_index), stats))


def _surely_waiting(meter: Meter, early: EarlyStart) -> bool:
    """The first item, which ran beside the early items, is IO-bound whatever they did to its
    wall time: even its shortest possible run (its time up to the early start, plus all the
    CPU it used after) would be mostly waiting."""
    shortest = early.started_at + max(0.0, meter.cpu - early.cpu_at_start)
    return meter.cpu < CPU_BOUND_SHARE * shortest


def _drain(early: EarlyStart, source: Iterator) -> tuple[list, int]:
    """The results of the items that started early, when the run goes on elsewhere, and how
    many items the run has used so far (the source is moved past them)."""
    results = early.drain()
    next(itertools.islice(source, early.taken, early.taken), None)  # the probe read the first item
    return results, 1 + early.taken


def _measure_and_decide(spec, stats, workers, inner_threads, source, meter, early):
    budget = Budgeted(source, meter, spec.total, watch=early)
    results = _serial_probe(spec, stats, budget, spec.start_index)
    meter.stop(budget.given)
    early_run = early.finish() if early is not None else None
    if results and budget.given:
        meter.size(budget.first, results[0])
    used = meter.calls
    exhausted = budget.exhausted
    early_items = early.items if early_run is not None else 0
    if early_run is not None and not _surely_waiting(meter, early):
        # it computed after its wait, while the early items held the GIL: measure one alone
        more, used = _drain(early, source)
        results.extend(more)
        early_run = None
        exhausted = used >= len(spec.items)
        if not exhausted:
            meter = Meter()
            budget = Budgeted(source, meter, spec.total - used)
            more = _serial_probe(spec, stats, budget, used)
            meter.stop(budget.given)
            if more and budget.given:
                meter.size(budget.first, more[0])
            results.extend(more)
            used += meter.calls
            exhausted = budget.exhausted
    probed = meter.calls
    gil_released = limited_cpu = None
    wall = meter.wall / meter.calls if meter.calls else 0.0
    cpu_bound = meter.calls and meter.cpu >= CPU_BOUND_SHARE * meter.wall
    # The GIL probe runs two items at once on threads, which share the module-level generators: a
    # seed= run keeps them reproducible instead (its CPU-bound work then goes to processes).
    if (not exhausted and cpu_bound and wall >= GIL_PROBE_MIN_ITEM and usable_cpus() > 1
            and not free_threaded() and spec.seed is None):
        more, consumed, overlap, limited_cpu = _probe_gil(source, spec, stats, used)
        if overlap is not None:
            gil_released = overlap >= (NATIVE_GIL_RELEASED_OVERLAP if ran_native_threads(meter)
                                       else GIL_RELEASED_OVERLAP)
        results.extend(more)
        used += len(consumed)
        probed += len(consumed)
        if len(consumed) < 2:
            exhausted = True
    # with an early run going on, every item after the first is still to do
    remaining = 0 if exhausted else (spec.total - used if spec.total is not None else None)
    plan = decide(meter, remaining, spec.fn, workers, gil_released, limited_cpu)
    plan.probed_items = probed
    plan.early_items = early_items
    if early_run is not None:
        if plan.backend == "thread" and plan.concurrency is not None:
            plan.concurrency = early.bounds  # the run that goes on follows its own bounds
        else:  # another plan after all: the items started finish here, the rest goes there
            more, used = _drain(early, source)
            results.extend(more)
            early = None
    if plan.backend in ("thread", "process", "fork"):
        plan.inner_threads = native.threads_per_worker(plan.workers, inner_threads)[0]
    return results, source, used, plan, meter, early if early_run is not None else None


def start_auto_run(spec: RunSpec, stats: RunStats, *, workers=None, initializer=None, initargs=(),
                   inner_threads=None):
    """The generator of an auto run and the backend it ends on (None until it is chosen)."""
    if is_async(spec.fn):
        stats.plan = _coroutine_plan(workers)
        backend = _open_planned(stats.plan, initializer, initargs)
        return execute(backend, replace(spec, concurrency=stats.plan.concurrency), stats), backend
    holder = _Holder()

    def run() -> Iterator:
        if initializer is not None:  # the probe runs in this thread, so the initializer does too
            initializer(*initargs)
        probe_started = time.perf_counter()
        results, source, used, plan, meter, early = _probe(spec, stats, workers, inner_threads,
                                                           initializer, initargs, start_early=True)
        if early is not None:
            holder.backend = early.backend
        stats.probe_seconds = time.perf_counter() - probe_started
        stats.plan = plan
        if results:
            yield results
        if early is not None:  # the items after the first began on threads: the run goes on there
            yield from early.run
            return
        # the initializer already ran in this thread for the probe; a serial rest needs no second run
        holder.backend = _open_planned(plan, None if plan.backend == "serial" else initializer, initargs,
                                       inner_threads)
        # a list or tuple is handed on whole, to be sliced; the probe used its first `used` entries
        sliced = type(spec.items) in SLICED_TYPES
        rest = replace(spec, items=spec.items if sliced else source, items_offset=used if sliced else 0,
                       start_index=used, measured=(meter.calls, meter.wall) if meter.calls else None,
                       concurrency=plan.concurrency)
        yield from execute(holder.backend, rest, stats)

    return run(), holder


def _open_planned(plan: Plan, initializer, initargs, inner_threads=None):
    return open_backend(plan.backend, plan.workers, initializer, initargs, inner_threads=inner_threads,
                        concurrency=plan.concurrency.start if plan.concurrency else None)


class _Holder:
    """Stands for the backend an auto run will choose, so the caller can close it."""

    backend = None

    def close(self, kill: bool = False) -> None:
        if self.backend is not None:
            self.backend.close(kill=kill)


def explain(func: Callable, items: Iterable, *, workers: Workers = None, chunksize: int | None = None,
            ordered: bool = True, timeout: float | None = None, retries: int = 0,
            retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
            backoff: float = 0.0, on_error: OnError = "return", progress: Progress = False,
            max_ahead_bytes: int | str = "64MiB",
            initializer: Callable[..., Any] | None = None, initargs: tuple = (),
            inner_threads: int | None = None, seed: int | None = None) -> Plan:
    """What `backend="auto"` would choose for `func` over `items`, and why.

    Takes the options of `pmap.pmap` (see `help(pmap.pmap)`); a backend is what it chooses, so
    there is none to pass. It runs the function on the first few items (the probe) in the
    calling thread and starts no worker.

    Returns
    -------
    Plan
        The choice, the measurements behind it and the reason; print it for the report that
        `pmap run --explain` shows.

    Examples
    --------
    >>> import pmap
    >>> pmap.explain(abs, range(1000)).backend  # far too little work for workers to pay off
    'serial'
    """
    check_callable(func)
    options = Options.from_arguments(locals())
    if is_async(func):
        return _coroutine_plan(options.workers)
    spec = options.run_spec(func, items, progress=None)
    plan = _probe(spec, RunStats(), options.workers, options.inner_threads)[3]
    return plan
