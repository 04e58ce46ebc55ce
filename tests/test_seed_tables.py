"""A host that created the billing tables from the seed's own DDL before
adopting the library (tests/fixtures/seed_billing.sql, ``users`` included):
migrate after the columns docs/schema.md names are added, then the projector
writes those tables, within the seed's constraints, and the seed's queries
read the right answers. PostgreSQL only: the seed is PostgreSQL's.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit
from uuid import UUID, uuid4

import psycopg
import pytest

from ledger import DEFAULT_CATALOG, ConfigurationError, Ledger, ManualClock, PlanTerms, ViewsBehind
from tests.lemonsqueezy_support import USER
from tests.test_lemonsqueezy_story import baseline

ROOT = Path(__file__).resolve().parent.parent
SEED_DDL = (ROOT / "tests" / "fixtures" / "seed_billing.sql").read_text()
SEED_JOBS_DDL = (ROOT / "tests" / "fixtures" / "seed_jobs.sql").read_text()
START = datetime(2026, 1, 1, tzinfo=UTC)

pytestmark = pytest.mark.postgres
DEFAULT_PRO = next(t for t in DEFAULT_CATALOG if t.name == "pro")


def _hand_migration() -> str:
    """The ALTER TABLE statements of docs/schema.md, "A table the host created from the seed"."""
    section = (ROOT / "docs" / "schema.md").read_text().split("### A table the host created from the seed", 1)[1]
    found = re.search(r"```sql\n(.*?)```", section, re.S)
    assert found is not None
    return found.group(1)


PgConn = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture
def seed_host(pg_url: str) -> Iterator[tuple[str, PgConn]]:
    """(the ledger's URL, a connection to its schema) on the seed's tables, widened by hand."""
    parts = urlsplit(pg_url)
    query = parse_qsl(parts.query)
    schema = dict(query)["schema"]
    base = parts._replace(query=urlencode([(k, v) for k, v in query if k != "schema"])).geturl()
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'SET search_path TO "{schema}"')
        conn.execute("SET TIME ZONE 'UTC'")
        conn.execute(SEED_DDL.encode())
        conn.execute(_hand_migration().encode())
        yield pg_url, conn


def _user(conn: PgConn) -> UUID:
    user = uuid4()
    conn.execute("INSERT INTO users (id, email, name) VALUES (%s, %s, 'A')", (user, f"{user}@example.com"))
    return user


def test_the_projector_writes_the_seed_tables_after_the_documented_migration(
    seed_host: tuple[str, PgConn],
) -> None:
    url, conn = seed_host
    user = _user(conn)
    clock = ManualClock(START)
    with Ledger(url) as ledger:
        ledger.views.migrate()
    with Ledger(url, clock=clock, sync_views=True) as ledger:
        ledger.install_default_catalog()
        ledger.start_subscription(user, "pro", key="sub")
        subscription = ledger.subscription_of(user)
        assert subscription is not None
        # The seed's chk_status has no 'paused': the projector would stall here.
        ledger.pause_subscription(subscription.subscription_id, key="pause")
        ledger.unpause_subscription(subscription.subscription_id, key="unpause")
        ledger.grant(user, 500, "bonus", key="bonus", expires_in=timedelta(days=1))
        ledger.grant(user, 1000, "purchase", key="buy", reference_id="invoice:3420871", reference_type="order")
        hold = ledger.reserve(user, uuid4(), 300, expires_in=timedelta(hours=1), key="r1")
        ledger.settle(hold.reservation_id, 240, key="s1")
        hold = ledger.reserve(user, uuid4(), 100, expires_in=timedelta(hours=1), key="r2")
        ledger.release(hold.reservation_id, "job failed", key="x2")
        ledger.reserve(user, uuid4(), 30, expires_in=timedelta(minutes=5), key="r-lapses")
        ledger.spend(user, 10, key="api")
        ledger.adjust(user, -20, "correction", "admin@example.com", key="adj")
        clock.advance(timedelta(days=2))
        ledger.tick()
        open_hold = ledger.reserve(user, uuid4(), 70, expires_in=timedelta(hours=1), key="r3")
        balance = ledger.balance(user)
        assert ledger.views.lag() == 0

    # The seed's plans rows kept their own ids; subscriptions point at them.
    plan_ids: dict[str, UUID] = dict(conn.execute("SELECT name, id FROM plans").fetchall())
    assert conn.execute("SELECT plan_id, status FROM subscriptions").fetchall() == [(plan_ids["pro"], "active")]
    changes = [r[0] for r in conn.execute("SELECT change_type FROM subscription_history ORDER BY changed_at, id")]
    assert sorted(changes) == ["created", "paused", "unpaused"]
    # The seed's queries: the latest balance_after is the sum of the amounts
    # and the balance; the open reservations hold what the ledger holds.
    rows = conn.execute(
        "SELECT amount, type, balance_after FROM credit_transactions WHERE user_id = %s ORDER BY log_position",
        (user,),
    ).fetchall()
    running = 0
    for amount, kind, balance_after in rows:
        running += amount
        assert balance_after == running
        assert (amount > 0) == (kind in {"subscription_grant", "bonus", "purchase"}), (amount, kind)
    latest = conn.execute(
        "SELECT balance_after FROM credit_transactions WHERE user_id = %s ORDER BY created_at DESC, log_position DESC "
        "LIMIT 1",
        (user,),
    ).fetchone()
    assert latest == (running,) == (balance.balance_credits,)
    assert [r[1] for r in rows].count("expiration") == 1
    held = conn.execute(
        "SELECT id, reserved_amount FROM credit_reservations WHERE user_id = %s AND status = 'reserved'", (user,)
    ).fetchall()
    assert held == [(open_hold.reservation_id, 70)] and balance.held_credits == 70
    closed = conn.execute("SELECT reserved_amount, status, settled_amount, release_reason FROM credit_reservations")
    assert sorted(closed.fetchall()) == [
        (30, "refunded", None, "expired"),
        (70, "reserved", None, None),
        (100, "refunded", None, "job failed"),
        (300, "settled", 240, None),
    ]


def test_a_user_without_a_users_row_stalls_the_projector_until_the_row_exists(
    seed_host: tuple[str, PgConn],
) -> None:
    url, conn = seed_host
    known = _user(conn)
    stranger = uuid4()
    with Ledger(url) as ledger:
        ledger.views.migrate()
    with Ledger(url, sync_views=True) as ledger:
        ledger.grant(known, 100, "bonus", key="known")
        with pytest.raises(ViewsBehind, match="credit_transactions_user_id_fkey"):
            ledger.grant(stranger, 50, "bonus", key="stranger")
        assert ledger.balance(stranger).balance_credits == 50  # recorded all the same
        with pytest.raises(ViewsBehind):
            ledger.grant(known, 1, "bonus", key="known-2")  # everyone's views wait
        conn.execute("INSERT INTO users (id, email, name) VALUES (%s, 'b@example.com', 'B')", (stranger,))
        ledger.views.catch_up()
        assert ledger.views.lag() == 0
    rows = conn.execute(
        "SELECT user_id, amount, balance_after FROM credit_transactions ORDER BY log_position"
    ).fetchall()
    assert rows == [(known, 100, 100), (stranger, 50, 50), (known, 1, 101)]


def test_a_plan_the_seed_tier_check_refuses_stalls_the_tier_sync_until_it_is_widened(
    seed_host: tuple[str, PgConn],
) -> None:
    url, conn = seed_host
    user = _user(conn)
    with Ledger(url) as ledger:
        ledger.views.migrate()
    with Ledger(url, sync_views=True, sync_user_tier=True) as ledger:
        ledger.install_default_catalog()
        ledger.define_plan(PlanTerms("team", "Team", Decimal("50.00"), Decimal("500.00"), 10_000, 10**11, 2, 2))
        with pytest.raises(ViewsBehind, match="chk_tier"):
            ledger.start_subscription(user, "team", key="team")
        conn.execute("ALTER TABLE users DROP CONSTRAINT chk_tier")
        conn.execute(
            "ALTER TABLE users ADD CONSTRAINT chk_tier "
            "CHECK (tier IN ('free', 'starter', 'pro', 'studio', 'enterprise', 'team'))"
        )
        ledger.views.catch_up()
        assert ledger.views.lag() == 0
    assert conn.execute("SELECT tier, storage_quota FROM users").fetchall() == [("team", 10**11)]


def test_a_rebuild_keeps_the_plan_ids_of_the_seed_catalog(seed_host: tuple[str, PgConn]) -> None:
    # The seed's INSERT gave its plans random ids; the live rows point at them,
    # and so must the rebuilt ones, or the swap breaks subscriptions_plan_id_fkey.
    url, conn = seed_host
    user = _user(conn)
    with Ledger(url) as ledger:
        ledger.views.migrate()
    with Ledger(url, sync_views=True) as ledger:
        ledger.install_default_catalog()
        ledger.start_subscription(user, "pro", key="sub")
        subscription = ledger.subscription_of(user)
        assert subscription is not None
        ledger.change_plan(subscription.subscription_id, "studio", key="up", actor="admin@example.com")
        ledger.define_plan(replace(DEFAULT_PRO, credits=16_000), actor="admin@example.com")
        views = ledger.views
        before = views.checksums()
        aside = views.build_aside()
        try:
            assert {t: d for t, d in views.verify(aside).items() if d} == {}
            views.swap_in(aside)
        finally:
            views.drop_aside(aside)
        assert views.checksums() == before
    plan_ids: dict[str, UUID] = dict(conn.execute("SELECT name, id FROM plans").fetchall())
    assert conn.execute("SELECT plan_id FROM subscriptions").fetchall() == [(plan_ids["studio"],)]
    # An auditor finds the plan an audit row names in plans.
    audited = conn.execute("SELECT entity_id FROM audit_logs WHERE entity_type = 'plan'").fetchall()
    assert audited == [(plan_ids["pro"],)]


def test_the_lemon_squeezy_story_on_the_seed_tables(seed_host: tuple[str, PgConn]) -> None:
    # Checkout to expiry through the webhook inbox (the seed's webhook_events),
    # pause included; the story's own checks end with a rebuild equal to the views.
    url, conn = seed_host
    conn.execute("INSERT INTO users (id, email, name) VALUES (%s, 'story@example.com', 'S')", (USER,))
    with Ledger(url) as ledger:
        ledger.views.migrate()
    state = baseline(url)
    assert state["balance"] == (5000, 0, 5000)
    assert "paused" in [change for _, change, *_ in state["history_changes"]]
    assert conn.execute("SELECT DISTINCT status FROM webhook_events").fetchall() == [("processed",)]


def test_the_seeds_generation_jobs_key_into_credit_reservations_must_be_deferred_for_a_rebuild(
    seed_host: tuple[str, PgConn],
) -> None:
    url, conn = seed_host
    conn.execute(SEED_JOBS_DDL.encode())
    user = _user(conn)
    job = uuid4()
    with Ledger(url) as ledger:
        ledger.views.migrate()
    with Ledger(url, sync_views=True) as ledger:
        ledger.grant(user, 1000, "bonus", key="fund")
        hold = ledger.reserve(user, job, 100, expires_in=timedelta(hours=1), key="hold")
        assert hold.position is not None
        ledger.views.wait(hold.position)  # the hold's row is there: the job may name it
        conn.execute(
            "INSERT INTO generation_jobs (id, user_id, queue_name, job_type, params, estimated_credits, "
            "reservation_id) VALUES (%s, %s, 'queue:pro', 'text_to_image', '{}', 100, %s)",
            (job, user, hold.reservation_id),
        )
        views = ledger.views
        aside = views.build_aside()
        try:
            with pytest.raises(ConfigurationError, match="generation_jobs_reservation_id_fkey"):
                views.swap_in(aside)
            conn.execute(
                "ALTER TABLE generation_jobs ALTER CONSTRAINT generation_jobs_reservation_id_fkey "
                "DEFERRABLE INITIALLY DEFERRED"
            )
            views.swap_in(aside)
        finally:
            views.drop_aside(aside)
    assert conn.execute("SELECT reservation_id FROM generation_jobs").fetchall() == [(hold.reservation_id,)]
