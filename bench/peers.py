"""pmap against its peers, tuned as their docs advise, on the shared workloads (issue 8).

    python bench/peers.py                 # every workload, 5 runs each; writes bench/results/peers.{md,png,json}
    python bench/peers.py --quick         # a smoke run at tiny sizes (results go to bench/results/quick/)
    python bench/peers.py --only cpu,tiny --repeat 3

Each workload runs in its own child process: the runners take turns within it (the start
rotates each round) and the table shows medians. Every peer gets a fresh pool per run, pool
start-up included, as pmap's one call pays its own; pmap's process backend and joblib's loky
backend, whose reusable executor is their point, are timed cold (executor ended before each
run) in the main table and warm in extra rows. Greenlet and gevent rows run in a second,
monkey-patched child, since their waits only yield once patched and pmap never patches.
Start-up and streaming run once per measurement in a fresh child process.
"""
import sys

if "--gevent-patch" in sys.argv:  # must come before anything imports socket or time's users
    from gevent import monkey
    monkey.patch_all()

import argparse
import importlib.util
import json
import multiprocessing
import multiprocessing.pool
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import common
import workloads
from common import Measured, Runner, pmap_runner

IO_WORKERS = 50          # concurrency of every runner in the IO workloads (auto chooses its own)
STARTUP_ITEMS = 1000
QUICK_SCALE = 0.02
QUICK_STREAM_ITEMS = 200_000
ITEM_WORKLOADS = ("tiny", "cpu", "unbalanced", "sleep", "socket", "payload_in", "payload_out", "hash",
                  "mixed", "parse", "matrix", "groupby", "partial400", "shared400", "global100", "array_in",
                  "array_out", "array_loop")
BIG_DATA_TARGETS = {  # issue 16: (workload, pmap backend, reference, at most this times the reference)
    ("partial400", "pmap process", "pmap fork", 2.0), ("partial400", "pmap pool", "pmap fork", 2.0),
    ("partial400", "pmap process, warm executor", "pmap fork", 2.0),
    ("shared400", "pmap process", "pmap fork", 2.0), ("shared400", "pmap pool", "pmap fork", 2.0),
    ("shared400", "pmap process, warm executor", "pmap fork", 2.0),
    ("array_out", "pmap process", "serial (plain map)", 0.75),
    ("array_out", "pmap process, warm executor", "serial (plain map)", 0.75),
    ("array_loop", "pmap process", "serial (plain map)", 0.75),
    ("array_loop", "pmap process, warm executor", "serial (plain map)", 0.75)}
TARGET_STARTUP = {"pmap fork": 0.030, "pmap process": 0.300}
TARGET_STREAM_MB = 50


# ---- peers, each as its docs advise ----------------------------------------------------
def shut_down_joblib_loky() -> None:
    from joblib.externals.loky import reusable_executor
    common.shut_down_reusable(reusable_executor)


def stop_tqdm_monitor() -> None:
    """mpire's progress bars start tqdm's monitor thread, which lives on after the pool."""
    tqdm_std = sys.modules.get("tqdm.std")
    if tqdm_std is None:
        return
    tqdm_std.tqdm.monitor_interval = 0  # tqdm's own switch: no monitor thread from now on
    monitor = tqdm_std.tqdm.monitor
    if monitor is not None:
        monitor.exit()
        tqdm_std.tqdm.monitor = None


def shut_down_executors() -> None:
    """End what one runner leaves running (both reusable loky executors, tqdm's monitor
    thread), so every cold run starts clean: auto reads any other thread as 'fork is unsafe'."""
    common.shut_down_loky()
    shut_down_joblib_loky()
    stop_tqdm_monitor()


def _mpire_args(items: list) -> list:
    """mpire unpacks tuple items into arguments; wrap them so the function gets the tuple."""
    return [(item,) for item in items] if items and isinstance(items[0], (tuple, dict)) else items


def process_peers(workers: int, chunksize: int, tiny: bool) -> list[Runner]:
    import joblib
    import pebble
    from mpire import WorkerPool

    method = multiprocessing.get_start_method()

    def pool_map(size):
        def run(func, items):
            with multiprocessing.Pool(workers) as pool:
                return pool.map(func, items, size)
        return run

    def futures_map(func, items):
        with ProcessPoolExecutor(workers) as executor:
            return list(executor.map(func, items, chunksize=chunksize))

    def joblib_loky(func, items):
        return joblib.Parallel(n_jobs=workers, backend="loky", batch_size="auto")(
            joblib.delayed(func)(item) for item in items)

    def mpire_map(func, items):
        with WorkerPool(n_jobs=workers) as pool:
            return pool.map(func, _mpire_args(items), chunk_size=chunksize)

    def pebble_map(func, items):
        with pebble.ProcessPool(max_workers=workers) as pool:
            return list(pool.map(func, items, chunksize=chunksize).result())

    runners = [Runner(f"multiprocessing.Pool ({method}), chunksize {chunksize}", "peer", pool_map(chunksize))]
    if tiny:
        runners.append(Runner(f"multiprocessing.Pool ({method}), default chunksize", "peer", pool_map(None)))
    return runners + [
        Runner(f"ProcessPoolExecutor, chunksize {chunksize}", "peer", futures_map),
        Runner("joblib loky, batch_size auto", "peer", joblib_loky),
        Runner(f"mpire, chunk_size {chunksize}", "peer", mpire_map),
        Runner(f"pebble ProcessPool, chunksize {chunksize}", "peer", pebble_map),
    ]


def thread_peers(workers: int, chunksize: int) -> list[Runner]:
    import joblib
    import pebble
    from mpire import WorkerPool

    def futures_map(func, items):  # ThreadPoolExecutor.map ignores chunksize
        with ThreadPoolExecutor(workers) as executor:
            return list(executor.map(func, items))

    def thread_pool(func, items):
        with multiprocessing.pool.ThreadPool(workers) as pool:
            return pool.map(func, items, chunksize)

    def joblib_threading(func, items):
        return joblib.Parallel(n_jobs=workers, backend="threading")(joblib.delayed(func)(item) for item in items)

    def mpire_threads(func, items):
        with WorkerPool(n_jobs=workers, start_method="threading") as pool:
            return pool.map(func, _mpire_args(items), chunk_size=chunksize)

    def pebble_threads(func, items):
        with pebble.ThreadPool(max_workers=workers) as pool:
            return list(pool.map(func, items, chunksize=chunksize).result())

    return [Runner("ThreadPoolExecutor", "peer", futures_map, concurrency=workers),
            Runner(f"multiprocessing ThreadPool, chunksize {chunksize}", "peer", thread_pool, concurrency=workers),
            Runner("joblib threading", "peer", joblib_threading, concurrency=workers),
            Runner(f"mpire threading, chunk_size {chunksize}", "peer", mpire_threads, concurrency=workers),
            Runner(f"pebble ThreadPool, chunksize {chunksize}", "peer", pebble_threads, concurrency=workers)]


def gevent_peer(workers: int) -> Runner:
    import gevent.pool

    def run(func, items):
        return gevent.pool.Pool(workers).map(func, items)
    return Runner("gevent Pool (patched)", "peer", run, concurrency=workers)


def warm_runners(workers: int) -> list[Runner]:
    """The reusable-executor runners, timed after an untimed first run."""
    import joblib

    def joblib_loky(func, items):
        return joblib.Parallel(n_jobs=workers, backend="loky", batch_size="auto")(
            joblib.delayed(func)(item) for item in items)
    return [pmap_runner("process", workers, "pmap process, warm executor", cold=False),
            Runner("joblib loky, warm executor", "peer", joblib_loky, warm=True)]


# ---- one workload, in a child process ----------------------------------------------------
def workers_for(workload, cores: int) -> int:
    if workload.kind == "io":
        return IO_WORKERS
    if workload.kind == "mixed":
        return 4 * cores  # each worker waits most of the time
    return cores


def item_seconds(workload, items: list, func) -> float:
    """Serial time per item, from the first items (about 50 ms of them); the IO ones are known."""
    if workload.kind == "io":
        return workload.wait_per_item
    start = time.perf_counter()
    done = 0
    for item in items:
        func(item)
        done += 1
        if time.perf_counter() - start > 0.05:
            break
    return (time.perf_counter() - start) / done


def client_cpu_per_item(workload, items: list, warm_up: int = 5, sample: int = 40) -> float:
    """CPU this process spends per item of an IO workload (building the request, parsing the
    reply). One GIL runs it one item at a time, so n x this is a floor no concurrency lowers.
    The first items pay one-off costs (a first connection), so they are not counted."""
    for item in items[:warm_up]:
        workload.func(item)
    measured = items[warm_up:warm_up + sample] or items[:sample]
    start = time.thread_time()
    for item in measured:
        workload.func(item)
    return (time.thread_time() - start) / len(measured)


def big_data_runners(workers: int) -> list[Runner]:
    """Issue 16's rows: pmap's process backends with the bytes each run sent, against joblib
    (which memory-maps arrays over 1 MB that it sends to workers) and the plain loop."""
    import joblib

    def joblib_loky(func, items):
        return joblib.Parallel(n_jobs=workers, backend="loky", batch_size="auto")(
            joblib.delayed(func)(item) for item in items)
    rows = [pmap_runner(name, None if name == "auto" else workers, show_bytes=True)
            for name in ("auto", "fork", "process", "pool")]
    return rows + [Runner("joblib loky, batch_size auto", "peer", joblib_loky)]


def runners_for(workload, n: int, cores: int, patched: bool, per_item: float) -> list[Runner]:
    workers = workers_for(workload, cores)
    chunksize = workloads.good_chunksize(n, workers, per_item)
    if patched:
        return [pmap_runner("greenlet", workers, "pmap greenlet (patched)"), gevent_peer(workers)]
    # the plain map of an IO workload takes n x wait: once is enough
    serial = Runner("serial (plain map)", "reference", lambda func, items: list(map(func, items)),
                    max_runs=1 if workload.kind == "io" else None)
    if workload.kind == "bigdata":
        return [serial] + big_data_runners(workers)
    pmap_rows = [pmap_runner("auto")]
    if workload.kind in ("cpu", "transfer", "gil", "mixed", "native"):
        pmap_rows += [pmap_runner(name, workers) for name in ("fork", "process", "pool")]
    if workload.kind in ("gil", "io", "mixed", "native"):
        pmap_rows.append(pmap_runner("thread", workers))
    if workload.name == "tiny":
        pmap_rows.append(pmap_runner("serial"))
    peers = []
    if workload.kind in ("cpu", "transfer", "gil", "mixed", "native"):
        peers += process_peers(workers, chunksize, tiny=workload.name == "tiny")
    if workload.kind in ("gil", "io", "mixed", "native"):
        peers += thread_peers(workers, chunksize)
    return [serial] + pmap_rows + peers


def child_workload(name: str, scale: float, repeat: int, patched: bool) -> None:
    workload = workloads.WORKLOADS[name]
    cores = common.usable_cpus()
    func = workload.function()
    with workloads.prepared(workload, scale) as items:
        per_item = item_seconds(workload, items, func)
        runners = runners_for(workload, len(items), cores, patched, per_item)
        records = common.measure(runners, func, items, repeat,
                                 progress=lambda line: common.log(f"  {name}: {line}"), reset=shut_down_executors,
                                 fast_runs=common.FAST_RUNS if scale == 1.0 else 0)
        if not patched and workload.kind in ("cpu", "transfer", "bigdata"):
            warm = warm_runners(cores)
            for runner in warm:  # the untimed first run starts the executor
                runner.run(func, items[:cores * 4])
            expected = list(map(func, items))
            records += common.measure(warm, func, items, repeat, expected,
                                      progress=lambda line: common.log(f"  {name}: {line}"),
                                      fast_runs=common.FAST_RUNS if scale == 1.0 else 0)
            shut_down_executors()
        cpu_per_item = client_cpu_per_item(workload, items) if workload.kind == "io" else None
    common.emit({"workload": name, "items": len(items), "item_seconds": per_item,
                 "cpu_per_item": cpu_per_item, "records": common.as_json(records)})


# ---- start-up and streaming, one fresh child per measurement ------------------------------
def _first_result_pmap(backend):
    def start():
        import pmap
        results = pmap.imap(workloads.tiny, range(STARTUP_ITEMS), backend=backend)
        return next(results), results.close
    return start


def _first_result_pool():
    pool = multiprocessing.Pool(common.usable_cpus())
    return next(pool.imap(workloads.tiny, range(STARTUP_ITEMS))), pool.terminate


def _first_result_futures():
    executor = ProcessPoolExecutor(common.usable_cpus())
    return next(executor.map(workloads.tiny, range(STARTUP_ITEMS))), executor.shutdown


def _first_result_joblib():
    import joblib
    results = joblib.Parallel(n_jobs=common.usable_cpus(), return_as="generator")(
        joblib.delayed(workloads.tiny)(x) for x in range(STARTUP_ITEMS))
    return next(results), shut_down_joblib_loky


def _first_result_mpire():
    from mpire import WorkerPool
    pool = WorkerPool(n_jobs=common.usable_cpus())
    return next(pool.imap(workloads.tiny, range(STARTUP_ITEMS))), pool.terminate


def _first_result_pebble():
    import pebble
    pool = pebble.ProcessPool(max_workers=common.usable_cpus())
    first = next(iter(pool.map(workloads.tiny, range(STARTUP_ITEMS)).result()))

    def stop():
        pool.stop()
        pool.join()
    return first, stop


STARTUP_RUNNERS = {
    "pmap fork": _first_result_pmap("fork"), "pmap process": _first_result_pmap("process"),
    "pmap pool": _first_result_pmap("pool"), "pmap thread": _first_result_pmap("thread"),
    "pmap auto": _first_result_pmap("auto"),
    f"multiprocessing.Pool ({multiprocessing.get_start_method()})": _first_result_pool,
    "ProcessPoolExecutor": _first_result_futures, "joblib loky": _first_result_joblib,
    "mpire": _first_result_mpire, "pebble ProcessPool": _first_result_pebble,
}


def child_startup(runner: str) -> None:
    import joblib, mpire, pebble, pmap  # noqa: E401,F401 - imports are not start-up
    for name in pmap.__all__:  # nor are pmap's, which load on first use
        getattr(pmap, name)
    start = time.perf_counter()
    first, stop = STARTUP_RUNNERS[runner]()
    elapsed = time.perf_counter() - start
    stop()
    common.emit({"seconds": elapsed, "correct": first == workloads.tiny(0)})


def _stream_pmap(backend):
    def stream(items):
        import pmap
        return pmap.imap(workloads.tiny, items, backend=backend)
    return stream


def _stream_pool(items):
    pool = multiprocessing.Pool(common.usable_cpus())
    return pool.imap(workloads.tiny, items, chunksize=1000)


def _stream_joblib(items):
    import joblib
    return joblib.Parallel(n_jobs=common.usable_cpus(), return_as="generator")(
        joblib.delayed(workloads.tiny)(x) for x in items)


STREAM_RUNNERS = {
    "pmap serial": _stream_pmap("serial"), "pmap thread": _stream_pmap("thread"),
    "pmap fork": _stream_pmap("fork"), "pmap process": _stream_pmap("process"),
    "pmap pool": _stream_pmap("pool"), "pmap auto": _stream_pmap("auto"),
    f"multiprocessing.Pool.imap ({multiprocessing.get_start_method()}), chunksize 1000": _stream_pool,
    "joblib loky, return_as generator": _stream_joblib,
}


def _peak_rss_reset() -> bool:
    """Reset this process's peak RSS (Linux 4.0+), so the peak read later belongs to the run."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_stream(runner: str, count: int) -> None:
    import psutil
    import joblib, pmap  # noqa: E401,F401 - imports are not the run's memory
    baseline = psutil.Process().memory_info().rss
    exact = _peak_rss_reset()
    start = time.perf_counter()
    total = 0
    for value in STREAM_RUNNERS[runner](i for i in range(count)):
        total += value
    elapsed = time.perf_counter() - start
    growth = _peak_rss_bytes() - baseline
    common.emit({"seconds": elapsed, "growth_mb": growth / 2**20, "exact_peak": exact,
                 "correct": total == count * (count + 1) // 2})


# ---- the parent: run everything, then report -----------------------------------------------
def run_workloads(names, scale, repeat, limit) -> dict:
    results = {}
    for name in names:
        workload = workloads.WORKLOADS[name]
        common.log(f"{name}: {workload.title}")
        for child in common.run_workload_children(__file__, name, scale, repeat, limit):
            if name not in results:  # the unpatched child's measurements describe the workload
                results[name] = dict(child.output, records=[], left_behind=0)
            results[name]["records"] += child.output["records"]
            results[name]["left_behind"] += child.left_behind
    return results


def run_fresh(kind: str, runners, repeat: int, extra: list[str], limit: float) -> dict:
    found = {}
    for runner in runners:
        values, errors = [], []
        for _ in range(repeat):
            child = common.run_child([os.path.abspath(__file__), kind, runner, *extra], limit=limit)
            if child.output is None or not child.output.get("correct"):
                errors.append("timed out" if child.returncode is None else
                              (child.stderr.strip().splitlines() or ["failed"])[-1][:200])
                continue
            values.append(child.output)
        found[runner] = {"runs": values, "error": errors[0] if errors and not values else None}
        common.log(f"{kind} {runner}: {[round(v['seconds'], 4) for v in values]} {errors[:1]}")
    return found


def summarise(result: dict) -> dict:
    """Medians, the serial and best-peer references, ratios."""
    records = common.from_json(result["records"])
    by_name = {r.name: r for r in records}
    serial = next((r.median for r in records if r.group == "reference" and r.median), None)
    peers = [r for r in records if r.group == "peer" and r.median]
    cold_peers = [r for r in peers if not r.warm]
    return {"records": records, "by_name": by_name, "serial": serial,
            "best_peer": min(peers, key=lambda r: r.median) if peers else None,
            "best_cold_peer": min(cold_peers, key=lambda r: r.median) if cold_peers else None}


def ideal_seconds(workload, n: int, record: Measured) -> float | None:
    concurrency = record.concurrency or common.plan_workers(record.note)
    if workload.kind != "io" or not concurrency:
        return None
    return workload.wait_per_item * n / min(concurrency, n)


def cpu_aware_bound(ideal: float | None, result: dict) -> float | None:
    """The ideal, or the client's own CPU time for all items when that is larger."""
    if ideal is None or not result.get("cpu_per_item"):
        return ideal
    return max(ideal, result["cpu_per_item"] * result["items"])


def ideal_note(median: float, ideal: float, result: dict) -> str:
    bound = cpu_aware_bound(ideal, result)
    note = f"{median / ideal:.2f}x ideal"
    return note if bound == ideal else note + f", {median / bound:.2f}x the CPU-aware bound"


def workload_table(name: str, result: dict) -> list[str]:
    workload = workloads.WORKLOADS[name]
    summary = summarise(result)
    serial, best_peer = summary["serial"], summary["best_peer"]
    rows = []
    order = {"reference": 0, "pmap": 1, "peer": 2}
    for record in sorted(summary["records"], key=lambda r: (order[r.group], r.median or 1e9)):
        if record.error:
            rows.append([record.name, record.group, "failed", "", "", "", record.error])
            continue
        median = record.median
        ideal = ideal_seconds(workload, result["items"], record)
        notes = [record.note] if record.note else []
        if ideal:
            notes.append(ideal_note(median, ideal, result))
        rows.append([record.name, record.group, common.seconds_text(median),
                     f"{common.seconds_text(min(record.seconds))} - {common.seconds_text(max(record.seconds))}",
                     common.ratio_text(serial / median if serial else None),
                     common.ratio_text(median / best_peer.median if best_peer else None), "; ".join(notes)])
    about = f"{result['items']:,} items, about {common.seconds_text(result['item_seconds'])} each serially"
    if result.get("cpu_per_item"):
        cpu = result["cpu_per_item"]
        about += (f"; this process spends {common.seconds_text(cpu)} of CPU on each, so with one GIL no "
                  f"runner can beat {common.seconds_text(cpu * result['items'])} (the CPU-aware bound, "
                  "when larger than the ideal of wait x items / concurrency)")
    lines = [f"### {workload.title}", "", about + ".", ""]
    lines += common.markdown_table(["runner", "kind", "median", "range", "speed-up vs serial",
                                    "time vs best peer", "note"], rows)
    return lines + [""]


def summary_table(results: dict) -> list[str]:
    rows = []
    for name, result in results.items():
        summary = summarise(result)
        pmap_fixed = [r for r in summary["records"] if r.group == "pmap" and r.median and r.name != "pmap auto"]
        best_pmap = min(pmap_fixed, key=lambda r: r.median) if pmap_fixed else None
        auto = summary["by_name"].get("pmap auto")
        best_peer, serial = summary["best_peer"], summary["serial"]
        rows.append([name, common.seconds_text(serial),
                     f"{best_peer.name}: {common.seconds_text(best_peer.median)}" if best_peer else "-",
                     f"{best_pmap.name}: {common.seconds_text(best_pmap.median)}" if best_pmap else "-",
                     common.ratio_text(best_pmap.median / best_peer.median if best_pmap and best_peer else None),
                     f"{common.seconds_text(auto.median)} ({auto.note})" if auto and auto.median else "-",
                     common.ratio_text(auto.median / serial if auto and auto.median and serial else None)])
    return common.markdown_table(["workload", "serial", "best peer", "best pmap backend",
                                  "best pmap / best peer", "auto (choice)", "auto / serial"], rows)


def fresh_table(found: dict, value: str, unit: str, scale: float) -> list[str]:
    rows = []
    for runner, data in found.items():
        values = [run[value] for run in data["runs"]]
        if not values:
            rows.append([runner, "failed", "", data["error"] or ""])
            continue
        rows.append([runner, f"{statistics.median(values) * scale:.1f} {unit}",
                     f"{min(values) * scale:.1f} - {max(values) * scale:.1f}", len(values)])
    return common.markdown_table(["runner", "median", "range", "runs"], rows)


def median_of(found: dict, runner: str, value: str) -> float | None:
    values = [run[value] for run in found.get(runner, {}).get("runs", [])]
    return statistics.median(values) if values else None


def native_targets(results: dict) -> list[tuple[str, str, bool | None]]:
    """The issue 14 targets on numpy and pandas work: pmap's best backend no slower than joblib,
    process >= 1.5x serial on the matrix workload."""
    checks = []
    for name in ("matrix", "groupby"):
        if name not in results:
            continue
        summary = summarise(results[name])
        ours = [r for r in summary["records"] if r.group == "pmap" and r.median and not r.warm]
        joblib_rows = [r for r in summary["records"] if r.name.startswith("joblib") and r.median and not r.warm]
        if ours and joblib_rows:
            best, peer = min(ours, key=lambda r: r.median), min(joblib_rows, key=lambda r: r.median)
            checks.append((f"{name}: pmap's best backend no slower than joblib's best",
                           f"{best.name} {common.seconds_text(best.median)} vs {peer.name} "
                           f"{common.seconds_text(peer.median)}", best.median <= peer.median))
        process = summary["by_name"].get("pmap process")
        if name == "matrix" and process and process.median and summary["serial"]:
            speedup = summary["serial"] / process.median
            checks.append(("matrix: pmap process >= 1.5x serial", f"{speedup:.2f}x serial", speedup >= 1.5))
    return checks


def targets(results: dict, startup: dict, streaming: dict) -> list[tuple[str, str, bool | None]]:
    """The issue 8 targets: (target, what was measured, met?)."""
    checks = []
    if "cpu" in results:
        summary = summarise(results["cpu"])
        for backend in ("pmap fork", "pmap process"):
            record = summary["by_name"].get(backend)
            if record is None or not record.median or not summary["serial"]:
                checks.append((f"CPU-bound: {backend} >= 1.85x serial and <= fastest peer", "not measured", None))
                continue
            speedup = summary["serial"] / record.median
            best = summary["best_cold_peer"]  # start-up included on both sides
            versus = record.median / best.median if best else float("nan")
            checks.append((f"CPU-bound: {backend} >= 1.85x serial, start-up included, and no slower than "
                           "the fastest peer (that also starts its pool)",
                           f"{speedup:.2f}x serial; {versus:.2f}x the time of {best.name if best else '-'}",
                           speedup >= 1.85 and versus <= 1.0))
    if "tiny" in results:
        summary = summarise(results["tiny"])
        auto = summary["by_name"].get("pmap auto")
        if auto and auto.median and summary["serial"]:
            ratio = auto.median / summary["serial"]
            checks.append(("tiny: auto within 1.1x serial", f"{ratio:.2f}x serial ({auto.note})", ratio <= 1.1))
        default_pool = next((r for r in summary["records"] if r.name.endswith("default chunksize") and r.median), None)
        for backend in ("pmap fork", "pmap process"):
            record = summary["by_name"].get(backend)
            if record and record.median and default_pool:
                ratio = record.median / default_pool.median
                checks.append((f"tiny: {backend} no slower than Pool.map with its default chunksize",
                               f"{ratio:.2f}x its time", ratio <= 1.0))
    for name in ("sleep", "socket"):
        if name not in results:
            continue
        workload = workloads.WORKLOADS[name]
        for record in summarise(results[name])["records"]:
            if record.group != "pmap" or not record.median:
                continue
            ideal = ideal_seconds(workload, results[name]["items"], record)
            if ideal:
                ratio = record.median / ideal
                checks.append((f"IO ({name}): {record.name} within 1.1x the ideal",
                               f"{ideal_note(record.median, ideal, results[name])} "
                               f"({common.seconds_text(record.median)} vs {common.seconds_text(ideal)})",
                               ratio <= 1.1))
    checks += native_targets(results)
    for name, backend, reference, limit in sorted(BIG_DATA_TARGETS):
        if name not in results:
            continue
        by_name = summarise(results[name])["by_name"]
        record, versus = by_name.get(backend), by_name.get(reference)
        if record and record.median and versus and versus.median:
            ratio = record.median / versus.median
            checks.append((f"{name}: {backend} at most {limit:g}x the time of {reference}",
                           f"{ratio:.2f}x ({common.seconds_text(record.median)}; {record.note})", ratio <= limit))
    for runner, limit in TARGET_STARTUP.items():
        value = median_of(startup, runner, "seconds")
        if value is not None:
            checks.append((f"start-up to first result: {runner} under {limit * 1000:.0f} ms",
                           f"{value * 1000:.1f} ms", value < limit))
    for runner in streaming:
        if runner.startswith("pmap"):
            value = median_of(streaming, runner, "growth_mb")
            if value is not None:
                checks.append((f"streaming: {runner} peak memory growth under {TARGET_STREAM_MB} MB",
                               f"{value:.1f} MB", value < TARGET_STREAM_MB))
    return checks


def chart(results: dict, startup: dict, streaming: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"reference": "#999999", "pmap": "#1f77b4", "peer": "#ff7f0e"}
    panels = len(results) + bool(startup) + bool(streaming)
    if not panels:
        return
    columns = 2
    rows = -(-panels // columns)
    height = 3.6 * rows + 0.5  # the last half inch holds the legend
    figure, axes = plt.subplots(rows, columns, figsize=(15, height), squeeze=False)
    cells = iter(axes.flat)
    for name, result in results.items():
        ax = next(cells)
        summary = summarise(result)
        records = sorted([r for r in summary["records"] if r.median], key=lambda r: r.median, reverse=True)
        speedups = [summary["serial"] / r.median if summary["serial"] else 0 for r in records]
        ax.barh([r.name.replace("multiprocessing", "mp") for r in records], speedups, color=[colours[r.group] for r in records])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(workloads.WORKLOADS[name].title, fontsize=9)
        ax.set_xlabel("speed-up vs serial (higher is better)", fontsize=8)
        ax.tick_params(labelsize=7)
    for found, value, unit, title, factor in ((startup, "seconds", "ms", "start-up: time to first result", 1000),
                                              (streaming, "growth_mb", "MB", "streaming: peak RSS growth", 1)):
        if not found:
            continue
        ax = next(cells)
        names = [n for n in found if median_of(found, n, value) is not None]
        ax.barh(names, [median_of(found, n, value) * factor for n in names],
                color=[colours["pmap" if n.startswith("pmap") else "peer"] for n in names])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"{unit} (lower is better)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in cells:
        ax.axis("off")
    from matplotlib.patches import Patch
    figure.legend(handles=[Patch(color=colour, label=label) for label, colour in
                           (("pmap", colours["pmap"]), ("peer", colours["peer"]), ("plain map", colours["reference"]))],
                  loc="upper center", ncol=3, fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.5 / height))
    figure.savefig(path, dpi=90)
    plt.close(figure)


def report(args, results, startup, streaming, header: list[str]) -> list[str]:
    lines = ["# pmap against its peers", ""] + header + [
        "",
        f"Medians of {args.repeat} runs ({common.FAST_RUNS} for a runner under {common.FAST_RUN_SECONDS * 1000:.0f} ms a run); each workload runs in its own process, the runners taking turns. "
        "Every peer starts a fresh pool per run (start-up included), as each `pmap(...)` call does; "
        "pmap's process backend and joblib's loky are timed cold in the main rows (their reusable "
        "executor ended before each run) and warm in the rows that say so. IO rows use "
        f"{IO_WORKERS} workers (auto picks its own); greenlet and gevent rows run in a second process "
        "patched by gevent.monkey.patch_all(). 'time vs best peer' below 1 means faster than every peer.",
        "", "## Summary", ""] + summary_table(results) + ["", "## Targets (issues 8 and 16)", ""]
    rows = [[target, measured, {True: "met", False: "**missed**", None: "-"}[met]]
            for target, measured, met in targets(results, startup, streaming)]
    lines += common.markdown_table(["target", "measured", ""], rows) + ["", "## Workloads", ""]
    for name, result in results.items():
        lines += workload_table(name, result)
    if startup:
        lines += ["## Start-up: time to the first result of a fresh run", "",
                  f"`imap` (or its peer's equivalent) of x + 1 over {STARTUP_ITEMS} items, in a fresh process per "
                  "run, libraries already imported; the clock stops at the first result.", ""]
        lines += fresh_table(startup, "seconds", "ms", 1000) + [""]
    if streaming:
        count = args.stream_items
        lines += ["## Streaming: peak memory", "",
                  f"x + 1 over {count:,} generated items, results summed as they come, in a fresh process per "
                  "run; growth is the driver's peak RSS during the run (VmHWM after a reset) minus its RSS "
                  "before it. Worker processes are not counted.", ""]
        rows = []
        for runner, data in streaming.items():
            runs = data["runs"]
            if not runs:
                rows.append([runner, "failed", "", data["error"] or ""])
                continue
            rows.append([runner, f"{statistics.median(r['growth_mb'] for r in runs):.1f} MB",
                         common.seconds_text(statistics.median(r["seconds"] for r in runs)), ""])
        lines += common.markdown_table(["runner", "peak RSS growth", "time", "note"], rows) + [""]
    lines += ["![pmap against its peers](peers.png)", ""]
    return lines


PEER_LIBRARIES = ("joblib", "mpire", "pebble", "gevent", "matplotlib")  # the [bench] extra, and the chart


def main() -> None:
    names = ITEM_WORKLOADS + ("startup", "streaming")
    parser = common.workload_parser(__doc__.splitlines()[0], names,
                                    "comma-separated workloads, 'startup' and 'streaming' included")
    parser.add_argument("--stream-items", type=int, default=None)
    parser.add_argument("--startup", help=argparse.SUPPRESS)
    parser.add_argument("--stream", nargs=2, help=argparse.SUPPRESS)
    args = common.parse_workload_args(parser, names)
    if args.child:
        return child_workload(args.child, args.scale, args.repeat, args.gevent_patch)
    if args.startup:
        return child_startup(args.startup)
    if args.stream:
        return child_stream(args.stream[0], int(args.stream[1]))

    missing = [name for name in PEER_LIBRARIES if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"peers.py needs {', '.join(missing)}: pip install 'pmap-parallel[bench]'")
    common.install_signal_handlers()
    header = common.header_lines("peers.py")
    scale = QUICK_SCALE if args.quick else 1.0
    args.stream_items = args.stream_items or (QUICK_STREAM_ITEMS if args.quick else workloads.STREAM_ITEMS)
    chosen = args.chosen
    results = run_workloads([n for n in chosen if n in ITEM_WORKLOADS], scale, args.repeat, args.limit)
    startup = run_fresh("--startup", STARTUP_RUNNERS, args.repeat, [], 120) if "startup" in chosen else {}
    streaming = (run_fresh("--stream", STREAM_RUNNERS, 1, [str(args.stream_items)], args.limit)
                 if "streaming" in chosen else {})

    out_dir = common.results_dir(args.quick)
    with open(os.path.join(out_dir, "peers.json"), "w") as handle:
        json.dump({"header": header, "results": results, "startup": startup, "streaming": streaming}, handle)
    lines = report(args, results, startup, streaming, header)
    common.write_results("peers.md", lines, args.quick)
    chart(results, startup, streaming, os.path.join(out_dir, "peers.png"))
    print("\n".join(lines))
    print(f"\nwritten: {os.path.relpath(out_dir)}/peers.md, peers.png, peers.json", file=sys.stderr)


if __name__ == "__main__":
    main()
