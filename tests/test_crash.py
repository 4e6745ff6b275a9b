"""Crash and pause tests with real processes: kill -9 and SIGSTOP at named points.

Each child is ``sys.executable -c CHILD`` with ``ORDERGUARD_CRASH_AT`` or ``ORDERGUARD_PAUSE_AT``
set; it opens the SQLite ledger and the paper venue (files under ``tmp_path``) and submits one
intent (or runs the reconciler). Nothing is mocked: what the venue's order log holds is what
was sent, and the ledger is read back from its file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from orderguard import BlockReason, Ever, Guard, OncePer, Outcome, State, _crash
from orderguard.brokers import OrderStatus, PaperBroker

from .helpers import finish as _finish
from .helpers import make_intent
from .helpers import wait_stopped as _wait_stopped

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
POLICY = OncePer(Ever())
STALE = 0.3  # reconcile(stale_after=...) in these tests: the children are dead or frozen
GRACE = 0.2  # reconcile(grace=...): the paper venue has no lookup lag here
FILL_DELAY = 0.6  # after_ack_recorded: the ack is recorded before the fill
CHILD_TIMEOUT = 20.0

# argv[1] is a JSON config; the child prints one JSON line with what it saw.
CHILD = r"""
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
from orderguard import Ever, Guard, OncePer
from orderguard.brokers import PaperBroker, PaperFaults
from tests.helpers import make_intent

cfg = json.loads(sys.argv[1])
guard = Guard.open(cfg["ledger"], synchronous="NORMAL", **cfg.get("guard", {}))
broker = PaperBroker.open(cfg["paper"], faults=PaperFaults(**cfg.get("faults", {})), **cfg.get("broker", {}))
if cfg["mode"] == "submit":
    result = guard.submit(make_intent(), broker, policy=OncePer(Ever()))
    rec = guard.intent(result.intent.id) if result.intent else None
    out = {
        "outcome": result.outcome.value,
        "state": None if result.state is None else result.state.value,
        "fence": None if result.intent is None else result.intent.fence,
        "client_order_id": result.client_order_id,
        "ledger_state": None if rec is None else rec.state.value,
        "ledger_fence": None if rec is None else rec.fence,
    }
else:
    report = guard.reconcile(broker, grace=cfg["grace"], stale_after=cfg["stale_after"])
    out = {"lines": report.lines()}
print(json.dumps(out), flush=True)
"""


# ----------------------------------------------------------------------------- helpers


class Children:
    """Starts children and makes sure none outlives the test."""

    def __init__(self, ledger_url: str, paper_url: str) -> None:
        self.ledger_url, self.paper_url = ledger_url, paper_url
        self.procs: list[subprocess.Popen[str]] = []

    def start(
        self, mode: str = "submit", *, crash_at: str | None = None, pause_at: str | None = None, **cfg: Any
    ) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("ORDERGUARD_CRASH_AT", "ORDERGUARD_PAUSE_AT")}
        if crash_at:
            env["ORDERGUARD_CRASH_AT"] = crash_at
        if pause_at:
            env["ORDERGUARD_PAUSE_AT"] = pause_at
        config = {"ledger": self.ledger_url, "paper": self.paper_url, "mode": mode, **cfg}
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(config)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()  # SIGKILL also ends a stopped process
            with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
                proc.communicate(timeout=10)


@pytest.fixture
def children(ledger_url: str, paper_url: str) -> Iterator[Children]:
    kids = Children(ledger_url, paper_url)
    try:
        yield kids
    finally:
        kids.kill_all()






def only_intent(guard: Guard) -> Any:
    records = guard.intents()
    assert len(records) == 1, [(r.client_order_id, r.state) for r in records]
    return records[0]


def wait_older_than(guard: Guard, created_at: float, seconds: float) -> None:
    while guard.store.now() - created_at <= seconds:
        time.sleep(0.02)


def assert_agrees(guard: Guard, broker: PaperBroker) -> None:
    """Every intent's ledger row matches the venue's order under its client order id."""
    for rec in guard.intents():
        venue = broker.orders(rec.client_order_id)
        assert len(venue) <= 1, f"{rec.client_order_id} was sent {len(venue)} times"
        if not venue:
            assert rec.state in (State.NOT_FOUND, State.ABANDONED), (rec.client_order_id, rec.state)
            assert rec.released
            continue
        order = venue[0]
        assert rec.state is order.status.state, (rec.client_order_id, rec.state, order.status)
        assert rec.filled_quantity == order.filled_quantity
        assert rec.broker_order_id == order.broker_order_id


# ----------------------------------------------------------------------- 1. kill -9


@pytest.mark.parametrize("point", _crash.POINTS)
def test_kill9_then_reconcile_then_retry(point: str, children: Children, ledger_url: str, paper_url: str) -> None:
    broker_opts = {"fill_delay": FILL_DELAY} if point == "after_ack_recorded" else {}
    guard = Guard.open(ledger_url, synchronous="NORMAL")
    broker = PaperBroker.open(paper_url, **broker_opts)
    try:
        if point == "reconcile_after_lookup":
            # An intent whose ack was lost (UNKNOWN), then a reconciler killed after its lookup.
            rc, out, err = finish(children.start(faults={"lose_ack": 1}))
            assert rc == 0, err
            assert out is not None
            assert out["outcome"] == "SENT" and out["ledger_state"] == "UNKNOWN", out
            wait_older_than(guard, only_intent(guard).created_at, STALE)
            rc, out, err = finish(children.start("reconcile", crash_at=point, grace=GRACE, stale_after=STALE))
            assert rc == -signal.SIGKILL, (rc, out, err)
            assert out is None  # it died before it could report anything
            assert only_intent(guard).state is State.UNKNOWN  # looked up, never recorded
        else:
            rc, out, err = finish(children.start(crash_at=point, broker=broker_opts))
            assert rc == -signal.SIGKILL, (rc, out, err)
            assert out is None

        before = only_intent(guard)
        expected_before = {
            "after_claim_commit": State.SENDING,
            "after_send": State.SENDING,
            "after_ack_recorded": State.ACKED,
            "reconcile_after_lookup": State.UNKNOWN,
        }[point]
        assert before.state is expected_before
        sent = point != "after_claim_commit"
        assert len(broker.orders()) == (1 if sent else 0)

        if point == "after_ack_recorded":
            # The ack was recorded before the fill; wait for the venue to fill it.
            deadline = time.monotonic() + 10
            while broker.orders()[0].status is not OrderStatus.FILLED:
                assert time.monotonic() < deadline, "the paper venue never filled the order"
                time.sleep(0.05)
        wait_older_than(guard, before.created_at, STALE)

        # A fresh reconciler (this process: no crash point armed here) resolves it.
        report = guard.reconcile(broker, grace=GRACE, stale_after=STALE)
        assert report.clean, report.lines()
        after = guard.intent(before.id)
        assert after.fence > before.fence  # the reconciler took the intent over
        orders = broker.orders()
        assert len(orders) == (1 if sent else 0), orders
        if sent:
            assert orders[0].client_order_id == before.client_order_id
            assert orders[0].status is OrderStatus.FILLED
            assert after.state is State.FILLED
            assert after.filled_quantity == Decimal(4) == orders[0].filled_quantity
            assert not after.released
        else:
            assert after.state is State.NOT_FOUND
            assert after.released
        assert [d.after for d in report.decisions][-1] is after.state
        assert_agrees(guard, broker)

        # Retry the same intent.
        retry = guard.submit(make_intent(), broker, policy=POLICY)
        orders = broker.orders()
        if sent:
            assert retry.outcome is Outcome.BLOCKED, retry.message
            assert retry.reason is BlockReason.DUPLICATE, retry.message
            assert retry.holder is not None and retry.holder.id == before.id
            assert len(orders) == 1
            blocked = guard.attempts(blocked=True)
            assert [(a.id, a.reason, a.holder_id) for a in blocked] == [
                (retry.attempt_id, BlockReason.DUPLICATE, before.id)
            ]
        else:
            assert retry.outcome is Outcome.SENT, retry.message
            assert retry.client_order_id != before.client_order_id
            assert len(orders) == 1
            assert orders[0].client_order_id == retry.client_order_id
        assert_agrees(guard, broker)
    finally:
        broker.close()
        guard.close()


# ------------------------------------------------------------------ 2. SIGSTOP fencing


def test_paused_after_send_is_fenced_out_by_the_reconciler(
    children: Children, guard: Guard, broker: PaperBroker
) -> None:
    proc = children.start(pause_at="after_send")
    wait_stopped(proc)

    # The venue has the order; the ledger still says SENDING.
    rec = only_intent(guard)
    assert rec.state is State.SENDING
    orders = broker.orders()
    assert [o.client_order_id for o in orders] == [rec.client_order_id]

    wait_older_than(guard, rec.created_at, STALE)
    report = guard.reconcile(broker, grace=GRACE, stale_after=STALE)
    assert report.clean, report.lines()
    decided = guard.intent(rec.id)
    assert decided.state is State.FILLED
    assert decided.fence > rec.fence

    os.kill(proc.pid, signal.SIGCONT)
    rc, out, err = finish(proc)
    assert rc == 0, err
    assert out is not None, err
    assert "late report refused by the fence" in err, err
    # The child's result shows the reconciler's decision, not its own late report.
    assert out["outcome"] == "SENT"
    assert out["client_order_id"] == rec.client_order_id
    assert (out["state"], out["fence"]) == ("FILLED", decided.fence)
    assert (out["ledger_state"], out["ledger_fence"]) == ("FILLED", decided.fence)

    final = guard.intent(rec.id)
    assert final == decided  # not a field touched after the reconciler's write
    assert len(broker.orders()) == 1
    assert_agrees(guard, broker)


# ------------------------------------------------------ 3. paused before the send


def test_paused_before_send_does_not_send_after_the_scope_was_freed(
    children: Children, ledger_url: str, paper_url: str
) -> None:
    deadline_opts = {"send_deadline": 1, "stale_after": 2}
    guard = Guard.open(ledger_url, synchronous="NORMAL", **deadline_opts)
    broker = PaperBroker.open(paper_url)
    try:
        proc = children.start(pause_at="after_claim_commit", guard=deadline_opts)
        wait_stopped(proc)
        stale = only_intent(guard)
        assert stale.state is State.SENDING
        assert broker.orders() == []

        # The owner is alive (stopped), so the intent is given up only stale_after past the
        # send deadline recorded with it; the owner's own deadline check then refuses to send.
        assert stale.send_by_at is not None
        wait_older_than(guard, stale.send_by_at, guard.stale_after)
        report = guard.reconcile(broker, grace=GRACE)  # stale_after: the guard's 2 s
        assert report.clean, report.lines()
        freed = guard.intent(stale.id)
        assert freed.state is State.NOT_FOUND
        assert freed.released
        assert freed.fence > stale.fence

        fresh = guard.submit(make_intent(), broker, policy=POLICY)
        assert fresh.outcome is Outcome.SENT, fresh.message
        assert fresh.client_order_id != stale.client_order_id
        assert [o.client_order_id for o in broker.orders()] == [fresh.client_order_id]

        os.kill(proc.pid, signal.SIGCONT)
        rc, out, err = finish(proc)
        assert rc == 0, err
        assert out is not None, err
        assert out["outcome"] == "NOT_SENT", (out, err)
        assert out["client_order_id"] == stale.client_order_id
        # Its abandon() came too late: it sees the reconciler's NOT_FOUND, under the new fence.
        assert (out["state"], out["fence"]) == ("NOT_FOUND", freed.fence)
        assert "late report refused by the fence" in err, err

        orders = broker.orders()
        assert [o.client_order_id for o in orders] == [fresh.client_order_id]
        assert broker.orders(stale.client_order_id) == []
        assert guard.intent(stale.id) == freed  # the child's abandon() was fenced out
        assert fresh.intent is not None
        assert guard.intent(fresh.intent.id).state is State.FILLED
        assert_agrees(guard, broker)
    finally:
        broker.close()
        guard.close()


def finish(proc: subprocess.Popen[str]) -> tuple[int, dict[str, Any] | None, str]:
    return _finish(proc, CHILD_TIMEOUT)


def wait_stopped(proc: subprocess.Popen[str], timeout: float = CHILD_TIMEOUT) -> None:
    _wait_stopped(proc, timeout)
