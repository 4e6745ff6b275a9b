"""Helpers shared by the test modules."""

from __future__ import annotations

import functools
import subprocess
import sys

from orderguard import OrderIntent, Side
from orderguard.store.base import Caller, this_host


def make_intent(**overrides: object) -> OrderIntent:
    fields: dict[str, object] = {
        "account": "main", "strategy": "spx-calendar", "symbol": "SPX", "side": Side.BUY, "quantity": 4,
    }
    fields.update(overrides)
    return OrderIntent(**fields)  # type: ignore[arg-type]


@functools.cache
def dead_caller() -> Caller:
    """The identity a killed process leaves in the ledger: this host, a pid that has exited."""
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return Caller(host=this_host(), pid=int(out.stdout), runner="crashed", thread="MainThread", started="exited")
