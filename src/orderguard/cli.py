"""The ``orderguard`` command line (typer + rich).

Operator commands read the ledger chosen by ``--store`` / ``ORDERGUARD_STORE`` / ``./orderguard.db``
and never create it (only ``migrate`` does). Exit statuses: 0 done (and, for ``reconcile``,
clean); 1 ``reconcile`` left something unresolved or found drift, or ``show`` found no such
intent; 2 usage or configuration (bad option, store URL or broker spec); 3 the ledger is missing,
locked, of another schema or unreadable. Failures are one line on stderr, never a traceback.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from . import __version__
from .cli_errors import EXIT_NOT_CLEAN, EXIT_OK, EXIT_USAGE, CliFailure, reported
from .cli_parse import SINCE_HELP, parse_since
from .cli_store import DEFAULT_BUSY_TIMEOUT, ENV_VAR, StoreChoice, choose_store, ledger_exists, open_ledger
from .states import State  # noqa: TC001 (typer reads the annotations at runtime)
from .store.base import SCHEMA_VERSION, BlockReason

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .store.base import Store

app = typer.Typer(help="orderguard: send each order intent at most once.", no_args_is_help=True)
console = Console(width=None if Console().is_terminal else 140)

StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store", metavar="URL", show_default=False,
        help=f"Ledger: sqlite:///path.db or a path. Else ${ENV_VAR}, else ./orderguard.db.",
    ),
]
BusyOpt = Annotated[
    float | None,
    typer.Option(
        "--busy-timeout", metavar="SECONDS", min=0.001, show_default=False,
        help=f"How long to wait for a ledger locked by another process (default {DEFAULT_BUSY_TIMEOUT:g}).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output (Decimal as strings, times ISO 8601 UTC).")]
SinceOpt = Annotated[str | None, typer.Option("--since", metavar="T", help=SINCE_HELP, show_default=False)]
LimitOpt = Annotated[int, typer.Option("--limit", metavar="N", min=1, help="At most N rows, newest first.")]


@dataclass(frozen=True)
class _Globals:
    store: str | None = None
    busy_timeout: float | None = None


@app.callback()
def _global_options(ctx: typer.Context, store: StoreOpt = None, busy_timeout: BusyOpt = None) -> None:
    # Options before the command (``orderguard --store x status``); the command's own win.
    ctx.obj = _Globals(store, busy_timeout)


def _choice(ctx: typer.Context, store: str | None, busy_timeout: float | None) -> StoreChoice:
    g = ctx.obj if isinstance(ctx.obj, _Globals) else _Globals()
    timeout = busy_timeout if busy_timeout is not None else g.busy_timeout
    return choose_store(store, g.store, DEFAULT_BUSY_TIMEOUT if timeout is None else timeout)


@contextmanager
def _ledger(choice: StoreChoice) -> Iterator[Store]:
    """The existing ledger (never created), closed afterwards; failures become one stderr line."""
    with reported(choice.origin):
        store = open_ledger(choice, create=False)
        try:
            yield store
        finally:
            store.close()


def _emit_json(document: dict[str, object]) -> None:
    from .cli_json import dumps

    typer.echo(dumps(document))


@app.command()
def version() -> None:
    """Print the orderguard version."""
    console.print(__version__)


@app.command()
def demo(
    scenario: Annotated[int | None, typer.Option(help="Run only scenario N.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show every blocked attempt's log line.")] = False,
) -> None:
    """Run duplicate-order scenarios unguarded and through orderguard (SQLite + paper venue)."""
    from .demo import main as demo_main

    raise typer.Exit(demo_main(scenario=scenario, as_json=as_json, verbose=verbose, console=console))


# ---------------------------------------------------------------------------- operator


@app.command()
def status(
    ctx: typer.Context,
    since: Annotated[str, typer.Option("--since", metavar="T", help="Blocked attempts since T. " + SINCE_HELP)] = "1h",
    rows: Annotated[int, typer.Option("--rows", metavar="N", min=1, help="Blocked attempts shown per strategy (all in --json).")] = 10,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    busy_timeout: BusyOpt = None,
) -> None:
    """Trading halts (who halted what, when, why), in-flight and UNKNOWN intents, recent blocks."""
    from .cli_render import make_console, render_status
    from .cli_status import collect_status

    start = parse_since(since, time.time())
    choice = _choice(ctx, store, busy_timeout)
    with _ledger(choice) as ledger:
        view = collect_status(ledger, choice.where, start)
        halts, history = ledger.halts(), ledger.halt_history(limit=rows)
    if as_json:
        _emit_json({**view.to_json(), "halts": halts, "halt_history": history})
        return
    from .cli_control import halts_table, history_table

    console_ = make_console()
    if halts:
        console_.print(halts_table(halts, view.now))
    render_status(console_, view, rows)
    if history:
        console_.print(history_table(history))


@app.command()
def intents(
    ctx: typer.Context,
    state: Annotated[
        list[State] | None,
        typer.Option("--state", metavar="S", case_sensitive=False, help="Only intents in state S (repeatable).", show_default=False),
    ] = None,
    strategy: Annotated[str | None, typer.Option("--strategy", metavar="X", help="Only strategy X.", show_default=False)] = None,
    since: SinceOpt = None,
    limit: LimitOpt = 100,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    busy_timeout: BusyOpt = None,
) -> None:
    """Intents, newest first."""
    from .cli_render import make_console, render_intents

    start = None if since is None else parse_since(since, time.time())
    choice = _choice(ctx, store, busy_timeout)
    with _ledger(choice) as ledger:
        records = ledger.intents(states=state or None, strategy=strategy, since=start, limit=limit)
    if as_json:
        _emit_json({"ledger": choice.where, "intents": records})
    else:
        render_intents(make_console(), choice.where, records, limit)


@app.command()
def show(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="ID|CLIENT_ORDER_ID", help="Intent id or client order id.")],
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    busy_timeout: BusyOpt = None,
) -> None:
    """One intent in full: its record, the attempt that claimed it, every attempt it blocked."""
    from .cli_render import make_console, render_show

    choice = _choice(ctx, store, busy_timeout)
    with _ledger(choice) as ledger:
        record = ledger.get(ref.strip())
        claimed = next(iter(ledger.attempts(intent_id=record.id, limit=1)), None)
        collisions = ledger.attempts(holder_id=record.id, limit=1_000_000)
    if as_json:
        _emit_json({"ledger": choice.where, "intent": record, "claimed_attempt": claimed, "collisions": collisions})
    else:
        render_show(make_console(), record, claimed, collisions)


@app.command()
def attempts(
    ctx: typer.Context,
    blocked: Annotated[
        bool | None,
        typer.Option("--blocked/--claimed", help="Only blocked, or only claimed, attempts (default: both).", show_default=False),
    ] = None,
    reason: Annotated[
        BlockReason | None,
        typer.Option("--reason", metavar="R", case_sensitive=False, help="Only attempts blocked for reason R.", show_default=False),
    ] = None,
    since: SinceOpt = None,
    limit: LimitOpt = 100,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    busy_timeout: BusyOpt = None,
) -> None:
    """Attempts, allowed and blocked, newest first."""
    from .cli_render import make_console, render_attempts

    if reason is not None and blocked is False:
        raise typer.BadParameter("a claimed attempt has no block reason", param_hint="--reason")
    start = None if since is None else parse_since(since, time.time())
    choice = _choice(ctx, store, busy_timeout)
    with _ledger(choice) as ledger:
        records = ledger.attempts(blocked=True if reason else blocked, reason=reason, since=start, limit=limit)
    if as_json:
        _emit_json({"ledger": choice.where, "attempts": records})
    else:
        render_attempts(make_console(), choice.where, records, limit)


class _Warnings(logging.Handler):
    """Collects what the library warns about during one reconcile run."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@app.command()
def reconcile(
    ctx: typer.Context,
    broker: Annotated[
        str,
        typer.Option("--broker", metavar="SPEC", help="The venue to look orders up at, e.g. paper:///abs/path/paper.db.", show_default=False),
    ],
    grace: Annotated[
        float | None,
        typer.Option("--grace", metavar="S", min=0, help="Seconds between the two lookups that prove 'not found' (default: the venue's lookup lag allowance).", show_default=False),
    ] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Do not sleep out the grace: record first misses, decide them in a later run.")] = False,
    no_halt: Annotated[bool, typer.Option("--no-halt", help="Report drift without halting the drifting account and symbol.")] = False,
    alert: Annotated[
        list[str] | None,
        typer.Option("--alert", metavar="URL", help="Send DRIFT/HALTED alerts here (log://, http(s):// webhook, or an Apprise URL; repeatable).", show_default=False),
    ] = None,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    busy_timeout: BusyOpt = None,
) -> None:
    """Resolve CLAIMED/SENDING/UNKNOWN (and bring ACKED/PARTIALLY_FILLED up to date) by asking the venue.

    Position drift halts the drifting account and symbol (cause DRIFT) unless --no-halt.
    Exit status 0 when nothing is left unresolved and ledger and venue positions agree, else 1.
    """
    from .alerts import Notifier
    from .brokers.spec import close_broker, open_broker
    from .cli_render import make_console, render_reconcile
    from .guard import Guard

    choice = _choice(ctx, store, busy_timeout)
    collected = _Warnings()
    logger = logging.getLogger("orderguard")
    with reported(choice.origin):
        notifier = Notifier(alert) if alert else None
        venue = open_broker(broker)
        try:
            with _ledger(choice) as ledger:
                logger.addHandler(collected)
                try:
                    guard = Guard(ledger, runner="orderguard-reconcile", register=False, alerts=notifier)
                    report = guard.reconcile(venue, grace=grace, wait=not no_wait, halt_on_drift=not no_halt)
                finally:
                    logger.removeHandler(collected)
        finally:
            close_broker(venue)
            if notifier is not None:
                notifier.close()
    if as_json:
        _emit_json({
            "ledger": choice.where, "broker": broker, "clean": report.clean, "decisions": report.decisions,
            "unresolved": report.unresolved, "drift": [{**vars(x), "difference": x.difference} for x in report.drift],
            "halts": report.halts, "warnings": collected.lines,
        })
    else:
        render_reconcile(make_console(), choice.where, broker, report, collected.lines)
    raise typer.Exit(EXIT_OK if report.clean else EXIT_NOT_CLEAN)


ScopeArg = Annotated[
    str,
    typer.Argument(
        metavar="SCOPE",
        help="'global', or field=value pairs joined by ',': strategy=spx, account=main, account=main,symbol=SPX.",
    ),
]
ReasonOpt = Annotated[str, typer.Option("--reason", metavar="TEXT", help="Why (recorded and shown to the next operator).")]
ByOpt = Annotated[str | None, typer.Option("--by", metavar="NAME", help="Who (default: operator USER@HOST).", show_default=False)]


@app.command()
def halt(
    ctx: typer.Context,
    scope: ScopeArg,
    reason: ReasonOpt,
    reducing: Annotated[bool, typer.Option("--reducing", help="Allow orders that shrink a position (REDUCING) instead of nothing (HALTED).")] = False,
    by: ByOpt = None,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    busy_timeout: BusyOpt = None,
) -> None:
    """Kill switch: stop new orders in SCOPE for every runner on every host, at their next claim."""
    _set_state(ctx, scope, "REDUCING" if reducing else "HALTED", reason, by, as_json, store, busy_timeout)


@app.command()
def resume(
    ctx: typer.Context,
    scope: ScopeArg,
    reason: ReasonOpt,
    by: ByOpt = None,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    busy_timeout: BusyOpt = None,
) -> None:
    """Set SCOPE back to ACTIVE after a halt (manual or automatic)."""
    _set_state(ctx, scope, "ACTIVE", reason, by, as_json, store, busy_timeout)


def _set_state(
    ctx: typer.Context, scope: str, state: str, reason: str, by: str | None, as_json: bool,
    store: str | None, busy_timeout: float | None,
) -> None:
    from .cli_control import operator_name, unmatched_note
    from .cli_render import when
    from .errors import InvalidPolicy
    from .halts import HaltCause, TradingState
    from .policies import canonical_halt_scope, parse_halt_scope

    with reported():
        if not reason.strip():
            raise CliFailure(EXIT_USAGE, "--reason must say why (it is what the next operator reads)")
        try:
            canonical = canonical_halt_scope(scope)
        except InvalidPolicy as exc:
            raise CliFailure(EXIT_USAGE, f"bad scope {scope!r}: {exc}") from None
    choice = _choice(ctx, store, busy_timeout)
    actor = operator_name(by)
    with _ledger(choice) as ledger:
        before = next((h for h in ledger.halts() if h.scope == canonical), None)
        if state == "ACTIVE" and before is None:
            covering = ", ".join(h.scope for h in ledger.halts()) or "none"
            with reported():
                raise CliFailure(EXIT_NOT_CLEAN, f"{canonical} is not halted (halted scopes: {covering}); nothing changed")
        record = ledger.set_trading_state(
            canonical, TradingState(state), cause=HaltCause.OPERATOR, reason=reason, actor=actor
        )
        mine = set(parse_halt_scope(canonical))
        still = [h for h in ledger.halts() if h.scope != canonical and set(parse_halt_scope(h.scope)) <= mine]
        note = unmatched_note(canonical, ledger) if record is not None else None
    if as_json:
        _emit_json({
            "ledger": choice.where, "scope": canonical, "state": state, "before": before, "halt": record,
            "still_covered_by": still, "note": note,
        })
        return
    was = f" (was {before.state.value} since {when(before.at)}, {before.cause.value} by {before.actor}: {before.reason})" if before else ""
    if record is None:
        typer.echo(f"{canonical} is ACTIVE again{was}")
    else:
        typer.echo(f"{canonical} is {state} for every runner at its next claim ({actor}: {reason.strip()}){was}")
    for h in still:
        typer.echo(f"note: {canonical} is still covered by {h.scope}, {h.state.value} ({h.cause.value} by {h.actor}: {h.reason})")
    if note:
        typer.echo(note)


@app.command()
def runners(
    ctx: typer.Context,
    stopped: Annotated[str, typer.Option("--stopped", metavar="T", help="Also runners stopped since T. " + SINCE_HELP)] = "1h",
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    busy_timeout: BusyOpt = None,
) -> None:
    """Registered runners: code fingerprint, git commit, heartbeat; flags STALE and MIXED_VERSIONS.

    Exit 1 when a runner is flagged (a killed or frozen runner, or an old runner left alive
    after a deploy), so a cron job or health check can alert on it.
    """
    from .cli_control import collect_runners, render_runners
    from .cli_render import make_console

    now = time.time()
    start = parse_since(stopped, now)
    choice = _choice(ctx, store, busy_timeout)
    with _ledger(choice) as ledger:
        view = collect_runners(ledger, choice.where, max(0.0, now - start))
    if as_json:
        _emit_json(view.to_json())
    else:
        render_runners(make_console(), view)
    raise typer.Exit(EXIT_NOT_CLEAN if view.flags else EXIT_OK)


@app.command()
def serve(
    config: Annotated[str, typer.Option("--config", metavar="FILE", help="The gateway's TOML config (store, broker, policies, alerts, bind).")],
    bind: Annotated[str | None, typer.Option("--bind", metavar="HOST:PORT", help="Override the config's bind address.", show_default=False)] = None,
) -> None:
    """Run the HTTP gateway and live dashboard (orderguard[server]).

    The bearer token for mutating routes is generated on first start into the config's
    token_file (mode 0600) and shown once.
    """
    with reported("--config"):
        try:
            from .server.run import serve as run_server
        except ImportError as exc:
            raise CliFailure(EXIT_USAGE, f"the gateway needs its extra: pip install 'orderguard[server]' ({exc.name} missing)") from None
        run_server(config, bind=bind, echo=typer.echo)


@app.command()
def migrate(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option("--force", help="Upgrade even if processes that used the old schema still run on this host.")] = False,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    busy_timeout: BusyOpt = None,
) -> None:
    """Create the ledger's schema if missing, upgrade an older one, report its version. Safe to run twice.

    Upgrading from schema 1 is refused while a process on this host that claimed through the
    ledger this week still runs (its orderguard would ignore halts): stop it, or --force.
    """
    choice = _choice(ctx, store, busy_timeout)
    with reported(choice.origin):
        # An existing file is only opened, never written into: a file that is not a ledger is refused.
        created = not ledger_exists(choice)
        folder = os.path.dirname(choice.path or "") or None
        if created and folder and not os.path.isdir(folder):
            raise CliFailure(EXIT_USAGE, f"cannot create ledger {choice.where}: folder {folder} does not exist (nothing was created)")
        if choice.path is None:  # a server store: creating only what is missing is idempotent
            ledger = open_ledger(choice, create=True, upgrade=True, force=force)
            created = bool(getattr(ledger, "created", False))
        else:
            ledger = open_ledger(choice, create=created, upgrade=True, force=force)
        upgraded_from = getattr(ledger, "upgraded_from", None)
        ledger.close()
    if as_json:
        _emit_json({
            "ledger": choice.where, "created": created, "upgraded_from": upgraded_from, "schema_version": SCHEMA_VERSION,
        })
    elif created:
        typer.echo(f"created ledger {choice.where} (schema version {SCHEMA_VERSION})")
    elif upgraded_from is not None:
        typer.echo(f"upgraded ledger {choice.where} from schema version {upgraded_from} to {SCHEMA_VERSION} (tables added, nothing else changed)")
    else:
        typer.echo(f"ledger {choice.where} already at schema version {SCHEMA_VERSION}; nothing changed")


@app.command()
def audit(
    source: Annotated[str, typer.Argument(metavar="SOURCE", help="SQLite file, postgresql:// URL, or a CSV/Parquet file.")],
    table: Annotated[str | None, typer.Option("--table", metavar="NAME", help="Trades table of a database (default: trades/fills/executions/orders).", show_default=False)] = None,
    time_col: Annotated[str | None, typer.Option("--time", metavar="COLUMN", help="Time column (found by name: timestamp, time, created_at, ...).", show_default=False)] = None,
    symbol: Annotated[str | None, typer.Option("--symbol", metavar="COLUMN", show_default=False, help="Symbol column.")] = None,
    side: Annotated[str | None, typer.Option("--side", metavar="COLUMN", show_default=False, help="Side column (buy/sell, b/s, long/short).")] = None,
    qty: Annotated[str | None, typer.Option("--qty", metavar="COLUMN", show_default=False, help="Quantity column.")] = None,
    price: Annotated[str | None, typer.Option("--price", metavar="COLUMN", show_default=False, help="Price column.")] = None,
    id_col: Annotated[str | None, typer.Option("--id", metavar="COLUMN", show_default=False, help="Row key (primary key); SQLite's rowid if none.")] = None,
    scope: Annotated[list[str] | None, typer.Option("--scope", metavar="COLUMN", show_default=False, help="Columns splitting the history into independent streams (repeat; default: account/bot/strategy/expert columns present).")] = None,
    no_scope: Annotated[bool, typer.Option("--no-scope", help="Use no scope columns: one stream per symbol and side.")] = False,
    window: Annotated[str, typer.Option("--window", metavar="DURATION", help="Longest gap between two orders of one cluster (90s, 2m, 500ms).")] = "60s",
    min_confidence: Annotated[float, typer.Option("--min-confidence", metavar="SCORE", help="Score (0.5-1) from which a repeated order counts as a duplicate.")] = 0.8,
    price_tolerance: Annotated[float, typer.Option("--price-tolerance", metavar="FRACTION", help="Price move that scores 0 on price similarity (0.01 = 1 %).")] = 0.01,
    positions: Annotated[str | None, typer.Option("--positions", metavar="TABLE", help="Positions table (or file, for file sources) to reconcile against.", show_default=False)] = None,
    cash: Annotated[str | None, typer.Option("--cash", metavar="TABLE", help="Cash/account table (or file) whose balance the duplicates drained.", show_default=False)] = None,
    starting_cash: Annotated[str | None, typer.Option("--starting-cash", metavar="AMOUNT", help="Cash before the first trade, to compare with what the trades imply.", show_default=False)] = None,
    skip_bad_rows: Annotated[bool, typer.Option("--skip-bad-rows", help="Leave out rows whose values do not parse (counted) instead of stopping.")] = False,
    top: Annotated[int, typer.Option("--top", metavar="N", min=1, help="Rows in the per-symbol table.")] = 20,
    html: Annotated[str | None, typer.Option("--html", metavar="FILE", help="Also write a self-contained HTML report with charts.", show_default=False)] = None,
    plan: Annotated[str | None, typer.Option("--plan", metavar="FILE", help="Write a reviewable SQL correction (backups, changes) and FILE's rollback; changes nothing.", show_default=False)] = None,
    apply: Annotated[str | None, typer.Option("--apply", metavar="PLAN", help="Run a plan (or its rollback) written by --plan against SOURCE, in one transaction.", show_default=False)] = None,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Progress on stderr (default: on a terminal).", show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Find, size and undo duplicate orders already in a trade history (orderguard[audit], DuckDB).

    Read-only unless --apply. Exit 0: no duplicate bursts; 1: duplicates found; 2: bad source,
    column or option, a plan --apply refused, or duplicates that --plan could not write a plan
    for (the report is shown first, the reason after it on stderr).
    """
    from .cli_audit import RichProgress, parse_window, render_applied, render_plan, render_report
    from .cli_render import make_console

    out = make_console()
    with reported():
        if apply:
            if any((plan, html)):
                raise CliFailure(EXIT_USAGE, "--apply runs a written plan; give --plan/--html on an audit run, not with it")
            from .audit.plan import apply_plan

            result = apply_plan(source, apply)
            if as_json:
                _emit_json({"applied": apply, **result.__dict__})
            else:
                render_applied(out, apply, result)
            return
        if no_scope and scope:
            raise CliFailure(EXIT_USAGE, "--scope and --no-scope contradict each other")
        from .audit import Settings
        from .audit import audit as run_audit

        settings = Settings(parse_window(window), min_confidence, price_tolerance)
        err = Console(stderr=True)
        show = progress if progress is not None else (err.is_terminal and not as_json)
        kwargs = {
            "table": table, "time_column": time_col, "symbol": symbol, "side": side, "qty": qty, "price": price,
            "id_column": id_col, "scope": [] if no_scope else scope, "settings": settings, "positions": positions,
            "cash": cash, "starting_cash": starting_cash, "skip_bad_rows": skip_bad_rows,
        }
        if show:
            with RichProgress(Console(stderr=True, force_terminal=True) if progress else err) as bar:
                report = run_audit(source, progress=bar, **kwargs)  # type: ignore[arg-type]
        else:
            report = run_audit(source, **kwargs)  # type: ignore[arg-type]
        if html:
            from .audit.html import render_html

            on_disk = report.source.kind.value != "postgresql"
            if on_disk and os.path.exists(html) and os.path.samefile(html, report.source.location):
                raise CliFailure(EXIT_USAGE, f"--html {html} is the source itself; name another file")
            page = render_html(report)  # rendered before the file is opened: a failure leaves no empty file
            try:
                with open(html, "w", encoding="utf-8") as handle:
                    handle.write(page)
            except OSError as exc:
                raise CliFailure(EXIT_USAGE, f"cannot write --html {html}: {exc.strerror}") from None
    written = refused = None
    if plan:
        from .audit.plan import write_plan
        from .errors import AuditPlanError

        try:
            written = write_plan(report, plan)
        except AuditPlanError as exc:  # the audit still stands: say why there is no plan, after it
            refused = str(exc)
    if as_json:
        document = report.to_json()
        document["html"] = html
        document["plan"] = None if written is None else {
            "plan": written.plan, "rollback": written.rollback, "deletes": written.deletes, "backups": list(written.backups),
            "left_alone": list(written.left_alone),
        }
        document["plan_refused"] = refused
        _emit_json(document)
    else:
        render_report(out, report, top, planned=plan is not None)
        if html:
            out.print(f"report: {html}", highlight=False)
        if written is not None:
            render_plan(out, written)
    if refused is not None:
        typer.echo(f"orderguard: error: no plan written: {' '.join(refused.split())}", err=True)
        raise typer.Exit(EXIT_USAGE if report.duplicates else EXIT_OK)
    raise typer.Exit(EXIT_NOT_CLEAN if report.duplicates else EXIT_OK)
