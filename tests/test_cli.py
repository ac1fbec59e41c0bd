"""The command line: `pmap run`, `pmap bench`, `pmap backends`.

typer's CliRunner covers parsing and output; real `python -m pmap` processes cover stdin
piping, exit codes, Ctrl-C and resuming a journal after SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import pmap
from cli_helpers import invoke, lines
from pmap.cli import Bits, parse_backend_options, parse_range, UsageError

TARGETS = textwrap.dedent('''
    import json, os, sys, threading, time

    def _log(x):
        """Append each call's item to $PMAP_TEST_CALLS, so a test sees what ran."""
        path = os.environ.get("PMAP_TEST_CALLS")
        if path:
            with open(path, "a") as log:
                log.write(json.dumps(x) + "\\n")

    def square(x):
        _log(x)
        return x * x

    def shout(text):
        return text.upper()

    def slow(x):
        time.sleep(0.05)
        _log(x)
        return x

    def hang(x):
        _log(x)
        time.sleep(1)
        return x

    def fail_on_three(x):
        if int(x) == 3:
            raise ValueError("three is not allowed")
        return x

    def fail_while_flagged(x):
        """Fails on 5 while the file $PMAP_TEST_FLAG exists: a failure fixed between runs."""
        if x == 5 and os.path.exists(os.environ["PMAP_TEST_FLAG"]):
            raise RuntimeError("five is not ready")
        _log(x)
        return x

    def add(a, b=0):
        return a + b

    async def double(x):
        return 2 * x

    def in_worker(x):
        return os.getpid() != PARENT

    def exit_on_three(x):
        if int(x) == 3:
            sys.exit(3)
        return x

    def not_a_number(x):
        return float("nan")

    def an_object(x):
        return object()

    def two_lines(x):
        return f"{x}\\nmore"

    STATE = None

    def set_state(value="ready"):
        global STATE
        STATE = value

    def state(x):
        return f"{x} {STATE}"

    class Flaky(Exception):
        pass

    def flaky_once(x):
        """Raises Flaky on an item's first call (calls are counted in $PMAP_TEST_CALLS)."""
        _log(x)
        with open(os.environ["PMAP_TEST_CALLS"]) as log:
            if log.read().split().count(json.dumps(x)) == 1:
                raise Flaky(f"first call of {x}")
        return x

    PARENT = os.getpid()
    NOT_A_FUNCTION = 42
''')


@pytest.fixture
def targets(tmp_path, monkeypatch):
    """A module of target functions in its own directory; returns its path."""
    path = tmp_path / "targets.py"
    path.write_text(TARGETS)
    monkeypatch.chdir(tmp_path)
    # load_target puts the target's directory on sys.path and PYTHONPATH: undo that after the test
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    return path


# ---- pmap run: input and output -----------------------------------------------------------
def test_items_are_strings_and_results_come_in_input_order(targets):
    result = invoke("run", f"{targets}:shout", "a", "bb", "ccc", "-b", "thread", "-j", "3")
    assert result.exit_code == 0
    assert lines(result.stdout) == ["A", "BB", "CCC"]


def test_a_module_target_is_found_from_the_current_directory(targets):
    result = invoke("run", "targets:square", "--range", "2:10:3", "-b", "serial")
    assert result.exit_code == 0
    assert lines(result.stdout) == ["4", "25", "64"]


def test_range_n(targets):
    result = invoke("run", f"{targets}:square", "--range", "5", "-b", "thread")
    assert lines(result.stdout) == ["0", "1", "4", "9", "16"]


def test_json_in_and_out_with_index(targets):
    result = invoke("run", f"{targets}:square", "--json", "--with-index", "2", "3", "-b", "thread")
    assert result.exit_code == 0
    assert [json.loads(line) for line in lines(result.stdout)] == [
        {"index": 0, "result": 4}, {"index": 1, "result": 9}]


def test_with_index_in_text_is_tab_separated(targets):
    result = invoke("run", f"{targets}:shout", "--with-index", "x", "y", "-b", "serial")
    assert lines(result.stdout) == ["0\tX", "1\tY"]


def test_star_spreads_arrays_and_objects(targets):
    result = invoke("run", f"{targets}:add", "--star", "[1, 2]", '{"a": 10, "b": 5}', "7", "-b", "thread")
    assert result.exit_code == 0
    assert lines(result.stdout) == ["3", "15", "7"]


def test_input_file_one_item_per_line_skips_blank_lines_and_drops_crlf(targets, tmp_path):
    source = tmp_path / "words.txt"
    source.write_bytes(b"one\r\n\ntwo\n  \nthree")
    result = invoke("run", f"{targets}:shout", "--input", source, "-b", "thread", "--with-index")
    assert result.exit_code == 0
    assert lines(result.stdout) == ["0\tONE", "1\tTWO", "2\tTHREE"]  # indices count items, not lines


def test_json_input_skips_blank_lines_as_text_does(targets, tmp_path):
    source = tmp_path / "numbers.jsonl"
    source.write_text("1\n\n2\n   \n3\n")
    result = invoke("run", f"{targets}:square", "--json", "--input", source, "-b", "serial", "--with-index")
    assert [json.loads(line) for line in lines(result.stdout)] == [
        {"index": 0, "result": 1}, {"index": 1, "result": 4}, {"index": 2, "result": 9}]


def test_stdin_through_the_runner(targets):
    result = invoke("run", f"{targets}:square", "--json", "--input", "-", "-b", "thread", input="4\n5\n")
    assert lines(result.stdout) == ["16", "25"]


def test_unordered_writes_every_result_once(targets):
    result = invoke("run", f"{targets}:square", "--range", "30", "--unordered", "--with-index", "--json",
                    "-b", "thread", "-j", "4", "--chunksize", "1")
    assert result.exit_code == 0
    pairs = sorted((d["index"], d["result"]) for d in map(json.loads, lines(result.stdout)))
    assert pairs == [(i, i * i) for i in range(30)]


def test_output_file(targets, tmp_path):
    out = tmp_path / "out.txt"
    result = invoke("run", f"{targets}:square", "--range", "4", "--output", out, "-b", "thread")
    assert result.exit_code == 0 and result.stdout == ""
    assert out.read_text() == "0\n1\n4\n9\n"


def test_async_function(targets):
    result = invoke("run", f"{targets}:double", "--range", "4", "-b", "thread")
    assert result.exit_code == 0
    assert lines(result.stdout) == ["0", "2", "4", "6"]


def test_process_backend_runs_a_function_from_a_file(targets):
    result = invoke("run", f"{targets}:in_worker", "--range", "3", "-b", "process", "-j", "2")
    assert result.exit_code == 0
    assert lines(result.stdout) == ["True"] * 3


def test_backend_options_reach_the_backend(targets):
    result = invoke("run", f"{targets}:square", "--range", "3", "-b", "pool", "-j", "1",
                    "-o", "start_method=forkserver")
    assert result.exit_code == 0
    assert lines(result.stdout) == ["0", "1", "4"]
    refused = invoke("run", f"{targets}:square", "--range", "3", "-b", "pool", "-o", "start_method=5")
    assert refused.exit_code == 2
    assert lines(refused.stderr) == ["pmap: error: start_method must be one of fork, spawn, forkserver, got 5"]


def test_backend_option_values_are_json_when_they_parse():
    assert parse_backend_options(["address=0.0.0.0:50000", "n=3", "flag=true", "names=[1, 2]", "s=x=y"]) == {
        "address": "0.0.0.0:50000", "n": 3, "flag": True, "names": [1, 2], "s": "x=y"}
    with pytest.raises(UsageError, match="-o takes key=value"):
        parse_backend_options(["novalue"])


def test_parse_range():
    assert parse_range("5") == range(5)
    assert parse_range("2:8:2") == range(2, 8, 2)
    for bad in ("x", "1:2:3:4", "1:5:0", ""):
        with pytest.raises(UsageError, match="--range takes"):
            parse_range(bad)


def test_bits_set():
    bits = Bits()
    for n in (0, 7, 8, 1000, 7):
        bits.add(n)
    assert len(bits) == 4
    assert [n for n in range(1002) if n in bits] == [0, 7, 8, 1000]


def test_progress_bar_on_request(targets):
    result = invoke("run", f"{targets}:square", "--range", "12", "-b", "thread", "--progress")
    assert result.exit_code == 0
    assert "12/12" in result.stderr
    assert lines(result.stdout) == [str(i * i) for i in range(12)]


def test_no_progress_bar_when_stderr_is_not_a_terminal(targets):
    result = invoke("run", f"{targets}:square", "--range", "12", "-b", "thread")
    assert result.stderr == ""


def test_progress_off_a_terminal_is_plain_lines_from_the_start_to_the_end(targets):
    result = invoke("run", f"{targets}:square", "--range", "12", "-b", "thread", "--progress", "--desc", "squaring")
    assert result.exit_code == 0
    progress = lines(result.stderr)
    assert progress[0].startswith("squaring:   0% ") and " 0/12 [elapsed 0:00, remaining ?" in progress[0]
    assert progress[-1].startswith("squaring: 100% ") and " 12/12 [elapsed " in progress[-1]
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    assert lines(result.stdout) == [str(i * i) for i in range(12)]


def test_explain_prints_the_plan_and_does_not_run_everything(targets, tmp_path):
    calls = tmp_path / "calls.log"
    result = invoke("run", f"{targets}:square", "--range", "100000", "--explain", env={"PMAP_TEST_CALLS": str(calls)})
    assert result.exit_code == 0
    assert result.stdout.startswith("backend: ")
    assert "reason: " in result.stdout and "probe item(s)" in result.stdout
    assert 0 < len(calls.read_text().splitlines()) < 100000


def test_explain_notes_an_explicit_backend(targets):
    result = invoke("run", f"{targets}:square", "--range", "10", "--explain", "-b", "thread")
    assert "note: the run would use --backend thread, not this plan" in result.stdout


# ---- failures ------------------------------------------------------------------------------
def test_on_error_record_writes_the_failure_in_its_place(targets):
    result = invoke("run", f"{targets}:fail_on_three", "--range", "5", "--on-error", "record", "-b", "thread")
    assert result.exit_code == 1
    out = lines(result.stdout)
    assert out[:3] == ["0", "1", "2"] and out[4] == "4"
    assert json.loads(out[3]) == {"index": 3, "item": 3, "error": {
        "type": "ValueError", "message": "three is not allowed", "kind": "error"}}
    assert "pmap: item 3 (3) failed: ValueError: three is not allowed" in result.stderr


def test_on_error_skip_leaves_the_item_out(targets):
    result = invoke("run", f"{targets}:fail_on_three", "--range", "5", "--on-error", "skip", "--with-index",
                    "-b", "thread")
    assert result.exit_code == 1
    assert lines(result.stdout) == ["0\t0", "1\t1", "2\t2", "4\t4"]
    assert "1 item(s) failed" in result.stderr


def test_on_error_raise_stops_after_the_results_before_it(targets):
    result = invoke("run", f"{targets}:fail_on_three", "--range", "6", "-b", "thread")
    assert result.exit_code == 1
    assert lines(result.stdout) == ["0", "1", "2"]
    assert 'raise ValueError("three is not allowed")' in result.stderr  # the worker's traceback
    assert "pmap: item 3 (3) failed: ValueError: three is not allowed" in result.stderr


def test_retries_and_timeout_reach_the_run(targets, tmp_path):
    calls = tmp_path / "calls.log"
    result = invoke("run", f"{targets}:hang", "--range", "2", "-b", "thread", "--timeout", "0.05",
                    "--retries", "1", "--on-error", "record", env={"PMAP_TEST_CALLS": str(calls)})
    assert result.exit_code == 1
    records = [json.loads(line) for line in lines(result.stdout)]
    assert [r["error"]["kind"] for r in records] == ["timeout", "timeout"]
    assert sorted(lines(calls.read_text())) == ["0", "0", "1", "1"], "each item should run twice: once, then its retry"


# ---- bad input: one line, exit 2, no traceback ---------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["run", "nosuchmodule:f", "1"], "pmap: error: no module named 'nosuchmodule'"),
    (["run", "targets:nosuch", "1"], "pmap: error: module 'targets' has no function 'nosuch'"),
    (["run", "targets:squar", "1"], "did you mean 'square'?"),
    (["run", "targets.py:NOT_A_FUNCTION", "1"], "pmap: error: targets.py:NOT_A_FUNCTION is not callable"),
    (["run", "missing.py:f", "1"], "pmap: error: no such file: missing.py"),
    (["run", "square", "1"], "pmap: error: target 'square' must be MODULE:FUNCTION"),
    (["run", "targets:square", "--input", "nofile.txt"], "pmap: error: input file 'nofile.txt' does not exist"),
    (["run", "targets:square", "--json", "--input", "bad.jsonl"],
     "pmap: error: bad.jsonl line 3 is not valid JSON: Expecting value (column 1)"),
    (["run", "targets:square", "--json", "1", "two"], "pmap: error: item 2 ('two') is not valid JSON"),
    (["run", "targets:square", "1", "--workers", "0"], "pmap: error: --workers must be at least 1, got 0"),
    (["run", "targets:square", "1", "--chunksize", "0"], "pmap: error: --chunksize must be at least 1"),
    (["run", "targets:square", "1", "--timeout", "0"], "pmap: error: --timeout must be a positive number"),
    (["run", "targets:square", "1", "--timeout", "nan"], "pmap: error: --timeout must be a positive number"),
    (["run", "targets:square", "1", "--backoff", "nan"], "pmap: error: --backoff must be a finite"),
    (["run", "targets:square", "1", "--backoff", "inf"], "pmap: error: --backoff must be a finite"),
    (["run", "targets:square", "1", "--on-error", "ignore"], "pmap: error: --on-error must be raise, skip or return"),
    (["run", "targets:square", "1", "--retry-on", "NoSuchError"], "pmap: error: --retry-on 'NoSuchError' is not an exception type"),
    (["run", "targets:square", "1", "--retry-on", "targets:square"], "pmap: error: --retry-on 'targets:square' is not an exception type"),
    (["run", "targets:square", "1", "--initializer", "targets:nosuch"], "pmap: error: module 'targets' has no initializer 'nosuch'"),
    (["run", "targets:square", "1", "--initializer", "targets:set_state", "--initargs", "{}"], "pmap: error: --initargs takes a JSON array"),
    (["run", "targets:square", "--range", str(10 ** 30)], "has more items than can be counted here"),
    (["run", "targets:square", "--json", "--input", "deep.json"], "pmap: error: deep.json line 1 is JSON nested too deeply to read"),
    (["run", "targets:square", "--json", "[" * 100000], "is JSON nested too deeply to read"),
    (["run", "targets:square", "1", "-b", "asyncio"], "pmap: error: backend='asyncio' runs async def functions, and square is a plain function"),
    (["run", "targets:square", "--input", "items.txt", "--output", "items.txt"], "pmap: error: --output 'items.txt' is the input file"),
    (["run", "targets:square", "--input", "items.txt", "--output", "./link.txt"], "pmap: error: --output './link.txt' is the input file"),
    (["run", "targets:square", "1", "-b", "nosuch"], "pmap: error: unknown backend 'nosuch'"),
    (["run", "targets:square", "1", "-b", "thread", "-o", "frob=1"], "pmap: error: backend 'thread' got unknown option(s): frob"),
    (["run", "targets:square"], "pmap: error: no input: give ITEMS, --input FILE (- for stdin) or --range N"),
    (["run", "targets:square", "1", "--range", "3"], "pmap: error: give the items one way"),
    (["run", "broken.py:f", "1"], "pmap: error: importing broken.py failed: ZeroDivisionError: division by zero (broken.py, line 2)"),
    (["bench", "targets:square", "--range", "3", "--backends", "thread,nosuch"], "pmap: error: unknown backend 'nosuch'"),
])
def test_bad_input_gets_one_line_and_exit_2(targets, tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text("1\n2\noops\n4\n")
    (tmp_path / "broken.py").write_text("import os\n1 / 0\n")
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000 + "\n")
    (tmp_path / "items.txt").write_text("1\n2\n")
    (tmp_path / "link.txt").symlink_to(tmp_path / "items.txt")
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert len(lines(result.stderr)) == 1
    assert message in result.stderr
    assert (tmp_path / "items.txt").read_text() == "1\n2\n"  # an input named as --output is left alone


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to fail a write")
def test_an_output_that_cannot_be_written_is_one_line_and_exit_2(targets):
    result = invoke("run", f"{targets}:square", "--range", "3", "-b", "serial", "--output", "/dev/full")
    assert result.exit_code == 2
    assert lines(result.stderr) == ["pmap: error: cannot write results to '/dev/full': No space left on device"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to fail a write")
def test_stdout_to_a_full_device_in_a_real_process(targets, tmp_path):
    with open("/dev/full", "w") as full:
        child = subprocess.run([sys.executable, "-m", "pmap", "run", "targets:square", "--range", "3", "-b", "serial"],
                               cwd=tmp_path, stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
    assert child.returncode == 2
    assert lines(child.stderr) == ["pmap: error: cannot write results to stdout: No space left on device"]


# ---- what a result may be ------------------------------------------------------------------
@pytest.mark.parametrize("target, message", [
    ("not_a_number", "ValueError: the result nan is not JSON: Out of range float values are not JSON compliant"),
    ("an_object", "ValueError: the result <object object at"),
])
def test_json_output_is_strict_and_a_result_without_a_json_form_fails_its_item(targets, target, message):
    result = invoke("run", f"{targets}:{target}", "--json", "--range", "2", "-b", "thread", "--on-error", "return")
    assert result.exit_code == 1
    records = [json.loads(line) for line in lines(result.stdout)]  # every line is strict JSON
    assert [r["index"] for r in records] == [0, 1]
    assert all(r["error"]["type"] == "ValueError" for r in records)
    assert message in result.stderr
    assert "NaN" not in result.stdout


def test_json_output_writes_sets_and_dataclass_results(targets, tmp_path):
    (tmp_path / "shapes.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass

        @dataclass
        class Point:
            x: int
            y: int

        def point(n):
            return Point(n, {n})
    '''))
    result = invoke("run", "shapes.py:point", "--json", "1", "-b", "serial")
    assert result.exit_code == 0
    assert lines(result.stdout) == ['{"x": 1, "y": [1]}']


def test_text_output_refuses_a_result_with_a_line_break(targets):
    result = invoke("run", f"{targets}:two_lines", "a", "b", "-b", "thread", "--on-error", "skip")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "pmap: item 0 ('a') failed: ValueError: the result 'a\\nmore' holds a line break" in result.stderr
    assert "use --json" in result.stderr
    as_json = invoke("run", f"{targets}:two_lines", "a", "-b", "thread", "--json")
    assert as_json.exit_code == 2  # 'a' is not JSON: the items must be JSON too
    quoted = invoke("run", f"{targets}:two_lines", '"a"', "-b", "thread", "--json")
    assert lines(quoted.stdout) == [json.dumps("a\nmore")]


def test_results_before_a_system_exit_in_the_same_chunk_are_written(targets):
    result = invoke("run", f"{targets}:exit_on_three", "--range", "6", "-b", "serial", "--chunksize", "6",
                    "--on-error", "return")
    out = lines(result.stdout)
    assert out[:3] == ["0", "1", "2"] and out[4:] == ["4", "5"]
    assert json.loads(out[3])["error"]["type"] == "SystemExit"
    assert result.exit_code == 1


def test_a_system_exit_that_stops_the_run_says_so(targets):
    result = invoke("run", f"{targets}:exit_on_three", "--range", "6", "-b", "serial", "--chunksize", "1")
    assert result.exit_code == 1
    assert "SystemExit" in result.stderr


# ---- every option of the API ---------------------------------------------------------------
def test_on_error_return_is_the_name_and_record_its_alias(targets):
    outputs = [invoke("run", f"{targets}:fail_on_three", "--range", "5", "--on-error", name, "-b", "thread").stdout
               for name in ("return", "record")]
    assert outputs[0] == outputs[1]
    assert json.loads(lines(outputs[0])[3])["error"]["message"] == "three is not allowed"


def test_retry_on_retries_only_the_named_exceptions(targets, tmp_path):
    calls = tmp_path / "calls.log"
    for names, code in (([f"{targets}:Flaky"], 0), (["ValueError,KeyError"], 1), (["ValueError", f"{targets}:Flaky"], 0)):
        calls.write_text("")
        args = [a for name in names for a in ("--retry-on", name)]
        result = invoke("run", f"{targets}:flaky_once", "--json", "--range", "3", "-b", "thread", "--retries", "1",
                        "--on-error", "skip", *args, env={"PMAP_TEST_CALLS": str(calls)})
        assert result.exit_code == code, (names, result.stderr)
        assert len(lines(calls.read_text())) == (6 if code == 0 else 3)


def test_initializer_and_initargs_reach_each_worker(targets):
    for backend in ("thread", "process"):
        result = invoke("run", f"{targets}:state", "a", "b", "-b", backend, "-j", "2",
                        "--initializer", f"{targets}:set_state", "--initargs", '["warm"]')
        assert result.exit_code == 0, result.stderr
        assert lines(result.stdout) == ["a warm", "b warm"]


def test_backoff_and_retry_on_reach_the_api(targets, monkeypatch):
    import pmap.api
    seen = []
    real_imap = pmap.api.imap_with_options

    def spy(func, items, options, **how):
        seen.append(options)
        return real_imap(func, items, options, **how)

    monkeypatch.setattr(pmap.api, "imap_with_options", spy)
    result = invoke("run", f"{targets}:square", "--json", "1", "-b", "thread", "--retries", "2", "--backoff", "0.5",
                    "--retry-on", "OSError")
    assert result.exit_code == 0
    [options] = seen
    assert options.backoff == 0.5 and options.retry_on == (OSError,) and options.retries == 2


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"pmap {pmap.__version__} (Python {sys.version.split()[0]})\n"


def test_shell_completion_is_offered():
    result = invoke("--help")
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout


def test_a_bad_line_on_stdin_stops_after_the_lines_before_it(targets):
    result = invoke("run", f"{targets}:square", "--json", "--input", "-", "-b", "serial", input="1\n2\nx\n4\n")
    assert result.exit_code == 2
    assert lines(result.stdout) == ["1", "4"]
    assert lines(result.stderr) == ["pmap: error: stdin line 3 is not valid JSON: Expecting value (column 1)"]


def test_a_bad_command_does_not_touch_the_output_file(targets, tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("precious\n")
    result = invoke("run", f"{targets}:nosuch", "1", "--output", out)
    assert result.exit_code == 2
    assert out.read_text() == "precious\n"


# ---- the journal ---------------------------------------------------------------------------
def journal_entries(path):
    with open(path) as handle:
        header = json.loads(handle.readline())
        return header, [json.loads(line) for line in handle]


def test_journal_resume_skips_finished_items_and_writes_complete_output(targets, tmp_path):
    calls, flag, journal = tmp_path / "calls.log", tmp_path / "flag", tmp_path / "run.journal"
    flag.touch()
    env = {"PMAP_TEST_CALLS": str(calls), "PMAP_TEST_FLAG": str(flag)}
    command = ["run", f"{targets}:fail_while_flagged", "--range", "10", "--json", "--journal", journal]
    # serial first, so no worker thread of the first run is still calling after it returns
    first = invoke(*command, "-b", "serial", env=env)
    assert first.exit_code == 1  # stopped at item 5
    assert lines(first.stdout) == ["0", "1", "2", "3", "4"]
    header, entries = journal_entries(journal)
    assert header["command"]["target"].endswith("fail_while_flagged")
    assert [e["i"] for e in entries] == [0, 1, 2, 3, 4, 5]
    assert "error" in entries[5] and "out" not in entries[5]  # a failure is journaled as a failure

    flag.unlink()
    calls.write_text("")
    second = invoke(*command, "-b", "thread", "-j", "2", env=env)  # the backend may change on resume
    assert second.exit_code == 0
    assert lines(second.stdout) == [str(i) for i in range(10)]
    assert sorted(json.loads(c) for c in lines(calls.read_text())) == [5, 6, 7, 8, 9]
    assert "5 item(s) have results (kept), 1 failed (retried), 4 never ran (run now)" in second.stderr
    _, entries = journal_entries(journal)
    assert [e["i"] for e in entries if "out" in e] == list(range(10))

    calls.write_text("")
    third = invoke(*command, "-b", "serial", env=env)  # all done: replayed, nothing runs
    assert lines(third.stdout) == [str(i) for i in range(10)]
    assert calls.read_text() == ""


def test_journal_drops_a_torn_last_line_and_reruns_only_that_item(targets, tmp_path):
    calls, journal = tmp_path / "calls.log", tmp_path / "run.journal"
    command = ["run", f"{targets}:square", "--range", "6", "-b", "serial", "--journal", journal]
    assert invoke(*command).exit_code == 0
    data = journal.read_bytes()
    journal.write_bytes(data[:-4])  # a kill in the middle of writing the last entry
    result = invoke(*command, env={"PMAP_TEST_CALLS": str(calls)})
    assert result.exit_code == 0
    assert lines(result.stdout) == ["0", "1", "4", "9", "16", "25"]
    assert lines(calls.read_text()) == ["5"]
    _, entries = journal_entries(journal)
    assert [e["i"] for e in entries] == list(range(6))


def test_journal_of_an_unordered_run_resumes_with_every_index_once(targets, tmp_path):
    calls, flag, journal = tmp_path / "calls.log", tmp_path / "flag", tmp_path / "run.journal"
    flag.touch()
    env = {"PMAP_TEST_CALLS": str(calls), "PMAP_TEST_FLAG": str(flag)}
    command = ["run", f"{targets}:fail_while_flagged", "--range", "20", "--json", "--with-index", "--unordered",
               "-b", "thread", "-j", "3", "--chunksize", "1", "--journal", journal]
    first = invoke(*command, env=env)
    assert first.exit_code == 1
    done_first = {json.loads(line)["index"] for line in lines(first.stdout)}
    assert 5 not in done_first
    flag.unlink()
    calls.write_text("")
    second = invoke(*command, env=env)
    assert second.exit_code == 0
    indices = [json.loads(line)["index"] for line in lines(second.stdout)]
    assert sorted(indices) == list(range(20))
    ran_again = {json.loads(c) for c in lines(calls.read_text())}
    assert not ran_again & done_first


def test_journal_reruns_failed_items_and_keep_failures_keeps_them(targets, tmp_path):
    calls, flag, journal = tmp_path / "calls.log", tmp_path / "flag", tmp_path / "run.journal"
    flag.touch()
    env = {"PMAP_TEST_CALLS": str(calls), "PMAP_TEST_FLAG": str(flag)}
    command = ["run", f"{targets}:fail_while_flagged", "--json", "--range", "8", "--on-error", "return",
               "-b", "serial", "--journal", journal]
    first = invoke(*command, env=env)
    assert first.exit_code == 1
    assert json.loads(lines(first.stdout)[5])["error"]["message"] == "five is not ready"

    calls.write_text("")
    kept = invoke(*command, "--keep-failures", env=env)  # GNU parallel's --resume: the failure stands
    assert kept.exit_code == 1
    assert kept.stdout == first.stdout
    assert calls.read_text() == ""
    assert "1 failed (kept as failed, --keep-failures)" in kept.stderr

    retried = invoke(*command, env=env)  # still failing: tried again, journaled again
    assert retried.exit_code == 1 and retried.stdout == first.stdout
    assert lines(calls.read_text()) == []  # 5 failed before its call was logged
    flag.unlink()
    fixed = invoke(*command, env=env)
    assert fixed.exit_code == 0
    assert lines(fixed.stdout) == [str(i) for i in range(8)]
    assert lines(calls.read_text()) == ["5"]  # only the failed item ran
    again = invoke(*command, env=env)
    assert again.exit_code == 0 and again.stdout == fixed.stdout
    assert lines(calls.read_text()) == ["5"]


def test_journal_refuses_another_command(targets, tmp_path):
    journal = tmp_path / "run.journal"
    assert invoke("run", f"{targets}:square", "--range", "3", "-b", "serial", "--journal", journal).exit_code == 0
    result = invoke("run", f"{targets}:square", "--range", "4", "-b", "serial", "--journal", journal)
    assert result.exit_code == 2
    assert lines(result.stderr) == [f"pmap: error: journal '{journal}' belongs to a different command "
                                    "(input differ); use another journal file, or delete it to start over"]
    not_a_journal = tmp_path / "notes.txt"
    not_a_journal.write_text("hello\n")
    result = invoke("run", f"{targets}:square", "--range", "3", "--journal", not_a_journal)
    assert result.exit_code == 2 and "is not a pmap journal" in result.stderr
    assert not_a_journal.read_text() == "hello\n"


@pytest.mark.skipif(sys.platform == "win32", reason="the journal lock is POSIX flock")
def test_journal_is_locked_while_a_run_uses_it(targets, tmp_path):
    import fcntl
    journal = tmp_path / "run.journal"
    assert invoke("run", f"{targets}:square", "--range", "3", "-b", "serial", "--journal", journal).exit_code == 0
    before = journal.read_text()
    with open(journal, "rb") as other_run:  # stands for a run in progress: it holds the lock
        fcntl.flock(other_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = invoke("run", f"{targets}:square", "--range", "3", "-b", "serial", "--journal", journal)
    assert result.exit_code == 2
    assert lines(result.stderr) == [f"pmap: error: journal '{journal}' is in use by another pmap run; wait for "
                                    "it to end, or give this run another journal"]
    assert journal.read_text() == before
    again = invoke("run", f"{targets}:square", "--range", "3", "-b", "serial", "--journal", journal)
    assert again.exit_code == 0 and lines(again.stdout) == ["0", "1", "4"]  # the lock ends with its run


def test_two_real_runs_on_one_journal_do_not_interleave(targets, tmp_path):
    journal = tmp_path / "run.journal"
    command = ["run", "targets:slow", "--range", "200", "-b", "thread", "-j", "2", "--journal", journal]
    first = pmap_process(*command, cwd=tmp_path)
    assert first.stdout.readline() == "0\n"  # the first run holds the journal
    second = pmap_process(*command, cwd=tmp_path)
    _, err = second.communicate(timeout=60)
    first.communicate(timeout=60)
    assert second.returncode == 2 and "is in use by another pmap run" in err
    assert first.returncode == 0
    _, entries = journal_entries(journal)
    assert [e["i"] for e in entries] == list(range(200))


@pytest.mark.parametrize("unordered, entry", [
    (True, {"i": 10_000_000_000, "out": "stale"}),   # far past the input's 5 items
    (True, {"i": 5, "out": "stale"}),                # just past it
    (True, {"i": -1, "out": "stale"}),
    (True, {"i": True, "out": "stale"}),
    (True, {"i": 2}),                                # no output line
    (True, {"i": 2, "error": "x"}),                  # a failure without its record
    (True, {"i": 2, "error": "x", "record": "{}", "attempts": 0}),
    (False, {"i": 7, "out": "stale"}),               # past the input, in an ordered run too
    (True, ["not", "an", "entry"]),
])
def test_journal_validates_every_entry(targets, tmp_path, unordered, entry):
    journal = tmp_path / "run.journal"
    command = ["run", f"{targets}:square", "--json", "--range", "5", "-b", "serial", "--journal", journal]
    command += ["--unordered"] if unordered else []
    first = invoke(*command, "--output", tmp_path / "first.txt")
    assert first.exit_code == 0
    header = journal.read_text().splitlines()[0]
    journal.write_text(header + "\n" + json.dumps(entry) + "\n")
    result = invoke(*command)
    assert result.exit_code == 2
    assert lines(result.stderr) == [f"pmap: error: journal '{journal}' is damaged at line 2; delete it to start over"]
    assert "stale" not in result.stdout

# ---- pmap backends and pmap bench ----------------------------------------------------------
def test_backends_lists_each_with_availability_workers_and_guarantees():
    result = invoke("backends")
    assert result.exit_code == 0
    out = lines(result.stdout)
    assert out[0].split() == ["backend", "kind", "available", "workers", "guarantees"]
    rows = {line.split()[0]: line for line in out[1:]}
    for info in pmap.backends():
        row = rows[info.name]
        assert row.split()[2] == ("yes" if info.available else "no")
        if info.available:
            assert row.split()[3] == str(info.default_workers)
            assert row.endswith(info.guarantees)
        else:
            assert row.endswith(f"unavailable: {info.reason}")


# Earlier tests leave loky's threads running in this process; fork's warning about forking a
# threaded process is right, but not what these tests are about.
@pytest.mark.filterwarnings("ignore:pmap. the fork backend is forking:RuntimeWarning")
def test_bench_prints_the_comparison_table(targets):
    result = invoke("bench", f"{targets}:square", "--range", "50", "--backends", "thread,fork", "-r", "2")
    assert result.exit_code == 0
    out = lines(result.stdout)
    assert out[0] == "50 items, ordered, median of 2 runs per backend"
    assert [line.split()[0] for line in out[2:]] == ["serial", "thread", "fork"]
    assert out[2].endswith("reference") and out[3].endswith("agree") and out[4].endswith("agree")


@pytest.mark.filterwarnings("ignore:pmap. the fork backend is forking:RuntimeWarning")
def test_bench_exits_1_when_backends_disagree(targets):
    result = invoke("bench", f"{targets}:in_worker", "--range", "4", "--backends", "thread,fork")
    assert result.exit_code == 1
    assert "differ: first difference at index 0: True where serial has False" in result.stdout


# ---- real processes ------------------------------------------------------------------------
def pmap_process(*args, cwd, env=None, **popen):
    environment = dict(os.environ, **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "pmap", *map(str, args)], cwd=cwd, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_stdin_is_piped_into_a_real_process(targets, tmp_path):
    child = pmap_process("run", "targets:square", "--json", "--input", "-", "-b", "thread", cwd=tmp_path,
                         stdin=subprocess.PIPE)
    out, err = child.communicate("1\n2\n3\n", timeout=60)
    assert child.returncode == 0, err
    assert out == "1\n4\n9\n"


@pytest.mark.parametrize("args, code", [
    (["--range", "3"], 0),
    (["--range", "5", "--on-error", "skip"], 1),
    (["--range", "5", "--on-error", "raise"], 1),
    (["--range", "5", "--workers", "0"], 2),
    (["--json", "--input", "bad.jsonl"], 2),
])
def test_exit_status_of_a_real_process(targets, tmp_path, args, code):
    (tmp_path / "bad.jsonl").write_text("1\n[2,\n")
    child = pmap_process("run", "targets:fail_on_three", "-b", "serial", *args, cwd=tmp_path)
    out, err = child.communicate(timeout=60)
    assert child.returncode == code
    assert "Traceback" not in err or args[-1] == "raise"


def test_missing_module_in_a_real_process_is_one_line(tmp_path):
    child = pmap_process("run", "no_such_module:f", "1", cwd=tmp_path)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 2
    assert lines(err) == ["pmap: error: no module named 'no_such_module' (looked in the current directory "
                          "and on sys.path; set PYTHONPATH to add a directory)"]


def wait_for(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


@pytest.mark.parametrize("backend", ["fork", "process"])
def test_ctrl_c_exits_130_and_leaves_no_process(targets, tmp_path, backend):
    child = pmap_process("run", "targets:slow", "--range", "10000", "-b", backend, "-j", "2", cwd=tmp_path)
    assert child.stdout.readline() == "0\n"  # running, workers started
    workers = psutil.Process(child.pid).children(recursive=True)
    assert workers
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 130
    assert "Traceback" not in err and "pmap: interrupted" in err
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == []


def test_sigterm_exits_143_and_flushes_the_journal(targets, tmp_path):
    journal = tmp_path / "run.journal"
    child = pmap_process("run", "targets:slow", "--range", "10000", "-b", "thread", "-j", "2",
                         "--journal", journal, cwd=tmp_path)
    seen = [child.stdout.readline() for _ in range(4)]
    child.terminate()
    out, err = child.communicate(timeout=30)
    assert child.returncode == 143
    _, entries = journal_entries(journal)
    assert len(entries) >= len(seen)  # everything written out is journaled


def test_journal_resume_after_sigkill_gives_complete_output_without_duplicates(targets, tmp_path):
    journal, out, calls = tmp_path / "run.journal", tmp_path / "out.txt", tmp_path / "calls.log"
    command = ["run", "targets:slow", "--range", "100", "--json", "-b", "fork", "-j", "4",
               "--journal", journal, "--output", out]
    env = {"PMAP_TEST_CALLS": str(calls)}
    child = pmap_process(*command, cwd=tmp_path, env=env)
    wait_for(lambda: journal.exists() and len(journal.read_text().splitlines()) > 8)
    child.kill()
    child.communicate(timeout=30)
    _, entries = journal_entries(journal)
    done_before = {e["i"] for e in entries}
    assert 0 < len(done_before) < 100

    calls.write_text("")
    again = pmap_process(*command, cwd=tmp_path, env=env)
    _, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    assert out.read_text().splitlines() == [str(i) for i in range(100)]
    ran_again = {json.loads(c) for c in calls.read_text().splitlines()}
    assert not ran_again & done_before
    assert ran_again | done_before == set(range(100))


def test_a_closed_stdout_stops_the_run_quietly(targets, tmp_path):
    child = pmap_process("run", "targets:square", "--range", "1000000", "-b", "serial", cwd=tmp_path)
    assert child.stdout.readline() == "0\n"
    child.stdout.close()
    child.wait(timeout=60)
    err = child.stderr.read()
    assert child.returncode == 141
    assert "Traceback" not in err and "Exception ignored" not in err


def test_gevent_patch_happens_before_the_target_is_imported(tmp_path):
    pytest.importorskip("gevent", reason="--gevent-patch needs gevent")
    (tmp_path / "patched.py").write_text(textwrap.dedent('''
        from gevent import monkey
        PATCHED_AT_IMPORT = monkey.is_module_patched("socket")

        def report(_):
            return PATCHED_AT_IMPORT
    '''))
    for flag, expected in (("--gevent-patch", "True\n"), ("--no-progress", "False\n")):
        child = pmap_process("run", "patched:report", "x", "-b", "serial", flag, cwd=tmp_path)
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        assert out == expected
