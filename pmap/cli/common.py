"""What every command shares: the typer app, exit codes, and the one-line usage error."""
from __future__ import annotations

import sys
from typing import Annotated

import typer

app = typer.Typer(add_completion=True, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="Run a Python function over many inputs in parallel.")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_HALTED = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
EXIT_TERMINATED = 143
# `return` is the API's name; `record` is kept as an alias from before the CLI used the API's names.
ON_ERROR_CHOICES = ("raise", "skip", "return", "record")


class UsageError(Exception):
    """Bad usage or input: reported as one line, exit status 2."""


class InputError(UsageError):
    """A bad input line, found while reading; raised through the run after the results before it."""


def _error_exit(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    typer.echo(f"pmap: error: {message}", err=True)
    return typer.Exit(code)


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__
        typer.echo(f"pmap {__version__} (Python {sys.version.split()[0]})")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="print pmap's version and exit")] = False,
) -> None:
    pass
