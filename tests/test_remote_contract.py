"""What the remote backends (manager, dask) owe the engine, tried with real local workers on
loopback: one outcome per item even when a worker cannot rebuild a task's items, and the one
`pmap.InitializerError` every backend gives when an initializer fails."""
import os
import subprocess
import sys
import textwrap

import pytest

import pmap
from faults import initializer_that
from pmap.backends.dask import DaskBackend
from pmap.errors import ItemNotPicklable

HANG_GUARD = 120  # seconds; only catches a hang, never measures speed
HAVE_DASK = DaskBackend.unavailable_reason() is None
REMOTE = ["manager", pytest.param("dask", marks=pytest.mark.skipif(
    not HAVE_DASK, reason="the distributed package is not installed (pmap-parallel[dask])"))]

pytestmark = pytest.mark.timeout(HANG_GUARD * 2)


@pytest.fixture(scope="module")
def dask_client():
    """One small LocalCluster for this module's dask runs, given to pmap as its client."""
    from distributed import Client

    from pmap.backends.dask import local_cluster
    cluster = local_cluster(2)
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


@pytest.fixture
def on_remote(request):
    """pmap.pmap on the backend under test (the test's `backend` parameter), two local workers."""
    backend = request.getfixturevalue("backend")
    options = {"workers": 2}
    if backend == "dask":
        options = {"client": request.getfixturevalue("dask_client")}

    def run(fn, items, **more):
        return pmap.pmap(fn, items, backend=backend, **options, **more)
    return run


# ---- a task whose items a worker cannot rebuild --------------------------------------------------

def _rebuild_only_in(pid, value):
    if os.getpid() != pid:
        raise LookupError(f"item {value} cannot be rebuilt outside the caller")
    return RebuildsOnlyInTheCaller(value)


class RebuildsOnlyInTheCaller:
    """An item that unpickles only in the process that made it, as an instance of a class a
    worker cannot import does."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return (_rebuild_only_in, (os.getpid(), self.value))


def ten_times(x):
    return x * 10


@pytest.mark.parametrize("backend", REMOTE)
@pytest.mark.parametrize("ordered", [True, False])
def test_only_the_item_a_worker_cannot_rebuild_fails_and_the_others_come_back(on_remote, backend, ordered):
    items = [RebuildsOnlyInTheCaller(i) if i == 3 else i for i in range(10)]
    out = on_remote(ten_times, items, chunksize=5, on_error="return", ordered=ordered)
    assert len(out) == 10
    failures = [r for r in out if isinstance(r, pmap.Failure)]
    assert [f.index for f in failures] == [3], out
    assert isinstance(failures[0].exception, ItemNotPicklable)
    assert "cannot be rebuilt outside the caller" in str(failures[0].exception)
    values = [r for r in out if not isinstance(r, pmap.Failure)]
    expected = [i * 10 for i in range(10) if i != 3]
    assert values == expected if ordered else sorted(values) == expected


@pytest.mark.parametrize("backend", REMOTE)
def test_a_task_none_of_whose_items_a_worker_can_rebuild_fails_each_item(on_remote, backend):
    items = [RebuildsOnlyInTheCaller(i) for i in range(6)]
    out = on_remote(ten_times, items, chunksize=3, on_error="skip")
    assert out == [] and out.stats.skipped == 6 and out.stats.failed == 6


MAIN_CLASS_SCRIPT = textwrap.dedent("""
    import sys

    import pmap


    class Thing:  # lives in this script's __main__, which a remote worker does not import
        def __init__(self, x):
            self.x = x


    def doubled(thing):
        assert isinstance(thing, Thing), type(thing)  # the worker's Thing is the one the function names
        return Thing(thing.x * 2)


    if __name__ == "__main__":
        for ordered in (True, False):
            out = pmap.pmap(doubled, [Thing(i) for i in range(10)], backend=sys.argv[1], workers=2,
                            chunksize=5, on_error="return", ordered=ordered)
            assert all(type(t) is Thing for t in out), (ordered, out)
            xs = [t.x for t in out]
            assert (xs if ordered else sorted(xs)) == [2 * i for i in range(10)], (ordered, xs)
        print("ok")
""")


@pytest.mark.parametrize("backend", REMOTE)
def test_items_of_a_class_defined_in_the_callers_main_arrive_as_that_class_and_come_back(tmp_path, backend):
    """The issue's case, as a new user meets it: 10 items of a class of the script, in chunks
    of 5. Items go by value as functions do, so the worker rebuilds them (they used to fail,
    and before that to vanish: 0 results ordered, 2 unordered)."""
    script = tmp_path / "main_class.py"
    script.write_text(MAIN_CLASS_SCRIPT)
    done = subprocess.run([sys.executable, str(script), backend], capture_output=True, text=True,
                          timeout=HANG_GUARD)
    assert done.stdout.strip() == "ok", done.stderr


# ---- an initializer that fails ------------------------------------------------------------------

@pytest.mark.parametrize("backend", REMOTE)
@pytest.mark.parametrize("how", ["raises", "sys.exit"])
def test_failing_initializer_stops_the_run_with_one_initializer_error(on_remote, backend, how):
    with pytest.raises(pmap.InitializerError) as info:
        on_remote(ten_times, range(10), chunksize=5, on_error="return", initializer=initializer_that,
                  initargs=(how,))
    message = str(info.value)
    assert "initializer_that" in message and f"backend {backend!r}" in message and "in worker " in message
    if how == "raises":
        assert "LookupError" in message and isinstance(info.value.__cause__, LookupError)
        assert "could not find its config" in str(info.value.__cause__.__cause__)  # the worker's traceback
    else:
        assert "SystemExit" in message



def _rebuild_error_only_in(pid, text):
    if os.getpid() != pid:
        raise LookupError("this exception cannot be rebuilt outside the worker")
    return RaisedOnlyInTheWorker(text)


class RaisedOnlyInTheWorker(Exception):
    """An exception the caller cannot rebuild, as one of a module only the worker has."""

    def __reduce__(self):
        return (_rebuild_error_only_in, (os.getpid(), str(self)))


def initializer_raising_what_the_caller_cannot_rebuild():
    raise RaisedOnlyInTheWorker("the worker's own error")


@pytest.mark.parametrize("backend", REMOTE)
def test_an_initializer_error_the_caller_cannot_rebuild_is_named_with_its_message(on_remote, backend):
    """Manager and dask send an initializer's exception the same way (`_outcome.SentException`):
    one the caller cannot rebuild still arrives, by its type's name and its message."""
    with pytest.raises(pmap.InitializerError) as info:
        on_remote(ten_times, range(10), chunksize=5, on_error="return",
                  initializer=initializer_raising_what_the_caller_cannot_rebuild)
    cause = info.value.__cause__
    assert isinstance(cause, pmap.UnpicklableError), repr(cause)
    assert "RaisedOnlyInTheWorker: the worker's own error" in str(cause)
    assert "cannot be rebuilt outside the worker" in str(cause)
    assert f"backend {backend!r}" in str(info.value) and "UnpicklableError" in str(info.value)
    assert "initializer_raising_what_the_caller_cannot_rebuild" in str(cause.__cause__)  # the worker's traceback

def test_an_initializer_that_ends_its_manager_worker_stops_the_run_with_one_initializer_error():
    with pytest.raises(pmap.InitializerError) as info:
        pmap.pmap(ten_times, range(10), backend="manager", workers=2, chunksize=5, on_error="return",
                  initializer=initializer_that, initargs=("os._exit",))
    message = str(info.value)
    assert "initializer_that" in message and "'manager'" in message
    assert "exit code 6" in message and "before it could run anything" in message
