"""What a person reads from a worker: log records, warnings and tracebacks of a function
defined in the script they run, on every process backend as on fork."""
import logging
import os
import subprocess
import sys
import time
import traceback

import pytest

import pmap

SCRIPT = """
import logging, sys, warnings
import pmap

log = logging.getLogger("work")

def work(x):
    log.info("working on %s", x)
    if x == 2:
        warnings.warn("two is a careful number")
    if x == 3:
        raise ValueError("three is bad")
    return x

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="LOG|%(name)s|%(message)s")
    out = pmap.pmap(work, range(4), backend=sys.argv[1], workers=2, on_error="return")
    print(out[3].traceback)
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "work_script.py"
    path.write_text(SCRIPT)
    return path


@pytest.mark.parametrize("backend", ["process", "pool", "fork"])
def test_log_records_warnings_and_tracebacks_of_a_main_function_name_its_file(script, backend):
    done = subprocess.run([sys.executable, str(script), backend], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    logged = sorted(line for line in done.stderr.splitlines() if line.startswith("LOG|"))
    assert logged == [f"LOG|work|working on {x}" for x in range(4)]  # the caller's level and format
    assert f"{script}:10: UserWarning: two is a careful number" in done.stderr
    assert f'File "{script}", line 12, in work' in done.stdout
    assert 'raise ValueError("three is bad")' in done.stdout  # the source line is found too
    assert "<dynamic-code>" not in done.stdout + done.stderr


def fails_on_three(x):
    if x == 3:
        raise ValueError("three is bad")
    return x


@pytest.mark.parametrize("backend", ["serial", "thread", "process"])
def test_a_raised_item_error_carries_no_engine_frames(backend):
    with pytest.raises(ValueError, match="three is bad") as info:
        pmap.pmap(fails_on_three, range(6), backend=backend, workers=2)
    files = [os.path.basename(frame.filename) for frame in traceback.extract_tb(info.value.__traceback__)]
    assert not {"engine.py", "errors.py", "_worker.py"} & set(files), files
    if backend != "process":  # run here: the traceback goes on into the function
        assert files[-1] == os.path.basename(__file__)


def logs_its_item(x):
    import logging
    logging.getLogger("pmap.test.worker").info("item %d from pid %d", x, os.getpid())
    logging.getLogger("pmap.test.worker").debug("below the caller's level")
    return os.getpid()


@pytest.mark.parametrize("backend", ["process", "pool", "fork", "manager"])
def test_worker_log_records_reach_the_callers_own_handlers(caplog, backend):
    caplog.set_level("INFO")  # an in-memory handler on the caller's root logger
    pids = pmap.pmap(logs_its_item, range(6), backend=backend, workers=2)
    records = [r for r in caplog.records if r.name == "pmap.test.worker"]
    assert sorted(r.getMessage() for r in records) == sorted(f"item {x} from pid {pid}" for x, pid in enumerate(pids))
    assert {r.process for r in records} == set(pids) and os.getpid() not in pids  # logged in the workers
    assert all(r.levelname == "INFO" for r in records)


def warns_on_a_named_logger(x):
    logging.getLogger("pmap.test.named").warning("item %d", x)
    return x


@pytest.mark.parametrize("backend", ["fork", "process"])
def test_a_record_on_a_logger_with_its_own_file_is_written_once(tmp_path, backend):
    # a forked worker inherits the caller's file handler: it must not write to the file as well
    path = tmp_path / "run.log"
    handler = logging.FileHandler(path)
    logger = logging.getLogger("pmap.test.named")
    logger.addHandler(handler)
    try:
        pmap.pmap(warns_on_a_named_logger, range(5), backend=backend, workers=2)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert sorted(path.read_text().splitlines()) == [f"item {x}" for x in range(5)]


def last_words(arg):
    how, x = arg
    logging.getLogger("pmap.test.last_words").warning("item %d starts", x)
    if x == 3:
        if how == "dies":
            os._exit(3)
        time.sleep(3600)
    return x


@pytest.mark.parametrize("how", ["dies", "hangs"])
@pytest.mark.parametrize("backend", ["process", "pool", "fork", "manager"])
def test_a_record_written_just_before_a_worker_dies_or_hangs_reaches_the_caller(caplog, backend, how):
    # records are sent as they are written, not with the task's result, which never comes
    caplog.set_level("WARNING")
    timeout = 2 if how == "hangs" else None
    out = pmap.pmap(last_words, [(how, x) for x in range(6)], backend=backend, workers=2, chunksize=1,
                    timeout=timeout, on_error="return")
    assert out[3].kind == ("crash" if how == "dies" else "timeout")
    messages = {r.getMessage() for r in caplog.records if r.name == "pmap.test.last_words"}
    assert messages == {f"item {x} starts" for x in range(6)}


class Breaks(logging.Handler):
    def emit(self, record):
        raise RuntimeError("this handler is broken")


@pytest.mark.parametrize("backend", ["process", "pool", "fork", "manager"])
def test_a_caller_handler_that_raises_is_reported_as_logging_does_and_the_run_goes_on(capsys, caplog, backend):
    # the record belongs to no item once it is sent as written: Handler.handleError reports it,
    # and the caller's other handlers still get it
    caplog.set_level("INFO")
    logger = logging.getLogger("pmap.test.worker")
    broken = Breaks()
    logger.addHandler(broken)
    try:
        pids = pmap.pmap(logs_its_item, range(4), backend=backend, workers=2)
    finally:
        logger.removeHandler(broken)
    assert len(pids) == 4
    assert sorted(r.getMessage() for r in caplog.records if r.name == "pmap.test.worker") == sorted(
        f"item {x} from pid {pid}" for x, pid in enumerate(pids))
    assert capsys.readouterr().err.count("RuntimeError: this handler is broken") == 4
