"""View tables in a PostgreSQL schema."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from ledger.errors import ConfigurationError
from ledger.storage.ddl import SCHEMA_VERSION, Table, render_postgres
from ledger.storage.viewstore import ViewStore, ViewTx, create_tracking_table, naive_utc, normalise, tracking_for

TRACKING_TABLE = "ledger_views_tracking"
ROWS_PAGE = 5_000
#: From this many rows a page's inserts go through COPY.
COPY_MIN_ROWS = 50
MIGRATE_LOCK_KEY = 0x70696E6777


@functools.lru_cache(maxsize=64)
def _qualified(schema: str, table: str) -> str:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table)).as_string(None)


@functools.lru_cache(maxsize=64)
def _set_local(schema: str) -> str:
    """What a view transaction sets first: its schema, and UTC for NOW()."""
    return (
        sql.SQL("SET LOCAL search_path TO {}; SET LOCAL TIME ZONE 'UTC'").format(sql.Identifier(schema)).as_string(None)
    )


def _adapt(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo:
        return naive_utc(value)
    if isinstance(value, dict):
        return Jsonb(value)
    return value


#: Values psycopg takes as they are (most of a row's): not passed to ``_adapt``.
_AS_THEY_ARE = frozenset({int, str, UUID, bool, type(None), Decimal})


def _adapted(row: Sequence[Any]) -> list[Any]:
    """A row's values as the view tables take them. A rebuild copies millions
    of values; a call of ``_adapt`` for each was a tenth of its time."""
    return [v if type(v) in _AS_THEY_ARE else _adapt(v) for v in row]


class PostgresViewTx(ViewTx):
    def __init__(self, curs: Any, tracking: PostgresTrackingRecorder) -> None:
        self.curs = curs
        self.tracking = tracking
        self._staged = 0  # staging tables made in this transaction

    def execute(self, statement: str, params: Sequence[Any] = ()) -> None:
        self.curs.execute(statement, _adapted(params))

    def executemany(self, statement: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self.curs.executemany(statement, [_adapted(row) for row in rows])

    def insert_rows(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if len(rows) < COPY_MIN_ROWS:
            super().insert_rows(table, columns, rows)
            return
        # COPY: a rebuild writes hundreds of thousands of rows; row-by-row
        # INSERTs spent most of the rebuild binding parameters.
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
        )
        with self.curs.copy(statement) as copy:
            for row in rows:
                copy.write_row(_adapted(row))

    def upsert_rows(self, table: str, columns: Sequence[str], key: str, rows: Sequence[Sequence[Any]]) -> None:
        if not self._stageable(rows, columns.index(key)):
            super().upsert_rows(table, columns, key, rows)
            return
        # COPY into a staging table, then one statement: a page's thousand
        # upserts as statements spent a quarter of a rebuild binding them.
        stage = self._stage(table, columns, rows)
        names = ", ".join(columns)
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != key)
        self.curs.execute(
            f"INSERT INTO {table} ({names}) SELECT {names} FROM {stage} ON CONFLICT ({key}) DO UPDATE SET {updates}"
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
        if not self._stageable(rows, len(columns)):
            super().update_rows(table, columns, key, rows, where=where)
            return
        stage = self._stage(table, [*columns, key], rows)
        sets = ", ".join(f"{c} = s.{c}" for c in columns)
        conditions = "".join(f" AND t.{c} = %s" for c, _ in where)
        self.curs.execute(
            f"UPDATE {table} AS t SET {sets} FROM {stage} AS s WHERE t.{key} = s.{key}{conditions}",
            _adapted([v for _, v in where]),
        )

    def _stageable(self, rows: Sequence[Sequence[Any]], key_at: int) -> bool:
        """Whether rows go through a staging table: enough of them, inside a
        transaction (the table is dropped at its end), with unique keys (one
        statement may not change a row twice)."""
        return (
            len(rows) >= COPY_MIN_ROWS
            and self.curs.connection.info.transaction_status == TransactionStatus.INTRANS
            and len({row[key_at] for row in rows}) == len(rows)
        )

    def _stage(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
        """A temporary table with ``columns`` of ``table`` (their types, no
        constraints), dropped at commit, holding ``rows``."""
        self._staged += 1
        stage = f"pingvas_stage_{self._staged}"
        names = ", ".join(columns)
        self.curs.execute(f"CREATE TEMP TABLE {stage} ON COMMIT DROP AS SELECT {names} FROM {table} WITH NO DATA")
        with self.curs.copy(f"COPY {stage} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(_adapted(row))
        return stage

    def where_in(self, column: str, values: Sequence[Any], *, negate: bool = False) -> tuple[str, list[Any]]:
        # One array parameter: a page's IN list of 5,000 placeholders cost
        # psycopg 11 ms to parse, three times a page, in a rebuild.
        assert values, "an IN list needs at least one value"
        return f"{'NOT ' if negate else ''}{column} = ANY(%s)", [list(values)]

    def fetchall(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        # Tuples straight from the driver, in the same transaction: the
        # datastore's cursors build a dict per row, which a rebuild's pages
        # turned back into tuples by the thousand.
        with self.curs.connection.cursor(row_factory=tuple_row) as curs:
            curs.execute(statement, _adapted(params))
            rows: list[tuple[Any, ...]] = curs.fetchall()
            return rows

    def track(self, position: int) -> None:
        self.tracking._insert_tracking(self.curs, tracking_for(position))


class PostgresViewStore(ViewStore):
    backend = "postgresql"

    def __init__(self, datastore: PostgresDatastore, *, owns_datastore: bool = False) -> None:
        self.datastore = datastore
        self.schema = datastore.schema
        self.owns_datastore = owns_datastore
        self.tracking: PostgresTrackingRecorder = PostgresTrackingRecorder(
            datastore=datastore, tracking_table_name=TRACKING_TABLE
        )
        create_tracking_table(self.tracking)

    @contextmanager
    def transaction(self) -> Iterator[ViewTx]:
        with self.datastore.transaction(commit=True) as curs:
            # TimeZone too: the update_updated_at trigger's NOW() is converted
            # with it, and the tables hold UTC whatever the role's zone. One
            # round trip (no parameters: both statements in one execute).
            curs.execute(_set_local(self.schema))
            yield PostgresViewTx(curs, self.tracking)

    @contextmanager
    def statements(self) -> Iterator[ViewTx]:
        # eventsourcing's pool hands out autocommit connections: each statement
        # is its own transaction, with no search_path set.
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            if not conn.autocommit:
                raise RuntimeError("single statements need an autocommit connection")
            yield PostgresViewTx(curs, self.tracking)

    def qualified(self, table: str) -> str:
        return _qualified(self.schema, table)

    def migrate(self, tables: Sequence[Table], *, user_foreign_keys: bool = False) -> int:
        self.refuse_seed_shaped(tables)
        with self.datastore.transaction(commit=True) as curs:
            # Concurrent CREATE … IF NOT EXISTS in two sessions can collide: one at a time.
            curs.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATE_LOCK_KEY])
            curs.execute("SET LOCAL TIME ZONE 'UTC'")  # the catalog rows' DEFAULT NOW()
            if user_foreign_keys:
                curs.execute("SELECT to_regclass(%s) IS NOT NULL AS present", [_qualified(self.schema, "users")])
                row = curs.fetchone()
                if not (row and row["present"]):
                    raise ConfigurationError(
                        f"user_foreign_keys: the host's table {self.schema}.users does not exist; "
                        "create it first, or migrate without the foreign keys"
                    )
            curs.execute(render_postgres(tables, self.schema, user_foreign_keys=user_foreign_keys))
            curs.execute(
                sql.SQL(
                    "INSERT INTO {}.ledger_schema_version (version, applied_at) VALUES (%s, now() AT TIME ZONE 'UTC') "
                    "ON CONFLICT (version) DO NOTHING"
                ).format(sql.Identifier(self.schema)),
                [SCHEMA_VERSION],
            )
        return SCHEMA_VERSION

    @contextmanager
    def indexes_built_after(self, tables: Sequence[str]) -> Iterator[None]:
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(
                "SELECT n.nspname AS schema, c.relname AS name, pg_get_indexdef(x.indexrelid) AS definition "
                "FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid "
                "JOIN pg_class t ON t.oid = x.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND t.relname = ANY(%s) AND NOT x.indisunique AND NOT x.indisprimary "
                "AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = x.indexrelid) "
                "ORDER BY c.relname",
                [self.schema, list(tables)],
            )
            deferred = [(r["schema"], r["name"], r["definition"]) for r in curs.fetchall()]
            for schema, name, _ in deferred:
                curs.execute(sql.SQL("DROP INDEX {}.{}").format(sql.Identifier(schema), sql.Identifier(name)))
        yield
        with self.datastore.transaction(commit=True) as curs:
            for _, _, definition in deferred:
                curs.execute(definition)

    def table_names(self) -> set[str]:
        with self.datastore.transaction(commit=False) as curs:
            curs.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", [self.schema])
            return {r["tablename"] for r in curs.fetchall()}

    def columns(self, table: str) -> list[str]:
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
                "ORDER BY ordinal_position",
                [self.schema, table],
            )
            return [r["column_name"] for r in curs.fetchall()]

    def rows(self, table: str, order_by: str) -> Iterator[tuple[Any, ...]]:
        # A server-side cursor streams the table in bounded memory.
        with self.datastore.get_connection() as conn, conn.transaction(), conn.cursor(name="ledger_rows") as curs:
            curs.itersize = ROWS_PAGE
            curs.execute(
                sql.SQL("SELECT * FROM {}.{} ORDER BY {}").format(
                    sql.Identifier(self.schema), sql.Identifier(table), sql.SQL(order_by)
                )
            )
            for row in curs:
                yield tuple(normalise(v) for v in row.values())

    def read(self, statement: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        # Plain tuples: the datastore's dict rows cost more than an audit's comparison.
        with self.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as cursor:
            cursor.execute(statement, params)
            rows: list[tuple[Any, ...]] = cursor.fetchall()
            return rows

    def stream(self, statement: str, params: Sequence[Any], *, page_rows: int) -> Iterator[tuple[Any, ...]]:
        # A server-side cursor: the server sends the rows a page at a time.
        with (
            self.datastore.get_connection() as conn,
            conn.transaction(),
            conn.cursor(name="ledger_read_rows", row_factory=tuple_row) as cursor,
        ):
            cursor.itersize = page_rows
            # The cursor stays open while the reader works between pages: the
            # ledger's sessions end transactions idle for 30 s, this one may be.
            conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
            cursor.execute(statement, params)
            yield from cursor

    def read_by_ids(self, select_where_id: str, ids: Sequence[Any]) -> list[tuple[Any, ...]]:
        # One array parameter: binding hundreds of scalars costs more than the look-up.
        return self.read(f"{select_where_id} = ANY(%s)", [list(ids)])

    def stored_id(self, value: UUID) -> Any:
        return value

    def stored_time(self, value: datetime) -> Any:
        return naive_utc(value)

    def id_key(self, value: Any) -> Any:
        return value.int  # a UUID hashes in Python; its int in C

    def _driver_says_data(self, exc: BaseException) -> bool | None:
        if isinstance(exc, psycopg.DataError | psycopg.IntegrityError):
            return True
        if isinstance(exc, psycopg.ProgrammingError) and exc.sqlstate is None:
            return True  # refused before reaching the server: a value psycopg cannot adapt
        if isinstance(exc, psycopg.Error):
            return False
        return None

    def close(self) -> None:
        if self.owns_datastore:
            self.datastore.close()
