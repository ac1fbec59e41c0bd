"""The one way pmap pickles what crosses to and from its workers (`_transfer.pack`/`dumps`,
`_outcome`'s formats on top): one fallback order, nothing pickled or loaded twice to check it,
and what cannot be rebuilt fails only its own item."""
import pickle
import subprocess
import sys
import textwrap
import threading
import types

import cloudpickle
import pytest

import pmap
from pmap import _outcome, _transfer
from pmap._outcome import PartlyDecoded, encode_result, split_undecoded


def outcome(values, failures=()):
    """What the caller reads of a worker's encoded outcome: (values, failures) per item."""
    _, decoded, sent, _ = _transfer.loads(encode_result(7, values, list(failures), 0.0))
    if type(decoded) is not list:
        return split_undecoded(decoded, sent, len(values))
    return decoded, sent


# ---- one fallback order --------------------------------------------------------------------
def test_plain_pickle_first_then_cloudpickle_for_what_it_cannot_name():
    assert _transfer.dumps(len) == pickle.dumps(len, _transfer.PROTOCOL)  # by name, as plain pickle does
    assert _transfer.loads(_transfer.dumps(lambda x: x + 1))(1) == 2
    with pytest.raises(TypeError, match="lock"):
        _transfer.dumps(threading.Lock())


@pytest.fixture
def function_of_main(monkeypatch):
    """A function that `__main__` names, as one defined in a script or a notebook is."""
    main = sys.modules["__main__"]
    namespace = {}
    exec("def defined_in_main(x):\n    return x * 3\n", namespace)
    function = namespace["defined_in_main"]
    function.__module__ = "__main__"
    monkeypatch.setattr(main, "defined_in_main", function, raising=False)
    return function


def test_main_by_value_sends_what_main_names_by_value(function_of_main, monkeypatch):
    by_name = _transfer.dumps(function_of_main)  # for a forked worker, which has the same __main__
    by_value = _transfer.dumps(function_of_main, main_by_value=True)  # for any other
    items = _outcome.pack_items([function_of_main, 1], main_by_value=True)
    monkeypatch.delattr(sys.modules["__main__"], "defined_in_main")  # as in a spawned worker
    with pytest.raises(AttributeError):
        _transfer.loads(by_name)
    assert _transfer.loads(by_value)(2) == 6
    assert _outcome.unpack_items(items)[0](3) == 9


def test_a_function_of_a_module_registered_by_value_goes_by_value():
    module = types.ModuleType("registered_for_this_test")
    exec("def twice(x):\n    return 2 * x\n", module.__dict__)
    module.twice.__module__ = module.__name__
    sys.modules[module.__name__] = module
    cloudpickle.register_pickle_by_value(module)
    try:
        data = _transfer.dumps(module.twice, main_by_value=True)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
        del sys.modules[module.__name__]
    assert _transfer.loads(data)(4) == 8  # the module is gone here: only by value can it load


# ---- results: pickled once, loaded once ----------------------------------------------------
PICKLED, LOADED = [], []


def _rebuild_counted(value):
    LOADED.append(value)
    return Counted(value)


class Counted:
    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        PICKLED.append(self.value)
        return (_rebuild_counted, (self.value,))


def test_a_result_is_pickled_once_and_loaded_once():
    PICKLED.clear()
    LOADED.clear()
    values, failures = outcome([Counted(i) for i in range(5)])
    assert [v.value for v in values] == list(range(5)) and failures == []
    assert PICKLED == list(range(5))  # no second pickle, no load in the worker to check it
    assert LOADED == list(range(5))


def test_a_result_only_cloudpickle_can_send_comes_back():
    values, failures = outcome([lambda: 42, 1])
    assert values[0]() == 42 and values[1] == 1 and failures == []


def test_a_result_that_does_not_pickle_fails_alone():
    values, failures = outcome([Counted(0), threading.Lock(), Counted(2)])
    assert values[0].value == 0 and values[1] is None and values[2].value == 2
    (pos, error, _), = failures
    assert pos == 1 and isinstance(error, pmap.UnpicklableError) and "cannot be pickled" in str(error)


# ---- results the caller cannot rebuild ----------------------------------------------------
def _refuse(why):
    raise RuntimeError(f"refused: {why}")


class RefusesToLoad:
    def __reduce__(self):
        return (_refuse, ("this one",))


class Holder:
    def __init__(self, inner):
        self.inner = inner


def test_values_the_caller_cannot_rebuild_fail_alone_the_rest_come_back():
    shared = Counted("shared")  # referenced from two items: pickled once, by the memo
    items = [Counted(0), RefusesToLoad(), [1, {"deep": RefusesToLoad()}], Holder(RefusesToLoad()), shared,
             (shared, 5)]
    values, failures = outcome(items)
    assert values[0].value == 0 and values[4].value == "shared" and values[5][0] is values[4]
    assert values[5][1] == 5
    assert [pos for pos, _, _ in failures] == [1, 2, 3]
    for _, error, _ in failures:
        assert isinstance(error, pmap.UnpicklableError)
        assert "refused: this one" in str(error) and "RefusesToLoad" in str(error)


def test_a_value_whose_class_the_caller_lacks_fails_alone():
    module = types.ModuleType("only_in_the_worker")
    exec("class Gone:\n    pass\n", module.__dict__)
    module.Gone.__module__ = module.__name__
    sys.modules[module.__name__] = module
    try:
        message = encode_result(1, [1.5, module.Gone(), "x"], [], 0.0)  # the worker has the module
    finally:
        del sys.modules[module.__name__]  # the caller does not
    _, decoded, sent, _ = _transfer.loads(message)
    values, failures = split_undecoded(decoded, sent, 3)
    assert values == [1.5, None, "x"]
    assert failures[0][0] == 1 and "only_in_the_worker" in str(failures[0][1])


class RefusesItsState:
    def __init__(self):
        self.state = "some"

    def __setstate__(self, state):
        raise ValueError("state refused")


def test_an_object_half_built_fails_every_item_of_its_task():
    # Its state was refused after it was made: whatever else holds it cannot be told apart.
    values, failures = outcome([RefusesItsState(), Counted(1)])
    assert values == [None, None] and [pos for pos, _, _ in failures] == [0, 1]
    assert all("state refused" in str(error) for _, error, _ in failures)


def test_a_whole_task_that_fails_to_load_keeps_its_item_count():
    decoded = _outcome._rebuild_what_can_be(b"not a pickle", [], ValueError("bad"), ())
    assert isinstance(decoded, PartlyDecoded)
    values, failures = split_undecoded(decoded, [], 4)
    assert values == [None] * 4 and [pos for pos, _, _ in failures] == [0, 1, 2, 3]


# ---- exceptions -----------------------------------------------------------------------------
def _refuse_rebuild(message):
    raise TypeError(f"cannot rebuild {message!r}")


class NeedsTwo(Exception):
    """Pickles, but does not load again, whatever reducer another library installs for exceptions
    (distributed installs tblib's, which would rebuild a plain one without calling __init__)."""

    def __init__(self, a, b):
        super().__init__(a)

    def __reduce__(self):
        return (_refuse_rebuild, (self.args[0],))


def test_an_exception_that_cannot_be_rebuilt_is_named_with_its_message():
    _, failures = outcome([None, 2], [(0, NeedsTwo("needs two", "args"), "tb")])
    (pos, error, tb), = failures
    assert pos == 0 and tb == "tb" and isinstance(error, pmap.UnpicklableError)
    assert "NeedsTwo: needs two" in str(error) and "rebuilt in the caller" in str(error)


def test_an_exception_only_cloudpickle_can_send_comes_back():
    local = type("LocalError", (Exception,), {})  # not importable by name
    _, failures = outcome([None], [(0, local("from a local class"), "")])
    assert type(failures[0][1]).__name__ == "LocalError" and str(failures[0][1]) == "from a local class"


# ---- end to end: a class of the script, sent back by a spawned worker --------------------
SCRIPT = """
import dataclasses
import sys
import pmap

@dataclasses.dataclass
class Point:
    x: int

def point(x):
    return Point(x)

if __name__ == "__main__":
    out = pmap.pmap(point, range(4), backend=sys.argv[1], workers=2)
    assert out == [Point(i) for i in range(4)] and all(type(p) is Point for p in out), out
    print("ok")
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["process", "pool"])
def test_results_of_a_class_defined_in_the_script_come_back_as_that_class(backend, tmp_path):
    # Plain pickle cannot name the worker's copy of the class; cloudpickle sends it by value,
    # and the caller maps it back to its own class.
    script = tmp_path / "points.py"
    script.write_text(textwrap.dedent(SCRIPT))
    done = subprocess.run([sys.executable, str(script), backend], capture_output=True, text=True, timeout=100)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
