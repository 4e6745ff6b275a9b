"""The embedded SQLite ledger (DESIGN invariant 1 on SQLite).

Every write is one ``BEGIN IMMEDIATE`` transaction in WAL mode, so writers from every thread
and process on the host are serialised by SQLite's own lock, and each scope is taken with a
single conditional write (an upsert whose ``WHERE`` only lets a free scope change hands). The
claim is one durable commit (``synchronous=FULL`` by default).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import quote

from .._sqlite import SQLiteFile
from ..errors import (
    ConfigurationError,
    FencedOut,
    IntentNotFound,
    SchemaMismatch,
    StoreUnavailable,
    UnsupportedFilesystem,
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
from .schema import ATTEMPT_COLUMNS, INTENT_COLUMNS, SQLITE

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from decimal import Decimal

    from ..intent import OrderIntent
    from ..policies import Policy
    from ..runners import LeaseRequest
    from .control import Exec

log = logging.getLogger("orderguard")
T = TypeVar("T")

# File systems whose byte-range locks SQLite cannot rely on (sqlite.org/useovernet.html).
# A background thread keeps the WAL under this size, so no claim ever runs a checkpoint.
WAL_LIMIT = 4 * 1024 * 1024
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "virtiofs", "fuse.sshfs",
    "sshfs", "glusterfs", "fuse.glusterfs", "ceph", "fuse.ceph", "lustre", "gpfs", "ocfs2",
    "gfs2", "davfs", "fuse.s3fs", "fuse.rclone", "fuse.gcsfuse", "beegfs",
})
# The partial index's own condition, repeated verbatim in a query so SQLite uses the index.
_LIVE = "state IN ('UNKNOWN', 'ACKED', 'PARTIALLY_FILLED')"
_PENDING_SQL = ", ".join(f"'{s.value}'" for s in (*PENDING, State.UNKNOWN))

_CLAIM_ONCE = """
INSERT INTO scopes(key, kind, fence, holder, held_at) VALUES (?, 'once', 1, ?, ?)
ON CONFLICT(key) DO UPDATE SET fence = fence + 1, holder = excluded.holder, held_at = excluded.held_at
WHERE scopes.holder IS NULL
   OR (SELECT released FROM intents WHERE id = scopes.holder) IS NOT 0
RETURNING fence
"""
_CLAIM_COOLDOWN = f"""
INSERT INTO scopes(key, kind, fence, holder, held_at) VALUES (?, 'cooldown', 1, ?, ?)
ON CONFLICT(key) DO UPDATE SET fence = fence + 1, holder = excluded.holder, held_at = excluded.held_at
WHERE scopes.holder IS NULL
   OR (SELECT released FROM intents WHERE id = scopes.holder) IS NOT 0
   OR (scopes.held_at <= ? AND (SELECT state FROM intents WHERE id = scopes.holder) NOT IN ({_PENDING_SQL}))
RETURNING fence
"""
_CLAIM_OPEN = """
INSERT INTO holds(scope_key, intent_id)
SELECT ?, ? WHERE (SELECT count(*) FROM holds WHERE scope_key = ?) < ?
"""
_BUMP_FENCE = """
INSERT INTO scopes(key, kind, fence) VALUES (?, ?, 1)
ON CONFLICT(key) DO UPDATE SET fence = fence + 1
RETURNING fence
"""
_HOLDER = f"SELECT {', '.join('i.' + c.strip() for c in INTENT_COLUMNS.split(','))} FROM scopes s JOIN intents i ON i.id = s.holder WHERE s.key = ?"
_OPEN_HOLDERS = f"SELECT {', '.join('i.' + c.strip() for c in INTENT_COLUMNS.split(','))} FROM holds h JOIN intents i ON i.id = h.intent_id WHERE h.scope_key = ?"
_INSERT_INTENT = f"INSERT INTO intents({INTENT_COLUMNS}) VALUES ({', '.join('?' * len(INTENT_COLUMNS.split(',')))})"


def path_from_url(url: str) -> str:
    """``sqlite:///rel.db`` -> ``rel.db``; ``sqlite:////abs/x.db`` -> ``/abs/x.db``; a bare path stays."""
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://"):]
        if not rest.startswith("/"):
            raise ConfigurationError(f"SQLite URL {url!r} must look like sqlite:///relative.db or sqlite:////abs/path.db")
        path = rest[1:]
    else:
        path = url
    if not path or path == ":memory:" or path.startswith("file:"):
        raise ConfigurationError(
            f"SQLite ledger {url!r} must be a file on local disk: an in-memory ledger is not durable "
            "and cannot be shared between processes"
        )
    return path


def filesystem_type(path: str, mounts_text: str | None = None) -> str:
    """The file system type holding ``path`` (longest mount point prefix in /proc/mounts)."""
    if mounts_text is None:
        try:
            with open("/proc/mounts", encoding="utf-8") as fh:
                mounts_text = fh.read()
        except OSError:
            return "unknown"
    real = os.path.realpath(path)
    best, best_type = "", "unknown"
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        prefix = mount_point.rstrip("/") + "/"
        if (real == mount_point or real.startswith(prefix) or mount_point == "/") and len(mount_point) >= len(best):
            best, best_type = mount_point, fields[2]
    return best_type


def refuse_network_filesystem(path: str, mounts_text: str | None = None) -> None:
    """Raise UnsupportedFilesystem when ``path`` lives on a network file system."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fstype = filesystem_type(directory, mounts_text)
    if fstype in NETWORK_FILESYSTEMS or fstype.startswith("nfs"):
        raise UnsupportedFilesystem(
            f"refusing SQLite ledger {path!r}: it is on a network file system ({fstype}), where "
            "SQLite's locks are unreliable and two hosts could both claim the same intent. Put the "
            "ledger on a local disk, or use PostgreSQL (Guard.open('postgresql://...')) for several hosts."
        )


class SQLiteStore(Store):
    """Ledger in one SQLite file, shared by every thread and process on the host.

    ``synchronous="FULL"`` (default) makes each claim survive power loss; ``"NORMAL"`` keeps it
    safe across process crashes only, for a much cheaper commit in WAL mode.
    """

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "FULL",
        busy_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        create: bool = True,
        upgrade: bool = False,
        force_upgrade: bool = False,
    ) -> None:
        # Absolute, and said once: two runners that resolve a relative path from different
        # working directories (a deploy's old and new release) would guard with two ledgers.
        path = os.path.abspath(path)
        self.path = path
        log.info("orderguard ledger: %s (synchronous=%s)", path, synchronous.upper())
        self._db = SQLiteFile(path, synchronous=synchronous, busy_timeout=busy_timeout, autocheckpoint=False)
        self.synchronous = self._db.synchronous
        self._clock = clock
        self.upgraded_from: int | None = None  # the schema version `upgrade=True` started from
        refuse_network_filesystem(path)
        # Look before touching: the first read-write connection switches a file to WAL, which
        # must never happen to a file that is not (or not yet allowed to become) a ledger.
        kind = self._inspect(path)
        if kind == "missing" and not create:
            raise StoreUnavailable(f"no ledger at {path!r}; `orderguard migrate` (or create=True) creates one")
        if kind == "foreign" or (kind != "ledger" and not create):
            raise SchemaMismatch(
                f"{path!r} is not an orderguard ledger ({'an SQLite database of something else' if kind == 'foreign' else 'an empty file'}); "
                "nothing was changed. Point the store at a ledger, or at a new file to create one."
            )
        try:
            self.namespace = self._open_schema(create, upgrade, force_upgrade)
        except BaseException:
            self._db.close()
            raise
        self._db.start_checkpointer(WAL_LIMIT)

    def _inspect(self, path: str) -> str:
        """missing, empty, ledger or foreign: read-only, so nothing is changed by looking."""
        if not os.path.exists(path):
            return "missing"
        if os.path.getsize(path) == 0:
            return "empty"
        try:
            ro = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, timeout=self._db.busy_timeout)
            try:
                names = {row[0] for row in ro.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            finally:
                ro.close()
        except sqlite3.DatabaseError as exc:
            raise self._db.translate(exc, "open") from exc
        if "meta" in names:
            return "ledger"
        return "foreign" if names else "empty"

    def _open_schema(self, create: bool, upgrade: bool, force: bool) -> str:
        rows = self._db.read("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'meta'")
        if not rows:
            with self._db.write("schema creation") as conn:
                self._db.run_script(conn, SQLITE.v1 + SQLITE.v2)
                conn.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?), ('namespace', ?), ('created_at', ?)",
                    (str(SCHEMA_VERSION), uuid.uuid4().hex, str(time.time())),
                )
        meta = dict(self._db.read("SELECT key, value FROM meta"))
        version = int(meta.get("schema_version", "0"))
        if version == 1 and upgrade:  # 1 -> 2 only adds tables
            with self._db.write("schema upgrade") as conn:
                if conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1":
                    if not force:
                        control.refuse_live_old_runners(_executor(conn), self.now(), self.path)
                    self._db.run_script(conn, SQLITE.v2)
                    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
                    self.upgraded_from = 1
            version = SCHEMA_VERSION
        if version == 1:
            raise SchemaMismatch(
                f"ledger {self.path!r} has schema version 1; this orderguard needs {SCHEMA_VERSION} (halts, "
                "runners, leases). Stop the runners still using it (an old orderguard would ignore halts), then "
                "run `orderguard migrate` to upgrade it in place (it only adds tables)."
            )
        if version != SCHEMA_VERSION:
            newer = version > SCHEMA_VERSION
            raise SchemaMismatch(
                f"ledger {self.path!r} has schema version {version}; this orderguard understands "
                f"{SCHEMA_VERSION}. "
                + ("Upgrade orderguard on this host." if newer else "It predates any released schema; recreate it.")
            )
        return str(meta["namespace"])

    # ------------------------------------------------------------------------------ clock

    def now(self) -> float:
        return checked_clock(self._clock())

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
        # Everything that does not need the lock is prepared first: the transaction holds the
        # file's write lock, so each microsecond in it is a microsecond every other writer waits.
        # Window keys come from the clock read here; a writer that then waits for the lock
        # still claims the window it asked in, which is never a second claim of one window.
        now = self.now()
        moment = datetime.fromtimestamp(now, tz=UTC)
        rules = tuple(p.rule(intent, moment) for p in policies)
        keys = tuple(rule.key for rule in rules)
        intent_id = new_intent_id()
        head = client_order_id_head(self.namespace, keys[0])
        send_by_at = None if send_deadline is None else now + send_deadline
        params = intent_row(intent, intent_id, keys, state, caller, now, send_by_at)
        with self._db.write("claim") as conn:
            x = _executor(conn)
            refusal, lease = control.gate(x, intent, exclusive, now)
            send_by_at = params[SEND_BY_SLOT] = control.lease_cut(lease, send_by_at)
            if refusal is None:
                refusal = self._unknown_carried_over(conn, rules, intent)
            fence = 0
            if refusal is None:
                fence, refusal, index = control.take_rules(
                    x, rules, intent, intent_id, now,
                    lambda rule: self._take(conn, rule, intent_id, now),
                    lambda rule: self._holders(conn, rule),
                )
                if refusal is not None and index > 0:  # an earlier rule already wrote: undo it
                    conn.execute("ROLLBACK")
                    conn.execute("BEGIN IMMEDIATE")
            if refusal is not None:
                return control.refuse(x, refusal, rules, intent, caller, now)
            coid = f"{head}-{fence_text(fence)}"
            row = attempt_row(now, "CLAIMED", None, intent_id, None, keys[0], caller, intent, "")
            attempt_id = conn.execute(control.INSERT_ATTEMPT, row).fetchone()[0]
            params[1], params[2], params[ATTEMPT_SLOT] = coid, fence, attempt_id
            conn.execute(_INSERT_INTENT, params)
        record = new_intent_record(intent, intent_id, coid, fence, keys, state, caller, now, attempt_id, send_by_at)
        message = f"CLAIMED {intent.describe()} from {intent.source} as {coid} (fence {fence})"
        return ClaimDecision(
            claimed=True, attempt_id=attempt_id, intent=record, message=message, rules=rules, lease=lease
        )

    @staticmethod
    def _unknown_carried_over(
        conn: sqlite3.Connection, rules: tuple[ScopeRule, ...], intent: OrderIntent
    ) -> control.Refusal | None:
        if not any(rule.base for rule in rules):
            return None
        rows = conn.execute(f"SELECT {INTENT_COLUMNS} FROM intents WHERE state = 'UNKNOWN' AND {_LIVE}").fetchall()
        return control.carried_over(rules, intent, [intent_from_row(r) for r in rows]) if rows else None

    @staticmethod
    def _take(conn: sqlite3.Connection, rule: ScopeRule, intent_id: str, now: float) -> int | None:
        """One conditional write; the scope's new fence when taken, None when refused."""
        if rule.kind is ScopeKind.ONCE:
            row = conn.execute(_CLAIM_ONCE, (rule.key, intent_id, now)).fetchone()
        elif rule.kind is ScopeKind.COOLDOWN:
            row = conn.execute(_CLAIM_COOLDOWN, (rule.key, intent_id, now, now - rule.seconds)).fetchone()
        else:
            if conn.execute(_CLAIM_OPEN, (rule.key, intent_id, rule.key, rule.limit)).rowcount != 1:
                return None
            row = conn.execute(_BUMP_FENCE, (rule.key, rule.kind.value)).fetchone()
        return None if row is None else int(row[0])

    @staticmethod
    def _holders(conn: sqlite3.Connection, rule: ScopeRule) -> list[IntentRecord]:
        sql = _OPEN_HOLDERS if rule.kind is ScopeKind.OPEN else _HOLDER
        return [intent_from_row(r) for r in conn.execute(sql, (rule.key,)).fetchall()]

    # ------------------------------------------------------------------------ transitions

    def _current(self, conn: sqlite3.Connection, intent_id: str) -> IntentRecord:
        row = conn.execute(f"SELECT {INTENT_COLUMNS} FROM intents WHERE id = ?", (intent_id,)).fetchone()
        if row is None:
            raise IntentNotFound(f"no intent {intent_id!r} in ledger {self.path!r}")
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
        with self._db.write("transition") as conn:
            current = self._current(conn, intent_id)
            if check_transition(current, fence, target):
                return current  # repeating a final report is harmless
            new_fence = fence
            if take_over:
                new_fence = int(conn.execute(
                    "UPDATE scopes SET fence = fence + 1 WHERE key = ? RETURNING fence",
                    (current.scope_key,),
                ).fetchone()[0])
            filled = facts.filled_quantity if facts.filled_quantity is not None else current.filled_quantity
            released = releases(target, filled == 0)
            now = self.now()
            conn.execute(
                """UPDATE intents SET state = ?, fence = ?, updated_at = ?,
                       broker_order_id = coalesce(?, broker_order_id),
                       filled_quantity = ?, average_price = coalesce(?, average_price),
                       note = coalesce(?, note), released = ?
                   WHERE id = ? AND fence = ?""",
                (
                    target.value, new_fence, now, facts.broker_order_id, canonical_decimal(filled),
                    None if facts.average_price is None else canonical_decimal(facts.average_price),
                    facts.note, int(released), intent_id, fence,
                ),
            )
            if released:
                conn.execute("DELETE FROM holds WHERE intent_id = ?", (intent_id,))
            return self._current(conn, intent_id)

    def note_lookup_miss(self, intent_id: str, fence: int, at: float) -> IntentRecord:
        with self._db.write("lookup miss") as conn:
            current = self._current(conn, intent_id)
            if current.fence != fence:
                raise FencedOut(f"intent {intent_id} moved to fence {current.fence}; lookup miss not recorded")
            conn.execute(
                "UPDATE intents SET first_miss_at = coalesce(first_miss_at, ?) WHERE id = ?", (at, intent_id)
            )
            return self._current(conn, intent_id)

    def mark_closed(self, intent_id: str) -> IntentRecord:
        with self._db.write("mark closed") as conn:
            current = self._current(conn, intent_id)
            check_closable(current)
            conn.execute("UPDATE intents SET closed = 1, updated_at = ? WHERE id = ?", (self.now(), intent_id))
            conn.execute("DELETE FROM holds WHERE intent_id = ?", (intent_id,))
            return self._current(conn, intent_id)

    # ------------------------------------------------------------------------------ reads

    def get(self, ref: str) -> IntentRecord:
        rows = self._db.read(
            f"SELECT {INTENT_COLUMNS} FROM intents WHERE id = ? OR client_order_id = ?", (ref, ref)
        )
        if not rows:
            raise IntentNotFound(f"no intent with id or client order id {ref!r} in ledger {self.path!r}")
        return intent_from_row(rows[0])

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
            (f"state IN ({', '.join('?' * len(states or ()))})", [State(x).value for x in states or ()], bool(states)),
            ("strategy = ?", [strategy], strategy is not None),
            ("created_at >= ?", [since], since is not None),
            ("updated_at >= ?", [updated_since], updated_since is not None),
            ("id >= ?", [ids_from], ids_from is not None),
        ])
        rows = self._db.read(
            f"SELECT {INTENT_COLUMNS} FROM intents {clause} ORDER BY id DESC LIMIT ?",
            (*params, int(limit)),
        )
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
            # A claimed attempt is found through its intent's attempt_id (no index on attempts).
            ("id = (SELECT attempt_id FROM intents WHERE id = ?)", [intent_id], intent_id is not None),
            ("holder_id = ?", [holder_id], holder_id is not None),
            ("outcome = ?", ["BLOCKED" if blocked else "CLAIMED"], blocked is not None),
            ("reason = ?", [None if reason is None else BlockReason(reason).value], reason is not None),
            ("at >= ?", [since], since is not None),
            ("id > ?", [after_id], after_id is not None),
        ])
        rows = self._db.read(
            f"SELECT {ATTEMPT_COLUMNS} FROM attempts {clause} ORDER BY id DESC LIMIT ?",
            (*params, int(limit)),
        )
        return [attempt_from_row(r) for r in rows]

    def filled_positions(self) -> dict[tuple[str, str], Decimal]:
        rows = self._db.read("SELECT account, symbol, side, filled_quantity FROM intents")
        return net_positions(rows)

    def _control(self, what: str, work: Callable[[Exec, float], T], *, write: bool) -> T:
        if write:
            with self._db.write(what) as conn:
                return work(_executor(conn), self.now())
        return work(self._db.read, self.now())

    def close(self) -> None:
        self._db.close()


def _executor(conn: sqlite3.Connection) -> Exec:
    return lambda sql, params: conn.execute(sql, params).fetchall()
