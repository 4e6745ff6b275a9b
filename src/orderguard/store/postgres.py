"""The PostgreSQL ledger: the store for bots on several hosts (``orderguard[postgres]``).

Same contract and tables as the SQLite store. Each scope is taken by one conditional upsert
(``INSERT … ON CONFLICT DO UPDATE … WHERE <free> RETURNING fence``): concurrent claimers of a
scope queue on its row lock, and a claimer that waited re-checks the condition against the row
the winner committed. Only transaction-scoped locks are used. Window keys and cooldowns use the
server's clock (``now()`` of the claim's transaction), so clients with skewed clocks agree.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import (
    ConfigurationError,
    FencedOut,
    IntentNotFound,
    InvalidTransition,
    SchemaMismatch,
    StoreError,
    StoreLocked,
    StoreUnavailable,
)
from ..intent import canonical_decimal
from ..policies import ScopeKind, ScopeRule
from ..states import PENDING, State, releases
from . import control
from .base import (
    DEFAULT_SEND_DEADLINE,
    SCHEMA_VERSION,
    AttemptRecord,
    BlockReason,
    Caller,
    ClaimDecision,
    IntentRecord,
    Store,
    TransitionFields,
    check_closable,
    check_transition,
    checked_clock,
    client_order_id_head,
    fence_text,
    net_positions,
    new_intent_id,
)
from .rows import (
    ATTEMPT_SLOT,
    SEND_BY_SLOT,
    attempt_from_row,
    attempt_row,
    intent_from_row,
    intent_row,
    new_intent_record,
    where_clause,
)
from .schema import ATTEMPT_COLUMNS, INTENT_COLUMNS, POSTGRES

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from decimal import Decimal

    import psycopg

    from ..intent import OrderIntent
    from ..policies import Policy
    from ..runners import LeaseRequest
    from .control import Exec

log = logging.getLogger("orderguard")
T = TypeVar("T")
CHANNEL = "orderguard"
_PENDING_SQL = ", ".join(f"'{s.value}'" for s in (*PENDING, State.UNKNOWN))
_LIVE = "state IN ('UNKNOWN', 'ACKED', 'PARTIALLY_FILLED')"
_INHERITED: list[Any] = []  # pools a forked child must never touch

# A holder the statement cannot see (committed after its snapshot) reads as NULL: never free.
_CLAIM_ONCE = """
INSERT INTO scopes(key, kind, fence, holder, held_at) VALUES (%s, 'once', 1, %s, %s)
ON CONFLICT (key) DO UPDATE SET fence = scopes.fence + 1, holder = EXCLUDED.holder, held_at = EXCLUDED.held_at
WHERE scopes.holder IS NULL OR (SELECT released = 1 FROM intents WHERE id = scopes.holder) IS TRUE
RETURNING fence
"""
_CLAIM_COOLDOWN = f"""
INSERT INTO scopes(key, kind, fence, holder, held_at) VALUES (%s, 'cooldown', 1, %s, %s)
ON CONFLICT (key) DO UPDATE SET fence = scopes.fence + 1, holder = EXCLUDED.holder, held_at = EXCLUDED.held_at
WHERE scopes.holder IS NULL
   OR (SELECT released = 1 FROM intents WHERE id = scopes.holder) IS TRUE
   OR (scopes.held_at <= %s AND (SELECT state NOT IN ({_PENDING_SQL}) FROM intents WHERE id = scopes.holder) IS TRUE)
RETURNING fence
"""
# OPEN scopes: the scope row is locked first (claimers of one scope queue here), then counted.
_LOCK_SCOPE = """
INSERT INTO scopes(key, kind, fence) VALUES (%s, %s, 1)
ON CONFLICT (key) DO UPDATE SET fence = scopes.fence + 1
RETURNING fence
"""
_COLS = [c.strip() for c in INTENT_COLUMNS.split(",")]
_HOLDER = f"SELECT {', '.join('i.' + c for c in _COLS)} FROM scopes s JOIN intents i ON i.id = s.holder WHERE s.key = %s"
_OPEN_HOLDERS = f"SELECT {', '.join('i.' + c for c in _COLS)} FROM holds h JOIN intents i ON i.id = h.intent_id WHERE h.scope_key = %s"
_INSERT_INTENT = f"INSERT INTO intents({INTENT_COLUMNS}) VALUES ({', '.join(['%s'] * len(_COLS))})"
_ATTEMPT_COLS = ATTEMPT_COLUMNS.removeprefix("id, ")
_INSERT_ATTEMPT = f"INSERT INTO attempts({_ATTEMPT_COLS}) VALUES ({', '.join(['%s'] * len(_ATTEMPT_COLS.split(',')))}) RETURNING id"


_FREE = {
    ScopeKind.ONCE: "scopes.holder IS NULL OR (SELECT released = 1 FROM intents WHERE id = scopes.holder) IS TRUE",
    ScopeKind.COOLDOWN: (
        "scopes.holder IS NULL OR (SELECT released = 1 FROM intents WHERE id = scopes.holder) IS TRUE "
        "OR (scopes.held_at <= EXCLUDED.held_at - %(seconds)s AND "
        f"(SELECT state NOT IN ({_PENDING_SQL}) FROM intents WHERE id = scopes.holder) IS TRUE)"
    ),
}


def _one_statement_claim(kind: ScopeKind) -> str:
    """The whole claim of a single once/cooldown scope as ONE statement (one round trip).

    Run in autocommit it is its own transaction: the scope upsert, the attempt, the intent and
    the notification happen together or, when the scope is refused (or the caller's estimate of
    the server clock is off), not at all.
    """
    intent_values = [f"%(i{n})s" for n in range(len(_COLS))]
    expressions = {
        "client_order_id": "%(head)s || '-' || og_base36(s.fence)", "fence": "s.fence",
        "created_at": "s.held_at", "updated_at": "s.held_at", "attempt_id": "a.id",
        "send_by_at": "s.held_at + %(deadline)s::float8",
    }
    for name, expression in expressions.items():
        intent_values[_COLS.index(name)] = expression
    attempt_cols = [c.strip() for c in _ATTEMPT_COLS.split(",")]
    attempt_values = [f"%(a{n})s" for n in range(len(attempt_cols))]
    attempt_values[0] = "s.held_at"
    return f"""
WITH clk AS (SELECT coalesce(%(fixed_now)s::float8, extract(epoch FROM now())) AS now),
halted AS (SELECT count(*) AS n FROM halts),
ok AS (
    SELECT now FROM clk
    WHERE (%(estimate)s::float8 IS NULL OR abs(now - %(estimate)s::float8) < %(tolerance)s)
      AND (SELECT n FROM halted) = 0
),
carry AS (
    SELECT id FROM intents
    WHERE %(base)s <> '' AND state = 'UNKNOWN' AND {_LIVE}
      AND (starts_with(scope_key, %(base)s) OR position(E'\n' || %(base)s IN E'\n' || scope_keys) > 0)
    LIMIT 1
),
s AS (
    INSERT INTO scopes(key, kind, fence, holder, held_at)
    SELECT %(key)s, %(kind)s, 1, %(id)s, ok.now FROM ok WHERE NOT EXISTS (SELECT 1 FROM carry)
    ON CONFLICT (key) DO UPDATE SET fence = scopes.fence + 1, holder = EXCLUDED.holder, held_at = EXCLUDED.held_at
    WHERE {_FREE[kind]}
    RETURNING fence, held_at
),
a AS (INSERT INTO attempts({_ATTEMPT_COLS}) SELECT {", ".join(attempt_values)} FROM s RETURNING id),
i AS (INSERT INTO intents({INTENT_COLUMNS}) SELECT {", ".join(intent_values)} FROM s, a RETURNING id, state),
n AS (SELECT pg_notify(%(channel)s, json_build_object('intent', i.id, 'state', i.state)::text) FROM i)
SELECT (SELECT now FROM clk), (SELECT count(*) FROM ok), (SELECT fence FROM s), (SELECT id FROM a),
       (SELECT count(*) FROM n), (SELECT count(*) FROM carry), (SELECT n FROM halted)
"""


_ONE_STATEMENT = {kind: _one_statement_claim(kind) for kind in _FREE}
HALTED_SKIP_FAST_PATH = 1.0  # seconds claims take the full transaction after the fast path saw a halt
CLOCK_TOLERANCE = 1.0  # seconds between the server's clock and this host's estimate of it
IDLE_CHECK_AFTER = 0.2  # seconds idle after which a pooled connection is pinged before use (a claim
# loop reuses its connection sooner and pays nothing; a bot that claims now and then pays one ping)


def _psycopg() -> Any:
    try:
        import psycopg
        import psycopg_pool
    except ImportError:  # pragma: no cover - depends on the install
        raise ConfigurationError(
            "the PostgreSQL store needs psycopg 3 and psycopg-pool: pip install 'orderguard[postgres]'"
        ) from None
    return psycopg, psycopg_pool


def _scalar(conn: psycopg.Connection[Any], sql: str, params: Sequence[Any] = ()) -> Any:
    row = conn.execute(sql, params).fetchone()
    if row is None:  # pragma: no cover - every caller selects or returns exactly one row
        raise StoreError(f"PostgreSQL ledger returned no row for: {sql.split(maxsplit=1)[0]} ...")
    return row[0]


class PostgresStore(Store):
    """Ledger in PostgreSQL, shared by every process on every host.

    ``statement_timeout`` and ``lock_timeout`` bound how long a claim may wait (then
    StoreLocked, nothing sent); TCP keepalives find a dead server or network path. ``schema``
    puts the tables in their own PostgreSQL schema. ``clock``, for tests only, replaces the
    server's clock.
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        create: bool = True,
        upgrade: bool = False,
        force_upgrade: bool = False,
        min_size: int = 1,
        max_size: int = 8,
        statement_timeout: float = 5.0,
        lock_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        busy_timeout: float | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._psycopg, self._pool_module = _psycopg()
        if busy_timeout is not None:  # the SQLite store's name for "how long to wait for a lock"
            lock_timeout = busy_timeout
        if schema is not None and not schema.replace("_", "").isalnum():
            raise ConfigurationError(f"schema name {schema!r} must be letters, digits and '_'")
        self.url = url
        self.schema = schema
        # One channel per ledger: ledgers in other schemas of the database do not hear ours.
        self.channel = CHANNEL + (f"_{schema}" if schema else "")
        self._clock = clock
        options = (
            f"-c statement_timeout={int(statement_timeout * 1000)} -c lock_timeout={int(lock_timeout * 1000)} "
            "-c idle_in_transaction_session_timeout=60000"
            + (f" -c search_path={schema}" if schema else "")
        )
        self._kwargs = {
            "connect_timeout": max(1, int(connect_timeout)), "options": options, "keepalives": 1,
            "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
            "application_name": "orderguard",
        }
        self._sizes = (min_size, max_size)
        self._connect_timeout = float(connect_timeout)
        self._pool_lock = threading.Lock()
        self._pool: Any = None
        self._pid = os.getpid()
        self._offset: float | None = None  # server clock minus this host's clock
        self._halted_until = 0.0  # monotonic time until which claims skip the fast path (halts exist)
        self._last_used: dict[int, float] = {}  # id(connection) -> when it was last returned
        self.created = False  # whether opening it created the schema
        self.upgraded_from: int | None = None  # the schema version an upgrade on opening started from
        self.namespace = self._open_schema(create, upgrade, force_upgrade)

    # ------------------------------------------------------------------------ connections

    def _get_pool(self) -> Any:
        with self._pool_lock:
            if self._pid != os.getpid():  # after fork: the parent's sockets are not ours
                _INHERITED.append(self._pool)
                self._pool, self._pid = None, os.getpid()
            if self._pool is None:
                self._pool = self._pool_module.ConnectionPool(
                    self.url, min_size=self._sizes[0], max_size=self._sizes[1], kwargs=self._kwargs,
                    open=True, timeout=self._connect_timeout + 1, name="orderguard",
                    check=self._check_if_idle, reset=self._mark_used,
                )
            return self._pool

    def _mark_used(self, conn: psycopg.Connection[Any]) -> None:
        self._last_used[id(conn)] = time.monotonic()

    def _check_if_idle(self, conn: psycopg.Connection[Any]) -> None:
        """Ping a connection only if it sat idle (a server restart or failover kills idle
        connections): a claim in a busy loop pays no extra round trip, the first claim after
        a quiet spell or an outage does not fail on a dead socket."""
        if time.monotonic() - self._last_used.get(id(conn), 0.0) > IDLE_CHECK_AFTER:
            self._pool_module.ConnectionPool.check_connection(conn)

    @contextmanager
    def _tx(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        """One transaction on a pooled connection; any failure is a typed StoreError."""
        try:
            with self._get_pool().connection() as conn, conn.transaction():
                yield conn
        except StoreError:
            raise
        except (FencedOut, InvalidTransition, IntentNotFound):
            raise
        except self._pool_module.PoolTimeout as exc:
            raise StoreUnavailable(f"PostgreSQL ledger unreachable during {what} ({exc}); nothing was sent.") from exc
        except self._psycopg.Error as exc:
            raise self._translate(exc, what) from exc

    def _translate(self, exc: Exception, what: str) -> StoreError:
        errors = self._psycopg.errors
        if isinstance(exc, (errors.LockNotAvailable, errors.QueryCanceled)):
            return StoreLocked(
                f"PostgreSQL ledger: {what} waited past its lock/statement timeout ({exc}); nothing was "
                "sent. Look for a long transaction holding the scope, or raise the timeouts."
            )
        if isinstance(exc, errors.UndefinedTable):
            return SchemaMismatch(f"PostgreSQL ledger has no orderguard tables ({exc}); run `orderguard migrate`.")
        if isinstance(exc, self._psycopg.OperationalError):
            return StoreUnavailable(
                f"PostgreSQL ledger: connection lost during {what} ({exc}); nothing was sent by this call. "
                "It reconnects on the next call."
            )
        return StoreError(f"PostgreSQL ledger failed during {what}: {exc}; nothing was sent.")

    def _open_schema(self, create: bool, upgrade: bool, force: bool) -> str:
        with self._tx("schema check") as conn:
            if self.schema and create:
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
            # Serialises concurrent creators; released at commit (transaction-scoped).
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('orderguard-schema'))")
            have = _scalar(conn, "SELECT to_regclass('meta') IS NOT NULL")
            self.created = not have
            if not have:
                if not create:
                    raise StoreUnavailable(f"no orderguard ledger in {self._where()}; run `orderguard migrate`")
                conn.execute(POSTGRES.v1)
                conn.execute(POSTGRES.v2)
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES ('schema_version', %s), ('namespace', %s), ('created_at', %s) "
                    "ON CONFLICT (key) DO NOTHING",
                    (str(SCHEMA_VERSION), uuid.uuid4().hex, str(time.time())),
                )
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("schema_version") == "1" and upgrade:  # 1 -> 2 only adds tables
                if not force:
                    control.refuse_live_old_runners(_executor(conn), self._server_now(conn), self._where())
                conn.execute(POSTGRES.v2)
                conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
                meta["schema_version"], self.upgraded_from = str(SCHEMA_VERSION), 1
        version = int(meta.get("schema_version", "0"))
        if version == 1:
            raise SchemaMismatch(
                f"PostgreSQL ledger {self._where()} has schema version 1; this orderguard needs {SCHEMA_VERSION} "
                "(halts, runners, leases). Stop the runners still using it (an old orderguard would ignore halts), "
                "then run `orderguard migrate` to upgrade it in place (it only adds tables)."
            )
        if version != SCHEMA_VERSION:
            raise SchemaMismatch(
                f"PostgreSQL ledger {self._where()} has schema version {version}; this orderguard understands "
                f"{SCHEMA_VERSION}. " + ("Upgrade orderguard on this host." if version > SCHEMA_VERSION else "Recreate it.")
            )
        return str(meta["namespace"])

    def _where(self) -> str:
        host = self._kwargs.get("host") or self.url.split("@")[-1].split("?")[0]
        return f"{host}" + (f" schema {self.schema}" if self.schema else "")

    # ------------------------------------------------------------------------------ clock

    def _server_now(self, conn: psycopg.Connection[Any]) -> float:
        if self._clock is not None:
            return checked_clock(self._clock())
        return checked_clock(float(_scalar(conn, "SELECT extract(epoch FROM now())")))

    def _estimate(self) -> float | None:
        """This host's estimate of the server's clock (None: not measured yet)."""
        if self._clock is not None:
            return checked_clock(self._clock())
        if self._offset is None:
            with self._get_pool().connection() as conn:
                conn.autocommit = True
                before = time.time()
                server = float(_scalar(conn, "SELECT extract(epoch FROM clock_timestamp())"))
                self._offset = server - (before + time.time()) / 2
        return checked_clock(time.time() + self._offset)

    def now(self) -> float:
        if self._clock is not None:
            return checked_clock(self._clock())
        with self._tx("clock") as conn:
            return self._server_now(conn)

    # ------------------------------------------------------------------------------ claim

    def claim(
        self,
        intent: OrderIntent,
        policies: Sequence[Policy],
        caller: Caller,
        *,
        state: State = State.SENDING,
        send_deadline: float | None = DEFAULT_SEND_DEADLINE,
        exclusive: LeaseRequest | None = None,
    ) -> ClaimDecision:
        intent_id = new_intent_id()
        if len(policies) == 1 and exclusive is None and time.monotonic() >= self._halted_until:
            fast = self._claim_in_one_statement(intent, policies[0], caller, intent_id, state, send_deadline)
            if fast is not None:
                return fast
        lease = None
        with self._tx("claim") as conn:
            x = _executor(conn)
            now = self._server_now(conn)  # the server's clock decides windows and cooldowns
            moment = datetime.fromtimestamp(now, tz=UTC)
            rules = tuple(p.rule(intent, moment) for p in policies)
            keys = tuple(rule.key for rule in rules)
            send_by_at = None if send_deadline is None else now + send_deadline
            params = intent_row(intent, intent_id, keys, state, caller, now, send_by_at)
            refusal, lease = control.gate(x, intent, exclusive, now)
            send_by_at = params[SEND_BY_SLOT] = control.lease_cut(lease, send_by_at)
            if refusal is None:
                refusal = self._unknown_carried_over(conn, rules, intent)
            fence = 0
            if refusal is None:
                def take_all() -> tuple[int, control.Refusal | None, int]:
                    return control.take_rules(
                        x, rules, intent, intent_id, now,
                        lambda rule: self._take(conn, rule, intent_id, now),
                        lambda rule: self._holders(conn, rule),
                    )

                limits = any(rule.is_limit for rule in rules)
                if len(rules) == 1 and not limits:
                    fence, refusal, _ = take_all()
                else:  # a refusal after a write must undo it: a savepoint
                    try:
                        with conn.transaction():
                            fence, refusal, _ = take_all()
                            if refusal is None and limits:
                                refusal = control.recheck_halts(x, intent)
                            if refusal is not None:
                                raise _Undo
                    except _Undo:
                        pass
            if refusal is not None:
                decision = control.refuse(x, refusal, rules, intent, caller, now)
                # Dashboards on every host hear the blocked attempt (and the halt it tripped).
                note = {"attempt": decision.attempt_id, **({"halt": "changed"} if decision.tripped else {})}
                conn.execute("SELECT pg_notify(%s, %s)", (self.channel, json.dumps(note)))
                return decision
            coid = f"{client_order_id_head(self.namespace, keys[0])}-{fence_text(fence)}"
            row = attempt_row(now, "CLAIMED", None, intent_id, None, keys[0], caller, intent, "")
            attempt_id = int(_scalar(conn, _INSERT_ATTEMPT, row))
            params[1], params[2], params[ATTEMPT_SLOT] = coid, fence, attempt_id
            conn.execute(_INSERT_INTENT, params)
            self._notify(conn, intent_id, state, self.channel)
        record = new_intent_record(intent, intent_id, coid, fence, keys, state, caller, now, attempt_id, send_by_at)
        message = f"CLAIMED {intent.describe()} from {intent.source} as {coid} (fence {fence})"
        return ClaimDecision(
            claimed=True, attempt_id=attempt_id, intent=record, message=message, rules=rules, lease=lease
        )

    def _claim_in_one_statement(
        self, intent: OrderIntent, policy: Policy, caller: Caller, intent_id: str, state: State,
        send_deadline: float | None,
    ) -> ClaimDecision | None:
        """The hot path: one round trip. None: not applicable, or refused (the caller then runs
        the full transaction, which records the refusal with its reason and holder)."""
        try:
            estimate = self._estimate()
        except self._psycopg.Error as exc:
            raise self._translate(exc, "clock") from exc
        assert estimate is not None
        # A window key from the estimate is only used when it is the same key at both ends of
        # the tolerance: the statement refuses any estimate further than that from the server's
        # own clock, so the key is then exactly the server clock's key. Near a window boundary
        # (or with a test clock) the full transaction computes it from the server's clock.
        rule = policy.rule(intent, datetime.fromtimestamp(estimate, tz=UTC))
        if rule.kind not in _ONE_STATEMENT:
            return None
        if self._clock is None:
            for edge in (estimate - CLOCK_TOLERANCE, estimate + CLOCK_TOLERANCE):
                if policy.rule(intent, datetime.fromtimestamp(edge, tz=UTC)).key != rule.key:
                    return None
        keys = (rule.key,)
        row = intent_row(intent, intent_id, keys, state, caller, estimate, None)
        attempt = attempt_row(estimate, "CLAIMED", None, intent_id, None, rule.key, caller, intent, "")
        params: dict[str, Any] = {f"i{n}": v for n, v in enumerate(row)}
        params.update({f"a{n}": v for n, v in enumerate(attempt)})
        params.update(
            fixed_now=self._clock() if self._clock is not None else None,
            estimate=None if self._clock is not None else estimate, tolerance=CLOCK_TOLERANCE,
            base=rule.base, key=rule.key, kind=rule.kind.value, id=intent_id, seconds=rule.seconds,
            head=client_order_id_head(self.namespace, rule.key), deadline=send_deadline, channel=self.channel,
        )
        try:
            with self._get_pool().connection() as conn:
                conn.autocommit = True  # the statement is its own transaction
                try:
                    result = conn.execute(_ONE_STATEMENT[rule.kind], params).fetchone()
                finally:
                    with suppress(self._psycopg.Error):  # a broken connection: report the real error
                        conn.autocommit = False
        except self._pool_module.PoolTimeout as exc:
            raise StoreUnavailable(f"PostgreSQL ledger unreachable during claim ({exc}); nothing was sent.") from exc
        except self._psycopg.Error as exc:
            raise self._translate(exc, "claim") from exc
        assert result is not None
        now, clock_ok, fence, attempt_id = result[0], result[1], result[2], result[3]
        if result[6]:
            # A trading scope is halted somewhere: the full transaction checks which. Halts last
            # minutes to days, so the next claims go straight there for a while.
            self._halted_until = time.monotonic() + HALTED_SKIP_FAST_PATH
            return None
        if not clock_ok:
            self._offset = None  # this host's clock moved: measure again, and take the long way
            return None
        if fence is None:
            return None  # refused: the full transaction names the reason and the holder
        now = float(now)
        send_by_at = None if send_deadline is None else now + send_deadline
        coid = f"{params['head']}-{fence_text(int(fence))}"
        record = new_intent_record(intent, intent_id, coid, int(fence), keys, state, caller, now, int(attempt_id), send_by_at)
        message = f"CLAIMED {intent.describe()} from {intent.source} as {coid} (fence {fence})"
        return ClaimDecision(claimed=True, attempt_id=int(attempt_id), intent=record, message=message, rules=(rule,))

    @staticmethod
    def _take(conn: psycopg.Connection[Any], rule: ScopeRule, intent_id: str, now: float) -> int | None:
        if rule.kind is ScopeKind.ONCE:
            row = conn.execute(_CLAIM_ONCE, (rule.key, intent_id, now)).fetchone()
        elif rule.kind is ScopeKind.COOLDOWN:
            row = conn.execute(_CLAIM_COOLDOWN, (rule.key, intent_id, now, now - rule.seconds)).fetchone()
        else:
            row = conn.execute(_LOCK_SCOPE, (rule.key, rule.kind.value)).fetchone()
            count = _scalar(conn, "SELECT count(*) FROM holds WHERE scope_key = %s", (rule.key,))
            if count >= rule.limit:
                return None
            conn.execute("INSERT INTO holds(scope_key, intent_id) VALUES (%s, %s)", (rule.key, intent_id))
        return None if row is None else int(row[0])

    @staticmethod
    def _holders(conn: psycopg.Connection[Any], rule: ScopeRule) -> list[IntentRecord]:
        sql = _OPEN_HOLDERS if rule.kind is ScopeKind.OPEN else _HOLDER
        return [intent_from_row(r) for r in conn.execute(sql, (rule.key,)).fetchall()]

    @staticmethod
    def _unknown_carried_over(
        conn: psycopg.Connection[Any], rules: tuple[ScopeRule, ...], intent: OrderIntent
    ) -> control.Refusal | None:
        if not any(rule.base for rule in rules):
            return None
        rows = conn.execute(f"SELECT {INTENT_COLUMNS} FROM intents WHERE state = 'UNKNOWN' AND {_LIVE}").fetchall()
        return control.carried_over(rules, intent, [intent_from_row(r) for r in rows]) if rows else None

    @staticmethod
    def _notify(conn: psycopg.Connection[Any], intent_id: str, state: State, channel: str) -> None:
        # Delivered at commit, to every listener on every host (dashboard, waiting processes).
        conn.execute("SELECT pg_notify(%s, %s)", (channel, json.dumps({"intent": intent_id, "state": state.value})))

    # ------------------------------------------------------------------------ transitions

    def _current(self, conn: psycopg.Connection[Any], intent_id: str, *, lock: bool = False) -> IntentRecord:
        row = conn.execute(
            f"SELECT {INTENT_COLUMNS} FROM intents WHERE id = %s" + (" FOR UPDATE" if lock else ""), (intent_id,)
        ).fetchone()
        if row is None:
            raise IntentNotFound(f"no intent {intent_id!r} in the PostgreSQL ledger")
        return intent_from_row(row)

    def transition(
        self,
        intent_id: str,
        fence: int,
        target: State,
        facts: TransitionFields | None = None,
        *,
        take_over: bool = False,
    ) -> IntentRecord:
        facts = facts or TransitionFields()
        with self._tx("transition") as conn:
            current = self._current(conn, intent_id, lock=True)
            if check_transition(current, fence, target):
                return current  # repeating a final report is harmless
            new_fence = fence
            if take_over:
                new_fence = int(_scalar(conn, "UPDATE scopes SET fence = fence + 1 WHERE key = %s RETURNING fence", (current.scope_key,)))
            filled = facts.filled_quantity if facts.filled_quantity is not None else current.filled_quantity
            released = releases(target, filled == 0)
            conn.execute(
                """UPDATE intents SET state = %s, fence = %s, updated_at = %s,
                       broker_order_id = coalesce(%s, broker_order_id),
                       filled_quantity = %s, average_price = coalesce(%s, average_price),
                       note = coalesce(%s, note), released = %s
                   WHERE id = %s AND fence = %s""",
                (
                    target.value, new_fence, self._server_now(conn), facts.broker_order_id,
                    canonical_decimal(filled),
                    None if facts.average_price is None else canonical_decimal(facts.average_price),
                    facts.note, int(released), intent_id, fence,
                ),
            )
            if released:
                conn.execute("DELETE FROM holds WHERE intent_id = %s", (intent_id,))
            self._notify(conn, intent_id, target, self.channel)
            return self._current(conn, intent_id)

    def note_lookup_miss(self, intent_id: str, fence: int, at: float) -> IntentRecord:
        with self._tx("lookup miss") as conn:
            current = self._current(conn, intent_id, lock=True)
            if current.fence != fence:
                raise FencedOut(f"intent {intent_id} moved to fence {current.fence}; lookup miss not recorded")
            conn.execute("UPDATE intents SET first_miss_at = coalesce(first_miss_at, %s) WHERE id = %s", (at, intent_id))
            return self._current(conn, intent_id)

    def mark_closed(self, intent_id: str) -> IntentRecord:
        with self._tx("mark closed") as conn:
            current = self._current(conn, intent_id, lock=True)
            check_closable(current)
            conn.execute("UPDATE intents SET closed = 1, updated_at = %s WHERE id = %s", (self._server_now(conn), intent_id))
            conn.execute("DELETE FROM holds WHERE intent_id = %s", (intent_id,))
            return self._current(conn, intent_id)

    # ------------------------------------------------------------------------------ reads

    def get(self, ref: str) -> IntentRecord:
        with self._tx("read") as conn:
            row = conn.execute(
                f"SELECT {INTENT_COLUMNS} FROM intents WHERE id = %s OR client_order_id = %s", (ref, ref)
            ).fetchone()
        if row is None:
            raise IntentNotFound(f"no intent with id or client order id {ref!r} in the PostgreSQL ledger")
        return intent_from_row(row)

    def intents(
        self,
        *,
        states: Sequence[State] | None = None,
        strategy: str | None = None,
        since: float | None = None,
        updated_since: float | None = None,
        ids_from: str | None = None,
        limit: int = 1000,
    ) -> list[IntentRecord]:
        clause, params = where_clause([
            ("state = ANY(%s)", [[State(x).value for x in states or ()]], bool(states)),
            ("strategy = %s", [strategy], strategy is not None),
            ("created_at >= %s", [since], since is not None),
            ("updated_at >= %s", [updated_since], updated_since is not None),
            ("id >= %s", [ids_from], ids_from is not None),
        ])
        with self._tx("read") as conn:
            rows = conn.execute(
                f"SELECT {INTENT_COLUMNS} FROM intents {clause} ORDER BY id DESC LIMIT %s", (*params, int(limit))
            ).fetchall()
        return [intent_from_row(r) for r in rows]

    def attempts(
        self,
        *,
        intent_id: str | None = None,
        holder_id: str | None = None,
        blocked: bool | None = None,
        reason: BlockReason | None = None,
        since: float | None = None,
        after_id: int | None = None,
        limit: int = 1000,
    ) -> list[AttemptRecord]:
        clause, params = where_clause([
            ("id = (SELECT attempt_id FROM intents WHERE id = %s)", [intent_id], intent_id is not None),
            ("holder_id = %s", [holder_id], holder_id is not None),
            ("outcome = %s", ["BLOCKED" if blocked else "CLAIMED"], blocked is not None),
            ("reason = %s", [None if reason is None else BlockReason(reason).value], reason is not None),
            ("at >= %s", [since], since is not None),
            ("id > %s", [after_id], after_id is not None),
        ])
        with self._tx("read") as conn:
            rows = conn.execute(
                f"SELECT {ATTEMPT_COLUMNS} FROM attempts {clause} ORDER BY id DESC LIMIT %s", (*params, int(limit))
            ).fetchall()
        return [attempt_from_row(r) for r in rows]

    def filled_positions(self) -> dict[tuple[str, str], Decimal]:
        with self._tx("read") as conn:
            rows = conn.execute("SELECT account, symbol, side, filled_quantity FROM intents").fetchall()
        return net_positions(rows)

    def listen(self, timeout: float | None = None) -> Iterator[dict[str, str]]:
        """Changes from every process on every host: ``{"intent": id, "state": S}`` for an intent's
        state, ``{"attempt": id}`` for a blocked attempt, ``{"halt": "changed"}`` when a trading
        scope was halted or resumed. The first item, ``{"listening": "now"}``, comes once LISTEN is
        in place: what committed before it is not notified here (a caller catches up then)."""
        psycopg = self._psycopg
        try:
            with psycopg.connect(self.url, autocommit=True, **self._kwargs) as conn:
                conn.execute(f"LISTEN {self.channel}")
                yield {"listening": "now"}
                for note in conn.notifies(timeout=timeout):
                    yield json.loads(note.payload)
        except psycopg.Error as exc:
            raise self._translate(exc, "listen") from exc

    def _control(self, what: str, work: Callable[[Exec, float], T], *, write: bool) -> T:
        with self._tx(what) as conn:
            result = work(_executor(conn), self._server_now(conn))
            if what == "halt":  # dashboards on every host hear halts and resumes
                conn.execute("SELECT pg_notify(%s, %s)", (self.channel, json.dumps({"halt": "changed"})))
            return result

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.close()


def _executor(conn: psycopg.Connection[Any]) -> Exec:
    def run(sql: str, params: Sequence[Any]) -> list[Any]:
        cursor = conn.execute(sql.replace("?", "%s"), params)
        return cursor.fetchall() if cursor.description else []

    return run


class _Undo(Exception):
    """Rolls a savepoint back when a later policy of a claim refuses it."""
