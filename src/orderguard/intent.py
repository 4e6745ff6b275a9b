"""OrderIntent: what a strategy wants to send, validated before anything is claimed."""

from __future__ import annotations

import hashlib
from decimal import Decimal, InvalidOperation
from enum import Enum, StrEnum
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InvalidIntent

MAX_NAME = 64
MAX_SYMBOL = 32
MAX_TAGS = 16
MAX_TAG_VALUE = 256
# Bounds that keep a fat-fingered or corrupted number from reaching a venue.
MAX_QUANTITY = Decimal("1e12")
MAX_PRICE = Decimal("1e12")
MAX_DECIMAL_PLACES = 12


class Side(StrEnum):
    BUY = "BUY"
    SELL = "SELL"


class OrderType(StrEnum):
    MARKET = "MARKET"
    LIMIT = "LIMIT"
    STOP = "STOP"
    STOP_LIMIT = "STOP_LIMIT"


class TimeInForce(StrEnum):
    DAY = "DAY"
    GTC = "GTC"
    IOC = "IOC"
    FOK = "FOK"
    OPG = "OPG"
    CLS = "CLS"


def _enum_upper(value: Any) -> Any:
    return value.strip().upper().replace("-", "_") if isinstance(value, str) else value


def _strict_decimal(value: Any, what: str) -> Any:
    if value is None or isinstance(value, Decimal):
        return value
    if isinstance(value, (bool, float)):
        # Binary floats cannot hold 0.1; money must arrive exact.
        raise ValueError(f"{what} must be a Decimal, int or str, not {type(value).__name__}")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, str):
        try:
            return Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"{what} {value!r} is not a number") from None
    raise ValueError(f"{what} must be a Decimal, int or str, not {type(value).__name__}")


def _check_amount(value: Decimal | None, what: str, upper: Decimal) -> Decimal | None:
    if value is None:
        return None
    if not value.is_finite():
        raise ValueError(f"{what} must be finite, got {value}")
    if value <= 0:
        raise ValueError(f"{what} must be positive, got {value}")
    if value > upper:
        raise ValueError(f"{what} {value} exceeds the limit {upper}")
    exponent = value.normalize().as_tuple().exponent
    if isinstance(exponent, int) and -exponent > MAX_DECIMAL_PLACES:
        raise ValueError(f"{what} has more than {MAX_DECIMAL_PLACES} decimal places")
    return value


def _check_text(value: str, what: str, limit: int) -> str:
    if not value:
        raise ValueError(f"{what} must not be empty")
    if value != value.strip():
        raise ValueError(f"{what} must not start or end with white space")
    if len(value) > limit:
        raise ValueError(f"{what} is {len(value)} characters; the limit is {limit}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError(f"{what} contains control characters")
    _check_unicode(value, what)
    return value


def is_text(value: str) -> bool:
    """False for a string holding a lone surrogate (JSON ``"\\ud800"``): not text, so it cannot be
    stored, keyed or sent."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_unicode(value: str, what: str) -> None:
    if not is_text(value):
        raise ValueError(f"{what} contains characters that are not valid Unicode (a lone surrogate)")


def canonical_decimal(value: Decimal | None) -> str:
    """One spelling per number (``4``, ``4.0`` and ``4.00`` are the same quantity)."""
    return "" if value is None else format(value.normalize(), "f")


class OrderIntent(BaseModel):
    """One order a strategy intends to place. Immutable and validated.

    Quantities and prices are :class:`~decimal.Decimal` (ints and strings are accepted,
    floats are refused as inexact). Any invalid field raises :class:`InvalidIntent` naming it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)

    account: str
    strategy: str
    symbol: str
    side: Side
    quantity: Decimal
    order_type: OrderType = OrderType.MARKET
    limit_price: Decimal | None = None
    stop_price: Decimal | None = None
    # Not sent: the price a market order is expected to trade near, for NotionalLimit.
    reference_price: Decimal | None = None
    time_in_force: TimeInForce = TimeInForce.DAY
    source: str = "bot"
    tags: dict[str, str] = Field(default_factory=dict)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            message = str(first["msg"]).removeprefix("Value error, ")
            if not field:  # a cross-field rule names its field as "field: message"
                field, _, message = message.partition(": ")
            raise InvalidIntent(field, message) from None

    @field_validator("account", "strategy", mode="after")
    @classmethod
    def _name(cls, value: str, info: Any) -> str:
        return _check_text(value, info.field_name, MAX_NAME)

    @field_validator("symbol", mode="after")
    @classmethod
    def _symbol(cls, value: str) -> str:
        return _check_text(value, "symbol", MAX_SYMBOL)

    @field_validator("source", mode="after")
    @classmethod
    def _source(cls, value: str) -> str:
        value = _check_text(value, "source", 32)
        if not all(ch.isalnum() or ch in "-_." for ch in value):
            raise ValueError("source may hold only letters, digits, '-', '_' and '.'")
        return value

    @field_validator("side", "order_type", "time_in_force", mode="before")
    @classmethod
    def _enums(cls, value: Any) -> Any:
        return _enum_upper(value)

    @field_validator("quantity", "limit_price", "stop_price", "reference_price", mode="before")
    @classmethod
    def _decimals_in(cls, value: Any, info: Any) -> Any:
        return _strict_decimal(value, info.field_name)

    @field_validator("quantity", mode="after")
    @classmethod
    def _quantity(cls, value: Decimal) -> Decimal:
        checked = _check_amount(value, "quantity", MAX_QUANTITY)
        assert checked is not None
        return checked

    @field_validator("limit_price", "stop_price", "reference_price", mode="after")
    @classmethod
    def _prices(cls, value: Decimal | None, info: Any) -> Decimal | None:
        return _check_amount(value, info.field_name, MAX_PRICE)

    @field_validator("tags", mode="after")
    @classmethod
    def _tags(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_TAGS:
            raise ValueError(f"at most {MAX_TAGS} tags")
        for key, text in value.items():
            _check_text(key, "tag name", 32)
            if len(text) > MAX_TAG_VALUE:
                raise ValueError(f"tag {key!r} is longer than {MAX_TAG_VALUE} characters")
            _check_unicode(text, f"tag {key!r}")
        return value

    @model_validator(mode="after")
    def _prices_match_type(self) -> OrderIntent:
        needs_limit = self.order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT)
        needs_stop = self.order_type in (OrderType.STOP, OrderType.STOP_LIMIT)
        if needs_limit != (self.limit_price is not None):
            verb = "needs" if needs_limit else "must not have"
            raise ValueError(f"limit_price: a {self.order_type.value} order {verb} a limit price")
        if needs_stop != (self.stop_price is not None):
            verb = "needs" if needs_stop else "must not have"
            raise ValueError(f"stop_price: a {self.order_type.value} order {verb} a stop price")
        return self

    def field_value(self, name: str) -> str:
        """The canonical text of one field, as used in scope keys (``tags.x`` reads a tag)."""
        if name.startswith("tags."):
            return self.tags.get(name[5:], "")
        value = getattr(self, name)
        if isinstance(value, Decimal) or value is None:
            return canonical_decimal(value)
        if isinstance(value, Enum):
            return str(value.value)
        return str(value)

    def payload_digest(self) -> str:
        """Fingerprint of what would be sent: same digest means the same order."""
        return self._digest

    @cached_property
    def _digest(self) -> str:
        parts = (
            self.account, self.symbol, self.side.value, canonical_decimal(self.quantity),
            self.order_type.value, canonical_decimal(self.limit_price),
            canonical_decimal(self.stop_price), self.time_in_force.value,
        )
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]

    def price_for_notional(self) -> Decimal | None:
        """The price a notional limit counts: the limit price, else the stop, else ``reference_price``."""
        for price in (self.limit_price, self.stop_price, self.reference_price):
            if price is not None:
                return price
        return None

    def describe(self) -> str:
        """Short human form: ``spx-calendar SPX BUY 4 MARKET (account main)``."""
        price = ""
        if self.limit_price is not None:
            price += f" limit {canonical_decimal(self.limit_price)}"
        if self.stop_price is not None:
            price += f" stop {canonical_decimal(self.stop_price)}"
        return (
            f"{self.strategy} {self.symbol} {self.side.value} {canonical_decimal(self.quantity)} "
            f"{self.order_type.value}{price} (account {self.account})"
        )


INTENT_FIELDS = frozenset(OrderIntent.model_fields) - {"tags", "reference_price"}
