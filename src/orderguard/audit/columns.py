"""Which column of a trade history holds what: given by flags, or found by common names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import AuditSourceError
from .source import check_name

if TYPE_CHECKING:
    from .source import Column

# Candidate names per role, best first; compared case-insensitively.
TRADE_ROLES: dict[str, tuple[str, ...]] = {
    "time": (
        "timestamp", "time", "ts", "created_at", "executed_at", "filled_at", "datetime", "date_time", "trade_time",
        "exec_time", "transact_time", "time_stamp", "date",
    ),
    "symbol": ("symbol", "ticker", "instrument", "asset", "pair", "security", "contract"),
    "side": ("side", "action", "direction", "buy_sell", "order_side", "trade_side"),
    "qty": ("qty", "quantity", "shares", "filled_qty", "size", "amount", "volume", "units", "lots"),
    "price": (
        "price", "fill_price", "avg_price", "filled_avg_price", "avg_fill_price", "exec_price", "execution_price",
        "trade_price",
    ),
}
ID_NAMES = ("id", "trade_id", "fill_id", "execution_id", "exec_id")
SCOPE_NAMES = (
    "account", "account_id", "bot", "bot_id", "strategy", "strategy_id", "strategy_name", "expert", "expert_id",
    "magic", "portfolio",
)
POSITION_QTY_NAMES = ("qty", "quantity", "shares", "position", "size", "units", "amount")
CASH_NAMES = ("cash", "cash_balance", "balance", "available_cash", "free_cash")
FLAGS = {"time": "--time", "symbol": "--symbol", "side": "--side", "qty": "--qty", "price": "--price", "id": "--id"}


@dataclass(frozen=True)
class TradeColumns:
    """The trades table's columns by role. ``id`` is None when the source has none (row numbers stand in)."""

    time: str
    symbol: str
    side: str
    qty: str
    price: str
    id: str | None = None
    scope: tuple[str, ...] = ()
    detected: tuple[str, ...] = field(default=(), compare=False)  # roles found by name rather than given

    def as_dict(self) -> dict[str, object]:
        return {
            "time": self.time, "symbol": self.symbol, "side": self.side, "qty": self.qty, "price": self.price,
            "id": self.id, "scope": list(self.scope), "detected": list(self.detected),
        }


def _find(columns: list[Column], name: str) -> str | None:
    """The source's spelling of ``name``: exact match first, else the one case-insensitive match."""
    names = [c.name for c in columns]
    if name in names:
        return name
    folded = [n for n in names if n.lower() == name.lower()]
    return folded[0] if len(folded) == 1 else None


def _given(columns: list[Column], name: str, role: str, where: str) -> str:
    check_name(name, f"{role} column")
    found = _find(columns, name)
    if found is None:
        raise AuditSourceError(f"no column {name!r} in {where} (columns: {_listing(columns)})")
    return found


def _listing(columns: list[Column]) -> str:
    return ", ".join(c.name for c in columns) or "none"


def _detect(columns: list[Column], candidates: tuple[str, ...], taken: set[str]) -> str | None:
    for candidate in candidates:
        found = _find(columns, candidate)
        if found is not None and found not in taken:
            return found
    return None


def map_trade_columns(
    columns: list[Column], where: str, given: dict[str, str | None], scope: list[str] | None = None,
) -> TradeColumns:
    """Map every role to a column of ``where``; a role neither given nor found is an error naming its flag."""
    chosen: dict[str, str] = {}
    detected: list[str] = []
    for role in (*TRADE_ROLES, "id"):
        name = given.get(role)
        if name is not None:  # an empty name is refused, not taken as "find it"
            chosen[role] = _given(columns, name, role, where)
    taken = set(chosen.values())
    for role, candidates in TRADE_ROLES.items():
        if role in chosen:
            continue
        found = _detect(columns, candidates, taken)
        if found is None:
            raise AuditSourceError(
                f"cannot tell which column of {where} holds the {role} (columns: {_listing(columns)}); "
                f"pass {FLAGS[role]} COLUMN"
            )
        chosen[role] = found
        taken.add(found)
        detected.append(role)
    if "id" not in chosen:
        found = _detect(columns, ID_NAMES, taken)
        if found is not None:
            chosen["id"] = found
            detected.append("id")
    roles_of: dict[str, list[str]] = {}
    for role, name in chosen.items():
        roles_of.setdefault(name, []).append(role)
    for name, roles in roles_of.items():
        if len(roles) > 1:
            raise AuditSourceError(f"column {name!r} of {where} was given for both {' and '.join(roles)}")
    used = set(chosen.values())
    if scope is None:
        scope_cols = tuple(c.name for c in columns if c.name.lower() in SCOPE_NAMES and c.name not in used)
        if scope_cols:
            detected.append("scope")
    else:
        scope_cols = tuple(_given(columns, name, "scope", where) for name in scope)
        clash = [n for n in scope_cols if n in used]
        if clash:
            raise AuditSourceError(f"scope column {clash[0]!r} is also mapped to another role")
    return TradeColumns(
        time=chosen["time"], symbol=chosen["symbol"], side=chosen["side"], qty=chosen["qty"], price=chosen["price"],
        id=chosen.get("id"), scope=scope_cols, detected=tuple(detected),
    )


def pick_column(columns: list[Column], candidates: tuple[str, ...], role: str, where: str) -> str:
    """One column found by name in a positions or cash table, or an error naming what was looked for."""
    found = _detect(columns, candidates, set())
    if found is None:
        raise AuditSourceError(
            f"cannot tell which column of {where} holds the {role}: looked for {', '.join(candidates)} "
            f"(columns: {_listing(columns)})"
        )
    return found
