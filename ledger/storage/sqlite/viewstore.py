"""View tables in a SQLite file beside the event store (or in memory)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from eventsourcing.persistence import OperationalError
from eventsourcing.sqlite import SQLiteCursor, SQLiteDatastore, SQLiteTrackingRecorder, SQLiteTransaction

from ledger.errors import ConfigurationError
from ledger.storage.ddl import SCHEMA_VERSION, Table, render_sqlite, sqlite_added_columns
from ledger.storage.viewstore import ViewStore, ViewTx, create_tracking_table, naive_utc, normalise, tracking_for


def _adapt(value: Any) -> Any:
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return (naive_utc(value) if value.tzinfo else value).isoformat(sep=" ")
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, Decimal):
        return str(value)
    return value


class SQLiteViewTx(ViewTx):
    def __init__(self, cursor: Any, tracking: SQLiteTrackingRecorder) -> None:
        self.cursor = cursor
        self.tracking = tracking

    def execute(self, statement: str, params: Sequence[Any] = ()) -> None:
        self.cursor.execute(statement.replace("%s", "?"), [_adapt(p) for p in params])

    def executemany(self, statement: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self.cursor.executemany(statement.replace("%s", "?"), [[_adapt(v) for v in row] for row in rows])

    def fetchall(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self.cursor.execute(statement.replace("%s", "?"), [_adapt(p) for p in params])
        return [tuple(row) for row in self.cursor.fetchall()]

    def track(self, position: int) -> None:
        self.tracking._insert_tracking(self.cursor, tracking_for(position))


class SQLiteViewStore(ViewStore):
    backend = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self.datastore = SQLiteDatastore(db_name=path, lock_timeout=30, single_row_tracking=True)
        self.tracking: SQLiteTrackingRecorder = SQLiteTrackingRecorder(datastore=self.datastore)
        create_tracking_table(self.tracking)

    @contextmanager
    def transaction(self) -> Iterator[ViewTx]:
        # BEGIN IMMEDIATE: the write lock is taken first, waiting up to the
        # lock timeout. With a plain BEGIN a page reads the tracking row, then
        # fails at once ("database is locked", the snapshot is stale) if another
        # process committed a page in between, and never waits.
        with self.datastore.get_connection(commit=True) as conn, _Immediate(conn, commit=True) as cursor, cursor:
            yield SQLiteViewTx(cursor, self.tracking)

    def migrate(self, tables: Sequence[Table], *, user_foreign_keys: bool = False) -> int:
        if user_foreign_keys:
            # Refused, not ignored (as `schema --dialect sqlite` refuses it).
            raise ConfigurationError(
                "user_foreign_keys: PostgreSQL only; the SQLite read models are in a file of their own, "
                "apart from the host's users table"
            )
        self.refuse_seed_shaped(tables)
        with self.datastore.transaction(commit=True) as cursor:
            for statement in _statements(render_sqlite(tables)):
                cursor.execute(statement)

            def columns(table: str) -> list[str]:
                cursor.execute(f"PRAGMA table_info({table})")
                return [row[1] for row in cursor.fetchall()]

            for statement in sqlite_added_columns(tables, columns):
                cursor.execute(statement)
            cursor.execute(
                "INSERT OR IGNORE INTO ledger_schema_version (version, applied_at) VALUES (?, datetime('now'))",
                [SCHEMA_VERSION],
            )
        return SCHEMA_VERSION

    def table_names(self) -> set[str]:
        with self.datastore.transaction(commit=False) as cursor:
            cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            return {row[0] for row in cursor.fetchall()}

    def columns(self, table: str) -> list[str]:
        with self.datastore.transaction(commit=False) as cursor:
            cursor.execute(f"PRAGMA table_info({table})")
            return [row[1] for row in cursor.fetchall()]

    def rows(self, table: str, order_by: str) -> Iterator[tuple[Any, ...]]:
        with self.datastore.transaction(commit=False) as cursor:
            cursor.execute(f"SELECT * FROM {table} ORDER BY {order_by}")
            while batch := cursor.sqlite_cursor.fetchmany(5_000):
                for row in batch:
                    yield tuple(normalise(v) for v in row)

    def raw_rows(self, table: str) -> Iterator[tuple[Any, ...]]:
        with self.datastore.transaction(commit=False) as cursor:
            cursor.execute(f"SELECT * FROM {table}")
            while batch := cursor.sqlite_cursor.fetchmany(5_000):
                yield from (tuple(row) for row in batch)

    def read(self, statement: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self.datastore.transaction(commit=False) as cursor:
            cursor.sqlite_cursor.execute(statement.replace("%s", "?"), [_adapt(p) for p in params])
            return [tuple(row) for row in cursor.sqlite_cursor.fetchall()]

    def stream(self, statement: str, params: Sequence[Any], *, page_rows: int) -> Iterator[tuple[Any, ...]]:
        # A read-only transaction: readers share the store (an in-memory store
        # lets a writer in only when no reader is), so a stream and the
        # look-ups beside it never wait on each other.
        with self.datastore.transaction(commit=False) as cursor:
            raw = cursor.sqlite_cursor
            raw.execute(statement.replace("%s", "?"), [_adapt(p) for p in params])
            while rows := raw.fetchmany(page_rows):
                yield from (tuple(row) for row in rows)

    def stored_id(self, value: UUID) -> Any:
        return str(value)

    def stored_time(self, value: datetime) -> Any:
        return naive_utc(value).isoformat(sep=" ")  # as _adapt writes it

    def _driver_says_data(self, exc: BaseException) -> bool | None:
        if isinstance(exc, sqlite3.DataError | sqlite3.IntegrityError | sqlite3.ProgrammingError):
            return True  # SQLite's ProgrammingError: a value it cannot bind
        if isinstance(exc, sqlite3.Error):
            return False
        return None

    def close(self) -> None:
        self.datastore.close()


class _Immediate(SQLiteTransaction):
    """eventsourcing's SQLite transaction (which wraps driver errors in its
    own), begun with BEGIN IMMEDIATE."""

    def __enter__(self) -> SQLiteCursor:
        cursor = self.connection.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            cursor.sqlite_cursor.close()
            raise OperationalError(exc) from exc
        return cursor


def _statements(script: str) -> list[str]:
    """Splits a DDL script into statements; trigger bodies keep their semicolons."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return statements
