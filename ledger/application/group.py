"""Group commit: the commands of concurrent callers share transactions.

The store serialises the ledger's writes (an event insert holds its lock until
the commit is on disk), so one transaction per command caps a process at about
one command per disk flush, and threads that write one account clash and
retry. A :class:`GroupCommit` queues the commands of concurrent callers and
runs them a batch at a time, each batch in one transaction:

- A caller of ``execute`` that finds no batch running leads: it takes what is
  queued (its own command and those that arrived meanwhile, at most
  ``max_batch``) and runs it, again until its own command is done, then hands
  the lead to the oldest waiting caller. Alone, a command runs at once; under
  load the next batch forms while the previous one commits. ``submit`` queues
  a command without waiting for it (for an async host) and returns a
  ``concurrent.futures.Future``; a background thread leads when no caller does.
- ``max_wait_s`` above 0 lets a leader wait that long for a fuller batch.
- Every command gets its own receipt or error (:func:`run_each`): a command
  that fails is dropped from its batch, which commits without it.
- One leader at a time takes batches from the head of the queue: commands run
  in the order they arrived, so the commands of one account do too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from eventsourcing.persistence import IntegrityError, PersistenceError

from ledger.application.commands import Command, differing_arguments
from ledger.application.results import Receipt
from ledger.application.unit import Engine, Unit, clash_backoff, positioned
from ledger.domain.credits import CommandRecord, CreditAccount
from ledger.errors import (
    ConcurrencyExhausted,
    ConfigurationError,
    IdempotencyConflict,
    InvalidArgument,
    LedgerError,
    ViewsBehind,
)

T = TypeVar("T")

#: Commands one shared transaction carries at most.
MAX_GROUP_BATCH = 1_000
#: Commands waiting for a batch at most (callers beyond it wait for room).
MAX_GROUP_QUEUED = 100_000
#: The longest a leader may wait for a fuller batch.
MAX_GROUP_WAIT_S = 1.0
#: How long ``close`` waits for the background leader to finish the queue.
CLOSE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class GroupCommitPolicy:
    """How concurrent commands share transactions (``Ledger(group_commit=...)``).

    ``max_batch``: commands per shared transaction (1..1,000); ``max_wait_s``:
    how long a leader waits for a fuller batch before it runs what is queued
    (0..1 s; 0, the default, never waits: batches form while the previous one
    commits); ``max_queued``: commands waiting at most (1..100,000), beyond
    which ``execute`` and ``submit`` wait for room."""

    max_batch: int = 64
    max_wait_s: float = 0.0
    max_queued: int = 10_000

    def __post_init__(self) -> None:
        if type(self.max_batch) is not int or not 1 <= self.max_batch <= MAX_GROUP_BATCH:
            raise InvalidArgument(
                f"max_batch must be an int within 1..{MAX_GROUP_BATCH}, got {self.max_batch!r}", param="max_batch"
            )
        wait = self.max_wait_s
        if type(wait) not in (int, float) or not 0 <= wait <= MAX_GROUP_WAIT_S:
            raise InvalidArgument(
                f"max_wait_s must be a number of seconds within 0..{MAX_GROUP_WAIT_S}, got {wait!r}",
                param="max_wait_s",
            )
        if type(self.max_queued) is not int or not 1 <= self.max_queued <= MAX_GROUP_QUEUED:
            raise InvalidArgument(
                f"max_queued must be an int within 1..{MAX_GROUP_QUEUED}, got {self.max_queued!r}",
                param="max_queued",
            )


@dataclass(frozen=True)
class GroupCommitStats:
    """What a group commit did so far (``GroupCommit.stats``)."""

    #: Batches run (each one transaction, or none when all its commands failed or replayed).
    batches: int
    #: Commands those batches carried.
    commands: int
    #: Batches of two commands or more, and the commands they carried.
    shared_batches: int
    shared_commands: int
    #: The largest batch.
    largest_batch: int
    #: Commands that failed alone: their batch-mates went on without them.
    failed: int
    #: Runs of a batch's commands in memory started over, because a failed
    #: command had changed what it read before it failed.
    restarts: int
    #: Saves that clashed with another writer and ran the batch again.
    clashes: int


# ------------------------------------------------------------------ one batch


class _IsolatingUnit(Unit):
    """A unit of work that knows what the command it runs touched, so that a
    command that fails can be dropped without undoing anything.

    Every aggregate a command reads or changes comes through the unit
    (``account``, ``aggregate``, ``add``): the unit notes each one with the
    number of its pending events when the command first touched it. A command
    whose touched aggregates have as many pending events as then, and which
    recorded no key, changed nothing: its batch-mates' work stands as it is."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Aggregate id -> (aggregate, pending events when first touched; -1: added by the command).
        self.marks: dict[UUID, tuple[Any, int]] = {}
        self.records_mark = 0
        #: Ids of the aggregates read from the store (not the cache) in this attempt.
        self.fresh: set[UUID] = set()

    def begin(self) -> None:
        """Starts noting what the next command touches."""
        self.marks = {}
        self.records_mark = len(self.records)

    def _touch(self, aggregate: Any) -> None:
        if aggregate.id not in self.marks:
            self.marks[aggregate.id] = (aggregate, len(aggregate.pending_events))

    def prefetch(self, ids: Iterable[UUID], users: Iterable[UUID | None] = ()) -> None:
        before = set(self.others)
        super().prefetch(ids, users)
        self.fresh.update(i for i in self.others if i not in before)
        self.fresh.update(account.id for account in self.preloaded.values())

    def account(self, user_id: UUID, *, open_missing: bool = False) -> CreditAccount:
        account = self.accounts.get(user_id)
        if account is not None:
            self._touch(account)
            return account
        account = super().account(user_id, open_missing=open_missing)
        # New to the unit: every pending event on it (its due events too) is this command's.
        self.marks.setdefault(account.id, (account, 0))
        return account

    def aggregate(self, aggregate_id: UUID, cls: type[T]) -> T | None:
        found = super().aggregate(aggregate_id, cls)
        if found is not None:
            self._touch(found)
        return found

    def add(self, aggregate: Any) -> None:
        if self.others.get(aggregate.id) is aggregate:
            self._touch(aggregate)
        else:
            self.marks[aggregate.id] = (aggregate, -1)
        super().add(aggregate)

    def traced(self) -> bool:
        """Whether the command under way changed anything in the unit."""
        if len(self.records) != self.records_mark:
            return True
        return any(mark < 0 or len(aggregate.pending_events) != mark for aggregate, mark in self.marks.values())

    def maybe_stale(self) -> list[UUID]:
        """The stored aggregates the command under way read from the cache and
        no earlier command of the attempt changed: another process may have
        moved them on since they were cached."""
        return [
            aggregate_id
            for aggregate_id, (aggregate, mark) in self.marks.items()
            if mark == 0 and aggregate_id not in self.fresh and aggregate.version > len(aggregate.pending_events)
        ]

    def refresh(self, ids: Sequence[UUID]) -> None:
        """Reads these aggregates (unchanged in the unit) again from the store."""
        found = self.reader.load(list(ids))
        for aggregate_id in ids:
            old, _ = self.marks.pop(aggregate_id)
            new = found.get(aggregate_id)
            if isinstance(old, CreditAccount) and self.accounts.get(old.user_id) is old:
                del self.accounts[old.user_id]
                if isinstance(new, CreditAccount):
                    self.preloaded[old.user_id] = new  # ``account`` applies what is due, as for any load
                else:
                    self.absent.add(aggregate_id)
            elif new is not None:
                self.others[aggregate_id] = new
            else:
                self.others.pop(aggregate_id, None)
                self.absent.add(aggregate_id)
            self.fresh.add(aggregate_id)


class _Restart(Exception):
    """The commands' run in memory must start over in a new unit."""


@dataclass
class RunCounts:
    """What ``run_each`` had to do besides one run and one save."""

    restarts: int = 0
    clashes: int = 0


def run_each(
    engine: Engine, commands: Sequence[Any], now: datetime | None = None, *, counts: RunCounts | None = None
) -> list[Receipt | Exception]:
    """Runs commands in one transaction, each with its own outcome: a receipt,
    or the error the command would have raised run alone.

    A command that fails is dropped from the batch. When it changed nothing
    before it failed (business errors are raised before any event), its
    batch-mates' work stands and the run goes on; else (an event triggered,
    then a refusal) the run starts over in memory without it. A refusal
    decided on cached aggregates is decided again, once, on the store's state
    (another process may have moved them on), and a key that another writer
    recorded meanwhile replays, as for ``Engine.execute``. Commands run in the
    order given; a key given twice replays the first's receipt, or raises
    IdempotencyConflict when the arguments differ.

    The errors of the batch as a whole are raised: the store failing
    (PersistenceError), or ConcurrencyExhausted when other writers kept
    winning; nothing is recorded then."""
    if len(commands) > MAX_GROUP_BATCH:
        raise InvalidArgument(f"a group commit batch holds at most {MAX_GROUP_BATCH} commands, got {len(commands)}")
    engine.app.counters.add("batches")
    outcomes: dict[int, Receipt | Exception] = {}
    live: list[int] = []
    by_key: dict[str, Command] = {}
    for index, command in enumerate(commands):
        if isinstance(command, Command):
            live.append(index)
            by_key.setdefault(command.key, command)
        else:
            outcomes[index] = InvalidArgument(f"not a ledger command: {type(command).__name__}")
    known: dict[str, CommandRecord] = {}
    rechecked: set[int] = set()
    counts = counts if counts is not None else RunCounts()
    conflicts = 0
    backoff = 0
    while True:
        if backoff:
            clash_backoff(backoff)  # outside the session: nothing is held while waiting
            backoff = 0
        # A batch of one runs as a single command does: its shared account is
        # locked before it is read, until the save commits
        # (ledger.storage.writelocks). A larger batch stays optimistic.
        with engine.app.write_locks.attempt(len(live)):
            moment = now or engine.clock.now()
            failed: dict[int, Exception] = {}
            restarts = 0
            while True:
                unit = _IsolatingUnit(engine.app, engine.reader, moment, engine.policy)
                pending = [commands[i] for i in live if i not in failed and commands[i].key not in known]
                if len(pending) > 1:
                    engine._prefetch(unit, pending)
                try:
                    receipts = _run(engine, unit, commands, live, known, failed, rechecked)
                    break
                except _Restart:
                    restarts += 1
                    counts.restarts += 1
                    # Each restart fails a command, rechecks one (once) or learns a key.
                    assert restarts <= 3 * len(live), "a batch restarted more often than its commands allow"
            position = None
            if unit.records:
                engine.app.counters.add("attempts")
                try:
                    position = engine.app.save_all(unit.pending())
                except IntegrityError:
                    # As the engine does: learn the keys recorded meanwhile,
                    # fast-forward the aggregates, then run the batch afresh.
                    try:
                        counted = engine.clashed(unit, by_key, known, conflicts)
                    except ConcurrencyExhausted:
                        counts.clashes += 1  # the last clash counts too
                        raise
                    if counted > conflicts:
                        counts.clashes += 1
                    backoff, conflicts = (counted if counted > conflicts else 0), counted
                    continue
            for index, receipt in receipts.items():
                outcomes[index] = receipt if receipt.replayed else positioned(receipt, position)
            outcomes.update(failed)
            return [outcomes[i] for i in range(len(commands))]


def _run(
    engine: Engine,
    unit: _IsolatingUnit,
    commands: Sequence[Command],
    live: Sequence[int],
    known: dict[str, CommandRecord],
    failed: dict[int, Exception],
    rechecked: set[int],
) -> dict[int, Receipt]:
    """One run of the batch in memory; raises _Restart when it must start over."""
    receipts: dict[int, Receipt] = {}
    done: dict[str, tuple[Command, Receipt]] = {}
    for index in live:
        if index in failed:
            continue
        command = commands[index]
        while True:
            unit.begin()
            try:
                receipts[index] = _one(engine, unit, command, known, done)
                break
            except PersistenceError:
                raise  # the store failed: the whole batch's error
            except Exception as exc:
                if not _settle_failure(engine, unit, index, command, exc, known, done, failed, rechecked):
                    break
    return receipts


def _one(
    engine: Engine, unit: _IsolatingUnit, command: Command, known: dict[str, CommandRecord], done: dict[str, Any]
) -> Receipt:
    record = known.get(command.key)
    if record is not None:
        return engine.replay(record, command)
    first = done.get(command.key)
    if first is not None:
        earlier, receipt = first
        if earlier.fingerprint != command.fingerprint:
            raise IdempotencyConflict(
                command.key, earlier.name, command.name, differing_arguments(earlier.arguments, command.arguments)
            )
        replayed: Receipt = receipt.model_copy(update={"replayed": True})
        return replayed
    receipt = unit.run(command)
    done[command.key] = (command, receipt)
    return receipt


def _settle_failure(
    engine: Engine,
    unit: _IsolatingUnit,
    index: int,
    command: Command,
    exc: Exception,
    known: dict[str, CommandRecord],
    done: dict[str, Any],
    failed: dict[int, Exception],
    rechecked: set[int],
) -> bool:
    """Decides what a command's failure means; True: run it again in place.
    Raises _Restart when the run must start over in a new unit."""
    traced = unit.traced() or not isinstance(exc, LedgerError)
    if command.key not in known and command.key not in done:
        # Replay wins over a refusal: another writer may have recorded the key meanwhile.
        record = engine.find_record(command.key)
        if record is not None:
            known[command.key] = record
            if traced:
                raise _Restart
            return True
    if index not in rechecked:
        stale = unit.maybe_stale()
        if stale:
            # Decided on cached copies other processes may have moved on:
            # decide again, once, on the store's state.
            rechecked.add(index)
            engine.app.evict(stale)
            if traced:
                raise _Restart
            unit.refresh(stale)
            return True
    failed[index] = exc
    if traced:
        raise _Restart
    return False


# ------------------------------------------------------------- the queue


def require_command(command: object) -> Command:
    """``command``, if it is a ledger command; else InvalidArgument, before it is queued or sent."""
    if not isinstance(command, Command):
        hint = " (execute_batch runs many)" if isinstance(command, list | tuple) else ""
        raise InvalidArgument(f"not a ledger command: {type(command).__name__}{hint}", param="command")
    return command


class _Pending:
    __slots__ = ("abandoned", "command", "future", "lead", "wake")

    def __init__(self, command: Command, *, waiting: bool) -> None:
        self.command = command
        self.future: Future[Receipt] = Future()
        #: Set when the command is done, or when its waiting caller is handed the lead.
        self.wake = threading.Event() if waiting else None
        self.lead = False
        #: The waiting caller gave up (interrupted): never hand it the lead.
        self.abandoned = False


class GroupCommit:
    """Concurrent commands sharing transactions. Made by the ledger:
    ``Ledger(url, group_commit=True)`` runs ``execute`` and the command
    methods through it; ``ledger.group_commit`` is it (made with the default
    policy on first use when the ledger was opened without one).

    ``execute(command)`` blocks its thread until the command is done;
    ``submit(command)`` returns a ``concurrent.futures.Future`` at once
    (``await asyncio.wrap_future(group.submit(command))`` in an async host).
    Either way the command gets its own receipt or error."""

    def __init__(
        self,
        engine: Engine,
        policy: GroupCommitPolicy | None = None,
        *,
        after_batch: Callable[[list[Receipt]], None] | None = None,
    ) -> None:
        if policy is not None and not isinstance(policy, GroupCommitPolicy):
            raise InvalidArgument(f"policy must be a GroupCommitPolicy, not {type(policy).__name__}", param="policy")
        self.engine = engine
        self.policy = policy or GroupCommitPolicy()
        self._after_batch = after_batch
        self._queue: list[_Pending] = []
        self._cond = threading.Condition()
        self._leading = False
        #: The thread that leads (its ``threading.get_ident()``), or None.
        self._leader: int | None = None
        self._timing = False
        self._room_waiters = 0
        self._closed = False
        self._worker: threading.Thread | None = None
        self._batches = self._commands = self._shared_batches = self._shared_commands = 0
        self._largest = self._failed = self._restarts = self._clashes = 0

    # -- callers -------------------------------------------------------------

    def execute(self, command: Command) -> Receipt:
        """Runs ``command``, in a batch with others' when others are waiting;
        returns its receipt or raises its own error."""
        if self._leader == threading.get_ident():
            # Called from inside a batch (a hook the batch runs, a future's
            # callback): waiting for the queue would wait for ever. Alone, then.
            return self.engine.execute([require_command(command)], single=True)[0]
        pending = self._enqueue(command, waiting=True)
        if not pending.lead:
            assert pending.wake is not None
            try:
                pending.wake.wait()
            except BaseException:
                with self._cond:
                    pending.abandoned = True
                    if pending.lead:  # handed the lead meanwhile: pass it on
                        pending.lead = False
                        self._release()
                raise
        if pending.lead:
            self._lead(pending)
        return pending.future.result()

    def submit(self, command: Command) -> Future[Receipt]:
        """Queues ``command`` and returns its future at once (waiting only
        when ``max_queued`` commands already wait); a background thread runs
        it when no caller of ``execute`` is leading."""
        return self._enqueue(command, waiting=False).future

    @property
    def stats(self) -> GroupCommitStats:
        return GroupCommitStats(
            batches=self._batches,
            commands=self._commands,
            shared_batches=self._shared_batches,
            shared_commands=self._shared_commands,
            largest_batch=self._largest,
            failed=self._failed,
            restarts=self._restarts,
            clashes=self._clashes,
        )

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Refuses new commands and lets the queued ones finish (the
        background leader waits at most ``timeout_s`` for them)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout_s)

    # -- the queue -----------------------------------------------------------

    def _enqueue(self, command: Command, *, waiting: bool) -> _Pending:
        pending = _Pending(require_command(command), waiting=waiting)
        with self._cond:
            while len(self._queue) >= self.policy.max_queued and not self._closed:
                self._room_waiters += 1
                try:
                    self._cond.wait()
                finally:
                    self._room_waiters -= 1
            if self._closed:
                raise ConfigurationError("the ledger is closed: its group commit takes no more commands")
            self._queue.append(pending)
            if self._timing:
                self._cond.notify_all()
            if not self._leading:
                if waiting:
                    self._leading = pending.lead = True
                else:
                    self._wake_worker()
        return pending

    def _lead(self, own: _Pending | None) -> None:
        """Runs batches from the head of the queue until ``own`` is done (the
        background leader: until the queue is empty), then hands the lead on."""
        self._leader = threading.get_ident()
        try:
            while True:
                with self._cond:
                    if (own is not None and own.future.done()) or not self._queue:
                        break
                    self._gather()
                    batch = self._queue[: self.policy.max_batch]
                    del self._queue[: self.policy.max_batch]
                    if self._room_waiters:
                        self._cond.notify_all()
                self._run_batch(batch)
        finally:
            with self._cond:
                self._release()
        if own is not None and not own.future.done():  # cannot happen: its batch ran above
            own.future.set_exception(RuntimeError("the group commit lost a command"))

    def _gather(self) -> None:
        """With ``max_wait_s``, waits (lock held, released while waiting) for a fuller batch."""
        wait = self.policy.max_wait_s
        if not wait or len(self._queue) >= self.policy.max_batch:
            return
        deadline = time.monotonic() + wait
        self._timing = True
        try:
            while len(self._queue) < self.policy.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        finally:
            self._timing = False

    def _release(self) -> None:
        """Gives up the lead (lock held): to the oldest waiting caller, or to
        the background leader when the oldest queued command has none."""
        self._leading = False
        self._leader = None
        if self._queue:
            first = self._queue[0]
            if first.wake is not None and not first.abandoned:
                self._leading = first.lead = True
                first.wake.set()
                return
            self._wake_worker()
        if self._worker is not None:
            self._cond.notify_all()

    def _wake_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="ledger-group-commit", daemon=True)
            self._worker.start()
        self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._queue and not self._leading:
                        self._leading = True
                        break
                    if self._closed and not self._queue:
                        return
                    self._cond.wait()
            self._lead(None)

    def _run_batch(self, batch: list[_Pending]) -> None:
        outcomes: list[Receipt | BaseException] = []
        try:
            outcomes = list(self._outcomes([p.command for p in batch]))
        finally:
            if len(outcomes) != len(batch):  # interrupted (KeyboardInterrupt in the leader)
                outcomes = [RuntimeError("the batch was interrupted; nothing was recorded")] * len(batch)
            for pending, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)
                if pending.wake is not None:
                    pending.wake.set()

    def _outcomes(self, commands: list[Command]) -> list[Receipt | BaseException]:
        counts = RunCounts()
        try:
            outcomes: list[Receipt | BaseException] = list(run_each(self.engine, commands, counts=counts))
        except Exception as exc:  # the store failed, or other writers kept winning
            outcomes = [exc] * len(commands)
        self._restarts += counts.restarts
        self._clashes += counts.clashes
        self._batches += 1
        self._commands += len(commands)
        self._largest = max(self._largest, len(commands))
        if len(commands) > 1:
            self._shared_batches += 1
            self._shared_commands += len(commands)
        self._failed += sum(1 for o in outcomes if isinstance(o, BaseException))
        receipts = [o for o in outcomes if isinstance(o, Receipt)]
        if receipts and self._after_batch is not None:
            try:
                self._after_batch(receipts)
            except ViewsBehind as exc:
                # Recorded: each command's error carries its own receipt.
                outcomes = [ViewsBehind(o, exc.cause) if isinstance(o, Receipt) else o for o in outcomes]
        return outcomes
