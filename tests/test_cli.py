"""The operator CLI, run for real against real ledgers and paper venues.

Each ledger is built with Guard + PaperBroker on SQLite files under tmp_path: one FILLED intent,
one blocked DUPLICATE attempt behind it, one UNKNOWN intent (the venue accepted the order and
lost the ack) and one UNKNOWN_PENDING attempt behind that. Commands run through
typer's CliRunner on ``orderguard.cli.app``, and a few through the installed console script in a
subprocess. Every failure must be one stderr line, a documented exit status, and no change on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orderguard import Ever, Guard, IntentRecord, OncePer, Side, State, __version__
from orderguard.brokers import OrderRequest, PaperBroker, PaperFaults
from orderguard.brokers.spec import BrokerSpecError, known_specs, open_broker
from orderguard.cli import app

from .helpers import make_intent

POLICY = OncePer(Ever(), by=("strategy", "symbol"))
EXIT_NOT_CLEAN, EXIT_USAGE, EXIT_STORE = 1, 2, 3


@dataclass
class Ledger:
    path: Path
    paper: Path
    filled: IntentRecord
    unknown: IntentRecord
    duplicate_attempt: int  # blocked by `filled`
    pending_attempt: int  # blocked by `unknown`

    @property
    def broker_spec(self) -> str:
        return f"paper://{self.paper}"

    def state_of(self, ref: str) -> State:
        with Guard.open(f"sqlite:///{self.path}") as guard:
            return guard.intent(ref).state


def build_ledger(folder: Path) -> Ledger:
    """One FILLED, one DUPLICATE block, one UNKNOWN (ack lost after acceptance), one UNKNOWN_PENDING block."""
    path, paper = folder / "ledger.db", folder / "paper.db"
    guard = Guard.open(f"sqlite:///{path}", synchronous="NORMAL")
    broker = PaperBroker.open(f"sqlite:///{paper}")
    lossy = PaperBroker.open(f"sqlite:///{paper}", faults=PaperFaults(lose_ack=1))
    try:
        filled = guard.submit(make_intent(strategy="alpha", symbol="AAPL", quantity=10), broker, policy=POLICY)
        duplicate = guard.submit(
            make_intent(strategy="alpha", symbol="AAPL", quantity=10, source="manual"), broker, policy=POLICY
        )
        sell = make_intent(strategy="beta", symbol="MSFT", side=Side.SELL, quantity="2.5")
        unknown = guard.submit(sell, lossy, policy=POLICY)
        pending = guard.submit(sell, broker, policy=POLICY)
    finally:
        guard.close()
        broker.close()
        lossy.close()
    assert filled.state is State.FILLED and unknown.state is State.UNKNOWN
    assert duplicate.reason is not None and duplicate.reason.value == "DUPLICATE"
    assert pending.reason is not None and pending.reason.value == "UNKNOWN_PENDING"
    assert filled.intent is not None and unknown.intent is not None
    return Ledger(path, paper, filled.intent, unknown.intent, duplicate.attempt_id, pending.attempt_id)


@pytest.fixture(autouse=True)
def _no_store_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORDERGUARD_STORE", raising=False)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return build_ledger(tmp_path)


def cli(*args: str | Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def cli_json(*args: str | Path) -> dict:  # type: ignore[type-arg]
    code, out, err = cli(*args, "--json")
    assert code == 0, err
    return json.loads(out)


def assert_one_line_error(err: str, *needles: str) -> None:
    assert err.startswith("orderguard: error: "), err
    assert err.strip().count("\n") == 0, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def snapshot(path: Path) -> tuple[bytes, int] | None:
    return (path.read_bytes(), path.stat().st_mtime_ns) if path.exists() else None


@dataclass
class Unchanged:
    """Asserts a file's bytes and mtime are the same after the block (or that it stays missing)."""

    path: Path

    def __enter__(self) -> Unchanged:
        self.before = snapshot(self.path)
        self.siblings = sorted(p.name for p in self.path.parent.iterdir())
        return self

    def __exit__(self, *exc: object) -> None:
        assert snapshot(self.path) == self.before, f"{self.path} changed"
        if self.before is None:
            assert not any(p.name.startswith(self.path.name) for p in self.path.parent.iterdir()), "created"


def iso(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text)


# ------------------------------------------------------------------------------ listings


def test_status_groups_in_flight_unknown_and_blocked_per_strategy(ledger: Ledger) -> None:
    code, out, err = cli("status", "--store", ledger.path)
    assert code == 0, err
    assert str(ledger.path) in out
    assert "alpha" in out and "beta" in out
    assert ledger.unknown.client_order_id in out and ledger.unknown.id in out
    assert "UNKNOWN_PENDING" in out and "DUPLICATE" in out
    assert "orderguard reconcile" in out  # the next step for an UNKNOWN intent

    doc = cli_json("status", "--store", ledger.path)
    assert doc["ledger"] == str(ledger.path)
    assert doc["totals"] == {"in_flight": 0, "unknown": 1, "blocked": 2}
    groups = {g["strategy"]: g for g in doc["strategies"]}
    assert groups["alpha"]["unknown"] == [] and groups["alpha"]["blocked_by_reason"] == {"DUPLICATE": 1}
    [unknown] = groups["beta"]["unknown"]
    assert unknown["client_order_id"] == ledger.unknown.client_order_id
    assert unknown["state"] == "UNKNOWN" and unknown["quantity"] == "2.5"
    assert iso(unknown["created_at"]).timestamp() == pytest.approx(ledger.unknown.created_at, abs=1e-3)
    [blocked] = groups["beta"]["blocked"]
    assert blocked["id"] == ledger.pending_attempt and blocked["holder_id"] == ledger.unknown.id
    assert blocked["reason"] == "UNKNOWN_PENDING" and blocked["quantity"] == "2.5"
    iso(blocked["at"])


def test_status_since_limits_blocked_attempts_only(ledger: Ledger) -> None:
    doc = cli_json("status", "--store", ledger.path, "--since", "2099-01-01T00:00:00Z")
    assert doc["totals"] == {"in_flight": 0, "unknown": 1, "blocked": 0}
    assert doc["blocked_since"].startswith("2099-01-01T00:00:00")
    assert cli_json("status", "--store", ledger.path, "--since", "1d")["totals"]["blocked"] == 2


def test_status_of_an_empty_ledger(tmp_path: Path) -> None:
    store = tmp_path / "empty.db"
    assert cli("migrate", "--store", store)[0] == 0
    code, out, _ = cli("status", "--store", store)
    assert code == 0 and "Nothing in flight" in out


def test_intents_filters_by_state_strategy_since_and_limit(ledger: Ledger) -> None:
    code, out, _ = cli("intents", "--store", ledger.path)
    assert code == 0
    for rec in (ledger.filled, ledger.unknown):
        assert rec.id in out and rec.client_order_id in out
    assert "FILLED" in out and "UNKNOWN" in out and "10 @ 100" in out

    def ids(*args: str) -> list[str]:
        return [r["id"] for r in cli_json("intents", "--store", str(ledger.path), *args)["intents"]]

    assert ids() == [ledger.unknown.id, ledger.filled.id]  # newest first
    assert ids("--state", "unknown") == [ledger.unknown.id]
    assert ids("--state", "FILLED", "--state", "UNKNOWN") == [ledger.unknown.id, ledger.filled.id]
    assert ids("--state", "ACKED") == []
    assert ids("--strategy", "alpha") == [ledger.filled.id]
    assert ids("--limit", "1") == [ledger.unknown.id]
    assert ids("--since", "15m") == [ledger.unknown.id, ledger.filled.id]
    assert ids("--since", "2099-01-01T00:00:00") == []

    [filled] = cli_json("intents", "--store", ledger.path, "--strategy", "alpha")["intents"]
    assert filled["state"] == "FILLED" and filled["filled_quantity"] == "10" and filled["average_price"] == "100"
    assert filled["limit_price"] is None and filled["scope_keys"] == list(ledger.filled.scope_keys)
    iso(filled["updated_at"])


def test_show_gives_the_record_its_claim_and_every_collision(ledger: Ledger) -> None:
    code, out, err = cli("show", ledger.filled.client_order_id, "--store", ledger.path)
    assert code == 0, err
    assert ledger.filled.id in out and "FILLED" in out
    assert f"#{ledger.duplicate_attempt} BLOCKED DUPLICATE" in out  # the collision's own log line
    assert "manual" in out  # who collided

    doc = cli_json("show", ledger.unknown.id, "--store", ledger.path)
    assert doc["intent"]["id"] == ledger.unknown.id and doc["intent"]["state"] == "UNKNOWN"
    assert "ack was lost" in doc["intent"]["note"]
    claimed = doc["claimed_attempt"]
    assert claimed["outcome"] == "CLAIMED" and claimed["intent_id"] == ledger.unknown.id
    assert claimed["id"] == ledger.unknown.attempt_id
    [collision] = doc["collisions"]
    assert collision["id"] == ledger.pending_attempt
    assert collision["reason"] == "UNKNOWN_PENDING" and collision["holder_id"] == ledger.unknown.id


def test_show_of_an_unknown_ref_is_one_line_and_exit_1(ledger: Ledger) -> None:
    code, out, err = cli("show", "og-nope-1", "--store", ledger.path)
    assert code == EXIT_NOT_CLEAN and out == ""
    assert_one_line_error(err, "og-nope-1")


def test_attempts_filters(ledger: Ledger) -> None:
    code, out, _ = cli("attempts", "--store", ledger.path)
    assert code == 0 and "BLOCKED DUPLICATE" in out and "BLOCKED UNKNOWN_PENDING" in out and "CLAIMED" in out

    def rows(*args: str) -> list[dict]:  # type: ignore[type-arg]
        return cli_json("attempts", "--store", str(ledger.path), *args)["attempts"]

    assert [a["outcome"] for a in rows()] == ["BLOCKED", "CLAIMED", "BLOCKED", "CLAIMED"]
    assert [a["id"] for a in rows("--blocked")] == [ledger.pending_attempt, ledger.duplicate_attempt]
    assert [a["intent_id"] for a in rows("--claimed")] == [ledger.unknown.id, ledger.filled.id]
    [dup] = rows("--reason", "duplicate")
    assert dup["id"] == ledger.duplicate_attempt and dup["holder_id"] == ledger.filled.id
    assert dup["source"] == "manual" and "BLOCKED DUPLICATE" in dup["message"]
    assert len(rows("--limit", "1")) == 1 and rows("--since", "2099-01-01") == []

    code, _, err = cli("attempts", "--store", ledger.path, "--claimed", "--reason", "DUPLICATE")
    assert code == EXIT_USAGE and "block reason" in err


def test_bad_option_values_are_usage_errors(ledger: Ledger) -> None:
    for args in (("intents", "--since", "yesterday"), ("intents", "--state", "LOST"), ("attempts", "--reason", "BAD")):
        code, out, _ = cli(*args, "--store", ledger.path)
        assert code == EXIT_USAGE and out == "", args


# ----------------------------------------------------------------------------- reconcile


def test_reconcile_resolves_the_unknown_to_filled_and_exits_0(ledger: Ledger) -> None:
    code, out, err = cli("reconcile", "--broker", ledger.broker_spec, "--store", ledger.path)
    assert code == 0, err
    assert ledger.unknown.client_order_id in out and "UNKNOWN" in out and "FILLED" in out
    assert "clean" in out
    assert ledger.state_of(ledger.unknown.id) is State.FILLED

    doc = cli_json("status", "--store", ledger.path)
    assert doc["totals"]["unknown"] == 0
    again = cli_json("reconcile", "--broker", ledger.broker_spec, "--store", ledger.path)
    assert again["clean"] is True and again["decisions"] == [] and again["unresolved"] == [] and again["drift"] == []


def test_reconcile_json_names_every_decision(ledger: Ledger) -> None:
    doc = cli_json("reconcile", "--broker", ledger.broker_spec, "--store", ledger.path)
    assert doc["clean"] is True and doc["broker"] == ledger.broker_spec
    [decision] = doc["decisions"]
    assert decision["intent_id"] == ledger.unknown.id
    assert decision["client_order_id"] == ledger.unknown.client_order_id
    assert (decision["before"], decision["after"]) == ("UNKNOWN", "FILLED")
    assert "venue shows FILLED" in decision["why"]


def test_reconcile_exits_1_with_what_stays_unresolved_and_drift(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.db"
    paper = tmp_path / "paper.db"
    with Guard.open(f"sqlite:///{ledger}", synchronous="NORMAL") as guard:
        venue = PaperBroker.open(f"sqlite:///{paper}", faults=PaperFaults(disconnect=1))
        lost = guard.submit(make_intent(strategy="gamma", symbol="NVDA"), venue, policy=POLICY)
        # An order placed at the venue behind the guard's back: the venue's position drifts.
        venue.submit(OrderRequest("by-hand-1", "main", "NVDA", "BUY", Decimal(3), "MARKET", None, None, "DAY"))
        venue.close()
    assert lost.state is State.UNKNOWN and lost.intent is not None

    # Not found once; --no-wait leaves the second look (30 s later) to a later run.
    code, out, _ = cli("reconcile", "--broker", f"paper://{paper}", "--grace", "30", "--no-wait", "--store", ledger, "--json")
    assert code == EXIT_NOT_CLEAN
    doc = json.loads(out)
    assert doc["clean"] is False and doc["decisions"] == []
    [open_question] = doc["unresolved"]
    assert open_question["client_order_id"] == lost.intent.client_order_id and open_question["after"] is None
    assert "not found once" in open_question["why"]
    assert doc["drift"] == [{"account": "main", "symbol": "NVDA", "ledger": "0", "broker": "3", "difference": "3"}]

    code, out, _ = cli("reconcile", "--broker", f"paper://{paper}", "--grace", "30", "--no-wait", "--store", ledger)
    assert code == EXIT_NOT_CLEAN
    assert "unresolved" in out and lost.intent.client_order_id in out and "not found once" in out
    assert "drift" in out and "NVDA" in out and "NOT clean" in out

    with Guard.open(f"sqlite:///{ledger}") as guard:
        assert guard.intent(lost.intent.id).state is State.UNKNOWN  # never given up on one look


# ------------------------------------------------------------------------------- migrate


def test_migrate_creates_then_reports_and_changes_nothing(tmp_path: Path) -> None:
    store = tmp_path / "new.db"
    code, out, err = cli("migrate", "--store", store)
    assert code == 0, err
    assert out.strip() == f"created ledger {store} (schema version 2)"
    with Unchanged(store):
        code, out, _ = cli("migrate", "--store", store)
        assert code == 0 and out.strip() == f"ledger {store} already at schema version 2; nothing changed"
        assert cli_json("migrate", "--store", store) == {
            "ledger": str(store), "created": False, "upgraded_from": None, "schema_version": 2,
        }
    assert cli_json("intents", "--store", store)["intents"] == []


def test_migrate_into_a_missing_folder_creates_nothing(tmp_path: Path) -> None:
    code, _, err = cli("migrate", "--store", tmp_path / "nope" / "ledger.db")
    assert code == EXIT_USAGE
    assert_one_line_error(err, "does not exist")
    assert not (tmp_path / "nope").exists()


# ------------------------------------------------------------------ choosing the store


def test_store_from_environment_option_or_global_option(ledger: Ledger, tmp_path: Path) -> None:
    env = {"ORDERGUARD_STORE": str(ledger.path)}
    code, out, _ = cli("intents", "--json", env=env)
    assert code == 0 and json.loads(out)["ledger"] == str(ledger.path)
    # --store beats the environment, before or after the command
    missing = tmp_path / "elsewhere.db"
    code, _, err = cli("intents", "--store", missing, env=env)
    assert code == EXIT_STORE and str(missing) in err and "--store" in err
    code, _, err = cli("--store", str(missing), "intents", env=env)
    assert code == EXIT_STORE and str(missing) in err
    assert cli("--store", str(ledger.path), "intents", "--json")[0] == 0
    # a sqlite:/// URL works as well as a path
    assert cli_json("intents", "--store", f"sqlite:///{ledger.path}")["ledger"] == str(ledger.path)


def test_default_store_is_orderguard_db_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with Unchanged(tmp_path / "orderguard.db"):
        code, _, err = cli("status")
    assert code == EXIT_STORE
    assert_one_line_error(err, str(tmp_path / "orderguard.db"), "default", "orderguard migrate")
    build_ledger(tmp_path)
    (tmp_path / "ledger.db").rename(tmp_path / "orderguard.db")
    assert cli_json("status")["totals"]["unknown"] == 1


# ------------------------------------------------------------------- failures, unchanged


@pytest.mark.parametrize("command", [
    ["status"], ["intents"], ["show", "og-x-1"], ["attempts", "--blocked"], ["reconcile", "--broker", "PAPER"],
])
def test_missing_store_is_never_created(tmp_path: Path, command: list[str]) -> None:
    paper = tmp_path / "paper.db"
    PaperBroker.open(f"sqlite:///{paper}").close()
    missing = tmp_path / "missing.db"
    args = [str(a).replace("PAPER", f"paper://{paper}") for a in command]
    with Unchanged(missing):
        code, out, err = cli(*args, "--store", missing)
    assert code == EXIT_STORE and out == ""
    assert_one_line_error(err, f"no orderguard ledger at {missing}", "orderguard migrate")


def test_locked_store(ledger: Ledger) -> None:
    holder = sqlite3.connect(ledger.path, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode = EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("COMMIT")  # the exclusive lock stays held in this locking mode
        with Unchanged(ledger.path):
            code, out, err = cli("status", "--store", ledger.path, "--busy-timeout", "0.2")
        assert code == EXIT_STORE and out == ""
        assert_one_line_error(err, "locked", "--busy-timeout")
    finally:
        holder.close()


def test_store_locked_by_a_writer_during_reconcile_changes_nothing(ledger: Ledger) -> None:
    holder = sqlite3.connect(ledger.path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # a writer that does not let go
        code, out, err = cli("--busy-timeout", "0.2", "reconcile", "--broker", ledger.broker_spec, "--store", ledger.path)
        assert code == EXIT_STORE and out == ""
        assert_one_line_error(err, "locked")
    finally:
        holder.close()
    assert ledger.state_of(ledger.unknown.id) is State.UNKNOWN


def test_newer_schema_is_refused_unchanged(ledger: Ledger) -> None:
    with sqlite3.connect(ledger.path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    for command in (["status"], ["intents", "--json"], ["migrate"], ["reconcile", "--broker", ledger.broker_spec]):
        with Unchanged(ledger.path):
            code, out, err = cli(*command, "--store", ledger.path)
        assert code == EXIT_STORE and out == "", command
        assert_one_line_error(err, "schema version 99", "Upgrade orderguard")


def test_junk_file_is_refused_unchanged(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not an orderguard ledger\n" * 200)
    for command in (["status"], ["show", "x"], ["migrate"]):
        with Unchanged(junk):
            code, out, err = cli(*command, "--store", junk)
        assert code == EXIT_STORE and out == "", command
        assert_one_line_error(err, str(junk), "not a database")


def test_foreign_sqlite_file_is_refused_unchanged(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    with Unchanged(other):
        code, _, err = cli("status", "--store", other)
    assert code == EXIT_STORE
    assert_one_line_error(err, "not an orderguard ledger")


def test_bad_store_url_is_a_usage_error(tmp_path: Path) -> None:
    for url in ("sqlite://relative.db", "redis://x"):
        code, _, err = cli("status", "--store", url)
        assert code == EXIT_USAGE, url
        assert_one_line_error(err)


def test_unreachable_postgres_store_is_a_store_error() -> None:
    code, out, err = cli("status", "--store", "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1")
    assert code == EXIT_STORE and out == ""
    assert_one_line_error(err, "PostgreSQL")


def test_bad_broker_specs_are_usage_errors_and_change_nothing(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APCA_API_KEY_ID", raising=False)
    monkeypatch.delenv("BINANCE_API_KEY", raising=False)
    junk = ledger.path.with_name("junk.bin")
    junk.write_bytes(b"\x00junk" * 100)
    cases = {
        "paper://relative.db": "absolute path",
        "kraken://spot": "paper:///",  # lists the known schemes
        "alpaca://paper": "APCA_API_KEY_ID",  # keys come from the environment only
        "ccxt://binance?sandbox=1": "BINANCE_API_KEY",
        "ccxt://kraken": "supports binance",
        str(ledger.paper): "no scheme",
        f"paper://{ledger.path.with_name('absent.db')}": "no paper venue",
        f"paper://{ledger.path}": "not a paper venue",  # the ledger itself
        f"paper://{junk}": "not an SQLite file",
    }
    for spec, needle in cases.items():
        with Unchanged(ledger.path), Unchanged(ledger.path.with_name("absent.db")), Unchanged(junk):
            code, out, err = cli("reconcile", "--broker", spec, "--store", ledger.path)
        assert code == EXIT_USAGE and out == "", spec
        assert_one_line_error(err, needle)
    assert ledger.state_of(ledger.unknown.id) is State.UNKNOWN


def test_broker_spec_registry() -> None:
    assert {"paper:///abs/path/paper.db", "alpaca://paper", "ccxt://binance?sandbox=1"} <= set(known_specs())
    with pytest.raises(BrokerSpecError, match="known: alpaca://paper, ccxt://binance"):
        open_broker("ibkr://gateway")


def test_version_is_unchanged() -> None:
    code, out, _ = cli("version")
    assert code == 0 and out.strip() == __version__


# ------------------------------------------------------------ the installed console script


@pytest.fixture(scope="module")
def script() -> Iterator[str]:
    found = Path(sys.executable).with_name("orderguard")
    path = str(found) if found.exists() else shutil.which("orderguard")
    if path is None:
        pytest.fail("the orderguard console script is not installed (pip install -e '.[test]')")
    yield path


def run_script(script: str, *args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "ORDERGUARD_STORE"} | (env or {})
    return subprocess.run(
        [script, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=60, check=False
    )


def test_console_script_status_json_from_the_environment(script: str, ledger: Ledger, tmp_path: Path) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    proc = run_script(script, "status", "--json", cwd=elsewhere, env={"ORDERGUARD_STORE": str(ledger.path)})
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ledger"] == str(ledger.path)
    [beta] = [g for g in doc["strategies"] if g["strategy"] == "beta"]
    assert [r["client_order_id"] for r in beta["unknown"]] == [ledger.unknown.client_order_id]


def test_console_script_reconcile_then_missing_default_store(script: str, ledger: Ledger, tmp_path: Path) -> None:
    proc = run_script(script, "reconcile", "--broker", ledger.broker_spec, "--store", ledger.path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ledger.unknown.client_order_id in proc.stdout and "FILLED" in proc.stdout

    empty = tmp_path / "empty-cwd"
    empty.mkdir()
    proc = run_script(script, "intents", cwd=empty)
    assert proc.returncode == EXIT_STORE and proc.stdout == ""
    assert_one_line_error(proc.stderr, str(empty / "orderguard.db"))
    assert list(empty.iterdir()) == []


def test_migrate_and_status_on_postgres() -> None:
    import uuid

    from tests.store.conftest import drop_schema, postgres_or_skip

    url = postgres_or_skip()
    schema = f"og_cli_{uuid.uuid4().hex[:10]}"
    store = f"{url}?schema={schema}"
    try:
        first = cli("migrate", "--store", store, "--json")
        assert first[0] == 0, first
        assert json.loads(first[1])["created"] is True
        again = cli("migrate", "--store", store)
        assert again[0] == 0 and "already at schema version" in again[1]
        status = cli("status", "--store", store, "--json")
        assert status[0] == 0, status
    finally:
        drop_schema(url, schema)
