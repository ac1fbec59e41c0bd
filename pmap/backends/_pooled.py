"""Shared machinery of the backends built on an existing process pool (loky, multiprocessing).

Tasks go through the pool. Everything a worker says comes back over a connection of its own
to this backend, a Unix socket it opens to the run's private folder on its first task
(`_worker.run_pooled_task`): its log records as they are written, and the task's result; what
the pool itself carries back is None. Which task it holds (and, under a timeout, which item of
it runs since when) is in its slot, a file of that folder. `wait()` watches those connections, so the task a dead worker held is known from its
slot (`_procutil.Link`), and a worker that dies while it writes a result leaves nothing
behind that others wait on.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import queue
import shutil
import socket
import tempfile
import time

from .. import _logs, _transfer, native
from .._outcome import initializer_error, pack_items
from .._worker import LINK_SOCKET, RESULT, SPLIT, init_report_dir
from ..errors import FunctionNotPicklable, InitializerError
from ._procutil import Link, describe_exit, end_process_group, process_exists
from .base import Backend, Done, Fatal, Lost, threads_are_greenlets

_SHM = "/dev/shm"


def pickle_function(fn, backend_name: str, pickler=None):
    """`fn` pickled the one way pmap pickles functions (`_transfer.picklers`), or by `pickler`;
    a clear FunctionNotPicklable where it cannot be."""
    try:
        return pickler(fn) if pickler is not None else _transfer.dumps(fn, main_by_value=True)
    except Exception as exc:  # the user's function (its __reduce__, a closure's cells) may raise anything: named below
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        raise FunctionNotPicklable(
            f"backend {backend_name!r} cannot send function {name} to its worker processes: "
            f"{type(exc).__name__}: {exc}. Use backend='thread', or backend='fork' which inherits "
            "the function instead of pickling it") from exc


class PooledBackend(Backend):
    kind = "process"
    random_globals = "own"
    reports_start = False
    item_clock = True

    @classmethod
    def unavailable_reason(cls):
        if threads_are_greenlets():
            return ("gevent has monkey-patched threading in this process, and the pool's own threads "
                    "then stall (use backend='fork', 'greenlet' or 'thread')")
        return None

    def __init__(self, workers=None, initializer=None, initargs=(), **options):
        super().__init__(workers, initializer, initargs, **options)
        self.errors: queue.SimpleQueue = queue.SimpleQueue()  # (task id, error, seen then): a task the pool failed
        self.wake_r, self.wake_w = multiprocessing.Pipe(duplex=False)
        self.woken = False  # wake_r was readable: the wait in progress returns
        self.inflight: set[int] = set()
        self.channel = _transfer.Channel()  # big buffers through shared memory, released on close
        self.run_dir, self.listener = _open_run_dir()
        self.links: dict[object, Link] = {}  # connection -> the link of one worker
        self.later: list = []  # events read while cancelling or judging a failed task, for the next wait()
        self.init_dir = None
        if initializer is not None:
            self.init_dir = init_report_dir(os.getpid())
            os.makedirs(self.init_dir, exist_ok=True)
            _remove_at_exit(self.init_dir)
        self.fn_key = None
        self.seen: dict[int, object] = {}  # pid -> Process of the pool's workers, for their exit codes
        self.ended_pids: set[int] = set()   # workers we ended ourselves (timeouts)
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
                pass  # a sibling run removed it first
            if report:  # written whole (renamed into place) just before the worker exits
                return initializer_error(name, self.name, pid, report)
            if ended is None and (pid in exitcodes or pid in self.seen):
                ended = InitializerError(f"the initializer {name} ended worker {pid} of backend {self.name!r} "
                                         f"({describe_exit(exitcodes.get(pid))}) before it could run anything")
        return ended

    def _initializer_fatal(self, events: list, died: dict) -> list:
        """Replace the events by one Fatal when a worker's initializer failed."""
        if self.init_dir is None or not (died or any(type(e) is Lost for e in events)):
            return events
        for proc in [*self._current_processes(), *self._known_processes()]:
            if proc.exitcode is not None:
                died.setdefault(proc.pid, proc.exitcode)
        error = self.initializer_failure(died)
        return [Fatal(error)] if error is not None else events

    def initializer_bytes(self):
        # the workers' native thread limits come first, then the user's initializer
        setup = (native.with_limits(self, self.initializer), self.initargs, _logs.caller_level())
        return _transfer.dumps(setup, main_by_value=True)

    # ---- what subclasses provide ------------------------------------------------------
    def _send(self, task_id: int, payload: bytes) -> None:
        raise NotImplementedError

    def _current_processes(self) -> list:
        """The pool's current worker Process objects."""
        raise NotImplementedError

    def _watched_processes(self) -> list:
        """Worker processes whose end wait() watches, besides their connections."""
        return []

    def _known_processes(self) -> list:
        return list(self.seen.values())

    def _exitcode(self, proc) -> int | None:
        return proc.exitcode

    def _ended(self, pid: int | None, link: Link | None, proc) -> list:
        """Events for the end of worker `pid` (`proc`: its Process, when its end was seen
        there): the task its link held, if still in flight, is lost."""
        raise NotImplementedError

    # ---- the protocol -----------------------------------------------------------------
    def prepare(self, fn, timeout=None):
        self.timeout = timeout
        if self.listener is None:  # used again after close (a Pool after Ctrl-C)
            self.channel = _transfer.Channel()
            self.run_dir, self.listener = _open_run_dir()
            self.open()
        self.fn_key, fn_bytes = pickle_function(fn, self.name, self.channel.share_function)
        # written once; each worker reads it on its first task of the run, tasks carry only the key
        with open(_transfer.function_file(self.run_dir, self.fn_key), "wb") as handle:
            handle.write(fn_bytes)
        self.bytes_sent += _transfer.wire_size(fn_bytes)
        return self.fn_key

    def capacity(self) -> int:
        return 2 * self.workers - len(self.inflight)

    def submit(self, task) -> None:
        payload = self.channel.dumps((task.id, self.fn_key, pack_items(task.items, self.items_hold_functions),
                                      self.run_dir,
                                      self.timeout is not None))
        self._send(task.id, payload)
        self.bytes_sent += _transfer.wire_size(payload)
        self.inflight.add(task.id)

    def _report_error(self, task_id, error, seen_then=None) -> None:
        """The pool failed a task itself (called from the pool's own thread); `seen_then`:
        what the subclass saw of its workers at that moment."""
        self.errors.put((task_id, error, seen_then))
        self.wake_w.send_bytes(b"")

    def wait(self, timeout):
        events, self.later = self.later, []
        deadline = None if timeout is None else time.monotonic() + timeout
        while not events:  # a worker's HELLO, a log record: no event, wait on
            events = self._wait_once(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if self.woken or (deadline is not None and time.monotonic() >= deadline):
                break
        self.woken = False
        return events

    def wake(self) -> None:
        self.wake_w.send_bytes(b"")

    def _wait_once(self, timeout) -> list:
        events = []
        sentinels = {proc.sentinel: proc for proc in self._watched_processes()}
        handles = [self.wake_r, self.listener, *self.links, *sentinels]
        ready = multiprocessing.connection.wait(handles, timeout)
        died = {}
        for handle in ready:
            if handle is self.listener:
                for link in self._accept():  # read at once: a worker that has ended said who it was
                    events.extend(self._read(link))
            elif handle in self.links:
                events.extend(self._read(self.links[handle]))
        for handle in ready:
            proc = sentinels.get(handle)
            if proc is not None:
                events.extend(self._worker_gone(proc.pid, proc=proc))
                died[proc.pid] = self._exitcode(proc)
        events.extend(self._drain_errors())
        return self._initializer_fatal(events, died)

    def _accept(self) -> list[Link]:
        links = []
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return links
            sock.setblocking(True)
            conn = multiprocessing.connection.Connection(sock.detach())
            links.append(Link(conn, run_dir=self.run_dir))
            self.links[conn] = links[-1]

    def _read(self, link: Link) -> list:
        events = self._frames(link)
        if link.closed:
            events.extend(self._worker_gone(link.pid, link))
        return events

    def _frames(self, link: Link, frames=None) -> list:
        events = []
        for kind, task_id, body in link.read() if frames is None else frames:
            if kind == RESULT:
                if task_id in self.inflight:
                    self.inflight.discard(task_id)
                    self.bytes_received += _transfer.wire_size(body)
                    _, values, failures, elapsed = self.channel.loads(body)
                    events.append(Done(task_id, link.pid, values, failures, elapsed))
            elif kind == SPLIT and task_id in self.inflight:  # an item does not unpickle in a worker
                self.inflight.discard(task_id)
                events.append(Lost(task_id, link.pid, None, bytes(body).decode(), blame=False))
        return events

    def _link_of(self, pid) -> Link | None:
        for link in self.links.values():
            if link.pid == pid:
                return link
        return None

    def _worker_gone(self, pid, link: Link | None = None, proc=None) -> list:
        """Worker `pid` has ended (its connection closed, or its process): the task it held, if
        any, is lost."""
        link = link or self._link_of(pid)
        events = []
        if link is not None:
            self.links.pop(link.conn, None)
            if not link.closed:
                events.extend(self._frames(link))  # what it said before it ended still counts
            link.close()
        return events + self._ended(pid, link, proc)

    def _drain_errors(self) -> list:
        events = []
        while self.wake_r.poll():
            self.wake_r.recv_bytes()
            self.woken = True
        while True:
            try:
                task_id, error, seen_then = self.errors.get_nowait()
            except queue.Empty:
                return events
            if task_id in self.inflight:
                events.extend(self._task_error(task_id, error, seen_then))

    def _task_error(self, task_id, error, seen_then) -> list:
        """The pool reported an error for the task itself (not the function's)."""
        self.inflight.discard(task_id)
        holder = self._holder(task_id)
        return [Lost(task_id, holder.pid if holder else None, None, f"{type(error).__name__}: {error}", blame=True)]

    def _holder(self, task_id) -> Link | None:
        for link in self.links.values():
            if link.held() == task_id:
                return link
        return None

    def cancel(self, task_id) -> None:
        if task_id not in self.inflight:
            return
        self.inflight.discard(task_id)
        link = self._holder(task_id)
        if link is None:
            return  # not started yet: its worker runs it later and the result is dropped
        self.later.extend(self._read(link))
        if link.held() == task_id and link.pid is not None:  # still running it
            self.ended_pids.add(link.pid)
            end_process_group(link.pid)

    def running_item(self, task_id):
        link = self._holder(task_id) if task_id in self.inflight else None
        return link.running_item(task_id) if link is not None else None

    def interrupt(self, task_id, position):
        link = self._holder(task_id) if task_id in self.inflight else None
        if link is None:
            self.cancel(task_id)
            return []
        events = self._frames(link)
        if task_id in self.inflight and link.pid is not None:
            events += self._frames(link, link.stop(task_id))  # what it finished, as its result
            if link.held() == task_id:  # stopped, or deaf to the request
                self.ended_pids.add(link.pid)
                end_process_group(link.pid)
        self.inflight.discard(task_id)
        return events

    def close(self, kill=False) -> None:
        self.inflight.clear()
        for link in self.links.values():
            link.close()
        self.links.clear()
        self.later = []
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        shutil.rmtree(self.run_dir, ignore_errors=True)
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
            if entry.isdigit() and (int(entry) in self.seen or not process_exists(int(entry))):
                try:
                    os.unlink(os.path.join(self.init_dir, entry))
                except OSError:
                    pass  # removed meanwhile


def _open_run_dir() -> tuple[str, socket.socket]:
    """A private folder for one run's files (its function, the pool's lock files) and the
    listening socket in it that workers connect to. Named for this process, so a later run
    removes it if this one is killed (`_transfer.sweep`); only this user may connect."""
    path = tempfile.mkdtemp(prefix=f"pmap-{os.getpid()}-", dir=_SHM if os.path.isdir(_SHM) else None)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(os.path.join(path, LINK_SOCKET))
        listener.listen(socket.SOMAXCONN)
        listener.setblocking(False)
    except OSError:
        listener.close()
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path, listener


_removed_at_exit: set = set()


def _remove_at_exit(path: str) -> None:
    if path not in _removed_at_exit:
        _removed_at_exit.add(path)
        import atexit
        atexit.register(shutil.rmtree, path, True)
