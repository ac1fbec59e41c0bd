"""Every entry point builds its options from the one declaration in pmap.options, and refuses
what it refuses, in the same words."""
import ast
import inspect
import math
from pathlib import Path

import pytest

import pmap
from pmap.options import DEFAULTS, FIELD_NAMES, Options
from workloads import square

PACKAGE = Path(pmap.__file__).parent


@pytest.mark.parametrize("entry", [pmap.pmap, pmap.imap, pmap.starmap, pmap.apmap, pmap.aimap, pmap.explain])
def test_public_signatures_spell_out_every_option_with_its_declared_default(entry):
    params = inspect.signature(entry).parameters
    # apmap/aimap run on the caller's loop and explain chooses the backend: neither takes one
    expected = [n for n in FIELD_NAMES if n != "backend_options"
                and not (n == "backend" and entry in (pmap.apmap, pmap.aimap, pmap.explain))]
    keyword_only = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keyword_only == expected
    for name in expected:
        default = params[name].default
        wanted = "return" if (entry is pmap.explain and name == "on_error") else DEFAULTS[name]
        assert default == wanted, (entry.__name__, name)


def test_pool_and_executor_take_the_policy_options_and_check_them():
    for make in (pmap.Pool, pmap.Executor):
        with pytest.raises(ValueError, match="backoff must be a finite"):
            make(backend="thread", backoff=math.nan)
        with pytest.raises(ValueError, match="on_error must be one of"):
            make(backend="thread", on_error="ignore")
    with pmap.Pool(backend="thread", workers=2, retries=1, timeout=math.inf) as pool:
        assert pool.map(square, [1, 2]) == [1, 4]
        with pytest.raises(TypeError):
            pool.map(square, [1], retries=3)  # the policy is the Pool's, not one call's


def test_an_infinite_timeout_is_no_timeout():
    assert Options(timeout=math.inf).timeout is None
    out = pmap.pmap(square, range(5), backend="serial", timeout=float("inf"))
    assert out == [0, 1, 4, 9, 16]


def test_options_are_frozen_and_normalised():
    options = Options(retry_on=KeyError, initargs=[1, 2], backend_options={"x": 1})
    assert options.retry_on == (KeyError,)
    assert options.initargs == (1, 2)
    with pytest.raises(Exception):
        options.retries = 3
    with pytest.raises(TypeError):
        options.backend_options["y"] = 2


def test_explain_refuses_a_misspelt_option_instead_of_ignoring_it():
    with pytest.raises(TypeError, match="retires"):
        pmap.explain(square, range(10), retires=2)
    with pytest.raises(ValueError, match="backoff must be a finite"):
        pmap.explain(square, range(10), backoff=math.inf)


def test_compare_refuses_a_bad_option_before_running_anything():
    calls = []

    def counted(x):
        calls.append(x)
        return x

    with pytest.raises(ValueError, match="backoff must be a finite"):
        pmap.compare(counted, range(5), backends=["thread"], backoff=-1)
    with pytest.raises(TypeError, match="unknown option.*chunk_size"):
        pmap.compare(counted, range(5), backends=["thread"], chunk_size=2)
    assert calls == []


def _imported_modules(path: Path) -> set:
    """The pmap modules `path` imports (relative imports, at any depth in the file)."""
    names = set()
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if package[-1] == "__init__":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + (1 if path.name == "__init__.py" else 0)]
            if node.module:
                names.add(".".join((*base, *node.module.split("."))))
            else:
                names.update(".".join((*base, alias.name)) for alias in node.names)
    return names


def test_no_import_cycle_among_the_package_modules():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {name: {m for m in _imported_modules(path) if m in modules and m != name}
             for name, path in modules.items()}

    def reaches(start, goal, seen):
        for nxt in graph[start]:
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                if reaches(nxt, goal, seen):
                    return True
        return False

    # a package's __init__ may import its own submodules; a cycle is two modules that need each other
    cycles = sorted((a, b) for a in graph for b in graph[a]
                    if not b.startswith(a + ".") and not a.startswith(b + ".") and reaches(b, a, set()))
    assert not cycles, f"modules that import each other: {cycles}"


# The command line's flag for each option (`ordered` is its negation, `--unordered`).
CLI_FLAGS = {"backend": "--backend", "workers": "--workers", "chunksize": "--chunksize", "ordered": "--unordered",
             "timeout": "--timeout", "retries": "--retries", "retry_on": "--retry-on", "backoff": "--backoff",
             "on_error": "--on-error", "progress": "--progress", "max_ahead_bytes": "--max-ahead-bytes",
             "initializer": "--initializer", "initargs": "--initargs", "seed": "--seed", "backend_options": "--option",
             "inner_threads": "--option"}  # -o inner_threads=N: Options moves it to its field


def test_every_option_is_reachable_from_the_command_line():
    from typer.testing import CliRunner
    from pmap.cli import app
    assert set(CLI_FLAGS) == set(FIELD_NAMES)  # a new option needs its flag
    help_text = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).stdout
    missing = [flag for flag in CLI_FLAGS.values() if flag not in help_text]
    assert not missing
