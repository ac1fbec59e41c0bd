"""`pmap worker` joins a manager run from this host; `pmap backends` lists the backends."""
from __future__ import annotations

import typer

from .common import app


@app.command("backends")
def backends_command() -> None:
    """List the backends, which run here (or why not), and guarantees."""
    from .. import backends
    header = ("backend", "kind", "available", "workers", "guarantees")
    rows = [header]
    for info in backends():
        notes = info.guarantees if info.available else f"unavailable: {info.reason}"
        rows.append((info.name, info.kind, "yes" if info.available else "no",
                     str(info.default_workers or "-"), notes))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        typer.echo("  ".join([cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]))


@app.command("worker")
def worker_command(
    address: str = typer.Argument(..., help="HOST:PORT of a run using backend='manager'"),
    authkey_file: str = typer.Option(..., "--authkey-file", help="file holding the run's authkey"),
    processes: int = typer.Option(1, "--processes", min=1, help="worker processes on this host"),
) -> None:
    """Join a manager run from this host and work until the driver ends."""
    from ..backends.manager import run_worker
    raise typer.Exit(run_worker(address, authkey_file, processes))
