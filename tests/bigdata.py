"""Functions over big data that the transfer tests map; a module, so spawned workers import them."""
import os
import signal

import numpy as np

MB = 1 << 20


def length_plus(data, x):
    return len(data) + x


def slice_sum(array, i):
    return float(array[i * 1000:(i + 1) * 1000].sum())


def filled(i):
    """A 2 MB array out, from a small item."""
    return np.full(2 * MB // 8, i, dtype=np.float64)


def doubled(array):
    return array * 2


def first_value(array):
    return float(array[0])


def write_into(array, i):
    array[i] = -1.0
    return i


def kill_self_on_three(array):
    if array[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return array + 1


def big_bytes(i):
    return bytes(2 * MB)


def python_loop_over(array):
    """About 10 ms of pure Python (the GIL held) over a big array that comes in whole."""
    total = 0.0
    for value in array[:150_000].tolist():
        total += value
    return total


def fill_row(out, i):
    """Writes row i of a shared output array; returns nothing big."""
    out[i] = i
    return i


def row_of(array, i):
    return array[i]


def touch_and_pid(array, i):
    """Reads the array; returns the worker's pid."""
    float(array[i])
    return os.getpid()


def shared_made_here(i):
    """(this worker's pid, an array it made with pmap.shared_array): 2 MB for odd i, 8 KB else."""
    import pmap
    array = pmap.shared_array(2 * MB // 8 if i % 2 else 1024)
    array[:] = i
    return os.getpid(), array
