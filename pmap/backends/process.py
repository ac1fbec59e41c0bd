"""process: loky's reusable executor. Spawn-safe, the robust default for CPU-bound work.

When one worker dies, loky fails every task in flight, then kills the other workers. Which
task a worker held comes from what it said (`_procutil.Link`); whether its death was its own
comes from one look at the workers' exit codes as loky fails the first task, before it kills
the survivors: the workers already dead then are the cause.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import BrokenExecutor

from .._worker import pooled_worker_init, run_pooled_task
from ._pooled import PooledBackend
from ._procutil import describe_exit
from .base import Lost

REUSE_SECONDS = 60  # idle workers stay this long, so the next call in a script starts warm
BREAK_SECONDS = 5.0  # the longest wait for loky to see a worker ended for a timeout


class ProcessBackend(PooledBackend):
    name = "process"
    guarantees = ("hard timeout; a crash or timeout restarts loky's executor and re-runs the other "
                  "items in flight (at-least-once for those)")

    def __init__(self, workers=None, initializer=None, initargs=(), reuse_timeout=REUSE_SECONDS,
                 max_tasks_per_worker=None, **options):
        super().__init__(workers, initializer, initargs, **options)
        self.reuse_timeout = reuse_timeout
        # loky cannot retire one worker, so the whole executor is renewed after this many tasks
        self.tasks_per_executor = max_tasks_per_worker * self.workers if max_tasks_per_worker else None
        self.tasks_on_executor = 0
        self.executor = None
        self.gone_holders: dict[int, int] = {}  # task id -> pid of the worker that held it when it ended
        self.seen_lock = threading.Lock()  # `seen` is read from loky's thread when a task fails
        self.last_break = None  # (loky's error, its workers' exit codes when it failed the first task)

    @classmethod
    def is_warm(cls, workers: int) -> bool:
        """Whether loky's reusable executor already runs `workers` workers: a run then starts
        no process."""
        try:
            from loky import reusable_executor
            executor = getattr(reusable_executor._executor_storage, "executor", None)
            return (executor is not None and not executor._flags.broken and not executor._flags.shutdown
                    and executor._max_workers == workers)
        except (ImportError, AttributeError):  # loky's internals moved: assume a cold start
            return False

    def open(self) -> None:
        self._executor()

    def _executor(self):
        if self.executor is None:
            from loky import get_reusable_executor  # a broken or shut down executor is replaced
            self.executor = get_reusable_executor(
                max_workers=self.workers, timeout=self.reuse_timeout,
                initializer=pooled_worker_init, initargs=(self.initializer_bytes(), os.getpid()))
            self.tasks_on_executor = 0
            self.ended_pids.clear()
        return self.executor

    def capacity(self) -> int:
        if self.tasks_per_executor and self.tasks_on_executor >= self.tasks_per_executor:
            if self.inflight:
                return 0  # let the executor drain, then renew it
            self.executor.shutdown(wait=True)
            self.executor = None
            self._executor()
        return super().capacity()

    def _send(self, task_id, payload) -> None:
        self.tasks_on_executor += 1
        try:
            future = self._executor().submit(run_pooled_task, payload)
        except BrokenExecutor as exc:  # a worker died since wait() last looked: this task never ran
            self.executor = None  # the next task gets a new executor
            self._report_error(task_id, exc)
            return
        self._remember_workers()  # now, so their exit codes outlive loky's clean-up
        future.add_done_callback(lambda done: self._future_done(task_id, done))

    def _future_done(self, task_id, future) -> None:
        # loky's thread; the result itself came over the worker's link
        error = None if future.cancelled() else future.exception()
        if error is None:
            return
        exitcodes = None
        if isinstance(error, BrokenExecutor):
            if self.last_break is None or self.last_break[0] is not error:
                with self.seen_lock:  # before loky kills the survivors: see the module's docstring
                    exitcodes = {pid: proc.exitcode for pid, proc in self.seen.items()}
                self.last_break = (error, exitcodes)
            exitcodes = self.last_break[1]
        self._report_error(task_id, error, exitcodes)

    def _current_processes(self) -> list:
        # `executor._processes`, private to loky (checked with loky 3.7): its worker Process
        # objects, for their exit codes
        executor = self.executor
        return list(executor._processes.values()) if executor is not None else []

    def _remember_workers(self) -> None:
        processes = {proc.pid: proc for proc in self._current_processes()}
        with self.seen_lock:
            self.seen = processes

    def _ended(self, pid, link, proc) -> list:
        held = link.held() if link is not None else None
        if held in self.inflight:
            self.gone_holders[held] = pid  # loky fails its future too: _task_error reports it
        return []

    def _task_error(self, task_id, error, exitcodes) -> list:
        if not isinstance(error, BrokenExecutor):
            return super()._task_error(task_id, error, exitcodes)
        holder = self._holder(task_id)
        if holder is not None:
            self.later.extend(self._read(holder))  # its result may have come just before
            if task_id not in self.inflight:
                return []
        self.inflight.discard(task_id)
        gone = self.gone_holders.pop(task_id, None)
        pid = holder.pid if holder is not None and holder.held() == task_id else gone
        exitcode = (exitcodes or {}).get(pid)
        if exitcode is None:
            # never started, or its worker was still alive when loky failed it: loky killed it
            return [Lost(task_id, pid, None, f"collateral: {type(error).__name__}", blame=False)]
        return [Lost(task_id, pid, exitcode, describe_exit(exitcode), blame=True)]

    def interrupt(self, task_id, position):
        executor, ended = self.executor, len(self.ended_pids)
        events = super().interrupt(task_id, position)
        if executor is not None and len(self.ended_pids) > ended:
            # loky breaks the executor once it sees the worker gone: the tasks sent from now on
            # (the rest of the chunk, a retry) go to a new one, rather than die with the old one
            deadline = time.monotonic() + BREAK_SECONDS
            while not _broken(executor) and time.monotonic() < deadline:
                time.sleep(0.01)
            self.executor = None
        return events

    def close(self, kill=False) -> None:
        executor, self.executor = self.executor, None
        if executor is not None and (kill or self.inflight):
            executor.shutdown(wait=True, kill_workers=True)
        self.gone_holders.clear()
        super().close(kill)


def _broken(executor) -> bool:
    # `_flags.broken`, private to loky (checked with loky 3.7; `is_warm` reads it too)
    flags = getattr(executor, "_flags", None)
    return flags is None or bool(flags.broken)
