"""What a guard does when something goes wrong around an order: alerts and automatic halts.

A refused claim becomes a BLOCKED or HALTED alert; an UNKNOWN outcome an UNKNOWN alert and,
past ``halt_after_unknown`` of one strategy, a halt; a ledger that fails to record a sent order's
outcome, or a venue that already knows a client order id, halts the strategy. A halt the ledger
cannot take yet is kept here and written before the guard's next claim (fail closed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import TYPE_CHECKING

from .alerts import AlertKind
from .errors import StoreError
from .halts import HaltCause, HaltRecord, TradingState
from .policies import canonical_halt_scope, scope_text
from .states import State
from .store.base import BlockReason, this_host

if TYPE_CHECKING:
    from .alerts import Notifier
    from .store.base import ClaimDecision, IntentRecord, Store

log = logging.getLogger("orderguard")


class Breakers:
    """A guard's alerts and automatic halts (one per Guard; safe to share between threads)."""

    def __init__(
        self, store: Store, alerts: Notifier | None, runner: str, *,
        halt_after_unknown: int | None, halt_on_ledger_failure: bool,
    ) -> None:
        self.store = store
        self.alerts = alerts
        self.runner = runner
        self.halt_after_unknown = halt_after_unknown
        self.halt_on_ledger_failure = halt_on_ledger_failure
        self.pending: list[tuple[str, HaltCause, str]] = []  # halts the ledger could not take yet
        self._lock = threading.Lock()

    def after_fork(self) -> None:
        self._lock = threading.Lock()  # the parent's may have been copied while held

    def actor(self) -> str:
        return f"runner {self.runner} on {this_host()} pid {os.getpid()}"

    # ------------------------------------------------------------------------- alerts

    def blocked(self, decision: ClaimDecision) -> None:
        """Alert a refused claim: HALTED (per halt scope) or BLOCKED (per scope key)."""
        if self.alerts is None or decision.reason in (None, BlockReason.NOT_LEADER):
            return
        if decision.halt is not None and (decision.reason is BlockReason.HALTED or decision.tripped):
            kind, scope = AlertKind.HALTED, decision.halt.scope
            message = (f"BREAKER TRIPPED, {scope} HALTED: " if decision.tripped else "") + decision.message
        else:
            kind = AlertKind.BLOCKED
            scope = decision.rule.key if decision.rule is not None else str(decision.reason)
            message = decision.message
        self.alerts.notify(kind, scope, message, reason=str(decision.reason))

    def observe(self, event: str, record: IntentRecord, detail: str) -> None:
        """Claims report UNKNOWN outcomes and ledger write failures here. Never raises."""
        try:
            if event == "unknown":
                self._unknown_seen(record, detail)
            elif event == "store_failure" and self.halt_on_ledger_failure:
                self.halt_later(
                    record.strategy, HaltCause.LEDGER_WRITE_FAILURE,
                    f"recording the outcome of {record.client_order_id} ({record.symbol}) failed: {detail}; "
                    "reconcile it once the ledger is back",
                )
        except Exception:
            log.exception("breaker check after %s of %s failed", event, record.client_order_id)

    def _unknown_seen(self, record: IntentRecord, detail: str) -> None:
        if self.alerts is not None:
            self.alerts.notify(
                AlertKind.UNKNOWN, scope_text(strategy=record.strategy, symbol=record.symbol),
                f"ORDER OUTCOME UNKNOWN: {record.strategy} {record.symbol} {record.side} {record.quantity} "
                f"({record.client_order_id}): {detail}. Run `orderguard reconcile --broker ...`.",
            )
        if self.halt_after_unknown is None:
            return
        scope = scope_text(strategy=record.strategy)
        try:
            unknown = self.store.intents(states=[State.UNKNOWN], strategy=record.strategy, limit=self.halt_after_unknown)
            if len(unknown) < self.halt_after_unknown:
                return
            why = (
                f"{len(unknown)} orders of strategy {record.strategy} have unknown outcomes (latest "
                f"{record.client_order_id}: {detail}); the venue or the network is failing"
            )
            self.halt(scope, reason=why, cause=HaltCause.UNKNOWN_OUTCOMES, keep_existing=True)
        except StoreError as exc:  # cannot count or record: halt when the ledger is back (fail closed)
            self.halt_later(
                record.strategy, HaltCause.UNKNOWN_OUTCOMES,
                f"{record.client_order_id} ended UNKNOWN ({detail}) and the ledger failed while counting "
                f"this strategy's UNKNOWN orders ({exc})",
            )

    # -------------------------------------------------------------------------- halts

    def halt_later(self, strategy: str, cause: HaltCause, reason: str) -> None:
        """Halt a strategy now if the ledger takes it, else before this guard's next claim."""
        scope = scope_text(strategy=strategy)
        with self._lock:
            self.pending.append((scope, cause, reason))
        log.error(
            "HALTING %s (%s): %s. Recorded in the ledger now, or if it cannot take writes, before this "
            "runner's next claim (until then only this runner is stopped).", scope, cause.value, reason,
        )
        if self.alerts is not None:
            self.alerts.notify(AlertKind.HALTED, scope, f"HALTING {scope} ({cause.value}): {reason}")
        with contextlib.suppress(StoreError):
            self.record_pending()

    def record_pending(self) -> None:
        """Write halts that failed to reach the ledger; a failure here fails the claim (closed)."""
        with self._lock:
            pending, self.pending = self.pending, []
        try:
            while pending:
                scope, cause, reason = pending[0]
                self.halt(scope, reason=reason, cause=cause, keep_existing=True, notify=False)
                pending.pop(0)
        finally:
            if pending:
                with self._lock:
                    self.pending[:0] = pending

    def halt(
        self,
        scope: str,
        *,
        reason: str,
        reducing: bool = False,
        cause: HaltCause = HaltCause.OPERATOR,
        keep_existing: bool = False,
        notify: bool = True,
        actor: str | None = None,
    ) -> HaltRecord | None:
        """See :meth:`Guard.halt`."""
        scope = canonical_halt_scope(scope)
        state = TradingState.REDUCING if reducing else TradingState.HALTED
        record = self.store.set_trading_state(
            scope, state, cause=cause, reason=reason, actor=actor or self.actor(), keep_existing=keep_existing
        )
        if keep_existing and record is not None and (record.cause, record.reason) != (cause, reason.strip()):
            return None  # it was already halted: its first cause stands
        log.error("%s %s (%s): %s. Resume with `orderguard resume '%s' --reason ...`.", state.value, scope, cause.value, reason, scope)
        if notify and self.alerts is not None:
            self.alerts.notify(AlertKind.HALTED, scope, f"{state.value} {scope} ({cause.value}): {reason}")
        return record

    def resume(self, scope: str, *, reason: str, actor: str | None = None) -> None:
        scope = canonical_halt_scope(scope)
        self.store.set_trading_state(
            scope, TradingState.ACTIVE, cause=HaltCause.OPERATOR, reason=reason, actor=actor or self.actor()
        )
        log.warning("ACTIVE %s again (%s: %s)", scope, actor or self.actor(), reason)
