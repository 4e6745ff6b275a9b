"""Reconciliation: the only way an UNKNOWN intent is resolved (DESIGN invariant 4).

For every intent whose outcome the ledger does not know (CLAIMED, SENDING, UNKNOWN) or that is
still working (ACKED, PARTIALLY_FILLED), the reconciler looks the order up at the venue by its
client order id and records what the venue says, taking the intent over with a new fencing
token so a paused former owner cannot overwrite the decision.

A pending intent the venue does not show is only given up when its owner cannot send it any
more: the owner process is gone (same host: pid and start time), or, for a SENDING intent whose
owner enforces a send deadline, ``stale_after`` seconds past that recorded deadline. A claim()
body or decorated function controls its own send, so only its death frees its intent.

"Not found" is only believed after two lookups at least ``grace`` seconds apart (venues show
an accepted order with a lag); only then does the intent become NOT_FOUND and free its scope.
Finally it compares the ledger's filled positions with the venue's positions (drift).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

from . import _crash
from .errors import FencedOut, InvalidTransition, OrderGuardError
from .halts import HaltCause, HaltRecord, TradingState
from .intent import canonical_decimal
from .states import PENDING, State, can_transition
from .store.base import TransitionFields, owner_alive

if TYPE_CHECKING:
    from .alerts import Notifier
    from .brokers.base import Broker, BrokerOrder
    from .runners import RunnerRecord
    from .store.base import IntentRecord, Store

log = logging.getLogger("orderguard.reconcile")
_OPEN_STATES = (State.CLAIMED, State.SENDING, State.UNKNOWN, State.ACKED, State.PARTIALLY_FILLED)


@dataclass(frozen=True)
class Decision:
    """What the reconciler concluded about one intent, and why."""

    intent_id: str
    client_order_id: str
    strategy: str
    symbol: str
    before: State
    after: State | None  # None: left as it was
    why: str


@dataclass(frozen=True)
class Drift:
    """The ledger's filled position differs from the venue's."""

    account: str
    symbol: str
    ledger: Decimal
    broker: Decimal

    @property
    def difference(self) -> Decimal:
        return self.broker - self.ledger


@dataclass
class ReconcileReport:
    decisions: list[Decision] = field(default_factory=list)  # intents whose state changed
    unresolved: list[Decision] = field(default_factory=list)  # still open, with the reason
    drift: list[Drift] = field(default_factory=list)
    drift_error: str | None = None  # the position check itself failed
    halts: list[HaltRecord] = field(default_factory=list)  # scopes halted because of drift

    @property
    def clean(self) -> bool:
        return not self.unresolved and not self.drift and self.drift_error is None

    def lines(self) -> list[str]:
        """One operator-readable line per decision, open question and drift."""
        out = [f"{d.client_order_id} {d.strategy} {d.symbol}: {d.before.value} -> {d.after.value if d.after else '-'}: {d.why}" for d in self.decisions]
        out += [f"{d.client_order_id} {d.strategy} {d.symbol}: still {d.before.value}: {d.why}" for d in self.unresolved]
        out += [f"DRIFT {x.account} {x.symbol}: ledger {x.ledger}, venue {x.broker} (difference {x.difference})" for x in self.drift]
        if self.drift_error:
            out.append(f"DRIFT CHECK FAILED: {self.drift_error}")
        out += [f"HALTED {h.scope}: {h.reason}" for h in self.halts]
        return out


def _decision(rec: IntentRecord, after: State | None, why: str) -> Decision:
    return Decision(rec.id, rec.client_order_id, rec.strategy, rec.symbol, rec.state, after, why)


class _Reconciler:
    def __init__(self, store: Store, broker: Broker, grace: float, stale_after: float) -> None:
        self.store, self.broker, self.grace, self.stale_after = store, broker, grace, stale_after
        self.report = ReconcileReport()
        self._runners: list[RunnerRecord] | None = None

    def lookup(self, rec: IntentRecord) -> tuple[bool, BrokerOrder | None]:
        try:
            order = self.broker.lookup(rec.client_order_id, symbol=rec.symbol)
        except Exception as exc:  # a failed lookup proves nothing either way
            self.report.unresolved.append(_decision(rec, None, f"lookup at {self.broker.name} failed: {exc}"))
            return False, None
        _crash.point("reconcile_after_lookup")
        return True, order

    def write(self, rec: IntentRecord, target: State, facts: TransitionFields, why: str) -> IntentRecord | None:
        try:
            new = self.store.transition(rec.id, rec.fence, target, facts, take_over=True)
        except FencedOut:
            self.report.unresolved.append(_decision(rec, None, "its owner updated it during reconciliation; run again"))
            return None
        self.report.decisions.append(_decision(rec, target, why))
        log.info("reconciled %s: %s -> %s: %s", rec.client_order_id, rec.state.value, target.value, why)
        return new

    def apply(self, rec: IntentRecord, order: BrokerOrder) -> None:
        target = order.status.state
        facts = TransitionFields(order.broker_order_id, order.filled_quantity, order.average_price)
        if target is rec.state and order.filled_quantity == rec.filled_quantity:
            return  # nothing new
        if not can_transition(rec.state, target):
            self.report.unresolved.append(_decision(
                rec, None, f"venue shows {order.status.value}, which cannot follow {rec.state.value}; check by hand"
            ))
            return
        price = f" @ {canonical_decimal(order.average_price)}" if order.average_price is not None else ""
        why = (f"venue shows {order.status.value}, filled {canonical_decimal(order.filled_quantity)}{price}, "
               f"broker id {order.broker_order_id}")
        self.write(rec, target, facts, why)

    def owner_gone(self, rec: IntentRecord, now: float) -> tuple[bool, str]:
        """Whether a pending intent's owner can no longer send it, and why (or why not)."""
        alive = owner_alive(rec.host, rec.pid, rec.owner_started)
        if alive is False:
            return True, f"its owner (pid {rec.pid} on {rec.host}) is gone"
        owner = f"pid {rec.pid} on {rec.host}" + (" is alive" if alive else "")
        if alive is None:  # another host: the runner registry may know
            runners = self.runners_of(rec)
            # Gone only if every guard of that process stopped after the claim (a process may
            # open several), and a claim with a send deadline is also past it.
            stopped = bool(runners) and all(r.stopped_at is not None and r.stopped_at >= rec.created_at for r in runners)
            if stopped and (rec.send_by_at is None or now > rec.send_by_at):
                return True, f"its owner ({runners[0].who()}) stopped its guard after claiming it"
            if any(r.stale(now) for r in runners):
                stale = max(now - r.heartbeat_at for r in runners)
                owner += f", whose heartbeat stopped {stale:.0f}s ago (if that host is down, resolve by hand)"
        if rec.state is State.CLAIMED or rec.send_by_at is None:
            # A claim() body or decorated function sends when it likes: only its death frees it.
            return False, f"its owner ({owner}) controls the send; resolve it by hand if that owner hung"
        if now >= rec.send_by_at + self.stale_after:
            return True, f"its owner ({owner}) let its send deadline pass {now - rec.send_by_at:.1f}s ago"
        return False, f"its owner ({owner}) may still send until {self.stale_after:g}s after its deadline"

    def runners_of(self, rec: IntentRecord) -> list[RunnerRecord]:
        """Every registered guard of the process that made the claim."""
        if self._runners is None:
            try:
                self._runners = self.store.runners(stopped_within=30 * 86400)
            except OrderGuardError as exc:
                log.warning("runner registry unavailable for owner liveness: %s", exc)
                self._runners = []
        owner = (rec.host, rec.pid, rec.owner_started)
        return [r for r in self._runners if (r.host, r.pid, r.started) == owner]

    def first_pass(self, rec: IntentRecord, now: float) -> IntentRecord | None:
        """Look one intent up; returns it when the venue did not show it (needs a second look)."""
        ok, order = self.lookup(rec)
        if not ok:
            return None
        if order is not None:
            self.apply(rec, order)  # the venue's answer settles it whoever owns it
            return None
        if rec.state in (State.ACKED, State.PARTIALLY_FILLED):
            self.report.unresolved.append(_decision(
                rec, None, f"recorded {rec.state.value} but {self.broker.name} shows no order {rec.client_order_id}; check by hand",
            ))
            return None
        if rec.state in PENDING:
            gone, why = self.owner_gone(rec, now)
            if not gone:
                self.report.unresolved.append(_decision(rec, None, f"{rec.state.value}, not at the venue yet: {why}"))
                return None
            moved = self.write(rec, State.UNKNOWN, TransitionFields(note=f"owner stopped before recording the venue's answer: {why}"),
                               f"{why}; the venue does not show it yet")
            if moved is None:
                return None
            rec = moved
        return self.store.note_lookup_miss(rec.id, rec.fence, now)

    def second_pass(self, rec: IntentRecord, now: float) -> None:
        first = rec.first_miss_at if rec.first_miss_at is not None else now
        if now - first < self.grace:
            self.report.unresolved.append(_decision(
                rec, None, f"not found once; waiting out the venue's lookup lag ({self.grace:g}s) before believing it",
            ))
            return
        ok, order = self.lookup(rec)
        if not ok:
            return
        if order is not None:
            self.apply(rec, order)
            return
        self.write(rec, State.NOT_FOUND, TransitionFields(note="not found at the venue on two lookups"),
                   f"{self.broker.name} shows no order {rec.client_order_id} on two lookups {now - first:.1f}s apart: "
                   "never placed; scope freed")

    def drift(self) -> None:
        ledger = self.store.filled_positions()  # every (account, symbol) the ledger traded, 0 if unfilled
        venue = {(p.account, p.symbol): p.quantity for p in self.broker.positions()}
        accounts = {account for account, _ in ledger}
        for key in sorted(set(ledger) | {k for k in venue if k[0] in accounts}):
            have, want = ledger.get(key, Decimal(0)), venue.get(key, Decimal(0))
            if have != want:
                self.report.drift.append(Drift(key[0], key[1], have, want))


def reconcile(
    store: Store, broker: Broker, *, grace: float, stale_after: float, wait: bool = True,
    halt_on_drift: bool = True, notifier: Notifier | None = None, actor: str = "reconciler",
) -> ReconcileReport:
    """Resolve what the ledger does not know by asking the venue. Safe to run at any time,
    from any process, concurrently with live guards (every write is fenced).

    ``wait=True`` sleeps out the lookup grace within this call so a lost order is resolved in
    one run; ``wait=False`` records the first miss and leaves the rest to a later run.
    ``halt_on_drift``: a position that differs from the venue's halts its account and symbol
    (cause DRIFT) until an operator resumes it; ``notifier`` gets DRIFT and HALTED alerts.
    """
    rec_ = _Reconciler(store, broker, grace, stale_after)
    now = store.now()
    candidates = sorted(store.intents(states=_OPEN_STATES, limit=1_000_000), key=lambda r: r.created_at)
    misses: list[IntentRecord] = []
    for rec in candidates:
        try:
            missed = rec_.first_pass(rec, now)
        except (FencedOut, InvalidTransition) as exc:  # a store failure propagates: fail closed
            rec_.report.unresolved.append(_decision(rec, None, str(exc)))
            continue
        if missed is not None:
            misses.append(missed)
    if misses and wait:
        # Sleep out what is left of the grace, never more than the grace itself: a clock that
        # stepped back (NTP) must not turn a lookup lag into a long stall.
        wake = max((m.first_miss_at or now) + grace for m in misses)
        time.sleep(min(grace, max(0.0, wake - store.now())))
    now = store.now()
    for rec in misses:
        try:
            rec_.second_pass(rec, now)
        except OrderGuardError as exc:
            rec_.report.unresolved.append(_decision(rec, None, str(exc)))
    try:
        rec_.drift()
    except Exception as exc:
        rec_.report.drift_error = f"position check against {broker.name} failed: {exc}"
        log.warning("%s", rec_.report.drift_error)
    if rec_.report.drift:
        # A drift in a symbol whose order outcome is still open is explained by it: reported, not halted.
        pending = {(r.account, r.symbol) for r in store.intents(states=(*PENDING, State.UNKNOWN), limit=1_000_000)}
        for drift in rec_.report.drift:
            halt = halt_on_drift and (drift.account, drift.symbol) not in pending
            _drift_found(store, drift, broker.name, rec_.report, halt, notifier, actor)
    return rec_.report


def _drift_found(
    store: Store, drift: Drift, venue: str, report: ReconcileReport, halt: bool, notifier: Notifier | None, actor: str,
) -> None:
    from .alerts import AlertKind
    from .policies import scope_text

    scope = scope_text(account=drift.account, symbol=drift.symbol)
    text = (
        f"position drift in {drift.symbol} for account {drift.account}: the ledger's filled orders net "
        f"{canonical_decimal(drift.ledger)}, {venue} shows {canonical_decimal(drift.broker)} (difference "
        f"{canonical_decimal(drift.difference)})"
    )
    log.error("DRIFT: %s. Orders placed outside orderguard, or a fill it never saw.", text)
    if notifier is not None:
        notifier.notify(AlertKind.DRIFT, scope, text)
    if not halt or any(h.scope == scope and h.state is TradingState.HALTED for h in store.halts()):
        return
    record = store.set_trading_state(
        scope, TradingState.HALTED, cause=HaltCause.DRIFT, reason=text, actor=actor, keep_existing=True
    )
    if record is not None and record.cause is HaltCause.DRIFT and record.reason == text:
        report.halts.append(record)
        log.error("HALTED %s: %s. Check the venue, then `orderguard resume '%s' --reason ...`.", scope, text, scope)
        if notifier is not None:
            notifier.notify(AlertKind.HALTED, scope, f"HALTED {scope} (DRIFT): {text}")
