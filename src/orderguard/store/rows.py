"""Row <-> record conversion shared by the SQL stores (columns as in the schema's order)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from ..intent import canonical_decimal
from ..states import State
from .base import AttemptRecord, BlockReason, Caller, IntentRecord

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..intent import OrderIntent


def _dec(text: str | None) -> Decimal | None:
    return None if text is None or text == "" else Decimal(text)


def intent_from_row(row: Sequence[Any]) -> IntentRecord:
    (id_, coid, fence, scope_key, scope_keys, state, account, strategy, symbol, side, quantity,
     order_type, limit_price, stop_price, tif, source, tags, digest, created_at, updated_at, host,
     pid, runner, thread, task, broker_order_id, filled, avg, released, closed, note, miss, attempt_id,
     send_by_at, owner_started) = row
    return IntentRecord(
        id=id_, client_order_id=coid, fence=int(fence), scope_key=scope_key,
        scope_keys=tuple(scope_keys.split("\n")) if scope_keys else (scope_key,), state=State(state), account=account,
        strategy=strategy, symbol=symbol, side=side, quantity=Decimal(quantity),
        order_type=order_type, limit_price=_dec(limit_price), stop_price=_dec(stop_price),
        time_in_force=tif, source=source, tags=json.loads(tags), payload_digest=digest,
        created_at=float(created_at), updated_at=float(updated_at), host=host, pid=int(pid),
        runner=runner, thread=thread, task=task, broker_order_id=broker_order_id,
        filled_quantity=Decimal(filled), average_price=_dec(avg), released=bool(released),
        closed=bool(closed), note=note, first_miss_at=None if miss is None else float(miss),
        attempt_id=attempt_id, send_by_at=None if send_by_at is None else float(send_by_at),
        owner_started=owner_started,
    )


def attempt_from_row(row: Sequence[Any]) -> AttemptRecord:
    (id_, at, outcome, reason, intent_id, holder_id, scope_key, host, pid, runner, thread, task,
     source, account, strategy, symbol, side, quantity, order_type, limit_price, stop_price,
     message) = row
    return AttemptRecord(
        id=int(id_), at=float(at), outcome=outcome,
        reason=None if reason is None else BlockReason(reason), intent_id=intent_id,
        holder_id=holder_id, scope_key=scope_key, host=host, pid=int(pid), runner=runner,
        thread=thread, task=task, source=source, account=account, strategy=strategy,
        symbol=symbol, side=side, quantity=Decimal(quantity), order_type=order_type,
        limit_price=_dec(limit_price), stop_price=_dec(stop_price),
        # A claimed attempt's row is kept short; its intent row holds the details.
        message=message or f"CLAIMED {strategy} {symbol} {side} {quantity} (account {account}) from {source} as intent {intent_id}",
    )


def new_intent_record(
    intent: OrderIntent, intent_id: str, coid: str, fence: int, scope_keys: tuple[str, ...],
    state: State, caller: Caller, now: float, attempt_id: int, send_by_at: float | None,
) -> IntentRecord:
    return IntentRecord(
        id=intent_id, client_order_id=coid, fence=fence, scope_key=scope_keys[0],
        scope_keys=scope_keys, state=state, account=intent.account, strategy=intent.strategy,
        symbol=intent.symbol, side=intent.side.value, quantity=intent.quantity,
        order_type=intent.order_type.value, limit_price=intent.limit_price,
        stop_price=intent.stop_price, time_in_force=intent.time_in_force.value,
        source=intent.source, tags=dict(intent.tags), payload_digest=intent.payload_digest(),
        created_at=now, updated_at=now, host=caller.host, pid=caller.pid, runner=caller.runner,
        thread=caller.thread, task=caller.task, attempt_id=attempt_id, send_by_at=send_by_at,
        owner_started=caller.started,
    )


def intent_row(
    intent: OrderIntent, intent_id: str, scope_keys: tuple[str, ...], state: State, caller: Caller, now: float,
    send_by_at: float | None = None,
) -> list[Any]:
    """Insert parameters of a new intent in INTENT_COLUMNS order, with the client order id
    (index 1), fence (2) and attempt id (ATTEMPT_SLOT) left for the claim transaction to fill in."""
    return [
        # scope_keys is stored only when there are several (rows stay short: fewer page splits)
        intent_id, None, None, scope_keys[0], "\n".join(scope_keys) if len(scope_keys) > 1 else "",
        state.value, intent.account,
        intent.strategy, intent.symbol, intent.side.value, canonical_decimal(intent.quantity),
        intent.order_type.value, _opt(intent.limit_price), _opt(intent.stop_price),
        intent.time_in_force.value, intent.source,
        json.dumps(intent.tags, sort_keys=True) if intent.tags else "{}", intent.payload_digest(),
        now, now, caller.host, caller.pid, caller.runner, caller.thread, caller.task, None, "0", None,
        0, 0, None, None, None, send_by_at, caller.started,
    ]


ATTEMPT_SLOT = -3  # where intent_row leaves the attempt id
SEND_BY_SLOT = -2  # where intent_row puts send_by_at (a leader lease may cut it shorter)


def attempt_row(
    at: float, outcome: str, reason: BlockReason | None, intent_id: str | None,
    holder_id: str | None, scope_key: str | None, caller: Caller, intent: OrderIntent, message: str,
) -> tuple[Any, ...]:
    """Insert parameters of an attempt (every column but ``id``)."""
    return (
        at, outcome, None if reason is None else reason.value, intent_id, holder_id, scope_key,
        caller.host, caller.pid, caller.runner, caller.thread, caller.task, intent.source,
        intent.account, intent.strategy, intent.symbol, intent.side.value,
        canonical_decimal(intent.quantity), intent.order_type.value, _opt(intent.limit_price),
        _opt(intent.stop_price), message,
    )


def _opt(value: Decimal | None) -> str | None:
    return None if value is None else canonical_decimal(value)


def where_clause(terms: Sequence[tuple[str, Sequence[Any], bool]]) -> tuple[str, list[Any]]:
    """``WHERE a AND b`` and its parameters, from (condition, parameters, wanted) terms."""
    used = [(sql, params) for sql, params, wanted in terms if wanted]
    clause = f"WHERE {' AND '.join(sql for sql, _ in used)}" if used else ""
    return clause, [p for _, params in used for p in params]
