"""The subscription state machine as its aggregate's methods, without a store,
and the credit policy's rules that the core and a payment provider share."""

from __future__ import annotations

import inspect
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest

import ledger.extension
from adapters.lemonsqueezy import _effects
from ledger import DEFAULT_CATALOG, CreditPolicy, InvalidTransition
from ledger.domain import policy
from ledger.domain.subscriptions import (
    CANCELLED_NOW_REASON,
    TRANSITIONS,
    PauseMode,
    Status,
    Subscription,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
TERMS = {terms.name: terms for terms in DEFAULT_CATALOG}

#: The lifecycle of docs/subscriptions.md, written out: change -> (allowed from, leaves).
SPEC = {
    "activate": ({"trialing"}, "active"),
    "renew": ({"active", "past_due"}, "active"),
    "change plan": ({"trialing", "active", "past_due"}, None),
    "mark past due": ({"active"}, "past_due"),
    "recover": ({"past_due"}, "active"),
    "pause": ({"active"}, "paused"),
    "unpause": ({"paused"}, "active"),
    "cancel": ({"trialing", "active", "past_due", "paused"}, "cancelled"),
    "resume": ({"cancelled"}, None),
    "expire": ({"trialing", "active", "past_due", "paused", "cancelled"}, "expired"),
}


def subscription(status: str = "active", *, plan: str = "starter") -> Subscription:
    return Subscription._create(
        Subscription.Started,
        id=uuid4(),
        user_id=uuid4(),
        plan=plan,
        plan_revision=1,
        billing_cycle="monthly",
        status=status,
        period_start=T0,
        period_end=T0 + 31 * DAY,
        trial_ends_at=T0 + 31 * DAY if status == "trialing" else None,
        lemon_squeezy_subscription_id=None,
        lemon_squeezy_customer_id=None,
        granted_credits=0,
        actor=None,
        timestamp=T0,
    )


def test_the_table_is_the_documented_lifecycle() -> None:
    table = {name: ({str(s) for s in t.allowed}, t.to and str(t.to)) for name, t in TRANSITIONS.items()}
    assert table == SPEC


def make(s: Subscription, change: str, now: datetime) -> None:
    """Makes ``change`` through the aggregate's method for it."""
    if change == "activate":
        s.activate(now, plan_revision=1, granted_credits=0)
    elif change == "renew":
        s.renew(now, plan_revision=1, granted_credits=0)
    elif change == "change plan":
        s.change_plan(now, TERMS[s.plan], TERMS["pro"], to_revision=1, granted_credits=0, actor=None, reason=None)
    elif change == "cancel":
        s.cancel(now, at_period_end=True, reason=None, actor=None)
    elif change == "expire":
        s.expire(now, "period ended")
    else:
        getattr(s, change.replace(" ", "_"))(now)


@pytest.mark.parametrize("change", sorted(SPEC))
@pytest.mark.parametrize("status", [str(s) for s in Status])
def test_every_method_from_every_status(change: str, status: str) -> None:
    s = subscription(status)
    if status == "cancelled":
        s.cancel_at_period_end, s.status_before_cancel = True, "active"
    # Inside the renewal window, before the period ends; a cancelled one expires once it has ended.
    now = s.period_end if (status, change) == ("cancelled", "expire") else T0 + 30 * DAY
    allowed, leaves = SPEC[change]
    version = s.version
    if status not in allowed:
        with pytest.raises(InvalidTransition) as refused:
            make(s, change, now)
        allowed_from = ", ".join(str(x) for x in TRANSITIONS[change].allowed)
        assert str(refused.value).endswith(f"is {status}; cannot {change}: allowed from {allowed_from}")
        assert s.version == version and s.status == status
        return
    make(s, change, now)
    assert s.status == (leaves or ("active" if change == "resume" else status))
    assert s.version == version + 1


def test_time_rules() -> None:
    s = subscription("active")
    with pytest.raises(InvalidTransition, match="cannot renew: the period runs until 2026-02-01T00:00:00"):
        s.renew(T0 + 27 * DAY, plan_revision=1, granted_credits=0)
    s.renew(T0 + 28 * DAY, plan_revision=1, granted_credits=0)  # within RENEWAL_WINDOW of the end
    assert (s.period_start, s.period_end) == (T0 + 31 * DAY, T0 + 59 * DAY)
    s.cancel(T0 + 40 * DAY, at_period_end=True, reason="moving", actor=None)
    with pytest.raises(InvalidTransition, match="cannot expire: it stays paid for until"):
        s.expire(T0 + 40 * DAY, "period ended")
    with pytest.raises(InvalidTransition, match="cannot resume: the period has ended"):
        s.resume(T0 + 59 * DAY)
    s.resume(T0 + 58 * DAY)
    assert s.status == "active" and s.cancelled_at is None


def test_cancel_now_expires_at_once_and_cannot_be_resumed() -> None:
    s = subscription("past_due")
    s.cancel(T0 + DAY, at_period_end=False, reason=None, actor="support")
    events = s.collect_events()
    assert [type(e).__name__ for e in events[-2:]] == ["Cancelled", "Expired"]
    assert events[-1].reason == CANCELLED_NOW_REASON and not s.live  # type: ignore[attr-defined]


def test_resume_returns_to_the_status_before_the_cancel() -> None:
    s = subscription("active")
    s.pause(T0 + DAY, PauseMode.FREE)
    assert (s.status, s.pause_mode, s.paused_at) == ("paused", "free", T0 + DAY)
    s.cancel(T0 + 2 * DAY, at_period_end=True, reason=None, actor=None)
    s.resume(T0 + 3 * DAY)
    assert s.status == "paused"


def test_plan_change_rules() -> None:
    s = subscription("trialing", plan="pro")
    with pytest.raises(InvalidTransition, match="cannot change plan: already on pro"):
        s.plan_change(T0, TERMS["pro"], TERMS["pro"])
    assert s.plan_change(T0, TERMS["pro"], TERMS["starter"]) is False
    s.change_plan(T0, TERMS["pro"], TERMS["starter"], to_revision=3, granted_credits=0, actor="a", reason="b")
    assert (s.plan, s.plan_revision, s.status) == ("starter", 3, "trialing")


# -- the credit policy --------------------------------------------------------------


def test_rollover_allowance() -> None:
    assert policy.rollover_allowance(None, 10_000, 500) == 500
    assert policy.rollover_allowance(1_000, 0, 500) == 500
    assert policy.rollover_allowance(1_000, 700, 500) == 300
    assert policy.rollover_allowance(1_000, 1_200, 500) == 0
    assert policy.rollover_cap(CreditPolicy(rollover_cap_credits=5)) is None  # expire: no cap applies
    assert policy.rollover_cap(CreditPolicy(expiry="rollover", rollover_cap_credits=5)) == 5
    assert policy.rollover_cap(CreditPolicy(expiry="rollover")) is None


def test_grant_expiry() -> None:
    assert policy.grant_expiry(CreditPolicy(), T0) == T0
    assert policy.grant_expiry(CreditPolicy(expiry="rollover"), T0) is None


@pytest.mark.parametrize(("upgrade", "granted"), [("full", 900), ("prorated", 450), ("none", 0)])
def test_upgrade_grant(upgrade: str, granted: int) -> None:
    rule = CreditPolicy(upgrade=upgrade)  # type: ignore[arg-type]
    assert policy.upgrade_grant(rule, 100, 1_000, T0, T0 + 30 * DAY, T0 + 15 * DAY) == granted
    assert policy.upgrade_grant(rule, 1_000, 100, T0, T0 + 30 * DAY, T0 + 15 * DAY) == 0  # never below 0


def test_prorated_rounds_down_and_never_goes_negative() -> None:
    assert policy.prorated(100, T0 + 10 * DAY, T0, T0 + 30 * DAY) == 66
    assert policy.prorated(100, T0 + 31 * DAY, T0, T0 + 30 * DAY) == 0
    assert policy.prorated(100, T0, T0, T0) == 0
    assert policy.prorated(100, T0 - DAY, T0, T0 + 30 * DAY) == 100  # before the period starts: all of it


def test_prorated_is_exact_to_the_microsecond() -> None:
    """Whole microseconds, not float seconds: a share that comes out whole is
    granted whole, and a year of MAX_CREDITS is not rounded by a float."""
    month = 31 * DAY
    left = timedelta(seconds=1_114_214, microseconds=400_000)  # 0.416 of the month: 10400 of 25000
    assert policy.prorated(25_000, T0 + month - left, T0, T0 + month) == 10_400
    year = 365 * DAY
    now = T0 + timedelta(seconds=1)
    seconds = int(year.total_seconds())
    assert policy.prorated(2_000_000_000, now, T0, T0 + year) == 2_000_000_000 * (seconds - 1) // seconds


def test_core_and_provider_share_one_policy() -> None:
    """The provider reaches the rules through ledger.extension, and keeps no copy of its own."""
    for name in ("grant_expiry", "rollover_cap", "rollover_allowance", "unspent_subscription_credits"):
        assert getattr(ledger.extension, name) is getattr(policy, name) is getattr(_effects, name)
    assert ledger.extension.upgrade_grant is policy.upgrade_grant is _effects.upgrade_grant
    source = inspect.getsource(_effects)
    assert "policy.upgrade ==" not in source and "policy.expiry" not in source and "rollover_cap_credits" not in source
