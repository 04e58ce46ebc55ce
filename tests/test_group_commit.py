"""Group commit in the core: concurrent commands share transactions, and
each gets its own receipt or error (``ledger.application.group``)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import OperationalError

from ledger import (
    Command,
    ConcurrencyExhausted,
    ConfigurationError,
    GrantCredits,
    GroupCommit,
    GroupCommitPolicy,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidArgument,
    Ledger,
    LedgerError,
    ManualClock,
    Receipt,
    ReservationClosed,
    SpendCredits,
    UnknownAccount,
)
from ledger.application.group import RunCounts, run_each
from ledger.extension import UnitOfWork

FAR = datetime(2099, 1, 1, tzinfo=UTC)
START = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def grouped(ledger_url: str) -> Iterator[Ledger]:
    with Ledger(ledger_url, group_commit=True) as opened:
        yield opened


def run_threads(count: int, target: Any) -> None:
    threads = [threading.Thread(target=target, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread never got its command's result"


# ---------------------------------------------------------------- many threads


@pytest.fixture
def gathering(ledger_url: str) -> Iterator[Ledger]:
    """Group commit that waits a little for batch-mates: batches form even
    where a commit is too quick for threads to queue behind it (memory)."""
    with Ledger(ledger_url, group_commit=GroupCommitPolicy(max_wait_s=0.005)) as opened:
        yield opened


def test_many_threads_mixed_commands_each_get_their_own_outcome(gathering: Ledger) -> None:
    """Eight threads, each the only writer of its two accounts, run a script
    of grants, spends (some too large), holds, settles, releases, and closes
    of holds closed before. Each outcome must be what the script gives run
    alone, whatever batch-mates failed beside it."""
    ledger = gathering
    threads = 8
    owners = {n: (uuid4(), uuid4()) for n in range(threads)}
    problems: list[str] = []
    finals: dict[UUID, int] = {}
    positions: Counter[int] = Counter()
    lock = threading.Lock()

    def worker(n: int) -> None:
        for user in owners[n]:
            balance = 0
            script: list[tuple[Command, int | type[LedgerError]]] = []
            balance += 100
            script.append((GrantCredits(key=f"{user}:g1", user_id=user, amount_credits=100, kind="bonus"), balance))  # type: ignore[arg-type]
            for i in range(8):
                amount = 30 if i % 3 else 500  # every third one asks too much
                if amount <= balance:
                    balance -= amount
                    expected: int | type[LedgerError] = balance
                else:
                    expected = InsufficientCredits
                script.append((SpendCredits(key=f"{user}:s{i}", user_id=user, amount_credits=amount), expected))
            balance += 50
            script.append((GrantCredits(key=f"{user}:g2", user_id=user, amount_credits=50, kind="bonus"), balance))  # type: ignore[arg-type]
            script.append((SpendCredits(key=f"{user}:nobody", user_id=uuid4(), amount_credits=1), UnknownAccount))
            for command, want in script:
                got: Receipt | LedgerError
                try:
                    got = ledger.execute(command)
                except LedgerError as exc:
                    got = exc
                ok = (
                    isinstance(got, want)
                    if isinstance(want, type)
                    else (isinstance(got, Receipt) and got.balance_credits == want and got.key == command.key)
                )
                if not ok:
                    problems.append(f"{command.key}: wanted {want}, got {got!r}")
                elif isinstance(got, Receipt) and got.position is not None:
                    with lock:
                        positions[got.position] += 1
            # A hold, settled once; the second settle is refused on its own.
            hold = ledger.reserve(user, uuid4(), 20, FAR, key=f"{user}:r")
            assert hold.reservation_id is not None
            settled = ledger.settle(hold.reservation_id, 15, key=f"{user}:settle")
            finals[user] = balance - 15
            if settled.balance_credits != finals[user]:
                problems.append(f"{user}: settled to {settled.balance_credits}")
            try:
                ledger.release(hold.reservation_id, "late", key=f"{user}:release")
                problems.append(f"{user}: released a settled hold")
            except ReservationClosed:
                pass

    run_threads(threads, worker)
    assert problems == []
    assert len(finals) == threads * 2
    for user, final in finals.items():
        b = ledger.balance(user)
        assert (b.balance_credits, b.held_credits) == (final, 0)
        # Every command that succeeded left its events once; no refused one left any.
        keys = Counter(e.data.get("key") for e in ledger.history(user))
        spends = [k for k in keys if k and ":s" in k and "settle" not in k]
        assert all(count == 1 for k, count in keys.items() if k), keys
        assert len(spends) == 3  # 100 -> 70 -> 40 -> 10, then too little for 30
    stats = ledger.group_commit.stats
    assert stats.failed >= threads * 2 * 4  # the refusals, each its own
    assert stats.shared_batches > 0, stats  # commands did share transactions
    assert max(positions.values()) > 1  # receipts of one shared commit


def test_hot_account_sixteen_threads(grouped: Ledger) -> None:
    """Sixteen threads spend from one account: no ConcurrencyExhausted, every
    credit accounted for once, refusals only once the credits ran out."""
    ledger = grouped
    user = uuid4()
    ledger.grant(user, 300, "bonus", key=f"{user}:fund")
    outcomes: dict[str, Receipt | LedgerError] = {}

    def worker(n: int) -> None:
        for i in range(25):
            key = f"{user}:{n}:{i}"
            try:
                outcomes[key] = ledger.spend(user, 1, key=key)
            except LedgerError as exc:
                outcomes[key] = exc

    run_threads(16, worker)
    errors = [o for o in outcomes.values() if isinstance(o, LedgerError)]
    receipts = [o for o in outcomes.values() if isinstance(o, Receipt)]
    assert all(isinstance(e, InsufficientCredits) for e in errors), errors[:3]
    assert not any(isinstance(e, ConcurrencyExhausted) for e in errors)
    assert len(receipts) == 300 and len(errors) == 100
    # Serial on the account: the balances after each spend are 299..0, each once.
    assert sorted(r.balance_credits for r in receipts) == list(range(300))
    assert ledger.balance(user).balance_credits == 0
    debits = [e for e in ledger.history(user) if e.type == "debited"]
    assert len(debits) == 300 and len({e.data["key"] for e in debits}) == 300
    assert ledger.group_commit.stats.clashes == 0


def test_replays_under_load_return_the_first_receipt(grouped: Ledger) -> None:
    """Four threads send the same twenty keys at once: each key is applied
    once, and every other copy is a replay of its first receipt; a key reused
    with other arguments is refused on its own."""
    ledger = grouped
    user = uuid4()
    ledger.grant(user, 1000, "bonus", key=f"{user}:fund")
    got: dict[int, list[Receipt]] = {n: [] for n in range(4)}
    conflicts: list[str] = []

    def worker(n: int) -> None:
        for i in range(20):
            got[n].append(ledger.spend(user, 10, key=f"{user}:k{i}"))
            try:
                ledger.spend(user, 11, key=f"{user}:k{i}")  # same key, other amount
            except IdempotencyConflict as exc:
                conflicts.append(exc.key)

    run_threads(4, worker)
    assert len(conflicts) == 80
    for i in range(20):
        copies = [got[n][i] for n in range(4)]
        assert sum(1 for r in copies if not r.replayed) == 1
        first = next(r for r in copies if not r.replayed)
        for r in copies:
            assert (r.entry_id, r.balance_credits, r.amount_credits) == (
                first.entry_id,
                first.balance_credits,
                first.amount_credits,
            )
    assert ledger.balance(user).balance_credits == 1000 - 200
    assert sum(1 for e in ledger.history(user) if e.type == "debited") == 20


def test_submitted_commands_of_one_account_run_in_order(gathering: Ledger) -> None:
    """A caller that submits without waiting sees its commands applied in the
    order it submitted them, batch after batch."""
    ledger = gathering
    user = uuid4()
    ledger.grant(user, 1000, "bonus", key=f"{user}:fund")
    futures = [
        ledger.group_commit.submit(SpendCredits(key=f"{user}:{i}", user_id=user, amount_credits=1)) for i in range(150)
    ]
    receipts = [f.result(timeout=120) for f in futures]
    assert [r.balance_credits for r in receipts] == list(range(999, 849, -1))
    keys = [e.data["key"] for e in ledger.history(user) if e.type == "debited"]
    assert keys == [f"{user}:{i}" for i in range(150)]
    assert ledger.group_commit.stats.shared_batches > 0


def test_an_async_host_awaits_its_commands(grouped: Ledger) -> None:
    ledger = grouped
    users = [uuid4() for _ in range(5)]

    async def main() -> list[Receipt | BaseException]:
        tasks = []
        for i in range(60):
            user = users[i % 5]
            grant = GrantCredits(key=f"{user}:{i}", user_id=user, amount_credits=i + 1, kind="bonus")  # type: ignore[arg-type]
            tasks.append(asyncio.wrap_future(ledger.group_commit.submit(grant)))
        tasks.append(
            asyncio.wrap_future(ledger.group_commit.submit(SpendCredits(key="x", user_id=uuid4(), amount_credits=1)))
        )
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[-1], UnknownAccount)
    assert all(isinstance(r, Receipt) for r in results[:-1])
    for k, user in enumerate(users):
        assert ledger.balance(user).balance_credits == sum(i + 1 for i in range(k, 60, 5))


# ------------------------------------------------------------ one batch


def test_a_refusal_in_a_batch_drops_only_its_command(ledger: Ledger) -> None:
    a, b, c = uuid4(), uuid4(), uuid4()
    ledger.grant(b, 5, "bonus", key=f"{b}:fund")
    counts = RunCounts()
    outcomes = run_each(
        ledger.engine,
        [
            GrantCredits(key="a", user_id=a, amount_credits=10, kind="bonus"),  # type: ignore[arg-type]
            SpendCredits(key="b", user_id=b, amount_credits=6),
            SpendCredits(key="nobody", user_id=uuid4(), amount_credits=1),
            GrantCredits(key="c", user_id=c, amount_credits=20, kind="bonus"),  # type: ignore[arg-type]
            SpendCredits(key="b2", user_id=b, amount_credits=5),
            "not a command",
        ],
        counts=counts,
    )
    assert isinstance(outcomes[1], InsufficientCredits) and isinstance(outcomes[2], UnknownAccount)
    assert isinstance(outcomes[5], InvalidArgument)
    ra, rc, rb2 = outcomes[0], outcomes[3], outcomes[4]
    assert isinstance(ra, Receipt) and isinstance(rc, Receipt) and isinstance(rb2, Receipt)
    assert (ra.balance_credits, rc.balance_credits, rb2.balance_credits) == (10, 20, 0)
    assert ra.position == rc.position == rb2.position is not None  # one transaction
    assert counts.restarts == 0  # nothing to undo: refusals come before events
    assert [ledger.balance(u).balance_credits for u in (a, b, c)] == [10, 0, 20]
    # Failed keys stay free.
    assert ledger.engine.find_record("b") is None and ledger.engine.find_record("nobody") is None
    ledger.grant(b, 6, "bonus", key=f"{b}:more")
    assert ledger.spend(b, 6, key="b").balance_credits == 0


def test_a_refusal_after_a_due_event_leaves_no_trace(ledger_url: str) -> None:
    """A spend that finds a hold expired (an event) and then too few credits
    fails; the batch starts over without it, so the release it found due is
    not recorded by it, and its batch-mates commit."""
    clock = ManualClock(START)
    with Ledger(ledger_url, clock=clock) as ledger:
        user, other = uuid4(), uuid4()
        ledger.grant(user, 10, "bonus", key=f"{user}:fund")
        ledger.reserve(user, uuid4(), 8, START + timedelta(minutes=1), key=f"{user}:hold")
        ledger.balance(user)  # warm the command cache on both paths
        clock.advance(timedelta(minutes=5))
        events_before = len(ledger.history(user))
        counts = RunCounts()
        outcomes = run_each(
            ledger.engine,
            [
                GrantCredits(key=f"{other}:g", user_id=other, amount_credits=7, kind="bonus"),  # type: ignore[arg-type]
                SpendCredits(key=f"{user}:too-much", user_id=user, amount_credits=11),
                GrantCredits(key=f"{other}:g2", user_id=other, amount_credits=1, kind="bonus"),  # type: ignore[arg-type]
            ],
            counts=counts,
        )
        assert isinstance(outcomes[1], InsufficientCredits)
        assert [o.balance_credits for o in (outcomes[0], outcomes[2]) if isinstance(o, Receipt)] == [7, 8]
        # Once, without it: the batch's read brought the cached account up to
        # date with the store (``Unit._cached_accounts``), so the refusal was
        # decided on the store's state and needs no second decision.
        assert counts.restarts == 1
        assert len(ledger.history(user)) == events_before  # the due release waits for a command that succeeds
        assert ledger.spend(user, 10, key=f"{user}:all").balance_credits == 0  # the hold is released now


@dataclass(frozen=True)
class GrantThenFail(Command):
    """An extension command that changes an account, then refuses."""

    name: ClassVar[str] = "grant_then_fail"
    user_id: UUID = field(kw_only=True)
    error: str = field(default="ledger", kw_only=True)

    def apply(self, unit: UnitOfWork) -> Receipt:
        account = unit.account(self.user_id, open_missing=True)
        account.grant(
            entry_id=uuid4(),
            amount=1,
            kind="bonus",  # type: ignore[arg-type]
            description="",
            reference_type=None,
            reference_id=None,
            expires_at=None,
            actor=None,
            key=self.key,
            now=unit.now,
        )
        if self.error == "ledger":
            raise InsufficientCredits(self.user_id, 1, 0)
        raise ValueError("a bug in an extension's command")


def test_a_command_that_fails_after_changing_an_account_is_undone(ledger: Ledger) -> None:
    user = uuid4()
    ledger.grant(user, 5, "bonus", key=f"{user}:fund")
    counts = RunCounts()
    outcomes = run_each(
        ledger.engine,
        [
            GrantCredits(key="before", user_id=user, amount_credits=1, kind="bonus"),  # type: ignore[arg-type]
            GrantThenFail(key="bad", user_id=user),
            GrantThenFail(key="buggy", user_id=user, error="bug"),
            GrantCredits(key="after", user_id=user, amount_credits=1, kind="bonus"),  # type: ignore[arg-type]
        ],
        counts=counts,
    )
    assert isinstance(outcomes[1], InsufficientCredits)
    assert isinstance(outcomes[2], ValueError)
    assert [o.balance_credits for o in (outcomes[0], outcomes[3]) if isinstance(o, Receipt)] == [6, 7]
    assert counts.restarts == 2
    assert ledger.balance(user).balance_credits == 7
    grants = [e.data["key"] for e in ledger.history(user) if e.type == "granted"]
    assert grants == [f"{user}:fund", "before", "after"]


def test_keys_twice_in_one_batch(ledger: Ledger) -> None:
    user = uuid4()
    ledger.grant(user, 100, "bonus", key=f"{user}:fund")
    outcomes = run_each(
        ledger.engine,
        [
            SpendCredits(key="s", user_id=user, amount_credits=10),
            SpendCredits(key="s", user_id=user, amount_credits=10),  # a retry: the first's receipt
            SpendCredits(key="s", user_id=user, amount_credits=20),  # other arguments: refused alone
            SpendCredits(key="t", user_id=user, amount_credits=500),  # refused: the key stays free
            SpendCredits(key="t", user_id=user, amount_credits=5),  # so this one runs
        ],
    )
    first, again, conflict, refused, second = outcomes
    assert isinstance(first, Receipt) and isinstance(again, Receipt) and isinstance(second, Receipt)
    assert not first.replayed and again.replayed and again.entry_id == first.entry_id
    assert isinstance(conflict, IdempotencyConflict) and conflict.fields == ("amount_credits",)
    assert isinstance(refused, InsufficientCredits)
    assert second.balance_credits == 85
    assert ledger.balance(user).balance_credits == 85


def test_a_batch_replays_keys_recorded_before(ledger: Ledger) -> None:
    user = uuid4()
    ledger.grant(user, 100, "bonus", key=f"{user}:fund")
    first = ledger.spend(user, 60, key="old")
    outcomes = run_each(
        ledger.engine,
        [
            SpendCredits(key="old", user_id=user, amount_credits=60),  # would now be refused: replays
            SpendCredits(key="new", user_id=user, amount_credits=40),
            SpendCredits(key="old", user_id=user, amount_credits=61),
        ],
    )
    replay, new, conflict = outcomes
    assert isinstance(replay, Receipt) and replay.replayed and replay.entry_id == first.entry_id
    assert isinstance(new, Receipt) and new.balance_credits == 0
    assert isinstance(conflict, IdempotencyConflict)


def test_refusals_are_decided_on_the_store_not_a_stale_cache(durable_url: str) -> None:
    """Process A has the account cached; process B funds it. A's batch must
    not refuse on its stale copy, and a key B recorded meanwhile replays."""
    user, other = uuid4(), uuid4()
    with Ledger(durable_url, group_commit=True) as a, Ledger(durable_url) as b:
        a.grant(user, 10, "bonus", key=f"{user}:g1")
        a.grant(other, 10, "bonus", key=f"{other}:g1")
        a.spend(user, 10, key=f"{user}:s1")  # A caches the account at 0
        b.grant(user, 100, "bonus", key=f"{user}:g2")
        recorded = b.spend(user, 100, key=f"{user}:by-b")
        outcomes = run_each(
            a.engine,
            [
                SpendCredits(key=f"{other}:s", user_id=other, amount_credits=5),
                SpendCredits(key=f"{user}:by-b", user_id=user, amount_credits=100),
                SpendCredits(key=f"{user}:s3", user_id=user, amount_credits=1),
            ],
        )
        by_other, replay, refused = outcomes
        assert isinstance(by_other, Receipt) and by_other.balance_credits == 5
        assert isinstance(replay, Receipt) and replay.replayed and replay.entry_id == recorded.entry_id
        assert isinstance(refused, InsufficientCredits)  # a true refusal stays one: 10 - 10 + 100 - 100 = 0
        b.grant(user, 50, "bonus", key=f"{user}:g3")
        assert a.spend(user, 50, key=f"{user}:s4").balance_credits == 0  # decided on B's grant


# ------------------------------------------------------------- the queue


def test_alone_a_command_runs_at_once(grouped: Ledger) -> None:
    user = uuid4()
    assert grouped.grant(user, 5, "bonus", key="one").balance_credits == 5
    with pytest.raises(InsufficientCredits):
        grouped.spend(user, 6, key="two")
    stats = grouped.group_commit.stats
    assert (stats.batches, stats.commands, stats.shared_batches, stats.failed) == (2, 2, 0, 1)


def test_the_store_failing_fails_the_whole_batch(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    user = uuid4()
    ledger.grant(user, 5, "bonus", key="fund")

    def broken(objs: Any) -> Any:
        raise OperationalError("the database went away")

    monkeypatch.setattr(ledger.engine.app, "save_all", broken)
    group = ledger.group_commit
    futures = [group.submit(SpendCredits(key=f"s{i}", user_id=user, amount_credits=1)) for i in range(5)]
    for f in futures:
        with pytest.raises(OperationalError):
            f.result(timeout=60)
    monkeypatch.undo()
    assert ledger.balance(user).balance_credits == 5
    assert ledger.spend(user, 1, key="s0").balance_credits == 4  # nothing was recorded under the keys


def test_clashes_exhausted_fail_the_batch_with_concurrency_exhausted(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eventsourcing.persistence import IntegrityError

    def clash(objs: Any) -> Any:
        raise IntegrityError("someone else wrote first")

    monkeypatch.setattr(ledger.engine.app, "save_all", clash)
    monkeypatch.setattr(ledger.engine, "max_attempts", 2)
    group = ledger.group_commit
    future = group.submit(GrantCredits(key="g", user_id=uuid4(), amount_credits=1, kind="bonus"))  # type: ignore[arg-type]
    with pytest.raises(ConcurrencyExhausted):
        future.result(timeout=60)
    assert group.stats.clashes == 2


def test_a_bounded_wait_gathers_a_fuller_batch(ledger_url: str) -> None:
    policy = GroupCommitPolicy(max_batch=4, max_wait_s=0.5)
    with Ledger(ledger_url, group_commit=policy) as ledger:
        user = uuid4()
        futures: list[Future[Receipt]] = []
        for i in range(4):
            futures.append(
                ledger.group_commit.submit(GrantCredits(key=f"g{i}", user_id=user, amount_credits=1, kind="bonus"))
            )  # type: ignore[arg-type]
        receipts = [f.result(timeout=60) for f in futures]
        assert {r.position for r in receipts} == {receipts[0].position}  # one transaction
        assert ledger.group_commit.stats.largest_batch == 4


def test_batches_are_bounded(ledger_url: str) -> None:
    with Ledger(ledger_url, group_commit=GroupCommitPolicy(max_batch=3)) as ledger:
        user = uuid4()
        futures = [
            ledger.group_commit.submit(GrantCredits(key=f"g{i}", user_id=user, amount_credits=1, kind="bonus"))  # type: ignore[arg-type]
            for i in range(20)
        ]
        assert [f.result(timeout=60).balance_credits for f in futures] == list(range(1, 21))
        assert ledger.group_commit.stats.largest_batch <= 3


def test_close_finishes_the_queue_and_refuses_more(ledger_url: str) -> None:
    ledger = Ledger(ledger_url, group_commit=True)
    user = uuid4()
    futures = [
        ledger.group_commit.submit(GrantCredits(key=f"g{i}", user_id=user, amount_credits=1, kind="bonus"))  # type: ignore[arg-type]
        for i in range(10)
    ]
    ledger.group_commit.close()
    assert all(f.done() for f in futures)
    assert [f.result().balance_credits for f in futures] == list(range(1, 11))
    with pytest.raises(ConfigurationError, match="closed"):
        ledger.grant(user, 1, "bonus", key="late")
    ledger.close()


def test_policy_and_options_are_checked() -> None:
    for bad in ({"max_batch": 0}, {"max_batch": 1001}, {"max_batch": 2.0}, {"max_wait_s": -1}, {"max_wait_s": 2},
                {"max_wait_s": "0"}, {"max_queued": 0}, {"max_queued": 10**6}):  # fmt: skip
        with pytest.raises(InvalidArgument):
            GroupCommitPolicy(**bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="group_commit"):
        Ledger("memory://", group_commit="yes")  # type: ignore[arg-type]
    with Ledger("memory://") as ledger, pytest.raises(InvalidArgument, match="not a ledger command"):
        ledger.group_commit.execute([GrantCredits(key="g", user_id=uuid4(), amount_credits=1, kind="bonus")])  # type: ignore[arg-type]
    assert isinstance(Ledger("memory://").group_commit, GroupCommit)


def test_a_waiting_caller_interrupted_never_stalls_the_others(grouped: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller whose wait is interrupted (KeyboardInterrupt) gives up its
    place as a leader-to-be; its command still runs, the others' too."""
    from ledger.application import group as group_module

    class Interrupted(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            super().wait(0.01)
            raise KeyboardInterrupt

    original = group_module._Pending.__init__

    def init(self: Any, command: Command, *, waiting: bool) -> None:
        original(self, command, waiting=waiting)
        if waiting and command.key.endswith(":interrupted"):
            self.wake = Interrupted()

    monkeypatch.setattr(group_module._Pending, "__init__", init)
    ledger = grouped
    # Each batch takes a few milliseconds, as on a real store, so that callers
    # queue behind it and wait (on the memory store a lone caller can lead
    # every batch itself, and then no wait is ever interrupted).
    run_each = group_module.run_each

    def slow_run_each(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.002)
        return run_each(*args, **kwargs)

    monkeypatch.setattr(group_module, "run_each", slow_run_each)
    user = uuid4()
    ledger.grant(user, 10_000, "bonus", key="fund")
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(30):
            suffix = ":interrupted" if (n + i) % 7 == 0 else ""
            try:
                ledger.spend(user, 1, key=f"{n}:{i}{suffix}")
                result = "ok"
            except KeyboardInterrupt:
                result = "interrupted"
            with lock:
                outcomes[result] += 1

    run_threads(12, worker)
    interrupted = outcomes["interrupted"]
    assert interrupted > 0 and outcomes["ok"] + interrupted == 360
    ledger.group_commit.close()  # the background leader finishes what the interrupted left
    assert ledger.balance(user).balance_credits <= 10_000 - outcomes["ok"]
    # Every command ran, the interrupted ones too (a lone one may have led itself before its wait).
    assert ledger.balance(user).balance_credits == 10_000 - 360


def test_a_command_run_from_inside_a_batch_runs_alone(ledger_url: str) -> None:
    """A future's callback runs in the leading thread; a command it runs must
    not wait for the queue that thread serves."""
    with Ledger(ledger_url, group_commit=GroupCommitPolicy(max_wait_s=0.2)) as ledger:
        group = ledger.group_commit
        user = uuid4()
        nested: list[tuple[str, Receipt]] = []

        def grant_more(_: Future[Receipt]) -> None:
            grant = GrantCredits(key="nested", user_id=user, amount_credits=2, kind="bonus")  # type: ignore[arg-type]
            nested.append((threading.current_thread().name, group.execute(grant)))

        future = group.submit(GrantCredits(key="outer", user_id=user, amount_credits=1, kind="bonus"))  # type: ignore[arg-type]
        future.add_done_callback(grant_more)  # before the batch runs: it waits 0.2 s for batch-mates
        assert future.result(timeout=60).balance_credits == 1
        group.close()
        assert [(name, r.balance_credits) for name, r in nested] == [("ledger-group-commit", 3)]
        assert ledger.balance(user).balance_credits == 3


def test_sync_views_with_group_commit(ledger_url: str) -> None:
    with Ledger(ledger_url, group_commit=True, sync_views=True) as ledger:
        users = [uuid4() for _ in range(4)]

        def worker(n: int) -> None:
            for i in range(5):
                receipt = ledger.grant(users[n], 1, "bonus", key=f"{n}:{i}")
                assert receipt.position is not None and ledger.views.position() >= receipt.position

        run_threads(4, worker)
        assert ledger.views.position() >= 20


def test_views_behind_is_each_commands_own(ledger_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With sync_views, a catch-up that fails after a batch committed gives
    every command of the batch ViewsBehind with its own receipt."""
    from ledger import ViewsBehind

    with Ledger(ledger_url, group_commit=GroupCommitPolicy(max_wait_s=0.2), sync_views=True) as ledger:
        user = uuid4()
        ledger.grant(user, 10, "bonus", key="fund")

        def broken(*args: Any, **kwargs: Any) -> int:
            raise RuntimeError("the read models' store went away")

        monkeypatch.setattr(ledger.views, "catch_up", broken)
        futures = [
            ledger.group_commit.submit(SpendCredits(key=f"s{i}", user_id=user, amount_credits=1)) for i in range(3)
        ]
        futures.append(ledger.group_commit.submit(SpendCredits(key="big", user_id=user, amount_credits=100)))
        receipts = []
        for future in futures[:3]:
            error = future.exception(timeout=60)
            assert isinstance(error, ViewsBehind) and isinstance(error.receipt, Receipt)
            receipts.append(error.receipt)
        assert isinstance(futures[3].exception(timeout=60), InsufficientCredits)
        assert sorted(r.key for r in receipts) == ["s0", "s1", "s2"]
        assert sorted(r.balance_credits for r in receipts) == [7, 8, 9]
        assert ledger.balance(user).balance_credits == 7  # recorded all the same


def test_a_full_queue_makes_callers_wait_for_room(ledger_url: str) -> None:
    with Ledger(ledger_url, group_commit=GroupCommitPolicy(max_batch=2, max_queued=1)) as ledger:
        user = uuid4()
        ledger.grant(user, 1000, "bonus", key="fund")

        def worker(n: int) -> None:
            for i in range(10):
                ledger.spend(user, 1, key=f"{n}:{i}")

        run_threads(6, worker)
        assert ledger.balance(user).balance_credits == 1000 - 60
        assert ledger.group_commit.stats.largest_batch <= 2


# ------------------------------------------------------------- processes


@pytest.mark.postgres
def test_processes_with_group_commit_racing_for_one_account(pg_url: str) -> None:
    """Three processes of four threads, each with group commit, race for 100
    credits in holds of 10, every thread over the same 20 keys (concurrent
    retries of one command, across batches and processes): exactly 10 keys
    win, each with one hold wherever it was sent, a key refused anywhere is
    refused everywhere, and the account is never overdrawn."""
    import multiprocessing

    user = uuid4()
    with Ledger(pg_url) as ledger:
        ledger.grant(user, 100, "bonus", key=f"fund:{user}")
    keys = [f"{user}:job:{i}" for i in range(20)]
    ctx = multiprocessing.get_context("spawn")
    queue: Any = ctx.Queue()
    procs = [ctx.Process(target=_reserve_with_group_commit, args=(pg_url, str(user), keys, n, queue)) for n in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    by_key: dict[str, set[tuple[str, str | None]]] = {}
    for process_results in results:
        for key, outcome, rid in process_results:
            assert outcome in ("ok", "insufficient"), outcome
            by_key.setdefault(key, set()).add((outcome, rid))
    winners = [k for k, seen in by_key.items() if any(o == "ok" for o, _ in seen)]
    assert len(winners) == 10
    for key, seen in by_key.items():
        assert len(seen) == 1, (key, seen)  # one outcome (and one hold) per key, in every thread of every process
    with Ledger(pg_url) as ledger:
        balance = ledger.balance(user)
        assert (balance.balance_credits, balance.held_credits, balance.available_credits) == (100, 100, 0)
        assert len([e for e in ledger.history(user) if e.type == "reserved"]) == 10


def _reserve_with_group_commit(url: str, user: str, keys: list[str], n: int, queue: Any) -> None:
    from uuid import NAMESPACE_URL, uuid5

    results: list[tuple[str, str, str | None]] = []
    lock = threading.Lock()
    with Ledger(url, group_commit=True) as ledger:

        def worker(t: int) -> None:
            shift = 4 * n + t
            for key in keys[shift % 20 :] + keys[: shift % 20]:
                try:
                    receipt = ledger.reserve(UUID(user), uuid5(NAMESPACE_URL, key), 10, FAR, key=key)
                    outcome: tuple[str, str, str | None] = (key, "ok", str(receipt.reservation_id))
                except InsufficientCredits:
                    outcome = (key, "insufficient", None)
                except LedgerError as exc:
                    outcome = (key, f"error:{type(exc).__name__}:{exc}", None)
                with lock:
                    results.append(outcome)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    queue.put(results)


# ------------------------------------------------- as if each ran alone


def _random_batch(rng: Any, users: list[UUID], size: int) -> list[Command]:
    from ledger import ReleaseReservation, ReserveCredits, SettleReservation
    from ledger.domain.holds import reservation_id_for

    commands: list[Command] = []
    reserves: list[str] = []
    for i in range(size):
        user = rng.choice(users)
        roll = rng.random()
        key = f"c{i}"
        command: Command
        if roll < 0.2:
            command = GrantCredits(key=key, user_id=user, amount_credits=rng.randint(1, 60), kind="bonus")  # type: ignore[arg-type]
        elif roll < 0.45:
            command = SpendCredits(key=key, user_id=user, amount_credits=rng.randint(1, 80))
        elif roll < 0.65:
            command = ReserveCredits(
                key=key, user_id=user, job_id=UUID(int=i), amount_credits=rng.randint(1, 50), expires_at=FAR
            )
            reserves.append(key)
        elif roll < 0.8 and reserves:
            rid = reservation_id_for(rng.choice(reserves))
            command = SettleReservation(key=key, reservation_id=rid, actual_credits=rng.randint(1, 60))
        elif roll < 0.88 and reserves:
            command = ReleaseReservation(
                key=key, reservation_id=reservation_id_for(rng.choice(reserves)), reason="done"
            )
        elif commands:
            earlier = rng.choice(commands)
            # The same command again (a retry), or its key with other arguments.
            command = earlier if rng.random() < 0.5 else SpendCredits(key=earlier.key, user_id=user, amount_credits=1)
        else:
            command = SpendCredits(key=key, user_id=user, amount_credits=1)
        commands.append(command)
    return commands


def _shape(outcome: Receipt | Exception) -> Any:
    if isinstance(outcome, Receipt):
        return outcome.model_dump(exclude={"position"})
    return (type(outcome).__name__, str(outcome))


@pytest.mark.parametrize("seed", range(8))
def test_a_batch_gives_each_command_what_it_gives_run_alone(ledger_url: str, seed: int) -> None:
    """Random batches of grants, spends, holds, settles, releases, retries and
    reused keys over four accounts (one never opened, one with a hold that
    fell due): ``run_each`` gives every command the outcome it gets when the
    commands run one by one, and leaves the same balances and events."""
    import random

    rng = random.Random(seed)
    users = [UUID(int=100 + n) for n in range(4)]
    too_much = SpendCredits(key="too-much", user_id=users[2], amount_credits=75)
    commands = [too_much, *_random_batch(rng, users, 40)]
    other_url = "memory://"

    def prepared(url: str) -> tuple[Ledger, ManualClock]:
        clock = ManualClock(START)
        ledger = Ledger(url, clock=clock)
        for user in users[:2]:
            ledger.grant(user, 100, "bonus", key=f"fund:{user}")
        # A poor account whose hold fell due: a command that finds the release
        # due and then fails leaves the batch without it (a restart).
        ledger.grant(users[2], 40, "bonus", key=f"fund:{users[2]}")
        ledger.reserve(users[2], UUID(int=999), 30, START + timedelta(minutes=1), key="due-hold")
        clock.advance(timedelta(minutes=5))
        return ledger, clock

    batched, _ = prepared(ledger_url)
    alone, _ = prepared(other_url)
    try:
        counts = RunCounts()
        together = run_each(batched.engine, commands, counts=counts)
        one_by_one: list[Receipt | Exception] = []
        for command in commands:
            try:
                one_by_one.append(alone.execute(command))
            except LedgerError as exc:
                one_by_one.append(exc)
        for index, (a, b) in enumerate(zip(together, one_by_one, strict=True)):
            assert _shape(a) == _shape(b), (index, commands[index])
        assert counts.restarts >= 1  # the first command found the release due, then too few credits
        for user in users[:3]:
            assert batched.balance(user).model_dump(exclude={"as_of"}) == alone.balance(user).model_dump(
                exclude={"as_of"}
            )
            ours = [(e.version, e.type, e.data) for e in batched.history(user)]
            theirs = [(e.version, e.type, e.data) for e in alone.history(user)]
            assert ours == theirs
    finally:
        batched.close()
        alone.close()
