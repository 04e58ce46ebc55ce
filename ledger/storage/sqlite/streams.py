"""Bulk stream reads on SQLite."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import StoredEvent

from ledger.storage.streams import INDEX_PAGE, StreamReader


class SQLiteReader(StreamReader):
    def _fetch(self, recorder: Any, query: str, params: Sequence[Any]) -> list[Any]:
        with recorder.datastore.transaction(commit=False) as c:
            c.execute(query, params)
            return list(c.fetchall())

    def latest_snapshots(self, ids: Sequence[UUID]) -> dict[UUID, StoredEvent]:
        assert self.app.snapshots is not None
        recorder: Any = self.app.snapshots.recorder
        marks = ",".join("?" * len(ids))
        # SQLite returns the row of the MAX() in a bare aggregate query.
        query = (
            "SELECT originator_id, MAX(originator_version) AS originator_version, topic, state "
            f"FROM {recorder.events_table_name} WHERE originator_id IN ({marks}) GROUP BY originator_id"
        )
        rows = self._fetch(recorder, query, [i.hex for i in ids])
        return {UUID(r["originator_id"]): _stored(r) for r in rows}

    def events_after(self, after: dict[UUID, int]) -> dict[UUID, list[StoredEvent]]:
        recorder: Any = self.app.recorder
        marks = ",".join("(?, ?)" * 1 for _ in after)
        query = (
            f"WITH t(id, v) AS (VALUES {marks}) "
            "SELECT e.originator_id, e.originator_version, e.topic, e.state "
            f"FROM {recorder.events_table_name} e JOIN t ON e.originator_id = t.id AND e.originator_version > t.v "
            "ORDER BY e.originator_id, e.originator_version"
        )
        params: list[Any] = []
        for aggregate_id, version in after.items():
            params.extend((aggregate_id.hex, version))
        streams: dict[UUID, list[StoredEvent]] = {}
        for r in self._fetch(recorder, query, params):
            streams.setdefault(UUID(r["originator_id"]), []).append(_stored(r))
        return streams

    def snapshot_index(self) -> Iterator[tuple[UUID, int]]:
        assert self.app.snapshots is not None
        recorder: Any = self.app.snapshots.recorder
        query = (
            "SELECT originator_id, originator_version FROM "
            f"{recorder.events_table_name} WHERE originator_id > ? OR (originator_id = ? AND originator_version > ?) "
            "ORDER BY originator_id, originator_version LIMIT ?"
        )
        last: tuple[str, int] = ("", -1)
        while True:
            rows = self._fetch(recorder, query, [last[0], last[0], last[1], INDEX_PAGE])
            for r in rows:
                last = (r["originator_id"], r["originator_version"])
                yield UUID(last[0]), last[1]
            if len(rows) < INDEX_PAGE:
                return


def _stored(row: Any) -> StoredEvent:
    return StoredEvent(
        originator_id=UUID(row["originator_id"]),
        originator_version=row["originator_version"],
        topic=row["topic"],
        state=bytes(row["state"]),
    )
