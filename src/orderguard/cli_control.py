"""``orderguard halt`` / ``resume`` / ``runners``, and the halts shown by ``status``."""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

from .cli_render import age, when
from .runners import runner_flags
from .store.base import this_host

if TYPE_CHECKING:
    from rich.console import Console

    from .halts import HaltEvent, HaltRecord
    from .runners import Lease, RunnerFlag, RunnerRecord
    from .store.base import IntentRecord, Store


def unmatched_note(scope: str, store: Store) -> str | None:
    """A note when no recent intent of the ledger falls in ``scope`` (a misspelt symbol or
    strategy would make a halt that stops nothing); None when one does, or the scope is global."""
    from .intent import canonical_decimal
    from .policies import parse_halt_scope

    pairs = parse_halt_scope(scope)
    if not pairs:
        return None

    def value(record: IntentRecord, name: str) -> str:
        if name.startswith("tags."):
            return record.tags.get(name[5:], "")
        item = getattr(record, name, "")
        return canonical_decimal(item) if isinstance(item, Decimal) else str(item)

    for record in store.intents(limit=5000):
        if all(value(record, name) == wanted for name, wanted in pairs):
            return None
    return (
        f"note: none of the ledger's last 5000 intents falls in {scope}; check the spelling (values are "
        "case-sensitive and must match the intents' own, e.g. symbol=SPX, strategy=spx-calendar). The halt "
        "is in place and applies to any future intent that matches."
    )


def operator_name(given: str | None) -> str:
    """Who is acting: ``--by`` or ``operator <user>@<host>``."""
    if given and given.strip():
        return given.strip()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = os.environ.get("USER", "unknown")
    return f"operator {user}@{this_host()}"


@dataclass
class RunnersView:
    ledger: str
    now: float
    runners: list[RunnerRecord]
    flags: list[RunnerFlag]
    leases: list[Lease]

    def to_json(self) -> dict[str, Any]:
        flags_of: dict[str, list[str]] = {}
        for f in self.flags:
            flags_of.setdefault(f.runner.id, []).append(f.kind)
        leader = {lease.holder: lease for lease in self.leases if lease.expires_at > self.now}
        return {
            "ledger": self.ledger,
            "runners": [
                {
                    **_plain(r), "live": r.live(self.now), "stale": r.stale(self.now), "flags": flags_of.get(r.id, []),
                    "leads": leader[r.id].name if r.id in leader else None,
                }
                for r in self.runners
            ],
            "flags": [{"kind": f.kind, "runner": f.runner.id, "message": f.message} for f in self.flags],
            "leases": self.leases,
        }


def _plain(record: object) -> dict[str, Any]:
    from .cli_json import plain

    out = plain(record)
    assert isinstance(out, dict)
    return out


def collect_runners(store: Store, ledger: str, stopped_within: float) -> RunnersView:
    now = store.now()
    runners = store.runners(stopped_within=stopped_within)
    return RunnersView(ledger, now, runners, runner_flags(runners, now), store.leases())


def render_runners(console: Console, view: RunnersView) -> None:
    console.print(Text(f"Runners registered in {view.ledger} at {when(view.now)}"))
    if not view.runners:
        console.print("No runner has registered (runners register when they open a Guard).")
        return
    leading = {lease.holder: lease.name for lease in view.leases if lease.expires_at > view.now}
    flagged: dict[str, list[str]] = {}
    for f in view.flags:
        flagged.setdefault(f.runner.id, []).append(f.kind)
    table = Table()
    for name in ("runner", "strategy", "host", "pid", "code", "git", "version", "heartbeat", "state"):
        table.add_column(name)
    for r in view.runners:
        if r.stopped_at is not None:
            state = Text(f"stopped {age(view.now, r.stopped_at)} ago", style="dim")
        elif r.id in flagged:
            state = Text(" ".join(flagged[r.id]), style="bold red")
        else:
            state = Text("live" + (f", leads {leading[r.id]}" if r.id in leading else ""), style="green")
        table.add_row(
            Text(r.runner), Text(r.strategy), Text(r.host), str(r.pid), r.fingerprint,
            (r.git_commit or "-")[:10], r.version, f"{age(view.now, r.heartbeat_at)} ago", state,
        )
    console.print(table)
    for f in view.flags:
        console.print(Text(f"{f.kind}: {f.message}"), style="bold red")


def halts_table(halts: list[HaltRecord], now: float) -> Table:
    table = Table(title="trading halts", title_justify="left", title_style="bold red")
    for name in ("scope", "state", "since", "cause", "by", "why"):
        table.add_column(name)
    for h in halts:
        table.add_row(
            Text(h.scope), Text(h.state.value, style="bold red"), f"{when(h.at)} ({age(now, h.at)} ago)",
            h.cause.value, Text(h.actor), Text(h.reason),
        )
    return table


def history_table(events: list[HaltEvent]) -> Table:
    table = Table(title="trading state changes", title_justify="left")
    for name in ("at", "scope", "state", "cause", "by", "why"):
        table.add_column(name)
    for e in events:
        table.add_row(when(e.at), Text(e.scope), e.state.value, e.cause.value, Text(e.actor), Text(e.reason))
    return table
