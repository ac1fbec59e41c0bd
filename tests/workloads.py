"""Functions the tests map. They live in a module so every start method can import them."""
import asyncio
import functools
import os
import sys
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
    pause(seconds)
    return x


def pause(seconds):
    """time.sleep, except in a greenlet of the greenlet backend, where it yields to gevent's hub:
    the test process is not monkey-patched, and unpatched sleeps would run greenlets one by one."""
    gevent = sys.modules.get("gevent")
    if gevent is not None and isinstance(gevent.getcurrent(), gevent.Greenlet):
        gevent.sleep(seconds)
    else:
        time.sleep(seconds)


# ---- async twins: backend="asyncio" runs only async def functions ----------------------------
ASYNC_TWINS = {}


def async_twin(of):
    """Register the decorated `async def` as the twin of `of` (one that awaits where `of` sleeps)."""
    def register(twin):
        ASYNC_TWINS[of] = twin
        return twin
    return register


def for_backend(fn, backend):
    """`fn` as `backend` runs it: itself, or on backend="asyncio" its async twin (a registered
    one, else an async def that calls `fn`)."""
    if backend != "asyncio":
        return fn
    twin = ASYNC_TWINS.get(fn)
    if twin is None:
        @functools.wraps(fn)
        async def twin(*args):
            return fn(*args)
    return twin


@async_twin(slow_identity)
async def slow_identity_async(x, seconds=0.01):
    await asyncio.sleep(seconds)
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


def spin_cpu(seconds):
    """Pure Python for `seconds` of this thread's CPU time, however busy the machine is."""
    deadline = time.thread_time() + seconds
    while time.thread_time() < deadline:
        pass
    return seconds


def first_worker_only_starts(marker, hold_seconds):
    """An initializer: the first worker to create `marker` goes on at once, the others wait
    `hold_seconds` (workers that start late)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        time.sleep(hold_seconds)


def parent_pid_of(_):
    return os.getppid()


def spin_then_draw(x):
    """4 ms of CPU, then the module-level generator's next number and the item's own."""
    import random

    import pmap
    spin_cpu(0.004)
    return x, random.random(), pmap.rng().random()
