"""Timeouts inside chunks: each item of a chunk has its own deadline, from its own start. The
item that overruns fails with TaskTimeout; the items its worker finished before it come back
once, and the items after it run once elsewhere. Executions are counted in a file that every
worker appends to, so "once" is checked, not assumed."""
import pytest

import pmap
import chunk_helpers
from chunk_helpers import HoldsTheGil, Logged, runs

CHUNK_BACKENDS = ["thread", "fork", "pool", "process"]
TIMEOUT = 1.5  # long beside a trivial item on a loaded machine (the first item of a task also unpickles it)


def run_chunk(backend, fn, n=7, **options):
    options = {"backend": backend, "workers": 2, "chunksize": n, "timeout": TIMEOUT, "on_error": "return",
               **options}
    return pmap.pmap(fn, range(n), **options)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", CHUNK_BACKENDS)
@pytest.mark.parametrize("hung", [3, 0, 6], ids=["middle", "first", "last"])
def test_the_hung_item_fails_and_every_other_item_runs_once(backend, hung, tmp_path):
    log = tmp_path / "runs"
    out = run_chunk(backend, Logged(log, hang={hung}))
    assert out.stats.chunk_sizes[0] == 7  # the timeout did not cut the work into one-item tasks
    for x in range(7):
        if x == hung:
            assert isinstance(out[x], pmap.Failure) and out[x].kind == "timeout", out[x]
            assert isinstance(out[x].exception, pmap.TaskTimeout) and out[x].index == hung
        else:
            assert out[x] == x * 10
    counts = {x: runs(log).count(x) for x in range(7)}
    assert counts == {x: 1 for x in range(7)}, counts
    assert out.stats.timed_out == 1 and out.stats.failed == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", CHUNK_BACKENDS)
def test_a_timed_out_item_is_retried_alone_and_the_others_still_run_once(backend, tmp_path):
    log = tmp_path / "runs"
    out = run_chunk(backend, Logged(log, hang={3}), retries=1)
    assert out[3].kind == "timeout" and out[3].attempts == 2
    assert [out[x] for x in range(7) if x != 3] == [x * 10 for x in range(7) if x != 3]
    counts = {x: runs(log).count(x) for x in range(7)}
    assert counts == {0: 1, 1: 1, 2: 1, 3: 2, 4: 1, 5: 1, 6: 1}, counts
    assert out.stats.retried == 1 and out.stats.timed_out == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", CHUNK_BACKENDS)
def test_a_retry_that_succeeds_fills_the_slot(backend, tmp_path):
    log = tmp_path / "runs"
    out = run_chunk(backend, Logged(log, hang={2}, hang_once=True), retries=1)
    assert list(out) == [x * 10 for x in range(7)]
    counts = {x: runs(log).count(x) for x in range(7)}
    assert counts == {0: 1, 1: 1, 2: 2, 3: 1, 4: 1, 5: 1, 6: 1}, counts
    assert out.stats.retried == 1 and out.stats.timed_out == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", CHUNK_BACKENDS)
def test_the_deadline_is_per_item_not_per_chunk(backend, tmp_path):
    # eight items of a quarter of the timeout each: the chunk takes twice the timeout, no item
    # more than a quarter of it
    log = tmp_path / "runs"
    out = run_chunk(backend, Logged(log, nap=TIMEOUT / 4), n=8, workers=1)
    assert list(out) == [x * 10 for x in range(8)]
    assert out.stats.chunk_sizes == [8] and out.stats.timed_out == 0
    assert sorted(runs(log)) == list(range(8))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["thread", "fork"])
def test_two_hung_items_in_one_chunk(backend, tmp_path):
    # the rest of the chunk after the first hang is a chunk of its own, with its own hang
    log = tmp_path / "runs"
    out = run_chunk(backend, Logged(log, hang={1, 4}), n=7)
    assert [out[x].kind for x in (1, 4)] == ["timeout", "timeout"]
    assert [out[x] for x in (0, 2, 3, 5, 6)] == [0, 20, 30, 50, 60]
    assert sorted(runs(log)) == list(range(7))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["serial", "greenlet", "asyncio"])
def test_backends_without_an_item_clock_take_one_item_per_task(backend, tmp_path):
    if backend == "greenlet":
        pytest.importorskip("gevent", reason="the greenlet backend needs gevent")
    fn = chunk_helpers.async_tens if backend == "asyncio" else Logged(tmp_path / "runs")
    out = pmap.pmap(fn, range(6), backend=backend, chunksize=3, timeout=30)
    assert list(out) == [x * 10 for x in range(6)]
    assert set(out.stats.chunk_sizes) == {1}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["fork", "pool"])
def test_a_worker_that_cannot_answer_is_killed_and_its_items_run_again(backend, tmp_path):
    # the stop request cannot run in a worker whose main thread holds the GIL in C: after the
    # grace it is killed, the hung item fails, and the items it had finished run again
    log = tmp_path / "runs"
    out = run_chunk(backend, HoldsTheGil(log, stuck=3))
    assert out[3].kind == "timeout"
    assert [out[x] for x in range(7) if x != 3] == [x * 10 for x in range(7) if x != 3]
    counts = {x: runs(log).count(x) for x in range(7)}
    assert counts[3] == 1 and all(counts[x] == 2 for x in (0, 1, 2)) and all(counts[x] == 1 for x in (4, 5, 6)), counts


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["thread", "fork"])
def test_unordered_results_of_a_stopped_chunk(backend, tmp_path):
    log = tmp_path / "runs"
    out = list(pmap.imap(Logged(log, hang={2}), range(7), backend=backend, workers=2, chunksize=7,
                         timeout=TIMEOUT, on_error="skip", ordered=False))
    assert sorted(out) == [x * 10 for x in range(7) if x != 2]
    assert sorted(runs(log)) == list(range(7))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["thread", "fork"])
def test_a_seeded_chunk_is_stopped_and_rerun_with_its_own_items(backend, tmp_path):
    # a seeded task carries its items with their indices; the rest of a stopped chunk goes again as items
    log = tmp_path / "runs"
    out = run_chunk(backend, Logged(log, hang={3}), seed=7)
    assert out[3].kind == "timeout" and out[3].item == 3
    assert [out[x] for x in range(7) if x != 3] == [x * 10 for x in range(7) if x != 3]
    assert sorted(runs(log)) == list(range(7))
