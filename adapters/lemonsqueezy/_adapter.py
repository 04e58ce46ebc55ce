"""The adapter: Lemon Squeezy as a provider of the webhook kit.

``Processor`` is a ``adapters.webhooks.Pipeline`` that is its own
``Provider``: it checks Lemon Squeezy's signature, parses its payloads and
turns them into ledger commands; the kit stores, applies once, releases held
deliveries and retries. It needs the signing secret to ingest, and to apply
a stored delivery again (retries and links check each row's seal), not to
reconcile. ``LemonSqueezy`` is the endpoint's receiver: a ``Processor`` with
a signing secret.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from uuid import UUID

from pydantic import ValidationError

from adapters.webhooks import (
    DEFAULT_STALE_AFTER_S,
    IGNORED_PREFIX,
    Event,
    Execute,
    Held,
    InboxRow,
    IngestResult,
    Outcome,
    Pipeline,
    RefundPolicy,
    RetryReport,
    attempt,
    header,
)
from ledger import (
    MAX_CREDITS,
    BillingCycle,
    ConfigurationError,
    InvalidArgument,
    Ledger,
    PauseMode,
    Receipt,
)
from ledger import SubscriptionStatus as Status
from ledger.extension import Plan, check_user_id

from ._effects import (
    DEFAULT_HOLD_WINDOW_S,
    PROVIDER,
    STATUS_MAP,
    ApplyInvoice,
    ApplyOrder,
    ApplySubscription,
    Catalog,
    LinkCustomer,
    Report,
    UnknownVariant,
    canonical_id,
    content_key,
    minus_cycle,
)
from ._payloads import (
    MAX_BODY_BYTES,
    MAX_DEPTH,
    Envelope,
    InvoiceAttributes,
    OrderAttributes,
    SubscriptionAttributes,
    describe_error,
    envelope_of,
    invoice_of,
    is_test_flag,
    order_of,
    parse_json,
    subscription_of,
)
from ._signature import SIGNATURE_HEADER, check_secret, verify_with_key
from ._state import CustomerLink, customer_link_id, subscription_link_id

log = logging.getLogger("adapters.lemonsqueezy")

HARD_MAX_BODY_BYTES = 16 * 1024 * 1024
CATALOG_REFRESH_S = 1.0

C = TypeVar("C", ApplySubscription, ApplyInvoice, ApplyOrder)


#: The seed's ``webhook_events.source`` of Lemon Squeezy deliveries.
SOURCE = PROVIDER


@dataclass(frozen=True)
class Customer:
    """Who a Lemon Squeezy customer is, as its events say: what a host's
    ``resolve_user`` is given to find the ledger user."""

    customer_id: str
    email: str | None
    name: str | None
    test_mode: bool


#: The host's answer to "which user is this customer?": a user id, or None
#: (not known yet: the delivery is held until a link or a later answer).
UserResolver = Callable[[Customer], UUID | None]
#: How many held deliveries a link runs at once, at most (the rest: `webhooks retry`).
MAX_RELEASED_BY_LINK = 500


@dataclass
class LinkReport:
    """What linking a customer did: whether the link is new, and what became
    of the deliveries that were held for it."""

    customer_id: str
    user_id: UUID
    linked: bool
    released: RetryReport = field(default_factory=RetryReport)


def load_catalog(ledger: Ledger) -> Catalog:
    """Every variant id any revision of any plan listed, with its plan and
    billing cycle; a later revision wins. Read from the event log, not the
    plans view, which may lag."""
    variants: dict[str, tuple[str, str]] = {}
    for event in ledger.scan([Plan.Defined.TOPIC, Plan.Revised.TOPIC]):
        terms: dict[str, Any] = event.terms
        ids: dict[str, Any] = terms.get("provider_ids", {}).get(SOURCE, {})
        for cycle in ("monthly", "yearly"):
            variant = ids.get(f"variant_{cycle}")
            if variant:
                variants[canonical_id(str(variant))] = (str(terms["name"]), cycle)
    return Catalog(tuple((v, plan, cycle) for v, (plan, cycle) in sorted(variants.items())))


def snapshot_period(a: SubscriptionAttributes, cycle: BillingCycle) -> tuple[Status, Any, Any, Any, bool]:
    """(status, period_start, period_end, trial_ends_at, cancel_at_period_end)
    of a snapshot. The payload has no period start: it is one billing cycle
    before the period end, and never before the subscription was created.

    For past_due and unpaid, ``renews_at`` is the next charge attempt, not
    the period's end: ApplySubscription keeps the period of the subscription
    as last applied, and uses this one only for a subscription never seen."""
    status = STATUS_MAP[a.status]
    if a.status == "on_trial":
        end = a.trial_ends_at or a.renews_at or a.updated_at
    elif a.status in ("cancelled", "expired"):
        end = a.ends_at or a.renews_at or a.updated_at
    else:
        resumes = a.pause.resumes_at if a.pause is not None else None
        end = a.renews_at or a.ends_at or resumes or a.updated_at
    start = a.created_at if a.status == "on_trial" else max(a.created_at, minus_cycle(end, cycle))
    start = min(start, end)
    cancel = a.status == "cancelled" or (a.cancelled and a.status != "expired")
    return status, start, end, a.trial_ends_at, cancel


def refunded_level(status: str, refunded: bool, refunded_amount: int, total: int) -> int:
    """The refunded amount. A full refund (status ``refunded``, or a
    ``refunded`` flag with ``refunded_amount`` reaching the total) counts as
    the whole total, and as 1 for a free order, so that its credits are
    clawed back too. Anything else, ``partial_refund`` with the flag set
    included, is ``refunded_amount``."""
    if status == "refunded" or (refunded and refunded_amount >= total):
        return max(refunded_amount, total, 1)
    return refunded_amount


def custom_user(envelope: Envelope) -> UUID | None:
    if not envelope.has_custom_user_id:
        return None
    value = (envelope.meta.custom_data or {})["user_id"]
    if not isinstance(value, str):
        raise InvalidArgument(f"meta.custom_data.user_id must be a UUID string, got {type(value).__name__}")
    try:
        user = UUID(value)
    except ValueError:
        raise InvalidArgument(f"meta.custom_data.user_id {value[:60]!r} is not a UUID") from None
    return check_user_id(user, "meta.custom_data.user_id")


def _packs(credit_packs: Mapping[Any, int]) -> dict[str, int]:
    packs = {}
    for variant, credits in credit_packs.items():
        key = str(variant)
        if not key.isdigit() or int(key) == 0:
            raise ConfigurationError(f"credit pack variant ids are Lemon Squeezy ids (digits), got {variant!r}")
        key = canonical_id(key)
        if type(credits) is not int or not 1 <= credits <= MAX_CREDITS:
            raise ConfigurationError(f"credit pack {key} must grant 1..{MAX_CREDITS} credits (an int), got {credits!r}")
        packs[key] = credits
    return packs


class Processor(Pipeline):
    """Applies stored deliveries to the ledger and records the outcome: the
    kit's pipeline, with Lemon Squeezy as its provider. ``signing_secret``
    (needed to ``ingest``, ``retry`` and ``link_customer``), ``max_body_bytes`` and ``max_depth``: see
    ``LemonSqueezy``."""

    #: The provider's name in the kit's messages.
    title = "Lemon Squeezy"

    def __init__(
        self,
        ledger: Ledger,
        *,
        test_mode: bool = False,
        credit_packs: Mapping[Any, int] | None = None,
        refund_policy: RefundPolicy | None = None,
        hold_window_s: int = DEFAULT_HOLD_WINDOW_S,
        stale_after_s: int = DEFAULT_STALE_AFTER_S,
        resolve_user: UserResolver | None = None,
        signing_secret: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_depth: int = MAX_DEPTH,
    ) -> None:
        self._key = None if signing_secret is None else check_secret(signing_secret)
        if type(max_body_bytes) is not int or not 1024 <= max_body_bytes <= HARD_MAX_BODY_BYTES:
            raise ConfigurationError(f"max_body_bytes must be an int of 1024..{HARD_MAX_BODY_BYTES}")
        if type(max_depth) is not int or not 8 <= max_depth <= 256:
            raise ConfigurationError("max_depth must be an int of 8..256")
        self.source = SOURCE
        self.max_body_bytes = max_body_bytes
        self.max_depth = max_depth
        if resolve_user is not None and not callable(resolve_user):
            raise ConfigurationError("resolve_user must be a callable: Customer -> UUID | None")
        if ledger.credit_policy.auto_renew:
            raise ConfigurationError(
                "open the ledger with CreditPolicy(auto_renew=False): Lemon Squeezy's invoices renew "
                "subscriptions, and tick() renewing them too would grant a period twice"
            )
        if type(hold_window_s) is not int or not 0 <= hold_window_s <= 7 * 86_400:
            raise ConfigurationError("hold_window_s must be an int of 0..604800")
        super().__init__(ledger, self, test_mode=test_mode, stale_after_s=stale_after_s)
        self.credit_packs = _packs(credit_packs or {})
        self.refund_policy = refund_policy or RefundPolicy()
        self.hold_window_s = hold_window_s
        self.resolve_user = resolve_user
        self._catalog_lock = threading.Lock()
        self._catalog = load_catalog(ledger)
        self._catalog_loaded = time.monotonic()
        clash = sorted(v for v in self.credit_packs if self._catalog.find(v) is not None)
        if clash:
            raise ConfigurationError(f"variants {clash} are both credit packs and plan variants")

    # -- the catalog -----------------------------------------------------------

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    def refresh_catalog(self) -> Catalog:
        """Rereads the catalog, at most once a second (an unknown variant in a
        hostile or mistaken payload must not turn every delivery into a scan)."""
        with self._catalog_lock:
            if time.monotonic() - self._catalog_loaded >= CATALOG_REFRESH_S:
                self._catalog = load_catalog(self.ledger)
                self._catalog_loaded = time.monotonic()
            return self._catalog

    def _variant(self, variant_id: str) -> tuple[str, BillingCycle]:
        found = self._catalog.find(variant_id) or self.refresh_catalog().find(variant_id)
        if found is None:
            raise UnknownVariant(variant_id)
        return found

    # -- the provider (adapters.webhooks.Provider) -------------------------------

    def verify(self, raw_body: bytes, headers: Mapping[str, str]) -> str | None:
        if self._key is None:
            return "no signing secret is configured: give the Processor a signing_secret to ingest"
        signature = header(headers, SIGNATURE_HEADER)
        if signature is None:
            return "no X-Signature header"
        if not verify_with_key(raw_body, signature, self._key):
            return "X-Signature is not the HMAC-SHA256 of the body under the signing secret"
        return None

    def parse(self, raw_body: bytes) -> Event:
        return _event(parse_json(raw_body, max_bytes=self.max_body_bytes, max_depth=self.max_depth))

    def load(self, payload: dict[str, Any]) -> Event:
        return _event(payload)

    def apply(self, event: Event, execute: Execute) -> Outcome:
        """Applies an envelope; its commands run through the kit's group
        commit (``execute`` is ``self.group.execute``)."""
        envelope: Envelope = event.parsed
        try:
            return self._apply(envelope)
        except ValidationError as exc:
            return Outcome("failed", f"invalid {envelope.data.type} attributes: {describe_error(exc)}")

    def order(self, row: InboxRow) -> tuple[str, int]:
        return _source_time(row)

    def seal(self, data: bytes) -> str | None:
        """The HMAC-SHA256 of ``data`` under the signing secret, as
        X-Signature is of a body; None without a secret."""
        return None if self._key is None else hmac.new(self._key, data, hashlib.sha256).hexdigest()

    def _apply(self, envelope: Envelope) -> Outcome:
        kind = envelope.data.type
        if kind == "subscriptions":
            return self._subscription(envelope, subscription_of(envelope.data))
        if kind == "subscription-invoices":
            return self._invoice(envelope, invoice_of(envelope.data))
        if kind == "orders":
            return self._order(envelope, order_of(envelope.data))
        return Outcome("processed", f"{envelope.meta.event_name} ({kind}) is not used by the ledger")

    def _execute(self, build: Callable[[Catalog], C]) -> tuple[Receipt, C]:
        command = build(self._catalog)
        try:
            return self.group.execute(command), command
        except UnknownVariant:
            # A plan may have been defined since the catalog was read.
            command = build(self.refresh_catalog())
            return self.group.execute(command), command

    @staticmethod
    def _result(receipt: Receipt, report: Report, releases: tuple[str, ...], what: str) -> Outcome:
        # A replayed receipt means the engine's first attempt clashed with the
        # recorded key; that attempt's report is void.
        notes = [f"{what} was applied before; nothing changed"] if receipt.replayed else list(report.notes)
        return Outcome(
            "processed",
            "; ".join(notes) or None,
            releases,
            committed=not receipt.replayed,
            applied=report.applied and not receipt.replayed,
            replayed=receipt.replayed,
            granted=0 if receipt.replayed else report.granted,
            clawed=0 if receipt.replayed else report.clawed,
            user_id=receipt.user_id,
        )

    def apply_resource(self, resource: dict[str, Any], *, event_name: str = "reconcile") -> Outcome:
        """Applies a REST API resource (a subscription, invoice or order, as
        ``GET /v1/...`` returns it) like the event that would carry it. For
        the reconciler: nothing is stored in webhook_events."""
        try:
            envelope = Envelope.model_validate(
                {"meta": {"event_name": event_name, "test_mode": self.test_mode}, "data": resource}
            )
        except ValidationError as exc:
            return Outcome("failed", f"not a Lemon Squeezy resource: {describe_error(exc)}")
        flag = envelope.data.attributes.get("test_mode")  # a REST object has no meta: its own flag decides
        if is_test_flag(flag) != self.test_mode:
            return Outcome("ignored", f"{IGNORED_PREFIX}the resource's test_mode differs from this adapter's")
        event = Event(event_name, None, self.test_mode, resource, envelope)
        return attempt(lambda: self.apply(event, self.group.execute))

    def _subscription(self, envelope: Envelope, a: SubscriptionAttributes) -> Outcome:
        variant = str(a.variant_id)
        _, cycle = self._variant(variant)
        status, start, end, trial, cancel = snapshot_period(a, cycle)
        user = custom_user(envelope)
        if user is None:
            self._resolve(envelope, str(a.customer_id), subscription=envelope.data.id)
        pause = PauseMode(a.pause.mode) if a.status == "paused" and a.pause is not None else PauseMode.VOID
        replaces = a.migration_from_subscription_id
        fields: dict[str, Any] = {"variant": variant, "status": a.status, "start": start, "end": end}
        fields.update(
            {"trial": trial, "cancel": cancel, "updated": a.updated_at, "user": user, "customer": a.customer_id}
        )
        if pause != PauseMode.VOID:  # absent when void: the keys recorded before modes existed
            fields["pause"] = str(pause)
        if replaces is not None:  # absent when none: the keys recorded before migrations were read
            fields.update({"replaces": replaces, "created": a.created_at})
        receipt, command = self._execute(
            lambda catalog: ApplySubscription(
                key=content_key("subscription", envelope.data.id, fields),
                ls_subscription_id=envelope.data.id,
                customer_id=str(a.customer_id),
                variant_id=variant,
                status=status,
                period_start=start,
                period_end=end,
                trial_ends_at=trial,
                cancel_at_period_end=cancel,
                source_updated_at=a.updated_at,
                custom_user=user,
                pause_mode=pause,
                replaces=None if replaces is None else str(replaces),
                created_at=None if replaces is None else a.created_at,
                order_id=None if a.order_id is None else str(a.order_id),
                catalog=catalog,
            )
        )
        releases = (f"subscription {envelope.data.id}", f"customer {a.customer_id}", f"user {receipt.user_id}")
        return self._result(receipt, command.report, releases, "this snapshot")

    def _invoice(self, envelope: Envelope, a: InvoiceAttributes) -> Outcome:
        failed = envelope.meta.event_name == "subscription_payment_failed"
        refunded = refunded_level(a.status, a.refunded, a.refunded_amount, a.total)
        user = custom_user(envelope)
        fields: dict[str, Any] = {"status": a.status, "reason": a.billing_reason, "total": a.total}
        fields.update({"refunded": refunded, "failed": failed, "created": a.created_at, "updated": a.updated_at})
        fields["user"] = user
        receipt, command = self._execute(
            lambda catalog: ApplyInvoice(
                key=content_key("invoice", envelope.data.id, fields),
                invoice_id=envelope.data.id,
                ls_subscription_id=str(a.subscription_id),
                # No customer_id (an early documented shape): the invoice is
                # held until its subscription's snapshot, which names the user.
                customer_id="" if a.customer_id is None else str(a.customer_id),
                payment_failed=failed,
                billing_reason=a.billing_reason,
                status=a.status,
                currency=a.currency,
                total=a.total,
                refunded_amount=refunded,
                created_at=a.created_at,
                updated_at=a.updated_at,
                custom_user=user,
                catalog=catalog,
                refund_policy=self.refund_policy,
                hold_window_s=self.hold_window_s,
            )
        )
        return self._result(receipt, command.report, (), "this invoice")

    def _order(self, envelope: Envelope, a: OrderAttributes) -> Outcome:
        variant = str(a.first_order_item.variant_id)
        pack = self.credit_packs.get(variant)
        plan_variant = pack is None and (self._catalog.find(variant) or self.refresh_catalog().find(variant))
        refunded = refunded_level(a.status, a.refunded, a.refunded_amount, a.total)
        user = custom_user(envelope)
        if user is None and pack is not None:
            self._resolve(envelope, str(a.customer_id))
        fields: dict[str, Any] = {"status": a.status, "variant": variant, "quantity": a.first_order_item.quantity}
        fields.update({"total": a.total, "refunded": refunded, "user": user, "customer": a.customer_id})
        if pack is not None:
            # The configuration decides the effect: an order recorded before its
            # pack was configured is applied anew when re-sent after.
            fields["pack"] = pack
        receipt, command = self._execute(
            lambda _catalog: ApplyOrder(
                key=content_key("order", envelope.data.id, fields),
                order_id=envelope.data.id,
                customer_id=str(a.customer_id),
                status=a.status,
                variant_id=variant,
                quantity=a.first_order_item.quantity,
                currency=a.currency,
                total=a.total,
                refunded_amount=refunded,
                custom_user=user,
                pack_credits=pack,
                plan_variant=bool(plan_variant),
                refund_policy=self.refund_policy,
            )
        )
        releases = (f"customer {a.customer_id}",) if user is not None else ()
        return self._result(receipt, command.report, releases, "this order")

    # -- who a customer is --------------------------------------------------------

    def _resolve(self, envelope: Envelope, customer_id: str, *, subscription: str | None = None) -> None:
        """Asks the host's ``resolve_user`` who a customer is, once: only when
        no mapping exists (the subscription's or the customer's), and its
        answer is recorded as the customer's mapping at once, whatever then
        becomes of the delivery. None: not known yet (the delivery is held)."""
        if self.resolve_user is None:
            return
        if subscription is not None and self.ledger.read_aggregate(subscription_link_id(subscription)) is not None:
            return
        if isinstance(self.ledger.read_aggregate(customer_link_id(customer_id)), CustomerLink):
            return
        attributes = envelope.data.attributes
        email, name = attributes.get("user_email"), attributes.get("user_name")
        customer = Customer(
            customer_id=customer_id,
            email=email if isinstance(email, str) else None,
            name=name if isinstance(name, str) else None,
            test_mode=envelope.test_mode,
        )
        try:
            user = self.resolve_user(customer)
        except Exception as exc:  # the host's code: keep the delivery, say why, try again later
            log.exception("resolve_user failed for Lemon Squeezy customer %s", customer_id)
            raise Held(f"customer {customer_id}", f"resolve_user raised {type(exc).__name__}: {exc}") from None
        if user is None:
            return
        if not isinstance(user, UUID):
            raise InvalidArgument(
                f"resolve_user returned a {type(user).__name__} for customer {customer_id}, not a UUID"
            )
        self._link(customer_id, user)

    def _link(self, customer_id: str, user_id: UUID) -> Receipt:
        command = LinkCustomer(
            key=f"lemonsqueezy:customer:{customer_id}:user:{user_id}", customer_id=customer_id, user_id=user_id
        )
        return self.group.execute(command)

    def link_customer(self, customer_id: str | int, user_id: UUID) -> LinkReport:
        """Says which ledger user a Lemon Squeezy customer is, and applies
        at once the deliveries that were held until it was known (at most
        MAX_RELEASED_BY_LINK; ``webhooks retry`` runs any more). A customer
        keeps the user it was first linked to: another one raises
        CustomerLinked. Linking again to the same user changes nothing (and
        still runs what is held)."""
        text = str(customer_id).strip()
        if not text.isdigit() or int(text) == 0:
            raise InvalidArgument(f"a Lemon Squeezy customer id is a positive integer, got {str(customer_id)[:40]!r}")
        customer = canonical_id(text)
        self._require_seals()  # before the link: its held deliveries must then run
        receipt = self._link(customer, check_user_id(user_id))
        report = LinkReport(customer, user_id, linked=not receipt.replayed)
        self.run_held([f"customer {customer}"], report.released, limit=MAX_RELEASED_BY_LINK)
        return report


def _event(payload: dict[str, Any]) -> Event:
    envelope = envelope_of(payload)
    return Event(envelope.meta.event_name, envelope.meta.webhook_id, envelope.test_mode, payload, envelope)


def _source_time(row: InboxRow) -> tuple[str, int]:
    """When Lemon Squeezy changed the object; at the same time, snapshots
    first (invoices find their plan in them)."""
    data = row.payload.get("data")
    attributes = data.get("attributes") if isinstance(data, dict) else None
    updated = attributes.get("updated_at") if isinstance(attributes, dict) else None
    first = isinstance(data, dict) and data.get("type") == "subscriptions"
    return (updated if isinstance(updated, str) else "", 0 if first else 1)


class LemonSqueezy:
    """The Lemon Squeezy webhook adapter of a ledger.

    ``signing_secret``: the webhook's signing secret (required). ``test_mode``:
    apply test-mode events (and ignore live ones) instead of the reverse.
    ``credit_packs``: one-time product variants and the credits each unit
    grants. ``refund_policy``: what refunds claw back. ``hold_window_s``: how
    long an invoice waits for its subscription snapshot. ``max_body_bytes``
    and ``max_depth``: limits on what is parsed at all."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        signing_secret: str,
        test_mode: bool = False,
        credit_packs: Mapping[Any, int] | None = None,
        refund_policy: RefundPolicy | None = None,
        hold_window_s: int = DEFAULT_HOLD_WINDOW_S,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_depth: int = MAX_DEPTH,
        resolve_user: UserResolver | None = None,
    ) -> None:
        check_secret(signing_secret)  # required here: None is refused too
        self.ledger = ledger
        self.processor = Processor(
            ledger,
            test_mode=test_mode,
            credit_packs=credit_packs,
            refund_policy=refund_policy,
            hold_window_s=hold_window_s,
            resolve_user=resolve_user,
            signing_secret=signing_secret,
            max_body_bytes=max_body_bytes,
            max_depth=max_depth,
        )
        self.inbox = self.processor.inbox

    @property
    def test_mode(self) -> bool:
        return self.processor.test_mode

    @property
    def max_body_bytes(self) -> int:
        return self.processor.max_body_bytes

    @property
    def max_depth(self) -> int:
        return self.processor.max_depth

    def ingest(self, raw_body: bytes, headers: Mapping[str, str]) -> IngestResult:
        """Verifies, stores and applies one delivery (``Pipeline.ingest``).
        Never raises for anything a sender can put in a request."""
        return self.processor.ingest(raw_body, headers)

    def retry_failed(self, *, limit: int = 500, unsealed: bool = False) -> RetryReport:
        """``Pipeline.retry``: rows whose seal is missing or wrong are refused
        (``unsealed=True`` applies those stored before seals)."""
        return self.processor.retry(limit=limit, unsealed=unsealed)

    def link_customer(self, customer_id: str | int, user_id: UUID) -> LinkReport:
        """See Processor.link_customer."""
        return self.processor.link_customer(customer_id, user_id)
