"""Errors of use are clear and early, before any worker starts."""
import pytest

import pmap
from workloads import square


@pytest.mark.parametrize("kwargs, error, text", [
    (dict(backend="nope"), ValueError, "unknown backend 'nope'; known backends: .*process"),
    (dict(workers=0), ValueError, "workers must be at least 1"),
    (dict(workers=-3), ValueError, "workers must be at least 1"),
    (dict(workers=2.5), TypeError, "workers must be an integer"),
    (dict(workers=True), TypeError, "workers must be an integer"),
    (dict(chunksize=0), ValueError, "chunksize must be at least 1"),
    (dict(chunksize="4"), TypeError, "chunksize must be an integer"),
    (dict(on_error="ignore"), ValueError, "on_error must be one of 'raise', 'return', 'skip'"),
    (dict(timeout=0), ValueError, "timeout must be a positive number"),
    (dict(timeout=-1), ValueError, "timeout must be a positive number"),
    (dict(retries=-1), ValueError, "retries must be at least 0"),
    (dict(progress=5), TypeError, "progress must be True, False, a label"),
    (dict(backend="thread", frobnicate=1), TypeError, "unknown option.*frobnicate"),
    (dict(start_method="spawn"), TypeError, "start_method need an explicit backend"),
    (dict(timeout=float("nan")), ValueError, "timeout must be a positive number"),
    (dict(backoff=float("nan")), ValueError, "backoff must be a finite"),
    (dict(backoff=float("inf")), ValueError, "backoff must be a finite"),
    (dict(backoff=-0.5), ValueError, "backoff must be a finite"),
    (dict(retry_on=()), TypeError, "retry_on must be an exception type"),
    (dict(retry_on=ValueError("x")), TypeError, "retry_on must be an exception type"),
    (dict(initargs=5), TypeError, "initargs must be a tuple"),
])
def test_bad_arguments(kwargs, error, text):
    with pytest.raises(error, match=text):
        pmap.pmap(square, [1, 2], **kwargs)


def test_not_callable():
    with pytest.raises(TypeError, match="func must be callable"):
        pmap.pmap(42, [1])


def test_not_iterable():
    with pytest.raises(TypeError, match="items must be iterable"):
        pmap.pmap(square, 5, backend="thread")


def test_unpicklable_function_on_process_backend_says_why_and_what_to_use():
    import threading
    lock = threading.Lock()

    def uses_lock(x):
        with lock:
            return x

    with pytest.raises(pmap.PmapError, match="cannot send function .*uses_lock.*backend='thread'.*'fork'"):
        pmap.pmap(uses_lock, [1], backend="process")
    assert pmap.pmap(uses_lock, [1, 2], backend="fork") == [1, 2]


def test_pool_rejects_auto_and_serves_two_open_imaps():
    with pytest.raises(ValueError, match="concrete backend"):
        pmap.Pool(backend="auto")
    with pmap.Pool(backend="thread", workers=2) as pool:
        first = pool.imap(square, range(100))
        assert next(first) == 0
        assert pool.map(square, [3]) == [9]  # as multiprocessing: calls need not wait for an open imap
        assert list(first) == [x * x for x in range(1, 100)]


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_breaking_out_of_a_pool_imap_leaves_the_pool_usable(backend):
    with pmap.Pool(backend=backend, workers=2) as pool:
        for round_ in range(20):
            for value in pool.imap(square, range(1000)):
                if value >= 16:
                    break  # the caller keeps no reference to the open iterator
            assert pool.map(square, [round_]) == [round_ * round_]
