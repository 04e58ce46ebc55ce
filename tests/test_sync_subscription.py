"""Applying a payment provider's subscription snapshots: newest wins, order of
arrival does not matter, and no credits move."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from uuid import UUID, uuid4

import pytest

from ledger import DEFAULT_CATALOG, Ledger, ManualClock, SubscriptionExists, SyncSubscription

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
    external_id: str = "ls-1",
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
        external_id=external_id,
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


def _history(ledger: Ledger, sid: UUID) -> list[tuple[str, ...]]:
    """The subscription's history rows (without ids, which derive from the
    subscription's id): change, time, plans, details."""
    ledger.views.catch_up()
    store = ledger.views.store
    columns = store.columns("subscription_history")
    return [
        tuple(str(r[columns.index(c)]) for c in ("change_type", "changed_at", "from_plan_id", "to_plan_id", "details"))
        for r in store.rows("subscription_history", "changed_at, id")
        if str(r[columns.index("subscription_id")]) == str(sid)
    ]


STORY = [  # (status, plan, provider's second): a plan change, a failed payment, a recovery, a pause
    ("trialing", "starter", 1),
    ("active", "starter", 2),
    ("active", "pro", 3),
    ("past_due", "pro", 4),
    ("active", "pro", 5),
    ("paused", "pro", 6),
]


def test_the_history_is_the_providers_whatever_order_the_snapshots_arrive_in(
    catalog: Ledger, clock: ManualClock
) -> None:
    ledger = catalog
    histories = []
    for n, arrival in enumerate([[0, 1, 2, 3, 4, 5], [5, 0, 3, 1, 4, 2], [2, 5, 4, 3, 1, 0], [3, 4, 5, 0, 1, 2]]):
        sid, user = uuid4(), uuid4()
        for i in arrival:
            status, plan, second = STORY[i]
            ledger.execute(
                snapshot(
                    ledger,
                    clock,
                    sid,
                    user,
                    status=status,
                    plan=plan,
                    updated_s=second,
                    key=f"{n}:{i}",
                    external_id=f"ls-{n}",
                )
            )
        assert ledger.subscription(sid).status == "paused"  # the newest wins
        histories.append(_history(ledger, sid))
        end = snapshot(
            ledger, clock, sid, user, status="expired", plan="pro", updated_s=7, key=f"{n}:end", external_id=f"ls-{n}"
        )
        ledger.execute(end)
        histories[-1] = _history(ledger, sid)
    changes = [row[0] for row in histories[0]]
    assert changes == ["trial_started", "activated", "upgraded", "past_due", "recovered", "paused", "expired"]
    assert all(h == histories[0] for h in histories[1:])


def test_tick_leaves_a_provider_driven_subscription_to_the_provider(catalog: Ledger, clock: ManualClock) -> None:
    ledger, sid, user = catalog, uuid4(), uuid4()
    ledger.execute(snapshot(ledger, clock, sid, user, status="cancelled", updated_s=1, key="cancelled"))
    clock.advance(31 * DAY)  # the period is over
    ledger.tick()
    assert ledger.subscription(sid).status == "cancelled"  # expired by the provider's snapshot, not by tick
    assert ledger.entitlements(user).plan == "free"  # a cancelled plan lapses at its period's end anyway


def test_a_status_only_point_takes_the_snapshot_before_it_and_counts_only_from_a_live_status(
    catalog: Ledger, clock: ManualClock
) -> None:
    ledger, sid, user = catalog, uuid4(), uuid4()
    for status, second in (("active", 1), ("paused", 3), ("active", 5)):
        ledger.execute(
            snapshot(ledger, clock, sid, user, status=status, plan="pro", updated_s=second, key=f"s{second}")
        )
    for second in (2, 4):  # failed payments reported late: while active (counts), while paused (does not)
        point = snapshot(
            ledger, clock, sid, user, status="past_due", plan="starter", updated_s=second, key=f"p{second}"
        )
        ledger.execute(replace(point, status_only=True))
    assert ledger.subscription(sid).status == "active"
    rows = _history(ledger, sid)
    assert [r[0] for r in rows] == ["created", "past_due", "paused", "unpaused"]
    # The status-only point kept the plan of the snapshot before it, not the one it was given.
    assert rows[1][3] == rows[0][3]


def test_a_status_only_point_older_than_the_first_snapshot_is_left_out(catalog: Ledger, clock: ManualClock) -> None:
    # In order it finds no subscription to make past due; arriving late it must change nothing either.
    ledger, sid, user = catalog, uuid4(), uuid4()
    ledger.execute(snapshot(ledger, clock, sid, user, status="active", plan="pro", updated_s=10, key="first"))
    early = snapshot(ledger, clock, sid, user, status="past_due", plan="pro", updated_s=5, key="early")
    ledger.execute(replace(early, status_only=True))
    assert [r[0] for r in _history(ledger, sid)] == ["created"]


def test_a_tier_revised_later_neither_renames_nor_duplicates_provider_rows(ledger: Ledger, clock: ManualClock) -> None:
    # The change's name follows the tiers as the log stood at each snapshot, so
    # a rewrite after a revision finds and replaces the rows it wrote before,
    # and a rebuild writes the same rows.
    ledger.install_default_catalog()
    starter = next(t for t in DEFAULT_CATALOG if t.name == "starter")
    sid, user = uuid4(), uuid4()
    ledger.execute(snapshot(ledger, clock, sid, user, status="active", plan="starter", updated_s=1, key="a"))
    ledger.execute(snapshot(ledger, clock, sid, user, status="active", plan="pro", updated_s=3, key="b"))
    assert [r[0] for r in _history(ledger, sid)] == ["created", "upgraded"]
    ledger.define_plan(replace(starter, tier_level=3), actor="ops")
    ledger.define_plan(replace(starter, name="basic", display_name="Basic", tier_level=1), actor="ops")
    ledger.execute(snapshot(ledger, clock, sid, user, status="active", plan="basic", updated_s=2, key="late"))
    # starter (tier 1 then) -> basic (1): downgraded by the rule "not higher"; basic -> pro (2): upgraded.
    assert [r[0] for r in _history(ledger, sid)] == ["created", "downgraded", "upgraded"]
    views = ledger.views
    aside = views.build_aside(until=views.position())
    try:
        assert all(not rows for rows in views.verify(aside).values())
    finally:
        ledger.views.drop_aside(aside)


def test_the_ledgers_own_plan_change_of_a_provider_driven_subscription_is_in_its_history(
    catalog: Ledger, clock: ManualClock
) -> None:
    ledger, sid, user = catalog, uuid4(), uuid4()
    ledger.execute(snapshot(ledger, clock, sid, user, status="active", plan="starter", updated_s=1, key="a"))
    clock.advance(timedelta(seconds=2))  # the ledger hears of the provider's snapshot after its time
    ledger.change_plan(sid, "pro", key="admin-up", actor="admin:kim", reason="goodwill")
    assert [r[0] for r in _history(ledger, sid)] == ["created", "upgraded"]
