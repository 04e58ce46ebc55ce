"""The plan catalog's tables, plans and plan_features, with the seed's rows.

The subscription view keeps them current from ``Plan`` events and declares
them in its DDL (``SubscriptionView.ddl``); they are not rebuilt: the DDL
seeds the seed's four plans and twelve feature flags, and the host may edit
them.
"""

from __future__ import annotations

from uuid import UUID, uuid5

from ledger.domain.plans import PLAN_NS
from ledger.storage.ddl import Table
from ledger.storage.viewstore import ViewStore

__all__ = ["PLANS", "PLAN_FEATURES", "copy_plans"]

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


def _sqlite_plan_rows() -> str:
    # Prices as text literals: a numeric 25.00 would be stored as '25.0'.
    rows = [
        (
            f"('{_plan_id(name)}', '{name}', '{display}', '{monthly}', '{yearly}', {credits}, {storage}, "
            f"{queues}, {tier})",
            note,
        )
        for name, display, monthly, yearly, credits, storage, queues, tier, note in _PLAN_ROWS
    ]
    return (
        "INSERT OR IGNORE INTO plans (id, name, display_name, monthly_price, yearly_price, credits, "
        "storage_bytes, queue_count, tier_level) VALUES\n" + _rows_with_comments(rows) + "\n;"
    )


def _sqlite_feature_rows() -> str:
    rows = [
        (
            f"('{_feature_id(plan, key)}', (SELECT id FROM plans WHERE name = '{plan}'), '{key}', "
            f"{1 if enabled else 0})",
            "",
        )
        for plan, key, enabled in _PLAN_FEATURE_ROWS
    ]
    return (
        "INSERT OR IGNORE INTO plan_features (id, plan_id, feature_key, enabled) VALUES\n"
        + _rows_with_comments(rows)
        + ";"
    )


PLANS = Table(
    "plans",
    postgres="""
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
""",
    postgres_after=(
        "\n-- The seed's default catalog. ON CONFLICT: rows the host has edited stay as\n-- they are.\n"
        + _pg_plan_rows()
        + "\n"
    ),
    sqlite="""
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
""",
    sqlite_after=(
        "\n-- The seed's default catalog; rows already there stay as they are.\n" + _sqlite_plan_rows() + "\n"
    ),
    updated_at=True,
)

PLAN_FEATURES = Table(
    "plan_features",
    postgres="""
-- 4. plan_features
CREATE TABLE IF NOT EXISTS {S}.plan_features (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    plan_id UUID NOT NULL REFERENCES {S}.plans(id) ON DELETE CASCADE,
    feature_key VARCHAR(50) NOT NULL,  -- flux_model, nano_banana_api, lora_training, ...
    enabled BOOLEAN NOT NULL DEFAULT FALSE,
    config JSONB,  -- extra settings (for example API call limits)

    UNIQUE(plan_id, feature_key)
);
""",
    postgres_after="\n-- The seed's feature flags.\n" + _pg_feature_rows() + "\n",
    sqlite="""
-- 4. plan_features
CREATE TABLE IF NOT EXISTS plan_features (
    id TEXT NOT NULL PRIMARY KEY DEFAULT {UUID},
    plan_id TEXT NOT NULL REFERENCES plans(id) ON DELETE CASCADE,
    feature_key TEXT NOT NULL,  -- VARCHAR(50)
    enabled INTEGER NOT NULL DEFAULT 0 CHECK (enabled IN (0, 1)),
    config TEXT,  -- JSONB

    UNIQUE(plan_id, feature_key)
);
""",
    sqlite_after="\n-- The seed's feature flags; rows already there stay as they are.\n"
    + _sqlite_feature_rows()
    + "\n",
)


def copy_plans(live: ViewStore, aside: ViewStore) -> None:
    """Gives a rebuild's fresh ``aside`` the live ``plans`` rows in place of
    the DDL's seed rows, ids included.

    The catalog is not rebuilt: the projector finds a plan by name and writes
    the id the live row has, which need not be the DDL's (the seed's own
    ``INSERT`` gives its plans random ids). Rebuilt rows must name the same
    ids as the live ones, or the swap would break ``subscriptions.plan_id``'s
    reference. ``plan_features`` is left empty: no view reads it, and the
    plan events write the features again."""
    shared = set(live.columns("plans"))
    columns = [c for c in aside.columns("plans") if c in shared]
    rows = live.read(f"SELECT {', '.join(columns)} FROM {live.qualified('plans')}", [])
    with aside.transaction() as tx:
        tx.execute("DELETE FROM plan_features")
        tx.execute("DELETE FROM plans")
        tx.executemany(
            f"INSERT INTO plans ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})",
            [list(row) for row in rows],
        )
