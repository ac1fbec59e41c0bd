"""What an installed pmap holds."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_the_built_package_ships_py_typed(tmp_path):
    pytest.importorskip("setuptools", reason="the build backend is setuptools")
    # setuptools' build_py copies what a wheel would hold: the modules and the package data
    code = f"import sys, setuptools; sys.argv = ['setup.py', '-q', 'build_py', '-d', {str(tmp_path)!r}]; setuptools.setup()"
    build = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert build.returncode == 0, build.stderr
    assert (tmp_path / "pmap" / "cli" / "run.py").is_file()  # subpackages too
    assert (tmp_path / "pmap" / "backends" / "manager" / "driver.py").is_file()
    assert (tmp_path / "pmap" / "py.typed").is_file()  # PEP 561: without it a type checker ignores pmap's annotations
