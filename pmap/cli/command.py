"""`pmap run --cmd TEMPLATE`: a shell command per item, with GNU parallel's placeholders.

The template is shell text; each value put into it is quoted with shlex.quote, so an item is one
word to the shell whatever it holds (spaces, quotes, `$(...)`, newlines, bytes that are not UTF-8)
and is never run as code. A template made only of plain words runs without a shell (the same
argv, one process fewer); anything else runs as `/bin/sh -c TEXT`.

Each command starts in a session of its own (start_new_session), so a timeout, --halt or Ctrl-C
ends its whole process group, whatever it started.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
from typing import Callable

from .common import UsageError

SHELL = "/bin/sh"
STDERR_TAIL_LINES = 5
STDERR_TAIL_CHARS = 2000
TERM_GRACE_SECONDS = 0.2        # between SIGTERM and SIGKILL to a timed-out command's group
DRAIN_SECONDS = 2.0             # reading what a killed group left in its pipes, at most

# {}, {.}, {/}, {//}, {/.}, {#}, and {NAME} / {N} with the same modifiers, for records.
# A `{` right after `$` is the shell's own ${...} and is left alone.
PLACEHOLDER = re.compile(r"(?<!\$)\{(#|[A-Za-z_][A-Za-z0-9_]*|[0-9]+|)(\.|/\.|//|/)?\}")
# A template of these characters alone means the same split on spaces as to the shell.
PLAIN_WORDS = re.compile(r"[A-Za-z0-9_\-./,:@%+= ]*")
SHELL_WORDS = frozenset(
    ". : [ [[ ]] ! { } alias bg break case cd command continue do done echo elif else esac eval exec exit "
    "export false fc fg fi for function getopts hash if in jobs kill local printf pwd read readonly return "
    "select set shift test then time times trap true type ulimit umask unalias unset until wait while".split())


class CommandFailed(Exception):
    """A command exited non-zero or was killed by a signal. Its message is the exit status and the
    tail of its stderr; `attempts` holds the job log's record of each try."""

    def __init__(self, message: str, status: int | None, signal_name: str | None = None,
                 attempts: list | None = None):
        super().__init__(message)
        self.status = status
        self.signal_name = signal_name
        self.attempts = attempts or []

    def __reduce__(self):
        return (type(self), (self.args[0], self.status, self.signal_name, self.attempts))


class CommandTimeout(CommandFailed, TimeoutError):
    """A command ran past --timeout; its process group was killed."""


# ---- the template --------------------------------------------------------------------------
def _text(value) -> str:
    """A value as a command sees it: strings as they are, other JSON values as JSON text."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _modify(text: str, modifier: str | None) -> str:
    if not modifier:
        return text
    if modifier == ".":
        return _without_extension(text)
    if modifier == "/":
        return _basename(text)
    if modifier == "//":
        head = text.rstrip("/").rpartition("/")[0] if "/" in text.rstrip("/") else "."
        return head or "/"
    return _without_extension(_basename(text))  # "/."


def _basename(text: str) -> str:
    stripped = text.rstrip("/")
    return stripped.rpartition("/")[2] if stripped else text


def _without_extension(text: str) -> str:
    head, slash, name = text.rpartition("/")
    stem, dot, _ = name.rpartition(".")
    return head + slash + stem if dot and stem else text


class Template:
    """A parsed --cmd: fills placeholders for one item, as shell text and, for plain templates,
    as an argv that needs no shell."""

    __slots__ = ("text", "parts", "direct", "appended")

    def __init__(self, text: str):
        if not text.strip():
            raise UsageError("--cmd needs a command, such as 'gzip -9 {}'")
        self.text = text
        # Like GNU parallel, a command without a placeholder gets the item as its last argument(s).
        self.appended = PLACEHOLDER.search(text) is None
        template = text + " {}" if self.appended else text
        self.parts: list = []   # literal strings and (key, modifier) pairs
        position = 0
        for match in PLACEHOLDER.finditer(template):
            self.parts.append(template[position:match.start()])
            self.parts.append((match.group(1), match.group(2)))
            position = match.end()
        self.parts.append(template[position:])
        literal = "".join(p for p in self.parts if isinstance(p, str))
        words = template.split()
        self.direct = bool(PLAIN_WORDS.fullmatch(literal)) and bool(words) \
            and "=" not in words[0] and words[0] not in SHELL_WORDS and not words[0].startswith("{")

    def __reduce__(self):
        return (type(self), (self.text,))

    def names(self) -> list[str]:
        """The field names the template uses ({name}, not {} {#} or {1})."""
        return [key for key, _ in (p for p in self.parts if isinstance(p, tuple))
                if key and key != "#" and not key.isdigit()]

    def _values(self, key: str, modifier: str | None, item, index: int) -> list[str] | None:
        """The words a placeholder stands for, or None to leave it as written."""
        if key == "#":
            return None if modifier else [str(index + 1)]
        if isinstance(item, dict):
            values = list(item.values())
            if key == "":
                return [_modify(_text(v), modifier) for v in values]
            if key.isdigit():
                number = int(key)
                return [_modify(_text(values[number - 1]), modifier)] if 1 <= number <= len(values) else None
            return [_modify(_text(item[key]), modifier)] if key in item else None
        if isinstance(item, (list, tuple)):
            if key == "":
                return [_modify(_text(v), modifier) for v in item]
            if key.isdigit():
                number = int(key)
                return [_modify(_text(item[number - 1]), modifier)] if 1 <= number <= len(item) else None
            return None
        if key == "" or key == "1":
            return [_modify(_text(item), modifier)]
        return None

    def shell_text(self, item, index: int) -> str:
        """The command with each value quoted as one shell word."""
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            key, modifier = part
            values = self._values(key, modifier, item, index)
            if values is None:
                out.append("{" + key + (modifier or "") + "}")
            else:
                out.append(" ".join(shlex.quote(v) for v in values) if values else "''")
        return "".join(out)

    def argv(self, item, index: int) -> list[str] | None:
        """The argv of a plain template, or None when this item needs the shell."""
        if not self.direct:
            return None
        words: list[str] = [""]
        started = False  # whether the current word has begun (an empty value is still a word)
        for part in self.parts:
            if isinstance(part, str):
                for k, piece in enumerate(part.split(" ")):
                    if k:
                        if started:
                            words.append("")
                        started = False
                    if piece:
                        words[-1] += piece
                        started = True
                continue
            values = self._values(*part, item, index)
            if values is None or len(values) != 1:
                return None  # left as written, or several words: the shell's splitting decides
            words[-1] += values[0]
            started = True
        if not started:
            words.pop()
        return words


# ---- running one item ----------------------------------------------------------------------
_RUNNING: dict = {}          # pid -> Popen of every command running in this process
_RUNNING_LOCK = threading.Lock()
_STOPPING = False            # set by kill_running_commands: no command starts after it
_STARTING = 0                # commands being started (in Popen) and not yet in _RUNNING
STOP_WAIT_SECONDS = 2.0      # how long kill_running_commands waits for those being started
_WORKER_NAME: tuple = (None, "")


def worker_name() -> str:
    """host:pid of this process, and the thread's name when it is not the main thread."""
    global _WORKER_NAME
    pid = os.getpid()
    if _WORKER_NAME[0] != pid:
        _WORKER_NAME = (pid, f"{socket.gethostname()}:{pid}")
    thread = threading.current_thread()
    return _WORKER_NAME[1] if thread is threading.main_thread() else f"{_WORKER_NAME[1]}/{thread.name}"


def allow_commands() -> None:
    """A run starts: commands may start (again, in a process that ran an earlier run)."""
    global _STOPPING
    with _RUNNING_LOCK:
        _STOPPING = False


def kill_running_commands() -> int:
    """Kill the process group of every command this process is running (Ctrl-C, --halt now), and
    keep any command from starting after it. Returns how many groups were signalled."""
    global _STOPPING
    with _RUNNING_LOCK:
        _STOPPING = True
    deadline = time.monotonic() + STOP_WAIT_SECONDS
    while _STARTING and time.monotonic() < deadline:  # a command in Popen now is in _RUNNING soon
        time.sleep(0.005)
    with _RUNNING_LOCK:
        running = list(_RUNNING.values())
    for process in running:
        _kill_group(process, signal.SIGKILL)
    return len(running)


def _kill_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:  # the group has already ended: nothing left to kill
        pass
    except PermissionError:  # the leader exited and its pid was reused by another user's process
        pass


def _tail(data: bytes) -> str:
    text = data.decode("utf-8", "replace").rstrip()
    lines = text.splitlines()[-STDERR_TAIL_LINES:]
    tail = "\n".join(lines)
    return tail[-STDERR_TAIL_CHARS:]


def decode(data: bytes) -> str:
    """A command's output as text that keeps every byte (undecodable ones as surrogates)."""
    return data.decode("utf-8", "surrogateescape")


class CommandRunner:
    """Runs the command of one (index, item) pair and returns (index, output line, extras).

    A top-level class that pickles by reference, so every backend that runs functions runs it.
    Retries and the timeout are its own: each try gets the full timeout, a timed-out command's
    process group is killed (SIGTERM, then SIGKILL), and every try is recorded for the job log."""

    __slots__ = ("template", "timeout", "retries", "backoff", "render")

    def __init__(self, template: Template, timeout: float | None, retries: int, backoff: float,
                 render: Callable):
        self.template = template
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.render = render

    def __reduce__(self):
        return (type(self), (self.template, self.timeout, self.retries, self.backoff, self.render))

    def __call__(self, pair):
        index, item = pair
        shell_text = self.template.shell_text(item, index)
        argv = self.template.argv(item, index)
        attempts = []
        for attempt in range(1, self.retries + 2):
            if attempt > 1 and self.backoff:
                time.sleep(self.backoff * 2 ** (attempt - 2))
            try:
                stdout, stderr = self._run_once(argv, shell_text, attempts, attempt)
            except CommandFailed as exc:
                if attempt <= self.retries:
                    continue
                exc.attempts = attempts
                raise
            return index, self.render(index, item, decode(stdout)), {
                "stderr": decode(stderr) if stderr else "", "attempts": attempts, "command": shell_text}
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _run_once(self, argv, shell_text: str, attempts: list, attempt: int):
        started_at, started = time.time(), time.perf_counter()
        worker = worker_name()

        def record(outcome: str, status, error: str = "") -> None:
            attempts.append({"start": started_at, "seconds": time.perf_counter() - started, "outcome": outcome,
                             "exit": status, "attempt": attempt, "worker": worker, "command": shell_text,
                             "error": error})
        global _STARTING
        with _RUNNING_LOCK:
            if _STOPPING:
                record("cancelled", None, "not started: the run was stopping")
                raise CommandFailed("not started: the run was stopping", None)
            _STARTING += 1
        try:
            process = subprocess.Popen(argv if argv is not None else [SHELL, "-c", shell_text],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       start_new_session=True)
        except OSError as exc:  # only without the shell: the program is missing or not executable
            with _RUNNING_LOCK:
                _STARTING -= 1
            status = 127 if isinstance(exc, FileNotFoundError) else 126
            message = f"{argv[0]}: {exc.strerror}"
            record("failed", status, message)
            raise CommandFailed(f"exit status {status}: {message}", status) from None
        except BaseException:  # re-raised: only the count is undone
            with _RUNNING_LOCK:
                _STARTING -= 1
            raise
        with _RUNNING_LOCK:
            _STARTING -= 1
            _RUNNING[process.pid] = process
            stopping = _STOPPING
        if stopping:  # started while the run was being stopped: it must not outlive the run
            _kill_group(process, signal.SIGKILL)
        try:
            try:
                stdout, stderr = process.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _kill_group(process, signal.SIGTERM)
                try:
                    process.wait(TERM_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    pass  # it ignored SIGTERM: SIGKILL follows
                _kill_group(process, signal.SIGKILL)
                stdout, stderr = _drain(process)
                tail = _tail(stderr)
                record("timeout", None, tail)
                raise CommandTimeout(f"ran longer than its timeout of {self.timeout:g}s; its process group "
                                     "was killed" + (f"; stderr ends: {tail}" if tail else ""), None, "SIGKILL")
        except BaseException:
            _kill_group(process, signal.SIGKILL)  # Ctrl-C, a cancel: the command must not outlive its item
            raise
        finally:
            with _RUNNING_LOCK:
                _RUNNING.pop(process.pid, None)
        status = process.returncode
        if status == 0:
            record("ok", 0)
            return stdout, stderr
        tail = _tail(stderr)
        if status < 0:
            name = _signal_name(-status)
            record("failed", name, tail)
            raise CommandFailed(f"killed by {name}" + (f": {tail}" if tail else ""), None, name)
        record("failed", status, tail)
        raise CommandFailed(f"exit status {status}" + (f": {tail}" if tail else ""), status)


def _drain(process: subprocess.Popen) -> tuple[bytes, bytes]:
    """What a killed command's pipes still hold. A process that left the group (setsid) may keep
    them open: then give up after DRAIN_SECONDS rather than wait for it."""
    try:
        return process.communicate(timeout=DRAIN_SECONDS)
    except subprocess.TimeoutExpired:
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        process.wait()
        return b"", b""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
