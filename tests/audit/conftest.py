"""Shared fixtures of the audit tests: a generated disaster database, and the PostgreSQL test server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.audit.disaster import Disaster, make_disaster
from tests.helpers import unavailable

PG_URL = os.environ.get("ORDERGUARD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def disaster_db(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Disaster]:
    """A freshly generated disaster (``trading.db`` in the test's tmp_path) and what was injected.

    Seed 7 unless parametrized indirectly: ``@pytest.mark.parametrize("disaster_db", [11], indirect=True)``.
    """
    seed = getattr(request, "param", 7)
    path = str(tmp_path / "trading.db")
    return path, make_disaster(path, seed=seed)


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The PostgreSQL test server (``$ORDERGUARD_TEST_PG``, else the local ``test`` database).

    Unreachable: a skip locally, a failure with CI=true. Tests create uniquely named tables and drop them.
    """
    try:
        import psycopg

        psycopg.connect(PG_URL, connect_timeout=3).close()
    except Exception as exc:
        unavailable(f"no PostgreSQL at {PG_URL}: {exc}")
    return PG_URL


@pytest.fixture
def pg(pg_url: str) -> Iterator[tuple[str, str]]:
    """(URL, a fresh schema) on the PostgreSQL test server, dropped with everything in it afterwards."""
    import psycopg

    schema = "og_audit_" + uuid.uuid4().hex[:10]
    with psycopg.connect(pg_url, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        try:
            yield pg_url, schema
        finally:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
