"""The domain's pure parts and its guards, without a store."""

from __future__ import annotations

import copy
from dataclasses import replace as replaced
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import IntegrityError

from ledger import DEFAULT_CATALOG, ConcurrencyExhausted, InvalidAmount, InvariantViolation, Ledger, ManualClock
from ledger.domain.credits import Block, CreditAccount, draw_order, free_credits, take
from ledger.domain.holds import Hold
from ledger.domain.plans import Plan, plan_id_for

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def block(block_id: str, remaining: int, *, expires_in_days: int | None = None, seq: int = 0) -> Block:
    expires_at = None if expires_in_days is None else T0 + timedelta(days=expires_in_days)
    return Block(block_id, "bonus", remaining, remaining, T0, expires_at, seq)


def test_draw_order_is_soonest_expiry_then_oldest() -> None:
    blocks = [block("b", 1, seq=2), block("a", 1, seq=1), block("late", 1, expires_in_days=9, seq=3),
              block("soon", 1, expires_in_days=2, seq=4)]  # fmt: skip
    assert [b.block_id for b in draw_order(blocks)] == ["soon", "late", "a", "b"]


def test_take_is_all_or_nothing() -> None:
    assert take(5, [("a", 3), ("b", 4)]) == [["a", 3], ["b", 2]]
    assert take(8, [("a", 3), ("b", 4)]) is None


def test_free_credits_leave_out_earmarks_and_lapsed_blocks() -> None:
    blocks = {"a": block("a", 10, seq=1), "old": block("old", 10, expires_in_days=1, seq=0)}
    hold = Hold("r", "j", 4, T0, T0 + timedelta(days=5), [["a", 4]])
    assert free_credits(blocks, [hold], T0) == [("old", 10), ("a", 6)]
    assert free_credits(blocks, [hold], T0 + timedelta(days=2)) == [("a", 6)]


def _account() -> CreditAccount:
    account = CreditAccount._create(CreditAccount.Opened, id=uuid4(), user_id=uuid4(), timestamp=T0)
    account.grant(entry_id=uuid4(), amount=10, kind="bonus", description="", reference_type=None,  # type: ignore[arg-type]
                  reference_id=None, expires_at=None, actor=None, key="k", now=T0)  # fmt: skip
    return account


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda a: setattr(a, "balance", 11),  # balance != sum of blocks
        lambda a: setattr(a, "balance", -1),
        lambda a: setattr(next(iter(a.blocks.values())), "remaining", 11),  # above granted
        lambda a: a.holds.update(r=Hold("r", "j", 20, T0, T0, [[next(iter(a.blocks)), 20]])),  # held > balance
        lambda a: a.holds.update(r=Hold("r", "j", 5, T0, T0, [[next(iter(a.blocks)), 4]])),  # allocations != amount
    ],
)
def test_invariant_violations_are_caught(corrupt: object) -> None:
    account = _account()
    account.check_invariants()
    corrupt(account)  # type: ignore[operator]
    with pytest.raises(InvariantViolation):
        account.check_invariants()


def test_retries_are_bounded_and_record_nothing() -> None:
    clock = ManualClock(T0)
    with Ledger("memory://", clock=clock, max_attempts=3) as ledger:
        user = UUID(int=5)
        ledger.grant(user, 10, "bonus", key="g")
        calls = []

        def always_conflicting(objs: object) -> None:
            calls.append(objs)
            raise IntegrityError("another writer won")

        ledger.app.save_all = always_conflicting  # type: ignore[method-assign]
        with pytest.raises(ConcurrencyExhausted) as info:
            ledger.spend(user, 5, key="s")
        assert info.value.attempts == 3 and len(calls) == 3
        assert ledger.balance(user).balance_credits == 10


def test_a_copied_account_shares_no_mutable_state() -> None:
    import copy

    account = _account()
    block_id = next(iter(account.blocks))
    account.holds["r"] = Hold("r", "j", 4, T0, T0 + timedelta(days=1), [[block_id, 4]])
    copied = copy.deepcopy(account)
    assert copied == account
    copied.blocks[block_id].remaining -= 1
    copied.holds["r"].allocations[0][1] = 3
    copied.pending_events.clear()
    assert account.blocks[block_id].remaining == 10
    assert account.holds["r"].allocations == [[block_id, 4]]
    assert account.pending_events


def _two_blocks() -> tuple[CreditAccount, str, str]:
    account = CreditAccount._create(CreditAccount.Opened, id=uuid4(), user_id=uuid4(), timestamp=T0)
    ids = []
    for amount, expires_at in ((6, T0 + timedelta(days=3)), (10, None)):
        entry = uuid4()
        account.grant(entry_id=entry, amount=amount, kind="bonus", description="", reference_type=None,  # type: ignore[arg-type]
                      reference_id=None, expires_at=expires_at, actor=None, key=str(entry), now=T0)  # fmt: skip
        ids.append(str(entry))
    return account, ids[0], ids[1]


def _claw(account: CreditAccount, wanted: int, block_id: str | None, *, others: bool) -> int:
    return account.claw_back(
        entry_id=uuid4(),
        wanted=wanted,
        block_id=block_id,
        from_other_credits=others,
        description="",
        reference_type=None,
        reference_id=None,
        key=str(uuid4()),
        now=T0,
    )


def test_claw_back_takes_the_refunded_grants_own_credits_first() -> None:
    account, soon, kept = _two_blocks()
    # The domain's debit would draw the soonest-expiring block; a claw back
    # of the non-expiring grant takes that grant's own credits.
    assert _claw(account, 4, kept, others=True) == 4
    assert (account.blocks[soon].remaining, account.blocks[kept].remaining) == (6, 6)
    assert account.pending_events[-1].draws == [[kept, 4]]  # type: ignore[attr-defined]
    account.check_invariants()


def test_claw_back_takes_what_is_left_and_never_refuses() -> None:
    account, soon, kept = _two_blocks()
    account.reserve(reservation_id=uuid4(), job_id=uuid4(), amount=8, expires_at=T0 + timedelta(hours=1),
                    key="hold", now=T0)  # fmt: skip  # earmarks all of soon, 2 of kept
    assert _claw(account, 20, kept, others=False) == 8  # kept's unearmarked credits only
    assert _claw(account, 5, kept, others=True) == 0  # nothing free is left anywhere: no event
    assert account.balance == 8 and account.held == 8
    account.check_invariants()
    fresh, soon, kept = _two_blocks()
    assert _claw(fresh, 12, kept, others=True) == 12  # its own 10, then 2 of the other grant
    assert fresh.blocks[soon].remaining == 4 and kept not in fresh.blocks  # an emptied block is gone
    with pytest.raises(InvalidAmount):
        _claw(fresh, 0, kept, others=True)


def test_a_copied_plan_is_revised_without_touching_the_original() -> None:
    terms = DEFAULT_CATALOG[1]
    plan = Plan._create(Plan.Defined, id=plan_id_for(terms.name), terms=terms.as_event_data(), actor=None, timestamp=T0)
    plan.collect_events()
    copied = copy.deepcopy(plan)
    revised = replaced(terms, credits=terms.credits + 1).as_event_data()
    copied.trigger_event(Plan.Revised, terms=revised, actor="ops", timestamp=T0)
    assert (copied.revision, copied.terms.credits) == (2, terms.credits + 1)
    assert (plan.revision, plan.terms, plan.version) == (1, terms, 1)
    assert plan.pending_events == [] and len(copied.pending_events) == 1
