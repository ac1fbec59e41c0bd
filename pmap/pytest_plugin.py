"""pytest plugin (entry point `pytest11`): run your tests on every pmap backend.

    def test_square(pmap_backend):        # every local backend but asyncio (async def only)
        assert pmap.pmap(square, range(10), backend=pmap_backend) == [x * x for x in range(10)]

    @pytest.mark.pmap_backends("thread", "process")
    def test_only_these(pmap_backend): ...

Or check in one test that every backend gives serial's results, with `assert_backends_agree`
(built on `pmap.compare`); a disagreement fails the test naming the backends and the first
differing index, and the returned table holds each backend's time and stats:

    from pmap.pytest_plugin import assert_backends_agree

    def test_same_everywhere():
        assert_backends_agree(square, range(100))                        # every local backend
        assert_backends_agree(square, range(100), ["thread", "process"])  # just these
        assert_backends_agree(noisy, items, ordered=False, equal=math.isclose, workers=2)
"""
from __future__ import annotations

import importlib

import pytest

# pmap itself is imported only when a test uses it, not whenever pytest starts.


# Warnings about a backend the fixture chose, not the test's author: the greenlet case warns that
# the test process is not monkey-patched, which is true of every test run and no fault of the
# test. A project that runs its tests with `-W error` must still pass.
_CHOSEN_FOR_YOU = {"greenlet": ("pmap.backends.greenlet.NotCooperativeWarning",)}


def default_backend_names() -> list[str]:
    """The fixture's default list: every registered backend that runs on this machine alone and
    runs any function. Backends that run only `async def` functions (asyncio) are left out:
    name them with the marker, as `@pytest.mark.pmap_backends("asyncio", "thread")`."""
    from .comparison import ASYNC_ONLY, default_backend_names
    return [name for name in default_backend_names() if name not in ASYNC_ONLY]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "pmap_backends(*names): run this test's pmap_backend fixture only on these backends")


def _params(names):
    from .backends.base import backends
    infos = {info.name: info for info in backends()}
    params = []
    for name in names:
        info = infos.get(name)
        if info is None:
            params.append(pytest.param(name, id=name, marks=pytest.mark.skip(reason=f"backend {name!r} is not registered")))
        elif not info.available:
            params.append(pytest.param(name, id=name, marks=pytest.mark.skip(reason=f"backend {name!r} unavailable: {info.reason}")))
        else:
            params.append(pytest.param(name, id=name, marks=[pytest.mark.filterwarnings(f"ignore::{warning}")
                                                             for warning in _CHOSEN_FOR_YOU.get(name, ())]))
    return params


def pytest_generate_tests(metafunc):
    if "pmap_backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("pmap_backends")
    names = list(marker.args) if marker and marker.args else default_backend_names()
    metafunc.parametrize("pmap_backend", _params(names))


def assert_backends_agree(func, items, backends=None, *, ordered: bool = True, repeat: int = 1,
                          equal=None, **options):
    """Fail the test unless `func` over `items` gives serial's results on every backend.

    Parameters
    ----------
    func : callable
        The function under test.
    items : iterable
        Its inputs, read once.
    backends : iterable of str or None, default None
        Names to run. None: the `pmap_backend` fixture's list; unavailable ones are reported in
        the table, not failed, and the greenlet backend's warning that the test process is not
        monkey-patched is not raised (the helper, not the test, chose that backend).
    ordered : bool, default True
        False compares results as multisets.
    repeat : int, default 1
        Runs per backend.
    equal : callable or None, default None
        How two results compare. None: `==`, NaN equal to NaN, arrays element-wise,
        `pmap.Failure`s by kind, index, exception type and message.
    **options
        Passed to every run, e.g. `workers=2`, `on_error="return"`, `timeout=5`.

    Returns
    -------
    Comparison
        The `pmap.compare` table (times, speedups, stats) for further checks.

    Raises
    ------
    pmap.ResultsDiffer
        An AssertionError naming the backend and the first differing index.
    """
    __tracebackhide__ = True
    import warnings

    from .comparison import compare
    with warnings.catch_warnings():
        for name in _CHOSEN_FOR_YOU if backends is None else ():
            for warning in _CHOSEN_FOR_YOU[name]:
                module, _, category = warning.rpartition(".")
                warnings.filterwarnings("ignore", category=getattr(importlib.import_module(module), category))
        return compare(func, items, backends, repeat=repeat, ordered=ordered, equal=equal, check=True, **options)
