"""Guard API semantics: submit, claim context manager, decorator, deadlines, operator tools."""

from __future__ import annotations

import asyncio
import logging
import time
from decimal import Decimal

import pytest

from orderguard import (
    AmbiguousOutcome,
    BlockReason,
    Ever,
    Guard,
    InvalidIntent,
    InvalidPolicy,
    NotClaimed,
    OncePer,
    OneOpen,
    OrderRejected,
    Outcome,
    SendDeadlineExceeded,
    State,
    current_claim,
)
from orderguard.brokers import OrderRequest, PaperBroker, PaperFaults
from tests.helpers import make_intent

ONCE = OncePer(Ever(), by=("strategy",))


def test_submit_sends_once_and_blocks_the_repeat(guard: Guard, broker: PaperBroker) -> None:
    first = guard.submit(make_intent(), broker, policy=ONCE)
    second = guard.submit(make_intent(source="manual"), broker, policy=ONCE)
    assert first.outcome is Outcome.SENT and first.state is State.FILLED and first
    assert first.order is not None and first.order.client_order_id == first.client_order_id
    assert second.outcome is Outcome.BLOCKED and not second
    assert second.reason is BlockReason.DUPLICATE and second.holder and second.holder.id == first.intent.id  # type: ignore[union-attr]
    assert len(broker.orders()) == 1


def test_default_policy_and_missing_policy(ledger_url: str, broker: PaperBroker) -> None:
    with Guard.open(ledger_url, policy=ONCE) as guard:
        assert guard.submit(make_intent(), broker).sent
        assert guard.submit(make_intent(), broker).blocked
    with Guard.open(ledger_url) as guard, pytest.raises(InvalidPolicy, match="no policy given"):
        guard.submit(make_intent(), broker)


def test_submit_rejects_non_intents(guard: Guard, broker: PaperBroker) -> None:
    with pytest.raises(InvalidIntent, match="OrderIntent"):
        guard.submit({"symbol": "SPX"}, broker, policy=ONCE)  # type: ignore[arg-type]
    assert guard.attempts() == []


def test_rejection_frees_the_scope(guard: Guard, paper_url: str) -> None:
    broker = PaperBroker.open(paper_url, reject_symbols=("SPX",))
    rejected = guard.submit(make_intent(), broker, policy=ONCE)
    assert rejected.sent and rejected.state is State.REJECTED and "not tradable" in (rejected.intent.note or "")  # type: ignore[union-attr]
    assert guard.submit(make_intent(symbol="NDX"), broker, policy=ONCE).state is State.FILLED


def test_wait_for_fill_records_the_fill(guard: Guard, paper_url: str) -> None:
    broker = PaperBroker.open(paper_url, fill_delay=0.3, partial_fills=2)
    result = guard.submit(make_intent(), broker, policy=ONCE, wait_for_fill=5)
    assert result.state is State.FILLED and result.intent and result.intent.filled_quantity == Decimal(4)
    no_wait = guard.submit(make_intent(strategy="other"), broker, policy=ONCE)
    assert no_wait.state is State.ACKED


def test_blocked_submits_log_an_operator_line(guard: Guard, broker: PaperBroker, caplog: pytest.LogCaptureFixture) -> None:
    first = guard.submit(make_intent(source="scheduler"), broker, policy=ONCE)
    with caplog.at_level(logging.WARNING, logger="orderguard"):
        guard.submit(make_intent(source="manual"), broker, policy=ONCE)
    line = caplog.records[-1]
    assert line.levelno == logging.WARNING
    text = line.getMessage()
    assert "BLOCKED DUPLICATE" in text and "spx-calendar SPX BUY 4" in text and "from manual" in text
    assert first.intent is not None and first.intent.id in text and "sent by scheduler" in text
    assert getattr(line, "holder_id") == first.intent.id  # noqa: B009 - structured field


def test_claim_context_reports_the_venue_answer(guard: Guard, broker: PaperBroker) -> None:
    with guard.claim(make_intent(), policy=ONCE) as claim:
        assert claim and claim.send_started is False
        order = broker.submit(claim.request())  # hands the client order id out
        assert claim.intent.state is State.CLAIMED
        assert claim.send_started is True
        claim.acked(order.broker_order_id)
        claim.filled(Decimal(4), Decimal(100))
    rec = guard.intent(claim.intent.id)
    assert rec.state is State.FILLED and rec.broker_order_id == order.broker_order_id


def test_claim_exception_before_send_abandons_and_frees(guard: Guard) -> None:
    with pytest.raises(RuntimeError), guard.claim(make_intent(), policy=ONCE):
        raise RuntimeError("price feed down")
    assert guard.intents()[0].state is State.ABANDONED
    with guard.claim(make_intent(), policy=ONCE) as again:
        assert again  # the scope was freed
        again.abandon("changed my mind")


def test_claim_exception_after_send_started_is_unknown(guard: Guard) -> None:
    with pytest.raises(TimeoutError), guard.claim(make_intent(), policy=ONCE) as claim:
        assert claim.client_order_id.startswith("og-")
        raise TimeoutError("broker did not answer")
    rec = guard.intents()[0]
    assert rec.state is State.UNKNOWN and "TimeoutError" in (rec.note or "")
    with guard.claim(make_intent(), policy=ONCE) as blocked:
        assert not blocked and blocked.reason is BlockReason.UNKNOWN_PENDING
        assert blocked.existing is not None and blocked.existing.id == rec.id
        with pytest.raises(NotClaimed):
            _ = blocked.client_order_id


def test_claim_lost_ack_is_unknown_however_the_id_was_read(guard: Guard, paper_url: str) -> None:
    broker = PaperBroker.open(paper_url, faults=PaperFaults(lose_ack=-1))
    for n, read in enumerate((lambda c: c.request(), lambda c: OrderRequest.from_record(c.intent))):
        with pytest.raises(AmbiguousOutcome), guard.claim(make_intent(strategy=f"s{n}"), policy=ONCE) as claim:
            broker.submit(read(claim))
        rec = guard.intents(strategy=f"s{n}")[0]
        assert rec.state is State.UNKNOWN, rec
        assert guard.submit(make_intent(strategy=f"s{n}"), broker, policy=ONCE).reason is BlockReason.UNKNOWN_PENDING
    assert len(broker.orders()) == 2  # one per intent, never a second


def test_claim_broker_errors_are_never_read_as_not_sent(guard: Guard) -> None:
    with pytest.raises(AmbiguousOutcome), guard.claim(make_intent(), policy=ONCE):
        raise AmbiguousOutcome("timeout from an adapter that built its own request")
    assert guard.intents()[0].state is State.UNKNOWN
    with pytest.raises(OrderRejected), guard.claim(make_intent(strategy="r"), policy=ONCE):
        raise OrderRejected("insufficient buying power")
    assert guard.intents(strategy="r")[0].state is State.REJECTED


def test_submit_past_the_send_deadline_is_not_sent_and_frees_the_scope(ledger_url: str, paper_url: str) -> None:
    class SlowLink(PaperBroker):
        def submit(self, order: OrderRequest):  # type: ignore[no-untyped-def]
            time.sleep(0.3)  # the process stalls between the claim and the network write
            return super().submit(order)

    with Guard.open(ledger_url, send_deadline=0.1) as guard:
        result = guard.submit(make_intent(), SlowLink(paper_url.removeprefix("sqlite:///")), policy=ONCE)
        assert result.outcome is Outcome.NOT_SENT and result.state is State.ABANDONED
        again = guard.submit(make_intent(), PaperBroker.open(paper_url), policy=ONCE)
        assert again.sent and len(PaperBroker.open(paper_url).orders()) == 1


def test_claim_that_ends_silently_after_send_is_unknown(guard: Guard) -> None:
    with guard.claim(make_intent(), policy=ONCE) as claim:
        _ = claim.client_order_id
    assert guard.intents()[0].state is State.UNKNOWN
    with pytest.raises(NotClaimed), guard.claim(make_intent(strategy="b"), policy=ONCE) as claim:
        _ = claim.client_order_id
        claim.abandon("too late: the id was handed out")


def test_claim_past_its_send_deadline_refuses_the_id(ledger_url: str) -> None:
    with Guard.open(ledger_url, send_deadline=0.05, stale_after=1) as guard:
        with pytest.raises(SendDeadlineExceeded), guard.claim(make_intent(), policy=ONCE) as claim:
            time.sleep(0.1)
            _ = claim.client_order_id
        assert guard.intents()[0].state is State.ABANDONED


def test_once_decorator(guard: Guard, broker: PaperBroker) -> None:
    calls: list[str] = []

    @guard.once(policy=ONCE, intent=make_intent())
    def execute_calendar_spread_entry() -> str:
        claim = current_claim()
        assert claim is not None
        calls.append(claim.client_order_id)
        broker.submit(OrderRequest.from_record(claim.intent))
        return "entered"

    assert execute_calendar_spread_entry() == "entered"
    second = execute_calendar_spread_entry()
    assert not second and second.reason is BlockReason.IN_FLIGHT  # ACKED by the function's return
    assert len(calls) == 1 and len(broker.orders()) == 1
    assert guard.intents()[0].state is State.ACKED


def test_once_decorator_exception_is_unknown_and_intent_from_arguments(guard: Guard) -> None:
    @guard.once(policy=OneOpen(by=("symbol",)), intent=lambda symbol: make_intent(symbol=symbol))
    def enter(symbol: str) -> None:
        raise ConnectionError("reset by peer")

    with pytest.raises(ConnectionError):
        enter("AAPL")
    assert guard.intents()[0].state is State.UNKNOWN
    assert enter("AAPL").reason is BlockReason.UNKNOWN_PENDING
    with pytest.raises(ConnectionError):
        enter("MSFT")


def test_async_decorator_and_aclaim(guard: Guard) -> None:
    ran: list[int] = []

    @guard.once(policy=ONCE, intent=make_intent())
    async def entry() -> int:
        ran.append(1)
        await asyncio.sleep(0)
        return 7

    async def main() -> tuple[object, object, object]:
        first = await entry()
        second = await entry()
        async with guard.aclaim(make_intent(strategy="async"), policy=ONCE) as claim:
            coid = claim.client_order_id
            claim.filled()
        return first, second, coid

    first, second, coid = asyncio.run(main())
    assert first == 7 and not second and ran == [1]
    assert guard.intent(str(coid)).state is State.FILLED


def test_asubmit_records_the_task_name(guard: Guard, broker: PaperBroker) -> None:
    async def main() -> None:
        await asyncio.create_task(guard.asubmit(make_intent(), broker, policy=ONCE), name="entry-SPX")

    asyncio.run(main())
    assert guard.attempts()[0].task == "entry-SPX"
    assert guard.intents()[0].task == "entry-SPX"


def test_unclassified_broker_error_is_unknown_and_reraised(guard: Guard, broker: PaperBroker) -> None:
    class BuggyBroker(PaperBroker):
        def submit(self, order: OrderRequest):  # type: ignore[no-untyped-def]
            raise KeyError("adapter bug")

    buggy = BuggyBroker(broker.path)
    with pytest.raises(KeyError):
        guard.submit(make_intent(), buggy, policy=ONCE)
    assert guard.intents()[0].state is State.UNKNOWN  # fail safe: never read as "not sent"


def test_ack_lost_then_retry_is_blocked(guard: Guard, paper_url: str) -> None:
    broker = PaperBroker.open(paper_url, faults=PaperFaults(lose_ack=1))
    lost = guard.submit(make_intent(), broker, policy=ONCE)
    assert lost.outcome is Outcome.SENT and lost.state is State.UNKNOWN
    retry = guard.submit(make_intent(), broker, policy=ONCE)
    assert retry.reason is BlockReason.UNKNOWN_PENDING and len(broker.orders()) == 1


def test_resolve_and_mark_closed(guard: Guard, broker: PaperBroker) -> None:
    policy = OneOpen(by=("symbol",))
    sent = guard.submit(make_intent(), broker, policy=policy)
    assert sent.intent is not None
    assert guard.submit(make_intent(), broker, policy=policy).reason is BlockReason.OPEN_POSITION
    guard.mark_closed(sent.intent.client_order_id)
    assert guard.submit(make_intent(), broker, policy=policy).sent
    lost = guard.submit(make_intent(symbol="NDX"), PaperBroker.open(f"sqlite:///{broker.path}", faults=PaperFaults(disconnect=1)), policy=policy)
    assert lost.state is State.UNKNOWN
    resolved = guard.resolve(lost.client_order_id or "", State.NOT_FOUND, note="checked the venue's blotter")
    assert resolved.state is State.NOT_FOUND and resolved.fence > lost.intent.fence  # type: ignore[union-attr]
    assert "operator" in (resolved.note or "")


def test_reconcile_never_frees_a_decorated_call_that_is_still_running(guard: Guard, broker: PaperBroker) -> None:
    runs: list[str] = []

    @guard.once(policy=ONCE, intent=make_intent())
    def slow_entry() -> None:
        runs.append("ran")
        # Meanwhile an operator (or cron) reconciles as aggressively as it can.
        report = guard.reconcile(broker, grace=0, stale_after=0)
        assert report.decisions == []
        assert [d.before for d in report.unresolved] == [State.CLAIMED]
        assert "controls the send" in report.unresolved[0].why
        assert not guard.submit(make_intent(), broker, policy=ONCE)  # still held

    slow_entry()
    assert runs == ["ran"] and guard.intents()[0].state is State.ACKED
    assert not slow_entry() and runs == ["ran"]


def test_decorated_call_taken_over_meanwhile_keeps_the_takeover(guard: Guard) -> None:
    @guard.once(policy=ONCE, intent=make_intent())
    def entry() -> str:
        rec = guard.intents()[0]
        guard.resolve(rec.id, State.FILLED, note="filled by hand while the bot hung")
        return "done"

    assert entry() == "done"  # the function returned; its late ACKED is refused, not raised
    rec = guard.intents()[0]
    assert rec.state is State.FILLED and "operator" in (rec.note or "")
