"""SQLite-specific promises: pragmas, fail-closed errors, network file systems, fork safety."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
from pathlib import Path

import pytest

from orderguard import (
    ConfigurationError,
    Ever,
    Guard,
    OncePer,
    SchemaMismatch,
    StoreLocked,
    StoreUnavailable,
    UnsupportedFilesystem,
)
from orderguard.brokers import PaperBroker
from orderguard.store.base import Caller
from orderguard.store.sqlite import SQLiteStore, filesystem_type, refuse_network_filesystem
from tests.helpers import make_intent

ONCE = [OncePer(Ever(), by=("strategy",))]


def pragma(_: Path, name: str, store: SQLiteStore) -> object:
    return store._db.conn().execute(f"PRAGMA {name}").fetchone()[0]


def test_wal_full_sync_and_busy_timeout_by_default(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "l.db"))
    assert pragma(tmp_path, "journal_mode", store) == "wal"
    assert pragma(tmp_path, "synchronous", store) == 2  # FULL
    assert pragma(tmp_path, "busy_timeout", store) == 5000
    fast = SQLiteStore(str(tmp_path / "f.db"), synchronous="normal", busy_timeout=0.25)
    assert pragma(tmp_path, "synchronous", fast) == 1
    assert pragma(tmp_path, "busy_timeout", fast) == 250
    with pytest.raises(ConfigurationError):
        SQLiteStore(str(tmp_path / "x.db"), synchronous="OFF")


def test_a_store_locked_past_its_timeout_fails_closed(tmp_path: Path, paper_url: str) -> None:
    ledger = tmp_path / "ledger.db"
    guard = Guard.open(f"sqlite:///{ledger}", busy_timeout=0.2)
    broker = PaperBroker.open(paper_url)
    blocker = sqlite3.connect(ledger, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    try:
        with pytest.raises(StoreLocked, match="locked by another writer"):
            guard.submit(make_intent(), broker, policy=ONCE)
    finally:
        blocker.execute("ROLLBACK")
    assert broker.orders() == []
    assert guard.attempts() == [] and guard.intents() == []
    assert guard.submit(make_intent(), broker, policy=ONCE).sent  # works once the lock is gone


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    SQLiteStore(str(path)).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(SchemaMismatch, match=r"schema version 99.*Upgrade orderguard"):
        SQLiteStore(str(path))


def test_not_a_database_and_unreachable_paths(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreUnavailable, match="cannot be used"):
        SQLiteStore(str(junk))
    with pytest.raises(StoreUnavailable):
        SQLiteStore(str(tmp_path / "missing-dir" / "l.db"))
    with pytest.raises(StoreUnavailable, match="create=True"):
        SQLiteStore(str(tmp_path / "absent.db"), create=False)
    assert junk.read_bytes() == b"this is not sqlite" * 100  # nothing overwritten


@pytest.mark.parametrize("url", ["sqlite:///:memory:", ":memory:", "sqlite://relative.db", ""])
def test_non_file_ledgers_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError):
        Guard.open(url or "sqlite:///")


MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
server:/export /mnt/shared nfs4 rw,relatime 0 0
//nas/trading /mnt/nas cifs rw 0 0
tmpfs /tmp tmpfs rw 0 0
"""


@pytest.mark.parametrize(
    ("path", "fstype"),
    [("/mnt/shared/bots/l.db", "nfs4"), ("/mnt/nas/l.db", "cifs"), ("/tmp/l.db", "tmpfs"), ("/home/x/l.db", "ext4"),
     ("/mnt/sharedX/l.db", "ext4")],
)
def test_filesystem_type_uses_the_longest_mount_prefix(path: str, fstype: str) -> None:
    assert filesystem_type(path, MOUNTS) == fstype


def test_network_file_systems_are_refused_with_a_clear_error() -> None:
    with pytest.raises(UnsupportedFilesystem, match=r"network file system \(nfs4\).*PostgreSQL"):
        refuse_network_filesystem("/mnt/shared/bots/l.db", MOUNTS)
    refuse_network_filesystem("/home/x/l.db", MOUNTS)  # local disk: fine


def test_the_real_test_directory_is_accepted(tmp_path: Path) -> None:
    refuse_network_filesystem(str(tmp_path / "l.db"))


def _open_and_claim(path: str, symbol: str) -> str | None:
    store = SQLiteStore(path)
    claimed = store.claim(make_intent(symbol=symbol), [OncePer(Ever(), by=("symbol",))], Caller.current("p")).claimed
    return store.namespace if claimed else None


def test_many_processes_creating_one_ledger_agree_on_it(tmp_path: Path) -> None:
    path = str(tmp_path / "fresh.db")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        namespaces = pool.starmap(_open_and_claim, [(path, f"S{i}") for i in range(4)])
    assert len(set(namespaces)) == 1 and None not in namespaces
    assert len(SQLiteStore(path).intents()) == 4


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")
def test_safe_across_fork(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "l.db"))
    policy = [OncePer(Ever(), by=("symbol",))]
    assert store.claim(make_intent(symbol="PARENT1"), policy, Caller.current("p")).claimed
    pid = os.fork()
    if pid == 0:  # child: must open its own connection, not reuse the parent's
        code = 0
        try:
            ok = store.claim(make_intent(symbol="CHILD"), policy, Caller.current("c")).claimed
            dup = store.claim(make_intent(symbol="PARENT1"), policy, Caller.current("c")).claimed
            code = 0 if ok and not dup else 1
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.claim(make_intent(symbol="PARENT2"), policy, Caller.current("p")).claimed
    assert {r.symbol for r in store.intents()} == {"PARENT1", "CHILD", "PARENT2"}
    assert {a.pid for a in store.attempts()} == {os.getpid(), pid}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")
def test_fork_while_another_thread_is_inside_a_transaction(tmp_path: Path) -> None:
    import threading
    import time

    store = SQLiteStore(str(tmp_path / "l.db"), busy_timeout=2.0)
    policy = [OncePer(Ever(), by=("symbol",))]
    inside = threading.Event()

    def long_transaction() -> None:  # e.g. a worker thread's claim, mid-commit when fork() comes
        with store._db.write("another thread's claim"):
            inside.set()
            time.sleep(0.5)

    worker = threading.Thread(target=long_transaction)
    worker.start()
    inside.wait(5)
    pid = os.fork()  # waits for the transaction to finish instead of copying a held lock
    if pid == 0:
        code = 3
        try:
            code = 0 if store.claim(make_intent(symbol="CHILD"), policy, Caller.current("c")).claimed else 1
        except BaseException:
            code = 2
        os._exit(code)
    worker.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # StoreLocked forever before the fork gate
    assert [r.symbol for r in store.intents()] == ["CHILD"]


def test_connections_of_finished_threads_are_closed(tmp_path: Path) -> None:
    import threading

    store = SQLiteStore(str(tmp_path / "l.db"))
    policy = [OncePer(Ever(), by=("symbol",))]
    for i in range(200):  # thread-per-order code
        t = threading.Thread(target=store.claim, args=(make_intent(symbol=f"S{i}"), policy, Caller.current("t")))
        t.start()
        t.join()
    assert len(store._db._all) <= 3  # this thread, the checkpointer, the last worker's at most
    assert len(store.intents()) == 200


def test_close_stops_the_checkpointer_and_later_use_is_refused(tmp_path: Path) -> None:
    import random
    import shutil
    import time

    for i in range(25):  # open, write, close on a checkpoint round (used to crash the interpreter)
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        store = SQLiteStore(str(folder / "l.db"), synchronous="NORMAL")
        for k in range(3):
            store.claim(make_intent(strategy=f"s{k}"), ONCE, Caller.current("t"))
        time.sleep(random.uniform(0.19, 0.21))
        checkpointer = store._db._checkpointer_thread
        store.close()
        assert checkpointer is not None and not checkpointer.is_alive()
        shutil.rmtree(folder)  # nothing reopened the file behind our back
    with pytest.raises(StoreUnavailable, match="was closed"):
        store.intents()


def test_a_foreign_sqlite_file_is_never_touched(tmp_path: Path, paper_url: str) -> None:
    other = tmp_path / "app.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE trades (id INTEGER)")
    before = other.read_bytes()
    for create in (True, False):
        with pytest.raises(SchemaMismatch, match="not an orderguard ledger"):
            SQLiteStore(str(other), create=create)
    assert other.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]
    venue = PaperBroker.open(paper_url)  # the paper venue's file is not a ledger either
    with pytest.raises(SchemaMismatch):
        Guard.open(paper_url)
    assert venue.orders() == []


def test_an_empty_file_becomes_a_ledger_only_when_asked(tmp_path: Path) -> None:
    empty = tmp_path / "new.db"
    empty.touch()
    with pytest.raises(SchemaMismatch, match="empty file"):
        SQLiteStore(str(empty), create=False)
    assert empty.read_bytes() == b""
    assert SQLiteStore(str(empty)).intents() == []
