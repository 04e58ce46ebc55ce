"""Write locks: how a command keeps other processes off an account it is
about to change, where the store can.

Commands are optimistic: each reads its accounts as of a version, and its
save fails (a clash) if another writer recorded a newer version first; the
command is then run again on the newer state (``Engine``). That costs nothing
while accounts have one writer each, and a clash and a re-run when they do
not. On an account that several processes write at once (a hot account), the
re-runs can themselves clash, and the latency of a command grows with its
writers.

So a backend that can lock offers a *write session*: inside it, the first
shared account a command reads (one that clashed before:
``ledger.storage.freshness``) is locked before it is read, in the transaction
the command's save then commits, which releases the lock. Writers of that
account then take turns instead of clashing. An attempt whose save clashed
locks the aggregates it clashed on before its next attempt reads (a batch's
too: see ``attempt``). Account locks are always taken before the events
table's, in the order of their keys, no session waits for an account's lock
while holding one taken out of that order, and whoever holds the events
table's lock is committing, so sessions cannot deadlock each other. The
unique (aggregate, version) constraint still decides every save; the locks
only keep writers from losing to it (docs/decisions.md, "Hot accounts are
locked, not retried").

This module's ``WriteLocks`` is the backend without locks (memory: one
process; SQLite: one writer at a time already): sessions do nothing and reads
go straight to the store.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import StoredEvent

#: At most this many aggregates a session locks before anything is read
#: (a batch's attempt after its saves clashed on them).
MAX_LOCKED_FIRST = 64


class WriteLocks:
    """Write sessions that lock nothing (see the module's text)."""

    def __init__(self, recorder: Any) -> None:
        self.recorder = recorder

    def attempt(self, commands: int, *, clashed: Sequence[UUID] = ()) -> contextlib.AbstractContextManager[None]:
        """What an attempt at ``commands`` commands in one transaction runs
        in: a write session for a lone command; for a batch, nothing (it
        stays optimistic: it reads its accounts in bulk, and locking them
        all would hold many locks across its work) until its saves clashed
        on aggregates other writers keep changing (``clashed``, from
        ``clashed_on``): then a session that locks those first."""
        if commands == 1 or clashed:
            return self.session(first=clashed)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def session(self, *, first: Sequence[UUID] = ()) -> Iterator[None]:
        """One attempt at a command or a batch: ``first`` are locked before
        anything is read; what it locks is released when this ends."""
        yield

    def clashed_on(self, error: BaseException) -> UUID | None:
        """The aggregate a refused save clashed on, where the store names it
        (None: it does not)."""
        return None

    def events_after(self, aggregate_id: UUID, version: int, *, lock: bool) -> list[StoredEvent]:
        """The aggregate's stored events after ``version``, in order. With
        ``lock``, inside a session, the aggregate is first locked against the
        other sessions (on a backend that can)."""
        return list(self.recorder.select_events(aggregate_id, gt=version))
