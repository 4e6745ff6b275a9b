"""``orderguard audit``: the terminal side of the forensic audit (rich summary, progress, plan/apply)."""

from __future__ import annotations

import os
import re
from decimal import Decimal
from typing import TYPE_CHECKING

from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from .cli_errors import CliFailure
from .intent import canonical_decimal

if TYPE_CHECKING:
    from types import TracebackType

    from rich.console import Console

    from .audit.plan import ApplyResult, PlanSummary
    from .audit.report import AuditReport

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_window(text: str) -> float:
    """``90``, ``90s``, ``2m``, ``500ms`` as seconds."""
    match = _DURATION.match(text)
    if not match:
        raise CliFailure(2, f"--window {text!r} is not a duration (90s, 2m, 500ms)")
    return float(match.group(1)) * _UNITS[(match.group(2) or "s").lower()]


class RichProgress:
    """Audit progress on stderr: a bar while a database table streams out, a spinner per phase."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True,
        )
        self._task: TaskID | None = None
        self._name = ""

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()

    def phase(self, name: str, total: int | None = None) -> None:
        if self._task is not None and name == self._name:
            self._progress.update(self._task, total=total)
            return
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(name, total=total)
        self._name = name

    def advance(self, done: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=done)


def _money(value: Decimal) -> str:
    return f"{value:,.2f}"


def render_report(console: Console, report: AuditReport, top: int, *, planned: bool = False) -> None:
    from .audit.report import iso_us

    cols = report.columns
    where = f"table {report.table}" if report.table else report.source.kind.value.upper()
    console.print(
        f"[bold]orderguard audit[/] {report.source.display} ({where}): {report.rows:,} trades, {report.symbols:,} symbols, "
        f"{iso_us(report.first_us)} to {iso_us(report.last_us)}, scanned in {report.seconds:.2f} s",
        highlight=False,
    )
    mapped = " ".join(f"{k}={getattr(cols, k)}" for k in ("time", "symbol", "side", "qty", "price", "id"))
    scope = ",".join(cols.scope) or "(none)"
    console.print(
        f"columns: {mapped} scope={scope}" + (f" (found by name: {', '.join(cols.detected)})" if cols.detected else ""),
        highlight=False, style="dim",
    )
    s = report.settings
    console.print(
        f"a cluster: same {' + '.join([*cols.scope, 'symbol', 'side'])}, each within {s.window_seconds:g} s of the previous; "
        f"a trade scoring >= {s.min_confidence:g} is a duplicate of the one before it",
        highlight=False, style="dim",
    )
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    counts = report.counts()
    if not report.duplicates:
        console.print(
            f"[green]no duplicate bursts[/] ({counts['POSSIBLE']} possible clusters to review, "
            f"{counts['SCALE_IN']} read as deliberate scale-ins)", highlight=False,
        )
    else:
        console.print(
            f"[bold red]DUPLICATES:[/] {report.duplicate_orders:,} orders in {counts['DUPLICATE']:,} bursts; "
            f"{canonical_decimal(report.excess_qty)} excess shares; {_money(report.phantom_notional)} phantom notional "
            f"({counts['POSSIBLE']} possible clusters to review, {counts['SCALE_IN']} read as deliberate scale-ins)",
            highlight=False,
        )
        table = Table(title=f"by symbol (top {top} by phantom notional)", title_justify="left")
        for name in cols.scope:
            table.add_column(name)
        for name in ("symbol", "duplicate orders", "bursts", "largest burst", "excess qty", "phantom notional", "cash effect", "positions"):
            table.add_column(name, justify="right" if name not in ("symbol", "positions") else "left")
        status = {(c.scope, c.symbol): report.status_of(c).value for c in report.duplicates}
        for t in report.by_symbol()[:top]:
            table.add_row(
                *t.scope, t.symbol, f"{t.duplicate_orders:,}", str(t.clusters), str(t.largest_burst),
                canonical_decimal(t.excess_qty), _money(t.phantom_notional), _money(t.cash_effect),
                status.get((t.scope, t.symbol), ""),
            )
        console.print(table)
    if report.positions is not None:
        tally: dict[str, int] = {}
        for p in report.positions:
            tally[p.status.value] = tally.get(p.status.value, 0) + 1
        console.print(
            "positions: " + ", ".join(f"{n} {k}" for k, n in sorted(tally.items()))
            + " (PHANTOM: the positions match the trades without the duplicates: recorded, never held)",
            highlight=False,
        )
        odd = [p for p in report.positions if p.status.value in ("REAL", "UNEXPLAINED")]
        if odd:
            table = Table(title="positions that do not match the trades without duplicates", title_justify="left")
            for name in (*(report.positions_ref.join if report.positions_ref else ()), "symbol", "trades net", "duplicates net", "position", "status"):
                table.add_column(name)
            for p in odd[:top]:
                table.add_row(*p.key, p.symbol, canonical_decimal(p.trades_net), canonical_decimal(p.duplicates_net),
                              canonical_decimal(p.position), p.status.value)
            console.print(table)
    for c in report.cash or ():
        key = f" ({', '.join(c.key)})" if c.key else ""
        implied = f"; all trades from {_money(c.starting)} imply {_money(c.implied_by_trades)}" if c.starting is not None and c.implied_by_trades is not None else ""
        console.print(
            f"cash{key}: recorded {_money(c.recorded)}; phantom duplicates moved {_money(c.phantom)}; "
            f"[bold]corrected {_money(c.corrected)}[/]{implied}",
            highlight=False,
        )
    if report.duplicates and not planned:
        hint = "" if report.positions is not None else " --positions TABLE --cash TABLE"
        console.print(
            f"next: write a reviewable correction with the same options plus{hint} --plan fix.sql "
            "(nothing is changed until --apply fix.sql)", style="dim", highlight=False,
        )


def render_plan(console: Console, summary: PlanSummary) -> None:
    cash = sum(summary.cash_delta.values(), Decimal(0)) if summary.cash_delta else None
    console.print(
        f"plan written: {summary.plan} (deletes {summary.deletes:,} duplicate rows in {summary.clusters} clusters"
        + (f", gives back {_money(cash)} cash" if cash is not None else "")
        + f"; backups {', '.join(summary.backups)} first); rollback: {summary.rollback}",
        highlight=False,
    )
    for line in summary.left_alone:
        console.print(f"left alone: {line}", highlight=False, style="yellow")
    console.print(f"nothing was changed. Review {os.path.basename(summary.plan)}, then: orderguard audit SOURCE --apply {summary.plan}",
                  highlight=False, style="dim")


def render_applied(console: Console, path: str, result: ApplyResult) -> None:
    console.print(
        f"applied {path}: {result.checks} checks held; {result.deleted:,} rows deleted, {result.inserted:,} rows put back, "
        f"{result.updated} cash rows updated, in one transaction",
        highlight=False,
    )
