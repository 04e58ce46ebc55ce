"""A hold's lifecycle has one home per layer: ``ledger.domain.holds`` (what
a hold is, its statuses, its record and the close rules, pure) and
``ledger.application.holds`` (the hold commands and the sweep). These check the
close rules without a store, and that names and stored topics stayed put."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

import pytest

import ledger
from ledger import Ledger, ManualClock, ReservationClosed, UnknownReservation
from ledger.application import holds as application_holds
from ledger.application import results
from ledger.domain.holds import (
    CLOSE_VERSION,
    Hold,
    HoldRecord,
    HoldStatus,
    close_fields,
    due,
    open_holds,
    why_not_open,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ALICE, BOB = UUID(int=1), UUID(int=2)
HOLD = UUID(int=99)


def _record(user_id: UUID) -> HoldRecord:
    return HoldRecord._create(
        HoldRecord.Reserved, id=HOLD, user_id=user_id, job_id=UUID(int=7), amount=10, expires_at=T0, timestamp=T0
    )


def test_statuses_keep_their_stored_values() -> None:
    assert [str(s) for s in HoldStatus] == ["reserved", "settled", "released"]
    assert _record(ALICE).status is HoldStatus.RESERVED


def test_the_record_keeps_its_stored_topics() -> None:
    assert HoldRecord.TOPIC == "pingvas.ledger:Reservation"
    assert HoldRecord.Reserved.TOPIC == "pingvas.ledger:Reservation.Reserved"
    assert HoldRecord.Closed.TOPIC == "pingvas.ledger:Reservation.Closed"
    assert HoldRecord.Snapshot.TOPIC == "pingvas.ledger:Reservation.Snapshot"


def test_a_close_records_credits_or_a_reason_never_both() -> None:
    assert close_fields(HoldStatus.SETTLED, settled_credits=5, release_reason="x") == {
        "status": "settled", "settled_credits": 5, "release_reason": None,
    }  # fmt: skip
    assert close_fields(HoldStatus.RELEASED, settled_credits=5, release_reason="x") == {
        "status": "released", "settled_credits": None, "release_reason": "x",
    }  # fmt: skip
    with pytest.raises(ValueError, match="settled or released"):
        close_fields(HoldStatus.RESERVED, settled_credits=None, release_reason=None)


def test_a_closed_record_reads_its_status_back_as_a_hold_status() -> None:
    record = _record(ALICE)
    record.trigger_event(HoldRecord.Closed, timestamp=T0, **close_fields(
        HoldStatus.RELEASED, settled_credits=None, release_reason="cancelled"))  # fmt: skip
    assert record.status is HoldStatus.RELEASED and record.version == CLOSE_VERSION


def test_why_a_hold_is_not_open() -> None:
    closed_now = why_not_open(HOLD, ALICE, closed_now=HoldStatus.SETTLED, record=None)
    assert isinstance(closed_now, ReservationClosed) and closed_now.status == "settled"
    settled = _record(ALICE)
    settled.trigger_event(HoldRecord.Closed, timestamp=T0, **close_fields(
        HoldStatus.SETTLED, settled_credits=3, release_reason=None))  # fmt: skip
    before = why_not_open(HOLD, ALICE, closed_now=None, record=settled)
    assert isinstance(before, ReservationClosed) and before.status == "settled"
    # Another user's hold, or none at all: unknown on this account.
    for record in (_record(BOB), None):
        unknown = why_not_open(HOLD, ALICE, closed_now=None, record=record)
        assert isinstance(unknown, UnknownReservation) and unknown.user_id == ALICE


def test_due_holds_are_released_soonest_first() -> None:
    def hold(rid: str, minutes: int) -> Hold:
        return Hold(rid, "job", 1, T0, T0 + timedelta(minutes=minutes), [["b", 1]])

    holds = [hold("b", 5), hold("a", 5), hold("c", 1), hold("later", 60)]
    assert [h.reservation_id for h in due(holds, T0 + timedelta(minutes=5))] == ["c", "a", "b"]


def test_open_holds_fold_the_record_events() -> None:
    clock = ManualClock(T0)
    with Ledger("memory://", clock=clock) as ledger_:
        ledger_.grant(ALICE, 100, "bonus", key="g")
        kept = ledger_.reserve(ALICE, UUID(int=1), 10, expires_in=timedelta(minutes=5), key="r1").reservation_id
        gone = ledger_.reserve(ALICE, UUID(int=2), 10, expires_in=timedelta(hours=1), key="r2").reservation_id
        ledger_.settle(gone, 10, key="s2")
        found = open_holds(ledger_.scan(list(application_holds.HOLD_TOPICS)))
        assert found == {kept: (ALICE, T0 + timedelta(minutes=5))}
        assert application_holds.due_holders(ledger_.scan, T0 + timedelta(minutes=5)) == [ALICE]
        assert application_holds.due_holders(ledger_.scan, T0 + timedelta(minutes=4)) == []


def test_one_name_per_thing() -> None:
    # The public hold view and the hold commands keep their public names;
    # the aggregate that records a hold has its own.
    assert ledger.Reservation is results.Reservation
    assert ledger.ReserveCredits is application_holds.ReserveCredits
    assert ledger.SettleReservation is application_holds.SettleReservation
    assert ledger.ReleaseReservation is application_holds.ReleaseReservation
    for name in ("Receipt", "Balance", "CreditBlock", "AccountEvent"):
        assert getattr(ledger, name) is getattr(results, name)
    assert not hasattr(ledger.application.commands, "Reservation")
    assert not hasattr(ledger.application.commands, "ReserveCredits")
