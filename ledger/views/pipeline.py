"""A pipelined catch-up, for rebuilds: the next page of events is read and
decoded in a reader thread while the current page is written.

Without it a rebuild alternates strictly between client and server: the
client reads and decodes a page while the server waits, then the server writes
it while the client waits. Here a reader thread runs ahead of the writer by at
most ``depth`` pages (a bounded queue), so the database's work on one page
overlaps the client's on the next, and at most ``depth + 2`` pages are in
memory at once (one being written, ``depth`` queued, one the reader holds
while it waits for room).

Each page is still written with its tracking position in one transaction,
after checking that the position is the one it was read from (``Projector``).
Anything that goes wrong ends the pipeline: the reader is stopped and joined,
the pages written so far stay committed, and the rest is projected by the
plain ``Projector.catch_up`` from the committed position. That path reads the
failed page again and handles it as without the pipeline: a recurring error is
raised, an event that cannot be written is named by ``ViewsStalled``, a page
another projector wrote first is skipped. An error in the reader thread is
therefore never lost: it recurs (and is raised) or it was transient.

``decode_in_reader=False`` leaves the reader only the fetch and decodes in the
writer: the reader then holds the interpreter lock only to build rows, for
hosts where decoding in two threads competes more than it overlaps.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ledger.errors import InvalidArgument
from ledger.views.projector import PAGE_EVENTS, Progress, Projector

log = logging.getLogger("ledger.projector")

#: Pages the reader may read ahead of the page being written.
PIPELINE_DEPTH = 1
MAX_PIPELINE_DEPTH = 4
#: How often a blocked reader or writer checks whether the other has ended.
_POLL_S = 0.1


@dataclass(frozen=True)
class Page:
    """Events read from ``start`` (exclusive) up to ``end``, decoded."""

    start: int
    end: int
    head: int
    notifications: Sequence[Any]
    #: The decoded events, when the reader decodes (else the writer does).
    events: list[tuple[int, Any]] | None

    @property
    def last(self) -> bool:
        return self.end >= self.head


@dataclass(frozen=True)
class ReadFailed:
    """The reader's error, at the page it was reading from ``start``."""

    start: int
    error: BaseException


class PageReader(threading.Thread):
    """Reads and decodes the pages after ``start`` into a bounded queue, in
    order, until the head (or ``until``), a failure, or ``cancel``."""

    def __init__(
        self,
        projector: Projector,
        start: int,
        *,
        page_events: int,
        until: int | None,
        depth: int,
        decode: bool = True,
    ) -> None:
        super().__init__(name="ledger-rebuild-reader", daemon=True)
        self.decode = decode
        self.projector = projector
        self.start_position = start
        self.page_events = page_events
        self.until = until
        self.pages: queue.Queue[Page | ReadFailed] = queue.Queue(maxsize=depth)
        self.cancelled = threading.Event()
        #: Pages read so far (for the memory bound's test).
        self.pages_read = 0

    def run(self) -> None:
        position = self.start_position
        app = self.projector.app
        try:
            while not self.cancelled.is_set():
                head = self.projector.head()
                if self.until is not None:
                    head = min(self.until, head)
                if head <= position:
                    self._put(Page(position, position, head, [], []))
                    return
                notifications = app.recorder.select_notifications(
                    start=position + 1, limit=self.page_events, stop=head, topics=self.projector.topics
                )
                # With no matching events left below the head, jump to the head.
                end = notifications[-1].id if len(notifications) == self.page_events else head
                decode = app.mapper.to_domain_event
                events = [(n.id, decode(n)) for n in notifications] if self.decode else None
                page = Page(position, end, head, notifications, events)
                self.pages_read += 1
                self._put(page)
                if page.last:
                    return
                position = end
        except BaseException as exc:  # handed to the writer, which decides
            self._put(ReadFailed(position, exc))

    def _put(self, item: Page | ReadFailed) -> None:
        while not self.cancelled.is_set():
            try:
                self.pages.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def next(self) -> Page | ReadFailed:
        """The next page, waiting for it; a ReadFailed if the reader ended without one."""
        while True:
            try:
                return self.pages.get(timeout=_POLL_S)
            except queue.Empty:
                if not self.is_alive() and self.pages.empty():
                    return ReadFailed(-1, RuntimeError("the rebuild's reader ended without a page"))

    def cancel(self) -> None:
        """Stops the reader and waits for it to end (it ends within a page read)."""
        self.cancelled.set()
        while True:
            try:  # make room, so a reader blocked on a full queue sees the cancel at once
                self.pages.get_nowait()
            except queue.Empty:
                break
        self.join()


def pipelined_catch_up(
    projector: Projector,
    *,
    page_events: int = PAGE_EVENTS,
    progress: Callable[[Progress], None] | None = None,
    until: int | None = None,
    stop: threading.Event | None = None,
    depth: int = PIPELINE_DEPTH,
    decode_in_reader: bool = True,
) -> int:
    """``Projector.catch_up``, with the next ``depth`` pages read and decoded
    while a page is written; returns how many events were projected."""
    if not 1 <= page_events <= 10_000:
        raise InvalidArgument(f"page_events must be within 1..10000, got {page_events}")
    if not 1 <= depth <= MAX_PIPELINE_DEPTH:
        raise InvalidArgument(f"depth must be within 1..{MAX_PIPELINE_DEPTH}, got {depth}")
    projected = 0
    with projector._lock:
        position = projector.store.position()
        reader = PageReader(
            projector, position, page_events=page_events, until=until, depth=depth, decode=decode_in_reader
        )
        decode = projector.app.mapper.to_domain_event
        reader.start()
        try:
            while True:
                item = reader.next()
                if isinstance(item, ReadFailed):
                    log.info(
                        "the rebuild's reader failed after position %d (%r): going on page by page",
                        position,
                        item.error,
                    )
                    break
                if item.start != position:  # cannot happen: the reader reads in order
                    raise AssertionError(f"page from {item.start} read, position is {position}")
                if item.end > position:
                    try:
                        events = item.events
                        if events is None:
                            events = [(n.id, decode(n)) for n in item.notifications]
                        projector._write(position, events, item.end)
                    except Exception as exc:
                        log.info("a rebuild page after position %d failed (%r): going on page by page", position, exc)
                        break
                    position = item.end
                    projected += len(events)
                    if progress is not None:
                        progress(Progress(position, item.head, projected))
                if item.last or (stop is not None and stop.is_set()):
                    return projected
        finally:
            reader.cancel()
    # Page by page from the committed position: the failed page is read again
    # and handled (raised, named, or skipped) as without the pipeline.
    done = projected

    def shifted(p: Progress) -> None:
        if progress is not None:
            progress(Progress(p.position, p.head, done + p.events))

    return done + projector.catch_up(page_events=page_events, progress=shifted, until=until, stop=stop)
