"""The function to run: `package.module:function` or `path/to/file.py:function`, imported
once, and the wrapper that applies it to one item (spreading JSON arguments, keeping the index)."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
from typing import Callable

from .common import UsageError

def _on_path(directory: str) -> None:
    """Make `directory` importable here and in worker processes started later (spawn, forkserver)."""
    if directory not in sys.path:
        sys.path.insert(0, directory)
    parts = os.environ.get("PYTHONPATH", "").split(os.pathsep) if os.environ.get("PYTHONPATH") else []
    if directory not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([directory] + parts)


def _describe_exception(exc: BaseException) -> str:
    """`Type: message`, plus where it was raised (SyntaxError already says where)."""
    text = f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, SyntaxError):
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            text += f" ({os.path.basename(tb.tb_frame.f_code.co_filename)}, line {tb.tb_lineno})"
    return text


def _import_module(name: str):
    _on_path(os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise UsageError(f"no module named {name!r} (looked in the current directory and on "
                             "sys.path; set PYTHONPATH to add a directory)") from None
        raise UsageError(f"importing {name!r} failed: {_describe_exception(exc)}") from None
    except (Exception, SystemExit) as exc:  # the user's module may raise anything (sys.exit too): one line
        raise UsageError(f"importing {name!r} failed: {_describe_exception(exc)}") from None


_FILE_MODULES: dict = {}  # path -> module: a file named twice (function, initializer, exception) is one module


def _import_file(path: str):
    if not os.path.isfile(path):
        raise UsageError(f"no such file: {path}")
    path = os.path.abspath(path)
    if path in _FILE_MODULES:
        return _FILE_MODULES[path]
    directory = os.path.dirname(path)
    _on_path(directory)  # so the file can import its neighbours, here and in workers
    stem = os.path.splitext(os.path.basename(path))[0]
    # Import it under its own name, so process workers import it the same way; a name that
    # would clash gets a private one, and then the function travels by value (cloudpickle).
    by_value = (not stem.isidentifier() or stem in sys.modules
                or stem in getattr(sys, "stdlib_module_names", ()))
    name = f"_pmap_target_{abs(hash(path)):x}_{stem}" if by_value else stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # the user's file may raise anything (sys.exit too): one line
        del sys.modules[name]
        raise UsageError(f"importing {os.path.basename(path)} failed: {_describe_exception(exc)}") from None
    if by_value:
        import cloudpickle
        cloudpickle.register_pickle_by_value(module)
    _FILE_MODULES[path] = module
    return module


def load_target(target: str, what: str = "function") -> Callable:
    """The function (or other `what`) named by `package.module:function` or `path/to/file.py:function`."""
    module_part, sep, attribute = target.rpartition(":")
    if not sep or not module_part or not attribute:
        label, upper = ("target" if what == "function" else what), what.upper()
        raise UsageError(f"{label} {target!r} must be MODULE:{upper} or path/to/file.py:{upper}")
    if module_part.endswith(".py") or "/" in module_part or os.sep in module_part:
        module = _import_file(module_part)
    else:
        module = _import_module(module_part)
    obj = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            known = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
            import difflib
            close = difflib.get_close_matches(attribute, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            where = module_part if module_part.endswith(".py") else f"module {module_part!r}"
            raise UsageError(f"{where} has no {what} {attribute!r}{hint}") from None
    if not callable(obj):
        raise UsageError(f"{target} is not callable (it is a {type(obj).__name__})")
    return obj


class Call:
    """Applies the user's function to one item: a JSON array is spread as positional
    arguments and an object as keyword arguments when `star` is set. With `indexed`,
    items arrive as (index, item) and results leave as (index, output line, extras), so the
    index survives unordered output, skipped failures and resumed runs. The line is made by
    `render` in the worker: a result that cannot be written (not JSON, or a line break in text
    mode) fails its own item, with the item's index and value. With `timed`, extras hold the
    job log's record of the call (start, seconds, worker)."""

    __slots__ = ("func", "star", "indexed", "render", "timed")

    def __init__(self, func: Callable, star: bool = False, indexed: bool = False,
                 render: Callable | None = None, timed: bool = False):
        self.func = func
        self.star = star
        self.indexed = indexed
        self.render = render
        self.timed = timed

    def __reduce__(self):
        return (type(self), (self.func, self.star, self.indexed, self.render, self.timed))

    def _apply(self, item):
        if self.star:
            if isinstance(item, (list, tuple)):
                return self.func(*item)
            if isinstance(item, dict):
                return self.func(**item)
        return self.func(item)

    def _leave(self, index, item, result, clock):
        line = result if self.render is None else self.render(index, item, result)
        if clock is None:
            return index, line, None
        from .command import worker_name
        started_at, started = clock
        return index, line, {"attempts": [{"start": started_at, "seconds": time.perf_counter() - started,
                                           "outcome": "ok", "worker": worker_name()}]}

    def _clock(self):
        return (time.time(), time.perf_counter()) if self.timed else None

    def __call__(self, item):
        if self.indexed:
            index, item = item
            clock = self._clock()
            return self._leave(index, item, self._apply(item), clock)
        return self._apply(item)


class AsyncCall(Call):
    """`Call` for an `async def` function, so backends still see a coroutine function."""

    __slots__ = ()

    async def __call__(self, item):
        if self.indexed:
            index, item = item
            clock = self._clock()
            return self._leave(index, item, await self._apply(item), clock)
        return await self._apply(item)


def make_call(func: Callable, star: bool, indexed: bool, render: Callable | None = None,
              timed: bool = False) -> Callable:
    from .._worker import is_async
    return (AsyncCall if is_async(func) else Call)(func, star, indexed, render, timed)


# ---- remote backends: a target's own file travels by value --------------------------------
# Workers of a remote backend (manager hosts, dask workers) may run in another directory or on
# another machine, where the target's module cannot be imported by name.
def for_backend(func: Callable, backend: str) -> Callable:
    """`func`, with its module registered to travel by value when `backend` runs its workers
    elsewhere (kind "remote") and the module is the user's own file, not an installed one."""
    from ..backends.base import resolve_backend_class
    try:
        remote = backend != "auto" and resolve_backend_class(backend).kind == "remote"
    except Exception:  # an unknown backend, or a plugin whose import raises anything: reported where the run starts
        return func
    module = sys.modules.get(getattr(func, "__module__", None) or "")
    path = getattr(module, "__file__", None)
    if not remote or module is None or not path or _installed(path) \
            or module.__name__ == "__main__" or module.__name__.split(".")[0] == "pmap":
        return func
    import cloudpickle
    cloudpickle.register_pickle_by_value(module)
    return func


def _installed(path: str) -> bool:
    """Whether `path` lies in the standard library or a site-packages directory."""
    import site
    import sysconfig
    path = os.path.realpath(path)
    roots = set(site.getsitepackages()) | {site.getusersitepackages()}
    roots |= {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    return any(path.startswith(os.path.realpath(root) + os.sep) for root in roots if root)
