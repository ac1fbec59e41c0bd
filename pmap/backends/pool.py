"""pool: the standard library's multiprocessing.Pool, with an explicit start method.

The Pool starts, feeds and replaces the workers; results, log records and which task a worker
holds come over pmap's own connections (`_pooled`)."""
from __future__ import annotations

import multiprocessing
import os
import select
import sys
import threading
import time

from .._worker import pooled_worker_init, run_pooled_task
from ._pooled import PooledBackend
from ._procutil import describe_exit
from ..errors import BackendUnavailable
from .base import Fatal, Lost

REAP_WAIT_SECONDS = 1.0  # the Pool's own thread reaps a dead worker as soon as it sees it end
STUCK_LOCK_SECONDS = 0.5  # a live writer holds the result queue's lock for one message (once the pipe has room)
STUCK_LOCK_TRIES = 3


def default_start_method() -> str:
    # Chosen explicitly so that Python 3.14's change of the platform default changes nothing.
    return "forkserver" if sys.platform.startswith("linux") else "spawn"


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
            ctx = multiprocessing.get_context(self.start_method)
            self.pool = ctx.Pool(self.workers, initializer=pooled_worker_init,
                                 initargs=(self.initializer_bytes(), os.getpid()),
                                 maxtasksperchild=self.max_tasks)

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
        if link is not None and link.task in self.inflight:
            self.inflight.discard(link.task)
            self.orphaned = True
            return [Lost(link.task, pid, exitcode, describe_exit(exitcode), blame=True)]
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

    def _frames(self, link) -> list:
        events = super()._frames(link)
        if events:
            self.start_failures = 0  # workers do run tasks: earlier deaths were not start failures
        return events

    def cancel(self, task_id) -> None:
        self.orphaned = self.orphaned or task_id in self.inflight
        super().cancel(task_id)

    def close(self, kill=False) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            if kill or self.inflight or self.orphaned:
                terminate_without_hanging(pool)
            else:
                pool.close()
            pool.join()
        super().close(kill)


def terminate_without_hanging(pool) -> None:
    """Pool.terminate, minus its two hangs. The Pool's own thread and terminate() itself each
    write a closing sentinel to the result queue, and wait forever when (1) a worker killed while
    it wrote a result keeps the queue's write lock (CPython bpo-29759), or (2) the result pipe is
    full: the Pool's result thread stops reading once terminate starts, while the workers still
    run and write results, holding the lock."""
    done = threading.Event()
    rescuer = threading.Thread(target=_unblock_result_writers, args=(pool, done),
                               name="pmap-pool-terminate", daemon=True)
    rescuer.start()
    try:
        pool.terminate()
    finally:
        done.set()
        rescuer.join()


def _unblock_result_writers(pool, done: threading.Event) -> None:
    # While the pool terminates no result is wanted any more. Once the Pool's result thread has
    # stopped reading, the pipe is emptied as it fills; a lock held across several tries while
    # nothing more arrives is then a dead (or dying) worker's, and is released.
    queue = pool._outqueue
    lock = queue._wlock
    if lock is None:  # Windows writes without a lock
        return
    failed_tries = 0
    while not done.is_set():
        if not pool._result_handler.is_alive() and _discard_unread(queue._reader.fileno()):
            failed_tries = 0  # a writer is making progress
        if lock.acquire(timeout=STUCK_LOCK_SECONDS):
            lock.release()
            failed_tries = 0
            done.wait(0.05)
            continue
        failed_tries += 1
        if failed_tries >= STUCK_LOCK_TRIES and not done.is_set():
            try:
                lock.release()
            except ValueError:  # freed meanwhile
                pass
            failed_tries = 0


def _discard_unread(fd: int) -> bool:
    """Read and drop whatever waits in the pipe; nobody reads it any more. Whether anything did."""
    discarded = False
    try:
        while select.select([fd], [], [], 0)[0]:
            if not os.read(fd, 1 << 16):
                break  # every writer has gone
            discarded = True
    except (OSError, ValueError):  # closed meanwhile
        pass
    return discarded
