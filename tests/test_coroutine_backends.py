"""What only the coroutine backends do: greenlet (gevent) and asyncio fan-out, their warnings,
timeouts and cancellation, and pmap.apmap / pmap.aimap on the caller's own loop.

Overlap is judged by counting the calls in progress at once, never by wall time: speed is
measured in bench/io_fanout.py.
"""
import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import gevent
import pytest

import pmap
from pmap.backends.greenlet import NotCooperativeWarning


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


def last_json_line(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


class ConcurrencyMeter:
    """Counts coroutines or greenlets inside the function at once, and the most seen."""

    def __init__(self):
        self.now = 0
        self.peak = 0

    def enter(self):
        self.now += 1
        self.peak = max(self.peak, self.now)

    def leave(self):
        self.now -= 1


class StopLog:
    """Records items whose run was stopped from outside (cancelled, killed, interrupted)."""

    def __init__(self):
        self.started = set()
        self.stopped = set()


# ---- greenlet ---------------------------------------------------------------------------
def test_greenlet_default_concurrency_is_in_the_hundreds():
    info = next(i for i in pmap.backends() if i.name == "greenlet")
    assert info.available and info.kind == "coroutine"
    assert 100 <= info.default_workers <= 1000
    assert "gevent" in info.aliases


def test_greenlet_patched_sleeps_overlap_in_a_subprocess():
    items, wait = 2000, 0.05
    proc = run_python(f"""
        from gevent import monkey
        monkey.patch_all()
        import json, time, warnings
        import pmap

        running = peak = 0

        def nap(x):
            global running, peak
            running += 1
            peak = max(peak, running)
            time.sleep({wait})  # patched: yields to the other greenlets
            running -= 1
            return x * 2

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = pmap.pmap(nap, range({items}), backend="greenlet")
        print(json.dumps({{"peak": peak, "correct": out == [x * 2 for x in range({items})],
                          "warnings": [str(w.message) for w in caught]}}))
    """)
    result = last_json_line(proc)
    assert result["correct"]
    assert result["peak"] >= 100, result  # the sleeps overlapped (default workers: 256)
    assert result["warnings"] == []  # patched: neither the up-front nor the run-time warning


def test_greenlet_unpatched_warns_once_up_front():
    proc = run_python("""
        import json, warnings
        import gevent
        import pmap

        def nap(x):
            gevent.sleep(0.001)
            return x

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = pmap.pmap(nap, range(20), backend="greenlet")
            second = pmap.pmap(nap, range(20), backend="gevent")
        print(json.dumps({"ok": first == second == list(range(20)),
                          "warnings": [[w.category.__name__, str(w.message), w.filename] for w in caught]}))
    """)
    result = last_json_line(proc)
    assert result["ok"]
    assert len(result["warnings"]) == 1, result["warnings"]
    category, message, filename = result["warnings"][0]
    assert category == "NotCooperativeWarning"
    assert filename == "<string>"  # the caller's code (here `python -c`), not pmap's
    assert "'socket' and 'time' are not monkey-patched" in message
    assert "gevent.monkey.patch_all()" in message and "backend='thread'" in message


def blocking_nap(x):
    time.sleep(0.02)  # not patched in the test process: holds gevent's hub
    return x


def test_greenlet_warns_at_run_time_when_calls_do_not_yield():
    with pytest.warns(NotCooperativeWarning, match="ran one at a time") as caught:
        out = pmap.pmap(blocking_nap, range(40), backend="greenlet", workers=8)
    assert out == list(range(40))
    warning = next(w for w in caught if "one at a time" in str(w.message))
    assert "backend='thread'" in str(warning.message) and "patch_all()" in str(warning.message)
    assert warning.filename == __file__  # points at the caller's line, not at pmap


def cooperative_nap(x):
    gevent.sleep(0.05)
    return x


def test_greenlet_cooperative_calls_overlap_and_do_not_warn_at_run_time():
    items = 200
    meter = ConcurrencyMeter()

    def nap(x):
        meter.enter()
        try:
            return cooperative_nap(x)
        finally:
            meter.leave()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pmap.pmap(nap, range(items), backend="greenlet", workers=50)
    assert out == list(range(items))
    assert 25 <= meter.peak <= 50  # real overlap, bounded by workers
    assert not [w for w in caught if "one at a time" in str(w.message)]


def test_greenlet_timeout_fails_only_the_stuck_item():
    log = StopLog()

    def maybe_stuck(x):
        log.started.add(x)
        try:
            gevent.sleep(10 if x == 2 else 0.01)
        except BaseException:
            log.stopped.add(x)
            raise
        return x

    out = pmap.pmap(maybe_stuck, range(6), backend="greenlet", timeout=0.3, on_error="return")
    assert [r for i, r in enumerate(out) if i != 2] == [0, 1, 3, 4, 5]
    assert isinstance(out[2], pmap.Failure) and out[2].kind == "timeout"
    assert isinstance(out[2].exception, pmap.TaskTimeout)
    assert log.stopped == {2}  # the stuck sleep was cut short, not waited out


def test_greenlet_error_cancels_the_rest():
    log = StopLog()

    def fails_first(x):
        log.started.add(x)
        if x == 0:
            gevent.sleep(0.05)
            raise ValueError("boom")
        try:
            gevent.sleep(10)
        except gevent.GreenletExit:
            log.stopped.add(x)
            raise
        return x

    start = time.perf_counter()
    with pytest.raises(ValueError, match="boom"):
        pmap.pmap(fails_first, range(20), backend="greenlet", workers=10, chunksize=1)
    assert time.perf_counter() - start < 10 / 4
    assert len(log.started) == 10
    assert log.stopped == log.started - {0}


def test_greenlet_early_close_cancels_the_running_items():
    log = StopLog()

    def nap(x):
        log.started.add(x)
        try:
            gevent.sleep(0.01 if x < 3 else 10)
        except gevent.GreenletExit:
            log.stopped.add(x)
            raise
        return x

    results = pmap.imap(nap, range(1000), backend="greenlet", workers=8, chunksize=1)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    results.close()
    assert log.stopped and log.stopped == log.started - {0, 1, 2}
    assert len(log.started) < 50  # input is read lazily, not all 1000 up front


def test_greenlet_rejects_async_functions():
    async def fetch(x):
        return x

    with pytest.raises(TypeError, match="backend='asyncio'"):
        pmap.pmap(fetch, [1], backend="greenlet")


GREENLET_SLEEPER = """
import gevent

def sleeper(x):
    global started, stopped
    try:
        started += 1
        if started == ITEMS:
            print("all started", flush=True)
        gevent.sleep(30)
    except BaseException:
        stopped += 1
        raise
"""

ASYNC_SLEEPER = """
import asyncio

async def sleeper(x):
    global started, stopped
    try:
        started += 1
        if started == ITEMS:
            print("all started", flush=True)
        await asyncio.sleep(30)
    except BaseException:  # CancelledError, or the KeyboardInterrupt itself
        stopped += 1
        raise
"""

CALL_DIRECTLY = "pmap.pmap(sleeper, range(ITEMS), backend=BACKEND, workers=ITEMS)"

CALL_FROM_A_COROUTINE = """
async def main():
    pmap.pmap(sleeper, range(ITEMS), backend=BACKEND, workers=ITEMS)

asyncio.run(main())
"""


@pytest.mark.parametrize("backend, patch, define, call", [
    ("greenlet", "", GREENLET_SLEEPER, CALL_DIRECTLY),
    ("greenlet", "from gevent import monkey; monkey.patch_all()", GREENLET_SLEEPER, CALL_DIRECTLY),
    ("asyncio", "", ASYNC_SLEEPER, CALL_DIRECTLY),
    ("asyncio", "", ASYNC_SLEEPER, CALL_FROM_A_COROUTINE),
], ids=["greenlet", "greenlet-patched", "asyncio", "asyncio-inside-asyncio-run"])
def test_ctrl_c_reaches_the_caller_and_stops_every_item(backend, patch, define, call):
    code = "\n".join([
        patch,
        "import pmap",
        f"BACKEND, ITEMS = {backend!r}, 50",
        "started = stopped = 0",
        define,
        "try:",
        textwrap.indent(call.strip(), "    "),
        "except KeyboardInterrupt:",
        "    print(f'interrupted stopped={stopped}', flush=True)",
    ])
    child = subprocess.Popen([sys.executable, "-W", "ignore", "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "all started"
        time.sleep(0.2)  # let the last item reach its sleep
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=30)
        reaction = time.monotonic() - sent
    finally:
        child.kill()
        child.wait()
    assert out.strip() == "interrupted stopped=50", err
    assert reaction < 30 / 6  # the items sleep 30 s; about a second is expected


# ---- asyncio ----------------------------------------------------------------------------
async def async_nap(x, seconds=0.01, meter=None):
    if meter is not None:
        meter.enter()
    try:
        await asyncio.sleep(seconds)
    finally:
        if meter is not None:
            meter.leave()
    return x


def test_asyncio_fan_out_is_concurrent_and_bounded_by_workers():
    items, wait, workers = 1000, 0.01, 100
    meter = ConcurrencyMeter()

    async def nap(x):
        return await async_nap(x, wait, meter)

    out = pmap.pmap(nap, range(items), backend="asyncio", workers=workers)
    assert out == list(range(items))
    assert workers // 2 <= meter.peak <= workers


def test_asyncio_works_inside_a_running_loop():
    items, wait = 1000, 0.01
    meter = ConcurrencyMeter()

    async def nap(x):
        return await async_nap(x, wait, meter)

    async def caller():
        return pmap.pmap(nap, range(items), backend="asyncio", workers=100)

    out = asyncio.run(caller())
    assert out == list(range(items))
    assert 50 <= meter.peak <= 100


def test_asyncio_is_refused_by_pool_and_executor_with_the_way_out():
    for make in (pmap.Pool, pmap.Executor):
        with pytest.raises(ValueError, match="async def.*backend='thread'.*apmap"):
            make(backend="asyncio")


def test_asyncio_initializer_may_be_async():
    state = {}

    async def setup(value):
        await asyncio.sleep(0)
        state["value"] = value

    async def read(_):
        return state.get("value")

    assert pmap.pmap(read, range(3), backend="asyncio", initializer=setup, initargs=("ready",)) == ["ready"] * 3


def test_asyncio_timeout_fails_only_the_stuck_item_and_cancels_it():
    log = StopLog()

    async def maybe_stuck(x):
        log.started.add(x)
        try:
            await asyncio.sleep(10 if x == 2 else 0.01)
        except asyncio.CancelledError:
            log.stopped.add(x)
            raise
        return x

    start = time.perf_counter()
    out = pmap.pmap(maybe_stuck, range(6), backend="asyncio", timeout=0.3, on_error="return")
    assert time.perf_counter() - start < 10 / 4
    assert [r for i, r in enumerate(out) if i != 2] == [0, 1, 3, 4, 5]
    assert isinstance(out[2], pmap.Failure) and out[2].kind == "timeout"
    assert isinstance(out[2].exception, pmap.TaskTimeout)
    assert log.stopped == {2}


def test_asyncio_timeout_error_raised_by_the_function_is_its_own():
    async def raises_timeout(x):
        raise TimeoutError(f"upstream timed out for {x}")

    out = pmap.pmap(raises_timeout, [1], backend="asyncio", timeout=5, on_error="return")
    assert out[0].kind == "error"
    assert type(out[0].exception) is TimeoutError
    assert "upstream timed out for 1" in str(out[0].exception)


def test_asyncio_error_cancels_pending_tasks():
    log = StopLog()

    async def fails_first(x):
        log.started.add(x)
        if x == 0:
            await asyncio.sleep(0.05)
            raise ValueError("boom")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            log.stopped.add(x)
            raise
        return x

    start = time.perf_counter()
    with pytest.raises(ValueError, match="boom") as info:
        pmap.pmap(fails_first, range(20), backend="asyncio", workers=10, chunksize=1)
    assert time.perf_counter() - start < 10 / 4
    assert "item 0" in "\n".join(info.value.__notes__)
    assert 10 <= len(log.started) <= 11  # the failed item's runner may take one queued task first
    assert log.stopped == log.started - {0}


def test_asyncio_early_close_of_the_iterator_cancels_pending_tasks():
    log = StopLog()

    async def nap(x):
        log.started.add(x)
        try:
            await asyncio.sleep(0.01 if x < 3 else 10)
        except asyncio.CancelledError:
            log.stopped.add(x)
            raise
        return x

    results = pmap.imap(nap, range(1000), backend="asyncio", workers=8, chunksize=1)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    results.close()
    assert log.stopped and log.stopped == log.started - {0, 1, 2}
    assert len(log.started) < 50  # never one coroutine per item up front


def test_asyncio_rejects_plain_functions_with_a_clear_error():
    def blocking(x):
        return x

    with pytest.raises(TypeError, match=r"blocking is a plain function\. Use backend='thread'"):
        pmap.pmap(blocking, [1], backend="asyncio")


def test_asyncio_starmap_and_callable_objects():
    class Scaler:
        async def __call__(self, x):
            return 3 * x

    async def add(a, b):
        return a + b

    assert pmap.starmap(add, [(1, 2), (3, 4)], backend="asyncio") == [3, 7]
    assert pmap.pmap(Scaler(), [1, 2], backend="asyncio") == [3, 6]


# ---- apmap / aimap ----------------------------------------------------------------------
def test_apmap_runs_on_the_callers_loop_concurrently():
    items, wait = 1000, 0.01
    meter = ConcurrencyMeter()
    seen_loops = set()

    async def nap(x):
        seen_loops.add(id(asyncio.get_running_loop()))
        return await async_nap(x, wait, meter)

    async def caller():
        out = await pmap.apmap(nap, range(items), workers=100)
        return out, id(asyncio.get_running_loop())

    out, caller_loop = asyncio.run(caller())
    assert out == list(range(items))
    assert out.stats.items_done == items
    assert seen_loops == {caller_loop}
    assert 50 <= meter.peak <= 100


def test_aimap_takes_an_async_iterable_and_yields_in_completion_order():
    async def source():
        for delay in (0.3, 0.0, 0.0, 0.0):
            await asyncio.sleep(0)
            yield delay

    async def nap(delay):
        await asyncio.sleep(delay)
        return delay

    async def caller():
        return [value async for value in pmap.aimap(nap, source(), ordered=False, workers=4, chunksize=1)]

    out = asyncio.run(caller())
    assert sorted(out) == [0.0, 0.0, 0.0, 0.3]
    assert out[-1] == 0.3


def test_aimap_leaving_early_cancels_the_rest_before_aclose_returns():
    log = StopLog()

    async def nap(x):
        log.started.add(x)
        try:
            await asyncio.sleep(0 if x == 0 else 10)
        except asyncio.CancelledError:
            log.stopped.add(x)
            raise
        return x

    async def caller():
        async with pmap.aimap(nap, range(100), workers=10, chunksize=1) as results:
            async for value in results:
                break
        return value, set(log.stopped)

    start = time.perf_counter()
    first, stopped_by_then = asyncio.run(caller())
    assert first == 0
    assert time.perf_counter() - start < 10 / 4
    assert stopped_by_then and stopped_by_then == log.started - {0}


def test_apmap_error_keeps_its_type_and_note_and_cancels_the_rest():
    log = StopLog()

    async def fails_first(x):
        log.started.add(x)
        if x == 0:
            raise KeyError("zero")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            log.stopped.add(x)
            raise

    async def caller():
        with pytest.raises(KeyError, match="zero") as info:
            await pmap.apmap(fails_first, range(30), workers=5, chunksize=1)
        return info.value

    error = asyncio.run(caller())
    assert isinstance(error.__cause__, pmap.RemoteTraceback)
    assert "item 0" in "\n".join(error.__notes__)
    assert log.stopped == log.started - {0}


def test_apmap_timeout_retries_and_progress_on_the_loop_thread():
    attempts = {}
    progress_threads = set()

    async def flaky(x):
        attempts[x] = attempts.get(x, 0) + 1
        if x == 1 and attempts[x] == 1:
            raise ConnectionError("first try fails")
        await asyncio.sleep(5 if x == 2 else 0)
        return x

    def progress(done, total):
        progress_threads.add(threading.get_ident())

    async def caller():
        return await pmap.apmap(flaky, [0, 1, 2], timeout=0.3, retries=1, retry_on=ConnectionError,
                                on_error="return", progress=progress)

    out = asyncio.run(caller())
    assert out[:2] == [0, 1] and attempts[1] == 2
    assert isinstance(out[2], pmap.Failure) and out[2].kind == "timeout"
    assert progress_threads == {threading.get_ident()}


def test_aimap_errors_of_use_are_early():
    async def fetch(x):
        return x

    with pytest.raises(RuntimeError, match="called from a coroutine"):
        pmap.aimap(fetch, [1])

    async def caller():
        with pytest.raises(TypeError, match="plain function"):
            pmap.aimap(len, ["a"])
        with pytest.raises(ValueError, match="workers must be at least 1"):
            pmap.aimap(fetch, [1], workers=0)
        return True

    assert asyncio.run(caller())


def test_sync_call_given_the_running_loop_says_to_use_apmap():
    async def fetch(x):
        return x

    async def caller():
        with pytest.raises(ValueError, match="apmap"):
            pmap.pmap(fetch, [1], backend="asyncio", loop=asyncio.get_running_loop())
        return True

    assert asyncio.run(caller())
