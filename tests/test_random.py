"""Random numbers: every worker process draws its own, and `seed=` gives item i the same numbers
on every backend, worker count, chunk size, retry and resume (docs/randomness.md)."""
import json
import os
import random
import subprocess
import sys
import textwrap
import warnings

import pytest

import pmap
from pmap.comparison import default_backend_names
from pmap.seeding import _Pool

try:
    import numpy as np
except ImportError:  # numpy is an optional extra: its tests skip, `random`'s still run
    np = None

# a seeded run on threads whose items draw from the module-level generators warns: expected where
# a test compares only the items' own streams on such backends
shared_generators_warned = pytest.mark.filterwarnings(
    "ignore:an item of this seed= run used the module-level:RuntimeWarning")
needs_numpy = pytest.mark.skipif(np is None, reason="numpy is not installed (the pmap[numpy] extra)")
HAVE_DISTRIBUTED = True
try:
    import distributed  # noqa: F401
except ImportError:
    HAVE_DISTRIBUTED = False

PROCESS_BACKENDS = ["fork", "pool", "process", "manager"]
# items of these run alone in a process, so the module-level generators are seeded per item too
SEEDS_GLOBALS = {"serial", "fork", "pool", "process", "manager", "dask"}
EVERY_BACKEND = [*default_backend_names(), "manager", "dask"]


def _backend_param(name):
    marks = []
    if name == "dask" and not HAVE_DISTRIBUTED:
        marks.append(pytest.mark.skip(reason="the distributed package is not installed (pmap[dask])"))
    info = {b.name: b for b in pmap.backends()}.get(name)
    if info is not None and not info.available:
        marks.append(pytest.mark.skip(reason=f"backend {name!r} unavailable: {info.reason}"))
    return pytest.param(name, id=name, marks=marks)


# ---- workloads (module level, so every start method imports them) ---------------------------
def global_draws(x):
    """What an unseeded worker draws from the module-level generators, and which worker it is."""
    numbers = [random.random()]
    if np is not None:
        numbers.append(float(np.random.rand()))
    return os.getpid(), numbers


def seeded_draws(x):
    """Every source of randomness a seeded item may use: its own streams, then the module-level
    generators (reproducible only where items run alone in a process)."""
    own = [pmap.item_seed(), random.Random(pmap.item_seed()).random()]
    shared = [random.random(), random.getrandbits(64)]
    if np is not None:
        own += pmap.rng().random(3).tolist()
        shared += np.random.rand(2).tolist() + [float(np.random.normal())]
    return x, own, shared


def flaky_draws(marker_dir, x):
    """`seeded_draws`, but item 5's first attempt fails after drawing: its retry must draw the same."""
    out = seeded_draws(x)
    if x == 5:
        try:
            os.close(os.open(os.path.join(marker_dir, "failed-once"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return out
        raise ValueError("the first attempt of item 5 fails")
    return out


async def flaky_draws_async(marker_dir, x):
    return flaky_draws(marker_dir, x)


def only_own_streams(x):
    return pmap.item_seed() % 1000, random.Random(pmap.item_seed()).random()


def module_level_only(x):
    return random.random()


def call_rng(x):
    return pmap.rng()


# ---- distinct by default --------------------------------------------------------------------
def _pool_options(backend):
    return {"start_method": "fork"} if backend == "pool" else {}


@pytest.mark.parametrize("backend", [_backend_param(b) for b in PROCESS_BACKENDS])
def test_every_worker_process_draws_its_own_numbers_without_a_seed(backend):
    # the repro: 2 workers, chunksize 1, 16 items; with fork, numpy's global state was
    # copied into both workers, and 12 of 16 numbers were distinct
    random.random()
    if np is not None:
        np.random.rand()  # numpy imported and used in the caller, as a forked worker then inherits
    out = pmap.pmap(global_draws, range(16), backend=backend, workers=2, chunksize=1, **_pool_options(backend))
    for source in range(len(out[0][1])):  # random, then numpy
        numbers = [numbers[source] for _, numbers in out]
        assert len(set(numbers)) == 16, (source, numbers)


@pytest.mark.parametrize("start_method", ["fork", "forkserver", "spawn"])
def test_pool_workers_draw_their_own_numbers_whatever_the_start_method(start_method):
    import multiprocessing
    if start_method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"start method {start_method!r} is not available here")
    out = pmap.pmap(global_draws, range(12), backend="pool", workers=2, chunksize=1, start_method=start_method)
    assert len({pid for pid, _ in out}) >= 1
    for source in range(len(out[0][1])):
        assert len({numbers[source] for _, numbers in out}) == 12


# ---- seed=: the same numbers everywhere -----------------------------------------------------
def _comparable(rows, backend):
    """What must equal serial on `backend`: everything where items run alone in a process, else
    the item's own streams only (the module-level generators are shared there)."""
    if backend in SEEDS_GLOBALS:
        return rows
    return [(x, own) for x, own, _ in rows]


@pytest.fixture(scope="module")
def serial_reference(tmp_path_factory):
    marker_dir = tmp_path_factory.mktemp("serial")
    from functools import partial
    return pmap.pmap(partial(flaky_draws, str(marker_dir)), range(30), backend="serial", seed=2024, retries=1)


@shared_generators_warned
@pytest.mark.parametrize("chunksize", [1, 7])
@pytest.mark.parametrize("workers", [1, 4])
@pytest.mark.parametrize("backend", [_backend_param(b) for b in EVERY_BACKEND])
def test_seeded_results_equal_serial_on_every_backend_worker_count_and_chunk_size(
        backend, workers, chunksize, serial_reference, tmp_path):
    from functools import partial
    fn = flaky_draws_async if backend == "asyncio" else flaky_draws
    stats_out = pmap.pmap(partial(fn, str(tmp_path)), range(30), backend=backend, workers=workers,
                          chunksize=chunksize, seed=2024, retries=1)
    assert stats_out.stats.retried == 1  # item 5 failed once and ran again
    assert _comparable(list(stats_out), backend) == _comparable(serial_reference, backend)


@shared_generators_warned
def test_the_streams_are_numpys_spawned_seed_sequences_and_work_without_numpy():
    pool = _Pool(2024)
    if np is not None:
        for seed in (0, 1, 2024, 2**32 - 1, 2**32, 2**64 + 5, 2**130 + 7):
            for index in (0, 1, 29, 2**32 - 1, 2**32, 10**20):
                expected = np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(6).tolist()
                assert _Pool(seed).words_for(index, 6) == expected
        children = np.random.SeedSequence(2024).spawn(30)
        out = pmap.pmap(seeded_draws, range(30), backend="serial", seed=2024)
        for index, (_, own, _) in enumerate(out):
            assert own[2:] == np.random.default_rng(children[index]).random(3).tolist()
    words = pool.words_for(3, 2)
    out = pmap.pmap(seeded_draws, range(5), backend="thread", seed=2024)
    assert out[3][1][0] == (words[0] | words[1] << 32) & ((1 << 63) - 1)


def module_level_bits(x):
    return random.getrandbits(64), (int(np.random.randint(2**62)) if np is not None else None)


def test_no_two_items_of_a_seeded_run_share_module_level_numbers():
    # numpy's legacy state takes a 32-bit seed (its fast path): a permutation of the index, so
    # the items of one run never share one, however many there are
    assert len({_Pool(5).legacy_seed(index) for index in range(100_000)}) == 100_000
    out = pmap.pmap(module_level_bits, range(2000), backend="fork", workers=2, seed=5)
    assert len({bits for bits, _ in out}) == 2000
    if np is not None:
        assert len({legacy for _, legacy in out}) == 2000


def test_item_seed_and_random_are_the_same_without_numpy(tmp_path):
    expected = pmap.pmap(only_own_streams, range(6), backend="serial", seed=9)
    script = textwrap.dedent(f"""
        import json, random, sys
        sys.modules["numpy"] = None  # as if numpy were not installed: importing it raises ImportError
        import pmap

        def draw(x):
            return pmap.item_seed() % 1000, random.Random(pmap.item_seed()).random(), random.random()

        def use_rng(x):
            return pmap.rng()

        out = pmap.pmap(draw, range(6), backend="fork", workers=2, chunksize=1, seed=9)
        again = pmap.pmap(draw, range(6), backend="serial", seed=9)
        try:
            pmap.pmap(use_rng, [1], backend="serial", seed=9)
        except ImportError as exc:
            message = str(exc)
        print(json.dumps({{"out": out, "again": again, "message": message}}))
    """)
    (tmp_path / "no_numpy.py").write_text(script)
    done = subprocess.run([sys.executable, str(tmp_path / "no_numpy.py")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [row[:2] for row in report["out"]] == [list(row) for row in expected]
    assert report["out"] == report["again"]  # the module-level random too, fork and serial alike
    assert "numpy is not installed" in report["message"] and "pmap.item_seed()" in report["message"]


@shared_generators_warned
@pytest.mark.parametrize("backend", ["thread", "process"])
def test_pool_calls_take_seed(backend):
    expected = pmap.pmap(seeded_draws, range(20), backend="serial", seed=5)
    # seed is the Pool's: its n-th call draws from (seed, n), so each Pool here starts at call 0
    with pmap.Pool(backend=backend, workers=2, seed=5) as pool:
        mapped = pool.map(seeded_draws, range(20), chunksize=3)
    with pmap.Pool(backend=backend, workers=2, seed=5) as pool:
        unordered = sorted(pool.imap_unordered(seeded_draws, range(20)))
    with pmap.Pool(backend=backend, workers=2, seed=5) as pool:
        starred = pool.starmap(seeded_draws, [(i,) for i in range(20)])
    with pmap.Pool(backend=backend, workers=2, on_error="return") as pool:
        unseeded = pool.map(only_own_streams, [1])
    for out in (mapped, unordered, starred):
        assert _comparable(list(out), backend) == _comparable(expected, backend)
    assert isinstance(unseeded[0], pmap.Failure) and isinstance(unseeded[0].exception, RuntimeError)


@shared_generators_warned
def test_imap_and_starmap_take_seed_and_auto_mode_gives_probed_items_the_same_streams():
    expected = pmap.pmap(seeded_draws, range(40), backend="serial", seed=11)
    assert list(pmap.imap(seeded_draws, range(40), backend="fork", workers=2, seed=11)) == expected
    assert pmap.starmap(seeded_draws, [(i,) for i in range(40)], backend="process", workers=2, seed=11) == expected
    auto = pmap.pmap(seeded_draws, range(40), seed=11)  # the first items run in this thread (the probe)
    assert _comparable(list(auto), auto.stats.plan.backend) == _comparable(expected, auto.stats.plan.backend)


def test_a_seed_is_the_item_index_not_its_position_in_unordered_output():
    expected = pmap.pmap(only_own_streams, range(50), backend="serial", seed=3)
    out = pmap.pmap(only_own_streams, range(50), backend="thread", workers=4, ordered=False, seed=3)
    assert sorted(out) == sorted(expected)
    assert len(set(expected)) == 50  # and every item has a stream of its own


def test_a_failure_reports_the_original_item_not_the_index_pair():
    def fail_on_b(x):
        if x == "b":
            raise KeyError(x)
        return x

    out = pmap.pmap(fail_on_b, ["a", "b", "c"], backend="thread", seed=1, on_error="return")
    assert out[0] == "a" and out[2] == "c"
    assert out[1].item == "b" and out[1].index == 1
    with pytest.raises(KeyError) as caught:
        pmap.pmap(fail_on_b, ["a", "b", "c"], backend="fork", seed=1)
    assert "'b'" in "".join(getattr(caught.value, "__notes__", []))


@shared_generators_warned
@needs_numpy
def test_compare_agrees_across_backends_on_a_stochastic_function_given_a_seed():
    backends = ["thread", "fork", "process"]
    table = pmap.compare(seeded_draws, range(24), backends=backends, seed=1, workers=2, check=False)
    rows = {row.backend: row.status for row in table}
    assert rows["fork"] == rows["process"] == "agree"
    assert rows["thread"] == "differ"  # the module-level generators are shared among threads ...
    pmap.compare(only_own_streams, range(24), backends=backends, seed=1, workers=2)  # ... its own streams are not
    with pytest.raises(pmap.ResultsDiffer):
        pmap.compare(global_draws, range(24), backends=["process"], workers=2)  # unseeded: no agreement


# ---- outside a run, and what a run leaves behind --------------------------------------------
def test_rng_and_item_seed_outside_a_seeded_run_raise_a_clear_error():
    with pytest.raises(RuntimeError, match=r"pmap.rng\(\) works only inside a function that pmap runs with seed="):
        pmap.rng()
    with pytest.raises(RuntimeError, match=r"pmap.item_seed\(\) works only inside"):
        pmap.item_seed()
    with pytest.raises(RuntimeError, match="seed="):
        pmap.pmap(call_rng, [1], backend="serial")  # a run without seed= has no streams either


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), ("7", TypeError), (True, TypeError)])
def test_a_bad_seed_is_refused_naming_the_argument(bad, error):
    with pytest.raises(error, match="seed must be a non-negative integer"):
        pmap.pmap(only_own_streams, [1], backend="serial", seed=bad)


@needs_numpy
def test_a_numpy_integer_seed_is_an_ordinary_seed():
    assert pmap.pmap(only_own_streams, range(4), backend="serial", seed=np.uint32(3)) == \
        pmap.pmap(only_own_streams, range(4), backend="serial", seed=3)


def test_a_serial_run_leaves_the_callers_own_generators_as_they_were():
    random.seed(123)
    expected_next = random.Random(123).random()
    numpy_next = None
    if np is not None:
        np.random.seed(456)
        numpy_next = np.random.RandomState(456).rand()
    pmap.pmap(seeded_draws, range(10), backend="serial", seed=1)
    assert random.random() == expected_next
    if np is not None:
        assert np.random.rand() == numpy_next


@pytest.mark.parametrize("backend", ["thread", "greenlet"])
def test_a_seeded_run_warns_once_when_items_share_the_module_level_generators(backend):
    info = {b.name: b for b in pmap.backends()}[backend]
    if not info.available:
        pytest.skip(f"backend {backend!r} unavailable: {info.reason}")
    with pytest.warns(RuntimeWarning, match=r"pmap.rng\(\)") as caught:
        pmap.pmap(module_level_only, range(10), backend=backend, workers=2, seed=1)
    assert len([w for w in caught if "pmap.rng()" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        pmap.pmap(only_own_streams, range(10), backend=backend, workers=2, seed=1)  # no module-level use


def test_asyncio_items_each_see_their_own_stream_while_they_wait():
    import asyncio

    async def interleaved(x):
        before = pmap.item_seed()
        await asyncio.sleep(0.01 * (x % 3))  # other items run meanwhile
        return before, pmap.item_seed()

    out = pmap.pmap(interleaved, range(12), backend="asyncio", workers=6, seed=8)
    expected = pmap.pmap(only_own_streams, range(12), backend="serial", seed=8)
    assert all(before == after for before, after in out)
    assert [before % 1000 for before, _ in out] == [seed for seed, _ in expected]


def test_apmap_takes_seed_on_the_callers_loop():
    import asyncio

    async def own(x):
        await asyncio.sleep(0)
        return pmap.item_seed() % 1000, random.Random(pmap.item_seed()).random()

    async def main():
        return await pmap.apmap(own, range(10), workers=4, seed=8)

    assert asyncio.run(main()) == pmap.pmap(only_own_streams, range(10), backend="serial", seed=8)


# ---- the command line -----------------------------------------------------------------------
CLI_FUNCS = textwrap.dedent('''
    import os, random
    import pmap

    def draw(x):
        if os.environ.get("FAIL_ONCE_AT") == str(x) and not os.path.exists(f"{x}.failed"):
            open(f"{x}.failed", "w").close()
            raise ValueError(f"the first run of {x} fails")
        return f"{pmap.item_seed()} {random.random():.12f}"
''')


@pytest.fixture
def cli_work(tmp_path, monkeypatch):
    (tmp_path / "funcs.py").write_text(CLI_FUNCS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return tmp_path


def test_pmap_run_seed_gives_the_same_lines_on_two_backends_and_after_a_resume(cli_work, monkeypatch):
    from cli_helpers import invoke, lines
    serial = invoke("run", "funcs.py:draw", "--range", "12", "--seed", "77", "-b", "serial")
    assert serial.exit_code == 0, serial.output
    assert len(set(lines(serial.stdout))) == 12
    # a process run in a fresh interpreter: loky's workers, reused across this test process, would
    # not find this test's funcs.py
    process = subprocess.run([sys.executable, "-m", "pmap", "run", "funcs.py:draw", "--range", "12", "--seed", "77",
                              "-b", "process", "-j", "3", "--chunksize", "2"],
                             capture_output=True, text=True, timeout=300, cwd=cli_work)
    assert process.returncode == 0, process.stderr
    assert lines(process.stdout) == lines(serial.stdout)
    # item 4 fails on the first run; the resumed run reads it alone, at position 0 of its input
    monkeypatch.setenv("FAIL_ONCE_AT", "4")
    first = invoke("run", "funcs.py:draw", "--range", "12", "--seed", "77", "-b", "fork", "-j", "2",
                   "--on-error", "skip", "--journal", "j.journal")
    assert first.exit_code != 0 and len(lines(first.stdout)) == 11, first.output
    resumed = invoke("run", "funcs.py:draw", "--range", "12", "--seed", "77", "-b", "fork", "-j", "2",
                     "--journal", "j.journal")
    assert resumed.exit_code == 0, resumed.output
    assert lines(resumed.stdout) == lines(serial.stdout)


def test_pmap_run_refuses_a_bad_seed_in_one_line_and_a_journal_of_another_seed(cli_work):
    from cli_helpers import invoke
    bad = invoke("run", "funcs.py:draw", "--range", "3", "--seed", "-4")
    assert bad.exit_code != 0 and "seed must be a non-negative integer" in bad.output
    assert "Traceback" not in bad.output
    assert invoke("run", "funcs.py:draw", "--range", "3", "--seed", "1", "-b", "serial",
                  "--journal", "k.journal").exit_code == 0
    other = invoke("run", "funcs.py:draw", "--range", "3", "--seed", "2", "-b", "serial", "--journal", "k.journal")
    assert other.exit_code != 0 and "seed" in other.output
    cmd = invoke("run", "--cmd", "echo {}", "a", "--seed", "1")
    assert cmd.exit_code != 0 and "--seed is for a Python function" in cmd.output
