"""Reconciliation through Guard + PaperBroker: UNKNOWN is resolved only by asking the venue.

Nothing is mocked: the ledger and the paper venue are real SQLite files, the venue's faults
(lost ack, disconnect, lookup lag) are the PaperBroker's own, and "how many orders were sent"
is read from the venue's order log.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from orderguard import BlockReason, Ever, FencedOut, Guard, OncePer, Outcome, State, SubmitResult
from orderguard.brokers import OrderRequest, OrderStatus, PaperBroker, PaperFaults, Position, VenueDedupe
from orderguard.reconcile import Drift

from .helpers import dead_caller, make_intent

POLICY = OncePer(Ever())
LAG = 0.3  # the venue's lookup lag, where there is one
GRACE = 0.6  # reconcile(grace=...): longer than the lag
DEDUPES = list(VenueDedupe)


def only_intent(guard: Guard) -> Any:
    records = guard.intents()
    assert len(records) == 1, [(r.client_order_id, r.state) for r in records]
    return records[0]


def assert_blocked_unknown_pending(result: SubmitResult, holder_id: str) -> None:
    assert result.outcome is Outcome.BLOCKED
    assert result.reason is BlockReason.UNKNOWN_PENDING
    assert result.holder is not None
    assert result.holder.id == holder_id
    assert result.holder.state is State.UNKNOWN
    assert result.intent is None


# ------------------------------------------------------------------ ack lost after accept


@pytest.mark.parametrize("lag", [0.0, LAG], ids=["no-lag", "lag"])
@pytest.mark.parametrize("dedupe", DEDUPES, ids=[d.value for d in DEDUPES])
def test_lost_ack_is_unknown_blocks_retries_and_reconciles_to_filled(
    guard: Guard, open_broker: Callable[..., PaperBroker], dedupe: VenueDedupe, lag: float
) -> None:
    broker = open_broker(dedupe=dedupe, faults=PaperFaults(lose_ack=1, lookup_lag=lag))
    intent = make_intent()

    first = guard.submit(intent, broker, policy=POLICY)
    assert first.outcome is Outcome.SENT
    assert first.state is State.UNKNOWN
    assert first.order is None
    rec = only_intent(guard)
    assert rec.state is State.UNKNOWN
    assert "AmbiguousOutcome" in (rec.note or "")
    assert len(broker.orders()) == 1  # the venue has it; the ledger does not know

    retry = guard.submit(intent, broker, policy=POLICY)
    assert_blocked_unknown_pending(retry, rec.id)
    assert len(broker.orders()) == 1  # nothing sent
    blocked = guard.attempts(blocked=True)
    assert [(a.reason, a.holder_id) for a in blocked] == [(BlockReason.UNKNOWN_PENDING, rec.id)]

    if lag:
        # A reconcile that does not wait sees nothing yet: one miss proves nothing.
        early = guard.reconcile(broker, grace=GRACE, wait=False)
        assert early.decisions == []
        assert len(early.unresolved) == 1
        assert early.unresolved[0].before is State.UNKNOWN
        assert early.unresolved[0].after is None
        assert "not found once" in early.unresolved[0].why
        still = guard.intent(rec.id)
        assert still.state is State.UNKNOWN
        assert still.first_miss_at is not None
        assert still.fence == rec.fence  # nothing decided, nothing taken over
        assert_blocked_unknown_pending(guard.submit(intent, broker, policy=POLICY), rec.id)

    report = guard.reconcile(broker, grace=GRACE)
    assert [(d.intent_id, d.before, d.after) for d in report.decisions] == [(rec.id, State.UNKNOWN, State.FILLED)]
    assert report.unresolved == []
    assert report.drift == []
    assert report.clean

    venue = broker.orders()
    assert len(venue) == 1
    done = guard.intent(rec.id)
    assert done.state is State.FILLED
    assert done.filled_quantity == Decimal(4)
    assert done.average_price == Decimal(100)
    assert done.broker_order_id == venue[0].broker_order_id
    assert done.fence > rec.fence  # the reconciler took it over

    again = guard.submit(intent, broker, policy=POLICY)
    assert again.outcome is Outcome.BLOCKED
    assert again.reason is BlockReason.DUPLICATE
    assert len(broker.orders()) == 1
    assert broker.positions() == [Position("main", "SPX", Decimal(4))]


@pytest.mark.parametrize("dedupe", DEDUPES, ids=[d.value for d in DEDUPES])
def test_waiting_reconcile_sleeps_out_the_lookup_lag_in_one_run(
    guard: Guard, open_broker: Callable[..., PaperBroker], dedupe: VenueDedupe
) -> None:
    broker = open_broker(dedupe=dedupe, faults=PaperFaults(lose_ack=1, lookup_lag=LAG))
    result = guard.submit(make_intent(), broker, policy=POLICY)
    assert result.state is State.UNKNOWN
    assert broker.lookup(result.client_order_id or "") is None  # still hidden by the lag

    report = guard.reconcile(broker, grace=GRACE)
    assert [(d.before, d.after) for d in report.decisions] == [(State.UNKNOWN, State.FILLED)]
    assert report.unresolved == []
    rec = only_intent(guard)
    assert rec.state is State.FILLED
    assert rec.first_miss_at is not None  # it was missed once, then found
    assert len(broker.orders()) == 1


def test_lost_ack_of_an_open_order_reconciles_to_acked_then_filled(
    guard: Guard, open_broker: Callable[..., PaperBroker]
) -> None:
    broker = open_broker(fill_delay=0.5, faults=PaperFaults(lose_ack=1))
    result = guard.submit(make_intent(), broker, policy=POLICY)
    assert result.state is State.UNKNOWN
    report = guard.reconcile(broker, grace=GRACE)
    assert [(d.before, d.after) for d in report.decisions] == [(State.UNKNOWN, State.ACKED)]
    assert only_intent(guard).state is State.ACKED
    time.sleep(0.55)
    report = guard.reconcile(broker, grace=GRACE)
    assert [(d.before, d.after) for d in report.decisions] == [(State.ACKED, State.FILLED)]
    assert only_intent(guard).state is State.FILLED
    assert len(broker.orders()) == 1


# ------------------------------------------------------------------ never reached the venue


@pytest.mark.parametrize("dedupe", DEDUPES, ids=[d.value for d in DEDUPES])
def test_disconnect_reconciles_to_not_found_after_two_lookups_then_frees_the_scope(
    guard: Guard, open_broker: Callable[..., PaperBroker], dedupe: VenueDedupe
) -> None:
    broker = open_broker(dedupe=dedupe, faults=PaperFaults(disconnect=1, lookup_lag=LAG))
    intent = make_intent()
    first = guard.submit(intent, broker, policy=POLICY)
    assert first.outcome is Outcome.SENT
    assert first.state is State.UNKNOWN
    assert broker.orders() == []
    rec = only_intent(guard)
    assert_blocked_unknown_pending(guard.submit(intent, broker, policy=POLICY), rec.id)

    # One lookup, no wait: a miss is recorded, never believed.
    early = guard.reconcile(broker, grace=GRACE, wait=False)
    assert early.decisions == []
    assert ["not found once" in d.why for d in early.unresolved] == [True]
    missed = guard.intent(rec.id)
    assert missed.state is State.UNKNOWN
    assert missed.first_miss_at is not None
    assert not missed.released
    assert_blocked_unknown_pending(guard.submit(intent, broker, policy=POLICY), rec.id)

    report = guard.reconcile(broker, grace=GRACE)
    assert [(d.intent_id, d.before, d.after) for d in report.decisions] == [(rec.id, State.UNKNOWN, State.NOT_FOUND)]
    assert "two lookups" in report.decisions[0].why
    assert report.unresolved == []
    gone = guard.intent(rec.id)
    assert gone.state is State.NOT_FOUND
    assert gone.released
    assert gone.first_miss_at == missed.first_miss_at
    assert gone.updated_at - missed.first_miss_at >= GRACE  # the two lookups were >= grace apart
    assert broker.orders() == []

    # The scope is free: a new submit sends exactly one order, under a new client order id.
    fresh = guard.submit(intent, broker, policy=POLICY)
    assert fresh.outcome is Outcome.SENT
    assert fresh.state is State.FILLED
    assert fresh.client_order_id != rec.client_order_id
    venue = broker.orders()
    assert [o.client_order_id for o in venue] == [fresh.client_order_id]
    assert broker.positions() == [Position("main", "SPX", Decimal(4))]


def test_waiting_reconcile_declares_not_found_only_after_the_grace(
    guard: Guard, open_broker: Callable[..., PaperBroker]
) -> None:
    broker = open_broker(faults=PaperFaults(disconnect=1))
    result = guard.submit(make_intent(), broker, policy=POLICY)
    assert result.state is State.UNKNOWN
    t0 = time.monotonic()
    report = guard.reconcile(broker, grace=GRACE)
    elapsed = time.monotonic() - t0
    assert [(d.before, d.after) for d in report.decisions] == [(State.UNKNOWN, State.NOT_FOUND)]
    assert elapsed >= GRACE - 0.05
    rec = only_intent(guard)
    assert rec.state is State.NOT_FOUND
    assert rec.first_miss_at is not None
    assert rec.updated_at - rec.first_miss_at >= GRACE


# ------------------------------------------------------------------ stale SENDING


def test_a_live_owners_sending_intent_is_left_alone_until_the_venue_shows_it(
    guard: Guard, open_broker: Callable[..., PaperBroker]
) -> None:
    # The owner is stuck between the venue's acceptance and its reply (ack latency), and the
    # venue's lookups lag behind its acceptance.
    broker = open_broker(ack_latency=1.5, faults=PaperFaults(lookup_lag=0.6))
    results: list[SubmitResult] = []
    owner = threading.Thread(target=lambda: results.append(guard.submit(make_intent(), broker, policy=POLICY)))
    owner.start()
    try:
        deadline = time.monotonic() + 5
        while not broker.orders() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(broker.orders()) == 1
        rec = only_intent(guard)
        assert rec.state is State.SENDING

        # Not visible at the venue yet, and its owner (this process) is alive within its deadline.
        young = guard.reconcile(broker, grace=GRACE, stale_after=0.05)
        assert young.decisions == []
        assert [(d.intent_id, d.before) for d in young.unresolved] == [(rec.id, State.SENDING)]
        assert "may still send" in young.unresolved[0].why
        assert guard.intent(rec.id).state is State.SENDING
        assert guard.intent(rec.id).fence == rec.fence

        time.sleep(0.7)  # past the lookup lag: the venue shows it, which settles it
        old = guard.reconcile(broker, grace=GRACE)
        assert [(d.intent_id, d.before, d.after) for d in old.decisions] == [(rec.id, State.SENDING, State.FILLED)]
        assert old.unresolved == []
        resolved = guard.intent(rec.id)
        assert resolved.state is State.FILLED
        assert resolved.fence > rec.fence
    finally:
        owner.join(10)
    assert not owner.is_alive()
    # The owner's late report was fenced out; the result shows the reconciler's decision.
    (result,) = results
    assert result.outcome is Outcome.SENT
    assert result.state is State.FILLED
    assert result.intent is not None
    assert result.intent.fence == resolved.fence
    assert guard.intent(rec.id) == resolved
    assert len(broker.orders()) == 1


def test_stale_sending_that_never_reached_the_venue_becomes_not_found(guard: Guard, broker: PaperBroker) -> None:
    # An owner that committed its claim (SENDING) and died before sending.
    decision = guard.store.claim(make_intent(), [POLICY], dead_caller(), state=State.SENDING)
    assert decision.claimed
    assert decision.intent is not None
    intent_id = decision.intent.id
    time.sleep(0.1)
    report = guard.reconcile(broker, grace=0.3)  # the owner is gone: no need to wait for its deadline
    assert [(d.intent_id, d.before, d.after) for d in report.decisions] == [
        (intent_id, State.SENDING, State.UNKNOWN),
        (intent_id, State.UNKNOWN, State.NOT_FOUND),
    ]
    rec = guard.intent(intent_id)
    assert rec.state is State.NOT_FOUND
    assert rec.released
    assert rec.first_miss_at is not None
    assert rec.updated_at - rec.first_miss_at >= 0.3
    assert broker.orders() == []
    assert guard.submit(make_intent(), broker, policy=POLICY).state is State.FILLED
    assert len(broker.orders()) == 1


# ------------------------------------------------------------------ ACKED / PARTIALLY_FILLED


def test_acked_intent_is_brought_to_filled(guard: Guard, open_broker: Callable[..., PaperBroker]) -> None:
    broker = open_broker(fill_delay=0.4)
    broker.set_price("SPX", "101.25")
    result = guard.submit(make_intent(), broker, policy=POLICY)
    assert result.outcome is Outcome.SENT
    assert result.state is State.ACKED
    assert result.order is not None
    assert result.order.status is OrderStatus.ACCEPTED

    report = guard.reconcile(broker, grace=GRACE)  # not filled yet: nothing new
    assert report.decisions == []
    assert report.unresolved == []
    assert only_intent(guard).state is State.ACKED

    time.sleep(0.45)
    report = guard.reconcile(broker, grace=GRACE)
    assert [(d.before, d.after) for d in report.decisions] == [(State.ACKED, State.FILLED)]
    rec = only_intent(guard)
    assert rec.state is State.FILLED
    assert rec.filled_quantity == Decimal(4)
    assert rec.average_price == Decimal("101.25")
    assert rec.broker_order_id == result.order.broker_order_id
    assert report.drift == []
    assert len(broker.orders()) == 1


def test_partially_filled_is_recorded_then_filled(guard: Guard, open_broker: Callable[..., PaperBroker]) -> None:
    broker = open_broker(fill_delay=1.0, partial_fills=2)
    result = guard.submit(make_intent(), broker, policy=POLICY)
    assert result.state is State.ACKED
    coid = result.client_order_id or ""
    deadline = time.monotonic() + 5
    while broker.orders(coid)[0].status is OrderStatus.ACCEPTED and time.monotonic() < deadline:
        time.sleep(0.01)
    report = guard.reconcile(broker, grace=GRACE)
    assert [(d.before, d.after) for d in report.decisions] == [(State.ACKED, State.PARTIALLY_FILLED)]
    rec = only_intent(guard)
    assert rec.state is State.PARTIALLY_FILLED
    assert rec.filled_quantity == Decimal(2)
    # Ledger and venue agree on the partial position: no drift.
    assert report.drift == []

    time.sleep(0.55)
    report = guard.reconcile(broker, grace=GRACE)
    assert [(d.before, d.after) for d in report.decisions] == [(State.PARTIALLY_FILLED, State.FILLED)]
    rec = only_intent(guard)
    assert rec.state is State.FILLED
    assert rec.filled_quantity == Decimal(4)
    assert report.clean


# ------------------------------------------------------------------ position drift


def test_an_order_placed_outside_the_guard_shows_up_as_drift(guard: Guard, broker: PaperBroker) -> None:
    result = guard.submit(make_intent(quantity=4), broker, policy=POLICY)
    assert result.state is State.FILLED
    assert guard.reconcile(broker, grace=GRACE).drift == []

    # Someone trades the same account by hand, bypassing the guard.
    broker.submit(OrderRequest("manual-1", "main", "SPX", "BUY", Decimal(3), "MARKET", None, None, "DAY"))
    # An account the ledger has never traded is not this ledger's business.
    broker.submit(OrderRequest("manual-2", "other", "SPX", "BUY", Decimal(9), "MARKET", None, None, "DAY"))

    report = guard.reconcile(broker, grace=GRACE)
    assert report.decisions == []
    assert report.drift == [Drift("main", "SPX", Decimal(4), Decimal(7))]
    assert report.drift[0].difference == Decimal(3)
    assert not report.clean
    assert report.lines()[0] == "DRIFT main SPX: ledger 4, venue 7 (difference 3)"
    # The drifting account and symbol are halted (cause DRIFT) until an operator resumes them.
    (halt,) = report.halts
    assert (halt.scope, halt.cause.value, halt.state.value) == ("account=main,symbol=SPX", "DRIFT", "HALTED")
    assert report.lines()[1] == f"HALTED account=main,symbol=SPX: {halt.reason}"
    assert guard.halts() == [halt]
    blocked = guard.submit(make_intent(quantity=1), broker, policy=OncePer(Ever(), by=("strategy", "quantity")))
    assert blocked.reason is BlockReason.HALTED and "DRIFT" in blocked.message
    # A second run does not halt again (the first cause is kept).
    assert guard.reconcile(broker, grace=GRACE).halts == []


def test_drift_of_a_symbol_only_the_venue_holds(guard: Guard, broker: PaperBroker) -> None:
    guard.submit(make_intent(), broker, policy=POLICY)
    broker.submit(OrderRequest("manual-s", "main", "NDX", "SELL", Decimal("1.5"), "MARKET", None, None, "DAY"))
    report = guard.reconcile(broker, grace=GRACE)
    assert report.drift == [Drift("main", "NDX", Decimal(0), Decimal("-1.5"))]
    assert report.drift[0].difference == Decimal("-1.5")
    assert report.lines()[0] == "DRIFT main NDX: ledger 0, venue -1.5 (difference -1.5)"
    assert [h.scope for h in report.halts] == ["account=main,symbol=NDX"]


def test_drift_explained_by_an_unresolved_intent_is_reported_but_not_halted(
    guard: Guard, open_broker: Callable[..., PaperBroker]
) -> None:
    broker = open_broker(faults=PaperFaults(lose_ack=1, lookup_lag=30))
    guard.submit(make_intent(), broker, policy=POLICY)  # UNKNOWN: at the venue, not in the ledger's fills
    report = guard.reconcile(broker, grace=GRACE, wait=False)
    assert report.drift == [Drift("main", "SPX", Decimal(0), Decimal(4))]
    assert report.halts == [] and guard.halts() == []


def test_drift_counts_accounts_whose_intents_are_not_filled_yet(
    guard: Guard, open_broker: Callable[..., PaperBroker]
) -> None:
    broker = open_broker()
    result = guard.submit(make_intent(order_type="LIMIT", limit_price="90"), broker, policy=POLICY)
    assert result.state is State.ACKED  # resting limit: the ledger trades "main", nothing filled yet
    broker.submit(OrderRequest("manual-o", "main", "SPX", "BUY", Decimal(3), "MARKET", None, None, "DAY"))
    assert broker.positions("main") == [Position("main", "SPX", Decimal(3))]
    report = guard.reconcile(broker, grace=GRACE)
    assert report.drift == [Drift("main", "SPX", Decimal(0), Decimal(3))]


def test_drift_exposes_an_order_wrongly_declared_not_found(
    guard: Guard, open_broker: Callable[..., PaperBroker]
) -> None:
    """A grace shorter than the venue's real lookup lag makes NOT_FOUND wrong; the position
    check is the safety net that must show the venue holding what the ledger says was never placed."""
    broker = open_broker(faults=PaperFaults(lose_ack=1, lookup_lag=0.5))
    assert guard.submit(make_intent(), broker, policy=POLICY).state is State.UNKNOWN
    report = guard.reconcile(broker, grace=0.1)  # misconfigured: below the lag
    assert [(d.before, d.after) for d in report.decisions] == [(State.UNKNOWN, State.NOT_FOUND)]
    assert broker.positions("main") == [Position("main", "SPX", Decimal(4))]
    assert report.drift == [Drift("main", "SPX", Decimal(0), Decimal(4))]
    assert "DRIFT main SPX: ledger 0, venue 4 (difference 4)" in report.lines()


# ------------------------------------------------------------------ fencing


def test_the_reconcilers_decision_fences_out_the_original_owner(guard: Guard, broker: PaperBroker) -> None:
    with guard.claim(make_intent(), policy=POLICY) as claim:
        assert claim
        coid = claim.client_order_id
        original_fence = claim.intent.fence
        order = broker.submit(OrderRequest.from_record(claim.intent))
        assert order.client_order_id == coid
        assert order.status is OrderStatus.FILLED

        # The owner stalls before reporting; a reconciler resolves the stale claim.
        time.sleep(0.1)
        report = guard.reconcile(broker, grace=GRACE, stale_after=0.05)
        assert [(d.client_order_id, d.before, d.after) for d in report.decisions] == [
            (coid, State.CLAIMED, State.FILLED)
        ]
        decided = guard.intent(coid)
        assert decided.state is State.FILLED
        assert decided.fence > original_fence

        with pytest.raises(FencedOut):
            claim.filled(Decimal(4), Decimal(100), order.broker_order_id)
        assert guard.intent(coid) == decided  # the refused report changed nothing

    assert guard.intent(coid) == decided  # leaving the block changed nothing either
    assert len(broker.orders()) == 1


def test_a_fenced_out_owner_stays_fenced_out_on_every_later_report(
    guard: Guard, open_broker: Callable[..., PaperBroker]
) -> None:
    """Invariant 5: once the reconciler decided, *no* later write of the former owner may land,
    not only the first one. Here the venue shows the order open (ACKED); a zombie owner that
    reports a fill twice must not turn the ledger into FILLED with nothing filled at the venue."""
    broker = open_broker(fill_delay=30)
    with guard.claim(make_intent(), policy=POLICY) as claim:
        coid = claim.client_order_id
        broker.submit(OrderRequest.from_record(claim.intent))
        time.sleep(0.1)
        report = guard.reconcile(broker, grace=GRACE, stale_after=0.05)
        assert [(d.before, d.after) for d in report.decisions] == [(State.CLAIMED, State.ACKED)]
        decided = guard.intent(coid)
        assert decided.state is State.ACKED

        with pytest.raises(FencedOut):
            claim.filled()
        with pytest.raises(FencedOut):
            claim.filled()  # the retry of a late report is just as late
        with pytest.raises(FencedOut):
            claim.canceled()

    after = guard.intent(coid)
    assert after.state is State.ACKED
    assert after.filled_quantity == 0
    assert after.fence == decided.fence
    assert broker.orders(coid)[0].status is OrderStatus.ACCEPTED
