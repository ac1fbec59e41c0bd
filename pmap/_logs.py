"""Log records from worker processes, handled by the caller's loggers and handlers (the
QueueHandler pattern, with the task's results as the queue).

A worker's root logger gets one handler that keeps its records, from the caller's root level
up; `encode_result` sends them with the task's outcome, and unpickling that outcome in the
caller hands each record to the caller's logger of the same name, so the caller's levels,
filters, formats and files (pytest's caplog too) apply as if the function had run there.
"""
from __future__ import annotations

import copy
import logging
import pickle


def caller_level() -> int:
    """The level from which the caller shows records: its root logger's."""
    return logging.getLogger().getEffectiveLevel()


class _Keeper(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append(_portable(record, self))
        except Exception:
            self.handleError(record)


_keeper: _Keeper | None = None


def forward_from_here(level: int) -> None:
    """In a worker process: from now on its records go back to the caller. Handlers inherited
    from a forked caller (or set up by a module imported here) are dropped: they would write a
    second time, or into memory nobody reads. A logger that does not propagate keeps a way back."""
    global _keeper
    _keeper = _Keeper()
    loggers = [logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)]
    for logger in loggers:
        had_handlers = bool(logger.handlers)
        for handler in logger.handlers[:]:
            logger.removeHandler(handler)
        if had_handlers and not logger.propagate:
            logger.addHandler(_keeper)
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    root.addHandler(_keeper)
    root.setLevel(level)


def take() -> list:
    """The records kept since the last call (none outside a forwarding worker)."""
    if _keeper is None or not _keeper.records:
        return []
    records, _keeper.records = _keeper.records, []
    return records


def _portable(record: logging.LogRecord, handler: logging.Handler) -> logging.LogRecord:
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
        except Exception:
            delattr(portable, name)
    return portable


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
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)
    return elapsed
