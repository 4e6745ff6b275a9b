"""Duplicate-order scenarios run twice: with the naive guard bots use, and through orderguard.

The naive guard is what the post-mortems describe: check the ledger for a trade today, send,
record after the fill. Both runs use the same embedded paper venue, so the broker's own order
log counts the duplicates.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table

from .brokers.base import OrderRequest
from .brokers.paper import PaperBroker, PaperFaults
from .errors import AmbiguousOutcome
from .guard import Guard
from .intent import OrderIntent, Side
from .policies import OncePer, Policy, TradingDay

if TYPE_CHECKING:
    from collections.abc import Callable

PRICE = Decimal("100")


@dataclass
class RunResult:
    attempts: int
    broker_orders: int
    blocked: Counter[str] = field(default_factory=Counter)

    @property
    def duplicates(self) -> int:
        return max(0, self.broker_orders - 1)

    @property
    def phantom_notional(self) -> Decimal:
        return self.duplicates * QUANTITY * PRICE


@dataclass
class ScenarioResult:
    number: int
    title: str
    unguarded: RunResult
    guarded: RunResult


QUANTITY = Decimal(4)


def _intent(source: str) -> OrderIntent:
    return OrderIntent(account="main", strategy="spx-calendar", symbol="SPX", side=Side.BUY, quantity=QUANTITY, source=source)


class _NaiveBot:
    """Check the trades table for today, send, record the trade after the broker answers."""

    def __init__(self, folder: Path, broker: PaperBroker) -> None:
        self.path = folder / "naive.db"
        self.broker = broker
        with sqlite3.connect(self.path) as db:
            db.execute("CREATE TABLE IF NOT EXISTS trades (day TEXT, coid TEXT)")

    def run(self, source: str, day: str = "today") -> None:
        with sqlite3.connect(self.path, timeout=30) as db:
            if db.execute("SELECT count(*) FROM trades WHERE day = ?", (day,)).fetchone()[0]:
                return
        coid = f"naive-{source}-{threading.get_ident()}-{time.monotonic_ns()}"[:32]
        intent = _intent(source)
        request = OrderRequest(coid, intent.account, intent.symbol, intent.side.value, intent.quantity, "MARKET", None, None, "DAY")
        try:
            self.broker.submit(request)
        except AmbiguousOutcome:
            self.broker.submit(replace(request, client_order_id=coid[:30] + "-r"))  # naive retry: a new id
        with sqlite3.connect(self.path, timeout=30) as db:
            db.execute("INSERT INTO trades VALUES (?, ?)", (day, coid))


_COUNT_LOCK = threading.Lock()


def _guarded(guard: Guard, broker: PaperBroker, policy: Policy, source: str, blocked: Counter[str]) -> None:
    result = guard.submit(_intent(source), broker, policy=policy)
    if result.state is not None and result.state.value == "UNKNOWN":
        result = guard.submit(_intent(source), broker, policy=policy)  # the caller retries
    if result.blocked:
        with _COUNT_LOCK:
            blocked[str(result.reason)] += 1


def _race(callers: list[Callable[[], object]]) -> None:
    barrier = threading.Barrier(len(callers))

    def go(fn: Callable[[], object]) -> None:
        barrier.wait()
        fn()

    threads = [threading.Thread(target=go, args=(fn,)) for fn in callers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _scenario(folder: Path, number: int, title: str, sources: list[str], ack_latency: float, lose_ack: bool) -> ScenarioResult:
    policy: Policy = OncePer(TradingDay("XNYS"), by=("strategy",))
    runs: dict[str, RunResult] = {}
    for mode in ("unguarded", "guarded"):
        faults = PaperFaults(lose_ack=1 if lose_ack else 0)
        broker = PaperBroker.open(f"sqlite:///{folder / f'{number}-{mode}-paper.db'}", ack_latency=ack_latency, faults=faults)
        blocked: Counter[str] = Counter()
        if mode == "unguarded":
            (folder / f"{number}").mkdir()
            bot = _NaiveBot(folder / f"{number}", broker)
            _race([functools.partial(bot.run, s) for s in sources])
        else:
            guard = Guard.open(f"sqlite:///{folder / f'{number}-ledger.db'}", synchronous="NORMAL")
            _race([functools.partial(_guarded, guard, broker, policy, s, blocked) for s in sources])
            guard.close()
        runs[mode] = RunResult(attempts=len(sources), broker_orders=len(broker.orders()), blocked=blocked)
        broker.close()
    return ScenarioResult(number, title, runs["unguarded"], runs["guarded"])


SCENARIOS: list[tuple[str, list[str], float, bool]] = [
    ("scheduler fires the daily entry twice", ["scheduler", "scheduler"], 0.05, False),
    ("'Manual trade' in two tabs during the scheduled entry", ["scheduler", "manual", "manual"], 0.05, False),
    ("8 parallel tasks all see 'no position yet'", ["task"] * 8, 0.05, False),
    ("ack lost after accept; the caller retries", ["scheduler"], 0.0, True),
]


def run_demo(only: int | None = None, progress: Callable[[str], None] | None = None) -> list[ScenarioResult]:
    """Run the scenarios (or one) in a temporary folder; returns the counts."""
    results = []
    with tempfile.TemporaryDirectory(prefix="orderguard-demo-") as tmp:
        for number, (title, sources, latency, lose_ack) in enumerate(SCENARIOS, start=1):
            if only is not None and number != only:
                continue
            if progress:
                progress(title)
            results.append(_scenario(Path(tmp), number, title, sources, latency, lose_ack))
    return results


def main(*, scenario: int | None, as_json: bool, verbose: bool, console: Console) -> int:
    """The ``orderguard demo`` command: run, print, and return the exit status."""
    if scenario is not None and not 1 <= scenario <= len(SCENARIOS):
        console.print(f"[red]no scenario {scenario}: choose 1..{len(SCENARIOS)}[/red]")
        return 2
    if verbose:
        handler = RichHandler(console=Console(stderr=True), show_path=False)
        logging.getLogger("orderguard").addHandler(handler)
        logging.getLogger("orderguard").setLevel(logging.WARNING)
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
    return 0 if ok else 1
