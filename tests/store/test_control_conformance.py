"""The control plane (store/control.py: halts, risk limits, REDUCING), run against every store.

Halts and risk limits are written once in ``store/control.py`` and run inside each store's own
claim transaction, so this suite drives them through ``Store.claim`` and
``Store.set_trading_state`` on real SQLite files and a real PostgreSQL schema, with the store's
``clock=`` test option where a window must roll. Concurrency tests use real threads sharing one
store (the store is documented as thread-safe), started behind a barrier.
"""

from __future__ import annotations

import threading
from collections import Counter
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest

from orderguard import (
    BlockReason,
    Ever,
    HaltCause,
    InvalidIntent,
    InvalidPolicy,
    NotionalLimit,
    OncePer,
    RateLimit,
    State,
    TradingState,
)
from orderguard.store.base import Caller, ClaimDecision, Store, TransitionFields
from orderguard.store.sqlite import SQLiteStore
from tests.helpers import make_intent

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from orderguard import OrderIntent, Policy
    from tests.store.conftest import FakeClock, StoreFactory

CALLER = Caller.current("control-conformance")
EACH = [OncePer(Ever(), by=("account", "strategy", "symbol", "tags.n"))]  # every intent its own scope
_counter = iter(range(10**9))


def fresh(**fields: Any) -> OrderIntent:
    """A distinct intent (its own ``tags.n``), so only halts and limits can stop it."""
    tags = {"n": str(next(_counter)), **fields.pop("tags", {})}
    return make_intent(tags=tags, **fields)


def claim(store: Store, intent: OrderIntent, policies: Sequence[Policy], **options: Any) -> ClaimDecision:
    return store.claim(intent, policies, CALLER, **options)


def claimed(decision: ClaimDecision) -> Any:
    assert decision.claimed and decision.intent is not None, decision.message
    return decision.intent


def fill(store: Store, decision: ClaimDecision, quantity: int | str) -> None:
    rec = claimed(decision)
    store.transition(rec.id, rec.fence, State.FILLED, TransitionFields(filled_quantity=Decimal(quantity)))


def halt(store: Store, scope: str, state: TradingState = TradingState.HALTED, *, reason: str = "test halt",
         actor: str = "operator alice@desk-1") -> Any:
    return store.set_trading_state(scope, state, cause=HaltCause.OPERATOR, reason=reason, actor=actor)


def resume(store: Store, scope: str, *, reason: str = "all clear", actor: str = "operator carol@desk-2") -> None:
    store.set_trading_state(scope, TradingState.ACTIVE, cause=HaltCause.OPERATOR, reason=reason, actor=actor)


@pytest.fixture
def open_same_ledger() -> Iterator[Callable[..., Store]]:
    """A second store instance on the ledger of ``store`` (another process's view of it)."""
    opened: list[Store] = []

    def _open(store: Store, **options: Any) -> Store:
        if isinstance(store, SQLiteStore):
            other: Store = SQLiteStore(store.path, synchronous="NORMAL", **options)
        else:
            from orderguard.store.postgres import PostgresStore

            assert isinstance(store, PostgresStore)
            other = PostgresStore(store.url, schema=store.schema, **options)
        opened.append(other)
        return other

    yield _open
    for other in opened:
        other.close()


def race(n: int, work: Callable[[int], ClaimDecision]) -> list[ClaimDecision]:
    """Run ``work(i)`` in ``n`` threads released together by a barrier; every result (or the error)."""
    barrier = threading.Barrier(n)
    results: list[ClaimDecision | None] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), name=f"racer-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


# ------------------------------------------------------------------------- rate limits


def test_rate_limit_allows_exactly_n_then_refuses_naming_the_policy_and_the_count(store: Store) -> None:
    policy = RateLimit(3, 60, by=("strategy",))
    for symbol in ("SPX", "QQQ", "NDX"):
        claimed(claim(store, fresh(symbol=symbol), [policy]))
    fourth = claim(store, fresh(symbol="IWM"), [policy])
    assert not fourth.claimed and fourth.intent is None
    assert fourth.reason is BlockReason.RATE_LIMIT
    assert repr(policy) in fourth.message and "RateLimit(3, per_seconds=60" in fourth.message
    assert "3 orders in the last 60s (limit 3)" in fourth.message
    assert fourth.message.startswith("BLOCKED RATE_LIMIT:") and "Nothing was sent." in fourth.message
    assert not fourth.tripped and fourth.halt is None and store.halts() == []
    assert fourth.rule is not None and fourth.rule.key == "rate|strategy=spx-calendar|@60s"
    (attempt,) = store.attempts(blocked=True)
    assert (attempt.reason, attempt.scope_key, attempt.intent_id) == (BlockReason.RATE_LIMIT, fourth.rule.key, None)
    assert len(store.intents()) == 3
    # Another strategy has its own count.
    claimed(claim(store, fresh(strategy="other"), [policy]))


def test_rate_limit_counts_what_reached_the_venue_but_not_abandoned_or_not_found(store: Store) -> None:
    policy = [RateLimit(4, 60, by=("strategy",))]
    in_flight = claimed(claim(store, fresh(), policy, state=State.CLAIMED))  # a claim() body still running
    unknown = claimed(claim(store, fresh(), policy))
    unknown = store.transition(unknown.id, unknown.fence, State.UNKNOWN, TransitionFields(note="ack lost"))
    rejected = claimed(claim(store, fresh(), policy))
    store.transition(rejected.id, rejected.fence, State.REJECTED, TransitionFields(note="venue said no"))
    abandoned = claimed(claim(store, fresh(), policy, state=State.CLAIMED))
    store.transition(abandoned.id, abandoned.fence, State.ABANDONED)
    # Counted: in_flight, unknown and rejected (the venue saw it). The abandoned one never left.
    filled = claim(store, fresh(), policy)
    fill(store, filled, 4)  # a filled intent keeps counting
    blocked = claim(store, fresh(), policy)
    assert blocked.reason is BlockReason.RATE_LIMIT
    assert "4 orders in the last 60s (limit 4)" in blocked.message
    assert in_flight.state is State.CLAIMED
    # Reconciliation proving the UNKNOWN order never reached the venue frees its slot.
    store.transition(unknown.id, unknown.fence, State.NOT_FOUND, take_over=True)
    claimed(claim(store, fresh(), policy))
    assert claim(store, fresh(), policy).reason is BlockReason.RATE_LIMIT


def test_rate_limit_window_rolls_on_the_store_clock(store: Store, clock: FakeClock) -> None:
    policy = [RateLimit(2, 60, by=("strategy",))]
    claimed(claim(store, fresh(), policy))  # t0
    clock.advance(30)
    claimed(claim(store, fresh(), policy))  # t0 + 30
    clock.advance(29.5)
    assert claim(store, fresh(), policy).reason is BlockReason.RATE_LIMIT  # both still inside
    clock.advance(0.5)  # t0 + 60: the first one has left the window
    claimed(claim(store, fresh(), policy))
    assert claim(store, fresh(), policy).reason is BlockReason.RATE_LIMIT
    clock.advance(30)  # t0 + 90: the second one left
    claimed(claim(store, fresh(), policy))
    assert claim(store, fresh(), policy).reason is BlockReason.RATE_LIMIT


# ---------------------------------------------------------------------- notional limits


def limit_buy(quantity: str, price: str, **fields: Any) -> OrderIntent:
    return fresh(quantity=quantity, order_type="LIMIT", limit_price=price, **fields)


def test_notional_limit_is_exact_at_the_boundary(store: Store) -> None:
    policy = [NotionalLimit("1000.10", 60, by=("strategy",))]
    # Exactly at the limit: allowed; then even a cent of notional more is refused.
    claimed(claim(store, limit_buy("10", "100.01", strategy="x"), policy))
    over = claim(store, limit_buy("1", "0.01", strategy="x"), policy)
    assert over.reason is BlockReason.NOTIONAL_LIMIT
    assert "NotionalLimit(1000.10, per_seconds=60" in over.message
    assert "1000.1 placed in the last 60s + 0.01 would exceed 1000.1" in over.message
    # One cent over on its own: refused; exactly the amount: allowed.
    cent_over = claim(store, limit_buy("1", "1000.11", strategy="y"), policy)
    assert cent_over.reason is BlockReason.NOTIONAL_LIMIT
    assert "0 placed in the last 60s + 1000.11 would exceed 1000.1" in cent_over.message
    claimed(claim(store, limit_buy("3", "333.37", strategy="z"), [NotionalLimit("1000.11", 60, by=("strategy",))]))
    assert claim(store, limit_buy("3", "333.37", strategy="w"), policy).reason is BlockReason.NOTIONAL_LIMIT
    claimed(claim(store, limit_buy("0.5", "2000.20", strategy="w"), policy))
    assert [a.reason for a in store.attempts(blocked=True)] == [BlockReason.NOTIONAL_LIMIT] * 3


def test_notional_uses_the_limit_price_then_the_stop_then_the_reference_price(store: Store) -> None:
    policy = [NotionalLimit(1000, 60, by=("strategy",))]
    # STOP_LIMIT: the limit price counts (10 x 60 = 600), not the stop (10 x 150 = 1500, refused).
    claimed(claim(store, fresh(quantity=10, order_type="STOP_LIMIT", limit_price=60, stop_price=150), policy))
    # STOP: the stop price counts (2 x 150 = 300).
    claimed(claim(store, fresh(quantity=2, order_type="STOP", stop_price=150), policy))
    # MARKET: the reference price counts; 900 + 101 > 1000.
    over = claim(store, fresh(quantity=1, reference_price=101), policy)
    assert over.reason is BlockReason.NOTIONAL_LIMIT
    assert "900 placed in the last 60s + 101 would exceed 1000" in over.message
    claimed(claim(store, fresh(quantity=1, reference_price=100), policy))  # exactly 1000
    # A LIMIT order's reference price is ignored: its limit price counts.
    assert claim(store, limit_buy("1", "0.01", reference_price=1), policy).reason is BlockReason.NOTIONAL_LIMIT


@pytest.mark.parametrize("policies", ["notional only", "once + notional"])
def test_a_market_order_without_reference_price_is_refused_and_nothing_is_written(store: Store, policies: str) -> None:
    notional = NotionalLimit(1000, 60, by=("strategy",))
    chosen: list[Policy] = [notional] if policies == "notional only" else [OncePer(Ever(), by=("strategy",)), notional]
    with pytest.raises(InvalidIntent) as info:
        claim(store, fresh(quantity=1), chosen)
    assert info.value.field == "reference_price"
    assert "reference_price" in str(info.value) and "nothing was sent" in str(info.value)
    assert store.attempts() == [] and store.intents() == []
    # The scope was not touched: the same intent with a price claims fence 1.
    rec = claimed(claim(store, fresh(quantity=1, reference_price=10), chosen))
    assert rec.fence == 1


# ------------------------------------------------------------------------------ trips


def test_a_tripped_rate_limit_halts_its_trading_scope_in_the_refusing_claim(store: Store) -> None:
    policy = RateLimit(2, 60, by=("strategy",), trip=True)
    claimed(claim(store, fresh(symbol="SPX"), [policy]))
    claimed(claim(store, fresh(symbol="QQQ"), [policy]))
    tripping = claim(store, fresh(symbol="NDX"), [policy])
    assert tripping.reason is BlockReason.RATE_LIMIT and tripping.tripped
    assert "The breaker tripped: trading scope strategy=spx-calendar is now HALTED" in tripping.message
    record = tripping.halt
    assert record is not None
    assert (record.scope, record.state, record.cause) == ("strategy=spx-calendar", TradingState.HALTED, HaltCause.RATE_LIMIT)
    assert record.actor == CALLER.who() and "control-conformance" in record.actor
    assert "2 orders in the last 60s (limit 2)" in record.reason and repr(policy) in record.reason
    assert store.halts() == [record]
    (event,) = store.halt_history()
    assert (event.scope, event.state, event.cause, event.actor) == (record.scope, TradingState.HALTED, HaltCause.RATE_LIMIT, record.actor)

    # Everything in the scope is now HALTED, even what the limit (or no limit at all) would allow.
    for intent, policies in (
        (fresh(symbol="IWM"), [policy]),
        (fresh(symbol="DIA"), EACH),
        (fresh(symbol="SPX", account="other-account", side="SELL"), EACH),
    ):
        blocked = claim(store, intent, policies)
        assert blocked.reason is BlockReason.HALTED, blocked.message
        assert blocked.halt == record and not blocked.tripped
        assert "BLOCKED HALTED" in blocked.message and "RATE_LIMIT by" in blocked.message
    # Other strategies trade on.
    claimed(claim(store, fresh(strategy="other"), [policy]))
    claimed(claim(store, fresh(strategy="other"), EACH))

    resume(store, "strategy=spx-calendar", reason="runaway loop fixed")
    assert store.halts() == []
    claimed(claim(store, fresh(symbol="DIA"), EACH))
    latest, first = store.halt_history()
    assert (latest.state, latest.cause, latest.reason, latest.actor) == (
        TradingState.ACTIVE, HaltCause.OPERATOR, "runaway loop fixed", "operator carol@desk-2",
    )
    assert first == event
    reasons = Counter(a.reason for a in store.attempts(blocked=True))
    assert reasons == {BlockReason.RATE_LIMIT: 1, BlockReason.HALTED: 3}


def test_a_tripped_notional_limit_halts_only_its_own_trading_scope(store: Store) -> None:
    policy = [NotionalLimit(1000, 60, by=("strategy", "symbol"), trip=True)]
    claimed(claim(store, limit_buy("5", "150"), policy))  # 750
    tripping = claim(store, limit_buy("2", "150"), policy)  # 750 + 300 > 1000
    assert tripping.reason is BlockReason.NOTIONAL_LIMIT and tripping.tripped
    assert tripping.halt is not None
    assert (tripping.halt.scope, tripping.halt.cause) == ("strategy=spx-calendar,symbol=SPX", HaltCause.NOTIONAL_LIMIT)
    assert "750 placed in the last 60s + 300 would exceed 1000" in tripping.halt.reason
    # The same strategy's other symbols are not in that scope; a tiny SPX order is.
    claimed(claim(store, limit_buy("5", "150", symbol="QQQ"), policy))
    assert claim(store, limit_buy("1", "0.01"), policy).reason is BlockReason.HALTED
    assert claim(store, fresh(side="SELL"), EACH).reason is BlockReason.HALTED
    assert [h.scope for h in store.halts()] == ["strategy=spx-calendar,symbol=SPX"]


def test_a_later_policy_refusal_gives_the_limit_slot_back(store: Store) -> None:
    policies = [RateLimit(2, 60, by=("strategy",)), OncePer(Ever(), by=("strategy", "symbol"))]
    claimed(claim(store, make_intent(symbol="SPX"), policies))
    again = claim(store, make_intent(symbol="SPX"), policies)  # counted by the limit, then refused by OncePer
    assert again.reason is BlockReason.IN_FLIGHT
    claimed(claim(store, make_intent(symbol="QQQ"), policies))  # the refused one did not use a slot
    assert claim(store, make_intent(symbol="NDX"), policies).reason is BlockReason.RATE_LIMIT


def test_a_limit_refusal_undoes_the_earlier_policies_writes_and_still_trips(store: Store, clock: FakeClock) -> None:
    policies = [OncePer(Ever(), by=("strategy", "symbol")), RateLimit(1, 60, by=("strategy",), trip=True)]
    claimed(claim(store, make_intent(symbol="SPX"), policies))
    refused = claim(store, make_intent(symbol="QQQ"), policies)
    assert refused.reason is BlockReason.RATE_LIMIT and refused.tripped
    assert [(h.scope, h.cause) for h in store.halts()] == [("strategy=spx-calendar", HaltCause.RATE_LIMIT)]
    assert [a.reason for a in store.attempts(blocked=True)] == [BlockReason.RATE_LIMIT]
    resume(store, "strategy=spx-calendar")
    clock.advance(60)
    # QQQ's once-scope was never taken: its first real claim has fence 1.
    rec = claimed(claim(store, make_intent(symbol="QQQ"), policies))
    assert rec.fence == 1


def test_a_breaker_tripping_in_a_reducing_scope_halts_it(store: Store, clock: FakeClock) -> None:
    fill(store, claim(store, fresh(quantity=10), EACH), 10)  # long 10
    halt(store, "strategy=spx-calendar", TradingState.REDUCING, reason="wind the book down")
    policy = [RateLimit(1, 60, by=("strategy",), trip=True)]
    claimed(claim(store, fresh(side="SELL", quantity=1), policy))
    tripping = claim(store, fresh(side="SELL", quantity=1), policy)
    assert tripping.reason is BlockReason.RATE_LIMIT and tripping.tripped
    assert "is now HALTED" in tripping.message
    clock.advance(61)
    later = claim(store, fresh(side="SELL", quantity=1), policy)
    assert tripping.halt is not None and tripping.halt.state is TradingState.HALTED
    assert [(h.scope, h.state) for h in store.halts()] == [("strategy=spx-calendar", TradingState.HALTED)]
    assert later.reason is BlockReason.HALTED


# ----------------------------------------------------------------------------- halts


def test_a_halt_blocks_even_a_single_once_per_policy_on_the_fast_path(make_store: StoreFactory) -> None:
    # No test clock: PostgreSQL takes its one-statement claim for one OncePer(Ever()) scope.
    store = make_store()
    policy = [OncePer(Ever(), by=("strategy",))]
    claimed(claim(store, make_intent(strategy="warm-up"), policy))
    halt(store, "strategy=spx-calendar", reason="desk says stop")
    blocked = claim(store, make_intent(), policy)
    assert blocked.reason is BlockReason.HALTED and blocked.intent is None
    assert "desk says stop" in blocked.message and "operator alice@desk-1" in blocked.message
    assert [r.strategy for r in store.intents()] == ["warm-up"]
    # A halt of another scope does not block it (the fast path steps aside, the full claim decides).
    halt(store, "strategy=unrelated", reason="other desk")
    resume(store, "strategy=spx-calendar")
    assert claimed(claim(store, make_intent(), policy)).fence == 1
    halt(store, "global", reason="exchange outage")
    assert claim(store, make_intent(strategy="third"), policy).reason is BlockReason.HALTED
    halt(store, "global", TradingState.REDUCING, reason="exchange outage, unwind only")
    reducing = claim(store, make_intent(strategy="fourth"), policy)  # flat: nothing to reduce
    assert reducing.reason is BlockReason.HALTED and "REDUCING" in reducing.message
    assert [a.reason for a in store.attempts(blocked=True)] == [BlockReason.HALTED] * 3


def test_a_halt_set_through_one_store_instance_is_seen_by_the_next_claim_of_another(
    store: Store, clock: FakeClock, open_same_ledger: Callable[..., Store]
) -> None:
    other = open_same_ledger(store, clock=clock)
    assert other.namespace == store.namespace
    claimed(claim(store, fresh(), EACH))
    record = halt(other, "strategy=spx-calendar", reason="seen from the other host", actor="operator bob@host-b")
    blocked = claim(store, fresh(), EACH)
    assert blocked.reason is BlockReason.HALTED and blocked.halt == record
    assert store.halts() == other.halts() == [record]
    resume(other, "strategy=spx-calendar")
    claimed(claim(store, fresh(), EACH))
    halt(store, "global", TradingState.REDUCING, reason="unwind only")
    assert claim(other, fresh(), EACH).reason is BlockReason.HALTED
    assert [e.state for e in other.halt_history()] == [TradingState.REDUCING, TradingState.ACTIVE, TradingState.HALTED]


def test_reducing_allows_only_orders_that_shrink_the_ledger_position(store: Store) -> None:
    fill(store, claim(store, fresh(quantity=10), EACH), 10)  # long 10 SPX
    halt(store, "account=main,symbol=SPX", TradingState.REDUCING, reason="wind down")
    sell4 = claimed(claim(store, fresh(side="SELL", quantity=4), EACH))  # working: 4
    too_big = claim(store, fresh(side="SELL", quantity=7), EACH)  # 4 working + 7 > 10
    assert too_big.reason is BlockReason.HALTED
    assert "position in SPX for account main is 10" in too_big.message and "REDUCING" in too_big.message
    sell6 = claimed(claim(store, fresh(side="SELL", quantity=6), EACH))  # 4 + 6 = 10
    assert claim(store, fresh(side="SELL", quantity=1), EACH).reason is BlockReason.HALTED
    assert claim(store, fresh(side="BUY", quantity=1), EACH).reason is BlockReason.HALTED
    claimed(claim(store, fresh(symbol="QQQ"), EACH))  # another symbol is not in the scope
    # Fills move the position; working reducing orders still count.
    store.transition(sell4.id, sell4.fence, State.FILLED, TransitionFields(filled_quantity=Decimal(4)))  # long 6
    assert claim(store, fresh(side="SELL", quantity=1), EACH).reason is BlockReason.HALTED  # 6 working
    sell6 = store.transition(sell6.id, sell6.fence, State.ACKED)
    store.transition(sell6.id, sell6.fence, State.CANCELED, TransitionFields(filled_quantity=Decimal(0)))
    assert claim(store, fresh(side="SELL", quantity=7), EACH).reason is BlockReason.HALTED
    claimed(claim(store, fresh(side="SELL", quantity=6), EACH))

    # A short position is reduced by buying.
    fill(store, claim(store, fresh(account="short", side="SELL", quantity=5), EACH), 5)  # short 5
    halt(store, "account=short", TradingState.REDUCING, reason="wind down")
    claimed(claim(store, fresh(account="short", side="BUY", quantity=3), EACH))
    assert claim(store, fresh(account="short", side="BUY", quantity=3), EACH).reason is BlockReason.HALTED
    assert claim(store, fresh(account="short", side="SELL", quantity=1), EACH).reason is BlockReason.HALTED
    claimed(claim(store, fresh(account="short", side="BUY", quantity=2), EACH))


def test_halt_history_says_who_and_why_and_scopes_are_canonical(store: Store) -> None:
    halt(store, " symbol=SPX , account=main ", reason="fat finger", actor="operator alice@desk-1")
    halt(store, "account=main,symbol=SPX", TradingState.REDUCING, reason="wind down", actor="operator bob@desk-1")
    (record,) = store.halts()
    assert (record.scope, record.state, record.reason, record.actor) == (
        "account=main,symbol=SPX", TradingState.REDUCING, "wind down", "operator bob@desk-1",
    )
    resume(store, "symbol=SPX,account=main", reason="all clear", actor="operator carol@desk-2")
    assert store.halts() == []
    history = [(e.scope, e.state, e.cause, e.reason, e.actor) for e in store.halt_history()]
    assert history == [
        ("account=main,symbol=SPX", TradingState.ACTIVE, HaltCause.OPERATOR, "all clear", "operator carol@desk-2"),
        ("account=main,symbol=SPX", TradingState.REDUCING, HaltCause.OPERATOR, "wind down", "operator bob@desk-1"),
        ("account=main,symbol=SPX", TradingState.HALTED, HaltCause.OPERATOR, "fat finger", "operator alice@desk-1"),
    ]
    with pytest.raises(ValueError, match="needs a reason"):
        halt(store, "global", reason="   ")
    for bad in ("venue=x", "strategy=", "strategy=a,strategy=b", "strategy", ""):
        with pytest.raises(InvalidPolicy):
            halt(store, bad)
    assert len(store.halt_history()) == 3 and store.halts() == []


# ----------------------------------------------------------------------- concurrency


def test_concurrent_claims_through_a_tripping_rate_limit_take_exactly_n(store: Store) -> None:
    policy = [RateLimit(10, 60, by=("strategy",), trip=True)]
    per_thread = 4

    def work(i: int) -> ClaimDecision:
        out = None
        for k in range(per_thread):
            out = claim(store, fresh(symbol=f"S{i}-{k}"), policy)
            results.append(out)
        assert out is not None
        return out

    results: list[ClaimDecision] = []
    race(8, work)
    assert len(results) == 32
    assert sum(d.claimed for d in results) == 10
    reasons = Counter(d.reason for d in results if not d.claimed)
    assert set(reasons) <= {BlockReason.RATE_LIMIT, BlockReason.HALTED}, reasons
    assert reasons[BlockReason.RATE_LIMIT] >= 1
    assert len(store.intents()) == 10 and len(store.attempts()) == 32
    events = [e for e in store.halt_history() if e.scope == "strategy=spx-calendar"]
    assert [(e.state, e.cause) for e in events] == [(TradingState.HALTED, HaltCause.RATE_LIMIT)]


def test_concurrent_reducing_orders_cannot_together_flip_the_position(store: Store) -> None:
    fill(store, claim(store, fresh(quantity=10), EACH), 10)  # long 10
    halt(store, "account=main,symbol=SPX", TradingState.REDUCING, reason="wind down")
    results = race(8, lambda i: claim(store, fresh(side="SELL", quantity=3), EACH))
    assert sum(d.claimed for d in results) == 3  # 3 x 3 = 9 <= 10; a fourth would make 12
    assert Counter(d.reason for d in results if not d.claimed) == {BlockReason.HALTED: 5}
    assert sum(r.quantity for r in store.intents() if r.side == "SELL") == 9
