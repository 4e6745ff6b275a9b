"""Circuit breakers and the kill switch, end to end.

Real components only: the Guard on real SQLite ledger files and a real PostgreSQL schema, the
project's PaperBroker on a SQLite file as the venue (its order log is what gets counted), real
threads, asyncio tasks and OS processes ("spawn": each child opens its own ledger and venue,
like separate bot runners) started behind barriers. Store-level checks of the same machinery,
run on both stores, live in tests/store/test_control_conformance.py.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import os
import queue
import sqlite3
import threading
import time
import traceback
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, localcontext
from typing import TYPE_CHECKING, Any

import pytest

from orderguard import (
    BlockReason,
    Ever,
    Guard,
    HaltCause,
    InvalidIntent,
    InvalidPolicy,
    NotionalLimit,
    OncePer,
    Outcome,
    RateLimit,
    SendDeadlineExceeded,
    State,
    TradingState,
)
from orderguard.brokers import OrderRequest, PaperBroker, PaperFaults
from orderguard.policies import canonical_halt_scope, halt_scope_matches, parse_halt_scope, scope_text
from orderguard.store.base import client_order_id
from orderguard.store.sqlite import SQLiteStore
from tests.helpers import make_intent
from tests.store.conftest import drop_schema, postgres_or_skip

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from orderguard import OrderIntent, Policy, SubmitResult
    from orderguard.brokers import BrokerOrder
    from orderguard.store.base import Store

SPAWN = mp.get_context("spawn")
CHILD_TIMEOUT = 60.0  # seconds a child may take to start (imports) and finish
STRATEGY = "spx-calendar"  # make_intent's strategy
EACH = OncePer(Ever(), by=("account", "strategy", "symbol", "tags.n"))  # every fresh() intent its own scope
_numbers = itertools.count()


def fresh(**fields: Any) -> OrderIntent:
    """A distinct intent (its own ``tags.n``, unique across processes), so only halts and
    limits can stop it."""
    tags = {"n": f"{os.getpid()}-{next(_numbers)}", **fields.pop("tags", {})}
    return make_intent(tags=tags, **fields)


def open_store(kind: str, location: str, schema: str | None, **options: Any) -> Store:
    """A store on an existing ledger: a SQLite file, or a PostgreSQL schema."""
    if kind == "sqlite":
        return SQLiteStore(location, **{"synchronous": "NORMAL", **options})
    from orderguard.store.postgres import PostgresStore

    return PostgresStore(location, schema=schema, **options)


@dataclass
class Ledger:
    """One test's ledger (either store kind) and paper venue; closes what it opened."""

    kind: str
    location: str  # SQLite path or PostgreSQL URL
    schema: str | None
    paper: str
    _open: list[Any] = field(default_factory=list)

    def guard(self, **options: Any) -> Guard:
        store_options = {k: options.pop(k) for k in ("busy_timeout", "clock") if k in options}  # the store's
        g = Guard(open_store(self.kind, self.location, self.schema, **store_options), **options)
        self._open.append(g)
        return g

    def broker(self, **options: Any) -> PaperBroker:
        b = PaperBroker(self.paper, **options)
        self._open.append(b)
        return b

    def store(self, **options: Any) -> Store:
        st = open_store(self.kind, self.location, self.schema, **options)
        self._open.append(st)
        return st

    def child_args(self) -> tuple[str, str, str | None, str]:
        return self.kind, self.location, self.schema, self.paper

    def close(self) -> None:
        for thing in reversed(self._open):
            thing.close()


@contextmanager
def new_ledger(kind: str, tmp_path: Path) -> Iterator[Ledger]:
    paper = str(tmp_path / "paper.db")
    PaperBroker(paper).close()  # the venue file exists before any child opens it
    if kind == "sqlite":
        path = str(tmp_path / "ledger.db")
        open_store("sqlite", path, None).close()
        led = Ledger("sqlite", path, None, paper)
        try:
            yield led
        finally:
            led.close()
        return
    url = postgres_or_skip()
    schema = f"og_brk_{uuid.uuid4().hex[:10]}"
    open_store("postgres", url, schema).close()
    led = Ledger("postgres", url, schema, paper)
    try:
        yield led
    finally:
        led.close()
        drop_schema(url, schema)


@pytest.fixture(params=["sqlite", "postgres"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    with new_ledger(request.param, tmp_path) as led:
        yield led


@pytest.fixture
def sqlite_ledger(tmp_path: Path) -> Iterator[Ledger]:
    with new_ledger("sqlite", tmp_path) as led:
        yield led


@pytest.fixture
def pg_ledger(tmp_path: Path) -> Iterator[Ledger]:
    with new_ledger("postgres", tmp_path) as led:
        yield led


def blocked(result: SubmitResult, reason: BlockReason) -> SubmitResult:
    assert result.outcome is Outcome.BLOCKED, result.message
    assert result.reason is reason, result.message
    assert result.intent is None
    return result


def sent(result: SubmitResult, state: State = State.FILLED) -> SubmitResult:
    assert result.outcome is Outcome.SENT, result.message
    assert result.state is state, result.message
    return result


# ------------------------------------------------------------------- policy arguments


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: RateLimit(0, 60), id='RateLimit(0, 60)'),
        pytest.param(lambda: RateLimit(-1, 60), id='RateLimit(-1, 60)'),
        pytest.param(lambda: RateLimit(1.5, 60), id='RateLimit(1.5, 60)'),  # type: ignore[arg-type]
        pytest.param(lambda: RateLimit(True, 60), id='RateLimit(True, 60)'),
        pytest.param(lambda: RateLimit("3", 60), id='RateLimit("3", 60)'),  # type: ignore[arg-type]
        pytest.param(lambda: RateLimit(3, 0), id='RateLimit(3, 0)'),
        pytest.param(lambda: RateLimit(3, -60), id='RateLimit(3, -60)'),
        pytest.param(lambda: RateLimit(3, float("nan")), id='RateLimit(3, float("nan"))'),
        pytest.param(lambda: RateLimit(3, float("inf")), id='RateLimit(3, float("inf"))'),
        pytest.param(lambda: RateLimit(3, True), id='RateLimit(3, True)'),
        pytest.param(lambda: RateLimit(3, "60"), id='RateLimit(3, "60")'),  # type: ignore[arg-type]
        pytest.param(lambda: RateLimit(3, 60, by=()), id='RateLimit(3, 60, by=())'),
        pytest.param(lambda: RateLimit(3, 60, by=("venue",)), id='RateLimit(3, 60, by=("venue",))'),
        pytest.param(lambda: NotionalLimit(0, 60), id='NotionalLimit(0, 60)'),
        pytest.param(lambda: NotionalLimit(-5, 60), id='NotionalLimit(-5, 60)'),
        pytest.param(lambda: NotionalLimit("-0.01", 60), id='NotionalLimit("-0.01", 60)'),
        pytest.param(lambda: NotionalLimit("NaN", 60), id='NotionalLimit("NaN", 60)'),
        pytest.param(lambda: NotionalLimit(Decimal("NaN"), 60), id='NotionalLimit(Decimal("NaN"), 60)'),
        pytest.param(lambda: NotionalLimit("inf", 60), id='NotionalLimit("inf", 60)'),
        pytest.param(lambda: NotionalLimit(Decimal("-Infinity"), 60), id='NotionalLimit(Decimal("-Infinity"), 60)'),
        pytest.param(lambda: NotionalLimit(1000.5, 60), id='NotionalLimit(1000.5, 60)'),  # type: ignore[arg-type]
        pytest.param(lambda: NotionalLimit(True, 60), id='NotionalLimit(True, 60)'),
        pytest.param(lambda: NotionalLimit("a lot", 60), id='NotionalLimit("a lot", 60)'),
        pytest.param(lambda: NotionalLimit(None, 60), id='NotionalLimit(None, 60)'),  # type: ignore[arg-type]
        pytest.param(lambda: NotionalLimit(1000, 0), id='NotionalLimit(1000, 0)'),
        pytest.param(lambda: NotionalLimit(1000, float("nan")), id='NotionalLimit(1000, float("nan"))'),
        pytest.param(lambda: NotionalLimit(1000, float("inf")), id='NotionalLimit(1000, float("inf"))'),
        pytest.param(lambda: NotionalLimit(1000, 400 * 86400), id='NotionalLimit(1000, 400 * 86400)'),
        pytest.param(lambda: NotionalLimit(1000, False), id='NotionalLimit(1000, False)'),
        pytest.param(lambda: NotionalLimit(1000, 60, by=("tags.",)), id='NotionalLimit(1000, 60, by=("tags.",))'),
    ],
)

def test_bad_breaker_arguments_are_refused(make: Callable[[], Policy]) -> None:
    with pytest.raises(InvalidPolicy):
        make()


def test_good_breaker_arguments_are_kept_exactly() -> None:
    notional = NotionalLimit("1000.10", 0.5, by=("strategy", "symbol"), trip=True)
    assert notional.amount == Decimal("1000.10") and notional.per_seconds == 0.5 and notional.trip
    assert repr(notional) == "NotionalLimit(1000.10, per_seconds=0.5, by=('strategy', 'symbol'), trip=True)"
    assert NotionalLimit(Decimal("0.01"), 1).amount == Decimal("0.01")
    assert NotionalLimit(5, 1).amount == Decimal(5)
    rate = RateLimit(3, 1)
    assert (rate.n, rate.per_seconds, rate.by, rate.trip) == (3, 1.0, ("strategy",), False)
    assert repr(rate) == "RateLimit(3, per_seconds=1, by=('strategy',))"


# ------------------------------------------------------------------ counting, end to end


def test_rate_limit_counts_what_reached_or_may_have_reached_the_venue(
    guard: Guard, open_broker: Callable[..., PaperBroker]
) -> None:
    policy = RateLimit(4, 60, by=("strategy",))
    venue = open_broker()
    lossy = open_broker(faults=PaperFaults(lose_ack=1))
    picky = open_broker(reject_symbols=("BAD",))
    with guard.claim(fresh(symbol="HELD"), policy=policy) as held:  # in flight while the rest happens
        assert held
        sent(guard.submit(fresh(symbol="LOST"), lossy, policy=policy), State.UNKNOWN)
        sent(guard.submit(fresh(symbol="BAD"), picky, policy=policy), State.REJECTED)
        with guard.claim(fresh(symbol="GIVEUP"), policy=policy) as dropped:
            assert dropped  # ends without handing out its client order id: ABANDONED
        sent(guard.submit(fresh(symbol="OK"), venue, policy=policy))  # HELD, LOST, BAD (the venue saw it), OK: 4
        refused = blocked(guard.submit(fresh(symbol="LATE"), venue, policy=policy), BlockReason.RATE_LIMIT)
        assert repr(policy) in refused.message
        assert "4 orders in the last 60s (limit 4)" in refused.message
        held.record(venue.submit(held.request()))
    assert sorted(o.symbol for o in venue.orders()) == ["HELD", "LOST", "OK"]
    states = Counter((r.symbol, r.state) for r in guard.intents())
    assert states == {
        ("HELD", State.FILLED): 1, ("LOST", State.UNKNOWN): 1, ("BAD", State.REJECTED): 1,
        ("GIVEUP", State.ABANDONED): 1, ("OK", State.FILLED): 1,
    }
    (attempt,) = guard.attempts(blocked=True)
    assert attempt.reason is BlockReason.RATE_LIMIT and attempt.symbol == "LATE"


def test_notional_limit_counts_market_orders_at_their_reference_price(
    guard: Guard, broker: PaperBroker
) -> None:
    policy = NotionalLimit("1000.10", 60, by=("strategy",))
    sent(guard.submit(fresh(quantity=10, reference_price="100.01"), broker, policy=policy))  # exactly 1000.10
    refused = blocked(guard.submit(fresh(quantity=1, reference_price="0.01"), broker, policy=policy),
                      BlockReason.NOTIONAL_LIMIT)
    assert "1000.1 placed in the last 60s + 0.01 would exceed 1000.1" in refused.message
    attempts, intents = guard.attempts(), guard.intents()
    # A market order without a reference price cannot be counted: refused before anything is written.
    with pytest.raises(InvalidIntent) as info:
        guard.submit(fresh(quantity=1, strategy="other"), broker, policy=policy)
    assert info.value.field == "reference_price"
    assert "reference_price" in str(info.value)
    assert guard.attempts() == attempts and guard.intents() == intents
    assert len(broker.orders()) == 1


def test_notional_is_compared_exactly_beyond_28_significant_digits(guard: Guard) -> None:
    quantity, price = Decimal("0.123456789012"), Decimal("654321.123456789012")  # both valid intent values
    amount = Decimal("80780.38488469960515348393614")
    with localcontext() as exact:
        exact.prec = 100
        assert quantity * price > amount  # the true notional is over the limit
    policy = NotionalLimit(amount, 60, by=("strategy",))
    intent = fresh(quantity=quantity, order_type="LIMIT", limit_price=price)
    with guard.claim(intent, policy=policy) as claim:
        assert claim.reason is BlockReason.NOTIONAL_LIMIT, claim.message


# ------------------------------------------------------------------------------ trips


def test_a_tripped_breaker_halts_the_strategy_for_every_runner_until_an_operator_resumes_it(
    sqlite_ledger: Ledger,
) -> None:
    bot = sqlite_ledger.guard(runner="bot-7")
    desk = sqlite_ledger.guard(runner="desk-alice")
    broker = sqlite_ledger.broker()
    policy = RateLimit(2, 60, by=("strategy",), trip=True)
    sent(bot.submit(fresh(symbol="SPX"), broker, policy=policy))
    sent(bot.submit(fresh(symbol="QQQ"), broker, policy=policy))
    with bot.claim(fresh(symbol="NDX"), policy=policy) as refused:
        assert not refused and refused.reason is BlockReason.RATE_LIMIT
        assert refused.decision.tripped
        record = refused.decision.halt
    assert record is not None
    assert (record.scope, record.state, record.cause) == (f"strategy={STRATEGY}", TradingState.HALTED, HaltCause.RATE_LIMIT)
    assert "runner bot-7" in record.actor and f"pid {os.getpid()}" in record.actor
    assert bot.halts() == desk.halts() == [record]

    # Every later claim of the strategy is HALTED, through any runner, whatever its policy allows.
    for runner, intent, chosen in (
        (bot, fresh(symbol="IWM"), EACH),
        (desk, fresh(symbol="DIA", side="SELL", account="hedge"), EACH),
        (desk, fresh(symbol="TLT"), policy),
    ):
        halted = blocked(runner.submit(intent, broker, policy=chosen), BlockReason.HALTED)
        assert "RATE_LIMIT by runner bot-7" in halted.message
    sent(bot.submit(fresh(strategy="other"), broker, policy=policy))  # other strategies trade on
    assert len(broker.orders()) == 3

    desk.resume(f"strategy={STRATEGY}", reason="runaway loop fixed")
    assert bot.halts() == []
    latest, first = desk.store.halt_history()[:2]
    assert (first.state, first.cause, first.actor) == (TradingState.HALTED, HaltCause.RATE_LIMIT, record.actor)
    assert (latest.state, latest.cause, latest.reason) == (TradingState.ACTIVE, HaltCause.OPERATOR, "runaway loop fixed")
    assert "runner desk-alice" in latest.actor
    sent(bot.submit(fresh(symbol="IWM"), broker, policy=EACH))
    # The limit still remembers its window: the next rate-limited order trips it again.
    blocked(bot.submit(fresh(symbol="XLF"), broker, policy=policy), BlockReason.RATE_LIMIT)
    assert [h.cause for h in desk.halts()] == [HaltCause.RATE_LIMIT]
    assert len(broker.orders()) == 4


# ------------------------------------------------------------------ real concurrency


def _rate_storm_child(
    kind: str, location: str, schema: str | None, paper: str, index: int, threads: int, per_thread: int,
    barrier: Any, results: Any,
) -> None:
    """One runner process: its own guard and venue, ``threads`` threads submitting distinct intents."""
    try:
        guard = Guard(open_store(kind, location, schema), runner=f"proc-{index}")
        broker = PaperBroker(paper)
        policy = RateLimit(10, 60, by=("strategy",), trip=True)
        start = threading.Barrier(threads)
        out: list[tuple[str, str | None, str | None]] = []
        errors: list[str] = []

        def work(t: int) -> None:
            try:
                start.wait(timeout=CHILD_TIMEOUT)
                for k in range(per_thread):
                    r = guard.submit(make_intent(strategy="storm", symbol=f"P{index}T{t}K{k}"), broker, policy=policy)
                    out.append((r.outcome.value, r.reason.value if r.reason else None, r.client_order_id))
            except BaseException:
                errors.append(traceback.format_exc())

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        barrier.wait(timeout=CHILD_TIMEOUT)  # every process is up before any thread starts
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=CHILD_TIMEOUT)
        results.put({"index": index, "results": out, "errors": errors})
        guard.close()
        broker.close()
    except BaseException:
        results.put({"index": index, "errors": [traceback.format_exc()]})
        raise


def gather_children(results: Any, procs: list[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for _ in procs:
        try:
            out.append(results.get(timeout=CHILD_TIMEOUT))
        except queue.Empty:
            for p in procs:
                p.kill()
            pytest.fail(f"child processes hung or died: {[(p.name, p.exitcode) for p in procs]}")
    for p in procs:
        p.join(timeout=CHILD_TIMEOUT)
        assert p.exitcode == 0, f"{p.name} exited with {p.exitcode}"
    errors = [e for item in out for e in item.get("errors", [])]
    assert not errors, errors[0]
    return out


@pytest.mark.slow
def test_processes_and_threads_through_a_tripping_rate_limit_send_exactly_n_orders(ledger: Ledger) -> None:
    processes, threads, per_thread = 4, 3, 5
    barrier, results = SPAWN.Barrier(processes), SPAWN.Queue()
    procs = [
        SPAWN.Process(
            target=_rate_storm_child, name=f"runner-{i}",
            args=(*ledger.child_args(), i, threads, per_thread, barrier, results),
        )
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    outcomes = [r for item in gather_children(results, procs) for r in item["results"]]
    assert len(outcomes) == processes * threads * per_thread

    broker = ledger.broker()
    orders = broker.orders()
    sent_ids = sorted(coid for outcome, _, coid in outcomes if outcome == "SENT")
    assert len(orders) == 10, f"the venue holds {len(orders)} orders under RateLimit(10, 60)"
    assert sorted(o.client_order_id for o in orders) == sent_ids
    reasons = Counter(reason for outcome, reason, _ in outcomes if outcome == "BLOCKED")
    assert set(reasons) <= {"RATE_LIMIT", "HALTED"} and reasons["RATE_LIMIT"] >= 1, reasons
    guard = ledger.guard(runner="auditor", register=False)
    assert len(guard.intents()) == 10
    assert len(guard.attempts(limit=10_000)) == len(outcomes)
    (record,) = guard.halts()
    assert (record.scope, record.state, record.cause) == ("strategy=storm", TradingState.HALTED, HaltCause.RATE_LIMIT)
    assert record.actor.startswith("runner proc-")
    assert [(e.scope, e.state) for e in guard.store.halt_history()] == [("strategy=storm", TradingState.HALTED)]


@pytest.mark.parametrize("binding", ["rate", "notional"])
def test_asyncio_tasks_through_rate_and_notional_breakers(ledger: Ledger, binding: str) -> None:
    """320 tasks (8 per symbol x 40 symbols), each a distinct intent, through three policies."""
    # rate: 12 orders of at most 500 fit in 6000, so the rate limit always refuses first;
    # notional: at most 20 orders of at least 100 fit in 2000 < 40, so the notional limit does.
    n, amount, cause = (12, 6000, HaltCause.RATE_LIMIT) if binding == "rate" else (40, 2000, HaltCause.NOTIONAL_LIMIT)
    guard = ledger.guard(runner="async-bot")
    broker = ledger.broker()
    policies = [
        OncePer(Ever(), by=("strategy", "tags.task")),
        RateLimit(n, 60, by=("strategy",), trip=True),
        NotionalLimit(amount, 60, by=("strategy",), trip=True),
    ]
    names = {f"S{s:02d}-{k}": (s, k) for s in range(40) for k in range(8)}

    async def storm() -> list[SubmitResult]:
        tasks = []
        for name, (s, k) in names.items():
            intent = make_intent(
                strategy="storm", symbol=f"S{s:02d}", quantity=1 + (s * 8 + k) % 5, reference_price=100,
                tags={"task": name},
            )
            tasks.append(asyncio.create_task(guard.asubmit(intent, broker, policy=policies), name=name))
        return await asyncio.gather(*tasks)

    results = asyncio.run(storm())
    assert len(results) == 320
    orders = broker.orders()
    assert sorted(o.client_order_id for o in orders) == sorted(r.client_order_id or "" for r in results if r.sent)
    notional = sum((o.quantity * 100 for o in orders), Decimal(0))
    if binding == "rate":
        assert len(orders) == n
        assert notional <= amount
    else:
        assert notional <= amount, f"{notional} of notional went out under NotionalLimit({amount})"
        assert notional > amount - 500  # refused only once the next order (<= 500) no longer fitted
        assert len(orders) <= 20
    reasons = Counter(r.reason for r in results if r.blocked)
    limit_reason = BlockReason.RATE_LIMIT if binding == "rate" else BlockReason.NOTIONAL_LIMIT
    assert set(reasons) <= {limit_reason, BlockReason.HALTED} and reasons[limit_reason] >= 1, reasons
    assert sum(reasons.values()) == 320 - len(orders)
    (record,) = guard.halts()
    assert (record.scope, record.state, record.cause) == ("strategy=storm", TradingState.HALTED, cause)
    assert "runner async-bot" in record.actor
    # Concurrent refusals trip once: one HALTED event, whatever the store.
    events = guard.store.halt_history()
    assert [(e.scope, e.state, e.cause) for e in events] == [("strategy=storm", TradingState.HALTED, cause)]
    # Every attempt names the task that made it.
    assert {a.task for a in guard.attempts(limit=10_000)} == set(names)


# ------------------------------------------------------------------------ kill switch


def _kill_switch_child(kind: str, location: str, schema: str | None, paper: str, commands: Any, replies: Any) -> None:
    """Another runner process: submits what it is told and reports each outcome (or reason)."""
    try:
        guard = Guard(open_store(kind, location, schema), runner="child-runner")
        broker = PaperBroker(paper)
        while (command := commands.get(timeout=CHILD_TIMEOUT)) is not None:
            op, arg = command
            if op == "submit":
                out = []
                for fields in arg:
                    r = guard.submit(fresh(**fields), broker, policy=EACH)
                    out.append(r.reason.value if r.reason else r.outcome.value)
                replies.put(out)
            else:
                record = guard.halt(arg, reason="halted from the child process")
                replies.put(record.actor if record else None)
        guard.close()
        broker.close()
    except BaseException:
        replies.put({"error": traceback.format_exc()})
        raise


@pytest.mark.slow
def test_the_kill_switch_reaches_every_process(ledger: Ledger) -> None:
    desk = ledger.guard(runner="desk")
    broker = ledger.broker()
    commands, replies = SPAWN.Queue(), SPAWN.Queue()
    child = SPAWN.Process(target=_kill_switch_child, args=(*ledger.child_args(), commands, replies), name="child")
    child.start()

    def ask(command: tuple[str, Any]) -> Any:
        commands.put(command)
        try:
            reply = replies.get(timeout=CHILD_TIMEOUT)
        except queue.Empty:
            child.kill()
            pytest.fail(f"the child did not answer (exit code {child.exitcode})")
        assert not (isinstance(reply, dict) and "error" in reply), reply["error"]
        return reply

    try:
        desk.halt("global", reason="exchange outage")
        assert ask(("submit", [{}, {"strategy": "y", "account": "other", "symbol": "QQQ"}])) == ["HALTED", "HALTED"]
        desk.resume("global", reason="outage over")

        desk.halt("strategy=x", reason="strategy x misbehaves")
        assert ask(("submit", [
            {"strategy": "x"}, {"strategy": "x", "symbol": "QQQ", "side": "SELL"}, {"strategy": "y"},
        ])) == ["HALTED", "HALTED", "SENT"]
        desk.resume("strategy=x", reason="fixed")

        desk.halt("symbol=SPX,account=a", reason="bad SPX feed for account a")
        assert desk.halts()[0].scope == "account=a,symbol=SPX"
        assert ask(("submit", [
            {"account": "a", "symbol": "SPX"}, {"account": "a", "symbol": "QQQ"},
            {"account": "b", "symbol": "SPX"}, {"account": "a", "symbol": "SPX", "strategy": "y"},
        ])) == ["HALTED", "SENT", "SENT", "HALTED"]
        desk.resume("account=a,symbol=SPX", reason="feed back")

        # And the other way: a halt set in the child stops this process's next claim.
        actor = ask(("halt", "strategy=z"))
        assert actor.startswith("runner child-runner on ") and actor.endswith(f" pid {child.pid}")
        halted = blocked(desk.submit(fresh(strategy="z"), broker, policy=EACH), BlockReason.HALTED)
        assert "halted from the child process" in halted.message and f"pid {child.pid}" in halted.message
        assert ask(("submit", [{"strategy": "z"}, {"strategy": "w"}])) == ["HALTED", "SENT"]
    finally:
        commands.put(None)
        child.join(timeout=CHILD_TIMEOUT)
    assert child.exitcode == 0
    assert sorted((o.account, o.symbol) for o in broker.orders()) == [
        ("a", "QQQ"), ("b", "SPX"), ("main", "SPX"), ("main", "SPX"),
    ]
    assert [(e.scope, e.state) for e in desk.store.halt_history()][:2] == [
        ("strategy=z", TradingState.HALTED), ("account=a,symbol=SPX", TradingState.ACTIVE),
    ]


def test_reducing_allows_only_orders_that_shrink_the_filled_position(guard: Guard, broker: PaperBroker) -> None:
    sent(guard.submit(fresh(quantity=10), broker, policy=EACH))  # long 10 SPX, filled at the venue
    guard.halt("account=main,symbol=SPX", reason="wind the book down", reducing=True)
    (record,) = guard.halts()
    assert (record.state, record.cause) == (TradingState.REDUCING, HaltCause.OPERATOR)

    sent(guard.submit(fresh(side="SELL", quantity=4), broker, policy=EACH))  # smaller: allowed, long 6
    too_big = blocked(guard.submit(fresh(side="SELL", quantity=7), broker, policy=EACH), BlockReason.HALTED)
    assert "position in SPX for account main is 6" in too_big.message
    blocked(guard.submit(fresh(side="BUY", quantity=1), broker, policy=EACH), BlockReason.HALTED)
    sent(guard.submit(fresh(symbol="QQQ"), broker, policy=EACH))  # not in the scope

    # A resting reducing order counts as if it will fill: two sells cannot flip the position.
    resting = sent(guard.submit(fresh(side="SELL", quantity=4, order_type="LIMIT", limit_price=200), broker,
                                policy=EACH), State.ACKED)
    blocked(guard.submit(fresh(side="SELL", quantity=3), broker, policy=EACH), BlockReason.HALTED)  # 4 + 3 > 6
    sent(guard.submit(fresh(side="SELL", quantity=2), broker, policy=EACH))  # 4 + 2 = 6; long 4
    # Canceled at the venue, reconciled: the resting sell no longer counts.
    assert resting.client_order_id is not None
    broker.cancel(resting.client_order_id)
    report = guard.reconcile(broker)
    assert [(d.before, d.after) for d in report.decisions] == [(State.ACKED, State.CANCELED)]
    assert report.drift == []
    blocked(guard.submit(fresh(side="SELL", quantity=5), broker, policy=EACH), BlockReason.HALTED)
    sent(guard.submit(fresh(side="SELL", quantity=4), broker, policy=EACH))  # flat now
    blocked(guard.submit(fresh(side="SELL", quantity=1), broker, policy=EACH), BlockReason.HALTED)
    blocked(guard.submit(fresh(side="BUY", quantity=1), broker, policy=EACH), BlockReason.HALTED)
    assert [p for p in broker.positions() if p.symbol == "SPX"] == []
    assert guard.store.filled_positions()[("main", "SPX")] == 0

    guard.resume("account=main,symbol=SPX", reason="book is flat")
    sent(guard.submit(fresh(side="BUY", quantity=1), broker, policy=EACH))
    assert len(broker.orders()) == 7


# ------------------------------------------------------------------- trading scopes


@pytest.mark.parametrize(
    "text",
    ["venue=x", "strategy=", "=x", "strategy", "strategy=a,strategy=b", "", "   ", "strategy=a,,symbol=b",
     "tags.=x", "reference_price=1", "strategy=" + "x" * 600],
)
def test_malformed_trading_scopes_are_refused(text: str) -> None:
    with pytest.raises(InvalidPolicy):
        parse_halt_scope(text)


def test_trading_scopes_have_one_canonical_spelling() -> None:
    assert canonical_halt_scope("symbol=SPX,account=main") == "account=main,symbol=SPX"
    assert canonical_halt_scope(" symbol=SPX , account=main ") == "account=main,symbol=SPX"
    assert canonical_halt_scope(" GLOBAL ") == canonical_halt_scope("*") == "global"
    assert scope_text() == "global"
    assert scope_text(symbol="SPX", account="main") == "account=main,symbol=SPX"
    # ',' and '=' in a value are escaped, so the text still parses back to the same value.
    escaped = scope_text(strategy="a,b=c")
    assert escaped == "strategy=a%2Cb%3Dc"
    assert parse_halt_scope(escaped) == (("strategy", "a,b=c"),)
    assert canonical_halt_scope(escaped) == escaped
    assert parse_halt_scope("tags.desk=rates,strategy=x") == (("strategy", "x"), ("tags.desk", "rates"))
    assert halt_scope_matches(escaped, make_intent(strategy="a,b=c"))
    assert not halt_scope_matches(escaped, make_intent(strategy="a"))
    assert halt_scope_matches("tags.desk=rates", make_intent(tags={"desk": "rates"}))
    assert not halt_scope_matches("tags.desk=rates", make_intent())


def test_the_kill_switch_matches_escaped_values_and_refuses_malformed_scopes(guard: Guard, broker: PaperBroker) -> None:
    with pytest.raises(InvalidPolicy):
        guard.halt("strategy=a,b=c", reason="unescaped: 'b' is not a field")
    with pytest.raises(InvalidPolicy):
        guard.halt("account=main,account=other", reason="a field twice")
    assert guard.halts() == [] and guard.store.halt_history() == []
    record = guard.halt(scope_text(strategy="a,b=c"), reason="stop a,b=c")
    assert record is not None and record.scope == "strategy=a%2Cb%3Dc"
    blocked(guard.submit(fresh(strategy="a,b=c"), broker, policy=EACH), BlockReason.HALTED)
    sent(guard.submit(fresh(strategy="a"), broker, policy=EACH))


def test_a_halt_spelled_with_a_lowercase_side_blocks_that_side(guard: Guard, broker: PaperBroker) -> None:
    try:
        guard.halt(f"strategy={STRATEGY},side=buy", reason="stop buying")
    except InvalidPolicy:
        return  # refusing the spelling outright would also be safe
    blocked(guard.submit(fresh(side="buy"), broker, policy=EACH), BlockReason.HALTED)


# ---------------------------------------------------------------------- automatic halts


@pytest.mark.parametrize("fault", ["lose_ack", "disconnect"])
def test_n_unknown_outcomes_in_one_strategy_halt_it(
    ledger_url: str, open_broker: Callable[..., PaperBroker], fault: str
) -> None:
    guard = Guard.open(ledger_url, runner="flaky-bot", halt_after_unknown=3, synchronous="NORMAL")
    try:
        flaky = open_broker(faults=PaperFaults(lose_ack=-1) if fault == "lose_ack" else PaperFaults(disconnect=-1))
        healthy = open_broker()
        sent(guard.submit(fresh(strategy="other"), flaky, policy=EACH), State.UNKNOWN)  # another strategy's
        first = sent(guard.submit(fresh(), flaky, policy=EACH), State.UNKNOWN)
        sent(guard.submit(fresh(), flaky, policy=EACH), State.UNKNOWN)
        assert guard.halts() == []  # N-1 in this strategy: still trading
        sent(guard.submit(fresh(), healthy, policy=EACH))
        third = sent(guard.submit(fresh(), flaky, policy=EACH), State.UNKNOWN)

        (record,) = guard.halts()
        assert (record.scope, record.state, record.cause) == (f"strategy={STRATEGY}", TradingState.HALTED,
                                                               HaltCause.UNKNOWN_OUTCOMES)
        assert f"3 orders of strategy {STRATEGY} have unknown outcomes" in record.reason
        assert third.client_order_id is not None and third.client_order_id in record.reason
        assert first.client_order_id is not None and first.client_order_id not in record.reason
        assert "runner flaky-bot" in record.actor
        blocked(guard.submit(fresh(), healthy, policy=EACH), BlockReason.HALTED)
        sent(guard.submit(fresh(strategy="other"), healthy, policy=EACH))  # one UNKNOWN there

        # Reconciling the orders does not lift the halt: an operator does.
        report = guard.reconcile(healthy)
        settled = State.FILLED if fault == "lose_ack" else State.NOT_FOUND
        assert Counter(d.after for d in report.decisions) == {settled: 4}
        assert [h.cause for h in guard.halts()] == [HaltCause.UNKNOWN_OUTCOMES]
        blocked(guard.submit(fresh(), healthy, policy=EACH), BlockReason.HALTED)
        guard.resume(f"strategy={STRATEGY}", reason="venue fixed its gateway; all reconciled")
        sent(guard.submit(fresh(), healthy, policy=EACH))
        assert len(healthy.orders()) == (3 if fault == "disconnect" else 7)
    finally:
        guard.close()


def test_unknown_outcomes_never_halt_when_the_breaker_is_off(
    ledger_url: str, open_broker: Callable[..., PaperBroker]
) -> None:
    guard = Guard.open(ledger_url, halt_after_unknown=None, synchronous="NORMAL")
    try:
        flaky = open_broker(faults=PaperFaults(disconnect=-1))
        for _ in range(5):
            sent(guard.submit(fresh(), flaky, policy=EACH), State.UNKNOWN)
        assert guard.halts() == []
    finally:
        guard.close()


def copy_ledger(path: str, to: str) -> None:
    """A restored backup: the same ledger namespace, so the same client order ids."""
    src, dst = sqlite3.connect(path), sqlite3.connect(to)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def test_a_venue_that_already_knows_the_client_order_id_halts_the_strategy(
    tmp_path: Path, broker: PaperBroker
) -> None:
    live = Guard.open(f"sqlite:///{tmp_path / 'live.db'}", runner="live", synchronous="NORMAL")
    copy_ledger(str(tmp_path / "live.db"), str(tmp_path / "restored.db"))
    restored = Guard.open(f"sqlite:///{tmp_path / 'restored.db'}", runner="restored", synchronous="NORMAL")
    try:
        assert restored.store.namespace == live.store.namespace
        policy = OncePer(Ever(), by=("strategy", "symbol"))
        original = sent(live.submit(make_intent(), broker, policy=policy))
        # The restored ledger does not know the order; its claim yields the same client order id.
        again = restored.submit(make_intent(), broker, policy=policy)
        assert again.outcome is Outcome.SENT and again.client_order_id == original.client_order_id
        assert len(broker.orders()) == 1, "the venue refused the second order"
        (record,) = restored.halts()
        assert (record.scope, record.cause) == (f"strategy={STRATEGY}", HaltCause.DUPLICATE_CLIENT_ID)
        assert original.client_order_id is not None and original.client_order_id in record.reason
        assert "runner restored" in record.actor
        assert live.halts() == []  # a different ledger
        blocked(restored.submit(fresh(symbol="QQQ"), broker, policy=EACH), BlockReason.HALTED)
        assert len(broker.orders()) == 1
    finally:
        restored.close()
        live.close()


def test_a_duplicate_id_answer_never_books_another_senders_order_as_this_intents_fill(
    guard: Guard, broker: PaperBroker
) -> None:
    policy = OncePer(Ever(), by=("strategy", "symbol"))
    intent = make_intent(side="BUY", quantity=4)
    coid = client_order_id(guard.store.namespace, policy.rule(intent, datetime.now(UTC)).key, 1)
    # Another system (sharing the id space) placed a different order under that id first.
    broker.submit(OrderRequest(coid, "main", "SPX", "SELL", Decimal(50), "MARKET", None, None, "DAY"))
    result = guard.submit(intent, broker, policy=policy)
    assert [h.cause for h in guard.halts()] == [HaltCause.DUPLICATE_CLIENT_ID]
    assert result.intent is not None
    record = guard.intent(result.intent.id)
    assert record.filled_quantity == 0, f"booked {record.filled_quantity} filled for a {record.side} {record.quantity}"
    assert guard.store.filled_positions().get(("main", "SPX"), Decimal(0)) == 0


class LedgerGrabbingVenue:
    """The real PaperBroker; once it has accepted an order, another process grabs the ledger's
    write lock (BEGIN IMMEDIATE on its own connection) and holds it until ``release()``."""

    name = "paper"

    def __init__(self, venue: PaperBroker, ledger_path: str) -> None:
        self.venue, self.ledger_path = venue, ledger_path
        self.dedupe, self.lookup_grace = venue.dedupe, venue.lookup_grace
        self.locker: sqlite3.Connection | None = None

    def submit(self, order: OrderRequest) -> BrokerOrder:
        placed = self.venue.submit(order)
        self.locker = sqlite3.connect(self.ledger_path, isolation_level=None, timeout=5)
        self.locker.execute("BEGIN IMMEDIATE")
        return placed

    def release(self) -> None:
        assert self.locker is not None
        self.locker.execute("ROLLBACK")
        self.locker.close()
        self.locker = None

    def lookup(self, client_order_id: str, *, symbol: str | None = None) -> BrokerOrder | None:
        return self.venue.lookup(client_order_id, symbol=symbol)

    def cancel(self, client_order_id: str, *, symbol: str | None = None) -> BrokerOrder:
        return self.venue.cancel(client_order_id, symbol=symbol)

    def positions(self, account: str | None = None) -> Any:
        return self.venue.positions(account)

    def account(self, account: str) -> Any:
        return self.venue.account(account)


def test_a_ledger_write_failure_after_the_send_halts_the_strategy_once_the_ledger_is_back(
    tmp_path: Path, broker: PaperBroker
) -> None:
    path = str(tmp_path / "ledger.db")
    # register=False: no heartbeat thread, so only the next claim can record the queued halt.
    guard = Guard.open(f"sqlite:///{path}", runner="bot-9", busy_timeout=0.2, synchronous="NORMAL", register=False)
    try:
        venue = LedgerGrabbingVenue(broker, path)
        try:
            result = guard.submit(make_intent(), venue, policy=EACH)
            # The order went out; recording the fill failed, and so did the immediate halt.
            assert result.outcome is Outcome.SENT and result.state is State.SENDING
            assert guard.halts() == []  # reads still work; the halt is queued in the guard
        finally:
            venue.release()
        assert guard.halts() == [] and guard.store.halt_history() == []
        assert result.client_order_id is not None
        assert guard.intent(result.client_order_id).state is State.SENDING

        halted = blocked(guard.submit(fresh(symbol="QQQ"), broker, policy=EACH), BlockReason.HALTED)
        (record,) = guard.halts()
        assert (record.scope, record.cause) == (f"strategy={STRATEGY}", HaltCause.LEDGER_WRITE_FAILURE)
        assert result.client_order_id in record.reason and "runner bot-9" in record.actor
        assert "LEDGER_WRITE_FAILURE" in halted.message
        assert len(broker.orders()) == 1

        report = guard.reconcile(broker, stale_after=0)
        assert [(d.before, d.after) for d in report.decisions] == [(State.SENDING, State.FILLED)]
        guard.resume(f"strategy={STRATEGY}", reason="reconciled: FILLED")
        sent(guard.submit(fresh(symbol="QQQ"), broker, policy=EACH))
        assert len(guard.store.halt_history()) == 2
    finally:
        guard.close()


def test_drift_found_by_another_runner_halts_that_account_and_symbol_for_every_runner(
    sqlite_ledger: Ledger,
) -> None:
    trader = sqlite_ledger.guard(runner="trader")
    ops = sqlite_ledger.guard(runner="reconciler")
    broker = sqlite_ledger.broker()
    sent(trader.submit(fresh(symbol="SPX"), broker, policy=EACH))
    sent(trader.submit(fresh(symbol="QQQ"), broker, policy=EACH))
    broker.submit(OrderRequest("by-hand-1", "main", "SPX", "BUY", Decimal(3), "MARKET", None, None, "DAY"))

    report = ops.reconcile(broker)
    (record,) = report.halts
    assert (record.scope, record.state, record.cause) == ("account=main,symbol=SPX", TradingState.HALTED, HaltCause.DRIFT)
    assert "runner reconciler" in record.actor
    assert trader.halts() == [record]
    halted = blocked(trader.submit(fresh(symbol="SPX", side="SELL", strategy="hedger"), broker, policy=EACH),
                     BlockReason.HALTED)
    assert "DRIFT by runner reconciler" in halted.message
    sent(trader.submit(fresh(symbol="QQQ"), broker, policy=EACH))  # other symbols trade on
    sent(trader.submit(fresh(symbol="SPX", account="other"), broker, policy=EACH))  # other accounts too
    trader.resume("account=main,symbol=SPX", reason="the manual order was ours; booked")
    sent(trader.submit(fresh(symbol="SPX"), broker, policy=EACH))
    assert [(e.state, e.cause) for e in ops.store.halt_history()] == [
        (TradingState.ACTIVE, HaltCause.OPERATOR), (TradingState.HALTED, HaltCause.DRIFT),
    ]


# ------------------------------------------------------------------ PostgreSQL specifics


def wait_for_lock_wait(url: str, statement: str, timeout: float = 10.0) -> None:
    """Poll pg_stat_activity until a backend running ``statement`` waits on a lock."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as admin:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND starts_with(query, %s)",
                (statement,),
            ).fetchone()
            if row is not None:
                return
            time.sleep(0.01)
    pytest.fail(f"no backend waited on a lock running {statement!r} within {timeout}s")


def test_postgres_a_trip_racing_another_halt_keeps_the_first_cause(pg_ledger: Ledger) -> None:
    import psycopg

    from orderguard.store.base import Caller

    store = pg_ledger.store()
    caller = Caller.current("bot-3")
    policy = [RateLimit(1, 60, by=("strategy",), trip=True)]
    assert store.claim(fresh(), policy, caller).claimed
    decisions: list[Any] = []
    claimer = threading.Thread(target=lambda: decisions.append(store.claim(fresh(), policy, caller)))
    # An operator's halt of the same scope, in flight (what Store.set_trading_state writes).
    operator = psycopg.connect(pg_ledger.location, autocommit=False)
    try:
        for sql in (
            "INSERT INTO {s}.halts(scope, state, cause, reason, actor, at) VALUES (%s, 'HALTED', 'OPERATOR', "
            "'desk stop', 'operator alice', extract(epoch FROM now()))",
            "INSERT INTO {s}.halt_events(at, scope, state, cause, reason, actor) VALUES (extract(epoch FROM now()), "
            "%s, 'HALTED', 'OPERATOR', 'desk stop', 'operator alice')",
        ):
            operator.execute(sql.format(s=pg_ledger.schema), (f"strategy={STRATEGY}",))
        claimer.start()  # the gate sees no halt yet; the limit refuses and trips
        wait_for_lock_wait(pg_ledger.location, "INSERT INTO halts(")
        operator.commit()  # the operator's halt lands first
    finally:
        operator.close()
        claimer.join(timeout=30)
    (decision,) = decisions
    # Refused by the limit, but the operator's halt came first: this refusal did not trip it.
    assert decision.reason is BlockReason.RATE_LIMIT and not decision.tripped
    assert decision.halt is not None and decision.halt.cause is HaltCause.OPERATOR
    (record,) = store.halts()
    assert (record.cause, record.actor, record.reason) == (HaltCause.OPERATOR, "operator alice", "desk stop")
    assert [e.cause for e in store.halt_history()] == [HaltCause.OPERATOR]


# ------------------------------------------------------ review fixes: trips, leases, races


def test_a_tripping_limit_refuses_an_intent_without_its_scope_field_and_writes_nothing(guard: Guard) -> None:
    policy = [OncePer(Ever(), by=("strategy", "symbol")), RateLimit(1, 60, by=("strategy", "tags.signal"), trip=True)]
    before = guard.attempts()
    with pytest.raises(InvalidIntent) as caught:
        guard._claim(fresh(), policy, State.SENDING, None)
    assert caught.value.field == "tags.signal" and "nothing was sent" in str(caught.value)
    assert guard.attempts() == before and guard.intents() == [] and guard.halts() == []


def test_a_decorated_function_does_not_start_after_its_leader_lease_lapsed(ledger_url: str) -> None:
    calls: list[str] = []
    with Guard.open(ledger_url, exclusive="deco", lease_seconds=0.3, heartbeat_every=60) as leader:

        @leader.once(intent=fresh(symbol="DECO"), policy=OncePer(Ever()))
        def entry() -> str:
            calls.append("ran")
            return "sent"

        # Claimed under the lease; then the process is "frozen" past the lease before the body runs.
        with leader._held_claim(fresh(symbol="LATE"), OncePer(Ever()), None, opaque=True) as claim:
            assert claim.intent.send_by_at is not None  # the opaque claim carries the lease expiry
            time.sleep(0.4)
            with pytest.raises(SendDeadlineExceeded, match="leader lease lapsed"):
                claim.start_opaque()
            claim.not_sent("lease lapsed")
        assert leader.intent(claim.intent.id).state is State.ABANDONED
        assert entry() == "sent" and calls == ["ran"]  # a fresh call takes the lease again and runs


def test_postgres_claim_queued_behind_a_trip_sees_the_halt(tmp_path: Any) -> None:
    """A claim that waits on a limit's row while another transaction trips that limit must see the
    halt once it gets the row (the trip committed first), not claim past it."""
    import psycopg

    from orderguard.store.postgres import PostgresStore

    url = postgres_or_skip()
    schema = f"og_race_{uuid.uuid4().hex[:10]}"
    store = PostgresStore(url, schema=schema)
    try:
        limit = RateLimit(5, 60, by=("strategy",), trip=True)
        key = limit.rule(fresh(), datetime.now(tz=UTC)).key
        assert store.claim(fresh(symbol="FIRST"), [limit], race_caller()).claimed  # creates the scope row
        tripper = psycopg.connect(url, autocommit=False, options=f"-c search_path={schema}")
        tripper.execute("SELECT fence FROM scopes WHERE key = %s FOR UPDATE", (key,))
        tripper.execute(
            "INSERT INTO halts(scope, state, cause, reason, actor, at) VALUES ('strategy=spx-calendar', 'HALTED', "
            "'RATE_LIMIT', 'tripped by another claim', 'runner other', extract(epoch FROM now()))"
        )
        result: dict[str, Any] = {}
        waiter = threading.Thread(target=lambda: result.update(d=store.claim(fresh(symbol="QUEUED"), [limit], race_caller())))
        waiter.start()
        admin = psycopg.connect(url, autocommit=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the claim waits on the tripper's row lock
            waiting = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'orderguard' AND wait_event_type = 'Lock'"
            ).fetchone()
            if waiting and waiting[0]:
                break
            time.sleep(0.02)
        tripper.commit()
        waiter.join(timeout=20)
        decision = result["d"]
        assert not decision.claimed and decision.reason is BlockReason.HALTED, decision.message
        assert [i.symbol for i in store.intents()] == ["FIRST"]
        tripper.close()
        admin.close()
    finally:
        store.close()
        drop_schema(url, schema)


def race_caller() -> Any:
    from orderguard.store.base import Caller

    return Caller.current("race")
