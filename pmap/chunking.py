"""Adaptive chunk size: measure the time per item and aim for chunks of about 0.1 s."""
from __future__ import annotations

TARGET_CHUNK_SECONDS = 0.1      # within the 50-200 ms band: long enough to hide transfer cost
CHUNKS_PER_WORKER = 8           # with a known length, keep at least this many chunks per worker (balance)
MAX_CHUNK = 50_000              # without a known length, bound the items one chunk holds
PER_ITEM_OVERHEAD = 2e-6        # seconds of engine and transfer cost per item, on top of the call
GROWTH = 4                      # a chunk is at most this many times the one before
TAIL_WORKER_SHARES = 2          # near the end, a chunk holds at most remaining / (2 x workers) items...
TAIL_MIN_SECONDS = 0.005        # ...when a chunk that size would take longer than this (else no matter)


class ChunkSizer:
    """Chooses the size of the next chunk.

    An explicit `chunksize` is returned as is. Otherwise the first chunk is a single item
    (a quick first result, and a measurement), then the size follows the measured mean time
    per item, growing at most GROWTH times per step so one fast item does not make a huge
    chunk.
    """

    __slots__ = ("fixed", "workers", "cap", "items_seen", "seconds_seen", "current", "target")

    def __init__(self, fixed: int | None, workers: int, total: int | None,
                 target: float = TARGET_CHUNK_SECONDS):
        self.fixed = fixed
        self.target = target
        self.workers = max(1, workers)
        self.cap = MAX_CHUNK
        if total is not None:
            self.cap = max(1, min(MAX_CHUNK, -(-total // (self.workers * CHUNKS_PER_WORKER))))
        self.items_seen = 0
        self.seconds_seen = 0.0
        self.current = 1

    def size(self, remaining: int | None = None) -> int:
        """Items for the next chunk; with `remaining` known, chunks shrink toward the end
        (guided scheduling), so no worker is left with a long last chunk while others idle."""
        if self.fixed is not None:
            return self.fixed
        size = self.current
        if remaining is not None and self.items_seen:
            per_item = self.seconds_seen / self.items_seen
            if size * per_item > TAIL_MIN_SECONDS:
                size = max(1, min(size, -(-remaining // (self.workers * TAIL_WORKER_SHARES))))
        return size

    def observe(self, n_items: int, elapsed: float) -> None:
        if self.fixed is not None or n_items <= 0:
            return
        self.items_seen += n_items
        self.seconds_seen += elapsed
        per_item = self.seconds_seen / self.items_seen + PER_ITEM_OVERHEAD
        ideal = int(self.target / per_item)
        self.current = max(1, min(ideal, self.cap, max(self.current * GROWTH, 2)))
