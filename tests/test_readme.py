"""The README's Python examples run as shown.

Each ```python block runs as a script in a fresh interpreter, in an empty directory. A block
may be marked on the line before it: `<!-- readme-test: pytest -->` runs it as a test file
under pytest; `<!-- readme-test: not run (why) -->` skips it, saying why. tests/test_docs.py
runs the blocks of the pages in docs/ the same way."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mark>[^>]*?) -->\n)?```python\n(?P<code>.*?)^```", re.S | re.M)


def python_blocks(path: Path):
    """Each ```python block of `path` as a pytest param (mark, code), its id the file and line."""
    text = path.read_text()
    blocks = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code")) + 1
        mark = match.group("mark") or "run"
        name = path.relative_to(ROOT).as_posix()
        blocks.append(pytest.param(mark, match.group("code"), id=f"{name}:{line}",
                                   marks=[pytest.mark.skip(reason=f"{name} marks it {mark}")]
                                   if mark.startswith("not run") else []))
    return blocks


def run_block(tmp_path, mark, code):
    """Run one block as its mark says; fail with its output unless it exits cleanly."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if mark == "pytest":
        (tmp_path / "test_example.py").write_text(code)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"]
    else:
        assert mark == "run", f"unknown mark {mark!r}"
        (tmp_path / "example.py").write_text(code)
        command = [sys.executable, "example.py"]
    child = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert child.returncode == 0, f"{child.stdout}\n{child.stderr}"
    assert "Traceback" not in child.stderr
    if mark == "pytest":
        assert re.search(r"\b\d+ passed", child.stdout) and "skipped" not in child.stdout, child.stdout


def test_the_tour_is_found_and_runs():
    blocks = python_blocks(README)
    assert blocks and not blocks[0].marks, "the README's first Python block (the tour) must run"


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("mark, code", python_blocks(README))
def test_readme_example_runs(tmp_path, mark, code):
    run_block(tmp_path, mark, code)


def test_the_readme_starts_with_the_two_commands_and_stays_short():
    lines = README.read_text().splitlines()
    assert len(lines) < 200, f"the README has {len(lines)} lines; the rest belongs in docs/"
    commands = [line for line in lines[:8] if line.startswith("python3 -m venv .venv")]
    assert len(commands) == 2 and "-m pytest" in commands[1], commands  # CI runs the first line holding -m pytest
