"""What an audit found: clusters, per-symbol totals, reconciliation, as objects and as JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import cached_property
from typing import TYPE_CHECKING, Any

from ..intent import canonical_decimal
from .books import BookStatus, position_key
from .clusters import Cluster, Settings, Verdict

if TYPE_CHECKING:
    from .books import CashCheck, PositionCheck, TableRef
    from .columns import TradeColumns
    from .source import Source


def iso_us(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class SymbolTotal:
    """Duplicates of one symbol in one scope (strategy/account...), both sides together."""

    scope: tuple[str, ...]
    symbol: str
    clusters: int
    duplicate_orders: int
    excess_qty: Decimal
    phantom_notional: Decimal
    cash_effect: Decimal  # cash drained (positive) or credited (negative) by the duplicates
    largest_burst: int  # orders in its biggest burst: the kept one and its duplicates
    first_us: int


@dataclass(frozen=True)
class AuditReport:
    """The result of :func:`orderguard.audit.audit`. Money and quantities are exact ``Decimal``."""

    source: Source
    table: str | None
    columns: TradeColumns
    settings: Settings
    rows: int
    skipped_rows: int
    first_us: int
    last_us: int
    symbols: int
    clusters: tuple[Cluster, ...]
    positions: tuple[PositionCheck, ...] | None
    cash: tuple[CashCheck, ...] | None
    positions_ref: TableRef | None
    cash_ref: TableRef | None
    id_unique: bool
    warnings: tuple[str, ...]
    seconds: float

    @property
    def duplicates(self) -> list[Cluster]:
        """The clusters counted as duplicate bursts (confidence at or above the threshold)."""
        return [c for c in self.clusters if c.verdict is Verdict.DUPLICATE]

    @property
    def duplicate_orders(self) -> int:
        return sum(c.repeats for c in self.duplicates)

    @property
    def excess_qty(self) -> Decimal:
        return sum((c.excess_qty for c in self.duplicates), Decimal(0))

    @property
    def phantom_notional(self) -> Decimal:
        return sum((c.phantom_notional for c in self.duplicates), Decimal(0))

    def status_of(self, cluster: Cluster) -> BookStatus:
        """How the positions table explains a cluster's symbol (UNVERIFIED without one)."""
        if self.positions is None or self.positions_ref is None:
            return BookStatus.UNVERIFIED
        key = position_key(cluster, self.columns, self.positions_ref)
        return self._statuses.get(key, BookStatus.UNEXPLAINED)

    @cached_property
    def _statuses(self) -> dict[tuple[str, ...], BookStatus]:
        return {(*p.key, p.symbol): p.status for p in self.positions or ()}

    def fixable(self) -> list[Cluster]:
        """Duplicate clusters a correction may delete: confirmed phantoms, or every duplicate
        when no positions table was given to confirm against."""
        allowed = (BookStatus.PHANTOM, BookStatus.UNVERIFIED)
        return [c for c in self.duplicates if self.status_of(c) in allowed]

    def cash_missing(self) -> list[str]:
        """Keys (account...) whose phantom duplicates drained cash but which have no cash row."""
        if self.cash is None or self.cash_ref is None:
            return []
        have = {c.key for c in self.cash}
        index = [self.columns.scope.index(name) for name in self.cash_ref.join]
        missing = {tuple(c.scope[i] for i in index) for c in self.fixable()} - have
        return sorted(", ".join(f"{n}={v}" for n, v in zip(self.cash_ref.join, key, strict=True)) for key in missing)

    def by_symbol(self) -> list[SymbolTotal]:
        """Per scope and symbol, most phantom notional first."""
        groups: dict[tuple[tuple[str, ...], str], list[Cluster]] = {}
        for c in self.duplicates:
            groups.setdefault((c.scope, c.symbol), []).append(c)
        totals = [
            SymbolTotal(
                scope=scope, symbol=symbol, clusters=len(cs), duplicate_orders=sum(c.repeats for c in cs),
                excess_qty=sum((c.excess_qty for c in cs), Decimal(0)),
                phantom_notional=sum((c.phantom_notional for c in cs), Decimal(0)),
                cash_effect=sum((c.cash_effect for c in cs), Decimal(0)),
                largest_burst=max(c.repeats for c in cs) + 1, first_us=min(c.first_us for c in cs),
            )
            for (scope, symbol), cs in groups.items()
        ]
        totals.sort(key=lambda t: (-t.phantom_notional, t.symbol, t.scope))
        return totals

    def counts(self) -> dict[str, int]:
        out = {v.value: 0 for v in Verdict}
        for c in self.clusters:
            out[c.verdict.value] += 1
        return out

    def to_json(self, *, ids: bool = True) -> dict[str, Any]:
        """A JSON-ready document (Decimal as strings, times ISO 8601 UTC). ``ids=False`` leaves out
        the row ids of each cluster's repeats (large histories)."""
        return {
            "source": self.source.display, "kind": self.source.kind.value, "table": self.table,
            "columns": self.columns.as_dict(),
            "settings": dataclasses.asdict(self.settings),
            "rows": self.rows, "skipped_rows": self.skipped_rows,
            "from": iso_us(self.first_us), "to": iso_us(self.last_us), "symbols": self.symbols,
            "totals": {
                "clusters": self.counts(), "duplicate_orders": self.duplicate_orders,
                "excess_qty": _num(self.excess_qty), "phantom_notional": _num(self.phantom_notional),
                "fixable_orders": sum(c.repeats for c in self.fixable()),
            },
            "by_symbol": [
                {
                    "scope": dict(zip(self.columns.scope, t.scope, strict=True)), "symbol": t.symbol,
                    "clusters": t.clusters, "duplicate_orders": t.duplicate_orders, "excess_qty": _num(t.excess_qty),
                    "phantom_notional": _num(t.phantom_notional), "cash_effect": _num(t.cash_effect),
                    "largest_burst": t.largest_burst, "first": iso_us(t.first_us),
                }
                for t in self.by_symbol()
            ],
            "clusters": [self._cluster_json(c, ids) for c in self.clusters],
            "positions": None if self.positions is None else [
                {
                    "key": list(p.key), "symbol": p.symbol, "trades_net": _num(p.trades_net),
                    "duplicates_net": _num(p.duplicates_net), "position": _num(p.position), "status": p.status.value,
                }
                for p in self.positions
            ],
            "cash": None if self.cash is None else [
                {
                    "key": list(c.key), "recorded": _num(c.recorded), "phantom": _num(c.phantom),
                    "corrected": _num(c.corrected), "trades_flow": _num(c.trades_flow),
                    "starting": None if c.starting is None else _num(c.starting),
                    "implied_by_trades": None if c.implied_by_trades is None else _num(c.implied_by_trades),
                }
                for c in self.cash
            ],
            "id_unique": self.id_unique,
            "warnings": list(self.warnings),
            "seconds": round(self.seconds, 3),
        }

    def _cluster_json(self, c: Cluster, ids: bool) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "scope": dict(zip(self.columns.scope, c.scope, strict=True)), "symbol": c.symbol, "side": c.side,
            "orders": c.orders, "first": iso_us(c.first_us), "last": iso_us(c.last_us), "first_id": _plain(c.first_id),
            "duplicates": c.repeats, "excess_qty": _num(c.excess_qty),
            "phantom_notional": _num(c.phantom_notional), "confidence": c.confidence,
            "max_gap_seconds": c.max_gap_seconds, "verdict": c.verdict.value, "positions": self.status_of(c).value,
        }
        if ids:
            doc["repeat_ids"] = [_plain(i) for i in c.repeat_ids]
        return doc


def _num(value: Decimal) -> str:
    return canonical_decimal(value)


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, str)) else str(value)
