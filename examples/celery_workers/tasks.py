"""The Celery app and the bot's entry task, guarded by orderguard.

Imported by every worker process (``celery -A tasks worker``) and by ``run.py`` to send tasks.
Configuration comes from the environment, so the workers and the sender agree:

* ``ORDERGUARD_CELERY_REDIS``: broker and result backend (default ``redis://127.0.0.1:6379/13``);
* ``ORDERGUARD_CELERY_KEYPREFIX``: prefix of every Redis key (``run.py`` sets one per run);
* ``ORDERGUARD_EXAMPLE_DIR``: the folder holding the shared ledger and paper venue.

Each worker process opens the ledger and the paper venue once; the SQLite files are what the
two processes share: the claim in the ledger decides which one sends.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

from celery import Celery, current_task
from celery.signals import worker_shutdown

from orderguard import Cooldown, Guard, OrderIntent
from orderguard.brokers import PaperBroker

REDIS_URL = os.environ.get("ORDERGUARD_CELERY_REDIS", "redis://127.0.0.1:6379/13")
# Every Redis key of a run starts with this, so run.py can delete exactly what its run created.
KEY_PREFIX = os.environ.get("ORDERGUARD_CELERY_KEYPREFIX", "orderguard-example:")

app = Celery("orderguard_example", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    broker_transport_options={"global_keyprefix": KEY_PREFIX},
    result_backend_transport_options={"global_keyprefix": KEY_PREFIX},
    worker_direct=True,  # every worker also consumes its own queue: run.py sends a copy to each
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
)

# The bot evaluates every 15 minutes; one entry per account, strategy and symbol per 15 minutes.
ENTRY_POLICY = Cooldown(15 * 60, by=("account", "strategy", "symbol"))


@cache
def ledger_and_venue() -> tuple[Guard, PaperBroker]:
    folder = Path(os.environ["ORDERGUARD_EXAMPLE_DIR"])
    guard = Guard.open(f"sqlite:///{folder / 'ledger.db'}", runner="celery-worker")
    broker = PaperBroker.open(f"sqlite:///{folder / 'paper.db'}", ack_latency=0.1)
    return guard, broker


@worker_shutdown.connect
def _close(**_: Any) -> None:
    if ledger_and_venue.cache_info().currsize:
        guard, broker = ledger_and_venue()
        guard.close()
        broker.close()


@app.task(name="orderguard_example.enter")
def enter(intent: dict[str, str]) -> dict[str, Any]:
    """The bot's entry task: the same message may reach more than one worker."""
    guard, broker = ledger_and_venue()
    result = guard.submit(OrderIntent(**intent), broker, policy=ENTRY_POLICY)
    return {
        "worker": current_task.request.hostname,
        "pid": os.getpid(),
        "outcome": result.outcome.value,
        "reason": result.reason.value if result.reason else None,
        "client_order_id": result.client_order_id or (result.holder.client_order_id if result.holder else None),
    }
