"""The subscription read model: plans, plan_features, subscriptions,
subscription_history and audit_logs (admin actions), and, when the host opts
in, users.tier and users.storage_quota."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar
from uuid import UUID, uuid5

from ._domain import CreditAccount
from ._entitlements import entitled
from ._plans import FREE_PLAN, Plan, PlanTerms, plan_id_for
from ._subscriptions import PauseMode, Status, Subscription
from ._views import View
from ._viewstore import ViewTx

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
                CreditAccount.Granted,
                CreditAccount.Debited,
            )
        ),
    )
    tables: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {
        "subscriptions": ("id", ("updated_at",)),
        "subscription_history": ("changed_at, id", ()),
        "audit_logs": ("created_at, id", ()),
    }

    def __init__(self, *, sync_user_tier: bool = False) -> None:
        self.sync_user_tier = sync_user_tier

    def process(self, events: Sequence[tuple[int, Any]], tx: ViewTx) -> None:
        plans: dict[str, PlanTerms] = {}
        subs: dict[UUID, dict[str, Any]] = {}
        history: list[list[Any]] = []
        audit: list[list[Any]] = []
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
                            plan_id_for(terms.name),
                            {"terms": _jsonable(event.terms), "actor": event.actor},
                        )
                    )
            elif isinstance(event, Subscription.Event | Subscription.Started):
                row = subs.get(event.originator_id) or self._row(tx, event.originator_id)
                change = self._apply(row, event)
                subs[event.originator_id] = row
                if change is not None:
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
            tx.execute(
                f"DELETE FROM plan_features WHERE plan_id = %s AND feature_key NOT IN ({tx.in_list(len(keep))})",
                [plan_id, *keep],
            )
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
            row.update(
                id=event.originator_id,
                user_id=event.user_id,
                _plan=event.plan,
                lemon_squeezy_subscription_id=event.lemon_squeezy_subscription_id,
                lemon_squeezy_customer_id=event.lemon_squeezy_customer_id,
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
            if event.status == Status.EXPIRED:
                row["ended_at"] = event.timestamp
            elif event.status == Status.PAUSED:
                row["_pause_mode"] = event.pause_mode or PauseMode.VOID.value
            return _synced_change(before, event.status)
        return None

    @staticmethod
    def _history(tx: ViewTx, event: Any, row: dict[str, Any], change: str) -> list[Any]:
        from_plan = row.pop("_from_plan", None) if change in ("upgraded", "downgraded") else None
        details = {
            **_details(event),
            "period_start": row["current_period_start"],
            "period_end": row["current_period_end"],
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


__all__ = ["SubscriptionView", "entitled"]
