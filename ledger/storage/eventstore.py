"""The event store: an eventsourcing application holding every ledger
aggregate, configured by the backend the ledger was opened on.

Commands read aggregates through its repository (with an LRU cache) and save
through ``save_all``; queries read the store through a ``StreamReader``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import JSONTranscoder
from eventsourcing.utils import Environment

from ledger.domain.credits import CreditAccount
from ledger.storage.transcoding import BlockAsDict, HoldAsDict

T = TypeVar("T")

SNAPSHOT_INTERVAL_EVENTS = 100
AGGREGATE_CACHE_SIZE = 10_000


class LedgerApplication(Application[UUID]):
    """Event store, snapshots and repository for every ledger aggregate."""

    name = "ledger"
    snapshotting_intervals: ClassVar[dict[type, int]] = {CreditAccount: SNAPSHOT_INTERVAL_EVENTS}
    #: The PostgreSQL pool's pre-ping window, when the backend installed one.
    ping_window: Any = None

    def construct_env(self, name: str, env: Any = None) -> Environment:
        # Only the settings the ledger was opened with: a library must not be
        # steered by whatever eventsourcing variables the host process exports.
        settings = dict(env or {})
        settings["IS_SNAPSHOTTING_ENABLED"] = "y"
        # Commands read aggregates from an LRU cache that is not fast-forwarded:
        # a stale account cannot commit (its next version already exists, the
        # save clashes), and the engine evicts and reloads on a clash. Queries
        # never use the cache (see Ledger), so other processes' writes show.
        settings["AGGREGATE_CACHE_MAXSIZE"] = str(AGGREGATE_CACHE_SIZE)
        settings["AGGREGATE_CACHE_FASTFORWARD"] = "n"
        return Environment(name, settings)

    def evict(self, aggregate_ids: Iterable[UUID]) -> None:
        """Drops aggregates from the cache, so the next read goes to the store."""
        cache = self.repository.cache
        if cache is None:
            return
        for aggregate_id in aggregate_ids:
            try:
                cache.get(aggregate_id, evict=True)
            except KeyError:
                continue

    def save_all(self, objs: Sequence[Any]) -> int | None:
        """``save()`` for many aggregates and events in one transaction.

        eventsourcing's ``save`` tells aggregates from events with a runtime
        Protocol check that costs ~20 µs an object; a 10,000-grant batch spent
        half a second there. Here the caller's types are known."""
        processing = ProcessingEvent[UUID]()
        for obj in objs:
            if isinstance(obj, Aggregate):
                processing.events.extend(obj.collect_events())
                processing.aggregates[obj.id] = obj
            else:
                processing.events.append(obj)
        recordings = self._record(processing)
        self._take_snapshots(processing)
        self._notify(recordings)
        # The position of the save in the notification log, for read-your-writes.
        return max((r.notification.id for r in recordings), default=None)

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        transcoder.register(BlockAsDict())
        transcoder.register(HoldAsDict())


def get_or_none(app: LedgerApplication, aggregate_id: UUID, cls: type[T]) -> T | None:
    try:
        aggregate: Any = app.repository.get(aggregate_id)
    except AggregateNotFoundError:
        return None
    if not isinstance(aggregate, cls):
        return None
    return aggregate
