"""Ledger stores. ``open_store(url)`` picks one by URL scheme."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import ConfigurationError
from .base import AttemptRecord, BlockReason, Caller, ClaimDecision, IntentRecord, Store
from .sqlite import SQLiteStore, path_from_url


def open_store(url: str, **options: Any) -> Store:
    """``sqlite:///path.db`` (or a bare path): the embedded SQLite ledger;
    ``postgresql://…``: the PostgreSQL ledger (``orderguard[postgres]``)."""
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        # ``?schema=NAME`` is ours (psycopg would refuse it): the ledger's PostgreSQL schema.
        parts = urlsplit(url)
        query = [(k, v) for k, v in parse_qsl(parts.query) if k != "schema"]
        schema = dict(parse_qsl(parts.query)).get("schema")
        if schema and "schema" not in options:
            options["schema"] = schema
        return PostgresStore(urlunsplit(parts._replace(query=urlencode(query))), **options)
    if "://" in url and not url.startswith("sqlite://"):
        raise ConfigurationError(f"unknown store URL {url!r}: use sqlite:///path.db or postgresql://…")
    return SQLiteStore(path_from_url(url), **options)


__all__ = [
    "AttemptRecord", "BlockReason", "Caller", "ClaimDecision", "IntentRecord", "SQLiteStore",
    "Store", "open_store",
]
