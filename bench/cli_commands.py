"""`pmap run --cmd 'gzip -9 {}'` against `xargs -P2 -n1 gzip -9` on 200 small files (issue 27).

Each trial gets fresh copies of the files (made outside the timing); the two commands run
alternately, so load from elsewhere falls on both alike. Reported: the median wall time of each
over the trials, its spread (min to max), and the ratio of the medians. A one-item `pmap run
--cmd true` measures what starting pmap costs on its own, so the table also says how much of
the gap is start-up and how much is per file.

pmap runs as an installed package would: with its bytecode cached (PYTHONPYCACHEPREFIX points at
a scratch directory; PYTHONDONTWRITEBYTECODE is dropped), and without OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE, as every benchmark here.

    python bench/cli_commands.py [--files 200] [--sizes 4096,65536] [--repeat 9] [--output FILE]
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
DROPPED = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "PYTHONDONTWRITEBYTECODE")


def environment(cache: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DROPPED}
    env["PYTHONPYCACHEPREFIX"] = cache
    return env


def make_files(directory: str, count: int, size: int) -> list[str]:
    """Text-like files (words from a small vocabulary), so gzip has something to do."""
    rng = random.Random(size)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(500)]
    os.makedirs(directory)
    names = []
    for k in range(count):
        text = []
        length = 0
        while length < size:
            word = rng.choice(words)
            text.append(word)
            length += len(word) + 1
        name = os.path.join(directory, f"file{k:04d}.txt")
        with open(name, "w") as handle:
            handle.write(" ".join(text)[:size])
        names.append(name)
    return names


def fresh_copy(template: str, target: str) -> list[str]:
    if os.path.exists(target):
        shutil.rmtree(target)
    shutil.copytree(template, target)
    return sorted(os.path.join(target, name) for name in os.listdir(target))


def timed(argv: list[str], env: dict, stdin: bytes | None = None) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, input=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({done.returncode}): {done.stderr.decode()[-500:]}")
    return elapsed


def pmap_command() -> list[str]:
    installed = os.path.join(os.path.dirname(sys.executable), "pmap")
    return [installed] if os.path.exists(installed) else [sys.executable, "-m", "pmap"]


def measure(files: int, size: int, repeat: int, workers: int, scratch: str, env: dict) -> dict:
    template = os.path.join(scratch, f"template-{size}")
    make_files(template, files, size)
    work = os.path.join(scratch, "work")
    pmap = pmap_command()
    times: dict[str, list[float]] = {"xargs": [], "pmap": [], "start": []}
    for trial in range(repeat + 1):  # the first trial warms caches and is dropped
        order = ["xargs", "pmap"] if trial % 2 else ["pmap", "xargs"]
        for name in order:
            paths = fresh_copy(template, work)
            if name == "xargs":
                elapsed = timed(["xargs", "-0", "-P", str(workers), "-n", "1", "gzip", "-9"], env,
                                stdin=b"\0".join(p.encode() for p in paths))
            else:
                elapsed = timed([*pmap, "run", "--cmd", "gzip -9 {}", "-j", str(workers), *paths], env)
            if trial:
                times[name].append(elapsed)
        started = timed([*pmap, "run", "--cmd", "true", "x"], env)
        if trial:
            times["start"].append(started)
        gz = [name for name in os.listdir(work) if name.endswith(".gz")]
        if len(gz) != files:
            raise SystemExit(f"expected {files} .gz files, found {len(gz)}")
    return times


def describe(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.0f} ms ({min(values) * 1e3:.0f}-{max(values) * 1e3:.0f})"


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--sizes", default="4096,65536", help="bytes per file, comma-separated")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--workers", type=int, default=2, help="xargs -P and pmap -j")
    parser.add_argument("--output", help="also write the table to this markdown file")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    scratch = tempfile.mkdtemp(prefix="pmap-bench-cmd-")
    env = environment(os.path.join(scratch, "pycache"))
    try:
        rows = []
        for size in (int(s) for s in args.sizes.split(",")):
            times = measure(args.files, size, args.repeat, args.workers, scratch, env)
            xargs, pmap_times, start = (statistics.median(times[k]) for k in ("xargs", "pmap", "start"))
            per_file_gap = (pmap_times - start - xargs) / args.files * 1e3
            rows.append(f"| {args.files} x {size // 1024} KiB | {describe(times['xargs'])} | {describe(times['pmap'])} "
                        f"| **{pmap_times / xargs:.2f}x** | {describe(times['start'])} | {per_file_gap:+.2f} ms |")
        lines = [
            f"# pmap run --cmd against xargs -P{args.workers}",
            "",
            f"`pmap run --cmd 'gzip -9 {{}}' -j {args.workers} FILES` against "
            f"`xargs -0 -P{args.workers} -n1 gzip -9`; median of {args.repeat} alternating trials (min-max). "
            "\"pmap start-up\" is a one-item `pmap run --cmd true x`; \"per file beyond xargs\" is "
            "(pmap - start-up - xargs) / files.",
            "",
            f"Machine: {machine()}; Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}; "
            f"load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after (other work on the "
            "machine widens the spread).",
            "",
            "| files | xargs | pmap | pmap / xargs | pmap start-up | per file beyond xargs |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
        text = "\n".join(lines) + "\n"
        print(text)
        if args.output:
            with open(args.output, "w") as handle:
                handle.write(text)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
