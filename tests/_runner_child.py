"""A bot runner for tests/test_runners.py: one Guard in its own OS process.

Run as ``python -m tests._runner_child CONFIG_JSON`` from the project root, so ``__main__`` is
this file (the default code a Guard fingerprints). It registers its runner, prints one
``{"event": "ready", ...}`` line, then reads JSON commands from stdin, one a line:

``{"cmd": "tick", "n": N, "pause": false}``
    the scheduler fires tick N: submit that tick's intent to the paper venue and print the
    result. ``pause`` arms ``ORDERGUARD_PAUSE_AT=after_claim_commit`` for this submit only, so
    the process SIGSTOPs itself right after its claim committed (see ``orderguard._crash``).
``{"cmd": "close"}``
    ``guard.close()`` (a clean stop), print ``closed`` and exit 0.

Alerts go to a real :class:`~orderguard.Notifier` whose only sink prints them as JSON lines.
Every output line is one JSON object with an ``event`` key, flushed at once.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from orderguard import Alert, Cycle, Guard, Notifier, OncePer, OrderIntent, Side, _crash
from orderguard.brokers import PaperBroker

_out = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    with _out:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()


class PrintSink:
    """The test's sink: every alert the notifier delivers becomes an ``alert`` line."""

    name = "print"

    def send(self, alert: Alert) -> None:
        emit("alert", kind=alert.kind.value, scope=alert.scope, message=alert.message, count=alert.count,
             details=alert.details)


def load_module(path: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tick_intent(strategy: str, n: int) -> OrderIntent:
    return OrderIntent(account="main", strategy=strategy, symbol="SPX", side=Side.BUY, quantity=1,
                       source="scheduler", tags={"tick": str(n)})


def arm_pause(on: bool) -> None:
    if on:
        os.environ["ORDERGUARD_PAUSE_AT"] = "after_claim_commit"
    else:
        os.environ.pop("ORDERGUARD_PAUSE_AT", None)
    importlib.reload(_crash)  # the points are read at import


def main() -> None:
    cfg = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code: list[Any] = [load_module(p, f"strategy_{i}") for i, p in enumerate(cfg.get("modules", []))]
    code += cfg.get("code", [])
    notifier = Notifier([PrintSink()], interval=0.05) if cfg.get("alerts") else None
    guard = Guard.open(cfg["ledger"], runner=cfg["runner"], code=code, alerts=notifier, **cfg.get("guard", {}),
                       **cfg.get("store", {}))
    if notifier is not None:
        notifier.flush(5.0)  # alerts raised while registering come before the ready line
    reg = guard.registration
    assert reg is not None
    emit("ready", runner_id=reg.id, pid=os.getpid(), started=reg.started, fingerprint=reg.fingerprint,
         git_commit=reg.git_commit, modules=reg.modules, main=str(Path(sys.modules["__main__"].__file__ or "")))
    broker = PaperBroker.open(cfg["paper"]) if cfg.get("paper") else None
    strategy = cfg.get("intent_strategy", "sched")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "tick":
            assert broker is not None
            n = int(cmd["n"])
            pause = bool(cmd.get("pause"))
            if pause:
                arm_pause(True)
            try:
                result = guard.submit(tick_intent(strategy, n), broker,
                                      policy=OncePer(Cycle(f"tick-{n}"), by=("strategy", "symbol")))
            finally:
                if pause:
                    arm_pause(False)
            emit("tick", n=n, outcome=result.outcome.value,
                 reason=None if result.reason is None else result.reason.value, message=result.message,
                 state=None if result.state is None else result.state.value,
                 client_order_id=result.client_order_id, intent_id=None if result.intent is None else result.intent.id,
                 note=None if result.intent is None else result.intent.note)
        elif cmd["cmd"] == "close":
            guard.close()
            if notifier is not None:
                notifier.close()
            if broker is not None:
                broker.close()
            emit("closed")
            return
    # stdin closed without a close command: leave without a clean stop (like a crash)
    os._exit(3)


if __name__ == "__main__":
    main()
