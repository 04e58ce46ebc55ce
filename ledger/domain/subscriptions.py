"""Subscriptions: their lifecycle, and the credits each change moves.

``Subscription`` is a strict state machine; ``SubscriberSlot`` (one per user)
holds the id of the user's live subscription, so two subscriptions cannot be
live at once even under concurrent starts (both would write the slot; one save
clashes). A command's credit effect is posted on the user's CreditAccount in
the same transaction as the subscription's own events.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate
from eventsourcing.domain import Snapshot as BaseSnapshot

from ledger.domain.credits import TOPIC_PREFIX
from ledger.errors import InvalidArgument, LedgerError

SUBSCRIPTION_NS = UUID("5b0f7f4e-8d0c-4c7e-9a53-0c2f1f6a7b11")
SLOT_NS = UUID("5b0f7f4e-8d0c-4c7e-9a53-0c2f1f6a7b12")

#: How early before its period ends a subscription may be renewed.
RENEWAL_WINDOW = timedelta(days=3)


class InvalidTransition(LedgerError):
    """The subscription cannot make this change from its current state."""

    code = "invalid_transition"

    def __init__(self, subscription_id: UUID, status: str, change: str, why: str = "") -> None:
        self.subscription_id = subscription_id
        self.status = status
        self.change = change
        detail = f": {why}" if why else ""
        super().__init__(f"subscription {subscription_id} is {status}; cannot {change}{detail}")


class SubscriptionExists(LedgerError):
    """The user already has a live subscription."""

    code = "subscription_exists"

    def __init__(self, user_id: UUID, subscription_id: UUID) -> None:
        self.user_id = user_id
        self.subscription_id = subscription_id
        super().__init__(f"user {user_id} already has live subscription {subscription_id}")


class UnknownSubscription(LedgerError, LookupError):
    """No subscription has this id."""

    code = "unknown_subscription"
    param = "subscription_id"

    def __init__(self, subscription_id: UUID) -> None:
        self.subscription_id = subscription_id
        super().__init__(f"no subscription {subscription_id}")


class UnknownPlan(LedgerError, LookupError):
    """No plan of this name is in the catalog."""

    code = "unknown_plan"
    param = "plan"

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no plan named {name!r} in the catalog")


class BillingCycle(StrEnum):
    MONTHLY = "monthly"
    YEARLY = "yearly"


#: The reason of the plan changes a payment provider's snapshot brings
#: (SyncSubscription); the history writes those from the provider's timeline.
PROVIDER_CHANGE_REASON = "changed at the payment provider"


class Status(StrEnum):
    TRIALING = "trialing"
    ACTIVE = "active"
    PAST_DUE = "past_due"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class PauseMode(StrEnum):
    """What a pause does to the plan: ``void``, no service while paused (the
    plan is not entitled); ``free``, the service continues without payment
    (the plan stays entitled). No credits are granted in either."""

    VOID = "void"
    FREE = "free"


def pause_mode_of(value: object) -> PauseMode:
    try:
        if isinstance(value, str):
            return PauseMode(value)
    except ValueError:
        pass
    raise InvalidArgument(f"pause mode must be void or free, got {value!r}", param="mode")


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


def add_cycle(start: datetime, cycle: BillingCycle) -> datetime:
    """The end of a period starting at ``start``: same day next month (or the
    month's last day), or the same day next year."""
    months = 1 if cycle == BillingCycle.MONTHLY else 12
    month_index = start.month - 1 + months
    year, month = start.year + month_index // 12, month_index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return start.replace(year=year, month=month, day=day)


def prorated(credits: int, now: datetime, period_start: datetime, period_end: datetime) -> int:
    """``credits`` scaled by the share of the period left, rounded down: never more than promised."""
    total = (period_end - period_start).total_seconds()
    left = max(0.0, (period_end - now).total_seconds())
    return int(credits * left // total) if total > 0 else 0


def subscription_id_for(key: str) -> UUID:
    return uuid5(SUBSCRIPTION_NS, key)


def slot_id_for(user_id: UUID) -> UUID:
    return uuid5(SLOT_NS, user_id.hex)


class SubscriberSlot(Aggregate, created_event_name="Opened"):
    """Which subscription of a user is live, if any."""

    TOPIC = f"{TOPIC_PREFIX}:SubscriberSlot"

    class Event(Aggregate.Event):
        TOPIC = f"{TOPIC_PREFIX}:SubscriberSlot.Event"

    class Opened(Aggregate.Created):
        TOPIC = f"{TOPIC_PREFIX}:SubscriberSlot.Opened"
        user_id: UUID

    class Snapshot(BaseSnapshot):
        TOPIC = f"{TOPIC_PREFIX}:SubscriberSlot.Snapshot"

    def __init__(self, user_id: UUID) -> None:
        self.user_id = user_id
        self.live: UUID | None = None

    class Taken(Event):
        TOPIC = f"{TOPIC_PREFIX}:SubscriberSlot.Taken"
        subscription_id: UUID

        def apply(self, slot: SubscriberSlot) -> None:
            slot.live = self.subscription_id

    class Freed(Event):
        TOPIC = f"{TOPIC_PREFIX}:SubscriberSlot.Freed"
        subscription_id: UUID

        def apply(self, slot: SubscriberSlot) -> None:
            slot.live = None


class Subscription(Aggregate, created_event_name="Started"):
    """One subscription's life: trialing or active, then through past_due,
    paused and cancelled, to expired. Every change is one event."""

    TOPIC = f"{TOPIC_PREFIX}:Subscription"

    #: The mode of the latest pause (void or free), consulted while paused and
    #: when cancelled from a pause. A class default: subscriptions written
    #: before pause modes existed (events and snapshots) read as ``void``.
    pause_mode: str = PauseMode.VOID.value

    class Event(Aggregate.Event):
        TOPIC = f"{TOPIC_PREFIX}:Subscription.Event"

    class Started(Aggregate.Created):
        TOPIC = f"{TOPIC_PREFIX}:Subscription.Started"
        user_id: UUID
        plan: str
        plan_revision: int
        billing_cycle: str
        status: str
        period_start: datetime
        period_end: datetime
        trial_ends_at: datetime | None
        lemon_squeezy_subscription_id: str | None
        lemon_squeezy_customer_id: str | None
        granted_credits: int
        actor: str | None

    class Snapshot(BaseSnapshot):
        TOPIC = f"{TOPIC_PREFIX}:Subscription.Snapshot"

    def __init__(
        self,
        user_id: UUID,
        plan: str,
        plan_revision: int,
        billing_cycle: str,
        status: str,
        period_start: datetime,
        period_end: datetime,
        trial_ends_at: datetime | None,
        lemon_squeezy_subscription_id: str | None,
        lemon_squeezy_customer_id: str | None,
        granted_credits: int,
        actor: str | None,
    ) -> None:
        self.user_id = user_id
        self.plan = plan
        self.plan_revision = plan_revision
        self.billing_cycle = billing_cycle
        self.status = status
        self.period_start = period_start
        self.period_end = period_end
        self.trial_ends_at = trial_ends_at
        self.lemon_squeezy_subscription_id = lemon_squeezy_subscription_id
        self.lemon_squeezy_customer_id = lemon_squeezy_customer_id
        self.cancelled_at: datetime | None = None
        self.cancel_reason: str | None = None
        self.cancel_at_period_end = False
        self.paused_at: datetime | None = None
        self.ended_at: datetime | None = None
        self.periods = 1
        #: The provider's updated_at of the newest snapshot applied (Synced).
        self.source_updated_at: datetime | None = None
        #: What a resume returns to (a cancel can come from active, past_due,
        #: paused or trialing).
        self.status_before_cancel: str | None = None

    @property
    def live(self) -> bool:
        return self.status != Status.EXPIRED

    # -- events: each records one change ------------------------------------------

    class Activated(Event):
        """A trial converted to a paid period."""

        TOPIC = f"{TOPIC_PREFIX}:Subscription.Activated"
        period_start: datetime
        period_end: datetime
        plan_revision: int
        granted_credits: int

        def apply(self, s: Subscription) -> None:
            s.status = Status.ACTIVE
            s.period_start, s.period_end = self.period_start, self.period_end
            s.plan_revision = self.plan_revision
            s.periods += 1

    class Renewed(Event):
        TOPIC = f"{TOPIC_PREFIX}:Subscription.Renewed"
        period_start: datetime
        period_end: datetime
        plan_revision: int
        granted_credits: int

        def apply(self, s: Subscription) -> None:
            s.period_start, s.period_end = self.period_start, self.period_end
            s.plan_revision = self.plan_revision
            s.periods += 1
            if s.status == Status.PAST_DUE:
                s.status = Status.ACTIVE

    class PlanChanged(Event):
        TOPIC = f"{TOPIC_PREFIX}:Subscription.PlanChanged"
        from_plan: str
        to_plan: str
        to_revision: int
        change: str  # upgraded | downgraded
        granted_credits: int
        actor: str | None
        reason: str | None

        def apply(self, s: Subscription) -> None:
            s.plan, s.plan_revision = self.to_plan, self.to_revision

    class StatusChanged(Event):
        """past_due, recovered, paused, unpaused, resumed."""

        TOPIC = f"{TOPIC_PREFIX}:Subscription.StatusChanged"
        change: str
        status: str
        #: For ``paused``: void or free. Added later; older events read None (void).
        pause_mode: str | None = None

        def apply(self, s: Subscription) -> None:
            s.status = self.status
            if self.change == "paused":
                s.paused_at = self.timestamp
                s.pause_mode = self.pause_mode or PauseMode.VOID.value
            elif self.change == "unpaused":
                s.paused_at = None
            elif self.change == "resumed":
                s.cancelled_at, s.cancel_reason, s.cancel_at_period_end = None, None, False
                s.status_before_cancel = None

    class Cancelled(Event):
        TOPIC = f"{TOPIC_PREFIX}:Subscription.Cancelled"
        at_period_end: bool
        reason: str | None
        actor: str | None

        def apply(self, s: Subscription) -> None:
            s.status_before_cancel = s.status
            s.status = Status.CANCELLED
            s.cancelled_at = self.timestamp
            s.cancel_reason = self.reason
            s.cancel_at_period_end = self.at_period_end

    class Expired(Event):
        TOPIC = f"{TOPIC_PREFIX}:Subscription.Expired"
        reason: str

        def apply(self, s: Subscription) -> None:
            s.status = Status.EXPIRED
            s.ended_at = self.timestamp

    class Synced(Event):
        """The payment provider's view of the subscription, applied as is."""

        TOPIC = f"{TOPIC_PREFIX}:Subscription.Synced"
        status: str
        period_start: datetime
        period_end: datetime
        trial_ends_at: datetime | None
        cancel_at_period_end: bool
        source_updated_at: datetime
        #: For status ``paused``: void or free. Added later; older events read None (void).
        pause_mode: str | None = None
        #: Only the status is the provider's at that time (see SyncSubscription).
        #: Events stored before the field existed read as False.
        status_only: bool = False

        def apply(self, s: Subscription) -> None:
            s.status = self.status
            if self.status == Status.PAUSED:
                s.pause_mode = self.pause_mode or PauseMode.VOID.value
            s.period_start, s.period_end = self.period_start, self.period_end
            s.trial_ends_at = self.trial_ends_at
            s.cancel_at_period_end = self.cancel_at_period_end
            s.source_updated_at = self.source_updated_at
            if self.status == Status.EXPIRED:
                s.ended_at = self.timestamp
            elif self.status == Status.PAUSED and s.paused_at is None:
                s.paused_at = self.timestamp
            if self.status != Status.PAUSED:
                s.paused_at = None

    class Superseded(Event):
        """A provider's snapshot older than the one applied: not applied (the
        state stays the newer one's), kept so that the history can place it
        at its time, whatever order the snapshots arrived in."""

        TOPIC = f"{TOPIC_PREFIX}:Subscription.Superseded"
        plan: str
        status: str
        period_start: datetime
        period_end: datetime
        trial_ends_at: datetime | None
        cancel_at_period_end: bool
        source_updated_at: datetime
        status_only: bool = False

        def apply(self, s: Subscription) -> None:
            pass  # history only

    # -- guards: pure checks, raising InvalidTransition ------------------------------

    def require(self, change: str, *allowed: Status, why: str = "") -> None:
        if self.status not in allowed:
            raise InvalidTransition(self.id, self.status, change, why or f"allowed from {', '.join(allowed)}")

    def next_period(self) -> tuple[datetime, datetime]:
        return self.period_end, add_cycle(self.period_end, BillingCycle(self.billing_cycle))

    def snapshot_view(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}
