"""A hold's lifecycle, in the application: the commands that reserve,
settle and release a hold, how a unit of work finds a hold's account and
explains a refused close, the ``HoldRecord`` events a unit saves with the
account's, and the sweep that finds expired holds.

The domain's half (``Hold``, ``HoldStatus``, ``HoldRecord`` and the close
rules) is ``ledger.domain.holds``; the account's own hold events
(``CreditAccount.Reserved``, ``.Settled``, ``.Released``) stay on
``CreditAccount``, whose events they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar
from uuid import UUID

from ledger.application.commands import ADDED, Command, UnitOfWork, lifetime_end
from ledger.application.results import Receipt
from ledger.clock import require_utc
from ledger.domain.checks import (
    MAX_TEXT_LENGTH,
    check_amount,
    check_expires_in,
    check_key,
    check_text,
    check_user_id,
    check_uuid,
)
from ledger.domain.credits import CreditAccount, entry_id_for
from ledger.domain.holds import (
    CLOSE_VERSION,
    HoldRecord,
    HoldStatus,
    close_fields,
    open_holds,
    reservation_id_for,
    why_not_open,
)
from ledger.errors import InvalidArgument, ReservationClosed, UnknownReservation

# ------------------------------------------------------------------ a hold's lifetime


def checked_lifetime(expires_at: datetime | None, expires_in: timedelta | None) -> datetime | None:
    """Checks a reserve's lifetime, given as exactly one of ``expires_at`` (an
    aware time) and ``expires_in`` (a bounded duration); returns ``expires_at``
    in UTC (None when the lifetime is ``expires_in``)."""
    if (expires_at is None) == (expires_in is None):
        raise InvalidArgument("a hold needs expires_at or expires_in (exactly one of them)", param="expires_at")
    if expires_at is not None:
        return require_utc(expires_at, "expires_at")
    check_expires_in(expires_in)
    return None


def hold_expiry(expires_at: datetime | None, expires_in: timedelta | None, now: datetime) -> datetime:
    """When a hold reserved at ``now`` expires (its lifetime as ``checked_lifetime`` accepted it)."""
    if expires_in is not None:
        return lifetime_end(now, expires_in)
    assert expires_at is not None  # one of the two, checked when built
    return expires_at


# ------------------------------------------------------------------ commands


@dataclass(frozen=True)
class ReserveCredits(Command):
    name: ClassVar[str] = "reserve"
    user_id: UUID = field(kw_only=True)
    job_id: UUID = field(kw_only=True)
    amount_credits: int = field(kw_only=True)
    #: When the hold expires; or else ``expires_in``.
    expires_at: datetime | None = field(default=None, kw_only=True)
    #: The hold's lifetime from the moment it is recorded: a worker's retry
    #: is then the same command, where a recomputed ``expires_at`` is not.
    expires_in: timedelta | None = field(default=None, kw_only=True, metadata=ADDED)

    def __post_init__(self) -> None:
        self._normalise("key", check_key(self.key))
        self._normalise("user_id", check_user_id(self.user_id))
        self._normalise("job_id", check_uuid(self.job_id, "job_id"))
        check_amount(self.amount_credits)
        expires_at = checked_lifetime(self.expires_at, self.expires_in)
        if expires_at is not None:
            self._normalise("expires_at", expires_at)

    def expiry(self, now: datetime) -> datetime:
        """When the hold expires, for a reserve recorded at ``now``."""
        return hold_expiry(self.expires_at, self.expires_in, now)

    def apply(self, unit: UnitOfWork) -> Receipt:
        account = unit.account(self.user_id)
        reservation_id = reservation_id_for(self.key)
        account.reserve(
            reservation_id=reservation_id,
            job_id=self.job_id,
            amount=self.amount_credits,
            expires_at=self.expiry(unit.now),
            key=self.key,
            now=unit.now,
        )
        return unit.done(self, account, amount=0, reservation_id=reservation_id)


@dataclass(frozen=True)
class SettleReservation(Command):
    name: ClassVar[str] = "settle"
    hints: ClassVar[frozenset[str]] = frozenset({"user_id"})
    reservation_id: UUID = field(kw_only=True)
    actual_credits: int = field(kw_only=True)
    #: Optional: the account that holds the reservation, which saves a look-up.
    user_id: UUID | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        self._normalise("key", check_key(self.key))
        self._normalise("reservation_id", check_uuid(self.reservation_id, "reservation_id"))
        check_amount(self.actual_credits, "actual_credits")
        if self.user_id is not None:
            self._normalise("user_id", check_user_id(self.user_id))

    def apply(self, unit: UnitOfWork) -> Receipt:
        account = unit.account(unit.owner_of(self.reservation_id, self.user_id))
        if str(self.reservation_id) not in account.holds:
            raise unit.closed_status(account, self.reservation_id)
        entry_id = entry_id_for(self.key)
        account.settle(
            reservation_id=self.reservation_id,
            entry_id=entry_id,
            actual=self.actual_credits,
            key=self.key,
            now=unit.now,
        )
        return unit.done(
            self, account, amount=-self.actual_credits, entry_id=entry_id, reservation_id=self.reservation_id
        )


@dataclass(frozen=True)
class ReleaseReservation(Command):
    name: ClassVar[str] = "release"
    hints: ClassVar[frozenset[str]] = frozenset({"user_id"})
    reservation_id: UUID = field(kw_only=True)
    reason: str = field(kw_only=True)
    user_id: UUID | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        self._normalise("key", check_key(self.key))
        self._normalise("reservation_id", check_uuid(self.reservation_id, "reservation_id"))
        self._normalise("reason", check_text(self.reason, "reason", MAX_TEXT_LENGTH, required=True))
        if self.user_id is not None:
            self._normalise("user_id", check_user_id(self.user_id))

    def apply(self, unit: UnitOfWork) -> Receipt:
        account = unit.account(unit.owner_of(self.reservation_id, self.user_id))
        if str(self.reservation_id) not in account.holds:
            raise unit.closed_status(account, self.reservation_id)
        account.release(reservation_id=self.reservation_id, reason=self.reason, key=self.key, now=unit.now)
        return unit.done(self, account, amount=0, reservation_id=self.reservation_id)


# ------------------------------------------------- in the unit of work


def owner_of(
    reservation_id: UUID,
    hint: UUID | None,
    accounts: Iterable[CreditAccount],
    read_record: Callable[[UUID], HoldRecord | None],
) -> UUID:
    """The user whose account holds the hold: ``hint`` when given, else an
    account of the attempt that holds it open (reserved earlier in the batch)
    or reserved it in this attempt and closed it since (its record is not
    saved yet), else the user its ``HoldRecord`` names."""
    if hint is not None:
        return hint
    rid = str(reservation_id)
    accounts = list(accounts)
    for account in accounts:
        if rid in account.holds:
            return account.user_id
    for account in accounts:
        for event in account.pending_events:
            if isinstance(event, CreditAccount.Reserved) and event.reservation_id == reservation_id:
                return account.user_id
    record = read_record(reservation_id)
    if record is None:
        raise UnknownReservation(reservation_id)
    return record.user_id


def closed_in(account: CreditAccount, reservation_id: UUID) -> HoldStatus | None:
    """How the attempt under way closed the hold on ``account``, if it did."""
    for event in account.pending_events:
        if getattr(event, "reservation_id", None) != reservation_id:
            continue
        if isinstance(event, CreditAccount.Settled):
            return HoldStatus.SETTLED
        if isinstance(event, CreditAccount.Released):
            return HoldStatus.RELEASED
    return None


def closed_status(
    account: CreditAccount, reservation_id: UUID, read_fresh: Callable[[UUID], HoldRecord | None]
) -> ReservationClosed | UnknownReservation:
    """Why a hold is not open on ``account`` (``why_not_open``). The record is
    read fresh (``read_fresh``): a hold's close is saved as a bare event, which
    the command cache does not see."""
    closed_now = closed_in(account, reservation_id)
    record = None if closed_now is not None else read_fresh(reservation_id)
    return why_not_open(reservation_id, account.user_id, closed_now=closed_now, record=record)


def record_events(
    accounts: Iterable[CreditAccount],
    new_records: dict[UUID, HoldRecord],
    prices: Mapping[UUID, dict[str, Any]] | None = None,
) -> list[Any]:
    """What the accounts' pending hold events imply for their holds' records:
    a new ``HoldRecord`` per reserve (kept in ``new_records``, which a close in
    the same attempt then closes), with the price that sized it when one did
    (``prices``, by reservation id), and a bare ``HoldRecord.Closed`` at
    version 2 per close of a hold reserved before. Saved with the accounts, in
    one transaction."""
    closes: list[Any] = []
    for account in accounts:
        for event in account.pending_events:
            if isinstance(event, CreditAccount.Reserved):
                new_records[event.reservation_id] = HoldRecord._create(
                    HoldRecord.Reserved,
                    id=event.reservation_id,
                    user_id=account.user_id,
                    job_id=event.job_id,
                    amount=event.amount,
                    expires_at=event.expires_at,
                    price=None if prices is None else prices.get(event.reservation_id),
                    timestamp=event.timestamp,
                )
            elif isinstance(event, CreditAccount.Settled | CreditAccount.Released):
                close = _close(event, new_records)
                if close is not None:
                    closes.append(close)
    return [*new_records.values(), *closes]


def _close(event: CreditAccount.Settled | CreditAccount.Released, new_records: Mapping[UUID, HoldRecord]) -> Any:
    if isinstance(event, CreditAccount.Settled):
        fields = close_fields(HoldStatus.SETTLED, settled_credits=event.amount, release_reason=None)
    else:
        fields = close_fields(HoldStatus.RELEASED, settled_credits=None, release_reason=event.reason)
    new = new_records.get(event.reservation_id)
    if new is not None:
        new.trigger_event(HoldRecord.Closed, timestamp=event.timestamp, **fields)
        return None
    # The account says the hold was open, so its record is at version 1: its
    # close is version 2, and a second close clashes in the event store.
    return HoldRecord.Closed(
        originator_id=event.reservation_id, originator_version=CLOSE_VERSION, timestamp=event.timestamp, **fields
    )


# ------------------------------------------------------------------- sweep


#: The topics the sweep reads to find open holds.
HOLD_TOPICS = (HoldRecord.Reserved.TOPIC, HoldRecord.Closed.TOPIC)


def due_holders(scan: Callable[[list[str]], Iterable[Any]], now: datetime) -> list[UUID]:
    """The users with a hold past its expiry at ``now``, sorted, from the
    hold records' events in the log (``Ledger.scan``); memory grows with the
    open holds only. ``Ledger.expire_holds`` sweeps their accounts."""
    return sorted(
        {user_id for user_id, expires_at in open_holds(scan(list(HOLD_TOPICS))).values() if expires_at <= now}
    )
