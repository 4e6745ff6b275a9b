"""Human output of the operator CLI: rich tables, one function per command."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .intent import canonical_decimal
from .messages import clock_text
from .states import State

if TYPE_CHECKING:
    from .cli_status import StatusView, StrategyStatus
    from .reconcile import ReconcileReport
    from .store.base import AttemptRecord, IntentRecord



def _id_column(table: Table, name: str) -> None:
    """Ids stay whole (folded if they must, never cut with an ellipsis) for copy and paste."""
    table.add_column(name, no_wrap=True, overflow="fold")


def make_console() -> Console:
    """Stdout console; wide when piped so ids and notes are not cut."""
    probe = Console()
    return Console(width=None if probe.is_terminal else 200)


def when(epoch: float | None) -> str:
    """``2026-11-21 08:20:51Z`` (UTC, seconds)."""
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def age(now: float, epoch: float) -> str:
    """``4m 12s``: how long ago."""
    seconds = max(0, int(now - epoch))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def order_text(rec: IntentRecord | AttemptRecord) -> str:
    """``AAPL BUY 10 LIMIT 101.5`` (type shown when not MARKET)."""
    text = f"{rec.symbol} {rec.side} {canonical_decimal(rec.quantity)}"
    if rec.order_type != "MARKET":
        text += f" {rec.order_type}"
    if rec.limit_price is not None:
        text += f" limit {canonical_decimal(rec.limit_price)}"
    if rec.stop_price is not None:
        text += f" stop {canonical_decimal(rec.stop_price)}"
    return text


def _filled(rec: IntentRecord) -> str:
    if not rec.filled_quantity:
        return "-"
    price = f" @ {canonical_decimal(rec.average_price)}" if rec.average_price is not None else ""
    return f"{canonical_decimal(rec.filled_quantity)}{price}"


def _from(attempt: AttemptRecord) -> str:
    ctx = f"task {attempt.task}" if attempt.task else f"thread {attempt.thread}"
    return f"{attempt.source} on {attempt.host} pid {attempt.pid} ({ctx})"


def _state(state: State) -> Text:
    style = {
        State.UNKNOWN: "bold red", State.FILLED: "green", State.REJECTED: "yellow",
        State.NOT_FOUND: "yellow", State.ABANDONED: "dim",
    }.get(state, "")
    return Text(state.value, style=style)


# ----------------------------------------------------------------------------- listings


def intents_table(records: list[IntentRecord], title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("created (UTC)", no_wrap=True)
    _id_column(table, "intent id")
    _id_column(table, "client order id")
    table.add_column("state", no_wrap=True)
    table.add_column("strategy")
    table.add_column("order")
    table.add_column("filled")
    table.add_column("source")
    for r in records:
        table.add_row(
            when(r.created_at), r.id, r.client_order_id, _state(r.state), Text(r.strategy),
            Text(order_text(r)), Text(_filled(r)), Text(r.source),
        )
    return table


def attempts_table(records: list[AttemptRecord], title: str | None = None, *, strategy: bool = True) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("at (UTC)", no_wrap=True)
    table.add_column("#", justify="right")
    table.add_column("outcome", no_wrap=True)
    if strategy:
        table.add_column("strategy")
    table.add_column("order")
    table.add_column("from")
    _id_column(table, "intent / holder")
    for a in records:
        outcome = Text(a.outcome if a.reason is None else f"BLOCKED {a.reason.value}",
                       style="yellow" if a.reason else "green")
        row: list[Text | str] = [when(a.at), str(a.id), outcome]
        if strategy:
            row.append(Text(a.strategy))
        row += [Text(order_text(a)), Text(_from(a)), a.intent_id or a.holder_id or "-"]
        table.add_row(*row)
    return table


def _more(console: Console, shown: int, limit: int) -> None:
    if shown >= limit:
        console.print(f"(newest {limit} shown; raise --limit for more)", style="dim")


def render_intents(console: Console, ledger: str, records: list[IntentRecord], limit: int) -> None:
    console.print(Text(f"Ledger {ledger}: {len(records)} intent(s), newest first"))
    if records:
        console.print(intents_table(records))
    _more(console, len(records), limit)


def render_attempts(console: Console, ledger: str, records: list[AttemptRecord], limit: int) -> None:
    console.print(Text(f"Ledger {ledger}: {len(records)} attempt(s), newest first"))
    if records:
        console.print(attempts_table(records))
    _more(console, len(records), limit)


# --------------------------------------------------------------------------------- show


def _value(name: str, value: object) -> str:
    if value is None:
        return "-"
    if name in ("created_at", "updated_at", "first_miss_at", "send_by_at", "at") and isinstance(value, float):
        return clock_text(value)
    if isinstance(value, Decimal):
        return canonical_decimal(value)
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, tuple):
        return "\n".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
    return str(value)


def record_grid(record: IntentRecord | AttemptRecord, title: str) -> Table:
    grid = Table(title=title, title_justify="left", show_header=False)
    grid.add_column("field", style="bold", no_wrap=True)
    grid.add_column("value", overflow="fold")
    for f in dataclasses.fields(record):
        grid.add_row(f.name, Text(_value(f.name, getattr(record, f.name))))
    return grid


def render_show(
    console: Console, rec: IntentRecord, claimed: AttemptRecord | None, collisions: list[AttemptRecord]
) -> None:
    head = Text(f"Intent {rec.id} ({rec.client_order_id}): ")
    head.append_text(_state(rec.state))
    head.append(f", {rec.strategy} {order_text(rec)} (account {rec.account}), by {rec.who()}")
    console.print(head)
    console.print(record_grid(rec, "Intent"))
    if claimed is not None:
        console.print(record_grid(claimed, "Claimed by attempt"))
    else:
        console.print("Claimed by attempt: not found in the ledger", style="yellow")
    if collisions:
        console.print(attempts_table(collisions, f"{len(collisions)} attempt(s) blocked by this intent", strategy=False))
        for a in collisions:
            console.print(Text(f"#{a.id} {a.message}"), style="dim")
    else:
        console.print("No attempt collided with this intent.")


# ------------------------------------------------------------------------------- status


def _open_table(now: float, records: list[IntentRecord]) -> Table:
    table = Table(title="in flight / UNKNOWN", title_justify="left")
    table.add_column("state", no_wrap=True)
    _id_column(table, "intent id")
    _id_column(table, "client order id")
    table.add_column("order")
    table.add_column("in state for", no_wrap=True)
    table.add_column("owner")
    table.add_column("note")
    for r in records:
        table.add_row(
            _state(r.state), r.id, r.client_order_id, Text(order_text(r)), age(now, r.updated_at),
            Text(r.who()), Text(r.note or ""),
        )
    return table


def _strategy_section(console: Console, view: StatusView, group: StrategyStatus, blocked_rows: int) -> None:
    reasons = ", ".join(f"{k} {v}" for k, v in group.blocked_by_reason.items())
    line = Text(f"\n{group.strategy}", style="bold")
    line.append(
        f": {len(group.in_flight)} in flight, {len(group.unknown)} UNKNOWN, {len(group.blocked)} blocked"
        + (f" ({reasons})" if reasons else ""),
        style="",
    )
    console.print(line)
    if group.unknown or group.in_flight:
        console.print(_open_table(view.now, group.unknown + group.in_flight))
    if group.blocked:
        shown = group.blocked[:blocked_rows]
        title = f"blocked since {when(view.since)}" + (f" (newest {len(shown)})" if len(shown) < len(group.blocked) else "")
        console.print(attempts_table(shown, title, strategy=False))


def render_status(console: Console, view: StatusView, blocked_rows: int) -> None:
    console.print(Text(f"Ledger {view.ledger} at {when(view.now)}; blocked attempts since {when(view.since)}"))
    if not view.strategies:
        console.print("Nothing in flight, nothing UNKNOWN, no blocked attempts.", style="green")
        return
    summary = Table(title="per strategy", title_justify="left")
    summary.add_column("strategy")
    summary.add_column("in flight", justify="right")
    summary.add_column("UNKNOWN", justify="right")
    summary.add_column("blocked", justify="right")
    summary.add_column("blocked by reason")
    for g in view.strategies:
        summary.add_row(
            Text(g.strategy), str(len(g.in_flight)),
            Text(str(len(g.unknown)), style="bold red" if g.unknown else ""), str(len(g.blocked)),
            ", ".join(f"{k} {v}" for k, v in g.blocked_by_reason.items()),
        )
    console.print(summary)
    for g in view.strategies:
        _strategy_section(console, view, g, blocked_rows)
    pending = view.total("unknown")
    if pending:
        console.print(
            f"\nNext: {pending} UNKNOWN intent(s) block their scopes until reconciled; run "
            "'orderguard reconcile --broker SPEC' (it looks them up at the venue; never resend by hand).",
            style="bold",
        )


# ---------------------------------------------------------------------------- reconcile


def render_reconcile(console: Console, ledger: str, broker: str, report: ReconcileReport, warnings: list[str]) -> None:
    console.print(Text(f"Reconciling ledger {ledger} against {broker}"))
    for w in warnings:
        console.print(Text(f"warning: {w}"), style="yellow")
    if report.decisions:
        table = Table(title="decided", title_justify="left")
        _id_column(table, "client order id")
        for name in ("strategy", "symbol", "was", "now", "why"):
            table.add_column(name)
        for d in report.decisions:
            table.add_row(d.client_order_id, Text(d.strategy), Text(d.symbol), d.before.value,
                          _state(d.after) if d.after else "-", Text(d.why))
        console.print(table)
    if report.unresolved:
        table = Table(title="unresolved", title_justify="left", title_style="bold red")
        _id_column(table, "client order id")
        for name in ("strategy", "symbol", "state", "why"):
            table.add_column(name)
        for d in report.unresolved:
            table.add_row(d.client_order_id, Text(d.strategy), Text(d.symbol), _state(d.before), Text(d.why))
        console.print(table)
    if report.drift:
        table = Table(title="position drift (ledger vs venue)", title_justify="left", title_style="bold red")
        for name in ("account", "symbol", "ledger", "venue", "difference"):
            table.add_column(name, justify="left" if name in ("account", "symbol") else "right")
        for x in report.drift:
            table.add_row(Text(x.account), Text(x.symbol), canonical_decimal(x.ledger),
                          canonical_decimal(x.broker), canonical_decimal(x.difference))
        console.print(table)
    for h in report.halts:
        console.print(
            Text(f"HALTED {h.scope} (cause DRIFT): check the venue, then `orderguard resume '{h.scope}' --reason ...`"),
            style="bold red",
        )
    summary = (
        f"{len(report.decisions)} decided, {len(report.unresolved)} unresolved, "
        f"{len(report.drift)} position drift(s)"
    )
    if report.clean:
        console.print(f"{summary}: clean.", style="green")
    else:
        console.print(f"{summary}: NOT clean (exit status 1).", style="bold red")
