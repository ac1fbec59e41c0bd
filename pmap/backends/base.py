"""The Backend protocol every backend implements, the events it reports, and the registry.

A backend only runs tasks (chunks of items). The engine owns every policy: ordering,
retries, timeouts, error handling, progress and backpressure. The engine waits only
through `Backend.wait`, so a scheduler living in the calling thread (gevent's hub, an
event loop) runs while the engine waits.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, NamedTuple

from ..errors import BackendUnavailable


# The engine reads input ahead of the slowest unfinished item by this many chunks per worker, so a
# backend that wants more tasks in flight than workers (a remote queue) reports `workers` to match.
AHEAD_CHUNKS_PER_SLOT = 4


@dataclass(eq=False)
class Task:
    """A chunk of items for one worker. `fn` is whatever `Backend.prepare` returned."""

    id: int
    fn: Any
    items: list


class Started(NamedTuple):
    """A worker began `task_id` at `time` (time.monotonic in the caller's process)."""

    task_id: int
    worker: Any
    time: float


class Done(NamedTuple):
    """A task finished. `values[i]` is item i's result unless i appears in `failures`
    as `(i, exception, traceback_text)`. `elapsed` is the worker's wall time for the task;
    `cpu` its thread's CPU time, where the backend measures it (an adaptive run's GIL bound)."""

    task_id: int
    worker: Any
    values: list
    failures: list
    elapsed: float
    cpu: float | None = None


class Lost(NamedTuple):
    """A task will never report `Done`: its worker died or it was stopped.

    `blame` is True when the task was running on the worker that died (it may be the
    cause); False when it was only collateral (a pool that restarts as a whole, or a
    task that had not started). `exitcode` follows multiprocessing: negative is a signal.
    """

    task_id: int
    worker: Any
    exitcode: int | None
    reason: str
    blame: bool


class Fatal(NamedTuple):
    """The backend cannot go on (an initializer failed, a cluster went away)."""

    error: BaseException


Event = Started | Done | Lost | Fatal


class Backend:
    """Base class and protocol. Subclasses set the class attributes and override the methods.

    Life cycle: `open()` once, then for each run `prepare(fn)` and any number of
    `submit`/`wait`/`cancel`, then `close()`. Task ids are unique for the backend's life,
    so events of an abandoned run are recognised and dropped by the engine.
    """

    name: ClassVar[str] = "?"
    kind: ClassVar[str] = "?"            # serial | thread | process | coroutine | remote
    reports_start: ClassVar[bool] = True  # emits Started; else the engine uses submit time
    # Under a timeout the backend says which item of a task runs and since when (`running_item`)
    # and stops a task at an item (`interrupt`), so the engine times the items of a chunk one by
    # one; without it a run with a timeout sends one item per task.
    item_clock: ClassVar[bool] = False
    # With a timeout, how many seconds past it a task no worker has started may wait before the
    # engine fails it with TaskTimeout and cancels it: for a backend whose tasks can wait in a queue
    # it does not control (a remote cluster with no free worker). None: a task is timed only from
    # its start.
    start_wait: float | None = None
    guarantees: ClassVar[str] = ""        # one line for `pmap backends` and the README table
    # The most workers `workers="adaptive"` may reach; None: the backend cannot change its
    # concurrency during a run (processes are costly to start, and CPU-bound work wants one a core).
    adaptive_maximum: ClassVar[int | None] = None
    # Running totals of pickled bytes to and from workers; None where the backend cannot tell.
    bytes_sent: int | None = None
    bytes_received: int | None = None
    # What the workers' native thread pools (BLAS, OpenMP) were limited to (pmap.native), if anything.
    native_limits: Any = None
    # How items meet the module-level `random` and `numpy.random` generators, for a `seed=` run
    # (pmap.seeding): "own" (each item runs alone in a worker process: seeded per item), "caller"
    # (alone, in the caller's process: seeded per item, put back after the run) or "shared" (items
    # run at once in one process: left alone, and only pmap.rng() is reproducible).
    random_globals: str = "shared"
    # Set by a run whose items carry their own functions (an Executor's calls): a backend whose
    # workers lack the caller's __main__ then sends the functions defined there by value.
    items_hold_functions: bool = False

    def __init__(self, workers: int | None = None, initializer: Callable | None = None,
                 initargs: tuple = (), inner_threads: int | None = None, **options: Any):
        reason = self.unavailable_reason()
        if reason:
            raise BackendUnavailable(f"backend {self.name!r} is unavailable: {reason}")
        if options:
            raise TypeError(f"backend {self.name!r} got unknown option(s): {', '.join(sorted(options))}")
        self.workers = workers if workers is not None else self.default_workers()
        self.initializer = initializer
        self.initargs = tuple(initargs)
        self.inner_threads = inner_threads  # native threads per worker (pmap.native); None: CPUs // workers
        self.timeout: float | None = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when the backend can run here, else why not (and what to install)."""
        return None

    @classmethod
    def default_workers(cls) -> int:
        return usable_cpus()

    def open(self) -> None:
        """Start (or lazily prepare to start) the workers."""

    def prepare(self, fn: Callable, timeout: float | None = None) -> Any:
        """Make `fn` runnable by the workers for the next run; returns the handle tasks carry.
        `timeout` is the run's per-item timeout: a backend that queues tasks internally and has
        no item clock (`item_clock`) should then hold no more tasks than workers, so a task
        starts when it is submitted."""
        self.timeout = timeout
        return fn

    def set_concurrency(self, tasks: int) -> None:
        """An adaptive run will keep at most `tasks` tasks in flight from now on: have that many
        workers ready (the engine owns the limit; a backend only follows it)."""

    def capacity(self) -> int:
        """How many more tasks the backend accepts right now."""
        raise NotImplementedError

    def submit(self, task: Task) -> None:
        """Hand over a task. May raise for a task that cannot be sent (unpicklable item)."""
        raise NotImplementedError

    def wait(self, timeout: float | None) -> list:
        """Block up to `timeout` seconds for events; return them (maybe none)."""
        raise NotImplementedError

    def wake(self) -> None:
        """Make a `wait` in progress (or the next one) return soon, with or without events.
        Called from any thread: new work has arrived for a run fed over time (`engine.Feed`).
        Without it such work waits for the end of the current wait (at most `engine.WAIT_SLICE`)."""

    def cancel(self, task_id: int) -> None:
        """Stop a running task (its time is up), replacing its worker if need be.
        The backend reports nothing more for this task id."""

    def running_item(self, task_id: int) -> tuple[int, float] | None:
        """(item_clock backends) The position in its task of the item a worker runs now and
        when it started (time.monotonic), or None when no worker runs the task (not started,
        or over)."""
        return None

    def interrupt(self, task_id: int, position: int) -> list:
        """(item_clock backends) Item `position` of the task is past its deadline: stop the task
        where its worker is (end the worker, or abandon its thread) and return the events read
        meanwhile. Among them, the task's Done may hold a prefix: the values of the items its
        worker finished (failures among them as usual); the engine runs the rest again. With no
        Done or Lost for the task, none of its items counts as finished. After this the backend
        reports nothing more for the task."""
        self.cancel(task_id)
        return []

    def close(self, kill: bool = False) -> None:
        """Release the workers; with `kill`, end them at once (error, Ctrl-C)."""

    def describe_worker(self, worker: Any) -> str:
        return str(worker)


_CGROUP_V2_CPU_MAX = "/sys/fs/cgroup/cpu.max"
_CGROUP_V1_QUOTA = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def free_threaded() -> bool:
    """Python threads compute at once here (a free-threaded build with the GIL off)."""
    is_gil_enabled = getattr(sys, "_is_gil_enabled", None)
    return is_gil_enabled is not None and not is_gil_enabled()


def usable_cpus() -> int:
    """CPUs this process may use: the smallest of the machine's count, the CPU affinity, the
    cgroup bandwidth quota and LOKY_MAX_CPU_COUNT, as loky's `cpu_count` counts them. Counted
    here because importing loky costs about 45 ms, which serial, thread and fork runs would
    otherwise pay on their first call."""
    counts = [os.cpu_count() or 1]
    if hasattr(os, "sched_getaffinity"):
        counts.append(len(os.sched_getaffinity(0)))
    quota = _cgroup_cpu_quota()
    if quota is not None:
        counts.append(quota)
    if os.environ.get("LOKY_MAX_CPU_COUNT", "").strip().isdigit():
        counts.append(int(os.environ["LOKY_MAX_CPU_COUNT"]))
    return max(1, min(counts))


def _cgroup_cpu_quota() -> int | None:
    """CPUs' worth of the cgroup's CPU bandwidth quota (Linux), None when unlimited or unknown."""
    def words(path):
        with open(path) as handle:
            return handle.read().split()
    try:
        quota, period = words(_CGROUP_V2_CPU_MAX)
    except (OSError, ValueError):
        try:
            quota, period = (words(path)[0] for path in _CGROUP_V1_QUOTA)
        except (OSError, IndexError):
            return None
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    return -(-quota_us // period_us) if quota_us > 0 and period_us > 0 else None


@dataclass
class BackendInfo:
    """One row of `pmap.backends()`.

    Attributes
    ----------
    name : str
        The name to pass as `backend=`.
    available : bool
        Whether it can run on this machine.
    reason : str or None
        Why not, when it cannot (a missing package or platform feature).
    kind : str
        "serial", "thread", "process", "coroutine" or "remote".
    default_workers : int or None
        Workers when `workers=None` (None when unavailable).
    guarantees : str
        What a timeout and a crash cost on it, in one line.
    aliases : list of str
        Other names for it ("threads" for thread, "loky" for process, "gevent" for greenlet).
    """

    name: str
    available: bool
    reason: str | None
    kind: str
    default_workers: int | None
    guarantees: str = ""
    aliases: list = field(default_factory=list)


_FACTORIES: dict[str, Any] = {}
_ALIASES: dict[str, str] = {}
_BUILTIN = {
    "serial": "pmap.backends.serial:SerialBackend",
    "thread": "pmap.backends.thread:ThreadBackend",
    "process": "pmap.backends.process:ProcessBackend",
    "pool": "pmap.backends.pool:PoolBackend",
    "fork": "pmap.backends.fork:ForkBackend",
    "greenlet": "pmap.backends.greenlet:GreenletBackend",
    "asyncio": "pmap.backends.asyncio:AsyncioBackend",
    "manager": "pmap.backends.manager:ManagerBackend",
    "dask": "pmap.backends.dask:DaskBackend",
}
_entry_points_loaded = False


def register_backend(name: str, factory: Any, *, aliases: tuple = ()) -> None:
    """Register a backend under `name`, for `backend=name` everywhere (the CLI included).

    Parameters
    ----------
    name : str
        The backend's name; registering an existing name replaces it.
    factory : type or str
        A `pmap.Backend` subclass, or a "module:Class" string imported on first use. A
        package may instead declare it in the entry-point group `pmap.backends`.
    aliases : tuple of str, default ()
        Other names for it.

    Raises
    ------
    ValueError
        `name` is not a non-empty string.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("backend name must be a non-empty string")
    _FACTORIES[name] = factory
    for alias in aliases:
        _ALIASES[alias] = name


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points
    for ep in entry_points(group="pmap.backends"):
        if ep.name not in _FACTORIES:
            _FACTORIES[ep.name] = ep


def _builtin_present(name: str) -> bool:
    module = _BUILTIN[name].split(":")[0]
    path = os.path.join(os.path.dirname(__file__), module.rsplit(".", 1)[1])
    return os.path.exists(path + ".py") or os.path.exists(os.path.join(path, "__init__.py"))  # a module or a package


for _name in _BUILTIN:
    if _builtin_present(_name):
        register_backend(_name, _BUILTIN[_name])
_ALIASES["gevent"] = "greenlet"
_ALIASES["loky"] = "process"
_ALIASES["threads"] = "thread"


def backend_names() -> list[str]:
    _load_entry_points()
    return list(_FACTORIES)


def resolve_backend_class(name: str) -> type[Backend]:
    """The class registered as `name`; ValueError listing the known names if there is none."""
    key = _ALIASES.get(name, name)
    if key not in _FACTORIES:  # only then scan installed plugins: importlib.metadata costs ~20 ms
        _load_entry_points()
    factory = _FACTORIES.get(key)
    if factory is None:
        known = ", ".join(sorted(set(_FACTORIES) | {"auto"}))
        raise ValueError(f"unknown backend {name!r}; known backends: {known}")
    if isinstance(factory, str):
        import importlib
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        _FACTORIES[key] = factory
    elif hasattr(factory, "load") and not isinstance(factory, type):  # an entry point
        factory = factory.load()
        _FACTORIES[key] = factory
    return factory


def backend_class(backend: "str | type[Backend] | Backend") -> type[Backend]:
    """The class of a backend given by name, class or instance."""
    if isinstance(backend, Backend):
        return type(backend)
    if isinstance(backend, str):
        return resolve_backend_class(backend)
    if isinstance(backend, type) and issubclass(backend, Backend):
        return backend
    raise TypeError(f"backend must be a name such as 'process' or 'thread', not {type(backend).__name__}")


def make_backend(backend: "str | type[Backend] | Backend", workers: int | None = None,
                 initializer: Callable | None = None, initargs: tuple = (), inner_threads: int | None = None,
                 **options: Any) -> Backend:
    """A backend instance (the caller opens it) from a name, a Backend class, or an instance."""
    if isinstance(backend, Backend):
        return backend
    if inner_threads is not None:  # passed only when set: a plugin's __init__ need not know it
        options["inner_threads"] = inner_threads
    instance = backend_class(backend)(workers=workers, initializer=initializer, initargs=tuple(initargs), **options)
    if instance.workers < 1:
        raise ValueError(f"workers must be at least 1, got {instance.workers}")
    return instance


def open_backend(backend: "str | type[Backend] | Backend", workers: int | None = None,
                 initializer: Callable | None = None, initargs: tuple = (), concurrency: int | None = None,
                 **options: Any) -> Backend:
    """make_backend, then open it; `concurrency`: an adaptive run's first limit, set before
    opening so that a thread pool starts that many threads, not its maximum."""
    instance = make_backend(backend, workers, initializer, initargs, **options)
    if concurrency is not None:
        instance.set_concurrency(concurrency)
    instance.open()
    return instance


def backends() -> list[BackendInfo]:
    """Every registered backend, whether it can run here, and why not.

    Returns
    -------
    list of BackendInfo
        One row per backend, built-in ones first; `pmap backends` prints the same table.
    """
    infos = []
    for name in backend_names():
        try:
            cls = resolve_backend_class(name)
            reason = cls.unavailable_reason()
            infos.append(BackendInfo(
                name=name, available=reason is None, reason=reason, kind=cls.kind,
                default_workers=cls.default_workers() if reason is None else None,
                guarantees=cls.guarantees,
                aliases=sorted(a for a, n in _ALIASES.items() if n == name)))
        except Exception as exc:  # a broken plugin is reported, not fatal
            infos.append(BackendInfo(name=name, available=False, reason=f"failed to load: {exc}",
                                     kind="?", default_workers=None))
    return infos


def threads_are_greenlets() -> bool:
    """gevent's monkey-patching has turned threads (and their locks and queues) into greenlets."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("threading")


def fork_supported() -> bool:
    return hasattr(os, "fork") and sys.platform != "win32"
