"""The disaster of the issue, end to end, on a generated history whose duplicates are known by id.

tests/audit/disaster.py writes ~47 symbols of normal trading (entries, scale-ins, exits, two
strategies buying one symbol seconds apart) plus bursts of 2–52 identical buys seconds apart;
the positions are right and the cash paid for every duplicate. What is proved here:

1. the audit finds the injected duplicates (precision and recall ≥ 0.99 over several seeds), per
   symbol as many as were injected, and sizes them exactly (excess quantity and phantom notional
   are the sums of the injected rows, read back from the database by id, in Decimal);
2. positions: every burst symbol PHANTOM, every other OK; cash corrected = the true cash;
3. the plan, applied to a copy (through the API and through the CLI), leaves exactly the intended
   trades and the true cash, and a second audit finds nothing; the rollback puts the rows back;
4. the same on PostgreSQL (timestamptz, numeric, an identity key), and from CSV and Parquet
   exports (same duplicates; a plan is refused for a file);
5. the audit never writes its source, and reads the trades from one snapshot while another
   process commits into the table.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from orderguard.audit import AuditReport, audit
from orderguard.audit import source as audit_source
from orderguard.audit.books import BookStatus
from orderguard.audit.plan import apply_plan, rollback_path, write_plan
from orderguard.cli import app
from orderguard.errors import AuditPlanError
from tests.audit.disaster import Disaster, make_disaster

SEEDS = [7, 11, 2026]
CENT = Decimal("0.01")
BOOKS = {"positions": "positions", "cash": "account"}
TABLES = {"trades": "id", "positions": "symbol", "account": "id"}


# ------------------------------------------------------------------------------ helpers


def dec(value: object) -> Decimal:
    """A stored number as the exact decimal of its text (a float's shortest repr, as sqlite3 shows it)."""
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))


def read(path: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def dump(path: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the three tables, in key order."""
    return {table: read(path, f"SELECT * FROM {table} ORDER BY {key}") for table, key in TABLES.items()}


def cash_of(path: str) -> Decimal:
    ((cash,),) = read(path, "SELECT cash FROM account")
    return dec(cash)


def injected(path: str, ids: set[int]) -> dict[str, tuple[int, Decimal, Decimal]]:
    """Per symbol: how many of ``ids`` it holds, their quantity and their notional, from the database."""
    out: dict[str, tuple[int, Decimal, Decimal]] = {}
    for id_, symbol, qty, price in read(path, "SELECT id, symbol, quantity, price FROM trades ORDER BY id"):
        if id_ in ids:
            n, q, notional = out.get(symbol, (0, Decimal(0), Decimal(0)))
            out[symbol] = (n + 1, q + dec(qty), notional + dec(qty) * dec(price))
    return out


def signature(report: AuditReport) -> list[tuple[Any, ...]]:
    """The duplicate clusters as comparable values (every source of one history must give the same)."""
    return sorted(
        (c.symbol, c.side, c.scope, int(c.first_id), tuple(int(i) for i in c.repeat_ids), c.excess_qty, c.phantom_notional)
        for c in report.duplicates
    )


def statuses(report: AuditReport) -> dict[str, BookStatus]:
    assert report.positions is not None
    return {p.symbol: p.status for p in report.positions}


def backups(path: str) -> list[str]:
    return [r[0] for r in read(path, "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'og_backup_%' ORDER BY name")]


def to_wal(path: str) -> None:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    finally:
        conn.close()


def sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


# ------------------------------------------------------------------------------ 1, 2: found and sized


@pytest.fixture(scope="module", params=SEEDS, ids=[f"seed{s}" for s in SEEDS])
def seeded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Disaster, AuditReport]:
    """One disaster per seed, audited once (the source is only read)."""
    path = str(tmp_path_factory.mktemp(f"seed{request.param}") / "trading.db")
    disaster = make_disaster(path, seed=request.param)
    return path, disaster, audit(path, **BOOKS)


def test_the_generator_injects_the_disaster_shape(seeded: tuple[str, Disaster, AuditReport]) -> None:
    path, d, _ = seeded
    symbols = {r[0] for r in read(path, "SELECT DISTINCT symbol FROM trades")}
    assert len(symbols) == 47
    assert d.burst_sizes["JD"] == 52 and min(d.burst_sizes.values()) >= 2 and max(d.burst_sizes.values()) == 52
    assert len(d.duplicate_ids) == sum(n - 1 for n in d.burst_sizes.values())
    assert d.duplicate_ids.isdisjoint(d.legit_ids)
    assert {r[0] for r in read(path, "SELECT id FROM trades")} == d.duplicate_ids | d.legit_ids
    assert len(d.legit_ids) > len(d.duplicate_ids)  # mostly normal trading
    assert cash_of(path) == d.recorded_cash < d.true_cash  # the cash paid for the duplicates


def test_precision_and_recall_at_least_99_percent(seeded: tuple[str, Disaster, AuditReport]) -> None:
    _, d, report = seeded
    found = [int(i) for c in report.duplicates for i in c.repeat_ids]
    assert found, "no duplicates found"
    assert len(found) == len(set(found)), "a row is counted in two clusters"
    hits = set(found) & d.duplicate_ids
    precision, recall = len(hits) / len(found), len(hits) / len(d.duplicate_ids)
    assert precision >= 0.99 and recall >= 0.99, (
        f"precision {precision:.4f}, recall {recall:.4f}; false positives {sorted(set(found) - d.duplicate_ids)[:20]}, "
        f"missed {sorted(d.duplicate_ids - set(found))[:20]}"
    )


def test_per_symbol_counts_and_sizes_are_the_injected_ones(seeded: tuple[str, Disaster, AuditReport]) -> None:
    path, d, report = seeded
    expected = injected(path, d.duplicate_ids)
    totals = {t.symbol: t for t in report.by_symbol()}
    assert set(totals) == set(d.burst_sizes)
    for symbol, orders in d.burst_sizes.items():
        t = totals[symbol]
        count, qty, notional = expected[symbol]
        assert (t.duplicate_orders, t.clusters) == (orders - 1, 1) == (count, 1), symbol
        # the cluster holds the burst, and may hold a normal trade of that strategy placed within the window
        assert t.largest_burst >= orders, symbol
        assert t.excess_qty == qty, symbol
        assert t.phantom_notional == notional, symbol
        assert t.cash_effect == notional, symbol  # buys: the cash they drained
    jd = totals["JD"]
    assert (jd.duplicate_orders, jd.largest_burst) == (51, 52)
    assert report.by_symbol()[0].symbol == "JD"  # the largest burst is the most phantom money
    assert report.duplicate_orders == len(d.duplicate_ids)
    assert report.excess_qty == sum((q for _, q, _ in expected.values()), Decimal(0))
    assert report.phantom_notional == sum((n for _, _, n in expected.values()), Decimal(0))
    # each burst is kept from its first order on: the original is a real trade of that symbol
    symbol_of = dict(read(path, "SELECT id, symbol FROM trades"))
    for c in report.duplicates:
        assert int(c.first_id) in d.legit_ids and symbol_of[int(c.first_id)] == c.symbol
        assert {symbol_of[int(i)] for i in c.repeat_ids} == {c.symbol}


def test_positions_and_cash_reconcile(seeded: tuple[str, Disaster, AuditReport]) -> None:
    path, d, report = seeded
    expected = injected(path, d.duplicate_ids)
    by_symbol = statuses(report)
    assert len(by_symbol) == 47
    assert {s for s, status in by_symbol.items() if status is BookStatus.PHANTOM} == set(d.burst_sizes)
    assert {status for s, status in by_symbol.items() if s not in d.burst_sizes} == {BookStatus.OK}
    assert report.positions is not None
    for p in report.positions:
        assert p.position == d.positions.get(p.symbol, Decimal(0)), p.symbol
        assert p.duplicates_net == expected.get(p.symbol, (0, Decimal(0), Decimal(0)))[1], p.symbol
    assert report.fixable() == report.duplicates
    assert report.cash is not None and len(report.cash) == 1
    (cash,) = report.cash
    assert cash.recorded == cash_of(path) == d.recorded_cash
    assert cash.phantom == report.phantom_notional
    assert cash.corrected.quantize(CENT) == d.true_cash.quantize(CENT)
    assert cash.corrected == d.true_cash  # exact: the recorded cash is stored to the cent


# ------------------------------------------------------------------------------ 3: plan, apply, rollback (SQLite)


def check_corrected(path: str, d: Disaster, before: dict[str, list[tuple[Any, ...]]]) -> None:
    """``path`` after the plan: exactly the intended trades, untouched positions, the true cash,
    and nothing left for a second audit to find."""
    after = dump(path)
    assert {r[0] for r in after["trades"]} == d.legit_ids
    assert after["trades"] == [r for r in before["trades"] if r[0] in d.legit_ids]
    assert after["positions"] == before["positions"]
    assert cash_of(path).quantize(CENT) == d.true_cash.quantize(CENT)
    again = audit(path, **BOOKS)
    assert again.counts()["DUPLICATE"] == 0 and again.duplicates == []
    assert set(statuses(again).values()) == {BookStatus.OK}
    assert again.cash is not None and again.cash[0].phantom == 0


def check_restored(path: str, before: dict[str, list[tuple[Any, ...]]]) -> None:
    restored = dump(path)
    assert restored["trades"] == before["trades"]
    assert restored["positions"] == before["positions"]
    assert [r[0] for r in restored["account"]] == [r[0] for r in before["account"]]
    # to the cent: test_rollback_restores_a_real_cash_column_exactly shows the last bit can differ
    assert cash_of(path).quantize(CENT) == dec(before["account"][0][1]).quantize(CENT)
    names = backups(path)
    assert len(names) == 2, names  # kept after the rollback
    trades_backup = next(n for n in names if n.endswith("_trades"))
    account_backup = next(n for n in names if n.endswith("_account"))
    assert read(path, f'SELECT * FROM "{trades_backup}" ORDER BY id') == before["trades"]
    assert read(path, f'SELECT * FROM "{account_backup}"') == before["account"]


@pytest.mark.parametrize("disaster_db", SEEDS, indirect=True, ids=[f"seed{s}" for s in SEEDS])
def test_plan_on_a_copy_restores_the_true_cash_and_rollback_the_original(
    disaster_db: tuple[str, Disaster], tmp_path: Path,
) -> None:
    path, d = disaster_db
    original = dump(path)
    copy = str(tmp_path / "copy.db")
    shutil.copy(path, copy)
    report = audit(copy, **BOOKS)
    plan = str(tmp_path / "fix.sql")
    summary = write_plan(report, plan)
    assert (summary.deletes, summary.clusters, summary.left_alone) == (len(d.duplicate_ids), len(d.burst_sizes), ())
    assert summary.cash_delta == {(): d.true_cash - d.recorded_cash}
    assert dump(copy) == original  # writing a plan changes nothing

    applied = apply_plan(copy, plan)
    assert (applied.deleted, applied.updated, applied.inserted) == (len(d.duplicate_ids), 1, 0)
    check_corrected(copy, d, original)

    undone = apply_plan(copy, rollback_path(plan))
    assert (undone.deleted, undone.updated, undone.inserted) == (0, 1, len(d.duplicate_ids))
    check_restored(copy, original)
    assert dump(path) == original  # the original file was never the target


def test_rollback_restores_a_real_cash_column_exactly(tmp_path: Path) -> None:
    path = str(tmp_path / "trading.db")
    make_disaster(path, seed=2026)
    before = dump(path)
    plan = str(tmp_path / "fix.sql")
    write_plan(audit(path, **BOOKS), plan)
    apply_plan(path, plan)
    apply_plan(path, rollback_path(plan))
    assert dump(path)["account"] == before["account"]


def test_plan_and_apply_through_the_cli(disaster_db: tuple[str, Disaster], tmp_path: Path) -> None:
    path, d = disaster_db
    original = dump(path)
    copy = str(tmp_path / "copy.db")
    shutil.copy(path, copy)
    plan = str(tmp_path / "fix.sql")
    runner = CliRunner()

    written = runner.invoke(app, ["audit", copy, "--positions", "positions", "--cash", "account", "--plan", plan, "--json"])
    assert written.exit_code == 1, written.output  # 1: duplicates found
    doc = json.loads(written.stdout)
    assert doc["totals"]["duplicate_orders"] == len(d.duplicate_ids)
    assert doc["plan"]["deletes"] == len(d.duplicate_ids) and doc["plan"]["rollback"] == rollback_path(plan)
    assert Decimal(doc["cash"][0]["corrected"]) == d.true_cash
    assert dump(copy) == original

    applied = runner.invoke(app, ["audit", copy, "--apply", plan])
    assert applied.exit_code == 0, applied.output
    assert f"{len(d.duplicate_ids):,} rows deleted" in applied.stdout
    check_corrected(copy, d, original)
    clean = runner.invoke(app, ["audit", copy, "--positions", "positions", "--cash", "account"])
    assert clean.exit_code == 0, clean.output  # 0: no duplicate bursts left

    again = runner.invoke(app, ["audit", copy, "--apply", plan])
    assert again.exit_code != 0 and dump(copy)["trades"] == [r for r in original["trades"] if r[0] in d.legit_ids]

    undone = runner.invoke(app, ["audit", copy, "--apply", rollback_path(plan)])
    assert undone.exit_code == 0, undone.output
    check_restored(copy, original)


# ------------------------------------------------------------------------------ 4: PostgreSQL


@pytest.fixture
def pg_tables(pg_url: str) -> Iterator[dict[str, str]]:
    """Unique table names in the test database; every table whose name ends with the suffix
    (the three, and the plan's backups of them) is dropped afterwards."""
    import psycopg

    suffix = uuid.uuid4().hex[:10]
    names = {t: f"og_audit_{t}_{suffix}" for t in TABLES}
    yield names
    with psycopg.connect(pg_url, autocommit=True) as conn:
        left = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' AND table_name LIKE %s",
            (f"%{suffix}",),
        ).fetchall()
        for (name,) in left:
            conn.execute(f'DROP TABLE IF EXISTS "{name}"')


def copy_to_postgres(sqlite_path: str, pg_url: str, names: dict[str, str]) -> None:
    import psycopg

    trades, positions, account = names["trades"], names["positions"], names["account"]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            f'CREATE TABLE {trades} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "timestamp" timestamptz NOT NULL, '
            "symbol text NOT NULL, side text NOT NULL, quantity numeric NOT NULL, price numeric NOT NULL, strategy text)"
        )
        conn.execute(f"CREATE TABLE {positions} (symbol text PRIMARY KEY, quantity numeric NOT NULL, avg_cost numeric)")
        conn.execute(f"CREATE TABLE {account} (id integer PRIMARY KEY, cash numeric NOT NULL)")
        with conn.cursor() as cur:
            with cur.copy(f'COPY {trades} (id, "timestamp", symbol, side, quantity, price, strategy) FROM STDIN') as copy:
                for id_, ts, symbol, side, qty, price, strategy in read(sqlite_path, "SELECT * FROM trades ORDER BY id"):
                    copy.write_row((id_, ts + "+00", symbol, side, dec(qty), dec(price), strategy))
            for symbol, qty, cost in read(sqlite_path, "SELECT * FROM positions"):
                cur.execute(f"INSERT INTO {positions} VALUES (%s, %s, %s)", (symbol, dec(qty), dec(cost)))
            for id_, cash in read(sqlite_path, "SELECT * FROM account"):
                cur.execute(f"INSERT INTO {account} VALUES (%s, %s)", (id_, dec(cash)))


def pg_dump(pg_url: str, names: dict[str, str]) -> dict[str, list[tuple[Any, ...]]]:
    import psycopg

    with psycopg.connect(pg_url) as conn:
        return {t: conn.execute(f"SELECT * FROM {names[t]} ORDER BY {key}").fetchall() for t, key in TABLES.items()}


def test_postgres_end_to_end(disaster_db: tuple[str, Disaster], pg_url: str, pg_tables: dict[str, str], tmp_path: Path) -> None:
    import psycopg

    path, d = disaster_db
    copy_to_postgres(path, pg_url, pg_tables)
    original = pg_dump(pg_url, pg_tables)
    options = {"table": pg_tables["trades"], "positions": pg_tables["positions"], "cash": pg_tables["account"]}

    report = audit(pg_url, **options)
    assert report.rows == len(d.legit_ids) + len(d.duplicate_ids)
    assert signature(report) == signature(audit(path, **BOOKS))
    assert {int(i) for c in report.duplicates for i in c.repeat_ids} == d.duplicate_ids
    assert {s for s, st in statuses(report).items() if st is BookStatus.PHANTOM} == set(d.burst_sizes)
    assert report.cash is not None and report.cash[0].corrected == d.true_cash

    plan = str(tmp_path / "fix.sql")
    summary = write_plan(report, plan)
    assert summary.deletes == len(d.duplicate_ids)
    assert pg_dump(pg_url, pg_tables) == original

    applied = apply_plan(pg_url, plan)
    assert (applied.deleted, applied.updated) == (len(d.duplicate_ids), 1)
    after = pg_dump(pg_url, pg_tables)
    assert {r[0] for r in after["trades"]} == d.legit_ids
    assert after["trades"] == [r for r in original["trades"] if r[0] in d.legit_ids]
    assert after["positions"] == original["positions"]
    assert after["account"] == [(1, d.true_cash)]  # numeric: exact
    again = audit(pg_url, **options)
    assert again.duplicates == [] and set(statuses(again).values()) == {BookStatus.OK}

    undone = apply_plan(pg_url, rollback_path(plan))
    assert undone.inserted == len(d.duplicate_ids)
    assert pg_dump(pg_url, pg_tables) == original
    with psycopg.connect(pg_url) as conn:
        found = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_name LIKE 'og_backup_%%' AND table_name LIKE %s",
            (f"%{pg_tables['trades'].rsplit('_', 1)[1]}",),
        ).fetchall()
    assert len(found) == 2, found


# ------------------------------------------------------------------------------ 4: CSV and Parquet


def export(path: str, folder: Path, kind: str) -> tuple[str, str, str]:
    """The trades as a CSV or Parquet file, positions and cash as CSV files (sqlite3's view of the values)."""
    files = {}
    for table, key in TABLES.items():
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            cursor = conn.execute(f"SELECT * FROM {table} ORDER BY {key}")
            header = [c[0] for c in cursor.description]
            rows = cursor.fetchall()
        finally:
            conn.close()
        target = folder / f"{table}.csv"
        with target.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
        files[table] = str(target)
    if kind == "parquet":
        import duckdb

        target = folder / "trades.parquet"
        con = duckdb.connect()
        try:
            con.execute(
                "COPY (SELECT CAST(id AS BIGINT) AS id, CAST(\"timestamp\" AS TIMESTAMP) AS \"timestamp\", symbol, side, "
                "CAST(quantity AS DOUBLE) AS quantity, CAST(price AS DOUBLE) AS price, strategy "
                f"FROM read_csv('{files['trades']}', header = true, all_varchar = true)) TO '{target}' (FORMAT parquet)"
            )
        finally:
            con.close()
        files["trades"] = str(target)
    return files["trades"], files["positions"], files["account"]


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_file_exports_give_the_same_audit(disaster_db: tuple[str, Disaster], tmp_path: Path, kind: str) -> None:
    path, d = disaster_db
    from_db = audit(path, **BOOKS)
    trades, positions, account = export(path, tmp_path, kind)
    report = audit(trades, positions=positions, cash=account)
    assert report.source.kind.value == kind
    assert report.rows == from_db.rows == len(d.legit_ids) + len(d.duplicate_ids)
    assert signature(report) == signature(from_db)
    assert {int(i) for c in report.duplicates for i in c.repeat_ids} == d.duplicate_ids
    assert statuses(report) == statuses(from_db)
    assert report.cash is not None and report.cash[0].corrected == d.true_cash
    plan = tmp_path / "fix.sql"
    with pytest.raises(AuditPlanError, match="file"):
        write_plan(report, str(plan))
    assert not plan.exists() and not Path(rollback_path(str(plan))).exists()


# ------------------------------------------------------------------------------ 5: read-only, one snapshot


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_audit_and_plan_never_write_the_source(disaster_db: tuple[str, Disaster], tmp_path: Path, journal: str) -> None:
    path, _ = disaster_db
    db, wal = Path(path), Path(path + "-wal")
    holder = None
    if journal == "wal":
        to_wal(path)
        # a writer that keeps its last commit in the -wal (no checkpoint): both files hold the data
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("PRAGMA wal_autocheckpoint=0")
        holder.execute("UPDATE account SET cash = cash - 0.01")
        assert wal.stat().st_size > 0
    try:
        before = (sha256(db), sha256(wal))
        report = audit(path, **BOOKS)
        write_plan(report, str(tmp_path / "fix.sql"))
        assert report.duplicates
        assert (sha256(db), sha256(wal)) == before
        assert not Path(path + "-journal").exists()
    finally:
        if holder is not None:
            holder.close()


WRITER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=10)
with conn:  # one transaction
    for sql in sys.argv[2:]:
        conn.execute(sql)
conn.close()
"""


class WriteDuringRead:
    """Progress hooks that run ``action`` once, between two batches of the trades being read."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action = action
        self.fired_at: int | None = None
        self.reading = False

    def phase(self, name: str, total: int | None = None) -> None:
        self.reading = name.startswith("reading")

    def advance(self, done: int) -> None:
        if self.reading and self.fired_at is None:
            self.fired_at = done
            self.action()


def write_in_another_process(path: str, *statements: str) -> Callable[[], None]:
    def run() -> None:
        done = subprocess.run([sys.executable, "-c", WRITER, path, *statements], check=False, timeout=60, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    return run


def after_the_history(path: str, seconds: float = 0) -> str:
    """A time a day after the last trade (far from any cluster), in the table's format."""
    ((last,),) = read(path, "SELECT max(timestamp) FROM trades")
    return (datetime.fromisoformat(last) + timedelta(days=1, seconds=seconds)).strftime("%Y-%m-%d %H:%M:%S.%f")


@pytest.fixture
def wal_db(disaster_db: tuple[str, Disaster], monkeypatch: pytest.MonkeyPatch) -> tuple[str, Disaster]:
    """The disaster in WAL mode (a writer commits while a reader reads), streamed in small batches."""
    path, d = disaster_db
    to_wal(path)
    monkeypatch.setattr(audit_source, "FETCH_ROWS", 100)
    return path, d


def test_audit_reads_the_trades_from_one_snapshot_while_another_process_writes(wal_db: tuple[str, Disaster]) -> None:
    path, d = wal_db
    rows = len(d.legit_ids) + len(d.duplicate_ids)
    burst = [
        "INSERT INTO trades (timestamp, symbol, side, quantity, price, strategy) "
        f"VALUES ('{after_the_history(path, seconds=i)}', 'ZZZ', 'BUY', 100, 10.5, 'momentum')"
        for i in range(5)
    ]
    hooks = WriteDuringRead(write_in_another_process(path, *burst))
    report = audit(path, progress=hooks, **BOOKS)
    assert hooks.fired_at is not None and hooks.fired_at < rows  # the write landed mid-read
    assert report.rows == rows
    assert "ZZZ" not in {c.symbol for c in report.clusters}
    assert {int(i) for c in report.duplicates for i in c.repeat_ids} == d.duplicate_ids
    later = audit(path, **BOOKS)  # the write was committed: the next audit sees it
    assert later.rows == rows + 5
    (zzz,) = [c for c in later.duplicates if c.symbol == "ZZZ"]
    assert zzz.repeats == 4


def test_audit_reconciles_trades_positions_and_cash_from_one_snapshot(wal_db: tuple[str, Disaster]) -> None:
    path, d = wal_db
    rows = len(d.legit_ids) + len(d.duplicate_ids)
    # the bot's own bookkeeping for one more (legit) JD buy: trade, position and cash in one transaction
    hooks = WriteDuringRead(write_in_another_process(
        path,
        "INSERT INTO trades (timestamp, symbol, side, quantity, price, strategy) "
        f"VALUES ('{after_the_history(path)}', 'JD', 'BUY', 10, 30, 'momentum')",
        "UPDATE positions SET quantity = quantity + 10 WHERE symbol = 'JD'",
        "UPDATE account SET cash = cash - 300",
    ))
    report = audit(path, progress=hooks, **BOOKS)
    assert hooks.fired_at is not None
    assert report.cash is not None
    seen = (report.rows, statuses(report)["JD"], report.cash[0].corrected)
    assert seen in [
        (rows, BookStatus.PHANTOM, d.true_cash),  # before the write
        (rows + 1, BookStatus.PHANTOM, d.true_cash - 300),  # after it
    ], seen
