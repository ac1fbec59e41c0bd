"""process: loky's reusable executor. Spawn-safe, the robust default for CPU-bound work.

When one worker dies, loky fails every task in flight, then kills the other workers. Which
task a worker held comes from what it said (`_procutil.Link`); whether its death was its own
comes from one look at the workers' exit codes as loky fails the first task, before it kills
the survivors: the workers already dead then are the cause.
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from concurrent.futures import BrokenExecutor

from .._worker import pooled_worker_init, run_pooled_task
from ._pooled import PooledBackend
from ._procutil import describe_exit, process_exists
from .base import Lost

REUSE_SECONDS = 60  # idle workers stay this long, so the next call in a script starts warm
BREAK_SECONDS = 5.0  # the longest wait for loky to see a worker ended for a timeout
# start_method="forkserver": workers forked from multiprocessing's fork server, which imports
# these once, cost a fork rather than an interpreter's start and loky's imports (about 0.1 s of
# CPU each; bench/startup.py). Not the default: the server and each worker import the main
# module, which then needs `if __name__ == "__main__":` as with spawn; loky's own method does not.
WORKER_MODULES = ("loky.process_executor", "pmap._worker", "pmap.native")
START_METHODS = ("loky", "loky_init_main", "spawn", "forkserver")


def _preload_worker_modules() -> None:
    """Add pmap's worker modules to the fork server's preload list, keeping what is on it
    (`__main__` by default, or the caller's own list). Has no effect on a server already running."""
    import multiprocessing
    from multiprocessing import forkserver
    # the list itself is private to multiprocessing; without it, keep its default
    current = list(getattr(getattr(forkserver, "_forkserver", None), "_preload_modules", None) or ["__main__"])
    wanted = list(dict.fromkeys([*current, *WORKER_MODULES]))
    if wanted != current:
        multiprocessing.set_forkserver_preload(wanted)


class ProcessBackend(PooledBackend):
    name = "process"
    guarantees = ("hard timeout; a crash or timeout restarts loky's executor and re-runs the other "
                  "items in flight (at-least-once for those)")

    def __init__(self, workers=None, initializer=None, initargs=(), reuse_timeout=REUSE_SECONDS,
                 max_tasks_per_worker=None, start_method=None, **options):
        super().__init__(workers, initializer, initargs, **options)
        if start_method is not None and start_method not in START_METHODS:
            raise ValueError(f"start_method must be one of {', '.join(START_METHODS)}, got {start_method!r}")
        self.start_method = start_method or "loky"
        self.reuse_timeout = reuse_timeout
        # loky cannot retire one worker, so the whole executor is renewed after this many tasks
        self.tasks_per_executor = max_tasks_per_worker * self.workers if max_tasks_per_worker else None
        self.tasks_on_executor = 0
        self.executor = None
        self.gone_holders: dict[int, int] = {}  # task id -> pid of the worker that held it when it ended
        self.seen_lock = threading.Lock()  # `seen` is read from loky's thread when a task fails
        self.last_break = None  # (loky's error, its workers' exit codes when it failed the first task)
        self.worker_pids: set[int] = set()  # workers of the current executor that ran a task
        self.futures: dict = {}  # task id -> loky's future, until it is done

    # What the last run in this process left running, by our own bookkeeping (loky's is private):
    # (this process's pid, workers, the initializer, the workers' pids, when it ended, their idle limit)
    _left_running: tuple | None = None

    @classmethod
    def is_warm(cls, workers: int, initializer=None) -> bool:
        """Whether a run with `workers` workers (and `initializer`) would find loky's executor
        running: the last run in this process ended cleanly with as many, the same initializer
        and loky's start method, less than the workers' idle limit ago, and every worker it saw
        is still alive (one that never got a task started all the same). A run then starts no
        process."""
        left = cls._left_running
        if left is None:
            return False
        pid, count, init, pids, ended, idle_limit = left
        return (pid == os.getpid() and count == workers and init is initializer and bool(pids)
                and time.monotonic() - ended < idle_limit and all(process_exists(p) for p in pids))

    def open(self) -> None:
        self._executor()

    def _executor(self):
        if self.executor is None:
            from loky import get_reusable_executor  # a broken or shut down executor is replaced
            if self.start_method == "forkserver":
                _preload_worker_modules()
            self.executor = get_reusable_executor(
                max_workers=self.workers, timeout=self.reuse_timeout, context=self.start_method,
                initializer=pooled_worker_init, initargs=(self.initializer_bytes(), os.getpid()))
            self.tasks_on_executor = 0
            self.ended_pids.clear()
            self.worker_pids = set()
            # Workers and loky's manager thread start now, not at the first task: loky's exit hook
            # is then registered before an Executor's, which must run first (see
            # pmap.executor._watch_exit). `_ensure_executor_running` is private to loky (its submit
            # calls it; checked with loky 3.4.1 and 3.7.0); without it they start at the first task.
            ensure_running = getattr(self.executor, "_ensure_executor_running", None)
            if ensure_running is not None:
                ensure_running()
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
        from loky.process_executor import ShutdownExecutorError
        self.tasks_on_executor += 1
        try:
            try:
                future = self._executor().submit(run_pooled_task, payload)
            except ShutdownExecutorError:  # another run shut loky's shared executor down: a new one takes it
                self.executor = None
                future = self._executor().submit(run_pooled_task, payload)
        except BrokenExecutor as exc:  # a worker died since wait() last looked: this task never ran
            self.executor = None  # the next task gets a new executor
            self._report_error(task_id, exc)
            return
        except ShutdownExecutorError as exc:  # shut down again at once: never ran
            self.executor = None
            self._report_error(task_id, BrokenExecutor(str(exc)))
            return
        self._remember_workers()  # now, so their exit codes outlive loky's clean-up
        self.futures[task_id] = future
        future.add_done_callback(lambda done: self._future_done(task_id, done))

    def _future_done(self, task_id, future) -> None:
        # loky's thread; the result itself came over the worker's link
        self.futures.pop(task_id, None)
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
        # loky's worker Process objects, for their exit codes: `executor._processes`, private to
        # loky (checked with loky 3.4.1 and 3.7.0). The public multiprocessing.active_children()
        # would join them from this thread, racing loky's thread for a dead worker's status (a
        # forkserver worker's then reads as 255, a loky worker's as still running).
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
            # loky breaks the executor once it sees the worker gone, then fails the futures of the
            # tasks in flight, this one's among them: the tasks sent from now on (the rest of the
            # chunk, a retry) go to a new one, rather than die with the old one
            future = self.futures.get(task_id)
            if future is not None:
                concurrent.futures.wait([future], timeout=BREAK_SECONDS)
            self.executor = None
        return events

    def _frames(self, link, frames=None) -> list:
        events = super()._frames(link, frames)
        if link.pid is not None:  # known once the worker has said who it is
            self.worker_pids.add(link.pid)
        return events

    def close(self, kill=False) -> None:
        executor, self.executor = self.executor, None
        if executor is not None and (kill or self.inflight):
            executor.shutdown(wait=True, kill_workers=True)
        # what auto reads (is_warm): only a clean end with loky's own method leaves its workers for the next run
        clean = executor is not None and not kill and not self.inflight and self.start_method == "loky"
        ProcessBackend._left_running = None if not clean else (
            os.getpid(), self.workers, self.initializer, frozenset(self.worker_pids), time.monotonic(),
            self.reuse_timeout)
        self.gone_holders.clear()
        super().close(kill)

