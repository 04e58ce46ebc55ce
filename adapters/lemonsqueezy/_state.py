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
* :class:`Checkout`: the order that started a subscription: which
  subscription it started, and the largest refund of it seen. The
  subscription's link keeps the same refund and its initial invoice (the
  order's charge), so that a refund of the order or of the invoice claws the
  credits back once.

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


def checkout_id(order_id: str) -> UUID:
    return uuid5(LEMON_NS, f"checkout:{order_id}")


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
    #: The order that started the subscription (its snapshots' ``order_id``),
    #: or None; its initial invoice, or None; and that order's largest refund
    #: seen, with the order's total (a refund of the order is one of the
    #: initial invoice when the totals agree). Class defaults, set by
    #: OrderSeen, InitialInvoiceSeen and OrderRefunded.
    order_id: str | None = None
    initial_invoice_id: str | None = None
    order_refunded: int = 0
    order_total: int = 0

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

    class OrderSeen(Event):
        """The order that started the subscription: its checkout's order."""

        TOPIC = f"{_T}:SubscriptionLink.OrderSeen"
        order_id: str

        def apply(self, link: SubscriptionLink) -> None:
            link.order_id = self.order_id

    def see_order(self, order_id: str, now: datetime) -> None:
        """Records the subscription's order, once (it never changes)."""
        if self.order_id is None:
            self.trigger_event(self.OrderSeen, order_id=order_id, timestamp=now)

    class InitialInvoiceSeen(Event):
        """The subscription's initial invoice: the charge of its checkout order."""

        TOPIC = f"{_T}:SubscriptionLink.InitialInvoiceSeen"
        invoice_id: str

        def apply(self, link: SubscriptionLink) -> None:
            link.initial_invoice_id = self.invoice_id

    def see_initial_invoice(self, invoice_id: str, now: datetime) -> None:
        if self.initial_invoice_id is None:
            self.trigger_event(self.InitialInvoiceSeen, invoice_id=invoice_id, timestamp=now)

    class OrderRefunded(Event):
        """The checkout order's refunded amount grew (refunded_level), with its total."""

        TOPIC = f"{_T}:SubscriptionLink.OrderRefunded"
        refunded_amount: int
        total: int

        def apply(self, link: SubscriptionLink) -> None:
            link.order_refunded = self.refunded_amount
            link.order_total = self.total

    def see_order_refund(self, refunded_amount: int, total: int, now: datetime) -> None:
        """Records a larger refund of the checkout order; a smaller or equal one changes nothing."""
        if refunded_amount > self.order_refunded:
            self.trigger_event(self.OrderRefunded, refunded_amount=refunded_amount, total=total, timestamp=now)

    def order_pays(self, invoice_total: int) -> bool:
        """Whether the checkout order is the same charge as an invoice of
        ``invoice_total``: their totals agree. A checkout that started a free
        trial (a zero order, or a setup fee alone) did not pay the invoice
        that ended the trial."""
        return self.order_total == invoice_total

    def order_refund_of(self, invoice_total: int) -> int:
        """The checkout order's refund as a refunded amount of the initial
        invoice (of ``invoice_total``): the whole of it for a full refund, the
        same share for a partial one; 0 unless the order is the same charge."""
        if self.order_refunded <= 0 or not self.order_pays(invoice_total):
            return 0
        if self.order_refunded >= self.order_total:
            return max(invoice_total, 1)
        return self.order_refunded * invoice_total // self.order_total

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


class Checkout(Aggregate, created_event_name="Opened"):
    """The order that started a subscription, whose charge is the
    subscription's initial invoice: Lemon Squeezy refunds it as the order
    (``order_refunded``) or as the invoice (``subscription_payment_refunded``).
    Found by the order's id: which subscription it started (recorded by the
    subscription's first snapshot), and the largest refund of it seen
    (recorded by the order's refund, whichever arrives first). The
    subscription's link keeps a copy of the refund, so that its invoices
    need not read this."""

    TOPIC = f"{_T}:Checkout"

    class Event(Aggregate.Event):
        TOPIC = f"{_T}:Checkout.Event"

    class Opened(Aggregate.Created):
        TOPIC = f"{_T}:Checkout.Opened"
        order_id: str

    def __init__(self, order_id: str) -> None:
        self.order_id = order_id
        #: The subscription the order started, once a snapshot of it is seen.
        self.ls_subscription_id: str | None = None
        #: The order's refunded amount (refunded_level) and total, at the largest refund seen.
        self.refunded = 0
        self.total = 0

    class SubscriptionSeen(Event):
        TOPIC = f"{_T}:Checkout.SubscriptionSeen"
        ls_subscription_id: str

        def apply(self, checkout: Checkout) -> None:
            checkout.ls_subscription_id = self.ls_subscription_id

    def see_subscription(self, ls_subscription_id: str, now: datetime) -> None:
        if self.ls_subscription_id is None:
            self.trigger_event(self.SubscriptionSeen, ls_subscription_id=ls_subscription_id, timestamp=now)

    class OrderRefunded(Event):
        TOPIC = f"{_T}:Checkout.OrderRefunded"
        refunded_amount: int
        total: int

        def apply(self, checkout: Checkout) -> None:
            checkout.refunded = self.refunded_amount
            checkout.total = self.total

    def see_refund(self, refunded_amount: int, total: int, now: datetime) -> None:
        """Records a larger refund of the order; a smaller or equal one (a late copy) changes nothing."""
        if refunded_amount > self.refunded:
            self.trigger_event(self.OrderRefunded, refunded_amount=refunded_amount, total=total, timestamp=now)
