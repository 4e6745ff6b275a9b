"""The ``orderguard`` command line (typer + rich)."""

from __future__ import annotations

import json
import logging
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table

from . import __version__
from .demo import SCENARIOS, run_demo

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
    if verbose:
        handler = RichHandler(console=Console(stderr=True), show_path=False)
        logging.getLogger("orderguard").addHandler(handler)
        logging.getLogger("orderguard").setLevel(logging.WARNING)
    if scenario is not None and not 1 <= scenario <= len(SCENARIOS):
        console.print(f"[red]no scenario {scenario}: choose 1..{len(SCENARIOS)}[/red]")
        raise typer.Exit(2)
    if as_json:
        results = run_demo(scenario)
    else:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=console, transient=True) as bar:
            task = bar.add_task("starting", total=None)
            results = run_demo(scenario, progress=lambda title: bar.update(task, description=title))
    ok = all(r.guarded.duplicates == 0 for r in results)
    if as_json:
        payload = [
            {
                "scenario": r.number, "title": r.title,
                **{
                    mode: {
                        "attempts": run.attempts, "broker_orders": run.broker_orders,
                        "duplicates": run.duplicates, "phantom_notional": str(run.phantom_notional),
                        "blocked": dict(run.blocked),
                    }
                    for mode, run in (("unguarded", r.unguarded), ("guarded", r.guarded))
                },
            }
            for r in results
        ]
        print(json.dumps({"ok": ok, "scenarios": payload}, indent=2))
    else:
        table = Table(title="Duplicate orders: naive guard vs orderguard (paper venue order log)")
        table.add_column("#")
        table.add_column("scenario", min_width=24, ratio=3)
        for column in ("tries", "naive orders", "naive dups", "phantom $", "guarded orders", "guarded dups"):
            table.add_column(column, justify="right")
        table.add_column("blocked (guarded)", min_width=14, ratio=1)
        for r in results:
            table.add_row(
                str(r.number), r.title, str(r.unguarded.attempts), str(r.unguarded.broker_orders),
                f"[red]{r.unguarded.duplicates}[/red]", f"${r.unguarded.phantom_notional:,}",
                str(r.guarded.broker_orders), f"[green]{r.guarded.duplicates}[/green]",
                ", ".join(f"{k} {v}" for k, v in sorted(r.guarded.blocked.items())) or "-",
            )
        console.print(table)
        console.print("[green]guarded runs: no duplicates[/green]" if ok else "[red]guarded run produced a duplicate[/red]")
    raise typer.Exit(0 if ok else 1)
