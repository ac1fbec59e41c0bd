"""What a person sees at a terminal: `pmap run` and `progress=True` with stderr (and stdin) on a
pseudo-terminal, stdout to a file, a pipe or the same terminal. Results must all reach stdout;
the bar must show on the terminal, from the start, and never take stdout's lines."""
import os
import re
import select
import subprocess
import sys
import textwrap
import time

import pytest

pty = pytest.importorskip("pty", reason="pseudo-terminals are POSIX only")

JOB = textwrap.dedent('''
    import os, time

    def double(x):
        return int(x) * 2

    def gated(x):
        """Waits for the file $PMAP_TEST_GATE before returning: the bar must show before that."""
        while not os.path.exists(os.environ["PMAP_TEST_GATE"]):
            time.sleep(0.01)
        return x

    def crunch(x):
        return sum(i * i for i in range(100000 + x))
''')


@pytest.fixture
def job_dir(tmp_path):
    (tmp_path / "job.py").write_text(JOB)
    return tmp_path


class Terminal:
    """A child process with stdin and stderr on a pty; stdout where the test says."""

    def __init__(self, args, cwd, stdout, env=None):
        self.master, slave = pty.openpty()
        os.set_blocking(self.master, False)
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
                           COLUMNS="120", **(env or {}))
        self.process = subprocess.Popen([sys.executable, *args], cwd=cwd, stdin=slave,
                                        stdout=slave if stdout == "terminal" else stdout, stderr=slave,
                                        env=environment)
        os.close(slave)
        self.screen = b""

    def read_until(self, pattern: bytes | None, seconds: float = 60.0) -> bytes:
        """Everything the terminal showed until `pattern` appears (None: until the child closes it)."""
        deadline = time.monotonic() + seconds
        while pattern is None or pattern not in self.screen:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {pattern!r}; the screen shows {self.screen[-500:]!r}")
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every holder of the slave side has closed it
                chunk = b""
            if not chunk:
                if pattern is None:
                    break
                raise AssertionError(f"the terminal closed before {pattern!r}; it showed {self.screen[-500:]!r}")
            self.screen += chunk
        return self.screen

    def finish(self) -> int:
        self.read_until(None)
        code = self.process.wait(timeout=60)
        os.close(self.master)
        return code


def last_frame(screen: bytes) -> str:
    """The bar's last drawing: the text after the last carriage return that redrew it."""
    text = screen.decode()
    frames = [part for part in re.split(r"\r\n|\r", text) if "elapsed" in part]
    return frames[-1].replace("\x1b[K", "") if frames else ""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["thread", "serial", "fork"])
def test_results_reach_a_file_while_the_bar_is_on_the_terminal(job_dir, backend):
    out = job_dir / "out.txt"
    with open(out, "wb") as handle:
        term = Terminal(["-m", "pmap", "run", "job.py:double", "--range", "30", "--backend", backend],
                        cwd=job_dir, stdout=handle)
        assert term.finish() == 0
    assert out.read_text().splitlines() == [str(2 * i) for i in range(30)]
    frame = last_frame(term.screen)
    assert frame.startswith("job.py:double: 100% |") and " 30/30 [elapsed 0:0" in frame, frame
    assert ", remaining 0:00, " in frame and " items/s" in frame
    assert b"\n58\r\n" not in term.screen  # the results went to the file, not the screen


@pytest.mark.timeout(90)
def test_results_reach_a_pipe_while_the_bar_is_on_the_terminal(job_dir):
    term = Terminal(["-m", "pmap", "run", "job.py:double", "--range", "30", "--backend", "thread", "--desc", "doubling"],
                    cwd=job_dir, stdout=subprocess.PIPE)
    out = term.process.stdout.read()
    assert term.finish() == 0
    assert out.decode().splitlines() == [str(2 * i) for i in range(30)]
    assert last_frame(term.screen).startswith("doubling: 100% |")


@pytest.mark.timeout(90)
def test_the_bar_is_drawn_before_the_first_item_finishes(job_dir):
    gate = job_dir / "gate"
    term = Terminal(["-m", "pmap", "run", "job.py:gated", "--range", "5", "--backend", "thread"],
                    cwd=job_dir, stdout=subprocess.DEVNULL, env={"PMAP_TEST_GATE": str(gate)})
    try:
        first = term.read_until(b"0/5 [elapsed 0:00, remaining ?, ? items/s]")
        assert first.startswith(b"\rjob.py:gated:   0% |")
        term.read_until(b"0/5 [elapsed 0:01, remaining ?, ? items/s]")  # the clock moves while no item finishes
    finally:
        gate.touch()
    assert term.finish() == 0
    assert " 5/5 " in last_frame(term.screen)


@pytest.mark.timeout(90)
def test_results_on_the_same_terminal_get_lines_of_their_own(job_dir):
    term = Terminal(["-m", "pmap", "run", "job.py:double", "--range", "20", "--backend", "thread", "--progress"],
                    cwd=job_dir, stdout="terminal")
    assert term.finish() == 0
    for value in range(0, 40, 2):
        # the bar's line is cleared before each result is written, so no result is glued to it
        assert f"\r\x1b[K{value}\r\n".encode() in term.screen
    assert last_frame(term.screen).startswith("job.py:double: 100% |")


def run_script(job_dir, body):
    """A script importing pmap and job.py, run with its stdout to a pipe: (its stdout, its terminal)."""
    script = job_dir / "script.py"
    script.write_text("import pmap\nfrom job import crunch, double\n\nif __name__ == '__main__':\n"
                      + textwrap.indent(textwrap.dedent(body), "    "))
    term = Terminal([str(script)], cwd=job_dir, stdout=subprocess.PIPE)
    out = term.process.stdout.read().decode()
    assert term.finish() == 0
    return out, term


@pytest.mark.timeout(90)
def test_print_in_a_loop_over_imap_with_progress_reaches_the_pipe(job_dir):
    out, term = run_script(job_dir, """
        for value in pmap.imap(double, range(25), backend="thread", progress=True):
            print(value)
    """)
    assert out.splitlines() == [str(2 * i) for i in range(25)]
    assert last_frame(term.screen).startswith("pmap: 100% |")


@pytest.mark.timeout(90)
def test_the_bar_does_not_stop_auto_from_forking(job_dir):
    plan, _ = run_script(job_dir, """
        out = pmap.pmap(crunch, range(60), progress=True)
        print(out.stats.plan)
    """)
    assert "backend: " in plan
    assert "other threads run" not in plan, plan
    if " processes" in plan:  # auto chose processes (not on one core): fork, since no thread runs
        assert "fork is safe here (no other threads)" in plan, plan


@pytest.mark.timeout(90)
def test_a_command_run_shows_the_bar_and_each_command_s_stderr_on_its_own_line(job_dir):
    out = job_dir / "out.txt"
    with open(out, "wb") as handle:
        term = Terminal(["-m", "pmap", "run", "--cmd", "echo note {} >&2; echo {}", "--range", "12", "-j", "2",
                         "--desc", "cmds"], cwd=job_dir, stdout=handle)
        assert term.finish() == 0
    assert out.read_text().splitlines() == [str(i) for i in range(12)]
    assert last_frame(term.screen).startswith("cmds: 100% |")
    for value in range(12):
        # the bar's line is cleared before a command's stderr is written, so no note is glued to it
        assert f"\r\x1b[Knote {value}\r\n".encode() in term.screen


@pytest.mark.timeout(90)
def test_bad_usage_at_a_terminal_is_one_line(job_dir):
    term = Terminal(["-m", "pmap", "run", "--cmd", "echo {}", "a", "--halt", "fail=lots"], cwd=job_dir,
                    stdout="terminal")
    assert term.finish() == 2
    shown = term.screen.decode().replace("\r\n", "\n")
    assert shown == ("pmap: error: --halt takes fail=N or fail=N% (optionally after now, or soon,), such as "
                     "fail=5 or soon,fail=10%, got 'fail=lots'\n")


@pytest.mark.timeout(90)
def test_dry_run_at_a_terminal_prints_the_commands_and_runs_none(job_dir):
    term = Terminal(["-m", "pmap", "run", "--cmd", "touch {}", "--dry-run", "--", "a b", "-c"], cwd=job_dir,
                    stdout="terminal")
    assert term.finish() == 0
    shown = term.screen.decode().replace("\r\n", "\n").splitlines()
    assert "  0: touch 'a b'" in shown and "  1: touch -c" in shown
    assert not (job_dir / "a b").exists()
