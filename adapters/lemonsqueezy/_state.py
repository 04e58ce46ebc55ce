"""What the adapter remembers about Lemon Squeezy objects, as aggregates in the
ledger's own event store, so that it changes in the same transaction as the
credits and subscriptions it explains.

* :class:`CustomerLink`: a Lemon Squeezy customer id and the ledger user it
  was first seen with.
* :class:`SubscriptionLink`: a Lemon Squeezy subscription: its user, its
  customer, and a timeline of every snapshot seen (time, variant, period end;
  one per second, the one the ledger's tie rule keeps), in any order of
  arrival. Invoices find the plan they paid for in it. It also records each
  plan change an invoice credited (an upgrade is credited once, whatever
  invoices prorate it), and the subscription that replaced it, if any.
* :class:`Payment`: one invoice or order that moved credits: what it granted,
  the refunded amount last seen, what was clawed back and what could not be.

Topics are explicit and frozen (stored events live forever). They spell this
module's path, so a reader that never imported the adapter still decodes them:
eventsourcing imports the module a topic names.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

#: Namespace of every id the adapter derives.
LEMON_NS = UUID("0c9e5f4a-6d51-4c52-9a3e-5e4c1a6b7d01")
_T = "adapters.lemonsqueezy._state"
#: A subscription lives for years with a few snapshots a month; older entries
#: than this many are dropped (invoices that old are never held for a snapshot).
MAX_TIMELINE = 1_000


def customer_link_id(customer_id: str) -> UUID:
    return uuid5(LEMON_NS, f"customer:{customer_id}")


def subscription_link_id(ls_subscription_id: str) -> UUID:
    return uuid5(LEMON_NS, f"subscription-link:{ls_subscription_id}")


def ledger_subscription_id(ls_subscription_id: str) -> UUID:
    """The ledger's Subscription id for a Lemon Squeezy subscription."""
    return uuid5(LEMON_NS, f"subscription:{ls_subscription_id}")


def payment_id(kind: str, object_id: str) -> UUID:
    return uuid5(LEMON_NS, f"payment:{kind}:{object_id}")


class CustomerLink(Aggregate, created_event_name="Linked"):
    TOPIC = f"{_T}:CustomerLink"

    class Event(Aggregate.Event):
        TOPIC = f"{_T}:CustomerLink.Event"

    class Linked(Aggregate.Created):
        TOPIC = f"{_T}:CustomerLink.Linked"
        customer_id: str
        user_id: UUID

    def __init__(self, customer_id: str, user_id: UUID) -> None:
        self.customer_id = customer_id
        self.user_id = user_id


@dataclass(frozen=True)
class Seen:
    """One snapshot on a subscription's timeline."""

    updated_at: datetime
    variant_id: str
    period_end: datetime | None


@dataclass(frozen=True)
class Credited:
    """A plan change an invoice credited: when the change was seen on the
    timeline (the first snapshot of the new variant), from and to which
    variant, and by which invoice."""

    change_at: datetime
    from_variant: str
    to_variant: str
    invoice_id: str


class SubscriptionLink(Aggregate, created_event_name="Linked"):
    TOPIC = f"{_T}:SubscriptionLink"

    #: [change_at, from_variant, to_variant, invoice_id] of each credited plan
    #: change. A class default, replaced (never mutated) by UpgradeCredited:
    #: links saved before it existed (events and snapshots) have credited none.
    credited: tuple[Any, ...] = ()
    #: [ls_subscription_id, at] of the subscription that replaced this one
    #: (a product switch: its ``migration_from_subscription_id`` names this
    #: one), or None. A class default, set by Replaced.
    replaced: tuple[Any, ...] | None = None

    class Event(Aggregate.Event):
        TOPIC = f"{_T}:SubscriptionLink.Event"

    class Linked(Aggregate.Created):
        TOPIC = f"{_T}:SubscriptionLink.Linked"
        ls_subscription_id: str
        customer_id: str
        user_id: UUID

    def __init__(self, ls_subscription_id: str, customer_id: str, user_id: UUID) -> None:
        self.ls_subscription_id = ls_subscription_id
        self.customer_id = customer_id
        self.user_id = user_id
        #: [updated_at, variant_id, period_end] sorted by updated_at.
        self.timeline: list[list[Any]] = []

    class SnapshotSeen(Event):
        TOPIC = f"{_T}:SubscriptionLink.SnapshotSeen"
        updated_at: datetime
        variant_id: str
        period_end: datetime | None
        #: The snapshot won its second (the ledger's tie rule): it replaces
        #: any other entry of that second. Events stored before read False.
        one_per_second: bool = False

        def apply(self, link: SubscriptionLink) -> None:
            entry = [self.updated_at, self.variant_id, self.period_end]
            if self.one_per_second:
                link.timeline = [e for e in link.timeline if e[0] != self.updated_at]
            bisect.insort(link.timeline, entry, key=lambda e: (e[0], e[1]))
            del link.timeline[: max(0, len(link.timeline) - MAX_TIMELINE)]

    def see(self, updated_at: datetime, variant_id: str, period_end: datetime | None, now: datetime) -> None:
        """Puts a snapshot on the timeline, as the one of its second (the
        caller knows it won the second); a repeat adds nothing."""
        if [[updated_at, variant_id, period_end]] == [e for e in self.timeline if e[0] == updated_at]:
            return
        self.trigger_event(
            self.SnapshotSeen,
            updated_at=updated_at,
            variant_id=variant_id,
            period_end=period_end,
            one_per_second=True,
            timestamp=now,
        )

    class Replaced(Event):
        """Another subscription replaced this one (a product switch)."""

        TOPIC = f"{_T}:SubscriptionLink.Replaced"
        by_ls_subscription_id: str
        at: datetime

        def apply(self, link: SubscriptionLink) -> None:
            link.replaced = (self.by_ls_subscription_id, self.at)

    def replace_by(self, ls_subscription_id: str, at: datetime, now: datetime) -> None:
        """Records the subscription that replaced this one, once."""
        if self.replaced is None:
            self.trigger_event(self.Replaced, by_ls_subscription_id=ls_subscription_id, at=at, timestamp=now)

    @property
    def replaced_at(self) -> datetime | None:
        return None if self.replaced is None else self.replaced[1]

    def entries(self) -> list[Seen]:
        return [Seen(e[0], e[1], e[2]) for e in self.timeline]

    class UpgradeCredited(Event):
        """An invoice granted the credits of a plan change: no other invoice does."""

        TOPIC = f"{_T}:SubscriptionLink.UpgradeCredited"
        change_at: datetime
        from_variant: str
        to_variant: str
        invoice_id: str

        def apply(self, link: SubscriptionLink) -> None:
            entry = [self.change_at, self.from_variant, self.to_variant, self.invoice_id]
            link.credited = (*link.credited, entry)

    def credit_upgrade(self, change: Credited, now: datetime) -> None:
        self.trigger_event(
            self.UpgradeCredited,
            change_at=change.change_at,
            from_variant=change.from_variant,
            to_variant=change.to_variant,
            invoice_id=change.invoice_id,
            timestamp=now,
        )

    def credited_changes(self) -> list[Credited]:
        return [Credited(c[0], c[1], c[2], c[3]) for c in self.credited]


class Payment(Aggregate, created_event_name="Opened"):
    TOPIC = f"{_T}:Payment"

    class Event(Aggregate.Event):
        TOPIC = f"{_T}:Payment.Event"

    class Opened(Aggregate.Created):
        TOPIC = f"{_T}:Payment.Opened"
        kind: str  # invoice | order
        object_id: str
        user_id: UUID
        total: int
        currency: str

    def __init__(self, kind: str, object_id: str, user_id: UUID, total: int, currency: str) -> None:
        self.kind = kind
        self.object_id = object_id
        self.user_id = user_id
        self.total = total
        self.currency = currency
        #: None until the grant is decided; then the credits granted (maybe 0).
        self.granted: int | None = None
        self.grant_key: str | None = None
        self.refunded_seen = 0
        self.clawed = 0
        self.shortfall = 0

    class Granted(Event):
        TOPIC = f"{_T}:Payment.Granted"
        credits: int
        key: str
        plan: str | None
        expires_at: datetime | None
        note: str | None

        def apply(self, payment: Payment) -> None:
            payment.granted = self.credits
            payment.grant_key = self.key

    class Refunded(Event):
        """The refunded amount grew: what the change clawed back, and what it could not."""

        TOPIC = f"{_T}:Payment.Refunded"
        refunded_amount: int
        clawed: int
        shortfall: int

        def apply(self, payment: Payment) -> None:
            payment.refunded_seen = self.refunded_amount
            payment.clawed += self.clawed
            payment.shortfall += self.shortfall
