"""The application layer: an eventsourcing application holding every ledger
aggregate, and the engine that runs commands against it.

A unit of work loads the accounts a batch touches, runs each command in memory
(checking invariants after each), then saves every new event in one
transaction. Idempotency is optimistic: the happy path never looks a key up; a
reused key shows up as a clash on the key's ``CommandRecord`` (or as a business
error), and only then is the record read and its first receipt returned.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from itertools import chain
from typing import Any, ClassVar, TypeVar
from uuid import UUID

from eventsourcing.application import (
    AggregateNotFoundError,
    Application,
    ProcessingEvent,
    ProjectorFunction,
    Repository,
    project_aggregate,
)
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError, JSONTranscoder, Recording, StoredEvent
from eventsourcing.postgres import PostgresDatastore
from eventsourcing.utils import Environment, strtobool

from ._billing import UnitCommand
from ._clock import Clock
from ._domain import (
    CommandRecord,
    CreditAccount,
    Reservation,
    account_id_for,
    entry_id_for,
    record_id_for,
    reservation_id_for,
)
from ._errors import (
    BatchRejected,
    ConcurrencyExhausted,
    IdempotencyConflict,
    InvalidArgument,
    LedgerError,
    ReservationClosed,
    UnknownAccount,
    UnknownReservation,
)
from ._postgres import PingWindow, install_ping_window
from ._snapshots import sealed, trusted
from ._streams import StreamReader
from ._subscriptions import CreditPolicy, SubscriberSlot, slot_id_for
from ._transcoding import BlockAsDict, HoldAsDict
from ._types import (
    AdjustCredits,
    Command,
    CreditKind,
    GrantCredits,
    Receipt,
    ReleaseReservation,
    ReserveCredits,
    SettleReservation,
    SpendCredits,
)

T = TypeVar("T")

MAX_BATCH_COMMANDS = 10_000
MAX_ATTEMPTS = 16
SNAPSHOT_INTERVAL_EVENTS = 100
AGGREGATE_CACHE_SIZE = 10_000


class SealedRepository(Repository[UUID]):
    """eventsourcing's repository, except that a snapshot is used only when it
    passes its check (``_snapshots.trusted``); otherwise the events are replayed."""

    def __init__(self, app: LedgerApplication, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app = app

    def _reconstruct_aggregate(
        self, aggregate_id: UUID, version: int | None, projector_func: ProjectorFunction[Any, Any]
    ) -> Any:
        events = self.event_store.recorder
        newest = (
            self.snapshot_store.recorder.select_events(aggregate_id, desc=True, limit=1, lte=version)
            if self.snapshot_store is not None
            else []
        )
        start: list[Any] = []
        if newest:
            at = newest[0].originator_version
            stream = list(events.select_events(aggregate_id, gt=at - 1, lte=version))
            snapshot = trusted(
                self.app, newest[0], stream[0] if stream and stream[0].originator_version == at else None
            )
            if snapshot is not None:
                start, stream = [snapshot], stream[1:]
            else:
                stream = [*events.select_events(aggregate_id, lte=at - 1), *stream]
        else:
            stream = list(events.select_events(aggregate_id, lte=version))
        decode = self.app.mapper.to_domain_event
        aggregate = projector_func(None, chain(start, (decode(e) for e in stream)))
        if aggregate is None:
            raise AggregateNotFoundError(f"Aggregate {aggregate_id!r} version {version!r} not found.")
        return aggregate


class LedgerApplication(Application[UUID]):
    """Event store, snapshots and repository for every ledger aggregate."""

    name = "ledger"
    snapshotting_intervals: ClassVar[dict[type, int]] = {CreditAccount: SNAPSHOT_INTERVAL_EVENTS}
    ping_window: PingWindow | None = None
    #: Accounts whose stored snapshot was refused on load: their next save
    #: writes a sealed snapshot, whatever the version.
    unsealed: set[UUID]

    def construct_env(self, name: str, env: Any = None) -> Environment:
        # Only the settings the ledger was opened with: a library must not be
        # steered by whatever eventsourcing variables the host process exports.
        settings = dict(env or {})
        settings["IS_SNAPSHOTTING_ENABLED"] = "y"
        # Commands read aggregates from an LRU cache that is not fast-forwarded:
        # a stale account cannot commit (its next version already exists, the
        # save clashes), and the engine evicts and reloads on a clash. Queries
        # never use the cache (see Ledger), so other processes' writes show.
        settings["AGGREGATE_CACHE_MAXSIZE"] = str(AGGREGATE_CACHE_SIZE)
        settings["AGGREGATE_CACHE_FASTFORWARD"] = "n"
        return Environment(name, settings)

    def __init__(self, env: Any = None) -> None:
        self.unsealed = set()
        super().__init__(env)
        datastore = getattr(self.factory, "datastore", None)
        if isinstance(datastore, PostgresDatastore):
            window_s = float(self.env.get("LEDGER_PRE_PING_WINDOW_S") or 0)
            self.ping_window = install_ping_window(datastore, window_s)

    def construct_repository(self) -> Repository[UUID]:
        cache_maxsize = self.env.get(self.AGGREGATE_CACHE_MAXSIZE)
        return SealedRepository(
            self,
            event_store=self.events,
            snapshot_store=self.snapshots,
            cache_maxsize=int(cache_maxsize) if cache_maxsize else None,
            fastforward=strtobool(self.env.get(self.AGGREGATE_CACHE_FASTFORWARD, "y")),
            fastforward_skipping=strtobool(self.env.get(self.AGGREGATE_CACHE_FASTFORWARD_SKIPPING, "n")),
            deepcopy_from_cache=strtobool(self.env.get(self.DEEPCOPY_FROM_AGGREGATE_CACHE, "y")),
        )

    def take_snapshot(
        self,
        aggregate_id: UUID,
        version: int | None = None,
        projector_func: ProjectorFunction[Any, Any] = project_aggregate,
    ) -> None:
        """A sealed snapshot of the recorded state at ``version`` (default: the latest)."""
        aggregate = self.repository.get(aggregate_id, version=version, projector_func=projector_func)
        at = self.recorder.select_events(aggregate_id, gt=aggregate.version - 1, lte=aggregate.version)
        self._put_snapshot(aggregate, at[0])

    def _put_snapshot(self, aggregate: Any, event_at: StoredEvent) -> None:
        assert self.snapshots is not None
        snapshot = type(aggregate).Snapshot.take(aggregate)
        self.snapshots.put([sealed(self.mapper.transcoder, snapshot, event_at)])

    def _seal_snapshots(self, processing: ProcessingEvent[UUID], recordings: Sequence[Recording[UUID]]) -> None:
        """After a save: a sealed snapshot of each account whose new events
        reached a multiple of the interval (the newest such version only: an
        older one would be superseded at once), or whose stored snapshot was
        refused on load. From the saved account itself when the version is
        its latest, as it usually is; else replayed from the store."""
        if self.snapshots is None:
            return
        due: dict[UUID, int] = {}
        for event in processing.events:
            aggregate = processing.aggregates.get(event.originator_id)
            interval = self.snapshotting_intervals.get(type(aggregate))
            if interval and event.originator_version % interval == 0:
                due[event.originator_id] = max(due.get(event.originator_id, 0), event.originator_version)
        for aggregate_id in self.unsealed.intersection(processing.aggregates):
            self.unsealed.discard(aggregate_id)
            aggregate = processing.aggregates[aggregate_id]
            if isinstance(aggregate, CreditAccount):  # the kind the ledger snapshots
                due[aggregate_id] = aggregate.version
        if not due:
            return
        stored = {(r.notification.originator_id, r.notification.originator_version): r.notification for r in recordings}
        for aggregate_id, version in due.items():
            event_at = stored.get((aggregate_id, version))
            aggregate = processing.aggregates[aggregate_id]
            if event_at is None or aggregate.version != version:
                self.take_snapshot(aggregate_id, version)
            else:
                self._put_snapshot(aggregate, event_at)

    def evict(self, aggregate_ids: Iterable[UUID]) -> None:
        """Drops aggregates from the cache, so the next read goes to the store."""
        cache = self.repository.cache
        if cache is None:
            return
        for aggregate_id in aggregate_ids:
            try:
                cache.get(aggregate_id, evict=True)
            except KeyError:
                continue

    def save_all(self, objs: Sequence[Any]) -> int | None:
        """``save()`` for many aggregates and events in one transaction.

        eventsourcing's ``save`` tells aggregates from events with a runtime
        Protocol check that costs ~20 µs an object; a 10,000-grant batch spent
        half a second there. Here the caller's types are known."""
        processing = ProcessingEvent[UUID]()
        for obj in objs:
            if isinstance(obj, Aggregate):
                processing.events.extend(obj.collect_events())
                processing.aggregates[obj.id] = obj
            else:
                processing.events.append(obj)
        recordings = self._record(processing)
        self._seal_snapshots(processing, recordings)
        self._notify(recordings)
        # The position of the save in the notification log, for read-your-writes.
        return max((r.notification.id for r in recordings), default=None)

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        transcoder.register(BlockAsDict())
        transcoder.register(HoldAsDict())


def get_or_none(app: LedgerApplication, aggregate_id: UUID, cls: type[T]) -> T | None:
    try:
        aggregate: Any = app.repository.get(aggregate_id)
    except AggregateNotFoundError:
        return None
    if not isinstance(aggregate, cls):
        return None
    return aggregate


class _Unit:
    """One attempt at a batch: in-memory aggregates and the receipts so far."""

    def __init__(
        self, app: LedgerApplication, reader: StreamReader, now: datetime, policy: CreditPolicy | None = None
    ) -> None:
        self.app = app
        self.reader = reader
        self.now = now
        self.policy = policy or CreditPolicy()
        #: Other aggregates the unit loaded or created (subscriptions, plans, slots).
        self.others: dict[UUID, Any] = {}
        self.accounts: dict[UUID, CreditAccount] = {}
        self.new_reservations: dict[UUID, Reservation] = {}
        self.records: dict[str, CommandRecord] = {}
        self.missing: set[UUID] = set()
        #: Aggregate ids a read in this attempt found absent: not read again.
        #: Safe because creating one of them clashes in the store if another
        #: writer created it since, and the attempt is then run afresh.
        self.absent: set[UUID] = set()
        #: Ids of command records a read in this attempt found.
        self.found_records: set[UUID] = set()
        self.preloaded: dict[UUID, CreditAccount] = {}

    def prefetch(self, ids: Iterable[UUID], users: Iterable[UUID | None] = ()) -> None:
        """Reads, in one bulk read, the aggregates and accounts not read yet
        in this attempt; afterwards the unit knows each of them found or absent."""
        wanted = [i for i in dict.fromkeys(ids) if not self.knows(i)]
        accounts = {
            account_id_for(u): u
            for u in users
            if u is not None and u not in self.accounts and u not in self.preloaded and u not in self.missing
        }
        if not wanted and not accounts:
            return
        found = self.reader.load([*wanted, *accounts], snapshots=bool(accounts))
        for i in wanted:
            aggregate = found.get(i)
            if aggregate is None:
                self.absent.add(i)
            elif isinstance(aggregate, CommandRecord):
                self.found_records.add(i)
            else:
                self.others[i] = aggregate
        for account_id, user in accounts.items():
            account = found.get(account_id)
            if isinstance(account, CreditAccount):
                self.preloaded[user] = account
            else:
                self.missing.add(user)

    def knows(self, aggregate_id: UUID) -> bool:
        """Whether this attempt has read (or made) the aggregate, or found it absent."""
        return aggregate_id in self.others or aggregate_id in self.absent or aggregate_id in self.found_records

    def account(self, user_id: UUID, *, open_missing: bool = False) -> CreditAccount:
        account = self.accounts.get(user_id)
        if account is not None:
            return account
        account_id = account_id_for(user_id)
        account = self.preloaded.pop(user_id, None)
        if account is None and user_id not in self.missing:
            try:
                account = self.app.repository.get(account_id)
            except AggregateNotFoundError:
                self.missing.add(user_id)
        if account is None:
            if not open_missing:
                raise UnknownAccount(user_id)
            account = CreditAccount._create(CreditAccount.Opened, id=account_id, user_id=user_id, timestamp=self.now)
            self.missing.discard(user_id)
        assert isinstance(account, CreditAccount)
        account.apply_due(self.now)
        self.accounts[user_id] = account
        return account

    def aggregate_ids(self) -> list[UUID]:
        """Every aggregate this unit read or wrote."""
        return [*(account_id_for(u) for u in self.accounts), *self.others]

    def aggregate(self, aggregate_id: UUID, cls: type[T]) -> T | None:
        """An aggregate by id, loaded once per unit (from the command cache)."""
        found = self.others.get(aggregate_id)
        if found is None and aggregate_id not in self.absent:
            found = get_or_none(self.app, aggregate_id, cls)
            if found is not None:
                self.others[aggregate_id] = found
        return found if isinstance(found, cls) else None

    def add(self, aggregate: Any) -> None:
        self.others[aggregate.id] = aggregate
        self.absent.discard(aggregate.id)

    def recorded(self, key: str) -> bool:
        """Whether a command under ``key`` was recorded: in this unit, or in
        the store (read once per unit attempt)."""
        if key in self.records:
            return True
        record_id = record_id_for(key)
        if record_id in self.found_records:
            return True
        if record_id in self.absent:
            return False
        if get_or_none(self.app, record_id, CommandRecord) is not None:
            return True
        self.absent.add(record_id)
        return False

    def slot(self, user_id: UUID) -> SubscriberSlot:
        slot = self.aggregate(slot_id_for(user_id), SubscriberSlot)
        if slot is None:
            slot = SubscriberSlot._create(
                SubscriberSlot.Opened, id=slot_id_for(user_id), user_id=user_id, timestamp=self.now
            )
            self.add(slot)
        return slot

    def grant_once(
        self,
        user_id: UUID,
        amount: int,
        kind: CreditKind,
        *,
        key: str,
        expires_at: datetime | None,
        reference_type: str | None,
        reference_id: str | None,
        description: str,
    ) -> int:
        """Grants credits under a key derived from the business event; a key
        recorded before means the credits were granted: nothing happens."""
        if amount <= 0 or self.recorded(key):
            return 0
        account = self.account(user_id, open_missing=True)
        account.grant(
            entry_id=entry_id_for(key),
            amount=amount,
            kind=kind,
            description=description,
            reference_type=reference_type,
            reference_id=reference_id,
            expires_at=expires_at,
            actor=None,
            key=key,
            now=self.now,
        )
        internal = GrantCredits(
            key=key,
            user_id=user_id,
            amount_credits=amount,
            kind=kind,
            description=description,
            reference_type=reference_type,
            reference_id=reference_id,
            expires_at=expires_at,
        )
        self._done(internal, account, amount=amount, entry_id=entry_id_for(key))
        return amount

    def claw_back_once(
        self,
        user_id: UUID,
        wanted: int,
        *,
        key: str,
        block_id: str | None,
        from_other_credits: bool,
        reference_type: str | None,
        reference_id: str | None,
        description: str,
    ) -> int:
        """Takes back up to ``wanted`` credits after a refund under a key
        derived from the refund (see ``CreditAccount.claw_back``), recording
        the key like any spend; a key recorded before means it was done."""
        if wanted <= 0 or self.recorded(key):
            return 0
        account = self.account(user_id)
        entry_id = entry_id_for(key)
        taken = account.claw_back(
            entry_id=entry_id,
            wanted=wanted,
            block_id=block_id,
            from_other_credits=from_other_credits,
            description=description,
            reference_type=reference_type,
            reference_id=reference_id,
            key=key,
            now=self.now,
        )
        if taken:
            internal = SpendCredits(
                key=key,
                user_id=user_id,
                amount_credits=taken,
                kind=CreditKind.REFUND,
                description=description,
                reference_type=reference_type,
                reference_id=reference_id,
            )
            self._done(internal, account, amount=-taken, entry_id=entry_id)
        return taken

    def finish(self, c: Command, user_id: UUID | None, *, amount: int, subscription_id: UUID | None = None) -> Receipt:
        """The receipt and key record of a command that is not a credit command."""
        balance = held = 0
        if user_id is not None:
            try:
                account = self.account(user_id)
            except UnknownAccount:
                account = None  # no credits yet: the receipt says 0
            if account is not None:
                account.check_invariants()
                balance, held = account.balance, account.held
        fields: dict[str, Any] = {
            "key": c.key,
            "command": c.name,
            "user_id": user_id,
            "amount_credits": amount,
            "balance_credits": balance,
            "held_credits": held,
            "available_credits": balance - held,
            "recorded_at": self.now,
            "subscription_id": subscription_id,
        }
        self._record(c, fields)
        return Receipt.model_construct(**fields, entry_id=None, reservation_id=None, replayed=False)

    def owner_of(self, reservation_id: UUID, hint: UUID | None) -> UUID:
        if hint is not None:
            return hint
        for account in self.accounts.values():  # reserved earlier in this batch
            if str(reservation_id) in account.holds:
                return account.user_id
        reservation = get_or_none(self.app, reservation_id, Reservation)
        if reservation is None:
            raise UnknownReservation(reservation_id)
        return reservation.user_id

    def closed_status(self, account: CreditAccount, reservation_id: UUID) -> ReservationClosed | UnknownReservation:
        """Why a hold is not open on ``account``: closed before, or never there."""
        for event in account.pending_events:
            closed = getattr(event, "reservation_id", None) == reservation_id
            if closed and isinstance(event, CreditAccount.Settled):
                return ReservationClosed(reservation_id, "settled")
            if closed and isinstance(event, CreditAccount.Released):
                return ReservationClosed(reservation_id, "released")
        # Fresh read: a reservation's close is saved as a bare event, which the
        # cache does not see.
        reservation = self.reader.load([reservation_id], snapshots=False).get(reservation_id)
        if isinstance(reservation, Reservation) and reservation.user_id == account.user_id:
            return ReservationClosed(reservation_id, reservation.status)
        return UnknownReservation(reservation_id, account.user_id)

    def run(self, command: Command) -> Receipt:
        if isinstance(command, UnitCommand):
            return command.apply(self)
        if isinstance(command, GrantCredits):
            return self._grant(command)
        if isinstance(command, SpendCredits):
            return self._spend(command)
        if isinstance(command, ReserveCredits):
            return self._reserve(command)
        if isinstance(command, SettleReservation | ReleaseReservation):
            return self._close(command)
        if isinstance(command, AdjustCredits):
            return self._adjust(command)
        raise InvalidArgument(f"not a ledger command: {type(command).__name__}")

    def _grant(self, c: GrantCredits) -> Receipt:
        account = self.account(c.user_id, open_missing=True)
        entry_id = entry_id_for(c.key)
        account.grant(
            entry_id=entry_id,
            amount=c.amount_credits,
            kind=c.kind,
            description=c.description,
            reference_type=c.reference_type,
            reference_id=c.reference_id,
            expires_at=c.expires_at,
            actor=c.actor,
            key=c.key,
            now=self.now,
        )
        return self._done(c, account, amount=c.amount_credits, entry_id=entry_id)

    def _spend(self, c: SpendCredits) -> Receipt:
        account = self.account(c.user_id)
        entry_id = entry_id_for(c.key)
        account.debit(
            entry_id=entry_id,
            amount=c.amount_credits,
            kind=c.kind,
            description=c.description,
            reference_type=c.reference_type,
            reference_id=c.reference_id,
            actor=None,
            key=c.key,
            now=self.now,
        )
        return self._done(c, account, amount=-c.amount_credits, entry_id=entry_id)

    def _adjust(self, c: AdjustCredits) -> Receipt:
        account = self.account(c.user_id, open_missing=c.delta_credits > 0)
        entry_id = entry_id_for(c.key)
        common = dict(
            entry_id=entry_id,
            amount=abs(c.delta_credits),
            kind=CreditKind.ADMIN_ADJUSTMENT,
            description=c.reason,
            reference_type=None,
            reference_id=None,
            actor=c.actor,
            key=c.key,
            now=self.now,
        )
        if c.delta_credits > 0:
            account.grant(expires_at=None, **common)  # type: ignore[arg-type]
        else:
            account.debit(**common)  # type: ignore[arg-type]
        return self._done(c, account, amount=c.delta_credits, entry_id=entry_id)

    def _reserve(self, c: ReserveCredits) -> Receipt:
        account = self.account(c.user_id)
        reservation_id = reservation_id_for(c.key)
        account.reserve(
            reservation_id=reservation_id,
            job_id=c.job_id,
            amount=c.amount_credits,
            expires_at=c.expires_at,
            key=c.key,
            now=self.now,
        )
        return self._done(c, account, amount=0, reservation_id=reservation_id)

    def _close(self, c: SettleReservation | ReleaseReservation) -> Receipt:
        account = self.account(self.owner_of(c.reservation_id, c.user_id))
        if str(c.reservation_id) not in account.holds:
            raise self.closed_status(account, c.reservation_id)
        if isinstance(c, SettleReservation):
            entry_id = entry_id_for(c.key)
            account.settle(
                reservation_id=c.reservation_id, entry_id=entry_id, actual=c.actual_credits, key=c.key, now=self.now
            )
            return self._done(c, account, amount=-c.actual_credits, entry_id=entry_id, reservation_id=c.reservation_id)
        account.release(reservation_id=c.reservation_id, reason=c.reason, key=c.key, now=self.now)
        return self._done(c, account, amount=0, reservation_id=c.reservation_id)

    def _done(
        self,
        c: Command,
        account: CreditAccount,
        *,
        amount: int,
        entry_id: UUID | None = None,
        reservation_id: UUID | None = None,
    ) -> Receipt:
        account.apply_due(self.now)
        account.check_invariants()
        held = account.held
        fields: dict[str, Any] = {
            "key": c.key,
            "command": c.name,
            "user_id": account.user_id,
            "entry_id": entry_id,
            "reservation_id": reservation_id,
            "amount_credits": amount,
            "balance_credits": account.balance,
            "held_credits": held,
            "available_credits": account.balance - held,
            "recorded_at": self.now,
        }
        self._record(c, fields)
        # The fields were built from checked state: skip pydantic's validation.
        return Receipt.model_construct(**fields, replayed=False)

    def _record(self, c: Command, fields: dict[str, Any]) -> None:
        self.records[c.key] = CommandRecord._create(
            CommandRecord.Recorded,
            id=record_id_for(c.key),
            key=c.key,
            command=c.name,
            fingerprint=c.fingerprint,
            receipt=fields,
            timestamp=self.now,
        )

    def sweep(self, user_id: UUID) -> None:
        """Loads an account so its due holds and lapsed blocks are recorded."""
        account = self.account(user_id)
        account.check_invariants()

    def pending(self) -> list[Any]:
        """Everything to save: accounts, the reservation records their events
        imply, and the command records. One transaction."""
        objs: list[Any] = list(self.accounts.values())
        closes: list[Any] = []
        for account in self.accounts.values():
            for event in account.pending_events:
                if isinstance(event, CreditAccount.Reserved):
                    self.new_reservations[event.reservation_id] = Reservation._create(
                        Reservation.Reserved,
                        id=event.reservation_id,
                        user_id=account.user_id,
                        job_id=event.job_id,
                        amount=event.amount,
                        expires_at=event.expires_at,
                        timestamp=event.timestamp,
                    )
                elif isinstance(event, CreditAccount.Settled | CreditAccount.Released):
                    closes.append(self._close_event(event))
        objs.extend(self.new_reservations.values())
        objs.extend(e for e in closes if e is not None)
        objs.extend(self.others.values())
        objs.extend(self.records.values())
        return objs

    def _close_event(self, event: CreditAccount.Settled | CreditAccount.Released) -> Any:
        fields: dict[str, Any] = {"timestamp": event.timestamp}
        if isinstance(event, CreditAccount.Settled):
            fields.update(status="settled", settled_credits=event.amount, release_reason=None)
        else:
            fields.update(status="released", settled_credits=None, release_reason=event.reason)
        new = self.new_reservations.get(event.reservation_id)
        if new is not None:
            new.trigger_event(Reservation.Closed, **fields)
            return None
        # The account says the hold was open, so its reservation is at version 1:
        # its close is version 2, and a second close clashes in the event store.
        return Reservation.Closed(originator_id=event.reservation_id, originator_version=2, **fields)


class Engine:
    """Runs batches of commands with idempotency and bounded retries."""

    def __init__(
        self,
        app: LedgerApplication,
        clock: Clock,
        reader: StreamReader,
        *,
        max_attempts: int = MAX_ATTEMPTS,
        policy: CreditPolicy | None = None,
    ) -> None:
        if not 1 <= max_attempts <= 100:
            raise InvalidArgument(f"max_attempts must be within 1..100, got {max_attempts}")
        self.app = app
        self.clock = clock
        self.reader = reader
        self.max_attempts = max_attempts
        self.policy = policy or CreditPolicy()

    def find_record(self, key: str) -> CommandRecord | None:
        return get_or_none(self.app, record_id_for(key), CommandRecord)

    @staticmethod
    def replay(record: CommandRecord, command: Command) -> Receipt:
        if record.fingerprint != command.fingerprint:
            raise IdempotencyConflict(command.key, record.command, command.name)
        return Receipt.model_validate({**record.receipt, "replayed": True})

    def execute(
        self, commands: Sequence[Command], *, single: bool = False, now: datetime | None = None
    ) -> list[Receipt]:
        """Runs commands in one transaction. ``single`` raises a failing
        command's own error rather than wrapping it in BatchRejected."""
        if not commands:
            return []
        if len(commands) > MAX_BATCH_COMMANDS:
            raise InvalidArgument(f"a batch holds at most {MAX_BATCH_COMMANDS} commands, got {len(commands)}")
        for c in commands:
            if not isinstance(c, Command):
                raise InvalidArgument(f"not a ledger command: {type(c).__name__}")
        first_by_key: dict[str, Command] = {}
        for c in commands:
            first = first_by_key.setdefault(c.key, c)
            if first.fingerprint != c.fingerprint:
                raise IdempotencyConflict(c.key, first.name, c.name)
        # Keys are not looked up in advance: a fresh batch (the common case)
        # needs no look-up, and a re-run clashes on its first recorded key,
        # which triggers one bulk look-up of all of them below.
        known: dict[str, CommandRecord] = {}
        conflicts = 0
        rechecked = False
        # Each pass either returns, raises, records a clash (bounded by
        # max_attempts), learns at least one recorded key (bounded by the
        # batch's keys) or re-checks a refusal on fresh state (once).
        while True:
            unit = _Unit(self.app, self.reader, now or self.clock.now(), self.policy)
            if len(commands) > 1:
                self._prefetch(unit, [c for c in commands if c.key not in known])
            try:
                receipts = self._run(unit, commands, known)
            except _Failed as failed:
                # Replay wins over a business error: the failing command, or one
                # before it, may have been recorded by another writer meanwhile.
                found = self._new_records(first_by_key, known, failed.command.key)
                if found:
                    known.update(found)
                    continue
                if not rechecked:
                    # The refusal was decided on cached aggregates, which other
                    # processes may have moved on: decide again on fresh state.
                    rechecked = True
                    self.app.evict(unit.aggregate_ids())
                    continue
                if single:
                    raise failed.cause from None
                raise BatchRejected(failed.index, failed.cause) from None
            try:
                position = self.app.save_all(unit.pending())
            except IntegrityError:
                # A concurrent writer moved an aggregate on, or a key was used
                # meanwhile: learn which keys now exist, then reload and re-run.
                self.app.evict(unit.aggregate_ids())
                found = self._new_records(first_by_key, known, None)
                if found:
                    known.update(found)
                    continue
                conflicts += 1
                if conflicts >= self.max_attempts:
                    raise ConcurrencyExhausted(conflicts) from None
                time.sleep(random.uniform(0, min(0.05, 0.001 * 2**conflicts)))
                continue
            return [r if r.replayed else r.model_copy(update={"position": position}) for r in receipts]

    @staticmethod
    def _prefetch(unit: _Unit, commands: Sequence[Command]) -> None:
        """One bulk read of the batch's accounts and of what its other
        commands say they will read: the ones not found are known missing."""
        ids: list[UUID] = []
        users: list[UUID] = []
        for c in commands:
            if (user := getattr(c, "user_id", None)) is not None:
                users.append(user)
            if isinstance(c, UnitCommand):
                more_ids, more_users = c.reads()
                ids.extend(more_ids)
                users.extend(more_users)
        unit.prefetch(ids, users)

    def _new_records(
        self, first_by_key: dict[str, Command], known: dict[str, CommandRecord], likely: str | None
    ) -> dict[str, CommandRecord]:
        """Records of the batch's keys that are not known yet."""
        unknown = {k: c for k, c in first_by_key.items() if k not in known}
        if len(unknown) == 1 and likely in unknown:
            record = self.find_record(likely)
            return {likely: record} if record is not None else {}
        return self._find_records(unknown) if unknown else {}

    def _find_records(self, by_key: dict[str, Command]) -> dict[str, CommandRecord]:
        loaded = self.reader.load([record_id_for(key) for key in by_key], snapshots=False)
        found = {}
        for key in by_key:
            record = loaded.get(record_id_for(key))
            if isinstance(record, CommandRecord):
                found[key] = record
        return found

    def _run(self, unit: _Unit, commands: Sequence[Command], known: dict[str, CommandRecord]) -> list[Receipt]:
        receipts: list[Receipt] = []
        done: dict[str, Receipt] = {}
        for index, command in enumerate(commands):
            try:
                if command.key in known:
                    receipts.append(self.replay(known[command.key], command))
                elif command.key in done:
                    receipts.append(done[command.key].model_copy(update={"replayed": True}))
                else:
                    done[command.key] = unit.run(command)
                    receipts.append(done[command.key])
            except LedgerError as exc:
                raise _Failed(index, command, exc) from exc
        return receipts

    def sweep(self, user_ids: Iterable[UUID], now: datetime) -> int:
        """Records due hold releases and block expiries for these accounts in
        one transaction; returns how many events that recorded."""
        ids = list(user_ids)
        if len(ids) > MAX_BATCH_COMMANDS:
            raise InvalidArgument(f"a sweep batch holds at most {MAX_BATCH_COMMANDS} accounts")
        for _ in range(self.max_attempts):
            unit = _Unit(self.app, self.reader, now, self.policy)
            unit.prefetch([], ids)
            for user_id in ids:
                unit.sweep(user_id)
            objs = unit.pending()
            count = sum(len(a.pending_events) for a in unit.accounts.values())
            if count == 0:
                return 0
            try:
                self.app.save_all(objs)
            except IntegrityError:
                self.app.evict(account_id_for(u) for u in unit.accounts)
                continue
            return count
        raise ConcurrencyExhausted(self.max_attempts)


class _Failed(Exception):
    def __init__(self, index: int, command: Command, cause: LedgerError) -> None:
        self.index = index
        self.command = command
        self.cause = cause
