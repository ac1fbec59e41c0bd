"""thread: a pool of daemon threads. For IO-bound work and C code that releases the GIL."""
from __future__ import annotations

import ctypes
import queue
import threading
import time

from .._worker import run_items
from ..errors import TaskTimeout
from .base import Backend, Done, Fatal, Started, usable_cpus

_STOP = None


class ThreadBackend(Backend):
    name = "thread"
    kind = "thread"
    guarantees = ("timeout raises TaskTimeout inside Python code of the stuck thread and abandons it "
                  "if it is blocked in C; crashes take the whole process")

    @classmethod
    def default_workers(cls) -> int:
        return min(32, usable_cpus() + 4)  # as concurrent.futures does

    def __init__(self, workers=None, initializer=None, initargs=(), **options):
        super().__init__(workers, initializer, initargs, **options)
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.running: dict[int, threading.Thread] = {}  # task id -> thread running it
        self.abandoned: set[threading.Thread] = set()
        self.queued = 0
        self.lock = threading.Lock()
        self.serial = 0

    def open(self) -> None:
        while len(self.threads) < self.workers:
            self._spawn()

    def _spawn(self) -> None:
        self.serial += 1
        thread = threading.Thread(target=self._work, name=f"pmap-thread-{self.serial}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def _work(self) -> None:
        me = threading.current_thread()
        if self.initializer is not None:
            try:
                self.initializer(*self.initargs)
            except BaseException as exc:
                self.events.put(Fatal(exc))
                return
        while True:
            task = self.tasks.get()
            if task is _STOP:
                return
            with self.lock:
                self.queued -= 1
                self.running[task.id] = me
            self.events.put(Started(task.id, me.name, time.monotonic()))
            try:
                values, failures, elapsed = run_items(task.fn, task.items)
            except TaskTimeout:  # our own timeout landed between items: the task is gone anyway
                values = None
            with self.lock:
                self.running.pop(task.id, None)
                if me in self.abandoned:  # its task timed out and a replacement took its place
                    self.abandoned.discard(me)
                    return
            if values is not None:
                self.events.put(Done(task.id, me.name, values, failures, elapsed))

    def capacity(self) -> int:
        with self.lock:
            busy = len(self.running) + self.queued
        return 2 * self.workers - busy

    def submit(self, task) -> None:
        with self.lock:
            self.queued += 1
        self.tasks.put(task)

    def wait(self, timeout):
        try:
            first = self.events.get(timeout=timeout) if timeout else self.events.get_nowait()
        except queue.Empty:
            return []
        events = [first]
        while True:
            try:
                events.append(self.events.get_nowait())
            except queue.Empty:
                return events

    def cancel(self, task_id) -> None:
        with self.lock:
            thread = self.running.pop(task_id, None)
            if thread is None:
                return
            self.abandoned.add(thread)
            self.threads.remove(thread)
        _raise_in_thread(thread, TaskTimeout)
        self._spawn()

    def close(self, kill=False) -> None:
        if kill:  # queued tasks are dropped; running ones finish unread in their daemon threads
            while True:
                try:
                    self.tasks.get_nowait()
                except queue.Empty:
                    break
        for _ in self.threads:
            self.tasks.put(_STOP)
        if not kill:
            for thread in self.threads:
                if thread is not threading.current_thread():
                    thread.join()
        self.threads = []


def _raise_in_thread(thread: threading.Thread, exc_type: type) -> None:
    """Ask the interpreter to raise `exc_type` in `thread` at its next Python instruction."""
    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type))
