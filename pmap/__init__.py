"""pmap: run a function over many inputs in parallel, behind one call.

    >>> import pmap
    >>> pmap.pmap(abs, [-1, -2, 3], backend="thread")
    [1, 2, 3]

The calls:

- `pmap.pmap(func, items, ...)`: `list(map(func, items))` in parallel; `help(pmap.pmap)`
  explains every option. `pmap.imap` streams, `pmap.starmap` spreads argument tuples,
  `pmap.Pool` keeps workers across calls, `pmap.apmap` / `pmap.aimap` serve async code.
- `backend=`: "auto" (the default: measure the first items, then choose), "serial",
  "thread", "process", "pool", "fork", "greenlet", "asyncio", "manager", "dask";
  `pmap.backends()` lists them and `pmap.explain(func, items)` says what auto would pick.
- Failures: `on_error="raise"` re-raises the item's exception; `"return"` puts a
  `pmap.Failure` in its place; `"skip"` leaves it out. `timeout=` and `retries=` per item.
- `pmap.compare` and the pytest plugin check that backends agree; `pmap.shared_array`
  puts numpy arrays in shared memory.

Install: `pip install pmap-parallel`. The command line: `pmap run --help`.
"""
# The public names load on first use (PEP 562), so a worker process that imports only
# `pmap._worker` does not pay for asyncio, the CLI's helpers or the comparison tools.
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what a type checker sees (`X as X` re-exports); at run time names load on first use
    from .backends.base import backends as backends  # a function: `pmap.backends()` lists them
    from .aio import AsyncResults as AsyncResults, aimap as aimap, apmap as apmap
    from .api import ResultList as ResultList, Results as Results, imap as imap, pmap as pmap, starmap as starmap
    from .auto import Plan as Plan, explain as explain
    from .backends.base import (Backend as Backend, BackendInfo as BackendInfo,
                                register_backend as register_backend)
    from .comparison import ResultsDiffer as ResultsDiffer, compare as compare
    from .executor import Executor as Executor
    from .pool import Pool as Pool
    from .engine import RunStats as RunStats
    from .errors import (BackendUnavailable as BackendUnavailable, Failure as Failure,
                         InitializerError as InitializerError, PmapError as PmapError,
                         RemoteTraceback as RemoteTraceback, TaskTimeout as TaskTimeout,
                         UnpicklableError as UnpicklableError, WorkerCrashed as WorkerCrashed)
    from .concurrency import Adaptive as Adaptive
    from .options import Options as Options
    from .shared import shared_array as shared_array, to_shared as to_shared
    from .seeding import item_seed as item_seed, rng as rng

_EXPORTS = {
    "pmap": "api", "imap": "api", "starmap": "api", "Pool": "pool", "Results": "api", "ResultList": "api",
    "apmap": "aio", "aimap": "aio", "AsyncResults": "aio",
    "explain": "auto", "Plan": "auto",
    "Backend": "backends.base", "BackendInfo": "backends.base", "register_backend": "backends.base",
    "compare": "comparison", "ResultsDiffer": "comparison", "Executor": "executor",
    "RunStats": "engine", "Options": "options", "Adaptive": "concurrency",
    "shared_array": "shared", "to_shared": "shared",
    "rng": "seeding", "item_seed": "seeding",
    "BackendUnavailable": "errors", "Failure": "errors", "InitializerError": "errors", "PmapError": "errors",
    "RemoteTraceback": "errors",
    "TaskTimeout": "errors", "UnpicklableError": "errors", "WorkerCrashed": "errors",
}
__all__ = [*_EXPORTS, "backends"]
__version__ = "0.1.0"


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        if name == "backends":  # callable: pmap.backends() lists them
            return importlib.import_module(".backends", __name__)
        raise AttributeError(f"module 'pmap' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted([*globals(), *__all__])
