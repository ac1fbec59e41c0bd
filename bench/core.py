"""The core backends next to multiprocessing.Pool(2).map with its default chunksize, in one run.

    python bench/core.py [--repeat 5]

Two workloads: 100,000 calls of `lambda x: x + 1` (pure overhead) and 100 calls of a ~5 ms
pure-Python loop. Times are medians of --repeat runs, start-up included (a fresh pool or
backend per run, as a one-shot script would have).
"""
from __future__ import annotations

import argparse
import multiprocessing
import platform
import statistics
import time

import pmap

BACKENDS = ("serial", "thread", "process", "pool", "fork")


def loop_5ms(n=110_000):
    total = 0
    for i in range(n):
        total += i * i
    return total


def add_one(x):
    return x + 1


def stdlib_pool(fn, items):
    with multiprocessing.get_context("fork").Pool(2) as pool:
        return pool.map(fn, items)


def median_time(run, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    workloads = {
        "100,000 x lambda x: x + 1": (lambda x: x + 1, add_one, list(range(100_000))),
        "100 x 5 ms loop": (loop_5ms, loop_5ms, [110_000] * 100),
    }
    print(f"Python {platform.python_version()}, {multiprocessing.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}; medians of {args.repeat} runs\n")
    print("| workload | " + " | ".join(BACKENDS) + " | multiprocessing.Pool(2).map |")
    print("|---" * (len(BACKENDS) + 2) + "|")
    for label, (fn, picklable_fn, items) in workloads.items():
        expected = list(map(fn, items))
        cells = []
        for backend in BACKENDS:
            assert pmap.pmap(fn, items, backend=backend, workers=2 if backend != "serial" else None) == expected
            seconds = median_time(lambda: pmap.pmap(fn, items, backend=backend,
                                                    workers=2 if backend != "serial" else None), args.repeat)
            cells.append(f"{seconds * 1e3:.0f} ms")
        seconds = median_time(lambda: stdlib_pool(picklable_fn, items), args.repeat)
        cells.append(f"{seconds * 1e3:.0f} ms")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
