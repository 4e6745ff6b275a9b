"""Benchmark: ``orderguard.audit`` on a large trade history, against a pandas groupby baseline and a
plain SQLite window-function query on the same data, measured in one run.

Run from the repository root::

    python bench/bench_audit.py                 # 10 million trades: setup ~80 s, then ~4 min of runs
    python bench/bench_audit.py --rows 1000000  # quicker
    python bench/bench_audit.py --help

Setup (timed and reported, but not part of any contender's figures): one seeded trades table is
generated with DuckDB SQL (columns id, timestamp, symbol, side, quantity, price, strategy; ~500
symbols with skewed activity, four strategies, regular-hours timestamps at millisecond
resolution) with known injected duplicate bursts (2–50 near-identical orders, 0.05–8 s apart,
about 1 % of the rows) and deliberate scale-ins (same symbol and side 25–55 s apart, growing size,
moving price: they must not count). It is written once to a Parquet file (``COPY ... TO``) and
once to a SQLite file (``timestamp`` as ISO text, ``price`` REAL, ``id INTEGER PRIMARY KEY``).

Contenders, each in its own subprocess (so that ``ru_maxrss`` from ``os.wait4`` is that
contender's peak memory), run ``--repeat`` times in a rotating order:

* ``audit/parquet``: ``orderguard.audit.audit(parquet_path)``, the headline figure;
* ``audit/sqlite``: ``audit(sqlite_path, table="trades")``, which streams the table out of SQLite
  into a temporary CSV before DuckDB reads it;
* ``pandas``: ``read_parquet``, then the same rule written idiomatically and vectorised: one
  ``sort_values`` by (scope, symbol, side, time, id), ``groupby(...).diff()/shift()`` for the
  previous trade, ``cumsum`` of cluster starts for cluster numbers, the same score, and a
  ``groupby`` aggregation per cluster;
* ``sqlite``: one plain SQLite query on the SQLite file: ``LAG``/``LEAD`` over ``PARTITION BY
  strategy, symbol, side ORDER BY time, id``, a running ``sum`` for cluster numbers, the same
  score, ``GROUP BY`` cluster.

The rule (``orderguard/audit/clusters.py``): a cluster is a run of trades of one (strategy,
symbol, side) each within ``window`` seconds of the previous one; every later trade is scored
against the previous one, 0.5·(1 − gap/window) + 0.3·min(q, q′)/max(q, q′) + 0.2·max(0, 1 −
|p − p′|/(p′·tolerance)), and is a duplicate when the score is at least ``min_confidence``. The
window, threshold, tolerance and weights are read from ``orderguard.audit`` so the baselines
follow the library's defaults.

Each child times itself from the first read of the data to having the result (imports excluded)
and the parent times it from start to exit (interpreter start and imports included). All
contenders must report the same clusters, duplicate bursts, duplicate trades and phantom
notional; the benchmark stops with an error if they do not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from _common import git_revision

CONTENDERS = ("audit/parquet", "audit/sqlite", "pandas", "sqlite")
HEADLINE = "audit/parquet"
BASELINE = "pandas"
GOAL_SECONDS = 5.0  # from the issue: 10 million trades on 2 cores under 5 s ...
GOAL_RATIO = 10.0  # ... and at least 10x faster than pandas
SYMBOLS = 500
STRATEGIES = (("momentum", 0.4), ("meanrev", 0.3), ("breakout", 0.2), ("pairs", 0.1))
DUPLICATE_SHARE = 0.01  # about this share of the rows are injected repeats
SCALE_IN_SHARE = 0.002  # about this share of the rows are scale-in follow-ups
SKEW = 1.5  # symbol k of SYMBOLS is drawn as floor(SYMBOLS * u^SKEW): a few busy names, a long quiet tail
ROUND_LOTS = 0.5  # share of background trades in round lots (100 to 1,000); the rest are 1 to 500 shares
SESSION_MS = 23_400_000  # 6.5 h of regular trading hours
FIRST_SESSION = "2024-01-01 14:30:00"  # a Monday, 09:30 New York
SQLITE_BATCH = 200_000
AGREE_ON = ("rows", "clusters", "duplicate_bursts", "duplicate_trades", "phantom_cents")


# ------------------------------------------------------------------------------ helpers


def say(*parts: object) -> None:
    """Human-readable output: stdout, or stderr when ``--json`` keeps stdout for the JSON document."""
    print(*parts, file=sys.stderr if JSON_MODE else sys.stdout, flush=True)


JSON_MODE = False



def rss_kib(field: str = "VmRSS") -> int:
    """This process's resident set size (``VmRSS``) or its peak (``VmHWM``) in KiB from /proc (Linux), else 0."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rule() -> dict[str, float]:
    """The library's default clustering settings and weights: the baselines use the same numbers."""
    from orderguard.audit import Settings
    from orderguard.audit.clusters import WEIGHTS

    s = Settings()
    return {
        "window_seconds": s.window_seconds, "min_confidence": s.min_confidence, "price_tolerance": s.price_tolerance,
        "w_time": WEIGHTS[0], "w_size": WEIGHTS[1], "w_price": WEIGHTS[2],
    }


def mib(kib: int) -> float:
    return kib / 1024


# ---------------------------------------------------------------------------- data set


@dataclass
class Dataset:
    rows: int
    seed: int
    parquet: str
    sqlite: str
    parquet_bytes: int = 0
    sqlite_bytes: int = 0
    injected_bursts: int = 0
    injected_repeats: int = 0
    scale_ins: int = 0
    scale_in_followups: int = 0
    generate_seconds: float = 0.0
    parquet_seconds: float = 0.0
    sqlite_seconds: float = 0.0
    reused: bool = False


def generate(workdir: str, rows: int, seed: int, days: int) -> Dataset:
    """Write the trades to ``trades.parquet`` and ``trades.db`` in ``workdir`` (reused when a previous
    ``--dir ... --keep`` run left the same rows and seed there)."""
    import duckdb

    data = Dataset(rows, seed, os.path.join(workdir, "trades.parquet"), os.path.join(workdir, "trades.db"))
    meta_path = os.path.join(workdir, "trades.json")
    if os.path.exists(meta_path) and os.path.exists(data.parquet) and os.path.exists(data.sqlite):
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
        if meta.get("rows") == rows and meta.get("seed") == seed and meta.get("days") == days:
            kept = Dataset(**{k: v for k, v in meta.items() if k != "days"})
            kept.reused = True
            return kept
    for path in (data.parquet, data.sqlite, meta_path):
        if os.path.exists(path):
            os.remove(path)

    started = time.perf_counter()
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    # Uniform numbers in [0, 1) from a hash of (row, stream): the same data whatever the thread count.
    con.execute(f"CREATE MACRO u(a, b) AS (hash(a, b, {seed}) % 1000000007) / 1000000007.0")
    first = f"epoch_ms(TIMESTAMP '{FIRST_SESSION}')"
    letter = "chr(65 + CAST({} AS INTEGER) % 26)"
    con.execute(
        f"""
        CREATE TEMP TABLE syms AS
        SELECT s, {letter.format('s')} || {letter.format('s // 26')} || {letter.format('s * 7 + 3')}
                  || CASE WHEN s % 3 = 0 THEN {letter.format('s * 11 + 5')} ELSE '' END AS symbol,
               10 * exp(4 * u(s, 1)) AS base, 6.2832 * u(s, 2) AS ph1, 6.2832 * u(s, 3) AS ph2
        FROM range({SYMBOLS}) t(s)
        """
    )
    strategy = "CASE " + "".join(
        f"WHEN u(i, 3) < {sum(w for _, w in STRATEGIES[: k + 1]):.6f} THEN '{name}' " for k, (name, _) in enumerate(STRATEGIES[:-1])
    ) + f"ELSE '{STRATEGIES[-1][0]}' END"
    # Background: trades spread over `days` sessions (Mon-Fri), symbol activity skewed (a few busy
    # names), round lots or odd sizes, the price a slow per-symbol curve plus 0.1 % noise per fill.
    con.execute(
        f"""
        CREATE TEMP TABLE bg AS
        WITH b AS (
            SELECT i, least({SYMBOLS - 1}, CAST(floor({SYMBOLS} * pow(u(i, 1), {SKEW})) AS INTEGER)) AS s,
                   CASE WHEN u(i, 2) < 0.5 THEN 'BUY' ELSE 'SELL' END AS side, {strategy} AS strategy,
                   CAST(floor(u(i, 4) * {days}) AS BIGINT) AS d, u(i, 5) AS tod,
                   CAST(CASE WHEN u(i, 6) < {ROUND_LOTS} THEN 100 * (1 + floor(u(i, 7) * 10)) ELSE 1 + floor(u(i, 7) * 500) END
                        AS BIGINT) AS qty,
                   u(i, 8) AS noise
            FROM range({rows}) t(i)
        )
        SELECT i, s, side, strategy, qty,
               {first} + (d + 2 * (d // 5)) * 86400000 + CAST(floor(tod * {SESSION_MS}) AS BIGINT) AS ms, noise
        FROM b
        """
    )
    con.execute(
        """
        CREATE TEMP TABLE bgp AS
        SELECT bg.*, CAST(round(base * (1 + 0.08 * sin(ms / 86400000.0 / 60 * 6.2832 + ph1)
                                     + 0.004 * sin(ms / 3600000.0 * 6.2832 + ph2)) * (1 + 0.001 * (noise - 0.5)), 2)
                          AS DOUBLE) AS price
        FROM bg JOIN syms USING (s)
        """
    )
    con.execute("DROP TABLE bg")
    # Duplicate bursts: 1–49 repeats (skewed to few) of a background trade, 0.2–8 s apart plus up to
    # 150 ms of jitter, same size, the same price or one cent off.
    mean_repeats = 1 + 49 / 7 - 0.5  # E[1 + floor(49 u^6)] ~ 7.5
    p_dup = DUPLICATE_SHARE / mean_repeats
    p_scale = SCALE_IN_SHARE / 2  # 1–3 follow-ups, 2 on average
    con.execute(
        f"""
        CREATE TEMP TABLE trades0 AS
        SELECT ms, s, side, strategy, qty, price, 0 AS kind, i AS burst, 0 AS j FROM bgp
        UNION ALL
        SELECT o.ms + j * o.g + CAST(floor(u(o.i * 64 + j, 23) * 150) AS BIGINT), o.s, o.side, o.strategy, o.qty,
               round(o.price + CASE WHEN u(o.i * 64 + j, 24) < 0.15 THEN 0.01 WHEN u(o.i * 64 + j, 24) < 0.3 THEN -0.01
                                    ELSE 0 END, 2),
               1, o.i, j
        FROM (SELECT *, 1 + CAST(floor(49 * pow(u(i, 20), 6)) AS INTEGER) AS r,
                     200 + CAST(floor(u(i, 21) * 7800) AS BIGINT) AS g
              FROM bgp WHERE u(i, 22) < {p_dup}) o, range(1, 50) t(j)
        WHERE j <= o.r
        UNION ALL
        SELECT o.ms + j * o.g, o.s, o.side, o.strategy, o.qty * (j + 1),
               round(o.price * (1 + j * 0.003 * o.dir), 2), 2, o.i, j
        FROM (SELECT *, 1 + CAST(floor(u(i, 31) * 3) AS INTEGER) AS k, 25000 + CAST(floor(u(i, 32) * 30000) AS BIGINT) AS g,
                     CASE WHEN u(i, 33) < 0.5 THEN 1 ELSE -1 END AS dir
              FROM bgp WHERE u(i, 30) < {p_scale} AND u(i, 22) >= {p_dup}) o, range(1, 4) t(j)
        WHERE j <= o.k
        """
    )
    con.execute("DROP TABLE bgp")
    # The first `rows` trades in time order; ids follow time (a trade log's insertion order).
    con.execute(
        f"""
        CREATE TEMP TABLE trades AS
        SELECT row_number() OVER (ORDER BY ms, kind, burst, j) AS id, make_timestamp(ms * 1000) AS timestamp,
               symbol, side, qty AS quantity, price, strategy, kind, burst
        FROM (SELECT * FROM trades0 ORDER BY ms, kind, burst, j LIMIT {rows}) JOIN syms USING (s)
        """
    )
    con.execute("DROP TABLE trades0")
    counts = con.execute(
        "SELECT count(*) FILTER (WHERE kind = 1), count(DISTINCT burst) FILTER (WHERE kind = 1), "
        "count(*) FILTER (WHERE kind = 2), count(DISTINCT burst) FILTER (WHERE kind = 2) FROM trades"
    ).fetchone()
    assert counts is not None
    data.injected_repeats, data.injected_bursts, data.scale_in_followups, data.scale_ins = (int(n) for n in counts)
    data.generate_seconds = time.perf_counter() - started

    started = time.perf_counter()
    escaped = data.parquet.replace("'", "''")
    con.execute(
        f"COPY (SELECT id, timestamp, symbol, side, quantity, price, strategy FROM trades ORDER BY id) "
        f"TO '{escaped}' (FORMAT parquet)"
    )
    data.parquet_seconds = time.perf_counter() - started
    data.parquet_bytes = os.path.getsize(data.parquet)

    started = time.perf_counter()
    write_sqlite(con, data.sqlite)
    data.sqlite_seconds = time.perf_counter() - started
    data.sqlite_bytes = os.path.getsize(data.sqlite)
    con.close()
    with open(meta_path, "w", encoding="utf-8") as handle:
        json.dump({**asdict(data), "days": days, "reused": False}, handle)
    return data


def write_sqlite(con: Any, path: str) -> None:
    """The same trades in a SQLite table shaped like a bot's own log (ISO text times, REAL prices)."""
    out = sqlite3.connect(path, isolation_level=None)
    try:
        out.execute("PRAGMA journal_mode = OFF")
        out.execute("PRAGMA synchronous = OFF")
        out.execute(
            "CREATE TABLE trades (id INTEGER PRIMARY KEY, timestamp TEXT NOT NULL, symbol TEXT NOT NULL, "
            "side TEXT NOT NULL, quantity INTEGER NOT NULL, price REAL NOT NULL, strategy TEXT NOT NULL)"
        )
        cursor = con.execute(
            "SELECT id, strftime(timestamp, '%Y-%m-%d %H:%M:%S.%g'), symbol, side, quantity, price, strategy "
            "FROM trades ORDER BY id"
        )
        out.execute("BEGIN")
        while batch := cursor.fetchmany(SQLITE_BATCH):
            out.executemany("INSERT INTO trades VALUES (?, ?, ?, ?, ?, ?, ?)", batch)
        out.execute("COMMIT")
    finally:
        out.close()


# ---------------------------------------------------------------------------- contenders
# Each returns what it found: rows read, clusters (runs of two or more trades), duplicate bursts
# (clusters holding at least one duplicate), duplicate trades, phantom notional in cents.


def run_audit_parquet(data: dict[str, Any], r: dict[str, float]) -> dict[str, int]:
    from orderguard.audit import audit

    return audit_figures(audit(data["parquet"]))


def run_audit_sqlite(data: dict[str, Any], r: dict[str, float]) -> dict[str, int]:
    from orderguard.audit import audit

    return audit_figures(audit(data["sqlite"], table="trades"))


def audit_figures(report: Any) -> dict[str, int]:
    return {
        "rows": report.rows, "clusters": len(report.clusters), "duplicate_bursts": len(report.duplicates),
        "duplicate_trades": report.duplicate_orders, "phantom_cents": int(report.phantom_notional * 100),
    }


def run_pandas(data: dict[str, Any], r: dict[str, float]) -> dict[str, int]:
    import numpy as np
    import pandas as pd

    keys = ["strategy", "symbol", "side"]
    window_us = int(r["window_seconds"] * 1_000_000)
    # Low-cardinality text read as categoricals (pyarrow's read_dictionary): reading, sorting and
    # grouping work on integer codes, several times faster than on strings.
    df = pd.read_parquet(data["parquet"], columns=["id", "timestamp", *keys, "quantity", "price"], read_dictionary=keys)
    df["us"] = df["timestamp"].dt.as_unit("us").astype("int64")
    df["cents"] = (df["price"] * 100).round().astype("int64")
    df = df.sort_values([*keys, "us", "id"], ignore_index=True)
    by = df.groupby(keys, sort=False, observed=True)
    gap = by["us"].diff()
    q, q1 = df["quantity"], by["quantity"].shift()
    p, p1 = df["cents"], by["cents"].shift()
    within = gap <= window_us  # NaN (a stream's first trade) compares False
    cluster = (~within).cumsum()  # a new cluster at every trade that does not follow within the window
    score = (
        r["w_time"] * (1 - gap / window_us).clip(lower=0)
        + r["w_size"] * np.minimum(q, q1) / np.maximum(q, q1)
        + r["w_price"] * (1 - (p - p1).abs() / (p1 * r["price_tolerance"])).clip(lower=0)
    )
    dup = within & (score >= r["min_confidence"])
    # Per cluster of two or more trades: its duplicates and their notional.
    member = within | within.shift(-1, fill_value=False)
    per = pd.DataFrame({"cluster": cluster, "dup": dup, "notional": q * p * dup})[member]
    clusters = per.groupby("cluster", sort=False).agg(dups=("dup", "sum"), notional=("notional", "sum"))
    return {
        "rows": len(df), "clusters": len(clusters), "duplicate_bursts": int((clusters["dups"] > 0).sum()),
        "duplicate_trades": int(clusters["dups"].sum()), "phantom_cents": int(clusters["notional"].sum()),
    }


SQLITE_QUERY = """
WITH t AS (
    SELECT id, strategy, symbol, side, quantity AS q, CAST(round(price * 100) AS INTEGER) AS p,
           CAST(round((julianday(timestamp) - 2440587.5) * 86400000.0) AS INTEGER) AS ms
    FROM trades
), g AS (
    SELECT *, ms - lag(ms) OVER w AS gap_prev, lead(ms) OVER w - ms AS gap_next, lag(q) OVER w AS q1, lag(p) OVER w AS p1
    FROM t WINDOW w AS (PARTITION BY strategy, symbol, side ORDER BY ms, id)
), m AS (
    SELECT * FROM g WHERE gap_prev <= :window OR gap_next <= :window
), c AS (
    SELECT *, sum(gap_prev IS NULL OR gap_prev > :window)
                  OVER (PARTITION BY strategy, symbol, side ORDER BY ms, id ROWS UNBOUNDED PRECEDING) AS cl,
           gap_prev <= :window AND :w_time * max(0.0, 1 - gap_prev / CAST(:window AS REAL))
               + :w_size * min(q, q1) * 1.0 / max(q, q1)
               + :w_price * max(0.0, 1 - abs(p - p1) / (p1 * :tolerance)) >= :threshold AS dup
    FROM m
), k AS (
    SELECT count(*) AS orders, sum(dup) AS dups, sum(dup * q * p) AS notional FROM c GROUP BY strategy, symbol, side, cl
)
SELECT (SELECT count(*) FROM trades), count(*), coalesce(sum(dups > 0), 0), coalesce(sum(dups), 0),
       coalesce(sum(notional), 0)
FROM k WHERE orders > 1
"""


def run_sqlite(data: dict[str, Any], r: dict[str, float]) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{data['sqlite']}?mode=ro", uri=True)
    try:
        row = conn.execute(
            SQLITE_QUERY,
            {
                "window": int(r["window_seconds"] * 1000), "w_time": r["w_time"], "w_size": r["w_size"],
                "w_price": r["w_price"], "tolerance": r["price_tolerance"], "threshold": r["min_confidence"],
            },
        ).fetchone()
    finally:
        conn.close()
    names = ("rows", "clusters", "duplicate_bursts", "duplicate_trades", "phantom_cents")
    return {name: int(value) for name, value in zip(names, row, strict=True)}


RUNNERS = {"audit/parquet": run_audit_parquet, "audit/sqlite": run_audit_sqlite, "pandas": run_pandas, "sqlite": run_sqlite}


def child(name: str, data_json: str, out: str) -> None:
    """A contender's process: import what it needs, then time one run and write the figures to ``out``."""
    data = json.loads(data_json)
    r = data["rule"]  # from the parent: the baselines' processes never import orderguard
    if name.startswith("audit/"):
        import duckdb  # noqa: F401  (imported up front: an import is not part of reading the data)

        import orderguard.audit.run  # noqa: F401
    elif name == "pandas":
        import numpy  # noqa: F401
        import pandas  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    ready = rss_kib()
    started = time.perf_counter()
    found = RUNNERS[name](data, r)
    seconds = time.perf_counter() - started
    with open(out, "w", encoding="utf-8") as handle:
        json.dump({"seconds": seconds, "found": found, "rss_ready_kib": ready, "hwm_kib": rss_kib("VmHWM")}, handle)


def setup_child(options_json: str, out: str) -> None:
    """The setup process: versions, the library's rule, and the data set. It runs apart so that the
    parent stays small: a child's ``ru_maxrss`` starts from the parent's peak (the kernel keeps the
    larger of the pre-exec and post-exec peaks), so a parent holding DuckDB's tables would inflate them."""
    options = json.loads(options_json)
    env = environment(options["workdir"])
    data = generate(options["workdir"], options["rows"], options["seed"], options["days"])
    with open(out, "w", encoding="utf-8") as handle:
        json.dump({"environment": env, "rule": rule(), "data": asdict(data), "peak_kib": rss_kib("VmHWM")}, handle)


# --------------------------------------------------------------------------------- runs


@dataclass
class Run:
    name: str
    round: int
    seconds: float  # inside the child: first read of the data to the result
    outer: float  # outside: process start to exit
    cpu: float  # the child's CPU seconds, user + system (imports included)
    peak_kib: int  # ru_maxrss of the child
    ready_kib: int  # the child's RSS after its imports, before reading
    hwm_kib: int  # the child's own VmHWM at the end (a cross-check of peak_kib)
    load: float  # the 1-minute load average when the child started
    found: dict[str, int] = field(default_factory=dict)


def run_process(
    name: str, payload: str, out: str, workdir: str, env: dict[str, str],
) -> tuple[dict[str, Any], float, int, float]:
    """Run this script as ``--child name``; return what it wrote to ``out``, the wall time from start to
    exit, its peak RSS in KiB (``ru_maxrss`` from ``os.wait4``) and its CPU seconds (user + system)."""
    err = os.path.join(workdir, f"stderr-{name.replace('/', '-')}.txt")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--child-data", payload, "--child-out", out]
    if os.path.exists(out):
        os.remove(out)
    with open(err, "wb") as stderr:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=env)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen must not wait again
    if proc.returncode != 0 or not os.path.exists(out):
        with open(err, encoding="utf-8", errors="replace") as handle:
            tail = handle.read()[-4000:]
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{tail}")
    with open(out, encoding="utf-8") as handle:
        return json.load(handle), wall, usage.ru_maxrss, usage.ru_utime + usage.ru_stime


def run_child(name: str, rnd: int, data: Dataset, r: dict[str, float], workdir: str, env: dict[str, str]) -> Run:
    payload = json.dumps({"parquet": data.parquet, "sqlite": data.sqlite, "rule": r})
    out = os.path.join(workdir, f"result-{name.replace('/', '-')}-{rnd}.json")
    load = os.getloadavg()[0]
    doc, outer, peak, cpu = run_process(name, payload, out, workdir, env)
    return Run(name, rnd, doc["seconds"], outer, cpu, peak, doc["rss_ready_kib"], doc["hwm_kib"], load, doc["found"])


def summarize(runs: list[Run], names: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        rs = [r for r in runs if r.name == name]
        out[name] = {
            "best_s": min(r.seconds for r in rs), "median_s": statistics.median(r.seconds for r in rs),
            "outer_median_s": statistics.median(r.outer for r in rs), "cpu_median_s": statistics.median(r.cpu for r in rs),
            "peak_rss_mib": mib(max(r.peak_kib for r in rs)), "own_hwm_mib": mib(max(r.hwm_kib for r in rs)),
            "rss_after_imports_mib": mib(max(r.ready_kib for r in rs)),
            "rounds_s": [round(r.seconds, 3) for r in rs], "found": rs[0].found,
        }
    return out


# --------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000, help="trades in the generated history")
    p.add_argument("--days", type=int, default=1000, help="trading sessions (Mon-Fri) the history spans")
    p.add_argument("--seed", type=int, default=20240101, help="seed of the generated data")
    p.add_argument("--repeat", type=int, default=1, help="runs per contender (order rotates every round)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset of " + ", ".join(CONTENDERS))
    p.add_argument("--dir", default=None, help="directory for the data files (default: a fresh temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the data files (a later run with the same --dir, --rows, "
                   "--days and --seed reuses them)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON document on stdout (the text goes to stderr)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-data", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    if args.rows < 1000 or args.days < 1 or args.repeat < 1:
        p.error("--rows must be at least 1000, --days and --repeat at least 1")
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in args.contenders if c not in CONTENDERS]
    if unknown or not args.contenders:
        p.error(f"unknown contender(s) {unknown}; choose from {', '.join(CONTENDERS)}")
    return args


def environment(workdir: str) -> dict[str, Any]:
    import duckdb
    import numpy
    import pandas
    import pyarrow

    from orderguard import __version__ as orderguard_version

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "command": shlex.join(["python", *sys.argv]),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "duckdb": duckdb.__version__, "pandas": pandas.__version__, "pyarrow": pyarrow.__version__,
        "numpy": numpy.__version__, "sqlite": sqlite3.sqlite_version,
        "orderguard": f"{orderguard_version} at git {git_revision(repo)}",
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "cpus_usable": usable,
        "loadavg": os.getloadavg(), "workdir": workdir,
    }


def main(argv: list[str] | None = None) -> None:
    global JSON_MODE
    args = parse_args(argv)
    if args.child == "setup":
        setup_child(args.child_data, args.child_out)
        return
    if args.child:
        child(args.child, args.child_data, args.child_out)
        return
    JSON_MODE = args.json
    workdir = args.dir or tempfile.mkdtemp(prefix="orderguard-bench-audit-")
    os.makedirs(workdir, exist_ok=True)
    started = time.perf_counter()
    child_env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        say("orderguard audit benchmark: setting up (generating the data in a separate process) ...")
        options = {"workdir": workdir, "rows": args.rows, "seed": args.seed, "days": args.days}
        setup, setup_wall, setup_peak, _cpu = run_process("setup", json.dumps(options), os.path.join(workdir, "setup.json"), workdir, child_env)
        env, r, data = setup["environment"], setup["rule"], Dataset(**setup["data"])
        env["command"] = shlex.join(["python", *sys.argv])
        env["parent_peak_rss_mib"] = round(mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), 1)
        for key in ("command", "python", "duckdb", "pandas", "pyarrow", "numpy", "sqlite", "orderguard", "platform"):
            say(f"{key:<11}: {env[key]}")
        say(f"{'cpus':<11}: nproc={env['cpus_usable']} (cpu_count={env['cpu_count']}); loadavg={env['loadavg']}")
        say(f"{'files in':<11}: {workdir}")
        say(f"{'rule':<11}: window {r['window_seconds']:g} s, score = {r['w_time']}·timing + {r['w_size']}·size + "
            f"{r['w_price']}·price (tolerance {r['price_tolerance']:g}), duplicate at ≥ {r['min_confidence']}")
        if data.reused:
            say(f"{'data':<11}: reused from {workdir} (setup timings are from the run that made it)")
        say(f"{'data':<11}: {data.rows:,} trades over {args.days} sessions, {SYMBOLS} symbols, {len(STRATEGIES)} strategies, "
            f"seed {data.seed}; injected {data.injected_bursts:,} duplicate bursts ({data.injected_repeats:,} repeats, "
            f"{data.injected_repeats / data.rows:.2%} of rows) and {data.scale_ins:,} scale-ins "
            f"({data.scale_in_followups:,} follow-ups)")
        say(f"{'setup':<11}: generate {data.generate_seconds:.1f} s; Parquet {data.parquet_seconds:.1f} s "
            f"({data.parquet_bytes / 2**20:,.0f} MiB); SQLite {data.sqlite_seconds:.1f} s ({data.sqlite_bytes / 2**20:,.0f} MiB)"
            f"; {setup_wall:.1f} s in all, peak {mib(setup_peak):,.0f} MiB (not in any figure below)")
        runs: list[Run] = []
        names = list(args.contenders)
        for rnd in range(args.repeat):
            order = names[rnd % len(names):] + names[: rnd % len(names)]
            for name in order:
                run = run_child(name, rnd, data, r, workdir, child_env)
                runs.append(run)
                say(f"  round {rnd + 1}/{args.repeat} {name:<14} {run.seconds:8.2f} s inside, {run.outer:8.2f} s outside, "
                    f"{run.cpu:8.2f} s CPU, peak {mib(run.peak_kib):,.0f} MiB, {run.found['duplicate_trades']:,} duplicates "
                    f"(load {run.load:.2f} at start)")
        summary = summarize(runs, names)
        verdict = report(summary, names, data, env["parent_peak_rss_mib"])
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not args.keep:
            for name in os.listdir(workdir):
                if name.startswith(("trades.", "result-", "stderr-", "setup.")):
                    os.remove(os.path.join(workdir, name))
    total = time.perf_counter() - started
    say()
    say(f"done in {total:.1f}s; loadavg={os.getloadavg()}")
    if args.json:
        doc = {"environment": env, "rule": r, "data": asdict(data), "contenders": summary, "goal": verdict,
               "runs": [asdict(x) for x in runs], "total_seconds": round(total, 1)}
        print(json.dumps(doc, indent=2, default=str))
    if not verdict["agree"]:
        raise SystemExit(1)


def report(summary: dict[str, dict[str, Any]], names: list[str], data: Dataset, parent_mib: float) -> dict[str, Any]:
    """Print the table and the goal; return the verdict (agreement, goal) for the JSON document."""
    base = summary.get(BASELINE)
    say()
    say("inside = the child's own clock from the first read of the data to the result (imports excluded); "
        "outside = process start to exit; CPU = the child's user + system time (median; imports included)")
    header = (f"{'contender':<14} {'best s':>8} {'median s':>9} {'outside s':>10} {'CPU s':>8} {'peak RSS MiB':>13} "
              f"{'after imports':>14} {'duplicates':>11} {'bursts':>8} {'x pandas':>9}")
    say(header)
    say("-" * len(header))
    for name in names:
        s = summary[name]
        ratio = f"{base['median_s'] / s['median_s']:.1f}" if base else "-"
        s["ratio_vs_pandas"] = round(base["median_s"] / s["median_s"], 2) if base else None
        say(f"{name:<14} {s['best_s']:>8.2f} {s['median_s']:>9.2f} {s['outer_median_s']:>10.2f} {s['cpu_median_s']:>8.2f} "
            f"{s['peak_rss_mib']:>13,.0f} "
            f"{s['rss_after_imports_mib']:>14,.0f} {s['found']['duplicate_trades']:>11,} {s['found']['duplicate_bursts']:>8,} "
            f"{ratio:>9}")
    say("x pandas = pandas median / contender median (higher is faster)")
    say(f"peak RSS = the child's ru_maxrss from os.wait4 (never below this lean parent's own peak, {parent_mib:.0f} MiB); "
        "after imports = its RSS just before reading the data")
    for name in names:
        s = summary[name]
        if abs(s["peak_rss_mib"] - s["own_hwm_mib"]) > max(4.0, 0.05 * s["own_hwm_mib"]):
            say(f"note: {name}: ru_maxrss {s['peak_rss_mib']:,.0f} MiB but the child's own VmHWM {s['own_hwm_mib']:,.0f} MiB")
    # Agreement: every contender must have found the same thing.
    reference = summary[names[0]]["found"]
    agree = all(summary[n]["found"] == reference for n in names)
    say()
    if agree:
        f = reference
        say(f"AGREE       all {len(names)} contenders: {f['rows']:,} rows, {f['clusters']:,} clusters, "
            f"{f['duplicate_bursts']:,} duplicate bursts, {f['duplicate_trades']:,} duplicate trades, "
            f"phantom notional {f['phantom_cents'] / 100:,.2f}")
        say(f"            injected: {data.injected_bursts:,} bursts, {data.injected_repeats:,} repeats; the rest of "
            "what is found is background trades that happen to meet the rule")
    else:
        say("DISAGREE    the contenders found different things:")
        for name in names:
            say(f"  {name:<14} " + ", ".join(f"{k}={summary[name]['found'][k]:,}" for k in AGREE_ON))
    verdict: dict[str, Any] = {"agree": agree}
    if HEADLINE in summary:
        h = summary[HEADLINE]
        fast = h["median_s"] < GOAL_SECONDS
        verdict.update({"headline": HEADLINE, "headline_median_s": round(h["median_s"], 3), "under_5s": fast})
        line = f"GOAL        {HEADLINE} on {data.rows:,} trades: median {h['median_s']:.2f} s (< {GOAL_SECONDS:g} s: {'met' if fast else 'NOT MET'})"
        if base:
            ratio = base["median_s"] / h["median_s"]
            enough = ratio >= GOAL_RATIO
            verdict.update({"ratio_vs_pandas": round(ratio, 2), "ratio_met": enough})
            line += f"; {ratio:.1f}x pandas (≥ {GOAL_RATIO:g}x: {'met' if enough else 'NOT MET'})"
            verdict["met"] = fast and enough and agree
            line += f"  =>  goal {'MET' if fast and enough and agree else 'NOT MET'}"
            if not agree:
                line += " (the contenders disagree, so no figure counts)"
        else:
            verdict["met"] = None
            line += "; no pandas run, so the ratio part of the goal is not checked"
        if data.rows != 10_000_000:
            line += f"  (the goal is stated for 10,000,000 trades; this run has {data.rows:,})"
        say(line)
    return verdict


if __name__ == "__main__":
    main()
