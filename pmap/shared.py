"""Arrays in shared memory from the start, so that local worker processes read and write the
caller's memory instead of copies.

An ordinary array passed to process, pool or fork workers is copied once per run into shared
memory (and once more back if it is returned). An array made here is never copied: a message
that holds it, a slice of it, or a function whose closure or `functools.partial` holds it
carries only its name, and each worker maps the same memory. What a worker writes into it the
caller sees, so workers can fill one output array, each its own part. An array a worker makes
here is that worker's own: returned, it reaches the caller as a copy, like any array.
"""
from __future__ import annotations

import math
from typing import Any

from ._transfer import new_shared_segment

MISSING_NUMPY = "pmap.shared_array needs numpy: pip install 'pmap-parallel[numpy]'"


def _numpy():
    try:
        import numpy
    except ImportError:
        raise ImportError(MISSING_NUMPY) from None
    return numpy


def shared_array(shape: int | tuple[int, ...], dtype: Any = float):
    """A zero-filled numpy array in shared memory. Process, pool and fork workers that receive
    it (in an item, in the function's closure or `functools.partial` arguments) map the same
    memory, with no copy, and so does the caller when a worker returns it; threads, greenlets
    and asyncio see it as any array; dask and manager workers, which may run on other hosts,
    get a copy. Contiguous slices travel the same way; a non-contiguous slice is copied. The
    memory is freed when the caller's last array over it is dropped, or when the caller ends.
    Made inside a worker, it is that worker's: returned, it reaches the caller as a copy.

    Parameters
    ----------
    shape : int or tuple of int
        The array's shape.
    dtype : numpy dtype or anything `numpy.dtype` takes, default float
        Its type; object dtypes are refused.

    Returns
    -------
    numpy.ndarray
        A writable, zero-filled array over shared memory.

    Raises
    ------
    ImportError
        numpy is not installed (`pip install 'pmap-parallel[numpy]'`).
    TypeError, ValueError
        An object dtype, or a shape that is not non-negative integers.
    """
    numpy = _numpy()
    dtype = numpy.dtype(dtype)
    if dtype.hasobject:
        raise TypeError(f"a shared array holds plain values; dtype {dtype} holds Python objects")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in shape):
        raise ValueError(f"shape must be non-negative integers, got {shape!r}")
    count = math.prod(shape)
    region = new_shared_segment(count * dtype.itemsize)
    return numpy.frombuffer(region, dtype=dtype, count=count).reshape(shape)


def to_shared(array: Any):
    """A copy of `array` in shared memory: see `shared_array`. This one copy replaces the one
    each run would make.

    Parameters
    ----------
    array : array_like
        Anything `numpy.asarray` takes.

    Returns
    -------
    numpy.ndarray
        A writable copy, of the same shape and dtype, over shared memory.
    """
    numpy = _numpy()
    source = numpy.asarray(array)
    copy = shared_array(source.shape, source.dtype)
    numpy.copyto(copy, source)
    return copy
