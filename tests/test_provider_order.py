"""A payment provider's snapshots describe one subscription whatever order
they arrive in: the subscription, ``subscription_snapshots`` and the history
are the same for every order of arrival, ties of one second included, and
the times of a cancellation, a pause and an end are the provider's."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest

from ledger import (
    GrantCredits,
    InvalidArgument,
    Ledger,
    ManualClock,
    StartSubscription,
    SyncSubscription,
)
from ledger.domain.subscriptions import PROVIDER_CANCEL_REASON, PROVIDER_DUNNING_CANCEL_REASON, Subscription

T0 = datetime(2030, 1, 5, 10, 0, tzinfo=UTC)
FEB, MAR, APR = (datetime(2030, m, 5, 10, 0, tzinfo=UTC) for m in (2, 3, 4))
SEC = timedelta(seconds=1)


@pytest.fixture
def catalog(ledger: Ledger) -> Ledger:
    ledger.install_default_catalog()
    return ledger


def snap(
    key: str,
    *,
    status: str,
    at: datetime,
    start: datetime,
    end: datetime,
    plan: str = "starter",
    **extra: Any,
) -> dict[str, Any]:
    return {"key": key, "status": status, "at": at, "start": start, "end": end, "plan": plan, **extra}


def command(sid: UUID, user: UUID, s: dict[str, Any], prefix: str) -> SyncSubscription:
    extra = {k: v for k, v in s.items() if k not in ("key", "status", "at", "start", "end", "plan")}
    return SyncSubscription(
        key=f"{prefix}:{s['key']}",
        subscription_id=sid,
        user_id=user,
        plan=s["plan"],
        billing_cycle="monthly",  # type: ignore[arg-type]
        status=s["status"],
        period_start=s["start"],
        period_end=s["end"],
        source_updated_at=s["at"],
        external_id=f"ext-{sid.hex[:8]}",
        customer_id="c-1",
        **extra,
    )


def row(ledger: Ledger, table: str, sid: UUID, skip: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """The rows of a subscription in a view table, as text, without its id
    columns (each replay has its own subscription) and the ledger's own
    times; in the provider's order."""
    store = ledger.views.store
    columns = store.columns(table)
    key = "id" if table == "subscriptions" else "subscription_id"
    drop = {"id", "subscription_id", "user_id", "lemon_squeezy_subscription_id", "created_at", "updated_at", *skip}
    rows = []
    for r in store.rows(table, "1"):
        if str(r[columns.index(key)]) != str(sid):
            continue
        rows.append({c: _text(v) for c, v in zip(columns, r, strict=True) if c not in drop})
    return sorted(rows, key=lambda r: sorted(r.items()))


def _text(value: Any) -> str:
    # The stores give times as naive UTC, aware UTC or text, and details as JSON or text.
    if isinstance(value, datetime):
        return value.replace(tzinfo=None).isoformat(sep=" ")
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, str) and value.startswith("{"):
        return json.dumps(json.loads(value), sort_keys=True)
    return str(value)


def replay_every_order(
    ledger: Ledger, story: list[dict[str, Any]], *, orders: list[tuple[int, ...]] | None = None
) -> list[dict[str, Any]]:
    """Replays the story in every order of arrival, each on its own
    subscription; returns what each replay left."""
    results = []
    for order in orders or list(itertools.permutations(range(len(story)))):
        sid, user = uuid4(), uuid4()
        for i in order:
            ledger.execute(command(sid, user, story[i], f"{sid}"))
        ledger.views.catch_up()
        s = ledger.subscription(sid)
        aggregate = ledger.read_aggregate(sid)
        assert isinstance(aggregate, Subscription)
        results.append(
            {
                "view": (s.status, s.plan, s.current_period_start, s.current_period_end, s.trial_ends_at),
                "times": (s.cancelled_at, s.cancel_reason, aggregate.paused_at, aggregate.ended_at),
                "subscriptions": row(ledger, "subscriptions", sid),
                "snapshots": row(ledger, "subscription_snapshots", sid),
                "history": row(ledger, "subscription_history", sid),
                "entitled": ledger.entitlements(user).plan,
            }
        )
    return results


def assert_all_the_same(results: list[dict[str, Any]]) -> dict[str, Any]:
    for result in results[1:]:
        for name, value in result.items():
            assert value == results[0][name], name
    return results[0]


def test_a_late_past_due_takes_the_period_of_the_snapshot_before_it_not_the_newest(catalog: Ledger) -> None:
    # Created, renewed (the period moves on), then in dunning: the past_due
    # snapshot's own period end is the next charge attempt.
    story = [
        snap("created", status="active", at=T0, start=T0, end=FEB),
        snap("renewed", status="active", at=FEB + SEC, start=FEB, end=MAR),
        snap("dunning", status="past_due", at=MAR + SEC, start=MAR, end=MAR + timedelta(days=3), period_kept=True),
        snap("recovered", status="active", at=MAR + 4 * SEC, start=MAR, end=APR),
    ]
    final = assert_all_the_same(replay_every_order(catalog, story))
    assert final["view"][:4] == ("active", "starter", MAR, APR)
    past_due = json.loads(next(r["details"] for r in final["history"] if r["change_type"] == "past_due"))
    assert (past_due["period_start"], past_due["period_end"]) == (FEB.isoformat(), MAR.isoformat())
    # The kept period is not the snapshot's own: subscription_snapshots says so with NULLs.
    kept = [r for r in final["snapshots"] if r["status"] == "past_due"]
    assert len(kept) == 1 and kept[0]["current_period_end"] == "None" and kept[0]["plan"] == "starter"


def test_a_subscription_in_dunning_shows_the_period_of_the_snapshot_before_it(catalog: Ledger) -> None:
    story = [
        snap("created", status="active", at=T0, start=T0, end=FEB),
        snap("renewed", status="active", at=FEB + SEC, start=FEB, end=MAR),
        snap("dunning", status="past_due", at=MAR + SEC, start=MAR, end=MAR + timedelta(days=3), period_kept=True),
    ]
    final = assert_all_the_same(replay_every_order(catalog, story))
    assert final["view"][:4] == ("past_due", "starter", FEB, MAR)
    assert final["entitled"] == "starter"


def test_two_snapshots_of_one_second_end_the_same_whichever_arrives_first(catalog: Ledger) -> None:
    # subscription_created and subscription_updated with the same updated_at:
    # one still has renews_at at its creation (a zero-length period).
    story = [
        snap("created", status="active", at=T0, start=T0, end=T0),
        snap("updated", status="active", at=T0, start=T0, end=FEB),
        snap("later", status="active", at=T0 + 5 * SEC, start=T0, end=FEB, plan="pro"),
    ]
    final = assert_all_the_same(replay_every_order(catalog, story))
    assert final["view"][:4] == ("active", "pro", T0, FEB)
    starter = [r for r in final["snapshots"] if r["plan"] == "starter"]
    assert len(starter) == 1 and starter[0]["current_period_end"] == "2030-02-05 10:00:00"  # the second's winner
    first = next(r for r in final["history"] if r["change_type"] == "created")
    assert json.loads(first["details"])["period_end"] == FEB.isoformat()  # not a zero-length period


def test_the_tie_rule_prefers_the_later_period_end_then_the_later_status(catalog: Ledger) -> None:
    end_first = [
        snap("a", status="cancelled", at=T0, start=T0, end=FEB, cancel_at_period_end=True),
        snap("b", status="active", at=T0, start=FEB, end=MAR),
    ]
    assert assert_all_the_same(replay_every_order(catalog, end_first))["view"][:4] == ("active", "starter", FEB, MAR)
    status_next = [
        snap("a", status="active", at=T0, start=T0, end=FEB),
        snap("b", status="cancelled", at=T0, start=T0, end=FEB, cancel_at_period_end=True),
    ]
    assert assert_all_the_same(replay_every_order(catalog, status_next))["view"][0] == "cancelled"


def test_a_status_only_point_loses_its_second_to_a_full_snapshot(catalog: Ledger) -> None:
    story = [
        snap("created", status="active", at=T0, start=T0, end=FEB),
        snap("failed", status="past_due", at=FEB, start=T0, end=FEB, status_only=True),
        snap("renewed", status="active", at=FEB, start=FEB, end=MAR),
    ]
    # A bare status of a subscription never seen is refused (UnknownSubscription): not first.
    orders = [o for o in itertools.permutations(range(3)) if o[0] != 1]
    final = assert_all_the_same(replay_every_order(catalog, story, orders=orders))
    assert final["view"][:4] == ("active", "starter", FEB, MAR)
    assert [r["change_type"] for r in final["history"]].count("past_due") == 0


def test_cancel_pause_and_end_times_are_the_providers_in_every_order(catalog: Ledger, clock: ManualClock) -> None:
    clock.set(datetime(2031, 1, 1, tzinfo=UTC))  # the ledger hears of all this long after
    paused_at, cancelled_at = T0 + timedelta(days=3), T0 + timedelta(days=10)
    story = [
        snap("created", status="active", at=T0, start=T0, end=FEB),
        snap("paused", status="paused", at=paused_at, start=T0, end=FEB, pause_mode="free"),
        snap("paused-again", status="paused", at=paused_at + timedelta(days=1), start=T0, end=FEB, pause_mode="free"),
        snap("unpaused", status="active", at=T0 + timedelta(days=8), start=T0, end=FEB),
        snap("cancelled", status="cancelled", at=cancelled_at, start=T0, end=FEB, cancel_at_period_end=True),
        snap("updated", status="cancelled", at=cancelled_at + SEC, start=T0, end=FEB, cancel_at_period_end=True),
        snap("expired", status="expired", at=FEB + timedelta(minutes=5), start=T0, end=FEB),
    ]
    orders = [tuple(range(7)), tuple(reversed(range(7))), (5, 2, 6, 0, 4, 1, 3), (1, 6, 3, 5, 0, 2, 4)]
    final = assert_all_the_same(replay_every_order(catalog, story, orders=orders))
    # ended_at is when the provider says it ended (the period's end), not when the ledger heard.
    assert final["times"] == (cancelled_at, PROVIDER_CANCEL_REASON, None, FEB)
    subscription = final["subscriptions"][0]
    assert (subscription["cancelled_at"], subscription["cancel_reason"], subscription["ended_at"]) == (
        "2030-01-15 10:00:00",
        PROVIDER_CANCEL_REASON,
        "2030-02-05 10:00:00",
    )

    paused = assert_all_the_same(replay_every_order(catalog, story[:3], orders=[(0, 1, 2), (2, 1, 0), (1, 2, 0)]))
    assert paused["times"][2] == paused_at  # the first snapshot of the pause, whichever arrived first
    assert paused["entitled"] == "starter"  # a free pause keeps the plan


def test_a_cancellation_after_failed_payments_says_so(catalog: Ledger) -> None:
    story = [
        snap("created", status="active", at=T0, start=T0, end=FEB),
        snap("dunning", status="past_due", at=FEB, start=FEB, end=FEB + timedelta(days=3), period_kept=True),
        snap(
            "cancelled", status="cancelled", at=FEB + timedelta(days=14), start=T0, end=FEB, cancel_at_period_end=True
        ),
    ]
    final = assert_all_the_same(replay_every_order(catalog, story))
    assert final["times"][:2] == (FEB + timedelta(days=14), PROVIDER_DUNNING_CANCEL_REASON)


def test_expired_is_final_whatever_arrives_after_it(catalog: Ledger) -> None:
    story = [
        snap("created", status="active", at=T0, start=T0, end=FEB),
        snap("expired", status="expired", at=T0 + timedelta(days=2), start=T0, end=T0 + timedelta(days=2)),
        snap("stray", status="cancelled", at=T0 + timedelta(days=3), start=T0, end=FEB, cancel_at_period_end=True),
    ]
    final = assert_all_the_same(replay_every_order(catalog, story))
    assert final["view"][0] == "expired" and final["entitled"] == "free"
    assert final["times"][3] == T0 + timedelta(days=2)


def test_a_subscription_replaces_another_in_either_order(catalog: Ledger) -> None:
    """A product switch: the new subscription names the old one, which the
    provider cancelled with its period still running. The new one starts at
    once (not held behind the old one), and the old one ends then."""
    switched = T0 + timedelta(days=10)
    for order in ("old first", "new first"):
        old_id, new_id, user = uuid4(), uuid4(), uuid4()
        old = [
            snap("old-created", status="active", at=T0, start=T0, end=FEB),
            snap("old-cancelled", status="cancelled", at=switched - SEC, start=T0, end=FEB, cancel_at_period_end=True),
        ]
        new = snap("new", status="active", at=switched, start=switched, end=switched + timedelta(days=31), plan="pro")
        new["replaces"], new["replaces_at"] = old_id, switched
        commands = [command(new_id, user, new, order)]
        olds = [command(old_id, user, s, order) for s in old]
        if order == "old first":
            commands = [*olds, *commands]
        else:  # the old one's snapshots know of the switch by then (the adapter passes it)
            commands = [*commands, *(replace(c, replaced_at=switched) for c in olds)]
        for c in commands:
            catalog.execute(c)
        assert catalog.entitlements(user).plan == "pro"
        assert catalog.subscription_of(user).subscription_id == new_id  # type: ignore[union-attr]
        replaced = catalog.subscription(old_id)
        aggregate = catalog.read_aggregate(old_id)
        assert replaced.status == "expired" and aggregate.ended_at == switched
        catalog.views.catch_up()
        history = row(catalog, "subscription_history", old_id)
        assert sorted(r["change_type"] for r in history) == ["cancelled", "created", "expired"]
        assert next(r for r in history if r["change_type"] == "expired")["changed_at"] == "2030-01-15 10:00:00"
        assert row(catalog, "subscriptions", old_id)[0]["ended_at"] == "2030-01-15 10:00:00"


def test_the_views_rebuilt_equal_the_live_ones_after_late_and_tied_snapshots(catalog: Ledger) -> None:
    story = [
        snap("created", status="active", at=T0, start=T0, end=T0),
        snap("updated", status="active", at=T0, start=T0, end=FEB),
        snap("renewed", status="active", at=FEB + SEC, start=FEB, end=MAR),
        snap("dunning", status="past_due", at=MAR + SEC, start=MAR, end=MAR + timedelta(days=3), period_kept=True),
    ]
    replay_every_order(catalog, story, orders=[(3, 2, 1, 0), (1, 3, 0, 2)])
    views = catalog.views
    aside = views.build_aside(until=views.position())
    try:
        assert all(not rows for rows in views.verify(aside).values())
    finally:
        catalog.views.drop_aside(aside)


NIL = UUID(int=0)


def test_the_nil_uuid_is_no_user(catalog: Ledger) -> None:
    with pytest.raises(InvalidArgument, match="nil UUID"):
        GrantCredits(key="g", user_id=NIL, amount_credits=5, kind="bonus")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="nil UUID"):
        catalog.grant(NIL, 5, "bonus", key="g2")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="nil UUID"):
        StartSubscription(key="s", user_id=NIL, plan="starter")
    with pytest.raises(InvalidArgument, match="nil UUID"):
        command(uuid4(), NIL, snap("x", status="active", at=T0, start=T0, end=FEB), "nil")
    with pytest.raises(InvalidArgument, match="nil UUID"):
        catalog.spend(NIL, 1, key="s1")


def test_a_replacement_in_the_same_second_as_the_old_ones_cancellation_still_ends_it(catalog: Ledger) -> None:
    switched = T0 + timedelta(days=10)
    for first in ("old", "new"):
        old_id, new_id, user = uuid4(), uuid4(), uuid4()
        cancel = snap("cancel", status="cancelled", at=switched, start=T0, end=FEB, cancel_at_period_end=True)
        new = snap("new", status="active", at=switched, start=switched, end=FEB, plan="pro")
        new["replaces"], new["replaces_at"] = old_id, switched
        olds = [command(old_id, user, snap("a", status="active", at=T0, start=T0, end=FEB), first)]
        olds.append(command(old_id, user, cancel, first))
        if first == "old":
            commands = [*olds, command(new_id, user, new, first)]
        else:
            commands = [command(new_id, user, new, first), *(replace(c, replaced_at=switched) for c in olds)]
        for c in commands:
            catalog.execute(c)
        assert catalog.subscription(old_id).status == "expired"
        assert catalog.subscription_of(user).subscription_id == new_id  # type: ignore[union-attr]
