"""pool: the standard library's multiprocessing.Pool, with an explicit start method.

The Pool starts, feeds and replaces the workers; results, log records and which task a worker
holds come over pmap's own connections (`_pooled`). The Pool's queues are each a pipe shared
by every worker under one lock; a worker killed while it held one (waiting for a task, or
writing its reply) kept it for ever, and every other worker, and Pool.terminate, then waited
for ever too (CPython bpo-29759). Here the workers' locks are ones the kernel releases when
their holder dies (`KernelLock`), and a worker's reply to the Pool is one small write.
"""
from __future__ import annotations

import fcntl
import multiprocessing
import multiprocessing.pool
import os
import sys
import threading
import time

from .._worker import UNGUARDED_MAIN, UNGUARDED_MAIN_EXIT, pooled_worker_init, run_pooled_task
from ._pooled import PooledBackend
from ._procutil import describe_exit, end_process_group
from ..errors import BackendUnavailable
from .base import Fatal, Lost

REAP_WAIT_SECONDS = 1.0  # the Pool's own thread reaps a dead worker as soon as it sees it end
KILL_GRACE_SECONDS = 0.05  # a killed worker's time to end before SIGKILL


def default_start_method() -> str:
    # Chosen explicitly so that Python 3.14's change of the platform default changes nothing.
    return "forkserver" if sys.platform.startswith("linux") else "spawn"


class KernelLock:
    """A lock between processes that the kernel releases when its holder dies (flock(2)), and
    between the threads of one process; only what the Pool's queues ask of a lock (a blocking
    acquire, release). Each process opens the file itself, since flock excludes open files,
    not processes: pickled (spawn, forkserver) it travels as its path, and a forked copy opens
    the file again on first use. The file is opened at once where the lock is made, so the
    Pool's own clean-up still has it after the run's folder is gone."""

    def __init__(self, path: str):
        self.path = path
        self._pid: int | None = None
        self._fd = -1
        self._file()

    def __reduce__(self):
        return (KernelLock, (self.path,))

    def _file(self) -> int:
        if self._pid != os.getpid():  # new here (unpickled, or forked with its parent's file)
            if self._pid is not None:
                os.close(self._fd)  # the parent's: a lock it holds stays held
            self._threads = threading.Lock()
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid = os.getpid()
        return self._fd

    def acquire(self) -> bool:
        fd = self._file()
        self._threads.acquire()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:  # re-raised (a Ctrl-C in flock too): only the slot is undone
            self._threads.release()
            raise
        return True

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._threads.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __del__(self) -> None:
        if self._pid == os.getpid():
            os.close(self._fd)


class _Pool(multiprocessing.pool.Pool):
    """multiprocessing.Pool whose workers take KernelLocks on the queues they share.

    Private parts of multiprocessing it relies on (the same in CPython 3.8 to 3.14; run on
    3.11, read in the main branch's source): the hook `Pool._setup_queues`, which makes the
    queues before any worker starts, and the attributes `SimpleQueue._rlock` (the lock workers
    take to read a task) and `SimpleQueue._wlock` (the lock they take to write a reply)."""

    def __init__(self, lock_dir: str, *args, **kwargs):
        self._lock_dir = lock_dir
        super().__init__(*args, **kwargs)

    def _setup_queues(self) -> None:
        super()._setup_queues()
        self._inqueue._rlock = KernelLock(os.path.join(self._lock_dir, "tasks.lock"))
        self._outqueue._wlock = KernelLock(os.path.join(self._lock_dir, "replies.lock"))


class PoolBackend(PooledBackend):
    name = "pool"
    guarantees = "hard timeout (worker killed, the pool replaces it); a crash costs only its worker's items"

    def __init__(self, workers=None, initializer=None, initargs=(), start_method=None,
                 max_tasks_per_worker=None, **options):
        super().__init__(workers, initializer, initargs, **options)
        method = start_method or default_start_method()
        if method not in multiprocessing.get_all_start_methods():
            raise ValueError(f"start_method must be one of {', '.join(multiprocessing.get_all_start_methods())}, "
                             f"got {method!r}")
        self.start_method = method
        self.max_tasks = max_tasks_per_worker
        self.pool = None
        self.orphaned = False  # a task died with its worker: Pool.join() would wait for it forever
        self.start_failures = 0
        self.buried: dict[int, object] = {}  # pid -> Process of workers whose end is handled, until the pool lets go

    def open(self) -> None:
        if self.pool is None:
            self.pool = _Pool(self.run_dir, self.workers, initializer=pooled_worker_init,
                              initargs=(self.initializer_bytes(), os.getpid()),
                              maxtasksperchild=self.max_tasks, context=multiprocessing.get_context(self.start_method))

    def _send(self, task_id, payload) -> None:
        self.pool.apply_async(run_pooled_task, (payload,),
                              error_callback=lambda error: self._report_error(task_id, error))

    def _current_processes(self) -> list:
        # `Pool._pool`, private: the Pool's worker Process objects, the only way to a worker's
        # exit code under forkserver (the workers are the server's children, not ours)
        return list(self.pool._pool) if self.pool is not None else []

    def _watched_processes(self) -> list:
        current = self._current_processes()
        pids = {proc.pid for proc in current}
        for pid in [pid for pid in self.buried if pid not in pids]:
            del self.buried[pid]  # the pool has let go of it too
        for proc in current:
            if proc.pid not in self.buried:
                self.seen.setdefault(proc.pid, proc)
        return list(self.seen.values())  # a worker's end is handled once: its pid goes to `buried`

    def _exitcode(self, proc) -> int | None:
        # Let the Pool's own thread reap it: two threads polling one forkserver Popen race,
        # and the loser records exit code 255 over the real one.
        deadline = time.monotonic() + REAP_WAIT_SECONDS
        while self.pool is not None and proc in self.pool._pool and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.pool is None or proc in self.pool._pool:
            proc.join(0)
        return proc.exitcode

    def _known_processes(self) -> list:
        return [*self.seen.values(), *filter(None, self.buried.values())]

    def _ended(self, pid, link, proc) -> list:
        first = pid is not None and pid not in self.buried  # its connection and its process both end
        if first:
            self.buried[pid] = self.seen.pop(pid, None) or proc
        proc = self.buried.get(pid)
        exitcode = self._exitcode(proc) if proc is not None else None
        held = link.held() if link is not None else None
        if held in self.inflight:
            self.inflight.discard(held)
            self.orphaned = True
            return [Lost(held, pid, exitcode, describe_exit(exitcode), blame=True)]
        if exitcode == UNGUARDED_MAIN_EXIT:  # the script has no __main__ guard: say so at once
            return [Fatal(BackendUnavailable(UNGUARDED_MAIN.format(backend=self.name)))]
        if first and exitcode not in (0, None) and pid not in self.ended_pids:
            # Died without a task (at start?): the pool would start it again and again, forever.
            self.start_failures += 1
            if self.start_failures > 2 * self.workers:
                error = BackendUnavailable(
                    f"backend 'pool' cannot start its workers (each died at start, {describe_exit(exitcode)}); "
                    f"with start_method={self.start_method!r} the main module must be importable from a file, "
                    "or use start_method='fork' or backend='process'")
                return [Fatal(error)]
        return []

    def _frames(self, link, frames=None) -> list:
        events = super()._frames(link, frames)
        if events:
            self.start_failures = 0  # workers do run tasks: earlier deaths were not start failures
        return events

    def cancel(self, task_id) -> None:
        self.orphaned = self.orphaned or task_id in self.inflight
        super().cancel(task_id)

    def interrupt(self, task_id, position):
        self.orphaned = self.orphaned or task_id in self.inflight
        return super().interrupt(task_id, position)

    def close(self, kill=False) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            if kill:  # Pool.terminate only signals its workers: what they started would outlive them
                for proc in list(pool._pool):
                    end_process_group(proc.pid, alive=proc.is_alive, grace=KILL_GRACE_SECONDS)
            if kill or self.inflight or self.orphaned:
                pool.terminate()
            else:
                pool.close()
            pool.join()
        super().close(kill)
