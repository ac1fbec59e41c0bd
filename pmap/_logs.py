"""Log records from worker processes, handled by the caller's loggers and handlers (the
QueueHandler pattern).

A worker's root logger gets one handler that takes its records from the caller's root level
up. In a worker of fork, pool or process it sends each record as it is written, over the
worker's own connection to the caller (`_worker.Link`), and in a manager's worker as a call
to the broker of its own, so a record written just before the worker dies or hangs still
arrives. Without a connection (a pooled worker's initializer, or a manager's worker that lost
its driver) it keeps them: they leave with the next connection made, or with the task's
outcome (`_outcome.encode_result`, `Replayed`).

In the caller each record goes to the logger of its name, so the caller's levels, filters,
formats and files (pytest's caplog too) apply as if the function had run there. A caller's
handler that raises is reported as logging reports it (`Handler.handleError`) and the other
handlers still get the record: a record sent as it is written belongs to no item, so its
trouble never ends the run nor fails an item.
"""
from __future__ import annotations

import copy
import logging
import os
import pickle
from typing import Callable


def caller_level() -> int:
    """The level from which the caller shows records: its root logger's."""
    return logging.getLogger().getEffectiveLevel()


# ---- in the worker ----------------------------------------------------------------------
class _Forwarder(logging.Handler):
    """Sends each record through `send` (a pickled portable copy), or keeps it until there is
    a way to send it."""

    def __init__(self, send: Callable[[bytes], None] | None):
        super().__init__()
        self.send = send
        self.kept: list = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            portable = _portable(record)
            if self.send is not None:
                try:
                    self.send(pickle.dumps(portable, pickle.HIGHEST_PROTOCOL))
                    return
                except OSError:  # that connection has closed: keep it for the next one
                    self.send = None
            self.kept.append(portable)
        except Exception:  # logging's own rule: a record whose user arguments fail to format goes to handleError
            self.handleError(record)


_forwarder: _Forwarder | None = None


def forward_from_here(level: int, send: Callable[[bytes], None] | None = None) -> None:
    """In a worker process: from now on its records go back to the caller, through `send` as
    they are written, or kept for `send_with` or `take` until then. Handlers inherited from a
    forked caller (or set up by a module imported here) are dropped: they would write a second
    time, or into memory nobody reads. A logger that does not propagate keeps a way back."""
    global _forwarder
    _forwarder = _Forwarder(send)
    loggers = [logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)]
    for logger in loggers:
        had_handlers = bool(logger.handlers)
        for handler in logger.handlers[:]:
            logger.removeHandler(handler)
        if had_handlers and not logger.propagate:
            logger.addHandler(_forwarder)
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    root.addHandler(_forwarder)
    root.setLevel(level)


def send_with(send: Callable[[bytes], None]) -> None:
    """From now on records go out through `send` as they are written; those kept so far first."""
    forwarder = _forwarder
    if forwarder is None or forwarder.send == send:
        return
    with forwarder.lock:  # emit() holds it: no record slips between the kept ones and the new way
        kept, forwarder.kept = forwarder.kept, []
        forwarder.send = send
        for record in kept:
            forwarder.emit(record)


def take() -> list:
    """The records kept since the last call (none outside a forwarding worker, none where
    records are sent as they are written)."""
    if _forwarder is None or not _forwarder.kept:
        return []
    records, _forwarder.kept = _forwarder.kept, []
    return records


def _stop_sending_in_child() -> None:
    # A process forked from a worker is not that worker: its connection is not this one's.
    if _forwarder is not None:
        _forwarder.send = None
        _forwarder.kept = []


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_stop_sending_in_child)


def _portable(record: logging.LogRecord) -> logging.LogRecord:
    """A copy that pickles: the message formatted, the traceback as text, and any `extra`
    field that does not pickle left out."""
    message = record.getMessage()
    portable = copy.copy(record)
    portable.msg, portable.args = message, None
    if record.exc_info:
        portable.exc_text = record.exc_text or logging.Formatter().formatException(record.exc_info)
    portable.exc_info = None
    for name, value in list(vars(portable).items()):
        try:
            pickle.dumps(value)
        except Exception:  # a user's `extra` field that does not pickle (its __reduce__ may raise anything): left out
            delattr(portable, name)
    return portable


# ---- in the caller ----------------------------------------------------------------------
def handle(record: logging.LogRecord) -> None:
    """Hand a worker's record to the caller's logger of the same name, as `Logger.handle`
    would, except that a handler that raises is reported by its own `handleError` (printed
    to stderr while `logging.raiseExceptions` holds) and the other handlers still run."""
    logger = logging.getLogger(record.name)
    if not logger.isEnabledFor(record.levelno) or logger.disabled or not logger.filter(record):
        return
    found = 0
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            found += 1
            if record.levelno >= handler.level:
                try:
                    handler.handle(record)
                except Exception:  # a caller's handler may raise anything: its handleError reports it, as logging does
                    handler.handleError(record)
        current = current.parent if current.propagate else None
    last_resort = logging.lastResort
    if not found and last_resort is not None and record.levelno >= last_resort.level:
        last_resort.handle(record)


def handle_sent(data) -> None:
    """A record a worker sent as it wrote it (see `_Forwarder`)."""
    try:
        record = pickle.loads(data)
    except Exception as exc:  # a field whose class this process cannot import, or whose rebuilding raises anything
        record = logging.makeLogRecord({"name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
                                        "msg": f"a worker's log record could not be rebuilt here: "
                                               f"{type(exc).__name__}: {exc}"})
    handle(record)


class Replayed:
    """Travels with a task's outcome in place of its `elapsed`: unpickled in the caller, it
    hands the records to the caller's loggers and stands for `elapsed` again."""

    __slots__ = ("elapsed", "records")

    def __init__(self, elapsed: float, records: list):
        self.elapsed = elapsed
        self.records = records

    def __reduce__(self):
        return (_replay, (self.records, self.elapsed))


def _replay(records: list, elapsed: float) -> float:
    for record in records:
        handle(record)
    return elapsed
