"""Correction plans, the safety-critical part of ``orderguard audit``: written without touching the
source, refused when edited, crafted, stale or applied twice, applied in one transaction (all or
nothing), undone by their rollback, and applied once when two processes race.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import queue
import re
import sqlite3
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from orderguard.audit import audit
from orderguard.audit.plan import MAGIC, MARKER, apply_plan, read_plan, rollback_path, write_plan
from orderguard.errors import AuditError, AuditPlanError, AuditSourceError
from tests.audit.times import iso, with_password
from tests.helpers import need_duckdb

if TYPE_CHECKING:
    from collections.abc import Sequence

    from orderguard.audit import AuditReport




need_duckdb()

PG_URL = os.environ.get("ORDERGUARD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
NOW = datetime(2026, 2, 1, 12, 0, 0, tzinfo=UTC)


# Two duplicates of AAPL (ids 2, 3), one of MSFT (id 5) at 0.1 x 3 = 0.3; id 6 a legit trade later.
TRADES = [
    (1, iso(0), "AAPL", "buy", 10, 100.0, "alpha"),
    (2, iso(1), "AAPL", "buy", 10, 100.0, "alpha"),
    (3, iso(2), "AAPL", "buy", 10, 100.0, "alpha"),
    (4, iso(100), "MSFT", "buy", 3, 0.1, "alpha"),
    (5, iso(101), "MSFT", "buy", 3, 0.1, "alpha"),
    (6, iso(5000), "AAPL", "sell", 5, 110.0, "alpha"),
]
DUPLICATE_IDS = {2, 3, 5}
PHANTOM_CASH = Decimal("2000.3")


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def make_db(path: Path, *, trades: Sequence[Sequence[Any]] = TRADES, cash: Sequence[Any] | None = ("1000.5",),
            with_id: bool = True, table: str = "trades") -> str:
    conn = sqlite3.connect(path)
    id_col = "id INTEGER PRIMARY KEY, " if with_id else ""
    conn.execute(f"CREATE TABLE {_q(table)} ({id_col}timestamp TEXT, symbol TEXT, side TEXT, qty REAL, price REAL, strategy TEXT)")
    conn.executemany(f"INSERT INTO {_q(table)} VALUES ({', '.join('?' * (7 if with_id else 6))})",
                     [tuple(t) if with_id else tuple(t[1:]) for t in trades])
    if cash is not None:
        conn.execute("CREATE TABLE account (id INTEGER PRIMARY KEY, cash NUMERIC)")
        conn.executemany("INSERT INTO account (cash) VALUES (?)", [(c,) for c in cash])
    conn.commit()
    conn.close()
    return str(path)


def dump(db: str) -> dict[str, Any]:
    """Every table (rows with rowids, sorted) and the schema: the whole database, for equality checks."""
    conn = sqlite3.connect(db)
    try:
        schema = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        out: dict[str, Any] = {"__schema__": schema}
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            out[name] = sorted(conn.execute(f"SELECT rowid, * FROM {_q(name)}").fetchall(), key=repr)
        return out
    finally:
        conn.close()


def trade_ids(db: str, table: str = "trades") -> set[int]:
    conn = sqlite3.connect(db)
    try:
        return {r[0] for r in conn.execute(f"SELECT rowid FROM {_q(table)}")}
    finally:
        conn.close()


def cash_of(db: str) -> list[Decimal]:
    conn = sqlite3.connect(db)
    try:
        return [Decimal(str(r[0])) for r in conn.execute("SELECT cash FROM account ORDER BY id")]
    finally:
        conn.close()


def backups(db: str) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'og_backup_%'")]
    finally:
        conn.close()


def planned(db: str, tmp_path: Path, name: str = "fix.sql", **kw: Any) -> tuple[AuditReport, str]:
    report = audit(db, **kw)
    path = str(tmp_path / name)
    write_plan(report, path, now=NOW)
    return report, path


def seal(body: str) -> str:
    """A plan file around ``body`` with a correct sha256, in plan.py's format."""
    digest = hashlib.sha256(body.encode()).hexdigest()
    return f"{MAGIC}\n-- crafted by a test\n-- sha256: {digest}\n{MARKER}\n{body}"


def statements(path: str) -> list[str]:
    text = Path(path).read_text(encoding="utf-8")
    return [line for line in text.split(MARKER + "\n", 1)[1].splitlines() if line and not line.startswith("--")]


# ----------------------------------------------------------------------------- writing


def test_plan_text_and_the_source_untouched(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    before = dump(db)
    report, path = planned(db, tmp_path, cash="account")
    assert {i for c in report.duplicates for i in c.repeat_ids} == DUPLICATE_IDS
    assert dump(db) == before  # writing a plan changes nothing
    text = Path(path).read_text(encoding="utf-8")
    assert text.startswith(MAGIC + "\n")
    head, body = text.split(f"\n{MARKER}\n", 1)
    (digest,) = re.findall(r"^-- sha256: ([0-9a-f]{64})$", head, re.M)
    assert digest == hashlib.sha256(body.encode()).hexdigest()
    assert "-- deletes 3 duplicate rows in 2 clusters; adds 2000.3 to account.cash" in head
    assert "UNVERIFIED" in head
    assert f"-- rollback: {os.path.basename(rollback_path(path))}" in head
    lines = statements(path)
    assert lines[0] == ".bail on"  # sqlite3's shell stops at the first error when the plan is run by hand
    lines = lines[1:]
    verbs = [line.split(" ", 1)[0] for line in lines]
    assert verbs[0] == "BEGIN" and verbs[-1] == "COMMIT;"
    first_change = min(i for i, v in enumerate(verbs) if v in ("DELETE", "UPDATE", "INSERT"))
    assert [v for v in verbs[:first_change] if v == "CREATE"] == ["CREATE", "CREATE"]  # both backups before any change
    for line in lines:  # one statement per line
        assert line.endswith(";") and line.count(";") == 1 and sqlite3.complete_statement(line), line
    deleted = {int(x) for line in lines if line.startswith("DELETE") for x in re.findall(r"\d+", line.split(" IN ", 1)[1])}
    assert deleted == DUPLICATE_IDS
    assert 'UPDATE "account" SET "cash" = "cash" + 2000.3;' in lines
    # every change is guarded by a check that --apply runs
    checks = [line for line in body.splitlines() if line.startswith("-- check (")]
    assert len(checks) == 2 + 2 + 1  # two backups, two clusters, one cash row
    assert os.path.exists(rollback_path(path))
    assert rollback_path(str(tmp_path / "fix.sql")) == str(tmp_path / "fix.rollback.sql")
    assert rollback_path(str(tmp_path / "fix")) == str(tmp_path / "fix.rollback.sql")


def test_read_plan_returns_header_and_steps(tmp_path: Path) -> None:
    _, path = planned(make_db(tmp_path / "t.db"), tmp_path)
    head, steps = read_plan(path)
    assert head[0] == MAGIC
    assert steps[0].sql.startswith("BEGIN") and steps[-1].sql == "COMMIT"
    assert sum(1 for s in steps if s.check is not None) == 3


def test_plan_refuses_file_sources(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("id,timestamp,symbol,side,qty,price\n" + "".join(f"{t[0]},{t[1]},{t[2]},{t[3]},{t[4]},{t[5]}\n" for t in TRADES))
    report = audit(str(path))
    assert report.duplicate_orders == 3
    with pytest.raises(AuditPlanError, match="CSV file: a correction plan needs the history in a SQLite or PostgreSQL table"):
        write_plan(report, str(tmp_path / "fix.sql"))
    assert not (tmp_path / "fix.sql").exists() and not (tmp_path / "fix.rollback.sql").exists()
    with pytest.raises(AuditPlanError, match="plans apply to SQLite and PostgreSQL"):
        apply_plan(str(path), str(tmp_path / "fix.sql"))


def test_plan_refuses_an_id_that_repeats(tmp_path: Path) -> None:
    rows = [(1, *t[1:]) if t[0] == 2 else t for t in TRADES]  # id 1 twice
    conn = sqlite3.connect(tmp_path / "t.db")
    conn.execute("CREATE TABLE trades (id INTEGER, timestamp TEXT, symbol TEXT, side TEXT, qty REAL, price REAL, strategy TEXT)")
    conn.executemany("INSERT INTO trades VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()
    report = audit(str(tmp_path / "t.db"))
    assert report.duplicates and not report.id_unique
    with pytest.raises(AuditPlanError, match=r"no column identifying each row uniquely \('id' repeats\); pass --id COLUMN"):
        write_plan(report, str(tmp_path / "fix.sql"))
    assert not (tmp_path / "fix.sql").exists()


def test_nothing_to_correct(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db", trades=[TRADES[0], TRADES[5]])
    report = audit(db)
    with pytest.raises(AuditPlanError, match="nothing to correct"):
        write_plan(report, str(tmp_path / "fix.sql"))
    assert not (tmp_path / "fix.sql").exists()


def test_plan_is_never_overwritten(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    report = audit(db)
    (tmp_path / "fix.sql").write_text("my notes")
    with pytest.raises(AuditPlanError, match="exists; a plan and its rollback are never overwritten"):
        write_plan(report, str(tmp_path / "fix.sql"))
    assert (tmp_path / "fix.sql").read_text() == "my notes"
    assert not (tmp_path / "fix.rollback.sql").exists()
    with pytest.raises(AuditPlanError, match="does not exist"):
        write_plan(report, str(tmp_path / "no-such-folder" / "fix.sql"))


def test_plan_is_not_half_written_when_its_rollback_name_is_taken(tmp_path: Path) -> None:
    report = audit(make_db(tmp_path / "t.db"))
    (tmp_path / "fix.rollback.sql").write_text("an older rollback")
    with pytest.raises(AuditPlanError, match="exists"):
        write_plan(report, str(tmp_path / "fix.sql"))
    assert (tmp_path / "fix.rollback.sql").read_text() == "an older rollback"
    assert not (tmp_path / "fix.sql").exists()


def test_positions_decide_what_a_plan_deletes(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE positions (symbol TEXT PRIMARY KEY, quantity REAL)")
    # AAPL holds the trades without its duplicates (phantom); MSFT holds them all (the venue filled them: real)
    conn.executemany("INSERT INTO positions VALUES (?, ?)", [("AAPL", 5), ("MSFT", 6)])
    conn.commit()
    conn.close()
    report, path = planned(db, tmp_path, positions="positions", cash="account")
    assert {(p.symbol, p.status.value) for p in report.positions or ()} == {("AAPL", "PHANTOM"), ("MSFT", "REAL")}
    deleted = {int(x) for line in statements(path) if line.startswith("DELETE") for x in re.findall(r"\d+", line.split(" IN ", 1)[1])}
    assert deleted == {2, 3}
    text = Path(path).read_text(encoding="utf-8")
    assert "-- left alone: MSFT alpha BUY (1 duplicates, REAL)" in text
    apply_plan(db, path)
    assert trade_ids(db) == {1, 4, 5, 6}
    assert cash_of(db) == [Decimal("1000.5") + Decimal(2000)]


# ----------------------------------------------------------------------------- apply and roll back


# prices whose sums are exact in binary: the rollback takes the cash back by arithmetic, and the REAL cash
# column must come back bit for bit
DYADIC = [(*t[:5], 0.25 if t[2] == "MSFT" else t[5], t[6]) for t in TRADES]


def test_apply_then_rollback_restores_the_original(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db", trades=DYADIC)
    original = dump(db)
    _, path = planned(db, tmp_path, cash="account")
    result = apply_plan(db, path)
    assert (result.deleted, result.updated, result.inserted, result.checks) == (3, 1, 0, 5)
    assert trade_ids(db) == {1, 4, 6}
    assert cash_of(db) == [Decimal("1000.5") + Decimal("2000.75")]
    assert len(backups(db)) == 2
    # a re-audit of the corrected table finds nothing
    assert audit(db).duplicates == []
    back = apply_plan(db, rollback_path(path))
    assert (back.inserted, back.updated, back.deleted) == (3, 1, 0)
    restored = dump(db)
    for name in backups(db):
        restored.pop(name)
    restored["__schema__"] = [r for r in restored["__schema__"] if not r[1].startswith("og_backup_")]
    assert restored == original
    # the rows are back: the rollback will not run twice
    with pytest.raises(AuditPlanError, match=r"check failed: none of the 3 deleted rows is back .*nothing was changed"):
        apply_plan(db, rollback_path(path))
    assert cash_of(db) == [Decimal("1000.5")]


def test_rollback_restores_a_real_cash_column_exactly(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")  # cash 1000.5 REAL; the plan adds 2000.3, and 1000.5 + 2000.3 - 2000.3 != 1000.5
    _, path = planned(db, tmp_path, cash="account")
    apply_plan(db, path)
    apply_plan(db, rollback_path(path))
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT cash, typeof(cash) FROM account").fetchall() == [(1000.5, "real")]
    conn.close()


def test_rollback_after_the_cash_moved_takes_back_only_the_plan(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db", trades=DYADIC)
    _, path = planned(db, tmp_path, cash="account")
    apply_plan(db, path)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE account SET cash = cash + 100")  # a deposit after the correction
    conn.commit()
    conn.close()
    apply_plan(db, rollback_path(path))
    assert cash_of(db) == [Decimal("1100.5")]
    assert trade_ids(db) == {t[0] for t in TRADES}


def test_rollback_before_the_plan_is_refused(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    before = dump(db)
    _, path = planned(db, tmp_path, cash="account")
    with pytest.raises(AuditPlanError, match="check failed"):
        apply_plan(db, rollback_path(path))
    assert dump(db) == before


def test_rowid_stands_in_for_a_missing_id(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db", with_id=False)
    original = dump(db)
    report, path = planned(db, tmp_path)
    assert report.columns.id == "rowid" and report.id_unique
    assert {i for c in report.duplicates for i in c.repeat_ids} == DUPLICATE_IDS
    assert 'DELETE FROM "trades" WHERE "rowid" IN (2, 3);' in statements(path)
    apply_plan(db, path)
    assert trade_ids(db) == {1, 4, 6}
    apply_plan(db, rollback_path(path))
    restored = dump(db)
    assert restored["trades"] == original["trades"]  # the same rows under the same rowids


def test_without_rowid_table_is_audited_but_not_planned(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "t.db")
    conn.execute("CREATE TABLE trades (timestamp TEXT, symbol TEXT, side TEXT, qty REAL, price REAL, "
                 "PRIMARY KEY (timestamp, symbol)) WITHOUT ROWID")
    conn.executemany("INSERT INTO trades VALUES (?, ?, ?, ?, ?)", [(iso(0), "A", "buy", 1, 10), (iso(1), "A", "buy", 1, 10)])
    conn.commit()
    conn.close()
    report = audit(str(tmp_path / "t.db"))
    assert report.duplicate_orders == 1
    with pytest.raises(AuditPlanError, match="no column identifying each row uniquely"):
        write_plan(report, str(tmp_path / "fix.sql"))


def test_cash_is_given_back_per_account(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "t.db")
    conn.execute("CREATE TABLE trades (id INTEGER PRIMARY KEY, timestamp TEXT, symbol TEXT, side TEXT, qty TEXT, price TEXT, account TEXT)")
    conn.executemany("INSERT INTO trades VALUES (?, ?, ?, ?, ?, ?, ?)", [
        (1, iso(0), "AAPL", "buy", "2", "10.05", "A"), (2, iso(1), "AAPL", "buy", "2", "10.05", "A"),
        (3, iso(0), "AAPL", "buy", "2", "10.05", "B"), (4, iso(0), "KO", "sell", "1", "60", "B"), (5, iso(2), "KO", "sell", "1", "60", "B"),
    ])
    conn.execute("CREATE TABLE balances (account TEXT PRIMARY KEY, cash TEXT)")
    conn.executemany("INSERT INTO balances VALUES (?, ?)", [("A", "100.00"), ("B", "200.00"), ("C", "1")])
    conn.commit()
    conn.close()
    db = str(tmp_path / "t.db")
    report, path = planned(db, tmp_path, cash="balances")
    assert {c.key: c.phantom for c in report.cash or ()} == {("A",): Decimal("20.1"), ("B",): Decimal(-60), ("C",): Decimal(0)}
    apply_plan(db, path)
    conn = sqlite3.connect(db)
    # A gets back what the phantom buy drained, B gives back what the phantom sell credited, C untouched
    assert {a: Decimal(str(c)) for a, c in conn.execute("SELECT account, cash FROM balances")} == {
        "A": Decimal("120.1"), "B": Decimal(140), "C": Decimal(1)}
    conn.close()
    assert trade_ids(db) == {1, 3, 4}


def test_applied_twice_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    _, path = planned(db, tmp_path, cash="account")
    apply_plan(db, path)
    after_once = dump(db)
    with pytest.raises(AuditPlanError, match=r"applied before.*nothing was changed.*fix\.rollback\.sql"):
        apply_plan(db, path)
    assert dump(db) == after_once
    # with the backups dropped the stale checks still refuse it
    conn = sqlite3.connect(db)
    for name in backups(db):
        conn.execute(f"DROP TABLE {_q(name)}")
    conn.commit()
    conn.close()
    after_drop = dump(db)
    with pytest.raises(AuditPlanError, match="check failed: 2 rows to delete are still AAPL buys"):
        apply_plan(db, path)
    assert dump(db) == after_drop


@pytest.mark.parametrize("change", [
    "DELETE FROM trades WHERE id = 3",
    "UPDATE trades SET symbol = 'AAPL.OLD' WHERE id = 5",
    "UPDATE trades SET symbol = 'MSFT' WHERE id = 2",
    "INSERT INTO account (cash) VALUES (5)",  # a second cash row: the cash check fails after the deletes ran
    "DELETE FROM account",
])
def test_source_changed_since_the_plan_changes_nothing(tmp_path: Path, change: str) -> None:
    db = make_db(tmp_path / "t.db")
    _, path = planned(db, tmp_path, cash="account")
    conn = sqlite3.connect(db)
    conn.execute(change)
    conn.commit()
    conn.close()
    before = dump(db)
    with pytest.raises(AuditPlanError, match=r"check failed: .*nothing was changed"):
        apply_plan(db, path)
    assert dump(db) == before
    assert backups(db) == []


def test_a_failing_statement_midway_rolls_everything_back(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    _, path = planned(db, tmp_path, cash="account")
    conn = sqlite3.connect(db)
    conn.execute("CREATE TRIGGER no_cash BEFORE UPDATE ON account BEGIN SELECT RAISE(ABORT, 'cash is frozen'); END")
    conn.commit()
    conn.close()
    before = dump(db)
    with pytest.raises(AuditPlanError, match=r"UPDATE .* failed: cash is frozen; nothing was changed"):
        apply_plan(db, path)
    assert dump(db) == before  # the deletes that ran before the UPDATE are undone, the backups gone
    assert trade_ids(db) == {t[0] for t in TRADES}


def test_edited_plan_is_refused(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    _, path = planned(db, tmp_path, cash="account")
    text = Path(path).read_text(encoding="utf-8")
    edited = text.replace('WHERE "id" IN (2, 3);', 'WHERE "id" IN (2, 4);')
    assert edited != text
    Path(path).write_text(edited, encoding="utf-8")
    before = dump(db)
    with pytest.raises(AuditPlanError, match="was edited after it was written"):
        apply_plan(db, path)
    assert dump(db) == before


def test_edited_check_is_refused(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    _, path = planned(db, tmp_path)
    text = Path(path).read_text(encoding="utf-8")
    assert "expect 2 from" in text
    Path(path).write_text(text.replace("expect 2 from", "expect 0 from", 1), encoding="utf-8")
    with pytest.raises(AuditPlanError, match="was edited"):
        apply_plan(db, path)


def test_sha256_line_removed_is_refused(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    _, path = planned(db, tmp_path)
    text = Path(path).read_text(encoding="utf-8")
    assert "-- sha256: " in text
    Path(path).write_text(re.sub(r"^-- sha256: .*\n", "", text, flags=re.M), encoding="utf-8")
    with pytest.raises(AuditPlanError, match="was edited"):
        apply_plan(db, path)


@pytest.mark.parametrize(("body", "message"), [
    ('BEGIN IMMEDIATE;\nDELETE FROM "trades" WHERE "id" IN (2, 3);\nCOMMIT;\n', "without taking a backup of it first"),
    ('BEGIN IMMEDIATE;\nDELETE FROM "trades" WHERE "id" IN (2);\nCREATE TABLE "bk" AS SELECT * FROM "trades";\nCOMMIT;\n',
     "without taking a backup of it first"),
    ('CREATE TABLE "bk" AS SELECT * FROM "trades";\nDELETE FROM "trades" WHERE "id" IN (2);\n', "does not run in one transaction"),
    ('BEGIN IMMEDIATE;\nCREATE TABLE "bk" AS SELECT * FROM "trades";\nDELETE FROM "trades" WHERE "id" IN (2);\n',
     "does not run in one transaction"),
])
def test_crafted_plan_with_valid_hash_is_refused(tmp_path: Path, body: str, message: str) -> None:
    db = make_db(tmp_path / "t.db")
    before = dump(db)
    path = tmp_path / "crafted.sql"
    path.write_text(seal(body), encoding="utf-8")
    with pytest.raises(AuditPlanError, match=message):
        apply_plan(db, str(path))
    assert dump(db) == before


def test_crafted_plan_with_a_backup_runs(tmp_path: Path) -> None:
    # the same crafted file with a backup first is accepted: the refusal above is about the backup, not the hash
    db = make_db(tmp_path / "t.db")
    path = tmp_path / "crafted.sql"
    path.write_text(seal('BEGIN IMMEDIATE;\nCREATE TABLE "bk" AS SELECT * FROM "trades";\n'
                         '-- check (two rows): expect 1 from SELECT count(*) FROM "trades" WHERE "id" IN (2)\n'
                         'DELETE FROM "trades" WHERE "id" IN (2);\nCOMMIT;\n'), encoding="utf-8")
    assert apply_plan(db, str(path)).deleted == 1
    assert trade_ids(db) == {1, 3, 4, 5, 6}


@pytest.mark.parametrize("content", [b"", b"DELETE FROM trades;\n", b"\xff\xfe\x00garbage", MAGIC.encode() + b"\nno marker\n"])
def test_not_a_plan(tmp_path: Path, content: bytes) -> None:
    db = make_db(tmp_path / "t.db")
    before = dump(db)
    path = tmp_path / "x.sql"
    path.write_bytes(content)
    with pytest.raises(AuditPlanError, match="is not an orderguard plan"):
        apply_plan(db, str(path))
    assert dump(db) == before


def test_missing_plan_and_missing_source(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    with pytest.raises(AuditPlanError, match="cannot read plan"):
        apply_plan(db, str(tmp_path / "nope.sql"))
    with pytest.raises(AuditPlanError, match="cannot read plan"):
        apply_plan(db, str(tmp_path))
    _, path = planned(db, tmp_path)
    with pytest.raises(AuditSourceError, match="does not exist"):
        apply_plan(str(tmp_path / "other.db"), path)
    assert not (tmp_path / "other.db").exists()


def test_plan_for_a_table_with_hostile_names(tmp_path: Path) -> None:
    table = 'trades"; DROP TABLE x; --'
    db = make_db(tmp_path / "t.db", table=table, cash=None)
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE x (y)")
    conn.commit()
    conn.close()
    original = dump(db)
    _, path = planned(db, tmp_path, table=table)
    apply_plan(db, path)
    assert trade_ids(db, table) == {1, 4, 6}
    assert "x" in dump(db)
    apply_plan(db, rollback_path(path))
    assert dump(db)[table] == original[table]
    assert dump(db)["x"] == []


def _text_id_db(path: Path, ids: Sequence[str]) -> str:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE trades (trade_id TEXT PRIMARY KEY, timestamp TEXT, symbol TEXT, side TEXT, qty REAL, price REAL)")
    conn.executemany("INSERT INTO trades VALUES (?, ?, ?, ?, ?, ?)",
                     [(i, iso(n), "AAPL", "buy", 1, 10) for n, i in enumerate(ids)])
    conn.commit()
    conn.close()
    return str(path)


def test_text_ids_round_trip(tmp_path: Path) -> None:
    db = _text_id_db(tmp_path / "t.db", ["ex-a'1", "ex-b'2", "ex-c'3"])
    original = dump(db)
    report, path = planned(db, tmp_path)
    assert report.clusters[0].repeat_ids == ("ex-b'2", "ex-c'3")
    apply_plan(db, path)
    assert [r[1] for r in dump(db)["trades"]] == ["ex-a'1"]
    apply_plan(db, rollback_path(path))
    assert dump(db)["trades"] == original["trades"]


def test_zero_padded_text_ids(tmp_path: Path) -> None:
    db = _text_id_db(tmp_path / "t.db", ["0001", "0002"])
    report, path = planned(db, tmp_path)
    assert report.clusters[0].repeat_ids == ("0002",)
    apply_plan(db, path)
    assert [r[1] for r in dump(db)["trades"]] == ["0001"]


def test_plan_for_a_sqlite_table_with_a_dot(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db", table="my.trades", cash=None)
    _, path = planned(db, tmp_path, table="my.trades")
    apply_plan(db, path)
    assert trade_ids(db, "my.trades") == {1, 4, 6}


# ----------------------------------------------------------------------------- racing processes


def _apply_in_child(source: str, path: str, barrier: Any, results: Any) -> None:
    barrier.wait(timeout=60)
    try:
        result = apply_plan(source, path)
    except AuditError as exc:
        results.put(("refused", type(exc).__name__, str(exc)))
    except BaseException as exc:  # anything else is a failure the parent reports
        results.put(("crashed", type(exc).__name__, str(exc)))
    else:
        results.put(("applied", result.deleted, result.updated))


def race(source: str, path: str) -> list[tuple[Any, ...]]:
    """Two processes released together apply the same plan; their outcomes."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [ctx.Process(target=_apply_in_child, args=(source, path, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + 90
    try:
        while len(outcomes) < len(procs):
            try:
                outcomes.append(results.get(timeout=1))
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and results.empty():
                    pytest.fail(f"a child died without reporting (exit codes {[p.exitcode for p in procs]})")
                if time.monotonic() > deadline:
                    pytest.fail("the racing children did not finish within 90 s")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    return sorted(outcomes, key=lambda o: o[0])


def test_two_processes_apply_one_plan_once_sqlite(tmp_path: Path) -> None:
    db = make_db(tmp_path / "t.db")
    _, path = planned(db, tmp_path, cash="account")
    outcomes = race(db, path)
    assert [o[0] for o in outcomes] == ["applied", "refused"], outcomes
    assert outcomes[0][1:] == (3, 1)
    assert outcomes[1][1] == "AuditPlanError"
    assert trade_ids(db) == {1, 4, 6}
    assert cash_of(db) == [Decimal("1000.5") + PHANTOM_CASH]  # given back once
    assert len(backups(db)) == 2


# ----------------------------------------------------------------------------- PostgreSQL




def pg_make(url: str, schema: str, *, id_type: str = "bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY") -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {schema}.trades (id {id_type}, ts timestamptz, symbol text, side text, qty numeric, "
                     "price numeric, strategy text)")
        for t in TRADES:
            conn.execute(f"INSERT INTO {schema}.trades (ts, symbol, side, qty, price, strategy) VALUES (%s, %s, %s, %s, %s, %s)"
                         if "IDENTITY" in id_type else
                         f"INSERT INTO {schema}.trades (id, ts, symbol, side, qty, price, strategy) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                         t[1:] if "IDENTITY" in id_type else (str(t[0]), *t[1:]))
        conn.execute(f"CREATE TABLE {schema}.account (name text PRIMARY KEY, cash numeric(20, 4))")
        conn.execute(f"INSERT INTO {schema}.account VALUES ('main', 1000.5)")


def pg_dump(url: str, schema: str) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(url) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s ORDER BY 1", (schema,))]
        return {t: sorted(conn.execute(f"SELECT * FROM {schema}.{_q(t)}").fetchall(), key=repr) for t in tables}


def test_postgres_apply_rollback_and_twice(pg: tuple[str, str], tmp_path: Path) -> None:
    url, schema = pg
    pg_make(url, schema)
    original = pg_dump(url, schema)
    report = audit(with_password(url, "pw-in-url"), table=f"{schema}.trades", cash=f"{schema}.account")
    path = str(tmp_path / "fix.sql")
    summary = write_plan(report, path, now=NOW)
    assert summary.deletes == 3 and summary.backups[0].startswith(f"{schema}.og_backup_20260201120000_")
    assert "pw-in-url" not in Path(path).read_text(encoding="utf-8") and "pw-in-url" not in Path(rollback_path(path)).read_text(encoding="utf-8")
    assert pg_dump(url, schema) == original
    result = apply_plan(url, path)
    assert (result.deleted, result.updated) == (3, 1)
    after = pg_dump(url, schema)
    assert {r[0] for r in after["trades"]} == {1, 4, 6}
    assert after["account"] == [("main", Decimal("1000.5") + PHANTOM_CASH)]
    with pytest.raises(AuditPlanError, match="applied before"):
        apply_plan(url, path)
    assert pg_dump(url, schema) == after
    apply_plan(url, rollback_path(path))  # identity ids go back as they were (OVERRIDING SYSTEM VALUE)
    restored = pg_dump(url, schema)
    assert {k: v for k, v in restored.items() if not k.startswith("og_backup_")} == original
    with pytest.raises(AuditPlanError, match="check failed"):
        apply_plan(url, rollback_path(path))


def test_postgres_stale_plan_changes_nothing(pg: tuple[str, str], tmp_path: Path) -> None:
    url, schema = pg
    pg_make(url, schema)
    report = audit(url, table=f"{schema}.trades", cash=f"{schema}.account")
    path = str(tmp_path / "fix.sql")
    write_plan(report, path, now=NOW)
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"UPDATE {schema}.trades SET symbol = 'MSFT.X' WHERE id = 5")
    before = pg_dump(url, schema)
    with pytest.raises(AuditPlanError, match="check failed: 1 rows to delete are still MSFT buys"):
        apply_plan(url, path)
    assert pg_dump(url, schema) == before


def test_postgres_unreachable_apply(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    path = tmp_path / "p.sql"
    path.write_text(seal("BEGIN;\nCOMMIT;\n"))
    with pytest.raises(AuditSourceError, match=r"cannot connect to postgresql://postgres:\*\*\*@127.0.0.1:1/test") as info:
        apply_plan("postgresql://postgres:hunter2@127.0.0.1:1/test", str(path))
    assert "hunter2" not in str(info.value)


def test_two_processes_apply_one_plan_once_postgres(pg: tuple[str, str], tmp_path: Path) -> None:
    url, schema = pg
    pg_make(url, schema)
    report = audit(url, table=f"{schema}.trades", cash=f"{schema}.account")
    path = str(tmp_path / "fix.sql")
    write_plan(report, path, now=NOW)
    outcomes = race(url, path)
    assert [o[0] for o in outcomes] == ["applied", "refused"], outcomes
    assert outcomes[0][1:] == (3, 1)
    after = pg_dump(url, schema)
    assert {r[0] for r in after["trades"]} == {1, 4, 6}
    assert after["account"] == [("main", Decimal("1000.5") + PHANTOM_CASH)]
    assert len([t for t in after if t.startswith("og_backup_")]) == 2


def test_postgres_plan_for_hostile_names(pg: tuple[str, str], tmp_path: Path) -> None:
    url, schema = pg
    table = 'trades"; DROP TABLE x; --'
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {schema}.x (y int)")
        conn.execute(f"CREATE TABLE {schema}.{_q(table)} (id int PRIMARY KEY, ts timestamptz, symbol text, side text, "
                     "qty numeric, price numeric)")
        conn.execute(f"INSERT INTO {schema}.{_q(table)} VALUES (1, %s, 'A', 'buy', 1, 2), (2, %s, 'A', 'buy', 1, 2)",
                     (iso(0), iso(1)))
    original = pg_dump(url, schema)
    report = audit(url, table=f"{schema}.{table}")
    path = str(tmp_path / "fix.sql")
    write_plan(report, path, now=NOW)
    apply_plan(url, path)
    assert [r[0] for r in pg_dump(url, schema)[table]] == [1]
    apply_plan(url, rollback_path(path))
    restored = pg_dump(url, schema)
    assert {k: v for k, v in restored.items() if not k.startswith("og_backup_")} == original


def test_postgres_long_table_names(pg: tuple[str, str], tmp_path: Path) -> None:
    url, schema = pg
    prefix = "desk_alpha_strategy_momentum_us_equities_"
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {schema}.{prefix}trades (id int PRIMARY KEY, ts timestamptz, symbol text, side text, "
                     "qty numeric, price numeric)")
        conn.execute(f"INSERT INTO {schema}.{prefix}trades VALUES (1, %s, 'A', 'buy', 1, 2), (2, %s, 'A', 'buy', 1, 2)",
                     (iso(0), iso(1)))
        conn.execute(f"CREATE TABLE {schema}.{prefix}cash (cash numeric)")
        conn.execute(f"INSERT INTO {schema}.{prefix}cash VALUES (100)")
    report = audit(url, table=f"{schema}.{prefix}trades", cash=f"{schema}.{prefix}cash")
    path = str(tmp_path / "fix.sql")
    summary = write_plan(report, path, now=NOW)
    assert len(set(summary.backups)) == 2
    apply_plan(url, path)


def test_postgres_text_ids(pg: tuple[str, str], tmp_path: Path) -> None:
    url, schema = pg
    pg_make(url, schema, id_type="text PRIMARY KEY")
    report = audit(url, table=f"{schema}.trades", cash=f"{schema}.account")
    path = str(tmp_path / "fix.sql")
    write_plan(report, path, now=NOW)
    apply_plan(url, path)
    assert {r[0] for r in pg_dump(url, schema)["trades"]} == {"1", "4", "6"}
