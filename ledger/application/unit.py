"""The unit of work and the engine that runs commands against the event store.

A unit of work loads the accounts a batch touches, runs each command in memory
(checking invariants after each), then saves every new event in one
transaction. Idempotency is optimistic: the happy path never looks a key up; a
reused key shows up as a clash on the key's ``CommandRecord`` (or as a business
error), and only then is the record read and its first receipt returned.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError
from eventsourcing.utils import get_topic

from ledger.application import holds
from ledger.application.commands import (
    Command,
    GrantCredits,
    SpendCredits,
    differing_arguments,
)
from ledger.application.gcpause import GC_PAUSE_MIN_COMMANDS, collector_paused
from ledger.application.results import Receipt, assembled, receipt_class
from ledger.clock import Clock, require_utc
from ledger.domain.credits import (
    CommandRecord,
    CreditAccount,
    CreditKind,
    account_id_for,
    entry_id_for,
    record_id_for,
)
from ledger.domain.holds import HoldRecord
from ledger.domain.subscriptions import CreditPolicy, SubscriberSlot, slot_id_for
from ledger.errors import (
    BatchRejected,
    ConcurrencyExhausted,
    IdempotencyConflict,
    InvalidArgument,
    LedgerError,
    ReservationClosed,
    UnknownAccount,
    UnknownReservation,
)
from ledger.storage.eventstore import LedgerApplication, get_or_none
from ledger.storage.streams import CHUNK_IDS, StreamReader
from ledger.storage.writelocks import MAX_LOCKED_FIRST

T = TypeVar("T")

#: Receipt's fields in order, with the default of each optional one (all
#: immutable: None or False).
_RECEIPT_DEFAULTS: dict[str, Any] = {
    name: None if info.is_required() else info.get_default(call_default_factory=True)
    for name, info in Receipt.model_fields.items()
}
_RECEIPT_REQUIRED = frozenset(name for name, info in Receipt.model_fields.items() if info.is_required())


def built_receipt(values: dict[str, Any]) -> Receipt:
    """``Receipt.model_construct(**values)``, for values built from checked
    state, at a fifth of its cost (pydantic's generic path resolves every
    default per call): the same ``__dict__`` in field order, the same fields
    set, no validation."""
    missing = _RECEIPT_REQUIRED.difference(values)
    if missing:
        raise AssertionError(f"a receipt without {sorted(missing)}")
    # The defaults, in field order, overwritten in place: the order stays the fields'.
    state = {**_RECEIPT_DEFAULTS, **values}
    if len(state) != len(_RECEIPT_DEFAULTS):
        unknown = values.keys() - _RECEIPT_DEFAULTS.keys()
        raise AssertionError(f"a receipt with unknown fields {sorted(unknown)}")
    return assembled(receipt_class(state["reservation_id"]), state, set(values))


def positioned(receipt: Receipt, position: int | None) -> Receipt:
    """``receipt.model_copy(update={"position": position})``, at a fraction of its cost."""
    state = dict(receipt.__dict__)
    state["position"] = position
    return assembled(type(receipt), state, {*receipt.model_fields_set, "position"})


def clash_backoff(conflicts: int) -> None:
    """Waits a random while, growing with the ``conflicts`` so far (at most
    50 ms), before a clashed batch runs again: writers that clashed together
    do not clash again in step."""
    time.sleep(random.uniform(0, min(0.05, 0.001 * 2**conflicts)))


MAX_BATCH_COMMANDS = 10_000
MAX_ATTEMPTS = 16
#: The topic a command record's ``Recorded`` event names its aggregate by.
_RECORD_TOPIC = get_topic(CommandRecord)


class Unit:
    """One attempt at a batch: in-memory aggregates and the receipts so far."""

    def __init__(
        self, app: LedgerApplication, reader: StreamReader, now: datetime, policy: CreditPolicy | None = None
    ) -> None:
        self.app = app
        self.reader = reader
        # The attempt's time becomes every event's timestamp. A clock's naive
        # reading would be stored as it is, and every later comparison with an
        # aware time (the audit, balances at an instant) would fail; another
        # zone's offset would reach the history. Both are refused or converted.
        self.now = require_utc(now, "now")
        self.policy = policy or CreditPolicy()
        #: Other aggregates the unit loaded or created (subscriptions, plans, slots).
        self.others: dict[UUID, Any] = {}
        self.accounts: dict[UUID, CreditAccount] = {}
        #: Records of the holds reserved in this attempt (``holds.record_events``).
        self.new_holds: dict[UUID, HoldRecord] = {}
        #: What priced the holds reserved in this attempt (``price_hold``).
        self.hold_prices: dict[UUID, dict[str, Any]] = {}
        #: The ``Recorded`` event of each key this attempt records: saved as
        #: events, not aggregates (a record is written once and read only on
        #: a replay, so it has no business in the account cache).
        self.records: dict[str, CommandRecord.Recorded] = {}
        #: Aggregate ids (accounts' too) a read in this attempt found absent: not read again.
        #: Safe because creating one of them clashes in the store if another
        #: writer created it since, and the attempt is then run afresh.
        self.absent: set[UUID] = set()
        #: Ids of command records a read in this attempt found.
        self.found_records: set[UUID] = set()
        self.preloaded: dict[UUID, CreditAccount] = {}

    def prefetch(self, ids: Iterable[UUID], users: Iterable[UUID | None] = ()) -> None:
        """Reads, in one bulk read, the aggregates and accounts not read yet
        in this attempt; afterwards the unit knows each of them found or absent.
        Other aggregates in the command cache are left to it (``aggregate``
        takes them from there, as a single command does); accounts in it are
        copied and brought up to date together, with one read of only their
        new events (``_cached_accounts``), so that a large batch never saves a
        stale copy and clashes whole."""
        in_cache = _in_cache(self.app)
        wanted = [i for i in dict.fromkeys(ids) if not self.knows(i) and not in_cache(i)]
        accounts: dict[UUID, UUID] = {}
        for u in users:
            if u is None or u in self.accounts or u in self.preloaded:
                continue
            account_id = account_id_for(u)  # once: each look-up hashes the UUID, a Python call
            if account_id not in self.absent:
                accounts[account_id] = u
        if not wanted and not accounts:
            return
        cached = self._cached_accounts(accounts)
        rest = [i for i in accounts if i not in cached]
        found = self.reader.load([*wanted, *rest], snapshots=bool(rest)) if wanted or rest else {}
        found.update(cached)
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
                self.absent.add(account_id)

    def _cached_accounts(self, account_ids: Iterable[UUID]) -> dict[UUID, CreditAccount]:
        """Copies of the accounts among these that the repository's cache
        holds, each brought up to date with the events recorded since its
        cached version: one read of only the new events for all of them
        (usually none), instead of a snapshot and its events per account."""
        cache = self.app.repository.cache
        if cache is None:
            return {}
        cached: dict[UUID, CreditAccount] = {}
        for account_id in account_ids:
            try:
                aggregate = cache.get(account_id)
            except KeyError:
                continue
            if isinstance(aggregate, CreditAccount):
                cached[account_id] = aggregate
        if not cached:
            return {}
        versions = [(i, a.version) for i, a in cached.items()]
        newer: dict[UUID, list[Any]] = {}
        for start in range(0, len(versions), CHUNK_IDS):  # statements and results bounded, as ``load``'s
            newer.update(self.reader.events_after(dict(versions[start : start + CHUNK_IDS])))
        decode = self.app.mapper.to_domain_event
        found: dict[UUID, CreditAccount] = {}
        for account_id, aggregate in cached.items():
            # A copy, as the repository hands out: the attempt may fail and
            # the cached account must stay as recorded. (A fork: its blocks
            # are shared, never changed in place; see CreditAccount.fork.)
            account: Any = aggregate.fork()
            for stored in newer.get(account_id, ()) if newer else ():  # usually none at all
                account = decode(stored).mutate(account)  # type: ignore[attr-defined]
            found[account_id] = account
        return found

    def knows(self, aggregate_id: UUID) -> bool:
        """Whether this attempt has read (or made) the aggregate, or found it absent."""
        return aggregate_id in self.others or aggregate_id in self.absent or aggregate_id in self.found_records

    def account(self, user_id: UUID, *, open_missing: bool = False) -> CreditAccount:
        account = self.accounts.get(user_id)
        if account is not None:
            return account
        account_id = account_id_for(user_id)
        account = self.preloaded.pop(user_id, None)
        if account is None and account_id not in self.absent:
            try:
                account = self.app.repository.get(account_id)
            except AggregateNotFoundError:
                self.absent.add(account_id)
        if account is None:
            if not open_missing:
                raise UnknownAccount(user_id)
            account = CreditAccount._create(CreditAccount.Opened, id=account_id, user_id=user_id, timestamp=self.now)
            self.absent.discard(account_id)
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
        self.done(internal, account, amount=amount, entry_id=entry_id_for(key))
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
            self.done(internal, account, amount=-taken, entry_id=entry_id)
        return taken

    def finish(self, c: Command, user_id: UUID | None, *, amount: int, subscription_id: UUID | None = None) -> Receipt:
        """The receipt and key record of a command that is not a credit command."""
        balance = held = available = 0
        if user_id is not None:
            try:
                account = self.account(user_id)
            except UnknownAccount:
                account = None  # no credits yet: the receipt says 0
            if account is not None:
                account.check_invariants()
                balance, held, available = account.balance, account.held, account.available
        fields: dict[str, Any] = {
            "key": c.key,
            "command": c.name,
            "user_id": user_id,
            "amount_credits": amount,
            "balance_credits": balance,
            "held_credits": held,
            "available_credits": available,
            "recorded_at": self.now,
            "subscription_id": subscription_id,
        }
        self._record(c, fields)
        return Receipt.model_construct(**fields, entry_id=None, reservation_id=None, replayed=False)

    def owner_of(self, reservation_id: UUID, hint: UUID | None) -> UUID:
        """The user whose account holds the hold (``holds.owner_of``)."""
        return holds.owner_of(
            reservation_id, hint, self.accounts.values(), lambda rid: get_or_none(self.app, rid, HoldRecord)
        )

    def closed_status(self, account: CreditAccount, reservation_id: UUID) -> ReservationClosed | UnknownReservation:
        """Why a hold is not open on ``account``: closed before, or never there
        (``holds.closed_status``)."""
        return holds.closed_status(account, reservation_id, self._fresh_record)

    def _fresh_record(self, reservation_id: UUID) -> HoldRecord | None:
        found = self.reader.load([reservation_id], snapshots=False).get(reservation_id)
        return found if isinstance(found, HoldRecord) else None

    def run(self, command: Command) -> Receipt:
        return command.apply(self)

    def done(
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
            "available_credits": account.available,
            "recorded_at": self.now,
        }
        self._record(c, fields)
        # The fields were built from checked state: skip pydantic's validation.
        return built_receipt({**fields, "replayed": False})

    def _record(self, c: Command, fields: dict[str, Any]) -> None:
        # The created event alone (what ``CommandRecord._create`` would
        # trigger, without building the aggregate it is never read back as).
        # (mypy sees only the base event's fields of eventsourcing's event dataclasses.)
        self.records[c.key] = CommandRecord.Recorded(  # type: ignore[call-arg]
            originator_topic=_RECORD_TOPIC,
            originator_id=record_id_for(c.key),
            originator_version=CommandRecord.INITIAL_VERSION,
            key=c.key,
            command=c.name,
            fingerprint=c.fingerprint,
            receipt=fields,
            arguments=c.arguments,
            timestamp=self.now,
        )

    def price_hold(self, reservation_id: UUID, price: dict[str, Any]) -> None:
        """Records, on the ``HoldRecord`` of a hold reserved in this attempt,
        the quote that sized it."""
        self.hold_prices[reservation_id] = price

    def sweep(self, user_id: UUID) -> None:
        """Loads an account so its due holds and lapsed blocks are recorded."""
        account = self.account(user_id)
        account.check_invariants()

    def pending(self) -> list[Any]:
        """Everything to save: accounts, the hold records their events imply
        (``holds.record_events``), and the command records. One transaction."""
        for account in self.accounts.values():
            # Balance thresholds are crossed by the transaction as a whole:
            # recorded here, with the events that crossed them.
            account.cross_thresholds(self.now)
        objs: list[Any] = list(self.accounts.values())
        objs.extend(holds.record_events(self.accounts.values(), self.new_holds, self.hold_prices))
        objs.extend(self.others.values())
        objs.extend(self.records.values())
        return objs


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
            # Records written before arguments were kept cannot say which differ.
            recorded = record.arguments
            differ = None if recorded is None else differing_arguments(recorded, command.arguments)
            raise IdempotencyConflict(command.key, record.command, command.name, differ)
        return receipt_class(record.receipt.get("reservation_id")).model_validate({**record.receipt, "replayed": True})

    def execute(
        self, commands: Sequence[Command], *, single: bool = False, now: datetime | None = None
    ) -> list[Receipt]:
        """Runs commands in one transaction (``_execute``); a large batch
        with the cyclic garbage collector paused (``gcpause``)."""
        with collector_paused(len(commands) >= GC_PAUSE_MIN_COMMANDS):
            return self._execute(commands, single=single, now=now)

    def _execute(
        self, commands: Sequence[Command], *, single: bool = False, now: datetime | None = None
    ) -> list[Receipt]:
        """Runs commands in one transaction. ``single`` raises a failing
        command's own error rather than wrapping it in BatchRejected."""
        if not commands:
            return []
        if len(commands) > MAX_BATCH_COMMANDS:
            raise InvalidArgument(f"a batch holds at most {MAX_BATCH_COMMANDS} commands, got {len(commands)}")
        for index, c in enumerate(commands):
            if not isinstance(c, Command):
                if single:
                    raise InvalidArgument(f"not a ledger command: {type(c).__name__}", param="command")
                # In a batch of thousands, the position is what finds it.
                raise InvalidArgument(
                    f"not a ledger command: {type(c).__name__}, at index {index} of the batch", param="commands"
                )
        first_by_key: dict[str, Command] = {}
        for c in commands:
            first = first_by_key.setdefault(c.key, c)
            if first.fingerprint != c.fingerprint:
                raise IdempotencyConflict(c.key, first.name, c.name, differing_arguments(first.arguments, c.arguments))
        # Keys are not looked up in advance: a fresh batch (the common case)
        # needs no look-up, and a re-run clashes on its first recorded key,
        # which triggers one bulk look-up of all of them below.
        known: dict[str, CommandRecord] = {}
        conflicts = 0
        rechecked = False
        counters = self.app.counters
        counters.add("batches")
        # Each pass either returns, raises, records a clash (bounded by
        # max_attempts), learns at least one recorded key (bounded by the
        # batch's keys) or re-checks a refusal on fresh state (once).
        # A single command's attempt runs in a write session: an account
        # other processes write is locked before it is read, until the
        # save commits (ledger.storage.writelocks). A batch stays optimistic
        # until it clashes: then its next attempt (a single command's too)
        # first locks the aggregates the clashes named. Other writers keep
        # changing those, and a batch that only retried lost to them every
        # time; those writers share them, so they lock their reads and wait.
        locks = self.app.write_locks
        clashed_on: list[UUID] = []
        backoff = 0
        while True:
            if backoff:
                clash_backoff(backoff)  # outside the session: nothing is held while waiting
                backoff = 0
            with locks.attempt(len(commands), clashed=clashed_on):
                unit = Unit(self.app, self.reader, now or self.clock.now(), self.policy)
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
                        # processes may have moved on: decide again on fresh state
                        # (the cached copies fast-forwarded from the store).
                        rechecked = True
                        self.app.recheck(unit.aggregate_ids())
                        continue
                    if single:
                        raise failed.cause from None
                    raise BatchRejected(failed.index, failed.cause) from None
                counters.add("attempts")
                try:
                    position = self.app.save_all(unit.pending())
                except IntegrityError as exc:
                    aggregate_id = locks.clashed_on(exc)
                    if aggregate_id is not None and aggregate_id not in clashed_on:
                        clashed_on.append(aggregate_id)
                        del clashed_on[MAX_LOCKED_FIRST:]  # the first ones stay locked
                    counted = self.clashed(unit, first_by_key, known, conflicts)
                    backoff, conflicts = (counted if counted > conflicts else 0), counted
                    continue
                return [r if r.replayed else positioned(r, position) for r in receipts]

    def clashed(self, unit: Unit, by_key: dict[str, Command], known: dict[str, CommandRecord], conflicts: int) -> int:
        """A save of ``unit`` clashed: a concurrent writer moved an aggregate
        on, or used a key meanwhile. Learns which keys now exist (into
        ``known``: the next run replays them) and marks the aggregates shared
        (the next run fast-forwards them); returns the conflicts so far,
        one more unless keys were learnt, and raises ConcurrencyExhausted once
        they reach ``max_attempts``."""
        self.app.counters.add("clashes")
        self.app.refresh(unit.aggregate_ids())
        found = self._new_records(by_key, known, None)
        if found:
            known.update(found)
            return conflicts
        if conflicts + 1 >= self.max_attempts:
            self.app.counters.add("exhausted")
            raise ConcurrencyExhausted(conflicts + 1)
        return conflicts + 1

    @staticmethod
    def _prefetch(unit: Unit, commands: Sequence[Command]) -> None:
        """One bulk read of the batch's accounts and of what its other
        commands say they will read: the ones not found are known missing."""
        ids: list[UUID] = []
        users: list[UUID] = []
        for c in commands:
            if (user := getattr(c, "user_id", None)) is not None:
                users.append(user)
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

    def _run(self, unit: Unit, commands: Sequence[Command], known: dict[str, CommandRecord]) -> list[Receipt]:
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
        self.app.counters.add("batches")
        for _ in range(self.max_attempts):
            unit = Unit(self.app, self.reader, now, self.policy)
            unit.prefetch([], ids)
            for user_id in ids:
                unit.sweep(user_id)
            # Releases and expirations; the threshold crossings they cause
            # (recorded by ``pending``) are not counted.
            count = sum(len(a.pending_events) for a in unit.accounts.values())
            if count == 0:
                return 0
            self.app.counters.add("attempts")
            objs = unit.pending()
            try:
                self.app.save_all(objs)
            except IntegrityError:
                self.app.counters.add("clashes")
                self.app.refresh(account_id_for(u) for u in unit.accounts)
                continue
            return count
        self.app.counters.add("exhausted")
        raise ConcurrencyExhausted(self.max_attempts)


def _in_cache(app: LedgerApplication) -> Callable[[UUID], bool]:
    """Whether an aggregate is in the command cache (a batch's bulk read skips it)."""
    cache = app.repository.cache
    if cache is None:
        return lambda _: False

    def cached(aggregate_id: UUID) -> bool:
        try:
            cache.get(aggregate_id)
        except KeyError:
            return False
        return True

    return cached


class _Failed(Exception):
    def __init__(self, index: int, command: Command, cause: LedgerError) -> None:
        self.index = index
        self.command = command
        self.cause = cause
