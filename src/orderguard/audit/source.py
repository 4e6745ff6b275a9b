"""Where a trade history lives, and how its tables get into DuckDB.

CSV and Parquet files are read by DuckDB itself. SQLite and PostgreSQL tables are streamed out
(SQLite through the standard library, PostgreSQL with ``COPY ... TO STDOUT``) into a temporary
CSV that DuckDB loads, because DuckDB's database scanners are extensions downloaded at run time
and an audit must work on a machine without network access. Sources are opened read-only.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sqlite3
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import AuditSourceError
from ..intent import is_text

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import duckdb

MAX_NAME_LENGTH = 128
SQLITE_MAGIC = b"SQLite format 3\x00"
CSV_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".txt")
PARQUET_SUFFIXES = (".parquet", ".pq")
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3", ".db3")
FETCH_ROWS = 50_000


class SourceKind(StrEnum):
    SQLITE = "sqlite"
    POSTGRES = "postgresql"
    CSV = "csv"
    PARQUET = "parquet"


@dataclass(frozen=True)
class Source:
    """A trade history: a database (tables named separately) or one CSV/Parquet file."""

    kind: SourceKind
    location: str  # file path, or the PostgreSQL connection URL

    @property
    def is_database(self) -> bool:
        return self.kind in (SourceKind.SQLITE, SourceKind.POSTGRES)

    @property
    def display(self) -> str:
        """The location with any password replaced by ``***`` (safe for logs and reports)."""
        return redact_url(self.location) if self.kind is SourceKind.POSTGRES else self.location


def redact_url(url: str) -> str:
    """``url`` with the password of its user part and any ``password=`` parameter shown as ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostport = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    query = "&".join(
        f"{key}=***" if key.lower() in ("password", "sslpassword") else (f"{key}={value}" if value or "=" in pair else key)
        for pair in parts.query.split("&") if pair
        for key, _, value in [pair.partition("=")]
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def parse_source(text: str) -> Source:
    """A source from the command line: a PostgreSQL URL, ``sqlite:///path``, or a file path
    (SQLite recognised by its header, CSV and Parquet by their suffix)."""
    if not text or not is_text(text):
        raise AuditSourceError("the source is empty; give a SQLite file, a postgresql:// URL, or a CSV/Parquet file")
    if text.startswith(("postgresql://", "postgres://")):
        return Source(SourceKind.POSTGRES, text)
    if text.startswith("sqlite:///"):
        text = text[len("sqlite://"):]
    elif "://" in text:
        raise AuditSourceError(f"unsupported source {redact_url(text)}: use a postgresql:// URL, sqlite:///path or a file path")
    try:
        os.stat(text)
    except FileNotFoundError:
        raise AuditSourceError(f"source {text} does not exist") from None
    except OSError as exc:  # a folder on the way that this user may not enter, a name too long
        raise AuditSourceError(f"cannot read source {text}: {exc.strerror}") from None
    if os.path.isdir(text):
        raise AuditSourceError(f"source {text} is a folder; give the file itself")
    try:
        with open(text, "rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise AuditSourceError(f"cannot read source {text}: {exc.strerror}") from None
    lower = text.lower()
    if head == SQLITE_MAGIC:
        return Source(SourceKind.SQLITE, text)
    if lower.endswith(PARQUET_SUFFIXES):
        return Source(SourceKind.PARQUET, text)
    if lower.endswith(CSV_SUFFIXES):
        return Source(SourceKind.CSV, text)
    if lower.endswith(SQLITE_SUFFIXES):
        raise AuditSourceError(f"{text} is not a SQLite database (its header is not SQLite's)")
    raise AuditSourceError(f"cannot tell what {text} is: name a .csv, .parquet or SQLite file, or a postgresql:// URL")


def check_name(name: str, what: str) -> str:
    """A table or column name as given, refused if it cannot be a name (quoting does the rest)."""
    if not name or not name.strip():
        raise AuditSourceError(f"{what} name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise AuditSourceError(f"{what} name is longer than {MAX_NAME_LENGTH} characters")
    if not is_text(name) or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise AuditSourceError(f"{what} name {name!r} holds control characters")
    return name


def quote(name: str) -> str:
    """A double-quoted SQL identifier (SQLite, PostgreSQL and DuckDB all read this form)."""
    return '"' + name.replace('"', '""') + '"'


def quote_table(table: str) -> str:
    """``schema.table`` quoted part by part; a plain name quoted whole."""
    return ".".join(quote(part) for part in table.split(".", 1)) if "." in table else quote(table)


def sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # as the source declares it (upper case; empty when undeclared)
    generated: bool = False  # computed by the database: never copied back by a rollback


def _sqlite_connect(path: str) -> sqlite3.Connection:
    try:
        uri = pathlib.Path(path).resolve().as_uri() + "?mode=ro"  # percent-encodes '%', '?' and '#' in the name
        conn = sqlite3.connect(uri, uri=True)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise AuditSourceError(f"cannot read SQLite database {path}: {exc}") from None
    return conn


def _pg_connect(url: str) -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise AuditSourceError(f"a PostgreSQL source needs psycopg: pip install 'orderguard[postgres]' ({exc.name} missing)") from None
    try:
        conn = psycopg.connect(url, connect_timeout=10)
    except psycopg.Error as exc:
        raise AuditSourceError(f"cannot connect to {redact_url(url)}: {str(exc).strip().splitlines()[0]}") from None
    conn.read_only = True
    return conn


class Snapshot:
    """One read-only transaction over a database source, so the trades, positions and cash an
    audit reads are from the same moment (a trade committed together with its position and cash
    is seen whole or not at all). SQLite: one connection in one read transaction (in WAL mode
    writers go on; in rollback-journal mode they wait until the reading is done). PostgreSQL:
    one REPEATABLE READ transaction. For file sources it holds nothing."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.conn: Any = None

    def __enter__(self) -> Snapshot:
        if self.source.kind is SourceKind.SQLITE:
            conn = _sqlite_connect(self.source.location)
            conn.isolation_level = None
            conn.execute("BEGIN")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the read snapshot starts here
            self.conn = conn
        elif self.source.kind is SourceKind.POSTGRES:
            import psycopg

            conn = _pg_connect(self.source.location)
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            self.conn = conn
        return self

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.rollback() if self.source.kind is SourceKind.POSTGRES else self.conn.execute("ROLLBACK")
            self.conn.close()
            self.conn = None


@contextlib.contextmanager
def _connection(source: Source, snapshot: Snapshot | None) -> Iterator[Any]:
    """The snapshot's connection, or a fresh read-only one closed afterwards."""
    if snapshot is not None and snapshot.conn is not None:
        yield snapshot.conn
        return
    if source.kind is SourceKind.SQLITE:
        conn = _sqlite_connect(source.location)
        try:
            yield conn
        finally:
            conn.close()
        return
    with _pg_connect(source.location) as pg:
        yield pg


def list_tables(source: Source, snapshot: Snapshot | None = None) -> list[str]:
    """The tables of a database source (``schema.table`` for PostgreSQL schemas other than public)."""
    if source.kind is SourceKind.SQLITE:
        with _connection(source, snapshot) as conn:
            return [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table','view') ORDER BY name")]
    if source.kind is SourceKind.POSTGRES:
        with _connection(source, snapshot) as conn:
            rows = conn.execute(
                "SELECT table_schema, table_name FROM information_schema.tables "
                "WHERE table_schema NOT IN ('pg_catalog','information_schema') ORDER BY 1, 2"
            ).fetchall()
        return [name if schema == "public" else f"{schema}.{name}" for schema, name in rows]
    return []


def table_columns(source: Source, table: str | None, snapshot: Snapshot | None = None) -> list[Column]:
    """The columns of ``table`` (or of the file), in order; a missing table is named with the ones there are."""
    if source.kind is SourceKind.SQLITE:
        assert table is not None
        check_name(table, "table")
        with _connection(source, snapshot) as conn:
            rows = conn.execute(f"PRAGMA table_xinfo({quote(table)})").fetchall()
        if not rows:
            _missing_table(source, table, snapshot)
        # hidden 2/3: generated columns (1: virtual-table hidden columns, not data)
        return [Column(r[1], (r[2] or "").upper(), r[6] in (2, 3)) for r in rows if r[6] != 1]
    if source.kind is SourceKind.POSTGRES:
        assert table is not None
        check_name(table, "table")
        # the table the data reads will see (search_path and all), resolved by PostgreSQL itself
        with _connection(source, snapshot) as conn:
            rows = conn.execute(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attgenerated <> '' FROM pg_attribute a "
                "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                (quote_table(table),),
            ).fetchall()
        if not rows:
            _missing_table(source, table, snapshot)
        return [Column(r[0], str(r[1]).upper(), bool(r[2])) for r in rows]
    import duckdb

    con = duckdb.connect()
    try:
        rows = con.execute(f"DESCRIBE SELECT * FROM {file_scan(source)}").fetchall()
    except duckdb.Error as exc:
        raise AuditSourceError(f"cannot read {source.kind.value.upper()} file {source.location}: {_first_line(exc)}") from None
    finally:
        con.close()
    if not rows:
        raise AuditSourceError(f"{source.location} has no columns")
    return [Column(r[0], str(r[1]).upper()) for r in rows]


def stored_as_integers(source: Source, table: str, column: str, snapshot: Snapshot | None = None) -> bool:
    """Whether every value of an undeclared SQLite column is stored as an integer (so a plan names
    its rows with integer literals; text '2' is not the integer 2 to SQLite)."""
    with _connection(source, snapshot) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM {quote(table)} WHERE typeof({quote(column)}) NOT IN ('integer', 'null')"
        ).fetchone()
    return row is not None and row[0] == 0


def dependents(source: Source, table: str, snapshot: Snapshot | None = None) -> list[str]:
    """Triggers on ``table`` and foreign keys pointing at it: a plan's deletes would set them off
    (cascading deletes of rows no backup holds, a trigger adjusting cash a second time)."""
    found: list[str] = []
    with _connection(source, snapshot) as conn:
        if source.kind is SourceKind.SQLITE:
            found += [f"trigger {r[0]}" for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?", (table,))]
            for (other,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                for fk in conn.execute(f"PRAGMA foreign_key_list({quote(other)})").fetchall():
                    if fk[2] == table:
                        found.append(f"foreign key of {other} ({fk[3]}) ON DELETE {fk[6]}")
        else:
            found += [f"trigger {r[0]}" for r in conn.execute(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND NOT tgisinternal", (quote_table(table),))]
            found += [f"foreign key {r[0]} of {r[1]}" for r in conn.execute(
                "SELECT conname, conrelid::regclass::text FROM pg_constraint WHERE contype = 'f' AND confrelid = to_regclass(%s)",
                (quote_table(table),))]
    return found


def has_rowid(source: Source, table: str, snapshot: Snapshot | None = None) -> bool:
    """Whether a SQLite table has a rowid to stand in as its row key (WITHOUT ROWID tables and views do not)."""
    if source.kind is not SourceKind.SQLITE:
        return False
    with _connection(source, snapshot) as conn:
        try:
            row = conn.execute(f"SELECT rowid FROM {quote(table)} LIMIT 1").fetchone()
        except sqlite3.Error:
            return False
    return row is None or row[0] is not None


def _missing_table(source: Source, table: str, snapshot: Snapshot | None = None) -> None:
    there = ", ".join(list_tables(source, snapshot)) or "none"
    raise AuditSourceError(f"no table {table!r} in {source.display} (tables: {there}); pass --table NAME")


def file_scan(source: Source) -> str:
    """The DuckDB table function reading a CSV (every column as text: we parse) or Parquet file."""
    path = sql_string(source.location)
    if source.kind is SourceKind.PARQUET:
        return f"read_parquet({path})"
    return f"read_csv({path}, header = true, all_varchar = true)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_table(
    con: duckdb.DuckDBPyConnection,
    source: Source,
    table: str | None,
    columns: list[str],
    into: str,
    *,
    rowid: bool = False,
    progress: Callable[[int], None] | None = None,
    total: Callable[[int], None] | None = None,
    snapshot: Snapshot | None = None,
) -> int:
    """Create DuckDB table ``into`` holding ``columns`` of the source (plus ``__og_rowid``, SQLite's
    rowid, when ``rowid``); returns its row count. File sources are read in place."""
    import duckdb

    for name in columns:
        check_name(name, "column")
    if source.kind in (SourceKind.CSV, SourceKind.PARQUET):
        select = ", ".join(quote(c) for c in columns)
        try:
            con.execute(f"CREATE OR REPLACE TEMP VIEW {quote(into)} AS SELECT {select} FROM {file_scan(source)}")
            (count,) = con.execute(f"SELECT count(*) FROM {quote(into)}").fetchone() or (0,)
        except duckdb.Error as exc:
            raise AuditSourceError(f"cannot read {source.location}: {_first_line(exc)}") from None
        return int(count)
    assert table is not None
    names = [*columns, "__og_rowid"] if rowid else list(columns)
    with tempfile.TemporaryDirectory(prefix="orderguard-audit-") as folder:
        path = os.path.join(folder, "table.csv")
        with _connection(source, snapshot) as conn:
            if source.kind is SourceKind.SQLITE:
                _sqlite_to_csv(conn, source.location, table, columns, rowid, path, progress, total)
            else:
                _pg_to_csv(conn, source.location, table, columns, path, progress, total)
        types = "{" + ", ".join(f"{sql_string(n)}: 'VARCHAR'" for n in names) + "}"
        try:
            con.execute(
                f"CREATE OR REPLACE TEMP TABLE {quote(into)} AS SELECT * FROM read_csv({sql_string(path)}, header = true, "
                f"columns = {types}, nullstr = '', allow_quoted_nulls = false, quote = '\"', escape = '\"', delim = ',', "
                "strict_mode = true)"
            )
        except duckdb.Error as exc:
            raise AuditSourceError(f"cannot load table {table!r} of {source.display}: {_first_line(exc)}") from None
    (count,) = con.execute(f"SELECT count(*) FROM {quote(into)}").fetchone() or (0,)
    return int(count)


def _sqlite_csv_field(column: str) -> str:
    # SQLite writes each CSV field itself (C speed): NULL is the one unquoted empty field, every
    # value is quoted text (REAL as SQLite shows it, 15 significant digits), a BLOB becomes x'..',
    # which no role parses, so a blob is never taken for a number or a time.
    col = quote(column)
    blob = "'\"x''' || hex(" + col + ") || '''\"'"
    text = "'\"' || replace(CAST(" + col + " AS TEXT), '\"', '\"\"') || '\"'"
    return f"CASE WHEN {col} IS NULL THEN '' WHEN typeof({col}) = 'blob' THEN {blob} ELSE {text} END"


def _sqlite_to_csv(
    conn: sqlite3.Connection, path: str, table: str, columns: list[str], rowid: bool, out: str,
    progress: Callable[[int], None] | None, total: Callable[[int], None] | None,
) -> None:
    fields = [_sqlite_csv_field(c) for c in columns] + (["rowid"] if rowid else [])
    line = " || ',' || ".join(fields)
    written = 0
    try:
        if total is not None:
            total(int(conn.execute(f"SELECT count(*) FROM {quote(table)}").fetchone()[0]))
        cursor = conn.execute(f"SELECT {line} FROM {quote(table)}")
        with open(out, "w", encoding="utf-8", newline="") as handle:
            handle.write(",".join(_csv_header(c) for c in [*columns, *(["__og_rowid"] if rowid else [])]) + "\n")
            while batch := cursor.fetchmany(FETCH_ROWS):
                handle.write("\n".join([row[0] for row in batch]))
                handle.write("\n")
                written += len(batch)
                if progress is not None:
                    progress(written)
    except sqlite3.Error as exc:
        raise AuditSourceError(f"cannot read table {table!r} of {path}: {exc}") from None


def _pg_to_csv(
    conn: Any, url: str, table: str, columns: list[str], out: str,
    progress: Callable[[int], None] | None, total: Callable[[int], None] | None,
) -> None:
    import psycopg

    select = ", ".join(f"{quote(c)}::text" for c in columns)
    written = 0
    try:
        if total is not None:
            total(int(conn.execute(f"SELECT count(*) FROM {quote_table(table)}").fetchone()[0]))
        with conn.cursor() as cur, open(out, "wb") as handle:
            header = ",".join(_csv_header(c) for c in columns) + "\n"
            handle.write(header.encode())
            # PostgreSQL's CSV: NULL is the unquoted empty field, an empty string is quoted
            with cur.copy(f"COPY (SELECT {select} FROM {quote_table(table)}) TO STDOUT WITH (FORMAT csv, FORCE_QUOTE *)") as copy:
                for block in copy:
                    handle.write(block)
                    written += bytes(block).count(b"\n")
                    if progress is not None:
                        progress(written)
    except psycopg.Error as exc:
        raise AuditSourceError(f"cannot read table {table!r} of {redact_url(url)}: {_first_line(exc)}") from None


def _csv_header(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
