"""The credit policy: how subscription changes move credits.

``CreditPolicy`` is the host's choice; the functions here are what it means,
pure and in one place, so that every path that grants subscription credits
(the core's subscription commands, a payment provider's invoices) grants the
same: the rollover cap on a period's grant, when a grant expires, and what an
upgrade grants. A payment provider reaches them through ``ledger.extension``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from ledger.domain.credits import CreditAccount, CreditKind
from ledger.errors import InvalidArgument

_MICROSECOND = timedelta(microseconds=1)

#: The kinds of credit a subscription grants: what the rollover cap counts.
SUBSCRIPTION_KINDS = frozenset({CreditKind.SUBSCRIPTION_GRANT.value, CreditKind.SUBSCRIPTION_RENEW.value})


@dataclass(frozen=True)
class CreditPolicy:
    """How subscription changes move credits.

    ``upgrade``: what an upgrade mid-period grants: the ``full`` difference in
    credits between the plans, the difference ``prorated`` by the days left, or
    ``none``. ``expiry``: subscription credits ``expire`` at the end of their
    period, or ``rollover``; with ``rollover_cap_credits`` a renewal grants only
    up to the cap of unspent subscription credits.
    """

    upgrade: Literal["full", "prorated", "none"] = "full"
    expiry: Literal["expire", "rollover"] = "expire"
    rollover_cap_credits: int | None = None
    #: Whether ``tick`` renews active subscriptions at their period end (a
    #: payment provider's webhooks renew them otherwise).
    auto_renew: bool = True

    def __post_init__(self) -> None:
        if self.upgrade not in ("full", "prorated", "none"):
            raise InvalidArgument(f"upgrade policy must be full, prorated or none, got {self.upgrade!r}")
        if self.expiry not in ("expire", "rollover"):
            raise InvalidArgument(f"expiry policy must be expire or rollover, got {self.expiry!r}")
        cap = self.rollover_cap_credits
        if cap is not None and (type(cap) is not int or cap < 0):
            raise InvalidArgument(f"rollover_cap_credits must be an int >= 0, got {cap!r}")


def grant_expiry(policy: CreditPolicy, period_end: datetime) -> datetime | None:
    """When the credits granted for a period ending at ``period_end`` expire:
    at its end, or never with rollover."""
    return None if policy.expiry == "rollover" else period_end


def rollover_cap(policy: CreditPolicy) -> int | None:
    """The cap on unspent subscription credits that a period's grant tops up
    to, if the policy has one (rollover with ``rollover_cap_credits``)."""
    return policy.rollover_cap_credits if policy.expiry == "rollover" else None


def unspent_subscription_credits(account: CreditAccount) -> int:
    """What the rollover cap counts: the user's unspent subscription credits
    (granted by a subscription or its renewals, still remaining)."""
    return sum(b.remaining for b in account.blocks.values() if b.kind in SUBSCRIPTION_KINDS)


def rollover_allowance(cap: int | None, unspent: int, amount: int) -> int:
    """What a period's grant of ``amount`` credits may be: all of it without a
    cap, else at most what tops ``unspent`` up to ``cap`` (never below 0)."""
    if cap is None:
        return amount
    return min(amount, max(0, cap - unspent))


def prorated(credits: int, now: datetime, period_start: datetime, period_end: datetime) -> int:
    """``credits`` scaled by the share of the period left, rounded down: never more than promised."""
    # Whole microseconds, not float seconds: a float share rounds an exact
    # result such as 10400 down to 10399, and a year's seconds times
    # MAX_CREDITS is past a float's 53 bits.
    total = (period_end - period_start) // _MICROSECOND
    # At most the whole period: a renewal recorded ahead of the period's end
    # starts the next period later than now.
    left = min(total, max(0, (period_end - now) // _MICROSECOND))
    return credits * left // total if total > 0 else 0


def upgrade_grant(
    policy: CreditPolicy,
    old_credits: int,
    new_credits: int,
    period_start: datetime,
    period_end: datetime,
    now: datetime,
) -> int:
    """What an upgrade at ``now``, within the period ``period_start`` ..
    ``period_end``, grants from a plan of ``old_credits`` a period to one of
    ``new_credits``: the ``full`` difference (never below 0), that difference
    ``prorated`` by the share of the period left, or ``none``. The rollover
    cap does not apply."""
    difference = max(0, new_credits - old_credits)
    if policy.upgrade == "prorated":
        return prorated(difference, now, period_start, period_end)
    if policy.upgrade == "none":
        return 0
    return difference
