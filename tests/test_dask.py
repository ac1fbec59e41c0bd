"""The dask backend: the behaviour suite on one shared LocalCluster, a worker killed by its
item (KilledWorker becomes a crash), a Client or scheduler address given by the user, a
LocalCluster started lazily and closed with the run, and the error when dask is missing."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

import pmap
from pmap.backends.dask import DaskBackend
from test_behaviour import *  # noqa: F401,F403  (the behaviour suite, run here on dask)
from faults import exit_on_three
from workloads import sleep_then, square

pytestmark = pytest.mark.pmap_backends("dask")

HAVE_DISTRIBUTED = DaskBackend.unavailable_reason() is None
needs_distributed = pytest.mark.skipif(
    not HAVE_DISTRIBUTED, reason="the distributed package is not installed (pmap-parallel[dask])")
HANG_GUARD = 120  # seconds; only catches a hang


@pytest.fixture(scope="module", autouse=True)
def shared_cluster():
    """One LocalCluster for the whole module, as this process's default Client: the backend
    uses it, so each test does not pay for starting worker processes."""
    if not HAVE_DISTRIBUTED:
        yield None
        return
    from distributed import Client

    from pmap.backends.dask import local_cluster
    cluster = local_cluster(2)
    client = Client(cluster)  # the default client from here on
    yield cluster
    client.close()
    cluster.close()


@needs_distributed
def test_item_that_kills_its_worker_is_a_crash_and_the_rest_go_on():
    out = pmap.pmap(exit_on_three, range(6), backend="dask", chunksize=1, on_error="return")
    assert out[:3] == [0, 1, 2] and out[4:] == [4, 5]
    assert out[3].kind == "crash" and isinstance(out[3].exception, pmap.WorkerCrashed)
    assert "KilledWorker" in str(out[3].exception) and "exit code None" not in str(out[3].exception)


@needs_distributed
@pytest.mark.timeout(HANG_GUARD)
def test_killed_worker_in_a_chunk_is_isolated_and_retried():
    # one worker: dask counts a task that was on a worker when it died against that task too, so
    # with two, an item sharing a worker with the poison's retry could be reported as killed
    out = pmap.pmap(exit_on_three, range(12), backend="dask", workers=1, chunksize=4, retries=1,
                    on_error="return")
    assert [r for i, r in enumerate(out) if i != 3] == [i for i in range(12) if i != 3]
    assert out[3].kind == "crash" and out[3].attempts == 2
    assert out.stats.crashed_workers >= 2


@needs_distributed
def test_timeout_reports_the_item_and_the_rest_go_on():
    # dask cannot stop a running task: the item is reported at its deadline, its thread runs on
    out = pmap.pmap(sleep_then, [0.05, 3, 0.05, 0.05], backend="dask", timeout=1.0, on_error="return")
    assert out[0] == out[2] == out[3] == 0.05
    assert out[1].kind == "timeout" and isinstance(out[1].exception, pmap.TaskTimeout)


@needs_distributed
def test_given_client_and_scheduler_address_are_used_and_left_open(shared_cluster):
    from distributed import Client
    with Client(shared_cluster.scheduler_address, set_as_default=False) as client:
        assert pmap.pmap(square, range(20), backend="dask", client=client) == [i * i for i in range(20)]
        assert client.status == "running"  # pmap did not close a client it was given
    out = pmap.pmap(square, range(20), backend="dask", address=shared_cluster.scheduler_address)
    assert out == [i * i for i in range(20)]
    assert shared_cluster.status.name == "running"


@needs_distributed
def test_lazy_input_keeps_a_bounded_window_of_futures():
    backend = DaskBackend()
    backend.open()
    seen = []
    try:
        results = pmap.imap(square, _counting(seen), backend=backend, chunksize=1)
        first = [next(results) for _ in range(5)]
        in_flight = len(backend.watches)
        results.close()
    finally:
        backend.close()
    assert first == [0, 1, 4, 9, 16]
    assert in_flight <= backend.workers * 2
    assert len(seen) < 1000  # the infinite input was read only as far as needed


@needs_distributed
@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_short_tasks_go_in_batches_and_each_item_keeps_its_place_and_its_failure(ordered):
    """One-item tasks that take no time: they are submitted many to a `client.map`, and still
    every value comes back at its index, and every failure names its own item."""
    backend = DaskBackend()
    backend.open()
    batches = []
    client_map = backend.client.map

    def counting_map(fn, payloads, *args, **kwargs):
        batches.append(len(payloads))
        return client_map(fn, payloads, *args, **kwargs)

    backend.client.map = counting_map
    items = list(range(400))
    try:
        out = pmap.pmap(fail_on_every_seventh, items, backend=backend, chunksize=1, ordered=ordered,
                        on_error="return")
    finally:
        backend.close()
    failed = [r for r in out if isinstance(r, pmap.Failure)]
    values = [r for r in out if not isinstance(r, pmap.Failure)]
    assert sorted(f.index for f in failed) == [i for i in items if i % 7 == 0]
    assert all(f.item == f.index and f"item {f.index} " in str(f.exception) for f in failed)
    assert sorted(values) == [i for i in items if i % 7]
    if ordered:
        assert [r.index if isinstance(r, pmap.Failure) else r for r in out] == items
    assert sum(batches) == len(items)
    assert max(batches) >= 8, f"short tasks were not batched: {batches}"


def fail_on_every_seventh(x):
    if x % 7 == 0:
        raise ValueError(f"item {x} fails")
    return x


def _counting(seen):
    i = 0
    while True:
        seen.append(i)
        yield i
        i += 1


OWN_CLUSTER_SCRIPT = textwrap.dedent("""
    import psutil, pmap
    from workloads import sleep_then, square
    if __name__ == "__main__":
        assert pmap.pmap(square, range(10), backend="dask", workers=1) == [i * i for i in range(10)]
        me = psutil.Process()
        # multiprocessing's resource tracker stays until this process ends, by design
        left = [p for p in me.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE
                and "resource_tracker" not in " ".join(p.cmdline())]
        gone, alive = psutil.wait_procs(left, timeout=10)
        print("left", len(alive))
""")


@needs_distributed
def test_starts_a_local_cluster_lazily_and_closes_it(tmp_path):
    """In a fresh process (no default Client): pmap starts a LocalCluster and ends its
    processes with the run."""
    script = tmp_path / "own_cluster.py"
    script.write_text(OWN_CLUSTER_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=HANG_GUARD)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("left 0")


def test_missing_distributed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # makes `import distributed` fail
    reason = DaskBackend.unavailable_reason()
    assert "pmap-parallel[dask]" in reason and "\n" not in reason
    with pytest.raises(pmap.BackendUnavailable, match=r"pmap-parallel\[dask\]"):
        pmap.pmap(square, [1], backend="dask")
    info = {b.name: b for b in pmap.backends()}["dask"]
    assert not info.available and "pmap-parallel[dask]" in info.reason


# ---- an external cluster, started with the `dask` commands as users run it -----------------

DASK_COMMAND = os.path.join(os.path.dirname(sys.executable), "dask")


def _start(args, log_path):
    log = open(log_path, "w")
    proc = subprocess.Popen([DASK_COMMAND, *args], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log = log
    return proc


def _end(procs):
    """SIGKILL each command and everything it started; nothing may outlive the test."""
    family = []
    for proc in procs:
        try:
            family += [proc_ for proc_ in psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.log.close()
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, f"dask processes left behind: {[p.pid for p in alive]}"


@pytest.fixture
def dask_commands(tmp_path):
    """start_scheduler() -> its address; start_worker(address) -> the worker command."""
    started = []

    def start_scheduler():
        scheduler_file = tmp_path / "scheduler.json"
        started.append(_start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(scheduler_file)], tmp_path / "scheduler.log"))
        deadline = time.monotonic() + HANG_GUARD / 2
        while not scheduler_file.exists() or not scheduler_file.read_text().strip().endswith("}"):
            assert time.monotonic() < deadline, "the dask scheduler did not start"
            assert started[-1].poll() is None, (tmp_path / "scheduler.log").read_text()
            time.sleep(0.1)
        return started[-1], json.loads(scheduler_file.read_text())["address"]

    def start_worker(address, nworkers=2):
        started.append(_start(["worker", address, "--nworkers", str(nworkers), "--nthreads", "1",
                               "--no-dashboard", "--host", "127.0.0.1"], tmp_path / f"worker-{len(started)}.log"))
        return started[-1]

    yield start_scheduler, start_worker
    _end(started)


def _wait_for_threads(address, n):
    from distributed import Client
    with Client(address, set_as_default=False, timeout=HANG_GUARD / 2) as client:
        client.wait_for_workers(n, timeout=HANG_GUARD / 2)


@needs_distributed
@pytest.mark.timeout(HANG_GUARD)
def test_external_cluster_runs_the_work_and_a_killed_scheduler_is_an_error(dask_commands, tmp_path):
    start_scheduler, start_worker = dask_commands
    scheduler, address = start_scheduler()
    start_worker(address)
    _wait_for_threads(address, 2)
    assert pmap.pmap(lambda x: x + 1, range(40), backend="dask", address=address) == list(range(1, 41))

    marker = tmp_path / "marker"
    items = [(0.05, str(marker))] * 400
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(pmap.pmap, sleep_and_touch, items, backend="dask", address=address, chunksize=1)
        deadline = time.monotonic() + HANG_GUARD / 2
        while not marker.exists():
            assert time.monotonic() < deadline and not run.done(), "the run did not start"
            time.sleep(0.05)
        scheduler.kill()
        killed = time.monotonic()
        with pytest.raises(pmap.PmapError, match="scheduler"):
            run.result(timeout=HANG_GUARD)
    assert time.monotonic() - killed < 60


@needs_distributed
@pytest.mark.timeout(HANG_GUARD)
def test_cluster_without_workers_is_an_error_and_a_timeout_holds_for_a_task_never_started(dask_commands):
    start_scheduler, _ = dask_commands
    _, address = start_scheduler()
    with pytest.raises(pmap.PmapError, match="no workers"):
        pmap.pmap(square, range(4), backend="dask", address=address, worker_wait=2)
    out = pmap.pmap(square, range(2), backend="dask", address=address, timeout=1, start_wait=2, worker_wait=600,
                    on_error="return")
    assert [f.kind for f in out] == ["timeout", "timeout"]
    assert "no dask worker started" in str(out[0].exception)


@needs_distributed
@pytest.mark.timeout(HANG_GUARD)
def test_wrong_scheduler_address_fails_quickly():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # nobody listens once it is closed
    started = time.monotonic()
    with pytest.raises(pmap.PmapError, match="cannot reach a dask scheduler"):
        pmap.pmap(square, range(4), backend="dask", address=f"tcp://127.0.0.1:{port}", connect_timeout=2)
    assert time.monotonic() - started < 30  # did not wait dask's default 30 s per attempt


def sleep_and_touch(args):
    seconds, marker = args
    open(marker, "a").close()
    time.sleep(seconds)
    return seconds


@needs_distributed
@pytest.mark.timeout(HANG_GUARD)
def test_adaptive_cluster_grows_under_the_work():
    """An adaptive cluster scales from the work queued at its scheduler: pmap keeps enough
    there for it to start more than one worker."""
    import logging

    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=0, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, silence_logs=logging.CRITICAL) as cluster:
        cluster.adapt(minimum=0, maximum=3, interval="200ms")
        with Client(cluster, set_as_default=False) as client:
            out = pmap.pmap(sleep_then, [0.1] * 150, backend="dask", client=client, ordered=False)
    assert out == [0.1] * 150
    assert len(out.stats.busy_by_worker) >= 2, out.stats.busy_by_worker


@needs_distributed
@pytest.mark.timeout(HANG_GUARD)
def test_own_cluster_keeps_its_workers_through_many_crashes(shared_cluster):
    """dask's SpecCluster closes a nanny whose worker is still away lost-worker-timeout after
    a crash (shortened here, so a restarting worker is always away); pmap's cluster keeps them."""
    import dask
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "50ms"}):
        out = pmap.pmap(exit_on_three, [3] * 4, backend="dask", chunksize=1, on_error="return")
        assert [f.kind for f in out] == ["crash"] * 4
        time.sleep(0.5)  # past the shortened timeout of the last crash
    assert len(shared_cluster.workers) == 2
    assert pmap.pmap(square, range(8), backend="dask") == [i * i for i in range(8)]


class _SettledFuture:
    """Stands in for a dask future whose outcome its fetch never reported."""

    def __init__(self, status, exception):
        self.status = status
        self._state = type("State", (), {"exception": exception})()


@needs_distributed
def test_a_failed_future_nobody_reported_is_read_from_its_own_status():
    from distributed import KilledWorker

    from pmap.backends.base import Lost
    from pmap.backends.dask import SETTLED_GRACE, _Watch
    backend = DaskBackend(workers=1)  # not opened: only the status watch runs
    last_worker = type("WorkerState", (), {"address": "tcp://127.0.0.1:1"})()
    killed = KilledWorker("pmap-x-1", last_worker, 0)
    backend.watches[1] = _Watch(_SettledFuture("error", killed), 1)
    backend.watches[2] = _Watch(_SettledFuture("pending", None), 1)
    assert backend._check_futures(100.0) == []  # settled just now: its fetch may still report
    events = backend._check_futures(100.0 + SETTLED_GRACE + 0.1)
    assert [(type(e), e.task_id, e.worker, e.blame) for e in events] == [(Lost, 1, "tcp://127.0.0.1:1", True)]
    assert "KilledWorker" in events[0].reason
    assert list(backend.watches) == [2]
