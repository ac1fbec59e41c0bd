"""The engine's timeouts, backoff and deadlines read `RunSpec.clock`: with a fake clock and a fake
backend they are tested without waiting for wall time."""
import pmap
from pmap.backends.base import Backend, Done, Started
from pmap.engine import RunSpec, RunStats, execute


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Scripted(Backend):
    """Runs tasks in the caller on the fake clock. A task starts `queued` fake seconds after it
    is submitted; an item in `hanging` never finishes; `wait` moves the clock by its timeout when
    nothing is due, so the engine's waits cost no wall time."""

    name = "scripted"
    kind = "serial"

    def __init__(self, clock: FakeClock, hanging=(), queued: float = 0.0):
        super().__init__(workers=1)
        self.clock = clock
        self.hanging = set(hanging)
        self.queued = queued
        self.pending = []          # (starts at, task)
        self.running = {}          # task id -> task, started and hanging
        self.submitted = []        # (fake time, items)
        self.cancelled = []
        self.waits = []

    def capacity(self):
        return 1 - len(self.pending) - len(self.running)

    def submit(self, task):
        self.submitted.append((self.clock(), list(task.items)))
        self.pending.append((self.clock() + self.queued, task))

    def wait(self, timeout):
        self.waits.append(timeout)
        due = [(at, task) for at, task in self.pending if at <= self.clock()]
        if not due:
            self.clock.now += timeout
            return []
        events = []
        for at, task in due:
            self.pending.remove((at, task))
            events.append(Started(task.id, "w", at))
            if any(item in self.hanging for item in task.items):
                self.running[task.id] = task
                continue
            values, failures = [], []
            for pos, item in enumerate(task.items):
                try:
                    values.append(task.fn(item))
                except Exception as exc:
                    values.append(None)
                    failures.append((pos, exc, ""))
            events.append(Done(task.id, "w", values, failures, 0.0))
        return events

    def cancel(self, task_id):
        self.cancelled.append(task_id)
        self.running.pop(task_id, None)
        self.pending = [(at, task) for at, task in self.pending if task.id != task_id]


def run(backend, fn, items, clock, **options):
    spec = RunSpec(fn, items, total=len(items), chunksize=1, clock=clock, **options)
    stats = RunStats()
    return [value for batch in execute(backend, spec, stats) for value in batch], stats


def double(x):
    return 2 * x


def test_an_item_times_out_on_the_fake_clock():
    clock = FakeClock()
    backend = Scripted(clock, hanging={1})
    out, stats = run(backend, double, [0, 1, 2], clock, timeout=30.0, on_error="return")
    assert out[0] == 0 and out[2] == 4
    assert isinstance(out[1], pmap.Failure) and out[1].kind == "timeout"
    assert stats.timed_out == 1 and len(backend.cancelled) == 1
    assert 1030.0 <= clock.now < 1031.0  # thirty fake seconds, and no more than one slice past them


def test_a_deadline_counts_from_the_start_not_the_submit():
    # queued 20 s before it starts, an item with a 30 s timeout that never finishes times out
    # 30 s after it started, 50 s after it was submitted
    clock = FakeClock()
    backend = Scripted(clock, hanging={0}, queued=20.0)
    out, _ = run(backend, double, [0], clock, timeout=30.0, on_error="return")
    assert out[0].kind == "timeout"
    assert 1050.0 <= clock.now < 1051.0


class FailsFirst:
    """Raises ConnectionError on its first `failures` calls, then doubles."""

    def __init__(self, failures: int):
        self.failures = failures

    def __call__(self, x):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("refused")
        return 2 * x


def test_backoff_doubles_on_the_fake_clock():
    clock = FakeClock()
    backend = Scripted(clock)
    out, stats = run(backend, FailsFirst(3), [7], clock, retries=3, backoff=2.0)
    assert out == [14] and stats.retried == 3
    times = [at for at, _ in backend.submitted]
    assert times == [1000.0, 1002.0, 1006.0, 1014.0]  # 2, 4 and 8 fake seconds apart
    assert clock.now == 1014.0  # no wait ran past the retry that was due


def test_a_retry_that_is_not_due_yet_waits_without_blocking_the_others():
    clock = FakeClock()
    backend = Scripted(clock)
    fn = FailsFirst(1)  # the first item fails once; the others go on meanwhile
    out, _ = run(backend, fn, [1, 2, 3], clock, retries=1, backoff=10.0)
    assert out == [2, 4, 6]
    assert [items for _, items in backend.submitted] == [[1], [2], [3], [1]]
    assert backend.submitted[-1][0] == 1010.0


class Latency(Backend):
    """Every task takes `latency` fake seconds from its submission, however many run at once
    (a server far from its knee); `wait` moves the clock to the next completion."""

    name = "latency"
    kind = "thread"
    adaptive_maximum = 64

    def __init__(self, clock: FakeClock, latency: float):
        super().__init__(workers=64)
        self.clock = clock
        self.latency = latency
        self.running = []  # (done at, started at, task)
        self.wanted = []

    def set_concurrency(self, tasks):
        self.wanted.append(tasks)

    def capacity(self):
        return 64 - len(self.running)

    def submit(self, task):
        self.running.append((self.clock() + self.latency, self.clock(), task))

    def wait(self, timeout):
        if self.running and min(done for done, _, _ in self.running) > self.clock():
            self.clock.now = min(self.clock() + timeout, min(done for done, _, _ in self.running))
        due = [entry for entry in self.running if entry[0] <= self.clock()]
        events = []
        for entry in due:
            self.running.remove(entry)
            _, started, task = entry
            events += [Started(task.id, "w", started), Done(task.id, "w", [x * 2 for x in task.items], [],
                                                             self.latency)]
        if not due and not self.running:
            self.clock.now += timeout
        return events


def test_an_adaptive_run_grows_on_the_fake_clock():
    clock = FakeClock()
    backend = Latency(clock, latency=1.0)
    spec = RunSpec(double, list(range(300)), total=300, chunksize=1, clock=clock,
                   concurrency=pmap.Adaptive(start=2, maximum=64))
    stats = RunStats()
    out = [value for batch in execute(backend, spec, stats) for value in batch]
    assert out == [2 * x for x in range(300)]
    limits = [limit for _, limit, _ in stats.concurrency]
    assert limits[0] == 2 and max(limits) == 64, stats.concurrency
    assert limits == sorted(limits), "a server with no knee never made the limit fall"
    # slow start on fake seconds: one rise per latency, and the whole run in a few latencies
    assert [when for when, _, _ in stats.concurrency[:4]] == [0.0, 1.0, 2.0, 3.0], stats.concurrency
    assert clock.now - 1000.0 < 15.0, stats.concurrency


def test_a_task_no_worker_starts_times_out_after_the_backends_start_wait():
    # queued far longer than the timeout: with start_wait 5, the engine fails it 35 fake seconds
    # after the submit, cancels it, and names the bound in the error
    clock = FakeClock()
    backend = Scripted(clock, queued=1000.0)
    backend.start_wait = 5.0
    out, stats = run(backend, double, [0, 1], clock, timeout=30.0, on_error="return")
    assert [failure.kind for failure in out] == ["timeout", "timeout"]
    assert "no scripted worker started this task within 35s (timeout 30s plus start_wait 5s)" in str(out[0].exception)
    assert stats.timed_out == 2 and len(backend.cancelled) == 2
    assert 1070.0 <= clock.now < 1071.0  # one task at a time: two bounds of 35 fake seconds


def test_a_task_that_starts_within_the_start_wait_runs_and_is_timed_from_its_start():
    clock = FakeClock()
    backend = Scripted(clock, queued=33.0)
    backend.start_wait = 5.0
    out, stats = run(backend, double, [3], clock, timeout=30.0, retries=1)
    assert out == [6] and stats.timed_out == 0 and backend.cancelled == []


def test_without_a_start_wait_a_queued_task_waits_for_its_start():
    clock = FakeClock()
    backend = Scripted(clock, queued=500.0)
    out, _ = run(backend, double, [4], clock, timeout=30.0)
    assert out == [8] and backend.cancelled == []
