"""What streaming big items costs in memory and time (issue 29): `pmap.imap(len, items)` over
items of 1 KB, 16 KB and 100 KB from a generator, on process, pool, fork and thread.

    python bench/memory.py                                   # 300,000 items, 3 runs per cell
    python bench/memory.py --baseline ../pmap-at-4fd9062     # also the 1 KB runs of that checkout
    python bench/memory.py --quick                           # a smoke run: 3,000 items, 1 run

Every run is a fresh process. In it a sampling thread reads, every 20 ms, the RSS of the
process and of all its descendants (the workers), summed; growth is the peak of that sum less
the caller's RSS just before the run. Fork's workers share pages with the caller copy-on-write,
which their RSS counts again, so fork's growth is an upper bound. Time is the run's wall time,
start-up included; CPU is the CPU time of the caller and its workers during the run, which
load from elsewhere changes much less than wall time (a reniced run on a busy machine waits).
Target: growth under 300 MB, and time per byte no more than 1.1x that of the 1 KB run of the
baseline (the code before byte budgets), measured in the same session; rounds run every cell
once in turn, so load from elsewhere falls on all of them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (the bench directory, also when run from elsewhere)

BACKENDS = ("process", "pool", "fork", "thread")
SIZES = (1_000, 16_000, 100_000)
SAMPLE_SECONDS = 0.02
TARGET_GROWTH_MB = 300
TARGET_PER_BYTE = 1.1


def items(count: int, size: int):
    """`count` distinct bytes objects of `size` bytes (distinct, so pickle cannot share them)."""
    template = bytes(range(256)) * (size // 256 + 2)
    for i in range(count):
        start = i % 256
        yield template[start:start + size]


class Usage:
    """Samples the summed RSS of this process and its descendants, and the CPU time each has
    used, until stopped."""

    def __init__(self):
        import psutil
        self.me = psutil.Process()
        self.cpu_before = self._cpu(self.me)
        self.cpu: dict = {}   # pid -> CPU seconds last seen
        self.peak = self.total()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    @staticmethod
    def _cpu(process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    def total(self) -> int:
        import psutil
        rss = 0
        for process in [self.me, *self.me.children(recursive=True)]:
            try:
                rss += process.memory_info().rss
                self.cpu[process.pid] = self._cpu(process)
            except psutil.Error:  # a worker that ended between the listing and the read
                pass
        return rss

    def _sample(self) -> None:
        while not self.stopping.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak, self.total())

    def stop(self) -> tuple[int, float]:
        """The peak RSS, and the CPU seconds used since the start (a worker's, as last seen)."""
        self.stopping.set()
        self.thread.join()
        peak = max(self.peak, self.total())
        return peak, sum(self.cpu.values()) - self.cpu_before


def child(backend: str, size: int, count: int) -> None:
    import warnings

    import psutil

    import pmap
    warnings.simplefilter("ignore")  # the data-rate warning: moving bytes is what this measures
    options = {"start_method": "fork"} if backend == "pool" else {}  # this script's __main__ is not importable
    before = psutil.Process().memory_info().rss
    usage = Usage()
    started = time.perf_counter()
    results = pmap.imap(len, items(count, size), backend=backend, **options)
    total = sum(results)
    seconds = time.perf_counter() - started
    peak, cpu = usage.stop()
    assert total == count * size, (total, count * size)
    stats = results.stats
    common.emit({"seconds": seconds, "cpu": cpu, "growth_mb": (peak - before) / 1e6,
                 "peak_held_mb": getattr(stats, "peak_bytes_held", 0) / 1e6,
                 "max_chunk": max(stats.chunk_sizes) if stats.chunk_sizes else None,
                 "workers": stats.workers})


def spread(values: list, digits: int) -> str:
    middle = statistics.median(values)
    if len(values) == 1:
        return f"{middle:.{digits}f}"
    return f"{middle:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=300_000)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="item sizes in bytes")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell")
    parser.add_argument("--baseline", metavar="DIR", help="a checkout of the code to compare with: its 1 KB runs "
                                                          "give the time per byte to meet")
    parser.add_argument("--limit", type=float, default=1800, help="seconds before a run is killed")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", help="also write the table to this markdown file")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    common.install_signal_handlers()
    header = common.header_lines("memory.py")  # the load average at the start
    if args.quick:
        args.items, args.repeat = 3_000, 1
    sizes = [int(s) for s in args.sizes.split(",")]
    backends = args.backends.split(",")
    cells = [(backend, size, "this") for size in sizes for backend in backends]
    if args.baseline:
        cells = [(backend, min(sizes), "baseline") for backend in backends] + cells
    runs: dict = {cell: [] for cell in cells}
    for round_ in range(args.repeat):  # rounds, so load from elsewhere falls on every cell alike
        for cell in cells:
            backend, size, code = cell
            path = os.environ.get("PYTHONPATH", "")
            if code == "baseline":
                os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(args.baseline), path) if p)
            try:
                result = common.run_child([os.path.abspath(__file__), "--child", backend, str(size), str(args.items)],
                                          limit=args.limit)
            finally:
                os.environ["PYTHONPATH"] = path
            if result.output is None:
                common.log(f"{backend} {size} B ({code}) failed:\n{result.stderr[-2000:]}")
                continue
            runs[cell].append(result.output)
            common.log(f"round {round_ + 1}: {backend:8} {size:>7} B {code:8} {json.dumps(result.output)}")
    print_table(args, header, cells, runs)


def print_table(args, header_lines: list, cells: list, runs: dict) -> None:
    base = {}  # backend -> (wall, CPU) seconds per byte of the baseline's 1 KB run
    for (backend, size, code), outputs in runs.items():
        if code == "baseline" and outputs:
            base[backend] = tuple(statistics.median(o[key] for o in outputs) / (args.items * size)
                                  for key in ("seconds", "cpu"))
    rows = []
    for cell in cells:
        backend, size, code = cell
        outputs = runs[cell]
        if not outputs:
            rows.append([backend, f"{size / 1000:g} KB", code, "failed"] + [""] * 7)
            continue
        seconds = [o["seconds"] for o in outputs]
        cpu = [o["cpu"] for o in outputs]
        per_byte = statistics.median(seconds) / (args.items * size)
        cpu_per_byte = statistics.median(cpu) / (args.items * size)
        ratios = ["", ""]
        if backend in base:
            ratios = [f"{per_byte / base[backend][0]:.2f}x", f"{cpu_per_byte / base[backend][1]:.2f}x"]
        rows.append([backend, f"{size / 1000:g} KB", code, spread([o["growth_mb"] for o in outputs], 0),
                     spread(seconds, 2), spread(cpu, 2), f"{per_byte * 1e9:.2f}", *ratios,
                     f"{max(o['peak_held_mb'] for o in outputs):.1f}" if code == "this" else "-",
                     max(o["max_chunk"] or 0 for o in outputs)])
    header = ["backend", "item", "code", "peak RSS growth MB (min-max)", "time s (min-max)", "CPU s (min-max)",
              "ns per byte", "time per byte vs baseline 1 KB", "CPU per byte vs baseline 1 KB",
              "peak held MB (.stats)", "largest chunk"]
    lines = header_lines + [
        f"`pmap.imap(len, items)` over {args.items:,} items from a generator; medians of {args.repeat} "
        f"run(s), each in a fresh process. Targets: growth under {TARGET_GROWTH_MB} MB, time per byte "
        f"at most {TARGET_PER_BYTE}x the baseline's 1 KB run.", ""]
    lines += common.markdown_table(header, rows)
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
