"""pmap.Executor: a concurrent.futures.Executor whose crashed, hung or failing call fails only
its own future. (CPython's own executor tests run against it in test_stdlib_conformance.py.)"""
import asyncio
import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

import pmap
from faults import count_attempts, flaky_once, hang_on_seven, segfault_on_three
from workloads import fail_on_three, pid_of, read_init_value, set_init_value, square

PROCESS_LIKE = ("process", "pool", "fork")
SUBMITTING = ("thread", *PROCESS_LIKE, "greenlet", "serial")
HANG = 60


@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends(*SUBMITTING)
def test_submit_map_wait_and_as_completed(pmap_backend):
    with pmap.Executor(2, backend=pmap_backend) as executor:
        assert isinstance(executor, cf.Executor)
        futures = [executor.submit(square, x) for x in range(40)]
        assert all(isinstance(f, cf.Future) for f in futures)
        done, not_done = cf.wait(futures)
        assert not not_done and len(done) == 40
        assert sorted(f.result() for f in cf.as_completed(futures)) == sorted(x * x for x in range(40))
        assert list(executor.map(square, range(10))) == [x * x for x in range(10)]
        assert executor.submit(divmod, 7, 2).result() == (3, 1)


@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends(*PROCESS_LIKE)
def test_a_segfault_fails_only_its_future_and_the_next_submit_works(pmap_backend):
    with pmap.Executor(2, backend=pmap_backend) as executor:
        futures = [executor.submit(segfault_on_three, x) for x in range(8)]
        with pytest.raises(pmap.WorkerCrashed, match="signal 11"):
            futures[3].result()
        assert [f.result() for i, f in enumerate(futures) if i != 3] == [x * 10 for x in range(8) if x != 3]
        assert executor.submit(square, 12).result() == 144
        assert executor.stats.crashed_workers >= 1


@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends(*PROCESS_LIKE)
def test_a_hung_call_gets_task_timeout_and_the_others_go_on(pmap_backend):
    with pmap.Executor(2, backend=pmap_backend, timeout=1.0) as executor:
        hung = executor.submit(hang_on_seven, 7)
        others = [executor.submit(hang_on_seven, x) for x in range(4)]
        with pytest.raises(pmap.TaskTimeout):
            hung.result(timeout=HANG / 2)  # a deadline of its own: the future must end by itself
        assert [f.result() for f in others] == [0, 10, 20, 30]
        assert executor.submit(square, 3).result() == 9


@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends("thread", "fork")
def test_retries_apply_per_call(pmap_backend, tmp_path):
    with pmap.Executor(2, backend=pmap_backend, retries=1) as executor:
        flaky = [executor.submit(flaky_once, (str(tmp_path), x)) for x in range(6)]
        assert [f.result() for f in flaky] == [x * 10 for x in range(6)]
        attempts = tmp_path / "attempts"
        with pytest.raises(RuntimeError, match="always fails: 5"):
            executor.submit(count_attempts, (str(attempts), 5)).result()
        assert attempts.read_text().split() == ["5", "5"]  # the first run and one retry
        assert executor.stats.retried >= 3


def test_a_failure_reads_as_in_pmap_and_on_error_return_gives_a_failure():
    with pmap.Executor(2, backend="process") as executor:
        with pytest.raises(ValueError, match="three") as caught:
            executor.submit(fail_on_three, 3).result()
    assert isinstance(caught.value.__cause__, pmap.RemoteTraceback)
    assert "fail_on_three" in str(caught.value.__cause__)  # the worker's traceback
    assert any("(fail_on_three(3)) failed on backend 'process'" in note for note in caught.value.__notes__)
    with pmap.Executor(2, backend="thread", on_error="return") as executor:
        failure = executor.submit(fail_on_three, 3).result()
    assert isinstance(failure, pmap.Failure) and isinstance(failure.exception, ValueError)


def test_many_submitting_threads_lose_nothing():
    with pmap.Executor(4, backend="fork") as executor:
        results = {}

        def submit_many(offset):
            futures = [executor.submit(square, offset + x) for x in range(300)]
            results[offset] = [f.result() for f in futures]

        threads = [threading.Thread(target=submit_many, args=(1000 * k,)) for k in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results == {1000 * k: [(1000 * k + x) ** 2 for x in range(300)] for k in range(8)}


def test_run_in_executor_from_asyncio():
    async def main():
        loop = asyncio.get_running_loop()
        with pmap.Executor(2, backend="process") as executor:
            return await asyncio.gather(*(loop.run_in_executor(executor, square, x) for x in range(6)))

    assert asyncio.run(main()) == [x * x for x in range(6)]


def test_initializer_runs_in_every_worker_and_a_failing_one_breaks_the_executor():
    with pmap.Executor(2, backend="process", initializer=set_init_value, initargs=("set",)) as executor:
        assert {f.result() for f in [executor.submit(read_init_value, x) for x in range(6)]} == {"set"}
    executor = pmap.Executor(1, backend="fork", initializer=fail_on_three, initargs=(3,))
    with pytest.raises(pmap.InitializerError):
        executor.submit(square, 2).result(timeout=HANG)
    with pytest.raises(cf.BrokenExecutor):
        executor.submit(square, 2)
    executor.shutdown()


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        pmap.Executor(0)
    with pytest.raises(ValueError, match="concrete backend"):
        pmap.Executor(backend="auto")
    with pmap.Executor(1, backend="thread") as executor:
        with pytest.raises(TypeError, match="fn must be callable"):
            executor.submit(3)
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(square, 1)


def test_shutdown_without_wait_finishes_the_work_in_the_background():
    executor = pmap.Executor(2, backend="fork")
    futures = [executor.submit(pid_of, x) for x in range(20)]
    executor.shutdown(wait=False)
    assert len({f.result(timeout=HANG) for f in futures}) >= 1


CTRL_C_DRIVERS = {
    # Ctrl-C inside `with Executor(...)`: __exit__ ends the workers
    "executor-with": """
        with pmap.Executor(2, backend={backend!r}) as executor:
            futures = [executor.submit(sleep_forever, x) for x in range(4)]
            started()
            cf.wait(futures)
    """,
    # Ctrl-C while a Pool nobody closes waits: the uncaught KeyboardInterrupt ends the workers at exit
    "pool-unclosed": """
        pool = pmap.Pool(2, backend={backend!r})
        results = [pool.apply_async(sleep_forever, (x,)) for x in range(4)]
        started()
        results[0].get()
    """,
}
CTRL_C_PREAMBLE = """
import concurrent.futures as cf, sys, time
sys.path.insert(0, {tests!r})
import pmap
from faults import sleep_forever

def started():
    time.sleep(1.0)
    print("running", flush=True)

if __name__ == "__main__":
"""


@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends(*PROCESS_LIKE)
@pytest.mark.parametrize("driver", list(CTRL_C_DRIVERS))
def test_ctrl_c_ends_the_work_promptly_and_leaves_no_process(pmap_backend, driver, tmp_path):
    script = tmp_path / "driver.py"
    body = textwrap.indent(textwrap.dedent(CTRL_C_DRIVERS[driver].format(backend=pmap_backend)), "    ")
    script.write_text(CTRL_C_PREAMBLE.format(tests=os.path.dirname(__file__)) + body)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "running", proc.stderr.read()
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "no worker started"
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the driver did not end after Ctrl-C")
    assert "KeyboardInterrupt" in err
    deadline = time.monotonic() + 10
    alive = children
    while alive and time.monotonic() < deadline:
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    assert not alive, f"workers {[c.pid for c in alive]} outlived the Ctrl-C"


def wait_for_file(path):
    """Blocks until `path` exists (made by the test once it has seen what it waits for)."""
    while not os.path.exists(path):
        time.sleep(0.01)
    return "released"


@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends("thread", "process")  # one shared queue: fork queues a task per worker ahead
def test_chunksize_one_runs_every_call_alone(pmap_backend, tmp_path):
    gate = str(tmp_path / "gate")
    with pmap.Executor(2, backend=pmap_backend, chunksize=1) as executor:
        calls = [executor.submit(square, x) for x in range(30)]  # a backlog, which would be chunked
        blocked = executor.submit(wait_for_file, gate)
        fast = executor.submit(square, 9)
        try:  # submitted right behind a call that blocks, it still ends on its own
            assert fast.result(timeout=HANG / 2) == 81
            assert not blocked.done()
        finally:
            open(gate, "w").close()
        assert blocked.result(timeout=HANG / 2) == "released"
        assert [f.result() for f in calls] == [x * x for x in range(30)]
        assert set(executor.stats.chunk_sizes) == {1}
