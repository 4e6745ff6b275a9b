"""Run an audit: load, normalise, cluster, reconcile."""

from __future__ import annotations

import time
from dataclasses import replace
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Protocol

from ..errors import AuditSourceError
from .books import check_cash, check_positions, load_cash, load_positions
from .clusters import Settings, find_clusters
from .columns import map_trade_columns
from .normalize import normalize
from .report import AuditReport
from .source import (
    Snapshot,
    Source,
    SourceKind,
    check_name,
    has_rowid,
    list_tables,
    load_table,
    parse_source,
    stored_as_integers,
    table_columns,
)

if TYPE_CHECKING:
    import duckdb

TRADE_TABLES = ("trades", "fills", "executions", "orders", "trade_history")


class Progress(Protocol):
    """What an audit reports while it works (the CLI draws it with rich)."""

    def phase(self, name: str, total: int | None = None) -> None: ...

    def advance(self, done: int) -> None: ...


def connect() -> duckdb.DuckDBPyConnection:
    try:
        import duckdb
    except ImportError as exc:
        raise AuditSourceError(f"the audit needs its extra: pip install 'orderguard[audit]' ({exc.name} missing)") from None
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")  # it would write into stdout (and --json)
    return con


def pick_table(source: Source, table: str | None, snapshot: Snapshot | None = None) -> str | None:
    """The trades table: as given, else the one conventional name the database has."""
    if not source.is_database:
        if table is not None:
            raise AuditSourceError(f"--table applies to databases; {source.location} is a {source.kind.value.upper()} file")
        return None
    if table is not None:
        check_name(table, "table")
        return table
    tables = list_tables(source, snapshot)
    found = [t for t in TRADE_TABLES if t in tables]
    if len(found) == 1 or (found and found[0] == "trades"):
        return found[0]
    raise AuditSourceError(f"which table holds the trades? pass --table NAME (tables in {source.display}: {', '.join(tables) or 'none'})")


def audit(
    source: str | Source,
    *,
    table: str | None = None,
    time_column: str | None = None,
    symbol: str | None = None,
    side: str | None = None,
    qty: str | None = None,
    price: str | None = None,
    id_column: str | None = None,
    scope: list[str] | None = None,
    settings: Settings | None = None,
    positions: str | None = None,
    cash: str | None = None,
    starting_cash: Decimal | str | None = None,
    skip_bad_rows: bool = False,
    progress: Progress | None = None,
) -> AuditReport:
    """Scan a trade history for duplicate bursts and, when given, reconcile it against positions and cash.

    ``source`` is a SQLite file, a ``postgresql://`` URL, or a CSV/Parquet file. Columns not
    given are found by common names; ``scope`` (default: account/bot/strategy/expert columns that
    exist) splits the history into independent streams. Read-only: nothing is written to the source.
    Raises :class:`~orderguard.errors.AuditSourceError` with a message for the operator.
    """
    started = time.perf_counter()
    src = source if isinstance(source, Source) else parse_source(source)
    settings = settings or Settings()
    start_cash = _starting(starting_cash)
    given = {"time": time_column, "symbol": symbol, "side": side, "qty": qty, "price": price, "id": id_column}
    with Snapshot(src) as snap:
        report = _audit(src, snap, table, settings, start_cash, given, scope, positions, cash, skip_bad_rows, progress)
    return replace(report, seconds=time.perf_counter() - started)


def _audit(
    src: Source, snap: Snapshot, table: str | None, settings: Settings, start_cash: Decimal | None,
    given: dict[str, str | None], scope: list[str] | None, positions: str | None, cash: str | None,
    skip_bad_rows: bool, progress: Progress | None,
) -> AuditReport:
    table = pick_table(src, table, snap)
    where = f"table {table!r}" if table else src.location
    columns = table_columns(src, table, snap)
    cols = map_trade_columns(columns, where, given, scope)
    import duckdb

    con = connect()
    try:
        use_rowid = cols.id is None and table is not None and has_rowid(src, table, snap)
        wanted = [*cols.scope, cols.time, cols.symbol, cols.side, cols.qty, cols.price, *([cols.id] if cols.id else [])]
        if progress is not None:
            progress.phase(f"reading {where}")
        load_table(
            con, src, table, list(dict.fromkeys(wanted)), "og_raw", rowid=use_rowid,
            progress=progress.advance if progress else None,
            total=(lambda n: progress.phase(f"reading {where}", n)) if progress else None,
            snapshot=snap,
        )
        if use_rowid:
            cols = replace(cols, id="__og_rowid")
        if progress is not None:
            progress.phase("checking values")
        id_type = "INTEGER" if use_rowid else next((c.type for c in columns if c.name == cols.id), "")
        if cols.id and not id_type and table is not None and src.kind is SourceKind.SQLITE:
            id_type = "INTEGER" if stored_as_integers(src, table, cols.id, snap) else "TEXT"
        norm = normalize(con, "og_raw", cols, where, skip_bad_rows=skip_bad_rows, id_type=id_type)
        if use_rowid:
            cols = replace(cols, id="rowid")
        if progress is not None:
            progress.phase("finding clusters")
        clusters = find_clusters(con, len(cols.scope), settings)
        row = con.execute("SELECT min(us), max(us), count(DISTINCT symbol) FROM og_trades").fetchone()
        assert row is not None
        first_us, last_us, symbols = row
        # only a database source can get a correction plan, which needs a unique row key
        id_unique = src.is_database and not con.execute(
            "SELECT 1 FROM og_trades GROUP BY rid HAVING count(*) > 1 LIMIT 1"
        ).fetchone()
        positions_ref = cash_ref = None
        position_checks = cash_checks = None
        if positions is not None:
            if progress is not None:
                progress.phase("reconciling positions")
            positions_ref = load_positions(con, src, positions, cols, snap)
            position_checks = tuple(check_positions(con, positions_ref, cols, clusters))
        report = AuditReport(
            source=src, table=table, columns=cols, settings=settings, rows=norm.rows, skipped_rows=norm.skipped,
            first_us=int(first_us), last_us=int(last_us), symbols=int(symbols), clusters=tuple(clusters),
            positions=position_checks, cash=None, positions_ref=positions_ref, cash_ref=None,
            id_unique=bool(id_unique) and not norm.rid_is_row_number, warnings=norm.warnings, seconds=0.0,
        )
        if cash is not None:
            if progress is not None:
                progress.phase("reconciling cash")
            cash_ref = load_cash(con, src, cash, cols, snap)
            cash_checks = tuple(check_cash(con, cash_ref, cols, report.fixable(), start_cash))
            missing = replace(report, cash=cash_checks, cash_ref=cash_ref).cash_missing()
            if missing:
                report = replace(report, warnings=(*report.warnings, (
                    f"phantom duplicates drained cash of {', '.join(missing)}, which the cash table has no row for "
                    "(that cash error is not in the figures below)"
                )))
        elif start_cash is not None:
            raise AuditSourceError("--starting-cash needs --cash TABLE (the cash it is compared with)")
    except duckdb.Error as exc:  # e.g. bytes that are not UTF-8 past the part DuckDB sniffed
        raise AuditSourceError(f"cannot read {where} of {src.display}: {str(exc).strip().splitlines()[0]}") from None
    finally:
        con.close()
    return replace(report, cash=cash_checks, cash_ref=cash_ref)


def _starting(value: Decimal | str | None) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, float):
        raise AuditSourceError("--starting-cash must be exact: give it as a string or Decimal")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise AuditSourceError(f"--starting-cash {value!r} is not a number") from None
    if not number.is_finite() or number < 0:
        raise AuditSourceError(f"--starting-cash {value!r} must be a finite amount, zero or more")
    return number
