"""pmap: run a function over many inputs in parallel, behind one call."""
from .api import Pool, Results, imap, pmap, starmap
from .aio import AsyncResults, aimap, apmap
from .auto import Plan, explain
from . import backends  # callable: pmap.backends() lists them
from .backends.base import Backend, BackendInfo, register_backend
from .compare import ResultsDiffer, compare
from .engine import RunStats
from .errors import (BackendUnavailable, Failure, PmapError, RemoteTraceback, TaskTimeout,
                     UnpicklableError, WorkerCrashed)

__all__ = [
    "pmap", "imap", "starmap", "Pool", "Results", "explain", "Plan", "backends", "register_backend", "Backend",
    "apmap", "aimap", "AsyncResults",
    "BackendInfo", "RunStats", "Failure", "PmapError", "TaskTimeout", "WorkerCrashed",
    "BackendUnavailable", "RemoteTraceback", "UnpicklableError", "compare", "ResultsDiffer",
]
__version__ = "0.1.0"
