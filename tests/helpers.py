"""Helpers shared by the test modules."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

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


def unavailable(why: str, *, module: bool = False) -> None:
    """A service or package a test needs is missing: with CI=true that is a failure, elsewhere a
    skip (of the whole module with ``module=True``, called at import time)."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{why} (CI=true: this test must run, not skip)", pytrace=False)
    pytest.skip(why, allow_module_level=module)


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, dict[str, Any] | None, str]:
    """Wait for a child: its return code, its last JSON line (None if it printed none), its stderr."""
    out, err = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return proc.returncode, (json.loads(lines[-1]) if lines else None), err


def wait_stopped(proc: subprocess.Popen[str], timeout: float) -> None:
    """Poll /proc/<pid>/stat until the child is in state T (stopped by SIGSTOP)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"child exited with {proc.returncode} before pausing: {err}")
        try:
            stat = Path(f"/proc/{proc.pid}/stat").read_text()
        except FileNotFoundError:
            stat = ""
        if stat and stat.rsplit(")", 1)[1].split()[0] in ("T", "t"):
            return
        time.sleep(0.02)
    pytest.fail(f"child {proc.pid} did not stop within {timeout}s")


def need_duckdb() -> Any:
    """DuckDB (the audit extra): missing is a skip locally and a failure with CI=true (module level)."""
    try:
        import duckdb
    except ImportError:
        unavailable("duckdb is not installed: the audit tests need pip install 'orderguard[audit]'", module=True)
    return duckdb
