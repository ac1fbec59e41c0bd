"""The same faults on pmap and on its peers (issue 6): a worker that segfaults, one that calls
os._exit, an item that hangs (with a 1 s timeout where the library has one), and Ctrl-C.

    python bench/faults.py                # every library and scenario; writes bench/results/faults.md
    python bench/faults.py --quick        # fewer items, a shorter limit (bench/results/quick/faults.md)
    python bench/faults.py --only "pmap fork,pebble" --scenarios hang

Every case runs in its own child process, in a session of its own, so a library that hangs
or leaves processes behind cannot touch the next case. A case still running at the limit is
killed (the driver alone, so its workers show what they do when it dies) and reported as
hung. Processes left behind are those still alive a moment after the driver ended (found by a
tag in their environment, wherever they were re-parented); they are then killed. Ctrl-C is SIGINT to the child's whole process group, as a terminal sends it, a
second after the run has started; its time counts from the signal to the child's exit.

Each library runs as its docs suggest for keeping the other results: pmap with
on_error="return" and timeout=; pebble with schedule(timeout=) per item; mpire with
imap(task_timeout=); joblib with return_as="generator" and Parallel(timeout=);
concurrent.futures and multiprocessing.Pool with a future per item and result(timeout=),
which gives up waiting but cannot stop the worker.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import common
import workloads

WORKERS = 2
HANG_TIMEOUT = 1.0
CTRL_C_AFTER = 1.0            # seconds after the run starts
LEFT_BEHIND_GRACE = 1.0       # a worker still alive this long after the driver exited was left behind
SCENARIOS = {
    "segfault": ("a worker segfaults on one item", workloads.segfault_on_fault, None),
    "exit": ("a worker calls os._exit(3) on one item", workloads.exit_on_fault, None),
    "hang": (f"one item hangs; timeout {HANG_TIMEOUT:g} s where supported", workloads.hang_on_fault, HANG_TIMEOUT),
    "ctrl-c": ("Ctrl-C (SIGINT to the process group) during a long run", workloads.slow_item, None),
}


# ---- each library, yielding True for a result kept and False for an item lost -------------
def _pmap(backend):
    def run(func, items, timeout):
        import pmap
        for value in pmap.imap(func, items, backend=backend, workers=WORKERS, timeout=timeout, on_error="return"):
            yield not isinstance(value, pmap.Failure)
    return run


def _futures_each(submit_all, func, items, timeout):
    for future in submit_all(func, items):
        try:
            future.result(timeout=timeout)
            yield True
        except Exception:  # noqa: BLE001 - a lost item, whatever the reason
            yield False


def run_futures(func, items, timeout):
    with ProcessPoolExecutor(WORKERS) as executor:
        yield from _futures_each(lambda f, xs: [executor.submit(f, x) for x in xs], func, items, timeout)


def run_multiprocessing(func, items, timeout):
    with multiprocessing.Pool(WORKERS) as pool:
        for result in [pool.apply_async(func, (x,)) for x in items]:
            try:
                result.get(timeout=timeout)
                yield True
            except Exception:  # noqa: BLE001
                yield False


def run_joblib(func, items, timeout):
    import joblib
    yield from (True for _ in joblib.Parallel(n_jobs=WORKERS, return_as="generator", timeout=timeout)(
        joblib.delayed(func)(x) for x in items))


def run_mpire(func, items, timeout):
    from mpire import WorkerPool
    with WorkerPool(n_jobs=WORKERS) as pool:
        yield from (True for _ in pool.imap(func, items, task_timeout=timeout))


def run_pebble(func, items, timeout):
    import pebble
    with pebble.ProcessPool(max_workers=WORKERS) as pool:
        yield from _futures_each(lambda f, xs: [pool.schedule(f, args=(x,), timeout=timeout) for x in xs],
                                 func, items, timeout=None)


LIBRARIES = {
    "pmap fork": _pmap("fork"), "pmap pool": _pmap("pool"), "pmap process": _pmap("process"),
    "concurrent.futures": run_futures, "multiprocessing.Pool": run_multiprocessing,
    "joblib (loky)": run_joblib, "mpire": run_mpire, "pebble": run_pebble,
}


def child(library: str, scenario: str, count: int) -> None:
    _, func, timeout = SCENARIOS[scenario]
    kept = 0
    common.emit({"ready": True})
    start = time.perf_counter()
    outcome = "finished"
    try:
        for ok in LIBRARIES[library](func, list(range(count)), timeout):
            kept += ok
            common.emit({"kept": kept})
    except KeyboardInterrupt:
        outcome = "KeyboardInterrupt"
    except Exception as exc:  # noqa: BLE001 - how the library gave up is the result
        outcome = f"raised {type(exc).__name__}"
    common.emit({"kept": kept, "outcome": outcome, "seconds": time.perf_counter() - start})


# ---- the parent -------------------------------------------------------------------------------
def run_case(library: str, scenario: str, count: int, limit: float) -> dict:
    args = [os.path.abspath(__file__), "--child", library, scenario, str(count)]
    signal_after = CTRL_C_AFTER if scenario == "ctrl-c" else None
    run = common.run_child(args, limit=limit, signal_after=signal_after, grace=LEFT_BEHIND_GRACE)
    kept = max((line["kept"] for line in run.lines if "kept" in line), default=0)
    final = run.output if run.output and "outcome" in run.output else None
    if run.returncode is None:
        outcome = f"hung: killed after {limit:g} s"
    elif final is None:
        outcome = f"driver died (exit {run.returncode})"
    else:
        outcome = final["outcome"]
        if run.returncode not in (0, None) and scenario != "ctrl-c":
            outcome += f", exit {run.returncode}"
    seconds = run.seconds if scenario == "ctrl-c" or final is None else final["seconds"]
    row = {"library": library, "scenario": scenario, "kept": kept, "total": count, "seconds": seconds,
           "hung": run.returncode is None, "outcome": outcome, "left_behind": run.left_behind}
    common.log(f"{scenario:8s} {library:22s} kept {kept}/{count} in {seconds:.2f}s, {outcome}, "
               f"{run.left_behind} left behind")
    return row


def report(rows: list[dict], header: list[str], count: int, limit: float) -> list[str]:
    lines = ["# Faults: pmap and its peers", ""] + header + [
        "",
        f"{count} items of {workloads.FAULT_ITEM_SECONDS * 1000:g} ms on {WORKERS} workers; item "
        f"{workloads.FAULT_INDEX} is the faulty one, so {count - 1} results can be kept. Ctrl-C interrupts "
        f"{count} items of {workloads.SLOW_ITEM_SECONDS:g} s, {CTRL_C_AFTER:g} s in; its time runs from the "
        f"signal to the driver's exit. Each case in a fresh process, killed after {limit:g} s. "
        f"'left behind': processes of the run still alive {LEFT_BEHIND_GRACE:g} s after its driver exited "
        "(for a hung case, after its driver was killed).",
        ""]
    for scenario, (title, _, _) in SCENARIOS.items():
        cases = [row for row in rows if row["scenario"] == scenario]
        if not cases:
            continue
        interrupt = scenario == "ctrl-c"
        table = [[row["library"]] + ([] if interrupt else [row["kept"]])
                 + [("> " if row["hung"] else "") + common.seconds_text(row["seconds"]), row["outcome"],
                    row["left_behind"]] for row in cases]
        columns = (["library", "exit after Ctrl-C"] if interrupt
                   else ["library", f"results kept (of {count - 1} possible)", "time to finish"])
        lines += [f"## {title}", ""]
        lines += common.markdown_table(columns + ["outcome", "left behind"], table) + [""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer items and a shorter limit")
    parser.add_argument("--only", default=",".join(LIBRARIES), help="comma-separated libraries")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--items", type=int, default=None, help="items per run (default 40, quick 12)")
    parser.add_argument("--limit", type=float, default=None, help="seconds before a case counts as hung "
                                                                  "(default 30, quick 10)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        library, scenario, count = args.child
        return child(library, scenario, int(count))

    count = args.items or (12 if args.quick else 40)
    limit = args.limit or (10.0 if args.quick else 30.0)
    libraries = [name.strip() for name in args.only.split(",") if name.strip()]
    scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = (set(libraries) - set(LIBRARIES)) | (set(scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))} (libraries: {', '.join(LIBRARIES)}; "
                     f"scenarios: {', '.join(SCENARIOS)})")
    common.install_signal_handlers()
    header = common.header_lines("faults.py")
    rows = [run_case(library, scenario, count, limit) for scenario in scenarios for library in libraries]
    lines = report(rows, header, count, limit)
    path = common.write_results("faults.md", lines, args.quick)
    print("\n".join(lines))
    print(f"\nwritten: {os.path.relpath(path)}", file=sys.stderr)


if __name__ == "__main__":
    main()
