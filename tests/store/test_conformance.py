"""The store contract (store/base.py), run against every store kind."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest

from orderguard import (
    BlockReason,
    Cooldown,
    Ever,
    FencedOut,
    IntentNotFound,
    InvalidTransition,
    MaxOpen,
    OncePer,
    OneOpen,
    State,
    TradingDay,
)
from orderguard.errors import ClockError
from orderguard.store.base import Caller, Store, TransitionFields, client_order_id
from tests.helpers import make_intent
from tests.store.conftest import FakeClock, StoreFactory

CALLER = Caller.current("conformance")
ONCE = [OncePer(Ever(), by=("strategy",))]
COID = re.compile(r"^[a-z0-9-]{1,32}$")


def test_first_claim_wins_and_the_second_names_the_holder(store: Store) -> None:
    first = store.claim(make_intent(), ONCE, CALLER)
    second = store.claim(make_intent(source="manual"), ONCE, CALLER)
    assert first.claimed and first.intent is not None
    assert first.intent.state is State.SENDING and first.intent.fence == 1
    assert not second.claimed and second.intent is None
    assert second.reason is BlockReason.IN_FLIGHT
    assert second.holder is not None and second.holder.id == first.intent.id
    assert "BLOCKED IN_FLIGHT" in second.message and first.intent.id in second.message
    assert "Next:" in second.message


def test_client_order_id_is_short_deterministic_and_unique_per_fence(store: Store) -> None:
    rec = store.claim(make_intent(), ONCE, CALLER).intent
    assert rec is not None
    assert COID.match(rec.client_order_id) and len(rec.client_order_id) <= 32
    assert rec.client_order_id == client_order_id(store.namespace, rec.scope_key, rec.fence)
    store.transition(rec.id, rec.fence, State.REJECTED, TransitionFields(note="no"))
    again = store.claim(make_intent(), ONCE, CALLER).intent
    assert again is not None and again.fence == 2
    assert again.client_order_id != rec.client_order_id and COID.match(again.client_order_id)


def test_same_scope_different_payload_while_open_is_a_conflict(store: Store) -> None:
    held = store.claim(make_intent(quantity=4), ONCE, CALLER).intent
    assert held is not None
    other = store.claim(make_intent(quantity=5), ONCE, CALLER)
    assert other.reason is BlockReason.CONFLICT and other.holder and other.holder.id == held.id
    store.transition(held.id, held.fence, State.ACKED)
    assert store.claim(make_intent(quantity=5), ONCE, CALLER).reason is BlockReason.CONFLICT
    same = store.claim(make_intent(quantity="4.0"), ONCE, CALLER)
    assert same.reason is BlockReason.IN_FLIGHT and same.holder and same.holder.id == held.id


def test_once_per_window_blocks_after_fill_and_frees_after_rejection(store: Store) -> None:
    rec = store.claim(make_intent(), ONCE, CALLER).intent
    assert rec is not None
    rec = store.transition(rec.id, rec.fence, State.FILLED, TransitionFields(filled_quantity=Decimal(4)))
    assert store.claim(make_intent(), ONCE, CALLER).reason is BlockReason.DUPLICATE
    assert store.claim(make_intent(quantity=9), ONCE, CALLER).reason is BlockReason.DUPLICATE


@pytest.mark.parametrize("freeing", [State.REJECTED, State.ABANDONED])
def test_states_that_prove_nothing_executed_free_the_scope(store: Store, freeing: State) -> None:
    rec = store.claim(make_intent(), ONCE, CALLER, state=State.CLAIMED).intent
    assert rec is not None
    store.transition(rec.id, rec.fence, freeing)
    assert store.claim(make_intent(), ONCE, CALLER).claimed


def test_unknown_blocks_until_resolved_and_not_found_frees(store: Store) -> None:
    rec = store.claim(make_intent(), ONCE, CALLER).intent
    assert rec is not None
    rec = store.transition(rec.id, rec.fence, State.UNKNOWN, TransitionFields(note="timeout"))
    blocked = store.claim(make_intent(), ONCE, CALLER)
    assert blocked.reason is BlockReason.UNKNOWN_PENDING
    assert store.claim(make_intent(quantity=7), ONCE, CALLER).reason is BlockReason.UNKNOWN_PENDING
    resolved = store.transition(rec.id, rec.fence, State.NOT_FOUND, take_over=True)
    assert resolved.fence > rec.fence and resolved.released
    assert store.claim(make_intent(), ONCE, CALLER).claimed


def test_canceled_frees_only_when_nothing_filled(store: Store) -> None:
    a = store.claim(make_intent(), ONCE, CALLER).intent
    assert a is not None
    a = store.transition(a.id, a.fence, State.ACKED)
    store.transition(a.id, a.fence, State.CANCELED, TransitionFields(filled_quantity=Decimal(0)))
    b = store.claim(make_intent(), ONCE, CALLER).intent
    assert b is not None
    b = store.transition(b.id, b.fence, State.PARTIALLY_FILLED, TransitionFields(filled_quantity=Decimal(1)))
    store.transition(b.id, b.fence, State.CANCELED)
    assert store.claim(make_intent(), ONCE, CALLER).reason is BlockReason.DUPLICATE


def test_cooldown_counts_from_the_last_claim(make_store: StoreFactory, clock: FakeClock) -> None:
    store = make_store(clock=clock)
    policy = [Cooldown(900, by=("strategy", "symbol"))]
    rec = store.claim(make_intent(), policy, CALLER).intent
    assert rec is not None
    store.transition(rec.id, rec.fence, State.FILLED, TransitionFields(filled_quantity=Decimal(4)))
    clock.advance(899)
    blocked = store.claim(make_intent(), policy, CALLER)
    assert blocked.reason is BlockReason.COOLDOWN and blocked.holder and blocked.holder.id == rec.id
    clock.advance(1)
    assert store.claim(make_intent(), policy, CALLER).claimed


def test_cooldown_never_releases_an_unanswered_or_unknown_intent(make_store: StoreFactory, clock: FakeClock) -> None:
    store = make_store(clock=clock)
    policy = [Cooldown(60)]
    rec = store.claim(make_intent(), policy, CALLER).intent
    assert rec is not None
    clock.advance(3600)  # far past the cooldown, still SENDING
    assert store.claim(make_intent(), policy, CALLER).reason is BlockReason.IN_FLIGHT
    store.transition(rec.id, rec.fence, State.UNKNOWN)
    clock.advance(86400)
    assert store.claim(make_intent(), policy, CALLER).reason is BlockReason.UNKNOWN_PENDING


def test_max_open_counts_open_intents_until_closed(store: Store) -> None:
    policy = [MaxOpen(2, by=("strategy",))]
    a = store.claim(make_intent(symbol="A"), policy, CALLER).intent
    b = store.claim(make_intent(symbol="B"), policy, CALLER).intent
    assert a is not None and b is not None
    for rec in (a, b):
        store.transition(rec.id, rec.fence, State.FILLED, TransitionFields(filled_quantity=Decimal(4)))
    third = store.claim(make_intent(symbol="C"), policy, CALLER)
    assert third.reason is BlockReason.MAX_OPEN
    closed = store.mark_closed(a.id)
    assert closed.closed
    assert store.claim(make_intent(symbol="C"), policy, CALLER).claimed


def test_one_open_reports_open_position_and_unknown_first(store: Store) -> None:
    policy = [OneOpen(by=("account", "symbol"))]
    rec = store.claim(make_intent(), policy, CALLER).intent
    assert rec is not None
    store.transition(rec.id, rec.fence, State.FILLED, TransitionFields(filled_quantity=Decimal(4)))
    assert store.claim(make_intent(), policy, CALLER).reason is BlockReason.OPEN_POSITION
    other = store.claim(make_intent(symbol="NDX"), policy, CALLER).intent
    assert other is not None
    store.transition(other.id, other.fence, State.UNKNOWN)
    assert store.claim(make_intent(symbol="NDX"), policy, CALLER).reason is BlockReason.UNKNOWN_PENDING
    with pytest.raises(InvalidTransition):
        store.mark_closed(other.id)  # an UNKNOWN position cannot be declared closed


def test_several_policies_first_block_wins_and_nothing_is_half_written(store: Store) -> None:
    both = [OncePer(Ever(), by=("strategy", "symbol")), OneOpen(by=("account",))]
    held = store.claim(make_intent(symbol="NDX"), [OneOpen(by=("account",))], CALLER).intent
    assert held is not None
    refused = store.claim(make_intent(symbol="SPX"), both, CALLER)
    assert not refused.claimed and refused.rule is not None and refused.rule.key.startswith("open|")
    # The once-scope taken by the first rule was rolled back with the refusal:
    assert store.claim(make_intent(symbol="SPX"), [OncePer(Ever(), by=("strategy", "symbol"))], CALLER).claimed


def test_every_attempt_is_recorded_with_who_and_why(store: Store) -> None:
    caller = Caller(host="host-a", pid=4242, runner="scheduler-runner", thread="Worker-1", task="entry-task")
    ok = store.claim(make_intent(source="scheduler"), ONCE, caller)
    no = store.claim(make_intent(source="manual"), ONCE, caller)
    attempts = store.attempts()
    assert [a.id for a in attempts] == [no.attempt_id, ok.attempt_id]
    blocked, claimed = attempts
    assert claimed.outcome == "CLAIMED" and ok.intent and claimed.intent_id == ok.intent.id
    assert blocked.outcome == "BLOCKED" and blocked.reason is BlockReason.IN_FLIGHT
    assert blocked.holder_id == claimed.intent_id and blocked.source == "manual"
    assert (blocked.host, blocked.pid, blocked.runner, blocked.thread, blocked.task) == (
        "host-a", 4242, "scheduler-runner", "Worker-1", "entry-task",
    )
    assert blocked.quantity == Decimal(4) and blocked.symbol == "SPX"
    assert store.attempts(blocked=True) == [blocked]
    assert store.attempts(holder_id=claimed.intent_id) == [blocked]
    assert store.attempts(reason=BlockReason.IN_FLIGHT) == [blocked]


def test_transitions_are_fenced_and_follow_the_state_machine(store: Store) -> None:
    rec = store.claim(make_intent(), ONCE, CALLER).intent
    assert rec is not None
    with pytest.raises(FencedOut):
        store.transition(rec.id, rec.fence + 1, State.ACKED)
    with pytest.raises(InvalidTransition):
        store.transition(rec.id, rec.fence, State.NOT_FOUND)  # only after UNKNOWN
    taken = store.transition(rec.id, rec.fence, State.ACKED, take_over=True)
    assert taken.fence > rec.fence
    with pytest.raises(FencedOut):
        store.transition(rec.id, rec.fence, State.FILLED)  # the old owner is locked out
    done = store.transition(taken.id, taken.fence, State.FILLED, TransitionFields("B-1", Decimal(4), Decimal("99.5")))
    assert (done.state, done.broker_order_id, done.filled_quantity, done.average_price) == (
        State.FILLED, "B-1", Decimal(4), Decimal("99.5"),
    )
    assert store.transition(done.id, done.fence, State.FILLED) == done  # repeating a final report is harmless
    with pytest.raises(InvalidTransition):
        store.transition(done.id, done.fence, State.CANCELED)


def test_fences_increase_per_scope_across_takeovers_and_new_claims(store: Store) -> None:
    a = store.claim(make_intent(), ONCE, CALLER).intent
    assert a is not None
    a2 = store.transition(a.id, a.fence, State.UNKNOWN, take_over=True)
    a3 = store.transition(a2.id, a2.fence, State.NOT_FOUND, take_over=True)
    b = store.claim(make_intent(), ONCE, CALLER).intent
    assert b is not None
    assert a.fence < a2.fence < a3.fence < b.fence


def test_reads_by_id_and_client_order_id(store: Store) -> None:
    rec = store.claim(make_intent(tags={"leg": "front"}), ONCE, CALLER).intent
    assert rec is not None
    assert store.get(rec.id) == store.get(rec.client_order_id) == rec
    assert rec.tags == {"leg": "front"}
    with pytest.raises(IntentNotFound):
        store.get("nope")
    assert store.intents(states=[State.SENDING]) == [rec]
    assert store.intents(states=[State.FILLED]) == []
    assert store.intents(strategy="other") == []


def test_filled_positions_net_buys_and_sells(store: Store) -> None:
    policy = [OncePer(Ever(), by=("side",))]
    buy = store.claim(make_intent(side="BUY", quantity=10), policy, CALLER).intent
    sell = store.claim(make_intent(side="SELL", quantity=3), policy, CALLER).intent
    assert buy is not None and sell is not None
    store.transition(buy.id, buy.fence, State.FILLED, TransitionFields(filled_quantity=Decimal(10)))
    store.transition(sell.id, sell.fence, State.FILLED, TransitionFields(filled_quantity=Decimal(3)))
    assert store.filled_positions() == {("main", "SPX"): Decimal(7)}


def test_trading_day_window_rolls_with_the_store_clock(make_store: StoreFactory, clock: FakeClock) -> None:
    store = make_store(clock=clock)
    policy = [OncePer(TradingDay("XNYS"), by=("strategy",))]
    rec = store.claim(make_intent(), policy, CALLER).intent
    assert rec is not None
    store.transition(rec.id, rec.fence, State.FILLED, TransitionFields(filled_quantity=Decimal(4)))
    clock.advance(6 * 3600)  # Thursday 21:00 UTC: after the close, so Friday's session
    nxt = store.claim(make_intent(), policy, CALLER)
    assert nxt.claimed and nxt.intent and nxt.intent.scope_key.endswith("XNYS:2025-11-21")
    clock.advance(3600)
    assert store.claim(make_intent(), policy, CALLER).reason is BlockReason.IN_FLIGHT


@pytest.mark.parametrize("reading", [0.0, -1.0, float("nan"), 5e9])
def test_an_unusable_clock_fails_closed_and_records_nothing(make_store: StoreFactory, reading: float) -> None:
    store = make_store(clock=lambda: reading)
    with pytest.raises(ClockError):
        store.claim(make_intent(), ONCE, CALLER)
    assert store.intents() == [] and store.attempts() == []


def test_an_unknown_intent_still_blocks_after_its_window_rolls_over(make_store: StoreFactory, clock: FakeClock) -> None:
    store = make_store(clock=clock)
    policy = [OncePer(TradingDay("XNYS"), by=("strategy",))]
    rec = store.claim(make_intent(), policy, CALLER).intent
    assert rec is not None
    rec = store.transition(rec.id, rec.fence, State.UNKNOWN, TransitionFields(note="ack timeout"))
    clock.advance(86400)  # the next session: a new window, but the old order may have executed
    carried = store.claim(make_intent(), policy, CALLER)
    assert carried.reason is BlockReason.UNKNOWN_PENDING and carried.holder and carried.holder.id == rec.id
    assert carried.rule is not None and carried.rule.key != rec.scope_key
    store.transition(rec.id, rec.fence, State.NOT_FOUND, take_over=True)  # reconciled: never placed
    assert store.claim(make_intent(), policy, CALLER).claimed


def test_two_policies_on_one_scope_are_refused_before_anything_is_written(store: Store) -> None:
    from orderguard import InvalidPolicy
    from orderguard.policies import as_policies

    with pytest.raises(InvalidPolicy, match="same scope"):
        as_policies([OneOpen(by=("symbol",)), MaxOpen(3, by=("symbol",))])
    assert store.attempts() == []


@pytest.mark.parametrize("state", [State.ACKED, State.PARTIALLY_FILLED, State.SENDING])
def test_only_a_finished_fill_can_be_marked_closed(store: Store, state: State) -> None:
    rec = store.claim(make_intent(), [OneOpen()], CALLER).intent
    assert rec is not None
    if state is not State.SENDING:
        rec = store.transition(rec.id, rec.fence, state, TransitionFields(filled_quantity=Decimal(1)))
    with pytest.raises(InvalidTransition, match="cannot be closed"):
        store.mark_closed(rec.id)
    assert store.claim(make_intent(), [OneOpen()], CALLER).reason is BlockReason.IN_FLIGHT
