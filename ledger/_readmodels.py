"""The ledger's read models: opening their store, keeping them current,
rebuilding them from the event log."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
from eventsourcing.postgres import PostgresDatastore
from psycopg import sql

from ._app import LedgerApplication
from ._errors import ConfigurationError
from ._projector import Progress, Projector, checksum, differences
from ._storage import StoreConfig
from ._views import CreditView, View
from ._views_billing import SubscriptionView
from ._viewstore import TRACKED_APPLICATION, ViewStore
from ._viewstore_postgres import TRACKING_TABLE, PostgresViewStore
from ._viewstore_sqlite import SQLiteViewStore

log = logging.getLogger("ledger.rebuild")

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


#: The part of a rebuild's aside schema or file name after the live one's.
REBUILD_MARK = "_rebuild_"
#: A SQLite rebuild's lease file older than this with no aside beside it is removed.
ORPHAN_LEASE_AGE_S = 3_600
_REBUILD_TOKEN = re.compile(r"[0-9a-f]{12}")


def open_view_store(config: StoreConfig, app: LedgerApplication, *, aside: bool = False) -> ViewStore:
    """The live view store, or with ``aside`` a fresh, empty one to rebuild into.

    An aside store holds a lease while it exists (a PostgreSQL advisory lock,
    an exclusive lock on a SQLite file beside it), which the operating system
    or the server releases when the process ends, however it ends: a later
    rebuild drops an aside whose lease it can take, and never one in use."""
    if config.backend == "postgresql":
        if not aside:
            return PostgresViewStore(app.recorder.datastore)  # type: ignore[attr-defined]
        # A fresh name per rebuild: two rebuilds at once do not clobber each other.
        schema = f"{config.pg_schema[:40]}{REBUILD_MARK}{uuid4().hex[:12]}"
        lease = _PostgresLease.take(config, schema)  # before the schema exists: see drop_leftover_rebuilds
        try:
            lease.conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
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
            store: ViewStore = PostgresViewStore(datastore, owns_datastore=True)
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                lease.conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            lease.release()
            raise
        store.lease = lease
        return store
    if config.backend == "sqlite":
        path = views_path(config)
        if not aside:
            return SQLiteViewStore(path)
        path = f"{path}{REBUILD_MARK}{uuid4().hex[:12]}"
        file_lease = _FileLease.take(f"{path}.lease")  # before the file exists: see drop_leftover_rebuilds
        try:
            store = SQLiteViewStore(path)
        except BaseException:
            _remove_sqlite_files(path)
            file_lease.release()
            raise
        store.lease = file_lease
        return store
    return SQLiteViewStore(f"file:ledger-views-{id(app)}-{'aside' if aside else 'live'}?mode=memory&cache=shared")


def drop_aside(config: StoreConfig, store: ViewStore) -> None:
    store.close()
    try:
        if config.backend == "postgresql" and isinstance(store, PostgresViewStore):
            _drop_schema(config, store.schema)
        elif config.backend == "sqlite" and isinstance(store, SQLiteViewStore):
            _remove_sqlite_files(store.path)
    finally:
        if store.lease is not None:
            store.lease.release()
            store.lease = None


def drop_leftover_rebuilds(config: StoreConfig) -> list[str]:
    """Drops the aside schemas (PostgreSQL) or files (SQLite) of rebuilds that
    are no longer running (killed, or their machine lost); returns their
    names. An aside whose rebuild is alive, in any process, is left alone:
    its lease is held, and this takes a lease before it drops anything. A
    rebuild takes its lease before it creates its aside, so an aside seen
    here without a holder is one nobody will write to again."""
    if config.backend == "postgresql":
        return _drop_leftover_schemas(config)
    if config.backend == "sqlite":
        return _drop_leftover_files(config)
    return []  # an in-memory aside ends with its process


def _rebuild_key(name: str) -> int:
    """A 64-bit advisory lock key for one aside schema (the lock space is the
    database's, the schema name is unique in it)."""
    digest = hashlib.sha256(f"pingvas-ledger rebuild {name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class _PostgresLease:
    """A session advisory lock on its own connection: the server releases it
    when the connection ends, also when the process is killed."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    @classmethod
    def take(cls, config: StoreConfig, schema: str) -> _PostgresLease:
        conn = psycopg.connect(config.conninfo(), autocommit=True)
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", [_rebuild_key(schema)])
        except BaseException:
            conn.close()
            raise
        return cls(conn)

    def release(self) -> None:
        self.conn.close()


class _FileLease:
    """An exclusive SQLite transaction on a small file of its own, held open:
    the operating system releases the file lock when the process ends."""

    def __init__(self, conn: sqlite3.Connection, path: str) -> None:
        self._conn = conn
        self.path = path

    @classmethod
    def take(cls, path: str, *, wait_s: float = 30.0) -> _FileLease:
        conn = sqlite3.connect(path, timeout=wait_s, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = OFF")  # nothing is written: no -journal file beside it
            conn.execute("BEGIN EXCLUSIVE")
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    @classmethod
    def try_take(cls, path: str) -> _FileLease | None:
        try:
            return cls.take(path, wait_s=0)
        except sqlite3.OperationalError:  # locked (its rebuild is running), or not ours to open
            return None

    def release(self) -> None:
        self._conn.close()
        _remove_sqlite_files(self.path)


def _drop_schema(config: StoreConfig, schema: str) -> None:
    with psycopg.connect(config.conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _drop_leftover_schemas(config: StoreConfig) -> list[str]:
    prefix = f"{config.pg_schema[:40]}{REBUILD_MARK}"
    dropped = []
    with psycopg.connect(config.conninfo(), autocommit=True) as conn:
        names = [
            name
            for (name,) in conn.execute(
                "SELECT nspname FROM pg_namespace WHERE left(nspname, %s) = %s ORDER BY nspname", [len(prefix), prefix]
            )
            if _REBUILD_TOKEN.fullmatch(name[len(prefix) :])
        ]
        for name in names:
            key = _rebuild_key(name)
            [(taken,)] = conn.execute("SELECT pg_try_advisory_lock(%s)", [key]).fetchall()
            if not taken:
                continue  # its rebuild is running
            try:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", [key])
            dropped.append(name)
    return dropped


def _remove_sqlite_files(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)


def _drop_leftover_files(config: StoreConfig) -> list[str]:
    base = Path(views_path(config))
    prefix = f"{base.name}{REBUILD_MARK}"
    dropped = []
    for entry in sorted(base.parent.glob(f"{glob.escape(prefix)}*")):
        token = entry.name[len(prefix) :]
        if _REBUILD_TOKEN.fullmatch(token):
            lease = _FileLease.try_take(f"{entry}.lease")
            if lease is None:
                continue  # its rebuild is running
            try:
                _remove_sqlite_files(str(entry))
            finally:
                lease.release()
            dropped.append(str(entry))
        elif token.endswith(".lease") and not (entry.parent / entry.name[: -len(".lease")]).exists():
            _drop_orphan_lease(entry)
    # Earlier versions rebuilt into one fixed file, removed at each start.
    legacy = f"{base}.rebuild"
    if os.path.exists(legacy):
        _remove_sqlite_files(legacy)
        dropped.append(legacy)
    return dropped


def _drop_orphan_lease(entry: Path) -> None:
    """A lease without its aside: the rebuild ended between the two (or a
    cleanup did). A rebuild locks its lease the moment it creates it, so an
    old one that can be taken is nobody's."""
    try:
        if time.time() - entry.stat().st_mtime < ORPHAN_LEASE_AGE_S:
            return
    except FileNotFoundError:
        return
    lease = _FileLease.try_take(str(entry))
    if lease is not None:
        lease.release()


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

    def catch_up(self, progress: Callable[[Progress], None] | None = None, *, until: int | None = None) -> int:
        """Projects every event recorded so far (or up to position ``until``), in this process."""
        return self.projector.catch_up(progress=progress, until=until)

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
        """Replays the whole log into fresh tables beside the live ones
        (after dropping what killed rebuilds left behind)."""
        for name in drop_leftover_rebuilds(self.config):
            log.warning("dropped %s, left behind by a rebuild that is no longer running", name)
        aside = open_view_store(self.config, self.app, aside=True)
        try:
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
        except BaseException:
            drop_aside(self.config, aside)  # a failed replay leaves nothing behind
            raise
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
