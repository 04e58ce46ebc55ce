"""Where the read models live, and the one transaction that writes a page of
view rows together with the projector's tracking position.

The tracking position is kept by an eventsourcing tracking recorder (its
table, its monotonic ``insert_tracking``): a page whose position is not past the
recorded one fails with ``IntegrityError`` and rolls back with its rows, so a
page can never be applied twice.
"""

from __future__ import annotations

import contextlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol
from uuid import UUID

from eventsourcing.persistence import DataError, IntegrityError, PersistenceError, Tracking, TrackingRecorder

from ledger.errors import ConfigurationError, ViewsCorrupt
from ledger.storage.ddl import SCHEMA_VERSION, SCHEMA_VERSION_TABLE, Table

#: The name the projector tracks its position under.
TRACKED_APPLICATION = "ledger"


class ViewTx(ABC):
    """A transaction on the view tables. SQL uses ``%s`` placeholders on every
    backend; UUIDs and datetimes are adapted per backend."""

    @abstractmethod
    def execute(self, statement: str, params: Sequence[Any] = ()) -> None: ...

    @abstractmethod
    def executemany(self, statement: str, rows: Sequence[Sequence[Any]]) -> None: ...

    @abstractmethod
    def fetchall(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def insert_rows(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Plain inserts of many rows (no conflict handling)."""
        marks = ", ".join(["%s"] * len(columns))
        self.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)

    def upsert_rows(self, table: str, columns: Sequence[str], key: str, rows: Sequence[Sequence[Any]]) -> None:
        """Inserts each row, or sets every other column of the row whose
        ``key`` column (one of ``columns``, unique among ``rows``) matches."""
        marks = ", ".join(["%s"] * len(columns))
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != key)
        self.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) ON CONFLICT ({key}) DO UPDATE SET {updates}",
            rows,
        )

    def update_rows(
        self,
        table: str,
        columns: Sequence[str],
        key: str,
        rows: Sequence[Sequence[Any]],
        *,
        where: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """For each row (the values of ``columns``, then the ``key`` value,
        unique among ``rows``): sets those columns of the row with that key,
        if its ``where`` columns hold the given values."""
        sets = ", ".join(f"{c} = %s" for c in columns)
        conditions = "".join(f" AND {c} = %s" for c, _ in where)
        extra = [v for _, v in where]
        self.executemany(f"UPDATE {table} SET {sets} WHERE {key} = %s{conditions}", [[*row, *extra] for row in rows])

    @abstractmethod
    def track(self, position: int) -> None:
        """Records the projector's new position in this same transaction."""

    def where_in(self, column: str, values: Sequence[Any], *, negate: bool = False) -> tuple[str, list[Any]]:
        """A condition that ``column`` is (``negate``: is not) one of
        ``values`` (at least one), and its parameters. Here an ``IN`` list of
        placeholders; a backend with arrays binds one array instead, whose
        statement is parsed once whatever the number of values."""
        assert values, "an IN list needs at least one value"
        return f"{column} {'NOT IN' if negate else 'IN'} ({', '.join(['%s'] * len(values))})", list(values)


class Lease(Protocol):
    """What shows other processes that a rebuild's aside store is in use."""

    def release(self) -> None: ...


class ViewStore(ABC):
    """A database holding view tables and the projector's tracking row."""

    backend: str
    tracking: TrackingRecorder
    #: Held by a rebuild's aside store until it is dropped.
    lease: Lease | None = None

    @abstractmethod
    def transaction(self) -> AbstractContextManager[ViewTx]: ...

    def statements(self) -> AbstractContextManager[ViewTx]:
        """Statements that each commit on their own, for tables written one
        statement at a time (a provider's inbox): on a server that saves the
        round trips of BEGIN and COMMIT. Table names must then be ``qualified``."""
        return self.transaction()

    def qualified(self, table: str) -> str:
        """The table's name as a statement outside ``transaction`` must spell it."""
        return table

    @abstractmethod
    def migrate(self, tables: Sequence[Table], *, user_foreign_keys: bool = False) -> int:
        """Creates ``tables`` (the owners' DDL, in creation order) and the
        schema-version table where missing, with their indexes and triggers,
        records :data:`SCHEMA_VERSION`; returns it."""

    @abstractmethod
    def table_names(self) -> set[str]:
        """The names of the tables this store holds (in its schema)."""

    def refuse_seed_shaped(self, tables: Sequence[Table]) -> None:
        """Raises ``ConfigurationError`` naming every table of ``tables`` that
        exists without the columns its guard selects (created by the host from
        the seed): the script's guard would stop at the first with only
        "column ... does not exist", which names neither the table nor the way
        out."""
        present = self.table_names()
        lacking = []
        for table in tables:
            if table.guard and table.name in present:
                columns = set(self.columns(table.name))
                missing = [c for c in table.guard if c not in columns]
                if missing:
                    lacking.append(f"{self.qualified(table.name)} lacks {', '.join(missing)}")
        if lacking:
            raise ConfigurationError(
                f"tables already exist without the ledger's columns ({'; '.join(lacking)}), "
                "created from the seed: add the columns by hand (docs/schema.md, "
                '"A table the host created from the seed"), '
                "or give the ledger a schema of its own; the script was not run"
            )

    def ensure_schema(self, tables: Sequence[Table]) -> None:
        """Applies the DDL only when this schema version is not recorded yet
        or one of ``tables`` is missing (a view added since, or a table
        dropped): re-running it takes table locks (triggers are re-created)
        that would contend with a running projector."""
        try:
            with self.transaction() as tx:
                recorded = tx.fetchall("SELECT 1 FROM ledger_schema_version WHERE version = %s", [SCHEMA_VERSION])
        except PersistenceError:  # the version table does not exist yet
            recorded = []
        if not recorded or not {t.name for t in tables} | {SCHEMA_VERSION_TABLE.name} <= self.table_names():
            self.migrate(tables)

    @abstractmethod
    def rows(self, table: str, order_by: str) -> Iterator[tuple[Any, ...]]:
        """Streams a table's rows in a stable order, values normalised."""

    @abstractmethod
    def columns(self, table: str) -> list[str]: ...

    @contextlib.contextmanager
    def indexes_built_after(self, tables: Sequence[str]) -> Iterator[None]:
        """For a rebuild into fresh tables: inside, the secondary indexes of
        ``tables`` (neither unique nor a key's) are dropped; when the block
        ends without error they are built again, once, over all the rows,
        which costs less than keeping them up to date row by row. Here (a
        backend without the need) nothing is dropped."""
        yield

    def raw_rows(self, table: str) -> Iterator[tuple[Any, ...]]:
        """Streams a table's rows as stored, in no particular order (for a copy)."""
        raise NotImplementedError(f"{type(self).__name__} copies rows on the server")

    @abstractmethod
    def close(self) -> None: ...

    # -- reads outside the projector's transactions (the audit's) -----------------
    # SQL uses ``%s`` placeholders; ids and times are compared in the form the
    # store returns them (``stored_id``, ``stored_time``).

    @abstractmethod
    def read(self, statement: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """The rows of one read-only statement, as plain tuples."""

    @abstractmethod
    def stream(self, statement: str, params: Sequence[Any], *, page_rows: int) -> Iterator[tuple[Any, ...]]:
        """The rows of one read-only statement, fetched ``page_rows`` at a
        time and held open between pages (bounded memory)."""

    def read_by_ids(self, select_where_id: str, ids: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Rows whose id is one of ``ids`` (as ``stored_id`` gives them);
        ``select_where_id`` ends with the id column to match."""
        return self.read(f"{select_where_id} IN ({', '.join(['%s'] * len(ids))})", ids)

    @abstractmethod
    def stored_id(self, value: UUID) -> Any:
        """An id as the store takes and returns it."""

    @abstractmethod
    def stored_time(self, value: datetime) -> Any:
        """A time as the store returns it (UTC, naive)."""

    def id_key(self, value: Any) -> Any:
        """A stored id as the cheapest key to hash it by."""
        return value

    def cannot_write(self, exc: BaseException) -> bool:
        """Whether ``exc`` says that the events' data cannot be written (a value
        the database refuses, a state that does not decode), rather than that the
        database is unreachable, busy or unprepared (a missing table, no rights),
        which a later attempt may not meet."""
        if isinstance(exc, PersistenceError) and exc.__cause__ is not None:
            exc = exc.__cause__  # eventsourcing's wrapper of the driver's error
        driver = self._driver_says_data(exc)
        if driver is not None:
            return driver
        if isinstance(exc, DataError | IntegrityError):
            return True
        if isinstance(exc, PersistenceError | OSError | MemoryError):
            return False
        return isinstance(exc, Exception)

    def _driver_says_data(self, exc: BaseException) -> bool | None:
        """The driver's own verdict on ``exc`` (``cannot_write``), or None when it is not the driver's error."""
        return None

    def position(self) -> int:
        """The tracking position; ViewsCorrupt when what is stored there is not
        a whole number (SQLite keeps text or a fraction an outside write put in)."""
        recorded: object = self.tracking.max_tracking_id(TRACKED_APPLICATION)
        if recorded is None:
            return 0
        if type(recorded) is not int:
            table = getattr(self.tracking, "tracking_table_name", "tracking")
            raise ViewsCorrupt(str(table), recorded)
        return recorded

    def wait(self, position: int | None, timeout_s: float) -> None:
        """Blocks until the views include ``position``; TimeoutError after ``timeout_s``."""
        self.position()  # a corrupt position is named (ViewsCorrupt), not a TypeError
        self.tracking.wait(TRACKED_APPLICATION, position, timeout=timeout_s)


#: Attempts at creating the views' tracking table (see create_tracking_table).
TRACKING_TABLE_ATTEMPTS = 6


def create_tracking_table(tracking: TrackingRecorder) -> None:
    """eventsourcing's tracking table, created where missing. Several
    processes opening the views of a new store at once race in it (a
    duplicate key in PostgreSQL's catalog for the concurrent ``CREATE TABLE
    IF NOT EXISTS``, its migration row inserted twice, SQLite's write lock
    taken by another): the loser's next attempt finds the table the winner
    made, with its migration row, and creates nothing."""
    for attempt in range(TRACKING_TABLE_ATTEMPTS):
        try:
            tracking.create_table()  # type: ignore[attr-defined]
            return
        except PersistenceError:
            if attempt == TRACKING_TABLE_ATTEMPTS - 1:
                raise
            time.sleep(0.02 * 2**attempt)


def tracking_for(position: int) -> Tracking:
    return Tracking(TRACKED_APPLICATION, position)


def naive_utc(value: datetime) -> datetime:
    """The seed's columns are TIMESTAMP (no zone): they hold UTC."""
    return value.astimezone(UTC).replace(tzinfo=None)


def normalise(value: Any) -> Any:
    """One representation per value across backends, for checksums and diffs."""
    if isinstance(value, datetime):
        return (value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value).isoformat(sep=" ")
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, memoryview | bytes):
        return bytes(value).hex()
    if isinstance(value, dict):  # jsonb on PostgreSQL, JSON text on SQLite
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, str) and value[:1] == "{" and value[-1:] == "}":
        try:
            return json.dumps(json.loads(value), sort_keys=True, default=str)
        except ValueError:
            return value
    if isinstance(value, Decimal):
        return str(value)
    return value
