"""Helpers shared by the test modules."""

from __future__ import annotations

from orderguard import OrderIntent, Side


def make_intent(**overrides: object) -> OrderIntent:
    fields: dict[str, object] = {
        "account": "main", "strategy": "spx-calendar", "symbol": "SPX", "side": Side.BUY, "quantity": 4,
    }
    fields.update(overrides)
    return OrderIntent(**fields)  # type: ignore[arg-type]
