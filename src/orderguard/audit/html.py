"""The audit as one self-contained HTML page: inline SVG charts, no script, no outside requests.

Readable from a mail attachment or a file share: a timeline of the clusters (one row per symbol,
a circle per cluster sized by its orders, coloured by verdict), bars of phantom notional per
symbol, the reconciliation, and the clusters themselves. Every value from the source is escaped.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal
from html import escape
from typing import TYPE_CHECKING

from ..intent import canonical_decimal
from .clusters import Verdict
from .report import iso_us

if TYPE_CHECKING:
    from .clusters import Cluster
    from .report import AuditReport

COLORS = {Verdict.DUPLICATE: "#d62828", Verdict.POSSIBLE: "#f4a261", Verdict.SCALE_IN: "#8d99ae"}
TIMELINE_ROWS = 50
BAR_ROWS = 50
TABLE_ROWS = 300
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2433;background:#fbfbfd}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}.muted{color:#6b7280}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}.card{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:20px}.bad{color:#b91c1c}table{border-collapse:collapse;background:#fff;font-size:13px}
th,td{border:1px solid #e5e7eb;padding:4px 8px;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
svg{background:#fff;border:1px solid #e5e7eb;border-radius:8px}.legend span{display:inline-block;margin-right:14px}
.dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:4px;vertical-align:middle}
.PHANTOM{color:#b91c1c}.REAL{color:#7c3aed}.UNEXPLAINED{color:#b45309}
"""


def _money(value: Decimal) -> str:
    return f"{value:,.2f}"


def _qty(value: Decimal) -> str:
    return canonical_decimal(value)


def render_html(report: AuditReport) -> str:
    """The report page as a string (write it with ``open(path, "w").write(...)``)."""
    counts = report.counts()
    cash_error = sum((c.phantom for c in report.cash or ()), Decimal(0))
    cards = [
        ("trades scanned", f"{report.rows:,}", ""),
        ("duplicate orders", f"{report.duplicate_orders:,}", "bad" if report.duplicate_orders else ""),
        ("excess quantity", _qty(report.excess_qty), ""),
        ("phantom notional", _money(report.phantom_notional), "bad" if report.duplicate_orders else ""),
        ("duplicate clusters", f"{counts['DUPLICATE']:,}", ""),
        ("possible (review)", f"{counts['POSSIBLE']:,}", ""),
        ("scale-ins (kept)", f"{counts['SCALE_IN']:,}", ""),
    ]
    if report.cash is not None:
        cards.append(("cash error", _money(cash_error), "bad" if cash_error else ""))
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        f"<title>orderguard audit: {escape(report.source.display)}</title><style>{CSS}</style></head><body>",
        "<h1>orderguard audit</h1>",
        f"<div class='muted'>{escape(report.source.display)}"
        + (f" · table {escape(report.table)}" if report.table else "")
        + f" · {escape(iso_us(report.first_us))} to {escape(iso_us(report.last_us))} · {report.symbols:,} symbols"
        + f" · window {report.settings.window_seconds:g} s, duplicate at confidence ≥ {report.settings.min_confidence:g}"
        + f" · written {escape(datetime.now(UTC).isoformat(timespec='seconds'))}</div>",
        "<div class='cards'>"
        + "".join(f"<div class='card'><span class='muted'>{escape(k)}</span><b class='{c}'>{escape(v)}</b></div>" for k, v, c in cards)
        + "</div>",
    ]
    for warning in report.warnings:
        parts.append(f"<p class='bad'>warning: {escape(warning)}</p>")
    parts.append("<h2>Timeline of clusters</h2>")
    parts.append(
        "<div class='legend'>" + "".join(
            f"<span><i class='dot' style='background:{COLORS[v]}'></i>{escape(v.value)}</span>" for v in Verdict
        ) + "<span class='muted'>circle area = orders in the cluster</span></div>"
    )
    parts.append(_timeline(report))
    parts.append("<h2>Phantom notional per symbol</h2>")
    parts.append(_bars(report))
    if report.positions is not None:
        parts.append(_positions_table(report))
    if report.cash is not None:
        parts.append(_cash_table(report))
    parts.append(_clusters_table(report))
    parts.append("</body></html>")
    return "\n".join(parts)


def _timeline(report: AuditReport) -> str:
    shown = [c for c in report.clusters if c.verdict is not Verdict.SCALE_IN] or list(report.clusters)
    if not shown:
        return "<p class='muted'>No clusters: no two trades of one scope, symbol and side within the window.</p>"
    weight: dict[str, float] = {}
    for c in shown:
        weight[c.symbol] = weight.get(c.symbol, 0.0) + float(c.phantom_notional) + c.orders
    ranked = sorted(weight, key=lambda s: -weight[s])
    symbols = ranked[:TIMELINE_ROWS]
    note = (
        f"<p class='muted'>{len(symbols)} of {len(ranked)} symbols shown (most phantom notional first); "
        "the clusters table below lists them all.</p>" if len(ranked) > len(symbols) else ""
    )
    rows = {s: i for i, s in enumerate(symbols)}
    shown = [c for c in shown if c.symbol in rows]
    start, end = min(c.first_us for c in shown), max(c.last_us for c in shown)
    span = max(end - start, 60_000_000)
    left, width, row_h, top = 90, 860, 22, 20
    height = top + row_h * len(symbols) + 40
    out = [note, f"<svg role='img' aria-label='timeline of clusters' width='{left + width + 20}' height='{height}' id='timeline'>"]
    for s, i in rows.items():
        y = top + i * row_h + row_h / 2
        out.append(f"<text x='{left - 8}' y='{y + 4:.1f}' text-anchor='end' font-size='12'>{escape(s)}</text>")
        out.append(f"<line x1='{left}' x2='{left + width}' y1='{y:.1f}' y2='{y:.1f}' stroke='#f0f1f4'/>")
    for tick in range(5):
        at = start + span * tick // 4
        x = left + width * tick / 4
        out.append(f"<text x='{x:.1f}' y='{height - 12}' text-anchor='middle' font-size='11' fill='#6b7280'>{escape(iso_us(at)[5:16].replace('T', ' '))}</text>")
    for c in sorted(shown, key=lambda c: -c.orders):
        x = left + width * (c.first_us - start) / span
        y = top + rows[c.symbol] * row_h + row_h / 2
        r = min(row_h * 0.9, 3 + 1.6 * math.sqrt(c.orders))
        tip = (
            f"{c.symbol} {' '.join(c.scope)} {c.side}: {c.orders} orders from {iso_us(c.first_us)}, {c.repeats} duplicates, "
            f"{_money(c.phantom_notional)} phantom, confidence {c.confidence}"
        )
        out.append(
            f"<circle class='cluster' cx='{x:.1f}' cy='{y:.1f}' r='{r:.1f}' fill='{COLORS[c.verdict]}' fill-opacity='0.7' "
            f"stroke='#1d2433' stroke-width='0.5'><title>{escape(tip)}</title></circle>"
        )
    out.append("</svg>")
    return "".join(out)


def _bars(report: AuditReport) -> str:
    every = report.by_symbol()
    totals = every[:BAR_ROWS]
    if not totals:
        return "<p class='muted'>No duplicates.</p>"
    note = f"<p class='muted'>{len(totals)} of {len(every)} shown, most phantom notional first.</p>" if len(every) > len(totals) else ""
    top = max(float(t.phantom_notional) for t in totals) or 1.0
    left, width, row_h = 170, 640, 20
    out = [note, f"<svg role='img' aria-label='phantom notional per symbol' width='{left + width + 200}' height='{row_h * len(totals) + 10}' id='bars'>"]
    for i, t in enumerate(totals):
        y = 5 + i * row_h
        w = max(1.0, width * float(t.phantom_notional) / top)
        label = f"{t.symbol} {' '.join(t.scope)}".strip()
        out.append(f"<text x='{left - 8}' y='{y + 13}' text-anchor='end' font-size='12'>{escape(label)}</text>")
        out.append(
            f"<rect class='bar' x='{left}' y='{y + 2}' width='{w:.1f}' height='{row_h - 5}' fill='#d62828' fill-opacity='0.75'>"
            f"<title>{escape(label)}: {t.duplicate_orders} duplicate orders, {escape(_qty(t.excess_qty))} excess, "
            f"{escape(_money(t.phantom_notional))} phantom</title></rect>"
        )
        out.append(
            f"<text x='{left + w + 6:.1f}' y='{y + 13}' font-size='11' fill='#374151'>{escape(_money(t.phantom_notional))} · "
            f"{t.duplicate_orders} dup · {escape(_qty(t.excess_qty))} excess</text>"
        )
    out.append("</svg>")
    return "".join(out)


def _positions_table(report: AuditReport) -> str:
    assert report.positions is not None and report.positions_ref is not None
    keys = list(report.positions_ref.join)
    rows = sorted(report.positions, key=lambda p: (p.status.value == "OK", p.symbol))
    head = "".join(f"<th>{escape(k)}</th>" for k in keys)
    out = [
        "<h2>Positions reconciliation</h2>",
        f"<table id='positions'><tr>{head}<th>symbol</th><th>trades net</th><th>duplicates net</th><th>position</th><th>status</th></tr>",
    ]
    for p in rows:
        cells = "".join(f"<td>{escape(v)}</td>" for v in p.key)
        out.append(
            f"<tr>{cells}<td>{escape(p.symbol)}</td><td class='n'>{escape(_qty(p.trades_net))}</td>"
            f"<td class='n'>{escape(_qty(p.duplicates_net))}</td><td class='n'>{escape(_qty(p.position))}</td>"
            f"<td class='{p.status.value}'>{p.status.value}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def _cash_table(report: AuditReport) -> str:
    assert report.cash is not None and report.cash_ref is not None
    keys = list(report.cash_ref.join)
    head = "".join(f"<th>{escape(k)}</th>" for k in keys)
    out = [
        "<h2>Cash reconciliation</h2>",
        f"<table id='cash'><tr>{head}<th>recorded cash</th><th>drained by phantoms</th><th>corrected cash</th>"
        "<th>implied by all trades</th></tr>",
    ]
    for c in report.cash:
        cells = "".join(f"<td>{escape(v)}</td>" for v in c.key)
        implied = "" if c.implied_by_trades is None else _money(c.implied_by_trades)
        out.append(
            f"<tr>{cells}<td class='n'>{_money(c.recorded)}</td><td class='n bad'>{_money(c.phantom)}</td>"
            f"<td class='n'>{_money(c.corrected)}</td><td class='n'>{implied}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def _clusters_table(report: AuditReport) -> str:
    clusters: list[Cluster] = [c for c in report.clusters if c.verdict is not Verdict.SCALE_IN][:TABLE_ROWS]
    scope_head = "".join(f"<th>{escape(s)}</th>" for s in report.columns.scope)
    out = [
        f"<h2>Clusters ({len(clusters)} shown; scale-ins left out)</h2>",
        f"<table id='clusters'><tr>{scope_head}<th>symbol</th><th>side</th><th>first</th><th>orders</th><th>duplicates</th>"
        "<th>excess qty</th><th>phantom notional</th><th>max gap s</th><th>confidence</th><th>verdict</th><th>positions</th></tr>",
    ]
    for c in clusters:
        scope = "".join(f"<td>{escape(v)}</td>" for v in c.scope)
        out.append(
            f"<tr>{scope}<td>{escape(c.symbol)}</td><td>{c.side}</td><td>{escape(iso_us(c.first_us))}</td>"
            f"<td class='n'>{c.orders}</td><td class='n'>{c.repeats}</td><td class='n'>{escape(_qty(c.excess_qty))}</td>"
            f"<td class='n'>{_money(c.phantom_notional)}</td><td class='n'>{c.max_gap_seconds:g}</td>"
            f"<td class='n'>{c.confidence:.2f}</td><td>{c.verdict.value}</td><td>{report.status_of(c).value}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)
