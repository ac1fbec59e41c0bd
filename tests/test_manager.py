"""The manager backend: the behaviour suite, plus real faults on loopback: a driver in this
process, `pmap worker` processes started as commands, SIGKILL, late joins, a wrong authkey,
and the driver ending. Orphans are checked with psutil."""
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

import pmap
from pmap.backends.base import Done, Lost, Started
from pmap.backends.manager import Broker, ManagerBackend
from test_behaviour import *  # noqa: F401,F403  (the behaviour suite, run here on manager)
from faults import exit_on_three
from workloads import sleep_then, square

pytestmark = pytest.mark.pmap_backends("manager")

if os.name != "posix":
    pytest.skip("the manager backend needs a POSIX system", allow_module_level=True)

HANG_GUARD = 60  # seconds; only catches a hang, never measures speed


# ---- helpers --------------------------------------------------------------------------

def note_start_then_sleep(args):
    """Leave a marker naming the item and this process, then sleep; return (item, pid)."""
    item, seconds, marker_dir = args
    with open(os.path.join(marker_dir, f"{item}-{os.getpid()}"), "w"):
        pass
    time.sleep(seconds)
    return item, os.getpid()


def fail_initializer():
    raise RuntimeError("initializer refuses")


def markers(marker_dir):
    """(item, pid) of every item that started."""
    found = []
    for name in os.listdir(marker_dir):
        item, pid = name.split("-")
        found.append((int(item), int(pid)))
    return found


def wait_until(condition, what, timeout=HANG_GUARD):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def manager_processes_of(proc: psutil.Process):
    """Live processes below `proc` that belong to the manager backend."""
    found = []
    for child in proc.children(recursive=True):
        try:
            if "pmap.backends.manager" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture(autouse=True)
def no_manager_processes_left():
    """Every test here, the behaviour suite included, must leave no worker process behind."""
    yield
    me = psutil.Process()
    leftovers = manager_processes_of(me)
    if leftovers:
        _, alive = psutil.wait_procs(leftovers, timeout=5)
        assert not alive, f"manager processes left behind: {[p.pid for p in alive]}"


@pytest.fixture
def marker_dir(tmp_path):
    path = tmp_path / "markers"
    path.mkdir()
    return path


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "authkey"
    path.write_bytes(os.urandom(32).hex().encode())
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def worker_commands(tmp_path):
    """Start `pmap worker` processes; each one's stderr goes to a file; all are ended after."""
    started = []

    def start(address, key, processes=1):
        log = open(tmp_path / f"worker-{len(started)}.log", "w+")
        proc = subprocess.Popen(
            [sys.executable, "-m", "pmap", "worker", f"{address[0]}:{address[1]}",
             "--authkey-file", key, "--processes", str(processes)],
            stdout=subprocess.DEVNULL, stderr=log)
        proc.log = log
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            for pid in family:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait()
        proc.log.close()


def log_of(proc) -> str:
    proc.log.flush()
    proc.log.seek(0)
    return proc.log.read()


def remote_only_driver(key, **options):
    backend = ManagerBackend(local_workers=0, authkey_file=key, **options)
    backend.open()
    return backend


def worker_children(proc) -> list:
    return [c.pid for c in psutil.Process(proc.pid).children()]


# ---- two hosts on loopback ----------------------------------------------------------------

def test_sigkilled_worker_host_loses_nothing(key_file, worker_commands, marker_dir):
    """A `pmap worker` killed with SIGKILL mid-task: once its lease expires, the other worker
    runs its items; every result arrives exactly once and the killed worker's processes die."""
    backend = remote_only_driver(key_file, lease_seconds=1.0)
    victim = worker_commands(backend.address, key_file)
    survivor = worker_commands(backend.address, key_file)
    wait_until(lambda: backend.broker.live_workers() == 2, "two workers to join")
    victim_pids = set(worker_children(victim))
    items = [(i, 0.3, str(marker_dir)) for i in range(12)]
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(pmap.pmap, note_start_then_sleep, items, backend=backend, chunksize=1)
        wait_until(lambda: any(pid in victim_pids for _, pid in markers(marker_dir)), "the victim to start an item")
        victim_procs = [psutil.Process(pid) for pid in victim_pids]
        os.kill(victim.pid, signal.SIGKILL)
        out = run.result(timeout=HANG_GUARD)
    assert [item for item, _ in out] == list(range(12))  # none lost, none twice, in order
    killed_mid_task = {item for item, pid in markers(marker_dir) if pid in victim_pids}
    finished_by = dict(out)
    assert any(finished_by[item] not in victim_pids for item in killed_mid_task), \
        "no item the victim had started was finished by the survivor"
    assert out.stats.crashed_workers == 0 and out.stats.retried == 0  # lost unblamed: the engine ran them again
    _, alive = psutil.wait_procs(victim_procs, timeout=10)
    assert not alive, "the killed worker's processes outlived it"
    assert survivor.wait(HANG_GUARD) == 0  # the driver ended: the survivor exits cleanly
    assert "ended" in log_of(survivor)


def sleep_briefly(x):
    time.sleep(0.002)
    return x


def test_sigkilled_host_holding_several_leases_loses_nothing(key_file, worker_commands):
    """Short tasks: each worker holds many leases at once. A host SIGKILLed while it holds
    several loses none of them: every item arrives exactly once, in order, none blamed."""
    backend = remote_only_driver(key_file)
    victim = worker_commands(backend.address, key_file)
    worker_commands(backend.address, key_file)
    wait_until(lambda: backend.broker.live_workers() == 2, "two workers to join")
    victim_pids = set(worker_children(victim))

    def victim_holds():
        with backend.broker.lock:
            return max((len(w.held) for w in backend.broker.workers.values() if w.pid in victim_pids), default=0)

    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(pmap.pmap, sleep_briefly, range(3000), backend=backend, chunksize=1)
        wait_until(lambda: victim_holds() >= 3 or run.done(), "the victim to hold several leases")
        assert not run.done(), "the run ended before the victim held several leases"
        for pid in [victim.pid, *victim_pids]:
            os.kill(pid, signal.SIGKILL)
        out = run.result(timeout=HANG_GUARD * 2)
    assert out == list(range(3000))
    assert out.stats.crashed_workers == 0 and out.stats.retried == 0


def finish_or_stall(args):
    """Leave a done-ITEM-PID marker and return (item, pid); but in a victim process that already
    finished `threshold` items (20 more after each stall, so that its tasks are short again),
    first leave a stall-ITEM marker and wait for release-ITEM. The others take 5 ms an item, so
    that the victim gets its share whatever the machine's load."""
    item, folder, victims, threshold = args
    pid = os.getpid()
    names = os.listdir(folder)
    if pid not in victims:
        time.sleep(0.005)
    elif sum(name.startswith("done-") and name.endswith(f"-{pid}") for name in names) >= threshold + 20 * sum(
            name.startswith("stall-") for name in names):
        open(os.path.join(folder, f"stall-{item}"), "w").close()
        deadline = time.monotonic() + HANG_GUARD * 4
        while not os.path.exists(os.path.join(folder, f"release-{item}")) and time.monotonic() < deadline:
            time.sleep(0.01)
    open(os.path.join(folder, f"done-{item}-{pid}"), "w").close()
    return item, pid


def test_host_killed_with_finished_results_unreported_loses_and_repeats_nothing(key_file, worker_commands,
                                                                              marker_dir):
    """A worker reports short tasks in batches. Its host SIGKILLed while the worker holds results
    it finished and has not reported: those tasks are lost unblamed and run again elsewhere;
    every item arrives exactly once, none blamed."""
    backend = remote_only_driver(key_file)
    victim = worker_commands(backend.address, key_file)
    worker_commands(backend.address, key_file)
    wait_until(lambda: backend.broker.live_workers() == 2, "two workers to join")
    victim_pids = tuple(worker_children(victim))
    reported_by_victim = []
    complete = backend.broker.complete

    def counting_complete(worker_id, results, want=0):  # the server looks the method up on the instance
        worker = backend.broker.workers.get(worker_id)
        if worker is not None and worker.pid in victim_pids:
            reported_by_victim.extend(task_id for task_id, _ in results)
        return complete(worker_id, results, want)

    backend.broker.complete = counting_complete
    folder = str(marker_dir)
    finished_by_victim = lambda: sum(name.startswith("done-") and name.endswith(f"-{victim_pids[0]}")
                                     for name in os.listdir(folder))
    items = [(i, folder, victim_pids, 40) for i in range(600)]
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(pmap.pmap, finish_or_stall, items, backend=backend, chunksize=1)
        released = set()
        while True:  # until the victim stalls holding a finished result it has not reported
            wait_until(lambda: set(n for n in os.listdir(folder) if n.startswith("stall-")) - released
                       or run.done(), "the victim to stall")
            assert not run.done(), "the run ended before the victim stalled"
            stalled = set(n for n in os.listdir(folder) if n.startswith("stall-")) - released
            if finished_by_victim() > len(reported_by_victim):  # its main thread waits in the stalled item
                break
            released |= stalled  # it had reported all it finished: let it go on to the next item
            for name in stalled:
                open(os.path.join(folder, "release-" + name[len("stall-"):]), "w").close()
        unreported = finished_by_victim() - len(reported_by_victim)
        for pid in [victim.pid, *victim_pids]:
            os.kill(pid, signal.SIGKILL)
        out = run.result(timeout=HANG_GUARD * 2)
    assert [item for item, _ in out] == list(range(600))  # none lost, none twice, in order
    finished_on_victim = {int(n.split("-")[1]) for n in os.listdir(folder)
                          if n.startswith("done-") and n.endswith(f"-{victim_pids[0]}")}
    delivered_from_victim = {item for item, pid in out if pid in victim_pids}
    run_again = finished_on_victim - delivered_from_victim
    assert len(run_again) == unreported > 0  # finished there, never reported, run again elsewhere
    assert out.stats.crashed_workers == 0 and out.stats.retried == 0


def exit_at_150(x):
    if x == 150:
        os._exit(5)
    return x


def test_a_crash_mid_batch_blames_only_the_item_that_was_running():
    """Short tasks are reported in batches: when a worker dies, the tasks it finished and had not
    reported run again unblamed; only the item it was running (its running slot) is a crash."""
    out = pmap.pmap(exit_at_150, range(300), backend="manager", workers=2, chunksize=1, on_error="return")
    assert out[:150] == list(range(150)) and out[151:] == list(range(151, 300))
    assert out[150].kind == "crash" and "exit code 5" in str(out[150].exception)
    assert out.stats.crashed_workers == 1 and out.stats.failed == 1


def test_worker_joining_late_gets_work(key_file, worker_commands, marker_dir):
    # A long lease: on a loaded machine a host whose heartbeat is late would be dropped, and
    # this test is about joining, not about leases (tested above).
    backend = remote_only_driver(key_file, lease_seconds=60)
    early = worker_commands(backend.address, key_file)
    wait_until(lambda: backend.broker.live_workers() == 1, "the first worker to join")
    items = [(i, 0.2, str(marker_dir)) for i in range(20)]
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(pmap.pmap, note_start_then_sleep, items, backend=backend, chunksize=1)
        wait_until(lambda: len(markers(marker_dir)) >= 2, "the run to be under way")
        late = worker_commands(backend.address, key_file)
        wait_until(lambda: backend.broker.live_workers() == 2, "the late worker to join")
        late_pids = set(worker_children(late))
        out = run.result(timeout=HANG_GUARD)
    assert [item for item, _ in out] == list(range(20))
    assert late_pids & {pid for _, pid in out}, "the late worker ran none of the items"
    assert early.wait(HANG_GUARD) == 0 and late.wait(HANG_GUARD) == 0


def test_wrong_authkey_is_refused_and_the_driver_keeps_serving(key_file, worker_commands, tmp_path):
    backend = remote_only_driver(key_file)
    wrong = tmp_path / "wrong-key"
    wrong.write_bytes(b"not-the-key-" * 4)
    wrong.chmod(0o600)
    intruder = worker_commands(backend.address, str(wrong))
    assert intruder.wait(HANG_GUARD) != 0
    assert "refused the authkey" in log_of(intruder)
    assert backend.broker.live_workers() == 0
    worker_commands(backend.address, key_file)
    assert pmap.pmap(square, range(30), backend=backend) == [i * i for i in range(30)]


def test_interrupted_worker_hands_its_tasks_back_at_once(key_file, worker_commands, marker_dir):
    """Ctrl-C on a `pmap worker`: its tasks go back to the queue at once, unblamed, rather
    than after its lease (set far beyond the hang guard here) expires."""
    backend = remote_only_driver(key_file, lease_seconds=600)
    leaving = worker_commands(backend.address, key_file)
    staying = worker_commands(backend.address, key_file)
    wait_until(lambda: backend.broker.live_workers() == 2, "two workers to join")
    leaving_pids = set(worker_children(leaving))
    items = [(i, 0.3, str(marker_dir)) for i in range(10)]
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(pmap.pmap, note_start_then_sleep, items, backend=backend, chunksize=1)
        wait_until(lambda: any(pid in leaving_pids for _, pid in markers(marker_dir)), "the leaver to start an item")
        leaving.send_signal(signal.SIGINT)
        assert leaving.wait(HANG_GUARD) == 130
        out = run.result(timeout=HANG_GUARD)
    assert [item for item, _ in out] == list(range(10))
    assert out.stats.crashed_workers == 0 and out.stats.retried == 0
    assert "interrupted" in log_of(leaving)
    assert staying.wait(HANG_GUARD) == 0


def test_driver_closing_ends_its_workers(key_file, worker_commands):
    backend = remote_only_driver(key_file)
    workers = [worker_commands(backend.address, key_file, processes=2) for _ in range(2)]
    wait_until(lambda: backend.broker.live_workers() == 4, "four worker processes to join")
    family = [psutil.Process(c) for w in workers for c in worker_children(w)]
    assert pmap.pmap(square, range(50), backend=backend) == [i * i for i in range(50)]  # closes it
    assert [w.wait(HANG_GUARD) for w in workers] == [0, 0]
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive


DRIVER_SCRIPT = textwrap.dedent("""
    import sys, pmap
    from pmap.backends.manager import ManagerBackend
    from test_manager import note_start_then_sleep
    backend = ManagerBackend(local_workers=0, authkey_file=sys.argv[1])
    backend.open()
    print(f"{backend.address[0]}:{backend.address[1]}", flush=True)
    items = ((i, 60, sys.argv[2]) for i in range(100))
    for _ in pmap.imap(note_start_then_sleep, items, backend=backend, chunksize=1):
        pass
""")


def test_worker_exits_when_its_driver_is_killed(key_file, worker_commands, marker_dir):
    driver = subprocess.Popen([sys.executable, "-c", DRIVER_SCRIPT, key_file, str(marker_dir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        host, port = driver.stdout.readline().strip().split(":")
        worker = worker_commands((host, int(port)), key_file, processes=2)
        wait_until(lambda: len(markers(marker_dir)) == 2, "both worker processes to start an item")
        family = [psutil.Process(c) for c in worker_children(worker)]
        driver.kill()
        assert worker.wait(HANG_GUARD) == 1  # it did not end the run: the driver vanished
        assert "lost the driver" in log_of(worker)
        _, alive = psutil.wait_procs(family, timeout=10)
        assert not alive
    finally:
        driver.kill()
        driver.wait()


# ---- faults on the driver's own local workers ------------------------------------------------

def test_sigkilled_worker_process_costs_only_its_item(marker_dir):
    """A worker process killed mid-item is reported lost at once (not after a lease expiry);
    with retries the item runs again, and the supervisor replaces the process."""
    backend = ManagerBackend(workers=2)
    backend.open()
    items = [(i, 0.3, str(marker_dir)) for i in range(8)]
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(pmap.pmap, note_start_then_sleep, items, backend=backend, chunksize=1, retries=1)
        wait_until(lambda: markers(marker_dir), "an item to start")
        _, victim = markers(marker_dir)[0]
        os.kill(victim, signal.SIGKILL)
        out = run.result(timeout=HANG_GUARD)
    assert [item for item, _ in out] == list(range(8))
    assert victim not in {pid for _, pid in out}
    assert out.stats.crashed_workers == 1 and out.stats.retried == 1


def test_item_that_kills_its_worker_is_a_crash_and_the_rest_go_on():
    out = pmap.pmap(exit_on_three, range(8), backend="manager", workers=2, chunksize=1, on_error="return")
    assert out[:3] == [0, 1, 2] and out[4:] == [4, 5, 6, 7]
    assert out[3].kind == "crash" and isinstance(out[3].exception, pmap.WorkerCrashed)
    assert "exit code 7" in str(out[3].exception)


def test_timeout_kills_the_stuck_worker_and_the_rest_go_on():
    started = time.monotonic()
    out = pmap.pmap(sleep_then, [0.05, 30, 0.05, 0.05], backend="manager", workers=2, timeout=1.0,
                    on_error="return")
    assert time.monotonic() - started < 25  # the 30 s item was cut short
    assert out[0] == out[2] == out[3] == 0.05
    assert out[1].kind == "timeout" and isinstance(out[1].exception, pmap.TaskTimeout)


def _load_only_in(pid):
    if os.getpid() != pid:
        raise RuntimeError("this function cannot be loaded on a worker")
    return LoadsOnlyInTheDriver()


class LoadsOnlyInTheDriver:
    def __call__(self, x):
        return x

    def __reduce__(self):
        return (_load_only_in, (os.getpid(),))


def test_a_function_a_worker_cannot_load_fails_every_item_of_its_task():
    out = pmap.pmap(LoadsOnlyInTheDriver(), range(4), backend="manager", workers=1, chunksize=2,
                    on_error="return")
    assert all(isinstance(r, pmap.Failure) for r in out), out
    assert all("cannot be loaded on a worker" in str(r.exception) for r in out)
    assert [r.index for r in out] == [0, 1, 2, 3]


def test_initializer_failure_reaches_the_caller():
    # It used to arrive as the initializer's own RuntimeError; every backend gives one InitializerError.
    with pytest.raises(pmap.InitializerError, match="initializer refuses") as info:
        pmap.pmap(square, range(4), backend="manager", workers=1, initializer=fail_initializer)
    assert "fail_initializer" in str(info.value) and "'manager'" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


CTRL_C_SCRIPT = textwrap.dedent("""
    import sys, pmap
    from test_manager import note_start_then_sleep
    items = [(i, 60, sys.argv[1]) for i in range(10)]
    pmap.pmap(note_start_then_sleep, items, backend="manager", workers=2, chunksize=1)
""")


def test_ctrl_c_reaches_the_caller_and_leaves_no_process(marker_dir):
    driver = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT, str(marker_dir)], stderr=subprocess.PIPE,
                              text=True)
    try:
        wait_until(lambda: len(markers(marker_dir)) == 2, "both local workers to start an item")
        family = psutil.Process(driver.pid).children(recursive=True)
        assert len(family) >= 3  # the local supervisor and its two workers
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=HANG_GUARD)
        assert "KeyboardInterrupt" in err
        _, alive = psutil.wait_procs(family, timeout=10)
        assert not alive
    finally:
        driver.kill()
        driver.wait()


# ---- options and security ------------------------------------------------------------------

def test_generated_authkey_file_is_private_shown_and_removed(capfd):
    backend = ManagerBackend(workers=1)
    backend.open()
    try:
        path = backend.authkey_file
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert len(open(path, "rb").read().strip()) >= 32
        assert backend.address[0] == "127.0.0.1" and backend.address[1] > 0  # loopback, a free port
        assert path in capfd.readouterr().err
    finally:
        backend.close()
    assert not os.path.exists(path)


def test_options_from_the_command_line_arrive_as_text():
    backend = ManagerBackend(local_workers="0", prefetch="2", lease_seconds="3.5", address=":0", authkey="k" * 32)
    assert (backend.local_workers, backend.prefetch, backend.lease_seconds) == (0, 2, 3.5)
    with pytest.raises(ValueError, match="local_workers"):
        ManagerBackend(local_workers="many", authkey="k" * 32)
    with pytest.raises(ValueError, match="port"):
        ManagerBackend(address="127.0.0.1:http", authkey="k" * 32)


def test_worker_command_explains_a_missing_authkey_file(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pmap", "worker", "127.0.0.1:9", "--authkey-file",
                           str(tmp_path / "absent")], capture_output=True, text=True, timeout=HANG_GUARD)
    assert done.returncode == 2
    assert "absent" in done.stderr and "Traceback" not in done.stderr


# ---- the broker's bookkeeping, without processes -------------------------------------------

def test_broker_reports_an_expired_lease_lost_and_refuses_its_late_result():
    """The broker decides no retry: a host silent past its lease loses its task (reported
    unblamed, for the engine to run again), nothing goes back to the queue, and the silent
    worker's late result is refused. (It used to re-queue the task itself.)"""
    broker = Broker(lease_seconds=10, prefetch=0, initializer_bytes=None)  # no janitor: reaped by hand
    slow_host, _ = broker.hello_host({"name": "slow"})
    slow_worker, _ = broker.hello_worker(slow_host, 101)
    broker.put(7, "fn", b"payload", n_items=3)
    assert broker.lease(slow_worker, 1, 0) == [(7, "fn", 3, b"payload", False)]
    fast_host, _ = broker.hello_host({"name": "fast"})
    fast_worker, _ = broker.hello_worker(fast_host, 202)
    broker.reap()                          # within the lease: nothing changes
    assert not any(isinstance(e, Lost) for e in broker.take_events(0))
    broker.hosts[slow_host].last_seen -= 11  # the slow host went quiet for longer than its lease
    broker.reap()                          # past its lease: task 7 is lost, not re-queued
    lost = [e for e in broker.take_events(0) if isinstance(e, Lost)]
    assert [(e.task_id, e.worker, e.blame) for e in lost] == [(7, "slow:101", False)]
    assert "stopped heart-beating" in lost[0].reason
    assert list(broker.queue) == [] and broker.lease(fast_worker, 1, 0) == []
    broker.complete(slow_worker, [(7, b"late")])
    assert broker.take_events(0) == [] and broker.refused_results == 1


def test_broker_blames_only_the_task_a_dead_worker_was_running():
    broker = Broker(lease_seconds=10, prefetch=1, initializer_bytes=None)
    host, _ = broker.hello_host({"name": "h"})
    worker, _ = broker.hello_worker(host, 5)
    broker.put(1, "fn", b"a")
    broker.put(2, "fn", b"b")
    assert [t[0] for t in broker.lease(worker, 2, 0)] == [1, 2]  # 1 runs, 2 is prefetched
    broker.worker_exited(host, 5, -9, 1)  # its supervisor read task 1 in its running slot
    events = broker.take_events(0)
    assert [type(e) for e in events] == [Started, Lost, Lost]
    assert events[1].task_id == 1 and events[1].blame and events[1].exitcode == -9
    # the prefetched task is lost unblamed (it used to go back to the queue by the broker's own rule)
    assert events[2].task_id == 2 and not events[2].blame
    assert list(broker.queue) == []


def _broker_with_a_leased_task():
    broker = Broker(lease_seconds=10, prefetch=0, initializer_bytes=None)
    host, _ = broker.hello_host({"name": "h"})
    holder, _ = broker.hello_worker(host, 1)
    other, _ = broker.hello_worker(host, 2)
    broker.put(1, "fn", b"a")
    broker.put(2, "fn", b"b")
    assert [t[0] for t in broker.lease(holder, 1, 0)] == [1]
    broker.take_events(0)
    return broker, holder, other


def test_broker_delivers_a_result_only_from_the_worker_holding_the_lease(caplog):
    broker, holder, other = _broker_with_a_leased_task()
    with caplog.at_level(logging.WARNING, logger="pmap.manager"):
        broker.complete(9999, [(1, b"forged")])   # a worker id never registered
        broker.complete(other, [(1, b"forged")])  # registered, but task 1 is leased to `holder`
        broker.complete(holder, [(2, b"forged")])  # task 2 was never leased to anyone
        broker.complete(other, [(424242, b"forged")])  # no such task
    assert broker.take_events(0) == []
    assert broker.refused_results == 4
    assert list(broker.queue) == [2] and 1 in broker.tasks  # nothing it held changed
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and "never registered" in refusals[0]  # said once, counted after
    broker.complete(holder, [(1, b"real")])
    assert [e for e in broker.take_events(0) if isinstance(e, tuple)] == [("done", 1, "h:1", b"real")]


def test_broker_takes_a_log_record_only_from_a_registered_worker():
    broker, holder, _ = _broker_with_a_leased_task()
    broker.log(9999, b"forged")  # never registered
    broker.log(holder, b"record")
    assert broker.take_events(0) == [("log", b"record")] and broker.refused_results == 1
    broker.worker_exited(broker.workers[holder].host, 1, -9, None)
    broker.take_events(0)
    broker.log(holder, b"after its death")  # dropped since
    assert broker.take_events(0) == [] and broker.refused_results == 2


def test_broker_refuses_an_initializer_report_from_a_worker_not_starting():
    broker, holder, other = _broker_with_a_leased_task()
    broker.fatal(9999, b"forged")
    broker.fatal(holder, b"forged")  # it already asked for work: its initializer ran
    assert broker.take_events(0) == [] and broker.refused_results == 2


def test_broker_drops_quietly_the_result_of_a_task_the_driver_cancelled(caplog):
    broker, holder, _ = _broker_with_a_leased_task()
    broker.cancel(1)  # a timeout: the driver expects nothing more of it
    with caplog.at_level(logging.WARNING, logger="pmap.manager"):
        broker.complete(holder, [(1, b"too late")])
    assert broker.take_events(0) == [] and broker.refused_results == 0 and not caplog.records


def _lease_in_thread(broker, worker, n, wait):
    """A worker's lease call waiting at the broker, as its fetch thread makes it."""
    pool = ThreadPoolExecutor(1)
    call = pool.submit(broker.lease, worker, n, wait)
    pool.shutdown(wait=False)
    wait_until(lambda: worker in broker.waiting or call.done(), "the lease call to wait")
    return call


def test_broker_does_not_let_a_busy_worker_prefetch_what_an_idle_one_waits_for():
    broker = Broker(lease_seconds=10, prefetch=1, initializer_bytes=None)
    host, _ = broker.hello_host({"name": "h"})
    busy, _ = broker.hello_worker(host, 1)
    idle, _ = broker.hello_worker(host, 2)
    broker.put(1, "fn", b"a")
    assert [t[0] for t in broker.lease(busy, 2, 0)] == [1]
    waiting = _lease_in_thread(broker, idle, 2, HANG_GUARD)  # `idle` waits in its own lease call
    broker.put(2, "fn", b"b")
    assert broker.lease(busy, 1, 0) == []  # the busy worker does not take it ...
    assert [t[0] for t in waiting.result(HANG_GUARD)] == [2]  # ... the idle one does
    assert not any(isinstance(e, Done) for e in broker.take_events(0))


def test_broker_wakes_one_waiting_worker_per_new_task():
    """Three idle workers wait for work; one new task wakes one of them, not all three."""
    broker = Broker(lease_seconds=10, prefetch=1, initializer_bytes=None)
    host, _ = broker.hello_host({"name": "h"})
    ids = [broker.hello_worker(host, pid)[0] for pid in (1, 2, 3)]
    wakes = []
    calls = []
    for worker_id in ids:
        calls.append(_lease_in_thread(broker, worker_id, 1, 3.0))
        condition = broker.workers[worker_id].ready
        condition.notify = lambda n=1, worker_id=worker_id, notify=condition.notify: (wakes.append(worker_id),
                                                                                      notify(n))
    broker.put(1, "fn", b"a")
    got = [call.result(HANG_GUARD) for call in calls]
    assert len(wakes) == 1, f"one task woke {len(wakes)} lease calls"
    assert sorted(len(tasks) for tasks in got) == [0, 0, 1]  # one took it, the others timed out empty


def broker_with_two_workers_and_ten_tasks():
    """A broker with one host, its workers `holder` (pid 1) and `other` (pid 2), and tasks 1-10 queued."""
    broker = Broker(lease_seconds=10, prefetch=1, initializer_bytes=None)
    host, _ = broker.hello_host({"name": "h"})
    holder, _ = broker.hello_worker(host, 1)
    other, _ = broker.hello_worker(host, 2)
    for task_id in range(1, 11):
        broker.put(task_id, "fn", b"p")
    return broker, host, holder, other


def test_broker_grants_several_tasks_per_call_each_its_own_lease():
    """A worker asking for several tasks gets them in one call; each is its own lease: only the
    one it runs is reported started, a result is taken only from the holder, and a death loses
    them all (blaming only the one running)."""
    broker, host, holder, other = broker_with_two_workers_and_ten_tasks()
    assert [t[0] for t in broker.lease(holder, 4, 0)] == [1, 2, 3, 4]
    assert [t[0] for t in broker.complete(holder, [(1, b"r1")], 3)] == [5, 6, 7]  # the report refills
    broker.complete(other, [(2, b"forged")])  # held by `holder`: refused
    assert broker.refused_results == 1
    broker.worker_exited(host, 1, -9, 2)  # its supervisor read task 2 in its running slot
    events = broker.take_events(0)
    started = [e.task_id for e in events if isinstance(e, Started)]
    assert started == [1, 2]  # the head of what it held, each time it changed
    lost = {e.task_id: e.blame for e in events if isinstance(e, Lost)}
    assert lost == {2: True, 3: False, 4: False, 5: False, 6: False, 7: False}
    assert [e for e in events if type(e) is tuple] == [("done", 1, "h:1", b"r1")]
    assert list(broker.queue) == [8, 9, 10]  # the rest wait for `other`


def test_broker_takes_a_batch_of_results_from_the_holder_only_and_blames_what_was_running():
    """A worker reports several finished tasks in one call: each result is delivered only if that
    worker holds its lease (the others in the same batch are refused, not the batch), and when
    it dies, only the task its running slot names is blamed: tasks it finished and had not yet
    reported are lost unblamed, for the engine to run again."""
    broker, host, holder, other = broker_with_two_workers_and_ten_tasks()
    assert [t[0] for t in broker.lease(holder, 4, 0)] == [1, 2, 3, 4]
    assert [t[0] for t in broker.lease(other, 1, 0)] == [5]
    batch = [(1, b"r1"), (2, b"r2"), (5, b"forged"), (9, b"forged"), (424242, b"forged")]
    assert [t[0] for t in broker.complete(holder, batch, 2)] == [6, 7]
    assert broker.refused_results == 3  # 5 is `other`'s, 9 is queued, 424242 never existed
    assert 5 in broker.workers[other].held and list(broker.queue) == [8, 9, 10]
    broker.complete(other, [(3, b"forged"), (5, b"r5")])  # 3 is `holder`'s: refused; 5 taken
    assert broker.refused_results == 4
    broker.worker_exited(host, 1, -9, 6)  # finished 3 and 4 unreported, died running 6
    events = broker.take_events(0)
    assert [e for e in events if type(e) is tuple] == [("done", 1, "h:1", b"r1"), ("done", 2, "h:1", b"r2"),
                                                       ("done", 5, "h:2", b"r5")]
    lost = {e.task_id: (e.blame, e.exitcode) for e in events if isinstance(e, Lost)}
    assert lost == {3: (False, -9), 4: (False, -9), 6: (True, -9), 7: (False, -9)}
    assert [e.reason for e in events if isinstance(e, Lost) and e.blame] == ["killed by SIGKILL"]
    broker.worker_exited(host, 2, 0, None)  # between tasks: nothing to blame
    assert not any(isinstance(e, Lost) for e in broker.take_events(0))  # and it held nothing
    assert list(broker.queue) == [8, 9, 10]


# ---- hostile and silent peers ---------------------------------------------------------------

def test_worker_gives_up_on_an_address_that_never_answers(key_file):
    """Something accepts the TCP connection and then says nothing: `pmap worker` says so and
    exits non-zero instead of waiting forever."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "pmap", "worker", f"127.0.0.1:{port}", "--authkey-file",
                               key_file], capture_output=True, text=True, timeout=HANG_GUARD)
    assert done.returncode == 1
    assert "did not answer the handshake" in done.stderr and "Traceback" not in done.stderr


def test_refused_peer_gets_no_traceback_and_the_refusal_is_logged(key_file, caplog):
    backend = remote_only_driver(key_file)
    try:
        with caplog.at_level(logging.WARNING, logger="pmap.manager"):
            with socket.create_connection(backend.address, timeout=HANG_GUARD) as peer:
                challenge = _read_frame(peer)
                peer.sendall(struct.pack("!i", 16) + b"x" * 16)  # a wrong answer to the challenge
                received = b"".join(iter(lambda: peer.recv(65536), b""))  # until the driver closes
        assert challenge.startswith(b"#CHALLENGE#")
        assert b"Traceback" not in received and b"#TRACEBACK" not in received
        assert any("refused" in r.getMessage() and "wrong authkey" in r.getMessage() for r in caplog.records)
    finally:
        backend.close()


def _read_frame(sock) -> bytes:
    header = b""
    while len(header) < 4:
        header += sock.recv(4 - len(header))
    size, = struct.unpack("!i", header)
    data = b""
    while len(data) < size:
        data += sock.recv(size - len(data))
    return data


@pytest.mark.timeout(HANG_GUARD * 2)
def test_many_idle_unauthenticated_connections_do_not_stop_a_real_worker(key_file, worker_commands):
    backend = remote_only_driver(key_file)
    idle = []
    try:
        for _ in range(500):
            idle.append(socket.create_connection(backend.address, timeout=HANG_GUARD))
        threads_before_worker = threading.active_count()
        worker_commands(backend.address, key_file)
        out = pmap.pmap(square, range(40), backend=backend)
    finally:
        for sock in idle:
            sock.close()
    assert out == [i * i for i in range(40)]
    assert threads_before_worker < 150  # not one thread per idle connection


# ---- ordered output when a host dies -------------------------------------------------------------

def slow_square(x):
    time.sleep(0.02)
    return x * x


@pytest.mark.timeout(HANG_GUARD * 2)
def test_ordered_run_does_not_stall_on_a_killed_host(key_file, worker_commands):
    """Two hosts of two processes; one is SIGKILLed mid-run. Its tasks go back at once (its
    connection closed), not after its lease, and the look-ahead follows the workers that
    joined, so ordered output never pauses for anything like the lease."""
    lease = 20.0
    backend = remote_only_driver(key_file, lease_seconds=lease)
    victim = worker_commands(backend.address, key_file, processes=2)
    worker_commands(backend.address, key_file, processes=2)
    wait_until(lambda: backend.broker.live_workers() == 4, "four worker processes to join")
    arrivals = []
    killed = None
    for value in pmap.imap(slow_square, range(600), backend=backend):
        arrivals.append(time.monotonic())
        if len(arrivals) == 100:
            family = [victim.pid] + worker_children(victim)
            for pid in family:
                os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
    assert len(arrivals) == 600 and killed is not None
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    # Waiting out the lease would stall for about 20 s; beside two other test suites on both
    # cores a prompt re-run still took 5.1 s, so the bound is half the lease.
    assert max(gaps) < lease / 2, f"ordered output stalled {max(gaps):.1f}s after a host died"


# ---- the command line's target travels -----------------------------------------------------------

SCRIPT = textwrap.dedent("""
    import os

    OFFSET = 1000

    def shifted(x):
        return f"{int(x) + OFFSET} {os.getpid()}"
""")


def test_a_file_target_reaches_workers_started_in_another_directory(key_file, worker_commands, tmp_path):
    """`pmap run path/to/file.py:f --backend manager`: a worker whose directory and path do not
    hold the file still runs it (the module travels by value)."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "travelling_target.py").write_text(SCRIPT)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    driver = subprocess.Popen(
        [sys.executable, "-m", "pmap", "run", str(scripts / "travelling_target.py") + ":shifted",
         "--range", "6", "--backend", "manager", "-o", "local_workers=0", "-o", f"address=127.0.0.1:{port}",
         "-o", f"authkey_file={key_file}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _listening(port) or driver.poll() is not None, "the driver to listen")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        with open(tmp_path / "worker.log", "w+") as worker_log:
            worker = subprocess.Popen([sys.executable, "-m", "pmap", "worker", f"127.0.0.1:{port}",
                                       "--authkey-file", key_file], cwd=elsewhere, env=env, stderr=worker_log)
            out, err = driver.communicate(timeout=HANG_GUARD)
            status = worker.wait(HANG_GUARD)
            worker_log.seek(0)
            # exit 0: it heard the driver end (a driver that exits before its stop reaches a
            # worker leaves it to presume the driver lost, and exit 1)
            assert status == 0, f"the worker exited {status}:\n{worker_log.read()}\nthe driver said:\n{err}"
    finally:
        driver.kill()
        driver.wait()
    assert driver.returncode == 0, err
    lines = out.split()
    assert lines[0::2] == [str(1000 + i) for i in range(6)]
    assert str(driver.pid) not in lines[1::2]  # run by the remote worker, not the driver


def _listening(port) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_without_workers_the_driver_says_how_to_join_and_a_timeout_still_holds(key_file, capfd):
    """No worker ever joins: the driver says how to join, and with a timeout each task is
    reported as timed out once it waited the timeout plus start_wait to start."""
    backend = remote_only_driver(key_file, start_wait=6)
    out = pmap.pmap(square, range(2), backend=backend, timeout=1, on_error="return")
    assert [f.kind for f in out] == ["timeout", "timeout"]
    assert "no manager worker started" in str(out[0].exception)
    err = capfd.readouterr().err
    assert "no workers; join with: pmap worker" in err and key_file in err


# ---- results only from the lease holder, losses reported to the engine -------------------------

def test_forged_results_over_the_network_are_refused_and_the_run_stays_right(key_file, worker_commands, caplog):
    """A key holder sends results for queued tasks: under a worker id never registered, and
    under a registered one that holds no lease. Neither is delivered; the real worker's are."""
    from pmap._outcome import encode_result
    from pmap.backends.manager.wire import connect, read_authkey_file
    backend = remote_only_driver(key_file)
    forger = connect(backend.address, read_authkey_file(key_file))
    host_id, _ = forger.hello_host({"name": "forger"})
    registered, _ = forger.hello_worker(host_id, 424242)
    with caplog.at_level(logging.WARNING, logger="pmap.manager"), ThreadPoolExecutor(1) as pool:
        run = pool.submit(pmap.pmap, square, range(6), backend=backend, chunksize=3)
        wait_until(lambda: len(backend.broker.tasks) == 2, "both tasks to wait for a worker")
        for task_id, record in list(backend.broker.tasks.items()):
            forged = encode_result(task_id, [-1] * record.n_items, [], 0.0)
            forger.complete(9999, [(task_id, forged)])
            forger.complete(registered, [(task_id, forged)])
        worker_commands(backend.address, key_file)
        out = run.result(timeout=HANG_GUARD)
    assert out == [i * i for i in range(6)]
    assert backend.broker.refused_results == 4
    assert sum("refused a result" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.timeout(HANG_GUARD * 2)
def test_an_expired_lease_ends_in_a_loss_the_engine_runs_again(key_file, worker_commands, marker_dir):
    """A host frozen mid-task (SIGSTOP: its connection stays open, its heartbeats stop) loses
    its lease; the broker reports the task lost, unblamed, and the engine runs it on the other
    host. Nothing waits on the frozen host."""
    backend = remote_only_driver(key_file, lease_seconds=1.0)
    frozen = worker_commands(backend.address, key_file)
    wait_until(lambda: backend.broker.live_workers() == 1, "the first worker to join")
    frozen_family = [frozen.pid] + worker_children(frozen)
    items = [(i, 0.5, str(marker_dir)) for i in range(6)]
    try:
        with ThreadPoolExecutor(1) as pool:
            run = pool.submit(pmap.pmap, note_start_then_sleep, items, backend=backend, chunksize=1)
            wait_until(lambda: markers(marker_dir), "the first worker to start an item")
            for pid in frozen_family:
                os.kill(pid, signal.SIGSTOP)
            worker_commands(backend.address, key_file)
            out = run.result(timeout=HANG_GUARD)
    finally:
        for pid in frozen_family:
            os.kill(pid, signal.SIGCONT)
    assert [item for item, _ in out] == list(range(6))  # none lost, none twice, in order
    assert not {pid for _, pid in out} & set(frozen_family)
    assert out.stats.crashed_workers == 0  # a lost host blames none of its items
