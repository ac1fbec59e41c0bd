"""Submitting work one call at a time (issue 25): pmap.Executor and pmap.Pool against
concurrent.futures' executors, loky's reusable executor and multiprocessing.Pool.

    python bench/submit.py                # writes bench/results/submit.md
    python bench/submit.py --quick        # fewer calls and runs (bench/results/quick/submit.md)

Throughput: N calls of a no-op (`workloads.tiny`) and of a 1 ms call (`workloads.sleep_item`,
time.sleep(0.001)), each submitted on its own (`submit`, or `apply_async` for the Pools) and then
all results read, on an executor started and warmed before the clock starts; 2 workers each.
Runners alternate round by round; the table gives the median of the runs and their range.

Crash: 100 calls of `workloads.segfault_on_fault`, whose call 5 segfaults its worker: how many
of the other 99 futures (results) fail or never arrive (each waited for up to 60 s).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import statistics
import time

import common
import workloads

WORKERS = 2
CALLS = 10_000
QUICK_CALLS = 1_000
CRASH_CALLS = 100
RESULT_WAIT = 60.0
CRASHED_WAIT = 5.0


# ---- the runners: each makes a warm pool and returns (submit, read, close) ------------------
def _executor(make):
    def start():
        executor = make()
        executor.submit(workloads.tiny, 0).result()  # workers up before the clock starts

        def submit(func, arg):
            return executor.submit(func, arg)

        return submit, lambda f: f.result(RESULT_WAIT), lambda: executor.shutdown(wait=True)
    return start


def _pool(make):
    def start():
        pool = make()
        pool.apply(workloads.tiny, (0,))

        def submit(func, arg):
            return pool.apply_async(func, (arg,))

        def close():
            pool.terminate()  # multiprocessing's join() waits for ever for a call lost in a crash
            pool.join()
        return submit, lambda r: r.get(RESULT_WAIT), close
    return start


def _loky():
    from loky import get_reusable_executor
    return get_reusable_executor(max_workers=WORKERS)


def runners() -> dict:
    import pmap
    return {
        "pmap Executor process": ("process", _executor(lambda: pmap.Executor(WORKERS, backend="process"))),
        "pmap Executor fork": ("process", _executor(lambda: pmap.Executor(WORKERS, backend="fork"))),
        "pmap Executor pool": ("process", _executor(lambda: pmap.Executor(WORKERS, backend="pool"))),
        "ProcessPoolExecutor (fork)": ("process", _executor(
            lambda: cf.ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("fork")))),
        "loky get_reusable_executor": ("process", _executor(_loky)),
        "pmap Executor thread": ("thread", _executor(lambda: pmap.Executor(WORKERS, backend="thread"))),
        "ThreadPoolExecutor": ("thread", _executor(lambda: cf.ThreadPoolExecutor(WORKERS))),
        "pmap Pool fork (apply_async)": ("apply_async", _pool(lambda: pmap.Pool(WORKERS, backend="fork"))),
        "pmap Pool process (apply_async)": ("apply_async", _pool(lambda: pmap.Pool(WORKERS, backend="process"))),
        "multiprocessing.Pool fork (apply_async)": ("apply_async", _pool(
            lambda: multiprocessing.get_context("fork").Pool(WORKERS))),
    }


def throughput(start, func, arg, calls: int) -> float:
    submit, read, close = start()
    try:
        began = time.perf_counter()
        handles = [submit(func, arg) for _ in range(calls)]
        for handle in handles:
            read(handle)
        return calls / (time.perf_counter() - began)
    finally:
        close()


def lost_in_a_crash(start) -> tuple[int, str]:
    """Results among the calls that did not crash which failed or never came, and what the
    crashed call's own result says."""
    submit, read, close = start()
    lost = 0
    try:
        handles = [submit(workloads.segfault_on_fault, x) for x in range(CRASH_CALLS)]
        for x, handle in enumerate(handles):
            if x == workloads.FAULT_INDEX:
                continue
            try:
                read(handle)
            except Exception:  # noqa: BLE001 - any failure of a call that did not crash is a loss
                lost += 1
        crashed = handles[workloads.FAULT_INDEX]
        try:
            crashed.get(CRASHED_WAIT) if hasattr(crashed, "get") else crashed.result(CRASHED_WAIT)
            said = "a value (?)"
        except (multiprocessing.TimeoutError, cf.TimeoutError):
            said = f"nothing within {CRASHED_WAIT:g} s"
        except Exception as exc:  # noqa: BLE001 - what it raises is the result
            said = type(exc).__name__
    finally:
        try:
            close()
        except Exception:  # noqa: BLE001 - a broken pool may refuse to close: its losses are counted
            pass
    return lost, said


def spread(values: list) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    calls = QUICK_CALLS if args.quick else CALLS
    repeat = 2 if args.quick else args.repeat
    all_runners = runners()
    loads = {"no-op": (workloads.tiny, 1), "1 ms": (workloads.sleep_item, 0.001)}
    rates = {(name, load): [] for name in all_runners for load in loads}
    for round_number in range(repeat):
        names = list(all_runners)
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            for load, (func, arg) in loads.items():
                rates[name, load].append(throughput(all_runners[name][1], func, arg, calls))
                common.log(f"round {round_number + 1}: {name}, {load}: {rates[name, load][-1]:,.0f} calls/s")
    losses = {}
    for name, (kind, start) in all_runners.items():
        if kind == "thread":
            continue  # a segfault in a thread ends the whole process: no row
        losses[name] = lost_in_a_crash(start)
        common.log(f"crash: {name}: {losses[name]}")

    reference = {"process": "ProcessPoolExecutor (fork)", "thread": "ThreadPoolExecutor",
                 "apply_async": "multiprocessing.Pool fork (apply_async)"}
    rows = []
    for name, (kind, _) in all_runners.items():
        base = statistics.median(rates[reference[kind], "no-op"])
        rows.append([name, spread(rates[name, "no-op"]),
                     common.ratio_text(statistics.median(rates[name, "no-op"]) / base),
                     spread(rates[name, "1 ms"]),
                     "-" if name not in losses else f"{losses[name][0]} of {CRASH_CALLS - 1}",
                     "-" if name not in losses else losses[name][1]])
    lines = ["# Submitting calls one at a time", "", *common.header_lines("submit.py"), "",
             f"{calls:,} calls submitted one by one, then all results read; {WORKERS} workers, warm. "
             f"Calls per second: median of {repeat} runs (min-max). \"vs stdlib\": no-op throughput over "
             "the standard library's pool of the same kind (ProcessPoolExecutor with fork for the process "
             "executors, ThreadPoolExecutor for threads, multiprocessing.Pool for apply_async). "
             f"\"Lost in a crash\": of {CRASH_CALLS} calls, call {workloads.FAULT_INDEX} segfaults its worker; "
             "the other calls whose result failed or never came.", "",
             *common.markdown_table(["runner", "no-op calls/s", "vs stdlib", "1 ms calls/s", "lost in a crash",
                                     "the crashed call's result"], rows)]
    path = common.write_results("submit.md", lines, args.quick)
    print("\n".join(lines))
    common.log(f"written to {path}")


if __name__ == "__main__":
    main()
