"""Group commit: the commands of concurrent deliveries share one ledger
transaction.

The ledger's writes are serialised (its event insert holds a table lock
until the commit is on disk), so one transaction per delivery caps a server
at about one delivery per disk flush. Here a thread with a command to run
queues it; if no batch is running it leads: it takes what is queued (its own
command and those that arrived meanwhile, at most ``max_batch``) and runs
them with ``Ledger.execute_batch``, again until its own is done, then hands
the lead to a waiting thread. Nothing waits on a timer: alone, a command runs
at once; under load, the batches form while the previous one commits.

A batch is all or nothing. If any command in it fails (a delivery held for a
snapshot, an unknown variant), the batch is rejected and its commands run
one by one, so each gets its own receipt or error, as if it had run alone.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from ledger import Command, Ledger, Receipt

DEFAULT_MAX_BATCH = 64


@dataclass
class _Pending:
    command: Command
    receipt: Receipt | None = None
    error: BaseException | None = None
    finished: bool = False

    def result(self) -> Receipt:
        if self.error is not None:
            raise self.error
        assert self.receipt is not None
        return self.receipt


@dataclass
class GroupCommit:
    ledger: Ledger
    max_batch: int = DEFAULT_MAX_BATCH
    #: Batches run, and commands they carried, for the curious (benchmarks).
    batches: int = 0
    batched: int = 0
    _queue: list[_Pending] = field(default_factory=list)
    _leading: bool = False
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def execute(self, command: Command) -> Receipt:
        """Runs ``command``, in a batch with others if others are waiting."""
        pending = _Pending(command)
        with self._cond:
            self._queue.append(pending)
            while not pending.finished and self._leading:
                self._cond.wait()
            if pending.finished:
                return pending.result()
            self._leading = True
        try:
            while not pending.finished:
                with self._cond:
                    batch = self._queue[: self.max_batch]
                    del self._queue[: self.max_batch]
                self._run(batch)
                with self._cond:
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._leading = False
                self._cond.notify_all()
        return pending.result()

    def _run(self, batch: Sequence[_Pending]) -> None:
        try:
            if len(batch) > 1 and self._together(batch):
                return
            for pending in batch:
                try:
                    pending.receipt = self.ledger.execute(pending.command)
                except Exception as exc:  # the command's own error, for its own thread
                    pending.error = exc
                pending.finished = True
        finally:
            # Whatever happened, no thread may wait for ever on its command.
            for pending in batch:
                if not pending.finished:
                    pending.error = pending.error or RuntimeError("the batch was interrupted")
                    pending.finished = True

    def _together(self, batch: Sequence[_Pending]) -> bool:
        try:
            receipts = self.ledger.execute_batch([p.command for p in batch])
        except Exception:  # one of them failed: each alone, then
            return False
        for pending, receipt in zip(batch, receipts, strict=True):
            pending.receipt, pending.finished = receipt, True
        self.batches += 1
        self.batched += len(batch)
        return True
