"""A subscription's whole life as the simulator builds it (checkout, renewal,
upgrade with its proration invoice, failed renewal and its recovery, a renewal
refunded, cancel, resume, cancel, expiry; a credit pack refunded in two
steps), delivered in random orders with each delivery duplicated, re-sent
under a new webhook id, and the process stopped (crashed) before or after its
effects were committed; then `webhooks retry`. The outcome must not depend on
any of it: the subscription, its snapshots and history, every credit movement
(a refund seen in steps is one clawback per step seen, so only its total is
compared), one ``webhook_events`` row per webhook id, all processed, and an
audit with no findings. And one period's upgrades, downgrade and upgrade
again, in every order of a sample."""

from __future__ import annotations

import itertools
import json
import random
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from adapters.lemonsqueezy import LemonSqueezy
from adapters.lemonsqueezy._adapter import Processor
from adapters.lemonsqueezy._simulator import Delivery, Simulator, Variant
from adapters.webhooks.inbox import Inbox
from ledger import BillingCycle, Ledger, audit
from tests.lemonsqueezy_support import (
    BEFORE,
    START,
    USER,
    StoryClock,
    adapter_for,
    final_state,
    headers_for,
    open_ledger,
    php_json,
    refunds_summed,
)
from tests.test_lemonsqueezy_story import stores  # noqa: F401  (the fixture: fresh stores of each backend)

SEC, DAY = timedelta(seconds=1), timedelta(days=1)
STARTER = Variant(1001, "starter", BillingCycle.MONTHLY, 2500)
PRO = Variant(2001, "pro", BillingCycle.MONTHLY, 7500)
R1, R3, R4 = (datetime(2030, m, 5, 10, tzinfo=UTC) for m in (2, 4, 5))


class Crash(BaseException):
    """The process stops: nothing catches it, the sender gets no answer."""


def simulator() -> Simulator:
    hooks, ids = itertools.count(1), itertools.count(500001)
    return Simulator(
        USER,
        customer_id=770001,
        subscription_id=880001,
        new_webhook_id=lambda: str(uuid.UUID(int=next(hooks))),
        new_id=lambda: next(ids),
    )


def life() -> list[Delivery]:
    """The deliveries in the order Lemon Squeezy sends them."""
    sim = simulator()
    out = sim.story(START, STARTER, PRO)
    expired = out.pop()
    cancelled = {"status": "cancelled", "renews_at": R4, "ends_at": R4, "cancelled": True}
    for event, at, extra in (
        ("subscription_resumed", R3 + 12 * DAY, {"renews_at": R4}),
        ("subscription_cancelled", R3 + 15 * DAY, cancelled),
    ):
        out.append(sim.subscription(event, PRO, updated=at, created=START, at=at + SEC, **extra))
    out.append(expired)
    pack = datetime(2030, 2, 20, 9, tzinfo=UTC)
    for event, updated, status, refunded in (
        ("order_created", pack, "paid", 0),
        ("order_refunded", pack + DAY, "partial_refund", 400),
        ("order_refunded", pack + 2 * DAY, "refunded", 1000),
    ):
        out.append(
            sim.order(
                event,
                9001,
                order_id=660099,
                total_cents=1000,
                created=pack,
                updated=updated,
                status=status,
                refunded_cents=refunded,
            )
        )
    return sorted(out, key=lambda d: d.at)


def resent(body: bytes, salt: str) -> bytes:
    payload = json.loads(body)
    payload["meta"]["webhook_id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{salt}:{payload['meta']['webhook_id']}"))
    return php_json(payload)


def webhook_id(body: bytes) -> str:
    return str(json.loads(body)["meta"]["webhook_id"])


def outcome(ledger: Ledger, adapter: LemonSqueezy) -> dict[str, Any]:
    state = refunds_summed(final_state(ledger))
    rows = adapter.inbox.listing(status=None, limit=1000)
    state["webhook_events"] = (len(rows), len({r.event_id for r in rows}), adapter.inbox.counts())
    assert audit(ledger).findings == []
    return state


def baseline(url: str) -> dict[str, Any]:
    clock = StoryClock(BEFORE)
    with open_ledger(url, clock) as ledger:
        adapter = adapter_for(ledger)
        for delivery in life():
            clock.set(delivery.at)
            assert adapter.ingest(delivery.body, headers_for(delivery.body)).http_status == 200
        return outcome(ledger, adapter)


@pytest.fixture
def crashes(monkeypatch: pytest.MonkeyPatch) -> dict[str, set[Any]]:
    """Webhook ids whose processing stops before it is applied, and inbox
    rows whose outcome is never recorded (stopped after the ledger's commit)."""
    plan: dict[str, set[Any]] = {"before": set(), "after": set(), "rows": set()}
    apply, put, finish = Processor.apply, Inbox.put, Inbox.finish

    def crashing_apply(self: Processor, event: Any, execute: Any) -> Any:
        if event.event_id in plan["before"]:
            raise Crash("stopped before applying")
        return apply(self, event, execute)

    def recording_put(self: Inbox, **kwargs: Any) -> Any:
        stored = put(self, **kwargs)
        if not stored.duplicate and kwargs["event_id"] in plan["after"]:
            plan["rows"].add(stored.row_id)
        return stored

    def crashing_finish(self: Inbox, row_id: Any, **kwargs: Any) -> Any:
        if row_id in plan["rows"]:
            plan["rows"].discard(row_id)
            raise Crash("stopped after the commit")
        return finish(self, row_id, **kwargs)

    monkeypatch.setattr(Processor, "apply", crashing_apply)
    monkeypatch.setattr(Inbox, "put", recording_put)
    monkeypatch.setattr(Inbox, "finish", crashing_finish)
    return plan


@pytest.mark.parametrize("seed", [11, 2031])
def test_a_whole_life_shuffled_duplicated_resent_and_crashed(
    stores: Callable[[], str],  # noqa: F811
    crashes: dict[str, set[Any]],
    seed: int,
) -> None:
    expected = baseline(stores())
    rnd = random.Random(seed)
    deliveries = []
    for body in (delivery.body for delivery in life()):
        deliveries.append(body)
        if rnd.random() < 0.3:
            deliveries.append(body)  # the same delivery again
        if rnd.random() < 0.3:
            deliveries.append(resent(body, str(seed)))  # the same event under a new webhook id
    rnd.shuffle(deliveries)
    clock = StoryClock(BEFORE)
    crashed = 0
    with open_ledger(stores(), clock) as ledger:
        adapter = adapter_for(ledger)
        for body in deliveries:
            roll = rnd.random()
            crashes["before" if roll < 0.15 else "after" if roll < 0.3 else "none"] = {webhook_id(body)}
            try:
                assert adapter.ingest(body, headers_for(body)).http_status == 200
            except Crash:
                crashed += 1
                # No answer: Lemon Squeezy sends the same bytes again, a duplicate of the stored row.
                crashes["before"], crashes["after"] = set(), set()
                again = adapter.ingest(body, headers_for(body))
                assert (again.http_status, again.status) == (200, "duplicate")
            crashes["before"], crashes["after"], crashes["rows"] = set(), set(), set()
        assert crashed > 3
        clock.set(BEFORE + timedelta(minutes=10))  # the stopped rows are stale: `webhooks retry` takes them
        for _ in range(5):
            adapter.retry_failed()
        state = outcome(ledger, adapter)
    distinct = len({webhook_id(body) for body in deliveries})
    assert state.pop("webhook_events") == (distinct, distinct, {"processed": distinct})
    expected.pop("webhook_events")
    assert state == expected


def up_down_up(sim: Simulator) -> tuple[list[bytes], list[bytes]]:
    """A Starter checkout (its snapshot and first invoice), then one period's
    change up to Pro, down to Starter and up to Pro again, each a snapshot
    and its proration invoice: (the checkout's bodies, the changes')."""
    checkout = [
        sim.subscription("subscription_created", STARTER, updated=START, created=START, renews_at=R1).body,
        sim.invoice(
            "subscription_payment_success", invoice_id=550001, created=START + SEC, updated=START + 2 * SEC,
            total_cents=2500,
        ).body,
    ]  # fmt: skip
    changes = []
    for n, (days, variant, total) in enumerate(((10, PRO, 4000), (12, STARTER, 0), (14, PRO, 3000))):
        at = START + days * DAY
        changes.append(sim.subscription("subscription_updated", variant, updated=at, created=START, renews_at=R1).body)
        changes.append(
            sim.invoice(
                "subscription_payment_success",
                invoice_id=550002 + n,
                reason="updated",
                created=at + SEC,
                updated=at + 2 * SEC,
                total_cents=total,
            ).body
        )
    return checkout, changes


def test_upgrade_downgrade_and_upgrade_again_in_one_period_in_any_order() -> None:
    """The changes and their invoices in order, then in a sample of other
    orders: the upgrade's credits once, every time."""
    checkout, changes = up_down_up(simulator())
    orders = random.Random(5).sample(list(itertools.permutations(range(len(changes)))), 24)
    for order in [tuple(range(len(changes))), *orders]:
        with open_ledger("memory://", StoryClock(BEFORE)) as ledger:
            adapter = adapter_for(ledger)
            for body in checkout + [changes[i] for i in order]:
                assert adapter.ingest(body, headers_for(body)).http_status == 200
            adapter.retry_failed()
            assert not adapter.inbox.counts().get("failed"), order
            granted = sorted(e.data["amount"] for e in ledger.history(USER) if e.type == "granted")
            assert granted == [5000, 10000], order
