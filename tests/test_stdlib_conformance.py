"""CPython's own test suites for multiprocessing.Pool and concurrent.futures, run against
pmap.Pool and pmap.Executor. They load from the interpreter's `test` package, which many
installs leave out: the tests are skipped there, with that reason.

Tests that cannot pass by design are named in KNOWN_DIFFERENCES with the reason; they are
expected to fail (strict), so a change that makes one pass is noticed."""
import functools
import gc
import unittest

import pytest

import pmap

try:
    from test import _test_multiprocessing as mp_tests
    from test.test_concurrent_futures import executor as cf_executor
    from test.test_concurrent_futures import test_as_completed, test_shutdown, test_wait, util as cf_util
except ImportError as exc:  # the interpreter ships without its test suite
    pytest.skip(f"this interpreter has no importable CPython test package ({exc})", allow_module_level=True)

POOL_BACKENDS = ("fork", "pool", "process", "thread")
EXECUTOR_BACKENDS = ("thread", "process", "fork")
# wait() and as_completed() only read the states of the futures, which pmap.Executor settles
# from its engine in one way whatever the backend: these two suites run on one thread and one
# process backend. The fork backend's own ways to end a call (results, errors, crashes,
# shutdown) stay covered there by ExecutorTest and ExecutorShutdownTest, which run everywhere.
FUTURE_STATE_BACKENDS = ("thread", "process")

KNOWN_DIFFERENCES = {
    # multiprocessing.Pool internals: `_pool` is the list of its worker Process objects.
    "test_make_pool": "reads Pool._pool, multiprocessing's private list of worker processes",
    # The child interpreter imports the executor by name from concurrent.futures itself.
    "test_interpreter_shutdown": "the child runs `from concurrent.futures import <executor>`",
    "test_submit_after_interpreter_shutdown": "the child runs `from concurrent.futures import <executor>`",
    "test_hang_gh83386": "the child runs `from concurrent.futures import <executor>`",
}


# Passes or fails with timing, by a documented difference (docs/dropin.md): calls that arrive
# together may share one task, so map(time.sleep, [0, 0, 6], timeout=5) can see its second 0
# wait behind the 6 s call and time out before it. Skipped, not expected to fail.
TIMING_DIFFERENCES = {
    "test_map_timeout": "pmap may run calls that arrive together as one task: a fast call can "
                        "wait for a slow one submitted with it (docs/dropin.md)",
}


@pytest.fixture(scope="module", autouse=True)
def objects_made_before_these_tests_frozen():
    """The suites' reference tests (test_free_reference...) call gc.collect three times per
    result; in a process holding the whole test session's objects that cost seconds a test.
    Frozen objects are not scanned but still count as referrers, so an object a test makes is
    freed or kept exactly as before."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def _pool_case(backend):
    class Case(mp_tests._TestPool, unittest.TestCase):
        TYPE = "threads" if backend == "thread" else "processes"  # what the suite expects of each kind
        Pool = staticmethod(functools.partial(pmap.Pool, backend=backend))
    Case.__name__ = Case.__qualname__ = f"TestPmapPool_{backend}"
    return Case


def _executor_type(backend):
    class Executor(pmap.Executor):
        def __init__(self, max_workers=None, **kwargs):
            super().__init__(max_workers, backend=backend, **kwargs)
    Executor.__name__ = Executor.__qualname__ = f"PmapExecutor_{backend}"
    return Executor


def _executor_case(suite, backend):
    mixin = type(f"{backend}Mixin", (cf_util.ExecutorMixin,), {"executor_type": _executor_type(backend)})
    name = f"TestPmapExecutor_{backend}_{suite.__name__}"
    return type(name, (suite, mixin, cf_util.BaseTestCase), {"__qualname__": name})


def _mark_known(case):
    for name in KNOWN_DIFFERENCES:
        test = getattr(case, name, None)
        if test is not None:
            setattr(case, name, unittest.expectedFailure(test))
    for name, reason in TIMING_DIFFERENCES.items():
        if getattr(case, name, None) is not None:
            setattr(case, name, unittest.skip(reason)(getattr(case, name)))
    return case


for _backend in POOL_BACKENDS:
    _case = _mark_known(_pool_case(_backend))
    globals()[_case.__name__] = _case
for _backend in EXECUTOR_BACKENDS:
    for _suite in (cf_executor.ExecutorTest, test_shutdown.ExecutorShutdownTest,
                   *((test_as_completed.AsCompletedTests, test_wait.WaitTests) if _backend in FUTURE_STATE_BACKENDS
                     else ())):
        _case = _mark_known(_executor_case(_suite, _backend))
        globals()[_case.__name__] = _case
del _case, _backend
