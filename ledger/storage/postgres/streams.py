"""Bulk stream reads on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import InterfaceError, OperationalError, StoredEvent
from eventsourcing.utils import retry
from psycopg import sql

from ledger.storage.streams import INDEX_PAGE, StreamReader


class PostgresReader(StreamReader):
    def _table(self, recorder: Any) -> sql.Composed:
        return sql.SQL("{}.{}").format(
            sql.Identifier(recorder.datastore.schema), sql.Identifier(recorder.events_table_name)
        )

    # Like eventsourcing's own reads: a connection that died (a restart, a
    # failover) is replaced and the read run again, a bounded number of times.
    @retry((InterfaceError, OperationalError), max_attempts=3, wait=0.2)
    def _fetch(self, recorder: Any, query: sql.Composable, params: Sequence[Any]) -> list[Any]:
        # One statement in autocommit (the pool's mode), as eventsourcing's
        # select_events does: no BEGIN and ROLLBACK round trips around it.
        with recorder.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(query, params, binary=True)
            return list(curs.fetchall())

    def latest_snapshots(self, ids: Sequence[UUID]) -> dict[UUID, StoredEvent]:
        assert self.app.snapshots is not None
        recorder: Any = self.app.snapshots.recorder
        query = sql.SQL(
            "SELECT DISTINCT ON (originator_id) originator_id, originator_version, topic, state "
            "FROM {} WHERE originator_id = ANY(%s) ORDER BY originator_id, originator_version DESC"
        ).format(self._table(recorder))
        rows = self._fetch(recorder, query, [list(ids)])
        return {r["originator_id"]: _stored(r) for r in rows}

    def snapshots_and_events(
        self, ids: Sequence[UUID]
    ) -> tuple[dict[UUID, StoredEvent], dict[UUID, list[StoredEvent]]]:
        """One statement (one round trip, one consistent view): the newest
        snapshot of each id, then each id's events from its version on."""
        assert self.app.snapshots is not None
        snapshots_table = self._table(self.app.snapshots.recorder)
        query = sql.SQL(
            "WITH ids AS (SELECT DISTINCT unnest(%s::uuid[]) AS id), "
            "snap AS (SELECT DISTINCT ON (s.originator_id) s.originator_id, s.originator_version, s.topic, s.state "
            "FROM {} s JOIN ids ON s.originator_id = ids.id ORDER BY s.originator_id, s.originator_version DESC) "
            "SELECT TRUE AS snapshot, originator_id, originator_version, topic, state FROM snap "
            "UNION ALL "
            "SELECT FALSE, e.originator_id, e.originator_version, e.topic, e.state FROM {} e "
            "JOIN ids ON e.originator_id = ids.id LEFT JOIN snap ON snap.originator_id = ids.id "
            "WHERE e.originator_version >= COALESCE(snap.originator_version, 0) "
            "ORDER BY originator_id, snapshot DESC, originator_version"
        ).format(snapshots_table, self._table(self.app.recorder))
        rows = self._fetch(self.app.recorder, query, [list(ids)])
        snapshots_by_id: dict[UUID, StoredEvent] = {}
        streams: dict[UUID, list[StoredEvent]] = {}
        for r in rows:
            if r["snapshot"]:
                snapshots_by_id[r["originator_id"]] = _stored(r)
            else:
                streams.setdefault(r["originator_id"], []).append(_stored(r))
        return snapshots_by_id, streams

    def events_after(self, after: dict[UUID, int]) -> dict[UUID, list[StoredEvent]]:
        recorder: Any = self.app.recorder
        query = sql.SQL(
            "SELECT e.originator_id, e.originator_version, e.topic, e.state "
            "FROM {} e JOIN unnest(%s::uuid[], %s::int[]) AS t(id, v) "
            "ON e.originator_id = t.id AND e.originator_version > t.v "
            "ORDER BY e.originator_id, e.originator_version"
        ).format(self._table(recorder))
        rows = self._fetch(recorder, query, [list(after), list(after.values())])
        streams: dict[UUID, list[StoredEvent]] = {}
        for r in rows:
            streams.setdefault(r["originator_id"], []).append(_stored(r))
        return streams

    def snapshot_index(self) -> Iterator[tuple[UUID, int]]:
        assert self.app.snapshots is not None
        recorder: Any = self.app.snapshots.recorder
        query = sql.SQL(
            "SELECT originator_id, originator_version FROM {} "
            "WHERE (originator_id, originator_version) > (%s, %s) "
            "ORDER BY originator_id, originator_version LIMIT %s"
        ).format(self._table(recorder))
        last: tuple[UUID, int] = (UUID(int=0), -1)
        while True:
            rows = self._fetch(recorder, query, [last[0], last[1], INDEX_PAGE])
            for r in rows:
                last = (r["originator_id"], r["originator_version"])
                yield last
            if len(rows) < INDEX_PAGE:
                return


def _stored(row: Any) -> StoredEvent:
    return StoredEvent(
        originator_id=row["originator_id"],
        originator_version=row["originator_version"],
        topic=row["topic"],
        state=bytes(row["state"]),
    )
