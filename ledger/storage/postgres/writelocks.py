"""Write locks on PostgreSQL (``ledger.storage.writelocks``): a
transaction-scoped advisory lock per account, taken in the transaction that
then saves the command's events.

A session pins one pooled connection to its thread from its first locked read
(or the locks an attempt takes first) to its end, so the thread's other reads
and its save run on that connection, inside the transaction that holds the
lock (and one thread never holds two of the pool's connections, which could
exhaust it). The lock is released by the
save's COMMIT, or by the ROLLBACK that ends a session whose command failed.

The lock's key is the account id hashed with the events table's schema and
name, so that ledgers in other schemas of the same database, and other
programs' advisory locks, do not share it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.persistence import InterfaceError, InternalError, OperationalError, StoredEvent
from psycopg.errors import UniqueViolation
from psycopg.pq import TransactionStatus

from ledger.storage.postgres.recorder import translated_errors
from ledger.storage.writelocks import MAX_LOCKED_FIRST, WriteLocks

log = logging.getLogger("ledger.storage")

_CLASHED_KEY = re.compile(r"\(originator_id, originator_version\)=\(([0-9a-fA-F-]{36}), -?\d+\)")


def _usable(conn: Any) -> bool:
    """Whether a pinned connection can run the session's next statement (not
    lost, not in a failed transaction): otherwise the pool serves the thread."""
    return conn is not None and not conn.closed and conn.info.transaction_status != TransactionStatus.INERROR


class _Session:
    """One write session: its pinned connection, once a read locked an account."""

    def __init__(self) -> None:
        self.conn: Any = None
        #: The account whose lock the open transaction holds, until the save takes it.
        self.locked: UUID | None = None
        #: Whether the session has locked an account or given up on it: it locks no other.
        self.tried = False
        self._checkout = contextlib.ExitStack()

    def pin(self, checkout: contextlib.AbstractContextManager[Any]) -> Any:
        self.conn = self._checkout.enter_context(checkout)
        return self.conn

    def release(self) -> None:
        """Rolls back what the session left open (a failed or unsaved command,
        a lock given up) and returns its connection to the pool."""
        try:
            conn = self.conn
            if conn is not None and not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
                # A failure here must not hide the command's own outcome: the
                # pool rolls back (or discards) a connection returned mid-transaction.
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
        finally:
            self.conn = None
            self.locked = None
            self._checkout.close()


class PostgresWriteLocks(WriteLocks):
    def __init__(self, recorder: Any) -> None:
        super().__init__(recorder)
        self._local = threading.local()
        datastore = recorder.datastore
        table = f"{datastore.schema}.{recorder.events_table_name}"
        self._namespace = hashlib.blake2b(table.encode(), digest_size=16).digest()
        #: The wait for an account's lock: as for the events table's.
        self._lock_timeout: str = recorder.lock_timeout_statement
        self._events_table: str = recorder._table_text
        # The two hooks: the datastore's checkout serves a session's pinned
        # connection, and the recorder's save commits in its transaction.
        self._pool_checkout: Callable[[], contextlib.AbstractContextManager[Any]] = datastore.get_connection
        datastore.get_connection = self._get_connection
        recorder.open_transaction = self.open_transaction

    def _session(self) -> _Session | None:
        session: _Session | None = getattr(self._local, "session", None)
        return session

    @contextlib.contextmanager
    def _get_connection(self) -> Iterator[Any]:
        """The datastore's checkout, except that a thread whose session has
        pinned a connection gets that one (inside its transaction)."""
        session = self._session()
        if session is not None and session.conn is not None:
            if _usable(session.conn):
                with translated_errors():
                    yield session.conn
                return
            # Lost, or its transaction failed: the lock went with it. Let go
            # of the connection too, so the thread never holds two.
            session.release()
        with self._pool_checkout() as conn:
            yield conn

    @contextlib.contextmanager
    def session(self, *, first: Sequence[UUID] = ()) -> Iterator[None]:
        if self._session() is not None:  # nested (a command run inside another's attempt): the outer one locks
            yield
            return
        session = _Session()
        try:
            self._local.session = session
            if first:
                self._lock_first(session, first)
            yield
        finally:
            self._local.session = None
            session.release()

    def _lock_first(self, session: _Session, aggregate_ids: Sequence[UUID]) -> None:
        """Opens the session's transaction and locks these aggregates before
        anything is read, in the order of their keys (see the module's text
        for why no two sessions then wait for each other). Locks nothing, and
        the attempt goes on optimistic, if the connection or the wait fails,
        as a locked read does."""
        assert 0 < len(aggregate_ids) <= MAX_LOCKED_FIRST, len(aggregate_ids)
        session.tried = True
        try:
            self._open_locked(session, aggregate_ids)
        except (InterfaceError, OperationalError) as exc:
            log.warning("%d aggregates not locked before an attempt: %s", len(aggregate_ids), exc)
            session.release()
            return
        session.locked = aggregate_ids[0]

    def clashed_on(self, error: BaseException) -> UUID | None:
        """The aggregate named by the unique violation that refused a save
        (PostgreSQL's detail: ``Key (originator_id, originator_version)=(…, 5)
        already exists.``)."""
        cause: BaseException | None = error
        for _ in range(8):  # eventsourcing's error, then psycopg's (bounded: causes can loop)
            if cause is None:
                return None
            if isinstance(cause, UniqueViolation):
                found = _CLASHED_KEY.search(cause.diag.message_detail or "")
                return UUID(found.group(1)) if found else None
            cause = cause.__cause__ or cause.__context__
        return None

    def lock_key(self, aggregate_id: UUID) -> int:
        """A signed 64-bit advisory lock key for the aggregate in this events table."""
        digest = hashlib.blake2b(aggregate_id.bytes, digest_size=8, key=self._namespace).digest()
        return int.from_bytes(digest, "big", signed=True)

    def events_after(self, aggregate_id: UUID, version: int, *, lock: bool) -> list[StoredEvent]:
        session = self._session()
        if not lock or session is None or session.tried:
            return super().events_after(aggregate_id, version, lock=lock)
        assert type(version) is int and version >= 0
        session.tried = True
        try:
            rows = self._locked_read(session, aggregate_id, version)
        except (InterfaceError, OperationalError) as exc:
            # A pooled connection that died (a restart, a failover), or a lock
            # not granted within lock_timeout: the command goes on without the
            # lock, as it did before there were locks. The read is retried on
            # a fresh connection like every other read, and the save is still
            # checked by the store (a clash runs the command again).
            log.warning("account %s read without its write lock: %s", aggregate_id, exc)
            session.release()
            return super().events_after(aggregate_id, version, lock=lock)
        session.locked = aggregate_id
        return [
            StoredEvent(
                originator_id=r["originator_id"],
                originator_version=r["originator_version"],
                topic=r["topic"],
                state=bytes(r["state"]),
            )
            for r in rows
        ]

    def _locked_read(self, session: _Session, aggregate_id: UUID, version: int) -> list[Any]:
        """Opens the session's transaction, takes the account's lock and reads
        its events after ``version``: one message, on the pinned connection."""
        # UUID text and an int need no quoting.
        read = (
            f"SELECT originator_id, originator_version, topic, state FROM {self._events_table} "
            f"WHERE originator_id = '{aggregate_id}'::uuid AND originator_version > {version} "
            "ORDER BY originator_version"
        )
        return self._open_locked(session, [aggregate_id], then=read)

    def _open_locked(self, session: _Session, aggregate_ids: Sequence[UUID], *, then: str = "") -> list[Any]:
        """Opens the session's transaction on its pinned connection, takes the
        aggregates' locks in the order of their keys, then runs ``then`` (a
        read): one message. Returns the rows of ``then``."""
        conn = session.conn if session.conn is not None else session.pin(self._pool_checkout())
        if conn.info.transaction_status != TransactionStatus.IDLE:
            raise InternalError("a write session's connection is already inside a transaction")
        keys = sorted({self.lock_key(i) for i in aggregate_ids})
        statements = [self._lock_timeout, *(f"SELECT pg_advisory_xact_lock({key})" for key in keys)]
        if then:
            statements.append(then)
        with translated_errors(), conn.cursor() as curs:
            curs.execute(f"BEGIN; {'; '.join(statements)}".encode())
            while curs.nextset():
                pass
            return list(curs.fetchall()) if then else []

    def open_transaction(self) -> Any:
        """The connection of this thread's session, if it holds a lock: the
        save commits on it (which releases the lock). Handed out once: a
        retried save runs on a fresh connection, unlocked and still checked."""
        session = self._session()
        if session is None or session.locked is None or session.conn is None:
            return None
        conn = session.conn
        session.locked = None
        if conn.closed or conn.info.transaction_status != TransactionStatus.INTRANS:
            return None
        return conn
