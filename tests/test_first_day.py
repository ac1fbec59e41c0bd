"""What a new user meets on the first day: warnings pmap should not give, usage errors named
as such. Each case runs in a fresh interpreter, as a user's script or test suite would."""
import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import pytest

import pmap
from workloads import square

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(tmp_path, code, *args, name="script.py"):
    (tmp_path / name).write_text(textwrap.dedent(code))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)


@pytest.mark.timeout(250)
def test_fork_after_a_process_run_does_not_warn_about_lokys_threads(tmp_path):
    child = run_python(tmp_path, """
        import threading
        import pmap

        def square(x):
            return x * x

        if __name__ == "__main__":
            pmap.pmap(square, range(10), backend="process")   # leaves loky's executor threads
            assert threading.active_count() > 1, threading.enumerate()
            assert pmap.pmap(square, range(10), backend="fork") == [x * x for x in range(10)]
            plan = pmap.explain(square, range(10**6))
            assert "other threads run" not in plan.reason, plan
        """, "-W", "error", "script.py")
    assert child.returncode == 0, child.stderr


@pytest.mark.timeout(250)
def test_fork_still_warns_about_a_thread_of_the_callers(tmp_path):
    child = run_python(tmp_path, """
        import threading
        import pmap

        def square(x):
            return x * x

        if __name__ == "__main__":
            stop = threading.Event()
            threading.Thread(target=stop.wait, daemon=True).start()
            pmap.pmap(square, range(10), backend="fork")
            stop.set()
        """, "script.py")
    assert child.returncode == 0, child.stderr
    assert "forking a process that runs 1 other thread(s)" in child.stderr, child.stderr


@pytest.mark.timeout(250)
def test_the_plugins_fixture_and_helper_pass_under_warnings_as_errors(tmp_path):
    # assert_backends_agree first, in its own file: the greenlet backend warns once per process,
    # so the first test that reaches it is the one that must not fail.
    (tmp_path / "test_agree.py").write_text(textwrap.dedent("""
        from pmap.pytest_plugin import assert_backends_agree

        def my_function(x):
            return x * x + 1

        def test_same_answer_everywhere():
            assert_backends_agree(my_function, list(range(20)))
        """))
    child = run_python(tmp_path, """
        import pmap

        def my_function(x):
            return x * x + 1

        inputs = list(range(20))

        def test_my_function(pmap_backend):
            assert pmap.pmap(my_function, inputs, backend=pmap_backend) == [my_function(x) for x in inputs]
        """, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", "test_fixture.py", "test_agree.py",
        name="test_fixture.py")
    assert child.returncode == 0, child.stdout + child.stderr
    assert "greenlet" in pmap.pytest_plugin.default_backend_names()
    assert "fork" in pmap.pytest_plugin.default_backend_names()
    assert re.search(r"\b7 passed", child.stdout) and "skipped" not in child.stdout, child.stdout


def test_compare_names_asyncio_with_a_plain_function_a_usage_error():
    with pytest.raises(TypeError, match=r"backend 'asyncio' runs only async def functions, and square"):
        pmap.compare(square, range(4), ["thread", "asyncio"])


UNGUARDED = """
    import pmap

    def square(x):
        return x * x

    print(pmap.pmap(square, range(10), backend={backend!r}{options}))
    """


@pytest.mark.timeout(250)
@pytest.mark.parametrize("backend, options", [
    ("pool", ""),                                  # forkserver, the default on Linux
    ("pool", ", start_method='spawn'"),
    pytest.param("dask", "", marks=pytest.mark.skipif(
        importlib.util.find_spec("distributed") is None, reason="dask.distributed is not installed")),
], ids=["pool-forkserver", "pool-spawn", "dask"])
def test_a_script_without_the_main_guard_gets_one_paragraph_naming_the_fix(tmp_path, backend, options):
    child = run_python(tmp_path, UNGUARDED.format(backend=backend, options=options), "script.py")
    assert child.returncode == 1, child.stdout + child.stderr
    assert child.stdout == "", child.stdout           # no worker ran the script's work either
    assert child.stderr.count("Traceback") == 1, child.stderr
    assert len(child.stderr.splitlines()) < 30, child.stderr
    assert f"the workers of backend {backend!r} import your main script" in child.stderr
    assert 'under `if __name__ == "__main__":`' in child.stderr.splitlines()[-1], child.stderr


@pytest.mark.timeout(250)
def test_a_pool_made_without_the_main_guard_gets_the_same_paragraph(tmp_path):
    child = run_python(tmp_path, """
        import pmap

        def square(x):
            return x * x

        with pmap.Pool(2, backend="pool") as pool:
            print(pool.map(square, range(10)))
        """, "script.py")
    assert child.returncode == 1 and child.stdout == "", child.stdout + child.stderr
    assert len(child.stderr.splitlines()) < 30, child.stderr
    assert 'under `if __name__ == "__main__":`' in child.stderr.splitlines()[-1], child.stderr


@pytest.mark.timeout(250)
def test_the_guard_is_told_apart_from_a_call_at_the_top_level(tmp_path):
    child = run_python(tmp_path, """
        from pmap.backends._procutil import called_from_an_unguarded_script

        def inside_a_function():
            return called_from_an_unguarded_script()

        print("top", called_from_an_unguarded_script())
        if __name__ == "__main__":
            print("guarded", called_from_an_unguarded_script(), inside_a_function())
        """, "script.py")
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["top", "True", "guarded", "False", "False"], child.stdout


NOTEBOOK_CELL = '''
    import linecache
    import sys

    import pmap

    CELL = """
    def explode(x):
        if x == 3:
            raise ValueError("three is right out")  # the cell's own line
        return x
    """
    # What IPython does with a cell: its lines go into linecache only, under a name no file has.
    name = "<ipython-input-7-0123456789ab>"
    linecache.cache[name] = (len(CELL), None, CELL.splitlines(keepends=True), name)
    exec(compile(CELL, name, "exec"), globals())

    if __name__ == "__main__":
        out = pmap.pmap(explode, range(5), backend=sys.argv[1], on_error="return")
        print(out[3].traceback)
        try:
            pmap.pmap(explode, range(5), backend=sys.argv[1])
        except ValueError as error:
            print(error.__cause__)
    '''


@pytest.mark.timeout(250)
@pytest.mark.parametrize("backend", ["process", "pool", "manager"])
def test_a_notebook_cells_function_shows_its_source_line_in_the_workers_traceback(tmp_path, backend):
    child = run_python(tmp_path, NOTEBOOK_CELL, "script.py", backend)
    assert child.returncode == 0, child.stderr
    line = 'raise ValueError("three is right out")  # the cell\'s own line'
    assert child.stdout.count('File "<ipython-input-7-0123456789ab>", line 4, in explode') == 2, child.stdout
    assert child.stdout.count(line) == 2, child.stdout  # in the Failure's traceback and the raised one's cause
