"""Operator-facing wording: what was blocked, by which earlier attempt, and what to do next."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .store.base import BlockReason

if TYPE_CHECKING:
    from .intent import OrderIntent
    from .policies import ScopeRule
    from .store.base import IntentRecord

_NEXT_STEP = {
    BlockReason.DUPLICATE: "this scope already executed in its window; if a second order is "
    "really intended, give it its own window or cycle",
    BlockReason.IN_FLIGHT: "the earlier attempt is still being sent; wait for its outcome "
    "(`orderguard show {holder}`)",
    BlockReason.UNKNOWN_PENDING: "the earlier order's outcome is unknown; reconcile it "
    "(`orderguard reconcile --broker ...` or guard.reconcile(broker) looks it up at the broker by "
    "client order id) before trading this scope again",
    BlockReason.CONFLICT: "a different order holds this scope while it is open; let it finish or "
    "cancel it first, or narrow the policy's by= if both orders are intended",
    BlockReason.COOLDOWN: "the scope is cooling down; the next attempt is allowed after {until}",
    BlockReason.OPEN_POSITION: "a position from this scope is still open; close it and call "
    "guard.mark_closed('{holder}') first",
    BlockReason.MAX_OPEN: "the scope has its maximum of open intents; close one and call "
    "guard.mark_closed(...) first",
}


def clock_text(epoch: float) -> str:
    """``2026-11-20 14:45:00.002Z``: millisecond UTC, as operators compare log lines."""
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def block_message(
    reason: BlockReason, intent: OrderIntent, rule: ScopeRule, holder: IntentRecord | None
) -> str:
    """One line that an operator can act on at 9:45."""
    head = f"BLOCKED {reason.value}: {intent.describe()} from {intent.source} — {rule.policy}"
    if holder is None:
        held = f" refused scope {rule.key}"
        until = "the cooldown"
    else:
        held = (
            f": scope {rule.key} is held by intent {holder.id} ({holder.client_order_id}, "
            f"{holder.state.value}) sent by {holder.who()} at {clock_text(holder.created_at)}"
        )
        until = clock_text(holder.created_at + rule.seconds)
    step = _NEXT_STEP[reason].format(holder=holder.id if holder else "?", until=until)
    return f"{head}{held}. Nothing was sent. Next: {step}."
