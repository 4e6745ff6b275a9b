"""The control plane both SQL stores share: halts, risk limits, runners and leader leases.

Its tables are schema version 2 (store/schema.py). Written once with ``?`` placeholders against a
tiny ``Exec`` callable (one statement, all rows back), run by each store inside its own transaction: SQLite's ``BEGIN IMMEDIATE`` or a
PostgreSQL transaction, where the upserts on ``scopes``/``leases`` rows serialise claimers of
one scope or lease (transaction-scoped row locks only).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Context, Decimal, localcontext
from typing import TYPE_CHECKING, Any

from ..halts import HaltCause, HaltEvent, HaltRecord, TradingState, covering_halt, reduces_position
from ..intent import canonical_decimal
from ..messages import block_message, clock_text
from ..policies import ScopeKind, canonical_halt_scope
from ..runners import Lease, LeaseRequest, RunnerRecord
from .base import BlockReason, ClaimDecision, explain_block, unknown_from_earlier_window
from .rows import attempt_row
from .schema import ATTEMPT_COLUMNS

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ..intent import OrderIntent
    from ..policies import ScopeRule
    from .base import Caller, IntentRecord

    Exec = Callable[[str, Sequence[Any]], list[Any]]

_ATTEMPT_COLS = ATTEMPT_COLUMNS.removeprefix("id, ")
INSERT_ATTEMPT = f"INSERT INTO attempts({_ATTEMPT_COLS}) VALUES ({', '.join('?' * len(_ATTEMPT_COLS.split(',')))}) RETURNING id"
_HALT_COLS = "scope, state, cause, reason, actor, at"
EXACT = Context(prec=80)  # notional sums: quantity and price limits fit many times over, never rounded
_RUNNER_COLS = (
    "id, runner, strategy, host, pid, started, version, fingerprint, git_commit, modules, exclusive, "
    "heartbeat_every, registered_at, heartbeat_at, stopped_at"
)
_TAKE_LEASE = """
INSERT INTO leases(name, holder, fence, expires_at, acquired_at) VALUES (?, ?, 1, ?, ?)
ON CONFLICT(name) DO UPDATE SET
    fence = CASE WHEN leases.holder = excluded.holder THEN leases.fence ELSE leases.fence + 1 END,
    acquired_at = CASE WHEN leases.holder = excluded.holder THEN leases.acquired_at ELSE excluded.acquired_at END,
    expires_at = CASE WHEN leases.holder = excluded.holder AND leases.expires_at > excluded.expires_at
                      THEN leases.expires_at ELSE excluded.expires_at END,
    holder = excluded.holder
WHERE leases.holder = excluded.holder OR leases.expires_at <= ?
RETURNING name, holder, fence, expires_at, acquired_at
"""
_LOCK_SCOPE = """
INSERT INTO scopes(key, kind, fence) VALUES (?, ?, 1)
ON CONFLICT(key) DO UPDATE SET fence = scopes.fence + 1
RETURNING fence
"""


@dataclass(frozen=True)
class Refusal:
    """Why the gate or a risk limit refused a claim (the store records it as the attempt)."""

    reason: BlockReason
    message: str
    scope_key: str
    halt: HaltRecord | None = None  # the halt that blocked it, or the one its refusal tripped
    tripped: bool = False
    holder: IntentRecord | None = None  # the intent holding the scope (policy refusals)
    rule: ScopeRule | None = None  # the rule that refused (policy and limit refusals)


def halt_from_row(row: Sequence[Any]) -> HaltRecord:
    scope, state, cause, reason, actor, at = row
    return HaltRecord(scope, TradingState(state), HaltCause(cause), reason, actor, float(at))


def runner_from_row(row: Sequence[Any]) -> RunnerRecord:
    (id_, runner, strategy, host, pid, started, version, fp, commit, modules, exclusive, every,
     registered, beat, stopped) = row
    return RunnerRecord(
        id=id_, runner=runner, strategy=strategy, host=host, pid=int(pid), started=started, version=version,
        fingerprint=fp, git_commit=commit, modules=modules, exclusive=exclusive, heartbeat_every=float(every),
        registered_at=float(registered), heartbeat_at=float(beat), stopped_at=None if stopped is None else float(stopped),
    )


def _lease_from_row(row: Sequence[Any]) -> Lease:
    name, holder, fence, expires_at, acquired_at = row
    return Lease(name, holder, int(fence), float(expires_at), float(acquired_at))


# --------------------------------------------------------------------------- the gate


def gate(
    x: Exec, intent: OrderIntent, exclusive: LeaseRequest | None, now: float
) -> tuple[Refusal | None, Lease | None]:
    """Halts and the leader lease, checked first in every claim transaction.

    Returns the refusal (HALTED / NOT_LEADER) or None, and the lease this claim holds.
    """
    halts = [halt_from_row(r) for r in x(f"SELECT {_HALT_COLS} FROM halts", ())]
    halt = covering_halt(halts, intent) if halts else None
    if halt is not None:
        if halt.state is TradingState.HALTED:
            return Refusal(BlockReason.HALTED, _halted_message(intent, halt), halt.scope, halt), None
        # REDUCING: claimers of one account+symbol queue on this row, so two reducing orders
        # cannot both count the same position as room.
        lock_key = f"reduce|account={intent.account}|symbol={intent.symbol}"
        x(_LOCK_SCOPE, (lock_key, "reduce"))
        rows = x(
            "SELECT side, quantity, filled_quantity, state, released FROM intents WHERE account = ? AND symbol = ?",
            (intent.account, intent.symbol),
        )
        ok, position = reduces_position(intent, rows)
        if not ok:
            return Refusal(BlockReason.HALTED, _reducing_message(intent, halt, position), halt.scope, halt), None
    if exclusive is None:
        return None, None
    taken = x(_TAKE_LEASE, (exclusive.name, exclusive.runner_id, now + exclusive.seconds, now, now))
    if taken:
        return None, _lease_from_row(taken[0])
    held = x(
        "SELECT l.holder, l.expires_at, r.runner, r.host, r.pid FROM leases l "
        "LEFT JOIN runners r ON r.id = l.holder WHERE l.name = ?",
        (exclusive.name,),
    )
    holder, expires_at, runner, host, pid = held[0]
    who = f"runner {runner} on {host} pid {pid}" if runner else f"runner id {holder}"
    message = (
        f"BLOCKED NOT_LEADER: {intent.describe()} from {intent.source} — exclusive {exclusive.name!r} is led by "
        f"{who} until {clock_text(float(expires_at))}. Nothing was sent. Next: nothing; this runner is a standby "
        f"and takes over if the leader stops renewing its {exclusive.seconds:g}s lease (`orderguard runners`)."
    )
    return Refusal(BlockReason.NOT_LEADER, message, f"lease|{exclusive.name}"), None


def _halted_message(intent: OrderIntent, halt: HaltRecord) -> str:
    return (
        f"BLOCKED HALTED: {intent.describe()} from {intent.source} — trading scope {halt.describe()}. "
        f"Nothing was sent. Next: find out why, then `orderguard resume '{halt.scope}' --reason ...`."
    )


def _reducing_message(intent: OrderIntent, halt: HaltRecord, position: Decimal) -> str:
    return (
        f"BLOCKED HALTED: {intent.describe()} from {intent.source} — trading scope {halt.describe()}: only "
        f"orders that shrink a position are allowed, and the ledger's position in {intent.symbol} for "
        f"account {intent.account} is {canonical_decimal(position)} (working reducing orders counted). "
        f"Nothing was sent. Next: `orderguard resume '{halt.scope}' --reason ...` to trade normally again."
    )


# ---------------------------------------------------------------------- risk limits


def take_limit(
    x: Exec, rule: ScopeRule, intent: OrderIntent, intent_id: str, now: float
) -> tuple[int | None, Refusal | None]:
    """Count a risk-limit scope and, when there is room, book this intent in it.

    Returns (the scope's new fence, None) or (None, the refusal). The scope row's upsert comes
    first: on PostgreSQL it makes claimers of one limit scope take turns.
    """
    fence = int(x(_LOCK_SCOPE, (rule.key, rule.kind.value))[0][0])
    since = now - rule.seconds
    x("DELETE FROM limit_events WHERE scope_key = ? AND at <= ?", (rule.key, since))
    # Everything that reached (or may have reached) the venue counts, rejected and canceled
    # orders too: only intents that never left (ABANDONED, NOT_FOUND) give their slot back.
    rows = x(
        "SELECT e.notional FROM limit_events e JOIN intents i ON i.id = e.intent_id "
        "WHERE e.scope_key = ? AND e.at > ? AND i.state NOT IN ('ABANDONED', 'NOT_FOUND')",
        (rule.key, since),
    )
    notional = rule.notional or Decimal(0)
    if rule.kind is ScopeKind.RATE:
        if len(rows) >= rule.limit:
            used = f"{len(rows)} orders in the last {rule.seconds:g}s (limit {rule.limit})"
            return None, _limit_refusal(BlockReason.RATE_LIMIT, intent, rule, used)
    else:
        with localcontext(EXACT):
            total = sum((Decimal(r[0]) for r in rows), Decimal(0))
            over = total + notional > (rule.amount or Decimal(0))
        if over:
            used = (
                f"{canonical_decimal(total)} placed in the last {rule.seconds:g}s + {canonical_decimal(notional)} "
                f"would exceed {canonical_decimal(rule.amount)}"
            )
            return None, _limit_refusal(BlockReason.NOTIONAL_LIMIT, intent, rule, used)
    with localcontext(EXACT):
        booked = canonical_decimal(notional)
    x("INSERT INTO limit_events(scope_key, at, intent_id, notional) VALUES (?, ?, ?, ?)", (rule.key, now, intent_id, booked))
    return fence, None


def _limit_refusal(reason: BlockReason, intent: OrderIntent, rule: ScopeRule, used: str) -> Refusal:
    trip = (
        f" The breaker tripped: trading scope {rule.halt_scope} is now HALTED. Next: find the bug, then "
        f"`orderguard resume '{rule.halt_scope}' --reason ...`."
        if rule.trip else " Next: wait for the period to roll, or raise the limit if this volume is intended."
    )
    message = f"BLOCKED {reason.value}: {intent.describe()} from {intent.source} — {rule.policy}: {used}. Nothing was sent.{trip}"
    return Refusal(reason, message, rule.key, tripped=rule.trip, rule=rule)


def take_rules(
    x: Exec,
    rules: Sequence[ScopeRule],
    intent: OrderIntent,
    intent_id: str,
    now: float,
    take: Callable[[ScopeRule], int | None],
    holders: Callable[[ScopeRule], list[IntentRecord]],
) -> tuple[int, Refusal | None, int]:
    """Take every rule's scope in order: (the first rule's fence, the refusal, its index).

    A refusal at index > 0 leaves earlier writes for the caller to undo (rollback/savepoint).
    """
    fence = 0
    for index, rule in enumerate(rules):
        if rule.is_limit:
            token, refusal = take_limit(x, rule, intent, intent_id, now)
        else:
            token, refusal = take(rule), None
            if token is None:
                reason, holder = explain_block(rule, intent, holders(rule))
                message = block_message(reason, intent, rule, holder)
                refusal = Refusal(reason, message, rule.key, holder=holder, rule=rule)
        if refusal is not None or token is None:
            return fence, refusal, index
        if index == 0:
            fence = token
    return fence, None, -1


def carried_over(rules: Sequence[ScopeRule], intent: OrderIntent, unknown: Sequence[IntentRecord]) -> Refusal | None:
    """An UNKNOWN intent of the same scope in an earlier window (see unknown_from_earlier_window)."""
    found = unknown_from_earlier_window(rules, unknown)
    if found is None:
        return None
    rule, holder = found
    message = block_message(BlockReason.UNKNOWN_PENDING, intent, rule, holder)
    return Refusal(BlockReason.UNKNOWN_PENDING, message, rule.key, holder=holder, rule=rule)


def refuse(
    x: Exec, refusal: Refusal, rules: tuple[ScopeRule, ...], intent: OrderIntent, caller: Caller, now: float
) -> ClaimDecision:
    """Record a refused claim (in its transaction): trip the breaker if the refusal asks for it,
    write the blocked attempt with its reason and holder, and say what was decided."""
    if refusal.tripped and refusal.rule is not None:
        refusal = trip(x, refusal, refusal.rule, caller.who(), now)
    holder = refusal.holder
    row = attempt_row(
        now, "BLOCKED", refusal.reason, None, holder.id if holder else None, refusal.scope_key, caller, intent,
        refusal.message,
    )
    attempt_id = int(x(INSERT_ATTEMPT, row)[0][0])
    return ClaimDecision(
        claimed=False, attempt_id=attempt_id, reason=refusal.reason, holder=holder, rule=refusal.rule,
        message=refusal.message, rules=rules, halt=refusal.halt, tripped=refusal.tripped,
    )


def lease_cut(lease: Lease | None, send_by_at: float | None) -> float | None:
    """A claim under a leader lease is never sent after the lease lapses (a standby may lead then);
    an opaque claim (no deadline of its own) gets the lease's expiry as its deadline."""
    if lease is None:
        return send_by_at
    return lease.expires_at if send_by_at is None else min(send_by_at, lease.expires_at)


def recheck_halts(x: Exec, intent: OrderIntent) -> Refusal | None:
    """HALTED again, after the claim waited for its scopes' row locks (PostgreSQL): a breaker
    that tripped while this claim queued on its limit committed the halt before letting go."""
    halt = covering_halt([halt_from_row(r) for r in x(f"SELECT {_HALT_COLS} FROM halts", ())], intent)
    if halt is not None and halt.state is TradingState.HALTED:
        return Refusal(BlockReason.HALTED, _halted_message(intent, halt), halt.scope, halt)
    return None


def trip(x: Exec, refusal: Refusal, rule: ScopeRule, actor: str, now: float) -> Refusal:
    """Halt the limit's trading scope (in the refusal's transaction). A scope already halted
    keeps its first cause."""
    cause = HaltCause.RATE_LIMIT if refusal.reason is BlockReason.RATE_LIMIT else HaltCause.NOTIONAL_LIMIT
    reason = refusal.message.split(" — ", 1)[-1].split(" Nothing was sent.")[0]
    halt = set_state(x, rule.halt_scope, TradingState.HALTED, cause, reason, actor, now, keep_existing=True)
    # Only the refusal that wrote the halt tripped the breaker; later ones found it halted.
    wrote = halt is not None and (halt.cause, halt.reason, halt.actor, halt.at) == (cause, reason, actor, now)
    return replace(refusal, halt=halt, tripped=wrote)


# --------------------------------------------------------------------------- upgrade


def refuse_live_old_runners(x: Exec, now: float, where: str) -> None:
    """Before schema 1 -> 2: a process of this host that claimed in the last week and still runs
    has an orderguard that knows no halts, limits or leases and would keep claiming after the
    upgrade. Refuse (SchemaMismatch) until it is stopped; other hosts cannot be checked."""
    from ..errors import SchemaMismatch
    from .base import owner_alive

    rows = x(
        "SELECT DISTINCT host, pid, owner_started, runner FROM intents WHERE created_at > ?", (now - 7 * 86400,)
    )
    alive = [f"pid {pid} ({runner})" for host, pid, started, runner in rows if owner_alive(host, int(pid), started)]
    if alive:
        raise SchemaMismatch(
            f"not upgrading {where}: {', '.join(sorted(set(alive)))} on this host claimed through it this week and "
            "still run(s); an orderguard that predates schema 2 ignores halts, risk limits and leases. Stop them "
            "(and the old runners on other hosts), then migrate again (or `orderguard migrate --force`)."
        )


# ----------------------------------------------------------------------------- halts


def set_state(
    x: Exec, scope: str, state: TradingState, cause: HaltCause, reason: str, actor: str, now: float,
    *, keep_existing: bool = False,
) -> HaltRecord | None:
    """Set a trading scope's state; ACTIVE removes its halt. Returns the scope's halt after it.

    ``keep_existing`` (automatic halts): a scope already HALTED keeps its first cause; a REDUCING
    one is escalated to HALTED. One conditional upsert, so a halt committed concurrently is
    never overwritten (PostgreSQL: the row lock orders the writers).
    """
    scope = canonical_halt_scope(scope)
    if state is TradingState.ACTIVE:
        x("DELETE FROM halts WHERE scope = ?", (scope,))
    else:
        condition = " WHERE halts.state <> 'HALTED'" if keep_existing else ""
        written = x(
            f"INSERT INTO halts({_HALT_COLS}) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(scope) DO UPDATE SET "
            "state = excluded.state, cause = excluded.cause, reason = excluded.reason, actor = excluded.actor, "
            f"at = excluded.at{condition} RETURNING scope",
            (scope, state.value, cause.value, reason, actor, now),
        )
        if not written:  # already HALTED: keep its cause, record nothing
            return halt_from_row(x(f"SELECT {_HALT_COLS} FROM halts WHERE scope = ?", (scope,))[0])
    x(
        "INSERT INTO halt_events(at, scope, state, cause, reason, actor) VALUES (?, ?, ?, ?, ?, ?)",
        (now, scope, state.value, cause.value, reason, actor),
    )
    return None if state is TradingState.ACTIVE else HaltRecord(scope, state, cause, reason, actor, now)


def list_halts(x: Exec) -> list[HaltRecord]:
    return [halt_from_row(r) for r in x(f"SELECT {_HALT_COLS} FROM halts ORDER BY at DESC", ())]


def halt_history(x: Exec, limit: int) -> list[HaltEvent]:
    rows = x("SELECT id, at, scope, state, cause, reason, actor FROM halt_events ORDER BY id DESC LIMIT ?", (int(limit),))
    return [
        HaltEvent(int(i), float(at), scope, TradingState(st), HaltCause(c), reason, actor)
        for i, at, scope, st, c, reason, actor in rows
    ]


# --------------------------------------------------------------------------- runners


def register_runner(x: Exec, record: RunnerRecord) -> None:
    values = (
        record.id, record.runner, record.strategy, record.host, record.pid, record.started, record.version,
        record.fingerprint, record.git_commit, record.modules, record.exclusive, record.heartbeat_every,
        record.registered_at, record.heartbeat_at, record.stopped_at,
    )
    x(
        f"INSERT INTO runners({_RUNNER_COLS}) VALUES ({', '.join('?' * len(values))}) ON CONFLICT(id) DO UPDATE SET "
        "heartbeat_at = excluded.heartbeat_at, stopped_at = NULL",
        values,
    )


def heartbeat(x: Exec, runner_id: str, lease: LeaseRequest | None, now: float) -> tuple[bool, Lease | None, int]:
    """Record a heartbeat; renew (or take, when free) the runner's lease.

    Returns (still registered, the lease held now, the ledger's schema version: a runner whose
    ledger was upgraded under it must stop claiming)."""
    version = int(x("SELECT value FROM meta WHERE key = 'schema_version'", ())[0][0])
    known = bool(x("UPDATE runners SET heartbeat_at = ? WHERE id = ? AND stopped_at IS NULL RETURNING id", (now, runner_id)))
    if lease is None or not known:
        return known, None, version
    taken = x(_TAKE_LEASE, (lease.name, lease.runner_id, now + lease.seconds, now, now))
    return known, _lease_from_row(taken[0]) if taken else None, version


def stop_runner(x: Exec, runner_id: str, now: float) -> None:
    x("UPDATE runners SET stopped_at = ? WHERE id = ? AND stopped_at IS NULL", (now, runner_id))
    x("UPDATE leases SET expires_at = ? WHERE holder = ? AND expires_at > ?", (now, runner_id, now))


FORGET_SILENT_AFTER = 7 * 86400.0  # a runner silent this long without stopping is no longer listed


def list_runners(x: Exec, since: float, now: float) -> list[RunnerRecord]:
    """Runners not stopped (silent for a week: forgotten), and those stopped after ``since``; newest first."""
    rows = x(
        f"SELECT {_RUNNER_COLS} FROM runners WHERE (stopped_at IS NULL AND heartbeat_at >= ?) OR stopped_at >= ? "
        "ORDER BY registered_at DESC",
        (now - FORGET_SILENT_AFTER, since),
    )
    return [runner_from_row(r) for r in rows]


def list_leases(x: Exec) -> list[Lease]:
    return [_lease_from_row(r) for r in x("SELECT name, holder, fence, expires_at, acquired_at FROM leases ORDER BY name", ())]
