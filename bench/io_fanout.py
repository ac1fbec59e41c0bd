"""IO fan-out: many items that each wait (50 ms by default), on greenlet, thread and asyncio at
high concurrency. Prints a markdown table of wall time and peak memory, medians of several runs.

    python bench/io_fanout.py                      # 10,000 items, workers 1000 and 5000, 5 runs
    python bench/io_fanout.py --workers 1000 --repeat 3

Every run is a fresh process, so peak memory belongs to that run alone. The greenlet runs patch
with gevent.monkey.patch_all() first, as a program using gevent does; the thread runs wait in
time.sleep, the asyncio runs in asyncio.sleep.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

BACKENDS = ("greenlet", "thread", "asyncio")


def child(backend: str, workers: int, items: int, wait: float) -> None:
    """One run, in this process; prints its numbers as one JSON line."""
    if backend == "greenlet":
        from gevent import monkey
        monkey.patch_all()
    import resource
    import time

    import pmap
    pmap.pmap  # the package loads its API on first use; that import is not the run's

    if backend == "asyncio":
        import asyncio

        async def task(x):
            await asyncio.sleep(wait)
            return x
    else:
        def task(x):
            time.sleep(wait)
            return x

    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = pmap.pmap(task, range(items), backend=backend, workers=workers)
    elapsed = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"elapsed": elapsed, "peak_kb": peak_kb, "growth_kb": peak_kb - rss_before_kb,
                      "correct": out == list(range(items))}))


def run_once(backend: str, workers: int, items: int, wait: float) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", backend, str(workers),
                           str(items), str(wait)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} x{workers} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["correct"]:
        raise RuntimeError(f"{backend} x{workers} returned wrong results")
    return result


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from pmap.backends.base import usable_cpus
    try:
        import gevent
        gevent_version = gevent.__version__
    except ImportError:
        gevent_version = "not installed"
    return (f"{cpu}, {usable_cpus()} usable CPUs, {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()} ({platform.python_implementation()}), gevent {gevent_version}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--wait", type=float, default=0.05, help="seconds each item waits")
    parser.add_argument("--workers", default="1000,5000", help="comma-separated concurrency levels")
    parser.add_argument("--repeat", type=int, default=5, help="runs per cell; the table shows medians")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run at tiny sizes: 200 items, 50 and 100 workers, 1 run per cell")
    parser.add_argument("--child", nargs=4, metavar=("BACKEND", "WORKERS", "ITEMS", "WAIT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        backend, workers, items, wait = args.child
        child(backend, int(workers), int(items), float(wait))
        return

    if args.quick:
        args.items, args.workers, args.repeat = 200, "50,100", 1
    serial_sum = args.items * args.wait
    levels = [int(w) for w in args.workers.split(",")]
    backends = args.backends.split(",")
    rows = []
    for workers in levels:
        for backend in backends:
            runs = [run_once(backend, workers, args.items, args.wait) for _ in range(args.repeat)]
            times = [r["elapsed"] for r in runs]
            best_possible = -(-args.items // workers) * args.wait  # every worker busy all along
            median = statistics.median(times)
            rows.append([backend, f"{workers:,}", f"{median:.2f}", f"{min(times):.2f}-{max(times):.2f}",
                         f"{best_possible / median:.0%}", f"{serial_sum / median:,.0f}x",
                         f"{statistics.median(r['peak_kb'] for r in runs) / 1024:.0f}",
                         f"{statistics.median(r['growth_kb'] for r in runs) / 1024:.0f}"])
            print(f"  {backend} x{workers}: median {median:.2f}s", file=sys.stderr)

    print(f"IO fan-out: {args.items:,} items of {args.wait * 1000:g} ms waits "
          f"(serial sum {serial_sum:,.0f} s), median of {args.repeat} runs, each in a fresh process.")
    print(f"Machine: {machine()}.")
    print()
    header = ["backend", "workers", "time (s)", "range (s)", "of ideal", "vs serial sum",
              "peak RSS (MB)", "RSS growth (MB)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    print("'of ideal' compares with ceil(items / workers) x wait, the time perfect overlap would take; "
          "RSS growth is the peak during the run minus the peak before it (after imports).")


if __name__ == "__main__":
    main()
