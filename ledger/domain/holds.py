"""A hold's lifecycle, in the domain: what a hold is, its statuses, its
record, and the rules of its close.

A hold is reserved on a ``CreditAccount`` (its ``Reserved`` event earmarks
credits), then closed exactly once: settled (``Settled`` charges it) or
released (``Released`` frees it, by a caller or on expiry). The account
decides; it keeps its open holds as :class:`Hold`. Each hold also has a
:class:`HoldRecord`, its identity and outcome, so that a hold can be found by
id after it closed: version 1 is the reservation, version 2 its one and only
close, so a second close clashes in the event store itself.

The commands that reserve, settle and release, and the sweep that releases
expired holds, are the application's: ``ledger.application.holds``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate
from eventsourcing.domain import Snapshot as BaseSnapshot

from ledger.domain.topics import TOPIC_PREFIX
from ledger.errors import ReservationClosed, UnknownReservation

# Namespace of hold ids derived from reserve keys: a retry derives the same id.
RESERVATION_NS = UUID("5b0f7f4e-8d0c-4c7e-9a53-0c2f1f6a7b03")


def reservation_id_for(key: str) -> UUID:
    return uuid5(RESERVATION_NS, key)


class HoldStatus(StrEnum):
    """Where a hold is in its life. The values are stored (in
    ``HoldRecord.Closed`` events) and shown (``Reservation.status``)."""

    RESERVED = "reserved"
    SETTLED = "settled"
    RELEASED = "released"


#: The release reason of a hold released because it expired.
EXPIRED_REASON = "expired"


@dataclass
class Hold:
    """An open hold on an account. ``allocations`` earmarks credits in blocks, in draw order."""

    reservation_id: str
    job_id: str
    amount: int
    reserved_at: datetime
    expires_at: datetime
    allocations: list[list[Any]]  # [[block_id, credits], ...]


# ------------------------------------------------------------------ the record


class HoldRecord(Aggregate, created_event_name="Reserved"):
    """A hold's identity and outcome. Version 1 is the reservation, version 2
    its one and only close; the account decides, this records. (Its stored
    topics keep the name it had first: ``Reservation``.)"""

    TOPIC = f"{TOPIC_PREFIX}:Reservation"

    class Event(Aggregate.Event):
        TOPIC = f"{TOPIC_PREFIX}:Reservation.Event"

    class Reserved(Aggregate.Created):
        TOPIC = f"{TOPIC_PREFIX}:Reservation.Reserved"
        #: Version 2: ``price``, what priced a hold sized by a quote
        #: (``ReserveForJob``): None for a hold of a given amount, as every
        #: version 1 hold was.
        class_version = 2
        user_id: UUID
        job_id: UUID
        amount: int
        expires_at: datetime
        price: dict[str, Any] | None = None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["price"] = None

    class Snapshot(BaseSnapshot):
        TOPIC = f"{TOPIC_PREFIX}:Reservation.Snapshot"

    def __init__(
        self, user_id: UUID, job_id: UUID, amount: int, expires_at: datetime, price: dict[str, Any] | None = None
    ) -> None:
        self.user_id = user_id
        self.job_id = job_id
        self.amount = amount
        self.expires_at = expires_at
        #: The quote that sized the hold and the price book revision it came
        #: from (``ledger.application.pricing.price_record``), or None.
        self.price = price
        self.status = HoldStatus.RESERVED
        self.settled_credits: int | None = None
        self.release_reason: str | None = None
        self.closed_at: datetime | None = None

    class Closed(Event):
        TOPIC = f"{TOPIC_PREFIX}:Reservation.Closed"
        status: str  # HoldStatus.SETTLED or HoldStatus.RELEASED
        settled_credits: int | None
        release_reason: str | None

        def apply(self, record: HoldRecord) -> None:
            record.status = HoldStatus(self.status)
            record.settled_credits = self.settled_credits
            record.release_reason = self.release_reason
            record.closed_at = self.timestamp


# ---------------------------------------------------------------- close rules


#: Version of a hold record's close: a record is reserved at version 1 and
#: closed once, so a second close of the same hold clashes in the event store.
CLOSE_VERSION = 2


def close_fields(status: HoldStatus, *, settled_credits: int | None, release_reason: str | None) -> dict[str, Any]:
    """The fields of a ``HoldRecord.Closed``: a settle records its credits,
    a release its reason, never both."""
    if status is HoldStatus.SETTLED:
        return {"status": str(status), "settled_credits": settled_credits, "release_reason": None}
    if status is HoldStatus.RELEASED:
        return {"status": str(status), "settled_credits": None, "release_reason": release_reason}
    raise ValueError(f"a hold closes as settled or released, not {status}")


def why_not_open(
    reservation_id: UUID,
    user_id: UUID,
    *,
    closed_now: HoldStatus | None,
    record: HoldRecord | None,
) -> ReservationClosed | UnknownReservation:
    """Why a hold is not open on the account of ``user_id``: closed in the
    attempt under way (``closed_now``), closed before (its ``record``, read
    fresh, says how), or never a hold of that account."""
    if closed_now is not None:
        return ReservationClosed(reservation_id, closed_now)
    if record is not None and record.user_id == user_id:
        return ReservationClosed(reservation_id, record.status)
    return UnknownReservation(reservation_id, user_id)


def holder_of(reservation_id: UUID, open_on: Mapping[UUID, Iterable[str]], record: HoldRecord | None) -> UUID:
    """The user whose account holds the hold: one of ``open_on`` (user ids and
    the holds open on their accounts, as far as they are loaded), else the
    user its record names."""
    rid = str(reservation_id)
    for user_id, holds in open_on.items():
        if rid in holds:
            return user_id
    if record is None:
        raise UnknownReservation(reservation_id)
    return record.user_id


def open_holds(events: Iterable[Any]) -> dict[UUID, tuple[UUID, datetime]]:
    """The holds still open after these ``HoldRecord`` events (in log order),
    by id: their user and expiry."""
    found: dict[UUID, tuple[UUID, datetime]] = {}
    for event in events:
        if isinstance(event, HoldRecord.Reserved):
            found[event.originator_id] = (event.user_id, event.expires_at)
        else:
            found.pop(event.originator_id, None)
    return found


def due(holds: Iterable[Hold], now: datetime) -> list[Hold]:
    """The holds past their expiry at ``now``, in the order their releases are recorded."""
    return sorted((h for h in holds if h.expires_at <= now), key=lambda h: (h.expires_at, h.reservation_id))
