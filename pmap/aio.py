"""`apmap` / `aimap`: pmap for async callers. The coroutines run on the caller's own event loop
(so they may use its sessions, locks and queues), at most `workers` at a time.

The engine, which owns ordering, retries, timeouts and error policy, is synchronous: it runs in
a helper thread and drives the asyncio backend on the caller's loop through thread-safe calls.
Results come back to the loop through a bounded buffer, so a slow reader holds the run back
instead of piling results up.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
from dataclasses import replace
from typing import AsyncIterable, AsyncIterator, Callable, Iterable

from ._worker import is_async
from .api import ResultList, _run
from .errors import warn_user
from .options import OnError, Options, Progress, Workers, check_callable
from .backends.asyncio import AsyncioBackend

_VALUE, _END, _ERROR = "value", "end", "error"
BUFFER_MIN = 64                # results that may wait for the reader, at least
SOURCE_POLL_SECONDS = 0.25     # how often a wait for the next input item checks for a stop
STOP_GRACE_SECONDS = 2.0       # how long aclose() waits for the engine thread to finish


class _ReaderGone(BaseException):
    """Raised inside the engine thread's wait when the async reader stopped early."""


class AsyncResults(AsyncIterator):
    """What `aimap` returns: iterate with `async for`; `.stats` fills as it goes; `aclose()`
    (or leaving `async with`) cancels the coroutines still running."""

    def __init__(self, func, items, options: Options):
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("aimap/apmap must be called from a coroutine running in an event loop; "
                               "in synchronous code use pmap.imap/pmap.pmap with backend='asyncio'") from None
        check_callable(func)
        if not is_async(func):
            raise TypeError(f"aimap/apmap run async def functions, and {getattr(func, '__qualname__', func)!r} "
                            "is a plain function; for blocking code use "
                            "`await asyncio.to_thread(pmap.pmap, func, items, backend='thread')`")
        self._initializer = options.initializer
        self._initargs = options.initargs
        self._stopping = threading.Event()
        self._source = items
        if isinstance(items, AsyncIterable):
            items = _pull_from_loop(items, self._loop, self._stopping)
        self._backend = AsyncioBackend(workers=options.workers, loop=self._loop)
        run_options = replace(options, backend=self._backend, workers=None, initializer=None, initargs=(),
                              progress=self._progress_on_loop(options.progress))
        self._results = _run(func, items, False, run_options)
        self.stats = self._results.stats
        self._buffer: asyncio.Queue = asyncio.Queue()
        self._room = threading.Semaphore(max(BUFFER_MIN, self._backend.workers))
        self._thread: threading.Thread | None = None
        self._thread_done: concurrent.futures.Future = concurrent.futures.Future()
        self._finished = False
        self._closed = False

    def _progress_on_loop(self, progress):
        """A progress callable runs on the caller's loop, like the rest of the caller's code."""
        if not callable(progress) or isinstance(progress, bool):
            return progress
        loop = self._loop

        def forward(done, total):
            try:
                loop.call_soon_threadsafe(progress, done, total)
            except RuntimeError:  # the loop is closed: nobody is listening
                pass
        return forward

    # ---- the reader's side (the caller's loop) --------------------------------------------
    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._finished:
            raise StopAsyncIteration
        if self._thread is None:
            await self._start()
        kind, value = await self._buffer.get()
        if kind is _VALUE:
            self._room.release()
            return value
        self._finished = True
        if kind is _ERROR:
            raise value
        raise StopAsyncIteration

    async def _start(self) -> None:
        if self._initializer is not None:  # the one loop is the one worker: it runs once, here
            result = self._initializer(*self._initargs)
            if inspect.isawaitable(result):
                await result
        self._thread = threading.Thread(target=self._produce, name="pmap-aimap-engine", daemon=True)
        self._thread.start()

    async def aclose(self) -> None:
        """Stop the run: coroutines still running are cancelled, and have unwound on return."""
        if self._closed:
            return
        self._closed = True
        self._finished = True
        self._stop_engine()
        if self._thread is not None:
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._thread_done)), STOP_GRACE_SECONDS)
            except asyncio.TimeoutError:  # the engine thread is still winding down: a daemon, it ends on its own
                pass
        else:
            self._results.close()
        await self._backend.cancel_and_wait()
        aclose_source = getattr(self._source, "aclose", None)
        if aclose_source is not None:
            try:
                await aclose_source()
            except RuntimeError:  # "already running": still busy in a cancelled __anext__, it ends with that
                pass
            except Exception as exc:  # the user's generator raised as it closed: the caller hears of it
                warn_user(f"pmap: closing the source raised {type(exc).__name__}: {exc}")

    def _stop_engine(self) -> None:
        self._stopping.set()
        self._backend.abandon(_ReaderGone())
        self._room.release()  # in case the engine thread waits for room in the buffer

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()
        return False

    def __del__(self):
        if not getattr(self, "_closed", True) and self._thread is not None:
            self._stop_engine()

    # ---- the engine's side (a helper thread) --------------------------------------------
    def _produce(self) -> None:
        try:
            for value in self._results:
                while not self._room.acquire(timeout=SOURCE_POLL_SECONDS):
                    if self._stopping.is_set():
                        return
                if self._stopping.is_set():
                    return
                self._post(_VALUE, value)
            self._post(_END, None)
        except _ReaderGone:
            pass
        except BaseException as exc:  # whatever ended the run is raised to the async reader, in its task
            self._post(_ERROR, exc)
        finally:
            self._results.close()
            self._thread_done.set_result(None)

    def _post(self, kind, value) -> None:
        try:
            self._loop.call_soon_threadsafe(self._buffer.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is reading any more
            self._stopping.set()


def _pull_from_loop(source: AsyncIterable, loop, stopping: threading.Event):
    """A plain iterator over an async iterable, for the engine thread: each item is awaited on
    the caller's loop."""
    iterator = source.__aiter__()
    done = object()

    async def next_item():
        try:
            return await iterator.__anext__()
        except StopAsyncIteration:
            return done

    while not stopping.is_set():
        future = asyncio.run_coroutine_threadsafe(next_item(), loop)
        while True:
            try:
                item = future.result(SOURCE_POLL_SECONDS)
                break
            except concurrent.futures.TimeoutError:
                if stopping.is_set():
                    future.cancel()
                    return
        if item is done:
            return
        yield item


def aimap(func: Callable, items: Iterable | AsyncIterable, *, workers: Workers = None,
          chunksize: int | None = None, ordered: bool = True, timeout: float | None = None,
          retries: int = 0, retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
          backoff: float = 0.0, on_error: OnError = "raise",
          progress: Progress = False, max_ahead_bytes: int | str = "64MiB",
          initializer: Callable | None = None, initargs: tuple = (),
          inner_threads: int | None = None, seed: int | None = None) -> AsyncResults:
    """Lazy `apmap`: `async for result in pmap.aimap(fetch, urls): ...`.

    Call it from a coroutine; the coroutines run on that coroutine's loop, at most `workers`
    (default 100) at a time. The options are those of `pmap.pmap` (see `help(pmap.pmap)`), less
    `backend`; `inner_threads` is accepted for the same signature, though coroutines on one
    loop run no native pools to limit.

    Parameters
    ----------
    func : async def function
        Awaited as `func(item)` for each item.
    items : iterable or async iterable
        The inputs, read as the coroutines need them.

    Returns
    -------
    AsyncResults
        An async iterator of the results; `.stats` fills in as it goes; `aclose()` (or leaving
        `async with`) cancels the coroutines still running.

    Raises
    ------
    RuntimeError
        Called outside a running event loop.
    TypeError
        `func` is not an `async def` function.
    """
    return AsyncResults(func, items, Options.from_arguments(locals()))


async def apmap(func: Callable, items: Iterable | AsyncIterable, *, workers: Workers = None,
                chunksize: int | None = None, ordered: bool = True, timeout: float | None = None,
                retries: int = 0, retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
                backoff: float = 0.0, on_error: OnError = "raise",
                progress: Progress = False, max_ahead_bytes: int | str = "64MiB",
                initializer: Callable | None = None, initargs: tuple = (),
                inner_threads: int | None = None, seed: int | None = None) -> ResultList:
    """`await pmap.apmap(fetch, urls, workers=50)`: the list `pmap.pmap` would return, computed on
    the running loop with at most `workers` coroutines at a time.

    Takes the arguments of `aimap` (the options of `pmap.pmap`, less `backend`).

    Returns
    -------
    ResultList
        The results in input order (completion order with `ordered=False`), with `.stats`.
    """
    async with AsyncResults(func, items, Options.from_arguments(locals())) as results:
        out = ResultList([value async for value in results])
    out.stats = results.stats
    return out


__all__ = ["aimap", "apmap", "AsyncResults"]
