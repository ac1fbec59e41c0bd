"""Functions for tests/test_native.py, importable by workers of every start method."""
import os


def blas_threads(_):
    """The BLAS pools' thread limits inside the worker that runs this (numpy imported here, so a
    fresh interpreter loads OpenBLAS only now, under the worker's environment)."""
    import numpy  # noqa: F401  (loads the BLAS library)
    from threadpoolctl import threadpool_info
    return {pool["internal_api"]: pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def environment_variable(name):
    return os.environ.get(name)


def matrix_checksum(seed, size=120, power=4):
    """BLAS work (a matrix power) with a result that does not depend on the thread count beyond
    rounding."""
    import numpy as np
    matrix = np.random.default_rng(seed).standard_normal((size, size)) / size
    return float(np.trace(np.linalg.matrix_power(matrix, power)))
