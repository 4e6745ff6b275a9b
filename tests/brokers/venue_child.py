"""A child process for the venue adapters' crash tests: ``python -m tests.brokers.venue_child CONFIG``.

It opens the SQLite ledger and the venue from a broker spec (keys from the environment, as an
operator's process would), then submits one intent or runs the reconciler, and prints one JSON
line with what it saw. With ``ORDERGUARD_CRASH_AT`` set it SIGKILLs itself at that point.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run(config: dict[str, Any], *, crash_at: str | None = None, timeout: float = 30.0) -> tuple[int, Any, str]:
    """Run one child to its end: its return code, its JSON line (None if it printed none), its stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("ORDERGUARD_CRASH_AT", "ORDERGUARD_PAUSE_AT")}
    if crash_at:
        env["ORDERGUARD_CRASH_AT"] = crash_at
    proc = subprocess.Popen([sys.executable, "-m", "tests.brokers.venue_child", json.dumps(config)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return proc.returncode, json.loads(lines[-1]) if lines else None, err


def collect(procs: list[Any], results: Any, timeout: float) -> list[dict[str, Any]]:
    """Start processes that each put one result on ``results`` (they meet at a barrier), and
    gather the results; fails when one dies or the lot takes longer than ``timeout``."""
    for p in procs:
        p.start()
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < len(procs):
            try:
                out.append(results.get(timeout=0.5))
            except queue.Empty:
                dead = [(p.name, p.exitcode) for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise AssertionError(f"children failed or hung: {dead or [(p.name, p.exitcode) for p in procs]}") from None
        for p in procs:
            p.join(timeout=timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return out


def main(config: dict[str, Any]) -> dict[str, Any]:
    from orderguard import Ever, Guard, OncePer, OrderIntent
    from orderguard.brokers.spec import open_broker

    guard = Guard.open(config["ledger"], synchronous="NORMAL")
    broker = open_broker(config["spec"])
    if config["mode"] == "submit":
        result = guard.submit(OrderIntent(**config["intent"]), broker, policy=OncePer(Ever()))
        return {"outcome": result.outcome.value, "state": None if result.state is None else result.state.value,
                "client_order_id": result.client_order_id}
    report = guard.reconcile(broker, grace=config["grace"], stale_after=config["stale_after"])
    return {"lines": report.lines()}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
