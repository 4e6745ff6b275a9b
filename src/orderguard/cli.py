"""The ``orderguard`` command line (typer + rich)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from . import __version__

app = typer.Typer(help="orderguard: send each order intent at most once.", no_args_is_help=True)
console = Console(width=None if Console().is_terminal else 140)


@app.command()
def version() -> None:
    """Print the orderguard version."""
    console.print(__version__)


@app.command()
def demo(
    scenario: Annotated[int | None, typer.Option(help="Run only scenario N.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show every blocked attempt's log line.")] = False,
) -> None:
    """Run duplicate-order scenarios unguarded and through orderguard (SQLite + paper venue)."""
    from .demo import main as demo_main

    raise typer.Exit(demo_main(scenario=scenario, as_json=as_json, verbose=verbose, console=console))
