"""A local HTTP server that behaves like Binance's SPOT REST API v3 order endpoints.

Enough of Binance to matter for orderguard, served over real HTTP on 127.0.0.1 so the real
ccxt library (``ccxt.binance`` with ``urls["api"]["public"|"private"]`` pointed here) talks to it
exactly as it would to api.binance.com:

* ``GET /api/v3/ping``, ``/api/v3/time``, ``/api/v3/exchangeInfo`` (BTCUSDT and ETHUSDT with
  PRICE_FILTER, LOT_SIZE, MARKET_LOT_SIZE and NOTIONAL filters, what ccxt's ``load_markets`` parses).
* SIGNED endpoints: ``X-MBX-APIKEY`` must name the key (else HTTP 401 -2014/-2015), ``signature``
  must be the HMAC-SHA256 of the query string + body without it (else HTTP 401 -1022), and
  ``timestamp`` must be within ``recvWindow`` (default 5000, max 60000 ms; else -1021).
* ``POST /api/v3/order``: LIMIT / MARKET (other Binance types are answered with a rejection),
  LOT_SIZE / PRICE_FILTER / NOTIONAL filter failures (-1013), ``newClientOrderId`` checked
  against ``^[.A-Z:/a-z0-9_-]{1,36}$`` and generated when absent, OPEN-ORDERS-ONLY dedupe (-2010
  "Duplicate order sent." while an open order has that id; a closed order's id may be reused),
  balance checks (-2010 insufficient balance), ACK / RESULT / FULL response shapes.
* ``GET /api/v3/order`` (``orderId`` or ``origClientOrderId``: the latest order with that id in
  that symbol; -2013 "Order does not exist."), ``DELETE /api/v3/order`` (-2011 "Unknown order
  sent." for an unknown or closed order), ``GET /api/v3/openOrders`` (symbol optional),
  ``GET /api/v3/account``.

Matching is deliberately simple: one price per symbol (``set_price``). MARKET orders and
marketable LIMIT orders fill at that price (at once, or after ``fill_delay`` seconds, optionally
half first with ``partial_fills=True``); other GTC LIMIT orders rest until ``set_price`` crosses
them and then fill at their limit price; IOC/FOK orders that cannot fill at once EXPIRE.
Balances move with :class:`~decimal.Decimal` arithmetic and no commission; open orders lock
what they may spend. Time-based fills happen lazily, on the next request (or ``orders()`` call).

Faults, settable from the test thread: :meth:`fail_next_posts` (an HTTP status before or after
the order is recorded), :meth:`drop_next_posts` (the socket is closed without an answer),
:meth:`slow_next_posts` (recorded, then the answer comes after the client gave up),
:meth:`delay_next_posts` (the request reaches the venue late, e.g. after the client gave up) and
``lookup_lag`` (an accepted order answers -2013 to ``GET /api/v3/order`` for that long).
Every request is logged (:attr:`requests`, :meth:`posts`) so tests can count what was sent.

Not implemented: order lists (OCO/OTO), stop and iceberg orders, cancel-replace, SOR, trades,
klines/depth/tickers, user data streams, commissions, rate-limit accounting, sapi endpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import json
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from decimal import ROUND_DOWN, Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

API_KEY = "fake-binance-api-key-0123456789"
API_SECRET = "fake-binance-secret-do-not-log-9f8e7d6c5b4a"

ORDER_PATH = "/api/v3/order"
FINAL = frozenset({"FILLED", "CANCELED", "REJECTED", "EXPIRED", "EXPIRED_IN_MATCH"})
COID_RE = re.compile(r"^[.A-Z:/a-z0-9_-]{1,36}$")
EIGHT = Decimal("0.00000001")


@dataclass(frozen=True)
class Market:
    symbol: str  # Binance id, e.g. BTCUSDT
    base: str
    quote: str
    tick_size: Decimal
    min_price: Decimal
    max_price: Decimal
    step_size: Decimal
    min_qty: Decimal
    max_qty: Decimal
    min_notional: Decimal


MARKETS = {
    "BTCUSDT": Market("BTCUSDT", "BTC", "USDT", Decimal("0.01"), Decimal("0.01"), Decimal("1000000"),
                      Decimal("0.00001"), Decimal("0.00001"), Decimal("9000"), Decimal("5")),
    "ETHUSDT": Market("ETHUSDT", "ETH", "USDT", Decimal("0.01"), Decimal("0.01"), Decimal("1000000"),
                      Decimal("0.0001"), Decimal("0.0001"), Decimal("9000"), Decimal("5")),
}


def fmt(value: Decimal) -> str:
    """Binance's spelling of a decimal: eight places."""
    return format(value.quantize(EIGHT), "f")


class ApiError(Exception):
    """An error answer: HTTP status plus Binance's {"code", "msg"} body."""

    def __init__(self, status: int, code: int, msg: str) -> None:
        super().__init__(f"{status} {code} {msg}")
        self.status, self.code, self.msg = status, code, msg


def _mandatory(name: str) -> ApiError:
    return ApiError(400, -1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed.")


@dataclass(frozen=True)
class RequestRecord:
    """One request the fake received (logged before any fault or validation)."""

    method: str
    path: str
    params: dict[str, str]
    api_key: str | None
    at: float  # time.time()


@dataclass
class Fault:
    kind: str  # "before" | "after" | "drop" | "drop_before" | "slow" | "delay"
    status: int = 500
    code: int | None = None
    msg: str | None = None
    seconds: float = 0.0


@dataclass
class VenueOrder:
    """An order at the fake venue (``orders()`` hands out copies)."""

    order_id: int
    client_order_id: str
    symbol: str
    side: str
    type: str
    time_in_force: str
    quantity: Decimal
    price: Decimal  # limit price; 0 for MARKET (as Binance shows it)
    status: str = "NEW"
    executed: Decimal = Decimal(0)
    quote_qty: Decimal = Decimal(0)  # cummulativeQuoteQty
    created_ms: int = 0
    updated_ms: int = 0
    fills: list[dict[str, str]] = field(default_factory=list)
    # internal
    reserve_price: Decimal = Decimal(0)  # what a BUY locked per unit of quantity
    market_price: Decimal | None = None  # MARKET / marketable LIMIT: the price it takes
    fill_at: float | None = None  # monotonic time the rest fills (fill_delay)
    visible_at: float = 0.0  # monotonic time GET /api/v3/order starts showing it (lookup_lag)
    frozen: bool = False  # status set by hand: the engine leaves it alone

    @property
    def is_open(self) -> bool:
        return self.status not in FINAL


class FakeBinance:
    """The fake venue. Use as a context manager; ``url`` is ``http://127.0.0.1:PORT``."""

    def __init__(
        self,
        *,
        api_key: str = API_KEY,
        secret: str = API_SECRET,
        prices: dict[str, str | Decimal] | None = None,
        balances: dict[str, str | Decimal] | None = None,
        fill_delay: float = 0.0,
        partial_fills: bool = False,
        lookup_lag: float = 0.0,
    ) -> None:
        self.api_key, self.secret = api_key, secret
        self.fill_delay, self.partial_fills, self.lookup_lag = fill_delay, partial_fills, lookup_lag
        self.prices = {k: Decimal(v) for k, v in (prices or {"BTCUSDT": "50000", "ETHUSDT": "3000"}).items()}
        start = {"USDT": "100000", "BTC": "0", "ETH": "0"}
        start.update({k: str(v) for k, v in (balances or {}).items()})
        self._free = {k: Decimal(v) for k, v in start.items()}
        self._locked = {k: Decimal(0) for k in start}
        self._orders: list[VenueOrder] = []
        self._ids = itertools.count(1_000_001)
        self._faults: deque[Fault] = deque()
        self.requests: list[RequestRecord] = []
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeBinance:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.block_on_close = False
        server.fake = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-binance", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeBinance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "FakeBinance is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # --------------------------------------------------------------- test controls

    def fail_next_posts(
        self, n: int = 1, *, status: int = 500, after_record: bool = False, code: int | None = None,
        msg: str | None = None,
    ) -> None:
        """The next ``n`` POST /api/v3/order answer HTTP ``status`` (body {"code", "msg"} when
        ``code`` is given, else a bare text body), before or after the order is recorded."""
        with self.lock:
            for _ in range(n):
                self._faults.append(Fault("after" if after_record else "before", status, code, msg))

    def drop_next_posts(self, n: int = 1, *, after_record: bool = True) -> None:
        """The next ``n`` POSTs close the socket without an answer (after recording the order, or before)."""
        with self.lock:
            for _ in range(n):
                self._faults.append(Fault("drop" if after_record else "drop_before"))

    def delay_next_posts(self, n: int = 1, *, seconds: float) -> None:
        """The next ``n`` POSTs reach the venue ``seconds`` late (held in the network before the
        gateway): checked, recorded and answered only then, as Binance would within recvWindow."""
        with self.lock:
            for _ in range(n):
                self._faults.append(Fault("delay", seconds=seconds))

    def slow_next_posts(self, n: int = 1, *, seconds: float) -> None:
        """The next ``n`` POSTs record the order, then wait ``seconds`` before answering."""
        with self.lock:
            for _ in range(n):
                self._faults.append(Fault("slow", seconds=seconds))

    def pending_faults(self) -> int:
        with self.lock:
            return len(self._faults)

    def set_price(self, symbol: str, price: str | Decimal) -> None:
        """Move the market: resting LIMIT orders the new price crosses fill at their limit."""
        with self.lock:
            self.prices[symbol] = Decimal(price)
            self._advance()

    def set_status(self, client_order_id: str, status: str, *, executed: str | Decimal | None = None) -> None:
        """Force the latest order with this id into a raw Binance status (for exotic statuses)."""
        with self.lock:
            order = self._latest(client_order_id)
            assert order is not None, f"no order {client_order_id}"
            order.status = status
            if executed is not None:
                order.executed = Decimal(executed)
                order.quote_qty = order.executed * (order.market_price or order.price)
            order.frozen = True
            order.updated_ms = _now_ms()

    def orders(self, client_order_id: str | None = None) -> list[VenueOrder]:
        """Copies of every accepted order (of one client order id), oldest first."""
        with self.lock:
            self._advance()
            return [replace(o, fills=list(o.fills)) for o in self._orders
                    if client_order_id is None or o.client_order_id == client_order_id]

    def posts(self) -> list[RequestRecord]:
        """Every POST /api/v3/order received (whatever came of it)."""
        with self.lock:
            return [r for r in self.requests if r.method == "POST" and r.path == ORDER_PATH]

    def calls(self, method: str, path: str) -> list[RequestRecord]:
        with self.lock:
            return [r for r in self.requests if r.method == method and r.path == path]

    def balance(self, asset: str) -> tuple[Decimal, Decimal]:
        """(free, locked) of an asset."""
        with self.lock:
            self._advance()
            return self._free.get(asset, Decimal(0)), self._locked.get(asset, Decimal(0))

    # ----------------------------------------------------------------- the engine

    def _latest(self, client_order_id: str, symbol: str | None = None) -> VenueOrder | None:
        for order in reversed(self._orders):
            if order.client_order_id == client_order_id and (symbol is None or order.symbol == symbol):
                return order
        return None

    def _advance(self) -> None:
        """Fill what time or price made fillable."""
        now = time.monotonic()
        for order in self._orders:
            if not order.is_open or order.frozen:
                continue
            if order.market_price is not None:
                if order.fill_at is not None and now >= order.fill_at:
                    self._fill(order, order.quantity - order.executed, order.market_price)
            elif order.type == "LIMIT":
                price = self.prices[order.symbol]
                crosses = price <= order.price if order.side == "BUY" else price >= order.price
                if crosses:
                    self._fill(order, order.quantity - order.executed, order.price)

    def _fill(self, order: VenueOrder, qty: Decimal, price: Decimal) -> None:
        if qty <= 0:
            return
        market = MARKETS[order.symbol]
        cost = qty * price
        if order.side == "BUY":
            reserved = qty * order.reserve_price
            self._locked[market.quote] -= reserved
            self._free[market.quote] += reserved - cost
            self._free[market.base] = self._free.get(market.base, Decimal(0)) + qty
        else:
            self._locked[market.base] -= qty
            self._free[market.quote] = self._free.get(market.quote, Decimal(0)) + cost
        order.executed += qty
        order.quote_qty += cost
        order.fills.append({"price": fmt(price), "qty": fmt(qty), "commission": fmt(Decimal(0)),
                            "commissionAsset": market.base if order.side == "BUY" else market.quote,
                            "tradeId": str(next(self._ids))})
        order.status = "FILLED" if order.executed >= order.quantity else "PARTIALLY_FILLED"
        if order.status == "FILLED":
            order.fill_at = None
        order.updated_ms = _now_ms()

    def _release(self, order: VenueOrder) -> None:
        """Unlock what an order that ends unfilled still held."""
        market = MARKETS[order.symbol]
        rest = order.quantity - order.executed
        if order.side == "BUY":
            amount = rest * order.reserve_price
            self._locked[market.quote] -= amount
            self._free[market.quote] += amount
        else:
            self._locked[market.base] -= rest
            self._free[market.base] += rest

    def _new_order(self, p: dict[str, str]) -> tuple[VenueOrder, str]:
        """Validate and place; returns the order and the response type. Raises ApiError."""
        symbol = p.get("symbol")
        if not symbol:
            raise _mandatory("symbol")
        market = MARKETS.get(symbol)
        if market is None:
            raise ApiError(400, -1121, "Invalid symbol.")
        side = p.get("side")
        if not side:
            raise _mandatory("side")
        if side not in ("BUY", "SELL"):
            raise ApiError(400, -1117, "Invalid side.")
        kind = p.get("type")
        if not kind:
            raise _mandatory("type")
        if kind not in ("LIMIT", "MARKET", "LIMIT_MAKER", "STOP_LOSS", "STOP_LOSS_LIMIT", "TAKE_PROFIT",
                        "TAKE_PROFIT_LIMIT"):
            raise ApiError(400, -1116, "Invalid orderType.")
        if kind not in ("LIMIT", "MARKET"):
            raise ApiError(400, -1013, "This order type is not supported by this fake venue.")
        resp_type = p.get("newOrderRespType") or ("FULL" if kind in ("LIMIT", "MARKET") else "ACK")
        if resp_type not in ("ACK", "RESULT", "FULL"):
            raise ApiError(400, -1100, "Illegal characters found in parameter 'newOrderRespType'; legal range is 'ACK, RESULT, FULL'.")
        tif = p.get("timeInForce", "")
        if kind == "LIMIT":
            if not tif:
                raise _mandatory("timeInForce")
            if tif not in ("GTC", "IOC", "FOK"):
                raise ApiError(400, -1115, "Invalid timeInForce.")
        elif tif:
            raise ApiError(400, -1106, "Parameter 'timeInForce' sent when not required.")
        if "quoteOrderQty" in p:
            raise ApiError(400, -1013, "quoteOrderQty is not supported by this fake venue.")
        qty = _decimal(p, "quantity")
        if qty is None:
            raise _mandatory("quantity")
        price = _decimal(p, "price")
        if kind == "LIMIT" and price is None:
            raise _mandatory("price")
        if kind == "MARKET" and price is not None:
            raise ApiError(400, -1106, "Parameter 'price' sent when not required.")
        coid = p.get("newClientOrderId")
        if coid is not None and not COID_RE.match(coid):
            raise ApiError(400, -1100, "Illegal characters found in parameter 'newClientOrderId'; "
                                       "legal range is '^[\\.A-Z\\:/a-z0-9_-]{1,36}$'.")
        # filters, in Binance's order
        if price is not None and (
            price < market.min_price or price > market.max_price or price % market.tick_size != 0
        ):
            raise ApiError(400, -1013, "Filter failure: PRICE_FILTER")
        if qty < market.min_qty or qty > market.max_qty or (qty - market.min_qty) % market.step_size != 0:
            raise ApiError(400, -1013, "Filter failure: LOT_SIZE")
        last = self.prices[symbol]
        if qty * (price if price is not None else last) < market.min_notional:
            raise ApiError(400, -1013, "Filter failure: NOTIONAL")
        if coid is None:
            coid = "web_" + hashlib.sha1(str(next(self._ids)).encode()).hexdigest()[:20]
        elif any(o.client_order_id == coid and o.is_open for o in self._orders):
            raise ApiError(400, -2010, "Duplicate order sent.")
        marketable = kind == "MARKET" or (last <= price if side == "BUY" else last >= price)  # type: ignore[operator]
        expires = kind == "LIMIT" and tif in ("IOC", "FOK") and not marketable
        reserve = Decimal(0)
        if side == "BUY":
            reserve = last if price is None else price  # a marketable LIMIT gets the difference back
            need = qty * reserve
            if self._free.get(market.quote, Decimal(0)) < need:
                raise ApiError(400, -2010, "Account has insufficient balance for requested action.")
            if not expires:
                self._free[market.quote] -= need
                self._locked[market.quote] += need
        else:
            if self._free.get(market.base, Decimal(0)) < qty:
                raise ApiError(400, -2010, "Account has insufficient balance for requested action.")
            if not expires:
                self._free[market.base] -= qty
                self._locked[market.base] = self._locked.get(market.base, Decimal(0)) + qty
        now_ms = _now_ms()
        order = VenueOrder(
            order_id=next(self._ids), client_order_id=coid, symbol=symbol, side=side, type=kind,
            time_in_force=tif or "GTC", quantity=qty, price=price if price is not None else Decimal(0),
            created_ms=now_ms, updated_ms=now_ms, reserve_price=reserve,
            visible_at=time.monotonic() + self.lookup_lag,
        )
        self._orders.append(order)
        if expires:
            order.status = "EXPIRED"
        elif marketable:
            order.market_price = last
            if self.fill_delay > 0 and tif not in ("IOC", "FOK"):
                order.fill_at = time.monotonic() + self.fill_delay
                if self.partial_fills:
                    half = (qty / 2).quantize(market.step_size, rounding=ROUND_DOWN)
                    self._fill(order, half, last)
            else:
                self._fill(order, qty, last)
        return order, resp_type

    def _cancel(self, order: VenueOrder) -> None:
        self._release(order)
        order.status = "CANCELED"
        order.fill_at = None
        order.updated_ms = _now_ms()

    # ----------------------------------------------------------- HTTP dispatching

    def _signed(self, method: str, query: str, body: str, headers: Any) -> None:
        key = headers.get("X-MBX-APIKEY")
        if not key:
            raise ApiError(401, -2014, "API-key format invalid.")
        if key != self.api_key:
            raise ApiError(401, -2015, "Invalid API-key, IP, or permissions for action.")
        parts_q = [x for x in query.split("&") if x] if query else []
        parts_b = [x for x in body.split("&") if x] if body else []
        sigs = [x.partition("=")[2] for x in parts_q + parts_b if x.startswith("signature=")]
        if len(sigs) != 1:
            raise _mandatory("signature")
        payload = "&".join(x for x in parts_q if not x.startswith("signature=")) + "&".join(
            x for x in parts_b if not x.startswith("signature="))
        expected = hmac.new(self.secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, sigs[0].lower()):
            raise ApiError(401, -1022, "Signature for this request is not valid.")
        params = dict(parse_qsl(query + "&" + body, keep_blank_values=True))
        try:
            stamp = int(params["timestamp"])
        except (KeyError, ValueError):
            raise _mandatory("timestamp") from None
        try:
            window = int(params.get("recvWindow", "5000"))
        except ValueError:
            raise _mandatory("recvWindow") from None
        if window > 60000:
            raise ApiError(400, -1131, "recvWindow must be less than 60000")
        now = _now_ms()
        if stamp > now + 1000:
            raise ApiError(400, -1021, "Timestamp for this request was 1000ms ahead of the server's time.")
        if now - stamp > window:
            raise ApiError(400, -1021, "Timestamp for this request is outside of the recvWindow.")

    def _route(self, method: str, path: str, p: dict[str, str]) -> tuple[int, Any]:
        """Everything but faults; caller holds the lock and has checked signatures."""
        self._advance()
        if path == "/api/v3/ping":
            return 200, {}
        if path == "/api/v3/time":
            return 200, {"serverTime": _now_ms()}
        if path == "/api/v3/exchangeInfo":
            return 200, _exchange_info()
        if path == "/api/v3/account" and method == "GET":
            assets = sorted(set(self._free) | set(self._locked))
            balances = [{"asset": a, "free": fmt(self._free.get(a, Decimal(0))),
                         "locked": fmt(self._locked.get(a, Decimal(0)))} for a in assets]
            if p.get("omitZeroBalances") == "true":
                balances = [b for b in balances if Decimal(b["free"]) or Decimal(b["locked"])]
            return 200, {
                "makerCommission": 10, "takerCommission": 10, "buyerCommission": 0, "sellerCommission": 0,
                "commissionRates": {"maker": "0.00100000", "taker": "0.00100000", "buyer": "0.00000000",
                                    "seller": "0.00000000"},
                "canTrade": True, "canWithdraw": True, "canDeposit": True, "brokered": False,
                "requireSelfTradePrevention": False, "preventSor": False, "updateTime": _now_ms(),
                "accountType": "SPOT", "balances": balances, "permissions": ["SPOT"], "uid": 354937868,
            }
        if path == "/api/v3/openOrders" and method == "GET":
            symbol = p.get("symbol")
            if symbol is not None and symbol not in MARKETS:
                raise ApiError(400, -1121, "Invalid symbol.")
            now = time.monotonic()
            return 200, [_query_view(o) for o in self._orders
                         if o.is_open and now >= o.visible_at and (symbol is None or o.symbol == symbol)]
        if path == ORDER_PATH and method == "GET":
            order = self._find(p)
            if order is None or time.monotonic() < order.visible_at:
                raise ApiError(400, -2013, "Order does not exist.")
            return 200, _query_view(order)
        if path == ORDER_PATH and method == "DELETE":
            order = self._find(p)
            if order is None or not order.is_open:
                raise ApiError(400, -2011, "Unknown order sent.")
            self._cancel(order)
            view = _result_view(order)
            view["origClientOrderId"] = order.client_order_id
            view["clientOrderId"] = p.get("newClientOrderId") or "cancel_" + str(order.order_id)
            return 200, view
        raise ApiError(404, -1000, f"Unknown endpoint {method} {path}")

    def _find(self, p: dict[str, str]) -> VenueOrder | None:
        symbol = p.get("symbol")
        if not symbol:
            raise _mandatory("symbol")
        if symbol not in MARKETS:
            raise ApiError(400, -1121, "Invalid symbol.")
        if "orderId" in p:
            try:
                oid = int(p["orderId"])
            except ValueError:
                raise _mandatory("orderId") from None
            found = next((o for o in self._orders if o.order_id == oid and o.symbol == symbol), None)
            coid = p.get("origClientOrderId")
            if found is not None and coid is not None and found.client_order_id != coid:
                return None
            return found
        coid = p.get("origClientOrderId")
        if not coid:
            raise ApiError(400, -1102, "Param 'origClientOrderId' or 'orderId' must be sent, but both were empty/null!")
        return self._latest(coid, symbol)


def _decimal(p: dict[str, str], name: str) -> Decimal | None:
    text = p.get(name)
    if text is None or text == "":
        return None
    try:
        value = Decimal(text)
    except ArithmeticError:
        raise ApiError(400, -1100, f"Illegal characters found in parameter '{name}'; legal range is '^([0-9]{{1,20}})(\\.[0-9]{{1,20}})?$'.") from None
    if not value.is_finite() or value <= 0:
        raise ApiError(400, -1013, f"Invalid {name}.")
    if value != value.quantize(EIGHT):
        raise ApiError(400, -1111, "Precision is over the maximum defined for this asset.")
    return value


def _now_ms() -> int:
    return int(time.time() * 1000)


def _ack_view(o: VenueOrder) -> dict[str, Any]:
    return {"symbol": o.symbol, "orderId": o.order_id, "orderListId": -1, "clientOrderId": o.client_order_id,
            "transactTime": o.created_ms}


def _result_view(o: VenueOrder) -> dict[str, Any]:
    view = _ack_view(o)
    view.update({
        "price": fmt(o.price), "origQty": fmt(o.quantity), "executedQty": fmt(o.executed),
        "origQuoteOrderQty": fmt(Decimal(0)), "cummulativeQuoteQty": fmt(o.quote_qty), "status": o.status,
        "timeInForce": o.time_in_force, "type": o.type, "side": o.side, "workingTime": o.created_ms,
        "selfTradePreventionMode": "EXPIRE_MAKER",
    })
    return view


def _query_view(o: VenueOrder) -> dict[str, Any]:
    return {
        "symbol": o.symbol, "orderId": o.order_id, "orderListId": -1, "clientOrderId": o.client_order_id,
        "price": fmt(o.price), "origQty": fmt(o.quantity), "executedQty": fmt(o.executed),
        "cummulativeQuoteQty": fmt(o.quote_qty), "status": o.status, "timeInForce": o.time_in_force,
        "type": o.type, "side": o.side, "stopPrice": fmt(Decimal(0)), "icebergQty": fmt(Decimal(0)),
        "time": o.created_ms, "updateTime": o.updated_ms, "isWorking": o.is_open, "workingTime": o.created_ms,
        "origQuoteOrderQty": fmt(Decimal(0)), "selfTradePreventionMode": "EXPIRE_MAKER",
    }


def _exchange_info() -> dict[str, Any]:
    symbols = []
    for m in MARKETS.values():
        symbols.append({
            "symbol": m.symbol, "status": "TRADING", "baseAsset": m.base, "baseAssetPrecision": 8,
            "quoteAsset": m.quote, "quotePrecision": 8, "quoteAssetPrecision": 8,
            "baseCommissionPrecision": 8, "quoteCommissionPrecision": 8,
            "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS", "STOP_LOSS_LIMIT", "TAKE_PROFIT",
                           "TAKE_PROFIT_LIMIT"],
            "icebergAllowed": True, "ocoAllowed": True, "otoAllowed": True, "quoteOrderQtyMarketAllowed": True,
            "allowTrailingStop": True, "cancelReplaceAllowed": True, "isSpotTradingAllowed": True,
            "isMarginTradingAllowed": False,
            "filters": [
                {"filterType": "PRICE_FILTER", "minPrice": fmt(m.min_price), "maxPrice": fmt(m.max_price),
                 "tickSize": fmt(m.tick_size)},
                {"filterType": "LOT_SIZE", "minQty": fmt(m.min_qty), "maxQty": fmt(m.max_qty),
                 "stepSize": fmt(m.step_size)},
                {"filterType": "MARKET_LOT_SIZE", "minQty": fmt(Decimal(0)), "maxQty": fmt(m.max_qty),
                 "stepSize": fmt(Decimal(0))},
                {"filterType": "NOTIONAL", "minNotional": fmt(m.min_notional), "applyMinToMarket": True,
                 "maxNotional": "9000000.00000000", "applyMaxToMarket": False, "avgPriceMins": 5},
                {"filterType": "MAX_NUM_ORDERS", "maxNumOrders": 200},
            ],
            "permissions": [], "permissionSets": [["SPOT"]], "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
            "allowedSelfTradePreventionModes": ["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
        })
    return {
        "timezone": "UTC", "serverTime": _now_ms(),
        "rateLimits": [
            {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000},
            {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
            {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
        ],
        "exchangeFilters": [], "symbols": symbols,
    }


_SIGNED = {("POST", ORDER_PATH), ("GET", ORDER_PATH), ("DELETE", ORDER_PATH), ("GET", "/api/v3/openOrders"),
           ("GET", "/api/v3/account")}


class _Handler(BaseHTTPRequestHandler):
    server_version = "fake-binance/1.0"
    protocol_version = "HTTP/1.0"  # one request per connection: a dropped answer is a clean EOF

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _send(self, status: int, payload: Any, *, raw: str | None = None) -> None:
        data = (raw if raw is not None else json.dumps(payload)).encode()
        try:
            self.send_response(status)
            ctype = "text/html" if raw is not None else "application/json;charset=UTF-8"
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-MBX-USED-WEIGHT-1M", "1")
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (timeout): nobody is listening any more
            self.close_connection = True

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.connection.close()

    def _dispatch(self, method: str) -> None:
        fake: FakeBinance = self.server.fake  # type: ignore[attr-defined]
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        query, path = split.query, split.path
        params = dict(parse_qsl(query + "&" + body, keep_blank_values=True))
        slow = 0.0
        fault = None
        if (method, path) == ("POST", ORDER_PATH):
            with fake.lock:
                fault = fake._faults.popleft() if fake._faults else None
        if fault is not None and fault.kind == "delay":
            time.sleep(fault.seconds)  # still on its way: the venue has not seen it yet
        with fake.lock:
            fake.requests.append(RequestRecord(method, path, params, self.headers.get("X-MBX-APIKEY"), time.time()))
            if fault is not None and fault.kind == "before":
                return self._fault_answer(fault)
            if fault is not None and fault.kind == "drop_before":
                return self._drop()
            try:
                if (method, path) in _SIGNED:
                    fake._signed(method, query, body, self.headers)
                if (method, path) == ("POST", ORDER_PATH):
                    fake._advance()
                    order, resp_type = fake._new_order(params)
                    if fault is not None and fault.kind == "after":
                        return self._fault_answer(fault)
                    if fault is not None and fault.kind == "drop":
                        return self._drop()
                    if fault is not None and fault.kind == "slow":
                        slow = fault.seconds
                    view = (_ack_view(order) if resp_type == "ACK" else _result_view(order))
                    if resp_type == "FULL":
                        view["fills"] = list(order.fills)
                    status, payload = 200, view
                else:
                    status, payload = fake._route(method, path, params)
            except ApiError as err:
                status, payload = err.status, {"code": err.code, "msg": err.msg}
        if slow:
            time.sleep(slow)  # outside the lock: the venue keeps answering others meanwhile
        self._send(status, payload)
        return None

    def _fault_answer(self, fault: Fault) -> None:
        if fault.code is not None:
            self._send(fault.status, {"code": fault.code, "msg": fault.msg or ""})
        else:
            self._send(fault.status, None, raw=f"<html><body><h1>{fault.status} Server Error</h1></body></html>")
