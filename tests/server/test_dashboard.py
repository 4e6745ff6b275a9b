"""The live dashboard (``GET /``) in a real browser against a real gateway.

uvicorn serves ``create_app`` from a background thread over a SQLite ledger and a paper venue in
``tmp_path`` (``ack_latency=0.2``, so a second click lands while the first order is on the wire);
headless Chromium drives the page. What is checked is what an operator relies on:

1. "Buy" clicked in two tabs at the same moment places ONE order; the other tab shows the block
   (DUPLICATE or IN_FLIGHT) and the intent holding the scope.
2. Orders, state changes, blocked attempts, halts and runners written by other processes appear
   without a reload, rows updated in place.
3. The halt form halts a scope in the ledger; the row's resume button clears it. Ledger text is
   shown as text (a reason holding HTML is not markup).
4. A bad or missing token shows a clear error and records nothing; the token is never in the page.
5. A screenshot of a busy dashboard is written to $ORDERGUARD_SCREENSHOTS (else tmp_path).
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, BrowserContext, Locator, Page, expect, sync_playwright

from orderguard import Guard, OncePer, OrderIntent, Side
from orderguard.brokers import PaperBroker
from orderguard.halts import HaltCause, TradingState
from orderguard.policies import Ever
from orderguard.runners import RunnerRecord, new_runner_id
from orderguard.server import ServerConfig, create_app
from orderguard.server.auth import load_or_create_token
from orderguard.states import State
from orderguard.store.base import Caller
from tests.helpers import unavailable

CHROMIUM = "/usr/bin/chromium"
LIVE = 8_000  # ms: how long a live update may take to show (the SQLite event poll is 0.25 s)


# ------------------------------------------------------------------------------ fixtures


@dataclass
class Gateway:
    url: str
    token: str
    guard: Guard
    broker: PaperBroker
    ledger_url: str
    paper_url: str

    def post(self, path: str, body: dict[str, Any], token: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        unavailable(f"{CHROMIUM} is not installed (the dashboard tests drive a real Chromium)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def gateway(tmp_path: Path, ledger_url: str, paper_url: str) -> Iterator[Gateway]:
    """A real uvicorn server on a free port, over the test's ledger and paper venue."""
    token, created = load_or_create_token(tmp_path / "orderguard.token")
    assert created
    config = ServerConfig(  # default policy: OncePer(CalendarDay) by account, strategy, symbol, side
        store=ledger_url, broker=f"paper://{tmp_path / 'paper.db'}", token_file=str(tmp_path / "orderguard.token"),
    )
    guard = Guard.open(ledger_url, runner="orderguard-gateway", strategy="orderguard-gateway", synchronous="NORMAL")
    broker = PaperBroker.open(paper_url, ack_latency=0.2)
    app = create_app(config, guard, broker, token)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=3,
    ))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the gateway did not start")
        time.sleep(0.02)
    try:
        yield Gateway(f"http://127.0.0.1:{port}", token, guard, broker, ledger_url, paper_url)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        broker.close()
        guard.close()


@pytest.fixture
def context(browser: Browser, gateway: Gateway) -> Iterator[BrowserContext]:
    """A browser context on the gateway; every request it makes must stay on the gateway (offline page)."""
    ctx = browser.new_context(base_url=gateway.url, viewport={"width": 1440, "height": 1100})
    foreign: list[str] = []
    ctx.on("request", lambda r: None if r.url.startswith((gateway.url, "data:")) else foreign.append(r.url))
    errors: list[str] = []
    ctx.on("weberror", lambda e: errors.append(str(e.error)))
    ctx.on("console", lambda m: errors.append(m.text) if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
    ctx.set_default_timeout(LIVE)
    expect.set_options(timeout=LIVE)
    yield ctx
    ctx.close()
    assert foreign == [], f"the dashboard requested something outside the gateway: {foreign}"
    assert errors == [], f"uncaught errors in the page: {errors}"


def open_dashboard(ctx: BrowserContext, token: str | None = None) -> Page:
    page = ctx.new_page()
    page.goto("/")
    expect(page.locator("#live-status")).to_have_text("live")
    if token is not None:
        page.fill("#token", token)
    return page


def fill_order(page: Page, *, strategy: str, symbol: str, qty: str, account: str = "main") -> None:
    page.fill("#order-account", account)
    page.fill("#order-strategy", strategy)
    page.fill("#order-symbol", symbol)
    page.fill("#order-qty", qty)


def outcome_of(page: Page) -> tuple[str, str]:
    """The order form's result once it settled: (sent | blocked | error, its text)."""
    box = page.locator("#order-result")
    expect(box).to_have_attribute("data-outcome", re.compile(r"^(sent|blocked|error)$"), timeout=15_000)
    return str(box.get_attribute("data-outcome")), box.inner_text()


def remote_runner(*, heartbeat_every: float, fingerprint: str = "0123456789abcdef") -> RunnerRecord:
    return RunnerRecord(
        id=new_runner_id(), runner="spx-bot", strategy="spx-calendar", host="bot-host.invalid", pid=4242,
        started="boot-x:777", version="0.1.0", fingerprint=fingerprint, git_commit="9f1c2d3e4b5a",
        modules="/srv/bot/strategy.py", exclusive=None, heartbeat_every=heartbeat_every,
    )


def state_cell(page: Page, intent_id: str) -> Locator:
    return page.locator(f'#orders tr[data-intent-id="{intent_id}"] [data-field="state"]')


# ---------------------------------------------------------------------------------- tests


def test_buy_clicked_in_two_tabs_at_once_places_one_order(context: BrowserContext, gateway: Gateway) -> None:
    tabs = [open_dashboard(context, gateway.token) for _ in range(2)]
    for tab in tabs:
        fill_order(tab, strategy="manual-spx", symbol="SPX", qty="4")

    # Both clicks fire at one wall-clock instant, scheduled in each tab's own event loop.
    at = tabs[0].evaluate("Date.now() + 400")
    for tab in tabs:
        tab.evaluate("at => setTimeout(() => document.querySelector('#buy').click(), at - Date.now())", at)
    results = [outcome_of(tab) for tab in tabs]

    orders = gateway.broker.orders()
    assert len(orders) == 1, f"the venue got {len(orders)} orders: {orders}"
    assert sorted(kind for kind, _ in results) == ["blocked", "sent"], results
    sent = next(text for kind, text in results if kind == "sent")
    blocked = next(text for kind, text in results if kind == "blocked")

    [intent] = gateway.guard.store.intents()
    assert intent.client_order_id == orders[0].client_order_id
    assert re.search(rf"^sent: (ACKED|FILLED) as {re.escape(intent.client_order_id)}", sent), sent
    assert re.search(r"^blocked: (DUPLICATE|IN_FLIGHT), held by intent " + intent.id, blocked), blocked
    assert f"sent by dashboard on {intent.host} pid {intent.pid}" in blocked, blocked

    attempts = gateway.guard.store.attempts()
    assert sorted(a.outcome for a in attempts) == ["BLOCKED", "CLAIMED"]
    [block] = [a for a in attempts if a.outcome == "BLOCKED"]
    print(f"race: {block.reason} {abs(attempts[0].at - attempts[1].at) * 1000:.1f} ms apart: {blocked}")
    for tab in tabs:  # both tabs see the order and the block live, the block naming its holder
        expect(state_cell(tab, intent.id)).to_have_text("FILLED")
        entry = tab.locator(f'#blocked-feed li[data-attempt-id="{block.id}"]')
        expect(entry).to_contain_text(block.reason.value if block.reason else "?")
        expect(entry).to_contain_text("manual-spx SPX")
        expect(entry.locator("[data-testid=holder]")).to_have_text(intent.id)
        expect(tab.locator("#chart")).to_have_attribute("data-sent", "1")
        expect(tab.locator("#chart")).to_have_attribute("data-blocked", "1")
        expect(tab.locator("#chart rect.sent")).to_have_count(1)

    # A second click in the tab that sent is blocked too: the order's scope holds the day.
    winner = tabs[[kind for kind, _ in results].index("sent")]
    winner.click("#buy")
    expect(winner.locator("#order-result")).to_have_attribute("data-outcome", "blocked")
    expect(winner.locator("#order-result")).to_contain_text(f"blocked: DUPLICATE, held by intent {intent.id}")
    assert len(gateway.broker.orders()) == 1


def test_changes_made_elsewhere_show_without_reload(context: BrowserContext, gateway: Gateway) -> None:
    page = open_dashboard(context)
    page.evaluate("window.__loaded_once = true")
    other = Guard.open(gateway.ledger_url, runner="cron-bot", strategy="cron-bot")
    venue = PaperBroker.open(gateway.paper_url)
    try:
        # An order placed by another process on the same ledger.
        intent = OrderIntent(account="main", strategy="cron-entry", symbol="AAPL", side=Side.BUY, quantity=10,
                             source="scheduler")
        result = other.submit(intent, venue, policy=OncePer(Ever()))
        assert result.sent and result.intent is not None
        expect(state_cell(page, result.intent.id)).to_have_text("FILLED")
        expect(page.locator(f'#orders tr[data-intent-id="{result.intent.id}"]')).to_contain_text("scheduler on")

        # Its retry is blocked: the feed shows the reason and the holder.
        again = other.submit(intent, venue, policy=OncePer(Ever()))
        assert again.blocked
        entry = page.locator(f'#blocked-feed li[data-holder-id="{result.intent.id}"]')
        expect(entry).to_contain_text("DUPLICATE")
        expect(entry).to_contain_text("cron-entry AAPL")

        # One intent through its states: in flight, UNKNOWN, each shown in place.
        manual = OrderIntent(account="main", strategy="cron-exit", symbol="MSFT", side=Side.SELL, quantity=3)
        with other.claim(manual, policy=OncePer(Ever())) as claim:
            assert claim
            row = page.locator(f'#orders tr[data-intent-id="{claim.intent.id}"]')
            expect(row).to_have_attribute("data-state", "CLAIMED")
            handle = row.element_handle()
            expect(page.locator(f'#inflight tr[data-intent-id="{claim.intent.id}"]')).to_contain_text("CLAIMED")
            _ = claim.client_order_id  # handed out: the order may be on the wire
            claim.unknown("ack lost after 10 s")
            expect(row).to_have_attribute("data-state", "UNKNOWN")
            flight = page.locator(f'#inflight tr[data-intent-id="{claim.intent.id}"]')
            expect(flight).to_contain_text("orderguard reconcile")
            expect(page.locator("#sum-unknown")).to_have_text("1")
            assert handle.evaluate("tr => tr.isConnected && tr.dataset.state") == "UNKNOWN"  # the same row, updated

        # A halt written to the ledger directly (as `orderguard halt` does) shows up, and goes.
        other.store.set_trading_state(
            "strategy=cron-entry", TradingState.HALTED, cause=HaltCause.OPERATOR, reason="venue outage", actor="alice",
        )
        halt_row = page.locator('#halts tr[data-scope="strategy=cron-entry"]')
        expect(halt_row).to_contain_text("venue outage")
        expect(halt_row.locator('[data-field="by"]')).to_have_text("alice")
        expect(page.locator("#halt-banner")).to_contain_text("HALTED: strategy=cron-entry")
        other.store.set_trading_state(
            "strategy=cron-entry", TradingState.ACTIVE, cause=HaltCause.OPERATOR, reason="back", actor="alice",
        )
        expect(halt_row).to_have_count(0)
        expect(page.locator("#halt-banner")).to_be_hidden()

        # Runners come from the periodic refresh: a runner that stopped heartbeating is STALE.
        other.store.register_runner(remote_runner(heartbeat_every=0.05))
        stale = page.locator('#runners tr:has-text("spx-bot")')
        expect(stale.locator('[data-field="state"]')).to_have_text("STALE")
        expect(page.locator("#runner-flags")).to_contain_text("STALE: runner spx-bot on bot-host.invalid pid 4242")
        expect(page.locator('#runners tr:has-text("cron-bot")')).to_contain_text("live")
    finally:
        venue.close()
        other.close()
    assert page.evaluate("window.__loaded_once === true"), "the page reloaded"


def test_halt_form_halts_and_resume_button_clears(context: BrowserContext, gateway: Gateway) -> None:
    page = open_dashboard(context, gateway.token)
    page.fill("#operator", "bob@desk-2")
    hostile = '<img src=x onerror="window.__pwned = 1"><b>runaway</b> strategy'
    page.fill("#halt-scope", "strategy=momo")
    page.fill("#halt-reason", hostile)
    page.click("#halt-submit")
    expect(page.locator("#halt-result")).to_have_attribute("data-outcome", "sent")
    row = page.locator('#halts tr[data-scope="strategy=momo"]')
    expect(row.locator('[data-field="state"]')).to_have_text("HALTED")
    expect(row.locator('[data-field="why"]')).to_have_text(hostile)  # shown as text, not markup
    assert page.locator("#halts img, #halts b").count() == 0
    assert page.evaluate("window.__pwned") is None
    [halt] = gateway.guard.store.halts()
    assert (halt.scope, halt.state, halt.reason, halt.actor) == ("strategy=momo", TradingState.HALTED, hostile, "bob@desk-2")

    # A reducing-only halt; orders through the form are blocked by the first halt.
    page.fill("#halt-scope", "account=main, symbol=BTC/USD")  # a '/' travels escaped in DELETE's path
    page.fill("#halt-reason", "flatten only")
    page.check("#halt-reducing")
    page.click("#halt-submit")
    crypto = page.locator('#halts tr[data-scope="account=main,symbol=BTC%2FUSD"]')
    expect(crypto.locator('[data-field="state"]')).to_have_text("REDUCING")
    fill_order(page, strategy="momo", symbol="TSLA", qty="1")
    page.click("#buy")
    kind, text = outcome_of(page)
    assert kind == "blocked" and text.startswith("blocked: HALTED"), text
    assert gateway.broker.orders() == []

    # Resume needs a reason; with one, the row's button clears the halt in the ledger.
    row.locator("[data-testid=resume]").click()
    expect(page.locator("#halt-result")).to_contain_text("give a reason to resume strategy=momo")
    assert {h.scope for h in gateway.guard.store.halts()} == {"strategy=momo", "account=main,symbol=BTC%2FUSD"}
    row.locator("[data-testid=resume-reason]").fill("fixed the signal")
    row.locator("[data-testid=resume]").click()
    expect(page.locator("#halt-result")).to_contain_text("resumed: strategy=momo is ACTIVE")
    expect(row).to_have_count(0)
    assert [h.scope for h in gateway.guard.store.halts()] == ["account=main,symbol=BTC%2FUSD"]
    last = gateway.guard.store.halt_history(limit=1)[0]
    assert (last.scope, last.state, last.reason, last.actor) == ("strategy=momo", TradingState.ACTIVE, "fixed the signal", "bob@desk-2")
    page.click("#buy")
    kind, text = outcome_of(page)
    assert kind == "sent", text
    crypto.locator("[data-testid=resume-reason]").fill("flat now")
    crypto.locator("[data-testid=resume]").click()
    expect(crypto).to_have_count(0)
    assert gateway.guard.store.halts() == []
    expect(page.locator("#halts tr.empty")).to_have_text("trading is ACTIVE everywhere")


def test_bad_or_missing_token_shows_an_error_and_records_nothing(context: BrowserContext, gateway: Gateway) -> None:
    page = open_dashboard(context)
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method != "GET" else None)

    fill_order(page, strategy="manual", symbol="SPX", qty="2")
    page.click("#sell")  # no token: refused in the page, nothing sent
    kind, text = outcome_of(page)
    assert kind == "error" and "enter the API token first" in text, text
    assert posts == []

    page.fill("#token", "not-the-token-" + "x" * 30)
    page.click("#buy")
    kind, text = outcome_of(page)
    assert kind == "error" and "unauthorized (401)" in text and "nothing was recorded" in text, text
    page.fill("#halt-scope", "global")
    page.fill("#halt-reason", "should not stick")
    page.click("#halt-submit")
    expect(page.locator("#halt-result")).to_contain_text("unauthorized (401)")
    assert len(posts) == 2
    store = gateway.guard.store
    assert (store.intents(), store.attempts(), store.halts(), gateway.broker.orders()) == ([], [], [], [])

    # An invalid quantity is the gateway's 422 message, also recording nothing.
    page.fill("#token", gateway.token)
    page.fill("#order-qty", "1.5.2")
    page.click("#buy")
    kind, text = outcome_of(page)
    assert kind == "error" and text.startswith("error 422 invalid_intent: invalid order intent: quantity"), text
    assert (store.intents(), store.attempts()) == ([], [])

    # The token stays in this tab's sessionStorage, never in the page the gateway serves.
    assert gateway.token not in httpx.get(gateway.url + "/", timeout=10).text
    page.reload()
    expect(page.locator("#token")).to_have_value(gateway.token)
    assert page.evaluate("sessionStorage.getItem('orderguard.token')") == gateway.token
    assert page.locator("#token").get_attribute("type") == "password"
    page.click("#token-clear")
    assert page.evaluate("sessionStorage.getItem('orderguard.token')") is None


def test_screenshot_of_a_busy_dashboard(context: BrowserContext, gateway: Gateway, tmp_path: Path) -> None:
    store = gateway.guard.store
    for strategy, symbol, side, qty in [("spx-calendar", "SPX", "BUY", "4"), ("momentum", "NVDA", "BUY", "25"),
                                        ("momentum", "AMD", "SELL", "40"), ("pairs", "KO", "BUY", "100")]:
        body = {"account": "main", "strategy": strategy, "symbol": symbol, "side": side, "quantity": qty}
        assert gateway.post("/v1/intents", body).status_code == 201
        assert gateway.post("/v1/intents", body).status_code == 409
    # A bot on another host: its runner went silent with an order on the wire.
    store.register_runner(remote_runner(heartbeat_every=0.05))
    bot = Caller(host="bot-host.invalid", pid=4242, runner="spx-bot", thread="MainThread", started="boot-x:777")
    decision = store.claim(
        OrderIntent(account="main", strategy="spx-calendar", symbol="SPXW", side=Side.SELL, quantity=Decimal(2),
                    source="scheduler"),
        [OncePer(Ever())], bot, state=State.SENDING, send_deadline=3600,
    )
    assert decision.claimed
    store.set_trading_state("strategy=momentum", TradingState.HALTED, cause=HaltCause.NOTIONAL_LIMIT,
                            reason="$50,000 per hour reached", actor="runner momentum-bot on vm pid 4711")

    page = open_dashboard(context, gateway.token)
    fill_order(page, strategy="spx-calendar", symbol="SPX", qty="4")
    page.click("#buy")
    expect(page.locator("#order-result")).to_contain_text("blocked: DUPLICATE, held by intent")
    expect(page.locator("#orders tr[data-intent-id]")).to_have_count(5)
    expect(page.locator("#inflight tr[data-intent-id]")).to_have_count(1)
    expect(page.locator("#blocked-feed li[data-attempt-id]")).to_have_count(5)
    expect(page.locator('#runners [data-field="state"]:has-text("STALE")')).to_have_count(1)
    expect(page.locator("#halts tr[data-scope]")).to_have_count(1)
    expect(page.locator("#chart")).to_have_attribute("data-blocked", "5")

    folder = Path(os.environ.get("ORDERGUARD_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    shot = folder / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"dashboard screenshot: {shot}")
