"""Concurrent writers on one account: no overdraft, no hold closed twice,
no key applied twice. Threads on every backend; processes on PostgreSQL."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from datetime import UTC, datetime
from uuid import NAMESPACE_URL, UUID, uuid4, uuid5

import pytest

from ledger import InsufficientCredits, Ledger, LedgerError, ReservationClosed

FAR = datetime(2099, 1, 1, tzinfo=UTC)


def test_threads_reserving_against_limited_credits(ledger_url: str) -> None:
    user = uuid4()
    with Ledger(ledger_url) as ledger:
        ledger.grant(user, 100, "bonus", key=f"fund:{user}")
        outcomes: Counter[str] = Counter()
        lock = threading.Lock()

        def worker(n: int) -> None:
            for i in range(6):
                try:
                    ledger.reserve(user, uuid4(), 10, FAR, key=f"{user}:t{n}:{i}")
                    result = "ok"
                except InsufficientCredits:
                    result = "insufficient"
                with lock:
                    outcomes[result] += 1

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes == Counter(ok=10, insufficient=14)
        balance = ledger.balance(user)
        assert (balance.balance_credits, balance.held_credits, balance.available_credits) == (100, 100, 0)


def test_threads_settling_one_hold(ledger_url: str) -> None:
    user = uuid4()
    with Ledger(ledger_url) as ledger:
        ledger.grant(user, 100, "bonus", key=f"fund:{user}")
        rid = ledger.reserve(user, uuid4(), 40, FAR, key=f"{user}:hold").reservation_id
        assert rid is not None
        results: list[str] = []

        def worker(n: int) -> None:
            try:
                ledger.settle(rid, 30, key=f"{user}:settle:{n}")
                results.append("settled")
            except ReservationClosed:
                results.append("closed")

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == ["closed", "closed", "closed", "settled"]
        assert ledger.balance(user).balance_credits == 70


@pytest.mark.postgres
def test_processes_reserving_against_one_account(pg_url: str) -> None:
    """Six processes race for 100 credits in holds of 10. Every process uses the
    same 20 keys (so concurrent retries of one command happen too): exactly 10
    keys win, each key has one reservation id in every process, and the
    account is never overdrawn."""
    user = uuid4()
    with Ledger(pg_url) as ledger:
        ledger.grant(user, 100, "bonus", key=f"fund:{user}")
    # Each key's job id is derived from the key, so the same key carries the
    # same arguments in every process: true concurrent retries.
    keys = [f"{user}:job:{i}" for i in range(20)]
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[object] = ctx.Queue()
    procs = [
        ctx.Process(target=_reserve_in_process_same_job, args=(pg_url, str(user), keys[n:] + keys[:n], queue))
        for n in range(6)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    by_key: dict[str, set[object]] = {}
    for process_results in results:
        for key, outcome, rid in process_results:  # type: ignore[attr-defined]
            assert outcome in ("ok", "insufficient"), outcome
            by_key.setdefault(key, set()).add((outcome, rid))
    winners = [k for k, seen in by_key.items() if any(o == "ok" for o, _ in seen)]
    assert len(winners) == 10
    for key in winners:  # a winning key returns the same hold to every process that got it
        assert len({rid for o, rid in by_key[key] if o == "ok"}) == 1
    with Ledger(pg_url) as ledger:
        balance = ledger.balance(user)
        assert (balance.balance_credits, balance.held_credits, balance.available_credits) == (100, 100, 0)
        reserved = [e for e in ledger.history(user) if e.type == "reserved"]
        assert len(reserved) == 10


def _reserve_in_process_same_job(url: str, user: str, keys: list[str], queue: multiprocessing.Queue[object]) -> None:
    results: list[tuple[str, str, str | None]] = []
    with Ledger(url) as ledger:
        for key in keys:
            job = uuid5(NAMESPACE_URL, key)
            try:
                receipt = ledger.reserve(UUID(user), job, 10, FAR, key=key)
                results.append((key, "ok", str(receipt.reservation_id)))
            except InsufficientCredits:
                results.append((key, "insufficient", None))
            except LedgerError as exc:
                results.append((key, f"error:{type(exc).__name__}:{exc}", None))
    queue.put(results)


@pytest.mark.postgres
def test_processes_settling_one_hold(pg_url: str) -> None:
    user = uuid4()
    with Ledger(pg_url) as ledger:
        ledger.grant(user, 100, "bonus", key=f"fund:{user}")
        rid = ledger.reserve(user, uuid4(), 50, FAR, key=f"{user}:hold").reservation_id
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[object] = ctx.Queue()
    procs = [ctx.Process(target=_settle_in_process, args=(pg_url, str(rid), n, queue)) for n in range(4)]
    for p in procs:
        p.start()
    results = sorted(str(queue.get(timeout=60)) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == ["closed", "closed", "closed", "settled"]
    with Ledger(pg_url) as ledger:
        assert ledger.balance(user).balance_credits == 60
        assert ledger.reservation(rid).status == "settled"  # type: ignore[arg-type]


def _settle_in_process(url: str, rid: str, n: int, queue: multiprocessing.Queue[object]) -> None:
    with Ledger(url) as ledger:
        try:
            ledger.settle(UUID(rid), 40, key=f"{rid}:settle:{n}")
            queue.put("settled")
        except ReservationClosed:
            queue.put("closed")
        except LedgerError as exc:
            queue.put(f"error:{exc}")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_url(request: pytest.FixtureRequest, tmp_path: object) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/shared.sqlite3"
    url: str = request.getfixturevalue("pg_url")
    return url


def test_a_process_with_a_stale_cache_decides_on_fresh_state(shared_url: str) -> None:
    """Process A has the account cached; process B changes it. A's refusals must
    be decided on the store's state, not on its cache."""
    user = uuid4()
    with Ledger(shared_url) as a, Ledger(shared_url) as b:
        a.grant(user, 10, "bonus", key=f"{user}:g1")
        a.spend(user, 10, key=f"{user}:s1")  # A caches the account at balance 0
        b.grant(user, 100, "bonus", key=f"{user}:g2")
        assert a.spend(user, 50, key=f"{user}:s2").balance_credits == 50
        hold = b.reserve(user, uuid4(), 20, FAR, key=f"{user}:r")
        assert hold.reservation_id is not None
        assert a.settle(hold.reservation_id, 20, key=f"{user}:settle", user_id=user).balance_credits == 30
        with pytest.raises(InsufficientCredits):  # a true refusal stays a refusal
            a.spend(user, 31, key=f"{user}:s3")


def test_a_replay_needs_no_spare_attempt(shared_url: str) -> None:
    user = uuid4()
    with Ledger(shared_url) as a, Ledger(shared_url, max_attempts=1) as b:
        first = a.grant(user, 10, "bonus", key=f"{user}:g")
        again = b.grant(user, 10, "bonus", key=f"{user}:g")
        assert again.replayed and again.entry_id == first.entry_id
