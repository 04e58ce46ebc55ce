"""Which cached aggregates a command may trust as they are, and the counters
that show what loading them cost.

The command cache holds each aggregate as of a version this process knows
was committed (it loaded it, or saved it). Other processes may have moved it
on since. Reading the store before every command would cost every command a
round trip, though most aggregates have one writer; trusting the cache
blindly costs a clash whenever another process wrote. So the cache trusts an
aggregate until a save of it clashes: from then on the aggregate is
*shared*, and every read of it first fast-forwards the cached copy from its
version (one query for the newer events only, no snapshot, no replay). A
command that was refused (which might have been decided on a stale copy)
fast-forwards its aggregates once before it is decided again; they become
shared only if that found newer events. An
aggregate whose fast-forwards found nothing new ``TRUST_AFTER_EMPTY`` times
in a row is trusted again (docs/decisions.md, "Cached accounts are
fast-forwarded once shared").
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields
from uuid import UUID

#: Fast-forwards in a row that found no newer event before a shared
#: aggregate is trusted again without one.
TRUST_AFTER_EMPTY = 32
#: At most this many aggregates are remembered as shared (the oldest are forgotten).
MAX_SHARED = 10_000


@dataclass(frozen=True)
class CommandStats:
    """What this ``Ledger``'s commands cost in attempts and loads, since it
    was opened (``Ledger.command_stats``). Counts, all of them."""

    #: Calls of the engine (one per ``execute``, ``execute_batch``, sweep or group commit batch).
    batches: int = 0
    #: Attempts at saving them (a batch that clashed is attempted again).
    attempts: int = 0
    #: Saves refused by the store because another writer got there first.
    clashes: int = 0
    #: Batches that ran out of attempts (``ConcurrencyExhausted``).
    exhausted: int = 0
    #: Aggregates rebuilt from the store (snapshot and events) for a command.
    full_loads: int = 0
    #: Cached aggregates brought up to date by reading only their newer events.
    fastforwards: int = 0
    #: Events those fast-forwards applied.
    fastforward_events: int = 0
    #: Reads answered from the cache without a query.
    cache_hits: int = 0
    #: Write-only aggregates (command records, closed holds' records) read
    #: from the store, to replay a key or find a hold's account; never cached.
    record_reads: int = 0

    def since(self, earlier: CommandStats) -> CommandStats:
        """The counts between ``earlier`` and these."""
        return CommandStats(**{f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)})

    def __add__(self, other: CommandStats) -> CommandStats:
        return CommandStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


class Counters:
    """The mutable counts behind ``CommandStats``, safe across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys((f.name for f in fields(CommandStats)), 0)

    def add(self, name: str, count: int = 1) -> None:
        with self._lock:
            self._counts[name] += count

    def snapshot(self) -> CommandStats:
        with self._lock:
            return CommandStats(**self._counts)


class Freshness:
    """The aggregates to fast-forward before use (see the module's text)."""

    def __init__(self, trust_after_empty: int = TRUST_AFTER_EMPTY, max_shared: int = MAX_SHARED) -> None:
        assert trust_after_empty >= 1 and max_shared >= 1
        self.trust_after_empty = trust_after_empty
        self.max_shared = max_shared
        self._lock = threading.Lock()
        #: Shared aggregates and their fast-forwards in a row that found nothing.
        self._empty_runs: dict[UUID, int] = {}
        #: Aggregates to fast-forward at their next read only (``check_once``).
        self._once: set[UUID] = set()

    def share(self, aggregate_ids: list[UUID]) -> None:
        """These aggregates were seen written elsewhere: fast-forward them before use."""
        with self._lock:
            for aggregate_id in aggregate_ids:
                self._empty_runs.pop(aggregate_id, None)
                self._empty_runs[aggregate_id] = 0
            while len(self._empty_runs) > self.max_shared:
                del self._empty_runs[next(iter(self._empty_runs))]

    def check_once(self, aggregate_ids: list[UUID]) -> None:
        """These aggregates may be stale (a command on them was refused):
        fast-forward them at their next read; they become shared only if
        that finds newer events. A refusal on an up-to-date copy is common
        (an account out of credits) and says nothing of other writers."""
        with self._lock:
            self._once.update(aggregate_ids)
            if len(self._once) > self.max_shared:
                self._once.clear()  # forgetting is safe: a stale copy still clashes

    def is_shared(self, aggregate_id: UUID) -> bool:
        """Whether the aggregate's next read fast-forwards it first."""
        return aggregate_id in self._empty_runs or aggregate_id in self._once

    def forwarded(self, aggregate_id: UUID, new_events: int) -> None:
        """A fast-forward of the aggregate found ``new_events``."""
        with self._lock:
            if aggregate_id in self._once:
                self._once.discard(aggregate_id)
                if new_events and aggregate_id not in self._empty_runs:
                    self._empty_runs[aggregate_id] = 0
                    while len(self._empty_runs) > self.max_shared:
                        del self._empty_runs[next(iter(self._empty_runs))]
                    return
            if aggregate_id not in self._empty_runs:
                return
            if new_events:
                self._empty_runs[aggregate_id] = 0
                return
            runs = self._empty_runs[aggregate_id] + 1
            if runs >= self.trust_after_empty:
                del self._empty_runs[aggregate_id]
            else:
                self._empty_runs[aggregate_id] = runs

    def shared_count(self) -> int:
        return len(self._empty_runs)
