"""The in-memory backend (``memory://``): eventsourcing's POPO recorders for
the events, and an in-memory SQLite database for the read models. Nothing
outlives the process; for tests, examples and trying things out."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ledger.storage.base import Backend
from ledger.storage.ddl import Table, render_sqlite
from ledger.storage.digests import DigestStore, MemoryDigestStore
from ledger.storage.sqlite.viewstore import SQLiteViewStore
from ledger.storage.streams import PerIdReader, StreamReader
from ledger.storage.viewstore import ViewStore

if TYPE_CHECKING:
    from ledger.storage.eventstore import LedgerApplication

#: The anchors of each in-memory ledger, for as long as its application lives.
_MEMORY_DIGESTS: weakref.WeakKeyDictionary[Any, MemoryDigestStore] = weakref.WeakKeyDictionary()
#: The outbox consumers whose leases are held, per in-memory ledger.
_MEMORY_LEASES: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
_MEMORY_LEASES_LOCK = threading.Lock()


class MemoryLease:
    """An in-memory ledger's consumer lease: the store ends with its process, and so does this."""

    def __init__(self, held: set[str], consumer: str) -> None:
        self._held = held
        self._consumer: str | None = consumer

    def held(self) -> bool:
        return self._consumer is not None

    def release(self) -> None:
        with _MEMORY_LEASES_LOCK:
            if self._consumer is not None:
                self._held.discard(self._consumer)
                self._consumer = None


class MemoryBackend(Backend):
    name = "memory"

    def require_store(self) -> None:
        return  # a store of its own, which nothing else could have written

    def eventsourcing_env(self) -> dict[str, str]:
        return {"PERSISTENCE_MODULE": "eventsourcing.popo"}

    def stream_reader(self, app: LedgerApplication) -> StreamReader:
        # One query per id costs nothing in memory.
        return PerIdReader(app)

    def take_consumer_lease(self, app: LedgerApplication, consumer: str) -> MemoryLease | None:
        with _MEMORY_LEASES_LOCK:
            held = _MEMORY_LEASES.setdefault(app, set())
            if consumer in held:
                return None
            held.add(consumer)
            return MemoryLease(held, consumer)

    def view_store(self, app: LedgerApplication) -> ViewStore:
        return SQLiteViewStore(self._uri(app, "live"))

    def view_store_aside(self, app: LedgerApplication) -> ViewStore:
        return SQLiteViewStore(self._uri(app, "aside"))

    def drop_aside(self, aside: ViewStore) -> None:
        aside.close()  # the last connection gone, the database is gone

    @staticmethod
    def _uri(app: LedgerApplication, which: str) -> str:
        # Shared cache: every connection of this ledger sees the same database.
        return f"file:ledger-views-{id(app)}-{which}?mode=memory&cache=shared"

    def digest_store(self, app: LedgerApplication) -> DigestStore:
        # An in-memory ledger keeps its anchors for as long as its application lives.
        return _MEMORY_DIGESTS.setdefault(app, MemoryDigestStore())

    @classmethod
    def ddl(cls, tables: Sequence[Table], schema: str = "public", *, user_foreign_keys: bool = False) -> str:
        return render_sqlite(tables)
