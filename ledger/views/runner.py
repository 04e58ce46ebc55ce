"""The ledger's read models: opening their store, keeping them current,
rebuilding them from the event log."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from ledger.storage.base import Backend
from ledger.storage.eventstore import LedgerApplication
from ledger.storage.viewstore import ViewStore
from ledger.views.catalog import copy_plans
from ledger.views.pipeline import pipelined_catch_up
from ledger.views.projector import Progress, Projector, checksum, differences
from ledger.views.registry import default_views, schema_tables

log = logging.getLogger("ledger.rebuild")

#: Events per transaction when rebuilding: nobody reads the tables aside, so
#: larger pages trade nothing for fewer round trips.
REBUILD_PAGE_EVENTS = 10_000
#: Tables a rebuild fills whose secondary indexes no projection reads by: the
#: aside gets them built once, after its rows (``ViewStore.indexes_built_after``).
APPEND_ONLY_TABLES = ("credit_transactions", "credit_reservations")


class Views:
    """The read models of one ledger."""

    def __init__(
        self,
        app: LedgerApplication,
        backend: Backend,
        *,
        sync_user_credits: bool = False,
        sync_user_tier: bool = False,
    ) -> None:
        self.app = app
        self.backend = backend
        self.store = backend.view_store(app)
        self.store.ensure_schema(schema_tables())
        views = default_views(sync_user_credits=sync_user_credits, sync_user_tier=sync_user_tier)
        self.projector = Projector(app, self.store, views)

    def migrate(self, *, user_foreign_keys: bool = False) -> int:
        """Creates the registered views' tables (and the inbox's) where missing,
        records the schema version, and returns it."""
        return self.store.migrate(schema_tables(), user_foreign_keys=user_foreign_keys)

    def catch_up(self, progress: Callable[[Progress], None] | None = None, *, until: int | None = None) -> int:
        """Projects every event recorded so far (or up to position ``until``), in this process."""
        return self.projector.catch_up(progress=progress, until=until)

    def position(self) -> int:
        return self.store.position()

    def lag(self) -> int:
        return self.projector.lag()

    def wait(self, position: int | None, timeout_s: float = 10.0) -> None:
        """Waits until a projector (this process's or another's) has projected
        ``position``; at once for None (a replayed receipt's position)."""
        self.store.wait(position, timeout_s)

    def tables(self) -> Iterator[tuple[str, str, tuple[str, ...]]]:
        for view in self.projector.views:
            for table, (order_by, skip) in view.tables.items():
                yield table, order_by, skip

    def checksums(self, store: ViewStore | None = None) -> dict[str, tuple[int, str]]:
        target = store or self.store
        return {table: checksum(target, table, order_by, skip) for table, order_by, skip in self.tables()}

    def build_aside(
        self,
        progress: Callable[[Progress], None] | None = None,
        *,
        until: int | None = None,
        pipelined: bool = False,
    ) -> ViewStore:
        """Replays the whole log into fresh tables beside the live ones
        (after dropping what killed rebuilds left behind), page by page.
        ``pipelined`` reads and decodes the next page in a thread while one
        is written (``views.pipeline``): where the server has cores of its
        own. Where client and server share the cores, the thread's decoding
        competes with the writer for the interpreter lock, and page by page
        was the faster (docs/decisions.md, "A rebuild goes page by page
        unless asked to pipeline")."""
        for name in self.backend.drop_leftover_asides():
            log.warning("dropped %s, left behind by a rebuild that is no longer running", name)
        aside = self.backend.view_store_aside(self.app)
        try:
            aside.migrate(schema_tables())
            copy_plans(self.store, aside)
            self.backend.before_rebuild(self.app)
            projector = Projector(self.app, aside, default_views(sync_user_credits=False))
            with aside.indexes_built_after(APPEND_ONLY_TABLES):
                if pipelined:
                    pipelined_catch_up(projector, progress=progress, until=until, page_events=REBUILD_PAGE_EVENTS)
                else:
                    projector.catch_up(progress=progress, until=until, page_events=REBUILD_PAGE_EVENTS)
        except BaseException:
            self.backend.drop_aside(aside)  # a failed replay leaves nothing behind
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
        self.backend.swap_in(self.store, aside, [t for t, _, _ in self.tables()])

    def drop_aside(self, aside: ViewStore) -> None:
        """Removes a view store ``build_aside`` made."""
        self.backend.drop_aside(aside)

    def drop_leftover_asides(self) -> list[str]:
        """Drops what rebuilds that are no longer running left behind (every
        ``build_aside`` does this first); returns the names it dropped."""
        return self.backend.drop_leftover_asides()

    def close(self) -> None:
        self.backend.close_view_store(self.store)
