"""``audit`` and ``verify`` replay the events of every account that has
snapshots and compare each snapshot's state with the replay at its version:
a snapshot whose seal was recomputed (``ledger.storage.sealing``) is still
named here."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from eventsourcing.persistence import StoredEvent

from ledger.storage.sealing import UNSEALED, refusal

if TYPE_CHECKING:
    from ledger.application.facade import Ledger

#: Events replayed per read when checking snapshots.
CHECK_PAGE = 1_000
#: Snapshot problems named at most; the count covers the rest.
MAX_PROBLEMS = 100


@dataclass(frozen=True)
class SnapshotProblem:
    """A stored snapshot that differs from the replay of its account's events."""

    aggregate_id: UUID
    user_id: UUID | None
    version: int
    message: str

    @property
    def subject(self) -> str:
        return f"user {self.user_id}" if self.user_id is not None else f"aggregate {self.aggregate_id}"

    def __str__(self) -> str:
        return f"snapshot of {self.subject} at version {self.version}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "aggregate_id": str(self.aggregate_id),
            "user_id": None if self.user_id is None else str(self.user_id),
            "version": self.version,
            "message": self.message,
        }


@dataclass
class SnapshotCheck:
    """What :func:`check_snapshots` found."""

    snapshots: int = 0
    accounts: int = 0
    unsealed: int = 0
    problems_total: int = 0

    def __post_init__(self) -> None:
        self.problems: list[SnapshotProblem] = []

    def add(self, problem: SnapshotProblem) -> None:
        self.problems_total += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)


def check_snapshots(ledger: Ledger) -> SnapshotCheck:
    """Compares every stored snapshot with the replay of its aggregate's
    events up to the snapshot's version. Memory: one account's state and a
    page of its events at a time."""
    found = SnapshotCheck()
    app = ledger.app
    if app.snapshots is None:
        return found
    for aggregate_id, versions in _grouped(ledger.engine.reader.snapshot_index()):
        found.accounts += 1
        found.snapshots += len(versions)
        _check_one(app, aggregate_id, versions, found)
    return found


def _grouped(index: Iterator[tuple[UUID, int]]) -> Iterator[tuple[UUID, list[int]]]:
    current: UUID | None = None
    versions: list[int] = []
    for aggregate_id, version in index:
        if aggregate_id != current:
            if current is not None:
                yield current, versions
            current, versions = aggregate_id, []
        versions.append(version)
    if current is not None:
        yield current, versions


def _check_one(app: Any, aggregate_id: UUID, versions: list[int], found: SnapshotCheck) -> None:
    replay = _Replay(app, aggregate_id)
    for version in versions:
        stored = app.snapshots.recorder.select_events(aggregate_id, gt=version - 1, lte=version)
        if not stored:
            continue  # removed meanwhile
        aggregate = replay.to(version)
        why = _compare(app, stored[0], aggregate, replay)
        if why == UNSEALED:
            found.unsealed += 1
        elif why is not None:
            user_id = getattr(aggregate, "user_id", None)
            found.add(SnapshotProblem(aggregate_id, user_id if isinstance(user_id, UUID) else None, version, why))


def _compare(app: Any, stored: StoredEvent, aggregate: Any, replay: _Replay) -> str | None:
    """Why a stored snapshot is not the replay's state at its version (None: it is)."""
    if replay.broken is not None:
        return f"the events at its id cannot be replayed to its version ({replay.broken}): it cannot be checked"
    if replay.version != stored.originator_version:
        return f"the events at its id end at version {replay.version}: it summarises events that do not exist"
    snapshot, why = refusal(app.mapper, stored, replay.event_at)
    if snapshot is None:
        return f"not a snapshot the ledger writes: {why}"
    if getattr(type(aggregate), "TOPIC", None) != snapshot.topic:
        return f"it is of a {snapshot.topic!r}, the events at its id are of a {type(aggregate).__name__}"
    differences = state_differences(snapshot.state, type(aggregate).Snapshot.take(aggregate).state)
    if differences:
        return "its state differs from the replay of the events: " + "; ".join(differences)
    return why


class _Replay:
    """An account replayed from its stored events, page by page, up to a version."""

    def __init__(self, app: Any, aggregate_id: UUID) -> None:
        self.app = app
        self.aggregate_id = aggregate_id
        self.aggregate: Any = None
        self.version = 0
        self.event_at: StoredEvent | None = None
        #: Why the events stopped replaying (an edited or missing event), if they did.
        self.broken: str | None = None
        self._done = False

    def to(self, version: int) -> Any:
        while self.version < version and not self._done:
            page = self.app.recorder.select_events(
                self.aggregate_id, gt=self.version or None, lte=version, limit=CHECK_PAGE
            )
            for stored in page:
                try:
                    self.aggregate = self.app.mapper.to_domain_event(stored).mutate(self.aggregate)
                except Exception as exc:  # the audit's other checks name the event itself
                    self.broken = f"version {stored.originator_version}: {type(exc).__name__}: {exc}"
                    self._done = True
                    return self.aggregate
                self.version = stored.originator_version
                self.event_at = stored
            if len(page) < CHECK_PAGE and self.version < version:
                self._done = True
        return self.aggregate


def state_differences(stored: dict[str, Any], expected: dict[str, Any], limit: int = 5) -> list[str]:
    """What differs between a snapshot's state and the replay's, for people."""
    found: list[str] = []
    for name in ("balance", "next_seq", "user_id"):
        if stored.get(name) != expected.get(name):
            found.append(f"{name} {stored.get(name)!r} (the events say {expected.get(name)!r})")
    for what in ("blocks", "holds"):
        mine, theirs = stored.get(what), expected.get(what)
        if not isinstance(mine, dict) or not isinstance(theirs, dict):
            if mine != theirs:
                found.append(f"{what} are not what the events say")
            continue
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                found.append(_describe(what[:-1], key, mine.get(key), theirs.get(key)))
    for name in sorted(set(stored) | set(expected)):
        if name not in ("balance", "next_seq", "user_id", "blocks", "holds") and stored.get(name) != expected.get(name):
            found.append(f"{name} {stored.get(name)!r} (the events say {expected.get(name)!r})")
    if len(found) > limit:
        return [*found[:limit], f"and {len(found) - limit} more differences"]
    return found


def _describe(kind: str, key: str, stored: Any, expected: Any) -> str:
    if expected is None:
        return f"{kind} {key} is not in the events"
    if stored is None:
        return f"{kind} {key} of the events is missing"
    if kind == "block" and getattr(stored, "remaining", None) != getattr(expected, "remaining", None):
        return f"block {key} has {stored.remaining} credits left (the events say {expected.remaining})"
    if kind == "hold" and getattr(stored, "amount", None) != getattr(expected, "amount", None):
        return f"hold {key} holds {stored.amount} credits (the events say {expected.amount})"
    return f"{kind} {key} differs from the events"
