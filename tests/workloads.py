"""Functions the tests map. They live in a module so every start method can import them."""
import os
import threading
import time


def square(x):
    return x * x


def identity(x):
    return x


def add(a, b):
    return a + b


def fail_on_three(x):
    if x == 3:
        raise ValueError(f"three is not allowed: {x}")
    return x


def slow_identity(x, seconds=0.01):
    time.sleep(seconds)
    return x


def sleep_then(seconds):
    time.sleep(seconds)
    return seconds


def make_big(n_bytes):
    return b"x" * n_bytes


def length(data):
    return len(data)


def pid_of(_):
    return os.getpid()


def return_lock(_):
    return threading.Lock()


def raise_unpicklable(_):
    class LocalError(Exception):
        def __reduce__(self):
            raise TypeError("LocalError refuses to be pickled")
    raise LocalError("unpicklable failure")


_INIT_VALUE = None


def set_init_value(value):
    global _INIT_VALUE
    _INIT_VALUE = value


def read_init_value(_):
    return _INIT_VALUE


def cpu_loop(n):
    total = 0
    for i in range(n):
        total += i * i
    return total


def compress(data):
    import zlib
    return len(zlib.compress(data, 6))


def append_item_to(path_and_item):
    path, item = path_and_item
    with open(path, "a") as handle:  # O_APPEND: one line per call, from any process
        handle.write(f"{item}\n")
    for _ in range(20_000):
        pass
    return item
