"""What each Lemon Squeezy object does to the ledger: the status mapping, the
user, holds, refunds, late payments and the upgrade policy."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest

from adapters.lemonsqueezy import IngestResult, LemonSqueezy, RefundPolicy
from adapters.lemonsqueezy._adapter import refunded_level
from adapters.lemonsqueezy._state import (
    Payment,
    SubscriptionLink,
    checkout_id,
    ledger_subscription_id,
    payment_id,
    subscription_link_id,
)
from ledger import CreditPolicy, Ledger, ReserveCredits, SubscriptionView, UnknownAccount
from tests.lemonsqueezy_support import (
    R1,
    START,
    USER,
    Builder,
    Delivery,
    StoryClock,
    adapter_for,
    headers_for,
    open_ledger,
)

SID = ledger_subscription_id("880001")
DAY = timedelta(days=1)
SEC = timedelta(seconds=1)


@pytest.fixture
def clock() -> StoryClock:
    return StoryClock(START)


@pytest.fixture
def ledger(ledger_url: str, clock: StoryClock) -> Iterator[Ledger]:
    with open_ledger(ledger_url, clock) as opened:
        yield opened


@pytest.fixture
def adapter(ledger: Ledger) -> LemonSqueezy:
    return adapter_for(ledger)


def send(adapter: LemonSqueezy, body: bytes) -> IngestResult:
    result = adapter.ingest(body, headers_for(body))
    assert result.http_status == 200, result
    return result


def subscription(ledger: Ledger) -> SubscriptionView:
    return ledger.subscription(SID)


def started(adapter: LemonSqueezy, b: Builder | None = None, **kw: Any) -> IngestResult:
    b = b or Builder()
    return send(adapter, b.subscription_event("subscription_created", updated=START, renews_at=R1, **kw))


def paid(adapter: LemonSqueezy, b: Builder | None = None, invoice: str = "550001", **kw: Any) -> IngestResult:
    b = b or Builder()
    fields: dict[str, Any] = {"reason": "initial", "status": "paid", "created": START + SEC, "updated": START + 2 * SEC}
    fields.update(total=2500)
    fields.update(kw)
    return send(adapter, b.invoice_event("subscription_payment_success", invoice, **fields))


# ----------------------------------------------------------- status mapping


@pytest.mark.parametrize(
    ("ls_status", "extra", "status", "cancel_at_period_end", "plan"),
    [
        ("active", {}, "active", False, "starter"),
        ("on_trial", {"trial_ends_at": START + 14 * DAY}, "trialing", False, "starter"),
        # void: no service while paused; free: the service continues, unpaid.
        ("paused", {"pause": {"mode": "void", "resumes_at": None}}, "paused", False, "free"),
        (
            "paused",
            {"pause": {"mode": "free", "resumes_at": "2030-03-01T00:00:00.000000Z"}},
            "paused",
            False,
            "starter",
        ),
        ("past_due", {}, "past_due", False, "starter"),
        ("unpaid", {}, "past_due", False, "starter"),  # entitled until Lemon Squeezy cancels or expires it
        ("cancelled", {"cancelled": True, "ends_at": R1}, "cancelled", True, "starter"),
        ("expired", {"cancelled": True, "ends_at": R1}, "expired", False, "free"),
    ],
)
def test_status_mapping(
    adapter: LemonSqueezy,
    ledger: Ledger,
    ls_status: str,
    extra: dict[str, Any],
    status: str,
    cancel_at_period_end: bool,
    plan: str,
) -> None:
    renews = None if ls_status == "expired" else R1
    result = send(
        adapter,
        Builder().subscription_event(
            "subscription_updated", updated=START, status=ls_status, renews_at=renews, **extra
        ),
    )
    assert result.processing == "processed", result
    view = subscription(ledger)
    assert (view.status, view.cancel_at_period_end, view.plan) == (status, cancel_at_period_end, "starter")
    assert view.current_period_end == (START + 14 * DAY if ls_status == "on_trial" else R1)
    assert view.current_period_start == START  # one cycle before the end, never before creation
    assert (ledger.subscription_of(USER) is None) == (status == "expired")
    entitled = ledger.entitlements(USER)
    assert (entitled.plan, entitled.status) == (plan, "none" if status == "expired" else status)


@pytest.mark.parametrize(("mode", "plan"), [("void", "free"), ("free", "starter")])
def test_a_pause_is_recorded_as_paused_and_keeps_the_plan_only_when_free(
    adapter: LemonSqueezy, ledger: Ledger, mode: str, plan: str
) -> None:
    b = Builder()
    started(adapter, b)
    paid(adapter, b)
    pause = {"mode": mode, "resumes_at": None}
    send(
        adapter,
        b.subscription_event("subscription_paused", updated=START + DAY, status="paused", renews_at=R1, pause=pause),
    )
    assert (subscription(ledger).status, ledger.entitlements(USER).plan) == ("paused", plan)
    ledger.views.catch_up()
    columns = ledger.views.store.columns("subscription_history")
    rows = ledger.views.store.rows("subscription_history", "changed_at, id")
    assert sorted(r[columns.index("change_type")] for r in rows) == ["created", "paused"]  # one clock time
    assert ledger.balance(USER).balance_credits == 5000  # the pause granted and took nothing
    send(adapter, b.subscription_event("subscription_unpaused", updated=START + 2 * DAY, renews_at=R1))
    assert (subscription(ledger).status, ledger.entitlements(USER).plan) == ("active", "starter")


def test_a_past_due_snapshot_keeps_the_period_its_renews_at_is_the_next_retry(
    adapter: LemonSqueezy, ledger: Ledger
) -> None:
    b = Builder()
    started(adapter, b)
    # The renewal at R1 failed; Lemon Squeezy retries it, and each dunning
    # snapshot's renews_at is the next charge attempt, days apart.
    for day, retry in ((0, R1 + 3 * DAY), (3, R1 + 8 * DAY)):
        result = send(
            adapter,
            b.subscription_event(
                "subscription_updated", updated=R1 + day * DAY + SEC, status="past_due", renews_at=retry
            ),
        )
        assert result.processing == "processed"
        view = subscription(ledger)
        assert (view.status, view.current_period_start, view.current_period_end) == ("past_due", START, R1)
    unpaid = b.subscription_event("subscription_updated", updated=R1 + 14 * DAY, status="unpaid", renews_at=None)
    send(adapter, unpaid)
    view = subscription(ledger)
    assert (view.status, view.current_period_start, view.current_period_end) == ("past_due", START, R1)
    assert ledger.entitlements(USER).plan == "starter"  # until Lemon Squeezy sends cancelled or expired
    link = ledger.app.repository.get(subscription_link_id("880001"))
    assert isinstance(link, SubscriptionLink)
    # The timeline, too: the past_due snapshots have no period end of their own.
    assert {e.period_end for e in link.entries()} == {R1, None}
    recovered = R1 + 15 * DAY  # a payment method updated, the charge made
    send(adapter, b.subscription_event("subscription_updated", updated=recovered, renews_at=R1 + 28 * DAY))
    view = subscription(ledger)
    assert (view.status, view.current_period_start, view.current_period_end) == ("active", R1, R1 + 28 * DAY)


def test_a_yearly_variant_is_a_yearly_cycle(adapter: LemonSqueezy, ledger: Ledger) -> None:
    renews = datetime(2031, 1, 5, 10, tzinfo=UTC)
    send(adapter, Builder().subscription_event("subscription_created", updated=R1, variant="2002", renews_at=renews))
    view = subscription(ledger)
    assert (view.plan, view.billing_cycle) == ("pro", "yearly")
    assert view.current_period_start == START  # max(created_at, a year before renews_at)


def test_older_snapshots_are_kept_for_the_timeline_but_not_applied(adapter: LemonSqueezy, ledger: Ledger) -> None:
    b = Builder()
    send(
        adapter,
        b.subscription_event(
            "subscription_updated",
            updated=START + 5 * SEC,
            status="cancelled",
            renews_at=R1,
            ends_at=R1,
            cancelled=True,
        ),
    )
    late = send(adapter, b.subscription_event("subscription_created", updated=START, renews_at=R1))
    assert "older than the snapshot applied" in late.reason
    assert subscription(ledger).status == "cancelled"


# -------------------------------------------------------------------- users


def test_without_custom_data_the_customer_mapping_finds_the_user(adapter: LemonSqueezy, ledger: Ledger) -> None:
    anonymous = Builder(user=None)
    held = started(adapter, anonymous)
    assert held.processing == "held"
    assert held.reason == (
        "held: customer 770001: no meta.custom_data.user_id, and no user is mapped to this subscription or customer yet"
    )
    invoice = paid(adapter, anonymous)
    assert invoice.processing == "held" and "subscription 880001: no snapshot" in invoice.reason
    # The checkout's order carries custom_data: it maps the customer, which
    # releases the snapshot, which releases the invoice.
    checkout = Builder().order_event("order_created", "660001", variant="1001", total=2500, at=START)
    assert send(adapter, checkout).processing == "processed"
    assert subscription(ledger).user_id == USER
    assert ledger.balance(USER).balance_credits == 5000
    assert adapter.inbox.counts() == {"processed": 3}


def test_a_custom_user_other_than_the_subscriptions_is_refused(adapter: LemonSqueezy) -> None:
    started(adapter)
    other = Builder(user=uuid4())
    result = send(adapter, other.subscription_event("subscription_updated", updated=START + SEC, renews_at=R1))
    assert result.processing == "failed"
    assert "differs from user" in result.reason


def test_a_custom_user_that_is_not_a_uuid_fails_with_the_reason(adapter: LemonSqueezy) -> None:
    b = Builder()
    body = b.subscription_event("subscription_created", updated=START, renews_at=R1)
    body = body.replace(str(USER).encode(), b"user-42")
    result = send(adapter, body)
    assert (result.processing, result.reason) == (
        "failed",
        "InvalidArgument: meta.custom_data.user_id 'user-42' is not a UUID",
    )


def test_a_second_live_subscription_waits_until_the_first_ends(adapter: LemonSqueezy, ledger: Ledger) -> None:
    started(adapter)
    second = Builder(subscription="880002")
    held = send(adapter, second.subscription_event("subscription_created", updated=START + DAY, renews_at=R1 + DAY))
    assert held.processing == "held" and held.reason.startswith(f"held: user {USER}: ")
    expired = Builder().subscription_event(
        "subscription_expired", updated=START + 2 * DAY, status="expired", renews_at=None, ends_at=START + 2 * DAY
    )
    send(adapter, expired)  # releases the second
    live = ledger.subscription_of(USER)
    assert live is not None and live.lemon_squeezy_subscription_id == "880002"


# ----------------------------------------------------------------- invoices


def test_an_invoice_waits_for_the_snapshot_sent_with_it(
    adapter: LemonSqueezy, ledger: Ledger, clock: StoryClock
) -> None:
    b = Builder()
    started(adapter, b)
    paid(adapter, b)
    clock.set(R1 + 2 * SEC)
    renewal = paid(adapter, b, "550002", reason="renewal", created=R1, updated=R1 + SEC)
    assert renewal.processing == "held"
    assert "waiting for the subscription's snapshot from around 2030-02-05T10:00:00+00:00" in renewal.reason
    send(adapter, b.subscription_event("subscription_updated", updated=R1 + 3 * SEC, renews_at=R1 + 28 * DAY))
    grants = [(e.data["kind"], e.data["amount"]) for e in ledger.history(USER) if e.type == "granted"]
    assert grants == [("subscription_grant", 5000), ("subscription_renew", 5000)]
    assert ledger.balance(USER).balance_credits == 5000  # the first period's credits lapsed at R1 + 1 s
    assert adapter.inbox.counts() == {"processed": 4}


def test_after_the_hold_window_an_invoice_uses_what_is_known(
    adapter: LemonSqueezy, ledger: Ledger, clock: StoryClock
) -> None:
    b = Builder()
    started(adapter, b)
    clock.set(R1 + 2 * 3600 * SEC)  # two hours after the renewal: no snapshot came
    renewal = paid(adapter, b, "550002", reason="renewal", created=R1, updated=R1 + SEC)
    assert renewal.processing == "processed"
    assert ledger.balance(USER).balance_credits == 5000


def test_a_payment_processed_after_its_period_grants_nothing(
    adapter: LemonSqueezy, ledger: Ledger, clock: StoryClock
) -> None:
    b = Builder()
    started(adapter, b)
    clock.set(R1 + DAY)  # the initial period (START + 1 s .. R1 + 1 s) is over
    result = paid(adapter, b)
    assert result.processing == "processed"
    assert "the paid period ended at 2030-02-05T10:00:01+00:00 before the payment was processed" in result.reason
    payment = ledger.app.repository.get(payment_id("invoice", "550001"))
    assert isinstance(payment, Payment) and payment.granted == 0


def test_a_recovered_invoice_already_granted_changes_nothing(adapter: LemonSqueezy, ledger: Ledger) -> None:
    b = Builder()
    started(adapter, b)
    paid(adapter, b)
    again = send(
        adapter,
        b.invoice_event(
            "subscription_payment_recovered",
            "550001",
            reason="initial",
            status="paid",
            created=START + SEC,
            updated=START + 9 * SEC,
            total=2500,
        ),
    )
    assert again.processing == "processed"
    assert ledger.balance(USER).balance_credits == 5000
    assert len(ledger.history(USER)) == 2  # opened, one grant


def test_a_failed_payment_makes_it_past_due_until_a_newer_snapshot(adapter: LemonSqueezy, ledger: Ledger) -> None:
    b = Builder()
    started(adapter, b)
    failed = b.invoice_event(
        "subscription_payment_failed",
        "550002",
        reason="renewal",
        status="pending",
        created=R1,
        updated=R1 + SEC,
        total=2500,
    )
    send(adapter, failed)
    assert subscription(ledger).status == "past_due"
    send(adapter, b.subscription_event("subscription_updated", updated=R1 + 4 * DAY, renews_at=R1 + 28 * DAY))
    assert subscription(ledger).status == "active"
    send(
        adapter,
        b.invoice_event(
            "subscription_payment_failed",
            "550002",
            reason="renewal",
            status="pending",
            created=R1,
            updated=R1 + 2 * SEC,
            total=2500,
        ),
    )
    assert subscription(ledger).status == "active"  # older than the recovery: changes nothing


@pytest.mark.parametrize(("upgrade", "granted"), [("full", 10000), ("prorated", 6895), ("none", 0)])
def test_a_proration_invoice_follows_the_upgrade_policy(
    ledger_url: str, clock: StoryClock, upgrade: str, granted: int
) -> None:
    with open_ledger(ledger_url, clock, credit_policy=CreditPolicy(upgrade=upgrade, auto_renew=False)) as ledger:  # type: ignore[arg-type]
        adapter = adapter_for(ledger)
        b = Builder()
        started(adapter, b)
        change = START + 9 * DAY + 15 * 3600 * SEC
        send(adapter, b.subscription_event("subscription_updated", updated=change, variant="2001", renews_at=R1))
        result = paid(adapter, b, "550009", reason="updated", created=change + SEC, updated=change + 2 * SEC)
        assert result.processing == "processed"
        payment = ledger.app.repository.get(payment_id("invoice", "550009"))
        assert isinstance(payment, Payment) and payment.granted == granted
        if granted:
            assert ledger.balance(USER).blocks[0].expires_at == R1  # the end of the period it pays into


def test_a_later_proration_invoice_that_is_no_plan_change_grants_nothing(adapter: LemonSqueezy, ledger: Ledger) -> None:
    b = Builder()
    started(adapter, b)
    change = START + 2 * DAY
    send(adapter, b.subscription_event("subscription_updated", updated=change, variant="2001", renews_at=R1))
    paid(adapter, b, "550009", reason="updated", created=change + SEC, updated=change + 2 * SEC)
    later = START + 20 * DAY  # a quantity change, say: Lemon Squeezy prorates it with another "updated" invoice
    send(adapter, b.subscription_event("subscription_updated", updated=later, variant="2001", renews_at=R1))
    result = paid(adapter, b, "550010", reason="updated", created=later + SEC, updated=later + 2 * SEC)
    assert "no plan change near this invoice; nothing granted" in result.reason
    granted = [e.data["amount"] for e in ledger.history(USER) if e.type == "granted"]
    assert granted == [10000]  # the upgrade, once


@pytest.mark.parametrize(
    "order",
    [
        "change invoice first",
        "quantity invoice first",
        # The quantity invoice, and its snapshot, before the plan change's snapshot:
        # the run of pro snapshots begins later on the timeline until the change's arrives.
        "quantity invoice before the change's snapshot",
    ],
)
def test_one_plan_change_is_credited_once_whatever_invoices_prorate_it(
    adapter: LemonSqueezy, ledger: Ledger, clock: StoryClock, order: str
) -> None:
    b = Builder()
    started(adapter, b)
    change = START + 2 * DAY
    quantity = change + 20 * 60 * SEC  # a quantity change on pro, prorated by another "updated" invoice
    change_snapshot = b.subscription_event("subscription_updated", updated=change, variant="2001", renews_at=R1)
    quantity_snapshot = b.subscription_event("subscription_updated", updated=quantity, variant="2001", renews_at=R1)
    change_invoice = b.invoice_event(
        "subscription_payment_success",
        "550009",
        reason="updated",
        status="paid",
        created=change + SEC,
        updated=change + 2 * SEC,
        total=1000,
    )
    quantity_invoice = b.invoice_event(
        "subscription_payment_success",
        "550010",
        reason="updated",
        status="paid",
        created=quantity + SEC,
        updated=quantity + 2 * SEC,
        total=300,
    )
    clock.set(quantity + 5 * SEC)
    deliveries = {
        "change invoice first": [change_snapshot, quantity_snapshot, change_invoice, quantity_invoice],
        "quantity invoice first": [change_snapshot, quantity_snapshot, quantity_invoice, change_invoice],
        "quantity invoice before the change's snapshot": [
            quantity_snapshot,
            quantity_invoice,
            change_snapshot,
            change_invoice,
        ],
    }[order]
    results = [send(adapter, body) for body in deliveries]
    assert all(r.processing == "processed" for r in results), results
    assert "was credited by invoice" in results[-1].reason
    for body in (change_invoice, quantity_invoice):  # re-sent, and retried: still once
        send(adapter, Delivery(START, "subscription_payment_success", body).resent("dashboard").body)
    adapter.retry_failed()
    granted = [e.data["amount"] for e in ledger.history(USER) if e.type == "granted"]
    assert granted == [10000]  # starter -> pro, once
    payments = [ledger.app.repository.get(payment_id("invoice", i)) for i in ("550009", "550010")]
    assert sorted(p.granted for p in payments if isinstance(p, Payment)) == [0, 10000]
    link = ledger.app.repository.get(subscription_link_id("880001"))
    assert isinstance(link, SubscriptionLink)
    (credited,) = link.credited_changes()
    assert (credited.from_variant, credited.to_variant) == ("1001", "2001")


def proration_invoices(b: Builder, rows: Iterable[tuple[str, datetime, int]]) -> list[bytes]:
    """A plan change's paid invoice (billing reason ``updated``) per (invoice id, change time, total)."""
    return [
        b.invoice_event(
            "subscription_payment_success",
            invoice,
            reason="updated",
            status="paid",
            created=at + SEC,
            updated=at + 2 * SEC,
            total=total,
        )
        for invoice, at, total in rows
    ]


@pytest.mark.parametrize(
    "order",
    [
        "in order",
        # The downgrade's snapshot last: the second upgrade's invoice finds no change near it.
        "downgrade's snapshot last",
        # The first upgrade's snapshot last: the second upgrade's invoice is processed first.
        "first upgrade's snapshot last",
    ],
)
def test_an_upgrade_again_after_a_downgrade_in_one_period_is_credited_once(
    adapter: LemonSqueezy, ledger: Ledger, clock: StoryClock, order: str
) -> None:
    """Starter to Pro, back to Starter, and to Pro again within one period,
    each with its proration invoice: the upgrade's credits once, as the
    ledger's own change_plan grants them, whatever order the deliveries
    arrive in (before, twice in order, and once when the downgrade's
    snapshot came after the second upgrade's invoice)."""
    b = Builder()
    started(adapter, b)
    paid(adapter, b)
    up, down, again = START + 10 * DAY, START + 12 * DAY, START + 14 * DAY
    snapshots = [
        b.subscription_event("subscription_updated", updated=at, variant=variant, renews_at=R1)
        for at, variant in ((up, "2001"), (down, "1001"), (again, "2001"))
    ]
    invoices = proration_invoices(b, (("550002", up, 4000), ("550003", down, 0), ("550004", again, 3000)))
    clock.set(again + 5 * SEC)
    deliveries = {
        "in order": [snapshots[0], invoices[0], snapshots[1], invoices[1], snapshots[2], invoices[2]],
        "downgrade's snapshot last": [snapshots[0], snapshots[2], *invoices, snapshots[1]],
        "first upgrade's snapshot last": [snapshots[1], snapshots[2], *invoices, snapshots[0]],
    }[order]
    for body in deliveries:
        send(adapter, body)
    adapter.retry_failed()
    assert not adapter.inbox.counts().get("failed")
    granted = [e.data["amount"] for e in ledger.history(USER) if e.type == "granted"]
    assert granted == [5000, 10000]  # the checkout's, and starter -> pro once
    assert subscription(ledger).plan == "pro"


@pytest.mark.parametrize("order", ["in order", "pro's snapshot last"])
def test_two_upgrades_in_one_period_grant_one_upgrade_in_all(
    adapter: LemonSqueezy, ledger: Ledger, clock: StoryClock, order: str
) -> None:
    """Starter to Pro, then Pro to Studio, each with its proration invoice:
    Studio's credits minus Starter's in all. Before, when the change to Pro
    was seen after the Studio invoice, that invoice was credited from
    Starter, and the Pro invoice from Starter again."""
    b = Builder()
    started(adapter, b)
    paid(adapter, b)
    to_pro, to_studio = START + 10 * DAY, START + 12 * DAY
    pro, studio = (
        b.subscription_event("subscription_updated", updated=at, variant=variant, renews_at=R1)
        for at, variant in ((to_pro, "2001"), (to_studio, "3001"))
    )
    invoices = proration_invoices(b, (("550002", to_pro, 4000), ("550003", to_studio, 5000)))
    clock.set(to_pro + 5 * SEC)  # every invoice young: one waits for its snapshot, none is applied blind
    deliveries = [pro, invoices[0], studio, invoices[1]] if order == "in order" else [studio, *invoices, pro]
    for body in deliveries:
        send(adapter, body)
    adapter.retry_failed()
    assert not adapter.inbox.counts().get("failed")
    granted = [e.data["amount"] for e in ledger.history(USER) if e.type == "granted"]
    assert granted[0] == 5000 and sum(granted[1:]) == 25000  # studio (30000) minus starter (5000)
    assert subscription(ledger).plan == "studio"


def test_a_second_plan_change_is_credited_on_its_own(adapter: LemonSqueezy, ledger: Ledger, clock: StoryClock) -> None:
    """Starter -> pro -> studio within the hour: two changes, each credited once."""
    b = Builder()
    started(adapter, b)
    to_pro, to_studio = START + 2 * DAY, START + 2 * DAY + 30 * 60 * SEC
    clock.set(to_studio + 5 * SEC)
    for at, variant, invoice in ((to_pro, "2001", "550009"), (to_studio, "3001", "550010")):
        send(adapter, b.subscription_event("subscription_updated", updated=at, variant=variant, renews_at=R1))
        paid(adapter, b, invoice, reason="updated", created=at + SEC, updated=at + 2 * SEC)
    granted = [e.data["amount"] for e in ledger.history(USER) if e.type == "granted"]
    assert granted == [10000, 15000]  # 5,000 -> 15,000 -> 30,000 credits a month


def test_a_downgrade_invoice_grants_nothing(adapter: LemonSqueezy, ledger: Ledger) -> None:
    b = Builder()
    send(adapter, b.subscription_event("subscription_created", updated=START, variant="3001", renews_at=R1))
    send(adapter, b.subscription_event("subscription_updated", updated=START + DAY, variant="1001", renews_at=R1))
    result = paid(adapter, b, "550009", reason="updated", created=START + DAY + SEC, updated=START + DAY + 2 * SEC)
    assert "studio -> starter is not an upgrade; nothing granted" in result.reason
    assert subscription(ledger).plan == "starter"


def test_an_unknown_variant_fails_and_succeeds_once_the_plan_exists(adapter: LemonSqueezy, ledger: Ledger) -> None:
    result = started(adapter, variant="4242")
    assert result.processing == "failed"
    assert result.reason.startswith("UnknownVariant: variant 4242 is not in the plan catalog")
    from dataclasses import replace

    from ledger import DEFAULT_CATALOG

    ledger.define_plan(replace(DEFAULT_CATALOG[3], lemon_squeezy_variant_id_monthly="4242"))
    adapter.processor._catalog_loaded = 0.0  # as if a second had passed since the last read
    report = adapter.retry_failed()
    assert (report.processed, report.failed) == (1, 0)
    assert subscription(ledger).plan == "enterprise"


def test_rollover_credits_do_not_expire(ledger_url: str, clock: StoryClock) -> None:
    with open_ledger(ledger_url, clock, credit_policy=CreditPolicy(expiry="rollover", auto_renew=False)) as ledger:
        adapter = adapter_for(ledger)
        started(adapter)
        paid(adapter)
        assert [b.expires_at for b in ledger.balance(USER).blocks] == [None]


# ------------------------------------------------------------------ refunds


def test_partial_refunds_claw_back_only_the_change(adapter: LemonSqueezy, ledger: Ledger) -> None:
    b = Builder()
    started(adapter, b)
    paid(adapter, b)

    def refund(amount: int, updated: datetime, full: bool = False) -> IngestResult:
        status = "refunded" if full else "partial_refund"
        return send(
            adapter,
            b.invoice_event(
                "subscription_payment_refunded",
                "550001",
                reason="initial",
                status=status,
                created=START + SEC,
                updated=updated,
                total=2500,
                refunded_amount=amount,
                refunded=full,
            ),
        )

    refund(1000, START + DAY)  # 40 % of 5000 credits
    assert ledger.balance(USER).balance_credits == 3000
    refund(1500, START + 2 * DAY)  # 60 %: 1000 more
    assert ledger.balance(USER).balance_credits == 2000
    refund(1000, START + DAY)  # the first refund again, late: nothing
    assert ledger.balance(USER).balance_credits == 2000
    refund(2500, START + 3 * DAY, full=True)
    assert ledger.balance(USER).balance_credits == 0
    payment = ledger.app.repository.get(payment_id("invoice", "550001"))
    assert isinstance(payment, Payment)
    assert (payment.granted, payment.refunded_seen, payment.clawed, payment.shortfall) == (5000, 2500, 5000, 0)
    refunds = [e.data["amount"] for e in ledger.history(USER) if e.type == "debited"]
    assert refunds == [2000, 1000, 2000]


def test_a_partial_refund_flagged_refunded_claws_back_only_its_share(adapter: LemonSqueezy, ledger: Ledger) -> None:
    """``refunded`` is true after any refund; status partial_refund and
    refunded_amount say how much: 1,000 of 2,500 is 2/5 of the credits."""
    b = Builder()
    started(adapter, b)
    paid(adapter, b)  # 5,000 credits for 2,500 cents

    def refund(status: str, amount: int, updated: datetime) -> IngestResult:
        body = b.invoice_event(
            "subscription_payment_refunded",
            "550001",
            reason="initial",
            status=status,
            created=START + SEC,
            updated=updated,
            total=2500,
            refunded_amount=amount,
            refunded=True,
        )
        return send(adapter, body)

    refund("partial_refund", 1000, START + DAY)
    assert ledger.balance(USER).balance_credits == 3000
    refund("refunded", 2500, START + 2 * DAY)
    assert ledger.balance(USER).balance_credits == 0
    refunds = [e.data["amount"] for e in ledger.history(USER) if e.type == "debited"]
    assert refunds == [2000, 3000]


def checkout_refund(b: Builder, amount: int, updated: datetime, *, full: bool = False) -> bytes:
    """``order_refunded`` of the order that started subscription 880001 (its
    snapshots' ``order_id`` 660001): the payment of its initial invoice."""
    return b.order_event(
        "order_refunded",
        "660001",
        variant="1001",
        total=2500,
        at=START,
        status="refunded" if full else "partial_refund",
        refunded_amount=amount,
        refunded=full,
        updated=updated,
    )


def invoice_refund(b: Builder, amount: int, updated: datetime, *, full: bool = False) -> bytes:
    return b.invoice_event(
        "subscription_payment_refunded",
        "550001",
        reason="initial",
        status="refunded" if full else "partial_refund",
        created=START + SEC,
        updated=updated,
        total=2500,
        refunded_amount=amount,
        refunded=full,
    )


def test_a_refund_of_the_checkout_order_claws_back_the_initial_invoice(adapter: LemonSqueezy, ledger: Ledger) -> None:
    """Lemon Squeezy refunds a subscription's first payment as its order
    (order_refunded): the initial invoice's credits come back, and its own
    refund (subscription_payment_refunded) takes nothing a second time."""
    b = Builder()
    started(adapter, b)
    paid(adapter, b)  # 5,000 credits
    result = send(adapter, checkout_refund(b, 2500, START + DAY, full=True))
    assert (result.processing, ledger.balance(USER).balance_credits) == ("processed", 0)
    again = send(adapter, invoice_refund(b, 2500, START + DAY + SEC, full=True))
    assert again.reason == "a refund of 2500 of 2500 was seen before; nothing clawed back again"
    assert ledger.balance(USER).balance_credits == 0
    assert [e.data["amount"] for e in ledger.history(USER) if e.type == "debited"] == [5000]
    payment = ledger.app.repository.get(payment_id("invoice", "550001"))
    assert isinstance(payment, Payment) and (payment.refunded_seen, payment.clawed) == (2500, 5000)


@pytest.mark.parametrize("first", ["order", "invoice"])
def test_partial_refunds_of_the_order_and_the_invoice_claw_back_the_largest_once(
    adapter: LemonSqueezy, ledger: Ledger, first: str
) -> None:
    """40 % refunded, seen as the order and as the invoice, in either order,
    then the rest: 2,000 credits, then 3,000; never the 40 % twice."""
    b = Builder()
    started(adapter, b)
    paid(adapter, b)
    steps = [checkout_refund(b, 1000, START + DAY), invoice_refund(b, 1000, START + DAY + SEC)]
    for body in steps if first == "order" else steps[::-1]:
        send(adapter, body)
    assert ledger.balance(USER).balance_credits == 3000
    send(adapter, checkout_refund(b, 2500, START + 2 * DAY, full=True))
    send(adapter, invoice_refund(b, 2500, START + 2 * DAY + SEC, full=True))
    assert ledger.balance(USER).balance_credits == 0
    assert [e.data["amount"] for e in ledger.history(USER) if e.type == "debited"] == [2000, 3000]


def test_a_checkout_refund_before_the_initial_invoice_is_clawed_back_when_it_is_applied(
    adapter: LemonSqueezy, ledger: Ledger
) -> None:
    """The refund arrives first (the invoice's delivery late, or retried):
    it is recorded, and the invoice grants and claws back at once."""
    b = Builder()
    early = send(adapter, checkout_refund(b, 2500, START + DAY, full=True))
    assert "recorded; its credits come back when the subscription's initial invoice is applied" in (early.reason or "")
    started(adapter, b)
    paid(adapter, b)
    assert ledger.balance(USER).balance_credits == 0
    assert [(e.type, e.data["amount"]) for e in ledger.history(USER)[1:]] == [("granted", 5000), ("debited", 5000)]


@pytest.mark.parametrize("first", ["order", "invoice"])
def test_a_refunded_checkout_order_of_another_total_is_not_the_initial_invoices_charge(
    adapter: LemonSqueezy, ledger: Ledger, first: str
) -> None:
    """A checkout that started a free trial charged a setup fee (500 cents)
    and the first period later (2,500): refunding the fee is not refunding
    the period, whichever arrives first."""
    b = Builder()
    fee = b.order_event(
        "order_refunded",
        "660001",
        variant="1001",
        total=500,
        at=START,
        status="refunded",
        refunded_amount=500,
        refunded=True,
        updated=START + DAY,
    )
    if first == "order":
        send(adapter, fee)
    started(adapter, b)
    result = paid(adapter, b)
    if first == "invoice":
        result = send(adapter, fee)
    assert ledger.balance(USER).balance_credits == 5000
    assert result.reason is not None
    assert "checkout order 660001 (total 500) is not the charge of initial invoice 550001 (total 2500)" in result.reason


def test_an_initial_invoice_does_not_read_its_orders_checkout(
    adapter: LemonSqueezy, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkout order's refund is kept on the subscription's link, which
    the invoice reads anyway: an initial invoice does not read the order's
    Checkout (one more statement per new subscription)."""
    from ledger.storage.eventstore import get_or_none

    b = Builder()
    started(adapter, b)
    on_demand: list[UUID] = []

    def counting(app: Any, aggregate_id: UUID, cls: Any) -> Any:
        on_demand.append(aggregate_id)
        return get_or_none(app, aggregate_id, cls)

    monkeypatch.setattr("ledger.application.unit.get_or_none", counting)
    paid(adapter, b)
    monkeypatch.undo()
    assert ledger.balance(USER).balance_credits == 5000
    assert checkout_id("660001") not in on_demand


def test_a_refund_of_a_renewal_is_not_the_checkout_orders(adapter: LemonSqueezy, ledger: Ledger) -> None:
    """Only the initial invoice is the checkout order's payment: a renewal's
    credits stay when the first payment is refunded."""
    b = Builder()
    started(adapter, b)
    paid(adapter, b)
    send(adapter, b.subscription_event("subscription_updated", updated=R1 + 2 * SEC, renews_at=R1 + 28 * DAY))
    paid(adapter, b, invoice="550002", reason="renewal", created=R1, updated=R1 + SEC)
    assert ledger.balance(USER).balance_credits == 10000
    send(adapter, checkout_refund(b, 2500, R1 + DAY, full=True))
    assert ledger.balance(USER).balance_credits == 5000


@pytest.mark.parametrize(
    ("status", "refunded", "amount", "total", "level"),
    [
        ("paid", False, 0, 2500, 0),
        ("paid", False, 100, 2500, 100),  # the docs' example: a partial refund leaves status paid
        ("partial_refund", True, 1000, 2500, 1000),
        ("partial_refund", False, 1000, 2500, 1000),
        ("refunded", True, 2500, 2500, 2500),
        ("refunded", True, 0, 2500, 2500),  # a full refund is the whole total, whatever the amount says
        ("paid", True, 2500, 2500, 2500),
        ("refunded", True, 0, 0, 1),  # a free order: 1, so that its credits come back too
    ],
)
def test_refunded_level(status: str, refunded: bool, amount: int, total: int, level: int) -> None:
    assert refunded_level(status, refunded, amount, total) == level


def test_a_pack_order_before_the_pack_is_configured_fails_and_is_granted_once_configured(ledger: Ledger) -> None:
    b = Builder()
    unconfigured = adapter_for(ledger, credit_packs={})
    body = b.order_event("order_created", "660002", variant="9001", total=1000, at=START)
    first = send(unconfigured, body)
    assert first.processing == "failed"
    assert first.reason.startswith("UnconfiguredPack: paid order 660002: variant 9001 is not a configured credit pack")
    assert unconfigured.retry_failed().failed == 1  # still not configured: still failed, nothing recorded
    with pytest.raises(UnknownAccount):
        ledger.balance(USER)
    configured = adapter_for(ledger)  # the operator configures the pack; the cron retries
    assert configured.retry_failed().processed == 1
    assert ledger.balance(USER).balance_credits == 1000
    resent = send(configured, Delivery(START, "order_created", body).resent("dashboard").body)
    assert resent.reason == "this order was applied before; nothing changed"
    assert ledger.balance(USER).balance_credits == 1000


def test_a_pack_order_resent_after_configuring_the_pack_is_granted_once(ledger: Ledger) -> None:
    b = Builder()
    body = b.order_event("order_created", "660002", variant="9001", total=1000, at=START)
    assert send(adapter_for(ledger, credit_packs={}), body).processing == "failed"
    configured = adapter_for(ledger)
    for salt in ("dashboard", "again"):
        send(configured, Delivery(START, "order_created", body).resent(salt).body)
    assert ledger.balance(USER).balance_credits == 1000
    assert [e.data["amount"] for e in ledger.history(USER) if e.type == "granted"] == [1000]


def test_a_refund_never_takes_held_credits_and_records_the_shortfall(adapter: LemonSqueezy, ledger: Ledger) -> None:
    b = Builder()
    send(adapter, b.order_event("order_created", "660002", variant="9001", total=1000, at=START))  # 1,000 credits
    ledger.spend(USER, 700, key="spent")
    ledger.execute(ReserveCredits(key="hold", user_id=USER, job_id=uuid4(), amount_credits=200, expires_at=START + DAY))
    result = send(
        adapter,
        b.order_event(
            "order_refunded",
            "660002",
            variant="9001",
            total=1000,
            at=START,
            status="refunded",
            refunded_amount=1000,
            refunded=True,
            updated=START + 2 * SEC,
        ),
    )
    assert "900 of 1000 credits to claw back were spent, held or lapsed; not taken" in result.reason
    balance = ledger.balance(USER)
    assert (balance.balance_credits, balance.held_credits, balance.available_credits) == (200, 200, 0)
    payment = ledger.app.repository.get(payment_id("order", "660002"))
    assert isinstance(payment, Payment) and (payment.clawed, payment.shortfall) == (100, 900)


@pytest.mark.parametrize(("from_other", "left"), [(True, 4000), (False, 5000)])
def test_a_refund_takes_other_credits_only_if_the_policy_says_so(ledger: Ledger, from_other: bool, left: int) -> None:
    adapter = adapter_for(ledger, refund_policy=RefundPolicy(from_other_credits=from_other))
    b = Builder()
    send(adapter, b.order_event("order_created", "660002", variant="9001", total=1000, at=START))
    send(adapter, b.order_event("order_created", "660003", variant="9002", total=4000, at=START + SEC))
    ledger.spend(USER, 1000, key="spend-all-of-the-first-pack")  # draws the oldest pack first
    send(
        adapter,
        b.order_event(
            "order_refunded",
            "660002",
            variant="9001",
            total=1000,
            at=START,
            status="refunded",
            refunded_amount=1000,
            refunded=True,
            updated=START + DAY,
        ),
    )
    assert ledger.balance(USER).balance_credits == left


def test_a_refund_before_the_purchase_grants_then_claws_back(adapter: LemonSqueezy, ledger: Ledger) -> None:
    b = Builder()
    refunded = b.order_event(
        "order_refunded",
        "660002",
        variant="9001",
        total=1000,
        at=START,
        status="refunded",
        refunded_amount=1000,
        refunded=True,
        updated=START + DAY,
    )
    send(adapter, refunded)
    send(adapter, b.order_event("order_created", "660002", variant="9001", total=1000, at=START))
    assert ledger.balance(USER).balance_credits == 0
    assert [(e.type, e.data["amount"]) for e in ledger.history(USER)[1:]] == [("granted", 1000), ("debited", 1000)]


def test_the_order_that_starts_a_subscription_grants_nothing(adapter: LemonSqueezy, ledger: Ledger) -> None:
    b = Builder()
    result = send(adapter, b.order_event("order_created", "660001", variant="1001", total=2500, at=START))
    assert result.reason == "a subscription's checkout order: its invoices grant the credits"
    pending = send(
        adapter, b.order_event("order_created", "660005", variant="777", total=100, at=START, status="pending")
    )
    assert pending.reason == "variant 777 is not a configured credit pack; nothing granted"  # not paid: nothing owed
    with pytest.raises(UnknownAccount):
        ledger.balance(USER)


def test_a_resent_event_changes_nothing_twice(adapter: LemonSqueezy, ledger: Ledger) -> None:
    from tests.lemonsqueezy_support import Delivery

    b = Builder()
    started(adapter, b)
    body = b.initial_invoice_event()
    send(adapter, body)
    resent = Delivery(START, "subscription_payment_success", body).resent("dashboard")
    result = send(adapter, resent.body)
    assert (result.status, result.reason) == ("stored", "this invoice was applied before; nothing changed")
    assert ledger.balance(USER).balance_credits == 5000


def test_the_user_id_of_a_row_is_a_uuid(adapter: LemonSqueezy) -> None:
    result = started(adapter)
    assert isinstance(result.event_row_id, UUID)


def test_a_batch_of_deliveries_reads_what_it_needs_in_one_bulk_read(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit runs concurrent deliveries' commands as one batch: the
    aggregates they will read are read together, not once per command."""
    from adapters.lemonsqueezy._effects import ApplyOrder

    users = [uuid4() for _ in range(5)]
    orders = [
        ApplyOrder(
            key=f"order-{i}",
            order_id=str(660100 + i),
            customer_id=str(770100 + i),
            status="paid",
            variant_id="9001",
            quantity=1,
            currency="USD",
            total=900,
            refunded_amount=0,
            custom_user=user,
            pack_credits=1000,
        )
        for i, user in enumerate(users)
    ]
    loads: list[int] = []
    original = ledger.engine.reader.load

    def counting(ids: Any, **kw: Any) -> Any:
        loads.append(len(list(ids)))
        return original(ids, **kw)

    monkeypatch.setattr(ledger.engine.reader, "load", counting)
    receipts = ledger.execute_batch(orders)
    monkeypatch.undo()
    # Every order's customer link, payment and key record, and its user's account: one read.
    assert loads == [5 * 3 + 5], loads
    assert [r.amount_credits for r in receipts] == [1000] * 5
    assert all(ledger.balance(u).balance_credits == 1000 for u in users)
