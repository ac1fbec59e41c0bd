"""Nothing hangs, nothing is lost: real segfaults, exits, kills, hangs, Ctrl-C and driver death."""
import collections
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import pmap
from faults import (count_attempts, dies_pickling_its_result_on_three, exit_on_five, flaky_once, hang_on_seven,
                    kill_self_on_four, killed_writing_its_result_on_three, pid_after_sleep, poison_on_two,
                    segfault_on_three, sleep_then_exit_on_one, times_ten)

PROCESS_LIKE = ("fork", "pool", "process", "manager")
COOPERATIVE = ("serial", "thread")
BOUND = 60  # seconds: a run that takes longer than this has hung


def expected(n, bad):
    return [x * 10 for x in range(n) if x not in bad]


def ok_values(out):
    return [r for r in out if not isinstance(r, pmap.Failure)]


@pytest.mark.pmap_backends(*PROCESS_LIKE)
@pytest.mark.parametrize("fn, bad_item, code", [(segfault_on_three, 3, -signal.SIGSEGV),
                                                (exit_on_five, 5, 3),
                                                (kill_self_on_four, 4, -signal.SIGKILL)],
                         ids=["segfault", "os._exit", "sigkill"])
def test_dead_worker_costs_only_its_item(pmap_backend, fn, bad_item, code):
    start = time.monotonic()
    out = pmap.pmap(fn, range(12), backend=pmap_backend, workers=2, on_error="return")
    assert time.monotonic() - start < BOUND
    assert ok_values(out) == expected(12, {bad_item})
    failure = out[bad_item]
    assert failure.kind == "crash" and isinstance(failure.exception, pmap.WorkerCrashed)
    assert failure.exception.exitcode == code
    assert out.stats.crashed_workers >= 1


def test_a_deliberate_segfault_leaves_no_faulthandler_dump_in_the_output():
    # pytest enables faulthandler and forked workers inherit it: the crash helpers turn it off,
    # so a passing run does not print "Fatal Python error" with every thread's stack.
    script = textwrap.dedent("""
        import pmap
        from faults import segfault_on_three
        out = pmap.pmap(segfault_on_three, range(6), backend="fork", workers=2, on_error="return")
        print(out[3].kind)
    """)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.stdout.split() == ["crash"], done.stderr
    assert "Fatal Python error" not in done.stderr


@pytest.mark.pmap_backends(*PROCESS_LIKE)
def test_crash_raises_worker_crashed_by_default(pmap_backend):
    with pytest.raises(pmap.WorkerCrashed, match="SIGSEGV|signal 11") as info:
        pmap.pmap(segfault_on_three, range(8), backend=pmap_backend, workers=2)
    assert "item 3" in "\n".join(info.value.__notes__)


@pytest.mark.pmap_backends(*PROCESS_LIKE)
def test_crash_in_a_big_chunk_isolates_the_culprit(pmap_backend):
    out = pmap.pmap(segfault_on_three, range(400), backend=pmap_backend, workers=2, chunksize=50,
                    on_error="return")
    assert ok_values(out) == expected(400, {3})
    assert out[3].kind == "crash"


@pytest.mark.pmap_backends(*PROCESS_LIKE)
def test_hung_item_is_killed_and_the_rest_go_on(pmap_backend):
    start = time.monotonic()
    out = pmap.pmap(hang_on_seven, range(12), backend=pmap_backend, workers=2, timeout=1,
                    on_error="return")
    assert time.monotonic() - start < BOUND
    assert ok_values(out) == expected(12, {7})
    assert out[7].kind == "timeout" and isinstance(out[7].exception, pmap.TaskTimeout)
    assert out.stats.timed_out == 1


@pytest.mark.pmap_backends(*COOPERATIVE)
def test_cooperative_timeout_interrupts_python_code(pmap_backend):
    def spin_on_seven(x):
        if x == 7:
            while True:
                pass
        return x * 10

    out = pmap.pmap(spin_on_seven, range(10), backend=pmap_backend, timeout=0.5, on_error="return")
    assert ok_values(out) == expected(10, {7})
    assert out[7].kind == "timeout"


@pytest.mark.pmap_backends(*PROCESS_LIKE, *COOPERATIVE)
def test_flaky_item_succeeds_on_retry(pmap_backend, tmp_path):
    items = [(str(tmp_path), x) for x in range(10)]
    out = pmap.pmap(flaky_once, items, backend=pmap_backend, retries=1, workers=2)
    assert out == [x * 10 for x in range(10)]
    assert out.stats.retried == 4  # items 0, 3, 6, 9 failed once each


@pytest.mark.pmap_backends(*PROCESS_LIKE, *COOPERATIVE)
def test_retry_on_limits_which_errors_are_retried(pmap_backend, tmp_path):
    log = tmp_path / "attempts"
    out = pmap.pmap(count_attempts, [(str(log), 1)], backend=pmap_backend, retries=3,
                    retry_on=ConnectionError, on_error="return")
    assert out[0].kind == "error" and out[0].attempts == 1
    assert log.read_text().split() == ["1"]
    out = pmap.pmap(count_attempts, [(str(log), 2)], backend=pmap_backend, retries=2,
                    retry_on=RuntimeError, backoff=0.01, on_error="return")
    assert out[0].attempts == 3
    assert log.read_text().split() == ["1", "2", "2", "2"]


@pytest.mark.pmap_backends(*PROCESS_LIKE)
def test_poison_item_is_reported_after_retries_and_never_loops(pmap_backend):
    start = time.monotonic()
    out = pmap.pmap(poison_on_two, range(8), backend=pmap_backend, retries=2, workers=2, on_error="return")
    assert time.monotonic() - start < BOUND
    assert ok_values(out) == expected(8, {2})
    assert out[2].kind == "crash" and out[2].attempts == 3
    assert out.stats.crashed_workers >= 3


@pytest.mark.pmap_backends("fork", "pool", "process")
def test_an_items_timeout_counts_from_its_start_not_from_a_slow_worker_start(pmap_backend):
    # the items are sent while the workers still run their initializer
    out = pmap.pmap(times_ten, range(4), backend=pmap_backend, workers=2, timeout=1, initializer=time.sleep,
                    initargs=(2,), on_error="return")
    assert out == [0, 10, 20, 30]


@pytest.mark.pmap_backends("fork", "pool", "process")
def test_max_tasks_per_worker_recycles_workers(pmap_backend):
    out = pmap.pmap(pid_after_sleep, range(40), backend=pmap_backend, workers=2, chunksize=1,
                    max_tasks_per_worker=5)
    # loky cannot retire one worker: the process backend renews its executor after 2 * 5 tasks,
    # which its workers share as they come (the one that starts first may run them all)
    most = 2 * 5 if pmap_backend == "process" else 5
    assert max(collections.Counter(out).values()) <= most


# ---- Ctrl-C and driver death, in a real child process --------------------------------------

DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import pmap
    from faults import sleep_forever
    if __name__ == "__main__":
        print("running", flush=True)
        pmap.pmap(sleep_forever, range(100), backend={backend!r}, workers=2)
""")


def start_driver(backend, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=os.path.dirname(__file__), backend=backend))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "running"
    driver = psutil.Process(proc.pid)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the worker processes exist
        if backend in COOPERATIVE or len(driver.children(recursive=True)) >= 2:
            break
        time.sleep(0.05)
    time.sleep(0.5)
    return proc, driver.children(recursive=True)


def survivors(children, within):
    deadline = time.monotonic() + within
    alive = children
    while time.monotonic() < deadline:
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


@pytest.mark.pmap_backends(*PROCESS_LIKE, *COOPERATIVE)
def test_ctrl_c_reaches_the_caller_fast_and_leaves_no_process(pmap_backend, tmp_path):
    proc, children = start_driver(pmap_backend, tmp_path)
    proc.send_signal(signal.SIGINT)
    try:  # every item sleeps for ever: a run that ends at all was stopped by the Ctrl-C
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("Ctrl-C did not end the run within 30 s")
    stderr = proc.stderr.read()
    assert "KeyboardInterrupt" in stderr
    assert survivors(children, within=3) == []


@pytest.mark.pmap_backends(*PROCESS_LIKE)
def test_workers_die_with_a_killed_driver(pmap_backend, tmp_path):
    proc, children = start_driver(pmap_backend, tmp_path)
    assert children, "the driver started no worker processes"
    proc.kill()
    proc.wait(timeout=10)
    assert survivors(children, within=5) == []


@pytest.mark.pmap_backends("fork", "thread", "serial")
def test_timeouts_are_retried_whatever_retry_on(pmap_backend):
    def spin_on_one(x):
        if x == 1:
            while True:
                pass
        return x

    out = pmap.pmap(spin_on_one, range(3), backend=pmap_backend, timeout=0.3, retries=1,
                    retry_on=ValueError, on_error="return")
    assert out[0] == 0 and out[2] == 2
    assert out[1].kind == "timeout" and out[1].attempts == 2


@pytest.mark.pmap_backends("process", "pool", "fork")
@pytest.mark.parametrize("fn", [dies_pickling_its_result_on_three, killed_writing_its_result_on_three],
                         ids=["killed-pickling", "killed-writing"])
def test_a_worker_killed_while_its_result_leaves_costs_only_that_item(pmap_backend, fn):
    # the task is held from its start until its result has arrived whole: a worker that dies
    # on the way out still holds it (the pool backend used to wait for ever here)
    out = pmap.pmap(fn, range(8), backend=pmap_backend, workers=2, chunksize=1, on_error="return")
    assert ok_values(out) == expected(8, {3})
    assert out[3].kind == "crash" and out[3].exception.exitcode == -signal.SIGKILL
    assert out[3].attempts == 1


@pytest.mark.pmap_backends("process", "pool", "fork")
def test_a_crash_costs_its_own_item_not_the_one_its_sibling_was_running(pmap_backend):
    # loky kills the other workers once one dies: the item that was running on the one it
    # killed runs again and succeeds, and only the item whose worker died first fails
    out = pmap.pmap(sleep_then_exit_on_one, range(4), backend=pmap_backend, workers=2, chunksize=1,
                    on_error="return")
    assert out[0] == 0 and out[2:] == [20, 30]
    assert out[1].kind == "crash" and out[1].exception.exitcode == 5 and out[1].attempts == 1
