"""The manager's wire: its numbers, addresses and keys, and authenticated connections with deadlines."""
from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from multiprocessing.managers import RemoteError, dispatch

from ...errors import PmapError


DEFAULT_HOST = "127.0.0.1"
DEFAULT_LEASE_SECONDS = 10.0   # a host silent this long is presumed gone and its tasks reported lost
DEFAULT_PREFETCH = 1           # tasks a worker holds beyond the one it runs
HELD_SECONDS = 0.05            # ... or, while tasks are short, about this much work
MAX_HELD_TASKS = 32            # ... but never more tasks than this
REPORT_SECONDS = 0.05          # a worker running short tasks holds a finished result about this long at most
LEASE_POLL_SECONDS = 0.5       # longest a worker's lease call waits at the broker for work
CONNECT_PATIENCE = 5.0         # a worker retries a refused connection this long (driver starting)
DRIVER_SILENCE_SECONDS = 30.0  # a supervisor that cannot reach its driver this long gives up
LOCAL_RESTARTS = 3             # times the driver restarts a local supervisor that died
STOP_GRACE = 2.0               # seconds a closing driver waits for its local workers to leave
FUNCTIONS_KEPT = 16            # functions the broker remembers, for a Pool that maps many
CHILD_START_FAILURES = 3       # worker processes in a row dying before they joined: give up
START_WAIT_SECONDS = 30.0      # with a timeout: how much longer a task may wait for a worker to start it
WORKER_NOTICE_SECONDS = 5.0    # tasks waiting this long with no worker joined: say how to join
HANDSHAKE_SECONDS = 5.0        # a peer must complete the authkey handshake within this, either way
MAX_HANDSHAKES = 32            # connections the driver authenticates at once; more are closed at once
REFUSAL_LOG_SECONDS = 10.0     # the driver logs refused connections at most this often
HEARTBEAT_THREAD = "pmap-heartbeat-"  # + host id: the connection whose loss means the host is gone
# A worker's result for a task of several items one of which it could not unpickle
# (`_outcome.SplitTask`): ("pmap-split", reason) in place of an encoded result. The driver reports the task lost, unblamed, so that the engine
# runs each item alone and only the one that cannot be rebuilt fails.
SPLIT = "pmap-split"

logger = logging.getLogger("pmap.manager")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Methods a worker or supervisor may call over the network; the rest are the driver's own.
WORKER_METHODS = ("hello_host", "supervise", "worker_exited", "leave", "hello_worker",
                  "initializer", "function", "lease", "complete", "fatal", "log")


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
        return dial(self.address, self.authkey)

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


def dial(address: tuple, authkey: bytes, patience: float = 2 * HANDSHAKE_SECONDS) -> Connection:
    """An authenticated connection to the driver. The handshake has a deadline (an address
    that accepts connections but never answers is not waited on forever); a connection the
    driver closed before the handshake (it was at its cap) is tried again for `patience`."""
    give_up = time.monotonic() + patience
    while True:
        try:
            sock = socket.create_connection(address, timeout=HANDSHAKE_SECONDS)
        except TimeoutError:
            raise ConnectionError(f"connecting timed out after {HANDSHAKE_SECONDS:g}s") from None
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(sock.detach())
        try:
            with _Deadline(conn, HANDSHAKE_SECONDS):
                answer_challenge(conn, authkey)
                deliver_challenge(conn, authkey)
            return conn
        except (EOFError, ConnectionResetError):
            conn.close()
            if time.monotonic() >= give_up:
                raise
            time.sleep(0.1)
        except BaseException:
            conn.close()
            raise


class _Deadline:
    """Within the block, a connection that sees no progress for `seconds` is shut down, so
    a read blocked on it ends; the block then raises TimeoutError."""

    def __init__(self, conn: Connection, seconds: float):
        self.conn = conn
        self.lock = threading.Lock()
        self.finished = False
        self.expired = False
        self.seconds = seconds
        self.timer = threading.Timer(seconds, self._expire)
        self.timer.daemon = True

    def __enter__(self):
        self.timer.start()
        return self

    def _expire(self) -> None:
        with self.lock:
            if self.finished:
                return
            self.expired = True
            try:
                sock = socket.socket(fileno=os.dup(self.conn.fileno()))
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                finally:
                    sock.close()
            except OSError:
                pass

    def __exit__(self, kind, error, tb):
        with self.lock:
            self.finished = True
            self.timer.cancel()
        if self.expired and (kind is None or issubclass(kind, (EOFError, OSError))):
            raise TimeoutError(f"no handshake within {self.seconds:g}s")
        return False


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


def held_tasks(prefetch: int, task_seconds: float | None) -> int:
    """How many tasks a worker holds (the one it runs included): 1 + `prefetch`, or while its
    tasks take `task_seconds` each, enough for about HELD_SECONDS of work, so one round trip to
    the broker serves many short tasks. With prefetch 0 a worker holds only the task it runs."""
    if prefetch == 0 or task_seconds is None:
        return 1 + prefetch
    return 1 + max(prefetch, min(MAX_HELD_TASKS - 1, int(HELD_SECONDS / max(task_seconds, 1e-6))))


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
        except TimeoutError:
            raise JoinError(f"{format_address(address)} accepted the connection but did not answer the "
                            f"handshake within {HANDSHAKE_SECONDS:g}s; is a pmap manager run listening "
                            "there?") from None
        except ConnectionRefusedError:
            if time.monotonic() >= give_up:
                raise JoinError(f"no driver is listening at {format_address(address)}") from None
            time.sleep(0.1)
        except (EOFError, OSError) as exc:
            raise JoinError(f"cannot reach the driver at {format_address(address)}: {exc}") from None



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
    with open(os.path.expanduser(path), "rb") as handle:
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


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except OSError:
        pass


def _say(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
