"""Functions for tests/test_chunk_timeouts.py, in a module that imports quickly: a worker
imports it on its first item, and that item's clock is running."""
import os
import time


class Logged:
    """x * 10, writing `x` to `path` on every call; hangs on the items in `hang` (in steps of
    0.05 s, so a thread that is told to stop notices), or only on their first call when
    `hang_once`."""

    def __init__(self, path, hang=(), hang_once=False, nap=0.0):
        self.path = str(path)
        self.hang = set(hang)
        self.hang_once = hang_once
        self.nap = nap

    def __call__(self, x):
        seen_before = x in runs(self.path)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{x}\n".encode())  # one small O_APPEND write: lines never interleave
        finally:
            os.close(fd)
        if x in self.hang and not (self.hang_once and seen_before):
            for _ in range(72_000):
                time.sleep(0.05)
        if self.nap:
            time.sleep(self.nap)
        return x * 10


def runs(path) -> list:
    """The items run so far, in the order their runs began, one entry per run."""
    try:
        with open(path) as handle:
            return [int(line) for line in handle.read().split()]
    except FileNotFoundError:
        return []



class HoldsTheGil(Logged):
    """Logged, but item `stuck` spins in C with the GIL held (no signal handler runs)."""

    def __init__(self, path, stuck):
        super().__init__(path)
        self.stuck = stuck

    def __call__(self, x):
        value = super().__call__(x)
        if x == self.stuck:
            sum(range(10 ** 11))  # a C loop that never lets Python run; the worker is killed first
        return value


async def async_tens(x):
    return x * 10
