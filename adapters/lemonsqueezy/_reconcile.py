"""Bringing the ledger in line with Lemon Squeezy when deliveries were lost
(Lemon Squeezy gives up after its last retry).

The reconciler fetches every subscription, the recent subscription
invoices, the invoices of each live subscription's current period when it
began before that window (a yearly one), every refunded or partly refunded
invoice however old (a refund's webhook may be lost long after the
payment), and the orders (the list has no status filter: all of them, newest
first) over the REST API. It applies each exactly as the webhook that
carries it would: a snapshot newer than the one applied is applied; a paid
invoice never granted is granted (if its period has not ended); a refunded
amount never seen claws back. Of the orders it applies the credit packs'
created in the window (a lost ``order_created``) and every refund of a
pack's or a subscription checkout's order however old (a lost
``order_refunded``); other orders are not the ledger's. Every list is
bounded by ``max_pages``. Everything is keyed like the webhooks, so
running it twice, or alongside the webhooks, changes nothing twice. Nothing
is written to ``webhook_events``: these are not deliveries.

REST objects carry no ``meta.custom_data``: a subscription the ledger never
saw is applied only if its customer is mapped to a user, or the host's
``resolve_user`` says who it is; otherwise it is reported, not guessed. So a
host adopting the ledger mid-life starts from its store's present: each live
subscriber gets the current period's credits, once (ended periods grant
nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from adapters.webhooks import Outcome

from ._adapter import Processor, refunded_level, snapshot_period
from ._client import DEFAULT_MAX_PAGES, LemonSqueezyClient
from ._payloads import Resource, order_of, parse_time, subscription_of

DEFAULT_SINCE_DAYS = 45
#: The invoice statuses whose invoices are fetched whatever their age.
REFUND_STATUSES = ("refunded", "partial_refund")
#: How long before a period's start its invoice may have been created.
PERIOD_SLACK = timedelta(days=1)


@dataclass
class ReconcileReport:
    subscriptions_seen: int = 0
    #: Invoices checked: the recent ones and the refunded ones (each once).
    invoices_seen: int = 0
    #: Of those, refunded or partly refunded invoices older than the window.
    old_refunds_seen: int = 0
    #: Orders read, and of them those applied: credit packs' in the window, and refunds.
    orders_seen: int = 0
    orders_checked: int = 0
    #: What it changed in the ledger.
    changes: list[str] = field(default_factory=list)
    #: Objects it looked at and left as they were, with a reason worth reading.
    notes: list[str] = field(default_factory=list)
    #: Objects it could not apply (held or failed), with the reason.
    problems: list[str] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return len(self.changes)


class Reconciler:
    """``Reconciler(processor, client).run()`` -> what it changed."""

    def __init__(
        self,
        processor: Processor,
        client: LemonSqueezyClient,
        *,
        store_id: str | None = None,
        since_days: int = DEFAULT_SINCE_DAYS,
        max_pages: int = DEFAULT_MAX_PAGES,
    ) -> None:
        if type(since_days) is not int or not 1 <= since_days <= 3_660:
            raise ValueError("since_days must be an int of 1..3660")
        self.processor = processor
        self.client = client
        self.store_id = store_id
        self.since_days = since_days
        self.max_pages = max_pages

    def run(self, echo: Callable[[str], None] | None = None) -> ReconcileReport:
        """Subscriptions first (invoices find their plan in the snapshots),
        then the invoices created in the last ``since_days`` days, then the
        refunded and partly refunded invoices of any age (``filter[status]``),
        then the orders (``_orders``), then, for each live subscription whose current period began before
        the window, its invoices back to that period's start
        (``filter[subscription_id]``); those already checked left out."""
        report = ReconcileReport()
        say = echo or (lambda _line: None)
        since = self.processor.ledger.clock.now() - timedelta(days=self.since_days)
        # Live subscriptions whose current period began before the window (a
        # yearly one): the invoice that paid for it is older than the list
        # below reaches, so it is asked for by subscription.
        before_window: list[tuple[str, datetime]] = []
        for resource in self.client.subscriptions(store_id=self.store_id, max_pages=self.max_pages):
            report.subscriptions_seen += 1
            self._one("subscription", resource, report, say)
            start = self._period_start(resource)
            if start is not None and start < since:
                before_window.append((str(resource.get("id")), start))
        checked: set[str] = set()
        for resource in self.client.subscription_invoices(store_id=self.store_id, max_pages=self.max_pages):
            created = _created_at(resource)
            if created is not None and created < since:
                break  # newest first: the rest are older still
            checked.add(str(resource.get("id")))
            report.invoices_seen += 1
            self._one("invoice", resource, report, say)
        for status in REFUND_STATUSES:
            pages = self.client.subscription_invoices(store_id=self.store_id, status=status, max_pages=self.max_pages)
            for resource in pages:
                key = str(resource.get("id"))
                if key in checked:
                    continue
                checked.add(key)
                report.invoices_seen += 1
                report.old_refunds_seen += 1
                self._one("invoice", resource, report, say)
        self._orders(since, report, say)
        for subscription_id, start in before_window:
            pages = self.client.subscription_invoices(
                store_id=self.store_id, subscription_id=subscription_id, max_pages=self.max_pages
            )
            for resource in pages:
                created = _created_at(resource)
                if created is not None and created < start - PERIOD_SLACK:
                    break  # newest first: the rest paid for periods that have ended
                key = str(resource.get("id"))
                if key not in checked:
                    checked.add(key)
                    report.invoices_seen += 1
                    self._one("invoice", resource, report, say)
        return report

    def _orders(self, since: datetime, report: ReconcileReport, say: Callable[[str], None]) -> None:
        """Every order, newest first: a credit pack's created in the window
        (its order_created may be lost), and any order of a pack or of a
        subscription's checkout with a refund, however old (its
        order_refunded may be lost). Applied as their webhooks would be."""
        for resource in self.client.orders(store_id=self.store_id, max_pages=self.max_pages):
            if resource.get("type") != "orders":
                continue
            report.orders_seen += 1
            try:
                a = order_of(Resource.model_validate(resource))
            except (ValidationError, ValueError):
                continue  # not one the adapter could apply either: its webhook fails with the reason
            variant = str(a.first_order_item.variant_id)
            pack = variant in self.processor.credit_packs
            if not pack and self.processor.catalog.find(variant) is None:
                continue  # another product's order
            refunded = refunded_level(a.status, a.refunded, a.refunded_amount, a.total) > 0
            if refunded or (pack and a.created_at >= since):
                report.orders_checked += 1
                self._one("order", resource, report, say)

    def _period_start(self, resource: dict[str, Any]) -> datetime | None:
        """The start of a live subscription's current period, as the adapter
        reads it; None for an ended one, or one it cannot read."""
        try:
            attributes = subscription_of(Resource.model_validate(resource))
            found = self.processor.catalog.find(str(attributes.variant_id))
        except (ValidationError, ValueError):
            return None
        if found is None or attributes.status == "expired":
            return None
        _, start, end, _, _ = snapshot_period(attributes, found[1])
        return start if end > self.processor.ledger.clock.now() else None

    def _one(self, what: str, resource: dict[str, object], report: ReconcileReport, say: Callable[[str], None]) -> None:
        name = f"{what} {resource.get('id', '?')}"
        outcome = self.processor.apply_resource(resource)
        if outcome.status == "ignored":
            return
        if outcome.status != "processed":
            line, target = f"{name}: not applied: {outcome.message}", report.problems
        elif _changes(outcome):
            note = f" ({outcome.message})" if outcome.message else ""
            line, target = f"{name}: {', '.join(_changes(outcome))}{note}", report.changes
        elif outcome.message and not outcome.replayed:
            line, target = f"{name}: {outcome.message}", report.notes
        else:
            return
        target.append(line)
        say(line)


def _changes(outcome: Outcome) -> list[str]:
    parts = []
    if outcome.applied:
        parts.append("applied the current snapshot")
    if outcome.granted:
        parts.append(f"granted {outcome.granted} credits to user {outcome.user_id}")
    if outcome.clawed:
        parts.append(f"clawed back {outcome.clawed} credits from user {outcome.user_id}")
    return parts


def _created_at(resource: dict[str, object]) -> datetime | None:
    attributes = resource.get("attributes")
    value = attributes.get("created_at") if isinstance(attributes, dict) else None
    try:
        return parse_time(value)
    except (ValueError, TypeError):
        return None
