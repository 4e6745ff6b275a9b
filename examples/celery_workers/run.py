"""Processes: two real Celery workers receive the same entry task -> one order.

Starts two Celery worker processes (solo pool, unique node names) on the Redis server at
``$ORDERGUARD_CELERY_REDIS`` (default ``redis://127.0.0.1:6379/13``), sends the same entry
intent to both of them at once (a copy to each worker's direct queue: what a broadcast, a
re-sent task or a redelivery after Redis' visibility timeout does), waits for both results,
shuts the workers down (warm shutdown, SIGTERM), prints the counts and deletes every Redis key
the run created (they all share a per-run prefix, so concurrent runs do not disturb each other).
Both workers guard with ``Cooldown(15 min)`` on one SQLite ledger; the shared paper venue
receives one order.

Run it (needs ``pip install 'celery[redis]>=5.3,<6'`` and a Redis server)::

    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    python examples/celery_workers/run.py [FOLDER] [--redis redis://127.0.0.1:6379/13]

Give it a Redis DB of its own (default 13). FOLDER (or ``$ORDERGUARD_EXAMPLE_DIR``) holds the
ledger and the paper venue; default: a new temporary folder. The last line of output is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import redis
from celery import Celery
from celery.utils.nodenames import worker_direct

from orderguard import Guard
from orderguard.brokers import PaperBroker

HERE = Path(__file__).resolve().parent
WORKER_START_TIMEOUT = 60.0
RESULT_TIMEOUT = 30.0


def start_worker(node: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "celery", "--quiet", "-A", "tasks", "worker", "--pool=solo", f"--hostname={node}",
        "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel=WARNING",
    ]
    # Worker output goes to stderr: stdout ends with this script's JSON line.
    return subprocess.Popen(command, cwd=HERE, env=env, stdout=sys.stderr, stderr=sys.stderr)


def wait_until_ready(app: Celery, nodes: list[str], workers: list[subprocess.Popen[bytes]]) -> None:
    """Both workers answer a ping once their queues are consumed."""
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    ready: set[str] = set()
    while ready != set(nodes):
        if any(w.poll() is not None for w in workers):
            raise SystemExit("a Celery worker exited during startup (see its output above)")
        if time.monotonic() > deadline:
            raise SystemExit(f"Celery workers not ready after {WORKER_START_TIMEOUT:g}s: {sorted(set(nodes) - ready)}")
        for reply in app.control.ping(destination=nodes, timeout=0.5):
            ready.update(reply)


def stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for w in workers:
        if w.poll() is None:
            w.terminate()  # SIGTERM: Celery's warm shutdown
    for w in workers:
        try:
            w.wait(timeout=20)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=os.environ.get("ORDERGUARD_EXAMPLE_DIR"))
    parser.add_argument("--redis", default=os.environ.get("ORDERGUARD_CELERY_REDIS", "redis://127.0.0.1:6379/13"))
    args = parser.parse_args()
    folder = Path(args.folder or tempfile.mkdtemp(prefix="orderguard-celery-")).resolve()
    folder.mkdir(parents=True, exist_ok=True)

    # The workers and this process read the same settings from the environment.
    prefix = f"orderguard-example-{os.getpid()}-{time.time_ns()}:"
    os.environ["ORDERGUARD_CELERY_REDIS"] = args.redis
    os.environ["ORDERGUARD_CELERY_KEYPREFIX"] = prefix
    os.environ["ORDERGUARD_EXAMPLE_DIR"] = str(folder)
    db = redis.Redis.from_url(args.redis)
    try:
        db.ping()
    except redis.RedisError as exc:
        raise SystemExit(f"Redis at {args.redis} is not reachable ({exc}); start it with: "
                         'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no') from None

    from tasks import app, enter  # imported once the environment is set: it configures the app

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    nodes = [f"entry-{name}-{os.getpid()}@orderguard" for name in ("a", "b")]
    workers = [start_worker(node, env) for node in nodes]
    try:
        wait_until_ready(app, nodes, workers)
        intent = {"account": "main", "strategy": "pairs-15m", "symbol": "AAPL", "side": "BUY", "quantity": "10", "source": "celery"}
        sent = [enter.apply_async(kwargs={"intent": intent}, queue=worker_direct(node)) for node in nodes]
        replies = [r.get(timeout=RESULT_TIMEOUT) for r in sent]
    finally:
        stop(workers)
        app.close()
        for key in db.scan_iter(match=f"{prefix}*"):
            db.delete(key)
        keys_left = sum(1 for _ in db.scan_iter(match=f"{prefix}*"))
        db.close()

    guard = Guard.open(f"sqlite:///{folder / 'ledger.db'}")
    broker = PaperBroker.open(f"sqlite:///{folder / 'paper.db'}")
    attempts = guard.attempts(limit=100_000)
    blocked = Counter(a.reason.value for a in attempts if a.reason is not None)
    summary = {
        "attempts": len(attempts),
        "orders": len(broker.orders()),
        "blocked": dict(sorted(blocked.items())),
        "workers": {r["worker"]: {k: r[k] for k in ("pid", "outcome", "reason", "client_order_id")} for r in replies},
        "worker_exit_codes": [w.returncode for w in workers],
        "redis_prefix": prefix,
        "redis_keys_left": keys_left,
        "folder": str(folder),
    }
    guard.close()
    broker.close()
    for r in replies:
        print(f"{r['worker']} (pid {r['pid']}): {r['outcome']} {r['reason'] or ''} {r['client_order_id']}")
    print(f"{summary['attempts']} attempts from 2 Celery worker processes -> {summary['orders']} order(s) "
          f"at the venue; blocked: {summary['blocked']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
