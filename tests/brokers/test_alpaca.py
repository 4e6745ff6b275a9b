"""AlpacaBroker end to end: the real alpaca-py SDK, real HTTP, a local Alpaca (``fake_alpaca``).

Nothing is mocked: the adapter's ``TradingClient`` talks over sockets to ``FakeAlpaca`` (a
``ThreadingHTTPServer`` in this process), and every assertion that matters counts what reached
the venue (its request log and its order book), not only what the adapter returned. Child
processes (the storm and kill -9 tests) open the broker through the ``alpaca://`` spec with the
keys in their environment, like a bot runner would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import sqlite3
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import unavailable

try:
    import alpaca  # noqa: F401
except ImportError:
    unavailable("alpaca-py is not installed: pip install 'orderguard[alpaca]'", module=True)

from alpaca.common.exceptions import APIError
from alpaca.trading.client import TradingClient
from alpaca.trading.enums import OrderSide, QueryOrderStatus, TimeInForce
from alpaca.trading.requests import (
    GetOrdersRequest,
    LimitOrderRequest,
    MarketOrderRequest,
    StopLimitOrderRequest,
    StopOrderRequest,
)
from typer.testing import CliRunner

from orderguard import BlockReason, Ever, Guard, OncePer, Outcome, Side, State, SubmitResult, _crash
from orderguard.brokers import OrderRequest, OrderStatus, Position, VenueDedupe
from orderguard.brokers.alpaca import AlpacaBroker, order_status
from orderguard.brokers.spec import BrokerSpecError, open_broker
from orderguard.cli import app
from orderguard.errors import (
    AmbiguousOutcome,
    BrokerError,
    ConfigurationError,
    DuplicateClientOrderId,
    OrderNotSent,
    OrderRejected,
)
from tests.brokers import venue_child
from tests.brokers.fake_alpaca import FakeAlpaca
from tests.helpers import make_intent

ROOT = Path(__file__).resolve().parents[2]
PRICES = {"AAPL": "190.25", "MSFT": "410.1", "TSLA": "250"}
POLICY = OncePer(Ever())
GRACE = 0.2  # reconcile(grace=...) where the fake has no lookup lag
SPAWN = mp.get_context("spawn")
CHILD_TIMEOUT = 60.0


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture
def fake() -> Iterator[FakeAlpaca]:
    with FakeAlpaca(prices=PRICES) as venue:
        yield venue


@pytest.fixture
def opened() -> Iterator[list[AlpacaBroker]]:
    brokers: list[AlpacaBroker] = []
    yield brokers
    for b in brokers:
        b.close()


def connect(fake: FakeAlpaca, opened: list[AlpacaBroker], **options: Any) -> AlpacaBroker:
    """An AlpacaBroker on the fake (closed at the end of the test)."""
    options = {"url": fake.url, "timeout": 2.0, "lookup_grace": GRACE, **options}
    b = AlpacaBroker(fake.api_key, fake.secret_key, **options)
    opened.append(b)
    return b


@pytest.fixture
def broker(fake: FakeAlpaca, opened: list[AlpacaBroker]) -> AlpacaBroker:
    return connect(fake, opened)


@pytest.fixture
def alpaca_env(fake: FakeAlpaca, monkeypatch: pytest.MonkeyPatch) -> str:
    """The fake's keys in APCA_API_KEY_ID / APCA_API_SECRET_KEY; returns the spec of the fake."""
    monkeypatch.setenv("APCA_API_KEY_ID", fake.api_key)
    monkeypatch.setenv("APCA_API_SECRET_KEY", fake.secret_key)
    return f"alpaca://paper?url={fake.url}"


def request(
    coid: str = "og-test-1", *, symbol: str = "AAPL", side: str = "BUY", qty: str = "4", kind: str = "MARKET",
    limit: str | None = None, stop: str | None = None, tif: str = "DAY", account: str = "main",
) -> OrderRequest:
    return OrderRequest(
        coid, account, symbol, side, Decimal(qty), kind,
        None if limit is None else Decimal(limit), None if stop is None else Decimal(stop), tif,
    )


# The ledger state each status the fake produces by itself must end up as (independent of the adapter's map).
LEDGER_STATE = {
    "accepted": State.ACKED, "new": State.ACKED, "partially_filled": State.PARTIALLY_FILLED,
    "filled": State.FILLED, "canceled": State.CANCELED,
}


def lookups(fake: FakeAlpaca, coid: str) -> int:
    return sum(1 for r in fake.requests("GET", "/v2/orders:by_client_order_id") if r.query.get("client_order_id") == coid)


def assert_ledger_agrees(guard: Guard, fake: FakeAlpaca) -> None:
    """Every intent's ledger row matches the venue's order under its client order id."""
    for rec in guard.intents():
        venue = fake.orders(rec.client_order_id)
        assert len(venue) <= 1
        if not venue:
            assert rec.state in (State.NOT_FOUND, State.ABANDONED, State.REJECTED), (rec.client_order_id, rec.state)
            assert rec.released
            continue
        order = venue[0]
        assert rec.broker_order_id == order["id"]
        assert rec.filled_quantity == Decimal(order["filled_qty"])
        assert rec.state is LEDGER_STATE[order["status"]], (rec.client_order_id, rec.state, order["status"])


def assert_one_order(guard: Guard, fake: FakeAlpaca, result_coid: str | None = None) -> dict[str, Any]:
    orders = fake.orders()
    assert len(orders) == 1, f"the venue holds {len(orders)} orders for one intent: {orders}"
    [record] = guard.intents()
    order = orders[0]
    assert record.client_order_id == order["client_order_id"]
    if result_coid is not None:
        assert order["client_order_id"] == result_coid
    assert record.broker_order_id == order["id"]
    assert record.state is State.FILLED and order["status"] == "filled"
    assert record.filled_quantity == Decimal(order["filled_qty"]) == Decimal(4)
    assert record.average_price == Decimal(order["filled_avg_price"]) == Decimal("190.25")
    assert guard.store.filled_positions() == {("main", "AAPL"): Decimal(4)}
    assert fake.position("AAPL") == Decimal(4)
    return order


def assert_blocked_by(result: SubmitResult, holder_id: str, *reasons: BlockReason) -> None:
    assert result.outcome is Outcome.BLOCKED, result.message
    assert result.reason in reasons, result.message
    assert result.holder is not None and result.holder.id == holder_id


# ------------------------------------------------------------- the fake, with the raw SDK


def test_fake_answers_validate_into_alpaca_py_models(fake: FakeAlpaca) -> None:
    client = TradingClient(fake.api_key, fake.secret_key, url_override=fake.url)
    market = client.submit_order(MarketOrderRequest(
        symbol="AAPL", qty=4, side=OrderSide.BUY, time_in_force=TimeInForce.DAY, client_order_id="raw-1"))
    assert (market.client_order_id, market.status.value, market.qty, market.filled_qty) == ("raw-1", "filled", "4", "4")
    assert market.filled_avg_price == "190.25" and market.order_class.value == "simple"
    limit = client.submit_order(LimitOrderRequest(
        symbol="MSFT", qty=0.5, limit_price=400.5, side=OrderSide.BUY, time_in_force=TimeInForce.DAY))
    assert limit.status.value == "accepted" and limit.limit_price == "400.5" and len(limit.client_order_id) == 36
    stop = client.submit_order(StopOrderRequest(
        symbol="AAPL", qty=1, stop_price=150, side=OrderSide.SELL, time_in_force=TimeInForce.GTC))
    stop_limit = client.submit_order(StopLimitOrderRequest(
        symbol="AAPL", qty=1, stop_price=200, limit_price=201, side=OrderSide.BUY, time_in_force=TimeInForce.GTC))
    assert stop.stop_price == "150" and (stop_limit.stop_price, stop_limit.limit_price) == ("200", "201")

    assert client.get_order_by_client_id("raw-1").id == market.id
    assert client.get_order_by_id(limit.id).status.value == "new"  # acked, then working
    assert {o.id for o in client.get_orders(GetOrdersRequest(status=QueryOrderStatus.OPEN))} == {limit.id, stop.id, stop_limit.id}
    assert [o.id for o in client.get_orders(GetOrdersRequest(status=QueryOrderStatus.CLOSED))] == [market.id]
    assert len(client.get_orders(GetOrdersRequest(status=QueryOrderStatus.ALL))) == 4
    client.cancel_order_by_id(limit.id)
    assert client.get_order_by_id(limit.id).status.value == "canceled"
    with pytest.raises(APIError) as not_cancelable:
        client.cancel_order_by_id(limit.id)
    assert not_cancelable.value.status_code == 422
    with pytest.raises(APIError) as missing:
        client.get_order_by_client_id("nope")
    assert (missing.value.status_code, missing.value.code, missing.value.message) == (404, 40410000, "order not found")

    [position] = client.get_all_positions()
    assert (position.symbol, position.qty, position.side.value, position.avg_entry_price) == ("AAPL", "4", "long", "190.25")
    account = client.get_account()
    assert account.cash == "99239" and account.equity == "100000" and account.status.value == "ACTIVE"


def test_fake_keeps_client_order_ids_forever_and_validates_like_alpaca(fake: FakeAlpaca) -> None:
    client = TradingClient(fake.api_key, fake.secret_key, url_override=fake.url)
    order = client.submit_order(LimitOrderRequest(
        symbol="AAPL", qty=1, limit_price=100, side=OrderSide.BUY, time_in_force=TimeInForce.DAY, client_order_id="x-1"))
    client.cancel_order_by_id(order.id)
    with pytest.raises(APIError) as dup:  # canceled, yet the id stays taken
        client.submit_order(MarketOrderRequest(
            symbol="AAPL", qty=1, side=OrderSide.BUY, time_in_force=TimeInForce.DAY, client_order_id="x-1"))
    assert (dup.value.status_code, dup.value.code, dup.value.message) == (422, 40010001, "client_order_id must be unique")

    bad = [
        ({"qty": "1", "side": "buy", "type": "market", "time_in_force": "day"}, "symbol is required"),
        ({"symbol": "AAPL", "side": "buy", "type": "market", "time_in_force": "day"}, "qty or notional is required"),
        ({"symbol": "AAPL", "qty": "1", "side": "hold", "type": "market", "time_in_force": "day"}, "invalid side"),
        ({"symbol": "AAPL", "qty": "1", "side": "buy", "type": "limit", "time_in_force": "day"}, "limit_price is required"),
        ({"symbol": "AAPL", "qty": "0.5", "side": "buy", "type": "market", "time_in_force": "gtc"}, "fractional orders must be DAY orders"),
        ({"symbol": "AAPL", "qty": "1", "side": "buy", "type": "market", "time_in_force": "day", "client_order_id": "x" * 129},
         "client_order_id must be no more than 128 characters"),
        ({"symbol": "AAPL", "qty": "1000", "side": "buy", "type": "market", "time_in_force": "day"}, "insufficient buying power"),
    ]
    for body, message in bad:
        with pytest.raises(APIError) as refused:
            client.post("/orders", body)
        assert refused.value.message == message, body
        assert refused.value.status_code == (403 if "buying power" in message else 422)
    fake.reject_symbols["GME"] = "not_tradable"
    with pytest.raises(APIError, match="not tradable"):
        client.post("/orders", {"symbol": "GME", "qty": "1", "side": "buy", "type": "market", "time_in_force": "day"})
    assert [o["client_order_id"] for o in fake.orders()] == ["x-1"]

    stranger = TradingClient(fake.api_key, "not-the-secret", url_override=fake.url)
    with pytest.raises(APIError) as denied:
        stranger.get_account()
    assert (denied.value.status_code, denied.value.code) == (401, 40110000)


def test_raw_sdk_resends_a_post_after_504_so_the_count_below_can_fail(fake: FakeAlpaca) -> None:
    """The control for every "exactly one POST" assertion: alpaca-py's default client resends."""
    client = TradingClient(fake.api_key, fake.secret_key, url_override=fake.url)
    client._retry_wait = 0  # its default 3 s pause changes nothing but the run time
    fake.fail_next_posts_after_recording(1, 504)
    with pytest.raises(APIError) as dup:
        client.submit_order(MarketOrderRequest(
            symbol="AAPL", qty=1, side=OrderSide.BUY, time_in_force=TimeInForce.DAY, client_order_id="raw-504"))
    # The first POST placed the order; the SDK's silent resend met Alpaca's permanent dedupe.
    assert dup.value.message == "client_order_id must be unique"
    assert len(fake.posts()) == 2 and len(fake.orders()) == 1


# ------------------------------------------------------------------------- submit


@pytest.mark.parametrize(
    ("kind", "limit", "stop", "side", "qty", "expected"),
    [
        ("MARKET", None, None, "BUY", "4", OrderStatus.FILLED),
        ("LIMIT", "180.5", None, "BUY", "4", OrderStatus.ACCEPTED),  # below the price: rests
        ("STOP", None, "150.25", "SELL", "2", OrderStatus.ACCEPTED),  # not triggered
        ("STOP_LIMIT", "201.5", "200.75", "BUY", "3", OrderStatus.ACCEPTED),
    ],
)
def test_submit_each_order_type_once_under_the_claims_id(
    fake: FakeAlpaca, broker: AlpacaBroker, kind: str, limit: str | None, stop: str | None, side: str, qty: str,
    expected: OrderStatus,
) -> None:
    placed = broker.submit(request("og-abc-1", kind=kind, limit=limit, stop=stop, side=side, qty=qty, tif="GTC"))
    [post] = fake.posts()
    body = post.body
    assert body["client_order_id"] == "og-abc-1"
    assert (body["symbol"], body["side"], body["type"], body["time_in_force"]) == ("AAPL", side.lower(), kind.lower(), "gtc")
    assert Decimal(str(body["qty"])) == Decimal(qty) and "notional" not in body
    for name, value in (("limit_price", limit), ("stop_price", stop)):
        assert (name in body) == (value is not None)
        if value is not None:
            assert Decimal(str(body[name])) == Decimal(value)
    order = fake.order("og-abc-1")
    assert (order["type"], order["limit_price"], order["stop_price"]) == (kind.lower(), limit, stop)
    assert placed.client_order_id == "og-abc-1" and placed.broker_order_id == order["id"]
    assert (placed.status, placed.account, placed.symbol, placed.side) == (expected, "main", "AAPL", side)
    assert placed.quantity == Decimal(qty)
    if expected is OrderStatus.FILLED:
        assert placed.filled_quantity == Decimal(qty) and placed.average_price == Decimal("190.25")
    else:
        assert placed.filled_quantity == 0 and placed.average_price is None
    assert [(r.method, r.path) for r in fake.requests()] == [("POST", "/v2/orders")]


def test_every_time_in_force_reaches_alpaca(fake: FakeAlpaca, broker: AlpacaBroker) -> None:
    for i, tif in enumerate(("DAY", "GTC", "IOC", "FOK", "OPG", "CLS")):
        broker.submit(request(f"og-tif-{i}", kind="LIMIT", limit="100", tif=tif))
    assert [p.body["time_in_force"] for p in fake.posts()] == ["day", "gtc", "ioc", "fok", "opg", "cls"]


def test_guard_submit_through_alpaca_records_the_fill(guard: Guard, fake: FakeAlpaca, broker: AlpacaBroker) -> None:
    assert broker.dedupe is VenueDedupe.PERMANENT and broker.name == "alpaca-paper"
    result = guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY)
    assert result.outcome is Outcome.SENT and result.state is State.FILLED, result.message
    assert [p.body["client_order_id"] for p in fake.posts()] == [result.client_order_id]
    assert_one_order(guard, fake, result.client_order_id)
    again = guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY)
    assert result.intent is not None
    assert_blocked_by(again, result.intent.id, BlockReason.DUPLICATE)
    assert len(fake.posts()) == 1


def test_fractional_quantity_and_prices_stay_exact(guard: Guard, fake: FakeAlpaca, broker: AlpacaBroker) -> None:
    fake.prices["MSFT"] = Decimal("410.123456789")
    result = guard.submit(make_intent(symbol="MSFT", quantity="0.125"), broker, policy=POLICY)
    assert result.state is State.FILLED, result.message
    assert result.intent is not None
    record = guard.intent(result.intent.id)
    assert record.filled_quantity == Decimal("0.125")
    assert record.average_price == Decimal("410.123456789")
    order = fake.order(record.client_order_id)
    assert order["qty"] == "0.125" and order["filled_avg_price"] == "410.123456789"
    assert broker.positions() == [Position("main", "MSFT", Decimal("0.125"))]
    assert broker.account("main").cash == Decimal("100000") - Decimal("0.125") * Decimal("410.123456789")

    limit = broker.submit(request("og-frac-limit", symbol="AAPL", qty="2.5", kind="LIMIT", limit="0.1"))
    assert fake.order("og-frac-limit")["limit_price"] == "0.1" and limit.quantity == Decimal("2.5")


@pytest.mark.parametrize(
    ("qty", "limit"),
    [("12345678.000000000001", None), ("123456789.123456789012", None), ("4", "1234567.000000000001")],
)
def test_amount_that_cannot_pass_through_a_float_is_not_sent(
    guard: Guard, fake: FakeAlpaca, broker: AlpacaBroker, qty: str, limit: str | None,
) -> None:
    with pytest.raises(OrderNotSent, match="nothing was sent"):
        broker.submit(request("og-inexact", qty=qty, kind="LIMIT" if limit else "MARKET", limit=limit))
    intent = make_intent(symbol="AAPL", quantity=qty, **({"order_type": "LIMIT", "limit_price": limit} if limit else {}))
    result = guard.submit(intent, broker, policy=POLICY)
    assert result.outcome is Outcome.NOT_SENT, result.message
    assert result.state is State.ABANDONED and result.intent is not None and guard.intent(result.intent.id).released
    assert fake.requests() == []  # not a byte reached the venue


def test_order_for_another_account_is_not_sent(fake: FakeAlpaca, broker: AlpacaBroker) -> None:
    with pytest.raises(OrderNotSent, match="account"):
        broker.submit(request("og-acct", account="other"))
    assert fake.requests() == []


def test_unsupported_time_in_force_is_order_not_sent(fake: FakeAlpaca, broker: AlpacaBroker) -> None:
    with pytest.raises(OrderNotSent):
        broker.submit(request("og-gtd", tif="GTD"))
    assert fake.requests() == []


def test_order_past_its_send_deadline_is_not_sent(fake: FakeAlpaca, broker: AlpacaBroker) -> None:
    from orderguard.errors import SendDeadlineExceeded

    late = OrderRequest("og-late", "main", "AAPL", "BUY", Decimal(4), "MARKET", None, None, "DAY", send_by=time.monotonic() - 1)
    with pytest.raises(SendDeadlineExceeded):
        broker.submit(late)
    assert fake.requests() == []


# ------------------------------------------------------------------- status mapping

OPEN_STATUSES = (
    "new", "accepted", "pending_new", "accepted_for_bidding", "held", "pending_cancel", "pending_replace",
    "stopped", "suspended", "done_for_day", "calculated",
)
STATUS_CASES = [
    *[(s, "0", OrderStatus.ACCEPTED) for s in OPEN_STATUSES],
    *[(s, "1.5", OrderStatus.PARTIALLY_FILLED) for s in OPEN_STATUSES],
    ("partially_filled", "1.5", OrderStatus.PARTIALLY_FILLED),
    ("filled", "4", OrderStatus.FILLED),
    ("calculated", "4", OrderStatus.FILLED),
    ("canceled", "0", OrderStatus.CANCELED),
    ("canceled", "1.5", OrderStatus.CANCELED),
    ("replaced", "0", OrderStatus.ACCEPTED),  # replaced outside orderguard: held until an operator resolves it
    ("expired", "1.5", OrderStatus.EXPIRED),
    ("rejected", "0", OrderStatus.REJECTED),
]


@pytest.mark.parametrize(("status", "filled", "expected"), STATUS_CASES)
def test_alpaca_statuses_map(fake: FakeAlpaca, broker: AlpacaBroker, status: str, filled: str, expected: OrderStatus) -> None:
    broker.submit(request("og-status", kind="LIMIT", limit="100"))  # rests
    price = "99.987654321" if filled != "0" else None
    fake.set_order("og-status", status=status, filled_qty=filled, filled_avg_price=price)
    seen = broker.lookup("og-status", symbol="AAPL")
    assert seen is not None
    assert seen.status is expected
    assert seen.filled_quantity == Decimal(filled) and seen.quantity == Decimal(4)
    assert seen.average_price == (None if price is None else Decimal(price))


def test_unknown_alpaca_status_stays_open_with_a_warning(
    fake: FakeAlpaca, broker: AlpacaBroker, caplog: pytest.LogCaptureFixture,
) -> None:
    broker.submit(request("og-odd", kind="LIMIT", limit="100"))
    fake.set_order("og-odd", status="pending_settlement")
    with caplog.at_level(logging.WARNING, logger="orderguard"):
        seen = broker.lookup("og-odd", symbol="AAPL")
    assert seen is not None and seen.status is OrderStatus.ACCEPTED
    assert "pending_settlement" in caplog.text


def test_order_status_function_keeps_unknown_statuses_open(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="orderguard"):
        assert order_status("brand_new_status", Decimal(4), Decimal(0)) is OrderStatus.ACCEPTED
        assert order_status("brand_new_status", Decimal(4), Decimal(1)) is OrderStatus.PARTIALLY_FILLED
    assert "brand_new_status" in caplog.text


# -------------------------------------------------------------------- lookup & cancel


def test_lookup_is_none_only_on_alpacas_order_not_found(fake: FakeAlpaca, broker: AlpacaBroker, opened: list[AlpacaBroker]) -> None:
    assert broker.lookup("og-never", symbol="AAPL") is None
    assert lookups(fake, "og-never") == 1
    broker.submit(request("og-there"))
    fake.fail_next_lookups(1, 500)
    with pytest.raises(BrokerError):
        broker.lookup("og-there", symbol="AAPL")
    fake.fail_next_lookups(1, 503)
    with pytest.raises(BrokerError):
        broker.lookup("og-never", symbol="AAPL")
    fake.fail_next_lookups(1, 429)
    with pytest.raises(BrokerError):
        broker.lookup("og-never", symbol="AAPL")
    stranger = AlpacaBroker(fake.api_key, "wrong-secret-000", url=fake.url, timeout=2.0)
    opened.append(stranger)
    with pytest.raises(BrokerError, match="401"):
        stranger.lookup("og-never", symbol="AAPL")
    found = broker.lookup("og-there", symbol="AAPL")
    assert found is not None and found.status is OrderStatus.FILLED


def test_reconcile_through_a_misrouted_url_does_not_free_a_placed_order(
    guard: Guard, fake: FakeAlpaca, broker: AlpacaBroker, opened: list[AlpacaBroker],
) -> None:
    fake.fail_next_posts_after_recording(1, 504)
    lost = guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY)
    assert lost.state is State.UNKNOWN and lost.intent is not None
    # A common slip: the base url given with Alpaca's /v2 (requests then go to /v2/v2/...).
    misrouted = connect(fake, opened, url=fake.url + "/v2")
    with contextlib.suppress(BrokerError):
        assert misrouted.lookup(lost.intent.client_order_id, symbol="AAPL") is not None
    guard.reconcile(misrouted, grace=GRACE, stale_after=0)
    assert guard.intent(lost.intent.id).state is State.UNKNOWN  # still held: nothing proved it absent
    assert len(fake.orders()) == 1


def test_hung_lookup_times_out_and_a_failed_lookup_proves_nothing(
    guard: Guard, fake: FakeAlpaca, opened: list[AlpacaBroker],
) -> None:
    broker = connect(fake, opened, timeout=0.5)
    fake.slow_next_lookups(2.0)
    began = time.monotonic()
    with pytest.raises(BrokerError):
        broker.lookup("og-hung", symbol="AAPL")
    assert time.monotonic() - began < 1.5  # the adapter's timeout, not the venue, ended the wait

    fake.fail_next_posts(1, 500)  # never placed
    lost = guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY)
    assert lost.state is State.UNKNOWN and lost.intent is not None
    fake.fail_next_lookups(1, 503)
    report = guard.reconcile(broker, grace=GRACE, stale_after=0)
    assert not report.clean and "lookup at alpaca-paper failed" in report.unresolved[0].why
    assert guard.intent(lost.intent.id).state is State.UNKNOWN  # not freed on a failed lookup
    assert lookups(fake, lost.intent.client_order_id) == 1
    report = guard.reconcile(broker, grace=GRACE, stale_after=0)
    assert report.clean and guard.intent(lost.intent.id).state is State.NOT_FOUND, report.lines()


def test_lookup_on_a_dead_venue_raises(opened: list[AlpacaBroker]) -> None:
    with FakeAlpaca() as gone:
        url, key, secret = gone.url, gone.api_key, gone.secret_key
    dead = AlpacaBroker(key, secret, url=url, timeout=1.0)
    opened.append(dead)
    with pytest.raises(BrokerError):
        dead.lookup("og-x", symbol="AAPL")


def test_cancel(fake: FakeAlpaca, broker: AlpacaBroker) -> None:
    broker.submit(request("og-rest", kind="LIMIT", limit="150"))
    canceled = broker.cancel("og-rest", symbol="AAPL")
    assert canceled.status is OrderStatus.CANCELED and fake.order("og-rest")["status"] == "canceled"
    assert len(fake.requests("DELETE")) == 1
    assert fake.requests("DELETE")[0].path == f"/v2/orders/{canceled.broker_order_id}"

    broker.submit(request("og-done"))  # fills at once
    done = broker.cancel("og-done", symbol="AAPL")
    assert done.status is OrderStatus.FILLED
    assert len(fake.requests("DELETE")) == 1  # nothing to cancel: no DELETE sent
    again = broker.cancel("og-rest", symbol="AAPL")
    assert again.status is OrderStatus.CANCELED and len(fake.requests("DELETE")) == 1

    with pytest.raises(OrderRejected):
        broker.cancel("og-nothing", symbol="AAPL")

    fake.cancel_leaves = "pending_cancel"
    broker.submit(request("og-slow-cancel", kind="LIMIT", limit="150"))
    pending = broker.cancel("og-slow-cancel", symbol="AAPL")
    assert pending.status is OrderStatus.ACCEPTED  # pending_cancel can still fill


# ------------------------------------------------------------------ positions & cash


def test_positions_are_signed_and_cash_exact(fake: FakeAlpaca, broker: AlpacaBroker) -> None:
    broker.submit(request("og-p1", symbol="AAPL", qty="4"))
    broker.submit(request("og-p2", symbol="TSLA", side="SELL", qty="3"))  # short
    broker.submit(request("og-p3", symbol="MSFT", qty="0.5"))
    assert sorted(broker.positions(), key=lambda p: p.symbol) == [
        Position("main", "AAPL", Decimal(4)), Position("main", "MSFT", Decimal("0.5")), Position("main", "TSLA", Decimal(-3)),
    ]
    assert broker.positions("main") == broker.positions() and broker.positions("other") == []
    cash = broker.account("main").cash
    assert cash == Decimal("100000") - 4 * Decimal("190.25") + 3 * Decimal(250) - Decimal("0.5") * Decimal("410.1")
    assert cash == fake.cash_now() == Decimal("99783.95")
    with pytest.raises(ConfigurationError):
        broker.account("other")


# ------------------------------------------------------------- failures on the POST


def test_rate_limited_post_is_one_post_and_rejected(guard: Guard, fake: FakeAlpaca, broker: AlpacaBroker) -> None:
    fake.fail_next_posts(1, 429)
    with pytest.raises(OrderRejected, match="429"):
        broker.submit(request("og-429"))
    assert len(fake.posts()) == 1 and fake.orders() == []  # no SDK retry

    fake.fail_next_posts(1, 429)
    result = guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY)
    assert result.outcome is Outcome.SENT and result.state is State.REJECTED, result.message
    assert len(fake.posts()) == 2 and fake.orders() == []
    retry = guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY)  # a refusal frees the scope
    assert retry.state is State.FILLED, retry.message
    assert [o["client_order_id"] for o in fake.orders()] == [retry.client_order_id]
    assert_ledger_agrees(guard, fake)


def test_venue_refusals_are_rejections(guard: Guard, fake: FakeAlpaca, broker: AlpacaBroker) -> None:
    fake.reject_symbols.update({"GME": "not_tradable", "AMC": "buying_power"})
    with pytest.raises(OrderRejected, match="not tradable"):
        broker.submit(request("og-gme", symbol="GME"))
    with pytest.raises(OrderRejected, match=r"403.*insufficient buying power"):
        broker.submit(request("og-amc", symbol="AMC"))
    result = guard.submit(make_intent(symbol="GME"), broker, policy=POLICY)
    assert result.state is State.REJECTED and result.intent is not None
    assert "not tradable" in (guard.intent(result.intent.id).note or "")
    assert fake.orders() == [] and len(fake.posts()) == 3


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
def test_5xx_before_recording_is_unknown_then_not_found_on_two_lookups(
    guard: Guard, fake: FakeAlpaca, broker: AlpacaBroker, status: int,
) -> None:
    fake.fail_next_posts(1, status)
    result = guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY)
    assert result.outcome is Outcome.SENT and result.state is State.UNKNOWN, result.message
    assert result.intent is not None
    lost = result.intent
    assert len(fake.posts()) == 1 and fake.orders() == []  # one POST: the SDK did not resend

    blocked = guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY)
    assert_blocked_by(blocked, lost.id, BlockReason.UNKNOWN_PENDING)
    assert len(fake.posts()) == 1

    report = guard.reconcile(broker, grace=GRACE, stale_after=0)
    assert report.clean, report.lines()
    after = guard.intent(lost.id)
    assert after.state is State.NOT_FOUND and after.released
    assert [(d.before, d.after) for d in report.decisions] == [(State.UNKNOWN, State.NOT_FOUND)]
    assert lookups(fake, lost.client_order_id) == 2

    retry = guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY)
    assert retry.state is State.FILLED and retry.client_order_id != lost.client_order_id
    assert [o["client_order_id"] for o in fake.orders()] == [retry.client_order_id]
    assert_ledger_agrees(guard, fake)


FAULTS_AFTER_RECORDING = {
    "500": lambda fake: fake.fail_next_posts_after_recording(1, 500),
    "504": lambda fake: fake.fail_next_posts_after_recording(1, 504),
    "dropped": lambda fake: fake.drop_next_posts(1),
    "slow": lambda fake: fake.slow_next_posts(1.5),
    "garbled-200": lambda fake: fake.garble_next_posts(1),
}


@pytest.mark.parametrize("fault", list(FAULTS_AFTER_RECORDING))
def test_answer_lost_after_recording_is_unknown_then_found_and_never_resent(
    guard: Guard, fake: FakeAlpaca, opened: list[AlpacaBroker], fault: str,
) -> None:
    broker = connect(fake, opened, timeout=0.5)
    broker.account("main")  # a warm keep-alive connection, like a running bot's
    FAULTS_AFTER_RECORDING[fault](fake)
    with pytest.raises(AmbiguousOutcome):
        broker.submit(request("og-direct", kind="LIMIT", limit="150"))  # rests: no position
    assert len(fake.posts()) == 1 and len(fake.orders("og-direct")) == 1

    FAULTS_AFTER_RECORDING[fault](fake)
    result = guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY)
    assert result.outcome is Outcome.SENT and result.state is State.UNKNOWN, result.message
    assert result.intent is not None
    lost = result.intent
    assert len(fake.posts()) == 2 and len(fake.orders(lost.client_order_id)) == 1

    blocked = guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY)
    assert_blocked_by(blocked, lost.id, BlockReason.UNKNOWN_PENDING)

    report = guard.reconcile(broker, grace=GRACE, stale_after=0)
    assert report.clean, report.lines()
    assert [(d.client_order_id, d.before, d.after) for d in report.decisions] == [
        (lost.client_order_id, State.UNKNOWN, State.FILLED)
    ]
    retry = guard.submit(make_intent(symbol="AAPL"), broker, policy=OncePer(Ever()))
    assert_blocked_by(retry, lost.id, BlockReason.DUPLICATE)
    assert len(fake.posts()) == 2 and len(fake.orders(lost.client_order_id)) == 1
    record = guard.intent(lost.id)
    order = fake.order(lost.client_order_id)
    assert record.broker_order_id == order["id"] and record.filled_quantity == Decimal(4)
    assert_ledger_agrees(guard, fake)


def test_connection_refused_is_not_sent(guard: Guard, opened: list[AlpacaBroker]) -> None:
    with FakeAlpaca() as gone:
        url, key, secret = gone.url, gone.api_key, gone.secret_key
    dead = AlpacaBroker(key, secret, url=url, timeout=1.0)
    opened.append(dead)
    with pytest.raises(OrderNotSent, match="nothing was sent"):
        dead.submit(request("og-refused"))
    result = guard.submit(make_intent(symbol="AAPL"), dead, policy=POLICY)
    assert result.outcome is Outcome.NOT_SENT and result.state is State.ABANDONED, result.message


def _unanswered_port() -> tuple[socket.socket, list[socket.socket], int]:
    """A port whose accept queue is full: a SYN to it gets no answer (a connect timeout)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    return server, fillers, port


def test_connect_timeout_is_not_sent(guard: Guard, fake: FakeAlpaca, opened: list[AlpacaBroker]) -> None:
    server, fillers, port = _unanswered_port()
    try:
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", port))
            unavailable("this kernel completes connections beyond a full accept queue")
        except TimeoutError:
            pass
        finally:
            probe.close()
        blocked = AlpacaBroker(fake.api_key, fake.secret_key, url=f"http://127.0.0.1:{port}", timeout=0.3)
        opened.append(blocked)
        with pytest.raises(OrderNotSent, match="ConnectTimeout"):
            blocked.submit(request("og-ct"))
        result = guard.submit(make_intent(symbol="AAPL"), blocked, policy=POLICY)
        assert result.outcome is Outcome.NOT_SENT and result.state is State.ABANDONED, result.message
    finally:
        for s in (server, *fillers):
            s.close()


def test_partial_fill_is_recorded_and_positions_agree(guard: Guard, fake: FakeAlpaca, broker: AlpacaBroker) -> None:
    fake.partial_fill = Decimal("0.5")
    result = guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY)
    assert result.state is State.PARTIALLY_FILLED and result.intent is not None, result.message
    record = guard.intent(result.intent.id)
    order = fake.order(record.client_order_id)
    assert (order["status"], order["filled_qty"]) == ("partially_filled", "2")
    assert record.filled_quantity == Decimal(2) and record.average_price == Decimal("190.25")
    assert broker.positions() == [Position("main", "AAPL", Decimal(2))]
    report = guard.reconcile(broker, grace=GRACE, stale_after=0)
    assert report.clean and not report.decisions, report.lines()
    fake.set_order(record.client_order_id, status="filled", filled_qty="4", filled_at="2026-01-02T15:00:00Z")
    report = guard.reconcile(broker, grace=GRACE, stale_after=0)  # the rest filled (positions: set by hand)
    assert [(d.before, d.after) for d in report.decisions] == [(State.PARTIALLY_FILLED, State.FILLED)]
    assert guard.intent(record.id).filled_quantity == Decimal(4)


def test_wait_for_fill_follows_a_delayed_fill(guard: Guard, fake: FakeAlpaca, broker: AlpacaBroker) -> None:
    fake.fill_delay = 0.3
    result = guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY, wait_for_fill=5)
    assert result.state is State.FILLED, result.message
    assert lookups(fake, result.client_order_id or "") >= 1 and len(fake.posts()) == 1
    assert_one_order(guard, fake, result.client_order_id)

    fake.fill_delay = None  # rests: the wait ends with the order working, scope held
    rest = guard.submit(make_intent(symbol="MSFT"), broker, policy=POLICY, wait_for_fill=0.3)
    assert rest.state is State.ACKED and fake.order(rest.client_order_id or "")["status"] == "new"


def test_one_broker_shared_by_threads_sends_each_order_once(guard: Guard, fake: FakeAlpaca, broker: AlpacaBroker) -> None:
    n = 12
    barrier = threading.Barrier(n)

    def attempt(i: int) -> SubmitResult:
        barrier.wait(timeout=30)
        return guard.submit(make_intent(symbol="AAPL", strategy=f"s{i}", quantity=1), broker, policy=POLICY)

    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(attempt, range(n)))
    assert all(r.state is State.FILLED for r in results), [r.message for r in results]
    assert sorted(o["client_order_id"] for o in fake.orders()) == sorted(r.client_order_id or "" for r in results)
    assert len(fake.posts()) == n and fake.position("AAPL") == n
    assert_ledger_agrees(guard, fake)


# ----------------------------------------------------------- duplicate client order id


def test_second_post_of_one_id_is_duplicate_and_alpaca_keeps_one(fake: FakeAlpaca, broker: AlpacaBroker) -> None:
    first = broker.submit(request("og-twice", kind="LIMIT", limit="150"))
    with pytest.raises(DuplicateClientOrderId, match="client_order_id must be unique"):
        broker.submit(request("og-twice", kind="LIMIT", limit="150"))
    broker.cancel("og-twice")
    with pytest.raises(DuplicateClientOrderId):  # permanent: also after the order is closed
        broker.submit(request("og-twice"))
    assert len(fake.posts()) == 3
    [order] = fake.orders()
    assert order["id"] == first.broker_order_id and order["status"] == "canceled"


def _restore_point(ledger: Path) -> Path:
    """A copy of a fresh ledger, taken before any order: later 'restored from backup'."""
    with Guard.open(f"sqlite:///{ledger}", synchronous="NORMAL"):
        pass
    backup = ledger.with_name("backup.db")
    src, dst = sqlite3.connect(ledger), sqlite3.connect(backup)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    return backup


def test_ledger_restored_from_backup_meets_the_duplicate_and_records_the_order(
    tmp_path: Path, fake: FakeAlpaca, broker: AlpacaBroker,
) -> None:
    ledger = tmp_path / "ledger.db"
    backup = _restore_point(ledger)
    with Guard.open(f"sqlite:///{ledger}", synchronous="NORMAL") as guard:
        first = guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY)
    assert first.state is State.FILLED
    with Guard.open(f"sqlite:///{backup}", synchronous="NORMAL") as restored:
        again = restored.submit(make_intent(symbol="AAPL"), broker, policy=POLICY)
        assert again.client_order_id == first.client_order_id  # same namespace, scope and fence
        assert again.outcome is Outcome.SENT and again.state is State.FILLED, again.message
        assert again.intent is not None
        record = restored.intent(again.intent.id)
        [order] = fake.orders()
        assert record.broker_order_id == order["id"] and record.filled_quantity == Decimal(4)
        assert [h.cause.value for h in restored.halts()] == ["DUPLICATE_CLIENT_ID"]
        assert "spx-calendar" in restored.halts()[0].scope
    assert len(fake.posts()) == 2 and lookups(fake, first.client_order_id or "") == 1


def test_duplicate_id_holding_a_different_order_stays_unknown(tmp_path: Path, fake: FakeAlpaca, broker: AlpacaBroker) -> None:
    ledger = tmp_path / "ledger.db"
    backup = _restore_point(ledger)
    policy = OncePer(Ever(), by=("strategy", "symbol"))
    with Guard.open(f"sqlite:///{ledger}", synchronous="NORMAL") as guard:
        first = guard.submit(make_intent(symbol="AAPL", quantity=4), broker, policy=policy)
    with Guard.open(f"sqlite:///{backup}", synchronous="NORMAL") as restored:
        other = restored.submit(make_intent(symbol="AAPL", quantity=5), broker, policy=policy)
        assert other.client_order_id == first.client_order_id
        assert other.state is State.UNKNOWN, other.message
        assert "different order" in (other.intent.note if other.intent else "")
    assert len(fake.orders()) == 1 and fake.orders()[0]["qty"] == "4"


# ------------------------------------------------------------------------ lookup lag


@pytest.mark.slow
def test_lookup_lag_within_grace_is_not_declared_not_found(
    tmp_path: Path, fake: FakeAlpaca, opened: list[AlpacaBroker], caplog: pytest.LogCaptureFixture,
) -> None:
    lag = 1.5
    fake.lookup_lag = lag
    broker = connect(fake, opened, lookup_grace=lag + 0.5)
    with Guard.open(f"sqlite:///{tmp_path / 'a.db'}", synchronous="NORMAL") as guard:
        fake.fail_next_posts_after_recording(1, 500)
        result = guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY)
        assert result.state is State.UNKNOWN and result.intent is not None
        report = guard.reconcile(broker, stale_after=0)  # grace: the broker's lookup_grace
        assert report.clean, report.lines()
        assert guard.intent(result.intent.id).state is State.FILLED
        assert lookups(fake, result.intent.client_order_id) == 2  # a miss (lagging), then found

    # The control: a grace shorter than the lag frees a scope whose order exists (warned about).
    fake.lookup_lag = 30.0  # longer than this part of the test can take, however loaded the host
    with Guard.open(f"sqlite:///{tmp_path / 'b.db'}", synchronous="NORMAL") as hasty:
        fake.fail_next_posts_after_recording(1, 500)
        result = hasty.submit(make_intent(symbol="MSFT"), broker, policy=POLICY)
        assert result.state is State.UNKNOWN and result.intent is not None
        with caplog.at_level(logging.WARNING, logger="orderguard"):
            hasty.reconcile(broker, grace=0.2, stale_after=0)
        assert "lookup lag" in caplog.text
        assert hasty.intent(result.intent.id).state is State.NOT_FOUND
        assert len(fake.orders(result.intent.client_order_id)) == 1


# -------------------------------------------------------------------------- drift


def test_drift_check_agrees_with_alpaca_and_flags_orders_behind_the_guards_back(
    guard: Guard, fake: FakeAlpaca, broker: AlpacaBroker,
) -> None:
    assert guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY).state is State.FILLED
    short = guard.submit(make_intent(symbol="TSLA", side=Side.SELL, quantity=3, strategy="tsla-short"), broker, policy=POLICY)
    assert short.state is State.FILLED
    report = guard.reconcile(broker, grace=GRACE, stale_after=0)
    assert report.clean and not report.drift and report.drift_error is None, report.lines()
    assert guard.store.filled_positions() == {("main", "AAPL"): Decimal(4), ("main", "TSLA"): Decimal(-3)}

    fake.place("AAPL", "3")  # someone bought 3 more in Alpaca's web UI
    report = guard.reconcile(broker, grace=GRACE, stale_after=0)
    assert [(d.account, d.symbol, d.ledger, d.broker) for d in report.drift] == [("main", "AAPL", Decimal(4), Decimal(7))]
    assert not report.clean
    assert [h.cause.value for h in guard.halts()] == ["DRIFT"]


# ---------------------------------------------------------------- spec & secrets


def test_spec_opens_alpaca_with_keys_from_env(fake: FakeAlpaca, alpaca_env: str) -> None:
    b = open_broker(f"{alpaca_env}&account=acct-1&timeout=3&lookup_grace=0.7")
    try:
        assert isinstance(b, AlpacaBroker)
        assert (b.name, b.dedupe, b.lookup_grace, b.timeout) == ("alpaca-paper", VenueDedupe.PERMANENT, 0.7, 3.0)
        placed = b.submit(request("og-spec", account="acct-1"))
        assert placed.account == "acct-1" and fake.order("og-spec")["status"] == "filled"
    finally:
        b.close()
    live = open_broker(f"alpaca://live?url={fake.url}")
    try:
        assert live.name == "alpaca-live"
        assert live.lookup("og-spec") is not None
    finally:
        live.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("missing", ["APCA_API_KEY_ID", "APCA_API_SECRET_KEY"])
def test_spec_without_keys_names_the_variable(fake: FakeAlpaca, alpaca_env: str, monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    monkeypatch.delenv(missing)
    with pytest.raises(ConfigurationError, match=missing):
        open_broker(alpaca_env)
    monkeypatch.setenv(missing, "   ")
    with pytest.raises(ConfigurationError, match=missing):
        open_broker(alpaca_env)
    assert fake.requests() == []


def test_spec_refuses_plain_http_to_another_host(alpaca_env: str, fake: FakeAlpaca) -> None:
    for url in ("http://example.com", "http://10.1.2.3:8080", "http://paper-api.alpaca.markets"):
        with pytest.raises(BrokerSpecError, match="clear text"):
            open_broker(f"alpaca://paper?url={url}")
    for spec in ("alpaca://paper?url=https://paper-api.alpaca.markets", f"alpaca://paper?url=http://localhost:{fake.port}",
                 f"alpaca://paper?url=http://[::1]:{fake.port}"):
        open_broker(spec).close()  # type: ignore[attr-defined]
    for bad in ("alpaca://demo", "alpaca://paper?colour=blue", "alpaca://paper?timeout=soon"):
        with pytest.raises(BrokerSpecError):
            open_broker(bad)


def test_secret_never_in_logs_errors_or_repr(
    tmp_path: Path, fake: FakeAlpaca, alpaca_env: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = fake.secret_key
    texts: list[str] = []

    def keep(exc: BaseException) -> None:
        texts.append("".join(traceback.format_exception(exc)))
        texts.append(repr(exc))

    caplog.set_level(logging.DEBUG)  # root: urllib3, requests, alpaca, orderguard
    for name in ("orderguard", "urllib3", "requests", "alpaca"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    b = open_broker(alpaca_env + "&timeout=0.5")
    assert isinstance(b, AlpacaBroker)
    try:
        texts += [repr(b), str(b), repr(vars(b))]
        with Guard.open(f"sqlite:///{tmp_path / 'ledger.db'}", synchronous="NORMAL") as guard:
            guard.submit(make_intent(symbol="AAPL"), b, policy=POLICY)
            fake.fail_next_posts_after_recording(1, 500)
            guard.submit(make_intent(symbol="MSFT"), b, policy=POLICY)
            fake.drop_next_posts(1)
            guard.submit(make_intent(symbol="TSLA"), b, policy=POLICY)
            texts += guard.reconcile(b, grace=0.1, stale_after=0).lines()
        for fault in (lambda: fake.fail_next_posts(1, 504), lambda: fake.slow_next_posts(1.0), lambda: fake.fail_next_posts(1, 403)):
            fault()
            try:
                b.submit(request(f"og-secret-{len(texts)}"))
            except BrokerError as exc:
                keep(exc)
        fake.fail_next_lookups(1, 500)
        try:
            b.lookup("og-secret-x")
        except BrokerError as exc:
            keep(exc)
    finally:
        b.close()
    monkeypatch.setenv("APCA_API_SECRET_KEY", "a-wrong-secret-for-this-test")
    wrong = open_broker(alpaca_env)
    try:
        with pytest.raises(BrokerError) as denied:
            wrong.lookup("og-x")
        keep(denied.value)
        with pytest.raises(OrderRejected) as refused:
            wrong.submit(request("og-denied"))
        keep(refused.value)
    finally:
        wrong.close()  # type: ignore[attr-defined]
    with pytest.raises(BrokerSpecError) as bad_url:
        open_broker("alpaca://paper?url=http://example.com")
    keep(bad_url.value)

    everything = caplog.text + "\n".join(texts)
    assert "POST /v2/orders" in caplog.text  # urllib3's DEBUG lines were captured
    assert secret not in everything
    assert "a-wrong-secret-for-this-test" not in everything
    assert len(fake.requests()) > 10  # the secret was in use all along


# -------------------------------------------------------------------------------- CLI


def test_cli_reconcile_against_alpaca(tmp_path: Path, fake: FakeAlpaca, alpaca_env: str, opened: list[AlpacaBroker]) -> None:
    ledger = tmp_path / "ledger.db"
    broker = connect(fake, opened)
    with Guard.open(f"sqlite:///{ledger}", synchronous="NORMAL") as guard:
        fake.fail_next_posts_after_recording(1, 504)
        lost = guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY)
    assert lost.state is State.UNKNOWN and lost.intent is not None

    runner = CliRunner()
    args = ["reconcile", "--broker", alpaca_env, "--store", str(ledger), "--grace", "0.2"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    doc = json.loads(result.stdout)
    assert doc["clean"] is True and doc["broker"] == alpaca_env
    [decision] = doc["decisions"]
    assert (decision["client_order_id"], decision["before"], decision["after"]) == (lost.intent.client_order_id, "UNKNOWN", "FILLED")
    with Guard.open(f"sqlite:///{ledger}") as guard:
        assert guard.intent(lost.intent.id).state is State.FILLED
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "clean" in again.stdout
    assert fake.secret_key not in result.stdout + result.stderr + again.stdout + again.stderr
    assert len(fake.posts()) == 1

    missing = runner.invoke(app, args, env={"APCA_API_SECRET_KEY": None})  # type: ignore[dict-item]
    assert missing.exit_code == 2 and missing.stdout == ""
    assert missing.stderr.startswith("orderguard: error: ") and "APCA_API_SECRET_KEY" in missing.stderr


# ------------------------------------------------------------------ storms and crashes


def test_32_threads_one_order_at_alpaca(guard: Guard, fake: FakeAlpaca, broker: AlpacaBroker) -> None:
    n = 32
    barrier = threading.Barrier(n)

    def attempt(_: int) -> SubmitResult:
        barrier.wait(timeout=30)
        return guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY)

    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(attempt, range(n)))
    sent = [r for r in results if r.outcome is Outcome.SENT]
    assert len(sent) == 1, [r.message for r in sent]
    assert sent[0].intent is not None
    for r in results:
        if r is not sent[0]:
            assert_blocked_by(r, sent[0].intent.id, BlockReason.IN_FLIGHT, BlockReason.DUPLICATE)
    assert_one_order(guard, fake, sent[0].client_order_id)
    assert len(fake.posts()) == 1


def test_64_asyncio_tasks_one_order_at_alpaca(guard: Guard, fake: FakeAlpaca, broker: AlpacaBroker) -> None:
    n = 64

    async def main() -> list[SubmitResult]:
        go = asyncio.Event()

        async def attempt() -> SubmitResult:
            await go.wait()
            return await guard.asubmit(make_intent(symbol="AAPL"), broker, policy=POLICY)

        tasks = [asyncio.create_task(attempt()) for _ in range(n)]
        await asyncio.sleep(0)
        go.set()
        return list(await asyncio.gather(*tasks))

    results = asyncio.run(main())
    sent = [r for r in results if r.outcome is Outcome.SENT]
    assert len(sent) == 1 and sent[0].intent is not None
    assert sum(r.outcome is Outcome.BLOCKED for r in results) == n - 1
    assert_one_order(guard, fake, sent[0].client_order_id)
    assert len(fake.posts()) == 1


def _racer(i: int, ledger_url: str, spec: str, barrier: Any, results: Any) -> None:
    """One bot process: its own guard and its own Alpaca connection, then one submit at the barrier."""
    try:
        guard = Guard.open(ledger_url, runner=f"host-{i}", synchronous="NORMAL")
        broker = open_broker(spec)
        barrier.wait(timeout=CHILD_TIMEOUT)
        result = guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY)
        results.put({
            "name": f"host-{i}", "outcome": result.outcome.value, "pid": os.getpid(),
            "reason": result.reason.value if result.reason else None,
            "intent_id": result.intent.id if result.intent else None,
            "holder_id": result.holder.id if result.holder else None,
            "client_order_id": result.client_order_id,
        })
        guard.close()
        broker.close()  # type: ignore[attr-defined]
    except BaseException as exc:
        results.put({"name": f"host-{i}", "error": repr(exc)})
        raise


@pytest.mark.slow
def test_8_processes_one_order_at_alpaca(guard: Guard, fake: FakeAlpaca, alpaca_env: str, ledger_url: str) -> None:
    n = 8
    barrier, results = SPAWN.Barrier(n), SPAWN.Queue()
    procs = [SPAWN.Process(target=_racer, args=(i, ledger_url, alpaca_env, barrier, results), name=f"host-{i}") for i in range(n)]
    out = venue_child.collect(procs, results, CHILD_TIMEOUT)
    assert [p.exitcode for p in procs] == [0] * n
    assert not [r for r in out if "error" in r], out
    sent = [r for r in out if r["outcome"] == "SENT"]
    assert len(sent) == 1, sent
    for r in out:
        if r is not sent[0]:
            assert r["outcome"] == "BLOCKED" and r["holder_id"] == sent[0]["intent_id"], r
    assert len({r["pid"] for r in out}) == n
    assert_one_order(guard, fake, sent[0]["client_order_id"])
    assert len(fake.posts()) == 1


FORK = mp.get_context("fork")


def _forked_worker(i: int, ledger_url: str, broker: AlpacaBroker, barrier: Any, results: Any) -> None:
    """A pre-fork worker (gunicorn, celery): its own guard, the broker it inherited from the parent."""
    try:
        guard = Guard.open(ledger_url, runner=f"worker-{i}", synchronous="NORMAL")
        barrier.wait(timeout=CHILD_TIMEOUT)
        result = guard.submit(make_intent(symbol="AAPL", strategy=f"w{i}", quantity=1), broker, policy=POLICY)
        results.put({"name": f"worker-{i}", "state": result.state.value if result.state else None,
                     "client_order_id": result.client_order_id, "message": result.message})
        guard.close()
    except BaseException as exc:
        results.put({"name": f"worker-{i}", "error": repr(exc)})
        raise


@pytest.mark.slow
def test_forked_workers_inheriting_one_broker_each_send_once(
    guard: Guard, fake: FakeAlpaca, broker: AlpacaBroker, ledger_url: str,
) -> None:
    n = 4
    broker.account("main")  # the parent holds a pooled keep-alive connection when it forks
    barrier, results = FORK.Barrier(n), FORK.Queue()
    procs = [FORK.Process(target=_forked_worker, args=(i, ledger_url, broker, barrier, results)) for i in range(n)]
    for p in procs:
        p.start()
    try:
        out = [results.get(timeout=CHILD_TIMEOUT) for _ in range(n)]
        for p in procs:
            p.join(timeout=CHILD_TIMEOUT)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * n, out
    assert all(r.get("state") == "FILLED" for r in out), out
    assert sorted(o["client_order_id"] for o in fake.orders()) == sorted(r["client_order_id"] for r in out)
    assert len(fake.posts()) == n
    assert_ledger_agrees(guard, fake)
    assert broker.account("main").cash == Decimal(100000) - n * Decimal("190.25")  # the parent's broker still works


STALE = 0.3


@pytest.mark.slow
@pytest.mark.parametrize("point", _crash.POINTS)
def test_kill9_then_reconcile_then_retry_one_order_at_alpaca(
    point: str, fake: FakeAlpaca, alpaca_env: str, ledger_url: str, opened: list[AlpacaBroker],
) -> None:
    intent = {"account": "main", "strategy": "spx-calendar", "symbol": "AAPL", "side": "BUY", "quantity": "4"}

    def child(mode: str = "submit", crash_at: str | None = None) -> tuple[int, dict[str, Any] | None, str]:
        cfg = {"ledger": ledger_url, "spec": alpaca_env, "mode": mode, "intent": intent, "grace": GRACE, "stale_after": STALE}
        return venue_child.run(cfg, crash_at=crash_at, timeout=CHILD_TIMEOUT)

    broker = connect(fake, opened)
    guard = Guard.open(ledger_url, synchronous="NORMAL")
    try:
        if point == "after_ack_recorded":
            fake.fill_delay = 0.6  # acked first, filled later
        if point == "reconcile_after_lookup":
            fake.fail_next_posts_after_recording(1, 504)
            rc, out, err = child()
            assert rc == 0 and out is not None and out["state"] == "UNKNOWN", (rc, out, err)
            rc, out, err = child("reconcile", crash_at=point)
        else:
            rc, out, err = child(crash_at=point)
        assert rc == -signal.SIGKILL, (rc, out, err)
        assert out is None
        [before] = guard.intents()
        assert before.state is {
            "after_claim_commit": State.SENDING, "after_send": State.SENDING,
            "after_ack_recorded": State.ACKED, "reconcile_after_lookup": State.UNKNOWN,
        }[point]
        sent = point != "after_claim_commit"
        assert len(fake.orders()) == int(sent) == len(fake.posts())
        if point == "after_ack_recorded":
            deadline = time.monotonic() + 10
            while fake.order(before.client_order_id)["status"] != "filled":
                assert time.monotonic() < deadline
                time.sleep(0.05)
        while guard.store.now() - before.created_at <= STALE:
            time.sleep(0.02)

        report = guard.reconcile(broker, grace=GRACE, stale_after=STALE)
        assert report.clean, report.lines()
        after = guard.intent(before.id)
        assert after.fence > before.fence
        assert after.state is (State.FILLED if sent else State.NOT_FOUND)
        assert_ledger_agrees(guard, fake)

        retry = guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY)
        if sent:
            assert_blocked_by(retry, before.id, BlockReason.DUPLICATE)
        else:
            assert retry.state is State.FILLED and retry.client_order_id != before.client_order_id
        assert len(fake.orders()) == 1 == len(fake.posts())
        assert fake.orders()[0]["client_order_id"] == (before.client_order_id if sent else retry.client_order_id)
        assert_ledger_agrees(guard, fake)
    finally:
        guard.close()
