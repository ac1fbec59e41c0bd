"""What the benchmark scripts share besides the workloads: the machine description, the timing
loop, child processes (each run isolated, leftovers found and ended), and markdown tables.

Every child process a script starts carries a tag in its environment. Workers inherit it
(fork, spawn, forkserver and loky all pass the environment on), so after a child is gone
any process still carrying its tag was left behind, wherever it was re-parented to.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
TAG_VARIABLE = "PMAP_BENCH_TAG"
# Set on some machines, they pick a slower OpenBLAS kernel for a current numpy: the measured
# children run without them (the tests leave the environment as it is).
SLOW_BLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
LIBRARIES = ("pmap-parallel", "loky", "cloudpickle", "joblib", "mpire", "pebble", "gevent", "psutil",
             "matplotlib")

# Workers started by spawn or forkserver import the workload modules by name.
if BENCH_DIR not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (BENCH_DIR, os.environ.get("PYTHONPATH")) if p)


# ---- the machine ------------------------------------------------------------------------
def usable_cpus() -> int:
    from pmap.backends.base import usable_cpus as pmap_usable_cpus
    return pmap_usable_cpus()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_summary() -> str:
    import psutil
    memory_gb = psutil.virtual_memory().total / 2**30
    return (f"{cpu_model()}, {usable_cpus()} usable cores ({os.cpu_count()} logical), "
            f"{memory_gb:.0f} GB memory; {platform.system()} {platform.release()}")


def versions() -> str:
    found = [f"Python {platform.python_version()} ({platform.python_implementation()})"]
    for name in LIBRARIES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def git_revision() -> str:
    """The checked-out commit, marked when the tree has changes to pmap/ (others edit it live)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=BENCH_DIR, capture_output=True, text=True).stdout.strip()
    try:
        revision = git("rev-parse", "--short", "HEAD") or "unknown"
        return revision + (" with local changes to pmap/" if git("status", "--porcelain", "--", "../pmap") else "")
    except OSError:
        return "unknown"


def load_average() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def header_lines(script: str) -> list[str]:
    """The lines every results file starts with: how it was made and on what."""
    command = shlex.join(["python", f"bench/{script}", *sys.argv[1:]])
    return [f"Command: `{command}`; pmap at commit {git_revision()}  ",
            f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}; load average at start: {load_average()}  ",
            f"Machine: {machine_summary()}  ",
            f"Versions: {versions()}"]


# ---- timing -----------------------------------------------------------------------------
@dataclass
class Runner:
    """One way of mapping a function over items: a pmap backend, a peer, or the plain map."""

    name: str
    group: str                                    # reference | pmap | peer
    run: Callable[[Callable, list], list]
    before: Callable[[], None] | None = None      # untimed, before each run (e.g. a cold start)
    concurrency: int | None = None                # items in flight at once, for the IO ideal
    describe: Callable[[Any], str] | None = None  # a note from the returned results (auto's plan)
    max_runs: int | None = None                   # fewer runs for a slow reference whose time is known
    warm: bool = False                            # reuses workers started before the timed run


@dataclass
class Measured:
    name: str
    group: str
    seconds: list = field(default_factory=list)
    error: str | None = None
    note: str = ""
    concurrency: int | None = None
    warm: bool = False

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


FAST_RUN_SECONDS = 0.1   # a runner whose median is under this...
FAST_RUNS = 21           # ...gets this many runs in a full benchmark: a few milliseconds vary by tens of percent


def measure(runners: list[Runner], func: Callable, items: list, repeat: int, expected: list | None = None,
            progress: Callable[[str], None] = lambda line: None,
            reset: Callable[[], None] | None = None, fast_runs: int = 0) -> list[Measured]:
    """Time every runner `repeat` times, interleaved (the start rotates each round) so that a
    burst of load elsewhere falls on all of them alike; then runners faster than
    FAST_RUN_SECONDS take further rounds among themselves, up to `fast_runs` runs each.
    Results are checked against `expected`, or else against the first runner's; a runner that
    differs or raises is reported with its error and not run again. `reset` runs (untimed)
    before every run, so that no runner finds what another left running (an executor's
    threads make auto avoid fork)."""
    measured = {r.name: Measured(r.name, r.group, concurrency=r.concurrency, warm=r.warm) for r in runners}

    def wants_run(runner: Runner, round_number: int) -> bool:
        record = measured[runner.name]
        if record.error or (runner.max_runs and len(record.seconds) >= runner.max_runs):
            return False
        if round_number < repeat:
            return True
        return len(record.seconds) < fast_runs and record.median < FAST_RUN_SECONDS

    for round_number in range(max(repeat, fast_runs)):
        shift = round_number % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            record = measured[runner.name]
            if not wants_run(runner, round_number):
                continue
            if reset is not None:
                reset()
            if runner.before is not None:
                runner.before()
            start = time.perf_counter()
            try:
                out = runner.run(func, items)
            except Exception as exc:  # noqa: BLE001 - any failure is a result to report
                record.error = f"{type(exc).__name__}: {str(exc)[:200]}"
                progress(f"{runner.name}: {record.error}")
                continue
            elapsed = time.perf_counter() - start
            if expected is None:
                expected = list(out)
            elif not same_results(list(out), expected):
                record.error = "wrong results: " + difference(list(out), expected)
                if runner.describe is not None:
                    record.error += f" ({runner.describe(out)})"
                progress(f"{runner.name}: wrong results")
                continue
            record.seconds.append(elapsed)
            if runner.describe is not None:
                record.note = runner.describe(out)
            del out
            progress(f"{runner.name}: {elapsed:.3f}s")
    return list(measured.values())


def difference(got: list, expected: list) -> str:
    if len(got) != len(expected):
        return f"{len(got)} results for {len(expected)} items"
    wrong = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
    return f"{len(wrong)} of {len(expected)} differ, the first at index {wrong[0]}"


def as_json(records: list[Measured]) -> list[dict]:
    return [record.__dict__ for record in records]


def from_json(rows: list[dict]) -> list[Measured]:
    return [Measured(**row) for row in rows]


def same_results(out: list, expected: list) -> bool:
    """Equal lists, numpy arrays (compared element by element) included."""
    if len(out) != len(expected):
        return False
    for got, want in zip(out, expected):
        equal = got == want
        if not (bool(equal.all()) if hasattr(equal, "all") else equal):
            return False
    return True


# ---- pmap runners -----------------------------------------------------------------------
def shut_down_loky() -> None:
    """End loky's reusable executor (pmap's process backend), so the next run starts cold.
    Also leaves no loky threads behind, which auto reads as 'fork is not safe'."""
    try:
        from loky import reusable_executor
    except ImportError:
        return
    shut_down_reusable(reusable_executor)


def shut_down_reusable(module) -> None:
    """End the reusable executor of a loky module (loky's own or joblib's vendored copy).
    Older loky keeps it in a module global, loky 3.5+ in thread-local storage."""
    storage = getattr(module, "_executor_storage", None)
    executor = getattr(module, "_executor", None) or getattr(storage, "executor", None)
    if executor is not None:
        executor.shutdown(wait=True, kill_workers=True)


def pmap_runner(backend: str, workers: int | None = None, label: str | None = None,
                cold: bool = True, show_bytes: bool = False) -> Runner:
    """pmap with one backend (or auto). `cold` ends loky's reusable executor before each run,
    so every run pays its own start-up, as the first call of a program does. `show_bytes`
    notes the bytes each run sent and received (pipes and shared memory)."""
    import pmap

    def run(func, items):
        return pmap.pmap(func, items, backend=backend, workers=workers)

    def describe(out) -> str:
        plan = getattr(out.stats, "plan", None)
        note = ""
        if plan is not None:
            adaptive = getattr(plan, "concurrency", None) is not None  # an adaptive count: its peak
            note = f"{plan.backend} adaptive x{out.stats.workers}" if adaptive else f"{plan.backend} x{plan.workers}"
        if show_bytes and out.stats.bytes_sent is not None:
            mb = 2**20
            note += (f"{'; ' if note else ''}{out.stats.bytes_sent / mb:.0f} MB sent, "
                     f"{out.stats.bytes_received / mb:.0f} MB received")
        return note

    return Runner(label or f"pmap {backend}", "pmap", run, before=shut_down_loky if cold else None,
                  concurrency=workers, describe=describe if backend == "auto" or show_bytes else None,
                  warm=not cold)


def plan_workers(note: str) -> int | None:
    """The worker count in an auto note such as 'thread x64'."""
    try:
        return int(note.rsplit("x", 1)[1])
    except (IndexError, ValueError):
        return None


# ---- child processes --------------------------------------------------------------------
def tagged_processes(tag: str) -> list:
    """Live processes whose environment carries `tag` (children, grandchildren, orphans)."""
    import psutil
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(TAG_VARIABLE) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def end_processes(procs: list) -> None:
    import psutil
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)


@dataclass
class ChildResult:
    returncode: int | None         # None: killed at the time limit
    seconds: float                 # from start (or from `signal_after`'s signal) to exit
    output: dict | None            # the last JSON line the child printed
    lines: list                    # every JSON line, in order
    stderr: str
    left_behind: int               # tagged processes alive after the child ended (then ended)


def run_workload_children(script: str, name: str, scale: float, repeat: int, limit: float,
                          extra_args: tuple[str, ...] | list[str] = ()) -> list:
    """Run a script's `--child NAME` (with `extra_args`) in a fresh process, and once more patched
    by gevent when the workload can cooperate with it; log the runs that fail and return the
    others' results."""
    import workloads
    runs = []
    for patched in (False, True) if workloads.WORKLOADS[name].gevent_cooperative else (False,):
        child = run_child([os.path.abspath(script), "--child", name, "--scale", str(scale),
                           "--repeat", str(repeat), *extra_args], limit=limit, patched=patched)
        if child.output is None:
            log(f"  {name}{' (patched)' if patched else ''} failed:\n{child.stderr[-2000:]}")
            continue
        runs.append(child)
    return runs


def run_child(args: list[str], limit: float, patched: bool = False, signal_after: float | None = None,
              grace: float = 0.0) -> ChildResult:
    """Run `python args...` in a new session with a fresh tag; kill it at `limit` seconds.

    `signal_after`: once the child prints a line `{"ready": true}`, wait that long and send
    SIGINT to its process group, as a terminal's Ctrl-C does; `seconds` then counts from the
    signal. `grace`: how long to let cleanup finish before counting processes left behind.
    A child killed at the limit is killed alone first, so that what its workers do when their
    driver dies shows in `left_behind`. Output goes to files, not pipes: a worker left holding
    a pipe would otherwise keep us waiting after the child itself has exited."""
    tag = uuid.uuid4().hex
    env = {name: value for name, value in os.environ.items() if name not in SLOW_BLAS_VARIABLES}
    env[TAG_VARIABLE] = tag
    command = [sys.executable, *args] + (["--gevent-patch"] if patched else [])
    with tempfile.TemporaryDirectory(prefix="pmap-bench-") as directory:
        out_path, err_path = os.path.join(directory, "out"), os.path.join(directory, "err")
        with open(out_path, "w") as stdout, open(err_path, "w") as stderr:
            start = time.perf_counter()
            child = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, env=env,
                                     start_new_session=True)
        try:
            if signal_after is not None and _wait_for_ready(child, out_path, start + limit):
                time.sleep(signal_after)
                start = time.perf_counter()
                _signal_group(child.pid, signal.SIGINT)
            try:
                child.wait(timeout=max(0.1, limit - (time.perf_counter() - start)))
                returncode = child.returncode
            except subprocess.TimeoutExpired:
                returncode = None
                child.kill()
                child.wait()
        except BaseException:  # we are interrupted ourselves: take the child's processes with us
            _signal_group(child.pid, signal.SIGKILL)
            end_processes(tagged_processes(tag))
            raise
        seconds = time.perf_counter() - start
        time.sleep(grace)
        leftovers = tagged_processes(tag)
        end_processes(leftovers)
        _signal_group(child.pid, signal.SIGKILL)
        with open(out_path) as stdout, open(err_path) as stderr:
            lines, err = _json_lines(stdout.read()), stderr.read()
    return ChildResult(returncode, seconds, lines[-1] if lines else None, lines, err, len(leftovers))


def workload_parser(description: str, names: tuple, only_help: str = "comma-separated workloads"
                    ) -> argparse.ArgumentParser:
    """The options every workload benchmark takes, and the hidden ones of its child processes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a smoke run at tiny sizes")
    parser.add_argument("--repeat", type=int, default=None, help="runs per cell (default 5, quick 2)")
    parser.add_argument("--only", default=",".join(names), help=only_help)
    parser.add_argument("--limit", type=float, default=1800, help="seconds before a child is killed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--gevent-patch", action="store_true", help=argparse.SUPPRESS)
    return parser


def parse_workload_args(parser: argparse.ArgumentParser, names: tuple) -> argparse.Namespace:
    """Parse, default --repeat, and turn --only into `args.chosen` (in `names` order); an
    unknown name is a usage error."""
    args = parser.parse_args()
    if args.repeat is None:
        args.repeat = 2 if args.quick else 5
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    unknown = wanted - set(names)
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    args.chosen = [name for name in names if name in wanted]
    return args


def install_signal_handlers() -> None:
    """SIGTERM becomes SystemExit, so that run_child still ends the child it is waiting for.
    Ctrl-C gets Python's own handler back: a shell starts a background job with SIGINT
    ignored, children would inherit that, and the Ctrl-C cases would measure nothing."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _wait_for_ready(child, out_path: str, deadline: float) -> bool:
    """Poll the child's output file for a `{"ready": true}` line."""
    while time.perf_counter() < deadline and child.poll() is None:
        with open(out_path) as handle:
            if any(found.get("ready") for found in _json_lines(handle.read())):
                return True
        time.sleep(0.01)
    return False


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _json_lines(text: str) -> list[dict]:
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return found


def emit(payload: dict) -> None:
    """A child's way to report: one JSON line on stdout."""
    print(json.dumps(payload), flush=True)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- output -----------------------------------------------------------------------------
def markdown_table(header: list[str], rows: list[list], first_left: int = 1) -> list[str]:
    """A markdown table; the first `first_left` columns are left-aligned, the rest right."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(":---" if i < first_left else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def seconds_text(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def ratio_text(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}x"


def write_results(name: str, lines: list[str], quick: bool) -> str:
    """Write a results file; smoke runs go to results/quick/, which git ignores."""
    directory = results_dir(quick)
    path = os.path.join(directory, name)
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def results_dir(quick: bool) -> str:
    directory = os.path.join(RESULTS_DIR, "quick") if quick else RESULTS_DIR
    os.makedirs(directory, exist_ok=True)
    return directory
