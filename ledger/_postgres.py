"""PostgreSQL recorder for the ledger's event store.

eventsourcing 9.5.6 inserts a save's events in psycopg's pipeline mode as one
message. For a large batch (tens of thousands of events, megabytes of
parameters) client and server were seen to wait on each other for ever in
``Pipeline.sync``. Large saves therefore go through a plain transaction: the
same statements (table lock, NOTIFY, one INSERT of all rows) without the
pipeline. Small saves keep the pipelined path, which saves round trips.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import retry
from psycopg import sql
from psycopg.errors import InterfaceError, OperationalError

#: Saves with more events than this skip pipeline mode.
PIPELINE_MAX_EVENTS = 256


class LedgerPostgresRecorder(PostgresApplicationRecorder):
    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        if len(stored_events) <= PIPELINE_MAX_EVENTS:
            ids: Sequence[int] | None = super().insert_events(stored_events, **kwargs)
            return ids
        result: Sequence[int] | None = self._insert_without_pipeline(stored_events, **kwargs)
        return result

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def _insert_without_pipeline(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        with self.datastore.get_connection() as conn, conn.transaction(), conn.cursor() as curs:
            self._insert_events(curs, stored_events, **kwargs)
            self._lock_table(curs)
            self._notify_channel(curs)
            # Four arrays of plain types bind several times faster than one
            # array of the composite row type eventsourcing uses.
            curs.execute(  # binary: no hex-encoding of every state and id
                self._insert_columns_statement(),
                (
                    [e.originator_id for e in stored_events],
                    [e.originator_version for e in stored_events],
                    [e.topic for e in stored_events],
                    [e.state for e in stored_events],
                ),
                binary=True,
            )
            ids: Sequence[int] | None = self._fetch_ids_after_insert_events(curs, stored_events, **kwargs)
            return ids

    def _insert_columns_statement(self) -> sql.Composed:
        return sql.SQL(
            "INSERT INTO {}.{} (originator_id, originator_version, topic, state) "
            "SELECT * FROM unnest(%s::uuid[], %s::int[], %s::text[], %s::bytea[]) "
            "RETURNING notification_id"
        ).format(sql.Identifier(self.datastore.schema), sql.Identifier(self.events_table_name))
