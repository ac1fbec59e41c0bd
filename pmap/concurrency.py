"""How many tasks run at once, chosen during the run from what the run measures.

The engine asks `ConcurrencyController.limit` before it dispatches and tells it about every
finished task. The controller grows the limit fast while throughput rises and an item's
latency stays near the lowest seen (slow start, as TCP does), then holds the limit that gave
the best throughput, probing one step up now and then (hill climbing, as .NET's thread pool
does). It backs off when latency grows with no gain in throughput (a server past its knee:
queueing, or connections waiting for a SYN retry): a rise after which the finished items
queued falls back halfway, to the geometric mean of the last good limit and the rise; one
after which only stragglers are late, to the last good limit; holding, by a quarter. It
halves on connection errors or timeouts (AIMD). It never leaves [minimum, maximum].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

LATENCY_TOLERANCE = 2.0      # latency up to this times the floor is not yet queueing (as Gradient2)
GAIN = 1.08                  # throughput must rise this much to count as a gain (noise below)
CONGESTION_BACKOFF = 0.75    # latency grew with no gain: keep this share of the limit
ERROR_BACKOFF = 0.5          # connection errors or timeouts: halve
SAMPLE_MIN_SECONDS = 0.02    # a measurement lasts at least this long...
SAMPLE_LATENCIES = 2         # ...and this many item latencies, so every slot finishes an item
GROWING_SAMPLE_LATENCIES = 2.2  # while growing: long enough for a task that queues to be seen straggling...
BURST_LATENCIES = 0.25       # ...or, after one latency, every task of the burst that began the sample has ended
GROWTH = 4                   # slow start multiplies the limit by this per sample
STRAGGLER_SHARE = 1 / 32     # this share of the tasks in flight running long also means queueing
PROBE_EVERY = 4              # while holding, try one step up every this many samples
# Items whose threads hold the GIL cannot finish faster than one CPU runs their code, so past
# latency floor / CPU per item in flight (Little's law) more only queue for it; a little over
# that keeps the GIL busy while waits bunch up
GIL_HEADROOM = 1.25
FLOOR_MEMORY = 20            # the latency floor is the least of this many recent samples
MAX_TRAJECTORY = 500         # .stats keeps this many (time, limit, items/s) points


@dataclass(frozen=True)
class Adaptive:
    """`workers=Adaptive(start=4, minimum=1, maximum=256)`, or `workers="adaptive"`: the
    number of items in flight follows measured throughput and latency during the run.

    For the `thread`, `greenlet` and `asyncio` backends (process backends keep a fixed count,
    and `workers="adaptive"` there is an error that says so). The engine grows the limit while
    latency holds, holds the count that gave the best throughput, and backs off when the other
    side queues or refuses; `.stats.concurrency` records every step.

    Parameters
    ----------
    start : int, default 4
        Tasks in flight at first (under auto mode, the count its probe suggests).
    minimum : int, default 1
        The lowest the limit may fall.
    maximum : int, default 256
        The highest the limit may rise (threads are started ahead as it grows).

    Raises
    ------
    ValueError
        A value that is not a positive integer, or not `minimum <= start <= maximum`.
    """

    start: int = 4
    minimum: int = 1
    maximum: int = 256

    def __post_init__(self) -> None:
        for name in ("start", "minimum", "maximum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Adaptive {name} must be a positive integer, got {value!r}")
        if not self.minimum <= self.start <= self.maximum:
            raise ValueError(f"Adaptive needs minimum <= start <= maximum, got {self.minimum}, "
                             f"{self.start}, {self.maximum}")


class _Sample:
    """Items finished, their summed latency and the errors among them, since `started`; and
    the CPU time of those whose worker measured it."""

    __slots__ = ("started", "items", "latency", "errors", "cpu", "cpu_items")

    def __init__(self, started: float):
        self.started = started
        self.items = 0
        self.latency = 0.0
        self.errors = 0
        self.cpu = 0.0
        self.cpu_items = 0

    def mean_latency(self) -> float:
        return self.latency / self.items if self.items else 0.0


class ConcurrencyController:
    """Chooses the number of tasks in flight. Feed it `record(...)` for every finished task and
    call `update(now)` after each batch of events; read `limit`."""

    def __init__(self, bounds: Adaptive, now: float, cpu_lanes: int = 1):
        self.bounds = bounds
        self.cpu_lanes = cpu_lanes          # items that can compute at once: 1 under the GIL
        self.useful: int | None = None      # most in flight that can still gain, from CPU per item
        self.limit = bounds.start
        self.growing = True                 # slow start, until latency or throughput says stop
        self.floors: list[float] = []       # recent samples' mean latencies
        self.best_rate = 0.0
        self.best_limit = bounds.start
        self.holding_samples = 0
        self.probing_from: int | None = None  # the limit held before a probe one step up
        self.sample = _Sample(now)
        self.trajectory: list[tuple[float, int, float]] = [(0.0, self.limit, 0.0)]
        self.run_started = now
        self.lowered_at = now     # tasks started before the limit last fell say nothing of the new limit

    @property
    def workers_wanted(self) -> int:
        """Workers to have ready: while growing, as many as the next rise may use, so that
        they are started ahead of it (a thread takes tens of microseconds to start)."""
        if self.growing:
            ahead = min(self.bounds.maximum, self.limit * GROWTH)
            return ahead if self.useful is None else max(self.limit, min(ahead, self.useful))
        return self.limit

    # ---- what the engine tells it -----------------------------------------------------
    def record(self, items: int, seconds: float, errors: int = 0, started: float | None = None,
               cpu: float | None = None) -> None:
        """A task of `items` items, started at `started`, took `seconds` in its worker, `cpu` of
        them on its thread's CPU (None: not measured); `errors` of them failed with a connection
        error or a timeout."""
        if started is not None and started < self.lowered_at:
            return  # it queued under the higher limit: counting it would lower the limit again
        sample = self.sample
        sample.items += items
        sample.latency += seconds
        sample.errors += errors
        if cpu is not None:
            sample.cpu += cpu
            sample.cpu_items += items

    def is_straggler(self, started: float, items: int, now: float) -> bool:
        """A task of `items` items in flight this long is queueing somewhere (a connection that
        waits for a SYN retry finishes late, so its latency alone would tell too late). Tasks
        started before the limit last fell are the old limit's, and do not count."""
        return started >= self.lowered_at and now - started > LATENCY_TOLERANCE * self.floor * items

    def next_look(self, now: float) -> float | None:
        """Seconds until the sample may be long enough to decide on (events aside), or None."""
        sample = self.sample
        if not sample.items:
            return None
        latency = sample.mean_latency()
        elapsed = now - sample.started
        latencies = GROWING_SAMPLE_LATENCIES if self.growing else SAMPLE_LATENCIES
        for point in ((latency if self.growing else None), latencies * latency):
            if point is not None and max(SAMPLE_MIN_SECONDS, point) > elapsed:
                return max(SAMPLE_MIN_SECONDS, point) - elapsed
        return None

    def update(self, now: float, stragglers: int = 0, oldest_started: float | None = None) -> int:
        """Close the sample when it is long enough, and move the limit. `stragglers`: tasks in
        flight for which `is_straggler` holds; `oldest_started`: when the longest-running task
        in flight began. Returns the limit."""
        sample = self.sample
        latency = sample.mean_latency()
        latencies = GROWING_SAMPLE_LATENCIES if self.growing else SAMPLE_LATENCIES
        elapsed = now - sample.started
        long_enough = elapsed >= max(SAMPLE_MIN_SECONDS, latencies * latency)
        if self.growing and not long_enough and elapsed >= max(SAMPLE_MIN_SECONDS, latency):
            # The tasks a rise starts at once are the ones that may overflow a queue: once all
            # of them have ended (none is left to straggle), their latencies are the verdict.
            burst_ended = oldest_started is None or oldest_started > sample.started + BURST_LATENCIES * latency
            long_enough = burst_ended
        if not sample.items or not (long_enough and sample.items >= min(self.limit, 4) or sample.errors):
            return self.limit
        rate = sample.items / max(now - sample.started, 1e-9)
        self._remember_floor(latency)
        if sample.cpu_items and sample.cpu > 0:
            per_item = sample.cpu / sample.cpu_items
            self.useful = max(1, math.ceil(GIL_HEADROOM * self.cpu_lanes * self.floor / per_item))
        before = self.limit
        self._decide(rate, latency, sample.errors, stragglers >= max(1, self.limit * STRAGGLER_SHARE))
        if self.limit < before:
            self.lowered_at = now
        self._note(now, rate)
        self.sample = _Sample(now)
        return self.limit

    # ---- the policy ---------------------------------------------------------------------
    def _remember_floor(self, latency: float) -> None:
        self.floors.append(latency)
        if len(self.floors) > FLOOR_MEMORY:
            del self.floors[0]

    @property
    def floor(self) -> float:
        return min(self.floors) if self.floors else math.inf

    def _decide(self, rate: float, latency: float, errors: int, straggling: bool) -> None:
        if errors:
            self._restart_from(self.limit * ERROR_BACKOFF, rate)
            return
        gained = rate > self.best_rate * GAIN
        slowed = latency > LATENCY_TOLERANCE * self.floor
        queueing = straggling or slowed
        if self.growing:
            # Judged by latency alone: right after a rise, the items that finish are the old
            # limit's, so throughput lags; an item's latency does not.
            if not queueing:
                self.best_rate, self.best_limit = max(rate, self.best_rate), self.limit
                if self.useful is not None and self.useful <= self.limit:
                    self.growing = False  # more would only wait for the GIL: hold here
                    return
                self._set(self.limit * GROWTH if self.useful is None else min(self.limit * GROWTH, self.useful))
            elif not slowed:  # tasks straggle, those that end do not queue: dropped connections
                # (a SYN retry's second) cost the most, so back to the last limit without any
                self.growing = False
                self._set(self.best_limit)
            else:  # the finished items queued: the best count lies between
                self.growing = False
                self._set(math.sqrt(self.best_limit * self.limit))
            return
        if self.probing_from is not None:  # the outcome of one step up
            if gained:
                self.best_rate, self.best_limit = rate, self.limit
                self.holding_samples = PROBE_EVERY  # climb on at once
            else:
                self._set(self.probing_from)
            self.probing_from = None
            return
        if queueing and not gained:
            self._restart_from(self.limit * CONGESTION_BACKOFF, rate)
            return
        # holding: follow the rate this limit gets now, and now and then try one step up
        self.best_rate = (self.best_rate + rate) / 2
        self.best_limit = self.limit
        self.holding_samples += 1
        room = self.bounds.maximum if self.useful is None else min(self.bounds.maximum, self.useful)
        if self.holding_samples >= PROBE_EVERY and self.limit < room:
            self.holding_samples = 0
            self.probing_from = self.limit
            self._set(self.limit + max(1, self.limit // 8))

    def _restart_from(self, limit: float, rate: float) -> None:
        """Back off to `limit`; what was best before may no longer hold, so measure afresh."""
        self.growing = False
        self.probing_from = None
        self.holding_samples = 0
        self._set(limit)
        self.best_rate, self.best_limit = rate, self.limit

    def _set(self, limit: float) -> None:
        self.limit = max(self.bounds.minimum, min(self.bounds.maximum, int(round(limit))))

    def _note(self, now: float, rate: float) -> None:
        if len(self.trajectory) >= MAX_TRAJECTORY:
            del self.trajectory[::2]  # keep the whole run's shape at half the resolution
        self.trajectory.append((round(now - self.run_started, 4), self.limit, round(rate, 1)))
