"""CcxtBroker: Binance spot through ccxt (``orderguard[ccxt]``).

Binance refuses a ``newClientOrderId`` only while an order under it is still open (-2010
"Duplicate order sent."); once that order filled or was canceled the id is free again
(venue class OPEN_ORDERS_ONLY). So an order is never sent twice on trust: a client order id
this broker already sent is looked up with ``fetch_order`` first, and sent again only when a
second lookup, made once the first request can no longer arrive (its timestamp + ``recvWindow``
+ 1 s) and at least ``lookup_grace`` later, finds nothing too; concurrent submits of one id wait
for each other. orderguard itself never resends a claim; the rule protects code that calls
``submit`` again with the same id (in this process: another process does not know what this
one sent).

ccxt invents a new client order id on every call unless given one, and can retry failed
requests (``maxRetriesOnFailure``): the claim's id is always passed and retries are off.
Binance's HTTP 5xx means "execution status unknown" whatever the body says, so 5xx is read
before ccxt maps the body's error code.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
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
)
from ..intent import canonical_decimal
from ._venue import (
    Hidden,
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
    from collections.abc import Iterable, Iterator

log = logging.getLogger("orderguard.brokers.ccxt")

SUPPORTED = ("binance",)
_INSTALL = "CcxtBroker needs ccxt: pip install 'orderguard[ccxt]'"
RECV_WINDOW_MS = 5_000  # Binance refuses a request older than this on arrival (its default; ccxt's is 10 s)
_CLOCK_AHEAD_ALLOWED = 1.0  # Binance accepts timestamps up to 1 s ahead of its clock
# "Not found" is believed only after this long: until then a sent request may still arrive.
SAFE_GRACE = RECV_WINDOW_MS / 1000 + _CLOCK_AHEAD_ALLOWED

# Binance's raw order statuses (the unified ones fold PARTIALLY_FILLED into "open").
_STATUS = {
    "NEW": OrderStatus.ACCEPTED,
    "PENDING_NEW": OrderStatus.ACCEPTED,
    "PENDING_CANCEL": OrderStatus.ACCEPTED,
    "PARTIALLY_FILLED": OrderStatus.PARTIALLY_FILLED,
    "FILLED": OrderStatus.FILLED,
    "CANCELED": OrderStatus.CANCELED,
    "REJECTED": OrderStatus.REJECTED,
    "EXPIRED": OrderStatus.EXPIRED,
    "EXPIRED_IN_MATCH": OrderStatus.EXPIRED,
}
_LIMIT_TIF = {"GTC", "IOC", "FOK"}


def order_status(binance_status: str, executed: Decimal) -> OrderStatus:
    """Binance's raw order status as orderguard's venue status; an unknown one stays open."""
    status = _STATUS.get(binance_status.upper())
    if status is None:
        log.warning("Binance reported an unknown order status %r; treating the order as open", binance_status)
        status = OrderStatus.ACCEPTED
    if status is OrderStatus.ACCEPTED and executed > 0:
        return OrderStatus.PARTIALLY_FILLED
    return status


class _HeaderRedactingLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """ccxt logs each request's headers at DEBUG, the API key among them: masked here."""

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        super().debug(msg, *(_masked(a) for a in args), **kwargs)


def _masked(value: object) -> object:
    if isinstance(value, dict):
        return {k: "***" if str(k).lower() in ("x-mbx-apikey", "authorization") else v for k, v in value.items()}
    return value


def _forget_exchanges_after_fork(ref: weakref.ref[CcxtBroker]) -> None:
    broker = ref()
    if broker is not None:
        broker._local = threading.local()
        broker._opened = []
        broker._markets_lock = threading.Lock()
        broker._sent_lock = threading.Lock()
        broker._sent.after_fork()
        broker._locks = {}


def _check_supported(exchange: str) -> None:
    if exchange not in SUPPORTED:
        raise ConfigurationError(
            f"CcxtBroker supports {', '.join(SUPPORTED)} so far, not {exchange!r}: each venue's duplicate rule and "
            "error codes must be mapped before orderguard can promise at-most-once on it"
        )


def _split(symbol: str) -> tuple[str, str]:
    base, sep, quote = symbol.partition("/")
    if not sep or not base or not quote or "/" in quote:
        raise ConfigurationError(f"symbol {symbol!r} is not a ccxt spot symbol like BTC/USDT")
    return base, quote.split(":")[0]


class CcxtBroker:
    """Binance spot (or its testnet with ``sandbox=True``) for one account, through ccxt.

    Intents use ccxt's unified symbols (``BTC/USDT``). ``symbols`` names the markets whose base
    asset balances :meth:`positions` reports (spot has balances per asset, not positions); each
    base asset may appear once. ``url`` overrides the API base (a local test venue).
    """

    dedupe = VenueDedupe.OPEN_ORDERS_ONLY

    def __init__(
        self,
        exchange: str = "binance",
        api_key: str = "",
        secret: str = "",
        *,
        sandbox: bool = False,
        account: str = "main",
        url: str | None = None,
        timeout: float = 10.0,
        lookup_grace: float = 7.0,
        symbols: Iterable[str] = (),
        lookup_before_send: bool = False,
    ) -> None:
        _check_supported(exchange)
        self.name = f"{exchange}-testnet" if sandbox else exchange
        self.exchange_id = exchange
        self.sandbox = bool(sandbox)
        self._key = Hidden(check_credential(api_key, "api_key", self.name))
        self._secret = Hidden(check_credential(secret, "secret", self.name))
        self.account_name = check_credential(account, "account", self.name)
        self.url = base_url(url, self.name) if url else None
        self.timeout = positive_seconds(timeout, "timeout")
        self.lookup_grace = grace_seconds(lookup_grace)
        if self.lookup_grace < SAFE_GRACE:
            log.warning(
                "%s: lookup_grace=%gs is below %gs (Binance's recvWindow + 1 s): a request still on its way could be "
                "declared NOT_FOUND by the reconciler and its order placed again", self.name, self.lookup_grace, SAFE_GRACE,
            )
        self.lookup_before_send = bool(lookup_before_send)
        self.symbols = tuple(dict.fromkeys(symbols))
        bases = [_split(s)[0] for s in self.symbols]
        if len(set(bases)) != len(bases):
            raise ConfigurationError(f"{self.name}: symbols {list(self.symbols)} share a base asset; spot balances cannot be told apart")
        quotes = {_split(s)[1] for s in self.symbols}
        if len(quotes) > 1:
            raise ConfigurationError(f"{self.name}: symbols {list(self.symbols)} have several quote assets; the account's cash is one")
        self.cash_asset = quotes.pop() if quotes else "USDT"
        try:
            import ccxt  # noqa: F401
        except ImportError as exc:
            raise ConfigurationError(_INSTALL) from exc
        self._local = threading.local()
        self._markets_lock = threading.Lock()
        self._first: Any = None  # the exchange whose markets the other threads' instances share
        self._opened: list[Any] = []  # every thread's exchange, closed by close()
        self._sent = RecentIds()  # client order id -> when its send started (the resend rule)
        self._sent_lock = threading.Lock()  # guards _locks
        self._locks: dict[str, list[Any]] = {}  # client order id -> [its send lock, holders]
        # A forked child must not write on the parent's pooled connections: it makes its own.
        os.register_at_fork(after_in_child=functools.partial(_forget_exchanges_after_fork, weakref.ref(self)))

    @classmethod
    def from_env(cls, exchange: str = "binance", **options: Any) -> CcxtBroker:
        """Keys from ``<EXCHANGE>_API_KEY`` and ``<EXCHANGE>_API_SECRET`` (``BINANCE_API_KEY``...)."""
        _check_supported(exchange)
        prefix = exchange.upper()
        venue = f"{exchange}-testnet" if options.get("sandbox") else exchange
        return cls(
            exchange, key_from_env(f"{prefix}_API_KEY", venue), key_from_env(f"{prefix}_API_SECRET", venue), **options
        )

    def __repr__(self) -> str:
        return f"CcxtBroker(name={self.name!r}, account={self.account_name!r}, url={self.url!r}, symbols={list(self.symbols)!r})"

    # --------------------------------------------------------------------- exchange

    @property
    def exchange(self) -> Any:
        """This thread's ccxt exchange (ccxt instances keep per-request state: one per thread),
        its markets loaded (one ``exchangeInfo`` call per broker, shared by the threads)."""
        ex = getattr(self._local, "exchange", None)
        if ex is None:
            ex = self._new_exchange()
            with self._markets_lock:
                if self._first is None:
                    ex.load_markets()
                    self._first = ex
                else:
                    ex.set_markets_from_exchange(self._first)
                self._opened.append(ex)
            self._local.exchange = ex
        return ex

    def _new_exchange(self) -> Any:
        import ccxt

        class _Binance(ccxt.binance):  # type: ignore[misc]
            def handle_errors(self, code: int, reason: str, url: str, method: str, headers: Any, body: Any,
                              response: Any, request_headers: Any, request_body: Any) -> Any:
                # Binance: "5XX: the execution status is UNKNOWN and could have been a success".
                if isinstance(code, int) and code >= 500:
                    raise ccxt.ExchangeNotAvailable(f"{self.id} HTTP {code} {reason}: {clip(str(body))}")
                return super().handle_errors(code, reason, url, method, headers, body, response, request_headers, request_body)

            def get_exceptions_by_url(self, url: str, exact_or_broad: str) -> Any:
                # ccxt picks Binance's spot error table by hostname; a url= override (a proxy, a
                # local venue) would get the generic one. This broker only trades spot.
                return self.safe_dict(self.safe_dict(self.exceptions, "spot", {}), exact_or_broad, {})

        ex = _Binance({
            "logger": _HeaderRedactingLogger(logging.getLogger("ccxt.base.exchange"), {}),
            "apiKey": self._key.value,
            "secret": self._secret.value,
            "timeout": int(self.timeout * 1000),
            "enableRateLimit": True,
            "options": {
                "defaultType": "spot",
                "fetchMarkets": {"types": ["spot"]},
                "fetchCurrencies": False,  # private sapi calls that spot trading does not need
                "fetchMargins": False,
                "maxRetriesOnFailure": 0,
                "adjustForTimeDifference": False,
                "newOrderRespType": {"market": "RESULT", "limit": "RESULT"},
                "recvWindow": RECV_WINDOW_MS,
            },
        })
        if self.sandbox:
            ex.set_sandbox_mode(True)
        if self.url:
            ex.urls["api"]["public"] = ex.urls["api"]["private"] = f"{self.url}/api/v3"
            ex.urls["api"]["v1"] = f"{self.url}/api/v1"
        return ex

    # ------------------------------------------------------------------------- orders

    def submit(self, order: OrderRequest) -> BrokerOrder:
        """Place ``order`` once under its client order id (see the module doc)."""
        coid = order.client_order_id
        if order.account != self.account_name:
            raise OrderNotSent(
                f"{self.name} trades account {self.account_name!r}; order {coid} is for account {order.account!r}. "
                "Nothing was sent: open a broker per account"
            )
        ex = self._exchange_for_send(coid)
        kind, amount, price, params = self._order_fields(ex, order)
        with self._sending(coid):  # one send of an id at a time in this process
            sent_at = self._sent_at(coid)
            if sent_at is not None:
                existing = self._lookup_before_resend(order, sent_at)
                if existing is not None:
                    return existing
            elif self.lookup_before_send:  # e.g. a ledger restored from a backup may reuse ids
                existing = self._lookup_before_first_send(order)
                if existing is not None:
                    return existing
            order.check_deadline()
            self._remember(coid)
            try:
                placed = ex.create_order(order.symbol, kind, order.side.lower(), amount, price, params)
            except Exception as exc:
                raise self._classify(exc, order) from exc
        try:
            return self._broker_order(placed["info"], order.symbol)
        except Exception as exc:
            raise AmbiguousOutcome(
                f"{self.name} answered order {coid} with a body orderguard cannot read ({exc}); it may exist: reconcile"
            ) from exc

    def _exchange_for_send(self, coid: str) -> Any:
        try:
            return self.exchange
        except Exception as exc:  # markets could not be loaded: no order was sent
            raise OrderNotSent(f"{self.name}: could not load the markets before sending {coid}: {clip(str(exc))}") from exc

    def _order_fields(self, ex: Any, order: OrderRequest) -> tuple[str, str, str | None, dict[str, Any]]:
        """ccxt's arguments for ``order``; OrderNotSent when Binance cannot take it as it is."""
        coid = order.client_order_id
        if order.symbol not in ex.markets:
            raise OrderNotSent(f"{self.name} has no spot market {order.symbol!r} (order {coid}); use ccxt symbols like BTC/USDT")
        params: dict[str, Any] = {"clientOrderId": coid}
        if order.order_type == "MARKET":
            kind = "market"
        elif order.order_type == "LIMIT":
            kind = "limit"
            if order.time_in_force not in _LIMIT_TIF:
                raise OrderNotSent(
                    f"{self.name} has no {order.time_in_force} limit orders (order {coid}); use GTC, IOC or FOK. Nothing was sent"
                )
            params["timeInForce"] = order.time_in_force
        else:
            raise OrderNotSent(f"{self.name}: {order.order_type} orders are not supported by CcxtBroker yet (order {coid}); nothing was sent")
        amount = self._exact(ex.amount_to_precision, order.symbol, order.quantity, "quantity", coid)
        price = None if kind == "market" else self._exact(ex.price_to_precision, order.symbol, order.limit_price, "limit price", coid)
        return kind, amount, price, params

    def _exact(self, to_precision: Any, symbol: str, value: Decimal | None, what: str, coid: str) -> str:
        """The number as ccxt will send it, which must be the number asked for: ccxt truncates
        amounts to the step size and rounds prices to the tick size without saying so."""
        if value is None:
            raise OrderNotSent(f"{self.name}: order {coid} has no {what}; nothing was sent")
        wanted = canonical_decimal(value)
        try:
            sent = to_precision(symbol, wanted)
        except Exception as exc:
            raise OrderNotSent(f"{self.name}: the {what} {wanted} of {coid} does not fit {symbol}: {clip(str(exc))}") from exc
        if Decimal(sent) != value:
            raise OrderNotSent(
                f"{self.name}: the {what} {wanted} of {coid} is finer than {symbol}'s increment (it would go out as "
                f"{sent}); nothing was sent. Round it to the market's step"
            )
        return wanted

    def _classify(self, exc: Exception, order: OrderRequest) -> BrokerError:
        import ccxt

        what = f"{order.client_order_id} ({order.side} {canonical_decimal(order.quantity)} {order.symbol})"
        text = clip(str(exc))
        if isinstance(exc, ccxt.DuplicateOrderId) or (isinstance(exc, ccxt.InvalidOrder) and "Duplicate order sent" in str(exc)):
            return DuplicateClientOrderId(f"{self.name} has an open order under client order id {what}: {text}")
        # Refusals Binance answers with 4xx before matching: rate limits, clock, bad or unfunded orders.
        if isinstance(exc, (ccxt.RateLimitExceeded, ccxt.DDoSProtection, ccxt.InvalidNonce)) or (
            isinstance(exc, ccxt.ExchangeError) and type(exc) is not ccxt.ExchangeError
        ):
            return OrderRejected(f"{self.name} refused order {what}: {text}")
        # Timeouts, resets, 5xx, -1007/-1006/-1000/-1001 and anything unclassified: it may exist.
        return AmbiguousOutcome(f"{self.name}: no definite answer to order {what} ({type(exc).__name__}: {text}); reconcile")

    # ------------------------------------------------------------ the resend rule

    @contextlib.contextmanager
    def _sending(self, coid: str) -> Iterator[None]:
        """Hold ``coid``'s send lock: a second submit of an id waits for the first to answer."""
        with self._sent_lock:
            entry = self._locks.setdefault(coid, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._sent_lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[coid]

    def _sent_at(self, coid: str) -> float | None:
        return self._sent.get(coid)

    def _remember(self, coid: str) -> None:
        self._sent.add(coid, time.time())  # the request's timestamp is taken just after this

    def _lookup_before_resend(self, order: OrderRequest, sent_at: float) -> BrokerOrder | None:
        """Binance forgets a client order id once its order closed, so before sending an id again
        prove the first send did not arrive: a request still on its way is accepted until its
        timestamp + ``recvWindow`` (plus the 1 s Binance lets a client clock run ahead), and an
        accepted order may be invisible for ``lookup_grace``. So: look up; if nothing, wait until
        both have passed; look up again; send only if that finds nothing too."""
        coid = order.client_order_id
        try:
            found = self.lookup(coid, symbol=order.symbol)
            if found is None:
                expired = sent_at + RECV_WINDOW_MS / 1000 + _CLOCK_AHEAD_ALLOWED
                time.sleep(max(self.lookup_grace, expired - time.time()))
                found = self.lookup(coid, symbol=order.symbol)
        except BrokerError as exc:
            raise AmbiguousOutcome(f"{self.name}: {coid} was sent before and the lookup before a resend failed ({exc}); not resent") from exc
        if found is not None:
            log.warning("%s: %s was already at the venue (%s); returned it instead of sending again", self.name, coid, found.status.value)
        return found

    def _lookup_before_first_send(self, order: OrderRequest) -> BrokerOrder | None:
        coid = order.client_order_id
        try:
            found = self.lookup(coid, symbol=order.symbol)
        except BrokerError as exc:
            raise OrderNotSent(f"{self.name}: the lookup of {coid} before its first send failed ({exc}); nothing was sent") from exc
        if found is not None:
            log.error("%s: %s is already at the venue (%s) though this process never sent it (a restored ledger?); "
                      "returned it instead of sending", self.name, coid, found.status.value)
        return found

    # ------------------------------------------------------------------------ lookups

    def lookup(self, client_order_id: str, *, symbol: str | None = None) -> BrokerOrder | None:
        """The order under ``client_order_id`` in ``symbol``; None only on Binance's -2013
        "Order does not exist.". Binance indexes orders by market, so the symbol is required."""
        import ccxt

        if not symbol:
            raise ConfigurationError(f"{self.name}: looking up {client_order_id} needs its symbol (Binance finds orders per market)")
        try:
            found = self.exchange.fetch_order(None, symbol, {"origClientOrderId": client_order_id})
        except ccxt.OrderNotFound as exc:
            if "-2013" in str(exc):
                return None
            raise BrokerError(f"{self.name}: looking up {client_order_id} failed: {clip(str(exc))}") from exc
        except Exception as exc:
            raise BrokerError(f"{self.name}: looking up {client_order_id} failed: {type(exc).__name__}: {clip(str(exc))}") from exc
        try:
            order = self._broker_order(found["info"], symbol)
        except Exception as exc:
            raise BrokerError(f"{self.name}: the order {client_order_id} came back unreadable: {clip(str(exc))}") from exc
        if order.client_order_id != client_order_id:
            raise BrokerError(f"{self.name}: asked for {client_order_id}, the venue answered with {order.client_order_id}")
        return order

    def cancel(self, client_order_id: str, *, symbol: str | None = None) -> BrokerOrder:
        """Cancel an open order; returns the order as Binance shows it afterwards."""
        import ccxt

        order = self.lookup(client_order_id, symbol=symbol)
        if order is None:
            raise OrderRejected(f"{self.name}: no order {client_order_id} in {symbol} to cancel")
        if not order.status.is_open:
            return order
        try:
            self.exchange.cancel_order(None, symbol, {"origClientOrderId": client_order_id})
        except ccxt.OrderNotFound:
            pass  # closed meanwhile (-2011 / -2013): the lookup below says how
        except Exception as exc:
            raise BrokerError(f"{self.name}: cancel of {client_order_id} failed: {clip(str(exc))}") from exc
        return self.lookup(client_order_id, symbol=symbol) or order

    # ---------------------------------------------------------------- positions & cash

    def _balances(self) -> dict[str, Decimal]:
        raw = self.exchange.fetch_balance()["info"].get("balances", [])
        return {
            str(b["asset"]): venue_decimal(b.get("free", "0"), "free") + venue_decimal(b.get("locked", "0"), "locked")
            for b in raw
        }

    def positions(self, account: str | None = None) -> list[Position]:
        """The base-asset balance of each configured symbol, as a position in that symbol."""
        if not self.symbols:
            raise ConfigurationError(
                f"{self.name}: spot accounts hold balances per asset, not positions per symbol; configure "
                "symbols=('BTC/USDT', ...) (spec: &symbols=BTC/USDT) to compare positions"
            )
        if account is not None and account != self.account_name:
            return []
        balances = self._balances()
        held = []
        for symbol in self.symbols:
            quantity = balances.get(_split(symbol)[0], Decimal(0))
            if quantity != 0:
                held.append(Position(self.account_name, symbol, quantity))
        return held

    def account(self, account: str) -> AccountInfo:
        """The quote asset's balance (free + locked) as cash."""
        if account != self.account_name:
            raise ConfigurationError(f"{self.name} trades account {self.account_name!r}, not {account!r}")
        return AccountInfo(self.account_name, self._balances().get(self.cash_asset, Decimal(0)))

    def close(self) -> None:
        with self._markets_lock:
            opened, self._opened = self._opened, []
        for ex in opened:
            if getattr(ex, "session", None) is not None:
                ex.session.close()

    # ----------------------------------------------------------------------- plumbing

    def _broker_order(self, raw: dict[str, Any], symbol: str) -> BrokerOrder:
        executed = optional_decimal(raw.get("executedQty"), "executedQty") or Decimal(0)
        quote = optional_decimal(raw.get("cummulativeQuoteQty"), "cummulativeQuoteQty")
        status = raw.get("status")
        return BrokerOrder(
            client_order_id=str(raw["clientOrderId"]),
            broker_order_id=str(raw["orderId"]),
            # An ACK-only answer has no status yet: accepted is all it says.
            status=OrderStatus.ACCEPTED if status is None else order_status(str(status), executed),
            account=self.account_name,
            symbol=symbol,
            side=str(raw.get("side", "")).upper(),
            quantity=venue_decimal(raw["origQty"], "origQty"),
            filled_quantity=executed,
            average_price=(
                Decimal(canonical_decimal(quote / executed)) if executed > 0 and quote is not None and quote >= 0 else None
            ),
        )
