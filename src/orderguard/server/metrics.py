"""``GET /metrics``: Prometheus counters of this gateway, and ledger-wide gauges read at scrape time."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..states import State

if TYPE_CHECKING:
    from ..claim import SubmitResult
    from ..store.base import Store


class Metrics:
    """One registry per app (several apps in one process do not collide)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.registry = CollectorRegistry()
        self.claims = Counter(
            "orderguard_claims", "Intents submitted through the gateway, by outcome", ["outcome"], registry=self.registry
        )
        self.blocks = Counter(
            "orderguard_blocks", "Attempts blocked at the gateway, by reason", ["reason"], registry=self.registry
        )
        self.unknowns = Counter(
            "orderguard_unknown_outcomes", "Orders sent by the gateway whose outcome is UNKNOWN", registry=self.registry
        )
        self.latency = Histogram(
            "orderguard_submit_seconds", "Claim + send + record time of POST /v1/intents", registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.halts = Gauge("orderguard_halts", "Trading scopes not ACTIVE (ledger-wide)", registry=self.registry)
        self.unknown_now = Gauge(
            "orderguard_unknown_intents", "Intents in state UNKNOWN (ledger-wide)", registry=self.registry
        )

    def observe(self, result: SubmitResult, seconds: float) -> None:
        self.claims.labels(result.outcome.value).inc()
        if result.reason is not None:
            self.blocks.labels(result.reason.value).inc()
        if result.intent is not None and result.intent.state is State.UNKNOWN:
            self.unknowns.inc()
        self.latency.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        self.halts.set(len(self.store.halts()))
        self.unknown_now.set(len(self.store.intents(states=[State.UNKNOWN], limit=100_000)))
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
