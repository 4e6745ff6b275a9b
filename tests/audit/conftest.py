"""Shared fixtures of the audit tests: a generated disaster database, and the PostgreSQL test server."""

from __future__ import annotations

import os
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
