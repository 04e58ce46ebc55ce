"""Concurrent deliveries: the group commit that lets them share ledger
transactions, and many customers' stories delivered at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any
from uuid import UUID, uuid4

import pytest

from adapters.lemonsqueezy._state import ledger_subscription_id
from adapters.webhooks import GroupCommit
from ledger import Command, Ledger, Receipt
from tests.lemonsqueezy_support import BEFORE, END, Builder, StoryClock, adapter_for, headers_for, open_ledger, story


class FakeLedger:
    """execute_batch fails if any command is 'bad'; execute fails only for the bad one."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.singles = 0
        self.lock = threading.Lock()

    def execute(self, command: Any) -> Any:
        time.sleep(0.002)  # a commit: others queue meanwhile
        with self.lock:
            self.singles += 1
        if command.key.startswith("bad"):
            raise ValueError(f"{command.key} is bad")
        return command.key

    def execute_batch(self, commands: list[Any]) -> list[Any]:
        time.sleep(0.002)  # a commit: others queue meanwhile
        with self.lock:
            self.batches.append(len(commands))
        if any(c.key.startswith("bad") for c in commands):
            raise ValueError("batch rejected")
        return [c.key for c in commands]


class Key:
    def __init__(self, key: str) -> None:
        self.key = key


def test_group_commit_gives_each_thread_its_own_result_and_never_hangs() -> None:
    fake = FakeLedger()
    group = GroupCommit(fake, max_batch=8)  # type: ignore[arg-type]
    results: dict[str, Any] = {}

    def worker(n: int) -> None:
        for i in range(25):
            key = f"{'bad' if (n * 25 + i) % 17 == 0 else 'ok'}-{n}-{i}"
            try:
                results[key] = group.execute(Key(key))  # type: ignore[arg-type]
            except ValueError as exc:
                results[key] = exc

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert len(results) == 200
    for key, result in results.items():
        if key.startswith("bad"):
            assert isinstance(result, ValueError) and str(result) == f"{key} is bad"
        else:
            assert result == key
    assert max(fake.batches) > 1  # commands did share transactions
    assert all(size <= 8 for size in fake.batches)


def test_alone_a_command_runs_at_once_as_a_single_command() -> None:
    fake = FakeLedger()
    group = GroupCommit(fake)  # type: ignore[arg-type]
    assert group.execute(Key("ok-1")) == "ok-1"  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bad-1 is bad"):
        group.execute(Key("bad-1"))  # type: ignore[arg-type]
    assert (fake.batches, fake.singles) == ([], 2)


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
    group = adapter.processor.group
    assert group.batches > 0 and group.batched > group.batches


def test_receipts_are_a_commands_own(ledger: Ledger) -> None:
    """Through the real ledger: a batch with a command that fails is rejected
    and its commands run alone; the others' receipts are theirs."""
    group = GroupCommit(ledger)
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
