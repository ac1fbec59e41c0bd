"""Auto's early start: IO items begin on threads while the probe's first item still waits, and
what the probe decides from that first item is not changed by them."""
import threading
import time

import pytest

import pmap
from pmap.early_start import EARLY_MAX_ITEMS, can_start_early
from pmap.engine import RunSpec

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
        time.sleep(0.3 if item == 0 else 0.02)  # the probe's first item waits long
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


def spin(seconds):
    """Pure Python for `seconds` of this thread's CPU time, however busy the machine is."""
    deadline = time.thread_time() + seconds
    while time.thread_time() < deadline:
        pass


def wait_then_compute(item):
    if item == 0:  # waiting when the watcher looks (at 2, 4 or 8 ms, late on a busy machine)...
        time.sleep(0.1)
        spin(0.06)  # ...then pure Python, holding the GIL: no IO item computes this long
    else:
        spin(0.005)
    return item * 3


def test_a_first_wait_then_pure_python_still_goes_to_processes():
    # The early threads take the GIL from the first item, which stretches its wall time: auto
    # lets them finish, measures another item alone, and picks processes for the CPU-bound rest.
    spans = Spans()

    def recorded(item):
        started = time.perf_counter()
        value = wait_then_compute(item)
        spans.record(item, started)  # in a forked worker this records nothing the test sees
        return value

    out = pmap.pmap(recorded, list(range(100)))
    plan = out.stats.plan
    assert plan.early_items > 0, "the watcher did not start early: this test no longer tests it"
    # What is tested is that the early threads do not keep CPU-bound work. Where the machine's
    # cores are busy with other processes, auto may judge 0.5 s of CPU too little to pay for
    # processes and stay serial; that is its ordinary decision, not the early start's.
    assert plan.backend in PROCESS_BACKENDS or plan.backend == "serial", str(plan)
    assert out == [x * 3 for x in range(100)]
    assert out.stats.workers == plan.workers, "the early threads are reported as the run's workers"
    assert out.stats.concurrency == [], "the early threads' trajectory is reported as the run's"
    ran_here = sorted(spans.spans)
    assert ran_here[:1 + plan.early_items] == list(range(1 + plan.early_items)), \
        "the first item and those started early did not all run here, once each"


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
    out = pmap.pmap(lambda s: time.sleep(s) or s, [0.3] + [0.01] * 5)
    assert out == [0.3] + [0.01] * 5
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
        time.sleep(0.3 if x == 0 else 0.01)
        if x == 7:
            raise ValueError("seventh")
        return x

    out = pmap.pmap(fail_seventh, list(range(50)), on_error="return")
    assert out.stats.plan.early_items > 7
    assert isinstance(out[7], pmap.Failure) and out[7].index == 7 and out[7].item == 7
    assert [x for x in out if not isinstance(x, pmap.Failure)] == [x for x in range(50) if x != 7]


def test_the_run_that_began_early_is_the_run_that_goes_on():
    # one adaptive thread run from the early start to the end: its controller's trajectory
    # starts at the early start, and every item runs once
    spans = Spans()

    def fetch(item):
        started = time.perf_counter()
        time.sleep(0.3 if item == 0 else 0.01)
        spans.record(item, started)
        return item

    seen = []
    called = time.perf_counter()
    out = pmap.pmap(fetch, list(range(300)), progress=lambda done, total: seen.append((done, total)))
    took = time.perf_counter() - called
    assert out == list(range(300))
    assert out.stats.wall_seconds <= took, "the first item's time was counted twice"
    plan = out.stats.plan
    assert plan.early_items > 0 and out.stats.backend == "thread"
    assert plan.concurrency is not None and plan.concurrency.start >= plan.early_items
    assert out.stats.concurrency and out.stats.concurrency[0][1] == plan.concurrency.start
    assert sorted(spans.spans) == list(range(300))
    assert seen[-1] == (300, 300) and [done for done, _ in seen] == sorted(done for done, _ in seen)


@pytest.mark.parametrize("ordered", [True, False])
def test_imap_over_an_early_start_yields_every_item(ordered):
    def fetch(item):
        time.sleep(0.3 if item == 0 else 0.005)
        return item

    with pmap.imap(fetch, list(range(120)), ordered=ordered) as results:
        got = list(results)
        plan = results.stats.plan
    assert plan.early_items > 0
    assert (got if ordered else sorted(got)) == list(range(120))


def test_an_early_item_raising_ends_the_run_with_its_error():
    def fail_ninth(x):
        time.sleep(0.3 if x == 0 else 0.01)
        if x == 9:
            raise KeyError("ninth")
        return x

    with pytest.raises(KeyError, match="ninth"):
        pmap.pmap(fail_ninth, list(range(80)))
    deadline = time.monotonic() + 5
    while _pmap_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _pmap_threads()


def test_long_inputs_start_no_watcher():
    # one item's latency is a small share of a run this long: not worth a thread per call
    assert can_start_early(RunSpec(abs, list(range(EARLY_MAX_ITEMS))))
    assert not can_start_early(RunSpec(abs, list(range(EARLY_MAX_ITEMS + 1))))
    names = []
    pmap.pmap(lambda x: names.append([t.name for t in threading.enumerate()]) or x, range(EARLY_MAX_ITEMS + 1))
    assert not any("pmap-early-start" in seen for seen in names[:1])
