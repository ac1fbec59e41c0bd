"""Functions that fail the hard way, for the fault tests. Importable by every start method."""
import ctypes
import os
import signal
import time


def exit_on_three(x):
    if x == 3:
        os._exit(7)
    return x


def segfault_on_three(x):
    if x == 3:
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
