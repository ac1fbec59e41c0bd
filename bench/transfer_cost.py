"""What moving one 2 MB buffer costs on this machine (issue 16's 2 MB loop row).

    python bench/transfer_cost.py

Times, per 2 MB and in one process (no worker, no pipe): copying into memory the allocator
reuses, writing into fresh anonymous memory, and pmap's shared-memory path (a segment made,
written, mapped, read and removed). Fresh pages are what a transfer pays for: each must be
faulted in and zeroed by the kernel, and on a virtual machine that can cost more than the copy.
Medians of 7 rounds of 200.
"""
import mmap
import os
import statistics
import time

import numpy as np

from pmap import _transfer

SIZE = 2 << 20
ROUNDS, PER_ROUND = 7, 200


def per_call_ms(step) -> float:
    for i in range(20):
        step(i)
    rounds = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for i in range(PER_ROUND):
            step(i)
        rounds.append((time.perf_counter() - start) / PER_ROUND * 1000)
    return statistics.median(rounds)


def main() -> None:
    array = np.ones(SIZE // 8)
    channel = f"pmap-{os.getpid()}-bench"
    counter = iter(range(10**9))

    def reused_memory(_):
        float(array.copy().sum())

    def fresh_memory(_):
        region = mmap.mmap(-1, SIZE)
        region.write(memoryview(array).cast("B"))
        view = np.frombuffer(region, dtype=np.float64)
        float(view.sum())
        del view
        region.close()

    def shared_memory_path(_):
        received = _transfer.loads(_transfer.encode(array, channel, f"{channel}-{next(counter)}"))
        float(received.sum())

    rows = [("copy into reused memory, read", per_call_ms(reused_memory)),
            ("write into fresh pages, read", per_call_ms(fresh_memory)),
            ("pmap shared-memory segment: write, map, read, remove", per_call_ms(shared_memory_path))]
    print(f"per {SIZE >> 20} MB buffer, medians of {ROUNDS} rounds of {PER_ROUND}:")
    print("| step | ms |\n|:---|---:|")
    for label, ms in rows:
        print(f"| {label} | {ms:.2f} |")


if __name__ == "__main__":
    main()
