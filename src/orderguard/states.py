"""The intent state machine (DESIGN.md, "States of an intent")."""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """Where an intent is in its life. Stored as its name."""

    CLAIMED = "CLAIMED"
    SENDING = "SENDING"
    ACKED = "ACKED"
    PARTIALLY_FILLED = "PARTIALLY_FILLED"
    FILLED = "FILLED"
    CANCELED = "CANCELED"
    EXPIRED = "EXPIRED"
    REJECTED = "REJECTED"
    UNKNOWN = "UNKNOWN"
    NOT_FOUND = "NOT_FOUND"
    ABANDONED = "ABANDONED"


_S = State
_WORKING_RESULTS = {_S.ACKED, _S.PARTIALLY_FILLED, _S.FILLED, _S.CANCELED, _S.EXPIRED}

ALLOWED: dict[State, frozenset[State]] = {
    _S.CLAIMED: frozenset(_WORKING_RESULTS | {_S.SENDING, _S.REJECTED, _S.UNKNOWN, _S.ABANDONED}),
    # SENDING -> ABANDONED only when the adapter proved nothing left (the send deadline passed).
    _S.SENDING: frozenset(_WORKING_RESULTS | {_S.REJECTED, _S.UNKNOWN, _S.ABANDONED}),
    _S.ACKED: frozenset({_S.PARTIALLY_FILLED, _S.FILLED, _S.CANCELED, _S.EXPIRED}),
    _S.PARTIALLY_FILLED: frozenset({_S.PARTIALLY_FILLED, _S.FILLED, _S.CANCELED, _S.EXPIRED}),
    _S.UNKNOWN: frozenset(_WORKING_RESULTS | {_S.REJECTED, _S.NOT_FOUND}),
    _S.FILLED: frozenset(),
    _S.CANCELED: frozenset(),
    _S.EXPIRED: frozenset(),
    _S.REJECTED: frozenset(),
    _S.NOT_FOUND: frozenset(),
    _S.ABANDONED: frozenset(),
}

TERMINAL = frozenset(s for s, nxt in ALLOWED.items() if not nxt)
# Nothing has been answered yet: the order may be on the wire.
PENDING = frozenset({_S.CLAIMED, _S.SENDING})
# The order is (or may be) live at the venue.
WORKING = frozenset({_S.CLAIMED, _S.SENDING, _S.ACKED, _S.PARTIALLY_FILLED, _S.UNKNOWN})
# States that prove nothing was executed; they free every scope the intent held.
# CANCELED and EXPIRED free only when nothing was filled (decided with the fill quantity).
ALWAYS_RELEASING = frozenset({_S.REJECTED, _S.ABANDONED, _S.NOT_FOUND})
RELEASING_IF_UNFILLED = frozenset({_S.CANCELED, _S.EXPIRED})


def can_transition(current: State, target: State) -> bool:
    """True when the state machine allows ``current -> target``."""
    return target in ALLOWED[current]


def releases(state: State, filled_quantity_is_zero: bool) -> bool:
    """True when an intent in ``state`` no longer holds its scopes."""
    return state in ALWAYS_RELEASING or (state in RELEASING_IF_UNFILLED and filled_quantity_is_zero)
