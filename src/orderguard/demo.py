"""``orderguard demo``: the field's duplicate-order scenarios, each run twice.

Once with the naive guard trading bots typically use (check the trades table, send, record the
trade after the fill; for scenario 6 a lock with a TTL on top), once through orderguard. Both
runs trade on the embedded paper venue in a temporary folder, so the venue's own order log and
cash say how many orders went out and what they cost. Real threads, asyncio tasks and OS
processes race; scenario 8 really kills a process with SIGKILL after its send. Scenario 9 is a
buggy strategy whose orders are all distinct: orderguard with dedupe only, then with its
circuit breakers (a rate and a notional limit that trip a halt).
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import signal
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .alerts import Alert, Notifier
from .brokers.base import BrokerOrder, OrderRequest
from .brokers.paper import PaperBroker, PaperFaults
from .errors import AmbiguousOutcome
from .guard import Guard
from .intent import OrderIntent, Side
from .policies import Cooldown, Ever, NotionalLimit, OncePer, OneOpen, Policy, RateLimit, TradingDay

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

STARTING_CASH = Decimal(10_000_000)


@dataclass
class RunResult:
    """One run of one scenario, counted at the venue."""

    attempts: int
    intended: int  # orders the strategy meant to place
    broker_orders: int
    cash_spent: Decimal
    intended_notional: Decimal
    blocked: Counter[str] = field(default_factory=Counter)
    halts: list[str] = field(default_factory=list)  # "scope (CAUSE)" of halts the run tripped
    alerts: int = 0  # alert messages a notifier delivered (storms aggregated)

    @property
    def duplicates(self) -> int:
        return max(0, self.broker_orders - self.intended)

    @property
    def phantom_notional(self) -> Decimal:
        """Notional of the orders nobody intended (at their order price)."""
        per_order = self.intended_notional / self.intended if self.intended else Decimal(0)
        return self.duplicates * per_order

    @property
    def cash_drained(self) -> Decimal:
        """Cash the venue took beyond what the intended orders cost."""
        return max(Decimal(0), self.cash_spent - self.intended_notional)


@dataclass
class ScenarioResult:
    number: int
    title: str
    unguarded: RunResult
    guarded: RunResult


@dataclass
class World:
    """The files of one run: ledger, naive trades table, paper venue."""

    folder: Path
    guarded: bool
    price: Decimal
    quantity: Decimal
    venue: dict[str, Any] = field(default_factory=dict)

    @property
    def ledger_url(self) -> str:
        return f"sqlite:///{self.folder / 'ledger.db'}"

    @property
    def trades_path(self) -> str:
        return str(self.folder / "trades.db")

    @property
    def venue_path(self) -> str:
        return str(self.folder / "venue.db")

    def broker(self, **overrides: Any) -> PaperBroker:
        options = {"default_price": self.price, "starting_cash": STARTING_CASH, **self.venue, **overrides}
        return PaperBroker(self.venue_path, **options)

    def guard(self) -> Guard:
        # NORMAL: the demo shows arbitration, not power-loss durability, and must stay fast.
        return Guard.open(self.ledger_url, synchronous="NORMAL", runner="demo")

    def intent(self, source: str, symbol: str = "SPX", strategy: str = "spx-calendar") -> OrderIntent:
        return OrderIntent(
            account="main", strategy=strategy, symbol=symbol, side=Side.BUY, quantity=self.quantity, source=source
        )


# --------------------------------------------------------------------- the naive guard


class NaiveBot:
    """What the post-mortems describe: check the trades table, send, record after the fill."""

    def __init__(self, world: World) -> None:
        self.world = world
        with sqlite3.connect(world.trades_path) as db:
            db.execute("CREATE TABLE IF NOT EXISTS trades (strategy TEXT, symbol TEXT, at REAL)")
            db.execute("CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, expires REAL)")

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.world.trades_path, timeout=30)

    def traded(self, strategy: str, symbol: str | None = None, within: float | None = None) -> bool:
        sql, args = "SELECT count(*) FROM trades WHERE strategy = ?", [strategy]
        if symbol is not None:
            sql, args = sql + " AND symbol = ?", [*args, symbol]
        if within is not None:
            sql, args = sql + " AND at > ?", [*args, str(time.time() - within)]
        with self._db() as db:
            return bool(db.execute(sql, args).fetchone()[0])

    def lock(self, name: str, ttl: float) -> bool:
        """``SET name NX EX ttl``: the lock a Redis-minded bot takes."""
        now = time.time()
        with self._db() as db:
            db.execute("DELETE FROM locks WHERE name = ? AND expires < ?", (name, now))
            return db.execute("INSERT OR IGNORE INTO locks VALUES (?, ?)", (name, now + ttl)).rowcount == 1

    def unlock(self, name: str) -> None:
        with self._db() as db:
            db.execute("DELETE FROM locks WHERE name = ?", (name,))

    def send(self, broker: PaperBroker, intent: OrderIntent, *, fill_wait: float = 0.0, kill_after_send: bool = False) -> None:
        """Send, retry once on a lost answer (with a new id: the SDK default), wait, record."""
        request = OrderRequest(
            f"naive-{os.getpid()}-{threading.get_ident() % 100000}-{time.monotonic_ns() % 10**9}"[:32],
            intent.account, intent.symbol, intent.side.value, intent.quantity, "MARKET", None, None, "DAY",
        )
        try:
            broker.submit(request)
        except AmbiguousOutcome:
            broker.submit(replace(request, client_order_id=request.client_order_id[:30] + "-r"))
        if kill_after_send:
            os.kill(os.getpid(), signal.SIGKILL)
        _wait_filled(broker, request.client_order_id, fill_wait)
        with self._db() as db:
            db.execute("INSERT INTO trades VALUES (?, ?, ?)", (intent.strategy, intent.symbol, time.time()))


def _wait_filled(broker: PaperBroker, coid: str, seconds: float) -> BrokerOrder | None:
    deadline = time.monotonic() + seconds
    order = broker.lookup(coid)
    while seconds and (order is None or order.status.is_open) and time.monotonic() < deadline:
        time.sleep(0.05)
        order = broker.lookup(coid)
    return order


# --------------------------------------------------------------------------- plumbing

_COUNT_LOCK = threading.Lock()


class Tally:
    """Attempts and blocked reasons, safe to share between threads."""

    def __init__(self) -> None:
        self.attempts = 0
        self.blocked: Counter[str] = Counter()

    def add(self, reason: str | None = None) -> None:
        with _COUNT_LOCK:
            self.attempts += 1
            if reason:
                self.blocked[reason] += 1


def _race(callers: Sequence[Callable[[], object]], stagger: float = 0.0) -> None:
    """Start the callers together (behind a barrier), ``stagger`` seconds apart."""
    barrier = threading.Barrier(len(callers))

    def go(index: int, fn: Callable[[], object]) -> None:
        barrier.wait()
        time.sleep(index * stagger)
        fn()

    threads = [threading.Thread(target=go, args=(i, fn)) for i, fn in enumerate(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _mp() -> Any:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _guarded_call(world: World, policy: Policy | list[Policy], source: str, tally: Tally | None, **kw: Any) -> None:
    guard, broker = world.guard(), world.broker()
    try:
        result = guard.submit(world.intent(source, **kw), broker, policy=policy)
        if tally is not None:
            tally.add(result.reason.value if result.reason else None)
    finally:
        guard.close()
        broker.close()


def _naive_call(world: World, source: str, tally: Tally | None, within: float | None = None) -> None:
    bot, broker = NaiveBot(world), world.broker()
    intent = world.intent(source)
    if tally is not None:
        tally.add()
    if not bot.traded(intent.strategy, within=within):
        bot.send(broker, intent)
    broker.close()


def _child(world: World, policy: Policy | None, source: str, start: float, within: float | None,
           repeats: int = 1, pause: float = 0.0) -> None:
    """A second OS process: sleeps until ``start`` (wall clock), then attempts ``repeats`` times."""
    time.sleep(max(0.0, start - time.time()))
    for _ in range(repeats):
        if world.guarded:
            assert policy is not None
            _guarded_call(world, policy, source, None)
        else:
            _naive_call(world, source, None, within)
        time.sleep(pause)


ChildSpec = tuple[Policy | None, str, float | None, int, float]  # policy, source, cooldown, repeats, pause


def _run_children(world: World, specs: Sequence[ChildSpec]) -> None:
    ctx = _mp()
    start = time.time() + 0.3  # let every child get ready, then go together
    procs = [ctx.Process(target=_child, args=(world, pol, src, start, within, reps, pause)) for pol, src, within, reps, pause in specs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)


def _blocked_since(world: World, since: float) -> Counter[str]:
    guard = world.guard()
    try:
        return Counter(a.reason.value for a in guard.attempts(blocked=True, since=since, limit=100_000) if a.reason)
    finally:
        guard.close()


# -------------------------------------------------------------------------- scenarios

def _daily() -> Policy:
    return OncePer(TradingDay("XNYS"), by=("strategy",))


def s1_scheduler_twice(world: World) -> tuple[int, Counter[str]]:
    """A scheduler fires the daily entry twice in one process, 2 ms apart."""
    world.venue.update(ack_latency=0.05)
    tally = Tally()
    if world.guarded:
        policy = _daily()
        _race([lambda: _guarded_call(world, policy, "scheduler", tally)] * 2, stagger=0.002)
    else:
        _race([lambda: _naive_call(world, "scheduler", tally)] * 2, stagger=0.002)
    return tally.attempts, tally.blocked


def s2_manual_tabs(world: World) -> tuple[int, Counter[str]]:
    """'Manual trade' in two browser tabs while the scheduled entry runs; one tab is another process."""
    world.venue.update(ack_latency=0.3)
    tally = Tally()
    since = time.time()
    policy = _daily()
    if world.guarded:
        tabs = [lambda: _guarded_call(world, policy, "scheduler", tally),
                               lambda: _guarded_call(world, policy, "manual", tally)]
        child = threading.Thread(target=_run_children, args=(world, [(policy, "manual", None, 1, 0.0)]))
    else:
        tabs = [lambda: _naive_call(world, "scheduler", tally), lambda: _naive_call(world, "manual", tally)]
        child = threading.Thread(target=_run_children, args=(world, [(None, "manual", None, 1, 0.0)]))
    child.start()
    time.sleep(0.25)  # the other process's tab clicks ~0.05 s after these two
    _race(tabs, stagger=0.02)
    child.join()
    blocked = _blocked_since(world, since) if world.guarded else Counter()
    return tally.attempts + 1, blocked


def s3_cooldown_workers(world: World) -> tuple[int, Counter[str]]:
    """Two worker processes evaluate the same bot (15-minute cooldown), three times each."""
    world.venue.update(ack_latency=0.1)
    since = time.time()
    policy = Cooldown(900, by=("strategy",))
    specs = [(policy if world.guarded else None, "worker", 900.0, 3, 0.05)] * 2
    _run_children(world, specs)
    blocked = _blocked_since(world, since) if world.guarded else Counter()
    return 6, blocked


SYMBOLS = [f"S{i:02d}" for i in range(40)]


def s4_tasks_per_symbol(world: World) -> tuple[int, Counter[str]]:
    """One runner, 8 parallel tasks per symbol across 40 symbols, each seeing 'no position yet'."""
    world.venue.update(ack_latency=0.02)
    tally = Tally()

    async def main() -> None:
        broker = world.broker()
        if world.guarded:
            guard = world.guard()
            policy = OneOpen(by=("account", "symbol"))

            async def task(symbol: str) -> None:
                result = await guard.asubmit(world.intent("task", symbol=symbol), broker, policy=policy)
                tally.add(result.reason.value if result.reason else None)
        else:
            bot = NaiveBot(world)

            async def task(symbol: str) -> None:
                tally.add()
                if not await asyncio.to_thread(bot.traded, "spx-calendar", symbol):  # "no position yet"
                    await asyncio.to_thread(bot.send, broker, world.intent("task", symbol=symbol))

        await asyncio.gather(*(task(s) for s in SYMBOLS for _ in range(8)))
        if world.guarded:
            guard.close()
        broker.close()

    asyncio.run(main())
    return tally.attempts, tally.blocked


def s5_stale_runner(world: World) -> tuple[int, Counter[str]]:
    """A stale runner from the previous deploy is still alive beside the new one."""
    world.venue.update(ack_latency=0.1)
    since = time.time()
    policy = _daily()
    _run_children(world, [(policy if world.guarded else None, "runner-old", None, 2, 0.05),
                          (policy if world.guarded else None, "runner-new", None, 2, 0.05)])
    return 4, _blocked_since(world, since) if world.guarded else Counter()


def s6_slow_fill(world: World) -> tuple[int, Counter[str]]:
    """The fill takes longer than the lock's TTL (1 s); retries arrive at 0.5 s and 1.2 s."""
    world.venue.update(fill_delay=1.5)
    tally = Tally()
    if world.guarded:
        policy = _daily()

        def attempt(source: str) -> None:
            guard, broker = world.guard(), world.broker()
            result = guard.submit(world.intent(source), broker, policy=policy, wait_for_fill=2.0)
            tally.add(result.reason.value if result.reason else None)
            guard.close()

        callers = [lambda: attempt("scheduler"), lambda: attempt("retry"), lambda: attempt("retry")]
    else:

        def attempt(source: str) -> None:
            bot, broker = NaiveBot(world), world.broker()
            tally.add()
            if bot.lock("entry", ttl=1.0):
                try:
                    if not bot.traded("spx-calendar"):
                        bot.send(broker, world.intent(source), fill_wait=2.0)
                finally:
                    bot.unlock("entry")

        callers = [lambda: attempt("scheduler"), lambda: attempt("retry"), lambda: attempt("retry")]
    threads = [threading.Thread(target=fn) for fn in callers]
    for t, delay in zip(threads, (0.0, 0.5, 0.7), strict=True):
        time.sleep(delay)
        t.start()
    for t in threads:
        t.join()
    return tally.attempts, tally.blocked


def s7_ack_lost(world: World) -> tuple[int, Counter[str]]:
    """The broker accepts but the ack is lost, and the caller retries; then reconcile."""
    tally = Tally()
    faults = PaperFaults(lose_ack=1)
    if world.guarded:
        guard, broker = world.guard(), world.broker(faults=faults)
        policy = _daily()
        for source in ("scheduler", "retry"):
            result = guard.submit(world.intent(source), broker, policy=policy)
            tally.add(result.reason.value if result.reason else None)
        guard.reconcile(broker)  # UNKNOWN -> FILLED: the venue had it all along
        guard.close()
    else:
        bot, broker = NaiveBot(world), world.broker(faults=faults)
        tally.add()
        if not bot.traded("spx-calendar"):
            bot.send(broker, world.intent("scheduler"))  # the lost ack is retried with a new id
    broker.close()
    return tally.attempts, tally.blocked


class _KilledAfterSend(PaperBroker):
    def submit(self, order: OrderRequest) -> BrokerOrder:
        placed = super().submit(order)
        os.kill(os.getpid(), signal.SIGKILL)  # the venue has it; the process dies before recording
        return placed


def _killed_child(world: World) -> None:
    if world.guarded:
        guard = world.guard()
        guard.submit(world.intent("scheduler"), _KilledAfterSend(world.venue_path, default_price=world.price,
                                                                 starting_cash=STARTING_CASH), policy=_daily())
    else:
        NaiveBot(world).send(world.broker(), world.intent("scheduler"), kill_after_send=True)


def s8_killed_after_send(world: World) -> tuple[int, Counter[str]]:
    """The process is killed (SIGKILL) after the send and restarted; the restart runs the entry again."""
    since = time.time()
    proc = _mp().Process(target=_killed_child, args=(world,))
    proc.start()
    proc.join(30)
    tally = Tally()
    tally.add()  # the killed attempt
    if world.guarded:
        guard, broker = world.guard(), world.broker()
        result = guard.submit(world.intent("restart"), broker, policy=_daily())  # blocked: held by the dead claim
        tally.add(result.reason.value if result.reason else None)
        guard.reconcile(broker)  # the dead owner's intent: the venue shows it FILLED
        guard.close()
        broker.close()
        return tally.attempts, _blocked_since(world, since)
    _naive_call(world, "restart", tally)
    return tally.attempts, Counter()


BREAKER_RATE = RateLimit(20, per_seconds=60, by=("strategy",), trip=True)
BREAKER_NOTIONAL = NotionalLimit(50_000, per_seconds=3600, by=("strategy",), trip=True)


class _Collect:
    """An alert sink that counts (the demo shows how many messages an operator would get)."""

    name = "demo"

    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    def send(self, alert: Alert) -> None:
        self.alerts.append(alert)


def s9_buggy_strategy(world: World) -> tuple[int, Counter[str]]:
    """A bug fires 8 tasks per symbol across 40 symbols, every order distinct (its own signal id),
    so dedupe cannot stop it. Dedupe only (world.guarded False) vs. with circuit breakers."""
    world.venue.update(ack_latency=0.01)
    tally = Tally()
    sink = _Collect()
    notifier = Notifier([sink], interval=60)

    async def main() -> None:
        broker = world.broker()
        guard = Guard.open(world.ledger_url, synchronous="NORMAL", runner="buggy", alerts=notifier)
        dedupe: Policy = OncePer(Ever(), by=("strategy", "symbol", "tags.signal"))
        policy = [dedupe, BREAKER_RATE, BREAKER_NOTIONAL] if world.guarded else [dedupe]

        async def task(symbol: str, n: int) -> None:
            intent = OrderIntent(
                account="main", strategy="buggy-momentum", symbol=symbol, side=Side.BUY, quantity=world.quantity,
                reference_price=world.price, source="task", tags={"signal": f"{symbol}-{n}"},
            )
            result = await guard.asubmit(intent, broker, policy=policy)
            tally.add(result.reason.value if result.reason else None)

        await asyncio.gather(*(task(s, n) for s in SYMBOLS for n in range(8)))
        world.venue["halts"] = [f"{h.scope} ({h.cause.value})" for h in guard.halts()]
        guard.close()
        notifier.close()
        world.venue["alerts"] = sum(a.count for a in sink.alerts), len(sink.alerts)
        broker.close()

    asyncio.run(main())
    return tally.attempts, tally.blocked


@dataclass(frozen=True)
class Scenario:
    title: str
    run: Callable[[World], tuple[int, Counter[str]]]
    quantity: Decimal = Decimal(4)
    price: Decimal = Decimal("5890")  # an SPX-sized notional per contract
    intended: int = 1
    breaker: bool = False  # compares dedupe only with dedupe + circuit breakers


SCENARIOS: list[Scenario] = [
    Scenario("scheduler fires the daily entry twice, 2 ms apart", s1_scheduler_twice),
    Scenario("'Manual trade' in two tabs (one another process) during the scheduled entry", s2_manual_tabs),
    Scenario("two worker processes, 15-minute cooldown", s3_cooldown_workers),
    Scenario("8 tasks per symbol x 40 symbols, each sees 'no position yet'", s4_tasks_per_symbol,
             quantity=Decimal(2000), price=Decimal("31.20"), intended=len(SYMBOLS)),
    Scenario("stale runner from the previous deploy beside the new one", s5_stale_runner),
    Scenario("fill slower than the lock TTL (1 s), retries during it", s6_slow_fill),
    Scenario("ack lost after accept; the caller retries", s7_ack_lost),
    Scenario("killed (SIGKILL) after the send, restarted", s8_killed_after_send),
    Scenario("buggy strategy: 8 tasks x 40 symbols, every order distinct (circuit breakers)", s9_buggy_strategy,
             quantity=Decimal(100), price=Decimal("31.20"), intended=0, breaker=True),
]


def _run_once(folder: Path, scenario: Scenario, guarded: bool) -> RunResult:
    folder.mkdir(parents=True)
    world = World(folder, guarded, scenario.price, scenario.quantity)
    if not guarded:
        NaiveBot(world)  # the naive tables exist before any process races
    attempts, blocked = scenario.run(world)
    halts: list[str] = world.venue.pop("halts", [])
    alerts = world.venue.pop("alerts", (0, 0))[1]
    broker = world.broker()
    try:
        orders = broker.orders()
        spent = STARTING_CASH - broker.account("main").cash
    finally:
        broker.close()
    return RunResult(
        attempts=attempts, intended=scenario.intended, broker_orders=len(orders), cash_spent=spent,
        intended_notional=scenario.intended * scenario.quantity * scenario.price, blocked=blocked,
        halts=halts, alerts=alerts,
    )


def run_demo(only: int | None = None, progress: Callable[[str], None] | None = None) -> list[ScenarioResult]:
    """Run the scenarios (or one) in a temporary folder; returns the counts."""
    results = []
    with tempfile.TemporaryDirectory(prefix="orderguard-demo-") as tmp:
        for number, scenario in enumerate(SCENARIOS, start=1):
            if only is not None and number != only:
                continue
            runs = {}
            for guarded in (False, True):
                if progress:
                    labels = ("dedupe only", "with breakers") if scenario.breaker else ("naive guard", "orderguard")
                    progress(f"{number}. {scenario.title} ({labels[guarded]})")
                runs[guarded] = _run_once(Path(tmp) / f"{number}-{'guarded' if guarded else 'naive'}", scenario, guarded)
            results.append(ScenarioResult(number, scenario.title, runs[False], runs[True]))
    return results


# ----------------------------------------------------------------------------- output


def _as_dict(run: RunResult) -> dict[str, Any]:
    return {
        "attempts": run.attempts, "intended_orders": run.intended, "broker_orders": run.broker_orders,
        "duplicates": run.duplicates, "phantom_notional": str(run.phantom_notional),
        "cash_drained": str(run.cash_drained), "blocked": dict(sorted(run.blocked.items())),
        "notional_placed": str(run.cash_spent), "halts": run.halts, "alerts": run.alerts,
    }


def _breaker_ok(run: RunResult) -> bool:
    """The breaker stopped the buggy strategy within its limits and halted it."""
    assert BREAKER_NOTIONAL.amount is not None
    return run.broker_orders <= BREAKER_RATE.n and run.cash_spent <= BREAKER_NOTIONAL.amount and bool(run.halts)


def _ok(result: ScenarioResult) -> bool:
    if any(s.breaker for i, s in enumerate(SCENARIOS, start=1) if i == result.number):
        return _breaker_ok(result.guarded)
    return result.guarded.duplicates == 0


def _breaker_table(result: ScenarioResult) -> Table:
    table = Table(title=f"{result.number}. {result.title}", title_justify="left", min_width=78)
    table.add_column("")
    for column in ("attempts", "broker orders", "notional placed", "alerts"):
        table.add_column(column, justify="right")
    table.add_column("halted / blocked by reason")
    for label, run, style in (("dedupe only", result.unguarded, "red"), ("with breakers", result.guarded, "green")):
        why = ", ".join([*run.halts, *(f"{k} {v}" for k, v in sorted(run.blocked.items()))]) or "-"
        table.add_row(
            label, str(run.attempts), f"[{style}]{run.broker_orders}[/{style}]",
            f"[{style}]${run.cash_spent:,.2f}[/{style}]", str(run.alerts), why,
        )
    table.caption = f"limits: {BREAKER_RATE!r}, {BREAKER_NOTIONAL!r}"
    table.caption_justify = "left"
    return table


def _table(result: ScenarioResult) -> Table:
    if result.number <= len(SCENARIOS) and SCENARIOS[result.number - 1].breaker:
        return _breaker_table(result)
    table = Table(title=f"{result.number}. {result.title}", title_justify="left", min_width=78)
    table.add_column("")
    for column in ("attempts", "broker orders", "duplicates", "phantom notional", "cash drained"):
        table.add_column(column, justify="right")
    table.add_column("blocked by reason")
    for label, run, style in (("naive guard", result.unguarded, "red"), ("orderguard", result.guarded, "green")):
        dup = f"[{style}]{run.duplicates}[/{style}]" if run.duplicates or style == "green" else "0"
        table.add_row(
            label, str(run.attempts), str(run.broker_orders), dup, f"${run.phantom_notional:,.2f}",
            f"${run.cash_drained:,.2f}", ", ".join(f"{k} {v}" for k, v in sorted(run.blocked.items())) or "-",
        )
    return table


def main(*, scenario: int | None, as_json: bool, verbose: bool, console: Console) -> int:
    """The ``orderguard demo`` command: run, print, and return the exit status."""
    if scenario is not None and not 1 <= scenario <= len(SCENARIOS):
        console.print(f"[red]no scenario {scenario}: choose 1..{len(SCENARIOS)}[/red]")
        return 2
    if verbose:
        logging.getLogger("orderguard").addHandler(RichHandler(console=Console(stderr=True), show_path=False))
        logging.getLogger("orderguard").setLevel(logging.WARNING)
    started = time.monotonic()
    if as_json:
        results = run_demo(scenario)
    else:
        total = 2 * (1 if scenario else len(SCENARIOS))
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("starting", total=total)

            def step(title: str) -> None:
                bar.update(task, description=title, advance=0 if bar.tasks[0].description == "starting" else 1)

            results = run_demo(scenario, progress=step)
    ok = all(_ok(r) for r in results)
    if as_json:
        payload = [{"scenario": r.number, "title": r.title, "unguarded": _as_dict(r.unguarded),
                    "guarded": _as_dict(r.guarded)} for r in results]
        print(json.dumps({"ok": ok, "seconds": round(time.monotonic() - started, 1), "scenarios": payload}, indent=2))
        return 0 if ok else 1
    for r in results:
        console.print(_table(r))
    naive_dups = sum(r.unguarded.duplicates for r in results if not SCENARIOS[r.number - 1].breaker)
    phantom = sum((r.unguarded.phantom_notional for r in results if not SCENARIOS[r.number - 1].breaker), Decimal(0))
    breaker = [r for r in results if SCENARIOS[r.number - 1].breaker]
    if ok:
        line = "[green]orderguard: 0 duplicate orders.[/green]"
        if naive_dups:
            line += f" The naive guard sent {naive_dups} duplicates (${phantom:,.2f} of phantom notional)."
        for r in breaker:
            line += (
                f" The buggy strategy placed ${r.unguarded.cash_spent:,.2f} with dedupe only, "
                f"${r.guarded.cash_spent:,.2f} before its breaker halted it."
            )
        console.print(f"{line} {time.monotonic() - started:.1f}s")
    else:
        console.print("[red]a guarded run produced a duplicate order, or a breaker did not hold[/red]")
    return 0 if ok else 1


__all__ = ["SCENARIOS", "RunResult", "ScenarioResult", "main", "run_demo"]
