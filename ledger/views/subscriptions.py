"""The subscription read model: plans, plan_features, subscriptions,
subscription_history, subscription_snapshots and audit_logs (admin actions),
with their DDL (the catalog's in ``ledger/views/catalog.py``), and, when the
host opts in, users.tier and users.storage_quota."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar
from uuid import UUID, uuid5

from ledger.domain.credits import CreditAccount
from ledger.domain.entitlements import entitled
from ledger.domain.plans import FREE_PLAN, SEED_PROVIDER, Plan, PlanTerms, plan_id_for
from ledger.domain.subscriptions import (
    PROVIDER_CHANGE_REASON,
    PauseMode,
    ProviderSnapshot,
    ProviderState,
    Status,
    Subscription,
    provider_states,
)
from ledger.storage.ddl import Table
from ledger.storage.viewstore import ViewTx
from ledger.views.base import View, ViewOptions
from ledger.views.catalog import PLAN_FEATURES, PLANS

ROW_NS = UUID("5b0f7f4e-8d0c-4c7e-9a53-0c2f1f6a7b20")

SUBSCRIPTION_COLUMNS = (
    "id",
    "user_id",
    "plan_id",
    "lemon_squeezy_subscription_id",
    "lemon_squeezy_customer_id",
    "billing_cycle",
    "status",
    "current_period_start",
    "current_period_end",
    "trial_ends_at",
    "cancelled_at",
    "cancel_reason",
    "created_at",
    "cancel_at_period_end",
    "paused_at",
    "ended_at",
)


_SUBSCRIPTION_STATUSES = "'active', 'trialing', 'past_due', 'cancelled', 'expired', 'paused'"
_CHANGE_TYPES = (
    "'created', 'upgraded', 'downgraded', 'cancelled', 'renewed', 'expired',\n"
    "        'resumed', 'paused', 'unpaused', 'past_due', 'recovered', 'trial_started', 'activated'"
)

SUBSCRIPTIONS = Table(
    "subscriptions",
    postgres="""
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
""".replace("{SUBSCRIPTION_STATUSES}", _SUBSCRIPTION_STATUSES),
    postgres_after="""
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

-- ledger deviation 4: a table created from the seed keeps the seed's chk_status,
-- which has no 'paused' (CREATE TABLE IF NOT EXISTS passed over it); replace it
-- by this one, only where it lacks 'paused'.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'chk_status'
                   AND conrelid = '{S}.subscriptions'::regclass
                   AND strpos(pg_get_constraintdef(oid), '''paused''') > 0) THEN
        ALTER TABLE {S}.subscriptions DROP CONSTRAINT IF EXISTS chk_status;
        ALTER TABLE {S}.subscriptions ADD CONSTRAINT chk_status CHECK (status IN ({SUBSCRIPTION_STATUSES}));
    END IF;
END
$$;
""".replace("{SUBSCRIPTION_STATUSES}", _SUBSCRIPTION_STATUSES),
    sqlite="""
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
""".replace("{SUBSCRIPTION_STATUSES}", _SUBSCRIPTION_STATUSES),
    sqlite_after="""
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
""",
    guard=("cancel_at_period_end", "paused_at", "ended_at"),
    updated_at=True,
    user_foreign_key=("fk_subscriptions_user", "CASCADE"),
)

SUBSCRIPTION_HISTORY = Table(
    "subscription_history",
    postgres="""
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
""".replace("{CHANGE_TYPES}", _CHANGE_TYPES),
    postgres_after="""
CREATE INDEX IF NOT EXISTS idx_subscription_history_subscription ON {S}.subscription_history(subscription_id);
""",
    sqlite="""
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
""".replace("{CHANGE_TYPES}", _CHANGE_TYPES),
    sqlite_after="""
CREATE INDEX IF NOT EXISTS idx_subscription_history_subscription ON subscription_history(subscription_id);
""",
)

SUBSCRIPTION_SNAPSHOTS = Table(
    "subscription_snapshots",
    postgres="""
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
""",
    sqlite="""
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
""",
)

AUDIT_LOGS = Table(
    "audit_logs",
    postgres="""
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
""",
    postgres_after="""
CREATE INDEX IF NOT EXISTS idx_audit_logs_user ON {S}.audit_logs(user_id);
CREATE INDEX IF NOT EXISTS idx_audit_logs_action ON {S}.audit_logs(action);
CREATE INDEX IF NOT EXISTS idx_audit_logs_entity ON {S}.audit_logs(entity_type, entity_id);
CREATE INDEX IF NOT EXISTS idx_audit_logs_created ON {S}.audit_logs(created_at);
""",
    sqlite="""
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
""",
    sqlite_after="""
CREATE INDEX IF NOT EXISTS idx_audit_logs_user ON audit_logs(user_id);
CREATE INDEX IF NOT EXISTS idx_audit_logs_action ON audit_logs(action);
CREATE INDEX IF NOT EXISTS idx_audit_logs_entity ON audit_logs(entity_type, entity_id);
CREATE INDEX IF NOT EXISTS idx_audit_logs_created ON audit_logs(created_at);
""",
    user_foreign_key=("fk_audit_logs_user", "SET NULL"),
)


def row_id(kind: str, originator_id: UUID, version: int) -> UUID:
    """History and audit rows get ids derived from their event: a rebuild writes the same ids."""
    return uuid5(ROW_NS, f"{kind}:{originator_id}:{version}")


class SubscriptionView(View):
    name = "subscriptions"
    topics = (
        *(
            cls.TOPIC
            for cls in (
                Plan.Defined,
                Plan.Revised,
                Subscription.Started,
                Subscription.Activated,
                Subscription.Renewed,
                Subscription.PlanChanged,
                Subscription.StatusChanged,
                Subscription.Cancelled,
                Subscription.Expired,
                Subscription.Synced,
                Subscription.Superseded,
                CreditAccount.Granted,
                CreditAccount.Debited,
            )
        ),
    )
    tables: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {
        "subscriptions": ("id", ("updated_at",)),
        "subscription_history": ("changed_at, id", ()),
        "subscription_snapshots": ("subscription_id, source_updated_at", ()),
        "audit_logs": ("created_at, id", ()),
    }
    #: plans and plan_features too: kept current from Plan events, not rebuilt.
    ddl = (PLANS, PLAN_FEATURES, SUBSCRIPTIONS, SUBSCRIPTION_HISTORY, SUBSCRIPTION_SNAPSHOTS, AUDIT_LOGS)

    def __init__(self, *, sync_user_tier: bool = False) -> None:
        self.sync_user_tier = sync_user_tier

    @classmethod
    def create(cls, options: ViewOptions) -> SubscriptionView:
        return cls(sync_user_tier=options.sync_user_tier)

    def process(self, events: Sequence[tuple[int, Any]], tx: ViewTx) -> None:
        plans: dict[str, PlanTerms] = {}
        subs: dict[UUID, dict[str, Any]] = {}
        history: list[list[Any]] = []
        audit: list[list[Any]] = []
        timelines = _Timelines(tx)
        for _, event in events:
            if isinstance(event, Plan.Defined | Plan.Revised):
                terms = PlanTerms.from_event_data(event.terms)
                plans[terms.name] = terms
                self._plan(tx, terms)
                if event.actor:
                    audit.append(
                        self._audit(
                            event,
                            None,
                            "plan.defined",
                            "plan",
                            _plan_id(tx, terms.name),  # the plans row's id, which the host's catalog may have chosen
                            {"terms": _jsonable(event.terms), "actor": event.actor},
                        )
                    )
            elif isinstance(event, Subscription.Event | Subscription.Started):
                row = subs.get(event.originator_id) or self._row(tx, event.originator_id)
                change = self._apply(row, event)
                subs[event.originator_id] = row
                if isinstance(event, Subscription.Synced | Subscription.Superseded):
                    if not getattr(event, "restated", False):  # a restatement brings no snapshot
                        timelines.add(event, row)
                elif change is not None and not (
                    isinstance(event, Subscription.PlanChanged)
                    and event.reason == PROVIDER_CHANGE_REASON
                    and event.actor is None
                ):
                    # A provider's changes are written from its timeline
                    # (below); the ledger's own are written as they happen.
                    history.append(self._history(tx, event, row, change))
                actor = getattr(event, "actor", None)
                if actor:
                    audit.append(
                        self._audit(
                            event,
                            row["user_id"],
                            f"subscription.{change}",
                            "subscription",
                            event.originator_id,
                            {"actor": actor, **_details(event)},
                        )
                    )
            elif getattr(event, "kind", None) == "admin_adjustment" and getattr(event, "actor", None):
                sign = 1 if isinstance(event, CreditAccount.Granted) else -1
                user = tx.fetchall("SELECT user_id FROM credit_accounts WHERE account_id = %s", [event.originator_id])
                audit.append(
                    self._audit(
                        event,
                        user[0][0] if user else None,
                        "credits.adjusted",
                        "credit_account",
                        event.originator_id,
                        {
                            "delta": sign * event.amount,
                            "reason": event.description,
                            "actor": event.actor,
                            "key": event.key,
                        },
                    )
                )
        for row in subs.values():
            self._write_subscription(tx, row)
            if self.sync_user_tier:
                self._sync_user(tx, row)
        tx.executemany(
            "INSERT INTO subscription_history (id, subscription_id, from_plan_id, to_plan_id, change_type, details, "
            "changed_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            history,
        )
        timelines.write()
        tx.executemany(
            "INSERT INTO audit_logs (id, user_id, action, entity_type, entity_id, old_value, new_value, created_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            audit,
        )

    # -- plans ------------------------------------------------------------------------

    @staticmethod
    def _plan(tx: ViewTx, terms: PlanTerms) -> None:
        tx.execute(
            "INSERT INTO plans (id, name, display_name, description, monthly_price, yearly_price, credits, "
            "storage_bytes, queue_count, tier_level, lemon_squeezy_variant_id_monthly, "
            "lemon_squeezy_variant_id_yearly, is_active) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (name) DO UPDATE SET display_name = excluded.display_name, "
            "description = excluded.description, monthly_price = excluded.monthly_price, "
            "yearly_price = excluded.yearly_price, credits = excluded.credits, storage_bytes = excluded.storage_bytes, "
            "queue_count = excluded.queue_count, tier_level = excluded.tier_level, "
            "lemon_squeezy_variant_id_monthly = excluded.lemon_squeezy_variant_id_monthly, "
            "lemon_squeezy_variant_id_yearly = excluded.lemon_squeezy_variant_id_yearly, "
            "is_active = excluded.is_active",
            [
                plan_id_for(terms.name),
                terms.name,
                terms.display_name,
                terms.description,
                terms.monthly_price,
                terms.yearly_price,
                terms.credits,
                terms.storage_bytes,
                terms.queue_count,
                terms.tier_level,
                terms.lemon_squeezy_variant_id_monthly,
                terms.lemon_squeezy_variant_id_yearly,
                terms.is_active,
            ],
        )
        plan_id = _plan_id(tx, terms.name)
        # A revision that drops a feature drops its row.
        keep = list(terms.features)
        if keep:
            where, params = tx.where_in("feature_key", keep, negate=True)
            tx.execute(f"DELETE FROM plan_features WHERE plan_id = %s AND {where}", [plan_id, *params])
        else:
            tx.execute("DELETE FROM plan_features WHERE plan_id = %s", [plan_id])
        for key, feature in terms.features.items():
            tx.execute(
                "INSERT INTO plan_features (id, plan_id, feature_key, enabled, config) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (plan_id, feature_key) DO UPDATE SET enabled = excluded.enabled, config = excluded.config",
                [uuid5(plan_id_for(terms.name), key), plan_id, key, feature.enabled, feature.config],
            )

    # -- subscriptions ---------------------------------------------------------------------

    @staticmethod
    def _row(tx: ViewTx, subscription_id: UUID) -> dict[str, Any]:
        found = tx.fetchall(
            f"SELECT {', '.join(SUBSCRIPTION_COLUMNS)} FROM subscriptions WHERE id = %s", [subscription_id]
        )
        row = dict(zip(SUBSCRIPTION_COLUMNS, found[0], strict=True)) if found else {}
        row["_plan"] = None
        if found:
            names = tx.fetchall("SELECT name FROM plans WHERE id = %s", [row["plan_id"]])
            row["_plan"] = names[0][0] if names else None
        return row

    @staticmethod
    def _apply(row: dict[str, Any], event: Any) -> str | None:
        """Updates the row; returns the history change type, if the event is one."""
        if isinstance(event, Subscription.Started):
            seeded = event.provider == SEED_PROVIDER
            row.update(
                id=event.originator_id,
                user_id=event.user_id,
                _plan=event.plan,
                # The seed's columns hold the seed's provider's ids (Lemon Squeezy's).
                lemon_squeezy_subscription_id=event.provider_subscription_id if seeded else None,
                lemon_squeezy_customer_id=event.provider_customer_id if seeded else None,
                billing_cycle=event.billing_cycle,
                status=event.status,
                current_period_start=event.period_start,
                current_period_end=event.period_end,
                trial_ends_at=event.trial_ends_at,
                cancelled_at=None,
                cancel_reason=None,
                created_at=event.timestamp,
                cancel_at_period_end=False,
                paused_at=None,
                ended_at=None,
            )
            return "trial_started" if event.status == Status.TRIALING else "created"
        if isinstance(event, Subscription.Activated):
            row.update(
                status=Status.ACTIVE.value, current_period_start=event.period_start, current_period_end=event.period_end
            )
            return "activated"
        if isinstance(event, Subscription.Renewed):
            row.update(
                status=Status.ACTIVE.value, current_period_start=event.period_start, current_period_end=event.period_end
            )
            return "renewed"
        if isinstance(event, Subscription.PlanChanged):
            row["_from_plan"] = row["_plan"]
            row["_plan"] = event.to_plan
            return str(event.change)
        if isinstance(event, Subscription.StatusChanged):
            row["status"] = event.status
            if event.change == "paused":
                row["paused_at"] = event.timestamp
                row["_pause_mode"] = event.pause_mode or PauseMode.VOID.value
            elif event.change == "unpaused":
                row["paused_at"] = None
            elif event.change == "resumed":
                row.update(cancelled_at=None, cancel_reason=None, cancel_at_period_end=False)
            return str(event.change)
        if isinstance(event, Subscription.Cancelled):
            row.update(
                status=Status.CANCELLED.value,
                cancelled_at=event.timestamp,
                cancel_reason=event.reason,
                cancel_at_period_end=event.at_period_end,
            )
            return "cancelled"
        if isinstance(event, Subscription.Expired):
            row.update(status=Status.EXPIRED.value, ended_at=event.timestamp)
            return "expired"
        if isinstance(event, Subscription.Synced):
            before = row.get("status")
            row.update(
                status=event.status,
                current_period_start=event.period_start,
                current_period_end=event.period_end,
                trial_ends_at=event.trial_ends_at,
                cancel_at_period_end=event.cancel_at_period_end,
            )
            if event.provider_times:
                # The provider's times, from its snapshots (Synced version 2).
                row.update(
                    cancelled_at=event.cancelled_at,
                    cancel_reason=event.cancel_reason,
                    paused_at=event.paused_at,
                    ended_at=event.ended_at,
                )
            elif event.status == Status.EXPIRED:
                row["ended_at"] = event.timestamp
            if event.status == Status.PAUSED:
                row["_pause_mode"] = event.pause_mode or PauseMode.VOID.value
            return _synced_change(before, event.status)
        return None

    @staticmethod
    def _history(tx: ViewTx, event: Any, row: dict[str, Any], change: str) -> list[Any]:
        from_plan = row.pop("_from_plan", None) if change in ("upgraded", "downgraded") else None
        # The row's period is the event's or, when an earlier page wrote the
        # row, the table's (naive, or text on SQLite): one form either way, so
        # that a rebuild writes the details the live views wrote.
        details = {
            **_details(event),
            "period_start": _utc(row["current_period_start"]),
            "period_end": _utc(row["current_period_end"]),
        }
        if from_plan:
            details.update({"from": from_plan, "to": row["_plan"]})
        return [
            row_id("history", event.originator_id, event.originator_version),
            event.originator_id,
            _plan_id(tx, from_plan) if from_plan else None,
            _plan_id(tx, row["_plan"]),
            change,
            _jsonable(details),
            event.timestamp,
        ]

    @staticmethod
    def _audit(
        event: Any, user_id: Any, action: str, entity_type: str, entity_id: UUID, new_value: dict[str, Any]
    ) -> list[Any]:
        return [
            row_id("audit", event.originator_id, event.originator_version),
            user_id,
            action,
            entity_type,
            entity_id,
            None,
            _jsonable(new_value),
            event.timestamp,
        ]

    @staticmethod
    def _write_subscription(tx: ViewTx, row: dict[str, Any]) -> None:
        row["plan_id"] = _plan_id(tx, row["_plan"])
        values = [row[c] for c in SUBSCRIPTION_COLUMNS]
        updates = ", ".join(f"{c} = excluded.{c}" for c in SUBSCRIPTION_COLUMNS if c != "id")
        tx.execute(
            f"INSERT INTO subscriptions ({', '.join(SUBSCRIPTION_COLUMNS)}) "
            f"VALUES ({', '.join(['%s'] * len(SUBSCRIPTION_COLUMNS))}) ON CONFLICT (id) DO UPDATE SET {updates}",
            values,
        )

    @staticmethod
    def _sync_user(tx: ViewTx, row: dict[str, Any]) -> None:
        paused = row["status"] == Status.PAUSED.value
        if paused and "_pause_mode" not in row:
            # The table keeps no pause mode: the batch that paused it, which
            # knew the mode, set the user's tier.
            return
        free_pause = paused and row["_pause_mode"] == PauseMode.FREE.value
        live = row["status"] != Status.EXPIRED.value and (not paused or free_pause)
        plan = row["_plan"] if live else FREE_PLAN.name
        storage = tx.fetchall("SELECT storage_bytes FROM plans WHERE name = %s", [plan]) if live else [(0,)]
        tx.execute(
            "UPDATE users SET tier = %s, storage_quota = %s WHERE id = %s",
            [plan, storage[0][0] if storage else 0, row["user_id"]],
        )


def _plan_id(tx: ViewTx, name: str) -> Any:
    found = tx.fetchall("SELECT id FROM plans WHERE name = %s", [name])
    return found[0][0] if found else plan_id_for(name)


def _details(event: Any) -> dict[str, Any]:
    keep = ("reason", "granted_credits", "at_period_end", "change", "plan_revision", "to_revision")
    return {k: getattr(event, k) for k in keep if hasattr(event, k)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _synced_change(before: Any, after: str) -> str | None:
    if before == after:
        return None
    return {
        Status.EXPIRED.value: "expired",
        Status.CANCELLED.value: "cancelled",
        Status.PAUSED.value: "paused",
        Status.PAST_DUE.value: "past_due",
        Status.ACTIVE.value: "recovered"
        if before == Status.PAST_DUE.value
        else "unpaused"
        if before == Status.PAUSED.value
        else "resumed"
        if before == Status.CANCELLED.value
        else "activated",
        Status.TRIALING.value: "trial_started",
    }.get(after)


_SNAPSHOT_COLUMNS = (
    "source_updated_at",
    "plan",
    "status",
    "current_period_start",
    "current_period_end",
    "trial_ends_at",
    "cancel_at_period_end",
    "plan_tier_level",
)


def _utc(value: Any) -> Any:
    """A timestamp as an aware UTC datetime, whether it came from an event or
    from either store's column (naive UTC, or text on SQLite)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _snapshot_of(row: tuple[Any, ...]) -> ProviderSnapshot:
    """A subscription_snapshots row as the provider's snapshot: no plan, a
    bare status; a plan and no period, a period kept from the snapshot before."""
    at, plan, status, start, end, trial, cancel, _tier = row
    return ProviderSnapshot(
        at=at,
        status=status,
        plan=plan,
        period_start=start,
        period_end=end,
        trial_ends_at=trial,
        cancel_at_period_end=cancel,
        period_kept=plan is not None and end is None,
    )


def _ranks_above(row: tuple[Any, ...], other: tuple[Any, ...] | None) -> bool:
    """Whether a row wins its second over ``other`` (the tie rule, snapshot_rank)."""
    return other is None or _snapshot_of(row).rank > _snapshot_of(other).rank


class _Timelines:
    """The history of a subscription a payment provider drives, written from
    every snapshot it sent (``subscription_snapshots``), in the provider's
    order: the first snapshot is its ``created`` (or ``trial_started``) row,
    and each later one the plan change and the status change it brought, at
    the snapshot's time. A snapshot that arrives late (older than one applied)
    takes its place, and the subscription's provider rows are written again:
    the rows are the same whatever order the snapshots arrived in."""

    def __init__(self, tx: ViewTx) -> None:
        self.tx = tx
        self.pending: dict[UUID, dict[Any, tuple[Any, ...]]] = {}
        self.plan_ids: dict[str, Any] = {}

    def add(self, event: Any, row: dict[str, Any]) -> None:
        at = _utc(event.source_updated_at)
        snapshot: tuple[Any, ...]
        if getattr(event, "status_only", False):
            # Only the status is the provider's: the rest comes from the
            # snapshot before it when the rows are written.
            snapshot = (at, None, str(event.status), None, None, None, None, None)
        else:
            plan = event.plan if isinstance(event, Subscription.Superseded) else row["_plan"]
            # A kept period is the snapshot's before: NULL here, found again
            # from the snapshots in the provider's order when rows are written.
            kept = getattr(event, "period_kept", False)
            snapshot = (
                at,
                plan,
                str(event.status),
                None if kept else _utc(event.period_start),
                None if kept else _utc(event.period_end),
                _utc(event.trial_ends_at),
                bool(event.cancel_at_period_end),
                # The plan's tier as the log stands at this event (the plans
                # table is projected in the same order, live or rebuilt): an
                # upgrade stays an upgrade when a tier is revised later.
                self._tier(plan),
            )
        pending = self.pending.setdefault(event.originator_id, {})
        if _ranks_above(snapshot, pending.get(at)):
            pending[at] = snapshot

    def write(self) -> None:
        for subscription_id, pending in self.pending.items():
            old = self._stored(subscription_id)
            # Of two snapshots of one second, the one that ranks higher stays,
            # whichever was projected first.
            new = {at: s for at, s in pending.items() if at not in old or _ranks_above(s, old[at])}
            merged = {**old, **new}
            stale = [[i] for i in self._row_ids(subscription_id, old)]
            # The row Started wrote as it happened: the timeline's first row replaces it.
            stale.append([row_id("history", subscription_id, 1)])
            self.tx.executemany("DELETE FROM subscription_history WHERE id = %s", stale)
            self.tx.executemany(
                f"INSERT INTO subscription_snapshots (subscription_id, {', '.join(_SNAPSHOT_COLUMNS)}) "
                f"VALUES (%s, {', '.join(['%s'] * len(_SNAPSHOT_COLUMNS))}) ON CONFLICT (subscription_id, "
                "source_updated_at) DO UPDATE SET "
                + ", ".join(f"{c} = excluded.{c}" for c in _SNAPSHOT_COLUMNS if c != "source_updated_at"),
                [[subscription_id, *s] for s in new.values()],
            )
            self.tx.executemany(
                "INSERT INTO subscription_history (id, subscription_id, from_plan_id, to_plan_id, change_type, "
                "details, changed_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                self._rows(subscription_id, merged),
            )
        self.pending.clear()

    def _stored(self, subscription_id: UUID) -> dict[Any, tuple[Any, ...]]:
        found = self.tx.fetchall(
            f"SELECT {', '.join(_SNAPSHOT_COLUMNS)} FROM subscription_snapshots WHERE subscription_id = %s",
            [subscription_id],
        )
        snapshots = {}
        for at, plan, status, start, end, trial, cancel, tier in found:
            at = _utc(at)
            full = cancel is not None
            snapshots[at] = (
                at,
                plan,
                status,
                _utc(start),
                _utc(end),
                _utc(trial),
                bool(cancel) if full else None,
                int(tier) if tier is not None else None,
            )
        return snapshots

    def _row_ids(self, subscription_id: UUID, snapshots: dict[Any, tuple[Any, ...]]) -> list[UUID]:
        return [r[0] for r in self._changes(subscription_id, snapshots)]

    def _changes(self, subscription_id: UUID, snapshots: dict[Any, tuple[Any, ...]]) -> list[list[Any]]:
        """(id, from plan, to plan, change, details, time) of each row, in order:
        one per state the snapshots describe (provider_states, as the
        subscription itself follows them)."""
        tiers = {at: s[7] for at, s in snapshots.items()}
        rows: list[list[Any]] = []
        previous: ProviderState | None = None
        for state in provider_states(_snapshot_of(s) for s in snapshots.values()):
            at, plan, status = state.source.at, state.plan, state.status
            period = {"period_start": state.period_start, "period_end": state.period_end, "source_updated_at": at}
            if previous is not None:
                if plan != previous.plan:
                    upgraded = (tiers.get(state.plan_at) or 0) > (tiers.get(previous.plan_at) or 0)
                    details = {**period, "from": previous.plan, "to": plan, "reason": PROVIDER_CHANGE_REASON}
                    rows.append(["plan", "upgraded" if upgraded else "downgraded", previous.plan, plan, details, at])
                status_change = _synced_change(previous.status, status)
                if status_change is not None:
                    rows.append(["status", status_change, None, plan, {**period, "status": status}, at])
            else:
                change = "trial_started" if status == Status.TRIALING.value else "created"
                rows.append(["first", change, None, plan, {**period, "status": status}, at])
            previous = state
        # An id names the slot (first, plan, status) at the provider's time,
        # not the change: the rows to replace are found again whatever they say.
        return [
            [uuid5(ROW_NS, f"timeline:{subscription_id}:{at.isoformat()}:{slot}"), from_plan, to_plan, change, d, at]
            for slot, change, from_plan, to_plan, d, at in rows
        ]

    def _rows(self, subscription_id: UUID, snapshots: dict[Any, tuple[Any, ...]]) -> list[list[Any]]:
        return [
            [
                rid,
                subscription_id,
                self._plan_id(from_plan) if from_plan else None,
                self._plan_id(to_plan),
                change,
                _jsonable(details),
                at,
            ]
            for rid, from_plan, to_plan, change, details, at in self._changes(subscription_id, snapshots)
        ]

    def _plan_id(self, name: str) -> Any:
        # A plan's id never changes: a rewrite of a long timeline would ask
        # for the same few plans row after row.
        if name not in self.plan_ids:
            self.plan_ids[name] = _plan_id(self.tx, name)
        return self.plan_ids[name]

    def _tier(self, plan: str) -> int:
        found = self.tx.fetchall("SELECT tier_level FROM plans WHERE name = %s", [plan])
        return int(found[0][0]) if found and found[0][0] is not None else 0


__all__ = ["SubscriptionView", "entitled"]
