"""The `pmap` command line (typer)."""
from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run a Python function over many inputs in parallel.")


@app.command("backends")
def backends_command() -> None:
    """List the backends, whether each can run here, and why not."""
    from . import backends
    rows = [(b.name, "yes" if b.available else "no", str(b.default_workers or "-"), b.reason or b.guarantees)
            for b in backends()]
    widths = [max(len(r[i]) for r in rows + [("backend", "available", "workers", "notes")]) for i in range(3)]
    header = ("backend", "available", "workers", "notes")
    for row in [header] + rows:
        typer.echo("  ".join(cell.ljust(widths[i]) if i < 3 else cell for i, cell in enumerate(row)))


@app.callback()
def main_callback() -> None:
    pass


def main() -> None:
    app()
