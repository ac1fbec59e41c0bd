"""Exception types, the per-item Failure record, and how a worker's error is rebuilt."""
from __future__ import annotations

import collections
import os
import reprlib
import types
from dataclasses import dataclass
from typing import Any

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 6


def short_repr(obj: Any) -> str:
    try:
        return _short.repr(obj)
    except Exception:  # a user type's broken __repr__ (it may raise anything) must not hide the real error
        return f"<{type(obj).__name__} object>"


class PmapError(Exception):
    """Base class of pmap's own errors."""


class TaskTimeout(PmapError, TimeoutError):
    """An item ran longer than its `timeout`."""

    @classmethod
    def after(cls, seconds: float) -> "TaskTimeout":
        """The error a backend raises inside an item it stopped at its deadline."""
        return cls(f"item ran longer than its timeout of {seconds:g}s")


class WorkerCrashed(PmapError):
    """The worker running an item died (segfault, os._exit, kill, out of memory)."""

    def __init__(self, message: str, exitcode: int | None = None):
        super().__init__(message)
        self.exitcode = exitcode

    def __reduce__(self):
        return (type(self), (self.args[0], self.exitcode))


class BackendUnavailable(PmapError):
    """The backend cannot run here: a missing package or platform feature."""


class InitializerError(PmapError):
    """A worker's `initializer` failed (raised, exited or was killed): the run stops, since
    every worker would fail the same way. Its `__cause__` is the initializer's exception."""


class FunctionNotPicklable(PmapError, TypeError):
    """A process backend cannot send the function to its workers."""


class ItemNotPicklable(PmapError, TypeError):
    """An item (or a task holding it) cannot be pickled to reach a worker process."""


class RemoteTraceback(Exception):
    """Carries the worker's formatted traceback as the `__cause__` of a re-raised error."""

    def __init__(self, tb_text: str):
        super().__init__(tb_text)
        self.tb_text = tb_text

    def __str__(self) -> str:
        return "\n\n" + self.tb_text


class UnpicklableError(PmapError):
    """Stands in for a worker's exception or result that could not be sent back or rebuilt
    in the caller; its message names the worker-side type and text."""


@dataclass
class Failure:
    """What `on_error="return"` puts in the slot of an item that failed. It is falsy.

    Attributes
    ----------
    index : int
        The item's position in the input.
    item : object
        The item itself.
    exception : BaseException
        What the item failed with: the function's own exception (its original type),
        `pmap.TaskTimeout`, `pmap.WorkerCrashed`, or `pmap.UnpicklableError`.
    traceback : str
        The worker's formatted traceback ("" where there is none, as for a crash).
    kind : {"error", "timeout", "crash"}
        "error": the function raised (any BaseException) or its result could not be sent back;
        "timeout": it ran past `timeout`; "crash": its worker process died running it (after
        `retries + 1` attempts).
    worker : object
        Which worker ran it (a name, a pid, or a host and pid), where the backend can tell.
    attempts : int
        How many times it was run.
    """

    index: int
    item: Any
    exception: BaseException
    traceback: str = ""
    kind: str = "error"
    worker: Any = None
    attempts: int = 1

    def __repr__(self) -> str:
        return (f"Failure(index={self.index}, item={short_repr(self.item)}, kind={self.kind!r}, "
                f"exception={self.exception!r})")

    def __bool__(self) -> bool:  # a failed slot is falsy, so `[r for r in out if r]` drops it
        return False


def warn_user(message: str, category: type = RuntimeWarning) -> None:
    """Warn with the location of the first caller outside pmap, so the warning points at user code."""
    import os
    import sys
    import warnings
    package_dir = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 2  # stacklevel 2 is the caller of warn_user
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package_dir):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # Python 3.10: PEP 678 notes by hand
        notes = getattr(exc, "__notes__", None)
        if notes is None:
            try:
                exc.__notes__ = notes = []
            except Exception:  # a user exception type refusing attributes (its __setattr__ may raise anything)
                return
        notes.append(note)


def raise_failure(failure: Failure, backend_name: str):
    """Re-raise the original exception in the caller, with the worker's traceback and a note."""
    exc = failure_exception(failure, backend_name)
    _RAISED_FAILURES.append(exc)
    raise exc


def failure_exception(failure: Failure, backend_name: str) -> BaseException:
    """The original exception, with the worker's traceback as its cause and a note naming the
    item: how a failure reads in the caller (raised by a run, or by a future's result())."""
    exc = failure.exception
    if failure.traceback and not isinstance(exc, (TaskTimeout, WorkerCrashed)):
        exc.__cause__ = RemoteTraceback(failure.traceback)
    where = f", worker {failure.worker}" if failure.worker is not None else ""
    tries = f", after {failure.attempts} attempts" if failure.attempts > 1 else ""
    add_note(exc, f"pmap: item {failure.index} ({short_repr(failure.item)}) failed "
                  f"on backend {backend_name!r}{where}{tries}")
    return exc


# Item exceptions raise_failure raised lately: at the API they leave pmap's frames behind.
_RAISED_FAILURES: collections.deque = collections.deque(maxlen=16)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def drop_pmap_frames(exc: BaseException) -> bool:
    """For an item's exception, drop pmap's own frames (engine, workers) from its traceback, so
    it reads from the caller's line straight into the function, and say True. Other exceptions
    (pmap's own errors, with frames worth reading) are left as they are."""
    if not any(exc is raised for raised in _RAISED_FAILURES):
        return False
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
            frames.append(tb)
        tb = tb.tb_next
    trimmed = None
    for tb in reversed(frames):
        trimmed = types.TracebackType(trimmed, tb.tb_frame, tb.tb_lasti, tb.tb_lineno)
    exc.with_traceback(trimmed)
    return True
