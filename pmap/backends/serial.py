"""serial: every item in the calling thread. The reference semantics."""
from __future__ import annotations

import signal
import threading
import time
from collections import deque

from .._worker import caller_interrupts, run_items
from ..errors import TaskTimeout
from .base import Backend, Done, Started


class SerialBackend(Backend):
    name = "serial"
    kind = "serial"
    random_globals = "caller"
    guarantees = "timeout interrupts Python code and sleeps via SIGALRM (main thread only); no isolation from crashes"

    @classmethod
    def default_workers(cls) -> int:
        return 1

    def __init__(self, workers=None, initializer=None, initargs=(), **options):
        super().__init__(1, initializer, initargs, **options)
        self.queue: deque = deque()
        self._initialized = False
        self._woken = threading.Event()

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
            if timeout and self._woken.wait(timeout):
                self._woken.clear()
            return []
        task = self.queue.popleft()
        started = Started(task.id, "main", time.monotonic())
        with caller_interrupts(), _alarm(self.timeout):
            values, failures, elapsed = run_items(task.fn, task.items)
        return [started, Done(task.id, "main", values, failures, elapsed)]

    def wake(self) -> None:
        self._woken.set()

    def close(self, kill=False) -> None:
        self.queue.clear()


MAX_ALARM_SECONDS = 2.0 ** 31  # setitimer's range is a C time_t of seconds; longer is "no timeout"


class _alarm:
    """Raise TaskTimeout in the main thread after `seconds`. A SIGALRM timer someone else
    had set is put back afterwards, less the time spent (it rings late, never early)."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.previous_handler = None
        self.previous_timer = (0.0, 0.0)
        self.started = 0.0

    def __enter__(self):
        if (not self.seconds or threading.current_thread() is not threading.main_thread()
                or not hasattr(signal, "setitimer")):
            self.seconds = None
            return self
        if not self.seconds < MAX_ALARM_SECONDS:  # beyond what setitimer takes (inf): it never rings
            self.seconds = None
            return self
        self.started = time.monotonic()
        self.previous_handler = signal.signal(signal.SIGALRM, self._ring)
        self.previous_timer = signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def _ring(self, signum, frame):
        raise TaskTimeout.after(self.seconds)

    def __exit__(self, *exc):
        if self.seconds:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous_handler)
            remaining, interval = self.previous_timer
            if remaining:
                spent = time.monotonic() - self.started
                signal.setitimer(signal.ITIMER_REAL, max(remaining - spent, 1e-3), interval)
        return False
