"""What runs inside a worker: one task's items, the worker process's settings, and the function
and initializer it receives (`_outcome` holds the wire format of items and results)."""
from __future__ import annotations

import inspect
import mmap
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import weakref
from multiprocessing.connection import Connection

from . import _logs, _transfer, seeding
from ._outcome import SplitTask, _SentException, encode_result, unpack_items


class CallerInterrupt(KeyboardInterrupt):
    """A real Ctrl-C in the calling thread, told apart from a KeyboardInterrupt the function
    raises itself (which fails only its item): see `caller_interrupts`."""


class StarCall:
    """`func(*args)` per item, for starmap; picklable whenever `func` is."""

    __slots__ = ("func",)

    def __init__(self, func):
        self.func = func

    def __call__(self, args):
        return self.func(*args)

    def __reduce__(self):
        return (StarCall, (self.func,))


def call_submitted(call):
    """Run one submitted call, `(func, args, kwargs)`: the function of an Executor's or a
    Pool's long run, whose items each carry their own function."""
    func, args, kwargs = call
    return func(*args, **kwargs)


class caller_interrupts:
    """Within it (in the main thread), a real Ctrl-C raises CallerInterrupt, so the function
    runs in the caller's own thread (serial, greenlet, asyncio) can tell it from a
    KeyboardInterrupt the function raises itself. Leaving it, CallerInterrupt becomes the
    plain KeyboardInterrupt the caller expects."""

    __slots__ = ("previous",)

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            handler = signal.getsignal(signal.SIGINT)
            if callable(handler):
                def interrupt(signum, frame):
                    try:
                        handler(signum, frame)
                    except CallerInterrupt:
                        raise
                    except KeyboardInterrupt as exc:
                        raise CallerInterrupt(*exc.args) from None
                self.previous = handler
                signal.signal(signal.SIGINT, interrupt)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if exc_type is not None and issubclass(exc_type, CallerInterrupt):
            raise KeyboardInterrupt(*exc.args).with_traceback(tb) from None
        return False


def run_items(fn, items, catch=BaseException, passthrough=CallerInterrupt, clock=None):
    """Run `fn` over `items`; return (values, failures, elapsed). Failures hold
    (position, exception, traceback text); a failing item never stops the others.
    Whatever the function raises, BaseExceptions included, fails only its item; only
    `passthrough` (the caller's own Ctrl-C, a backend's own cancellation) ends the task.
    An `async def` function runs in an event loop of this worker's own.
    `clock` (under a timeout): its `mark(position)` is called as each item starts, and it is
    handed the task's growing lists of values and failures (`begin`), so the caller can time
    each item and keep what a stopped task finished."""
    if is_async(fn):
        return _run_async_items(fn, items, catch, passthrough, clock)
    if clock is not None:
        return _run_clocked_items(fn, items, catch, passthrough, clock)
    values = []
    failures = []
    pending = iter(items)
    start = time.perf_counter()
    while True:
        try:
            values.extend(map(fn, pending))  # stops at a failing item; the values before it stay
            break
        except catch as exc:
            if isinstance(exc, passthrough):
                raise
            tb = exc.__traceback__.tb_next or exc.__traceback__  # start at the user's frame, not this one
            failures.append((len(values), exc, "".join(traceback.format_exception(type(exc), exc, tb))))
            values.append(None)
    return values, failures, time.perf_counter() - start


def _run_clocked_items(fn, items, catch, passthrough, clock):
    values = []
    failures = []
    mark = clock.mark
    clock.begin(values, failures)
    start = time.perf_counter()
    try:
        for position, item in enumerate(items):
            mark(position)
            try:
                values.append(fn(item))
            except catch as exc:
                if isinstance(exc, passthrough):
                    raise
                tb = exc.__traceback__.tb_next or exc.__traceback__  # start at the user's frame
                failures.append((position, exc, "".join(traceback.format_exception(type(exc), exc, tb))))
                values.append(None)
    finally:
        clock.end()
    return values, failures, time.perf_counter() - start


def _run_async_items(fn, items, catch, passthrough, clock=None):
    import asyncio
    loop = asyncio.new_event_loop()
    try:
        return run_items(lambda item: loop.run_until_complete(fn(item)), items, catch, passthrough, clock)
    finally:
        loop.close()


loads = _transfer.loads  # a plain pickle, or one whose big buffers wait in shared memory


# A worker process ignores SIGINT: any exception in it, KeyboardInterrupt included, is the
# function's own and fails only its item.
WORKER_CATCH = BaseException


def become_worker_process(own_process_group: bool = False, driver_pid: int | None = None,
                          parent_pid: int | None = None) -> None:
    """Settings every worker process takes: Ctrl-C is the caller's to handle, the worker dies
    with its parent process (and with the driver, when a forkserver stands between them), and
    what it starts ends with it (`end_descendants`; a kill ends them through
    `_procutil.end_process_group`). It does not lead a process group of its own, so the
    function may call os.setsid().

    The death watch follows the parent *process*: PR_SET_PDEATHSIG would fire when the
    parent's thread that started the worker ends, killing workers of a call made from a
    thread that returns."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seeding.fresh_worker_state()  # a forked worker's numpy.random would repeat its siblings' numbers
    parent = parent_pid if parent_pid is not None else os.getppid()
    _exit_when_gone(parent, is_parent=True)
    if driver_pid is not None and driver_pid != parent:
        _exit_when_gone(driver_pid)
    if own_process_group and hasattr(os, "setpgid"):
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
    _allow_children()


def _allow_children() -> None:
    """multiprocessing refuses to start processes from a daemonic one; a worker may run a
    nested process map. Its children then are not daemonic either, and multiprocessing would
    wait for them when the worker exits (a reusable loky executor idles for a minute): the
    worker ends what it started first."""
    try:
        import multiprocessing
        import multiprocessing.util
        multiprocessing.current_process()._config["daemon"] = False
        multiprocessing.util.Finalize(None, end_descendants, exitpriority=100)
        if multiprocessing.get_start_method(allow_none=True) not in (None, *multiprocessing.get_all_start_methods()):
            # loky's own method name, which a stdlib pool's forkserver children cannot look up
            multiprocessing.set_start_method(None, force=True)
    except (AttributeError, KeyError, ValueError, RuntimeError):  # a multiprocessing whose private _config changed:
        pass  # nested process maps then fail with multiprocessing's own "daemonic processes" error


def loky_reusable_executor():
    """loky's reusable executor, if this process made one (none is made here). loky has no public
    way to ask: its module keeps it in `_executor_storage.executor` (checked with loky 3.7.0) or,
    before, in `_executor` (loky 3.4.1)."""
    reusable = sys.modules.get("loky.reusable_executor")  # not loaded: none was made
    storage = getattr(reusable, "_executor_storage", None)
    return getattr(storage, "executor", None) if storage is not None else getattr(reusable, "_executor", None)


def end_descendants(grace: float = 0.5) -> None:
    """End every process this one started, and theirs (a worker leaving: nothing it started
    outlives it, also what called os.setsid)."""
    executor = loky_reusable_executor()
    if executor is not None:  # a nested process map's workers: loky ends them cleanly
        try:
            executor.shutdown(wait=True, kill_workers=True)
        except (OSError, RuntimeError):  # a broken wake-up pipe, a thread never started: the sweep below ends its workers
            pass
    import psutil
    try:
        children = [child for child in psutil.Process().children(recursive=True)
                    if not _is_resource_tracker(child)]  # it exits with us, and cleans up after
        for child in children:
            try:
                child.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(children, timeout=grace)
        for child in alive:
            try:
                child.kill()
            except psutil.Error:
                pass
    except psutil.Error:  # psutil cannot read the process table: the children are left to the process group's end
        pass


def _is_resource_tracker(process) -> bool:
    import psutil
    try:
        return "resource_tracker" in " ".join(process.cmdline())
    except psutil.Error:  # gone, a zombie, or not ours to read: not the tracker we keep
        return False


def _exit_when_gone(pid: int, is_parent: bool = False) -> None:
    """A daemon thread that ends this process as soon as process `pid` ends."""
    import threading

    def gone() -> bool:
        if is_parent:
            return os.getppid() != pid  # an orphan is adopted by another process at once
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False

    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd here (or it is gone already): poll
        fd = None
    if gone():
        os._exit(1)

    def watch():
        if fd is not None:
            import select
            while not select.select([fd], [], [], 5.0)[0] and not gone():
                pass
        else:
            while not gone():
                time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="pmap-parent-watch", daemon=True).start()


def callable_name(fn) -> str:
    """A function's name for messages; starmap's wrapper and functools.partial unwrapped."""
    target = getattr(fn, "func", fn)
    return getattr(target, "__qualname__", None) or type(target).__name__


_ASYNC_SEEN = weakref.WeakKeyDictionary()  # fn -> is_async(fn): asked once per task, so remember


def is_async(fn) -> bool:
    """True for an `async def` function (also behind starmap's StarCall or a callable object)."""
    target = fn.func if isinstance(fn, StarCall) else fn
    try:
        return _ASYNC_SEEN[target]
    except (KeyError, TypeError):
        pass
    answer = inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(getattr(target, "__call__", None))
    try:
        _ASYNC_SEEN[target] = answer
    except TypeError:  # not weak-referenceable or unhashable: ask every time
        pass
    return answer


# ---- workers that receive the function as bytes (process, pool, manager, dask) -----------
_FUNCTIONS: dict = {}
_FUNCTION_CACHE_SIZE = 8


def cached_function(key, fetch_bytes, cache: dict = _FUNCTIONS):
    """The function stored under `key`, unpickled once: `fetch_bytes()` gives its bytes on a
    miss. A long-lived worker serves many runs, so only a few functions are kept."""
    fn = cache.get(key)
    if fn is None:
        if len(cache) >= _FUNCTION_CACHE_SIZE:
            cache.clear()
        for released in [k for k in cache if _transfer.function_released(k)]:
            del cache[released]  # its run is over: unmap its shared buffers
        _transfer.forget_dropped_shared()
        fn = cache[key] = loads(fetch_bytes())
        if _INITIALIZER_GLOBALS:
            adopt_initializer_globals(fn)
    return fn


def every_item_failed(n_items: int, exc: BaseException) -> tuple[list, list]:
    """(values, failures) of a task that could not run at all, for the exception being handled."""
    tb = traceback.format_exc()
    n = max(1, n_items)
    return [None] * n, [(i, exc, tb) for i in range(n)]


INIT_FAILED_EXIT = 86  # a pooled worker whose initializer failed exits with this code
UNGUARDED_MAIN_EXIT = 87  # a worker that found the caller's script calling pmap as it imported it
UNGUARDED_MAIN = (
    "the workers of backend {backend!r} import your main script to find your function, and the "
    "script calls pmap as it is imported: each worker would start the whole run again. Put the "
    "code that calls pmap under `if __name__ == \"__main__\":` at the end of the script (define "
    "functions above it, at the top level), or use backend='fork' or backend='process', whose "
    "workers do not run the script.")


def stop_if_importing_the_callers_script() -> None:
    """A pmap call in a worker process that is importing the caller's main script (spawn and
    forkserver run it again, as `__mp_main__`, to find its functions) comes from a script without
    the `if __name__ == "__main__":` guard. Such a worker would start workers of its own, again
    and again: it ends at once, quietly, with an exit code the caller's backend explains once."""
    process = sys.modules.get("multiprocessing.process")
    if process is not None and getattr(process.current_process(), "_inheriting", False):
        os._exit(UNGUARDED_MAIN_EXIT)


# Globals an initializer assigned in a module that exists in this worker only as cloudpickle's
# copy (a function defined in __main__ or a file run by the CLI): module name -> (its globals,
# the names it assigned). A function pickled apart from the initializer gets a copy of its own.
_INITIALIZER_GLOBALS: dict = {}


def _copied_globals(fn) -> dict | None:
    """`fn`'s globals when they are cloudpickle's copy, not a module imported here."""
    globs = getattr(fn, "__globals__", None)
    if globs is None:
        return None
    module = sys.modules.get(globs.get("__name__", ""))
    return None if module is not None and vars(module) is globs else globs


def _user_function(fn):
    """The plain function inside pmap's and functools' wrappers."""
    for _ in range(10):
        inner = getattr(fn, "initializer", None) or getattr(fn, "func", None) or getattr(fn, "__wrapped__", None)
        if inner is None or inner is fn:
            break
        fn = inner
    return fn


def remember_initializer_globals(initializer) -> None:
    """After the initializer ran: which of its module's globals it set (a connection, say)."""
    fn = _user_function(initializer)
    globs = _copied_globals(fn)
    if globs is None or not hasattr(fn, "__code__"):
        return
    import dis
    assigned = {ins.argval for ins in dis.get_instructions(fn) if ins.opname == "STORE_GLOBAL"}
    if assigned:
        _INITIALIZER_GLOBALS[globs.get("__name__")] = (globs, assigned)


def adopt_initializer_globals(fn) -> None:
    """Give `fn` the globals its module's initializer set in this worker, as an imported module
    would have them (concurrent.futures behaves so under every start method)."""
    globs = _copied_globals(_user_function(fn))
    shared = _INITIALIZER_GLOBALS.get(globs.get("__name__")) if globs is not None else None
    if shared is not None and shared[0] is not globs:
        source, names = shared
        globs.update({name: source[name] for name in names if name in source})


def init_report_dir(driver_pid: int) -> str:
    """Where pooled workers of the process `driver_pid` leave word of their initializer:
    one file per worker pid, present while it runs and kept, holding the error, if it fails."""
    import tempfile
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"pmap-{driver_pid}-init")  # removed by `_transfer.sweep` if the driver is killed


def pooled_worker_init(initializer_bytes, driver_pid=None):
    become_worker_process(driver_pid=driver_pid)
    stop_when_asked()
    if initializer_bytes is None:
        return
    report = os.path.join(init_report_dir(driver_pid or os.getppid()), str(os.getpid()))
    try:
        with open(report, "wb"):
            pass  # an empty report left behind means the initializer ended the process itself
    except OSError:
        report = None
    try:
        initializer, initargs, log_level = loads(initializer_bytes)
        _logs.forward_from_here(log_level)
        initializer(*initargs)
        remember_initializer_globals(initializer)
    except BaseException as exc:  # the user's initializer, whatever it raises (SystemExit too): reported, then exit
        if report is not None:
            try:  # renamed into place, so the parent never reads half of it
                with open(report + ".tmp", "wb") as handle:
                    handle.write(pickle.dumps((_SentException(exc), traceback.format_exc())))
                os.replace(report + ".tmp", report)
            except OSError:  # the report is a courtesy: the worker's exit code still tells the caller it failed
                pass
        os._exit(INIT_FAILED_EXIT)  # not a respawn loop: the parent reads the report and stops
    if report is not None:
        try:
            os.unlink(report)
        except OSError:
            pass


def run_pooled_task(payload: bytes) -> None:
    """Run one task of a pooled backend (process, pool). Which task it runs goes in this
    worker's slot, its log records and its RESULT over its own connection to the backend; what
    the pool itself carries back is None, so nothing this worker writes where other workers
    write is ever large."""
    task_id, key, packed, run_dir, timed = loads(payload)
    link = link_to(os.path.join(run_dir, LINK_SOCKET))
    if link is None:
        return None  # the run that sent it was abandoned and its backend closed
    _logs.send_with(link.send_log)  # records written from now on go to this task's caller
    link.hold(task_id)
    try:
        try:
            items = unpack_items(packed)
            fn = cached_function(key, lambda: _transfer.read_function(run_dir, key))  # once per worker and run
            outcome = run_items(fn, items, catch=WORKER_CATCH, clock=ItemClock(link, task_id) if timed else None)
        except SplitTask as exc:
            link.send_task(SPLIT, task_id, str(exc).encode())
            return None
        except BaseException as exc:  # the item or the function could not be rebuilt here
            outcome = (*every_item_failed(packed[0], exc), 0.0)
        link.send_task(RESULT, task_id, encode_result(task_id, *outcome))
    except OSError:  # the backend closed meanwhile: nobody waits for this result
        _forget_link(link)
    finally:
        link.hold(NO_TASK)
    return None


# ---- what a worker process tells its caller ---------------------------------------------------
# Each worker process has a connection of its own to the backend that runs it: for fork, the
# pipe it was forked with; for pool and process, a Unix socket it opens to the run's folder on
# its first task of that run (`link_to`). No other process writes to it, so a worker that dies
# mid-message costs only its own connection, and holds no lock anyone else needs. Beside it,
# a slot of shared memory says which task the worker holds: written before the task runs,
# cleared only once its result has been written whole, so the caller reads there which task
# a dead worker held, at no cost to a task; under a timeout it also says which item of the task
# runs and since when, so a chunk's items are timed one by one (`ItemClock`).
# A frame is one message: a kind byte, then its body.
HELLO = b"H"   # a pooled worker's first frame on a new connection: its pid
RESULT = b"R"  # task id, then the task's outcome (`_outcome.encode_result`); a stopped task's holds a prefix
SPLIT = b"X"   # task id, then why: an item did not unpickle here, so the caller runs each alone
LOG = b"L"     # a pickled log record, sent as it is written (`_logs`)
READY = b"I"   # fork: the initializer returned
FAILED = b"F"  # fork: the initializer raised: (exception, traceback text), pickled
NUMBER = struct.Struct("<q")  # a task id, or a pid
NO_TASK = -1
LINK_SOCKET = "link"  # the backend's listening socket, in the run's private folder
# The slot: the task held, then (under a timeout) the item running and since when, then the
# task the caller asks this worker to stop. The item is one aligned 8-byte word, so the caller
# never reads one item's position with another's start: its position in the task above
# POSITION_SHIFT bits, and below them its start in microseconds of time.monotonic (system-wide
# on Linux and macOS), modulo 2**40 (12.7 days, the longest an item can run and be timed).
HELD_AT, ITEM_AT, STOP_AT = 0, 8, 16
SLOT_SIZE = 24
ITEM = struct.Struct("<Q")
POSITION_SHIFT = 40
START_MASK = (1 << POSITION_SHIFT) - 1
MAX_TIMED_ITEMS = 1 << (64 - POSITION_SHIFT)  # positions a task's item word can name
STOP_SIGNAL = signal.SIGUSR2  # the caller's request to stop the task named at STOP_AT (`stop_when_asked`)


def slot_path(run_dir: str, pid: int) -> str:
    """A pooled worker's slot: a file of the run's folder that it and the caller map."""
    return os.path.join(run_dir, f"slot-{pid}")


def new_slot(path: str | None = None) -> mmap.mmap:
    """A slot holding NO_TASK: mapped from a new file at `path`, or anonymous (shared with the
    processes forked after it)."""
    if path is None:
        slot = mmap.mmap(-1, SLOT_SIZE)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, SLOT_SIZE)
            slot = mmap.mmap(fd, SLOT_SIZE)
        finally:
            os.close(fd)
    NUMBER.pack_into(slot, HELD_AT, NO_TASK)
    NUMBER.pack_into(slot, STOP_AT, NO_TASK)
    return slot


def item_word(position: int) -> int:
    """The slot's item word for item `position` starting now."""
    return position << POSITION_SHIFT | (time.monotonic_ns() // 1000 & START_MASK)


def read_item_word(word: int) -> tuple[int, float]:
    """(position, start in time.monotonic seconds) of an item word written in the last 12.7 days."""
    now = time.monotonic_ns() // 1000
    return word >> POSITION_SHIFT, (now - ((now - word) & START_MASK)) / 1e6


class ItemClock:
    """Under a timeout, the item of its task this worker process runs and since when, in its
    slot (one store per item), and the task's values and failures so far, which a stop
    request sends back (`stop_when_asked`)."""

    __slots__ = ("link", "task_id", "values", "failures", "started", "mark")

    def __init__(self, link: "Link", task_id: int):
        self.link = link
        self.task_id = task_id
        slot, store, now = link.slot, ITEM.pack_into, time.monotonic_ns

        def mark(position):
            store(slot, ITEM_AT, position << POSITION_SHIFT | (now() // 1000 & START_MASK))
        self.mark = mark

    def begin(self, values: list, failures: list) -> None:
        global _clocked
        self.values, self.failures, self.started = values, failures, time.perf_counter()
        _clocked = self

    def end(self) -> None:
        global _clocked
        _clocked = None


_clocked: ItemClock | None = None  # the task this worker process runs under a timeout
STOP_SEND_SECONDS = 1.0  # how long a stopped task waits for its connection, held by another thread


def stop_when_asked() -> None:
    """Take the caller's requests to stop a task at an item past its deadline (a worker
    process's main thread, at its start)."""
    signal.signal(STOP_SIGNAL, _stop)


def _stop(signum, frame) -> None:
    """The caller asks to stop the task named in the slot: if this worker runs it, it sends
    what the task finished (the values of its first items, and failures among them) as the
    task's result, and then waits to be ended, so nothing more of the task runs here. It
    runs between two bytecodes of the item, or where the item waits in a system call."""
    clock = _clocked
    if clock is None or NUMBER.unpack_from(clock.link.slot, STOP_AT)[0] != clock.task_id:
        return  # that task is over: its result has gone, or goes, as usual
    done = len(clock.values)
    failures = [failure for failure in clock.failures if failure[0] < done]
    link = clock.link
    # The lock is held by this very thread when the stop came in the middle of a log record:
    # then nothing is sent, and the caller runs the task's items again.
    if link.lock.acquire(timeout=STOP_SEND_SECONDS):
        try:
            body = encode_result(clock.task_id, clock.values[:done], failures, time.perf_counter() - clock.started)
            link.conn.send_bytes(b"".join((RESULT, NUMBER.pack(clock.task_id), body)))
        except Exception:  # whatever sending raised, this handler must not return into the item: the caller runs them again
            pass
        finally:
            link.lock.release()
    while True:
        time.sleep(3600)  # the caller ends this worker now


class Link:
    """This worker's end of its connection (whole frames, one thread at a time) and its slot."""

    __slots__ = ("conn", "lock", "slot")

    def __init__(self, conn: Connection, slot: mmap.mmap):
        self.conn = conn
        self.lock = threading.Lock()
        self.slot = slot

    def hold(self, task_id: int) -> None:
        if task_id != NO_TASK:  # the task's first item's clock runs from here, and never from an older task's
            ITEM.pack_into(self.slot, ITEM_AT, item_word(0))
        NUMBER.pack_into(self.slot, HELD_AT, task_id)  # one aligned 8-byte store

    def send(self, kind: bytes, body: bytes = b"") -> None:
        with self.lock:
            self.conn.send_bytes(kind + body)

    def send_task(self, kind: bytes, task_id: int, body: bytes = b"") -> None:
        with self.lock:
            self.conn.send_bytes(b"".join((kind, NUMBER.pack(task_id), body)))

    def send_log(self, record: bytes) -> None:
        self.send(LOG, record)


_links: dict[str, Link] = {}  # socket path -> this pooled worker's link to that backend
_own_link: Link | None = None  # a fork worker's: the pipe it was forked with


def link_through(conn: Connection, slot: mmap.mmap) -> Link:
    """A fork worker's link: the connection and the slot it was forked with. Log records go
    there too."""
    global _own_link
    _own_link = Link(conn, slot)
    return _own_link


def link_to(path: str) -> Link | None:
    """This worker's link to the backend listening at `path`, made on its first task of that
    backend's run; None when the backend has gone."""
    link = _links.get(path)
    if link is not None:
        return link
    for old in list(_links.values()):
        if old.conn.poll():  # the backend never writes here: readable means it has closed
            _forget_link(old)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        slot = new_slot(slot_path(os.path.dirname(path), os.getpid()))  # there before HELLO names it
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    link = _links[path] = Link(Connection(sock.detach()), slot)
    try:
        link.send(HELLO, NUMBER.pack(os.getpid()))
    except OSError:
        _forget_link(link)
        return None
    return link


def _forget_link(link: Link) -> None:
    for path, known in list(_links.items()):
        if known is link:
            del _links[path]
    link.conn.close()


def _drop_links_in_child() -> None:
    """A process forked from a worker (by the function) is not that worker: it closes its copies
    of the worker's links, so the caller sees them close when the worker dies, and nothing it
    says reaches the caller as the worker's."""
    global _own_link, _clocked
    for link in [*_links.values(), *([_own_link] if _own_link else [])]:
        link.conn.close()
    _links.clear()
    _own_link = None
    _clocked = None  # its task is the worker's, not this process's


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_links_in_child)
