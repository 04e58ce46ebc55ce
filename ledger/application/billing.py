"""Subscription and plan commands, and how each runs inside a unit of work.

Each command reads the subscription, makes its change through the
subscription's own method (which checks the state machine, TRANSITIONS in
ledger.domain.subscriptions, raising InvalidTransition, and triggers the
events), and posts the credit effect the policy promises (ledger.domain.policy)
on the user's account, all in the caller's one transaction. Credit
grants carry keys derived from the subscription and period, recorded like any
command key, so a change re-driven under another key never grants twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, ClassVar

from ledger.application.commands import ADDED, Command, UnitOfWork
from ledger.application.results import Receipt
from ledger.clock import require_utc
from ledger.domain.checks import (
    MAX_LABEL_LENGTH,
    MAX_TEXT_LENGTH,
    check_key,
    check_optional_text,
    check_text,
    check_user_id,
    check_uuid,
)
from ledger.domain.credits import CreditKind
from ledger.domain.plans import (
    MAX_PROVIDER_NAME,
    SEED_PROVIDER,
    Plan,
    PlanTerms,
    check_plan_name,
    check_terms,
    plan_id_for,
)
from ledger.domain.policy import (
    grant_expiry,
    rollover_allowance,
    rollover_cap,
    unspent_subscription_credits,
    upgrade_grant,
)
from ledger.domain.subscriptions import (
    PROVIDER_CHANGE_REASON,
    BillingCycle,
    PauseMode,
    ProviderIdClaim,
    ProviderSnapshot,
    ProviderState,
    Status,
    Subscription,
    SubscriptionExists,
    UnknownPlan,
    UnknownSubscription,
    add_cycle,
    pause_mode_of,
    provider_id_claim_id_for,
    provider_ids_fields,
    provider_states,
    subscription_id_for,
)
from ledger.domain.thresholds import plan_thresholds
from ledger.domain.usage import check_usage_terms
from ledger.errors import InvalidArgument, UnknownAccount

if TYPE_CHECKING:
    from uuid import UUID


MAX_TRIAL_DAYS = 365


def _subscription(unit: UnitOfWork, subscription_id: UUID) -> Subscription:
    s = unit.aggregate(subscription_id, Subscription)
    if s is None:
        raise UnknownSubscription(subscription_id)
    return s


def _plan(unit: UnitOfWork, name: str) -> Plan:
    plan = unit.aggregate(plan_id_for(name), Plan)
    if plan is None:
        raise UnknownPlan(name)
    return plan


def _period_credits(
    unit: UnitOfWork,
    subscription_id: UUID,
    user_id: UUID,
    terms: PlanTerms,
    kind: CreditKind,
    period_start: datetime,
    period_end: datetime,
    purpose: str,
) -> int:
    """Grants a period's credits by the policy; returns how many were granted."""
    amount = terms.credits
    expires_at = grant_expiry(unit.policy, period_end)
    cap = rollover_cap(unit.policy)
    if cap is not None:
        unspent = unspent_subscription_credits(unit.account(user_id, open_missing=True))
        amount = rollover_allowance(cap, unspent, amount)
    if expires_at is not None and expires_at <= unit.now:
        # A period recorded after it ended (a tick that ran late): its credits
        # would lapse unused, so none are granted.
        return 0
    key = f"subscription:{subscription_id}:{purpose}:{period_start.isoformat()}"
    granted = unit.grant_once(
        user_id,
        amount,
        kind,
        key=key,
        expires_at=expires_at,
        reference_type="subscription",
        reference_id=str(subscription_id),
        description=f"{terms.display_name} plan, {purpose}",
    )
    _adopt_plan_thresholds(unit, user_id, terms, granted, replace=True)
    return granted


def _adopt_plan_thresholds(unit: UnitOfWork, user_id: UUID, terms: PlanTerms, granted: int, *, replace: bool) -> None:
    """Gives the account the plan's default balance thresholds and the
    period's grant (``replace``) or adds ``granted`` to it (an upgrade within
    the period). An account that does not exist is not opened for it."""
    try:
        account = unit.account(user_id)
    except UnknownAccount:
        return
    grant = granted if replace else account.period_grant + granted
    try:
        defaults = plan_thresholds(terms.features)
    except InvalidArgument:
        # Terms recorded before check_terms knew the feature: a period's
        # grant never fails for it; the plan then gives no defaults.
        defaults = None
    account.adopt_plan_thresholds(plan=terms.name, thresholds=defaults, period_grant_credits=grant, now=unit.now)


def _claim_provider_id(unit: UnitOfWork, s: Subscription, param: str) -> None:
    """Records that the new subscription ``s`` is the one its provider's
    subscription id names; refuses an id another subscription holds."""
    if s.provider is None or s.provider_subscription_id is None:
        return
    claim_id = provider_id_claim_id_for(s.provider, s.provider_subscription_id)
    claim = unit.aggregate(claim_id, ProviderIdClaim)
    if claim is not None:
        if claim.subscription_id != s.id:
            raise InvalidArgument(
                f"{s.provider} subscription {s.provider_subscription_id!r} is already subscription "
                f"{claim.subscription_id}; a provider's subscription id names one subscription",
                param=param,
            )
        return
    unit.add(
        ProviderIdClaim._create(
            ProviderIdClaim.Claimed,
            id=claim_id,
            provider=s.provider,
            provider_subscription_id=s.provider_subscription_id,
            subscription_id=s.id,
            timestamp=unit.now,
        )
    )


def _done(unit: UnitOfWork, c: Command, s: Subscription, granted: int) -> Receipt:
    return unit.finish(c, s.user_id, amount=granted, subscription_id=s.id)


@dataclass(frozen=True)
class StartSubscription(Command):
    name: ClassVar[str] = "start_subscription"
    user_id: UUID = field(kw_only=True)
    plan: str = field(kw_only=True)
    billing_cycle: BillingCycle = field(default=BillingCycle.MONTHLY, kw_only=True)
    trial_days: int = field(default=0, kw_only=True)
    lemon_squeezy_subscription_id: str | None = field(default=None, kw_only=True)
    lemon_squeezy_customer_id: str | None = field(default=None, kw_only=True)
    actor: str | None = field(default=None, kw_only=True)
    #: The payment provider that bills the subscription and its ids there
    #: (``lemon_squeezy_*`` above are the compatibility names of Lemon
    #: Squeezy's); ids given with no provider named are Lemon Squeezy's.
    provider: str | None = field(default=None, kw_only=True, metadata=ADDED)
    provider_subscription_id: str | None = field(default=None, kw_only=True, metadata=ADDED)
    provider_customer_id: str | None = field(default=None, kw_only=True, metadata=ADDED)

    def __post_init__(self) -> None:
        self._normalise("key", check_key(self.key))
        self._normalise("user_id", check_user_id(self.user_id))
        self._normalise("plan", check_plan_name(self.plan))
        self._normalise("billing_cycle", _cycle(self.billing_cycle))
        if type(self.trial_days) is not int or not 0 <= self.trial_days <= MAX_TRIAL_DAYS:
            raise InvalidArgument(
                f"trial_days must be an int within 0..{MAX_TRIAL_DAYS}, got {self.trial_days!r}", param="trial_days"
            )
        for name in (
            "lemon_squeezy_subscription_id",
            "lemon_squeezy_customer_id",
            "provider_subscription_id",
            "provider_customer_id",
        ):
            self._normalise(name, check_optional_text(getattr(self, name), name, 100))
        if self.provider is not None:
            self._normalise("provider", check_text(self.provider, "provider", MAX_PROVIDER_NAME, required=True))
        if (self.lemon_squeezy_subscription_id, self.lemon_squeezy_customer_id) != (None, None) and (
            self.provider,
            self.provider_subscription_id,
            self.provider_customer_id,
        ) != (None, None, None):
            raise InvalidArgument(
                "give a provider's ids either as provider_* or as lemon_squeezy_*, not both", param="provider"
            )
        self._normalise("actor", check_optional_text(self.actor, "actor", MAX_LABEL_LENGTH))

    def apply(self, unit: UnitOfWork) -> Receipt:
        plan = _plan(unit, self.plan)
        terms = plan.terms
        if not terms.is_active:
            raise InvalidArgument(f"plan {self.plan!r} is not open for new subscriptions")
        slot = unit.slot(self.user_id)
        if slot.live is not None:
            raise SubscriptionExists(self.user_id, slot.live)
        now = unit.now
        trial_ends_at = now + timedelta(days=self.trial_days) if self.trial_days else None
        period_end = trial_ends_at or add_cycle(now, self.billing_cycle)
        subscription_id = subscription_id_for(self.key)
        granted = _period_credits(
            unit, subscription_id, self.user_id, terms, CreditKind.SUBSCRIPTION_GRANT, now, period_end, "period"
        )
        s = Subscription._create(
            Subscription.Started,
            id=subscription_id,
            user_id=self.user_id,
            plan=self.plan,
            plan_revision=plan.revision,
            billing_cycle=str(self.billing_cycle),
            status=str(Status.TRIALING if trial_ends_at else Status.ACTIVE),
            period_start=now,
            period_end=period_end,
            trial_ends_at=trial_ends_at,
            **self.provider_fields(),
            granted_credits=granted,
            actor=self.actor,
            timestamp=now,
        )
        given = "lemon_squeezy_subscription_id" if self.lemon_squeezy_subscription_id else "provider_subscription_id"
        _claim_provider_id(unit, s, given)
        unit.add(s)
        slot.trigger_event(slot.Taken, subscription_id=s.id, timestamp=now)
        return _done(unit, self, s, granted)

    def provider_fields(self) -> dict[str, str | None]:
        """The provider and its ids, from either spelling."""
        if (self.lemon_squeezy_subscription_id, self.lemon_squeezy_customer_id) != (None, None):
            return provider_ids_fields(None, self.lemon_squeezy_subscription_id, self.lemon_squeezy_customer_id)
        return provider_ids_fields(self.provider, self.provider_subscription_id, self.provider_customer_id)


@dataclass(frozen=True)
class _OnSubscription(Command):
    subscription_id: UUID = field(kw_only=True)

    def __post_init__(self) -> None:
        self._normalise("key", check_key(self.key))
        self._normalise("subscription_id", check_uuid(self.subscription_id, "subscription_id"))


@dataclass(frozen=True)
class ActivateSubscription(_OnSubscription):
    """A trial converts to its first paid period."""

    name: ClassVar[str] = "activate_subscription"

    def apply(self, unit: UnitOfWork) -> Receipt:
        s = _subscription(unit, self.subscription_id)
        s.check("activate", unit.now)
        start, end = s.activation_period(unit.now)
        plan = _plan(unit, s.plan)
        terms = plan.terms
        granted = _period_credits(unit, s.id, s.user_id, terms, CreditKind.SUBSCRIPTION_GRANT, start, end, "activation")
        s.activate(unit.now, plan_revision=plan.revision, granted_credits=granted)
        return _done(unit, self, s, granted)


@dataclass(frozen=True)
class RenewSubscription(_OnSubscription):
    name: ClassVar[str] = "renew_subscription"

    def apply(self, unit: UnitOfWork) -> Receipt:
        s = _subscription(unit, self.subscription_id)
        s.check("renew", unit.now)
        start, end = s.next_period()
        plan = _plan(unit, s.plan)
        granted = _period_credits(
            unit, s.id, s.user_id, plan.terms, CreditKind.SUBSCRIPTION_RENEW, start, end, "period"
        )
        s.renew(unit.now, plan_revision=plan.revision, granted_credits=granted)
        return _done(unit, self, s, granted)


@dataclass(frozen=True)
class ChangePlan(_OnSubscription):
    name: ClassVar[str] = "change_plan"
    plan: str = field(kw_only=True)
    actor: str | None = field(default=None, kw_only=True)
    reason: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._normalise("plan", check_plan_name(self.plan))
        self._normalise("actor", check_optional_text(self.actor, "actor", MAX_LABEL_LENGTH))
        self._normalise("reason", check_optional_text(self.reason, "reason", MAX_TEXT_LENGTH))

    def apply(self, unit: UnitOfWork) -> Receipt:
        s = _subscription(unit, self.subscription_id)
        s.check("change plan", unit.now)
        old, new = _plan(unit, s.plan), _plan(unit, self.plan)
        granted = 0
        if s.plan_change(unit.now, old.terms, new.terms):
            credits = (old.terms.credits, new.terms.credits)
            difference = upgrade_grant(unit.policy, *credits, s.period_start, s.period_end, unit.now)
            expires_at = grant_expiry(unit.policy, s.period_end)
            if expires_at is not None and expires_at <= unit.now:
                difference = 0  # the period is over: its credits would lapse at once
            key = f"subscription:{s.id}:upgrade:{self.plan}:{s.period_start.isoformat()}"
            granted = unit.grant_once(
                s.user_id,
                difference,
                CreditKind.SUBSCRIPTION_GRANT,
                key=key,
                expires_at=expires_at,
                reference_type="subscription",
                reference_id=str(s.id),
                description=f"upgrade to {new.terms.display_name}",
            )
        _adopt_plan_thresholds(unit, s.user_id, new.terms, granted, replace=False)
        s.change_plan(
            unit.now,
            old.terms,
            new.terms,
            to_revision=new.revision,
            granted_credits=granted,
            actor=self.actor,
            reason=self.reason,
        )
        return _done(unit, self, s, granted)


@dataclass(frozen=True)
class MarkPastDue(_OnSubscription):
    name: ClassVar[str] = "mark_past_due"

    def apply(self, unit: UnitOfWork) -> Receipt:
        s = _subscription(unit, self.subscription_id)
        s.mark_past_due(unit.now)
        return _done(unit, self, s, 0)


@dataclass(frozen=True)
class RecoverSubscription(_OnSubscription):
    name: ClassVar[str] = "recover_subscription"

    def apply(self, unit: UnitOfWork) -> Receipt:
        s = _subscription(unit, self.subscription_id)
        s.recover(unit.now)
        return _done(unit, self, s, 0)


@dataclass(frozen=True)
class PauseSubscription(_OnSubscription):
    """Pauses an active subscription. ``mode``: ``void`` (default), no
    service while paused, so the plan is not entitled; ``free``, the service
    continues without payment, so the plan stays entitled."""

    name: ClassVar[str] = "pause_subscription"
    mode: PauseMode = field(default=PauseMode.VOID, kw_only=True, metadata=ADDED)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "mode", pause_mode_of(self.mode))

    def apply(self, unit: UnitOfWork) -> Receipt:
        s = _subscription(unit, self.subscription_id)
        s.pause(unit.now, self.mode)
        return _done(unit, self, s, 0)


@dataclass(frozen=True)
class UnpauseSubscription(_OnSubscription):
    name: ClassVar[str] = "unpause_subscription"

    def apply(self, unit: UnitOfWork) -> Receipt:
        s = _subscription(unit, self.subscription_id)
        s.unpause(unit.now)
        return _done(unit, self, s, 0)


@dataclass(frozen=True)
class ResumeSubscription(_OnSubscription):
    """Undoes a cancellation at period end, before the period ends."""

    name: ClassVar[str] = "resume_subscription"

    def apply(self, unit: UnitOfWork) -> Receipt:
        s = _subscription(unit, self.subscription_id)
        s.resume(unit.now)
        return _done(unit, self, s, 0)


@dataclass(frozen=True)
class CancelSubscription(_OnSubscription):
    name: ClassVar[str] = "cancel_subscription"
    at_period_end: bool = field(default=True, kw_only=True)
    reason: str | None = field(default=None, kw_only=True)
    actor: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if type(self.at_period_end) is not bool:
            raise InvalidArgument(
                f"at_period_end must be a bool, not {type(self.at_period_end).__name__}", param="at_period_end"
            )
        self._normalise("reason", check_optional_text(self.reason, "reason", MAX_TEXT_LENGTH))
        self._normalise("actor", check_optional_text(self.actor, "actor", MAX_LABEL_LENGTH))

    def apply(self, unit: UnitOfWork) -> Receipt:
        s = _subscription(unit, self.subscription_id)
        s.cancel(unit.now, at_period_end=self.at_period_end, reason=self.reason, actor=self.actor)
        _free_slot(unit, s)
        return _done(unit, self, s, 0)


@dataclass(frozen=True)
class ExpireSubscription(_OnSubscription):
    name: ClassVar[str] = "expire_subscription"
    reason: str = field(default="period ended", kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._normalise("reason", check_text(self.reason, "reason", MAX_TEXT_LENGTH, required=True))

    def apply(self, unit: UnitOfWork) -> Receipt:
        s = _subscription(unit, self.subscription_id)
        s.expire(unit.now, self.reason)
        _free_slot(unit, s)
        return _done(unit, self, s, 0)


def _free_slot(unit: UnitOfWork, s: Subscription) -> None:
    """Frees the user's slot once the subscription has expired."""
    if s.live:
        return
    slot = unit.slot(s.user_id)
    if slot.live == s.id:
        slot.trigger_event(slot.Freed, subscription_id=s.id, timestamp=unit.now)


@dataclass(frozen=True)
class DefinePlan(Command):
    """Adds a plan to the catalog, or revises its terms (history kept)."""

    name: ClassVar[str] = "define_plan"
    #: Who defines the plan is recorded but is not part of what is defined.
    hints: ClassVar[frozenset[str]] = frozenset({"actor"})
    terms: PlanTerms = field(kw_only=True)
    actor: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        self._normalise("key", check_key(self.key))
        check_terms(self.terms)
        check_usage_terms(self.terms)
        self._normalise("actor", check_optional_text(self.actor, "actor", MAX_LABEL_LENGTH))

    def apply(self, unit: UnitOfWork) -> Receipt:
        data = self.terms.as_event_data()
        plan = unit.aggregate(plan_id_for(self.terms.name), Plan)
        if plan is None:
            plan = Plan._create(
                Plan.Defined, id=plan_id_for(self.terms.name), terms=data, actor=self.actor, timestamp=unit.now
            )
            unit.add(plan)
        elif plan.terms_data != data:
            plan.trigger_event(plan.Revised, terms=data, actor=self.actor, timestamp=unit.now)
        return unit.finish(self, None, amount=0)


@dataclass(frozen=True)
class SyncSubscription(Command):
    """Applies a payment provider's snapshot of a subscription as of
    ``source_updated_at``. The subscription becomes what all the snapshots
    recorded describe, in the provider's order (``provider_states``), so the
    order they arrive in does not matter: a newer snapshot is applied, an
    older one is recorded as superseded (it changes the state only if it
    changes what the snapshots describe, a late snapshot a past_due one takes
    its period from, say), and of two with the same ``source_updated_at`` the
    one that ranks higher (``snapshot_rank``) wins whichever came first.
    Creates the subscription on first sight, so an update that arrives
    before its create is applied, not dropped. Moves no credits: the
    provider's invoices do (see the Lemon Squeezy adapter)."""

    name: ClassVar[str] = "sync_subscription"
    subscription_id: UUID = field(kw_only=True)
    user_id: UUID = field(kw_only=True)
    plan: str = field(kw_only=True)
    billing_cycle: BillingCycle = field(kw_only=True)
    status: Status = field(kw_only=True)
    period_start: datetime = field(kw_only=True)
    period_end: datetime = field(kw_only=True)
    trial_ends_at: datetime | None = field(default=None, kw_only=True)
    cancel_at_period_end: bool = field(default=False, kw_only=True)
    source_updated_at: datetime = field(kw_only=True)
    external_id: str | None = field(default=None, kw_only=True)
    customer_id: str | None = field(default=None, kw_only=True)
    #: The provider whose snapshot this is, recorded with ``external_id`` and
    #: ``customer_id`` when the subscription is first seen.
    provider: str = field(default=SEED_PROVIDER, kw_only=True, metadata=ADDED)
    #: For status ``paused``: ``void`` (no service: not entitled) or ``free``
    #: (the service continues: the plan stays entitled).
    pause_mode: PauseMode = field(default=PauseMode.VOID, kw_only=True, metadata=ADDED)
    #: The provider reported only a status at ``source_updated_at`` (a failed
    #: payment's past_due): the plan and period given are the ledger's
    #: current ones. The state takes them from the provider's snapshot before
    #: it, and counts the status only if the subscription was active or
    #: trialing then.
    status_only: bool = field(default=False, kw_only=True, metadata=ADDED)
    #: The plan and status are the provider's, the period is not (a provider
    #: in dunning, whose period end is its next charge attempt): the period
    #: is the one of the snapshot before it; the one given is used only when
    #: there is none.
    period_kept: bool = field(default=False, kw_only=True, metadata=ADDED)
    #: This subscription replaces that one (the customer switched product
    #: through a new subscription): the old one, if it exists and is the same
    #: user's, ends at ``replaces_at`` in the same transaction, so the new one
    #: is not held behind it.
    replaces: UUID | None = field(default=None, kw_only=True, metadata=ADDED)
    replaces_at: datetime | None = field(default=None, kw_only=True, metadata=ADDED)
    #: This subscription was replaced by another at this time (the provider
    #: said so on the other): it ends then, whatever its own snapshots say
    #: after, and whichever of the two arrived first.
    replaced_at: datetime | None = field(default=None, kw_only=True, metadata=ADDED)

    def __post_init__(self) -> None:
        self._normalise("key", check_key(self.key))
        self._normalise("subscription_id", check_uuid(self.subscription_id, "subscription_id"))
        self._normalise("user_id", check_user_id(self.user_id))
        self._normalise("plan", check_plan_name(self.plan))
        self._normalise("billing_cycle", _cycle(self.billing_cycle))
        self._normalise("pause_mode", pause_mode_of(self.pause_mode))
        try:
            self._normalise("status", Status(self.status))
        except (ValueError, TypeError):
            raise InvalidArgument(f"unknown subscription status {self.status!r}", param="status") from None
        for name in ("period_start", "period_end", "source_updated_at"):
            self._normalise(name, require_utc(getattr(self, name), name))
        for name in ("trial_ends_at", "replaces_at", "replaced_at"):
            if getattr(self, name) is not None:
                self._normalise(name, require_utc(getattr(self, name), name))
        if self.period_end < self.period_start:
            raise InvalidArgument("period_end is before period_start", param="period_end")
        for name in ("status_only", "period_kept", "cancel_at_period_end"):
            if type(getattr(self, name)) is not bool:
                raise InvalidArgument(f"{name} must be a bool, not {type(getattr(self, name)).__name__}", param=name)
        if self.replaces is not None:
            self._normalise("replaces", check_uuid(self.replaces, "replaces"))
            if self.replaces == self.subscription_id:
                raise InvalidArgument("a subscription cannot replace itself", param="replaces")
            if self.replaces_at is None:
                raise InvalidArgument("replaces needs replaces_at, when the replacement happened", param="replaces_at")
        elif self.replaces_at is not None:
            raise InvalidArgument("replaces_at is given without replaces", param="replaces_at")
        self._normalise("external_id", check_optional_text(self.external_id, "external_id", 100))
        self._normalise("customer_id", check_optional_text(self.customer_id, "customer_id", 100))
        self._normalise("provider", check_text(self.provider, "provider", MAX_PROVIDER_NAME, required=True))

    def snapshot(self) -> ProviderSnapshot:
        """The provider's snapshot this command brings (its own content only)."""
        bare = self.status_only
        return ProviderSnapshot(
            at=self.source_updated_at,
            status=str(self.status),
            plan=None if bare else self.plan,
            period_start=None if bare else self.period_start,
            period_end=None if bare else self.period_end,
            trial_ends_at=None if bare else self.trial_ends_at,
            cancel_at_period_end=None if bare else self.cancel_at_period_end,
            pause_mode=str(self.pause_mode) if self.status == Status.PAUSED and not bare else None,
            period_kept=self.period_kept and not bare,
        )

    def apply(self, unit: UnitOfWork) -> Receipt:
        _plan(unit, self.plan)
        if self.replaces is not None:
            _end_replaced(unit, self.replaces, self.user_id, self.replaces_at or self.source_updated_at)
        seen = [self.snapshot()]
        if self.replaced_at is not None:
            seen.insert(0, _replacement_end(self.replaced_at))
        s = unit.aggregate(self.subscription_id, Subscription)
        if s is None:
            s = self._start(unit, seen)
        elif s.user_id != self.user_id:
            raise InvalidArgument(f"subscription {s.id} belongs to user {s.user_id}, not {self.user_id}")
        record_snapshots(unit, s, seen)
        return _done(unit, self, s, 0)

    def _start(self, unit: UnitOfWork, seen: list[ProviderSnapshot]) -> Subscription:
        states = provider_states(seen)
        if not states:
            # A bare status of a subscription never seen: there is nothing to change.
            raise UnknownSubscription(self.subscription_id)
        first = states[-1]
        plan = _plan(unit, first.plan)
        slot = unit.slot(self.user_id)
        if slot.live is not None and slot.live != self.subscription_id and first.status != Status.EXPIRED:
            raise SubscriptionExists(self.user_id, slot.live)
        s = Subscription._create(
            Subscription.Started,
            id=self.subscription_id,
            user_id=self.user_id,
            plan=first.plan,
            plan_revision=plan.revision,
            billing_cycle=str(self.billing_cycle),
            status=first.status,
            period_start=first.period_start or self.period_start,
            period_end=first.period_end or self.period_end,
            trial_ends_at=first.trial_ends_at,
            provider=self.provider,
            provider_subscription_id=self.external_id,
            provider_customer_id=self.customer_id,
            granted_credits=0,
            actor=None,
            timestamp=unit.now,
        )
        _claim_provider_id(unit, s, "external_id")
        unit.add(s)
        if first.status != Status.EXPIRED:
            slot.trigger_event(slot.Taken, subscription_id=s.id, timestamp=unit.now)
        return s


def _replacement_end(at: datetime) -> ProviderSnapshot:
    """The end of a subscription another one replaced, as a bare status."""
    return ProviderSnapshot(
        at=at,
        status=str(Status.EXPIRED),
        plan=None,
        period_start=None,
        period_end=None,
        trial_ends_at=None,
        cancel_at_period_end=None,
    )


def _end_replaced(unit: UnitOfWork, replaced_id: UUID, user_id: UUID, at: datetime) -> None:
    old = unit.aggregate(replaced_id, Subscription)
    if old is None or old.user_id != user_id:
        # Not seen yet (its own snapshots bring replaced_at), or another
        # user's: a subscription never ends one it does not own.
        return
    record_snapshots(unit, old, [_replacement_end(at)])


def record_snapshots(unit: UnitOfWork, s: Subscription, seen: list[ProviderSnapshot]) -> None:
    """Records provider snapshots on a subscription and moves it to the state
    they all describe: each new snapshot is Synced if it is the one the state
    now comes from, else Superseded; if the state changed anyway (a late
    snapshot changed what the ones seen describe), a restated Synced. A
    snapshot already recorded, or beaten by one of the same second, records
    nothing."""
    old = list(s.provider_snapshots)
    known = {x.position for x in old}
    best = {x.at: x.rank for x in old}
    new = [x for x in seen if x.position not in known and x.rank >= best.get(x.at, x.rank)]
    if not new:
        return
    before = provider_states(old)
    after = provider_states([*old, *new])
    state = after[-1] if after else None
    was_live = s.live
    applied = None
    for snapshot in sorted(new, key=lambda x: x.position):
        if state is not None and snapshot == state.source:
            applied = snapshot
        else:
            _superseded(unit, s, snapshot)
    changed = state is not None and (not before or before[-1].values() != state.values())
    if state is not None and (applied is not None or changed or s.source_updated_at is None):
        _synced(unit, s, state, restated=applied is None)
    slot = unit.slot(s.user_id)
    if was_live and not s.live and slot.live == s.id:
        slot.trigger_event(slot.Freed, subscription_id=s.id, timestamp=unit.now)
    elif s.live and slot.live is None:
        slot.trigger_event(slot.Taken, subscription_id=s.id, timestamp=unit.now)


def _superseded(unit: UnitOfWork, s: Subscription, snapshot: ProviderSnapshot) -> None:
    bare = snapshot.plan is None
    s.trigger_event(
        s.Superseded,
        plan=snapshot.plan or s.plan,
        status=snapshot.status,
        period_start=snapshot.period_start or s.period_start,
        period_end=snapshot.period_end or s.period_end,
        trial_ends_at=snapshot.trial_ends_at,
        cancel_at_period_end=bool(snapshot.cancel_at_period_end),
        source_updated_at=snapshot.at,
        status_only=bare,
        period_kept=snapshot.period_kept,
        pause_mode=snapshot.pause_mode,
        timestamp=unit.now,
    )


def _synced(unit: UnitOfWork, s: Subscription, state: ProviderState, *, restated: bool) -> None:
    if s.plan != state.plan:
        plan, old = _plan(unit, state.plan), _plan(unit, s.plan)
        upgraded = plan.terms.tier_level > old.terms.tier_level
        s.trigger_event(
            s.PlanChanged,
            from_plan=s.plan,
            to_plan=state.plan,
            to_revision=plan.revision,
            change="upgraded" if upgraded else "downgraded",
            granted_credits=0,
            actor=None,
            reason=PROVIDER_CHANGE_REASON,
            timestamp=unit.now,
        )
        _adopt_plan_thresholds(unit, s.user_id, plan.terms, 0, replace=False)
    source = state.source
    s.trigger_event(
        s.Synced,
        status=state.status,
        period_start=state.period_start or s.period_start,
        period_end=state.period_end or s.period_end,
        trial_ends_at=state.trial_ends_at,
        cancel_at_period_end=state.cancel_at_period_end,
        source_updated_at=source.at,
        pause_mode=state.pause_mode,
        status_only=source.plan is None,
        period_kept=source.period_kept,
        restated=restated,
        provider_times=True,
        cancelled_at=state.cancelled_at,
        cancel_reason=state.cancel_reason,
        paused_at=state.paused_at,
        ended_at=state.ended_at,
        timestamp=unit.now,
    )


def _cycle(value: object) -> BillingCycle:
    try:
        if isinstance(value, str):
            return BillingCycle(value)
    except ValueError:
        pass
    raise InvalidArgument(f"billing_cycle must be monthly or yearly, got {value!r}", param="billing_cycle")


def due_changes(s: Subscription, now: datetime, *, auto_renew: bool) -> list[Command]:
    """What ``tick`` owes a subscription at ``now``, as keyed commands."""
    require_utc(now, "now")
    if s.source_updated_at is not None:
        # A payment provider drives it: its snapshots renew, expire and end
        # it, and a cancelled one's plan already lapses at period end.
        return []
    stamp = s.period_end.isoformat()
    if s.status == Status.TRIALING and s.trial_ends_at and s.trial_ends_at <= now and auto_renew:
        return [ActivateSubscription(key=f"tick:{s.id}:activate:{stamp}", subscription_id=s.id)]
    if s.status == Status.ACTIVE and s.period_end <= now and auto_renew:
        return [RenewSubscription(key=f"tick:{s.id}:renew:{stamp}", subscription_id=s.id)]
    if s.status == Status.CANCELLED and s.period_end <= now:
        return [ExpireSubscription(key=f"tick:{s.id}:expire:{stamp}", subscription_id=s.id)]
    return []
