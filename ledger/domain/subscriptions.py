"""Subscriptions: their lifecycle as a state machine.

``Subscription`` is a strict state machine: ``TRANSITIONS`` lists each change
it can make (from which statuses, to which, within which time rule), and the
aggregate has one method per change that checks the table and triggers the
change's events. What each change grants is the credit policy's
(ledger.domain.policy). ``SubscriberSlot`` (one per user) holds the id of
the user's live subscription, so two subscriptions cannot be live at once even
under concurrent starts (both would write the slot; one save clashes). A
command's credit effect is posted on the user's CreditAccount in the same
transaction as the subscription's own events.
"""

from __future__ import annotations

import calendar
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Self
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate
from eventsourcing.domain import Snapshot as BaseSnapshot

from ledger.domain.credits import TOPIC_PREFIX
from ledger.domain.plans import SEED_PROVIDER
from ledger.domain.policy import CreditPolicy as CreditPolicy
from ledger.domain.policy import prorated as prorated
from ledger.errors import InvalidArgument, LedgerError

if TYPE_CHECKING:
    from ledger.domain.plans import PlanTerms

SUBSCRIPTION_NS = UUID("5b0f7f4e-8d0c-4c7e-9a53-0c2f1f6a7b11")
SLOT_NS = UUID("5b0f7f4e-8d0c-4c7e-9a53-0c2f1f6a7b12")
PROVIDER_ID_NS = UUID("5b0f7f4e-8d0c-4c7e-9a53-0c2f1f6a7b13")

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


def provider_ids_fields(
    provider: str | None, subscription_id: str | None, customer_id: str | None
) -> dict[str, str | None]:
    """Started's provider fields: a subscription with a provider's ids and no
    provider named is the seed's provider's (the compatibility keywords and
    the version 1 events name Lemon Squeezy's ids)."""
    if provider is None and (subscription_id is not None or customer_id is not None):
        provider = SEED_PROVIDER
    return {"provider": provider, "provider_subscription_id": subscription_id, "provider_customer_id": customer_id}


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


#: The cancel_reason of a subscription a payment provider cancelled: the
#: providers' snapshots say that it was cancelled, not why.
PROVIDER_CANCEL_REASON = "cancelled at the payment provider"
#: ... and of one the provider cancelled after its payment retries failed
#: (the snapshot before the cancellation was past_due).
PROVIDER_DUNNING_CANCEL_REASON = "cancelled at the payment provider after failed payments"
#: How many provider snapshots a subscription keeps (a few a month); older
#: ones drop out of its timeline.
MAX_PROVIDER_SNAPSHOTS = 1_000
#: The tie rule's order of statuses: later in a subscription's life, later.
_LIFECYCLE = {"trialing": 0, "active": 1, "past_due": 2, "paused": 3, "cancelled": 4, "expired": 5}


def _stamp(value: datetime | None) -> str:
    # Fixed width, so that the strings sort as the times do; "" (none) first.
    return "" if value is None else value.astimezone(UTC).strftime("%Y%m%dT%H%M%S%f")


def snapshot_rank(
    *,
    plan: str | None,
    status: str,
    period_start: datetime | None,
    period_end: datetime | None,
    trial_ends_at: datetime | None,
    cancel_at_period_end: bool | None,
    pause_mode: str | None = None,
) -> tuple[Any, ...]:
    """The tie rule: of two snapshots a provider sent with the same
    ``source_updated_at`` (its clock may have one-second resolution), the one
    that ranks higher is the later. Over the snapshot's own content only, so
    the winner does not depend on which arrived first: a bare expiry (the end
    of a subscription another one replaced: an end is final), then a snapshot
    with a plan over any other bare status, then the later period end (a
    renewal moves it on), then the status later in a subscription's life,
    then the rest of the content (an arbitrary but fixed order). What the
    provider did not say is None, and ranks lowest."""
    return (
        (2 if status == Status.EXPIRED else 0) if plan is None else 1,
        _stamp(period_end),
        _LIFECYCLE.get(status, len(_LIFECYCLE)),
        _stamp(period_start),
        _stamp(trial_ends_at),
        -1 if cancel_at_period_end is None else int(cancel_at_period_end),
        plan or "",
        pause_mode or "",
    )


@dataclass(frozen=True)
class ProviderSnapshot:
    """One snapshot of a subscription as its payment provider sent it.

    ``plan`` None: only the status is the provider's (a failed payment's
    past_due, or the end of a subscription another one replaced); everything
    else is the snapshot's before. ``period_kept``: the plan and status are
    the provider's, the period is the snapshot's before (a provider in
    dunning, whose period end is its next charge attempt); its own period is
    used only when no snapshot comes before it."""

    at: datetime
    status: str
    plan: str | None
    period_start: datetime | None
    period_end: datetime | None
    trial_ends_at: datetime | None
    cancel_at_period_end: bool | None
    pause_mode: str | None = None
    period_kept: bool = False

    @property
    def rank(self) -> tuple[Any, ...]:
        kept = self.period_kept or self.plan is None
        return snapshot_rank(
            plan=self.plan,
            status=self.status,
            period_start=None if kept else self.period_start,
            period_end=None if kept else self.period_end,
            trial_ends_at=self.trial_ends_at,
            cancel_at_period_end=self.cancel_at_period_end,
            pause_mode=self.pause_mode,
        )

    @property
    def position(self) -> tuple[datetime, tuple[Any, ...]]:
        return (self.at, self.rank)


@dataclass(frozen=True)
class ProviderState:
    """The subscription as a provider's snapshots describe it after
    ``source``, the last of them that counted."""

    source: ProviderSnapshot
    status: str
    plan: str
    #: When the snapshot the plan came from was sent (a bare status keeps the one before).
    plan_at: datetime
    period_start: datetime | None
    period_end: datetime | None
    trial_ends_at: datetime | None
    cancel_at_period_end: bool
    pause_mode: str | None
    cancelled_at: datetime | None
    cancel_reason: str | None
    paused_at: datetime | None
    ended_at: datetime | None

    def values(self) -> tuple[Any, ...]:
        """What the subscription's state takes from it."""
        return (
            self.source.at,
            self.status,
            self.plan,
            self.period_start,
            self.period_end,
            self.trial_ends_at,
            self.cancel_at_period_end,
            self.pause_mode,
            self.cancelled_at,
            self.cancel_reason,
            self.paused_at,
            self.ended_at,
        )


def latest_per_second(snapshots: Iterable[ProviderSnapshot]) -> list[ProviderSnapshot]:
    """The snapshots in the provider's order, one per ``at``: of several sent
    at the same time, the one that ranks highest (see snapshot_rank)."""
    best: dict[datetime, ProviderSnapshot] = {}
    for snapshot in snapshots:
        kept = best.get(snapshot.at)
        if kept is None or snapshot.rank > kept.rank:
            best[snapshot.at] = snapshot
    return [best[at] for at in sorted(best)]


def provider_states(snapshots: Iterable[ProviderSnapshot]) -> list[ProviderState]:
    """The subscription after each snapshot that counts, in the provider's
    order, whatever order they arrived in:

    - a full snapshot is what it says; a ``period_kept`` one takes the period
      of the state before it;
    - a bare status takes everything else from the state before it; a
      past_due counts only from active or trialing, an expiry from any
      status. One with no state before it is left out (there was no
      subscription to change), but an expiry, which ends the subscription
      described by the first snapshot after it;
    - expired is final: what comes after it is left out;
    - ``cancelled_at`` and ``paused_at`` are the time of the snapshot that
      made the change (the first of the run of that status), ``ended_at``
      the provider's end (the expired snapshot's period end, if not after the
      snapshot itself)."""
    ordered = latest_per_second(snapshots)
    states: list[ProviderState] = []
    previous: ProviderState | None = None
    for index, snapshot in enumerate(ordered):
        if previous is not None and previous.status == Status.EXPIRED:
            break
        state = _state_after(previous, snapshot, ordered[index + 1 :])
        if state is not None:
            states.append(state)
            previous = state
    return states


def _state_after(
    previous: ProviderState | None, snapshot: ProviderSnapshot, later: list[ProviderSnapshot]
) -> ProviderState | None:
    if snapshot.plan is None:
        base = previous
        if base is None and snapshot.status == Status.EXPIRED:
            first = next((s for s in later if s.plan is not None), None)
            base = None if first is None else _state_after(None, first, [])
        if base is None:
            return None
        if snapshot.status == Status.PAST_DUE and base.status not in (Status.ACTIVE, Status.TRIALING):
            return None
        state = replace(base, source=snapshot, status=snapshot.status, pause_mode=None)
    else:
        start, end = snapshot.period_start, snapshot.period_end
        if snapshot.period_kept and previous is not None:
            start, end = previous.period_start, previous.period_end
        state = ProviderState(
            source=snapshot,
            status=snapshot.status,
            plan=snapshot.plan,
            plan_at=snapshot.at,
            period_start=start,
            period_end=end,
            trial_ends_at=snapshot.trial_ends_at,
            cancel_at_period_end=bool(snapshot.cancel_at_period_end),
            pause_mode=snapshot.pause_mode if snapshot.status == Status.PAUSED else None,
            cancelled_at=None,
            cancel_reason=None,
            paused_at=None,
            ended_at=None,
        )
    return replace(state, **_times(previous, state))


def _times(previous: ProviderState | None, state: ProviderState) -> dict[str, Any]:
    """cancelled_at, cancel_reason, paused_at and ended_at after ``state``."""
    before = previous.status if previous is not None else None
    times: dict[str, Any] = {"cancelled_at": None, "cancel_reason": None, "paused_at": None, "ended_at": None}
    if state.status in (Status.CANCELLED, Status.EXPIRED) and previous is not None and previous.cancelled_at:
        # A run of cancelled snapshots keeps the time of its first; an expiry keeps the cancellation's.
        times["cancelled_at"], times["cancel_reason"] = previous.cancelled_at, previous.cancel_reason
    elif state.status == Status.CANCELLED:
        times["cancelled_at"] = state.source.at
        dunning = before == Status.PAST_DUE
        times["cancel_reason"] = PROVIDER_DUNNING_CANCEL_REASON if dunning else PROVIDER_CANCEL_REASON
    if state.status == Status.PAUSED:
        times["paused_at"] = previous.paused_at if previous is not None and before == Status.PAUSED else None
        times["paused_at"] = times["paused_at"] or state.source.at
    if state.status == Status.EXPIRED:
        end = state.period_end if state.source.plan is not None else None
        times["ended_at"] = min(end, state.source.at) if end is not None else state.source.at
    return times


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


def add_cycle(start: datetime, cycle: BillingCycle) -> datetime:
    """The end of a period starting at ``start``: same day next month (or the
    month's last day), or the same day next year."""
    months = 1 if cycle == BillingCycle.MONTHLY else 12
    month_index = start.month - 1 + months
    year, month = start.year + month_index // 12, month_index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return start.replace(year=year, month=month, day=day)


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
        #: The subscription freed last (expired), if any: what a check names
        #: when the user is back on the free tier. Not stored: derived from
        #: Freed, so slots recorded before it know it too.
        self.last: UUID | None = None

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
            slot.last = self.subscription_id


def provider_id_claim_id_for(provider: str, provider_subscription_id: str) -> UUID:
    # The provider's name is counted so that no pair of names spells another pair.
    return uuid5(PROVIDER_ID_NS, f"{len(provider)}:{provider}:{provider_subscription_id}")


class ProviderIdClaim(Aggregate, created_event_name="Claimed"):
    """The one subscription a payment provider's subscription id names. A
    provider's id is one subscription there, and the read model keeps one row
    per Lemon Squeezy id (a unique index): a second subscription started
    with the same id would stall the views on its Started event for good."""

    TOPIC = f"{TOPIC_PREFIX}:ProviderIdClaim"

    class Event(Aggregate.Event):
        TOPIC = f"{TOPIC_PREFIX}:ProviderIdClaim.Event"

    class Claimed(Aggregate.Created):
        TOPIC = f"{TOPIC_PREFIX}:ProviderIdClaim.Claimed"
        provider: str
        provider_subscription_id: str
        subscription_id: UUID

    class Snapshot(BaseSnapshot):
        TOPIC = f"{TOPIC_PREFIX}:ProviderIdClaim.Snapshot"

    def __init__(self, provider: str, provider_subscription_id: str, subscription_id: UUID) -> None:
        self.provider = provider
        self.provider_subscription_id = provider_subscription_id
        self.subscription_id = subscription_id


# -- the state machine -------------------------------------------------------------


def _renew_rule(s: Subscription, now: datetime) -> str | None:
    if now < s.period_end - RENEWAL_WINDOW:
        return f"the period runs until {s.period_end.isoformat()}"
    return None


def _resume_rule(s: Subscription, now: datetime) -> str | None:
    if now >= s.period_end:
        return "the period has ended"
    if not s.cancel_at_period_end:
        return "it was cancelled immediately"
    return None


def _expire_rule(s: Subscription, now: datetime) -> str | None:
    if s.status == Status.CANCELLED and now < s.period_end:
        return f"it stays paid for until {s.period_end.isoformat()}"
    return None


@dataclass(frozen=True)
class Transition:
    """One change a subscription can make: the statuses it is allowed from,
    the status it leaves (None: change plan keeps the status; resume returns
    to the status before the cancel, active if none is known), the ``change``
    its StatusChanged event records (for the changes recorded as one), and
    its time rule: why it may not be made at ``now``, or None."""

    allowed: tuple[Status, ...]
    to: Status | None
    status_change: str | None = None
    rule: Callable[[Subscription, datetime], str | None] | None = None


#: The state machine: every change a subscription makes by a command, by the
#: name InvalidTransition gives it. A subscription is started trialing (with a
#: trial) or active; a payment provider's snapshots (SyncSubscription) set the
#: state they describe, outside this table.
TRANSITIONS: Mapping[str, Transition] = {
    "activate": Transition((Status.TRIALING,), Status.ACTIVE),
    "renew": Transition((Status.ACTIVE, Status.PAST_DUE), Status.ACTIVE, rule=_renew_rule),
    "change plan": Transition((Status.ACTIVE, Status.TRIALING, Status.PAST_DUE), None),
    "mark past due": Transition((Status.ACTIVE,), Status.PAST_DUE, "past_due"),
    "recover": Transition((Status.PAST_DUE,), Status.ACTIVE, "recovered"),
    "pause": Transition((Status.ACTIVE,), Status.PAUSED, "paused"),
    "unpause": Transition((Status.PAUSED,), Status.ACTIVE, "unpaused"),
    "cancel": Transition((Status.TRIALING, Status.ACTIVE, Status.PAST_DUE, Status.PAUSED), Status.CANCELLED),
    "resume": Transition((Status.CANCELLED,), None, "resumed", rule=_resume_rule),
    "expire": Transition(
        (Status.TRIALING, Status.ACTIVE, Status.PAST_DUE, Status.PAUSED, Status.CANCELLED),
        Status.EXPIRED,
        rule=_expire_rule,
    ),
}
#: The reason of the expiry a cancel with ``at_period_end=False`` makes.
CANCELLED_NOW_REASON = "cancelled immediately"


class Subscription(Aggregate, created_event_name="Started"):
    """One subscription's life: trialing or active, then through past_due,
    paused and cancelled, to expired. Every change is one event."""

    TOPIC = f"{TOPIC_PREFIX}:Subscription"

    #: The mode of the latest pause (void or free), consulted while paused and
    #: when cancelled from a pause. A class default: subscriptions written
    #: before pause modes existed (events and snapshots) read as ``void``.
    pause_mode: str = PauseMode.VOID.value
    #: Every snapshot a payment provider sent (Synced and Superseded), in
    #: its order: the state a provider drives is the one they describe
    #: (provider_states), whatever order they arrived in. Replaced, never
    #: mutated; a class default for subscriptions no provider drives.
    provider_snapshots: tuple[ProviderSnapshot, ...] = ()

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
        #: Version 2: the payment provider's ids of the subscription, with the
        #: provider's name (None: no provider). Version 1 events had
        #: ``lemon_squeezy_subscription_id`` and ``lemon_squeezy_customer_id``.
        class_version = 2
        provider: str | None
        provider_subscription_id: str | None
        provider_customer_id: str | None
        granted_credits: int
        actor: str | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state.update(
                provider_ids_fields(
                    None,
                    state.pop("lemon_squeezy_subscription_id", None),
                    state.pop("lemon_squeezy_customer_id", None),
                )
            )

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
        provider: str | None,
        provider_subscription_id: str | None,
        provider_customer_id: str | None,
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
        #: The payment provider that bills the subscription, and its ids there.
        self.provider = provider
        self.provider_subscription_id = provider_subscription_id
        self.provider_customer_id = provider_customer_id
        self.cancelled_at: datetime | None = None
        self.cancel_reason: str | None = None
        self.cancel_at_period_end = False
        self.paused_at: datetime | None = None
        self.ended_at: datetime | None = None
        self.periods = 1
        #: The start of the period renewed from (derived from Renewed, not stored).
        self.prior_period_start: datetime | None = None
        #: The provider's updated_at of the newest snapshot applied (Synced).
        self.source_updated_at: datetime | None = None
        #: What a resume returns to (a cancel can come from active, past_due,
        #: paused or trialing).
        self.status_before_cancel: str | None = None

    @classmethod
    def _create(cls, event_class: Any, *, id: Any = None, **kwargs: Any) -> Self:
        # The compatibility keywords of Started (its version 1 fields).
        if event_class is cls.Started and (
            "lemon_squeezy_subscription_id" in kwargs or "lemon_squeezy_customer_id" in kwargs
        ):
            kwargs.update(
                provider_ids_fields(
                    kwargs.pop("provider", None),
                    kwargs.pop("lemon_squeezy_subscription_id", None),
                    kwargs.pop("lemon_squeezy_customer_id", None),
                )
            )
        return super()._create(event_class, id=id, **kwargs)

    @property
    def lemon_squeezy_subscription_id(self) -> str | None:
        """``provider_subscription_id`` when Lemon Squeezy bills it (compatibility name)."""
        return self.provider_subscription_id if self.provider == SEED_PROVIDER else None

    @property
    def lemon_squeezy_customer_id(self) -> str | None:
        """``provider_customer_id`` when Lemon Squeezy bills it (compatibility name)."""
        return self.provider_customer_id if self.provider == SEED_PROVIDER else None

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
            # The period renewed from, derived (not stored): a renewal ahead
            # of the period's end leaves it in force until the new one starts.
            s.prior_period_start = s.period_start
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
        """The payment provider's view of the subscription, applied: the
        state its snapshots describe (provider_states) once this one is
        among them. ``restated``: no new snapshot, the state of those seen
        changed (a late one came before the one applied)."""

        TOPIC = f"{TOPIC_PREFIX}:Subscription.Synced"
        class_version = 2
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
        #: Version 2. The period is the snapshot's before (SyncSubscription.period_kept).
        period_kept: bool = False
        restated: bool = False
        #: Version 2: the provider's times, from its snapshots. Version 1
        #: events took the ledger's processing time (``provider_times`` False).
        provider_times: bool = False
        cancelled_at: datetime | None = None
        cancel_reason: str | None = None
        paused_at: datetime | None = None
        ended_at: datetime | None = None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state.update(period_kept=False, restated=False, provider_times=False)
            state.update(cancelled_at=None, cancel_reason=None, paused_at=None, ended_at=None)

        def apply(self, s: Subscription) -> None:
            s.status = self.status
            if self.status == Status.PAUSED:
                s.pause_mode = self.pause_mode or PauseMode.VOID.value
            s.period_start, s.period_end = self.period_start, self.period_end
            s.trial_ends_at = self.trial_ends_at
            s.cancel_at_period_end = self.cancel_at_period_end
            s.source_updated_at = self.source_updated_at
            if self.provider_times:
                s.cancelled_at, s.cancel_reason = self.cancelled_at, self.cancel_reason
                s.paused_at, s.ended_at = self.paused_at, self.ended_at
            else:
                if self.status == Status.EXPIRED:
                    s.ended_at = self.timestamp
                elif self.status == Status.PAUSED and s.paused_at is None:
                    s.paused_at = self.timestamp
                if self.status != Status.PAUSED:
                    s.paused_at = None
            if not self.restated:
                s.see(
                    ProviderSnapshot(
                        at=self.source_updated_at,
                        status=self.status,
                        plan=None if self.status_only else s.plan,
                        period_start=None if self.status_only else self.period_start,
                        period_end=None if self.status_only else self.period_end,
                        trial_ends_at=None if self.status_only else self.trial_ends_at,
                        cancel_at_period_end=None if self.status_only else self.cancel_at_period_end,
                        pause_mode=None
                        if self.status_only
                        else (self.pause_mode if self.status == Status.PAUSED else None),
                        period_kept=self.period_kept,
                    )
                )

    class Superseded(Event):
        """A provider's snapshot that does not count in the state (older than
        the one applied, or after the end): not applied, kept so that the
        history can place it at its time, and the state be the one all the
        snapshots describe, whatever order they arrived in."""

        TOPIC = f"{TOPIC_PREFIX}:Subscription.Superseded"
        class_version = 2
        plan: str
        status: str
        period_start: datetime
        period_end: datetime
        trial_ends_at: datetime | None
        cancel_at_period_end: bool
        source_updated_at: datetime
        status_only: bool = False
        #: Version 2: as on Synced.
        period_kept: bool = False
        pause_mode: str | None = None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state.update(period_kept=False, pause_mode=None)

        def apply(self, s: Subscription) -> None:
            s.see(
                ProviderSnapshot(
                    at=self.source_updated_at,
                    status=self.status,
                    plan=None if self.status_only else self.plan,
                    period_start=None if self.status_only else self.period_start,
                    period_end=None if self.status_only else self.period_end,
                    trial_ends_at=None if self.status_only else self.trial_ends_at,
                    cancel_at_period_end=None if self.status_only else self.cancel_at_period_end,
                    pause_mode=None if self.status_only else self.pause_mode,
                    period_kept=self.period_kept,
                )
            )

    def see(self, snapshot: ProviderSnapshot) -> None:
        """Adds a provider snapshot to the timeline (one per second: the higher rank)."""
        kept = [s for s in self.provider_snapshots if s.at != snapshot.at]
        same = [s for s in self.provider_snapshots if s.at == snapshot.at and s.rank > snapshot.rank]
        kept.extend(same or [snapshot])
        kept.sort(key=lambda s: s.at)
        self.provider_snapshots = tuple(kept[-MAX_PROVIDER_SNAPSHOTS:])

    # -- the transitions: each checks TRANSITIONS, then triggers its events ---------

    def check(self, change: str, now: datetime) -> None:
        """Raises InvalidTransition unless ``change`` (a name in TRANSITIONS)
        may be made at ``now``: from a status it is allowed from, within its
        time rule. A command that moves credits for a change checks first, so
        that nothing is granted for a change that is refused."""
        transition = TRANSITIONS[change]
        if self.status not in transition.allowed:
            raise InvalidTransition(self.id, self.status, change, f"allowed from {', '.join(transition.allowed)}")
        why = transition.rule(self, now) if transition.rule is not None else None
        if why:
            raise InvalidTransition(self.id, self.status, change, why)

    def activation_period(self, now: datetime) -> tuple[datetime, datetime]:
        """The first paid period of a trial activated at ``now``."""
        return now, add_cycle(now, BillingCycle(self.billing_cycle))

    def next_period(self) -> tuple[datetime, datetime]:
        """The period a renewal moves to."""
        return self.period_end, add_cycle(self.period_end, BillingCycle(self.billing_cycle))

    def activate(self, now: datetime, *, plan_revision: int, granted_credits: int) -> None:
        """A trial converts to its first paid period (activation_period)."""
        self.check("activate", now)
        start, end = self.activation_period(now)
        self.trigger_event(
            self.Activated,
            period_start=start,
            period_end=end,
            plan_revision=plan_revision,
            granted_credits=granted_credits,
            timestamp=now,
        )

    def renew(self, now: datetime, *, plan_revision: int, granted_credits: int) -> None:
        """Moves to the next period (next_period); a past_due one becomes active."""
        self.check("renew", now)
        start, end = self.next_period()
        self.trigger_event(
            self.Renewed,
            period_start=start,
            period_end=end,
            plan_revision=plan_revision,
            granted_credits=granted_credits,
            timestamp=now,
        )

    def plan_change(self, now: datetime, old: PlanTerms, new: PlanTerms) -> bool:
        """Whether a change from ``old`` (the plan it is on) to ``new`` is an
        upgrade (else a downgrade); InvalidTransition if it is no change, or
        between plans of one tier (which are not ordered)."""
        self.check("change plan", now)
        if new.name == old.name:
            raise InvalidTransition(self.id, self.status, "change plan", f"already on {new.name}")
        if new.tier_level == old.tier_level:
            raise InvalidTransition(self.id, self.status, "change plan", "plans of the same tier are not ordered")
        return new.tier_level > old.tier_level

    def change_plan(
        self,
        now: datetime,
        old: PlanTerms,
        new: PlanTerms,
        *,
        to_revision: int,
        granted_credits: int,
        actor: str | None,
        reason: str | None,
    ) -> None:
        """Moves to plan ``new`` at its revision ``to_revision``; the status is kept."""
        upgraded = self.plan_change(now, old, new)
        self.trigger_event(
            self.PlanChanged,
            from_plan=old.name,
            to_plan=new.name,
            to_revision=to_revision,
            change="upgraded" if upgraded else "downgraded",
            granted_credits=granted_credits,
            actor=actor,
            reason=reason,
            timestamp=now,
        )

    def mark_past_due(self, now: datetime) -> None:
        self._change_status("mark past due", now)

    def recover(self, now: datetime) -> None:
        self._change_status("recover", now)

    def pause(self, now: datetime, mode: PauseMode = PauseMode.VOID) -> None:
        """Pauses: ``void``, no service while paused; ``free``, the service continues."""
        self._change_status("pause", now, pause_mode=str(pause_mode_of(mode)))

    def unpause(self, now: datetime) -> None:
        self._change_status("unpause", now)

    def resume(self, now: datetime) -> None:
        """Undoes a cancellation at period end, before the period ends."""
        self._change_status("resume", now)

    def _change_status(self, change: str, now: datetime, **extra: Any) -> None:
        self.check(change, now)
        transition = TRANSITIONS[change]
        target = transition.to if transition.to is not None else (self.status_before_cancel or Status.ACTIVE)
        self.trigger_event(
            self.StatusChanged, change=transition.status_change, status=str(target), timestamp=now, **extra
        )

    def cancel(self, now: datetime, *, at_period_end: bool, reason: str | None, actor: str | None) -> None:
        """Cancels at the period's end (resume undoes it until then), or now:
        then the subscription expires at once (CANCELLED_NOW_REASON)."""
        self.check("cancel", now)
        self.trigger_event(self.Cancelled, at_period_end=at_period_end, reason=reason, actor=actor, timestamp=now)
        if not at_period_end:
            self.trigger_event(self.Expired, reason=CANCELLED_NOW_REASON, timestamp=now)

    def expire(self, now: datetime, reason: str) -> None:
        """Ends the subscription (final); a cancelled one not before its period ends."""
        self.check("expire", now)
        self.trigger_event(self.Expired, reason=reason, timestamp=now)
