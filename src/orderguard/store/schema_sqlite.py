"""SQLite schema, versioned in the ``meta`` table (``schema_version``)."""

from __future__ import annotations

SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- One row per scope key. For once/cooldown scopes ``holder`` is the intent that holds it,
-- ``fence`` is the scope's fencing-token counter.
CREATE TABLE IF NOT EXISTS scopes (
    key     TEXT PRIMARY KEY,
    kind    TEXT NOT NULL,
    fence   INTEGER NOT NULL,
    holder  TEXT,
    held_at REAL
) WITHOUT ROWID;
-- Open intents of MaxOpen/OneOpen scopes, deleted when the intent is released or closed.
CREATE TABLE IF NOT EXISTS holds (
    scope_key TEXT NOT NULL,
    intent_id TEXT NOT NULL,
    PRIMARY KEY (scope_key, intent_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS holds_intent ON holds(intent_id);
CREATE TABLE IF NOT EXISTS intents (
    id              TEXT PRIMARY KEY,
    client_order_id TEXT NOT NULL UNIQUE,
    fence           INTEGER NOT NULL,
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
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    host            TEXT NOT NULL,
    pid             INTEGER NOT NULL,
    runner          TEXT NOT NULL,
    thread          TEXT NOT NULL,
    task            TEXT,
    broker_order_id TEXT,
    filled_quantity TEXT NOT NULL DEFAULT '0',
    average_price   TEXT,
    released        INTEGER NOT NULL DEFAULT 0,
    closed          INTEGER NOT NULL DEFAULT 0,
    note            TEXT,
    first_miss_at   REAL,
    attempt_id      INTEGER NOT NULL,
    send_by_at      REAL,
    owner_started   TEXT NOT NULL
) WITHOUT ROWID;
-- Ids are time-ordered, so the primary key is also the time index. Every b-tree a claim writes
-- costs commit time, so the claim writes four: scopes, intents, its client-order-id index and
-- attempts. The state index below leaves out the states a claim inserts; a query that uses it
-- must repeat its WHERE term verbatim (store/sqlite.py: _LIVE).
CREATE INDEX IF NOT EXISTS intents_live ON intents(state)
    WHERE state IN ('UNKNOWN', 'ACKED', 'PARTIALLY_FILLED');
CREATE TABLE IF NOT EXISTS attempts (
    id          INTEGER PRIMARY KEY,
    at          REAL NOT NULL,
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
-- The claimed attempt of an intent is found through intents.attempt_id; blocked ones by holder.
CREATE INDEX IF NOT EXISTS attempts_holder ON attempts(holder_id) WHERE holder_id IS NOT NULL;
"""

INTENT_COLUMNS = (
    "id, client_order_id, fence, scope_key, scope_keys, state, account, strategy, symbol, side, "
    "quantity, order_type, limit_price, stop_price, time_in_force, source, tags, payload_digest, "
    "created_at, updated_at, host, pid, runner, thread, task, broker_order_id, filled_quantity, "
    "average_price, released, closed, note, first_miss_at, attempt_id, send_by_at, owner_started"
)

ATTEMPT_COLUMNS = (
    "id, at, outcome, reason, intent_id, holder_id, scope_key, host, pid, runner, thread, task, "
    "source, account, strategy, symbol, side, quantity, order_type, limit_price, stop_price, message"
)
