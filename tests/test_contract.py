"""The engine holds every backend to its contract: one outcome per item of a task, at the
right positions. A backend that reports anything else fails those items loudly."""
import pytest

import pmap
from pmap.backends.base import Backend, Done


def square(x):
    return x * x


class MisReports(Backend):
    """Runs each task in the caller, then lets `distort(values, failures)` change the report."""

    name = "misreports"
    kind = "serial"

    def __init__(self, distort, **options):
        super().__init__(workers=1)
        self.distort = distort
        self.tasks = []

    def capacity(self):
        return 1 - len(self.tasks)

    def submit(self, task):
        self.tasks.append(task)

    def wait(self, timeout):
        events = []
        while self.tasks:
            task = self.tasks.pop()
            values, failures = self.distort([task.fn(x) for x in task.items], [])
            events.append(Done(task.id, "w", values, failures, 0.0))
        return events


SHORTFALLS = {
    "too few values": lambda values, failures: (values[:-1], failures),
    "no values at all": lambda values, failures: ([], failures),
    "too many values": lambda values, failures: (values + [0], failures),
    "a failure past the end": lambda values, failures: (values, [(len(values), ValueError("x"), "")]),
    "one position failed twice": lambda values, failures: (values, [(0, ValueError("a"), ""), (0, ValueError("b"), "")]),
}


@pytest.mark.parametrize("distort", SHORTFALLS.values(), ids=list(SHORTFALLS))
def test_a_report_that_does_not_fit_its_task_fails_every_item_of_it(distort):
    out = pmap.pmap(square, range(10), backend=MisReports(distort), chunksize=5, on_error="return")
    assert len(out) == 10
    assert all(isinstance(f, pmap.Failure) for f in out), out
    assert [f.index for f in out] == list(range(10))
    assert all(isinstance(f.exception, pmap.PmapError) and "misreports" in str(f.exception) for f in out)


@pytest.mark.parametrize("distort", SHORTFALLS.values(), ids=list(SHORTFALLS))
def test_a_report_that_does_not_fit_raises_by_default(distort):
    with pytest.raises(pmap.PmapError, match="broke its contract"):
        pmap.pmap(square, range(10), backend=MisReports(distort), chunksize=5)


def test_unordered_and_skipped_runs_count_the_shortfall_too():
    out = pmap.pmap(square, range(10), backend=MisReports(SHORTFALLS["too few values"]), chunksize=5,
                    on_error="skip", ordered=False)
    assert out == []
    assert out.stats.skipped == 10


def test_an_honest_report_passes_the_check():
    honest = MisReports(lambda values, failures: (values, failures))
    assert pmap.pmap(square, range(10), backend=honest, chunksize=3) == [x * x for x in range(10)]
