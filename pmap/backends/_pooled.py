"""Shared machinery of the backends built on an existing process pool (loky, multiprocessing).

Tasks travel as bytes; results come back through the pool's callbacks into a queue, and a
pipe wakes `wait()`, which also watches the worker processes' sentinels so a death is seen
at once. Each running task leaves a marker file naming its worker's pid.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import queue
import shutil
import tempfile
import time

from .. import _logs, _transfer, native
from .._outcome import SplitTask, pack_items
from .._worker import init_report_dir, loads
from ..errors import FunctionNotPicklable, InitializerError, RemoteTraceback
from ._procutil import describe_exit, process_exists, end_process_group
from .base import Backend, Done, Fatal, Lost, threads_are_greenlets

_SHM = "/dev/shm"
SWEEP_SECONDS = 0.5  # how often wait() double-checks that running tasks' workers exist


def pickle_function(fn, backend_name: str, pickler=_transfer.cloudpickle_keeping_paths.dumps):
    try:
        return pickler(fn)
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
        self.channel = _transfer.Channel()  # big buffers through shared memory, released on close
        self.start_dir = _make_start_dir()
        self.init_dir = None
        if initializer is not None:
            self.init_dir = init_report_dir(os.getpid())
            os.makedirs(self.init_dir, exist_ok=True)
            _remove_at_exit(self.init_dir)
        self.fn_key = None
        self.dead_pids: set[int] = set()  # deaths already reported; their sentinels stay ready
        self.known: dict[int, object] = {}  # pid -> Process, kept after the pool forgets them
        self.ended_pids: set[int] = set()   # workers we ended ourselves (timeouts)
        self.next_sweep = 0.0
        self.bytes_sent = 0
        self.bytes_received = 0

    def initializer_failure(self, exitcodes: dict) -> InitializerError | None:
        """The error of an initializer that failed in a worker, from the report it left (see
        `_worker.pooled_worker_init`); `exitcodes` maps pids of workers seen dead to exit codes."""
        if self.init_dir is None:
            return None
        try:
            names = os.listdir(self.init_dir)
        except OSError:
            return None
        name = getattr(self.initializer, "__qualname__", None) or type(self.initializer).__name__
        ended = None  # a worker that left no error: loky may have ended it because another failed
        for entry in names:
            if not entry.isdigit():
                continue  # a report being written, or not one of ours
            pid = int(entry)
            path = os.path.join(self.init_dir, entry)
            try:
                with open(path, "rb") as handle:
                    report = handle.read()
            except OSError:
                continue
            if not report and pid not in exitcodes and process_exists(pid):
                continue  # still running its initializer
            try:
                os.unlink(path)
            except OSError:
                pass
            if report:  # written whole (renamed into place) just before the worker exits
                try:
                    exc, tb = loads(report)
                except Exception as error:
                    exc, tb = error, ""
                if tb:
                    exc.__cause__ = RemoteTraceback(tb)
                error = InitializerError(f"the initializer {name} failed in worker {pid} of backend {self.name!r}: "
                                         f"{type(exc).__name__}: {exc}")
                error.__cause__ = exc
                return error
            if ended is None and (pid in exitcodes or self.known.get(pid) is not None):
                ended = InitializerError(f"the initializer {name} ended worker {pid} of backend {self.name!r} "
                                         f"({describe_exit(exitcodes.get(pid))}) before it could run anything")
        return ended

    def _initializer_fatal(self, events: list, died: dict) -> list:
        """Replace the events by one Fatal when a worker's initializer failed."""
        if self.init_dir is None or not (died or any(type(e) is Lost for e in events)):
            return events
        for proc in self._processes() + [self.known[p] for p in died if p in self.known]:
            if proc.exitcode is not None:
                died.setdefault(proc.pid, proc.exitcode)
        error = self.initializer_failure(died)
        return [Fatal(error)] if error is not None else events

    def initializer_bytes(self):
        # the workers' native thread limits come first, then the user's initializer
        setup = (native.with_limits(self, self.initializer), self.initargs, _logs.caller_level())
        return _transfer.cloudpickle_keeping_paths.dumps(setup)

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
        if not os.path.isdir(self.start_dir):  # used again after close (a Pool after Ctrl-C)
            self.start_dir = _make_start_dir()
            self.channel = _transfer.Channel()
            self.open()
        self.fn_key, fn_bytes = pickle_function(fn, self.name, self.channel.share_function)
        # written once; each worker reads it on its first task of the run, tasks carry only the key
        with open(_transfer.function_file(self.start_dir, self.fn_key), "wb") as handle:
            handle.write(fn_bytes)
        self.bytes_sent += _transfer.wire_size(fn_bytes)
        return self.fn_key

    def capacity(self) -> int:
        per_worker = 1 if self.timeout is not None else 2
        return per_worker * self.workers - len(self.inflight)

    def submit(self, task) -> None:
        payload = self.channel.dumps((task.id, self.fn_key, None, pack_items(task.items), self.start_dir))
        self._send(task.id, payload)
        self.bytes_sent += _transfer.wire_size(payload)
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
        died = {}
        for handle in ready:
            if handle is not self.wake_r:
                proc = procs[handle]
                self.dead_pids.add(proc.pid)
                events.extend(self._worker_died(proc, now))
                died[proc.pid] = proc.exitcode  # read once the pool reaped it (see PoolBackend._worker_died)
        events.extend(self._drain())
        if not events and now >= self.next_sweep:
            events.extend(self._sweep())
        return self._initializer_fatal(events, died)

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
                self.bytes_received += _transfer.wire_size(encoded)
                _, values, failures, elapsed = self.channel.loads(encoded)
                events.append(Done(task_id, pid, values, failures, elapsed))
            elif isinstance(outcome, SplitTask):  # one of its items does not unpickle in a worker
                events.append(Lost(task_id, None, None, str(outcome), blame=False))
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
        self.channel.close()
        self._drop_initializer_reports()

    def _drop_initializer_reports(self) -> None:
        """A run reads one failed initializer's report; its siblings' would otherwise be read as
        the next run's failure (the folder is the process's)."""
        if self.init_dir is None:
            return
        try:
            names = os.listdir(self.init_dir)
        except OSError:
            return
        for entry in names:
            if entry.isdigit() and (int(entry) in self.known or not process_exists(int(entry))):
                try:
                    os.unlink(os.path.join(self.init_dir, entry))
                except OSError:
                    pass


def _make_start_dir() -> str:
    # named for this process, so a later run removes it if this one is killed (`_transfer.sweep`)
    return tempfile.mkdtemp(prefix=f"pmap-{os.getpid()}-", dir=_SHM if os.path.isdir(_SHM) else None)


_removed_at_exit: set = set()


def _remove_at_exit(path: str) -> None:
    if path not in _removed_at_exit:
        _removed_at_exit.add(path)
        import atexit
        atexit.register(shutil.rmtree, path, True)
