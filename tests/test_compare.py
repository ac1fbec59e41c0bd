"""pmap.compare and the pytest plugin's assert_backends_agree: same results on every backend,
timed against serial, and a clear message naming the backend and index when they differ."""
import math
import os
import statistics
import threading

import pytest

import pmap
from pmap.backends.base import Backend
from pmap.comparison import Comparison, ResultsDiffer, default_backend_names, format_seconds, same
from pmap.pytest_plugin import assert_backends_agree
from workloads import fail_on_three, square

PARENT_PID = os.getpid()

# Earlier tests leave loky's threads running in this process; fork's warning about forking a
# threaded process is right, but not what these tests are about.
pytestmark = pytest.mark.filterwarnings("ignore:pmap. the fork backend is forking:RuntimeWarning")


def negated_in_workers(x):
    """x in the calling process, -x in a worker process: results differ from index 1 on."""
    return x if os.getpid() == PARENT_PID else -x


def fails_in_workers(x):
    if os.getpid() != PARENT_PID:
        raise RuntimeError("only runs in the caller")
    return x


def fails_in_main_thread(x):
    if threading.current_thread() is threading.main_thread():
        raise RuntimeError("not in the main thread, please")
    return x


def listed(x):
    return [x, {"x": x}]


def serial_misses_nothing_but_workers_drop_seven(x):
    return 8 if x == 7 and os.getpid() != PARENT_PID else x


async def async_square(x):
    return x * x


def test_agreeing_backends_give_a_row_each_with_time_speedup_and_stats():
    result = pmap.compare(square, range(40), ["thread", "fork"], workers=2)
    assert isinstance(result, Comparison)
    assert [row.backend for row in result] == ["serial", "thread", "fork"]
    assert [row.status for row in result] == ["reference", "agree", "agree"]
    assert result.ok and result.mismatches == []
    assert result["serial"].speedup == pytest.approx(1.0)
    for row in result:
        assert row.seconds > 0 and row.speedup > 0
        assert row.stats.backend == row.backend
        assert row.stats.items_done == 40
    assert result["thread"].workers == 2
    assert result["thread"].overhead_per_item is not None
    assert result["serial"].overhead_per_item is None


def test_serial_is_always_first_and_names_are_not_repeated():
    result = pmap.compare(square, [1, 2], ["thread", "serial", "thread"])
    assert [row.backend for row in result] == ["serial", "thread"]


def test_repeat_keeps_every_time_and_shows_the_median():
    result = pmap.compare(square, range(10), ["thread"], repeat=3)
    for row in result:
        assert len(row.runs) == 3
        assert row.seconds == statistics.median(row.runs)


def test_table_is_aligned_and_names_every_backend():
    result = pmap.compare(square, range(10), ["thread", "fork"])
    lines = str(result).splitlines()
    assert lines[0] == "10 items, ordered, 1 run per backend"
    header = lines[1]
    assert header.split() == ["backend", "workers", "time", "speedup", "overhead/item", "utilisation", "results"]
    results_column = header.index("results")
    speedup_end = header.index("speedup") + len("speedup")
    for line, name in zip(lines[2:], ["serial", "thread", "fork"]):
        assert line.startswith(name)
        assert line[results_column:] in ("reference", "agree")
        assert line[speedup_end - 1] == "x"  # numbers are right-aligned under their header


def test_disagreement_raises_naming_the_backend_and_the_first_differing_index():
    with pytest.raises(ResultsDiffer) as caught:
        pmap.compare(negated_in_workers, range(6), ["thread", "fork"])
    message = str(caught.value)
    assert "fork: first difference at index 1: -1 where serial has 1" in message
    assert "thread:" not in message.splitlines()[0]
    assert isinstance(caught.value, AssertionError)
    comparison = caught.value.comparison
    assert comparison["thread"].agrees is True and comparison["fork"].agrees is False


def test_check_false_reports_instead_of_raising():
    result = pmap.compare(negated_in_workers, range(6), ["thread", "fork"], check=False)
    assert not result.ok
    assert [row.backend for row in result.mismatches] == ["fork"]
    assert "differ: first difference at index 1" in str(result)
    with pytest.raises(ResultsDiffer, match="fork"):
        result.check()


def test_a_different_number_of_results_is_a_difference():
    result = pmap.compare(square, range(5), ["thread"], check=False, on_error="skip")
    assert result.ok  # same skips everywhere: agree
    result = pmap.compare(fails_in_workers, range(5), ["fork"], check=False, on_error="skip")
    assert result["fork"].status == "differ"
    assert "0 results where serial has 5" in result["fork"].detail


def test_a_backend_that_raises_is_a_mismatch_with_its_error():
    with pytest.raises(ResultsDiffer, match=r"fork: RuntimeError: only runs in the caller") as caught:
        pmap.compare(fails_in_workers, range(4), ["thread", "fork"])
    row = caught.value.comparison["fork"]
    assert row.status == "error" and isinstance(row.error, RuntimeError)
    assert row.seconds is None and row.speedup is None


def test_an_error_on_serial_itself_propagates_unchanged():
    with pytest.raises(ValueError, match="three is not allowed"):
        pmap.compare(fail_on_three, range(5), ["thread"])
    report = pmap.compare(fail_on_three, range(5), ["thread"], check=False)
    assert report["serial"].status == "error" and report["thread"].status == "error"
    report = pmap.compare(fails_in_main_thread, range(5), ["thread"], check=False)
    assert report["serial"].status == "error"
    assert report["thread"].status == "unchecked" and report["thread"].agrees is None
    assert not report.ok


def test_failures_returned_in_place_compare_by_type_message_and_index():
    result = pmap.compare(fail_on_three, range(6), ["thread", "fork"], on_error="return")
    assert result.ok


def test_unordered_compares_multisets_even_of_unhashable_results():
    result = pmap.compare(listed, range(30), ["thread", "fork"], ordered=False, workers=3, chunksize=1)
    assert result.ok
    assert "unordered, compared as multisets" in str(result)
    with pytest.raises(ResultsDiffer, match="fork: 7 appears 1 more time"):
        pmap.compare(serial_misses_nothing_but_workers_drop_seven, range(10), ["thread", "fork"],
                     ordered=False)


def test_a_custom_equality():
    def close(a, b):
        return math.isclose(a, b, rel_tol=1e-6)
    assert pmap.compare(math.sqrt, range(20), ["thread"], equal=close).ok
    assert pmap.compare(math.sqrt, range(20), ["thread"], equal=close, ordered=False).ok
    result = pmap.compare(square, range(3), ["thread"], equal=lambda a, b: False, check=False)
    assert "first difference at index 0" in result["thread"].detail


class _NeverAvailable(Backend):
    name = "never"
    kind = "thread"

    @classmethod
    def unavailable_reason(cls):
        return "needs the moon (pip install moon)"


def test_unavailable_backends_get_a_row_with_the_reason_and_do_not_fail(monkeypatch):
    from pmap.backends import base
    monkeypatch.setitem(base._FACTORIES, "never", _NeverAvailable)
    result = pmap.compare(square, range(5), ["thread", "never"])
    assert result.ok
    assert result["never"].status == "unavailable"
    assert result["never"].detail == "needs the moon (pip install moon)"
    assert result["never"].agrees is None
    assert "unavailable: needs the moon" in str(result)


def test_unknown_backend_and_bad_repeat_are_errors_of_use():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        pmap.compare(square, [1], ["nope"])
    with pytest.raises(ValueError, match="repeat must be a positive integer"):
        pmap.compare(square, [1], ["thread"], repeat=0)
    with pytest.raises(TypeError, match="backends="):
        pmap.compare(square, [1], backend="thread")


@pytest.mark.filterwarnings("ignore:pmap. backend='greenlet' runs on gevent")  # square never blocks
def test_default_backends_are_the_fixtures_and_leave_asyncio_to_async_functions():
    from pmap.pytest_plugin import default_backend_names as fixture_default
    # the fixture leaves out asyncio (async def only), so a test of a plain function passes on all it gets
    assert fixture_default() == [name for name in default_backend_names() if name != "asyncio"]
    assert "manager" not in default_backend_names() and "dask" not in default_backend_names()
    result = pmap.compare(square, range(8), check=False)
    assert [row.backend for row in result] == default_backend_names()
    if "asyncio" not in default_backend_names():
        pytest.skip("the asyncio backend is not registered")
    assert result["asyncio"].status == "skipped"
    assert pmap.compare(async_square, range(8), ["thread", "asyncio"])["asyncio"].status == "agree"


def test_auto_can_be_compared_too():
    result = pmap.compare(square, range(20), ["auto"])
    assert result["auto"].status == "agree"
    assert result["auto"].stats.plan is not None


def test_a_generator_is_read_once_and_every_backend_sees_the_same_items():
    result = pmap.compare(square, (x for x in range(12)), ["thread"])
    assert result.items == 12
    assert result["thread"].stats.items_done == 12


def test_same_treats_nan_failures_and_array_likes_sensibly():
    nan = float("nan")
    assert same(nan, float("nan"))
    assert not same(1.0, nan)
    first = pmap.Failure(index=3, item=3, exception=ValueError("bad"), traceback="tb one", kind="error")
    second = pmap.Failure(index=3, item=3, exception=ValueError("bad"), traceback="tb two", kind="error")
    assert same(first, second)
    assert not same(first, pmap.Failure(index=3, item=3, exception=TypeError("bad")))
    assert not same(first, 3)

    class Elementwise:
        def __init__(self, values):
            self.values = values
            self.shape = (len(values),)

        def __eq__(self, other):
            return _All([a == b for a, b in zip(self.values, other.values)])

    assert same(Elementwise([1, 2]), Elementwise([1, 2]))
    assert not same(Elementwise([1, 2]), Elementwise([1, 3]))
    assert not same(Elementwise([1, 2]), Elementwise([1, 2, 3]))


class _All:
    def __init__(self, flags):
        self.flags = flags

    def all(self):
        return all(self.flags)

    def __bool__(self):
        raise ValueError("ambiguous, as numpy says")


def test_format_seconds_picks_a_readable_unit():
    assert format_seconds(2.5) == "2.5s"
    assert format_seconds(0.0123) == "12.3ms"
    assert format_seconds(4.5e-6) == "4.5us"
    assert format_seconds(-0.002) == "-2ms"


def test_assert_backends_agree_passes_and_returns_the_table():
    table = assert_backends_agree(square, range(20), ["thread", "fork"])
    assert table.ok and "fork" in table


def test_assert_backends_agree_fails_the_test_with_the_difference():
    with pytest.raises(AssertionError, match="fork: first difference at index 1"):
        assert_backends_agree(negated_in_workers, range(4), ["fork"])


@pytest.mark.pmap_backends("thread", "fork")
def test_the_fixture_and_the_helper_together(pmap_backend):
    assert_backends_agree(square, range(10), [pmap_backend])
