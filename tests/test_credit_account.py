"""Behaviour of credit accounts, proven on every backend (memory, SQLite, PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from ledger import (
    MAX_CREDITS,
    BatchRejected,
    ConfigurationError,
    GrantCredits,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidAmount,
    InvalidArgument,
    Ledger,
    LedgerError,
    ManualClock,
    ReservationClosed,
    SpendCredits,
    UnknownAccount,
    UnknownReservation,
)

HOUR = timedelta(hours=1)


def funded(ledger: Ledger, credits: int = 1000, **grant: object) -> UUID:
    user = uuid4()
    ledger.grant(user, credits, "bonus", key=f"fund:{user}", **grant)  # type: ignore[arg-type]
    return user


def state(ledger: Ledger, user: UUID) -> tuple[int, int, int]:
    b = ledger.balance(user)
    return b.balance_credits, b.held_credits, b.available_credits


# -- grants, spends and blocks ---------------------------------------------------


def test_grant_and_spend_move_the_balance(ledger: Ledger) -> None:
    user = funded(ledger, 100)
    receipt = ledger.spend(user, 30, key="spend-1", description="api call")
    assert (receipt.amount_credits, receipt.balance_credits, receipt.available_credits) == (-30, 70, 70)
    assert state(ledger, user) == (70, 0, 70)


@pytest.mark.parametrize(
    "kind", ["subscription_grant", "subscription_renew", "purchase", "bonus", "refund", "admin_adjustment"]
)
def test_every_grant_kind_is_accepted(ledger: Ledger, kind: str) -> None:
    user = uuid4()
    assert ledger.grant(user, 5, kind, key=f"g:{kind}").balance_credits == 5
    assert ledger.balance(user).blocks[0].kind == kind


def test_debits_draw_soonest_expiring_block_first_then_oldest(ledger: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    now = clock.now()
    ledger.grant(user, 100, "purchase", key="old-forever")
    ledger.grant(user, 100, "bonus", key="new-forever")
    ledger.grant(user, 100, "subscription_grant", key="late", expires_at=now + 20 * 24 * HOUR)
    ledger.grant(user, 100, "subscription_grant", key="soon", expires_at=now + 10 * 24 * HOUR)
    ledger.spend(user, 250, key="big")
    remaining = {
        b.kind.value + ("@" + str(b.expires_at.day) if b.expires_at else ""): b.remaining_credits
        for b in ledger.balance(user).blocks
    }
    # soon (100) then late (100) then the oldest non-expiring (50 of 100)
    assert remaining == {"purchase": 50, "bonus": 100}


def test_a_lapsed_block_posts_its_unused_remainder_as_expiration(ledger: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    ledger.grant(user, 500, "subscription_grant", key="month", expires_at=clock.now() + 30 * 24 * HOUR)
    ledger.grant(user, 40, "bonus", key="bonus")
    ledger.spend(user, 100, key="use")
    clock.advance(31 * 24 * HOUR)
    assert state(ledger, user) == (40, 0, 40)  # shown at once, before anything is recorded
    assert ledger.record_due([user]) == 1
    expired = [e for e in ledger.history(user) if e.type == "expired"]
    assert [e.data["amount"] for e in expired] == [400]
    assert ledger.record_due([user]) == 0  # expiry is posted once


def test_earmarked_credits_of_a_lapsed_block_wait_for_the_hold(ledger: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    ledger.grant(user, 100, "subscription_grant", key="m", expires_at=clock.now() + 2 * HOUR)
    hold = ledger.reserve(user, uuid4(), 60, clock.now() + 5 * HOUR, key="r")
    clock.advance(3 * HOUR)  # the block lapses while 60 of it is held
    assert state(ledger, user) == (60, 60, 0)
    settled = ledger.settle(hold.reservation_id, 45, key="s")  # type: ignore[arg-type]
    # 45 charged from the held credits; the 15 freed from the lapsed block expire at once
    assert (settled.balance_credits, settled.held_credits) == (0, 0)
    assert [e.type for e in ledger.history(user)][-3:] == ["expired", "settled", "expired"]


# -- holds ---------------------------------------------------------------------


def test_holds_count_against_available_at_once(ledger: Ledger, clock: ManualClock) -> None:
    user = funded(ledger, 100)
    r = ledger.reserve(user, uuid4(), 70, clock.now() + HOUR, key="r1")
    assert (r.balance_credits, r.held_credits, r.available_credits) == (100, 70, 30)
    with pytest.raises(InsufficientCredits) as info:
        ledger.reserve(user, uuid4(), 31, clock.now() + HOUR, key="r2")
    assert (info.value.requested_credits, info.value.available_credits) == (31, 30)
    with pytest.raises(InsufficientCredits):
        ledger.spend(user, 31, key="s-too-much")
    assert state(ledger, user) == (100, 70, 30)


def test_settle_below_the_hold_frees_the_rest(ledger: Ledger, clock: ManualClock) -> None:
    user = funded(ledger, 100)
    job = uuid4()
    r = ledger.reserve(user, job, 50, clock.now() + HOUR, key="r")
    assert r.reservation_id is not None
    s = ledger.settle(r.reservation_id, 20, key="s")
    assert (s.amount_credits, s.balance_credits, s.held_credits, s.available_credits) == (-20, 80, 0, 80)
    view = ledger.reservation(r.reservation_id)
    assert (view.status, view.settled_credits, view.job_id, view.user_id) == ("settled", 20, job, user)


def test_settle_above_the_hold_charges_the_extra_when_available(ledger: Ledger, clock: ManualClock) -> None:
    user = funded(ledger, 100)
    r = ledger.reserve(user, uuid4(), 50, clock.now() + HOUR, key="r")
    s = ledger.settle(r.reservation_id, 80, key="s")  # type: ignore[arg-type]
    assert (s.balance_credits, s.held_credits) == (20, 0)


def test_settle_above_the_hold_fails_and_keeps_the_hold_when_extra_is_not_available(
    ledger: Ledger, clock: ManualClock
) -> None:
    user = funded(ledger, 100)
    r = ledger.reserve(user, uuid4(), 50, clock.now() + HOUR, key="r")
    ledger.spend(user, 40, key="spend")
    with pytest.raises(InsufficientCredits) as info:
        ledger.settle(r.reservation_id, 61, key="s")  # type: ignore[arg-type]
    assert info.value.requested_credits == 11
    assert state(ledger, user) == (60, 50, 10)
    assert ledger.reservation(r.reservation_id).status == "reserved"  # type: ignore[arg-type]
    assert ledger.settle(r.reservation_id, 60, key="s2").balance_credits == 0  # type: ignore[arg-type]


def test_release_frees_the_hold(ledger: Ledger, clock: ManualClock) -> None:
    user = funded(ledger, 100)
    r = ledger.reserve(user, uuid4(), 50, clock.now() + HOUR, key="r")
    rel = ledger.release(r.reservation_id, "job cancelled", key="rel")  # type: ignore[arg-type]
    assert (rel.amount_credits, rel.balance_credits, rel.held_credits) == (0, 100, 0)
    view = ledger.reservation(r.reservation_id)  # type: ignore[arg-type]
    assert (view.status, view.release_reason) == ("released", "job cancelled")


@pytest.mark.parametrize("first", ["settle", "release"])
@pytest.mark.parametrize("second", ["settle", "release"])
def test_a_hold_closes_once(ledger: Ledger, clock: ManualClock, first: str, second: str) -> None:
    user = funded(ledger, 100)
    rid = ledger.reserve(user, uuid4(), 50, clock.now() + HOUR, key="r").reservation_id
    assert rid is not None

    def close(how: str, key: str) -> object:
        if how == "settle":
            return ledger.settle(rid, 10, key=key)
        return ledger.release(rid, "done", key=key)

    close(first, "first")
    before = state(ledger, user)
    with pytest.raises(ReservationClosed) as info:
        close(second, "second")
    assert info.value.status == ("settled" if first == "settle" else "released")
    assert state(ledger, user) == before


def test_expire_holds_releases_only_holds_past_their_expiry(ledger: Ledger, clock: ManualClock) -> None:
    user = funded(ledger, 100)
    short = ledger.reserve(user, uuid4(), 10, clock.now() + HOUR, key="short").reservation_id
    long = ledger.reserve(user, uuid4(), 20, clock.now() + 5 * HOUR, key="long").reservation_id
    other = funded(ledger, 100)
    other_hold = ledger.reserve(other, uuid4(), 30, clock.now() + HOUR, key="other").reservation_id
    clock.advance(2 * HOUR)
    assert ledger.expire_holds() == 2
    assert ledger.expire_holds() == 0
    statuses = [ledger.reservation(r).status for r in (short, long, other_hold)]  # type: ignore[arg-type]
    assert statuses == ["released", "reserved", "released"]
    assert ledger.reservation(short).release_reason == "expired"  # type: ignore[arg-type]
    with pytest.raises(ReservationClosed):
        ledger.settle(short, 10, key="late-settle")  # type: ignore[arg-type]
    assert state(ledger, user) == (100, 20, 80)


# -- adjustments -------------------------------------------------------------------


def test_adjust_either_sign_and_never_below_zero(ledger: Ledger, clock: ManualClock) -> None:
    user = funded(ledger, 100)
    assert ledger.adjust(user, 25, "goodwill", "admin:lee", key="a1").balance_credits == 125
    assert ledger.adjust(user, -100, "chargeback", "admin:lee", key="a2").balance_credits == 25
    ledger.reserve(user, uuid4(), 20, clock.now() + HOUR, key="r")
    with pytest.raises(InsufficientCredits):
        ledger.adjust(user, -6, "too much", "admin:lee", key="a3")  # 20 of the 25 are held
    assert ledger.history(user)[-2].data["actor"] == "admin:lee"


# -- idempotency -------------------------------------------------------------------


def test_same_key_same_arguments_returns_the_first_receipt(ledger: Ledger, clock: ManualClock) -> None:
    user = funded(ledger, 100)
    first = ledger.spend(user, 10, key="invoice:1")
    clock.advance(HOUR)
    again = ledger.spend(user, 10, key="invoice:1")
    assert again.replayed and not first.replayed
    assert again.model_dump(exclude={"replayed", "position"}) == first.model_dump(exclude={"replayed", "position"})
    assert first.position is not None and again.position is None
    assert state(ledger, user) == (90, 0, 90)


def test_replay_wins_over_a_business_error(ledger: Ledger, clock: ManualClock) -> None:
    # The first reserve took every credit; its retry must not fail for lack of credits.
    user = funded(ledger, 100)
    first = ledger.reserve(user, uuid4(), 100, clock.now() + HOUR, key="job:1:reserve")
    job = ledger.reservation(first.reservation_id).job_id  # type: ignore[arg-type]
    again = ledger.reserve(user, job, 100, first.recorded_at + HOUR, key="job:1:reserve")
    assert again.replayed and again.reservation_id == first.reservation_id


@pytest.mark.parametrize(
    "reuse",
    [
        lambda ledger, user: ledger.spend(user, 11, key="k"),
        lambda ledger, user: ledger.grant(user, 10, "bonus", key="k"),
        lambda ledger, user: ledger.spend(uuid4(), 10, key="k"),
        lambda ledger, user: ledger.spend(user, 10, key="k", description="other"),
    ],
)
def test_same_key_different_arguments_is_a_conflict(ledger: Ledger, reuse: object) -> None:
    user = funded(ledger, 100)
    ledger.spend(user, 10, key="k")
    with pytest.raises(IdempotencyConflict) as info:
        reuse(ledger, user)  # type: ignore[operator]
    assert info.value.key == "k"
    assert state(ledger, user) == (90, 0, 90)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_keys_survive_reopening_the_store(
    backend: str, clock: ManualClock, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # A memory store does not outlive its Ledger, so only the durable stores.
    ledger_url = f"sqlite:///{tmp_path / 'l.sqlite3'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    user = uuid4()
    with Ledger(ledger_url, clock=clock) as first:
        receipt = first.grant(user, 7, "bonus", key="reopen").model_copy(update={"position": None})
    with Ledger(ledger_url, clock=clock) as second:
        assert second.grant(user, 7, "bonus", key="reopen") == receipt.model_copy(update={"replayed": True})
        assert second.balance(user).balance_credits == 7


# -- bad input: typed errors, nothing recorded ---------------------------------------


@pytest.mark.parametrize("amount", [0, -1, True, 1.5, "10", None, MAX_CREDITS + 1])
def test_bad_amounts_are_refused(ledger: Ledger, amount: object) -> None:
    user = funded(ledger, 100)
    for call in (
        lambda: ledger.grant(user, amount, "bonus", key="bad-g"),  # type: ignore[arg-type]
        lambda: ledger.spend(user, amount, key="bad-s"),  # type: ignore[arg-type]
        lambda: ledger.reserve(user, uuid4(), amount, datetime(2027, 1, 1, tzinfo=UTC), key="bad-r"),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidAmount):
            call()
    assert state(ledger, user) == (100, 0, 100)
    assert len(ledger.history(user)) == 2


def test_balance_limit(ledger: Ledger) -> None:
    user = funded(ledger, MAX_CREDITS)
    with pytest.raises(InvalidAmount, match="limit"):
        ledger.grant(user, 1, "bonus", key="over")


def test_naive_datetimes_are_refused(ledger: Ledger) -> None:
    user = funded(ledger, 100)
    with pytest.raises(InvalidArgument, match="timezone-aware"):
        ledger.reserve(user, uuid4(), 5, datetime(2027, 1, 1), key="naive")
    with pytest.raises(InvalidArgument, match="timezone-aware"):
        ledger.grant(user, 5, "bonus", key="naive-g", expires_at=datetime(2027, 1, 1))


def test_expiry_in_the_past_is_refused(ledger: Ledger, clock: ManualClock) -> None:
    """An expiry that is not in the future is an error about expires_at, not about the amount."""
    user = funded(ledger, 100)
    head = ledger.app.recorder.max_notification_id()
    with pytest.raises(InvalidArgument, match="hold would lapse at once") as info:
        ledger.reserve(user, uuid4(), 5, clock.now(), key="past")
    assert not isinstance(info.value, InvalidAmount) and info.value.param == "expires_at"
    with pytest.raises(InvalidArgument, match="grant would lapse at once") as info:
        ledger.grant(user, 5, "bonus", key="past-g", expires_at=clock.now() - HOUR)
    assert not isinstance(info.value, InvalidAmount) and info.value.param == "expires_at"
    assert ledger.app.recorder.max_notification_id() == head


@pytest.mark.parametrize(
    "call",
    [
        lambda L, u: L.grant(u, 5, "api_use", key="k1"),
        lambda L, u: L.grant(u, 5, "nonsense", key="k2"),
        lambda L, u: L.spend(u, 5, kind="bonus", key="k3"),
        lambda L, u: L.spend("not-a-uuid", 5, key="k4"),
        lambda L, u: L.spend(u, 5, key=""),
        lambda L, u: L.spend(u, 5, key=" padded "),
        lambda L, u: L.spend(u, 5, key="x" * 201),
        lambda L, u: L.spend(u, 5, key="k5", description="d" * 501),
        lambda L, u: L.adjust(u, 0, "nothing", "admin", key="k6"),
        lambda L, u: L.adjust(u, 5, "", "admin", key="k7"),
        lambda L, u: L.release(uuid4(), "", key="k8"),
        lambda L, u: L.history(u, limit=0),
    ],
)
def test_bad_arguments_are_refused(ledger: Ledger, call: object) -> None:
    user = funded(ledger, 100)
    with pytest.raises(InvalidArgument):
        call(ledger, user)  # type: ignore[operator]
    assert state(ledger, user) == (100, 0, 100)


def test_unknown_account(ledger: Ledger, clock: ManualClock) -> None:
    stranger = uuid4()
    for call in (
        lambda: ledger.spend(stranger, 1, key="u1"),
        lambda: ledger.reserve(stranger, uuid4(), 1, clock.now() + HOUR, key="u2"),
        lambda: ledger.adjust(stranger, -1, "r", "admin", key="u3"),
        lambda: ledger.balance(stranger),
        lambda: ledger.history(stranger),
    ):
        with pytest.raises(UnknownAccount) as info:
            call()
        assert info.value.user_id == stranger


def test_unknown_reservation(ledger: Ledger, clock: ManualClock) -> None:
    user = funded(ledger, 100)
    other = funded(ledger, 100)
    foreign = ledger.reserve(other, uuid4(), 5, clock.now() + HOUR, key="foreign").reservation_id
    with pytest.raises(UnknownReservation):
        ledger.settle(uuid4(), 5, key="nope")
    with pytest.raises(UnknownReservation):
        ledger.release(uuid4(), "x", key="nope2")
    with pytest.raises(UnknownReservation):
        ledger.reservation(uuid4())
    with pytest.raises(UnknownReservation):  # naming the wrong owner finds nothing
        ledger.settle(foreign, 5, key="wrong-owner", user_id=user)  # type: ignore[arg-type]
    assert state(ledger, other) == (100, 5, 95)


def test_every_error_is_a_ledger_error() -> None:
    import ledger as package

    errors = [
        getattr(package, n)
        for n in package.__all__
        if n.endswith(("Error", "Conflict", "Credits", "Closed", "Rejected", "Exhausted", "Violation"))
    ]
    errors += [package.UnknownAccount, package.UnknownReservation, package.InvalidAmount, package.InvalidArgument]
    assert all(issubclass(e, LedgerError) for e in errors if isinstance(e, type) and issubclass(e, Exception))


@pytest.mark.parametrize(
    "url",
    [
        "",
        "ftp://x",
        "sqlite://host/x",
        "sqlite:///:memory:",
        "postgresql://h/db?bogus=1",
        "postgresql://h/db?schema=Robert');--",
        "postgresql://h/",
    ],
)
def test_bad_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError):
        Ledger(url)


# -- batches -------------------------------------------------------------------------


def test_batch_is_all_or_nothing(ledger: Ledger) -> None:
    users = [uuid4() for _ in range(3)]
    ledger.execute_batch([GrantCredits(key=f"b0:{u}", user_id=u, amount_credits=10, kind="bonus") for u in users])  # type: ignore[arg-type]
    bad = [SpendCredits(key=f"b1:{u}", user_id=u, amount_credits=5) for u in users]
    bad.append(SpendCredits(key="b1:too-much", user_id=users[0], amount_credits=6))
    with pytest.raises(BatchRejected) as info:
        ledger.execute_batch(bad)
    assert info.value.index == 3 and isinstance(info.value.cause, InsufficientCredits)
    assert [ledger.balance(u).balance_credits for u in users] == [10, 10, 10]
    receipts = ledger.execute_batch(bad[:3])
    assert [r.balance_credits for r in receipts] == [5, 5, 5]
    rerun = ledger.execute_batch([*bad[:3], GrantCredits(key="b2", user_id=users[1], amount_credits=1, kind="bonus")])  # type: ignore[arg-type]
    assert [r.replayed for r in rerun] == [True, True, True, False]
    assert [ledger.balance(u).balance_credits for u in users] == [5, 6, 5]


def test_batch_reserve_and_settle_the_same_hold(ledger: Ledger, clock: ManualClock) -> None:
    from ledger import ReserveCredits, SettleReservation

    user = funded(ledger, 100)
    reserve = ReserveCredits(key="br", user_id=user, job_id=uuid4(), amount_credits=30, expires_at=clock.now() + HOUR)
    receipts = ledger.execute_batch([reserve])
    rid = receipts[0].reservation_id
    assert rid is not None
    out = ledger.execute_batch([SettleReservation(key="bs", reservation_id=rid, actual_credits=30)])
    assert out[0].balance_credits == 70 and ledger.reservation(rid).status == "settled"


def test_batch_key_reused_with_other_arguments_is_refused(ledger: Ledger) -> None:
    user = funded(ledger, 100)
    with pytest.raises(IdempotencyConflict):
        ledger.execute_batch(
            [
                SpendCredits(key="dup", user_id=user, amount_credits=1),
                SpendCredits(key="dup", user_id=user, amount_credits=2),
            ]
        )
    assert state(ledger, user) == (100, 0, 100)


def test_a_large_batch_is_one_transaction(ledger: Ledger) -> None:
    """Past the PostgreSQL recorder's pipeline limit (256 events) too: all or
    nothing, and a re-run replays keys recorded by an earlier run."""
    users = [uuid4() for _ in range(400)]
    grants = [GrantCredits(key=f"big:{u}", user_id=u, amount_credits=3, kind="bonus") for u in users]  # type: ignore[arg-type]
    overdraw = SpendCredits(key="big:overdraw", user_id=users[0], amount_credits=4)
    with pytest.raises(BatchRejected):
        ledger.execute_batch([*grants, overdraw])
    with pytest.raises(UnknownAccount):
        ledger.balance(users[0])
    ledger.execute(grants[7])  # recorded alone first: the batch below must replay it
    receipts = ledger.execute_batch(grants)
    assert [r.replayed for r in receipts].count(True) == 1 and receipts[7].replayed
    assert {ledger.balance(u).balance_credits for u in users} == {3}
    again = ledger.execute_batch(grants)
    assert all(r.replayed for r in again)
    assert {ledger.balance(u).balance_credits for u in users} == {3}
