"""A webhook simulator for host developers (``python -m ledger webhooks
trigger``): realistic, correctly signed Lemon Squeezy deliveries for every
event the adapter handles, built from the templates in ``templates/``
(whole bodies as Lemon Squeezy sends them, PHP-encoded), with fresh webhook
ids and the ids of the host's plan variants; and a whole subscription's life
in a valid order with consistent ids and dates (:meth:`Simulator.story`).

Ids that are not given are derived from the user (the customer, the
subscription), so that events triggered one at a time for the same user
belong to the same subscription; invoices and orders get fresh ids unless
given (a recovery or a refund names the invoice or order it is about).
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib import resources
from typing import Any
from uuid import UUID

from ledger import BillingCycle, InvalidArgument, Ledger
from ledger.extension import add_cycle

from ._signature import sign

#: The events the adapter handles, and the template each is built from.
SUBSCRIPTION_EVENTS = (
    "subscription_created",
    "subscription_updated",
    "subscription_plan_changed",
    "subscription_cancelled",
    "subscription_resumed",
    "subscription_expired",
    "subscription_paused",
    "subscription_unpaused",
)
INVOICE_EVENTS = (
    "subscription_payment_success",
    "subscription_payment_failed",
    "subscription_payment_recovered",
    "subscription_payment_refunded",
)
ORDER_EVENTS = ("order_created", "order_refunded")
EVENTS = (*ORDER_EVENTS, *SUBSCRIPTION_EVENTS, *INVOICE_EVENTS)
#: The Lemon Squeezy ids derived from a user lie in this range (real ids are smaller).
_DERIVED_BASE = 900_000_000
_DERIVED_SPAN = 90_000_000
#: How far apart a story's deliveries are sent in Lemon Squeezy's time.
_SECOND = timedelta(seconds=1)
_DAY = timedelta(days=1)


def php_json(value: Any) -> bytes:
    """JSON as Lemon Squeezy (PHP's ``json_encode``) writes it: compact,
    ``\\uXXXX`` for non-ASCII, ``\\/`` for ``/``. The signature is over these bytes."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).replace("/", "\\/").encode()


def template(kind: str) -> dict[str, Any]:
    """A shipped template: ``subscription``, ``subscription_invoice`` or ``order``."""
    text = resources.files(__package__).joinpath("templates", f"{kind}.json").read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def iso(moment: datetime | None) -> str | None:
    """Lemon Squeezy's time format: UTC, microseconds, ``Z``."""
    return None if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def derived_id(user_id: UUID, what: str) -> int:
    """A stable Lemon Squeezy id of the user's customer or subscription."""
    return _DERIVED_BASE + uuid.uuid5(user_id, what).int % _DERIVED_SPAN


def fresh_id() -> int:
    return _DERIVED_BASE + uuid.uuid4().int % _DERIVED_SPAN


@dataclass(frozen=True)
class Variant:
    """A plan's Lemon Squeezy variant: its id, plan, cycle and price in cents."""

    variant_id: int
    plan: str
    cycle: BillingCycle
    price_cents: int


def plan_variants(ledger: Ledger) -> dict[tuple[str, BillingCycle], Variant]:
    """Every plan's current Lemon Squeezy variants, from the ledger's catalog."""
    from ._adapter import load_catalog

    found: dict[tuple[str, BillingCycle], Variant] = {}
    for variant, plan, cycle in load_catalog(ledger).variants:
        terms = ledger.plan(plan)
        wanted = getattr(terms, f"lemon_squeezy_variant_id_{cycle}")
        if wanted is None or str(wanted) != variant:
            continue  # a variant of an earlier revision
        price = terms.monthly_price if cycle == "monthly" else terms.yearly_price
        found[(plan, BillingCycle(cycle))] = Variant(int(variant), plan, BillingCycle(cycle), _cents(price))
    return found


def _cents(price: Decimal) -> int:
    return int((price * 100).to_integral_value())


@dataclass(frozen=True)
class Delivery:
    """One webhook request: its event, when Lemon Squeezy would send it, and its exact bytes."""

    event_name: str
    at: datetime
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.body)
        return loaded

    @property
    def webhook_id(self) -> str:
        return str(self.payload["meta"]["webhook_id"])

    def headers(self, secret: str) -> dict[str, str]:
        """What Lemon Squeezy sends with it: the signature and the event name."""
        return {
            "Content-Type": "application/json",
            "User-Agent": "LemonSqueezy-Hookshot (simulated by pingvas-ledger)",
            "X-Event-Name": self.event_name,
            "X-Signature": sign(self.body, secret),
        }


@dataclass
class Simulator:
    """Builds deliveries for one customer. ``user_id`` goes to
    ``meta.custom_data.user_id`` (unless ``custom_data=False``: a checkout
    made without it); ``customer_id`` and ``subscription_id`` default to ids
    derived from the user."""

    user_id: UUID
    customer_id: int | None = None
    subscription_id: int | None = None
    test_mode: bool = False
    custom_data: bool = True
    email: str | None = None
    name: str = "Test Customer"
    new_webhook_id: Callable[[], str] = field(default=lambda: str(uuid.uuid4()))
    new_id: Callable[[], int] = field(default=fresh_id)

    def __post_init__(self) -> None:
        if not isinstance(self.user_id, UUID):
            raise InvalidArgument(f"user_id must be a UUID, not {type(self.user_id).__name__}", param="user_id")
        if self.customer_id is None:
            self.customer_id = derived_id(self.user_id, "lemonsqueezy customer")
        if self.subscription_id is None:
            self.subscription_id = derived_id(self.user_id, "lemonsqueezy subscription")
        for name in ("customer_id", "subscription_id"):
            value = getattr(self, name)
            if type(value) is not int or not 1 <= value < 2**53:
                raise InvalidArgument(f"{name} must be a positive integer (a Lemon Squeezy id)", param=name)
        if self.email is None:
            self.email = f"customer-{self.user_id.hex[:12]}@example.com"

    # -- the envelope ---------------------------------------------------------

    def _envelope(self, kind: str, event: str, resource_id: int, old_id: str) -> dict[str, Any]:
        payload = copy.deepcopy(template(kind))
        meta = payload["meta"]
        meta.update(event_name=event, test_mode=self.test_mode, webhook_id=self.new_webhook_id())
        if self.custom_data:
            meta["custom_data"] = {"user_id": str(self.user_id)}
        else:
            meta.pop("custom_data", None)
        payload["data"]["id"] = str(resource_id)
        # The links and urls name the resource: keep them consistent with its id.
        payload["data"]["links"] = _renamed(payload["data"].get("links", {}), old_id, str(resource_id))
        payload["data"]["relationships"] = _renamed(payload["data"].get("relationships", {}), old_id, str(resource_id))
        a = payload["data"]["attributes"]
        a.update(customer_id=self.customer_id, user_email=self.email, user_name=self.name, test_mode=self.test_mode)
        return payload

    def _delivery(self, event: str, at: datetime, payload: dict[str, Any]) -> Delivery:
        return Delivery(event, at, php_json(payload))

    # -- the three kinds of resource ---------------------------------------------

    def subscription(
        self,
        event: str,
        variant: Variant,
        *,
        updated: datetime,
        created: datetime,
        status: str = "active",
        renews_at: datetime | None = None,
        ends_at: datetime | None = None,
        trial_ends_at: datetime | None = None,
        cancelled: bool = False,
        pause: dict[str, Any] | None = None,
        order_id: int | None = None,
        at: datetime | None = None,
    ) -> Delivery:
        """A ``subscriptions`` snapshot, as every subscription_* event carries one."""
        _check_event(event, SUBSCRIPTION_EVENTS)
        assert self.subscription_id is not None
        payload = self._envelope("subscription", event, self.subscription_id, "880001")
        a = payload["data"]["attributes"]
        a.update(
            order_id=order_id or a["order_id"],
            variant_id=variant.variant_id,
            variant_name=f"{variant.plan.title()} - {variant.cycle}",
            status=status,
            status_formatted=status.replace("_", " ").title(),
            cancelled=cancelled,
            pause=pause,
            trial_ends_at=iso(trial_ends_at),
            billing_anchor=(renews_at or created).day,
            renews_at=iso(renews_at),
            ends_at=iso(ends_at),
            created_at=iso(created),
            updated_at=iso(updated),
        )
        item = a["first_subscription_item"]
        item.update(subscription_id=self.subscription_id, created_at=iso(created), updated_at=iso(updated))
        a["urls"] = _renamed(a["urls"], "880001", str(self.subscription_id))
        a["urls"] = _renamed(a["urls"], "770001", str(self.customer_id))
        return self._delivery(event, at or updated, payload)

    def invoice(
        self,
        event: str,
        *,
        invoice_id: int | None = None,
        reason: str = "initial",
        status: str = "paid",
        created: datetime,
        updated: datetime,
        total_cents: int,
        refunded_cents: int = 0,
        at: datetime | None = None,
    ) -> Delivery:
        """A ``subscription-invoices`` object: a payment, failed, recovered or refunded."""
        _check_event(event, INVOICE_EVENTS)
        invoice = invoice_id or self.new_id()
        payload = self._envelope("subscription_invoice", event, invoice, "550001")
        a = payload["data"]["attributes"]
        a.update(
            subscription_id=self.subscription_id,
            billing_reason=reason,
            status=status,
            status_formatted=status.replace("_", " ").title(),
            refunded=refunded_cents > 0,
            refunded_at=iso(updated) if refunded_cents else None,
            **_money(total_cents, refunded_cents),
            created_at=iso(created),
            updated_at=iso(updated),
        )
        a["urls"] = _renamed(a["urls"], "550001", str(invoice))
        return self._delivery(event, at or updated, payload)

    def order(
        self,
        event: str,
        variant_id: int,
        *,
        order_id: int | None = None,
        total_cents: int,
        created: datetime,
        updated: datetime | None = None,
        status: str = "paid",
        refunded_cents: int = 0,
        quantity: int = 1,
        product_name: str = "Pingvas Studio",
        at: datetime | None = None,
    ) -> Delivery:
        """An ``orders`` object: a subscription's checkout, or a credit pack."""
        _check_event(event, ORDER_EVENTS)
        order = order_id or self.new_id()
        payload = self._envelope("order", event, order, "660002")
        a = payload["data"]["attributes"]
        a.update(
            identifier=str(uuid.uuid5(self.user_id, f"order {order}")),
            order_number=order % 1_000_000,
            status=status,
            status_formatted=status.replace("_", " ").title(),
            refunded=refunded_cents > 0,
            refunded_at=iso(updated) if refunded_cents else None,
            **_money(total_cents, refunded_cents),
            created_at=iso(created),
            updated_at=iso(updated or created),
        )
        for key in ("setup_fee", "setup_fee_usd"):
            a[key] = 0
        a["first_order_item"].update(
            order_id=order,
            variant_id=variant_id,
            product_name=product_name,
            price=total_cents // max(quantity, 1),
            quantity=quantity,
            created_at=iso(created),
            updated_at=iso(created),
            test_mode=self.test_mode,
        )
        a["urls"] = {"receipt": f"https://app.lemonsqueezy.com/my-orders/{a['identifier']}?signature=simulated"}
        return self._delivery(event, at or updated or created, payload)

    # -- one event, as `webhooks trigger EVENT` sends it ------------------------

    def event(
        self,
        event: str,
        variant: Variant,
        *,
        at: datetime,
        created: datetime | None = None,
        invoice_id: int | None = None,
        order_id: int | None = None,
        reason: str = "initial",
        total_cents: int | None = None,
    ) -> Delivery:
        """Any handled event at ``at``, for a subscription to ``variant``
        (or, for an order, an order of that variant: a checkout, or a credit
        pack). The snapshot's status is the event's: created, updated,
        plan_changed, resumed and unpaused are active, renewing one cycle
        after ``at``; cancelled ends then; expired ended at ``at``; paused is
        a ``void`` pause."""
        _check_event(event, EVENTS)
        since = created or at
        renews = add_cycle(at, variant.cycle)
        total = variant.price_cents if total_cents is None else total_cents
        if event in ORDER_EVENTS:
            refunded = total if event == "order_refunded" else 0
            status = "refunded" if refunded else "paid"
            return self.order(
                event, variant.variant_id, order_id=order_id, total_cents=total, created=since, updated=at,
                status=status, refunded_cents=refunded,
            )  # fmt: skip
        if event in INVOICE_EVENTS:
            status, refunded = {
                "subscription_payment_success": ("paid", 0),
                "subscription_payment_failed": ("pending", 0),
                "subscription_payment_recovered": ("paid", 0),
                "subscription_payment_refunded": ("refunded", total),
            }[event]
            return self.invoice(
                event, invoice_id=invoice_id, reason=reason, status=status, created=since, updated=at,
                total_cents=total, refunded_cents=refunded,
            )  # fmt: skip
        snapshot: dict[str, Any] = {"status": "active", "renews_at": renews}
        if event == "subscription_cancelled":
            snapshot = {"status": "cancelled", "renews_at": renews, "ends_at": renews, "cancelled": True}
        elif event == "subscription_expired":
            snapshot = {"status": "expired", "renews_at": None, "ends_at": at, "cancelled": True}
        elif event == "subscription_paused":
            snapshot = {"status": "paused", "renews_at": renews, "pause": {"mode": "void", "resumes_at": None}}
        return self.subscription(event, variant, updated=at, created=since, order_id=order_id, **snapshot)

    # -- a whole life -----------------------------------------------------------

    def story(self, start: datetime, plan: Variant, upgrade: Variant) -> list[Delivery]:
        """A subscription's life from ``start``, in the order Lemon Squeezy
        sends it, each delivery at its time (``Delivery.at``): the checkout
        (order, subscription, first invoice); a renewal; a plan change to
        ``upgrade`` with its proration invoice; a failed renewal (past_due),
        recovered three days later; a renewal, refunded two days later; a
        cancellation; the expiry at the end of the paid period."""
        if plan.cycle != upgrade.cycle or upgrade.price_cents <= plan.price_cents:
            raise InvalidArgument("the upgrade must be a dearer plan of the same billing cycle", param="upgrade")
        s, cycle = start.astimezone(UTC).replace(microsecond=0), plan.cycle
        r1 = add_cycle(s, cycle)
        r2 = add_cycle(r1, cycle)
        r3 = add_cycle(r2, cycle)
        r4 = add_cycle(r3, cycle)
        change = r1 + 10 * _DAY
        order_id = self.new_id()
        out: list[Delivery] = []

        def snap(event: str, updated: datetime, variant: Variant, **kw: Any) -> None:
            kw.setdefault("at", updated + _SECOND)
            out.append(self.subscription(event, variant, updated=updated, created=s, order_id=order_id, **kw))

        def pay(event: str, created: datetime, reason: str, total: int, **kw: Any) -> int:
            invoice = kw.pop("invoice_id", None) or self.new_id()
            kw.setdefault("updated", created + _SECOND)
            kw.setdefault("at", kw["updated"] + _SECOND)
            out.append(self.invoice(event, invoice_id=invoice, reason=reason, created=created, total_cents=total, **kw))
            return invoice

        # The checkout: its order (no credits: the invoice grants them), the subscription, the first invoice.
        out.append(self.order("order_created", plan.variant_id, order_id=order_id, total_cents=plan.price_cents,
                              created=s, at=s + _SECOND))  # fmt: skip
        snap("subscription_created", s, plan, renews_at=r1)
        pay("subscription_payment_success", s + _SECOND, "initial", plan.price_cents)
        snap("subscription_updated", s + 4 * _SECOND, plan, renews_at=r1)
        # A renewal: the invoice, then the snapshot with the next renewal date.
        pay("subscription_payment_success", r1, "renewal", plan.price_cents)
        snap("subscription_updated", r1 + 3 * _SECOND, plan, renews_at=r2)
        # A plan change, invoiced at once (a proration for the rest of the period).
        snap("subscription_plan_changed", change, upgrade, renews_at=r2)
        snap("subscription_updated", change, upgrade, renews_at=r2)
        left = (r2 - change) / (r2 - r1)
        proration = round((upgrade.price_cents - plan.price_cents) * left)
        pay("subscription_payment_success", change + _SECOND, "updated", proration)
        snap("subscription_updated", change + 4 * _SECOND, upgrade, renews_at=r2)
        # A failed renewal: past_due, then the retried charge succeeds.
        failed = pay("subscription_payment_failed", r2, "renewal", upgrade.price_cents, status="pending")
        snap("subscription_updated", r2 + 3 * _SECOND, upgrade, status="past_due", renews_at=r2 + 3 * _DAY)
        recovered = r2 + 3 * _DAY
        pay("subscription_payment_recovered", r2, "renewal", upgrade.price_cents, invoice_id=failed,
            updated=recovered - _SECOND, at=recovered)  # fmt: skip
        snap("subscription_updated", recovered + _SECOND, upgrade, renews_at=r3)
        # A renewal, refunded two days later.
        refunded = pay("subscription_payment_success", r3, "renewal", upgrade.price_cents)
        snap("subscription_updated", r3 + 3 * _SECOND, upgrade, renews_at=r4)
        pay("subscription_payment_refunded", r3, "renewal", upgrade.price_cents, invoice_id=refunded,
            status="refunded", refunded_cents=upgrade.price_cents, updated=r3 + 2 * _DAY)  # fmt: skip
        # Cancelled (Lemon Squeezy sends subscription_cancelled and subscription_updated), then expired.
        cancel = r3 + 10 * _DAY
        for event in ("subscription_cancelled", "subscription_updated"):
            snap(event, cancel, upgrade, status="cancelled", renews_at=r4, ends_at=r4, cancelled=True)
        snap("subscription_expired", r4, upgrade, status="expired", ends_at=r4, cancelled=True)
        return out


def _check_event(event: str, allowed: tuple[str, ...]) -> None:
    if event not in allowed:
        raise InvalidArgument(f"{event!r} is not one of {', '.join(allowed)}", param="event")


def _money(total: int, refunded: int) -> dict[str, Any]:
    if type(total) is not int or total < 0 or type(refunded) is not int or not 0 <= refunded <= total:
        raise InvalidArgument("amounts are whole cents, 0 <= refunded <= total", param="total_cents")
    fields: dict[str, Any] = {}
    for suffix in ("", "_usd"):
        fields.update({f"subtotal{suffix}": total, f"total{suffix}": total, f"refunded_amount{suffix}": refunded})
        fields[f"discount_total{suffix}"] = 0
        fields[f"tax{suffix}"] = 0
    for name, cents in (("subtotal", total), ("total", total), ("refunded_amount", refunded)):
        fields[f"{name}_formatted"] = f"${cents / 100:,.2f}"
    return fields


def _renamed(value: Any, old: str, new: str) -> Any:
    """``value`` with ``/<old>`` (an id in a URL path or query) read as ``/<new>``."""
    if isinstance(value, dict):
        return {k: _renamed(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed(v, old, new) for v in value]
    if isinstance(value, str):
        return value.replace(f"/{old}", f"/{new}").replace(f"={old}", f"={new}")
    return value


def send(
    deliveries: list[Delivery], url: str, secret: str, *, timeout_s: float = 30.0, client: Any = None
) -> Iterator[tuple[Delivery, int, str]]:
    """POSTs each delivery in turn, as Lemon Squeezy does; yields it with the
    answer's status and text. Stops at a connection failure (``httpx.HTTPError``)."""
    import httpx

    own = client is None
    http = httpx.Client(timeout=timeout_s) if own else client
    try:
        for delivery in deliveries:
            response = http.post(url, content=delivery.body, headers=delivery.headers(secret))
            yield delivery, response.status_code, response.text
    finally:
        if own:
            http.close()
