"""Claim: one arbitrated attempt, and the owner's handle on its intent afterwards."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from .brokers.base import OrderRequest
from .errors import BrokerError, FencedOut, NotClaimed, OrderNotSent, OrderRejected, SendDeadlineExceeded, StoreError
from .states import PENDING, State
from .store.base import BlockReason, ClaimDecision, IntentRecord, TransitionFields

if TYPE_CHECKING:
    from collections.abc import Callable
    from decimal import Decimal

    from .brokers.base import BrokerOrder
    from .store.base import Store

log = logging.getLogger("orderguard")
_current: contextvars.ContextVar[Claim | None] = contextvars.ContextVar("orderguard_claim", default=None)


class Outcome(StrEnum):
    """What happened to an attempt."""

    SENT = "SENT"  # the order went to the venue (see ``state`` for its answer)
    BLOCKED = "BLOCKED"  # a policy refused it; nothing was sent
    NOT_SENT = "NOT_SENT"  # claimed, then abandoned before anything was sent


@dataclass(frozen=True)
class SubmitResult:
    """The result of an attempt. Blocked is a normal result, not an exception.

    ``intent`` is this attempt's intent (None when blocked); ``holder`` the earlier intent that
    holds the scope (when blocked); ``message`` the operator-facing line.
    """

    outcome: Outcome
    message: str
    attempt_id: int
    intent: IntentRecord | None = None
    reason: BlockReason | None = None
    holder: IntentRecord | None = None
    order: BrokerOrder | None = None
    # NOT_SENT because the adapter refused the order as the venue cannot take it (OrderNotSent):
    # sending it again unchanged will not help. False for a deadline or an unreachable venue.
    unsendable: bool = False

    @property
    def sent(self) -> bool:
        return self.outcome is Outcome.SENT

    @property
    def blocked(self) -> bool:
        return self.outcome is Outcome.BLOCKED

    @property
    def state(self) -> State | None:
        """The intent's state after the call (UNKNOWN when the venue's answer was lost)."""
        return self.intent.state if self.intent else None

    @property
    def client_order_id(self) -> str | None:
        return self.intent.client_order_id if self.intent else None

    def __bool__(self) -> bool:
        return self.sent


def current_claim() -> Claim | None:
    """The claim held by the enclosing ``@guard.once`` call, if any."""
    return _current.get()


class Claim:
    """A claim on an intent's scopes.

    Falsy when blocked. When held, the owner sends with :attr:`client_order_id` and reports
    the venue's answer with :meth:`acked`, :meth:`filled`, :meth:`rejected`, ... Every report is
    a compare-and-set on the claim's fencing token: once the reconciler or an operator has taken
    the intent over, a late report is refused (logged, and the ledger's truth kept).
    """

    def __init__(
        self, store: Store, decision: ClaimDecision, *, send_deadline: float, started: float,
        observer: Callable[[str, IntentRecord, str], None] | None = None,
    ) -> None:
        self._store = store
        self._observer = observer  # told of UNKNOWN outcomes and ledger write failures (breakers)
        self.decision = decision
        self._record = decision.intent
        # The owner's fencing token: never refreshed from the ledger, so once the reconciler has
        # taken the intent over every later report of this owner stays refused.
        self._fence = decision.intent.fence if decision.intent else 0
        # Counted from before the claim was written (conservative: the reconciler ages the
        # intent from its recorded creation, which precedes the commit).
        self._claimed_at = started
        self._send_deadline = send_deadline
        self.send_started = False  # set once the client order id was handed out
        self.reported = False

    # ------------------------------------------------------------------------- reading

    @property
    def allowed(self) -> bool:
        return self.decision.claimed

    @property
    def blocked(self) -> bool:
        return not self.decision.claimed

    def __bool__(self) -> bool:
        return self.decision.claimed

    @property
    def reason(self) -> BlockReason | None:
        return self.decision.reason

    @property
    def holder(self) -> IntentRecord | None:
        """The intent holding the scope, when blocked."""
        return self.decision.holder

    @property
    def existing(self) -> IntentRecord | None:
        """When blocked by an identical intent (IN_FLIGHT, DUPLICATE, UNKNOWN_PENDING): that intent."""
        holder = self.decision.holder
        if holder is not None and self.decision.reason is not BlockReason.CONFLICT:
            return holder
        return None

    @property
    def message(self) -> str:
        return self.decision.message

    @property
    def intent(self) -> IntentRecord:
        """This claim's intent as last written by this owner.

        It carries the client order id, so reading it counts as handing the id out: from then
        on an exception in the ``with`` block leaves the intent UNKNOWN, not ABANDONED.
        """
        record = self._held()
        self.send_started = True
        return record

    def _held(self) -> IntentRecord:
        if self._record is None:
            raise NotClaimed(self.decision.message)
        return self._record

    @property
    def send_by(self) -> float:
        """``time.monotonic()`` after which this claim must not be sent any more."""
        return self._claimed_at + self._send_deadline

    def _hand_out(self) -> IntentRecord:
        """Check the send deadline (monotonic and store clock), then mark the send as started."""
        record = self._held()
        if not self.send_started:
            late = time.monotonic() > self.send_by or self._past_recorded_deadline(record)
            if late:
                raise SendDeadlineExceeded(
                    f"claim {record.client_order_id} is {time.monotonic() - self._claimed_at:.1f}s old, "
                    f"past the {self._send_deadline:g}s send deadline; nothing was sent"
                )
        self.send_started = True
        return record

    def start_opaque(self) -> None:
        """An opaque body (a decorated function) is about to run: it may send at any moment, so
        the send starts now. Under a leader lease, a claim whose lease lapsed (a standby may lead)
        does not start: SendDeadlineExceeded, nothing sent."""
        record = self._held()
        if record.send_by_at is not None and self._past_recorded_deadline(record):
            raise SendDeadlineExceeded(
                f"claim {record.client_order_id}: its leader lease lapsed before the function started; nothing was sent"
            )
        self.send_started = True

    def _past_recorded_deadline(self, record: IntentRecord) -> bool:
        """The deadline in the ledger, on the store's clock (immune to a suspended host's
        monotonic clock). An unreachable store cannot say, so the claim is not sent."""
        if record.send_by_at is None:
            return False
        try:
            return self._store.now() > record.send_by_at
        except StoreError as exc:  # fail closed: nothing is sent without a store that can vouch for it
            raise SendDeadlineExceeded(
                f"the ledger cannot confirm that {record.client_order_id} is within its send deadline "
                f"({exc}); nothing was sent"
            ) from exc

    @property
    def client_order_id(self) -> str:
        """The id to send with. Reading it marks the send as started (an error then is UNKNOWN)."""
        return self._hand_out().client_order_id

    def request(self) -> OrderRequest:
        """The order to send, with its client order id and send deadline (adapters check it)."""
        return OrderRequest.from_record(self._hand_out(), send_by=self.send_by)

    # ----------------------------------------------------------------------- reporting

    def acked(self, broker_order_id: str | None = None) -> IntentRecord:
        """The venue accepted the order."""
        return self._move(State.ACKED, TransitionFields(broker_order_id=broker_order_id))

    def partially_filled(
        self, filled_quantity: Decimal, average_price: Decimal | None = None, broker_order_id: str | None = None
    ) -> IntentRecord:
        return self._move(State.PARTIALLY_FILLED, TransitionFields(broker_order_id, filled_quantity, average_price))

    def filled(
        self, filled_quantity: Decimal | None = None, average_price: Decimal | None = None,
        broker_order_id: str | None = None,
    ) -> IntentRecord:
        """Completely filled (``filled_quantity`` defaults to the intent's quantity)."""
        qty = self._held().quantity if filled_quantity is None else filled_quantity
        return self._move(State.FILLED, TransitionFields(broker_order_id, qty, average_price))

    def rejected(self, reason: str) -> IntentRecord:
        """The venue definitely refused it: nothing executed, the scope is free again."""
        return self._move(State.REJECTED, TransitionFields(note=reason))

    def canceled(self, filled_quantity: Decimal | None = None) -> IntentRecord:
        return self._move(State.CANCELED, TransitionFields(filled_quantity=filled_quantity))

    def unknown(self, reason: str) -> IntentRecord:
        """The outcome is unknown (timeout, reset, 5xx): blocks the scope until reconciled."""
        record = self._move(State.UNKNOWN, TransitionFields(note=reason))
        log.error(
            "ORDER OUTCOME UNKNOWN: %s %s (%s): %s. The scope stays blocked (UNKNOWN_PENDING) until "
            "`orderguard reconcile --broker ...` (or guard.reconcile(broker)) looks it up at the broker; "
            "do not resend by hand.",
            record.strategy, record.symbol, record.client_order_id, reason,
            extra={"intent_id": record.id, "client_order_id": record.client_order_id},
        )
        return record

    def abandon(self, reason: str) -> IntentRecord:
        """Nothing was sent: free the scope. Refused once the client order id was handed out."""
        if self.send_started:
            raise NotClaimed(
                f"{self._held().client_order_id} was handed out, so the order may have been sent; "
                "report unknown() instead of abandoning it"
            )
        return self._move(State.ABANDONED, TransitionFields(note=reason))

    def not_sent(self, reason: str) -> IntentRecord:
        """The adapter proved nothing left (send deadline passed, or it refused the order): ABANDONED."""
        return self._move(State.ABANDONED, TransitionFields(note=reason))

    def record(self, order: BrokerOrder) -> IntentRecord:
        """Record the venue's view of the order (status, fills, broker id)."""
        target = order.status.state
        facts = TransitionFields(
            broker_order_id=order.broker_order_id,
            filled_quantity=order.filled_quantity,
            average_price=order.average_price,
        )
        current = self._held()
        if target is current.state and target is not State.PARTIALLY_FILLED:
            return current
        return self._move(target, facts)

    def _move(self, target: State, facts: TransitionFields) -> IntentRecord:
        current = self._held()
        try:
            self._record = self._store.transition(current.id, self._fence, target, facts)
        except FencedOut as exc:
            log.warning("late report refused by the fence: %s", exc, extra={"intent_id": current.id})
            with contextlib.suppress(StoreError):
                self._record = self._store.get(current.id)  # show the ledger's truth, keep our fence
            raise
        except StoreError as exc:
            if self._observer is not None and self.send_started:
                self._observer("store_failure", current, f"{type(exc).__name__}: {exc}")
            raise
        self.reported = True
        if target is State.UNKNOWN and self._observer is not None:
            self._observer("unknown", self._record, facts.note or "")
        return self._record

    # --------------------------------------------------------------- context management

    def finish(self, exc: BaseException | None) -> None:
        """Settle the claim at the end of a ``with`` block or decorated call.

        Fail safe: only what proves nothing was sent frees the scope (ABANDONED): an exception
        or a silent end before the client order id was handed out, SendDeadlineExceeded or OrderNotSent. A
        venue rejection is REJECTED. Anything else after the id was handed out, and any other
        broker error, is UNKNOWN: never released, never retried blindly.
        """
        record = self._record
        if record is None or record.state not in PENDING:
            return
        try:
            if isinstance(exc, (SendDeadlineExceeded, OrderNotSent)):
                self.not_sent(str(exc))
            elif isinstance(exc, OrderRejected):
                self.rejected(str(exc))
            elif not self.send_started and not isinstance(exc, BrokerError):
                why = f"no send: {type(exc).__name__}: {exc}" if exc else "the block ended without sending"
                self.abandon(why)
            elif exc is not None:
                self.unknown(f"{type(exc).__name__} after the send may have started: {exc}")
            else:
                self.unknown("the block ended without reporting the venue's answer")
        except FencedOut:
            pass  # the reconciler already settled it
