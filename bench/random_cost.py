"""What `seed=` costs per item (issue 26): the same run with and without it.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/random_cost.py [--items N] [--repeat R]

Two views:
- the wrapper alone (timeit, in this thread's CPU time, so that other processes' load does not
  count): what one seeded call adds to a function that does nothing, where the module-level
  generators are seeded (process backends, serial) and where they are shared (thread, greenlet,
  asyncio);
- whole runs of a tiny function (x + 1) on serial, thread and process, seeded and not, taken in
  alternation so that load from elsewhere falls on both alike. The extra per item is
  (seeded wall - plain wall) / items; on process it is also given per worker (times the workers),
  which is the CPU each worker spends on it.
Medians of the repeats, with the lowest and highest in brackets.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pmap  # noqa: E402
from pmap.seeding import OWN, SHARED, Seeded  # noqa: E402


def add_one(x):
    return x + 1


def nothing(x):
    return x


def _spread(values: list[float], scale: float = 1e6) -> str:
    return (f"{statistics.median(values) * scale:.2f} "
            f"[{min(values) * scale:.2f}, {max(values) * scale:.2f}]")


def wrapper_cost(repeat: int) -> list[tuple[str, list[float]]]:
    """Seconds one seeded call adds over the bare call, per way of seeding."""
    calls = 20_000
    bare = timeit.repeat("fn((7, 7))", globals={"fn": lambda pair: nothing(pair[1])}, number=calls, repeat=repeat,
                         timer=time.thread_time)
    rows = []
    for label, mode in (("module-level generators seeded (serial, fork, pool, process, manager)", OWN),
                        ("module-level generators shared (thread, greenlet, asyncio)", SHARED)):
        seeded = Seeded(nothing, 2024, mode)
        for index in range(8):  # past the first items, whose module-level use a shared run checks
            seeded((index, index))
        times = timeit.repeat("fn((123456, 7))", globals={"fn": seeded}, number=calls, repeat=repeat,
                              timer=time.thread_time)
        rows.append((label, [(t - b) / calls for t, b in zip(times, bare)]))
    return rows


def run_cost(backend: str, items: int, repeat: int) -> tuple[list[float], list[float], int]:
    """Per-item extra wall seconds of each seeded run against the plain run beside it, the plain
    runs' per-item seconds, and the workers."""
    data = list(range(items))
    pmap.pmap(add_one, data, backend=backend, seed=1)  # workers started, numpy imported in them
    extra, plain_per_item = [], []
    workers = 1
    for _ in range(repeat):
        started = time.perf_counter()
        out = pmap.pmap(add_one, data, backend=backend)
        plain = time.perf_counter() - started
        started = time.perf_counter()
        pmap.pmap(add_one, data, backend=backend, seed=1)
        seeded = time.perf_counter() - started
        workers = out.stats.workers
        extra.append((seeded - plain) / items)
        plain_per_item.append(plain / items)
    return extra, plain_per_item, workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    try:
        import numpy
        numpy_text = f"numpy {numpy.__version__} (its legacy global state is seeded too)"
    except ImportError:
        numpy_text = "numpy not installed (only `random` is seeded)"
    print(f"Python {platform.python_version()}, {numpy_text}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print("The wrapper alone, CPU microseconds per call, median [min, max] of", args.repeat, "\n")
    print("| where | extra per item |")
    print("|---|---:|")
    for label, values in wrapper_cost(args.repeat):
        print(f"| {label} | {_spread(values)} |")
    print(f"\nWhole runs of x + 1 over {args.items:,} items, microseconds per item, median [min, max] of "
          f"{args.repeat}\n")
    print("| backend | workers | plain run | extra with seed= | extra per worker |")
    print("|---|---:|---:|---:|---:|")
    for backend in ("serial", "thread", "process"):
        extra, plain, workers = run_cost(backend, args.items, args.repeat)
        # threads share one interpreter: only processes spend the extra in parallel, once per worker
        per_worker = _spread([e * workers for e in extra]) if backend == "process" else "-"
        print(f"| {backend} | {workers} | {_spread(plain)} | {_spread(extra)} | {per_worker} |")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
