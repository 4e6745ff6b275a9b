"""Broker specs and options of the real-venue adapters: every bad spec is a typed error that says
what to fix, and nothing is opened half-way. (The adapters' behaviour against the venues is in
test_alpaca.py and test_ccxt.py.)"""

from __future__ import annotations

from decimal import Decimal

import pytest

from orderguard.brokers._venue import base_url, venue_decimal
from orderguard.brokers.alpaca import AlpacaBroker
from orderguard.brokers.ccxt import CcxtBroker
from orderguard.brokers.spec import BrokerSpecError, open_broker
from orderguard.errors import ConfigurationError

SECRET = "s3cret-never-shown-0123456789"


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("APCA_API_KEY_ID", "key-id"), ("APCA_API_SECRET_KEY", SECRET),
                        ("BINANCE_API_KEY", "key-id"), ("BINANCE_API_SECRET", SECRET)):
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(("spec", "needle"), [
    ("alpaca://somewhere", "alpaca://paper or alpaca://live"),
    ("alpaca://paper?acount=main", "unknown option 'acount'"),
    ("alpaca://paper?account=a&account=b", "given twice"),
    ("alpaca://paper?timeout=soon", "not a number of seconds"),
    ("alpaca://paper?timeout=0", "positive number of seconds"),
    ("alpaca://paper?timeout=nan", "positive number of seconds"),
    ("alpaca://paper?lookup_grace=-1", "lookup_grace"),
    ("alpaca://paper?url=http://example.com", "clear text"),
    ("alpaca://paper?url=ftp://127.0.0.1", "https://host"),
    ("alpaca://paper?url=https://user:pw@example.com", "must not carry a user or password"),
    ("alpaca://paper?url=https://example.com/?token=abc", "plain base URL"),
    ("alpaca://paper?url=http://127.0.0.1:99999", "invalid port"),
    ("alpaca://paper?account=", "account must be a non-empty string"),
    ("alpaca://paper?x", "malformed option list"),
    ("ccxt://kraken", "supports binance"),
    ("ccxt://binance?sandbox=maybe", "sandbox=1 or sandbox=0"),
    ("ccxt://binance?lookup_before_send=sure", "lookup_before_send=1 or lookup_before_send=0"),
    ("ccxt://binance?symbols=BTCUSDT", "not a ccxt spot symbol"),
    ("ccxt://binance?symbols=BTC/USDT,BTC/FDUSD", "share a base asset"),
    ("ccxt://binance?symbols=BTC/USDT,ETH/BTC", "several quote assets"),
    ("ccxt://binance?leverage=10", "unknown option 'leverage'"),
])
def test_bad_specs_say_what_to_fix(keys: None, spec: str, needle: str) -> None:
    with pytest.raises(BrokerSpecError, match=None) as caught:
        open_broker(spec)
    assert needle in str(caught.value), str(caught.value)
    assert isinstance(caught.value, ConfigurationError)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(("spec", "variable"), [
    ("alpaca://live", "APCA_API_KEY_ID"),
    ("ccxt://binance", "BINANCE_API_KEY"),
])
def test_missing_keys_name_the_variable_not_a_value(monkeypatch: pytest.MonkeyPatch, spec: str, variable: str) -> None:
    for name in ("APCA_API_KEY_ID", "APCA_API_SECRET_KEY", "BINANCE_API_KEY", "BINANCE_API_SECRET"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(BrokerSpecError, match=variable):
        open_broker(spec)
    monkeypatch.setenv(variable, "   ")  # blank is missing too
    with pytest.raises(BrokerSpecError, match=variable):
        open_broker(spec)


def test_good_specs_open_without_touching_the_network(keys: None) -> None:
    alpaca = open_broker("alpaca://live?account=ira&timeout=3.5&lookup_grace=1&url=https://proxy.example/")
    assert isinstance(alpaca, AlpacaBroker)
    assert (alpaca.name, alpaca.account_name, alpaca.timeout, alpaca.lookup_grace, alpaca.url) == (
        "alpaca-live", "ira", 3.5, 1.0, "https://proxy.example")
    binance = open_broker("ccxt://binance?sandbox=1&symbols=BTC/USDT,ETH/USDT&url=http://localhost:8080")
    assert isinstance(binance, CcxtBroker)
    assert (binance.name, binance.symbols, binance.cash_asset, binance.url) == (
        "binance-testnet", ("BTC/USDT", "ETH/USDT"), "USDT", "http://localhost:8080")
    for broker in (alpaca, binance):
        assert SECRET not in repr(broker) and "key-id" not in repr(broker)
        broker.close()


def test_alpaca_client_makes_each_call_once_with_a_timeout(keys: None) -> None:
    broker = AlpacaBroker.from_env(timeout=4.0)
    client = broker.client
    assert client._retry == 0 and client._retry_codes == []  # alpaca-py would retry 429/504 POSTs 3x
    assert client._session.request.__func__.__qualname__.endswith("_TimeoutSession.request")


def test_ccxt_exchange_has_retries_off_and_spot_only(keys: None) -> None:
    broker = CcxtBroker.from_env("binance", sandbox=True)
    ex = broker._new_exchange()
    assert ex.options["maxRetriesOnFailure"] == 0
    assert ex.options["fetchMarkets"]["types"] == ["spot"]
    assert ex.options["fetchCurrencies"] is False and ex.options["fetchMargins"] is False
    assert ex.timeout == 10_000
    assert "testnet" in ex.urls["api"]["private"]


@pytest.mark.parametrize(("url", "ok"), [
    ("http://127.0.0.1:8080", True), ("http://[::1]:8080/", True), ("http://localhost", True),
    ("https://paper-api.alpaca.markets", True), ("http://10.0.0.2:80", False), ("http://127.0.0.1.nip.io", False),
])
def test_plain_http_only_to_this_machine(url: str, ok: bool) -> None:
    if ok:
        assert base_url(url, "v") == url.rstrip("/")
    else:
        with pytest.raises(ConfigurationError, match="clear text"):
            base_url(url, "v")


@pytest.mark.parametrize(("raw", "expected"), [
    ("1.10", Decimal("1.10")), (0.1, Decimal("0.1")), (3, Decimal(3)), ("  2 ", Decimal(2)),
])
def test_venue_numbers_are_exact(raw: object, expected: Decimal) -> None:
    assert venue_decimal(raw, "qty") == expected


@pytest.mark.parametrize("raw", ["NaN", "inf", "", "1,5", True, None])
def test_venue_numbers_that_are_not_numbers_raise(raw: object) -> None:
    with pytest.raises(ValueError, match="qty"):
        venue_decimal(raw, "qty")


def test_a_forked_child_gets_its_own_connections(keys: None) -> None:
    import os

    alpaca = AlpacaBroker.from_env()
    binance = CcxtBroker.from_env("binance", symbols=["BTC/USDT"])
    binance._local.exchange = parent_exchange = binance._new_exchange()
    parent_session = alpaca.client._session
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's atexit/pytest code
        try:
            fresh = alpaca.client._session is not parent_session and alpaca.client._retry == 0
            fresh = fresh and getattr(binance._local, "exchange", None) is not parent_exchange
            os.write(write, b"1" if fresh else b"0")
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(pid, 0)
    assert answer == b"1"
    assert alpaca.client._session is parent_session  # the parent keeps its own
    assert binance._local.exchange is parent_exchange
