"""What always-on run statistics cost on the tiny workload (200,000 calls of x + 1).

    python bench/stats_overhead.py

Statistics are updated once per task, never per item. This times exactly those updates
(the same statements the engine runs per task) on a RunStats, multiplies by the number of
tasks each backend's run used, and sets that against the run's median wall time.
"""
from __future__ import annotations

import platform
import statistics
import time
import timeit

import pmap
from pmap.engine import RunStats

ITEMS = 200_000


def add_one(x):
    return x + 1


def per_task_update_seconds(repeat: int = 200_000) -> float:
    stats = RunStats()
    setup_globals = {"stats": stats, "time": time}
    # the engine's per-task statements: submit, done, progress
    statement = (
        "stats.tasks += 1\n"
        "if len(stats.chunk_sizes) < 1000: stats.chunk_sizes.append(7)\n"
        "stats.busy_seconds += 0.001\n"
        "stats.busy_by_worker[1] = stats.busy_by_worker.get(1, 0.0) + 0.001\n"
        "if stats.first_result_seconds is None: stats.first_result_seconds = 0.0\n"
        "stats.items_done += 7\n")
    return timeit.timeit(statement, globals=setup_globals, number=repeat) / repeat


def main() -> None:
    per_task = per_task_update_seconds()
    print(f"Python {platform.python_version()}; stats updates cost {per_task * 1e9:.0f} ns per task\n")
    print("| backend | tasks | median wall | stats share |")
    print("|---|---:|---:|---:|")
    for backend in ("auto", "serial", "thread", "process", "fork"):
        walls, tasks = [], 0
        for _ in range(5):
            out = pmap.pmap(add_one, range(ITEMS), backend=backend)
            walls.append(out.stats.wall_seconds)
            tasks = out.stats.tasks
        wall = statistics.median(walls)
        print(f"| {backend} | {tasks} | {wall * 1e3:.1f} ms | {tasks * per_task / wall:.3%} |")


if __name__ == "__main__":
    main()
