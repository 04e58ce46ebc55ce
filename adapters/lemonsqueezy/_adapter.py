"""The adapter: verify and store a delivery, then apply it to the ledger.

``LemonSqueezy.ingest`` is what the webhook endpoint calls. ``Processor`` turns
stored deliveries into ledger commands; it needs no signing secret, so
``webhooks retry`` and the reconciler use it directly.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, TypeVar
from uuid import UUID

from pydantic import ValidationError

from adapters.webhooks import HELD_PREFIX, IGNORED_PREFIX, NOTE_PREFIX, GroupCommit, Inbox, InboxRow, IngestResult
from ledger import (
    MAX_CREDITS,
    BillingCycle,
    ConfigurationError,
    InvalidArgument,
    Ledger,
    LedgerError,
    PauseMode,
    Receipt,
)
from ledger import SubscriptionStatus as Status
from ledger.extension import Plan, check_user_id

from ._effects import (
    DEFAULT_HOLD_WINDOW_S,
    STATUS_MAP,
    ApplyInvoice,
    ApplyOrder,
    ApplySubscription,
    Catalog,
    Held,
    LinkCustomer,
    RefundPolicy,
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
    MalformedBody,
    OrderAttributes,
    SubscriptionAttributes,
    describe_error,
    envelope_of,
    invoice_of,
    order_of,
    parse_json,
    subscription_of,
)
from ._signature import SIGNATURE_HEADER, check_secret, verify_with_key
from ._state import CustomerLink, customer_link_id, subscription_link_id

log = logging.getLogger("adapters.lemonsqueezy")

#: Deliveries a processed event runs again because they waited for it.
MAX_RELEASED = 25
#: A ``received`` row older than this was left by a process that stopped.
DEFAULT_STALE_AFTER_S = 300
MAX_RETRY_BATCH = 5_000
RETRY_PASSES = 3
HARD_MAX_BODY_BYTES = 16 * 1024 * 1024
CATALOG_REFRESH_S = 1.0

C = TypeVar("C", ApplySubscription, ApplyInvoice, ApplyOrder)


#: The seed's ``webhook_events.source`` of Lemon Squeezy deliveries.
SOURCE = "lemon_squeezy"


@dataclass(frozen=True)
class Outcome:
    """What processing one event did. ``releases`` names what deliveries held
    for it wait on (``subscription 123``); the counts are the credits moved."""

    status: Literal["processed", "failed", "held", "ignored"]
    message: str | None = None
    releases: tuple[str, ...] = ()
    #: The ledger committed the effects (a synchronous commit after the row's).
    committed: bool = False
    applied: bool = False
    replayed: bool = False
    granted: int = 0
    clawed: int = 0
    user_id: UUID | None = None


@dataclass
class RetryReport:
    attempted: int = 0
    processed: int = 0
    failed: int = 0
    held: int = 0
    ignored: int = 0
    messages: list[tuple[UUID, str, str]] = field(default_factory=list)

    def add(self, row: InboxRow, outcome: Outcome) -> None:
        self.attempted += 1
        setattr(self, outcome.status, getattr(self, outcome.status) + 1)
        if outcome.status != "processed" and outcome.message:
            self.messages.append((row.row_id, row.event_type, outcome.message))


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
        for cycle in ("monthly", "yearly"):
            column = f"lemon_squeezy_variant_id_{cycle}"
            if terms.get(column):
                variants[canonical_id(str(terms[column]))] = (str(terms["name"]), cycle)
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


class Processor:
    """Applies stored deliveries to the ledger and records the outcome."""

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
    ) -> None:
        if resolve_user is not None and not callable(resolve_user):
            raise ConfigurationError("resolve_user must be a callable: Customer -> UUID | None")
        if ledger.credit_policy.auto_renew:
            raise ConfigurationError(
                "open the ledger with CreditPolicy(auto_renew=False): Lemon Squeezy's invoices renew "
                "subscriptions, and tick() renewing them too would grant a period twice"
            )
        if type(hold_window_s) is not int or not 0 <= hold_window_s <= 7 * 86_400:
            raise ConfigurationError("hold_window_s must be an int of 0..604800")
        if type(stale_after_s) is not int or not 10 <= stale_after_s <= 86_400:
            raise ConfigurationError("stale_after_s must be an int of 10..86400")
        self.ledger = ledger
        self.inbox = Inbox(ledger, SOURCE)
        #: Concurrent deliveries' commands share ledger transactions.
        self.group = GroupCommit(ledger)
        self.test_mode = bool(test_mode)
        self.credit_packs = _packs(credit_packs or {})
        self.refund_policy = refund_policy or RefundPolicy()
        self.hold_window_s = hold_window_s
        self.stale_after_s = stale_after_s
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

    # -- processing ------------------------------------------------------------

    def process(
        self, row: InboxRow, *, release: bool = True, envelope: Envelope | None = None, fresh: bool = False
    ) -> Outcome:
        """Applies one stored delivery and records the outcome; never raises
        for a bad delivery (the row says what went wrong). Then runs the
        deliveries that were held for what this one brought. ``envelope``:
        the row's payload already validated (by ingest). ``fresh``: the row
        was just stored, and must be on disk when this returns (see _inbox)."""
        outcome = self._outcome(row, envelope)
        now = self.ledger.clock.now()
        flush = fresh and not outcome.committed
        if outcome.status == "ignored":
            self.inbox.finish(
                row.row_id, status="received", message=outcome.message, now=now, attempted=False, flush=flush
            )
        elif outcome.status == "processed":
            message = None if outcome.message is None else NOTE_PREFIX + outcome.message
            waiting = self.inbox.finish(
                row.row_id,
                status="processed",
                message=message,
                now=now,
                flush=flush,
                then_held=outcome.releases if release else (),
                held_limit=MAX_RELEASED,
            )
            if waiting:
                self._release(waiting)
        else:
            self.inbox.finish(row.row_id, status="failed", message=outcome.message, now=now, flush=flush)
        return outcome

    def _outcome(self, row: InboxRow, envelope: Envelope | None) -> Outcome:
        if envelope is None:
            try:
                envelope = envelope_of(row.payload)
            except MalformedBody as exc:
                return Outcome("failed", f"stored payload is not a Lemon Squeezy event: {exc}")
        if envelope.test_mode != self.test_mode:
            mode = "test" if envelope.test_mode else "live"
            mine = "test" if self.test_mode else "live"
            return Outcome("ignored", f"{IGNORED_PREFIX}a {mode}-mode event, and this adapter is in {mine} mode")
        try:
            return self._apply(envelope)
        except Held as exc:
            return Outcome("held", f"{HELD_PREFIX}{exc}")
        except ValidationError as exc:
            return Outcome("failed", f"invalid {envelope.data.type} attributes: {describe_error(exc)}")
        except LedgerError as exc:
            return Outcome("failed", f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a bug or an outage: keep the delivery, say what happened
            log.exception("processing Lemon Squeezy delivery %s failed", row.row_id)
            return Outcome("failed", f"{type(exc).__name__}: {exc}")

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
        if (flag is not None and flag is not False) != self.test_mode:
            return Outcome("ignored", f"{IGNORED_PREFIX}the resource's test_mode differs from this adapter's")
        try:
            return self._apply(envelope)
        except Held as exc:
            return Outcome("held", f"{HELD_PREFIX}{exc}")
        except ValidationError as exc:
            return Outcome("failed", f"invalid {envelope.data.type} attributes: {describe_error(exc)}")
        except LedgerError as exc:
            return Outcome("failed", f"{type(exc).__name__}: {exc}")

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
        receipt = self._link(customer, check_user_id(user_id))
        report = LinkReport(customer, user_id, linked=not receipt.replayed)
        self._run_held([f"customer {customer}"], report.released)
        return report

    def _run_held(self, waits_for: list[str], report: RetryReport) -> None:
        """Runs the deliveries held for ``waits_for``, and those held for what
        they bring, until none is left (at most MAX_RELEASED_BY_LINK)."""
        done: set[UUID] = set()
        while waits_for and len(done) < MAX_RELEASED_BY_LINK:
            rows = [r for r in self.inbox.held(waits_for, limit=MAX_RELEASED_BY_LINK) if r.row_id not in done]
            rows = [r for r in rows if r.test_mode == self.test_mode][: MAX_RELEASED_BY_LINK - len(done)]
            rows.sort(key=_source_time)
            waits_for = []
            for row in rows:
                done.add(row.row_id)
                outcome = self.process(row, release=False)
                report.add(row, outcome)
                if outcome.status == "processed":
                    waits_for.extend(outcome.releases)

    # -- held deliveries and retries --------------------------------------------

    def _release(self, rows: list[InboxRow]) -> None:
        """Runs the deliveries that were held for what was just processed
        (and, in turn, those held for them), at most MAX_RELEASED in all."""
        budget, done = MAX_RELEASED, set()
        while rows and budget > 0:
            queue: list[str] = []
            for row in rows[:budget]:
                if row.row_id in done:
                    continue
                done.add(row.row_id)
                budget -= 1
                outcome = self.process(row, release=False)
                if outcome.status == "processed":
                    queue.extend(outcome.releases)
            rows = [r for r in self.inbox.held(queue, limit=budget) if r.row_id not in done] if budget > 0 else []

    def retry(self, *, limit: int = 500, progress: Callable[[InboxRow, Outcome], None] | None = None) -> RetryReport:
        """Reprocesses failed deliveries (and ones left ``received`` by a
        stopped process for ``stale_after_s``): each pass takes the ``limit``
        due deliveries tried the fewest times (see ``Inbox.due``, so that
        deliveries failing for good never starve newer ones) and applies them
        oldest business change first; up to RETRY_PASSES passes while one
        processes something, so that a delivery held for another one in the
        batch goes through."""
        if type(limit) is not int or not 1 <= limit <= MAX_RETRY_BATCH:
            raise InvalidArgument(f"limit must be an int of 1..{MAX_RETRY_BATCH}")
        report = RetryReport()
        for _ in range(RETRY_PASSES):
            stale_before = self.ledger.clock.now() - timedelta(seconds=self.stale_after_s)
            rows = self.inbox.due(test_mode=self.test_mode, stale_before=stale_before, limit=limit)
            rows.sort(key=_source_time)
            progressed = False
            for row in rows:
                outcome = self.process(row, release=False)
                progressed |= outcome.status == "processed"
                report.add(row, outcome)
                if progress is not None:
                    progress(row, outcome)
            if not progressed:
                break
        return report


def _source_time(row: InboxRow) -> tuple[str, int]:
    """When Lemon Squeezy changed the object; at the same time, snapshots
    first (invoices find their plan in them)."""
    data = row.payload.get("data")
    attributes = data.get("attributes") if isinstance(data, dict) else None
    updated = attributes.get("updated_at") if isinstance(attributes, dict) else None
    first = isinstance(data, dict) and data.get("type") == "subscriptions"
    return (updated if isinstance(updated, str) else "", 0 if first else 1)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


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
        self._key = check_secret(signing_secret)
        if type(max_body_bytes) is not int or not 1024 <= max_body_bytes <= HARD_MAX_BODY_BYTES:
            raise ConfigurationError(f"max_body_bytes must be an int of 1024..{HARD_MAX_BODY_BYTES}")
        if type(max_depth) is not int or not 8 <= max_depth <= 256:
            raise ConfigurationError("max_depth must be an int of 8..256")
        self.ledger = ledger
        self.max_body_bytes = max_body_bytes
        self.max_depth = max_depth
        self.processor = Processor(
            ledger,
            test_mode=test_mode,
            credit_packs=credit_packs,
            refund_policy=refund_policy,
            hold_window_s=hold_window_s,
            resolve_user=resolve_user,
        )
        self.inbox = self.processor.inbox

    @property
    def test_mode(self) -> bool:
        return self.processor.test_mode

    def ingest(self, raw_body: bytes, headers: Mapping[str, str]) -> IngestResult:
        """Verifies, stores and applies one delivery. Never raises for
        anything a sender can put in a request."""
        raw = bytes(raw_body)
        if len(raw) > self.max_body_bytes:
            return _rejected(413, f"body is {len(raw)} bytes; at most {self.max_body_bytes}")
        signature = _header(headers, SIGNATURE_HEADER)
        if signature is None:
            return _rejected(401, "no X-Signature header")
        if not verify_with_key(raw, signature, self._key):
            log.warning("rejected a webhook delivery with a bad signature")
            return _rejected(401, "X-Signature is not the HMAC-SHA256 of the body under the signing secret")
        try:
            payload = parse_json(raw, max_bytes=self.max_body_bytes, max_depth=self.max_depth)
            envelope = envelope_of(payload)
        except MalformedBody as exc:
            return _rejected(400, str(exc))
        return self._store_and_apply(raw, payload, envelope)

    def _store_and_apply(self, raw: bytes, payload: dict[str, Any], envelope: Envelope) -> IngestResult:
        """Stores the whole event as received (unknown fields included), then applies it."""
        name = envelope.meta.event_name
        try:
            stored = self.inbox.put(
                event_type=name,
                event_id=envelope.meta.webhook_id,
                payload=payload,
                payload_sha256=hashlib.sha256(raw).hexdigest(),
                test_mode=envelope.test_mode,
                now=self.ledger.clock.now(),
                payload_text=raw.decode("utf-8"),
            )
        except Exception as exc:
            log.exception("could not store a Lemon Squeezy delivery")
            return IngestResult(
                status="error", http_status=500, reason=f"could not store the delivery: {type(exc).__name__}"
            )
        if stored.duplicate:
            return IngestResult(
                status="duplicate",
                http_status=200,
                reason=f"already received (row {stored.row_id}, {stored.status})",
                event_row_id=stored.row_id,
                event_name=name,
            )
        row = InboxRow(
            row_id=stored.row_id,
            event_type=name,
            event_id=envelope.meta.webhook_id,
            payload=payload,
            status="received",
            error_message=None,
            attempts=0,
            test_mode=envelope.test_mode,
            created_at=None,
            processed_at=None,
        )
        try:
            outcome = self.processor.process(row, envelope=envelope, fresh=True)
        except Exception as exc:
            # The outcome could not be recorded (the database went away). If
            # the row is on disk, the delivery is stored: 200, and ``webhooks
            # retry`` applies it. If that cannot be confirmed, Lemon Squeezy
            # must try again (500); if the row survived, its retry is a duplicate.
            log.exception("processing stored delivery %s failed", stored.row_id)
            if self._durable(stored.row_id):
                return IngestResult(
                    status="stored",
                    http_status=200,
                    reason=f"stored; its outcome could not be recorded ({type(exc).__name__}): "
                    "`webhooks retry` applies it",
                    event_row_id=stored.row_id,
                    event_name=name,
                    processing="pending",
                )
            return IngestResult(
                status="error",
                http_status=500,
                reason=f"stored, but the outcome could not be recorded: {type(exc).__name__}",
                event_row_id=stored.row_id,
                event_name=name,
                processing="pending",
            )
        return IngestResult(
            status="stored",
            http_status=200,
            reason=outcome.message or "stored and applied",
            event_row_id=stored.row_id,
            event_name=name,
            processing=outcome.status,
        )

    def _durable(self, row_id: UUID) -> bool:
        try:
            return self.inbox.durable(row_id)
        except Exception:
            log.exception("could not confirm that delivery %s is stored", row_id)
            return False

    def retry_failed(self, *, limit: int = 500) -> RetryReport:
        return self.processor.retry(limit=limit)

    def link_customer(self, customer_id: str | int, user_id: UUID) -> LinkReport:
        """See Processor.link_customer."""
        return self.processor.link_customer(customer_id, user_id)


def _rejected(http_status: int, reason: str) -> IngestResult:
    return IngestResult(status="rejected", http_status=http_status, reason=reason)
