"""Stored events live forever: topics are explicit and stable, and what an
earlier version wrote still loads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.domain import CanMutateAggregate
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import register_topic

from ledger import Ledger
from ledger._domain import CommandRecord, CreditAccount, Reservation

FIXTURES = Path(__file__).parent / "fixtures"
USER = UUID("00000000-0000-4000-8000-000000000001")


def _event_classes() -> list[type]:
    found = []
    for aggregate in (CreditAccount, Reservation, CommandRecord):
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
