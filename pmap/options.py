"""The run options, declared once.

`Options` is the one place an option is named, defaulted and checked. `pmap`, `imap`,
`starmap`, `Pool`, `explain`, `compare`, `apmap` and the CLI keep explicit keyword arguments
(for help and type checkers) and hand them over here, so a bad value is refused the same way
everywhere and before any work starts. A new option is one field here plus its use.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping, Optional, Union

from .concurrency import Adaptive
from .engine import RunSpec
from .seeding import check_seed

ON_ERROR_CHOICES = ("raise", "return", "skip")
# A size in bytes as a person writes it: 1000 bytes to the KB, 1024 to the KiB.
SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)

# What the public signatures accept, spelled once for type checkers and readers.
Workers = Union[int, Literal["adaptive"], Adaptive, None]  # None: the backend's default
ProgressCallback = Callable[[int, Optional[int]], Any]      # (items done, total or None)
Progress = Union[bool, str, ProgressCallback]                # a bar, a bar with this label, or a callback
OnError = Literal["raise", "return", "skip"]


@dataclass(frozen=True)
class Options:
    """Every option of a run, checked and normalised on construction."""

    backend: Any = "auto"               # a name, a Backend class, or an opened Backend instance
    workers: int | Adaptive | str | None = None  # None: the backend's default; "adaptive" or Adaptive(...)
    chunksize: int | None = None        # None: adaptive
    ordered: bool = True
    timeout: float | None = None        # seconds per item; inf means none
    retries: int = 0
    retry_on: tuple = (Exception,)      # one exception type or a tuple of them
    backoff: float = 0.0                # seconds before the first retry, doubling per attempt
    on_error: str = "raise"
    progress: Any = False               # True, False, a label for the bar, or a callable taking (done, total)
    max_ahead_bytes: int | str = "64MiB"  # items in flight and results not yet yielded; an int or "256MB"
    initializer: Callable | None = None
    initargs: tuple = ()
    inner_threads: int | None = None    # native (BLAS/OpenMP) threads per worker; None: CPUs // workers
    seed: int | None = None             # item i's random stream derives from (seed, i) (pmap.seeding)
    backend_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.workers, str):
            if self.workers != "adaptive":
                raise ValueError(f"workers must be a positive integer or 'adaptive', got {self.workers!r}")
        elif not isinstance(self.workers, Adaptive):
            _check_count("workers", self.workers)
        _check_count("chunksize", self.chunksize)
        _check_count("retries", self.retries, allow_none=False, minimum=0)
        if not isinstance(self.ordered, bool):
            raise TypeError("ordered must be True or False")
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {', '.join(map(repr, ON_ERROR_CHOICES))}, "
                             f"got {self.on_error!r}")
        timeout = self.timeout
        if timeout is not None:
            if not _is_number(timeout) or math.isnan(timeout) or timeout <= 0:
                raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
            if math.isinf(timeout):
                timeout = None  # an infinite timeout is no timeout
        backoff = self.backoff
        if not _is_number(backoff) or not math.isfinite(backoff) or backoff < 0:
            raise ValueError(f"backoff must be a finite, non-negative number of seconds, got {backoff!r}")
        retry_on = self.retry_on if isinstance(self.retry_on, tuple) else (self.retry_on,)
        if not retry_on or not all(isinstance(t, type) and issubclass(t, BaseException) for t in retry_on):
            raise TypeError("retry_on must be an exception type or a tuple of them")
        if not (isinstance(self.progress, (bool, str)) or callable(self.progress)):
            raise TypeError("progress must be True, False, a label for the bar, or a callable taking (done, total)")
        if self.initializer is not None and not callable(self.initializer):
            raise TypeError("initializer must be callable")
        if not isinstance(self.initargs, (tuple, list)):
            raise TypeError("initargs must be a tuple")
        if not isinstance(self.backend_options, Mapping):
            raise TypeError("backend_options must be a mapping of option names to values")
        backend_options = dict(self.backend_options)
        inner_threads = self.inner_threads
        if "inner_threads" in backend_options:  # the command line's `-o inner_threads=N`
            if inner_threads is not None:
                raise TypeError("inner_threads is given twice")
            inner_threads = backend_options.pop("inner_threads")
        _check_count("inner_threads", inner_threads)
        check_seed(self.seed)
        if self.seed is not None:
            object.__setattr__(self, "seed", self.seed.__index__())  # a numpy integer becomes an int
        object.__setattr__(self, "max_ahead_bytes", parse_size("max_ahead_bytes", self.max_ahead_bytes))
        object.__setattr__(self, "timeout", timeout)
        object.__setattr__(self, "retry_on", retry_on)
        object.__setattr__(self, "initargs", tuple(self.initargs))
        object.__setattr__(self, "inner_threads", inner_threads)
        object.__setattr__(self, "backend_options", MappingProxyType(backend_options))

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any], **overrides: Any) -> "Options":
        """Options from the keyword arguments of a public function (its `locals()`): every
        field found there by name, and its `**backend_options`."""
        values = {name: arguments[name] for name in FIELD_NAMES if name in arguments}
        values.update(overrides)
        return cls(**values)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in FIELD_NAMES}

    @property
    def adaptive(self) -> bool:
        return isinstance(self.workers, (Adaptive, str))

    def adaptive_bounds(self, maximum: int | None, backend_name: str) -> Adaptive:
        """The bounds of an adaptive run on a backend that can reach `maximum` workers."""
        if maximum is None:
            raise ValueError(f"workers='adaptive' needs a backend that can change how many items run at once "
                             f"(thread, greenlet, asyncio); backend {backend_name!r} cannot")
        if isinstance(self.workers, Adaptive):
            return self.workers
        return Adaptive(maximum=maximum)

    def run_spec(self, fn: Callable, items: Any, progress: Callable | None,
                 concurrency: Adaptive | None = None, indexed_items: bool = False) -> RunSpec:
        """What the engine needs for one run of these options."""
        return RunSpec(fn=fn, items=items, ordered=self.ordered, timeout=self.timeout, retries=self.retries,
                       retry_on=self.retry_on, backoff=self.backoff, on_error=self.on_error,
                       chunksize=self.chunksize,
                       progress=progress, total=known_length(items), concurrency=concurrency, seed=self.seed,
                       indexed_items=indexed_items, max_ahead_bytes=self.max_ahead_bytes)


FIELD_NAMES = tuple(f.name for f in fields(Options))
DEFAULTS = {name: getattr(Options, name) for name in FIELD_NAMES if name != "backend_options"}


def check_callable(func: Any) -> None:
    if not callable(func):
        raise TypeError(f"func must be callable, not {type(func).__name__}")


def check_iterable(items: Any) -> None:
    try:
        iter(items)
    except TypeError:
        raise TypeError(f"items must be iterable, not {type(items).__name__}") from None


def known_length(items: Any) -> int | None:
    """len(items) where the input has one; None for generators and other streams."""
    try:
        return len(items)
    except Exception:  # no __len__, or one that raises: the length is unknown, as for a generator
        return None


def parse_size(name: str, value: Any) -> int:
    """Bytes from an int or a string such as "256MB", "1.5GiB" or "4096" (see SIZE_UNITS)."""
    given = value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        unit = match.group(2).lower() if match else None
        if unit is None or unit and unit not in SIZE_UNITS:
            raise ValueError(f"{name} must be a number of bytes or a size such as '256MB' or '1GiB' "
                             f"(units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {value!r}")
        value = int(float(match.group(1)) * SIZE_UNITS.get(unit, 1))
    elif isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer number of bytes or a size such as '256MB', "
                        f"not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1 byte, got {given!r}")
    return int(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_count(name: str, value: Any, allow_none: bool = True, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
