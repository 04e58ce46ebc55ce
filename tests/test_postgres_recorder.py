"""The ledger's PostgreSQL event recorder: a command's save in one round trip
(rows as SQL literals), a batch through COPY, and what a failed save leaves."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from eventsourcing.persistence import IntegrityError, StoredEvent

from ledger import Ledger
from ledger.storage.postgres.recorder import VALUES_MAX_ROWS, LedgerPostgresRecorder

pytestmark = pytest.mark.postgres

#: Bytes and text a literal must carry unchanged: quotes, backslashes, NUL,
#: high bytes, a would-be statement terminator.
AWKWARD_STATE = b"\x00\\x41'\"; COMMIT; --\xff\xfe{}\n\r\t"
AWKWARD_TOPIC = "pingvas.ledger:it's\\a; DROP TABLE x; --\u00e9"


def _events(originator: uuid.UUID, count: int, start: int = 1) -> list[StoredEvent]:
    return [
        StoredEvent(
            originator_id=originator, originator_version=v, topic=AWKWARD_TOPIC, state=AWKWARD_STATE + bytes([v % 256])
        )
        for v in range(start, start + count)
    ]


def _recorder(ledger: Ledger) -> LedgerPostgresRecorder:
    recorder = ledger.app.recorder
    assert isinstance(recorder, LedgerPostgresRecorder)
    return recorder


@pytest.fixture
def one_round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts saves that took the one-round-trip path."""
    calls: list[int] = []
    original = LedgerPostgresRecorder._insert_in_one_round_trip

    def spy(self: LedgerPostgresRecorder, conn: Any, curs: Any, events: Any, *, begin: bool = True) -> list[int]:
        calls.append(len(events))
        return original(self, conn, curs, events, begin=begin)

    monkeypatch.setattr(LedgerPostgresRecorder, "_insert_in_one_round_trip", spy)
    return calls


@pytest.mark.parametrize("count", [1, VALUES_MAX_ROWS, VALUES_MAX_ROWS + 1, 2_000])
def test_saved_events_read_back_byte_for_byte(pg_url: str, count: int, one_round_trips: list[int]) -> None:
    with Ledger(pg_url) as ledger:
        recorder = _recorder(ledger)
        originator = uuid.uuid4()
        events = _events(originator, count)
        ids = recorder.insert_events(events)
        assert one_round_trips == ([count] if count <= VALUES_MAX_ROWS else [])
        assert ids is not None and len(ids) == count and list(ids) == sorted(ids)
        assert list(recorder.select_events(originator)) == events
        notified = recorder.select_notifications(ids[0], limit=count)
        assert [n.id for n in notified] == list(ids)
        assert [(n.originator_version, n.state) for n in notified] == [(e.originator_version, e.state) for e in events]


def test_a_clashing_save_records_nothing_and_leaves_the_connection_usable(
    pg_url: str, one_round_trips: list[int]
) -> None:
    with Ledger(f"{pg_url}&pool_size=1&max_overflow=0") as ledger:
        recorder = _recorder(ledger)
        originator = uuid.uuid4()
        recorder.insert_events(_events(originator, 2))
        head = recorder.max_notification_id()
        # Versions 3 and 2: the second row clashes with the stored version 2.
        clash = [*_events(originator, 1, start=3), *_events(originator, 1, start=2)]
        with pytest.raises(IntegrityError):
            recorder.insert_events(clash)
        assert recorder.max_notification_id() == head  # version 3 was not kept either
        assert [e.originator_version for e in recorder.select_events(originator)] == [1, 2]
        # The pool's one connection was rolled back and is back in autocommit use.
        ids = recorder.insert_events(_events(originator, 1, start=3))
        assert ids is not None and ids[0] > (head or 0)
        assert len(one_round_trips) == 3
