"""The PostgreSQL backend (``postgresql://…?schema=…``), for production: the
event store and the read models in one schema of one database, through one
connection pool with the seed's settings."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import psycopg
from eventsourcing.postgres import PostgresDatastore
from psycopg import sql
from psycopg_pool import PoolTimeout

from ledger.errors import ConfigurationError
from ledger.storage.base import REBUILD_MARK, REBUILD_TOKEN, Backend, Wake, rebuild_token
from ledger.storage.ddl import Table, render_postgres
from ledger.storage.digests import DigestStore, SQLDigestStore
from ledger.storage.postgres.recorder import apply_connect_options, install_ping_window
from ledger.storage.postgres.streams import PostgresReader
from ledger.storage.postgres.viewstore import TRACKING_TABLE, PostgresViewStore
from ledger.storage.postgres.writelocks import PostgresWriteLocks
from ledger.storage.streams import StreamReader
from ledger.storage.viewstore import ViewStore, ViewTx
from ledger.storage.writelocks import WriteLocks

if TYPE_CHECKING:
    import threading

    from ledger.storage.eventstore import LedgerApplication

#: Any fixed number: the key of the advisory lock that serialises table creation.
DDL_LOCK_KEY = 0x70696E6776
#: The pool of a view store rebuilt aside: one writer, and room for a check.
ASIDE_POOL_SIZE = 2


class PostgresBackend(Backend):
    name = "postgresql"
    tracking_table = TRACKING_TABLE

    def identity(self) -> tuple[object, ...]:
        c = self.config
        return (self.name, c.pg_host, c.pg_port, c.pg_dbname, c.pg_schema)

    def eventsourcing_env(self) -> dict[str, str]:
        c = self.config
        return {
            # eventsourcing's factory, with the URL's libpq options on its pool.
            "PERSISTENCE_MODULE": "ledger.storage.postgres.recorder:LedgerPostgresFactory",
            "LEDGER_PG_OPTIONS": json.dumps(dict(c.pg_options)),
            "APPLICATION_RECORDER_TOPIC": "ledger.storage.postgres.recorder:LedgerPostgresRecorder",
            "POSTGRES_DBNAME": c.pg_dbname,
            "POSTGRES_HOST": c.pg_host,
            "POSTGRES_PORT": str(c.pg_port),
            "POSTGRES_USER": c.pg_user,
            "POSTGRES_PASSWORD": c.pg_password,
            "POSTGRES_SCHEMA": c.pg_schema,
            "POSTGRES_POOL_SIZE": str(c.pool_size),
            "POSTGRES_MAX_OVERFLOW": str(c.max_overflow),
            # eventsourcing uses its connect timeout as the pool's wait timeout.
            "POSTGRES_CONNECT_TIMEOUT": str(round(c.pool_timeout_s)),
            "POSTGRES_CONN_MAX_AGE": str(round(c.recycle_s)),
            "POSTGRES_PRE_PING": "y" if c.pre_ping else "n",
            # Off on purpose: in eventsourcing 9.5.6 the insert function mixes
            # the events of applications that share a schema.
            "POSTGRES_ENABLE_DB_FUNCTIONS": "n",
            "POSTGRES_LOCK_TIMEOUT": "10",
            "POSTGRES_IDLE_IN_TRANSACTION_SESSION_TIMEOUT": "30",
        }

    #: eventsourcing names the table after the application (``LedgerApplication.name``).
    events_table = "ledger_events"

    def require_store(self) -> None:
        c = self.config
        try:
            with psycopg.connect(self.conninfo(), **c.connect_kwargs()) as conn:
                found = conn.execute("SELECT to_regclass(%s)", (f'"{c.pg_schema}"."{self.events_table}"',))
                exists = found.fetchone() not in (None, (None,))
        except psycopg.Error as exc:
            raise ConfigurationError(f"cannot reach PostgreSQL at {c.pg_host}:{c.pg_port}: {exc}".rstrip()) from exc
        if not exists:
            raise ConfigurationError(
                f"no ledger store in database {c.pg_dbname!r} at {c.pg_host}:{c.pg_port}: "
                f"there is no table {c.pg_schema}.{self.events_table} (nothing was created); "
                "check --url or LEDGER_URL and its schema"
            )

    def conninfo(self) -> str:
        """A psycopg connection string for this store's database."""
        return self.config.conninfo()

    @contextlib.contextmanager
    def opening(self) -> Iterator[None]:
        """Creates the schema if missing and holds an advisory lock while the
        tables are created: concurrent ``CREATE TABLE IF NOT EXISTS`` in
        several processes otherwise fails with "tuple concurrently updated"."""
        c = self.config
        try:
            conn = psycopg.connect(self.conninfo(), autocommit=True, **c.connect_kwargs())
        except psycopg.Error as exc:
            raise ConfigurationError(f"cannot reach PostgreSQL at {c.pg_host}:{c.pg_port}: {exc}") from exc
        with conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (DDL_LOCK_KEY,))
            try:
                try:
                    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(c.pg_schema)))
                except psycopg.Error as exc:
                    raise ConfigurationError(f"cannot create schema {c.pg_schema!r}: {exc}") from exc
                yield
            finally:
                # A session lock ends with its connection: if the server ended
                # this one meanwhile (a failover, an administrator), the lock is
                # gone already, and the store's opening decides the outcome.
                with contextlib.suppress(psycopg.OperationalError):
                    conn.execute("SELECT pg_advisory_unlock(%s)", (DDL_LOCK_KEY,))

    def why_opening_failed(self, exc: BaseException) -> str:
        # The pool retries failed connections in the background and, at its
        # timeout, says only "couldn't get a connection after N sec": the
        # server's refusal ("too many connections for role", a connection
        # limit the advisory-lock connection of opening() has just reached)
        # goes to a log few processes show. One more attempt, made while that
        # connection is still held, recovers it.
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, PoolTimeout):
            cause = cause.__cause__
        if cause is None:
            return ""
        try:
            psycopg.connect(self.conninfo(), **self.config.connect_kwargs()).close()
        except psycopg.Error as refused:
            return f" (a new connection is refused: {str(refused).strip()})"
        return ""

    def opened(self, app: LedgerApplication) -> None:
        app.ping_window = install_ping_window(self._datastore(app), self.config.pre_ping_window_s)

    def stream_reader(self, app: LedgerApplication) -> StreamReader:
        return PostgresReader(app)

    def write_locks(self, app: LedgerApplication) -> WriteLocks:
        return PostgresWriteLocks(app.recorder)

    def commit_waiter(self, app: LedgerApplication, stop: threading.Event) -> Wake | None:
        """LISTEN on the event table's channel (eventsourcing NOTIFYs on it at each commit),
        on a connection with the connect timeout of the ledger's others: a
        server that cannot be reached, or never answers, is a ConfigurationError."""
        c = self.config
        channel = app.recorder.channel_name  # type: ignore[attr-defined]
        try:
            conn = psycopg.connect(self.conninfo(), autocommit=True, **c.connect_kwargs())
        except psycopg.Error as exc:
            raise ConfigurationError(
                f"cannot reach PostgreSQL at {c.pg_host}:{c.pg_port} to LISTEN for commits: {exc}".rstrip()
            ) from exc
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException:
            conn.close()
            raise

        def wake(timeout_s: float) -> None:
            if stop.is_set():
                return
            for _ in conn.notifies(timeout=timeout_s, stop_after=1):
                break

        return wake

    def take_consumer_lease(self, app: LedgerApplication, consumer: str) -> AdvisoryLease | None:
        try:
            return AdvisoryLease.try_take(self, _consumer_key(self.config.pg_schema, consumer))
        except psycopg.Error as exc:
            raise ConfigurationError(f"cannot take the lease of consumer {consumer!r}: {exc}") from exc

    @staticmethod
    def _datastore(app: LedgerApplication) -> PostgresDatastore:
        datastore: Any = app.recorder.datastore  # type: ignore[attr-defined]
        assert isinstance(datastore, PostgresDatastore)
        return datastore

    # -- the read models -----------------------------------------------------------

    def view_store(self, app: LedgerApplication) -> ViewStore:
        return PostgresViewStore(self._datastore(app))

    def view_store_aside(self, app: LedgerApplication) -> ViewStore:
        c = self.config
        # A fresh name per rebuild: two rebuilds at once do not clobber each other.
        schema = f"{_aside_prefix(c.pg_schema)}{rebuild_token()}"
        lease = AdvisoryLease.take(self, schema)  # before the schema exists: see drop_leftover_asides
        try:
            lease.conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            datastore = PostgresDatastore(
                dbname=c.pg_dbname,
                host=c.pg_host,
                port=str(c.pg_port),
                user=c.pg_user,
                password=c.pg_password,
                schema=schema,
                pool_size=ASIDE_POOL_SIZE,
                max_overflow=ASIDE_POOL_SIZE,
            )
            apply_connect_options(datastore, dict(c.pg_options))
            store = PostgresViewStore(datastore, owns_datastore=True)
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                lease.conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            lease.release()
            raise
        store.lease = lease
        return store

    def drop_aside(self, aside: ViewStore) -> None:
        aside.close()
        try:
            if isinstance(aside, PostgresViewStore):
                with psycopg.connect(self.conninfo(), autocommit=True, **self.config.connect_kwargs()) as conn:
                    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(aside.schema)))
        finally:
            if aside.lease is not None:
                aside.lease.release()
                aside.lease = None

    def drop_leftover_asides(self) -> list[str]:
        schema = self.config.pg_schema
        dropped = []
        with psycopg.connect(self.conninfo(), autocommit=True, **self.config.connect_kwargs()) as conn:
            names = sorted(
                name
                for prefix in (_aside_prefix(schema), _old_aside_prefix(schema))
                for (name,) in conn.execute(
                    "SELECT nspname FROM pg_namespace WHERE left(nspname, %s) = %s", [len(prefix), prefix]
                )
                if REBUILD_TOKEN.fullmatch(name[len(prefix) :])
            )
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

    def close_view_store(self, store: ViewStore) -> None:
        if isinstance(store, PostgresViewStore) and not store.owns_datastore:
            return  # the live views share the ledger's pool, closed with the ledger
        store.close()

    def before_rebuild(self, app: LedgerApplication) -> None:
        # Fresh planner statistics: without them (autovacuum off, a restore)
        # PostgreSQL reads large pages of the log by scanning the rest of it.
        recorder: Any = app.recorder
        with recorder.datastore.get_connection() as conn:
            conn.execute(
                sql.SQL("ANALYZE {}.{}").format(
                    sql.Identifier(recorder.datastore.schema), sql.Identifier(recorder.events_table_name)
                )
            )

    def _replace_rows(self, tx: ViewTx, live: ViewStore, aside: ViewStore, tables: Sequence[str]) -> None:
        assert isinstance(live, PostgresViewStore) and isinstance(aside, PostgresViewStore)
        _check_host_foreign_keys(tx, live.schema, tables)
        tx.execute("SET CONSTRAINTS ALL DEFERRED")
        tx.execute(f"LOCK TABLE {', '.join(tables)}, {TRACKING_TABLE} IN ACCESS EXCLUSIVE MODE")
        for table in reversed(tables):
            tx.execute(f"DELETE FROM {table}")
        for table in tables:  # copied on the server
            tx.execute(f'INSERT INTO {table} SELECT * FROM "{aside.schema}".{table}')

    def digest_store(self, app: LedgerApplication) -> DigestStore:
        return SQLDigestStore(app.recorder.datastore, postgres=True)  # type: ignore[attr-defined]

    @classmethod
    def ddl(cls, tables: Sequence[Table], schema: str = "public", *, user_foreign_keys: bool = False) -> str:
        return render_postgres(tables, schema, user_foreign_keys=user_foreign_keys)


def _aside_prefix(schema: str) -> str:
    """How the names of ``schema``'s rebuild asides begin: its first 32
    characters, the mark, and 8 hex digits of its whole name's SHA-256, so that
    schemas whose names share a longer beginning never take each other's
    asides for their own; with the token, at most 62 characters (PostgreSQL
    keeps 63)."""
    tag = hashlib.sha256(schema.encode()).hexdigest()[:8]
    return f"{schema[:32]}{REBUILD_MARK}{tag}_"


def _old_aside_prefix(schema: str) -> str:
    """How asides were named before the tag: the schema's first 40 characters
    and the mark (then the token). Still dropped when left behind; for schemas
    longer than 40 characters such a name cannot tell which one it was."""
    return f"{schema[:40]}{REBUILD_MARK}"


def _rebuild_key(name: str) -> int:
    """A 64-bit advisory lock key for one aside schema (the lock space is the
    database's, the schema name is unique in it)."""
    digest = hashlib.sha256(f"pingvas-ledger rebuild {name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _consumer_key(schema: str, consumer: str) -> int:
    """A 64-bit advisory lock key for one outbox consumer of the ledger in ``schema``."""
    digest = hashlib.sha256(f"pingvas-ledger consumer {schema}\x00{consumer}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class AdvisoryLease:
    """A session advisory lock on its own connection: the server releases it
    when the connection ends, also when the process is killed."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    @classmethod
    def take(cls, backend: PostgresBackend, schema: str) -> AdvisoryLease:
        """The rebuild aside ``schema``'s lock, waiting for it."""
        lease = cls._locking(backend, "SELECT true FROM pg_advisory_lock(%s)", _rebuild_key(schema))
        assert lease is not None  # a lock waited for is taken (or the wait raised)
        return lease

    @classmethod
    def try_take(cls, backend: PostgresBackend, key: int) -> AdvisoryLease | None:
        """The lock if it is free now, else None."""
        return cls._locking(backend, "SELECT pg_try_advisory_lock(%s)", key)

    @classmethod
    def _locking(cls, backend: PostgresBackend, query: str, key: int) -> AdvisoryLease | None:
        """A connection of its own that runs ``query`` (a lock on ``key``,
        answering whether it was taken): the lease, or None (closed)."""
        conn = psycopg.connect(backend.conninfo(), autocommit=True, **backend.config.connect_kwargs())
        try:
            row = conn.execute(query, [key]).fetchone()
        except BaseException:
            conn.close()
            raise
        if row is None or row[0] is not True:
            conn.close()
            return None
        return cls(conn)

    def held(self) -> bool:
        # A session lock lasts as long as its session: while the connection
        # answers, it is held; a connection the server ended took it along.
        if self.conn.closed:
            return False
        try:
            self.conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def release(self) -> None:
        self.conn.close()


def _check_host_foreign_keys(tx: ViewTx, schema: str, tables: Sequence[str]) -> None:
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
        [schema, list(tables), schema, list(tables)],
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
