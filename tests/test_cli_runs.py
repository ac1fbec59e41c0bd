"""`pmap run`'s job log, --halt, CSV and TSV, formats, --dry-run, --explain, help and completion."""
import csv
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest

from cli_helpers import invoke, lines

FUNCS = textwrap.dedent('''
    import json, os

    def _log(x):
        path = os.environ.get("PMAP_TEST_CALLS")
        if path:
            with open(path, "a") as log:
                log.write(json.dumps(x) + "\\n")

    def fail_odd(x):
        _log(x)
        if int(x) % 2:
            raise ValueError(f"{x} is odd")
        return x

    def describe(record):
        return f"{record['name']} ({record['city']})"

    def pair(a, b):
        return {"sum": a + b}

    def echo(x):
        _log(x)
        return x
''')


@pytest.fixture
def work(tmp_path, monkeypatch):
    (tmp_path / "funcs.py").write_text(FUNCS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    return tmp_path


def joblog_rows(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream, delimiter="\t", quoting=csv.QUOTE_NONE))


# ---- the job log -----------------------------------------------------------------------------
def test_joblog_has_a_line_per_attempt_with_exit_status_and_command(work):
    counter = work / "tries"
    command = f"echo x >> {counter}.{{}}; [ $(wc -l < {counter}.{{}}) -ge 2 ] || exit 4; echo ok {{}}"
    result = invoke("run", "--cmd", command, "a", "b c", "--retries", "1", "--joblog", "jobs.tsv")
    assert result.exit_code == 0, result.stderr
    rows = joblog_rows(work / "jobs.tsv")
    assert list(rows[0]) == ["index", "item", "start", "seconds", "outcome", "exit", "attempt", "worker",
                             "command", "error"]
    assert sorted((r["item"], r["attempt"], r["outcome"], r["exit"]) for r in rows) == [
        ("a", "1", "failed", "4"), ("a", "2", "ok", "0"), ("b c", "1", "failed", "4"), ("b c", "2", "ok", "0")]
    assert {r["command"] for r in rows if r["item"] == "b c"} == {command.replace("{}", "'b c'")}
    assert all(float(r["seconds"]) >= 0 and r["start"][:2] == "20" and ":" in r["worker"] for r in rows)


def test_joblog_of_functions_and_resumes_appends_and_counts_attempts(work):
    calls = work / "calls.log"
    command = ["run", "funcs:fail_odd", "--range", "4", "-b", "serial", "--journal", "run.journal",
               "--joblog", "jobs.tsv"]
    assert invoke(*command, env={"PMAP_TEST_CALLS": str(calls)}).exit_code == 1  # stops at item 1
    with open(work / "jobs.tsv", "ab") as log:
        log.write(b"9\ttorn by a kill")  # a run killed mid-write leaves a torn line
    second = invoke(*command, "--on-error", "skip")
    assert second.exit_code == 1
    rows = joblog_rows(work / "jobs.tsv")
    assert [(r["index"], r["outcome"], r["attempt"]) for r in rows] == [
        ("0", "ok", "1"), ("1", "failed", "1"),                       # the first run
        ("1", "failed", "2"), ("2", "ok", "1"), ("3", "failed", "1")]  # the resume retried 1: its 2nd attempt
    assert rows[1]["error"] == "ValueError: 1 is odd"


def test_joblog_escapes_tabs_and_line_breaks(work):
    invoke("run", "--cmd", "true", "--joblog", "jobs.tsv", "--", "a\tb\nc")
    raw = (work / "jobs.tsv").read_text().splitlines()
    assert len(raw) == 2 and raw[1].split("\t")[1] == "a\\tb\\nc"


# ---- --halt ----------------------------------------------------------------------------------
def test_halt_after_n_failures_writes_what_finished_and_exits_3(work):
    calls = work / "calls.log"
    command = ["run", "funcs:fail_odd", "--range", "20", "-b", "serial", "--halt", "fail=2",
               "--journal", "run.journal"]
    result = invoke(*command, env={"PMAP_TEST_CALLS": str(calls)})
    assert result.exit_code == 3
    assert lines(result.stdout) == ["0", "2"]
    assert "pmap: stopped by --halt fail=2: 2 item(s) failed" in result.stderr
    assert len(lines(calls.read_text())) == 4  # nothing ran past the second failure (serial runs in order)
    resumed = invoke("run", "funcs:fail_odd", "--range", "20", "-b", "serial", "--on-error", "skip",
                     "--journal", "run.journal")
    assert resumed.exit_code == 1
    assert lines(resumed.stdout) == [str(i) for i in range(0, 20, 2)]


def test_halt_on_a_percentage_judges_from_the_third_finished_item(work):
    result = invoke("run", "--cmd", "test $(( {} % 4 )) -ne 3", "--range", "40", "-j", "1", "--halt",
                    "fail=30%")
    assert result.exit_code == 1  # 25% failed: never reached 30%
    halted = invoke("run", "--cmd", "test {} -lt 2", "--range", "40", "-j", "1", "--halt", "fail=30%")
    assert halted.exit_code == 3
    assert "--halt fail=30%: 1 of 3 finished item(s) failed" in halted.stderr


def test_halt_soon_lets_started_commands_finish(work):
    result = invoke("run", "--cmd", "test {} -ne 1 && echo {}", "--range", "30", "-j", "2", "--halt",
                    "soon,fail=1")
    assert result.exit_code == 3
    assert "reading no further items; waiting for those started" in result.stderr
    assert len(lines(result.stdout)) < 29


# ---- CSV, TSV and formats --------------------------------------------------------------------
def test_csv_records_are_dicts_with_quoted_newlines_a_bom_and_crlf(work):
    (work / "people.csv").write_bytes(b'\xef\xbb\xbfname,city\r\n"Lee, Ann","New\r\nYork"\r\n\r\nBo,Oslo\r\n')
    result = invoke("run", "funcs:describe", "--csv", "-i", "people.csv", "-b", "thread")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout_bytes.decode(), newline="")))
    assert rows == [["name", "city", "result"], ["Lee, Ann", "New\r\nYork", "Lee, Ann (New\r\nYork)"],
                    ["Bo", "Oslo", "Bo (Oslo)"]]


def test_csv_fields_fill_a_command_and_tsv_writes_tabs(work):
    (work / "people.tsv").write_text("name\tcity\nAnn Lee\t$(touch pwned)\n")
    result = invoke("run", "--tsv", "-i", "people.tsv", "--cmd", "echo {city} / {name} / {2}")
    assert result.exit_code == 0, result.stderr
    assert lines(result.stdout) == ["name\tcity\tresult", "Ann Lee\t$(touch pwned)\t$(touch pwned) / Ann Lee / "
                                    "$(touch pwned)"]
    assert not (work / "pwned").exists()


def test_csv_from_stdin_and_failures_in_their_own_column(work):
    result = invoke("run", "--csv", "-i", "-", "--cmd", "test {n} != 2 && echo {n}", "--on-error", "return",
                    "--with-index", input="n\n1\n2\n")
    assert result.exit_code == 1
    assert list(csv.reader(io.StringIO(result.stdout))) == [
        ["index", "n", "result", "error"], ["0", "1", "1", ""], ["1", "2", "", "CommandFailed: exit status 1"]]


def test_star_reads_json_and_writes_json(work):
    result = invoke("run", "funcs:pair", "--star", "[1, 2]", '{"a": 3, "b": 4}', "-b", "serial")
    assert lines(result.stdout) == ['{"sum": 3}', '{"sum": 7}']
    as_text = invoke("run", "funcs:pair", "--star", "[1, 2]", "-b", "serial", "--to", "text")
    assert lines(as_text.stdout) == ["{'sum': 3}"]


def test_a_csv_record_with_the_wrong_number_of_fields_is_one_line(work):
    (work / "bad.csv").write_text("a,b\n1,2\n3\n")
    result = invoke("run", "funcs:echo", "--csv", "-i", "bad.csv")
    assert result.exit_code == 2
    assert lines(result.stderr) == ["pmap: error: bad.csv record ending at line 3 has 1 field(s); the header has 2"]


# ---- --dry-run and --explain -----------------------------------------------------------------
def test_dry_run_prints_what_would_run_and_runs_nothing(work):
    result = invoke("run", "--cmd", "touch {}.done", "--range", "25", "--journal", "run.journal")
    assert result.exit_code == 0
    for name in ("0.done", "24.done"):
        os.remove(work / name)
    (work / "run.journal").write_text((work / "run.journal").read_text().splitlines()[0] + "\n")  # none done
    dry = invoke("run", "--cmd", "touch {}.done", "--range", "25", "--journal", "run.journal", "--dry-run")
    assert dry.exit_code == 0
    out = lines(dry.stdout)
    assert out[0] == "dry run: nothing runs"
    assert "command: touch {}.done  (runs directly (no shell needed); each value quoted as one word)" in out
    assert "backend: thread, " in dry.stdout and "items: 25 would run" in out
    assert "  0: touch 0.done" in out and "  9: touch 9.done" in out and "... and 15 more" in out
    assert not (work / "0.done").exists()


def test_dry_run_of_a_function_with_a_stream(work):
    result = invoke("run", "funcs:echo", "-i", "-", "--dry-run", input="a\nb\n")
    assert result.exit_code == 0
    assert "items: unknown count (a stream: it is read as the run goes); the first ones follow" in result.stdout
    assert "  0: funcs:echo('a')" in result.stdout and "backend: auto (chosen by a probe" in result.stdout


def test_explain_says_it_runs_probe_items_and_counts_a_stream(work):
    calls = work / "calls.log"
    result = invoke("run", "funcs:echo", "-i", "-", "--explain", input="x\n" * 300,
                    env={"PMAP_TEST_CALLS": str(calls)})
    assert result.exit_code == 0
    assert "--explain runs funcs:echo on the first items for real to measure them" in result.stderr
    assert "input: 300 item(s) (the stream was read to its end to count them)" in result.stdout
    ran = len(lines(calls.read_text()))
    assert f"the probe ran funcs:echo on {ran} item(s) for real" in result.stdout


# ---- help, completion, bad usage -------------------------------------------------------------
def test_run_help_opens_with_five_examples():
    result = invoke("run", "--help")
    text = lines(result.stdout)
    start = text.index("  Examples:")
    assert start <= 4
    examples = [line.strip() for line in text[start + 1:start + 8] if line.strip().startswith("pmap run")]
    assert len(examples) == 5
    assert any("--cmd" in e for e in examples) and any("--csv" in e for e in examples)
    assert any("--journal" in e for e in examples) and any("-b manager" in e for e in examples)


def complete(words: str, cwd):
    env = dict(os.environ, _PMAP_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(len(words.split(" ")) - 1))
    script = os.path.join(os.path.dirname(sys.executable), "pmap")  # the installed command
    child = subprocess.run([script], env=env, cwd=cwd, capture_output=True, text=True,
                           timeout=60)
    return child.stdout.split()


def test_completion_of_backends_and_targets(work):
    assert "thread" in complete("pmap run -b th", work)
    assert set(complete("pmap run -b ", work)) >= {"auto", "thread", "process", "fork", "manager"}
    assert "funcs.py:" in complete("pmap run fun", work) and "funcs:" in complete("pmap run fun", work)
    assert complete("pmap run funcs.py:", work) == ["funcs.py:fail_odd", "funcs.py:describe", "funcs.py:pair",
                                                   "funcs.py:echo"]
    assert complete("pmap run funcs:d", work) == ["funcs:describe"]


@pytest.mark.parametrize("args, message", [
    (["run", "--cmd", " ", "a"], "pmap: error: --cmd needs a command"),
    (["run", "a", "x"], "pmap: error: target 'a' must be MODULE:FUNCTION"),
    (["run"], "pmap: error: give a TARGET (module:function or file.py:function) or --cmd"),
    (["run", "--cmd", "echo", "a", "--halt", "fail=x"], "pmap: error: --halt takes fail=N or fail=N%"),
    (["run", "--cmd", "echo", "a", "--halt", "fail=2", "--on-error", "raise"], "pmap: error: --halt and --on-error raise"),
    (["run", "--cmd", "echo", "a", "--to", "xml"], "pmap: error: --to takes text, json, csv or tsv"),
    (["run", "--cmd", "echo", "a", "--csv"], "pmap: error: --csv reads records with a header from --input FILE"),
    (["run", "--cmd", "echo", "a", "--keep-failures"], "pmap: error: --keep-failures is about resuming"),
    (["run", "--cmd", "echo", "a", "--dry-run", "--explain"], "pmap: error: --dry-run runs nothing"),
    (["run", "--cmd", "echo", "a", "--json", "--csv"], "pmap: error: give one input format"),
    (["run", "--cmd", "echo", "a", "--retry-on", "OSError"], "pmap: error: --retry-on is for a Python function"),
    (["run", "--cmd", "echo", "a", "--journal", "j", "--joblog", "j"], "pmap: error: --joblog must be a file"),
    (["run", "--cmd", "echo", "a", "-b", "nosuch"], "pmap: error: unknown backend 'nosuch'"),
    (["run", "--cmd", "echo", "a", "--timeout", "0"], "pmap: error: --timeout must be a positive number"),
    (["run", "--cmd", "echo", "--csv", "-i", "dup.csv"], "pmap: error: dup.csv: the header names column 'a' more"),
    (["run", "--cmd", "echo", "--csv", "-i", "empty.csv"], "pmap: error: empty.csv is empty"),
    (["run", "--cmd", "echo", "a", "--joblog", "notes.txt"], "pmap: error: --joblog 'notes.txt' is not a pmap job log"),
])
def test_bad_usage_is_one_line_and_exit_2(work, args, message):
    (work / "dup.csv").write_text("a,b,a\n1,2,3\n")
    (work / "empty.csv").write_text("\n\n")
    (work / "notes.txt").write_text("my notes\n")
    result = invoke(*args)
    assert result.exit_code == 2, result.stdout
    assert len(lines(result.stderr)) == 1, result.stderr
    assert message in result.stderr
    assert (work / "notes.txt").read_text() == "my notes\n"
