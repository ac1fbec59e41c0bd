"""The remote backends at their limits: the manager's broker with several hosts, and dask
against its own `client.map`. All on loopback; every case runs in a fresh child process.

    python bench/remote_scale.py broker                       # 4 hosts, no-op one-item tasks
    python bench/remote_scale.py broker --compare OTHER_TREE  # and the same with another checkout
    python bench/remote_scale.py broker --task-ms 10          # tasks of 10 ms: the driver's CPU per task
    python bench/remote_scale.py dask                         # pmap's dask backend against client.map

broker: a driver (pmap's manager backend, no local workers) and `--hosts` hosts, each a
`pmap worker --processes 1` started as a command, map a no-op over `--tasks` items with
chunksize=1. Reported: tasks per second, the driver's CPU per task (its process: the
broker, its connection threads and the engine share one GIL), and the hosts' CPU per task
(their supervisors and worker processes, which share the same cores on one machine). With `--compare`, the same
runs with PYTHONPATH set to another checkout (hosts included), alternating with this one.

dask: a LocalCluster whose scheduler runs in a process of its own (`--dask-workers` worker
processes, one thread each); one client maps a no-op over `--tasks` items with `client.map`
and with pmap (chunksize=1), alternating. Reported: tasks per second, and the scheduler
process's CPU per task (psutil). Medians of `--repeat` runs, with their spread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SETTLE_SECONDS = 1.0  # after a dask run, before its scheduler CPU is read
TREE = os.path.dirname(HERE)


def noop(x):
    return x


def sleep_then_return(item):
    time.sleep(item[1])
    return item


# ---- children: what runs in a fresh process --------------------------------------------------

def broker_child(hosts: int, tasks: int, repeat: int, task_ms: float) -> dict:
    """One driver and `hosts` hosts; `repeat` runs; times and driver CPU per run."""
    import psutil

    import pmap
    folder = tempfile.mkdtemp(prefix="pmap-bench-")
    key_file = os.path.join(folder, "key")
    with open(key_file, "w") as handle:
        handle.write(os.urandom(16).hex())
    os.chmod(key_file, 0o600)
    from pmap.backends.base import open_backend
    # One backend for every run: pmap closes a backend it is handed when the run ends, so its
    # close waits for the end of the benchmark (a Pool would map in chunks of its own choosing).
    backend = open_backend("manager", local_workers=0, authkey_file=key_file)
    close_backend, backend.close = backend.close, lambda kill=False: None
    procs = []
    try:
        host, port = backend.address
        for _ in range(hosts):
            procs.append(subprocess.Popen([sys.executable, "-m", "pmap", "worker", f"{host}:{port}",
                                           "--authkey-file", key_file, "--processes", "1"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while backend.broker.live_workers() < hosts:
            if time.monotonic() > deadline:
                raise SystemExit("the hosts did not join within 60 s")
            time.sleep(0.05)
        fn, items = (noop, list(range(tasks))) if not task_ms else \
            (sleep_then_return, [(i, task_ms / 1000) for i in range(tasks)])
        assert pmap.pmap(fn, items[:200], backend=backend, chunksize=1) == items[:200]  # warm up
        host_procs = [psutil.Process(p.pid) for p in procs]
        host_procs += [child for p in host_procs for child in p.children(recursive=True)]

        def hosts_cpu():
            return sum(sum(p.cpu_times()[:2]) for p in host_procs)

        runs = []
        for _ in range(repeat):
            hosts0, cpu0, wall0 = hosts_cpu(), time.process_time(), time.perf_counter()
            out = pmap.pmap(fn, items, backend=backend, chunksize=1)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            assert out == items
            runs.append({"wall": wall, "cpu": cpu, "hosts_cpu": hosts_cpu() - hosts0})
        return {"runs": runs, "tasks": tasks}
    finally:
        close_backend()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _scheduler_main(workers: int, address_file: str) -> None:
    """A LocalCluster in this process (its scheduler lives here); workers in their own processes."""
    import logging

    from distributed import LocalCluster
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None, silence_logs=logging.CRITICAL)
    with open(address_file + ".tmp", "w") as handle:
        handle.write(cluster.scheduler_address)
    os.replace(address_file + ".tmp", address_file)
    try:
        sys.stdin.read()  # until the parent closes the pipe
    finally:
        cluster.close()


def dask_child(workers: int, tasks: int, repeat: int) -> dict:
    import psutil
    from distributed import Client

    import pmap
    folder = tempfile.mkdtemp(prefix="pmap-bench-")
    address_file = os.path.join(folder, "address")
    scheduler = subprocess.Popen([sys.executable, __file__, "_scheduler", "--dask-workers", str(workers),
                                  "--address-file", address_file], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(address_file):
            if time.monotonic() > deadline or scheduler.poll() is not None:
                raise SystemExit("the dask scheduler did not start")
            time.sleep(0.1)
        with open(address_file) as handle:
            address = handle.read()
        scheduler_cpu = psutil.Process(scheduler.pid)
        client = Client(address)
        client.wait_for_workers(workers)
        items = list(range(tasks))

        def by_client_map():
            futures = client.map(noop, items, pure=False)
            return client.gather(futures)  # the futures are released on return, as pmap's are

        def by_pmap():  # a call of its own, as pmap.Pool groups its calls into tasks whatever chunksize says
            return pmap.pmap(noop, items, backend="dask", client=client, chunksize=1)

        cases = {"client.map": by_client_map, "pmap": by_pmap}
        for call in cases.values():  # warm both up
            call()
        runs: dict = {name: [] for name in cases}
        for _ in range(repeat):
            for name, call in cases.items():
                times0 = scheduler_cpu.cpu_times()
                wall0 = time.perf_counter()
                out = call()
                wall = time.perf_counter() - wall0
                assert list(out) == items, name
                del out
                time.sleep(SETTLE_SECONDS)  # the scheduler forgets the tasks the run released
                times1 = scheduler_cpu.cpu_times()
                cpu = (times1.user + times1.system) - (times0.user + times0.system)
                runs[name].append({"wall": wall, "cpu": cpu})
        client.close()
        return {"runs": runs, "tasks": tasks}
    finally:
        scheduler.stdin.close()
        try:
            scheduler.wait(30)
        except subprocess.TimeoutExpired:
            scheduler.kill()
            scheduler.wait()


# ---- the parent: runs the children, prints the tables ----------------------------------------

def run_child(tree: str, args: list) -> dict:
    env = {**os.environ, "PYTHONPATH": tree}
    done = subprocess.run([sys.executable, __file__, *args], env=env, cwd=tree, capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"a benchmark child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def broker_table(args) -> None:
    trees = [("this tree", TREE)] + ([("--compare", os.path.abspath(args.compare))] if args.compare else [])
    rates: dict = {name: [] for name, _ in trees}
    cpus: dict = {name: [] for name, _ in trees}
    host_cpus: dict = {name: [] for name, _ in trees}
    for _ in range(args.rounds):
        for name, tree in trees:  # alternate, so drift in the machine's load hits both alike
            result = run_child(tree, ["_broker", "--hosts", str(args.hosts), "--tasks", str(args.tasks),
                                      "--repeat", str(args.repeat), "--task-ms", str(args.task_ms)])
            for run in result["runs"]:
                rates[name].append(result["tasks"] / run["wall"])
                cpus[name].append(run["cpu"] / result["tasks"] * 1e6)
                host_cpus[name].append(run["hosts_cpu"] / result["tasks"] * 1e6)
    what = f"{args.task_ms:g} ms" if args.task_ms else "no-op"
    print(f"manager: {args.hosts} hosts of 1 process on loopback, {args.tasks:,} {what} one-item tasks per run; "
          f"medians (min-max) of {args.rounds} x {args.repeat} runs\n")
    print("| code | tasks/s | driver CPU per task (us) | hosts' CPU per task (us) |")
    print("|---|---|---|---|")
    for name, _ in trees:
        print(f"| {name} | {spread(rates[name])} | {spread(cpus[name])} | {spread(host_cpus[name])} |")
    if args.compare:
        ratio = statistics.median(rates["this tree"]) / statistics.median(rates["--compare"])
        print(f"\nthis tree / --compare: {ratio:.2f}x tasks/s")
    cpu_per_task = statistics.median(cpus["this tree"]) / 1e6
    per_core = 1 / cpu_per_task
    # Only for tasks like these: a task long enough to be reported alone (a 0.1 s chunk, or any
    # task under timeout=) costs a round trip of its own; docs/remote-scale.md estimates those.
    print(f"\none broker core, at this driver CPU per task: about {per_core:,.0f} such tasks/s, so about "
          f"{per_core * 0.01:,.0f} worker processes kept busy if each task took 10 ms and were reported "
          "in batches as these are")


def dask_table(args) -> None:
    result_rates: dict = {"client.map": [], "pmap": []}
    result_cpus: dict = {"client.map": [], "pmap": []}
    for _ in range(args.rounds):
        result = run_child(TREE, ["_dask", "--dask-workers", str(args.dask_workers), "--tasks", str(args.tasks),
                                  "--repeat", str(args.repeat)])
        for name, runs in result["runs"].items():
            for run in runs:
                result_rates[name].append(result["tasks"] / run["wall"])
                result_cpus[name].append(run["cpu"] / result["tasks"] * 1e6)
    print(f"dask: LocalCluster, scheduler in its own process, {args.dask_workers} worker processes of 1 thread; "
          f"{args.tasks:,} no-op one-item tasks per run; medians (min-max) of {args.rounds} x {args.repeat} runs\n")
    print("| submitted by | tasks/s | scheduler CPU per task (us) |")
    print("|---|---|---|")
    for name in result_rates:
        print(f"| {name} | {spread(result_rates[name])} | {spread(result_cpus[name])} |")
    rate = statistics.median(result_rates["pmap"]) / statistics.median(result_rates["client.map"])
    cpu = statistics.median(result_cpus["pmap"]) / statistics.median(result_cpus["client.map"])
    print(f"\npmap / client.map: {rate:.2f}x the throughput, {cpu:.2f}x the scheduler CPU per task")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["broker", "dask", "_broker", "_dask", "_scheduler"])
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--dask-workers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--task-ms", type=float, default=0.0, help="broker: each task sleeps this long")
    parser.add_argument("--repeat", type=int, default=3, help="runs per child process")
    parser.add_argument("--rounds", type=int, default=2, help="child processes per case")
    parser.add_argument("--compare", default=None, help="another checkout of pmap to run beside this one")
    parser.add_argument("--address-file", default=None)
    args = parser.parse_args(argv)
    if args.what == "_scheduler":
        _scheduler_main(args.dask_workers, args.address_file)
    elif args.what == "_broker":
        print(json.dumps(broker_child(args.hosts, args.tasks, args.repeat, args.task_ms)))
    elif args.what == "_dask":
        print(json.dumps(dask_child(args.dask_workers, args.tasks, args.repeat)))
    elif args.what == "broker":
        args.tasks = args.tasks or 5000
        broker_table(args)
    else:
        args.tasks = args.tasks or 2000
        dask_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
