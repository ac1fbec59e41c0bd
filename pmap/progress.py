"""Progress reporting: a one-line bar on stderr, or the caller's own callback.

The bar is drawn when the run starts, then as items finish: at most ten times a second on a
terminal, and as a plain line every few seconds (and at the end) when stderr is a file or a
pipe, as tqdm does. It writes to stderr only and never touches `sys.stdout`, so results
printed or piped while it shows stay where they were sent.

Between items a ticker thread keeps the clock moving (once a second on a terminal). It starts
only once the run's backend is chosen: auto mode refuses to fork while other threads run, and
its probe reports progress before it decides. The ticker then writes through its own copy of
the stderr descriptor, so a worker forked while it draws cannot inherit a held lock of
`sys.stderr`.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

TERMINAL_INTERVAL = 0.1   # seconds between redraws on a terminal
PLAIN_INTERVAL = 5.0      # seconds between plain lines when stderr is not a terminal
TICK = 1.0                # seconds between the ticker's redraws of a terminal bar while no item finishes
BAR_WIDTH = (10, 30)      # the bar's narrowest and widest
DEFAULT_DESCRIPTION = "pmap"


def format_seconds(seconds: float | None) -> str:
    """`1:05`, `1:02:05`; `?` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_rate(rate: float | None) -> str:
    if rate is None:
        return "? items/s"
    return f"{rate:,.0f} items/s" if rate >= 100 else f"{rate:.3g} items/s"


def is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


class ProgressBar:
    """Counts items, not chunks: `bar(done, total_or_None)`. Shows the label, share done,
    count, elapsed and remaining time, the mean rate since the run started, and failures."""

    def __init__(self, description: str = DEFAULT_DESCRIPTION, stats=None, *, stream: TextIO | None = None,
                 total: int | None = None, initial: int = 0, clock: Callable[[], float] = time.monotonic,
                 auto: bool = False):
        self.description = description
        self.auto = auto              # an auto run: the backend is chosen once its plan is set
        self.stats = stats            # read for the failure count
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = is_terminal(self.stream)
        self.interval = TERMINAL_INTERVAL if self.terminal else PLAIN_INTERVAL
        self.clock = clock
        self.initial = initial        # items finished before this run (a resumed journal): not in the rate
        self.done = initial
        self.total = total
        self.started = clock()
        self.last_draw = -math.inf
        self.closed = False
        self.lock = threading.Lock()  # one drawer at a time: the caller's thread or the ticker
        self.ticker: threading.Thread | bool | None = None  # False: this stream cannot have one
        self.private: TextIO | None = None  # the ticker's own copy of the stderr descriptor
        self.stopping = threading.Event()
        self.draw()

    def __call__(self, done: int, total: int | None) -> None:
        self.done, self.total = done, total
        if self.ticker is None and self._backend_chosen():
            self.start_ticker()
        if self.clock() - self.last_draw >= self.interval:
            self.draw()

    def _backend_chosen(self) -> bool:
        """Whether the run is past auto mode's probe (which runs on serial before `plan` is set).
        An explicit serial run never forks either way; it goes without the ticker."""
        stats = self.stats
        if stats is None:
            return False
        if self.auto:  # its probe runs items on serial, then on threads (the GIL probe), before the plan
            return stats.plan is not None
        return stats.backend not in ("", "serial")

    def start_ticker(self) -> None:
        """Start the ticker (once): call it when the backend is running, never before a fork
        that auto mode may still decide on. The bar also starts it by itself when it sees
        from the run's stats that the backend is chosen."""
        if self.ticker is not None or self.closed:
            return
        try:
            private = os.fdopen(os.dup(self.stream.fileno()), "w", encoding=getattr(self.stream, "encoding", None)
                                or "utf-8", errors="replace")
        except (AttributeError, ValueError, OSError):  # not a real descriptor (a test's StringIO): no ticker
            self.ticker = False
            return
        with self.lock:
            self.private = self.stream = private
        self.ticker = threading.Thread(target=self._tick, name="pmap-progress", daemon=True)
        self.ticker.start()

    def _tick(self) -> None:
        every = TICK if self.terminal else PLAIN_INTERVAL
        while not self.stopping.wait(min(every, TICK)):
            if self.clock() - self.last_draw >= every:
                self.draw()

    def text(self, width: int = 80) -> str:
        """The bar's line, at most `width` characters."""
        elapsed = max(0.0, self.clock() - self.started)
        ran = self.done - self.initial
        rate = ran / elapsed if ran > 0 and elapsed > 0 else None
        failed = getattr(self.stats, "failed", 0) or 0
        tail = f"elapsed {format_seconds(elapsed)}"
        if self.total is not None:
            left = max(0, self.total - self.done)
            tail += f", remaining {format_seconds(left / rate if rate else (0.0 if not left else None))}"
        tail += f", {format_rate(rate)}" + (f", {failed} failed" if failed else "")
        head = f"{self.description}: " if self.description else ""
        if self.total is None:
            return f"{head}{self.done:,} items [{tail}]"[:width]
        share = self.done / self.total if self.total else 1.0
        count = f"{self.done:,}/{self.total:,}"
        room = width - len(head) - len(count) - len(tail) - 12
        bar = ""
        if room >= BAR_WIDTH[0]:
            cells = min(room, BAR_WIDTH[1])
            filled = min(cells, int(share * cells))
            bar = f" |{'#' * filled}{' ' * (cells - filled)}|"
        return f"{head}{share:4.0%}{bar} {count} [{tail}]"[:width]

    def _width(self) -> int:
        """The terminal's width less one column (a full line would wrap on some terminals)."""
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
        if columns <= 0:  # a terminal that does not say (a fresh pty): as `shutil.get_terminal_size` does
            try:
                columns = int(os.environ.get("COLUMNS", ""))
            except ValueError:
                columns = 80
        return max(20, columns - 1)

    def draw(self) -> None:
        with self.lock:
            self._draw()

    def _draw(self) -> None:
        if self.closed:
            return
        self.last_draw = self.clock()
        self._write("\r" + self.text(self._width()) + "\x1b[K" if self.terminal else self.text(120) + "\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: the run matters more than its bar
            self.closed = True

    @contextmanager
    def printing_above(self) -> Iterator[None]:
        """Clear the bar's line while the caller writes to the same terminal, then redraw it."""
        if not self.terminal or self.closed:
            yield
            return
        with self.lock:
            self._write("\r\x1b[K")
            try:
                yield
            finally:
                self._draw()

    def close(self) -> None:
        """Stop the ticker, draw the final state and leave the line in place."""
        if self.ticker:
            self.stopping.set()
            self.ticker.join(timeout=5)
        with self.lock:
            if not self.closed:
                self._draw()
                if self.terminal:
                    self._write("\n")
            self.closed = True
            if self.private is not None:
                try:
                    self.private.close()
                except (OSError, ValueError):
                    pass


def make_progress(progress, stats, description: str = DEFAULT_DESCRIPTION,
                  total: int | None = None, auto: bool = False) -> tuple[Callable | None, Callable[[], None]]:
    """Turn the `progress=` argument (checked already: True, False, a label or a callable) into
    (callback, closer). A string draws the bar with that label; `total`, when known, lets the
    bar's first frame show it; `auto`: the run is auto mode's, whose bar starts its ticker only
    once the plan is made."""
    if progress is False or progress is None:
        return None, lambda: None
    if progress is True or isinstance(progress, str):
        bar = ProgressBar(progress if isinstance(progress, str) else description, stats, total=total, auto=auto)
        return bar, bar.close
    return progress, lambda: None
