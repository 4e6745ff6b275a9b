"""Find clusters of repeated orders in ``og_trades`` and score how likely each is a duplicate burst.

A cluster is a run of trades of one scope (the scope columns, symbol and side) in which each
trade follows the previous one within ``window`` seconds. Every trade after the first is scored
against the trade just before it:

* timing 1 − gap/window: duplicates come seconds apart;
* size   min(q, q')/max(q, q'): duplicates repeat the size;
* price  1 − |p − p'| / (p' · price_tolerance), floored at 0: duplicates fill at the same price;

score = 0.5·timing + 0.3·size + 0.2·price. A trade scoring at least ``min_confidence`` is a
duplicate of the one before it (which is kept); a burst of identical orders scores near 1, a
deliberate scale-in (tens of seconds or minutes apart, another size, the price moved) scores
low. Comparing with the previous trade rather than the cluster's first keeps an unrelated trade
that happened to come just before a burst from being mistaken for the burst's original.
A cluster's confidence is the mean score of its duplicates (of all its repeats if it has none).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from ..errors import AuditSourceError
from .normalize import NUMERIC

if TYPE_CHECKING:
    import duckdb

ZERO = Decimal(0)
POSSIBLE_FLOOR = 0.5  # below this a cluster reads as deliberate (scale-in)
WEIGHTS = (0.5, 0.3, 0.2)


class Verdict(StrEnum):
    DUPLICATE = "DUPLICATE"  # holds at least one trade scoring >= min_confidence: counted
    POSSIBLE = "POSSIBLE"  # shown for review, not counted, never in a plan
    SCALE_IN = "SCALE_IN"  # reads as deliberate


@dataclass(frozen=True)
class Settings:
    """How clusters are found and judged."""

    window_seconds: float = 60.0
    min_confidence: float = 0.8
    price_tolerance: float = 0.01  # a 1 % move from the first fill scores 0 on price

    def __post_init__(self) -> None:
        if not 0.001 <= self.window_seconds <= 86_400 * 7:
            raise AuditSourceError("--window must be at least 1 ms and at most 7 days")
        if not POSSIBLE_FLOOR <= self.min_confidence <= 1:
            raise AuditSourceError(f"--min-confidence must be between {POSSIBLE_FLOOR} and 1")
        if not 0 < self.price_tolerance <= 1:
            raise AuditSourceError("--price-tolerance must be more than 0 and at most 1 (a fraction: 0.01 is 1 %)")


@dataclass(frozen=True)
class Cluster:
    """One run of repeated orders. Quantities and money are exact decimals."""

    scope: tuple[str, ...]
    symbol: str
    side: str
    orders: int
    first_us: int
    last_us: int
    first_id: Any
    repeat_ids: tuple[Any, ...]  # the trades judged duplicates (each repeats the trade before it)
    excess_qty: Decimal  # sum of the duplicates' quantities
    phantom_notional: Decimal  # sum of the duplicates' quantity x price
    confidence: float
    max_gap_seconds: float
    verdict: Verdict

    @property
    def repeats(self) -> int:
        """How many of the cluster's orders are duplicates."""
        return len(self.repeat_ids)

    @property
    def cash_effect(self) -> Decimal:
        """Cash the repeats moved: positive = drained (buys), negative = credited (sells)."""
        return self.phantom_notional if self.side == "BUY" else -self.phantom_notional


def find_clusters(con: duckdb.DuckDBPyConnection, scope_width: int, settings: Settings) -> list[Cluster]:
    """Every cluster of two or more trades in ``og_trades``, most phantom money first."""
    window_us = int(settings.window_seconds * 1_000_000)
    keys = ", ".join([*(f"s{i}" for i in range(scope_width)), "symbol", "side"])
    w_time, w_size, w_price = WEIGHTS
    # One window pass over every trade finds the few that have a neighbour within the window;
    # only those are numbered into clusters and scored (a second pass over a small set).
    score = (
        f"{w_time} * greatest(0, 1 - gap_prev / {window_us}) + {w_size} * least(qty, q1) / greatest(qty, q1) "
        f"+ {w_price} * greatest(0, 1 - abs(price - p1) / (p1 * {settings.price_tolerance}))"
    )
    # The first pass sorts every trade carrying only its table row number and time (the sort payload
    # is what costs on millions of rows) and keeps those with a neighbour within the window. Only
    # those are read again, numbered into clusters and scored: their gaps come out the same, since a
    # trade's previous trade within the window has a neighbour within the window too. (The first
    # pass needs no tie-break: trades at the same instant are each other's neighbours.) In the
    # second, ties in time keep the order the source gave them (the table's row number).
    # Partitioning by one 64-bit hash of the keys sorts far faster than by their text; it is used
    # only when no two distinct keys of this history share a hash (checked on the distinct keys).
    row = con.execute(f"SELECT count(*) - count(DISTINCT hash({keys})) FROM (SELECT DISTINCT {keys} FROM og_trades)").fetchone()
    partition = f"hash({keys})" if row is not None and row[0] == 0 else keys
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE og_members AS
        SELECT r FROM (
            SELECT rowid AS r, us - lag(us) OVER w AS gap_prev, lead(us) OVER w - us AS gap_next
            FROM og_trades WINDOW w AS (PARTITION BY {partition} ORDER BY us)
        ) WHERE gap_prev <= {window_us} OR gap_next <= {window_us}
        """
    )
    rows = con.execute(
        f"""
        WITH m AS (
            SELECT rowid AS r, * FROM og_trades WHERE rowid IN (SELECT r FROM og_members)
        ), g AS (
            SELECT *, us - lag(us) OVER w AS gap_prev, lag(qty) OVER w AS q1, lag(price) OVER w AS p1
            FROM m WINDOW w AS (PARTITION BY {keys} ORDER BY us, r)
        ), c AS (
            SELECT *, sum(CASE WHEN gap_prev IS NULL OR gap_prev > {window_us} THEN 1 ELSE 0 END)
                OVER (PARTITION BY {keys} ORDER BY us, r ROWS UNBOUNDED PRECEDING) AS cl
            FROM g
        ), d AS (
            SELECT *, row_number() OVER k AS pos, first_value(rid) OVER k AS rid0,
                   CASE WHEN gap_prev <= {window_us} THEN {score} END AS score
            FROM c WINDOW k AS (PARTITION BY {keys}, cl ORDER BY us, r)
        ), e AS (
            SELECT *, pos > 1 AND score >= {settings.min_confidence} AS dup,
                   CAST(qty * price AS {NUMERIC}) AS notional FROM d
        )
        SELECT [{', '.join(f's{i}' for i in range(scope_width))}]::VARCHAR[] AS scope, symbol, side, count(*) AS orders,
               min(us), max(us), any_value(rid0), list(rid ORDER BY us, r) FILTER (WHERE dup),
               coalesce(sum(qty) FILTER (WHERE dup), 0), coalesce(sum(notional) FILTER (WHERE dup), 0) AS phantom,
               coalesce(avg(score) FILTER (WHERE dup), avg(score) FILTER (WHERE pos > 1)),
               max(gap_prev) FILTER (WHERE pos > 1), count(*) FILTER (WHERE dup)
        FROM e GROUP BY {keys}, cl HAVING count(*) > 1
        ORDER BY phantom DESC, symbol, min(us)
        """
    ).fetchall()
    con.execute("DROP TABLE og_members")
    min_confidence = settings.min_confidence
    return [_cluster(row, min_confidence) for row in rows]


def _cluster(row: tuple[Any, ...], min_confidence: float) -> Cluster:
    scope, symbol, side, orders, first_us, last_us, first_id, repeat_ids, excess, notional, score, gap, dups = row
    confidence = round(score, 4)
    if dups:
        verdict = Verdict.DUPLICATE
    elif confidence >= POSSIBLE_FLOOR:
        verdict = Verdict.POSSIBLE
    else:
        verdict = Verdict.SCALE_IN
    if dups:
        excess, notional = _dec(excess), _dec(notional)
    else:
        excess = notional = ZERO
    return Cluster(
        tuple(scope), symbol, side, orders, first_us, last_us, first_id, tuple(repeat_ids or ()),
        excess, notional, confidence, gap / 1e6, verdict,
    )


def _dec(value: Any) -> Decimal:
    """A DuckDB decimal without its trailing zeros (``Decimal('100.0000000000')`` → ``100``)."""
    number = Decimal(value)
    normal = number.normalize()
    return normal.quantize(Decimal(1)) if normal == normal.to_integral_value() else normal
