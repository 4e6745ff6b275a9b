"""Benchmark: POST /v1/intents through the HTTP gateway against a bare endpoint of the same
framework doing only the raw SQLite insert, measured in one run.

Run from the repository root::

    python bench/bench_gateway.py              # defaults finish in about 45 s
    python bench/bench_gateway.py --help

Two servers, each uvicorn in its own subprocess (one worker, 127.0.0.1, ``log_level=warning``),
each over SQLite files in one temporary directory with the same pragmas (WAL, ``synchronous``,
``busy_timeout`` 5 s):

* ``raw``: a FastAPI app with one sync route, ``POST /raw``. The body is parsed into a small
  pydantic model with the intent's five fields, then ``BEGIN IMMEDIATE; INSERT INTO claims(key,
  holder, at) VALUES (?, ?, ?) ON CONFLICT(key) DO NOTHING; COMMIT`` (one connection per worker
  thread), and a 201 with the row id.
* ``gateway``: ``orderguard serve`` itself (``orderguard.server.run.serve`` on a TOML config
  written by the benchmark: the default policy ``OncePer(CalendarDay("UTC"))``, a paper venue
  file (``ack_latency`` 0, orders fill at once), ``store_options = { synchronous = ..., busy_timeout
  = 5 }``): token check, IntentIn and OrderIntent validation, claim -> send -> record, metrics,
  the event hub polling the ledger every 0.25 s, the runner's heartbeat.

``--modes NORMAL,FULL`` measures both pragmas (``orderguard serve`` uses FULL unless
``store_options`` says otherwise); ``--http``/``--loop`` pick uvicorn's HTTP parser and event loop
for both servers (``auto``: httptools and uvloop when installed, else h11 and asyncio).

The load generator runs in this process: asyncio, ``--connections`` (default 1 and 16) keep-alive
HTTP/1.1 connections on loopback, each sending its next request as soon as the previous answer is in
(closed loop), every request a distinct intent (its own symbol), bodies and headers built in
advance. It is a minimal client on asyncio streams (no HTTP library) so its own CPU cost stays
small; it still shares the machine's cores with the server. Each round runs ``--seconds`` after
``--warmup`` untimed requests; rounds alternate raw/gateway order. Reported per server:
intents/s (2xx answers per second of wall time), p50/p99 latency of one request (send to the
last byte of the answer), non-2xx answers, and the server's CPU time per request. After the run
the venue's order count is checked against the gateway's 201 answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from _common import git_revision, percentile
from pydantic import BaseModel, StrictInt, StrictStr

GOAL = 1500.0  # intents/s on 2 cores with SQLite, from the issue
TOKEN = "bench-" + "x" * 40
RAW_SCHEMA = "CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, holder TEXT NOT NULL, at REAL NOT NULL)"
RAW_INSERT = "INSERT INTO claims(key, holder, at) VALUES (?, ?, ?) ON CONFLICT(key) DO NOTHING"
BUSY_TIMEOUT = 5.0


# --------------------------------------------------------------------------- the servers


def raw_connect(path: str, synchronous: str) -> sqlite3.Connection:
    """The baseline's connection: the pragmas orderguard's ledger uses."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
    if str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower() != "wal":
        raise SystemExit(f"{path}: cannot use WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute(RAW_SCHEMA)
    return conn


class RawIn(BaseModel):
    """The raw endpoint's body: the intent's five fields, parsed by the framework, nothing checked."""

    account: StrictStr
    strategy: StrictStr
    symbol: StrictStr
    side: StrictStr
    quantity: StrictStr | StrictInt


def raw_app(path: str, synchronous: str) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    raw_connect(path, synchronous).close()  # the schema, before any request
    local = threading.local()
    app = FastAPI()

    @app.post("/raw", status_code=201)
    def insert(body: RawIn) -> JSONResponse:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = raw_connect(path, synchronous)
        conn.execute("BEGIN IMMEDIATE")
        cursor = conn.execute(RAW_INSERT, (f"{body.account}|{body.strategy}|{body.symbol}|{body.side}", "bench", time.time()))
        conn.execute("COMMIT")
        return JSONResponse(status_code=201, content={"id": cursor.lastrowid})

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    return app


GATEWAY_CONFIG = """\
store = "sqlite:///{ledger}"
broker = "paper://{paper}"
bind = "127.0.0.1:{port}"
token_file = "{token_file}"
store_options = {{ synchronous = "{synchronous}", busy_timeout = {busy_timeout} }}
"""


def serve(kind: str, workdir: str, port: int, synchronous: str, http: str, loop: str) -> None:
    """Server mode (a subprocess of the benchmark): run one app under uvicorn until SIGINT."""
    import uvicorn

    if kind == "raw":
        app = raw_app(os.path.join(workdir, f"raw-{synchronous.lower()}.db"), synchronous)
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, workers=1, http=http, loop=loop)
        return
    # The gateway: `orderguard serve --config FILE` itself, on a config written here.
    from orderguard.brokers import PaperBroker
    from orderguard.server import run as server_run

    tag = synchronous.lower()
    paper = os.path.join(workdir, f"paper-{tag}.db")
    PaperBroker.open(f"sqlite:///{paper}").close()  # serve opens an existing venue only (ack_latency 0)
    token_file = os.path.join(workdir, f"gateway-{tag}.token")
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(TOKEN + "\n")
    config = os.path.join(workdir, f"gateway-{tag}.toml")
    with open(config, "w") as out:
        out.write(GATEWAY_CONFIG.format(
            ledger=os.path.join(workdir, f"ledger-{tag}.db"), paper=paper, port=port, token_file=token_file,
            synchronous=synchronous, busy_timeout=BUSY_TIMEOUT,
        ))
    if (http, loop) != ("auto", "auto"):  # serve() runs uvicorn with its defaults: pass the same choices as raw's
        real_run = uvicorn.run
        uvicorn.run = lambda app, **kw: real_run(app, **{**kw, "http": http, "loop": loop})
    server_run.serve(config, echo=lambda line: None)


@dataclass
class Server:
    kind: str
    synchronous: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.synchronous}"

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        with open(f"/proc/{self.proc.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(kind: str, workdir: str, synchronous: str, args: argparse.Namespace) -> Server:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve", kind, "--dir", workdir, "--port", str(port),
         "--serve-sync", synchronous, "--http", args.http, "--loop", args.loop],
        stdout=subprocess.DEVNULL,
    )
    server = Server(kind, synchronous, port, proc)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{server.name} server exited with {proc.returncode}")
        try:
            status, _ = asyncio.run(request_once(port, b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"))
            if status == 200:
                return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise SystemExit(f"{server.name} server did not answer /healthz")
        time.sleep(0.1)


# ---------------------------------------------------------------------- load generator


async def read_response(reader: asyncio.StreamReader) -> int:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed by the server")
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return int(status_line[9:12])


async def request_once(port: int, request: bytes) -> tuple[int, None]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await read_response(reader), None
    finally:
        writer.close()


def build_requests(server: Server, prefix: str, count: int) -> list[bytes]:
    """``count`` POST requests, each a distinct intent (its own symbol)."""
    path = b"/raw" if server.kind == "raw" else b"/v1/intents"
    head = (b"POST " + path + b" HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: ")
    out = []
    for i in range(count):
        body = json.dumps({"account": "bench", "strategy": "bench", "symbol": f"{prefix}{i:07d}", "side": "BUY",
                           "quantity": "1"}).encode()
        out.append(head + str(len(body)).encode() + b"\r\n\r\n" + body)
    return out


@dataclass
class Round:
    server: str
    seconds: float
    ok: int
    warm_ok: int
    errors: dict[int, int]
    latencies_ns: list[int]
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.ok / self.seconds


async def drive(port: int, requests: list[bytes], connections: int, seconds: float | None) -> tuple[float, list[int], dict[int, int]]:
    """Closed loop over ``connections`` connections until ``requests`` run out or ``seconds`` pass."""
    latencies: list[int] = []
    statuses: dict[int, int] = {}
    it = iter(requests)
    clock = time.perf_counter_ns
    stop_at = None if seconds is None else time.perf_counter() + seconds
    exhausted = False

    async def worker() -> None:
        nonlocal exhausted
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while stop_at is None or time.perf_counter() < stop_at:
                request = next(it, None)
                if request is None:
                    exhausted = True
                    return
                t0 = clock()
                writer.write(request)
                status = await read_response(reader)
                latencies.append(clock() - t0)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    if exhausted and seconds is not None:
        print(f"    WARNING: ran out of prepared requests after {elapsed:.1f}s; raise --max-rate")
    return elapsed, latencies, statuses


def run_round(server: Server, prefix: str, connections: int, args: argparse.Namespace) -> Round:
    warm = build_requests(server, prefix + "W", args.warmup)
    timed = build_requests(server, prefix + "T", int(args.max_rate * args.seconds))
    _, _, warm_statuses = asyncio.run(drive(server.port, warm, connections, None))
    cpu0 = server.cpu_seconds()
    elapsed, latencies, statuses = asyncio.run(drive(server.port, timed, connections, args.seconds))
    cpu = server.cpu_seconds() - cpu0
    ok = sum(n for s, n in statuses.items() if 200 <= s < 300)
    warm_ok = sum(n for s, n in warm_statuses.items() if 200 <= s < 300)
    return Round(server.name, elapsed, ok, warm_ok, {s: n for s, n in statuses.items() if not 200 <= s < 300}, latencies, cpu)


# ------------------------------------------------------------------------------ report


@dataclass
class Summary:
    name: str
    rate: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: dict[int, int] = field(default_factory=dict)
    cpu_us: float = 0.0
    rounds: list[float] = field(default_factory=list)


def summarize(name: str, rounds: list[Round]) -> Summary:
    lat = sorted(x / 1e6 for r in rounds for x in r.latencies_ns)
    ok = sum(r.ok for r in rounds)
    wall = sum(r.seconds for r in rounds)
    errors: dict[int, int] = {}
    for r in rounds:
        for s, n in r.errors.items():
            errors[s] = errors.get(s, 0) + n
    total = ok + sum(errors.values())
    cpu = sum(r.cpu_seconds for r in rounds)
    return Summary(name, ok / wall, percentile(lat, 50), percentile(lat, 99), total, errors,
                   cpu / total * 1e6 if total else float("nan"), [r.rate for r in rounds])


def venue_orders(workdir: str, synchronous: str) -> int:
    conn = sqlite3.connect(os.path.join(workdir, f"paper-{synchronous.lower()}.db"))
    try:
        return int(conn.execute("SELECT count(*) FROM orders").fetchone()[0])
    finally:
        conn.close()


def resolved(choice: str, fast: str, fallback: str) -> str:
    """What uvicorn's ``auto`` picks: the C implementation when it is importable."""
    if choice != "auto":
        return choice
    import importlib.util

    return fast if importlib.util.find_spec(fast) is not None else f"{fallback} ({fast} not installed)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seconds", type=float, default=4.0, help="timed seconds per round, server and connection count")
    p.add_argument("--rounds", type=int, default=2, help="rounds per server (the raw/gateway order alternates)")
    p.add_argument("--warmup", type=int, default=300, help="untimed requests before each round")
    p.add_argument("--connections", default="1,16", help="concurrent keep-alive connections of the load generator, comma-separated")
    p.add_argument("--modes", default="NORMAL", help="synchronous modes, comma-separated (NORMAL, FULL)")
    p.add_argument("--max-rate", type=float, default=12000.0, help="requests prepared per timed second (an upper bound)")
    p.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto",
                   help="uvicorn's HTTP parser for both servers (auto: httptools when installed, else h11)")
    p.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                   help="uvicorn's event loop for both servers (auto: uvloop when installed, else asyncio)")
    p.add_argument("--dir", default=None, help="directory for the database files (default: a new temporary one, removed)")
    p.add_argument("--serve", choices=["raw", "gateway"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--serve-sync", default="NORMAL", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.dir, args.port, args.serve_sync, args.http, args.loop)
        return
    modes = [m.strip().upper() for m in args.modes.split(",") if m.strip()]
    try:
        levels = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        levels = []
    if any(m not in ("NORMAL", "FULL") for m in modes) or args.rounds < 1 or not levels or min(levels) < 1:
        p.error("bad --modes, --rounds or --connections")

    import fastapi
    import uvicorn

    from orderguard import __version__

    workdir = args.dir or tempfile.mkdtemp(prefix="orderguard-bench-gw-")
    os.makedirs(workdir, exist_ok=True)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 0
    started = time.perf_counter()
    print("orderguard gateway benchmark: POST /v1/intents vs a bare FastAPI insert endpoint")
    print(f"command     : {shlex.join(['python', *sys.argv])}")
    print(f"python      : {platform.python_implementation()} {platform.python_version()}; sqlite {sqlite3.sqlite_version}")
    print(f"frameworks  : fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__} (1 worker each, 127.0.0.1); "
          f"HTTP parser {resolved(args.http, 'httptools', 'h11')}, event loop {resolved(args.loop, 'uvloop', 'asyncio')}")
    print(f"orderguard  : {__version__} at git {git_revision()}")
    print(f"platform    : {platform.platform()}; cpu_count={os.cpu_count()} usable={cpus}; loadavg={os.getloadavg()}")
    print(f"load        : {', '.join(map(str, levels))} keep-alive connection(s), closed loop, distinct intents; "
          f"{args.rounds} round(s) x {args.seconds:g}s per server after {args.warmup} warm-up requests")
    print(f"files in    : {workdir}")
    summaries: dict[tuple[str, str, int], Summary] = {}
    checks: list[str] = []
    try:
        for mode in modes:
            servers = {kind: start(kind, workdir, mode, args) for kind in ("raw", "gateway")}
            created = 0
            try:
                for conns in levels:
                    rounds: dict[str, list[Round]] = {"raw": [], "gateway": []}
                    for rnd in range(args.rounds):
                        order = ("raw", "gateway") if rnd % 2 == 0 else ("gateway", "raw")
                        for kind in order:
                            r = run_round(servers[kind], f"C{conns}R{rnd}", conns, args)
                            rounds[kind].append(r)
                            print(f"  {mode:<6} c={conns:<3} round {rnd} {kind:<8} {r.rate:>8,.0f}/s  ({r.ok} in "
                                  f"{r.seconds:.2f}s{', errors ' + str(r.errors) if r.errors else ''})")
                    created += sum(r.ok + r.warm_ok for r in rounds["gateway"])
                    for kind in ("raw", "gateway"):
                        summaries[(kind, mode, conns)] = summarize(f"{kind}/{mode}/c={conns}", rounds[kind])
                orders = venue_orders(workdir, mode)
                checks.append(f"{mode}: the venue holds {orders} orders for {created} gateway 2xx answers "
                              f"({'ok' if orders == created else 'MISMATCH'})")
            finally:
                for server in servers.values():
                    server.stop()
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    header = (f"{'server':<22} {'requests':>9} {'intents/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU µs/req':>11} "
              f"{'non-2xx':>8}  rounds (intents/s)")
    print(header)
    print("-" * len(header))
    for s in summaries.values():
        errors = sum(s.errors.values())
        print(f"{s.name:<22} {s.requests:>9} {s.rate:>10,.0f} {s.p50_ms:>8.2f} {s.p99_ms:>8.2f} {s.cpu_us:>11,.0f} "
              f"{errors:>8}  {', '.join(f'{x:,.0f}' for x in s.rounds)}")
    print("CPU µs/req: user+system time of the server process per answered request (the load generator not included)")
    print()
    for mode in modes:
        for conns in levels:
            raw, gw = summaries[("raw", mode, conns)], summaries[("gateway", mode, conns)]
            print(f"ratio   {mode}/c={conns}: gateway/raw throughput {gw.rate / raw.rate:.2f} (raw {raw.rate / gw.rate:.1f}x faster), "
                  f"p50 {gw.p50_ms / raw.p50_ms:.2f}x, p99 {gw.p99_ms / raw.p99_ms:.2f}x, server CPU per request "
                  f"{gw.cpu_us / raw.cpu_us:.2f}x")
    for line in checks:
        print("check   " + line)
    best = max(summaries[("gateway", mode, c)].rate for mode in modes for c in levels)
    print(f"goal    ≥{GOAL:,.0f} intents/s on 2 cores with SQLite: best gateway rate here {best:,.0f}/s -> "
          f"{'MET' if best >= GOAL else 'NOT MET'} ({cpus} usable CPUs; the load generator runs on the same cores)")
    print(f"\ndone in {time.perf_counter() - started:.1f}s; loadavg={os.getloadavg()}")


if __name__ == "__main__":
    main()
