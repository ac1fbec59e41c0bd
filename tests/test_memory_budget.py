"""Memory is bounded in bytes: input read ahead stops at `max_ahead_bytes` of items in flight
and results not yet yielded, chunks stop at a byte cap, `.stats.peak_bytes_held` says what was
held, and nothing is lost on the way."""
import functools
import os
import subprocess
import sys
import threading
import time

import pytest

import pmap
from pmap.backends.base import open_backend
from pmap.chunking import MAX_CHUNK, MAX_CHUNK_BYTES, ChunkSizer
from pmap.options import Options

ITEM = 200_000          # bytes of one big item
WAIT_LIMIT = 120.0      # seconds a gated function or a test waits at most, so nothing hangs


def wait_for_gate(gate: str, item) -> int:
    """len(item), once the file `gate` exists."""
    deadline = time.monotonic() + WAIT_LIMIT
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(item)


def first_waits_then_big_result(size: int, gate: str, i: int) -> bytes:
    """Item 0 waits for the gate; every item returns `size` bytes at once otherwise."""
    if i == 0:
        wait_for_gate(gate, b"")
    return bytes([i % 256]) * size


def wait_until(condition, limit: float = WAIT_LIMIT) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.01)


def counted(reads: list, count: int, make):
    for i in range(count):
        reads.append(i)
        yield make(i)


def reads_while_blocked(gate: str, fn, count: int, make, settled: int, backend: str, workers: int,
                        max_ahead_bytes) -> tuple[int, list, object]:
    """Start an imap whose items wait for the file `gate`, read by another thread; once `settled`
    items were read and a moment passed (time to read more, if it would), count the reads; then
    open the gate and finish. The workers start first, so none is forked beside that thread."""
    reads: list = []
    out: list = []
    opened = open_backend(backend, workers)
    try:
        results = pmap.imap(functools.partial(fn, gate), counted(reads, count, make), backend=opened,
                            max_ahead_bytes=max_ahead_bytes)
        consumer = threading.Thread(target=lambda: out.extend(results))
        consumer.start()
        seen = _count_when_settled(reads, settled, gate, consumer)
    finally:
        opened.close()
    return seen, out, results.stats


def _count_when_settled(reads: list, settled: int, gate: str, consumer: threading.Thread) -> int:
    try:
        wait_until(lambda: len(reads) >= settled)
        time.sleep(0.5)
        seen = len(reads)
    finally:
        open(gate, "w").close()
        consumer.join(WAIT_LIMIT)
    assert not consumer.is_alive()
    return seen


@pytest.mark.parametrize("backend", ["thread", "fork", "process"])
def test_reading_ahead_stops_at_the_byte_budget_not_at_the_backends_room(backend, tmp_path):
    def make(i):
        return bytes([i]) * ITEM

    # 4 workers take 8 one-item tasks; 500 KB of 200 KB items allows the third, then no more.
    seen, out, stats = reads_while_blocked(str(tmp_path / "gate"), wait_for_gate, 40, make, settled=3, backend=backend,
                                           workers=4, max_ahead_bytes=500_000)
    assert seen == 3
    assert out == [ITEM] * 40
    assert 3 * ITEM <= stats.peak_bytes_held < 3 * ITEM + 1000
    # the same run with room to spare fills the backend's eight places
    seen, out, _ = reads_while_blocked(str(tmp_path / "gate2"), wait_for_gate, 40, make, settled=8, backend=backend,
                                       workers=4, max_ahead_bytes="1GB")
    assert seen == 8
    assert out == [ITEM] * 40


def test_results_waiting_for_an_earlier_item_count_against_the_budget(tmp_path):
    size, budget = 300_000, 1_000_000
    fn = functools.partial(first_waits_then_big_result, size)
    seen, out, stats = reads_while_blocked(str(tmp_path / "gate"), fn, 200, int, settled=5, backend="thread", workers=2,
                                           max_ahead_bytes=budget)
    # item 0 waits; four results (1.2 MB) fill the budget; at most the backend's four places more
    assert seen <= 1 + 4 + 4
    assert out == [bytes([i % 256]) * size for i in range(200)]
    assert budget <= stats.peak_bytes_held <= budget + 4 * (size + 100)
    seen, _, stats = reads_while_blocked(str(tmp_path / "gate2"), fn, 200, int, settled=30, backend="thread", workers=2,
                                         max_ahead_bytes="1GB")
    assert seen >= 30 and stats.peak_bytes_held > 30 * size


@pytest.mark.filterwarnings("ignore:pmap. this run pickled")  # moving bytes is the point here
@pytest.mark.parametrize("backend", ["thread", "fork"])
def test_chunks_grow_until_their_bytes_reach_the_cap(backend):
    size = 64_000
    items = (bytes([i % 256]) * size for i in range(3000))  # a generator: no known length caps the chunks
    out = pmap.pmap(len, items, backend=backend, workers=2)
    assert out == [size] * 3000
    biggest = max(out.stats.chunk_sizes)
    assert 16 < biggest <= MAX_CHUNK_BYTES // size


def test_the_chunk_cap_follows_the_mean_bytes_of_items_and_results():
    sizer = ChunkSizer(None, workers=2, total=None, max_bytes=1_000_000)
    for _ in range(10):
        n = sizer.size()
        sizer.observe(n, 0.0, nbytes=n * 100_000)  # free items of 100 KB: only the bytes bound them
    assert sizer.size() == 10
    small = ChunkSizer(None, workers=2, total=None, max_bytes=1_000_000)
    for _ in range(12):
        n = small.size()
        small.observe(n, 0.0, nbytes=n * 8)
    assert small.size() == MAX_CHUNK  # small items are not held back
    probed = ChunkSizer(None, workers=2, total=None, max_bytes=1_000_000)
    probed.observe(1000, 0.0)  # auto's probe measured time only: it does not dilute the mean size
    probed.observe(4, 0.0, nbytes=4 * 250_000)
    assert probed.size() == 4


def test_a_smaller_budget_makes_smaller_chunks_so_every_worker_still_has_work():
    items = (bytes(10_000) for _ in range(2000))
    out = pmap.pmap(len, items, backend="thread", workers=2, max_ahead_bytes="400KB")
    assert out == [10_000] * 2000
    # 400 KB shared by 2 workers x 4 chunks ahead: chunks of 50 KB, five 10 KB items
    assert max(out.stats.chunk_sizes) <= 5
    assert out.stats.peak_bytes_held <= 400_000 + 5 * 10_100


def test_an_item_bigger_than_the_budget_still_runs_one_task_at_a_time():
    items = [bytes([i]) * 100_000 for i in range(12)]
    out = pmap.pmap(len, items, backend="fork", workers=2, max_ahead_bytes=1)
    assert out == [100_000] * 12
    assert out.stats.chunk_sizes == [1] * 12
    assert 100_000 <= out.stats.peak_bytes_held < 101_000  # one task in flight at a time


@pytest.mark.parametrize("ordered", [True, False])
def test_nothing_is_lost_when_items_fail_under_a_tight_budget(ordered):
    items = (bytes([i % 256]) * 50_000 for i in range(300))
    out = pmap.pmap(_fails_on_sevens, items, backend="fork", workers=2, ordered=ordered,
                    on_error="return", max_ahead_bytes="300KB")
    failures = [r for r in out if isinstance(r, pmap.Failure)]
    assert sorted(f.index for f in failures) == [i for i in range(300) if i % 256 % 7 == 0]
    values = [r for r in out if not isinstance(r, pmap.Failure)]
    expected = [i % 256 for i in range(300) if i % 256 % 7]
    assert (values if ordered else sorted(values)) == (expected if ordered else sorted(expected))
    assert out.stats.items_done == 300 and out.stats.failed == len(failures)


def _fails_on_sevens(data: bytes) -> int:
    if data[0] % 7 == 0:
        raise ValueError(data[0])
    return data[0]


def test_peak_bytes_held_is_reported():
    out = pmap.pmap(len, [bytes(1000)] * 100, backend="serial")
    assert out.stats.peak_bytes_held >= 1000
    assert "peak" in str(out.stats) and "held" in str(out.stats)


@pytest.mark.parametrize("given, expected", [
    (4096, 4096), ("4096", 4096), ("256MB", 256_000_000), ("64 KiB", 65_536), ("1.5GiB", 3 * 2**29),
    ("2gb", 2_000_000_000), ("64MiB", 64 * 2**20)])
def test_the_budget_is_bytes_or_a_size(given, expected):
    assert Options(max_ahead_bytes=given).max_ahead_bytes == expected


@pytest.mark.parametrize("given, error, words", [
    (0, ValueError, "max_ahead_bytes must be at least 1 byte, got 0"),
    (-5, ValueError, "at least 1 byte"),
    ("0.1B", ValueError, "at least 1 byte, got '0.1B'"),
    ("12 parsecs", ValueError, "max_ahead_bytes must be a number of bytes or a size such as '256MB'"),
    ("MB", ValueError, "got 'MB'"),
    ("", ValueError, "got ''"),
    (1.5, TypeError, "max_ahead_bytes must be an integer number of bytes or a size such as '256MB', not float"),
    (True, TypeError, "not bool"),
    (None, TypeError, "not NoneType")])
def test_a_bad_budget_is_refused_before_any_work(given, error, words):
    calls = []
    with pytest.raises(error, match=words.replace("(", r"\(").replace(".", r"\.")):
        pmap.pmap(calls.append, [1, 2], backend="serial", max_ahead_bytes=given)
    assert calls == []


def test_the_command_line_takes_a_budget_and_refuses_a_bad_one_in_one_line():
    command = [sys.executable, "-m", "pmap", "run", "--backend", "thread", "--range", "5"]
    ok = subprocess.run(command + ["--max-ahead-bytes", "1MB", "builtins:abs"], capture_output=True, text=True,
                        timeout=WAIT_LIMIT)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split() == ["0", "1", "2", "3", "4"]
    bad = subprocess.run(command + ["--max-ahead-bytes", "lots", "builtins:abs"], capture_output=True, text=True,
                         timeout=WAIT_LIMIT)
    assert bad.returncode != 0 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "--max-ahead-bytes must be a number of bytes" in bad.stderr


def _hangs_on_five(data: bytes) -> int:
    if data[0] == 5:
        time.sleep(WAIT_LIMIT)
    return len(data)


def test_nothing_is_lost_when_a_task_stops_at_a_deadline_under_a_tight_budget():
    items = (bytes([i]) * 50_000 for i in range(60))
    out = pmap.pmap(_hangs_on_five, items, backend="fork", workers=2, timeout=5.0, on_error="return",
                    max_ahead_bytes="300KB")
    assert isinstance(out[5], pmap.Failure) and out[5].kind == "timeout"
    assert out[:5] + out[6:] == [50_000] * 59
    assert out.stats.peak_bytes_held <= 300_000 + 2 * 50_100
