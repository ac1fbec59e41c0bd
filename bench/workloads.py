"""The workloads the benchmark scripts share: the functions (module level, so every peer can
pickle them by reference), their inputs at full size, and what each one needs around it (a
local HTTP server, files to parse).

    with prepared(WORKLOADS["cpu"], scale=1.0) as items:
        list(map(WORKLOADS["cpu"].func, items))

Run as `python bench/workloads.py --serve-http LATENCY` it is the local HTTP server the
socket workload talks to (a separate process, so the benchmark's own process has no server
threads: auto chooses fork only when no other thread runs).
"""
from __future__ import annotations

import contextlib
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
PAYLOAD_BYTES = 4 * 1024 * 1024
HASH_BUFFER_BYTES = 8 * 1024 * 1024
HASH_ROUNDS = 2                    # ~10 ms per item where sha256 runs ~1.5 GB/s
MIXED_WAIT_SECONDS = 0.01
PARSE_RECORDS_PER_FILE = 4000      # ~0.8 MB of JSON, ~5 ms to parse
UNBALANCED_SEED = 20240501
STREAM_ITEMS = 10_000_000
MIN_QUICK_ITEMS = 8


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
def http_server(latency: float) -> Iterator[int]:
    """A local HTTP server in its own process; yields its port on 127.0.0.1."""
    server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-http", str(latency)],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        yield port
    finally:
        server.terminate()
        server.wait(timeout=10)


def serve_http(latency: float) -> None:
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
        request_queue_size = 1024  # the default 5 drops connections under fan-out

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


# ---- the workloads ----------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    func: Callable
    count: int                     # items at full size
    kind: str                      # cpu | transfer | gil | io | mixed
    make_items: Callable[[int], contextlib.AbstractContextManager]
    wait_per_item: float = 0.0     # seconds each item waits, for the IO ideal (wait x n / concurrency)
    gevent_cooperative: bool = False  # its waits yield to gevent once monkey-patched

    def size(self, scale: float) -> int:
        return max(MIN_QUICK_ITEMS, round(self.count * scale)) if scale < 1 else round(self.count * scale)


def _plain(items_of: Callable[[int], list]):
    """make_items for a workload that needs nothing around it."""
    @contextlib.contextmanager
    def make(n: int):
        yield items_of(n)
    return make


def _unbalanced_items(n: int) -> list:
    rng = random.Random(UNBALANCED_SEED)
    return [spin_iterations(rng.expovariate(1 / CPU_ITEM_SECONDS)) for _ in range(n)]


@contextlib.contextmanager
def _urls(n: int):
    with http_server(SERVER_LATENCY_SECONDS) as port:
        yield [f"http://127.0.0.1:{port}/{i}" for i in range(n)]


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
        serve_http(float(sys.argv[2]))
    else:
        sys.exit("usage: python bench/workloads.py --serve-http LATENCY_SECONDS")
