"""manager: a broker served over `multiprocessing.managers` that workers on any host join.

The driver (the process calling pmap) serves one `Broker` object. Each host that joins runs
a supervisor (`pmap worker HOST:PORT`, or the local one the driver starts itself) which
starts worker processes, heart-beats for them, reports their deaths at once and kills one
on request (a timeout). Worker processes lease tasks, run them, and complete them.

The broker decides no policy: a task whose worker process dies, or whose host stops
heart-beating (its lease expires) or disconnects, is reported lost to the engine, which runs
its items again under its own rules. Delivery is therefore at-least-once (a lost host may have
run part of the work): functions should be idempotent. A result is accepted only from the
worker holding the task's lease; any other is refused and counted (`Broker.refused_results`).

The broker handles bytes only: functions, items, results and exceptions travel pickled the
one way every process backend uses (`pmap._transfer`, formats in `pmap._outcome`; what the
caller's `__main__` defines goes by value) and are unpickled by the workers and by the
driver's backend, never by the broker. The authkey lets its holder run code in the driver and the workers,
and the traffic is not encrypted: across an untrusted network use an SSH or WireGuard tunnel.
"""
from .broker import Broker
from .driver import ManagerBackend
from .host import run_worker
from .wire import JoinError, parse_address

__all__ = ["Broker", "JoinError", "ManagerBackend", "parse_address", "run_worker"]
