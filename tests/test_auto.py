"""Auto mode decides right on clear cases and runs every item exactly once."""
import hashlib
import os
import sys
import threading
import time

import pytest

import pmap
from workloads import append_item_to, compress, cpu_loop, sleep_then, square

PROCESS_BACKENDS = {"fork", "process"}


def test_sleeping_function_goes_to_threads():
    plan = pmap.explain(sleep_then, [0.02] * 200)
    assert plan.backend == "thread", str(plan)
    assert plan.workers > os.cpu_count()
    assert plan.item_cpu < plan.item_wall / 10


def test_pure_python_loop_goes_to_processes():
    plan = pmap.explain(cpu_loop, [200_000] * 300)
    assert plan.backend in PROCESS_BACKENDS, str(plan)
    assert plan.gil_released is False


def _spin_in_python(stop):
    while not stop.is_set():
        sum(range(1000))


def _spin_without_the_gil(stop):
    block = bytes(1 << 20)
    while not stop.is_set():
        hashlib.sha256(block).digest()  # hashlib releases the GIL for large inputs


@pytest.mark.parametrize("spin", [_spin_in_python, _spin_without_the_gil])
def test_a_busy_thread_of_the_caller_is_not_taken_for_native_threads(spin):
    # Its CPU is the process's but not the item's: before, auto read it as BLAS threads
    # ("each item used 2.8 CPUs' worth") and could keep CPU-bound work serial.
    stop = threading.Event()
    spinner = threading.Thread(target=spin, args=(stop,), daemon=True)
    spinner.start()
    try:
        plan = pmap.explain(cpu_loop, [200_000] * 300)
    finally:
        stop.set()
        spinner.join()
    assert plan.probed_items >= 1, str(plan)
    assert plan.backend != "serial", str(plan)
    # A spinner that runs Python also takes the GIL from the probe, and auto cannot tell those
    # waits from IO (it may pick threads then). In the full suite on 3.13 auto also still saw
    # "1.6 CPUs' worth" beside it about one run in five, from CPU no thread it can read accounts
    # for; the plan stayed parallel. A spinner that runs without the GIL is told apart exactly.
    if spin is _spin_without_the_gil:
        assert plan.native_parallelism is None, str(plan)
        assert plan.backend in PROCESS_BACKENDS, str(plan)


def test_trivial_function_stays_serial():
    plan = pmap.explain(square, range(50_000))
    assert plan.backend == "serial", str(plan)
    out = pmap.pmap(square, range(50_000))
    assert out == [x * x for x in range(50_000)]
    assert out.stats.plan.backend == "serial"


def cores_free_for_two_threads(blob) -> bool:
    """Whether two threads can run at once right now: other processes may hold the cores."""
    spans = []

    def timed():
        start, cpu = time.perf_counter(), time.thread_time()
        compress(blob)
        spans.append((start, time.perf_counter(), time.thread_time() - cpu))

    threads = [threading.Thread(target=timed) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = max(end for _, end, _ in spans) - min(start for start, _, _ in spans)
    return sum(cpu for _, _, cpu in spans) / wall >= 1.25


def test_gil_releasing_code_goes_to_threads():
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores to see two threads compute at once")
    blob = os.urandom(1 << 16) * 64  # 4 MiB that compresses slowly
    plan = pmap.explain(compress, [blob] * 60)
    if not plan.gil_released and not cores_free_for_two_threads(blob):
        pytest.skip("other processes keep the cores busy: two threads cannot be seen running at once")
    assert plan.gil_released is True, str(plan)
    assert plan.backend == "thread", str(plan)


def test_unpicklable_cpu_closure_does_not_go_to_process():
    lock = threading.Lock()

    def cpu_under_lock(n):
        with lock:
            return cpu_loop(n)

    plan = pmap.explain(cpu_under_lock, [200_000] * 300)
    assert plan.backend != "process", str(plan)
    out = pmap.pmap(cpu_under_lock, [1000] * 100)
    assert out == [cpu_loop(1000)] * 100


@pytest.mark.parametrize("container", [list, tuple, iter], ids=["list", "tuple", "iterator"])
def test_probed_items_run_exactly_once(tmp_path, container):
    # a list or tuple is sliced after the probe, an iterator read on: both must resume exactly there
    log = tmp_path / "calls.log"
    items = container([(str(log), i) for i in range(400)])
    out = pmap.pmap(append_item_to, items)
    assert out == list(range(400))
    calls = log.read_text().split()
    assert sorted(map(int, calls)) == list(range(400)), "an item ran twice or not at all"
    plan = out.stats.plan  # an early start takes the items after the first from the probe
    assert plan is not None and plan.probed_items + plan.early_items >= 2


def test_run_stats_carry_the_plan_and_explain_prints():
    out = pmap.pmap(sleep_then, [0.01] * 40)
    plan = out.stats.plan
    assert plan.backend == out.stats.backend == "thread"
    text = str(plan)
    assert "reason:" in text and "probe item" in text and "thread" in text


def test_auto_keeps_order_errors_and_indices_across_the_probe():
    def fail_late(x):
        if x == 1500:
            raise ValueError("late failure")
        return x

    out = pmap.pmap(fail_late, range(3000), on_error="return")
    assert [r for r in out if not isinstance(r, pmap.Failure)] == [x for x in range(3000) if x != 1500]
    assert out[1500].index == 1500 and out[1500].item == 1500


def test_one_item_that_spends_the_probe_budget_ends_the_probe():
    # a 30 ms wait is clearly IO: a second serial item would only delay the threads
    plan = pmap.explain(sleep_then, [0.03] * 200)
    assert plan.backend == "thread" and plan.probed_items == 1, str(plan)
    # a sleep costs well under 1 ms of CPU; the probe's own bookkeeping must not be counted as
    # the function's, or it shrinks the thread count (it gave 28-52 threads here, not 64)
    assert plan.workers >= 48, str(plan)


def test_generator_input_of_unknown_length():
    out = pmap.pmap(sleep_then, (0.005 for _ in range(60)))
    assert out == [0.005] * 60


def test_progress_counts_probe_and_rest():
    seen = []
    pmap.pmap(square, range(20_000), progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (20_000, 20_000)


@pytest.mark.skipif(not hasattr(sys, "_is_gil_enabled") or sys._is_gil_enabled(),
                    reason="needs a free-threaded interpreter (python3.13t)")
def test_free_threaded_cpu_work_goes_to_threads():
    assert pmap.explain(cpu_loop, [200_000] * 300).backend == "thread"


def test_auto_never_picks_remote_backends():
    for fn, items in [(sleep_then, [0.02] * 50), (cpu_loop, [200_000] * 100), (square, range(1000))]:
        assert pmap.explain(fn, items).backend not in {"manager", "dask"}


def spin_then_times_ten(x):
    """CPU-bound long enough for the GIL probe (over 0.5 ms), yet a tiny run in all."""
    deadline = time.thread_time() + 0.004
    while time.thread_time() < deadline:
        pass
    return x * 10


@pytest.mark.parametrize("n", range(1, 7))
def test_every_item_gets_its_result_whatever_the_probe_leaves(n):
    # with 3 items the serial probe takes 2 and the GIL probe finds a single one left
    assert pmap.pmap(spin_then_times_ten, range(n)) == [x * 10 for x in range(n)]


class HeldInThisProcess:
    """An item no process can receive: it will not be pickled, by pickle or cloudpickle."""

    def __init__(self, n):
        self.n = n

    def __reduce__(self):
        raise TypeError("HeldInThisProcess stays in the process that made it")


def cpu_loop_of(item):
    return cpu_loop(item.n)


def test_cpu_bound_items_that_cannot_be_pickled_stay_in_this_process():
    # Fork does not pickle the function, but it pickles every item: it would fail all but
    # the probed ones (56 of 60 failed before).
    items = [HeldInThisProcess(200_000) for _ in range(60)]
    plan = pmap.explain(cpu_loop_of, items)
    assert plan.backend in {"serial", "thread"}, str(plan)
    assert "cannot be pickled" in plan.reason and "HeldInThisProcess" in plan.reason, str(plan)
    out = pmap.pmap(cpu_loop_of, items, on_error="return")
    assert out == [cpu_loop(200_000)] * 60
    assert out.stats.plan.backend in {"serial", "thread"}


def test_cpu_bound_results_that_cannot_be_pickled_stay_in_this_process():
    def make(n):
        return HeldInThisProcess(cpu_loop(n))

    plan = pmap.explain(make, [200_000] * 60)
    assert plan.backend in {"serial", "thread"}, str(plan)
    assert "first result cannot be pickled" in plan.reason, str(plan)


@pytest.fixture
def cold_pool_and_another_thread():
    """loky's workers ended, and a thread of "another library" alive: fork is unsafe here."""
    from loky import get_reusable_executor
    get_reusable_executor().shutdown(wait=True, kill_workers=True)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    yield
    stop.set()
    other.join()


def test_a_seeded_auto_run_with_a_cold_pool_equals_serial(cold_pool_and_another_thread):
    # items in the calling thread (the probe) and in the workers are each seeded per item, and
    # the caller's own generator is put back after the run
    import random
    from workloads import spin_then_draw
    before = random.getstate()
    out = pmap.pmap(spin_then_draw, range(300), seed=7)
    assert random.getstate() == before
    assert out == pmap.pmap(spin_then_draw, range(300), seed=7, backend="serial")
