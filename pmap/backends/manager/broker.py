"""The broker: lives in the driver, leases tasks to workers and tracks hosts; it handles bytes only.

It decides nothing about retries: a task whose worker died or whose host went silent is
reported `Lost` (blamed only when it was running on a worker process that died, as that
worker's supervisor says), and the engine decides whether its items run again. It accepts a
result only from the worker that holds the task's lease."""
from __future__ import annotations

import collections
import threading
import time

from .._procutil import describe_exit
from ..base import Lost, Started
from .wire import FUNCTIONS_KEPT, logger

# What a worker process is doing, as far as the broker knows.
STARTING = "starting"   # joined; fetching and running the initializer, no lease asked yet
SERVING = "serving"     # asked for a lease: its initializer (if any) ran
FAILED = "failed"       # reported its initializer's failure


class _TaskRecord:
    __slots__ = ("fn_key", "payload", "n_items", "clocked", "holder", "started")

    def __init__(self, fn_key, payload, n_items, clocked):
        self.fn_key = fn_key
        self.payload = payload
        self.n_items = n_items  # travels with the lease: a worker that cannot unpickle the
        # payload still knows how many items to report
        self.clocked = clocked  # travels with the lease: its start is clocked (a timeout), so the
        # worker reports all it finished before starting it, and it alone as soon as it ends
        self.holder = None      # worker id holding the lease, None while queued
        self.started = False


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
    __slots__ = ("id", "host", "pid", "label", "held", "doomed", "state", "ready", "woken")

    def __init__(self, worker_id, host, pid, label, lock):
        self.id = worker_id
        self.host = host
        self.pid = pid
        self.label = label
        self.held: collections.deque = collections.deque()  # leased task ids, run in this order
        self.doomed = False     # a kill was ordered: its head was cancelled, nothing more starts
        self.state = STARTING
        self.ready = threading.Condition(lock)  # its waiting lease call is woken through this alone
        self.woken = False      # woken for a queued task and not yet back in the lock


class Broker:
    """Task queue, leases and results. Workers reach the methods in WORKER_METHODS over the
    network (see BrokerClient); the driver's backend calls the others directly."""

    def __init__(self, lease_seconds: float, prefetch: int, initializer_bytes: bytes | None):
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = max(0.05, min(1.0, lease_seconds / 5))
        self.prefetch = prefetch
        self.initializer_bytes = initializer_bytes
        self.lock = threading.Lock()
        self.events_ready = threading.Condition(self.lock)
        self.orders_ready = threading.Condition(self.lock)
        self.tasks: dict[int, _TaskRecord] = {}
        self.queue: collections.deque = collections.deque()
        self.functions: collections.OrderedDict = collections.OrderedDict()
        self.hosts: dict[int, _HostRecord] = {}
        self.workers: dict[int, _WorkerRecord] = {}
        self.labels: dict[int, str] = {}   # every worker ever seen, to name a late result's sender
        self.events: list = []
        # Workers whose lease call waits for work, in the order they came: a new task wakes one
        # of them, not all (each woken thread would take the lock only to find the task gone).
        self.waiting: dict[int, _WorkerRecord] = {}
        self.woken = 0          # of them, woken for a task and not yet back
        self.driver_woken = False  # wake(): the driver's next take_events returns at once
        self.next_id = 0
        self.refused_results = 0  # results (and reports) not from the worker holding the lease
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

    def put(self, task_id: int, fn_key: str, payload: bytes, n_items: int = 1, clocked: bool = False) -> None:
        """Queue a task of `n_items` items, pickled in `payload`; `clocked`: the driver times it
        from its start, which the broker must then see as it happens."""
        with self.lock:
            self.tasks[task_id] = _TaskRecord(fn_key, payload, n_items, clocked)
            self.queue.append(task_id)
            self._wake_one()

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
                worker.ready.notify()  # its waiting lease call ends: nothing more starts there
                host = self.hosts.get(worker.host)
                if host is not None:
                    host.kills.append(worker.pid)
                    self.orders_ready.notify_all()

    def take_events(self, timeout: float | None) -> list:
        with self.lock:
            if not self.events and not self.driver_woken and (timeout is None or timeout > 0):
                self.events_ready.wait(timeout)
            self.driver_woken = False
            events, self.events = self.events, []
            return events

    def wake(self) -> None:
        with self.lock:
            self.driver_woken = True
            self.events_ready.notify_all()

    def live_workers(self) -> int:
        return len(self.workers)

    def worker_pids_on(self, token: str) -> list[int]:
        with self.lock:
            return [w.pid for w in self.workers.values()
                    if (h := self.hosts.get(w.host)) is not None and h.token == token]

    def host_gone(self, token: str) -> None:
        """The driver saw its local supervisor die: its tasks are lost now."""
        with self.lock:
            for host in list(self.hosts.values()):
                if host.token == token:
                    self._drop_host(host, reason="the local worker supervisor died")

    def stop(self) -> None:
        self.stopped.set()
        with self.lock:
            for worker in self.waiting.values():
                worker.ready.notify()
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

    def worker_exited(self, host_id: int, pid: int, exitcode, running: int | None = None) -> None:
        """Worker process `pid` of the host ended with `exitcode`; `running`: the task it was
        running then (its supervisor read it from the slot the worker writes), None if none."""
        with self.lock:
            host = self.hosts.get(host_id)
            if host is None:
                return
            self._touch(host)
            for worker_id in list(host.workers):
                worker = self.workers.get(worker_id)
                if worker is not None and worker.pid == pid:
                    self._drop_worker(worker, exitcode, running)

    def connection_lost(self, host_id: int) -> None:
        """A host's heartbeat connection closed: it died or lost the network. Its tasks are
        reported lost now rather than when its lease runs out, so an ordered run does not
        stall on them."""
        with self.lock:
            host = self.hosts.get(host_id)
            if host is not None and not host.expired:
                if self.stopped.is_set():
                    host.expired = True  # gone after the run: nothing of it to report
                    self.orders_ready.notify_all()
                else:
                    self._drop_host(host, reason=f"its host {host.name} closed its connection")

    def leave(self, host_id: int) -> None:
        """A supervisor stopping on its own (Ctrl-C): its tasks are reported lost at once. One
        that heard the driver's stop says so too, so the driver knows it may exit."""
        with self.lock:
            host = self.hosts.get(host_id)
            if host is not None:
                self._drop_host(host, reason=f"its host {host.name} left")
                del self.hosts[host_id]
                self.orders_ready.notify_all()  # a closing driver may wait for the last to leave

    def wait_for_hosts_to_leave(self, timeout: float) -> None:
        """After `stop`: wait up to `timeout` seconds until every connected host has heard it and
        left. A driver that exited sooner would cut off a stop on its way, and the host would
        take the silence for a lost driver."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while any(not host.expired for host in self.hosts.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self.orders_ready.wait(remaining)

    # ---- worker side (over the network) ----------------------------------------------
    def hello_worker(self, host_id: int, pid: int):
        with self.lock:
            host = self.hosts.get(host_id)
            if host is None or self.stopped.is_set():
                return None
            self._touch(host)
            self.next_id += 1
            worker = _WorkerRecord(self.next_id, host_id, pid, f"{host.name}:{pid}", self.lock)
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
        """Up to `n` tasks as (task_id, fn_key, n_items, payload, clocked); [] when none came in `wait`
        seconds; None when the worker should exit. A worker that already holds work gets more
        (its prefetch) only while the queue holds more than the idle workers waiting for it."""
        deadline = time.monotonic() + min(wait, 5.0)
        with self.lock:
            worker = self.workers.get(worker_id)
            if worker is None or self.stopped.is_set() or worker.doomed or worker.state == FAILED:
                return None
            worker.state = SERVING  # it asks for work only once its initializer ran
            self.waiting[worker_id] = worker
            taking = False
            try:
                while True:
                    if self.stopped.is_set() or worker_id not in self.workers or worker.doomed:
                        return None
                    if self.queue and (not worker.held or len(self.queue) > self._idle_waiting(worker)):
                        taking = True
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return []
                    worker.ready.wait(remaining)
                    self._back(worker)
            finally:
                self._back(worker)
                del self.waiting[worker_id]
                if not taking and self.queue:
                    self._wake_one()  # it may have been woken for a task it does not take: pass it on
            return self._grant(worker, n)

    def _idle_waiting(self, worker: _WorkerRecord) -> int:
        """Workers other than `worker` that hold nothing and wait for work (lock held)."""
        return sum(1 for other in self.waiting.values() if not other.held and other is not worker)

    def _back(self, worker: _WorkerRecord) -> None:
        """A woken lease call holds the lock again (lock held)."""
        if worker.woken:
            worker.woken = False
            self.woken -= 1

    def _wake_one(self) -> None:
        """Wake one waiting lease call that may take a queued task, an idle worker's first, unless
        as many are already on their way as there are tasks (lock held)."""
        if self.woken >= len(self.queue):
            return
        chosen = None
        for worker in self.waiting.values():
            if worker.woken:
                continue
            if not worker.held:
                chosen = worker
                break
            chosen = chosen or worker  # a busy one takes it only if no idle one waits
        if chosen is not None:
            chosen.woken = True
            self.woken += 1
            chosen.ready.notify()

    def _grant(self, worker: _WorkerRecord, n: int) -> list:
        """Lease up to `n` queued tasks to `worker`, each its own lease; one that already holds
        work takes only what the idle workers waiting leave over (lock held)."""
        granted = []
        others_idle = self._idle_waiting(worker) if self.queue else 0
        while self.queue and len(granted) < n:
            if (granted or worker.held) and len(self.queue) <= others_idle:
                break
            task_id = self.queue.popleft()
            record = self.tasks[task_id]
            record.holder = worker.id
            worker.held.append(task_id)
            granted.append((task_id, record.fn_key, record.n_items, record.payload, record.clocked))
        self._start_head(worker)
        if self.queue:
            self._wake_one()
        return granted

    def complete(self, worker_id: int, results: list, want: int = 0) -> list:
        """Results as (task_id, result_bytes), several in one call while tasks are short. One
        is delivered only when `worker_id` is a registered worker holding the task's current
        lease; a result for a task the driver cancelled meanwhile is dropped quietly, any other
        is refused: counted, never delivered. Returns up to `want` more tasks leased to the
        worker from what is queued now (as `lease` does, without waiting): a worker busy with
        short tasks needs one round trip per batch of them."""
        refusals = []
        granted = []
        with self.lock:
            worker = self.workers.get(worker_id)
            for task_id, data in results:
                held = worker is not None and task_id in worker.held
                record = self.tasks.get(task_id) if held else None
                if held and record is None:  # cancelled by the driver while it ran
                    worker.held.remove(task_id)
                elif record is not None and record.holder == worker_id:
                    worker.held.remove(task_id)
                    del self.tasks[task_id]
                    self.events.append(("done", task_id, worker.label, data))
                else:
                    refusals.append(f"a result for task {task_id!r} {self._not_holding(worker_id, task_id)}")
            if worker is not None and worker_id in self.workers:
                if want > 0 and not worker.doomed and not self.stopped.is_set():
                    granted = self._grant(worker, want)
                else:
                    self._start_head(worker)
                if not worker.held and self.queue and worker_id in self.waiting and not worker.woken:
                    worker.woken = True  # its waiting lease call may take work now that it holds none
                    self.woken += 1
                    worker.ready.notify()
            self.events_ready.notify_all()
        self._refused(refusals)
        return granted

    def log(self, worker_id: int, record_bytes: bytes) -> None:
        """A log record (pickled) a worker sends as it writes it, so that it arrives even when
        the worker dies or hangs right after; accepted from a registered worker only."""
        with self.lock:
            accepted = worker_id in self.workers
            if accepted:
                self.events.append(("log", record_bytes))
                self.events_ready.notify_all()
        if not accepted:
            self._refused([f"a log record {self._not_holding(worker_id, None)}"])  # not registered (now)

    def fatal(self, worker_id: int, error_bytes: bytes) -> None:
        """A worker's initializer failed: `error_bytes` pickle (exception, traceback text)."""
        with self.lock:
            worker = self.workers.get(worker_id)
            accepted = worker is not None and worker.state == STARTING
            if accepted:
                worker.state = FAILED
                self.events.append(("initializer-failed", worker.label, error_bytes))
                self.events_ready.notify_all()
        if not accepted:
            self._refused([f"an initializer failure from worker id {worker_id!r}, which is not starting"])

    def _not_holding(self, worker_id, task_id) -> str:
        """Why `worker_id` does not hold `task_id`'s lease (lock held)."""
        if worker_id in self.workers:
            return f"from worker {self.labels[worker_id]}, which does not hold its lease"
        if worker_id in self.labels:
            return f"from worker {self.labels[worker_id]}, dropped since (its process or host was lost)"
        return f"from worker id {worker_id!r}, which never registered"

    def _refused(self, refusals: list) -> None:
        """Count refused reports; log the first one this broker refuses (called without the lock)."""
        if not refusals:
            return
        with self.lock:
            first = self.refused_results == 0
            self.refused_results += len(refusals)
        if first:
            logger.warning("pmap manager: refused %s; a worker's result is accepted only from the worker "
                           "holding the task's lease (later refusals are counted, not logged)", refusals[0])

    # ---- bookkeeping (lock held) --------------------------------------------------------
    def _touch(self, host: _HostRecord) -> None:
        host.last_seen = time.monotonic()
        host.expired = False

    def _start_head(self, worker: _WorkerRecord) -> None:
        """The head of a worker's held tasks is the one it runs next (or runs: a worker reports
        what it finished before it starts a clocked task): report it started."""
        if worker.doomed or not worker.held:
            return
        record = self.tasks.get(worker.held[0])
        if record is not None and not record.started:
            record.started = True
            self.events.append(Started(worker.held[0], worker.label, time.monotonic()))
            self.events_ready.notify_all()

    def _lose_held(self, worker: _WorkerRecord, exitcode, reason: str, died_running: int | None = None,
                   process_died: bool = False) -> None:
        """Report every task `worker` held as Lost. When its process died, the task it was
        running then (`died_running`) is blamed (the task may be the cause), the others (queued
        on the worker, or finished and not yet reported) are not. Nothing goes back to the
        queue: whether the items run again is the engine's decision."""
        for task_id in worker.held:
            record = self.tasks.pop(task_id, None)
            if record is None:
                continue  # cancelled by the driver, which expects nothing more of it
            blame = process_died and task_id == died_running
            why = f"{reason}, while not running this task" if process_died and not blame else reason
            self.events.append(Lost(task_id, worker.label, exitcode, why, blame=blame))
        worker.held.clear()
        self.events_ready.notify_all()

    def _drop_worker(self, worker: _WorkerRecord, exitcode, running: int | None) -> None:
        """A worker process died: its `running` task is lost (blamed), the others it held are
        lost unblamed. One that died before asking for work died in its initializer."""
        self.workers.pop(worker.id, None)
        worker.ready.notify()  # a waiting lease call of its ends
        host = self.hosts.get(worker.host)
        if host is not None:
            host.workers.discard(worker.id)
        if worker.state == STARTING:
            self.events.append(("died-starting", worker.label, exitcode))
        self._lose_held(worker, exitcode, describe_exit(exitcode), running, process_died=True)

    def _drop_host(self, host: _HostRecord, reason: str) -> None:
        """A host is gone (silent past its lease, disconnected, or left): every task its workers
        held is lost, unblamed (a host is not lost by one of its items)."""
        host.expired = True
        for worker_id in list(host.workers):
            worker = self.workers.pop(worker_id, None)
            if worker is not None:
                worker.ready.notify()
                self._lose_held(worker, None, reason)
        host.workers.clear()

    def reap(self, now: float | None = None, stalled: bool = False) -> None:
        """Report lost the tasks of hosts whose lease ran out (they stopped heart-beating)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            for host in self.hosts.values():
                if stalled:
                    host.last_seen = max(host.last_seen, now)
                elif not host.expired and now - host.last_seen > self.lease_seconds:
                    self._drop_host(host, reason=f"its host {host.name} stopped heart-beating "
                                                 f"for {self.lease_seconds:g}s")
