"""Helpers for process backends: ending a worker and its children, and describing its exit."""
from __future__ import annotations

import os
import signal
import time

TERMINATE_GRACE = 0.2   # seconds a worker gets between SIGTERM and SIGKILL


def end_process_group(pid: int, alive=None, grace: float = TERMINATE_GRACE) -> None:
    """SIGTERM the worker's process group (the worker leads it), then SIGKILL what is left.
    `alive()` tells whether the worker still runs (default: ask the kernel)."""
    alive = alive or (lambda: process_exists(pid))
    descendants = _descendants(pid)  # also those that left its group (os.setsid)
    try:
        pgid = os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        _kill_all(descendants)
        return
    group = pgid == pid  # a worker that leads its own group: its children go too
    kill = os.killpg if group else os.kill
    target = pgid if group else pid
    try:
        kill(target, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        _kill_all(descendants)
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not alive():
            break
        time.sleep(0.01)
    try:
        kill(target, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _kill_all(descendants)


def _descendants(pid: int) -> list:
    try:
        import psutil
        return psutil.Process(pid).children(recursive=True)
    except Exception:
        return []


def _kill_all(processes: list) -> None:
    for process in processes:
        try:
            process.kill()  # psutil checks the pid still names the same process
        except Exception:
            pass


def process_exists(pid: int) -> bool:
    try:
        import psutil
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "unknown exit status"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"
