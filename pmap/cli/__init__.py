"""The `pmap` command line (typer): `run`, `bench`, `backends`, `worker`.

Exit status of `pmap run` and `pmap bench`: 0 all items ok (bench: all backends agree);
1 some items failed (bench: a backend disagreed or failed); 2 bad usage or input, with a
one-line message and no traceback; 3 --halt stopped the run; 130 Ctrl-C; 141 the reader of stdout went away; 143 SIGTERM.
"""
from __future__ import annotations

# Each command's module registers it with the app on import.
from . import bench, run, worker  # noqa: F401
from .common import InputError, UsageError, app
from .journal import Bits, Journal
from .options import parse_backend_options
from .source import parse_range

__all__ = ["app", "main", "Bits", "Journal", "InputError", "UsageError", "parse_backend_options", "parse_range"]


def main() -> None:
    app()
