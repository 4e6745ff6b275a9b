"""Alerts: real sinks (a local HTTP receiver, real Apprise), real guards on SQLite ledgers and a
real paper venue. Nothing is mocked; the only stand-ins are sinks defined here that collect,
raise or block, to show that an alert never slows or fails an order.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from orderguard import (
    Alert,
    AlertKind,
    AppriseSink,
    BlockReason,
    ConfigurationError,
    Ever,
    Guard,
    LogSink,
    Notifier,
    OncePer,
    Outcome,
    RateLimit,
    State,
    WebhookSink,
)
from orderguard.alerts import sink_from_url
from orderguard.brokers import OrderRequest, PaperBroker, PaperFaults
from orderguard.runners import RunnerRecord
from orderguard.store import open_store
from orderguard.store.base import this_host

from .helpers import make_intent

ONCE = OncePer(Ever())
SPX_KEY = "once|account=main|strategy=spx-calendar|symbol=SPX|side=BUY|@ever"
NDX_KEY = "once|account=main|strategy=spx-calendar|symbol=NDX|side=BUY|@ever"
ALERT_THREADS = ("orderguard-alerts", "orderguard-alert-windows")
WAIT = 10.0  # the most any poll in this file waits for something that should happen at once


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def alert_threads(exclude: set[threading.Thread] | None = None) -> list[threading.Thread]:
    return [
        t for t in threading.enumerate() if t.name in ALERT_THREADS and t.is_alive() and t not in (exclude or set())
    ]


# ---------------------------------------------------------------------------- receiver


@dataclass(frozen=True)
class Post:
    path: str
    headers: dict[str, str]  # lower-cased names
    body: dict[str, Any]


class Receiver:
    """A real HTTP server on 127.0.0.1 recording every POSTed JSON body."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.posts: list[Post] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                post = Post(self.path, {k.lower(): v for k, v in self.headers.items()}, json.loads(raw))
                with receiver._cond:  # recorded before the answer: a delivered alert is visible
                    receiver.posts.append(post)
                    receiver._cond.notify_all()
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name="test-receiver", daemon=True)
        self._thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def bodies(self) -> list[dict[str, Any]]:
        with self._cond:
            return [p.body for p in self.posts]

    def wait_for(self, n: int, timeout: float = WAIT) -> list[dict[str, Any]]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.posts) >= n, timeout):
                pytest.fail(f"receiver got {len(self.posts)} posts, expected {n}: {[p.body for p in self.posts]}")
            return [p.body for p in self.posts]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


# ------------------------------------------------------------------------------ sinks


class Collecting:
    name = "collecting"

    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self._lock = threading.Lock()

    def send(self, alert: Alert) -> None:
        with self._lock:
            self.alerts.append(alert)


class Raising:
    name = "raising"

    def __init__(self) -> None:
        self.calls = 0

    def send(self, alert: Alert) -> None:
        self.calls += 1
        raise RuntimeError("the alert service is down")


class Blocking:
    """Blocks in send() until the test releases it (never longer than 30 s)."""

    name = "blocking"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.alerts: list[Alert] = []

    def send(self, alert: Alert) -> None:
        self.entered.set()
        if not self.release.wait(30):
            raise TimeoutError("blocking sink was never released")
        self.alerts.append(alert)


class Kit:
    """Everything a test opens, closed in a safe order: sinks released, guards, notifiers, servers."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
        self.paper_url = f"sqlite:///{tmp_path / 'paper.db'}"
        self._blockers: list[Blocking] = []
        self._guards: list[Guard] = []
        self._notifiers: list[Notifier] = []
        self._receivers: list[Receiver] = []
        self._brokers: list[PaperBroker] = []

    def receiver(self, status: int = 200) -> Receiver:
        r = Receiver(status)
        self._receivers.append(r)
        return r

    def blocking(self) -> Blocking:
        b = Blocking()
        self._blockers.append(b)
        return b

    def notifier(self, sinks: list[Any], **options: Any) -> Notifier:
        n = Notifier(sinks, **options)
        self._notifiers.append(n)
        return n

    def guard(self, **options: Any) -> Guard:
        g = Guard.open(self.ledger_url, synchronous="NORMAL", **options)
        self._guards.append(g)
        return g

    def broker(self, **options: Any) -> PaperBroker:
        b = PaperBroker.open(self.paper_url, **options)
        self._brokers.append(b)
        return b

    def close(self) -> None:
        for b in self._blockers:
            b.release.set()
        for g in self._guards:
            g.close()
        for n in self._notifiers:
            n.close(timeout=5)
        for r in self._receivers:
            r.close()
        for br in self._brokers:
            br.close()


@pytest.fixture
def kit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Kit]:
    # A proxy from the environment must not intercept the local receiver (urllib and requests).
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    k = Kit(tmp_path)
    yield k
    k.close()


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------- 1. webhook end to end


def test_webhook_duplicate_submit_posts_a_blocked_alert_naming_the_holder(kit: Kit) -> None:
    receiver = kit.receiver()
    guard = kit.guard(alerts=[WebhookSink(receiver.url("/hook?token=s3cret"), headers={"X-Team": "desk"})])
    broker = kit.broker()
    assert guard.alerts is not None

    first = guard.submit(make_intent(), broker, policy=ONCE)
    assert first.outcome is Outcome.SENT and first.intent is not None
    assert guard.alerts.flush()
    assert receiver.bodies() == []  # a sent order is no alert

    dup = guard.submit(make_intent(source="retry"), broker, policy=ONCE)
    assert dup.outcome is Outcome.BLOCKED and dup.reason is BlockReason.DUPLICATE
    assert guard.alerts.flush()
    (post,) = receiver.posts
    assert post.path == "/hook?token=s3cret"
    assert post.headers["content-type"] == "application/json"
    assert post.headers["user-agent"] == "orderguard"
    assert post.headers["x-team"] == "desk"
    body = post.body
    assert body["kind"] == "BLOCKED"
    assert body["severity"] == "warning"
    assert body["scope"] == SPX_KEY
    assert body["count"] == 1 and body["first_at"] is None
    assert body["message"] == dup.message
    assert first.intent.id in body["message"] and first.intent.client_order_id in body["message"]
    assert body["title"] == f"\N{WARNING SIGN} orderguard BLOCKED: {SPX_KEY}"
    assert body["body"] == dup.message
    assert body["details"] == {"reason": "DUPLICATE"}
    (attempt,) = guard.attempts(blocked=True)
    assert attempt.scope_key == body["scope"]
    assert attempt.at <= body["at"] <= time.time()
    assert len(broker.orders()) == 1


def test_webhook_lost_ack_posts_an_unknown_alert(kit: Kit) -> None:
    receiver = kit.receiver()
    notifier = kit.notifier([WebhookSink(receiver.url())], interval=60)
    guard = kit.guard(alerts=notifier, strategy="spx-calendar")
    broker = kit.broker(faults=PaperFaults(lose_ack=1))

    result = guard.submit(make_intent(), broker, policy=ONCE)
    assert result.outcome is Outcome.SENT and result.state is State.UNKNOWN
    assert notifier.flush()
    (body,) = receiver.bodies()
    assert body["kind"] == "UNKNOWN" and body["severity"] == "critical"
    assert body["scope"] == "strategy=spx-calendar,symbol=SPX"
    assert body["message"].startswith("ORDER OUTCOME UNKNOWN: spx-calendar SPX BUY 4 ")
    assert result.client_order_id is not None and result.client_order_id in body["message"]
    assert "ack was lost" in body["message"] and "orderguard reconcile" in body["message"]
    assert body["title"] == "\N{OCTAGONAL SIGN} orderguard UNKNOWN: strategy=spx-calendar,symbol=SPX"
    assert guard.halts() == []  # one UNKNOWN is below halt_after_unknown=3: no HALTED alert
    assert len(broker.orders()) == 1


def test_webhook_unknowns_past_the_threshold_post_a_halted_alert(kit: Kit) -> None:
    receiver = kit.receiver()
    notifier = kit.notifier([WebhookSink(receiver.url())], interval=60)
    guard = kit.guard(alerts=notifier, halt_after_unknown=2)
    broker = kit.broker(faults=PaperFaults(lose_ack=-1))

    for symbol in ("SPX", "NDX"):
        assert guard.submit(make_intent(symbol=symbol), broker, policy=ONCE).state is State.UNKNOWN
    assert notifier.flush()
    bodies = receiver.bodies()
    assert [(b["kind"], b["scope"]) for b in bodies] == [
        ("UNKNOWN", "strategy=spx-calendar,symbol=SPX"),
        ("UNKNOWN", "strategy=spx-calendar,symbol=NDX"),
        ("HALTED", "strategy=spx-calendar"),
    ]
    assert "UNKNOWN_OUTCOMES" in bodies[2]["message"] and "2 orders of strategy spx-calendar" in bodies[2]["message"]
    assert [h.scope for h in guard.halts()] == ["strategy=spx-calendar"]


def test_webhook_rate_limit_trip_posts_a_halted_alert(kit: Kit) -> None:
    receiver = kit.receiver()
    notifier = kit.notifier([WebhookSink(receiver.url())], interval=60)
    guard = kit.guard(alerts=notifier)
    broker = kit.broker()
    breaker = RateLimit(1, 60, trip=True)

    assert guard.submit(make_intent(symbol="SPX"), broker, policy=breaker).sent
    tripped = guard.submit(make_intent(symbol="NDX"), broker, policy=breaker)
    assert tripped.outcome is Outcome.BLOCKED and tripped.reason is BlockReason.RATE_LIMIT
    assert notifier.flush()
    (body,) = receiver.bodies()
    assert body["kind"] == "HALTED" and body["severity"] == "critical"
    assert body["scope"] == "strategy=spx-calendar"
    assert body["message"] == f"BREAKER TRIPPED, strategy=spx-calendar HALTED: {tripped.message}"
    assert body["details"] == {"reason": "RATE_LIMIT"}
    (halt,) = guard.halts()
    assert halt.scope == "strategy=spx-calendar" and halt.cause.value == "RATE_LIMIT"

    # Claims refused by the halt are HALTED alerts of the same scope: counted into one summary.
    for symbol in ("RUT", "DJX"):
        refused = guard.submit(make_intent(symbol=symbol), broker, policy=breaker)
        assert refused.reason is BlockReason.HALTED
    assert notifier.flush()
    bodies = receiver.bodies()
    assert len(bodies) == 2
    assert (bodies[1]["kind"], bodies[1]["scope"], bodies[1]["count"]) == ("HALTED", "strategy=spx-calendar", 2)
    assert bodies[1]["details"] == {"reason": "HALTED"}
    assert len(broker.orders()) == 1


def test_webhook_drift_found_by_reconcile_posts_drift_and_halted(kit: Kit) -> None:
    receiver = kit.receiver()
    notifier = kit.notifier([WebhookSink(receiver.url())], interval=60)
    guard = kit.guard(alerts=notifier)
    broker = kit.broker()

    assert guard.submit(make_intent(quantity=4), broker, policy=ONCE).state is State.FILLED
    assert guard.reconcile(broker, grace=0.0).drift == []
    assert notifier.flush()
    assert receiver.bodies() == []  # no drift, no alert

    broker.submit(OrderRequest("by-hand-1", "main", "SPX", "BUY", Decimal(3), "MARKET", None, None, "DAY"))
    report = guard.reconcile(broker, grace=0.0)
    assert len(report.drift) == 1 and len(report.halts) == 1
    assert notifier.flush()
    drift, halted = receiver.bodies()
    scope = "account=main,symbol=SPX"
    assert (drift["kind"], drift["severity"], drift["scope"]) == ("DRIFT", "critical", scope)
    assert drift["message"] == (
        "position drift in SPX for account main: the ledger's filled orders net 4, paper shows 7 (difference 3)"
    )
    assert (halted["kind"], halted["scope"]) == ("HALTED", scope)
    assert halted["message"] == f"HALTED {scope} (DRIFT): {drift['message']}"

    # A second reconcile finds the drift again but the scope is already halted: DRIFT only,
    # and aggregated with the first DRIFT (same kind and scope) into the next summary.
    assert guard.reconcile(broker, grace=0.0).halts == []
    assert notifier.flush()
    bodies = receiver.bodies()
    assert len(bodies) == 3
    assert (bodies[2]["kind"], bodies[2]["scope"], bodies[2]["count"]) == ("DRIFT", scope, 1)
    assert bodies[2]["first_at"] is not None  # a summary, not a new immediate alert


def test_drift_without_halting_posts_drift_only(kit: Kit) -> None:
    receiver = kit.receiver()
    notifier = kit.notifier([WebhookSink(receiver.url())], interval=60)
    guard = kit.guard(alerts=notifier)
    broker = kit.broker()
    assert guard.submit(make_intent(quantity=4), broker, policy=ONCE).state is State.FILLED
    broker.submit(OrderRequest("by-hand-2", "main", "SPX", "SELL", Decimal(1), "MARKET", None, None, "DAY"))
    report = guard.reconcile(broker, grace=0.0, halt_on_drift=False)
    assert len(report.drift) == 1 and report.halts == [] and guard.halts() == []
    assert notifier.flush()
    (body,) = receiver.bodies()
    assert (body["kind"], body["scope"]) == ("DRIFT", "account=main,symbol=SPX")
    assert body["message"].endswith("paper shows 3 (difference -1)")


def test_guard_with_url_strings_owns_its_notifier_and_closes_it(kit: Kit) -> None:
    receiver = kit.receiver()
    before = set(alert_threads())
    guard = Guard.open(kit.ledger_url, alerts=[receiver.url("/owned")])
    try:
        assert guard.alerts is not None
        (sink,) = guard.alerts.sinks
        assert isinstance(sink, WebhookSink)
        assert len(alert_threads(before)) == 2
        broker = kit.broker()
        guard.submit(make_intent(), broker, policy=ONCE)
        for _ in range(3):
            assert guard.submit(make_intent(), broker, policy=ONCE).blocked
    finally:
        guard.close()  # closing the guard closes the notifier it made: the pending summary goes out
    bodies = receiver.bodies()
    assert [(b["kind"], b["scope"], b["count"]) for b in bodies] == [("BLOCKED", SPX_KEY, 1), ("BLOCKED", SPX_KEY, 2)]
    assert {p.path for p in receiver.posts} == {"/owned"}
    assert alert_threads(before) == []


def test_guard_flushes_but_does_not_close_a_notifier_it_was_given(kit: Kit) -> None:
    sink = Collecting()
    notifier = kit.notifier([sink], interval=60)
    guard = Guard.open(kit.ledger_url, alerts=notifier)
    broker = kit.broker()
    guard.submit(make_intent(), broker, policy=ONCE)
    guard.submit(make_intent(), broker, policy=ONCE)
    guard.submit(make_intent(), broker, policy=ONCE)
    guard.close()
    assert [(a.kind, a.count) for a in sink.alerts] == [(AlertKind.BLOCKED, 1), (AlertKind.BLOCKED, 1)]
    notifier.notify(AlertKind.LEADER, "exclusive=x", "still usable after the guard closed")
    assert notifier.flush()
    assert sink.alerts[-1].message == "still usable after the guard closed"


# ----------------------------------------------------------- runners: stale, mixed, leader


def test_mixed_code_versions_of_one_strategy_alert_once(kit: Kit) -> None:
    old_code, new_code = kit.tmp_path / "strategy_v1.py", kit.tmp_path / "strategy_v2.py"
    old_code.write_text("SIZE = 4\n")
    new_code.write_text("SIZE = 40\n")
    sink = Collecting()
    notifier = kit.notifier([sink], interval=60)
    old = kit.guard(strategy="spx", code=[str(old_code)])
    new = kit.guard(strategy="spx", code=[str(new_code)], alerts=notifier)
    kit.guard(strategy="other", code=[str(old_code)], alerts=notifier)  # another strategy: not its business

    assert notifier.flush()
    (alert,) = sink.alerts
    assert alert.kind is AlertKind.MIXED_VERSIONS and alert.severity == "critical"
    assert alert.scope == "strategy=spx"
    assert alert.details == {"runner": old.runner_id}
    assert old.registration is not None and new.registration is not None
    assert old.registration.fingerprint in alert.message and new.registration.fingerprint in alert.message
    assert "an old runner survived the deploy" in alert.message

    assert new._heartbeat is not None
    new._heartbeat.check_peers()  # a later beat sees the same old runner: flagged once only
    assert notifier.flush()
    assert len(sink.alerts) == 1


def test_a_runner_that_stopped_heartbeating_raises_a_stale_runner_alert(kit: Kit) -> None:
    store = open_store(kit.ledger_url)
    try:
        dead = store.register_runner(RunnerRecord(
            id="dead-runner-1", runner="crashed", strategy="spx", host=this_host(), pid=os.getpid(),
            started="exited", version="0.1.0", fingerprint="none", git_commit=None, modules="", exclusive=None,
            heartbeat_every=0.01,
        ))
        wait_until(lambda: dead.stale(store.now()), what="the registered runner to go stale")
    finally:
        store.close()
    sink = Collecting()
    notifier = kit.notifier([sink], interval=60)
    kit.guard(strategy="spx", alerts=notifier)
    assert notifier.flush()
    (alert,) = sink.alerts
    assert alert.kind is AlertKind.STALE_RUNNER and alert.severity == "warning"
    assert alert.scope == "strategy=spx"
    assert alert.details == {"runner": "dead-runner-1"}
    assert alert.message.startswith("runner crashed on ") and "stopped heartbeating" in alert.message


def test_leader_lease_changing_hands_raises_a_leader_alert(kit: Kit) -> None:
    sink = Collecting()
    notifier = kit.notifier([sink], interval=60)
    options: dict[str, Any] = {"exclusive": "spx", "lease_seconds": 3.0, "heartbeat_every": 0.05, "alerts": notifier}
    leader = Guard.open(kit.ledger_url, synchronous="NORMAL", runner="first", **options)
    try:
        beat = leader._heartbeat
        assert beat is not None
        wait_until(lambda: beat._leading is True, what="the first runner to take the lease")
        standby = kit.guard(runner="second", **options)
        standby_beat = standby._heartbeat
        assert standby_beat is not None
        wait_until(lambda: standby_beat._leading is False, what="the second runner to see it is a standby")
    finally:
        leader.close()  # a clean stop gives the lease up
    wait_until(lambda: any(a.kind is AlertKind.LEADER for a in sink.alerts), what="a LEADER alert")
    assert notifier.flush()
    (alert,) = [a for a in sink.alerts if a.kind is AlertKind.LEADER]
    assert alert.scope == "exclusive=spx" and alert.severity == "info"
    assert alert.message.startswith("runner second on ") and "now leads exclusive 'spx'" in alert.message


# ------------------------------------------------------------------- 2. apprise, URLs


def test_apprise_sink_posts_through_real_apprise_to_the_local_receiver(kit: Kit) -> None:
    receiver = kit.receiver()
    notifier = kit.notifier([f"json://127.0.0.1:{receiver.port}/apprise"], interval=60)
    (sink,) = notifier.sinks
    assert isinstance(sink, AppriseSink)
    notifier.notify(AlertKind.DRIFT, "account=main,symbol=SPX", "position drift in SPX")
    assert notifier.flush()
    (post,) = receiver.posts
    assert post.path == "/apprise"
    assert post.headers["content-type"] == "application/json"
    assert post.body["title"] == "\N{OCTAGONAL SIGN} orderguard DRIFT: account=main,symbol=SPX"
    assert post.body["message"] == "position drift in SPX"
    assert (notifier.sent, notifier.failures) == (1, 0)


def test_apprise_delivery_failure_is_counted_and_logged(kit: Kit, caplog: pytest.LogCaptureFixture) -> None:
    receiver = kit.receiver(status=500)
    notifier = kit.notifier([AppriseSink([f"json://127.0.0.1:{receiver.port}/down"])], interval=60)
    with caplog.at_level(logging.WARNING, logger="orderguard.alerts"):
        notifier.notify(AlertKind.UNKNOWN, "strategy=s,symbol=X", "outcome unknown")
        assert notifier.flush()
    assert len(receiver.posts) == 1  # it reached the receiver, which refused it
    assert (notifier.sent, notifier.failures) == (0, 1)
    assert any(
        r.name == "orderguard.alerts" and r.levelno == logging.WARNING
        and "alert sink apprise failed: OSError: Apprise could not deliver" in r.getMessage()
        for r in caplog.records
    )


def test_apprise_unknown_scheme_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"scheme 'nosuchscheme'://"):
        AppriseSink(["nosuchscheme://somewhere/x"])
    with pytest.raises(ConfigurationError, match="nosuchscheme"):
        sink_from_url("nosuchscheme://somewhere/x")
    with pytest.raises(ConfigurationError, match="nosuchscheme"):
        Notifier(["log://", "nosuchscheme://somewhere/x"])


def test_sink_from_url_maps_schemes_to_sinks() -> None:
    assert isinstance(sink_from_url("log://"), LogSink)
    assert isinstance(sink_from_url("log"), LogSink)
    http = sink_from_url("http://127.0.0.1:9/hook")
    https = sink_from_url("https://alerts.example.com/hook?key=k")
    assert isinstance(http, WebhookSink) and http.url == "http://127.0.0.1:9/hook"
    assert isinstance(https, WebhookSink) and https.url == "https://alerts.example.com/hook?key=k"
    assert isinstance(sink_from_url("json://127.0.0.1:9/x"), AppriseSink)
    assert isinstance(sink_from_url("tgram://123456789:abcdefg_hijklmnop/12315544/"), AppriseSink)
    # No sinks at all: alerts still go somewhere, the log.
    notifier = Notifier([])
    try:
        (only,) = notifier.sinks
        assert isinstance(only, LogSink)
    finally:
        notifier.close()


# ---------------------------------------------------------------- 3. storm aggregation


def test_storm_of_700_duplicate_submits_from_threads_is_one_alert_and_one_summary_per_scope(kit: Kit) -> None:
    receiver = kit.receiver()
    notifier = kit.notifier([WebhookSink(receiver.url())], interval=60)
    guard = kit.guard(alerts=notifier)
    broker = kit.broker()
    spx, ndx = make_intent(symbol="SPX"), make_intent(symbol="NDX")
    assert guard.submit(spx, broker, policy=ONCE).sent and guard.submit(ndx, broker, policy=ONCE).sent

    storm = [spx, ndx] * 700
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda intent: guard.submit(intent, broker, policy=ONCE), storm))
    assert {r.outcome for r in results} == {Outcome.BLOCKED}
    assert {r.reason for r in results} == {BlockReason.DUPLICATE}
    assert len(broker.orders()) == 2

    assert notifier.flush()
    bodies = receiver.bodies()
    assert len(bodies) == 4, [(b["scope"], b["count"]) for b in bodies]
    for key in (SPX_KEY, NDX_KEY):
        immediate, summary = [b for b in bodies if b["scope"] == key]
        assert (immediate["kind"], immediate["count"], immediate["first_at"]) == ("BLOCKED", 1, None)
        assert (summary["kind"], summary["count"]) == ("BLOCKED", 699)
        assert summary["title"].endswith(f"orderguard BLOCKED ×699: {key}")
        assert summary["body"].startswith(f"699 BLOCKED events for {key} in ")
        assert len([a for a in guard.attempts(blocked=True, limit=10_000) if a.scope_key == key]) == 700
    assert notifier.sent == 4 and notifier.dropped == 0


def test_storm_of_notifies_is_summarised_at_the_interval_then_the_window_closes(kit: Kit) -> None:
    receiver = kit.receiver()
    notifier = kit.notifier([WebhookSink(receiver.url())], interval=1.0)
    for i in range(700):
        notifier.notify(AlertKind.BLOCKED, "scope-a", f"a #{i}")
        notifier.notify(AlertKind.BLOCKED, "scope-b", f"b #{i}")

    # No flush: the ticker sends each scope's summary when its interval ends.
    bodies = receiver.wait_for(4)
    summaries_seen_at = time.time()
    assert notifier.flush()  # nothing else was pending
    assert receiver.bodies() == bodies and notifier.sent == 4
    for scope, tag in (("scope-a", "a"), ("scope-b", "b")):
        immediate, summary = [b for b in bodies if b["scope"] == scope]
        assert (immediate["count"], immediate["first_at"], immediate["message"]) == (1, None, f"{tag} #0")
        assert (summary["count"], summary["message"]) == (699, f"{tag} #699")
        assert summary["first_at"] == immediate["at"]
        assert summary["at"] >= immediate["at"]

    # An interval with no new events closes the window: the next alert goes out at once
    # (an immediate alert has no first_at; a summary would).
    wait_until(lambda: time.time() > summaries_seen_at + notifier.interval + 0.05, what="the window to close")
    notifier.notify(AlertKind.BLOCKED, "scope-a", "a again")
    again = receiver.wait_for(5)[4]
    assert (again["scope"], again["count"], again["first_at"], again["message"]) == ("scope-a", 1, None, "a again")

    # More events in the new window wait for its end; flush() sends their summary now.
    for i in range(3):
        notifier.notify(AlertKind.BLOCKED, "scope-a", f"a more {i}")
    assert notifier.flush()
    bodies = receiver.bodies()
    assert len(bodies) == 6
    assert (bodies[5]["scope"], bodies[5]["count"], bodies[5]["message"]) == ("scope-a", 3, "a more 2")
    # ... and only once: a second flush has nothing left to send.
    assert notifier.flush()
    assert len(receiver.bodies()) == 6


def test_aggregation_is_per_kind_and_scope() -> None:
    sink = Collecting()
    notifier = Notifier([sink], interval=60)
    try:
        for _ in range(3):
            notifier.notify(AlertKind.BLOCKED, "s1", "m")
            notifier.notify(AlertKind.HALTED, "s1", "m")
            notifier.notify(AlertKind.BLOCKED, "s2", "m")
        assert notifier.flush()
    finally:
        notifier.close()
    got = sorted((a.kind.value, a.scope, a.count) for a in sink.alerts)
    assert got == [
        ("BLOCKED", "s1", 1), ("BLOCKED", "s1", 2), ("BLOCKED", "s2", 1), ("BLOCKED", "s2", 2),
        ("HALTED", "s1", 1), ("HALTED", "s1", 2),
    ]


def test_a_storm_longer_than_the_interval_loses_no_events() -> None:
    sink = Collecting()
    notifier = Notifier([sink], interval=0.05)
    sent = 0
    try:
        deadline = time.monotonic() + 0.6  # about 12 interval boundaries inside the storm
        while time.monotonic() < deadline:
            notifier.notify(AlertKind.BLOCKED, "scope", "duplicate")
            sent += 1
    finally:
        notifier.close()
    # Every event is either an immediate alert or counted in a summary.
    assert sum(a.count for a in sink.alerts) == sent


# ------------------------------------------------------- 4. failing sinks, full queues


def test_raising_and_blocked_sinks_never_block_or_fail_submits(kit: Kit) -> None:
    raising, blocking, collecting = Raising(), kit.blocking(), Collecting()
    notifier = kit.notifier([raising, blocking, collecting], interval=60)
    guard = kit.guard(alerts=notifier)
    broker = kit.broker()
    lossy = kit.broker(faults=PaperFaults(lose_ack=1))

    assert guard.submit(make_intent(symbol="SPX"), broker, policy=ONCE).state is State.FILLED
    first_dup = guard.submit(make_intent(symbol="SPX"), broker, policy=ONCE)
    assert first_dup.reason is BlockReason.DUPLICATE
    assert blocking.entered.wait(WAIT), "the alert never reached the blocking sink"

    # The notifier's thread is stuck in the blocking sink. The order path does not notice.
    results = [
        guard.submit(make_intent(symbol="SPX"), broker, policy=ONCE),
        guard.submit(make_intent(symbol="NDX"), broker, policy=ONCE),
        guard.submit(make_intent(symbol="NDX"), broker, policy=ONCE),
        guard.submit(make_intent(symbol="RUT"), lossy, policy=ONCE),
    ]
    assert [(r.outcome, r.reason) for r in results] == [
        (Outcome.BLOCKED, BlockReason.DUPLICATE), (Outcome.SENT, None),
        (Outcome.BLOCKED, BlockReason.DUPLICATE), (Outcome.SENT, None),
    ]
    assert results[1].state is State.FILLED and results[3].state is State.UNKNOWN
    assert [o.symbol for o in broker.orders()] == ["SPX", "NDX", "RUT"]
    assert not blocking.release.is_set() and blocking.alerts == [] and collecting.alerts == []
    assert raising.calls == 1 and notifier.failures == 1  # it failed before the blocking sink

    blocking.release.set()
    assert notifier.flush()
    expected = [
        (AlertKind.BLOCKED, SPX_KEY, 1), (AlertKind.BLOCKED, NDX_KEY, 1),
        (AlertKind.UNKNOWN, "strategy=spx-calendar,symbol=RUT", 1), (AlertKind.BLOCKED, SPX_KEY, 1),
    ]
    assert [(a.kind, a.scope, a.count) for a in collecting.alerts] == expected
    assert [(a.kind, a.scope, a.count) for a in blocking.alerts] == expected
    assert collecting.alerts[3].first_at is not None  # the last one is the summary
    assert raising.calls == 4 and notifier.failures == 4 and notifier.sent == 8


def test_a_guard_whose_only_sink_raises_still_submits_and_blocks(kit: Kit) -> None:
    raising = Raising()
    guard = kit.guard(alerts=[raising])
    broker = kit.broker()
    assert guard.submit(make_intent(), broker, policy=ONCE).sent
    assert guard.submit(make_intent(), broker, policy=ONCE).reason is BlockReason.DUPLICATE
    assert guard.alerts is not None and guard.alerts.flush()
    assert (raising.calls, guard.alerts.failures, guard.alerts.sent) == (1, 1, 0)
    assert len(broker.orders()) == 1


def test_webhook_to_a_closed_port_is_a_logged_failure_not_an_error(
    kit: Kit, caplog: pytest.LogCaptureFixture
) -> None:
    port = closed_port()
    sink = WebhookSink(f"http://127.0.0.1:{port}/hook?token=topsecret", timeout=2.0)
    notifier = kit.notifier([sink], interval=60)
    with caplog.at_level(logging.WARNING, logger="orderguard.alerts"):
        notifier.notify(AlertKind.HALTED, "global", "halted")
        assert notifier.flush()
    assert (notifier.sent, notifier.failures) == (0, 1)
    (record,) = [r for r in caplog.records if r.name == "orderguard.alerts"]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(f"alert sink webhook http://127.0.0.1:{port}/hook failed: URLError")
    assert "topsecret" not in caplog.text


def test_webhook_http_500_is_a_logged_failure_not_an_error(kit: Kit, caplog: pytest.LogCaptureFixture) -> None:
    receiver = kit.receiver(status=500)
    notifier = kit.notifier([WebhookSink(receiver.url("/hook?token=topsecret"))], interval=60)
    with caplog.at_level(logging.WARNING, logger="orderguard.alerts"):
        notifier.notify(AlertKind.DRIFT, "account=main,symbol=SPX", "drift")
        notifier.notify(AlertKind.UNKNOWN, "strategy=s,symbol=SPX", "unknown")
        assert notifier.flush()
    assert [b["kind"] for b in receiver.bodies()] == ["DRIFT", "UNKNOWN"]
    assert (notifier.sent, notifier.failures) == (0, 2)
    messages = [r.getMessage() for r in caplog.records if r.name == "orderguard.alerts"]
    assert len(messages) == 2
    assert all(m.startswith(f"alert sink webhook {receiver.url()} failed: HTTPError") and "500" in m for m in messages)
    assert "topsecret" not in caplog.text


def test_a_full_queue_drops_alerts_instead_of_blocking(kit: Kit) -> None:
    blocking = kit.blocking()
    notifier = kit.notifier([blocking], interval=60, queue_size=2)
    notifier.notify(AlertKind.BLOCKED, "s0", "m0")
    assert blocking.entered.wait(WAIT)  # s0 is in the (stuck) sink; the queue is empty

    def storm() -> None:
        for i in range(1, 6):
            notifier.notify(AlertKind.BLOCKED, f"s{i}", f"m{i}")

    caller = threading.Thread(target=storm, name="test-notify-storm", daemon=True)
    caller.start()
    caller.join(WAIT)
    assert not caller.is_alive(), "notify() blocked on a full queue"
    assert notifier.dropped == 3  # s1 and s2 fill the queue; s3, s4, s5 are dropped

    # A guard on this notifier keeps submitting while its alerts are dropped.
    guard = kit.guard(alerts=notifier)
    broker = kit.broker()
    assert guard.submit(make_intent(), broker, policy=ONCE).sent
    assert guard.submit(make_intent(), broker, policy=ONCE).reason is BlockReason.DUPLICATE
    assert notifier.dropped == 4 and len(broker.orders()) == 1

    blocking.release.set()
    assert notifier.flush()
    assert [a.scope for a in blocking.alerts] == ["s0", "s1", "s2"]
    assert notifier.sent == 3


# --------------------------------------------------------- 5. log sink, wording, webhook URL


def test_log_sink_writes_error_for_critical_and_warning_otherwise(caplog: pytest.LogCaptureFixture) -> None:
    sink = LogSink()
    levels: dict[AlertKind, int] = {}
    with caplog.at_level(logging.DEBUG, logger="orderguard.alerts"):
        for kind in AlertKind:
            caplog.clear()
            sink.send(Alert(kind, "strategy=spx", f"{kind.value} happened"))
            (record,) = caplog.records
            assert record.name == "orderguard.alerts"
            assert record.getMessage().endswith(f"orderguard {kind.value}: strategy=spx — {kind.value} happened")
            assert record.__dict__["alert"] == kind.value
            levels[kind] = record.levelno
    assert levels == {
        AlertKind.BLOCKED: logging.WARNING, AlertKind.HALTED: logging.ERROR, AlertKind.UNKNOWN: logging.ERROR,
        AlertKind.DRIFT: logging.ERROR, AlertKind.STALE_RUNNER: logging.WARNING,
        AlertKind.MIXED_VERSIONS: logging.ERROR, AlertKind.LEADER: logging.WARNING,
    }


def test_log_sink_through_a_notifier_and_a_guard(kit: Kit, caplog: pytest.LogCaptureFixture) -> None:
    notifier = kit.notifier(["log://"], interval=60)
    guard = kit.guard(alerts=notifier)
    broker = kit.broker(faults=PaperFaults(lose_ack=1))
    with caplog.at_level(logging.WARNING, logger="orderguard.alerts"):
        assert guard.submit(make_intent(), broker, policy=ONCE).state is State.UNKNOWN
        assert guard.submit(make_intent(), broker, policy=ONCE).reason is BlockReason.UNKNOWN_PENDING
        assert notifier.flush()
    records = [r for r in caplog.records if r.name == "orderguard.alerts"]
    assert [(r.levelno, r.__dict__["alert"]) for r in records] == [
        (logging.ERROR, "UNKNOWN"), (logging.WARNING, "BLOCKED"),
    ]
    assert "ORDER OUTCOME UNKNOWN" in records[0].getMessage()
    assert "BLOCKED UNKNOWN_PENDING" in records[1].getMessage()


def test_log_sink_uses_the_logger_it_is_given(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="desk.alerts"):
        LogSink(logging.getLogger("desk.alerts")).send(Alert(AlertKind.DRIFT, "account=a,symbol=X", "drift"))
    (record,) = caplog.records
    assert (record.name, record.levelno) == ("desk.alerts", logging.ERROR)


def test_alert_wording_single_and_summary() -> None:
    single = Alert(AlertKind.UNKNOWN, "strategy=spx,symbol=SPX", "ORDER OUTCOME UNKNOWN: x", at=1000.0)
    assert single.title == "\N{OCTAGONAL SIGN} orderguard UNKNOWN: strategy=spx,symbol=SPX"
    assert single.body == "ORDER OUTCOME UNKNOWN: x"

    summary = Alert(AlertKind.BLOCKED, "once|strategy=spx|@ever", "the last one", at=1042.4, count=699, first_at=1000.0)
    assert summary.title == "\N{WARNING SIGN} orderguard BLOCKED ×699: once|strategy=spx|@ever"
    assert summary.body == "699 BLOCKED events for once|strategy=spx|@ever in 42s; the last: the last one"
    assert summary.to_json() == {
        "kind": "BLOCKED", "scope": "once|strategy=spx|@ever", "message": "the last one", "at": 1042.4,
        "count": 699, "first_at": 1000.0, "details": {}, "severity": "warning",
        "title": summary.title, "body": summary.body,
    }
    json.dumps(summary.to_json())  # serialisable as is

    leader = Alert(AlertKind.LEADER, "exclusive=spx", "now leads")
    assert leader.severity == "info" and leader.title.startswith("\N{INFORMATION SOURCE} orderguard LEADER")


def test_webhook_sink_url_checks_and_name_hides_the_query() -> None:
    for bad in ("ftp://example.com/hook", "json://127.0.0.1/x", "example.com/hook", "log://", ""):
        with pytest.raises(ConfigurationError, match="must start with http:// or https://"):
            WebhookSink(bad)
    sink = WebhookSink("https://hooks.example.com/services/T1/B2?token=xoxb-secret&channel=ops")
    assert sink.name == "webhook https://hooks.example.com/services/T1/B2"
    assert "secret" not in sink.name and "token" not in sink.name
    assert sink.url.endswith("?token=xoxb-secret&channel=ops")  # the request still carries it


# ------------------------------------------------------------------------------ 6. close


def test_close_delivers_pending_summaries_and_stops_the_threads(kit: Kit) -> None:
    receiver = kit.receiver()
    before = set(alert_threads())
    notifier = Notifier([WebhookSink(receiver.url())], interval=60)
    assert sorted(t.name for t in alert_threads(before)) == sorted(ALERT_THREADS)
    for i in range(5):
        notifier.notify(AlertKind.BLOCKED, "scope", f"#{i}")
    notifier.close()
    bodies = receiver.bodies()
    assert [(b["count"], b["message"]) for b in bodies] == [(1, "#0"), (4, "#4")]
    assert alert_threads(before) == []

    notifier.notify(AlertKind.HALTED, "global", "after close")  # ignored, never raises
    notifier.close()  # twice is fine
    assert len(receiver.bodies()) == 2 and notifier.sent == 2


def test_close_with_a_full_queue_still_stops_the_sender_once_the_sink_frees_up(kit: Kit) -> None:
    blocking = kit.blocking()
    before = set(alert_threads())
    notifier = Notifier([blocking], interval=60, queue_size=1)
    notifier.notify(AlertKind.BLOCKED, "s0", "m0")
    assert blocking.entered.wait(WAIT)
    notifier.notify(AlertKind.BLOCKED, "s1", "m1")  # fills the queue
    assert notifier.dropped == 0
    notifier.close(timeout=0.2)  # the sink is stuck: close gives up waiting
    blocking.release.set()
    wait_until(lambda: [a.scope for a in blocking.alerts] == ["s0", "s1"], what="the queued alert")
    assert notifier.dropped == 0  # no alert was dropped
    for thread in alert_threads(before):
        thread.join(5)
    assert alert_threads(before) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")
def test_a_forked_child_delivers_its_own_alerts() -> None:
    """A worker forked from a process with a notifier (multiprocessing's fork) gets working
    sender threads of its own: without them its alerts would silently never leave."""
    read, write = os.pipe()
    sink = Collecting()
    notifier = Notifier([sink], interval=60)
    notifier.notify(AlertKind.BLOCKED, "parent-scope", "from the parent")
    assert notifier.flush(5)
    pid = os.fork()
    if pid == 0:  # the child: report what its own notifier delivered, then leave at once
        try:
            notifier.notify(AlertKind.BLOCKED, "child-scope", "from the child")
            ok = notifier.flush(5)
            os.write(write, f"{ok} {[a.scope for a in sink.alerts]}".encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    report = os.read(read, 1000).decode()
    os.close(read)
    assert report == "True ['parent-scope', 'child-scope']", report
    assert [a.scope for a in sink.alerts] == ["parent-scope"]  # the parent's copy is its own
    notifier.close()
