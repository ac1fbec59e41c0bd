"""Per-item overhead of the remote backends (manager, dask) against `process`, on one machine.

    python bench/remote_overhead.py                     # 20,000 items, 5 runs per case
    python bench/remote_overhead.py --items 5000 --repeat 3 --backends process,manager

The workload is a one-line function (x + 1), so nearly all of a run's time is overhead.
Each backend runs as a Pool with 2 workers, so start-up is timed apart from the runs:
- start-up: open the Pool and map one item;
- adaptive: map N items with pmap's adaptive chunking (what users get by default);
- one item per task: map N/10 items with chunksize=1 (the cost of one task round trip).
The overhead per item is (median run time - serial time) / items. All on loopback.
"""
import argparse
import statistics
import sys
import time

import pmap


def plus_one(x):
    return x + 1


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def measure(backend: str, items: int, repeat: int, workers: int) -> dict:
    data = list(range(items))
    few = data[: max(1, items // 10)]
    start = time.perf_counter()
    pool = pmap.Pool(backend=backend, workers=workers)
    try:
        assert pool.map(plus_one, [1]) == [2]
        startup = time.perf_counter() - start
        adaptive, single = [], []
        for _ in range(repeat):  # alternate the two cases, so drift affects both alike
            adaptive.append(timed(lambda: pool.map(plus_one, data)))
            single.append(timed(lambda: pool.map(plus_one, few, chunksize=1)))
    finally:
        pool.close()
    return {"startup": startup, "adaptive": statistics.median(adaptive), "single": statistics.median(single),
            "n_adaptive": len(data), "n_single": len(few)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backends", default="process,manager,dask")
    args = parser.parse_args(argv)

    serial_seconds = statistics.median(timed(lambda: list(map(plus_one, range(args.items))))
                                       for _ in range(args.repeat))
    serial_per_item = serial_seconds / args.items
    rows = []
    for name in args.backends.split(","):
        info = {b.name: b for b in pmap.backends()}.get(name)
        if info is None or not info.available:
            print(f"skipping {name}: {info.reason if info else 'not registered'}", file=sys.stderr)
            continue
        result = measure(name, args.items, args.repeat, args.workers)
        rows.append((name, result))

    print(f"{args.items} calls of x + 1; {args.workers} workers; medians of {args.repeat} runs; "
          f"serial: {serial_per_item * 1e6:.2f} us per item\n")
    print("| backend | start-up (s) | adaptive: run (s) | adaptive: overhead per item (us) "
          "| one item per task: overhead per item (us) | vs process (adaptive) |")
    print("|---|---|---|---|---|---|")
    base = None
    for name, r in rows:
        adaptive_over = (r["adaptive"] - serial_per_item * r["n_adaptive"]) / r["n_adaptive"]
        single_over = (r["single"] - serial_per_item * r["n_single"]) / r["n_single"]
        if name == "process":
            base = adaptive_over
        ratio = f"{adaptive_over / base:.1f}x" if base else "-"
        print(f"| {name} | {r['startup']:.2f} | {r['adaptive']:.3f} | {adaptive_over * 1e6:.1f} "
              f"| {single_over * 1e6:.0f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
