"""Applying a payment provider's subscription snapshots: newest wins, order of
arrival does not matter, and no credits move."""

from __future__ import annotations

from datetime import timedelta
from uuid import uuid4

import pytest

from ledger import Ledger, ManualClock, SubscriptionExists, SyncSubscription

DAY = timedelta(days=1)


def snapshot(
    ledger: Ledger,
    clock: ManualClock,
    sid: object,
    user: object,
    *,
    status: str,
    plan: str = "starter",
    updated_s: int,
    key: str,
) -> SyncSubscription:
    start = clock.now()
    return SyncSubscription(
        key=key,
        subscription_id=sid,
        user_id=user,
        plan=plan,
        billing_cycle="monthly",  # type: ignore[arg-type]
        status=status,
        period_start=start,
        period_end=start + 30 * DAY,  # type: ignore[arg-type]
        source_updated_at=start + timedelta(seconds=updated_s),
        external_id="ls-1",
        customer_id="c-1",
    )


@pytest.fixture
def catalog(ledger: Ledger) -> Ledger:
    ledger.install_default_catalog()
    return ledger


def test_an_update_before_its_create_is_applied_and_the_older_one_ignored(catalog: Ledger, clock: ManualClock) -> None:
    ledger, sid, user = catalog, uuid4(), uuid4()
    newer = snapshot(ledger, clock, sid, user, status="active", plan="pro", updated_s=20, key="k-update")
    older = snapshot(ledger, clock, sid, user, status="trialing", plan="starter", updated_s=10, key="k-create")
    ledger.execute(newer)
    ledger.execute(older)  # arrives late: changes nothing
    view = ledger.subscription(sid)
    assert (view.status, view.plan, view.lemon_squeezy_subscription_id) == ("active", "pro", "ls-1")
    assert ledger.entitlements(user).plan == "pro"
    with pytest.raises(Exception, match="no credit account"):
        ledger.balance(user)  # snapshots move no credits


def test_a_plan_change_and_an_expiry_from_the_provider(catalog: Ledger, clock: ManualClock) -> None:
    ledger, sid, user = catalog, uuid4(), uuid4()
    ledger.execute(snapshot(ledger, clock, sid, user, status="active", updated_s=1, key="a"))
    ledger.execute(snapshot(ledger, clock, sid, user, status="active", plan="studio", updated_s=2, key="b"))
    ledger.execute(snapshot(ledger, clock, sid, user, status="expired", plan="studio", updated_s=3, key="c"))
    assert ledger.subscription(sid).status == "expired"
    assert ledger.subscription_of(user) is None
    assert ledger.entitlements(user).plan == "free"
    ledger.views.catch_up()
    store = ledger.views.store
    changes = [
        r[store.columns("subscription_history").index("change_type")]
        for r in store.rows("subscription_history", "changed_at, id")
    ]
    assert sorted(changes) == ["created", "expired", "upgraded"]
    # The slot is free again: a new subscription may start.
    ledger.start_subscription(user, "starter", key="again")


def test_a_second_live_subscription_is_refused(catalog: Ledger, clock: ManualClock) -> None:
    ledger, user = catalog, uuid4()
    ledger.execute(snapshot(ledger, clock, uuid4(), user, status="active", updated_s=1, key="first"))
    with pytest.raises(SubscriptionExists):
        ledger.execute(snapshot(ledger, clock, uuid4(), user, status="active", updated_s=1, key="second"))
