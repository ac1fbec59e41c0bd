"""What only one backend does: fork's platform check and thread warning, pool's start
methods, loky's reuse, registration of third-party backends."""
import os
import subprocess
import sys
import threading
import time
import warnings

import pytest

import pmap
from pmap.backends import base
from workloads import pid_of, square


def test_fork_unavailable_without_fork(monkeypatch):
    from pmap.backends import fork
    monkeypatch.setattr(fork, "fork_supported", lambda: False)
    with pytest.raises(pmap.BackendUnavailable, match="no os.fork.*backend='process'"):
        pmap.pmap(square, [1], backend="fork")
    info = {b.name: b for b in pmap.backends()}["fork"]
    assert not info.available and "os.fork" in info.reason


def test_any_unavailable_backend_refuses_to_be_built():
    class NeedsTheMoon(base.Backend):
        name = "moon"

        @classmethod
        def unavailable_reason(cls):
            return "needs the moon"

    with pytest.raises(pmap.BackendUnavailable, match="backend 'moon' is unavailable: needs the moon"):
        NeedsTheMoon()
    with pytest.raises(pmap.BackendUnavailable, match="needs the moon"):
        pmap.pmap(square, [1], backend=NeedsTheMoon)


def test_fork_task_sent_to_a_worker_that_just_died_is_lost_without_blame():
    # the race behind a rare BrokenPipeError: a worker dies between wait() and submit()
    import signal
    from pmap.backends.fork import ForkBackend
    backend = ForkBackend(workers=1)
    backend.open()
    try:
        fn = backend.prepare(square)
        victim = backend.workers_list[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.proc.join(10)
        backend.submit(base.Task(1, fn, [3]))  # must not raise
        lost = [e for e in backend.wait(1.0) if isinstance(e, base.Lost)]
        assert [(e.task_id, e.blame) for e in lost] == [(1, False)]
    finally:
        backend.close(kill=True)


def test_process_task_refused_by_a_just_broken_executor_is_lost_without_blame(monkeypatch):
    # the same race on loky: its executor breaks between our liveness check and submit()
    from loky.process_executor import TerminatedWorkerError
    from pmap.backends.process import ProcessBackend
    backend = ProcessBackend(workers=1)
    backend.open()
    try:
        fn = backend.prepare(square)

        def refuse(*args, **kwargs):
            raise TerminatedWorkerError("a worker process was unexpectedly terminated")
        monkeypatch.setattr(backend.executor, "submit", refuse)
        backend.submit(base.Task(1, fn, [3]))  # must not raise
        lost = [e for e in backend.wait(5.0) if isinstance(e, base.Lost)]
        assert [(e.task_id, e.blame) for e in lost] == [(1, False)]
    finally:
        backend.close(kill=True)


def test_fork_warns_once_when_threads_run(monkeypatch):
    from pmap.backends import fork
    monkeypatch.setattr(fork, "_warned_threads", False)
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait, daemon=True)
    helper.start()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert pmap.pmap(square, range(5), backend="fork") == [0, 1, 4, 9, 16]
            assert pmap.pmap(square, range(5), backend="fork") == [0, 1, 4, 9, 16]
    finally:
        stop.set()
    ours = [w for w in caught if "fork backend is forking a process" in str(w.message)]
    assert len(ours) == 1
    assert ours[0].filename == __file__  # points at the caller's line, not at pmap
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning) and "fork" in str(w.message)]


def test_fork_inherits_unpicklable_globals():
    lock = threading.Lock()
    assert pmap.pmap(lambda x: (lock.locked(), x), [1, 2], backend="fork") == [(False, 1), (False, 2)]


def test_fork_pool_sends_each_call_so_an_unpicklable_one_fails_alone():
    with pmap.Pool(backend="fork", workers=2) as pool:
        assert pool.map(square, [2, 3]) == [4, 9]
        lock = threading.Lock()
        with pytest.raises(TypeError, match="lock"):  # the pickling error itself
            pool.map(lambda x: (x, lock.locked()), [1])
        assert pool.map(lambda x: x + 1, [1]) == [2]  # closures go by value


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_pool_start_methods(method):
    offset = 5
    out = pmap.pmap(lambda x: x + offset, range(6), backend="pool", start_method=method, workers=2)
    assert out == [x + 5 for x in range(6)]


def test_pool_rejects_unknown_start_method():
    with pytest.raises(ValueError, match="start_method must be one of"):
        pmap.pmap(square, [1], backend="pool", start_method="teleport")


def test_pool_default_start_method_is_explicit():
    from pmap.backends.pool import PoolBackend
    backend = PoolBackend(workers=1)
    assert backend.start_method in ("forkserver", "spawn")
    backend.close()


def test_process_backend_reuses_loky_workers():
    first = set(pmap.pmap(pid_of, range(20), backend="process", workers=2, chunksize=1))
    second = set(pmap.pmap(pid_of, range(20), backend="process", workers=2, chunksize=1))
    assert first & second, "the second run started new workers instead of reusing loky's"
    assert os.getpid() not in first
    # what auto reads to price a process run's start-up
    from pmap.backends.process import ProcessBackend
    assert ProcessBackend.is_warm(2) and not ProcessBackend.is_warm(3)
    from loky import get_reusable_executor
    get_reusable_executor().shutdown(wait=True)
    assert not ProcessBackend.is_warm(2)


def test_thread_timeout_replaces_the_stuck_thread():
    def stuck_on_one(x):
        if x == 1:
            time.sleep(2)  # blocked in C: cannot be interrupted, only abandoned
        return x

    start = time.monotonic()
    out = pmap.pmap(stuck_on_one, range(6), backend="thread", workers=1, timeout=0.3, on_error="return")
    assert time.monotonic() - start < 1.9  # the run did not wait for the stuck thread
    assert [r for r in out if not isinstance(r, pmap.Failure)] == [0, 2, 3, 4, 5]
    assert out[1].kind == "timeout"


class EchoBackend(base.Backend):
    """A third-party backend in a few lines: runs tasks in the caller, doubling nothing."""

    name = "echo"
    kind = "serial"

    def __init__(self, workers=None, initializer=None, initargs=(), **options):
        super().__init__(1, initializer, initargs, **options)
        self.tasks = []

    def capacity(self):
        return 1 - len(self.tasks)

    def submit(self, task):
        self.tasks.append(task)

    def wait(self, timeout):
        from pmap._worker import run_items
        events = []
        while self.tasks:
            task = self.tasks.pop()
            values, failures, elapsed = run_items(task.fn, task.items)
            events.append(base.Done(task.id, "echo", values, failures, elapsed))
        return events


def test_register_backend_plugs_in_a_new_backend():
    pmap.register_backend("echo", EchoBackend)
    try:
        assert pmap.pmap(square, range(10), backend="echo") == [x * x for x in range(10)]
        assert "echo" in [b.name for b in pmap.backends()]
    finally:
        base._FACTORIES.pop("echo", None)


def test_entry_point_group_registers_a_plugin(tmp_path, monkeypatch):
    (tmp_path / "pmap_echo_plugin.py").write_text(
        "from pmap._worker import run_items\n"
        "from pmap.backends import base\n"
        "class Echo(base.Backend):\n"
        "    name = 'echo-plugin'\n"
        "    kind = 'serial'\n"
        "    def __init__(self, workers=None, initializer=None, initargs=(), **options):\n"
        "        super().__init__(1, initializer, initargs, **options)\n"
        "        self.tasks = []\n"
        "    def capacity(self):\n"
        "        return 1 - len(self.tasks)\n"
        "    def submit(self, task):\n"
        "        self.tasks.append(task)\n"
        "    def wait(self, timeout):\n"
        "        task = self.tasks.pop()\n"
        "        return [base.Done(task.id, 'echo', *run_items(task.fn, task.items))]\n")
    dist = tmp_path / "pmap_echo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pmap-echo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[pmap.backends]\necho-plugin = pmap_echo_plugin:Echo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "_entry_points_loaded", False)
    try:
        assert pmap.pmap(square, range(4), backend="echo-plugin") == [0, 1, 4, 9]
    finally:
        base._FACTORIES.pop("echo-plugin", None)


def run_script(code, timeout=60):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-"], input=code, text=True, capture_output=True,
                          timeout=timeout, cwd=os.path.dirname(__file__))


def test_pool_workers_that_cannot_start_fail_fast_instead_of_hanging():
    # forkserver workers re-import the main module; a script read from stdin cannot be
    result = run_script("import pmap\n"
                        "def add_one(x):\n    return x + 1\n"
                        "pmap.pmap(add_one, range(3), backend='pool', start_method='forkserver')\n")
    assert result.returncode == 1
    assert "BackendUnavailable: backend 'pool' cannot start its workers" in result.stderr
    assert "start_method='fork'" in result.stderr


def test_gevent_patched_process_fork_works_and_pools_say_why_not():
    result = run_script("from gevent import monkey; monkey.patch_all()\n"
                        "import pmap, time\n"
                        "def nap(x):\n    time.sleep(0.01)\n    return x * 2\n"
                        "print(pmap.pmap(nap, range(40), backend='fork', workers=2))\n"
                        "for name in ('process', 'pool'):\n"
                        "    try:\n"
                        "        pmap.pmap(nap, range(3), backend=name)\n"
                        "    except pmap.BackendUnavailable as exc:\n"
                        "        print('unavailable', name, 'monkey-patched' in str(exc))\n"
                        "print(pmap.explain(nap, [0.01] * 50).backend)\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str([x * 2 for x in range(40)])
    assert lines[1:3] == ["unavailable process True", "unavailable pool True"]
    assert lines[3] in ("thread", "fork", "serial")


INITIALIZER_SCRIPT = """
import os, sys
import pmap

state = None

def open_connection(value):
    global state
    state = {"value": value, "pid": os.getpid()}

def query(x):
    return state["value"] + x, state["pid"] == os.getpid()

if __name__ == "__main__":
    out = pmap.pmap(query, range(6), backend=sys.argv[1], workers=2, initializer=open_connection,
                    initargs=(100,), on_error="return")
    print(repr([r if isinstance(r, tuple) else type(r.exception).__name__ for r in out]))
"""


@pytest.mark.parametrize("backend", ["process", "pool", "fork"])
def test_a_main_function_sees_the_globals_its_initializer_set_in_the_worker(tmp_path, backend):
    # As under concurrent.futures: the initializer stores a per-worker object (a connection) in a
    # global, the function of the same __main__ module reads it, though each was pickled apart.
    script = tmp_path / "script.py"
    script.write_text(INITIALIZER_SCRIPT)
    done = subprocess.run([sys.executable, str(script), backend], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == repr([(100 + x, True) for x in range(6)])


def test_a_process_run_does_not_wait_for_every_worker(tmp_path):
    # Three of four workers start late (their initializer holds them): the first worker up takes
    # the items, and the run ends before the others have started.
    from pmap.backends.process import ProcessBackend
    from pmap.engine import RunSpec, RunStats, execute
    from workloads import first_worker_only_starts
    backend = ProcessBackend(workers=4, initializer=first_worker_only_starts,
                             initargs=(str(tmp_path / "first"), 30.0))
    backend.open()
    stats = RunStats()
    try:
        out = [v for batch in execute(backend, RunSpec(pid_of, range(20), chunksize=1), stats) for v in batch]
    finally:
        backend.close(kill=True)  # the held workers are ended, not waited for
    assert len(out) == 20 and len(set(out)) == 1, "items waited for workers that were still starting"
    assert set(stats.busy_by_worker) == set(out)
    # the start-up share counts the wait for the first worker
    assert 0.0 < stats.startup_seconds <= stats.wall_seconds
    assert 0.0 < stats.startup_share <= 1.0
    assert f"({stats.startup_share:.0%})" in str(stats)


@pytest.mark.skipif("forkserver" not in __import__("multiprocessing").get_all_start_methods(),
                    reason="this platform has no fork server")
def test_process_workers_forked_from_the_fork_server():
    from workloads import parent_pid_of
    parents = pmap.pmap(parent_pid_of, range(20), backend="process", workers=2, start_method="forkserver",
                        chunksize=1)
    assert os.getpid() not in parents, "the workers were not forked by the fork server"
    assert pmap.pmap(square, range(50), backend="process", workers=2, start_method="forkserver") == \
        [x * x for x in range(50)]
    from pmap.backends.process import ProcessBackend
    assert not ProcessBackend.is_warm(2), "auto would take the fork server's pool for loky's own"
    with pytest.raises(ValueError, match="start_method must be one of"):
        pmap.pmap(square, [1], backend="process", start_method="vfork")
