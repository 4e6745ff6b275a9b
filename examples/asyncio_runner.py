"""asyncio: one runner, 8 tasks per symbol, every task sees "no position yet".

A common async bot shape: for each symbol a handful of tasks (signal handlers, a websocket
callback, a periodic rebalance, ...) evaluate "am I in a position?" and enter if not. All of
them read the position before any order has filled, so all of them decide to enter. Each
calls ``await guard.asubmit(...)`` with ``OneOpen(by=("account", "symbol"))``: one order per
symbol reaches the venue, every other task is told why it was blocked.

Run it::

    python examples/asyncio_runner.py [FOLDER] [--symbols 40] [--tasks 8] [-v]

FOLDER (or ``$ORDERGUARD_EXAMPLE_DIR``) holds the ledger and the paper venue; default: a new
temporary folder. ``-v`` prints every blocked attempt's log line. The last line of output is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path

from orderguard import Guard, OneOpen, OrderIntent, Side
from orderguard.brokers import PaperBroker

ONE_POSITION_PER_SYMBOL = OneOpen(by=("account", "symbol"))


async def evaluate(guard: Guard, broker: PaperBroker, symbol: str, everyone_looked: asyncio.Barrier) -> None:
    """One task of the runner: enter the symbol unless a position is already open."""
    positions = await asyncio.to_thread(broker.positions, "main")
    if any(p.symbol == symbol for p in positions):
        return
    await everyone_looked.wait()  # every task of this symbol has seen "no position yet"
    intent = OrderIntent(account="main", strategy="momentum", symbol=symbol, side=Side.BUY, quantity=10)
    await guard.asubmit(intent, broker, policy=ONE_POSITION_PER_SYMBOL)


async def run(guard: Guard, broker: PaperBroker, symbols: list[str], tasks_per_symbol: int) -> None:
    async with asyncio.TaskGroup() as group:
        for symbol in symbols:
            looked = asyncio.Barrier(tasks_per_symbol)
            for n in range(tasks_per_symbol):
                group.create_task(evaluate(guard, broker, symbol, looked), name=f"{symbol}-task{n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=os.environ.get("ORDERGUARD_EXAMPLE_DIR"))
    parser.add_argument("--symbols", type=int, default=40)
    parser.add_argument("--tasks", type=int, default=8, help="tasks per symbol")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every blocked attempt")
    args = parser.parse_args()
    folder = Path(args.folder or tempfile.mkdtemp(prefix="orderguard-asyncio-"))
    folder.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR, format="%(levelname)s %(message)s")

    symbols = [f"SYM{i:03d}" for i in range(args.symbols)]
    guard = Guard.open(f"sqlite:///{folder / 'ledger.db'}")
    broker = PaperBroker.open(f"sqlite:///{folder / 'paper.db'}", ack_latency=0.02)
    asyncio.run(run(guard, broker, symbols, args.tasks))

    attempts = guard.attempts(limit=1_000_000)
    blocked = Counter(a.reason.value for a in attempts if a.reason is not None)
    per_symbol = Counter(order.symbol for order in broker.orders())
    summary = {
        "attempts": len(attempts),
        "orders": sum(per_symbol.values()),
        "blocked": dict(sorted(blocked.items())),
        "symbols": len(symbols),
        "tasks_per_symbol": args.tasks,
        "orders_per_symbol": {s: per_symbol[s] for s in symbols},
        "folder": str(folder),
    }
    guard.close()
    broker.close()
    print(f"{summary['attempts']} attempts ({args.tasks} tasks x {len(symbols)} symbols) -> "
          f"{summary['orders']} orders at the venue, at most {max(per_symbol.values(), default=0)} per symbol; "
          f"blocked: {summary['blocked']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
