"""A user's script type-checks against the installed package: py.typed is shipped and the
public functions are typed (generic in the result, with `.stats` on the returned list)."""
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pmap

pytest.importorskip("mypy", reason="mypy is in the test extra; without it there is no checker to run")

USER_SCRIPT = '''
import pmap


def square(x: int) -> int:
    return x * x


def main() -> None:
    out = pmap.pmap(square, range(10), backend="thread")
    total: int = sum(out)
    print(total, out.stats.items_done)
    for value in pmap.imap(square, [1, 2], backend="serial"):
        doubled: int = value * 2
        print(doubled)
    print(pmap.starmap(pow, [(2, 3)], backend="serial"))
    with pmap.Pool(backend="thread", workers=2) as pool:
        again: list[int] = pool.map(square, [1, 2])
        print(again)
    failures = [r for r in pmap.pmap(square, [1], on_error="return") if isinstance(r, pmap.Failure)]
    print(failures, pmap.explain(square, range(3)).backend)
    # every documented form of workers and progress, and the backends listing
    adaptive: list[int] = pmap.pmap(square, range(3), backend="thread", workers="adaptive")
    bounded = pmap.pmap(square, range(3), backend="thread", workers=pmap.Adaptive(maximum=8))
    labelled = pmap.pmap(square, range(3), backend="thread", progress="squaring")
    called = pmap.pmap(square, range(3), backend="thread", progress=lambda done, total: None)
    available = [info.name for info in pmap.backends() if info.available]
    print(adaptive, bounded, labelled, called, available)
'''

# The result type is known, so a wrong use of it is caught (it would pass were it Any).
WRONG_USE = '''
import pmap


def square(x: int) -> int:
    return x * x


name: str = pmap.pmap(square, [1])[0]
'''


# A value no signature accepts is still refused (the aliases are not Any).
WRONG_OPTION = '''
import pmap


def square(x: int) -> int:
    return x * x


pmap.pmap(square, [1], workers="many")
pmap.pmap(square, [1], on_error="ignore")
'''


def _mypy(tmp_path: Path, source: str | dict[str, str], *flags: str) -> subprocess.CompletedProcess:
    """Check `source` as user.py, or each of {file name: source} as its own module, in one run."""
    site = tmp_path / "site"  # an installed copy: a checker reads it as a third-party package
    if not (site / "pmap").exists():
        shutil.copytree(Path(pmap.__file__).parent, site / "pmap", ignore=shutil.ignore_patterns("__pycache__"))
    sources = source if isinstance(source, dict) else {"user.py": source}
    for name, text in sources.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return subprocess.run(
        [sys.executable, "-m", "mypy", *(flags or ("--strict",)), "--no-incremental", "--python-executable",
         sys.executable, *sources], capture_output=True, text=True, cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=300)


def test_py_typed_is_shipped_in_the_package():
    assert (Path(pmap.__file__).parent / "py.typed").exists()


@pytest.fixture(scope="module")
def strict_check(tmp_path_factory):
    """One `mypy --strict` run over the three scripts below, each its own module: a run costs
    seconds of loading stubs, and errors name their file. {file name: its error lines}."""
    sources = {"user.py": USER_SCRIPT, "wrong_use.py": WRONG_USE, "wrong_option.py": WRONG_OPTION}
    result = _mypy(tmp_path_factory.mktemp("strict"), sources)
    assert result.returncode in (0, 1) and f" {len(sources)} source files" in result.stdout, \
        result.stdout + result.stderr  # mypy ran to its end over every file, rather than crashed
    return {name: [line for line in result.stdout.splitlines() if line.startswith(f"{name}:")] for name in sources}


@pytest.mark.timeout(300)  # the first of these pays for the mypy run
def test_a_user_script_passes_mypy_strict(strict_check):
    assert strict_check["user.py"] == []


@pytest.mark.timeout(300)  # the first of these pays for the mypy run
def test_the_result_type_is_not_any(strict_check):
    errors = "\n".join(strict_check["wrong_use.py"])
    assert 'Incompatible types in assignment (expression has type "int", variable has type "str")' in errors


@pytest.mark.timeout(300)  # the first of these pays for the mypy run
def test_a_value_outside_the_documented_forms_is_refused(strict_check):
    errors = "\n".join(strict_check["wrong_option.py"])
    assert 'Argument "workers" to "pmap" has incompatible type' in errors
    assert 'Argument "on_error" to "pmap" has incompatible type' in errors


@pytest.mark.timeout(300)
def test_the_readmes_examples_type_check(tmp_path):
    from test_readme import README, ROOT, python_blocks
    # One mypy run over every example, each its own module: a run per example cost a minute or
    # more of the suite in loading the same stubs again. Errors name the file, so the block.
    blocks = {}
    for block in [block for page in [README, *sorted((ROOT / "docs").rglob("*.md"))] for block in python_blocks(page)]:
        mark, code = block.values
        if block.marks:  # marked not run: a transcript, not a program
            continue
        blocks[f"example_{len(blocks)}.py"] = (block.id, code)
    result = _mypy(tmp_path, {name: code for name, (_, code) in blocks.items()},
                   "--check-untyped-defs", "--ignore-missing-imports")
    failing = {block_id for name, (block_id, _) in blocks.items() if re.search(rf"^{re.escape(name)}:\d+: error", result.stdout, re.M)}
    assert result.returncode == 0, f"blocks {sorted(failing)}:\n{result.stdout}{result.stderr}"
    assert len(blocks) >= 3
