"""`pmap run --cmd`: a shell command per item, with real shells, real files and real processes.

Each command here really runs (through /bin/sh, or directly for a template of plain words); the
items are hostile on purpose: spaces, quotes, `$(touch pwned)`, a leading `-`, line breaks and
bytes that are not UTF-8 must each reach the command as one argument and never run."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from cli_helpers import invoke, lines
from pmap.cli.command import Template

PY = sys.executable
ARGV = textwrap.dedent('''
    import json, sys
    print(json.dumps(sys.argv[1:]))  # each argument as it arrived
''')
HOSTILE = ["a b", "it's", 'say "hi"', "$(touch pwned)", "`touch pwned`", "-rf", "x;touch pwned", "line\nbreak",
           "*", "~", "$HOME", "tab\there", "{}", "back\\slash", ""]


def commands_left(marker) -> list:
    """Processes whose command line names `marker` that are still alive a moment after the run:
    a SIGKILLed process may still read as running for the instant before the kernel ends it."""
    found = [p for p in psutil.process_iter(["cmdline"]) if str(marker) in " ".join(p.info["cmdline"] or [])]
    _, alive = psutil.wait_procs(found, timeout=5)
    return alive


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "argv.py").write_text(ARGV)
    return tmp_path


def pmap_process(*args, cwd, env=None, **popen):
    environment = dict(os.environ, **(env or {}))
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([PY, "-m", "pmap", *args], cwd=cwd, env=environment, **popen)


# ---- placeholders and quoting ----------------------------------------------------------------
def test_placeholders_fill_as_gnu_parallel_fills_them(work):
    result = invoke("run", "--cmd", "echo {} {.} {/} {//} {/.} {#}", "dir/sub/file.tar.gz", "name", "/top.txt")
    assert result.exit_code == 0, result.stderr
    assert lines(result.stdout) == ["dir/sub/file.tar.gz dir/sub/file.tar file.tar.gz dir/sub file.tar 1",
                                    "name name name . name 2",
                                    "/top.txt /top top.txt / top 3"]


def test_a_template_without_placeholder_gets_the_item_last():
    template = Template("gzip -9")
    assert template.shell_text("a b.txt", 0) == "gzip -9 'a b.txt'"
    assert template.argv("a b.txt", 0) == ["gzip", "-9", "a b.txt"]


@pytest.mark.parametrize("text, direct", [
    ("gzip -9 {}", True), ("cp {} {}.bak", True), ("/usr/bin/printf %s {}", True),
    ("echo {}", False),            # a builtin of the shell: its echo, not /bin/echo
    ("gzip {} > {}.gz", False), ("a=1 env {}", False), ("ls ~", False), ("cat $HOME/{}", False),
    ("grep 'x y' {}", False), ("{} --version", False),
])
def test_only_plain_templates_skip_the_shell(text, direct):
    assert Template(text).direct is direct


def test_shell_variables_are_not_placeholders():
    assert Template("echo ${HOME} {}").shell_text("x", 0) == "echo ${HOME} x"


@pytest.mark.parametrize("template", ["{py} argv.py {{}} {{.}}",              # no shell: argv directly
                                      "{py} argv.py {{}} {{.}} | cat"])       # through /bin/sh
def test_hostile_items_are_one_argument_each_and_never_run(work, template):
    result = invoke("run", "--cmd", template.format(py=PY), "--", *HOSTILE)
    assert result.exit_code == 0, result.stderr
    got = [json.loads(line) for line in lines(result.stdout)]
    assert [args[0] for args in got] == HOSTILE
    assert all(len(args) == 2 for args in got)
    assert not (work / "pwned").exists()


def test_bytes_that_are_not_utf8_reach_the_command_as_they_were(work):
    """A file name that is not UTF-8, from the command line and from a file, in a real process."""
    name = b"caf\xe9 \xff.txt"
    (work / os.fsdecode(name)).write_bytes(b"content\n")
    (work / "names.txt").write_bytes(name + b"\n")
    for args in ([b"--", name], [b"-i", b"names.txt"]):
        child = subprocess.run([PY, "-m", "pmap", "run", "--cmd", "cat {} && printf '%s|' {}", *args], cwd=work,
                               capture_output=True, timeout=60)
        assert child.returncode == 0, child.stderr
        assert child.stdout == b"content\n" + name + b"|"


# ---- results and failures --------------------------------------------------------------------
def test_stdout_is_the_result_in_input_order_and_stderr_passes_through(work):
    result = invoke("run", "--cmd", "sleep 0.0$(( 5 - {} )); echo out {}; echo err {} >&2", "1", "2", "3", "4",
                    "-j", "4")
    assert result.exit_code == 0
    assert lines(result.stdout) == ["out 1", "out 2", "out 3", "out 4"]
    assert sorted(lines(result.stderr)) == ["err 1", "err 2", "err 3", "err 4"]


def test_a_non_zero_exit_fails_the_item_with_its_status_and_stderr_tail(work):
    result = invoke("run", "--cmd", "if [ {} = b ]; then echo one >&2; echo two >&2; exit 7; fi; echo {}",
                    "a", "b", "c")
    assert result.exit_code == 1
    assert lines(result.stdout) == ["a", "c"]  # the others went on (on-error skip is the default for commands)
    assert "pmap: item 1 ('b') failed: CommandFailed: exit status 7: one\ntwo" in result.stderr
    returned = invoke("run", "--cmd", "exit {}", "0", "3", "--on-error", "return")
    assert lines(returned.stdout)[0] == json.dumps({"index": 1, "item": "3", "error": {
        "type": "CommandFailed", "message": "exit status 3", "kind": "error"}})


def test_a_missing_program_fails_its_item_like_the_shell_says(work):
    direct = invoke("run", "--cmd", "no-such-program-xyz {}", "a")
    shell = invoke("run", "--cmd", "no-such-program-xyz {} && true", "a")
    assert direct.exit_code == shell.exit_code == 1
    assert "exit status 127: no-such-program-xyz: No such file or directory" in direct.stderr
    assert "exit status 127" in shell.stderr and "not found" in shell.stderr


def test_json_items_give_json_results_and_fields(work):
    result = invoke("run", "--json", "--cmd", "echo {name} is {age}", '{"name": "Ann Lee", "age": 40}',
                    '{"name": "$(touch pwned)", "age": 2}')
    assert result.exit_code == 0
    assert [json.loads(line) for line in lines(result.stdout)] == ["Ann Lee is 40", "$(touch pwned) is 2"]
    assert not (work / "pwned").exists()


def test_with_index_and_tag_prefix_every_line_of_a_command(work):
    result = invoke("run", "--cmd", "printf 'x\\ny\\n'; : {}", "a", "--with-index", "--tag")
    assert lines(result.stdout) == ["0\ta\tx", "0\ta\ty"]


@pytest.mark.timeout(120)
def test_timeout_kills_the_whole_process_group(work):
    pids = work / "pids"
    result = invoke("run", "--cmd", f"sleep 60 & echo $! >> {pids}; sleep 60; echo {{}}", "a", "b",
                    "--timeout", "0.5", "--retries", "1")
    assert result.exit_code == 1
    assert result.stderr.count("CommandTimeout: ran longer than its timeout of 0.5s; its process group was killed") == 2
    started = [int(p) for p in lines(pids.read_text())]
    assert len(started) == 4  # two items, each tried twice
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in started if psutil.pid_exists(p)], timeout=10)
    assert alive == []


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:pmap. the fork backend is forking:RuntimeWarning")
@pytest.mark.parametrize("backend", ["process", "fork", "manager"])
def test_every_backend_that_runs_a_function_runs_commands(work, backend):
    result = invoke("run", "--cmd", "echo $$ {}", "a", "b", "c", "-b", backend, "-j", "2")
    assert result.exit_code == 0, result.stderr
    out = [line.split() for line in lines(result.stdout)]
    assert [words[1] for words in out] == ["a", "b", "c"]


# ---- Ctrl-C and resume, in a real process ----------------------------------------------------
@pytest.mark.timeout(180)
def test_ctrl_c_mid_run_then_resume_runs_each_item_once(work):
    """SIGINT to a real `pmap run --cmd` in its own session (as a terminal's Ctrl-C reaches its
    foreground group): exit 130, no command left running; the rerun completes the output and runs
    only the items without a result."""
    calls, journal, out = work / "calls.log", work / "run.journal", work / "out.txt"
    command = ["run", "--cmd", f"sleep 0.1; echo {{}} >> {calls}; echo result {{}}", "--range", "60",
               "-j", "3", "--journal", str(journal), "--output", str(out), "--joblog", "jobs.tsv"]
    child = pmap_process(*command, cwd=work, start_new_session=True)
    while not journal.exists() or len(journal.read_text().splitlines()) < 8:
        assert child.poll() is None, child.communicate()
    os.killpg(child.pid, signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert b"Traceback" not in err and b"pmap: interrupted" in err
    assert commands_left(calls) == []  # every running command's group was killed
    done_before = {json.loads(line)["i"] for line in lines(journal.read_text())[1:]}
    assert 0 < len(done_before) < 60

    again = pmap_process(*command, cwd=work)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert b"have results (kept)" in err
    assert lines(out.read_text()) == [f"result {i}" for i in range(60)]
    ran = [int(line) for line in lines(calls.read_text())]
    assert set(ran) == set(range(60))
    assert not {i for i in done_before if ran.count(i) > 1}  # nothing finished ran twice
    log = [line.split("\t") for line in lines((work / "jobs.tsv").read_text())]
    assert log[0][:3] == ["index", "item", "start"] and log.count(log[0]) == 1  # one header across runs
    assert {int(row[0]) for row in log[1:] if row[4] == "ok"} == set(range(60))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["thread", "fork", "process"])
def test_ctrl_c_leaves_no_command_running_on_any_local_backend(work, backend):
    marker = work / "started"
    child = pmap_process("run", "--cmd", f"echo {{}} >> {marker}; sleep 60", "--range", "6", "-b", backend,
                         "-j", "2", cwd=work, start_new_session=True)
    while not marker.exists() or len(marker.read_text().split()) < 2:
        assert child.poll() is None, child.communicate()
    os.killpg(child.pid, signal.SIGINT)  # as a terminal's Ctrl-C: pmap and its workers, not the commands
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert commands_left(marker) == []


@pytest.mark.timeout(120)
def test_halt_now_kills_the_commands_still_running(work):
    marker = work / "started"
    result = invoke("run", "--cmd", f"echo {{}} >> {marker}; if [ {{}} = 3 ]; then exit 1; fi; sleep 60",
                    "--range", "8", "-j", "4", "--halt", "now,fail=1", "--unordered")
    assert result.exit_code == 3
    assert "pmap: stopped by --halt now,fail=1: 1 item(s) failed" in result.stderr
    assert commands_left(marker) == []
