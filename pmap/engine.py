"""The one loop: chunk, dispatch with a bounded window, collect, reorder, retry, time out,
report progress, clean up. Every policy lives here; backends only run tasks."""
from __future__ import annotations

import heapq
import itertools
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from ._outcome import split_undecoded
from ._worker import MAX_TIMED_ITEMS, is_async
from .backends.base import AHEAD_CHUNKS_PER_SLOT, Backend, Done, Fatal, Lost, Started, Task, free_threaded, usable_cpus
from .chunking import MAX_CHUNK_BYTES, TARGET_CHUNK_SECONDS, ChunkSizer
from .concurrency import Adaptive, ConcurrencyController
from .errors import Failure, ItemNotPicklable, PmapError, TaskTimeout, WorkerCrashed, raise_failure
from .seeding import CALLER, CallerState, Seeded, SeededAsync

_SKIP = object()              # a slot whose item failed under on_error="skip"
_PENDING = object()           # a slot still being computed
_TASK_IDS = itertools.count()  # unique across runs, so a Pool tells its runs' events apart
WAIT_SLICE = 0.5              # longest single wait, so liveness and deadlines are rechecked
MAX_AHEAD_ITEMS = 100_000     # and in items: many workers times big chunks must not read far ahead
MAX_AHEAD_BYTES = 64 << 20    # and in bytes: items in flight and results not yet yielded (max_ahead_bytes)
SIZE_SAMPLES = 8              # values sized by sys.getsizeof per task, where nothing pickled them
MAX_RECORDED_CHUNKS = 1000    # stats keep this many chunk sizes, so memory stays flat
SLICED_TYPES = (list, tuple)  # input read by slicing; anything else is iterated
# An item lost this many times (beyond its retries) with no worker to blame fails as a crash:
# a task that vanishes for a reason no backend can see must not be re-run forever.
MAX_LOSSES_WITHOUT_BLAME = 8


@dataclass
class RunSpec:
    fn: Callable
    items: Iterable
    ordered: bool = True
    timeout: float | None = None
    retries: int = 0
    retry_on: tuple = (Exception,)
    backoff: float = 0.0
    on_error: str = "raise"
    chunksize: int | None = None
    progress: Callable | None = None
    total: int | None = None
    start_index: int = 0                 # index of the first item (auto mode ran earlier ones)
    items_offset: int = 0                # a list or tuple whose first entries were already run
    measured: tuple | None = None        # (items, seconds) already measured, seeds chunk sizes
    chunk_seconds: float = TARGET_CHUNK_SECONDS  # what adaptive chunks aim at
    concurrency: Adaptive | None = None  # items in flight follow measured throughput (resizable backends)
    max_ahead_bytes: int = MAX_AHEAD_BYTES  # bytes of items in flight and results held, before reading more
    # The engine's time for timeouts, backoff, deadlines and the concurrency controller. A backend's
    # Started times must come from the same clock (every built-in backend uses time.monotonic).
    clock: Callable[[], float] = time.monotonic
    # Item i's random stream derives from (seed, i) (pmap.seeding); None: no seeding, no cost.
    seed: int | None = None
    # The items are (index, item) pairs already, indexed by the caller (the command line's resumed
    # runs skip items), and the function takes the pair: the seed's index is the pair's.
    indexed_items: bool = False
    # Each finished item's value (or its Failure) by index, as it ends, instead of the run's output:
    # the targets of a Feed's items (futures) are settled as their items finish, in any order.
    deliver: Callable[[int, Any], None] | None = None


class Feed:
    """Items that arrive over time (a Pool's or an Executor's submissions), as a run's `items`.
    The engine takes what has come; "nothing yet" is not the end, which comes only when the
    feed is closed and empty; `close(stop=True)` ends the run at once (terminate, Ctrl-C).
    Thread-safe: any thread puts, the run's thread takes. `wake` (the backend's) interrupts the
    engine's wait."""

    def __init__(self, wake: Callable[[], None]):
        self._items: deque = deque()
        self._lock = threading.Lock()
        self._wake = wake
        self._wake_pending = False  # one wake per take: a burst of puts costs one
        self.closed = False
        self.stopped = False

    def put(self, item: Any) -> None:
        with self._lock:
            if self.closed:
                raise RuntimeError("cannot add work to a closed feed")
            self._items.append(item)
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            self._wake()

    def close(self, stop: bool = False) -> list:
        """No more items; with `stop`, end the run now. Returns the items never taken when stopping."""
        with self._lock:
            self.closed = True
            left = []
            if stop:
                self.stopped = True
                left, self._items = list(self._items), deque()
        self._wake()
        return left

    def take(self, n: int) -> tuple[list, bool]:
        """Up to `n` items that have come, and whether the feed is over (closed and empty)."""
        with self._lock:
            self._wake_pending = False
            items = self._items
            taken: list = []
            while not taken and items:  # what admit drops (a cancelled call) does not end the take
                taken = self.admit([items.popleft() for _ in range(min(n, len(items)))])
            return taken, self.closed and not items

    def admit(self, items: list) -> list:
        """The items to run of those taken (called under the feed's lock); all of them here."""
        return items


@dataclass
class RunStats:
    """How a run went: counts kept for every run, cheap enough to be always on (`results.stats`).

    Attributes
    ----------
    backend : str
        The backend that ran the items (auto's choice under auto mode).
    workers : int
        Workers used; for an adaptive run, the highest number of tasks allowed in flight.
    items_done : int
        Items that finished, failed ones included.
    failed : int
        Items that failed for good (no retry left), whatever `on_error` did with them.
    skipped : int
        Failed items left out of the results by `on_error="skip"`.
    retried : int
        Attempts made again after a failure, timeout or lost worker.
    timed_out : int
        Attempts stopped at their `timeout`.
    crashed_workers : int
        Workers that died while running items.
    tasks : int
        Tasks (chunks of items) sent to workers.
    wall_seconds : float
        The run's wall time, from opening the backend to the last result.
    busy_seconds : float
        Worker time spent running items, summed over workers.
    busy_by_worker : dict
        `busy_seconds` per worker.
    startup_seconds : float
        Opening the backend and preparing the function.
    probe_seconds : float
        Auto mode's measuring of the first items in the calling thread.
    first_result_seconds : float or None
        Time to the first result.
    bytes_sent, bytes_received : int or None
        Pickled tasks and results through pipes and shared memory, where the backend can tell.
    chunk_sizes : list of int
        The size of each task, in items.
    concurrency : list of tuple
        For an adaptive run, `(seconds into the run, tasks allowed in flight, items/s)` at each
        sample (at most 500 points).
    plan : pmap.Plan or None
        Under auto mode, what it chose and why.
    native_threads : object or None
        The BLAS/OpenMP thread limits applied in the workers.
    utilisation : float
        Share of the workers' time spent running items (`busy_seconds / (wall_seconds * workers)`).
    """

    backend: str = ""
    workers: int = 0
    items_done: int = 0
    failed: int = 0
    skipped: int = 0
    retried: int = 0
    timed_out: int = 0
    crashed_workers: int = 0
    tasks: int = 0
    wall_seconds: float = 0.0
    busy_seconds: float = 0.0
    busy_by_worker: dict = field(default_factory=dict)
    # preparing the function and waiting for the first worker to begin (a cold pool starting)
    startup_seconds: float = 0.0
    probe_seconds: float = 0.0          # auto mode's measuring of the first items
    first_result_seconds: float | None = None
    bytes_sent: int | None = None       # pickled tasks and results, where the backend can tell
    bytes_received: int | None = None
    # The most bytes of items in flight and results not yet yielded held at once: items at their
    # pickled size where the backend pickles tasks, else by sys.getsizeof (shallow), as results.
    peak_bytes_held: int = 0
    chunk_sizes: list = field(default_factory=list)
    # (seconds into the run, tasks allowed in flight, items/s) at each change of an adaptive run
    concurrency: list = field(default_factory=list)
    plan: Any = None
    native_threads: Any = None          # the workers' BLAS/OpenMP limits (pmap.native.NativeLimits)

    @property
    def startup_share(self) -> float:
        """Share of the run's wall time spent starting: before any worker ran an item."""
        return min(1.0, self.startup_seconds / self.wall_seconds) if self.wall_seconds else 0.0

    @property
    def utilisation(self) -> float:
        """Share of the workers' time spent running items."""
        if not self.wall_seconds or not self.workers:
            return 0.0
        return self.busy_seconds / (self.wall_seconds * self.workers)

    def __str__(self) -> str:
        sizes = self.chunk_sizes
        chunk = f"{min(sizes)}..{max(sizes)}" if sizes else "-"
        text = (f"{self.items_done} items on {self.backend} x{self.workers} in {self.wall_seconds:.3f}s "
                f"({self.tasks} tasks, chunk {chunk}, utilisation {self.utilisation:.0%}, "
                f"start-up {self.startup_seconds * 1e3:.1f} ms ({self.startup_share:.0%})")
        if self.startup_share > 0.5:
            text += ", mostly start-up: a warm pool (the next call within a minute, or pmap.Pool) skips it"
        if self.probe_seconds:
            text += f", probe {self.probe_seconds * 1e3:.1f} ms"
        if self.bytes_sent is not None:
            text += f", {_size(self.bytes_sent)} sent, {_size(self.bytes_received or 0)} received"
        text += f", peak {_size(self.peak_bytes_held)} held"
        if self.native_threads is not None:
            text += f", {self.native_threads}"
        return (text + f"); failed {self.failed}, skipped {self.skipped}, retried {self.retried}, "
                f"timed out {self.timed_out}, worker crashes {self.crashed_workers}")


def _is_congestion(exc: BaseException) -> bool:
    """A failure that says the other side is overloaded: a refused, reset or timed-out
    connection, or a timeout."""
    return isinstance(exc, (ConnectionError, TimeoutError))


def _failures_fit(failures: list, n: int) -> bool:
    """Each failure names a distinct position among a task's `n` items."""
    if not failures:
        return True
    positions = [f[0] for f in failures]
    return len(set(positions)) == len(positions) and all(type(p) is int and 0 <= p < n for p in positions)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


class _Block:
    """Output slots for consecutive input indices, filled as tasks finish (ordered mode).
    The slots are made on first use: a task that fills the whole block hands over its list."""

    __slots__ = ("size", "_values", "missing", "has_skips", "nbytes")

    def __init__(self, n: int):
        self.size = n
        self._values = None
        self.missing = n
        self.has_skips = False
        self.nbytes = 0   # of the values it holds

    @property
    def values(self) -> list:
        if self._values is None:
            self._values = [_PENDING] * self.size
        return self._values

    def fill_whole(self, values: list) -> bool:
        """Take `values` as the block's slots when they are all of them; False otherwise."""
        if self._values is not None or len(values) != self.size:
            return False
        self._values = values
        return True


class _Rerun(NamedTuple):
    """Items to run again as one task: an item on its own (a retry, or one of a lost task), or
    the items a task stopped at another item's deadline did not finish. Where their values go,
    and how they fared so far."""

    block: _Block | None
    offset: int
    index: int
    items: list
    attempts: int   # failed runs so far
    losses: int     # times lost with no worker blamed


class _Flight:
    """A task in flight: where its results go, its items (as given: a seeded task carries them
    with their indices), and how often each was tried."""

    __slots__ = ("task", "items", "block", "offset", "first_index", "attempts", "losses", "started", "sent",
                 "worker", "stopping", "nbytes")

    def __init__(self, task, items, block, offset, first_index, attempts, losses=0):
        self.task = task
        self.items = items
        self.block = block
        self.offset = offset
        self.first_index = first_index
        self.attempts = attempts        # earlier failed runs of a single-item task
        self.losses = losses            # times its items were lost with no worker blamed
        self.started = None             # under a timeout: when its running item began, or a time before that
        self.sent = None                # under a timeout, until it starts: when it was submitted
        self.worker = None
        self.stopping = None            # the position of the item whose deadline stopped it
        self.nbytes = 0                 # of its items, as sent


class _Flights(dict):
    """Tasks in flight by id, and the bytes of their items, kept however a task leaves (the
    engine adds one by `[id] =` and removes it by `pop` or `del`)."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __setitem__(self, task_id: int, flight: _Flight) -> None:
        super().__setitem__(task_id, flight)
        self.nbytes += flight.nbytes

    def __delitem__(self, task_id: int) -> None:
        self.nbytes -= self[task_id].nbytes
        super().__delitem__(task_id)

    def pop(self, task_id: int, *default: Any) -> Any:
        if task_id in self:
            self.nbytes -= self[task_id].nbytes
        return super().pop(task_id, *default)


def _sampled_size(values: list) -> int:
    """sys.getsizeof of `values`, from at most SIZE_SAMPLES of them spread over the list: a
    task's cost stays flat however many items it has."""
    n = len(values)
    if n <= SIZE_SAMPLES:
        return sum(map(sys.getsizeof, values))
    sample = values[::n // SIZE_SAMPLES][:SIZE_SAMPLES]
    return sum(map(sys.getsizeof, sample)) * n // SIZE_SAMPLES


def execute(backend: Backend, spec: RunSpec, stats: RunStats | None = None,
            dispatch_now: bool = False) -> Iterator[list]:
    """Yield the results of `spec.fn` over `spec.items` on an opened backend, in batches
    (non-empty lists): per-item work stays in C when the caller flattens them.

    `dispatch_now`: the first tasks are handed to the backend before this returns, and the run
    goes on when it is iterated, which may be in another thread (auto's early start)."""
    run = _Engine(backend, spec, stats or RunStats()).run(dispatch_now)
    if dispatch_now:
        next(run)
    return run


class _Engine:
    def __init__(self, backend: Backend, spec: RunSpec, stats: RunStats):
        self.backend = backend
        self.spec = spec
        self.stats = stats
        stats.backend = backend.name
        stats.workers = backend.workers
        self.feed = spec.items if isinstance(spec.items, Feed) else None
        self.sequence = spec.items if type(spec.items) in SLICED_TYPES else None  # one C copy per chunk
        self.read_position = spec.items_offset
        self.source = iter(spec.items) if self.sequence is None and self.feed is None else None
        self.source_error: BaseException | None = None
        self.exhausted = False
        self.next_index = spec.start_index
        self.emit_index = spec.start_index  # ordered mode: first index not yet yielded
        self.blocks: dict[int, _Block] = {}
        self.flights = _Flights()
        self.result_bytes = 0              # of values delivered and not yet yielded
        self.requeued: list = []  # heap of (ready_at, seq, _Rerun)
        self.requeue_seq = itertools.count()
        self.ready: list = []              # unordered mode: values to yield
        remaining = spec.total - spec.start_index if spec.total is not None else None
        chunksize = spec.chunksize
        self.item_clock = spec.timeout is not None and backend.item_clock
        if spec.timeout is not None and not self.item_clock:  # it cannot time a chunk's items one by one
            chunksize = 1
        elif self.item_clock and chunksize is not None:
            chunksize = min(chunksize, MAX_TIMED_ITEMS)  # what a worker's slot can name
        # Chunks small enough that every worker's share of the look-ahead fits in its byte budget.
        chunk_bytes = min(MAX_CHUNK_BYTES, spec.max_ahead_bytes // (max(1, backend.workers) * AHEAD_CHUNKS_PER_SLOT))
        self.sizer = ChunkSizer(chunksize, backend.workers, remaining, spec.chunk_seconds, max(1, chunk_bytes))
        if spec.measured:
            self.sizer.observe(*spec.measured)
        self.fn = None
        self.pairs = spec.seed is not None and not spec.indexed_items  # tasks carry (index, item)
        self.prepared: float | None = None  # seconds prepare took, until the run's first result
        self.clock = spec.clock
        self.controller = None
        self.stragglers = 0
        if spec.concurrency is not None:
            self.controller = ConcurrencyController(spec.concurrency, self.clock(),
                                                    cpu_lanes=usable_cpus() if free_threaded() else 1)
            stats.concurrency = self.controller.trajectory
            stats.workers = self.controller.limit
            self.workers_wanted = self.controller.workers_wanted
            backend.set_concurrency(self.workers_wanted)

    # ---- the loop -------------------------------------------------------------------
    def run(self, dispatch_now: bool = False) -> Iterator:
        started = time.perf_counter()
        self.started = started
        sent0, received0 = self.backend.bytes_sent, self.backend.bytes_received
        fn = self.spec.fn
        caller_state = None
        if self.spec.seed is not None:
            random_globals = self.backend.random_globals
            seeded = SeededAsync if is_async(fn) else Seeded
            fn = seeded(fn, self.spec.seed, random_globals, pass_pair=self.spec.indexed_items)
            if random_globals == CALLER:  # the caller's own generators are put back after the run
                caller_state = CallerState()
        self.fn = self.backend.prepare(fn, self.spec.timeout)
        self.prepared = time.perf_counter() - started
        self.stats.startup_seconds += self.prepared
        self.stats.native_threads = getattr(self.backend, "native_limits", None)
        ordered = self.spec.ordered
        try:
            if dispatch_now:
                self._dispatch()
                yield []
                started = time.perf_counter()  # the time until now is the caller's (auto's probe counts it)
            while True:
                if ordered:
                    yield from self._emit_ordered()
                elif self.ready:
                    yield self._take_ready()
                if self.feed is not None and self.feed.stopped:
                    return  # what is in flight is the feed's owner's to end
                self._dispatch()
                if not self.flights and not self.requeued and (self.exhausted or self.source_error):
                    break
                self._handle(self.backend.wait(self._wait_time()))
                self._expire_deadlines()
                if self.controller is not None:
                    self._follow_controller()
            if ordered:
                yield from self._emit_ordered()
            elif self.ready:
                yield self._take_ready()
            if self.source_error is not None:
                raise self.source_error
        finally:
            # Tasks still in flight (an error, or the reader stopped early) are left to the
            # caller: a one-shot run closes the backend, a Pool lets them finish unread.
            self.stats.wall_seconds += time.perf_counter() - started
            if self.controller is None:  # an adaptive run counts the highest limit instead
                self.stats.workers = max(self.stats.workers, self.backend.workers)  # the most that joined
            if sent0 is not None:
                stats = self.stats
                stats.bytes_sent = (stats.bytes_sent or 0) + self.backend.bytes_sent - sent0
                stats.bytes_received = (stats.bytes_received or 0) + self.backend.bytes_received - received0
            self.source = self.sequence = None
            if caller_state is not None:
                caller_state.restore()

    # ---- dispatch -------------------------------------------------------------------
    def _room_ahead(self) -> bool:
        if self.flights and self.flights.nbytes + self.result_bytes >= self.spec.max_ahead_bytes:
            return False  # with nothing in flight there is room: an item bigger than the budget still runs
        # Read each time: a remote backend's workers come and go, an adaptive run's limit moves.
        slots = self.controller.limit if self.controller is not None else self.backend.workers
        ahead_chunks = max(1, slots) * AHEAD_CHUNKS_PER_SLOT
        limit = max(ahead_chunks, min(ahead_chunks * self.sizer.size(), MAX_AHEAD_ITEMS))
        if self.spec.ordered:
            return self.next_index - self.emit_index < limit
        return len(self.ready) < limit

    def _dispatch(self) -> None:
        backend = self.backend
        limit = None
        if self.controller is not None:
            # A straggler (a connection waiting for a SYN retry, say) holds no server resource
            # meanwhile: as TCP does not count lost packets, it does not hold a place either.
            limit = self.controller.limit + min(self.stragglers, self.controller.limit)
        while backend.capacity() > 0 and (limit is None or len(self.flights) < limit):
            if self.requeued and self.requeued[0][0] <= self.clock():
                rerun = heapq.heappop(self.requeued)[2]
                self._submit(rerun.block, rerun.offset, rerun.index, rerun.items, rerun.attempts, rerun.losses)
                continue
            if self.exhausted or self.source_error is not None or not self._room_ahead():
                return
            remaining = self.spec.total - self.next_index if self.spec.total is not None else None
            items = self._read(self.sizer.size(remaining))
            if not items:
                return
            index = self.next_index
            self.next_index += len(items)
            block = None
            if self.spec.ordered:
                block = self.blocks[index] = _Block(len(items))
            self._submit(block, 0, index, items, 0)

    def _read(self, n: int) -> list:
        if self.feed is not None:
            items, self.exhausted = self.feed.take(n)
            return items
        if self.sequence is not None:
            start = self.read_position
            items = self.sequence[start:start + n]
            if type(items) is tuple:
                items = list(items)
            self.read_position = start + len(items)
            if len(items) < n:
                self.exhausted = True
            return items
        items = []
        try:
            items.extend(itertools.islice(self.source, n))  # keeps what came before an error
        except Exception as exc:  # the input iterable failed: finish what came before it
            self.source_error = exc
            return items
        if len(items) < n:
            self.exhausted = True
        return items

    def _submit(self, block, offset, index, items, attempts, losses=0) -> None:
        sent = list(zip(range(index, index + len(items)), items)) if self.pairs else items
        task = Task(next(_TASK_IDS), self.fn, sent)
        flight = _Flight(task, items, block, offset, index, attempts, losses)
        bytes_before = self.backend.bytes_sent
        try:
            self.backend.submit(task)
        except ItemNotPicklable as exc:  # find the item that cannot be sent; it alone fails
            if len(items) > 1:
                self._run_each_alone(flight)
                return
            self._record_failure(flight, 0, exc, "", "error", worker=None, retryable=False)
            return
        # the size the backend pickled, else the items' own (not pickled a second time to know it)
        flight.nbytes = _sampled_size(items) if bytes_before is None else self.backend.bytes_sent - bytes_before
        self._track(flight)

    def _track(self, flight: _Flight) -> None:
        task = flight.task
        self.flights[task.id] = flight
        self._note_held()
        self.stats.tasks += 1
        if len(self.stats.chunk_sizes) < MAX_RECORDED_CHUNKS:
            self.stats.chunk_sizes.append(len(task.items))
        if self.spec.timeout is not None:
            if self.item_clock or not self.backend.reports_start:
                flight.started = self.clock()  # only deadlines read it; no item of the task starts before this
            else:
                flight.sent = self.clock()  # a task no worker starts in time is timed out (`start_wait`)

    # ---- events ---------------------------------------------------------------------
    def _handle(self, events: list) -> None:
        for event in events:
            cls = type(event)
            if cls is Done:
                self._on_done(event)
            elif cls is Started:
                flight = self.flights.get(event.task_id)
                if flight is not None:
                    flight.started = event.time
                    flight.worker = event.worker
            elif cls is Lost:
                self._on_lost(event)
            elif cls is Fatal:
                raise event.error

    def _on_done(self, event: Done) -> None:
        flight = self.flights.pop(event.task_id, None)
        if flight is None:  # a task of an abandoned run, or one already timed out
            return
        values = event.values
        failures = event.failures
        n = len(flight.task.items)
        if type(values) is not list:  # some results could not be rebuilt here: they fail alone
            values, failures = split_undecoded(values, failures, n)
        if flight.stopping is not None and len(values) <= n and _failures_fit(failures, len(values)):
            self._on_stopped(flight, values, failures, event)
            return
        if len(values) != n or not _failures_fit(failures, n):
            self._reject_report(flight, event, len(values))
            return
        stats = self.stats
        stats.busy_seconds += event.elapsed
        stats.busy_by_worker[event.worker] = stats.busy_by_worker.get(event.worker, 0.0) + event.elapsed
        if self.prepared is not None:  # this run's first result: until its task began, workers were starting
            began = time.perf_counter() - event.elapsed - self.started
            stats.startup_seconds += max(0.0, began - self.prepared)
            self.prepared = None
        if stats.first_result_seconds is None:
            stats.first_result_seconds = time.perf_counter() - self.started
        result_bytes = _sampled_size(values)
        self.sizer.observe(n, event.elapsed, flight.nbytes + result_bytes)
        if self.controller is not None:
            self.controller.record(n, event.elapsed, sum(_is_congestion(exc) for _, exc, _ in failures),
                                   flight.started, event.cpu)
        if failures:
            for pos, exc, tb in failures:
                values[pos] = _PENDING
                timed_out = isinstance(exc, TaskTimeout)  # a backend that times items out itself
                self._record_failure(flight, pos, exc, tb, "timeout" if timed_out else "error", event.worker,
                                     retryable=timed_out or isinstance(exc, self.spec.retry_on))
            self._deliver(flight, values, n - len(failures), result_bytes, skip_pending=True)
        else:
            self._deliver(flight, values, n, result_bytes)

    def _on_stopped(self, flight: _Flight, values: list, failures: list, event: Done | None) -> None:
        """A task stopped at item `flight.stopping`'s deadline finished its first len(values)
        items: they count, that item fails with TaskTimeout unless it was among them, and the
        items after the finished ones run again (`values` may be all of them: the task ended
        before the stop reached it)."""
        done = len(values)
        worker = flight.worker
        if event is not None:
            worker = event.worker
            self.stats.busy_seconds += event.elapsed
            if done:
                self.sizer.observe(done, event.elapsed)
        for pos, exc, tb in failures:
            values[pos] = _PENDING
            timed_out = isinstance(exc, TaskTimeout)
            self._record_failure(flight, pos, exc, tb, "timeout" if timed_out else "error", worker,
                                 retryable=timed_out or isinstance(exc, self.spec.retry_on))
        if done:
            self._deliver(flight, values, done - len(failures), _sampled_size(values), skip_pending=bool(failures))
        stopped = flight.stopping
        items = flight.items
        if stopped >= done:
            error = TaskTimeout(f"item {flight.first_index + stopped} ran longer than its timeout of "
                                f"{self.spec.timeout:g}s")
            self._record_failure(flight, stopped, error, "", "timeout", worker, retryable=True)
        for start, end in ((done, stopped), (max(done, stopped + 1), len(items))):
            if start < end:  # not run, or run by a worker that could not say so: run (again) elsewhere
                self._requeue(0.0, _Rerun(flight.block, flight.offset + start, flight.first_index + start,
                                          items[start:end], 0, flight.losses))

    def _reject_report(self, flight: _Flight, event: Done, n_values: int) -> None:
        """A Done that does not hold one outcome per item is a backend bug: every item of the
        task fails with it, loudly, rather than a slot going missing or filled twice."""
        n = len(flight.task.items)
        error = PmapError(f"backend {self.backend.name!r} broke its contract: it reported {n_values} value(s) "
                          f"and failures at {[pos for pos, _, _ in event.failures]} for a task of {n} item(s)")
        for pos in range(n):
            self._record_failure(flight, pos, error, "", "error", event.worker, retryable=False)

    def _deliver(self, flight: _Flight, values: list, n_ok: int, nbytes: int, skip_pending: bool = False) -> None:
        """Put finished values (of `nbytes`) in their slots (ordered) or the ready queue (unordered)."""
        if n_ok:
            self._progress(n_ok)
        if self.spec.deliver is not None:
            deliver, first = self.spec.deliver, flight.first_index
            for k, value in enumerate(values):
                if value is not _PENDING:
                    deliver(first + k, value)
            return
        self.result_bytes += nbytes
        self._note_held()
        if flight.block is None:
            if skip_pending:
                self.ready.extend(v for v in values if v is not _PENDING)
            else:
                self.ready.extend(values)
            return
        block = flight.block
        block.nbytes += nbytes
        if skip_pending:
            slots = block.values
            for k, value in enumerate(values):
                if value is not _PENDING:
                    slots[flight.offset + k] = value
        elif not block.fill_whole(values):
            block.values[flight.offset:flight.offset + len(values)] = values
        block.missing -= n_ok

    def _fill_slot(self, flight: _Flight, pos: int, value: Any) -> None:
        if self.spec.deliver is not None:
            self.spec.deliver(flight.first_index + pos, value)
            return
        if flight.block is None:
            if value is not _SKIP:
                self.ready.append(value)
            return
        block = flight.block
        block.values[flight.offset + pos] = value
        block.missing -= 1
        if value is _SKIP:
            block.has_skips = True

    def _on_lost(self, event: Lost) -> None:
        flight = self.flights.pop(event.task_id, None)
        if flight is None:
            return
        if event.blame:
            self.stats.crashed_workers += 1
        elif flight.losses >= MAX_LOSSES_WITHOUT_BLAME + self.spec.retries:
            error = WorkerCrashed(f"item {flight.first_index} was lost {flight.losses + 1} times without its "
                                  f"worker being seen to fail; last: {event.reason}", event.exitcode)
            for pos in range(len(flight.task.items)):
                self._record_failure(flight, pos, error, "", "crash", event.worker, retryable=False)
            return
        if len(flight.task.items) > 1 or not event.blame:
            # Not known which item (if any) killed the worker: run each alone, without penalty.
            self._run_each_alone(flight, flight.losses + (not event.blame))
            return
        code = event.exitcode
        sig = "" if code is None else f" (signal {-code})" if code < 0 else f" (exit code {code})"
        error = WorkerCrashed(f"worker {self.backend.describe_worker(event.worker)} died{sig} "
                              f"while running item {flight.first_index}: {event.reason}", event.exitcode)
        self._record_failure(flight, 0, error, "", "crash", event.worker, retryable=True)

    def _requeue(self, ready_at: float, rerun: _Rerun) -> None:
        heapq.heappush(self.requeued, (ready_at, next(self.requeue_seq), rerun))

    def _run_each_alone(self, flight: _Flight, losses: int | None = None) -> None:
        losses = flight.losses if losses is None else losses
        for k, item in enumerate(flight.items):
            self._requeue(0.0, _Rerun(flight.block, flight.offset + k, flight.first_index + k, [item],
                                      flight.attempts, losses))

    def _record_failure(self, flight: _Flight, pos: int, exc: BaseException, tb: str, kind: str,
                        worker: Any, retryable: bool) -> None:
        spec = self.spec
        attempts = flight.attempts + 1 if len(flight.task.items) == 1 else 1
        index = flight.first_index + pos
        item = flight.items[pos]
        if retryable and attempts <= spec.retries:
            self.stats.retried += 1
            ready_at = self.clock() + spec.backoff * (2 ** (attempts - 1)) if spec.backoff else 0.0
            self._requeue(ready_at, _Rerun(flight.block, flight.offset + pos, index, [item], attempts, flight.losses))
            return
        if kind == "timeout":
            self.stats.timed_out += 1
        failure = Failure(index=index, item=item, exception=exc, traceback=tb, kind=kind,
                          worker=worker, attempts=attempts)
        if spec.on_error == "raise":
            raise_failure(failure, self.backend.name)
        self.stats.failed += 1
        self._progress(1)
        if spec.on_error == "return":
            self._fill_slot(flight, pos, failure)
        else:
            self.stats.skipped += 1
            self._fill_slot(flight, pos, _SKIP)

    # ---- timeouts -------------------------------------------------------------------
    def _wait_time(self) -> float:
        wait = WAIT_SLICE
        now = self.clock()
        if self.spec.timeout is not None:
            start_bound = self._start_bound()
            for flight in self.flights.values():
                if flight.started is not None:
                    wait = min(wait, flight.started + self.spec.timeout - now)
                elif start_bound is not None:
                    wait = min(wait, flight.sent + start_bound - now)
        if self.requeued:
            wait = min(wait, self.requeued[0][0] - now)
        if self.controller is not None:  # a sample may come to an end with no task ending then
            look = self.controller.next_look(now)
            if look is not None:
                wait = min(wait, look)
        return max(0.0, wait)

    def _expire_deadlines(self) -> None:
        timeout = self.spec.timeout
        if timeout is None:
            return
        now = self.clock()
        self._expire_unstarted(now, timeout)
        expired = [f for f in self.flights.values() if f.started is not None and now - f.started >= timeout]
        if self.item_clock:
            for flight in expired:
                if flight.task.id in self.flights:  # not ended by the events of another's stop
                    self._check_items(flight, now, timeout)
            return
        for flight in expired:
            if self.controller is not None:
                self.controller.record(1, timeout, errors=1, started=flight.started)
            del self.flights[flight.task.id]
            self.backend.cancel(flight.task.id)
            error = TaskTimeout(f"item {flight.first_index} ran longer than its timeout of {timeout:g}s")
            self._record_failure(flight, 0, error, "", "timeout", flight.worker, retryable=True)

    def _start_bound(self) -> float | None:
        """Seconds from submit after which a task no worker started times out, if the backend sets one."""
        start_wait = self.backend.start_wait
        return None if start_wait is None or self.spec.timeout is None else self.spec.timeout + start_wait

    def _expire_unstarted(self, now: float, timeout: float) -> None:
        """A task no worker started within the timeout plus the backend's `start_wait` fails as
        timed out: a timeout is clocked from the start, which may never come."""
        bound = self._start_bound()
        if bound is None:
            return
        for flight in [f for f in self.flights.values() if f.started is None and now - f.sent >= bound]:
            del self.flights[flight.task.id]
            self.backend.cancel(flight.task.id)
            error = TaskTimeout(f"no {self.backend.name} worker started this task within {bound:g}s "
                                f"(timeout {timeout:g}s plus start_wait {self.backend.start_wait:g}s)")
            self._record_failure(flight, 0, error, "", "timeout", None, retryable=True)

    def _check_items(self, flight: _Flight, now: float, timeout: float) -> None:
        """A task's running item may be past its deadline (no item of it began before
        `flight.started`): ask the backend which item runs, since when, and stop it there if so."""
        task_id = flight.task.id
        running = self.backend.running_item(task_id)
        if running is None or not 0 <= running[0] < len(flight.task.items):
            flight.started = now  # not started yet, or just finished: no item of it is over time before now
            return
        position, started = running
        if now - started < timeout:
            flight.started = started
            return
        if self.controller is not None:
            self.controller.record(1, timeout, errors=1, started=started)
        flight.stopping = position
        self._handle(self.backend.interrupt(task_id, position))
        if self.flights.pop(task_id, None) is not None:  # no word from its worker: nothing of it finished
            self._on_stopped(flight, [], [], None)

    # ---- concurrency ----------------------------------------------------------------
    def _follow_controller(self) -> None:
        controller = self.controller
        before = controller.limit
        now = self.clock()
        stragglers = 0
        oldest = None
        for flight in self.flights.values():
            started = flight.started
            if started is None:
                continue
            if oldest is None or started < oldest:
                oldest = started
            if controller.floors and controller.is_straggler(started, len(flight.task.items), now):
                stragglers += 1
        self.stragglers = stragglers
        limit = controller.update(now, stragglers, oldest)
        if limit != before:
            self.stats.workers = max(self.stats.workers, limit)
        if controller.workers_wanted != self.workers_wanted:
            self.workers_wanted = controller.workers_wanted
            self.backend.set_concurrency(self.workers_wanted)

    # ---- output ---------------------------------------------------------------------
    def _emit_ordered(self) -> Iterator:
        blocks = self.blocks
        while True:
            block = blocks.get(self.emit_index)
            if block is None or block.missing:
                return
            del blocks[self.emit_index]
            self.emit_index += block.size
            self.result_bytes -= block.nbytes
            values = [v for v in block.values if v is not _SKIP] if block.has_skips else block.values
            if values:
                yield values

    def _take_ready(self) -> list:
        ready, self.ready = self.ready, []
        self.result_bytes = 0
        return ready

    def _note_held(self) -> None:
        held = self.flights.nbytes + self.result_bytes
        if held > self.stats.peak_bytes_held:
            self.stats.peak_bytes_held = held

    def _progress(self, n: int) -> None:
        stats = self.stats
        stats.items_done += n
        if self.spec.progress is not None:
            self.spec.progress(stats.items_done, self.spec.total)
