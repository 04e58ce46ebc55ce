"""The ``webhook_events`` table as a payment provider's inbox (one ``source``
per provider: the seed's ``webhook_events.source``).

A delivery is stored before anything else happens, so nothing is lost if
processing fails or the process dies: a row is ``received`` until processed,
then ``processed`` or ``failed`` (with ``error_message`` and ``attempts``).
Redeliveries are recognised by the table's unique indexes, on
``(source, event_id)`` (the ``meta.webhook_id``) and on ``(source,
payload_sha256)`` (the raw body), also when two copies arrive at once: the
insert does nothing on a conflict, and the row that won is read back.

Durability on PostgreSQL. The ledger's event insert holds a table lock until
its commit is on disk, so writers queue behind WAL flushes; a synchronous
commit of the inbox row as well would make each of them wait for up to two.
So the row is committed asynchronously, and the delivery is answered 200 only
after a synchronous commit that follows it (a flush writes all of the WAL
before it): the ledger's commit of the delivery's effects, or else the
synchronous commit of its outcome (``finish(flush=True)``), or, for a
duplicate of a row still ``received``, a commit made for that purpose.

SQL goes through the view store's transactions (``%s`` placeholders on both
backends): on PostgreSQL the ledger's schema, on SQLite the views file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

from ledger import ConfigurationError, Ledger
from ledger.extension import ViewTx

MAX_ERROR_MESSAGE = 2_000
#: Prefix of the error_message of a delivery held until something arrives.
HELD_PREFIX = "held: "
#: Prefix of the error_message of a delivery stored and deliberately not applied.
IGNORED_PREFIX = "ignored: "
#: Prefix of the error_message of a processed delivery with something to say.
NOTE_PREFIX = "note: "
#: Prefix of the error_message of a stored row refused for its seal.
REFUSED_PREFIX = "refused: "

_INSERT = (
    "INSERT INTO {t} (id, source, event_type, event_id, payload, status, payload_sha256, test_mode, "
    "attempts, created_at, seal) VALUES (%s, %s, %s, %s, %s, 'received', %s, %s, 0, %s, %s) ON CONFLICT DO NOTHING"
)
_FIND = (
    "SELECT id, status, FALSE FROM {t} WHERE source = %s AND (payload_sha256 = %s OR event_id = %s) "
    "ORDER BY created_at LIMIT 1"
)
# The insert, committed asynchronously (set_config, local to the
# transaction, read at commit; evaluated with the inserted row), or else the
# row it conflicted with. The insert first looks for a copy already committed
# (an index probe), so that a redelivery's body is not even parsed into jsonb;
# a copy committed meanwhile still meets the unique indexes. The second branch
# reads the statement's snapshot: a conflicting row committed by a concurrent
# transaction during the insert is not in it (then _FIND runs).
_PG_INSERT = (
    "INSERT INTO {t} (id, source, event_type, event_id, payload, status, payload_sha256, test_mode, "
    "attempts, created_at, seal) SELECT %s, %s, %s, %s, %s::jsonb, 'received', %s, %s, 0, %s, %s "
    "WHERE NOT EXISTS (SELECT 1 FROM {t} WHERE source = %s AND (payload_sha256 = %s OR event_id = %s)) "
    "ON CONFLICT DO NOTHING"
)
_PG_PUT = (
    "WITH sync_off AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)), "
    f"inserted AS ({_PG_INSERT} RETURNING id, status) "
    "SELECT id, status, TRUE FROM inserted, sync_off UNION ALL "
    "(SELECT id, status, FALSE FROM {t} WHERE source = %s AND (payload_sha256 = %s OR event_id = %s) "
    "AND NOT EXISTS (SELECT 1 FROM inserted) ORDER BY created_at LIMIT 1)"
)
_UPDATE = "UPDATE {t} SET status = %s, error_message = %s, processed_at = %s, attempts = attempts + %s WHERE id = %s"
# The outcome, committed synchronously or not (set_config, local to the
# transaction, read at commit; evaluated with the updated row), and the rows
# held for what it brought (read in the statement's snapshot: the updated row
# is left out).
_PG_FINISH = (
    "WITH commit_mode AS MATERIALIZED (SELECT set_config('synchronous_commit', %s, true)), "
    "updated AS ("
    + _UPDATE.replace("WHERE id = %s", "WHERE id = %s AND EXISTS (SELECT 1 FROM commit_mode)")
    + " RETURNING id) "
    "SELECT {columns} FROM {t} WHERE source = %s AND status = 'failed' AND ({clauses}) "
    "AND id NOT IN (SELECT id FROM updated) ORDER BY created_at, id LIMIT %s"
)
_COLUMNS = (
    "id, event_type, event_id, payload, status, error_message, attempts, test_mode, created_at, processed_at, seal"
)


@dataclass(frozen=True)
class Stored:
    row_id: UUID
    duplicate: bool
    status: str


@dataclass(frozen=True)
class InboxRow:
    row_id: UUID
    event_type: str
    event_id: str | None
    payload: dict[str, Any]
    status: str
    error_message: str | None
    attempts: int
    test_mode: bool
    created_at: Any
    processed_at: Any
    #: The provider's seal of the payload, stored at ingest (None in a row
    #: stored before schema version 4, or not by the pipeline).
    seal: str | None = None


def _row(values: Sequence[Any]) -> InboxRow:
    row_id, event_type, event_id, payload, status, error, attempts, test_mode, created, processed, seal = values
    return InboxRow(
        row_id=row_id if isinstance(row_id, UUID) else UUID(str(row_id)),
        event_type=event_type,
        event_id=event_id,
        payload=payload if isinstance(payload, dict) else json.loads(payload),
        status=status,
        error_message=error,
        attempts=int(attempts),
        test_mode=bool(test_mode),
        created_at=created,
        processed_at=processed,
        seal=seal,
    )


def clip(message: str) -> str:
    return message if len(message) <= MAX_ERROR_MESSAGE else message[: MAX_ERROR_MESSAGE - 1] + "…"


@dataclass(frozen=True)
class _Tx:
    """A transaction on webhook_events, and the table's name in it."""

    tx: ViewTx
    table: str
    postgres: bool


class Inbox:
    """Stores deliveries and records what became of them."""

    def __init__(self, ledger: Ledger, source: str) -> None:
        if not isinstance(source, str) or not 1 <= len(source) <= 50 or not source.replace("_", "").isalnum():
            raise ConfigurationError(
                f"an inbox source is 1..50 letters, digits and _ (seed VARCHAR(50)), got {source!r}"
            )
        self.ledger = ledger
        self.source = source
        # Opens the view store (and creates webhook_events) now, in one
        # thread: Ledger.views is created lazily, and not safely by several
        # request threads at once.
        ledger.views  # noqa: B018

    def put(
        self,
        *,
        event_type: str,
        event_id: str | None,
        payload: dict[str, Any],
        payload_sha256: str,
        test_mode: bool,
        now: datetime,
        payload_text: str | None = None,
        seal: str | None = None,
    ) -> Stored:
        """Stores a delivery once, before it is processed. A duplicate (same
        webhook id or same body) returns the row already there, on disk.
        ``payload_text``, the body as received, is stored as it is on
        PostgreSQL (jsonb parses it there) instead of ``payload`` encoded again.
        ``seal``: the provider's seal of the payload (see ``Pipeline``)."""
        row_id = uuid4()
        values = [row_id, self.source, event_type, event_id, payload, payload_sha256, test_mode, now, seal]
        with self._transaction() as t:
            if t.postgres:
                # One round trip for the common cases: inserted, or a
                # duplicate committed before this statement began.
                text = payload_text if payload_text is not None else json.dumps(payload)
                key = [self.source, payload_sha256, event_id]
                params = [
                    *(row_id, self.source, event_type, event_id, text, payload_sha256, test_mode, now, seal),
                    *key,
                    *key,
                ]
                found = t.tx.fetchall(_PG_PUT.format(t=t.table), params)
            else:
                found = t.tx.fetchall(_INSERT.format(t=t.table) + " RETURNING id, status, TRUE", values)
            if not found:
                # A new statement sees the row a concurrent transaction
                # committed while the insert waited on it (PostgreSQL), or the
                # duplicate (SQLite).
                found = t.tx.fetchall(_FIND.format(t=t.table), [self.source, payload_sha256, event_id])
            if t.postgres and found and not found[0][2] and found[0][1] == "received":
                # The first copy may still be in flight, its row not yet on
                # disk. An id makes this statement's commit a write, and
                # synchronous: it flushes the WAL up to here, that row's
                # commit included.
                t.tx.execute("SELECT pg_current_xact_id()")
        if not found:  # the conflicting row is gone (deleted by hand): never in normal operation
            raise RuntimeError("webhook_events refused the delivery as a duplicate but holds no such row")
        existing, status, inserted = found[0]
        return Stored(existing if isinstance(existing, UUID) else UUID(str(existing)), not inserted, status)

    def finish(
        self,
        row_id: UUID,
        *,
        status: str,
        message: str | None,
        now: datetime,
        attempted: bool = True,
        flush: bool = False,
        then_held: Sequence[str] = (),
        held_limit: int = 25,
    ) -> list[InboxRow]:
        """Records a processing outcome (``processed`` sets ``processed_at``)
        and, in the same transaction, reads the deliveries held for
        ``then_held`` (see ``held``).

        On PostgreSQL this commit waits for the disk only with ``flush``
        (when nothing since the delivery was stored has): an outcome lost in
        a crash leaves the row ``received``, and ``webhooks retry`` runs it
        again, which changes nothing twice."""
        values = [
            status,
            None if message is None else clip(message),
            now if status == "processed" else None,
            1 if attempted else 0,
            row_id,
        ]
        with self._transaction() as t:
            if not t.postgres:
                t.tx.execute(_UPDATE.format(t=t.table), values)
                return self._held(t, then_held, held_limit) if then_held else []
            # One round trip: the commit mode, the update, the held rows.
            held = then_held or ["-"]  # "held: -:%" matches nothing
            rows = t.tx.fetchall(
                _PG_FINISH.format(
                    t=t.table, columns=_COLUMNS, clauses=" OR ".join(["error_message LIKE %s"] * len(held))
                ),
                [
                    "on" if flush else "off",
                    *values,
                    self.source,
                    *(f"{HELD_PREFIX}{w}:%" for w in held),
                    held_limit,
                ],
            )
            return [_row(r) for r in rows]

    @contextmanager
    def _transaction(self) -> Iterator[_Tx]:
        """Statements on webhook_events. On PostgreSQL each statement is its
        own transaction: every PostgreSQL path here is single statements, and
        BEGIN and COMMIT would be two more round trips each. On SQLite, one
        transaction on the view store."""
        store = self.ledger.views.store
        if store.backend == "postgresql":
            with store.statements() as tx:
                yield _Tx(tx, store.qualified("webhook_events"), postgres=True)
        else:
            with store.transaction() as tx:
                yield _Tx(tx, "webhook_events", postgres=False)

    def durable(self, row_id: UUID) -> bool:
        """Whether the row is stored for good. On PostgreSQL the insert was
        committed asynchronously: a statement that takes a transaction id
        commits synchronously, which flushes the WAL up to it, that insert
        included, and the row is read in the same statement."""
        with self._transaction() as t:
            if t.postgres:
                found = t.tx.fetchall(f"SELECT pg_current_xact_id(), id FROM {t.table} WHERE id = %s", [row_id])
            else:
                found = t.tx.fetchall(f"SELECT id FROM {t.table} WHERE id = %s", [row_id])
        return bool(found)

    def get(self, row_id: UUID) -> InboxRow | None:
        with self._transaction() as t:
            rows = t.tx.fetchall(f"SELECT {_COLUMNS} FROM {t.table} WHERE id = %s", [row_id])
        return _row(rows[0]) if rows else None

    def due(self, *, test_mode: bool, stale_before: datetime, limit: int) -> list[InboxRow]:
        """Failed deliveries, and deliveries left ``received`` by a process
        that stopped before recording an outcome (created before
        ``stale_before``): the ``limit`` tried the fewest times, oldest first
        among equals. Every attempt adds one to ``attempts``, so deliveries
        that keep failing make way for the others: run after run, every due
        delivery is reached, however many fail for good."""
        with self._transaction() as t:
            rows = t.tx.fetchall(
                f"SELECT {_COLUMNS} FROM {t.table} WHERE source = %s AND test_mode = %s AND "
                "(status = 'failed' OR (status = 'received' AND error_message IS NULL AND created_at < %s)) "
                "ORDER BY attempts, created_at, id LIMIT %s",
                [self.source, test_mode, stale_before, limit],
            )
        return [_row(r) for r in rows]

    def held(self, waits_for: Sequence[str], *, limit: int) -> list[InboxRow]:
        """Deliveries held until one of ``waits_for`` (``subscription 123``) arrived."""
        if not waits_for:
            return []
        with self._transaction() as t:
            return self._held(t, waits_for, limit)

    def _held(self, t: _Tx, waits_for: Sequence[str], limit: int) -> list[InboxRow]:
        clauses = " OR ".join(["error_message LIKE %s"] * len(waits_for))
        rows = t.tx.fetchall(
            f"SELECT {_COLUMNS} FROM {t.table} WHERE source = %s AND status = 'failed' AND ({clauses}) "
            "ORDER BY created_at, id LIMIT %s",
            [self.source, *(f"{HELD_PREFIX}{w}:%" for w in waits_for), limit],
        )
        return [_row(r) for r in rows]

    def listing(self, *, status: str | None, limit: int) -> list[InboxRow]:
        where = "source = %s" + (" AND status = %s" if status else "")
        params: list[Any] = [self.source, status] if status else [self.source]
        with self._transaction() as t:
            rows = t.tx.fetchall(
                f"SELECT {_COLUMNS} FROM {t.table} WHERE {where} ORDER BY created_at DESC, id LIMIT %s",
                [*params, limit],
            )
        return [_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._transaction() as t:
            rows = t.tx.fetchall(
                f"SELECT status, COUNT(*) FROM {t.table} WHERE source = %s GROUP BY status ORDER BY status",
                [self.source],
            )
        return {str(status): int(count) for status, count in rows}
