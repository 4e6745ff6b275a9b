"""CcxtBroker end to end: the real ccxt library, over real HTTP, against a local Binance.

``fake_binance.FakeBinance`` serves Binance's SPOT REST API v3 order endpoints on 127.0.0.1 (a
daemon thread of this process); ``CcxtBroker(url=fake.url)`` points ccxt's spot endpoints at it.
Nothing is mocked: what the fake's order book and request log hold is what ccxt sent, so every
test counts orders and POSTs at the venue, not just return values.

Brokers here are opened with ``sandbox=True`` (name ``binance-testnet``); the live name with a
``url=`` is covered by its own tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from orderguard import (
    AmbiguousOutcome,
    BlockReason,
    ConfigurationError,
    DuplicateClientOrderId,
    Ever,
    Guard,
    OncePer,
    OrderIntent,
    OrderRejected,
    Outcome,
    State,
    SubmitResult,
    _crash,
)
from orderguard.brokers import OrderRequest, OrderStatus, Position, VenueDedupe
from orderguard.halts import HaltCause
from orderguard.policies import scope_text
from tests.helpers import unavailable

from . import venue_child
from .fake_binance import API_KEY, API_SECRET, FakeBinance, VenueOrder

try:
    import ccxt
except ImportError:  # pragma: no cover - the ccxt extra is missing
    unavailable("ccxt is not installed: the CcxtBroker tests need pip install 'orderguard[ccxt]'", module=True)

from orderguard.brokers.ccxt import CcxtBroker, order_status
from orderguard.brokers.spec import BrokerSpecError, open_broker

ROOT = Path(__file__).resolve().parents[2]
SPAWN = mp.get_context("spawn")
POLICY = OncePer(Ever())
SYMBOL = "BTC/USDT"
GRACE = 0.2  # reconcile(grace=...) and the brokers' lookup_grace: the fake has no lag unless asked
STALE = 0.3
CHILD_TIMEOUT = 60.0
INTENT = {"account": "main", "strategy": "btc-momentum", "symbol": SYMBOL, "side": "BUY", "quantity": "0.01"}


def crypto_intent(**overrides: Any) -> OrderIntent:
    fields: dict[str, Any] = dict(INTENT)
    fields.update(overrides)
    return OrderIntent(**fields)


def request(
    coid: str, *, symbol: str = SYMBOL, side: str = "BUY", quantity: str = "0.01", order_type: str = "MARKET",
    limit_price: str | None = None, stop_price: str | None = None, tif: str = "GTC", account: str = "main",
) -> OrderRequest:
    return OrderRequest(
        client_order_id=coid, account=account, symbol=symbol, side=side, quantity=Decimal(quantity),
        order_type=order_type, limit_price=None if limit_price is None else Decimal(limit_price),
        stop_price=None if stop_price is None else Decimal(stop_price), time_in_force=tif,
    )


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def fake() -> Iterator[FakeBinance]:
    with FakeBinance() as venue:
        yield venue


@pytest.fixture
def open_ccxt(fake: FakeBinance) -> Iterator[Callable[..., CcxtBroker]]:
    """CcxtBrokers on the fake (closed at the end)."""
    opened: list[CcxtBroker] = []

    def _open(venue: FakeBinance | None = None, **options: Any) -> CcxtBroker:
        settings: dict[str, Any] = {
            "sandbox": True, "url": (venue or fake).url, "timeout": 2.0, "lookup_grace": GRACE,
            "symbols": ("BTC/USDT", "ETH/USDT"),
        }
        settings.update(options)
        broker = CcxtBroker("binance", settings.pop("api_key", API_KEY), settings.pop("secret", API_SECRET), **settings)
        opened.append(broker)
        return broker

    yield _open
    for broker in opened:
        broker.close()


@pytest.fixture
def broker(open_ccxt: Callable[..., CcxtBroker]) -> CcxtBroker:
    return open_ccxt()


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BINANCE_API_KEY", API_KEY)
    monkeypatch.setenv("BINANCE_API_SECRET", API_SECRET)


def raw_exchange(fake: FakeBinance, secret: str = API_SECRET, key: str = API_KEY) -> Any:
    """Plain ccxt, configured by hand, on the fake."""
    ex = ccxt.binance({"apiKey": key, "secret": secret, "options": {
        "defaultType": "spot", "fetchMarkets": {"types": ["spot"]}, "fetchCurrencies": False, "fetchMargins": False,
    }})
    ex.urls["api"]["public"] = ex.urls["api"]["private"] = fake.url + "/api/v3"
    return ex


# ------------------------------------------------------------------------------- checks


def only_order(fake: FakeBinance) -> VenueOrder:
    orders = fake.orders()
    assert len(orders) == 1, f"the venue holds {len(orders)} orders: {orders}"
    return orders[0]


def assert_agrees(guard: Guard, fake: FakeBinance) -> None:
    """Every intent's ledger row matches the venue's order under its client order id."""
    for rec in guard.intents():
        venue = fake.orders(rec.client_order_id)
        assert len(venue) <= 1, f"{rec.client_order_id} was placed {len(venue)} times"
        if not venue:
            assert rec.state in (State.NOT_FOUND, State.ABANDONED, State.REJECTED), (rec.client_order_id, rec.state)
            assert rec.released
            continue
        order = venue[0]
        assert rec.state is order_status(order.status, order.executed).state, (rec.client_order_id, rec.state, order)
        assert rec.filled_quantity == order.executed
        assert rec.broker_order_id == str(order.order_id)


def post_ids(fake: FakeBinance) -> list[str | None]:
    return [p.params.get("newClientOrderId") for p in fake.posts()]


def lookups(fake: FakeBinance, coid: str) -> list[Any]:
    return [r for r in fake.calls("GET", "/api/v3/order") if r.params.get("origClientOrderId") == coid]


# ============================================================= 1. the fake, with raw ccxt


def test_fake_speaks_binance_to_plain_ccxt(fake: FakeBinance) -> None:
    ex = raw_exchange(fake)
    ex.load_markets()
    assert [(r.method, r.path) for r in fake.requests] == [("GET", "/api/v3/exchangeInfo")]
    market = ex.market("BTC/USDT")
    assert (market["id"], market["spot"], market["active"]) == ("BTCUSDT", True, True)
    assert market["precision"]["amount"] == 0.00001 and market["precision"]["price"] == 0.01
    assert market["limits"]["cost"]["min"] == 5

    filled = ex.create_order("BTC/USDT", "market", "buy", 0.01, None, {"clientOrderId": "raw-1"})
    assert (filled["clientOrderId"], filled["status"], filled["filled"], filled["average"]) == ("raw-1", "closed", 0.01, 50000)
    assert filled["info"]["fills"] == [{"price": "50000.00000000", "qty": "0.01000000", "commission": "0.00000000",
                                        "commissionAsset": "BTC", "tradeId": filled["info"]["fills"][0]["tradeId"]}]
    resting = ex.create_order("BTC/USDT", "limit", "buy", 0.01, 40000, {"clientOrderId": "raw-2"})
    assert resting["status"] == "open" and resting["info"]["status"] == "NEW"

    # OPEN-ORDERS-ONLY dedupe: refused while open, accepted again once closed.
    with pytest.raises(ccxt.InvalidOrder, match=r"-2010.*Duplicate order sent"):
        ex.create_order("BTC/USDT", "limit", "buy", 0.01, 40000, {"clientOrderId": "raw-2"})
    again = ex.create_order("BTC/USDT", "market", "buy", 0.01, None, {"clientOrderId": "raw-1"})
    assert again["id"] != filled["id"]
    assert [o.client_order_id for o in fake.orders()] == ["raw-1", "raw-2", "raw-1"]
    latest = ex.fetch_order(None, "BTC/USDT", {"origClientOrderId": "raw-1"})
    assert latest["id"] == again["id"]  # the latest order under a reused id

    assert [o["clientOrderId"] for o in ex.fetch_open_orders("BTC/USDT")] == ["raw-2"]
    balance = ex.fetch_balance()
    assert (balance["BTC"]["total"], balance["USDT"]["free"], balance["USDT"]["used"]) == (0.02, 98600.0, 400.0)
    assert ex.cancel_order(None, "BTC/USDT", {"origClientOrderId": "raw-2"})["status"] == "canceled"
    assert fake.balance("USDT") == (Decimal(99000), Decimal(0))

    with pytest.raises(ccxt.OrderNotFound, match="-2011"):
        ex.cancel_order(None, "BTC/USDT", {"origClientOrderId": "raw-2"})
    with pytest.raises(ccxt.OrderNotFound, match="-2013"):
        ex.fetch_order(None, "BTC/USDT", {"origClientOrderId": "nope"})
    with pytest.raises(ccxt.InvalidOrder, match="LOT_SIZE"):
        ex.private_post_order({"symbol": "BTCUSDT", "side": "BUY", "type": "MARKET", "quantity": "0.000015"})
    with pytest.raises(ccxt.InvalidOrder, match="PRICE_FILTER"):
        ex.private_post_order({"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC",
                               "quantity": "0.01", "price": "40000.005"})
    with pytest.raises(ccxt.BadRequest, match="NOTIONAL"):
        ex.create_order("BTC/USDT", "market", "buy", 0.00001)
    with pytest.raises(ccxt.InsufficientFunds):
        ex.create_order("BTC/USDT", "market", "buy", 10)
    with pytest.raises(ccxt.AuthenticationError, match="-1022"):
        raw_exchange(fake, secret="not-the-secret").fetch_balance()
    with pytest.raises(ccxt.AuthenticationError, match="-2015"):
        raw_exchange(fake, key="not-the-key").fetch_balance()
    # Without a client order id ccxt makes up a fresh one per call (DESIGN: always pass the claim's).
    auto = [ex.create_order("BTC/USDT", "market", "buy", 0.01)["clientOrderId"] for _ in range(2)]
    assert auto[0] != auto[1] and all(a.startswith("x-") for a in auto)
    assert [o.client_order_id for o in fake.orders()][-2:] == auto
    assert all(p.params.get("signature") and p.api_key == API_KEY for p in fake.posts())


def test_fake_faults_reach_ccxt_as_binance_would_send_them(fake: FakeBinance) -> None:
    ex = raw_exchange(fake)
    ex.load_markets()

    def place(coid: str) -> type[Exception]:
        with pytest.raises(Exception) as caught:
            ex.create_order("BTC/USDT", "market", "buy", 0.01, None, {"clientOrderId": coid})
        return type(caught.value)

    fake.fail_next_posts(status=503)
    assert issubclass(place("f-before"), ccxt.ExchangeNotAvailable)
    fake.fail_next_posts(status=500, after_record=True, code=-1007, msg="Timeout waiting for response from backend server. "
                         "Send status unknown; execution status unknown.")
    assert issubclass(place("f-1007"), ccxt.RequestTimeout)
    fake.fail_next_posts(status=429, code=-1003, msg="Too many requests.")
    assert issubclass(place("f-429"), ccxt.DDoSProtection)
    fake.drop_next_posts()
    assert issubclass(place("f-drop"), ccxt.NetworkError)
    ex.timeout = 300
    fake.slow_next_posts(seconds=0.8)
    assert issubclass(place("f-slow"), ccxt.RequestTimeout)
    assert [o.client_order_id for o in fake.orders()] == ["f-1007", "f-drop", "f-slow"]
    assert post_ids(fake) == ["f-before", "f-1007", "f-429", "f-drop", "f-slow"]  # no ccxt retries

    fake.lookup_lag = 0.3
    ex.timeout = 5000
    lagging = ex.create_order("BTC/USDT", "market", "buy", 0.01, None, {"clientOrderId": "f-lag"})
    with pytest.raises(ccxt.OrderNotFound, match="-2013"):
        ex.fetch_order(None, "BTC/USDT", {"origClientOrderId": "f-lag"})
    time.sleep(0.35)
    assert ex.fetch_order(None, "BTC/USDT", {"origClientOrderId": "f-lag"})["id"] == lagging["id"]


# ======================================================== 2. submits through the guard


@dataclass(frozen=True)
class Trade:
    kind: str
    side: str
    limit: str | None  # resting limit price (the market is at 50000)
    cross: str | None  # price that makes the limit fill
    fill_price: Decimal


TRADES = {
    "market-buy": Trade("MARKET", "BUY", None, None, Decimal(50000)),
    "market-sell": Trade("MARKET", "SELL", None, None, Decimal(50000)),
    "limit-buy": Trade("LIMIT", "BUY", "49000.5", "48999.99", Decimal("49000.5")),
    "limit-sell": Trade("LIMIT", "SELL", "51000.25", "51000.25", Decimal("51000.25")),
}


@pytest.mark.parametrize("name", list(TRADES))
def test_submit_sends_the_claims_id_and_records_what_binance_says(name: str, guard: Guard,
                                                                  open_ccxt: Callable[..., CcxtBroker]) -> None:
    trade = TRADES[name]
    with FakeBinance(balances={"BTC": "1"}) as fake:
        broker = open_ccxt(fake, symbols=())
        extra: dict[str, Any] = {"order_type": trade.kind, "side": trade.side}
        if trade.limit:
            extra.update(limit_price=trade.limit, time_in_force="GTC")
        result = guard.submit(crypto_intent(**extra), broker, policy=POLICY)
        assert result.outcome is Outcome.SENT, result.message
        order = only_order(fake)
        (post,) = fake.posts()
        assert post.api_key == API_KEY
        assert post.params["newClientOrderId"] == result.client_order_id == order.client_order_id
        assert (post.params["symbol"], post.params["side"], post.params["type"], post.params["quantity"]) == (
            "BTCUSDT", trade.side, trade.kind, "0.01")
        assert post.params.get("price") == trade.limit
        assert post.params.get("timeInForce") == ("GTC" if trade.limit else None)
        rec = guard.intent(result.intent.id)  # type: ignore[union-attr]
        assert rec.broker_order_id == str(order.order_id)
        if trade.limit:
            assert (rec.state, order.status) == (State.ACKED, "NEW")
            fake.set_price("BTCUSDT", trade.cross)  # type: ignore[arg-type]
            report = guard.reconcile(broker, grace=GRACE, stale_after=STALE, halt_on_drift=False)
            assert [d.after for d in report.decisions] == [State.FILLED], report.lines()
            rec = guard.intent(rec.id)
        assert rec.state is State.FILLED
        assert rec.filled_quantity == Decimal("0.01")
        assert rec.average_price == trade.fill_price
        notional = Decimal("0.01") * trade.fill_price
        btc, usdt = fake.balance("BTC"), fake.balance("USDT")
        if trade.side == "BUY":
            assert (btc, usdt) == ((Decimal("1.01"), 0), (Decimal(100000) - notional, 0))
        else:
            assert (btc, usdt) == ((Decimal("0.99"), 0), (Decimal(100000) + notional, 0))
        assert len(fake.posts()) == 1
        assert_agrees(guard, fake)


def test_decimal_amounts_arrive_and_come_back_exact(guard: Guard, broker: CcxtBroker, fake: FakeBinance) -> None:
    fake.set_price("ETHUSDT", "3123.47")
    fake.set_price("BTCUSDT", "50000.01")
    eth = guard.submit(crypto_intent(symbol="ETH/USDT", quantity="0.1237"), broker, policy=POLICY)
    btc = guard.submit(crypto_intent(quantity="0.00123", strategy="btc-2"), broker, policy=POLICY)
    assert [p.params["quantity"] for p in fake.posts()] == ["0.1237", "0.00123"]
    for result, qty, price in ((eth, "0.1237", "3123.47"), (btc, "0.00123", "50000.01")):
        rec = guard.intent(result.intent.id)  # type: ignore[union-attr]
        assert rec.state is State.FILLED
        assert rec.filled_quantity == Decimal(qty) and rec.quantity == Decimal(qty)
        assert rec.average_price == Decimal(price)
        assert isinstance(rec.average_price, Decimal)
    assert fake.balance("USDT")[0] == Decimal(100000) - Decimal("0.1237") * Decimal("3123.47") - Decimal("0.00123") * Decimal("50000.01")
    assert_agrees(guard, fake)


@pytest.mark.parametrize(
    ("why", "overrides"),
    [
        ("quantity finer than stepSize", {"quantity": "0.000015"}),
        ("quantity below one step", {"quantity": "0.000001"}),
        ("price finer than tickSize", {"order_type": "LIMIT", "limit_price": "49000.005", "time_in_force": "GTC"}),
        ("LIMIT DAY", {"order_type": "LIMIT", "limit_price": "49000", "time_in_force": "DAY"}),
        ("LIMIT OPG", {"order_type": "LIMIT", "limit_price": "49000", "time_in_force": "OPG"}),
        ("STOP", {"order_type": "STOP", "stop_price": "49000"}),
        ("STOP_LIMIT", {"order_type": "STOP_LIMIT", "stop_price": "49000", "limit_price": "48900", "time_in_force": "GTC"}),
        ("unknown market", {"symbol": "DOGE/USDT", "quantity": "100"}),
        ("other account", {"account": "other"}),
    ],
)
def test_orders_binance_cannot_take_exactly_are_not_sent(why: str, overrides: dict[str, str], guard: Guard,
                                                          broker: CcxtBroker, fake: FakeBinance) -> None:
    result = guard.submit(crypto_intent(**overrides), broker, policy=POLICY)
    assert result.outcome is Outcome.NOT_SENT, (why, result.message)
    assert result.state is State.ABANDONED
    assert fake.posts() == [] and fake.orders() == []
    assert guard.intent(result.intent.id).released  # type: ignore[union-attr]
    # The scope is free: the corrected order goes out.
    fixed = guard.submit(crypto_intent(), broker, policy=POLICY)
    assert fixed.outcome is Outcome.SENT and fixed.state is State.FILLED, fixed.message
    assert len(fake.posts()) == 1 and only_order(fake).client_order_id == fixed.client_order_id


@pytest.mark.parametrize(
    ("why", "overrides", "arm"),
    [
        ("NOTIONAL filter", {"quantity": "0.00001"}, None),
        ("insufficient balance", {"quantity": "10"}, None),
        ("429 -1003", {}, {"status": 429, "code": -1003, "msg": "Too many requests."}),
    ],
)
def test_definite_refusals_are_rejected_and_free_the_scope(why: str, overrides: dict[str, str], arm: dict[str, Any] | None,
                                                            guard: Guard, broker: CcxtBroker, fake: FakeBinance) -> None:
    if arm:
        fake.fail_next_posts(**arm)
    result = guard.submit(crypto_intent(**overrides), broker, policy=POLICY)
    assert result.outcome is Outcome.SENT and result.state is State.REJECTED, (why, result.message)
    assert len(fake.posts()) == 1 and fake.orders() == []
    retry = guard.submit(crypto_intent(), broker, policy=POLICY)
    assert retry.state is State.FILLED, retry.message
    assert len(fake.posts()) == 2 and only_order(fake).client_order_id == retry.client_order_id
    assert_agrees(guard, fake)


def test_ioc_that_cannot_fill_expires(guard: Guard, broker: CcxtBroker, fake: FakeBinance) -> None:
    result = guard.submit(crypto_intent(order_type="LIMIT", limit_price="49000", time_in_force="IOC"), broker, policy=POLICY)
    assert result.state is State.EXPIRED, result.message
    assert only_order(fake).status == "EXPIRED"
    assert fake.posts()[0].params["timeInForce"] == "IOC"
    assert fake.balance("USDT") == (Decimal(100000), Decimal(0))
    assert_agrees(guard, fake)


def test_partial_fill_then_the_rest_while_waiting_for_the_fill(guard: Guard, broker: CcxtBroker, fake: FakeBinance) -> None:
    fake.fill_delay, fake.partial_fills = 0.4, True
    result = guard.submit(crypto_intent(), broker, policy=POLICY, wait_for_fill=3.0)
    assert result.order is not None
    rec = guard.intent(result.intent.id)  # type: ignore[union-attr]
    assert rec.state is State.FILLED, rec
    assert rec.filled_quantity == Decimal("0.01")
    order = only_order(fake)
    assert [f["qty"] for f in order.fills] == ["0.00500000", "0.00500000"]
    assert len(fake.posts()) == 1
    assert_agrees(guard, fake)


@pytest.mark.parametrize(
    ("raw", "executed", "expected"),
    [
        ("NEW", "0", OrderStatus.ACCEPTED),
        ("NEW", "0.004", OrderStatus.PARTIALLY_FILLED),
        ("PENDING_NEW", "0", OrderStatus.ACCEPTED),
        ("PENDING_CANCEL", "0", OrderStatus.ACCEPTED),
        ("PENDING_CANCEL", "0.004", OrderStatus.PARTIALLY_FILLED),
        ("PARTIALLY_FILLED", "0.004", OrderStatus.PARTIALLY_FILLED),
        ("FILLED", "0.01", OrderStatus.FILLED),
        ("CANCELED", "0.004", OrderStatus.CANCELED),
        ("REJECTED", "0", OrderStatus.REJECTED),
        ("EXPIRED", "0", OrderStatus.EXPIRED),
        ("EXPIRED_IN_MATCH", "0", OrderStatus.EXPIRED),
        ("SOMETHING_NEW", "0", OrderStatus.ACCEPTED),
        ("SOMETHING_NEW", "0.004", OrderStatus.PARTIALLY_FILLED),
    ],
)
def test_binance_statuses_map(raw: str, executed: str, expected: OrderStatus, broker: CcxtBroker, fake: FakeBinance,
                              caplog: pytest.LogCaptureFixture) -> None:
    placed = broker.submit(request("og-status-1", order_type="LIMIT", limit_price="40000"))
    assert placed.status is OrderStatus.ACCEPTED
    fake.set_status("og-status-1", raw, executed=executed)
    with caplog.at_level(logging.WARNING, logger="orderguard"):
        seen = broker.lookup("og-status-1", symbol=SYMBOL)
    assert seen is not None
    assert seen.status is expected
    assert seen.filled_quantity == Decimal(executed)
    assert (seen.broker_order_id, seen.side, seen.quantity, seen.account, seen.symbol) == (
        placed.broker_order_id, "BUY", Decimal("0.01"), "main", SYMBOL)
    warned = [r for r in caplog.records if "SOMETHING_NEW" in r.getMessage()]
    assert bool(warned) == (raw == "SOMETHING_NEW")


def test_cancel_and_what_a_closed_id_means_at_binance(open_ccxt: Callable[..., CcxtBroker], fake: FakeBinance) -> None:
    broker = open_ccxt()
    req = request("og-cancel-1", order_type="LIMIT", limit_price="40000")
    assert broker.submit(req).status is OrderStatus.ACCEPTED
    assert fake.balance("USDT") == (Decimal(99600), Decimal(400))
    canceled = broker.cancel("og-cancel-1", symbol=SYMBOL)
    assert canceled.status is OrderStatus.CANCELED
    assert fake.balance("USDT") == (Decimal(100000), Decimal(0))
    assert broker.cancel("og-cancel-1", symbol=SYMBOL).status is OrderStatus.CANCELED  # already closed: no DELETE
    assert len(fake.calls("DELETE", "/api/v3/order")) == 1
    with pytest.raises(OrderRejected):
        broker.cancel("og-never-sent", symbol=SYMBOL)

    # The broker that sent it looks it up before any resend: the canceled order comes back.
    again = broker.submit(req)
    assert again.status is OrderStatus.CANCELED and again.broker_order_id == canceled.broker_order_id
    assert len(fake.posts()) == 1
    # Binance itself would take the id again once the order is closed: OPEN_ORDERS_ONLY.
    assert broker.dedupe is VenueDedupe.OPEN_ORDERS_ONLY
    other = open_ccxt()
    assert other.submit(req).status is OrderStatus.ACCEPTED
    assert [o.status for o in fake.orders("og-cancel-1")] == ["CANCELED", "NEW"]


# =========================================================== 3. ambiguous outcomes


def test_5xx_before_the_order_is_recorded_is_unknown_then_not_found(guard: Guard, broker: CcxtBroker,
                                                                   fake: FakeBinance) -> None:
    fake.fail_next_posts(status=500)
    first = guard.submit(crypto_intent(), broker, policy=POLICY)
    assert first.outcome is Outcome.SENT and first.state is State.UNKNOWN, first.message
    assert len(fake.posts()) == 1 and fake.orders() == []
    blocked = guard.submit(crypto_intent(), broker, policy=POLICY)
    assert blocked.reason is BlockReason.UNKNOWN_PENDING, blocked.message

    started = time.time()
    report = guard.reconcile(broker, grace=GRACE, stale_after=STALE)
    coid = first.client_order_id
    assert coid is not None
    rec = guard.intent(coid)
    assert rec.state is State.NOT_FOUND, report.lines()
    assert rec.released
    seen = lookups(fake, coid)
    assert len(seen) == 2 and seen[1].at - started >= GRACE * 0.95  # "not found" twice, grace apart

    retry = guard.submit(crypto_intent(), broker, policy=POLICY)
    assert retry.outcome is Outcome.SENT and retry.state is State.FILLED, retry.message
    assert retry.client_order_id != coid
    assert post_ids(fake) == [coid, retry.client_order_id]
    assert only_order(fake).client_order_id == retry.client_order_id
    assert_agrees(guard, fake)


AFTER_RECORD = {
    "500-html": lambda f: f.fail_next_posts(status=500, after_record=True),
    "503-1007": lambda f: f.fail_next_posts(
        status=503, after_record=True, code=-1007,
        msg="Timeout waiting for response from backend server. Send status unknown; execution status unknown."),
    "502-1006": lambda f: f.fail_next_posts(
        status=502, after_record=True, code=-1006,
        msg="An unexpected response was received from the message bus. Execution status unknown."),
    "500-2010-body": lambda f: f.fail_next_posts(
        status=500, after_record=True, code=-2010, msg="Account has insufficient balance for requested action."),
    "dropped": lambda f: f.drop_next_posts(),
    "slow": lambda f: f.slow_next_posts(seconds=1.2),
}


@pytest.mark.parametrize("fault", list(AFTER_RECORD))
def test_lost_answer_after_the_order_is_recorded_is_unknown_until_reconciled(
    fault: str, guard: Guard, open_ccxt: Callable[..., CcxtBroker], fake: FakeBinance,
) -> None:
    broker = open_ccxt(timeout=0.5)
    AFTER_RECORD[fault](fake)
    first = guard.submit(crypto_intent(), broker, policy=POLICY)
    assert first.outcome is Outcome.SENT and first.state is State.UNKNOWN, first.message
    order = only_order(fake)
    assert order.client_order_id == first.client_order_id and order.status == "FILLED"
    assert post_ids(fake) == [first.client_order_id]  # exactly one POST: no SDK retry

    blocked = guard.submit(crypto_intent(), broker, policy=POLICY)
    assert blocked.reason is BlockReason.UNKNOWN_PENDING, blocked.message
    report = guard.reconcile(broker, grace=GRACE, stale_after=STALE)
    assert report.clean, report.lines()
    rec = guard.intent(first.intent.id)  # type: ignore[union-attr]
    assert rec.state is State.FILLED
    assert rec.broker_order_id == str(order.order_id)
    assert rec.filled_quantity == Decimal("0.01") and rec.average_price == Decimal(50000)

    retry = guard.submit(crypto_intent(), broker, policy=POLICY)
    assert retry.outcome is Outcome.BLOCKED and retry.reason is BlockReason.DUPLICATE, retry.message
    assert len(fake.posts()) == 1
    only_order(fake)
    assert_agrees(guard, fake)


def test_lookup_lag_within_grace_is_not_declared_not_found(guard: Guard, open_ccxt: Callable[..., CcxtBroker],
                                                           fake: FakeBinance) -> None:
    lag = 0.6
    broker = open_ccxt(lookup_grace=lag + 0.2)
    fake.lookup_lag = lag
    fake.fail_next_posts(status=500, after_record=True)
    first = guard.submit(crypto_intent(), broker, policy=POLICY)
    assert first.state is State.UNKNOWN
    coid = first.client_order_id
    assert coid is not None
    assert broker.lookup(coid, symbol=SYMBOL) is None  # Binance does not show it yet

    # A run that does not wait records the miss and decides nothing.
    early = guard.reconcile(broker, wait=False)
    assert early.decisions == [] and guard.intent(coid).state is State.UNKNOWN, early.lines()
    # The default grace is the broker's lookup_grace (>= the lag): the order shows up in time.
    report = guard.reconcile(broker, stale_after=STALE)
    rec = guard.intent(coid)
    assert rec.state is State.FILLED, report.lines()
    assert not rec.released
    assert len(lookups(fake, coid)) >= 3
    assert guard.submit(crypto_intent(), broker, policy=POLICY).reason is BlockReason.DUPLICATE
    assert len(fake.posts()) == 1
    assert_agrees(guard, fake)


def test_lookup_raises_rather_than_saying_not_found(broker: CcxtBroker, fake: FakeBinance,
                                                    open_ccxt: Callable[..., CcxtBroker]) -> None:
    assert broker.lookup("og-unknown-1", symbol=SYMBOL) is None  # Binance's definite -2013
    with pytest.raises(ConfigurationError, match="symbol"):
        broker.lookup("og-unknown-1")
    with pytest.raises(Exception) as bad_key:
        open_ccxt(secret="not-the-secret").lookup("og-unknown-1", symbol=SYMBOL)
    assert "-1022" in str(bad_key.value)
    fake.stop()
    with pytest.raises(Exception):  # any error, never None
        broker.lookup("og-unknown-1", symbol=SYMBOL)


# ============================================================ 4. the resend rule


def test_resend_after_a_dropped_answer_looks_up_and_does_not_post(broker: CcxtBroker, fake: FakeBinance) -> None:
    req = request("og-resend-1")
    fake.drop_next_posts()
    with pytest.raises(AmbiguousOutcome):
        broker.submit(req)
    assert len(fake.posts()) == 1
    again = broker.submit(req)
    assert again.status is OrderStatus.FILLED  # the first order, filled meanwhile
    assert again.broker_order_id == str(only_order(fake).order_id)
    assert len(fake.posts()) == 1, "a resend of an id Binance has must not POST"
    assert len(lookups(fake, "og-resend-1")) == 1
    # Once more, with the order long closed (Binance would take the id again): still no POST.
    assert broker.submit(req).broker_order_id == again.broker_order_id
    assert len(fake.posts()) == 1 and len(fake.orders()) == 1


def test_resend_after_a_lost_request_sends_only_after_two_lookups(broker: CcxtBroker, fake: FakeBinance) -> None:
    req = request("og-resend-2")
    fake.drop_next_posts(after_record=False)
    with pytest.raises(AmbiguousOutcome):
        broker.submit(req)
    assert fake.orders() == []
    placed = broker.submit(req)
    assert placed.status is OrderStatus.FILLED
    seen = lookups(fake, "og-resend-2")
    assert len(seen) == 2 and seen[1].at - seen[0].at >= GRACE * 0.9
    assert post_ids(fake) == ["og-resend-2", "og-resend-2"]
    assert fake.posts()[1].at > seen[1].at
    only_order(fake)


def test_resend_waits_out_the_lookup_lag(open_ccxt: Callable[..., CcxtBroker], fake: FakeBinance) -> None:
    broker = open_ccxt(lookup_grace=0.5)
    fake.lookup_lag = 0.3
    fake.drop_next_posts()
    with pytest.raises(AmbiguousOutcome):
        broker.submit(request("og-resend-3"))
    assert broker.submit(request("og-resend-3")).status is OrderStatus.FILLED
    assert len(fake.posts()) == 1 and len(fake.orders()) == 1


def test_duplicate_order_sent_means_an_open_order_has_the_id(open_ccxt: Callable[..., CcxtBroker],
                                                             fake: FakeBinance) -> None:
    req = request("og-dup-1", order_type="LIMIT", limit_price="40000")
    first = open_ccxt()
    assert first.submit(req).status is OrderStatus.ACCEPTED
    assert first.submit(req).status is OrderStatus.ACCEPTED  # looked up, not sent
    assert len(fake.posts()) == 1
    stranger = open_ccxt()  # another process: it never sent the id, so it posts
    with pytest.raises(DuplicateClientOrderId, match="og-dup-1"):
        stranger.submit(req)
    assert len(fake.posts()) == 2
    assert len(fake.orders()) == 1


def test_restored_ledger_reusing_an_open_orders_id_records_it_and_halts(
    tmp_path: Path, open_ccxt: Callable[..., CcxtBroker], fake: FakeBinance,
) -> None:
    path = tmp_path / "restored.db"
    url = f"sqlite:///{path}"
    Guard.open(url, synchronous="NORMAL").close()
    backup = tmp_path / "backup.db"
    shutil.copy(path, backup)
    intent = crypto_intent(order_type="LIMIT", limit_price="40000", time_in_force="GTC")
    with Guard.open(url, synchronous="NORMAL") as before:
        first = before.submit(intent, open_ccxt(), policy=POLICY)
    assert first.state is State.ACKED
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, path)  # the ledger from before the claim, same namespace

    with Guard.open(url, synchronous="NORMAL") as after:
        second = after.submit(intent, open_ccxt(), policy=POLICY)  # a restarted process
        assert second.client_order_id == first.client_order_id
        assert second.state is State.ACKED, second.message
        assert second.intent is not None
        assert second.intent.broker_order_id == str(only_order(fake).order_id)
        halts = [h for h in after.halts() if h.cause is HaltCause.DUPLICATE_CLIENT_ID]
        assert [h.scope for h in halts] == ["strategy=btc-momentum"]
    assert len(fake.posts()) == 2
    assert len(fake.orders()) == 1


@pytest.mark.slow
def test_resend_after_a_timeout_while_the_first_post_is_still_on_its_way(open_ccxt: Callable[..., CcxtBroker],
                                                                         fake: FakeBinance) -> None:
    broker = open_ccxt(timeout=0.5)
    req = request("og-inflight-1")
    fake.delay_next_posts(seconds=1.5)  # reaches Binance 1.5 s late, well within recvWindow
    with pytest.raises(AmbiguousOutcome):
        broker.submit(req)  # read timeout after 0.5 s
    with contextlib.suppress(AmbiguousOutcome):
        broker.submit(req)  # the caller retries the same client order id
    time.sleep(1.3)  # the first POST lands
    assert len(fake.orders("og-inflight-1")) == 1, f"{len(fake.orders())} orders for one client order id"


def test_concurrent_submit_while_the_first_post_is_on_its_way(broker: CcxtBroker, fake: FakeBinance) -> None:
    req = request("og-inflight-2")
    broker.lookup("og-warm-up", symbol=SYMBOL)  # markets loaded before
    fake.delay_next_posts(seconds=1.0)
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(broker.submit, req)
        time.sleep(0.1)
        second = pool.submit(broker.submit, req)
        for done in (first, second):
            with contextlib.suppress(Exception):
                done.result(timeout=10)
    assert len(fake.orders("og-inflight-2")) == 1, f"{len(fake.orders())} orders for one client order id"


def test_resend_while_the_answer_is_slow_finds_the_order(open_ccxt: Callable[..., CcxtBroker], fake: FakeBinance) -> None:
    broker = open_ccxt(timeout=0.5)
    req = request("og-slow-answer-1")
    fake.slow_next_posts(seconds=1.0)  # at Binance at once, the answer comes after the client gave up
    with pytest.raises(AmbiguousOutcome):
        broker.submit(req)
    assert broker.submit(req).status is OrderStatus.FILLED
    assert len(fake.posts()) == 1 and len(fake.orders()) == 1


# ===================================================== 5. positions, cash and drift


def test_positions_and_cash_agree_with_the_ledger(guard: Guard, broker: CcxtBroker, fake: FakeBinance) -> None:
    guard.submit(crypto_intent(), broker, policy=POLICY)
    guard.submit(crypto_intent(symbol="ETH/USDT", quantity="0.1", strategy="eth"), broker, policy=POLICY)
    guard.submit(crypto_intent(strategy="rest", order_type="LIMIT", limit_price="40000", time_in_force="GTC"),
                 broker, policy=POLICY)
    assert broker.positions() == [Position("main", "BTC/USDT", Decimal("0.01")), Position("main", "ETH/USDT", Decimal("0.1"))]
    assert broker.positions("someone-else") == []
    cash = broker.account("main")
    assert cash.account == "main"
    assert cash.cash == Decimal(100000) - 500 - 300  # the resting order's 400 is locked, still cash
    report = guard.reconcile(broker, grace=GRACE, stale_after=STALE)
    assert report.clean and not report.drift and report.drift_error is None, report.lines()

    # An order placed outside orderguard shows as drift, and halts that account and symbol.
    raw_exchange(fake).create_order("BTC/USDT", "market", "buy", 0.02, None, {"clientOrderId": "manual-1"})
    drifted = guard.reconcile(broker, grace=GRACE, stale_after=STALE)
    assert [(d.symbol, d.ledger, d.broker) for d in drifted.drift] == [("BTC/USDT", Decimal("0.01"), Decimal("0.03"))]
    assert [h.scope for h in drifted.halts] == [scope_text(account="main", symbol="BTC/USDT")]


def test_without_symbols_reconcile_reports_the_drift_check_failed_but_does_not_halt(
    guard: Guard, open_ccxt: Callable[..., CcxtBroker], fake: FakeBinance,
) -> None:
    broker = open_ccxt(symbols=())
    fake.fail_next_posts(status=500, after_record=True)
    first = guard.submit(crypto_intent(), broker, policy=POLICY)
    assert first.state is State.UNKNOWN
    with pytest.raises(ConfigurationError, match="symbols"):
        broker.positions()
    report = guard.reconcile(broker, grace=GRACE, stale_after=STALE)
    assert [d.after for d in report.decisions] == [State.FILLED]  # orders are still resolved
    assert report.drift_error is not None and "symbols" in report.drift_error
    assert not report.clean
    assert report.halts == [] and guard.halts() == []
    assert guard.submit(crypto_intent(strategy="next"), broker, policy=POLICY).state is State.FILLED


# ================================================================ 6. spec, keys, CLI


def test_spec_opens_a_binance_broker_with_keys_from_the_environment(keys: None, guard: Guard, fake: FakeBinance) -> None:
    spec = f"ccxt://binance?sandbox=1&url={fake.url}&symbols=BTC/USDT,ETH/USDT&lookup_grace=0.2&timeout=3&account=main"
    broker = open_broker(spec)
    try:
        assert isinstance(broker, CcxtBroker)
        assert (broker.name, broker.dedupe, broker.lookup_grace) == ("binance-testnet", VenueDedupe.OPEN_ORDERS_ONLY, 0.2)
        result = guard.submit(crypto_intent(), broker, policy=POLICY)
        assert result.state is State.FILLED, result.message
        assert fake.posts()[0].api_key == API_KEY
        assert broker.positions() == [Position("main", "BTC/USDT", Decimal("0.01"))]
    finally:
        broker.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("missing", ["BINANCE_API_KEY", "BINANCE_API_SECRET"])
def test_spec_without_keys_names_the_variable(missing: str, keys: None, monkeypatch: pytest.MonkeyPatch,
                                              fake: FakeBinance) -> None:
    monkeypatch.delenv(missing)
    with pytest.raises(BrokerSpecError) as caught:
        open_broker(f"ccxt://binance?sandbox=1&url={fake.url}")
    assert missing in str(caught.value)
    assert API_SECRET not in str(caught.value) and API_KEY not in str(caught.value)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("ccxt://binance?url=http://example.com", "http"),
        ("ccxt://binance?url=http://10.0.0.5:8080", "http"),
        ("ccxt://binance?sandbox=maybe", "sandbox"),
        ("ccxt://binance?colour=blue", "colour"),
        ("ccxt://binance?symbols=BTCUSDT", "BTC/USDT"),
    ],
)
def test_spec_refuses_what_it_cannot_honour(spec: str, needle: str, keys: None) -> None:
    with pytest.raises(BrokerSpecError) as caught:
        open_broker(spec)
    assert needle in str(caught.value)
    assert API_SECRET not in str(caught.value)


def test_spec_refuses_other_exchanges_clearly(keys: None) -> None:
    with pytest.raises(BrokerSpecError) as caught:
        open_broker("ccxt://kraken")
    assert "binance" in str(caught.value) and "kraken" in str(caught.value)


def test_spec_refuses_other_exchanges_even_with_their_keys(keys: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KRAKEN_API_KEY", "k")
    monkeypatch.setenv("KRAKEN_API_SECRET", "s")
    with pytest.raises(BrokerSpecError, match="binance") as caught:
        open_broker("ccxt://kraken")
    assert "kraken" in str(caught.value)


def test_the_keys_never_reach_logs_errors_or_reprs(caplog: pytest.LogCaptureFixture, guard: Guard,
                                                       open_ccxt: Callable[..., CcxtBroker], fake: FakeBinance) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("orderguard", "ccxt", "ccxt.base.exchange", "urllib3", "requests"):
        caplog.set_level(logging.DEBUG, logger=name)
    wrong_secret = "wrong-secret-5f4e3d2c1b0a"
    broker = open_ccxt()
    texts = [repr(broker), str(broker)]
    guard.submit(crypto_intent(), broker, policy=POLICY)
    fake.fail_next_posts(status=500, after_record=True)
    guard.submit(crypto_intent(strategy="b"), broker, policy=POLICY)
    guard.reconcile(broker, grace=GRACE, stale_after=STALE)
    broker.positions()
    broker.account("main")
    bad = open_ccxt(secret=wrong_secret)
    texts += [repr(bad)]
    rejected = guard.submit(crypto_intent(strategy="c"), bad, policy=POLICY)
    assert rejected.state is State.REJECTED and "-1022" in rejected.message
    texts.append(rejected.message)
    for call in (lambda: bad.submit(request("og-secret-1")), lambda: bad.lookup("x", symbol=SYMBOL),
                 bad.positions, lambda: bad.account("main"), lambda: broker.account("other")):
        with pytest.raises(Exception) as caught:
            call()
        texts += [str(caught.value), repr(caught.value)]
    assert any(r.name.startswith("ccxt") for r in caplog.records), "ccxt's debug log was not captured"
    assert any("/api/v3/order" in r.getMessage() for r in caplog.records)
    everything = "\n".join([caplog.text, *texts, *(i.note or "" for i in guard.intents())])
    for secret in (API_SECRET, wrong_secret, API_KEY):  # ccxt's DEBUG request log holds the key header: masked
        assert secret not in everything
    assert "'X-MBX-APIKEY': '***'" in caplog.text


def cli(*args: str | Path) -> tuple[int, str, str]:
    from typer.testing import CliRunner

    from orderguard.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _ledger_with_an_unknown(path: Path, broker: CcxtBroker, fake: FakeBinance) -> str:
    fake.fail_next_posts(status=500, after_record=True)
    with Guard.open(f"sqlite:///{path}", synchronous="NORMAL") as guard:
        unknown = guard.submit(crypto_intent(), broker, policy=POLICY)
    assert unknown.state is State.UNKNOWN and unknown.client_order_id
    return unknown.client_order_id


def test_cli_reconcile_against_binance(keys: None, tmp_path: Path, broker: CcxtBroker, fake: FakeBinance,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORDERGUARD_STORE", raising=False)
    path = tmp_path / "cli.db"
    coid = _ledger_with_an_unknown(path, broker, fake)
    spec = f"ccxt://binance?sandbox=1&url={fake.url}&symbols=BTC/USDT"
    code, out, err = cli("reconcile", "--broker", spec, "--store", path, "--grace", "0.2")
    assert code == 0, (out, err)
    assert coid in out and "FILLED" in out
    with Guard.open(f"sqlite:///{path}") as guard:
        assert guard.intent(coid).state is State.FILLED
    assert len(fake.posts()) == 1
    assert API_SECRET not in out + err


def test_cli_reconcile_with_a_live_spec_and_url(keys: None, tmp_path: Path, broker: CcxtBroker, fake: FakeBinance,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORDERGUARD_STORE", raising=False)
    path = tmp_path / "cli.db"
    coid = _ledger_with_an_unknown(path, broker, fake)
    code, out, err = cli("reconcile", "--broker", f"ccxt://binance?url={fake.url}&symbols=BTC/USDT&timeout=2",
                         "--store", path, "--grace", "0.2")
    assert code == 0, (out, err)
    with Guard.open(f"sqlite:///{path}") as guard:
        assert guard.intent(coid).state is State.FILLED


def test_live_mode_with_url_talks_only_to_that_url(open_ccxt: Callable[..., CcxtBroker], fake: FakeBinance) -> None:
    broker = open_ccxt(sandbox=False)
    assert broker.name == "binance"
    assert broker.submit(request("og-live-1")).status is OrderStatus.FILLED
    assert [(r.method, r.path) for r in fake.requests] == [("GET", "/api/v3/exchangeInfo"), ("POST", "/api/v3/order")]


# ================================================================ 7. storms


def test_32_threads_same_intent_one_order(guard: Guard, broker: CcxtBroker, fake: FakeBinance) -> None:
    n = 32
    barrier = threading.Barrier(n)

    def attempt(_: int) -> SubmitResult:
        barrier.wait(timeout=30)
        return guard.submit(crypto_intent(), broker, policy=POLICY)

    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(attempt, range(n)))
    sent = [r for r in results if r.outcome is Outcome.SENT]
    assert len(sent) == 1, [r.message for r in sent]
    assert sent[0].state is State.FILLED
    assert all(r.outcome is Outcome.BLOCKED for r in results if r is not sent[0])
    assert post_ids(fake) == [sent[0].client_order_id]
    only_order(fake)
    assert_agrees(guard, fake)


def test_64_asyncio_tasks_same_intent_one_order(guard: Guard, broker: CcxtBroker, fake: FakeBinance) -> None:
    n = 64

    async def main() -> list[SubmitResult]:
        go = asyncio.Event()
        waiting = 0

        async def attempt() -> SubmitResult:
            nonlocal waiting
            waiting += 1
            await go.wait()
            return await guard.asubmit(crypto_intent(), broker, policy=POLICY)

        tasks = [asyncio.create_task(attempt(), name=f"task-{i}") for i in range(n)]
        while waiting < n:
            await asyncio.sleep(0)
        go.set()
        return list(await asyncio.gather(*tasks))

    results = asyncio.run(main())
    sent = [r for r in results if r.outcome is Outcome.SENT]
    assert len(sent) == 1 and sent[0].state is State.FILLED
    assert sum(r.outcome is Outcome.BLOCKED for r in results) == n - 1
    assert post_ids(fake) == [sent[0].client_order_id]
    only_order(fake)
    assert_agrees(guard, fake)


def _racer(i: int, ledger_url: str, spec: str, barrier: Any, results: Any) -> None:
    """One of N processes: its own guard and its own Binance connection, one submit at the barrier."""
    try:
        guard = Guard.open(ledger_url, runner=f"host-{i}", synchronous="NORMAL")
        broker = open_broker(spec)
        broker.lookup("og-warm-up", symbol=SYMBOL)  # markets loaded before the race
        barrier.wait(timeout=CHILD_TIMEOUT)
        result = guard.submit(crypto_intent(), broker, policy=POLICY)
        results.put({"name": f"host-{i}", "outcome": result.outcome.value, "coid": result.client_order_id,
                     "state": result.state.value if result.state else None, "pid": os.getpid()})
        guard.close()
        broker.close()  # type: ignore[attr-defined]
    except BaseException as exc:
        results.put({"name": f"host-{i}", "error": repr(exc)})
        raise


@pytest.mark.slow
def test_8_processes_same_intent_one_order(keys: None, guard: Guard, broker: CcxtBroker, fake: FakeBinance,
                                           ledger_url: str) -> None:
    n = 8
    spec = f"ccxt://binance?sandbox=1&url={fake.url}&lookup_grace={GRACE}"
    barrier = SPAWN.Barrier(n)
    results = SPAWN.Queue()
    procs = [SPAWN.Process(target=_racer, args=(i, ledger_url, spec, barrier, results), name=f"host-{i}")
             for i in range(n)]
    out = venue_child.collect(procs, results, CHILD_TIMEOUT)
    assert not [o for o in out if "error" in o], out
    sent = [o for o in out if o["outcome"] == "SENT"]
    assert len(sent) == 1, out
    assert sent[0]["state"] == "FILLED"
    assert sum(o["outcome"] == "BLOCKED" for o in out) == n - 1
    assert len({o["pid"] for o in out}) == n
    assert post_ids(fake) == [sent[0]["coid"]]
    only_order(fake)
    assert_agrees(guard, fake)
    report = guard.reconcile(broker, grace=GRACE, stale_after=STALE)
    assert report.clean and not report.decisions, report.lines()


# ================================================================ 8. kill -9

def run_child(ledger_url: str, spec: str, mode: str = "submit", crash_at: str | None = None) -> tuple[int, Any, str]:
    config = {"ledger": ledger_url, "spec": spec, "mode": mode, "intent": INTENT, "grace": GRACE, "stale_after": STALE}
    return venue_child.run(config, crash_at=crash_at, timeout=CHILD_TIMEOUT)


@pytest.mark.slow
@pytest.mark.parametrize("point", _crash.POINTS)
def test_kill9_then_reconcile_then_retry(point: str, keys: None, guard: Guard, broker: CcxtBroker, fake: FakeBinance,
                                         ledger_url: str) -> None:
    spec = f"ccxt://binance?sandbox=1&url={fake.url}&symbols=BTC/USDT&lookup_grace={GRACE}"
    if point == "after_ack_recorded":
        fake.fill_delay = 0.6  # the ack is recorded before the fill
    if point == "reconcile_after_lookup":
        fake.fail_next_posts(status=500, after_record=True)
        rc, out, err = run_child(ledger_url, spec)
        assert rc == 0, err
        assert out["outcome"] == "SENT" and out["state"] == "UNKNOWN", out
        rc, out, err = run_child(ledger_url, spec, "reconcile", crash_at=point)
    else:
        rc, out, err = run_child(ledger_url, spec, crash_at=point)
    assert rc == -signal.SIGKILL, (rc, out, err)
    assert out is None

    (before,) = guard.intents()
    assert before.state is {
        "after_claim_commit": State.SENDING, "after_send": State.SENDING,
        "after_ack_recorded": State.ACKED, "reconcile_after_lookup": State.UNKNOWN,
    }[point]
    sent = point != "after_claim_commit"
    assert len(fake.orders()) == (1 if sent else 0)
    if point == "after_ack_recorded":
        deadline = time.monotonic() + 10
        while only_order(fake).status != "FILLED":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    while guard.store.now() - before.created_at <= STALE:
        time.sleep(0.02)

    report = guard.reconcile(broker, grace=GRACE, stale_after=STALE)
    assert report.clean, report.lines()
    after = guard.intent(before.id)
    assert after.fence > before.fence
    if sent:
        order = only_order(fake)
        assert order.client_order_id == before.client_order_id and order.status == "FILLED"
        assert after.state is State.FILLED and after.filled_quantity == Decimal("0.01")
    else:
        assert fake.orders() == []
        assert after.state is State.NOT_FOUND and after.released
    assert_agrees(guard, fake)

    retry = guard.submit(crypto_intent(), broker, policy=POLICY)
    if sent:
        assert retry.outcome is Outcome.BLOCKED and retry.reason is BlockReason.DUPLICATE, retry.message
        assert retry.holder is not None and retry.holder.id == before.id
        assert post_ids(fake) == [before.client_order_id]
    else:
        assert retry.outcome is Outcome.SENT and retry.state is State.FILLED, retry.message
        assert retry.client_order_id != before.client_order_id
        assert post_ids(fake) == [retry.client_order_id]
    only_order(fake)
    assert_agrees(guard, fake)
    assert broker.positions() == [Position("main", "BTC/USDT", Decimal("0.01"))]
    assert guard.store.filled_positions() == {("main", "BTC/USDT"): Decimal("0.01")}



# ============================================= 9. classification of Binance's error codes


@pytest.mark.parametrize(("status", "code", "msg", "expected"), [
    (400, -1021, "Timestamp for this request is outside of the recvWindow.", OrderRejected),
    (429, -1015, "Too many new orders; current limit is 50 orders per 10 SECOND.", OrderRejected),
    (429, -1003, "Too much request weight used.", OrderRejected),
    (400, -2010, "Account has insufficient balance for requested action.", OrderRejected),
    (400, -2010, "Duplicate order sent.", DuplicateClientOrderId),
    (400, -1000, "An unknown error occured while processing the request.", AmbiguousOutcome),
    (400, -1001, "Internal error; unable to process your request. Please try again.", AmbiguousOutcome),
    (408, -1007, "Timeout waiting for response from backend server. Send status unknown; execution status unknown.",
     AmbiguousOutcome),
    (400, -1006, "An unexpected response was received from the message bus. Execution status unknown.", AmbiguousOutcome),
    (400, -9999, "A code nobody mapped yet.", AmbiguousOutcome),  # plain ccxt.ExchangeError: unknown
])
def test_binance_4xx_codes_are_classified_as_the_spot_table_says(
    broker: CcxtBroker, fake: FakeBinance, status: int, code: int, msg: str, expected: type[Exception],
) -> None:
    broker.lookup("og-warm-up", symbol=SYMBOL)  # markets loaded
    fake.fail_next_posts(status=status, code=code, msg=msg)
    with pytest.raises(expected) as caught:
        broker.submit(request(f"og-code{-code}-{status}"))
    assert type(caught.value) is expected, caught.value
    assert len(fake.posts()) == 1 and fake.orders() == []


def test_markets_that_cannot_be_loaded_mean_nothing_was_sent(fake: FakeBinance, tmp_path: Path) -> None:
    dead = CcxtBroker("binance", API_KEY, API_SECRET, url="http://127.0.0.1:9", timeout=1.0)  # nothing listens
    with Guard.open(f"sqlite:///{tmp_path / 'l.db'}", synchronous="NORMAL") as guard:
        result = guard.submit(crypto_intent(), dead, policy=POLICY)
        assert result.outcome is Outcome.NOT_SENT and result.state is State.ABANDONED, result.message
        assert "could not load the markets" in result.message
    dead.close()


def test_keys_do_not_show_in_vars(broker: CcxtBroker) -> None:
    assert API_SECRET not in repr(vars(broker)) and API_KEY not in repr(vars(broker))
