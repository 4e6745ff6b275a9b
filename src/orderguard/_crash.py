"""Named crash and pause points, for the kill -9 and SIGSTOP tests.

``ORDERGUARD_CRASH_AT=after_send`` makes the process SIGKILL itself at that point, and
``ORDERGUARD_PAUSE_AT=after_send`` makes it SIGSTOP itself there, so tests can kill or freeze
a real process at an exact step. Both are read once at import; unset, a point costs a set lookup.

Points: ``after_claim_commit``, ``after_send`` (the venue has the order, the ledger does not
know), ``after_ack_recorded`` (acked in the ledger, fill not yet recorded),
``reconcile_after_lookup`` (the reconciler looked the order up and has not recorded it).
"""

from __future__ import annotations

import os
import signal

POINTS = ("after_claim_commit", "after_send", "after_ack_recorded", "reconcile_after_lookup")
_CRASH = frozenset(p for p in os.environ.get("ORDERGUARD_CRASH_AT", "").split(",") if p)
_PAUSE = frozenset(p for p in os.environ.get("ORDERGUARD_PAUSE_AT", "").split(",") if p)


def point(name: str) -> None:
    """Kill or pause this process here if the environment asks for it."""
    if name in _CRASH:
        os.kill(os.getpid(), signal.SIGKILL)
    if name in _PAUSE:
        os.kill(os.getpid(), signal.SIGSTOP)
