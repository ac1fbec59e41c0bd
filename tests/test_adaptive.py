"""workers="adaptive" for real: a local server that serves N requests at once settles the
limit near N; unlimited waits reach high concurrency fast; errors and bad uses are handled.
The policy itself is tested against simulated servers in tests/test_concurrency.py."""
import asyncio
import http.client
import subprocess
import sys
import textwrap
import time

import pytest

import pmap
from pmap.concurrency import Adaptive

CAPACITY = 8          # requests the server serves at once; the rest queue
SERVICE_SECONDS = 0.02

SERVER = textwrap.dedent('''
    import sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    capacity, service = int(sys.argv[1]), float(sys.argv[2])
    slots = threading.Semaphore(capacity)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"
        def do_GET(self):
            with slots:  # past its capacity the server queues: latency grows, throughput does not
                time.sleep(service)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024

    with Server(("127.0.0.1", 0), Handler) as server:
        print(server.server_address[1], flush=True)
        server.serve_forever()
''')


@pytest.fixture(scope="module")
def limited_server():
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(CAPACITY), str(SERVICE_SECONDS)],
                              stdout=subprocess.PIPE, text=True)
    try:
        yield int(server.stdout.readline())
    finally:
        server.kill()
        server.wait(timeout=10)


def get(port_and_path):
    port, path = port_and_path
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        return connection.getresponse().read()
    finally:
        connection.close()


@pytest.mark.timeout(120)
def test_a_server_of_limited_capacity_settles_the_limit_near_it(limited_server):
    items = [(limited_server, f"/{i}") for i in range(1200)]
    out = pmap.pmap(get, items, backend="thread", workers="adaptive")
    assert out == [b"ok"] * len(items)
    limits = [limit for _, limit, _ in out.stats.concurrency]
    assert limits, "the controller never moved"
    assert max(limits) > CAPACITY  # it looked past the capacity...
    settled = limits[len(limits) // 2:]
    # ...and came back near it: more in flight only queues on the server
    assert CAPACITY / 2 <= sorted(settled)[len(settled) // 2] <= 2 * CAPACITY, out.stats.concurrency


def nap(seconds):
    time.sleep(seconds)
    return seconds


@pytest.mark.timeout(60)
def test_unlimited_waits_reach_high_concurrency_within_a_few_hundred_milliseconds():
    out = pmap.pmap(nap, [0.05] * 2000, backend="thread", workers="adaptive")
    reached = [when for when, limit, _ in out.stats.concurrency if limit >= 64]
    assert reached and reached[0] < 0.6, out.stats.concurrency[:10]
    assert out.stats.workers >= 64


def refuse_when_crowded(item):
    """Fails with a connection error when more than 6 run at once, as a server that refuses."""
    with _lock:
        _running[0] += 1
        crowded = _running[0] > 6
    try:
        time.sleep(0.01)
        if crowded:
            raise ConnectionRefusedError("too many connections")
        return item
    finally:
        with _lock:
            _running[0] -= 1


import threading  # noqa: E402
_lock = threading.Lock()
_running = [0]


@pytest.mark.timeout(60)
def test_connection_errors_bring_the_limit_down_and_retries_recover_the_items():
    out = pmap.pmap(refuse_when_crowded, range(600), backend="thread", workers=Adaptive(start=16, maximum=64),
                    retries=20, retry_on=ConnectionError)
    assert out == list(range(600))
    limits = [limit for _, limit, _ in out.stats.concurrency]
    assert min(limits) <= 8, out.stats.concurrency


@pytest.mark.parametrize("backend", ["greenlet", "asyncio"])
@pytest.mark.timeout(60)
def test_greenlet_and_asyncio_adapt_too(backend):
    if backend == "asyncio":
        async def fn(x):
            await asyncio.sleep(0.02)
            return x
    else:
        import gevent

        def fn(x):
            gevent.sleep(0.02)
            return x
    out = pmap.pmap(fn, range(3000), backend=backend, workers="adaptive")
    assert out == list(range(3000))
    assert max(limit for _, limit, _ in out.stats.concurrency) >= 256


def test_process_backends_say_they_cannot_adapt():
    with pytest.raises(ValueError, match="workers='adaptive' needs a backend.*'process' cannot"):
        pmap.pmap(abs, [1], backend="process", workers="adaptive")
    with pytest.raises(ValueError, match="positive integer or 'adaptive'"):
        pmap.pmap(abs, [1], backend="thread", workers="lots")


def test_auto_runs_io_bound_work_with_an_adaptive_thread_count():
    out = pmap.pmap(nap, [0.02] * 300)
    plan = out.stats.plan
    assert plan.backend == "thread" and plan.concurrency is not None
    assert "adaptive" in str(plan) and "follows measured throughput" in plan.reason
    assert out.stats.concurrency, "the controller did not run"


def test_auto_starts_the_limit_where_the_probe_saw_the_waits_overlap():
    # a short IO run cannot afford ten latencies of slow start from 4
    auto = pmap.explain(nap, [0.02] * 300).concurrency
    assert auto is not None and auto.start >= 16
    asked = pmap.explain(nap, [0.02] * 300, workers="adaptive").concurrency
    assert asked.start == Adaptive().start  # asked for explicitly: the documented start


def test_a_pool_keeps_its_adaptive_bounds_across_calls():
    with pmap.Pool(backend="thread", workers=Adaptive(start=2, maximum=32)) as pool:
        for _ in range(2):
            out = pool.map(nap, [0.01] * 200)
            assert out == [0.01] * 200
            assert 2 <= max(limit for _, limit, _ in pool.stats.concurrency) <= 32


def test_the_command_line_takes_j_adaptive(tmp_path):
    from typer.testing import CliRunner
    from pmap.cli import app
    (tmp_path / "job.py").write_text("import time\n\ndef nap(x):\n    time.sleep(0.01)\n    return int(x) * 2\n")
    target = f"{tmp_path / 'job.py'}:nap"
    runner = CliRunner()
    result = runner.invoke(app, ["run", target, "--range", "50", "-b", "thread", "-j", "adaptive"])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(2 * i) for i in range(50)]
    refused = runner.invoke(app, ["run", target, "--range", "5", "-b", "process", "-j", "adaptive"])
    assert refused.exit_code == 2 and "'process' cannot" in refused.stderr
    explained = runner.invoke(app, ["run", target, "--range", "200", "--explain"])
    assert "workers adaptive" in explained.stdout
