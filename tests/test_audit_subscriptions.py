"""The audit of subscriptions: a full lifecycle passes on every backend; a
transition the lifecycle forbids, credits promised but not posted, a slot
held twice and an edited subscriptions row are each found and named."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from ledger import AuditReport, Ledger, ManualClock, audit
from tests.conftest import START
from tests.test_audit_tamper import raw_events

DAY = timedelta(days=1)


def lifecycle(ledger: Ledger, clock: ManualClock) -> tuple[UUID, UUID, UUID]:
    """Trial, activation, upgrade, past due and recovery, pause and unpause,
    cancel at period end and resume, renewal, cancel and expiry; then a new
    subscription for the same user."""
    ledger.install_default_catalog()
    user = uuid4()
    first = ledger.start_subscription(user, "starter", key=f"{user}:start", trial_days=7).subscription_id
    assert first is not None
    clock.advance(7 * DAY)
    ledger.tick()  # activates the trial
    ledger.change_plan(first, "pro", key=f"{user}:upgrade")
    ledger.mark_past_due(first, key=f"{user}:late")
    ledger.recover_subscription(first, key=f"{user}:paid")
    ledger.pause_subscription(first, key=f"{user}:pause")
    ledger.unpause_subscription(first, key=f"{user}:unpause")
    ledger.cancel_subscription(first, key=f"{user}:cancel")
    ledger.resume_subscription(first, key=f"{user}:resume")
    clock.advance(31 * DAY)
    ledger.tick()  # renews
    ledger.cancel_subscription(first, key=f"{user}:cancel-2")
    clock.advance(31 * DAY)
    ledger.tick()  # expires
    clock.advance(DAY)
    second = ledger.start_subscription(user, "studio", key=f"{user}:again").subscription_id
    assert second is not None
    ledger.views.catch_up()
    return user, first, second


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'subscriptions.sqlite3'}"
    url: str = request.getfixturevalue("pg_url")
    return url


def named(report: AuditReport, check: str, *fragments: str) -> bool:
    return any(
        f.check == check and all(x in f"{f.subject} {f.message} {f.position}" for x in fragments)
        for f in report.findings
    )


def test_a_whole_lifecycle_passes(ledger: Ledger, clock: ManualClock) -> None:
    lifecycle(ledger, clock)
    report = audit(ledger)
    assert report.ok, report.render()
    assert report.summary["subscriptions"] == 2 and report.summary["subscriptions_compared"] == 2
    assert "subscription" in report.checks


def test_an_edited_subscriptions_row_is_named(ledger: Ledger, clock: ManualClock) -> None:
    _, first, _ = lifecycle(ledger, clock)
    with ledger.views.store.transaction() as tx:
        tx.execute("UPDATE subscriptions SET status = 'active' WHERE id = %s", [str(first)])
    report = audit(ledger)
    assert named(report, "view", str(first), "'active'", "'expired'"), report.render()


def test_a_forbidden_transition_is_named(durable_url: str) -> None:
    clock = ManualClock(START)
    with Ledger(durable_url, clock=clock) as ledger:
        _, first, _ = lifecycle(ledger, clock)
    with raw_events(durable_url) as raw:
        paused = raw.position_of("Subscription.StatusChanged", 2)  # past_due, recovered, paused
        raw.alter(paused, b'"change":"paused","status":"paused"', b'"change":"recovered","status":"active"')
    with Ledger(durable_url) as ledger:
        report = audit(ledger)
    assert named(report, "subscription", str(first), "recovered from active", str(paused)), report.render()


def test_credits_promised_but_not_posted_are_named(durable_url: str) -> None:
    clock = ManualClock(START)
    with Ledger(durable_url, clock=clock) as ledger:
        _, first, _ = lifecycle(ledger, clock)
    with raw_events(durable_url) as raw:
        renewed = raw.position_of("Subscription.Renewed")
        raw.alter(renewed, b'"granted_credits":15000', b'"granted_credits":99000')
    with Ledger(durable_url) as ledger:
        report = audit(ledger)
    assert named(report, "subscription", str(first), "promised 99000", "granted 15000", str(renewed))


def test_a_slot_held_twice_is_named(durable_url: str) -> None:
    clock = ManualClock(START)
    with Ledger(durable_url, clock=clock) as ledger:
        user, first, _ = lifecycle(ledger, clock)
    with raw_events(durable_url) as raw:
        raw.delete(raw.position_of("SubscriberSlot.Freed"))
        taken = raw.position_of("SubscriberSlot.Taken", 1)
    with Ledger(durable_url) as ledger:
        report = audit(ledger)
    assert named(report, "subscription", str(user), "two live subscriptions", str(taken), str(first))
    assert named(report, "subscription", str(first), "expired but still holds")
    assert named(report, "subscription", "slot", "version 4 follows 2", str(taken))
