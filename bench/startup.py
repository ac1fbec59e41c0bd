"""What process start-up costs a run, and how much of it pmap hides (issue 29).

    python bench/startup.py                 # 7 rounds; writes bench/results/startup.md
    python bench/startup.py --rounds 11
    python bench/startup.py --quick         # 2 rounds (bench/results/quick/startup.md)
    python bench/startup.py --cases auto    # only the cases named so, with their serial ones (quick/)
    python bench/startup.py --breakdown     # the CPU of each process a cold start starts, printed

Every case runs in a fresh interpreter of its own (a child process), so each process run meets
a cold pool, as a script's first call does; only the call is timed (`import pmap` is not). Each
round runs every case once, in a rotating order, so a burst of load elsewhere falls on all of
them alike; a case's ratio is its time over serial's time for the same work in the same round,
then the median and the spread (lowest to highest) over the rounds.

Targets (issue 29): in a fresh interpreter with another thread alive, auto on 150 items of
3 ms of CPU takes at most 0.8x serial; 1,000 items of 1 ms on a cold `process` backend take no
longer with 8 workers than with 2.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (the bench directory, also when run from elsewhere)

TARGET_AUTO_VS_SERIAL = 0.8
CHILD_TIMEOUT = 120.0


def spin(seconds):
    """Pure Python for `seconds` of this thread's CPU time, however busy the machine is."""
    deadline = time.thread_time() + seconds
    while time.thread_time() < deadline:
        pass
    return seconds


# name -> (work: items, seconds of CPU each; how the child runs it; serial case it is compared with)
CASES = {
    "serial 150 x 3 ms": ((150, 0.003), "serial", None),
    "auto 150 x 3 ms": ((150, 0.003), "auto", "serial 150 x 3 ms"),
    "auto 150 x 3 ms, second call": ((150, 0.003), "auto-second", "serial 150 x 3 ms"),
    "process 150 x 3 ms": ((150, 0.003), "process", "serial 150 x 3 ms"),
    "serial 1000 x 1 ms": ((1000, 0.001), "serial", None),
    "process x2 1000 x 1 ms": ((1000, 0.001), "process:2", "serial 1000 x 1 ms"),
    "process x8 1000 x 1 ms": ((1000, 0.001), "process:8", "serial 1000 x 1 ms"),
    "process x2 forkserver 1000 x 1 ms": ((1000, 0.001), "process:2:forkserver", "serial 1000 x 1 ms"),
    "process x8 forkserver 1000 x 1 ms": ((1000, 0.001), "process:8:forkserver", "serial 1000 x 1 ms"),
}


def cpu_of_all() -> float:
    """CPU seconds of this process and every process it started (the workers, loky's resource
    tracker, the fork server), ended or alive: what a run costs whatever the load."""
    import psutil
    me = psutil.Process()
    times = me.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for process in me.children(recursive=True):
        try:
            child_times = process.cpu_times()
        except psutil.Error:
            continue  # ended meanwhile: counted with the children above once reaped
        total += child_times.user + child_times.system
    return total


def child(case: str) -> None:
    """Run one case here (a fresh interpreter) with another thread alive, as after any library
    that starts one (joblib, a database driver): fork is then unsafe and auto will not use it."""
    import pmap
    (count, seconds), how, _ = CASES[case]
    items = [seconds] * count
    stop = threading.Event()
    threading.Thread(target=stop.wait, name="another-library", daemon=True).start()
    stats = None
    if how == "serial":
        cpu_before = cpu_of_all()
        start = time.perf_counter()
        out = [spin(x) for x in items]
    else:
        options: dict = {}
        if how.startswith("process"):
            _, *rest = how.split(":")
            options["backend"] = "process"
            if rest:
                options["workers"] = int(rest[0])
            if len(rest) > 1:
                options["start_method"] = rest[1]
        if how == "auto-second":
            pmap.pmap(spin, items)  # the first call, untimed: it leaves the pool it started
        cpu_before = cpu_of_all()
        start = time.perf_counter()
        out = pmap.pmap(spin, items, **options)
        stats = out.stats
    elapsed = time.perf_counter() - start
    cpu = cpu_of_all() - cpu_before
    stop.set()
    assert out == items, "wrong results"
    record = {"seconds": elapsed, "cpu": cpu}
    if stats is not None:
        record.update(startup_share=stats.startup_share, workers=stats.workers, backend=stats.backend)
        if stats.plan is not None:
            record.update(plan=stats.plan.backend)
    print(json.dumps(record))


def breakdown_child(workers: int, start_method: str) -> None:
    """A first `process` run here, with another thread alive: then the CPU of each process it
    started, read once every worker is up."""
    import psutil
    import pmap
    threading.Thread(target=threading.Event().wait, daemon=True).start()
    cpu_before = time.process_time()
    options = {} if start_method == "loky" else {"start_method": start_method}
    pmap.starmap(os.getpid, [()] * (4 * workers), backend="process", workers=workers, chunksize=1, **options)
    time.sleep(1.5)  # every worker finishes starting
    record: dict = {"the caller (imports loky, runs)": [time.process_time() - cpu_before]}
    for process in psutil.Process().children(recursive=True):
        command = " ".join(process.cmdline())
        if "resource_tracker" in command:
            kind = "loky's resource tracker" if "loky" in command else "multiprocessing's resource tracker"
        else:  # forked workers carry their fork server's command line
            kind = "fork server and its workers" if "forkserver" in command else "loky worker"
        times = process.cpu_times()
        record.setdefault(kind, []).append(times.user + times.system)
    print(json.dumps(record))


def breakdown(runs: int) -> None:
    """Where a cold start's CPU goes, process by process (docs/startup.md)."""
    for workers, start_method in ((2, "loky"), (8, "loky"), (2, "forkserver"), (8, "forkserver")):
        print(f"## {workers} workers, start method {start_method}")
        for _ in range(runs):
            result = subprocess.run([sys.executable, os.path.abspath(__file__), "--breakdown-child",
                                     f"{workers}:{start_method}"], capture_output=True, text=True,
                                    timeout=CHILD_TIMEOUT, env=_child_environment())
            if result.returncode != 0:
                raise RuntimeError(result.stderr)
            record = json.loads(result.stdout.strip().splitlines()[-1])
            print("; ".join(f"{kind}: {', '.join(f'{cpu:.3f}' for cpu in cpus)} s" for kind, cpus in record.items()))


def _child_environment() -> dict:
    # An installed pmap has its bytecode compiled (pip does it); a run from a source tree with
    # PYTHONDONTWRITEBYTECODE set would compile pmap's modules again in every worker it starts.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env.setdefault("PYTHONPYCACHEPREFIX", os.path.join(tempfile.gettempdir(), "pmap-bench-pycache"))
    return env


def run_case(case: str) -> dict:
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case],
                            capture_output=True, text=True, timeout=CHILD_TIMEOUT, env=_child_environment())
    if result.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(rounds: int, names: list[str]) -> dict[str, list[dict]]:
    records: dict[str, list[dict]] = {name: [] for name in names}
    for round_number in range(rounds):
        shift = (round_number * 3) % len(names)
        for name in names[shift:] + names[:shift]:
            records[name].append(run_case(name))
        common.log(f"round {round_number + 1}/{rounds} done")
    return records


def report(records: dict[str, list[dict]], rounds: int, header: list[str]) -> list[str]:
    rows = []
    ratios: dict[str, float] = {}
    for name, (_, _, versus) in CASES.items():
        if name not in records:
            continue
        runs = records[name]
        seconds = [r["seconds"] for r in runs]
        if versus is not None:
            per_round = [r["seconds"] / s["seconds"] for r, s in zip(runs, records[versus])]
            ratio = statistics.median(per_round)
            ratios[name] = ratio
            ratio_cell = f"{ratio:.2f}x ({min(per_round):.2f} - {max(per_round):.2f})"
        else:
            ratio_cell = "1"
        shares = [r["startup_share"] for r in runs if "startup_share" in r]
        notes = []
        if shares:
            notes.append(f"start-up share {statistics.median(shares):.0%}")
        if runs and "plan" in runs[0]:
            notes.append("auto chose " + "/".join(sorted({r["plan"] for r in runs})))
        cpu = statistics.median(r["cpu"] for r in runs)
        rows.append([name, common.seconds_text(statistics.median(seconds)),
                     f"{common.seconds_text(min(seconds))} - {common.seconds_text(max(seconds))}",
                     ratio_cell, common.seconds_text(cpu), ", ".join(notes) or "-"])
    auto = ratios.get("auto 150 x 3 ms")
    two, eight = ratios.get("process x2 1000 x 1 ms"), ratios.get("process x8 1000 x 1 ms")
    verdicts = []
    if auto is not None:
        verdicts.append(f"- auto, 150 x 3 ms, cold, another thread alive: {auto:.2f}x serial, target "
                        f"<= {TARGET_AUTO_VS_SERIAL}x: {'met' if auto <= TARGET_AUTO_VS_SERIAL else '**missed**'}")
    if two is not None and eight is not None:
        verdicts.append(f"- cold `process`, 1000 x 1 ms: 8 workers {eight / two:.2f}x the time of 2, target "
                        f"<= 1.0x: {'met' if eight <= two else '**missed**'}")
    fs_two, fs_eight = ratios.get("process x2 forkserver 1000 x 1 ms"), ratios.get("process x8 forkserver 1000 x 1 ms")
    if fs_two is not None and fs_eight is not None:
        verdicts.append(f"- the same with `start_method=\"forkserver\"`: 8 workers {fs_eight / fs_two:.2f}x the time of 2")
    lines = ["# Process start-up", ""] + header + [
        "",
        f"Each case in a fresh interpreter with another thread alive (fork is then unsafe); medians of {rounds} "
        "rounds, the cases in a rotating order each round; ratios against serial for the same work in the "
        "same round (median, and lowest - highest). Items are pure Python spinning for their CPU time. "
        "'CPU, all processes' (median) is the CPU time of the run's own process and of every process it "
        "started, which load elsewhere does not inflate: on an idle machine of N cores a run takes at "
        "least that over N.", ""]
    lines += common.markdown_table(["case", "median", "range", "vs serial", "CPU, all processes", "notes"], rows)
    lines += ["", "## Targets", ""] + verdicts
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2 rounds, written under results/quick")
    parser.add_argument("--cases", help="run only the cases whose names contain one of these "
                        "comma-separated words (with their serial cases)")
    parser.add_argument("--breakdown", action="store_true",
                        help="instead: the CPU of each process a cold start starts (3 runs of 2 and 8 workers, "
                        "loky's start method and forkserver), printed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--breakdown-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    if args.breakdown_child:
        workers, start_method = args.breakdown_child.split(":")
        return breakdown_child(int(workers), start_method)
    if args.breakdown:
        return breakdown(3)
    rounds = 2 if args.quick else args.rounds
    header = common.header_lines("startup.py")  # the load average before the runs add to it
    names = list(CASES)
    if args.cases:
        words = args.cases.split(",")
        chosen = {name for name in names if any(word in name for word in words)}
        chosen |= {CASES[name][2] for name in chosen if CASES[name][2] is not None}
        names = [name for name in names if name in chosen]
    lines = report(measure(rounds, names), rounds, header)
    path = common.write_results("startup.md", lines, args.quick or bool(args.cases))  # a subset is not the table
    print("\n".join(lines))
    print(f"\nwritten: {os.path.relpath(path)}", file=sys.stderr)


if __name__ == "__main__":
    main()
