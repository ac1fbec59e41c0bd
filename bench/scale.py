"""How pmap's cost per item grows with the number of items, their size and the workers (issue
29's scale page): `pool.imap(len, items)` on a warm `pmap.Pool`, items (distinct bytes objects)
from a generator, on thread, process and fork.

    python bench/scale.py                 # the three sweeps below, 3 runs per cell
    python bench/scale.py --quick         # a smoke run: smaller counts, 1 run

Three sweeps, each varying one thing from a middle setting:
- items: 1e3, 1e4, 1e5 and 1e6 items of 1 KB, 2 workers;
- item size: 1, 4, 16 and 100 KB, 10,000 items, 2 workers;
- workers: 1, 2, 4, 8 and 16, 100,000 items of 1 KB.

Every run is a fresh process that opens the pool (its start-up is reported apart), runs one
item through it, then times the run: cost per item is that time over the items. Medians of
the runs, with the lowest and highest.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (the bench directory, also when run from elsewhere)
from memory import items  # noqa: E402

BACKENDS = ("thread", "process", "fork")
SWEEPS = {
    "items": [(2, count, 1_000) for count in (1_000, 10_000, 100_000, 1_000_000)],
    "item size": [(2, 10_000, size) for size in (1_000, 4_000, 16_000, 100_000)],
    "workers": [(workers, 100_000, 1_000) for workers in (1, 2, 4, 8, 16)],
}
QUICK_DIVISOR = 100   # --quick: counts this many times smaller


def child(backend: str, workers: int, count: int, size: int) -> None:
    import warnings

    import pmap
    warnings.simplefilter("ignore")  # the data-rate warning: moving bytes is part of what this measures
    started = time.perf_counter()
    with pmap.Pool(backend=backend, workers=workers) as pool:
        assert pool.map(len, [b""]) == [0]  # the workers are up
        startup = time.perf_counter() - started
        started = time.perf_counter()
        results = pool.imap(len, items(count, size))
        total = sum(results)
        seconds = time.perf_counter() - started
    assert total == count * size
    common.emit({"seconds": seconds, "startup": startup, "peak_held_mb": results.stats.peak_bytes_held / 1e6})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help="comma-separated: " + ", ".join(SWEEPS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--limit", type=float, default=900, help="seconds before a run is killed")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", help="also write the tables to this markdown file")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        backend, workers, count, size = args.child
        child(backend, int(workers), int(count), int(size))
        return
    common.install_signal_handlers()
    if args.quick:
        args.repeat = 1
    backends = args.backends.split(",")
    lines = common.header_lines("scale.py")
    for sweep in args.sweeps.split(","):
        rows = []
        for workers, count, size in SWEEPS[sweep]:
            if args.quick:
                count = max(100, count // QUICK_DIVISOR)
            for backend in backends:
                runs = []
                for _ in range(args.repeat):
                    result = common.run_child([os.path.abspath(__file__), "--child", backend, str(workers), str(count),
                                               str(size)], limit=args.limit)
                    if result.output is None:
                        common.log(f"{backend} x{workers} {count} x {size} B failed:\n{result.stderr[-2000:]}")
                        continue
                    runs.append(result.output)
                common.log(f"{sweep}: {backend} x{workers}, {count:,} items of {size:,} B: {runs}")
                rows.append(row(backend, workers, count, size, runs))
        lines += ["", f"### {sweep.capitalize()}", ""]
        lines += common.markdown_table(["backend", "workers", "items", "item size", "start-up s",
                                        "run s (min-max)", "µs per item (min-max)", "ns per byte",
                                        "peak held MB"], rows, first_left=1)
        if args.output:  # after each sweep, so a long session keeps what it finished
            with open(args.output, "w") as handle:
                handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def row(backend: str, workers: int, count: int, size: int, runs: list) -> list:
    if not runs:
        return [backend, workers, f"{count:,}", f"{size / 1000:g} KB", "failed", "", "", "", ""]
    seconds = [r["seconds"] for r in runs]
    per_item = [s / count * 1e6 for s in seconds]
    middle = statistics.median(seconds)
    startup = statistics.median(r["startup"] for r in runs)
    return [backend, workers, f"{count:,}", f"{size / 1000:g} KB", f"{startup:.2f}",
            f"{middle:.3f} ({min(seconds):.3f}-{max(seconds):.3f})",
            f"{statistics.median(per_item):.2f} ({min(per_item):.2f}-{max(per_item):.2f})",
            f"{middle / (count * size) * 1e9:.2f}", f"{max(r['peak_held_mb'] for r in runs):.1f}"]


if __name__ == "__main__":
    main()
