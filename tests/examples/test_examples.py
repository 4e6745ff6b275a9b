"""Every example under ``examples/`` runs for real, as its own process, and keeps its promise.

Each example prints a JSON summary as its last line; the tests check it, then open the
example's ledger and paper venue themselves (the files in the folder given by
``ORDERGUARD_EXAMPLE_DIR``) and count the venue's orders independently.

The integrations need their extras (apscheduler, celery, redis). The Celery example needs the
Redis server at 127.0.0.1:6379 (the test uses DB 14; the example deletes the keys of its run). When ``CI=true`` a
missing extra or an unreachable Redis fails the test; elsewhere it skips.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from orderguard import Guard
from orderguard.brokers import PaperBroker
from tests.helpers import unavailable

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 14
REDIS_START = 'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no'
SAME_INTENT = {"IN_FLIGHT", "DUPLICATE"}  # blocked by an identical intent in flight or executed


def require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        unavailable(f"integration extras not installed: {', '.join(missing)} (pip install -e '.[test]')")


def require_redis() -> None:
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=2) as conn:
            conn.sendall(b"PING\r\n")
            answer = conn.recv(64)
    except OSError as exc:
        unavailable(f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT} ({exc}); start it with: {REDIS_START}")
    else:
        if not answer.startswith(b"+PONG"):
            unavailable(f"{REDIS_HOST}:{REDIS_PORT} answered PING with {answer!r}, not +PONG")


def run_example(script: Path, folder: Path, *args: str, timeout: float = 60, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run an example in its own session (so a hung one is killed with its children)."""
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        cwd=folder, env={**os.environ, "ORDERGUARD_EXAMPLE_DIR": str(folder), **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{script.name} did not finish in {timeout:g}s\n--- stdout\n{out}\n--- stderr\n{err}")
    assert proc.returncode == 0, f"{script.name} exited {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"
    lines = out.strip().splitlines()
    assert lines, f"{script.name} printed nothing\n--- stderr\n{err}"
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def venue_orders(folder: Path) -> Counter[str]:
    """Orders per symbol in the example's paper venue, counted by this process."""
    broker = PaperBroker.open(f"sqlite:///{folder / 'paper.db'}")
    try:
        return Counter(order.symbol for order in broker.orders())
    finally:
        broker.close()


def ledger_attempts(folder: Path) -> tuple[int, Counter[str]]:
    guard = Guard.open(f"sqlite:///{folder / 'ledger.db'}")
    try:
        attempts = guard.attempts(limit=1_000_000)
    finally:
        guard.close()
    return len(attempts), Counter(a.reason.value for a in attempts if a.reason is not None)


def test_apscheduler_job_misfiring_twice_and_a_manual_trade_send_one_order(tmp_path: Path) -> None:
    require("apscheduler")
    summary = run_example(EXAMPLES / "threads_apscheduler.py", tmp_path)

    assert summary["sources"] == {"scheduler": 3, "manual": 1}  # the job ran three times
    assert summary["attempts"] == 4
    assert summary["orders"] == 1
    assert sum(summary["blocked"].values()) == 3
    assert set(summary["blocked"]) <= SAME_INTENT, summary["blocked"]
    assert venue_orders(tmp_path) == {"SPX": 1}
    assert ledger_attempts(tmp_path) == (4, Counter(summary["blocked"]))


def test_apscheduler_example_run_again_on_the_same_ledger_sends_nothing(tmp_path: Path) -> None:
    require("apscheduler")
    run_example(EXAMPLES / "threads_apscheduler.py", tmp_path)
    summary = run_example(EXAMPLES / "threads_apscheduler.py", tmp_path)

    assert summary["attempts"] == 8
    assert summary["orders"] == 1
    assert sum(summary["blocked"].values()) == 7
    assert summary["blocked"].get("DUPLICATE", 0) >= 4  # the whole second run: the day is taken
    assert venue_orders(tmp_path) == {"SPX": 1}


def test_asyncio_runner_8_tasks_per_symbol_send_one_order_per_symbol(tmp_path: Path) -> None:
    summary = run_example(EXAMPLES / "asyncio_runner.py", tmp_path)

    symbols, tasks = summary["symbols"], summary["tasks_per_symbol"]
    assert (symbols, tasks) == (40, 8)
    assert summary["attempts"] == symbols * tasks  # every task saw "no position yet" and tried
    assert summary["orders"] == symbols
    assert set(summary["orders_per_symbol"].values()) == {1}
    assert sum(summary["blocked"].values()) == symbols * (tasks - 1)
    assert set(summary["blocked"]) <= SAME_INTENT | {"OPEN_POSITION"}, summary["blocked"]
    orders = venue_orders(tmp_path)
    assert len(orders) == symbols
    assert set(orders.values()) == {1}
    assert ledger_attempts(tmp_path) == (symbols * tasks, Counter(summary["blocked"]))


def test_decorated_execute_entry_runs_once_across_threads_and_calls(tmp_path: Path) -> None:
    summary = run_example(EXAMPLES / "decorator_entry.py", tmp_path)

    assert summary["body_runs"] == 1
    assert summary["attempts"] == 3
    assert summary["orders"] == 1
    assert sum(summary["blocked"].values()) == 2
    assert set(summary["blocked"]) <= SAME_INTENT, summary["blocked"]
    assert venue_orders(tmp_path) == {"SPX": 1}


@pytest.mark.slow
def test_two_celery_workers_receiving_the_same_task_send_one_order(tmp_path: Path) -> None:
    require("celery", "redis")
    require_redis()
    redis_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    summary = run_example(
        EXAMPLES / "celery_workers" / "run.py", tmp_path, timeout=120, env={"ORDERGUARD_CELERY_REDIS": redis_url}
    )

    workers = summary["workers"]
    assert len(workers) == 2
    assert len({w["pid"] for w in workers.values()}) == 2  # two worker processes each ran the task
    assert sorted(w["outcome"] for w in workers.values()) == ["BLOCKED", "SENT"]
    assert len({w["client_order_id"] for w in workers.values()}) == 1  # the blocked one names the sent order
    assert summary["worker_exit_codes"] == [0, 0]  # both shut down cleanly
    assert summary["attempts"] == 2
    assert summary["orders"] == 1
    assert sum(summary["blocked"].values()) == 1
    assert set(summary["blocked"]) <= SAME_INTENT | {"COOLDOWN"}, summary["blocked"]
    assert venue_orders(tmp_path) == {"AAPL": 1}

    import redis

    assert summary["redis_keys_left"] == 0
    with redis.Redis.from_url(redis_url) as db:
        left = list(db.scan_iter(match=f"{summary['redis_prefix']}*"))
    assert not left, f"the example left keys of its run in Redis DB {REDIS_DB}: {left[:5]}"
