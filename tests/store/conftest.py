"""The store conformance suite runs against every store: one factory per store kind."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orderguard.store.base import Store
from orderguard.store.sqlite import SQLiteStore
from tests.helpers import unavailable

StoreFactory = Callable[..., Store]
STORE_KINDS = ["sqlite", "postgres"]
PG_URL = os.environ.get("ORDERGUARD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def postgres_or_skip() -> str:
    """The test server's URL; with CI=true a missing server fails instead of skipping."""
    try:
        import psycopg

        psycopg.connect(PG_URL, connect_timeout=3).close()
    except Exception as exc:
        unavailable(f"no PostgreSQL at {PG_URL}: {exc}")
    return PG_URL


def drop_schema(url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


class FakeClock:
    """A clock the test moves by hand (Unix seconds)."""

    def __init__(self, start: float = 1_763_650_800.0) -> None:  # 2025-11-20 15:00 UTC, a Thursday session
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=STORE_KINDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """``make_store(clock=...)`` opens a fresh store of the parametrized kind on a new ledger."""
    opened: list[Store] = []
    schemas: list[tuple[str, str]] = []
    counter = iter(range(1_000_000))

    def factory(clock: Callable[[], float] | None = None, **options: object) -> Store:
        kind = request.param
        extra: dict[str, object] = dict(options)
        if clock is not None:
            extra["clock"] = clock
        if kind == "sqlite":
            path = tmp_path / f"ledger-{next(counter)}.db"
            store: Store = SQLiteStore(str(path), **{"synchronous": "NORMAL", **extra})  # type: ignore[arg-type]
        elif kind == "postgres":
            from orderguard.store.postgres import PostgresStore

            url = postgres_or_skip()
            schema = f"og_{uuid.uuid4().hex[:12]}"
            schemas.append((url, schema))
            store = PostgresStore(url, schema=schema, **extra)  # type: ignore[arg-type]
        else:  # pragma: no cover - new store kinds register here
            raise AssertionError(f"unknown store kind {kind}")
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()
    for url, schema in schemas:
        drop_schema(url, schema)


@pytest.fixture
def store(make_store: StoreFactory, clock: FakeClock) -> Store:
    return make_store(clock=clock)
