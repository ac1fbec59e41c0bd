"""Everything that crosses between the caller and its worker processes, and how big objects do.

One way to pickle (`pack`, and `dumps`/`Channel.dumps` for whole messages; `unpack`/`loads`
undo them), one fallback order for tasks, functions, results and exceptions, both ways: plain
pickle (fast, and it names importable functions and classes), and only where that fails,
cloudpickle keeping file names (lambdas, closures, local classes). With `main_by_value`
(always for functions and initializers; for items when the workers were not forked from the
caller) plain pickle may not name a function or class of `__main__` or of a module registered
with `cloudpickle.register_pickle_by_value`: the worker may not have it, so it goes by value.
`_outcome` builds the task and result formats on these.

Messages are pickled with protocol 5. Buffers of `THRESHOLD` bytes or more (numpy
arrays, bytearrays, pandas' blocks) are taken out of band and written to one shared-memory
segment per message; only a small header crosses the pipe, and the receiver maps the segment
instead of copying it. A function's big buffers go to a segment every worker maps read-only,
so a closure or a `functools.partial` holding a large array is copied once per run, not once
per task or per worker.

Segments are files in /dev/shm (the temporary directory where there is none) named
`pmap-<caller pid>-<channel>-...`. Who releases them:
- an item or result segment: its receiver, as soon as it has mapped it (the memory then goes
  when the last array viewing it is dropped);
- a function segment: its channel, when the next function replaces it or the channel closes;
- whatever a dead worker or an unread result left: the channel, when it closes;
- whatever a killed caller left: the next process that opens a channel (`sweep`), which
  removes every `pmap-<pid>-*` entry (pmap's start-record folders too) whose owner is gone.

An owner is known gone by a lock, not by its pid: before a process names anything after its
pid it takes a shared flock on `pmap-<pid>.lock` and holds it for life. The sweep removes a
pid's entries only when it can lock that file exclusively, which no live holder allows, in any
PID namespace (containers that share /dev/shm but not pids would otherwise see each other's
owners as dead); the kernel drops a dead process's locks. Entries whose pid has no lock file
(made by a pmap that predates the lock) are never swept.

Arrays made by `pmap.shared_array` live in segments of their own (`pmap-<pid>-a...`) from the
start: a message that holds one of the caller's, or a slice of one, carries only its name and
offset, and the receiver maps that segment read-write, so workers and the caller see the same
memory. Such a segment goes when the caller's last array over it does. An array a worker made
goes back copied, as any big buffer: the worker drops its own as soon as it has replied.
"""
from __future__ import annotations

import atexit
import collections
import io
import itertools
import linecache
import mmap
import os
import pickle
import re
import shutil
import struct
import tempfile
import threading
import time
import types
import weakref

try:
    import fcntl
except ImportError:  # Windows: no flock, so no sweep either (leftovers are never provably dead)
    fcntl = None

import cloudpickle

from .errors import ItemNotPicklable, warn_user

THRESHOLD = 1 << 20          # buffers from this size on go through shared memory
# A part packed to nest in a message leaves buffers from this size on to the message, which
# copies them once (into its segment, or its pickle) instead of once per level of nesting.
NESTED_THRESHOLD = 1 << 10
PROTOCOL = 5
PREFIX = "pmap-"
MAGIC = b"PMP\x05"           # a plain pickle starts with b"\x80"; this one with a segment header
_HEAD = struct.Struct("<4sI")  # magic, length of the pickled meta that follows
_ALIGN = 64                  # buffer offsets in a segment: cache-line (and SIMD) aligned
SWEEP_INTERVAL = 60.0        # a long-lived caller looks for dead callers' leftovers this often
# Pickled data through pipes (not shared memory) faster than this means transfer dominates.
WARN_BYTES_PER_SECOND = 300e6
WARN_MIN_BYTES = 100 << 20   # ...once this much has gone, so a short burst does not warn
WARN_WINDOW = 1.0            # seconds over which that rate is measured
_OWNED = re.compile(r"^pmap-(\d+)-")
_LOCK = re.compile(r"^pmap-(\d+)\.lock$")


def shm_directory() -> str:
    """Where segments live: the shared-memory filesystem, else the temporary directory."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


SHM_DIR = shm_directory()

# In a worker: the channel of the last task it decoded, so its results are named for (and
# released with) that caller's channel. None in a process that never decoded a task: its
# results then stay in the pipe, since nobody would clean up after them.
_reply_channel: str | None = None
_counter = itertools.count()
_sweep_lock = threading.Lock()
_last_sweep = 0.0


# ---- cloudpickle that keeps file names ------------------------------------------------
def _code_keeping_path(code: types.CodeType):
    constructor, args = _cloudpickle_code_reduce(code)
    args = tuple(code.co_filename if type(arg) is str and arg == "<dynamic-code>" else arg for arg in args)
    lines = _source_held_in_memory(code.co_filename)
    if lines is not None:
        return _code_with_its_source, (constructor, args, code.co_filename, lines)
    return constructor, args


def _source_held_in_memory(filename: str) -> list | None:
    """The lines of a source that exists only in this process's linecache (a notebook cell,
    which IPython enters there with no modification time), or None."""
    entry = linecache.cache.get(filename)
    if entry is None or len(entry) != 4 or entry[1] is not None:
        return None  # unknown, lazily loaded, or a file on disk the worker can read itself
    return entry[2]


def _code_with_its_source(constructor, args, filename: str, lines: list) -> types.CodeType:
    """In a worker: the code, with its notebook cell's lines entered in linecache, so that a
    traceback from it shows the cell's source lines as it does in the notebook."""
    linecache.cache.setdefault(filename, (sum(map(len, lines)), None, lines, filename))
    return constructor(*args)


_cloudpickle_code_reduce = cloudpickle.Pickler.dispatch_table[types.CodeType]


class _PathKeepingPickler(cloudpickle.Pickler):
    """cloudpickle, but a function's code keeps its file name (cloudpickle writes
    "<dynamic-code>"): a worker's tracebacks and warnings then name the file and line of a
    function defined in __main__ (and show the line, where the file is readable)."""

    dispatch_table = collections.ChainMap({types.CodeType: _code_keeping_path}, cloudpickle.Pickler.dispatch_table)


# ---- pickling: one fallback order ------------------------------------------------------
def _module_goes_by_value(module) -> bool:
    """Whether a worker may lack `module`, so that what lives in it must be sent by value."""
    if not isinstance(module, str):
        return False
    if module == "__main__":
        return True
    return any(module == name or module.startswith(name + ".")
               for name in cloudpickle.list_registry_pickle_by_value())


class _PlainPicklerMainByValue(pickle.Pickler):
    """Plain pickle that refuses to name a function or class of a module a worker may lack
    (see `_module_goes_by_value`): a function run from __main__, a notebook or `pmap run
    file.py` then goes by value instead of by a name the worker cannot look up."""

    def reducer_override(self, obj):
        if isinstance(obj, (types.FunctionType, type)) and _module_goes_by_value(getattr(obj, "__module__", None)):
            raise pickle.PicklingError(f"{obj!r} lives in {obj.__module__}, which a worker may not have")
        return NotImplemented  # everything else as plain pickle does it


def picklers(main_by_value: bool = False) -> tuple:
    """The one fallback order, as Pickler classes to try in turn: plain pickle, then
    cloudpickle keeping file names. The only place that says how pmap pickles."""
    return (_PlainPicklerMainByValue if main_by_value else pickle.Pickler, _PathKeepingPickler)


def _dump(pickler, obj, buffer_callback) -> bytes:
    if pickler is pickle.Pickler:
        return pickle.dumps(obj, PROTOCOL, buffer_callback=buffer_callback)  # the same, a little faster
    with io.BytesIO() as file:
        pickler(file, PROTOCOL, buffer_callback=buffer_callback).dump(obj)
        return file.getvalue()


def _pickle_out_of_band(obj, main_by_value: bool = False, out_of_band: bool = True,
                        threshold: int = THRESHOLD) -> tuple[bytes, list]:
    """(pickle, big buffers) of `obj`, trying each of `picklers` in turn; the buffers of
    `threshold` bytes or more, and those in shared arrays, are left out of the pickle (all
    stay in band without `out_of_band`). Raises what the last one raised."""
    error: Exception | None = None
    for pickler in picklers(main_by_value):
        big: list = []

        def keep_in_band(buffer: pickle.PickleBuffer) -> bool:
            try:
                raw = buffer.raw()
            except BufferError:  # not contiguous: pickle copies it in band
                return True
            if raw.nbytes < threshold and _shared_reference(raw) is None:
                return True
            big.append(raw)
            return False

        try:
            return _dump(pickler, obj, keep_in_band if out_of_band else None), big
        except Exception as exc:  # this way cannot pickle it (a user __reduce__ may raise anything): the next one may
            error = exc
    assert error is not None
    raise error


def _write_segment(name: str, buffers: list) -> tuple:
    """Write `buffers` one after another (aligned) to a new segment; returns their layout:
    (offset, size) each."""
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        layout, offset = [], 0
        for raw in buffers:
            offset = -(-offset // _ALIGN) * _ALIGN
            layout.append((offset, raw.nbytes))
            offset += raw.nbytes
        os.ftruncate(fd, offset)
        for (start, size), raw in zip(layout, buffers):
            done = 0
            while done < size:  # the kernel copies straight into the segment's pages
                done += os.pwrite(fd, raw[done:], start + done)
        return tuple(layout)
    except BaseException:  # re-raised: a half-written segment is not left behind
        _remove(path)
        raise
    finally:
        os.close(fd)


def encode(obj, channel: str | None, segment: str | None, shared: bool = False, always_header: bool = False,
           main_by_value: bool = False) -> bytes:
    """Pickle `obj`; with a channel and big buffers, those go to segment `segment` and the
    message starts with a header naming it (`always_header`: even without, so the receiver
    learns the channel). Without a channel (nobody would release a segment) all is in band."""
    if channel is None:
        return _pickle_out_of_band(obj, main_by_value, out_of_band=False)[0]
    data, big = _pickle_out_of_band(obj, main_by_value)
    # Arrays already in shared memory travel by name when the channel's caller made them: it
    # keeps them while the run lasts. Any other (a worker's own, gone once it returns) is copied.
    lender = _owner_pid(channel)
    references = [_shared_reference(raw, lender) for raw in big]
    own = [raw for raw, reference in zip(big, references) if reference is None]
    layout: tuple = tuple(references)
    if not own:
        segment = None
    else:
        assert segment is not None, "a message with a channel names its segment"
        try:
            own_layout = iter(_write_segment(segment, own))
            layout = tuple(reference or next(own_layout) for reference in references)
        except OSError:  # shared memory full or unavailable: the pipe still works
            data, segment, layout = _pickle_out_of_band(obj, main_by_value, out_of_band=False)[0], None, ()
    if not layout and not always_header:
        return data
    return _with_header((channel, segment, layout, shared), data)


def dumps(obj, main_by_value: bool = False) -> bytes:
    """`obj` as one message without a channel (everything in band), for `loads`; a function
    or an initializer with `main_by_value` (see the module's docstring). Raises what pickling
    raises."""
    return encode(obj, None, None, main_by_value=main_by_value)


def _with_header(fields: tuple, data: bytes) -> bytes:
    """(channel, segment or None, layout, shared) and the pickle, as one message."""
    meta = pickle.dumps(fields, PROTOCOL)
    return b"".join((_HEAD.pack(MAGIC, len(meta)), meta, data))


def pack(obj, main_by_value: bool = False) -> tuple[bytes, list]:
    """(pickle, big buffers) of `obj`, a part its receiver rebuilds on its own (items, values,
    an exception): the buffers are PickleBuffers, so the message it travels in sends them
    through its segment (in band without a channel). Raises what pickling raises."""
    data, big = _pickle_out_of_band(obj, main_by_value, threshold=NESTED_THRESHOLD)
    return data, [pickle.PickleBuffer(raw) for raw in big]


def unpack(data, buffers):
    """The object of `pack`, its buffers as the message delivered them."""
    return pickle.loads(data, buffers=buffers)


def _split(message) -> tuple | None:
    """(meta, pickle) of a message with a segment header; None for a plain pickle."""
    if len(message) < _HEAD.size or bytes(message[:4]) != MAGIC:
        return None
    _, meta_len = _HEAD.unpack_from(message)
    view = memoryview(message)
    meta = pickle.loads(view[_HEAD.size:_HEAD.size + meta_len])
    return meta, view[_HEAD.size + meta_len:]


def loads(message):
    """Unpickle a message of either kind, mapping its segment (no copy)."""
    split = _split(message)
    if split is None:
        return pickle.loads(message)
    (channel, segment, layout, shared), data = split
    _note_channel(channel)
    if not layout:
        return pickle.loads(data)
    return pickle.loads(data, buffers=_map(segment, layout, shared))


def _map(segment: str | None, layout, shared: bool) -> list:
    """The buffers of a layout: (offset, size) in the message's own segment, (offset, size,
    name) in a shared array's."""
    view = memoryview(b"")
    if segment is not None:
        path = os.path.join(SHM_DIR, segment)
        fd = os.open(path, os.O_RDONLY if shared else os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            region = mmap.mmap(fd, size, access=mmap.ACCESS_READ if shared else mmap.ACCESS_WRITE)
        finally:
            os.close(fd)
        if not shared:
            _remove(path)  # ours alone now: the memory goes when the last view of it does
        view = memoryview(region)
    return [view[entry[0]:entry[0] + entry[1]] if len(entry) == 2 else _shared_view(*entry)
            for entry in layout]


def wire_size(message) -> int:
    """Bytes a message moved: the pipe's share and its segment's."""
    split = _split(message)
    if split is None:
        return len(message)
    layout = split[0][2]
    return len(message) + sum(entry[1] for entry in layout if len(entry) == 2)  # shared arrays stay


def _note_channel(channel: str) -> None:
    global _reply_channel
    if _owner_pid(channel) != os.getpid():
        _reply_channel = channel


def reply(obj) -> bytes:
    """A worker's result: big buffers into a segment of the channel its task came on."""
    channel = _reply_channel
    segment = f"{channel}-r{os.getpid()}-{next(_counter)}" if channel else None
    return encode(obj, channel, segment)


# ---- functions ------------------------------------------------------------------------
def function_segments(key: str) -> list[str]:
    """The segments a function key names: its own (for its big buffers) and the shared
    arrays it holds."""
    return [name for name in key.partition("@")[2].split("+") if name]


def function_released(key) -> bool:
    """Whether a cached function's memory was released by its caller (the run is over, or
    its shared array dropped)."""
    names = function_segments(key) if isinstance(key, str) else []
    return any(not os.path.exists(os.path.join(SHM_DIR, name)) for name in names)


def function_file(start_dir: str, key: str) -> str:
    return os.path.join(start_dir, "fn-" + key.partition("@")[0])


def read_function(start_dir: str, key: str) -> bytes:
    """A worker's first look at a run's function: the bytes its caller wrote once."""
    with open(function_file(start_dir, key), "rb") as handle:
        return handle.read()


# ---- the channel ----------------------------------------------------------------------
class Channel:
    """One backend's link to its workers. Its segments are named after it, so closing it
    removes whatever a dead worker or an unread result left behind."""

    def __init__(self):
        hold_owner_lock()
        sweep(force=False)
        self.name = f"{PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
        self.counter = itertools.count()
        self.function_segment: str | None = None
        self.traffic = _Traffic()
        _open_channels.add(self.name)

    def dumps(self, obj) -> bytes:
        """A task, big buffers through a segment of this channel."""
        segment = f"{self.name}-t{next(self.counter)}"
        try:
            message = encode(obj, self.name, segment, always_header=True)
        except Exception as exc:  # a user object neither way pickles (its __reduce__ may raise anything): items fail
            raise ItemNotPicklable(f"cannot pickle the task to send it to a worker: "
                                   f"{type(exc).__name__}: {exc}") from exc
        self.traffic.add("items", len(message))
        return message

    def share_function(self, fn) -> tuple[str, bytes]:
        """(key, bytes) of `fn` for this run: its big buffers in a segment every worker maps
        read-only. The key is a content hash (and names that segment)."""
        import hashlib
        self.release_function()
        segment = f"{self.name}-f{next(self.counter)}"
        data = encode(fn, self.name, segment, shared=True, main_by_value=True)
        key = hashlib.blake2b(data, digest_size=12).hexdigest()
        split = _split(data)
        if split is not None:
            (_, own_segment, layout, _), _ = split
            self.function_segment = own_segment
            names = [own_segment] if own_segment else []
            names += sorted({entry[2] for entry in layout if len(entry) == 3})  # shared arrays
            key += "@" + "+".join(names)
        self.traffic.add("function", len(data))
        return key, data

    def release_function(self) -> None:
        if self.function_segment is not None:
            _remove(os.path.join(SHM_DIR, self.function_segment))
            self.function_segment = None

    def loads(self, message):
        """A result from a worker."""
        self.traffic.add("results", len(message))
        return loads(message)

    def close(self) -> None:
        """Remove every segment of this channel (results never read, items never mapped)."""
        self.traffic.check(final=True)
        self.function_segment = None
        _open_channels.discard(self.name)
        _remove_matching(self.name + "-")


_open_channels: set = set()


class _Traffic:
    """Pickled bytes through pipes, by cause; warns once when their rate means the run is
    mostly moving data."""

    CAUSES = {
        "function": ("the function (its closure, functools.partial arguments or the module globals it uses)",
                     "make big data numpy arrays or bytearrays (they go through shared memory, once per run), "
                     "load it in an initializer, or use backend='fork', which inherits the function"),
        "items": ("the items",
                  "pass numpy arrays or bytearrays (sent through shared memory), or send file paths or "
                  "indices and load the data in the function"),
        "results": ("the results",
                    "return numpy arrays or bytearrays (sent back through shared memory), or reduce the "
                    "data in the function and return less"),
    }

    def __init__(self):
        self.window_start = time.monotonic()
        self.window = dict.fromkeys(self.CAUSES, 0)
        self.warned = False

    def add(self, cause: str, n: int) -> None:
        self.window[cause] += n
        if time.monotonic() - self.window_start >= WARN_WINDOW:
            self.check()

    def check(self, final: bool = False) -> None:
        now = time.monotonic()
        total = sum(self.window.values())
        elapsed = max(now - self.window_start, 1e-3)
        if not self.warned and total >= WARN_MIN_BYTES and total / elapsed > WARN_BYTES_PER_SECOND:
            self.warned = True
            cause = max(self.window, key=self.window.get)
            what, fix = self.CAUSES[cause]
            warn_user(f"pmap: this run pickled {total / 2**20:.0f} MB through pipes in {elapsed:.2f}s "
                      f"({total / elapsed / 2**20:.0f} MB/s), mostly {what} "
                      f"({self.window[cause] / 2**20:.0f} MB): moving data costs more than the work. "
                      f"Fix: {fix}.")
        if not final:
            self.window_start = now
            self.window = dict.fromkeys(self.CAUSES, 0)


# ---- shared arrays ----------------------------------------------------------------------
class _SharedSegment:
    """A shared array's segment as mapped in this process: the caller's mapping is held weakly
    (it goes with its last array), a worker's strongly (until its file is gone)."""

    __slots__ = ("held", "weak", "address", "size")

    def __init__(self, region: mmap.mmap, held: bool):
        import numpy
        self.held = region if held else None
        self.weak = weakref.ref(region)
        self.address = numpy.frombuffer(region, numpy.uint8).ctypes.data
        self.size = len(region)

    def mapping(self) -> mmap.mmap | None:
        return self.weak()


_shared_segments: dict[str, _SharedSegment] = {}
_shared_lock = threading.Lock()


def new_shared_segment(nbytes: int) -> mmap.mmap:
    """A new read-write segment of `nbytes` for a shared array; removed when the returned
    mapping is garbage (its last array dropped), or when this process ends."""
    hold_owner_lock()
    name = f"{PREFIX}{os.getpid()}-a{os.urandom(6).hex()}"
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, max(nbytes, 1))
        region = mmap.mmap(fd, max(nbytes, 1))
    except BaseException:  # re-raised: a half-made segment is not left behind
        _remove(path)
        raise
    finally:
        os.close(fd)
    with _shared_lock:
        _shared_segments[name] = _SharedSegment(region, held=False)
    weakref.finalize(region, _release_shared_segment, name, os.getpid())
    return region


def _release_shared_segment(name: str, owner: int) -> None:
    # A finalizer: it may run inside any allocation, so it takes no lock (pop is atomic).
    if os.getpid() == owner:  # not in a forked worker that inherited the finalizer
        _shared_segments.pop(name, None)
        _remove(os.path.join(SHM_DIR, name))


def _shared_reference(raw: memoryview, owner: int | None = None) -> tuple | None:
    """(offset, size, segment name) when `raw` lies in a shared array's segment (one made by
    process `owner`, if given)."""
    if not _shared_segments or not raw.nbytes:
        return None
    import numpy
    start = numpy.frombuffer(raw, numpy.uint8).ctypes.data
    with _shared_lock:
        for name, segment in _shared_segments.copy().items():  # a finalizer may drop one meanwhile
            if segment.address <= start and start + raw.nbytes <= segment.address + segment.size \
                    and segment.mapping() is not None:
                if owner is not None and _owner_pid(name) != owner:
                    return None
                return (start - segment.address, raw.nbytes, name)
    return None


def _forget_dropped_shared() -> None:
    """Unmap (once no array here views them) the shared arrays whose callers dropped them."""
    for name in [n for n, s in _shared_segments.copy().items() if s.held is not None]:
        if not os.path.exists(os.path.join(SHM_DIR, name)):
            _shared_segments.pop(name, None)


def forget_dropped_shared() -> None:
    with _shared_lock:
        _forget_dropped_shared()


def _shared_view(offset: int, size: int, name: str) -> memoryview:
    """A shared array's bytes in this process: the caller's own mapping, or a worker's
    (mapped on first use, kept while the caller keeps the array)."""
    with _shared_lock:
        segment = _shared_segments.get(name)
        region = segment.mapping() if segment is not None else None
        if region is None:
            _forget_dropped_shared()
            try:
                fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
            except FileNotFoundError:
                raise RuntimeError(f"pmap: shared array {name} is gone: the process that made it "
                                   f"(pid {_owner_pid(name)}) dropped it before this one (pid {os.getpid()}) "
                                   "could map it") from None
            try:
                region = mmap.mmap(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            _shared_segments[name] = _SharedSegment(region, held=True)
    return memoryview(region)[offset:offset + size]


# ---- clean-up -------------------------------------------------------------------------
def _owner_pid(name: str) -> int | None:
    match = _OWNED.match(name)
    return int(match.group(1)) if match else None


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:  # gone already, or another user's: nothing left for us to remove
        pass


def _remove_matching(prefix: str) -> None:
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            _remove(os.path.join(SHM_DIR, name))


def _lock_path(pid: int) -> str:
    return os.path.join(SHM_DIR, f"{PREFIX}{pid}.lock")


def _same_file(fd: int, path: str) -> bool:
    """Whether `path` still names the file open as `fd` (a sweep may have removed it)."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


_owner_lock: tuple[int, int] | None = None  # (pid, fd of its lock file) of this process
_owner_lock_mutex = threading.Lock()


def hold_owner_lock() -> None:
    """Take this process's lock (see the module's docstring), once, before naming any entry
    after its pid. Waits while a sweep judges a dead process of the same pid."""
    global _owner_lock
    pid = os.getpid()
    if fcntl is None or (_owner_lock is not None and _owner_lock[0] == pid):
        return
    with _owner_lock_mutex:
        if _owner_lock is not None and _owner_lock[0] == pid:
            return
        path = _lock_path(pid)
        while True:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                if _same_file(fd, path):
                    break
            except BaseException:  # re-raised (a Ctrl-C in flock too): the descriptor is not leaked
                os.close(fd)
                raise
            os.close(fd)  # a sweep removed that file while we waited: lock the new one
        _owner_lock = (pid, fd)


def _after_fork_in_child() -> None:
    """A forked child shares its parent's lock file description: it lets go of it (the
    parent still holds the lock), takes its own when it names something, and gets fresh
    module locks (another thread may have held one at the fork)."""
    global _owner_lock, _owner_lock_mutex, _sweep_lock, _shared_lock
    _owner_lock_mutex = threading.Lock()
    _sweep_lock = threading.Lock()
    _shared_lock = threading.Lock()
    if _owner_lock is not None:
        os.close(_owner_lock[1])
        _owner_lock = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _remove_if_owner_gone(pid: int, names: list[str]) -> int:
    """Remove `names` (entries of `pid`) and its lock file if no live process holds its lock;
    returns how many entries went."""
    path = _lock_path(pid)
    try:
        fd = os.open(path, os.O_RDONLY)  # never created here: without a lock file nothing is provable
    except OSError:
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # a live owner holds it
        if not _same_file(fd, path):
            return 0  # another sweep removed it and a new owner may have made it again
        for name in names:
            _remove(os.path.join(SHM_DIR, name))
        _remove(path)  # last, while locked: an owner waiting for it then makes a new one
        return len(names)
    finally:
        os.close(fd)


def sweep(force: bool = True) -> int:
    """Remove the segments and start-record folders of processes that no longer run (a
    caller killed with SIGKILL, say), in this PID namespace or any other that shares the
    directory. Returns how many entries went. Without `force`, at most once per
    SWEEP_INTERVAL in this process."""
    global _last_sweep
    if fcntl is None:
        return 0
    with _sweep_lock:
        now = time.monotonic()
        if not force and _last_sweep and now - _last_sweep < SWEEP_INTERVAL:
            return 0
        _last_sweep = now
        try:
            names = os.listdir(SHM_DIR)
        except OSError:
            return 0
        by_owner: dict[int, list[str]] = {}
        for name in names:
            match = _OWNED.match(name) or _LOCK.match(name)
            if match:
                entries = by_owner.setdefault(int(match.group(1)), [])
                if not name.endswith(".lock"):
                    entries.append(name)
        by_owner.pop(os.getpid(), None)  # ours, or a namesake's in another namespace: alive either way
        return sum(_remove_if_owner_gone(pid, entries) for pid, entries in by_owner.items())


def _at_exit(pid: int = os.getpid()) -> None:
    """This process ends: every channel it left open goes with it (not in forked children,
    which inherit this hook but not the channels), and so does its lock file, with whatever
    else is named after its pid, unless a namesake in another PID namespace holds it too."""
    if os.getpid() != pid:
        return
    for name in list(_open_channels):
        _remove_matching(name + "-")
    global _owner_lock
    if _owner_lock is not None and _owner_lock[0] == pid:
        fd = _owner_lock[1]
        _owner_lock = None  # anything named after this (a late hook's channel) locks anew
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, _lock_path(pid)):
                _remove_matching(f"{PREFIX}{pid}-")
                _remove(_lock_path(pid))
        except BlockingIOError:
            pass  # a namesake in another namespace holds it too: a sweep judges ours once it ends
        finally:
            os.close(fd)


atexit.register(_at_exit)


# ---- measuring ------------------------------------------------------------------------
class _CountingWriter:
    __slots__ = ("bytes",)

    def __init__(self):
        self.bytes = 0

    def write(self, data) -> int:
        # bytes, or (for a large buffer kept in band) the pickler's PickleBuffer itself
        n = len(data) if type(data) is bytes else memoryview(data).nbytes
        self.bytes += n
        return n


def measure(obj, module=None, main_by_value: bool = False) -> tuple[int, int]:
    """(bytes that would cross a pipe, bytes that would go through shared memory) for `obj`,
    pickled into a counter by each of `picklers` in turn (only cloudpickle's way when `module`
    is cloudpickle): nothing is kept, so a big object costs no second copy. Raises what
    pickling raises."""
    error: Exception | None = None
    for pickler in picklers(main_by_value)[1:] if module is cloudpickle else picklers(main_by_value):
        writer = _CountingWriter()
        big = [0]

        def out_of_band(buffer: pickle.PickleBuffer) -> bool:
            try:
                raw = buffer.raw()
            except BufferError:
                return True
            if _shared_reference(raw) is not None:
                return False  # already in shared memory: nothing to move
            if raw.nbytes < THRESHOLD:
                return True
            big[0] += raw.nbytes
            return False

        try:
            pickler(writer, protocol=PROTOCOL, buffer_callback=out_of_band).dump(obj)
            return writer.bytes, big[0]
        except Exception as exc:  # this way cannot pickle it (a user __reduce__ may raise anything): the next one may
            error = exc
    assert error is not None
    raise error
