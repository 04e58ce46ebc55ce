"""AsyncLedger: every Ledger method as a coroutine, shared by many tasks of
one event loop, bounded by the connection pool, closing cleanly. Under anyio's
pytest plugin (asyncio), on memory, SQLite and PostgreSQL."""

from __future__ import annotations

import inspect
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import anyio
import pytest

from ledger import (
    AsyncLedger,
    CreditPolicy,
    GrantCredits,
    InsufficientCredits,
    InvalidArgument,
    Ledger,
    LedgerClosed,
    ManualClock,
    ReservationClosed,
    UnknownAccount,
)
from ledger.application.async_ledger import MEMORY_CONCURRENCY, pool_capacity
from ledger.domain.credits import CreditAccount

FAR = datetime(2099, 1, 1, tzinfo=UTC)
START = datetime(2026, 1, 1, tzinfo=UTC)
#: Ledger's public methods whose async counterpart has another name.
RENAMED = {"close": "aclose"}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def public_methods(cls: type) -> dict[str, Any]:
    return {
        name: member
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and inspect.isfunction(member) and not isinstance(member, property)
    }


# ------------------------------------------------------------------ the surface


def test_every_public_ledger_method_has_an_async_counterpart_with_its_parameters() -> None:
    """Fails for a public Ledger method with no AsyncLedger coroutine of the
    same name and parameters: add ``name = _in_thread(Ledger.name)`` to
    AsyncLedger (one line; the parameters come from the Ledger method)."""
    missing, not_async, differing = [], [], []
    for name, method in public_methods(Ledger).items():
        counterpart = getattr(AsyncLedger, RENAMED.get(name, name), None)
        if counterpart is None:
            missing.append(name)
            continue
        if not (inspect.iscoroutinefunction(counterpart) or inspect.isasyncgenfunction(counterpart)):
            not_async.append(name)
        if name in RENAMED:
            continue
        ours = list(inspect.signature(counterpart).parameters.values())
        theirs = list(inspect.signature(method).parameters.values())
        if ours != theirs:
            differing.append(f"{name}: {ours} != {theirs}")
    assert missing == [], f"add to AsyncLedger: {', '.join(f'{n} = _in_thread(Ledger.{n})' for n in missing)}"
    assert not_async == []
    assert differing == []


def test_async_ledger_has_no_public_method_the_ledger_lacks() -> None:
    own = {"aclose", "open", "run_sync"}
    extra = set(public_methods(AsyncLedger)) - set(public_methods(Ledger)) - own
    assert extra == set()


def test_open_takes_every_option_of_the_ledger() -> None:
    theirs = inspect.signature(Ledger.__init__).parameters
    ours = inspect.signature(AsyncLedger.open).parameters
    for name, parameter in theirs.items():
        if name == "self":
            continue
        assert name in ours, f"AsyncLedger.open lacks Ledger's option {name}"
        assert (ours[name].kind, ours[name].default) == (parameter.kind, parameter.default), name
    assert set(ours) - set(theirs) == {"max_concurrency"}


def test_the_coroutines_show_the_ledger_methods_names_and_docs() -> None:
    assert AsyncLedger.grant.__name__ == "grant"
    assert AsyncLedger.grant.__doc__ == Ledger.grant.__doc__
    assert str(inspect.signature(AsyncLedger.balance)) == "(self, user_id: 'UUID') -> 'Coroutine[Any, Any, Balance]'"


# ------------------------------------------------------------------- behaviour


@pytest.mark.anyio
async def test_methods_behave_as_the_ledgers(ledger_url: str) -> None:
    clock = ManualClock(START)
    user = uuid4()
    async with AsyncLedger.open(ledger_url, clock=clock, credit_policy=CreditPolicy()) as ledger:
        first = await ledger.grant(user, 500, "bonus", key=f"{user}:welcome")
        assert first.balance_credits == 500
        assert (await ledger.grant(user, 500, "bonus", key=f"{user}:welcome")).replayed
        hold = await ledger.reserve(user, uuid4(), 200, FAR, key=f"{user}:job")
        assert hold.reservation_id is not None
        await ledger.settle(hold.reservation_id, 150, key=f"{user}:settle")
        with pytest.raises(ReservationClosed):
            await ledger.settle(hold.reservation_id, 150, key=f"{user}:settle-again")
        with pytest.raises(InsufficientCredits):
            await ledger.spend(user, 1_000, key=f"{user}:too-much")
        with pytest.raises(UnknownAccount):
            await ledger.balance(uuid4())
        with pytest.raises(InvalidArgument):
            await ledger.grant(user, -1, "bonus", key=f"{user}:negative")
        (batch,) = await ledger.execute_batch(
            [GrantCredits(key=f"{user}:batch", user_id=user, amount_credits=50, kind="bonus")]  # type: ignore[arg-type]
        )
        assert batch.balance_credits == 400
        balance = await ledger.balance(user)
        assert (balance.balance_credits, balance.held_credits, balance.available_credits) == (400, 0, 400)
        assert [e.type for e in await ledger.history(user)] == ["opened", "granted", "reserved", "settled", "granted"]
        await ledger.install_default_catalog()
        receipt = await ledger.start_subscription(user, "pro", key=f"{user}:pro")
        assert receipt.subscription_id is not None
        assert (await ledger.subscription_of(user)) == (await ledger.subscription(receipt.subscription_id))
        assert (await ledger.entitlements(user)).plan == "pro"
        opened = [e.user_id async for e in ledger.scan([CreditAccount.Opened.TOPIC])]
        assert opened == [user]
        assert await ledger.tick() == {"subscriptions": 0, "holds_and_lapses": 0}
        assert ledger.ledger.balance(user) == await ledger.balance(user)


@pytest.mark.anyio
async def test_scan_reads_page_after_page(ledger_url: str) -> None:
    users = [uuid4() for _ in range(2_100)]  # more than two pages of 1,000
    async with AsyncLedger.open(ledger_url) as ledger:
        commands = [GrantCredits(key=f"{u}:g", user_id=u, amount_credits=1, kind="bonus") for u in users]  # type: ignore[arg-type]
        await ledger.execute_batch(commands)
        seen = [e.user_id async for e in ledger.scan([CreditAccount.Opened.TOPIC])]
        assert seen == users
        with pytest.raises(InvalidArgument):
            [e async for e in ledger.scan("not a list")]  # type: ignore[arg-type]


# ---------------------------------------------------------- many tasks, bounded


class Probe:
    """Wraps a method of the synchronous ledger: how many calls ran at once,
    and in how many threads."""

    def __init__(self, fn: Callable[..., Any], pause_s: float = 0.0) -> None:
        self.fn = fn
        self.pause_s = pause_s
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.threads: set[int] = set()
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.running += 1
            self.calls += 1
            self.peak = max(self.peak, self.running)
            self.threads.add(threading.get_ident())
        try:
            if self.pause_s:
                time.sleep(self.pause_s)
            return self.fn(*args, **kwargs)
        finally:
            with self.lock:
                self.running -= 1


@pytest.mark.anyio
async def test_many_tasks_share_one_ledger_within_the_pool(ledger_url: str, anyio_backend: str) -> None:
    """300 tasks reserve 10 credits each from ten accounts of 100, then
    settle what they got: exactly 100 holds, no overdraft, and never more
    calls at once (nor worker threads) than max_concurrency."""
    users = [uuid4() for _ in range(10)]
    async with AsyncLedger.open(ledger_url, max_concurrency=4) as ledger:
        for user in users:
            await ledger.grant(user, 100, "bonus", key=f"{user}:fund")
        probe = Probe(ledger.ledger.reserve, pause_s=0.002)
        ledger.ledger.reserve = probe  # type: ignore[method-assign]
        outcomes: Counter[str] = Counter()
        holds: list[UUID] = []

        async def task(n: int) -> None:
            user = users[n % len(users)]
            try:
                receipt = await ledger.reserve(user, uuid4(), 10, FAR, key=f"{user}:job:{n}")
            except InsufficientCredits:
                outcomes["insufficient"] += 1
                return
            assert receipt.reservation_id is not None
            holds.append(receipt.reservation_id)
            outcomes["reserved"] += 1
            await ledger.settle(receipt.reservation_id, 7, key=f"{user}:settle:{n}")

        async with anyio.create_task_group() as tasks:
            for n in range(300):
                tasks.start_soon(task, n)
        assert outcomes == Counter(reserved=100, insufficient=200)
        assert probe.calls == 300
        assert 2 <= probe.peak <= 4
        # asyncio reuses its worker threads; trio's thread cache may start one
        # while another, its call done, is on its way back (docs/async.md).
        assert len(probe.threads) <= (4 if anyio_backend == "asyncio" else 8)
        assert ledger.calls_in_flight == 0
        for user in users:
            balance = await ledger.balance(user)
            assert (balance.balance_credits, balance.held_credits, balance.available_credits) == (30, 0, 30)
        assert {(await ledger.reservation(h)).settled_credits for h in holds} == {7}


@pytest.mark.anyio
async def test_tasks_on_one_hot_account_share_transactions_with_group_commit(ledger_url: str) -> None:
    """200 tasks reserve and settle on one account through a ledger opened
    with group commit: none is refused for contention (ConcurrencyExhausted),
    the balance is exact, and the commands shared transactions."""
    user = uuid4()
    async with AsyncLedger.open(ledger_url, group_commit=True) as ledger:
        await ledger.grant(user, 1_000, "bonus", key=f"{user}:fund")

        async def task(n: int) -> None:
            receipt = await ledger.reserve(user, uuid4(), 5, FAR, key=f"{user}:job:{n}")
            assert receipt.reservation_id is not None
            await ledger.settle(receipt.reservation_id, 3, key=f"{user}:settle:{n}")

        async with anyio.create_task_group() as tasks:
            for n in range(200):
                tasks.start_soon(task, n)
        balance = await ledger.balance(user)
        assert (balance.balance_credits, balance.held_credits) == (1_000 - 200 * 3, 0)
        stats = ledger.ledger.group_commit.stats
        assert stats.commands >= 400 and stats.shared_batches >= 1
        assert len(await ledger.history(user, limit=10_000)) == 2 + 200 * 2


@pytest.mark.anyio
async def test_the_default_bound_is_the_connection_pool(durable_url: str) -> None:
    async with AsyncLedger.open(durable_url) as ledger:
        assert ledger.max_concurrency == pool_capacity(ledger.ledger) == 15  # 5 + 10, the seed's pool
        assert ledger.limiter.total_tokens == 15
    async with AsyncLedger.open("memory://") as memory:
        assert memory.max_concurrency == MEMORY_CONCURRENCY


@pytest.mark.postgres
@pytest.mark.anyio
async def test_the_bound_follows_the_urls_pool(pg_url: str) -> None:
    async with AsyncLedger.open(f"{pg_url}&pool_size=2&max_overflow=1") as ledger:
        assert ledger.max_concurrency == 3
    with pytest.raises(InvalidArgument) as raised:
        await AsyncLedger.open(f"{pg_url}&pool_size=2&max_overflow=1", max_concurrency=4)
    assert raised.value.param == "max_concurrency" and "1..3" in str(raised.value)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4", 10_000])
def test_a_bound_outside_the_pool_is_refused(bad: Any) -> None:
    with Ledger("memory://") as ledger, pytest.raises(InvalidArgument) as raised:
        AsyncLedger(ledger, max_concurrency=bad)
    assert raised.value.param == "max_concurrency"


def test_only_a_ledger_is_wrapped() -> None:
    with pytest.raises(InvalidArgument):
        AsyncLedger("memory://")  # type: ignore[arg-type]


# ------------------------------------------------------------------ closing


class Gate:
    """A blocking call that waits until the test opens the gate."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = threading.Semaphore(0)
        self.ran = 0

    def __call__(self, value: int) -> int:
        self.entered.release()
        assert self.opened.wait(10)
        self.ran += 1
        return value


@pytest.mark.anyio
async def test_close_lets_running_calls_finish_and_fails_waiting_ones(ledger_url: str) -> None:
    """Two calls run (max_concurrency=2), three wait their turn; aclose
    begins: the two finish with their results, the three fail with
    LedgerClosed without running, a new call fails at once, and the store
    is closed only after the running calls returned."""
    ledger = await AsyncLedger.open(ledger_url, max_concurrency=2)
    gate = Gate()
    closes: list[int] = []
    real_close = ledger.ledger.close

    def close() -> None:
        closes.append(gate.ran)
        real_close()

    ledger.ledger.close = close  # type: ignore[method-assign]
    results: dict[int, object] = {}

    async def call(n: int) -> None:
        try:
            results[n] = await ledger.run_sync(gate, n)
        except LedgerClosed as exc:
            results[n] = exc

    async with anyio.create_task_group() as tasks:
        for n in range(5):
            tasks.start_soon(call, n)
        for _ in range(2):  # two calls are in their threads
            await anyio.to_thread.run_sync(gate.entered.acquire)
        await anyio.sleep(0.05)
        assert ledger.calls_in_flight == 5
        tasks.start_soon(ledger.aclose)
        await anyio.sleep(0.05)
        assert ledger.closed and closes == []  # still waiting for the running calls
        with pytest.raises(LedgerClosed):
            await ledger.balance(uuid4())
        gate.opened.set()
    finished = sorted(n for n, r in results.items() if r == n)
    refused = [r for r in results.values() if isinstance(r, LedgerClosed)]
    assert len(finished) == 2 and len(refused) == 3 and gate.ran == 2
    assert all(r.code == "ledger_closed" and "did not run" in str(r) for r in refused)
    assert closes == [2]  # closed once, after both running calls returned
    await ledger.aclose()  # again: nothing more
    assert closes == [2]


@pytest.mark.anyio
async def test_a_cancelled_shutdown_still_closes_the_store(ledger_url: str) -> None:
    """A shutdown with a deadline shorter than a running call: the close is
    shielded, so the call finishes and the store is closed all the same."""
    ledger = await AsyncLedger.open(ledger_url)
    gate = Gate()
    closed = threading.Event()
    real_close = ledger.ledger.close

    def close() -> None:
        real_close()
        closed.set()

    ledger.ledger.close = close  # type: ignore[method-assign]

    async def open_gate_late() -> None:
        await anyio.sleep(0.2)
        gate.opened.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(ledger.run_sync, gate, 1)
        await anyio.to_thread.run_sync(gate.entered.acquire)
        tasks.start_soon(open_gate_late)
        with anyio.move_on_after(0.05):
            await ledger.aclose()
    assert closed.is_set() and gate.ran == 1 and ledger.closed


@pytest.mark.anyio
async def test_a_task_cancelled_while_waiting_never_runs_its_call_and_one_running_completes(
    durable_url: str,
) -> None:
    user = uuid4()
    ledger = await AsyncLedger.open(durable_url, max_concurrency=1)
    try:
        await ledger.grant(user, 100, "bonus", key=f"{user}:fund")
        gate = Gate()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(ledger.run_sync, gate, 1)  # holds the only slot
            await anyio.to_thread.run_sync(gate.entered.acquire)
            with anyio.move_on_after(0.05):
                await ledger.spend(user, 10, key=f"{user}:waited")  # waits for the slot, then is cancelled
            gate.opened.set()
        with anyio.move_on_after(0.01):
            await ledger.spend(user, 20, key=f"{user}:started")  # started in its thread: runs to its end
        assert ledger.calls_in_flight == 0
        assert (await ledger.balance(user)).balance_credits == 80
    finally:
        await ledger.aclose()
    with Ledger(durable_url) as reopened:  # what was recorded, as another process sees it
        assert reopened.balance(user).balance_credits == 80


@pytest.mark.anyio
async def test_an_invalid_bound_closes_what_open_opened(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Ledger] = []

    class Recording(Ledger):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

        def close(self) -> None:
            opened.remove(self)
            super().close()

    monkeypatch.setattr("ledger.application.async_ledger.Ledger", Recording)
    with pytest.raises(InvalidArgument):
        await AsyncLedger.open("memory://", max_concurrency=0)
    assert opened == []


@pytest.mark.anyio
async def test_a_ledger_it_does_not_own_stays_open() -> None:
    with Ledger("memory://") as ledger:
        async with AsyncLedger(ledger, close_ledger=False) as wrapper:
            await wrapper.grant(UUID(int=1), 5, "bonus", key="k")
        assert wrapper.closed
        assert ledger.balance(UUID(int=1)).balance_credits == 5


def test_open_is_awaitable_and_an_async_context_manager(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"

    async def main() -> tuple[int, bool]:
        ledger = await AsyncLedger.open(url, max_concurrency=3)
        try:
            await ledger.grant(UUID(int=2), 7, "bonus", key="k")
        finally:
            await ledger.aclose()
        async with AsyncLedger.open(url, create=False) as again:
            return (await again.balance(UUID(int=2))).balance_credits, again.closed

    assert anyio.run(main) == (7, False)


def test_asyncios_own_cancellation_waits_for_a_started_call(durable_url: str) -> None:
    """``asyncio.wait_for`` and ``task.cancel()`` cancel past anyio's shield:
    the caller sees the timeout only once the command in its thread has
    returned, the call keeps its turn until then (max_concurrency=1: the next
    call waits), a close waits for it, and a retry with the same key finds
    the command recorded."""
    import asyncio

    user = uuid4()

    async def main() -> None:
        ledger = await AsyncLedger.open(durable_url, max_concurrency=1)
        gate = Gate()
        real_spend, real_close = ledger.ledger.spend, ledger.ledger.close
        closes: list[int] = []

        def spend(*args: Any, **kwargs: Any) -> Any:
            gate(0)
            return real_spend(*args, **kwargs)

        def close() -> None:
            closes.append(gate.ran)
            real_close()

        ledger.ledger.spend = spend  # type: ignore[method-assign]
        ledger.ledger.close = close  # type: ignore[method-assign]
        await ledger.grant(user, 100, "bonus", key=f"{user}:fund")
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, gate.opened.set)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ledger.spend(user, 10, key=f"{user}:timed-out"), 0.05)
        assert gate.ran == 1 and ledger.calls_in_flight == 0
        assert (await ledger.spend(user, 10, key=f"{user}:timed-out")).replayed

        gate.opened.clear()
        gate.entered = threading.Semaphore(0)
        task = asyncio.ensure_future(ledger.spend(user, 20, key=f"{user}:cancelled"))
        await asyncio.to_thread(gate.entered.acquire)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done() and ledger.calls_in_flight == 1  # still running in its thread
        waiting = asyncio.ensure_future(ledger.balance(user))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # the bound of one still holds
        closing = asyncio.ensure_future(ledger.aclose())
        await asyncio.sleep(0.05)
        assert closes == []
        gate.opened.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(LedgerClosed):
            await waiting
        await closing
        assert closes == [3]  # the replay passed the gate too

    asyncio.run(main())
    with Ledger(durable_url) as reopened:
        assert reopened.balance(user).balance_credits == 70


def test_a_second_event_loop_is_refused_while_the_first_has_calls_in_flight(tmp_path: Any) -> None:
    """The limiter's waiters belong to the loop that made them: calls from a
    second loop (another thread's ``asyncio.run``) while the first loop has
    calls in flight fail at once rather than hang; once the first loop's
    calls are done, another loop may use the ledger."""
    import asyncio

    ledger = AsyncLedger(Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}"), max_concurrency=1)
    gate = Gate()
    errors: list[BaseException] = []

    async def first() -> None:
        await asyncio.gather(ledger.run_sync(gate, 1), ledger.run_sync(gate, 2))  # one runs, one waits

    def second() -> None:
        async def calls() -> None:
            for coro in (ledger.balance(uuid4()), ledger.aclose()):
                try:
                    await asyncio.wait_for(coro, 5)
                except BaseException as exc:  # what the second loop saw
                    errors.append(exc)

        assert gate.entered.acquire(timeout=10)
        asyncio.run(calls())
        gate.opened.set()

    other = threading.Thread(target=second)
    other.start()
    asyncio.run(first())
    other.join()
    assert [type(exc) for exc in errors] == [RuntimeError, RuntimeError]
    assert "another event loop" in str(errors[0]) and not ledger.closed and gate.ran == 2

    async def later() -> int:
        async with ledger:
            return (await ledger.grant(UUID(int=3), 5, "bonus", key="later")).balance_credits

    assert asyncio.run(later()) == 5 and ledger.closed
