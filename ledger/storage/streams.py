"""Loading many aggregates at once, for batches.

eventsourcing's repository reads one aggregate per call (a snapshot query and
an events query). A batch of 10,000 renewals would then cost 20,000 round
trips, so each backend implements :class:`StreamReader`: the newest snapshot of
every id in one query, then every later event of every id in one query.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import StoredEvent

#: Ids per query: keeps statements and result sets bounded.
CHUNK_IDS = 2_000


class StreamReader(ABC):
    def __init__(self, app: Application[UUID]) -> None:
        self.app = app

    @abstractmethod
    def latest_snapshots(self, ids: Sequence[UUID]) -> dict[UUID, StoredEvent]:
        """The newest stored snapshot of each id that has one."""

    @abstractmethod
    def events_after(self, after: dict[UUID, int]) -> dict[UUID, list[StoredEvent]]:
        """Stored events of each id with a version above the given one, in order."""

    def snapshots_and_events(
        self, ids: Sequence[UUID]
    ) -> tuple[dict[UUID, StoredEvent], dict[UUID, list[StoredEvent]]]:
        """The newest snapshot of each id that has one, and each id's events
        after it (after version 0 without one). A backend may do it in one query."""
        snapshots_by_id = self.latest_snapshots(ids)
        after = {i: (snapshots_by_id[i].originator_version if i in snapshots_by_id else 0) for i in ids}
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
            states: dict[UUID, Any] = {}
            for aggregate_id, stored in snapshots_by_id.items():
                states[aggregate_id] = self.app.mapper.to_domain_event(stored).mutate(None)  # type: ignore[attr-defined]
            for aggregate_id, stream in streams.items():
                aggregate = states.get(aggregate_id)
                for stored in stream:
                    aggregate = self.app.mapper.to_domain_event(stored).mutate(aggregate)  # type: ignore[attr-defined]
                states[aggregate_id] = aggregate
            found.update(states)
        return found


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
