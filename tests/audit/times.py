"""Small helpers the audit suites share: trade times from one origin, and PostgreSQL URLs with a password."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

T0 = datetime(2026, 1, 20, 14, 30, tzinfo=UTC)


def iso(seconds: float) -> str:
    """The ISO-8601 UTC text of ``T0 + seconds``, as trade histories export it."""
    return (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def with_password(url: str, password: str) -> str:
    """``url`` with its password set to ``password`` (trust auth ignores it; the audit must hide it)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{parts.username or 'postgres'}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
