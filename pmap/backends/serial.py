"""serial: every item in the calling thread. The reference semantics."""
from __future__ import annotations

import signal
import threading
import time
from collections import deque

from .._worker import run_items
from ..errors import TaskTimeout
from .base import Backend, Done, Started


class SerialBackend(Backend):
    name = "serial"
    kind = "serial"
    hard_timeout = False
    guarantees = "timeout interrupts Python code and sleeps via SIGALRM in the main thread; no isolation from crashes"

    @classmethod
    def default_workers(cls) -> int:
        return 1

    def __init__(self, workers=None, initializer=None, initargs=(), **options):
        super().__init__(1, initializer, initargs, **options)
        self.queue: deque = deque()
        self._initialized = False

    def open(self) -> None:
        if self.initializer is not None and not self._initialized:
            self.initializer(*self.initargs)
        self._initialized = True

    def capacity(self) -> int:
        return 1 - len(self.queue)

    def submit(self, task) -> None:
        self.queue.append(task)

    def wait(self, timeout):
        if not self.queue:
            if timeout:
                time.sleep(timeout)
            return []
        task = self.queue.popleft()
        started = Started(task.id, "main", time.monotonic())
        with _alarm(self.timeout):
            values, failures, elapsed = run_items(task.fn, task.items)
        return [started, Done(task.id, "main", values, failures, elapsed)]

    def close(self, kill=False) -> None:
        self.queue.clear()


class _alarm:
    """Raise TaskTimeout in the main thread after `seconds`, where SIGALRM is ours to use."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.previous = None

    def __enter__(self):
        if (not self.seconds or threading.current_thread() is not threading.main_thread()
                or not hasattr(signal, "setitimer")
                or signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None)):
            self.seconds = None
            return self
        self.previous = signal.signal(signal.SIGALRM, self._ring)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def _ring(self, signum, frame):
        raise TaskTimeout(f"item ran longer than its timeout of {self.seconds:g}s")

    def __exit__(self, *exc):
        if self.seconds:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        return False
