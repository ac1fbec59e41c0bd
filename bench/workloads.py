"""The workloads the benchmark scripts share: the functions (module level, so every peer can
pickle them by reference), their inputs at full size, and what each one needs around it (a
local HTTP server, files to parse).

    with prepared(WORKLOADS["cpu"], scale=1.0) as items:
        list(map(WORKLOADS["cpu"].func, items))

Run as `python bench/workloads.py --serve-http LATENCY [BACKLOG]` it is the local HTTP server the
socket workload talks to (a separate process, so the benchmark's own process has no server
threads: auto chooses fork only when no other thread runs).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator

CPU_ITEM_SECONDS = 0.005
SLEEP_SECONDS = 0.02
SERVER_LATENCY_SECONDS = 0.02
SHORT_SLEEP_SECONDS = 0.015
SMALL_BACKLOG = 5       # the stdlib http.server's default accept queue
LARGE_BACKLOG = 128
PAYLOAD_BYTES = 4 * 1024 * 1024
HASH_BUFFER_BYTES = 8 * 1024 * 1024
HASH_ROUNDS = 2                    # ~10 ms per item where sha256 runs ~1.5 GB/s
MIXED_WAIT_SECONDS = 0.01
PARSE_RECORDS_PER_FILE = 4000      # ~0.8 MB of JSON, ~5 ms to parse
UNBALANCED_SEED = 20240501
STREAM_ITEMS = 10_000_000
MIN_QUICK_ITEMS = 8
MATRIX_SIZE = 600
MATRIX_PRODUCTS = 5
GROUP_ROWS = 20_000                # rows of each item's frame
GROUP_KEYS = 200                   # groups the frame's apply runs a Python function on


# ---- the functions ------------------------------------------------------------------------
def tiny(x):
    return x + 1


def spin(iterations: int) -> int:
    """Pure-Python CPU work: holds the GIL throughout."""
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


def sleep_item(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def fetch(url: str) -> int:
    """One HTTP GET on a fresh connection; the length of the body."""
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.partition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", "/" + path)
        return len(connection.getresponse().read())
    finally:
        connection.close()


def count_zero_bytes(data: bytes) -> int:
    """Large payload in, small result out: the work is cheap, the transfer is not."""
    return data.count(0)


def make_payload(seed: int) -> bytes:
    """Small item in, large result out."""
    return bytes([seed % 256]) * PAYLOAD_BYTES


_hash_buffer: bytes | None = None


def hash_buffer(rounds: int) -> str:
    """GIL-releasing C work: hashlib releases the GIL in update() on large buffers (in Python
    3.11 the constructor `sha256(data)` does not). The buffer is built once per process, so
    only a small int travels."""
    global _hash_buffer
    if _hash_buffer is None:
        _hash_buffer = random.Random(0).randbytes(HASH_BUFFER_BYTES)
    digest = hashlib.sha256()
    for _ in range(rounds):
        digest.update(_hash_buffer)
    return digest.hexdigest()


def spin_then_wait(item: tuple) -> int:
    """Mixed: some CPU, then a wait (a call to a slow service, say)."""
    iterations, wait = item
    total = spin(iterations)
    time.sleep(wait)
    return total


def parse_json_file(path: str) -> int:
    with open(path, "rb") as handle:
        document = json.load(handle)
    return sum(record["quantity"] for record in document["records"])


# ---- calibration ------------------------------------------------------------------------
_iterations_per_second: float | None = None


def spin_iterations(seconds: float) -> int:
    """Iterations of `spin` that take about `seconds` here (measured once per process)."""
    global _iterations_per_second
    if _iterations_per_second is None:
        trial = 200_000
        best = min(_timed(spin, trial) for _ in range(3))
        _iterations_per_second = trial / best
    return max(1, round(seconds * _iterations_per_second))


def _timed(func, arg) -> float:
    start = time.perf_counter()
    func(arg)
    return time.perf_counter() - start


# ---- what each workload needs around it ------------------------------------------------
@contextlib.contextmanager
def http_server(latency: float, backlog: int = 1024) -> Iterator[int]:
    """A local HTTP server in its own process; yields its port on 127.0.0.1. `backlog` is its
    accept queue: the stdlib's default of 5 drops connections past a small fan-out, and a
    dropped connection waits about a second for the client's SYN retry."""
    server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-http", str(latency),
                               str(backlog)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        yield port
    finally:
        server.terminate()
        server.wait(timeout=10)


def serve_http(latency: float, backlog: int = 1024) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = b"x" * 1024

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(latency)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = backlog

    with Server(("127.0.0.1", 0), Handler) as server:
        print(server.server_address[1], flush=True)
        server.serve_forever()


@contextlib.contextmanager
def json_files(count: int) -> Iterator[list[str]]:
    """`count` JSON files of orders in a temporary directory; yields their paths. The records
    are drawn once (drawing them dominates the set-up) and each file gets its own header."""
    rng = random.Random(7)
    records = json.dumps([{"id": i, "customer": f"c{rng.randrange(10_000)}", "sku": f"s{rng.randrange(500)}",
                           "quantity": rng.randrange(1, 20), "price": round(rng.uniform(1, 500), 2),
                           "tags": rng.sample(["new", "gift", "bulk", "retail", "priority"], 2)}
                          for i in range(PARSE_RECORDS_PER_FILE)])
    with tempfile.TemporaryDirectory(prefix="pmap-bench-") as directory:
        paths = []
        for n in range(count):
            path = os.path.join(directory, f"orders-{n:05d}.json")
            with open(path, "w") as handle:
                handle.write(f'{{"file": {n}, "records": {records}}}')
            paths.append(path)
        yield paths


def matrix_products(seed: int) -> float:
    """numpy: five 600x600 matrix products. BLAS runs them, GIL released, on its own threads."""
    import numpy as np
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((MATRIX_SIZE, MATRIX_SIZE))
    b = rng.standard_normal((MATRIX_SIZE, MATRIX_SIZE))
    for _ in range(MATRIX_PRODUCTS):
        a = a @ b
        a /= np.abs(a).max()
    return round(float(a.sum()), 6)  # BLAS's thread count may move the last bits


def group_apply(frame) -> float:
    """pandas: a group-apply with a Python function per group, as data scripts write it."""
    summary = frame.groupby("key").apply(lambda g: (g["x"] * g["y"]).sum() / (1 + g["y"].abs().max()),
                                         include_groups=False)
    return float(summary.sum())


def _frames(n: int) -> list:
    import numpy as np
    import pandas as pd
    rng = np.random.default_rng(7)
    return [pd.DataFrame({"key": rng.integers(0, GROUP_KEYS, GROUP_ROWS), "x": rng.standard_normal(GROUP_ROWS),
                          "y": rng.standard_normal(GROUP_ROWS)}) for _ in range(n)]


# ---- the workloads ----------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    func: Callable
    count: int                     # items at full size
    kind: str                      # cpu | transfer | gil | io | mixed | native (numpy/pandas: threads and processes)
    make_items: Callable[[int], contextlib.AbstractContextManager]
    wait_per_item: float = 0.0     # seconds each item waits, for the IO ideal (wait x n / concurrency)
    gevent_cooperative: bool = False  # its waits yield to gevent once monkey-patched
    bind: Callable[[], Callable] | None = None  # makes the function to map (big data bound in), else `func`

    def function(self) -> Callable:
        return self.bind() if self.bind is not None else self.func

    def size(self, scale: float) -> int:
        return max(MIN_QUICK_ITEMS, round(self.count * scale)) if scale < 1 else round(self.count * scale)


def _plain(items_of: Callable[[int], list]):
    """make_items for a workload that needs nothing around it."""
    @contextlib.contextmanager
    def make(n: int):
        yield items_of(n)
    return make


# ---- big data (issue 16): numpy arrays bound to the function, in and out ------------------
BIG_PARTIAL_BYTES = 400 * 2**20
BIG_GLOBAL_BYTES = 100 * 2**20
ARRAY_IN_BYTES = ARRAY_OUT_BYTES = 8 * 2**20
LOOPED_ARRAY_BYTES = 2 * 2**20
SLICE_VALUES = 250_000


def slice_sum(array, i: int) -> float:
    return float(array[i * SLICE_VALUES:(i + 1) * SLICE_VALUES].sum())


def _bound_array() -> Callable:
    import numpy as np
    return functools.partial(slice_sum, np.arange(BIG_PARTIAL_BYTES // 8, dtype=np.float64))


def _bound_shared_array() -> Callable:
    """The same array made where pmap's workers map it without a copy (issue 16)."""
    import numpy as np
    import pmap
    array = pmap.shared_array(BIG_PARTIAL_BYTES // 8, dtype=np.float64)
    array[:] = np.arange(len(array), dtype=np.float64)
    return functools.partial(slice_sum, array)


def _main_function_with_a_global() -> Callable:
    """A function as a script's `__main__` defines it: cloudpickle sends it by value, with
    the 100 MB module global it reads."""
    import numpy as np
    namespace = {"__name__": "bench_main_script", "TABLE": np.ones(BIG_GLOBAL_BYTES // 8)}
    exec("def lookup(i):\n    return float(TABLE[i * 1000:(i + 1) * 1000].sum())\n", namespace)
    return namespace["lookup"]


def array_total(array) -> float:
    return float(array.sum())


def filled_array(i: int):
    import numpy as np
    return np.full(ARRAY_OUT_BYTES // 8, float(i))


def loop_and_return(array):
    """A Python loop over part of a 2 MB array, which comes back whole."""
    total = 0.0
    for value in array[:20_000].tolist():
        total += value
    array = array.copy()
    array[0] = total
    return array


def _arrays(size: int):
    def make(n: int):
        import numpy as np
        return [np.full(size // 8, float(i)) for i in range(n)]
    return make


def _unbalanced_items(n: int) -> list:
    rng = random.Random(UNBALANCED_SEED)
    return [spin_iterations(rng.expovariate(1 / CPU_ITEM_SECONDS)) for _ in range(n)]


def _urls_with_backlog(backlog: int):
    @contextlib.contextmanager
    def make(n: int):
        with http_server(SERVER_LATENCY_SECONDS, backlog) as port:
            yield [f"http://127.0.0.1:{port}/{i}" for i in range(n)]
    return make


_urls = _urls_with_backlog(1024)


def _payloads(n: int):
    blob = random.Random(1).randbytes(PAYLOAD_BYTES)
    return [blob] * n  # one object, but every process peer pickles each item anew


WORKLOADS = {w.name: w for w in [
    Workload("tiny", "tiny: x + 1 (pure overhead)", tiny, 200_000, "cpu", _plain(lambda n: list(range(n)))),
    Workload("cpu", "CPU-bound: ~5 ms pure-Python loop", spin, 200, "cpu",
             _plain(lambda n: [spin_iterations(CPU_ITEM_SECONDS)] * n)),
    Workload("unbalanced", "unbalanced CPU: exponential durations, mean 5 ms", spin, 400, "cpu",
             _plain(_unbalanced_items)),
    Workload("sleep", "IO: 20 ms sleep", sleep_item, 500, "io", _plain(lambda n: [SLEEP_SECONDS] * n),
             wait_per_item=SLEEP_SECONDS, gevent_cooperative=True),
    Workload("socket", "IO: HTTP GET to a local server (20 ms latency)", fetch, 500, "io", _urls,
             wait_per_item=SERVER_LATENCY_SECONDS, gevent_cooperative=True),
    Workload("sleep15", "IO: 15 ms sleep, 400 items (issue 13)", sleep_item, 400, "io",
             _plain(lambda n: [SHORT_SLEEP_SECONDS] * n), wait_per_item=SHORT_SLEEP_SECONDS,
             gevent_cooperative=True),
    Workload("knee", "IO: HTTP GET, 20 ms latency, accept queue of 5 (a server with a knee)", fetch, 300, "io",
             _urls_with_backlog(SMALL_BACKLOG), wait_per_item=SERVER_LATENCY_SECONDS, gevent_cooperative=True),
    Workload("backlog", "IO: HTTP GET, 20 ms latency, accept queue of 128", fetch, 300, "io",
             _urls_with_backlog(LARGE_BACKLOG), wait_per_item=SERVER_LATENCY_SECONDS, gevent_cooperative=True),
    Workload("payload_in", "large payload in: 4 MB bytes in, an int out", count_zero_bytes, 200, "transfer",
             _plain(_payloads)),
    Workload("payload_out", "large payload out: an int in, 4 MB bytes out", make_payload, 200, "transfer",
             _plain(lambda n: list(range(n)))),
    Workload("hash", "GIL-releasing: sha256 update() over 2 x 8 MB", hash_buffer, 200, "gil",
             _plain(lambda n: [HASH_ROUNDS] * n)),
    Workload("mixed", "mixed: ~2.5 ms CPU then a 10 ms wait", spin_then_wait, 300, "mixed",
             _plain(lambda n: [(spin_iterations(CPU_ITEM_SECONDS / 2), MIXED_WAIT_SECONDS)] * n),
             wait_per_item=MIXED_WAIT_SECONDS),
    Workload("parse", "parsing real files: json.load of ~0.8 MB files", parse_json_file, 300, "cpu",
             lambda n: json_files(n)),
    Workload("matrix", "numpy: five 600x600 matrix products (BLAS)", matrix_products, 40, "native",
             _plain(lambda n: list(range(n)))),
    Workload("groupby", "pandas: group-apply of a Python function over 20k rows", group_apply, 100, "native",
             _plain(_frames)),
    Workload("partial400", "a 400 MB array bound with functools.partial, 40 slice-sums", slice_sum, 40,
             "bigdata", _plain(lambda n: list(range(n))), bind=_bound_array),
    Workload("shared400", "the same 400 MB array made by pmap.shared_array, 40 slice-sums", slice_sum, 40,
             "bigdata", _plain(lambda n: list(range(n))), bind=_bound_shared_array),
    Workload("global100", "a 100 MB module global used by a __main__ function, 40 items", slice_sum, 40,
             "bigdata", _plain(lambda n: list(range(n))), bind=_main_function_with_a_global),
    Workload("array_in", "40 arrays of 8 MB in, a float out", array_total, 40, "bigdata",
             _plain(_arrays(ARRAY_IN_BYTES))),
    Workload("array_out", "40 small items in, an 8 MB array out", filled_array, 40, "bigdata",
             _plain(lambda n: list(range(n)))),
    Workload("array_loop", "80 items, Python loop over a 2 MB array that comes back whole", loop_and_return, 80,
             "bigdata", _plain(_arrays(LOOPED_ARRAY_BYTES))),
]}


# ---- faults (bench/faults.py): one item of the run misbehaves ---------------------------
FAULT_INDEX = 5
FAULT_ITEM_SECONDS = 0.05
SLOW_ITEM_SECONDS = 0.5   # a long run to interrupt with Ctrl-C


def _ordinary(x: int) -> int:
    time.sleep(FAULT_ITEM_SECONDS)
    return 2 * x


def segfault_on_fault(x: int) -> int:
    if x == FAULT_INDEX:
        import ctypes
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return _ordinary(x)


def exit_on_fault(x: int) -> int:
    if x == FAULT_INDEX:
        os._exit(3)
    return _ordinary(x)


def hang_on_fault(x: int) -> int:
    if x == FAULT_INDEX:
        time.sleep(3600)
    return _ordinary(x)


def slow_item(x: int) -> int:
    time.sleep(SLOW_ITEM_SECONDS)
    return 2 * x


@contextlib.contextmanager
def prepared(workload: Workload, scale: float) -> Iterator[list]:
    """The workload's items at `scale` times full size, with whatever they need running."""
    with workload.make_items(workload.size(scale)) as items:
        yield items


def good_chunksize(n: int, workers: int, item_seconds: float) -> int:
    """What the peers' docs advise: chunks long enough to hide dispatch (~20 ms of work),
    and at least four per worker so the load still balances (Pool.map's own default is
    exactly n / (4 x workers))."""
    most = max(1, math.ceil(n / (4 * workers)))
    return max(1, min(most, round(0.02 / max(item_seconds, 1e-9))))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-http"]:
        serve_http(float(sys.argv[2]), *(int(arg) for arg in sys.argv[3:4]))
    else:
        sys.exit("usage: python bench/workloads.py --serve-http LATENCY_SECONDS [BACKLOG]")
