"""Payment providers' ids of plans and subscriptions live in a provider
mapping (PlanTerms.provider_ids; Subscription.provider with its ids), not in
fields named after a provider: events stored with the Lemon Squeezy fields
still load, a second provider's ids need no core change, and the Lemon
Squeezy names remain as compatibility aliases onto the mapping."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import StoredEvent

from adapters.lemonsqueezy._adapter import load_catalog
from ledger import DEFAULT_CATALOG, BillingCycle, InvalidArgument, Ledger, SubscriptionStatus, SyncSubscription
from ledger.application.billing import DefinePlan
from ledger.domain.plans import Plan, PlanTerms, plan_id_for
from ledger.domain.subscriptions import Subscription
from tests.test_subscription_views import rows

USER = UUID(int=71)
STARTER = DEFAULT_CATALOG[0]


def _as_version_1(event: StoredEvent) -> StoredEvent:
    """A stored Plan or Subscription.Started event as the release before the
    provider mapping wrote it."""
    value = json.loads(event.state)
    assert value.pop("class_version") == 2
    if event.topic == Subscription.Started.TOPIC:
        provider = value.pop("provider")
        assert provider in (None, "lemon_squeezy")
        value["lemon_squeezy_subscription_id"] = value.pop("provider_subscription_id")
        value["lemon_squeezy_customer_id"] = value.pop("provider_customer_id")
    else:
        ids = value["terms"].pop("provider_ids").get("lemon_squeezy", {})
        value["terms"]["lemon_squeezy_variant_id_monthly"] = ids.get("variant_monthly")
        value["terms"]["lemon_squeezy_variant_id_yearly"] = ids.get("variant_yearly")
    return StoredEvent(event.originator_id, event.originator_version, event.topic, json.dumps(value).encode())


def _reloaded(ledger: Ledger, *ids: UUID) -> Ledger:
    old = {Plan.Defined.TOPIC, Plan.Revised.TOPIC, Subscription.Started.TOPIC}
    other = Ledger("memory://", clock=ledger.clock)
    for aggregate_id in ids:
        stored = [_as_version_1(e) if e.topic in old else e for e in ledger.app.recorder.select_events(aggregate_id)]
        other.app.recorder.insert_events(stored)
    return other


def test_plan_events_stored_with_lemon_squeezy_fields_load_into_the_mapping(ledger: Ledger) -> None:
    terms = replace(STARTER, lemon_squeezy_variant_id_monthly="101", lemon_squeezy_variant_id_yearly="102")
    ledger.define_plan(terms, key="define")
    ledger.define_plan(replace(terms, lemon_squeezy_variant_id_yearly="103"), key="revise")
    with _reloaded(ledger, plan_id_for("starter")) as other:
        view = other.plan("starter")
        assert view.revision == 2
        assert view.provider_ids == {"lemon_squeezy": {"variant_monthly": "101", "variant_yearly": "103"}}
        assert (view.lemon_squeezy_variant_id_monthly, view.lemon_squeezy_variant_id_yearly) == ("101", "103")
        history = other.plan_history("starter")
        assert [h.lemon_squeezy_variant_id_yearly for h in history] == ["102", "103"]
        # The upcast terms are the terms as defined now: the same terms are no revision...
        other.define_plan(replace(terms, lemon_squeezy_variant_id_yearly="103"), key="again")
        assert other.plan("starter").revision == 2
        # ... and the adapter's catalog reads the mapping of old and new events alike.
        assert load_catalog(other).variants == (
            ("101", "starter", "monthly"),
            ("102", "starter", "yearly"),
            ("103", "starter", "yearly"),
        )


def test_a_define_plan_key_recorded_before_the_mapping_still_replays() -> None:
    """DefinePlan's fingerprint digests the terms in the shape they had
    before provider_ids, so its recorded keys replay instead of conflicting."""
    terms = replace(STARTER, lemon_squeezy_variant_id_monthly="101")
    arguments = DefinePlan(key="k", terms=terms).arguments["terms"]
    assert "provider_ids" not in arguments
    assert (arguments["lemon_squeezy_variant_id_monthly"], arguments["lemon_squeezy_variant_id_yearly"]) == (
        "101",
        None,
    )
    # The fingerprints the release before the mapping recorded.
    assert DefinePlan(key="k", terms=terms).fingerprint == (
        "3e41a5b53b481c006761324ef18742b2a72835f80ab06d82d64e2890d8790261"
    )
    assert DefinePlan(key="k", terms=DEFAULT_CATALOG[1]).fingerprint == (
        "e7b504bb56a42e58e0432aa2aa2a13de3bf0e20ba6bb08469c757e35135fae38"
    )
    other = DefinePlan(key="k", terms=replace(terms, provider_ids={**terms.provider_ids, "paddle": {"price": "p"}}))
    assert other.arguments["terms"]["provider_ids"] == {"paddle": {"price": "p"}}
    assert other.fingerprint != DefinePlan(key="k", terms=terms).fingerprint


def test_subscriptions_started_with_lemon_squeezy_fields_load_into_the_provider_fields(ledger: Ledger) -> None:
    ledger.install_default_catalog()
    receipt = ledger.start_subscription(
        USER, "pro", key="start", lemon_squeezy_subscription_id="ls-1", lemon_squeezy_customer_id="c-1"
    )
    assert receipt.subscription_id is not None
    with _reloaded(ledger, receipt.subscription_id, *[plan_id_for(t.name) for t in DEFAULT_CATALOG]) as other:
        s = other.app.repository.get(receipt.subscription_id)
        assert isinstance(s, Subscription)
        assert (s.provider, s.provider_subscription_id, s.provider_customer_id) == ("lemon_squeezy", "ls-1", "c-1")
        view = other.subscription(receipt.subscription_id)
        assert (view.lemon_squeezy_subscription_id, view.lemon_squeezy_customer_id) == ("ls-1", "c-1")
        assert (view.provider, view.provider_subscription_id) == ("lemon_squeezy", "ls-1")


def test_a_second_providers_ids_are_stored_without_a_core_change(ledger: Ledger) -> None:
    paddle = replace(STARTER, name="indie", provider_ids={"paddle": {"price_monthly": "pri_01"}})
    ledger.install_default_catalog()
    ledger.define_plan(paddle)
    view = ledger.plan("indie")
    assert view.provider_ids == {"paddle": {"price_monthly": "pri_01"}}
    assert (view.lemon_squeezy_variant_id_monthly, view.lemon_squeezy_variant_id_yearly) == (None, None)
    started = ledger.start_subscription(
        USER, "indie", key="start", provider="paddle", provider_subscription_id="sub_01", provider_customer_id="ctm_01"
    )
    assert started.subscription_id is not None
    s = ledger.subscription(started.subscription_id)
    assert (s.provider, s.provider_subscription_id, s.provider_customer_id) == ("paddle", "sub_01", "ctm_01")
    assert (s.lemon_squeezy_subscription_id, s.lemon_squeezy_customer_id) == (None, None)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    synced = ledger.execute(
        SyncSubscription(
            key="sync",
            subscription_id=UUID(int=72),
            user_id=UUID(int=73),
            plan="indie",
            billing_cycle=BillingCycle.MONTHLY,
            status=SubscriptionStatus.ACTIVE,
            period_start=at,
            period_end=at + timedelta(days=31),
            source_updated_at=at,
            external_id="sub_02",
            customer_id="ctm_02",
            provider="paddle",
        )
    )
    assert synced.subscription_id is not None
    assert ledger.subscription(synced.subscription_id).provider == "paddle"
    # The seed's lemon_squeezy_* columns hold Lemon Squeezy's ids only.
    ledger.views.catch_up()
    plan_row = {r["name"]: r for r in rows(ledger, "plans")}["indie"]
    assert plan_row["lemon_squeezy_variant_id_monthly"] is None
    subscription_rows = {r["id"]: r for r in rows(ledger, "subscriptions")}
    for sid in (started.subscription_id, synced.subscription_id):
        assert subscription_rows[str(sid)]["lemon_squeezy_subscription_id"] is None


def test_the_lemon_squeezy_names_are_aliases_onto_the_mapping() -> None:
    terms = replace(STARTER, lemon_squeezy_variant_id_monthly="1")
    assert terms.provider_ids == {"lemon_squeezy": {"variant_monthly": "1"}}
    both = replace(terms, lemon_squeezy_variant_id_yearly="2")
    assert both.provider_ids == {"lemon_squeezy": {"variant_monthly": "1", "variant_yearly": "2"}}
    assert both == replace(STARTER, provider_ids={"lemon_squeezy": {"variant_monthly": "1", "variant_yearly": "2"}})
    assert (both.lemon_squeezy_variant_id_monthly, both.lemon_squeezy_variant_id_yearly) == ("1", "2")
    assert replace(both, lemon_squeezy_variant_id_monthly=None).provider_ids == {
        "lemon_squeezy": {"variant_yearly": "2"}
    }
    assert replace(terms, lemon_squeezy_variant_id_monthly=None) == STARTER
    assert PlanTerms.from_event_data(both.as_event_data()) == both
    old: dict[str, Any] = {**both.as_event_data(), "lemon_squeezy_variant_id_monthly": "1"}
    old["lemon_squeezy_variant_id_yearly"] = "2"
    del old["provider_ids"]
    assert PlanTerms.from_event_data(old) == both
    positional = PlanTerms("p", "P", STARTER.monthly_price, STARTER.yearly_price, 1, 1, 1, 1, None, "m", "y")
    assert positional.provider_ids == {"lemon_squeezy": {"variant_monthly": "m", "variant_yearly": "y"}}


def test_a_subscriptions_provider_is_given_one_way(ledger: Ledger) -> None:
    ledger.install_default_catalog()
    with pytest.raises(InvalidArgument) as raised:
        ledger.start_subscription(
            USER, "pro", key="k", lemon_squeezy_subscription_id="ls-1", provider="paddle", provider_subscription_id="s"
        )
    assert raised.value.param == "provider"
    with pytest.raises(InvalidArgument):
        ledger.define_plan(replace(STARTER, provider_ids={"paddle": {"price": 5}}))  # type: ignore[dict-item]
