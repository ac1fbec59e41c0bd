"""Native thread pools (BLAS, OpenMP) are part of the worker count: counted inside real
workers of each backend, with the user's settings, inner_threads=, a fork after the parent
used BLAS or GNU OpenMP, and auto on matrix work."""
import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

np = pytest.importorskip("numpy", reason="numpy is in the test extra; these tests need a BLAS")
threadpoolctl = pytest.importorskip("threadpoolctl")

import pmap  # noqa: E402
from pmap import native  # noqa: E402
from pmap.auto import decide  # noqa: E402
from pmap.probe import NATIVE_THREADS_SHARE, Meter  # noqa: E402
from pmap.backends.base import usable_cpus  # noqa: E402
from pmap.options import Options  # noqa: E402
from native_workloads import blas_threads, environment_variable, matrix_checksum  # noqa: E402

CPUS = usable_cpus()
HAS_BLAS_POOL = any(p["user_api"] == "blas" for p in threadpoolctl.threadpool_info())
needs_two_cpus = pytest.mark.skipif(CPUS < 2, reason="with one usable CPU every limit is 1 thread anyway")
needs_blas = pytest.mark.skipif(not HAS_BLAS_POOL, reason="numpy here has no BLAS threadpoolctl can see")
POOL_WORKERS = [("thread", {}), ("process", {}), ("fork", {}), ("pool", {}),
                ("pool", {"start_method": "spawn"}), ("manager", {})]


def _backend_params():
    return [pytest.param(name, options, id=name + ("-" + options["start_method"] if options else ""))
            for name, options in POOL_WORKERS]


@pytest.fixture(autouse=True)
def no_thread_variables(monkeypatch):
    """Start each test from an environment without thread-count variables (restored after): a
    LocalCluster of dask, started by an earlier test, sets OMP/MKL/OPENBLAS_NUM_THREADS=1 in
    this process, and a variable set by anyone counts as the user's."""
    for name in (*native.VARIABLES, "GOTO_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)


def parent_blas_threads():
    return {p["internal_api"]: p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"}


@needs_two_cpus
@needs_blas
@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend, options", _backend_params())
def test_each_worker_runs_cpus_over_workers_blas_threads(backend, options):
    before = parent_blas_threads()
    out = pmap.pmap(blas_threads, range(4), backend=backend, workers=2, chunksize=1, **options)
    expected = max(1, CPUS // 2)
    assert out and all(counts and set(counts.values()) == {expected} for counts in out), out
    if backend != "manager":
        assert out.stats.native_threads.threads == expected
        assert f"{CPUS} CPUs // 2 workers" in str(out.stats)
    assert parent_blas_threads() == before  # the thread backend restores the parent's pools


@needs_two_cpus
@needs_blas
@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["process", "fork", "thread"])
def test_one_worker_keeps_every_cpu(backend):
    out = pmap.pmap(blas_threads, range(2), backend=backend, workers=1)
    assert all(set(counts.values()) == {CPUS} for counts in out), out


@needs_two_cpus
@needs_blas
@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["process", "fork", "pool"])
def test_a_variable_the_user_set_wins(backend, monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", str(CPUS))
    out = pmap.pmap(blas_threads, range(2), backend=backend, workers=2)
    if backend == "process":  # a new interpreter reads it; a forked one keeps the parent's pool as it is
        assert all(counts == {"openblas": CPUS} for counts in out if "openblas" in counts), out
    assert "OPENBLAS_NUM_THREADS" in str(out.stats.native_threads)  # "kept ... (set by you)"
    assert pmap.pmap(environment_variable, ["OPENBLAS_NUM_THREADS"], backend=backend, workers=2) == [str(CPUS)]


def test_omp_num_threads_also_decides_for_the_libraries_that_fall_back_to_it(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    limits = native.limits_for(workers=2)
    in_workers = dict(limits.env)
    assert in_workers["OMP_NUM_THREADS"] == "3"  # carried to workers whatever their start
    assert "OPENBLAS_NUM_THREADS" not in in_workers and "MKL_NUM_THREADS" not in in_workers
    assert "NUMEXPR_NUM_THREADS" not in in_workers
    assert in_workers["VECLIB_MAXIMUM_THREADS"] == str(max(1, CPUS // 2))
    assert limits.api_limit("openblas") is None and limits.api_limit("openmp") is None
    assert limits.api_limit("blis") is None and limits.kept == ("OMP_NUM_THREADS",)
    assert "kept OMP_NUM_THREADS=3 (set by you)" in str(limits)


@needs_blas
@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["process", "fork", "pool", "thread"])
def test_inner_threads_overrides_the_rule_and_the_users_variable(backend, monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    out = pmap.pmap(blas_threads, range(2), backend=backend, workers=2, inner_threads=2)
    assert all(counts.get("openblas", 2) == 2 for counts in out), out
    assert out.stats.native_threads.threads == 2 and "inner_threads=2" in str(out.stats.native_threads)


def test_inner_threads_is_checked_like_every_option():
    with pytest.raises(ValueError, match="inner_threads must be at least 1"):
        pmap.pmap(abs, [1], backend="serial", inner_threads=0)
    with pytest.raises(TypeError, match="inner_threads must be an integer"):
        pmap.pmap(abs, [1], backend="serial", inner_threads="2")
    with pytest.raises(ValueError, match="inner_threads must be at least 1"):
        pmap.Pool(backend="thread", workers=1, inner_threads=-1)


def test_inner_threads_among_backend_options_is_the_option_so_auto_takes_it_too():
    # the command line passes `-o inner_threads=N` as a backend option
    options = Options(backend_options={"inner_threads": 2, "start_method": "spawn"})
    assert options.inner_threads == 2 and dict(options.backend_options) == {"start_method": "spawn"}
    with pytest.raises(TypeError, match="inner_threads is given twice"):
        Options(inner_threads=1, backend_options={"inner_threads": 2})
    out = pmap.pmap(abs, [-1, -2], **{"inner_threads": 1})  # auto, which refuses backend options
    assert out == [1, 2]


@needs_two_cpus
@needs_blas
@pytest.mark.timeout(60)
def test_a_thread_run_limits_the_pools_while_it_lasts_and_restores_them():
    before = parent_blas_threads()
    assert max(before.values()) > 1, "numpy's BLAS should start with one thread per core"
    with pmap.Pool(backend="thread", workers=CPUS) as pool:
        assert max(parent_blas_threads().values()) == 1  # CPUS threads x 1 native thread
        inside = pool.map(blas_threads, range(4))
    assert all(set(counts.values()) == {1} for counts in inside)
    assert parent_blas_threads() == before


@needs_blas
@pytest.mark.timeout(60)
def test_overlapping_thread_runs_restore_the_pools_only_when_the_last_ends():
    before = parent_blas_threads()
    first = pmap.Pool(backend="thread", workers=max(2, CPUS))
    second = pmap.Pool(backend="thread", workers=1, inner_threads=1)
    first.close()
    first.join()  # as multiprocessing's: close() asks, join() waits for the workers to end
    assert set(parent_blas_threads().values()) == {1}  # the second run still holds its limit
    second.close()
    second.join()
    assert parent_blas_threads() == before


@needs_two_cpus
@needs_blas
@pytest.mark.timeout(90)
def test_fork_after_the_parent_used_blas_finishes_with_correct_results():
    matrix_checksum(0)  # the parent's BLAS pool has run
    assert native.fork_hazard() is not None  # its threads are running now
    expected = [matrix_checksum(seed) for seed in range(8)]
    out = pmap.pmap(matrix_checksum, range(8), backend="fork", workers=2)
    assert out == pytest.approx(expected, rel=1e-9)


OPENMP_SOURCE = r"""
#include <omp.h>
double omp_sum(int n) {
    double s = 0;
    #pragma omp parallel for reduction(+:s)
    for (int i = 0; i < n; i++) s += i * 0.5;
    return s;
}
int omp_threads(void) {
    int t = 0;
    #pragma omp parallel
    {
        #pragma omp single
        t = omp_get_num_threads();
    }
    return t;
}
"""

OPENMP_SCRIPT = r"""
import ctypes, json, sys
import pmap
lib = ctypes.CDLL(sys.argv[1])
lib.omp_sum.restype = ctypes.c_double
parent = (lib.omp_sum(100000), lib.omp_threads())  # GNU OpenMP's pool now runs in this process

def use_openmp(n):
    return lib.omp_sum(n), lib.omp_threads()

out = pmap.pmap(use_openmp, [100000] * 4, backend="fork", workers=2)
plan = pmap.explain(use_openmp, [100000] * 400)
print(json.dumps({"parent": parent, "out": out, "note": str(out.stats.native_threads), "plan": plan.backend}))
"""


@pytest.fixture(scope="module")
def openmp_library(tmp_path_factory):
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler to build an OpenMP library with")
    folder = tmp_path_factory.mktemp("openmp")
    (folder / "omp.c").write_text(OPENMP_SOURCE)
    library = folder / "libpmapomp.so"
    built = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-fopenmp", str(folder / "omp.c"), "-o", str(library)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"the C compiler cannot build OpenMP code here: {built.stderr.strip()[:200]}")
    return library


@needs_two_cpus
@pytest.mark.timeout(120)
def test_fork_after_the_parent_ran_gnu_openmp_does_not_hang(openmp_library, tmp_path):
    # A plain os.fork of this parent hangs in the child's first parallel region (libgomp's pool
    # is not fork-safe): the fork backend gives its workers one OpenMP thread instead.
    script = tmp_path / "openmp_fork.py"
    script.write_text(textwrap.dedent(OPENMP_SCRIPT))
    done = subprocess.run([sys.executable, str(script), str(openmp_library)], capture_output=True,
                          text=True, timeout=90, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    total, threads_in_parent = report["parent"]
    assert threads_in_parent == min(CPUS, os.cpu_count()) or threads_in_parent > 1
    assert report["out"] == [[total, 1]] * 4
    assert "OpenMP limited to 1 thread in forked workers" in report["note"]
    assert report["plan"] != "fork"  # auto does not fork into a running OpenMP pool


def _meter(items, wall, thread_cpu, process_cpu):
    meter = Meter()
    meter.calls, meter.wall, meter.cpu, meter.process_cpu = items, items * wall, items * thread_cpu, items * process_cpu
    meter.bytes = 100
    return meter


@needs_two_cpus
def test_auto_keeps_serial_when_the_items_native_threads_already_fill_the_cores():
    # Each item ran CPUS native threads at full speed: nothing is left for workers to win.
    meter = _meter(3, wall=0.05, thread_cpu=0.05, process_cpu=0.05 * CPUS)
    plan = decide(meter, 100, matrix_checksum, None, gil_released=True, limited_cpu=0.05 * CPUS)
    assert plan.native_parallelism == pytest.approx(CPUS)
    assert plan.backend == "serial" and "native threads" in plan.reason


@needs_two_cpus
def test_auto_runs_native_work_in_parallel_when_limited_pools_do_more_per_cpu():
    # BLAS on all cores wastes CPU (what OpenBLAS does on small matrices): one thread per item
    # does the item in less CPU, and the GIL is released: threads (or processes, warm) win.
    meter = _meter(3, wall=0.05, thread_cpu=0.05, process_cpu=0.05 * NATIVE_THREADS_SHARE * 1.5)
    plan = decide(meter, 100, matrix_checksum, None, gil_released=True, limited_cpu=0.05)
    assert plan.backend in ("thread", "process") and plan.workers == CPUS
    assert plan.estimates[plan.backend] < plan.estimates["serial"] * 0.8
    assert plan.estimates["thread"] < plan.estimates["serial"] * 0.8
    assert plan.estimates[plan.backend] == min(plan.estimates.values())


@needs_two_cpus
@needs_blas
@pytest.mark.timeout(120)
def test_auto_on_a_matrix_workload_picks_no_plan_it_expects_slower_than_serial():
    work = functools.partial(matrix_checksum, size=300)  # ~10 ms of BLAS an item
    work(0)
    plan = pmap.explain(work, range(60), inner_threads=None)
    if plan.backend == "serial":
        return  # serial is never slower than serial
    assert plan.estimates[plan.backend] <= plan.estimates["serial"]
    assert plan.inner_threads * min(plan.workers, CPUS) <= CPUS
    out = pmap.pmap(work, range(12))
    assert out == pytest.approx([work(seed) for seed in range(12)], rel=1e-9)
    if out.stats.plan.backend == "fork":  # forked into a running BLAS pool: its workers' pools are limited
        assert out.stats.native_threads is not None
