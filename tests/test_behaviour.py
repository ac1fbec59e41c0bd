"""DESIGN section 1, held against every backend through the pmap_backend fixture."""
import asyncio
import itertools
import os
import pickle
import threading
import time

import pytest

import pmap
from pmap.comparison import default_backend_names as every_local_backend
from workloads import (add, async_twin, fail_on_three, for_backend, identity, length, make_big, pause,
                       raise_unpicklable, read_init_value, return_lock, set_init_value, slow_identity,
                       square)

# every local backend, asyncio too (the fixture leaves it out by default): `work` gives it async twins
pytestmark = pytest.mark.pmap_backends(*every_local_backend())


@pytest.fixture
def work(pmap_backend):
    """A workload as the backend under test runs it: on asyncio, its async twin."""
    return lambda fn: for_backend(fn, pmap_backend)


def test_equals_builtin_map_on_ints(pmap_backend, work):
    items = list(range(257))
    assert pmap.pmap(work(square), items, backend=pmap_backend) == list(map(square, items))


@pytest.mark.parametrize("items", [["a", "bb", "", "ccc"], [None, None, 1], [(1, 2), {"k": [3]}, 4.5]],
                         ids=["strings", "none", "mixed"])
def test_equals_builtin_map_on_objects(pmap_backend, work, items):
    assert pmap.pmap(work(identity), items, backend=pmap_backend) == items


def test_large_objects_both_ways(pmap_backend, work):
    sizes = [3_000_000, 5_000_000, 4_000_000]
    blobs = pmap.pmap(work(make_big), sizes, backend=pmap_backend)
    assert [len(b) for b in blobs] == sizes
    assert pmap.pmap(work(length), blobs, backend=pmap_backend) == sizes


def test_unordered_yields_every_result_once(pmap_backend, work):
    items = list(range(60))
    out = pmap.pmap(work(slow_identity), items, backend=pmap_backend, ordered=False)
    assert sorted(out) == items


def test_unordered_yields_in_completion_order(pmap_backend, work, tmp_path):
    if pmap_backend == "serial":
        pytest.skip("serial runs items in input order: completion order is input order")
    # The first item ends only once the caller has a result (or after a bound no run nears):
    # with more than one worker it cannot come out first, however slowly the second one starts.
    caller_has_one = str(tmp_path / "caller-has-one")
    items = [(i, caller_has_one) for i in range(7)]
    out = []
    for value in pmap.imap(work(first_waits_for_the_caller), items, backend=pmap_backend,
                           ordered=False, workers=2, chunksize=1):
        out.append(value)
        open(caller_has_one, "w").close()
    assert sorted(out) == list(range(len(items)))
    assert out[0] != 0


FIRST_ITEM_PATIENCE = 60.0  # seconds; only ends a run whose other items never ran


def first_waits_for_the_caller(pair):
    index, caller_has_one = pair
    give_up = time.monotonic() + FIRST_ITEM_PATIENCE
    while index == 0 and not os.path.exists(caller_has_one) and time.monotonic() < give_up:
        pause(0.01)
    return index


@async_twin(first_waits_for_the_caller)
async def first_waits_for_the_caller_async(pair):
    index, caller_has_one = pair
    give_up = time.monotonic() + FIRST_ITEM_PATIENCE
    while index == 0 and not os.path.exists(caller_has_one) and time.monotonic() < give_up:
        await asyncio.sleep(0.01)
    return index


def test_empty_input(pmap_backend, work):
    assert pmap.pmap(work(square), [], backend=pmap_backend) == []
    assert list(pmap.imap(work(square), iter(()), backend=pmap_backend)) == []


def test_generator_without_len(pmap_backend, work):
    gen = (i for i in range(100))
    assert pmap.pmap(work(square), gen, backend=pmap_backend) == [i * i for i in range(100)]


def test_infinite_generator_through_imap(pmap_backend, work):
    results = pmap.imap(work(square), itertools.count(), backend=pmap_backend)
    taken = list(itertools.islice(results, 500))
    results.close()
    assert taken == [i * i for i in range(500)]


def failing_source(fail_at):
    for i in range(10):
        if i == fail_at:
            raise KeyError(f"source broke at {i}")
        yield i


@pytest.mark.parametrize("fail_at", [0, 6])
def test_input_iterable_error_comes_after_earlier_results(pmap_backend, work, fail_at):
    got = []
    with pytest.raises(KeyError, match="source broke"):
        for value in pmap.imap(work(square), failing_source(fail_at), backend=pmap_backend):
            got.append(value)
    assert got == [i * i for i in range(fail_at)]


def test_function_error_keeps_type_traceback_and_note(pmap_backend, work):
    with pytest.raises(ValueError, match="three is not allowed") as info:
        pmap.pmap(work(fail_on_three), range(8), backend=pmap_backend)
    err = info.value
    assert isinstance(err.__cause__, pmap.RemoteTraceback)
    assert 'raise ValueError(f"three is not allowed: {x}")' in err.__cause__.tb_text
    notes = "\n".join(getattr(err, "__notes__", []))
    assert "item 3" in notes and pmap_backend in notes


def test_on_error_return_puts_failure_in_its_slot(pmap_backend, work):
    out = pmap.pmap(work(fail_on_three), range(6), backend=pmap_backend, on_error="return")
    assert out[:3] == [0, 1, 2] and out[4:] == [4, 5]
    failure = out[3]
    assert isinstance(failure, pmap.Failure)
    assert (failure.index, failure.item, failure.kind) == (3, 3, "error")
    assert isinstance(failure.exception, ValueError)
    assert "three is not allowed" in failure.traceback


def test_on_error_skip_leaves_failures_out_and_counts_them(pmap_backend, work):
    out = pmap.pmap(work(fail_on_three), range(6), backend=pmap_backend, on_error="skip")
    assert out == [0, 1, 2, 4, 5]
    assert out.stats.skipped == 1 and out.stats.failed == 1


def test_lambda_and_closure(pmap_backend, work):
    offset = 7
    assert pmap.pmap(work(lambda x: x + offset), range(20), backend=pmap_backend) == [x + 7 for x in range(20)]

    def make_scaler(k):
        return lambda x: x * k

    assert pmap.pmap(work(make_scaler(3)), range(5), backend=pmap_backend) == [0, 3, 6, 9, 12]


def test_starmap(pmap_backend, work):
    pairs = [(i, 10 * i) for i in range(30)]
    assert pmap.starmap(work(add), pairs, backend=pmap_backend) == [a + b for a, b in pairs]


@pytest.mark.pmap_backends(*[name for name in every_local_backend() if name != "asyncio"])  # plain calls only
def test_pool_reused_for_three_calls(pmap_backend, work):
    with pmap.Pool(backend=pmap_backend, workers=2) as pool:
        assert pool.map(work(square), range(10)) == [i * i for i in range(10)]
        assert list(pool.imap(work(identity), "abc")) == ["a", "b", "c"]
        assert sorted(pool.imap_unordered(work(square), range(5))) == [0, 1, 4, 9, 16]
        assert pool.starmap(work(add), [(1, 2), (3, 4)]) == [3, 7]
    with pytest.raises(ValueError, match="Pool not running"):  # multiprocessing's words
        pool.map(work(square), [1])


def test_workers_one(pmap_backend, work):
    assert pmap.pmap(work(square), range(15), backend=pmap_backend, workers=1) == [i * i for i in range(15)]


def test_explicit_chunksize_is_honoured(pmap_backend, work):
    out = pmap.pmap(work(square), range(100), backend=pmap_backend, chunksize=7)
    assert out == [i * i for i in range(100)]
    assert set(out.stats.chunk_sizes) == {7, 100 % 7}


def test_progress_callback_counts_items(pmap_backend, work):
    seen = []
    out = pmap.pmap(work(square), range(40), backend=pmap_backend, progress=lambda done, total: seen.append((done, total)))
    assert len(out) == 40
    assert seen[-1] == (40, 40)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_initializer_runs_in_every_worker(pmap_backend, work):
    out = pmap.pmap(work(read_init_value), range(6), backend=pmap_backend, initializer=set_init_value,
                    initargs=("ready",))
    assert out == ["ready"] * 6


def test_unpicklable_result_is_a_clear_error_not_a_hang(pmap_backend, work):
    out = pmap.pmap(work(return_lock), range(3), backend=pmap_backend, on_error="return")
    if pmap_backend in ("serial", "thread", "greenlet", "asyncio"):
        assert all(type(r).__name__ == "lock" for r in out)  # nothing is pickled in-process
    else:
        assert all(isinstance(r, pmap.Failure) and "cannot be pickled" in str(r.exception) for r in out)


def test_unpicklable_item_fails_alone(pmap_backend, work):
    items = [1, threading.Lock(), 3]
    out = pmap.pmap(work(identity), items, backend=pmap_backend, on_error="return")
    assert out[0] == 1 and out[2] == 3
    if pmap_backend in ("serial", "thread", "greenlet", "asyncio"):
        assert out[1] is items[1]
    else:
        assert isinstance(out[1], pmap.Failure) and isinstance(out[1].exception, TypeError)


def test_unpicklable_exception_is_reported_by_name(pmap_backend, work):
    out = pmap.pmap(work(raise_unpicklable), [0], backend=pmap_backend, on_error="return")
    assert isinstance(out[0], pmap.Failure)
    assert "unpicklable failure" in str(out[0].exception)


def test_results_are_picklable_lists(pmap_backend, work):
    out = pmap.pmap(work(square), range(5), backend=pmap_backend)
    assert pickle.loads(pickle.dumps(list(out))) == [0, 1, 4, 9, 16]
    assert isinstance(out, list)


def test_stats_describe_the_run(pmap_backend, work):
    out = pmap.pmap(work(square), range(300), backend=pmap_backend)
    stats = out.stats
    assert stats.backend == pmap_backend and stats.items_done == 300
    assert stats.tasks >= 1 and sum(stats.chunk_sizes) == 300
    assert stats.wall_seconds > 0 and 0 <= stats.utilisation
    assert sum(stats.busy_by_worker.values()) == pytest.approx(stats.busy_seconds)
    assert stats.first_result_seconds is not None and stats.first_result_seconds <= stats.wall_seconds
    if stats.bytes_sent is not None:
        assert stats.bytes_sent > 0 and stats.bytes_received > 0
    text = str(stats)
    assert "300 items" in text and pmap_backend in text


class CountingSource:
    """An endless input that counts how many items were taken from it."""

    def __init__(self):
        self.pulled = 0

    def __iter__(self):
        while True:
            self.pulled += 1
            yield self.pulled - 1


READ_AHEAD_BOUND = 64  # with workers=2 and chunksize=1: 2 workers x 4 chunks ahead, and slack


def read_ahead_bound(backend: str) -> int:
    """What a run with workers=2 and chunksize=1 may read ahead of what it yielded. dask keeps
    a window of short tasks in flight per worker thread to hide the scheduler's round trip,
    and reads up to twice that window ahead."""
    if backend == "dask":
        from pmap.backends.dask import SHORT_TASKS_PER_THREAD
        return max(READ_AHEAD_BOUND, 2 * 2 * SHORT_TASKS_PER_THREAD)
    return READ_AHEAD_BOUND


def test_imap_reads_input_lazily_and_boundedly(pmap_backend, work):
    source = CountingSource()
    results = pmap.imap(work(square), source, backend=pmap_backend, workers=2, chunksize=1)
    taken = [next(results) for _ in range(10)]
    assert taken == [x * x for x in range(10)]
    assert source.pulled <= 10 + read_ahead_bound(pmap_backend)
    results.close()


def slow_first(x):
    pause(0.5 if x == 0 else 0)
    return x


def test_unread_results_are_bounded_behind_a_slow_item(pmap_backend, work):
    source = CountingSource()
    with pmap.imap(work(slow_first), source, backend=pmap_backend, workers=2, chunksize=1) as results:
        assert next(results) == 0
        # while item 0 was slow, later items finished but could not be yielded yet:
        # dispatch must have stopped instead of piling up unread results
        assert source.pulled <= 1 + read_ahead_bound(pmap_backend)
