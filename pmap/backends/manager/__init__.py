"""manager: a broker served over `multiprocessing.managers` that workers on any host join.

The driver (the process calling pmap) serves one `Broker` object. Each host that joins runs
a supervisor (`pmap worker HOST:PORT`, or the local one the driver starts itself) which
starts worker processes, heart-beats for them, reports their deaths at once and kills one
on request (a timeout). Worker processes lease tasks, run them, and complete them.

Delivery is at-least-once: a task whose host stops heart-beating (its lease expires) goes
back to the queue under the same task id, and the first result to arrive for a task id
wins; a later duplicate is dropped. Functions should therefore be idempotent.

The broker handles bytes only: functions, items and results travel pickled (cloudpickle
where plain pickle cannot) and are unpickled by the workers and by the driver's backend,
never by the broker. The authkey lets its holder run code in the driver and the workers,
and the traffic is not encrypted: across an untrusted network use an SSH or WireGuard tunnel.
"""
from .broker import Broker
from .driver import ManagerBackend
from .host import run_worker
from .wire import JoinError, parse_address

__all__ = ["Broker", "JoinError", "ManagerBackend", "parse_address", "run_worker"]
