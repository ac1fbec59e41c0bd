"""Adaptive chunk size: measure the time per item and aim for chunks of about 0.1 s, and no
more than a few MB."""
from __future__ import annotations

TARGET_CHUNK_SECONDS = 0.1      # within the 50-200 ms band: long enough to hide transfer cost
CHUNKS_PER_WORKER = 8           # with a known length, keep at least this many chunks per worker (balance)
MAX_CHUNK = 50_000              # without a known length, bound the items one chunk holds
MAX_CHUNK_BYTES = 4 << 20       # items and results of one chunk: big enough to hide a task's cost
PER_ITEM_OVERHEAD = 2e-6        # seconds of engine and transfer cost per item, on top of the call
GROWTH = 4                      # a chunk is at most this many times the one before
TAIL_WORKER_SHARES = 2          # near the end, a chunk holds at most remaining / (2 x workers) items...
TAIL_MIN_SECONDS = 0.005        # ...when a chunk that size would take longer than this (else no matter)


class ChunkSizer:
    """Chooses the size of the next chunk.

    An explicit `chunksize` is returned as is. Otherwise the first chunk is a single item
    (a quick first result, and a measurement), then the size follows the measured mean time
    per item, growing at most GROWTH times per step so one fast item does not make a huge
    chunk, and holding at most `max_bytes` of items and results by their measured mean size.
    """

    __slots__ = ("fixed", "workers", "cap", "items_seen", "seconds_seen", "sized_items", "bytes_seen", "current",
                 "target", "max_bytes")

    def __init__(self, fixed: int | None, workers: int, total: int | None,
                 target: float = TARGET_CHUNK_SECONDS, max_bytes: int = MAX_CHUNK_BYTES):
        self.fixed = fixed
        self.target = target
        self.max_bytes = max_bytes
        self.workers = max(1, workers)
        self.cap = MAX_CHUNK
        if total is not None:
            self.cap = max(1, min(MAX_CHUNK, -(-total // (self.workers * CHUNKS_PER_WORKER))))
        self.items_seen = 0
        self.seconds_seen = 0.0
        self.sized_items = 0    # items whose size was measured (auto's probe measured only time)
        self.bytes_seen = 0
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

    def observe(self, n_items: int, elapsed: float, nbytes: int = 0) -> None:
        """`n_items` took `elapsed` seconds; `nbytes`: the size of their items and results."""
        if self.fixed is not None or n_items <= 0:
            return
        self.items_seen += n_items
        self.seconds_seen += elapsed
        if nbytes:
            self.sized_items += n_items
            self.bytes_seen += nbytes
        per_item = self.seconds_seen / self.items_seen + PER_ITEM_OVERHEAD
        ideal = int(self.target / per_item)
        if self.bytes_seen:
            ideal = min(ideal, self.max_bytes * self.sized_items // self.bytes_seen)
        self.current = max(1, min(ideal, self.cap, max(self.current * GROWTH, 2)))
