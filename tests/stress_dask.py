"""Run the dask chunk-crash scenario many times (by hand, not in CI): an item that kills its
worker inside a chunk of four, retried once, on one worker. Each run must finish; a run that
hangs past the guard dumps every thread and exits non-zero.

    python tests/stress_dask.py [RUNS]
"""
import faulthandler
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pmap  # noqa: E402
from faults import exit_on_three  # noqa: E402

HANG_GUARD = 120  # seconds per run


def one_run() -> None:
    out = pmap.pmap(exit_on_three, range(12), backend="dask", workers=1, chunksize=4, retries=1,
                    on_error="return")
    assert [r for i, r in enumerate(out) if i != 3] == [i for i in range(12) if i != 3], out
    assert out[3].kind == "crash" and out[3].attempts == 2, out[3]
    assert "KilledWorker" in str(out[3].exception), out[3].exception


def main(runs: int) -> int:
    from distributed import Client

    from pmap.backends.dask import local_cluster
    with local_cluster(1) as cluster, Client(cluster):  # the default client, as in tests/test_dask.py
        for run in range(1, runs + 1):
            faulthandler.dump_traceback_later(HANG_GUARD, exit=True)
            started = time.monotonic()
            one_run()
            faulthandler.cancel_dump_traceback_later()
            print(f"run {run}/{runs}: {time.monotonic() - started:.1f}s, "
                  f"workers {len(cluster.scheduler_info['workers'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 50))
