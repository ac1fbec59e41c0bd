"""The progress bar's text and timing, on a fake clock and a fake stderr."""
import io
import os
import threading

from pmap.engine import RunStats
from pmap.progress import PLAIN_INTERVAL, ProgressBar, format_seconds, make_progress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_first_frame_is_drawn_at_start_with_the_total_and_no_guesses():
    stream = io.StringIO()
    ProgressBar("squares", total=40, stream=stream, clock=Clock())
    assert stream.getvalue().startswith("squares:   0% |")
    assert stream.getvalue().endswith(" 0/40 [elapsed 0:00, remaining ?, ? items/s]\n")


def test_the_rate_and_remaining_time_count_from_the_start_of_the_run():
    clock, stream = Clock(), io.StringIO()
    bar = ProgressBar("job", total=40, stream=stream, clock=clock)
    clock.now += 4.0  # the first items took a while: the rate must not count from the first of them
    bar(8, 40)
    assert "8/40 [elapsed 0:04, remaining 0:16, 2 items/s]" in bar.text()


def test_off_a_terminal_plain_lines_come_every_few_seconds_and_at_the_end():
    clock, stream = Clock(), io.StringIO()
    bar = ProgressBar("job", total=100, stream=stream, clock=clock)
    for done in range(1, 101):
        clock.now += 0.25  # 25 s in all
        bar(done, 100)
    bar.close()
    frames = stream.getvalue().splitlines()
    assert len(frames) == 1 + int(25 / PLAIN_INTERVAL) + 1  # the start, one every interval, the end
    assert frames[-1].startswith("job: 100% |") and "100/100 [elapsed 0:25, remaining 0:00, 4 items/s]" in frames[-1]
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_on_a_terminal_the_bar_redraws_one_line_and_ends_it_once():
    clock, stream = Clock(), Terminal()
    bar = ProgressBar("job", total=3, stream=stream, clock=clock)
    for done in (1, 2, 3):
        clock.now += 1
        bar(done, 3)
    bar.close()
    bar.close()
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\x1b[K\n")
    assert text.count("\r") == 5  # the start, three updates, the final frame
    with bar.printing_above():  # closed: nothing more is drawn
        pass
    assert stream.getvalue() == text


def test_an_unknown_total_counts_items_and_failures():
    clock, stream = Clock(), io.StringIO()
    stats = RunStats(failed=2)
    bar = ProgressBar("job", stats, stream=stream, clock=clock)
    clock.now += 2
    bar(10, None)
    assert bar.text() == "job: 10 items [elapsed 0:02, 5 items/s, 2 failed]"


def test_a_label_given_as_progress_draws_a_labelled_bar(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    callback, close = make_progress("resizing photos", stats=None, total=3)
    callback(3, 3)
    close()
    assert stream.getvalue().splitlines()[-1].startswith("resizing photos: 100% |")


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 59.9, 61, 3725, None, float("inf"))] == \
        ["0:00", "0:59", "1:01", "1:02:05", "?", "?"]


def ticker_threads():
    return [t for t in threading.enumerate() if t.name == "pmap-progress"]


def test_the_ticker_waits_for_the_backend_to_be_chosen_and_ends_with_the_bar():
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    try:
        stats = RunStats(backend="serial")  # auto mode's probe: no plan yet
        bar = ProgressBar("job", stats, total=10, stream=stream, auto=True)
        bar(1, 10)
        assert ticker_threads() == []  # a thread now would make auto refuse to fork
        stats.backend = "thread"  # the GIL probe runs two items on threads, still before the plan
        bar(1, 10)
        assert ticker_threads() == []
        stats.plan, stats.backend = "fork chosen", "fork"
        bar(2, 10)
        assert len(ticker_threads()) == 1
        bar.close()
        assert ticker_threads() == []
    finally:
        stream.close()
        drained = os.read(read_end, 1 << 16).decode()
        os.close(read_end)
    assert drained.splitlines()[-1].startswith("job:  20% ")
