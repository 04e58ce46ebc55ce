"""The pipelined rebuild (ledger.views.pipeline): the same tables as a page by
page rebuild, errors in its reader raised, its read-ahead bounded, its reader
thread gone when it ends."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any
from uuid import uuid4

import pytest

from ledger import GrantCredits, Ledger, ManualClock, ReserveCredits, SettleReservation, SpendCredits, ViewsStalled
from ledger.views import pipeline, runner
from ledger.views.pipeline import PageReader, pipelined_catch_up
from ledger.views.projector import Progress


def readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ledger-rebuild-reader" and t.is_alive()]


def fill(ledger: Ledger, clock: ManualClock, users: int = 40) -> None:
    """Grants, spends, holds settled and lapsed, blocks expiring: every view has rows."""
    ids = [uuid4() for _ in range(users)]
    ledger.execute_batch(
        [GrantCredits(key=f"{u}:g", user_id=u, amount_credits=50, kind="purchase") for u in ids]  # type: ignore[arg-type]
    )
    ledger.execute_batch(
        [
            GrantCredits(
                key=f"{u}:b",
                user_id=u,
                amount_credits=7,
                kind="bonus",  # type: ignore[arg-type]
                expires_at=clock.now() + timedelta(hours=1),
            )
            for u in ids
        ]
    )
    ledger.execute_batch([SpendCredits(key=f"{u}:s", user_id=u, amount_credits=3) for u in ids])
    reserved = ledger.execute_batch(
        [
            ReserveCredits(
                key=f"{u}:r", user_id=u, job_id=uuid4(), amount_credits=5, expires_at=clock.now() + timedelta(minutes=5)
            )
            for u in ids
        ]
    )
    half = len(ids) // 2
    ledger.execute_batch(
        [
            SettleReservation(key=f"{u}:t", reservation_id=r.reservation_id, actual_credits=4, user_id=u)  # type: ignore[arg-type]
            for u, r in zip(ids[:half], reserved[:half], strict=True)
        ]
    )
    clock.advance(timedelta(hours=2))  # the other holds lapse, the bonus blocks expire
    ledger.record_due(ids)


def test_a_pipelined_rebuild_equals_a_page_by_page_one_and_the_live_views(
    ledger: Ledger, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(ledger, clock)
    views = ledger.views
    views.catch_up()
    monkeypatch.setattr(runner, "REBUILD_PAGE_EVENTS", 13)  # many pages, a short last one
    pages: list[Progress] = []
    piped = views.build_aside(pages.append, until=views.position(), pipelined=True)
    plain = views.build_aside(until=views.position())
    try:
        assert len(pages) > 10
        assert [p.events for p in pages] == sorted(p.events for p in pages)
        assert pages[-1].position == views.position() == piped.position() == plain.position()
        assert views.checksums(piped) == views.checksums(plain) == views.checksums()
        assert all(not found for found in views.verify(piped).values())
    finally:
        views.drop_aside(piped)
        views.drop_aside(plain)
    assert readers() == []


def test_an_event_the_reader_cannot_decode_stalls_the_views_as_without_the_pipeline(
    ledger: Ledger, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(ledger, clock, users=10)
    projector = ledger.views.projector
    head = projector.head()
    projected = ledger.app.recorder.select_notifications(start=1, limit=10_000, topics=projector.topics)
    poisoned = projected[len(projected) // 2]
    decode = ledger.app.mapper.to_domain_event

    def failing(stored: Any) -> Any:
        if stored.id == poisoned.id:
            raise RuntimeError(f"cannot decode {stored.id}")
        return decode(stored)

    monkeypatch.setattr(ledger.app.mapper, "to_domain_event", failing)
    with pytest.raises(ViewsStalled) as stalled:
        pipelined_catch_up(projector, page_events=5)
    assert stalled.value.position == poisoned.id and isinstance(stalled.value.cause, RuntimeError)
    # Every event before the poisoned one is committed; it is not.
    before = [n.id for n in projected if n.id < poisoned.id]
    assert ledger.views.position() == before[-1]
    assert readers() == []
    monkeypatch.setattr(ledger.app.mapper, "to_domain_event", decode)
    assert pipelined_catch_up(projector, page_events=5) == len(projected) - len(before)
    assert ledger.views.position() == head


def test_a_database_error_in_the_reader_is_raised(
    ledger: Ledger, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(ledger, clock, users=10)
    projector = ledger.views.projector
    select = ledger.app.recorder.select_notifications
    calls = [0]

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] >= 3:
            raise ConnectionError("the database went away")
        return select(*args, **kwargs)

    monkeypatch.setattr(ledger.app.recorder, "select_notifications", failing)
    with pytest.raises(ConnectionError, match="went away"):
        pipelined_catch_up(projector, page_events=5)
    assert calls[0] == 4  # the reader's third read, then the same page read again page by page
    assert 0 < ledger.views.position() < projector.head()  # the first two pages are committed
    assert readers() == []


def test_a_rebuild_whose_reader_fails_leaves_no_tables_and_no_thread(
    ledger: Ledger, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(ledger, clock, users=10)
    select = ledger.app.recorder.select_notifications

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("the database went away")

    monkeypatch.setattr(ledger.app.recorder, "select_notifications", broken)
    with pytest.raises(ConnectionError):
        ledger.views.build_aside(pipelined=True)
    monkeypatch.setattr(ledger.app.recorder, "select_notifications", select)
    assert readers() == []
    assert ledger.views.drop_leftover_asides() == []  # build_aside dropped its own


def test_an_error_only_the_reader_meets_is_recovered_page_by_page(
    ledger: Ledger, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transient read error ends the pipeline; the rest is read again page
    by page, and the result is the same as without the error."""
    fill(ledger, clock, users=10)
    views = ledger.views
    views.catch_up()
    expected = views.checksums()
    select = ledger.app.recorder.select_notifications
    calls = [0]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "ledger-rebuild-reader":
            calls[0] += 1
            if calls[0] == 3:
                raise ConnectionError("a dropped connection")
        return select(*args, **kwargs)

    monkeypatch.setattr(ledger.app.recorder, "select_notifications", flaky)
    monkeypatch.setattr(runner, "REBUILD_PAGE_EVENTS", 9)
    aside = views.build_aside(until=views.position(), pipelined=True)
    try:
        assert calls[0] == 3
        assert views.checksums(aside) == expected
        assert aside.position() == views.position()
    finally:
        views.drop_aside(aside)
    assert readers() == []


@pytest.mark.parametrize(("depth", "decode_in_reader"), [(1, True), (2, True), (1, False)])
def test_the_reader_runs_at_most_depth_pages_ahead_of_the_writer(
    ledger: Ledger, clock: ManualClock, monkeypatch: pytest.MonkeyPatch, depth: int, decode_in_reader: bool
) -> None:
    """The memory bound: while page k is written, the reader has read at most
    ``depth`` more pages (queued) and holds one more (waiting for room)."""
    fill(ledger, clock, users=10)
    projector = ledger.views.projector
    started: list[PageReader] = []
    real_start = PageReader.start

    def capture(self: PageReader) -> None:
        started.append(self)
        real_start(self)

    monkeypatch.setattr(PageReader, "start", capture)
    write = projector._write
    ahead: list[int] = []

    def slow_write(position: int, events: Any, new_position: int, *, commit: bool = True) -> None:
        time.sleep(0.02)  # the reader has all the time it wants to run ahead
        ahead.append(started[0].pages_read - (len(ahead) + 1))
        write(position, events, new_position, commit=commit)

    monkeypatch.setattr(projector, "_write", slow_write)
    pipelined_catch_up(projector, page_events=4, depth=depth, decode_in_reader=decode_in_reader)
    assert len(ahead) > 2 * (depth + 2)
    assert max(ahead) == depth + 1  # reached, and never passed
    assert ledger.views.position() == projector.head()
    assert readers() == []


def test_stop_ends_the_pipeline_after_the_page_in_flight(ledger: Ledger, clock: ManualClock) -> None:
    fill(ledger, clock, users=10)
    stop = threading.Event()
    seen: list[Progress] = []

    def progress(p: Progress) -> None:
        seen.append(p)
        stop.set()

    projected = pipelined_catch_up(ledger.views.projector, page_events=6, progress=progress, stop=stop)
    assert projected == 6 and len(seen) == 1
    assert ledger.views.position() == seen[0].position < ledger.views.projector.head()
    assert readers() == []


def test_the_depth_and_page_size_are_bounded(ledger: Ledger) -> None:
    from ledger.errors import InvalidArgument

    with pytest.raises(InvalidArgument):
        pipelined_catch_up(ledger.views.projector, depth=0)
    with pytest.raises(InvalidArgument):
        pipelined_catch_up(ledger.views.projector, depth=pipeline.MAX_PIPELINE_DEPTH + 1)
    with pytest.raises(InvalidArgument):
        pipelined_catch_up(ledger.views.projector, page_events=10_001)


def test_decoding_in_the_writer_gives_the_same_tables(ledger: Ledger, clock: ManualClock) -> None:
    from ledger.views.projector import Projector
    from ledger.views.registry import default_views, schema_tables

    fill(ledger, clock, users=15)
    views = ledger.views
    views.catch_up()
    aside = views.backend.view_store_aside(ledger.app)
    try:
        aside.migrate(schema_tables())
        projector = Projector(ledger.app, aside, default_views(sync_user_credits=False))
        assert pipelined_catch_up(projector, page_events=11, decode_in_reader=False) > 0
        assert views.checksums(aside) == views.checksums()
    finally:
        views.drop_aside(aside)
    assert readers() == []


@pytest.mark.postgres
def test_a_rebuild_aside_has_every_index_of_the_live_tables(pg_url: str, clock: ManualClock) -> None:
    """The secondary indexes of the tables a rebuild only appends to are
    built after its rows (``ViewStore.indexes_built_after``): the aside ends
    with the same indexes, defined the same, as the live tables."""
    import psycopg
    from conftest import pg_base_url

    def indexes(conn: Any, schema: str) -> dict[str, str]:
        rows = conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s", (schema,)).fetchall()
        return {name: definition.replace(f'"{schema}".', "").replace(f"{schema}.", "") for name, definition in rows}

    with Ledger(pg_url, clock=clock) as ledger:
        fill(ledger, clock, users=5)
        views = ledger.views
        views.catch_up()
        aside = views.build_aside(until=views.position())
        try:
            assert views.checksums(aside) == views.checksums()
            with psycopg.connect(pg_base_url(), autocommit=True) as conn:
                live, rebuilt = indexes(conn, ledger.config.pg_schema), indexes(conn, aside.schema)  # type: ignore[attr-defined]
            deferred = {n for n in live if n.startswith(("idx_credit_transactions", "idx_credit_reservations"))}
            assert deferred and deferred <= set(rebuilt)
            assert {n: live[n] for n in live if n in rebuilt} == rebuilt  # same definitions
        finally:
            views.drop_aside(aside)
