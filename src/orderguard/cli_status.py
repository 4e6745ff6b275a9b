"""What ``orderguard status`` reports: open and UNKNOWN intents and recent blocks, per strategy."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .cli_json import iso_time
from .states import State

if TYPE_CHECKING:
    from .store.base import AttemptRecord, IntentRecord, Store

IN_FLIGHT = (State.CLAIMED, State.SENDING, State.ACKED, State.PARTIALLY_FILLED)
_MANY = 100_000


@dataclass
class StrategyStatus:
    strategy: str
    in_flight: list[IntentRecord] = field(default_factory=list)
    unknown: list[IntentRecord] = field(default_factory=list)
    blocked: list[AttemptRecord] = field(default_factory=list)  # newest first

    @property
    def blocked_by_reason(self) -> dict[str, int]:
        counts = Counter(a.reason.value if a.reason else "?" for a in self.blocked)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class StatusView:
    ledger: str
    now: float
    since: float
    strategies: list[StrategyStatus]

    def total(self, what: str) -> int:
        return sum(len(getattr(s, what)) for s in self.strategies)

    def to_json(self) -> dict[str, Any]:
        return {
            "ledger": self.ledger,
            "now": iso_time(self.now),
            "blocked_since": iso_time(self.since),
            "totals": {k: self.total(k) for k in ("in_flight", "unknown", "blocked")},
            "strategies": [
                {
                    "strategy": s.strategy,
                    "in_flight": s.in_flight,
                    "unknown": s.unknown,
                    "blocked_by_reason": s.blocked_by_reason,
                    "blocked": s.blocked,
                }
                for s in self.strategies
            ],
        }


def collect_status(store: Store, ledger: str, since: float) -> StatusView:
    """Every in-flight and UNKNOWN intent, and the attempts blocked since ``since``."""
    now = store.now()
    groups: dict[str, StrategyStatus] = {}

    def group(name: str) -> StrategyStatus:
        return groups.setdefault(name, StrategyStatus(name))

    for rec in store.intents(states=[*IN_FLIGHT, State.UNKNOWN], limit=_MANY):
        (group(rec.strategy).unknown if rec.state is State.UNKNOWN else group(rec.strategy).in_flight).append(rec)
    for attempt in store.attempts(blocked=True, since=since, limit=_MANY):
        group(attempt.strategy).blocked.append(attempt)
    return StatusView(ledger, now, since, [groups[k] for k in sorted(groups)])
