"""fork: workers forked from the caller (multiprocessing's fork context), one pipe each. The
function is inherited, not pickled. Tasks go down a worker's pipe; its log records, as they are
written, and each task's result come back up it, and the task it holds is in a slot of shared
memory forked with it (`_worker.Link`), so the task a dead worker held is the one it said."""
from __future__ import annotations

import gc
import itertools
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import threading
import time
import traceback
import warnings
import weakref
from collections import deque

from .. import _logs, _transfer, native
from .._outcome import SplitTask, _SentException, encode_result, pack_items, unpack_items
from .._worker import (FAILED, NO_TASK, READY, RESULT, SPLIT, WORKER_CATCH, ItemClock, become_worker_process,
                       every_item_failed, link_through, loads, new_slot, run_items, stop_when_asked)
from ..errors import InitializerError, RemoteTraceback, warn_user
from ._procutil import Link, describe_exit, end_process_group
from .base import Backend, Done, Fatal, Lost, Started, fork_supported, threads_are_greenlets

_JOIN_SECONDS = 1.0
QUEUE_DEPTH = 2  # tasks a worker holds: the next one waits in the worker while it runs the first
_warned_threads = False


def _worker_main(conn, slot, functions, initializer, initargs, max_tasks, parent_pid, log_level):
    become_worker_process(parent_pid=parent_pid)
    stop_when_asked()
    link = link_through(conn, slot)
    _logs.forward_from_here(log_level, send=link.send_log)
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as exc:  # the user's initializer, whatever it raises: the caller's InitializerError
            link.send(FAILED, pickle.dumps((_SentException(exc), traceback.format_exc())))
            return
        link.send(READY)
    next_message = _start_reader(conn) if not threads_are_greenlets() else _read_directly(conn)
    done = 0
    while True:
        message = next_message()
        if message is None:
            return
        kind, key, payload = loads(message)
        if kind == "fn":
            functions[key] = loads(payload)
            continue
        if kind == "stop":
            return
        task_id, packed, timed = payload
        link.hold(task_id)
        try:
            clock = ItemClock(link, task_id) if timed else None
            outcome = run_items(functions[key], unpack_items(packed), catch=WORKER_CATCH, clock=clock)
        except SplitTask as exc:
            link.send_task(SPLIT, task_id, str(exc).encode())
            link.hold(NO_TASK)
            continue
        except BaseException as exc:  # the single item could not be rebuilt here
            outcome = (*every_item_failed(packed[0], exc), 0.0)
        link.send_task(RESULT, task_id, encode_result(task_id, *outcome))
        link.hold(NO_TASK)  # only now: its result has been written whole
        done += 1
        if max_tasks and done >= max_tasks:
            return  # recycled: the parent starts a fresh worker


def _close_fds(*fds) -> None:
    for fd in fds:
        os.close(fd)


def _start_reader(conn):
    """A reader thread takes the next task off the pipe while this one runs, so the parent
    never blocks writing to a busy worker (and the two writes cannot deadlock)."""
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def read():
        while True:
            try:
                inbox.put(conn.recv_bytes())
            except (EOFError, OSError):
                inbox.put(None)  # the parent has gone
                return

    threading.Thread(target=read, name="pmap-fork-reader", daemon=True).start()
    return inbox.get


def _read_directly(conn):
    def read():
        try:
            return conn.recv_bytes()
        except (EOFError, OSError):
            return None  # the parent has gone
    return read


class _Worker:
    __slots__ = ("proc", "link", "tasks", "tasks_done", "ready")

    def __init__(self, proc, conn, slot, ready):
        self.proc = proc
        self.link = Link(conn, proc.pid, slot)  # which of its tasks it holds: the one in its slot
        self.tasks: deque = deque()  # task ids sent to it and not over, in the order sent
        self.tasks_done = 0
        self.ready = ready           # its initializer (if any) has returned

    @property
    def pid(self):
        return self.proc.pid

    @property
    def conn(self):
        return self.link.conn


class ForkBackend(Backend):
    name = "fork"
    kind = "process"
    random_globals = "own"
    item_clock = True
    guarantees = "hard timeout (worker killed and replaced); a crash costs only the items its worker held"

    @classmethod
    def unavailable_reason(cls):
        if not fork_supported():
            return "this platform has no os.fork (use backend='process')"
        return None

    def __init__(self, workers=None, initializer=None, initargs=(), max_tasks_per_worker=None, **options):
        super().__init__(workers, initializer, initargs, **options)
        self.max_tasks = max_tasks_per_worker
        self.ctx = multiprocessing.get_context("fork")
        self.functions: dict[int, object] = {}   # inherited by every worker forked later
        self.keys = itertools.count()
        self.workers_list: list[_Worker] = []
        self.by_task: dict[int, _Worker] = {}
        self.events: list = []
        self.bytes_sent = 0
        self.bytes_received = 0
        self.channel = _transfer.Channel()  # big buffers through shared memory, released on close
        self.wake_r, self.wake_w = os.pipe()  # a byte here ends a wait (wake)
        os.set_blocking(self.wake_w, False)
        weakref.finalize(self, _close_fds, self.wake_r, self.wake_w)  # kept across close(): a Pool reopens

    # ---- workers ---------------------------------------------------------------------
    def _fork(self) -> _Worker:
        self._warn_if_threaded()
        parent_end, child_end = multiprocessing.Pipe(duplex=True)
        for end in (parent_end, child_end):  # gevent's patched socketpair makes them non-blocking
            os.set_blocking(end.fileno(), True)
        slot = new_slot()  # anonymous and shared: the worker writes it, the caller reads it
        proc = self.ctx.Process(target=_worker_main, daemon=True, name="pmap-fork-worker",
                                args=(child_end, slot, self.functions,
                                      native.with_limits(self, self.initializer, forking=True),
                                      self.initargs, self.max_tasks, os.getpid(), _logs.caller_level()))
        gc.freeze()  # the child's collector then leaves the parent's objects (and their pages) alone
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns on every fork of a threaded process; we warn once ourselves.
                warnings.filterwarnings("ignore", message=".*use of fork\\(\\) may lead to deadlocks.*",
                                        category=DeprecationWarning)
                proc.start()
        finally:
            gc.unfreeze()
        child_end.close()
        worker = _Worker(proc, parent_end, slot, ready=self.initializer is None)
        self.workers_list.append(worker)
        return worker

    def _warn_if_threaded(self) -> None:
        global _warned_threads
        others = native.threads_a_fork_leaves_behind()
        if _warned_threads or not others:
            return
        _warned_threads = True  # once per process: the risk is the same on every fork
        warn_user(
            f"pmap: the fork backend is forking a process that runs {others} other "
            "thread(s); a lock one of them holds at that moment stays locked in the worker. "
            "Use backend='process' if a run hangs.")

    def _retire(self, worker: _Worker) -> None:
        self.workers_list.remove(worker)
        worker.link.close()
        worker.proc.join(0)

    def _room(self, worker: _Worker) -> int:
        """How many more tasks `worker` takes: one at a time under a timeout (its clock starts
        at the send), and none past its max_tasks_per_worker."""
        depth = 1 if self.timeout is not None or threads_are_greenlets() else QUEUE_DEPTH
        room = depth - len(worker.tasks)
        if self.max_tasks:
            room = min(room, self.max_tasks - worker.tasks_done - len(worker.tasks))
        return max(0, room)

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
            message = pickle.dumps(("fn", key, _transfer.dumps(fn, main_by_value=True)))
        except Exception:  # the user's function does not pickle (its __reduce__ may raise anything): fork anew
            self.close(kill=True)
            return
        for worker in list(self.workers_list):
            try:
                worker.conn.send_bytes(message)
            except OSError:
                pass  # it died: wait() reports it

    # ---- tasks -----------------------------------------------------------------------
    def capacity(self) -> int:
        return sum(self._room(w) for w in self.workers_list)

    def submit(self, task) -> None:
        message = self.channel.dumps(("task", task.fn, (task.id, pack_items(task.items), self.timeout is not None)))
        worker = max(self.workers_list, key=self._room)  # the least loaded
        if not self._room(worker):
            raise RuntimeError("fork backend: submit() beyond capacity()")
        try:
            worker.conn.send_bytes(message)
        except OSError:  # it died since wait() last looked; wait() buries it, and this task never ran
            self.events.append(Lost(task.id, worker.pid, None, "its worker died before the task reached it",
                                    blame=False))
            return
        self.bytes_sent += _transfer.wire_size(message)
        worker.tasks.append(task.id)
        self.by_task[task.id] = worker
        if len(worker.tasks) == 1 and worker.ready:  # an idle worker starts it at once: its timeout's clock starts
            self.events.append(Started(task.id, worker.pid, time.monotonic()))

    def wait(self, timeout):
        events, self.events = self.events, []
        if events:
            timeout = 0
        handles = {}
        for worker in self.workers_list:
            handles[worker.conn] = worker
            handles[worker.proc.sentinel] = worker
        ready = multiprocessing.connection.wait([self.wake_r, *handles], timeout)
        dead = []
        for handle in ready:
            if handle == self.wake_r:
                os.read(self.wake_r, 4096)
                continue
            worker = handles[handle]
            if worker in dead:
                continue
            events.extend(self._read(worker))  # also on its end: what it sent before still counts
            if handle is worker.proc.sentinel or worker.link.closed:
                dead.append(worker)
        for worker in dead:
            events.extend(self._bury(worker))
        return events

    def _read(self, worker, frames=None) -> list:
        events = []
        for kind, task_id, body in worker.link.read() if frames is None else frames:
            if kind == READY:
                worker.ready = True
                if worker.tasks:  # sent while its initializer ran: it starts now
                    events.append(Started(worker.tasks[0], worker.pid, time.monotonic()))
            elif kind == FAILED:
                exc, tb = pickle.loads(body)
                exc.__cause__ = RemoteTraceback(tb)
                events.append(Fatal(self._initializer_error(worker, f"{type(exc).__name__}: {exc}", exc)))
            elif task_id not in worker.tasks:
                continue  # a task cancelled meanwhile
            elif kind == SPLIT:
                events += self._forget(worker, task_id, Lost(task_id, worker.pid, None, bytes(body).decode(),
                                                             blame=False))
            elif kind == RESULT:
                self.bytes_received += _transfer.wire_size(body)
                _, values, failures, elapsed = self.channel.loads(body)
                events += self._forget(worker, task_id, Done(task_id, worker.pid, values, failures, elapsed))
        return events

    def _initializer_error(self, worker, what, cause=None) -> InitializerError:
        name = getattr(self.initializer, "__qualname__", None) or type(self.initializer).__name__
        error = InitializerError(f"the initializer {name} failed in worker {worker.pid} of backend 'fork': {what}")
        error.__cause__ = cause
        return error

    def _forget(self, worker, task_id, event) -> list:
        """`task_id` is over on `worker`: the next task it was sent starts now."""
        worker.tasks.remove(task_id)
        worker.tasks_done += 1
        self.by_task.pop(task_id, None)
        if worker.tasks:
            return [event, Started(worker.tasks[0], worker.pid, time.monotonic())]
        return [event]

    def _bury(self, worker: _Worker, reason: str | None = None) -> list:
        """A worker exited: the task it held (in its slot) is lost, and it may be the cause; the
        others it was sent never started. A replacement takes its place."""
        events = self._read(worker)  # what it sent before it ended still counts
        worker.proc.join(_JOIN_SECONDS)
        exitcode = worker.proc.exitcode
        self._retire(worker)
        if not worker.ready and reason is None:  # it died inside its initializer: no item is to blame
            return [Fatal(self._initializer_error(worker, f"its process ended ({describe_exit(exitcode)})"))]
        held = worker.link.held()
        for task_id in worker.tasks:
            self.by_task.pop(task_id, None)
            events.append(Lost(task_id, worker.pid, exitcode, reason or describe_exit(exitcode),
                               blame=task_id == held and reason is None))
        worker.tasks.clear()
        if len(self.workers_list) < self.workers and self.functions:
            self._fork()
        return events

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"w")
        except BlockingIOError:  # the pipe is full: the wait returns anyway
            pass

    def cancel(self, task_id) -> None:
        worker = self.by_task.get(task_id)
        if worker is None:
            return
        end_process_group(worker.pid, alive=worker.proc.is_alive)
        worker.tasks.remove(task_id)
        self.by_task.pop(task_id, None)
        self.events.extend(self._bury(worker, reason="its worker was ended for another item's timeout"))

    def running_item(self, task_id):
        worker = self.by_task.get(task_id)
        return worker.link.running_item(task_id) if worker is not None else None

    def interrupt(self, task_id, position):
        worker = self.by_task.get(task_id)
        if worker is None:
            return []
        events = self._read(worker)
        if task_id in worker.tasks and worker.link.held() == task_id:
            events += self._read(worker, worker.link.stop(task_id))  # what it finished, as its result
        if task_id in worker.tasks or worker.link.held() == task_id:  # stopped, or deaf to the request
            end_process_group(worker.pid, alive=worker.proc.is_alive)
            if task_id in worker.tasks:  # no word from it: the engine counts none of its items as done
                worker.tasks.remove(task_id)
                self.by_task.pop(task_id, None)
            events += self._bury(worker, reason="its worker was ended for another item's timeout")
        return events

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
            worker.link.close()
        self.by_task.clear()
        self.events = []
        self.channel.close()
