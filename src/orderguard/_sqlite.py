"""SQLite connection handling shared by the ledger store and the paper venue.

One connection per thread (SQLite connections are not for sharing), WAL, ``BEGIN IMMEDIATE``
for every write so writers queue on SQLite's lock for at most ``busy_timeout``, and fork
safety: a child process never touches its parent's connections.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError, StoreError, StoreLocked, StoreUnavailable

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

SYNCHRONOUS_MODES = ("FULL", "NORMAL", "EXTRA")
SQLITE_BUSY, SQLITE_LOCKED = 5, 6
log = logging.getLogger("orderguard")
_INHERITED: list[sqlite3.Connection] = []


class _ForkGate:
    """Keeps fork() out of every SQLite call of this process.

    SQLite keeps per-process lock bookkeeping for each open file; a child forked while another
    thread is inside a transaction inherits "a sibling holds the lock" and can never write.
    Every SQLite call runs inside ``gate.use()``; a fork waits until none is in progress.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        self._forking = False
        self._mine = threading.local()

    @contextmanager
    def use(self) -> Iterator[None]:
        mine = getattr(self._mine, "n", 0)
        if mine == 0:
            with self._cond:
                while self._forking:
                    self._cond.wait()
                self._active += 1
        self._mine.n = mine + 1
        try:
            yield
        finally:
            self._mine.n = mine
            if mine == 0:
                with self._cond:
                    self._active -= 1
                    if not self._active:
                        self._cond.notify_all()

    def before_fork(self) -> None:
        self._cond.acquire()
        self._forking = True
        own = 1 if getattr(self._mine, "n", 0) else 0  # a thread forking from inside a call
        while self._active > own:
            self._cond.wait()

    def after_fork_in_parent(self) -> None:
        self._forking = False
        self._cond.notify_all()
        self._cond.release()


_GATE = _ForkGate()


# The handlers look _GATE up at fork time: a child gets a fresh gate and may fork again.
def _before_fork() -> None:
    _GATE.before_fork()


def _after_fork_in_parent() -> None:
    _GATE.after_fork_in_parent()


def _after_fork_in_child() -> None:
    global _GATE
    _GATE = _ForkGate()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)  # a forked child's copies of its parent's connections


class SQLiteFile:
    """Per-thread connections to one SQLite file in WAL mode."""

    def __init__(
        self, path: str, *, synchronous: str = "FULL", busy_timeout: float = 5.0, label: str = "ledger",
        autocheckpoint: bool = True,
    ) -> None:
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
        self._owners: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._all_lock = threading.Lock()
        self._pid = os.getpid()
        # Without autocheckpoint the owner runs start_checkpointer(): checkpoints off its hot path.
        self.autocheckpoint = autocheckpoint
        self._checkpointer: tuple[int, float] | None = None
        self._checkpointer_stop: threading.Event | None = None
        self._checkpointer_thread: threading.Thread | None = None
        self._closed = False
        self._page = 0

    def _connect(self) -> sqlite3.Connection:
        # Switching a new file to WAL while another process creates it can be refused at once
        # (SQLite skips the busy handler where waiting could deadlock): retry until busy_timeout.
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                conn = sqlite3.connect(
                    self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
                )
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreUnavailable(f"{self.label} {self.path!r} cannot use WAL mode (got {mode})")
                conn.execute(f"PRAGMA synchronous = {self.synchronous}")
                if not self.autocheckpoint:
                    conn.execute("PRAGMA wal_autocheckpoint = 0")
                return conn
            except sqlite3.DatabaseError as exc:
                busy = getattr(exc, "sqlite_errorcode", 0) & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED)
                if not busy or time.monotonic() > deadline:
                    raise self.translate(exc, "open") from exc
                time.sleep(0.01)

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (a new one after fork)."""
        if self._closed:
            raise StoreUnavailable(f"{self.label} {self.path!r} was closed; open it again to use it")
        pid = os.getpid()
        if pid != self._pid:
            # Closing or garbage-collecting the parent's connections here could disturb its
            # locks and WAL: keep them referenced and unused for the child's lifetime.
            _INHERITED.extend(self._all)
            self._pid = pid
            self._local = threading.local()
            self._all = []
            self._owners = []
            if self._checkpointer is not None:  # threads do not survive fork()
                self.start_checkpointer(*self._checkpointer)
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            with _GATE.use():
                conn = self._connect()
            self._local.conn = conn
            me = threading.current_thread()
            with self._all_lock:
                # Threads come and go (thread-per-order code): close what dead threads left.
                dead = [c for t, c in self._owners if not t.is_alive()]
                self._owners = [(t, c) for t, c in self._owners if t.is_alive()] + [(me, conn)]
                self._all = [c for _, c in self._owners]
            for stale in dead:
                with contextlib.suppress(sqlite3.Error):
                    stale.close()
        return conn

    @contextmanager
    def write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE ... COMMIT``; rolled back on any error."""
        with _GATE.use(), self._write(what) as conn:
            yield conn

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
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
        with _GATE.use():
            try:
                return self.conn().execute(sql, params).fetchall()
            except sqlite3.DatabaseError as exc:
                raise self.translate(exc, "read") from exc

    def start_checkpointer(self, limit: int, interval: float = 0.2) -> None:
        """Keep the WAL short from a daemon thread of this process (restarted after fork).

        Every ``interval`` a PASSIVE checkpoint copies committed pages into the database without
        blocking anyone. Under a continuous stream of writes a passive checkpoint never catches
        up, so the WAL would grow forever (and a growing WAL makes every commit slower); once it
        holds more than ``limit`` bytes, a RESTART checkpoint briefly holds writers back while it
        copies the few pages the passive one left, and the WAL starts over. The thread has its
        own connection, opened and closed by itself; close() stops and joins it first.
        """
        self._checkpointer = (limit, interval)
        stop = threading.Event()
        self._checkpointer_stop = stop

        def loop() -> None:
            conn: sqlite3.Connection | None = None
            try:
                while not stop.wait(interval):
                    try:
                        with _GATE.use():
                            if stop.is_set():
                                break
                            conn = conn or self._connect()
                            self._checkpoint(conn, limit)
                    except Exception as exc:  # never let housekeeping kill the process
                        log.warning("WAL checkpoint of %s failed: %s", self.path, exc)
            finally:
                if conn is not None:
                    with suppress(sqlite3.Error):
                        conn.close()

        name = f"orderguard-checkpoint:{os.path.basename(self.path)}"
        self._checkpointer_thread = threading.Thread(target=loop, name=name, daemon=True)
        self._checkpointer_thread.start()

    def _checkpoint(self, conn: sqlite3.Connection, limit: int) -> None:
        """One round: PASSIVE, then RESTART if the WAL still holds more than ``limit`` bytes."""
        try:
            _, wal_frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if wal_frames * self._page_size(conn) > limit:
                conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        except sqlite3.DatabaseError as exc:  # busy or locked: the next round tries again
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF not in (SQLITE_BUSY, SQLITE_LOCKED):
                raise self.translate(exc, "checkpoint") from exc

    def _page_size(self, conn: sqlite3.Connection) -> int:
        if not self._page:
            self._page = int(conn.execute("PRAGMA page_size").fetchone()[0])
        return self._page

    def translate(self, exc: sqlite3.DatabaseError, what: str) -> StoreError:
        text = str(exc)
        where = f"{self.label} {self.path!r}"
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # primary result code
        if code in (SQLITE_BUSY, SQLITE_LOCKED):
            return StoreLocked(
                f"{where} was locked by another writer (waited up to {self.busy_timeout:g}s) "
                f"during {what}; nothing was sent. Look for a stuck process holding the file, or "
                "raise busy_timeout."
            )
        if "not a database" in text or "malformed" in text or "unable to open" in text:
            return StoreUnavailable(f"{where} cannot be used ({text}) during {what}; nothing was sent.")
        return StoreError(f"{where} failed during {what}: {text}; nothing was sent.")

    def run_script(self, conn: sqlite3.Connection, script: str) -> None:
        """Run a schema script statement by statement inside the caller's transaction
        (``executescript`` would COMMIT on its own). Comments may contain semicolons."""
        text = "\n".join(line.split("--", 1)[0] for line in script.splitlines())
        for statement in text.split(";"):
            if statement.strip():
                conn.execute(statement)

    def close(self) -> None:
        """Stop the checkpointer (waiting for its round to end), then close every connection.

        Using the file afterwards raises StoreUnavailable instead of quietly reopening it.
        """
        self._closed = True
        if self._checkpointer_stop is not None:
            self._checkpointer_stop.set()
            self._checkpointer = None
            thread = self._checkpointer_thread
            if thread is not None and thread is not threading.current_thread() and os.getpid() == self._pid:
                thread.join(timeout=self.busy_timeout + 5)
        with self._all_lock:
            conns, self._all, self._owners = self._all, [], []
        if os.getpid() == self._pid:
            for conn in conns:
                with suppress(sqlite3.Error):
                    conn.close()
        self._local = threading.local()
