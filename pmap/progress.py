"""Progress reporting: a rich bar on stderr, or the caller's own callback."""
from __future__ import annotations

import sys
from typing import Callable


class ProgressBar:
    """Counts items, not chunks; shows rate, ETA and failures. Drawn on stderr."""

    def __init__(self, description: str = "pmap", stats=None):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                                   TextColumn, TimeElapsedColumn, TimeRemainingColumn)
        self.stats = stats
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[failed]}"),
                            console=Console(file=sys.stderr), transient=False, auto_refresh=True)
        self.task = None
        self.description = description

    def __call__(self, done: int, total: int | None) -> None:
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task(self.description, total=total, rate="", failed="")
        elapsed = self.bar.tasks[0].elapsed or 0.0
        rate = f"{done / elapsed:,.0f} items/s" if elapsed > 0 else ""
        failed = self.stats.failed if self.stats is not None else 0
        self.bar.update(self.task, completed=done, rate=rate, failed=f"{failed} failed" if failed else "")

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()


def make_progress(progress, stats, description: str = "pmap") -> tuple[Callable | None, Callable[[], None]]:
    """Turn the `progress=` argument (checked already: True, False or a callable) into
    (callback, closer)."""
    if progress is False:
        return None, lambda: None
    if progress is True:
        bar = ProgressBar(description, stats)
        return bar, bar.close
    return progress, lambda: None
