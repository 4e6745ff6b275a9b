"""Properties of the duplicate finder and its correction plans on random small histories.

Legit trades of a few symbols and strategies at random times, sizes and prices, plus injected
exact duplicates (same size and price, each 0-3 s after the order before it in its chain):

* every injected duplicate with no other legit trade of its scope within the window is found;
* with legit trades of one scope always further apart than the window, exactly the injected
  duplicates are found, and after applying the plan a re-audit finds none; the rollback restores
  the table row for row.
"""

from __future__ import annotations

import sqlite3
import tempfile
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orderguard.audit import Settings, Verdict, audit
from orderguard.audit.plan import apply_plan, rollback_path, write_plan
from tests.helpers import need_duckdb

need_duckdb()

EPOCH_MS = 1_768_919_400_000  # 2026-01-20T14:30:00Z
WINDOW_S = 60
SYMBOLS = ("AAPL", "MSFT", "JD")
STRATEGIES = ("momentum", "meanrev")
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Trade:
    ms: int
    symbol: str
    side: str
    qty: int
    price: Decimal
    strategy: str

    @property
    def scope(self) -> tuple[str, str, str]:
        return (self.strategy, self.symbol, self.side)


prices = st.integers(min_value=100, max_value=50_000).map(lambda cents: Decimal(cents) / 100)
legit_trade = st.builds(
    Trade, ms=st.integers(0, 3_600_000), symbol=st.sampled_from(SYMBOLS), side=st.sampled_from(("buy", "sell")),
    qty=st.integers(1, 500), price=prices, strategy=st.sampled_from(STRATEGIES),
)
# (index of the legit trade copied, gaps in ms between the copies of its chain)
injection = st.tuples(st.integers(0, 10_000), st.lists(st.integers(0, 3000), min_size=1, max_size=3))


def write_db(folder: str, legit: list[Trade], injections: list[tuple[int, list[int]]]) -> tuple[str, dict[int, Trade], dict[int, int]]:
    """The SQLite history: legit trades first (ids 1..n), then the copies. Returns the path, every
    trade by id, and for each injected id the id of the legit trade it copies."""
    trades: dict[int, Trade] = {i + 1: t for i, t in enumerate(legit)}
    copies: dict[int, int] = {}
    next_id = len(legit) + 1
    for index, gaps in injections:
        original_id = index % len(legit) + 1
        at = trades[original_id].ms
        for gap in gaps:
            at += gap
            original = trades[original_id]
            trades[next_id] = Trade(at, original.symbol, original.side, original.qty, original.price, original.strategy)
            copies[next_id] = original_id
            next_id += 1
    path = str(Path(folder) / "h.db")
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE trades (id INTEGER PRIMARY KEY, timestamp INTEGER, symbol TEXT, side TEXT, qty INTEGER, "
                 "price TEXT, strategy TEXT)")
    conn.executemany("INSERT INTO trades VALUES (?, ?, ?, ?, ?, ?, ?)",
                     [(i, EPOCH_MS + t.ms, t.symbol, t.side, t.qty, str(t.price), t.strategy) for i, t in trades.items()])
    conn.commit()
    conn.close()
    return path, trades, copies


def found_ids(path: str) -> set[int]:
    report = audit(path, settings=Settings(window_seconds=WINDOW_S))
    return {int(i) for c in report.duplicates for i in c.repeat_ids}


@SETTINGS
@given(legit=st.lists(legit_trade, min_size=1, max_size=14), injections=st.lists(injection, min_size=1, max_size=4))
def test_isolated_injected_duplicates_are_found(legit: list[Trade], injections: list[tuple[int, list[int]]]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path, trades, copies = write_db(folder, legit, injections)
        found = found_ids(path)
    legit_ids = set(range(1, len(legit) + 1))
    for dup_id, original_id in copies.items():
        dup = trades[dup_id]
        crowded = any(
            other != original_id and trades[other].scope == dup.scope and abs(trades[other].ms - dup.ms) <= WINDOW_S * 1000
            for other in legit_ids
        )
        if not crowded:
            assert dup_id in found, (dup_id, dup, sorted(found))


@st.composite
def spaced_history(draw: st.DrawFn) -> list[Trade]:
    """Legit trades where two of one strategy and symbol are always more than the window apart."""
    out: list[Trade] = []
    for strategy in STRATEGIES:
        for symbol in SYMBOLS:
            slots = draw(st.sets(st.integers(0, 20), max_size=3))
            for slot in sorted(slots):
                out.append(Trade(
                    slot * 200_000 + draw(st.integers(0, 50_000)), symbol, draw(st.sampled_from(("buy", "sell", "BUY", "s"))),
                    draw(st.integers(1, 500)), draw(prices), strategy,
                ))
    if not out:
        out.append(Trade(0, "AAPL", "buy", 1, Decimal("1.5"), "momentum"))
    return draw(st.permutations(out))


@SETTINGS
@given(legit=spaced_history(), injections=st.lists(injection, min_size=1, max_size=4))
def test_plan_removes_exactly_the_injected_duplicates(legit: list[Trade], injections: list[tuple[int, list[int]]]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path, _trades, copies = write_db(folder, legit, injections)
        conn = sqlite3.connect(path)
        original = conn.execute("SELECT * FROM trades ORDER BY id").fetchall()
        conn.close()
        report = audit(path, settings=Settings(window_seconds=WINDOW_S))
        assert {int(i) for c in report.duplicates for i in c.repeat_ids} == set(copies)
        assert all(c.verdict is Verdict.DUPLICATE for c in report.clusters)
        assert report.excess_qty == sum((Decimal(_trades[i].qty) for i in copies), Decimal(0))
        plan = str(Path(folder) / "fix.sql")
        write_plan(report, plan)
        result = apply_plan(path, plan)
        assert result.deleted == len(copies)
        again = audit(path, settings=Settings(window_seconds=WINDOW_S))
        assert again.clusters == ()
        assert again.rows == len(legit)
        apply_plan(path, rollback_path(plan))
        conn = sqlite3.connect(path)
        assert conn.execute("SELECT * FROM trades ORDER BY id").fetchall() == original
        conn.close()
