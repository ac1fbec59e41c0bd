"""What pmap costs on work too small to parallelise: 200,000 calls of `x + 1`, as `list(map(...))`,
the serial backend and auto (issue 24: auto within 1.1x of list(map)), and the floor of any
chunked run: slicing chunks and copying their values into one list, without pmap.

    python bench/tiny.py                    # 21 rounds; prints a markdown table
    python bench/tiny.py --rounds 41 --items 200000
    python bench/tiny.py --profile "pmap auto"  # where auto's time goes (cProfile, cumulative)
    python bench/tiny.py --instructions     # CPU instructions per run under valgrind: blind to load

Each round runs the three once, in a rotating order, so a burst of load elsewhere falls on all
of them alike; the results are freed after the clock stops, as a caller keeps them. Ratios are
per round (pmap's time over list(map)'s in the same round), then the median and the spread
(lowest to highest, and the middle half) over the rounds.

On a busy machine the wall ratios wander by 0.2x from run to run. `--instructions` counts the
instructions each runner executes under valgrind's callgrind (one child per runner, run 2 and
then 12 times: the difference over 10 is one run's count, start-up and imports cancelled out).
It misses cache and memory stalls but not the work itself, and gives the same count under any load.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import pmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (the bench directory, also when run from elsewhere)


def plus_one(x):
    return x + 1


def chunked_floor(items: list, chunk: int = 25_000) -> list:
    """The least any chunked run can do: slice a chunk, map it into a list of its own, copy that
    into the result. No engine, no backend: what the chunking itself costs."""
    out: list = []
    for start in range(0, len(items), chunk):
        values: list = []
        values.extend(map(plus_one, items[start:start + chunk]))
        out.extend(values)
    return out


RUNNERS = {
    "list(map)": lambda items: list(map(plus_one, items)),
    "chunked floor (no pmap)": chunked_floor,
    "pmap serial": lambda items: pmap.pmap(plus_one, items, backend="serial"),
    "pmap auto": lambda items: pmap.pmap(plus_one, items),
}


def measure(items: list, rounds: int) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {name: [] for name in RUNNERS}
    names = list(RUNNERS)
    expected = RUNNERS["list(map)"](items)
    for name in names:  # warm up: imports, the backends' classes, the first allocation of a big list
        assert RUNNERS[name](items) == expected, name
    for round_number in range(rounds):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()  # no collection left over from the runner before
            start = time.perf_counter()
            out = RUNNERS[name](items)
            seconds[name].append(time.perf_counter() - start)
            del out  # freed untimed: a caller keeps its results (as bench/common.measure does)
    return seconds


def quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def report(seconds: dict[str, list[float]], items: int, rounds: int) -> list[str]:
    reference = seconds["list(map)"]
    rows = []
    for name, times in seconds.items():
        ratios = [t / r for t, r in zip(times, reference)]
        low, high = quartiles(ratios)
        rows.append([name, f"{statistics.median(times) * 1e3:.2f} ms",
                     f"{min(times) * 1e3:.2f} - {max(times) * 1e3:.2f} ms",
                     f"{statistics.median(ratios):.3f}x", f"{low:.3f} - {high:.3f}x",
                     f"{min(ratios):.3f} - {max(ratios):.3f}x"])
    header = common.header_lines("tiny.py")
    return header + ["", f"{items:,} calls of `x + 1`; {rounds} rounds, each runner once per round in a "
                     "rotating order; ratios per round against list(map) in the same round.", ""] + \
        common.markdown_table(["runner", "median", "range", "ratio (median)", "ratio (middle half)",
                               "ratio (range)"], rows)


def profile(items: list, name: str, runs: int) -> None:
    run = RUNNERS[name]
    run(items)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(runs):
        run(items)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


def _callgrind_instructions(name: str, items: int, runs: int) -> int:
    """Instructions callgrind counts for a child that runs `name` once to warm up, then `runs` times."""
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "callgrind.out")
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                        os.path.abspath(__file__), "--items", str(items), "--child-runs", str(runs), name],
                       check=True, capture_output=True,
                       env={k: v for k, v in os.environ.items() if k not in common.SLOW_BLAS_VARIABLES})
        with open(out) as counts:
            for line in counts:
                if line.startswith("summary:"):
                    return int(line.split()[1])
    raise RuntimeError("callgrind wrote no summary")


def instructions(items: int) -> list[str]:
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind on the PATH")
    per_run = {name: (_callgrind_instructions(name, items, 12) - _callgrind_instructions(name, items, 2)) / 10
               for name in RUNNERS}
    reference = per_run["list(map)"]
    rows = [[name, f"{count / 1e6:.1f} M", f"{count / reference:.3f}x"] for name, count in per_run.items()]
    return common.header_lines("tiny.py") + ["", f"{items:,} calls of `x + 1`: instructions per run under "
                                             "callgrind (12 runs less 2, over 10).", ""] + \
        common.markdown_table(["runner", "instructions", "ratio"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--profile", choices=sorted(RUNNERS), help="profile this runner instead")
    parser.add_argument("--instructions", action="store_true", help="count instructions under valgrind instead")
    parser.add_argument("--child-runs", type=int, help=argparse.SUPPRESS)  # one callgrind child's runs
    parser.add_argument("runner", nargs="?", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    items = list(range(args.items))
    if args.child_runs is not None:
        for _ in range(args.child_runs + 1):
            RUNNERS[args.runner](items)
        return None
    if args.instructions:
        print("\n".join(instructions(args.items)))
        return None
    if args.profile:
        return profile(items, args.profile, args.rounds)
    print("\n".join(report(measure(items, args.rounds), args.items, args.rounds)))


if __name__ == "__main__":
    main()
