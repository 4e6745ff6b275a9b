"""The runner registry, stale and mixed-version runners, and the fenced leader lease.

Real OS processes and real signals, nothing mocked: each runner is ``python -m
tests._runner_child`` (one Guard in its own process, driven by JSON commands on its stdin,
answering with JSON lines), killed with SIGKILL or frozen with SIGSTOP (or freezing itself
right after a claim commit through ``ORDERGUARD_PAUSE_AT``). The venue is the project's
PaperBroker on a SQLite file, and what its order log holds is what was sent. Alerts go through
real Notifiers; only their sinks are test classes (in-process) or print JSON lines (children).

1. registration: host, pid, start marker, version, code fingerprint, git commit; heartbeats;
   a clean close; bad code paths.
2. a SIGKILLed runner is STALE (alerted once by a live peer); a cleanly closed one never is.
3. two live runners of one strategy with different code: MIXED_VERSIONS names the old pid.
4. ``exclusive=``: a scheduler on two hosts; SIGSTOP and SIGKILL of the leader (SQLite and
   PostgreSQL); at most one order per tick at the venue.
5. the reconciler asks the registry whether an owner on another host is gone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest

import orderguard
from orderguard import (
    Alert,
    AlertKind,
    BlockReason,
    ConfigurationError,
    Ever,
    Guard,
    Notifier,
    OncePer,
    Outcome,
    State,
)
from orderguard.brokers import PaperBroker
from orderguard.reconcile import reconcile
from orderguard.runners import Lease, RunnerRecord, new_runner_id, runner_flags
from orderguard.store import open_store
from orderguard.store.base import Caller, Store, process_start, this_host

from .helpers import make_intent, unavailable
from .helpers import wait_stopped as _wait_stopped

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHILD_SCRIPT = Path(__file__).resolve().parent / "_runner_child.py"
CHILD_TIMEOUT = 30.0  # seconds a child may take to start, answer, or exit
BEAT = 0.25  # heartbeat_every of runners whose staleness a test waits for
LEASE = 1.5  # lease_seconds of the exclusive scheduler: three beats of 0.5 s
PG_URL = os.environ.get("ORDERGUARD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
T = TypeVar("T")

STRATEGY_V1 = '"""SPX calendar entry, release 1."""\n\nENTRY_DELTA = 0.30\n\n\ndef signal(x):\n    return x > ENTRY_DELTA\n'
STRATEGY_V2 = '"""SPX calendar entry, release 2."""\n\nENTRY_DELTA = 0.25\n\n\ndef signal(x):\n    return x >= ENTRY_DELTA\n'


# ----------------------------------------------------------------------------- helpers


def poll(check: Callable[[], T | None], what: str, timeout: float = CHILD_TIMEOUT, every: float = 0.02) -> T:
    """``check()`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def runner(store: Store, runner_id: str) -> RunnerRecord:
    found = [r for r in store.runners() if r.id == runner_id]
    assert len(found) == 1, f"runner {runner_id} registered {len(found)} times: {store.runners()}"
    return found[0]


def lease_of(store: Store, name: str) -> Lease | None:
    found = [lease for lease in store.leases() if lease.name == name]
    return found[0] if found else None


def wait_leader(store: Store, name: str, child: Child, timeout: float = CHILD_TIMEOUT) -> Lease:
    """Poll until ``child``'s runner holds lease ``name``; the lease."""

    def held() -> Lease | None:
        lease = lease_of(store, name)
        return lease if lease is not None and lease.holder == child.runner_id else None

    return poll(held, f"{child.name} (pid {child.pid}) to hold lease {name!r}", timeout=timeout)


def wait_beats(store: Store, runner_id: str, beats: int) -> None:
    """Wait until the runner's heartbeat_at has advanced ``beats`` times."""
    seen = [runner(store, runner_id).heartbeat_at]

    def advanced() -> bool:
        at = runner(store, runner_id).heartbeat_at
        if at != seen[-1]:
            seen.append(at)
        return len(seen) > beats

    poll(advanced, f"{beats} heartbeats of runner {runner_id}")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=test@example.invalid",
         "-c", "commit.gpgsign=false", *args],
        capture_output=True, text=True, check=True, timeout=30,
    )
    return done.stdout.strip()


class CollectingSink:
    """A test sink for a real Notifier: keeps what it is sent."""

    name = "collect"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._alerts: list[Alert] = []

    def send(self, alert: Alert) -> None:
        with self._lock:
            self._alerts.append(alert)

    def of(self, kind: AlertKind) -> list[Alert]:
        with self._lock:
            return [a for a in self._alerts if a.kind is kind]


# --------------------------------------------------------------------- ledgers (stores)


@dataclass
class Ledger:
    """A ledger URL the children and the test both open, and the stores the test opened."""

    url: str
    options: dict[str, Any]
    paper: str
    opened: list[Any] = field(default_factory=list)

    def store(self) -> Store:
        store = open_store(self.url, **self.options)
        self.opened.append(store)
        return store

    def broker(self) -> PaperBroker:
        broker = PaperBroker.open(self.paper)
        self.opened.append(broker)
        return broker

    def close(self) -> None:
        for thing in reversed(self.opened):
            with contextlib.suppress(Exception):
                thing.close()


def _sqlite_ledger(tmp_path: Path) -> Ledger:
    return Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", {"synchronous": "NORMAL"}, str(tmp_path / "paper.db"))


def _postgres_ledger(tmp_path: Path) -> tuple[Ledger, str]:
    try:
        import psycopg

        psycopg.connect(PG_URL, connect_timeout=3).close()
    except Exception as exc:
        unavailable(f"no PostgreSQL at {PG_URL}: {exc}")
    schema = f"og_{uuid.uuid4().hex[:12]}"
    return Ledger(f"{PG_URL}?schema={schema}", {}, str(tmp_path / "paper.db")), schema


def _drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """A SQLite ledger file and a paper venue file."""
    led = _sqlite_ledger(tmp_path)
    yield led
    led.close()


@pytest.fixture(params=["sqlite", "postgres"])
def any_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    """The same, on SQLite and on PostgreSQL (a schema of its own, dropped at the end)."""
    if request.param == "sqlite":
        led = _sqlite_ledger(tmp_path)
        yield led
        led.close()
        return
    led, schema = _postgres_ledger(tmp_path)
    try:
        yield led
    finally:
        led.close()
        _drop_schema(schema)


# ----------------------------------------------------------------------------- children


class Child:
    """One runner process; its stdout JSON lines collected by a reader thread."""

    def __init__(self, name: str, proc: subprocess.Popen[str], err_path: Path) -> None:
        self.name, self.proc, self.err_path = name, proc, err_path
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()
        self.ready: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def runner_id(self) -> str:
        return str(self.ready["runner_id"])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "raw", "line": line}
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self.events.append({"event": "eof"})
            self._cond.notify_all()

    def stderr(self) -> str:
        try:
            return self.err_path.read_text()[-6000:]
        except OSError:
            return ""

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def find(self, event: str, **match: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e["event"] == event and all(e.get(k) == v for k, v in match.items())]

    def wait_event(self, event: str, timeout: float = CHILD_TIMEOUT, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    if e["event"] == event and all(e.get(k) == v for k, v in match.items()):
                        return e
                if any(e["event"] == "eof" for e in self.events):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        pytest.fail(
            f"{self.name} (pid {self.pid}) sent no {event} {match} within {timeout}s; "
            f"events {self.events}; stderr:\n{self.stderr()}"
        )

    def tick(self, n: int, *, pause: bool = False) -> None:
        self.send(cmd="tick", n=n, pause=pause)

    def result(self, n: int) -> dict[str, Any]:
        return self.wait_event("tick", n=n)

    def close_cleanly(self) -> None:
        self.send(cmd="close")
        self.wait_event("closed")
        assert self.proc.wait(CHILD_TIMEOUT) == 0, self.stderr()

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        assert self.proc.wait(CHILD_TIMEOUT) == -signal.SIGKILL


class Children:
    """Starts runner processes and makes sure none outlives the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.kids: list[Child] = []
        self._files: list[IO[str]] = []

    def start(self, name: str, led: Ledger, **cfg: Any) -> Child:
        env = {k: v for k, v in os.environ.items() if k not in ("ORDERGUARD_CRASH_AT", "ORDERGUARD_PAUSE_AT")}
        config = {"ledger": led.url, "store": led.options, "paper": led.paper, "runner": name, **cfg}
        err_path = self.tmp / f"{name}.stderr"
        err = err_path.open("w")
        self._files.append(err)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests._runner_child", json.dumps(config)],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
        )
        child = Child(name, proc, err_path)
        self.kids.append(child)
        child.ready = child.wait_event("ready")
        assert child.ready["pid"] == proc.pid
        return child

    def kill_all(self) -> None:
        for child in self.kids:
            if child.proc.poll() is None:
                child.proc.kill()  # SIGKILL also ends a stopped process
            with contextlib.suppress(Exception):
                child.proc.wait(CHILD_TIMEOUT)
            for stream in (child.proc.stdin, child.proc.stdout):
                with contextlib.suppress(Exception):
                    if stream is not None:
                        stream.close()
        for f in self._files:
            f.close()


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Children]:
    kids = Children(tmp_path)
    try:
        yield kids
    finally:
        kids.kill_all()


def wait_stopped(child: Child) -> None:
    _wait_stopped(child.proc, CHILD_TIMEOUT)


# ------------------------------------------------------------------- 1. registration


def test_a_runner_process_registers_itself_heartbeats_and_stops(children: Children, ledger: Ledger) -> None:
    store = ledger.store()
    child = children.start("bot-a", ledger, guard={"heartbeat_every": BEAT})
    reg = runner(store, child.runner_id)

    # Who and where: this host, the child's pid and its process start marker.
    assert (reg.runner, reg.strategy, reg.host, reg.pid) == ("bot-a", "bot-a", this_host(), child.pid)
    assert reg.started and reg.started == process_start(child.pid)
    assert reg.version == orderguard.__version__
    assert reg.exclusive is None
    assert reg.heartbeat_every == BEAT
    # No code given: the __main__ script is what is fingerprinted.
    assert child.ready["main"] == str(CHILD_SCRIPT)
    assert reg.modules == str(CHILD_SCRIPT)
    assert len(reg.fingerprint) == 16 and int(reg.fingerprint, 16) >= 0 and reg.fingerprint != "none"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    assert reg.git_commit == (head.stdout.strip() if head.returncode == 0 else None)
    assert reg.stopped_at is None and reg.registered_at == reg.heartbeat_at

    # Heartbeats advance heartbeat_at; meanwhile it is live and unflagged.
    wait_beats(store, child.runner_id, 2)
    beating = runner(store, child.runner_id)
    assert beating.heartbeat_at > reg.registered_at
    assert beating.registered_at == reg.registered_at
    assert beating.live(store.now())

    # A clean close: stopped, not live, never stale.
    child.close_cleanly()
    stopped = runner(store, child.runner_id)
    assert stopped.stopped_at is not None and stopped.stopped_at >= stopped.heartbeat_at
    later = store.now() + 100 * BEAT
    assert not stopped.live(later) and not stopped.stale(later)
    assert [f for f in runner_flags(store.runners(), later) if f.runner.id == child.runner_id] == []


def test_code_fingerprint_and_git_commit(tmp_path: Path, ledger: Ledger) -> None:
    if shutil.which("git") is None:
        unavailable("git is not installed")
    store = ledger.store()
    guards: list[Guard] = []

    def register(strategy: str, *code: Any) -> RunnerRecord:
        guard = Guard(ledger.store(), strategy=strategy, code=code, heartbeat_every=60)
        guards.append(guard)
        assert guard.registration is not None
        stored = runner(store, guard.runner_id)
        assert stored == guard.registration
        return stored

    try:
        plain = write(tmp_path / "release-1" / "strategy.py", STRATEGY_V1)
        helper = write(tmp_path / "release-1" / "signals.py", "THRESHOLD = 3\n")
        copy = write(tmp_path / "release-1b" / "strategy.py", STRATEGY_V1)
        changed = write(tmp_path / "release-2" / "strategy.py", STRATEGY_V2)
        repo = tmp_path / "repo"
        repo.mkdir()
        git(repo, "init", "-q")
        in_git = write(repo / "strategy.py", STRATEGY_V1)
        git(repo, "add", "strategy.py")
        git(repo, "commit", "-q", "-m", "release 1")
        head = git(repo, "rev-parse", "HEAD")

        by_path = register("p", str(plain))
        assert by_path.modules == str(plain.resolve())
        assert by_path.git_commit is None  # tmp_path is in no git repository
        assert len(by_path.fingerprint) == 16 and by_path.fingerprint != "none"
        # A module is fingerprinted through its source file; a PathLike works like a str.
        assert register("m", load_module(plain, "og_test_strategy_v1")).fingerprint == by_path.fingerprint
        assert register("l", plain).fingerprint == by_path.fingerprint
        # The same file deployed in another directory is the same code; one changed line is not.
        assert register("c", copy).fingerprint == by_path.fingerprint
        assert register("v2", changed).fingerprint != by_path.fingerprint
        # Several files: all count, their order does not.
        both = register("b1", plain, helper)
        assert both.fingerprint != by_path.fingerprint
        assert register("b2", helper, plain).fingerprint == both.fingerprint
        assert both.modules == ",".join(sorted(str(p.resolve()) for p in (plain, helper)))

        gitted = register("g", in_git)
        assert len(head) == 40 and gitted.git_commit == head
        assert gitted.fingerprint == by_path.fingerprint
        write(repo / "strategy.py", STRATEGY_V2)
        git(repo, "commit", "-q", "-am", "release 2")
        # A deploy under a running process does not change the code that process runs: a later
        # guard of the same process still reports what it loaded (a new process sees release 2).
        again = register("g2", in_git)
        assert (again.git_commit, again.fingerprint) == (head, gitted.fingerprint)
        assert git(repo, "rev-parse", "HEAD") != head

        # Bad code: a typed error, and nothing is registered.
        before = {r.id for r in store.runners()}
        for bad in (tmp_path / "missing.py", str(tmp_path / "release-1"), sys):
            with pytest.raises(ConfigurationError):
                Guard(store, strategy="bad", code=[bad], heartbeat_every=60)
        with pytest.raises(ConfigurationError):
            Guard.open(ledger.url, strategy="bad", code=[tmp_path / "missing.py"], **ledger.options)
        assert {r.id for r in store.runners()} == before

        unregistered = Guard(ledger.store(), strategy="quiet", register=False)
        guards.append(unregistered)
        assert unregistered.registration is None
        assert {r.id for r in store.runners()} == before
    finally:
        for guard in guards:
            guard.close()


# ------------------------------------------------------------------- 2. stale runners


def test_killed_runner_is_stale_and_alerted_once_clean_stop_never(
    children: Children, ledger: Ledger, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="orderguard")
    code = [str(write(tmp_path / "release-1" / "strategy.py", STRATEGY_V1))]
    cfg = {"guard": {"strategy": "alpha", "heartbeat_every": BEAT}, "code": code}
    doomed = children.start("alpha-1", ledger, **cfg)
    clean = children.start("alpha-2", ledger, **cfg)
    store = ledger.store()
    clean.close_cleanly()

    doomed.kill()
    # No other guard of the strategy runs yet: a live peer marks a dead same-host runner stopped
    # as soon as it sees it stale (checked below), which would race this look at the raw record.
    flag = poll(
        lambda: [f for f in runner_flags(store.runners(), store.now()) if f.runner.id == doomed.runner_id],
        "the killed runner to be flagged",
    )
    assert [f.kind for f in flag] == ["STALE"]
    assert f"pid {doomed.pid}" in flag[0].message and "without stopping" in flag[0].message
    dead = runner(store, doomed.runner_id)
    assert dead.stopped_at is None and dead.stale(store.now()) and not dead.live(store.now())

    sink = CollectingSink()
    notifier = Notifier([sink], interval=0.05)  # a repeated alert would go out again at once
    watcher = Guard(store, runner="alpha-watch", strategy="alpha", code=code, heartbeat_every=BEAT, alerts=notifier)
    try:
        # The live guard of the same strategy alerts it, once, however many beats follow.
        poll(lambda: sink.of(AlertKind.STALE_RUNNER), "the watcher's STALE_RUNNER alert")
        wait_beats(store, watcher.runner_id, 4)
        stale_alerts = sink.of(AlertKind.STALE_RUNNER)
        assert [(a.details.get("runner"), a.count) for a in stale_alerts] == [(doomed.runner_id, 1)]
        assert f"pid {doomed.pid}" in stale_alerts[0].message
        assert stale_alerts[0].scope == "strategy=alpha"
        logged = [r for r in caplog.records if r.getMessage().startswith("STALE:")]
        assert len(logged) == 1 and f"pid {doomed.pid}" in logged[0].getMessage()
        # Its pid is gone from this host, so the watcher marked it stopped: never flagged again.
        assert runner(store, doomed.runner_id).stopped_at is not None
        assert doomed.runner_id not in {f.runner.id for f in runner_flags(store.runners(), store.now())}

        # The cleanly closed runner is never flagged, however long it has been silent.
        gone = runner(store, clean.runner_id)
        assert gone.stopped_at is not None
        flags = runner_flags(store.runners(), store.now() + 1000)
        assert clean.runner_id not in {f.runner.id for f in flags}
        assert sink.of(AlertKind.MIXED_VERSIONS) == []  # same code everywhere
    finally:
        watcher.close()
    # Closing flushed pending summaries: a repeat would show up now with count > 1.
    assert [(a.details.get("runner"), a.count) for a in sink.of(AlertKind.STALE_RUNNER)] == [(doomed.runner_id, 1)]
    notifier.close()


# ------------------------------------------------------------------- 3. mixed versions


def test_old_runner_left_alive_after_a_deploy_is_flagged_mixed_versions(
    children: Children, ledger: Ledger, tmp_path: Path
) -> None:
    old_code = write(tmp_path / "release-1" / "strategy.py", STRATEGY_V1)
    new_code = write(tmp_path / "release-2" / "strategy.py", STRATEGY_V2)
    guard_cfg = {"strategy": "spx", "heartbeat_every": BEAT}
    old = children.start("spx-old", ledger, guard=guard_cfg, modules=[str(old_code)], alerts=True)
    new = children.start("spx-new", ledger, guard=guard_cfg, modules=[str(new_code)], alerts=True)
    store = ledger.store()
    old_reg, new_reg = runner(store, old.runner_id), runner(store, new.runner_id)
    assert old_reg.fingerprint != new_reg.fingerprint
    assert (old_reg.modules, new_reg.modules) == (str(old_code.resolve()), str(new_code.resolve()))
    assert new_reg.registered_at > old_reg.registered_at

    mixed = poll(
        lambda: [f for f in runner_flags(store.runners(), store.now()) if f.kind == "MIXED_VERSIONS"],
        "a MIXED_VERSIONS flag",
    )
    assert [f.runner.id for f in mixed] == [old.runner_id]  # the old one, never the newest
    assert f"stop pid {old.pid}" in mixed[0].message
    assert old_reg.fingerprint in mixed[0].message and new_reg.fingerprint in mixed[0].message

    # The newer guard alerts it, naming the old pid.
    alert = new.wait_event("alert", kind="MIXED_VERSIONS")
    assert alert["details"]["runner"] == old.runner_id
    assert f"stop pid {old.pid}" in alert["message"]
    assert alert["scope"] == "strategy=spx"

    # The old runner is stopped: the deploy is complete, nothing is mixed any more.
    old.close_cleanly()
    assert [f for f in runner_flags(store.runners(), store.now()) if f.kind == "MIXED_VERSIONS"] == []
    new.close_cleanly()


def test_same_code_in_two_runners_is_not_mixed(children: Children, ledger: Ledger, tmp_path: Path) -> None:
    # The same release deployed in two directories (two hosts): same code.
    one = write(tmp_path / "host-a" / "strategy.py", STRATEGY_V2)
    two = write(tmp_path / "host-b" / "strategy.py", STRATEGY_V2)
    guard_cfg = {"strategy": "spx", "heartbeat_every": BEAT}
    a = children.start("spx-a", ledger, guard=guard_cfg, modules=[str(one)], alerts=True)
    b = children.start("spx-b", ledger, guard=guard_cfg, modules=[str(two)], alerts=True)
    store = ledger.store()
    assert runner(store, a.runner_id).fingerprint == runner(store, b.runner_id).fingerprint
    # Both checked their peers at start and on each beat since.
    wait_beats(store, a.runner_id, 3)
    wait_beats(store, b.runner_id, 3)
    both = [r for r in store.runners() if r.id in (a.runner_id, b.runner_id)]
    assert len(both) == 2 and all(r.live(store.now()) for r in both)
    assert [f for f in runner_flags(store.runners(), store.now()) if f.kind == "MIXED_VERSIONS"] == []
    assert a.find("alert", kind="MIXED_VERSIONS") == [] and b.find("alert", kind="MIXED_VERSIONS") == []
    a.close_cleanly()
    b.close_cleanly()


# ----------------------------------------------------- 4. exclusive: the leader lease


def ledger_ticks(store: Store) -> dict[str, Any]:
    """client order id -> the tick's intent record."""
    return {r.client_order_id: r for r in store.intents(strategy="sched", limit=100_000)}


def assert_sent(result: dict[str, Any], child: Child) -> None:
    assert result["outcome"] == "SENT", (result, child.stderr())
    assert result["state"] in ("ACKED", "FILLED"), result


def assert_not_leader(result: dict[str, Any], leader: Child) -> None:
    assert result["outcome"] == "BLOCKED", result
    assert result["reason"] == BlockReason.NOT_LEADER.value, result
    assert f"runner {leader.name} on {this_host()} pid {leader.pid}" in result["message"], result


def test_exclusive_scheduler_on_two_hosts_one_order_per_tick(children: Children, any_ledger: Ledger) -> None:
    store = any_ledger.store()
    broker = any_ledger.broker()
    cfg = {"guard": {"strategy": "sched", "exclusive": "sched", "lease_seconds": LEASE, "heartbeat_every": 5.0}}

    a = children.start("sched-a", any_ledger, **cfg)
    first = wait_leader(store, "sched", a)
    b = children.start("sched-b", any_ledger, **cfg)
    assert runner(store, a.runner_id).heartbeat_every == LEASE / 3  # three beats per lease

    # Both fire every tick; only the leader's claims pass.
    for n in (1, 2, 3):
        a.tick(n)
        b.tick(n)
        assert_sent(a.result(n), a)
        assert_not_leader(b.result(n), a)

    # The leader freezes right after committing tick 4's claim (SIGSTOP at after_claim_commit).
    a.tick(4, pause=True)
    wait_stopped(a)
    frozen = [r for r in ledger_ticks(store).values() if r.tags == {"tick": "4"}]
    assert len(frozen) == 1 and frozen[0].state is State.SENDING and frozen[0].pid == a.pid
    frozen_rec = frozen[0]
    # Its send deadline was cut from the guard's 10 s to the lease's expiry.
    assert frozen_rec.send_by_at is not None and frozen_rec.send_by_at - frozen_rec.created_at <= LEASE + 1e-6
    assert broker.orders(frozen_rec.client_order_id) == []
    b.tick(4)
    standby_4 = b.result(4)
    assert standby_4["outcome"] == "BLOCKED", standby_4
    # Still a standby, or (if the lease lapsed already) the frozen claim holds the tick.
    assert standby_4["reason"] in (BlockReason.NOT_LEADER.value, BlockReason.IN_FLIGHT.value), standby_4

    # The frozen leader stops renewing: once the lease lapses, the standby leads, fenced.
    taken = wait_leader(store, "sched", b)
    assert taken.fence > first.fence
    assert taken.acquired_at >= frozen_rec.send_by_at
    b.tick(5)
    assert_sent(b.result(5), b)

    # The old leader wakes up: its frozen claim is not sent, its next claims are refused.
    a.tick(5)  # fired while frozen: waits in its stdin
    os.kill(a.pid, signal.SIGCONT)
    woke = a.result(4)
    assert woke["outcome"] == Outcome.NOT_SENT.value, (woke, a.stderr())
    assert woke["state"] == State.ABANDONED.value and woke["client_order_id"] == frozen_rec.client_order_id
    assert "send deadline" in (woke["note"] or "") and "nothing was sent" in woke["note"], woke
    assert_not_leader(a.result(5), b)
    a.tick(6)
    b.tick(6)
    assert_not_leader(a.result(6), b)
    assert_sent(b.result(6), b)

    # The new leader is killed: after its lease lapses, the old one leads again.
    b.kill()
    back = wait_leader(store, "sched", a)
    assert back.fence > taken.fence
    a.tick(7)
    assert_sent(a.result(7), a)

    # The venue: exactly one order per tick, each from the leader of its time; none for tick 4.
    intents = ledger_ticks(store)
    orders = broker.orders()
    assert {o.client_order_id for o in orders} <= set(intents), "an order the ledger never claimed"
    per_tick = Counter(intents[o.client_order_id].tags["tick"] for o in orders)
    assert per_tick == Counter({"1": 1, "2": 1, "3": 1, "5": 1, "6": 1, "7": 1}), per_tick
    senders = {intents[o.client_order_id].tags["tick"]: intents[o.client_order_id].pid for o in orders}
    assert senders == {"1": a.pid, "2": a.pid, "3": a.pid, "5": b.pid, "6": b.pid, "7": a.pid}
    final = store.get(frozen_rec.id)
    assert final.state is State.ABANDONED and final.released
    assert broker.orders(frozen_rec.client_order_id) == []
    refused = store.attempts(reason=BlockReason.NOT_LEADER, limit=1000)
    assert Counter(r.pid for r in refused)[a.pid] == 2  # ticks 5 and 6 after waking
    assert Counter(r.pid for r in refused)[b.pid] >= 3  # ticks 1-3 (and 4 if still a standby)
    assert all(r.scope_key == "lease|sched" and r.intent_id is None for r in refused)

    # A clean close gives the lease up at once.
    a.close_cleanly()
    gone = lease_of(store, "sched")
    assert gone is not None and gone.holder == a.runner_id and gone.expires_at <= store.now()


# ------------------------------------------------------ 5. reconciler and the registry


REMOTE = Caller(host="other-host.invalid", pid=4242, runner="remote-bot", thread="MainThread", started="boot-x:777")


def remote_runner(*, heartbeat_every: float = 60.0, caller: Caller = REMOTE) -> RunnerRecord:
    return RunnerRecord(
        id=new_runner_id(), runner=caller.runner, strategy="spx-calendar", host=caller.host, pid=caller.pid,
        started=caller.started, version=orderguard.__version__, fingerprint="0123456789abcdef", git_commit=None,
        modules="/srv/bot/strategy.py", exclusive=None, heartbeat_every=heartbeat_every,
    )


def remote_claim(store: Store, send_deadline: float = 3600) -> Any:
    """A SENDING intent of the remote owner (with stale_after=3600 only liveness can free it)."""
    decision = store.claim(make_intent(), [OncePer(Ever())], REMOTE, state=State.SENDING, send_deadline=send_deadline)
    assert decision.claimed and decision.intent is not None
    return decision.intent


def reconcile_now(store: Store, broker: PaperBroker) -> Any:
    return reconcile(store, broker, grace=0.1, stale_after=3600)


def test_remote_owner_is_gone_once_its_runner_stopped_after_the_claim(ledger: Ledger) -> None:
    store, broker = ledger.store(), ledger.broker()
    reg = store.register_runner(remote_runner())
    rec = remote_claim(store, send_deadline=0.5)

    # Another host, its runner live: the owner may still send.
    report = reconcile_now(store, broker)
    assert [d.intent_id for d in report.unresolved] == [rec.id]
    assert "may still send" in report.unresolved[0].why
    assert store.get(rec.id).state is State.SENDING

    # It stopped its guard after claiming, but another of its threads could still be inside its
    # send deadline: not yet.
    store.stop_runner(reg.id)
    assert runner(store, reg.id).stopped_at is not None
    if store.now() < rec.send_by_at:
        report = reconcile_now(store, broker)
        assert [d.intent_id for d in report.unresolved] == [rec.id]
    # Stopped, and past the deadline: it will not send any more.
    deadline = time.monotonic() + 10
    while store.now() <= rec.send_by_at and time.monotonic() < deadline:
        time.sleep(0.05)
    report = reconcile_now(store, broker)
    assert report.clean, report.lines()
    assert [(d.before, d.after) for d in report.decisions] == [
        (State.SENDING, State.UNKNOWN), (State.UNKNOWN, State.NOT_FOUND)
    ]
    assert "stopped its guard after claiming it" in report.decisions[0].why
    freed = store.get(rec.id)
    assert freed.state is State.NOT_FOUND and freed.released and freed.fence > rec.fence

    # The scope is free: a retry goes out, once.
    guard = Guard(store, register=False)
    retry = guard.submit(make_intent(), broker, policy=OncePer(Ever()))
    assert retry.outcome is Outcome.SENT, retry.message
    assert [o.client_order_id for o in broker.orders()] == [retry.client_order_id]


def test_remote_runner_stopped_before_the_claim_does_not_free_it(ledger: Ledger) -> None:
    store, broker = ledger.store(), ledger.broker()
    reg = store.register_runner(remote_runner())
    store.stop_runner(reg.id)
    rec = remote_claim(store)  # made after that stop (by an instance the registry does not know)
    report = reconcile_now(store, broker)
    assert [d.intent_id for d in report.unresolved] == [rec.id], report.lines()
    assert report.decisions == []
    assert store.get(rec.id).state is State.SENDING


def test_stale_remote_runner_is_not_treated_as_gone(ledger: Ledger) -> None:
    store, broker = ledger.store(), ledger.broker()
    reg = store.register_runner(remote_runner(heartbeat_every=0.05))
    rec = remote_claim(store)
    poll(lambda: runner(store, reg.id).stale(store.now()), "the remote runner to go stale")

    # Its heartbeat stopped, but it never stopped: it may be frozen, or its host partitioned.
    report = reconcile_now(store, broker)
    assert report.decisions == []
    assert [d.intent_id for d in report.unresolved] == [rec.id]
    why = report.unresolved[0].why
    assert "whose heartbeat stopped" in why and "resolve by hand" in why, why
    assert store.get(rec.id).state is State.SENDING
    blocked = Guard(store, register=False).submit(make_intent(), broker, policy=OncePer(Ever()))
    assert blocked.reason is BlockReason.IN_FLIGHT, blocked.message
    assert broker.orders() == []


def test_remote_owner_with_a_second_guard_that_stopped_is_not_gone(ledger: Ledger) -> None:
    store, broker = ledger.store(), ledger.broker()
    store.register_runner(remote_runner())  # the bot's guard, still live and heartbeating
    rec = remote_claim(store)
    # The same process opened and closed a second guard (a reconcile run, another strategy's job).
    side = store.register_runner(remote_runner())
    store.stop_runner(side.id)

    report = reconcile_now(store, broker)
    assert report.decisions == [], report.lines()
    assert [d.intent_id for d in report.unresolved] == [rec.id]
    assert store.get(rec.id).state is State.SENDING

