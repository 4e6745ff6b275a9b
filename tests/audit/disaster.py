"""A generator of damaged trade histories in the shape of the JD post-mortem.

~47 symbols traded normally for a few days by three strategies (entries, slow and fast
scale-ins, partial and full exits, two strategies sometimes trading one symbol seconds apart),
then a two-hour window in which parallel tasks recorded bursts of 2–52 near-identical buys of
one symbol seconds apart (and a few sell bursts). The positions table holds what the intended
trades imply (correct); the account's cash paid for every recorded trade, duplicates included
(drained). Every row id is labelled: which are injected duplicates is known exactly.
"""

from __future__ import annotations

import random
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

SYMBOLS = ["JD", "TERN", "TRIP", "SNDK", "CYBR", "GS", "T", "AAPL", "MSFT", "NVDA", "AMD", "TSLA", "META", "AMZN", "GOOG", "NFLX", "INTC", "ORCL", "CRM", "ADBE", "PYPL", "SHOP", "UBER", "LYFT", "SNAP", "PINS", "ROKU", "ZM", "DOCU", "PLTR", "SOFI", "HOOD", "COIN", "RIVN", "LCID", "F", "GM", "BA", "DAL", "UAL", "CCL", "XOM", "CVX", "KO", "PEP", "WMT", "COST"]
STRATEGIES = ("momentum", "meanrev", "breakout")
START = datetime(2026, 1, 20, 14, 30, tzinfo=UTC)
CENT = Decimal("0.01")


@dataclass
class Disaster:
    """What :func:`make_disaster` wrote, as exact decimals: the answers an audit must find."""

    path: str
    starting_cash: Decimal
    true_cash: Decimal  # what the cash would be had only the intended trades been recorded
    recorded_cash: Decimal  # what account.cash holds: every duplicate paid for (stored to the cent)
    duplicate_ids: set[int] = field(default_factory=set)  # trades.id of every injected duplicate
    legit_ids: set[int] = field(default_factory=set)  # trades.id of every intended trade (the burst originals too)
    # symbol -> orders in its burst (the original + burst - 1 duplicates); one burst per symbol, all by
    # "momentum". A normal trade of that strategy may fall within the window, so the cluster an audit
    # finds can hold more orders than the burst: its duplicates are burst - 1.
    burst_sizes: dict[str, int] = field(default_factory=dict)
    positions: dict[str, Decimal] = field(default_factory=dict)  # symbol -> net quantity held (non-zero only)


@dataclass
class _Trade:
    ts: datetime
    symbol: str
    side: str
    qty: Decimal
    price: Decimal
    strategy: str
    duplicate: bool = False


def _price(rng: random.Random, base: Decimal, pct: float) -> Decimal:
    return (base * Decimal(str(1 + rng.uniform(-pct, pct)))).quantize(CENT)


def make_disaster(path: str, *, seed: int = 7, symbols: int = 47, days: int = 4, burst_symbols: int = 40) -> Disaster:
    """Write a new SQLite database at ``path`` and return what is in it.

    Tables: ``trades(id INTEGER PRIMARY KEY, timestamp TEXT 'YYYY-MM-DD HH:MM:SS.ffffff' UTC, symbol,
    side ('buy'/'BUY'... mixed case), quantity REAL, price REAL, strategy)``, ``positions(symbol,
    quantity REAL, avg_cost REAL)`` (the intended trades' non-zero net per symbol) and
    ``account(id, cash REAL)`` (one row). Quantities are whole, prices to the cent, so each REAL's
    shortest repr is its exact decimal. ``symbols`` (at most 47) are traded for ``days``; the first
    ``burst_symbols`` get a burst on the last day (JD 52 orders, TERN 35, TRIP 29, SNDK 24, CYBR 24,
    GS 22, T 21, the rest 2-20; KO and PEP, if bursting, sell). The same seed writes the same database.
    """
    rng = random.Random(seed)
    names = SYMBOLS[:symbols]
    base = {s: Decimal(rng.randint(500, 40_000)) / 100 for s in names}
    trades: list[_Trade] = []
    held: dict[str, Decimal] = dict.fromkeys(names, Decimal(0))
    by_strategy: dict[tuple[str, str], Decimal] = {}

    def add(t: _Trade) -> None:
        trades.append(t)
        if not t.duplicate:
            held[t.symbol] += t.qty if t.side == "BUY" else -t.qty
            key = (t.strategy, t.symbol)
            by_strategy[key] = by_strategy.get(key, Decimal(0)) + (t.qty if t.side == "BUY" else -t.qty)

    for day in range(days):
        open_at = START + timedelta(days=day)
        for symbol in names:
            entries: list[tuple[str, datetime]] = []
            for _entry in range(rng.randint(1, 3)):
                strategy = rng.choice(STRATEGIES)
                at = open_at + timedelta(seconds=rng.uniform(0, 5.5 * 3600))
                # independent entries of one strategy in one symbol are never minutes apart (that would be a duplicate)
                if any(s == strategy and abs((at - t).total_seconds()) < 1800 for s, t in entries):
                    continue
                entries.append((strategy, at))
                price = _price(rng, base[symbol], 0.02)
                qty = Decimal(max(1, int(Decimal(rng.choice((2000, 3000, 5000))) / price)))
                add(_Trade(at, symbol, "BUY", qty, price, strategy))
                style = rng.random()
                if style < 0.3:  # slow scale-in: adds minutes apart
                    for _ in range(rng.randint(1, 3)):
                        at += timedelta(seconds=rng.uniform(120, 1200))
                        add(_Trade(at, symbol, "BUY", qty, _price(rng, price, 0.01), strategy))
                elif style < 0.5:  # fast scale-in: a smaller add 20-55 s later after the price moved
                    for _ in range(rng.randint(1, 2)):
                        at += timedelta(seconds=rng.uniform(20, 55))
                        moved = price * Decimal(str(1 + rng.choice((-1, 1)) * rng.uniform(0.006, 0.02)))
                        add(_Trade(at, symbol, "BUY", max(Decimal(1), (qty * Decimal(str(rng.uniform(0.3, 0.7)))).to_integral_value()),
                                   moved.quantize(CENT), strategy))
                elif style < 0.6:  # another strategy buys the same symbol seconds later (legit: its own scope)
                    other = rng.choice([s for s in STRATEGIES if s != strategy])
                    add(_Trade(at + timedelta(seconds=rng.uniform(0.5, 3)), symbol, "BUY", qty, price, other))
                if rng.random() < 0.5:  # exit, partly or fully, later that day
                    mine = by_strategy.get((strategy, symbol), Decimal(0))
                    if mine > 0:
                        out = mine if rng.random() < 0.5 else max(Decimal(1), (mine / 2).to_integral_value())
                        add(_Trade(at + timedelta(seconds=rng.uniform(1800, 7200)), symbol, "SELL", out,
                                   _price(rng, price, 0.03), strategy))

    # The disaster: 18:19-19:14 on the last day, parallel tasks all buying (a few selling) the same symbol.
    disaster_at = START + timedelta(days=days - 1, hours=3, minutes=49)
    burst_sizes: dict[str, int] = {}
    sizes = [52, 35, 29, 24, 24, 22, 21] + [rng.randint(2, 20) for _ in range(burst_symbols - 7)]
    for n, symbol in zip(sizes, names[:burst_symbols], strict=False):
        strategy = "momentum"
        side = "SELL" if symbol in ("KO", "PEP") else "BUY"
        at = disaster_at + timedelta(seconds=rng.uniform(0, 55 * 60))
        price = _price(rng, base[symbol], 0.01)
        qty = Decimal(max(1, int(Decimal(5000) / price)))
        if side == "SELL":
            add(_Trade(at - timedelta(minutes=30), symbol, "BUY", qty, price, strategy))  # something to sell
        add(_Trade(at, symbol, side, qty, price, strategy))
        vary = symbol in ("JD", "TERN", "TRIP", "T")  # sized per task from a moving price, like JD's 8,783 shares
        for _ in range(n - 1):
            at += timedelta(seconds=rng.uniform(0.05, 4))
            q = (qty * Decimal(str(rng.uniform(0.9, 1.1)))).to_integral_value() if vary else qty
            add(_Trade(at, symbol, side, max(Decimal(1), q), _price(rng, price, 0.002), strategy, duplicate=True))
        burst_sizes[symbol] = n

    trades.sort(key=lambda t: t.ts)
    starting = Decimal(5_000_000)
    cash = starting
    true_cash = starting
    for t in trades:
        flow = t.qty * t.price * (1 if t.side == "SELL" else -1)
        cash += flow
        if not t.duplicate:
            true_cash += flow
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE trades (id INTEGER PRIMARY KEY, timestamp TEXT NOT NULL, symbol TEXT, side TEXT, quantity REAL, "
        "price REAL, strategy TEXT);"
        "CREATE TABLE positions (symbol TEXT PRIMARY KEY, quantity REAL, avg_cost REAL);"
        "CREATE TABLE account (id INTEGER PRIMARY KEY, cash REAL);"
    )
    result = Disaster(path, starting, true_cash, cash, burst_sizes=burst_sizes)
    for t in trades:
        cur = conn.execute(
            "INSERT INTO trades (timestamp, symbol, side, quantity, price, strategy) VALUES (?, ?, ?, ?, ?, ?)",
            (t.ts.strftime("%Y-%m-%d %H:%M:%S.%f"), t.symbol, t.side.lower() if rng.random() < 0.5 else t.side,
             float(t.qty), float(t.price), t.strategy),
        )
        (result.duplicate_ids if t.duplicate else result.legit_ids).add(int(cur.lastrowid or 0))
    for symbol, qty in held.items():
        if qty:
            conn.execute("INSERT INTO positions VALUES (?, ?, ?)", (symbol, float(qty), float(base[symbol])))
            result.positions[symbol] = qty
    conn.execute("INSERT INTO account (cash) VALUES (?)", (float(cash.quantize(CENT)),))
    conn.commit()
    conn.close()
    return result
