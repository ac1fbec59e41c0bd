"""Big objects: a function crosses once per worker, large buffers go through shared memory
(both ways, without copies through pipes), and every segment is released, also after a killed
worker and a killed caller."""
import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
import warnings

import psutil
import pytest

import pmap
from pmap import _transfer
from pmap.auto import _picklable

np = pytest.importorskip("numpy", reason="the shared-memory tests map numpy arrays")
from bigdata import (MB, big_bytes, doubled, fill_row, filled, first_value, kill_self_on_three,  # noqa: E402
                     length_plus, row_of, shared_made_here, slice_sum, touch_and_pid, write_into)

PROCESS_BACKENDS = ["process", "pool", "fork"]


def own_entries(pid=None):
    """/dev/shm entries (segments, start-record folders) named for process `pid` (this one)."""
    prefix = f"pmap-{pid or os.getpid()}-"
    return sorted(name for name in os.listdir(_transfer.SHM_DIR) if name.startswith(prefix))


@pytest.fixture
def no_leftovers():
    before = own_entries()
    yield
    assert own_entries() == before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["process", "pool"])
def test_a_100_mb_closure_crosses_once_per_run_not_once_per_task(backend, no_leftovers):
    data = bytes(100 * MB)  # bytes stay in the pickle: the worst case, read once per worker
    out = pmap.pmap(functools.partial(length_plus, data), range(40), backend=backend, workers=2, chunksize=1)
    assert out == [100 * MB + x for x in range(40)]
    assert out.stats.tasks == 40
    assert 100 * MB <= out.stats.bytes_sent <= 2 * 100 * MB * 1.05  # not 40 x 100 MB


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", PROCESS_BACKENDS)
def test_an_array_bound_in_a_partial_is_shared_read_only_and_copied_at_most_once(backend, no_leftovers):
    array = np.arange(50 * MB // 8, dtype=np.float64)
    out = pmap.pmap(functools.partial(slice_sum, array), range(40), backend=backend, workers=2, chunksize=1)
    assert out == [slice_sum(array, i) for i in range(40)]
    assert out.stats.bytes_sent <= 50 * MB * 1.05  # into shared memory once, mapped by each worker
    if backend != "fork":  # fork's workers inherit a private copy-on-write copy instead
        failed = pmap.pmap(functools.partial(write_into, array), [0], backend=backend, on_error="return")
        assert isinstance(failed[0], pmap.Failure) and "read-only" in str(failed[0].exception)
    assert array[0] == 0.0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", PROCESS_BACKENDS)
def test_big_arrays_go_both_ways_through_shared_memory(backend, no_leftovers):
    arrays = [np.full(2 * MB // 8, i, dtype=np.float64) for i in range(12)]
    out = pmap.pmap(doubled, arrays, backend=backend, workers=2, chunksize=2)
    for i, result in enumerate(out):
        assert result.shape == arrays[i].shape and result[0] == 2 * i and result[-1] == 2 * i
        assert result.flags.writeable  # a result is the caller's own, as with a plain pickle
    result[0] = 5.0
    pipe_bytes = out.stats.bytes_sent + out.stats.bytes_received - 2 * 24 * MB
    assert pipe_bytes < 1 * MB  # only headers crossed the pipes
    made = pmap.pmap(filled, range(6), backend=backend, workers=2)
    assert [float(a[-1]) for a in made] == [float(i) for i in range(6)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", PROCESS_BACKENDS)
def test_a_killed_worker_leaves_no_segment_behind(backend, no_leftovers):
    arrays = [np.full(2 * MB // 8, i, dtype=np.float64) for i in range(8)]
    out = pmap.pmap(kill_self_on_three, arrays, backend=backend, workers=2, chunksize=2, on_error="return")
    assert isinstance(out[3], pmap.Failure) and out[3].kind == "crash"
    assert [float(a[0]) for i, a in enumerate(out) if i != 3] == [i + 1.0 for i in range(8) if i != 3]


# ---- arrays in shared memory from the start -------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", PROCESS_BACKENDS)
def test_workers_write_into_one_shared_array_and_the_caller_sees_it(backend):
    out = pmap.shared_array((8, 1000), dtype=np.int64)
    assert out.sum() == 0
    done = pmap.pmap(functools.partial(fill_row, out), range(8), backend=backend, workers=2, chunksize=1)
    assert done == list(range(8))
    assert (out == np.arange(8)[:, None]).all()
    rows = pmap.pmap(functools.partial(row_of, out), range(8), backend=backend, workers=2)
    rows[5][0] = -5  # a returned row is a view on the same memory, not a copy
    assert out[5, 0] == -5
    strided = pmap.pmap(first_value, [out[:, 3]], backend=backend)  # not contiguous: copied, still right
    assert strided == [0.0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", PROCESS_BACKENDS)
def test_a_shared_array_in_a_partial_sends_no_data(backend, no_leftovers):
    array = pmap.to_shared(np.arange(50 * MB // 8, dtype=np.float64))
    task = functools.partial(slice_sum, array)
    first = pmap.pmap(task, range(40), backend=backend, workers=2, chunksize=1)
    again = pmap.pmap(task, range(40), backend=backend, workers=2, chunksize=1)
    assert first == again == [slice_sum(array, i) for i in range(40)]
    assert first.stats.bytes_sent < 1 * MB and again.stats.bytes_sent < 1 * MB
    items = pmap.pmap(first_value, [array[i * MB:] for i in range(4)], backend=backend, workers=2)
    assert items == [float(i * MB) for i in range(4)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", PROCESS_BACKENDS)
def test_an_array_a_worker_made_shared_comes_back_as_a_value(backend, no_leftovers):
    out = pmap.pmap(shared_made_here, range(6), backend=backend, workers=2, chunksize=1, on_error="return")
    assert not [r for r in out if isinstance(r, pmap.Failure)], out
    for i, (_, array) in enumerate(out):
        assert array.size == (2 * MB // 8 if i % 2 else 1024) and (array == i).all()
        assert array.flags.writeable
    workers = {pid for pid, _ in out}

    def workers_entries():
        _transfer.sweep()  # an ended worker holds no lock: its leftovers go; a live one drops its own
        return [name for pid in workers for name in own_entries(pid)]
    deadline = time.monotonic() + 30  # a worker may reply a moment before its function's frame ends
    while workers_entries() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert workers_entries() == []


@pytest.mark.timeout(60)
def test_a_shared_array_is_freed_with_its_last_view():
    before = own_entries()
    array = pmap.shared_array(3 * MB, dtype=np.uint8)
    view = array[MB:]
    assert len(own_entries()) == len(before) + 1
    del array
    assert len(own_entries()) == len(before) + 1  # the view keeps it
    del view
    assert own_entries() == before


@pytest.mark.timeout(120)
def test_a_warm_worker_unmaps_a_shared_array_its_caller_dropped():
    before = set(own_entries())
    array = pmap.shared_array(4 * MB, dtype=np.uint8)
    (name,) = set(own_entries()) - before
    pids = set(pmap.pmap(functools.partial(touch_and_pid, array), range(8), backend="process", workers=2))

    def mapping_it():
        found = set()
        for pid in pids:
            with open(f"/proc/{pid}/maps") as maps:
                if name in maps.read():
                    found.add(pid)
        return found
    assert mapping_it()
    del array
    assert name not in own_entries()
    again = set(pmap.pmap(functools.partial(touch_and_pid, np.zeros(8)), range(8), backend="process", workers=2))
    assert again & pids  # the same warm workers ran the next run...
    assert not mapping_it() & again  # ...and let the dropped array go


def test_shared_array_refuses_what_it_cannot_hold():
    with pytest.raises(TypeError, match="Python objects"):
        pmap.shared_array(3, dtype=object)
    with pytest.raises(ValueError, match="non-negative"):
        pmap.shared_array((2, -1))
    empty = pmap.shared_array(0)
    assert empty.shape == (0,)
    assert pmap.to_shared([[1, 2], [3, 4]]).tolist() == [[1, 2], [3, 4]]


def mapped_segments() -> set:
    with open("/proc/self/maps") as maps:
        return {line.split()[-2] if line.rstrip().endswith("(deleted)") else line.split()[-1]
                for line in maps if "/pmap-" in line}


@pytest.mark.timeout(60)
def test_a_dropped_result_releases_its_memory():
    entries, mapped = own_entries(), mapped_segments()
    out = pmap.pmap(filled, range(4), backend="fork", workers=2)
    assert own_entries() == entries  # the caller mapped and unlinked the segments at once
    assert mapped_segments() - mapped  # the results still view the (unlinked) segments
    del out
    assert not mapped_segments() - mapped


DRIVER = """
import sys, time
import numpy as np
import pmap

def slow(array):
    time.sleep(60)
    return array

if __name__ == "__main__":
    arrays = [np.ones(2 << 20) for _ in range(8)]
    shared = pmap.shared_array(1 << 20)
    print("ready", flush=True)
    pmap.pmap(slow, arrays, backend=sys.argv[1], workers=2, chunksize=1)
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["process", "pool"])
def test_a_killed_caller_leaves_nothing_once_the_next_run_sweeps(backend, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    child = subprocess.Popen([sys.executable, str(script), backend], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while len(own_entries(child.pid)) < 3 and time.monotonic() < deadline:  # a shared array, its
            time.sleep(0.05)                                                    # folder, a task segment
        assert len(own_entries(child.pid)) >= 3
        workers = psutil.Process(child.pid).children(recursive=True)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        psutil.wait_procs(workers, timeout=10)
    finally:
        child.kill()
        child.stdout.close()
    _transfer.sweep()  # another pmap process on this machine may have swept them first: fine
    assert own_entries(child.pid) == []
    assert not os.path.exists(_transfer._lock_path(child.pid))


OWNER = """
import os, sys, time
import pmap
from pmap import _transfer
array = pmap.shared_array(1024)  # takes this process's lock, then names a segment after its pid
names = sorted(n for n in os.listdir(_transfer.SHM_DIR) if n.startswith(f"pmap-{os.getpid()}-"))
print(" ".join(names), flush=True)
time.sleep(120)
"""


@pytest.fixture
def owner():
    """A live pmap process that owns one shared-array segment; killed at the end."""
    process = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        names = process.stdout.readline().split()
        assert len(names) == 1 and names == own_entries(process.pid)
        yield process
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
        _transfer.sweep()


def killed(process) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_the_sweep_spares_a_live_owner_and_removes_a_killed_ones(owner):
    _transfer.sweep()
    assert own_entries(owner.pid)
    killed(owner)
    _transfer.sweep()
    assert own_entries(owner.pid) == []
    assert not os.path.exists(_transfer._lock_path(owner.pid))


def test_entries_without_a_lock_file_are_never_swept():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid nobody holds: the sweep before the lock would have removed its entries
    path = os.path.join(_transfer.SHM_DIR, f"pmap-{gone.pid}-made-by-an-older-pmap")
    open(path, "wb").close()
    try:
        _transfer.sweep()
        assert os.path.exists(path)
    finally:
        os.unlink(path)


def _unshare_refused() -> str | None:
    try:
        done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
                              timeout=30)
    except FileNotFoundError:
        return "no unshare command here"
    if done.returncode != 0:
        return f"unshare --pid is not permitted here: {done.stderr.decode().strip()}"
    return None


SWEEP_ELSEWHERE = """
import os, sys
from pmap import _transfer
print(os.path.exists(f"/proc/{sys.argv[1]}/cmdline"), _transfer.sweep())
"""


def sweep_in_another_pid_namespace(owner_pid: int) -> bool:
    """Sweep from a new PID namespace that shares /dev/shm; returns whether `owner_pid` names a
    process there (it should not: the owner is invisible from there)."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(pmap.__file__)))
    done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", SWEEP_ELSEWHERE,
                           str(owner_pid)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": package_root})
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[0] == "True"


@pytest.mark.timeout(120)
def test_a_live_owner_survives_a_sweep_from_another_pid_namespace(owner):
    refused = _unshare_refused()
    if refused:
        pytest.skip(refused)
    assert not sweep_in_another_pid_namespace(owner.pid)  # there, no process has the owner's pid...
    assert own_entries(owner.pid)  # ...and yet its live segment stays
    killed(owner)
    sweep_in_another_pid_namespace(owner.pid)
    assert own_entries(owner.pid) == []  # a killed owner's segments go, from any namespace


@pytest.mark.parametrize("size", [1_000, 100_000, 900_000])
def test_measuring_counts_a_buffer_the_pickler_writes_in_band_in_one_piece(size):
    """Below the shared-memory threshold an array's buffer stays in the pickle, and from 64 KB
    the pickler hands it to the writer as a PickleBuffer: counted, not an error that would make
    auto call the item unpicklable."""
    array = np.arange(size, dtype=np.uint8)
    in_pipe, in_shared_memory = _transfer.measure(array)
    assert size <= in_pipe < size + 1_000 and in_shared_memory == 0


def test_the_picklability_check_keeps_no_copy_of_a_big_closure():
    data = bytearray(100 * MB)
    tracemalloc.start()
    try:
        assert _picklable(functools.partial(length_plus, data)) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * MB
    assert "lock" in _picklable(functools.partial(length_plus, __import__("threading").Lock()))


@pytest.mark.timeout(60)
def test_a_run_that_mostly_moves_pickled_data_warns_naming_the_cause(monkeypatch):
    monkeypatch.setattr(_transfer, "WARN_MIN_BYTES", 10 * MB)
    monkeypatch.setattr(_transfer, "WARN_BYTES_PER_SECOND", 1e6)
    with pytest.warns(RuntimeWarning, match="mostly the results.*Fix: return numpy arrays"):
        pmap.pmap(big_bytes, range(10), backend="fork", workers=2)
    with pytest.warns(RuntimeWarning, match="mostly the items.*Fix: pass numpy arrays"):
        pmap.pmap(len, [bytes(2 * MB)] * 10, backend="fork", workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # arrays go through shared memory: nothing to warn about
        pmap.pmap(first_value, [np.ones(2 * MB // 8)] * 10, backend="fork", workers=2)


@pytest.mark.timeout(60)
def test_auto_counts_shared_memory_transfer_at_its_low_cost():
    from bigdata import python_loop_over
    arrays = [np.ones(4 * MB // 8)] * 120
    plan = pmap.explain(python_loop_over, arrays)
    assert plan.item_bytes < 1 * MB  # 4 MB in, but through shared memory
    # Counted through a pipe (4 ms per item at 1 GB/s) processes would cost more than serial;
    # whether they beat serial by auto's margin depends on how cold their start is here.
    processes = min(seconds for name, seconds in plan.estimates.items() if name in ("fork", "process"))
    assert processes < plan.estimates["serial"], plan
