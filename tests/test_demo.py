"""`orderguard demo`: every scenario really duplicates without orderguard, never with it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from orderguard.demo import BREAKER_NOTIONAL, BREAKER_RATE, SCENARIOS, run_demo


@pytest.fixture(scope="module")
def results():  # type: ignore[no-untyped-def]
    started = time.monotonic()
    out = run_demo()
    return out, time.monotonic() - started


def test_every_scenario_duplicates_naively_and_never_guarded(results) -> None:  # type: ignore[no-untyped-def]
    out, seconds = results
    assert [r.number for r in out] == list(range(1, len(SCENARIOS) + 1)) == list(range(1, 10))
    for r in out[:8]:
        assert r.unguarded.duplicates >= 1, (r.title, r.unguarded)  # the scenario is a real race
        assert r.guarded.duplicates == 0, (r.title, r.guarded)
        assert r.guarded.broker_orders == r.guarded.intended, (r.title, r.guarded)
        assert r.guarded.phantom_notional == 0 == r.guarded.cash_drained
        assert r.unguarded.cash_drained > 0 and r.unguarded.phantom_notional > 0
        assert sum(r.guarded.blocked.values()) >= 1, (r.title, r.guarded.blocked)
    assert seconds < 60, f"the demo must finish in under a minute, took {seconds:.1f}s"


def test_the_breaker_halts_a_buggy_strategy_that_dedupe_cannot_stop(results) -> None:  # type: ignore[no-untyped-def]
    r = results[0][8]
    assert SCENARIOS[8].breaker
    # 8 tasks x 40 symbols, every order distinct: dedupe alone lets all of them through.
    assert r.unguarded.attempts == r.unguarded.broker_orders == 320
    assert r.unguarded.halts == [] and r.unguarded.blocked == {}
    # With the breakers: at most the configured number of orders and notional, then HALTED.
    assert BREAKER_NOTIONAL.amount is not None
    assert 1 <= r.guarded.broker_orders <= BREAKER_RATE.n
    assert r.guarded.cash_spent <= BREAKER_NOTIONAL.amount
    assert r.guarded.halts == ["strategy=buggy-momentum (NOTIONAL_LIMIT)"]
    assert r.guarded.blocked["NOTIONAL_LIMIT"] == 1  # the one refusal that tripped it
    assert r.guarded.blocked["HALTED"] == 320 - r.guarded.broker_orders - 1
    # The storm reached the operator as a handful of messages, not 300.
    assert 1 <= r.guarded.alerts <= 3


def test_blocked_reasons_match_the_scenario(results) -> None:  # type: ignore[no-untyped-def]
    by_number = {r.number: r.guarded.blocked for r in results[0]}
    # Which of two reasons a racer sees depends on timing; how many are blocked does not.
    assert set(by_number[3]) <= {"COOLDOWN", "IN_FLIGHT"} and sum(by_number[3].values()) == 5
    assert set(by_number[4]) <= {"IN_FLIGHT", "OPEN_POSITION"} and sum(by_number[4].values()) == 280
    assert set(by_number[6]) <= {"IN_FLIGHT", "DUPLICATE"} and sum(by_number[6].values()) == 2
    assert by_number[7] == {"UNKNOWN_PENDING": 1}


def test_cli_json_one_scenario_and_exit_status() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "orderguard", "demo", "--json", "--scenario", "7"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["ok"] is True
    (only,) = payload["scenarios"]
    assert only["scenario"] == 7 and only["guarded"]["duplicates"] == 0 and only["unguarded"]["duplicates"] == 1
    assert only["guarded"]["blocked"] == {"UNKNOWN_PENDING": 1}
    bad = subprocess.run([sys.executable, "-m", "orderguard", "demo", "--scenario", "10"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "choose 1..9" in bad.stdout + bad.stderr
