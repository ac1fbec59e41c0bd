"""process: loky's reusable executor. Spawn-safe, the robust default for CPU-bound work."""
from __future__ import annotations

import os
import time
from concurrent.futures import BrokenExecutor

from .._worker import pooled_worker_init, run_pooled_task
from ._procutil import describe_exit
from ._pooled import PooledBackend
from .base import Lost

REUSE_SECONDS = 60  # idle workers stay this long, so the next call in a script starts warm
SIGKILL_EXIT = -9


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
        self.first_death: dict[int, float] = {}

    @classmethod
    def is_warm(cls, workers: int) -> bool:
        """Whether loky's reusable executor already runs `workers` workers: a run then starts
        no process."""
        try:
            from loky import reusable_executor
            executor = getattr(reusable_executor._executor_storage, "executor", None)
            return _running(executor) and executor._max_workers == workers
        except (ImportError, AttributeError):  # loky's internals moved: assume a cold start
            return False

    def open(self) -> None:
        self._executor()

    def _executor(self):
        if not _running(self.executor):
            from loky import get_reusable_executor
            init_bytes = self.initializer_bytes()
            self.executor = get_reusable_executor(
                max_workers=self.workers, timeout=self.reuse_timeout,
                initializer=pooled_worker_init, initargs=(init_bytes, os.getpid()))
            self.known.clear()
            self.tasks_on_executor = 0
            self.first_death.clear()
            self.ended_pids.clear()
            self.dead_pids.clear()
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
        on_result = self._result_callback(task_id)
        try:
            future = self._executor().submit(run_pooled_task, payload)
        except BrokenExecutor as exc:  # a worker died since wait() last looked: this task never ran
            on_result(exc)
            return
        self._processes()  # remember the workers now, so their exit codes outlive loky's cleanup
        future.add_done_callback(lambda f: on_result(f.exception() or f.result()))

    def _current_processes(self) -> list:
        return list(self.executor._processes.values()) if self.executor is not None else []

    def _worker_died(self, proc, seen_at) -> list:
        self.first_death.setdefault(proc.pid, seen_at)
        return []  # loky breaks the executor; its futures then report, see _task_error

    def _task_error(self, task_id, error) -> list:
        pid = self.marker_pid(task_id)
        culprit = self._culprit()
        proc = self.known.get(pid)
        exitcode = proc.exitcode if proc is not None else None
        blame = pid is not None and pid == culprit
        reason = describe_exit(exitcode) if blame else f"collateral: {type(error).__name__}"
        return [Lost(task_id, pid, exitcode, reason, blame=blame)]

    def _culprit(self) -> int | None:
        """The worker whose death broke the executor: one we ended, else the first seen dead,
        else the one that did not die by loky's own SIGKILL of the survivors."""
        if self.ended_pids:
            return next(iter(self.ended_pids))
        if self.first_death:
            first = min(self.first_death.values())
            seen_first = [pid for pid, seen_at in self.first_death.items() if seen_at == first]
            if len(seen_first) == 1:
                return seen_first[0]
            # Several seen dead at one look (loky had already killed the survivors): which died
            # first is unknown, and blaming the wrong one fails an innocent item.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            codes = {pid: p.exitcode for pid, p in self.known.items()}
            odd = [pid for pid, code in codes.items() if code is not None and code != SIGKILL_EXIT]
            if odd:
                return odd[0]
            if all(code is not None for code in codes.values()):
                break
            time.sleep(0.01)
        return None

    def close(self, kill=False) -> None:
        executor, self.executor = self.executor, None
        if executor is not None and (kill or self.inflight):
            executor.shutdown(wait=True, kill_workers=True)
        super().close(kill)


def _running(executor) -> bool:
    return executor is not None and not executor._flags.broken and not executor._flags.shutdown
