"""How a generation service uses the ledger: reserve the estimated credits
before a job runs, then settle the actual amount or release the hold.

    python examples/backend_service.py            # runs against memory://

Every call carries an idempotency key derived from the job, so a worker that
crashes and retries the same step never charges twice.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import timedelta
from uuid import UUID, uuid4

from ledger import InsufficientCredits, Ledger, ReservationClosed

HOLD_FOR = timedelta(minutes=30)  # longer than any job may run


@dataclass
class GenerationJob:  # the host's generation_jobs row, reduced
    id: UUID
    user_id: UUID
    estimated_credits: int
    reservation_id: UUID | None = None
    actual_credits: int | None = None
    status: str = "queued"


def enqueue(ledger: Ledger, job: GenerationJob) -> bool:
    """Reserve before queueing; refuse the job when credits do not cover it."""
    try:
        # expires_in, not datetime.now() + HOLD_FOR: a retried reserve is then
        # the same command and replays, where a recomputed expires_at would
        # raise IdempotencyConflict.
        receipt = ledger.reserve(
            job.user_id, job.id, job.estimated_credits, expires_in=HOLD_FOR, key=f"job:{job.id}:reserve"
        )
    except InsufficientCredits as exc:
        job.status = "cancelled"
        print(f"job {job.id} refused: {exc}")
        return False
    job.reservation_id = receipt.reservation_id
    return True


def finish(ledger: Ledger, job: GenerationJob, *, succeeded: bool, actual_credits: int = 0) -> None:
    """Settle what the job really cost, or release the hold when it failed."""
    assert job.reservation_id is not None
    try:
        if succeeded:
            ledger.settle(job.reservation_id, actual_credits, key=f"job:{job.id}:settle", user_id=job.user_id)
            job.status, job.actual_credits = "completed", actual_credits
        else:
            ledger.release(job.reservation_id, "job failed", key=f"job:{job.id}:release", user_id=job.user_id)
            job.status = "failed"
    except ReservationClosed as exc:
        # The hold expired (released by the sweep) before the job reported back.
        print(f"job {job.id}: {exc}")


def main(url: str = "memory://") -> None:
    with Ledger(url) as ledger:
        user = uuid4()
        ledger.grant(user, 1000, "subscription_grant", key=f"signup:{user}")
        ok = GenerationJob(uuid4(), user, estimated_credits=300)
        failing = GenerationJob(uuid4(), user, estimated_credits=500)
        too_big = GenerationJob(uuid4(), user, estimated_credits=900)
        for job in (ok, failing, too_big):
            enqueue(ledger, job)
        enqueue(ledger, ok)  # a worker's retry after a timeout: replayed, the same hold
        finish(ledger, ok, succeeded=True, actual_credits=260)
        finish(ledger, ok, succeeded=True, actual_credits=260)  # a retried worker: replayed, not charged again
        finish(ledger, failing, succeeded=False)
        balance = ledger.balance(user)
        print(f"balance {balance.balance_credits}, held {balance.held_credits}, available {balance.available_credits}")
        assert balance.balance_credits == 740 and balance.held_credits == 0


if __name__ == "__main__":
    main(*sys.argv[1:])
