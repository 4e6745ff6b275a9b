"""Trading states (the kill switch): ACTIVE, REDUCING, HALTED per trading scope.

A trading scope is ``global`` or ``field=value`` pairs of intent fields
(``strategy=spx``, ``account=main``, ``account=main,symbol=SPX``). Halts live in the ledger, so
every process and host sees one at its next claim. Only non-ACTIVE scopes have a row; every
change is also kept in a history with who, when, why and what caused it.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING

from .policies import GLOBAL_SCOPE, halt_scope_matches
from .states import TERMINAL, State

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from .intent import OrderIntent


class TradingState(StrEnum):
    """What a trading scope may do."""

    ACTIVE = "ACTIVE"  # trade normally
    REDUCING = "REDUCING"  # only orders that shrink a position the ledger knows of
    HALTED = "HALTED"  # nothing new (cancels are not claims and stay possible)


class HaltCause(StrEnum):
    """Why a scope left ACTIVE (or who brought it back)."""

    OPERATOR = "OPERATOR"
    RATE_LIMIT = "RATE_LIMIT"
    NOTIONAL_LIMIT = "NOTIONAL_LIMIT"
    UNKNOWN_OUTCOMES = "UNKNOWN_OUTCOMES"
    DUPLICATE_CLIENT_ID = "DUPLICATE_CLIENT_ID"
    DRIFT = "DRIFT"
    LEDGER_WRITE_FAILURE = "LEDGER_WRITE_FAILURE"


@dataclass(frozen=True)
class HaltRecord:
    """A trading scope that is not ACTIVE, as the ledger holds it."""

    scope: str
    state: TradingState
    cause: HaltCause
    reason: str
    actor: str  # who: "operator alice@desk-1", "runner spx-bot on host-a pid 42"
    at: float  # store clock

    def describe(self) -> str:
        from .messages import clock_text

        return (
            f"{self.scope} is {self.state.value} since {clock_text(self.at)} "
            f"({self.cause.value} by {self.actor}: {self.reason})"
        )


@dataclass(frozen=True)
class HaltEvent:
    """One change of a trading scope's state (history; resumes included)."""

    id: int
    at: float
    scope: str
    state: TradingState
    cause: HaltCause
    reason: str
    actor: str


def covering_halt(halts: Iterable[HaltRecord], intent: OrderIntent) -> HaltRecord | None:
    """The halt that governs ``intent``: a HALTED scope covering it first, else a REDUCING one."""
    reducing = None
    for halt in halts:
        if halt.scope == GLOBAL_SCOPE or halt_scope_matches(halt.scope, intent):
            if halt.state is TradingState.HALTED:
                return halt
            reducing = reducing or halt
    return reducing


def reduces_position(intent: OrderIntent, rows: Sequence[Sequence[object]]) -> tuple[bool, Decimal]:
    """Whether ``intent`` only shrinks the position, from the ledger's intents of its account and
    symbol as (side, quantity, filled_quantity, state, released) rows; and that position.

    Conservative: orders still working on the reducing side count as if they will fill, so two
    reducing orders cannot together flip the position; working orders that would grow it are
    not counted as room.
    """
    position = Decimal(0)
    working = {"BUY": Decimal(0), "SELL": Decimal(0)}
    for side, quantity, filled, state, released in rows:
        filled_qty = Decimal(str(filled))
        position += filled_qty if side == "BUY" else -filled_qty
        if State(str(state)) not in TERMINAL and not released:
            working[str(side)] += Decimal(str(quantity)) - filled_qty
    if position == 0:
        return False, position
    reducing_side = "SELL" if position > 0 else "BUY"
    ok = intent.side.value == reducing_side and intent.quantity + working[reducing_side] <= abs(position)
    return ok, position
