"""PostgreSQL recorder for the ledger's event store.

eventsourcing 9.5.6 inserts a save's events in psycopg's pipeline mode, as one
INSERT binding an array of composite rows. Two problems for the ledger:

- For a large batch (tens of megabytes of parameters) client and server were
  seen to wait on each other for ever in ``Pipeline.sync``.
- For a single command, the pipelined path cost 0.48 ms where a plain
  transaction costs 0.33 ms, and binding composite arrays is slow.

So this recorder runs the same statements (lock timeout, table lock, NOTIFY,
one INSERT of all rows, in one transaction) without the pipeline. A command's
save (at most ``VALUES_MAX_ROWS`` events, nothing else in the transaction) is
one message in one round trip: BEGIN, the three statements, an INSERT of the
rows as SQL literals (UUID and integer text, escaped topic, hex bytea) and
COMMIT. A batch sends BEGIN and the three statements, then binary COPY into a
staging table and one INSERT … SELECT, then COMMIT.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from collections.abc import Callable, Iterator, Sequence
from random import random
from time import monotonic, sleep
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing import persistence as es_persistence
from eventsourcing.persistence import (
    InterfaceError,
    InternalError,
    OperationalError,
    ProgrammingError,
    StoredEvent,
)
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore, PostgresFactory
from psycopg import sql
from psycopg.errors import LockNotAvailable
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row

#: Saves of up to this many events use a VALUES list instead of arrays: a
#: command's, and a group commit batch's (64 commands of about 3 events).
VALUES_MAX_ROWS = 256
#: Attempts at a save whose connection broke, and the wait between them
#: (eventsourcing's own recorders retry so: ``retry(..., 10, wait=0.2)``).
INSERT_ATTEMPTS = 10
INSERT_RETRY_WAIT_S = 0.2


def _literals_safe(conn: Any, stored_events: Sequence[StoredEvent]) -> bool:
    """Whether the one-round-trip save may write these rows as literals:
    ``'…'`` literals take backslashes literally on this connection (the
    default since PostgreSQL 9.1), the message is sent in UTF-8 as the
    connection expects, and every id is a UUID (its text needs no quoting)."""
    return (
        conn.info.parameter_status("standard_conforming_strings") == "on"
        and conn.info.encoding == "utf-8"
        and all(isinstance(e.originator_id, UUID) for e in stored_events)
    )


def _text_literal(text: str) -> str:
    if "\x00" in text:
        raise InternalError("an event topic holds a NUL character")
    return "'" + text.replace("'", "''") + "'"


def apply_connect_options(datastore: PostgresDatastore, options: dict[str, str]) -> None:
    """Adds libpq connection options (sslmode, sslrootcert, …) to the
    connections the datastore's pool opens. eventsourcing passes only host,
    port, dbname, user and password; the pool has not connected yet (it
    opens on first use), and it reads these keyword arguments on every
    connect."""
    kwargs = datastore.pool.kwargs
    assert isinstance(kwargs, dict)
    kwargs.update(options)


class LedgerPostgresFactory(PostgresFactory):
    """eventsourcing's PostgreSQL factory, with the ledger URL's libpq
    options (``LEDGER_PG_OPTIONS``, JSON) on its pool, set before any
    recorder connects."""

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        apply_connect_options(self.datastore, json.loads(self.env.get("LEDGER_PG_OPTIONS") or "{}"))


class PingWindow:
    """The pool's pre-ping, skipped for a connection handed out within the
    last ``window_s`` seconds (HikariCP's ``aliveBypassWindowMs``, 500 ms by
    default, is the same rule). A delivery or command checks a connection out
    four to six times in a few milliseconds; pinging each time cost a round
    trip each. A connection that died inside the window fails its statement,
    which eventsourcing's recorder methods retry on a fresh connection."""

    def __init__(self, window_s: float, ping: Callable[[Any], None], clock: Callable[[], float] = monotonic) -> None:
        if not 0 <= window_s <= 60:
            raise ValueError(f"a pre-ping window must be 0..60 s, got {window_s}")
        self.window_s = window_s
        self.ping = ping
        self.clock = clock
        self.pings = 0
        self._handed_out: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

    def __call__(self, conn: Any) -> None:
        now = self.clock()
        last = self._handed_out.get(conn)
        if last is None or now - last >= self.window_s:
            self.pings += 1
            self.ping(conn)  # raises for a dead connection: the pool replaces it
        self._handed_out[conn] = now


def install_ping_window(datastore: PostgresDatastore, window_s: float) -> PingWindow | None:
    """Replaces the pool's every-checkout pre-ping by ``PingWindow``. The
    pool takes its check only when built, so this sets the attribute it keeps
    it in; if a psycopg_pool release renames it, the pool keeps pinging every
    checkout (slower, never less safe)."""
    pool = datastore.pool
    ping = getattr(pool, "_check", None)
    if not datastore.pre_ping or window_s == 0 or ping is None:
        return None
    window = PingWindow(window_s, ping)
    pool._check = window
    return window


class LedgerPostgresRecorder(PostgresApplicationRecorder):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        table = sql.SQL("{}.{}").format(sql.Identifier(self.datastore.schema), sql.Identifier(self.events_table_name))
        self._table = table
        self._table_text = table.as_string(None)
        self._values_statements: dict[int, sql.Composed] = {}
        #: How long a save waits for a lock: the events table's, or an
        #: account's in a write session (``ledger.storage.postgres.writelocks``).
        self.lock_timeout_statement = (
            sql.SQL("SET LOCAL lock_timeout = '{}s'").format(sql.Literal(self.datastore.lock_timeout)).as_string(None)
        )
        #: The statements before the insert, inside its transaction.
        self._table_lock = sql.SQL("{}; LOCK TABLE {} IN EXCLUSIVE MODE; NOTIFY {}").format(
            sql.SQL(self.lock_timeout_statement), table, sql.Identifier(self.channel_name)
        )
        self._prelude = sql.SQL("BEGIN; {}").format(self._table_lock)
        self._prelude_text = self._prelude.as_string(None)
        self._table_lock_text = self._table_lock.as_string(None)
        #: Set by the backend: the transaction a write session locked an
        #: account in, for the save to commit (``ledger.storage.writelocks``).
        self.open_transaction: Callable[[], Any] = lambda: None
        # ON COMMIT DELETE ROWS: the staging rows vanish with the transaction.
        self._staging_ddl = sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS pingvas_ledger_staging (ordinal int4, originator_id uuid, "
            "originator_version int4, topic text, state bytea) ON COMMIT DELETE ROWS"
        )
        self._staging_copy = sql.SQL("COPY pingvas_ledger_staging FROM STDIN (FORMAT BINARY)")
        # ORDER BY the ordinal: notification ids follow the order of the save.
        self._insert_staged = sql.SQL(
            "INSERT INTO {} (originator_id, originator_version, topic, state) "
            "SELECT originator_id, originator_version, topic, state FROM pingvas_ledger_staging "
            "ORDER BY ordinal RETURNING notification_id"
        ).format(table)

    def _insert_in_one_round_trip(
        self, conn: Any, curs: Any, stored_events: Sequence[StoredEvent], *, begin: bool = True
    ) -> list[int]:
        """A command's save as one message: BEGIN (unless ``begin`` is False:
        a write session's transaction is open already), lock timeout, table
        lock, NOTIFY, INSERT … RETURNING and COMMIT, the rows as SQL literals.
        An error stops the message at the failing statement, leaving the
        transaction aborted: it is rolled back here."""
        rows = ", ".join(
            f"('{e.originator_id}'::uuid, {int(e.originator_version)}, {_text_literal(e.topic)}, "
            f"'\\x{e.state.hex()}'::bytea)"
            for e in stored_events
        )
        prelude = self._prelude_text if begin else self._table_lock_text
        query = (
            f"{prelude}; INSERT INTO {self._table_text} (originator_id, originator_version, topic, state) "
            f"VALUES {rows} RETURNING notification_id; COMMIT"
        )
        try:
            curs.execute(query.encode())
            while not (curs.statusmessage or "").startswith("INSERT"):
                if not curs.nextset():
                    raise InternalError("the events insert returned no result")
            ids = [row["notification_id"] for row in curs.fetchall()]
            curs.nextset()
            if curs.statusmessage != "COMMIT" or conn.info.transaction_status != TransactionStatus.IDLE:
                raise InternalError(f"the events insert did not commit ({curs.statusmessage})")
        except BaseException:
            if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
                with contextlib.suppress(psycopg.Error):  # never in place of the error being raised
                    conn.execute("ROLLBACK")
            raise
        if len(ids) != len(stored_events):
            raise InternalError(f"{len(stored_events)} events inserted, {len(ids)} notification ids returned")
        return ids

    def _insert_rows(self, curs: Any, stored_events: Sequence[StoredEvent]) -> None:
        if len(stored_events) <= VALUES_MAX_ROWS:
            # A few rows (one command's): scalar parameters bind far faster
            # than arrays (0.3 ms for a command's three rows as arrays).
            params: list[Any] = []
            for e in stored_events:
                params.extend((e.originator_id, e.originator_version, e.topic, e.state))
            curs.execute(self._insert_values(len(stored_events)), params, binary=True)
            return
        # A batch: binary COPY into a per-session staging table, then one
        # INSERT … SELECT. Binding 20,000 rows as arrays cost 0.4 s; this ~0.1 s.
        curs.execute(self._staging_ddl)
        with curs.copy(self._staging_copy) as copy:
            copy.set_types(["int4", "uuid", "int4", "text", "bytea"])
            for ordinal, e in enumerate(stored_events):
                copy.write_row((ordinal, e.originator_id, e.originator_version, e.topic, e.state))
        curs.execute(self._insert_staged)

    def _fetch_ids_after_insert_events(
        self, curs: Any, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        """eventsourcing's, with the ids read as tuples rather than through
        the connection's dict rows: a dict per event, 20,000 for a batch."""
        assert curs.statusmessage and curs.statusmessage.startswith("INSERT"), curs.statusmessage
        row_factory = curs.row_factory
        curs.row_factory = tuple_row
        try:
            return [row[0] for row in curs.fetchall()]
        except psycopg.ProgrammingError as exc:
            raise ProgrammingError(f"Couldn't get all notification IDs (got 0, expected {len(stored_events)})") from exc
        finally:
            curs.row_factory = row_factory

    def _insert_values(self, rows: int) -> sql.Composed:
        statement: sql.Composed | None = self._values_statements.get(rows)
        if statement is None:
            values = sql.SQL(", ").join([sql.SQL("(%s, %s, %s, %s)")] * rows)
            statement = sql.SQL(
                "INSERT INTO {} (originator_id, originator_version, topic, state) VALUES {} RETURNING notification_id"
            ).format(self._table, values)
            self._values_statements[rows] = statement
        return statement

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        result: Sequence[int] | None = self._insert(stored_events, **kwargs)
        return result

    def _insert(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        """``_insert_once``, retried (as eventsourcing's ``retry`` decorator
        on its recorders does: 10 attempts, 0.2 s apart) on a broken
        connection, but not on a lock timeout: a save that waited
        ``lock_timeout`` for the events table is raised at once, rather than
        after ten such waits (100 s)."""
        for attempt in range(1, INSERT_ATTEMPTS + 1):
            try:
                return self._insert_once(stored_events, **kwargs)
            # eventsourcing's connection context turns psycopg's errors into
            # its own classes (the psycopg error is the __cause__).
            except (InterfaceError, OperationalError) as exc:
                if attempt == INSERT_ATTEMPTS or isinstance(exc.__cause__, LockNotAvailable):
                    raise
            sleep(INSERT_RETRY_WAIT_S * (1 + 0.1 * (random() - 0.5)))
        raise AssertionError("unreachable")  # pragma: no cover

    def _insert_once(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        if not stored_events:
            return []
        locked = self.open_transaction()
        if locked is not None:
            # A write session's transaction, which holds an account's lock: the
            # save commits in it (releasing the lock). psycopg's errors are
            # raised as eventsourcing's, as the datastore's checkout raises them.
            with translated_errors():
                return self._insert_on(locked, stored_events, begin=False, **kwargs)
        # The pool's connections are in autocommit mode; the transaction is
        # opened by the prelude's BEGIN and closed here, by COMMIT or ROLLBACK.
        with self.datastore.get_connection() as conn:
            assert conn.autocommit
            return self._insert_on(conn, stored_events, begin=True, **kwargs)

    def _insert_on(
        self, conn: Any, stored_events: Sequence[StoredEvent], *, begin: bool, **kwargs: Any
    ) -> Sequence[int] | None:
        """The save on ``conn``: in a transaction of its own (``begin``) or in
        the one open on it."""
        with conn.cursor() as curs:
            # Nothing else to write in the transaction (no tracking record).
            plain = not any(value is not None for value in kwargs.values())
            if len(stored_events) <= VALUES_MAX_ROWS and plain and _literals_safe(conn, stored_events):
                return self._insert_in_one_round_trip(conn, curs, stored_events, begin=begin)
            try:
                curs.execute(self._prelude if begin else self._table_lock)
                # The lock must be held until COMMIT, or notification ids could
                # be committed out of order: insert only inside the transaction.
                if conn.info.transaction_status != TransactionStatus.INTRANS:
                    raise InternalError("the events insert is not inside the locked transaction")
                self._insert_events(curs, stored_events, **kwargs)  # subclasses' hook (tracking)
                self._insert_rows(curs, stored_events)
                ids: Sequence[int] | None = self._fetch_ids_after_insert_events(curs, stored_events, **kwargs)
                curs.execute("COMMIT")
            except BaseException:
                if not conn.closed:
                    with contextlib.suppress(psycopg.Error):  # never in place of the error being raised
                        conn.execute("ROLLBACK")
                raise
            return ids


#: psycopg's error classes and eventsourcing's, most specific first (as
#: eventsourcing's ``PostgresDatastore.get_connection`` maps them).
_ERRORS: tuple[tuple[type[psycopg.Error], type[Exception]], ...] = (
    (psycopg.InterfaceError, InterfaceError),
    (psycopg.OperationalError, OperationalError),
    (psycopg.DataError, es_persistence.DataError),
    (psycopg.IntegrityError, es_persistence.IntegrityError),
    (psycopg.InternalError, InternalError),
    (psycopg.ProgrammingError, es_persistence.ProgrammingError),
    (psycopg.NotSupportedError, es_persistence.NotSupportedError),
    (psycopg.DatabaseError, es_persistence.DatabaseError),
    (psycopg.Error, es_persistence.PersistenceError),
)


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """Raises psycopg's errors as eventsourcing's classes, the psycopg error
    as the cause: code above the recorder catches eventsourcing's."""
    try:
        yield
    except psycopg.Error as exc:
        for theirs, ours in _ERRORS:
            if isinstance(exc, theirs):
                raise ours(str(exc)) from exc
        raise  # pragma: no cover  (psycopg.Error is the last entry)
