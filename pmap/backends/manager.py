"""manager: a broker served over `multiprocessing.managers` that workers on any host join.

The driver (the process calling pmap) serves one `Broker` object. Each host that joins runs
a supervisor (`pmap worker HOST:PORT`, or the local one the driver starts itself) which
starts worker processes, heart-beats for them, reports their deaths at once and kills one
on request (a timeout). Worker processes lease tasks, run them, and complete them.

Delivery is at-least-once: a task whose host stops heart-beating (its lease expires) goes
back to the queue under the same task id, and the first result to arrive for a task id
wins; a later duplicate is dropped. Functions should therefore be idempotent.

The broker handles bytes only: functions, items and results travel pickled (cloudpickle
where plain pickle cannot) and are unpickled by the workers and by the driver's backend,
never by the broker. The authkey lets its holder run code in the driver and the workers,
and the traffic is not encrypted: across an untrusted network use an SSH or WireGuard tunnel.
"""
from __future__ import annotations

import collections
import hashlib
import os
import pickle
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from multiprocessing.connection import wait as wait_for_handles
from multiprocessing.managers import BaseManager, RemoteError, dispatch

import cloudpickle

from .._worker import (WORKER_CATCH, become_worker_process, cached_function, dumps, encode_result,
                       every_item_failed, loads, run_items)
from ..errors import PmapError, RemoteTraceback, portable_exception
from ._pooled import pickle_function
from ._procutil import describe_exit, end_process_group
from .base import Backend, Done, Fatal, Lost, Started

DEFAULT_HOST = "127.0.0.1"
DEFAULT_LEASE_SECONDS = 10.0   # a host silent this long is presumed gone and its tasks re-queued
DEFAULT_PREFETCH = 1           # tasks a worker holds beyond the one it runs
MAX_LEASE_EXPIRIES = 3         # a task re-queued this often is reported lost, so no item loops forever
LEASE_POLL_SECONDS = 0.5       # longest a worker's lease call waits at the broker for work
CONNECT_PATIENCE = 5.0         # a worker retries a refused connection this long (driver starting)
DRIVER_SILENCE_SECONDS = 30.0  # a supervisor that cannot reach its driver this long gives up
LOCAL_RESTARTS = 3             # times the driver restarts a local supervisor that died
STOP_GRACE = 2.0               # seconds a closing driver waits for its local workers to leave
FUNCTIONS_KEPT = 16            # functions the broker remembers, for a Pool that maps many
CHILD_START_FAILURES = 3       # worker processes in a row dying before they joined: give up

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Methods a worker or supervisor may call over the network; the rest are the driver's own.
WORKER_METHODS = ("hello_host", "supervise", "worker_exited", "leave", "hello_worker",
                  "initializer", "function", "lease", "complete", "fatal")


# ---- the broker (lives in the driver, handles bytes only) -------------------------------

class _TaskRecord:
    __slots__ = ("fn_key", "payload", "holder", "started", "expiries")

    def __init__(self, fn_key, payload):
        self.fn_key = fn_key
        self.payload = payload
        self.holder = None      # worker id holding the lease, None while queued
        self.started = False
        self.expiries = 0


class _HostRecord:
    __slots__ = ("id", "name", "pid", "token", "last_seen", "expired", "kills", "workers")

    def __init__(self, host_id, name, pid, token, now):
        self.id = host_id
        self.name = name
        self.pid = pid
        self.token = token      # set for the driver's own local supervisor
        self.last_seen = now
        self.expired = False
        self.kills: list[int] = []
        self.workers: set[int] = set()


class _WorkerRecord:
    __slots__ = ("id", "host", "pid", "label", "held", "doomed")

    def __init__(self, worker_id, host, pid, label):
        self.id = worker_id
        self.host = host
        self.pid = pid
        self.label = label
        self.held: collections.deque = collections.deque()  # leased task ids, run in this order
        self.doomed = False     # a kill was ordered: its head was cancelled, nothing more starts


class Broker:
    """Task queue, leases and results. Workers reach the methods in WORKER_METHODS over the
    network (see BrokerClient); the driver's backend calls the others directly."""

    def __init__(self, lease_seconds: float, prefetch: int, initializer_bytes: bytes | None):
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = max(0.05, min(1.0, lease_seconds / 5))
        self.prefetch = prefetch
        self.initializer_bytes = initializer_bytes
        self.lock = threading.Lock()
        self.work_ready = threading.Condition(self.lock)
        self.events_ready = threading.Condition(self.lock)
        self.orders_ready = threading.Condition(self.lock)
        self.tasks: dict[int, _TaskRecord] = {}
        self.queue: collections.deque = collections.deque()
        self.functions: collections.OrderedDict = collections.OrderedDict()
        self.hosts: dict[int, _HostRecord] = {}
        self.workers: dict[int, _WorkerRecord] = {}
        self.labels: dict[int, str] = {}   # every worker ever seen, to name a late result's sender
        self.events: list = []
        self.idle_waiting = 0   # lease calls waiting from workers that hold nothing
        self.next_id = 0
        self.stopped = threading.Event()

    def start_janitor(self) -> None:
        threading.Thread(target=self._janitor, name="pmap-manager-leases", daemon=True).start()

    def _janitor(self) -> None:
        """Expire leases every heartbeat period. Waking up much later than planned means this
        whole process did not run (a long GIL hold, a suspended process): the hosts'
        heartbeats may be waiting unread, so they get a fresh lease rather than a verdict."""
        interval = self.heartbeat_seconds
        planned = time.monotonic() + interval
        while not self.stopped.wait(interval):
            now = time.monotonic()
            self.reap(now, stalled=now - planned > self.lease_seconds / 2)
            planned = time.monotonic() + interval

    # ---- driver side ------------------------------------------------------------------
    def set_function(self, key: str, fn_bytes: bytes) -> None:
        with self.lock:
            self.functions[key] = fn_bytes
            self.functions.move_to_end(key)
            while len(self.functions) > FUNCTIONS_KEPT:
                self.functions.popitem(last=False)

    def put(self, task_id: int, fn_key: str, payload: bytes) -> None:
        with self.lock:
            self.tasks[task_id] = _TaskRecord(fn_key, payload)
            self.queue.append(task_id)
            self.work_ready.notify_all()

    def cancel(self, task_id: int) -> None:
        """Forget a task; if a worker is running it, order that worker killed."""
        with self.lock:
            record = self.tasks.pop(task_id, None)
            if record is None:
                return
            if record.holder is None:
                self.queue.remove(task_id)
                return
            worker = self.workers.get(record.holder)
            if worker is not None and worker.held and worker.held[0] == task_id:
                worker.doomed = True
                host = self.hosts.get(worker.host)
                if host is not None:
                    host.kills.append(worker.pid)
                    self.orders_ready.notify_all()

    def take_events(self, timeout: float | None) -> list:
        with self.lock:
            if not self.events and (timeout is None or timeout > 0):
                self.events_ready.wait(timeout)
            events, self.events = self.events, []
            return events

    def live_workers(self) -> int:
        return len(self.workers)

    def worker_pids_on(self, token: str) -> list[int]:
        with self.lock:
            return [w.pid for w in self.workers.values()
                    if (h := self.hosts.get(w.host)) is not None and h.token == token]

    def host_gone(self, token: str) -> None:
        """The driver saw its local supervisor die: take its tasks back now."""
        with self.lock:
            for host in list(self.hosts.values()):
                if host.token == token:
                    self._drop_host(host, count_expiry=True, reason="the local worker supervisor died")

    def stop(self) -> None:
        self.stopped.set()
        with self.lock:
            self.work_ready.notify_all()
            self.orders_ready.notify_all()
            self.events_ready.notify_all()

    # ---- supervisor side (over the network) ----------------------------------------------
    def hello_host(self, info: dict):
        with self.lock:
            if self.stopped.is_set():
                return None
            self.next_id += 1
            host = _HostRecord(self.next_id, str(info.get("name", "?")), info.get("pid"),
                               info.get("token"), time.monotonic())
            self.hosts[host.id] = host
            return host.id, {"heartbeat": self.heartbeat_seconds}

    def supervise(self, host_id: int, wait: float) -> dict:
        """Heartbeat and long poll for orders: {"stop": bool, "kill": [pid, ...]}."""
        deadline = time.monotonic() + min(wait, 5.0)
        with self.lock:
            host = self.hosts.get(host_id)
            if host is None:
                return {"stop": True, "kill": []}
            while not self.stopped.is_set() and not host.kills:
                self._touch(host)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.orders_ready.wait(remaining)
            self._touch(host)
            kills, host.kills = host.kills, []
            return {"stop": self.stopped.is_set(), "kill": kills}

    def worker_exited(self, host_id: int, pid: int, exitcode) -> None:
        with self.lock:
            host = self.hosts.get(host_id)
            if host is None:
                return
            self._touch(host)
            for worker_id in list(host.workers):
                worker = self.workers.get(worker_id)
                if worker is not None and worker.pid == pid:
                    self._drop_worker(worker, exitcode)

    def leave(self, host_id: int) -> None:
        """A supervisor stopping on its own (Ctrl-C): its tasks go back at once, unblamed."""
        with self.lock:
            host = self.hosts.get(host_id)
            if host is not None:
                self._drop_host(host, count_expiry=False, reason="its host left")
                del self.hosts[host_id]

    # ---- worker side (over the network) ----------------------------------------------
    def hello_worker(self, host_id: int, pid: int):
        with self.lock:
            host = self.hosts.get(host_id)
            if host is None or self.stopped.is_set():
                return None
            self._touch(host)
            self.next_id += 1
            worker = _WorkerRecord(self.next_id, host_id, pid, f"{host.name}:{pid}")
            self.workers[worker.id] = worker
            self.labels[worker.id] = worker.label
            host.workers.add(worker.id)
            return worker.id, self.prefetch

    def initializer(self):
        return self.initializer_bytes

    def function(self, key: str):
        with self.lock:
            return self.functions.get(key)

    def lease(self, worker_id: int, n: int, wait: float):
        """Up to `n` tasks as (task_id, fn_key, payload); [] when none came in `wait` seconds;
        None when the worker should exit. A worker that already holds work gets more (its
        prefetch) only while the queue holds more than the idle workers waiting for it."""
        deadline = time.monotonic() + min(wait, 5.0)
        with self.lock:
            worker = self.workers.get(worker_id)
            if worker is None or self.stopped.is_set() or worker.doomed:
                return None
            idle = not worker.held
            if idle:
                self.idle_waiting += 1
            try:
                while True:
                    if self.stopped.is_set() or worker_id not in self.workers or worker.doomed:
                        return None
                    now_idle = not worker.held
                    if now_idle != idle:
                        self.idle_waiting += 1 if now_idle else -1
                        idle = now_idle
                    others_idle = self.idle_waiting - (1 if idle else 0)
                    if (idle and self.queue) or len(self.queue) > others_idle:
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return []
                    self.work_ready.wait(remaining)
            finally:
                if idle:
                    self.idle_waiting -= 1
            granted = []
            while self.queue and len(granted) < n:
                others_idle = self.idle_waiting
                if (granted or worker.held) and len(self.queue) <= others_idle:
                    break
                task_id = self.queue.popleft()
                record = self.tasks[task_id]
                record.holder = worker_id
                worker.held.append(task_id)
                granted.append((task_id, record.fn_key, record.payload))
            self._start_head(worker)
            if self.queue:
                self.work_ready.notify_all()
            return granted

    def complete(self, worker_id: int, results: list) -> None:
        """Results as (task_id, result_bytes). The first result for a task id wins."""
        with self.lock:
            worker = self.workers.get(worker_id)
            touched = set()
            for task_id, data in results:
                if worker is not None and task_id in worker.held:
                    worker.held.remove(task_id)
                    touched.add(worker)
                record = self.tasks.pop(task_id, None)
                if record is None:
                    continue  # a duplicate, or a task the driver cancelled
                if record.holder is None:
                    self.queue.remove(task_id)
                elif record.holder != worker_id:
                    other = self.workers.get(record.holder)
                    if other is not None and task_id in other.held:
                        other.held.remove(task_id)
                        touched.add(other)
                self.events.append(("done", task_id, self.labels.get(worker_id, "?"), data))
            for each in touched:
                self._start_head(each)
            self.events_ready.notify_all()

    def fatal(self, worker_id: int, error_bytes: bytes) -> None:
        with self.lock:
            self.events.append(("fatal", error_bytes))
            self.events_ready.notify_all()

    # ---- bookkeeping (lock held) --------------------------------------------------------
    def _touch(self, host: _HostRecord) -> None:
        host.last_seen = time.monotonic()
        host.expired = False

    def _start_head(self, worker: _WorkerRecord) -> None:
        """The head of a worker's held tasks is the one it runs: report it started."""
        if worker.doomed or not worker.held:
            return
        record = self.tasks.get(worker.held[0])
        if record is not None and not record.started:
            record.started = True
            self.events.append(Started(worker.held[0], worker.label, time.monotonic()))
            self.events_ready.notify_all()

    def _requeue(self, task_ids, count_expiry: bool, label, reason: str) -> None:
        for task_id in reversed(task_ids):
            record = self.tasks.get(task_id)
            if record is None:
                continue
            if count_expiry and record.started:  # a task that never started cannot be the cause
                record.expiries += 1
                if record.expiries >= MAX_LEASE_EXPIRIES:
                    del self.tasks[task_id]
                    self.events.append(Lost(task_id, label, None,
                                            f"{reason}, {record.expiries} times", blame=True))
                    continue
            record.holder = None
            record.started = False
            self.queue.appendleft(task_id)
        self.work_ready.notify_all()
        self.events_ready.notify_all()

    def _drop_worker(self, worker: _WorkerRecord, exitcode) -> None:
        """A worker process died: its running task is lost (blamed), the others go back."""
        self.workers.pop(worker.id, None)
        host = self.hosts.get(worker.host)
        if host is not None:
            host.workers.discard(worker.id)
        held = list(worker.held)
        worker.held.clear()
        if held and not worker.doomed:
            record = self.tasks.get(held[0])
            if record is not None and record.started:
                del self.tasks[held[0]]
                self.events.append(Lost(held[0], worker.label, exitcode, describe_exit(exitcode), blame=True))
                held = held[1:]
        self._requeue(held, count_expiry=False, label=worker.label, reason="")

    def _drop_host(self, host: _HostRecord, count_expiry: bool, reason: str) -> None:
        host.expired = True
        for worker_id in list(host.workers):
            worker = self.workers.pop(worker_id, None)
            if worker is None:
                continue
            held = list(worker.held)
            worker.held.clear()
            self._requeue(held, count_expiry, worker.label, reason)
        host.workers.clear()

    def reap(self, now: float | None = None, stalled: bool = False) -> None:
        """Re-queue the tasks of hosts whose lease ran out (they stopped heart-beating)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            for host in self.hosts.values():
                if stalled:
                    host.last_seen = max(host.last_seen, now)
                elif not host.expired and now - host.last_seen > self.lease_seconds:
                    self._drop_host(host, count_expiry=True,
                                    reason=f"its host {host.name} stopped heart-beating")


class BrokerClient:
    """A worker's or supervisor's handle on the driver's broker.

    It speaks the `multiprocessing.managers` protocol itself instead of using BaseProxy, for
    three reasons: it sets TCP_NODELAY (the stdlib's connection setup otherwise stalls on
    Nagle's algorithm, ~40 ms per connection), every call has a deadline (a driver that went
    silent is noticed), and there are no reference-count finalizers calling a gone driver."""

    def __init__(self, address: tuple, authkey: bytes, deadline: float | None = DRIVER_SILENCE_SECONDS):
        self.address = address
        self.authkey = authkey
        self.deadline = deadline          # None: wait as long as it takes
        self.local = threading.local()   # one connection per thread, as the server expects
        conn = self._open()
        try:
            self.ident, _ = dispatch(conn, None, "create", ("broker",), {})
        finally:
            conn.close()

    def _open(self):
        conn = Client(self.address, authkey=self.authkey)
        _no_delay(conn)
        return conn

    def call(self, method: str, *args):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self._open()
            dispatch(conn, None, "accept_connection", (threading.current_thread().name,))
            self.local.conn = conn
        try:
            conn.send((self.ident, method, args, {}))
            if self.deadline is not None and not conn.poll(self.deadline):
                raise TimeoutError(f"the driver did not answer {method} within {self.deadline:g}s")
            kind, result = conn.recv()
        except BaseException:
            self.local.conn = None  # its state is unknown now; the next call reconnects
            conn.close()
            raise
        if kind == "#RETURN":
            return result
        if kind == "#ERROR":
            raise result
        raise RemoteError(f"{kind}: {result}")

    def __getattr__(self, name):
        if name in WORKER_METHODS:
            return lambda *args: self.call(name, *args)
        raise AttributeError(name)


def _no_delay(conn) -> None:
    """Send small messages at once: requests and replies alternate, so nothing is gained by
    Nagle's batching and each new connection would lose a delayed-ACK period to it."""
    try:
        sock = socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        finally:
            sock.close()  # a duplicate descriptor; the connection keeps its own
    except OSError:
        pass


# Errors meaning the driver is gone (or refusing us): a worker then exits.
_CONNECTION_LOST = (EOFError, OSError, RemoteError)


class JoinError(PmapError):
    """A worker could not join the driver (unreachable, or the authkey was refused)."""


def connect(address: tuple, authkey: bytes, patience: float = CONNECT_PATIENCE,
            deadline: float | None = DRIVER_SILENCE_SECONDS) -> BrokerClient:
    """A client of the driver's broker; retries a refused connection for `patience` seconds.
    Its calls fail after `deadline` seconds without an answer (None: never)."""
    give_up = time.monotonic() + patience
    while True:
        try:
            return BrokerClient(address, authkey, deadline)
        except AuthenticationError:
            raise JoinError(f"the driver at {format_address(address)} refused the authkey") from None
        except ConnectionRefusedError:
            if time.monotonic() >= give_up:
                raise JoinError(f"no driver is listening at {format_address(address)}") from None
            time.sleep(0.1)
        except (EOFError, OSError) as exc:
            raise JoinError(f"cannot reach the driver at {format_address(address)}: {exc}") from None


# ---- addresses and keys -------------------------------------------------------------------

def parse_address(address) -> tuple[str, int]:
    """("host", port) from "HOST:PORT", "HOST", ":PORT" or a tuple; port 0 picks a free one."""
    if address is None:
        return DEFAULT_HOST, 0
    if isinstance(address, (tuple, list)) and len(address) == 2:
        host, port = address
    elif isinstance(address, str):
        host, sep, port = address.rpartition(":")
        if not sep:
            host, port = address, 0
    else:
        raise ValueError(f"address must be 'HOST:PORT', not {address!r}")
    host = host or DEFAULT_HOST
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"address {address!r}: the port must be a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"address {address!r}: port out of range")
    return host, port


def format_address(address: tuple) -> str:
    return f"{address[0]}:{address[1]}"


def _key_bytes(authkey) -> bytes:
    key = authkey.encode() if isinstance(authkey, str) else bytes(authkey)
    if not key:
        raise ValueError("authkey must not be empty")
    return key


def read_authkey_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        key = handle.read().strip()
    if not key:
        raise ValueError(f"authkey file {path} is empty")
    return key


def write_authkey_file(key: bytes) -> str:
    """Write `key` to a new file only its owner can read (in a private directory); its path."""
    folder = tempfile.mkdtemp(prefix="pmap-manager-")
    path = os.path.join(folder, "authkey")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key + b"\n")
    return path


def _is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.")


# ---- the backend (driver side) ------------------------------------------------------------

def _as_int(name, value, minimum):
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"manager option {name} must be an integer of at least {minimum}, got {value!r}")
    return value


def _as_seconds(name, value):
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"manager option {name} must be a positive number of seconds, got {value!r}")
    return seconds


class ManagerBackend(Backend):
    """Workers lease chunks from a broker in this process; `pmap worker` joins from other hosts."""

    name = "manager"
    kind = "remote"
    reports_start = True
    guarantees = ("workers on any host join with `pmap worker`; leases and heartbeats re-queue the work "
                  "of a lost host (at-least-once); hard timeout; authkey required")

    def __init__(self, workers=None, initializer=None, initargs=(), address=None, authkey=None,
                 authkey_file=None, local_workers=None, prefetch=DEFAULT_PREFETCH,
                 lease_seconds=DEFAULT_LEASE_SECONDS, **options):
        super().__init__(workers, initializer, initargs, **options)
        self.address = parse_address(address)
        self.local_workers = _as_int("local_workers", self.workers if local_workers is None else local_workers, 0)
        self.prefetch = _as_int("prefetch", prefetch, 0)
        self.lease_seconds = _as_seconds("lease_seconds", lease_seconds)
        if authkey is not None and authkey_file is not None:
            raise ValueError("give the manager backend an authkey or an authkey_file, not both")
        self.generated_key_file = None
        self.authkey_file = authkey_file
        if authkey is not None:
            self.authkey = _key_bytes(authkey)
        elif authkey_file is not None:
            self.authkey = read_authkey_file(authkey_file)
        else:
            self.authkey = secrets.token_hex(32).encode()  # 256 random bits, as text one can copy
        self.write_key_file = authkey is None and authkey_file is None
        self.workers = max(1, self.local_workers)
        self.broker: Broker | None = None
        self.server = None
        self.accept_thread = None
        self.closing = False
        self.local_proc: subprocess.Popen | None = None
        self.local_token = secrets.token_hex(8)
        self.local_restarts = 0
        self.inflight: dict[int, int] = {}   # task id -> number of items

    @classmethod
    def unavailable_reason(cls):
        if os.name != "posix":
            return "the manager backend needs a POSIX system (Linux or macOS)"
        return None

    # ---- serving ------------------------------------------------------------------------
    def open(self) -> None:
        if self.broker is not None:
            return
        init_bytes = None
        if self.initializer is not None:
            init_bytes = pickle_function((self.initializer, self.initargs), self.name)
        self.broker = broker = Broker(self.lease_seconds, self.prefetch, init_bytes)
        broker.start_janitor()
        manager_cls = type("_DriverManager", (BaseManager,), {})
        manager_cls.register("broker", callable=lambda: broker, exposed=WORKER_METHODS)
        self.server = manager_cls(address=self.address, authkey=self.authkey).get_server()
        self.server.stop_event = threading.Event()  # read by the connection threads
        self.address = self.server.address
        self.accept_thread = threading.Thread(target=self._accept, name="pmap-manager-accept", daemon=True)
        self.accept_thread.start()
        if self.write_key_file and self.generated_key_file is None:
            self.authkey_file = self.generated_key_file = write_authkey_file(self.authkey)
        if self.generated_key_file is not None or not _is_loopback(self.address[0]):
            self._announce()
        if self.local_workers:
            self._start_local()

    def _accept(self) -> None:
        listener = self.server.listener
        while True:
            try:
                conn = listener.accept()
            except OSError:
                if self.closing:
                    return
                time.sleep(0.01)  # a failed handshake at the socket level; keep serving
                continue
            if self.closing:
                conn.close()
                return
            # The authkey challenge runs in the connection's own thread: a slow or wrong
            # client never blocks the others.
            _no_delay(conn)
            threading.Thread(target=self.server.handle_request, args=(conn,),
                             name="pmap-manager-conn", daemon=True).start()

    def join_command(self) -> str:
        """The command that joins this run from another host."""
        host, port = self.address
        if host in ("0.0.0.0", ""):
            host = socket.gethostname()
        key_file = self.authkey_file or "FILE_HOLDING_THE_AUTHKEY"
        return f"pmap worker {host}:{port} --authkey-file {key_file}"

    def _announce(self) -> None:
        where = format_address(self.address)
        key = f"authkey in {self.generated_key_file} (readable by you only); " if self.generated_key_file else ""
        _say(f"pmap: manager listening on {where}; {key}join with: {self.join_command()}")

    def _start_local(self) -> None:
        config = {"address": self.address, "authkey": self.authkey, "processes": self.local_workers,
                  "sys_path": list(sys.path), "token": self.local_token}
        self.local_proc = subprocess.Popen(
            [sys.executable, "-c", "from pmap.backends.manager import _local_main; _local_main()"],
            stdin=subprocess.PIPE, close_fds=True)
        # The pipe stays open: the supervisor exits when it reads EOF (this process ended).
        self.local_proc.stdin.write(pickle.dumps(config))
        self.local_proc.stdin.flush()

    def _watch_local(self) -> list:
        proc = self.local_proc
        if proc is None or self.closing or proc.poll() is None:
            return []
        self.broker.host_gone(self.local_token)
        code = proc.returncode
        _close_quietly(proc.stdin)
        self.local_proc = None
        if code == EXIT_ERROR or self.local_restarts >= LOCAL_RESTARTS:
            return [Fatal(PmapError(f"the manager's local workers could not run ({describe_exit(code)}); "
                                    "see their messages above"))]
        self.local_restarts += 1
        self._start_local()
        return []

    # ---- the protocol -------------------------------------------------------------------
    def prepare(self, fn, timeout=None):
        self.timeout = timeout
        fn_bytes = pickle_function(fn, self.name)
        fn_key = hashlib.blake2b(fn_bytes, digest_size=12).hexdigest()
        self.broker.set_function(fn_key, fn_bytes)
        return fn_key

    def capacity(self) -> int:
        slots = max(1, self.local_workers, self.broker.live_workers())
        self.workers = slots
        return slots * (1 + self.prefetch) - len(self.inflight)

    def submit(self, task) -> None:
        payload = dumps(task.items)
        self.inflight[task.id] = len(task.items)
        self.broker.put(task.id, task.fn, payload)

    def wait(self, timeout):
        events = self._watch_local()
        for event in self.broker.take_events(0 if events else timeout):
            kind = type(event)
            if kind is Started:
                if event.task_id in self.inflight:
                    events.append(event)
            elif kind is Lost:
                if self.inflight.pop(event.task_id, None) is not None:
                    events.append(event)
            elif event[0] == "done":
                _, task_id, label, data = event
                n_items = self.inflight.pop(task_id, None)
                if n_items is not None:
                    events.append(self._decode_done(task_id, label, data, n_items))
            elif event[0] == "fatal":
                error, tb = loads(event[1])
                error.__cause__ = RemoteTraceback(tb)
                events.append(Fatal(error))
        return events

    @staticmethod
    def _decode_done(task_id, label, data, n_items) -> Done:
        try:
            _, values, failures, elapsed = loads(data)
        except Exception as exc:  # a result type this process cannot import
            return Done(task_id, label, *every_item_failed(n_items, exc), 0.0)
        return Done(task_id, label, values, failures, elapsed)

    def cancel(self, task_id) -> None:
        if self.inflight.pop(task_id, None) is not None:
            self.broker.cancel(task_id)

    def close(self, kill=False) -> None:
        if self.broker is None or self.closing:
            return
        self.closing = True
        local_pids = self.broker.worker_pids_on(self.local_token)
        self.broker.stop()
        proc, self.local_proc = self.local_proc, None
        if proc is not None:
            if kill:
                for pid in local_pids:
                    end_process_group(pid, grace=0.05)
            else:
                try:
                    proc.wait(STOP_GRACE)
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:
                end_process_group(proc.pid, alive=lambda: proc.poll() is None, grace=0.2)
                for pid in local_pids:  # if the supervisor could not take them with it
                    end_process_group(pid, grace=0.05)
            proc.wait()
            _close_quietly(proc.stdin)
        self.server.stop_event.set()
        self._poke_listener()
        self.accept_thread.join(1.0)
        self.server.listener.close()
        self.inflight.clear()
        if self.generated_key_file is not None:
            shutil.rmtree(os.path.dirname(self.generated_key_file), ignore_errors=True)

    def _poke_listener(self) -> None:
        """Wake the accept loop so it sees `closing`."""
        host, port = self.address
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        try:
            socket.create_connection((host, port), timeout=1.0).close()
        except OSError:
            pass


# ---- the worker host: a supervisor and its worker processes ---------------------------------

def run_worker(address: str, authkey_file: str, processes: int) -> int:
    """`pmap worker`: join the driver at `address` with `processes` worker processes and serve
    until the driver ends. Returns the exit status (0 when the driver ended or went away)."""
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
    _warn_if_key_file_is_open(authkey_file)
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


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except OSError:
        pass


def _say(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _warn_if_key_file_is_open(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        _say(f"pmap worker: warning: {path} is readable by others; whoever reads it can run code here "
             f"(chmod 600 {path})")


class _Child:
    __slots__ = ("proc", "ready_r", "joined", "eof")

    def __init__(self, proc, ready_r):
        self.proc = proc
        self.ready_r = ready_r
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
                             name="pmap-worker-heartbeat", daemon=True).start()
            status = self._watch()
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
                try:
                    self.broker.worker_exited(self.host_id, pid, code)
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
        config = {"address": self.address, "authkey": self.authkey, "host_id": self.host_id,
                  "sys_path": self.sys_path, "ready_fd": ready_w}
        proc = subprocess.Popen(
            [sys.executable, "-c", "from pmap.backends.manager import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE, pass_fds=(ready_w,), close_fds=True)
        os.close(ready_w)
        proc.stdin.write(pickle.dumps(config))
        proc.stdin.flush()  # left open: the worker exits when it reads EOF (this process ended)
        self.children[proc.pid] = _Child(proc, ready_r)

    def _end_children(self) -> None:
        children = list(self.children.values())
        for child in children:
            if child.proc.poll() is None:
                end_process_group(child.proc.pid, alive=lambda c=child: c.proc.poll() is None, grace=0.2)
        for child in children:
            child.proc.wait()
            _close_quietly(child.proc.stdin)
            os.close(child.ready_r)
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
        except Exception:
            pass
    os._exit(status)


class _WorkerProcess:
    """The main thread runs tasks and reports each one before starting the next, so the
    broker always knows which task is running (and whom to blame for a crash); a second
    thread leases the next task (the prefetch) while one runs."""

    def __init__(self, config):
        self.config = config
        # No deadline: whether the driver is gone is the supervisor's call (it ends this
        # process); a worker timing out on a driver that is only slow would lose its task.
        self.broker = connect(config["address"], config["authkey"], deadline=None)
        self.worker_id = None
        self.capacity = None
        self.inbox: collections.deque = collections.deque()
        self.busy = 0
        self.room = threading.Condition()
        self.functions: dict = {}

    def run(self) -> int:
        hello = self.broker.hello_worker(self.config["host_id"], os.getpid())
        if hello is None:
            return EXIT_OK
        self.worker_id, prefetch = hello
        self.capacity = 1 + prefetch
        os.write(self.config["ready_fd"], b"j")
        os.close(self.config["ready_fd"])
        init = self.broker.initializer()
        if init is not None:
            try:
                initializer, initargs = loads(init)
                initializer(*initargs)
            except BaseException as exc:
                report = cloudpickle.dumps((portable_exception(exc), traceback.format_exc()))
                self.broker.fatal(self.worker_id, report)
                return EXIT_ERROR
        threading.Thread(target=self._fetch_guarded, name="pmap-worker-lease", daemon=True).start()
        while True:
            with self.room:
                while not self.inbox:
                    self.room.wait()
                task_id, fn_key, payload = self.inbox.popleft()
                self.busy = 1
            result = self._run(task_id, fn_key, payload)
            self.broker.complete(self.worker_id, [(task_id, result)])
            with self.room:
                self.busy = 0
                self.room.notify_all()

    def _run(self, task_id, fn_key, payload) -> bytes:
        items = []
        try:
            items = loads(payload)
            fn = cached_function(fn_key, lambda: self._function_bytes(fn_key), self.functions)
        except Exception as exc:  # e.g. a module the user's code needs is missing on this host
            return encode_result(task_id, *every_item_failed(len(items), exc), 0.0)
        return encode_result(task_id, *run_items(fn, items, catch=WORKER_CATCH))

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
        while True:
            with self.room:
                while len(self.inbox) + self.busy >= self.capacity:
                    self.room.wait()
                want = self.capacity - len(self.inbox) - self.busy
            tasks = self.broker.lease(self.worker_id, want, LEASE_POLL_SECONDS)
            if tasks is None:
                return
            if tasks:
                with self.room:
                    self.inbox.extend(tasks)
                    self.room.notify_all()
