"""The read-model tables the ledger owns, as DDL for PostgreSQL and SQLite.

The tables, columns, defaults, CHECK constraints and indexes are those of the
seed, Pingvas Studio's database schema: its billing and credit tables (plans,
plan_features, subscriptions, subscription_history, credit_transactions,
credit_reservations, webhook_events, audit_logs), their indexes and the
``update_updated_at`` trigger. Where the ledger needs more, the DDL says so in
a ``ledger deviation N`` comment; ``docs/schema.md`` lists every deviation with
its reason. Everything here is pure: functions return text and touch no
database.

Both scripts are idempotent: running one again on a database that already has
the tables changes nothing and fails nothing. Neither writes
``ledger_schema_version``; whoever applies the script records
:data:`SCHEMA_VERSION` there.

>>> ddl = postgres_ddl("pingvas_dev")
>>> 'CREATE TABLE IF NOT EXISTS "pingvas_dev".credit_transactions (' in ddl
True
>>> postgres_ddl("Pingvas")
Traceback (most recent call last):
...
ledger.ConfigurationError: schema 'Pingvas' must be a lowercase SQL identifier (a-z, 0-9, _; at most 63)
"""

from __future__ import annotations

import re
from uuid import UUID, uuid5

from ledger.domain.plans import PLAN_NS
from ledger.errors import ConfigurationError
from ledger.storage.config import check_identifier

__all__ = [
    "ADDED_INDEX_NAMES",
    "INDEX_NAMES",
    "SCHEMA_VERSION",
    "SEED_INDEX_NAMES",
    "TABLES",
    "UPDATED_AT_TABLES",
    "USER_FOREIGN_KEYS",
    "VIEW_TABLES",
    "postgres_ddl",
    "sqlite_ddl",
]

#: The version of the DDL below. Raise it whenever the DDL changes; the migrate
#: step records it in ``ledger_schema_version``.
SCHEMA_VERSION = 2

#: Every table the ledger creates, in creation order (a table comes after the
#: tables it references).
TABLES: tuple[str, ...] = (
    "plans",
    "plan_features",
    "subscriptions",
    "subscription_history",
    "subscription_snapshots",
    "credit_transactions",
    "credit_reservations",
    "credit_accounts",
    "credit_balances",
    "webhook_events",
    "audit_logs",
    "ledger_schema_version",
)

#: The tables that are read models: rebuilt from the event store, never the
#: source of truth.
VIEW_TABLES: tuple[str, ...] = (
    "credit_transactions",
    "credit_reservations",
    "credit_accounts",
    "credit_balances",
    "subscriptions",
    "subscription_history",
    "subscription_snapshots",
    "audit_logs",
)

#: The tables with an ``updated_at`` column, kept current by the
#: ``update_updated_at`` trigger (PostgreSQL) or its emulation (SQLite).
UPDATED_AT_TABLES: tuple[str, ...] = ("plans", "subscriptions", "credit_balances")

#: Every index the seed defines on the ledger's tables: those of subscriptions,
#: subscription_history, credit_transactions, credit_reservations,
#: webhook_events and audit_logs and, from its index strategy,
#: ``idx_credit_transactions_user_created`` and ``idx_subscriptions_active``.
SEED_INDEX_NAMES: frozenset[str] = frozenset(
    {
        "idx_subscriptions_user",
        "idx_subscriptions_status",
        "idx_subscriptions_period_end",
        "idx_subscriptions_lemon_squeezy",
        "idx_subscriptions_active",
        "idx_subscription_history_subscription",
        "idx_credit_transactions_user",
        "idx_credit_transactions_created",
        "idx_credit_transactions_type",
        "idx_credit_transactions_user_created",
        "idx_credit_reservations_user",
        "idx_credit_reservations_job",
        "idx_credit_reservations_status",
        "idx_webhook_events_source",
        "idx_webhook_events_status",
        "idx_webhook_events_created",
        "idx_audit_logs_user",
        "idx_audit_logs_action",
        "idx_audit_logs_entity",
        "idx_audit_logs_created",
    }
)

#: The unique indexes the ledger adds (deviations 4 and 6).
ADDED_INDEX_NAMES: frozenset[str] = frozenset(
    {
        "uq_subscriptions_lemon_squeezy",
        "uq_webhook_events_event_id",
        "uq_webhook_events_payload",
        "uq_credit_transactions_user_position",
    }
)

#: Every index name in both scripts.
INDEX_NAMES: frozenset[str] = SEED_INDEX_NAMES | ADDED_INDEX_NAMES

#: ``user_foreign_keys=True``: (table, constraint name, ON DELETE action). The
#: actions are the seed's; credit_balances is the ledger's own table and
#: follows credit_transactions.
USER_FOREIGN_KEYS: tuple[tuple[str, str, str], ...] = (
    ("subscriptions", "fk_subscriptions_user", "CASCADE"),
    ("credit_transactions", "fk_credit_transactions_user", "CASCADE"),
    ("credit_reservations", "fk_credit_reservations_user", "CASCADE"),
    ("credit_balances", "fk_credit_balances_user", "CASCADE"),
    ("audit_logs", "fk_audit_logs_user", "SET NULL"),
)

_CREDIT_TYPES = (
    "'subscription_grant', 'subscription_renew', 'generation_use', 'api_use',\n"
    "        'refund', 'admin_adjustment', 'bonus', 'purchase', 'expiration'"
)
_SUBSCRIPTION_STATUSES = "'active', 'trialing', 'past_due', 'cancelled', 'expired', 'paused'"
_CHANGE_TYPES = (
    "'created', 'upgraded', 'downgraded', 'cancelled', 'renewed', 'expired',\n"
    "        'resumed', 'paused', 'unpaused', 'past_due', 'recovered', 'trial_started', 'activated'"
)

# The seed's default catalog (plans) and feature flags (plan_features).
_PLAN_ROWS = (
    # name, display_name, monthly_price, yearly_price, credits, storage_bytes, queue_count, tier_level, comment
    ("starter", "Starter", "25.00", "250.00", 5000, 21474836480, 1, 1, "20 GB"),
    ("pro", "Pro", "75.00", "750.00", 15000, 107374182400, 1, 2, "100 GB"),
    ("studio", "Studio", "150.00", "1500.00", 30000, 214748364800, 3, 3, "200 GB"),
    ("enterprise", "Enterprise", "0.00", "0.00", 0, 0, 0, 4, "custom"),
)
_PLAN_FEATURE_ROWS = (
    ("starter", "sd_models", True),
    ("starter", "flux_model", False),
    ("starter", "nano_banana_api", False),
    ("starter", "lora_training", False),
    ("pro", "sd_models", True),
    ("pro", "flux_model", True),
    ("pro", "nano_banana_api", True),
    ("pro", "lora_training", False),
    ("studio", "sd_models", True),
    ("studio", "flux_model", True),
    ("studio", "nano_banana_api", True),
    ("studio", "lora_training", True),
)

# Guards, one per table the seed also defines and the ledger widened: if a
# table of that name already exists without the ledger's columns (for example
# created from the seed by the host), CREATE TABLE IF NOT EXISTS skips it and
# this SELECT fails with "column ... does not exist" instead of a half-done
# install.
_GUARDED_COLUMNS: dict[str, tuple[str, ...]] = {
    "subscriptions": ("cancel_at_period_end", "paused_at", "ended_at"),
    "credit_transactions": ("reference_label", "idempotency_key", "log_position"),
    "credit_reservations": ("expires_at", "release_reason", "idempotency_key"),
    "webhook_events": ("payload_sha256", "test_mode", "attempts"),
}


def _guard(table: str, qualified: str) -> str:
    columns = ", ".join(_GUARDED_COLUMNS[table])
    return (
        f"-- guard: fails here if {table} already existed without the ledger's columns\n"
        f"SELECT {columns} FROM {qualified} LIMIT 0;\n"
    )


# PostgreSQL. "{S}" stands for the quoted schema name.

_PG_HEADER = """\
-- pingvas-ledger schema version {VERSION} for schema {S}.
-- Generated by ledger.storage.ddl.postgres_ddl(); idempotent: safe to run again.
-- Tables, columns, CHECKs and indexes follow Pingvas Studio's database
-- schema (its plans, plan_features, subscriptions, subscription_history,
-- credit_transactions, credit_reservations, webhook_events and audit_logs
-- tables, their indexes and the update_updated_at trigger). Changes from
-- it are marked "ledger deviation N" and listed, with reasons, in
-- docs/schema.md. TIMESTAMP columns hold UTC.
-- ledger deviation 9: the event store's tables and the projector's
-- <name>_tracking table are created by eventsourcing, not here.

CREATE SCHEMA IF NOT EXISTS {S};

-- The seed's trigger function, verbatim (shared with the host's tables when
-- the host uses the same schema). NOW() is converted with the session's
-- TimeZone: run the ledger's role with TimeZone 'UTC'.
-- ledger deviation 8: the seed applies it to "all tables"; here it is applied
-- only to the tables that have updated_at (plans, subscriptions,
-- credit_balances).
CREATE OR REPLACE FUNCTION {S}.update_updated_at()
RETURNS TRIGGER AS $$
BEGIN
    NEW.updated_at = NOW();
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
"""

_PG_PLANS = """
-- 3. plans
-- ledger deviation 7: none; the seed's table as it is, tier_level and the
-- Lemon Squeezy variant id columns included.
CREATE TABLE IF NOT EXISTS {S}.plans (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    name VARCHAR(50) NOT NULL UNIQUE,  -- starter, pro, studio, enterprise
    display_name VARCHAR(100) NOT NULL,
    description TEXT,
    monthly_price DECIMAL(10, 2) NOT NULL,
    yearly_price DECIMAL(10, 2) NOT NULL,
    credits INT NOT NULL,
    storage_bytes BIGINT NOT NULL,
    queue_count INT NOT NULL DEFAULT 1,
    tier_level INT NOT NULL,  -- 1: starter, 2: pro, 3: studio, 4: enterprise
    lemon_squeezy_variant_id_monthly VARCHAR(50),
    lemon_squeezy_variant_id_yearly VARCHAR(50),
    is_active BOOLEAN NOT NULL DEFAULT TRUE,
    created_at TIMESTAMP NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMP NOT NULL DEFAULT NOW()
);

DROP TRIGGER IF EXISTS trg_plans_updated_at ON {S}.plans;
CREATE TRIGGER trg_plans_updated_at
    BEFORE UPDATE ON {S}.plans
    FOR EACH ROW
    EXECUTE FUNCTION {S}.update_updated_at();

-- The seed's default catalog. ON CONFLICT: rows the host has edited stay as
-- they are.
{PLAN_ROWS}
"""

_PG_PLAN_FEATURES = """
-- 4. plan_features
CREATE TABLE IF NOT EXISTS {S}.plan_features (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    plan_id UUID NOT NULL REFERENCES {S}.plans(id) ON DELETE CASCADE,
    feature_key VARCHAR(50) NOT NULL,  -- flux_model, nano_banana_api, lora_training, ...
    enabled BOOLEAN NOT NULL DEFAULT FALSE,
    config JSONB,  -- extra settings (for example API call limits)

    UNIQUE(plan_id, feature_key)
);

-- The seed's feature flags.
{FEATURE_ROWS}
"""

_PG_SUBSCRIPTIONS = """
-- 5. subscriptions
CREATE TABLE IF NOT EXISTS {S}.subscriptions (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID NOT NULL,  -- seed: REFERENCES users(id) ON DELETE CASCADE (opt-in: user_foreign_keys)
    plan_id UUID NOT NULL REFERENCES {S}.plans(id),
    lemon_squeezy_subscription_id VARCHAR(100),
    lemon_squeezy_customer_id VARCHAR(100),
    billing_cycle VARCHAR(10) NOT NULL DEFAULT 'monthly',  -- monthly, yearly
    status VARCHAR(20) NOT NULL DEFAULT 'active',
    -- active, trialing, past_due, cancelled, expired; ledger deviation 4: paused
    current_period_start TIMESTAMP NOT NULL,
    current_period_end TIMESTAMP NOT NULL,
    trial_ends_at TIMESTAMP,
    cancelled_at TIMESTAMP,
    cancel_reason TEXT,
    created_at TIMESTAMP NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMP NOT NULL DEFAULT NOW(),
    -- ledger deviation 4: cancellation at the end of the period, pause and end
    cancel_at_period_end BOOLEAN NOT NULL DEFAULT FALSE,
    paused_at TIMESTAMP,
    ended_at TIMESTAMP,

    -- ledger deviation 4: 'paused' added
    CONSTRAINT chk_status CHECK (status IN ({SUBSCRIPTION_STATUSES})),
    CONSTRAINT chk_billing_cycle CHECK (billing_cycle IN ('monthly', 'yearly'))
);
{GUARD_SUBSCRIPTIONS}
CREATE INDEX IF NOT EXISTS idx_subscriptions_user ON {S}.subscriptions(user_id);
CREATE INDEX IF NOT EXISTS idx_subscriptions_status ON {S}.subscriptions(status);
CREATE INDEX IF NOT EXISTS idx_subscriptions_period_end ON {S}.subscriptions(current_period_end);
CREATE INDEX IF NOT EXISTS idx_subscriptions_lemon_squeezy ON {S}.subscriptions(lemon_squeezy_subscription_id);
-- index strategy: active subscriptions only
CREATE INDEX IF NOT EXISTS idx_subscriptions_active
ON {S}.subscriptions(user_id)
WHERE status IN ('active', 'trialing');
-- ledger deviation 4: one row per Lemon Squeezy subscription (webhook upserts)
CREATE UNIQUE INDEX IF NOT EXISTS uq_subscriptions_lemon_squeezy
ON {S}.subscriptions(lemon_squeezy_subscription_id)
WHERE lemon_squeezy_subscription_id IS NOT NULL;

DROP TRIGGER IF EXISTS trg_subscriptions_updated_at ON {S}.subscriptions;
CREATE TRIGGER trg_subscriptions_updated_at
    BEFORE UPDATE ON {S}.subscriptions
    FOR EACH ROW
    EXECUTE FUNCTION {S}.update_updated_at();
"""

_PG_SUBSCRIPTION_HISTORY = """
-- 6. subscription_history
CREATE TABLE IF NOT EXISTS {S}.subscription_history (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    subscription_id UUID NOT NULL REFERENCES {S}.subscriptions(id) ON DELETE CASCADE,
    from_plan_id UUID REFERENCES {S}.plans(id),
    to_plan_id UUID REFERENCES {S}.plans(id),
    change_type VARCHAR(20) NOT NULL,
    -- created, upgraded, downgraded, cancelled, renewed, expired
    details JSONB,
    changed_at TIMESTAMP NOT NULL DEFAULT NOW(),

    -- ledger deviation 5: a CHECK (the seed lists the first six in a comment)
    CONSTRAINT chk_subscription_history_change_type CHECK (change_type IN (
        {CHANGE_TYPES}))
);

CREATE INDEX IF NOT EXISTS idx_subscription_history_subscription ON {S}.subscription_history(subscription_id);

-- ledger deviation 12: a table the seed does not have. Every snapshot a
-- payment provider sent of a subscription, applied or superseded, by the
-- provider's time: the history of such a subscription is written from it.
CREATE TABLE IF NOT EXISTS {S}.subscription_snapshots (
    subscription_id UUID NOT NULL REFERENCES {S}.subscriptions(id) ON DELETE CASCADE,
    source_updated_at TIMESTAMP NOT NULL,
    -- plan, period and cancel_at_period_end are NULL where the provider
    -- reported only a status (a failed payment): they are the snapshot's before.
    plan VARCHAR(50),
    status VARCHAR(20) NOT NULL,
    current_period_start TIMESTAMP,
    current_period_end TIMESTAMP,
    trial_ends_at TIMESTAMP,
    cancel_at_period_end BOOLEAN,
    plan_tier_level INT,  -- the plan's tier when the snapshot was projected
    PRIMARY KEY (subscription_id, source_updated_at)
);
"""

_PG_CREDIT_TRANSACTIONS = """
-- 7. credit_transactions
CREATE TABLE IF NOT EXISTS {S}.credit_transactions (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID NOT NULL,  -- seed: REFERENCES users(id) ON DELETE CASCADE (opt-in: user_foreign_keys)
    amount INT NOT NULL,  -- positive: credit, negative: debit
    type VARCHAR(30) NOT NULL,
    -- subscription_grant, subscription_renew, generation_use, api_use,
    -- refund, admin_adjustment, bonus; ledger deviation 1: purchase, expiration
    description VARCHAR(500),
    reference_id UUID,  -- related entity id (job_id, subscription_id, ...)
    reference_type VARCHAR(50),  -- generation_job, subscription, ...
    balance_after INT NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT NOW(),
    -- ledger deviation 1: the caller's reference as given ('invoice:3420871');
    -- reference_id is a UUID and payment references are not
    reference_label VARCHAR(100),
    -- ledger deviation 1: the idempotency key of the command that posted the row
    idempotency_key VARCHAR(200),
    -- ledger deviation 11: the event's position in the event log. Rows posted at
    -- the same instant are ordered by it; balance_after chains in this order.
    log_position BIGINT NOT NULL,

    -- ledger deviation 1: a CHECK on type
    CONSTRAINT chk_credit_transactions_type CHECK (type IN (
        {CREDIT_TYPES}))
);
{GUARD_CREDIT_TRANSACTIONS}
CREATE INDEX IF NOT EXISTS idx_credit_transactions_user ON {S}.credit_transactions(user_id);
CREATE INDEX IF NOT EXISTS idx_credit_transactions_created ON {S}.credit_transactions(created_at);
CREATE INDEX IF NOT EXISTS idx_credit_transactions_type ON {S}.credit_transactions(type);
-- index strategy: a user's transactions, newest first
CREATE INDEX IF NOT EXISTS idx_credit_transactions_user_created
ON {S}.credit_transactions(user_id, created_at DESC);

-- ledger deviation 11: a user's postings in log order (the balance_after chain)
CREATE UNIQUE INDEX IF NOT EXISTS uq_credit_transactions_user_position
ON {S}.credit_transactions(user_id, log_position);
"""

_PG_CREDIT_RESERVATIONS = """
-- 8. credit_reservations
CREATE TABLE IF NOT EXISTS {S}.credit_reservations (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID NOT NULL,  -- seed: REFERENCES users(id) ON DELETE CASCADE (opt-in: user_foreign_keys)
    job_id UUID NOT NULL,
    reserved_amount INT NOT NULL,
    status VARCHAR(20) NOT NULL DEFAULT 'reserved',
    -- reserved, settled, refunded ('refunded' is the seed's word for a released hold)
    settled_amount INT,
    created_at TIMESTAMP NOT NULL DEFAULT NOW(),
    settled_at TIMESTAMP,
    -- ledger deviation 2: holds expire; a released hold records why
    expires_at TIMESTAMP NOT NULL,
    release_reason TEXT,
    idempotency_key VARCHAR(200),

    -- ledger deviation 2: a CHECK on status
    CONSTRAINT chk_credit_reservations_status CHECK (status IN ('reserved', 'settled', 'refunded'))
);
{GUARD_CREDIT_RESERVATIONS}
CREATE INDEX IF NOT EXISTS idx_credit_reservations_user ON {S}.credit_reservations(user_id);
CREATE INDEX IF NOT EXISTS idx_credit_reservations_job ON {S}.credit_reservations(job_id);
CREATE INDEX IF NOT EXISTS idx_credit_reservations_status ON {S}.credit_reservations(status);
"""

_PG_CREDIT_BALANCES = """
-- ledger deviation 3: a table the seed does not have. One row per account:
-- the balance, the credits held by open reservations, and what is available.
-- ledger deviation 10: a table the seed does not have. Events name an
-- account by its own id; this maps it to the user once, when it is opened.
CREATE TABLE IF NOT EXISTS {S}.credit_accounts (
    account_id UUID PRIMARY KEY,
    user_id UUID NOT NULL UNIQUE,
    opened_at TIMESTAMP NOT NULL
);

CREATE TABLE IF NOT EXISTS {S}.credit_balances (
    user_id UUID PRIMARY KEY,  -- opt-in: REFERENCES users(id) ON DELETE CASCADE
    balance INT NOT NULL,
    held INT NOT NULL,
    available INT NOT NULL,
    updated_at TIMESTAMP NOT NULL DEFAULT NOW(),

    CONSTRAINT chk_credit_balances CHECK (
        balance >= 0 AND held >= 0 AND available >= 0 AND available = balance - held)
);

DROP TRIGGER IF EXISTS trg_credit_balances_updated_at ON {S}.credit_balances;
CREATE TRIGGER trg_credit_balances_updated_at
    BEFORE UPDATE ON {S}.credit_balances
    FOR EACH ROW
    EXECUTE FUNCTION {S}.update_updated_at();
"""

_PG_WEBHOOK_EVENTS = """
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

    -- ledger deviation 6: a CHECK on status
    CONSTRAINT chk_webhook_events_status CHECK (status IN ('received', 'processed', 'failed'))
);
{GUARD_WEBHOOK_EVENTS}
CREATE INDEX IF NOT EXISTS idx_webhook_events_source ON {S}.webhook_events(source);
CREATE INDEX IF NOT EXISTS idx_webhook_events_status ON {S}.webhook_events(status);
CREATE INDEX IF NOT EXISTS idx_webhook_events_created ON {S}.webhook_events(created_at);
-- ledger deviation 6: a delivery is stored once, by event id and by body
CREATE UNIQUE INDEX IF NOT EXISTS uq_webhook_events_event_id
ON {S}.webhook_events(source, event_id)
WHERE event_id IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS uq_webhook_events_payload
ON {S}.webhook_events(source, payload_sha256);
"""

_PG_AUDIT_LOGS = """
-- 19. audit_logs
CREATE TABLE IF NOT EXISTS {S}.audit_logs (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID,  -- seed: REFERENCES users(id) ON DELETE SET NULL (opt-in: user_foreign_keys)
    action VARCHAR(100) NOT NULL,
    entity_type VARCHAR(50),
    entity_id UUID,
    old_value JSONB,
    new_value JSONB,
    ip_address INET,  -- ledger deviation 8: INET as in the seed (TEXT in SQLite)
    user_agent TEXT,
    created_at TIMESTAMP NOT NULL DEFAULT NOW()
);

CREATE INDEX IF NOT EXISTS idx_audit_logs_user ON {S}.audit_logs(user_id);
CREATE INDEX IF NOT EXISTS idx_audit_logs_action ON {S}.audit_logs(action);
CREATE INDEX IF NOT EXISTS idx_audit_logs_entity ON {S}.audit_logs(entity_type, entity_id);
CREATE INDEX IF NOT EXISTS idx_audit_logs_created ON {S}.audit_logs(created_at);
"""

_PG_SCHEMA_VERSION = """
-- The versions of this DDL applied here; the migrate step inserts SCHEMA_VERSION.
CREATE TABLE IF NOT EXISTS {S}.ledger_schema_version (
    version INT PRIMARY KEY,
    applied_at TIMESTAMP NOT NULL DEFAULT NOW()
);
"""


def _rows_with_comments(rows: list[tuple[str, str]]) -> str:
    """VALUES rows joined by commas, each followed by its comment (if any)."""
    lines = []
    for i, (row, note) in enumerate(rows):
        comma = "," if i < len(rows) - 1 else ""
        lines.append(f"{row}{comma}  -- {note}" if note else f"{row}{comma}")
    return "\n".join(lines)


def _plan_id(name: str) -> UUID:
    # The same id the ledger's Plan aggregate has: seeded and projected rows agree,
    # and a rebuilt subscriptions.plan_id equals the live one.
    return uuid5(PLAN_NS, name)


def _feature_id(plan: str, feature: str) -> UUID:
    return uuid5(PLAN_NS, f"{plan}:{feature}")


def _pg_plan_rows() -> str:
    rows = [
        (
            f"('{_plan_id(name)}', '{name}', '{display}', {monthly}, {yearly}, {credits}, {storage}, {queues}, {tier})",
            note,
        )
        for name, display, monthly, yearly, credits, storage, queues, tier, note in _PLAN_ROWS
    ]
    return (
        "INSERT INTO {S}.plans (id, name, display_name, monthly_price, yearly_price, credits, storage_bytes, "
        "queue_count, tier_level) VALUES\n" + _rows_with_comments(rows) + "\nON CONFLICT (name) DO NOTHING;"
    )


def _pg_feature_rows() -> str:
    rows = [
        (
            f"('{_feature_id(plan, key)}', (SELECT id FROM {{S}}.plans WHERE name = '{plan}'), '{key}', "
            f"{'TRUE' if enabled else 'FALSE'})",
            "",
        )
        for plan, key, enabled in _PLAN_FEATURE_ROWS
    ]
    return (
        "INSERT INTO {S}.plan_features (id, plan_id, feature_key, enabled) VALUES\n"
        + _rows_with_comments(rows)
        + "\nON CONFLICT (plan_id, feature_key) DO NOTHING;"
    )


def _pg_user_foreign_keys(s: str) -> str:
    checks = "\n".join(
        f"    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = '{name}'\n"
        f"                   AND conrelid = '{s}.{table}'::regclass) THEN\n"
        f"        ALTER TABLE {s}.{table} ADD CONSTRAINT {name}\n"
        f"            FOREIGN KEY (user_id) REFERENCES {s}.users(id) ON DELETE {action};\n"
        f"    END IF;"
        for table, name, action in USER_FOREIGN_KEYS
    )
    return (
        "\n-- Opt-in (user_foreign_keys=True): the seed's REFERENCES users(id) on the\n"
        "-- user_id columns. The host owns users; added only where missing.\n"
        "DO $$\nBEGIN\n" + checks + "\nEND\n$$;\n"
    )


def _check_schema(schema: str) -> str:
    if not isinstance(schema, str):
        raise ConfigurationError(f"schema must be a str, not {type(schema).__name__}")
    check_identifier(schema, "schema")
    if schema.startswith("pg_"):
        raise ConfigurationError(f"schema {schema!r}: names starting with pg_ are reserved by PostgreSQL")
    return schema


def postgres_ddl(schema: str, *, user_foreign_keys: bool = False) -> str:
    """The PostgreSQL DDL of the ledger's tables in ``schema``, as one script.

    Every name is qualified with ``schema``, which must be a lowercase SQL
    identifier (otherwise :class:`~ledger.ConfigurationError`). With
    ``user_foreign_keys`` the ``user_id`` columns reference ``<schema>.users(id)``
    as in the seed; that table must then exist.
    """
    s = f'"{_check_schema(schema)}"'
    parts = [
        _PG_HEADER.replace("{VERSION}", str(SCHEMA_VERSION)),
        _PG_PLANS.replace("{PLAN_ROWS}", _pg_plan_rows()),
        _PG_PLAN_FEATURES.replace("{FEATURE_ROWS}", _pg_feature_rows()),
        _PG_SUBSCRIPTIONS.replace("{SUBSCRIPTION_STATUSES}", _SUBSCRIPTION_STATUSES).replace(
            "{GUARD_SUBSCRIPTIONS}", _guard("subscriptions", "{S}.subscriptions")
        ),
        _PG_SUBSCRIPTION_HISTORY.replace("{CHANGE_TYPES}", _CHANGE_TYPES),
        _PG_CREDIT_TRANSACTIONS.replace("{CREDIT_TYPES}", _CREDIT_TYPES).replace(
            "{GUARD_CREDIT_TRANSACTIONS}", _guard("credit_transactions", "{S}.credit_transactions")
        ),
        _PG_CREDIT_RESERVATIONS.replace(
            "{GUARD_CREDIT_RESERVATIONS}", _guard("credit_reservations", "{S}.credit_reservations")
        ),
        _PG_CREDIT_BALANCES,
        _PG_WEBHOOK_EVENTS.replace("{GUARD_WEBHOOK_EVENTS}", _guard("webhook_events", "{S}.webhook_events")),
        _PG_AUDIT_LOGS,
        _PG_SCHEMA_VERSION,
    ]
    if user_foreign_keys:
        parts.append(_pg_user_foreign_keys("{S}"))
    return "".join(parts).replace("{S}", s)


# SQLite: TEXT for UUID, JSONB, INET, DECIMAL (the exact decimal string) and
# TIMESTAMP (naive UTC, ISO-8601 with a space), INTEGER 0/1 for BOOLEAN.

#: A random (version 4) UUID in its canonical text form, gen_random_uuid()'s stand-in.
_SQLITE_UUID = (
    "(lower(hex(randomblob(4))) || '-' || lower(hex(randomblob(2))) || '-4' || "
    "substr(lower(hex(randomblob(2))), 2) || '-' || substr('89ab', 1 + (random() & 3), 1) || "
    "substr(lower(hex(randomblob(2))), 2) || '-' || lower(hex(randomblob(6))))"
)
#: NOW() for a TIMESTAMP column: naive UTC in SQLite's own ISO-8601 form
#: ('YYYY-MM-DD HH:MM:SS.fff', a space before the time, as datetime('now')
#: writes it), so that defaults sort with values written the same way.
_SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now')"

_SQLITE_HEADER = """\
-- pingvas-ledger schema version {VERSION}, SQLite (the embedded default).
-- Generated by ledger.storage.ddl.sqlite_ddl(); idempotent: safe to run again.
-- The same tables, columns, CHECKs and index names as the PostgreSQL DDL.
-- Types: TEXT for UUID, JSONB, INET and DECIMAL (the exact decimal, '25.00');
-- TEXT for TIMESTAMP (UTC, ISO-8601 'YYYY-MM-DD HH:MM:SS[.ffffff]', no offset);
-- INTEGER 0/1 for BOOLEAN. Foreign keys are enforced only with
-- PRAGMA foreign_keys = ON.
"""

_SQLITE_PLANS = """
-- 3. plans (ledger deviation 7: none)
CREATE TABLE IF NOT EXISTS plans (
    id TEXT NOT NULL PRIMARY KEY DEFAULT {UUID},
    name TEXT NOT NULL UNIQUE,  -- VARCHAR(50)
    display_name TEXT NOT NULL,  -- VARCHAR(100)
    description TEXT,
    monthly_price TEXT NOT NULL,  -- DECIMAL(10, 2)
    yearly_price TEXT NOT NULL,  -- DECIMAL(10, 2)
    credits INTEGER NOT NULL,
    storage_bytes INTEGER NOT NULL,
    queue_count INTEGER NOT NULL DEFAULT 1,
    tier_level INTEGER NOT NULL,
    lemon_squeezy_variant_id_monthly TEXT,
    lemon_squeezy_variant_id_yearly TEXT,
    is_active INTEGER NOT NULL DEFAULT 1 CHECK (is_active IN (0, 1)),
    created_at TEXT NOT NULL DEFAULT ({NOW}),
    updated_at TEXT NOT NULL DEFAULT ({NOW})
);
"""

_SQLITE_PLAN_FEATURES = """
-- 4. plan_features
CREATE TABLE IF NOT EXISTS plan_features (
    id TEXT NOT NULL PRIMARY KEY DEFAULT {UUID},
    plan_id TEXT NOT NULL REFERENCES plans(id) ON DELETE CASCADE,
    feature_key TEXT NOT NULL,  -- VARCHAR(50)
    enabled INTEGER NOT NULL DEFAULT 0 CHECK (enabled IN (0, 1)),
    config TEXT,  -- JSONB

    UNIQUE(plan_id, feature_key)
);
"""

_SQLITE_SUBSCRIPTIONS = """
-- 5. subscriptions
CREATE TABLE IF NOT EXISTS subscriptions (
    id TEXT NOT NULL PRIMARY KEY DEFAULT {UUID},
    user_id TEXT NOT NULL,
    plan_id TEXT NOT NULL REFERENCES plans(id),
    lemon_squeezy_subscription_id TEXT,
    lemon_squeezy_customer_id TEXT,
    billing_cycle TEXT NOT NULL DEFAULT 'monthly',
    status TEXT NOT NULL DEFAULT 'active',
    current_period_start TEXT NOT NULL,
    current_period_end TEXT NOT NULL,
    trial_ends_at TEXT,
    cancelled_at TEXT,
    cancel_reason TEXT,
    created_at TEXT NOT NULL DEFAULT ({NOW}),
    updated_at TEXT NOT NULL DEFAULT ({NOW}),
    -- ledger deviation 4
    cancel_at_period_end INTEGER NOT NULL DEFAULT 0 CHECK (cancel_at_period_end IN (0, 1)),
    paused_at TEXT,
    ended_at TEXT,

    -- ledger deviation 4: 'paused' added
    CONSTRAINT chk_status CHECK (status IN ({SUBSCRIPTION_STATUSES})),
    CONSTRAINT chk_billing_cycle CHECK (billing_cycle IN ('monthly', 'yearly'))
);
{GUARD}
CREATE INDEX IF NOT EXISTS idx_subscriptions_user ON subscriptions(user_id);
CREATE INDEX IF NOT EXISTS idx_subscriptions_status ON subscriptions(status);
CREATE INDEX IF NOT EXISTS idx_subscriptions_period_end ON subscriptions(current_period_end);
CREATE INDEX IF NOT EXISTS idx_subscriptions_lemon_squeezy ON subscriptions(lemon_squeezy_subscription_id);
CREATE INDEX IF NOT EXISTS idx_subscriptions_active
ON subscriptions(user_id)
WHERE status IN ('active', 'trialing');
-- ledger deviation 4
CREATE UNIQUE INDEX IF NOT EXISTS uq_subscriptions_lemon_squeezy
ON subscriptions(lemon_squeezy_subscription_id)
WHERE lemon_squeezy_subscription_id IS NOT NULL;
"""

_SQLITE_SUBSCRIPTION_HISTORY = """
-- 6. subscription_history
CREATE TABLE IF NOT EXISTS subscription_history (
    id TEXT NOT NULL PRIMARY KEY DEFAULT {UUID},
    subscription_id TEXT NOT NULL REFERENCES subscriptions(id) ON DELETE CASCADE,
    from_plan_id TEXT REFERENCES plans(id),
    to_plan_id TEXT REFERENCES plans(id),
    change_type TEXT NOT NULL,
    details TEXT,  -- JSONB
    changed_at TEXT NOT NULL DEFAULT ({NOW}),

    -- ledger deviation 5
    CONSTRAINT chk_subscription_history_change_type CHECK (change_type IN (
        {CHANGE_TYPES}))
);

CREATE INDEX IF NOT EXISTS idx_subscription_history_subscription ON subscription_history(subscription_id);

-- ledger deviation 12: every provider snapshot of a subscription, by the
-- provider's time.
CREATE TABLE IF NOT EXISTS subscription_snapshots (
    subscription_id TEXT NOT NULL REFERENCES subscriptions(id) ON DELETE CASCADE,
    source_updated_at TEXT NOT NULL,
    plan TEXT,
    status TEXT NOT NULL,
    current_period_start TEXT,
    current_period_end TEXT,
    trial_ends_at TEXT,
    cancel_at_period_end INTEGER,
    plan_tier_level INTEGER,
    PRIMARY KEY (subscription_id, source_updated_at)
);
"""

_SQLITE_CREDIT_TRANSACTIONS = """
-- 7. credit_transactions
CREATE TABLE IF NOT EXISTS credit_transactions (
    id TEXT NOT NULL PRIMARY KEY DEFAULT {UUID},
    user_id TEXT NOT NULL,
    amount INTEGER NOT NULL,
    type TEXT NOT NULL,
    description TEXT,  -- VARCHAR(500)
    reference_id TEXT,  -- UUID
    reference_type TEXT,
    balance_after INTEGER NOT NULL,
    created_at TEXT NOT NULL DEFAULT ({NOW}),
    -- ledger deviation 1
    reference_label TEXT,  -- VARCHAR(100)
    idempotency_key TEXT,  -- VARCHAR(200)
    log_position INTEGER NOT NULL,  -- ledger deviation 11

    -- ledger deviation 1
    CONSTRAINT chk_credit_transactions_type CHECK (type IN (
        {CREDIT_TYPES}))
);
{GUARD}
CREATE INDEX IF NOT EXISTS idx_credit_transactions_user ON credit_transactions(user_id);
CREATE INDEX IF NOT EXISTS idx_credit_transactions_created ON credit_transactions(created_at);
CREATE INDEX IF NOT EXISTS idx_credit_transactions_type ON credit_transactions(type);
CREATE INDEX IF NOT EXISTS idx_credit_transactions_user_created
ON credit_transactions(user_id, created_at DESC);

CREATE UNIQUE INDEX IF NOT EXISTS uq_credit_transactions_user_position
ON credit_transactions(user_id, log_position);
"""

_SQLITE_CREDIT_RESERVATIONS = """
-- 8. credit_reservations
CREATE TABLE IF NOT EXISTS credit_reservations (
    id TEXT NOT NULL PRIMARY KEY DEFAULT {UUID},
    user_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    reserved_amount INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'reserved',
    settled_amount INTEGER,
    created_at TEXT NOT NULL DEFAULT ({NOW}),
    settled_at TEXT,
    -- ledger deviation 2
    expires_at TEXT NOT NULL,
    release_reason TEXT,
    idempotency_key TEXT,

    -- ledger deviation 2
    CONSTRAINT chk_credit_reservations_status CHECK (status IN ('reserved', 'settled', 'refunded'))
);
{GUARD}
CREATE INDEX IF NOT EXISTS idx_credit_reservations_user ON credit_reservations(user_id);
CREATE INDEX IF NOT EXISTS idx_credit_reservations_job ON credit_reservations(job_id);
CREATE INDEX IF NOT EXISTS idx_credit_reservations_status ON credit_reservations(status);
"""

_SQLITE_CREDIT_BALANCES = """
-- ledger deviation 3: one row per account
CREATE TABLE IF NOT EXISTS credit_balances (
    user_id TEXT NOT NULL PRIMARY KEY,
    balance INTEGER NOT NULL,
    held INTEGER NOT NULL,
    available INTEGER NOT NULL,
    updated_at TEXT NOT NULL DEFAULT ({NOW}),

    CONSTRAINT chk_credit_balances CHECK (
        balance >= 0 AND held >= 0 AND available >= 0 AND available = balance - held)
);
"""

_SQLITE_CREDIT_ACCOUNTS = """
-- ledger deviation 10: account id -> user id, written when an account opens.
CREATE TABLE IF NOT EXISTS credit_accounts (
    account_id TEXT NOT NULL PRIMARY KEY,
    user_id TEXT NOT NULL UNIQUE,
    opened_at TEXT NOT NULL
);
"""

_SQLITE_WEBHOOK_EVENTS = """
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

    -- ledger deviation 6
    CONSTRAINT chk_webhook_events_status CHECK (status IN ('received', 'processed', 'failed'))
);
{GUARD}
CREATE INDEX IF NOT EXISTS idx_webhook_events_source ON webhook_events(source);
CREATE INDEX IF NOT EXISTS idx_webhook_events_status ON webhook_events(status);
CREATE INDEX IF NOT EXISTS idx_webhook_events_created ON webhook_events(created_at);
-- ledger deviation 6
CREATE UNIQUE INDEX IF NOT EXISTS uq_webhook_events_event_id
ON webhook_events(source, event_id)
WHERE event_id IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS uq_webhook_events_payload
ON webhook_events(source, payload_sha256);
"""

_SQLITE_AUDIT_LOGS = """
-- 19. audit_logs
CREATE TABLE IF NOT EXISTS audit_logs (
    id TEXT NOT NULL PRIMARY KEY DEFAULT {UUID},
    user_id TEXT,
    action TEXT NOT NULL,
    entity_type TEXT,
    entity_id TEXT,
    old_value TEXT,  -- JSONB
    new_value TEXT,  -- JSONB
    ip_address TEXT,  -- INET (ledger deviation 8)
    user_agent TEXT,
    created_at TEXT NOT NULL DEFAULT ({NOW})
);

CREATE INDEX IF NOT EXISTS idx_audit_logs_user ON audit_logs(user_id);
CREATE INDEX IF NOT EXISTS idx_audit_logs_action ON audit_logs(action);
CREATE INDEX IF NOT EXISTS idx_audit_logs_entity ON audit_logs(entity_type, entity_id);
CREATE INDEX IF NOT EXISTS idx_audit_logs_created ON audit_logs(created_at);
"""

_SQLITE_SCHEMA_VERSION = """
CREATE TABLE IF NOT EXISTS ledger_schema_version (
    version INTEGER PRIMARY KEY,
    applied_at TEXT NOT NULL DEFAULT ({NOW})
);
"""

_COLUMN_LINE = re.compile(r"^    ([a-z_][a-z0-9_]*) [A-Z]", re.MULTILINE)


def _column_names(create_table: str) -> list[str]:
    """The column names of a CREATE TABLE statement written in this module's style."""
    return _COLUMN_LINE.findall(create_table)


def _sqlite_updated_at_trigger(table: str, create_table: str) -> str:
    # Emulates BEFORE UPDATE ... update_updated_at(): after an UPDATE that sets
    # any other column, set updated_at to now. Listing the columns (all but
    # updated_at) keeps the trigger from firing itself, even with
    # PRAGMA recursive_triggers = ON.
    columns = ", ".join(c for c in _column_names(create_table) if c != "updated_at")
    return (
        f"\n-- update_updated_at, emulated\n"
        f"DROP TRIGGER IF EXISTS trg_{table}_updated_at;\n"
        f"CREATE TRIGGER trg_{table}_updated_at\n"
        f"    AFTER UPDATE OF {columns} ON {table}\n"
        f"    FOR EACH ROW\n"
        f"BEGIN\n"
        f"    UPDATE {table} SET updated_at = {_SQLITE_NOW} WHERE rowid = NEW.rowid;\n"
        f"END;\n"
    )


def _sqlite_seed_rows() -> str:
    # Prices as text literals: a numeric 25.00 would be stored as '25.0'.
    plans = [
        (
            f"('{_plan_id(name)}', '{name}', '{display}', '{monthly}', '{yearly}', {credits}, {storage}, "
            f"{queues}, {tier})",
            note,
        )
        for name, display, monthly, yearly, credits, storage, queues, tier, note in _PLAN_ROWS
    ]
    features = [
        (
            f"('{_feature_id(plan, key)}', (SELECT id FROM plans WHERE name = '{plan}'), '{key}', "
            f"{1 if enabled else 0})",
            "",
        )
        for plan, key, enabled in _PLAN_FEATURE_ROWS
    ]
    return (
        "\n-- The seed's default catalog and feature flags; rows already there stay as they are.\n"
        "INSERT OR IGNORE INTO plans (id, name, display_name, monthly_price, yearly_price, credits, "
        "storage_bytes, queue_count, tier_level) VALUES\n" + _rows_with_comments(plans) + "\n;\n"
        "INSERT OR IGNORE INTO plan_features (id, plan_id, feature_key, enabled) VALUES\n"
        + _rows_with_comments(features)
        + ";\n"
    )


def sqlite_ddl() -> str:
    """The SQLite DDL of the ledger's tables, as one script (for ``executescript``)."""
    plans = _SQLITE_PLANS
    subscriptions = _SQLITE_SUBSCRIPTIONS.replace("{SUBSCRIPTION_STATUSES}", _SUBSCRIPTION_STATUSES)
    parts = [
        _SQLITE_HEADER.replace("{VERSION}", str(SCHEMA_VERSION)),
        plans,
        _sqlite_updated_at_trigger("plans", plans),
        _SQLITE_PLAN_FEATURES,
        _sqlite_seed_rows(),
        subscriptions.replace("{GUARD}", _guard("subscriptions", "subscriptions")),
        _sqlite_updated_at_trigger("subscriptions", subscriptions),
        _SQLITE_SUBSCRIPTION_HISTORY.replace("{CHANGE_TYPES}", _CHANGE_TYPES),
        _SQLITE_CREDIT_TRANSACTIONS.replace("{CREDIT_TYPES}", _CREDIT_TYPES).replace(
            "{GUARD}", _guard("credit_transactions", "credit_transactions")
        ),
        _SQLITE_CREDIT_RESERVATIONS.replace("{GUARD}", _guard("credit_reservations", "credit_reservations")),
        _SQLITE_CREDIT_BALANCES,
        _sqlite_updated_at_trigger("credit_balances", _SQLITE_CREDIT_BALANCES),
        _SQLITE_CREDIT_ACCOUNTS,
        _SQLITE_WEBHOOK_EVENTS.replace("{GUARD}", _guard("webhook_events", "webhook_events")),
        _SQLITE_AUDIT_LOGS,
        _SQLITE_SCHEMA_VERSION,
    ]
    return "".join(parts).replace("{UUID}", _SQLITE_UUID).replace("{NOW}", _SQLITE_NOW)
