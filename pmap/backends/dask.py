"""dask: one dask task per chunk on a dask.distributed cluster (optional: `pmap-parallel[dask]`).

The cluster is, in order of preference: a `Client` given as `client=`, a scheduler at
`address=` or named in `scheduler_file=`, the current default Client of this process, or a
LocalCluster started when the backend opens (worker processes, one thread each, bound to
loopback, no dashboard) and closed with it. `cluster_options` go to that LocalCluster.

Futures are kept in a bounded window: one per worker thread; while tasks are short (under
SHORT_TASK_SECONDS), SHORT_TASKS_PER_THREAD, submitted half a window at a time in one
`client.map` (one message to the scheduler), which the scheduler queues and hands out as
threads free; more on an adaptive cluster, which grows only from queued work. Each future's
outcome is awaited by a coroutine of pmap's own in the client's event loop, errors included,
results are fetched in batches (what finished while one fetch was on its way goes in the
next), and `wait` also reads the futures' own status, so no outcome goes unreported. Items, results and exceptions travel as bytes pickled
the one way every process backend uses (`pmap._transfer`, `pmap._outcome`; what the caller's
`__main__` defines goes by value), so an item or result that cannot be pickled fails alone;
each task carries its item count, so a worker that cannot rebuild its items still answers for
each of them. The initializer runs in each worker process before its first task
of the run; one that raises (SystemExit included) stops the run with one `InitializerError`.
One that ends its worker process (os._exit) cannot be told from an item doing so: dask reports
it as `KilledWorker`, and the items fail as crashes. A task whose worker died is reported by
dask as `KilledWorker` (at the first death
on pmap's own LocalCluster; as often as the cluster's `allowed-failures` allows elsewhere),
and by pmap as a crash naming it, retried under `retries`.

Liveness: joining a scheduler waits `connect_timeout` seconds; a client that lost its
scheduler and could not reconnect (dask tries for the same time) ends the run with an error,
as does a cluster with no workers for `worker_wait` seconds while tasks wait. A timeout cannot
stop a running dask task: its future is cancelled and the item reported, but the worker's
thread runs on until the item returns. With a timeout, each task reports its start through
dask's event log, so the timeout is clocked from then, and the engine times out a task no worker
starts within the timeout plus `start_wait` seconds. Without one, no start is reported:
each report costs the scheduler a message.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import queue
import socket
import threading
import time
import traceback
import uuid

from .. import _transfer
from .._outcome import SentException, SplitTask, encode_result, initializer_error, pack_items, unpack_items
from .._worker import UNGUARDED_MAIN, WORKER_CATCH, cached_function, every_item_failed, run_items
from ..errors import BackendUnavailable, InitializerError, PmapError
from ._options import positive_seconds
from ._pooled import pickle_function
from ._procutil import called_from_an_unguarded_script
from .base import AHEAD_CHUNKS_PER_SLOT, Backend, Done, Fatal, Lost, Started

MISSING = "needs the distributed package: pip install 'pmap-parallel[dask]'"
# One future per worker thread. Dask's scheduler queues only large task groups; a smaller
# window is assigned to workers at once, so a larger one would stack tasks on a worker, and a
# worker's death would then implicate every task stacked on it.
TASKS_PER_THREAD = 1
# While tasks are short, a round trip to the scheduler is much of each: keep more in flight.
# A window over twice the threads is one large task group, which the scheduler queues and
# hands to a worker as a thread frees, so none stack on a worker. 64 per thread covers the
# scheduler's round trip (16 reached 0.54-0.73x client.map's throughput, 64 about 1x); an
# ordered imap then reads up to twice the window ahead, still bounded by max_ahead_bytes.
SHORT_TASK_SECONDS = 0.05
SHORT_TASKS_PER_THREAD = 64
# Each fetch of results costs the scheduler about as much as several tasks: fewer, larger
# fetches cut its CPU per one-item task by about a tenth against 5 ms (bench/remote_scale.py dask).
GATHER_PAUSE = 0.05            # with short tasks, a fetch of results waits this long for more to finish
# An adaptive cluster grows only from work queued at its scheduler (about one worker per
# target-duration, 5 s by default, of queued work): keep that much there. A window over twice
# the threads makes dask queue the tasks at the scheduler, so none stack on a worker.
ADAPTIVE_TASKS_PER_THREAD = 4
ADAPTIVE_MIN_WINDOW = 256      # ~25 s of work in chunks of ~0.1 s
THREAD_COUNT_REFRESH = 1.0   # seconds between asking the scheduler how many threads it has
THREAD_COUNT_PATIENCE = 5.0  # an answer slower than this is dropped (the scheduler is busy or gone)
CONNECT_SECONDS = 10.0       # joining (and re-joining) a scheduler; dask's own default is 30 s
RECONNECT_SLACK = 15.0       # beyond dask's reconnect attempts, before pmap gives up by itself
NO_WORKER_SECONDS = 60.0     # a cluster with no workers this long while tasks wait is an error
STATUS_CHECK_SECONDS = 0.5   # how often every future's own status is read
SETTLED_GRACE = 2.0          # a failed future its fetch has not reported this long is reported
FETCH_PATIENCE = 30.0        # a finished future whose result has not arrived is fetched again
START_GRACE = 30.0           # with a timeout: how much longer a task may wait for a worker to start it
CLOSE_SECONDS = 10.0


# ---- what runs on a dask worker ----------------------------------------------------------------

_INITIALIZED: set = set()
_INIT_LOCK = threading.Lock()

# What run_chunk returns: (worker label, one of these, its data).
RESULT = "result"                  # the encoded outcome of every item
SPLIT = "split"                    # the items did not unpickle here: the reason (each then runs alone)
INITIALIZER_FAILED = "initializer-failed"  # pickled (exception, traceback text)


def run_chunk(payload: bytes, n_items: int, task_id, *, fn_key: str, fn_bytes: bytes, init_key=None,
              init_bytes=None, start_topic=None) -> tuple:
    """One pmap task of `n_items` items on a dask worker: returns (worker label, kind, data).
    The count travels beside the payload, so a payload that does not unpickle here is still
    answered item for item. What is the same for every task of a run comes as keywords, which
    one `client.map` sends once for all the tasks it submits."""
    label = f"{socket.gethostname()}:{os.getpid()}"
    if start_topic is not None:
        _report_start(start_topic, task_id, label)
    if init_bytes is not None and init_key not in _INITIALIZED:
        with _INIT_LOCK:  # a worker with several threads runs the initializer once
            if init_key not in _INITIALIZED:
                try:
                    initializer, initargs = _transfer.loads(init_bytes)
                    initializer(*initargs)
                except BaseException as exc:  # noqa: B036  (SystemExit too: every other backend reports it)
                    report = _transfer.dumps((SentException(exc), traceback.format_exc()))
                    return label, INITIALIZER_FAILED, report
                _INITIALIZED.add(init_key)
    try:
        items = unpack_items(_transfer.loads(payload))
    except SplitTask as exc:  # the backend has each item run alone: only those that do not load fail
        return label, SPLIT, str(exc)
    except Exception as exc:  # ItemNotPicklable: the task's one item does not load on this worker
        return label, RESULT, encode_result(None, *every_item_failed(n_items, exc), 0.0)
    try:
        fn = cached_function(fn_key, lambda: fn_bytes)
    except Exception as exc:  # e.g. a module the function needs is missing on this worker
        return label, RESULT, encode_result(None, *every_item_failed(n_items, exc), 0.0)
    return label, RESULT, encode_result(None, *run_items(fn, items, catch=WORKER_CATCH))


def _report_start(topic, task_id, label) -> None:
    """Tell the client this task started, so its timeout is clocked from now, not from submit."""
    try:
        from distributed import get_worker
        get_worker().log_event(topic, (task_id, label))
    except ValueError:  # get_worker: not on a dask worker (called directly), so nobody to tell
        pass


# ---- the backend ---------------------------------------------------------------------------------

def local_cluster(workers: int, **options):
    """A small LocalCluster for pmap: worker processes with one thread each, on loopback,
    no dashboard, quiet (pmap reports crashes itself). `options` go to LocalCluster as they are.

    Each worker holds one task at a time (worker-saturation 1.0) and the scheduler gives up
    on a task at its first worker death (allowed_failures 0): a death then implicates only
    the task it ran, and pmap's `retries` count every death, as on every backend. Its nannies
    restart their worker after any number of crashes."""
    import logging

    import dask
    settings = dict(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                    dashboard_address=None, silence_logs=logging.CRITICAL,
                    # dask always serves its HTTP health routes; on a free loopback port, not 8787
                    scheduler_kwargs={"allowed_failures": 0, "dashboard": False,
                                      "dashboard_address": "127.0.0.1:0"})
    settings.update(options)
    with dask.config.set({"distributed.scheduler.worker-saturation": 1.0}):  # read when the scheduler starts
        return _steady_cluster_class()(**settings)


def _steady_cluster_class():
    from distributed import LocalCluster
    from distributed.deploy.cluster import Cluster

    class SteadyLocalCluster(LocalCluster):
        """A LocalCluster that keeps its workers: dask's SpecCluster closes a worker's nanny
        for good when, lost-worker-timeout after a crash, no worker of its name is registered
        (one that is restarting again, say), until a cluster that crashes often has none."""

        def _update_worker_status(self, op, msg):
            if op == "remove":
                Cluster._update_worker_status(self, op, msg)  # forget the worker, keep its nanny
                return
            super()._update_worker_status(op, msg)

    return SteadyLocalCluster


class _Watch:
    """What a future's fetch found, and since when a future looked settled with nothing heard."""

    __slots__ = ("future", "n_items", "settled_since", "fetches")

    def __init__(self, future, n_items):
        self.future = future      # None until the task is sent (`DaskBackend._send`)
        self.n_items = n_items
        self.settled_since = None
        self.fetches = 1


class DaskBackend(Backend):
    """Chunks become dask tasks on a dask.distributed cluster."""

    name = "dask"
    kind = "remote"
    reports_start = True
    guarantees = ("runs on a dask.distributed cluster or a LocalCluster; a crash is reported as "
                  "KilledWorker and retried under retries; a lost scheduler is an error; a timeout "
                  "cannot stop a running task")

    def __init__(self, workers=None, initializer=None, initargs=(), client=None, address=None,
                 scheduler_file=None, cluster_options=None, connect_timeout=CONNECT_SECONDS,
                 worker_wait=NO_WORKER_SECONDS, start_wait=START_GRACE, tasks_per_thread=None, **options):
        super().__init__(workers, initializer, initargs, **options)
        if sum(x is not None for x in (client, address, scheduler_file)) > 1:
            raise ValueError("give the dask backend one of client, address or scheduler_file")
        if scheduler_file is not None:
            scheduler_file = os.path.expanduser(str(scheduler_file))
            if not os.path.isfile(scheduler_file):
                raise ValueError(f"dask option scheduler_file: no such file: {scheduler_file}")
        self.given_client = client
        self.address = address
        self.scheduler_file = scheduler_file
        self.cluster_options = dict(cluster_options or {})
        self.connect_timeout = positive_seconds("dask", "connect_timeout", connect_timeout)
        self.worker_wait = positive_seconds("dask", "worker_wait", worker_wait)
        self.start_wait = positive_seconds("dask", "start_wait", start_wait)
        if tasks_per_thread is not None:
            try:
                tasks_per_thread = int(tasks_per_thread)
            except (TypeError, ValueError):
                tasks_per_thread = 0
            if tasks_per_thread < 1:
                raise ValueError("dask option tasks_per_thread must be a whole number of at least 1")
        self.tasks_per_thread = tasks_per_thread
        self.client = None
        self.cluster = None
        self.owns_client = False
        self.watches: dict[int, _Watch] = {}   # task id -> its future and what is known of it
        self.unsent: dict[int, bytes] = {}     # task id -> payload, submitted since the last send
        self.finished: list = []               # (task id, future) finished, for the next fetch (event loop)
        self.gathering = False                 # a fetch of results is under way (event loop)
        self.task_seconds = None               # how long recent tasks took on their workers
        self.outcomes: queue.SimpleQueue = queue.SimpleQueue()  # (task id, future, result or error)
        self.outcome_ready = threading.Condition()
        self.woken = False  # wake() was called: the next wait returns at once
        self.fn_args = None
        self.init_args = (None, None)
        self.run_prefix = uuid.uuid4().hex[:12]
        self.start_topic = f"pmap-start-{self.run_prefix}"
        self.threads = 0
        self.threads_checked = 0.0
        self.refreshing = False
        self.no_workers_since = None
        self.disconnected_since = None
        self.adaptive = False
        self.futures_checked = 0.0

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
            from distributed import Client, default_client
        except ImportError as exc:  # present but broken
            raise BackendUnavailable(f"backend 'dask' is unavailable: {MISSING} ({exc})") from exc
        if self.given_client is not None:
            self.client = self.given_client
        elif self.address is not None or self.scheduler_file is not None:
            where = self.address or self.scheduler_file
            try:
                self.client = Client(self.address, scheduler_file=self.scheduler_file, set_as_default=False,
                                     timeout=self.connect_timeout)
            except (OSError, TimeoutError, ValueError) as exc:  # ValueError: a scheduler file it cannot read
                raise PmapError(f"cannot reach a dask scheduler at {where} within "
                                f"{self.connect_timeout:g}s: {exc}") from None
            self.owns_client = True
        else:
            try:
                self.client = default_client()
            except ValueError:  # no client in this process: start a cluster of our own
                try:
                    self.cluster = local_cluster(self.workers, **self.cluster_options)
                except Exception as exc:
                    if called_from_an_unguarded_script():  # its workers died importing the script
                        raise BackendUnavailable(UNGUARDED_MAIN.format(backend=self.name)) from None
                    raise
                self.client = Client(self.cluster, set_as_default=False)
                self.owns_client = True
        self.adaptive = getattr(self.client.cluster, "_adaptive", None) is not None
        self.client.subscribe_topic(self.start_topic, self._on_start)
        try:
            counts = self.client.nthreads().values()
            self.threads = sum(counts)
            # workers of one thread run one item at a time each: a seed= run seeds their globals per item
            self.random_globals = "own" if counts and max(counts) == 1 else "shared"
        except Exception:  # counted again by the next refresh
            self.threads = 0
        self.workers = max(1, self.threads)
        self.threads_checked = time.monotonic()
        if self.initializer is not None:
            init_bytes = pickle_function((self.initializer, self.initargs), self.name)
            init_key = hashlib.blake2b(init_bytes, digest_size=12).hexdigest()
            self.init_args = (init_key, init_bytes)

    def _on_start(self, event) -> None:
        """Runs in the client's event loop thread for each start a task reports."""
        _, (task_id, label) = event
        self.outcomes.put((task_id, None, Started(task_id, label, time.monotonic())))
        self._notify()

    def _notify(self) -> None:
        with self.outcome_ready:
            self.outcome_ready.notify_all()

    def wake(self) -> None:
        with self.outcome_ready:
            self.woken = True
            self.outcome_ready.notify_all()

    # ---- watching the cluster (never blocks the caller) -----------------------------------
    def _refresh(self, now: float) -> None:
        """Ask the scheduler for its thread count in the client's event loop; the answer
        arrives later."""
        if self.refreshing or now - self.threads_checked < THREAD_COUNT_REFRESH:
            return
        self.threads_checked = now
        self.refreshing = True
        try:
            self.client.loop.add_callback(self._count_threads)
        except Exception:  # the client's loop is closed: the status watch reports it
            self.refreshing = False

    async def _count_threads(self) -> None:
        import asyncio
        try:
            counts = await asyncio.wait_for(self.client.scheduler.ncores(), THREAD_COUNT_PATIENCE)
            self.threads = sum(counts.values())
        except (asyncio.TimeoutError, OSError):  # busy past our patience, or gone (CommClosedError): keep the last count
            pass
        finally:
            self.refreshing = False

    def _watch_cluster(self, now: float) -> list:
        """Fatal when the scheduler is gone for good or the cluster has had no workers too long."""
        status = getattr(self.client, "status", "running")
        if status in ("closing", "closed", "failed"):
            where = getattr(self.client.scheduler, "address", None) or self.address or "its address"
            return [Fatal(PmapError(f"lost the dask scheduler at {where}: the client could not reconnect "
                                    f"and is {status}; {len(self.watches)} task(s) were in flight"))]
        if status != "running":  # reconnecting: dask retries for its connect timeout, then closes
            self.disconnected_since = self.disconnected_since or now
            if now - self.disconnected_since > self.connect_timeout + RECONNECT_SLACK:
                return [Fatal(PmapError(f"lost the dask scheduler: still {status} after "
                                        f"{now - self.disconnected_since:.0f}s"))]
            return []
        self.disconnected_since = None
        self._refresh(now)
        if self.threads or not self.watches:
            self.no_workers_since = None
        else:
            self.no_workers_since = self.no_workers_since or now
            if now - self.no_workers_since > self.worker_wait:
                return [Fatal(PmapError(f"the dask cluster has had no workers for {self.worker_wait:g}s "
                                        f"with {len(self.watches)} task(s) waiting (dask option worker_wait)"))]
        return []

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
        if getattr(self.client, "status", "running") != "running":
            return 0  # tasks sent now would wait on a client that may never reconnect
        threads = max(1, self.threads)
        per_thread = self.tasks_per_thread
        if per_thread is None:
            per_thread = (ADAPTIVE_TASKS_PER_THREAD if self.adaptive
                          else SHORT_TASKS_PER_THREAD if self._short() else TASKS_PER_THREAD)
        window = threads * per_thread
        if self.adaptive:
            window = max(window, ADAPTIVE_MIN_WINDOW)
        # The engine sizes its look-ahead from `workers`: let it read twice as far as the window, so
        # that in ordered runs the window, not an early task still running, decides when to send.
        self.workers = max(threads, -(-2 * window // AHEAD_CHUNKS_PER_SLOT))
        room = window - len(self.watches)
        if (per_thread == SHORT_TASKS_PER_THREAD and self.tasks_per_thread is None and room < window // 2
                and not self.unsent):
            return 0  # short tasks go in batches of half the window or more: one message to the scheduler each
        return room

    def _short(self) -> bool:
        """Recent tasks took less than SHORT_TASK_SECONDS on their workers."""
        return self.task_seconds is not None and self.task_seconds < SHORT_TASK_SECONDS

    def submit(self, task) -> None:
        """Keep the task until the next `wait`, which sends all kept in one `client.map`: one
        message to the scheduler for the tasks of one dispatch, not one each."""
        # By value what the caller's __main__ defines: a worker's own __main__ is not the caller's.
        payload = _transfer.dumps(pack_items(task.items, main_by_value=True))
        self.watches[task.id] = _Watch(None, len(task.items))
        self.unsent[task.id] = payload

    def _send(self) -> None:
        """Submit the tasks kept since the last send, in one message, and fetch their outcomes."""
        if not self.unsent:
            return
        task_ids, payloads = list(self.unsent), list(self.unsent.values())
        self.unsent.clear()
        fn_key, fn_bytes = self.fn_args
        init_key, init_bytes = self.init_args
        futures = self.client.map(
            run_chunk, payloads, [self.watches[t].n_items for t in task_ids], task_ids,
            key=[f"pmap-{self.run_prefix}-{t}" for t in task_ids], pure=False,
            fn_key=fn_key, fn_bytes=fn_bytes, init_key=init_key, init_bytes=init_bytes,
            # starts are reported only where a timeout clocks from them: each costs the scheduler a message
            start_topic=self.start_topic if self.timeout is not None else None)
        for task_id, future in zip(task_ids, futures):
            self.watches[task_id].future = future
        self._fetch_soon(list(zip(task_ids, futures)))

    def _fetch_soon(self, pairs) -> None:
        """Fetch each (task id, future)'s outcome in the client's event loop."""
        self.client.loop.add_callback(self._fetch_all, pairs)

    async def _fetch_all(self, pairs) -> None:
        import asyncio
        await asyncio.gather(*(self._fetch(task_id, future) for task_id, future in pairs))

    async def _fetch(self, task_id, future) -> None:
        """Wait for the future's outcome and fetch its result, in the client's event loop.
        Every outcome is queued, errors included: dask's own `as_completed` drops a future
        whose result fetch ends in KilledWorker (the worker holding it died meanwhile).
        Results are fetched in batches: what finished while one batch was on its way goes in
        the next, so the scheduler answers one request for many results."""
        try:
            await future._state.wait()
        except BaseException as exc:  # noqa: B036  (CancelledError included: it is an outcome)
            self._report([(task_id, future, exc)])
            return
        if future.status != "finished":
            self._report([(task_id, future, None)])
            return
        self.finished.append((task_id, future))
        if self.gathering:
            return  # the fetch under way takes it in its next batch
        self.gathering = True
        try:
            while self.finished:
                if self._short():
                    import asyncio
                    await asyncio.sleep(GATHER_PAUSE)  # more finish meanwhile: one request fetches them all
                batch, self.finished = self.finished, []
                try:
                    # errors="skip": a result lost with its worker is recomputed (dask logs that at debug
                    # level, not as a warning); should that end in an error, the status says which.
                    results = await self.client._gather(dict(batch), errors="skip")
                except BaseException as exc:  # noqa: B036  (an outcome for each of them)
                    results = dict.fromkeys(dict(batch), exc)
                self._report([(task_id, future, results.get(task_id)) for task_id, future in batch])
        finally:
            self.gathering = False

    def _report(self, outcomes) -> None:
        for outcome in outcomes:
            self.outcomes.put(outcome)
        self._notify()

    def wait(self, timeout):
        self._send()
        if self.outcomes.empty() and timeout:
            with self.outcome_ready:
                if self.outcomes.empty() and not self.woken:
                    self.outcome_ready.wait(timeout)
                self.woken = False
        now = time.monotonic()
        events = self._watch_cluster(now)
        while True:
            try:
                task_id, future, result = self.outcomes.get_nowait()
            except queue.Empty:
                break
            watch = self.watches.get(task_id)
            if watch is None:
                continue  # cancelled after a timeout, or from an abandoned run
            if future is None:  # a start
                events.append(result)
            elif future is watch.future:
                event = self._outcome(task_id, watch, result)
                if event is not None:
                    del self.watches[task_id]
                    events.append(event)
        if now - self.futures_checked >= STATUS_CHECK_SECONDS:
            self.futures_checked = now
            events.extend(self._check_futures(now))
        return events

    def _outcome(self, task_id, watch, result):
        """The event for a fetched outcome; None when the future is not settled after all
        (it went back to pending: its fetch starts again)."""
        future = watch.future
        status = future.status
        if status == "finished" and isinstance(result, tuple):
            return self._finished(task_id, watch, *result)
        if status in ("error", "cancelled"):
            return self._failed(task_id, watch, _future_error(future) or result)
        # Still pending or lost (recomputed after its result was lost with its worker).
        watch.fetches += 1
        self._fetch_soon([(task_id, future)])
        return None

    def _finished(self, task_id, watch, label, kind, data):
        """The event for what run_chunk returned."""
        if kind == SPLIT:  # an item did not unpickle on the worker: the engine runs each alone
            return Lost(task_id, label, None, data, blame=False)
        if kind == INITIALIZER_FAILED:
            return Fatal(self._initializer_error(label, data))
        try:
            _, values, failures, elapsed = _transfer.loads(data)
        except Exception as exc:  # the message itself does not load (values and exceptions load per item)
            return Done(task_id, label, *every_item_failed(watch.n_items, exc), 0.0)
        self.task_seconds = elapsed if self.task_seconds is None else (self.task_seconds + elapsed) / 2
        return Done(task_id, label, values, failures, elapsed)

    def _initializer_error(self, label, report) -> InitializerError:
        name = getattr(self.initializer, "__qualname__", None) or type(self.initializer).__name__
        return initializer_error(name, "dask", label, report)

    def _failed(self, task_id, watch, error):
        from distributed import KilledWorker
        if isinstance(error, KilledWorker):
            last = getattr(getattr(error, "last_worker", None), "address", None)
            return Lost(task_id, last, None, f"dask gave up on it with KilledWorker: {error}", blame=True)
        if error is None or _is_cancellation(error):
            # Cancelled by the cluster (a lost scheduler, a restart): not the items' fault.
            return Lost(task_id, None, None, f"dask cancelled it: {error or 'no reason given'}", blame=False)
        # run_chunk itself failed (pmap missing on the worker, say): every item of it failed.
        try:
            raise error
        except BaseException:
            values, failures = every_item_failed(watch.n_items, error)
        return Done(task_id, None, values, failures, 0.0)

    def _check_futures(self, now: float) -> list:
        """The futures' own status, for outcomes no fetch reported: a future settled for a
        while with nothing heard is fetched again or reported from its status."""
        events = []
        for task_id, watch in list(self.watches.items()):
            if watch.future is None:  # not sent: a send that failed raised in the caller
                continue
            status = watch.future.status
            if status in ("finished", "error", "cancelled"):
                watch.settled_since = watch.settled_since or now
                quiet = now - watch.settled_since
                if status != "finished" and quiet > SETTLED_GRACE:
                    del self.watches[task_id]
                    events.append(self._failed(task_id, watch, _future_error(watch.future)))
                elif status == "finished" and quiet > FETCH_PATIENCE * watch.fetches:
                    watch.fetches += 1
                    self._fetch_soon([(task_id, watch.future)])
            else:
                watch.settled_since = None
        return events

    def _cancel_future(self, future) -> None:
        try:
            future.cancel()
        except Exception:  # the client is closing: nothing to cancel
            pass

    def cancel(self, task_id) -> None:
        self.unsent.pop(task_id, None)
        watch = self.watches.pop(task_id, None)
        if watch is not None and watch.future is not None:
            self._cancel_future(watch.future)

    def describe_worker(self, worker) -> str:
        return str(worker) if worker is not None else "a dask worker"

    def close(self, kill=False) -> None:
        if self.client is None:
            return
        futures = [watch.future for watch in self.watches.values() if watch.future is not None]
        self.watches.clear()
        self.unsent.clear()
        try:
            if futures and not self.owns_client and self.client.status == "running":
                self.client.cancel(futures)  # leave a shared cluster with nothing of ours
        except Exception:  # a client that is closing cancels its futures itself
            pass
        self.fn_args = None
        self.init_args = (None, None)
        client, cluster, self.client, self.cluster = self.client, self.cluster, None, None
        try:
            client.unsubscribe_topic(self.start_topic)
        except Exception:  # a client that is closing has no subscriptions left to drop
            pass
        if self.owns_client:
            try:
                client.close(timeout=CLOSE_SECONDS)
            except Exception:  # a scheduler already gone
                pass
        if cluster is not None:
            try:
                cluster.close(timeout=CLOSE_SECONDS)
            except Exception:  # a cluster that does not close in time is left to its own finalizers: the run's results are already in
                pass


def _future_error(future):
    state = getattr(future, "_state", None)
    return getattr(state, "exception", None)


def _is_cancellation(error) -> bool:
    import asyncio
    import concurrent.futures
    return isinstance(error, (asyncio.CancelledError, concurrent.futures.CancelledError)) \
        or type(error).__name__.endswith("CancelledError")
