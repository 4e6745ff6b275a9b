"""Real concurrency: threads, asyncio tasks and OS processes racing for one intent.

No mocks and no fakes: every test runs the SQLite ledger and the project's own PaperBroker on
files under ``tmp_path``. The paper venue's order log (``PaperBroker.orders()``) is what gets
counted: whatever the guard says, the venue must hold exactly one order per intent.

Child processes use the "spawn" start method (nothing inherited from the parent: each one opens
its own ledger and venue connections, the way separate bot runners do), so their targets live
at module level.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import queue
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest

from orderguard import (
    BlockReason,
    Guard,
    OncePer,
    Outcome,
    State,
    SubmitResult,
    TradingDay,
    current_claim,
)
from orderguard.brokers import OrderRequest, OrderStatus, PaperBroker, Position
from tests.helpers import make_intent

if TYPE_CHECKING:
    from orderguard import Claim, OrderIntent

SPAWN = mp.get_context("spawn")
CALENDAR = "XNYS"
BY = ("strategy",)
SAME_INTENT = {BlockReason.IN_FLIGHT, BlockReason.DUPLICATE}  # blocked by an identical intent
CHILD_TIMEOUT = 60.0  # seconds a child may take to start (imports) and finish


def daily_entry() -> OncePer:
    """The policy every test races for: one entry per strategy per NYSE trading day."""
    return OncePer(TradingDay(CALENDAR), by=BY)


# ------------------------------------------------------------------------------ checks


def assert_one_order_and_ledger_agrees(guard: Guard, broker: PaperBroker, intent: OrderIntent) -> Any:
    """Exactly one order at the venue, exactly one intent in the ledger, and they agree."""
    orders = broker.orders()
    assert len(orders) == 1, f"the venue holds {len(orders)} orders for one intent: {orders}"
    order = orders[0]
    records = guard.intents()
    assert len(records) == 1, f"the ledger holds {len(records)} intents: {records}"
    record = records[0]
    assert record.client_order_id == order.client_order_id
    assert record.broker_order_id == order.broker_order_id
    assert record.state is order.status.state
    assert record.filled_quantity == order.filled_quantity
    assert (order.account, order.symbol, order.side, order.quantity) == (
        intent.account, intent.symbol, str(intent.side), intent.quantity,
    )
    assert record.fence == 1, "one claim ever taken on a fresh scope means fence 1"
    assert not record.released
    if order.status is OrderStatus.FILLED:
        expected = {(intent.account, intent.symbol): intent.quantity}
        assert guard.store.filled_positions() == expected
        assert broker.positions() == [Position(intent.account, intent.symbol, intent.quantity)]
    report = guard.reconcile(broker, wait=False)
    assert report.clean and not report.decisions, report.lines()
    return record


def assert_blocked_by(result: SubmitResult, holder_id: str, reasons: set[BlockReason] = SAME_INTENT) -> None:
    assert not result
    assert result.outcome is Outcome.BLOCKED
    assert result.intent is None
    assert result.reason in reasons, result.message
    assert result.holder is not None and result.holder.id == holder_id, result.message


def assert_attempt_log(guard: Guard, winner_id: str, n: int) -> list[Any]:
    """The attempts log has one row per attempt: one CLAIMED, n-1 BLOCKED naming the winner."""
    attempts = guard.attempts()
    assert len(attempts) == n
    claimed = [a for a in attempts if a.outcome == "CLAIMED"]
    blocked = [a for a in attempts if a.outcome == "BLOCKED"]
    assert len(claimed) == 1 and claimed[0].intent_id == winner_id
    assert len(blocked) == n - 1
    assert all(a.reason in SAME_INTENT and a.holder_id == winner_id for a in blocked)
    assert len({a.scope_key for a in attempts}) == 1, "every attempt raced for the same scope"
    return attempts


def collect(results: Any, n: int, procs: list[Any]) -> list[dict[str, Any]]:
    """``n`` results from child processes; fail fast (with exit codes) if one died."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + CHILD_TIMEOUT
    while len(out) < n:
        try:
            out.append(results.get(timeout=0.5))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                pytest.fail(f"child processes failed or hung: {[(p.name, p.exitcode) for p in procs]}")
    for p in procs:
        p.join(timeout=CHILD_TIMEOUT)
        assert p.exitcode == 0, f"{p.name} exited with {p.exitcode}"
    for item in out:
        if "error" in item:
            pytest.fail(f"child {item.get('name')} raised: {item['error']}")
    return out


def summary(result: SubmitResult, **extra: Any) -> dict[str, Any]:
    """A SubmitResult reduced to plain values a child can send back."""
    return {
        "outcome": result.outcome.value,
        "reason": result.reason.value if result.reason else None,
        "holder_id": result.holder.id if result.holder else None,
        "holder_state": result.holder.state.value if result.holder else None,
        "holder_fence": result.holder.fence if result.holder else None,
        "holder_released": result.holder.released if result.holder else None,
        "intent_id": result.intent.id if result.intent else None,
        "state": result.state.value if result.state else None,
        "client_order_id": result.client_order_id,
        "attempt_id": result.attempt_id,
        "pid": os.getpid(),
        **extra,
    }


def open_in_child(
    ledger_url: str, paper_url: str, runner: str, *, venue: dict[str, Any] | None = None, **guard_options: Any,
) -> tuple[Guard, PaperBroker, OncePer]:
    """What a runner process does at start-up: its own guard and its own venue connection."""
    guard = Guard.open(ledger_url, runner=runner, synchronous="NORMAL", **guard_options)
    broker = PaperBroker.open(paper_url, **(venue or {}))
    policy = daily_entry()
    # Load the exchange calendar now, so the heavy first lookup is not inside the race.
    policy.rule(make_intent(), datetime.now(UTC))
    return guard, broker, policy


# ---------------------------------------------------------------- child process targets


def _racer(i: int, ledger_url: str, paper_url: str, barrier: Any, results: Any) -> None:
    """One of N processes: its own guard and venue connection, then one submit at the barrier."""
    try:
        guard, broker, policy = open_in_child(ledger_url, paper_url, runner=f"host-{i}")
        barrier.wait(timeout=CHILD_TIMEOUT)
        result = guard.submit(make_intent(), broker, policy=policy)
        results.put(summary(result, name=f"host-{i}"))
        guard.close()
        broker.close()
    except BaseException as exc:
        results.put({"name": f"host-{i}", "error": repr(exc)})
        raise


def _runner_loop(runner: str, ledger_url: str, paper_url: str, loops: int, barrier: Any, results: Any) -> None:
    """A bot runner's scheduler firing the same daily entry again and again."""
    try:
        guard, broker, policy = open_in_child(ledger_url, paper_url, runner=runner)
        rng = random.Random(f"{runner}-{os.getpid()}")
        barrier.wait(timeout=CHILD_TIMEOUT)
        for n in range(loops):
            result = guard.submit(make_intent(), broker, policy=policy)
            results.put(summary(result, name=runner, loop=n))
            time.sleep(rng.uniform(0.002, 0.03))
        guard.close()
        broker.close()
    except BaseException as exc:
        results.put({"name": runner, "error": repr(exc)})
        raise


# Every timeout in play is shorter than the venue's fill.
SLOW_FILL = 5.0
SHORT_TIMEOUTS = {"send_deadline": 1.0, "stale_after": 2.0, "busy_timeout": 1.0}


def _slow_fill_attempt(
    name: str, offset: float, wait_for_fill: float, ledger_url: str, paper_url: str,
    ready: Any, go: Any, start_at: Any, results: Any,
) -> None:
    """Submit at ``start_at + offset`` on a venue whose fills take SLOW_FILL seconds."""
    try:
        guard, broker, policy = open_in_child(
            ledger_url, paper_url, runner=name, venue={"fill_delay": SLOW_FILL}, **SHORT_TIMEOUTS
        )
        ready.put(name)
        if not go.wait(timeout=CHILD_TIMEOUT):
            raise TimeoutError("never told to go")
        time.sleep(max(0.0, start_at.value + offset - time.time()))
        began = time.time()
        result = guard.submit(make_intent(), broker, policy=policy, wait_for_fill=wait_for_fill)
        results.put(summary(result, name=name, began=began, ended=time.time()))
        guard.close()
        broker.close()
    except BaseException as exc:
        results.put({"name": name, "error": repr(exc)})
        raise


# ------------------------------------------------------------------------------ threads


def test_32_threads_same_intent_one_order(guard: Guard, broker: PaperBroker) -> None:
    n = 32
    intent = make_intent()
    policy = daily_entry()
    policy.rule(intent, datetime.now(UTC))  # warm the calendar outside the race
    barrier = threading.Barrier(n)

    def attempt(_: int) -> SubmitResult:
        barrier.wait(timeout=30)
        return guard.submit(intent, broker, policy=policy)

    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="racer") as pool:
        results = list(pool.map(attempt, range(n)))

    sent = [r for r in results if r.outcome is Outcome.SENT]
    blocked = [r for r in results if r.outcome is Outcome.BLOCKED]
    assert len(sent) == 1, [r.message for r in sent]
    assert len(blocked) == n - 1
    winner = sent[0]
    assert winner and winner.intent is not None and winner.state is State.FILLED
    for r in blocked:
        assert_blocked_by(r, winner.intent.id)

    record = assert_one_order_and_ledger_agrees(guard, broker, intent)
    assert record.id == winner.intent.id
    assert broker.orders()[0].client_order_id == winner.client_order_id

    attempts = assert_attempt_log(guard, winner.intent.id, n)
    # Each result's attempt row says the same thing the caller was told.
    by_id = {a.id: a for a in attempts}
    assert set(by_id) == {r.attempt_id for r in results}
    for r in blocked:
        assert by_id[r.attempt_id].reason is r.reason
    assert len({a.thread for a in attempts}) == n, "every thread's attempt is recorded as its own"
    assert {a.pid for a in attempts} == {os.getpid()}


# ------------------------------------------------------------------------------ asyncio


def test_64_asyncio_tasks_one_order(guard: Guard, broker: PaperBroker) -> None:
    n = 64
    intent = make_intent()
    policy = daily_entry()
    policy.rule(intent, datetime.now(UTC))
    names = [f"entry-task-{i:02d}" for i in range(n)]

    async def main() -> list[SubmitResult]:
        go = asyncio.Event()
        waiting = 0

        async def attempt() -> SubmitResult:
            nonlocal waiting
            waiting += 1
            await go.wait()
            return await guard.asubmit(intent, broker, policy=policy)

        tasks = [asyncio.create_task(attempt(), name=name) for name in names]
        while waiting < n:
            await asyncio.sleep(0)
        go.set()  # every task is parked on the event: release them together
        return list(await asyncio.gather(*tasks))

    results = asyncio.run(main())

    sent = [r for r in results if r.outcome is Outcome.SENT]
    assert len(sent) == 1
    winner = sent[0]
    assert winner.intent is not None
    blocked = [r for r in results if r.outcome is Outcome.BLOCKED]
    assert len(blocked) == n - 1
    for r in blocked:
        assert_blocked_by(r, winner.intent.id)

    record = assert_one_order_and_ledger_agrees(guard, broker, intent)
    winner_task = names[results.index(winner)]
    assert record.task == winner_task

    attempts = assert_attempt_log(guard, winner.intent.id, n)
    assert sorted(a.task for a in attempts) == names, "each task's name is recorded with its attempt"
    by_id = {a.id: a for a in attempts}
    for name, r in zip(names, results, strict=True):
        assert by_id[r.attempt_id].task == name


# ---------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_8_processes_same_intent_one_order(guard: Guard, broker: PaperBroker, ledger_url: str, paper_url: str) -> None:
    n = 8
    barrier = SPAWN.Barrier(n)
    results = SPAWN.Queue()
    procs = [
        SPAWN.Process(target=_racer, args=(i, ledger_url, paper_url, barrier, results), name=f"host-{i}")
        for i in range(n)
    ]
    for p in procs:
        p.start()
    out = collect(results, n, procs)

    sent = [r for r in out if r["outcome"] == "SENT"]
    assert len(sent) == 1, sent
    winner = sent[0]
    blocked = [r for r in out if r["outcome"] == "BLOCKED"]
    assert len(blocked) == n - 1
    for r in blocked:
        assert BlockReason(r["reason"]) in SAME_INTENT
        assert r["holder_id"] == winner["intent_id"]

    record = assert_one_order_and_ledger_agrees(guard, broker, make_intent())
    assert record.id == winner["intent_id"]
    assert record.runner == winner["name"] and record.pid == winner["pid"]
    assert broker.orders()[0].client_order_id == winner["client_order_id"]

    attempts = assert_attempt_log(guard, winner["intent_id"], n)
    pids = {a.pid for a in attempts}
    assert len(pids) == n, f"expected {n} distinct pids in the attempts log, got {pids}"
    assert pids == {r["pid"] for r in out}
    assert os.getpid() not in pids
    assert sorted(a.runner for a in attempts) == sorted(f"host-{i}" for i in range(n))


@pytest.mark.slow
def test_stale_runner_and_new_runner_loop_one_order(
    guard: Guard, broker: PaperBroker, ledger_url: str, paper_url: str,
) -> None:
    """After a deploy the old runner is still alive: both fire the same daily entry 20 times."""
    loops = 20
    runners = ("runner-old", "runner-new")
    barrier = SPAWN.Barrier(len(runners))
    results = SPAWN.Queue()
    procs = [
        SPAWN.Process(target=_runner_loop, args=(r, ledger_url, paper_url, loops, barrier, results), name=r)
        for r in runners
    ]
    for p in procs:
        p.start()
    out = collect(results, loops * len(runners), procs)

    sent = [r for r in out if r["outcome"] == "SENT"]
    assert len(sent) == 1, sent
    winner = sent[0]
    blocked = [r for r in out if r["outcome"] == "BLOCKED"]
    assert len(blocked) == loops * len(runners) - 1
    for r in blocked:
        assert BlockReason(r["reason"]) in SAME_INTENT
        assert r["holder_id"] == winner["intent_id"]
    assert Counter(r["name"] for r in out) == dict.fromkeys(runners, loops)

    assert_one_order_and_ledger_agrees(guard, broker, make_intent())
    assert broker.orders()[0].client_order_id == winner["client_order_id"]
    attempts = assert_attempt_log(guard, winner["intent_id"], loops * len(runners))
    assert Counter(a.runner for a in attempts) == dict.fromkeys(runners, loops)
    assert len({a.pid for a in attempts}) == len(runners)


@pytest.mark.slow
def test_fill_slower_than_every_timeout_keeps_scope_held(
    guard: Guard, broker: PaperBroker, ledger_url: str, paper_url: str,
) -> None:
    """A's order works for 5 s, longer than every timeout; B (~1 s) and C (~3 s) stay blocked."""
    plan = {"A": (0.0, SLOW_FILL + 1.0), "B": (1.0, 0.0), "C": (3.0, 0.0)}  # name: (offset, wait_for_fill)
    ready, results = SPAWN.Queue(), SPAWN.Queue()
    go = SPAWN.Event()
    start_at = SPAWN.Value("d", 0.0)
    procs = [
        SPAWN.Process(
            target=_slow_fill_attempt,
            args=(name, offset, wait, ledger_url, paper_url, ready, go, start_at, results),
            name=name,
        )
        for name, (offset, wait) in plan.items()
    ]
    for p in procs:
        p.start()
    for _ in procs:  # all three loaded and connected before the clock starts
        try:
            ready.get(timeout=CHILD_TIMEOUT)
        except queue.Empty:
            for p in procs:
                p.kill()
            pytest.fail(f"children did not get ready: {[(p.name, p.exitcode) for p in procs]}")
    start_at.value = time.time() + 0.2
    go.set()
    out = {r["name"]: r for r in collect(results, len(procs), procs)}
    a, b, c = out["A"], out["B"], out["C"]

    # A held the scope through a fill slower than its send deadline and stale_after.
    assert a["outcome"] == "SENT" and a["state"] == "FILLED", a
    assert a["ended"] - a["began"] >= SLOW_FILL - 0.5 > SHORT_TIMEOUTS["stale_after"]
    # B and C came while A's order was still working at the venue: blocked, IN_FLIGHT.
    for late in (b, c):
        assert late["outcome"] == "BLOCKED", late
        assert late["reason"] == BlockReason.IN_FLIGHT.value, late
        assert late["holder_id"] == a["intent_id"]
        assert late["holder_state"] == State.ACKED.value  # working, not yet filled
        assert late["holder_fence"] == 1 and late["holder_released"] is False
        assert late["began"] < a["ended"] and late["ended"] < a["ended"]
    assert c["began"] - a["began"] > SHORT_TIMEOUTS["stale_after"], "C came after every timeout had run out"

    # After A is FILLED, another try is a DUPLICATE of A.
    again = guard.submit(make_intent(), broker, policy=daily_entry())
    assert_blocked_by(again, a["intent_id"], {BlockReason.DUPLICATE})
    assert again.holder is not None and again.holder.state is State.FILLED

    record = assert_one_order_and_ledger_agrees(guard, broker, make_intent())
    assert record.id == a["intent_id"] and record.state is State.FILLED
    assert broker.orders()[0].status is OrderStatus.FILLED
    # No timer released the scope: one claim ever (fence 1), every other attempt blocked by A.
    attempts = assert_attempt_log(guard, a["intent_id"], 4)
    reasons = sorted(a_.reason.value for a_ in attempts if a_.reason is not None)
    assert reasons == ["DUPLICATE", "IN_FLIGHT", "IN_FLIGHT"]


# --------------------------------------------------------- claim() and @once under a race


def test_claim_context_manager_body_runs_once(guard: Guard, broker: PaperBroker) -> None:
    n = 16
    intent = make_intent(strategy="spx-claim-cm")
    policy = daily_entry()
    policy.rule(intent, datetime.now(UTC))
    barrier = threading.Barrier(n)
    lock = threading.Lock()
    runs = 0

    def attempt(_: int) -> tuple[bool, Claim]:
        nonlocal runs
        barrier.wait(timeout=30)
        with guard.claim(intent, policy=policy) as claim:
            if not claim:
                return False, claim
            with lock:
                runs += 1
            coid = claim.client_order_id  # the documented pattern: send with the claim's id
            request = OrderRequest.from_record(claim.intent, send_by=claim.send_by)
            assert request.client_order_id == coid
            claim.record(broker.submit(request))
            return True, claim

    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="cm") as pool:
        outcomes = list(pool.map(attempt, range(n)))

    assert runs == 1
    winners = [c for ran, c in outcomes if ran]
    losers = [c for ran, c in outcomes if not ran]
    assert len(winners) == 1 and len(losers) == n - 1
    winner = winners[0]
    assert winner and winner.allowed and winner.intent.state is State.FILLED
    for claim in losers:
        assert not claim and claim.blocked
        assert claim.reason in SAME_INTENT
        assert claim.holder is not None and claim.holder.id == winner.intent.id
        assert claim.existing is not None and claim.existing.id == winner.intent.id

    record = assert_one_order_and_ledger_agrees(guard, broker, intent)
    assert record.id == winner.intent.id
    assert_attempt_log(guard, winner.intent.id, n)


def test_once_decorator_runs_function_once(guard: Guard, broker: PaperBroker) -> None:
    n = 16
    intent = make_intent(strategy="spx-once-deco")
    policy = daily_entry()
    policy.rule(intent, datetime.now(UTC))
    barrier = threading.Barrier(n)
    lock = threading.Lock()
    calls: list[str] = []

    @guard.once(intent=intent, policy=policy)
    def execute_entry() -> str:
        claim = current_claim()
        assert claim is not None
        with lock:
            calls.append(threading.current_thread().name)
        order = broker.submit(OrderRequest.from_record(claim.intent, send_by=claim.send_by))
        claim.record(order)
        return f"placed {order.client_order_id}"

    def attempt(_: int) -> Any:
        barrier.wait(timeout=30)
        return execute_entry()

    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="deco") as pool:
        results = list(pool.map(attempt, range(n)))

    assert len(calls) == 1, f"the guarded function ran {len(calls)} times"
    placed = [r for r in results if isinstance(r, str)]
    blocked = [r for r in results if isinstance(r, SubmitResult)]
    assert len(placed) == 1 and len(blocked) == n - 1

    record = assert_one_order_and_ledger_agrees(guard, broker, intent)
    assert placed[0] == f"placed {record.client_order_id}"
    assert record.state is State.FILLED and record.thread == calls[0]
    for r in blocked:
        assert_blocked_by(r, record.id)
    assert_attempt_log(guard, record.id, n)
    assert record.quantity == Decimal(4)
