"""Helpers for process backends: what a worker says over its own connection and which task
it holds (`Link`), ending a worker and its children, and describing its exit."""
from __future__ import annotations

import mmap
import os
import select
import signal
import time

from .. import _logs
from .._worker import (FAILED, HELD_AT, HELLO, ITEM, ITEM_AT, LOG, NO_TASK, NUMBER, READY, RESULT, SLOT_SIZE, SPLIT,
                       STOP_AT, STOP_SIGNAL, read_item_word, slot_path)

TERMINATE_GRACE = 0.2   # seconds a worker gets between SIGTERM and SIGKILL
STOP_GRACE = 1.0        # seconds a worker asked to stop a task gets to send what the task finished


def called_from_an_unguarded_script() -> bool:
    """Whether this call comes from the top level of the main script, outside an
    `if __name__ == "__main__":` block: workers that import the script (spawn) would then run
    the call again. Asked only once workers failed to start, to say why."""
    import ast
    import sys
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    frame = sys._getframe()
    while frame is not None and not (frame.f_code.co_name == "<module>" and main is not None
                                     and frame.f_globals is vars(main)):
        frame = frame.f_back
    if frame is None or path is None:
        return False  # not while the script's top level runs (a notebook, a function called later)
    try:
        with open(path, encoding="utf-8") as source:
            tree = ast.parse(source.read())
    except (OSError, SyntaxError, ValueError):  # a script we cannot read cannot be judged
        return False
    for statement in tree.body:
        if statement.lineno <= frame.f_lineno <= (statement.end_lineno or statement.lineno):
            return not (isinstance(statement, ast.If) and "__main__" in ast.unparse(statement.test)
                        and "__name__" in ast.unparse(statement.test))
    return False


class Link:
    """The caller's end of one worker process's own connection and slot (see `_worker.Link`).
    The task the worker holds is in its slot: written before the task runs, cleared once its
    result has been written whole, so a worker that dies while it runs, pickles or writes a
    result still holds its task, and no one has to guess which task that was. Log records go
    to the caller's loggers as they arrive."""

    __slots__ = ("conn", "pid", "slot", "run_dir", "closed", "waiting")

    def __init__(self, conn, pid: int | None = None, slot=None, run_dir: str | None = None):
        self.conn = conn
        self.pid = pid  # a pooled worker says it in its first frame; its slot is then mapped from `run_dir`
        self.slot = slot
        self.run_dir = run_dir
        self.closed = False  # the worker's end has closed: it exited or died
        self.waiting = select.poll()  # whether bytes (or the end) wait: one call, where conn.poll() builds a selector
        self.waiting.register(conn.fileno(), select.POLLIN)

    def held(self) -> int | None:
        """The task the worker runs, or whose result it has not yet written whole."""
        task = NUMBER.unpack_from(self.slot, HELD_AT)[0] if self.slot is not None else NO_TASK
        return None if task == NO_TASK else task

    def running_item(self, task_id: int) -> tuple[int, float] | None:
        """(position, start time) of the item of `task_id` the worker runs (under a timeout);
        None when it does not hold that task."""
        if self.held() != task_id:
            return None
        return read_item_word(ITEM.unpack_from(self.slot, ITEM_AT)[0])

    def stop(self, task_id: int) -> list:
        """Ask the worker to stop `task_id` where it is (`_worker.stop_when_asked`): it sends what
        the task finished as its result, and waits to be ended. Returns the frames read until
        that result (or the task's own, or the worker's end, or STOP_GRACE)."""
        frames: list = []
        NUMBER.pack_into(self.slot, STOP_AT, task_id)
        try:
            os.kill(self.pid, STOP_SIGNAL)
        except (ProcessLookupError, PermissionError, TypeError):  # gone, or not yet said who it is
            return frames
        deadline = time.monotonic() + STOP_GRACE
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0 or not self.waiting.poll(left * 1000):
                break
            new = self.read()
            frames += new
            if any(kind in (RESULT, SPLIT) and task == task_id for kind, task, _ in new):
                break
        return frames

    def read(self) -> list[tuple[bytes, int | None, memoryview]]:
        """The frames waiting, as (kind, task id or None, body); a frame still being written
        is waited for. Sets `closed` once the worker's end has closed."""
        frames: list = []
        try:
            while not self.closed and self.waiting.poll(0):
                self._take(self.conn.recv_bytes(), frames)
        except (EOFError, OSError):  # its end closed, perhaps in the middle of a frame
            self.closed = True
        return frames

    def _take(self, message: bytes, frames: list) -> None:
        kind, body = message[:1], memoryview(message)[1:]
        if kind == LOG:
            _logs.handle_sent(body)
        elif kind == HELLO:
            self.pid = NUMBER.unpack_from(body)[0]
            self.slot = _map_slot(slot_path(self.run_dir, self.pid))
        elif kind in (READY, FAILED):
            frames.append((kind, None, body))
        else:  # START, RESULT or SPLIT
            frames.append((kind, NUMBER.unpack_from(body)[0], body[NUMBER.size:]))

    def close(self) -> None:
        self.closed = True
        self.conn.close()


def _map_slot(path: str) -> mmap.mmap | None:
    try:
        fd = os.open(path, os.O_RDWR)  # the caller writes a stop request there
    except OSError:  # the run's folder has gone (the backend is closing)
        return None
    try:
        return mmap.mmap(fd, SLOT_SIZE)
    finally:
        os.close(fd)


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
    import psutil  # a dependency
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:  # gone already, or not ours to read: no descendants to end
        return []


def _kill_all(processes: list) -> None:
    import psutil  # a dependency; the processes came from it
    for process in processes:
        try:
            process.kill()  # psutil checks the pid still names the same process
        except psutil.Error:  # gone already, or not ours any more: nothing to kill
            pass


def process_exists(pid: int) -> bool:
    import psutil  # a dependency
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ZombieProcess included
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
