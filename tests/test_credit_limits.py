"""Credit limits (docs/credit-limits.md): an account may go below zero down to
minus its limit; debt is repaid first by later credits; the views, the audit
and point-in-time answers show it. Every test runs on memory, SQLite and
PostgreSQL unless it needs a durable store."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from uuid import UUID, uuid4

import psycopg
import pytest

from ledger import (
    MAX_CREDIT_LIMIT,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidAmount,
    InvalidArgument,
    Ledger,
    ManualClock,
    SetCreditLimit,
    audit,
)
from ledger.audit.pointintime import balance_at, statement
from ledger.domain.credits import CreditAccount, account_id_for
from ledger.views.schema import postgres_ddl
from tests.conftest import START, pg_base_url

HOUR = timedelta(hours=1)


def rows(ledger: Ledger, sql: str, params: list[object]) -> list[tuple[object, ...]]:
    """A read of the views; ``{table}`` names a table as the store spells it."""
    ledger.views.catch_up()
    store = ledger.views.store
    names = {t: store.qualified(t) for t in ("credit_balances", "credit_transactions")}
    return store.read(sql.format(**names), params)


def balance_row(ledger: Ledger, user: UUID) -> tuple[object, ...]:
    store = ledger.views.store
    found = rows(
        ledger,
        "SELECT balance, held, available, credit_limit FROM {credit_balances} WHERE user_id = %s",
        [store.stored_id(user)],
    )
    assert len(found) == 1
    return found[0]


def state(ledger: Ledger, user: UUID) -> tuple[int, int, int, int]:
    b = ledger.balance(user)
    return b.balance_credits, b.held_credits, b.available_credits, b.credit_limit_credits


def event_types(ledger: Ledger, user: UUID) -> list[str]:
    return [e.type for e in ledger.history(user)]


# -------------------------------------------------------------- the floor


def test_spends_go_below_zero_down_to_minus_the_limit(ledger: Ledger) -> None:
    user = uuid4()
    ledger.grant(user, 50, "purchase", key="g")
    receipt = ledger.set_credit_limit(user, 100, "enterprise contract", "ops@pingvas", key="limit")
    assert (receipt.command, receipt.amount_credits, receipt.entry_id) == ("set_credit_limit", 0, None)
    assert (receipt.balance_credits, receipt.available_credits) == (50, 150)
    assert ledger.spend(user, 120, key="s1").balance_credits == -70
    assert ledger.spend(user, 30, key="s2").available_credits == 0
    assert state(ledger, user) == (-100, 0, 0, 100)
    with pytest.raises(InsufficientCredits) as refused:
        ledger.spend(user, 1, key="s3")
    assert (refused.value.requested_credits, refused.value.available_credits) == (1, 0)
    assert state(ledger, user) == (-100, 0, 0, 100)  # nothing recorded
    assert ledger.balance(user).blocks == ()
    assert audit(ledger).ok


def test_without_a_limit_nothing_changes(ledger: Ledger) -> None:
    user = uuid4()
    ledger.grant(user, 10, "bonus", key="g")
    with pytest.raises(InsufficientCredits):
        ledger.spend(user, 11, key="s")
    ledger.set_credit_limit(user, 5, "trial overage", "ops", key="l1")
    ledger.spend(user, 15, key="s2")
    ledger.set_credit_limit(user, 0, "overage ends", "ops", key="l2")
    assert state(ledger, user) == (-5, 0, -5, 0)
    with pytest.raises(InsufficientCredits):
        ledger.spend(user, 1, key="s3")


def test_holds_count_against_the_floor(ledger: Ledger) -> None:
    user = uuid4()
    ledger.grant(user, 40, "purchase", key="g")
    ledger.set_credit_limit(user, 100, "postpaid", "ops", key="l")
    # 40 earmarked from the block, 60 held on credit.
    hold = ledger.reserve(user, uuid4(), 100, expires_in=HOUR, key="r1")
    assert (hold.balance_credits, hold.held_credits, hold.available_credits) == (40, 100, 40)
    with pytest.raises(InsufficientCredits):
        ledger.reserve(user, uuid4(), 41, expires_in=HOUR, key="r2")
    with pytest.raises(InsufficientCredits):
        ledger.spend(user, 41, key="s")
    ledger.reserve(user, uuid4(), 40, expires_in=HOUR, key="r3")
    assert state(ledger, user) == (40, 140, 0, 100)
    assert audit(ledger).ok


def test_settles_within_a_hold_on_credit_and_over_settles_to_the_floor(ledger: Ledger) -> None:
    user = uuid4()
    ledger.grant(user, 30, "purchase", key="g")
    ledger.set_credit_limit(user, 50, "postpaid", "ops", key="l")
    rid = ledger.reserve(user, uuid4(), 60, expires_in=HOUR, key="r").reservation_id
    assert rid is not None
    # available 30 - 60 + 50 = 20: the extra of a settle may be 20, not 21.
    with pytest.raises(InsufficientCredits) as refused:
        ledger.settle(rid, 81, key="over")
    assert refused.value.requested_credits == 21
    settled = ledger.settle(rid, 80, key="settle")
    assert (settled.balance_credits, settled.held_credits, settled.available_credits) == (-50, 0, 0)
    assert ledger.reservation(rid).settled_credits == 80
    assert audit(ledger).ok


def test_a_settle_below_the_hold_frees_what_it_did_not_use(ledger: Ledger) -> None:
    user = uuid4()
    ledger.set_credit_limit(user, 100, "postpaid", "ops", key="l")
    rid = ledger.reserve(user, uuid4(), 80, expires_in=HOUR, key="r").reservation_id  # all on credit
    assert rid is not None
    assert ledger.settle(rid, 30, key="s").balance_credits == -30
    assert state(ledger, user) == (-30, 0, 70, 100)


# ------------------------------------------------------- lowering the limit


def test_lowering_below_use_is_allowed_and_blocks_debits_until_back_above(ledger: Ledger) -> None:
    user = uuid4()
    ledger.set_credit_limit(user, 100, "trusted", "ops", key="l1")
    ledger.spend(user, 80, key="s1")
    lowered = ledger.set_credit_limit(user, 50, "risk review", "ops", key="l2")
    assert (lowered.balance_credits, lowered.available_credits) == (-80, -30)
    for key, call in {
        "s2": lambda k: ledger.spend(user, 1, key=k),
        "r": lambda k: ledger.reserve(user, uuid4(), 1, expires_in=HOUR, key=k),
        "a": lambda k: ledger.adjust(user, -1, "correction", "ops", key=k),
    }.items():
        with pytest.raises(InsufficientCredits):
            call(key)
    ledger.grant(user, 30, "purchase", key="g1")  # repays 30: balance -50, at the floor
    assert state(ledger, user) == (-50, 0, 0, 50)
    with pytest.raises(InsufficientCredits):
        ledger.spend(user, 1, key="s3")
    ledger.grant(user, 10, "purchase", key="g2")
    assert ledger.spend(user, 10, key="s4").available_credits == 0
    assert audit(ledger).ok


def test_a_hold_open_when_the_limit_is_lowered_still_settles(ledger: Ledger) -> None:
    user = uuid4()
    ledger.set_credit_limit(user, 100, "trusted", "ops", key="l1")
    rid = ledger.reserve(user, uuid4(), 90, expires_in=HOUR, key="r").reservation_id
    assert rid is not None
    ledger.set_credit_limit(user, 0, "closed for overage", "ops", key="l2")
    assert ledger.settle(rid, 90, key="s").balance_credits == -90  # within what was held
    with pytest.raises(InsufficientCredits):
        ledger.settle(ledger.reserve(user, uuid4(), 1, expires_in=HOUR, key="r2").reservation_id, 1, key="x")
    assert state(ledger, user) == (-90, 0, -90, 0)
    report = audit(ledger)
    assert report.ok, report.render()


# ------------------------------------------------- debt and its repayment


def test_grants_repay_debt_first_and_the_repaid_part_never_lapses(ledger: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    ledger.set_credit_limit(user, 100, "postpaid", "ops", key="l")
    ledger.spend(user, 70, key="s")
    # 50 expiring credits all repay debt: no block is left to lapse.
    ledger.grant(user, 50, "subscription_grant", key="g1", expires_in=timedelta(days=30))
    assert state(ledger, user) == (-20, 0, 80, 100)
    assert ledger.balance(user).blocks == ()
    # 30 more: 20 repay the rest, 10 stay in the block and lapse with it.
    ledger.grant(user, 30, "subscription_grant", key="g2", expires_in=timedelta(days=30))
    (block,) = ledger.balance(user).blocks
    assert (block.granted_credits, block.remaining_credits) == (30, 10)
    assert event_types(ledger, user).count("repaid") == 2
    clock.advance(timedelta(days=31))
    ledger.record_due([user])
    assert state(ledger, user) == (0, 0, 100, 100)
    ledger.views.catch_up()
    types = [
        (t, a, b)
        for t, a, b in rows(
            ledger,
            "SELECT type, amount, balance_after FROM {credit_transactions} WHERE user_id = %s ORDER BY log_position",
            [ledger.views.store.stored_id(user)],
        )
    ]
    assert types == [
        ("api_use", -70, -70),
        ("subscription_grant", 50, -20),
        ("subscription_grant", 30, 10),
        ("expiration", -10, 0),
    ]
    assert audit(ledger).ok


def test_a_release_while_in_debt_repays_it(ledger: Ledger) -> None:
    user = uuid4()
    ledger.grant(user, 100, "purchase", key="g")
    ledger.set_credit_limit(user, 50, "postpaid", "ops", key="l")
    rid = ledger.reserve(user, uuid4(), 100, expires_in=HOUR, key="r").reservation_id
    assert rid is not None
    ledger.spend(user, 50, key="s")  # the block is all earmarked: on credit
    account = ledger.read_aggregate(account_id_for(user))
    assert isinstance(account, CreditAccount) and account.debt == 50
    ledger.release(rid, "job cancelled", key="rel")
    account = ledger.read_aggregate(account_id_for(user))
    assert isinstance(account, CreditAccount) and account.debt == 0
    (block,) = ledger.balance(user).blocks
    assert block.remaining_credits == 50
    assert state(ledger, user) == (50, 0, 100, 50)
    assert audit(ledger).ok


def test_an_expired_hold_on_credit_is_released_by_the_sweep(ledger: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    ledger.set_credit_limit(user, 100, "postpaid", "ops", key="l")
    ledger.reserve(user, uuid4(), 100, expires_in=HOUR, key="r")
    assert ledger.balance(user).available_credits == 0
    clock.advance(2 * HOUR)
    assert ledger.balance(user).available_credits == 100  # in memory, before the sweep
    assert ledger.expire_holds() == 1
    assert state(ledger, user) == (0, 0, 100, 100)


# -------------------------------------------------- the command and its key


def test_the_limit_is_idempotent_by_key(ledger: Ledger) -> None:
    user = uuid4()
    first = ledger.set_credit_limit(user, 100, "contract", "ops", key="limit:1")
    again = ledger.set_credit_limit(user, 100, "contract", "ops", key="limit:1")
    assert again.replayed and again.position is None
    assert again.model_dump(exclude={"replayed", "position"}) == first.model_dump(exclude={"replayed", "position"})
    with pytest.raises(IdempotencyConflict):
        ledger.set_credit_limit(user, 200, "contract", "ops", key="limit:1")
    assert event_types(ledger, user) == ["opened", "limitset"]
    (event,) = [e for e in ledger.history(user) if e.type == "limitset"]
    assert event.data == {"limit_credits": 100, "reason": "contract", "actor": "ops", "key": "limit:1"}


def test_the_limit_runs_in_a_batch_with_the_spend_it_allows(ledger: Ledger) -> None:
    from ledger import SpendCredits

    user = uuid4()
    receipts = ledger.execute_batch(
        [
            SetCreditLimit(key="b:l", user_id=user, limit_credits=40, reason="batch", actor="ops"),
            SpendCredits(key="b:s", user_id=user, amount_credits=40),
        ]
    )
    assert [r.balance_credits for r in receipts] == [0, -40]


@pytest.mark.parametrize(
    ("change", "error", "param"),
    [
        ({"limit_credits": -1}, InvalidAmount, "limit_credits"),
        ({"limit_credits": MAX_CREDIT_LIMIT + 1}, InvalidAmount, "limit_credits"),
        ({"limit_credits": True}, InvalidAmount, "limit_credits"),
        ({"limit_credits": 1.5}, InvalidAmount, "limit_credits"),
        ({"reason": ""}, InvalidArgument, "reason"),
        ({"reason": "   "}, InvalidArgument, "reason"),
        ({"reason": "x" * 501}, InvalidArgument, "reason"),
        ({"reason": "bad\x00text"}, InvalidArgument, "reason"),
        ({"actor": ""}, InvalidArgument, "actor"),
        ({"actor": "a" * 101}, InvalidArgument, "actor"),
        ({"actor": 7}, InvalidArgument, "actor"),
        ({"user_id": UUID(int=0)}, InvalidArgument, "user_id"),
        ({"user_id": "not-a-uuid"}, InvalidArgument, "user_id"),
        ({"key": ""}, InvalidArgument, "key"),
    ],
)
def test_bad_input_is_refused_and_records_nothing(
    ledger: Ledger, change: dict[str, object], error: type[Exception], param: str
) -> None:
    user = uuid4()
    arguments: dict[str, object] = {
        "user_id": user,
        "limit_credits": 10,
        "reason": "contract",
        "actor": "ops",
        "key": "k",
    } | change
    with pytest.raises(error) as refused:
        ledger.set_credit_limit(**arguments)  # type: ignore[arg-type]
    assert getattr(refused.value, "param", None) == param
    assert ledger.app.recorder.max_notification_id() in (None, 0)


def test_the_largest_limit_is_taken(ledger: Ledger) -> None:
    user = uuid4()
    ledger.set_credit_limit(user, MAX_CREDIT_LIMIT, "ceiling", "ops", key="l")
    assert ledger.spend(user, MAX_CREDIT_LIMIT, key="s").balance_credits == -MAX_CREDIT_LIMIT
    assert balance_row(ledger, user) == (-MAX_CREDIT_LIMIT, 0, 0, MAX_CREDIT_LIMIT)


# --------------------------------------------- views, audit, point in time


def test_the_views_show_the_limit_and_the_negative_balance(ledger: Ledger) -> None:
    user = uuid4()
    ledger.grant(user, 20, "purchase", key="g")
    ledger.set_credit_limit(user, 100, "postpaid", "ops", key="l")
    ledger.spend(user, 70, key="s")
    ledger.reserve(user, uuid4(), 30, expires_in=HOUR, key="r")
    assert balance_row(ledger, user) == (-50, 30, 20, 100)
    ledger.set_credit_limit(user, 10, "lowered", "ops", key="l2")
    assert balance_row(ledger, user) == (-50, 30, -70, 10)
    report = audit(ledger)
    assert report.ok, report.render()
    assert report.summary["views_rows_compared"]["credit_balances"] == 1


def test_a_rebuilt_view_shows_the_same(durable_url: str, clock: ManualClock) -> None:
    """(A rebuild needs a durable store: ``memory://`` has no second schema.)"""
    with Ledger(durable_url, clock=clock) as ledger:
        user = uuid4()
        ledger.set_credit_limit(user, 60, "postpaid", "ops", key="l")
        ledger.spend(user, 45, key="s")
        before = balance_row(ledger, user)
        views = ledger.views
        aside = views.build_aside(until=views.position())
        try:
            assert not any(views.verify(aside).values())
            views.swap_in(aside)
        finally:
            views.drop_aside(aside)
        assert balance_row(ledger, user) == before == (-45, 0, 15, 60)


def forge_debit(ledger: Ledger, user: UUID, amount: int) -> None:
    """A debit of ``amount`` that draws on no block, saved around the command
    seam (as a forged or buggy writer would): what the audit must name."""
    account = ledger.read_aggregate(account_id_for(user))
    assert isinstance(account, CreditAccount)
    account.trigger_event(
        CreditAccount.Debited,
        entry_id=uuid4(),
        amount=amount,
        kind="api_use",
        description="",
        reference_type=None,
        reference_id=None,
        actor=None,
        draws=[],
        key="forged",
        timestamp=ledger.clock.now(),
    )
    ledger.app.save(account)


def test_the_audit_names_a_debit_below_the_floor(ledger: Ledger) -> None:
    user = uuid4()
    ledger.set_credit_limit(user, 10, "small", "ops", key="l")
    forge_debit(ledger, user, 25)  # past the floor
    report = audit(ledger, compare_views=False)
    negative = [f for f in report.findings if f.check == "negative"]
    assert negative and "below the floor of -10" in negative[0].message, report.render()


def test_the_audit_names_debt_beside_free_credits(ledger: Ledger) -> None:
    user = uuid4()
    ledger.grant(user, 50, "purchase", key="g")
    ledger.set_credit_limit(user, 100, "postpaid", "ops", key="l")
    forge_debit(ledger, user, 30)  # on credit while 50 free credits sit in the block
    report = audit(ledger, compare_views=False)
    assert any(f.check == "negative" and "on credit with 50 free" in f.message for f in report.findings)


def test_the_audit_names_a_settle_on_credit_beside_the_credits_it_held(ledger: Ledger, clock: ManualClock) -> None:
    """A settle that draws nothing from the blocks its hold earmarked puts
    its amount on credit: on an account with no limit, with the credits
    still in the block. The domain draws the hold's earmarks first."""
    user = uuid4()
    ledger.grant(user, 300, "purchase", key="g")
    hold = ledger.reserve(user, uuid4(), 100, expires_in=HOUR, key="r")
    account = ledger.read_aggregate(account_id_for(user))
    assert isinstance(account, CreditAccount)
    account.trigger_event(
        CreditAccount.Settled,
        reservation_id=hold.reservation_id,
        entry_id=uuid4(),
        amount=60,
        draws=[],
        key="forged",
        timestamp=clock.now(),
    )
    ledger.app.save(account)
    report = audit(ledger, compare_views=False)
    assert any(
        f.check == "negative" and "takes 60 credits on credit with 300 free" in f.message for f in report.findings
    ), report.render()


def test_point_in_time_answers_honour_the_limit(ledger: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    ledger.grant(user, 10, "purchase", key="g")
    t1 = clock.now()
    clock.advance(HOUR)
    ledger.set_credit_limit(user, 100, "postpaid", "ops", key="l")
    ledger.spend(user, 60, key="s")
    t2 = clock.now()
    clock.advance(HOUR)
    ledger.set_credit_limit(user, 20, "lowered", "ops", key="l2")
    then = balance_at(ledger, user, t1)
    assert (then.balance_credits, then.available_credits, then.credit_limit_credits) == (10, 10, 0)
    later = balance_at(ledger, user, t2)
    assert (later.balance_credits, later.available_credits, later.credit_limit_credits) == (-50, 50, 100)
    now = balance_at(ledger, user, clock.now())
    assert (now.balance_credits, now.available_credits, now.credit_limit_credits) == (-50, -30, 20)
    report = statement(ledger, user, t1, clock.now())
    assert (report.opening_balance_credits, report.closing_balance_credits) == (10, -50)
    assert (report.opening_credit_limit_credits, report.closing_credit_limit_credits) == (0, 20)
    assert [e.balance_after for e in report.entries] == [-50]


def test_a_snapshot_keeps_the_limit_and_the_debt(ledger_url: str, clock: ManualClock) -> None:
    with Ledger(ledger_url, clock=clock) as ledger:
        user = uuid4()
        ledger.set_credit_limit(user, 1_000, "postpaid", "ops", key="l")
        for i in range(105):  # past the snapshot interval (100 events)
            ledger.spend(user, 1, key=f"s{i}")
        fresh = ledger.read_aggregate(account_id_for(user))
        assert isinstance(fresh, CreditAccount)
        assert (fresh.credit_limit, fresh.debt, fresh.balance) == (1_000, 105, -105)
        events_only = ledger.read_aggregate(account_id_for(user), snapshots=False)
        assert (events_only.credit_limit, events_only.debt) == (1_000, 105)
        assert ledger.spend(user, 895, key="last").available_credits == 0
        assert audit(ledger, compare_views=False).ok


def test_a_snapshot_taken_before_limits_restores_without_one() -> None:
    account = CreditAccount(user_id=uuid4())
    del account.__dict__["credit_limit"], account.__dict__["debt"]  # as restored from an old snapshot
    assert (account.credit_limit, account.debt, account.available) == (0, 0, 0)


# --------------------------------------------- the schema migration (v2 -> v3)


V2_BALANCES_SQLITE = """
CREATE TABLE credit_balances (
    user_id TEXT NOT NULL PRIMARY KEY,
    balance INTEGER NOT NULL,
    held INTEGER NOT NULL,
    available INTEGER NOT NULL,
    updated_at TEXT NOT NULL DEFAULT (datetime('now')),
    CONSTRAINT chk_credit_balances CHECK (
        balance >= 0 AND held >= 0 AND available >= 0 AND available = balance - held)
);
INSERT INTO credit_balances (user_id, balance, held, available) VALUES ('u1', 100, 30, 70);
"""


def test_sqlite_migrates_a_version_2_balances_table(tmp_path: object) -> None:
    from ledger.views.schema import sqlite_ddl

    path = f"{tmp_path}/views.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(V2_BALANCES_SQLITE)
    for _ in range(2):  # idempotent
        with sqlite3.connect(path) as conn:
            conn.executescript(sqlite_ddl())
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT balance, held, available, credit_limit FROM credit_balances").fetchall() == [
            (100, 30, 70, 0)
        ]
        conn.execute("INSERT INTO credit_balances (user_id, balance, held, available, credit_limit) "
                     "VALUES ('u2', -40, 0, 10, 50)")  # fmt: skip
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO credit_balances (user_id, balance, held, available) VALUES ('u3', -1, 0, 0)")
        triggers = conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall()
        assert ("trg_credit_balances_updated_at",) in triggers


@pytest.mark.postgres
def test_postgres_migrates_a_version_2_balances_table(pg_url: str) -> None:
    schema = pg_url.rsplit("schema=", 1)[1]
    base = pg_base_url()
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(
            f'CREATE TABLE "{schema}".credit_balances (user_id UUID PRIMARY KEY, balance INT NOT NULL, '
            "held INT NOT NULL, available INT NOT NULL, updated_at TIMESTAMP NOT NULL DEFAULT NOW(), "
            "CONSTRAINT chk_credit_balances CHECK (balance >= 0 AND held >= 0 AND available >= 0 "
            "AND available = balance - held))"
        )
        user = uuid4()
        conn.execute(
            f'INSERT INTO "{schema}".credit_balances (user_id, balance, held, available) VALUES (%s, 100, 30, 70)',
            [user],
        )
        for _ in range(2):  # idempotent
            conn.execute(postgres_ddl(schema).encode())
        assert conn.execute(
            f'SELECT balance, held, available, credit_limit FROM "{schema}".credit_balances'
        ).fetchall() == [(100, 30, 70, 0)]
        conn.execute(
            f'INSERT INTO "{schema}".credit_balances (user_id, balance, held, available, credit_limit) '
            "VALUES (%s, -40, 0, 10, 50)",
            [uuid4()],
        )
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                f'INSERT INTO "{schema}".credit_balances (user_id, balance, held, available) VALUES (%s, -1, 0, 0)',
                [uuid4()],
            )
    assert START  # the shared clock's start: these tests need no ledger


def test_a_ledger_on_a_version_2_sqlite_store_migrates_when_opened(tmp_path: object, clock: ManualClock) -> None:
    url = f"sqlite:///{tmp_path}/ledger.sqlite3"
    with Ledger(url, clock=clock) as ledger:
        user = uuid4()
        ledger.grant(user, 10, "purchase", key="g")
        ledger.views.catch_up()
        views_path = ledger.views.store.path  # type: ignore[attr-defined]
    # Put the views back to version 2: the old table and no later version recorded.
    with sqlite3.connect(views_path) as conn:
        conn.execute("DROP TABLE credit_balances")
        conn.executescript(V2_BALANCES_SQLITE.replace("'u1', 100, 30, 70", f"'{user}', 10, 0, 10"))
        conn.execute("DELETE FROM ledger_schema_version WHERE version >= 3")
    with Ledger(url, clock=clock) as ledger:
        ledger.set_credit_limit(user, 50, "postpaid", "ops", key="l")
        ledger.spend(user, 40, key="s")
        assert balance_row(ledger, user) == (-30, 0, 20, 50)
        assert audit(ledger).ok


def test_snapshots_of_accounts_without_a_limit_keep_their_shape(ledger_url: str, clock: ManualClock) -> None:
    with Ledger(ledger_url, clock=clock) as ledger:
        plain, limited = uuid4(), uuid4()
        ledger.grant(plain, 500, "purchase", key="plain")
        ledger.set_credit_limit(limited, 500, "postpaid", "ops", key="limited")
        for i in range(105):
            ledger.spend(plain, 1, key=f"p{i}")
            ledger.spend(limited, 1, key=f"l{i}")
        states = {}
        for user in (plain, limited):
            (stored,) = ledger.app.snapshots.recorder.select_events(account_id_for(user), desc=True, limit=1)
            states[user] = ledger.app.mapper.to_domain_event(stored).state
        assert "credit_limit" not in states[plain] and "debt" not in states[plain]
        # The snapshot at version 100: opened, limit set, 98 spends on credit.
        assert (states[limited]["credit_limit"], states[limited]["debt"]) == (500, 98)
        report = audit(ledger, compare_views=False)
        assert report.ok, report.render()
        assert report.summary["snapshotted_accounts"] == 2


def test_concurrent_spends_on_credit_stop_at_the_floor(durable_url: str) -> None:
    """Writers in threads, each with its own Ledger, race to spend on credit:
    the floor holds, whatever the interleaving."""
    import threading

    user = uuid4()
    with Ledger(durable_url) as setup:
        setup.set_credit_limit(user, 50, "postpaid", "ops", key="race:limit")
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def writer(n: int) -> None:
        with Ledger(durable_url) as ledger:
            barrier.wait()
            for i in range(4):
                try:
                    ledger.spend(user, 5, key=f"race:{n}:{i}")
                    outcomes.append("spent")
                except InsufficientCredits:
                    outcomes.append("refused")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("spent") == 10 and outcomes.count("refused") == 6
    with Ledger(durable_url) as ledger:
        assert state(ledger, user) == (-50, 0, 0, 50)
        report = audit(ledger)
        assert report.ok, report.render()


def test_the_balance_command_shows_the_limit(durable_url: str, clock: ManualClock) -> None:
    import subprocess
    import sys

    user = uuid4()
    with Ledger(durable_url, clock=clock) as ledger:
        ledger.set_credit_limit(user, 30, "postpaid", "ops", key="cli:limit")
        ledger.spend(user, 20, key="cli:spend")
    out = subprocess.run(
        [sys.executable, "-m", "ledger", "balance", "--url", durable_url, "--user", str(user), "--as-of",
         (START + HOUR).isoformat()],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "balance -20, held 0, available 10, credit limit 30" in out.stdout


def test_credits_lapse_under_a_hold_on_credit_after_the_limit_is_lowered(ledger: Ledger, clock: ManualClock) -> None:
    """A hold on credit, a grant that then lapses, and a limit lowered to 0
    between: the expiry takes free credits only, and the audit agrees."""
    user = uuid4()
    ledger.set_credit_limit(user, 100, "postpaid", "ops", key="l1")
    ledger.reserve(user, uuid4(), 100, expires_in=timedelta(days=10), key="r")  # all on credit
    ledger.grant(user, 50, "bonus", key="g", expires_in=timedelta(days=1))  # free: no debt to repay
    ledger.set_credit_limit(user, 0, "prepaid again", "ops", key="l2")
    assert state(ledger, user) == (50, 100, -50, 0)
    clock.advance(timedelta(days=2))
    assert ledger.record_due([user]) == 1
    assert state(ledger, user) == (0, 100, -100, 0)
    report = audit(ledger)
    assert report.ok, report.render()


def test_the_audit_names_an_expiry_of_earmarked_credits(ledger: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    block = ledger.grant(user, 50, "bonus", key="g", expires_in=timedelta(days=1)).entry_id
    ledger.reserve(user, uuid4(), 50, expires_in=timedelta(days=5), key="r")
    clock.advance(timedelta(days=2))
    account = ledger.read_aggregate(account_id_for(user))
    assert isinstance(account, CreditAccount)
    # A forged expiry of the credits the open hold still earmarks.
    account.trigger_event(CreditAccount.Expired, entry_id=uuid4(), block_id=block, amount=50, timestamp=clock.now())
    ledger.app.save(account)
    report = audit(ledger, compare_views=False)
    assert any(f.check == "negative" and "the holds earmark 50" in f.message for f in report.findings), report.render()


def test_an_audit_resumed_from_a_checkpoint_keeps_limits_debt_and_holds_on_credit(
    ledger: Ledger, clock: ManualClock, tmp_path: object
) -> None:
    from pathlib import Path

    from ledger.audit.runner import checkpoint_position

    user = uuid4()
    ledger.set_credit_limit(user, 100, "postpaid", "ops", key="l")
    ledger.spend(user, 30, key="s")  # debt 30
    ledger.reserve(user, uuid4(), 40, expires_in=timedelta(days=3), key="r")  # 40 on credit
    ledger.grant(user, 50, "bonus", key="g", expires_in=timedelta(days=1))  # repays 30, 20 free
    clock.advance(timedelta(days=2))
    ledger.record_due([user])  # the 20 lapse under the hold on credit
    ledger.spend(user, 10, key="s2")
    ledger.views.catch_up()
    path = Path(str(tmp_path)) / "cp.json"

    class Stop(Exception):
        pass

    def stop(position: int, head: int) -> None:
        if path.exists() and checkpoint_position(path) >= 3:
            raise Stop

    with pytest.raises(Stop):
        audit(ledger, checkpoint=path, checkpoint_every=1, page_events=1, progress=stop)
    position = checkpoint_position(path)
    assert 0 < position < (ledger.app.recorder.max_notification_id() or 0)
    whole = audit(ledger)
    resumed = audit(ledger, from_position=position, checkpoint=path)
    assert whole.ok and resumed.ok, resumed.render()
    assert (resumed.digest, resumed.summary) == (whole.digest, whole.summary)
