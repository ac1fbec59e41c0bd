"""The concurrency controller at work (issue 13): workers and throughput over time.

    python bench/adaptive.py            # writes bench/results/adaptive.png and adaptive.md
    python bench/adaptive.py --quick    # a smoke run (bench/results/quick/)

Two local HTTP servers, each in its own process, answer GETs with 20 ms latency:
- one serves at most CAPACITY requests at once and queues the rest, so past CAPACITY in
  flight latency grows and throughput does not;
- one has the stdlib's accept queue of 5, so a burst of connections past it waits about a
  second for the client's SYN retry.
pmap runs 1,500 GETs on each with workers="adaptive" and records `.stats.concurrency`, the
(time, tasks in flight allowed, items/s) points; the chart shows both, with the fixed counts'
times for comparison in the table.
"""
import os
import statistics
import subprocess
import sys
import time

import common
import workloads

CAPACITY = 16
ITEMS = 1500
FIXED_COUNTS = (4, 8, 16, 32, 64)
REPEAT = 3

CAPACITY_SERVER = '''
import sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
capacity, latency = int(sys.argv[1]), float(sys.argv[2])
slots = threading.Semaphore(capacity)

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        with slots:
            time.sleep(latency)
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
'''


def capacity_server():
    server = subprocess.Popen([sys.executable, "-c", CAPACITY_SERVER, str(CAPACITY),
                               str(workloads.SERVER_LATENCY_SECONDS)], stdout=subprocess.PIPE, text=True)
    return server, int(server.stdout.readline())


QUICK = "--quick" in sys.argv
if QUICK:
    ITEMS, REPEAT = 100, 1


def timed(urls, workers):
    import pmap
    start = time.perf_counter()
    out = pmap.pmap(workloads.fetch, urls, backend="thread", workers=workers)
    return time.perf_counter() - start, out.stats


def measure(urls) -> tuple[dict, list]:
    """Median seconds per worker setting, and the trajectory of the median adaptive run."""
    times, adaptive_runs = {}, []
    for workers in (*FIXED_COUNTS, "adaptive"):
        runs = [timed(urls, workers) for _ in range(REPEAT)]
        times[workers] = statistics.median(seconds for seconds, _ in runs)
        if workers == "adaptive":
            adaptive_runs = sorted(runs, key=lambda run: run[0])
    return times, adaptive_runs[len(adaptive_runs) // 2][1].concurrency


def main() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {}
    server, port = capacity_server()
    try:
        results[f"server serving {CAPACITY} at once"] = measure([f"http://127.0.0.1:{port}/{i}" for i in range(ITEMS)])
    finally:
        server.kill()
    with workloads.http_server(workloads.SERVER_LATENCY_SECONDS, workloads.SMALL_BACKLOG) as port:
        results["accept queue of 5"] = measure([f"http://127.0.0.1:{port}/{i}" for i in range(ITEMS)])

    figure, axes = plt.subplots(2, len(results), figsize=(11, 6), sharex="col", squeeze=False)
    lines = ["# The concurrency controller (workers=\"adaptive\")", ""] + common.header_lines("adaptive.py") + [
        "", f"{ITEMS} GETs with 20 ms latency on each server; medians of {REPEAT} runs; thread backend.", "",
        "| server | " + " | ".join(f"x{n}" for n in FIXED_COUNTS) + " | adaptive | adaptive / best fixed |",
        "|:---|" + "---:|" * (len(FIXED_COUNTS) + 2)]
    for column, (title, (times, trajectory)) in enumerate(results.items()):
        best = min(times[n] for n in FIXED_COUNTS)
        lines.append(f"| {title} | " + " | ".join(common.seconds_text(times[n]) for n in FIXED_COUNTS)
                     + f" | {common.seconds_text(times['adaptive'])} | {times['adaptive'] / best:.2f}x |")
        seconds = [t for t, _, _ in trajectory]
        axes[0][column].step(seconds, [limit for _, limit, _ in trajectory], where="post")
        axes[0][column].set_title(title)
        axes[0][column].set_ylabel("tasks in flight allowed")
        axes[1][column].plot(seconds, [rate for _, _, rate in trajectory], marker=".")
        axes[1][column].set_ylabel("items/s")
        axes[1][column].set_xlabel("seconds into the run")
    figure.tight_layout()
    path = os.path.join(common.RESULTS_DIR, "quick" if QUICK else "", "adaptive.png")
    figure.savefig(path, dpi=90)
    lines += ["", "![workers and throughput over time](adaptive.png)"]
    print("\n".join(lines))
    common.write_results("adaptive.md", lines, quick=QUICK)
    print(f"\nwritten: {os.path.relpath(path)}", file=sys.stderr)


if __name__ == "__main__":
    main()
