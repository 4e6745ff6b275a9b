"""PaperBroker: a real embedded venue on its own SQLite file.

Several processes can share one paper venue (the file is the venue), which is what makes
cross-process duplicate tests honest: every order any process places lands in one order log.
It keeps positions and cash, fills after a configurable delay (optionally in parts), rejects
on request, and injects the faults real venues have: the ack lost after the order was
accepted, lookups that lag behind acceptance, connections that reset before the order arrived.
Its dedupe class (permanent, open-orders-only, none) is configurable.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .._sqlite import SQLiteFile
from ..errors import AmbiguousOutcome, ConfigurationError, DuplicateClientOrderId, OrderRejected
from ..intent import canonical_decimal
from ..store.sqlite import path_from_url
from .base import AccountInfo, BrokerOrder, OrderRequest, OrderStatus, Position, VenueDedupe

if TYPE_CHECKING:
    import sqlite3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    id              INTEGER PRIMARY KEY,
    client_order_id TEXT NOT NULL,
    account         TEXT NOT NULL,
    symbol          TEXT NOT NULL,
    side            TEXT NOT NULL,
    quantity        TEXT NOT NULL,
    order_type      TEXT NOT NULL,
    limit_price     TEXT,
    stop_price      TEXT,
    time_in_force   TEXT NOT NULL,
    status          TEXT NOT NULL,
    filled_quantity TEXT NOT NULL DEFAULT '0',
    notional        TEXT NOT NULL DEFAULT '0',
    fills_done      INTEGER NOT NULL DEFAULT 0,
    created_at      REAL NOT NULL,
    visible_at      REAL NOT NULL,
    fill_delay      REAL NOT NULL,
    parts           INTEGER NOT NULL,
    pid             INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_coid ON orders(client_order_id);
CREATE INDEX IF NOT EXISTS orders_open ON orders(status);
CREATE TABLE IF NOT EXISTS positions (
    account  TEXT NOT NULL,
    symbol   TEXT NOT NULL,
    quantity TEXT NOT NULL,
    PRIMARY KEY (account, symbol)
);
CREATE TABLE IF NOT EXISTS cash (
    account TEXT PRIMARY KEY,
    amount  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS prices (
    symbol TEXT PRIMARY KEY,
    price  TEXT NOT NULL
);
"""
_ORDER_COLUMNS = (
    "id, client_order_id, account, symbol, side, quantity, status, filled_quantity, notional"
)
_OPEN = ("ACCEPTED", "PARTIALLY_FILLED")


@dataclass
class PaperFaults:
    """Faults to inject, per PaperBroker instance (so one process can misbehave alone).

    Counts are consumed one per order; ``-1`` means every order.
    """

    lose_ack: int = 0  # accept and record the order, then raise AmbiguousOutcome
    disconnect: int = 0  # raise AmbiguousOutcome before the order reaches the venue
    lookup_lag: float = 0.0  # an accepted order stays invisible to lookup() this many seconds
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take(self, name: str) -> bool:
        with self._lock:
            left = getattr(self, name)
            if left == 0:
                return False
            if left > 0:
                setattr(self, name, left - 1)
            return True


class PaperBroker:
    """An embedded venue several processes share through one SQLite file.

    ``fill_delay`` seconds after acceptance an order fills (in ``partial_fills`` equal parts
    spread over the delay); ``ack_latency`` is slept between acceptance and the reply.
    Market orders fill at the symbol's price (``set_price``, default ``default_price``);
    limit and stop orders rest until the price allows them.
    """

    name = "paper"

    def __init__(
        self,
        path: str,
        *,
        dedupe: VenueDedupe | str = VenueDedupe.PERMANENT,
        ack_latency: float = 0.0,
        fill_delay: float = 0.0,
        partial_fills: int = 1,
        reject_symbols: tuple[str, ...] = (),
        faults: PaperFaults | None = None,
        starting_cash: Decimal | int | str = Decimal("1000000"),
        default_price: Decimal | int | str = Decimal("100"),
        lookup_grace: float | None = None,
        synchronous: str = "NORMAL",
    ) -> None:
        if ack_latency < 0 or fill_delay < 0:
            raise ConfigurationError("ack_latency and fill_delay must be >= 0 seconds")
        if isinstance(partial_fills, bool) or not isinstance(partial_fills, int) or partial_fills < 1:
            raise ConfigurationError("partial_fills must be a positive integer")
        self.path = path
        self.dedupe = VenueDedupe(dedupe)
        self.ack_latency = float(ack_latency)
        self.fill_delay = float(fill_delay)
        self.partial_fills = partial_fills
        self.reject_symbols = frozenset(reject_symbols)
        self.faults = faults or PaperFaults()
        self.starting_cash = Decimal(starting_cash)
        self.default_price = Decimal(default_price)
        # Lookups may lag acceptance by ``faults.lookup_lag``: reconcile waits at least that.
        self.lookup_grace = float(lookup_grace) if lookup_grace is not None else 2 * self.faults.lookup_lag
        self._db = SQLiteFile(path, synchronous=synchronous, busy_timeout=10.0, label="paper venue")
        with self._db.write("paper venue schema") as conn:
            self._db.run_script(conn, _SCHEMA)

    @classmethod
    def open(cls, url: str = "sqlite:///paper.db", **options: Any) -> PaperBroker:
        """Open (creating if needed) the paper venue at a ``sqlite:///path`` URL or path."""
        return cls(path_from_url(url), **options)

    # ------------------------------------------------------------------------- orders

    def submit(self, order: OrderRequest) -> BrokerOrder:
        order.check_deadline()
        if self.faults.take("disconnect"):
            raise AmbiguousOutcome(f"paper venue: connection reset while sending {order.client_order_id}")
        if order.symbol in self.reject_symbols:
            raise OrderRejected(f"paper venue rejected {order.client_order_id}: symbol {order.symbol} is not tradable")
        now = time.time()
        with self._db.write("paper submit") as conn:
            self._check_duplicate(conn, order.client_order_id)
            order_id = conn.execute(
                """INSERT INTO orders(client_order_id, account, symbol, side, quantity, order_type,
                       limit_price, stop_price, time_in_force, status, created_at, visible_at,
                       fill_delay, parts, pid)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'ACCEPTED', ?, ?, ?, ?, ?) RETURNING id""",
                (
                    order.client_order_id, order.account, order.symbol, order.side,
                    canonical_decimal(order.quantity), order.order_type,
                    _text(order.limit_price), _text(order.stop_price), order.time_in_force,
                    now, now + self.faults.lookup_lag, self.fill_delay, self.partial_fills, os.getpid(),
                ),
            ).fetchone()[0]
            self._advance(conn, now)
            placed = self._order(conn, "id = ?", (order_id,))
        if self.ack_latency:
            time.sleep(self.ack_latency)
        if self.faults.take("lose_ack"):
            raise AmbiguousOutcome(f"paper venue: accepted {order.client_order_id} but the ack was lost")
        assert placed is not None
        return placed

    def _check_duplicate(self, conn: sqlite3.Connection, coid: str) -> None:
        if self.dedupe is VenueDedupe.NONE:
            return
        row = conn.execute(
            "SELECT status FROM orders WHERE client_order_id = ? ORDER BY id DESC LIMIT 1", (coid,)
        ).fetchone()
        if row is None:
            return
        if self.dedupe is VenueDedupe.PERMANENT or row[0] in _OPEN:
            raise DuplicateClientOrderId(f"paper venue: client order id {coid} already exists ({row[0]})")

    def lookup(self, client_order_id: str, *, symbol: str | None = None) -> BrokerOrder | None:
        now = time.time()
        with self._db.write("paper lookup") as conn:
            self._advance(conn, now)
            return self._order(
                conn, "client_order_id = ? AND visible_at <= ?", (client_order_id, now)
            )

    def cancel(self, client_order_id: str, *, symbol: str | None = None) -> BrokerOrder:
        with self._db.write("paper cancel") as conn:
            self._advance(conn, time.time())
            order = self._order(conn, "client_order_id = ?", (client_order_id,))
            if order is None:
                raise OrderRejected(f"paper venue: no order {client_order_id} to cancel")
            if order.status.is_open:
                conn.execute("UPDATE orders SET status = 'CANCELED' WHERE id = ?", (int(order.broker_order_id[2:]),))
                order = self._order(conn, "client_order_id = ?", (client_order_id,))
            assert order is not None
            return order

    def orders(self, client_order_id: str | None = None) -> list[BrokerOrder]:
        """The venue's order log (every accepted order, oldest first): what tests count."""
        with self._db.write("paper orders") as conn:
            self._advance(conn, time.time())
            where, params = ("client_order_id = ?", (client_order_id,)) if client_order_id else ("1", ())
            rows = conn.execute(f"SELECT {_ORDER_COLUMNS} FROM orders WHERE {where} ORDER BY id", params).fetchall()
        return [_broker_order(r) for r in rows]

    # ---------------------------------------------------------------- positions & cash

    def positions(self, account: str | None = None) -> list[Position]:
        with self._db.write("paper positions") as conn:
            self._advance(conn, time.time())
            where, params = ("account = ?", (account,)) if account else ("1", ())
            rows = conn.execute(f"SELECT account, symbol, quantity FROM positions WHERE {where} ORDER BY account, symbol", params).fetchall()
        return [Position(a, s, Decimal(q)) for a, s, q in rows if Decimal(q) != 0]

    def account(self, account: str) -> AccountInfo:
        with self._db.write("paper account") as conn:
            self._advance(conn, time.time())
            return AccountInfo(account, self._cash(conn, account))

    def set_price(self, symbol: str, price: Decimal | int | str) -> None:
        """Set the price at which this symbol's orders fill from now on."""
        value = Decimal(price)
        if not value.is_finite() or value <= 0:
            raise ConfigurationError(f"price must be a positive finite number, got {price!r}")
        with self._db.write("paper price") as conn:
            conn.execute(
                "INSERT INTO prices(symbol, price) VALUES (?, ?) ON CONFLICT(symbol) DO UPDATE SET price = excluded.price",
                (symbol, canonical_decimal(value)),
            )
            self._advance(conn, time.time())

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------------ matching

    def _cash(self, conn: sqlite3.Connection, account: str) -> Decimal:
        row = conn.execute("SELECT amount FROM cash WHERE account = ?", (account,)).fetchone()
        return self.starting_cash if row is None else Decimal(row[0])

    def _price(self, conn: sqlite3.Connection, symbol: str) -> Decimal:
        row = conn.execute("SELECT price FROM prices WHERE symbol = ?", (symbol,)).fetchone()
        return self.default_price if row is None else Decimal(row[0])

    def _advance(self, conn: sqlite3.Connection, now: float) -> None:
        """Apply every fill that is due by ``now`` (fills happen lazily, on any call)."""
        rows = conn.execute(
            "SELECT id, account, symbol, side, quantity, order_type, limit_price, stop_price, "
            "filled_quantity, notional, fills_done, created_at, fill_delay, parts FROM orders WHERE status IN (?, ?)",
            _OPEN,
        ).fetchall()
        # Each order fills on the schedule of the venue instance that accepted it.
        for (order_id, account, symbol, side, qty, _type, limit, stop, filled, notional, done, created, delay, parts) in rows:
            due = parts if delay == 0 else min(parts, int((now - created) * parts / delay))
            if due <= done:
                continue
            price = self._price(conn, symbol)
            fill_price = _marketable(side, price, _dec(limit), _dec(stop))
            if fill_price is None:
                continue
            quantity = Decimal(qty)
            if due == parts:
                new_filled = quantity
            elif quantity == quantity.to_integral_value():
                new_filled = (quantity * due) // parts  # whole shares stay whole
            else:
                new_filled = (quantity * due / parts).quantize(Decimal("1e-8"))
            delta = new_filled - Decimal(filled)
            if delta <= 0:
                continue
            signed = delta if side == "BUY" else -delta
            cost = delta * fill_price
            conn.execute(
                """INSERT INTO positions(account, symbol, quantity) VALUES (?, ?, ?)
                   ON CONFLICT(account, symbol) DO UPDATE SET quantity = ?""",
                (account, symbol, canonical_decimal(signed),
                 canonical_decimal(self._position(conn, account, symbol) + signed)),
            )
            cash = self._cash(conn, account) - (cost if side == "BUY" else -cost)
            conn.execute(
                "INSERT INTO cash(account, amount) VALUES (?, ?) ON CONFLICT(account) DO UPDATE SET amount = excluded.amount",
                (account, canonical_decimal(cash)),
            )
            status = "FILLED" if new_filled == quantity else "PARTIALLY_FILLED"
            conn.execute(
                "UPDATE orders SET status = ?, filled_quantity = ?, notional = ?, fills_done = ? WHERE id = ?",
                (status, canonical_decimal(new_filled), canonical_decimal(Decimal(notional) + cost), due, order_id),
            )

    @staticmethod
    def _position(conn: sqlite3.Connection, account: str, symbol: str) -> Decimal:
        row = conn.execute("SELECT quantity FROM positions WHERE account = ? AND symbol = ?", (account, symbol)).fetchone()
        return Decimal(0) if row is None else Decimal(row[0])

    @staticmethod
    def _order(conn: sqlite3.Connection, where: str, params: tuple[Any, ...]) -> BrokerOrder | None:
        # With a reused client order id the open order is the one that matters, then the newest.
        row = conn.execute(
            f"SELECT {_ORDER_COLUMNS} FROM orders WHERE {where} "
            "ORDER BY status IN ('ACCEPTED', 'PARTIALLY_FILLED') DESC, id DESC LIMIT 1",
            params,
        ).fetchone()
        return None if row is None else _broker_order(row)


def _marketable(side: str, price: Decimal, limit: Decimal | None, stop: Decimal | None) -> Decimal | None:
    """The fill price if the order can trade at ``price`` now, else None."""
    buy = side == "BUY"
    if stop is not None and (price < stop if buy else price > stop):
        return None  # stop not triggered
    if limit is not None:
        if (buy and price > limit) or (not buy and price < limit):
            return None
        return min(price, limit) if buy else max(price, limit)
    return price


def _broker_order(row: tuple[Any, ...]) -> BrokerOrder:
    order_id, coid, account, symbol, side, qty, status, filled, notional = row
    filled_q = Decimal(filled)
    return BrokerOrder(
        client_order_id=coid, broker_order_id=f"P-{order_id}", status=OrderStatus(status),
        account=account, symbol=symbol, side=side, quantity=Decimal(qty),
        filled_quantity=filled_q,
        average_price=Decimal(canonical_decimal(Decimal(notional) / filled_q)) if filled_q else None,
    )


def _dec(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def _text(value: Decimal | None) -> str | None:
    return None if value is None else canonical_decimal(value)
