"""The storage seam: what differs between the backends, behind one interface.

A :class:`Backend` is chosen once, from the ledger's URL, by
``ledger.storage.factory.open_backend``; nothing outside the backend modules
asks which backend it is. Each backend owns:

- the event store's environment (eventsourcing's persistence settings), what
  must happen around opening it (a lock, a folder), and what is installed on
  it once open;
- the bulk stream reader the unit of work and the queries load through;
- the write locks a command takes on an account other processes write too;
- the view store the read models live in, a fresh one to rebuild into, and
  the swap of a rebuild into the live tables;
- the DDL dialect of the library's tables;
- how a projector is woken when events are committed;
- the lease that lets one notifier at a time deliver an outbox consumer.

``tests/test_backends.py`` holds the properties every backend must prove, one
subclass per backend.
"""

from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol
from uuid import uuid4

from ledger.storage.config import StoreConfig
from ledger.storage.ddl import Table
from ledger.storage.digests import DigestStore
from ledger.storage.streams import StreamReader
from ledger.storage.viewstore import TRACKED_APPLICATION, ViewStore, ViewTx
from ledger.storage.writelocks import WriteLocks

if TYPE_CHECKING:
    import threading

    from ledger.storage.eventstore import LedgerApplication

#: Waits up to ``timeout_s`` for a commit to the event store; returns early when one arrives.
Wake = Callable[[float], None]

#: Rows per batch when a rebuild's rows are copied through the client.
COPY_ROWS = 5_000
#: The part of a rebuild's aside schema or file name after the live one's,
#: followed by ``REBUILD_TOKEN``.
REBUILD_MARK = "_rebuild_"
REBUILD_TOKEN = re.compile(r"[0-9a-f]{12}")


def rebuild_token() -> str:
    return uuid4().hex[:12]


class Lease(Protocol):
    """An exclusive claim held until ``release()``, or until its process ends
    however it ends (the server or the operating system lets it go)."""

    def held(self) -> bool:
        """Whether the claim still holds (a lease on a server is lost with its connection)."""
        ...

    def release(self) -> None: ...


class Backend(ABC):
    """One kind of store: memory, SQLite or PostgreSQL."""

    #: The URL scheme (and ``StoreConfig.backend``) this backend serves.
    name: ClassVar[str]

    def __init__(self, config: StoreConfig) -> None:
        if config.backend != self.name:
            raise ValueError(f"{type(self).__name__} serves {self.name} stores, not {config.backend}")
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # -- the event store ---------------------------------------------------------

    @abstractmethod
    def eventsourcing_env(self) -> dict[str, str]:
        """Settings for eventsourcing's infrastructure factory."""

    #: The event store's table, as eventsourcing names it on this backend.
    events_table: ClassVar[str] = ""

    def identity(self) -> tuple[object, ...] | None:
        """What tells this store from another on this host, equal in two
        processes that opened the same one (``share_group_commit`` compares
        them); None for a store no other process can open."""
        return None

    def require_store(self) -> None:  # noqa: B027  (a hook: memory has nothing to check)
        """Raises ConfigurationError unless the store holds the ledger's event
        table; creates nothing (no file, no schema). For ``Ledger(create=False)``."""

    @contextlib.contextmanager
    def opening(self) -> Iterator[None]:
        """Held while the event store is opened (and its tables created)."""
        yield

    def why_opening_failed(self, exc: BaseException) -> str:
        """What the store's own error ``exc`` at open leaves out, as a clause to
        append to it, or ``""`` (the default: its message says it all)."""
        return ""

    def opened(self, app: LedgerApplication) -> None:  # noqa: B027  (a hook: most backends need nothing)
        """Called once the event store is open."""

    @abstractmethod
    def stream_reader(self, app: LedgerApplication) -> StreamReader:
        """The bulk reader of aggregates for this store."""

    def write_locks(self, app: LedgerApplication) -> WriteLocks:
        """How commands lock the accounts several processes write (the default: they do not)."""
        return WriteLocks(app.recorder)

    def commit_waiter(self, app: LedgerApplication, stop: threading.Event) -> Wake | None:
        """A way to sleep until the next commit, for a projector; None: poll."""
        return None

    @abstractmethod
    def take_consumer_lease(self, app: LedgerApplication, consumer: str) -> Lease | None:
        """The outbox consumer's delivery lease, or None while another holder
        (another process, or another notifier in this one) has it. Never waits."""

    # -- the read models -----------------------------------------------------------

    @abstractmethod
    def view_store(self, app: LedgerApplication) -> ViewStore:
        """The live view tables of this ledger."""

    @abstractmethod
    def view_store_aside(self, app: LedgerApplication) -> ViewStore:
        """A fresh, empty view store beside the live one, to rebuild into."""

    @abstractmethod
    def drop_aside(self, aside: ViewStore) -> None:
        """Closes and removes a view store made by ``view_store_aside``, and
        releases its lease."""

    def drop_leftover_asides(self) -> list[str]:
        """Drops the asides of rebuilds that are no longer running (killed, or
        their machine lost); returns their names. An aside whose rebuild is
        alive, in any process, is left alone: while it exists its rebuild holds
        a lease that the operating system or the server releases when the
        process ends, however it ends, and this takes that lease before it
        drops anything. A rebuild takes its lease before it creates its aside,
        so an aside seen here without a holder is one nobody will write to
        again. (An in-memory aside ends with its process: nothing to drop.)"""
        return []

    def close_view_store(self, store: ViewStore) -> None:
        store.close()

    def before_rebuild(self, app: LedgerApplication) -> None:  # noqa: B027  (a hook, as above)
        """Called before a rebuild reads the whole event log."""

    def swap_in(self, live: ViewStore, aside: ViewStore, tables: Sequence[str]) -> None:
        """Replaces the live rows and tracking position with the rebuilt ones,
        in one transaction: readers see the old tables or the new, never a mix."""
        position = aside.position()
        with live.transaction() as tx:
            self._replace_rows(tx, live, aside, tables)
            tracking = self.tracking_table
            tx.execute(f"DELETE FROM {tracking} WHERE application_name = %s", [TRACKED_APPLICATION])
            if position:
                tx.execute(
                    f"INSERT INTO {tracking} (application_name, notification_id) VALUES (%s, %s)",
                    [TRACKED_APPLICATION, position],
                )

    #: The table the view store's tracking recorder keeps the position in.
    tracking_table: ClassVar[str] = "tracking"

    def _replace_rows(self, tx: ViewTx, live: ViewStore, aside: ViewStore, tables: Sequence[str]) -> None:
        """Deletes the live rows and copies the rebuilt ones in, through the client."""
        for table in reversed(tables):
            tx.execute(f"DELETE FROM {table}")
        for table in tables:
            columns = aside.columns(table)
            insert = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})"
            batch: list[tuple[object, ...]] = []
            for row in aside.raw_rows(table):
                batch.append(row)
                if len(batch) == COPY_ROWS:
                    tx.executemany(insert, batch)
                    batch = []
            if batch:
                tx.executemany(insert, batch)

    # -- the audit's anchors -------------------------------------------------------------

    @abstractmethod
    def digest_store(self, app: LedgerApplication) -> DigestStore:
        """Where ``digest`` keeps its anchors: ``ledger_digests`` beside the events."""

    # -- the schema -------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def ddl(cls, tables: Sequence[Table], schema: str = "public", *, user_foreign_keys: bool = False) -> str:
        """The DDL of ``tables`` (the owners' declarations, in creation order)
        and of the schema-version table, in this backend's dialect."""
