"""Write locks (ledger.storage.writelocks): on PostgreSQL, a single command
locks an account other writers share before it reads it, and holds the lock
until its save commits, so the account's writers take turns instead of
clashing. Batches stay optimistic. The lock never outlives its command,
whether the command succeeds, is refused or loses its connection.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from conftest import fresh_pg_schema, pg_base_url
from eventsourcing.persistence import IntegrityError, StoredEvent

from ledger import CreditKind, GrantCredits, InsufficientCredits, Ledger
from ledger.domain.credits import account_id_for
from ledger.storage.postgres.writelocks import PostgresWriteLocks
from ledger.storage.writelocks import WriteLocks

pytestmark = pytest.mark.postgres


@pytest.fixture
def url() -> Iterator[str]:
    yield from fresh_pg_schema()


def locks_of(ledger: Ledger) -> PostgresWriteLocks:
    locks = ledger.app.write_locks
    assert isinstance(locks, PostgresWriteLocks)
    return locks


def lock_is_free(key: int) -> bool:
    """Whether another session could take the advisory lock now (it is let go at once)."""
    with psycopg.connect(pg_base_url(), autocommit=True) as conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        assert row is not None
        if row[0]:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        return bool(row[0])


def shared_account(ledger: Ledger, user: UUID, credits: int) -> UUID:
    """A funded account that the ledger treats as written elsewhere too."""
    ledger.grant(user, credits, "bonus", key=f"fund:{user}")
    account_id = account_id_for(user)
    ledger.app.refresh([account_id])
    return account_id


@pytest.mark.parametrize("group_commit", [False, True], ids=["plain", "group-commit"])
def test_hot_account_writers_take_turns_instead_of_clashing(url: str, group_commit: bool) -> None:
    """Eight ledgers (eight caches, as eight processes) spend from one account
    at once. Each clashes a few times at most (the attempt that finds the
    account shared, and after trusting it again); otherwise every writer locks
    it, and none runs out of attempts. Without the locks the same load clashes hundreds of times. A
    group commit batch of one command locks as a single command does."""
    writers, spends = 8, 40
    ledgers = [Ledger(url, group_commit=group_commit) for _ in range(writers)]
    try:
        user = uuid4()
        ledgers[0].grant(user, 10_000, "bonus", key="fund")
        errors: list[BaseException] = []
        start = threading.Barrier(writers)

        def spend_all(n: int) -> None:
            start.wait()
            try:
                for i in range(spends):
                    ledgers[n].spend(user, 1, key=f"spend:{n}:{i}")
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=spend_all, args=(n,)) for n in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors[:3]
        assert ledgers[0].balance(user).balance_credits == 10_000 - writers * spends
        stats = [ledger.command_stats() for ledger in ledgers]
        assert sum(s.exhausted for s in stats) == 0
        # Each ledger clashes once or twice: on its first attempt, and when an
        # account it trusted again (after 32 quiet reads) was written meanwhile.
        # Without the locks: about one attempt in two clashes (hundreds here).
        clashes, attempts = sum(s.clashes for s in stats), sum(s.attempts for s in stats)
        assert clashes <= 4 * writers and clashes < 0.1 * attempts, [s.clashes for s in stats]
    finally:
        for ledger in ledgers:
            ledger.close()


def test_the_lock_is_held_from_the_read_to_the_end_of_the_session(url: str) -> None:
    with Ledger(url) as ledger:
        user = uuid4()
        account_id = shared_account(ledger, user, 100)
        locks = locks_of(ledger)
        key = locks.lock_key(account_id)
        with locks.session():
            assert lock_is_free(key)  # nothing is locked before the read
            newer = locks.events_after(account_id, 1, lock=True)
            assert [e.originator_version for e in newer] == [2]  # the grant, after Opened
            assert not lock_is_free(key)
        assert lock_is_free(key)


def test_a_single_command_waits_for_the_lock_and_a_batch_does_not(url: str) -> None:
    """While another session holds an account's lock, a single command on it
    waits and commits once the lock is let go; a batch on it does not wait."""
    with Ledger(url) as ledger:
        user = uuid4()
        account_id = shared_account(ledger, user, 100)
        key = locks_of(ledger).lock_key(account_id)
        with psycopg.connect(pg_base_url(), autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(%s)", (key,))
            ledger.execute_batch([GrantCredits(key="batch", user_id=user, amount_credits=5, kind=CreditKind.BONUS)] * 2)
            done = threading.Event()
            single = threading.Thread(target=lambda: (ledger.spend(user, 1, key="waits"), done.set()))
            single.start()
            assert not done.wait(0.5), "the single command did not wait for the lock"
            holder.execute("SELECT pg_advisory_unlock(%s)", (key,))
            assert done.wait(30)
            single.join()
        assert ledger.balance(user).balance_credits == 104


def test_a_refused_command_lets_go_of_the_lock_and_its_connection(url: str) -> None:
    with Ledger(url) as ledger:
        user = uuid4()
        account_id = shared_account(ledger, user, 10)
        with pytest.raises(InsufficientCredits):
            ledger.spend(user, 11, key="too-much")
        assert lock_is_free(locks_of(ledger).lock_key(account_id))
        with psycopg.connect(pg_base_url(), autocommit=True) as conn:
            schema = ledger.config.pg_schema
            waiting = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%%' AND query LIKE %s",
                (f"%{schema}%",),
            ).fetchone()
        assert waiting == (0,)
        assert ledger.spend(user, 10, key="all").balance_credits == 0


def test_a_connection_lost_inside_a_session_still_records_the_command_once(url: str) -> None:
    """The session's connection dies after the locked read: the command's
    reads and its save move to a fresh connection (unlocked, still checked
    by the store's unique versions) and the command is recorded once."""
    with Ledger(url) as ledger:
        user = uuid4()
        account_id = shared_account(ledger, user, 10)
        locks = locks_of(ledger)
        with locks.session():
            locks.events_after(account_id, 1, lock=True)
            pinned: Any = locks._session()
            assert pinned is not None and pinned.conn is not None
            with psycopg.connect(pg_base_url(), autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pinned.conn.info.backend_pid,))
            time.sleep(0.1)
            receipt = ledger.spend(user, 3, key="after-the-loss")
        assert receipt.balance_credits == 7
        assert ledger.spend(user, 3, key="after-the-loss").replayed
        assert ledger.balance(user).balance_credits == 7
        assert lock_is_free(locks.lock_key(account_id))


def test_lock_keys_are_stable_and_differ_between_ledgers_in_one_database() -> None:
    with contextlib.ExitStack() as schemas:  # each schema dropped at the end (a bare next() never dropped them)
        urls = [schemas.enter_context(contextlib.contextmanager(fresh_pg_schema)()) for _ in range(2)]
        keys = _lock_keys(urls)
    assert keys[0] != keys[1]


def _lock_keys(urls: list[str]) -> list[int]:
    account_id = account_id_for(UUID(int=1))
    keys = []
    for u in urls:
        with Ledger(u) as first, Ledger(u) as second:
            assert locks_of(first).lock_key(account_id) == locks_of(second).lock_key(account_id)
            keys.append(locks_of(first).lock_key(account_id))
            assert locks_of(first).lock_key(account_id) != locks_of(first).lock_key(account_id_for(UUID(int=2)))
            assert -(2**63) <= keys[-1] < 2**63
    return keys


def test_other_backends_lock_nothing(tmp_path: Any) -> None:
    for url in ("memory://", f"sqlite:///{tmp_path / 'l.sqlite3'}"):
        with Ledger(url) as ledger:
            assert type(ledger.app.write_locks) is WriteLocks
            user = uuid4()
            account_id = shared_account(ledger, user, 5)
            with ledger.app.write_locks.session():
                assert [
                    e.originator_version for e in ledger.app.write_locks.events_after(account_id, 1, lock=True)
                ] == [2]
            assert ledger.spend(user, 5, key="s").balance_credits == 0


@pytest.mark.parametrize("count", [3, 300])
def test_a_save_inside_a_session_commits_in_its_transaction(url: str, count: int) -> None:
    """The save after a locked read runs in the session's transaction, in one
    message (a command's few rows) or through the staging table (more than
    ``VALUES_MAX_ROWS``); its COMMIT releases the lock, and its rows are there."""
    from eventsourcing.persistence import StoredEvent

    with Ledger(url) as ledger:
        user = uuid4()
        account_id = shared_account(ledger, user, 10)
        locks = locks_of(ledger)
        recorder: Any = ledger.app.recorder
        rows = [StoredEvent(uuid4(), 1, "tests:Row", b"\x00\x01") for _ in range(count)]
        with locks.session():
            locks.events_after(account_id, 1, lock=True)
            pinned: Any = locks._session()
            ids = recorder.insert_events(rows)
            assert pinned.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # committed on it
            assert lock_is_free(locks.lock_key(account_id))
        assert len(ids) == count and ids == sorted(ids)
        stored = recorder.select_events(rows[-1].originator_id)
        assert [(e.topic, e.state) for e in stored] == [("tests:Row", b"\x00\x01")]


def _terminate(pid: int) -> None:
    with psycopg.connect(pg_base_url(), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    time.sleep(0.1)


def test_a_locked_read_on_a_dead_pooled_connection_goes_on_without_the_lock(url: str) -> None:
    """A pooled connection whose server process ended while it was idle (a
    restart, a failover) is handed out, unpinged, inside the pre-ping window.
    The locked read fails on it; the command goes on with an unlocked read,
    retried on a fresh connection as every other read is, and records once."""
    with Ledger(f"{url}&pool_size=1&max_overflow=0&pre_ping_window_s=60") as ledger:
        user = uuid4()
        account_id = shared_account(ledger, user, 10)
        locks = locks_of(ledger)
        checkout = locks._pool_checkout
        killed: list[int] = []

        @contextlib.contextmanager
        def dying() -> Iterator[Any]:
            with checkout() as conn:
                if not killed:  # the first checkout only: the pool's idle connection
                    killed.append(conn.info.backend_pid)
                    _terminate(conn.info.backend_pid)
                yield conn

        locks._pool_checkout = dying  # type: ignore[method-assign]
        receipt = ledger.spend(user, 3, key="after-a-restart")
        locks._pool_checkout = checkout  # type: ignore[method-assign]
        assert killed and receipt.balance_credits == 7
        assert ledger.balance(user).balance_credits == 7
        assert lock_is_free(locks.lock_key(account_id))


def test_a_lock_not_granted_in_time_costs_the_lock_not_the_command(url: str) -> None:
    """Another session holds the account's lock past ``lock_timeout``: the
    command reads without the lock and commits, checked by the store."""
    with Ledger(url) as ledger:
        user = uuid4()
        account_id = shared_account(ledger, user, 10)
        locks = locks_of(ledger)
        locks._lock_timeout = "SET LOCAL lock_timeout = '0.2s'"
        with psycopg.connect(pg_base_url(), autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(%s)", (locks.lock_key(account_id),))
            started = time.monotonic()
            assert ledger.spend(user, 4, key="past-the-timeout").balance_credits == 6
            assert 0.2 <= time.monotonic() - started < 5
            holder.execute("SELECT pg_advisory_unlock(%s)", (locks.lock_key(account_id),))
        assert ledger.balance(user).balance_credits == 6


def test_a_batch_beside_hot_accounts_locks_the_ones_it_clashed_on(url: str) -> None:
    """A batch of grants over 400 accounts, five of which two other ledgers
    (as two other processes) keep spending from, one command at a time; each
    sees the other's writes, so both share those accounts and lock them
    before they read them. Each of the batch's attempts reads for longer
    than those accounts stay still, so retrying alone lost every time
    (ConcurrencyExhausted after 16 attempts). Now each attempt locks the
    accounts the ones before it clashed on before it reads, and the other
    writers wait for those locks: the batch commits after about one clash
    per hot account."""
    users = [uuid4() for _ in range(400)]
    hot = users[::80]
    with Ledger(url) as batcher, Ledger(url) as first, Ledger(url) as second:
        batcher.execute_batch(
            GrantCredits(key=f"fund:{u}", user_id=u, amount_credits=1_000_000, kind=CreditKind.BONUS) for u in users
        )
        workers = (first, second)
        for worker in workers:
            worker.app.refresh([account_id_for(u) for u in hot])  # written by several: shared
        spent_by_workers = dict.fromkeys(hot, 0)
        counted = threading.Lock()
        stop = threading.Event()
        errors: list[BaseException] = []

        def keep_spending(n: int) -> None:
            i = 0
            try:
                while not stop.is_set():
                    for u in hot:
                        workers[n].spend(u, 1, key=f"hot:{n}:{u}:{i}")
                        with counted:
                            spent_by_workers[u] += 1
                    i += 1
            except BaseException as exc:  # reported below
                errors.append(exc)

        spenders = [threading.Thread(target=keep_spending, args=(n,)) for n in range(2)]
        for t in spenders:
            t.start()
        try:
            time.sleep(0.2)
            before = batcher.command_stats()
            receipts = batcher.execute_batch(
                GrantCredits(key=f"renew:{u}", user_id=u, amount_credits=10, kind=CreditKind.BONUS) for u in users
            )
            spent = batcher.command_stats().since(before)
        finally:
            stop.set()
            for t in spenders:
                t.join()
        assert not errors, errors
        assert len(receipts) == len(users) and not any(r.replayed for r in receipts)
        assert spent.exhausted == 0
        assert spent.clashes <= len(hot) + 2, spent
        assert all(spent_by_workers.values())  # the other writers went on meanwhile
        for u in users:
            assert batcher.balance(u).balance_credits == 1_000_010 - spent_by_workers.get(u, 0)


def test_the_aggregate_a_save_clashed_on_is_named_by_the_store(url: str) -> None:
    """PostgreSQL names the (aggregate, version) a refused save collided with:
    the aggregate the next attempt locks first."""
    with Ledger(url) as ledger:
        user = uuid4()
        ledger.grant(user, 10, "bonus", key="fund")
        account_id = account_id_for(user)
        taken = StoredEvent(originator_id=account_id, originator_version=1, topic="t", state=b"{}")
        with pytest.raises(IntegrityError) as refused:
            ledger.app.recorder.insert_events([taken])
        assert locks_of(ledger).clashed_on(refused.value) == account_id
        assert locks_of(ledger).clashed_on(ValueError("not the store's")) is None
        assert WriteLocks(ledger.app.recorder).clashed_on(refused.value) is None  # a store that cannot say


def test_a_session_locks_its_first_aggregates_before_any_read(url: str) -> None:
    """``session(first=...)`` opens its transaction with the locks, which the
    session's end lets go (a save would commit in that transaction)."""
    with Ledger(url) as ledger:
        ids = [shared_account(ledger, uuid4(), 10) for _ in range(3)]
        locks = locks_of(ledger)
        with locks.session(first=ids):
            assert not any(lock_is_free(locks.lock_key(i)) for i in ids)
        assert all(lock_is_free(locks.lock_key(i)) for i in ids)
