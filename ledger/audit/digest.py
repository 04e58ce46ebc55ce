"""Tamper evidence: a hash chain over the stored event log.

Each link is ``sha256(previous link || canonical bytes of the stored event)``,
starting from 32 zero bytes. The canonical bytes are the event's notification
id (8 bytes, big-endian), originator id (16 bytes), originator version (8
bytes), topic (4-byte length, UTF-8) and state (4-byte length, the bytes as
stored). The link after the last event is the *head*, written
``POSITION:HEX``; an auditor keeps it outside the database.

``verify`` recomputes the chain up to a head's position and compares: any
edit, deletion, insertion or reordering of a stored event at or before that
position changes the recomputed head (finding another history with the same
head means breaking SHA-256). To *name* the changed event, ``digest`` also
stores anchors in a ``ledger_digests`` table beside the event store: per
segment of ``every`` events, the link after its last event and, per event,
its notification id and an 8-byte BLAKE2b hash of its content (the canonical
bytes without the id). ``verify`` compares the events with those anchors as
it goes and names every event that was altered, deleted, inserted or moved.

The anchors live in the database, so whoever can edit events can edit them:
they point at the change but prove nothing. The proof is the head kept
outside. If the anchors were rewritten too, ``verify`` still fails, and says
it cannot name the position.

Snapshots are not events, so the chain does not cover them. ``verify`` also
replays the events of every account that has snapshots and names each
snapshot whose state differs from the replay at its version (see
``ledger.audit.snapshots``): once the events are proven, a snapshot is proven by them.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ledger.errors import InvalidArgument
from ledger.storage.digests import ENTRY, DigestStore, Segment
from ledger.storage.sealing import content_bytes

if TYPE_CHECKING:
    from ledger.application.facade import Ledger
    from ledger.storage.eventstore import LedgerApplication

GENESIS = bytes(32)
#: Events per anchor segment, unless the first ``digest`` run chose another size.
SEGMENT_EVENTS = 1_000
#: Events read per query.
PAGE_EVENTS = 2_000
#: At most this many tampered events are named; the head check covers the rest.
MAX_PROBLEMS = 100

#: Signed: the ledger's ids start at 1, where it is the same bytes as unsigned,
#: but an event written by hand at id 0 or below must hash, not crash.
_ID = struct.Struct(">q")


def content_hash(content: bytes) -> bytes:
    return hashlib.blake2b(content, digest_size=8).digest()


class Chain:
    """The running link over events in notification order."""

    __slots__ = ("digest", "events", "position")

    def __init__(self, position: int = 0, digest: bytes = GENESIS, events: int = 0) -> None:
        self.position = position
        self.digest = digest
        self.events = events

    def add(self, notification: Any) -> bytes:
        """Extends the chain by one stored event; returns its content bytes."""
        content = content_bytes(notification)
        self.digest = hashlib.sha256(self.digest + _ID.pack(notification.id) + content).digest()
        self.position = notification.id
        self.events += 1
        return content

    def head(self) -> DigestHead:
        return DigestHead(self.position, self.digest.hex(), self.events)


@dataclass(frozen=True)
class DigestHead:
    """The chain's head: the position of the last event covered and the link after it."""

    position: int
    digest: str
    #: How many events the chain covers (informational: not part of the proof).
    events: int = 0

    def __str__(self) -> str:
        return f"{self.position}:{self.digest}"

    @classmethod
    def parse(cls, text: str) -> DigestHead:
        """Reads ``POSITION:HEX`` (the form ``digest`` prints)."""
        position, sep, digest = text.strip().partition(":")
        if not sep or not position.isdigit() or len(digest) != 64:
            raise InvalidArgument(f"a digest reads POSITION:HASH (64 hex digits), got {text!r}")
        try:
            bytes.fromhex(digest)
        except ValueError:
            raise InvalidArgument(f"the hash of digest {text!r} is not hexadecimal") from None
        return cls(int(position), digest.lower())


@dataclass(frozen=True)
class Tampering:
    """One stored event that differs from what the anchors recorded.

    ``kind``: ``altered`` (same position, different content), ``deleted``
    (anchored, now gone), ``inserted`` (present, never anchored), ``moved``
    (the content anchored at ``moved_from`` now sits at ``position``), or
    ``anchor`` (a ``ledger_digests`` row disagrees with intact events), or
    ``head`` (``digest(expect=...)``: the chain does not pass through the
    head kept outside)."""

    position: int
    kind: str
    message: str
    moved_from: int | None = None

    def __str__(self) -> str:
        return f"position {self.position}: {self.kind}: {self.message}"


@dataclass
class DigestResult:
    """What ``digest`` did: the head, and what it found on the way."""

    head: DigestHead
    segments_written: int
    #: Stored anchors that disagree with the events: the history changed since
    #: the last digest. Nothing is written then.
    problems: list[Tampering] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "position": self.head.position,
            "digest": self.head.digest,
            "head": str(self.head),
            "events": self.head.events,
            "segments_written": self.segments_written,
            "problems": [vars(p) for p in self.problems],
        }


@dataclass
class VerifyResult:
    """The outcome of recomputing the chain up to a head kept outside."""

    expected: DigestHead
    computed: DigestHead
    #: Named changes found against the stored anchors (at most MAX_PROBLEMS).
    problems: list[Tampering] = field(default_factory=list)
    anchored_events: int = 0
    #: Stored snapshots that differ from the replay of their events.
    snapshot_problems: list[Any] = field(default_factory=list)
    snapshots: int = 0

    @property
    def history_intact(self) -> bool:
        """The proof: the recomputed head equals the one kept outside."""
        return self.computed.position == self.expected.position and self.computed.digest == self.expected.digest

    @property
    def ok(self) -> bool:
        """Intact history, anchors that agree with it, and snapshots that agree with the events."""
        return self.history_intact and not self.problems and not self.snapshot_problems

    def describe(self) -> list[str]:
        lines = []
        if self.history_intact:
            lines.append(
                f"history up to position {self.expected.position} is unchanged ({self.computed.events} events)"
            )
        else:
            lines.append(
                f"history up to position {self.expected.position} has CHANGED: recomputed {self.computed}, "
                f"expected {self.expected}"
            )
        real = [p for p in self.problems if p.kind != "anchor"]
        lines.extend(f"  {p}" for p in self.problems)
        if not self.history_intact and not real:
            lines.append(
                "  the position cannot be named: the stored anchors agree with the current events "
                "(they were rewritten too, or no digest run anchored these events)"
            )
        if self.history_intact and self.problems:
            lines.append("  the events are intact, but ledger_digests rows were edited")
        if self.snapshot_problems:
            lines.append(f"{len(self.snapshot_problems)} of {self.snapshots} snapshots differ from their events:")
            lines.extend(f"  {p}" for p in self.snapshot_problems)
        elif self.snapshots:
            lines.insert(1, f"{self.snapshots} snapshots agree with the replay of their events")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "history_intact": self.history_intact,
            "expected": str(self.expected),
            "computed": str(self.computed),
            "events": self.computed.events,
            "anchored_events": self.anchored_events,
            "problems": [vars(p) for p in self.problems],
            "snapshots": self.snapshots,
            "snapshot_problems": [p.to_dict() for p in self.snapshot_problems],
        }


def digest_store(ledger: Ledger) -> DigestStore:
    return ledger.backend.digest_store(ledger.app)


# ------------------------------------------------------------------ reading the log


def stored_events(app: LedgerApplication, after: int, stop: int, page: int = PAGE_EVENTS) -> Iterator[Sequence[Any]]:
    """Pages of stored events (notifications) with ``after < id <= stop``
    (from ``after`` 0: every id up to ``stop``, those below 1 too).

    The next page is read in a thread while the caller works on this one: the
    driver waits for the database without the GIL, so reading and decoding
    overlap (a plain read loop spends a third of its time waiting). Memory
    holds two pages."""
    if after >= stop:
        return

    def read(position: int | None) -> Sequence[Any]:
        start = None if position is None else position + 1
        return app.recorder.select_notifications(start=start, limit=page, stop=stop)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-read-ahead") as pool:
        # From the start, read with no lower bound. The ledger's ids start at 1,
        # but an account loads its events by version, whatever their id: an
        # event written by hand at id 0 or below is replayed by the ledger, so
        # the chain and the audit must read it too.
        pending: Future[Sequence[Any]] | None = pool.submit(read, None if after <= 0 else after)
        while pending is not None:
            notifications = pending.result()
            if not notifications:
                return
            position = notifications[-1].id
            more = len(notifications) == page and position < stop
            pending = pool.submit(read, position) if more else None
            yield notifications


#: What an audit, a digest or a verify calls as it goes: with the log position
#: it reached and the position it reads up to. (A projector reports its own
#: progress as a ``views.projector.Progress``.)
ProgressCallback = Callable[[int, int], None]


class _Anchors:
    """Walks the stored anchors beside the recomputed events, naming changes."""

    def __init__(self, segments: Iterator[Segment], limit: int = MAX_PROBLEMS) -> None:
        self._segments = segments
        self.limit = limit
        self.problems: list[Tampering] = []
        self.anchored = 0
        self._segment: Segment | None = None
        self._entries: list[tuple[int, bytes]] = []
        self._at = 0
        self._by_leaf: dict[bytes, int] | None = None
        self._clean = True  # no change found so far: segment digests must match
        self._load()

    def _load(self) -> None:
        self._segment = next(self._segments, None)
        while self._segment is not None and (why := self._segment.malformed()) is not None:
            # An edited row that cannot be read is a finding, not a crash; the
            # events it anchored then show as never anchored.
            self._problem(
                self._segment.first_position if type(self._segment.first_position) is int else 0,
                "anchor",
                f"ledger_digests segment {self._segment.index} cannot be read: {why}",
            )
            self._segment = next(self._segments, None)
        self._entries = list(self._segment.entries()) if self._segment is not None else []
        self._at = 0
        self._by_leaf = None

    def _problem(self, position: int, kind: str, message: str, moved_from: int | None = None) -> None:
        self._clean = False
        if len(self.problems) < self.limit:
            self.problems.append(Tampering(position, kind, message, moved_from))

    def _peek(self) -> tuple[int, bytes] | None:
        while self._segment is not None and self._at >= len(self._entries):
            self._load()
        return self._entries[self._at] if self._segment is not None else None

    def see(self, position: int, leaf: bytes, chain: Chain) -> None:
        """One recomputed event, in order."""
        while (entry := self._peek()) is not None and entry[0] < position:
            self._problem(entry[0], "deleted", "an anchored event is no longer in the store")
            self._advance(chain, after_event=False)
        entry = self._peek()
        if entry is None:
            return
        if entry[0] > position:
            self._problem(position, "inserted", "an event that no digest anchored sits here")
            return
        self.anchored += 1
        if entry[1] != leaf:
            moved = self._moved_from(leaf, position)
            if moved is not None:
                self._problem(position, "moved", f"the event anchored at position {moved} is now here", moved)
            else:
                self._problem(position, "altered", "the stored event differs from the one anchored here")
        self._advance(chain, after_event=True)

    def _moved_from(self, leaf: bytes, position: int) -> int | None:
        if self._by_leaf is None:
            self._by_leaf = {entry_leaf: p for p, entry_leaf in self._entries}
        moved = self._by_leaf.get(leaf)
        return moved if moved is not None and moved != position else None

    def _advance(self, chain: Chain, *, after_event: bool) -> None:
        assert self._segment is not None
        self._at += 1
        # Every event of the segment matched: its stored link must be the recomputed one.
        segment_done = self._at == len(self._entries) and after_event and self._clean
        if segment_done and chain.position == self._segment.position and chain.digest.hex() != self._segment.digest:
            self._problem(
                self._segment.position,
                "anchor",
                f"ledger_digests segment {self._segment.index} holds a link the intact events do not produce",
            )

    def finish(self, stop: int) -> None:
        """Anchored events at or before ``stop`` that the store no longer has."""
        while (entry := self._peek()) is not None and entry[0] <= stop:
            self._problem(entry[0], "deleted", "an anchored event is no longer in the store")
            self._at += 1


def verify(ledger: Ledger, expected: DigestHead | str, *, progress: ProgressCallback | None = None) -> VerifyResult:
    """Recomputes the chain up to ``expected.position`` and compares it with
    ``expected`` and with the stored anchors; then compares every stored
    snapshot with the replay of its account's events."""
    from ledger.audit.snapshots import check_snapshots

    head = DigestHead.parse(expected) if isinstance(expected, str) else expected
    anchors = _Anchors(digest_store(ledger).segments())
    chain = Chain()
    for page in stored_events(ledger.app, 0, head.position):
        for notification in page:
            content = chain.add(notification)
            anchors.see(notification.id, content_hash(content), chain)
        if progress is not None:
            progress(page[-1].id, head.position)
    anchors.finish(head.position)
    snapshots = check_snapshots(ledger)
    return VerifyResult(
        expected=head,
        computed=chain.head(),
        problems=anchors.problems,
        anchored_events=anchors.anchored,
        snapshot_problems=list(snapshots.problems),
        snapshots=snapshots.snapshots,
    )


class _SegmentBuilder:
    """Cuts the recomputed events into anchor segments."""

    def __init__(self, size: int, first_index: int, events_before: int) -> None:
        self.size = size
        self.index = first_index
        self.events_before = events_before
        self.first_position = 0
        self.entries: list[bytes] = []
        self.done: list[Segment] = []

    def add(self, position: int, leaf: bytes, chain: Chain) -> None:
        if not self.entries:
            self.first_position = position
        self.entries.append(ENTRY.pack(position, leaf))
        if len(self.entries) == self.size:
            self.close(chain)

    def close(self, chain: Chain) -> None:
        if not self.entries:
            return
        self.done.append(
            Segment(
                index=self.index,
                size=self.size,
                first_position=self.first_position,
                position=chain.position,
                events_before=self.events_before,
                digest=chain.digest.hex(),
                leaves=b"".join(self.entries),
                recorded_at=datetime.now(UTC),
            )
        )
        self.index += 1
        self.events_before += len(self.entries)
        self.entries = []


class _Through:
    """Whether the recomputed chain passes through a head kept outside: its
    link just before the first event past the head's position."""

    def __init__(self, head: DigestHead) -> None:
        self.head = head
        self.problem: Tampering | None = None
        self.checked = False

    def before(self, position: int, chain: Chain) -> None:
        if not self.checked and position > self.head.position:
            self._check(chain)

    def finish(self, chain: Chain) -> Tampering | None:
        if not self.checked:
            self._check(chain)
        return self.problem

    def _check(self, chain: Chain) -> None:
        self.checked = True
        if chain.position == self.head.position and chain.digest.hex() == self.head.digest:
            return
        self.problem = Tampering(
            self.head.position,
            "head",
            f"the history up to position {self.head.position} hashes to {chain.head()}, not the head kept "
            f"outside ({self.head}): it changed since that digest",
        )


def digest(
    ledger: Ledger,
    *,
    every: int = SEGMENT_EVENTS,
    incremental: bool = False,
    expect: DigestHead | str | None = None,
    progress: ProgressCallback | None = None,
) -> DigestResult:
    """Computes the head of the chain over every stored event and anchors it.

    By default the chain is recomputed from the first event and checked
    against the anchors stored by earlier runs; if any disagree (the history
    changed since), nothing is written and the problems are returned.
    ``incremental`` trusts the last complete stored segment and only reads the
    events after it. ``expect``, the last head kept outside, must be on the
    recomputed chain (the history only grew since it): if not, nothing is
    written. The stored anchors prove nothing (whoever rewrites events can
    rewrite them), so only ``expect`` ties the new head to the last one."""
    if type(every) is not int or not 10 <= every <= 100_000:
        raise InvalidArgument(f"every must be an int within 10..100000, got {every!r}")
    expected = DigestHead.parse(expect) if isinstance(expect, str) else expect
    if expected is not None and incremental:
        raise InvalidArgument(
            "expect recomputes the chain from the first event to check it; incremental trusts the stored anchors "
            "instead: give one of them",
            param="expect",
        )
    store = digest_store(ledger)
    last = store.last()
    size = _first_size(store) or every
    stop = ledger.app.recorder.max_notification_id() or 0
    chain, builder, anchors = _starting_point(store, last, size, incremental)
    through = _Through(expected) if expected is not None else None
    for page in stored_events(ledger.app, chain.position, stop):
        for notification in page:
            if through is not None:
                through.before(notification.id, chain)
            content = chain.add(notification)
            leaf = content_hash(content)
            if anchors is not None:
                anchors.see(notification.id, leaf, chain)
            builder.add(notification.id, leaf, chain)
        if progress is not None:
            progress(page[-1].id, stop)
    problems = []
    if through is not None and (off := through.finish(chain)) is not None:
        problems.append(off)
    if anchors is not None:
        anchors.finish(stop)
        problems.extend(anchors.problems)
    if problems:
        return DigestResult(head=chain.head(), segments_written=0, problems=problems)
    builder.close(chain)
    # Unchanged segments are not rewritten: only the new ones and a grown partial one.
    rewrite_from = last.index if last is not None and last.count < last.size else (last.index + 1 if last else 0)
    fresh = [s for s in builder.done if s.index >= rewrite_from]
    if fresh:
        store.put(fresh)
    return DigestResult(head=chain.head(), segments_written=len(fresh))


def _first_size(store: DigestStore) -> int | None:
    first = next(store.segments(), None)
    return first.size if first is not None else None


def _starting_point(
    store: DigestStore, last: Segment | None, size: int, incremental: bool
) -> tuple[Chain, _SegmentBuilder, _Anchors | None]:
    if not incremental or last is None:
        return Chain(), _SegmentBuilder(size, 0, 0), _Anchors(store.segments())
    if last.count == last.size:
        start = Chain(last.position, bytes.fromhex(last.digest), last.events_before + last.count)
        return start, _SegmentBuilder(size, last.index + 1, start.events), None
    # The last segment is partial: start after the one before it and rebuild it.
    previous = next(store.segments(last.index - 1), None) if last.index > 0 else None
    if previous is None:
        return Chain(), _SegmentBuilder(size, 0, 0), None
    start = Chain(previous.position, bytes.fromhex(previous.digest), previous.events_before + previous.count)
    return start, _SegmentBuilder(size, last.index, start.events), None
