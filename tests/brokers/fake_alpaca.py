"""A local stand-in for Alpaca's Trading API v2 (the order, position and account endpoints).

It is a real HTTP server (``http.server.ThreadingHTTPServer`` on 127.0.0.1, an ephemeral port,
HTTP/1.1 keep-alive) running in a daemon thread of the test process, so the real alpaca-py
SDK talks to it over real sockets::

    with FakeAlpaca(prices={"AAPL": "190.25"}) as fake:
        client = TradingClient(fake.api_key, fake.secret_key, url_override=fake.url)

What it does like Alpaca (docs.alpaca.markets, "Orders" and the API reference):

* auth by the ``APCA-API-KEY-ID`` / ``APCA-API-SECRET-KEY`` headers (401 otherwise);
* ``POST /v2/orders`` validates the body (422 ``{"code": 40010001, ...}``), refuses a
  ``client_order_id`` it has EVER seen (422 "client_order_id must be unique": Alpaca's
  permanent dedupe), makes one up when absent, checks buying power (403 40310000);
* ``GET /v2/orders:by_client_order_id?client_order_id=``, ``GET /v2/orders/{id}``,
  ``GET /v2/orders?status=open|closed|all``, ``DELETE /v2/orders/{id}`` (204; 422 when the order
  is no longer cancelable; 404 unknown), ``DELETE /v2/orders``;
* ``GET /v2/positions``, ``GET /v2/positions/{symbol}``, ``GET /v2/account``;
* fills at a fixed price per symbol, at once or ``fill_delay`` seconds later (applied lazily on
  any request), optionally partial; cash and positions follow the fills, in Decimal.

Faults a test can arm (thread-safe) on the next POSTs of orders: an HTTP error before the order
is recorded, an HTTP error after it is recorded, a dropped connection after it is recorded, a
slow answer after it is recorded, a 200 whose body is cut off after it is recorded; on the next
GETs of one order: an HTTP error, a slow answer; a lookup lag (accepted orders invisible to GETs
for a while); refused symbols (not tradable, not found, insufficient buying power). Every request
(method, path, query, JSON body) and every accepted order is logged. 502/503/504 faults answer
an HTML page, like the load balancer in front of the API; an unknown route gets Alpaca's
404 ``{"code": 40410000, "message": "endpoint not found"}``.

What it does not do: market hours, extended hours, replace (PATCH), bracket/oco/oto/mleg orders,
trailing stops' trailing, notional orders' fills (accepted, never filled), crypto/options,
pagination beyond ``limit``, rate limiting by itself (only as an armed fault), websockets.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

INVALID = 40010001  # Alpaca's code for a request it refuses (422)
UNAUTHORIZED = 40110000
FORBIDDEN = 40310000
NOT_FOUND = 40410000
UNPROCESSABLE = 42210000
RATE_LIMITED = 42910000
INTERNAL = 50010000

ORDER_TYPES = ("market", "limit", "stop", "stop_limit", "trailing_stop")
TIFS = ("day", "gtc", "opg", "cls", "ioc", "fok")
OPEN_STATUSES = (
    "new", "partially_filled", "done_for_day", "accepted", "pending_new", "accepted_for_bidding",
    "pending_cancel", "pending_replace", "pending_review", "held", "stopped", "suspended", "calculated",
)
CLOSED_STATUSES = ("filled", "canceled", "expired", "replaced", "rejected")
ACCOUNT_ID = "8f0c3b5e-3f5a-4b0e-9d3c-0a1b2c3d4e5f"


def dec_text(value: Decimal | None) -> str | None:
    """A Decimal the way Alpaca writes numbers: a plain string, no exponent, no trailing zeros."""
    if value is None:
        return None
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Request:
    """One request as the fake saw it."""

    method: str
    path: str
    query: dict[str, str]
    body: Any = None


class ApiError(Exception):
    """An Alpaca-style error answer."""

    def __init__(self, status: int, code: int | None, message: str, *, html: bool = False, text: bool = False) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.html, self.text = status, code, message, html, text

    def body(self) -> tuple[str, bytes]:
        if self.text:
            return "text/plain; charset=utf-8", self.message.encode()
        if self.html:  # what a load balancer in front of the API answers
            text = f"<html><head><title>{self.status}</title></head><body><h1>{self.status} {self.message}</h1></body></html>"
            return "text/html", text.encode()
        return "application/json", json.dumps({"code": self.code, "message": self.message}).encode()


def http_fault(status: int) -> ApiError:
    """The answer a failing Alpaca (or its gateway) gives with this status."""
    if status == 429:
        return ApiError(429, RATE_LIMITED, "rate limit exceeded")
    if status in (502, 503, 504):
        reason = {502: "Bad Gateway", 503: "Service Temporarily Unavailable", 504: "Gateway Time-out"}[status]
        return ApiError(status, None, reason, html=True)
    if status >= 500:
        return ApiError(status, INTERNAL, "internal server error occurred")
    return ApiError(status, INVALID, f"error {status}")


@dataclass
class _Faults:
    before: deque[int] = field(default_factory=deque)  # statuses answered before recording
    after: deque[int] = field(default_factory=deque)  # statuses answered after recording
    drop_after: int = 0  # record, then close the connection without an answer
    slow_after: deque[float] = field(default_factory=deque)  # record, then sleep before answering
    garble_after: int = 0  # record, then answer 200 with a body that is not JSON
    lookups: deque[int] = field(default_factory=deque)  # statuses answered to GETs of one order
    slow_lookups: deque[float] = field(default_factory=deque)  # GETs of one order answered late


class FakeAlpaca:
    """Alpaca's Trading API v2, in memory, over real HTTP on 127.0.0.1. See the module docstring."""

    def __init__(
        self,
        *,
        api_key: str = "PKFAKE0TESTKEY0000001",
        secret_key: str = "fake-secret-9f8e7d6c5b4a39281706f5e4d3c2b1a0",
        cash: str = "100000",
        prices: dict[str, str] | None = None,
        default_price: str = "100",
        fill_delay: float | None = 0.0,
        partial_fill: str | None = None,
        lookup_lag: float = 0.0,
        account_number: str = "PA3FAKE0001",
    ) -> None:
        self.api_key, self.secret_key = api_key, secret_key
        self.account_number = account_number
        self.lock = threading.RLock()
        self.cash = Decimal(cash)
        self.prices = {k: Decimal(v) for k, v in (prices or {}).items()}
        self.default_price = Decimal(default_price)
        # None: orders rest (never fill); 0: filled on acceptance; >0: filled that many seconds later.
        self.fill_delay = fill_delay
        # A fraction of the quantity (e.g. "0.5"): the fill stops there, the order stays partially_filled.
        self.partial_fill = None if partial_fill is None else Decimal(partial_fill)
        self.lookup_lag = lookup_lag  # seconds an accepted order stays invisible to every GET
        self.reject_symbols: dict[str, str] = {}  # symbol -> "not_tradable" | "buying_power" | "not_found"
        self.cancel_leaves: str = "canceled"  # status a DELETE leaves ("pending_cancel" to keep it open)
        self._faults = _Faults()
        self._orders: dict[str, dict[str, Any]] = {}  # id -> Alpaca order JSON (insertion order)
        self._by_coid: dict[str, str] = {}  # every client order id ever used -> order id
        self._meta: dict[str, dict[str, Any]] = {}  # id -> accepted_at (monotonic), fills
        self._positions: dict[str, dict[str, Decimal]] = {}  # symbol -> qty (signed), cost (signed)
        self._requests: list[Request] = []
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> FakeAlpaca:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-alpaca", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes slow answers
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeAlpaca:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the fake first"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---------------------------------------------------------------- faults (from the test)

    def fail_next_posts(self, n: int = 1, status: int = 500) -> None:
        """The next ``n`` order POSTs get ``status`` BEFORE anything is recorded."""
        with self.lock:
            self._faults.before.extend([status] * n)

    def fail_next_posts_after_recording(self, n: int = 1, status: int = 500) -> None:
        """The next ``n`` order POSTs are recorded (the order exists), then answered ``status``."""
        with self.lock:
            self._faults.after.extend([status] * n)

    def drop_next_posts(self, n: int = 1) -> None:
        """The next ``n`` order POSTs are recorded, then the connection is closed without an answer."""
        with self.lock:
            self._faults.drop_after += n

    def slow_next_posts(self, seconds: float, n: int = 1) -> None:
        """The next ``n`` order POSTs are recorded, then answered ``seconds`` later (client timeout)."""
        with self.lock:
            self._faults.slow_after.extend([seconds] * n)

    def garble_next_posts(self, n: int = 1) -> None:
        """The next ``n`` order POSTs are recorded, then answered 200 with a body that is not JSON."""
        with self.lock:
            self._faults.garble_after += n

    def fail_next_lookups(self, n: int = 1, status: int = 500) -> None:
        """The next ``n`` GETs of one order (by id or client order id) are answered ``status``."""
        with self.lock:
            self._faults.lookups.extend([status] * n)

    def slow_next_lookups(self, seconds: float, n: int = 1) -> None:
        """The next ``n`` GETs of one order are answered ``seconds`` late (a hung venue)."""
        with self.lock:
            self._faults.slow_lookups.extend([seconds] * n)

    def clear_faults(self) -> None:
        with self.lock:
            self._faults = _Faults()

    # ---------------------------------------------------------------- inspection (from the test)

    def orders(self, client_order_id: str | None = None) -> list[dict[str, Any]]:
        """Every order the venue holds (also those still hidden by the lookup lag), oldest first."""
        with self.lock:
            self._advance()
            out = [dict(o) for o in self._orders.values()]
        if client_order_id is not None:
            out = [o for o in out if o["client_order_id"] == client_order_id]
        return out

    def order(self, client_order_id: str) -> dict[str, Any]:
        [order] = self.orders(client_order_id)
        return order

    def requests(self, method: str | None = None, path: str | None = None) -> list[Request]:
        with self.lock:
            return [r for r in self._requests if (method is None or r.method == method) and (path is None or r.path == path)]

    def posts(self) -> list[Request]:
        """Every POST /v2/orders that reached the server (whatever it was answered)."""
        return self.requests("POST", "/v2/orders")

    def position(self, symbol: str) -> Decimal:
        with self.lock:
            self._advance()
            return self._positions.get(symbol, {}).get("qty", Decimal(0))

    def cash_now(self) -> Decimal:
        with self.lock:
            self._advance()
            return self.cash

    def set_order(self, client_order_id: str, **fields: Any) -> dict[str, Any]:
        """Overwrite fields of an order (e.g. an exotic status); numbers may be given as Decimal."""
        with self.lock:
            order = self._orders[self._by_coid[client_order_id]]
            for key, value in fields.items():
                order[key] = dec_text(value) if isinstance(value, Decimal) else value
            order["updated_at"] = now_iso()
            self._meta[order["id"]]["frozen"] = True  # no lazy fill overrides what the test set
            return dict(order)

    def place(self, symbol: str, qty: str, side: str = "buy", **body: Any) -> dict[str, Any]:
        """An order placed at the venue by someone else (the UI, another bot): no request logged."""
        with self.lock:
            data = {"symbol": symbol, "qty": qty, "side": side, "type": "market", "time_in_force": "day", **body}
            return dict(self._create(data))

    # ---------------------------------------------------------------- the venue

    def price(self, symbol: str) -> Decimal:
        return self.prices.get(symbol, self.default_price)

    def _visible(self, order: dict[str, Any]) -> bool:
        return time.monotonic() >= self._meta[order["id"]]["accepted_at"] + self.lookup_lag

    def _create(self, body: dict[str, Any]) -> dict[str, Any]:
        """Validate and record an order (under the lock); raises ApiError like Alpaca would."""
        symbol = body.get("symbol")
        if not isinstance(symbol, str) or not symbol:
            raise ApiError(422, INVALID, "symbol is required")
        qty, notional = _number(body, "qty"), _number(body, "notional")
        if qty is None and notional is None:
            raise ApiError(422, INVALID, "qty or notional is required")
        if qty is not None and notional is not None:
            raise ApiError(422, INVALID, "only one of qty or notional may be specified")
        amount = qty if qty is not None else notional
        assert amount is not None
        if amount <= 0:
            raise ApiError(422, INVALID, f"{'qty' if qty is not None else 'notional'} must be > 0")
        if qty is not None and -qty.as_tuple().exponent > 9:  # type: ignore[operator]
            raise ApiError(422, INVALID, "qty must have at most 9 decimal places")
        side = body.get("side")
        if side not in ("buy", "sell"):
            raise ApiError(422, INVALID, "invalid side" if side else "side is required")
        otype = body.get("type", body.get("order_type"))
        if otype not in ORDER_TYPES:
            raise ApiError(422, INVALID, "invalid order type" if otype else "type is required")
        tif = body.get("time_in_force")
        if tif not in TIFS:
            raise ApiError(422, INVALID, "invalid time_in_force" if tif else "time_in_force is required")
        limit, stop = _number(body, "limit_price"), _number(body, "stop_price")
        if otype in ("limit", "stop_limit") and limit is None:
            raise ApiError(422, INVALID, "limit_price is required")
        if otype in ("stop", "stop_limit") and stop is None:
            raise ApiError(422, INVALID, "stop_price is required")
        if otype in ("market", "stop") and limit is not None:
            raise ApiError(422, INVALID, f"limit_price must not be given for {otype} orders")
        if otype in ("market", "limit") and stop is not None:
            raise ApiError(422, INVALID, f"stop_price must not be given for {otype} orders")
        for name, price in (("limit_price", limit), ("stop_price", stop)):
            if price is not None and price <= 0:
                raise ApiError(422, INVALID, f"{name} must be > 0")
        fractional = notional is not None or (qty is not None and qty != qty.to_integral_value())
        if fractional and tif != "day":
            raise ApiError(422, INVALID, "fractional orders must be DAY orders")
        if fractional and otype not in ("market", "limit"):
            raise ApiError(422, INVALID, "fractional orders must be market or limit orders")
        coid = body.get("client_order_id")
        if coid is None or coid == "":
            coid = str(uuid.uuid4())
        if not isinstance(coid, str) or len(coid) > 128:
            raise ApiError(422, INVALID, "client_order_id must be no more than 128 characters")
        if coid in self._by_coid:  # forever: Alpaca's dedupe is permanent
            raise ApiError(422, INVALID, "client_order_id must be unique")
        refused = self.reject_symbols.get(symbol)
        if refused == "not_found":
            raise ApiError(422, INVALID, f"asset {symbol!r} not found")
        if refused == "not_tradable":
            raise ApiError(422, UNPROCESSABLE, f'asset "{symbol}" is not tradable')
        price = self.price(symbol)
        if side == "buy":
            cost = notional if notional is not None else (qty or Decimal(0)) * max(price, limit or price)
            if refused == "buying_power" or cost > self.cash:
                raise ApiError(403, FORBIDDEN, "insufficient buying power")
        held = self._positions.get(symbol, {}).get("qty", Decimal(0))
        position_intent = (
            ("buy_to_close" if held < 0 else "buy_to_open") if side == "buy"
            else ("sell_to_close" if held > 0 else "sell_to_open")
        )
        stamp = now_iso()
        oid = str(uuid.uuid4())
        order: dict[str, Any] = {
            "id": oid, "client_order_id": coid, "created_at": stamp, "updated_at": stamp, "submitted_at": stamp,
            "filled_at": None, "expired_at": None, "canceled_at": None, "failed_at": None, "replaced_at": None,
            "replaced_by": None, "replaces": None, "asset_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"alpaca:{symbol}")),
            "symbol": symbol, "asset_class": "us_equity", "notional": dec_text(notional), "qty": dec_text(qty),
            "filled_qty": "0", "filled_avg_price": None, "order_class": "simple", "order_type": otype, "type": otype,
            "side": side, "position_intent": position_intent, "time_in_force": tif,
            "limit_price": dec_text(limit), "stop_price": dec_text(stop), "status": "accepted",
            "extended_hours": bool(body.get("extended_hours", False)), "legs": None, "trail_percent": None,
            "trail_price": None, "hwm": None, "subtag": None, "source": None, "expires_at": None,
        }
        self._orders[oid] = order
        self._by_coid[coid] = oid
        self._meta[oid] = {"accepted_at": time.monotonic(), "frozen": False, "seen": False}
        if self.fill_delay == 0:
            self._try_fill(order)
        return order

    def _advance(self) -> None:
        """Apply what time has done since the last request: acks become new, due orders fill."""
        now = time.monotonic()
        for order in self._orders.values():
            meta = self._meta[order["id"]]
            if meta["frozen"] or order["status"] not in ("accepted", "new"):
                continue
            if order["status"] == "accepted" and meta["seen"]:
                order["status"] = "new"
                order["updated_at"] = now_iso()
            meta["seen"] = True
            if self.fill_delay is not None and now >= meta["accepted_at"] + self.fill_delay:
                self._try_fill(order)

    def _try_fill(self, order: dict[str, Any]) -> None:
        if order["qty"] is None:  # notional orders: accepted, never filled here
            return
        symbol, side = order["symbol"], order["side"]
        price = self.price(symbol)
        limit = None if order["limit_price"] is None else Decimal(order["limit_price"])
        stop = None if order["stop_price"] is None else Decimal(order["stop_price"])
        if stop is not None and not (price >= stop if side == "buy" else price <= stop):
            return  # stop not triggered at the current price
        if limit is not None and not (price <= limit if side == "buy" else price >= limit):
            return  # not marketable: rests
        qty = Decimal(order["qty"])
        fill = qty if self.partial_fill is None else qty * self.partial_fill
        signed = fill if side == "buy" else -fill
        self.cash -= signed * price
        pos = self._positions.setdefault(symbol, {"qty": Decimal(0), "cost": Decimal(0)})
        old = pos["qty"]
        new = old + signed
        if old == 0 or (old > 0) == (signed > 0):  # opening or adding: average in
            pos["cost"] += signed * price
        elif new == 0 or (new > 0) == (old > 0):  # reducing: keep the average entry price
            pos["cost"] = pos["cost"] * new / old
        else:  # flipped through zero: the rest opens at this price
            pos["cost"] = new * price
        pos["qty"] = new
        if new == 0:
            del self._positions[symbol]
        stamp = now_iso()
        order.update(
            filled_qty=dec_text(fill), filled_avg_price=dec_text(price), updated_at=stamp,
            status="filled" if fill == qty else "partially_filled",
        )
        if fill == qty:
            order["filled_at"] = stamp

    def _cancel(self, order: dict[str, Any]) -> None:
        if order["status"] not in OPEN_STATUSES or order["status"] == "pending_cancel":
            raise ApiError(422, UNPROCESSABLE, f"order is not cancelable (status {order['status']})")
        stamp = now_iso()
        order["status"] = self.cancel_leaves
        order["updated_at"] = stamp
        if self.cancel_leaves == "canceled":
            order["canceled_at"] = stamp
        self._meta[order["id"]]["frozen"] = True

    def _position_json(self, symbol: str, pos: dict[str, Decimal]) -> dict[str, Any]:
        qty, cost = pos["qty"], pos["cost"]
        price = self.price(symbol)
        market = qty * price
        avg = abs(cost / qty)
        pl = market - cost
        return {
            "asset_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"alpaca:{symbol}")), "symbol": symbol,
            "exchange": "NASDAQ", "asset_class": "us_equity", "asset_marginable": True,
            "avg_entry_price": dec_text(avg), "qty": dec_text(qty), "qty_available": dec_text(qty),
            "side": "long" if qty > 0 else "short", "market_value": dec_text(market),
            "cost_basis": dec_text(cost), "unrealized_pl": dec_text(pl),
            "unrealized_plpc": dec_text((pl / abs(cost)).quantize(Decimal("0.0000001")) if cost else Decimal(0)),
            "unrealized_intraday_pl": dec_text(pl),
            "unrealized_intraday_plpc": dec_text((pl / abs(cost)).quantize(Decimal("0.0000001")) if cost else Decimal(0)),
            "current_price": dec_text(price), "lastday_price": dec_text(price), "change_today": "0",
        }

    def _account_json(self) -> dict[str, Any]:
        long = sum((p["qty"] * self.price(s) for s, p in self._positions.items() if p["qty"] > 0), Decimal(0))
        short = sum((p["qty"] * self.price(s) for s, p in self._positions.items() if p["qty"] < 0), Decimal(0))
        equity = self.cash + long + short
        return {
            "id": ACCOUNT_ID, "account_number": self.account_number, "status": "ACTIVE", "crypto_status": "ACTIVE",
            "currency": "USD", "buying_power": dec_text(self.cash), "regt_buying_power": dec_text(self.cash),
            "daytrading_buying_power": "0", "non_marginable_buying_power": dec_text(self.cash),
            "options_buying_power": dec_text(self.cash), "cash": dec_text(self.cash), "accrued_fees": "0",
            "pending_transfer_in": "0", "portfolio_value": dec_text(equity), "pattern_day_trader": False,
            "trading_blocked": False, "transfers_blocked": False, "account_blocked": False,
            "created_at": "2024-01-02T14:30:00.000000Z", "trade_suspended_by_user": False, "multiplier": "1",
            "shorting_enabled": True, "equity": dec_text(equity), "last_equity": dec_text(equity),
            "long_market_value": dec_text(long), "short_market_value": dec_text(short), "initial_margin": "0",
            "maintenance_margin": "0", "last_maintenance_margin": "0", "sma": "0", "daytrade_count": 0,
            "options_approved_level": 0, "options_trading_level": 0,
        }

    # ---------------------------------------------------------------- HTTP dispatch

    def handle(self, handler: _Handler, method: str) -> None:
        parts = urlsplit(handler.path)
        path = parts.path
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        body: Any = None
        if raw:
            try:
                body = json.loads(raw, parse_float=Decimal)
            except ValueError:
                body = _BadJson(raw)
        with self.lock:
            self._requests.append(Request(method, path, query, None if isinstance(body, _BadJson) else body))
        try:
            if (handler.headers.get("APCA-API-KEY-ID"), handler.headers.get("APCA-API-SECRET-KEY")) != (
                self.api_key, self.secret_key,
            ):
                raise ApiError(401, UNAUTHORIZED, "request is not authorized")
            if method == "POST" and path == "/v2/orders":
                self._post_order(handler, body)
                return
            if method == "GET" and (path == "/v2/orders:by_client_order_id" or path.startswith("/v2/orders/")):
                with self.lock:
                    late = self._faults.slow_lookups.popleft() if self._faults.slow_lookups else None
                if late is not None:
                    self._stop.wait(late)
            status, payload = self._route(method, path, query)
        except ApiError as err:
            content_type, data = err.body()
            handler.answer(err.status, data, content_type)
            return
        handler.answer(status, b"" if payload is None else json.dumps(payload).encode())

    def _post_order(self, handler: _Handler, body: Any) -> None:
        with self.lock:
            before = self._faults.before.popleft() if self._faults.before else None
        if before is not None:
            raise http_fault(before)
        if isinstance(body, _BadJson) or not isinstance(body, dict):
            raise ApiError(400, INVALID, "request body format is invalid")
        with self.lock:
            self._advance()
            order = dict(self._create(body))
            after = self._faults.after.popleft() if self._faults.after else None
            drop = after is None and self._faults.drop_after > 0
            if drop:
                self._faults.drop_after -= 1
            slow = self._faults.slow_after.popleft() if after is None and not drop and self._faults.slow_after else None
            garble = after is None and not drop and slow is None and self._faults.garble_after > 0
            if garble:
                self._faults.garble_after -= 1
        if after is not None:
            raise http_fault(after)
        if drop:
            handler.drop()
            return
        if garble:
            handler.answer(200, b'{"id": "' + order["id"].encode() + b'", "status": "acc', "application/json")
            return
        if slow is not None:
            self._stop.wait(slow)
        handler.answer(200, json.dumps(order).encode())

    def _route(self, method: str, path: str, query: dict[str, str]) -> tuple[int, Any]:
        with self.lock:
            one_order = method == "GET" and (path == "/v2/orders:by_client_order_id" or path.startswith("/v2/orders/"))
            if one_order and self._faults.lookups:
                raise http_fault(self._faults.lookups.popleft())
            self._advance()
            if method == "GET" and path == "/v2/orders:by_client_order_id":
                coid = query.get("client_order_id", "")
                oid = self._by_coid.get(coid)
                if oid is None or not self._visible(self._orders[oid]):
                    raise ApiError(404, NOT_FOUND, "order not found")
                return 200, self._orders[oid]
            if method == "GET" and path == "/v2/orders":
                return 200, self._list_orders(query)
            if method == "DELETE" and path == "/v2/orders":
                out = []
                for order in self._orders.values():
                    if self._visible(order) and order["status"] in OPEN_STATUSES and order["status"] != "pending_cancel":
                        self._cancel(order)
                        out.append({"id": order["id"], "status": 200, "body": order})
                return 207, out
            if path.startswith("/v2/orders/"):
                oid = path.removeprefix("/v2/orders/")
                order = self._orders.get(oid)
                if order is None or not self._visible(order):
                    raise ApiError(404, NOT_FOUND, f"order not found for {oid}")
                if method == "GET":
                    return 200, order
                if method == "DELETE":
                    self._cancel(order)
                    return 204, None
            if method == "GET" and path == "/v2/positions":
                return 200, [self._position_json(s, p) for s, p in sorted(self._positions.items())]
            if method == "GET" and path.startswith("/v2/positions/"):
                symbol = path.removeprefix("/v2/positions/")
                if symbol not in self._positions:
                    raise ApiError(404, NOT_FOUND, "position does not exist")
                return 200, self._position_json(symbol, self._positions[symbol])
            if method == "GET" and path == "/v2/account":
                return 200, self._account_json()
        # An unknown route: Alpaca answers with the same code as "order not found" (seen e.g. in
        # github.com/alpacahq/Alpaca-API/issues/137), so only the message tells them apart.
        raise ApiError(404, NOT_FOUND, "endpoint not found")

    def _list_orders(self, query: dict[str, str]) -> list[dict[str, Any]]:
        status = query.get("status", "open")
        if status not in ("open", "closed", "all"):
            raise ApiError(422, INVALID, "invalid status")
        try:
            limit = int(query.get("limit", "50"))
        except ValueError:
            raise ApiError(422, INVALID, "invalid limit") from None
        if not 1 <= limit <= 500:
            raise ApiError(422, INVALID, "limit must be between 1 and 500")
        symbols = set(filter(None, query.get("symbols", "").split(",")))
        side = query.get("side")
        out = [
            o for o in self._orders.values()
            if self._visible(o)
            and (status == "all" or (o["status"] in OPEN_STATUSES) == (status == "open"))
            and (not symbols or o["symbol"] in symbols)
            and (side is None or o["side"] == side)
        ]
        if query.get("direction", "desc") == "desc":
            out.reverse()
        return out[:limit]


class _BadJson:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw


def _number(body: dict[str, Any], key: str) -> Decimal | None:
    """A number field of an order body (Alpaca takes JSON numbers or strings)."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise ApiError(422, INVALID, f"invalid {key}")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise ApiError(422, INVALID, f"invalid {key}") from None
    if not number.is_finite():
        raise ApiError(422, INVALID, f"invalid {key}")
    return number


class _Handler(BaseHTTPRequestHandler):
    fake: FakeAlpaca
    protocol_version = "HTTP/1.1"  # keep-alive, like the real API behind its load balancer
    server_version = "fake-alpaca/1.0"

    def do_GET(self) -> None:
        self.fake.handle(self, "GET")

    def do_POST(self) -> None:
        self.fake.handle(self, "POST")

    def do_DELETE(self) -> None:
        self.fake.handle(self, "DELETE")

    def do_PATCH(self) -> None:
        self.fake.handle(self, "PATCH")

    def answer(self, status: int, data: bytes, content_type: str = "application/json") -> None:
        try:
            self.send_response(status)
            if status != 204:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # the client gave up (timed out) before the answer: nothing to do
            self.close_connection = True

    def drop(self) -> None:
        """Close the connection without a byte of answer (a reset between venue and client)."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return
