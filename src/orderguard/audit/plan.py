"""Correction plans: a reviewable SQL script that deletes phantom duplicates and gives back the
cash they drained, with backups first and a rollback script beside it.

The plan is plain SQL that ``sqlite3 db < plan.sql`` or ``psql -f plan.sql`` can run after review.
Its ``-- check (...): expect V from SELECT ...`` comments are preconditions that
:func:`apply_plan` runs in the same transaction before going on: the backups hold every row,
the rows to delete are still there and still the same symbols, the cash row exists. The header
carries a SHA-256 of the statements, so :func:`apply_plan` refuses a plan edited after it was
written (run an edited plan by hand). One statement per line.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from ..errors import AuditPlanError, AuditSourceError
from ..intent import canonical_decimal
from .report import iso_us
from .source import Source, SourceKind, dependents, quote, quote_table, redact_url, sql_string, table_columns

if TYPE_CHECKING:
    from collections.abc import Callable

    from .clusters import Cluster
    from .report import AuditReport

MAGIC = "-- orderguard audit plan v1"
BAIL = ".bail on"  # sqlite3's shell stops at the first error (a plan run by hand twice must not go on)
MARKER = "-- ---- statements (one per line; checks are comments that --apply runs) ----"
CHECK = re.compile(r"^-- check \((?P<why>[^()]*)\): expect (?P<value>\S+) from (?P<sql>SELECT .*)$")
IDS_PER_STATEMENT = 1000
PG_NAME_LIMIT = 63


@dataclass(frozen=True)
class PlanSummary:
    """What a written plan does."""

    plan: str
    rollback: str
    deletes: int
    clusters: int
    cash_delta: dict[tuple[str, ...], Decimal]
    backups: tuple[str, ...]
    left_alone: tuple[str, ...]  # why some duplicate clusters are not in the plan


@dataclass(frozen=True)
class ApplyResult:
    statements: int
    checks: int
    deleted: int
    updated: int
    inserted: int


def _table_sql(source: Source, table: str) -> str:
    """A table name in SQL: PostgreSQL's may be schema-qualified; a SQLite name is one name, dots and all."""
    return quote_table(table) if source.kind is SourceKind.POSTGRES else quote(table)


def rollback_path(plan: str) -> str:
    base, ext = os.path.splitext(plan)
    return f"{base}.rollback{ext or '.sql'}"


_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _literal(value: Any) -> str:
    """A value as a SQL literal on one plan line; a value that could break the line is refused
    (a plan is read line by line: a line break inside a value would smuggle in a statement)."""
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if _UNSAFE.search(text):
        raise AuditPlanError(
            f"a value the plan must name ({text!r}) holds a line break or control character, which a plan cannot "
            "carry safely; correct or delete that row by hand"
        )
    return sql_string(text)


def _one_line(text: str) -> str:
    """Source values in a plain comment line: no character that could end the line."""
    return _UNSAFE.sub("?", text)


def _safe(text: str) -> str:
    """Source values shown in plan comments: anything but letters, digits and plain punctuation
    becomes '?', so a comment can never end early or look like a check."""
    return "".join(ch if ch.isalnum() or ch in " ._-/=,+$#@%&*[]" else "?" for ch in text)


def _chunks(ids: list[Any]) -> list[list[Any]]:
    return [ids[i : i + IDS_PER_STATEMENT] for i in range(0, len(ids), IDS_PER_STATEMENT)]


def _backup_name(source: Source, table: str, stamp: str, token: str, index: int) -> str:
    """``og_backup_<UTC stamp>_<plan token><n>_<table>``: unique per plan and per table even when
    PostgreSQL's 63-byte limit cuts the table's name."""
    schema, _, name = table.rpartition(".") if source.kind is SourceKind.POSTGRES and "." in table else ("", "", table)
    backup = f"og_backup_{stamp}_{token}{index}_{name}"
    if source.kind is SourceKind.POSTGRES:
        backup = backup.encode()[:PG_NAME_LIMIT].decode(errors="ignore")
    return f"{schema}.{backup}" if schema else backup


def _side_words(side: str) -> tuple[str, ...]:
    from .normalize import BUY_WORDS, SELL_WORDS

    return BUY_WORDS if side == "BUY" else SELL_WORDS


def _sealed(lines: list[str], header: list[str]) -> str:
    body = "\n".join(lines) + "\n"
    digest = hashlib.sha256(body.encode()).hexdigest()
    return "\n".join([MAGIC, *header, f"-- sha256: {digest}", MARKER]) + "\n" + body


def write_plan(report: AuditReport, path: str, *, now: datetime | None = None) -> PlanSummary:
    """Write the correction plan for ``report`` to ``path`` and its rollback beside it.

    Only duplicate clusters that the positions table confirms as phantoms are deleted (every
    duplicate cluster when no positions table was given: the header says so). The source is
    not touched. Raises :class:`~orderguard.errors.AuditPlanError` when no plan can be written.
    """
    source, table, cols = report.source, report.table, report.columns
    if not source.is_database or table is None:
        raise AuditPlanError(
            f"{source.location} is a {source.kind.value.upper()} file: a correction plan needs the history in a "
            "SQLite or PostgreSQL table (load the file into one, audit that, then --plan)"
        )
    if cols.id is None or not report.id_unique:
        raise AuditPlanError(
            f"table {table!r} has no column identifying each row uniquely"
            + (f" ({cols.id!r} repeats)" if cols.id else "")
            + "; pass --id COLUMN naming its primary key"
        )
    fixable = report.fixable()
    left_alone = _left_alone(report, fixable)
    if not fixable:
        raise AuditPlanError("nothing to correct: no duplicate cluster is confirmed as phantom" + _why(left_alone))
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S")
    token = secrets.token_hex(2)
    _check_free(path)
    pg = source.kind is SourceKind.POSTGRES
    watched = [table] + ([report.cash_ref.table] if report.cash_ref and report.cash_ref.table else [])
    setoff = [f"{name}: {what}" for name in watched for what in dependents(source, name)]
    if setoff:
        raise AuditPlanError(
            "the plan's changes would set off what it cannot back up or undo ("
            + "; ".join(setoff) + "); correct these rows by hand, or drop those first and plan again"
        )
    missing = report.cash_missing()
    if missing:
        raise AuditPlanError(
            f"phantom duplicates drained cash of {', '.join(missing)}, which the cash table has no row for; "
            "add the rows (or audit with --cash naming a table that has them) and plan again"
        )
    trades_cols = [c.name for c in table_columns(source, table) if not c.generated]
    rowid_only = cols.id == "rowid" and "rowid" not in [c.lower() for c in trades_cols]
    trades_q, key_q, symbol_q, side_q = _table_sql(source, table), quote(cols.id), quote(cols.symbol), quote(cols.side)
    backup = _backup_name(source, table, stamp, token, 1)
    backups = [backup]
    copy_cols = ([f'"rowid" AS {quote("og_rowid")}'] if rowid_only else []) + [quote(c) for c in trades_cols]
    lines = ["BEGIN;"] if pg else [BAIL, "BEGIN IMMEDIATE;"]
    lines.append(f"CREATE TABLE {_table_sql(source, backup)} AS SELECT {', '.join(copy_cols)} FROM {trades_q};")
    lines.append(
        f"-- check (the backup {_safe(backup)} holds every row of {_safe(table)}): expect 1 from SELECT CASE WHEN "
        f"(SELECT count(*) FROM {_table_sql(source, backup)}) = (SELECT count(*) FROM {trades_q}) THEN 1 ELSE 0 END"
    )
    cash_ref = report.cash_ref
    cash_delta: dict[tuple[str, ...], Decimal] = {}
    cash_backup = None
    if cash_ref is not None and report.cash is not None:
        cash_table = cash_ref.table
        assert cash_table is not None
        cash_backup = _backup_name(source, cash_table, stamp, token, 2)
        backups.append(cash_backup)
        lines.append(f"CREATE TABLE {_table_sql(source, cash_backup)} AS SELECT * FROM {_table_sql(source, cash_table)};")
        lines.append(
            f"-- check (the backup {_safe(cash_backup)} holds every row of {_safe(cash_table)}): expect 1 from SELECT CASE WHEN "
            f"(SELECT count(*) FROM {_table_sql(source, cash_backup)}) = (SELECT count(*) FROM {_table_sql(source, cash_table)}) THEN 1 ELSE 0 END"
        )
        cash_delta = {c.key: c.phantom for c in report.cash if c.phantom}
    deleted: list[Any] = []
    for cluster in sorted(fixable, key=lambda c: (c.symbol, c.first_us)):
        ids = list(cluster.repeat_ids)
        deleted.extend(ids)
        lines.append(f"-- {_one_line(_describe(report, cluster))}")
        for chunk in _chunks(ids):
            in_list = ", ".join(_literal(i) for i in chunk)
            lines.append(
                f"-- check ({len(chunk)} rows to delete are still {_safe(cluster.symbol)} {cluster.side.lower()}s): expect {len(chunk)} from "
                f"SELECT count(*) FROM {trades_q} WHERE {key_q} IN ({in_list}) AND trim(CAST({symbol_q} AS TEXT)) = {_literal(cluster.symbol)}"
                f" AND lower(trim(CAST({side_q} AS TEXT))) IN ({', '.join(sql_string(w) for w in _side_words(cluster.side))})"
            )
            lines.append(f"DELETE FROM {trades_q} WHERE {key_q} IN ({in_list});")
    rollback_lines = ["BEGIN;"] if pg else [BAIL, "BEGIN IMMEDIATE;"]
    all_ids = ", ".join(_literal(i) for i in deleted)
    rollback_lines.append(
        f"-- check (none of the {len(deleted)} deleted rows is back in {_safe(table)}): expect 0 from "
        f"SELECT count(*) FROM {trades_q} WHERE {key_q} IN ({all_ids})"
    )
    backup_key = quote("og_rowid") if rowid_only else key_q
    rollback_lines.append(
        f"-- check (the backup {_safe(backup)} still holds the {len(deleted)} rows): expect {len(deleted)} from "
        f"SELECT count(*) FROM {_table_sql(source, backup)} WHERE {backup_key} IN ({all_ids})"
    )
    insert_cols = (['"rowid"'] if rowid_only else []) + [quote(c) for c in trades_cols]
    select_cols = ([quote("og_rowid")] if rowid_only else []) + [quote(c) for c in trades_cols]
    override = " OVERRIDING SYSTEM VALUE" if pg else ""
    for chunk in _chunks(deleted):
        rollback_lines.append(
            f"INSERT INTO {trades_q} ({', '.join(insert_cols)}){override} SELECT {', '.join(select_cols)} "
            f"FROM {_table_sql(source, backup)} WHERE {backup_key} IN ({', '.join(_literal(i) for i in chunk)});"
        )
    if cash_ref is not None and cash_delta:
        cash_table = cash_ref.table
        assert cash_table is not None
        cash_col = quote(cash_ref.columns[-1])
        for key, delta in sorted(cash_delta.items()):
            where = _key_condition(cash_ref.columns[:-1], key)
            amount = canonical_decimal(delta)
            lines.append(f"-- cash of {_key_text(cash_ref.columns[:-1], key)}: + {amount} drained by the phantom duplicates above")
            lines.append(f"-- check (one cash row for {_key_text(cash_ref.columns[:-1], key)}): expect 1 from SELECT count(*) FROM {_table_sql(source, cash_table)}{where}")
            lines.append(f"UPDATE {_table_sql(source, cash_table)} SET {cash_col} = {cash_col} + {amount}{where};")
            rollback_lines.append(f"-- check (one cash row for {_key_text(cash_ref.columns[:-1], key)}): expect 1 from SELECT count(*) FROM {_table_sql(source, cash_table)}{where}")
            # The cash as it was, exactly (a REAL column would not survive + x - x), unless it moved
            # since the plan was applied: then only this plan's amount is taken back.
            before = f"(SELECT {cash_col} FROM {_table_sql(source, cash_backup or cash_table)}{where})"
            rollback_lines.append(
                f"UPDATE {_table_sql(source, cash_table)} SET {cash_col} = CASE WHEN {cash_col} = {before} + {amount} "
                f"THEN {before} ELSE {cash_col} - {amount} END{where};"
            )
    lines.append("COMMIT;")
    rollback_lines.append("COMMIT;")
    rollback_lines.append("-- the backups are kept; once no longer needed: " + " ".join(f"DROP TABLE {_table_sql(source, b)};" for b in backups))
    verified = (
        "UNVERIFIED: no positions table was given, so nothing confirmed these duplicates were never held; "
        "audit again with --positions before applying"
        if report.positions is None
        else "every deleted cluster's symbol: positions match the trades without the duplicates (PHANTOM)"
    )
    total_cash = sum(cash_delta.values(), Decimal(0))
    header = [
        f"-- written: {datetime.now(UTC).isoformat(timespec='seconds')} by orderguard audit",
        f"-- source: {source.display}  table: {table}  id column: {cols.id}",
        f"-- deletes {len(deleted)} duplicate rows in {len(fixable)} clusters"
        + (f"; adds {canonical_decimal(total_cash)} to {cash_ref.table}.{cash_ref.columns[-1]}" if cash_ref and cash_delta else ""),
        f"-- verified: {verified}",
        *(["-- rowid keys: SQLite renumbers them on VACUUM; apply this plan before any VACUUM, or plan again after"]
          if rowid_only else []),
        *[f"-- left alone: {_one_line(line)}" for line in left_alone],
        f"-- backups first: {', '.join(backups)} (full copies, in this database)",
        f"-- rollback: {os.path.basename(rollback_path(path))}",
        "-- review, then apply with: orderguard audit SOURCE --apply THIS_FILE",
    ]
    rollback_header = [
        f"-- rollback of {os.path.basename(path)}: puts back the {len(deleted)} deleted rows from {backup} and takes back the cash",
        f"-- source: {source.display}  table: {table}",
        "-- apply with: orderguard audit SOURCE --apply THIS_FILE",
    ]
    _write_pair(path, _sealed(lines, header), _sealed(rollback_lines, rollback_header))
    return PlanSummary(path, rollback_path(path), len(deleted), len(fixable), cash_delta, tuple(backups), tuple(left_alone))


def _check_free(path: str) -> None:
    for target in (path, rollback_path(path)):
        folder = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(folder):
            raise AuditPlanError(f"cannot write {target}: folder {folder} does not exist")
        if os.path.exists(target):
            raise AuditPlanError(f"{target} exists; a plan and its rollback are never overwritten (choose another name)")


def _write_pair(path: str, plan: str, rollback: str) -> None:
    """Both files or neither."""
    _check_free(path)
    written: list[str] = []
    try:
        for target, text in ((rollback_path(path), rollback), (path, plan)):
            with open(target, "x", encoding="utf-8") as handle:
                written.append(target)
                handle.write(text)
    except OSError as exc:
        for target in written:
            with contextlib.suppress(OSError):
                os.remove(target)
        raise AuditPlanError(f"cannot write {path}: {exc.strerror}; no plan was written") from None


def _key_condition(columns: tuple[str, ...], key: tuple[str, ...]) -> str:
    if not columns:
        return ""
    return " WHERE " + " AND ".join(f"CAST({quote(c)} AS TEXT) = {_literal(v)}" for c, v in zip(columns, key, strict=True))


def _key_text(columns: tuple[str, ...], key: tuple[str, ...]) -> str:
    return _safe(", ".join(f"{c}={v}" for c, v in zip(columns, key, strict=True))) or "the account"


def _describe(report: AuditReport, c: Cluster) -> str:
    scope = " ".join(c.scope)
    return (
        f"{c.symbol} {scope} {c.side}: {c.repeats} duplicates of {report.columns.id} {c.first_id} at {iso_us(c.first_us)}, "
        f"{canonical_decimal(c.excess_qty)} shares, {canonical_decimal(c.phantom_notional)} notional, confidence {c.confidence}"
    )


def _left_alone(report: AuditReport, fixable: list[Cluster]) -> list[str]:
    kept = {id(c) for c in fixable}
    out = []
    for c in report.duplicates:
        if id(c) in kept:
            continue
        status = report.status_of(c)
        why = {
            "REAL": "the positions hold them: the venue filled these; reduce the position there, do not delete history",
            "OK": "its buy and sell duplicates cancel out, so the positions cannot tell: look at this symbol by hand",
        }.get(status.value, "the positions match neither with nor without them: look at this symbol by hand")
        out.append(f"{c.symbol} {' '.join(c.scope)} {c.side} ({c.repeats} duplicates, {status.value}): {why}")
    return out


def _why(left_alone: list[str]) -> str:
    return (": " + "; ".join(left_alone)) if left_alone else ""


@dataclass(frozen=True)
class _Step:
    sql: str
    check: tuple[str, str] | None  # (why, expected value)


def read_plan(path: str) -> tuple[list[str], list[_Step]]:
    """The header lines and steps of a plan or rollback, refusing one that was edited."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise AuditPlanError(f"cannot read plan {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise AuditPlanError(f"{path} is not an orderguard plan (not UTF-8 text)") from None
    if not text.startswith(MAGIC) or f"\n{MARKER}\n" not in text:
        raise AuditPlanError(f"{path} is not an orderguard plan (written by orderguard audit --plan)")
    head, body = text.split(f"\n{MARKER}\n", 1)
    digest = next((line.split(": ", 1)[1] for line in head.splitlines() if line.startswith("-- sha256: ")), "")
    if hashlib.sha256(body.encode()).hexdigest() != digest:
        raise AuditPlanError(
            f"{path} was edited after it was written, so --apply refuses it; run the edited script by hand "
            "(sqlite3/psql) after review, or write a new plan with --plan"
        )
    steps: list[_Step] = []
    for line in body.split("\n"):  # only "\n" ends a line: other separators are not line ends here
        if not line.strip() or line == BAIL:
            continue
        match = CHECK.match(line)
        if match:
            steps.append(_Step(match["sql"], (match["why"], match["value"])))
        elif not line.startswith("--"):
            steps.append(_Step(line.rstrip(";"), None))
    statements = [step.sql for step in steps if step.check is None]
    kinds = [sql.split(" ", 1)[0].upper() for sql in statements]
    if kinds[:1] != ["BEGIN"] or kinds[-1:] != ["COMMIT"] or kinds.count("BEGIN") != 1 or kinds.count("COMMIT") != 1:
        raise AuditPlanError(f"{path} does not run in one transaction; refused")
    _require_backups(path, statements)
    return head.splitlines(), steps


_BACKUP = re.compile(r'^CREATE TABLE (?P<backup>.+?) AS SELECT .* FROM (?P<table>"(?:[^"]|"")*"(?:\."(?:[^"]|"")*")?)$')
_CHANGE = re.compile(r'^(?:DELETE FROM|UPDATE) (?P<table>"(?:[^"]|"")*"(?:\."(?:[^"]|"")*")?) ')
_RESTORE = re.compile(r'^INSERT INTO .* FROM (?P<backup>"(?:[^"]|"")*"(?:\."(?:[^"]|"")*")?) WHERE ')


def _require_backups(path: str, statements: list[str]) -> None:
    """Every table a plan deletes from or updates was copied whole earlier in the same transaction;
    a rollback restores from such a copy. Otherwise the plan is refused."""
    backed_up: set[str] = set()
    backups: set[str] = set()
    restores = False
    for sql in statements:
        made = _BACKUP.match(sql)
        if made:
            backed_up.add(made["table"])
            backups.add(made["backup"])
            continue
        if _RESTORE.match(sql):
            restores = True
            continue
        changed = _CHANGE.match(sql)
        if changed and changed["table"] not in backed_up and not restores:
            raise AuditPlanError(f"{path} changes {changed['table']} without taking a backup of it first; refused")
        if not changed and sql.split(" ", 1)[0].upper() not in ("BEGIN", "COMMIT"):
            raise AuditPlanError(f"{path} holds a statement orderguard plans never hold ({sql[:60]}...); refused")


def apply_plan(source: Source | str, path: str) -> ApplyResult:
    """Run a plan (or its rollback) written by :func:`write_plan` against ``source``, in one
    transaction: every check must hold or nothing is changed."""
    from .source import parse_source

    src = source if isinstance(source, Source) else parse_source(source)
    if not src.is_database:
        raise AuditPlanError(f"{src.location} is a file; plans apply to SQLite and PostgreSQL tables")
    _head, steps = read_plan(path)
    if src.kind is SourceKind.SQLITE:
        return _run_sqlite(src.location, steps, path)
    return _run_postgres(src.location, steps, path)


def _check_value(conn: Any, step: _Step, path: str) -> Any:
    try:
        row = conn.execute(step.sql).fetchone()
    except Exception as exc:  # sqlite3.Error or psycopg.Error: the check could not even run
        assert step.check is not None
        raise AuditPlanError(
            f"{path}: check ({step.check[0]}) could not run: {str(exc).strip().splitlines()[0]}; nothing was changed"
        ) from None
    return None if row is None else row[0]


def _tally(result: dict[str, int], sql: str, rowcount: int) -> None:
    verb = sql.split(" ", 1)[0].upper()
    key = {"DELETE": "deleted", "UPDATE": "updated", "INSERT": "inserted"}.get(verb)
    if key:
        result[key] += max(rowcount, 0)


def _refuse(path: str, why: str, expected: str, got: Any) -> AuditPlanError:
    return AuditPlanError(
        f"{path}: check failed: {why} (expected {expected}, found {got}); nothing was changed. "
        "The source changed since the plan was written, or it was applied already: audit again and write a new plan"
    )


def _failed(path: str, sql: str, error: str) -> AuditPlanError:
    if sql.startswith("CREATE TABLE") and ("already exists" in error or "pg_type_typname_nsp_index" in error):
        return AuditPlanError(
            f"{path}: its backup table exists already: this plan was applied before, or another process is applying "
            f"it right now ({error}); nothing was changed. To undo an applied plan, apply {rollback_path(path)}"
        )
    return AuditPlanError(f"{path}: {sql[:100]}... failed: {error}; nothing was changed")


def _run_sqlite(db: str, steps: list[_Step], path: str) -> ApplyResult:
    if not os.path.exists(db):
        raise AuditSourceError(f"source {db} does not exist")
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)

    def rollback() -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    try:
        return _run(conn, steps, path, sqlite3.Error, rollback)
    finally:
        conn.close()


def _run_postgres(url: str, steps: list[_Step], path: str) -> ApplyResult:
    try:
        import psycopg
    except ImportError as exc:
        raise AuditPlanError(f"a PostgreSQL plan needs psycopg: pip install 'orderguard[postgres]' ({exc.name} missing)") from None

    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=10, options="-c lock_timeout=30s")
    except psycopg.Error as exc:
        raise AuditSourceError(f"cannot connect to {redact_url(url)}: {str(exc).strip().splitlines()[0]}") from None

    def rollback() -> None:
        with contextlib.suppress(psycopg.Error):  # a broken connection rolls back by itself
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.execute("ROLLBACK")

    try:
        return _run(conn, steps, path, psycopg.Error, rollback)
    finally:
        conn.close()


def _run(conn: Any, steps: list[_Step], path: str, db_error: type[Exception], rollback: Callable[[], None]) -> ApplyResult:
    """The steps in order on an autocommit connection (the plan's BEGIN/COMMIT make the transaction);
    any failed check or statement rolls everything back."""
    counts = {"deleted": 0, "updated": 0, "inserted": 0}
    checks = statements = 0
    try:
        for step in steps:
            if step.check is not None:
                got = _check_value(conn, step, path)
                checks += 1
                if str(got) != step.check[1]:
                    raise _refuse(path, step.check[0], step.check[1], got)
                continue
            try:
                cursor = conn.execute(step.sql)
            except db_error as exc:
                raise _failed(path, step.sql, str(exc).strip().splitlines()[0]) from None
            statements += 1
            _tally(counts, step.sql, cursor.rowcount)
    except BaseException:
        rollback()
        raise
    return ApplyResult(statements, checks, **counts)
