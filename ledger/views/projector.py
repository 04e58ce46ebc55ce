"""Runs views over the event log: catch-up, follow, rebuild, verify.

Each page of events is written by every view, with the new tracking position,
in one transaction, after checking that the recorded position is still the
one the page was read from. A crash loses at most the page in flight, which is
then read again: no row is lost and none is written twice.

An event that cannot be written (a value the database refuses, a state that
does not decode) would fail its page on every attempt. When a page fails so,
its events are tried one at a time to find that event; the events before it
are committed, and ``ViewsStalled`` names it (position, topic, originator).
The projector does not skip it: the views would then silently lack a posting.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from eventsourcing.persistence import IntegrityError, Notification

from ledger.errors import InvalidArgument, ViewsStalled
from ledger.storage.eventstore import LedgerApplication
from ledger.storage.viewstore import TRACKED_APPLICATION, ViewStore, ViewTx
from ledger.views.base import View

log = logging.getLogger("ledger.projector")

#: Events per transaction: bounds memory and the work lost to a crash.
PAGE_EVENTS = 1_000
MAX_STALE_RETRIES = 10


class StalePosition(Exception):
    """Another writer moved the tracking position since the page was read."""


class _RollBack(Exception):
    """Ends a transaction that only tries whether events can be written."""


@dataclass(frozen=True)
class Progress:
    position: int
    head: int
    events: int


class Projector:
    def __init__(self, app: LedgerApplication, store: ViewStore, views: Sequence[View]) -> None:
        if not views:
            raise InvalidArgument("a projector needs at least one view")
        self.app = app
        self.store = store
        self.views = list(views)
        self.topics = sorted({t for v in self.views for t in v.topics})
        self._view_topics = [frozenset(v.topics) for v in self.views]
        self._lock = threading.Lock()  # one page at a time in this process

    def head(self) -> int:
        return self.app.recorder.max_notification_id() or 0

    def lag(self) -> int:
        return max(0, self.head() - self.store.position())

    def catch_up(
        self,
        *,
        page_events: int = PAGE_EVENTS,
        progress: Callable[[Progress], None] | None = None,
        until: int | None = None,
        stop: threading.Event | None = None,
    ) -> int:
        """Projects every event recorded so far (or up to position ``until``);
        returns how many events were projected."""
        if not 1 <= page_events <= 10_000:
            raise InvalidArgument(f"page_events must be within 1..10000, got {page_events}")
        projected = 0
        stale = 0
        with self._lock:
            while True:
                start = self.store.position()
                try:
                    count, done = self._one_page(page_events, until, start)
                except (StalePosition, IntegrityError):
                    if self.store.position() != start:
                        # Another projector committed the page first (or a
                        # rebuild swapped its tables in): the views moved on,
                        # which is progress, not a failure, however often it
                        # happens. Go on from where they are now.
                        log.debug("lost the page from position %d to another projector", start)
                        continue
                    # The position did not move: the page itself conflicts
                    # (rows already there past the position). Retry a few
                    # times, then say so.
                    stale += 1
                    if stale > MAX_STALE_RETRIES:
                        raise
                    continue
                projected += count
                stale = 0
                if progress is not None:
                    progress(Progress(self.store.position(), self.head(), projected))
                if done or (stop is not None and stop.is_set()):
                    return projected

    def _one_page(self, page_events: int, until: int | None, position: int) -> tuple[int, bool]:
        # The head is read first: writers commit in notification-id order (the
        # table lock), so every matching event up to the head is visible now.
        head = self.head() if until is None else min(until, self.head())
        if head <= position:
            return 0, True
        notifications = self.app.recorder.select_notifications(
            start=position + 1, limit=page_events, stop=head, topics=self.topics
        )
        # With no matching events left below the head, jump to the head.
        new_position = notifications[-1].id if len(notifications) == page_events else head
        try:
            events = [(n.id, self.app.mapper.to_domain_event(n)) for n in notifications]
            self._write(position, events, new_position)
        except StalePosition:
            raise
        except Exception as exc:
            if not self.store.cannot_write(exc):
                raise  # the database, not the events: the next attempt may succeed
            stalled = self._stalled_at(position, notifications, commit=True)
            if stalled is None:  # each event writes: the page met a concurrent writer
                raise StalePosition(f"page after {position} failed, its events did not: {exc}") from exc
            log.error("%s", stalled)
            raise stalled from stalled.cause
        return len(events), new_position >= head

    def _write(
        self, position: int, events: Sequence[tuple[int, Any]], new_position: int, *, commit: bool = True
    ) -> None:
        """Writes a page and the new position in one transaction (rolled back
        unless ``commit``)."""
        try:
            with self.store.transaction() as tx:
                self._expect(tx, position)
                topics = [_topic(e) for _, e in events]  # once an event, whatever the views
                for view, wanted in zip(self.views, self._view_topics, strict=True):
                    mine = [pe for pe, topic in zip(events, topics, strict=True) if topic in wanted]
                    if mine:
                        view.process(mine, tx)
                tx.track(new_position)
                if not commit:
                    raise _RollBack
        except _RollBack:
            pass

    def _stalled_at(self, position: int, notifications: Sequence[Notification], *, commit: bool) -> ViewsStalled | None:
        """Tries the events one at a time, in one transaction that is rolled
        back, and returns the first that cannot be written (None if all can).
        With ``commit``, the events before it are then committed."""
        written: list[tuple[int, Any]] = []
        stalled: ViewsStalled | None = None
        try:
            with self.store.transaction() as tx:
                self._expect(tx, position)
                for n in notifications:
                    try:
                        event = self.app.mapper.to_domain_event(n)
                        for view in self.views:
                            if _topic(event) in view.topics:
                                view.process([(n.id, event)], tx)
                    except Exception as exc:
                        if not self.store.cannot_write(exc):
                            raise
                        stalled = ViewsStalled(n.id, n.topic, n.originator_id, n.originator_version, exc)
                        break
                    written.append((n.id, event))
                raise _RollBack
        except _RollBack:
            pass
        if stalled is None:
            return None
        if commit and written:
            self._write(position, written, written[-1][0])  # StalePosition if another writer moved on
        elif self.store.position() != position:
            raise StalePosition(f"tracking moved from {position} while the page was tried")
        return stalled

    def stalled(self, *, page_events: int = PAGE_EVENTS) -> ViewsStalled | None:
        """The event the views are stalled at, or None when the events after
        their position can be written (or there are none). Writes nothing:
        the events are tried in a transaction that is rolled back."""
        with self._lock:
            position = self.store.position()
            head = self.head()
            if head <= position:
                return None
            notifications = self.app.recorder.select_notifications(
                start=position + 1, limit=page_events, stop=head, topics=self.topics
            )
            if not notifications:
                return None
            try:
                try:
                    events = [(n.id, self.app.mapper.to_domain_event(n)) for n in notifications]
                    self._write(position, events, notifications[-1].id, commit=False)
                    return None
                except StalePosition:
                    raise
                except Exception as exc:
                    if not self.store.cannot_write(exc):
                        raise
                return self._stalled_at(position, notifications, commit=False)
            except StalePosition:
                return None  # a projector is moving the views on

    @staticmethod
    def _expect(tx: ViewTx, position: int) -> None:
        rows = tx.fetchall(
            f"SELECT notification_id FROM {_tracking_table(tx)} WHERE application_name = %s", [TRACKED_APPLICATION]
        )
        recorded = rows[0][0] if rows else 0
        if recorded != position:
            raise StalePosition(f"tracking moved from {position} to {recorded}")

    def follow(
        self,
        stop: threading.Event,
        *,
        poll_s: float = 1.0,
        wake: Callable[[float], None] | None = None,
        on_lag: Callable[[int, int], None] | None = None,
    ) -> None:
        """Projects new events until ``stop`` is set. ``wake(timeout_s)`` blocks
        until new events may exist (LISTEN/NOTIFY); polling is the fallback."""
        while not stop.is_set():
            self.catch_up(stop=stop)  # a SIGTERM ends a long backlog after the page in flight
            if on_lag is not None:
                on_lag(self.store.position(), self.head())
            if wake is not None:
                wake(poll_s)
            else:
                stop.wait(poll_s)


def _topic(event: Any) -> str:
    return str(type(event).TOPIC)


def _tracking_table(tx: ViewTx) -> str:
    return str(getattr(getattr(tx, "tracking", None), "tracking_table_name", "tracking"))


# -- checksums and comparison ------------------------------------------------------------


def table_rows(store: ViewStore, table: str, order_by: str, skip: tuple[str, ...]) -> Iterator[tuple[Any, ...]]:
    columns = store.columns(table)
    keep = [i for i, c in enumerate(columns) if c not in skip]
    for row in store.rows(table, order_by):
        yield tuple(row[i] for i in keep)


def checksum(store: ViewStore, table: str, order_by: str, skip: tuple[str, ...]) -> tuple[int, str]:
    """Row count and SHA-256 over the rows in order; streams the table."""
    digest = hashlib.sha256()
    count = 0
    for row in table_rows(store, table, order_by, skip):
        digest.update(repr(row).encode())
        count += 1
    return count, digest.hexdigest()


def differences(
    live: ViewStore, rebuilt: ViewStore, table: str, order_by: str, skip: tuple[str, ...], *, limit: int = 10_000
) -> list[tuple[str, tuple[Any, ...]]]:
    """Rows that differ, ``-`` as in live and ``+`` as rebuilt, at most ``limit``.
    A merge of the two ordered streams: memory stays bounded."""
    columns = [c for c in live.columns(table) if c not in skip]
    key_at = [columns.index(c.strip()) for c in order_by.split(",")]

    def key(row: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple("" if row[i] is None else row[i] for i in key_at)

    found: list[tuple[str, tuple[Any, ...]]] = []
    a_rows, b_rows = table_rows(live, table, order_by, skip), table_rows(rebuilt, table, order_by, skip)
    a, b = next(a_rows, None), next(b_rows, None)
    while (a is not None or b is not None) and len(found) < limit:
        if b is None or (a is not None and key(a) < key(b)):
            found.append(("-", a))  # type: ignore[arg-type]
            a = next(a_rows, None)
        elif a is None or key(b) < key(a):
            found.append(("+", b))
            b = next(b_rows, None)
        else:
            if a != b:
                found.extend([("-", a), ("+", b)])
            a, b = next(a_rows, None), next(b_rows, None)
    return found[:limit]
