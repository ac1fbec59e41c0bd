"""What `timeout=` costs per item: 100,000 calls of x + 1, with and without a timeout.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/timeout_cost.py [--items N] [--repeats R]

Each repeat runs the same map twice, without and with `timeout=30`, in alternating order, and
the table gives the medians of the walls, the median of the paired differences per item and
its spread (the lowest and highest difference of the repeats). Under a timeout a worker marks
each item's start (one 8-byte store in its slot, or a tuple under a lock for threads) and the
engine asks which item runs only when a deadline could have passed, so the chunks stay as
large as without one. `--one-item` also times the old way (one item per task, `chunksize=1`)
on a tenth of the items, for scale.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import pmap

BACKENDS = ("thread", "process", "fork", "pool")
TIMEOUT = 30.0


def add_one(x):
    return x + 1


def wall(backend: str, items: int, **options) -> tuple[float, int]:
    started = time.perf_counter()
    out = pmap.pmap(add_one, range(items), backend=backend, **options)
    seconds = time.perf_counter() - started
    assert out[-1] == items and out.stats.timed_out == 0
    return seconds, out.stats.tasks


def measure(backend: str, items: int, repeats: int) -> dict:
    wall(backend, items)  # warm: loky's executor, imports, the function's first pickling
    plain, timed, differences, tasks = [], [], [], {}
    for repeat in range(repeats):
        order = (None, TIMEOUT) if repeat % 2 == 0 else (TIMEOUT, None)
        walls = {}
        for timeout in order:
            walls[timeout], tasks[timeout] = wall(backend, items, timeout=timeout)
        plain.append(walls[None])
        timed.append(walls[TIMEOUT])
        differences.append((walls[TIMEOUT] - walls[None]) / items)
    return {"plain": statistics.median(plain), "timed": statistics.median(timed),
            "per_item": statistics.median(differences), "low": min(differences), "high": max(differences),
            "tasks": (tasks[None], tasks[TIMEOUT])}


def one_item_per_task(backend: str, items: int) -> float:
    seconds, _ = wall(backend, items, timeout=TIMEOUT, chunksize=1)
    return seconds / items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--one-item", action="store_true", help="also time one item per task (slow on process)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args()
    import os
    print(f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.items:,} items of x + 1, "
          f"{args.repeats} repeats, timeout={TIMEOUT:g}\n")
    header = "| backend | without timeout (median) | with timeout (median) | added per item, median [min, max] | tasks without / with |"
    if args.one_item:
        header += " one item per task, per item |"
    print(header)
    print("|---|---:|---:|---:|---:|" + ("---:|" if args.one_item else ""))
    for backend in args.backends.split(","):
        result = measure(backend, args.items, args.repeats)
        row = (f"| {backend} | {result['plain']:.3f} s | {result['timed']:.3f} s | "
               f"{result['per_item'] * 1e6:+.2f} µs [{result['low'] * 1e6:+.2f}, {result['high'] * 1e6:+.2f}] | "
               f"{result['tasks'][0]} / {result['tasks'][1]} |")
        if args.one_item:
            row += f" {one_item_per_task(backend, max(1, args.items // 10)) * 1e6:.1f} µs |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
