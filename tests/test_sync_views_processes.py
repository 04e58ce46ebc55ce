"""``Ledger(sync_views=True)`` in several processes at once: every process
projects after its own commands and they race for the same pages. A catch-up
that loses a page to another process's projector is not a failure when the
views have reached the command: no command that was recorded raises
``ViewsBehind`` for it, and each one's rows are readable when it returns.
A real failure still raises it."""

from __future__ import annotations

import multiprocessing
from collections import Counter
from typing import Any
from uuid import UUID, uuid4

import pytest

from ledger import Ledger, ManualClock, Receipt, ViewsBehind, ViewsStalled

PROCESSES = 4
COMMANDS = 60


def _commands_in_process(url: str, users: list[str], start: Any, queue: Any) -> None:
    outcomes: Counter[str] = Counter()
    try:
        with Ledger(url, sync_views=True) as ledger:
            ledger.views.catch_up()  # the views are open before the race starts
            start.wait()
            for n, text in enumerate(users):
                user = UUID(text)
                try:
                    receipt = ledger.grant(user, 10, "bonus", key=f"{user}:g")
                    if n % 2:
                        receipt = ledger.spend(user, 4, key=f"{user}:s")
                except ViewsBehind as exc:
                    outcomes[f"ViewsBehind({exc.cause!r})"] += 1
                    continue
                # Read-your-writes: the views include the command when it returns.
                reached = receipt.position is not None and ledger.views.position() >= receipt.position
                outcomes["ok" if reached else "views short of the command"] += 1
    except Exception as exc:  # reported to the test, which would otherwise wait for the queue
        outcomes[repr(exc)] += 1
    finally:
        queue.put(dict(outcomes))


def test_processes_racing_to_project_raise_no_views_behind(durable_url: str) -> None:
    with Ledger(durable_url) as ledger:
        ledger.views.catch_up()  # schema and tables in place before the processes start
    users = [[str(uuid4()) for _ in range(COMMANDS)] for _ in range(PROCESSES)]
    ctx = multiprocessing.get_context("spawn")
    start, queue = ctx.Event(), ctx.Queue()
    processes = [ctx.Process(target=_commands_in_process, args=(durable_url, mine, start, queue)) for mine in users]
    for process in processes:
        process.start()
    start.set()
    outcomes: Counter[str] = Counter()
    for _ in processes:
        outcomes.update(queue.get(timeout=300))
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert outcomes == Counter(ok=PROCESSES * COMMANDS)
    with Ledger(durable_url) as ledger:
        assert ledger.views.lag() == 0
        with ledger.views.store.transaction() as tx:
            [(rows,)] = tx.fetchall("SELECT COUNT(*) FROM credit_transactions")
            [(total,)] = tx.fetchall("SELECT SUM(balance) FROM credit_balances")
    spends = PROCESSES * (COMMANDS // 2)
    assert rows == PROCESSES * COMMANDS + spends
    assert total == 10 * PROCESSES * COMMANDS - 4 * spends


def test_views_that_cannot_reach_the_command_still_raise(ledger_url: str, clock: ManualClock) -> None:
    """Rows already past the tracking position (set back by hand) make every
    page conflict while the position stays put: that is no lost race."""
    with Ledger(ledger_url, clock=clock, sync_views=True) as ledger:
        user = uuid4()
        ledger.grant(user, 10, "bonus", key=f"{user}:g1")
        with ledger.views.store.transaction() as tx:
            tracking = ledger.backend.tracking_table
            tx.execute(f"UPDATE {tracking} SET notification_id = 0 WHERE application_name = 'ledger'")
        with pytest.raises(ViewsBehind) as info:
            ledger.grant(user, 5, "bonus", key=f"{user}:g2")
        # The projector stops at the event it cannot write again (ViewsStalled),
        # naming the database's refusal.
        stalled = info.value.cause
        assert isinstance(stalled, ViewsStalled)
        # The driver's own integrity error (sqlite3's, psycopg's UniqueViolation), or eventsourcing's.
        assert "IntegrityError" in {c.__name__ for c in type(stalled.cause).__mro__}
        assert isinstance(info.value.receipt, Receipt) and info.value.receipt.balance_credits == 15
        assert ledger.balance(user).balance_credits == 15  # recorded all the same


def _open_views(url: str, start: Any, queue: Any) -> None:
    try:
        with Ledger(url) as ledger:
            start.wait(timeout=60)
            ledger.views.catch_up()
        queue.put("ok")
    except Exception as exc:
        queue.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_the_views_of_a_new_store_at_once(durable_url: str) -> None:
    """Several workers of an application started together on a new store:
    each creates the views' tables if missing, and none fails for another
    creating them at the same moment."""
    Ledger(durable_url).close()  # the event store's tables; the views' not yet
    ctx = multiprocessing.get_context("spawn")
    start, queue = ctx.Barrier(6), ctx.Queue()
    processes = [ctx.Process(target=_open_views, args=(durable_url, start, queue)) for _ in range(6)]
    for process in processes:
        process.start()
    outcomes = [queue.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert outcomes == ["ok"] * 6
