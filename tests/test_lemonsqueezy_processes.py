"""Lemon Squeezy deliveries as a production endpoint receives them: several
worker processes, each with its own ``Ledger`` and ``LemonSqueezy`` adapter
on one store (a PostgreSQL schema, or one SQLite file), and threads in each,
ingesting at the same time, in random orders, with duplicates and resends of
one webhook id racing in different processes, and a worker killed (SIGKILL)
in the middle of a delivery, whose unanswered deliveries are then sent again
as Lemon Squeezy retries them.

Each run is compared with the same deliveries ingested one at a time in
Lemon Squeezy's order: the subscriptions, their snapshots and history, every
credit movement and balance, and ``webhook_events`` (one row per webhook id,
each processed once the retries have run, none left ``received``); the audit
finds nothing and the views rebuilt from the events equal the live ones.
Every delivery answered 2xx has its row."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from adapters.lemonsqueezy import LemonSqueezy
from adapters.webhooks.inbox import Inbox
from adapters.webhooks.pipeline import DEFAULT_STALE_AFTER_S
from ledger import Ledger, audit
from ledger.storage.eventstore import LedgerApplication
from tests.lemonsqueezy_support import (
    BEFORE,
    END,
    START,
    USER,
    Builder,
    Delivery,
    Stores,
    StoryClock,
    _subscriptions,
    adapter_for,
    headers_for,
    history_in_order,
    open_ledger,
    refunds_summed,
    store_factory,
    story,
    view_tables,
)

CTX = multiprocessing.get_context("spawn")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def stores(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    """Fresh, empty stores that several processes share (a run and its baseline each get one)."""
    yield from store_factory(request.param, tmp_path_factory, "lsp")


# ------------------------------------------------------------------ a worker


def _worker(
    url: str,
    jobs: list[tuple[int, bytes]],
    threads: int,
    start: Any,
    lockstep: Any,
    kill_at_save: int | None,
    kill_after_save: bool,
    out: str,
) -> None:
    """One endpoint process: its own ledger and adapter (defining the plans
    at start-up, as the example application does), ``threads`` request
    threads taking ``jobs`` in order, each answer written as it is given
    (``index http_status status processing``). ``lockstep``: a barrier all
    processes wait at before each delivery (they share one job list), so
    that every copy arrives at the same instant. ``kill_at_save``: the
    process SIGKILLs itself at its n-th ledger save, before it commits or
    (``kill_after_save``) right after, before the outcome is recorded."""
    if kill_at_save is not None:
        original = LedgerApplication.save_all
        saves = [0]
        counting = threading.Lock()

        def save_all(self: LedgerApplication, objs: Any) -> Any:
            with counting:
                if start.is_set():  # the deliveries' saves, not the start-up's
                    saves[0] += 1
                now = saves[0] == kill_at_save
            if now and not kill_after_save:
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(self, objs)  # a save that loses a race raises, and the next one is killed
            if kill_after_save and saves[0] >= kill_at_save:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        LedgerApplication.save_all = save_all  # type: ignore[method-assign]
    ledger = open_ledger(url, StoryClock(BEFORE))
    adapter = adapter_for(ledger)
    pending = list(reversed(jobs))
    lock = threading.Lock()
    sink = open(out, "a", buffering=1)  # noqa: SIM115  (closed below; line-buffered: a kill loses no answer)
    start.wait(timeout=120)

    def run() -> None:
        while True:
            with lock:
                if not pending:
                    return
                index, body = pending.pop()
            if lockstep is not None:
                with contextlib.suppress(threading.BrokenBarrierError):  # a twin was killed
                    lockstep.wait(timeout=60)
            result = adapter.ingest(body, headers_for(body))
            with lock:
                sink.write(f"{index} {result.http_status} {result.status} {result.processing}\n")

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    sink.close()
    ledger.close()


class Fleet:
    """Worker processes on one store, started together."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.url = url
        self.tmp = tmp
        self.outs: list[Path] = []
        self.jobs: list[list[tuple[int, bytes]]] = []
        self.procs: list[Any] = []
        self.threads = 1

    def run(
        self,
        assignments: list[list[tuple[int, bytes]]],
        *,
        threads: int = 2,
        lockstep: bool = False,
        kill: dict[int, tuple[int, bool]] | None = None,
    ) -> None:
        self.threads = max(self.threads, threads)
        start = CTX.Event()
        barrier = CTX.Barrier(len(assignments)) if lockstep else None
        for n, jobs in enumerate(assignments):
            out = self.tmp / f"answers-{uuid.uuid4().hex[:8]}"
            out.touch()
            kill_at, after = (kill or {}).get(n, (None, False))
            proc = CTX.Process(target=_worker, args=(self.url, jobs, threads, start, barrier, kill_at, after, str(out)))
            proc.start()
            self.procs.append(proc)
            self.outs.append(out)
            self.jobs.append(jobs)
        start.set()
        for proc in self.procs[-len(assignments) :]:
            proc.join(timeout=240)
            assert proc.exitcode is not None, "a worker hung"
            # A worker ends when its deliveries are done, or killed: none fails
            # (starting up on a new store together with the others included).
            assert proc.exitcode in (0, -signal.SIGKILL), proc.exitcode

    def answers(self) -> list[tuple[int, int, str, str]]:
        found = []
        for out in self.outs:
            for line in out.read_text().splitlines():
                index, http, status, processing = line.split(" ")
                found.append((int(index), int(http), status, processing))
        return found

    def unanswered(self) -> list[int]:
        """The deliveries a killed worker took no answer back for (Lemon Squeezy sends them again)."""
        answered: dict[Path, set[int]] = {}
        for out in self.outs:
            answered[out] = {int(line.split(" ")[0]) for line in out.read_text().splitlines()}
        missing: list[int] = []
        for proc, out, jobs in zip(self.procs, self.outs, self.jobs, strict=True):
            if proc.exitcode != 0:
                missing.extend(i for i, _ in jobs if i not in answered[out])
        return missing

    def killed(self) -> int:
        return sum(p.exitcode == -signal.SIGKILL for p in self.procs)


# ---------------------------------------------------------------- the state


def state(ledger: Ledger) -> dict[str, Any]:
    """What must not depend on the order, concurrency or crashes of the
    deliveries (see test_lemonsqueezy_story: the same, over every customer)."""
    ledger.tick(END, allow_future=True)
    ledger.views.catch_up()
    users = sorted({str(r[0]) for r in ledger.views.store.rows("credit_balances", "user_id")})
    balances = {}
    for text in users:
        b = ledger.balance(UUID(text))
        balances[text] = (
            b.balance_credits,
            b.held_credits,
            sorted((k.kind, k.granted_credits, k.remaining_credits, k.expires_at) for k in b.blocks),
        )
    return {
        **view_tables(ledger),
        "balances": balances,
        "history": sorted(row for sid in set(_subscriptions(ledger)) for row in history_in_order(ledger, sid)),
        "webhook_events": sorted(
            (str(r[0]), str(r[1]), str(r[2]))
            for r in _inbox(ledger, "SELECT event_id, event_type, status FROM webhook_events")
        ),
    }


def _inbox(ledger: Ledger, sql: str) -> list[tuple[Any, ...]]:
    with ledger.views.store.transaction() as tx:
        return [tuple(r) for r in tx.fetchall(sql)]


def checked(ledger: Ledger) -> dict[str, Any]:
    """The state, once the audit and a rebuild of the views found nothing."""
    found = state(ledger)
    report = audit(ledger)
    assert report.findings == [], report.findings[:5]
    views = ledger.views
    aside = views.build_aside(until=views.position())
    try:
        differences = views.verify(aside)
        assert all(not rows for rows in differences.values()), differences
    finally:
        views.drop_aside(aside)
    return found


def baseline(url: str, deliveries: list[Delivery]) -> dict[str, Any]:
    """The deliveries one at a time in Lemon Squeezy's order, each at its time."""
    clock = StoryClock(BEFORE)
    with open_ledger(url, clock) as ledger:
        adapter = adapter_for(ledger)
        for d in deliveries:
            clock.set(d.at)
            assert adapter.ingest(d.body, headers_for(d.body)).http_status == 200
        assert set(adapter.inbox.counts()) == {"processed"}
        return checked(ledger)


def settle(url: str, fleet: Fleet, deliveries: list[Delivery]) -> tuple[Ledger, LemonSqueezy]:
    """After the workers: what a killed one left unanswered is sent again
    (Lemon Squeezy's retry), then ``webhooks retry`` runs, past the time a
    ``received`` row counts as left by a stopped process, until nothing is
    due. Every answer was 2xx, and each one's delivery has its row."""
    clock = StoryClock(BEFORE)
    ledger = open_ledger(url, clock)
    adapter = adapter_for(ledger)
    left = _inbox(ledger, "SELECT status, error_message FROM webhook_events WHERE status <> 'processed'")
    # A killed worker leaves at most the deliveries its threads had in flight
    # ``received`` (and those it was releasing held). Without a kill, every
    # held one was released as soon as what it waited for was processed.
    assert sum(status == "received" for status, _ in left) <= fleet.threads * fleet.killed(), left
    if fleet.killed() == 0:
        assert left == []
    for index in fleet.unanswered():
        body = deliveries[index].body
        result = adapter.ingest(body, headers_for(body))
        assert result.http_status == 200, result
    answers = fleet.answers()
    assert [a for a in answers if a[1] != 200] == []
    stored = {str(r[0]) for r in _inbox(ledger, "SELECT event_id FROM webhook_events")}
    for index, *_ in answers:
        assert deliveries[index].payload["meta"]["webhook_id"] in stored
    clock.set(BEFORE + timedelta(seconds=DEFAULT_STALE_AFTER_S + 1))
    for _ in range(5):
        counts = adapter.inbox.counts()
        if set(counts) == {"processed"}:
            break
        adapter.retry_failed()
    assert set(adapter.inbox.counts()) == {"processed"}, adapter.inbox.listing(status=None, limit=5)
    return ledger, adapter


def customers(n: int) -> list[Builder]:
    return [
        Builder(user=uuid.uuid4(), subscription=str(890000 + i), customer=780000 + i, offset=1000 * (i + 1))
        for i in range(n)
    ]


def in_lemon_squeezys_order(builders: list[Builder]) -> list[Delivery]:
    every = [d for b in builders for d in story(b)]
    return sorted(every, key=lambda d: d.at)  # stable: one customer's simultaneous deliveries keep their order


def with_copies(deliveries: list[Delivery], seed: int) -> list[Delivery]:
    """Each delivery, a second copy of it (a retry: the same webhook id and
    bytes), and a resend under a new webhook id."""
    return [d for original in deliveries for d in (original, original, original.resent(str(seed)))]


def distribute(count: int, processes: int, seed: int) -> list[list[tuple[int, int]]]:
    """Indexes shuffled (seeded) and dealt to the processes: the copies of one
    delivery mostly land in different processes."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return [[(i, i) for i in order[p::processes]] for p in range(processes)]


def jobs_of(deliveries: list[Delivery], dealt: list[list[tuple[int, int]]]) -> list[list[tuple[int, bytes]]]:
    return [[(i, deliveries[i].body) for i, _ in mine] for mine in dealt]


def fleet_on(stores: Stores, tmp_path: Path) -> Fleet:
    """Workers for a fresh store, created before they start (as a deployed store is)."""
    url = stores()
    open_ledger(url, StoryClock(BEFORE)).close()
    return Fleet(url, tmp_path)


def settled_state(fleet: Fleet, deliveries: list[Delivery]) -> dict[str, Any]:
    """The store's state once the fleet's deliveries are settled (``settle``) and ``checked``."""
    ledger, _ = settle(fleet.url, fleet, deliveries)
    try:
        return checked(ledger)
    finally:
        ledger.close()


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("seed", [2026])
def test_one_customers_life_in_three_processes(stores: Stores, tmp_path: Path, seed: int) -> None:
    expected = baseline(stores(), story())
    deliveries = with_copies(story(), seed)
    fleet = fleet_on(stores, tmp_path)
    fleet.run(jobs_of(deliveries, distribute(len(deliveries), 3, seed)), threads=3)
    found = settled_state(fleet, deliveries)
    assert _same_but_resends(found, expected)


def _same_but_resends(found: dict[str, Any], expected: dict[str, Any]) -> bool:
    for name in ("subscriptions", "snapshots", "credit_transactions", "credit_balances", "balances", "history"):
        assert found[name] == expected[name], name
    # Every webhook id once: the originals as in the baseline, and each resend's own row, processed.
    originals = {e[0] for e in expected["webhook_events"]}
    assert [e for e in found["webhook_events"] if e[0] in originals] == expected["webhook_events"]
    assert {e[2] for e in found["webhook_events"]} == {"processed"}
    assert len(found["webhook_events"]) == 2 * len(expected["webhook_events"])
    return True


@pytest.mark.parametrize("seed", [5])
def test_many_customers_at_once_in_four_processes(stores: Stores, tmp_path: Path, seed: int) -> None:
    builders = customers(4)
    expected = baseline(stores(), in_lemon_squeezys_order(builders))
    deliveries = with_copies(in_lemon_squeezys_order(customers_again(builders)), seed)
    fleet = fleet_on(stores, tmp_path)
    fleet.run(jobs_of(deliveries, distribute(len(deliveries), 4, seed)), threads=3)
    found = settled_state(fleet, deliveries)
    assert _same_but_resends(found, expected)


def customers_again(builders: list[Builder]) -> list[Builder]:
    """The same customers, their webhook ids counted afresh (the bodies are the baseline's)."""
    return [Builder(user=b.user, subscription=b.subscription, customer=b.customer, offset=b.offset) for b in builders]


@pytest.mark.parametrize("copies", [3])
def test_every_delivery_in_several_processes_at_the_same_instant(stores: Stores, tmp_path: Path, copies: int) -> None:
    """Each process gets the whole story in the same shuffled order and waits
    at a barrier before each delivery: every copy races its twins."""
    expected = baseline(stores(), story())
    deliveries = story()
    order = list(range(len(deliveries)))
    random.Random(copies).shuffle(order)
    fleet = fleet_on(stores, tmp_path)
    fleet.run([[(i, deliveries[i].body) for i in order]] * copies, threads=1, lockstep=True)
    answers = fleet.answers()
    assert len(answers) == copies * len(deliveries)
    per_delivery = {i: sorted(a[2] for a in answers if a[0] == i) for i in order}
    assert all(s == ["duplicate"] * (copies - 1) + ["stored"] for s in per_delivery.values()), per_delivery
    found = settled_state(fleet, deliveries)
    for name in ("subscriptions", "snapshots", "credit_transactions", "credit_balances", "balances", "history"):
        assert found[name] == expected[name], name
    assert found["webhook_events"] == expected["webhook_events"]


@pytest.mark.parametrize(("seed", "after"), [(3, False), (4, True)])
def test_workers_killed_mid_delivery_then_resent(stores: Stores, tmp_path: Path, seed: int, after: bool) -> None:
    """Two of three workers SIGKILL themselves at a ledger save (before its
    commit, or right after it, before the outcome is recorded); what they
    left unanswered is sent again; ``webhooks retry`` runs what they left
    ``received``."""
    expected = baseline(stores(), story())
    deliveries = with_copies(story(), seed)
    fleet = fleet_on(stores, tmp_path)
    rng = random.Random(seed)
    fleet.run(
        jobs_of(deliveries, distribute(len(deliveries), 3, seed)),
        threads=2,
        kill={0: (rng.randint(1, 2), after), 1: (rng.randint(1, 2), after)},
    )
    assert fleet.killed() == 2, [(p.exitcode, o.read_text()) for p, o in zip(fleet.procs, fleet.outs, strict=True)]
    found = settled_state(fleet, deliveries)
    assert _same_but_resends(found, expected)


def test_a_delivery_held_while_what_it_waits_for_is_processed_is_released(
    ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of two request threads (or processes): the initial invoice
    finds no snapshot and is held, but before its outcome is recorded the
    subscription's snapshot is processed, and looks for the deliveries held
    for it: the invoice is not one yet. It must not wait for ``webhooks
    retry``: the invoice is granted as soon as both answers are given."""
    deliveries = {d.name: d for d in reversed(story()[:3])}  # the first of each name
    invoice, snapshot = deliveries["subscription_payment_success"], deliveries["subscription_created"]
    held_applied, snapshot_done = threading.Event(), threading.Event()
    original = Inbox.finish

    def finish(self: Inbox, row_id: UUID, **kwargs: Any) -> Any:
        message = kwargs.get("message") or ""
        if message.startswith("held: ") and not held_applied.is_set():
            held_applied.set()  # the invoice was applied and held; its outcome is not recorded yet
            assert snapshot_done.wait(timeout=30)
        return original(self, row_id, **kwargs)

    monkeypatch.setattr(Inbox, "finish", finish)
    with open_ledger(ledger_url, StoryClock(BEFORE)) as ledger:
        adapter = adapter_for(ledger)
        answers: list[Any] = []

        def send_invoice() -> None:
            answers.append(adapter.ingest(invoice.body, headers_for(invoice.body)))

        thread = threading.Thread(target=send_invoice)
        thread.start()
        assert held_applied.wait(timeout=30)
        answers.append(adapter.ingest(snapshot.body, headers_for(snapshot.body)))
        snapshot_done.set()
        thread.join(timeout=30)
        assert [a.http_status for a in answers] == [200, 200]
        assert adapter.inbox.counts() == {"processed": 2}
        assert ledger.balance(USER).balance_credits == 5000


@pytest.mark.parametrize("seed", [8])
def test_a_life_with_refunds_in_steps_in_three_processes(stores: Stores, tmp_path: Path, seed: int) -> None:
    """The simulator's whole life (a refunded renewal, a pack refunded 40 %
    then in full), copies and resends in three processes, one killed."""
    from tests.test_lemonsqueezy_orders import life

    originals = [Delivery(d.at, d.event_name, d.body) for d in life()]
    expected = baseline(stores(), originals)
    deliveries = with_copies(originals, seed)
    fleet = fleet_on(stores, tmp_path)
    fleet.run(jobs_of(deliveries, distribute(len(deliveries), 3, seed)), threads=2, kill={2: (3, True)})
    found = settled_state(fleet, deliveries)
    refunds = refunds_summed(found)["refunds"]
    assert refunds == refunds_summed(expected)["refunds"] and len(refunds) == 2
    for name in ("subscriptions", "snapshots", "credit_balances", "balances", "history"):
        assert found[name] == expected[name], name
    assert refunds_summed(found)["credit_transactions"] == refunds_summed(expected)["credit_transactions"]


def test_a_plan_changed_up_down_and_up_again_in_three_processes(stores: Stores, tmp_path: Path) -> None:
    """One period's upgrade, downgrade and upgrade again with their proration
    invoices, copies and resends in three processes: the upgrade is credited
    once (which invoice carries it depends on the order, by design: see
    *Which plan an invoice paid for*)."""
    from tests.test_lemonsqueezy_orders import simulator, up_down_up

    checkout, changes = up_down_up(simulator())
    bodies = checkout + changes
    deliveries = with_copies([Delivery(START, "", body) for body in bodies], 1)
    fleet = fleet_on(stores, tmp_path)
    fleet.run(jobs_of(deliveries, distribute(len(deliveries), 3, 1)), threads=2)
    ledger, _ = settle(fleet.url, fleet, deliveries)
    try:
        granted = sorted(e.data["amount"] for e in ledger.history(USER) if e.type == "granted")
        assert granted == [5000, 10000]  # Starter's; Pro's minus Starter's, once
        found = checked(ledger)
        assert found["balances"][str(USER)][0] == 0  # all lapsed at END
        assert len(found["webhook_events"]) == 2 * len(bodies)
    finally:
        ledger.close()
