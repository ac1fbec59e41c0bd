"""The package's public names, and what a worker process has to import."""
import subprocess
import sys

import pmap


def test_every_public_name_resolves():
    missing = [name for name in pmap.__all__ if getattr(pmap, name, None) is None]
    assert missing == []
    assert pmap.compare.__name__ == "compare" and callable(pmap.backends)


def test_unknown_attribute_is_an_attribute_error():
    try:
        pmap.no_such_name
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("pmap.no_such_name did not raise")


def test_worker_side_import_stays_light():
    # process and pool workers import pmap._worker on start-up: asyncio, the engine and the
    # comparison tools would only slow every cold start
    code = ("import sys, pmap._worker; "
            "print(sorted(m for m in ('asyncio', 'pmap.api', 'pmap.engine', 'pmap.comparison', 'pmap.aio') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_first_tiny_run_imports_neither_loky_nor_plugin_metadata():
    # importing loky (for a CPU count) cost 45 ms and scanning installed plugins 20 ms, on
    # work that takes a few milliseconds
    code = ("import sys, pmap; pmap.pmap(abs, range(1000)); pmap.pmap(abs, range(10), backend='thread'); "
            "print(sorted(m for m in ('loky', 'importlib.metadata') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
