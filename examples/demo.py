"""A short tour: CPU-bound work on processes, IO-bound work on threads, failures kept per item."""
import time

import pmap


def cpu_work(n):
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def io_work(seconds):
    time.sleep(seconds)
    return seconds


def flaky(x):
    if x % 5 == 0:
        raise ValueError(f"{x} is a multiple of five")
    return x


def timed(label, fn):
    start = time.perf_counter()
    out = fn()
    print(f"{label:<44} {time.perf_counter() - start:6.2f}s")
    return out


if __name__ == "__main__":
    items = [1_000_000] * 40
    serial = timed("CPU-bound, 40 items, serial", lambda: pmap.pmap(cpu_work, items, backend="serial"))
    fast = timed("CPU-bound, 40 items, backend='auto'", lambda: pmap.pmap(cpu_work, items))
    assert serial == fast
    print("   auto chose:", fast.stats.plan.reason)
    waits = timed("IO-bound, 100 x 50 ms sleeps, backend='auto'", lambda: pmap.pmap(io_work, [0.05] * 100))
    print("   auto chose:", waits.stats.plan.reason)
    out = pmap.pmap(flaky, range(12), backend="thread", on_error="return")
    print("failures kept in their slots:", [r for r in out if isinstance(r, pmap.Failure)][:2], "...")
    print("stats:", out.stats)
