"""Stateful property test: a real Guard and a real PaperBroker driven through faults and days.

A Hypothesis state machine submits a few intents (two strategies, three symbols, one of them
refused by the venue) under ``OncePer(TradingDay("XNYS"))`` combined with ``Cooldown`` or
``OneOpen``; loses acks, drops connections, kills "processes" right after their claim commit
(before or after the order reached the venue), wakes their zombies up later, retries, closes
positions, reconciles, and moves the store clock across XNYS sessions, weekends, holidays and
early closes. After every step it checks the contract against the venue's own order log:

1. at most one live (non-rejected) venue order per (strategy, symbol, XNYS session);
2. every venue order carries the client order id of exactly one ledger intent (same payload);
3. whenever nothing is pending, every final intent agrees with the venue (FILLED with the same
   quantity; NOT_FOUND / ABANDONED / REJECTED: no venue order), and ``settle`` (age everything
   past ``stale_after``, reconcile) must leave nothing pending, unresolved or drifting.

Each attempt is also checked against a model of the policies computed from the ledger (blocked
exactly when a scope is held), and every window key against an oracle built from the
calendar's session closes (a claim belongs to the first session whose close is after it).

The store clock is "fake Unix time that also ticks": a start instant plus the offsets the rules
add plus the real time elapsed. It must tick because the reconciler measures the lookup grace on
the store clock while it sleeps in real time; a frozen clock could never see the grace elapse.
A forward jump stands for real time passing, so it also sleeps out the paper venue's (tiny)
lookup lag; a backward step stands for a clock correction (no real time passes).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import exchange_calendars
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

from orderguard import (
    Cooldown,
    FencedOut,
    Guard,
    InvalidTransition,
    OncePer,
    OneOpen,
    OrderIntent,
    OrderRejected,
    Outcome,
    SendDeadlineExceeded,
    Side,
    State,
    TradingDay,
)
from orderguard.brokers import OrderRequest, OrderStatus, PaperBroker, PaperFaults, VenueDedupe
from orderguard.store.base import Caller, IntentRecord, TransitionFields, process_start, this_host
from tests.helpers import dead_caller, make_intent

# ------------------------------------------------------------------------------ the world

ET = ZoneInfo("America/New_York")
STARTS = [  # (label, instant): each run starts at one of these and moves on from there
    ("Mon before Thanksgiving 09:45", datetime(2025, 11, 24, 9, 45, tzinfo=ET)),
    ("Sat before Thanksgiving week", datetime(2025, 11, 22, 11, 0, tzinfo=ET)),
    ("Mon before Christmas 09:45", datetime(2025, 12, 22, 9, 45, tzinfo=ET)),
    ("Fri before MLK day 15:30", datetime(2026, 1, 16, 15, 30, tzinfo=ET)),
    ("Wed before Good Friday 09:45", datetime(2026, 4, 1, 9, 45, tzinfo=ET)),
    ("Wed before July 3 (observed) 15:58", datetime(2026, 7, 1, 15, 58, tzinfo=ET)),
]

STRATEGIES = ("alpha", "beta")
SYMBOLS = ("SPX", "SPX", "QQQ", "QQQ", "HALTED")  # the paper venue refuses HALTED (a definite rejection)
REJECTED_SYMBOL = "HALTED"
BY = ("strategy", "symbol")

SEND_DEADLINE = 5.0  # guard: a claim older than this (real time) is never sent
STALE_AFTER = 10.0  # guard/reconciler: a pending claim older than this (store clock) is stale
GRACE = 0.1  # reconciler: two lookups at least this far apart before NOT_FOUND
COOLDOWN_S = 1830.0  # 30.5 min: never a whole number of minutes, so never on a rule's grid

TRADING_DAY = TradingDay("XNYS")
ONCE = OncePer(TRADING_DAY, by=BY)
COOLDOWN = Cooldown(COOLDOWN_S, by=BY)
ONE_OPEN = OneOpen(by=BY)
POLICY_SETS = {
    "once": (ONCE,),
    "once+cooldown": (ONCE, COOLDOWN),
    "cooldown+once": (COOLDOWN, ONCE),
    "once+one-open": (ONCE, ONE_OPEN),
    "one-open+once": (ONE_OPEN, ONCE),
}

OPEN_STATES = frozenset({State.CLAIMED, State.SENDING, State.UNKNOWN, State.ACKED, State.PARTIALLY_FILLED})
NOT_ANSWERED = frozenset({State.CLAIMED, State.SENDING, State.UNKNOWN})
NOTHING_EXECUTED = frozenset({State.NOT_FOUND, State.ABANDONED, State.REJECTED})
COID = re.compile(r"^[a-z0-9-]{1,32}$")

# Independent window oracle: XNYS session closes (UTC seconds), ascending.
_XNYS = exchange_calendars.get_calendar("XNYS")
_CLOSES = [ts.timestamp() for ts in _XNYS.closes]
_OPENS = [ts.timestamp() for ts in _XNYS.opens]
_SESSIONS = [ts.date() for ts in _XNYS.sessions]
_EDGES = sorted(_OPENS + _CLOSES)


def session_of(t: float) -> date:
    """The XNYS session a claim at Unix time ``t`` belongs to (windows are minute-granular):
    the session in progress, else the next one (a night, weekend or holiday claim belongs to
    the next session; the closing minute already belongs to the next one)."""
    minute = t // 60 * 60
    return _SESSIONS[bisect.bisect_right(_CLOSES, minute)]


def releases(rec: IntentRecord) -> bool:
    """Per the contract: nothing executed, so the intent frees its scopes."""
    if rec.state in NOTHING_EXECUTED:
        return True
    return rec.state in (State.CANCELED, State.EXPIRED) and rec.filled_quantity == 0


class StoreClock:
    """Unix seconds = start + offset (moved by the rules) + real seconds elapsed."""

    def __init__(self, start: float) -> None:
        self._start = start
        self._t0 = time.monotonic()
        self.offset = 0.0
        self.forward = 0.0  # real time the forward jumps stand for (what a zombie's deadline sees)

    def __call__(self) -> float:
        return self._start + self.offset + (time.monotonic() - self._t0)

    def elapsed(self) -> float:
        return self.forward + (time.monotonic() - self._t0)

    def jump(self, seconds: float) -> None:
        self.offset += seconds
        if seconds > 0:
            self.forward += seconds


class Boom(Exception):
    """The strategy's own code blowing up inside ``guard.claim``."""


intents = st.builds(
    make_intent,
    strategy=st.sampled_from(STRATEGIES),
    symbol=st.sampled_from(SYMBOLS),
    side=st.sampled_from((Side.BUY, Side.SELL)),
    quantity=st.sampled_from((1, 2, 5)),
)


# ----------------------------------------------------------------------------- the machine


class GuardedVenue(RuleBasedStateMachine):
    attempted = Bundle("attempted")

    def __init__(self) -> None:
        super().__init__()
        self.dir: Path | None = None
        self.guard: Guard | None = None
        self.broker: PaperBroker | None = None
        self.seq: dict[str, int] = {}  # intent id -> order in which it was claimed
        self.orphans: list[tuple[IntentRecord, float]] = []  # paused owners' unsent claims + claim time
        self.last_send = 0.0  # time.monotonic() of the last order that reached the venue
        self.paused: subprocess.Popen[bytes] | None = None  # a real, stopped process owning the orphans

    def paused_owner(self) -> Caller:
        """The identity of a live process that is frozen (SIGSTOP) with unsent claims."""
        if self.paused is None:
            self.paused = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
            os.kill(self.paused.pid, signal.SIGSTOP)
        pid = self.paused.pid
        return Caller(host=this_host(), pid=pid, runner="paused", thread="MainThread", started=process_start(pid))

    def paused_owner_dies(self) -> None:
        if self.paused is not None:
            self.paused.kill()
            self.paused.wait()
            self.paused = None

    # ------------------------------------------------------------------------ setup

    @initialize(
        start=st.sampled_from(STARTS),
        policy=st.sampled_from(sorted(POLICY_SETS)),
        dedupe=st.sampled_from(list(VenueDedupe)),
        lag=st.sampled_from((0.0, 0.0, 0.02, 0.05)),
    )
    def open_world(self, start: tuple[str, datetime], policy: str, dedupe: VenueDedupe, lag: float) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="og-stateful-"))
        self.clock = StoreClock(start[1].timestamp())
        self.policy_name = policy
        self.policies = POLICY_SETS[policy]
        self.lag = lag
        self.guard = Guard.open(
            f"sqlite:///{self.dir / 'ledger.db'}", clock=self.clock, synchronous="NORMAL",
            send_deadline=SEND_DEADLINE, stale_after=STALE_AFTER, runner="stateful",
        )
        self.broker = PaperBroker.open(
            f"sqlite:///{self.dir / 'paper.db'}", dedupe=dedupe, fill_delay=0.0,
            reject_symbols=(REJECTED_SYMBOL,), faults=PaperFaults(lookup_lag=lag),
        )

    def teardown(self) -> None:
        self.paused_owner_dies()
        if self.guard is not None:
            self.guard.close()
        if self.broker is not None:
            self.broker.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---------------------------------------------------------------------- helpers

    @property
    def g(self) -> Guard:
        assert self.guard is not None
        return self.guard

    @property
    def b(self) -> PaperBroker:
        assert self.broker is not None
        return self.broker

    def ledger(self) -> list[IntentRecord]:
        return self.g.intents(limit=1_000_000)

    def jump(self, seconds: float) -> None:
        if seconds > 0 and self.lag:
            # Real time passes with a forward jump: at least the venue's lookup lag.
            time.sleep(max(0.0, self.last_send + self.lag - time.monotonic()))
        self.clock.jump(seconds)

    def expect_blocked(self, intent: OrderIntent, now: float, ledger: list[IntentRecord]) -> bool:
        """The policies' verdict at store time ``now``, from the ledger as it stands."""
        scope = [r for r in ledger if (r.strategy, r.symbol) == (intent.strategy, intent.symbol)]
        for policy in self.policies:
            if policy is ONCE:
                window = session_of(now)
                if any(session_of(r.created_at) == window and not releases(r) for r in scope):
                    return True
                # An UNKNOWN intent of an earlier session still blocks: it may have executed.
                if any(r.state is State.UNKNOWN for r in scope):
                    return True
            elif policy is COOLDOWN:
                if scope:
                    last = max(scope, key=lambda r: self.seq[r.id])
                    if not releases(last) and (last.state in NOT_ANSWERED or now - last.created_at < COOLDOWN_S):
                        return True
            elif policy is ONE_OPEN:
                if any(not releases(r) and not r.closed for r in scope):
                    return True
            else:  # pragma: no cover
                raise AssertionError(policy)
        return False

    def attempt(self, intent: OrderIntent, call):  # type: ignore[no-untyped-def]
        """Run one claiming ``call`` and check it was blocked exactly when the model says so.

        ``call`` returns (claimed: bool, intent record or None, its result).
        """
        ledger = self.ledger()
        before = self.expect_blocked(intent, self.clock(), ledger)
        claimed, record, value = call()
        after = self.expect_blocked(intent, self.clock(), ledger)
        if before == after:  # not straddling a window or cooldown edge
            assert claimed is not before, (
                f"{self.policy_name}: {intent.describe()} was {'claimed' if claimed else 'blocked'}, "
                f"the policies say {'blocked' if before else 'allowed'}; ledger: "
                + "; ".join(f"{r.strategy}/{r.symbol} {r.state.value} {session_of(r.created_at)} closed={r.closed}" for r in ledger)
            )
        if claimed:
            assert record is not None
            self.seq[record.id] = len(self.seq)
        return value

    def check_last_attempt(self, attempt_id: int, claimed: bool, record: IntentRecord | None) -> None:
        last = self.g.attempts(limit=1)[0]
        assert last.id == attempt_id
        assert last.outcome == ("CLAIMED" if claimed else "BLOCKED")
        if claimed:
            assert record is not None and last.intent_id == record.id
        else:
            assert last.reason is not None

    def arm(self, fault: str) -> None:
        self.b.faults.lose_ack = 1 if fault == "lose_ack" else 0
        self.b.faults.disconnect = 1 if fault == "disconnect" else 0

    def disarm(self) -> None:
        self.b.faults.lose_ack = 0
        self.b.faults.disconnect = 0

    # ----------------------------------------------------------------------- orders

    @rule(target=attempted, intent=intents, fault=st.sampled_from(("none", "none", "none", "lose_ack", "disconnect")))
    def submit(self, intent: OrderIntent, fault: str) -> OrderIntent:
        def call():  # type: ignore[no-untyped-def]
            self.arm(fault)
            try:
                result = self.g.submit(intent, self.b, policy=self.policies)
            finally:
                self.disarm()
                self.last_send = time.monotonic()
            return not result.blocked, result.intent, result

        result = self.attempt(intent, call)
        event(f"submit: {result.reason.value if result.blocked else result.state.value}")
        self.check_after_submit(intent, result, fault)
        return intent

    @rule(intent=attempted)
    def retry(self, intent: OrderIntent) -> None:
        """The scheduler fires again, or the caller retries after a timeout: same intent."""
        self.submit(intent, "none")

    def check_after_submit(self, intent: OrderIntent, result, fault: str) -> None:  # type: ignore[no-untyped-def]
        self.check_last_attempt(result.attempt_id, not result.blocked, result.intent)
        if result.blocked:
            assert result.reason is not None and result.intent is None
            if result.holder is not None:
                assert (result.holder.strategy, result.holder.symbol) == (intent.strategy, intent.symbol)
            return
        assert result.outcome is Outcome.SENT
        rec = self.g.intent(result.intent.id)
        assert COID.match(rec.client_order_id), rec.client_order_id
        if fault == "disconnect" or (fault == "lose_ack" and intent.symbol != REJECTED_SYMBOL):
            assert rec.state is State.UNKNOWN, rec
        elif intent.symbol == REJECTED_SYMBOL:
            assert rec.state is State.REJECTED, rec
        else:
            assert rec.state is State.FILLED and rec.filled_quantity == intent.quantity, rec

    @rule(intent=intents, mode=st.sampled_from(("abandon", "read_then_raise", "send_then_raise", "send_and_record")))
    def claim_block(self, intent: OrderIntent, mode: str) -> None:
        """Existing order code inside ``with guard.claim(...)``, which may blow up at any step."""
        seen: dict[str, object] = {}
        event(f"claim block: {mode}")

        def call():  # type: ignore[no-untyped-def]
            try:
                with self.g.claim(intent, policy=self.policies) as claim:
                    seen["claim"] = claim
                    if not claim:
                        return False, None, None
                    if mode == "abandon":
                        raise Boom("before the client order id was read")
                    request = OrderRequest.from_record(claim.intent, send_by=claim.send_by)
                    assert claim.client_order_id == request.client_order_id
                    if mode == "read_then_raise":
                        raise Boom("after the id was read, before the send")
                    try:
                        order = self.b.submit(request)
                    except OrderRejected as exc:
                        claim.rejected(str(exc))
                        return True, claim.intent, "rejected"
                    finally:
                        self.last_send = time.monotonic()
                    if mode == "send_then_raise":
                        raise Boom("after the send, before recording")
                    claim.record(order)
            except Boom:
                pass
            claim = seen["claim"]
            return bool(claim), claim.intent if claim else None, None  # type: ignore[attr-defined]

        value = self.attempt(intent, call)
        claim = seen["claim"]
        self.check_last_attempt(claim.decision.attempt_id, bool(claim), claim.decision.intent)  # type: ignore[attr-defined]
        if not claim:
            return
        rec = self.g.intent(claim.intent.id)  # type: ignore[attr-defined]
        if value == "rejected":
            expected = State.REJECTED
        else:
            expected = {
                "abandon": State.ABANDONED, "read_then_raise": State.UNKNOWN,
                "send_then_raise": State.UNKNOWN, "send_and_record": State.FILLED,
            }[mode]
        assert rec.state is expected, (mode, rec)

    @rule(intent=intents, state=st.sampled_from((State.CLAIMED, State.SENDING)), sent=st.booleans())
    def crash_after_claim(self, intent: OrderIntent, state: State, sent: bool) -> None:
        """A process commits its claim, maybe sends, and is killed before recording anything."""

        # A process that sent is killed (dead); one that did not send is frozen and may wake up.
        owner = dead_caller() if sent else self.paused_owner()

        def call():  # type: ignore[no-untyped-def]
            decision = self.g.store.claim(intent, self.policies, owner, state=state)
            return decision.claimed, decision.intent, decision

        decision = self.attempt(intent, call)
        self.check_last_attempt(decision.attempt_id, decision.claimed, decision.intent)
        if not decision.claimed:
            return
        if sent:
            try:
                self.b.submit(OrderRequest.from_record(decision.intent))
            except OrderRejected:
                pass
            finally:
                self.last_send = time.monotonic()
        else:
            self.orphans.append((decision.intent, self.clock.elapsed()))
        # ...and the process is gone: nothing is recorded.

    @precondition(lambda self: bool(self.orphans))
    @rule(data=st.data())
    def zombie_wakes(self, data: st.DataObject) -> None:
        """A killed-looking (paused) process wakes up and tries to finish its unsent claim."""
        index = data.draw(st.integers(0, len(self.orphans) - 1), label="orphan")
        rec, claimed_at = self.orphans.pop(index)
        age = self.clock.elapsed() - claimed_at
        request = OrderRequest.from_record(rec, send_by=time.monotonic() + SEND_DEADLINE - age)
        try:
            order = self.b.submit(request)
        except SendDeadlineExceeded:
            event("zombie: refused by its send deadline")
            assert age > SEND_DEADLINE - 0.5
            if rec.state is State.CLAIMED:  # it knows nothing was sent
                with contextlib.suppress(FencedOut, InvalidTransition):
                    self.g.store.transition(rec.id, rec.fence, State.ABANDONED, TransitionFields(note="zombie: too late"))
            return
        except OrderRejected as exc:
            target, facts = State.REJECTED, TransitionFields(note=str(exc))
        else:
            target = order.status.state
            facts = TransitionFields(order.broker_order_id, order.filled_quantity, order.average_price)
        finally:
            self.last_send = time.monotonic()
        assert age < SEND_DEADLINE + 0.5
        event("zombie: sent within its deadline")
        # Still within its deadline, so nobody can have taken the intent over yet.
        self.g.store.transition(rec.id, rec.fence, target, facts)

    @rule(data=st.data())
    def mark_closed(self, data: st.DataObject) -> None:
        filled = [r for r in self.ledger() if r.state is State.FILLED and not r.closed]
        if not filled:
            return
        rec = data.draw(st.sampled_from(filled), label="position")
        assert self.g.mark_closed(rec.client_order_id).closed

    # -------------------------------------------------------------------- reconcile

    @rule(wait=st.booleans(), stale_after=st.sampled_from((STALE_AFTER, 60.0)))
    def reconcile(self, wait: bool, stale_after: float) -> None:
        report = self.g.reconcile(self.b, grace=GRACE, stale_after=stale_after, wait=wait)
        for d in report.decisions:
            event(f"reconcile: {d.before.value} -> {d.after.value if d.after else '-'}")
        assert not report.drift or any(r.state in OPEN_STATES for r in self.ledger()), report.lines()

    @rule(extra=st.sampled_from((0.0, 60.0, 3600.0)))
    def settle(self, extra: float) -> None:
        """Let every pending claim go stale (and every sender past its deadline), then reconcile:
        nothing may stay pending, unresolved or drifting."""
        newest = max((r.created_at for r in self.ledger()), default=0.0)
        self.jump(max(0.0, newest + SEND_DEADLINE + STALE_AFTER + 1 - self.clock()) + extra)
        self.paused_owner_dies()  # a frozen owner of a claim() body is freed only by its death
        report = self.g.reconcile(self.b, grace=GRACE, stale_after=STALE_AFTER, wait=True)
        for d in report.decisions:
            event(f"settle: {d.before.value} -> {d.after.value if d.after else '-'}")
        assert not report.unresolved, report.lines()
        assert not report.drift, report.lines()
        still_open = [r for r in self.ledger() if r.state in OPEN_STATES]
        assert not still_open, still_open
        self.orphans.clear()  # past their deadlines: a wake-up can only be refused
        self.check_agreement(self.ledger(), self.b.orders())

    # ------------------------------------------------------------------------ clock

    @rule(minutes=st.integers(1, 240))
    def minutes_pass(self, minutes: int) -> None:
        self.jump(60.0 * minutes)

    @rule(hours=st.integers(1, 30))
    def hours_pass(self, hours: int) -> None:
        self.jump(3600.0 * hours)

    @rule(days=st.integers(1, 4))
    def days_pass(self, days: int) -> None:
        self.jump(86400.0 * days)

    @rule(edge=st.integers(0, 3), delta=st.integers(-2, 2))
    def to_session_edge(self, edge: int, delta: int) -> None:
        """Jump to within two minutes of one of the next session opens/closes."""
        now = self.clock()
        target = _EDGES[bisect.bisect_right(_EDGES, now) + edge] + 60.0 * delta
        if target > now:
            self.jump(target - now)

    @rule(minutes=st.integers(1, 15))
    def clock_stepped_back(self, minutes: int) -> None:
        """An NTP correction: the store clock goes back; no real time passes."""
        self.jump(-60.0 * minutes)

    # -------------------------------------------------------------------- invariants

    def check_agreement(self, ledger: list[IntentRecord], orders: list) -> None:  # type: ignore[type-arg]
        by_coid = {o.client_order_id: o for o in orders}
        for rec in ledger:
            order = by_coid.get(rec.client_order_id)
            if rec.state is State.FILLED:
                assert order is not None, f"ledger says FILLED, venue has no {rec.client_order_id}"
                assert order.status is OrderStatus.FILLED, (rec, order)
                assert order.filled_quantity == rec.filled_quantity == rec.quantity, (rec, order)
            elif rec.state in NOTHING_EXECUTED:
                assert order is None, f"ledger says {rec.state.value}, venue has {order}"
        for order in orders:
            rec = self.g.intent(order.client_order_id)
            if order.status is OrderStatus.FILLED:
                assert rec.state is State.FILLED, (rec, order)

    @invariant()
    def venue_log_is_guarded(self) -> None:
        if self.guard is None:
            return
        ledger = self.ledger()
        orders = self.b.orders()
        owners: dict[str, list[IntentRecord]] = {}
        for rec in ledger:
            owners.setdefault(rec.client_order_id, []).append(rec)
            assert COID.match(rec.client_order_id), rec.client_order_id
            # The OncePer window key agrees with the calendar oracle.
            window = f"@XNYS:{session_of(rec.created_at).isoformat()}"
            assert any(k.startswith("once|") and k.endswith(window) for k in rec.scope_keys), (rec.scope_keys, window)
        live: dict[tuple[str, str, date], str] = {}
        for order in orders:
            mine = owners.get(order.client_order_id, [])
            assert len(mine) == 1, f"venue order {order.client_order_id} has {len(mine)} ledger intents"
            rec = mine[0]
            assert (order.account, order.symbol, order.side, order.quantity) == (
                rec.account, rec.symbol, rec.side, rec.quantity
            ), (order, rec)
            if order.status is OrderStatus.REJECTED:
                continue
            scope = (rec.strategy, rec.symbol, session_of(rec.created_at))
            assert scope not in live, (
                f"two live venue orders for {scope}: {live[scope]} and {order.client_order_id}; ledger: "
                + "; ".join(f"{r.client_order_id} {r.state.value}" for r in ledger)
            )
            live[scope] = order.client_order_id

    @invariant()
    def nothing_pending_means_agreement(self) -> None:
        if self.guard is None:
            return
        ledger = self.ledger()
        if any(r.state in OPEN_STATES for r in ledger):
            return
        self.check_agreement(ledger, self.b.orders())


GuardedVenue.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestGuardedVenue = GuardedVenue.TestCase
