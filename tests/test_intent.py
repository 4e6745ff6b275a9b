"""OrderIntent validation: every bad value is a typed InvalidIntent naming its field."""

from __future__ import annotations

from decimal import Decimal

import pytest

from orderguard import InvalidIntent, OrderIntent, OrderType, Side
from tests.helpers import make_intent


def test_valid_intent_normalises_enums_and_decimals() -> None:
    intent = make_intent(side="buy", quantity="4.50", order_type="stop-limit", limit_price="10", stop_price=9)
    assert intent.side is Side.BUY
    assert intent.order_type is OrderType.STOP_LIMIT
    assert intent.quantity == Decimal("4.5")
    assert isinstance(intent.stop_price, Decimal)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"quantity": 0}, "quantity"),
        ({"quantity": -1}, "quantity"),
        ({"quantity": "NaN"}, "quantity"),
        ({"quantity": "Infinity"}, "quantity"),
        ({"quantity": "-Infinity"}, "quantity"),
        ({"quantity": "abc"}, "quantity"),
        ({"quantity": 1.5}, "quantity"),  # floats are inexact: refused
        ({"quantity": True}, "quantity"),
        ({"quantity": "1e13"}, "quantity"),
        ({"quantity": "0.0000000000001"}, "quantity"),
        ({"side": "hold"}, "side"),
        ({"side": ""}, "side"),
        ({"symbol": ""}, "symbol"),
        ({"symbol": " SPX"}, "symbol"),
        ({"symbol": "X" * 33}, "symbol"),
        ({"symbol": "SP\nX"}, "symbol"),
        ({"account": ""}, "account"),
        ({"strategy": "s" * 65}, "strategy"),
        ({"source": "man ual"}, "source"),
        ({"order_type": "iceberg"}, "order_type"),
        ({"time_in_force": "forever"}, "time_in_force"),
        ({"order_type": "LIMIT"}, "limit_price"),
        ({"order_type": "MARKET", "limit_price": 10}, "limit_price"),
        ({"order_type": "STOP"}, "stop_price"),
        ({"order_type": "LIMIT", "limit_price": "NaN"}, "limit_price"),
        ({"order_type": "LIMIT", "limit_price": -5}, "limit_price"),
        ({"order_type": "LIMIT", "limit_price": 0}, "limit_price"),
        ({"tags": {f"k{i}": "v" for i in range(17)}}, "tags"),
        ({"tags": {"k": "v" * 257}}, "tags"),
        ({"unexpected": 1}, "unexpected"),
    ],
)
def test_bad_values_raise_invalid_intent_naming_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidIntent) as info:
        make_intent(**overrides)
    assert info.value.field == field, str(info.value)
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_field_is_named() -> None:
    with pytest.raises(InvalidIntent) as info:
        OrderIntent(account="a", strategy="s", side="BUY", quantity=1)  # type: ignore[call-arg]
    assert info.value.field == "symbol"


def test_intent_is_immutable() -> None:
    intent = make_intent()
    with pytest.raises(Exception):
        intent.quantity = Decimal(5)  # type: ignore[misc]


def test_payload_digest_ignores_spelling_but_not_substance() -> None:
    base = make_intent(quantity="4")
    assert base.payload_digest() == make_intent(quantity="4.000").payload_digest()
    assert base.payload_digest() == make_intent(quantity=4, source="manual").payload_digest()
    assert base.payload_digest() != make_intent(quantity=5).payload_digest()
    assert base.payload_digest() != make_intent(side="SELL").payload_digest()
    assert base.payload_digest() != make_intent(order_type="LIMIT", limit_price=1).payload_digest()


def test_field_values_are_canonical() -> None:
    intent = make_intent(quantity="400.0", tags={"leg": "front"})
    assert intent.field_value("quantity") == "400"
    assert intent.field_value("side") == "BUY"
    assert intent.field_value("tags.leg") == "front"
    assert intent.field_value("tags.missing") == ""
