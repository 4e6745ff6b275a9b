"""``orderguard audit`` on the command line: exit statuses, JSON/HTML output, plan/apply/rollback,
option conflicts, one-line errors, and the progress display on stderr."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest
from typer.testing import CliRunner

from orderguard.cli import app
from tests.audit.times import iso
from tests.helpers import need_duckdb

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from click.testing import Result




need_duckdb()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CLEAN = [(1, iso(0), "AAPL", "buy", 10, 100.0, "alpha"), (2, iso(600), "AAPL", "buy", 10, 100.0, "alpha"),
         (3, iso(0), "MSFT", "sell", 3, 0.1, "alpha")]
DIRTY = [*CLEAN, (4, iso(1), "MSFT", "sell", 3, 0.1, "alpha"), (5, iso(601), "AAPL", "buy", 10, 100.0, "alpha")]


def make_db(path: Path, rows: Sequence[Sequence[Any]] = DIRTY, *, cash: bool = True) -> str:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE trades (id INTEGER PRIMARY KEY, timestamp TEXT, symbol TEXT, side TEXT, qty REAL, price REAL, strategy TEXT)")
    conn.executemany("INSERT INTO trades VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    if cash:
        conn.execute("CREATE TABLE account (id INTEGER PRIMARY KEY, cash NUMERIC)")
        conn.execute("INSERT INTO account (cash) VALUES (5000)")
    conn.commit()
    conn.close()
    return str(path)


def rows_of(db: str, table: str = "trades") -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(f'SELECT * FROM "{table}" ORDER BY 1').fetchall()
    finally:
        conn.close()


def run(*args: str) -> Result:
    return CliRunner().invoke(app, ["audit", *args])


def assert_one_line_error(result: Result, code: int = 2, *, contains: str = "") -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    err = result.stderr
    assert err.startswith("orderguard: error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in result.output
    assert contains in err, err
    return err


# ----------------------------------------------------------------------------- exit statuses and output


def test_clean_history_exits_0(tmp_path: Path) -> None:
    result = run(make_db(tmp_path / "t.db", CLEAN))
    assert result.exit_code == 0, result.output
    assert "no duplicate bursts" in result.stdout
    assert result.stderr == ""


def test_duplicates_exit_1_with_a_summary(tmp_path: Path) -> None:
    result = run(make_db(tmp_path / "t.db"))
    assert result.exit_code == 1, result.output
    assert "DUPLICATES: 2 orders in 2 bursts" in result.stdout
    assert "AAPL" in result.stdout and "MSFT" in result.stdout
    assert "--plan fix.sql" in result.stdout  # the next step is suggested


def test_json_is_pure_and_money_is_decimal_strings(tmp_path: Path) -> None:
    result = run(make_db(tmp_path / "t.db"), "--json", "--cash", "account")
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert doc["totals"]["duplicate_orders"] == 2
    assert doc["totals"]["phantom_notional"] == "1000.3"
    assert doc["totals"]["excess_qty"] == "13"
    by_symbol = {t["symbol"]: t for t in doc["by_symbol"]}
    assert by_symbol["MSFT"]["phantom_notional"] == "0.3" and by_symbol["MSFT"]["cash_effect"] == "-0.3"
    assert doc["cash"][0]["phantom"] == "999.7" and doc["cash"][0]["corrected"] == "5999.7"
    assert doc["plan"] is None and doc["html"] is None
    assert {c["verdict"] for c in doc["clusters"]} == {"DUPLICATE"}


def test_json_clean_exits_0(tmp_path: Path) -> None:
    result = run(make_db(tmp_path / "t.db", CLEAN), "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["totals"]["duplicate_orders"] == 0


def test_html_report_is_written(tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = run(make_db(tmp_path / "t.db"), "--html", str(out), "--json")
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["html"] == str(out)
    text = out.read_text(encoding="utf-8")
    assert "<html" in text.lower() and "AAPL" in text


def test_html_into_a_missing_folder(tmp_path: Path) -> None:
    assert_one_line_error(run(make_db(tmp_path / "t.db"), "--html", str(tmp_path / "no" / "r.html")), contains="--html")


def test_csv_source_and_window(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("time,symbol,side,quantity,price\n" + f"{iso(0)},A,buy,1,10\n{iso(90)},A,buy,1,10\n")
    assert run(str(path)).exit_code == 0
    assert run(str(path), "--window", "2m", "--min-confidence", "0.55").exit_code == 1
    assert run(str(path), "--window", "120000ms", "--min-confidence", "0.55").exit_code == 1
    assert run(str(path), "--window", "2m").exit_code == 0  # 0.625: possible, not counted


def test_scope_and_no_scope(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db", [(1, iso(0), "A", "buy", 1, 10, "s1"), (2, iso(0), "A", "buy", 1, 10, "s2")])
    assert run(db).exit_code == 0
    assert run(db, "--no-scope").exit_code == 1
    assert run(db, "--scope", "strategy").exit_code == 0


# ----------------------------------------------------------------------------- plan, apply, rollback


def test_plan_apply_and_rollback(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    original = rows_of(db)
    plan = tmp_path / "fix.sql"
    result = run(db, "--cash", "account", "--plan", str(plan))
    assert result.exit_code == 1, result.output
    assert "plan written" in result.stdout and "nothing was changed" in result.stdout
    assert rows_of(db) == original
    assert plan.exists() and (tmp_path / "fix.rollback.sql").exists()

    applied = run(db, "--apply", str(plan))
    assert applied.exit_code == 0, applied.output
    assert "2 rows deleted" in applied.stdout
    assert [r[0] for r in rows_of(db)] == [1, 2, 3]
    assert rows_of(db, "account") == [(1, 5999.7)]
    assert run(db).exit_code == 0  # nothing left to find

    again = run(db, "--apply", str(plan))
    assert_one_line_error(again, contains="applied before")
    assert [r[0] for r in rows_of(db)] == [1, 2, 3]

    back = run(db, "--apply", str(tmp_path / "fix.rollback.sql"), "--json")
    assert back.exit_code == 0, back.output
    doc = json.loads(back.stdout)
    assert (doc["inserted"], doc["updated"], doc["deleted"]) == (2, 1, 0)
    assert rows_of(db) == original


def test_plan_in_json_output(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    result = run(db, "--plan", str(tmp_path / "fix.sql"), "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["plan"]["deletes"] == 2
    assert doc["plan"]["rollback"] == str(tmp_path / "fix.rollback.sql")


def test_plan_is_not_overwritten(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    (tmp_path / "fix.sql").write_text("keep me")
    assert_one_line_error(run(db, "--plan", str(tmp_path / "fix.sql")), contains="never overwritten")
    assert (tmp_path / "fix.sql").read_text() == "keep me"


def test_plan_for_a_file_source_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(f"timestamp,symbol,side,qty,price\n{iso(0)},A,buy,1,10\n{iso(1)},A,buy,1,10\n")
    assert_one_line_error(run(str(path), "--plan", str(tmp_path / "fix.sql")), contains="correction plan needs")
    assert not (tmp_path / "fix.sql").exists()


def test_edited_plan_is_refused(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    plan = tmp_path / "fix.sql"
    assert run(db, "--plan", str(plan)).exit_code == 1
    plan.write_text(plan.read_text().replace("IN (4)", "IN (3)"))
    before = rows_of(db)
    assert_one_line_error(run(db, "--apply", str(plan)), contains="edited after it was written")
    assert rows_of(db) == before


# ----------------------------------------------------------------------------- refused options and sources


@pytest.mark.parametrize(("args", "contains"), [
    (["--apply", "x.sql", "--plan", "y.sql"], "--apply runs a written plan"),
    (["--apply", "x.sql", "--html", "r.html"], "--apply runs a written plan"),
    (["--scope", "strategy", "--no-scope"], "--scope and --no-scope contradict"),
    (["--window", "soon"], "--window 'soon' is not a duration"),
    (["--window", "0"], "--window must be at least 1 ms"),
    (["--window", "8d"], "is not a duration"),
    (["--min-confidence", "1.5"], "--min-confidence must be between"),
    (["--price-tolerance", "0"], "--price-tolerance must be"),
    (["--qty", "nope"], "no column 'nope'"),
    (["--qty", "price", "--price", "price"], "both qty and price"),
    (["--table", "nope"], "tables: account, trades"),
    (["--starting-cash", "abc", "--cash", "account"], "--starting-cash 'abc' is not a number"),
    (["--positions", "nope"], "no table 'nope'"),
])
def test_bad_options_exit_2_with_one_line(tmp_path: Path, args: list[str], contains: str) -> None:
    db = make_db(tmp_path / "t.db")
    before = rows_of(db)
    assert_one_line_error(run(db, *args), contains=contains)
    assert rows_of(db) == before
    assert not (tmp_path / "y.sql").exists()


@pytest.mark.parametrize(("name", "content", "contains"), [
    ("missing.db", None, "does not exist"),
    ("notes.txt", b"hello", "column"),
    ("fake.db", b"not sqlite at all", "not a SQLite database"),
    ("empty.csv", b"timestamp,symbol,side,qty,price\n", "is empty"),
    ("bad.csv", b"timestamp,symbol,side,qty,price\n2026-01-20T14:30:00Z,A,buy,abc,10\n", "'qty'"),
    ("garbage.parquet", bytes(range(256)), "cannot read PARQUET"),
])
def test_bad_sources_exit_2_with_one_line(tmp_path: Path, name: str, content: bytes | None, contains: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    assert_one_line_error(run(str(path)), contains=contains)


def test_a_multi_line_message_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "late.csv"
    many = "".join(f"{iso(i * 120)},S{i},buy,1,10\n" for i in range(30_000))
    path.write_text("timestamp,symbol,side,qty,price\n" + many + f"{iso(1)},A,buy,1,10,7,8\n")
    assert_one_line_error(run(str(path)), contains="CSV Error")


def test_missing_plan_file(tmp_path: Path) -> None:
    assert_one_line_error(run(make_db(tmp_path / "t.db"), "--apply", str(tmp_path / "nope.sql")), contains="cannot read plan")


def test_unreachable_postgres_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    err = assert_one_line_error(run("postgresql://postgres:hunter2@127.0.0.1:1/test", "--table", "trades"),
                                contains="cannot connect")
    assert "hunter2" not in err


def test_out_of_range_time_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(f"timestamp,symbol,side,qty,price\n{iso(0)},A,buy,1,10\n99999999999999999999,A,buy,1,10\n")
    assert_one_line_error(run(str(path)), contains="timestamp")


# ----------------------------------------------------------------------------- progress


def test_progress_goes_to_stderr(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    result = run(db, "--progress", "--json")
    assert result.exit_code == 1
    json.loads(result.stdout)  # stdout stays pure JSON
    assert result.stderr.strip() != ""
    assert "reading table 'trades'" in result.stderr
    quiet = run(db, "--json")
    assert quiet.stderr == ""


# ----------------------------------------------------------------------------- a real process


def _orderguard(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "orderguard", "audit", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env, check=False)


def test_real_process_json_progress_plan_apply(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    original = rows_of(db)
    proc = _orderguard(db, "--json", "--progress", "--cash", "account", "--plan", "fix.sql", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)  # pure JSON despite the progress display
    assert doc["totals"]["phantom_notional"] == "1000.3"
    assert doc["plan"]["deletes"] == 2
    assert proc.stderr.strip() != "" and "Traceback" not in proc.stderr
    assert rows_of(db) == original
    applied = _orderguard(db, "--apply", "fix.sql", cwd=tmp_path)
    assert applied.returncode == 0, applied.stderr
    assert [r[0] for r in rows_of(db)] == [1, 2, 3]
    refused = _orderguard(db, "--apply", "fix.sql", "--json", cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert refused.stderr.startswith("orderguard: error: fix.sql: its backup table exists already")
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    back = run(db, "--apply", str(tmp_path / "fix.rollback.sql"))
    assert back.exit_code == 0, back.output
    assert rows_of(db) == original
