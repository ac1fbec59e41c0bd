"""Native thread pools (BLAS, OpenMP, numexpr, numba) as part of the worker count.

A worker process that runs numpy starts a BLAS pool of one thread per core: N workers on N
cores then run N x N threads. Every worker instead gets max(1, usable CPUs // workers) native
threads, as joblib's workers do:

- a new interpreter gets the usual environment variables before it imports anything native:
  manager workers from their start, loky and pool workers first thing in their initializer
  (before the user's; a spawn or forkserver worker's main module may have come first);
- a worker that already holds the libraries (forked, or a pool worker whose main module
  imported numpy) is limited at run time with threadpoolctl;
- the thread backend limits the process's pools while its run lasts, so that threads x native
  threads stays within the CPUs, and restores them afterwards.

A variable the user set explicitly wins over the rule (OMP_NUM_THREADS also speaks for the
libraries that fall back to it); `inner_threads=` wins over both, as joblib's
`inner_max_num_threads` does. One exception: a worker forked from a parent whose GNU OpenMP
runtime runs threads gets one OpenMP thread, since more can hang it.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from .backends.base import usable_cpus

# Each variable, and the ones its library reads when it is unset: a user who set one of those
# has decided for that library too.
VARIABLES = {
    "OMP_NUM_THREADS": (),
    "OPENBLAS_NUM_THREADS": ("GOTO_NUM_THREADS", "OMP_NUM_THREADS"),
    "MKL_NUM_THREADS": ("OMP_NUM_THREADS",),
    "BLIS_NUM_THREADS": ("OMP_NUM_THREADS",),
    "VECLIB_MAXIMUM_THREADS": (),
    "NUMEXPR_NUM_THREADS": ("OMP_NUM_THREADS",),
    "NUMBA_NUM_THREADS": (),
}
TBB_IPC = "ENABLE_IPC"  # TBB schedulers of several processes then share the cores (joblib sets it too)
# threadpoolctl's internal APIs and the variable that governs each
API_VARIABLES = {"openblas": "OPENBLAS_NUM_THREADS", "mkl": "MKL_NUM_THREADS", "blis": "BLIS_NUM_THREADS",
                 "openmp": "OMP_NUM_THREADS", "flexiblas": "OMP_NUM_THREADS"}
GNU_OPENMP_PREFIX = "libgomp"  # not fork-safe: a forked child that uses more than one thread can hang


def check_inner_threads(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"inner_threads must be an integer, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"inner_threads must be at least 1, got {value}")


def user_decided(variable: str, environ=None) -> str | None:
    """The variable (this one or one its library falls back to) the user set, if any."""
    environ = os.environ if environ is None else environ
    for name in (variable, *VARIABLES.get(variable, ())):
        if environ.get(name, "").strip():
            return name
    return None


@dataclass(frozen=True)
class NativeLimits:
    """The native threads each worker of a run may use, and how that was decided."""

    threads: int                 # per worker
    rule: str                    # "inner_threads=2" or "2 CPUs // 2 workers"
    env: tuple = ()              # (variable, value) pairs set in every worker: pmap's and the user's
    kept: tuple = ()             # the variables the user set, which win (also in a forkserver's
                                 # workers, whose environment is the server's, from its start)
    fork_note: str = ""          # what was done about the parent's running native threads

    def api_limit(self, internal_api: str, threading_layer: str | None = None) -> int | None:
        """threadpoolctl limit for one library (None: the user's setting stands)."""
        if self.fork_note and (internal_api == "openmp" or threading_layer == "openmp"):
            return 1  # fork safety beats any setting
        variable = API_VARIABLES.get(internal_api, "OMP_NUM_THREADS")
        return None if user_decided(variable, dict(self.env)) in self.kept else self.threads

    def __str__(self) -> str:
        text = f"{self.threads} native thread(s) per worker ({self.rule})"
        if self.kept:
            values = dict(self.env)
            text += f"; kept {', '.join(f'{name}={values[name]}' for name in self.kept)} (set by you)"
        if self.fork_note:
            text += f"; {self.fork_note}"
        return text


def threads_per_worker(workers: int, inner_threads: int | None = None) -> tuple[int, str]:
    if inner_threads is not None:
        check_inner_threads(inner_threads)  # a backend made directly, not through the options
        return inner_threads, f"inner_threads={inner_threads}"
    cpus = usable_cpus()
    return max(1, cpus // max(1, workers)), f"{cpus} CPUs // {workers} workers"


def limits_for(workers: int, inner_threads: int | None = None, fork_note: str = "") -> NativeLimits:
    threads, rule = threads_per_worker(workers, inner_threads)
    explicit = inner_threads is not None
    env, kept = [], []
    for variable in VARIABLES:
        decided = None if explicit else user_decided(variable)
        if decided is None:
            env.append((variable, str(threads)))
        elif decided == variable:
            kept.append(variable)
            env.append((variable, os.environ[variable].strip()))
    if TBB_IPC not in os.environ:
        env.append((TBB_IPC, "1"))
    return NativeLimits(threads, rule, tuple(env), tuple(kept), fork_note)


def backend_limits(backend: Any, fork_note: str = "") -> NativeLimits:
    """The limits for `backend`'s workers; kept on it as `native_limits` for the run's stats."""
    limits = limits_for(backend.workers, getattr(backend, "inner_threads", None), fork_note)
    backend.native_limits = limits
    return limits


# ---- workers that are new interpreters ------------------------------------------------------

def worker_env(backend: Any) -> dict:
    """Variables a new worker interpreter starts with (a manager's local workers)."""
    return dict(backend_limits(backend).env)


def child_environ(workers: int) -> dict:
    """The whole environment for one of `workers` processes started with subprocess on this
    host (a manager's workers); variables already set, by the user or the driver, stay."""
    return {**os.environ, **dict(limits_for(workers).env)}


# ---- workers that may already hold the libraries --------------------------------------------

class WorkerSetup:
    """Runs first in every worker: sets the variables (for libraries loaded later), limits
    the pools already loaded (threadpoolctl), then runs the user's initializer."""

    def __init__(self, limits: NativeLimits, initializer: Callable | None, loaded: bool):
        self.limits = limits
        self.initializer = initializer
        self.loaded = loaded  # the parent held native libraries: the worker may hold them already

    def __call__(self, *initargs: Any) -> Any:
        try:
            apply_in_worker(self.limits, self.loaded)
        except Exception as exc:  # see _report_unlimited: a limit that cannot be applied costs speed, never the run
            _report_unlimited("limit the native thread pools of this worker", exc)
        if self.initializer is not None:
            return self.initializer(*initargs)
        return None


def with_limits(backend: Any, initializer: Callable | None, forking: bool = False) -> WorkerSetup:
    """The initializer a process backend's workers run: the limits, then the user's.
    `forking`: the workers are forked from this process now, so they inherit its libraries
    (and whatever state their thread pools are in)."""
    if forking:
        hazard = fork_hazard()
        note = (f"{hazard}: OpenMP limited to 1 thread in forked workers"
                if hazard and _gnu_openmp_loaded() else "")
        return WorkerSetup(backend_limits(backend, fork_note=note), initializer, bool(loaded_pools()))
    # a new interpreter imported nothing native before this runs, unless its main module did
    # (spawn, forkserver): likely only where this process holds such libraries too
    return WorkerSetup(backend_limits(backend), initializer, bool(loaded_pools()))


def apply_in_worker(limits: NativeLimits, loaded: bool) -> None:
    os.environ.update(dict(limits.env))
    if not loaded or not _may_hold_pools():
        return  # every library reads the variables when it loads
    from threadpoolctl import ThreadpoolController
    for pool in ThreadpoolController().lib_controllers:
        limit = limits.api_limit(pool.internal_api, getattr(pool, "threading_layer", None))
        if limit is not None and pool.num_threads != limit:
            _set_threads(pool, limit)


# File names of the libraries threadpoolctl controls, as they appear in a process's memory map
POOL_LIBRARY_NAMES = ("openblas", "libgomp", "libiomp", "libomp", "mkl_rt", "libmkl", "libblis", "flexiblas")


def _may_hold_pools() -> bool:
    """Whether this process has loaded a native pool library: on Linux a look at its memory map
    (a fraction of a millisecond), which spares a new worker threadpoolctl's import."""
    try:
        with open("/proc/self/maps") as handle:
            text = handle.read()
    except OSError:
        return True  # not Linux: ask threadpoolctl
    return any(name in text for name in POOL_LIBRARY_NAMES)


def _report_unlimited(what: str, exc: Exception) -> None:
    """threadpoolctl reaches through ctypes into whatever native libraries are loaded (and runs
    controllers other packages register), so it may raise anything: a pool left unlimited
    costs speed, never the run, so it is a warning (once per message and place, by the
    default warning filter)."""
    warnings.warn(f"pmap could not {what}: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3)


def _set_threads(pool: Any, threads: int) -> None:
    """Set a pool's size for the whole process. threadpoolctl lets only the first thread that
    limited OpenBLAS limit it again (others are silently ignored); pmap's limits are the
    process's, whichever thread runs the run, so that claim is cleared around the call."""
    clear = getattr(type(pool), "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)
    pool.set_num_threads(threads)
    if clear is not None:
        clear(force=True)


# ---- the parent's state -----------------------------------------------------------------------

_loaded_cache: tuple[int, list] | None = None


def loaded_pools() -> list:
    """threadpoolctl's view of the native pools loaded here ([] if it is missing). Cached
    while no module is imported: a library comes with an import."""
    global _loaded_cache
    stamp = len(sys.modules)
    if _loaded_cache is None or _loaded_cache[0] != stamp:
        try:
            from threadpoolctl import threadpool_info
            info = threadpool_info()
        except Exception as exc:  # see _report_unlimited: none are known then
            _report_unlimited("inspect the native thread pools", exc)
            info = []
        _loaded_cache = (len(sys.modules), info)
    return _loaded_cache[1]


def native_thread_count() -> int:
    """Threads of this process that Python did not start (BLAS and OpenMP pools among them)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Threads:"):
                    os_threads = int(line.split()[1])
                    break
            else:
                return 0
    except (OSError, ValueError):
        import psutil  # a dependency; imported only where /proc cannot tell
        try:
            os_threads = psutil.Process().num_threads()
        except psutil.Error:
            return 0
    return max(0, os_threads - threading.active_count())


def threads_a_fork_leaves_behind() -> int:
    """Python threads, besides the calling one, whose locks a forked child could find held.
    The threads of loky's reusable executor, which the process backend keeps between runs, do
    not count: a forked worker never uses that executor, and multiprocessing renews its queues'
    locks in a child after a fork."""
    threads = set(threading.enumerate())
    threads.discard(threading.current_thread())
    if "loky.reusable_executor" not in sys.modules:  # no process run has started an executor
        return len(threads)
    from ._worker import loky_reusable_executor  # loaded already by the process run
    executor = loky_reusable_executor()
    if executor is not None:
        # private to loky (checked with loky 3.4.1 and 3.7.0); renamed, they count as any thread,
        # and auto then forgoes fork after a process run
        threads.discard(getattr(executor, "_executor_manager_thread", None))
        threads.discard(getattr(getattr(executor, "_call_queue", None), "_thread", None))
    return len(threads)


def _gnu_openmp_loaded() -> bool:
    return any(pool.get("prefix") == GNU_OPENMP_PREFIX for pool in loaded_pools())


def fork_hazard() -> str | None:
    """Why forking this process now is risky for native code, or None: native thread pools run
    here, and a forked child has none of their threads (GNU OpenMP can then hang in the child)."""
    extra = native_thread_count()
    if not extra:
        return None
    pools = [f"{p.get('internal_api')} ({p.get('threading_layer') or p.get('prefix')}, "
             f"{p.get('num_threads')} threads)" for p in loaded_pools()]
    if not pools:
        return None  # threads of some other library: no pool pmap knows how to make safe
    return f"the parent runs {extra} native thread(s) of {', '.join(pools)}"


def fork_hang_risk() -> str | None:
    """`fork_hazard` where a forked worker could hang (GNU OpenMP's pool is not fork-safe). A
    BLAS pool of its own threads (OpenBLAS) is no such risk: the fork backend's workers start
    with their pools limited, so auto may still fork a numpy user's process."""
    hazard = fork_hazard()
    return hazard if hazard and _gnu_openmp_loaded() else None


# ---- the thread backend: the process's pools, while a run lasts --------------------------------

class _SharedLimit:
    """Runs that overlap (two thread runs at once) share one limit, the smallest asked for;
    the last to end restores what was there before the first began."""

    def __init__(self):
        self.lock = threading.Lock()
        self.active: dict[int, NativeLimits] = {}
        self.original: list | None = None   # (controller, num_threads) before the first run

    def enter(self, limits: NativeLimits) -> int:
        with self.lock:
            token = id(limits) ^ time.perf_counter_ns()
            self.active[token] = limits
            self._apply()
            return token

    def leave(self, token: int) -> None:
        with self.lock:
            if self.active.pop(token, None) is None:
                return
            if self.active:
                self._apply()
                return
            original, self.original = self.original, None
            for pool, threads in original or ():
                try:
                    _set_threads(pool, threads)
                except Exception as exc:  # see _report_unlimited: that library keeps the limit
                    _report_unlimited(f"restore {pool.filepath} to {threads} threads", exc)

    def _apply(self) -> None:
        try:
            from threadpoolctl import ThreadpoolController
            controllers = ThreadpoolController().lib_controllers
        except Exception as exc:  # see _report_unlimited: the run goes on unlimited
            _report_unlimited("limit the native thread pools", exc)
            return
        if self.original is None:
            self.original = [(pool, pool.num_threads) for pool in controllers]
        known = {pool.filepath: pool for pool, _ in self.original}
        for pool in controllers:
            if pool.filepath not in known:  # loaded since the first run began
                self.original.append((pool, pool.num_threads))
        for pool, _ in self.original:
            wanted = [limits.api_limit(pool.internal_api, getattr(pool, "threading_layer", None))
                      for limits in self.active.values()]
            wanted = [w for w in wanted if w is not None]
            if wanted and pool.num_threads != min(wanted):
                _set_threads(pool, min(wanted))


_shared = _SharedLimit()


class ThreadRunLimit:
    """Held by a thread backend while it is open; `release()` is idempotent."""

    def __init__(self, limits: NativeLimits):
        self.limits = limits
        self.token: int | None = _shared.enter(limits) if loaded_pools() else None

    def release(self) -> None:
        token, self.token = self.token, None
        if token is not None:
            _shared.leave(token)


def limit_threads(backend: Any) -> ThreadRunLimit:
    """Limit the process's native pools for a thread backend's run: threads x native threads
    within the CPUs (or inner_threads per thread)."""
    return ThreadRunLimit(backend_limits(backend))


# ---- for auto: did an item run native threads? -------------------------------------------------

class CpuClocks:
    """This thread's CPU time and the whole process's, read together. Process CPU beyond the
    thread's, less what the process's other Python threads ran meanwhile (a progress bar, a
    server, a watchdog of the caller's), is native threads working for the item (BLAS,
    OpenMP): GIL-free work."""

    __slots__ = ("thread", "process", "others")

    def __init__(self):
        self.thread = time.thread_time()
        self.process = time.process_time()
        self.others = _other_python_threads_cpu()

    def since(self, start: "CpuClocks", helpers=()) -> tuple[float, float]:
        """(thread CPU, process CPU not spent by other Python threads) seconds from `start` to
        this reading. A Python thread started meanwhile counts as the item's own, unless its
        native id is among `helpers` (threads that ran other work meanwhile)."""
        elsewhere = sum(self.others.get(native_id, before) - before for native_id, before in start.others.items())
        elsewhere += sum(self.others.get(native_id, 0.0) for native_id in helpers if native_id not in start.others)
        return self.thread - start.thread, self.process - start.process - elsewhere


def _other_python_threads_cpu() -> dict[int, float]:
    """CPU seconds so far of the process's other Python threads, by native id. Read from each
    thread's CPU clock, which never releases the GIL: another Python thread that ran between
    these reads and the process's clock would count on one side only. Linux names a thread's
    clock by its id, which is safe for a thread that has just ended; elsewhere none are counted."""
    if not sys.platform.startswith("linux"):
        return {}
    me = threading.get_native_id()
    seconds = {}
    for thread in threading.enumerate():
        native_id = thread.native_id
        if native_id is None or native_id == me:
            continue
        try:
            seconds[native_id] = time.clock_gettime(_thread_cpu_clock(native_id))
        except OSError:  # it ended
            pass
    return seconds


def _thread_cpu_clock(native_id: int) -> int:
    """Linux's clock id for one thread's CPU time (glibc's MAKE_THREAD_CPUCLOCK: per-thread,
    scheduler precision)."""
    return (~native_id << 3) | 0b110


SCHEDSTAT_WAITING = 1  # schedstat's fields: ns on a core, ns waiting for one


def schedstat_seconds(path: str, field: int) -> float | None:
    """One field of a Linux schedstat file, in seconds; None where it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY)  # no text layer: half the cost of open()
    except OSError:
        return None
    try:
        return int(os.read(fd, 256).split()[field]) / 1e9
    except (OSError, ValueError, IndexError):
        return None
    finally:
        os.close(fd)
