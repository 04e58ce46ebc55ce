"""The ledger's read models: opening their store, keeping them current,
rebuilding them from the event log."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
from eventsourcing.postgres import PostgresDatastore
from psycopg import sql

from ._app import LedgerApplication
from ._errors import ConfigurationError
from ._postgres import apply_connect_options
from ._projector import Progress, Projector, checksum, differences
from ._storage import StoreConfig
from ._views import CreditView, View
from ._views_billing import SubscriptionView
from ._viewstore import TRACKED_APPLICATION, ViewStore
from ._viewstore_postgres import TRACKING_TABLE, PostgresViewStore
from ._viewstore_sqlite import SQLiteViewStore

#: Events per transaction when rebuilding: nobody reads the tables aside, so
#: larger pages trade nothing for fewer round trips.
REBUILD_PAGE_EVENTS = 5_000


def default_views(*, sync_user_credits: bool = False, sync_user_tier: bool = False) -> list[View]:
    return [CreditView(sync_user_credits=sync_user_credits), SubscriptionView(sync_user_tier=sync_user_tier)]


def views_path(config: StoreConfig) -> str:
    """The SQLite file holding the views: beside the event store's file."""
    assert config.sqlite_path is not None
    path = config.sqlite_path
    return str(path.with_name(f"{path.stem}.views{path.suffix or '.sqlite3'}"))


def open_view_store(config: StoreConfig, app: LedgerApplication, *, aside: bool = False) -> ViewStore:
    """The live view store, or with ``aside`` a fresh, empty one to rebuild into."""
    if config.backend == "postgresql":
        if not aside:
            return PostgresViewStore(app.recorder.datastore)  # type: ignore[attr-defined]
        # A fresh name per rebuild: two rebuilds at once do not clobber each other.
        schema = f"{config.pg_schema[:40]}_rebuild_{uuid4().hex[:12]}"
        with psycopg.connect(config.conninfo(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        datastore = PostgresDatastore(
            dbname=config.pg_dbname,
            host=config.pg_host,
            port=str(config.pg_port),
            user=config.pg_user,
            password=config.pg_password,
            schema=schema,
            pool_size=2,
            max_overflow=2,
        )
        apply_connect_options(datastore, dict(config.pg_options))
        return PostgresViewStore(datastore, owns_datastore=True)
    if config.backend == "sqlite":
        path = views_path(config)
        if aside:
            path = f"{path}.rebuild"
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path + suffix)
        return SQLiteViewStore(path)
    return SQLiteViewStore(f"file:ledger-views-{id(app)}-{'aside' if aside else 'live'}?mode=memory&cache=shared")


def drop_aside(config: StoreConfig, store: ViewStore) -> None:
    store.close()
    if config.backend == "postgresql" and isinstance(store, PostgresViewStore):
        with psycopg.connect(config.conninfo(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(store.schema)))
    elif config.backend == "sqlite" and isinstance(store, SQLiteViewStore):
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(store.path + suffix)


class Views:
    """The read models of one ledger."""

    def __init__(
        self,
        app: LedgerApplication,
        config: StoreConfig,
        *,
        sync_user_credits: bool = False,
        sync_user_tier: bool = False,
    ) -> None:
        self.app = app
        self.config = config
        self.store = open_view_store(config, app)
        self.store.ensure_schema()
        views = default_views(sync_user_credits=sync_user_credits, sync_user_tier=sync_user_tier)
        self.projector = Projector(app, self.store, views)

    def catch_up(self, progress: Callable[[Progress], None] | None = None) -> int:
        """Projects every event recorded so far, in this process."""
        return self.projector.catch_up(progress=progress)

    def position(self) -> int:
        return self.store.position()

    def lag(self) -> int:
        return self.projector.lag()

    def wait(self, position: int, timeout_s: float = 10.0) -> None:
        """Waits until a projector (this process's or another's) has projected ``position``."""
        self.store.wait(position, timeout_s)

    def tables(self) -> Iterator[tuple[str, str, tuple[str, ...]]]:
        for view in self.projector.views:
            for table, (order_by, skip) in view.tables.items():
                yield table, order_by, skip

    def checksums(self, store: ViewStore | None = None) -> dict[str, tuple[int, str]]:
        target = store or self.store
        return {table: checksum(target, table, order_by, skip) for table, order_by, skip in self.tables()}

    def build_aside(self, progress: Callable[[Progress], None] | None = None, *, until: int | None = None) -> ViewStore:
        """Replays the whole log into fresh tables beside the live ones."""
        aside = open_view_store(self.config, self.app, aside=True)
        aside.migrate()
        if isinstance(aside, PostgresViewStore):
            # Fresh planner statistics: without them (autovacuum off, a restore)
            # PostgreSQL reads large pages of the log by scanning the rest of it.
            recorder: Any = self.app.recorder
            with recorder.datastore.get_connection() as conn:
                conn.execute(
                    sql.SQL("ANALYZE {}.{}").format(
                        sql.Identifier(recorder.datastore.schema), sql.Identifier(recorder.events_table_name)
                    )
                )
        Projector(self.app, aside, default_views(sync_user_credits=False)).catch_up(
            progress=progress, until=until, page_events=REBUILD_PAGE_EVENTS
        )
        return aside

    def verify(self, aside: ViewStore, *, limit: int = 10_000) -> dict[str, list[tuple[str, tuple[Any, ...]]]]:
        return {
            table: differences(self.store, aside, table, order_by, skip, limit=limit)
            for table, order_by, skip in self.tables()
        }

    def swap_in(self, aside: ViewStore) -> None:
        """Replaces the live rows and position with the rebuilt ones, in one
        transaction: readers see the old tables or the new, never a mix."""
        tables = [t for t, _, _ in self.tables()]
        position = aside.position()
        with self.store.transaction() as tx:
            if isinstance(self.store, PostgresViewStore) and isinstance(aside, PostgresViewStore):
                _check_host_foreign_keys(tx, self.store.schema, tables)
                tx.execute("SET CONSTRAINTS ALL DEFERRED")
                tx.execute(f"LOCK TABLE {', '.join(tables)}, {TRACKING_TABLE} IN ACCESS EXCLUSIVE MODE")
                for table in reversed(tables):
                    tx.execute(f"DELETE FROM {table}")
                for table in tables:
                    tx.execute(f'INSERT INTO {table} SELECT * FROM "{aside.schema}".{table}')
                tracking = TRACKING_TABLE
            else:
                assert isinstance(aside, SQLiteViewStore)
                for table in reversed(tables):
                    tx.execute(f"DELETE FROM {table}")
                for table in tables:
                    _copy_rows(aside, table, tx)
                tracking = "tracking"
            tx.execute(f"DELETE FROM {tracking} WHERE application_name = %s", [TRACKED_APPLICATION])
            if position:
                tx.execute(
                    f"INSERT INTO {tracking} (application_name, notification_id) VALUES (%s, %s)",
                    [TRACKED_APPLICATION, position],
                )

    def close(self) -> None:
        if not isinstance(self.store, PostgresViewStore):  # PostgreSQL shares the ledger's pool
            self.store.close()


def _check_host_foreign_keys(tx: Any, schema: str, tables: list[str]) -> None:
    """The swap deletes and re-inserts the view rows in one transaction. A host
    table referencing them must defer its check to the commit and take no
    action on delete, or the swap would fail or, with ON DELETE CASCADE, delete
    the host's rows."""
    rows = tx.fetchall(
        "SELECT con.conname, src_ns.nspname || '.' || src.relname, dst.relname, con.condeferrable, con.confdeltype "
        "FROM pg_constraint con JOIN pg_class src ON src.oid = con.conrelid "
        "JOIN pg_namespace src_ns ON src_ns.oid = src.relnamespace "
        "JOIN pg_class dst ON dst.oid = con.confrelid JOIN pg_namespace n ON n.oid = dst.relnamespace "
        "WHERE con.contype = 'f' AND n.nspname = %s AND dst.relname = ANY(%s) "
        "AND NOT (src_ns.nspname = %s AND src.relname = ANY(%s))",
        [schema, tables, schema, tables],
    )
    unsafe = [
        f"{name} on {source} -> {target}"
        for name, source, target, deferrable, on_delete in rows
        if not deferrable or on_delete != "a"
    ]
    if unsafe:
        raise ConfigurationError(
            "cannot swap rebuilt views in: host foreign keys reference them and are not DEFERRABLE with "
            f"NO ACTION on delete: {', '.join(unsafe)}; alter them, or use rebuild --verify"
        )


def _copy_rows(source: SQLiteViewStore, table: str, tx: Any) -> None:
    columns = source.columns(table)
    insert = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})"
    with source.datastore.transaction(commit=False) as cursor:
        cursor.execute(f"SELECT * FROM {table}")
        while batch := cursor.sqlite_cursor.fetchmany(5_000):
            tx.executemany(insert, [tuple(row) for row in batch])


def sqlite_file(config: StoreConfig) -> Path | None:
    return config.sqlite_path
