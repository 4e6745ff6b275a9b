"""Defects found in review of the audit, each pinned by a test that fails without its fix."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from orderguard.audit import audit
from orderguard.audit.plan import apply_plan, read_plan, write_plan
from orderguard.cli import app
from orderguard.errors import AuditPlanError, AuditSourceError
from tests.audit.test_plan import NOW, TRADES, cash_of, dump, make_db, planned
from tests.audit.test_sources import COLS, make_csv, make_sqlite, row
from tests.helpers import need_duckdb, unavailable

need_duckdb()


def _plan_path(tmp_path: Path) -> str:
    return str(tmp_path / "fix.sql")


# ---------------------------------------------------------------- what a plan may carry


@pytest.mark.parametrize("symbol", ['X\nDELETE FROM "trades" WHERE 1=1 --', "X\u2028Y", "X\x0bY"])
def test_a_value_that_could_break_a_plan_line_is_refused(tmp_path: Path, symbol: str) -> None:
    trades = [(1, TRADES[0][1], symbol, "buy", 10, 100.0, "alpha"), (2, TRADES[1][1], symbol, "buy", 10, 100.0, "alpha")]
    db = make_db(tmp_path / "t.db", trades=trades, cash=None)
    report = audit(db)
    assert report.duplicate_orders == 1
    with pytest.raises(AuditPlanError, match="line break or control character"):
        write_plan(report, _plan_path(tmp_path), now=NOW)
    assert not Path(_plan_path(tmp_path)).exists()


def test_a_symbol_looking_like_a_check_cannot_replace_it(tmp_path: Path) -> None:
    symbol = "X): expect 1 from SELECT 1 --"
    trades = [(1, TRADES[0][1], symbol, "buy", 10, 100.0, "alpha"), (2, TRADES[1][1], symbol, "buy", 10, 100.0, "alpha")]
    db = make_db(tmp_path / "t.db", trades=trades, cash=None)
    _, path = planned(db, tmp_path)
    _head, steps = read_plan(path)
    checks = [s for s in steps if s.check is not None]
    # the row check still counts the planned row of that symbol: it is not "SELECT 1"
    assert all(s.sql != "SELECT 1 --'" for s in checks)
    assert any("IN (2)" in s.sql and s.check is not None and s.check[1] == "1" for s in checks)


def test_checks_also_match_the_side(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db", cash=None)
    _, path = planned(db, tmp_path)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE trades SET side = 'sell' WHERE id = 5")  # a renumbered key now names another order
    conn.commit()
    conn.close()
    before = dump(db)
    with pytest.raises(AuditPlanError, match="still MSFT buys"):
        apply_plan(db, path)
    assert dump(db) == before


def test_a_sqlite_plan_run_twice_by_hand_stops_at_its_first_error(tmp_path: Path) -> None:
    import shutil
    import subprocess

    sqlite = shutil.which("sqlite3")
    if sqlite is None:
        unavailable("the sqlite3 shell is not installed (Debian package sqlite3)")
    assert sqlite is not None
    db = make_db(tmp_path / "t.db")
    _, path = planned(db, tmp_path, cash="account")
    with open(path, encoding="utf-8") as plan:
        first = subprocess.run([sqlite, db], stdin=plan, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    after_once = cash_of(db)
    with open(path, encoding="utf-8") as plan:
        second = subprocess.run([sqlite, db], stdin=plan, capture_output=True, text=True, check=False)
    assert second.returncode != 0 and "already exists" in second.stderr
    assert cash_of(db) == after_once  # not credited a second time


def test_triggers_and_foreign_keys_on_the_tables_refuse_the_plan(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE fees (trade_id INTEGER REFERENCES trades(id) ON DELETE CASCADE, fee REAL)")
    conn.execute("CREATE TRIGGER refund AFTER DELETE ON trades BEGIN UPDATE account SET cash = cash + 1; END")
    conn.commit()
    conn.close()
    report = audit(db, cash="account")
    with pytest.raises(AuditPlanError, match=r"trigger refund.*foreign key of fees"):
        write_plan(report, _plan_path(tmp_path), now=NOW)


def test_an_account_without_a_cash_row_is_named_and_refuses_the_plan(tmp_path: Path) -> None:
    db = str(tmp_path / "t.db")
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE trades (id INTEGER PRIMARY KEY, timestamp TEXT, symbol TEXT, side TEXT, qty REAL, price REAL, account TEXT)")
    conn.executemany("INSERT INTO trades VALUES (?, ?, ?, ?, ?, ?, ?)", [
        (1, TRADES[0][1], "AAPL", "buy", 10, 100.0, "A"), (2, TRADES[1][1], "AAPL", "buy", 10, 100.0, "A"),
        (3, TRADES[0][1], "MSFT", "buy", 10, 50.0, "B"), (4, TRADES[1][1], "MSFT", "buy", 10, 50.0, "B"),
    ])
    conn.execute("CREATE TABLE cash (account TEXT, cash REAL)")
    conn.execute("INSERT INTO cash VALUES ('A', 100)")
    conn.commit()
    conn.close()
    report = audit(db, cash="cash")
    assert any("account=B" in w for w in report.warnings)
    with pytest.raises(AuditPlanError, match="account=B, which the cash table has no row for"):
        write_plan(report, _plan_path(tmp_path), now=NOW)


def test_text_ids_in_an_untyped_column_are_named_as_text(tmp_path: Path) -> None:
    db = str(tmp_path / "t.db")
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE trades (id, timestamp TEXT, symbol TEXT, side TEXT, qty REAL, price REAL)")
    conn.executemany("INSERT INTO trades VALUES (?, ?, ?, ?, ?, ?)", [
        ("1", TRADES[0][1], "AAPL", "buy", 10, 100.0), ("2", TRADES[1][1], "AAPL", "buy", 10, 100.0),
    ])
    conn.commit()
    conn.close()
    _, path = planned(db, tmp_path)
    result = apply_plan(db, path)
    assert result.deleted == 1


# ------------------------------------------------------------------ reading sources


@pytest.mark.parametrize(("value", "seconds"), [("1768919400000000000", 1768919400), ("1768919400000", 1768919400)])
def test_nanosecond_and_millisecond_epochs(tmp_path: Path, value: str, seconds: int) -> None:
    path = make_csv(tmp_path / "t.csv", ("timestamp", "symbol", "side", "qty", "price"), [(value, "A", "buy", 1, 10)])
    report = audit(path)
    assert report.first_us == seconds * 1_000_000


@pytest.mark.parametrize("value", ["50000-01-01", "2201-01-01T00:00:00Z", "1969-12-31T23:59:59Z"])
def test_times_outside_1970_to_2200_are_refused(tmp_path: Path, value: str) -> None:
    path = make_csv(tmp_path / "t.csv", ("timestamp", "symbol", "side", "qty", "price"), [(value, "A", "buy", 1, 10)])
    with pytest.raises(AuditSourceError, match="is not a time from 1970 to 2200"):
        audit(path)


def test_a_path_with_a_percent_sign_opens_that_file(tmp_path: Path) -> None:
    make_sqlite(tmp_path / "xA.db", COLS, [row(1, 0), row(2, 1)])  # what 'x%41.db' would decode to
    odd = make_sqlite(tmp_path / "x%41.db", COLS, [row(1, 0), row(2, 500)])
    assert audit(odd).duplicate_orders == 0


def test_null_empty_and_backslash_n_stay_three_values(tmp_path: Path) -> None:
    db = make_sqlite(tmp_path / "t.db", COLS, [
        row(1, 0, strategy="\\N"), row(2, 1, strategy="\\N"),
        row(3, 0, strategy=""), row(4, 1, strategy=""),
        row(5, 0, symbol="\\N"), row(6, 1, symbol="\\N"),
    ])
    conn = sqlite3.connect(db)
    conn.execute("UPDATE trades SET strategy = NULL WHERE id IN (3)")
    conn.commit()
    conn.close()
    report = audit(db)
    scopes = sorted((c.scope, c.symbol) for c in report.duplicates)
    assert (("\\N",), "AAPL") in scopes and (("alpha",), "\\N") in scopes


@pytest.mark.parametrize("column", ["qty", "price", "timestamp"])
def test_a_blob_is_never_a_number_or_a_time(tmp_path: Path, column: str) -> None:
    db = make_sqlite(tmp_path / "t.db", COLS, [row(1, 0), row(2, 1)])
    conn = sqlite3.connect(db)
    conn.execute(f"UPDATE trades SET {column} = ? WHERE id = 2", (b"\x10",))
    conn.commit()
    conn.close()
    with pytest.raises(AuditSourceError, match=f"column '{column}'"):
        audit(db)


# ----------------------------------------------------------------------------- CLI


def _run(*args: str) -> Any:
    return CliRunner().invoke(app, ["audit", *args])


def test_a_plan_that_cannot_be_written_keeps_the_report(tmp_path: Path) -> None:
    path = make_csv(tmp_path / "t.csv", ("timestamp", "symbol", "side", "qty", "price"),
                    [(row(1, 0)[1], "A", "buy", 1, 10), (row(2, 1)[1], "A", "buy", 1, 10)])
    html = tmp_path / "r.html"
    result = _run(path, "--plan", str(tmp_path / "fix.sql"), "--html", str(html))
    assert result.exit_code == 2
    assert "DUPLICATES: 1 orders" in result.stdout
    assert "orderguard: error: no plan written:" in result.stderr
    assert html.exists() and html.stat().st_size > 1000


def test_html_never_overwrites_the_source(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db", cash=None)
    before = Path(db).read_bytes()
    result = _run(db, "--html", db)
    assert result.exit_code == 2 and "is the source itself" in result.stderr
    assert Path(db).read_bytes() == before


def test_a_window_under_a_millisecond_is_refused(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db", cash=None)
    result = _run(db, "--window", "0.0000001")
    assert result.exit_code == 2 and "at least 1 ms" in result.stderr


def test_buy_and_sell_duplicates_that_cancel_get_their_own_reason(tmp_path: Path) -> None:
    trades = [
        (1, TRADES[0][1], "AAPL", "buy", 10, 100.0, "alpha"), (2, TRADES[1][1], "AAPL", "buy", 10, 100.0, "alpha"),
        (3, TRADES[3][1], "AAPL", "sell", 10, 100.0, "alpha"), (4, TRADES[4][1], "AAPL", "sell", 10, 100.0, "alpha"),
    ]
    db = make_db(tmp_path / "t.db", trades=trades, cash=None)
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE positions (symbol TEXT, quantity REAL)")
    conn.commit()
    conn.close()
    report = audit(db, positions="positions")
    assert {p.status.value for p in report.positions or ()} == {"OK"}
    with pytest.raises(AuditPlanError, match="buy and sell duplicates cancel out"):
        write_plan(report, _plan_path(tmp_path), now=NOW)
    assert Decimal(0) == sum((c.excess_qty if c.side == "BUY" else -c.excess_qty for c in report.duplicates), Decimal(0))
