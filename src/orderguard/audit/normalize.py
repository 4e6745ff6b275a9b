"""Turn the raw trades columns into one typed DuckDB table, refusing values that are not what they claim.

Every role gets an explicit parse (times as ISO text, SQL timestamps or Unix epochs in s/ms/µs;
quantities and prices as exact decimals: NaN, infinities and text are refused), so a column of
mixed types fails with the rows that are wrong instead of being guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import AuditSourceError
from .source import quote

if TYPE_CHECKING:
    import duckdb

    from .columns import TradeColumns

NUMERIC = "DECIMAL(38,10)"
BUY_WORDS = ("buy", "b", "bot", "bought", "long", "buy_to_open", "buy_to_cover", "buy_to_close", "cover")
SELL_WORDS = ("sell", "s", "sld", "sold", "short", "sell_short", "sell_to_open", "sell_to_close")
TIME_TYPES = ("TIMESTAMP", "DATE")
NUMBER_TYPES = ("INT", "BIGINT", "SMALLINT", "TINYINT", "HUGEINT", "DOUBLE", "FLOAT", "REAL", "DECIMAL", "UBIGINT", "UINTEGER")
EXAMPLES = 3
MAX_US = 7_258_118_400_000_000  # 2200-01-01: a time past it (or before 1970) is no trade's time


@dataclass(frozen=True)
class Normalized:
    """The typed trades table ``og_trades``: rid, us (µs since the epoch, UTC), s0.. (scope), symbol,
    side (BUY/SELL), qty (a size: never negative), price. Notional is ``qty * price``, computed where
    needed (it is a 38-digit multiplication: not done for the millions of rows no cluster holds)."""

    rows: int
    skipped: int
    negative_qty: int
    rid_is_row_number: bool
    warnings: tuple[str, ...]


def _epoch_us(number: str) -> str:
    # A Unix time in seconds, milliseconds, microseconds or nanoseconds, told apart by magnitude.
    # TRY_CAST: an infinite, NaN or out-of-range number is no time (NULL, refused with the row).
    return (
        f"TRY_CAST(round(CASE WHEN abs({number}) < 1e11 THEN {number} * 1e6 WHEN abs({number}) < 1e14 "
        f"THEN {number} * 1e3 WHEN abs({number}) < 1e17 THEN {number} ELSE {number} / 1e3 END) AS BIGINT)"
    )


def time_expr(column: str, kind: str) -> str:
    col = quote(column)
    if kind.startswith(("TIMESTAMP WITH TIME ZONE", "TIMESTAMPTZ", "DATE")):
        return f"epoch_us(CAST({col} AS TIMESTAMPTZ))"
    if kind.startswith(TIME_TYPES):  # a naive timestamp is read as UTC, as naive text is
        return f"epoch_us({col})"
    if kind.startswith(NUMBER_TYPES):
        return _epoch_us(f"CAST({col} AS DOUBLE)")
    text = f"CAST({col} AS VARCHAR)"
    return f"coalesce(epoch_us(TRY_CAST({text} AS TIMESTAMPTZ)), {_epoch_us(f'TRY_CAST({text} AS DOUBLE)')})"


def number_expr(column: str, kind: str) -> str:
    col = quote(column)
    if kind.startswith(NUMBER_TYPES):
        # integers and decimals convert exactly; a binary float rounds to 10 decimals (its shortest
        # text would too), and NaN or infinity does not convert at all (NULL: refused)
        return f"TRY_CAST({col} AS {NUMERIC})"
    text = f"trim(CAST({col} AS VARCHAR))"
    # DOUBLE NaN/inf and the text 'nan' do not cast to DECIMAL: they come out NULL and are refused
    return f"coalesce(TRY_CAST({text} AS {NUMERIC}), TRY_CAST(TRY_CAST({text} AS DOUBLE) AS {NUMERIC}))"


def side_expr(column: str) -> str:
    word = f"lower(trim(CAST({quote(column)} AS VARCHAR)))"
    buys = ", ".join(f"'{w}'" for w in BUY_WORDS)
    sells = ", ".join(f"'{w}'" for w in SELL_WORDS)
    return f"CASE WHEN {word} IN ({buys}) THEN 'BUY' WHEN {word} IN ({sells}) THEN 'SELL' END"


def normalize(
    con: duckdb.DuckDBPyConnection, raw: str, cols: TradeColumns, where: str, *, skip_bad_rows: bool = False,
    id_type: str = "",
) -> Normalized:
    """Build ``og_trades`` from the raw relation ``raw``; rows that do not parse are an error naming
    the column, how many rows and examples, unless ``skip_bad_rows`` (then they are counted and left out)."""
    kinds = {str(r[0]): str(r[1]).upper() for r in con.execute(f"DESCRIBE {quote(raw)}").fetchall()}
    rid_is_row_number = cols.id is None
    rid = "row_number() OVER ()" if cols.id is None else _rid_expr(con, raw, cols.id, id_type or kinds[cols.id])
    scope = ", ".join(f"coalesce(CAST({quote(c)} AS VARCHAR), '') AS s{i}" for i, c in enumerate(cols.scope))
    parsed = {
        "time": time_expr(cols.time, kinds[cols.time]),
        "symbol": f"NULLIF(trim(CAST({quote(cols.symbol)} AS VARCHAR)), '')",
        "side": side_expr(cols.side),
        "qty": number_expr(cols.qty, kinds[cols.qty]),
        "price": number_expr(cols.price, kinds[cols.price]),
    }
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE og_parsed AS SELECT {rid} AS rid, {parsed['time']} AS us, "
        + (scope + ", " if scope else "")
        + f"{parsed['symbol']} AS symbol, {parsed['side']} AS side, {parsed['qty']} AS qty, {parsed['price']} AS price "
        f"FROM {quote(raw)}"
    )
    counts = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE us IS NULL OR us < 0 OR us > {MAX_US}), count(*) FILTER (WHERE symbol IS NULL), "
        "count(*) FILTER (WHERE side IS NULL), count(*) FILTER (WHERE qty IS NULL OR qty = 0), "
        "count(*) FILTER (WHERE price IS NULL OR price <= 0), count(*) FILTER (WHERE qty < 0) FROM og_parsed"
    ).fetchone()
    assert counts is not None
    total, bad_time, bad_symbol, bad_side, bad_qty, bad_price, negative = (int(n) for n in counts)
    if total == 0:
        raise AuditSourceError(f"{where} is empty: there are no trades to audit")
    problems = [
        (bad_time, "time", cols.time, "{p}us IS NULL OR {p}us < 0 OR {p}us > " + str(MAX_US), "is not a time from 1970 to 2200 (ISO 8601 text, a SQL timestamp, or Unix s/ms/µs/ns)"),
        (bad_symbol, "symbol", cols.symbol, "{p}symbol IS NULL", "is empty"),
        (bad_side, "side", cols.side, "{p}side IS NULL", "is not a side (buy/sell, b/s, long/short, ...)"),
        (bad_qty, "qty", cols.qty, "{p}qty IS NULL OR {p}qty = 0", "is not a non-zero finite number"),
        (bad_price, "price", cols.price, "{p}price IS NULL OR {p}price <= 0", "is not a positive finite number"),
    ]
    found = [p for p in problems if p[0]]
    skipped = 0
    warnings: list[str] = []
    if found and not skip_bad_rows:
        count, _role, column, condition, what = found[0]
        examples = _examples(con, raw, cols, column, condition, rid)
        more = "; other columns too: " + ", ".join(f"{p[2]!r} ({p[0]} rows)" for p in found[1:]) if len(found) > 1 else ""
        raise AuditSourceError(
            f"column {column!r} of {where} {what} in {count} of {total} rows (e.g. {examples}){more}. "
            "Fix those rows, map another column, or pass --skip-bad-rows to leave them out of the audit"
        )
    if found:
        bad = " OR ".join(f"({p[3].format(p='')})" for p in found)
        skipped = int(con.execute(f"SELECT count(*) FROM og_parsed WHERE {bad}").fetchone()[0])  # type: ignore[index]
        con.execute(f"DELETE FROM og_parsed WHERE {bad}")
        warnings.append(f"{skipped} rows left out (--skip-bad-rows): " + ", ".join(f"{p[0]} with a bad {p[1]}" for p in found))
    if negative:
        con.execute("UPDATE og_parsed SET qty = abs(qty) WHERE qty < 0")
        warnings.append(f"{negative} rows hold negative quantities; read as their size, with the side column giving the direction")
    if total - skipped == 0:
        raise AuditSourceError(f"no row of {where} is a valid trade")
    con.execute("ALTER TABLE og_parsed RENAME TO og_trades")
    return Normalized(total - skipped, skipped, negative, rid_is_row_number, tuple(warnings))


def _rid_expr(con: duckdb.DuckDBPyConnection, raw: str, column: str, declared: str) -> str:
    # Row keys keep the source's kind: integers stay integers, text stays text ('0001' is not 1),
    # so a correction plan names the rows exactly as the source does. Undeclared (SQLite) and text
    # columns of files count as integers only when every value is an integer written plainly.
    col = quote(column)
    kind = declared.upper()
    if "INT" in kind and not kind.startswith(("INTERVAL", "POINT")):
        return f"CAST({col} AS BIGINT)"
    if kind not in ("", "VARCHAR"):
        return f"CAST({col} AS VARCHAR)"
    text = f"CAST({col} AS VARCHAR)"
    row = con.execute(
        f"SELECT count(*) FILTER (WHERE {col} IS NOT NULL AND (TRY_CAST({text} AS BIGINT) IS NULL "
        f"OR CAST(TRY_CAST({text} AS BIGINT) AS VARCHAR) != {text})) FROM {quote(raw)}"
    ).fetchone()
    return f"CAST({col} AS BIGINT)" if row is not None and row[0] == 0 else text


def _examples(con: duckdb.DuckDBPyConnection, raw: str, cols: TradeColumns, column: str, condition: str, rid: str) -> str:
    # Re-read the raw values of the failing rows, so the message shows what the source holds.
    if cols.id is None:
        sql = f"SELECT row_number() OVER () AS rid, CAST({quote(column)} AS VARCHAR) AS value FROM {quote(raw)}"
    else:
        sql = f"SELECT {rid} AS rid, CAST({quote(column)} AS VARCHAR) AS value FROM {quote(raw)}"
    rows = con.execute(
        f"SELECT r.rid, r.value FROM ({sql}) r JOIN og_parsed p ON p.rid = r.rid WHERE {condition.format(p='p.')} "
        f"ORDER BY r.rid LIMIT {EXAMPLES}"
    ).fetchall()
    label = "row" if cols.id is None else ("rowid" if cols.id == "__og_rowid" else cols.id)
    return "; ".join(f"{label} {r[0]}: {r[1]!r}" for r in rows)
