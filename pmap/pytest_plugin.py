"""pytest plugin (entry point `pytest11`): run your tests on every pmap backend.

    def test_square(pmap_backend):
        assert pmap.pmap(square, range(10), backend=pmap_backend) == [x * x for x in range(10)]

    @pytest.mark.pmap_backends("thread", "process")
    def test_only_these(pmap_backend): ...
"""
from __future__ import annotations

import pytest

# Backends that need more than this machine (a cluster) are left out unless a test names them.
_NOT_BY_DEFAULT = {"manager", "dask"}


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
            params.append(pytest.param(name, id=name))
    return params


def default_backend_names() -> list[str]:
    from .backends.base import backend_names
    return [name for name in backend_names() if name not in _NOT_BY_DEFAULT]


def pytest_generate_tests(metafunc):
    if "pmap_backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("pmap_backends")
    names = list(marker.args) if marker and marker.args else default_backend_names()
    metafunc.parametrize("pmap_backend", _params(names))
