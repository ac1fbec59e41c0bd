"""Auto's early start: IO items begin on threads while the probe's first item still waits, and
what the probe decides from that first item is not changed by them."""
import threading
import time

import pytest

import pmap
from pmap.early_start import can_start_early
from pmap.engine import RunSpec
from workloads import cpu_loop

PROCESS_BACKENDS = {"fork", "process"}

pytestmark = pytest.mark.skipif(not can_start_early(RunSpec(abs, [1, 2])),
                                reason="the early start reads the calling thread's CPU clock from another "
                                       "thread, which needs Linux")


class Spans:
    """Records when each item ran, from whichever thread ran it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.spans = {}

    def record(self, item, started):
        with self.lock:
            assert item not in self.spans, f"item {item} ran twice"
            self.spans[item] = (started, time.perf_counter())


def test_io_items_start_while_the_first_one_still_waits():
    spans = Spans()

    def fetch(item):
        started = time.perf_counter()
        time.sleep(0.2 if item == 0 else 0.02)  # the probe's first item waits long
        spans.record(item, started)
        return item * 2

    out = pmap.pmap(fetch, list(range(150)))
    assert out == [x * 2 for x in range(150)]
    plan = out.stats.plan
    assert plan.backend == "thread" and plan.concurrency is not None, str(plan)
    assert plan.early_items > 0 and "early start" in str(plan)
    first_ended = spans.spans[0][1]
    early = [item for item, (started, _) in spans.spans.items() if item and started < first_ended]
    assert len(early) >= plan.early_items, "the early items did not run while the first one waited"
    assert sorted(spans.spans) == list(range(150))


def _wait_then_compute(n):
    time.sleep(0.012)  # waiting when the watcher looks (at 2, 4 or 8 ms, late on a busy machine)...
    return cpu_loop(n)  # ...then pure Python, holding the GIL: about 60% of the item


def test_a_first_wait_then_pure_python_still_goes_to_processes():
    # the early threads compete for the GIL with the first item, which stretches its wall time:
    # the probe takes their CPU off it, so the item still reads as CPU-bound
    out = pmap.pmap(_wait_then_compute, [300_000] * 80)
    plan = out.stats.plan
    assert plan.early_items > 0, "the watcher did not start early: this test no longer tests it"
    assert plan.backend in PROCESS_BACKENDS, str(plan)
    assert out == [cpu_loop(300_000)] * 80
    assert out.stats.workers == plan.workers, "the early threads are reported as the run's workers"


def test_a_generator_is_not_read_from_another_thread():
    readers = set()

    def items():
        for _ in range(60):
            readers.add(threading.get_ident())
            yield 0.01

    out = pmap.pmap(lambda s: time.sleep(s) or s, items())
    assert out == [0.01] * 60
    assert out.stats.plan.early_items == 0
    assert readers == {threading.get_ident()}


def test_explain_runs_only_the_probe():
    calls = []

    def nap(x):
        calls.append(x)
        time.sleep(0.05)
        return x

    plan = pmap.explain(nap, list(range(100)))
    assert plan.backend == "thread" and plan.early_items == 0
    assert len(calls) == plan.probed_items == 1


def test_an_input_shorter_than_the_early_start_finishes_there():
    out = pmap.pmap(lambda s: time.sleep(s) or s, [0.05] + [0.01] * 5)
    assert out == [0.05] + [0.01] * 5
    assert out.stats.plan.early_items == 5


def _pmap_threads():
    return [t for t in threading.enumerate() if t.name.startswith("pmap-")]


def test_the_first_item_failing_ends_the_early_threads():
    def fail_first(x):
        time.sleep(0.05)
        if x == 0:
            raise LookupError("the first item failed")
        return x

    with pytest.raises(LookupError, match="the first item failed"):
        pmap.pmap(fail_first, list(range(100)))
    deadline = time.monotonic() + 5
    while _pmap_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _pmap_threads()


def test_an_early_item_failing_is_reported_with_its_index():
    def fail_seventh(x):
        time.sleep(0.1 if x == 0 else 0.01)
        if x == 7:
            raise ValueError("seventh")
        return x

    out = pmap.pmap(fail_seventh, list(range(50)), on_error="return")
    assert out.stats.plan.early_items > 7
    assert isinstance(out[7], pmap.Failure) and out[7].index == 7 and out[7].item == 7
    assert [x for x in out if not isinstance(x, pmap.Failure)] == [x for x in range(50) if x != 7]
