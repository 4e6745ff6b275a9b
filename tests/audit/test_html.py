"""The HTML report in a real headless Chromium (Debian's, driven by Playwright), opened from disk.

The page is built by :func:`orderguard.audit.html.render_html` (and by ``orderguard audit --html``)
from an audit of the generated disaster. Checked in the browser: the timeline draws a visible
circle per non-scale-in cluster of the symbols it shows, on that symbol's row; the bars are one
per symbol, their widths proportional to phantom notional (JD's the widest); the reconciliation
and cluster tables have their rows; the page asks for nothing over the network and logs no
error. Values from the source holding markup are shown as text. A screenshot is written to
$ORDERGUARD_SCREENSHOTS (else tmp_path).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from typer.testing import CliRunner

from orderguard.audit import AuditReport, Verdict, audit
from orderguard.audit.html import BAR_ROWS, TIMELINE_ROWS, render_html
from orderguard.cli import app
from tests.audit.disaster import Disaster, make_disaster
from tests.helpers import unavailable

CHROMIUM = "/usr/bin/chromium"
BOOKS = {"positions": "positions", "cash": "account"}
RED = "#d62828"  # a DUPLICATE cluster's circle


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        unavailable(f"{CHROMIUM} is not installed (the report is checked in a real Chromium: apt-get install chromium)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@dataclass
class Opened:
    page: Page
    url: str
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)


@pytest.fixture
def open_report(browser: Browser) -> Iterator[Any]:
    """``open_report(path)`` loads an HTML file by file:// URL, recording requests, errors and dialogs."""
    contexts = []

    def _open(path: Path) -> Opened:
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(ctx)
        page = ctx.new_page()
        opened = Opened(page, path.resolve().as_uri())
        page.on("request", lambda r: opened.requests.append(r.url))
        page.on("console", lambda m: opened.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: opened.errors.append(str(e)))

        def dismiss(dialog: Any) -> None:
            opened.dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", dismiss)
        page.goto(opened.url, wait_until="load")
        return opened

    yield _open
    for ctx in contexts:
        ctx.close()


def boxes(page: Page, selector: str) -> list[dict[str, Any]]:
    """Rendered boxes of the elements matching ``selector``, with their <title> and attributes."""
    return page.evaluate(
        """sel => Array.from(document.querySelectorAll(sel)).map(e => {
            const r = e.getBoundingClientRect();
            const t = e.querySelector('title');
            return {x: r.x, y: r.y, w: r.width, h: r.height, title: t ? t.textContent : null,
                    text: e.textContent, fill: e.getAttribute('fill')};
        })""",
        selector,
    )


def screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("ORDERGUARD_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    shot = folder / name
    page.screenshot(path=str(shot), full_page=True)
    return shot


def row_count(page: Page, table: str) -> int:
    return page.locator(f"table#{table} tr").count()


def check_page(opened: Opened, report: AuditReport, d: Disaster) -> None:
    page = opened.page
    assert opened.requests == [opened.url]  # the page alone: no script, style, font or image fetched
    assert opened.errors == [] and opened.dialogs == []

    # timeline: a row per symbol with a non-scale-in cluster (at most TIMELINE_ROWS, the most phantom money
    # first), a circle per such cluster on them
    svg = boxes(page, "svg#timeline")[0]
    labels = {b["text"]: b for b in boxes(page, "svg#timeline text[text-anchor='end']")}
    phantom_symbols = [t.symbol for t in report.by_symbol()]
    reviewed = {c.symbol for c in report.clusters if c.verdict is not Verdict.SCALE_IN}
    assert len(reviewed) <= TIMELINE_ROWS and set(labels) == reviewed
    assert set(phantom_symbols) <= set(labels)
    shown = [c for c in report.clusters if c.verdict is not Verdict.SCALE_IN and c.symbol in labels]
    circles = boxes(page, "svg#timeline circle")
    assert len(circles) == len(shown) > 0
    assert sum(c["fill"] == RED for c in circles) == sum(c.verdict is Verdict.DUPLICATE for c in shown) == len(phantom_symbols)
    for c in circles:
        assert c["w"] > 1 and c["h"] > 1, c
        assert svg["x"] - 0.5 <= c["x"] and c["x"] + c["w"] <= svg["x"] + svg["w"] + 0.5, (c, svg)
        assert svg["y"] - 0.5 <= c["y"] and c["y"] + c["h"] <= svg["y"] + svg["h"] + 0.5, (c, svg)
        row = labels[c["title"].split(" ", 1)[0]]  # the circle sits on its symbol's row
        assert abs((c["y"] + c["h"] / 2) - (row["y"] + row["h"] / 2)) < row["h"], (c, row)

    # bars: one per symbol with duplicates (at most BAR_ROWS), width proportional to phantom notional
    bars = boxes(page, "svg#bars rect")
    totals = report.by_symbol()[:BAR_ROWS]
    assert [b["title"].split(" ", 1)[0] for b in bars] == [t.symbol for t in totals]
    widest = max(bars, key=lambda b: b["w"])
    assert widest["title"].startswith("JD ") and widest["w"] > 100
    assert totals[0].symbol == "JD" and d.burst_sizes["JD"] == max(d.burst_sizes.values())
    top = float(totals[0].phantom_notional)
    for bar, total in zip(bars, totals, strict=True):
        assert bar["h"] > 1
        assert abs(bar["w"] - widest["w"] * float(total.phantom_notional) / top) <= 1.0, (bar, total)

    # tables
    assert row_count(page, "positions") == 1 + 47
    assert page.locator("table#positions td.PHANTOM").count() == len(d.burst_sizes)
    assert row_count(page, "cash") == 1 + 1
    assert f"{d.true_cash:,.2f}" in page.locator("table#cash").inner_text()
    counts = report.counts()
    assert row_count(page, "clusters") == 1 + counts["DUPLICATE"] + counts["POSSIBLE"]
    assert page.locator("table#clusters td", has_text="DUPLICATE").count() == len(d.burst_sizes)


def test_report_renders_its_charts_in_chromium(
    disaster_db: tuple[str, Disaster], open_report: Any, tmp_path: Path,
) -> None:
    path, d = disaster_db
    report = audit(path, **BOOKS)
    target = tmp_path / "audit.html"
    target.write_text(render_html(report), encoding="utf-8")
    opened = open_report(target)
    check_page(opened, report, d)
    shot = screenshot(opened.page, tmp_path, "audit_report.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 30_000
    print(f"audit report screenshot: {shot}")


def test_cli_html_report_renders_in_chromium(disaster_db: tuple[str, Disaster], open_report: Any, tmp_path: Path) -> None:
    path, d = disaster_db
    target = tmp_path / "cli-report.html"
    result = CliRunner().invoke(app, ["audit", path, "--positions", "positions", "--cash", "account", "--html", str(target)])
    assert result.exit_code == 1, result.output  # duplicates found
    assert f"report: {target}" in result.stdout
    check_page(open_report(target), audit(path, **BOOKS), d)


def test_small_history_draws_every_cluster_and_symbol(tmp_path: Path, open_report: Any) -> None:
    path = str(tmp_path / "small.db")
    d = make_disaster(path, seed=3, symbols=12, burst_symbols=8)
    report = audit(path, **BOOKS)
    target = tmp_path / "small.html"
    target.write_text(render_html(report), encoding="utf-8")
    page = open_report(target).page
    non_scale_in = [c for c in report.clusters if c.verdict is not Verdict.SCALE_IN]
    assert page.locator("svg#timeline circle").count() == len(non_scale_in) > len(d.burst_sizes)
    assert page.locator("svg#bars rect").count() == len(d.burst_sizes) == 8
    assert row_count(page, "clusters") == 1 + len(non_scale_in)


HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "</title><svg onload=alert(3)>"]


def test_markup_in_the_source_is_shown_as_text(tmp_path: Path, open_report: Any) -> None:
    folder = tmp_path / "<b>evil'dir"
    folder.mkdir()
    path = str(folder / "trades.db")
    d = make_disaster(path, seed=5, symbols=10, burst_symbols=6)
    conn = sqlite3.connect(path)
    with conn:
        for old, new in zip(("JD", "TERN"), HOSTILE, strict=False):
            conn.execute("UPDATE trades SET symbol = ? WHERE symbol = ?", (new, old))
            conn.execute("UPDATE positions SET symbol = ? WHERE symbol = ?", (new, old))
        conn.execute("UPDATE trades SET strategy = ? WHERE strategy = 'momentum'", (HOSTILE[2],))
    conn.close()
    report = audit(path, **BOOKS)
    assert {HOSTILE[0], HOSTILE[1]} <= {c.symbol for c in report.duplicates}
    html = render_html(report)
    assert not any(tag in html.lower() for tag in ("<script", "<img", "<svg onload"))
    target = tmp_path / "hostile.html"
    target.write_text(html, encoding="utf-8")
    opened = open_report(target)
    page = opened.page
    assert page.locator("script").count() == 0 and page.locator("img").count() == 0
    assert page.locator("[onerror], [onload]").count() == 0
    assert page.locator("svg").count() == 2  # the two charts, none from the source
    assert opened.dialogs == [] and opened.errors == [] and opened.requests == [opened.url]
    text = page.locator("body").inner_text()
    for value in HOSTILE:
        assert value in text, value
    assert str(folder) in page.title()
    labels = [t.strip() for t in page.locator("svg#timeline text[text-anchor='end']").all_text_contents()]
    assert HOSTILE[0] in labels and HOSTILE[1] in labels
    assert page.locator("table#positions td", has_text=HOSTILE[0]).count() == 1
    assert len(d.burst_sizes) == 6
