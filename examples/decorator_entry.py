"""Decorator: an existing ``execute_entry()`` guarded by ``@guard.once``.

The bot already has an order function that talks to its broker. One decorator line makes it
run at most once per strategy per NYSE trading day, however often it is called: here by two
threads at the same instant, then once more later (a cron re-run, a restarted bot). Inside,
``orderguard.current_claim().client_order_id`` is the id to send with, so a reconciler can find
the order at the venue whatever happens to this process.

Run it::

    python examples/decorator_entry.py [FOLDER]

FOLDER (or ``$ORDERGUARD_EXAMPLE_DIR``) holds the ledger and the paper venue; default: a new
temporary folder. The last line of output is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import threading
from collections import Counter
from pathlib import Path

from orderguard import Guard, OncePer, OrderIntent, Side, SubmitResult, TradingDay, current_claim
from orderguard.brokers import OrderRequest, PaperBroker

SPX_ENTRY = OrderIntent(account="main", strategy="spx-calendar", symbol="SPX", side=Side.BUY, quantity=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=os.environ.get("ORDERGUARD_EXAMPLE_DIR"))
    folder = Path(parser.parse_args().folder or tempfile.mkdtemp(prefix="orderguard-decorator-"))
    folder.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(threadName)s %(levelname)s %(message)s")

    guard = Guard.open(f"sqlite:///{folder / 'ledger.db'}")
    broker = PaperBroker.open(f"sqlite:///{folder / 'paper.db'}", ack_latency=0.05)
    body_runs: list[str] = []

    @guard.once(policy=OncePer(TradingDay("XNYS"), by=("strategy",)), intent=SPX_ENTRY)
    def execute_entry() -> str:
        """The bot's existing order code; only the client order id comes from the claim."""
        claim = current_claim()
        assert claim is not None
        coid = claim.client_order_id  # send with it: reconcile looks the order up by this id
        body_runs.append(threading.current_thread().name)
        order = broker.submit(OrderRequest(coid, "main", "SPX", "BUY", SPX_ENTRY.quantity, "MARKET", None, None, "DAY"))
        claim.record(order)  # optional: without a report, a normal return is recorded ACKED
        return order.broker_order_id

    # Two threads call it at the same instant...
    start = threading.Barrier(2)
    results: dict[str, object] = {}

    def call() -> None:
        start.wait()
        results[threading.current_thread().name] = execute_entry()

    threads = [threading.Thread(target=call, name=f"caller-{n}") for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # ...and it is called once more later: the body does not run, a falsy BLOCKED result comes back.
    again = execute_entry()
    results["later"] = again
    for name, value in results.items():
        if isinstance(value, SubmitResult):  # falsy: blocked, the body did not run
            print(f"{name}: {value.outcome.value} {value.reason} (holder {value.holder.client_order_id if value.holder else '?'})")
        else:
            print(f"{name}: ran, broker order {value}")

    attempts = guard.attempts(limit=100_000)
    blocked = Counter(a.reason.value for a in attempts if a.reason is not None)
    summary = {
        "attempts": len(attempts),
        "orders": len(broker.orders()),
        "blocked": dict(sorted(blocked.items())),
        "body_runs": len(body_runs),
        "folder": str(folder),
    }
    guard.close()
    broker.close()
    print(f"execute_entry() called 3 times, its body ran {len(body_runs)} time(s) -> "
          f"{summary['orders']} order(s) at the venue; blocked: {summary['blocked']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
