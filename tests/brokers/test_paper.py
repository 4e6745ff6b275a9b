"""PaperBroker: the embedded venue, tested as users rely on it.

Every test runs against a real SQLite file under ``tmp_path``; what ``orders()`` returns is the
venue's order log, i.e. what was actually placed.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from orderguard import AmbiguousOutcome, ConfigurationError, DuplicateClientOrderId, OrderRejected, SendDeadlineExceeded
from orderguard.brokers import (
    AccountInfo,
    Broker,
    BrokerOrder,
    OrderRequest,
    OrderStatus,
    PaperBroker,
    PaperFaults,
    Position,
    VenueDedupe,
)

ROOT = Path(__file__).resolve().parents[2]
START_CASH = Decimal("1000000")
CHILD_TIMEOUT = 30.0


def request(
    coid: str,
    *,
    account: str = "main",
    symbol: str = "SPX",
    side: str = "BUY",
    quantity: Decimal | int | str = 4,
    order_type: str = "MARKET",
    limit_price: Decimal | int | str | None = None,
    stop_price: Decimal | int | str | None = None,
    send_by: float | None = None,
) -> OrderRequest:
    return OrderRequest(
        client_order_id=coid,
        account=account,
        symbol=symbol,
        side=side,
        quantity=Decimal(quantity),
        order_type=order_type,
        limit_price=None if limit_price is None else Decimal(limit_price),
        stop_price=None if stop_price is None else Decimal(stop_price),
        time_in_force="DAY",
        send_by=send_by,
    )


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, step: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(step)


# ------------------------------------------------------------------------------ basics


def test_paper_broker_satisfies_the_broker_protocol(broker: PaperBroker) -> None:
    assert isinstance(broker, Broker)
    assert broker.name == "paper"
    assert broker.dedupe is VenueDedupe.PERMANENT  # the default
    assert broker.lookup_grace == 0.0  # 2 * lookup_lag: no lag, nothing to wait out


def test_market_order_fills_at_the_default_price_and_moves_position_and_cash(broker: PaperBroker) -> None:
    placed = broker.submit(request("c-1", quantity=4))
    assert placed.client_order_id == "c-1"
    assert placed.status is OrderStatus.FILLED
    assert placed.filled_quantity == Decimal(4)
    assert placed.average_price == Decimal(100)
    assert placed.broker_order_id.startswith("P-")
    assert broker.lookup("c-1") == placed
    assert broker.lookup("nope") is None
    assert broker.orders() == [placed]
    assert broker.positions() == [Position("main", "SPX", Decimal(4))]
    assert broker.account("main") == AccountInfo("main", START_CASH - 400)
    assert broker.account("other") == AccountInfo("other", START_CASH)  # untouched account


def test_sell_goes_short_and_credits_cash_exactly(open_broker: Callable[..., PaperBroker]) -> None:
    b = open_broker()
    b.set_price("ES", "4321.25")
    b.submit(request("s-1", symbol="ES", side="SELL", quantity="0.3"))
    assert b.positions("main") == [Position("main", "ES", Decimal("-0.3"))]
    assert b.account("main").cash == START_CASH + Decimal("1296.375")
    b.submit(request("b-1", symbol="ES", side="BUY", quantity="0.3"))
    assert b.positions("main") == []  # flat positions are not listed
    assert b.account("main").cash == START_CASH


def test_positions_filter_by_account(broker: PaperBroker) -> None:
    broker.submit(request("a-1", account="alpha", quantity=2))
    broker.submit(request("b-1", account="beta", symbol="NDX", quantity=3))
    assert broker.positions("alpha") == [Position("alpha", "SPX", Decimal(2))]
    assert broker.positions("beta") == [Position("beta", "NDX", Decimal(3))]
    assert broker.positions() == [Position("alpha", "SPX", Decimal(2)), Position("beta", "NDX", Decimal(3))]


@pytest.mark.parametrize(
    "options",
    [{"partial_fills": 0}, {"partial_fills": True}, {"fill_delay": -1}, {"ack_latency": -0.1}],
)
def test_invalid_configuration_is_refused(paper_url: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        PaperBroker.open(paper_url, **options)


@pytest.mark.parametrize("price", ["0", "-1", "NaN", "Infinity"])
def test_set_price_refuses_non_positive_or_non_finite(broker: PaperBroker, price: str) -> None:
    with pytest.raises(ConfigurationError):
        broker.set_price("SPX", price)


# ------------------------------------------------------------------------------ dedupe


def test_permanent_dedupe_refuses_a_reused_id_while_open_and_after_fill(
    open_broker: Callable[..., PaperBroker],
) -> None:
    b = open_broker(dedupe=VenueDedupe.PERMANENT, fill_delay=0.3)
    first = b.submit(request("dup-1"))
    assert first.status is OrderStatus.ACCEPTED
    with pytest.raises(DuplicateClientOrderId, match="dup-1"):
        b.submit(request("dup-1"))
    wait_for(lambda: b.lookup("dup-1").status is OrderStatus.FILLED)  # type: ignore[union-attr]
    with pytest.raises(DuplicateClientOrderId, match="dup-1"):
        b.submit(request("dup-1"))
    orders = b.orders("dup-1")
    assert len(orders) == 1
    assert orders[0].status is OrderStatus.FILLED
    assert b.positions() == [Position("main", "SPX", Decimal(4))]


def test_permanent_dedupe_refuses_a_reused_id_after_cancel(open_broker: Callable[..., PaperBroker]) -> None:
    b = open_broker(dedupe="permanent", fill_delay=30)
    b.submit(request("dup-c"))
    assert b.cancel("dup-c").status is OrderStatus.CANCELED
    with pytest.raises(DuplicateClientOrderId):
        b.submit(request("dup-c"))
    assert len(b.orders("dup-c")) == 1


def test_open_orders_only_dedupe_refuses_while_open_and_accepts_after_fill(
    open_broker: Callable[..., PaperBroker],
) -> None:
    b = open_broker(dedupe=VenueDedupe.OPEN_ORDERS_ONLY, fill_delay=0.3)
    first = b.submit(request("oo-1"))
    assert first.status is OrderStatus.ACCEPTED
    with pytest.raises(DuplicateClientOrderId, match="oo-1"):
        b.submit(request("oo-1"))
    assert len(b.orders("oo-1")) == 1
    wait_for(lambda: b.orders("oo-1")[0].status is OrderStatus.FILLED)
    # The first is no longer open: the venue takes the same id again, a real duplicate.
    second = b.submit(request("oo-1"))
    assert second.status is OrderStatus.ACCEPTED
    assert second.broker_order_id != first.broker_order_id
    wait_for(lambda: all(o.status is OrderStatus.FILLED for o in b.orders("oo-1")))
    orders = b.orders("oo-1")
    assert [o.broker_order_id for o in orders] == [first.broker_order_id, second.broker_order_id]
    assert b.positions() == [Position("main", "SPX", Decimal(8))]
    assert b.account("main").cash == START_CASH - 800


def test_no_dedupe_accepts_every_reuse(open_broker: Callable[..., PaperBroker]) -> None:
    b = open_broker(dedupe=VenueDedupe.NONE, fill_delay=30)
    placed = [b.submit(request("nd-1")) for _ in range(3)]
    assert all(o.status is OrderStatus.ACCEPTED for o in placed)  # all open at once
    assert len({o.broker_order_id for o in placed}) == 3
    assert len(b.orders("nd-1")) == 3


def test_no_dedupe_accepts_reuse_after_fill(open_broker: Callable[..., PaperBroker]) -> None:
    b = open_broker(dedupe="none")
    b.submit(request("nd-2"))
    b.submit(request("nd-2"))
    assert [o.status for o in b.orders("nd-2")] == [OrderStatus.FILLED, OrderStatus.FILLED]
    assert b.positions() == [Position("main", "SPX", Decimal(8))]


def test_dedupe_is_shared_by_every_instance_on_the_file(open_broker: Callable[..., PaperBroker]) -> None:
    a = open_broker(dedupe=VenueDedupe.PERMANENT)
    b = open_broker(dedupe=VenueDedupe.PERMANENT)
    a.submit(request("shared-1"))
    with pytest.raises(DuplicateClientOrderId):
        b.submit(request("shared-1"))
    assert len(b.orders()) == 1


# ------------------------------------------------------------------------------ fills


def test_fill_delay_keeps_the_order_open_then_fills(open_broker: Callable[..., PaperBroker]) -> None:
    b = open_broker(fill_delay=0.4)
    placed = b.submit(request("fd-1"))
    assert placed.status is OrderStatus.ACCEPTED
    assert placed.filled_quantity == 0
    assert placed.average_price is None
    assert b.positions() == []
    assert b.account("main").cash == START_CASH
    wait_for(lambda: b.lookup("fd-1").status is OrderStatus.FILLED)  # type: ignore[union-attr]
    done = b.lookup("fd-1")
    assert done is not None
    assert done.filled_quantity == 4
    assert done.average_price == 100
    assert b.positions() == [Position("main", "SPX", Decimal(4))]
    assert b.account("main").cash == START_CASH - 400


def test_partial_fills_go_through_partially_filled_with_exact_decimals(
    open_broker: Callable[..., PaperBroker],
) -> None:
    b = open_broker(fill_delay=1.0, partial_fills=2)
    b.set_price("SPX", "123.45")
    placed = b.submit(request("pf-1", quantity=4))
    assert placed.status is OrderStatus.ACCEPTED
    seen: list[tuple[OrderStatus, Decimal, list[Position], Decimal]] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        o = b.orders("pf-1")[0]
        snapshot = (o.status, o.filled_quantity, b.positions("main"), b.account("main").cash)
        if not seen or seen[-1][:2] != snapshot[:2]:
            seen.append(snapshot)
        if o.status is OrderStatus.FILLED:
            break
        time.sleep(0.02)
    assert [(s, q) for s, q, _, _ in seen] == [
        (OrderStatus.ACCEPTED, 0),
        (OrderStatus.PARTIALLY_FILLED, 2),
        (OrderStatus.FILLED, 4),
    ]
    _, _, partial_positions, partial_cash = seen[1]
    assert partial_positions == [Position("main", "SPX", Decimal(2))]
    assert partial_cash == START_CASH - Decimal("246.90")
    final = b.lookup("pf-1")
    assert final is not None
    assert final.average_price == Decimal("123.45")
    assert b.positions("main") == [Position("main", "SPX", Decimal(4))]
    assert b.account("main").cash == START_CASH - Decimal("493.80")


def test_fractional_partial_fills_add_up_exactly(open_broker: Callable[..., PaperBroker]) -> None:
    b = open_broker(fill_delay=0.3, partial_fills=3)
    b.set_price("BTC", "64123.17")
    b.submit(request("frac-1", symbol="BTC", quantity="0.3"))
    wait_for(lambda: b.orders("frac-1")[0].status is OrderStatus.FILLED)
    final = b.orders("frac-1")[0]
    assert final.filled_quantity == Decimal("0.3")
    assert final.average_price == Decimal("64123.17")
    assert b.positions() == [Position("main", "BTC", Decimal("0.3"))]
    assert b.account("main").cash == START_CASH - Decimal("19236.951")


def test_limit_buy_rests_until_set_price_makes_it_marketable(broker: PaperBroker) -> None:
    placed = broker.submit(request("lim-b", order_type="LIMIT", limit_price="95"))
    assert placed.status is OrderStatus.ACCEPTED  # price 100 > limit 95
    broker.set_price("SPX", "96")
    resting = broker.lookup("lim-b")
    assert resting is not None
    assert resting.status is OrderStatus.ACCEPTED
    assert broker.positions() == []
    broker.set_price("SPX", "94.5")
    filled = broker.lookup("lim-b")
    assert filled is not None
    assert filled.status is OrderStatus.FILLED
    assert filled.average_price == Decimal("94.5")  # never worse than the limit
    assert broker.positions() == [Position("main", "SPX", Decimal(4))]
    assert broker.account("main").cash == START_CASH - Decimal("378")


def test_limit_sell_rests_until_the_price_reaches_it(broker: PaperBroker) -> None:
    broker.submit(request("lim-s", side="SELL", quantity=2, order_type="LIMIT", limit_price="105"))
    broker.set_price("SPX", "104.99")
    assert broker.orders("lim-s")[0].status is OrderStatus.ACCEPTED
    broker.set_price("SPX", "105")
    order = broker.orders("lim-s")[0]
    assert order.status is OrderStatus.FILLED
    assert order.average_price == Decimal("105")
    assert broker.positions() == [Position("main", "SPX", Decimal(-2))]
    assert broker.account("main").cash == START_CASH + 210


def test_marketable_limit_fills_at_once(broker: PaperBroker) -> None:
    placed = broker.submit(request("lim-m", order_type="LIMIT", limit_price="101"))
    assert placed.status is OrderStatus.FILLED
    assert placed.average_price == Decimal(100)


def test_stop_buy_waits_for_its_trigger(broker: PaperBroker) -> None:
    broker.submit(request("stop-b", order_type="STOP", stop_price="110"))
    broker.set_price("SPX", "109")
    assert broker.orders("stop-b")[0].status is OrderStatus.ACCEPTED
    broker.set_price("SPX", "111")
    order = broker.orders("stop-b")[0]
    assert order.status is OrderStatus.FILLED
    assert order.average_price == Decimal(111)


# ------------------------------------------------------------------------------ rejects & deadline


def test_reject_symbols_raises_order_rejected_and_places_nothing(open_broker: Callable[..., PaperBroker]) -> None:
    b = open_broker(reject_symbols=("GME",))
    with pytest.raises(OrderRejected, match="GME"):
        b.submit(request("rej-1", symbol="GME"))
    assert b.orders() == []
    assert b.lookup("rej-1") is None
    assert b.positions() == []
    assert b.account("main").cash == START_CASH
    # Other symbols still trade, and the refused id was never taken.
    assert b.submit(request("rej-1", symbol="SPX")).status is OrderStatus.FILLED
    assert len(b.orders()) == 1


def test_send_deadline_in_the_past_raises_and_places_nothing(broker: PaperBroker) -> None:
    with pytest.raises(SendDeadlineExceeded, match="dl-1"):
        broker.submit(request("dl-1", send_by=time.monotonic() - 0.001))
    assert broker.orders() == []
    assert broker.positions() == []
    # A deadline still ahead is fine.
    placed = broker.submit(request("dl-1", send_by=time.monotonic() + 60))
    assert placed.status is OrderStatus.FILLED
    assert len(broker.orders()) == 1


# ------------------------------------------------------------------------------ faults


def test_lose_ack_raises_ambiguous_but_the_order_is_placed(open_broker: Callable[..., PaperBroker]) -> None:
    b = open_broker(faults=PaperFaults(lose_ack=1))
    with pytest.raises(AmbiguousOutcome, match="la-1"):
        b.submit(request("la-1"))
    orders = b.orders()
    assert len(orders) == 1
    assert orders[0].client_order_id == "la-1"
    assert orders[0].status is OrderStatus.FILLED
    assert b.lookup("la-1") == orders[0]
    assert b.positions() == [Position("main", "SPX", Decimal(4))]
    # The fault was consumed: the next order gets its ack.
    assert b.submit(request("la-2")).status is OrderStatus.FILLED
    assert b.faults.lose_ack == 0
    assert len(b.orders()) == 2


def test_lose_ack_minus_one_loses_every_ack(open_broker: Callable[..., PaperBroker]) -> None:
    b = open_broker(faults=PaperFaults(lose_ack=-1))
    for coid in ("e-1", "e-2", "e-3"):
        with pytest.raises(AmbiguousOutcome):
            b.submit(request(coid))
    assert [o.client_order_id for o in b.orders()] == ["e-1", "e-2", "e-3"]


def test_disconnect_raises_ambiguous_and_nothing_is_placed(open_broker: Callable[..., PaperBroker]) -> None:
    b = open_broker(faults=PaperFaults(disconnect=1))
    with pytest.raises(AmbiguousOutcome, match="dc-1"):
        b.submit(request("dc-1"))
    assert b.orders() == []
    assert b.lookup("dc-1") is None
    assert b.positions() == []
    # It never arrived, so even a permanent-dedupe venue takes the id afterwards.
    assert b.submit(request("dc-1")).status is OrderStatus.FILLED
    assert len(b.orders("dc-1")) == 1


def test_faults_belong_to_one_instance(open_broker: Callable[..., PaperBroker]) -> None:
    faulty = open_broker(faults=PaperFaults(disconnect=-1))
    healthy = open_broker()
    with pytest.raises(AmbiguousOutcome):
        faulty.submit(request("f-1"))
    assert healthy.submit(request("f-2")).status is OrderStatus.FILLED
    assert [o.client_order_id for o in faulty.orders()] == ["f-2"]


def test_lookup_lag_hides_the_order_until_the_lag_passed(open_broker: Callable[..., PaperBroker]) -> None:
    lag = 0.3
    b = open_broker(faults=PaperFaults(lookup_lag=lag))
    assert b.lookup_grace == pytest.approx(0.6)  # 2 * lag
    t0 = time.monotonic()
    placed = b.submit(request("lag-1"))
    assert placed.status is OrderStatus.FILLED  # the submitter's own ack shows it
    assert b.lookup("lag-1") is None  # but a lookup does not, yet
    assert len(b.orders("lag-1")) == 1  # it is in the log all the same
    wait_for(lambda: b.lookup("lag-1") is not None, timeout=5)
    assert time.monotonic() - t0 >= lag - 0.02
    assert b.lookup("lag-1") == b.orders("lag-1")[0]


def test_lookup_grace_follows_a_long_lag_or_an_explicit_value(paper_url: str) -> None:
    b1 = PaperBroker.open(paper_url, faults=PaperFaults(lookup_lag=0.8))
    b2 = PaperBroker.open(paper_url, lookup_grace=0.25)
    try:
        assert b1.lookup_grace == 1.6
        assert b2.lookup_grace == 0.25
    finally:
        b1.close()
        b2.close()


# ------------------------------------------------------------------------------ cancel


def test_cancel_an_open_order(open_broker: Callable[..., PaperBroker]) -> None:
    b = open_broker(fill_delay=0.3)
    b.submit(request("cx-1"))
    canceled = b.cancel("cx-1")
    assert canceled.status is OrderStatus.CANCELED
    assert canceled.filled_quantity == 0
    time.sleep(0.4)  # past the fill delay: a canceled order never fills
    after = b.lookup("cx-1")
    assert after is not None
    assert after.status is OrderStatus.CANCELED
    assert after.filled_quantity == 0
    assert b.positions() == []
    assert b.account("main").cash == START_CASH


def test_cancel_after_a_partial_fill_keeps_the_filled_part(open_broker: Callable[..., PaperBroker]) -> None:
    b = open_broker(fill_delay=1.0, partial_fills=2)
    b.submit(request("cx-p", quantity=4))
    wait_for(lambda: b.orders("cx-p")[0].status is not OrderStatus.ACCEPTED)
    canceled = b.cancel("cx-p")
    assert canceled.status is OrderStatus.CANCELED
    assert canceled.filled_quantity == 2
    time.sleep(0.6)
    assert b.orders("cx-p")[0].filled_quantity == 2
    assert b.positions() == [Position("main", "SPX", Decimal(2))]
    assert b.account("main").cash == START_CASH - 200


def test_cancel_of_a_filled_order_changes_nothing(broker: PaperBroker) -> None:
    broker.submit(request("cx-f"))
    answer = broker.cancel("cx-f")
    assert answer.status is OrderStatus.FILLED
    assert answer.filled_quantity == 4
    assert broker.positions() == [Position("main", "SPX", Decimal(4))]


def test_cancel_of_an_unknown_order_is_rejected(broker: PaperBroker) -> None:
    with pytest.raises(OrderRejected, match="cx-none"):
        broker.cancel("cx-none")


def test_open_orders_only_reuse_after_cancel_then_cancel_hits_the_open_order(
    open_broker: Callable[..., PaperBroker],
) -> None:
    """On an open-orders-only venue an id is unique among open orders: cancel by that id must
    cancel the open one, not an older closed order that once carried the same id."""
    b = open_broker(dedupe=VenueDedupe.OPEN_ORDERS_ONLY, fill_delay=30)
    first = b.submit(request("cx-r"))
    assert b.cancel("cx-r").status is OrderStatus.CANCELED
    second = b.submit(request("cx-r"))  # accepted again: the first is closed
    assert second.status is OrderStatus.ACCEPTED
    answer = b.cancel("cx-r")
    assert answer.broker_order_id == second.broker_order_id
    assert answer.status is OrderStatus.CANCELED
    assert [(o.broker_order_id, o.status) for o in b.orders("cx-r")] == [
        (first.broker_order_id, OrderStatus.CANCELED),
        (second.broker_order_id, OrderStatus.CANCELED),
    ]


# ------------------------------------------------------------------------------ processes

CHILD = r"""
import json, os, sys
from decimal import Decimal
from orderguard import DuplicateClientOrderId
from orderguard.brokers import OrderRequest, PaperBroker

cfg = json.loads(sys.argv[1])
broker = PaperBroker.open(cfg["paper"], dedupe=cfg["dedupe"])
results = []
for coid in cfg["coids"]:
    req = OrderRequest(coid, "main", "SPX", "BUY", Decimal(cfg["quantity"]), "MARKET", None, None, "DAY")
    try:
        order = broker.submit(req)
        results.append({"coid": coid, "status": order.status.value, "broker_order_id": order.broker_order_id})
    except DuplicateClientOrderId:
        results.append({"coid": coid, "error": "duplicate"})
broker.close()
print(json.dumps({"pid": os.getpid(), "results": results}), flush=True)
"""


def test_a_child_process_submits_on_the_same_venue_file(broker: PaperBroker, paper_url: str) -> None:
    mine = broker.submit(request("parent-1", quantity=4))
    config = {"paper": paper_url, "dedupe": "permanent", "coids": ["child-1", "parent-1"], "quantity": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["pid"] != os.getpid()
    child_order, child_dup = out["results"]
    assert child_order["coid"] == "child-1"
    assert child_order["status"] == "FILLED"
    assert child_dup == {"coid": "parent-1", "error": "duplicate"}  # the parent's id, seen across processes
    orders = broker.orders()
    assert [(o.client_order_id, o.broker_order_id) for o in orders] == [
        ("parent-1", mine.broker_order_id),
        ("child-1", child_order["broker_order_id"]),
    ]
    assert broker.lookup("child-1") == orders[1]
    assert broker.positions() == [Position("main", "SPX", Decimal(7))]
    assert broker.account("main").cash == START_CASH - 700


def _forked_submit(b: PaperBroker, coid: str) -> None:
    # Runs in a forked child on the parent's PaperBroker object (inherited connections).
    try:
        b.submit(request(coid, quantity=1))
    except DuplicateClientOrderId:
        os._exit(3)
    os._exit(0)


def test_a_forked_child_uses_the_inherited_broker_safely(broker: PaperBroker) -> None:
    broker.submit(request("fork-parent"))  # the parent's thread connection exists before the fork
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_forked_submit, args=(broker, coid)) for coid in ("fork-child", "fork-parent")]
    for p in procs:
        p.start()
        p.join(CHILD_TIMEOUT)
    assert [p.exitcode for p in procs] == [0, 3]
    orders: list[BrokerOrder] = broker.orders()
    assert [o.client_order_id for o in orders] == ["fork-parent", "fork-child"]
    assert broker.positions() == [Position("main", "SPX", Decimal(5))]
