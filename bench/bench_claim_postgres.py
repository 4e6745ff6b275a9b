"""Benchmark: a claim on the PostgreSQL ledger against a raw PostgreSQL baseline, in one run.

    python bench/bench_claim_postgres.py [--url postgresql://postgres@127.0.0.1:5432/test]

1. Latency (one client): the raw baseline is one ``INSERT … ON CONFLICT DO NOTHING RETURNING``
   round trip (autocommit) on a table with a unique key; the guarded path is ``store.claim``
   (server clock, conditional upsert, attempt and intent rows, NOTIFY, COMMIT). Batches of the
   two alternate; p50/p99 and their ratios are printed.
2. Throughput: ``--procs`` processes x ``--per-proc`` distinct intents claimed at once (behind a
   barrier), against the same number of raw inserts.
Each run uses its own PostgreSQL schema, dropped at the end.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
import uuid

import psycopg

from orderguard import Ever, OncePer, OrderIntent
from orderguard.store.base import Caller
from orderguard.store.postgres import PostgresStore

RAW = "INSERT INTO raw_claims(key, holder, at) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING RETURNING key"


def intents(prefix: str, n: int) -> list[OrderIntent]:
    return [OrderIntent(account="a", strategy="bench", symbol=f"{prefix}{i}", side="BUY", quantity=1) for i in range(n)]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def setup(url: str, schema: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"CREATE TABLE {schema}.raw_claims (key TEXT PRIMARY KEY, holder TEXT NOT NULL, at DOUBLE PRECISION)")


def latency(url: str, schema: str, n: int, batch: int) -> None:
    store = PostgresStore(url, schema=schema, max_size=1)
    policy, caller = [OncePer(Ever(), by=("symbol",))], Caller.current("bench")
    raw = psycopg.connect(url, autocommit=True, options=f"-c search_path={schema}")
    guarded_intents = intents("L", n + 200)
    for i in range(200):  # warm-up: connections, plans, caches
        store.claim(guarded_intents[i], policy, caller)
        raw.execute(RAW, (f"w{i}", "x", time.time())).fetchone()
    g: list[float] = []
    r: list[float] = []
    for start in range(0, n, batch):
        for i in range(start, min(n, start + batch)):
            t0 = time.perf_counter_ns()
            raw.execute(RAW, (f"k{i}", "x", time.time())).fetchone()
            r.append(time.perf_counter_ns() - t0)
        for i in range(start, min(n, start + batch)):
            t0 = time.perf_counter_ns()
            store.claim(guarded_intents[200 + i], policy, caller)
            g.append(time.perf_counter_ns() - t0)
    raw.close()
    store.close()
    print(f"LATENCY  {n} claims each, batches of {batch} alternating; µs")
    print(f"{'path':<14}{'p50':>10}{'p99':>10}{'mean':>10}")
    for name, values in (("raw", r), ("store.claim", g)):
        print(f"{name:<14}{pct(values, 0.5) / 1000:>10.1f}{pct(values, 0.99) / 1000:>10.1f}{statistics.mean(values) / 1000:>10.1f}")
    print(f"ratio p50 {pct(g, 0.5) / pct(r, 0.5):.2f}  p99 {pct(g, 0.99) / pct(r, 0.99):.2f}  (target p50 <= 1.3)")


def worker(url: str, schema: str, kind: str, index: int, per: int, barrier: object, out: object) -> None:
    items = intents(f"T{index}-", per)
    if kind == "raw":
        conn = psycopg.connect(url, autocommit=True, options=f"-c search_path={schema}")
        barrier.wait()  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        for i in range(per):
            conn.execute(RAW, (f"t{index}-{i}", "x", time.time())).fetchone()
    else:
        store = PostgresStore(url, schema=schema, max_size=1)
        policy, caller = [OncePer(Ever(), by=("symbol",))], Caller.current(f"host-{index}")
        barrier.wait()  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        for item in items:
            store.claim(item, policy, caller)
    out.put(time.perf_counter() - t0)  # type: ignore[attr-defined]


def throughput(url: str, schema: str, procs: int, per: int) -> None:
    ctx = mp.get_context("spawn")
    print(f"THROUGHPUT  {procs} processes x {per} distinct claims")
    rates = {}
    for kind in ("raw", "guarded"):
        barrier, out = ctx.Barrier(procs), ctx.Queue()
        ps = [ctx.Process(target=worker, args=(url, schema, kind, i, per, barrier, out)) for i in range(procs)]
        for p in ps:
            p.start()
        wall = max(out.get(timeout=600) for _ in ps)
        for p in ps:
            p.join()
        rates[kind] = procs * per / wall
        print(f"{kind:<10}{rates[kind]:>12,.0f} claims/s")
    print(f"ratio guarded/raw {rates['guarded'] / rates['raw']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--procs", type=int, default=8)
    parser.add_argument("--per-proc", type=int, default=1000)
    args = parser.parse_args()
    schema = f"og_bench_{uuid.uuid4().hex[:10]}"
    setup(args.url, schema)
    try:
        with psycopg.connect(args.url) as conn:
            print("server:", conn.execute("SELECT version()").fetchone()[0])  # type: ignore[index]
        latency(args.url, schema, args.iterations, args.batch)
        throughput(args.url, schema, args.procs, args.per_proc)
    finally:
        with psycopg.connect(args.url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    main()
