"""How Lemon Squeezy's objects move the ledger.

One command per kind of object, each a ``Command`` that runs in one ledger
transaction: the adapter's own records (user mappings, the subscription's
timeline, the payment's grant and refunds) change together with the
subscription and the credits, or not at all.

Every effect is keyed by the business object, never by the delivery: a
subscription snapshot by its subscription id and ``updated_at``, a grant by its
invoice or order id, a clawback by the object and the refunded amount it
answers. The same event re-sent under a new ``webhook_id``, or replayed by the
reconciler, finds its effect done and does nothing.

A command that cannot run yet raises the kit's :class:`Held` (the subscription was not
seen yet, no user is known, the snapshot from the invoice's time has not
arrived); the delivery stays ``failed`` with the reason and is run again when
what it waits for arrives, or by ``webhooks retry``.
"""

from __future__ import annotations

import calendar
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar, Literal, TypeVar
from uuid import UUID

from adapters.webhooks import Held, RefundPolicy
from ledger import (
    MAX_CREDITS,
    BillingCycle,
    CreditKind,
    InvalidArgument,
    LedgerError,
    PauseMode,
    Receipt,
    SubscriptionExists,
    SyncSubscription,
)
from ledger import SubscriptionStatus as Status
from ledger.extension import (
    ADDED,
    Command,
    Plan,
    Subscription,
    UnitOfWork,
    add_cycle,
    check_key,
    check_user_id,
    entry_id_for,
    grant_expiry,
    plan_id_for,
    record_id_for,
    rollover_allowance,
    rollover_cap,
    slot_id_for,
    unspent_subscription_credits,
    upgrade_grant,
)

from ._state import (
    Checkout,
    Credited,
    CustomerLink,
    Payment,
    Seen,
    SubscriptionLink,
    checkout_id,
    customer_link_id,
    ledger_subscription_id,
    payment_id,
    subscription_link_id,
)

#: Lemon Squeezy's key in the ledger's provider mappings (PlanTerms.provider_ids,
#: Subscription.provider): the ``source`` its webhooks are stored under.
PROVIDER = "lemon_squeezy"

T = TypeVar("T")

#: How far apart an invoice and the snapshot Lemon Squeezy sends with it may
#: be: both are written in the same request, seconds apart.
SLACK = timedelta(seconds=60)
#: How far from its proration invoice a plan change may be (Lemon Squeezy
#: charges the proration right after the change).
CHANGE_WINDOW = timedelta(hours=1)
#: How long an invoice waits for that snapshot before it is applied with what
#: is known (a host that does not subscribe to subscription_updated).
DEFAULT_HOLD_WINDOW_S = 3600
PAID_STATUSES = frozenset({"paid", "refunded", "partial_refund"})

STATUS_MAP: dict[str, Status] = {
    "on_trial": Status.TRIALING,
    "active": Status.ACTIVE,
    # pause.mode void (no service) and free (the service continues, unpaid) are both
    # paused; the mode goes with it (SyncSubscription.pause_mode): a free pause keeps the plan.
    "paused": Status.PAUSED,
    # renews_at is the next charge attempt, not a period end: the period is kept (ApplySubscription).
    "past_due": Status.PAST_DUE,
    # dunning gave up: still entitled (a grace) until Lemon Squeezy sends cancelled or expired.
    "unpaid": Status.PAST_DUE,
    "cancelled": Status.CANCELLED,  # grace period until ends_at
    "expired": Status.EXPIRED,
}


class UnknownVariant(LedgerError):
    """No plan in the catalog lists this Lemon Squeezy variant."""

    code = "unknown_variant"

    def __init__(self, variant_id: str) -> None:
        self.variant_id = variant_id
        super().__init__(
            f"variant {variant_id} is not in the plan catalog (lemon_squeezy_variant_id_monthly/_yearly) "
            "nor a configured credit pack"
        )


class UnconfiguredPack(LedgerError):
    """A paid order of a variant that is neither a configured credit pack
    nor a plan's: it fails (nothing recorded) so that ``webhooks retry``
    applies it once the pack is configured, instead of recording it as done."""

    code = "unconfigured_pack"

    def __init__(self, order_id: str, variant_id: str) -> None:
        self.order_id = order_id
        self.variant_id = variant_id
        super().__init__(
            f"paid order {order_id}: variant {variant_id} is not a configured credit pack nor a plan's variant; "
            "nothing granted or recorded (configure the pack, then `webhooks retry` applies it)"
        )


@dataclass(frozen=True)
class Catalog:
    """Lemon Squeezy variant id -> (plan name, billing cycle), from every
    revision of every plan (a subscription keeps its variant after a revision)."""

    variants: tuple[tuple[str, str, str], ...] = ()

    def find(self, variant_id: str) -> tuple[str, BillingCycle] | None:
        for variant, plan, cycle in self.variants:
            if variant == variant_id:
                return plan, BillingCycle(cycle)
        return None


@dataclass
class Report:
    """What a command did, for the delivery's note. Filled by ``apply``;
    left out of fingerprints."""

    notes: list[str] = field(default_factory=list)
    granted: int = 0
    clawed: int = 0
    shortfall: int = 0
    applied: bool = False

    def reset(self) -> None:
        self.notes.clear()
        self.granted = self.clawed = self.shortfall = 0
        self.applied = False


def canonical_id(value: str) -> str:
    """A Lemon Squeezy id (an integer) in its canonical decimal form:
    ``0770051`` and ``770051`` are one object. Anything but digits is left
    as it is (it matches no id)."""
    return str(int(value)) if value.isdigit() else value


class CustomerLinked(LedgerError):
    """The Lemon Squeezy customer is already linked to another user."""

    code = "customer_linked"
    param = "user_id"

    def __init__(self, customer_id: str, user_id: UUID, other: UUID) -> None:
        self.customer_id = customer_id
        self.user_id = user_id
        super().__init__(
            f"Lemon Squeezy customer {customer_id} is linked to user {user_id}; it is not linked again to {other} "
            "(a customer keeps the user it was first linked to)"
        )


@dataclass(frozen=True)
class LinkCustomer(Command):
    """Says which ledger user a Lemon Squeezy customer is (the host's
    resolver, or ``webhooks link``): recorded as the customer's mapping, the
    same one an event with ``meta.custom_data.user_id`` records."""

    name: ClassVar[str] = "lemonsqueezy_link_customer"
    customer_id: str = field(kw_only=True)
    user_id: UUID = field(kw_only=True)

    def __post_init__(self) -> None:
        check_key(self.key)
        check_user_id(self.user_id)
        if (
            not self.customer_id.isdigit()
            or canonical_id(self.customer_id) != self.customer_id
            or self.customer_id == "0"
        ):
            raise InvalidArgument(f"a Lemon Squeezy customer id is a positive integer, got {self.customer_id[:40]!r}")

    def reads(self) -> tuple[list[UUID], list[UUID]]:
        return [customer_link_id(self.customer_id)], []

    def apply(self, unit: UnitOfWork) -> Receipt:
        found = unit.aggregate(customer_link_id(self.customer_id), CustomerLink)
        if found is not None and found.user_id != self.user_id:
            raise CustomerLinked(self.customer_id, found.user_id, self.user_id)
        learn_customer(unit, self.customer_id, self.user_id)
        return unit.finish(self, self.user_id, amount=0)


def content_key(kind: str, object_id: str, fields: dict[str, Any]) -> str:
    """An idempotency key from an object's id and the fields that decide its
    effect: the same content again (a re-send under a new webhook id) is the
    same key, a changed object a new one."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return f"lemonsqueezy:{kind}:{object_id}:{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def minus_cycle(end: datetime, cycle: BillingCycle) -> datetime:
    """The start of a period ending at ``end``: ``add_cycle`` backwards."""
    months = 1 if cycle == BillingCycle.MONTHLY else 12
    index = end.year * 12 + end.month - 1 - months
    year, month = divmod(index, 12)
    day = min(end.day, calendar.monthrange(year, month + 1)[1])
    return end.replace(year=year, month=month + 1, day=day)


# --------------------------------------------------------------- shared steps


def resolve_user(
    unit: UnitOfWork, custom_user: UUID | None, link: SubscriptionLink | None, customer_id: str, waits_for: str
) -> UUID:
    """``meta.custom_data.user_id``, else the user the subscription or the
    customer was first seen with; Held when none is known."""
    if custom_user is not None:
        if link is not None and link.user_id != custom_user:
            raise InvalidArgument(
                f"meta.custom_data.user_id {custom_user} differs from user {link.user_id}, "
                f"whom Lemon Squeezy subscription {link.ls_subscription_id} belongs to"
            )
        return custom_user
    if link is not None:
        return link.user_id
    customer = unit.aggregate(customer_link_id(customer_id), CustomerLink)
    if customer is not None:
        return customer.user_id
    raise Held(waits_for, "no meta.custom_data.user_id, and no user is mapped to this subscription or customer yet")


def learn_customer(unit: UnitOfWork, customer_id: str, user_id: UUID) -> None:
    """Maps a customer to the user it is first seen with (later users of the
    same customer, one email with two app accounts, do not move it)."""
    if unit.aggregate(customer_link_id(customer_id), CustomerLink) is None:
        unit.add(
            CustomerLink._create(
                CustomerLink.Linked,
                id=customer_link_id(customer_id),
                customer_id=customer_id,
                user_id=user_id,
                timestamp=unit.now,
            )
        )


def plan_for(unit: UnitOfWork, catalog: Catalog, variant_id: str) -> tuple[Plan, BillingCycle]:
    found = catalog.find(variant_id)
    if found is None:
        raise UnknownVariant(variant_id)
    plan = unit.aggregate(plan_id_for(found[0]), Plan)
    if plan is None:
        raise UnknownVariant(variant_id)
    return plan, found[1]


def claw_back(
    unit: UnitOfWork,
    payment: Payment,
    refunded: int,
    policy: RefundPolicy,
    report: Report,
    description: str,
) -> None:
    """Claws back the credits answering the growth of the refunded amount
    from what was last seen to ``refunded`` (see RefundPolicy)."""
    granted = payment.granted or 0
    wanted = _share(granted, refunded, payment.total) - _share(granted, payment.refunded_seen, payment.total)
    taken = 0
    if wanted > 0 and policy.claw_back:
        taken = _debit(unit, payment, wanted, policy, refunded, description)
    shortfall = max(0, wanted - taken) if policy.claw_back else 0
    payment.trigger_event(
        Payment.Refunded, refunded_amount=refunded, clawed=taken, shortfall=shortfall, timestamp=unit.now
    )
    report.clawed += taken
    report.shortfall += shortfall
    if shortfall:
        report.notes.append(f"{shortfall} of {wanted} credits to claw back were spent, held or lapsed; not taken")
    if wanted > 0 and not policy.claw_back:
        report.notes.append(f"refund recorded; the refund policy claws back nothing ({wanted} credits kept)")


def refund(
    unit: UnitOfWork,
    payment: Payment,
    refunded: int,
    policy: RefundPolicy,
    report: Report,
    description: str,
) -> None:
    """Claws back for a refunded amount of a granted payment if it grew
    since the last refund seen; a refund seen before (a late copy, or the
    same refund seen as the order and as the invoice) says so and takes
    nothing."""
    if payment.granted is None or refunded <= 0:
        return
    if refunded > payment.refunded_seen:
        claw_back(unit, payment, refunded, policy, report, description)
    else:
        report.notes.append(f"a refund of {refunded} of {payment.total} was seen before; nothing clawed back again")


def _share(granted: int, refunded: int, total: int) -> int:
    if total <= 0:
        return granted if refunded > 0 else 0
    return granted * min(refunded, total) // total


def _debit(
    unit: UnitOfWork, payment: Payment, wanted: int, policy: RefundPolicy, refunded: int, description: str
) -> int:
    # The domain's debit draws soonest-expiring credits first; a clawback
    # takes the refunded grant's own credits first, then (by policy) others.
    return unit.claw_back_once(
        payment.user_id,
        wanted,
        key=f"{grant_key(payment.kind, payment.object_id)}:refund:{refunded}",
        block_id=str(entry_id_for(payment.grant_key)) if payment.grant_key else None,
        from_other_credits=policy.from_other_credits,
        reference_type=f"lemonsqueezy_{payment.kind}",
        reference_id=payment.object_id,
        description=description,
    )


def grant_key(kind: str, object_id: str) -> str:
    """The idempotency key of the credits a payment (invoice or order) grants."""
    return f"lemonsqueezy:{kind}:{object_id}"


def open_payment(unit: UnitOfWork, kind: str, object_id: str, user_id: UUID, total: int, currency: str) -> Payment:
    payment = unit.aggregate(payment_id(kind, object_id), Payment)
    if payment is None:
        payment = Payment._create(
            Payment.Opened,
            id=payment_id(kind, object_id),
            kind=kind,
            object_id=object_id,
            user_id=user_id,
            total=total,
            currency=currency,
            timestamp=unit.now,
        )
        unit.add(payment)
    return payment


def not_the_same_charge(link: SubscriptionLink, invoice_id: str, invoice_total: int) -> str:
    return (
        f"the refunded checkout order {link.order_id} (total {link.order_total}) is not the charge of initial "
        f"invoice {invoice_id} (total {invoice_total}); nothing clawed back for it"
    )


def open_checkout(unit: UnitOfWork, order_id: str) -> Checkout:
    checkout = unit.aggregate(checkout_id(order_id), Checkout)
    if checkout is None:
        checkout = Checkout._create(Checkout.Opened, id=checkout_id(order_id), order_id=order_id, timestamp=unit.now)
        unit.add(checkout)
    return checkout


def record_grant(
    unit: UnitOfWork,
    payment: Payment,
    *,
    amount: int,
    kind: CreditKind,
    key: str,
    expires_at: datetime | None,
    plan: str | None,
    description: str,
    report: Report,
) -> int:
    """Grants a payment's credits once (keyed by the payment), unless the
    period they are for is already over when the payment is processed.
    Returns the credits granted."""
    note = None
    granted = 0
    amount = min(amount, MAX_CREDITS)
    if expires_at is not None and expires_at <= unit.now:
        note = f"the paid period ended at {expires_at.isoformat()} before the payment was processed; nothing granted"
        report.notes.append(note)
    else:
        granted = unit.grant_once(
            payment.user_id,
            amount,
            kind,
            key=key,
            expires_at=expires_at,
            reference_type=f"lemonsqueezy_{payment.kind}",
            reference_id=payment.object_id,
            description=description,
        )
    payment.trigger_event(
        Payment.Granted, credits=granted, key=key, plan=plan, expires_at=expires_at, note=note, timestamp=unit.now
    )
    report.granted += granted
    return granted


def record_grant_none(unit: UnitOfWork, payment: Payment, report: Report) -> None:
    """Decides a payment's grant as nothing (the note says why)."""
    payment.trigger_event(
        Payment.Granted,
        credits=0,
        key=grant_key(payment.kind, payment.object_id),
        plan=None,
        expires_at=None,
        note=report.notes[-1] if report.notes else None,
        timestamp=unit.now,
    )


# ------------------------------------------------------------------ snapshots


@dataclass(frozen=True)
class ApplySubscription(Command):
    """A subscription snapshot (``data.type`` subscriptions): its user and
    timeline, then SyncSubscription, which applies it if newer than the last."""

    name: ClassVar[str] = "lemonsqueezy_subscription"
    hints: ClassVar[frozenset[str]] = frozenset({"catalog", "report", "order_id"})
    ls_subscription_id: str = field(kw_only=True)
    customer_id: str = field(kw_only=True)
    variant_id: str = field(kw_only=True)
    status: Status = field(kw_only=True)
    period_start: datetime = field(kw_only=True)
    period_end: datetime = field(kw_only=True)
    trial_ends_at: datetime | None = field(kw_only=True)
    cancel_at_period_end: bool = field(kw_only=True)
    source_updated_at: datetime = field(kw_only=True)
    custom_user: UUID | None = field(kw_only=True)
    #: ``pause.mode`` of a paused snapshot (void or free).
    pause_mode: PauseMode = field(default=PauseMode.VOID, kw_only=True, metadata=ADDED)
    #: ``migration_from_subscription_id``: the subscription this one replaces,
    #: and this one's ``created_at``, when the replacement happened (the same
    #: in every snapshot of it, so it does not depend on which arrives first).
    replaces: str | None = field(default=None, kw_only=True, metadata=ADDED)
    created_at: datetime | None = field(default=None, kw_only=True, metadata=ADDED)
    #: ``order_id``: the order that started the subscription (the same in
    #: every snapshot of it), recorded on its link so that a refund of that
    #: order finds the subscription's initial invoice. Out of the fingerprint.
    order_id: str | None = field(default=None, kw_only=True, compare=False)
    catalog: Catalog = field(default=Catalog(), kw_only=True, compare=False)
    report: Report = field(default_factory=Report, kw_only=True, compare=False)

    def reads(self) -> tuple[list[UUID], list[UUID]]:
        sync_key = content_key("subscription-sync", self.ls_subscription_id, self._fields())
        ids = [
            subscription_link_id(self.ls_subscription_id),
            customer_link_id(self.customer_id),
            ledger_subscription_id(self.ls_subscription_id),
            record_id_for(sync_key),
        ]
        if self.replaces is not None:
            ids += [subscription_link_id(self.replaces), ledger_subscription_id(self.replaces)]
        if self.order_id is not None:
            ids.append(checkout_id(self.order_id))
        if self.custom_user is not None:
            ids.append(slot_id_for(self.custom_user))
        return ids, [self.custom_user] if self.custom_user is not None else []

    def apply(self, unit: UnitOfWork) -> Receipt:
        self.report.reset()
        sid = ledger_subscription_id(self.ls_subscription_id)
        sync_key = content_key("subscription-sync", self.ls_subscription_id, self._fields())
        unit.prefetch(*self.reads())
        link = unit.aggregate(subscription_link_id(self.ls_subscription_id), SubscriptionLink)
        user = resolve_user(unit, self.custom_user, link, self.customer_id, f"customer {self.customer_id}")
        plan, cycle = plan_for(unit, self.catalog, self.variant_id)
        if link is None:
            link = SubscriptionLink._create(
                SubscriptionLink.Linked,
                id=subscription_link_id(self.ls_subscription_id),
                ls_subscription_id=self.ls_subscription_id,
                customer_id=self.customer_id,
                user_id=user,
                timestamp=unit.now,
            )
            unit.add(link)
        learn_customer(unit, self.customer_id, user)
        if self.order_id is not None:
            self._checkout(unit, link, self.order_id)
        if self.replaces is not None:
            self._replace(unit, user)
        before = unit.aggregate(sid, Subscription)
        version = before.version if before is not None else 0
        # A dunning snapshot's renews_at is the next charge attempt, not the
        # period's end: the period is the one of the snapshot before it in
        # Lemon Squeezy's order (the ledger finds it, whatever arrived first).
        kept = self.status == Status.PAST_DUE
        replaced = link.replaced_at
        sync = SyncSubscription(
            key=sync_key,
            subscription_id=sid,
            user_id=user,
            plan=plan.terms.name,
            billing_cycle=cycle,
            status=self.status,
            period_start=self.period_start,
            period_end=self.period_end,
            trial_ends_at=self.trial_ends_at,
            cancel_at_period_end=self.cancel_at_period_end,
            source_updated_at=self.source_updated_at,
            external_id=self.ls_subscription_id,
            customer_id=self.customer_id,
            provider=PROVIDER,
            pause_mode=self.pause_mode,
            period_kept=kept,
            replaces=ledger_subscription_id(self.replaces) if self.replaces is not None else None,
            replaces_at=self.created_at if self.replaces is not None else None,
            replaced_at=replaced,
        )
        if not unit.recorded(sync.key):
            try:
                sync.apply(unit)
            except SubscriptionExists as exc:
                raise Held(
                    f"user {user}",
                    f"the user's subscription {exc.subscription_id} is still live; this one is applied when it ends",
                ) from None
        after = unit.aggregate(sid, Subscription)
        if after is not None:
            self._see(unit, link, after, sync, None if kept else self.period_end)
            self.report.applied = after.version > version and after.source_updated_at == self.source_updated_at
            if not self.report.applied:
                last = after.source_updated_at
                self.report.notes.append(
                    f"older than the snapshot applied ({last.isoformat() if last else '-'}), or it does not "
                    "count; kept for the history"
                )
        return unit.finish(self, user, amount=0, subscription_id=sid)

    def _see(
        self, unit: UnitOfWork, link: SubscriptionLink, s: Subscription, sync: SyncSubscription, end: datetime | None
    ) -> None:
        """Puts the snapshot on the link's timeline if it is the one the
        ledger keeps for its second (the tie rule): invoices find their plan
        in the same snapshot the subscription shows, whatever arrived first."""
        mine = sync.snapshot()
        kept = next((x for x in s.provider_snapshots if x.at == mine.at), None)
        if kept is None or kept.position == mine.position:
            link.see(self.source_updated_at, self.variant_id, end, unit.now)

    def _checkout(self, unit: UnitOfWork, link: SubscriptionLink, order_id: str) -> None:
        """Records the order that started the subscription, both ways: on
        the link, and the subscription on the order's Checkout; a refund of
        the order seen before the subscription is copied onto the link."""
        link.see_order(order_id, unit.now)
        checkout = open_checkout(unit, order_id)
        checkout.see_subscription(self.ls_subscription_id, unit.now)
        if checkout.ls_subscription_id == self.ls_subscription_id and link.order_id == order_id:
            link.see_order_refund(checkout.refunded, checkout.total, unit.now)

    def _replace(self, unit: UnitOfWork, user: UUID) -> None:
        """Records on the replaced subscription's link that this one replaced
        it, so that its own snapshots, whenever they arrive, end it then."""
        assert self.replaces is not None and self.created_at is not None
        old = unit.aggregate(subscription_link_id(self.replaces), SubscriptionLink)
        if old is None:
            old = SubscriptionLink._create(
                SubscriptionLink.Linked,
                id=subscription_link_id(self.replaces),
                ls_subscription_id=self.replaces,
                customer_id=self.customer_id,
                user_id=user,
                timestamp=unit.now,
            )
            unit.add(old)
        if old.user_id == user:  # a subscription never ends another user's
            old.replace_by(self.ls_subscription_id, self.created_at, unit.now)

    def _fields(self) -> dict[str, Any]:
        fields = {
            "variant": self.variant_id,
            "status": str(self.status),
            "start": self.period_start,
            "end": self.period_end,
            "trial": self.trial_ends_at,
            "cancel": self.cancel_at_period_end,
            "updated": self.source_updated_at,
        }
        if self.pause_mode != PauseMode.VOID:  # absent when void: the keys recorded before modes existed
            fields["pause"] = str(self.pause_mode)
        return fields


# ------------------------------------------------------------------- invoices


@dataclass(frozen=True)
class ApplyInvoice(Command):
    """A subscription invoice (``data.type`` subscription-invoices): grants
    the credits a paid invoice pays for, once; a failed payment makes the
    subscription past_due; a growing refunded amount claws credits back."""

    name: ClassVar[str] = "lemonsqueezy_invoice"
    hints: ClassVar[frozenset[str]] = frozenset({"catalog", "report", "refund_policy", "hold_window_s"})
    invoice_id: str = field(kw_only=True)
    ls_subscription_id: str = field(kw_only=True)
    customer_id: str = field(kw_only=True)
    payment_failed: bool = field(kw_only=True)
    billing_reason: Literal["initial", "renewal", "updated"] = field(kw_only=True)
    status: str = field(kw_only=True)
    currency: str = field(kw_only=True)
    total: int = field(kw_only=True)
    refunded_amount: int = field(kw_only=True)
    created_at: datetime = field(kw_only=True)
    updated_at: datetime = field(kw_only=True)
    custom_user: UUID | None = field(kw_only=True)
    catalog: Catalog = field(default=Catalog(), kw_only=True, compare=False)
    refund_policy: RefundPolicy = field(default=RefundPolicy(), kw_only=True, compare=False)
    hold_window_s: int = field(default=DEFAULT_HOLD_WINDOW_S, kw_only=True, compare=False)
    report: Report = field(default_factory=Report, kw_only=True, compare=False)

    def reads(self) -> tuple[list[UUID], list[UUID]]:
        ids = [
            subscription_link_id(self.ls_subscription_id),
            payment_id("invoice", self.invoice_id),
            record_id_for(grant_key("invoice", self.invoice_id)),
        ]
        if self.payment_failed:
            ids.append(ledger_subscription_id(self.ls_subscription_id))
        return ids, [self.custom_user] if self.custom_user is not None else []

    def apply(self, unit: UnitOfWork) -> Receipt:
        self.report.reset()
        link_id = subscription_link_id(self.ls_subscription_id)
        unit.prefetch(*self.reads())
        link = unit.aggregate(link_id, SubscriptionLink)
        if link is None or not link.timeline:
            raise Held(f"subscription {self.ls_subscription_id}", "no snapshot of the subscription seen yet")
        user = resolve_user(unit, self.custom_user, link, self.customer_id, f"subscription {self.ls_subscription_id}")
        payment = unit.aggregate(payment_id("invoice", self.invoice_id), Payment)
        if self.status in PAID_STATUSES and (payment is None or payment.granted is None):
            payment = open_payment(unit, "invoice", self.invoice_id, user, self.total, self.currency)
            self._grant(unit, link, payment)
        if self.payment_failed:
            self._past_due(unit, user)
        # The initial invoice is the payment of the subscription's checkout
        # order: a refund of that order (seen first, or only) counts as its own.
        refunded = max(self.refunded_amount, self._order_refund(unit, link))
        if payment is not None:
            refund(
                unit,
                payment,
                refunded,
                self.refund_policy,
                self.report,
                f"refund of Lemon Squeezy invoice {self.invoice_id}",
            )
        net = self.report.granted - self.report.clawed
        return unit.finish(self, user, amount=net, subscription_id=ledger_subscription_id(self.ls_subscription_id))

    def _order_refund(self, unit: UnitOfWork, link: SubscriptionLink) -> int:
        """For the initial invoice of a subscription whose order is known:
        records on the link that this invoice is the order's charge, and
        returns the order's largest refund seen (kept on the link), as a
        refunded amount of this invoice; 0 for any other invoice."""
        if self.billing_reason != "initial" or link.order_id is None:
            return 0
        link.see_initial_invoice(self.invoice_id, unit.now)
        if link.initial_invoice_id != self.invoice_id:
            return 0
        if link.order_refunded > 0 and not link.order_pays(self.total):
            self.report.notes.append(not_the_same_charge(link, self.invoice_id, self.total))
        return link.order_refund_of(self.total)

    # -- the grant ---------------------------------------------------------------

    def _grant(self, unit: UnitOfWork, link: SubscriptionLink, payment: Payment) -> None:
        replaced = link.replaced_at
        if replaced is not None and self.created_at >= replaced:
            # The customer moved to another subscription: its invoices grant, this one's no more.
            self.report.notes.append(
                f"subscription {self.ls_subscription_id} was replaced by {link.replaced[0] if link.replaced else '?'} "
                f"at {replaced.isoformat()}; nothing granted"
            )
            record_grant_none(unit, payment, self.report)
            return
        entries = link.entries()
        entry = self._entry(entries, unit.now)
        plan, cycle = plan_for(unit, self.catalog, entry.variant_id)
        terms = plan.terms
        key = grant_key("invoice", self.invoice_id)
        change: Credited | None = None
        if self.billing_reason == "updated":
            amount, period_end, change = self._upgrade(unit, link, entries, entry, plan, cycle)
            kind = CreditKind.SUBSCRIPTION_GRANT
            what = f"plan change to {terms.display_name}"
        else:
            amount, period_end = self._period_credits(unit, payment, terms.credits), add_cycle(self.created_at, cycle)
            kind = CreditKind.SUBSCRIPTION_GRANT if self.billing_reason == "initial" else CreditKind.SUBSCRIPTION_RENEW
            what = f"{terms.display_name} plan, {self.billing_reason}"
        expires_at = grant_expiry(unit.policy, period_end)
        granted = record_grant(
            unit,
            payment,
            amount=amount,
            kind=kind,
            key=key,
            expires_at=expires_at,
            plan=terms.name,
            description=f"{what} (Lemon Squeezy invoice {self.invoice_id})",
            report=self.report,
        )
        if change is not None and granted > 0:
            link.credit_upgrade(change, unit.now)

    def _entry(self, entries: list[Seen], now: datetime) -> Seen:
        """The snapshot describing the subscription when the invoice was
        created. Lemon Squeezy sends a snapshot with every invoice (created,
        renews_at moved, variant changed), seconds apart: the snapshots within
        SLACK of the invoice describe it, whatever else arrived. Until one
        has arrived the invoice waits (at most the hold window), since a
        snapshot that changed the plan may still be in flight."""
        near = [e for e in entries if abs(e.updated_at - self.created_at) <= SLACK]
        if not near and self._young(now):
            raise Held(
                f"subscription {self.ls_subscription_id}",
                f"waiting for the subscription's snapshot from around {self.created_at.isoformat()}",
            )
        pool = near or entries
        # A plan-change invoice follows the change; the change's snapshot may
        # carry a slightly later updated_at than the invoice.
        limit = self.created_at + SLACK if self.billing_reason == "updated" else self.created_at
        before = [e for e in pool if e.updated_at <= limit]
        return before[-1] if before else pool[0]

    def _young(self, now: datetime) -> bool:
        return now - self.created_at < timedelta(seconds=self.hold_window_s)

    def _period_credits(self, unit: UnitOfWork, payment: Payment, credits: int) -> int:
        cap = rollover_cap(unit.policy)
        if cap is None:
            return credits
        unspent = unspent_subscription_credits(unit.account(payment.user_id, open_missing=True))
        return rollover_allowance(cap, unspent, credits)

    def _upgrade(
        self, unit: UnitOfWork, link: SubscriptionLink, entries: list[Seen], entry: Seen, new: Plan, cycle: BillingCycle
    ) -> tuple[int, datetime, Credited | None]:
        """What a plan-change invoice grants, and the change it credits: the
        ledger's upgrade policy applied to the plans before and after the
        change. The change is where the subscription's run of the new variant
        begins on the timeline; it must be near the invoice, or the invoice
        prorates something else (a quantity change) and grants nothing. A
        change is credited once: another invoice near it (a quantity change
        within the hour, in either order) grants nothing."""
        # A past_due snapshot keeps the period of the one before it (no period end of its own).
        ends = [e.period_end for e in entries if e.updated_at <= entry.updated_at and e.period_end is not None]
        period_end = ends[-1] if ends else None
        if period_end is None or period_end <= self.created_at:
            period_end = add_cycle(self.created_at, cycle)
        before = [e for e in entries if e.updated_at <= entry.updated_at]
        start = len(before) - 1
        while start > 0 and before[start - 1].variant_id == entry.variant_id:
            start -= 1
        if start == 0 and self._young(unit.now):
            raise Held(
                f"subscription {self.ls_subscription_id}",
                "waiting for a snapshot from before the plan change this invoice prorates",
            )
        if start == 0:
            self.report.notes.append("no earlier plan of the subscription is known; nothing granted for the change")
            return 0, period_end, None
        if abs(before[start].updated_at - self.created_at) > CHANGE_WINDOW:
            self.report.notes.append("no plan change near this invoice; nothing granted")
            return 0, period_end, None
        credited = self._credited(link, entries, start)
        if credited is not None:
            self.report.notes.append(
                f"the plan change at {credited.change_at.isoformat()} was credited by invoice "
                f"{credited.invoice_id}; nothing granted"
            )
            return 0, period_end, None
        old, _ = plan_for(unit, self.catalog, before[start - 1].variant_id)
        if new.terms.tier_level <= old.terms.tier_level:
            self.report.notes.append(f"{old.terms.name} -> {new.terms.name} is not an upgrade; nothing granted")
            return 0, period_end, None
        # The upgrades of one period add up to one upgrade, from the lowest
        # plan any of them left to the highest any reached: what the others
        # credited is taken off. Else a change whose snapshot came after a
        # later change's invoice would be credited from too low a plan
        # (starter -> pro -> studio granting studio - starter, then pro -
        # starter again), and a round trip through a downgrade (which Lemon
        # Squeezy credits back) would grant the same upgrade twice.
        period_start = minus_cycle(period_end, cycle)
        low, high, credited_before = old.terms.credits, new.terms.credits, 0
        for earlier in link.credited_changes():
            if period_start <= earlier.change_at < period_end:
                was = plan_for(unit, self.catalog, earlier.from_variant)[0].terms.credits
                became = plan_for(unit, self.catalog, earlier.to_variant)[0].terms.credits
                low, high, credited_before = min(low, was), max(high, became), credited_before + became - was
        left = high - low - credited_before
        if left <= 0:
            self.report.notes.append(
                f"the upgrades to {new.terms.name} in this period were credited before; nothing granted"
            )
            return 0, period_end, None
        difference = upgrade_grant(unit.policy, 0, left, period_start, period_end, self.created_at)
        change = Credited(before[start].updated_at, before[start - 1].variant_id, entry.variant_id, self.invoice_id)
        return difference, period_end, change

    @staticmethod
    def _credited(link: SubscriptionLink, entries: list[Seen], start: int) -> Credited | None:
        """The credited change within the run of snapshots of one variant that
        begins at ``entries[start]``, if any. A run, not one time: a snapshot of
        the change that arrives after a later one of the same variant moves the
        run's first time, and must not make the change look new."""
        variant = entries[start].variant_id
        end = start
        while end + 1 < len(entries) and entries[end + 1].variant_id == variant:
            end += 1
        first, last = entries[start].updated_at, entries[end].updated_at
        for credited in link.credited_changes():
            if credited.to_variant == variant and first <= credited.change_at <= last:
                return credited
        return None

    # -- a failed payment --------------------------------------------------------

    def _past_due(self, unit: UnitOfWork, user: UUID) -> None:
        """past_due, as a status-only snapshot dated by the invoice: the
        ledger places it among the subscription's snapshots by that time, so
        it loses to any newer snapshot (a recovery), counts only if the
        subscription was active or trialing then, and takes its plan and
        period from the snapshot before it, whichever arrives first."""
        sid = ledger_subscription_id(self.ls_subscription_id)
        s = unit.aggregate(sid, Subscription)
        if s is None:
            return
        version = s.version
        sync = SyncSubscription(
            key=f"lemonsqueezy:invoice:{self.invoice_id}:past_due:{self.updated_at.isoformat()}",
            subscription_id=sid,
            user_id=user,
            plan=s.plan,
            billing_cycle=BillingCycle(s.billing_cycle),
            status=Status.PAST_DUE,
            period_start=s.period_start,
            period_end=s.period_end,
            trial_ends_at=s.trial_ends_at,
            cancel_at_period_end=s.cancel_at_period_end,
            source_updated_at=self.updated_at,
            external_id=self.ls_subscription_id,
            customer_id=self.customer_id,
            provider=PROVIDER,
            status_only=True,
        )
        if not unit.recorded(sync.key):
            sync.apply(unit)
            self.report.applied = s.version > version and s.source_updated_at == self.updated_at


# --------------------------------------------------------------------- orders


@dataclass(frozen=True)
class ApplyOrder(Command):
    """An order: a credit pack (a one-time variant configured as one) grants
    its credits once when paid and is clawed back when refunded; the order
    of a plan variant (the checkout that starts a subscription) grants
    nothing (its initial invoice does), and its refund claws back what that
    invoice granted; a paid order of any other variant raises
    UnconfiguredPack."""

    name: ClassVar[str] = "lemonsqueezy_order"
    hints: ClassVar[frozenset[str]] = frozenset({"pack_credits", "plan_variant", "refund_policy", "report"})
    order_id: str = field(kw_only=True)
    customer_id: str = field(kw_only=True)
    status: str = field(kw_only=True)
    variant_id: str = field(kw_only=True)
    quantity: int = field(kw_only=True)
    currency: str = field(kw_only=True)
    total: int = field(kw_only=True)
    refunded_amount: int = field(kw_only=True)
    custom_user: UUID | None = field(kw_only=True)
    pack_credits: int | None = field(default=None, kw_only=True, compare=False)
    plan_variant: bool = field(default=False, kw_only=True, compare=False)
    refund_policy: RefundPolicy = field(default=RefundPolicy(), kw_only=True, compare=False)
    report: Report = field(default_factory=Report, kw_only=True, compare=False)

    def reads(self) -> tuple[list[UUID], list[UUID]]:
        if self.pack_credits is None:
            ids = [customer_link_id(self.customer_id)]
            if self.plan_variant and self.refunded_amount > 0:
                ids.append(checkout_id(self.order_id))
            return ids, []
        ids = [
            customer_link_id(self.customer_id),
            payment_id("order", self.order_id),
            record_id_for(grant_key("order", self.order_id)),
        ]
        return ids, [self.custom_user] if self.custom_user is not None else []

    def apply(self, unit: UnitOfWork) -> Receipt:
        self.report.reset()
        if self.pack_credits is None:
            return self._not_a_pack(unit)
        unit.prefetch(*self.reads())
        user = resolve_user(unit, self.custom_user, None, self.customer_id, f"customer {self.customer_id}")
        learn_customer(unit, self.customer_id, user)
        payment = unit.aggregate(payment_id("order", self.order_id), Payment)
        if self.status in PAID_STATUSES and (payment is None or payment.granted is None):
            payment = open_payment(unit, "order", self.order_id, user, self.total, self.currency)
            record_grant(
                unit,
                payment,
                amount=self.pack_credits * self.quantity,
                kind=CreditKind.PURCHASE,
                key=grant_key("order", self.order_id),
                expires_at=None,
                plan=None,
                description=f"credit pack {self.variant_id} x {self.quantity} (Lemon Squeezy order {self.order_id})",
                report=self.report,
            )
        if payment is not None:
            description = f"refund of Lemon Squeezy order {self.order_id}"
            refund(unit, payment, self.refunded_amount, self.refund_policy, self.report, description)
        return unit.finish(self, user, amount=self.report.granted - self.report.clawed)

    def _not_a_pack(self, unit: UnitOfWork) -> Receipt:
        if not self.plan_variant and self.status in PAID_STATUSES:
            raise UnconfiguredPack(self.order_id, self.variant_id)
        if self.custom_user is not None:
            learn_customer(unit, self.customer_id, self.custom_user)
        if self.plan_variant and self.refunded_amount > 0:
            return self._checkout_refund(unit)
        if self.plan_variant:
            self.report.notes.append("a subscription's checkout order: its invoices grant the credits")
        else:
            self.report.notes.append(f"variant {self.variant_id} is not a configured credit pack; nothing granted")
        return unit.finish(self, self.custom_user, amount=0)

    def _checkout_refund(self, unit: UnitOfWork) -> Receipt:
        """A refund of a subscription's checkout order: its charge is the
        subscription's initial invoice, whose credits come back (refund
        policy) by the growth of the refund since the last one seen of
        either, so a refund of the invoice as well takes nothing twice. The
        refund is recorded on the order's Checkout and the subscription's
        link; an initial invoice applied later claws it back then."""
        unit.prefetch(*self.reads())
        checkout = open_checkout(unit, self.order_id)
        checkout.see_refund(self.refunded_amount, self.total, unit.now)
        sid = checkout.ls_subscription_id
        link = None if sid is None else unit.aggregate(subscription_link_id(sid), SubscriptionLink)
        if link is not None:
            link.see_order_refund(checkout.refunded, checkout.total, unit.now)
        invoice = None if link is None else link.initial_invoice_id
        payment = None if invoice is None else unit.aggregate(payment_id("invoice", invoice), Payment)
        if link is None or invoice is None or payment is None or payment.granted is None:
            self.report.notes.append(
                "a refund of a subscription's checkout order: recorded; its credits come back when the "
                "subscription's initial invoice is applied (or refunded, if it was applied before)"
            )
            return unit.finish(self, self.custom_user, amount=0)
        if not link.order_pays(payment.total):
            self.report.notes.append(not_the_same_charge(link, invoice, payment.total))
            return unit.finish(self, payment.user_id, amount=0)
        description = f"refund of Lemon Squeezy invoice {invoice}"  # as the invoice's own refund says
        refund(unit, payment, link.order_refund_of(payment.total), self.refund_policy, self.report, description)
        return unit.finish(self, payment.user_id, amount=-self.report.clawed)
