"""Timeouts inside chunks: each item of a chunk has its own deadline, from its own start. The
item that overruns fails with TaskTimeout; the items its worker finished before it come back
once, and the items after it run once elsewhere. Executions are counted in a file that every
worker appends to, so "once" is checked, not assumed."""
import os
import time

import pytest

import pmap

CHUNK_BACKENDS = ["thread", "fork", "pool", "process"]
TIMEOUT = 1.0  # long beside a trivial item on a loaded machine (the first item of a task also unpickles it)


class Logged:
    """x * 10, writing `x` to `path` on every call; hangs on the items in `hang` (in steps of
    0.05 s, so a thread that is told to stop notices), or only on their first call when
    `hang_once`."""

    def __init__(self, path, hang=(), hang_once=False, nap=0.0):
        self.path = str(path)
        self.hang = set(hang)
        self.hang_once = hang_once
        self.nap = nap

    def __call__(self, x):
        seen_before = x in runs(self.path)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{x}\n".encode())  # one small O_APPEND write: lines never interleave
        finally:
            os.close(fd)
        if x in self.hang and not (self.hang_once and seen_before):
            for _ in range(72_000):
                time.sleep(0.05)
        if self.nap:
            time.sleep(self.nap)
        return x * 10


def runs(path) -> list:
    """The items run so far, in the order their runs began, one entry per run."""
    try:
        with open(path) as handle:
            return [int(line) for line in handle.read().split()]
    except FileNotFoundError:
        return []


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


async def async_tens(x):
    return x * 10


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["serial", "greenlet", "asyncio"])
def test_backends_without_an_item_clock_take_one_item_per_task(backend, tmp_path):
    if backend == "greenlet":
        pytest.importorskip("gevent", reason="the greenlet backend needs gevent")
    fn = async_tens if backend == "asyncio" else Logged(tmp_path / "runs")
    out = pmap.pmap(fn, range(6), backend=backend, chunksize=3, timeout=30)
    assert list(out) == [x * 10 for x in range(6)]
    assert set(out.stats.chunk_sizes) == {1}
