"""Stored events live forever: topics are explicit and stable, and what an
earlier version wrote still loads."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.domain import CanMutateAggregate
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import register_topic

from ledger import (
    BillingCycle,
    Ledger,
    PauseMode,
    PauseSubscription,
    SubscriptionStatus,
    SyncSubscription,
)
from ledger.domain.credits import CommandRecord, CreditAccount
from ledger.domain.holds import HoldRecord
from ledger.domain.subscriptions import Subscription, slot_id_for
from ledger.storage.sealing import sealed

FIXTURES = Path(__file__).parent / "fixtures"
USER = UUID("00000000-0000-4000-8000-000000000001")


def _event_classes() -> list[type]:
    found = []
    for aggregate in (CreditAccount, HoldRecord, CommandRecord):
        found.append(aggregate)
        for value in vars(aggregate).values():
            if isinstance(value, type) and value.__name__ not in ("Created",):
                found.append(value)
    return found


def test_every_stored_class_has_its_own_explicit_topic() -> None:
    topics = []
    for cls in _event_classes():
        # eventsourcing wraps a named created-event class in a generated subclass
        # of the same name, which inherits the topic written in our code.
        own = [k for k in cls.__mro__ if k.__qualname__ == cls.__qualname__ and "TOPIC" in vars(k)]
        assert own, f"{cls.__qualname__} has no TOPIC of its own"
        topics.append(vars(own[0])["TOPIC"])
    assert all(t.startswith("pingvas.ledger:") for t in topics)
    assert len(topics) == len(set(topics))


def _load_fixture(ledger: Ledger, name: str, *, with_snapshots: bool) -> dict[str, Any]:
    data = json.loads((FIXTURES / name).read_text())
    events = [r for r in data["rows"] if r["table"] == "events"]
    to_stored = [
        StoredEvent(
            originator_id=UUID(r["originator_id"]),
            originator_version=r["originator_version"],
            topic=r["topic"],
            state=r["state"].encode(),
        )
        for r in events
    ]
    ledger.app.recorder.insert_events(to_stored)
    if with_snapshots:
        assert ledger.app.snapshots is not None
        snaps = [r for r in data["rows"] if r["table"] == "snapshots"]
        assert snaps, "the fixture should carry a snapshot"
        ledger.app.snapshots.recorder.insert_events(
            [
                StoredEvent(UUID(r["originator_id"]), r["originator_version"], r["topic"], r["state"].encode())
                for r in snaps
            ]
        )
    return dict(data["expected"])


@pytest.mark.parametrize("with_snapshots", [True, False])
def test_events_written_by_version_0_1_still_load(ledger: Ledger, with_snapshots: bool) -> None:
    expected = _load_fixture(ledger, "stored_events_v0_1.json", with_snapshots=with_snapshots)
    balance = ledger.balance(USER)
    assert (balance.balance_credits, balance.held_credits) == (expected["balance_credits"], expected["held_credits"])
    for rid, status in expected["reservation_statuses"].items():
        assert ledger.reservation(UUID(rid)).status == status
    assert len(ledger.history(USER, limit=10_000)) == expected["events"]
    # The old keys still guard against double application.
    assert ledger.grant(USER, 500, "purchase", key="fx:g2").replayed


@dataclass(frozen=True)
class NoteV2(CanMutateAggregate[UUID]):
    TOPIC = "pingvas.ledger:tests.Note"
    class_version = 2
    text: str
    author: str  # new in version 2

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        state["author"] = "unknown"


# Aggregates register their events' topics when their classes are made; a
# free-standing event class is registered by hand.
register_topic(NoteV2.TOPIC, NoteV2)


def test_an_event_that_changed_shape_is_upcast_on_load(ledger: Ledger) -> None:
    """The path for evolving an event: bump ``class_version`` and add
    ``upcast_v1_v2``; version-1 records are upgraded as they are read."""

    ledger.app.recorder.insert_events(
        [
            StoredEvent(
                UUID(int=7),
                1,
                NoteV2.TOPIC,
                b'{"timestamp": {"_type_": "datetime_iso", "_data_": '
                b'"2026-01-01T00:00:00+00:00"}, "text": "written by version 1"}',
            )
        ]
    )
    (event,) = ledger.app.events.get(UUID(int=7))
    assert (event.text, event.author) == ("written by version 1", "unknown")  # type: ignore[attr-defined]


# ------------------------------------------------ fields added after version 0.1


def _strip(state: bytes, *names: str) -> bytes:
    """A stored state as a version without these fields wrote it."""
    value = json.loads(state)
    inner = value.get("state") if isinstance(value.get("state"), dict) else value  # a snapshot's aggregate state
    for name in names:
        assert name in inner, f"{name} is not in the state: the test would prove nothing"
        del inner[name]
    return json.dumps(value).encode()


@pytest.mark.parametrize("with_snapshot", [False, True])
def test_subscriptions_written_before_pause_modes_load_as_void_pauses(ledger: Ledger, with_snapshot: bool) -> None:
    """StatusChanged and Synced gained ``pause_mode`` (default None: void),
    Subscription its ``pause_mode`` attribute: what version 0.1 stored
    (without them) still loads, as a void pause."""
    ledger.install_default_catalog()
    user = USER
    sid = ledger.start_subscription(user, "pro", key="start").subscription_id
    assert sid is not None
    ledger.pause_subscription(sid, key="pause", mode="free")
    assert ledger.entitlements(user).plan == "pro"
    stored = list(ledger.app.recorder.select_events(sid))
    old = [
        StoredEvent(e.originator_id, e.originator_version, e.topic, _strip(e.state, "pause_mode"))
        if e.topic == Subscription.StatusChanged.TOPIC
        else e
        for e in stored
    ]
    with Ledger("memory://", clock=ledger.clock) as other:
        other.install_default_catalog()
        other.app.recorder.insert_events([e for e in ledger.app.recorder.select_events(slot_id_for(user))])
        if with_snapshot:
            ledger.app.take_snapshot(sid)
            (snapshot,) = ledger.app.snapshots.recorder.select_events(sid)  # type: ignore[union-attr]
            assert other.app.snapshots is not None
            # As a version without pause modes would have written and sealed
            # it, over the event at its version as that version stored it.
            old_shape = other.app.mapper.to_domain_event(
                StoredEvent(sid, snapshot.originator_version, snapshot.topic, _strip(snapshot.state, "pause_mode"))
            )
            (event_at,) = [e for e in old if e.originator_version == snapshot.originator_version]
            resealed = sealed(other.app.mapper.transcoder, old_shape, event_at)
            other.app.snapshots.recorder.insert_events([other.app.mapper.to_stored_event(resealed)])
        other.app.recorder.insert_events(old)
        s = other.app.repository.get(sid)
        assert isinstance(s, Subscription)
        assert (s.status, s.pause_mode) == ("paused", "void")
        assert sid not in other.app.unsealed  # the snapshot was used, not replaced by a replay
        assert other.entitlements(user).plan == "free"  # a 0.1 pause was void: no plan while paused


def test_synced_events_written_before_pause_modes_load(ledger: Ledger) -> None:
    ledger.install_default_catalog()
    sid = UUID(int=42)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    ledger.execute(
        SyncSubscription(
            key="sync",
            subscription_id=sid,
            user_id=USER,
            plan="pro",
            billing_cycle=BillingCycle.MONTHLY,
            status=SubscriptionStatus.PAUSED,
            period_start=at,
            period_end=at + timedelta(days=31),
            source_updated_at=at,
            pause_mode=PauseMode.FREE,
        )
    )
    stored = [
        StoredEvent(e.originator_id, e.originator_version, e.topic, _strip(e.state, "pause_mode"))
        if e.topic == Subscription.Synced.TOPIC
        else e
        for e in ledger.app.recorder.select_events(sid)
    ]
    with Ledger("memory://", clock=ledger.clock) as other:
        other.app.recorder.insert_events(stored)
        (synced,) = [e for e in other.app.events.get(sid) if isinstance(e, Subscription.Synced)]
        assert synced.pause_mode is None
        s = other.app.repository.get(sid)
        assert isinstance(s, Subscription) and s.pause_mode == "void"


def test_commands_recorded_before_a_field_was_added_keep_their_fingerprint() -> None:
    """PauseSubscription.mode and SyncSubscription.pause_mode came after keys
    were recorded with these commands: at their default they leave the
    fingerprint as version 0.1 computed it (the digests below), so a retried
    key replays instead of raising IdempotencyConflict."""
    sid, user = UUID("00000000-0000-4000-8000-0000000000aa"), UUID("00000000-0000-4000-8000-000000000001")
    pause = PauseSubscription(key="k", subscription_id=sid)
    assert pause.fingerprint == "99fa41197a1bcf3737266ae54b84761d3f6b247ad8e8f4a82fe6d4bc402e9f2c"
    assert replace(pause, mode=PauseMode.FREE).fingerprint != pause.fingerprint
    t, t2 = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)
    sync = SyncSubscription(
        key="k",
        subscription_id=sid,
        user_id=user,
        plan="pro",
        billing_cycle=BillingCycle.MONTHLY,
        status=SubscriptionStatus.PAUSED,
        period_start=t,
        period_end=t2,
        source_updated_at=t,
        external_id="880001",
        customer_id="770001",
    )
    assert sync.fingerprint == "eee6515176cc96ae9295fdbefb8192eb919c690e3d43e917bb612c69d9b9f412"
    assert replace(sync, pause_mode=PauseMode.FREE).fingerprint != sync.fingerprint


def test_synced_and_superseded_events_of_version_1_load_as_they_were(ledger: Ledger) -> None:
    """Synced and Superseded became version 2 (a kept period, restatements,
    the provider's times): a version 1 event loads through its upcast, keeps
    the ledger's processing time as ``ended_at`` (as it was recorded), and
    takes its place among the subscription's provider snapshots."""
    ledger.install_default_catalog()
    sid = UUID(int=43)
    at = datetime(2026, 1, 1, tzinfo=UTC)

    def sync(key: str, status: SubscriptionStatus, seconds: int) -> SyncSubscription:
        return SyncSubscription(
            key=key,
            subscription_id=sid,
            user_id=USER,
            plan="pro",
            billing_cycle=BillingCycle.MONTHLY,
            status=status,
            period_start=at,
            period_end=at + timedelta(days=31),
            source_updated_at=at + timedelta(seconds=seconds),
        )

    ledger.execute(sync("active", SubscriptionStatus.ACTIVE, 1))
    ledger.execute(sync("expired", SubscriptionStatus.EXPIRED, 9))
    ledger.execute(sync("late", SubscriptionStatus.ACTIVE, 5))  # Superseded
    times = ("provider_times", "cancelled_at", "cancel_reason", "paused_at", "ended_at")
    added = {
        Subscription.Synced.TOPIC: ("class_version", "period_kept", "restated", *times),
        Subscription.Superseded.TOPIC: ("class_version", "period_kept", "pause_mode"),
    }
    stored = [
        StoredEvent(e.originator_id, e.originator_version, e.topic, _strip(e.state, *added[e.topic]))
        if e.topic in added
        else e
        for e in ledger.app.recorder.select_events(sid)
    ]
    assert {e.topic for e in stored} >= set(added)
    with Ledger("memory://", clock=ledger.clock) as other:
        other.app.recorder.insert_events(stored)
        events = list(other.app.events.get(sid))
        synced = [e for e in events if isinstance(e, Subscription.Synced)]
        assert [e.provider_times for e in synced] == [False, False]
        s = other.app.repository.get(sid)
        assert isinstance(s, Subscription)
        assert (s.status, s.ended_at) == ("expired", synced[-1].timestamp)  # the ledger's time, as recorded then
        assert [x.at.second for x in s.provider_snapshots] == [1, 5, 9]


# ------------------------------------------------------------- the price book


def test_holds_written_before_the_price_book_load_without_a_quote(ledger: Ledger) -> None:
    """HoldRecord.Reserved became version 2 (``price``): a version 1 hold
    (every hold 0.1 wrote) loads through its upcast, with no quote."""
    expected = _load_fixture(ledger, "stored_events_v0_1.json", with_snapshots=False)
    for rid in expected["reservation_statuses"]:
        hold = ledger.reservation(UUID(rid))
        assert (hold.quote, hold.safety_margin) == (None, None)
    assert ledger.price_book() is None


def test_priced_holds_and_price_book_revisions_still_load(ledger: Ledger) -> None:
    expected = _load_fixture(ledger, "stored_events_priced_holds.json", with_snapshots=False)
    assert len(ledger.price_book_history()) == expected["revisions"]
    for rid, want in expected["holds"].items():
        hold = ledger.reservation(UUID(rid))
        assert hold.quote is not None
        assert (hold.amount_credits, hold.status, str(hold.safety_margin)) == (
            want["amount_credits"],
            want["status"],
            want["safety_margin"],
        )
        assert hold.quote.model_dump(mode="json") == want["quote"]
    # What was priced then still prices, from the revision it recorded.
    current = ledger.price_book()
    assert current is not None and current.revision == 2
    assert ledger.quote(USER, "upscale", {"scale": 4}).credits == 16
