"""The event store: an eventsourcing application holding every ledger
aggregate, configured by the backend the ledger was opened on.

Commands read aggregates through its repository (with an LRU cache) and save
through ``save_all``; queries read the store through a ``StreamReader``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from copy import deepcopy
from itertools import chain
from typing import Any, ClassVar, TypeVar
from uuid import UUID

from eventsourcing.application import (
    AggregateNotFoundError,
    Application,
    ProcessingEvent,
    ProjectorFunction,
    Repository,
    project_aggregate,
)
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import JSONTranscoder, Recording, StoredEvent, Transcoder
from eventsourcing.utils import Environment, strtobool

from ledger.domain.credits import CommandRecord, CreditAccount
from ledger.domain.holds import HoldRecord, HoldStatus
from ledger.storage.freshness import CommandStats, Counters, Freshness
from ledger.storage.sealing import sealed, trusted
from ledger.storage.transcoding import BlockAsDict, HoldAsDict, LedgerTranscoder
from ledger.storage.writelocks import WriteLocks

T = TypeVar("T")

SNAPSHOT_INTERVAL_EVENTS = 100
AGGREGATE_CACHE_SIZE = 10_000


class SealedRepository(Repository[UUID]):
    """eventsourcing's repository, except that a snapshot is used only when it
    passes its check (``sealing.trusted``), otherwise the events are replayed;
    that events are applied without the library's per-event runtime Protocol
    check (as costly as decoding them); that aggregates other writers changed
    are fast-forwarded in the cache from their cached version
    (``ledger.storage.freshness``); and that write-only aggregates (command
    records, closed holds' records) are never cached."""

    def __init__(self, app: LedgerApplication, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app = app
        self.freshness = Freshness()
        self._put_lock = threading.Lock()

    def get(
        self,
        aggregate_id: UUID,
        *,
        version: int | None = None,
        projector_func: ProjectorFunction[Any, Any] = project_aggregate,
        fastforward_skipping: bool = False,
        deepcopy_from_cache: bool = True,
    ) -> Any:
        if self.cache is None or version is not None or projector_func is not project_aggregate:
            self.app.counters.add("full_loads")
            return super().get(aggregate_id, version=version, projector_func=projector_func)
        try:
            cached = self.cache.get(aggregate_id)
        except KeyError:
            aggregate = self._reconstruct_aggregate(aggregate_id, None, projector_func)
            if not self.app.cacheable(aggregate):
                self.app.counters.add("record_reads")
                return aggregate
            self.app.counters.add("full_loads")
            self.put(aggregate)
        else:
            if not self.freshness.is_shared(aggregate_id):
                self.app.counters.add("cache_hits")
                aggregate = cached
            else:
                # Never mutate the cached object: other threads may be copying it.
                aggregate = deepcopy(cached)
                # An account several processes write is locked first, inside
                # a write session (ledger.storage.writelocks): its writers take
                # turns instead of clashing.
                new = self.app.write_locks.events_after(
                    aggregate_id, aggregate.version, lock=isinstance(cached, CreditAccount)
                )
                # Found newer events: the account stays shared, whoever wrote them.
                self.freshness.forwarded(aggregate_id, len(new))
                self.app.counters.add("fastforwards")
                if not new:
                    aggregate = cached
                else:
                    aggregate, rest = self._newer_cached(aggregate, new)
                    decode = self.app.mapper.to_domain_event
                    for stored in rest:
                        aggregate = decode(stored).mutate(aggregate)  # type: ignore[attr-defined]
                    self.app.counters.add("fastforward_events", len(rest))
                    if self.app.cacheable(aggregate):
                        self.put(aggregate)
                    else:  # a hold's record that another writer closed
                        self.app.evict([aggregate_id])
        # Commands mutate what they get: a copy, so a refused command leaves the cache as committed.
        if deepcopy_from_cache and self.deepcopy_from_cache:
            aggregate = deepcopy(aggregate)
        return aggregate

    def _newer_cached(self, aggregate: Any, new: list[StoredEvent]) -> tuple[Any, list[StoredEvent]]:
        """The copy to fast-forward and the events still to apply to it.

        The read of ``new`` may have waited for the account's write lock
        while other threads of this process took their turns on it; each of
        them cached its committed state, so the cache may now be ahead of the
        copy taken before the wait. Starting from that copy leaves only the
        events other processes wrote to decode (with N threads on one hot
        account, N - 1 fewer events per command, decoded while holding the
        lock)."""
        assert self.cache is not None
        try:
            latest = self.cache.get(aggregate.id)
        except KeyError:
            return aggregate, new
        if latest.version <= aggregate.version:
            return aggregate, new
        rest = [stored for stored in new if stored.originator_version > latest.version]
        # The events after the cached version follow it without a gap (they
        # were read in order, from before it), or there are none.
        assert not rest or rest[0].originator_version == latest.version + 1, (latest.version, rest[0])
        return deepcopy(latest), rest

    def put(self, aggregate: Any) -> None:
        """Caches a committed state of an aggregate, unless the cache holds a newer one."""
        assert self.cache is not None
        with self._put_lock:  # the check and the put at once, across threads
            try:
                cached = self.cache.get(aggregate.id)
            except KeyError:
                cached = None
            if cached is None or cached.version < aggregate.version:
                self.cache.put(aggregate.id, aggregate)

    def _reconstruct_aggregate(
        self, aggregate_id: UUID, version: int | None, projector_func: ProjectorFunction[Any, Any]
    ) -> Any:
        events = self.event_store.recorder
        newest = (
            self.snapshot_store.recorder.select_events(aggregate_id, desc=True, limit=1, lte=version)
            if self.snapshot_store is not None
            else []
        )
        start: list[Any] = []
        if newest:
            at = newest[0].originator_version
            stream = list(events.select_events(aggregate_id, gt=at - 1, lte=version))
            snapshot = trusted(
                self.app, newest[0], stream[0] if stream and stream[0].originator_version == at else None
            )
            if snapshot is not None:
                start, stream = [snapshot], stream[1:]
            else:
                stream = [*events.select_events(aggregate_id, lte=at - 1), *stream]
        else:
            stream = list(events.select_events(aggregate_id, lte=version))
        decode = self.app.mapper.to_domain_event
        if projector_func is project_aggregate:
            # project_aggregate, less its per-event isinstance check against a
            # runtime Protocol: every ledger event is an eventsourcing event.
            aggregate: Any = None
            for event in start:
                aggregate = event.mutate(aggregate)
            for stored in stream:
                aggregate = decode(stored).mutate(aggregate)  # type: ignore[attr-defined]
        else:
            aggregate = projector_func(None, chain(start, (decode(e) for e in stream)))
        if aggregate is None:
            raise AggregateNotFoundError(f"Aggregate {aggregate_id!r} version {version!r} not found.")
        return aggregate


class LedgerApplication(Application[UUID]):
    """Event store, snapshots and repository for every ledger aggregate."""

    name = "ledger"
    snapshotting_intervals: ClassVar[dict[type, int]] = {CreditAccount: SNAPSHOT_INTERVAL_EVENTS}
    #: The PostgreSQL pool's pre-ping window, when the backend installed one.
    ping_window: Any = None
    #: Accounts whose stored snapshot was refused on load: their next save
    #: writes a sealed snapshot, whatever the version.
    unsealed: set[UUID]
    #: Aggregates saved once and read again only to replay a key: kept out
    #: of the command cache, which holds what commands read back. (A hold's
    #: record is cached while the hold is open, for a settle or release that
    #: does not name the account; see ``cacheable``.)
    write_only: ClassVar[tuple[type, ...]] = (CommandRecord,)
    repository: SealedRepository
    #: The backend's write locks (``Backend.write_locks``), set when the ledger opens.
    write_locks: WriteLocks

    def __init__(self, env: Any = None) -> None:
        self.unsealed = set()
        #: Called after every save with what it recorded (the read cache of
        #: ``Ledger.check`` drops the state those events change).
        self.save_listeners: list[Callable[[Sequence[Recording[UUID]]], None]] = []
        self.counters = Counters()
        super().__init__(env)
        self.write_locks = WriteLocks(self.recorder)

    def construct_env(self, name: str, env: Any = None) -> Environment:
        # Only the settings the ledger was opened with: a library must not be
        # steered by whatever eventsourcing variables the host process exports.
        settings = dict(env or {})
        settings["IS_SNAPSHOTTING_ENABLED"] = "y"
        # Commands read aggregates from an LRU cache. eventsourcing's own
        # fast-forward (a query before every read) is off: the repository
        # fast-forwards only the aggregates seen written elsewhere
        # (ledger.storage.freshness), and a stale one cannot commit (its next
        # version already exists, the save clashes). Queries never use the
        # cache (see Ledger), so other processes' writes show.
        settings["AGGREGATE_CACHE_MAXSIZE"] = str(AGGREGATE_CACHE_SIZE)
        settings["AGGREGATE_CACHE_FASTFORWARD"] = "n"
        return Environment(name, settings)

    def construct_repository(self) -> SealedRepository:
        cache_maxsize = self.env.get(self.AGGREGATE_CACHE_MAXSIZE)
        return SealedRepository(
            self,
            event_store=self.events,
            snapshot_store=self.snapshots,
            cache_maxsize=int(cache_maxsize) if cache_maxsize else None,
            fastforward=strtobool(self.env.get(self.AGGREGATE_CACHE_FASTFORWARD, "y")),
            fastforward_skipping=strtobool(self.env.get(self.AGGREGATE_CACHE_FASTFORWARD_SKIPPING, "n")),
            deepcopy_from_cache=strtobool(self.env.get(self.DEEPCOPY_FROM_AGGREGATE_CACHE, "y")),
        )

    def take_snapshot(
        self,
        aggregate_id: UUID,
        version: int | None = None,
        projector_func: ProjectorFunction[Any, Any] = project_aggregate,
    ) -> None:
        """A sealed snapshot of the recorded state at ``version`` (default: the latest)."""
        aggregate = self.repository.get(aggregate_id, version=version, projector_func=projector_func)
        at = self.recorder.select_events(aggregate_id, gt=aggregate.version - 1, lte=aggregate.version)
        self._put_snapshot(aggregate, at[0])

    def _put_snapshot(self, aggregate: Any, event_at: StoredEvent) -> None:
        assert self.snapshots is not None
        snapshot = type(aggregate).Snapshot.take(aggregate)
        self.snapshots.put([sealed(self.mapper.transcoder, snapshot, event_at)])

    def _seal_snapshots(self, processing: ProcessingEvent[UUID], recordings: Sequence[Recording[UUID]]) -> None:
        """After a save: a sealed snapshot of each account whose new events
        reached a multiple of the interval (the newest such version only: an
        older one would be superseded at once), or whose stored snapshot was
        refused on load. From the saved account itself when the version is
        its latest, as it usually is; else replayed from the store."""
        if self.snapshots is None:
            return
        due: dict[UUID, int] = {}
        # A version below the smallest interval is a multiple of none: most of
        # a batch's events are passed over without looking their aggregate up.
        smallest = min((i for i in self.snapshotting_intervals.values() if i), default=0)
        for event in processing.events:
            if 0 < event.originator_version < smallest:
                continue
            aggregate = processing.aggregates.get(event.originator_id)
            interval = self.snapshotting_intervals.get(type(aggregate))
            if interval and event.originator_version % interval == 0:
                due[event.originator_id] = max(due.get(event.originator_id, 0), event.originator_version)
        # (Only when some are: the intersection hashes every saved aggregate's id.)
        for aggregate_id in self.unsealed.intersection(processing.aggregates) if self.unsealed else ():
            self.unsealed.discard(aggregate_id)
            aggregate = processing.aggregates[aggregate_id]
            if isinstance(aggregate, CreditAccount):  # the kind the ledger snapshots
                due[aggregate_id] = aggregate.version
        if not due:
            return
        stored = {(r.notification.originator_id, r.notification.originator_version): r.notification for r in recordings}
        for aggregate_id, version in due.items():
            event_at = stored.get((aggregate_id, version))
            aggregate = processing.aggregates[aggregate_id]
            if event_at is None or aggregate.version != version:
                self.take_snapshot(aggregate_id, version)
            else:
                self._put_snapshot(aggregate, event_at)

    def cacheable(self, aggregate: Any) -> bool:
        """Whether the command cache keeps this aggregate: not a write-only
        one, nor the record of a closed hold (nothing reads it again but the
        checks that explain a refused close, which read the store)."""
        if isinstance(aggregate, HoldRecord):
            return aggregate.status is HoldStatus.RESERVED
        return not isinstance(aggregate, self.write_only)

    def _record(self, processing_event: ProcessingEvent[UUID]) -> list[Recording[UUID]]:
        """Records the events; then caches the saved aggregates that commands
        read back (not the write-only ones), each unless the cache already
        holds a newer version of it."""
        recordings = self.events.put(
            processing_event.events, tracking=processing_event.tracking, **processing_event.saved_kwargs
        )
        if self.repository.cache is not None:
            for aggregate in processing_event.aggregates.values():
                if self.cacheable(aggregate):
                    self.repository.put(aggregate)
            # A hold reserved earlier is closed by a bare event: drop its record.
            self.evict(e.originator_id for e in processing_event.events if isinstance(e, HoldRecord.Closed))
        return recordings

    def refresh(self, aggregate_ids: Iterable[UUID]) -> None:
        """These aggregates were written elsewhere (a save of them clashed):
        their next reads fast-forward the cached copies from the store."""
        self.repository.freshness.share(list(aggregate_ids))

    def recheck(self, aggregate_ids: Iterable[UUID]) -> None:
        """These aggregates may be stale (a command on them was refused): their
        next read fast-forwards them, and they are shared if it found more."""
        self.repository.freshness.check_once(list(aggregate_ids))

    def command_stats(self) -> CommandStats:
        """The counts of attempts, clashes and loads so far."""
        return self.counters.snapshot()

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
        self._seal_snapshots(processing, recordings)
        self._notify(recordings)
        # The position of the save in the notification log, for read-your-writes.
        return max((r.notification.id for r in recordings), default=None)

    def _notify(self, recordings: list[Recording[UUID]]) -> None:
        if recordings:
            for listener in self.save_listeners:
                listener(recordings)

    def construct_transcoder(self) -> Transcoder:
        transcoder = self.factory.transcoder()
        if type(transcoder) is JSONTranscoder:  # the default: the same bytes, encoded faster
            transcoder = LedgerTranscoder()
        if isinstance(transcoder, JSONTranscoder):
            self.register_transcodings(transcoder)
        return transcoder

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
