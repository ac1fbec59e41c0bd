"""Functions that fail the hard way, for the fault tests. Importable by every start method."""
import ctypes
import faulthandler
import os
import signal
import sys
import time


def exit_on_three(x):
    if x == 3:
        os._exit(7)
    return x


def segfault_on_three(x):
    if x == 3:
        faulthandler.disable()  # inherited from pytest: its dump in the test output would read as a failure
        ctypes.string_at(0)  # a real segmentation fault
    return x * 10


def exit_on_five(x):
    if x == 5:
        os._exit(3)
    return x * 10


def hang_on_seven(x):
    if x == 7:
        time.sleep(3600)
    return x * 10


def kill_self_on_four(x):
    if x == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return x * 10


def poison_on_two(x):
    if x == 2:
        os._exit(7)
    return x * 10


def flaky_once(arg):
    """Fails the first time it sees an item (a marker file remembers, across processes)."""
    marker_dir, x = arg
    marker = os.path.join(marker_dir, f"seen-{x}")
    if x % 3 == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        raise ConnectionError(f"transient failure on {x}")
    return x * 10


def count_attempts(arg):
    """Always fails; each attempt leaves a line in a file, to count them."""
    path, x = arg
    with open(path, "a") as handle:
        handle.write(f"{x}\n")
    raise RuntimeError(f"always fails: {x}")


def pid_after_sleep(x):
    time.sleep(0.01)
    return os.getpid()


def sleep_forever(_):
    time.sleep(3600)


def die_holding_a_pool_lock_on_zero(which, x):
    """Item 0 takes one of multiprocessing.Pool's queue locks, as a worker does while it waits
    for a task ("tasks") or writes its reply ("replies"), and dies holding it (SIGKILL); the
    other items return at once. With more than one worker it may wait for ever itself: an idle
    worker holds the task lock while it waits for a task."""
    if x != 0:
        return x
    frame = sys._getframe()
    while "outqueue" not in frame.f_locals:  # the Pool's worker loop, a few frames up
        frame = frame.f_back
    if which == "tasks":
        frame.f_locals["inqueue"]._rlock.acquire()
    else:
        frame.f_locals["outqueue"]._wlock.acquire()
    os.kill(os.getpid(), signal.SIGKILL)


# ---- workers that die while their result leaves ---------------------------------------------

class KillsItsWorkerWhenPickled:
    """A result whose pickling kills the worker (as the OOM killer may, pickling a big result)."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)


def dies_pickling_its_result_on_three(x):
    return KillsItsWorkerWhenPickled() if x == 3 else x * 10


class _StartsTheWatchWhenPickled:
    """32 MB that pickle in band (one long frame to write); its pickling starts the watch."""

    def __init__(self, started):
        self.started = started

    def __reduce__(self):
        self.started.set()
        return (bytes, (bytes(32 << 20),))


def _kill_once_a_frame_is_being_written(started):
    """SIGKILL this worker as soon as bytes wait in its connection to the caller, once the big
    result's pickling has begun: that is, while the result is being written."""
    import fcntl
    import termios
    from pmap import _worker
    started.wait()
    links = [*_worker._links.values(), *([_worker._own_link] if _worker._own_link else [])]
    while True:
        for link in links:
            if fcntl.ioctl(link.conn.fileno(), termios.TIOCOUTQ, b"\0\0\0\0") != b"\0\0\0\0":
                os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.0002)


def killed_writing_its_result_on_three(x):
    if x != 3:
        return x * 10
    import threading
    started = threading.Event()
    threading.Thread(target=_kill_once_a_frame_is_being_written, args=(started,), daemon=True).start()
    return _StartsTheWatchWhenPickled(started)


def sleep_then_exit_on_one(x):
    """Item 0 runs for a while; item 1 ends its worker meanwhile."""
    if x == 1:
        time.sleep(0.3)
        os._exit(5)
    time.sleep(1.0 if x == 0 else 0.01)
    return x * 10


# ---- BaseExceptions, undecodable results and items, failing initializers -------------------

class CustomBaseError(BaseException):
    """A BaseException of the user's own, not an Exception."""


def greenlet_exit():
    import gevent
    return gevent.GreenletExit("raised by the function")


def cancelled_error():
    import asyncio
    return asyncio.CancelledError()


BASE_EXCEPTIONS = {  # name -> (type, factory), the factory called inside the worker
    "SystemExit": (SystemExit, lambda: SystemExit(1)),
    "KeyboardInterrupt": (KeyboardInterrupt, lambda: KeyboardInterrupt("raised by the function")),
    "GeneratorExit": (GeneratorExit, lambda: GeneratorExit("raised by the function")),
    "CustomBaseError": (CustomBaseError, lambda: CustomBaseError("custom")),
    "GreenletExit": (None, greenlet_exit),
    "CancelledError": (None, cancelled_error),
}


def base_exception_type(name):
    known, factory = BASE_EXCEPTIONS[name]
    return known or type(factory())


def raise_base_on_three(name, x):
    if x == 3:
        raise BASE_EXCEPTIONS[name][1]()
    return x * 10


async def raise_base_on_three_async(name, x):
    import asyncio
    await asyncio.sleep(0)
    return raise_base_on_three(name, x)


class NeedsTwoArgs(Exception):
    """Pickles (its args hold one value) but cannot be rebuilt: __init__ wants two."""

    def __init__(self, a, b):
        super().__init__(a)


def _refuse_to_rebuild(where):
    raise RuntimeError(f"this object cannot be rebuilt {where}")


class BrokenReduce:
    """A result that pickles but never unpickles."""

    def __reduce__(self):
        return (_refuse_to_rebuild, ("anywhere",))


def _rebuild_in(caller_pid, in_caller):
    if (os.getpid() == caller_pid) != in_caller:
        _refuse_to_rebuild("in the caller" if in_caller is False else "in a worker")
    return RebuildsOnlyIn(caller_pid, in_caller)


class RebuildsOnlyIn:
    """Unpickles only in the caller (`in_caller`), or only outside it."""

    def __init__(self, caller_pid, in_caller):
        self.caller_pid = caller_pid
        self.in_caller = in_caller

    def __reduce__(self):
        return (_rebuild_in, (self.caller_pid, self.in_caller))


def undecodable_outcomes(arg):
    """Item 2 raises an exception that cannot be rebuilt, item 4 returns a result that cannot
    be rebuilt anywhere, item 6 one that cannot be rebuilt in the caller only."""
    caller_pid, x = arg
    if x == 2:
        raise NeedsTwoArgs("needs two", "args")
    if x == 4:
        return BrokenReduce()
    if x == 6:
        return RebuildsOnlyIn(caller_pid, in_caller=False)
    return x * 10


def times_ten(x):
    return x * 10


def initializer_that(how):
    if how == "raises":
        raise LookupError("the initializer could not find its config")
    if how == "sys.exit":
        sys.exit(5)
    if how == "os._exit":
        os._exit(6)
    if how == "SIGKILL":  # as a pool ends a sibling of a worker that failed
        os.kill(os.getpid(), signal.SIGKILL)


def new_session_with_a_child(path):
    """Leaves the caller's session (os.setsid) and starts a long-lived child, whose pid it
    appends to `path`."""
    import subprocess
    if os.getsid(0) != os.getpid():
        os.setsid()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(path, "a") as handle:
        handle.write(f"{child.pid}\n")
    return os.getsid(0) == os.getpid()


# ---- the fuzz test's function: one nasty behaviour per kind of item ---------------------------

NASTY_KINDS = [*BASE_EXCEPTIONS, "os._exit", "broken-result", "bad-exception", "slow"]
SLOW_SECONDS = 2.0


def nasty(arg):
    kind, x = arg
    if kind == "ok":
        return x * 10
    if kind in BASE_EXCEPTIONS:
        raise BASE_EXCEPTIONS[kind][1]()
    if kind == "os._exit":
        os._exit(9)
    if kind == "broken-result":
        return BrokenReduce()
    if kind == "bad-exception":
        raise NeedsTwoArgs("needs", "two")
    if kind == "slow":
        from workloads import pause
        pause(SLOW_SECONDS)
        return x * 10
    raise AssertionError(f"unknown kind {kind}")


async def nasty_async(arg):
    import asyncio
    if arg[0] == "slow":
        await asyncio.sleep(SLOW_SECONDS)
        return arg[1] * 10
    await asyncio.sleep(0)
    return nasty(arg)


def big_result(n):
    """A result larger than a pipe holds: a few of them fill the pool's result pipe."""
    return bytes(256 * 1024)
