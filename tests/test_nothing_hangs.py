"""Nothing a function does hangs pmap or loses the other items: BaseExceptions, failing
initializers, results and exceptions that cannot be rebuilt, calls from threads, Pools used
again after Ctrl-C, nested process maps."""
import asyncio
import functools
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import pmap
from faults import (BASE_EXCEPTIONS, NASTY_KINDS, RebuildsOnlyIn, base_exception_type, big_result,
                    die_holding_a_pool_lock_on_zero, exit_on_three, initializer_that, raise_base_on_three,
                    raise_base_on_three_async, times_ten, undecodable_outcomes)
from pmap._worker import INIT_FAILED_EXIT, pooled_worker_init
from pmap.backends.base import Backend, Done, Lost
from pmap.backends.process import ProcessBackend
from workloads import for_backend, square

LOCAL = ("serial", "thread", "process", "pool", "fork", "greenlet", "asyncio")
PROCESSES = ("process", "pool", "fork")
SUBMITTING = tuple(name for name in LOCAL if name != "asyncio")  # a Pool runs plain functions
HANG = 60  # seconds: a test that takes longer has hung


def base_raiser(name, backend):
    fn = raise_base_on_three_async if backend == "asyncio" else raise_base_on_three
    return functools.partial(fn, name)


@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends(*LOCAL)
@pytest.mark.parametrize("name", list(BASE_EXCEPTIONS))
def test_base_exception_fails_only_its_item(pmap_backend, name):
    out = pmap.pmap(base_raiser(name, pmap_backend), range(8), backend=pmap_backend, workers=2,
                    on_error="return")
    assert [r for r in out if not isinstance(r, pmap.Failure)] == [x * 10 for x in range(8) if x != 3]
    failure = out[3]
    assert failure.kind == "error" and failure.index == 3
    assert type(failure.exception) is base_exception_type(name)


@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends(*LOCAL)
@pytest.mark.parametrize("name", ["SystemExit", "KeyboardInterrupt", "CustomBaseError"])
def test_base_exception_reraises_in_the_caller_by_default(pmap_backend, name):
    with pytest.raises(base_exception_type(name)) as info:
        pmap.pmap(base_raiser(name, pmap_backend), range(8), backend=pmap_backend, workers=2)
    assert "item 3" in "\n".join(getattr(info.value, "__notes__", []))


@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends(*SUBMITTING)
def test_base_exceptions_in_a_pool_leave_it_working(pmap_backend):
    with pmap.Pool(backend=pmap_backend, workers=2, on_error="return") as pool:
        for name in BASE_EXCEPTIONS:
            out = pool.map(base_raiser(name, pmap_backend), range(6), chunksize=1)
            assert [r for r in out if not isinstance(r, pmap.Failure)] == [0, 10, 20, 40, 50]
            assert out[3].exception.__class__.__name__ == name
        assert pool.map(for_backend(square, pmap_backend), range(5)) == [0, 1, 4, 9, 16]


async def await_a_cancelled_task(x):
    if x == 2:
        sub = asyncio.ensure_future(asyncio.sleep(10))
        asyncio.get_running_loop().call_soon(sub.cancel)  # someone else cancels what it awaits
        await sub
    return x


@pytest.mark.timeout(HANG)
def test_asyncio_cancelled_error_of_the_coroutine_is_its_error_not_a_timeout():
    out = pmap.pmap(await_a_cancelled_task, range(5), backend="asyncio", timeout=30, retries=2,
                    on_error="return")
    assert out[:2] == [0, 1] and out[3:] == [3, 4]
    assert out[2].kind == "error" and isinstance(out[2].exception, asyncio.CancelledError)


@pytest.mark.timeout(HANG)
@pytest.mark.parametrize("name", ["CancelledError", "GeneratorExit", "CustomBaseError"])
def test_apmap_base_exception_fails_only_its_item(name):
    async def main():
        return await pmap.apmap(base_raiser(name, "asyncio"), range(6), on_error="return", retries=1)

    out = asyncio.run(main())
    assert out[:3] == [0, 10, 20] and out[4:] == [40, 50]
    assert type(out[3].exception) is base_exception_type(name)


@pytest.mark.timeout(HANG)
def test_thread_worker_survives_base_exceptions_one_worker():
    # One thread: had it died with its task, nothing would ever run the rest.
    out = pmap.pmap(base_raiser("SystemExit", "thread"), range(6), backend="thread", workers=1, chunksize=1,
                    on_error="return")
    assert out[:3] == [0, 10, 20] and out[4:] == [40, 50]


# ---- results, exceptions and items that cannot be rebuilt ------------------------------------

@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends(*PROCESSES)
@pytest.mark.parametrize("chunksize", [1, 8])
def test_undecodable_results_and_exceptions_fail_alone(pmap_backend, chunksize):
    items = [(os.getpid(), x) for x in range(8)]
    out = pmap.pmap(undecodable_outcomes, items, backend=pmap_backend, workers=2, chunksize=chunksize,
                    on_error="return")
    assert [out[x] for x in (0, 1, 3, 5, 7)] == [0, 10, 30, 50, 70]
    for x, text in ((2, "NeedsTwoArgs: needs two"), (4, "BrokenReduce"), (6, "rebuilt in the caller")):
        assert isinstance(out[x], pmap.Failure) and out[x].kind == "error", out[x]
        exc = out[x].exception
        if x == 2 and type(exc).__name__ == "NeedsTwoArgs":
            continue  # a reducer that skips __init__ is installed (tblib, once distributed is imported)
        assert isinstance(exc, pmap.UnpicklableError)
        assert text in str(exc)


@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends(*PROCESSES)
def test_item_that_cannot_be_rebuilt_in_the_worker_fails_alone(pmap_backend):
    items = list(range(10))
    items[4] = RebuildsOnlyIn(os.getpid(), in_caller=True)
    out = pmap.pmap(pmap_identity, items, backend=pmap_backend, workers=2, chunksize=5, on_error="return")
    assert out[:4] == [0, 1, 2, 3] and out[5:] == [5, 6, 7, 8, 9]
    assert out[4].kind == "error" and "cannot be rebuilt in a worker" in str(out[4].exception)


def pmap_identity(x):
    return x


@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends(*PROCESSES)
def test_exception_class_of_main_keeps_its_type(pmap_backend, tmp_path):
    script = tmp_path / "main_class.py"
    script.write_text(textwrap.dedent(f"""
        import pmap

        class MyBase(BaseException):
            pass

        def f(x):
            if x == 1:
                raise MyBase("mine")
            return x

        if __name__ == "__main__":
            out = pmap.pmap(f, range(3), backend={pmap_backend!r}, workers=2, on_error="return")
            assert out[0] == 0 and out[2] == 2, out
            assert type(out[1].exception) is MyBase, out
            print("ok")
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=HANG)
    assert done.stdout.strip() == "ok", done.stderr


# ---- initializers that fail ------------------------------------------------------------------

@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends(*PROCESSES, "thread")
@pytest.mark.parametrize("how", ["raises", "sys.exit", "os._exit"])
def test_failing_initializer_stops_the_run_with_one_clear_error(pmap_backend, how):
    if pmap_backend == "thread" and how == "os._exit":
        pytest.skip("os._exit in a thread ends the test process itself")
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(pmap.InitializerError) as info:
        pmap.pmap(times_ten, range(20), backend=pmap_backend, workers=2, initializer=initializer_that,
                  initargs=(how,))
    message = str(info.value)
    assert "initializer_that" in message and pmap_backend in message
    if how == "raises":
        assert "LookupError" in message and isinstance(info.value.__cause__, LookupError)
    elif how == "sys.exit":
        assert "SystemExit" in message
    else:
        assert "exit code 6" in message or "before it could run" in message
    assert "item 0" not in message and "importable" not in message
    # and no respawn loop left running
    time.sleep(0.5)
    new = [p for p in psutil.Process().children(recursive=True) if p.pid not in children_before]
    assert len(new) <= 2 * 2, [p.cmdline() for p in new]


# 3.12+ warns of fork in a process with threads; these children only start a worker and exit
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("killed_first", [True, False])
def test_a_failed_initializers_error_wins_over_a_sibling_ended_without_one(killed_first):
    # loky ends the other workers once one dies, and each leaves an empty report; one listed
    # first used to give "ended worker ... before it could run anything" instead of the error
    failing = ProcessBackend(workers=2, initializer=initializer_that, initargs=("raises",))
    killed = ProcessBackend(workers=2, initializer=initializer_that, initargs=("SIGKILL",))
    exitcodes = {}
    try:
        for backend in ([killed, failing] if killed_first else [failing, killed]):
            worker = multiprocessing.get_context("fork").Process(
                target=pooled_worker_init, args=(backend.initializer_bytes(), os.getpid()))
            worker.start()
            worker.join(HANG)
            exitcodes[worker.pid] = worker.exitcode
        assert sorted(exitcodes.values()) == [-signal.SIGKILL, INIT_FAILED_EXIT]
        error = failing.initializer_failure(exitcodes)
    finally:
        failing.close()
        killed.close()
    assert isinstance(error, pmap.InitializerError) and isinstance(error.__cause__, LookupError), str(error)


@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends("process", "pool")
def test_a_run_does_not_read_the_initializer_reports_an_earlier_run_left(pmap_backend):
    # the first run's workers all fail and report; the run reads one, the others stay behind
    with pytest.raises(pmap.InitializerError, match="LookupError"):
        pmap.pmap(times_ten, range(8), backend=pmap_backend, workers=4, initializer=initializer_that,
                  initargs=("raises",))
    with pytest.raises(pmap.InitializerError) as info:
        pmap.pmap(times_ten, range(4), backend=pmap_backend, workers=2, initializer=initializer_that,
                  initargs=("os._exit",))
    assert "LookupError" not in str(info.value), str(info.value)


# ---- the engine bounds losses nobody can be blamed for ---------------------------------------

class LosesEverything(Backend):
    """Every task it is given vanishes without a worker being blamed."""

    name = "loses-everything"
    kind = "thread"

    def __init__(self, **options):
        super().__init__(workers=2)
        self.pending = []
        self.submitted = 0

    def capacity(self):
        return 2 - len(self.pending)

    def submit(self, task):
        self.submitted += 1
        self.pending.append(task)

    def wait(self, timeout):
        events = [Lost(task.id, None, None, "vanished", blame=False) for task in self.pending]
        self.pending = []
        return events


@pytest.mark.timeout(HANG)
def test_tasks_lost_without_blame_end_as_crashes():
    backend = LosesEverything()
    out = pmap.pmap(square, range(3), backend=backend, on_error="return")
    assert [f.kind for f in out] == ["crash"] * 3
    assert all(isinstance(f.exception, pmap.WorkerCrashed) and "lost" in str(f.exception) for f in out)
    assert backend.submitted < 60


class LosesOnce(LosesEverything):
    """Loses each task the first time, then runs it."""

    def wait(self, timeout):
        events = []
        for task in self.pending:
            if task.items[0] in self.seen:
                events.append(Done(task.id, "w", [task.fn(x) for x in task.items], [], 0.0))
            else:
                self.seen.update(task.items)
                events.append(Lost(task.id, None, None, "vanished", blame=False))
        self.pending = []
        return events

    seen: set = set()


@pytest.mark.timeout(HANG)
def test_a_task_lost_once_is_run_again():
    LosesOnce.seen = set()
    assert pmap.pmap(square, range(6), backend=LosesOnce(), chunksize=1) == [x * x for x in range(6)]


# ---- option edge cases that are the backends' -------------------------------------------------

@pytest.mark.timeout(HANG)
def test_serial_timeout_beyond_setitimer_range_is_no_alarm():
    assert pmap.pmap(square, range(4), backend="serial", timeout=float("inf")) == [0, 1, 4, 9]
    assert pmap.pmap(square, range(4), backend="serial", timeout=1e300) == [0, 1, 4, 9]


# ---- calls from threads ----------------------------------------------------------------------

FROM_A_THREAD = textwrap.dedent("""
    import os, sys, threading, time
    import psutil
    sys.path.insert(0, {tests!r})
    import pmap
    from workloads import square

    def call(result):
        result["plain"] = pmap.pmap(square, range(200), backend={backend!r})

    def create(result):  # a Pool created in a thread that then ends
        # loky keeps one executor per thread: the earlier calls' workers end as their threads do
        before = {{p.pid for p in psutil.Process().children(recursive=True)}}
        result["pool"] = pmap.Pool(backend={backend!r}, workers=2, on_error="return")
        result["first"] = result["pool"].map(square, range(10))
        result["workers"] = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]

    def start_a_map(result):  # a Pool whose creating thread ends in the middle of a map
        result["pool2"] = pmap.Pool(backend={backend!r}, workers=2)
        result["imap"] = result["pool2"].imap(square, range(400), chunksize=1)
        result["head"] = [next(result["imap"]) for _ in range(5)]

    if __name__ == "__main__":
        result = {{}}
        for target in (call, call, call, create, start_a_map):
            thread = threading.Thread(target=target, args=(result,))
            thread.start()
            thread.join()
        assert result["plain"] == [x * x for x in range(200)]
        time.sleep(0.5)
        assert result["workers"], "the Pool started no process"
        dead = [p.pid for p in result["workers"] if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE]
        assert not dead, f"workers {{dead}} died with the thread that started them"
        pool = result["pool"]  # used from the main thread after its creator ended
        out = pool.map(square, range(300))
        assert out == [x * x for x in range(300)], [r for r in out if isinstance(r, pmap.Failure)][:3]
        pool.close()
        rest = list(result["imap"])
        assert result["head"] + rest == [x * x for x in range(400)], rest[:3]
        result["pool2"].close()
        print("ok", flush=True)
""")


@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends("process", "fork", "pool")
def test_calls_from_a_thread_that_ends_work_and_the_interpreter_exits(pmap_backend, tmp_path):
    script = tmp_path / "from_thread.py"
    script.write_text(FROM_A_THREAD.format(tests=os.path.dirname(__file__), backend=pmap_backend))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    driver = psutil.Process(proc.pid)
    seen = set()
    deadline = time.monotonic() + 40
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            seen.update(driver.children(recursive=True))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    try:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the interpreter did not exit after calls from a thread: {err[-2000:]}")
    assert proc.returncode == 0 and out.strip() == "ok", err[-2000:]
    gone_by = time.monotonic() + 10
    while time.monotonic() < gone_by:
        alive = [p for p in seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        time.sleep(0.1)
    assert not alive, [p.cmdline() for p in alive]


def pool_workers() -> list:
    # the pool backend's workers are the forkserver's children (it lives on for the session)
    forkservers = [p for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline())]
    return [worker for server in forkservers for worker in server.children()]


@pytest.mark.timeout(HANG)
@pytest.mark.parametrize("which", ["tasks", "replies"])
def test_a_pool_worker_killed_holding_a_queue_lock_costs_only_its_item(which):
    # with multiprocessing.Pool's own locks, the worker that replaced it, and then Pool.terminate,
    # waited for ever for the dead worker to release it (CPython bpo-29759)
    fn = functools.partial(die_holding_a_pool_lock_on_zero, which)
    out = pmap.pmap(fn, range(4), backend="pool", workers=1, chunksize=1, on_error="return")
    assert out[1:] == [1, 2, 3]
    assert out[0].kind == "crash" and out[0].exception.exitcode == -signal.SIGKILL


@pytest.mark.timeout(HANG)
def test_pool_closes_while_its_workers_write_results_nobody_reads():
    # the workers block writing big results into their connections; closing ends them
    results = pmap.imap(big_result, range(200), backend="pool", workers=2, chunksize=1)
    assert len(next(results)) == 256 * 1024
    workers = pool_workers()
    assert workers
    results.close()
    alive = [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [p.cmdline() for p in alive]


@pytest.mark.timeout(HANG)
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd (Linux)")
def test_a_pool_replacing_crashed_workers_keeps_no_descriptor_of_theirs():
    # each replaced worker used to leave its Process, and two pipe descriptors, behind
    def descriptors():
        return len(os.listdir("/proc/self/fd"))

    with pmap.Pool(backend="pool", workers=2, on_error="return") as pool:
        assert pool.map(exit_on_three, range(3)) == [0, 1, 2]
        before = descriptors()
        for _ in range(20):
            assert pool.map(exit_on_three, [3])[0].kind == "crash"
        grown = descriptors() - before
    assert grown < 10, f"{grown} more descriptors after 20 workers were replaced"


# ---- nesting -----------------------------------------------------------------------------------

def inner_process_map(n):
    return sum(pmap.pmap(square, range(n), backend="process", workers=2))


@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends("fork", "pool")
def test_process_map_inside_fork_and_pool_workers(pmap_backend):
    out = pmap.pmap(inner_process_map, [3, 4, 5], backend=pmap_backend, workers=2)
    assert out == [sum(x * x for x in range(n)) for n in (3, 4, 5)]


# ---- workers that leave the session, and what they start -------------------------------------

@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends("fork", "pool")
def test_workers_may_setsid_and_their_children_end_with_the_pool(pmap_backend, tmp_path):
    from faults import new_session_with_a_child
    record = tmp_path / "children"
    with pmap.Pool(backend=pmap_backend, workers=2) as pool:
        assert pool.map(new_session_with_a_child, [str(record)] * 2, chunksize=1) == [True, True]
    pids = [int(line) for line in record.read_text().split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in pids if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    assert not alive, "children started by workers outlived Pool.close()"


# ---- fuzz: nasty functions and options on every local backend ----------------------------------

FUZZ_OPTIONS = [
    dict(chunksize=None, ordered=True, retries=0, timeout=None),
    dict(chunksize=1, ordered=False, retries=1, timeout=0.5),
    dict(chunksize=4, ordered=True, retries=2, timeout=None),
]
IN_PROCESS = ("serial", "thread", "greenlet", "asyncio")


def fuzz_items(backend, options, seed):
    import random
    rng = random.Random(seed)
    kinds = [k for k in NASTY_KINDS if not (k == "os._exit" and backend in IN_PROCESS)
             and not (k == "slow" and options["timeout"] is None)]
    items = [["ok", x] for x in range(24)]
    for kind, position in zip(kinds, rng.sample(range(24), len(kinds))):
        items[position][0] = kind
    return [tuple(item) for item in items]


@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends(*LOCAL)
@pytest.mark.parametrize("variant", range(len(FUZZ_OPTIONS)))
def test_fuzz_nasty_functions_end_and_keep_every_other_item(pmap_backend, variant):
    from faults import BrokenReduce, nasty, nasty_async
    options = FUZZ_OPTIONS[variant]
    items = fuzz_items(pmap_backend, options, seed=variant)
    fn = nasty_async if pmap_backend == "asyncio" else nasty
    out = pmap.pmap(fn, items, backend=pmap_backend, workers=2, on_error="return", **options)
    assert len(out) == len(items)
    failures = {f.index: f for f in out if isinstance(f, pmap.Failure)}
    values = [v for v in out if not isinstance(v, pmap.Failure)]
    expected_kinds = {}
    for index, (kind, _) in enumerate(items):
        if kind == "ok" or (kind == "broken-result" and pmap_backend in IN_PROCESS):
            continue  # in-process backends hand the object over without pickling it
        expected_kinds[index] = {"os._exit": "crash", "slow": "timeout"}.get(kind, "error")
    assert {i: f.kind for i, f in failures.items()} == expected_kinds
    ok = sorted(v for v in values if not isinstance(v, BrokenReduce))
    assert ok == sorted(x * 10 for kind, x in items if kind == "ok")
    if options["ordered"]:
        for index, (kind, x) in enumerate(items):
            if kind == "ok":
                assert out[index] == x * 10
