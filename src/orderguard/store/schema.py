"""The ledger's schema, one text for both stores (SQLite and PostgreSQL differ in column types
only), versioned in the ``meta`` table (``schema_version``).

Version 1: scopes, holds, intents, attempts. Version 2 adds halts and their history, risk-limit
events, the runner registry, leader leases and the ``(account, symbol)`` index REDUCING reads.
"""

from __future__ import annotations

from dataclasses import dataclass

_V1 = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- One row per scope key. For once/cooldown scopes ``holder`` is the intent that holds it,
-- ``fence`` is the scope's fencing-token counter.
CREATE TABLE IF NOT EXISTS scopes (
    key     TEXT PRIMARY KEY,
    kind    TEXT NOT NULL,
    fence   {bigint} NOT NULL,
    holder  TEXT,
    held_at {real}
){no_rowid};
-- Open intents of MaxOpen/OneOpen scopes, deleted when the intent is released or closed.
CREATE TABLE IF NOT EXISTS holds (
    scope_key TEXT NOT NULL,
    intent_id TEXT NOT NULL,
    PRIMARY KEY (scope_key, intent_id)
){no_rowid};
CREATE INDEX IF NOT EXISTS holds_intent ON holds(intent_id);
CREATE TABLE IF NOT EXISTS intents (
    id              TEXT PRIMARY KEY,
    client_order_id TEXT NOT NULL UNIQUE,
    fence           {bigint} NOT NULL,
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
    created_at      {real} NOT NULL,
    updated_at      {real} NOT NULL,
    host            TEXT NOT NULL,
    pid             INTEGER NOT NULL,
    runner          TEXT NOT NULL,
    thread          TEXT NOT NULL,
    task            TEXT,
    broker_order_id TEXT,
    filled_quantity TEXT NOT NULL DEFAULT '0',
    average_price   TEXT,
    released        {flag} NOT NULL DEFAULT 0,
    closed          {flag} NOT NULL DEFAULT 0,
    note            TEXT,
    first_miss_at   {real},
    attempt_id      {bigint} NOT NULL,
    send_by_at      {real},
    owner_started   TEXT NOT NULL
){no_rowid};
-- Ids are time-ordered, so the primary key is also the time index. Every b-tree a claim writes
-- costs commit time, so the claim writes four: scopes, intents, its client-order-id index and
-- attempts. The state index below leaves out the states a claim inserts; a query that uses it
-- must repeat its WHERE term verbatim (store/sqlite.py: _LIVE).
CREATE INDEX IF NOT EXISTS intents_live ON intents(state)
    WHERE state IN ('UNKNOWN', 'ACKED', 'PARTIALLY_FILLED');
CREATE TABLE IF NOT EXISTS attempts (
    id          {serial} PRIMARY KEY,
    at          {real} NOT NULL,
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

_V2 = """
CREATE TABLE IF NOT EXISTS halts (
    scope  TEXT PRIMARY KEY,
    state  TEXT NOT NULL,
    cause  TEXT NOT NULL,
    reason TEXT NOT NULL,
    actor  TEXT NOT NULL,
    at     {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS halt_events (
    id     {serial} PRIMARY KEY,
    at     {real} NOT NULL,
    scope  TEXT NOT NULL,
    state  TEXT NOT NULL,
    cause  TEXT NOT NULL,
    reason TEXT NOT NULL,
    actor  TEXT NOT NULL
);
-- One row per claimed intent per risk-limit scope, pruned past the limit's period.
CREATE TABLE IF NOT EXISTS limit_events (
    scope_key TEXT NOT NULL,
    at        {real} NOT NULL,
    intent_id TEXT NOT NULL,
    notional  TEXT NOT NULL,
    PRIMARY KEY (scope_key, at, intent_id)
);
-- What REDUCING reads: the ledger's position in one account and symbol.
CREATE INDEX IF NOT EXISTS intents_position ON intents(account, symbol);
CREATE TABLE IF NOT EXISTS runners (
    id              TEXT PRIMARY KEY,
    runner          TEXT NOT NULL,
    strategy        TEXT NOT NULL,
    host            TEXT NOT NULL,
    pid             INTEGER NOT NULL,
    started         TEXT NOT NULL,
    version         TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    git_commit      TEXT,
    modules         TEXT NOT NULL,
    exclusive       TEXT,
    heartbeat_every {real} NOT NULL,
    registered_at   {real} NOT NULL,
    heartbeat_at    {real} NOT NULL,
    stopped_at      {real}
);
CREATE TABLE IF NOT EXISTS leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    fence       BIGINT NOT NULL,
    expires_at  {real} NOT NULL,
    acquired_at {real} NOT NULL
);
"""

# PostgreSQL only: client order ids are built inside its one-statement claim.
_BASE36 = """
-- The fencing token in base 36, as store/base.py fence_text() writes it (client order ids are
-- built inside the one-statement claim).
CREATE OR REPLACE FUNCTION og_base36(n bigint) RETURNS text LANGUAGE sql IMMUTABLE AS $$
  WITH RECURSIVE d(v, s) AS (
    SELECT n / 36, substr('0123456789abcdefghijklmnopqrstuvwxyz', (n % 36)::int + 1, 1)
    UNION ALL
    SELECT v / 36, substr('0123456789abcdefghijklmnopqrstuvwxyz', (v % 36)::int + 1, 1) || s FROM d WHERE v > 0)
  SELECT s FROM d WHERE v = 0 $$
"""


@dataclass(frozen=True)
class Schema:
    v1: str  # the tables of schema version 1
    v2: str  # what version 2 adds


def _render(real: str, bigint: str, flag: str, serial: str, no_rowid: str, extra: str = "") -> Schema:
    v1 = _V1.format(real=real, bigint=bigint, flag=flag, serial=serial, no_rowid=no_rowid) + extra
    return Schema(v1, _V2.format(real=real, serial=serial))


SQLITE = _render("REAL", "INTEGER", "INTEGER", "INTEGER", " WITHOUT ROWID")
POSTGRES = _render("DOUBLE PRECISION", "BIGINT", "SMALLINT", "BIGSERIAL", "", _BASE36)

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
