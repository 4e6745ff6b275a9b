"""Benchmark: the cost of an orderguard claim on SQLite against a raw SQLite baseline.

Run from the repository root::

    python bench/bench_claim_sqlite.py                 # defaults finish in about a minute
    python bench/bench_claim_sqlite.py --help

Everything is measured in one run and reported as ratios against a raw baseline measured in
the same run, on the same disk, with the same pragmas: on a shared, noisy machine only such
ratios mean anything.

1. Latency (single process, no contention). Per ``synchronous`` mode (FULL, NORMAL):

   * ``raw``: a separate SQLite file in the same directory (WAL, same ``synchronous``, same
     ``busy_timeout``) with a table keyed by a unique text key; per iteration
     ``BEGIN IMMEDIATE; INSERT ... ON CONFLICT DO NOTHING; COMMIT`` with a distinct key.
   * ``store.claim``: ``guard.store.claim(intent, policies, caller)`` on a ledger opened with
     ``Guard.open(url, synchronous=...)``: the one BEGIN IMMEDIATE transaction (scope upsert,
     intent insert, attempt insert, COMMIT) plus the Python around it.
   * ``guard._claim``: the guard-level path from an ``OrderIntent`` to a committed claim
     (``guard._claim(intent, policy, State.SENDING, None)``: policy normalisation, caller
     identity, the store claim, logging, the ``Claim`` handle).

   Each guarded path runs with ``OncePer(Ever())`` and with ``OncePer(TradingDay("XNYS"))``
   (which computes an exchange session per claim, cached per minute). Intents (distinct
   symbols) and raw keys are built before timing; only the claim is timed, one
   ``perf_counter_ns`` pair per claim. All (mode, path) combinations run in batches whose order
   is shuffled every round, so drift of the machine hits every combination alike.

2. Throughput (contention). ``--procs`` processes x ``--per-proc`` distinct intents each claim
   on one ledger file at once (released together by a barrier), against the same number of
   raw inserts by the same number of processes on one raw file. Rounds alternate the order
   (raw, guarded, guarded, raw, ...); each run gets fresh files.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import platform
import random
import shlex
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from _common import git_revision, percentile

from orderguard import Ever, Guard, OncePer, OrderIntent, State, TradingDay
from orderguard import __version__ as orderguard_version
from orderguard.store.base import Caller
from orderguard.store.rows import ATTEMPT_SLOT
from orderguard.store.sqlite import filesystem_type

RAW_SCHEMA = "CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, holder TEXT NOT NULL, at REAL NOT NULL)"
RAW_INSERT = "INSERT INTO claims(key, holder, at) VALUES (?, ?, ?) ON CONFLICT(key) DO NOTHING"
TARGETS = {"FULL": 1.5, "NORMAL": 3.0}  # guarded/raw, from the issue (FULL long-term: 1.2)
LONG_TERM = {"FULL": 1.2}
POLICIES = {"ever": 'OncePer(Ever())', "xnys": 'OncePer(TradingDay("XNYS"))'}
PATHS = ("raw", "sql-replay", "store.claim/ever", "store.claim/xnys", "guard._claim/ever", "guard._claim/xnys")


# ------------------------------------------------------------------------------ helpers


def raw_connect(path: str, synchronous: str, busy_timeout: float) -> sqlite3.Connection:
    """The baseline's connection: the same pragmas orderguard's ledger uses."""
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise SystemExit(f"{path}: cannot use WAL (got {mode})")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute(RAW_SCHEMA)
    return conn


def make_policy(name: str) -> OncePer:
    return OncePer(Ever()) if name == "ever" else OncePer(TradingDay("XNYS"))


def make_intents(prefix: str, count: int) -> list[OrderIntent]:
    """Distinct intents: one symbol each (the scope key is account/strategy/symbol/side)."""
    return [
        OrderIntent(account="bench", strategy="bench", symbol=f"{prefix}{i:07d}", side="BUY", quantity=1)
        for i in range(count)
    ]


def raw_params(prefix: str, count: int) -> list[tuple[str, str, float]]:
    now = time.time()
    return [(f"{prefix}{i:07d}", "bench", now) for i in range(count)]



def pragma(conn: sqlite3.Connection, name: str) -> Any:
    return conn.execute(f"PRAGMA {name}").fetchone()[0]



# ------------------------------------------------------------------------------ latency


@dataclass
class Combo:
    """One (mode, path) combination of the latency benchmark."""

    mode: str
    path: str
    run: Any  # callable(start, stop, out) timing items[start:stop] into out
    samples: list[int] = field(default_factory=list)


def raw_runner(conn: sqlite3.Connection, params: list[tuple[str, str, float]]) -> Any:
    def run(start: int, stop: int, out: list[int]) -> None:
        ex = conn.execute
        clock = time.perf_counter_ns
        for p in params[start:stop]:
            t0 = clock()
            ex("BEGIN IMMEDIATE")
            ex(RAW_INSERT, p)
            ex("COMMIT")
            out.append(clock() - t0)

    return run


def replay_items(guard: Guard, prefix: str, count: int) -> list[tuple[Any, Any, Any]] | None:
    """Parameters of exactly the statements store.claim runs (OncePer(Ever())), built in advance.

    Diagnostic: replaying them on a ledger-schema file splits the claim's cost into SQL (schema,
    statements, commit) and Python. Needs the store's private SQL; None when it moved.
    """
    try:
        from orderguard.store import sqlite as ledger_sql
        from orderguard.store.base import client_order_id, new_intent_id
        from orderguard.store.rows import attempt_row, intent_row

        statements = (ledger_sql._CLAIM_ONCE, ledger_sql._INSERT_ATTEMPT, ledger_sql._INSERT_INTENT)
    except (ImportError, AttributeError):
        return None
    policy, caller, now = OncePer(Ever()), Caller.current("bench"), time.time()
    items = []
    for intent in make_intents(prefix, count):
        intent_id = new_intent_id()
        rule = policy.rule(intent, datetime.fromtimestamp(now, tz=UTC))
        coid = client_order_id(guard.store.namespace, rule.key, 1)
        row = intent_row(intent, intent_id, (rule.key,), State.SENDING, caller, now)
        row[1], row[2] = coid, 1
        message = f"CLAIMED {intent.describe()} from {intent.source} as {coid} (fence 1)"
        items.append((
            (rule.key, intent_id, now),
            attempt_row(now, "CLAIMED", None, intent_id, None, rule.key, caller, intent, message),
            row,
        ))
    return [statements, *items]


def replay_runner(conn: sqlite3.Connection, items: list[Any]) -> Any:
    (upsert, insert_attempt, insert_intent), params = items[0], items[1:]

    def run(start: int, stop: int, out: list[int]) -> None:
        ex = conn.execute
        clock = time.perf_counter_ns
        for scope, attempt, intent in params[start:stop]:
            t0 = clock()
            ex("BEGIN IMMEDIATE")
            ex(upsert, scope).fetchone()
            intent[ATTEMPT_SLOT] = ex(insert_attempt, attempt).fetchone()[0]
            ex(insert_intent, intent)
            ex("COMMIT")
            out.append(clock() - t0)

    return run


def store_runner(guard: Guard, intents: list[OrderIntent], policy: OncePer) -> Any:
    policies = (policy,)
    caller = Caller.current("bench")

    def run(start: int, stop: int, out: list[int]) -> None:
        claim = guard.store.claim
        clock = time.perf_counter_ns
        for intent in intents[start:stop]:
            t0 = clock()
            decision = claim(intent, policies, caller)
            t1 = clock()
            if not decision.claimed:
                raise SystemExit(f"unexpected block: {decision.message}")
            out.append(t1 - t0)

    return run


def guard_runner(guard: Guard, intents: list[OrderIntent], policy: OncePer) -> Any:
    def run(start: int, stop: int, out: list[int]) -> None:
        claim = guard._claim
        sending = State.SENDING
        clock = time.perf_counter_ns
        for intent in intents[start:stop]:
            t0 = clock()
            handle = claim(intent, policy, sending, None)
            t1 = clock()
            if not handle:
                raise SystemExit(f"unexpected block: {handle.decision.message}")
            out.append(t1 - t0)

    return run


def bench_latency(args: argparse.Namespace, workdir: str) -> tuple[list[Combo], dict[str, str]]:
    total = args.warmup + args.iterations
    combos: list[Combo] = []
    closers: list[Any] = []
    checks: dict[str, str] = {}
    frame_conns: dict[str, dict[str, Any]] = {}
    wal_files: dict[str, list[tuple[str, str, sqlite3.Connection]]] = {}
    for mode in args.modes:
        raw_path = os.path.join(workdir, f"latency-raw-{mode.lower()}.db")
        ledger_path = os.path.join(workdir, f"latency-ledger-{mode.lower()}.db")
        conn = raw_connect(raw_path, mode, args.busy_timeout)
        guard = Guard.open(f"sqlite:///{ledger_path}", synchronous=mode, busy_timeout=args.busy_timeout, runner="bench")
        closers += [conn.close, guard.close]
        gconn = guard.store._db.conn()  # only to show that both files run with the same pragmas
        wal_files[mode] = [("raw", raw_path, conn), ("ledger", ledger_path, gconn)]
        checks[mode] = (
            f"raw journal_mode={pragma(conn, 'journal_mode')} synchronous={pragma(conn, 'synchronous')} "
            f"busy_timeout={pragma(conn, 'busy_timeout')}ms | ledger journal_mode={pragma(gconn, 'journal_mode')} "
            f"synchronous={pragma(gconn, 'synchronous')} busy_timeout={pragma(gconn, 'busy_timeout')}ms"
        )
        policies = {name: make_policy(name) for name in POLICIES}
        combos.append(Combo(mode, "raw", raw_runner(conn, raw_params("K", total))))
        if not args.no_replay:
            replay_path = os.path.join(workdir, f"latency-replay-{mode.lower()}.db")
            Guard.open(f"sqlite:///{replay_path}", synchronous=mode, busy_timeout=args.busy_timeout).close()  # the schema
            items = replay_items(guard, "R", total)
            if items is not None:
                replay_conn = raw_connect(replay_path, mode, args.busy_timeout)
                closers.append(replay_conn.close)
                wal_files[mode].append(("sql-replay", replay_path, replay_conn))
                combos.append(Combo(mode, "sql-replay", replay_runner(replay_conn, items)))
                frame_conns[mode] = {"raw": (conn, raw_runner(conn, raw_params("F", 50))),
                                     "ledger": (replay_conn, replay_runner(replay_conn, replay_items(guard, "F", 50)))}
        for level, factory in (("store.claim", store_runner), ("guard._claim", guard_runner)):
            for name, policy in policies.items():
                prefix = ("S" if level == "store.claim" else "G") + name[0].upper()
                combos.append(Combo(mode, f"{level}/{name}", factory(guard, make_intents(prefix, total), policy)))

    # Warm-up (not recorded): connections, statement caches, the exchange calendar, and each
    # file's WAL grown to its auto-checkpoint size (until then every commit also extends the
    # file, which makes an fsync markedly slower: a too short warm-up flatters whichever file
    # writes fewer pages per commit, i.e. the raw baseline's rivals).
    for combo in combos:
        combo.run(0, args.warmup, [])
    for mode, files in wal_files.items():
        states = []
        for name, path, conn in files:
            pages = os.path.getsize(path + "-wal") // pragma(conn, "page_size") if os.path.exists(path + "-wal") else 0
            wrapped = pages >= pragma(conn, "wal_autocheckpoint")
            states.append(f"{name} {pages} pages{'' if wrapped else ' (NOT yet at wal_autocheckpoint: raise --warmup)'}")
        checks[mode] += " | WAL after warm-up: " + ", ".join(states)
    rng = random.Random(args.seed)
    order = list(combos)
    gc_was_enabled = gc.isenabled()
    if args.no_gc:
        gc.collect()
        gc.disable()
    try:
        for start in range(args.warmup, total, args.batch):
            stop = min(start + args.batch, total)
            rng.shuffle(order)
            for combo in order:
                combo.run(start, stop, combo.samples)
        for mode, pair in frame_conns.items():
            checks[mode] += " | " + wal_frames(pair)
    finally:
        if args.no_gc and gc_was_enabled:
            gc.enable()
        for close in closers:
            close()
    return combos, checks


def wal_frames(pair: dict[str, Any]) -> str:
    """WAL frames (pages) written per commit by the raw insert and by the ledger's claim SQL."""
    out = []
    for name, (conn, run) in pair.items():
        interval = pragma(conn, "wal_autocheckpoint")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        run(0, 50, [])
        frames = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1] / 50
        conn.execute(f"PRAGMA wal_autocheckpoint = {interval}")
        out.append(f"{name} {frames:.1f} (auto-checkpoint every ~{interval / frames:.0f} commits)")
    return "WAL frames/commit: " + ", ".join(out)


def report_latency(args: argparse.Namespace, combos: list[Combo]) -> None:
    print()
    print(f"LATENCY  single process, {args.iterations} claims per row (after {args.warmup} warm-up), "
          f"batches of {args.batch} in shuffled order; µs per claim, ratio = path / raw of the same mode")
    header = f"{'sync':<7} {'path':<19} {'n':>6} {'p50 µs':>9} {'p99 µs':>9} {'mean µs':>9} {'Δp50 µs':>9} {'p50 ×raw':>9} {'p99 ×raw':>9}  target"
    print(header)
    print("-" * len(header))
    notes = []
    for mode in args.modes:
        stats = {}
        for c in combos:
            if c.mode == mode:
                s = sorted(c.samples)
                stats[c.path] = (len(s), percentile(s, 50) / 1e3, percentile(s, 99) / 1e3, sum(s) / len(s) / 1e3)
        raw_p50, raw_p99 = stats["raw"][1], stats["raw"][2]
        target = TARGETS.get(mode)
        for path in PATHS:
            if path not in stats:
                continue
            n, p50, p99, mean = stats[path]
            r50, r99 = p50 / raw_p50, p99 / raw_p99
            verdict = ""
            if path == "sql-replay":
                verdict = "(diagnostic: the claim's SQL alone, parameters built in advance)"
            elif target is not None and path != "raw":
                verdict = f"≤{target:g}: p50 {'ok' if r50 <= target else 'MISS'}, p99 {'ok' if r99 <= target else 'MISS'}"
                if mode in LONG_TERM:
                    verdict += f" (long-term ≤{LONG_TERM[mode]:g}: p50 {'ok' if r50 <= LONG_TERM[mode] else 'miss'})"
            delta = "" if path == "raw" else f"{p50 - raw_p50:.1f}"
            print(f"{mode:<7} {path:<19} {n:>6} {p50:>9.1f} {p99:>9.1f} {mean:>9.1f} {delta:>9} {r50:>9.2f} {r99:>9.2f}  {verdict}".rstrip())
        if "sql-replay" in stats:
            sql, claim = stats["sql-replay"][1], stats["store.claim/ever"][1]
            notes.append(
                f"{mode}: of store.claim/ever's Δp50 {claim - raw_p50:.0f} µs, ~{sql - raw_p50:.0f} µs is SQL/commit "
                f"(schema, statements; sql-replay − raw) and ~{claim - sql:.0f} µs Python (store.claim − sql-replay)"
            )
    print("policies: ever = " + POLICIES["ever"] + ", xnys = " + POLICIES["xnys"])
    for note in notes:
        print("split   " + note)
    print("note    a file's WAL auto-checkpoint (fsync included, even with NORMAL) runs inside the commit that crosses "
          "wal_autocheckpoint pages: when that is more often than every 100 commits (see 'WAL frames/commit' above), "
          "it lands in p99")


# ---------------------------------------------------------------------------- throughput


def tp_worker(
    kind: str, path: str, mode: str, busy_timeout: float, policy_name: str, worker: int, count: int,
    barrier: Any, results: Any,
) -> None:
    """One contending process: set up, wait at the barrier, claim ``count`` distinct intents."""
    errors = 0
    latencies: list[int] = []
    clock = time.perf_counter_ns
    try:
        prefix = f"W{worker}-"
        if kind == "raw":
            conn = raw_connect(path, mode, busy_timeout)
            params = raw_params(prefix, count)
            barrier.wait()
            start = time.perf_counter()
            for p in params:
                t0 = clock()
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute(RAW_INSERT, p)
                    conn.execute("COMMIT")
                except sqlite3.OperationalError:
                    errors += 1
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                latencies.append(clock() - t0)
            end = time.perf_counter()
            claimed = conn.execute("SELECT count(*) FROM claims WHERE holder = 'bench' AND key LIKE ?", (prefix + "%",)).fetchone()[0]
            conn.close()
        else:
            from orderguard.errors import StoreError

            guard = Guard.open(f"sqlite:///{path}", synchronous=mode, busy_timeout=busy_timeout, runner=f"bench-{worker}", create=False)
            policy = make_policy(policy_name)
            intents = make_intents(prefix, count)
            policy.rule(intents[0], datetime.now(tz=UTC))  # warm the exchange calendar
            claimed = 0
            barrier.wait()
            start = time.perf_counter()
            for intent in intents:
                t0 = clock()
                try:
                    handle = guard._claim(intent, policy, State.SENDING, None)
                    claimed += bool(handle)
                except StoreError:
                    errors += 1
                latencies.append(clock() - t0)
            end = time.perf_counter()
            guard.close()
        results.put((worker, start, end, claimed, errors, latencies, None))
    except BaseException as exc:  # report, never hang the parent
        results.put((worker, 0.0, 0.0, 0, errors, latencies, f"{type(exc).__name__}: {exc}"))


@dataclass
class TpRun:
    mode: str
    kind: str
    round: int
    wall: float
    claimed: int
    errors: int
    p50_us: float
    p99_us: float


def run_throughput_once(args: argparse.Namespace, workdir: str, mode: str, kind: str, rnd: int) -> TpRun:
    path = os.path.join(workdir, f"tp-{kind}-{mode.lower()}-{rnd}.db")
    if kind == "raw":
        raw_connect(path, mode, args.busy_timeout).close()
    else:
        Guard.open(f"sqlite:///{path}", synchronous=mode, busy_timeout=args.busy_timeout).close()  # schema, before the race
    ctx = mp.get_context(args.start_method)
    barrier = ctx.Barrier(args.procs)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=tp_worker,
            args=(kind, path, mode, args.busy_timeout, args.tp_policy, w, args.per_proc, barrier, results),
            daemon=True,
        )
        for w in range(args.procs)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    failures = [g[6] for g in got if g[6]]
    if failures:
        raise SystemExit(f"throughput worker failed ({mode} {kind}): {failures[0]}")
    wall = max(g[2] for g in got) - min(g[1] for g in got)
    lat = sorted(x for g in got for x in g[5])
    for suffix in ("", "-wal", "-shm"):
        if not args.keep and os.path.exists(path + suffix):
            os.remove(path + suffix)
    return TpRun(
        mode, kind, rnd, wall, sum(g[3] for g in got), sum(g[4] for g in got),
        percentile(lat, 50) / 1e3, percentile(lat, 99) / 1e3,
    )


def bench_throughput(args: argparse.Namespace, workdir: str) -> list[TpRun]:
    runs: list[TpRun] = []
    for mode in args.tp_modes:
        for rnd in range(args.tp_rounds):
            kinds = ("raw", "guarded") if rnd % 2 == 0 else ("guarded", "raw")
            for kind in kinds:
                runs.append(run_throughput_once(args, workdir, mode, kind, rnd))
    return runs


def report_throughput(args: argparse.Namespace, runs: list[TpRun]) -> None:
    total = args.procs * args.per_proc
    print()
    print(f"THROUGHPUT  {args.procs} processes x {args.per_proc} distinct claims on one file, released by a barrier; "
          f"{args.tp_rounds} round(s) per mode, order alternating; guarded = guard._claim with {POLICIES[args.tp_policy]}")
    header = f"{'sync':<7} {'kind':<8} {'claims':>7} {'wall s':>8} {'claims/s':>10} {'p50 µs':>9} {'p99 µs':>10} {'errors':>7}  rounds (claims/s)"
    print(header)
    print("-" * len(header))
    for mode in args.tp_modes:
        rates = {}
        for kind in ("raw", "guarded"):
            rs = [r for r in runs if r.mode == mode and r.kind == kind]
            claims = sum(r.claimed for r in rs)
            wall = sum(r.wall for r in rs)
            rates[kind] = claims / wall if wall else float("nan")
            each = ", ".join(f"{r.claimed / r.wall:,.0f}" for r in rs)
            p50 = sorted(r.p50_us for r in rs)[len(rs) // 2]
            p99 = max(r.p99_us for r in rs)
            print(f"{mode:<7} {kind:<8} {claims:>7} {wall:>8.2f} {rates[kind]:>10,.0f} {p50:>9.1f} {p99:>10.1f} {sum(r.errors for r in rs):>7}  {each}")
            if claims != total * len(rs):
                print(f"        WARNING: expected {total * len(rs)} claims, got {claims}")
        print(f"{mode:<7} {'ratio':<8} guarded/raw throughput = {rates['guarded'] / rates['raw']:.2f}  "
              f"(raw is {rates['raw'] / rates['guarded']:.2f}x faster)")
    print("p50/p99 µs: per-claim latency under contention (median over rounds of p50; worst p99 over rounds)")


# ------------------------------------------------------------------------------ profile


def profile_guarded(args: argparse.Namespace, workdir: str) -> None:
    """cProfile the guard-level claim path (first mode of --modes) and print the hot spots."""
    import cProfile
    import pstats

    mode = args.profile_mode
    path = os.path.join(workdir, f"profile-{mode.lower()}.db")
    with Guard.open(f"sqlite:///{path}", synchronous=mode, busy_timeout=args.busy_timeout, runner="bench") as guard:
        policy = make_policy(args.tp_policy)
        intents = make_intents("P", args.profile + 100)
        for intent in intents[:100]:
            guard._claim(intent, policy, State.SENDING, None)
        profiler = cProfile.Profile()
        profiler.enable()
        for intent in intents[100:]:
            guard._claim(intent, policy, State.SENDING, None)
        profiler.disable()
    print()
    print(f"PROFILE  cProfile of {args.profile} guard._claim calls, synchronous={mode}, {POLICIES[args.tp_policy]}")
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(args.profile_top)


# --------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def modes(text: str) -> list[str]:
        out = [m.strip().upper() for m in text.split(",") if m.strip()]
        for m in out:
            if m not in ("FULL", "NORMAL", "EXTRA"):
                raise argparse.ArgumentTypeError(f"unknown synchronous mode {m!r}")
        return out

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--iterations", type=int, default=5000, help="timed claims per (mode, path) in the latency benchmark")
    p.add_argument("--warmup", type=int, default=600,
                   help="untimed claims per (mode, path) before timing; enough for the raw file's WAL to reach its checkpoint size")
    p.add_argument("--batch", type=int, default=50, help="claims per batch; batch order is shuffled every round")
    p.add_argument("--modes", type=modes, default=["FULL", "NORMAL"], help="synchronous modes for the latency benchmark")
    p.add_argument("--procs", type=int, default=4, help="contending processes in the throughput benchmark")
    p.add_argument("--per-proc", type=int, default=2000, help="distinct claims per process in the throughput benchmark")
    p.add_argument("--tp-modes", type=modes, default=["NORMAL", "FULL"], help="synchronous modes for the throughput benchmark")
    p.add_argument("--tp-rounds", type=int, default=2, help="throughput rounds per mode (order raw/guarded alternates)")
    p.add_argument("--tp-policy", choices=sorted(POLICIES), default="ever", help="policy of the throughput (and profile) claims")
    p.add_argument("--start-method", choices=mp.get_all_start_methods(), default="spawn", help="multiprocessing start method")
    p.add_argument("--skip-latency", action="store_true", help="skip the latency benchmark")
    p.add_argument("--skip-throughput", action="store_true", help="skip the throughput benchmark")
    p.add_argument("--busy-timeout", type=float, default=5.0, help="busy_timeout (seconds) of both the ledger and the raw file")
    p.add_argument("--no-replay", action="store_true", help="skip the sql-replay diagnostic row")
    p.add_argument("--no-gc", action="store_true", help="disable the cyclic garbage collector while timing latency")
    p.add_argument("--seed", type=int, default=12345, help="seed of the batch shuffling")
    p.add_argument("--dir", default=None, help="directory for the database files (default: a fresh temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the database files")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="also cProfile N guard._claim calls and print the hot spots")
    p.add_argument("--profile-mode", type=lambda t: modes(t)[0], default="NORMAL", help="synchronous mode of the profile")
    p.add_argument("--profile-top", type=int, default=25, help="rows of the profile to print")
    args = p.parse_args(argv)
    if min(args.iterations, args.batch, args.procs, args.per_proc, args.tp_rounds) < 1 or args.warmup < 0:
        p.error("counts must be positive")
    return args


def print_environment(args: argparse.Namespace, workdir: str) -> None:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        cpus_usable = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus_usable = os.cpu_count() or 0
    print("orderguard SQLite claim benchmark")
    print(f"command     : {shlex.join(['python', *sys.argv])}")
    print(f"python      : {platform.python_implementation()} {platform.python_version()} ({sys.executable})")
    print(f"sqlite      : {sqlite3.sqlite_version} (module sqlite3, threadsafety={sqlite3.threadsafety})")
    print(f"orderguard  : {orderguard_version} at git {git_revision(repo)}")
    print(f"platform    : {platform.platform()}; cpu_count={os.cpu_count()} usable={cpus_usable}; loadavg={os.getloadavg()}")
    print(f"files in    : {workdir} ({filesystem_type(workdir)})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = args.dir or tempfile.mkdtemp(prefix="orderguard-bench-")
    os.makedirs(workdir, exist_ok=True)
    started = time.perf_counter()
    print_environment(args, workdir)
    try:
        if not args.skip_latency:
            combos, checks = bench_latency(args, workdir)
            for mode, text in checks.items():
                print(f"pragmas {mode:<6}: {text}")
            report_latency(args, combos)
        if not args.skip_throughput:
            report_throughput(args, bench_throughput(args, workdir))
        if args.profile:
            profile_guarded(args, workdir)
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"done in {time.perf_counter() - started:.1f}s; loadavg={os.getloadavg()}")


if __name__ == "__main__":
    main()
