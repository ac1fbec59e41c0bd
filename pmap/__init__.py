"""pmap: run a function over many inputs in parallel, behind one call.

The public names load on first use (PEP 562), so a worker process that imports only
`pmap._worker` does not pay for asyncio, the CLI's helpers or the comparison tools.
"""
import importlib

_EXPORTS = {
    "pmap": "api", "imap": "api", "starmap": "api", "Pool": "api", "Results": "api",
    "apmap": "aio", "aimap": "aio", "AsyncResults": "aio",
    "explain": "auto", "Plan": "auto",
    "Backend": "backends.base", "BackendInfo": "backends.base", "register_backend": "backends.base",
    "compare": "comparison", "ResultsDiffer": "comparison",
    "RunStats": "engine",
    "BackendUnavailable": "errors", "Failure": "errors", "PmapError": "errors", "RemoteTraceback": "errors",
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
