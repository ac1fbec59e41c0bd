"""`pmap.compare`: run the same input on several backends, check that the results agree,
and time each one against serial.

    >>> print(pmap.compare(square, range(10_000), repeat=3))

Serial is always run: it is the reference for both the results and the speedup.
"""
from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from .errors import Failure, PmapError, short_repr
from .options import Options

REFERENCE = "serial"
# Backends that need more than this machine (a cluster) are left out unless named.
NOT_BY_DEFAULT = frozenset({"manager", "dask"})
# Backends that run only `async def` functions: left out by default for a plain function.
ASYNC_ONLY = frozenset({"asyncio"})


def default_backend_names() -> list[str]:
    """The registered backends that run on this machine alone (the pytest plugin's default too)."""
    from .backends.base import backend_names
    return [name for name in backend_names() if name not in NOT_BY_DEFAULT]


class ResultsDiffer(PmapError, AssertionError):
    """Backends gave different results for the same input (or one of them failed).

    An AssertionError, so a test that calls `compare` fails with this message.
    `.comparison` holds the whole table."""

    def __init__(self, message: str, comparison: "Comparison | None" = None):
        super().__init__(message)
        self.comparison = comparison


@dataclass
class BackendRun:
    """One row of a comparison: how one backend did."""

    backend: str
    status: str                      # reference | agree | differ | error | unavailable | skipped | unchecked
    seconds: float | None = None     # median wall time of the whole call, start-up included
    runs: list = field(default_factory=list)
    speedup: float | None = None     # serial seconds / these seconds
    # worker time per item beyond serial's: (seconds x workers - serial seconds) / items,
    # workers capped at the number of items; it counts parallelism lost as well as dispatch
    overhead_per_item: float | None = None
    workers: int | None = None
    stats: Any = None                # RunStats of the median run
    detail: str = ""                 # what differs, the error, or why unavailable
    error: BaseException | None = None

    @property
    def agrees(self) -> bool | None:
        """True when the results equal serial's, False when not, None when not compared."""
        if self.status in ("reference", "agree"):
            return True
        if self.status in ("differ", "error"):
            return False
        return None


class Comparison:
    """What `compare` found: a row per backend; `str()` is an aligned table."""

    def __init__(self, rows: list[BackendRun], items: int, repeat: int, ordered: bool):
        self.rows = rows
        self.items = items
        self.repeat = repeat
        self.ordered = ordered

    @property
    def ok(self) -> bool:
        """Every backend that ran agreed with serial."""
        return not self.mismatches

    @property
    def mismatches(self) -> list[BackendRun]:
        return [row for row in self.rows if row.agrees is False]

    def __getitem__(self, backend: str) -> BackendRun:
        for row in self.rows:
            if row.backend == backend:
                return row
        raise KeyError(backend)

    def __contains__(self, backend: str) -> bool:
        return any(row.backend == backend for row in self.rows)

    def __iter__(self) -> Iterator[BackendRun]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"<Comparison of {len(self.rows)} backends over {self.items} items, ok={self.ok}>"

    def __str__(self) -> str:
        runs = "1 run" if self.repeat == 1 else f"median of {self.repeat} runs"
        order = "ordered" if self.ordered else "unordered, compared as multisets"
        header = ("backend", "workers", "time", "speedup", "overhead/item", "utilisation", "results")
        table = [header]
        for row in self.rows:
            table.append((row.backend,
                          "-" if row.workers is None else str(row.workers),
                          "-" if row.seconds is None else format_seconds(row.seconds),
                          "-" if row.speedup is None else f"{row.speedup:.2f}x",
                          "-" if row.overhead_per_item is None else format_seconds(row.overhead_per_item),
                          _utilisation(row.stats, self.items),
                          _result_text(row)))
        widths = [max(len(line[i]) for line in table) for i in range(len(header))]
        right = {1, 2, 3, 4, 5}  # numbers align right
        lines = [f"{self.items} items, {order}, {runs} per backend"]
        for line in table:
            cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                     for i, cell in enumerate(line[:-1])]
            lines.append("  ".join(cells + [line[-1]]))
        return "\n".join(lines)

    def check(self) -> "Comparison":
        """Raise ResultsDiffer if any backend disagreed with serial or failed; else return self."""
        bad = self.mismatches
        if bad:
            message = "; ".join(f"{row.backend}: {row.detail}" for row in bad)
            raise ResultsDiffer(f"backends disagree with serial: {message}\n{self}", self)
        return self


def format_seconds(seconds: float) -> str:
    """A duration in s, ms or us with three significant digits (negative for overhead)."""
    magnitude = abs(seconds)
    if magnitude >= 1 or magnitude == 0:
        return f"{seconds:.3g}s" if magnitude < 100 else f"{seconds:.0f}s"
    if magnitude >= 1e-3:
        return f"{seconds * 1e3:.3g}ms"
    return f"{seconds * 1e6:.3g}us"


def _utilisation(stats, items: int) -> str:
    """Busy share of the workers that had an item to run (more workers than items idle by necessity)."""
    if stats is None or not stats.wall_seconds or not stats.workers or not items:
        return "-"
    return f"{stats.busy_seconds / (stats.wall_seconds * min(stats.workers, items)):.0%}"


def _result_text(row: BackendRun) -> str:
    if row.status == "reference":
        return "reference"
    if row.status == "agree":
        return "agree"
    return f"{row.status}: {row.detail}" if row.detail else row.status


# ---- equality --------------------------------------------------------------------------
def same(a: Any, b: Any) -> bool:
    """Default equality of two results: `==`, with NaN equal to NaN, array-likes compared
    element-wise, and two Failures equal when kind, index and exception type and message match."""
    if a is b:
        return True
    if isinstance(a, Failure) or isinstance(b, Failure):
        return (isinstance(a, Failure) and isinstance(b, Failure) and a.kind == b.kind and a.index == b.index
                and type(a.exception) is type(b.exception) and str(a.exception) == str(b.exception))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        equal = a == b
    except Exception:  # a user type's __eq__ may raise anything: then the two are not the same
        return False
    if isinstance(equal, bool):
        return equal
    reduce_all = getattr(equal, "all", None)  # numpy and friends compare element-wise
    if callable(reduce_all):
        try:
            return getattr(a, "shape", None) == getattr(b, "shape", None) and bool(reduce_all())
        except Exception:  # element-wise results that do not reduce to one truth: not the same
            return False
    try:
        return bool(equal)
    except Exception:  # an ambiguous truth value (as numpy raises): not the same
        return False


def _first_difference(reference: list, got: list, equal: Callable) -> str | None:
    """None when the lists agree in order, else where and how they first differ."""
    if equal is same:
        try:
            agree = reference == got  # the fast path: one C-level comparison
        except Exception:  # a user type's __eq__ may raise anything: compare one by one below, which says where
            agree = False
        if agree:
            return None
    for index, (want, have) in enumerate(zip(reference, got)):
        if not equal(want, have):
            return f"first difference at index {index}: {short_repr(have)} where serial has {short_repr(want)}"
    if len(reference) != len(got):
        return (f"{len(got)} results where serial has {len(reference)}; "
                f"first difference at index {min(len(reference), len(got))}")
    return None


class _Unhashable(Exception):
    pass


def _canonical(value: Any) -> Any:
    """A hashable stand-in that is equal exactly when `same` says the values are equal."""
    if isinstance(value, Failure):
        return ("Failure", value.kind, value.index, type(value.exception), str(value.exception))
    if isinstance(value, float) and math.isnan(value):
        return ("NaN",)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_canonical(v) for v in value))
    if isinstance(value, dict):
        return ("dict", frozenset((_canonical(k), _canonical(v)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return ("set", frozenset(_canonical(v) for v in value))
    try:
        hash(value)
    except TypeError:
        raise _Unhashable from None
    return value


def _multiset_difference(reference: list, got: list, equal: Callable) -> str | None:
    """None when both hold the same results with the same counts, in any order."""
    if len(reference) != len(got):
        return f"{len(got)} results where serial has {len(reference)}"
    if equal is same:
        try:
            want, have = Counter(map(_canonical, reference)), Counter(map(_canonical, got))
        except _Unhashable:
            pass
        else:
            if want == have:
                return None
            for key, count in (want - have).items():
                sample = next(v for v in reference if _canonical(v) == key)
                return (f"{short_repr(sample)} appears {count} more time(s) in serial's results "
                        "(compared as multisets, ordered=False)")
            return None
    remaining = list(got)  # unhashable results or a custom `equal`: pair them up one by one
    for want in reference:
        for k, have in enumerate(remaining):
            if equal(want, have):
                del remaining[k]
                break
        else:
            return f"serial's result {short_repr(want)} is missing (compared as multisets, ordered=False)"
    return None


# ---- the comparison -------------------------------------------------------------------
def _availability(names: list[str]) -> dict[str, str | None]:
    """Each name's unavailable reason (None when it can run); ValueError for an unknown name."""
    from .backends.base import resolve_backend_class
    reasons = {}
    for name in names:
        if name == "auto":
            reasons[name] = None
            continue
        cls = resolve_backend_class(name)  # ValueError naming the known backends
        try:
            reasons[name] = cls.unavailable_reason()
        except Exception as exc:  # a broken plugin is reported in its row, not fatal
            reasons[name] = f"failed to load: {exc}"
    return reasons


def _timed_run(func, items: list, name: str, ordered: bool, options: dict):
    from .api import pmap
    started = time.perf_counter()
    results = pmap(func, items, backend=name, ordered=ordered, **options)
    return time.perf_counter() - started, results


def compare(func: Callable, items: Iterable, backends: Iterable[str] | None = None, repeat: int = 1,
            ordered: bool = True, *, equal: Callable[[Any, Any], bool] | None = None, check: bool = True,
            **options) -> Comparison:
    """Run `func` over `items` on each backend, check the results agree, and time each.

    Parameters
    ----------
    func : callable
        The function, as for `pmap.pmap`.
    items : iterable
        The inputs; read once into a list, so every backend sees the same items.
    backends : iterable of str, str or None, default None
        Names to compare. None: every registered backend that runs on this machine alone (the
        pytest plugin's `pmap_backend` fixture's list), asyncio only for an `async def`
        function. Serial is always added first: it is the reference for the results and for
        the speedup. Unavailable backends get a row saying why and are not run. "auto" may be
        named too.
    repeat : int, default 1
        Runs per backend; the time shown is the median, the stats are the median run's. Every
        run's results are checked.
    ordered : bool, default True
        False runs with `ordered=False` and compares results as multisets.
    equal : callable or None, default None
        `equal(a, b)` says whether two results agree. None: `==`, with NaN equal to NaN, arrays
        compared element-wise, and `pmap.Failure`s by kind, index, exception type and message.
    check : bool, default True
        True raises `ResultsDiffer` after all backends ran if any disagreed or failed; False
        only reports it in the rows. An error on serial itself is re-raised as it is when
        `check` is True: there is nothing to compare against.
    **options
        Passed to every `pmap.pmap` call (workers, chunksize, on_error, timeout, ...).

    Returns
    -------
    Comparison
        The table: `print` it, or index it by backend name for a row with `status`, `seconds`,
        `speedup`, `overhead_per_item`, `workers` and `stats`.

    Raises
    ------
    ResultsDiffer
        With `check=True`, a backend disagreed with serial or failed (an AssertionError naming
        the backend and the first differing index).
    ValueError
        An unknown backend name, or `repeat` that is not a positive integer.
    TypeError
        `backend=` instead of `backends=`, or a backend that runs only `async def` functions
        (asyncio) named for a plain function: a usage error, not a disagreement.
    """
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be a positive integer, got {repeat!r}")
    if "backend" in options:
        raise TypeError("compare takes backends=[...], not backend=")
    Options.from_arguments(options)  # a bad value fails before serial runs; other names are backend options
    items = list(items)
    equal = same if equal is None else equal
    names = [REFERENCE]
    for name in (default_backend_names() if backends is None else
                 [backends] if isinstance(backends, str) else list(backends)):
        if name not in names:
            names.append(name)
    from ._worker import callable_name, is_async
    if not is_async(func):
        if backends is not None and ASYNC_ONLY.intersection(names):  # a usage error, not a disagreement
            named = ", ".join(repr(name) for name in names if name in ASYNC_ONLY)
            raise TypeError(f"compare: backend {named} runs only async def functions, and {callable_name(func)} "
                            "is a plain function; leave it out of backends= (the default list does), "
                            "or compare an async def function")
    reasons = _availability(names)
    if backends is None and not is_async(func):
        reasons.update({name: "skipped: runs async def functions only" for name in names if name in ASYNC_ONLY})
    differ = _first_difference if ordered else _multiset_difference

    rows: dict[str, BackendRun] = {}
    reference: list | None = None
    reference_seconds: float | None = None
    # fork runs right after serial: forking once other backends have left threads behind
    # (loky's executor keeps its own) risks a lock held forever in the child.
    run_order = sorted(names, key=lambda name: (name != REFERENCE, name != "fork"))
    for name in run_order:
        if reasons[name] is not None:
            status, _, detail = reasons[name].partition(": ") if reasons[name].startswith("skipped: ") \
                else ("unavailable", "", reasons[name])
            rows[name] = BackendRun(name, status, detail=detail)
            continue
        row = BackendRun(name, "reference" if name == REFERENCE else "agree")
        runs = []
        try:
            for _ in range(repeat):
                seconds, results = _timed_run(func, items, name, ordered, options)
                runs.append((seconds, results.stats))
                if name == REFERENCE:
                    if reference is None:
                        reference = list(results)
                        continue
                    problem = differ(reference, results, equal)
                    if problem:  # serial disagrees with itself: the function is not deterministic
                        row.status, row.detail = "differ", f"serial is not repeatable: {problem}"
                elif reference is not None and row.status == "agree":
                    problem = differ(reference, results, equal)
                    if problem:
                        row.status, row.detail = "differ", problem
                elif reference is None:
                    row.status, row.detail = "unchecked", "serial failed, nothing to compare with"
                del results
        except Exception as exc:  # the user's function (or a backend) may raise anything: reported in its row
            if name == REFERENCE and check:
                raise
            row.status, row.error = "error", exc
            row.detail = f"{type(exc).__name__}: {_first_line(exc)}"
        if runs and row.status != "error":
            _fill_timing(row, runs)
        if name == REFERENCE and row.seconds is not None and row.status != "error":
            reference_seconds = row.seconds
        rows[name] = row

    table = [rows[name] for name in names]
    for row in table:
        if row.seconds and reference_seconds is not None and row.status != "error":
            row.speedup = reference_seconds / row.seconds
            if row.backend != REFERENCE and items and row.workers:
                usable_workers = min(row.workers, len(items))  # more workers than items idle by necessity
                row.overhead_per_item = (row.seconds * usable_workers - reference_seconds) / len(items)
    comparison = Comparison(table, len(items), repeat, ordered)
    if check:
        comparison.check()
    return comparison


def _fill_timing(row: BackendRun, runs: list) -> None:
    times = [seconds for seconds, _ in runs]
    row.runs = times
    row.seconds = statistics.median(times)
    _, row.stats = min(runs, key=lambda run: abs(run[0] - row.seconds))
    row.workers = row.stats.workers if row.stats is not None else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
