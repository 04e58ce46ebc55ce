"""One customer's whole story through the Lemon Squeezy adapter: checkout,
initial invoice, renewals, a plan change with a proration invoice, a credit
pack bought and refunded, a failed payment and its recovery, pause, unpause,
cancel, resume, cancel again, expiry.

Replayed in order, then with every delivery duplicated, re-sent under new
webhook ids, shuffled (fixed seeds), and with processing failures injected and
retried. What must come out identical every time:

* the ``subscriptions`` row (as Lemon Squeezy's snapshots describe it, its
  cancelled_at, paused_at and ended_at the provider's; the row's created_at
  and updated_at are when the ledger learned of it) and
  ``subscription_snapshots``;
* every credit movement in ``credit_transactions`` (amount, kind, reference,
  key, description; not the running balance_after or the expirations' ids,
  which depend on the order the ledger ran in) and the balance;
* ``subscription_history``, whole: a subscription Lemon Squeezy drives has
  its history written from every snapshot it sent (late ones included), at
  the snapshots' own times, so the rows and their ids are the same whatever
  order the deliveries were processed in.

Time: the baseline runs each delivery at the moment it is sent. Variants that
deliver out of order run with the ledger's clock held before the story, so
that only the order changes (a delivery processed after its period ended
legitimately grants nothing: tested on its own in test_lemonsqueezy_effects).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from adapters.lemonsqueezy import LemonSqueezy
from ledger import Ledger, audit
from ledger.storage.eventstore import LedgerApplication
from tests.lemonsqueezy_support import (
    BEFORE,
    Delivery,
    Stores,
    StoryClock,
    adapter_for,
    final_state,
    headers_for,
    open_ledger,
    store_factory,
    story,
)

SEEDS = [7, 1234, 20300505]


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def stores(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    """A factory of fresh, empty stores of one backend (a replay and its baseline each get one)."""
    yield from store_factory(request.param, tmp_path_factory, "ls")


class Run:
    """A ledger and its adapter for one replay."""

    def __init__(self, url: str, clock: StoryClock) -> None:
        self.clock = clock
        self.ledger: Ledger = open_ledger(url, clock)
        self.adapter: LemonSqueezy = adapter_for(self.ledger)
        self.results: list[Any] = []

    def deliver(self, deliveries: list[Delivery], *, follow_clock: bool) -> None:
        for delivery in deliveries:
            if follow_clock:
                self.clock.set(delivery.at)
            result = self.adapter.ingest(delivery.body, headers_for(delivery.body))
            assert result.http_status == 200, result
            self.results.append(result)

    def retry_until_done(self) -> None:
        for _ in range(5):
            if self.adapter.inbox.counts().get("failed", 0) == 0:
                return
            self.adapter.retry_failed()
        assert self.adapter.inbox.counts().get("failed", 0) == 0, self.adapter.inbox.listing(status="failed", limit=5)

    def state(self) -> dict[str, Any]:
        assert self.adapter.inbox.counts().get("failed", 0) == 0
        state = final_state(self.ledger)
        # Every replay must also pass the auditor: keys recorded once with
        # their receipts, the balance chain, the views equal to the events.
        report = audit(self.ledger)
        assert report.findings == [], report.findings[:5]
        # And the views built afresh from the events equal the live ones
        # (subscription_snapshots and the history rewritten from it included).
        views = self.ledger.views
        aside = views.build_aside(until=views.position())
        try:
            found = views.verify(aside)
            assert {"subscription_history", "subscription_snapshots"} <= set(found)
            assert all(not rows for rows in found.values()), found
        finally:
            self.ledger.views.drop_aside(aside)
        self.ledger.close()
        return state


def _naive(value: Any) -> Any:
    """A time as naive UTC, from any store's column (aware, naive or text)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def baseline(url: str) -> dict[str, Any]:
    run = Run(url, StoryClock(BEFORE))
    run.deliver(story(), follow_clock=True)
    return run.state()


def assert_same(state: dict[str, Any], expected: dict[str, Any]) -> None:
    for name in (
        "subscriptions",
        "snapshots",
        "credit_transactions",
        "credit_balances",
        "balance",
        "blocks",
        "history_changes",
    ):
        assert state[name] == expected[name], name


def test_the_story_in_order(stores: Stores) -> None:
    state = baseline(stores())
    kinds = sorted((row[2], row[1]) for row in state["credit_transactions"])
    assert kinds == sorted(
        [
            ("subscription_grant", 5000),  # initial invoice, Starter
            ("subscription_renew", 5000),  # first renewal, Starter
            ("subscription_grant", 10000),  # proration invoice: Pro minus Starter (upgrade policy "full")
            ("purchase", 1000),  # credit pack, later refunded
            ("refund", -1000),
            ("purchase", 5000),  # credit pack kept
            ("subscription_renew", 15000),  # the renewal that failed, then was recovered
            ("subscription_renew", 15000),  # second renewal, Pro
            *[("expiration", -n) for n in (5000, 5000, 10000, 15000, 15000)],  # every period's credits lapsed
        ]
    )
    assert state["balance"] == (5000, 0, 5000)
    changes = [c[1] for c in state["history_changes"]]
    assert changes == [
        "created",
        "upgraded",
        "past_due",
        "recovered",
        "paused",
        "unpaused",
        "cancelled",
        "resumed",
        "cancelled",
        "expired",
    ]
    subscription = state["subscriptions"][0]
    assert "expired" in subscription and "monthly" in subscription and "880001" in subscription
    # The provider's times: cancelled by the snapshot of the second cancellation (the first was
    # resumed), ended at its ends_at; not when the ledger processed them.
    times = {_naive(v) for v in subscription}
    assert {datetime(2030, 4, 20, 10), datetime(2030, 5, 5, 10)} <= times
    assert "cancelled at the payment provider" in subscription


def test_every_delivery_twice_and_resent_under_new_ids(stores: Stores) -> None:
    expected = baseline(stores())
    run = Run(stores(), StoryClock(BEFORE))
    deliveries = [d for original in story() for d in (original, original, original.resent("dashboard"))]
    run.deliver(deliveries, follow_clock=True)
    assert sum(r.status == "duplicate" for r in run.results) == len(deliveries) // 3
    assert_same(run.state(), expected)


def test_the_story_shuffled_duplicated_and_resent(stores: Stores) -> None:
    expected = baseline(stores())
    for seed in SEEDS:
        run = Run(stores(), StoryClock(BEFORE))
        deliveries = [d for original in story() for d in (original, original, original.resent(str(seed)))]
        random.Random(seed).shuffle(deliveries)
        run.deliver(deliveries, follow_clock=False)
        run.retry_until_done()
        assert_same(run.state(), expected)


def test_processing_failures_injected_then_retried(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every third save of the ledger fails (a lost connection, say) while
    the story is delivered; ``webhooks retry`` then reprocesses what failed."""
    expected = baseline(stores())
    injected = _inject_failures(monkeypatch, every=3)
    run = Run(stores(), StoryClock(BEFORE))
    injected["on"] = True
    run.deliver(story(), follow_clock=False)
    injected["on"] = False
    assert injected["count"] > 3
    assert any(r.processing == "failed" for r in run.results)
    run.retry_until_done()
    assert_same(run.state(), expected)


def test_failures_retried_by_a_frequent_cron_keep_the_history(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """Failed deliveries retried right after, as a cron running ``webhooks
    retry`` every minute would, before the next change arrives: the ledger
    goes through every state, so even the history is identical."""
    expected = baseline(stores())
    injected = _inject_failures(monkeypatch, every=3)
    clock = StoryClock(BEFORE)
    run = Run(stores(), clock)
    for delivery in story():
        clock.set(delivery.at)
        injected["on"] = True
        run.deliver([delivery], follow_clock=False)
        injected["on"] = False
        run.adapter.retry_failed()
    assert injected["count"] > 3
    run.retry_until_done()
    assert_same(run.state(), expected)


def _inject_failures(monkeypatch: pytest.MonkeyPatch, every: int) -> dict[str, Any]:
    state: dict[str, Any] = {"on": False, "calls": 0, "count": 0}
    original = LedgerApplication.save_all

    def flaky(self: LedgerApplication, objs: Any) -> Any:
        if state["on"]:
            state["calls"] += 1
            if state["calls"] % every == 1:
                state["count"] += 1
                raise ConnectionError("injected: the database connection was lost")
        return original(self, objs)

    monkeypatch.setattr(LedgerApplication, "save_all", flaky)
    return state
