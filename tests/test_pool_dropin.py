"""pmap.Pool as a drop-in for multiprocessing.Pool, keeping pmap's guarantees. (CPython's own
_TestPool runs against it in test_stdlib_conformance.py.)"""
import multiprocessing

import pytest

import pmap
from faults import hang_on_seven, segfault_on_three
from workloads import add, fail_on_three, pid_of, square

PROCESS_LIKE = ("process", "pool", "fork")
HANG = 60


def test_the_positional_signature_is_multiprocessing_s():
    with pmap.Pool(2, None, (), None, backend="thread") as pool:
        assert pool.workers == 2
        assert pool.apply(add, (2, 3)) == 5
        assert pool.apply(add, (), {"a": 1, "b": 2}) == 3
    with pytest.raises(ValueError, match="Number of processes must be at least 1"):
        pmap.Pool(0)
    with pytest.raises(ValueError, match="Number of processes must be at least 1"):
        pmap.Pool(-1)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        pmap.Pool(1, 3)
    with pytest.raises(ValueError, match="maxtasksperchild must be a positive int"):
        pmap.Pool(1, maxtasksperchild=0)
    with pytest.raises(TypeError, match="processes or workers"):
        pmap.Pool(2, workers=2)


def test_async_results_callbacks_and_timeouts():
    seen = []
    with pmap.Pool(2, backend="thread") as pool:
        result = pool.apply_async(hang_on_seven, (1,), callback=seen.append)
        assert result.get(timeout=HANG) == 10
        assert seen == [10]  # the callback ran before get() returned, as in multiprocessing
        assert result.ready() and result.successful()
        failed = pool.apply_async(fail_on_three, (3,), error_callback=seen.append)
        failed.wait(HANG)
        assert not failed.successful() and isinstance(seen[-1], ValueError)
        with pytest.raises(ValueError, match="three"):
            failed.get()
        mapped = pool.map_async(square, range(5), callback=seen.append)
        assert mapped.get(HANG) == [0, 1, 4, 9, 16] and seen[-1] == [0, 1, 4, 9, 16]
        assert pool.starmap_async(add, [(1, 2), (3, 4)]).get(HANG) == [3, 7]
        assert sorted(pool.imap_unordered(square, range(4), 2)) == [0, 1, 4, 9]


@pytest.mark.timeout(HANG)
def test_get_with_a_timeout_raises_multiprocessing_timeout_error():
    with pmap.Pool(1, backend="fork") as pool:
        stuck = pool.apply_async(hang_on_seven, (7,))
        with pytest.raises(multiprocessing.TimeoutError):
            stuck.get(timeout=0.2)
        assert not stuck.ready()
        with pytest.raises(ValueError, match="not ready"):
            stuck.successful()


@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends(*PROCESS_LIKE)
def test_a_segfault_fails_only_its_result_and_the_pool_goes_on(pmap_backend):
    with pmap.Pool(2, backend=pmap_backend) as pool:
        results = [pool.apply_async(segfault_on_three, (x,)) for x in range(8)]
        with pytest.raises(pmap.WorkerCrashed):
            results[3].get(HANG)
        assert [r.get(HANG) for i, r in enumerate(results) if i != 3] == [x * 10 for x in range(8) if x != 3]
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]
        with pytest.raises(pmap.WorkerCrashed):  # in a map, the crash is the map's error
            pool.map(segfault_on_three, range(5))
        assert pool.apply(square, (9,)) == 81


@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends(*PROCESS_LIKE)
def test_a_hung_call_times_out_alone(pmap_backend):
    with pmap.Pool(2, backend=pmap_backend, timeout=1.0, on_error="return") as pool:
        out = pool.map(hang_on_seven, range(9))
    assert [x for i, x in enumerate(out) if i != 7] == [x * 10 for x in range(9) if x != 7]
    assert out[7].kind == "timeout" and isinstance(out[7].exception, pmap.TaskTimeout)


@pytest.mark.timeout(HANG)
@pytest.mark.pmap_backends(*PROCESS_LIKE)
def test_maxtasksperchild_replaces_workers(pmap_backend):
    with pmap.Pool(1, maxtasksperchild=2, backend=pmap_backend) as pool:
        pids = [pool.apply(pid_of, (x,)) for x in range(6)]
    assert len(set(pids)) >= 3, pids


def test_maxtasksperchild_is_refused_where_workers_are_not_processes():
    with pytest.raises(TypeError, match="maxtasksperchild needs workers that are processes.*'thread'"):
        pmap.Pool(1, maxtasksperchild=2, backend="thread")


def test_close_join_and_terminate():
    pool = pmap.Pool(2, backend="fork")
    results = [pool.apply_async(square, (x,)) for x in range(20)]
    with pytest.raises(ValueError, match="still running"):
        pool.join()
    pool.close()
    with pytest.raises(ValueError, match="not running"):
        pool.apply_async(square, (1,))
    pool.join()  # the queued calls finish first
    assert [r.get(0) for r in results] == [x * x for x in range(20)]
    pool = pmap.Pool(1, backend="fork")
    stuck = pool.apply_async(hang_on_seven, (7,))
    pool.terminate()
    pool.join()
    with pytest.raises(Exception, match="terminated"):
        stuck.get(HANG)  # multiprocessing would leave it pending for ever
