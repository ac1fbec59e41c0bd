"""Shell completion of `pmap run`'s values: backend names, output formats, and TARGET.

TARGET completes to directories, `file.py:` and `module:` names, and after the colon to the
functions and classes the file defines. The file is read with `ast`, never imported: completing
a word must not run the user's code.
"""
from __future__ import annotations

import ast
import os


def complete_backend(incomplete: str) -> list[tuple[str, str]]:
    from ..backends.base import backends
    names = [("auto", "measure the first items and choose")]
    for info in backends():
        names.append((info.name, info.kind if info.available else f"unavailable: {info.reason}"))
    return [(name, help) for name, help in names if name.startswith(incomplete)]


def complete_format(incomplete: str) -> list[str]:
    return [name for name in ("text", "json", "csv", "tsv") if name.startswith(incomplete)]


def complete_target(incomplete: str) -> list[str]:
    module_part, colon, prefix = incomplete.partition(":")
    if colon:
        path = _source_of(module_part)
        return [f"{module_part}:{name}" for name in _callables(path) if name.startswith(prefix)] if path else []
    directory, _, stem = incomplete.rpartition("/")
    where = directory or "."
    if directory == "" and incomplete.startswith("/"):
        where = "/"
    try:
        entries = sorted(os.scandir(where), key=lambda entry: entry.name)
    except OSError:
        return []
    shown = f"{directory}/" if directory or incomplete.startswith("/") else ""
    found = []
    for entry in entries:
        if not entry.name.startswith(stem) or (entry.name.startswith(".") and not stem.startswith(".")):
            continue
        if entry.is_dir():
            found.append(f"{shown}{entry.name}/")
        elif entry.name.endswith(".py"):
            found.append(f"{shown}{entry.name}:")
            if not directory and entry.name[:-3].isidentifier():
                found.append(f"{entry.name[:-3]}:")  # importable by name from the current directory
    return found


def _source_of(module_part: str) -> str | None:
    """The source file of `file.py` or of a module importable from here, without importing it."""
    if module_part.endswith(".py"):
        return module_part if os.path.isfile(module_part) else None
    local = os.path.join(*module_part.split(".")) + ".py"
    if os.path.isfile(local):
        return local
    import importlib.util
    try:
        spec = importlib.util.find_spec(module_part)
    except (ImportError, ValueError):  # a parent package that fails to import: nothing to offer
        return None
    origin = getattr(spec, "origin", None) if spec is not None else None
    return origin if origin and origin.endswith(".py") else None


def _callables(path: str) -> list[str]:
    try:
        with open(path, "rb") as stream:
            tree = ast.parse(stream.read())
    except (OSError, SyntaxError, ValueError):  # unreadable or not Python: nothing to offer
        return []
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return [node.name for node in tree.body if isinstance(node, kinds) and not node.name.startswith("_")]
