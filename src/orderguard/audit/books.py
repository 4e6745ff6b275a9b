"""Reconcile the trades against a positions table and a cash table, and size the cash error.

The disaster this is for: every task recorded its buy and paid for it in the cash table, while
the positions table accumulated correctly. Per symbol (and per account where both tables have
that column), the trades' net quantity is compared with the position twice, with and without
the duplicates found:

* PHANTOM: the position matches the trades *without* the duplicates: they were recorded (and
  paid for in the cash table) but never held. These are what a correction plan deletes.
* REAL: the position matches the trades *with* the duplicates: the venue filled them. Deleting
  them would falsify the history; reduce the position at the venue instead.
* OK: no duplicates and the position matches.
* UNEXPLAINED: neither matches (a position opened before this history, or another error).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING

from ..errors import AuditSourceError
from .clusters import Cluster, Verdict, _dec
from .columns import CASH_NAMES, POSITION_QTY_NAMES, TRADE_ROLES, pick_column
from .normalize import NUMERIC, number_expr
from .source import Snapshot, Source, SourceKind, load_table, parse_source, quote, table_columns

if TYPE_CHECKING:
    import duckdb

    from .columns import TradeColumns


class BookStatus(StrEnum):
    PHANTOM = "PHANTOM"
    REAL = "REAL"
    OK = "OK"
    UNEXPLAINED = "UNEXPLAINED"
    UNVERIFIED = "UNVERIFIED"  # no positions table was given


@dataclass(frozen=True)
class PositionCheck:
    key: tuple[str, ...]  # values of the join columns (account, ...) shared by trades and positions
    symbol: str
    trades_net: Decimal
    duplicates_net: Decimal
    position: Decimal
    status: BookStatus


@dataclass(frozen=True)
class CashCheck:
    key: tuple[str, ...]
    recorded: Decimal
    phantom: Decimal  # cash drained by phantom buys minus cash credited by phantom sells
    corrected: Decimal  # recorded + phantom: what the cash would be without the phantoms
    trades_flow: Decimal  # sells minus buys over every trade of this key
    starting: Decimal | None  # when given: starting + trades_flow is what the trades imply
    implied_by_trades: Decimal | None


@dataclass(frozen=True)
class TableRef:
    """A positions or cash table: in the audited database, or a file for file sources."""

    source: Source
    table: str | None
    columns: tuple[str, ...]  # the join columns, then the value column
    join: tuple[str, ...]  # names of the join columns in the trades table


def resolve(source: Source, name: str) -> tuple[Source, str | None]:
    """A positions/cash table of the audited database, or a separate file for file sources."""
    if source.is_database:
        return source, name
    other = parse_source(name)
    if other.kind not in (SourceKind.CSV, SourceKind.PARQUET):
        raise AuditSourceError(f"{name}: with a file source, positions and cash are CSV or Parquet files too")
    return other, None


def _join_columns(trade_cols: TradeColumns, columns: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Scope columns of the trades that the other table has too (same name, any case)."""
    mine, theirs = [], []
    for name in trade_cols.scope:
        found = next((c for c in columns if c.lower() == name.lower()), None)
        if found is not None:
            mine.append(name)
            theirs.append(found)
    return tuple(mine), tuple(theirs)


def load_positions(
    con: duckdb.DuckDBPyConnection, source: Source, name: str, trade_cols: TradeColumns, snapshot: Snapshot | None = None,
) -> TableRef:
    src, table = resolve(source, name)
    snap = snapshot if src is source else None
    where = f"positions table {name!r}"
    cols = table_columns(src, table, snap)
    symbol = pick_column(cols, TRADE_ROLES["symbol"], "symbol", where)
    qty = pick_column(cols, POSITION_QTY_NAMES, "position quantity", where)
    join, theirs = _join_columns(trade_cols, [c.name for c in cols])
    load_table(con, src, table, [*theirs, symbol, qty], "og_positions_raw", snapshot=snap)
    kinds = {str(r[0]): str(r[1]).upper() for r in con.execute("DESCRIBE og_positions_raw").fetchall()}
    keys = ", ".join(f"coalesce(CAST({quote(c)} AS VARCHAR), '') AS j{i}" for i, c in enumerate(theirs))
    con.execute(
        "CREATE OR REPLACE TEMP TABLE og_positions AS SELECT " + (keys + ", " if keys else "")
        + f"trim(CAST({quote(symbol)} AS VARCHAR)) AS symbol, {number_expr(qty, kinds[qty])} AS qty FROM og_positions_raw"
    )
    bad = con.execute("SELECT count(*) FROM og_positions WHERE qty IS NULL OR symbol IS NULL OR symbol = ''").fetchone()
    if bad and bad[0]:
        raise AuditSourceError(f"{where}: {bad[0]} rows have no symbol or a quantity that is not a number")
    return TableRef(src, table, (*theirs, symbol, qty), join)


def load_cash(
    con: duckdb.DuckDBPyConnection, source: Source, name: str, trade_cols: TradeColumns, snapshot: Snapshot | None = None,
) -> TableRef:
    src, table = resolve(source, name)
    snap = snapshot if src is source else None
    where = f"cash table {name!r}"
    cols = table_columns(src, table, snap)
    cash = pick_column(cols, CASH_NAMES, "cash", where)
    join, theirs = _join_columns(trade_cols, [c.name for c in cols if c.name != cash])
    load_table(con, src, table, [*theirs, cash], "og_cash_raw", snapshot=snap)
    kinds = {str(r[0]): str(r[1]).upper() for r in con.execute("DESCRIBE og_cash_raw").fetchall()}
    keys = ", ".join(f"coalesce(CAST({quote(c)} AS VARCHAR), '') AS j{i}" for i, c in enumerate(theirs))
    con.execute(
        "CREATE OR REPLACE TEMP TABLE og_cash AS SELECT " + (keys + ", " if keys else "")
        + f"{number_expr(cash, kinds[cash])} AS cash FROM og_cash_raw"
    )
    counts = con.execute("SELECT count(*), count(*) FILTER (WHERE cash IS NULL) FROM og_cash").fetchone()
    assert counts is not None
    if counts[0] == 0:
        raise AuditSourceError(f"{where} is empty")
    if counts[1]:
        raise AuditSourceError(f"{where}: {counts[1]} rows hold a cash value that is not a number")
    if not theirs:
        if counts[0] != 1:
            raise AuditSourceError(
                f"{where} has {counts[0]} rows and no column shared with the trades' scope ({', '.join(trade_cols.scope) or 'none'}) "
                "to tell them apart; give a table with one row, or one keyed by the trades' account column"
            )
    else:
        dup = con.execute(
            f"SELECT count(*) FROM (SELECT {', '.join(f'j{i}' for i in range(len(theirs)))} FROM og_cash GROUP BY ALL HAVING count(*) > 1)"
        ).fetchone()
        if dup and dup[0]:
            raise AuditSourceError(f"{where}: {dup[0]} keys ({', '.join(theirs)}) appear on more than one row")
    return TableRef(src, table, (*theirs, cash), join)


def _key_exprs(trade_cols: TradeColumns, join: tuple[str, ...]) -> list[str]:
    return [f"s{trade_cols.scope.index(name)}" for name in join]


def check_positions(
    con: duckdb.DuckDBPyConnection, ref: TableRef, trade_cols: TradeColumns, clusters: list[Cluster],
) -> list[PositionCheck]:
    keys = _key_exprs(trade_cols, ref.join)
    select_keys = "".join(f"{k} AS j{i}, " for i, k in enumerate(keys))
    group = "".join(f"j{i}, " for i in range(len(keys)))
    net = con.execute(
        f"SELECT {select_keys}symbol, sum(CASE WHEN side = 'BUY' THEN qty ELSE -qty END) AS net FROM og_trades "
        f"GROUP BY {group}symbol"
    ).fetchall()
    trades = {tuple(r[:-1]): Decimal(r[-1]) for r in net}
    held = {
        tuple(r[:-1]): Decimal(r[-1])
        for r in con.execute(f"SELECT {group}symbol, CAST(sum(qty) AS {NUMERIC}) FROM og_positions GROUP BY ALL").fetchall()
    }
    dupes: dict[tuple[str, ...], Decimal] = {}
    positions_of = [trade_cols.scope.index(name) for name in ref.join]
    for c in clusters:
        if c.verdict is Verdict.DUPLICATE:
            key = (*(c.scope[i] for i in positions_of), c.symbol)
            signed = c.excess_qty if c.side == "BUY" else -c.excess_qty
            dupes[key] = dupes.get(key, Decimal(0)) + signed
    out = []
    for key in sorted(set(trades) | set(held)):
        t, d, p = trades.get(key, Decimal(0)), dupes.get(key, Decimal(0)), held.get(key, Decimal(0))
        if d and t - d == p:
            status = BookStatus.PHANTOM
        elif d and t == p:
            status = BookStatus.REAL
        elif not d and t == p:
            status = BookStatus.OK
        else:
            status = BookStatus.UNEXPLAINED
        out.append(PositionCheck(tuple(key[:-1]), key[-1], _dec(t), _dec(d), _dec(p), status))
    return out


def check_cash(
    con: duckdb.DuckDBPyConnection, ref: TableRef, trade_cols: TradeColumns, fixable: list[Cluster],
    starting: Decimal | None,
) -> list[CashCheck]:
    """Cash per key, and what it would be without the cash effect of ``fixable`` (the duplicate
    clusters confirmed as phantoms, or every duplicate when no positions table was given)."""
    keys = _key_exprs(trade_cols, ref.join)
    select_keys = "".join(f"{k} AS j{i}, " for i, k in enumerate(keys))
    group = ", ".join(f"j{i}" for i in range(len(keys)))
    flows = {
        tuple(r[:-1]): Decimal(r[-1])
        for r in con.execute(
            f"SELECT {select_keys}sum(CASE WHEN side = 'SELL' THEN 1 ELSE -1 END * CAST(qty * price AS {NUMERIC})) FROM og_trades"
            + (f" GROUP BY {group}" if group else "")
        ).fetchall()
    }
    recorded = {tuple(r[:-1]): Decimal(r[-1]) for r in con.execute("SELECT * FROM og_cash").fetchall()}
    if starting is not None and len(recorded) != 1:
        raise AuditSourceError("--starting-cash needs a cash table with one row (one account)")
    positions_of = [trade_cols.scope.index(name) for name in ref.join]
    phantom: dict[tuple[str, ...], Decimal] = {}
    for c in fixable:
        key = tuple(c.scope[i] for i in positions_of)
        phantom[key] = phantom.get(key, Decimal(0)) + c.cash_effect
    out = []
    for key, cash in sorted(recorded.items()):
        fix = phantom.get(key, Decimal(0))
        flow = flows.get(key, Decimal(0))
        out.append(CashCheck(
            key, _dec(cash), _dec(fix), _dec(cash + fix), _dec(flow), starting,
            _dec(starting + flow) if starting is not None else None,
        ))
    return out


def position_key(cluster: Cluster, trade_cols: TradeColumns, ref: TableRef) -> tuple[str, ...]:
    """The (join values..., symbol) a cluster falls under in the positions check."""
    return (*(cluster.scope[trade_cols.scope.index(name)] for name in ref.join), cluster.symbol)
