"""The subscription read models on every backend: plans and plan_features,
subscriptions, subscription_history, audit_logs, users.tier and
users.storage_quota, and a rebuild that equals the live tables."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest

from ledger import DEFAULT_CATALOG, Feature, Ledger, ManualClock
from ledger.domain.credits import account_id_for
from ledger.domain.plans import plan_id_for
from ledger.storage.viewstore import normalise
from ledger.views.subscriptions import row_id
from tests.conftest import START, pg_base_url

DAY = timedelta(days=1)
TERMS = {t.name: t for t in DEFAULT_CATALOG}
GiB = 1024**3


def rows(ledger: Ledger, table: str, order_by: str = "1") -> list[dict[str, Any]]:
    store = ledger.views.store
    columns = store.columns(table)
    return [dict(zip(columns, r, strict=True)) for r in store.rows(table, order_by)]


def ts(moment: datetime) -> Any:
    """A datetime as the views hold it (naive UTC, normalised)."""
    return normalise(moment)


def as_json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def history(ledger: Ledger, sid: UUID) -> list[dict[str, Any]]:
    """The subscription's history rows in the order of the events that wrote
    them (rows of one instant, e.g. an immediate cancel's, share changed_at)."""
    version_of = {str(row_id("history", sid, v)): v for v in range(1, 200)}
    found = [r for r in rows(ledger, "subscription_history", "changed_at, id") if r["subscription_id"] == str(sid)]
    for r in found:
        r["details"] = as_json(r["details"])
    found.sort(key=lambda r: version_of[r["id"]])
    changed = [r["changed_at"] for r in found]
    assert changed == sorted(changed), "history rows are written in time order"
    return found


def plan_names(ledger: Ledger) -> dict[str, str]:
    return {r["id"]: r["name"] for r in rows(ledger, "plans")}


def assert_row_matches(ledger: Ledger, sid: UUID) -> dict[str, Any]:
    """The subscriptions row says what ``ledger.subscription(sid)`` says."""
    s = ledger.subscription(sid)
    (row,) = [r for r in rows(ledger, "subscriptions") if r["id"] == str(sid)]
    assert plan_names(ledger)[row["plan_id"]] == s.plan
    expected = {
        "user_id": s.user_id,
        "billing_cycle": s.billing_cycle,
        "status": s.status,
        "current_period_start": s.current_period_start,
        "current_period_end": s.current_period_end,
        "trial_ends_at": s.trial_ends_at,
        "cancelled_at": s.cancelled_at,
        "cancel_reason": s.cancel_reason,
        "cancel_at_period_end": s.cancel_at_period_end,
        "lemon_squeezy_subscription_id": s.lemon_squeezy_subscription_id,
        "lemon_squeezy_customer_id": s.lemon_squeezy_customer_id,
    }
    assert {k: row[k] for k in expected} == {k: normalise(v) for k, v in expected.items()}
    return row


# ------------------------------------------------------------------ the story


def lifecycle(ledger: Ledger, clock: ManualClock) -> tuple[UUID, UUID, UUID]:
    """One subscription through every change type, one cancelled at once."""
    user = uuid4()
    r = ledger.start_subscription(user, "starter", key=f"{user}:start", trial_days=10, actor="user:self")
    sid = r.subscription_id
    assert sid is not None
    clock.advance(DAY)
    ledger.change_plan(sid, "pro", key=f"{user}:up", actor="admin:kim", reason="needs flux")
    clock.advance(DAY)
    ledger.change_plan(sid, "starter", key=f"{user}:down", reason="budget")
    clock.set(START + 10 * DAY)
    assert ledger.tick()["subscriptions"] == 1  # activated
    for change in ("past_due", "recover", "pause", "unpause"):
        clock.advance(DAY)
        {
            "past_due": ledger.mark_past_due,
            "recover": ledger.recover_subscription,
            "pause": ledger.pause_subscription,
            "unpause": ledger.unpause_subscription,
        }[change](sid, key=f"{user}:{change}")
    clock.set(datetime(2026, 2, 11, tzinfo=UTC))
    assert ledger.tick()["subscriptions"] == 1  # renewed
    clock.advance(DAY)
    ledger.cancel_subscription(sid, key=f"{user}:cancel-1", reason="too expensive", actor="user:self")
    clock.advance(DAY)
    ledger.resume_subscription(sid, key=f"{user}:resume")
    clock.advance(DAY)
    ledger.cancel_subscription(sid, key=f"{user}:cancel-2", reason="moving on")
    clock.set(datetime(2026, 3, 11, tzinfo=UTC))
    assert ledger.tick()["subscriptions"] == 1  # expired
    other = uuid4()
    r2 = ledger.start_subscription(other, "studio", key=f"{other}:start", lemon_squeezy_subscription_id="ls-9")
    assert r2.subscription_id is not None
    ledger.cancel_subscription(r2.subscription_id, key=f"{other}:cancel", at_period_end=False, reason="fraud")
    return user, sid, r2.subscription_id


@pytest.fixture
def billing(ledger: Ledger) -> Ledger:
    ledger.install_default_catalog()
    return ledger


def test_history_rows_are_the_transitions(billing: Ledger, clock: ManualClock) -> None:
    _, sid, other = lifecycle(billing, clock)
    billing.views.catch_up()
    found = history(billing, sid)
    assert [r["change_type"] for r in found] == [
        "trial_started",
        "upgraded",
        "downgraded",
        "activated",
        "past_due",
        "recovered",
        "paused",
        "unpaused",
        "renewed",
        "cancelled",
        "resumed",
        "cancelled",
        "expired",
    ]
    by_type = {r["change_type"]: r for r in found}  # the last of each type
    starter, pro = str(plan_id_for("starter")), str(plan_id_for("pro"))
    up, down = by_type["upgraded"], by_type["downgraded"]
    assert (up["from_plan_id"], up["to_plan_id"], down["from_plan_id"], down["to_plan_id"]) == (
        starter,
        pro,
        pro,
        starter,
    )
    assert up["details"] == {
        "from": "starter",
        "to": "pro",
        "change": "upgraded",
        "reason": "needs flux",
        "granted_credits": 10000,
        "to_revision": 1,
        "period_start": START.isoformat(),
        "period_end": (START + 10 * DAY).isoformat(),
    }
    assert (down["details"]["reason"], down["details"]["granted_credits"]) == ("budget", 0)
    assert found[0]["details"] == {
        "granted_credits": 5000,
        "plan_revision": 1,
        "period_start": START.isoformat(),
        "period_end": (START + 10 * DAY).isoformat(),
    }
    assert (found[0]["from_plan_id"], found[0]["to_plan_id"]) == (None, starter)
    renewed = by_type["renewed"]["details"]
    assert (renewed["period_start"], renewed["period_end"], renewed["granted_credits"]) == (
        "2026-02-11T00:00:00+00:00",
        "2026-03-11T00:00:00+00:00",
        5000,
    )
    cancels = [r for r in found if r["change_type"] == "cancelled"]
    assert [(c["details"]["reason"], c["details"]["at_period_end"]) for c in cancels] == [
        ("too expensive", True),
        ("moving on", True),
    ]
    assert by_type["expired"]["details"]["reason"] == "period ended"
    assert by_type["paused"]["details"] == {
        "change": "paused",
        "period_start": (START + 10 * DAY).isoformat(),
        "period_end": "2026-02-11T00:00:00+00:00",
    }
    assert [r["changed_at"] for r in found][:2] == [ts(START), ts(START + DAY)]
    quick = history(billing, other)
    assert [r["change_type"] for r in quick] == ["created", "cancelled", "expired"]
    assert quick[1]["details"]["at_period_end"] is False and quick[2]["details"]["reason"] == "cancelled immediately"
    assert quick[1]["changed_at"] == quick[2]["changed_at"]


def test_subscription_rows_equal_the_subscriptions(billing: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    sid = billing.start_subscription(
        user, "pro", key="start", trial_days=5, lemon_squeezy_subscription_id="ls-1", lemon_squeezy_customer_id="c-1"
    ).subscription_id
    assert sid is not None
    billing.views.catch_up()
    row = assert_row_matches(billing, sid)
    assert (row["created_at"], row["paused_at"], row["ended_at"]) == (ts(START), None, None)
    clock.advance(5 * DAY)
    billing.tick()
    clock.advance(DAY)
    billing.pause_subscription(sid, key="pause")
    billing.views.catch_up()
    assert assert_row_matches(billing, sid)["paused_at"] == ts(START + 6 * DAY)
    billing.unpause_subscription(sid, key="unpause")
    billing.change_plan(sid, "studio", key="up")
    billing.cancel_subscription(sid, key="cancel", reason="done")
    billing.views.catch_up()
    assert assert_row_matches(billing, sid)["paused_at"] is None
    clock.advance(40 * DAY)
    billing.tick()
    billing.views.catch_up()
    assert assert_row_matches(billing, sid)["ended_at"] == ts(clock.now())


def test_audit_logs_for_admin_actions(billing: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    sid = billing.start_subscription(user, "starter", key="start").subscription_id
    assert sid is not None
    billing.adjust(user, 50, "goodwill", "admin:kim", key="adj-1")
    clock.advance(DAY)
    billing.adjust(user, -5, "correction", "admin:lee", key="adj-2")
    billing.change_plan(sid, "pro", key="up-quiet")  # no actor: not an admin action
    clock.advance(DAY)
    billing.change_plan(sid, "studio", key="up", actor="admin:kim", reason="sales deal")
    billing.cancel_subscription(sid, key="cancel", actor="admin:lee", reason="refund requested")
    billing.define_plan(replace(TERMS["starter"], credits=5500), actor="admin:ops")
    billing.grant(user, 7, "bonus", key="bonus")  # not an admin action
    billing.views.catch_up()
    logs = rows(billing, "audit_logs", "created_at, id")
    for r in logs:
        r["new_value"] = as_json(r["new_value"])
    assert sorted((r["action"], r["entity_type"]) for r in logs) == [
        ("credits.adjusted", "credit_account"),
        ("credits.adjusted", "credit_account"),
        ("plan.defined", "plan"),
        ("subscription.cancelled", "subscription"),
        ("subscription.upgraded", "subscription"),
    ]
    by_action: dict[str, list[dict[str, Any]]] = {}
    for r in logs:
        by_action.setdefault(r["action"], []).append(r)
    first, second = by_action["credits.adjusted"]
    assert (first["user_id"], first["entity_id"], first["created_at"]) == (
        str(user),
        str(account_id_for(user)),
        ts(START),
    )
    assert first["new_value"] == {"delta": 50, "reason": "goodwill", "actor": "admin:kim", "key": "adj-1"}
    assert second["new_value"] == {"delta": -5, "reason": "correction", "actor": "admin:lee", "key": "adj-2"}
    (upgrade,) = by_action["subscription.upgraded"]
    assert (upgrade["user_id"], upgrade["entity_id"]) == (str(user), str(sid))
    assert upgrade["new_value"] == {
        "actor": "admin:kim",
        "reason": "sales deal",
        "change": "upgraded",
        "granted_credits": 15000,
        "to_revision": 1,
    }
    (cancel,) = by_action["subscription.cancelled"]
    assert cancel["new_value"] == {"actor": "admin:lee", "reason": "refund requested", "at_period_end": True}
    (plan,) = by_action["plan.defined"]
    assert (plan["user_id"], plan["entity_id"]) == (None, str(plan_id_for("starter")))
    assert (plan["new_value"]["actor"], plan["new_value"]["terms"]["credits"]) == ("admin:ops", 5500)


def test_plans_and_features_follow_the_catalog(billing: Ledger) -> None:
    billing.views.catch_up()
    plans = {r["name"]: r for r in rows(billing, "plans")}
    for name, terms in TERMS.items():
        row = plans[name]
        assert (row["id"], row["credits"], row["storage_bytes"], row["queue_count"], row["tier_level"]) == (
            str(plan_id_for(name)),
            terms.credits,
            terms.storage_bytes,
            terms.queue_count,
            terms.tier_level,
        )
        assert Decimal(str(row["monthly_price"])) == terms.monthly_price
    indie = replace(
        TERMS["starter"],
        name="indie",
        display_name="Indie",
        credits=8000,
        tier_level=5,
        lemon_squeezy_variant_id_monthly="v-m",
        lemon_squeezy_variant_id_yearly="v-y",
        features={"sd_models": Feature(True), "flux_model": Feature(False, {"calls": 10})},
    )
    billing.define_plan(indie)
    billing.views.catch_up()
    assert features(billing, "indie") == {"sd_models": 1, "flux_model": 0}
    revised = replace(
        indie, credits=9000, monthly_price=Decimal("29.00"), features={**indie.features, "flux_model": Feature(True)}
    )
    billing.define_plan(revised, actor="admin:ops")
    billing.views.catch_up()
    row = {r["name"]: r for r in rows(billing, "plans")}["indie"]
    assert (row["credits"], Decimal(str(row["monthly_price"])), row["lemon_squeezy_variant_id_yearly"]) == (
        9000,
        Decimal("29.00"),
        "v-y",
    )
    assert features(billing, "indie") == {"sd_models": 1, "flux_model": 1}
    assert [(v.revision, v.credits, v.features) for v in billing.plan_history("indie")] == [
        (1, 8000, {"sd_models": True, "flux_model": False}),
        (2, 9000, {"sd_models": True, "flux_model": True}),
    ]
    assert billing.plan("indie").revision == 2


def features(ledger: Ledger, plan: str) -> dict[str, Any]:
    plan_id = str(plan_id_for(plan))
    return {r["feature_key"]: r["enabled"] for r in rows(ledger, "plan_features") if r["plan_id"] == plan_id}


def test_a_feature_dropped_by_a_revision_leaves_plan_features(billing: Ledger) -> None:
    studio = TERMS["studio"]
    billing.define_plan(replace(studio, features={k: f for k, f in studio.features.items() if k != "lora_training"}))
    billing.views.catch_up()
    assert "lora_training" not in features(billing, "studio")  # entitlements no longer list it


def test_users_tier_and_storage_follow_when_the_host_opts_in(ledger_url: str, clock: ManualClock) -> None:
    with Ledger(ledger_url, clock=clock, sync_user_tier=True) as ledger:
        ledger.install_default_catalog()
        user, bystander = uuid4(), uuid4()
        with ledger.views.store.transaction() as tx:
            tx.execute(
                "CREATE TABLE IF NOT EXISTS users (id UUID PRIMARY KEY, tier VARCHAR(20) NOT NULL DEFAULT 'free', "
                "storage_quota BIGINT NOT NULL DEFAULT 0, credits INT NOT NULL DEFAULT 0)"
            )
            tx.executemany("INSERT INTO users (id) VALUES (%s)", [[user], [bystander]])

        def tier() -> tuple[str, int]:
            ledger.views.catch_up()
            with ledger.views.store.transaction() as tx:
                (found,) = tx.fetchall("SELECT tier, storage_quota FROM users WHERE id = %s", [user])
                assert tx.fetchall("SELECT tier, storage_quota FROM users WHERE id = %s", [bystander]) == [("free", 0)]
            return found[0], int(found[1])

        assert tier() == ("free", 0)
        sid = ledger.start_subscription(user, "pro", key="start").subscription_id
        assert sid is not None
        assert tier() == ("pro", 100 * GiB)
        ledger.change_plan(sid, "studio", key="up")
        assert tier() == ("studio", 200 * GiB)
        ledger.pause_subscription(sid, key="pause")
        assert tier() == ("free", 0)
        ledger.unpause_subscription(sid, key="unpause")
        ledger.pause_subscription(sid, key="pause-free", mode="free")  # the service continues, unpaid
        assert tier() == ("studio", 200 * GiB)
        ledger.unpause_subscription(sid, key="unpause-free")
        ledger.mark_past_due(sid, key="past-due")
        assert tier() == ("studio", 200 * GiB)
        ledger.recover_subscription(sid, key="recover")
        ledger.cancel_subscription(sid, key="cancel")
        assert tier() == ("studio", 200 * GiB)  # paid up until the period ends
        clock.set(datetime(2026, 2, 1, tzinfo=UTC))
        ledger.tick()
        assert tier() == ("free", 0)
        assert ledger.entitlements(user).plan == "free"


def test_rebuild_equals_live(billing: Ledger, clock: ManualClock) -> None:
    user, _, _ = lifecycle(billing, clock)
    billing.adjust(user, 25, "goodwill", "admin:kim", key="adj")
    billing.define_plan(replace(TERMS["pro"], credits=16000), actor="admin:ops")
    views = billing.views
    views.catch_up()
    aside = views.build_aside(until=views.position())
    try:
        found = views.verify(aside)
        assert {"subscriptions", "subscription_history", "audit_logs"} <= set(found)
        assert all(not rows for rows in found.values()), found
        assert views.checksums(aside) == views.checksums()
        assert views.checksums()["subscription_history"][0] == 16
    finally:
        billing.views.drop_aside(aside)


def test_rebuild_equals_views_projected_a_command_at_a_time(ledger_url: str, clock: ManualClock) -> None:
    # Each command's events in a page of their own, as in production: a row
    # read back from the table (naive or text times) must give the same
    # history details as the events of one long page in a rebuild.
    with Ledger(ledger_url, clock=clock, sync_views=True) as ledger:
        ledger.install_default_catalog()
        lifecycle(ledger, clock)
        views = ledger.views
        aside = views.build_aside(until=views.position())
        try:
            assert {t: d for t, d in views.verify(aside).items() if d} == {}
        finally:
            views.drop_aside(aside)


@pytest.mark.postgres
def test_history_on_a_host_plans_table_with_its_own_ids(pg_url: str, clock: ManualClock) -> None:
    schema = pg_url.rsplit("schema=", 1)[1]
    with psycopg.connect(pg_base_url(), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        conn.execute(
            f'CREATE TABLE "{schema}".plans (id UUID PRIMARY KEY DEFAULT gen_random_uuid(), '
            "name VARCHAR(50) NOT NULL UNIQUE, display_name VARCHAR(100) NOT NULL, description TEXT, "
            "monthly_price DECIMAL(10, 2) NOT NULL, yearly_price DECIMAL(10, 2) NOT NULL, credits INT NOT NULL, "
            "storage_bytes BIGINT NOT NULL, queue_count INT NOT NULL DEFAULT 1, tier_level INT NOT NULL, "
            "lemon_squeezy_variant_id_monthly VARCHAR(50), lemon_squeezy_variant_id_yearly VARCHAR(50), "
            "is_active BOOLEAN NOT NULL DEFAULT TRUE, created_at TIMESTAMP NOT NULL DEFAULT NOW(), "
            "updated_at TIMESTAMP NOT NULL DEFAULT NOW())"
        )
        # The seed's own INSERT: ids from gen_random_uuid().
        conn.execute(
            f'INSERT INTO "{schema}".plans (name, display_name, monthly_price, yearly_price, credits, '
            "storage_bytes, queue_count, tier_level) VALUES ('starter', 'Starter', 25.00, 250.00, 5000, "
            "21474836480, 1, 1)"
        )
    with Ledger(pg_url, clock=clock) as ledger:
        ledger.install_default_catalog()
        ledger.start_subscription(uuid4(), "starter", key="start")
        ledger.views.catch_up()
        assert [r["change_type"] for r in rows(ledger, "subscription_history")] == ["created"]
