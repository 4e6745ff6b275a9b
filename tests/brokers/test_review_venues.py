"""Defects the review of the venue adapters found (commit 401956e), one test each; every one
failed on that commit for the reason its comment gives. Same local venues as test_alpaca.py /
test_ccxt.py: real SDKs, real HTTP."""

from __future__ import annotations

import contextlib
import inspect
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orderguard import AmbiguousOutcome, Ever, Guard, OncePer, OrderGuardError, OrderIntent, Outcome, State
from orderguard.brokers.spec import BrokerSpecError, open_broker
from tests.helpers import make_intent, unavailable

try:
    import alpaca  # noqa: F401
    import ccxt  # noqa: F401
except ImportError:  # pragma: no cover
    unavailable("alpaca-py and ccxt are needed: pip install 'orderguard[alpaca,ccxt]'", module=True)

from orderguard.brokers.alpaca import AlpacaBroker
from orderguard.brokers.ccxt import CcxtBroker

from .fake_alpaca import FakeAlpaca
from .fake_binance import API_KEY, API_SECRET, FakeBinance

POLICY = OncePer(Ever())
SYMBOL = "BTC/USDT"
PRICES = {"AAPL": "190.25"}


def btc_intent(**overrides: object) -> OrderIntent:
    fields: dict[str, object] = {"account": "main", "strategy": "btc", "symbol": SYMBOL, "side": "BUY", "quantity": "0.01"}
    fields.update(overrides)
    return OrderIntent(**fields)  # type: ignore[arg-type]


@pytest.fixture
def binance() -> Iterator[FakeBinance]:
    with FakeBinance() as venue:
        yield venue


@pytest.fixture
def alpaca_fake() -> Iterator[FakeAlpaca]:
    with FakeAlpaca(prices=PRICES) as venue:
        yield venue


def ccxt_broker(fake: FakeBinance, **options: object) -> CcxtBroker:
    settings: dict[str, object] = {"sandbox": True, "url": fake.url, "timeout": 2.0, "symbols": (SYMBOL,)}
    settings.update(options)
    return CcxtBroker("binance", API_KEY, API_SECRET, **settings)  # type: ignore[arg-type]


def alpaca_broker(fake: FakeAlpaca) -> AlpacaBroker:
    return AlpacaBroker(fake.api_key, fake.secret_key, url=fake.url, timeout=1.0, lookup_grace=0.2)


# ------------------------------------------------------------------ 1. Binance recvWindow


@pytest.mark.slow
# Was: CcxtBroker.lookup_grace defaults to 2 s, below the 6 s (recvWindow 5 s + 1 s) during which Binance
# still accepts the first POST: the reconciler declares NOT_FOUND, frees the scope, and the first POST lands
# after the retry: two orders for one OncePer(Ever) scope
def test_reconcile_does_not_free_the_scope_while_binance_can_still_accept_the_post(
    guard: Guard, binance: FakeBinance,
) -> None:
    default_grace = inspect.signature(CcxtBroker).parameters["lookup_grace"].default
    broker = ccxt_broker(binance, timeout=0.5, lookup_grace=default_grace)  # timeout= is a spec option
    try:
        broker.lookup("og-warm-up", symbol=SYMBOL)  # markets loaded
        started = time.monotonic()
        binance.delay_next_posts(seconds=3.0)  # reaches Binance 3 s late: inside recvWindow
        first = guard.submit(btc_intent(), broker, policy=POLICY)
        assert first.state is State.UNKNOWN, first.message
        guard.reconcile(broker, stale_after=0.3)  # grace: the broker's own lookup_grace
        retry = guard.submit(btc_intent(), broker, policy=POLICY)
        time.sleep(max(0.0, started + 3.8 - time.monotonic()))  # the first POST has been handled
        orders = binance.orders()
        assert len(orders) == 1, (
            f"{len(orders)} orders at Binance for one scope: {[o.client_order_id for o in orders]}; "
            f"first {first.state}, reconciled {guard.intent(first.client_order_id or '').state}, retry {retry.outcome}"
        )
    finally:
        broker.close()


# ------------------------------------------------------- 2. Alpaca: resend of an ambiguous id


# Was: AlpacaBroker.submit answers OrderRejected (here a 429) for a client order id whose earlier POST was
# ambiguous and whose order exists; the claim settles REJECTED, frees the scope and the next intent places a
# second order (the README calls a resend on Alpaca 'safe')
def test_alpaca_resend_of_an_ambiguous_id_never_reports_nothing_placed(guard: Guard, alpaca_fake: FakeAlpaca) -> None:
    broker = alpaca_broker(alpaca_fake)
    try:
        alpaca_fake.fail_next_posts_after_recording(1, 504)  # placed; the answer is lost
        with contextlib.suppress(OrderGuardError), guard.claim(make_intent(symbol="AAPL"), policy=POLICY) as claim:
            request = claim.request()
            try:
                claim.record(broker.submit(request))
            except AmbiguousOutcome:
                alpaca_fake.fail_next_posts(1, 429)  # busy when the caller resends the same id
                claim.record(broker.submit(request))
        assert len(alpaca_fake.orders()) == 1  # the first POST placed it
        again = guard.submit(make_intent(symbol="AAPL"), broker, policy=POLICY)
        orders = alpaca_fake.orders()
        assert again.outcome is Outcome.BLOCKED and len(orders) == 1, (
            f"{len(orders)} orders at Alpaca for one scope; first intent {guard.intents()[-1].state}"
        )
    finally:
        broker.close()


# --------------------------------------------- 3. Binance: an id this process did not send


# Was: CcxtBroker sends an id it has not sent itself without looking it up; Binance forgets ids of closed
# orders, so a ledger restored from backup re-sends a filled order's client order id and places a second order
# (Alpaca's permanent dedupe turns the same case into DuplicateClientOrderId and a halt)
# Now: CcxtBroker(lookup_before_send=True) (spec &lookup_before_send=1) looks every new id up first.
def test_restored_ledger_does_not_place_a_filled_orders_id_again_at_binance(tmp_path: Path, binance: FakeBinance) -> None:
    path = tmp_path / "ledger.db"
    url = f"sqlite:///{path}"
    Guard.open(url, synchronous="NORMAL").close()
    backup = tmp_path / "backup.db"
    shutil.copy(path, backup)
    first_broker = ccxt_broker(binance)
    try:
        with Guard.open(url, synchronous="NORMAL") as before:
            first = before.submit(btc_intent(), first_broker, policy=POLICY)
        assert first.state is State.FILLED, first.message
    finally:
        first_broker.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, path)

    restarted = ccxt_broker(binance, lookup_before_send=True)  # a restarted process: it never sent that id
    try:
        with Guard.open(url, synchronous="NORMAL") as after:
            second = after.submit(btc_intent(), restarted, policy=POLICY)
        assert second.client_order_id == first.client_order_id
        orders = binance.orders()
        assert len(orders) == 1, f"{len(orders)} orders under {first.client_order_id}: {[o.status for o in orders]}"
    finally:
        restarted.close()


# ------------------------------------------------------------- 4. Alpaca "replaced"


# Was: Alpaca's 'replaced' maps to CANCELED (terminal): the reconciler frees the scope while the replacement
# order (replaced_by) is live, and the next intent places a second live order
def test_a_replaced_alpaca_order_keeps_its_scope(guard: Guard, alpaca_fake: FakeAlpaca) -> None:
    broker = alpaca_broker(alpaca_fake)
    try:
        intent = make_intent(symbol="AAPL", order_type="LIMIT", limit_price="150")  # rests below 190.25
        first = guard.submit(intent, broker, policy=POLICY)
        assert first.state is State.ACKED, first.message
        # Replaced (Alpaca UI or PATCH /v2/orders/{id}): a new order, the original says "replaced".
        replacement = alpaca_fake.place("AAPL", "4", type="limit", limit_price="151", client_order_id="ui-replacement")
        alpaca_fake.set_order(first.client_order_id or "", status="replaced", replaced_by=replacement["id"])
        guard.reconcile(broker, grace=0.2, stale_after=0)
        again = guard.submit(intent, broker, policy=POLICY)
        live = [o["client_order_id"] for o in alpaca_fake.orders() if o["status"] in ("new", "accepted")]
        assert again.outcome is Outcome.BLOCKED, f"scope freed while {live} are live"
    finally:
        broker.close()


# ------------------------------------------------------ 5. gateway answer to OrderNotSent


# Was: the gateway answers an adapter's OrderNotSent for an order the venue cannot take (a LIMIT order with
# the API's default time_in_force DAY on Binance) with 503 'the ledger could not vouch', which invites a blind
# retry; it is a client error (4xx)
def test_gateway_answers_an_order_the_venue_cannot_take_with_a_client_error(tmp_path: Path, binance: FakeBinance) -> None:
    testclient = pytest.importorskip("fastapi.testclient")
    from orderguard.server import ServerConfig, create_app

    ledger = f"sqlite:///{tmp_path / 'gw.db'}"
    broker = ccxt_broker(binance)
    guard = Guard.open(ledger, runner="gateway-review", synchronous="NORMAL")
    token = "review-token-0123456789abcdef0123456789"
    try:
        config = ServerConfig.model_validate({"store": ledger, "broker": "ccxt://binance"})
        with testclient.TestClient(create_app(config, guard, broker, token, events=False), raise_server_exceptions=False) as client:
            body = {"account": "main", "strategy": "btc", "symbol": SYMBOL, "side": "BUY", "quantity": "0.01",
                    "order_type": "LIMIT", "limit_price": "40000"}
            response = client.post("/v1/intents", json=body, headers={"Authorization": f"Bearer {token}"})
        assert binance.posts() == []  # nothing was sent either way
        assert 400 <= response.status_code < 500, (response.status_code, response.json().get("message"))
    finally:
        guard.close()
        broker.close()


# ------------------------------------------------------ 6. credentials echoed by spec errors


# Was: a credential put in a broker spec by mistake (a key as an option, or user:password in url=) is echoed
# verbatim by BrokerSpecError, which the CLI prints and the gateway logs at startup
def test_spec_errors_do_not_echo_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("APCA_API_KEY_ID", "key-id"), ("APCA_API_SECRET_KEY", "env-secret"),
                        ("BINANCE_API_KEY", "key-id"), ("BINANCE_API_SECRET", "env-secret")):
        monkeypatch.setenv(name, value)
    leaked = "Zq9-not-for-logs-7781"
    specs = [
        f"alpaca://live?secret_key={leaked}",
        f"ccxt://binance?secret={leaked}",
        f"alpaca://live?url=https://bot:{leaked}@proxy.example",
    ]
    for spec in specs:
        with pytest.raises(BrokerSpecError) as caught:
            open_broker(spec)
        assert leaked not in str(caught.value), str(caught.value)
