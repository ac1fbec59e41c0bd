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


@app.command("worker")
def worker_command(
    address: str = typer.Argument(..., help="HOST:PORT of a run using backend='manager'"),
    authkey_file: str = typer.Option(..., "--authkey-file", help="file holding the run's authkey"),
    processes: int = typer.Option(1, "--processes", min=1, help="worker processes on this host"),
) -> None:
    """Join a manager run from this host and work until the driver ends."""
    from .backends.manager import run_worker
    raise typer.Exit(run_worker(address, authkey_file, processes))


@app.callback()
def main_callback() -> None:
    pass


def main() -> None:
    app()
