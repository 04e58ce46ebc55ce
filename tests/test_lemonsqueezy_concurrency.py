"""Concurrent deliveries: they share ledger transactions through the
ledger's group commit (``tests/test_group_commit.py`` tests the mechanism),
and many customers' stories delivered at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any
from uuid import UUID, uuid4

import pytest

from adapters.lemonsqueezy._state import ledger_subscription_id
from ledger import Command, Ledger, Receipt
from tests.lemonsqueezy_support import BEFORE, END, Builder, StoryClock, adapter_for, headers_for, open_ledger, story


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    with open_ledger(ledger_url, StoryClock(BEFORE)) as opened:
        yield opened


@pytest.fixture
def shared_ledger(durable_url: str) -> Iterator[Ledger]:
    with open_ledger(durable_url, StoryClock(BEFORE)) as opened:
        yield opened


def test_many_customers_stories_at_once(shared_ledger: Ledger) -> None:
    """Twelve customers' whole stories, four threads, each thread delivering
    its customers' events in order; the clock held before the story."""
    ledger = shared_ledger
    adapter = adapter_for(ledger)
    customers = [
        Builder(user=uuid4(), subscription=str(890000 + i), customer=780000 + i, offset=1000 * (i + 1))
        for i in range(12)
    ]
    plans = {b.subscription: story(b) for b in customers}
    errors: list[Any] = []

    def worker(mine: list[Builder]) -> None:
        for b in mine:
            for delivery in plans[b.subscription]:
                result = adapter.ingest(delivery.body, headers_for(delivery.body))
                if result.http_status != 200:
                    errors.append(result)

    threads = [threading.Thread(target=worker, args=(customers[n::4],)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    for _ in range(3):
        adapter.retry_failed()
    assert adapter.inbox.counts() == {"processed": 12 * len(story())}
    ledger.tick(END, allow_future=True)  # the story ends ahead of its clock
    for b in customers:
        assert b.user is not None
        assert ledger.balance(b.user).balance_credits == 5000
        view = ledger.subscription(ledger_subscription_id(b.subscription))
        assert (view.status, view.plan, view.user_id) == ("expired", "pro", b.user)
        grants = sorted(e.data["amount"] for e in ledger.history(b.user) if e.type == "granted")
        assert grants == [1000, 5000, 5000, 5000, 10000, 15000, 15000]
    assert adapter.processor.group is ledger.group_commit  # one mechanism, the ledger's
    stats = ledger.group_commit.stats
    assert stats.shared_batches > 0 and stats.shared_commands > stats.shared_batches


def test_receipts_are_a_commands_own(ledger: Ledger) -> None:
    """A batch with a command that fails commits the others; each receipt and
    error is its own command's."""
    group = ledger.group_commit
    user = uuid4()
    from ledger import GrantCredits, SpendCredits

    commands: list[Command] = [
        GrantCredits(key=f"g-{i}", user_id=user, amount_credits=10, kind="bonus")  # type: ignore[arg-type]
        for i in range(3)
    ]
    commands.append(SpendCredits(key="too-much", user_id=UUID(int=1), amount_credits=5))
    receipts: dict[str, Receipt | Exception] = {}

    def run(command: Command) -> None:
        try:
            receipts[command.key] = group.execute(command)
        except Exception as exc:
            receipts[command.key] = exc

    threads = [threading.Thread(target=run, args=(c,)) for c in commands]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert ledger.balance(user).balance_credits == 30
    assert type(receipts["too-much"]).__name__ == "UnknownAccount"
    for i in range(3):
        receipt = receipts[f"g-{i}"]
        assert isinstance(receipt, Receipt) and receipt.key == f"g-{i}" and receipt.amount_credits == 10
