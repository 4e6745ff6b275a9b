"""``orderguard.audit`` sources: reading SQLite, PostgreSQL, CSV and Parquet histories, finding the
columns, refusing bad values with a clear typed error, and the clustering rules on tiny tables.

Every table here is built by hand, a handful of rows, so each expectation can be checked by eye.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import sqlite3
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest

from orderguard.audit import Settings, Verdict, audit
from orderguard.audit.source import parse_source, redact_url
from orderguard.errors import AuditError, AuditSourceError
from tests.audit.times import T0, iso, with_password
from tests.helpers import need_duckdb

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from orderguard.audit import AuditReport




duckdb = need_duckdb()

EPOCH0 = int(T0.timestamp())
COLS = ("id", "timestamp", "symbol", "side", "qty", "price", "strategy")
KINDS = ("sqlite", "csv", "parquet")
PG_URL = os.environ.get("ORDERGUARD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def row(i: int, sec: float, symbol: str = "AAPL", side: str = "buy", qty: Any = 10, price: Any = 100,
        strategy: str = "alpha") -> tuple[Any, ...]:
    return (i, iso(sec), symbol, side, qty, price, strategy)


# ----------------------------------------------------------------------------- builders


def make_sqlite(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, table: str = "trades",
                types: dict[str, str] | None = None) -> str:
    types = types or {}
    conn = sqlite3.connect(path)
    spec = ", ".join(_q(c) + (" " + types[c] if c in types else "") for c in columns)
    conn.execute(f"CREATE TABLE {_q(table)} ({spec})")
    conn.executemany(f"INSERT INTO {_q(table)} VALUES ({', '.join('?' * len(columns))})", rows)
    conn.commit()
    conn.close()
    return str(path)


def make_csv(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([["" if v is None else v for v in r] for r in rows])
    return str(path)


def _duck_type(values: list[Any]) -> str:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) is False and isinstance(v, int) for v in present):
        return "BIGINT"
    if present and all(isinstance(v, (int, float)) for v in present):
        return "DOUBLE"
    if present and all(isinstance(v, (int, Decimal)) for v in present):
        return "DECIMAL(18,6)"
    if present and all(isinstance(v, datetime) for v in present):
        return "TIMESTAMPTZ"
    return "VARCHAR"


def make_parquet(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                 types: dict[str, str] | None = None) -> str:
    """A Parquet file written by DuckDB (no pyarrow needed), column types from the values."""
    types = types or {}
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    spec = ", ".join(f"{_q(c)} {types.get(c) or _duck_type([r[i] for r in rows])}" for i, c in enumerate(columns))
    con.execute(f"CREATE TABLE t ({spec})")
    if rows:
        con.executemany(f"INSERT INTO t VALUES ({', '.join('?' * len(columns))})", [list(r) for r in rows])
    con.execute(f"COPY t TO '{path}' (FORMAT parquet)")
    con.close()
    return str(path)


def make_source(kind: str, tmp_path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]], **kw: Any) -> str:
    if kind == "sqlite":
        return make_sqlite(tmp_path / "h.db", columns, rows, **kw)
    if kind == "csv":
        return make_csv(tmp_path / "h.csv", columns, rows)
    return make_parquet(tmp_path / "h.parquet", columns, rows, **kw)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def dump_sqlite(path: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows (and the schema) of a SQLite file: for "nothing changed" checks."""
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        out = {t: sorted(conn.execute(f"SELECT * FROM {_q(t)}").fetchall(), key=repr) for t in tables}
        out["__schema__"] = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        return out
    finally:
        conn.close()


def summary(report: AuditReport) -> list[tuple[Any, ...]]:
    return sorted((c.scope, c.symbol, c.side, c.verdict.value, c.first_us, c.last_us, c.repeat_ids) for c in report.clusters)


def audit_rows(tmp_path: Path, rows: Sequence[Sequence[Any]], **kw: Any) -> AuditReport:
    return audit(make_sqlite(tmp_path / "t.db", COLS, rows), **kw)


# ----------------------------------------------------------------------------- column detection


@pytest.mark.parametrize(
    ("kind", "time_name", "qty_name", "scope_name"),
    [("sqlite", "timestamp", "qty", "account"), ("csv", "time", "quantity", "bot"),
     ("parquet", "created_at", "shares", "strategy"), ("sqlite", "Created_At", "QTY", "expert")],
)
def test_columns_found_by_common_names(tmp_path: Path, kind: str, time_name: str, qty_name: str, scope_name: str) -> None:
    columns = ["trade_id", time_name, "symbol", "side", qty_name, "price", scope_name]
    rows = [
        (1, iso(0), "AAPL", "buy", 10, 100.0, "s1"),
        (2, iso(1), "AAPL", "buy", 10, 100.0, "s1"),  # a duplicate within s1
        (3, iso(1), "AAPL", "buy", 10, 100.0, "s2"),  # the same second in another scope: not one
    ]
    report = audit(make_source(kind, tmp_path, columns, rows))
    cols = report.columns
    assert (cols.time, cols.qty, cols.scope, cols.id) == (time_name, qty_name, (scope_name,), "trade_id")
    assert {"time", "qty", "scope"} <= set(cols.detected)
    assert [(c.scope, c.verdict, c.repeat_ids) for c in report.clusters] == [(("s1",), Verdict.DUPLICATE, (2,))]


def test_flags_override_detection(tmp_path: Path) -> None:
    # 'timestamp' is found first by name and puts the two orders 1 s apart; 'created_at' an hour apart.
    columns = ["id", "timestamp", "created_at", "symbol", "side", "qty", "filled_qty", "price", "account", "strategy"]
    rows = [
        (1, iso(0), iso(0), "AAPL", "buy", 10, 10, 100, "acct", "s1"),
        (2, iso(1), iso(3600), "AAPL", "buy", 10, 10, 100, "acct", "s2"),
    ]
    db = make_sqlite(tmp_path / "t.db", columns, rows)
    found = audit(db)
    assert found.columns.time == "timestamp"
    assert found.columns.scope == ("account", "strategy")
    assert found.duplicates == []  # two strategies
    assert audit(db, scope=["account"]).duplicate_orders == 1
    assert audit(db, scope=[]).columns.scope == ()
    given = audit(db, time_column="created_at", scope=["account"], qty="filled_qty")
    assert (given.columns.time, given.columns.qty) == ("created_at", "filled_qty")
    assert "time" not in given.columns.detected and "qty" not in given.columns.detected
    assert given.clusters == ()


def test_flag_matches_a_column_case_insensitively(tmp_path: Path) -> None:
    db = make_sqlite(tmp_path / "t.db", ["ID", "When", "Sym", "Side", "Qty", "Price"],
                     [(1, iso(0), "A", "buy", 1, 5), (2, iso(1), "A", "buy", 1, 5)])
    report = audit(db, time_column="when", symbol="SYM", id_column="id")
    assert (report.columns.time, report.columns.symbol, report.columns.id) == ("When", "Sym", "ID")
    assert report.duplicate_orders == 1


@pytest.mark.parametrize(("role", "flag"), [("timestamp", "--time"), ("symbol", "--symbol"), ("side", "--side"),
                                            ("qty", "--qty"), ("price", "--price")])
def test_missing_column_names_its_flag(tmp_path: Path, role: str, flag: str) -> None:
    columns = ["id", "timestamp", "symbol", "side", "qty", "price"]
    keep = [c for c in columns if c != role]
    rows = [tuple(v for c, v in zip(columns, (1, iso(0), "A", "buy", 1, 5), strict=True) if c != role)]
    db = make_sqlite(tmp_path / "t.db", [*keep, "notes"], [(*rows[0], "x")])
    with pytest.raises(AuditSourceError, match=f"pass {flag} COLUMN") as info:
        audit(db)
    assert "notes" in str(info.value)  # the columns there are are listed


def test_given_column_that_does_not_exist(tmp_path: Path) -> None:
    db = make_sqlite(tmp_path / "t.db", COLS, [row(1, 0)])
    with pytest.raises(AuditSourceError, match=r"no column 'fill_qty'.*columns: id, timestamp, symbol"):
        audit(db, qty="fill_qty")
    with pytest.raises(AuditSourceError, match="no column 'desk'"):
        audit(db, scope=["desk"])


def test_one_column_for_two_roles_is_refused(tmp_path: Path) -> None:
    db = make_sqlite(tmp_path / "t.db", COLS, [row(1, 0)])
    with pytest.raises(AuditSourceError, match=r"'price'.*both qty and price"):
        audit(db, qty="price", price="price")
    with pytest.raises(AuditSourceError, match="scope column 'symbol' is also mapped"):
        audit(db, scope=["symbol"])


def test_table_is_chosen_by_name_or_asked_for(tmp_path: Path) -> None:
    db = make_sqlite(tmp_path / "t.db", COLS, [row(1, 0), row(2, 1)], table="fills")
    assert audit(db).table == "fills"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE orders (x)")
    conn.commit()
    conn.close()
    with pytest.raises(AuditSourceError, match=r"pass --table NAME.*fills, orders"):
        audit(db)
    assert audit(db, table="fills").duplicate_orders == 1
    csv_file = make_csv(tmp_path / "t.csv", COLS, [row(1, 0)])
    with pytest.raises(AuditSourceError, match="--table applies to databases"):
        audit(csv_file, table="trades")


# ----------------------------------------------------------------------------- bad values


def _mixed(kind: str, column: str, bad: Any) -> tuple[list[str], list[tuple[Any, ...]]]:
    rows = [list(row(i, i * 100)) for i in range(1, 5)]
    index = COLS.index(column)
    rows[2][index] = bad  # row 3
    if kind == "parquet":
        rows = [[str(v) for v in r] for r in rows]  # a text column holding numbers and one word
    return list(COLS), [tuple(r) for r in rows]


@pytest.mark.parametrize(("kind", "column", "bad", "what"), [
    ("sqlite", "qty", "abc", "is not a non-zero finite number"),
    ("csv", "qty", "abc", "is not a non-zero finite number"),
    ("parquet", "qty", "abc", "is not a non-zero finite number"),
    ("sqlite", "price", "12,5", "is not a positive finite number"),
    ("csv", "timestamp", "yesterday", "is not a time"),
    ("parquet", "timestamp", "2026-13-45", "is not a time"),
    ("sqlite", "side", "hold", "is not a side"),
    ("sqlite", "symbol", "  ", "is empty"),
])
def test_mixed_types_name_column_count_and_example(tmp_path: Path, kind: str, column: str, bad: str, what: str) -> None:
    columns, rows = _mixed(kind, column, bad)
    source = make_source(kind, tmp_path, columns, rows)
    with pytest.raises(AuditSourceError) as info:
        audit(source)
    message = str(info.value)
    assert f"column {column!r}" in message
    assert what in message
    assert "1 of 4 rows" in message
    assert f"id 3: {bad!r}" in message
    assert "--skip-bad-rows" in message
    assert "\n" not in message


def test_several_bad_rows_are_counted_with_examples(tmp_path: Path) -> None:
    rows = [row(1, 0), row(2, 100, qty="x"), row(3, 200), row(4, 300, qty=None), row(5, 400, qty="1e")]
    with pytest.raises(AuditSourceError, match=r"'qty'.* in 3 of 5 rows \(e\.g\. id 2: 'x'; id 4: None; id 5: '1e'\)"):
        audit_rows(tmp_path, rows)


def test_bad_values_in_two_columns_are_both_named(tmp_path: Path) -> None:
    rows = [row(1, 0, qty="x"), row(2, 100, price="free"), row(3, 200)]
    with pytest.raises(AuditSourceError, match=r"column 'qty' .*in 1 of 3 rows.*other columns too: 'price' \(1 rows\)"):
        audit_rows(tmp_path, rows)


def test_bad_value_example_names_the_row_without_internal_names(tmp_path: Path) -> None:
    db = make_sqlite(tmp_path / "t.db", COLS[1:], [row(1, 0)[1:], row(2, 1, qty="abc")[1:]])
    with pytest.raises(AuditSourceError) as info:
        audit(db)
    assert "'abc'" in str(info.value)
    assert "__og_" not in str(info.value)


@pytest.mark.parametrize(("kind", "bad"), [("parquet", "nan"), ("sqlite", "inf"), ("parquet", "-inf"), ("csv", 0),
                                          ("sqlite", -5)])
def test_price_that_is_not_positive_and_finite_is_refused(tmp_path: Path, kind: str, bad: Any) -> None:
    value = float(bad) if isinstance(bad, str) else bad
    rows = [row(1, 0, price=100.5), row(2, 100, price=value)]
    source = make_source(kind, tmp_path, COLS, rows, **({"types": {"price": "DOUBLE"}} if kind == "parquet" else {}))
    with pytest.raises(AuditSourceError, match=r"column 'price' .* is not a positive finite number in 1 of 2 rows"):
        audit(source)


@pytest.mark.parametrize(("kind", "bad"), [("sqlite", 0), ("parquet", "nan"), ("csv", "inf")])
def test_zero_or_non_finite_quantity_is_refused(tmp_path: Path, kind: str, bad: Any) -> None:
    value = float(bad) if isinstance(bad, str) and kind != "csv" else bad
    rows = [row(1, 0, qty=10.0), row(2, 100, qty=value)]
    source = make_source(kind, tmp_path, COLS, rows, **({"types": {"qty": "DOUBLE"}} if kind == "parquet" else {}))
    with pytest.raises(AuditSourceError, match=r"column 'qty' .* is not a non-zero finite number in 1 of 2 rows"):
        audit(source)


@pytest.mark.parametrize("kind", ["sqlite", "parquet"])
def test_negative_quantity_is_read_as_size_with_a_warning(tmp_path: Path, kind: str) -> None:
    rows = [row(1, 0, side="sell", qty=-10), row(2, 1, side="sell", qty=-10), row(3, 500, qty=5)]
    report = audit(make_source(kind, tmp_path, COLS, rows))
    assert [w for w in report.warnings if "2 rows hold negative quantities" in w]
    (cluster,) = report.clusters
    assert (cluster.side, cluster.repeat_ids, cluster.excess_qty) == ("SELL", (2,), Decimal(10))
    assert cluster.cash_effect == Decimal(-1000)  # a sell credited cash


def test_side_spellings_are_understood(tmp_path: Path) -> None:
    rows = [row(1, 0, side="BUY"), row(2, 1, side="b"), row(3, 2, side=" Bought "), row(4, 3, side="long"),
            row(5, 200, side="SLD"), row(6, 201, side="sell_short")]
    report = audit_rows(tmp_path, rows)
    assert summary(report) == [
        (("alpha",), "AAPL", "BUY", "DUPLICATE", EPOCH0 * 10**6, (EPOCH0 + 3) * 10**6, (2, 3, 4)),
        (("alpha",), "AAPL", "SELL", "DUPLICATE", (EPOCH0 + 200) * 10**6, (EPOCH0 + 201) * 10**6, (6,)),
    ]


@pytest.mark.parametrize("kind", ["sqlite", "csv"])
def test_skip_bad_rows_counts_and_leaves_them_out(tmp_path: Path, kind: str) -> None:
    rows = [row(1, 0), row(2, 1, qty="abc"), row(3, 2), row(4, 3, price="nan"), row(5, 4, side="hold"), row(6, 900)]
    if kind == "parquet":
        rows = [tuple(str(v) for v in r) for r in rows]
    source = make_source(kind, tmp_path, COLS, rows)
    with pytest.raises(AuditSourceError):
        audit(source)
    report = audit(source, skip_bad_rows=True)
    assert (report.rows, report.skipped_rows) == (3, 3)
    assert any("3 rows left out (--skip-bad-rows)" in w for w in report.warnings)
    assert [(c.first_id, c.repeat_ids) for c in report.clusters] == [(1, (3,))]
    assert report.to_json()["skipped_rows"] == 3


def test_skip_bad_rows_with_every_row_bad(tmp_path: Path) -> None:
    with pytest.raises(AuditSourceError, match="no row of table 'trades' is a valid trade"):
        audit_rows(tmp_path, [row(1, 0, qty="x"), row(2, 1, price=-1)], skip_bad_rows=True)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_table(tmp_path: Path, kind: str) -> None:
    source = make_source(kind, tmp_path, COLS, [], **({"types": dict.fromkeys(COLS, "VARCHAR")} if kind == "parquet" else {}))
    with pytest.raises(AuditSourceError, match="is empty: there are no trades to audit"):
        audit(source)


# ----------------------------------------------------------------------------- unreadable sources


def test_table_that_does_not_exist_lists_the_tables(tmp_path: Path) -> None:
    db = make_sqlite(tmp_path / "t.db", COLS, [row(1, 0)], table="fills_2026")
    with pytest.raises(AuditSourceError, match=r"no table 'trades' .*\(tables: fills_2026\); pass --table NAME"):
        audit(db, table="trades")
    with pytest.raises(AuditSourceError, match=r"which table holds the trades\? pass --table NAME .*fills_2026"):
        audit(db)


def test_missing_path_directory_and_unknown_kinds(tmp_path: Path) -> None:
    with pytest.raises(AuditSourceError, match="does not exist"):
        audit(str(tmp_path / "nope.db"))
    with pytest.raises(AuditSourceError, match="is a folder"):
        audit(str(tmp_path))
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(AuditSourceError, match="cannot tell what"):
        audit(str(tmp_path / "notes.md"))
    with pytest.raises(AuditSourceError, match="unsupported source mysql://u:\\*\\*\\*@h"):
        audit("mysql://u:pw@h/db")
    with pytest.raises(AuditSourceError, match="source is empty"):
        audit("")


def test_file_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "trades.db").write_text("id,symbol\n1,AAPL\n")
    with pytest.raises(AuditSourceError, match="is not a SQLite database"):
        audit(str(tmp_path / "trades.db"))
    # the header says SQLite, the rest is garbage
    (tmp_path / "broken.db").write_bytes(b"SQLite format 3\x00" + os.urandom(3000))
    with pytest.raises(AuditSourceError, match="cannot read SQLite database"):
        audit(str(tmp_path / "broken.db"))


def _audit_as_nobody(db: str, conn: Any) -> None:
    # Forked after the imports, so dropping root does not need the interpreter's files to be readable.
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)
    try:
        audit(db)
        conn.send("no error")
    except AuditSourceError as exc:
        conn.send(str(exc))
    except BaseException as exc:
        conn.send(f"{type(exc).__name__}: {exc}")


def test_unreadable_file(tmp_path: Path) -> None:
    import duckdb  # noqa: F401 (loaded before the fork, as the audit would import it)

    db = make_sqlite(tmp_path / "t.db", COLS, [row(1, 0)])
    os.chmod(tmp_path, 0o755)
    os.chmod(db, 0)
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_audit_as_nobody, args=(db, theirs))
    try:
        child.start()
        assert ours.poll(30), "the child did not answer"
        message = ours.recv()
        child.join(10)
    finally:
        os.chmod(db, 0o600)
    assert message.startswith(f"cannot read source {db}: Permission denied"), message


def test_parquet_that_is_not_parquet(tmp_path: Path) -> None:
    (tmp_path / "t.parquet").write_bytes(b"PAR1 but not really" + bytes(range(256)))
    with pytest.raises(AuditSourceError, match="cannot read PARQUET file"):
        audit(str(tmp_path / "t.parquet"))


HEADER = "timestamp,symbol,side,qty,price\n"
GOOD = f"{iso(0)},A,buy,1,10\n"
MANY = HEADER + "".join(f"{iso(i * 120)},S{i},buy,1,10\n" for i in range(30_000))  # longer than DuckDB's sniff sample


@pytest.mark.parametrize(("name", "content"), [
    ("empty", b""),
    ("header-only", HEADER.encode()),
    ("binary", bytes(range(256)) * 40),
    ("ragged-long", (HEADER + GOOD + f"{iso(1)},A,buy,1,10,7,8\n").encode()),
    ("ragged-short", (HEADER + GOOD + f"{iso(1)},A\n" + GOOD).encode()),
    ("ragged-late", (MANY + f"{iso(1)},A,buy,1,10,7,8\n").encode()),
    ("short-late", (MANY + f"{iso(1)},A\n").encode()),
    ("latin-1", (HEADER + GOOD + f"{iso(1)},A\xff\xfe,buy,1,10\n").encode("latin-1")),
], ids=lambda v: v if isinstance(v, str) else "")
def test_malformed_csv_is_a_clear_error(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / f"{name}.csv"
    path.write_bytes(content)
    with pytest.raises(AuditSourceError) as info:
        audit(str(path))
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value).strip()


def test_invalid_utf8_late_in_a_csv_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "late.csv"
    path.write_bytes((MANY + f"{iso(1)},A\xff\xfe,buy,1,10\n").encode("latin-1"))
    with pytest.raises(AuditSourceError):
        audit(str(path))


# ----------------------------------------------------------------------------- times


def _times_as(form: str, seconds: float) -> Any:
    at = T0 + timedelta(seconds=seconds)
    if form == "s":
        return int(at.timestamp())
    if form == "s-float":
        return at.timestamp()
    if form == "ms":
        return int(at.timestamp() * 1000)
    if form == "us":
        return int(at.timestamp() * 1_000_000)
    if form == "iso-offset":
        return at.astimezone(timezone(timedelta(hours=-5))).isoformat()  # 09:30:00-05:00
    if form == "sql":
        return at.strftime("%Y-%m-%d %H:%M:%S")
    raise AssertionError(form)


TIME_ROWS = [(1, 0, "AAPL"), (2, 1, "AAPL"), (3, 2, "AAPL"), (4, 0, "MSFT"), (5, 180, "MSFT"), (6, 3600, "MSFT"),
             (7, 3601, "MSFT")]


@pytest.mark.parametrize(("kind", "form"), [
    ("csv", "s"), ("csv", "ms"), ("csv", "us"), ("csv", "iso-offset"), ("sqlite", "s-float"), ("sqlite", "sql"),
])
def test_epoch_and_iso_times_give_the_same_clusters(tmp_path: Path, kind: str, form: str) -> None:
    rows = [(i, _times_as(form, s), sym, "buy", 5, 20, "alpha") for i, s, sym in TIME_ROWS]
    report = audit(make_source(kind, tmp_path, COLS, rows))
    assert report.first_us == EPOCH0 * 10**6
    assert [(c.symbol, c.first_us, c.repeat_ids) for c in sorted(report.clusters, key=lambda c: c.first_us)] == [
        ("AAPL", EPOCH0 * 10**6, (2, 3)),
        ("MSFT", (EPOCH0 + 3600) * 10**6, (7,)),
    ]


@pytest.mark.parametrize("form", ["timestamptz", "bigint-ms", "double-s"])
def test_parquet_typed_times(tmp_path: Path, form: str) -> None:
    def value(s: float) -> Any:
        at = T0 + timedelta(seconds=s)
        return {"timestamptz": at, "bigint-ms": int(at.timestamp() * 1000), "double-s": at.timestamp()}[form]

    rows = [(i, value(s), sym, "buy", 5, 20.0, "alpha") for i, s, sym in TIME_ROWS]
    report = audit(make_parquet(tmp_path / "t.parquet", COLS, rows))
    assert sorted((c.symbol, c.first_us, c.repeat_ids) for c in report.clusters) == [
        ("AAPL", EPOCH0 * 10**6, (2, 3)), ("MSFT", (EPOCH0 + 3600) * 10**6, (7,)),
    ]


@pytest.mark.parametrize("bad", ["99999999999999999999", "nan"])
def test_out_of_range_time_is_a_clear_error(tmp_path: Path, bad: str) -> None:
    path = make_csv(tmp_path / "t.csv", COLS, [row(1, 0), (2, bad, "AAPL", "buy", 10, 100, "alpha")])
    with pytest.raises(AuditSourceError, match="'timestamp'"):
        audit(path)


# ----------------------------------------------------------------------------- names


HOSTILE_TABLE = 'trades"; DROP TABLE x; --'
HOSTILE_COLS = ["id", 'when it "happened"', "sym'bol", "côté 🐂", "q ty", 'p"rice', "stratégie; --"]


def test_hostile_identifiers_in_sqlite(tmp_path: Path) -> None:
    db = make_sqlite(tmp_path / "h.db", HOSTILE_COLS, [row(1, 0), row(2, 1), row(3, 500)], table=HOSTILE_TABLE)
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE x (y)")
    conn.execute("INSERT INTO x VALUES ('still here')")
    conn.commit()
    conn.close()
    before = dump_sqlite(db)
    report = audit(db, table=HOSTILE_TABLE, time_column=HOSTILE_COLS[1], symbol="sym'bol", side="côté 🐂", qty="q ty",
                   price='p"rice', scope=["stratégie; --"])
    assert [(c.scope, c.repeat_ids) for c in report.clusters] == [(("alpha",), (2,))]
    assert report.table == HOSTILE_TABLE
    assert report.to_json()["columns"]["scope"] == ["stratégie; --"]
    assert dump_sqlite(db) == before


def test_hostile_identifiers_in_csv_and_parquet(tmp_path: Path) -> None:
    rows = [row(1, 0), row(2, 1)]
    flags = {"time_column": HOSTILE_COLS[1], "symbol": "sym'bol", "side": "côté 🐂", "qty": "q ty", "price": 'p"rice',
             "scope": ["stratégie; --"]}
    for source in (make_csv(tmp_path / "h.csv", HOSTILE_COLS, rows), make_parquet(tmp_path / "h.parquet", HOSTILE_COLS, rows)):
        assert audit(source, **flags).duplicate_orders == 1


@pytest.mark.parametrize(("flag", "name", "message"), [
    ("table", "t" * 129, "longer than 128 characters"),
    ("table", "   ", "name is empty"),
    ("table", "tra\x00des", "control characters"),
    ("table", "tra\ndes", "control characters"),
    ("table", "bad\ud800", "control characters"),
    ("qty", "q" * 129, "longer than 128 characters"),
    ("qty", "q\tty", "control characters"),
    ("time_column", "\x7f", "control characters"),
    ("scope", "", "name is empty"),
])
def test_unusable_names_are_refused(tmp_path: Path, flag: str, name: str, message: str) -> None:
    db = make_sqlite(tmp_path / "t.db", COLS, [row(1, 0)])
    kwargs: dict[str, Any] = {"scope": [name]} if flag == "scope" else {flag: name}
    with pytest.raises(AuditSourceError, match=message):
        audit(db, **kwargs)


def test_a_name_of_exactly_128_characters_is_fine(tmp_path: Path) -> None:
    long_name = "q" * 128
    db = make_sqlite(tmp_path / "t.db", ["id", "timestamp", "symbol", "side", long_name, "price"],
                     [(1, iso(0), "A", "buy", 1, 5), (2, iso(1), "A", "buy", 1, 5)], table="t" * 128)
    assert audit(db, table="t" * 128, qty=long_name).duplicate_orders == 1


@pytest.mark.parametrize("flag", ["table", "qty", "time_column"])
def test_empty_name_is_refused(tmp_path: Path, flag: str) -> None:
    db = make_sqlite(tmp_path / "t.db", COLS, [row(1, 0)])
    with pytest.raises(AuditSourceError, match="name is empty"):
        audit(db, **{flag: ""})


# ----------------------------------------------------------------------------- money


@pytest.mark.parametrize("kind", KINDS)
def test_money_stays_decimal(tmp_path: Path, kind: str) -> None:
    rows = [row(1, 0, qty=3, price=0.1), row(2, 1, qty=3, price=0.1), row(3, 2, qty=3, price=0.1), row(4, 500, price=0.7)]
    report = audit(make_source(kind, tmp_path, COLS, rows))
    (cluster,) = report.clusters
    assert isinstance(cluster.phantom_notional, Decimal)
    assert cluster.phantom_notional == Decimal("0.6")
    assert cluster.excess_qty == Decimal(6)
    assert report.phantom_notional == Decimal("0.6")
    (total,) = report.by_symbol()
    assert (total.phantom_notional, total.cash_effect) == (Decimal("0.6"), Decimal("0.6"))
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["totals"]["phantom_notional"] == "0.6"
    assert doc["totals"]["excess_qty"] == "6"
    assert doc["clusters"][0]["phantom_notional"] == "0.6"
    assert doc["by_symbol"][0]["cash_effect"] == "0.6"


def test_single_duplicate_notional_is_exact(tmp_path: Path) -> None:
    report = audit_rows(tmp_path, [row(1, 0, qty=3, price=0.1), row(2, 1, qty=3, price=0.1)])
    assert report.clusters[0].phantom_notional == Decimal("0.3")
    assert str(report.clusters[0].phantom_notional) == "0.3"


def test_cash_reconciliation_is_decimal(tmp_path: Path) -> None:
    db = make_sqlite(tmp_path / "t.db", COLS, [row(1, 0, qty=3, price=0.1), row(2, 1, qty=3, price=0.1)])
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE account (id INTEGER PRIMARY KEY, cash REAL)")
    conn.execute("INSERT INTO account (cash) VALUES (99.4)")
    conn.commit()
    conn.close()
    report = audit(db, cash="account", starting_cash="100")
    (cash,) = report.cash or ()
    assert (cash.recorded, cash.phantom, cash.corrected) == (Decimal("99.4"), Decimal("0.3"), Decimal("99.7"))
    assert (cash.trades_flow, cash.implied_by_trades) == (Decimal("-0.6"), Decimal("99.4"))
    assert report.to_json()["cash"][0]["corrected"] == "99.7"
    with pytest.raises(AuditSourceError, match="starting-cash"):
        audit(db, cash="account", starting_cash="-1")
    with pytest.raises(AuditSourceError, match="must be exact"):
        audit(db, cash="account", starting_cash=100.0)  # type: ignore[arg-type]
    with pytest.raises(AuditSourceError, match="needs --cash"):
        audit(db, starting_cash="100")


# ----------------------------------------------------------------------------- clustering semantics


def test_identical_orders_one_second_apart_are_one_duplicate(tmp_path: Path) -> None:
    report = audit_rows(tmp_path, [row(1, 0), row(2, 1)])
    (cluster,) = report.clusters
    assert cluster.verdict is Verdict.DUPLICATE
    assert (cluster.first_id, cluster.repeat_ids, cluster.orders) == (1, (2,), 2)
    assert (cluster.excess_qty, cluster.phantom_notional) == (Decimal(10), Decimal(1000))
    assert cluster.confidence >= 0.95
    assert report.duplicate_orders == 1


def test_a_burst_of_identical_orders(tmp_path: Path) -> None:
    report = audit_rows(tmp_path, [row(i, i * 0.5) for i in range(1, 7)])
    (cluster,) = report.clusters
    assert (cluster.orders, cluster.repeat_ids, cluster.excess_qty) == (6, (2, 3, 4, 5, 6), Decimal(50))
    (total,) = report.by_symbol()
    assert (total.duplicate_orders, total.largest_burst, total.phantom_notional) == (5, 6, Decimal(5000))


def test_identical_orders_two_minutes_apart_are_not_a_cluster(tmp_path: Path) -> None:
    report = audit_rows(tmp_path, [row(1, 0), row(2, 120)])
    assert report.clusters == ()
    assert report.duplicate_orders == 0


def test_a_scale_in_is_not_a_duplicate(tmp_path: Path) -> None:
    report = audit_rows(tmp_path, [row(1, 0, qty=100, price=100), row(2, 40, qty=50, price=101.5)])
    (cluster,) = report.clusters
    assert cluster.verdict in (Verdict.SCALE_IN, Verdict.POSSIBLE)
    assert cluster.repeat_ids == ()
    assert report.duplicates == [] and report.phantom_notional == 0


def test_two_strategies_in_the_same_second_are_not_duplicates_unless_scope_is_off(tmp_path: Path) -> None:
    rows = [row(1, 0, strategy="momentum"), row(2, 0, strategy="meanrev")]
    assert audit_rows(tmp_path, rows).clusters == ()
    (tmp_path / "t.db").unlink()
    report = audit_rows(tmp_path, rows, scope=[])
    (cluster,) = report.clusters
    assert (cluster.verdict, cluster.scope, cluster.repeat_ids) == (Verdict.DUPLICATE, (), (2,))


def test_buy_then_sell_is_not_a_duplicate(tmp_path: Path) -> None:
    assert audit_rows(tmp_path, [row(1, 0, side="buy"), row(2, 1, side="sell")]).clusters == ()


def test_other_symbols_are_independent(tmp_path: Path) -> None:
    assert audit_rows(tmp_path, [row(1, 0, symbol="AAPL"), row(2, 0.5, symbol="MSFT")]).clusters == ()


def test_an_unrelated_trade_just_before_a_burst_is_kept(tmp_path: Path) -> None:
    rows = [row(1, 0, qty=5, price=100), row(2, 30, qty=50, price=105), row(3, 31, qty=50, price=105),
            row(4, 32, qty=50, price=105)]
    report = audit_rows(tmp_path, rows)
    (cluster,) = report.clusters
    assert cluster.verdict is Verdict.DUPLICATE
    assert cluster.repeat_ids == (3, 4)  # neither the earlier trade nor the burst's first
    assert cluster.excess_qty == Decimal(100)
    assert cluster.phantom_notional == Decimal(10500)


def test_window_changes_what_is_a_cluster(tmp_path: Path) -> None:
    rows = [row(1, 0), row(2, 120)]
    assert audit_rows(tmp_path, rows).clusters == ()
    (tmp_path / "t.db").unlink()
    wide = audit_rows(tmp_path, rows, settings=Settings(window_seconds=180))
    (cluster,) = wide.clusters
    # score 0.5*(1-120/180) + 0.3 + 0.2 = 0.667: reviewable, not counted at the default 0.8
    assert cluster.verdict is Verdict.POSSIBLE
    assert cluster.confidence == pytest.approx(0.6667, abs=1e-3)
    (tmp_path / "t.db").unlink()
    lenient = audit_rows(tmp_path, rows, settings=Settings(window_seconds=180, min_confidence=0.6))
    assert [(c.verdict, c.repeat_ids) for c in lenient.clusters] == [(Verdict.DUPLICATE, (2,))]
    (tmp_path / "t.db").unlink()
    narrow = audit_rows(tmp_path, [row(1, 0), row(2, 1)], settings=Settings(window_seconds=0.5))
    assert narrow.clusters == ()


def test_min_confidence_changes_what_counts(tmp_path: Path) -> None:
    rows = [row(1, 0), row(2, 1)]  # scores 0.5*(59/60) + 0.3 + 0.2 = 0.9917
    assert audit_rows(tmp_path, rows, settings=Settings(min_confidence=0.99)).duplicate_orders == 1
    (tmp_path / "t.db").unlink()
    strict = audit_rows(tmp_path, rows, settings=Settings(min_confidence=0.995))
    assert [c.verdict for c in strict.clusters] == [Verdict.POSSIBLE]
    assert strict.duplicate_orders == 0


def test_price_tolerance_changes_the_score(tmp_path: Path) -> None:
    rows = [row(1, 0, price=100), row(2, 20, price=102)]  # 2 % apart, 20 s: 0.333 + 0.3 + price
    assert audit_rows(tmp_path, rows).duplicates == []
    (tmp_path / "t.db").unlink()
    loose = audit_rows(tmp_path, rows, settings=Settings(price_tolerance=1, min_confidence=0.8))
    assert loose.clusters[0].confidence == pytest.approx(0.5 * (2 / 3) + 0.3 + 0.2 * 0.98, abs=1e-3)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"window_seconds": 0}, "--window"), ({"window_seconds": -1}, "--window"), ({"window_seconds": 8 * 86400}, "--window"),
    ({"window_seconds": math.nan}, "--window"), ({"min_confidence": 0.4}, "--min-confidence"),
    ({"min_confidence": 1.01}, "--min-confidence"), ({"min_confidence": math.nan}, "--min-confidence"),
    ({"price_tolerance": 0}, "--price-tolerance"), ({"price_tolerance": 2}, "--price-tolerance"),
])
def test_bad_settings_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(AuditSourceError, match=message):
        Settings(**kwargs)


def test_totals_per_symbol_and_strategy(tmp_path: Path) -> None:
    rows = [row(1, 0, strategy="a"), row(2, 1, strategy="a"), row(3, 2, strategy="a"),
            row(4, 0, strategy="b"), row(5, 1, strategy="b"),
            row(6, 0, symbol="MSFT", strategy="a", qty=1, price=400), row(7, 1, symbol="MSFT", strategy="a", qty=1, price=400)]
    report = audit_rows(tmp_path, rows)
    totals = {(t.scope, t.symbol): (t.duplicate_orders, t.excess_qty, t.phantom_notional) for t in report.by_symbol()}
    assert totals == {
        (("a",), "AAPL"): (2, Decimal(20), Decimal(2000)),
        (("b",), "AAPL"): (1, Decimal(10), Decimal(1000)),
        (("a",), "MSFT"): (1, Decimal(1), Decimal(400)),
    }
    assert report.by_symbol()[0].symbol == "AAPL" and report.by_symbol()[0].scope == ("a",)  # most notional first
    assert report.duplicate_orders == 4 and report.phantom_notional == Decimal(3400)


def test_audit_never_writes_the_source(tmp_path: Path) -> None:
    db = make_sqlite(tmp_path / "t.db", COLS, [row(1, 0), row(2, 1)])
    before = dump_sqlite(db)
    mtime = os.stat(db).st_mtime_ns
    audit(db)
    assert dump_sqlite(db) == before
    assert os.stat(db).st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.db"]  # no journal or temp file left behind


# ----------------------------------------------------------------------------- PostgreSQL




def _pg_exec(url: str, *statements: str, params: Sequence[Sequence[Any]] = ()) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        for sql in statements:
            conn.execute(sql)
        for p in params:
            conn.execute(p[0], p[1:])


def _pg_trades(url: str, schema: str, table: str = "trades") -> None:
    _pg_exec(
        url,
        f'CREATE TABLE {schema}.{_q(table)} (id bigint PRIMARY KEY, ts timestamptz, symbol text, side text, '
        "qty numeric, price double precision, strategy text)",
        f"INSERT INTO {schema}.{_q(table)} VALUES (1, '{iso(0)}', 'AAPL', 'buy', 3, 0.1, 's'), "
        f"(2, '{iso(1)}', 'AAPL', 'BUY', 3, 0.1, 's'), (3, '{iso(1)}', 'AAPL', 'buy', 3, 0.1, 't')",
    )


def test_postgres_unreachable_is_quick_and_redacted() -> None:
    pytest.importorskip("psycopg")
    started = time.monotonic()
    with pytest.raises(AuditSourceError, match=r"cannot connect to postgresql://postgres:\*\*\*@127\.0\.0\.1:1/test") as info:
        audit("postgresql://postgres:hunter2@127.0.0.1:1/test", table="trades")
    assert time.monotonic() - started < 5
    assert "hunter2" not in str(info.value)


def test_postgres_audit_and_redaction(pg: tuple[str, str]) -> None:
    url, schema = pg
    _pg_trades(url, schema)
    secret_url = with_password(url, "s3cr3t-pw")
    report = audit(secret_url, table=f"{schema}.trades")
    assert [(c.scope, c.repeat_ids, c.phantom_notional) for c in report.clusters] == [(("s",), (2,), Decimal("0.3"))]
    doc = json.dumps(report.to_json())
    assert "s3cr3t-pw" not in doc
    assert json.loads(doc)["source"] == with_password(url, "***")
    assert json.loads(doc)["totals"]["phantom_notional"] == "0.3"
    with pytest.raises(AuditSourceError) as info:
        audit(secret_url, table=f"{schema}.nope")
    message = str(info.value)
    assert f"no table '{schema}.nope'" in message and f"{schema}.trades" in message
    assert "s3cr3t-pw" not in message
    with pytest.raises(AuditSourceError) as info:
        audit(secret_url, table=f"{schema}.trades", qty="nope")
    assert "s3cr3t-pw" not in str(info.value)


def test_postgres_bad_values_are_named(pg: tuple[str, str]) -> None:
    url, schema = pg
    _pg_exec(url, f"CREATE TABLE {schema}.trades (id int, ts text, symbol text, side text, qty text, price numeric)",
             f"INSERT INTO {schema}.trades VALUES (1, '{iso(0)}', 'A', 'buy', '1', 10), (2, '{iso(1)}', 'A', 'buy', 'abc', 10),"
             f" (3, '{iso(2)}', 'A', 'buy', NULL, 10)")
    with pytest.raises(AuditSourceError, match=r"column 'qty' .* in 2 of 3 rows \(e\.g\. id 2: 'abc'; id 3: None\)"):
        audit(url, table=f"{schema}.trades")
    _pg_exec(url, f"CREATE TABLE {schema}.empty (id int, ts timestamptz, symbol text, side text, qty numeric, price numeric)")
    with pytest.raises(AuditSourceError, match="is empty"):
        audit(url, table=f"{schema}.empty")


def test_postgres_hostile_identifiers(pg: tuple[str, str]) -> None:
    url, schema = pg
    cols = ", ".join(f"{_q(c)} {t}" for c, t in zip(HOSTILE_COLS, ("int", "timestamptz", "text", "text", "numeric", "numeric", "text"), strict=True))
    _pg_exec(url, f"CREATE TABLE {schema}.x (y int)", f"INSERT INTO {schema}.x VALUES (1)",
             f"CREATE TABLE {schema}.{_q(HOSTILE_TABLE)} ({cols})",
             f"INSERT INTO {schema}.{_q(HOSTILE_TABLE)} VALUES (1, '{iso(0)}', 'A', 'buy', 2, 3), (2, '{iso(1)}', 'A', 'buy', 2, 3)")
    report = audit(url, table=f"{schema}.{HOSTILE_TABLE}", time_column=HOSTILE_COLS[1], symbol="sym'bol", side="côté 🐂",
                   qty="q ty", price='p"rice', scope=["stratégie; --"])
    assert report.duplicate_orders == 1
    import psycopg

    with psycopg.connect(url) as conn:
        assert conn.execute(f"SELECT count(*) FROM {schema}.x").fetchone() == (1,)
        assert conn.execute(f"SELECT count(*) FROM {schema}.{_q(HOSTILE_TABLE)}").fetchone() == (2,)


def test_postgres_password_in_query_is_redacted() -> None:
    pytest.importorskip("psycopg")
    url = "postgresql://postgres@127.0.0.1:1/test?password=hunter2"
    assert "hunter2" not in parse_source(url).display
    with pytest.raises(AuditSourceError) as info:
        audit(url, table="trades")
    assert "hunter2" not in str(info.value)


def test_postgres_url_with_bad_port_is_a_clear_error() -> None:
    pytest.importorskip("psycopg")
    try:
        audit("postgresql://postgres:hunter2@127.0.0.1:notaport/test", table="trades")
    except AuditError as exc:
        assert "hunter2" not in str(exc)
    else:
        pytest.fail("no error")


def test_redact_url_keeps_everything_but_the_password() -> None:
    assert redact_url("postgresql://u:p@h:5433/db?sslmode=require") == "postgresql://u:***@h:5433/db?sslmode=require"
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
