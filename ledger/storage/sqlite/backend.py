"""The SQLite backend (``sqlite:///path``), the embedded default: the event
store in the file, the read models in a second file beside it."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from typing import TYPE_CHECKING

from ledger.errors import ConfigurationError
from ledger.storage.base import Backend
from ledger.storage.ddl import sqlite_ddl
from ledger.storage.sqlite.streams import SQLiteReader
from ledger.storage.sqlite.viewstore import SQLiteViewStore
from ledger.storage.streams import StreamReader
from ledger.storage.viewstore import ViewStore

if TYPE_CHECKING:
    from pathlib import Path

    from ledger.storage.eventstore import LedgerApplication

#: How long a writer waits for another's lock on the file before failing.
LOCK_TIMEOUT_S = 30


class SQLiteBackend(Backend):
    name = "sqlite"

    @property
    def path(self) -> Path:
        assert self.config.sqlite_path is not None  # parse_url guarantees it for sqlite URLs
        return self.config.sqlite_path

    events_table = "stored_events"

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        yield

    def stream_reader(self, app: LedgerApplication) -> StreamReader:
        return SQLiteReader(app)

    def views_path(self) -> str:
        """The file holding the read models: beside the event store's file."""
        return str(self.path.with_name(f"{self.path.stem}.views{self.path.suffix or '.sqlite3'}"))

    def view_store(self, app: LedgerApplication) -> ViewStore:
        return SQLiteViewStore(self.views_path())

    def view_store_aside(self, app: LedgerApplication) -> ViewStore:
        path = f"{self.views_path()}.rebuild"
        _remove(path)  # a rebuild that died left it behind
        return SQLiteViewStore(path)

    def drop_aside(self, aside: ViewStore) -> None:
        aside.close()
        if isinstance(aside, SQLiteViewStore):
            _remove(aside.path)

    @classmethod
    def ddl(cls, schema: str = "public", *, user_foreign_keys: bool = False) -> str:
        return sqlite_ddl()


def _remove(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)
