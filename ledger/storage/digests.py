"""Where the audit's anchors live: the ``ledger_digests`` table beside the
event store (the SQLite file, the PostgreSQL schema), or the memory of an
in-memory ledger. Each backend hands out its own (``Backend.digest_store``);
the hash chain itself is the audit's (``ledger.audit.digest``)."""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

DIGESTS_TABLE = "ledger_digests"
#: One anchored event in a segment's ``leaves``: notification id, content hash.
# The id is signed, as in the chain (``ledger.audit.digest``): the same bytes
# for the ledger's ids, and an id written by hand below 1 still packs.
ENTRY = struct.Struct(">q8s")


@dataclass(frozen=True)
class Segment:
    """A ``ledger_digests`` row: the anchors of ``size`` consecutive events."""

    index: int
    size: int
    first_position: int
    position: int
    events_before: int
    digest: str
    leaves: bytes  # per event: 8-byte id, 8-byte content hash
    recorded_at: datetime

    @property
    def count(self) -> int:
        return len(self.leaves) // ENTRY.size

    def malformed(self) -> str | None:
        """Why the row cannot be read as anchors (an edit by hand), or None."""
        if not isinstance(self.leaves, bytes):
            return f"its leaves are a {type(self.leaves).__name__}, not bytes"
        if len(self.leaves) % ENTRY.size:
            return f"its leaves are {len(self.leaves)} bytes, not a multiple of {ENTRY.size}"
        for name in ("first_position", "position", "events_before"):
            if type(getattr(self, name)) is not int:
                return f"its {name} is {getattr(self, name)!r}"
        return None

    def entries(self) -> Iterator[tuple[int, bytes]]:
        for offset in range(0, len(self.leaves), ENTRY.size):
            position, leaf = ENTRY.unpack_from(self.leaves, offset)
            yield position, leaf


class DigestStore(ABC):
    """Where the anchor segments live: beside the event store."""

    @abstractmethod
    def segments(self, first_index: int = 0) -> Iterator[Segment]:
        """Stored segments in order, from ``first_index``."""

    @abstractmethod
    def last(self) -> Segment | None: ...

    @abstractmethod
    def put(self, segments: Sequence[Segment]) -> None:
        """Inserts or replaces segments by index, in one transaction."""


class MemoryDigestStore(DigestStore):
    def __init__(self) -> None:
        self.rows: dict[int, Segment] = {}

    def segments(self, first_index: int = 0) -> Iterator[Segment]:
        for index in sorted(i for i in self.rows if i >= first_index):
            yield self.rows[index]

    def last(self) -> Segment | None:
        return self.rows[max(self.rows)] if self.rows else None

    def put(self, segments: Sequence[Segment]) -> None:
        self.rows.update({s.index: s for s in segments})


_COLUMNS = "segment, size, first_position, position, events_before, digest, leaves, recorded_at"
_READ_PAGE = 50


class SQLDigestStore(DigestStore):
    """``ledger_digests`` in the event store's SQLite file or PostgreSQL schema."""

    def __init__(self, datastore: Any, *, postgres: bool) -> None:
        self.datastore = datastore
        self.postgres = postgres
        # The schema is a checked lowercase identifier (storage.config.check_identifier).
        self.table = f'"{datastore.schema}".{DIGESTS_TABLE}' if postgres else DIGESTS_TABLE
        self._exists: bool | None = None

    def exists(self) -> bool:
        """Whether a digest run created the table. Reading never creates it, so
        ``verify`` works with read-only access and on stores never anchored."""
        if not self._exists:
            if self.postgres:
                query = "SELECT to_regclass(%s) IS NOT NULL AS found"
                name = f'"{self.datastore.schema}".{DIGESTS_TABLE}'
            else:
                query = "SELECT COUNT(*) > 0 AS found FROM sqlite_master WHERE type = 'table' AND name = ?"
                name = DIGESTS_TABLE
            with self.datastore.transaction(commit=False) as cursor:
                cursor.execute(query, [name])
                self._exists = bool(cursor.fetchall()[0]["found"])
        return self._exists

    def _create(self) -> None:
        blob, stamp = ("BYTEA", "TIMESTAMP") if self.postgres else ("BLOB", "TEXT")
        with self.datastore.transaction(commit=True) as cursor:
            cursor.execute(
                self._text(
                    (
                        "CREATE TABLE IF NOT EXISTS {} (segment BIGINT PRIMARY KEY, size INT NOT NULL, "
                        "first_position BIGINT NOT NULL, position BIGINT NOT NULL, events_before BIGINT NOT NULL, "
                        "digest TEXT NOT NULL, leaves " + blob + " NOT NULL, recorded_at " + stamp + " NOT NULL)"
                    ).format(self.table)
                )
            )
        self._exists = True

    def _text(self, statement: str) -> str:
        return statement if self.postgres else statement.replace("%s", "?")

    def _fetch(self, statement: str, params: Sequence[Any]) -> list[Any]:
        if not self.exists():
            return []
        with self.datastore.transaction(commit=False) as cursor:
            cursor.execute(self._text(statement), params)
            return list(cursor.fetchall())

    def segments(self, first_index: int = 0) -> Iterator[Segment]:
        # Pages of a few rows: each row holds a segment's per-event anchors.
        index = first_index
        while True:
            rows = self._fetch(
                ("SELECT " + _COLUMNS + " FROM {} WHERE segment >= %s ORDER BY segment LIMIT %s").format(self.table),
                [index, _READ_PAGE],
            )
            for row in rows:
                yield self._segment(row)
            if len(rows) < _READ_PAGE:
                return
            index = int(rows[-1]["segment"]) + 1

    def last(self) -> Segment | None:
        rows = self._fetch(
            ("SELECT " + _COLUMNS + " FROM {} ORDER BY segment DESC LIMIT 1").format(self.table),
            [],
        )
        return self._segment(rows[0]) if rows else None

    def put(self, segments: Sequence[Segment]) -> None:
        if not self.exists():
            self._create()
        statement = self._text(
            (
                "INSERT INTO {} (" + _COLUMNS + ") VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (segment) DO UPDATE SET size = excluded.size, "
                "first_position = excluded.first_position, position = excluded.position, "
                "events_before = excluded.events_before, digest = excluded.digest, leaves = excluded.leaves, "
                "recorded_at = excluded.recorded_at"
            ).format(self.table)
        )
        rows = [
            [
                s.index,
                s.size,
                s.first_position,
                s.position,
                s.events_before,
                s.digest,
                s.leaves,
                s.recorded_at.replace(tzinfo=None) if self.postgres else s.recorded_at.isoformat(),
            ]
            for s in segments
        ]
        with self.datastore.transaction(commit=True) as cursor:
            for row in rows:
                cursor.execute(statement, row)

    @staticmethod
    def _segment(row: Any) -> Segment:
        recorded = row["recorded_at"]
        if isinstance(recorded, str):
            recorded = datetime.fromisoformat(recorded)
        return Segment(
            index=int(row["segment"]),
            size=int(row["size"]),
            first_position=int(row["first_position"]),
            position=int(row["position"]),
            events_before=int(row["events_before"]),
            digest=str(row["digest"]),
            leaves=bytes(row["leaves"]),
            recorded_at=recorded if recorded.tzinfo else recorded.replace(tzinfo=UTC),
        )
