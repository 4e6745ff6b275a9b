"""The store contract: what every ledger store (SQLite, PostgreSQL) must provide.

The store *is* the arbiter (DESIGN invariant 1): :meth:`Store.claim` evaluates every scope
rule and either records the new intent, its scope holds and the attempt in one transaction
(one durable commit), or records a blocked attempt naming the holder. Every later change of an
intent goes through :meth:`Store.transition`, a compare-and-set on (intent id, fencing token).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ClockError, FencedOut, InvalidTransition
from ..policies import ScopeKind, ScopeRule
from ..states import PENDING, TERMINAL, WORKING, State, can_transition

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ..halts import HaltCause, HaltEvent, HaltRecord, TradingState
    from ..intent import OrderIntent
    from ..policies import Policy
    from ..runners import Lease, LeaseRequest, RunnerRecord

    Exec = Callable[[str, Sequence[Any]], list[Any]]

T = TypeVar("T")
SCHEMA_VERSION = 2  # 2: halts, risk-limit events, runners and leader leases


class BlockReason(StrEnum):
    """Why an attempt was blocked (DESIGN invariant 8)."""

    DUPLICATE = "DUPLICATE"
    IN_FLIGHT = "IN_FLIGHT"
    UNKNOWN_PENDING = "UNKNOWN_PENDING"
    COOLDOWN = "COOLDOWN"
    OPEN_POSITION = "OPEN_POSITION"
    MAX_OPEN = "MAX_OPEN"
    RATE_LIMIT = "RATE_LIMIT"
    NOTIONAL_LIMIT = "NOTIONAL_LIMIT"
    HALTED = "HALTED"
    CONFLICT = "CONFLICT"
    NOT_LEADER = "NOT_LEADER"  # an ``exclusive=`` guard that does not hold its strategy's lease


@dataclass(frozen=True)
class Caller:
    """Who is attempting: recorded with every attempt and every claimed intent.

    ``started`` identifies the process instance (boot id + start time on Linux), so a reused
    pid is not mistaken for the process that made a claim.
    """

    host: str
    pid: int
    runner: str
    thread: str
    task: str | None = None
    started: str = ""

    def who(self) -> str:
        return f"runner {self.runner} on {self.host} pid {self.pid}"

    @classmethod
    def current(cls, runner: str, task: str | None = None) -> Caller:
        pid = os.getpid()
        return cls(
            host=_HOST, pid=pid, runner=runner, thread=threading.current_thread().name, task=task,
            started=process_start(pid) if pid != _SELF[0] else _SELF[1],
        )


_HOST = socket.gethostname()
DEFAULT_SEND_DEADLINE = 10.0


# A wall clock outside these bounds is broken, not merely skewed (2020-01-01 .. 2100-01-01).
CLOCK_MIN, CLOCK_MAX = 1_577_836_800.0, 4_102_444_800.0


def checked_clock(now: float) -> float:
    """``now`` if it can be a real time, else ClockError (fail closed: nothing is claimed)."""
    if not CLOCK_MIN <= now <= CLOCK_MAX:
        raise ClockError(f"the clock reads {now!r}, which cannot be right; nothing was sent")
    return now


def this_host() -> str:
    return _HOST


def process_start(pid: int) -> str:
    """A marker of when process ``pid`` started ("" where the platform does not say)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            stat = fh.read()
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            boot = fh.read().strip()
    except OSError:
        return ""
    # Field 22 (starttime) follows the parenthesised command name, which may contain spaces.
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"


_SELF = (os.getpid(), process_start(os.getpid()))


def _refresh_self() -> None:
    global _SELF
    _SELF = (os.getpid(), process_start(os.getpid()))


os.register_at_fork(after_in_child=_refresh_self)


def owner_alive(host: str, pid: int, started: str) -> bool | None:
    """Whether the process that made a claim still runs: None when it cannot be told (another host)."""
    if host != _HOST:
        return None
    if started:
        return process_start(pid) == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class IntentRecord:
    """One claimed intent as the ledger holds it."""

    id: str
    client_order_id: str
    fence: int
    scope_key: str  # the primary scope, whose counter issued the fence
    scope_keys: tuple[str, ...]
    state: State
    account: str
    strategy: str
    symbol: str
    side: str
    quantity: Decimal
    order_type: str
    limit_price: Decimal | None
    stop_price: Decimal | None
    time_in_force: str
    source: str
    tags: dict[str, str]
    payload_digest: str
    created_at: float
    updated_at: float
    host: str
    pid: int
    runner: str
    thread: str
    task: str | None
    broker_order_id: str | None = None
    filled_quantity: Decimal = Decimal(0)
    average_price: Decimal | None = None
    released: bool = False
    closed: bool = False
    note: str | None = None
    first_miss_at: float | None = None
    attempt_id: int | None = None  # the attempt that claimed it
    send_by_at: float | None = None  # store clock; None: the owner may send at any time (opaque)
    owner_started: str = ""

    @property
    def working(self) -> bool:
        return self.state in WORKING

    def who(self) -> str:
        """``scheduler on host-a pid 4242 (thread MainThread)``."""
        where = f"{self.host} pid {self.pid}"
        ctx = f"task {self.task}" if self.task else f"thread {self.thread}"
        return f"{self.source} on {where} ({ctx})"


@dataclass(frozen=True)
class AttemptRecord:
    """One attempt, allowed or blocked (DESIGN invariant 8)."""

    id: int
    at: float
    outcome: str  # CLAIMED or BLOCKED
    reason: BlockReason | None
    intent_id: str | None
    holder_id: str | None
    scope_key: str | None
    host: str
    pid: int
    runner: str
    thread: str
    task: str | None
    source: str
    account: str
    strategy: str
    symbol: str
    side: str
    quantity: Decimal
    order_type: str
    limit_price: Decimal | None
    stop_price: Decimal | None
    message: str


@dataclass(frozen=True)
class ClaimDecision:
    """What the store decided for one attempt."""

    claimed: bool
    attempt_id: int
    intent: IntentRecord | None = None  # the new intent, when claimed
    reason: BlockReason | None = None
    holder: IntentRecord | None = None  # the intent that holds the scope, when blocked
    rule: ScopeRule | None = None  # the rule that blocked
    message: str = ""
    rules: tuple[ScopeRule, ...] = field(default_factory=tuple)
    halt: HaltRecord | None = None  # the halt that blocked it, or the one its refusal tripped
    tripped: bool = False  # a risk limit with trip=True refused it and halted its scope
    lease: Lease | None = None  # the leader lease the claim was made under (exclusive guards)


@dataclass(frozen=True)
class TransitionFields:
    """Optional facts recorded with a state transition."""

    broker_order_id: str | None = None
    filled_quantity: Decimal | None = None
    average_price: Decimal | None = None
    note: str | None = None


def client_order_id(namespace: str, scope_key: str, fence: int) -> str:
    """Deterministic client order id for (scope, fencing token): ``og-<20 hex>-<base36>``.

    At most 32 characters of ``[a-z0-9-]`` (DESIGN invariant 3). The store's namespace keeps
    ids from a wiped and recreated ledger from colliding with orders the venue remembers.
    """
    return client_order_id_head(namespace, scope_key) + "-" + fence_text(fence)


def client_order_id_head(namespace: str, scope_key: str) -> str:
    """The scope's part of its client order ids (computable before the claim transaction)."""
    # 80 bits of the scope's hash: collisions within one ledger namespace are not a concern.
    return "og-" + hashlib.sha256(f"{namespace}\x1f{scope_key}".encode()).hexdigest()[:20]


def fence_text(fence: int) -> str:
    """The fencing token in base 36 (at most 8 characters: 2.8e12 claims of one scope)."""
    if fence >= 36**8:
        raise OverflowError(f"fencing token {fence} too large for a client order id")
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        fence, r = divmod(fence, 36)
        out = digits[r] + out
        if fence == 0:
            return out


def id_floor(epoch: float) -> str:
    """The smallest intent id created at or after ``epoch`` (by the creating host's clock)."""
    return f"{max(0, int(epoch * 1000)):012x}"


def new_intent_id() -> str:
    """Unique, time-ordered id: 48-bit milliseconds then 80 random bits, 32 hex digits."""
    return f"{id_floor(time.time())}{os.urandom(10).hex()}"


def explain_block(
    rule: ScopeRule, intent: OrderIntent, holders: Sequence[IntentRecord]
) -> tuple[BlockReason, IntentRecord | None]:
    """Name the reason a scope refused ``intent``, from the intents holding it.

    Shared by every store so one situation gets one reason everywhere:
    an UNKNOWN holder first (the operator must reconcile it); then an unfinished holder (an
    identical one is IN_FLIGHT, a different one a CONFLICT); then the policy's own reason.
    """
    if not holders:
        return (BlockReason.COOLDOWN if rule.kind is ScopeKind.COOLDOWN else BlockReason.DUPLICATE), None
    ranked = sorted(holders, key=lambda h: -h.created_at)
    for h in ranked:
        if h.state is State.UNKNOWN:
            return BlockReason.UNKNOWN_PENDING, h
    digest = intent.payload_digest()
    single = rule.kind is not ScopeKind.OPEN or rule.limit == 1
    for h in ranked:
        if h.state in WORKING:
            if h.payload_digest == digest:
                if h.state in PENDING or rule.kind is not ScopeKind.COOLDOWN:
                    return BlockReason.IN_FLIGHT, h
            elif single:
                return BlockReason.CONFLICT, h
    latest = ranked[0]
    if rule.kind is ScopeKind.ONCE:
        return BlockReason.DUPLICATE, latest
    if rule.kind is ScopeKind.COOLDOWN:
        return BlockReason.COOLDOWN, latest
    return (BlockReason.OPEN_POSITION if rule.limit == 1 else BlockReason.MAX_OPEN), latest


def unknown_from_earlier_window(
    rules: Sequence[ScopeRule], unknown: Sequence[IntentRecord]
) -> tuple[ScopeRule, IntentRecord] | None:
    """An UNKNOWN intent of the same scope in an earlier window still blocks (invariant 4):
    its order may have executed, and a retry that crosses a window boundary must not send
    a second one before reconciliation says what happened."""
    for rule in rules:
        if rule.base:
            for rec in unknown:
                if any(k.startswith(rule.base) and k != rule.key for k in rec.scope_keys):
                    return rule, rec
    return None


def check_transition(current: IntentRecord, fence: int, target: State) -> bool:
    """The compare-and-set rules every store applies before writing a transition.

    Raises FencedOut (stale fence) or InvalidTransition (forbidden by the state machine);
    returns True when the write can be skipped (a final state reported again).
    """
    if current.fence != fence:
        raise FencedOut(
            f"intent {current.id} ({current.client_order_id}) is now at fence {current.fence} "
            f"in state {current.state.value}; this writer's fence {fence} is stale, so its "
            f"{target.value} was refused. The reconciler or a newer owner decided instead."
        )
    if current.state is target and target in TERMINAL:
        return True
    if not can_transition(current.state, target):
        raise InvalidTransition(f"intent {current.id} cannot go from {current.state.value} to {target.value}")
    return False


def check_closable(current: IntentRecord) -> None:
    """Only a finished order that filled opened a position that can be marked closed."""
    if not (current.state in TERMINAL and current.filled_quantity > 0):
        raise InvalidTransition(
            f"intent {current.id} is {current.state.value} with {current.filled_quantity} filled, so its "
            "position cannot be closed yet: only a finished order that filled opened one (cancel or "
            "reconcile it first)"
        )


def net_positions(rows: Sequence[Sequence[Any]]) -> dict[tuple[str, str], Decimal]:
    """Buys minus sells per (account, symbol) from (account, symbol, side, filled) rows."""
    totals: dict[tuple[str, str], Decimal] = {}
    for account, symbol, side, filled in rows:
        signed = Decimal(filled) if side == "BUY" else -Decimal(filled)
        totals[(account, symbol)] = totals.get((account, symbol), Decimal(0)) + signed
    return totals


class Store(ABC):
    """A transactional ledger of intents and attempts. Safe to share between threads."""

    namespace: str  # random per ledger, fixed at creation; salts client order ids

    @abstractmethod
    def now(self) -> float:
        """The store's clock, Unix seconds. Raises ClockError when it cannot be trusted."""

    @abstractmethod
    def claim(
        self,
        intent: OrderIntent,
        policies: Sequence[Policy],
        caller: Caller,
        *,
        state: State = State.SENDING,
        send_deadline: float | None = DEFAULT_SEND_DEADLINE,
        exclusive: LeaseRequest | None = None,
    ) -> ClaimDecision:
        """Arbitrate and record one attempt atomically.

        ``send_deadline``: seconds (store clock) within which the owner sends or gives up,
        recorded as ``send_by_at``; None for an owner that may send at any time.
        Halts are checked first (HALTED, REDUCING), then the leader lease when ``exclusive``
        is given (taken or renewed in the same transaction; the send deadline is cut to the
        lease's expiry), then the policies, risk limits included.

        Claimed: the intent (in ``state``), its scope holds and the attempt are committed
        together. Blocked: only the attempt is committed, with the reason and the holder.
        """

    @abstractmethod
    def transition(
        self,
        intent_id: str,
        fence: int,
        target: State,
        facts: TransitionFields | None = None,
        *,
        take_over: bool = False,
    ) -> IntentRecord:
        """Compare-and-set the intent's state on (id, fence).

        ``take_over=True`` (the reconciler, an operator) first draws a new fencing token from
        the scope so the previous owner's late writes are refused. Raises FencedOut when the
        fence no longer matches and InvalidTransition when the state machine forbids it.
        """

    @abstractmethod
    def note_lookup_miss(self, intent_id: str, fence: int, at: float) -> IntentRecord:
        """Remember the first time a lookup at the venue did not find the intent."""

    @abstractmethod
    def mark_closed(self, intent_id: str) -> IntentRecord:
        """Mark a filled intent's position closed: it stops counting for OneOpen/MaxOpen."""

    @abstractmethod
    def get(self, ref: str) -> IntentRecord:
        """One intent by id or client order id. Raises IntentNotFound."""

    @abstractmethod
    def intents(
        self,
        *,
        states: Sequence[State] | None = None,
        strategy: str | None = None,
        since: float | None = None,
        updated_since: float | None = None,
        ids_from: str | None = None,
        limit: int = 1000,
    ) -> list[IntentRecord]:
        """Intents, newest first (``since``: created then or later; ``updated_since``: changed then or
        later; ``ids_from``: ids sorting at or after it — ids begin with their creation time, see
        :func:`id_floor`, so this is a primary-key range, unlike the two times)."""

    @abstractmethod
    def attempts(
        self,
        *,
        intent_id: str | None = None,
        holder_id: str | None = None,
        blocked: bool | None = None,
        reason: BlockReason | None = None,
        since: float | None = None,
        after_id: int | None = None,
        limit: int = 1000,
    ) -> list[AttemptRecord]:
        """Attempts, newest first (``after_id``: only those recorded after attempt ``after_id``)."""

    @abstractmethod
    def filled_positions(self) -> dict[tuple[str, str], Decimal]:
        """Net filled quantity (buys minus sells) for every (account, symbol) the ledger holds an
        intent for, zero where nothing filled (so drift checks see every account it traded)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections. The ledger stays on disk."""

    # ------------------------------------------------------------------ control plane
    # Halts, runners and leases: implemented once (store/control.py) over these two hooks.

    @abstractmethod
    def _control(self, what: str, work: Callable[[Exec, float], T], *, write: bool) -> T:
        """Run ``work(exec, store_now)`` in one transaction (``write``: a write transaction)."""

    def set_trading_state(
        self, scope: str, state: TradingState, *, cause: HaltCause, reason: str, actor: str,
        keep_existing: bool = False,
    ) -> HaltRecord | None:
        """HALT, REDUCE or resume (ACTIVE) a trading scope; recorded with who and why.
        Returns the scope's halt afterwards (None once ACTIVE). ``keep_existing``: a scope
        already HALTED keeps its first cause (automatic halts)."""
        from ..errors import InvalidPolicy
        from ..intent import is_text
        from . import control

        if not reason.strip():
            raise InvalidPolicy("a halt or resume needs a reason (it is what the next operator reads)")
        if not (is_text(reason) and is_text(actor)):
            raise InvalidPolicy("a halt's reason and actor must be valid Unicode text (one holds a lone surrogate)")
        return self._control(
            "halt",
            lambda x, now: control.set_state(x, scope, state, cause, reason.strip(), actor, now, keep_existing=keep_existing),
            write=True,
        )

    def halts(self) -> list[HaltRecord]:
        """Every trading scope that is not ACTIVE, newest first."""
        from . import control

        return self._control("read", lambda x, now: control.list_halts(x), write=False)

    def halt_history(self, limit: int = 100) -> list[HaltEvent]:
        """Changes of trading state (halts, reducing, resumes), newest first."""
        from . import control

        return self._control("read", lambda x, now: control.halt_history(x, limit), write=False)

    def register_runner(self, record: RunnerRecord) -> RunnerRecord:
        """Add a runner to the registry, stamped with the store's clock."""
        from ..runners import with_times
        from . import control

        def work(x: Exec, now: float) -> RunnerRecord:
            stamped = with_times(record, now)
            control.register_runner(x, stamped)
            return stamped

        return self._control("runner registration", work, write=True)

    def heartbeat(self, runner_id: str, lease: LeaseRequest | None = None) -> tuple[bool, Lease | None, int]:
        """Record a runner's heartbeat and renew (or take, when free) its leader lease.
        Returns (still registered, the lease it holds now, the ledger's schema version)."""
        from . import control

        return self._control("heartbeat", lambda x, now: control.heartbeat(x, runner_id, lease, now), write=True)

    def stop_runner(self, runner_id: str) -> None:
        """A clean stop: the runner is no longer expected to heartbeat; its lease is given up."""
        from . import control

        self._control("runner stop", lambda x, now: control.stop_runner(x, runner_id, now), write=True)

    def runners(self, *, stopped_within: float = 3600.0) -> list[RunnerRecord]:
        """Registered runners: every one not stopped (unless silent for a week), and those stopped
        in the last ``stopped_within`` seconds; newest first."""
        from . import control

        return self._control(
            "read", lambda x, now: control.list_runners(x, now - stopped_within, now), write=False
        )

    def leases(self) -> list[Lease]:
        """Leader leases of ``exclusive=`` guards."""
        from . import control

        return self._control("read", lambda x, now: control.list_leases(x), write=False)
