"""thread: a pool of daemon threads. For IO-bound work and C code that releases the GIL."""
from __future__ import annotations

import ctypes
import queue
import threading
import time

from .. import native
from .._worker import every_item_failed, run_items
from ..errors import InitializerError, TaskTimeout
from .base import Backend, Done, Fatal, Started, usable_cpus

_STOP = None
_WAKE = object()  # put among the events by wake(): not an event, only an end to a wait


class _Stopped(BaseException):
    """Ends a task whose item passed its deadline, in the thread it was abandoned in."""


class _ItemClock:
    """Under a timeout, the item a thread runs and since when (`now`), and the task's values
    and failures so far. A thread looks for a stop after it says which item it starts, and a
    stop is set before the finished items are counted: an item that begins after a stop was
    counted never runs, and one that had begun is the one the stop interrupts."""

    __slots__ = ("now", "stopped", "values", "failures", "started")

    def __init__(self):
        self.now = None          # (position, time.monotonic()) of the item running
        self.stopped = False
        self.values, self.failures, self.started = [], [], time.perf_counter()

    def begin(self, values, failures):
        self.values, self.failures, self.started = values, failures, time.perf_counter()

    def mark(self, position):
        self.now = (position, time.monotonic())  # one store: never one item's position with another's time
        if self.stopped:
            raise _Stopped

    def end(self):
        pass

    def stop(self) -> tuple[list, list, float]:
        """Stop the task where it is; (values, failures) of the items it finished, and its time."""
        self.stopped = True
        done = len(self.values)
        return self.values[:done], [f for f in self.failures if f[0] < done], time.perf_counter() - self.started


class ThreadBackend(Backend):
    name = "thread"
    kind = "thread"
    guarantees = ("timeout raises TaskTimeout inside Python code of the stuck thread and abandons it "
                  "if it is blocked in C; crashes take the whole process")
    adaptive_maximum = 256
    item_clock = True

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
        self.clocks: dict[int, _ItemClock] = {}  # under a timeout: task id -> its item clock
        self.abandoned: set[threading.Thread] = set()
        self.queued = 0
        self.lock = threading.Lock()
        self.serial = 0
        self.wanted = self.workers  # threads to keep; an adaptive run lowers it
        self.spawner: threading.Thread | None = None
        self.closed = False
        self.native: native.ThreadRunLimit | None = None

    def open(self) -> None:
        self.closed = False
        if self.native is None:  # threads x native threads within the CPUs while the run lasts
            self.native = native.limit_threads(self)
        if self.threads:
            return  # running: set_concurrency adds threads, from a helper thread
        while len(self.threads) < self.wanted:
            self._spawn()

    def set_concurrency(self, tasks: int) -> None:
        # Threads are added as the limit grows; when it falls, the spare ones wait idle on the
        # queue (the engine sends no more tasks than the limit), ready for the next rise.
        self.wanted = max(1, min(tasks, self.workers))
        if not self.threads:
            return  # not open yet: open() starts them
        with self.lock:
            if self.spawner is not None and self.spawner.is_alive():
                return
            # Starting a thread costs about 0.3 ms: a jump to 256 would hold the engine (and so
            # the dispatch of the tasks the new limit allows) for tens of milliseconds.
            self.spawner = threading.Thread(target=self._grow, name="pmap-thread-spawner", daemon=True)
            self.spawner.start()

    def _grow(self) -> None:
        while True:
            with self.lock:  # close() counts the threads under this lock, so none is missed
                if self.closed or len(self.threads) >= self.wanted:
                    return
                thread = self._new_thread()
            # Started outside the lock: a start waits for the new thread to run, and meanwhile
            # the workers and the engine need the lock to take and hand in tasks.
            thread.start()

    def _spawn(self) -> None:
        self._new_thread().start()

    def _new_thread(self) -> threading.Thread:
        self.serial += 1
        thread = threading.Thread(target=self._work, name=f"pmap-thread-{self.serial}", daemon=True)
        self.threads.append(thread)
        return thread

    def _work(self) -> None:
        me = threading.current_thread()
        if self.initializer is not None:
            try:
                self.initializer(*self.initargs)
            except BaseException as exc:  # the user's initializer, whatever it raises: the caller's InitializerError
                name = getattr(self.initializer, "__qualname__", None) or type(self.initializer).__name__
                error = InitializerError(f"the initializer {name} failed in thread {me.name} of backend 'thread': "
                                         f"{type(exc).__name__}: {exc}")
                error.__cause__ = exc
                self.events.put(Fatal(error))
                return
        while True:
            task = self.tasks.get()
            if task is _STOP:
                return
            clock = _ItemClock() if self.timeout is not None else None
            with self.lock:
                self.queued -= 1
                self.running[task.id] = me
                if clock is not None:
                    self.clocks[task.id] = clock
            self.events.put(Started(task.id, me.name, time.monotonic()))
            cpu = time.thread_time()
            try:
                values, failures, elapsed = run_items(task.fn, task.items, clock=clock)
            except (TaskTimeout, _Stopped):  # our own timeout landed between items: the task is gone anyway
                values = None
            except BaseException as exc:  # never die without reporting the task
                values, failures = every_item_failed(len(task.items), exc)
                elapsed = 0.0
            with self.lock:  # its Done is queued before `interrupt` can find it gone
                self.running.pop(task.id, None)
                self.clocks.pop(task.id, None)
                if me in self.abandoned:  # its task timed out and a replacement took its place
                    self.abandoned.discard(me)
                    return
                if values is not None:
                    self.events.put(Done(task.id, me.name, values, failures, elapsed, time.thread_time() - cpu))
            task = values = failures = None  # held no longer than the task: the caller may free them

    def prepare(self, fn, timeout=None):
        self.open()  # threads ended by a close (a Pool after Ctrl-C) are started anew
        return super().prepare(fn, timeout)

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
                return [event for event in events if event is not _WAKE]

    def wake(self) -> None:
        self.events.put(_WAKE)

    def cancel(self, task_id) -> None:
        with self.lock:
            thread = self.running.pop(task_id, None)
            clock = self.clocks.pop(task_id, None)
            if thread is None:
                return
            self.abandoned.add(thread)
            self.threads.remove(thread)
        if clock is not None:
            clock.stop()  # no further item of it starts, wherever the exception lands
        _raise_in_thread(thread, TaskTimeout)
        self._spawn()

    def running_item(self, task_id):
        clock = self.clocks.get(task_id)
        return clock.now if clock is not None else None

    def interrupt(self, task_id, position):
        with self.lock:
            thread = self.running.pop(task_id, None)
            clock = self.clocks.pop(task_id, None)
            if thread is None:  # over: its Done is queued
                return self.wait(0)
            self.abandoned.add(thread)
            self.threads.remove(thread)
        values, failures, elapsed = clock.stop() if clock is not None else ([], [], 0.0)
        _raise_in_thread(thread, TaskTimeout)  # where it runs Python code; stuck in C, it is left behind
        self._spawn()
        return [Done(task_id, thread.name, values, failures, elapsed)]

    def close(self, kill=False) -> None:
        if kill:  # queued tasks are dropped; running ones finish unread in their daemon threads
            while True:
                try:
                    self.tasks.get_nowait()
                except queue.Empty:
                    break
        with self.lock:
            self.closed = True  # a spawner adds no thread from here on
        spawner = self.spawner
        if spawner is not None and spawner is not threading.current_thread():
            spawner.join()  # so that every thread counted below has started
        with self.lock:
            threads = list(self.threads)
        for _ in threads:
            self.tasks.put(_STOP)
        if not kill:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()
        self.threads = []
        if self.native is not None:
            self.native.release()
            self.native = None


def _raise_in_thread(thread: threading.Thread, exc_type: type) -> None:
    """Ask the interpreter to raise `exc_type` in `thread` at its next Python instruction."""
    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type))
