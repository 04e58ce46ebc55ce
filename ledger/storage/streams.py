"""Loading many aggregates at once, for batches.

eventsourcing's repository reads one aggregate per call (a snapshot query and
an events query). A batch of 10,000 renewals would then cost 20,000 round
trips, so each backend implements :class:`StreamReader`: the newest snapshot of
every id in one query, then every event of every id from the snapshot's version
on in one query. The event at the snapshot's version is read too: the
snapshot's seal covers it (see ``_snapshots``), and a snapshot that fails its
check is not used.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import StoredEvent

from ledger.storage.sealing import trusted

#: Ids per query: keeps statements and result sets bounded.
CHUNK_IDS = 2_000
#: Rows per read of the snapshot index.
INDEX_PAGE = 10_000


class StreamReader(ABC):
    def __init__(self, app: Application[UUID]) -> None:
        self.app = app

    @abstractmethod
    def latest_snapshots(self, ids: Sequence[UUID]) -> dict[UUID, StoredEvent]:
        """The newest stored snapshot of each id that has one."""

    @abstractmethod
    def events_after(self, after: dict[UUID, int]) -> dict[UUID, list[StoredEvent]]:
        """Stored events of each id with a version above the given one, in order."""

    @abstractmethod
    def snapshot_index(self) -> Iterator[tuple[UUID, int]]:
        """(id, version) of every stored snapshot, ordered by id, then version."""

    def snapshots_and_events(
        self, ids: Sequence[UUID]
    ) -> tuple[dict[UUID, StoredEvent], dict[UUID, list[StoredEvent]]]:
        """The newest snapshot of each id that has one, and each id's events
        from the snapshot's version on (all of them without one). A backend
        may do it in one query."""
        snapshots_by_id = self.latest_snapshots(ids)
        after = {i: (snapshots_by_id[i].originator_version - 1 if i in snapshots_by_id else 0) for i in ids}
        return snapshots_by_id, self.events_after(after)

    def load(self, ids: Sequence[UUID], *, snapshots: bool = True) -> dict[UUID, Any]:
        """The current state of each id that exists; absent ids are left out.
        ``snapshots=False`` skips the snapshot query for kinds never snapshotted."""
        found: dict[UUID, Any] = {}
        use_snapshots = snapshots and self.app.snapshots is not None
        for start in range(0, len(ids), CHUNK_IDS):
            chunk = list(dict.fromkeys(ids[start : start + CHUNK_IDS]))
            if use_snapshots:
                snapshots_by_id, streams = self.snapshots_and_events(chunk)
            else:
                snapshots_by_id, streams = {}, self.events_after(dict.fromkeys(chunk, 0))
            states = self._from_snapshots(snapshots_by_id, streams)
            for aggregate_id, stream in streams.items():
                aggregate = states.get(aggregate_id)
                for stored in stream:
                    aggregate = self.app.mapper.to_domain_event(stored).mutate(aggregate)  # type: ignore[attr-defined]
                states[aggregate_id] = aggregate
            found.update(states)
        return found

    def _from_snapshots(
        self, snapshots_by_id: dict[UUID, StoredEvent], streams: dict[UUID, list[StoredEvent]]
    ) -> dict[UUID, Any]:
        """States restored from the snapshots that pass their check; ``streams``
        left holding the events to apply after them (all the events of an id
        whose snapshot was refused)."""
        states: dict[UUID, Any] = {}
        refused: dict[UUID, int] = {}
        for aggregate_id, stored in snapshots_by_id.items():
            stream = streams.get(aggregate_id, [])
            at = stream[0] if stream and stream[0].originator_version == stored.originator_version else None
            snapshot = trusted(self.app, stored, at)
            if snapshot is None:
                refused[aggregate_id] = 0
                continue
            states[aggregate_id] = snapshot.mutate(None)
            streams[aggregate_id] = stream[1:]
        if refused:
            streams.update(self.events_after(refused))
        return states


class PerIdReader(StreamReader):
    """Any store, one query per id: for the in-memory store, where that is cheap."""

    def latest_snapshots(self, ids: Sequence[UUID]) -> dict[UUID, StoredEvent]:
        assert self.app.snapshots is not None
        found = {}
        for aggregate_id in ids:
            newest = self.app.snapshots.recorder.select_events(aggregate_id, desc=True, limit=1)
            if newest:
                found[aggregate_id] = newest[0]
        return found

    def events_after(self, after: dict[UUID, int]) -> dict[UUID, list[StoredEvent]]:
        streams = {}
        for aggregate_id, version in after.items():
            stream = self.app.recorder.select_events(aggregate_id, gt=version or None)
            if stream:
                streams[aggregate_id] = list(stream)
        return streams

    def snapshot_index(self) -> Iterator[tuple[UUID, int]]:
        assert self.app.snapshots is not None
        # The in-memory recorder's own index: ids as strings, versions per id.
        index: dict[str, dict[int, int]] = getattr(self.app.snapshots.recorder, "_stored_events_index", {})
        for aggregate_id in sorted(index, key=UUID):
            for version in sorted(index[aggregate_id]):
                yield UUID(aggregate_id), version
