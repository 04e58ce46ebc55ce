"""The notification outbox: the business events a host cares about, read
from the event log in order and handed to the host's consumer at its own pace.

The outbox needs no table of its own to be durable: a notification is an
event of the log, recorded in the same transaction as the change it reports
(a ``BalanceLow`` with the debit that crossed the threshold), so it exists
exactly once and forever. What the outbox keeps is each consumer's position
(``notification_consumers``: the log position of the last notification it
finished with), advanced like the projector's, in a transaction that first
checks that the position is still the one the batch was read from; and the
notifications a consumer gave up on (``notification_dead_letters``), written
in that same transaction. A crash between handling a notification and
advancing the position hands it over again: delivery is at least once, and a
host makes it exactly once by the notification's ``id``.

The payload schema (``Notification.payload``) is documented in
docs/notifications.md; its ``type`` values and ``data`` keys are stable.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID, uuid5

from ledger.domain.checks import check_text
from ledger.domain.credits import CreditAccount
from ledger.domain.subscriptions import Subscription
from ledger.errors import ConsumerBusy, InvalidArgument
from ledger.storage.base import Lease
from ledger.storage.ddl import Table
from ledger.storage.eventstore import LedgerApplication
from ledger.storage.viewstore import ViewStore, ViewTx

__all__ = [
    "DEAD_LETTERS",
    "NOTIFICATION_CONSUMERS",
    "NOTIFICATION_TYPES",
    "DeadLetter",
    "Notification",
    "Outbox",
    "OutboxMoved",
]

#: Notification ids: uuid5 of the event's aggregate id and version.
NOTIFICATION_NS = UUID("5b0f7f4e-8d0c-4c7e-9a53-0c2f1f6a7b20")
#: The payload's schema version (``payload()["schema"]``).
SCHEMA = 1
#: Notifications per read.
MAX_READ = 1_000
MAX_CONSUMER_NAME = 100
#: A consumer names at most this many notification types.
MAX_TYPE_NAMES = 100
#: Accounts and subscriptions whose user the outbox remembers.
_USERS_CACHED = 65_536

_SUBSCRIPTION_CHANGES: dict[str, str] = {
    Subscription.Started.TOPIC: "started",
    Subscription.Activated.TOPIC: "activated",
    Subscription.Renewed.TOPIC: "renewed",
    Subscription.PlanChanged.TOPIC: "plan_changed",
    Subscription.StatusChanged.TOPIC: "status_changed",
    Subscription.Cancelled.TOPIC: "cancelled",
    Subscription.Expired.TOPIC: "expired",
    Subscription.Synced.TOPIC: "synced",
    Subscription.Superseded.TOPIC: "superseded",
}

#: Every notification type and the topics it comes from.
NOTIFICATION_TYPES: dict[str, tuple[str, ...]] = {
    "credits.granted": (CreditAccount.Granted.TOPIC,),
    "hold.opened": (CreditAccount.Reserved.TOPIC,),
    "hold.settled": (CreditAccount.Settled.TOPIC,),
    "hold.released": (CreditAccount.Released.TOPIC,),
    "balance.low": (CreditAccount.BalanceLow.TOPIC,),
    "balance.depleted": (CreditAccount.BalanceDepleted.TOPIC,),
    "balance.recovered": (CreditAccount.BalanceRecovered.TOPIC,),
    "subscription.changed": tuple(_SUBSCRIPTION_CHANGES),
}
_TYPE_OF = {topic: kind for kind, topics in NOTIFICATION_TYPES.items() for topic in topics}
#: Read besides: they name the user of an account or subscription.
_LEARN = (CreditAccount.Opened.TOPIC,)


NOTIFICATION_CONSUMERS = Table(
    "notification_consumers",
    postgres="""
-- The outbox's consumers and their positions (ledger addition)
CREATE TABLE IF NOT EXISTS {S}.notification_consumers (
    name VARCHAR(100) PRIMARY KEY,
    position BIGINT NOT NULL DEFAULT 0,
    updated_at TIMESTAMP NOT NULL DEFAULT NOW()
);
""",
    sqlite="""
-- The outbox's consumers and their positions (ledger addition)
CREATE TABLE IF NOT EXISTS notification_consumers (
    name TEXT NOT NULL PRIMARY KEY,
    position INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL DEFAULT ({NOW})
);
""",
)

DEAD_LETTERS = Table(
    "notification_dead_letters",
    postgres="""
-- Notifications a consumer gave up on, until re-driven (ledger addition)
CREATE TABLE IF NOT EXISTS {S}.notification_dead_letters (
    consumer VARCHAR(100) NOT NULL,
    notification_id UUID NOT NULL,
    position BIGINT NOT NULL,
    type VARCHAR(50) NOT NULL,
    user_id UUID,
    attempts INT NOT NULL,
    last_error TEXT NOT NULL,
    status VARCHAR(20) NOT NULL DEFAULT 'dead',
    dead_at TIMESTAMP NOT NULL,
    redelivered_at TIMESTAMP,
    PRIMARY KEY (consumer, notification_id),
    CONSTRAINT chk_notification_dead_letters_status CHECK (status IN ('dead', 'redelivered'))
);
""",
    postgres_after="""
CREATE INDEX IF NOT EXISTS idx_notification_dead_letters_status
ON {S}.notification_dead_letters(consumer, status, position);
""",
    sqlite="""
-- Notifications a consumer gave up on, until re-driven (ledger addition)
CREATE TABLE IF NOT EXISTS notification_dead_letters (
    consumer TEXT NOT NULL,
    notification_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    type TEXT NOT NULL,
    user_id TEXT,
    attempts INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'dead',
    dead_at TEXT NOT NULL,
    redelivered_at TEXT,
    PRIMARY KEY (consumer, notification_id),
    CONSTRAINT chk_notification_dead_letters_status CHECK (status IN ('dead', 'redelivered'))
);
""",
    sqlite_after="""
CREATE INDEX IF NOT EXISTS idx_notification_dead_letters_status
ON notification_dead_letters(consumer, status, position);
""",
)


class OutboxMoved(Exception):
    """Another consumer of the same name advanced the position since this
    batch was read: the batch is not committed (read again from the new position)."""


@dataclass(frozen=True)
class Notification:
    """One notification: what the host receives (``payload()``, ``body()``)."""

    #: Stable across retries, re-drives, rebuilds and backends: the host's dedupe key.
    id: UUID
    type: str
    user_id: UUID | None
    occurred_at: datetime
    #: The event's position in the log: increasing, the delivery order.
    position: int
    data: dict[str, Any]

    def payload(self) -> dict[str, Any]:
        """The JSON object sent to the host (docs/notifications.md)."""
        return {
            "id": str(self.id),
            "type": self.type,
            "user_id": None if self.user_id is None else str(self.user_id),
            "occurred_at": _iso(self.occurred_at),
            "position": self.position,
            "schema": SCHEMA,
            "data": self.data,
        }

    def body(self) -> bytes:
        """The payload as compact JSON with sorted keys (UTF-8): the bytes that are signed."""
        return json.dumps(self.payload(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class DeadLetter:
    """A notification a consumer gave up on after its tries."""

    consumer: str
    notification_id: UUID
    position: int
    type: str
    user_id: UUID | None
    attempts: int
    last_error: str
    status: str
    dead_at: datetime
    redelivered_at: datetime | None


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, UUID | Decimal):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return value


def _account_data(event: Any) -> dict[str, Any]:
    if isinstance(event, CreditAccount.Granted):
        return {
            "entry_id": str(event.entry_id),
            "amount_credits": event.amount,
            "kind": event.kind,
            "description": event.description,
            "reference_type": event.reference_type,
            "reference_id": event.reference_id,
            "expires_at": None if event.expires_at is None else _iso(event.expires_at),
        }
    if isinstance(event, CreditAccount.Reserved):
        return {
            "reservation_id": str(event.reservation_id),
            "job_id": str(event.job_id),
            "amount_credits": event.amount,
            "expires_at": _iso(event.expires_at),
        }
    if isinstance(event, CreditAccount.Settled):
        return {
            "reservation_id": str(event.reservation_id),
            "entry_id": str(event.entry_id),
            "amount_credits": event.amount,
        }
    if isinstance(event, CreditAccount.Released):
        return {"reservation_id": str(event.reservation_id), "reason": event.reason}
    if isinstance(event, CreditAccount.BalanceLow | CreditAccount.BalanceRecovered):
        return {
            "threshold": event.threshold,
            "level_credits": event.level_credits,
            "available_credits": event.available_credits,
        }
    if isinstance(event, CreditAccount.BalanceDepleted):
        return {"threshold": "depleted", "level_credits": 0, "available_credits": event.available_credits}
    raise InvalidArgument(f"no notification for {type(event).__name__}")


_SKIPPED = {"originator_id", "originator_version", "timestamp"}


def _subscription_data(topic: str, event: Any) -> dict[str, Any]:
    details = {k: _json_value(v) for k, v in sorted(event.__dict__.items()) if k not in _SKIPPED}
    return {"subscription_id": str(event.originator_id), "change": _SUBSCRIPTION_CHANGES[topic], "details": details}


class Outbox:
    """One consumer's view of the outbox: the notifications after its
    position, and the transaction that moves the position past them."""

    def __init__(
        self,
        app: LedgerApplication,
        store: ViewStore,
        name: str = "default",
        *,
        types: Iterable[str] | None = None,
        leases: Callable[[str], Lease | None] | None = None,
    ) -> None:
        self.app = app
        self.store = store
        self._leases = leases
        self.name = check_text(name, "name", MAX_CONSUMER_NAME, required=True)
        chosen = list(NOTIFICATION_TYPES) if types is None else _type_names(types)
        unknown = sorted(set(chosen) - set(NOTIFICATION_TYPES))
        if unknown or not chosen:
            raise InvalidArgument(
                f"notification types must be some of {sorted(NOTIFICATION_TYPES)}, got {unknown or chosen}",
                param="types",
            )
        self.types = frozenset(chosen)
        self.topics = sorted({t for k in self.types for t in NOTIFICATION_TYPES[k]} | set(_LEARN))
        self._users: OrderedDict[UUID, UUID] = OrderedDict()
        self._lock = threading.Lock()

    # -- reading -------------------------------------------------------------------

    def head(self) -> int:
        """The log's last position."""
        return self.app.recorder.max_notification_id() or 0

    def position(self) -> int:
        """The position of the last notification this consumer finished with."""
        table = self.store.qualified("notification_consumers")
        rows = self.store.read(f"SELECT position FROM {table} WHERE name = %s", [self.name])
        return int(rows[0][0]) if rows else 0

    def lag(self) -> int:
        """Log positions between this consumer and the head (not all are notifications)."""
        return max(0, self.head() - self.position())

    def read(self, after: int, limit: int = 100) -> list[Notification]:
        """The notifications after log position ``after``, at most ``limit``, in order."""
        return self.scan(after, limit)[0]

    def scan(self, after: int, limit: int = 100) -> tuple[list[Notification], int]:
        """The notifications after ``after`` (at most ``limit``) and the log
        position the scan covered: the head when it found fewer than
        ``limit`` (no notification lies between the last one and the head),
        else the last one's position. A consumer done with them may move
        its position there."""
        if type(limit) is not int or not 1 <= limit <= MAX_READ:
            raise InvalidArgument(f"limit must be within 1..{MAX_READ}, got {limit!r}", param="limit")
        found: list[Notification] = []
        start = after + 1
        # The head is read first: writers commit in position order (the
        # projector relies on the same), so every event up to it is visible.
        head = self.head()
        while len(found) < limit and start <= head:
            page = self.app.recorder.select_notifications(start=start, limit=limit, stop=head, topics=self.topics)
            if not page:
                break
            for stored in page:
                notification = self._notification(stored.id, stored.topic, self.app.mapper.to_domain_event(stored))
                if notification is not None:
                    found.append(notification)
                    if len(found) == limit:
                        return found, notification.position
            start = page[-1].id + 1
        return found, max(head, after)

    def at(self, position: int) -> Notification | None:
        """The notification at a log position (None when the event there is not one)."""
        for n in self.read(position - 1, 1):
            return n if n.position == position else None
        return None

    def pending(self, limit: int = 100) -> list[Notification]:
        """The next notifications after this consumer's position."""
        return self.read(self.position(), limit)

    def _notification(self, position: int, topic: str, event: Any) -> Notification | None:
        if isinstance(event, CreditAccount.Opened):
            self._remember(event.originator_id, event.user_id)
            return None
        if isinstance(event, Subscription.Started):
            self._remember(event.originator_id, event.user_id)
        kind = _TYPE_OF.get(topic)
        if kind is None or kind not in self.types:
            return None
        data = _subscription_data(topic, event) if kind == "subscription.changed" else _account_data(event)
        return Notification(
            id=uuid5(NOTIFICATION_NS, f"{event.originator_id}:{event.originator_version}"),
            type=kind,
            user_id=self._user_of(event.originator_id),
            occurred_at=event.timestamp,
            position=position,
            data=data,
        )

    def _remember(self, aggregate_id: UUID, user_id: UUID) -> None:
        users = self._users
        users[aggregate_id] = user_id
        users.move_to_end(aggregate_id)
        if len(users) > _USERS_CACHED:
            users.popitem(last=False)

    def _user_of(self, aggregate_id: UUID) -> UUID | None:
        user = self._users.get(aggregate_id)
        if user is None:
            # The aggregate's first event names its user (an account's Opened,
            # a subscription's Started): one row, not the whole aggregate.
            first = self.app.recorder.select_events(aggregate_id, lte=1, limit=1)
            if first:
                user = getattr(self.app.mapper.to_domain_event(first[0]), "user_id", None)
            if user is not None:
                self._remember(aggregate_id, user)
        return user

    # -- one deliverer at a time ---------------------------------------------------

    def take_lease(self) -> Lease | None:
        """This consumer's delivery lease, held until released or the process
        ends; ``ConsumerBusy`` while another deliverer holds it. None when the
        outbox was made without leases (nothing to hold: the caller is the
        only deliverer it knows of)."""
        if self._leases is None:
            return None
        lease = self._leases(self.name)
        if lease is None:
            raise ConsumerBusy(self.name)
        return lease

    # -- advancing ------------------------------------------------------------------

    @contextmanager
    def advancing(self, expected: int, to: int) -> Iterator[ViewTx]:
        """A transaction that moves this consumer from ``expected`` to ``to``;
        what the caller writes in it (dead letters, the host's own rows in
        this store) commits with the move or not at all. OutboxMoved when the
        position is not ``expected`` any more."""
        if to < expected:
            raise InvalidArgument(f"a consumer's position only moves forward ({expected} to {to})", param="to")
        with self.store.transaction() as tx:
            if expected == 0:
                tx.execute(
                    "INSERT INTO notification_consumers (name, position) VALUES (%s, 0) ON CONFLICT (name) DO NOTHING",
                    [self.name],
                )
            moved = tx.fetchall(
                "UPDATE notification_consumers SET position = %s, updated_at = %s "
                "WHERE name = %s AND position = %s RETURNING position",
                [to, datetime.now(UTC), self.name, expected],
            )
            if not moved:
                raise OutboxMoved(f"consumer {self.name!r} is not at position {expected} any more")
            yield tx

    def commit(self, expected: int, to: int) -> None:
        """Moves the position from ``expected`` to ``to`` (OutboxMoved when it moved meanwhile)."""
        with self.advancing(expected, to):
            pass

    def consume(self, handler: Callable[[Notification], None], *, limit: int = 100) -> int:
        """Hands the next notifications to ``handler`` one by one, moving the
        position past each once ``handler`` returns; returns how many it
        handled. A handler that raises stops the batch before that
        notification, which comes again on the next call."""
        with self._lock:
            position = self.position()
            handled = 0
            found, through = self.scan(position, limit)
            for notification in found:
                handler(notification)
                self.commit(position, notification.position)
                position = notification.position
                handled += 1
            if through > position:
                self.commit(position, through)  # past the events that are not notifications
            return handled

    # -- dead letters ----------------------------------------------------------------

    def bury(self, tx: ViewTx, notification: Notification, *, attempts: int, error: str) -> None:
        """Records a notification this consumer gave up on (in ``tx``)."""
        tx.execute(
            "INSERT INTO notification_dead_letters (consumer, notification_id, position, type, user_id, attempts, "
            "last_error, status, dead_at) VALUES (%s, %s, %s, %s, %s, %s, %s, 'dead', %s) "
            "ON CONFLICT (consumer, notification_id) DO UPDATE SET attempts = excluded.attempts, "
            "last_error = excluded.last_error, status = 'dead', dead_at = excluded.dead_at, redelivered_at = NULL",
            [
                self.name,
                notification.id,
                notification.position,
                notification.type,
                notification.user_id,
                attempts,
                error[:2000],
                datetime.now(UTC),
            ],
        )

    def dead_letters(self, *, status: str = "dead", limit: int = 1_000, after: int | None = None) -> list[DeadLetter]:
        """This consumer's dead letters in log order (``status`` ``dead``, ``redelivered`` or ``all``),
        at most ``limit`` of them, from the first after log position ``after`` (to page on)."""
        if status not in ("dead", "redelivered", "all"):
            raise InvalidArgument(f"status must be dead, redelivered or all, got {status!r}", param="status")
        if type(limit) is not int or not 1 <= limit <= 10_000:
            raise InvalidArgument(f"limit must be within 1..10000, got {limit!r}", param="limit")
        if after is not None and type(after) is not int:
            raise InvalidArgument(f"after must be a log position, got {after!r}", param="after")
        where = "" if status == "all" else " AND status = %s"
        params: list[Any] = [self.name] if status == "all" else [self.name, status]
        if after is not None:
            where += " AND position > %s"
            params.append(after)
        table = self.store.qualified("notification_dead_letters")
        rows = self.store.read(
            "SELECT consumer, notification_id, position, type, user_id, attempts, last_error, status, dead_at, "
            f"redelivered_at FROM {table} WHERE consumer = %s{where} ORDER BY position LIMIT {limit}",
            params,
        )
        return [
            DeadLetter(
                consumer=r[0],
                notification_id=_uuid(r[1]),
                position=int(r[2]),
                type=r[3],
                user_id=None if r[4] is None else _uuid(r[4]),
                attempts=int(r[5]),
                last_error=r[6],
                status=r[7],
                dead_at=_time(r[8]),
                redelivered_at=None if r[9] is None else _time(r[9]),
            )
            for r in rows
        ]

    def all_dead_letters(self, *, status: str = "dead", page: int = 1_000) -> Iterator[DeadLetter]:
        """Every one of this consumer's dead letters in log order, read ``page`` at a time
        (``dead_letters`` alone stops at its ``limit``)."""
        after: int | None = None
        while letters := self.dead_letters(status=status, limit=page, after=after):
            yield from letters
            after = letters[-1].position

    def mark_redelivered(self, notification_id: UUID) -> None:
        with self.store.transaction() as tx:
            tx.execute(
                "UPDATE notification_dead_letters SET status = 'redelivered', redelivered_at = %s "
                "WHERE consumer = %s AND notification_id = %s",
                [datetime.now(UTC), self.name, notification_id],
            )

    def mark_dead_again(self, notification_id: UUID, *, attempts: int, error: str) -> None:
        with self.store.transaction() as tx:
            tx.execute(
                "UPDATE notification_dead_letters SET attempts = attempts + %s, last_error = %s, dead_at = %s "
                "WHERE consumer = %s AND notification_id = %s",
                [attempts, error[:2000], datetime.now(UTC), self.name, notification_id],
            )


def _uuid(value: Any) -> UUID:
    return value if isinstance(value, UUID) else UUID(str(value))


def _time(value: Any) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def outbox_tables() -> Sequence[Table]:
    return (NOTIFICATION_CONSUMERS, DEAD_LETTERS)


def _type_names(types: object) -> list[str]:
    """The ``types`` a consumer asked for, as a list of strings: a lone
    string, a non-iterable or anything but strings is refused (an
    ``InvalidArgument``, never a ``TypeError``), and at most 100 are read."""
    if isinstance(types, str | bytes) or not isinstance(types, Iterable):
        raise InvalidArgument(
            f"types must be an iterable of notification type names, not {type(types).__name__}", param="types"
        )
    chosen = list(itertools.islice(types, MAX_TYPE_NAMES + 1))
    if len(chosen) > MAX_TYPE_NAMES or not all(isinstance(name, str) for name in chosen):
        raise InvalidArgument(
            f"types must be at most {MAX_TYPE_NAMES} notification type names (strings)", param="types"
        )
    return chosen
