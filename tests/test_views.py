"""Read models on every backend: rows, running balances, exactly-once paging,
read-your-writes, rebuild and verify."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest

from ledger import Ledger, ManualClock, ViewsBehind, ViewsCorrupt
from ledger.views.projector import StalePosition

HOUR = timedelta(hours=1)


def rows(ledger: Ledger, table: str, order_by: str) -> list[dict[str, Any]]:
    store = ledger.views.store
    columns = store.columns(table)
    return [dict(zip(columns, r, strict=True)) for r in store.rows(table, order_by)]


def story(ledger: Ledger, clock: ManualClock) -> tuple[UUID, UUID]:
    alice, bob = uuid4(), uuid4()
    ledger.grant(alice, 500, "subscription_grant", key=f"{alice}:g", expires_at=clock.now() + 24 * HOUR,
                 reference_type="invoice", reference_id="3420871")  # fmt: skip
    ledger.grant(alice, 100, "bonus", key=f"{alice}:b")
    ledger.grant(bob, 50, "purchase", key=f"{bob}:p", reference_id=str(uuid4()), reference_type="order")
    hold = ledger.reserve(alice, uuid4(), 200, clock.now() + 2 * HOUR, key=f"{alice}:r1")
    ledger.settle(hold.reservation_id, 150, key=f"{alice}:s1")
    hold2 = ledger.reserve(alice, uuid4(), 100, clock.now() + 2 * HOUR, key=f"{alice}:r2")
    ledger.release(hold2.reservation_id, "cancelled", key=f"{alice}:rel")
    ledger.reserve(alice, uuid4(), 30, clock.now() + HOUR, key=f"{alice}:r3")
    ledger.spend(bob, 20, key=f"{bob}:api")
    ledger.adjust(bob, -5, "correction", "admin:kim", key=f"{bob}:adj")
    clock.advance(25 * HOUR)
    ledger.expire_holds()
    ledger.record_due([alice])
    return alice, bob


def test_views_follow_the_ledger(ledger: Ledger, clock: ManualClock) -> None:
    alice, bob = story(ledger, clock)
    assert ledger.views.catch_up() > 0
    transactions = rows(ledger, "credit_transactions", "log_position")
    by_user: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in transactions:
        by_user[str(row["user_id"])].append(row)
    for user in (alice, bob):
        running = 0
        for row in by_user[str(user)]:
            running += row["amount"]
            assert row["balance_after"] == running  # an unbroken chain
        assert running == ledger.balance(user).balance_credits
    types = [r["type"] for r in by_user[str(alice)]]
    assert types == ["subscription_grant", "bonus", "generation_use", "expiration"]
    assert [r["amount"] for r in by_user[str(alice)]] == [500, 100, -150, -350]
    invoice = by_user[str(alice)][0]
    assert (invoice["reference_type"], invoice["reference_label"], invoice["reference_id"]) == (
        "invoice",
        "3420871",
        None,
    )
    assert by_user[str(bob)][0]["reference_id"] is not None  # a UUID reference is kept as one
    reservations = rows(ledger, "credit_reservations", "created_at, id")
    assert sorted((r["status"], r["settled_amount"]) for r in reservations) == [
        ("refunded", None),
        ("refunded", None),
        ("settled", 150),
    ]
    balances = {str(r["user_id"]): r for r in rows(ledger, "credit_balances", "user_id")}
    for user in (alice, bob):
        b = ledger.balance(user)
        row = balances[str(user)]
        assert (row["balance"], row["held"], row["available"]) == (
            b.balance_credits,
            b.held_credits,
            b.available_credits,
        )


def test_catching_up_twice_writes_nothing_twice(ledger: Ledger, clock: ManualClock) -> None:
    story(ledger, clock)
    ledger.views.catch_up()
    before = ledger.views.checksums()
    assert ledger.views.catch_up() == 0
    assert ledger.views.checksums() == before
    assert ledger.views.position() == ledger.views.projector.head()


def test_a_page_from_a_stale_position_is_refused(ledger: Ledger, clock: ManualClock) -> None:
    story(ledger, clock)
    projector = ledger.views.projector
    ledger.views.catch_up()
    with pytest.raises(StalePosition), ledger.views.store.transaction() as tx:
        projector._expect(tx, 0)  # a crashed projector's page read before the last commit


def test_read_your_writes(ledger_url: str, clock: ManualClock) -> None:
    with Ledger(ledger_url, clock=clock, sync_views=True) as ledger:
        user = uuid4()
        receipt = ledger.grant(user, 10, "bonus", key=f"{user}:g")
        assert receipt.position is not None
        ledger.views.wait(receipt.position, timeout_s=1)
        (row,) = [r for r in rows(ledger, "credit_balances", "user_id") if str(r["user_id"]) == str(user)]
        assert row["balance"] == 10


def test_a_replayed_receipts_position_is_waited_for_at_once(ledger_url: str, clock: ManualClock) -> None:
    # A replayed receipt has no position; read-your-writes code passes the
    # receipt's position as it is, and wait() returns at once for None.
    with Ledger(ledger_url, clock=clock) as ledger:
        user = uuid4()
        ledger.grant(user, 10, "bonus", key=f"{user}:g")
        again = ledger.grant(user, 10, "bonus", key=f"{user}:g")
        assert again.replayed and again.position is None
        ledger.views.wait(again.position, timeout_s=0.01)


def test_waiting_for_a_receipts_position_type_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The annotation says what the previous test shows, so that the call
    # type-checks under --strict without a None check of the caller's own.
    mypy_api = pytest.importorskip("mypy.api")
    example = tmp_path / "read_your_writes.py"
    example.write_text(
        "from ledger import Ledger, Receipt\n\n\n"
        "def answer(ledger: Ledger, receipt: Receipt) -> None:\n"
        "    ledger.views.wait(receipt.position, timeout_s=5)\n"
    )
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    out, err, status = mypy_api.run(["--strict", "--cache-dir", str(tmp_path / "cache"), str(example)])
    assert status == 0, out + err


def test_rebuild_equals_live_and_verify_finds_edits(ledger: Ledger, clock: ManualClock) -> None:
    story(ledger, clock)
    views = ledger.views
    views.catch_up()
    aside = views.build_aside(until=views.position())
    try:
        assert views.checksums(aside) == views.checksums()
        assert all(not found for found in views.verify(aside).values())
        with views.store.transaction() as tx:  # tamper with a live row
            tx.execute("UPDATE credit_transactions SET amount = amount + 1 WHERE type = 'bonus'")
        found = views.verify(aside)
        assert [sign for sign, _ in found["credit_transactions"]] == ["-", "+"]
        views.swap_in(aside)
        assert views.checksums() == views.checksums(aside)
        assert all(not f for f in views.verify(aside).values())
    finally:
        ledger.views.drop_aside(aside)
    assert views.catch_up() == 0  # the swapped-in position is where the rebuild stopped


@pytest.mark.parametrize("value", ["x", 2.5, b"\x05"])
def test_a_tracking_position_that_is_not_a_whole_number_is_reported_as_corrupt(tmp_path: Path, value: object) -> None:
    """SQLite keeps what is written into the tracking table's INTEGER column
    as it is (text, a fraction, bytes): only a write outside the ledger puts it
    there. The position is refused with the table and the value, not taken
    for a number (a TypeError); a rebuild
    replaces it."""
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    with Ledger(url) as ledger:
        ledger.grant(uuid4(), 10, "bonus", key="g")
        views = ledger.views
        views.catch_up()
        head = views.position()
        with views.store.transaction() as tx:
            tx.execute("UPDATE tracking SET notification_id = %s WHERE application_name = 'ledger'", [value])
        for read in (views.position, views.catch_up, views.lag, lambda: views.wait(head + 1, timeout_s=0.1)):
            with pytest.raises(ViewsCorrupt) as raised:
                read()
            assert (raised.value.table, raised.value.value, raised.value.code) == ("tracking", value, "views_corrupt")
            assert f"tracking holds {value!r}" in str(raised.value) and "rebuild" in str(raised.value)
    with Ledger(url, sync_views=True) as ledger:  # a command is recorded, and says the views cannot follow
        with pytest.raises(ViewsBehind) as behind:
            ledger.grant(uuid4(), 10, "bonus", key="g2")
        assert isinstance(behind.value.cause, ViewsCorrupt) and behind.value.receipt.amount_credits == 10  # type: ignore[attr-defined]
        views = ledger.views
        views.swap_in(aside := views.build_aside())
        views.drop_aside(aside)
        assert head < views.position() == views.projector.head() and views.catch_up() == 0


def test_users_credits_follow_when_the_host_opts_in(ledger_url: str, clock: ManualClock) -> None:
    with Ledger(ledger_url, clock=clock, sync_user_credits=True) as ledger:
        with ledger.views.store.transaction() as tx:
            tx.execute("CREATE TABLE IF NOT EXISTS users (id UUID PRIMARY KEY, credits INT NOT NULL DEFAULT 0)")
            user = uuid4()
            tx.execute("INSERT INTO users (id) VALUES (%s)", [user])
        ledger.grant(user, 42, "bonus", key=f"{user}:g")
        ledger.spend(user, 2, key=f"{user}:s")
        ledger.views.catch_up()
        with ledger.views.store.transaction() as tx:
            assert tx.fetchall("SELECT credits FROM users WHERE id = %s", [user]) == [(40,)]


@pytest.mark.postgres
def test_the_swap_respects_host_foreign_keys(pg_url: str, clock: ManualClock) -> None:
    from ledger import ConfigurationError

    with Ledger(pg_url, clock=clock, sync_views=True) as ledger:
        user = uuid4()
        ledger.grant(user, 100, "bonus", key=f"{user}:g")
        hold = ledger.reserve(user, uuid4(), 10, clock.now() + HOUR, key=f"{user}:r")
        views = ledger.views
        with views.store.transaction() as tx:  # the host's generation_jobs, reduced
            tx.execute(
                "CREATE TABLE generation_jobs (id UUID PRIMARY KEY, "
                "reservation_id UUID REFERENCES credit_reservations(id) ON DELETE CASCADE)"
            )
            tx.execute("INSERT INTO generation_jobs VALUES (%s, %s)", [uuid4(), hold.reservation_id])
        aside = views.build_aside(until=views.position())
        try:
            with pytest.raises(ConfigurationError, match="DEFERRABLE"):
                views.swap_in(aside)
            with views.store.transaction() as tx:
                tx.execute("ALTER TABLE generation_jobs DROP CONSTRAINT generation_jobs_reservation_id_fkey")
                tx.execute(
                    "ALTER TABLE generation_jobs ADD FOREIGN KEY (reservation_id) REFERENCES credit_reservations(id) "
                    "DEFERRABLE INITIALLY DEFERRED"
                )
            views.swap_in(aside)
        finally:
            ledger.views.drop_aside(aside)
        with views.store.transaction() as tx:
            assert tx.fetchall("SELECT count(*) FROM generation_jobs") == [(1,)]


def test_a_failed_catch_up_after_a_recorded_command_says_so(ledger_url: str, clock: ManualClock) -> None:
    from ledger import Receipt, ViewsBehind

    # users.credits sync is on, but the host has no users table: the projection fails.
    with Ledger(ledger_url, clock=clock, sync_views=True, sync_user_credits=True) as ledger:
        user = uuid4()
        with pytest.raises(ViewsBehind) as info:
            ledger.grant(user, 10, "bonus", key=f"{user}:g")
        assert isinstance(info.value.receipt, Receipt) and info.value.receipt.balance_credits == 10
        assert ledger.balance(user).balance_credits == 10  # the grant is recorded


def test_large_pages_equal_their_rebuild(ledger: Ledger) -> None:
    """Pages of more rows than the COPY threshold (PostgreSQL) are written the
    same way as small ones."""
    from ledger import GrantCredits, SpendCredits

    users = [uuid4() for _ in range(120)]
    ledger.execute_batch([GrantCredits(key=f"{u}:g", user_id=u, amount_credits=9, kind="bonus") for u in users])  # type: ignore[arg-type]
    ledger.execute_batch([SpendCredits(key=f"{u}:s", user_id=u, amount_credits=4) for u in users])
    views = ledger.views
    views.catch_up()
    assert len(rows(ledger, "credit_transactions", "log_position")) == 240
    aside = views.build_aside(until=views.position())
    try:
        assert all(not found for found in views.verify(aside).values())
    finally:
        ledger.views.drop_aside(aside)
