"""The worker host: `pmap worker HOST:PORT`, a supervisor and its worker processes."""
from __future__ import annotations

import collections
import mmap
import os
import pickle
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import wait as wait_for_handles

from ... import _logs, _transfer, native
from ..._outcome import SentException, SplitTask, encode_result, unpack_items
from ..._worker import (WORKER_CATCH, become_worker_process, cached_function, every_item_failed,
                        remember_initializer_globals, run_items)
from ...errors import PmapError
from .._procutil import describe_exit, end_process_group
from .wire import (CHILD_START_FAILURES, DRIVER_SILENCE_SECONDS, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK,
                   EXIT_USAGE, HEARTBEAT_THREAD, JoinError, LEASE_POLL_SECONDS, REPORT_SECONDS,
                   held_tasks, SPLIT, _CONNECTION_LOST,
                   _close_quietly, _say, connect, format_address, parse_address, read_authkey_file)


def run_worker(address: str, authkey_file: str, processes: int) -> int:
    """`pmap worker`: join the driver at `address` with `processes` worker processes and serve
    until the driver ends. Returns the exit status: 0 when the driver ended the run, 1 when it
    could not be joined or went away without a word, 2 for bad arguments."""
    try:
        target = parse_address(address)
        if target[1] == 0:
            raise ValueError(f"address {address!r} needs a port (HOST:PORT)")
        authkey = read_authkey_file(authkey_file)
    except (OSError, ValueError) as exc:
        _say(f"pmap worker: {exc}")
        return EXIT_USAGE
    if processes < 1:
        _say("pmap worker: --processes must be at least 1")
        return EXIT_USAGE
    _warn_if_key_file_is_open(os.path.expanduser(authkey_file))
    return _Supervisor(target, authkey, processes, quiet=False).run()


def _local_main() -> None:
    """Entry point of the supervisor the driver starts for its local workers."""
    config = pickle.load(sys.stdin.buffer)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    supervisor = _Supervisor(config["address"], config["authkey"], config["processes"], quiet=True,
                             sys_path=config["sys_path"], token=config["token"])
    threading.Thread(target=_stop_at_eof, args=(sys.stdin.fileno(), supervisor.stop_requested),
                     daemon=True).start()
    sys.exit(supervisor.run())


def _stop_at_eof(fd: int, on_eof) -> None:
    """Read until the parent closes the pipe (or dies), then call `on_eof`. Reads the raw fd:
    a daemon thread blocked in a buffered read would hold its lock at interpreter exit."""
    try:
        while os.read(fd, 65536):
            pass
    except OSError:
        pass
    on_eof()


def _warn_if_key_file_is_open(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        _say(f"pmap worker: warning: {path} is readable by others; whoever reads it can run code here "
             f"(chmod 600 {path})")


# A worker process writes the id of the task it runs (+1; 0 while it runs none) into 8 bytes
# of a file its supervisor made, before and after each task. A worker reports short tasks in
# batches, so only this says which task a crash interrupted; the supervisor reads it when the
# worker dies, which costs no call while it lives.
_RUNNING = struct.Struct("q")


def _new_running_slot() -> int:
    """A file descriptor of an unlinked file of 8 zero bytes (POSIX: the manager needs it)."""
    fd, path = tempfile.mkstemp(prefix="pmap-running-")
    os.unlink(path)
    os.write(fd, bytes(_RUNNING.size))
    return fd


def _read_running_slot(fd: int) -> int | None:
    """The task a dead worker process was running, or None."""
    try:
        (value,) = _RUNNING.unpack(os.pread(fd, _RUNNING.size, 0))
    except (OSError, struct.error):
        return None
    return value - 1 if value > 0 else None


class _Child:
    __slots__ = ("proc", "ready_r", "running_fd", "joined", "eof")

    def __init__(self, proc, ready_r, running_fd):
        self.proc = proc
        self.ready_r = ready_r
        self.running_fd = running_fd
        self.joined = False
        self.eof = False


class _Supervisor:
    """Starts and watches the worker processes of one host, heart-beats for them, kills one
    on the driver's order, and ends them all when the driver ends or cannot be reached."""

    def __init__(self, address, authkey, processes, quiet, sys_path=None, token=None):
        self.address = tuple(address)
        self.authkey = authkey
        self.processes = processes
        self.quiet = quiet
        self.sys_path = sys_path
        self.token = token
        self.children: dict[int, _Child] = {}
        self.stopped = threading.Event()   # the driver said stop, or ended, or our parent did
        self.wake_r, self.wake_w = os.pipe()
        self.host_id = None
        self.broker = None
        self.reason = ""
        self.start_failures = 0
        self.driver_lost = False  # it vanished without saying stop: exit non-zero

    def stop_requested(self, reason="") -> None:
        if not self.stopped.is_set():
            self.reason = self.reason or reason
            self.stopped.set()
            try:
                os.write(self.wake_w, b"x")
            except OSError:
                pass

    def run(self) -> int:
        where = format_address(self.address)
        try:
            self.broker = connect(self.address, self.authkey)
            hello = self.broker.hello_host({"name": socket.gethostname(), "pid": os.getpid(),
                                            "token": self.token})
        except JoinError as exc:
            _say(f"pmap worker: {exc}")
            return EXIT_ERROR
        except _CONNECTION_LOST as exc:
            _say(f"pmap worker: lost the driver at {where} while joining: {exc}")
            return EXIT_ERROR
        if hello is None:
            if not self.quiet:
                _say(f"pmap worker: the driver at {where} is closing")
            return EXIT_OK
        self.host_id, settings = hello
        if not self.quiet:
            _say(f"pmap worker: joined {where} with {self.processes} process(es)")
        main_thread = threading.current_thread() is threading.main_thread()
        previous_term = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
        status = EXIT_OK
        try:
            threading.Thread(target=self._heartbeat, args=(settings["heartbeat"],),
                             name=f"{HEARTBEAT_THREAD}{self.host_id}", daemon=True).start()
            status = self._watch()
            if self.driver_lost:
                status = EXIT_ERROR
        except KeyboardInterrupt:
            status = EXIT_INTERRUPTED
            self.reason = "interrupted"
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous_term)
            self._end_children()
            if status == EXIT_INTERRUPTED:
                try:
                    self.broker.leave(self.host_id)  # its tasks go back at once
                except _CONNECTION_LOST:
                    pass
        if not self.quiet:
            _say(f"pmap worker: {self.reason or 'done'}; exiting")
        return status

    def _heartbeat(self, interval: float) -> None:
        silent_since = None
        while not self.stopped.is_set():
            try:
                orders = self.broker.supervise(self.host_id, interval)
            except _CONNECTION_LOST:
                # A dead driver refuses the reconnection at once; a blip is ridden out, but
                # never past DRIVER_SILENCE_SECONDS.
                now = time.monotonic()
                silent_since = silent_since or now
                if now - silent_since > DRIVER_SILENCE_SECONDS or not self._reconnect():
                    self.driver_lost = True
                    self.stop_requested(f"lost the driver at {format_address(self.address)}")
                    return
                time.sleep(interval)
                continue
            silent_since = None
            for pid in orders["kill"]:
                if pid in self.children:
                    end_process_group(pid, grace=0.05)
            if orders["stop"]:
                self.stop_requested(f"the driver at {format_address(self.address)} ended")
                try:
                    self.broker.leave(self.host_id)  # heard: the driver may exit now
                except _CONNECTION_LOST:
                    pass  # it did not wait for us
                return

    def _reconnect(self) -> bool:
        try:
            self.broker = connect(self.address, self.authkey, patience=0)
            return True
        except JoinError:
            return False

    def _watch(self) -> int:
        """Keep `processes` workers running; report each death to the broker at once."""
        for _ in range(self.processes):
            self._spawn()
        while not self.stopped.is_set():
            handles = [c.ready_r for c in self.children.values() if not c.eof] + [self.wake_r]
            # The timeout also polls exit codes: a grandchild may keep a pipe open.
            ready = wait_for_handles(handles, timeout=0.5)
            if self.wake_r in ready:
                os.read(self.wake_r, 64)
            for pid, child in list(self.children.items()):
                if child.ready_r in ready:
                    self._read_ready_pipe(child)
                code = child.proc.poll()
                if code is None:
                    continue
                del self.children[pid]
                os.close(child.ready_r)
                running = _read_running_slot(child.running_fd)
                os.close(child.running_fd)
                try:
                    self.broker.worker_exited(self.host_id, pid, code, running)
                except _CONNECTION_LOST:
                    pass  # the heartbeat thread decides whether the driver is gone
                if not child.joined:
                    self.start_failures += 1
                    if self.start_failures >= CHILD_START_FAILURES:
                        _say(f"pmap worker: {self.start_failures} worker processes in a row exited "
                             f"({describe_exit(code)}) before joining; giving up")
                        return EXIT_ERROR
                if not self.stopped.is_set():
                    self._spawn()
        return EXIT_OK

    def _read_ready_pipe(self, child) -> None:
        """One byte: the worker joined the broker. EOF: it exited (or closed the pipe)."""
        try:
            data = os.read(child.ready_r, 1)
        except OSError:
            data = b""
        if data:
            child.joined = True
            self.start_failures = 0
            return
        child.eof = True
        try:
            child.proc.wait(0.1)  # an exiting process closes its pipes just before it is reaped
        except subprocess.TimeoutExpired:
            pass

    def _spawn(self) -> None:
        ready_r, ready_w = os.pipe()
        running_fd = _new_running_slot()
        config = {"address": self.address, "authkey": self.authkey, "host_id": self.host_id,
                  "sys_path": self.sys_path, "ready_fd": ready_w, "running_fd": running_fd}
        proc = subprocess.Popen(
            [sys.executable, "-c", "from pmap.backends.manager.host import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE, pass_fds=(ready_w, running_fd), close_fds=True,
            env=native.child_environ(self.processes))  # this host's CPUs; variables already set win
        os.close(ready_w)
        proc.stdin.write(pickle.dumps(config))  # pmap's own settings, builtins only: plain pickle
        proc.stdin.flush()  # left open: the worker exits when it reads EOF (this process ended)
        self.children[proc.pid] = _Child(proc, ready_r, running_fd)

    def _end_children(self) -> None:
        children = list(self.children.values())
        for child in children:
            if child.proc.poll() is None:
                end_process_group(child.proc.pid, alive=lambda c=child: c.proc.poll() is None, grace=0.2)
        for child in children:
            child.proc.wait()
            _close_quietly(child.proc.stdin)
            os.close(child.ready_r)
            os.close(child.running_fd)
        self.children.clear()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _worker_main() -> None:
    """Entry point of a worker process: run leased tasks until the driver or the supervisor ends."""
    config = pickle.load(sys.stdin.buffer)
    if config["sys_path"]:
        sys.path[:] = config["sys_path"]
    become_worker_process()
    threading.Thread(target=_stop_at_eof, args=(sys.stdin.fileno(), lambda: _exit_now(EXIT_OK)),
                     daemon=True).start()
    try:
        status = _WorkerProcess(config).run()
    except _CONNECTION_LOST:
        status = EXIT_OK  # the driver is gone
    except JoinError as exc:
        _say(f"pmap worker: {exc}")
        status = EXIT_ERROR
    _exit_now(status)


def _exit_now(status: int) -> None:
    """Exit without running finalizers: they would call a driver that may be gone."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a broken or closed stream: what it held is lost either way, and the host must go on exiting
            pass
    os._exit(status)


class _WorkerProcess:
    """The main thread runs tasks and reports what it finished; the report asks for the tasks
    that refill what the worker holds. A second thread asks for work only while the worker
    holds none, waiting at the broker until some comes.

    A worker holds the task it runs and `prefetch` more; while its tasks are short it holds
    about HELD_SECONDS of them (`held_tasks`) and reports them in batches, holding a finished
    result at most about REPORT_SECONDS, so that one round trip serves many tasks. Which task
    it runs is written to its running slot, where its supervisor reads it if it dies (the
    task blamed for the crash). A clocked task (the run has a timeout) is reported alone, as
    soon as it ends, and what was finished before it is reported before it starts: its start,
    from which it is timed, is then the broker's to see."""

    def __init__(self, config):
        self.config = config
        # No deadline: whether the driver is gone is the supervisor's call (it ends this
        # process); a worker timing out on a driver that is only slow would lose its task.
        self.broker = connect(config["address"], config["authkey"], deadline=None)
        self.worker_id = None
        self.prefetch = 0
        self.task_seconds = None  # how long its recent tasks took
        self.inbox: collections.deque = collections.deque()
        self.busy = 0
        self.asking = 0           # tasks asked for whose answer has not come
        self.room = threading.Condition()
        self.functions: dict = {}
        self.running = mmap.mmap(config["running_fd"], _RUNNING.size)

    def run(self) -> int:
        hello = self.broker.hello_worker(self.config["host_id"], os.getpid())
        if hello is None:
            return EXIT_OK
        self.worker_id, self.prefetch = hello
        os.write(self.config["ready_fd"], b"j")
        os.close(self.config["ready_fd"])
        init = self.broker.initializer()
        if init is not None:
            try:
                initializer, initargs, log_level = _transfer.loads(init)
                _logs.forward_from_here(log_level, send=self._send_log)
                if initializer is not None:
                    initializer(*initargs)
                    remember_initializer_globals(initializer)
            except BaseException as exc:
                report = _transfer.dumps((SentException(exc), traceback.format_exc()))  # as dask reports it
                self.broker.fatal(self.worker_id, report)
                return EXIT_ERROR
        threading.Thread(target=self._fetch_guarded, name="pmap-worker-lease", daemon=True).start()
        finished: list = []   # (task_id, result) not yet reported
        oldest = 0.0          # when the first of them finished
        while True:
            with self.room:
                while not self.inbox:
                    self.room.wait()
                task_id, fn_key, n_items, payload, clocked = self.inbox.popleft()
                self.busy = 1
            _RUNNING.pack_into(self.running, 0, task_id + 1)
            began = time.perf_counter()
            result = self._run(task_id, fn_key, n_items, payload)
            ended = time.perf_counter()
            _RUNNING.pack_into(self.running, 0, 0)
            if not finished:
                oldest = ended
            finished.append((task_id, result))
            with self.room:
                elapsed = ended - began
                self.task_seconds = elapsed if self.task_seconds is None else (self.task_seconds + elapsed) / 2
                if (not clocked and self.inbox and not self.inbox[0][4]
                        and ended - oldest + self.task_seconds < REPORT_SECONDS):
                    continue  # the next one is short too: report both together
                want = max(0, held_tasks(self.prefetch, self.task_seconds) - len(self.inbox) - self.asking)
                self.asking += want
            try:
                tasks = self.broker.complete(self.worker_id, finished, want)
            finally:
                with self.room:
                    self.asking -= want
            finished = []
            with self.room:
                self.inbox.extend(tasks or ())
                self.busy = 0
                self.room.notify_all()

    def _run(self, task_id, fn_key, n_items, payload) -> bytes:
        """The encoded outcome of one task of `n_items` items (the count the lease carried,
        so a payload that does not unpickle here is still answered item for item)."""
        try:
            items = unpack_items(_transfer.loads(payload))
        except SplitTask as exc:  # the driver has each item run alone: only those that do not load fail
            return _transfer.dumps((SPLIT, str(exc)))
        except Exception as exc:  # ItemNotPicklable: the task's one item does not load on this host
            return encode_result(task_id, *every_item_failed(n_items, exc), 0.0)
        try:
            fn = cached_function(fn_key, lambda: self._function_bytes(fn_key), self.functions)
        except Exception as exc:  # e.g. a module the user's code needs is missing on this host
            return encode_result(task_id, *every_item_failed(n_items, exc), 0.0)
        return encode_result(task_id, *run_items(fn, items, catch=WORKER_CATCH))

    def _send_log(self, record: bytes) -> None:
        """Hand a log record to the driver as it is written. A call, not a message: it is at the
        broker before the worker goes on, so before the task's result, and before a crash or a
        kill that follows could lose it."""
        try:
            self.broker.log(self.worker_id, record)
        except _CONNECTION_LOST as exc:  # the forwarder keeps it (it goes with the result, if any)
            raise OSError(f"cannot reach the driver: {exc}") from exc

    def _function_bytes(self, key) -> bytes:
        fn_bytes = self.broker.function(key)
        if fn_bytes is None:
            raise PmapError("the driver no longer holds this task's function")
        return fn_bytes

    def _fetch_guarded(self) -> None:
        try:
            self._fetch()
        except _CONNECTION_LOST:
            pass
        _exit_now(EXIT_OK)  # told to stop, or the driver is gone

    def _fetch(self) -> None:
        """Ask for work while the worker holds none (the main thread's reports ask for the rest)."""
        while True:
            with self.room:
                while self.inbox or self.busy or self.asking:
                    self.room.wait()
                want = held_tasks(self.prefetch, self.task_seconds)
                self.asking += want
            try:
                tasks = self.broker.lease(self.worker_id, want, LEASE_POLL_SECONDS)
            finally:
                with self.room:
                    self.asking -= want
                    self.room.notify_all()
            if tasks is None:
                return
            if tasks:
                with self.room:
                    self.inbox.extend(tasks)
                    self.room.notify_all()
