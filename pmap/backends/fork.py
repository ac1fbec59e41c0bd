"""fork: our own os.fork workers, one pipe each. The function is inherited, not pickled."""
from __future__ import annotations

import itertools
import multiprocessing
import multiprocessing.connection
import pickle
import threading
import time
import traceback
import warnings

import cloudpickle

from .._worker import WORKER_CATCH, become_worker_process, dumps, encode_result, loads, run_items
from ..errors import warn_user
from ._procutil import describe_exit, end_process_group
from .base import Backend, Done, Fatal, Lost, Started, fork_supported

_FATAL = "fatal"
_warned_threads = False
_JOIN_SECONDS = 1.0


def _worker_main(conn, functions, initializer, initargs, max_tasks):
    become_worker_process()
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as exc:
            conn.send_bytes(cloudpickle.dumps((_FATAL, exc, traceback.format_exc())))
            return
    done = 0
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the parent has gone
        kind, key, payload = loads(message)
        if kind == "fn":
            functions[key] = loads(payload)
            continue
        if kind == "stop":
            return
        values, failures, elapsed = run_items(functions[key], payload[1], catch=WORKER_CATCH)
        conn.send_bytes(encode_result(payload[0], values, failures, elapsed))
        done += 1
        if max_tasks and done >= max_tasks:
            return  # recycled: the parent starts a fresh worker


class _Worker:
    __slots__ = ("proc", "conn", "task_id", "tasks_done", "retiring")

    def __init__(self, proc, conn):
        self.proc = proc
        self.conn = conn
        self.task_id = None
        self.tasks_done = 0
        self.retiring = False  # reached max_tasks_per_worker: it exits, takes no more tasks

    @property
    def pid(self):
        return self.proc.pid


class ForkBackend(Backend):
    name = "fork"
    kind = "process"
    hard_timeout = True
    guarantees = "hard timeout (worker killed and replaced); a crash costs only the items its worker held"

    @classmethod
    def unavailable_reason(cls):
        if not fork_supported():
            return "this platform has no os.fork (use backend='process')"
        return None

    def __init__(self, workers=None, initializer=None, initargs=(), max_tasks_per_worker=None, **options):
        super().__init__(workers, initializer, initargs, **options)
        reason = self.unavailable_reason()
        if reason:
            from ..errors import BackendUnavailable
            raise BackendUnavailable(f"backend 'fork' is unavailable: {reason}")
        self.max_tasks = max_tasks_per_worker
        self.ctx = multiprocessing.get_context("fork")
        self.functions: dict[int, object] = {}   # inherited by every worker forked later
        self.keys = itertools.count()
        self.workers_list: list[_Worker] = []
        self.by_task: dict[int, _Worker] = {}
        self.events: list = []
        self.bytes_sent = 0
        self.bytes_received = 0

    # ---- workers ---------------------------------------------------------------------
    def _fork(self) -> _Worker:
        self._warn_if_threaded()
        parent_end, child_end = multiprocessing.Pipe(duplex=True)
        proc = self.ctx.Process(target=_worker_main, daemon=True, name="pmap-fork-worker",
                                args=(child_end, self.functions, self.initializer, self.initargs, self.max_tasks))
        with warnings.catch_warnings():
            # Python 3.12+ warns on every fork of a threaded process; we warn once ourselves.
            warnings.filterwarnings("ignore", message=".*use of fork\\(\\) may lead to deadlocks.*",
                                    category=DeprecationWarning)
            proc.start()
        child_end.close()
        worker = _Worker(proc, parent_end)
        self.workers_list.append(worker)
        return worker

    def _warn_if_threaded(self) -> None:
        global _warned_threads
        if _warned_threads or threading.active_count() <= 1:
            return
        _warned_threads = True  # once per process: the risk is the same on every fork
        warn_user(
            f"pmap: the fork backend is forking a process that runs {threading.active_count() - 1} other "
            "thread(s); a lock one of them holds at that moment stays locked in the worker. "
            "Use backend='process' if a run hangs.")

    def _retire(self, worker: _Worker) -> None:
        self.workers_list.remove(worker)
        worker.conn.close()
        worker.proc.join(0)

    def open(self) -> None:
        pass  # workers are forked in prepare(), once the function exists to be inherited

    def prepare(self, fn, timeout=None):
        self.timeout = timeout
        for key, known in self.functions.items():
            if known is fn:
                break
        else:
            key = next(self.keys)
            self.functions[key] = fn
            if self.workers_list:
                self._teach(key, fn)
        while len(self.workers_list) < self.workers:
            self._fork()
        return key

    def _teach(self, key, fn) -> None:
        """Running workers predate `fn`: send it, or fork them anew if it cannot be pickled."""
        try:
            message = pickle.dumps(("fn", key, cloudpickle.dumps(fn)))
        except Exception:
            self.close(kill=True)
            return
        for worker in list(self.workers_list):
            try:
                worker.conn.send_bytes(message)
            except OSError:
                pass  # it died: wait() reports it

    # ---- tasks -----------------------------------------------------------------------
    def capacity(self) -> int:
        return sum(1 for w in self.workers_list if w.task_id is None and not w.retiring)

    def submit(self, task) -> None:
        message = dumps(("task", task.fn, (task.id, task.items)))
        for worker in self.workers_list:
            if worker.task_id is None and not worker.retiring:
                break
        else:
            raise RuntimeError("fork backend: submit() with no idle worker")
        worker.conn.send_bytes(message)
        self.bytes_sent += len(message)
        worker.task_id = task.id
        self.by_task[task.id] = worker
        self.events.append(Started(task.id, worker.pid, time.monotonic()))

    def wait(self, timeout):
        events, self.events = self.events, []
        if events:
            timeout = 0
        handles = {}
        for worker in self.workers_list:
            handles[worker.conn] = worker
            handles[worker.proc.sentinel] = worker
        ready = multiprocessing.connection.wait(list(handles), timeout) if handles else []
        if not handles and timeout:
            time.sleep(timeout)
        dead = []
        for handle in ready:
            worker = handles[handle]
            if handle is worker.conn:
                try:
                    events.append(self._decode(worker, worker.conn.recv_bytes()))
                except (EOFError, OSError):
                    dead.append(worker)
        for handle in ready:
            worker = handles[handle]
            if handle is worker.proc.sentinel and worker not in dead:
                try:
                    while worker.conn.poll():  # what it sent before exiting still counts
                        events.append(self._decode(worker, worker.conn.recv_bytes()))
                except (EOFError, OSError):
                    pass
                dead.append(worker)
        for worker in dead:
            events.extend(self._bury(worker))
        return events

    def _decode(self, worker, message):
        self.bytes_received += len(message)
        decoded = loads(message)
        if decoded[0] == _FATAL:
            _, exc, tb = decoded
            from ..errors import RemoteTraceback
            exc.__cause__ = RemoteTraceback(tb)
            return Fatal(exc)
        task_id, values, failures, elapsed = decoded
        worker.task_id = None
        worker.tasks_done += 1
        worker.retiring = bool(self.max_tasks) and worker.tasks_done >= self.max_tasks
        self.by_task.pop(task_id, None)
        return Done(task_id, worker.pid, values, failures, elapsed)

    def _bury(self, worker: _Worker) -> list:
        """A worker exited: report its task lost and start a replacement."""
        worker.proc.join(_JOIN_SECONDS)
        exitcode = worker.proc.exitcode
        self._retire(worker)
        events = []
        if worker.task_id is not None:
            self.by_task.pop(worker.task_id, None)
            events.append(Lost(worker.task_id, worker.pid, exitcode, describe_exit(exitcode), blame=True))
        if len(self.workers_list) < self.workers and self.functions:
            self._fork()
        return events

    def cancel(self, task_id) -> None:
        worker = self.by_task.pop(task_id, None)
        if worker is None:
            return
        end_process_group(worker.pid, alive=worker.proc.is_alive)
        self._retire(worker)
        self._fork()

    def close(self, kill=False) -> None:
        workers, self.workers_list = self.workers_list, []
        if not kill:
            for worker in workers:
                try:
                    worker.conn.send_bytes(pickle.dumps(("stop", None, None)))
                except OSError:
                    pass
            deadline = time.monotonic() + _JOIN_SECONDS
            for worker in workers:
                worker.proc.join(max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.proc.is_alive():
                end_process_group(worker.pid, alive=worker.proc.is_alive, grace=0.05 if kill else 0.2)
            worker.proc.join(_JOIN_SECONDS)
            worker.conn.close()
        self.by_task.clear()
        self.events = []
