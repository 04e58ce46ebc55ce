"""The host's balance thresholds: the command that sets them and the query
that reads them back. The crossing rule is the account's
(``ledger.domain.thresholds``, ``CreditAccount.cross_thresholds``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from ledger.application.commands import Command, UnitOfWork
from ledger.application.results import Receipt
from ledger.domain.checks import MAX_LABEL_LENGTH, check_key, check_optional_text, check_user_id
from ledger.domain.credits import CreditAccount
from ledger.domain.plans import Plan, PlanTerms, plan_id_for
from ledger.domain.subscriptions import SubscriberSlot, Subscription, slot_id_for
from ledger.domain.thresholds import DEPLETED, Threshold, check_thresholds, levels, plan_thresholds
from ledger.errors import InvalidArgument


@dataclass(frozen=True)
class SetBalanceThresholds(Command):
    """Sets an account's low-balance thresholds (``None``: use the plan's
    defaults again). Opens the account when the user has none yet."""

    name: ClassVar[str] = "set_balance_thresholds"
    user_id: UUID = field(kw_only=True)
    thresholds: tuple[Threshold, ...] | None = field(kw_only=True)
    actor: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        self._normalise("key", check_key(self.key))
        self._normalise("user_id", check_user_id(self.user_id))
        if self.thresholds is not None:
            self._normalise("thresholds", check_thresholds(self.thresholds))
        self._normalise("actor", check_optional_text(self.actor, "actor", MAX_LABEL_LENGTH))

    def apply(self, unit: UnitOfWork) -> Receipt:
        account = unit.account(self.user_id, open_missing=True)
        account.set_balance_thresholds(self.thresholds, actor=self.actor, key=self.key, now=unit.now)
        terms = _live_terms(unit, self.user_id)
        if terms is not None:
            # The plan's defaults and the period's grant, until the next period's grant records them.
            try:
                defaults = plan_thresholds(terms.features)
            except InvalidArgument:  # terms recorded before check_terms knew the feature
                defaults = None
            account.adopt_plan_thresholds(
                plan=terms.name,
                thresholds=defaults,
                period_grant_credits=account.period_grant or terms.credits,
                now=unit.now,
            )
        return unit.done(self, account, amount=0)


def _live_terms(unit: UnitOfWork, user_id: UUID) -> PlanTerms | None:
    """The terms of the user's live subscription's plan, or None."""
    slot = unit.aggregate(slot_id_for(user_id), SubscriberSlot)
    if slot is None or slot.live is None:
        return None
    subscription = unit.aggregate(slot.live, Subscription)
    if subscription is None:
        return None
    plan = unit.aggregate(plan_id_for(subscription.plan), Plan)
    return None if plan is None else plan.terms


class ThresholdState(BaseModel):
    """One threshold of an account, as it stands."""

    model_config = ConfigDict(frozen=True)

    #: ``credits:500``, ``percent:10`` or ``depleted``.
    threshold: str
    #: The available credits at or below which it fires.
    level_credits: int
    #: Whether it fired and has not re-armed yet.
    fired: bool


class BalanceThresholds(BaseModel):
    """An account's thresholds in force and where they come from."""

    model_config = ConfigDict(frozen=True)

    user_id: UUID
    #: ``host`` (set_balance_thresholds), ``plan`` (the plan's defaults) or
    #: ``none`` (not watched: no crossings are recorded).
    source: str
    thresholds: list[dict[str, int]]
    #: The credits granted for the current period: the base of percentages.
    period_grant_credits: int
    available_credits: int
    #: Every active threshold and depletion, highest level first.
    states: list[ThresholdState]


def thresholds_of(account: CreditAccount) -> BalanceThresholds:
    in_force = account.thresholds()
    fired = set(account.fired)
    states = [
        ThresholdState(threshold=i, level_credits=level, fired=i in fired)
        for i, _, level in (levels(in_force, account.period_grant) if account.watched() else [])
    ]
    return BalanceThresholds(
        user_id=account.user_id,
        source="host"
        if account.host_thresholds is not None
        else "plan"
        if account.plan_thresholds is not None
        else "none",
        thresholds=[t.as_data() for t in in_force],
        period_grant_credits=account.period_grant,
        available_credits=account.available,
        states=states,
    )


def parse_thresholds(values: Iterable[Any] | None) -> tuple[Threshold, ...] | None:
    """Thresholds from data (``{"credits": 500}``, ``{"percent": 10}``) or Thresholds."""
    return None if values is None else check_thresholds(values)


__all__ = [
    "DEPLETED",
    "BalanceThresholds",
    "SetBalanceThresholds",
    "ThresholdState",
    "parse_thresholds",
    "thresholds_of",
]
