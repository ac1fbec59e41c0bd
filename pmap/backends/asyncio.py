"""asyncio: `async def` functions on an event loop, at most `workers` coroutines at a time.

Where the loop runs:
- in the calling thread, inside `wait()`, when no loop is running there (the usual script);
- in a private helper thread when the calling thread already runs a loop (a notebook, an async
  application), since a thread cannot run two loops at once;
- on a loop the caller names with `loop=`, running in another thread (what `pmap.apmap` uses).

No coroutine exists for an item before a runner takes it: at most `workers` runner tasks each
take a task, run its items one after another, and take the next queued task until none is left.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import itertools
import queue
import sys
import threading
import time
import traceback
from collections import deque

from .._worker import CallerInterrupt, callable_name, caller_interrupts, is_async
from ..errors import TaskTimeout
from .base import Backend, Done, Fatal, Started

DEFAULT_WORKERS = 100          # as aiohttp's default connection limit
KILL_GRACE_SECONDS = 1.0       # how long cancelled coroutines get to unwind on close
_runner_names = itertools.count(1)


class AsyncioBackend(Backend):
    name = "asyncio"
    kind = "coroutine"
    guarantees = ("timeout cancels the item's coroutine at its next await; code that never awaits "
                  "cannot be interrupted; crashes take the whole process")
    adaptive_maximum = 1024  # greenlets and coroutines are cheap: the engine's window alone limits them

    @classmethod
    def default_workers(cls) -> int:
        return DEFAULT_WORKERS

    def __init__(self, workers=None, initializer=None, initargs=(), loop=None, **options):
        """`loop`: run the coroutines on this event loop, which runs in another thread."""
        super().__init__(workers, initializer, initargs, **options)
        if loop is not None and not isinstance(loop, asyncio.AbstractEventLoop):
            raise TypeError(f"loop must be an asyncio event loop, not {type(loop).__name__}")
        self._given_loop = loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None  # the helper thread running our own loop
        self._threaded = False        # the loop runs in another thread than the engine's
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._outstanding: set = set()  # engine side: task ids submitted and not yet reported
        # Loop side: touched only by code running in the loop's thread.
        self._queue: deque = deque()
        self._runners: set = set()
        self._running: dict = {}      # task id -> runner task running it
        self._stopped: set = set()    # runners this backend cancelled: their CancelledError is ours
        self._quiet: list = []        # Started events held back until an event that wakes the engine
        self._waiter = None           # in-thread mode: the future that ends the current wait

    # ---- life cycle ---------------------------------------------------------------------
    def open(self) -> None:
        if self._loop is not None:
            return
        if self._given_loop is not None:
            if self._given_loop.is_closed():
                raise ValueError("the event loop given to backend='asyncio' is closed")
            self._loop = self._given_loop
            self._threaded = True
        else:
            self._loop = asyncio.new_event_loop()
            self._move_off_a_running_loop()
        if self.initializer is not None:
            try:
                self._run_on_loop(_call_maybe_async(self.initializer, self.initargs))
            except BaseException:  # the user's initializer, whatever it raises: the loop is closed, the error re-raised
                self.close(kill=True)
                raise

    def prepare(self, fn, timeout=None):
        if not is_async(fn):
            raise TypeError(f"backend='asyncio' runs async def functions, and {callable_name(fn)} is a plain "
                            "function. Use backend='thread' for a blocking function, or define it with "
                            "async def (a function that returns a coroutine needs an async def wrapper).")
        if self._given_loop is not None and _running_loop() is self._given_loop:
            raise ValueError("backend='asyncio' was given the event loop this thread is running, and a "
                             "synchronous call would block it; from async code use `await pmap.apmap(...)` "
                             "or `async for ... in pmap.aimap(...)`")
        if self._given_loop is None and self._loop is not None and self._loop.is_closed():
            self._loop = None  # used again after a close (a Pool after Ctrl-C): a fresh loop
            self._threaded = False
            self._outstanding.clear()
            self._queue.clear()
            self._runners.clear()
            self._running.clear()
            self._quiet.clear()
            self.open()
        self._move_off_a_running_loop()
        self.timeout = timeout
        return _Call(fn, timeout)

    def _move_off_a_running_loop(self) -> None:
        """A loop already runs in this thread: run ours in a helper thread from now on."""
        if self._threaded or _running_loop() is None:
            return
        self._thread = threading.Thread(target=self._loop.run_forever, name="pmap-asyncio-loop", daemon=True)
        self._threaded = True
        self._thread.start()

    def close(self, kill=False) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if self._given_loop is not None:  # not ours to stop: only our tasks go
            if kill:
                try:
                    loop.call_soon_threadsafe(self._cancel_all)
                except RuntimeError:  # the loop was closed meanwhile
                    pass
            return
        if not self._threaded and _running_loop() is not None:
            self._move_off_a_running_loop()  # closed from inside a running loop (a Pool in async code)
        try:
            self._run_on_loop(self._finish(kill), timeout=None if not kill else 2 * KILL_GRACE_SECONDS)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError, RuntimeError):
            pass  # tasks that outlast the grace, or a loop stopped or closed meanwhile: the loop ends below all the same
        if self._thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(KILL_GRACE_SECONDS)
            if self._thread.is_alive():
                return  # a coroutine blocks the loop's thread; the daemon thread is left behind
            self._thread = None
        loop.close()

    async def _finish(self, kill: bool) -> None:
        if kill:
            self._cancel_all()
        pending = list(self._runners)
        if pending:
            await asyncio.wait(pending, timeout=KILL_GRACE_SECONDS if kill else None)
        await self._loop.shutdown_asyncgens()

    def _run_on_loop(self, coro, timeout=None):
        """Run `coro` on our loop from the engine's thread and return its result."""
        if self._threaded:
            return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)
        return self._loop.run_until_complete(coro)

    # ---- engine side --------------------------------------------------------------------
    def capacity(self) -> int:
        # With a timeout, a task starts as soon as it is submitted (see Backend.prepare);
        # without one, a second task per runner waits queued so no runner idles between waits.
        limit = self.workers if self.timeout is not None else 2 * self.workers
        return limit - len(self._outstanding)

    def submit(self, task) -> None:
        self._outstanding.add(task.id)
        self._to_loop(self._enqueue, task)

    def cancel(self, task_id) -> None:
        if task_id in self._outstanding:
            self._outstanding.discard(task_id)
            self._to_loop(self._cancel_task, task_id)

    def wait(self, timeout):
        if self._threaded:
            return self._wait_on_queue(timeout)
        if self._events.empty():
            self._run_loop_until_event(timeout)
        return self._drain([])

    def _to_loop(self, fn, *args) -> None:
        if self._threaded:
            self._loop.call_soon_threadsafe(fn, *args)
        else:  # the loop is ours and idle between waits: call it directly
            fn(*args)

    def _run_loop_until_event(self, timeout) -> None:
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(max(0.0, timeout), _resolve, waiter)
        try:
            with caller_interrupts():
                loop.run_until_complete(waiter)
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _wait_on_queue(self, timeout) -> list:
        _raise_if_calling_task_cancelled()
        try:
            if timeout is not None and timeout <= 0:
                first = self._events.get_nowait()
            else:
                first = self._events.get(timeout=timeout)
        except queue.Empty:
            problem = self._loop_problem()
            return [Fatal(RuntimeError(problem))] if problem and self._outstanding else []
        return self._drain([first])

    def _loop_problem(self) -> str | None:
        if self._thread is not None and not self._thread.is_alive():
            return "the asyncio backend's event loop thread stopped"
        if self._given_loop is not None and (self._loop.is_closed() or not self._loop.is_running()):
            return "the event loop given to backend='asyncio' stopped running with work in flight"
        return None

    def _drain(self, events: list) -> list:
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        for event in events:
            if type(event) is Done:
                self._outstanding.discard(event.task_id)
        return events

    def abandon(self, error: BaseException) -> None:
        """Make the engine's current or next wait raise `error`: a run driven from another
        thread stops at once (thread-safe; `pmap.aimap` uses it when its reader goes away)."""
        self._events.put(Fatal(error))

    # ---- loop side ----------------------------------------------------------------------
    def _emit(self, event, wake: bool = True) -> None:
        if not wake:
            self._quiet.append(event)
            return
        for held in self._quiet:
            self._events.put(held)
        self._quiet.clear()
        self._events.put(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _enqueue(self, task) -> None:
        if len(self._runners) < self.workers:
            self._start_runner(task)
        else:
            self._queue.append(task)

    def _start_runner(self, first_task) -> None:
        runner = self._loop.create_task(self._runner(first_task), name=f"pmap-asyncio-{next(_runner_names)}")
        self._runners.add(runner)

    async def _runner(self, task) -> None:
        me = asyncio.current_task()
        name = me.get_name()
        try:
            while True:
                self._running[task.id] = me
                has_deadline = task.fn.timeout is not None
                self._emit(Started(task.id, name, time.monotonic()), wake=has_deadline)
                try:
                    values, failures, elapsed = await _run_items(task.fn, task.items, self._stopped)
                except CallerInterrupt:  # a real Ctrl-C while the loop ran in the calling thread
                    self._running.pop(task.id, None)
                    self._emit(Fatal(KeyboardInterrupt()))
                    return
                if self._running.pop(task.id, None) is me:
                    self._emit(Done(task.id, name, values, failures, elapsed))
                if not self._queue or me not in self._runners:
                    return
                task = self._queue.popleft()
        finally:
            self._runners.discard(me)
            self._stopped.discard(me)

    def _cancel_task(self, task_id) -> None:
        runner = self._running.pop(task_id, None)
        if runner is None:  # not started yet, or already done
            self._queue = deque(t for t in self._queue if t.id != task_id)
            return
        self._runners.discard(runner)
        self._stopped.add(runner)
        runner.cancel()
        if self._queue:  # a fresh runner takes the cancelled one's place
            self._start_runner(self._queue.popleft())

    def _cancel_all(self) -> None:
        self._queue.clear()
        self._running.clear()
        for runner in list(self._runners):
            self._stopped.add(runner)
            runner.cancel()

    async def cancel_and_wait(self, timeout: float = KILL_GRACE_SECONDS) -> None:
        """Cancel every task of this backend and wait for them to unwind (call on the loop)."""
        self._cancel_all()
        pending = list(self._runners)
        if pending:
            await asyncio.wait(pending, timeout=timeout)


class _Call:
    """What tasks carry: the function and the run's per-item timeout."""

    __slots__ = ("fn", "timeout")

    def __init__(self, fn, timeout):
        self.fn = fn
        self.timeout = timeout


async def _run_items(call: _Call, items: list, stopped: set):
    """The coroutine twin of `_worker.run_items`: a failing item never stops the others, and
    whatever it raises (a CancelledError of its own included) fails only that item. Only a
    cancellation of the runner by this backend (`stopped`) or a real Ctrl-C ends the task."""
    fn, seconds = call.fn, call.timeout
    values = []
    failures = []
    start = time.perf_counter()
    for pos, item in enumerate(items):
        try:
            if seconds is None:
                values.append(await fn(item))
            else:
                values.append(await _with_timeout(fn, item, seconds))
        except BaseException as exc:  # the user's coroutine fails only its item, whatever it raises; a stop goes on
            if isinstance(exc, CallerInterrupt) or (isinstance(exc, asyncio.CancelledError)
                                                    and asyncio.current_task() in stopped):
                raise
            values.append(None)
            failures.append((pos, exc, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))))
    return values, failures, time.perf_counter() - start


if sys.version_info >= (3, 11):
    async def _with_timeout(fn, item, seconds):
        scope = asyncio.timeout(seconds)
        try:
            async with scope:
                return await fn(item)
        except TimeoutError:
            if scope.expired():  # ours, not a TimeoutError the function raised itself
                raise TaskTimeout.after(seconds) from None
            raise
else:
    async def _with_timeout(fn, item, seconds):
        # asyncio.timeout is 3.11+; wait_for cannot tell its own timeout from the function's.
        inner = asyncio.ensure_future(fn(item))
        try:
            done, _ = await asyncio.wait({inner}, timeout=seconds)
        except BaseException:  # re-raised (a cancel of the caller too): only the item is cancelled
            inner.cancel()
            raise
        if done:
            return inner.result()
        inner.cancel()
        await asyncio.wait({inner})  # whatever the cancelled item raises as it unwinds, its time was up
        if not inner.cancelled():
            inner.exception()  # retrieved, so asyncio does not log it as never retrieved
        raise TaskTimeout.after(seconds)


async def _call_maybe_async(fn, args):
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


def _resolve(future) -> None:
    if not future.done():
        future.set_result(None)


def _raise_if_calling_task_cancelled() -> None:
    """A synchronous call made from a task that has since been cancelled (asyncio.run cancels
    its main task on the first Ctrl-C) stops here, as an await would."""
    loop = _running_loop()
    task = asyncio.current_task(loop) if loop is not None else None
    if task is not None and getattr(task, "cancelling", None) is not None and task.cancelling():
        raise asyncio.CancelledError()


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
