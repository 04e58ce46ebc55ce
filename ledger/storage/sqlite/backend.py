"""The SQLite backend (``sqlite:///path``), the embedded default: the event
store in the file, the read models in a second file beside it."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Self

from ledger.errors import ConfigurationError
from ledger.storage.base import REBUILD_MARK, REBUILD_TOKEN, Backend, rebuild_token
from ledger.storage.ddl import Table, render_sqlite
from ledger.storage.digests import DigestStore, SQLDigestStore
from ledger.storage.sqlite.streams import SQLiteReader
from ledger.storage.sqlite.viewstore import SQLiteViewStore
from ledger.storage.streams import StreamReader
from ledger.storage.viewstore import ViewStore

if TYPE_CHECKING:
    from ledger.storage.eventstore import LedgerApplication

#: How long a writer waits for another's lock on the file before failing.
LOCK_TIMEOUT_S = 30
#: A rebuild's lease file older than this with no aside beside it is removed.
ORPHAN_LEASE_AGE_S = 3_600


class SQLiteBackend(Backend):
    name = "sqlite"

    @property
    def path(self) -> Path:
        assert self.config.sqlite_path is not None  # parse_url guarantees it for sqlite URLs
        return self.config.sqlite_path

    events_table = "stored_events"

    def identity(self) -> tuple[object, ...]:
        return (self.name, str(self.path.resolve()))

    def require_store(self) -> None:
        path = self.path
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise ConfigurationError(
                f"no ledger store at {path}: the file {what} (nothing was created); check --url or LEDGER_URL"
            )
        try:
            with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
                found = conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (self.events_table,)
                ).fetchone()
        except sqlite3.Error as exc:
            raise ConfigurationError(f"{path} is not a ledger store: {exc}") from exc
        if found is None:
            raise ConfigurationError(f"{path} is not a ledger store: it has no {self.events_table} table")

    def eventsourcing_env(self) -> dict[str, str]:
        return {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(self.path),
            "SQLITE_LOCK_TIMEOUT": str(LOCK_TIMEOUT_S),
        }

    @contextlib.contextmanager
    def opening(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a parent that is a file, a read-only or missing mount: the URL's fault
            raise ConfigurationError(
                f"cannot open ledger store at {self.path}: cannot create the folder {self.path.parent}: {exc.strerror}"
            ) from exc
        yield

    def stream_reader(self, app: LedgerApplication) -> StreamReader:
        return SQLiteReader(app)

    def take_consumer_lease(self, app: LedgerApplication, consumer: str) -> ConsumerFileLease | None:
        digest = hashlib.sha256(consumer.encode()).hexdigest()[:16]
        path = f"{self.path}.consumer-{digest}.lease"
        try:
            return ConsumerFileLease.take(path, wait_s=0)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                return None  # another notifier holds it
            raise ConfigurationError(f"cannot take the lease of consumer {consumer!r} at {path}: {exc}") from exc

    def views_path(self) -> str:
        """The file holding the read models: beside the event store's file."""
        return str(self.path.with_name(f"{self.path.stem}.views{self.path.suffix or '.sqlite3'}"))

    def view_store(self, app: LedgerApplication) -> ViewStore:
        return SQLiteViewStore(self.views_path())

    def view_store_aside(self, app: LedgerApplication) -> ViewStore:
        # A fresh name per rebuild: two rebuilds at once do not clobber each other.
        path = f"{self.views_path()}{REBUILD_MARK}{rebuild_token()}"
        lease = FileLease.take(f"{path}.lease")  # before the file exists: see drop_leftover_asides
        try:
            store = SQLiteViewStore(path)
        except BaseException:
            _remove(path)
            lease.release()
            raise
        store.lease = lease
        return store

    def drop_aside(self, aside: ViewStore) -> None:
        aside.close()
        try:
            if isinstance(aside, SQLiteViewStore):
                _remove(aside.path)
        finally:
            if aside.lease is not None:
                aside.lease.release()
                aside.lease = None

    def drop_leftover_asides(self) -> list[str]:
        base = Path(self.views_path())
        prefix = f"{base.name}{REBUILD_MARK}"
        dropped = []
        for entry in sorted(base.parent.glob(f"{glob.escape(prefix)}*")):
            token = entry.name[len(prefix) :]
            if REBUILD_TOKEN.fullmatch(token):
                lease = FileLease.try_take(f"{entry}.lease")
                if lease is None:
                    continue  # its rebuild is running
                try:
                    _remove(str(entry))
                finally:
                    lease.release()
                dropped.append(str(entry))
            elif token.endswith(".lease") and not (entry.parent / entry.name[: -len(".lease")]).exists():
                _drop_orphan_lease(entry)
        # Earlier versions rebuilt into one fixed file, removed at each start.
        legacy = f"{base}.rebuild"
        if os.path.exists(legacy):
            _remove(legacy)
            dropped.append(legacy)
        return dropped

    def digest_store(self, app: LedgerApplication) -> DigestStore:
        return SQLDigestStore(app.recorder.datastore, postgres=False)  # type: ignore[attr-defined]

    @classmethod
    def ddl(cls, tables: Sequence[Table], schema: str = "public", *, user_foreign_keys: bool = False) -> str:
        return render_sqlite(tables)


def _remove(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)


class FileLease:
    """An exclusive SQLite transaction on a small file of its own, held open:
    the operating system releases the file lock when the process ends."""

    #: Whether release removes the file (an outbox consumer's stays: ConsumerFileLease).
    removes_file: ClassVar[bool] = True

    def __init__(self, conn: sqlite3.Connection, path: str) -> None:
        self._conn = conn
        self.path = path
        self._released = False

    @classmethod
    def take(cls, path: str, *, wait_s: float = 30.0) -> Self:
        # Released by whichever thread ends the holder's work (a notifier's
        # standby takes it in one thread, closes it in another).
        conn = sqlite3.connect(path, timeout=wait_s, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode = OFF")  # nothing is written: no -journal file beside it
            conn.execute("BEGIN EXCLUSIVE")
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    @classmethod
    def try_take(cls, path: str) -> Self | None:
        try:
            return cls.take(path, wait_s=0)
        except sqlite3.OperationalError:  # locked (its rebuild is running), or not ours to open
            return None

    def held(self) -> bool:
        return not self._released  # the lock is this process's open transaction: it lasts until release()

    def release(self) -> None:
        self._released = True
        self._conn.close()
        if self.removes_file:
            _remove(self.path)


class ConsumerFileLease(FileLease):
    """An outbox consumer's lease: a ``FileLease`` whose file stays when it
    is released. Removing it would let a notifier that had opened the file
    just before lock the removed file while a third locks a new one: two
    holders."""

    removes_file = False


def _drop_orphan_lease(entry: Path) -> None:
    """A lease without its aside: the rebuild ended between the two (or a
    cleanup did). A rebuild locks its lease the moment it creates it, so an
    old one that can be taken is nobody's."""
    try:
        if time.time() - entry.stat().st_mtime < ORPHAN_LEASE_AGE_S:
            return
    except FileNotFoundError:
        return
    lease = FileLease.try_take(str(entry))
    if lease is not None:
        lease.release()
