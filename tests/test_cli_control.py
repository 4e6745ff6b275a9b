"""`orderguard halt` / `resume` / `runners`, halts in `status`, and `migrate` from schema 1.

Run for real through typer's CliRunner against SQLite ledgers built with Guard + PaperBroker;
a halt set by the CLI must stop the next claim of a guard that was already open.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orderguard import BlockReason, Ever, Guard, OncePer, Outcome, SchemaMismatch, Side
from orderguard.brokers import PaperBroker

from .helpers import make_intent
from .test_cli import EXIT_NOT_CLEAN, EXIT_STORE, EXIT_USAGE, Unchanged, assert_one_line_error, cli, cli_json

POLICY = OncePer(Ever(), by=("strategy", "symbol"))


@pytest.fixture(autouse=True)
def _no_store_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORDERGUARD_STORE", raising=False)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    code, _, err = cli("migrate", "--store", path)
    assert code == 0, err
    return path


def test_halt_stops_an_open_guard_at_its_next_claim_and_resume_restores_it(store: Path, tmp_path: Path) -> None:
    broker = PaperBroker.open(f"sqlite:///{tmp_path / 'paper.db'}")
    with Guard.open(f"sqlite:///{store}", runner="bot") as guard:
        assert guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY).outcome is Outcome.SENT

        code, out, err = cli("halt", "strategy=spx-calendar", "--reason", "sizing bug", "--by", "alice", "--store", store)
        assert code == 0, err
        assert "strategy=spx-calendar is HALTED" in out and "alice" in out

        blocked = guard.submit(make_intent(symbol="MSFT"), broker, policy=POLICY)
        assert blocked.outcome is Outcome.BLOCKED and blocked.reason is BlockReason.HALTED
        assert "sizing bug" in blocked.message and "alice" in blocked.message and "orderguard resume" in blocked.message
        other = guard.submit(make_intent(strategy="other", symbol="MSFT"), broker, policy=POLICY)
        assert other.outcome is Outcome.SENT  # another strategy keeps trading

        status = cli_json("status", "--store", store)
        (halt,) = status["halts"]
        assert (halt["scope"], halt["state"], halt["cause"], halt["actor"], halt["reason"]) == (
            "strategy=spx-calendar", "HALTED", "OPERATOR", "alice", "sizing bug",
        )
        code, out, _ = cli("status", "--store", store)
        assert code == 0 and "trading halts" in out and "sizing bug" in out

        code, out, err = cli("resume", "strategy=spx-calendar", "--reason", "fixed in v2", "--by", "alice", "--store", store)
        assert code == 0, err
        assert "ACTIVE again" in out and "sizing bug" in out
        assert guard.submit(make_intent(symbol="MSFT"), broker, policy=POLICY).outcome is Outcome.SENT

    history = cli_json("status", "--store", store)["halt_history"]
    assert [(e["state"], e["reason"]) for e in history] == [("ACTIVE", "fixed in v2"), ("HALTED", "sizing bug")]
    assert cli_json("status", "--store", store)["halts"] == []
    assert len(broker.orders()) == 3
    broker.close()


def test_reducing_from_the_cli_lets_only_position_shrinking_orders_through(store: Path, tmp_path: Path) -> None:
    broker = PaperBroker.open(f"sqlite:///{tmp_path / 'paper.db'}")
    with Guard.open(f"sqlite:///{store}") as guard:
        tagged = OncePer(Ever(), by=("strategy", "symbol", "side", "quantity"))
        assert guard.submit(make_intent(symbol="SPX", quantity=10), broker, policy=tagged).outcome is Outcome.SENT
        code, out, err = cli("halt", "account=main,symbol=SPX", "--reducing", "--reason", "cut risk", "--store", store)
        assert code == 0 and "REDUCING" in out, err
        grow = guard.submit(make_intent(symbol="SPX", quantity=1), broker, policy=tagged)
        assert grow.reason is BlockReason.HALTED and "REDUCING" in grow.message
        too_much = guard.submit(make_intent(symbol="SPX", side=Side.SELL, quantity=11), broker, policy=tagged)
        assert too_much.reason is BlockReason.HALTED
        shrink = guard.submit(make_intent(symbol="SPX", side=Side.SELL, quantity=4), broker, policy=tagged)
        assert shrink.outcome is Outcome.SENT
        elsewhere = guard.submit(make_intent(symbol="NDX", quantity=1), broker, policy=tagged)
        assert elsewhere.outcome is Outcome.SENT
    assert len(broker.orders()) == 3
    broker.close()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["halt", "bogus=1", "--reason", "x"], "not an intent field"),
        (["halt", "strategy=", "--reason", "x"], "not field=value"),
        (["halt", "strategy=a,strategy=b", "--reason", "x"], "twice"),
        (["halt", "strategy=a", "--reason", "  "], "--reason must say why"),
    ],
)
def test_bad_halt_arguments_are_usage_errors_and_change_nothing(store: Path, args: list[str], needle: str) -> None:
    with Unchanged(store):
        code, out, err = cli(*args, "--store", store)
    assert code == EXIT_USAGE and out == ""
    assert_one_line_error(err, needle)


def test_resume_of_a_scope_that_is_not_halted_says_so(store: Path) -> None:
    cli("halt", "global", "--reason", "market halt", "--store", store)
    code, out, err = cli("resume", "strategy=x", "--reason", "oops", "--store", store)
    assert code == EXIT_NOT_CLEAN and out == ""
    assert_one_line_error(err, "strategy=x is not halted", "global")
    assert [h["scope"] for h in cli_json("status", "--store", store)["halts"]] == ["global"]


def test_halt_on_a_missing_ledger_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    code, _, err = cli("halt", "global", "--reason", "x", "--store", missing)
    assert code == EXIT_STORE and not missing.exists()
    assert_one_line_error(err, "no orderguard ledger")


_CHILD = """
import sys, time
from orderguard import Guard
guard = Guard.open(sys.argv[1], runner=sys.argv[2], strategy="spx", code=[sys.argv[3]], heartbeat_every=0.2)
print("ready", flush=True)
time.sleep(120)
"""


def test_runners_lists_flags_stale_and_mixed_versions_and_exits_1(store: Path, tmp_path: Path) -> None:
    old, new = tmp_path / "strategy_v1.py", tmp_path / "strategy_v2.py"
    old.write_text("SIZE = 4\n")
    new.write_text("SIZE = 40\n")
    url = f"sqlite:///{store}"
    children = [
        subprocess.Popen([sys.executable, "-c", _CHILD, url, name, str(code)], stdout=subprocess.PIPE, text=True)
        for name, code in (("old-runner", old), ("new-runner", new))
    ]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        view = cli_json_any("runners", "--store", store)
        assert {r["runner"] for r in view["runners"]} == {"old-runner", "new-runner"}
        assert [f["kind"] for f in view["flags"]].count("MIXED_VERSIONS") == 1
        (mixed,) = [f for f in view["flags"] if f["kind"] == "MIXED_VERSIONS"]
        assert f"pid {children[0].pid}" in mixed["message"]
        code, out, _ = cli("runners", "--store", store)
        assert code == EXIT_NOT_CLEAN and "MIXED_VERSIONS" in out

        os.kill(children[0].pid, signal.SIGKILL)  # the old runner dies without stopping
        children[0].wait(timeout=10)
        # It goes STALE; the surviving runner of the strategy, on the same host, then finds its
        # process gone and marks it stopped. Either way it is no longer live, and one live
        # runner is not "mixed".
        deadline = time.monotonic() + 10
        old: dict = {}  # type: ignore[type-arg]
        while time.monotonic() < deadline:
            view = cli_json_any("runners", "--store", store, "--stopped", "1h")
            old = next(r for r in view["runners"] if r["runner"] == "old-runner")
            if old["stale"] or old["stopped_at"] is not None:
                break
            time.sleep(0.05)
        assert old["live"] is False and (old["stale"] or old["stopped_at"] is not None), old
        assert "MIXED_VERSIONS" not in [f["kind"] for f in view["flags"]]
        deadline = time.monotonic() + 10
        while old["stopped_at"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
            view = cli_json_any("runners", "--store", store)
            old = next(r for r in view["runners"] if r["runner"] == "old-runner")
        assert old["stopped_at"] is not None  # marked stopped by its peer: not STALE for a week
        assert [f["kind"] for f in view["flags"]] == []
    finally:
        for child in children:
            child.kill()
            child.wait(timeout=10)


def cli_json_any(*args: str | Path) -> dict:  # type: ignore[type-arg]
    """--json output of a command whose exit status says whether something is flagged."""
    import json

    code, out, err = cli(*args, "--json")
    assert code in (0, EXIT_NOT_CLEAN), err
    return json.loads(out)  # type: ignore[no-any-return]


def test_runners_on_a_clean_ledger_exits_0(store: Path) -> None:
    with Guard.open(f"sqlite:///{store}", runner="solo", heartbeat_every=0.2):
        code, out, err = cli("runners", "--store", store)
        assert code == 0, err
        assert "solo" in out and "live" in out
    view = cli_json("runners", "--store", store)
    (runner,) = view["runners"]
    assert runner["stopped_at"] is not None and runner["live"] is False and runner["flags"] == []


def _make_v1(path: Path) -> None:
    """A ledger as orderguard 0.1 with schema 1 left it (the tables schema 2 added are absent)."""
    with sqlite3.connect(path) as conn:
        for table in ("halts", "halt_events", "limit_events", "runners", "leases"):
            conn.execute(f"DROP TABLE {table}")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.close()


def test_a_schema_1_ledger_is_refused_untouched_until_migrate_upgrades_it(store: Path) -> None:
    _make_v1(store)
    with Unchanged(store):
        code, out, err = cli("status", "--store", store)
    assert code == EXIT_STORE and out == ""
    assert_one_line_error(err, "schema version 1", "orderguard migrate")
    with pytest.raises(SchemaMismatch):
        from orderguard.store import SQLiteStore

        SQLiteStore(str(store), create=False)

    code, out, err = cli("migrate", "--store", store)
    assert code == 0, err
    assert "upgraded ledger" in out and "from schema version 1 to 2" in out
    assert cli_json("migrate", "--store", store)["upgraded_from"] is None  # already done: nothing changes
    assert cli_json("status", "--store", store)["halts"] == []


def test_a_live_old_runner_blocks_the_upgrade_until_stopped_or_forced(store: Path, tmp_path: Path) -> None:
    broker = PaperBroker.open(f"sqlite:///{tmp_path / 'paper.db'}")
    with Guard.open(f"sqlite:///{store}") as guard:
        first = guard.submit(make_intent(), broker, policy=POLICY)
    _make_v1(store)
    # Opening a guard never upgrades by itself: a runner of the old schema could still be claiming.
    with pytest.raises(SchemaMismatch, match="orderguard migrate"):
        Guard.open(f"sqlite:///{store}")
    # This process claimed through the ledger and still runs: migrate refuses and names it.
    with Unchanged(store):
        code, out, err = cli("migrate", "--store", store)
    assert code == EXIT_STORE and out == ""
    assert_one_line_error(err, f"pid {os.getpid()}", "ignores halts", "--force")
    code, out, err = cli("migrate", "--force", "--store", store)
    assert code == 0 and "upgraded ledger" in out, err
    with Guard.open(f"sqlite:///{store}") as guard:
        again = guard.submit(make_intent(), broker, policy=POLICY)
        assert again.reason is BlockReason.DUPLICATE and again.holder is not None
        assert first.intent is not None and again.holder.id == first.intent.id  # history kept
    broker.close()


def test_a_runner_whose_ledger_is_migrated_under_it_stops_claiming(store: Path, tmp_path: Path) -> None:
    broker = PaperBroker.open(f"sqlite:///{tmp_path / 'paper.db'}")
    with Guard.open(f"sqlite:///{store}", heartbeat_every=0.05) as guard:
        assert guard.submit(make_intent(symbol="A"), broker, policy=POLICY).outcome is Outcome.SENT
        with sqlite3.connect(store) as conn:  # a newer orderguard migrated the ledger to schema 3
            conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
        conn.close()
        deadline = time.monotonic() + 10
        while guard._schema_moved is None and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(SchemaMismatch, match="migrated to schema version 3"):
            guard.submit(make_intent(symbol="B"), broker, policy=POLICY)
    assert [o.symbol for o in broker.orders()] == ["A"]
    broker.close()


def test_reconcile_halts_a_drifting_symbol_unless_told_not_to(store: Path, tmp_path: Path) -> None:
    from decimal import Decimal

    from orderguard.brokers import OrderRequest

    paper = tmp_path / "paper.db"
    broker = PaperBroker.open(f"sqlite:///{paper}")
    with Guard.open(f"sqlite:///{store}") as guard:
        guard.submit(make_intent(symbol="SPX"), broker, policy=POLICY)
    broker.submit(OrderRequest("by-hand", "main", "SPX", "BUY", Decimal(3), "MARKET", None, None, "DAY"))
    broker.close()

    code, out, _ = cli("reconcile", "--broker", f"paper://{paper}", "--no-halt", "--json", "--store", store)
    import json

    report = json.loads(out)
    assert code == EXIT_NOT_CLEAN and report["drift"] and report["halts"] == []
    assert cli_json("status", "--store", store)["halts"] == []

    code, out, _ = cli("reconcile", "--broker", f"paper://{paper}", "--alert", "log://", "--store", store)
    assert code == EXIT_NOT_CLEAN
    assert "HALTED account=main,symbol=SPX (cause DRIFT)" in out
    (halt,) = cli_json("status", "--store", store)["halts"]
    assert (halt["scope"], halt["cause"]) == ("account=main,symbol=SPX", "DRIFT")
    assert "orderguard-reconcile" in halt["actor"] and "venue" not in halt["actor"]


def test_halt_notes_a_scope_no_intent_falls_in_and_resume_notes_broader_halts(store: Path, tmp_path: Path) -> None:
    broker = PaperBroker.open(f"sqlite:///{tmp_path / 'paper.db'}")
    with Guard.open(f"sqlite:///{store}") as guard:
        guard.submit(make_intent(symbol="SPX"), broker, policy=POLICY)
    broker.close()
    code, out, _ = cli("halt", "symbol=spx", "--reason", "typo", "--store", store)
    assert code == 0 and "none of the ledger's last 5000 intents falls in symbol=spx" in out
    code, out, _ = cli("halt", "symbol=SPX,side=buy", "--reason", "no longs", "--store", store)
    assert code == 0 and "side=BUY,symbol=SPX is HALTED" in out and "note:" not in out
    cli("halt", "global", "--reason", "market closed early", "--store", store)
    code, out, _ = cli("resume", "side=BUY,symbol=SPX", "--reason", "longs ok", "--store", store)
    assert code == 0 and "ACTIVE again (was HALTED" in out and "no longs" in out
    assert "still covered by global, HALTED" in out and "market closed early" in out
    code, out, err = cli("halt", "side=long", "--reason", "x", "--store", store)
    assert code == EXIT_USAGE
    assert_one_line_error(err, "can never match", "BUY, SELL")
