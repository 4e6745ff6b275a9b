"""Threads: an APScheduler job for the daily entry, a "manual trade" click racing it.

The bot runs its daily entry as an APScheduler (3.x) job on a BackgroundScheduler. The host
slept through the job's last two fire times, and the job is configured the way many bots
configure it (``coalesce=False``, ``misfire_grace_time=None``), so when the scheduler wakes it
runs the entry three times: today's fire plus the two misfires. At the same moment an operator
clicks "Manual trade" in the dashboard (another thread). All four callers go through
``OncePer(TradingDay("XNYS"), by=("strategy",))``: one order reaches the venue.

Run it (needs ``pip install 'apscheduler>=3.10,<4'``)::

    python examples/threads_apscheduler.py [FOLDER]

FOLDER (or ``$ORDERGUARD_EXAMPLE_DIR``) holds the ledger and the paper venue; default: a new
temporary folder. Counts are the ledger's and the venue's: run it again on the same folder and
every attempt is blocked, the venue still holds one order. The last line of output is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from orderguard import Guard, OncePer, OrderIntent, Side, TradingDay
from orderguard.brokers import PaperBroker

DAILY_ENTRY = OncePer(TradingDay("XNYS"), by=("strategy",))  # one entry per strategy per NYSE session
SCHEDULED_RUNS = 3  # today's fire plus two misfires


def entry_intent(source: str) -> OrderIntent:
    return OrderIntent(account="main", strategy="spx-calendar", symbol="SPX", side=Side.BUY, quantity=4, source=source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=os.environ.get("ORDERGUARD_EXAMPLE_DIR"))
    folder = Path(parser.parse_args().folder or tempfile.mkdtemp(prefix="orderguard-apscheduler-"))
    folder.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(threadName)s %(levelname)s %(message)s")

    guard = Guard.open(f"sqlite:///{folder / 'ledger.db'}")
    broker = PaperBroker.open(f"sqlite:///{folder / 'paper.db'}", ack_latency=0.05)

    def daily_entry() -> str:
        """The bot's job, unchanged except that it submits through the guard."""
        result = guard.submit(entry_intent("scheduler"), broker, policy=DAILY_ENTRY)
        return result.message

    def manual_trade() -> None:
        """The dashboard's "Manual trade" button: the same intent, another thread."""
        guard.submit(entry_intent("manual"), broker, policy=DAILY_ENTRY)

    runs_done = threading.Semaphore(0)

    def on_run(event: JobExecutionEvent) -> None:
        if event.exception:
            print(f"job run failed: {event.exception!r}")
        runs_done.release()

    scheduler = BackgroundScheduler(executors={"default": ThreadPoolExecutor(4)}, timezone=UTC)
    scheduler.add_listener(on_run, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
    # A daily job whose last two fires fell while the host slept: with coalesce=False and no
    # misfire grace time, APScheduler runs every missed fire as soon as it starts.
    scheduler.add_job(
        daily_entry, "interval", days=1, id="daily-entry",
        next_run_time=datetime.now(UTC) - timedelta(days=SCHEDULED_RUNS - 1),
        coalesce=False, misfire_grace_time=None,
    )
    clicker = threading.Thread(target=manual_trade, name="dashboard-manual-trade")
    scheduler.start()
    clicker.start()  # races the scheduler's first run
    clicker.join()
    for _ in range(SCHEDULED_RUNS):
        if not runs_done.acquire(timeout=30):
            raise SystemExit("the scheduler did not run the daily entry in time")
    scheduler.shutdown(wait=True)

    attempts = guard.attempts(limit=100_000)
    blocked = Counter(a.reason.value for a in attempts if a.reason is not None)
    summary = {
        "attempts": len(attempts),
        "orders": len(broker.orders()),
        "blocked": dict(sorted(blocked.items())),
        "sources": dict(sorted(Counter(a.source for a in attempts).items())),
        "folder": str(folder),
    }
    guard.close()
    broker.close()
    print(f"{summary['attempts']} attempts (scheduler x{SCHEDULED_RUNS}, manual x1) -> "
          f"{summary['orders']} order(s) at the venue; blocked: {summary['blocked']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
