"""Tasks and their outcomes on the wire, item by item, built on `_transfer`'s one way of
pickling (`pack`/`unpack`): items a worker cannot rebuild split their task, and values or
exceptions that cannot be pickled in the worker or rebuilt in the caller fail only their own
item. Nothing is pickled or loaded twice to check it: a worker pickles a task's values once
(each on its own only when that fails); the caller loads them once, and only when that fails
rebuilds what it can and fails the items it cannot. Big buffers still go through shared
memory."""
from __future__ import annotations

import io
import pickle

from . import _logs, _transfer
from .errors import InitializerError, ItemNotPicklable, RemoteTraceback, UnpicklableError


class SplitTask(Exception):
    """A worker could not rebuild one of a task's items: the caller runs each item alone, so
    only the one that does not unpickle fails."""


# ---- items: caller to worker ---------------------------------------------------------------
def pack_items(items: list, main_by_value: bool = False) -> tuple:
    """Items pickled apart from the rest of a task, so a worker that cannot rebuild one of
    them still knows which task it holds, and how many items it had. `main_by_value` for
    workers not forked from the caller (see `_transfer`): they may lack its `__main__`."""
    try:
        return (len(items), *_transfer.pack(items, main_by_value))
    except Exception as exc:  # neither way could pickle them: the engine splits the task
        raise ItemNotPicklable(f"cannot pickle the task to send it to a worker: {type(exc).__name__}: {exc}") from exc


def unpack_items(packed: tuple) -> list:
    """The items of `pack_items`; SplitTask for a task of several items that does not unpickle,
    ItemNotPicklable for a single item."""
    n, data, buffers = packed
    try:
        return _transfer.unpack(data, buffers)
    except Exception as exc:  # a user object's rebuilding may raise anything: reported, item by item
        if n > 1:
            raise SplitTask(f"one of {n} items could not be rebuilt in the worker") from None
        raise ItemNotPicklable(f"the item could not be rebuilt in the worker: {type(exc).__name__}: {exc}") from None


# ---- outcomes: worker to caller ------------------------------------------------------------
_PLAIN = frozenset({int, float, str, bytes, bool, type(None), complex})  # always decode in the caller


def encode_result(task_id, values, failures, elapsed) -> bytes:
    """A task's outcome as the caller decodes it: each item's value or failure on its own.
    Big buffers of the values go through shared memory (see `_transfer`)."""
    records = _logs.take()
    if records:  # the caller's loggers handle them as it reads the outcome
        elapsed = _logs.Replayed(elapsed, records)
    if failures:
        failures = [(pos, SentException(exc), tb) for pos, exc, tb in failures]
    kinds = set(map(type, values))
    if not kinds <= _PLAIN:
        values = _packed_values(values, failures, kinds)
    return _transfer.reply((task_id, values, failures, elapsed))


def _packed_values(values: list, failures: list, kinds: set) -> _DecodedBy:
    """The values as one pickle (the usual case), else each on its own, those that do not
    pickle failing alone."""
    try:
        return _DecodedBy(_decode_values, (_transfer.pack(values), _type_names(kinds)))
    except Exception:  # one of them does not pickle either way: find which, below
        failed = {pos for pos, _, _ in failures}
    parts = []
    for pos, value in enumerate(values):
        part = None
        if pos not in failed:
            try:
                part = _transfer.pack(value)
            except Exception as exc:  # a user value's __reduce__ may raise anything: that item fails with it
                failures.append((pos, SentException(UnpicklableError(
                    f"result of type {type(value).__qualname__} cannot be pickled to send it back from the "
                    f"worker: {type(exc).__name__}: {exc}")), ""))
        parts.append(part)
    failures.sort(key=lambda f: f[0])
    return _DecodedBy(_decode_items, parts)


def _type_names(kinds: set) -> tuple:
    """Names of the values' types that are not plain: the caller names them if it cannot
    rebuild a value (what it reads then may be a reconstructor, not the type)."""
    return tuple(sorted(f"{kind.__module__}.{kind.__qualname__}" for kind in kinds - _PLAIN))


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


def _decode_values(packed_and_types):
    (data, buffers), type_names = packed_and_types
    try:
        return _transfer.unpack(data, buffers)
    except Exception as exc:  # pickled in the worker, not loadable here: rebuild what can be
        return _rebuild_what_can_be(data, buffers, exc, type_names)


def _decode_items(parts):
    """Values pickled one by one (some failed in the worker: None): each loads alone."""
    values = PartlyDecoded()
    values.failures = []
    for pos, part in enumerate(parts):
        value = None
        if part is not None:
            try:
                value = _transfer.unpack(*part)
            except Exception as exc:  # a user value's rebuilding may raise anything: that item fails with it
                values.failures.append((pos, UnpicklableError(
                    f"the result could not be rebuilt in the caller: {type(exc).__name__}: {exc}"), ""))
        values.append(value)
    return values if values.failures else list(values)


def _rebuild_what_can_be(data, buffers, error: Exception, type_names: tuple) -> PartlyDecoded:
    """The values of a pickle that failed to load, each rebuilt on its own where it can be;
    those that hold what could not be rebuilt fail. Where that cannot be told apart soundly,
    every item fails with `error` (a PartlyDecoded of one, see `split_undecoded`)."""
    note = f" (the task's results were of type {', '.join(type_names)})" if type_names else ""
    try:
        rebuilt = _Rebuilder.rebuild(data, buffers)
    except Exception:  # an object half built (its state or items refused): nothing to attribute
        rebuilt = None
    values = PartlyDecoded()
    if rebuilt is None:
        values.append(None)
        values.failures = [(0, UnpicklableError(
            f"the task's results could not be rebuilt in the caller: {type(error).__name__}: {error}{note}"), "")]
        return values
    values.extend(rebuilt[0])
    values.failures = [(pos, UnpicklableError(f"the result could not be rebuilt in the caller: {why}{note}"), "")
                       for pos, why in sorted(rebuilt[1].items())]
    for pos in rebuilt[1]:
        values[pos] = None
    return values if values.failures else list(values)  # the C unpickler failed where Python's did not


class _Unbuilt:
    """Stands in for an object the caller could not rebuild (its class missing here, its
    reconstructor raising) while the rest of a pickle loads: it takes what the pickle does to
    it, and whatever was to be built from it is not built."""

    __slots__ = ("what", "error", "inner")

    def __init__(self, what: str, error: Exception, inner: list):
        self.what = what
        self.error = error
        self.inner = inner  # stand-ins among the arguments of the call that failed

    def __call__(self, *args, **kwargs):  # a missing class or function, called
        return self

    def __setstate__(self, state):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass

    def add(self, item):
        pass

    def __setitem__(self, key, value):
        pass

    def why(self) -> str:
        return f"{self.what} raised {type(self.error).__name__}: {self.error}"


class _Rebuilder(pickle._Unpickler):
    """The pure-Python unpickler CPython keeps beside the C one (checked on 3.11; the same
    opcode methods since 3.8), loading a list of values with a stand-in for each object it
    cannot make. Any other failure (a state or items an object refuses) raises."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, buffers):
        super().__init__(file, buffers=buffers)
        self.made: list[_Unbuilt] = []

    @classmethod
    def rebuild(cls, data, buffers) -> tuple[list, dict] | None:
        """(values, {position: why}) of a pickled list of values; None when a stand-in hides
        somewhere no value shows (inside an object of C code, say)."""
        rebuilder = cls(io.BytesIO(data), buffers)
        values = rebuilder.load()
        failed, accounted = {}, set()
        for pos, value in enumerate(values):
            found = _stand_ins_within(value)
            if found:
                failed[pos] = found[0].why()
            for stand_in in found:
                todo = [stand_in]
                while todo:
                    one = todo.pop()
                    if id(one) not in accounted:
                        accounted.add(id(one))
                        todo.extend(one.inner)
        if any(id(stand_in) not in accounted for stand_in in rebuilder.made):
            return None
        return values, failed

    def _stand_in(self, what: str, error: Exception, arguments) -> _Unbuilt:
        stand_in = _Unbuilt(what, error, _stand_ins_within(arguments))
        self.made.append(stand_in)
        return stand_in

    def _made(self, maker, make, arguments):
        """What `make()` returns, or a stand-in when it raises; a stand-in maker, or one among
        the (top-level) arguments, stands for the result without a call."""
        if type(maker) is _Unbuilt:
            return maker
        for argument in arguments:
            if type(argument) is _Unbuilt:
                return argument
        try:
            return make()
        except Exception as exc:  # a user reconstructor may raise anything: a stand-in names it
            return self._stand_in(_name_of(maker), exc, arguments)

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except Exception as exc:  # importing the user's module may raise anything: a stand-in names it
            return self._stand_in(f"looking up {module}.{name}", exc, ())

    def load_reduce(self):
        stack = self.stack
        args = stack.pop()
        func = stack[-1]
        stack[-1] = self._made(func, lambda: func(*args), args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._made(cls, lambda: cls.__new__(cls, *args), args))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._made(cls, lambda: cls.__new__(cls, *args, **kwargs), (*args, *kwargs.values())))

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex


def _name_of(maker) -> str:
    name = getattr(maker, "__qualname__", None) or type(maker).__qualname__
    return f"{getattr(maker, '__module__', None) or '?'}.{name}"


def _stand_ins_within(obj) -> list[_Unbuilt]:
    """The stand-ins reachable from `obj` through containers and instance dictionaries."""
    found, seen, todo = [], set(), [obj]
    while todo:
        one = todo.pop()
        if type(one) in _PLAIN or id(one) in seen:
            continue
        seen.add(id(one))
        if type(one) is _Unbuilt:
            found.append(one)
            continue
        if isinstance(one, dict):
            todo.extend(dict.keys(one))
            todo.extend(dict.values(one))
        else:
            for container in (list, tuple, set, frozenset):
                if isinstance(one, container):
                    todo.extend(container.__iter__(one))
                    break
        try:
            todo.append(object.__getattribute__(one, "__dict__"))
        except (AttributeError, TypeError):  # no instance dictionary: nothing more to look in
            continue
    return found


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


# ---- exceptions: worker to caller ----------------------------------------------------------
class SentException:
    """An item's exception on its way to the caller, pickled once (see `_transfer`); the
    caller rebuilds it or, failing that, gets an UnpicklableError naming the worker-side type
    and message."""

    __slots__ = ("packed", "name", "text")

    def __init__(self, exc: BaseException):
        self.name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        try:
            self.text = str(exc)
        except Exception:  # a broken __str__: the type's name still says what happened
            self.text = "<str() failed>"
        try:
            self.packed = _transfer.pack(exc)
        except Exception:  # neither way pickles it: it travels as its name and text
            self.packed = None

    def __reduce__(self):
        return (_decode_exception, (self.packed, self.name, self.text))


_SentException = SentException  # the old name, until its callers switch


def _decode_exception(packed, name, text):
    if packed is not None:
        try:
            return _transfer.unpack(*packed)
        except Exception as exc:  # a user exception's rebuilding may raise anything: named in its stand-in
            return UnpicklableError(f"{name}: {text} (the exception could not be rebuilt in the caller: "
                                    f"{type(exc).__name__}: {exc})")
    return UnpicklableError(f"{name}: {text} (the exception could not be pickled in the worker)")


def initializer_error(name: str, backend: str, worker, report: bytes) -> InitializerError:
    """The one error every backend gives for a failed initializer, from the worker's report
    (`_transfer.dumps((SentException(exc), traceback_text))`), naming the initializer and worker."""
    try:
        cause, tb = _transfer.loads(report)  # a cause that cannot be rebuilt here is an UnpicklableError
    except Exception as exc:  # the report itself does not load: say so rather than lose the failure
        cause, tb = exc, ""
    if tb:
        cause.__cause__ = RemoteTraceback(tb)
    error = InitializerError(f"the initializer {name} failed in worker {worker} of backend {backend!r}: "
                             f"{type(cause).__name__}: {cause}")
    error.__cause__ = cause
    return error
