"""Subscriptions on every backend: every transition allowed and refused, every
credit policy, entitlements, tick, and ``python -m ledger tick``.

A refused command must record nothing: the event log's head, the account's
history and balance, and the subscription stay as they were, and the key stays
free for another command.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest

from ledger import (
    DEFAULT_CATALOG,
    CreditPolicy,
    Feature,
    IdempotencyConflict,
    InvalidArgument,
    InvalidTransition,
    Ledger,
    LedgerError,
    ManualClock,
    PlanTerms,
    Receipt,
    SubscriptionExists,
    SubscriptionView,
    UnknownAccount,
    UnknownPlan,
    UnknownSubscription,
)
from tests.conftest import START

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
#: The end of a monthly period started at START (2026-01-01).
FEB_1 = datetime(2026, 2, 1, tzinfo=UTC)
MAR_1 = datetime(2026, 3, 1, tzinfo=UTC)
APR_1 = datetime(2026, 4, 1, tzinfo=UTC)
TERMS = {t.name: t for t in DEFAULT_CATALOG}
SUBSCRIPTION_KINDS = ("subscription_grant", "subscription_renew")


# ------------------------------------------------------------------ helpers


@pytest.fixture
def billing(ledger: Ledger) -> Ledger:
    """The ledger with the seed's catalog installed."""
    ledger.install_default_catalog()
    return ledger


@pytest.fixture
def open_ledger(ledger_url: str, clock: ManualClock) -> Iterator[Callable[..., Ledger]]:
    """Opens ledgers on the test's store with a given policy; closes them after."""
    opened: list[Ledger] = []

    def make(**policy: Any) -> Ledger:
        ledger = Ledger(ledger_url, clock=clock, credit_policy=CreditPolicy(**policy))
        ledger.install_default_catalog()
        opened.append(ledger)
        return ledger

    yield make
    for ledger in opened:
        ledger.close()


@dataclass(frozen=True)
class Footprint:
    """What a refused command must leave as it was."""

    head: int
    account_events: int | None
    balance: int | None
    subscription: SubscriptionView | None


def footprint(ledger: Ledger, user: UUID, sid: UUID | None) -> Footprint:
    try:
        events: int | None = len(ledger.history(user, limit=10_000))
        balance: int | None = ledger.balance(user).balance_credits
    except UnknownAccount:
        events = balance = None
    return Footprint(
        head=ledger.app.recorder.max_notification_id() or 0,
        account_events=events,
        balance=balance,
        subscription=None if sid is None else ledger.subscription(sid),
    )


def refused(
    ledger: Ledger,
    user: UUID,
    sid: UUID | None,
    call: Callable[[str], Receipt],
    error: type[LedgerError] = InvalidTransition,
) -> LedgerError:
    """Runs ``call(key)``, expects ``error``, and checks that nothing was recorded."""
    key = f"refused:{uuid4()}"
    before = footprint(ledger, user, sid)
    with pytest.raises(error) as caught:
        call(key)
    assert footprint(ledger, user, sid) == before
    assert ledger.engine.find_record(key) is None  # the key is still free
    return caught.value


def grants(ledger: Ledger, user: UUID) -> list[tuple[str, int, datetime | None]]:
    """The account's grants: (kind, credits, expires_at), oldest first."""
    return [
        (e.data["kind"], e.data["amount"], e.data["expires_at"])
        for e in ledger.history(user, limit=10_000)
        if e.type == "granted"
    ]


def subscription_credits(ledger: Ledger, user: UUID) -> int:
    return sum(amount for kind, amount, _ in grants(ledger, user) if kind in SUBSCRIPTION_KINDS)


def start(ledger: Ledger, user: UUID, plan: str = "starter", **kwargs: Any) -> UUID:
    receipt = ledger.start_subscription(user, plan, key=f"{user}:start:{uuid4()}", **kwargs)
    assert receipt.subscription_id is not None
    return receipt.subscription_id


# -------------------------------------------------------------- the catalog


def test_the_default_catalog_is_the_seeds(billing: Ledger) -> None:
    starter, pro, studio, enterprise = (billing.plan(n) for n in ("starter", "pro", "studio", "enterprise"))
    assert [(p.credits, p.tier_level, p.queue_count) for p in (starter, pro, studio, enterprise)] == [
        (5000, 1, 1),
        (15000, 2, 1),
        (30000, 3, 3),
        (0, 4, 0),
    ]
    assert (starter.monthly_price, starter.yearly_price) == (Decimal("25.00"), Decimal("250.00"))
    assert [p.storage_bytes for p in (starter, pro, studio)] == [20 * 1024**3, 100 * 1024**3, 200 * 1024**3]
    assert pro.features == {"sd_models": True, "flux_model": True, "nano_banana_api": True, "lora_training": False}
    assert studio.features["lora_training"] and not starter.features["flux_model"]
    assert billing.install_default_catalog()[0].replayed  # installing twice changes nothing
    assert billing.plan("starter").revision == 1
    with pytest.raises(UnknownPlan):
        billing.plan("platinum")


def test_revising_a_plan_keeps_its_history(billing: Ledger) -> None:
    pro = TERMS["pro"]
    revised = replace(pro, credits=16000, monthly_price=Decimal("79.00"))
    billing.define_plan(revised, actor="admin:kim")
    billing.define_plan(revised, key="same-terms-again")  # same terms: no new revision
    assert billing.plan("pro").revision == 2
    assert [(v.revision, v.credits, v.monthly_price) for v in billing.plan_history("pro")] == [
        (1, 15000, Decimal("75.00")),
        (2, 16000, Decimal("79.00")),
    ]
    with pytest.raises(InvalidArgument):
        PlanTerms("pro", "Pro", Decimal("1.001"), Decimal("1.00"), 1, 1, 1, 1)  # prices have two places


def test_a_plan_can_be_revised_back_to_earlier_terms(billing: Ledger) -> None:
    billing.define_plan(replace(TERMS["pro"], credits=16000))
    receipt = billing.define_plan(TERMS["pro"])  # back to the seed's terms
    assert not receipt.replayed
    assert (billing.plan("pro").credits, billing.plan("pro").revision) == (15000, 3)


def test_defining_the_same_terms_again_changes_nothing_whoever_does_it(billing: Ledger) -> None:
    revised = replace(TERMS["pro"], credits=16000)
    billing.define_plan(revised, actor="admin:kim")
    billing.define_plan(revised, actor="admin:lee")
    assert billing.plan("pro").revision == 2


# ----------------------------------------------------------- starting


def test_start_active_grants_the_period(billing: Ledger) -> None:
    user = uuid4()
    receipt = billing.start_subscription(
        user, "pro", key="start-1", lemon_squeezy_subscription_id="ls-1", lemon_squeezy_customer_id="c-1"
    )
    assert (receipt.command, receipt.amount_credits, receipt.balance_credits) == ("start_subscription", 15000, 15000)
    assert receipt.subscription_id is not None
    s = billing.subscription(receipt.subscription_id)
    assert (s.status, s.plan, s.plan_revision, s.billing_cycle) == ("active", "pro", 1, "monthly")
    assert (s.current_period_start, s.current_period_end, s.trial_ends_at) == (START, FEB_1, None)
    assert (s.lemon_squeezy_subscription_id, s.lemon_squeezy_customer_id) == ("ls-1", "c-1")
    assert billing.subscription_of(user) == s
    assert grants(billing, user) == [("subscription_grant", 15000, FEB_1)]
    again = billing.start_subscription(
        user, "pro", key="start-1", lemon_squeezy_subscription_id="ls-1", lemon_squeezy_customer_id="c-1"
    )
    assert again.replayed and again.subscription_id == receipt.subscription_id
    with pytest.raises(IdempotencyConflict):
        billing.start_subscription(user, "studio", key="start-1")


def test_start_a_trial_and_a_yearly_period(billing: Ledger) -> None:
    user, other = uuid4(), uuid4()
    s = billing.subscription(start(billing, user, "studio", trial_days=14))
    assert (s.status, s.trial_ends_at, s.current_period_end) == ("trialing", START + 14 * DAY, START + 14 * DAY)
    assert grants(billing, user) == [("subscription_grant", 30000, START + 14 * DAY)]
    y = billing.subscription(start(billing, other, "starter", billing_cycle="yearly"))
    assert (y.billing_cycle, y.current_period_end) == ("yearly", datetime(2027, 1, 1, tzinfo=UTC))
    for bad in ({"trial_days": -1}, {"trial_days": 366}, {"billing_cycle": "weekly"}):
        with pytest.raises(InvalidArgument):
            billing.start_subscription(uuid4(), "pro", key=f"bad:{uuid4()}", **bad)


def test_start_is_refused_with_a_live_subscription_an_unknown_or_inactive_plan(billing: Ledger) -> None:
    user = uuid4()
    sid = start(billing, user)
    exc = refused(billing, user, sid, lambda k: billing.start_subscription(user, "pro", key=k), SubscriptionExists)
    assert isinstance(exc, SubscriptionExists) and exc.subscription_id == sid
    billing.cancel_subscription(sid, key=f"{user}:cancel")  # cancelled but paid up: still live
    refused(billing, user, sid, lambda k: billing.start_subscription(user, "pro", key=k), SubscriptionExists)
    newcomer = uuid4()
    refused(billing, newcomer, None, lambda k: billing.start_subscription(newcomer, "platinum", key=k), UnknownPlan)
    billing.define_plan(replace(TERMS["starter"], name="legacy", is_active=False))
    refused(billing, newcomer, None, lambda k: billing.start_subscription(newcomer, "legacy", key=k), InvalidArgument)
    assert billing.subscription_of(newcomer) is None


def test_after_expiry_a_user_may_start_again(billing: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    first = start(billing, user)
    billing.cancel_subscription(first, key=f"{user}:cancel", at_period_end=False)
    assert billing.subscription_of(user) is None
    second = start(billing, user, "pro")
    assert second != first and billing.subscription(first).status == "expired"
    assert billing.subscription_of(user) == billing.subscription(second)


# ----------------------------------------------------------- every transition from every state

#: The states a subscription is put in (at START) before a command is tried at
#: START + 30 days: inside the renewal window of the period ending 2026-02-01,
#: and before that period (and the 31-day trial) ends.
STATES = ("trialing", "active", "past_due", "paused", "cancelled", "expired")

#: command: (the call, the states it is allowed from, the status it leaves)
COMMANDS: dict[str, tuple[Callable[[Ledger, UUID, str], Receipt], frozenset[str], str | None]] = {
    "activate": (lambda lg, s, k: lg.activate_subscription(s, key=k), frozenset({"trialing"}), "active"),
    "renew": (lambda lg, s, k: lg.renew_subscription(s, key=k), frozenset({"active", "past_due"}), "active"),
    "change plan": (
        lambda lg, s, k: lg.change_plan(s, "pro", key=k),
        frozenset({"trialing", "active", "past_due"}),
        None,  # the status stays
    ),
    "mark past due": (lambda lg, s, k: lg.mark_past_due(s, key=k), frozenset({"active"}), "past_due"),
    "recover": (lambda lg, s, k: lg.recover_subscription(s, key=k), frozenset({"past_due"}), "active"),
    "cancel at period end": (
        lambda lg, s, k: lg.cancel_subscription(s, key=k, reason="too expensive"),
        frozenset({"trialing", "active", "past_due", "paused"}),
        "cancelled",
    ),
    "cancel now": (
        lambda lg, s, k: lg.cancel_subscription(s, key=k, at_period_end=False),
        frozenset({"trialing", "active", "past_due", "paused"}),
        "expired",
    ),
    "resume": (lambda lg, s, k: lg.resume_subscription(s, key=k), frozenset({"cancelled"}), "active"),
    "pause": (lambda lg, s, k: lg.pause_subscription(s, key=k), frozenset({"active"}), "paused"),
    "unpause": (lambda lg, s, k: lg.unpause_subscription(s, key=k), frozenset({"paused"}), "active"),
    "expire": (
        lambda lg, s, k: lg.expire_subscription(s, key=k),
        frozenset({"trialing", "active", "past_due", "paused"}),  # cancelled only once its period ended
        "expired",
    ),
}


def put_in(ledger: Ledger, user: UUID, state: str) -> UUID:
    sid = start(ledger, user, "starter", trial_days=31 if state == "trialing" else 0)
    key = f"{user}:{state}"
    if state == "past_due":
        ledger.mark_past_due(sid, key=key)
    elif state == "paused":
        ledger.pause_subscription(sid, key=key)
    elif state == "cancelled":
        ledger.cancel_subscription(sid, key=key)
    elif state == "expired":
        ledger.expire_subscription(sid, key=key)
    assert ledger.subscription(sid).status == state
    return sid


def test_every_command_from_every_state(billing: Ledger, clock: ManualClock) -> None:
    cases = {(state, name): (uuid4(), state) for state in STATES for name in COMMANDS}
    sids = {case: put_in(billing, user, state) for case, (user, state) in cases.items()}
    clock.advance(30 * DAY)
    outcomes: dict[tuple[str, str], str] = {}
    for (state, name), (user, _) in cases.items():
        call, allowed, after = COMMANDS[name]
        sid = sids[state, name]
        if state in allowed:
            receipt = call(billing, sid, f"{user}:{name}")
            assert receipt.subscription_id == sid
            status = billing.subscription(sid).status
            assert status == (after or state), f"{name} from {state} left {status}"
            outcomes[state, name] = "ok"
        else:
            exc = refused(billing, user, sid, partial(call, billing, sid))
            assert isinstance(exc, InvalidTransition) and exc.status == state and exc.subscription_id == sid
            outcomes[state, name] = "refused"
    allowed_count = sum(len(allowed) for _, allowed, _ in COMMANDS.values())
    assert list(outcomes.values()).count("ok") == allowed_count


def test_unknown_subscription(billing: Ledger) -> None:
    with pytest.raises(UnknownSubscription):
        billing.pause_subscription(uuid4(), key="nobody")
    with pytest.raises(UnknownSubscription):
        billing.subscription(uuid4())


def test_activate_starts_the_first_paid_period(billing: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    sid = start(billing, user, "pro", trial_days=7)
    clock.advance(5 * DAY)
    receipt = billing.activate_subscription(sid, key=f"{user}:activate")
    paid_from = START + 5 * DAY
    s = billing.subscription(sid)
    assert (s.status, s.current_period_start, s.current_period_end) == ("active", paid_from, paid_from + 31 * DAY)
    assert receipt.amount_credits == 15000
    # The trial's credits keep their own expiry; the paid period's expire at its end.
    assert grants(billing, user) == [
        ("subscription_grant", 15000, START + 7 * DAY),
        ("subscription_grant", 15000, s.current_period_end),
    ]


def test_renew_too_early_then_within_the_window(billing: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    sid = start(billing, user)
    clock.set(FEB_1 - 3 * DAY - HOUR)
    exc = refused(billing, user, sid, lambda k: billing.renew_subscription(sid, key=k))
    assert "runs until" in str(exc)
    clock.advance(HOUR)  # exactly three days before the period ends
    receipt = billing.renew_subscription(sid, key=f"{user}:renew")
    s = billing.subscription(sid)
    assert (s.current_period_start, s.current_period_end, receipt.amount_credits) == (FEB_1, MAR_1, 5000)
    # Renewing twice, even under a new key, is refused: the next period is far off.
    refused(billing, user, sid, lambda k: billing.renew_subscription(sid, key=k))
    assert subscription_credits(billing, user) == 10000


def test_renew_from_past_due_recovers(billing: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    sid = start(billing, user)
    clock.set(FEB_1)
    billing.mark_past_due(sid, key=f"{user}:past-due")
    billing.renew_subscription(sid, key=f"{user}:renew")  # the retried payment went through
    s = billing.subscription(sid)
    assert (s.status, s.current_period_start, s.current_period_end) == ("active", FEB_1, MAR_1)
    assert grants(billing, user)[-1] == ("subscription_renew", 5000, MAR_1)


def test_change_plan_up_down_same_plan_same_tier(billing: Ledger) -> None:
    user = uuid4()
    sid = start(billing, user, "starter")
    up = billing.change_plan(sid, "studio", key=f"{user}:up", actor="admin:kim", reason="asked by phone")
    assert (billing.subscription(sid).plan, up.amount_credits) == ("studio", 25000)
    down = billing.change_plan(sid, "pro", key=f"{user}:down")
    assert (billing.subscription(sid).plan, down.amount_credits) == ("pro", 0)
    assert billing.balance(user).balance_credits == 30000  # a downgrade takes nothing back
    exc = refused(billing, user, sid, lambda k: billing.change_plan(sid, "pro", key=k))
    assert "already on pro" in str(exc)
    billing.define_plan(replace(TERMS["pro"], name="pro_plus", display_name="Pro+", credits=20000))
    exc = refused(billing, user, sid, lambda k: billing.change_plan(sid, "pro_plus", key=k))
    assert "same tier" in str(exc)
    refused(billing, user, sid, lambda k: billing.change_plan(sid, "platinum", key=k), UnknownPlan)


def test_cancel_at_period_end_then_resume(billing: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    sid = start(billing, user)
    clock.advance(DAY)
    billing.cancel_subscription(sid, key=f"{user}:cancel", reason="too expensive", actor="user")
    s = billing.subscription(sid)
    assert (s.status, s.cancelled_at, s.cancel_reason, s.cancel_at_period_end) == (
        "cancelled",
        START + DAY,
        "too expensive",
        True,
    )
    refused(billing, user, sid, lambda k: billing.cancel_subscription(sid, key=k))  # cancelled once
    billing.resume_subscription(sid, key=f"{user}:resume")
    s = billing.subscription(sid)
    assert (s.status, s.cancelled_at, s.cancel_reason, s.cancel_at_period_end) == ("active", None, None, False)
    assert s.current_period_end == FEB_1  # the period is unchanged


def test_resume_after_the_period_ended_is_refused(billing: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    sid = start(billing, user)
    billing.cancel_subscription(sid, key=f"{user}:cancel")
    clock.set(FEB_1)
    exc = refused(billing, user, sid, lambda k: billing.resume_subscription(sid, key=k))
    assert "period has ended" in str(exc)


def test_resume_after_an_immediate_cancel_is_refused(billing: Ledger) -> None:
    user = uuid4()
    sid = start(billing, user)
    billing.cancel_subscription(sid, key=f"{user}:cancel", at_period_end=False, reason="fraud")
    s = billing.subscription(sid)
    assert (s.status, s.cancel_reason, s.cancel_at_period_end) == ("expired", "fraud", False)
    refused(billing, user, sid, lambda k: billing.resume_subscription(sid, key=k))


def test_expire_a_cancelled_subscription_only_once_its_period_ended(billing: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    sid = start(billing, user)
    billing.cancel_subscription(sid, key=f"{user}:cancel")
    clock.set(FEB_1 - HOUR)
    exc = refused(billing, user, sid, lambda k: billing.expire_subscription(sid, key=k))
    assert "paid for until" in str(exc)
    clock.set(FEB_1)
    billing.expire_subscription(sid, key=f"{user}:expire")
    assert billing.subscription(sid).status == "expired" and billing.subscription_of(user) is None
    refused(billing, user, sid, lambda k: billing.expire_subscription(sid, key=k))


def test_pause_and_unpause(billing: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    sid = start(billing, user)
    billing.pause_subscription(sid, key=f"{user}:pause")
    refused(billing, user, sid, lambda k: billing.pause_subscription(sid, key=k))
    clock.advance(DAY)
    billing.unpause_subscription(sid, key=f"{user}:unpause")
    refused(billing, user, sid, lambda k: billing.unpause_subscription(sid, key=k))
    assert billing.subscription(sid).status == "active"


# ----------------------------------------------------------- credit policies


def test_upgrade_full_difference(open_ledger: Callable[..., Ledger], clock: ManualClock) -> None:
    ledger = open_ledger(upgrade="full")
    user = uuid4()
    sid = start(ledger, user, "starter")
    clock.advance(20 * DAY)
    assert ledger.change_plan(sid, "pro", key="up-1").amount_credits == 10000
    assert ledger.change_plan(sid, "studio", key="up-2").amount_credits == 15000
    assert grants(ledger, user) == [
        ("subscription_grant", 5000, FEB_1),
        ("subscription_grant", 10000, FEB_1),
        ("subscription_grant", 15000, FEB_1),
    ]
    assert ledger.change_plan(sid, "enterprise", key="up-3").amount_credits == 0  # fewer credits: nothing


def test_upgrade_prorated_rounds_down(open_ledger: Callable[..., Ledger], clock: ManualClock) -> None:
    ledger = open_ledger(upgrade="prorated")
    user = uuid4()
    sid = start(ledger, user, "starter")
    clock.advance(10 * DAY)
    # 21 of 31 days left: 10000 * 21 / 31 = 6774.19...
    assert ledger.change_plan(sid, "pro", key="up").amount_credits == 6774
    clock.advance(DAY + 7 * HOUR)
    # 19 days 17 hours of 31 days left: 15000 * 473 / 744 = 9536.29...
    assert ledger.change_plan(sid, "studio", key="up-2").amount_credits == 9536
    assert subscription_credits(ledger, user) == 5000 + 6774 + 9536


def test_upgrade_prorated_after_an_early_renewal_is_at_most_the_difference(
    open_ledger: Callable[..., Ledger], clock: ManualClock
) -> None:
    """Renewed within the window, the period in the subscription starts later
    than now: the share of it left is the whole of it, not more."""
    ledger = open_ledger(upgrade="prorated")
    user = uuid4()
    sid = start(ledger, user, "starter")
    clock.set(FEB_1 - 2 * DAY)
    ledger.renew_subscription(sid, key="renew-early")
    assert ledger.change_plan(sid, "pro", key="up").amount_credits == 10000


def test_upgrade_none(open_ledger: Callable[..., Ledger]) -> None:
    ledger = open_ledger(upgrade="none")
    user = uuid4()
    sid = start(ledger, user, "starter")
    receipt = ledger.change_plan(sid, "studio", key="up")
    assert (receipt.amount_credits, ledger.subscription(sid).plan) == (0, "studio")
    assert grants(ledger, user) == [("subscription_grant", 5000, FEB_1)]


def test_upgrade_again_in_the_same_period_grants_nothing_more(billing: Ledger) -> None:
    user = uuid4()
    sid = start(billing, user, "starter")
    assert billing.change_plan(sid, "pro", key="up-1").amount_credits == 10000
    billing.change_plan(sid, "starter", key="down")
    # The same business change (to pro, this period) under a new key: no second grant.
    assert billing.change_plan(sid, "pro", key="up-2").amount_credits == 0
    assert subscription_credits(billing, user) == 15000


def test_credits_expire_at_period_end(open_ledger: Callable[..., Ledger], clock: ManualClock) -> None:
    ledger = open_ledger(auto_renew=False)
    user = uuid4()
    start(ledger, user, "pro")
    ledger.grant(user, 100, "bonus", key="bonus")
    ledger.grant(user, 50, "purchase", key="purchase")
    ledger.spend(user, 1000, key="spend")  # soonest-expiring credits are spent first
    clock.set(FEB_1 - HOUR)
    assert ledger.balance(user).balance_credits == 14150
    clock.set(FEB_1)
    assert ledger.tick()["subscriptions"] == 0  # auto_renew off: nothing renews
    assert ledger.balance(user).balance_credits == 150  # bonus and purchase credits stay
    assert [e.data["amount"] for e in ledger.history(user) if e.type == "expired"] == [14000]


def test_expire_policy_renewal_replaces_the_lapsed_credits(billing: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    start(billing, user, "starter")
    billing.spend(user, 1200, key="spend")
    clock.set(FEB_1)
    assert billing.tick() == {"subscriptions": 1, "holds_and_lapses": 0}  # the lapse is recorded with the renewal
    assert billing.balance(user).balance_credits == 5000
    assert grants(billing, user)[-1] == ("subscription_renew", 5000, MAR_1)


def test_rollover_keeps_credits(open_ledger: Callable[..., Ledger], clock: ManualClock) -> None:
    ledger = open_ledger(expiry="rollover")
    user = uuid4()
    sid = start(ledger, user, "starter")
    ledger.change_plan(sid, "pro", key="up")
    clock.set(FEB_1)
    ledger.tick()
    assert ledger.balance(user).balance_credits == 5000 + 10000 + 15000
    assert all(expires is None for _, _, expires in grants(ledger, user))


def test_rollover_cap(open_ledger: Callable[..., Ledger], clock: ManualClock) -> None:
    ledger = open_ledger(expiry="rollover", rollover_cap_credits=8000)
    user = uuid4()
    ledger.grant(user, 10000, "bonus", key="bonus")  # not subscription credits: outside the cap
    start(ledger, user, "starter")  # unspent subscription credits 0: min(5000, 8000 - 0)
    clock.set(FEB_1)
    ledger.tick()  # min(5000, 8000 - 5000)
    clock.set(MAR_1)
    ledger.tick()  # min(5000, 8000 - 8000): nothing
    assert [amount for kind, amount, _ in grants(ledger, user) if kind in SUBSCRIPTION_KINDS] == [5000, 3000]
    ledger.spend(user, 15000, key="spend")  # oldest first: the bonus, then 5000 subscription credits
    clock.set(APR_1)
    ledger.tick()  # unspent subscription credits 3000: min(5000, 8000 - 3000)
    assert [amount for kind, amount, _ in grants(ledger, user) if kind in SUBSCRIPTION_KINDS] == [5000, 3000, 5000]
    assert ledger.balance(user).balance_credits == 8000


def test_policy_arguments_are_checked() -> None:
    for bad in ({"upgrade": "half"}, {"expiry": "never"}, {"rollover_cap_credits": -1}):
        with pytest.raises(InvalidArgument):
            CreditPolicy(**bad)


# ----------------------------------------------------------- tick


def test_tick_renews_once_and_again_next_period(billing: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    sid = start(billing, user)
    clock.set(FEB_1 + HOUR)
    assert billing.tick()["subscriptions"] == 1
    assert billing.tick()["subscriptions"] == 0  # nothing more is due
    assert billing.subscription(sid).current_period_end == MAR_1
    clock.set(MAR_1)
    assert billing.tick()["subscriptions"] == 1
    assert [k for k, _, _ in grants(billing, user)] == [
        "subscription_grant",
        "subscription_renew",
        "subscription_renew",
    ]


def test_tick_ends_trials_and_expires_cancelled(billing: Ledger, clock: ManualClock) -> None:
    trial_user, cancel_user, paused_user, past_due_user = uuid4(), uuid4(), uuid4(), uuid4()
    trial = start(billing, trial_user, "pro", trial_days=7)
    cancelled = start(billing, cancel_user)
    billing.cancel_subscription(cancelled, key="cancel")
    paused = start(billing, paused_user)
    billing.pause_subscription(paused, key="pause")
    past_due = start(billing, past_due_user)
    billing.mark_past_due(past_due, key="past-due")
    clock.set(START + 7 * DAY)
    assert billing.tick()["subscriptions"] == 1
    t = billing.subscription(trial)
    assert (t.status, t.current_period_start, t.current_period_end) == ("active", START + 7 * DAY, START + 38 * DAY)
    assert billing.tick()["subscriptions"] == 0  # start, tick, tick: the trial converts once
    assert subscription_credits(billing, trial_user) == 30000
    clock.set(FEB_1)
    assert billing.tick()["subscriptions"] == 1  # the cancellation falls due; paused and past due wait
    assert billing.subscription(cancelled).status == "expired"
    assert (billing.subscription(paused).status, billing.subscription(past_due).status) == ("paused", "past_due")


def test_tick_without_auto_renew_still_expires(open_ledger: Callable[..., Ledger], clock: ManualClock) -> None:
    ledger = open_ledger(auto_renew=False)
    active, trial, cancelled = uuid4(), uuid4(), uuid4()
    sids = [start(ledger, active), start(ledger, trial, trial_days=3), start(ledger, cancelled)]
    ledger.cancel_subscription(sids[2], key="cancel")
    clock.set(FEB_1)
    assert ledger.tick()["subscriptions"] == 1
    assert [ledger.subscription(s).status for s in sids] == ["active", "trialing", "expired"]


def test_tick_releases_stale_holds(billing: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    start(billing, user)
    billing.reserve(user, uuid4(), 100, START + HOUR, key="hold")
    clock.advance(2 * HOUR)
    assert billing.tick() == {"subscriptions": 0, "holds_and_lapses": 1}
    assert billing.balance(user).held_credits == 0


@pytest.mark.parametrize("expiry", ["expire", "rollover"])
def test_a_late_tick_renews_every_missed_period(
    open_ledger: Callable[..., Ledger], clock: ManualClock, expiry: str
) -> None:
    ledger = open_ledger(expiry=expiry)
    user = uuid4()
    sid = start(ledger, user)
    clock.set(datetime(2026, 3, 12, tzinfo=UTC))  # the scheduler was down for more than a period
    assert ledger.tick()["subscriptions"] == 2  # February's period, then March's
    s = ledger.subscription(sid)
    assert (s.status, s.current_period_start, s.current_period_end) == ("active", MAR_1, APR_1)
    if expiry == "expire":
        # February's credits would lapse unused, so none are granted for it.
        assert grants(ledger, user) == [("subscription_grant", 5000, FEB_1), ("subscription_renew", 5000, APR_1)]
        assert ledger.balance(user).balance_credits == 5000
    else:
        assert [amount for _, amount, _ in grants(ledger, user)] == [5000, 5000, 5000]  # every period's, kept
        assert ledger.balance(user).balance_credits == 15000


def test_a_tick_renews_at_most_24_periods_of_one_subscription(billing: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    sid = start(billing, user)
    clock.set(datetime(2028, 6, 15, tzinfo=UTC))  # 29 periods missed
    assert billing.tick()["subscriptions"] == 24
    assert billing.subscription(sid).current_period_end == datetime(2028, 2, 1, tzinfo=UTC)
    assert billing.tick()["subscriptions"] == 5
    assert billing.subscription(sid).current_period_end == datetime(2028, 7, 1, tzinfo=UTC)
    assert billing.tick()["subscriptions"] == 0
    assert subscription_credits(billing, user) == 10000  # the first period and the current one


def test_a_late_manual_renewal_grants_nothing_for_an_ended_period(billing: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    sid = start(billing, user)
    clock.set(datetime(2026, 3, 12, tzinfo=UTC))
    billing.mark_past_due(sid, key="past-due")
    assert billing.renew_subscription(sid, key="renew-feb").amount_credits == 0  # February has ended
    assert billing.renew_subscription(sid, key="renew-mar").amount_credits == 5000
    assert billing.subscription(sid).current_period_end == APR_1


def test_tick_acts_as_of_the_given_now(billing: Ledger) -> None:
    user = uuid4()
    renewing, cancelled = start(billing, user), start(billing, uuid4())
    billing.cancel_subscription(cancelled, key="cancel")
    assert billing.tick(FEB_1, allow_future=True)["subscriptions"] == 2
    assert billing.subscription(renewing).current_period_end == MAR_1
    assert billing.subscription(cancelled).status == "expired"


# ----------------------------------------------------------- entitlements


def test_no_subscription_is_the_free_tier(billing: Ledger) -> None:
    e = billing.entitlements(uuid4())
    assert (e.plan, e.tier_level, e.features, e.credits_per_period) == ("free", 0, {}, 0)
    assert (e.storage_bytes, e.queue_count, e.status, e.until, e.as_of) == (0, 1, "none", None, START)


def test_entitlements_follow_the_status(billing: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    sid = start(billing, user, "studio", trial_days=10)
    e = billing.entitlements(user)
    assert (e.plan, e.tier_level, e.status, e.until) == ("studio", 3, "trialing", START + 10 * DAY)
    assert (e.credits_per_period, e.storage_bytes, e.queue_count) == (30000, 200 * 1024**3, 3)
    assert e.features == {"sd_models": True, "flux_model": True, "nano_banana_api": True, "lora_training": True}
    billing.activate_subscription(sid, key="activate")
    assert (billing.entitlements(user).status, billing.entitlements(user).until) == ("active", START + 31 * DAY)
    billing.mark_past_due(sid, key="past-due")
    assert (billing.entitlements(user).plan, billing.entitlements(user).status) == ("studio", "past_due")
    billing.recover_subscription(sid, key="recover")
    billing.pause_subscription(sid, key="pause")
    paused = billing.entitlements(user)
    assert (paused.plan, paused.status, paused.until, paused.storage_bytes) == ("free", "paused", None, 0)
    billing.unpause_subscription(sid, key="unpause")
    billing.change_plan(sid, "starter", key="down")
    e = billing.entitlements(user)
    assert (e.plan, e.tier_level, e.features["flux_model"], e.storage_bytes) == ("starter", 1, False, 20 * 1024**3)


def test_cancelled_keeps_the_plan_until_period_end(billing: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    sid = start(billing, user, "pro")
    billing.cancel_subscription(sid, key="cancel")
    clock.set(FEB_1 - HOUR)
    e = billing.entitlements(user)
    assert (e.plan, e.status, e.until) == ("pro", "cancelled", FEB_1)
    clock.set(FEB_1)
    e = billing.entitlements(user)  # free at once, even before a tick records the expiry
    assert (e.plan, e.status, e.until) == ("free", "cancelled", None)
    billing.tick()
    e = billing.entitlements(user)
    assert (e.plan, e.status) == ("free", "none")


def test_entitlements_use_the_current_plan_terms(billing: Ledger) -> None:
    user = uuid4()
    start(billing, user, "pro")
    features = {**TERMS["pro"].features, "lora_training": Feature(True, {"max_models": 2})}
    billing.define_plan(replace(TERMS["pro"], storage_bytes=150 * 1024**3, features=features))
    e = billing.entitlements(user)
    assert (e.storage_bytes, e.features["lora_training"]) == (150 * 1024**3, True)


# ----------------------------------------------------------- known defects, to be fixed


def test_resume_restores_the_status_before_the_cancel(billing: Ledger) -> None:
    user = uuid4()
    sid = start(billing, user)
    billing.mark_past_due(sid, key="past-due")
    billing.cancel_subscription(sid, key="cancel")
    billing.resume_subscription(sid, key="resume")
    assert billing.subscription(sid).status == "past_due"  # the payment is still owed


def test_cancelling_a_paused_subscription_does_not_restore_the_plan(billing: Ledger) -> None:
    user = uuid4()
    sid = start(billing, user, "pro")
    billing.pause_subscription(sid, key="pause")
    assert billing.entitlements(user).plan == "free"
    billing.cancel_subscription(sid, key="cancel")
    assert billing.entitlements(user).plan == "free"


@pytest.mark.parametrize(("mode", "plan"), [("void", "free"), ("free", "pro")])
def test_a_free_pause_keeps_the_plan_and_a_void_pause_does_not(billing: Ledger, mode: str, plan: str) -> None:
    user = uuid4()
    sid = start(billing, user, "pro")
    before = billing.balance(user).balance_credits
    receipt = billing.pause_subscription(sid, key="pause", mode=mode)
    assert receipt.amount_credits == 0  # a pause moves no credits, whatever its mode
    e = billing.entitlements(user)
    assert (billing.subscription(sid).status, e.status, e.plan) == ("paused", "paused", plan)
    assert billing.balance(user).balance_credits == before
    billing.unpause_subscription(sid, key="unpause")
    assert billing.entitlements(user).plan == "pro"
    billing.pause_subscription(sid, key="pause-again")  # the default: void, whatever the pause before was
    assert billing.entitlements(user).plan == "free"


@pytest.mark.parametrize(("mode", "plan"), [("void", "free"), ("free", "pro")])
def test_cancelling_during_a_pause_keeps_the_plan_only_if_the_pause_was_free(
    billing: Ledger, clock: ManualClock, mode: str, plan: str
) -> None:
    user = uuid4()
    sid = start(billing, user, "pro")
    billing.pause_subscription(sid, key="pause", mode=mode)
    billing.cancel_subscription(sid, key="cancel")
    assert billing.entitlements(user).plan == plan  # the service a free pause kept runs to the period's end
    clock.set(FEB_1)
    assert billing.entitlements(user).plan == "free"


def test_an_unknown_pause_mode_is_refused_and_records_nothing(billing: Ledger) -> None:
    user = uuid4()
    sid = start(billing, user, "pro")
    error = refused(
        billing, user, sid, lambda k: billing.pause_subscription(sid, key=k, mode="gratis"), InvalidArgument
    )
    assert "pause mode must be void or free" in str(error)


def test_activation_at_the_start_instant_grants_the_paid_period(billing: Ledger) -> None:
    user = uuid4()
    sid = start(billing, user, "starter", trial_days=7)
    assert billing.activate_subscription(sid, key="activate").amount_credits == 5000


def test_activation_records_the_plan_revision(billing: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    sid = start(billing, user, "pro", trial_days=7)
    billing.define_plan(replace(TERMS["pro"], credits=16000))
    clock.advance(7 * DAY)
    assert billing.activate_subscription(sid, key="activate").amount_credits == 16000  # revision 2's terms
    assert billing.subscription(sid).plan_revision == 2


def test_receipts_of_subscription_commands_carry_the_balance(billing: Ledger) -> None:
    user = uuid4()
    sid = start(billing, user)
    receipt = billing.pause_subscription(sid, key="pause")
    assert (receipt.balance_credits, receipt.available_credits) == (5000, 5000)


def test_upgrading_a_past_due_subscription_is_not_an_invalid_amount(billing: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    sid = start(billing, user, "starter")
    clock.set(FEB_1 + HOUR)  # the renewal payment failed
    billing.mark_past_due(sid, key="past-due")
    try:
        billing.change_plan(sid, "pro", key="up")
    except InvalidTransition:
        return  # a clear refusal is acceptable
    assert billing.subscription(sid).plan == "pro"


# ----------------------------------------------------------- python -m ledger tick


def ledger_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledger", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_tick_from_the_command_line(tmp_path: Path) -> None:
    # The CLI runs on the system clock, so the story is set in the recent past.
    real_now = datetime.now(UTC).replace(microsecond=0)
    began = real_now - 40 * DAY
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    renewing, trial, cancelled, kept = uuid4(), uuid4(), uuid4(), uuid4()
    with Ledger(url, clock=ManualClock(began)) as ledger:
        ledger.install_default_catalog()
        sids = [
            start(ledger, renewing),
            start(ledger, trial, "pro", trial_days=7),
            start(ledger, cancelled),
            start(ledger, kept, "studio", billing_cycle="yearly"),
        ]
        ledger.cancel_subscription(sids[2], key="cancel")
        old_end = ledger.subscription(sids[0]).current_period_end
    result = ledger_cli("tick", "--url", url, "--now", real_now.isoformat())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("subscription changes: 3; hold releases and expirations: ")
    with Ledger(url) as ledger:
        after = [ledger.subscription(s) for s in sids]
        assert [s.status for s in after] == ["active", "active", "expired", "active"]
        assert after[0].current_period_start == old_end
        assert after[1].current_period_start >= real_now
        assert ledger.balance(renewing).balance_credits == 5000
    again = ledger_cli("tick", "--url", url, "--now", real_now.isoformat())
    assert again.stdout.startswith("subscription changes: 0;"), again.stdout + again.stderr


def test_tick_from_the_command_line_without_auto_renew(tmp_path: Path) -> None:
    real_now = datetime.now(UTC).replace(microsecond=0)
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    user = uuid4()
    with Ledger(url, clock=ManualClock(real_now - 40 * DAY)) as ledger:
        ledger.install_default_catalog()
        sid = start(ledger, user)
        end = ledger.subscription(sid).current_period_end
    result = ledger_cli("tick", "--url", url, "--no-auto-renew")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("subscription changes: 0; hold releases and expirations: 1")
    with Ledger(url) as ledger:
        assert ledger.subscription(sid).current_period_end == end
        assert ledger.balance(user).balance_credits == 0  # the period's credits lapsed


def test_a_tick_counts_only_the_renewals_it_recorded(billing: Ledger, clock: ManualClock) -> None:
    """A tick that read a subscription before another tick renewed it runs the
    same keyed renewal, which replays the other's receipt: that renewal is the
    other tick's, and this one reports none."""
    user = uuid4()
    sid = start(billing, user)
    stale = billing.read_aggregate(sid)  # as a concurrent tick read it, before the renewal
    clock.set(FEB_1 + HOUR)
    assert billing.tick()["subscriptions"] == 1
    assert billing._catch_up_subscription(stale, clock.now()) == 0
    assert [k for k, _, _ in grants(billing, user)] == ["subscription_grant", "subscription_renew"]


def test_concurrent_ticks_report_each_renewal_once(billing: Ledger, clock: ManualClock) -> None:
    import threading

    users = [uuid4() for _ in range(6)]
    for user in users:
        start(billing, user)
    clock.set(FEB_1 + HOUR)
    barrier, counts = threading.Barrier(3), []

    def tick() -> None:
        barrier.wait()
        counts.append(billing.tick()["subscriptions"])

    threads = [threading.Thread(target=tick) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(counts) == len(users)  # each renewal reported by the tick that recorded it
    assert all(len(grants(billing, user)) == 2 for user in users)
