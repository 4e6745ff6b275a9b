"""The broker protocol every venue adapter implements.

Adapters must classify every failure of ``submit``:

* :class:`~orderguard.errors.OrderRejected` — the venue definitely refused; nothing placed.
* :class:`~orderguard.errors.OrderNotSent` — the adapter refused before anything left.
* :class:`~orderguard.errors.DuplicateClientOrderId` — the venue already has this client
  order id; the guard looks it up and never resends.
* :class:`~orderguard.errors.AmbiguousOutcome` — timeout, reset, 5xx: may or may not exist.

Any other exception from ``submit`` is treated as ambiguous (the intent becomes UNKNOWN):
an adapter that cannot classify an error must not let it read as "nothing was sent".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..errors import SendDeadlineExceeded
from ..states import State

if TYPE_CHECKING:
    from decimal import Decimal

    from ..store.base import IntentRecord


class VenueDedupe(StrEnum):
    """How a venue treats a second order with a client order id it has seen (DESIGN.md)."""

    PERMANENT = "permanent"  # Alpaca, Coinbase Advanced: refused or returned, forever
    OPEN_ORDERS_ONLY = "open-orders-only"  # Binance spot, Kraken cl_ord_id: only while open
    NONE = "none"  # IBKR orderRef, Kraken userref: no dedupe at all


class OrderStatus(StrEnum):
    """An order's status at the venue, normalised."""

    ACCEPTED = "ACCEPTED"
    PARTIALLY_FILLED = "PARTIALLY_FILLED"
    FILLED = "FILLED"
    CANCELED = "CANCELED"
    EXPIRED = "EXPIRED"
    REJECTED = "REJECTED"

    @property
    def state(self) -> State:
        """The intent state this venue status maps to."""
        return _STATE_OF[self]

    @property
    def is_open(self) -> bool:
        return self in (OrderStatus.ACCEPTED, OrderStatus.PARTIALLY_FILLED)


_STATE_OF = {
    OrderStatus.ACCEPTED: State.ACKED,
    OrderStatus.PARTIALLY_FILLED: State.PARTIALLY_FILLED,
    OrderStatus.FILLED: State.FILLED,
    OrderStatus.CANCELED: State.CANCELED,
    OrderStatus.EXPIRED: State.EXPIRED,
    OrderStatus.REJECTED: State.REJECTED,
}


@dataclass(frozen=True)
class OrderRequest:
    """What goes to the venue: the intent's payload plus the claim's client order id."""

    client_order_id: str
    account: str
    symbol: str
    side: str
    quantity: Decimal
    order_type: str
    limit_price: Decimal | None
    stop_price: Decimal | None
    time_in_force: str
    # time.monotonic() after which the claim is too old to send: an adapter checks it just
    # before the network write and raises SendDeadlineExceeded (nothing sent) when it passed.
    send_by: float | None = None

    @classmethod
    def from_record(cls, record: IntentRecord, send_by: float | None = None) -> OrderRequest:
        return cls(
            client_order_id=record.client_order_id, account=record.account, symbol=record.symbol,
            side=record.side, quantity=record.quantity, order_type=record.order_type,
            limit_price=record.limit_price, stop_price=record.stop_price,
            time_in_force=record.time_in_force, send_by=send_by,
        )

    def check_deadline(self) -> None:
        """Raise SendDeadlineExceeded when the claim is too old to be sent safely."""
        if self.send_by is not None and time.monotonic() > self.send_by:
            raise SendDeadlineExceeded(
                f"{self.client_order_id} was claimed too long ago to be sent safely (the process "
                "was paused or slow); nothing was sent, the reconciler may already have freed it"
            )


@dataclass(frozen=True)
class BrokerOrder:
    """An order as the venue reports it."""

    client_order_id: str
    broker_order_id: str
    status: OrderStatus
    account: str
    symbol: str
    side: str
    quantity: Decimal
    filled_quantity: Decimal
    average_price: Decimal | None


@dataclass(frozen=True)
class Position:
    account: str
    symbol: str
    quantity: Decimal  # signed: long > 0, short < 0


@dataclass(frozen=True)
class AccountInfo:
    account: str
    cash: Decimal


@runtime_checkable
class Broker(Protocol):
    """A venue orderguard can send through and reconcile against."""

    name: str
    dedupe: VenueDedupe
    lookup_grace: float  # seconds an accepted order may stay invisible to lookup()

    def submit(self, order: OrderRequest) -> BrokerOrder:
        """Place ``order`` under its client order id. SDK retries of this call must be off."""
        ...

    def lookup(self, client_order_id: str, *, symbol: str | None = None) -> BrokerOrder | None:
        """The order with this client order id, or None when the venue does not show one.

        ``symbol`` is the intent's symbol: venues that index orders by market (Binance) need
        it. A lookup that cannot be made raises; only a venue's definite "no such order" is None.
        """
        ...

    def cancel(self, client_order_id: str, *, symbol: str | None = None) -> BrokerOrder:
        """Cancel an open order; returns its state after the request."""
        ...

    def positions(self, account: str | None = None) -> list[Position]:
        """Current positions (of one account, or all)."""
        ...

    def account(self, account: str) -> AccountInfo:
        """Cash of one account."""
        ...
