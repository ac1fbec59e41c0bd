"""imap over an endless input with flat memory: take N results from itertools.count().

    python examples/stream_memory.py [N] [BACKEND]
"""
import itertools
import sys

import psutil

import pmap


def double(x):
    return 2 * x


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    backend = sys.argv[2] if len(sys.argv) > 2 else "fork"
    me = psutil.Process()
    before = me.memory_info().rss
    peak = before
    results = pmap.imap(double, itertools.count(), backend=backend)
    for i, value in enumerate(itertools.islice(results, n)):
        assert value == 2 * i
        if i % 10_000 == 0:
            peak = max(peak, me.memory_info().rss)
    results.close()
    peak = max(peak, me.memory_info().rss)
    print(f"{n:,} results from itertools.count() on {backend}: RSS {before / 2**20:.1f} MB before, "
          f"peak {peak / 2**20:.1f} MB (+{(peak - before) / 2**20:.1f} MB)")
