"""AlpacaBroker: Alpaca's Trading API through alpaca-py's ``TradingClient`` (``orderguard[alpaca]``).

Alpaca keeps every client order id of an account forever: a second order under one is refused
with 422 "client_order_id must be unique", so that answer means "it exists: look it up"
(venue class PERMANENT). Two alpaca-py defaults are changed, both for the same reason: the
SDK retries a POST that got 429 or 504 (three times, three seconds apart), and a 504 is exactly
the answer after which the order may already exist; and it sets no timeout, so a hung
connection would hold a worker forever. Here every call has a timeout and is made once.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import weakref
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from ..errors import (
    AmbiguousOutcome,
    BrokerError,
    ConfigurationError,
    DuplicateClientOrderId,
    OrderNotSent,
    OrderRejected,
    VenueUnreachable,
)
from ..intent import canonical_decimal
from ._venue import (
    RecentIds,
    base_url,
    check_credential,
    clip,
    grace_seconds,
    key_from_env,
    optional_decimal,
    positive_seconds,
    venue_decimal,
)
from .base import AccountInfo, BrokerOrder, OrderRequest, OrderStatus, Position, VenueDedupe

if TYPE_CHECKING:
    from alpaca.trading.client import TradingClient

log = logging.getLogger("orderguard.brokers.alpaca")

KEY_VARIABLE = "APCA_API_KEY_ID"
SECRET_VARIABLE = "APCA_API_SECRET_KEY"
_INSTALL = "AlpacaBroker needs alpaca-py: pip install 'orderguard[alpaca]'"

# Alpaca's statuses of an order that can still fill (https://docs.alpaca.markets/docs/orders-at-alpaca).
_STILL_OPEN = frozenset({
    "new", "accepted", "pending_new", "accepted_for_bidding", "held", "pending_cancel", "pending_replace",
    "stopped", "suspended", "done_for_day", "calculated", "pending_review",
    # Replaced (by someone, outside orderguard) with a new order that can still fill: the scope
    # stays held until an operator resolves the intent.
    "replaced",
})
_FINAL = {
    "filled": OrderStatus.FILLED,
    "canceled": OrderStatus.CANCELED,
    "expired": OrderStatus.EXPIRED,
    "rejected": OrderStatus.REJECTED,
}


def order_status(alpaca_status: str, quantity: Decimal, filled: Decimal) -> OrderStatus:
    """Alpaca's order status (and fill) as orderguard's venue status."""
    status = alpaca_status.lower()
    if status in _FINAL:
        return _FINAL[status]
    if status == "calculated" and filled >= quantity > 0:
        return OrderStatus.FILLED
    if status == "replaced":
        log.warning(
            "an Alpaca order was replaced outside orderguard; its intent stays open (scope held). Check the "
            "replacement order at Alpaca, then settle the intent with guard.resolve(...)"
        )
    if status not in _STILL_OPEN and status != "partially_filled":
        # A status this adapter does not know yet: keep the order open (its scope held) and say so.
        log.warning("Alpaca reported an unknown order status %r; treating the order as open", alpaca_status)
    return OrderStatus.PARTIALLY_FILLED if filled > 0 or status == "partially_filled" else OrderStatus.ACCEPTED


class AlpacaBroker:
    """Alpaca (paper or live) for one account, over alpaca-py's ``TradingClient``.

    ``account`` is the name orderguard's intents use for this Alpaca account (an API key pair
    is one account); an order for another account is refused before anything is sent.
    ``url`` overrides the API base (a proxy, or a local test venue). Keys are never logged.
    """

    dedupe = VenueDedupe.PERMANENT

    def __init__(
        self,
        api_key: str,
        secret_key: str,
        *,
        paper: bool = True,
        account: str = "main",
        url: str | None = None,
        timeout: float = 10.0,
        lookup_grace: float = 2.0,
    ) -> None:
        self.name = "alpaca-paper" if paper else "alpaca-live"
        key = check_credential(api_key, "api_key", self.name)
        secret = check_credential(secret_key, "secret_key", self.name)
        self.account_name = check_credential(account, "account", self.name)
        self.url = base_url(url, self.name) if url else None
        self.timeout = positive_seconds(timeout, "timeout")
        self.lookup_grace = grace_seconds(lookup_grace)
        try:
            from alpaca.trading.client import TradingClient
        except ImportError as exc:
            raise ConfigurationError(_INSTALL) from exc
        # raw_data: Alpaca's JSON as dicts. alpaca-py's models refuse a status they do not know
        # (Alpaca adds some), which would leave such an order unreadable forever.
        self.client: TradingClient = TradingClient(key, secret, paper=paper, url_override=self.url, raw_data=True)
        _make_single_shot(self.client, self.timeout)
        self._unanswered = RecentIds()  # ids whose send got no definite answer (the resend rule)
        # A forked child must not write on the parent's pooled connections: it gets its own.
        os.register_at_fork(after_in_child=functools.partial(_new_session_after_fork, weakref.ref(self)))

    @classmethod
    def from_env(
        cls, *, paper: bool = True, account: str = "main", url: str | None = None,
        timeout: float = 10.0, lookup_grace: float = 2.0,
    ) -> AlpacaBroker:
        """Keys from ``APCA_API_KEY_ID`` and ``APCA_API_SECRET_KEY`` (alpaca's own names)."""
        venue = "alpaca-paper" if paper else "alpaca-live"
        return cls(
            key_from_env(KEY_VARIABLE, venue), key_from_env(SECRET_VARIABLE, venue), paper=paper,
            account=account, url=url, timeout=timeout, lookup_grace=lookup_grace,
        )

    def __repr__(self) -> str:
        return f"AlpacaBroker(name={self.name!r}, account={self.account_name!r}, url={self.url!r})"

    # ------------------------------------------------------------------------- orders

    def submit(self, order: OrderRequest) -> BrokerOrder:
        """Place ``order`` once under its client order id (see the module doc for the errors)."""
        from alpaca.common.exceptions import APIError

        if order.account != self.account_name:
            raise OrderNotSent(
                f"{self.name} trades account {self.account_name!r}; order {order.client_order_id} is for account "
                f"{order.account!r}. Nothing was sent: open a broker per account"
            )
        request = _order_request(order, self.name)
        coid = order.client_order_id
        resend = self._unanswered.get(coid) is not None
        if resend:  # an earlier send of this id got no definite answer: the order may exist
            try:
                found = self.lookup(coid)
            except BrokerError as exc:
                raise AmbiguousOutcome(f"{self.name}: {coid} was sent before without an answer and the lookup before "
                                       f"a resend failed ({exc}); not resent: reconcile") from exc
            if found is not None:
                self._unanswered.discard(coid)
                return found
        order.check_deadline()
        try:
            try:
                placed = self.client.submit_order(request)
            except APIError as exc:
                raise self._refusal(exc, order) from exc
            except Exception as exc:
                raise _transport_failure(exc, f"{self.name}: sending {coid}") from exc
            try:
                answer = self._broker_order(placed)
            except Exception as exc:  # the venue answered 2xx with something that is not an order
                raise AmbiguousOutcome(
                    f"{self.name} answered the order {coid} with a body orderguard cannot read ({exc}); it may exist: reconcile"
                ) from exc
        except AmbiguousOutcome:
            self._unanswered.add(coid, time.time())
            raise
        except (OrderRejected, OrderNotSent) as exc:
            if resend:  # a refusal of the resend says nothing of the first send
                raise AmbiguousOutcome(
                    f"{self.name}: {exc}; but an earlier send of {coid} got no answer, so the order may exist: reconcile"
                ) from exc
            raise
        self._unanswered.discard(coid)
        return answer

    def _refusal(self, exc: Any, order: OrderRequest) -> BrokerError:
        status: int | None = exc.status_code
        message = _api_message(exc)
        what = f"{order.client_order_id} ({order.side} {canonical_decimal(order.quantity)} {order.symbol})"
        if status == 422 and "client_order_id must be unique" in message.lower():
            return DuplicateClientOrderId(f"{self.name} already has an order with client order id {what}: {message}")
        if status is None or status >= 500 or status == 408:
            return AmbiguousOutcome(
                f"{self.name} answered HTTP {status} to order {what}: {message}. The order may exist: reconcile"
            )
        if 400 <= status < 500:
            return OrderRejected(f"{self.name} refused order {what}: HTTP {status} {message}")
        return AmbiguousOutcome(f"{self.name} answered HTTP {status} to order {what}: {message}")

    def lookup(self, client_order_id: str, *, symbol: str | None = None) -> BrokerOrder | None:
        """The order under ``client_order_id``; None only on Alpaca's "order not found"."""
        from alpaca.common.exceptions import APIError

        try:
            found = self.client.get_order_by_client_id(client_order_id)
        except APIError as exc:
            # Only Alpaca's own answer: an unknown route (a base URL ending in /v2, a proxy
            # prefix) is a 404 "endpoint not found", and must not read as "never placed".
            if exc.status_code == 404 and _api_message(exc).strip().lower() == "order not found":
                return None
            raise BrokerError(
                f"{self.name}: looking up {client_order_id} failed: HTTP {exc.status_code} {_api_message(exc)}"
            ) from exc
        except Exception as exc:
            raise BrokerError(f"{self.name}: looking up {client_order_id} failed: {type(exc).__name__}: {exc}") from exc
        try:
            order = self._broker_order(found)
        except Exception as exc:
            raise BrokerError(f"{self.name}: the order {client_order_id} came back unreadable: {clip(str(exc))}") from exc
        if order.client_order_id != client_order_id:
            raise BrokerError(f"{self.name}: asked for {client_order_id}, the venue answered with {order.client_order_id}")
        return order

    def cancel(self, client_order_id: str, *, symbol: str | None = None) -> BrokerOrder:
        """Ask Alpaca to cancel an open order; returns the order as Alpaca shows it afterwards."""
        from alpaca.common.exceptions import APIError

        order = self.lookup(client_order_id)
        if order is None:
            raise OrderRejected(f"{self.name}: no order {client_order_id} to cancel")
        if not order.status.is_open:
            return order
        try:
            self.client.cancel_order_by_id(order.broker_order_id)
        except APIError as exc:
            if exc.status_code != 422:  # 422: no longer cancelable (it filled meanwhile)
                raise BrokerError(f"{self.name}: cancel of {client_order_id} failed: HTTP {exc.status_code} {_api_message(exc)}") from exc
        return self.lookup(client_order_id) or order

    # ---------------------------------------------------------------- positions & cash

    def positions(self, account: str | None = None) -> list[Position]:
        """Open positions (shorts negative), under this broker's account name."""
        if account is not None and account != self.account_name:
            return []
        held = []
        for p in self.client.get_all_positions():
            quantity = venue_decimal(_field(p, "qty"), "position qty")
            if str(_field(p, "side")).lower() == "short" and quantity > 0:
                quantity = -quantity
            if quantity != 0:
                held.append(Position(self.account_name, _required(p, "symbol"), quantity))
        return held

    def account(self, account: str) -> AccountInfo:
        if account != self.account_name:
            raise ConfigurationError(f"{self.name} trades account {self.account_name!r}, not {account!r}")
        return AccountInfo(self.account_name, venue_decimal(_field(self.client.get_account(), "cash"), "account cash"))

    def close(self) -> None:
        self.client._session.close()

    # ----------------------------------------------------------------------- plumbing

    def _broker_order(self, placed: Any) -> BrokerOrder:
        filled = optional_decimal(_field(placed, "filled_qty"), "filled_qty") or Decimal(0)
        quantity = optional_decimal(_field(placed, "qty"), "qty")
        quantity = filled if quantity is None else quantity
        side = _required(placed, "side").lower()
        if side not in ("buy", "sell"):
            raise ValueError(f"order side {side!r} is neither buy nor sell")
        return BrokerOrder(
            client_order_id=_required(placed, "client_order_id"),
            broker_order_id=_required(placed, "id"),
            status=order_status(_required(placed, "status"), quantity, filled),
            account=self.account_name,
            symbol=_required(placed, "symbol"),
            side=side.upper(),
            quantity=quantity,
            filled_quantity=filled,
            average_price=optional_decimal(_field(placed, "filled_avg_price"), "filled_avg_price") if filled else None,
        )


def _field(model: Any, name: str) -> Any:
    """A field of an alpaca-py model or raw dict; enums as their value."""
    value = model.get(name) if isinstance(model, dict) else getattr(model, name, None)
    return getattr(value, "value", value)


def _required(model: Any, name: str) -> str:
    value = _field(model, name)
    if value is None or value == "":
        raise ValueError(f"the order has no {name}")
    return str(value)


def _make_single_shot(client: Any, timeout: float, *, close_old: bool = True) -> None:
    """Turn alpaca-py's POST retries off and give every call a timeout. alpaca-py has no public
    switch for either (``retry_attempts=0`` is read as "use the default 3"), so its attributes are
    set; a release that renames them must fail here rather than quietly retry orders."""
    import requests

    missing = [name for name in ("_retry", "_retry_codes", "_session") if not hasattr(client, name)]
    if missing:
        raise ConfigurationError(
            f"this alpaca-py release has no {', '.join(missing)}: orderguard cannot turn its order retries off. "
            "Install the alpaca-py version orderguard supports (pip install 'orderguard[alpaca]')"
        )

    class _TimeoutSession(requests.Session):
        def request(self, method: Any, url: Any, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", timeout)
            return super().request(method, url, *args, **kwargs)

    client._retry = 0
    client._retry_codes = []
    if close_old:  # (not in a forked child: those sockets are the parent's)
        client._session.close()
    client._session = _TimeoutSession()


def _new_session_after_fork(ref: weakref.ref[AlpacaBroker]) -> None:
    broker = ref()
    if broker is not None:
        _make_single_shot(broker.client, broker.timeout, close_old=False)
        broker._unanswered.after_fork()


def _order_request(order: OrderRequest, venue: str) -> Any:
    """alpaca-py's request object for ``order``; OrderNotSent when Alpaca cannot carry it exactly."""
    from alpaca.trading.enums import OrderSide, TimeInForce
    from alpaca.trading.requests import LimitOrderRequest, MarketOrderRequest, StopLimitOrderRequest, StopOrderRequest

    try:
        time_in_force = TimeInForce(order.time_in_force.lower())
    except ValueError:
        raise OrderNotSent(
            f"{venue} has no time in force {order.time_in_force!r} (order {order.client_order_id}); nothing was sent"
        ) from None
    fields: dict[str, Any] = {
        "symbol": order.symbol,
        "qty": _exact_float(order.quantity, "quantity", order, venue),
        "side": OrderSide.BUY if order.side == "BUY" else OrderSide.SELL,
        "time_in_force": time_in_force,
        "client_order_id": order.client_order_id,
    }
    kind = {"MARKET": MarketOrderRequest, "LIMIT": LimitOrderRequest, "STOP": StopOrderRequest, "STOP_LIMIT": StopLimitOrderRequest}
    if order.limit_price is not None:
        fields["limit_price"] = _exact_float(order.limit_price, "limit price", order, venue)
    if order.stop_price is not None:
        fields["stop_price"] = _exact_float(order.stop_price, "stop price", order, venue)
    try:
        return kind[order.order_type](**fields)
    except Exception as exc:  # alpaca-py's own validation: nothing was sent
        raise OrderNotSent(f"{venue}: alpaca-py refused order {order.client_order_id} before sending: {clip(str(exc))}") from exc


def _exact_float(value: Decimal, what: str, order: OrderRequest, venue: str) -> float:
    """alpaca-py types quantities and prices as float; send one only if it is the same number."""
    number = float(value)
    if Decimal(repr(number)) != value:
        raise OrderNotSent(
            f"{venue}: the {what} {canonical_decimal(value)} of {order.client_order_id} cannot pass through "
            "alpaca-py (a float) unchanged; nothing was sent. Round it to Alpaca's increments"
        )
    return number


def _api_message(exc: Any) -> str:
    """Alpaca's error message (its JSON ``message``, else the body text)."""
    try:
        return clip(str(exc.message))
    except Exception:
        return clip(str(exc))


def _transport_failure(exc: Exception, what: str) -> BrokerError:
    """A failure below HTTP. Only a connection that was never made proves nothing was sent."""
    import requests

    if isinstance(exc, requests.exceptions.ConnectTimeout) or _refused(exc):
        return VenueUnreachable(f"{what}: could not connect ({type(exc).__name__}); nothing was sent. Check the network and Alpaca's status")
    if isinstance(exc, requests.exceptions.Timeout):
        return AmbiguousOutcome(f"{what}: no answer in time ({type(exc).__name__}); the order may exist: reconcile")
    return AmbiguousOutcome(f"{what}: {type(exc).__name__}: {clip(str(exc))}; the order may exist: reconcile")


def _refused(exc: BaseException) -> bool:
    """Whether a requests ConnectionError was a connection refused/unresolvable (no request sent)."""
    import requests
    from urllib3.exceptions import NameResolutionError, NewConnectionError

    if not isinstance(exc, requests.exceptions.ConnectionError):
        return False
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return False
        if isinstance(seen, (NewConnectionError, NameResolutionError)):
            return True
        reason = getattr(seen, "reason", None)
        seen = reason if isinstance(reason, BaseException) else (seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else seen.__cause__)
    return False
