"""Shared machinery of the backends built on an existing process pool (loky, multiprocessing).

Tasks travel as bytes; results come back through the pool's callbacks into a queue, and a
pipe wakes `wait()`, which also watches the worker processes' sentinels so a death is seen
at once. Each running task leaves a marker file naming its worker's pid.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import multiprocessing.connection
import os
import queue
import shutil
import tempfile
import time

import cloudpickle

from .._worker import dumps, loads
from ..errors import FunctionNotPicklable
from ._procutil import process_exists, end_process_group
from .base import Backend, Done, Lost, threads_are_greenlets

_SHM = "/dev/shm"
SWEEP_SECONDS = 0.5  # how often wait() double-checks that running tasks' workers exist


def pickle_function(fn, backend_name: str) -> bytes:
    try:
        return cloudpickle.dumps(fn)
    except Exception as exc:
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        raise FunctionNotPicklable(
            f"backend {backend_name!r} cannot send function {name} to its worker processes: "
            f"{type(exc).__name__}: {exc}. Use backend='thread', or backend='fork' which inherits "
            "the function instead of pickling it") from exc


class PooledBackend(Backend):
    kind = "process"
    reports_start = False  # a task starts when submitted: the pool holds at most `workers` under a timeout

    @classmethod
    def unavailable_reason(cls):
        if threads_are_greenlets():
            return ("gevent has monkey-patched threading in this process, and the pool's own threads "
                    "then stall (use backend='fork', 'greenlet' or 'thread')")
        return None

    def __init__(self, workers=None, initializer=None, initargs=(), **options):
        super().__init__(workers, initializer, initargs, **options)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.wake_r, self.wake_w = multiprocessing.Pipe(duplex=False)
        self.inflight: set[int] = set()
        self.start_dir = tempfile.mkdtemp(prefix="pmap-", dir=_SHM if os.path.isdir(_SHM) else None)
        self.fn_key = None
        self.fn_bytes = None
        self.dead_pids: set[int] = set()  # deaths already reported; their sentinels stay ready
        self.known: dict[int, object] = {}  # pid -> Process, kept after the pool forgets them
        self.ended_pids: set[int] = set()   # workers we ended ourselves (timeouts)
        self.next_sweep = 0.0
        self.bytes_sent = 0
        self.bytes_received = 0

    def initializer_bytes(self):
        if self.initializer is None:
            return None
        return cloudpickle.dumps((self.initializer, self.initargs))

    # ---- what subclasses provide ------------------------------------------------------
    def _send(self, task_id: int, payload: bytes) -> None:
        raise NotImplementedError

    def _current_processes(self) -> list:
        """The pool's current worker Process objects."""
        raise NotImplementedError

    def _processes(self) -> list:
        """Every worker seen so far and not yet reported dead: a pool may drop a dead worker
        from its own list before wait() looks."""
        try:
            for proc in self._current_processes():
                self.known.setdefault(proc.pid, proc)
        except RuntimeError:  # the pool changed its list meanwhile; the next call catches up
            pass
        return [p for pid, p in self.known.items() if pid not in self.dead_pids]

    def _worker_died(self, proc, seen_at: float) -> list:
        """Events for the tasks a dead worker took with it."""
        raise NotImplementedError

    # ---- the protocol -----------------------------------------------------------------
    def prepare(self, fn, timeout=None):
        self.timeout = timeout
        self.fn_bytes = pickle_function(fn, self.name)
        self.fn_key = hashlib.blake2b(self.fn_bytes, digest_size=12).hexdigest()
        return self.fn_key

    def capacity(self) -> int:
        per_worker = 1 if self.timeout is not None else 2
        return per_worker * self.workers - len(self.inflight)

    def submit(self, task) -> None:
        payload = dumps((task.id, self.fn_key, self.fn_bytes, task.items, self.start_dir))
        self._send(task.id, payload)
        self.bytes_sent += len(payload)
        self.inflight.add(task.id)

    def _result_callback(self, task_id):
        def on_result(payload):
            self.events.put((task_id, payload))
            self.wake_w.send_bytes(b"")
        return on_result

    def wait(self, timeout):
        events = self._drain()
        if events:
            return events
        procs = {p.sentinel: p for p in self._processes() if p.pid not in self.dead_pids}
        ready = multiprocessing.connection.wait([self.wake_r, *procs], timeout)
        now = time.monotonic()
        for handle in ready:
            if handle is not self.wake_r:
                self.dead_pids.add(procs[handle].pid)
                events.extend(self._worker_died(procs[handle], now))
        events.extend(self._drain())
        if not events and now >= self.next_sweep:
            events.extend(self._sweep())
        return events

    def _sweep(self) -> list:
        """Safety net: a task whose marker names a process that no longer exists is lost."""
        self.next_sweep = time.monotonic() + SWEEP_SECONDS
        events = []
        for task_id in list(self.inflight):
            pid = self.marker_pid(task_id)
            if pid is not None and not process_exists(pid) and task_id in self.inflight:
                proc = self.known.get(pid)
                if proc is not None:
                    self.dead_pids.add(pid)
                    events.extend(self._worker_died(proc, time.monotonic()))
                else:
                    self.inflight.discard(task_id)
                    events.append(Lost(task_id, pid, None, "its worker vanished", blame=True))
        return events

    def _drain(self) -> list:
        events = []
        while self.wake_r.poll():
            self.wake_r.recv_bytes()
        while True:
            try:
                task_id, outcome = self.events.get_nowait()
            except queue.Empty:
                return events
            if task_id not in self.inflight:
                continue
            self.inflight.discard(task_id)
            if isinstance(outcome, tuple):  # (worker pid, encoded result)
                pid, encoded = outcome
                self.bytes_received += len(encoded)
                _, values, failures, elapsed = loads(encoded)
                events.append(Done(task_id, pid, values, failures, elapsed))
            else:
                events.extend(self._task_error(task_id, outcome))

    def _task_error(self, task_id, error) -> list:
        """The pool reported an error for the task itself (not the function's)."""
        return [Lost(task_id, self.marker_pid(task_id), None, f"{type(error).__name__}: {error}", blame=True)]

    def marker_pid(self, task_id) -> int | None:
        try:
            with open(os.path.join(self.start_dir, str(task_id))) as handle:
                return int(handle.read() or 0) or None
        except (OSError, ValueError):
            return None

    def tasks_on(self, pid) -> list[int]:
        return [task_id for task_id in self.inflight if self.marker_pid(task_id) == pid]

    def cancel(self, task_id) -> None:
        if task_id not in self.inflight:
            return
        self.inflight.discard(task_id)
        pid = self.marker_pid(task_id)
        if pid is not None:
            self.ended_pids.add(pid)
            end_process_group(pid)

    def close(self, kill=False) -> None:
        self.inflight.clear()
        shutil.rmtree(self.start_dir, ignore_errors=True)
