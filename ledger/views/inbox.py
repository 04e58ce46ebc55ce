"""The payment providers' inbox table, webhook_events.

Not a read model: nothing rebuilds it. Payment providers write it, one
``source`` per provider, through the webhook kit (``adapters/webhooks/inbox.py``,
by ``ViewStore.statements`` and ``qualified``). Its DDL is here, with the
views', so that one ``migrate`` (and one ``python -m ledger schema``) prepares
a store for any provider, without importing one.
"""

from __future__ import annotations

from ledger.storage.ddl import Table

__all__ = ["WEBHOOK_EVENTS"]

WEBHOOK_EVENTS = Table(
    "webhook_events",
    postgres="""
-- 18. webhook_events
CREATE TABLE IF NOT EXISTS {S}.webhook_events (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    source VARCHAR(50) NOT NULL,  -- lemon_squeezy
    event_type VARCHAR(50) NOT NULL,
    event_id VARCHAR(100),
    payload JSONB NOT NULL,
    status VARCHAR(20) NOT NULL DEFAULT 'received',
    -- received, processed, failed
    error_message TEXT,
    processed_at TIMESTAMP,
    created_at TIMESTAMP NOT NULL DEFAULT NOW(),
    -- ledger deviation 6: idempotent ingestion and retries
    payload_sha256 CHAR(64) NOT NULL,  -- hex SHA-256 of the raw request body
    test_mode BOOLEAN NOT NULL DEFAULT FALSE,
    attempts INT NOT NULL DEFAULT 0,
    -- ledger deviation 14 (schema version 4): the provider's keyed seal of
    -- the stored payload, checked before a stored delivery is applied again
    seal TEXT,

    -- ledger deviation 6: a CHECK on status
    CONSTRAINT chk_webhook_events_status CHECK (status IN ('received', 'processed', 'failed'))
);
""",
    postgres_after="""
-- ledger deviation 14: a table of schema version 3 gains seal (idempotent).
ALTER TABLE {S}.webhook_events ADD COLUMN IF NOT EXISTS seal TEXT;
CREATE INDEX IF NOT EXISTS idx_webhook_events_source ON {S}.webhook_events(source);
CREATE INDEX IF NOT EXISTS idx_webhook_events_status ON {S}.webhook_events(status);
CREATE INDEX IF NOT EXISTS idx_webhook_events_created ON {S}.webhook_events(created_at);
-- ledger deviation 6: a delivery is stored once, by event id and by body
CREATE UNIQUE INDEX IF NOT EXISTS uq_webhook_events_event_id
ON {S}.webhook_events(source, event_id)
WHERE event_id IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS uq_webhook_events_payload
ON {S}.webhook_events(source, payload_sha256);
""",
    sqlite="""
-- 18. webhook_events
CREATE TABLE IF NOT EXISTS webhook_events (
    id TEXT NOT NULL PRIMARY KEY DEFAULT {UUID},
    source TEXT NOT NULL,
    event_type TEXT NOT NULL,
    event_id TEXT,
    payload TEXT NOT NULL,  -- JSONB
    status TEXT NOT NULL DEFAULT 'received',
    error_message TEXT,
    processed_at TEXT,
    created_at TEXT NOT NULL DEFAULT ({NOW}),
    -- ledger deviation 6
    payload_sha256 TEXT NOT NULL,  -- CHAR(64)
    test_mode INTEGER NOT NULL DEFAULT 0 CHECK (test_mode IN (0, 1)),
    attempts INTEGER NOT NULL DEFAULT 0,
    -- ledger deviation 14 (schema version 4)
    seal TEXT,

    -- ledger deviation 6
    CONSTRAINT chk_webhook_events_status CHECK (status IN ('received', 'processed', 'failed'))
);
""",
    sqlite_after="""
CREATE INDEX IF NOT EXISTS idx_webhook_events_source ON webhook_events(source);
CREATE INDEX IF NOT EXISTS idx_webhook_events_status ON webhook_events(status);
CREATE INDEX IF NOT EXISTS idx_webhook_events_created ON webhook_events(created_at);
-- ledger deviation 6
CREATE UNIQUE INDEX IF NOT EXISTS uq_webhook_events_event_id
ON webhook_events(source, event_id)
WHERE event_id IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS uq_webhook_events_payload
ON webhook_events(source, payload_sha256);
""",
    guard=("payload_sha256", "test_mode", "attempts"),
    # ledger deviation 14: added where missing by the migrate step.
    sqlite_added=(("seal", "TEXT"),),
)
