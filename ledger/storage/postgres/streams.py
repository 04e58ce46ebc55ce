"""Bulk stream reads on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import InterfaceError, InternalError, OperationalError, StoredEvent
from eventsourcing.utils import retry
from psycopg import sql
from psycopg.pq import TransactionStatus

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

    @retry((InterfaceError, OperationalError), max_attempts=3, wait=0.2)
    def _fetch_per_id(self, recorder: Any, select: str) -> list[Any]:
        """A bulk read of many ids (``select``, with its values as literals),
        without JIT compilation, in one message. Such a read probes the index
        once per id (a LATERAL subquery fenced by OFFSET 0 or LIMIT: a join
        the planner may turn into a merge over the whole index, whose cost
        grows with the table). With no statistics on the events table (never
        analyzed), the planner guesses hundreds of rows per probe and JIT
        compiles the statement for longer than it runs (65 ms against 5 ms for
        2,000 ids), so the statement runs with ``jit`` off, for itself alone
        (SET LOCAL, inside its own transaction, or a write session's)."""
        with recorder.datastore.get_connection() as conn, conn.cursor() as curs:
            own = conn.info.transaction_status == TransactionStatus.IDLE
            message = f"{'BEGIN; ' if own else ''}SET LOCAL jit = off; {select}{'; COMMIT' if own else ''}"
            try:
                curs.execute(message.encode())
                while not (curs.statusmessage or "").startswith("SELECT"):
                    if not curs.nextset():
                        raise InternalError("a bulk read returned no rows")
                rows = list(curs.fetchall())
                if own:
                    curs.nextset()
            except BaseException:
                if own and not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
                    conn.execute("ROLLBACK")
                raise
            return rows

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
        snapshot of each id, then each id's events from its version on; each
        id's rows found through the index (``_fetch_per_id``)."""
        rows = self._fetch_per_id(self.app.recorder, self.snapshots_and_events_select(ids))
        snapshots_by_id: dict[UUID, StoredEvent] = {}
        streams: dict[UUID, list[StoredEvent]] = {}
        for r in rows:
            if r["snapshot"]:
                snapshots_by_id[r["originator_id"]] = _stored(r)
            else:
                streams.setdefault(r["originator_id"], []).append(_stored(r))
        return snapshots_by_id, streams

    def snapshots_and_events_select(self, ids: Sequence[UUID]) -> str:
        assert self.app.snapshots is not None
        snapshots_table = self._table(self.app.snapshots.recorder).as_string(None)
        events_table = self._table(self.app.recorder).as_string(None)
        return (
            f"WITH ids AS (SELECT DISTINCT unnest({_uuid_array(ids)}) AS id), "
            "snap AS (SELECT ids.id AS originator_id, s.originator_version, s.topic, s.state FROM ids "
            "CROSS JOIN LATERAL (SELECT originator_version, topic, state FROM "
            f"{snapshots_table} x WHERE x.originator_id = ids.id ORDER BY originator_version DESC LIMIT 1) s) "
            "SELECT TRUE AS snapshot, originator_id, originator_version, topic, state FROM snap "
            "UNION ALL "
            "SELECT FALSE, ids.id, e.originator_version, e.topic, e.state FROM ids "
            "LEFT JOIN snap ON snap.originator_id = ids.id CROSS JOIN LATERAL (SELECT originator_version, topic, "
            f"state FROM {events_table} x WHERE x.originator_id = ids.id "
            "AND x.originator_version >= COALESCE(snap.originator_version, 0) OFFSET 0) e "
            "ORDER BY originator_id, snapshot DESC, originator_version"
        )

    def events_after(self, after: dict[UUID, int]) -> dict[UUID, list[StoredEvent]]:
        if not after:
            return {}
        rows = self._fetch_per_id(self.app.recorder, self.events_after_select(after))
        streams: dict[UUID, list[StoredEvent]] = {}
        for r in rows:
            streams.setdefault(r["originator_id"], []).append(_stored(r))
        return streams

    def events_after_select(self, after: dict[UUID, int]) -> str:
        events_table = self._table(self.app.recorder).as_string(None)
        versions = ",".join(str(int(v)) for v in after.values())
        return (
            "SELECT t.id AS originator_id, e.originator_version, e.topic, e.state "
            f"FROM unnest({_uuid_array(after)}, '{{{versions}}}'::int[]) AS t(id, v) "
            "CROSS JOIN LATERAL (SELECT originator_version, topic, state FROM "
            f"{events_table} x WHERE x.originator_id = t.id AND x.originator_version > t.v OFFSET 0) e "
            "ORDER BY t.id, e.originator_version"
        )

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


def _uuid_array(ids: Iterable[UUID]) -> str:
    """A uuid[] literal of these ids (a UUID's text needs no quoting)."""
    return "'{" + ",".join(str(UUID(str(i))) if not isinstance(i, UUID) else str(i) for i in ids) + "}'::uuid[]"


def _stored(row: Any) -> StoredEvent:
    return StoredEvent(
        originator_id=row["originator_id"],
        originator_version=row["originator_version"],
        topic=row["topic"],
        state=bytes(row["state"]),
    )
