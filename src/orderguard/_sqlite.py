"""SQLite connection handling shared by the ledger store and the paper venue.

One connection per thread (SQLite connections are not for sharing), WAL, ``BEGIN IMMEDIATE``
for every write so writers queue on SQLite's lock for at most ``busy_timeout``, and fork
safety: a child process never touches its parent's connections.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError, StoreError, StoreLocked, StoreUnavailable

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

SYNCHRONOUS_MODES = ("FULL", "NORMAL", "EXTRA")
_INHERITED: list[sqlite3.Connection] = []  # a forked child's copies of its parent's connections


class SQLiteFile:
    """Per-thread connections to one SQLite file in WAL mode."""

    def __init__(self, path: str, *, synchronous: str = "FULL", busy_timeout: float = 5.0, label: str = "ledger") -> None:
        sync = synchronous.upper()
        if sync not in SYNCHRONOUS_MODES:
            raise ConfigurationError(f"synchronous must be one of {SYNCHRONOUS_MODES}, not {synchronous!r}")
        if not busy_timeout > 0:
            raise ConfigurationError("busy_timeout must be positive seconds")
        self.path = path
        self.label = label
        self.synchronous = sync
        self.busy_timeout = float(busy_timeout)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._pid = os.getpid()

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreUnavailable(f"{self.label} {self.path!r} cannot use WAL mode (got {mode})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        except sqlite3.DatabaseError as exc:
            raise self.translate(exc, "open") from exc
        return conn

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (a new one after fork)."""
        pid = os.getpid()
        if pid != self._pid:
            # Closing or garbage-collecting the parent's connections here could disturb its
            # locks and WAL: keep them referenced and unused for the child's lifetime.
            _INHERITED.extend(self._all)
            self._pid = pid
            self._local = threading.local()
            self._all = []
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE ... COMMIT``; rolled back on any error."""
        conn = self.conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as exc:
            raise self.translate(exc, what) from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                with suppress(sqlite3.DatabaseError):
                    conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.DatabaseError):
                raise self.translate(exc, what) from exc
            raise

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self.conn().execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise self.translate(exc, "read") from exc

    def translate(self, exc: sqlite3.DatabaseError, what: str) -> StoreError:
        text = str(exc)
        where = f"{self.label} {self.path!r}"
        if "locked" in text or "busy" in text:
            return StoreLocked(
                f"{where} stayed locked by another writer for more than {self.busy_timeout:g}s "
                f"during {what}; nothing was sent. Look for a stuck process holding the file, or "
                "raise busy_timeout."
            )
        if "not a database" in text or "malformed" in text or "unable to open" in text:
            return StoreUnavailable(f"{where} cannot be used ({text}) during {what}; nothing was sent.")
        return StoreError(f"{where} failed during {what}: {text}; nothing was sent.")

    def close(self) -> None:
        with self._all_lock:
            conns, self._all = self._all, []
        if os.getpid() == self._pid:
            for conn in conns:
                with suppress(sqlite3.Error):
                    conn.close()
        self._local = threading.local()
