"""The backends, one module each, and the registry (`base`).

`pmap.backends` is both this package and the function DESIGN names: `pmap.backends()` lists
every backend, so `import pmap.backends.dask` and `pmap.backends()` both work.
"""
import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self):
        """Every registered backend, whether it can run here, and why not."""
        from .base import backends
        return backends()


sys.modules[__name__].__class__ = _CallablePackage
