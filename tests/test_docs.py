"""The documentation site builds without a warning, and its pages' Python examples run.

The build needs the `docs` extra (`pip install -e '.[docs]'`); without it that test is skipped,
saying so. The examples of every page under docs/ run as the README's do (tests/test_readme.py:
a block runs as a script, or under pytest, or is marked as not run with the reason)."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from test_readme import ROOT, python_blocks, run_block

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
DOCS_TOOLS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def missing_docs_tools():
    missing = []
    for name in DOCS_TOOLS:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            missing.append(name)
    return missing


@pytest.mark.timeout(300)
@pytest.mark.skipif(bool(missing_docs_tools()),
                    reason=f"the docs extra is not installed (missing {', '.join(missing_docs_tools())}): "
                           "pip install -e '.[docs]'")
def test_the_site_builds_with_warnings_as_errors(tmp_path):
    child = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=ROOT, capture_output=True, text=True, timeout=280,
                           env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert child.returncode == 0, child.stdout + child.stderr
    assert "WARNING" not in child.stderr, child.stderr
    reference = (tmp_path / "site" / "reference" / "index.html").read_text()
    import pmap
    for name in pmap.__all__:  # every public name has its entry, generated from its docstring
        assert re.search(rf'class="doc doc-heading">\s*pmap\.{name}\s*<', reference), f"pmap.{name} has no entry"


def test_every_page_is_in_the_nav_or_left_for_a_reason():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in PAGES:
        relative = page.relative_to(DOCS).as_posix()
        assert f" {relative}" in nav, f"docs/{relative} is not in mkdocs.yml's nav"


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("mark, code", [block for page in PAGES for block in python_blocks(page)])
def test_docs_example_runs(tmp_path, mark, code):
    run_block(tmp_path, mark, code)


@pytest.mark.parametrize("module", ["pmap", "pmap.api", "pmap.auto"])
def test_the_docstrings_examples_run(module):
    import doctest
    import importlib
    outcome = doctest.testmod(importlib.import_module(module))
    assert outcome.attempted >= 1 and outcome.failed == 0, outcome


def test_help_explains_every_option_of_pmap():
    import inspect

    import pmap
    doc = inspect.getdoc(pmap.pmap)
    assert "README" not in doc
    for name in inspect.signature(pmap.pmap).parameters:
        assert re.search(rf"^{name}\b.*:", doc, re.M) or (name == "backend_options" and "**backend_options" in doc), \
            f"help(pmap.pmap) does not explain {name}"


def test_every_backend_option_is_documented():
    import inspect

    from pmap.backends.base import backend_names, resolve_backend_class
    table = (DOCS / "guide" / "backends.md").read_text().split("## Backend options", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    common = {"self", "workers", "initializer", "initargs", "inner_threads", "options"}
    for name in backend_names():
        try:
            cls = resolve_backend_class(name)
        except Exception:  # a backend whose package is missing (dask): its options are still listed
            continue
        for option in inspect.signature(cls.__init__).parameters:
            if option in common:
                continue
            assert any(f"`{name}`" in row.split("|")[1] and f"`{option}`" in row.split("|")[2] for row in rows), \
                f"docs/guide/backends.md does not list {name}'s option {option}"
