"""PostgreSQL schema (same tables and columns as SQLite, so the row converters are shared)."""

from __future__ import annotations

SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS scopes (
    key     TEXT PRIMARY KEY,
    kind    TEXT NOT NULL,
    fence   BIGINT NOT NULL,
    holder  TEXT,
    held_at DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS holds (
    scope_key TEXT NOT NULL,
    intent_id TEXT NOT NULL,
    PRIMARY KEY (scope_key, intent_id)
);
CREATE INDEX IF NOT EXISTS holds_intent ON holds(intent_id);
CREATE TABLE IF NOT EXISTS intents (
    id              TEXT PRIMARY KEY,
    client_order_id TEXT NOT NULL UNIQUE,
    fence           BIGINT NOT NULL,
    scope_key       TEXT NOT NULL,
    scope_keys      TEXT NOT NULL,
    state           TEXT NOT NULL,
    account         TEXT NOT NULL,
    strategy        TEXT NOT NULL,
    symbol          TEXT NOT NULL,
    side            TEXT NOT NULL,
    quantity        TEXT NOT NULL,
    order_type      TEXT NOT NULL,
    limit_price     TEXT,
    stop_price      TEXT,
    time_in_force   TEXT NOT NULL,
    source          TEXT NOT NULL,
    tags            TEXT NOT NULL,
    payload_digest  TEXT NOT NULL,
    created_at      DOUBLE PRECISION NOT NULL,
    updated_at      DOUBLE PRECISION NOT NULL,
    host            TEXT NOT NULL,
    pid             INTEGER NOT NULL,
    runner          TEXT NOT NULL,
    thread          TEXT NOT NULL,
    task            TEXT,
    broker_order_id TEXT,
    filled_quantity TEXT NOT NULL DEFAULT '0',
    average_price   TEXT,
    released        SMALLINT NOT NULL DEFAULT 0,
    closed          SMALLINT NOT NULL DEFAULT 0,
    note            TEXT,
    first_miss_at   DOUBLE PRECISION,
    attempt_id      BIGINT NOT NULL,
    send_by_at      DOUBLE PRECISION,
    owner_started   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS intents_live ON intents(state)
    WHERE state IN ('UNKNOWN', 'ACKED', 'PARTIALLY_FILLED');
CREATE TABLE IF NOT EXISTS attempts (
    id          BIGSERIAL PRIMARY KEY,
    at          DOUBLE PRECISION NOT NULL,
    outcome     TEXT NOT NULL,
    reason      TEXT,
    intent_id   TEXT,
    holder_id   TEXT,
    scope_key   TEXT,
    host        TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    runner      TEXT NOT NULL,
    thread      TEXT NOT NULL,
    task        TEXT,
    source      TEXT NOT NULL,
    account     TEXT NOT NULL,
    strategy    TEXT NOT NULL,
    symbol      TEXT NOT NULL,
    side        TEXT NOT NULL,
    quantity    TEXT NOT NULL,
    order_type  TEXT NOT NULL,
    limit_price TEXT,
    stop_price  TEXT,
    message     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_holder ON attempts(holder_id) WHERE holder_id IS NOT NULL;
-- The fencing token in base 36, as store/base.py fence_text() writes it (client order ids are
-- built inside the one-statement claim).
CREATE OR REPLACE FUNCTION og_base36(n bigint) RETURNS text LANGUAGE sql IMMUTABLE AS $$
  WITH RECURSIVE d(v, s) AS (
    SELECT n / 36, substr('0123456789abcdefghijklmnopqrstuvwxyz', (n % 36)::int + 1, 1)
    UNION ALL
    SELECT v / 36, substr('0123456789abcdefghijklmnopqrstuvwxyz', (v % 36)::int + 1, 1) || s FROM d WHERE v > 0)
  SELECT s FROM d WHERE v = 0 $$
"""
