"""An account's cost is bounded by what is live (open blocks, open holds),
never by its history of spent and lapsed blocks and closed holds; what is live
has a stated bound with a typed error past it (docs/decisions.md, "Bounded
accounts")."""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID, uuid4

import pytest

from ledger import (
    AccountLimitReached,
    BatchRejected,
    GrantCredits,
    LedgerError,
    ManualClock,
    ReleaseReservation,
    ReserveCredits,
    SettleReservation,
    SpendCredits,
)
from ledger.application.facade import Ledger
from ledger.domain.credits import (
    MAX_LIVE_BLOCKS,
    MAX_OPEN_HOLDS,
    CreditAccount,
    account_id_for,
    draw_order,
    free_credits,
)

HOUR = timedelta(hours=1)


def grants(user: UUID, count: int, tag: str, amount: int = 1, **fields: object) -> list[GrantCredits]:
    return [
        GrantCredits(key=f"{tag}:{i}", user_id=user, amount_credits=amount, kind="purchase", **fields)  # type: ignore[arg-type]
        for i in range(count)
    ]


def test_a_grant_past_the_live_block_bound_is_refused_and_records_nothing(ledger: Ledger) -> None:
    user = uuid4()
    ledger.execute_batch(grants(user, MAX_LIVE_BLOCKS, "g"))
    events = len(ledger.history(user, limit=10_000))
    with pytest.raises(AccountLimitReached) as refused:
        ledger.grant(user, 5, "purchase", key="one-too-many")
    error = refused.value
    assert isinstance(error, LedgerError)
    assert (error.user_id, error.what, error.limit) == (user, "live credit blocks", 1_000)
    assert str(error) == (
        f"account of user {user} already has 1,000 live credit blocks, the most one account may have: "
        "spend or let some lapse first, or grant fewer, larger amounts"
    )
    with pytest.raises(BatchRejected) as rejected:
        ledger.execute_batch(grants(user, 1, "batch"))
    assert isinstance(rejected.value.cause, AccountLimitReached)
    assert len(ledger.history(user, limit=10_000)) == events
    assert ledger.balance(user).balance_credits == MAX_LIVE_BLOCKS
    # A spent block is not live: there is room again.
    ledger.spend(user, 1, key="spend")
    assert ledger.grant(user, 5, "purchase", key="one-too-many").balance_credits == MAX_LIVE_BLOCKS + 4


def test_a_lapsed_block_makes_room_for_a_grant(ledger: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    ledger.execute_batch(grants(user, MAX_LIVE_BLOCKS, "g", expires_at=clock.now() + HOUR))
    with pytest.raises(AccountLimitReached):
        ledger.grant(user, 1, "purchase", key="more")
    clock.advance(2 * HOUR)
    assert ledger.grant(user, 1, "purchase", key="more").balance_credits == 1  # the lapsed ones expired first


def test_a_reserve_past_the_open_hold_bound_is_refused_and_records_nothing(ledger: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    ledger.grant(user, 10_000, "purchase", key="funds")
    until = clock.now() + HOUR
    receipts = ledger.execute_batch(
        [
            ReserveCredits(key=f"r:{i}", user_id=user, job_id=uuid4(), amount_credits=1, expires_at=until)
            for i in range(MAX_OPEN_HOLDS)
        ]
    )
    with pytest.raises(AccountLimitReached) as refused:
        ledger.reserve(user, uuid4(), 1, until, key="one-too-many")
    assert (refused.value.what, refused.value.limit) == ("open holds", 1_000)
    assert "settle or release some first" in str(refused.value)
    assert ledger.balance(user).held_credits == MAX_OPEN_HOLDS
    first = receipts[0].reservation_id
    assert first is not None
    ledger.release(first, "done", key="release", user_id=user)
    assert ledger.reserve(user, uuid4(), 1, until, key="one-too-many").held_credits == MAX_OPEN_HOLDS


def test_history_costs_nothing_in_memory_or_in_snapshots(ledger: Ledger, clock: ManualClock) -> None:
    """3,000 grants, all but 5 spent or lapsed, and 750 closed holds: the
    account holds 5 blocks and no hold, and its snapshot is no bigger than
    that of an account that only ever had those 5 grants."""
    busy, quiet = uuid4(), uuid4()
    for user in (busy, quiet):
        ledger.execute_batch(grants(user, 5, f"{user}:keep", amount=100))
    for round_no in range(5):
        tag = f"round:{round_no}"
        batch: list[GrantCredits | SpendCredits | ReserveCredits] = []
        batch.extend(grants(busy, 600, tag, expires_at=clock.now() + HOUR))
        batch.extend(SpendCredits(key=f"{tag}:spend:{i}", user_id=busy, amount_credits=1) for i in range(150))
        batch.extend(
            ReserveCredits(
                key=f"{tag}:r:{i}", user_id=busy, job_id=uuid4(), amount_credits=1, expires_at=clock.now() + HOUR
            )
            for i in range(150)
        )
        receipts = ledger.execute_batch(batch)
        closes: list[SettleReservation | ReleaseReservation] = []
        for i, receipt in enumerate(receipts[-150:]):
            assert receipt.reservation_id is not None
            if i % 2:
                closes.append(
                    SettleReservation(
                        key=f"{tag}:s:{i}", reservation_id=receipt.reservation_id, actual_credits=1, user_id=busy
                    )
                )
            else:
                closes.append(
                    ReleaseReservation(
                        key=f"{tag}:x:{i}", reservation_id=receipt.reservation_id, reason="done", user_id=busy
                    )
                )
        ledger.execute_batch(closes)
        clock.advance(2 * HOUR)  # the rest of the round's blocks lapse
    ledger.spend(busy, 1, key="last")  # records the last round's lapses
    ledger.spend(quiet, 1, key="last:quiet")

    accounts = ledger.engine.reader.load([account_id_for(busy), account_id_for(quiet)])
    big, small = accounts[account_id_for(busy)], accounts[account_id_for(quiet)]
    assert isinstance(big, CreditAccount) and isinstance(small, CreditAccount)
    assert big.version > 5_000 and small.version < 20
    assert (len(big.blocks), len(big.holds)) == (len(small.blocks), len(small.holds)) == (5, 0)
    # The derived state holds only the live blocks too.
    assert len(big._order) == 5 and big._marked == {} and big.held == 0

    def snapshot_bytes(user: UUID) -> int:
        """The size of a snapshot of the account now, as the store keeps it."""
        ledger.app.take_snapshot(account_id_for(user))
        assert ledger.app.snapshots is not None
        return len(ledger.app.snapshots.recorder.select_events(account_id_for(user), desc=True, limit=1)[0].state)

    # The same live blocks: the same size, give or take the digits of the counters.
    assert snapshot_bytes(busy) <= snapshot_bytes(quiet) + 40


def test_the_running_state_makes_the_decisions_a_full_recomputation_makes(clock: ManualClock) -> None:
    """Blocks expiring at different times, holds over several of them,
    settles and releases, lapses: after every command the account's draw
    order and free credits are what sorting and summing everything gives."""
    with Ledger("memory://", clock=clock) as ledger:
        user = uuid4()
        for i in range(40):
            expires_at = clock.now() + timedelta(minutes=(i * 37) % 11 * 10 + 5) if i % 3 else None
            ledger.grant(user, 7 + i % 5, "purchase", key=f"g:{i}", expires_at=expires_at)
            if i % 4 == 1:
                receipt = ledger.reserve(user, uuid4(), 9, clock.now() + timedelta(minutes=40), key=f"r:{i}")
                assert receipt.reservation_id is not None
                if i % 8 == 1:
                    ledger.settle(receipt.reservation_id, 12, key=f"s:{i}", user_id=user)
            if i % 5 == 2:
                ledger.spend(user, 6, key=f"sp:{i}")
            clock.advance(timedelta(minutes=3))
            account = ledger.engine.reader.load([account_id_for(user)])[account_id_for(user)]
            account.apply_due(clock.now())
            assert account._order == draw_order(account.blocks.values())
            assert account.free(clock.now()) == free_credits(account.blocks, account.holds.values(), clock.now())
            assert account.held == sum(h.amount for h in account.holds.values())
            account.check_invariants()
