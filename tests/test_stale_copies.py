"""Cached accounts that other writers moved on: fast-forwarded from their
cached version (only the new events read), never reloaded in a loop, never
losing or double-applying an event; write-only aggregates stay out of the
command cache (ledger.storage.freshness, docs/decisions.md "Cached accounts
are fast-forwarded once shared")."""

from __future__ import annotations

import multiprocessing
import threading
from copy import deepcopy
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest

from ledger import (
    CommandStats,
    CreditKind,
    GrantCredits,
    InsufficientCredits,
    Ledger,
    LedgerError,
    ReservationClosed,
    ReserveCredits,
    SettleReservation,
)
from ledger.domain.credits import CreditAccount, account_id_for, record_id_for
from ledger.domain.holds import reservation_id_for
from ledger.storage.freshness import TRUST_AFTER_EMPTY, Freshness

FAR = datetime(2099, 1, 1, tzinfo=UTC)


def state_of(aggregate: Any) -> dict[str, Any]:
    """An aggregate's whole state, less the events not saved yet. An
    account's attributes that snapshots store only when not 0 (its class
    gives the default) are read as the account answers them."""
    state = {k: v for k, v in vars(aggregate).items() if k != "_pending_events"}
    if isinstance(aggregate, CreditAccount):
        state.update((name, getattr(aggregate, name)) for name in CreditAccount.UNLESS_ZERO)
    return state


def fresh_account(url: str, user: UUID) -> CreditAccount:
    """The account rebuilt from the store by a ledger that never cached it."""
    with Ledger(url) as other:
        account = other.app.repository.get(account_id_for(user))
        assert isinstance(account, CreditAccount)
        return account


def cached(ledger: Ledger, aggregate_id: UUID) -> Any:
    cache = ledger.app.repository.cache
    assert cache is not None
    try:
        return cache.get(aggregate_id)
    except KeyError:
        return None


def some_history(ledger: Ledger, user: UUID, tag: str, rounds: int) -> int:
    """Grants, spends, reserves and settles on one account; the balance it adds."""
    added = 0
    for i in range(rounds):
        ledger.grant(user, 30, "bonus", key=f"{tag}:g{i}")
        ledger.spend(user, 5, key=f"{tag}:s{i}")
        hold = ledger.reserve(user, uuid4(), 10, FAR, key=f"{tag}:r{i}")
        assert hold.reservation_id is not None
        ledger.settle(hold.reservation_id, 7, key=f"{tag}:t{i}", user_id=user)
        added += 30 - 5 - 7
    return added


# ------------------------------------------------------------ one process


def test_a_fast_forwarded_account_equals_a_fresh_load_in_memory() -> None:
    """The in-memory store has one Ledger: the cache is set back to an older
    committed state by hand, as another writer would leave it."""
    user = uuid4()
    account_id = account_id_for(user)
    with Ledger("memory://") as ledger:
        some_history(ledger, user, "a", 3)
        older = deepcopy(cached(ledger, account_id))
        some_history(ledger, user, "b", 30)  # past a snapshot (100 events)
        assert ledger.app.repository.cache is not None
        ledger.app.repository.cache.put(account_id, older)
        ledger.app.refresh([account_id])
        before = ledger.command_stats()
        forwarded = ledger.app.repository.get(account_id)
        stats = ledger.command_stats().since(before)
        rebuilt = ledger.app.repository._reconstruct_aggregate(account_id, None, _project)
        assert forwarded.version == rebuilt.version > older.version + 100
        assert state_of(forwarded) == state_of(rebuilt)
        assert (stats.fastforwards, stats.fastforward_events, stats.full_loads) == (
            1,
            rebuilt.version - older.version,
            0,
        )
        assert cached(ledger, account_id).version == rebuilt.version  # the cache moved on too


def _project(aggregate: Any, events: Any) -> Any:
    # Any projector other than eventsourcing's default takes the library's path.
    for event in events:
        aggregate = event.mutate(aggregate)
    return aggregate


def test_write_only_aggregates_stay_out_of_the_cache(ledger_url: str) -> None:
    """Command records are never cached; a hold's record only while the hold
    is open (a settle without the account's id reads it)."""
    user = uuid4()
    with Ledger(ledger_url) as ledger:
        ledger.grant(user, 100, "bonus", key="fund")
        hold = ledger.reserve(user, uuid4(), 10, FAR, key="reserve")
        assert hold.reservation_id is not None
        assert cached(ledger, reservation_id_for("reserve")) is not None
        before = ledger.command_stats()
        ledger.settle(hold.reservation_id, 7, key="settle")  # no hint: reads the hold's record
        assert ledger.command_stats().since(before).record_reads == 0
        assert ledger.reservation(hold.reservation_id).status == "settled"
        assert cached(ledger, account_id_for(user)) is not None
        assert cached(ledger, reservation_id_for("reserve")) is None  # closed: dropped
        for key in ("fund", "reserve", "settle"):
            assert cached(ledger, record_id_for(key)) is None
        # Reserved and settled in one batch: the closed record is not cached either.
        batch = ledger.execute_batch(
            [
                ReserveCredits(key="r2", user_id=user, job_id=uuid4(), amount_credits=5, expires_at=FAR),
                SettleReservation(key="s2", reservation_id=reservation_id_for("r2"), actual_credits=5),
            ]
        )
        assert batch[1].balance_credits == 100 - 7 - 5
        assert cached(ledger, reservation_id_for("r2")) is None
        # A replay still finds its record, from the store.
        before = ledger.command_stats()
        assert ledger.grant(user, 100, "bonus", key="fund").replayed
        assert ledger.command_stats().since(before).record_reads >= 1


def test_a_single_writer_reads_nothing_before_its_commands(ledger_url: str) -> None:
    user = uuid4()
    with Ledger(ledger_url) as ledger:
        some_history(ledger, user, "warm", 1)
        before = ledger.command_stats()
        some_history(ledger, user, "quiet", 5)
        stats = ledger.command_stats().since(before)
        assert stats.batches == stats.attempts == 20
        assert (stats.clashes, stats.full_loads, stats.fastforwards) == (0, 0, 0)
        assert stats.cache_hits >= 20


def test_freshness_trusts_again_after_quiet_fast_forwards() -> None:
    freshness = Freshness(trust_after_empty=3, max_shared=2)
    a, b, c = uuid4(), uuid4(), uuid4()
    freshness.share([a])
    freshness.forwarded(a, 0)
    freshness.forwarded(a, 0)
    freshness.forwarded(a, 5)  # new events: the run of empty ones starts again
    freshness.forwarded(a, 0)
    freshness.forwarded(a, 0)
    assert freshness.is_shared(a)
    freshness.forwarded(a, 0)
    assert not freshness.is_shared(a)
    freshness.share([a, b, c])  # bounded: the oldest is forgotten
    assert (freshness.is_shared(a), freshness.is_shared(b), freshness.is_shared(c)) == (False, True, True)
    assert freshness.shared_count() == 2


def test_freshness_checks_a_refused_aggregate_once() -> None:
    freshness = Freshness(trust_after_empty=3)
    quiet, moved = uuid4(), uuid4()
    freshness.check_once([quiet, moved])
    assert freshness.is_shared(quiet) and freshness.is_shared(moved)
    freshness.forwarded(quiet, 0)  # up to date: trusted as before
    freshness.forwarded(moved, 2)  # another writer: shared from now on
    assert not freshness.is_shared(quiet)
    assert freshness.is_shared(moved)
    freshness.forwarded(moved, 0)
    assert freshness.is_shared(moved)


def test_a_true_refusal_on_an_up_to_date_account_leaves_it_trusted(ledger_url: str) -> None:
    user = uuid4()
    with Ledger(ledger_url) as ledger:
        ledger.grant(user, 10, "bonus", key="g")
        before = ledger.command_stats()
        with pytest.raises(InsufficientCredits):
            ledger.spend(user, 11, key="too-much")
        stats = ledger.command_stats().since(before)
        # Decided twice, the second time after one fast-forward that found nothing.
        assert (stats.attempts, stats.fastforwards, stats.fastforward_events, stats.full_loads) == (0, 1, 0, 0)
        before = ledger.command_stats()
        ledger.spend(user, 10, key="all")
        stats = ledger.command_stats().since(before)
        assert (stats.fastforwards, stats.cache_hits) == (0, 1)


def test_command_stats_subtract_and_add() -> None:
    one = CommandStats(batches=3, attempts=4, clashes=1)
    two = CommandStats(batches=5, attempts=7, clashes=1, full_loads=2)
    assert two.since(one) == CommandStats(batches=2, attempts=3, full_loads=2)
    assert one + two.since(one) == two


# ------------------------------------------------------- two writers


def test_a_stale_copy_is_fast_forwarded_not_reloaded(durable_url: str) -> None:
    """A caches the account; B writes it (past a snapshot). A's next command
    clashes once, then reads only B's events: no reload from the store, and
    the result equals a fresh load. While B keeps writing, A reads B's events
    before each command and does not clash; once B stops, A trusts its cache
    again after TRUST_AFTER_EMPTY quiet reads."""
    user = uuid4()
    account_id = account_id_for(user)
    with Ledger(durable_url) as a, Ledger(durable_url) as b:
        a.grant(user, 1_000, "bonus", key="fund")
        a.spend(user, 1, key="a:0")
        b.execute_batch(
            [GrantCredits(key=f"b:g{i}", user_id=user, amount_credits=1, kind=CreditKind.BONUS) for i in range(120)]
        )
        before = a.command_stats()
        assert a.spend(user, 1, key="a:1").balance_credits == 1_000 - 2 + 120
        stats = a.command_stats().since(before)
        assert (stats.attempts, stats.clashes, stats.full_loads, stats.fastforwards) == (2, 1, 0, 1)
        assert stats.fastforward_events == 120
        assert state_of(cached(a, account_id)) == state_of(fresh_account(durable_url, user))

        before = a.command_stats()
        for i in range(5):
            b.spend(user, 1, key=f"b:s{i}")
            a.spend(user, 1, key=f"a:s{i}")
        stats = a.command_stats().since(before)
        assert (stats.clashes, stats.full_loads, stats.fastforwards) == (0, 0, 5)
        assert state_of(cached(a, account_id)) == state_of(fresh_account(durable_url, user))

        for i in range(TRUST_AFTER_EMPTY):
            a.spend(user, 1, key=f"a:q{i}")
        before = a.command_stats()
        a.spend(user, 1, key="a:trusted")
        stats = a.command_stats().since(before)
        assert (stats.fastforwards, stats.cache_hits) == (0, 1)
        assert a.balance(user).balance_credits == 1_000 + 120 - 2 - 5 - 5 - TRUST_AFTER_EMPTY - 1


def test_a_refusal_is_decided_again_on_fast_forwarded_state(durable_url: str) -> None:
    user = uuid4()
    with Ledger(durable_url) as a, Ledger(durable_url) as b:
        a.grant(user, 10, "bonus", key="g1")
        a.spend(user, 10, key="s1")  # A caches the account at 0
        b.grant(user, 100, "bonus", key="g2")
        before = a.command_stats()
        assert a.spend(user, 60, key="s2").balance_credits == 40
        stats = a.command_stats().since(before)
        assert (stats.full_loads, stats.fastforwards, stats.fastforward_events) == (0, 1, 1)  # B's grant
        with pytest.raises(InsufficientCredits):
            a.spend(user, 41, key="s3")


def test_two_ledgers_in_threads_lose_and_double_nothing(durable_url: str) -> None:
    """Two Ledgers (two caches) write one account from two threads, some keys
    used by both: every key's effect happens once, and the account each ends
    with equals a fresh load."""
    user = uuid4()
    with Ledger(durable_url) as setup:
        setup.grant(user, 10_000, "bonus", key="fund")
    ledgers = [Ledger(durable_url), Ledger(durable_url)]
    errors: list[str] = []
    shared_keys = [f"both:{i}" for i in range(20)]

    def worker(n: int) -> None:
        ledger = ledgers[n]
        try:
            for i in range(20):
                ledger.spend(user, 1, key=f"w{n}:{i}")
                ledger.spend(user, 10, key=shared_keys[i])  # the other thread's retry, in effect
                hold = ledger.reserve(user, uuid4(), 5, FAR, key=f"w{n}:r{i}")
                assert hold.reservation_id is not None
                ledger.settle(hold.reservation_id, 3, key=f"w{n}:t{i}", user_id=user)
        except LedgerError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        expected = 10_000 - 2 * 20 * (1 + 3) - 20 * 10
        fresh = fresh_account(durable_url, user)
        assert fresh.balance == expected and fresh.held == 0
        for ledger in ledgers:
            assert ledger.balance(user).balance_credits == expected
        for n, ledger in enumerate(ledgers):
            ledger.spend(user, 1, key=f"after:{n}")  # brings its cache up to date
        final = fresh_account(durable_url, user)
        for ledger in ledgers:
            # The first one's cache is one event behind (the second's spend)
            # unless a clash already marked the account shared: mark it.
            ledger.app.refresh([account_id_for(user)])
            ours = ledger.app.repository.get(account_id_for(user))
            assert state_of(ours) == state_of(final)
        keys = [e.data.get("key") for e in ledgers[0].history(user, limit=1_000)]
        spent = [k for k in keys if isinstance(k, str) and k.startswith("both:")]
        assert sorted(spent) == sorted(shared_keys)
    finally:
        for ledger in ledgers:
            ledger.close()


# -------------------------------------------------------------- processes


PROCESSES = 4
ROUNDS = 25


def _writer(url: str, user: str, others: list[str], n: int, queue: multiprocessing.Queue[object]) -> None:
    """Reserve/settle on the shared account, spends on a few others; the
    same spend keys in every process (concurrent retries)."""
    outcome: list[Any] = []
    try:
        with Ledger(url) as ledger:
            me = UUID(user)
            for i in range(ROUNDS):
                hold = ledger.reserve(me, uuid4(), 5, FAR, key=f"p{n}:r{i}")
                assert hold.reservation_id is not None
                ledger.settle(hold.reservation_id, 3, key=f"p{n}:t{i}", user_id=me)
                other = UUID(others[i % len(others)])
                ledger.spend(other, 2, key=f"all:{other}:{i}")
                with pytest.raises(ReservationClosed):  # a closed hold stays closed
                    ledger.settle(hold.reservation_id, 3, key=f"p{n}:again{i}", user_id=me)
            stats = ledger.command_stats()
            outcome = ["ok", stats.batches, stats.clashes, stats.full_loads, stats.fastforwards, stats.exhausted]
    except Exception as exc:
        outcome = [f"error {type(exc).__name__}: {exc}"]
    queue.put(outcome)


def test_processes_on_one_account_fast_forward_and_keep_every_event(durable_url: str) -> None:
    user = uuid4()
    others = [uuid4() for _ in range(3)]
    with Ledger(durable_url) as setup:
        setup.grant(user, 10_000, "bonus", key="fund")
        for other in others:
            setup.grant(other, 10_000, "bonus", key=f"fund:{other}")
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[object] = ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(durable_url, str(user), [str(o) for o in others], n, queue))
        for n in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    results: list[Any] = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(r[0] == "ok" for r in results), results
    with Ledger(durable_url) as check:
        assert check.balance(user).balance_credits == 10_000 - PROCESSES * ROUNDS * 3
        assert check.balance(user).held_credits == 0
        spends_per_other = -(-ROUNDS // len(others))  # each key once, whichever process won
        for k, other in enumerate(others):
            spends = len(range(k, ROUNDS, len(others)))
            assert spends <= spends_per_other
            assert check.balance(other).balance_credits == 10_000 - 2 * spends
        history = check.history(user, limit=1_000)
        settled = [e for e in history if e.type == "settled"]
        assert len(settled) == PROCESSES * ROUNDS
    assert state_of(fresh_account(durable_url, user)).keys()
    # No reload loop: each process rebuilt each account from the store a
    # handful of times at most (first read, LRU misses), and caught up on
    # other writers by fast-forwarding.
    for _, batches, _clashes, full_loads, _fastforwards, exhausted in results:
        assert exhausted == 0
        assert full_loads <= 2 * (1 + len(others)), results
        assert batches >= 4 * ROUNDS


def test_a_copy_taken_before_the_lock_starts_from_what_sibling_threads_cached(durable_url: str) -> None:
    """A command copies a shared account from the cache, then waits for its
    write lock while other threads of the same ledger take their turns (each
    caching what it committed). Once its read returns, it starts from the
    cache's newer copy and decodes only the events other ledgers wrote."""
    user = uuid4()
    with Ledger(durable_url) as a, Ledger(durable_url) as b:
        a.grant(user, 1_000, "bonus", key="fund")
        b.spend(user, 1, key="b:0")
        a.spend(user, 1, key="a:0")  # clashes on B's spend: the account is shared in A
        locks = a.app.write_locks
        real = locks.events_after
        waits: list[str] = []

        def wait_behind_siblings(aggregate_id: UUID, version: int, *, lock: bool) -> Any:
            if waits:
                key = waits.pop()
                sibling = threading.Thread(target=a.spend, args=(user, 1), kwargs={"key": key})
                sibling.start()  # runs its whole command through A while this one "waits"
                sibling.join()
                if key == "sibling:2":
                    b.spend(user, 1, key="b:1")  # and another ledger writes once more
            return real(aggregate_id, version, lock=lock)

        locks.events_after = wait_behind_siblings  # type: ignore[method-assign]
        waits.append("sibling:1")
        before = a.command_stats()
        assert a.spend(user, 1, key="a:1").balance_credits == 1_000 - 4
        stats = a.command_stats().since(before)
        # Both commands read the store; neither decoded the sibling's event again.
        assert (stats.fastforwards, stats.fastforward_events, stats.full_loads, stats.clashes) == (2, 0, 0, 0)

        waits.append("sibling:2")
        before = a.command_stats()
        assert a.spend(user, 1, key="a:2").balance_credits == 1_000 - 7
        stats = a.command_stats().since(before)
        assert (stats.fastforwards, stats.fastforward_events, stats.full_loads, stats.clashes) == (2, 1, 0, 0)  # B's
        assert state_of(cached(a, account_id_for(user))) == state_of(fresh_account(durable_url, user))
