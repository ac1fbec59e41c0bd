"""dask: one dask task per chunk on a dask.distributed cluster (optional: `pmap-parallel[dask]`).

The cluster is, in order of preference: a `Client` given as `client=`, a scheduler at
`address=`, the current default Client of this process, or a LocalCluster started when the
backend opens (worker processes, one thread each, bound to loopback) and closed with it.
`cluster_options` go to that LocalCluster.

Futures are kept in a bounded window and collected through `as_completed`, so lazy and
infinite inputs work. Items and results travel as pickled bytes made by pmap, so an item or
result that cannot be pickled fails alone, as on the other process backends. A task whose
workers died (twice on pmap's own LocalCluster; as often as the cluster's
`allowed-failures` allows elsewhere) is reported by dask as `KilledWorker`, and by pmap as a
crash, retried under `retries`. A
timeout cannot stop a running dask task: its future is cancelled and the item reported, but
the worker's thread runs on until the item returns. Each task reports its start through
dask's event log, so a timeout is clocked from then, not from when the task was queued.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import queue
import socket
import threading
import time
import uuid

from .._worker import WORKER_CATCH, cached_function, dumps, encode_result, every_item_failed, loads, run_items
from ..errors import BackendUnavailable
from ._pooled import pickle_function
from .base import Backend, Done, Lost, Started

MISSING = "needs the distributed package: pip install 'pmap-parallel[dask]'"
# One future per worker thread. Dask's scheduler queues only large task groups; a smaller
# window is assigned to workers at once, so a larger one would stack tasks on a worker, and a
# worker's death would then implicate every task stacked on it.
TASKS_PER_THREAD = 1
THREAD_COUNT_REFRESH = 1.0  # seconds between asking the scheduler how many threads it has


# ---- what runs on a dask worker ----------------------------------------------------------------

_INITIALIZED: set = set()
_INIT_LOCK = threading.Lock()


def run_chunk(fn_key: str, fn_bytes: bytes, init_key, init_bytes, payload: bytes,
              start_topic=None, task_id=None) -> tuple:
    """One pmap task on a dask worker: returns (worker label, encoded result)."""
    label = f"{socket.gethostname()}:{os.getpid()}"
    if start_topic is not None:
        _report_start(start_topic, task_id, label)
    items = []
    try:
        if init_bytes is not None and init_key not in _INITIALIZED:
            with _INIT_LOCK:  # a worker with several threads runs the initializer once
                if init_key not in _INITIALIZED:
                    initializer, initargs = loads(init_bytes)
                    initializer(*initargs)
                    _INITIALIZED.add(init_key)
        items = loads(payload)
        fn = cached_function(fn_key, lambda: fn_bytes)
    except Exception as exc:  # e.g. a module the function needs is missing on this worker
        return label, encode_result(None, *every_item_failed(len(items), exc), 0.0)
    return label, encode_result(None, *run_items(fn, items, catch=WORKER_CATCH))


def _report_start(topic, task_id, label) -> None:
    """Tell the client this task started, so its timeout is clocked from now, not from submit."""
    try:
        from distributed import get_worker
        get_worker().log_event(topic, (task_id, label))
    except Exception:  # not on a dask worker (called directly): nobody to tell
        pass


# ---- the backend ---------------------------------------------------------------------------------

def local_cluster(workers: int, **options):
    """A small LocalCluster for pmap: worker processes with one thread each, on loopback,
    no dashboard. `options` go to LocalCluster as they are.

    With one thread per worker and one task per thread in flight, a worker's death nearly
    always implicates only the task it ran; the scheduler reports a task after its second
    worker death (allowed_failures 1: a task that shared a death by bad timing gets one more
    try), and retrying beyond that is left to pmap's `retries`, as on every backend."""
    import logging

    from distributed import LocalCluster
    settings = dict(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                    dashboard_address=None, silence_logs=logging.ERROR,
                    scheduler_kwargs={"allowed_failures": 1})
    settings.update(options)
    return LocalCluster(**settings)


class DaskBackend(Backend):
    """Chunks become dask tasks on a dask.distributed cluster."""

    name = "dask"
    kind = "remote"
    reports_start = True
    guarantees = ("runs on a dask.distributed cluster or a LocalCluster; a crash is retried by dask, "
                  "then reported; a timeout cannot stop a running task")

    def __init__(self, workers=None, initializer=None, initargs=(), client=None, address=None,
                 cluster_options=None, **options):
        super().__init__(workers, initializer, initargs, **options)
        if client is not None and address is not None:
            raise ValueError("give the dask backend a client or an address, not both")
        self.given_client = client
        self.address = address
        self.cluster_options = dict(cluster_options or {})
        self.client = None
        self.cluster = None
        self.owns_client = False
        self.completed = None
        self.futures: dict[int, object] = {}   # task id -> its future, while in flight
        self.task_ids: dict[str, int] = {}     # future key -> task id
        self.fn_args = None
        self.init_args = (None, None)
        self.run_prefix = uuid.uuid4().hex[:12]
        self.threads_checked = 0.0
        self.start_topic = f"pmap-start-{self.run_prefix}"
        self.starts: queue.SimpleQueue = queue.SimpleQueue()

    @classmethod
    def unavailable_reason(cls):
        try:
            found = importlib.util.find_spec("distributed") is not None
        except (ImportError, ValueError):
            found = False
        return None if found else MISSING

    # ---- connecting ----------------------------------------------------------------------
    def open(self) -> None:
        if self.client is not None:
            return
        try:
            from distributed import Client, as_completed, default_client
        except ImportError as exc:  # present but broken
            raise BackendUnavailable(f"backend 'dask' is unavailable: {MISSING} ({exc})") from exc
        if self.given_client is not None:
            self.client = self.given_client
        elif self.address is not None:
            self.client = Client(self.address, set_as_default=False)
            self.owns_client = True
        else:
            try:
                self.client = default_client()
            except ValueError:  # no client in this process: start a cluster of our own
                self.cluster = local_cluster(self.workers, **self.cluster_options)
                self.client = Client(self.cluster, set_as_default=False)
                self.owns_client = True
        self.completed = as_completed(loop=self.client.loop, with_results=True)
        self.client.subscribe_topic(self.start_topic, self._on_start)
        self._refresh_threads(force=True)
        if self.initializer is not None:
            init_bytes = pickle_function((self.initializer, self.initargs), self.name)
            init_key = hashlib.blake2b(init_bytes, digest_size=12).hexdigest()
            self.init_args = (init_key, init_bytes)

    def _on_start(self, event) -> None:
        """Runs in the client's event loop thread for each start a task reports."""
        _, (task_id, label) = event
        self.starts.put(Started(task_id, label, time.monotonic()))

    def _refresh_threads(self, force=False) -> int:
        now = time.monotonic()
        if force or now - self.threads_checked > THREAD_COUNT_REFRESH:
            self.threads_checked = now
            try:
                self.workers = max(1, sum(self.client.nthreads().values()))
            except Exception:  # the scheduler is busy or gone; keep the last count
                pass
        return self.workers

    # ---- the protocol ---------------------------------------------------------------------
    def prepare(self, fn, timeout=None):
        self.timeout = timeout
        fn_bytes = pickle_function(fn, self.name)
        key = hashlib.blake2b(fn_bytes, digest_size=12).hexdigest()
        # The function rides along with each task rather than being scattered once: scattered
        # data is a dependency, which is lost when the workers holding it die, and which turns
        # off the scheduler's queuing (tasks would pile up on workers and share their deaths).
        self.fn_args = (key, fn_bytes)
        return key

    def capacity(self) -> int:
        threads = self._refresh_threads()
        return threads * TASKS_PER_THREAD - len(self.futures)

    def submit(self, task) -> None:
        payload = dumps(task.items)
        key = f"pmap-{self.run_prefix}-{task.id}"
        future = self.client.submit(run_chunk, *self.fn_args, *self.init_args, payload,
                                    self.start_topic, task.id, key=key, pure=False)
        self.futures[task.id] = future
        self.task_ids[key] = task.id
        self.completed.add(future)

    def wait(self, timeout):
        completed = self.completed
        batch = completed.next_batch(block=False)
        if not batch and timeout:
            with completed.thread_condition:
                if not completed.has_ready():
                    completed.thread_condition.wait(timeout)
            batch = completed.next_batch(block=False)
        events = []
        while True:
            try:
                started = self.starts.get_nowait()
            except queue.Empty:
                break
            if started.task_id in self.futures:
                events.append(started)
        for future, result in batch:
            task_id = self.task_ids.pop(future.key, None)
            if task_id is None or self.futures.pop(task_id, None) is None:
                continue  # cancelled after a timeout, or from an abandoned run
            events.append(self._event(task_id, future, result))
        return events

    def _event(self, task_id, future, result):
        from distributed import KilledWorker
        if future.status == "finished":
            label, data = result
            _, values, failures, elapsed = loads(data)
            return Done(task_id, label, values, failures, elapsed)
        error = result[1] if isinstance(result, tuple) and len(result) == 3 else result
        if isinstance(error, KilledWorker):
            last = getattr(getattr(error, "last_worker", None), "address", None)
            return Lost(task_id, last, None, "dask reported KilledWorker: its worker died while running it",
                        blame=True)
        # Cancelled by the cluster (a restart, a lost client): not the items' fault.
        return Lost(task_id, None, None, f"dask: {type(error).__name__}: {error}", blame=False)

    def cancel(self, task_id) -> None:
        future = self.futures.pop(task_id, None)
        if future is not None:
            self.task_ids.pop(future.key, None)
            future.cancel()

    def describe_worker(self, worker) -> str:
        return str(worker) if worker is not None else "a dask worker"

    def close(self, kill=False) -> None:
        if self.client is None:
            return
        futures = list(self.futures.values())
        self.futures.clear()
        self.task_ids.clear()
        if self.completed is not None:
            self.completed.clear()
        try:
            if futures and not self.owns_client:
                self.client.cancel(futures)  # leave a shared cluster with nothing of ours
        except Exception:
            pass
        self.fn_args = None
        self.init_args = (None, None)
        client, cluster, self.client, self.cluster = self.client, self.cluster, None, None
        try:
            client.unsubscribe_topic(self.start_topic)
        except Exception:
            pass
        if self.owns_client:
            client.close()
        if cluster is not None:
            cluster.close()
