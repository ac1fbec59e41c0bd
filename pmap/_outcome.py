"""A task on the wire, item by item: items a worker cannot rebuild split their task, and
values or exceptions that cannot be pickled in the worker or rebuilt in the caller fail only
their own item. Big buffers still go through shared memory (`_transfer.pack`)."""
from __future__ import annotations

import pickle

import cloudpickle

from . import _logs, _transfer
from .errors import ItemNotPicklable, UnpicklableError

_PROTOCOL = pickle.HIGHEST_PROTOCOL


class SplitTask(Exception):
    """A worker could not rebuild one of a task's items: the caller runs each item alone, so
    only the one that does not unpickle fails."""


def pack_items(items: list) -> tuple:
    """Items pickled apart from the rest of a task, so a worker that cannot rebuild one of
    them still knows which task it holds."""
    error = None
    for module in (pickle, _transfer.cloudpickle_keeping_paths):
        try:
            return (len(items), *_transfer.pack(items, module))
        except Exception as exc:
            error = exc
    raise ItemNotPicklable(f"cannot pickle the task to send it to a worker: {type(error).__name__}: {error}") from error


def unpack_items(packed: tuple) -> list:
    """The items of `pack_items`; SplitTask for a task of several items that does not unpickle,
    ItemNotPicklable for a single item."""
    n, data, buffers = packed
    try:
        return _transfer.unpack(data, buffers)
    except Exception as exc:
        if n > 1:
            raise SplitTask(f"one of {n} items could not be rebuilt in the worker") from None
        raise ItemNotPicklable(f"the item could not be rebuilt in the worker: {type(exc).__name__}: {exc}") from None


_PLAIN = frozenset({int, float, str, bytes, bool, type(None), complex})  # always decode in the caller


def encode_result(task_id, values, failures, elapsed) -> bytes:
    """Pickle a task's outcome so that the caller decodes each item on its own: a value or an
    exception that cannot be pickled here, or not be rebuilt there, fails only its item. Big
    buffers of the values go through shared memory (see `_transfer`)."""
    records = _logs.take()
    if records:  # the caller's loggers handle them as it reads the outcome
        elapsed = _logs.Replayed(elapsed, records)
    if failures:
        failures = [(pos, _SentException(exc), tb) for pos, exc, tb in failures]
    if not set(map(type, values)) <= _PLAIN:
        values = _checked_values(values, failures)
    return _transfer.reply((task_id, values, failures, elapsed))


def _checked_values(values: list, failures: list):
    """The values as one pickle that was seen to load again here (the usual case), else item
    by item, each failing alone."""
    try:
        packed = _transfer.pack(values)  # big buffers still go through shared memory
        _transfer.unpack(*packed)
        return _DecodedBy(_decode_values, packed)
    except Exception:
        pass
    failed = {pos for pos, _, _ in failures}
    blobs = []
    for pos, value in enumerate(values):
        blob = None
        if pos not in failed:
            try:
                blob = pickle.dumps(value, _PROTOCOL)
                pickle.loads(blob)
            except Exception as exc:
                blob = None
                error = UnpicklableError(f"result of type {type(value).__qualname__} cannot be pickled to send it "
                                         f"back from the worker: {type(exc).__name__}: {exc}")
                failures.append((pos, _SentException(error), ""))
        blobs.append(blob)
    failures.sort(key=lambda f: f[0])
    return _DecodedBy(_decode_items, blobs)


class PartlyDecoded(list):
    """Values of which some could not be rebuilt in the caller; `failures` names them as
    (position, exception, traceback text). The engine turns them into those items' failures."""

    failures: list


class _DecodedBy:
    """Pickles as a call of `decode(data)`: the caller rebuilds values its own tolerant way."""

    __slots__ = ("decode", "data")

    def __init__(self, decode, data):
        self.decode = decode
        self.data = data

    def __reduce__(self):
        return (self.decode, (self.data,))


def _decode_values(packed):
    try:
        return _transfer.unpack(*packed)
    except Exception as exc:  # loads in the worker, not here (a class this process cannot import)
        return _decode_items([packed], whole=exc)


def _decode_items(blobs, whole=None):
    values = PartlyDecoded()
    values.failures = []
    for pos, blob in enumerate(blobs):
        value = None
        if whole is not None or blob is not None:
            try:
                if whole is not None:
                    raise whole
                value = pickle.loads(blob)
            except Exception as exc:
                what = "the task's results" if whole is not None else "the result"
                values.failures.append((pos, UnpicklableError(
                    f"{what} could not be rebuilt in the caller: {type(exc).__name__}: {exc}"), ""))
        values.append(value)
    if whole is not None:
        return values  # one failure stands for every item of the task, see split_undecoded
    return values if values.failures else list(values)


def split_undecoded(values, failures: list, n_items: int) -> tuple[list, list]:
    """(values, failures) of a task whose values came back as PartlyDecoded."""
    extra = values.failures
    if len(values) == 1 and n_items > 1:  # the whole blob failed: every item fails with it
        values = [None] * n_items
        extra = [(pos, extra[0][1], "") for pos in range(n_items)]
    else:
        values = list(values)
    taken = {pos for pos, _, _ in failures}
    merged = failures + [f for f in extra if f[0] not in taken]
    merged.sort(key=lambda f: f[0])
    return values, merged


class _SentException:
    """An item's exception on its way to the caller: pickled (cloudpickle for classes defined
    in __main__) and seen to load again here; the caller rebuilds it or, failing that, gets an
    UnpicklableError naming the worker-side type and message."""

    __slots__ = ("blob", "name", "text")

    def __init__(self, exc: BaseException):
        self.name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        try:
            self.text = str(exc)
        except Exception:
            self.text = "<str() failed>"
        self.blob = None
        for dump in (pickle.dumps, cloudpickle.dumps):
            try:
                blob = dump(exc, _PROTOCOL)
                pickle.loads(blob)
                self.blob = blob
                break
            except Exception:
                continue

    def __reduce__(self):
        return (_decode_exception, (self.blob, self.name, self.text))


def _decode_exception(blob, name, text):
    if blob is not None:
        try:
            return pickle.loads(blob)
        except Exception as exc:
            return UnpicklableError(f"{name}: {text} (the exception could not be rebuilt in the caller: "
                                    f"{type(exc).__name__}: {exc})")
    return UnpicklableError(f"{name}: {text} (the exception could not be pickled in the worker)")
