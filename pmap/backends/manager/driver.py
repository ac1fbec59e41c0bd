"""The backend on the driver's side: serves the broker, starts local workers, reports outcomes to the engine."""
from __future__ import annotations

import hashlib
import os
import pickle
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing import AuthenticationError
from multiprocessing.connection import answer_challenge, deliver_challenge
from multiprocessing.managers import BaseManager

from ... import _logs, _transfer, native
from ..._outcome import initializer_error, pack_items
from ..._worker import every_item_failed
from ...errors import InitializerError, PmapError
from .._options import positive_seconds
from .._pooled import pickle_function
from .._procutil import describe_exit, end_process_group
from ..base import AHEAD_CHUNKS_PER_SLOT, Backend, Done, Fatal, Lost, Started
from .wire import (DEFAULT_LEASE_SECONDS, DEFAULT_PREFETCH, EXIT_ERROR, HANDSHAKE_SECONDS, HEARTBEAT_THREAD,
                   LOCAL_RESTARTS, MAX_HANDSHAKES, REFUSAL_LOG_SECONDS, SPLIT, START_WAIT_SECONDS, STOP_GRACE,
                   WORKER_METHODS, WORKER_NOTICE_SECONDS, _Deadline, _close_quietly, _is_loopback,
                   _key_bytes, _no_delay, _say, format_address, held_tasks, logger, parse_address,
                   read_authkey_file, write_authkey_file)
from .broker import Broker


def _as_int(name, value, minimum):
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"manager option {name} must be an integer of at least {minimum}, got {value!r}")
    return value


class ManagerBackend(Backend):
    """Workers lease chunks from a broker in this process; `pmap worker` joins from other hosts."""

    name = "manager"
    kind = "remote"
    random_globals = "own"  # each worker process of a host runs one task at a time
    reports_start = True
    guarantees = ("workers on any host join with `pmap worker`; leases and heartbeats report the work "
                  "of a lost host, which runs again (at-least-once); hard timeout; authkey required")

    def __init__(self, workers=None, initializer=None, initargs=(), address=None, authkey=None,
                 authkey_file=None, local_workers=None, prefetch=DEFAULT_PREFETCH,
                 lease_seconds=DEFAULT_LEASE_SECONDS, start_wait=START_WAIT_SECONDS, **options):
        super().__init__(workers, initializer, initargs, **options)
        self.address = parse_address(address)
        self.local_workers = _as_int("local_workers", self.workers if local_workers is None else local_workers, 0)
        self.prefetch = _as_int("prefetch", prefetch, 0)
        self.lease_seconds = positive_seconds("manager", "lease_seconds", lease_seconds)
        self.start_wait = positive_seconds("manager", "start_wait", start_wait)
        if authkey is not None and authkey_file is not None:
            raise ValueError("give the manager backend an authkey or an authkey_file, not both")
        self.generated_key_file = None
        self.authkey_file = authkey_file
        if authkey is not None:
            self.authkey = _key_bytes(authkey)
        elif authkey_file is not None:
            try:
                self.authkey = read_authkey_file(authkey_file)
            except OSError as exc:
                raise ValueError(f"manager option authkey_file: cannot read {authkey_file}: "
                                 f"{exc.strerror or exc}") from None
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
        self.task_seconds = None             # how long recent tasks took on their workers
        self.no_workers_since = None
        self.told_how_to_join = False

    @classmethod
    def unavailable_reason(cls):
        if os.name != "posix":
            return "the manager backend needs a POSIX system (Linux or macOS)"
        return None

    # ---- serving ------------------------------------------------------------------------
    def open(self) -> None:
        if self.broker is not None:
            return
        # every host forwards its log records from the driver's level up, initializer or not
        init_bytes = pickle_function((self.initializer, self.initargs, _logs.caller_level()), self.name)
        self.broker = broker = Broker(self.lease_seconds, self.prefetch, init_bytes)
        broker.start_janitor()
        manager_cls = type("_DriverManager", (BaseManager,), {})
        manager_cls.register("broker", callable=lambda: broker, exposed=WORKER_METHODS)
        self.server = manager_cls(address=self.address, authkey=self.authkey).get_server()
        self.server.stop_event = threading.Event()  # read by the connection threads
        self.gate = _Gate(self.server, self.authkey, broker)
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
            self.gate.admit(conn, listener.last_accepted)

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
            [sys.executable, "-c", "from pmap.backends.manager.host import _local_main; _local_main()"],
            stdin=subprocess.PIPE, close_fds=True,
            env={**os.environ, **native.worker_env(self)})  # its workers inherit the native thread limits
        # The pipe stays open: the supervisor exits when it reads EOF (this process ended).
        # pmap's own settings, builtins only (no user object): plain pickle, read as a stream.
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
        window = slots * held_tasks(self.prefetch, self.task_seconds)  # what the workers may hold
        # the engine reads ahead by `workers`: let it read as far as the window needs
        self.workers = max(slots, -(-window // AHEAD_CHUNKS_PER_SLOT))
        return window - len(self.inflight)

    def submit(self, task) -> None:
        # By value what the caller's __main__ defines: a worker's own __main__ is not the caller's.
        payload = _transfer.dumps(pack_items(task.items, main_by_value=True))
        self.inflight[task.id] = len(task.items)
        self.broker.put(task.id, task.fn, payload, n_items=len(task.items), clocked=self.timeout is not None)

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
            elif event[0] == "log":
                _logs.handle_sent(event[1])  # before the results that came after it
            elif not any(type(e) is Fatal for e in events):  # the run stops at one: the first is enough
                fatal = self._initializer_fatal(event)
                if fatal is not None:
                    events.append(fatal)
        self._notice_no_workers(time.monotonic())
        return events

    def _notice_no_workers(self, now: float) -> None:
        """Tell the person waiting, once, that no worker has joined and how one joins."""
        if not self.inflight or self.broker.live_workers():
            self.no_workers_since = None
            self.told_how_to_join = False
            return
        self.no_workers_since = self.no_workers_since or now
        if not self.told_how_to_join and now - self.no_workers_since > WORKER_NOTICE_SECONDS:
            self.told_how_to_join = True
            _say(f"pmap: manager at {format_address(self.address)} has tasks waiting and no workers; "
                 f"join with: {self.join_command()}")

    def _initializer_fatal(self, event) -> Fatal | None:
        """The broker's word that an initializer failed, as the one InitializerError every
        backend gives; None for a worker that died starting when there is no initializer."""
        if self.initializer is None:  # only pmap's own set-up (log forwarding) ran
            name = "(pmap's worker set-up)"
        else:
            name = getattr(self.initializer, "__qualname__", None) or type(self.initializer).__name__
        if event[0] == "initializer-failed":
            _, label, report = event
            return Fatal(initializer_error(name, "manager", label, report))
        if event[0] == "died-starting" and self.initializer is not None:
            _, label, exitcode = event
            return Fatal(InitializerError(f"the initializer {name} ended worker {label} of backend 'manager' "
                                          f"({describe_exit(exitcode)}) before it could run anything"))
        return None

    def _decode_done(self, task_id, label, data, n_items) -> Done | Lost:
        try:
            decoded = _transfer.loads(data)
        except Exception as exc:  # the message itself does not load (values and exceptions load per item)
            return Done(task_id, label, *every_item_failed(n_items, exc), 0.0)
        if decoded[0] == SPLIT:  # an item did not unpickle in the worker: the engine runs each alone
            return Lost(task_id, label, None, decoded[1], blame=False)
        _, values, failures, elapsed = decoded
        self.task_seconds = elapsed if self.task_seconds is None else (self.task_seconds + elapsed) / 2
        return Done(task_id, label, values, failures, elapsed)

    def wake(self) -> None:
        if self.broker is not None:
            self.broker.wake()

    def cancel(self, task_id) -> None:
        if self.inflight.pop(task_id, None) is not None:
            self.broker.cancel(task_id)

    def close(self, kill=False) -> None:
        if self.broker is None or self.closing:
            return
        self.closing = True
        local_pids = self.broker.worker_pids_on(self.local_token)
        self.broker.stop()
        if not kill:
            self.broker.wait_for_hosts_to_leave(STOP_GRACE)
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


class _Gate:
    """Authenticates each new connection in a thread of its own, with a deadline, at most
    MAX_HANDSHAKES at once (more are closed at once), and serves only the requests the
    workers make. A refused peer gets nothing back (no traceback); refusals are logged, at
    most once per REFUSAL_LOG_SECONDS."""

    REQUESTS = ("create", "accept_connection")

    def __init__(self, server, authkey: bytes, broker: Broker):
        self.server = server
        self.authkey = authkey
        self.broker = broker
        self.lock = threading.Lock()
        self.pending = 0
        self.refused = 0
        self.last_refusal = ""
        self.logged_at = -REFUSAL_LOG_SECONDS

    def admit(self, conn, peer) -> None:
        with self.lock:
            full = self.pending >= MAX_HANDSHAKES
            if not full:
                self.pending += 1
        if full:
            self._refused(peer, f"more than {MAX_HANDSHAKES} connections were authenticating")
            conn.close()
            return
        _no_delay(conn)
        threading.Thread(target=self._serve, args=(conn, peer), name="pmap-manager-conn", daemon=True).start()

    def _serve(self, conn, peer) -> None:
        try:
            try:
                with _Deadline(conn, HANDSHAKE_SECONDS):
                    deliver_challenge(conn, self.authkey)
                    answer_challenge(conn, self.authkey)
                    request = conn.recv()  # authenticated: a worker's own request
            finally:
                with self.lock:
                    self.pending -= 1
            _, name, args, kwargs = request
            if name not in self.REQUESTS:
                raise ValueError(f"unexpected request {name!r}")
        except Exception as exc:  # logged before the connection closes, so the log comes first
            self._refused(peer, _refusal_reason(exc))
            conn.close()
            return
        try:
            self._dispatch(conn, name, args, kwargs)
        finally:
            conn.close()

    def _dispatch(self, conn, name, args, kwargs) -> None:
        server = self.server
        try:
            if name == "accept_connection":
                server.accept_connection(conn, *args, **kwargs)  # serves it until it closes
            else:
                conn.send(("#RETURN", getattr(server, name)(conn, *args, **kwargs)))
        except (SystemExit, EOFError, OSError):  # the peer went away
            pass
        except Exception:
            try:
                conn.send(("#TRACEBACK", traceback.format_exc()))  # an authenticated peer
            except OSError:  # the peer hung up: it cannot be told why
                pass
        finally:
            thread_name = threading.current_thread().name  # accept_connection set the peer's
            if name == "accept_connection" and thread_name.startswith(HEARTBEAT_THREAD):
                try:
                    host_id = int(thread_name[len(HEARTBEAT_THREAD):])
                except ValueError:
                    host_id = None
                if host_id is not None:
                    self.broker.connection_lost(host_id)

    def _refused(self, peer, reason: str) -> None:
        """Count a refused connection; log the count at most once per REFUSAL_LOG_SECONDS."""
        where = format_address(peer) if isinstance(peer, tuple) else str(peer)
        with self.lock:
            self.refused += 1
            self.last_refusal = f"{where}: {reason}"
            now = time.monotonic()
            if now - self.logged_at < REFUSAL_LOG_SECONDS:
                return
            self.logged_at = now
            count, self.refused = self.refused, 0
            last = self.last_refusal
        logger.warning("pmap manager: refused %d connection(s) in the last %gs; latest from %s",
                       count, REFUSAL_LOG_SECONDS, last)


def _refusal_reason(exc: BaseException) -> str:
    if isinstance(exc, AuthenticationError):
        return "wrong authkey"
    if isinstance(exc, TimeoutError):
        return f"no handshake within {HANDSHAKE_SECONDS:g}s"
    if isinstance(exc, EOFError):
        return "closed the connection during the handshake"
    return f"{type(exc).__name__}: {exc}"[:200]  # garbage, a reset, a peer speaking another protocol
