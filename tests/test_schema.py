"""The library's DDL (ledger/views/schema.py over ledger/storage/ddl.py): PostgreSQL and SQLite.

PostgreSQL tests run on the fresh schema of the ``pg_url`` fixture (dropped by
the fixture); the DDL creates the schema itself.
"""

from __future__ import annotations

import re
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import psycopg
import pytest

from ledger import Ledger
from ledger.domain.plans import plan_id_for
from ledger.errors import ConfigurationError
from ledger.views.schema import (
    ADDED_INDEX_NAMES,
    INDEX_NAMES,
    SCHEMA_VERSION,
    SEED_INDEX_NAMES,
    TABLES,
    UPDATED_AT_TABLES,
    USER_FOREIGN_KEYS,
    VIEW_TABLES,
    postgres_ddl,
    sqlite_ddl,
)

PgConn = psycopg.Connection[tuple[Any, ...]]

# The seed's catalog (section 3): name -> (monthly, yearly, credits, storage_bytes, queue_count, tier_level).
SEED_PLANS = {
    "starter": (Decimal("25.00"), Decimal("250.00"), 5000, 21474836480, 1, 1),
    "pro": (Decimal("75.00"), Decimal("750.00"), 15000, 107374182400, 1, 2),
    "studio": (Decimal("150.00"), Decimal("1500.00"), 30000, 214748364800, 3, 3),
    "enterprise": (Decimal("0.00"), Decimal("0.00"), 0, 0, 0, 4),
}
# Section 4: (plan, feature_key) -> enabled.
SEED_FEATURES = {
    ("starter", "sd_models"): True,
    ("starter", "flux_model"): False,
    ("starter", "nano_banana_api"): False,
    ("starter", "lora_training"): False,
    ("pro", "sd_models"): True,
    ("pro", "flux_model"): True,
    ("pro", "nano_banana_api"): True,
    ("pro", "lora_training"): False,
    ("studio", "sd_models"): True,
    ("studio", "flux_model"): True,
    ("studio", "nano_banana_api"): True,
    ("studio", "lora_training"): True,
}
OLD = "2000-01-01 00:00:00"


# Helpers ---------------------------------------------------------------------


def split_pg_url(url: str) -> tuple[str, str]:
    """(the URL without the ledger's ``schema`` option, the schema name)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = [v for k, v in query if k == "schema"][-1]
    rest = [(k, v) for k, v in query if k != "schema"]
    return parts._replace(query=urlencode(rest)).geturl(), schema


def run(conn: PgConn, text: str, params: tuple[Any, ...] | None = None) -> list[tuple[Any, ...]]:
    # The statements are built here from constants and the DDL module, never from input.
    with conn.cursor() as cur:
        cur.execute(text, params)
        return cur.fetchall() if cur.description else []


def apply_pg(conn: PgConn, schema: str, *, user_foreign_keys: bool = False) -> None:
    with conn.transaction():
        run(conn, postgres_ddl(schema, user_foreign_keys=user_foreign_keys))


def pg_tables(conn: PgConn, schema: str) -> set[str]:
    rows = run(conn, "SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,))
    return {r[0] for r in rows}


def pg_columns(conn: PgConn, schema: str, table: str) -> list[str]:
    rows = run(
        conn,
        "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
        "ORDER BY ordinal_position",
        (schema, table),
    )
    return [r[0] for r in rows]


def open_sqlite(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def sqlite_names(conn: sqlite3.Connection, kind: str) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = ? AND name NOT LIKE 'sqlite_%'", (kind,))
    return {r[0] for r in rows}


def sqlite_columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def naive_utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


# Rows for the CHECK tests, the same on both backends: strings for UUIDs and
# timestamps, Python bools for booleans. ``ctx`` holds a plan id and a
# subscription id.
Row = dict[str, Any]


def valid_row(table: str, ctx: dict[str, str]) -> Row:
    user = str(uuid.uuid4())
    rows: dict[str, Row] = {
        "subscriptions": {
            "user_id": user,
            "plan_id": ctx.get("plan_id"),
            "status": "active",
            "current_period_start": "2026-01-01 00:00:00",
            "current_period_end": "2026-02-01 00:00:00",
        },
        "subscription_history": {"subscription_id": ctx.get("subscription_id"), "change_type": "created"},
        "credit_transactions": {
            "user_id": user,
            "amount": 100,
            "type": "bonus",
            "balance_after": 100,
            "log_position": 1,
        },
        "credit_reservations": {
            "user_id": user,
            "job_id": str(uuid.uuid4()),
            "reserved_amount": 10,
            "expires_at": "2026-01-01 01:00:00",
        },
        "credit_balances": {"user_id": user, "balance": 100, "held": 10, "available": 90},
        "webhook_events": {
            "source": "lemon_squeezy",
            "event_type": "order_created",
            "payload": "{}",
            "payload_sha256": uuid.uuid4().hex * 2,
        },
    }
    return rows[table]


BAD_ROWS: list[tuple[str, Row]] = [
    ("subscriptions", {"status": "unpaid"}),
    ("subscriptions", {"billing_cycle": "weekly"}),
    ("subscription_history", {"change_type": "reactivated"}),
    ("credit_transactions", {"type": "gift"}),
    ("credit_reservations", {"status": "released"}),  # the table keeps the seed's word, 'refunded'
    ("credit_balances", {"available": 91}),
    ("credit_balances", {"balance": 5, "held": 10, "available": 0}),
    ("credit_balances", {"balance": -10, "held": 0, "available": 40, "credit_limit": 100}),  # 90
    ("credit_balances", {"balance": 10, "held": 0, "available": 0, "credit_limit": -10}),
    ("credit_balances", {"balance": 10, "held": -5, "available": 15}),
    ("webhook_events", {"status": "ignored"}),
]
GOOD_ROWS: list[tuple[str, Row]] = [
    ("subscriptions", {"status": "paused", "cancel_at_period_end": True}),
    ("subscriptions", {"status": "trialing", "billing_cycle": "yearly"}),
    ("subscription_history", {"change_type": "unpaused"}),
    ("credit_transactions", {"type": "purchase", "reference_label": "invoice:3420871", "idempotency_key": "k1"}),
    ("credit_transactions", {"type": "expiration", "amount": -100, "balance_after": 0}),
    ("credit_reservations", {"status": "refunded", "release_reason": "job failed"}),
    ("credit_balances", {"balance": 0, "held": 0, "available": 0}),
    # On credit (docs/credit-limits.md): below zero, down to minus the limit,
    ("credit_balances", {"balance": -60, "held": 30, "available": 10, "credit_limit": 100}),
    # and further below after the limit was lowered under what is in use.
    ("credit_balances", {"balance": -45, "held": 0, "available": -45, "credit_limit": 0}),
    ("webhook_events", {"status": "processed", "test_mode": True, "attempts": 2}),
]


def case_id(case: tuple[str, Row]) -> str:
    table, override = case
    return f"{table}:" + ",".join(f"{k}={v}" for k, v in override.items())


def insert_sql(table: str, row: Row, placeholder: str, qualifier: str = "") -> str:
    columns = ", ".join(row)
    marks = ", ".join(placeholder for _ in row)
    return f"INSERT INTO {qualifier}{table} ({columns}) VALUES ({marks})"


# Pure ------------------------------------------------------------------------


def test_constants() -> None:
    assert SCHEMA_VERSION == 4
    assert len(set(TABLES)) == len(TABLES)
    assert set(VIEW_TABLES) == {
        "credit_accounts",
        "credit_transactions",
        "credit_reservations",
        "credit_balances",
        "subscriptions",
        "subscription_history",
        "subscription_snapshots",
        "audit_logs",
    }
    assert set(VIEW_TABLES) <= set(TABLES)
    assert {"plans", "plan_features", "webhook_events", "ledger_schema_version"} <= set(TABLES)
    assert set(UPDATED_AT_TABLES) == {"plans", "subscriptions", "credit_balances"}
    assert {"idx_credit_transactions_user_created", "idx_subscriptions_active"} <= SEED_INDEX_NAMES
    assert len(SEED_INDEX_NAMES) == 20
    assert not SEED_INDEX_NAMES & ADDED_INDEX_NAMES


@pytest.mark.parametrize(
    "schema",
    ["", "Pingvas", "1abc", "a-b", "pingvas.dev", 'x"; DROP TABLE users; --', "a" * 64, "pg_ledger", " pingvas"],
)
def test_bad_schema_name_is_a_configuration_error(schema: str) -> None:
    with pytest.raises(ConfigurationError):
        postgres_ddl(schema)


def without_comments(ddl: str) -> str:
    return re.sub(r"--[^\n]*", "", ddl)


def test_every_name_is_schema_qualified() -> None:
    ddl = without_comments(postgres_ddl("pingvas_dev", user_foreign_keys=True))
    pattern = r"\b(?:TABLE(?: IF NOT EXISTS)?|INTO|REFERENCES|ON|FROM|FUNCTION|SCHEMA IF NOT EXISTS)\s+([\w\".]+)"
    names = re.findall(pattern, ddl)
    assert names
    allowed = {"CONFLICT", "DELETE", "pg_constraint", '"pingvas_dev"'}
    unqualified = {n for n in names if n not in allowed and not n.startswith('"pingvas_dev".')}
    assert not unqualified
    assert 'REFERENCES "pingvas_dev".users(id)' in ddl


def test_index_names_match_both_scripts() -> None:
    pattern = r"CREATE (?:UNIQUE )?INDEX IF NOT EXISTS (\w+)"
    assert set(re.findall(pattern, postgres_ddl("public"))) == INDEX_NAMES
    assert set(re.findall(pattern, sqlite_ddl())) == INDEX_NAMES


def test_users_foreign_keys_are_opt_in() -> None:
    assert "users" not in without_comments(postgres_ddl("pingvas_dev"))
    with_fks = postgres_ddl("pingvas_dev", user_foreign_keys=True)
    for _, name, action in USER_FOREIGN_KEYS:
        assert f"ADD CONSTRAINT {name}" in with_fks
        assert f"ON DELETE {action}" in with_fks


def test_deviations_are_commented() -> None:
    ddl = postgres_ddl("pingvas_dev")
    for n in range(1, 10):
        assert f"ledger deviation {n}" in ddl, n


def test_ddl_is_safe_for_alembic_op_execute() -> None:
    # SQLAlchemy's text() reads ":name" as a bind parameter.
    assert not re.search(r"(?<![:\w]):\w", postgres_ddl("pingvas_dev", user_foreign_keys=True))


def test_no_statement_writes_the_schema_version() -> None:
    for ddl in (postgres_ddl("pingvas_dev"), sqlite_ddl()):
        assert not re.search(r"INSERT[^;]*ledger_schema_version", ddl)


# PostgreSQL ------------------------------------------------------------------


@pytest.fixture
def pg(pg_url: str) -> Iterator[tuple[PgConn, str]]:
    base, schema = split_pg_url(pg_url)
    with psycopg.connect(base, autocommit=True) as conn:
        run(conn, "SET TIME ZONE 'UTC'")
        yield conn, schema


@pytest.fixture
def pg_applied(pg: tuple[PgConn, str]) -> tuple[PgConn, str]:
    conn, schema = pg
    apply_pg(conn, schema)
    return conn, schema


@pytest.mark.postgres
def test_postgres_ddl_applies_twice(pg: tuple[PgConn, str]) -> None:
    conn, schema = pg
    assert not pg_tables(conn, schema)
    apply_pg(conn, schema)
    apply_pg(conn, schema)
    assert pg_tables(conn, schema) == set(TABLES)
    assert run(conn, f'SELECT count(*) FROM "{schema}".ledger_schema_version') == [(0,)]


@pytest.mark.postgres
def test_postgres_has_every_seed_index(pg_applied: tuple[PgConn, str]) -> None:
    conn, schema = pg_applied
    names = {r[0] for r in run(conn, "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (schema,))}
    assert names >= SEED_INDEX_NAMES
    assert names >= ADDED_INDEX_NAMES


def index_predicate(conn: PgConn, qualified_index: str) -> str:
    rows = run(
        conn, "SELECT pg_get_expr(indpred, indrelid) FROM pg_index WHERE indexrelid = %s::regclass", (qualified_index,)
    )
    return str(rows[0][0])


@pytest.mark.postgres
def test_postgres_index_strategy(pg_applied: tuple[PgConn, str]) -> None:
    conn, schema = pg_applied
    # The seed's statement, word for word, on a copy of the table: PostgreSQL
    # must deparse both predicates the same way.
    run(conn, f'CREATE TEMP TABLE probe (LIKE "{schema}".subscriptions)')
    run(conn, "CREATE INDEX probe_active ON probe(user_id) WHERE status IN ('active', 'trialing')")
    expected = index_predicate(conn, "pg_temp.probe_active")
    assert index_predicate(conn, f'"{schema}".idx_subscriptions_active') == expected
    assert "'active'" in expected and "'trialing'" in expected
    defs = dict(run(conn, "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s", (schema,)))
    assert defs["idx_subscriptions_active"].split(" WHERE ")[0].endswith("USING btree (user_id)")
    assert defs["idx_credit_transactions_user_created"].endswith("USING btree (user_id, created_at DESC)")
    assert defs["uq_webhook_events_event_id"].startswith("CREATE UNIQUE INDEX")
    assert defs["uq_webhook_events_event_id"].endswith("(source, event_id) WHERE (event_id IS NOT NULL)")
    assert defs["uq_webhook_events_payload"].endswith("USING btree (source, payload_sha256)")
    assert defs["uq_subscriptions_lemon_squeezy"].endswith("WHERE (lemon_squeezy_subscription_id IS NOT NULL)")


def pg_plan_id(conn: PgConn, schema: str, name: str = "starter") -> str:
    return str(run(conn, f'SELECT id FROM "{schema}".plans WHERE name = %s', (name,))[0][0])


def pg_insert(conn: PgConn, schema: str, table: str, row: Row) -> None:
    run(conn, insert_sql(table, row, "%s", f'"{schema}".'), tuple(row.values()))


def pg_context(conn: PgConn, schema: str) -> dict[str, str]:
    ctx = {"plan_id": pg_plan_id(conn, schema), "subscription_id": ""}
    sub = valid_row("subscriptions", ctx) | {"id": str(uuid.uuid4())}
    pg_insert(conn, schema, "subscriptions", sub)
    return ctx | {"subscription_id": sub["id"]}


@pytest.mark.postgres
def test_postgres_updated_at_trigger(pg_applied: tuple[PgConn, str]) -> None:
    conn, schema = pg_applied
    ctx = pg_context(conn, schema)
    sub = valid_row("subscriptions", ctx) | {"id": str(uuid.uuid4()), "updated_at": OLD}
    pg_insert(conn, schema, "subscriptions", sub)
    balance = valid_row("credit_balances", ctx) | {"updated_at": OLD}
    pg_insert(conn, schema, "credit_balances", balance)
    run(conn, f'UPDATE "{schema}".plans SET updated_at = %s', (OLD,))  # the trigger overrides even this

    run(conn, f"UPDATE \"{schema}\".subscriptions SET status = 'paused' WHERE id = %s", (sub["id"],))
    run(
        conn,
        f'UPDATE "{schema}".credit_balances SET held = 0, available = 100 WHERE user_id = %s',
        (balance["user_id"],),
    )
    run(conn, f"UPDATE \"{schema}\".plans SET is_active = FALSE WHERE name = 'enterprise'")

    now = naive_utc_now()
    for table, where, value in (
        ("subscriptions", "id = %s", sub["id"]),
        ("credit_balances", "user_id = %s", balance["user_id"]),
        ("plans", "name = %s", "enterprise"),
    ):
        (updated_at,) = run(conn, f'SELECT updated_at FROM "{schema}".{table} WHERE {where}', (value,))[0]
        assert isinstance(updated_at, datetime) and updated_at.tzinfo is None
        assert abs(updated_at - now) < timedelta(minutes=1), table
    triggers = run(
        conn,
        "SELECT DISTINCT event_object_table FROM information_schema.triggers WHERE trigger_schema = %s",
        (schema,),
    )
    assert {r[0] for r in triggers} == set(UPDATED_AT_TABLES)


@pytest.mark.postgres
def test_postgres_views_write_utc_whatever_the_sessions_time_zone(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A role or server in another zone: libpq's PGTZ sets the session's TimeZone.
    # The trigger's NOW() must still give UTC, as every other time in the tables.
    monkeypatch.setenv("PGTZ", "Asia/Seoul")
    user = uuid.uuid4()
    with Ledger(pg_url, sync_views=True) as ledger:
        ledger.install_default_catalog()
        ledger.grant(user, 10, "bonus", key="first")
        ledger.grant(user, 10, "bonus", key="second")  # an UPDATE: the trigger sets updated_at
        ledger.start_subscription(user, "pro", key="start")
        subscription = ledger.subscription_of(user)
        assert subscription is not None
        ledger.change_plan(subscription.subscription_id, "studio", key="up")
    base, schema = split_pg_url(pg_url)
    now = naive_utc_now()
    with psycopg.connect(base) as conn:
        for table in ("credit_balances", "subscriptions"):
            (updated_at,) = run(conn, f'SELECT updated_at FROM "{schema}".{table}')[0]
            assert abs(updated_at - now) < timedelta(minutes=1), (table, updated_at, now)
        # The catalog rows the migration inserted, by DEFAULT NOW().
        (created_at,) = run(conn, f"SELECT created_at FROM \"{schema}\".plans WHERE name = 'enterprise'")[0]
        assert abs(created_at - now) < timedelta(minutes=1), created_at


UPSERT_BALANCE = (
    "INSERT INTO {q}credit_balances (user_id, balance, held, available, updated_at) VALUES ({m}, {m}, 0, {m}, {m}) "
    "ON CONFLICT (user_id) DO UPDATE SET balance = excluded.balance, available = excluded.available, "
    "updated_at = excluded.updated_at"
)


@pytest.mark.postgres
def test_postgres_upsert_keeps_updated_at_on_insert_only(pg_applied: tuple[PgConn, str]) -> None:
    # Documented in docs/schema.md: the trigger also fires on ON CONFLICT DO UPDATE.
    conn, schema = pg_applied
    user = str(uuid.uuid4())
    statement = UPSERT_BALANCE.format(q=f'"{schema}".', m="%s")
    select = f'SELECT updated_at FROM "{schema}".credit_balances'
    run(conn, statement, (user, 1, 1, OLD))
    assert run(conn, select) == [(datetime.fromisoformat(OLD),)]
    run(conn, statement, (user, 2, 2, OLD))
    assert abs(run(conn, select)[0][0] - naive_utc_now()) < timedelta(minutes=1)


@pytest.mark.postgres
@pytest.mark.parametrize("case", BAD_ROWS, ids=case_id)
def test_postgres_checks_reject(pg_applied: tuple[PgConn, str], case: tuple[str, Row]) -> None:
    conn, schema = pg_applied
    table, override = case
    row = valid_row(table, pg_context(conn, schema)) | override
    with pytest.raises(psycopg.errors.CheckViolation):
        pg_insert(conn, schema, table, row)


@pytest.mark.postgres
def test_postgres_checks_accept(pg_applied: tuple[PgConn, str]) -> None:
    conn, schema = pg_applied
    ctx = pg_context(conn, schema)
    for table, override in GOOD_ROWS:
        pg_insert(conn, schema, table, valid_row(table, ctx) | override)


@pytest.mark.postgres
def test_postgres_webhook_deliveries_are_unique(pg_applied: tuple[PgConn, str]) -> None:
    conn, schema = pg_applied
    ctx = pg_context(conn, schema)
    first = valid_row("webhook_events", ctx) | {"event_id": "evt-1"}
    pg_insert(conn, schema, "webhook_events", first)
    with pytest.raises(psycopg.errors.UniqueViolation):
        pg_insert(conn, schema, "webhook_events", valid_row("webhook_events", ctx) | {"event_id": "evt-1"})
    with pytest.raises(psycopg.errors.UniqueViolation):
        pg_insert(conn, schema, "webhook_events", first | {"event_id": None})


@pytest.mark.postgres
def test_postgres_user_foreign_keys(pg: tuple[PgConn, str]) -> None:
    conn, schema = pg
    run(conn, f'CREATE SCHEMA "{schema}"')
    run(conn, f'CREATE TABLE "{schema}".users (id UUID PRIMARY KEY DEFAULT gen_random_uuid())')
    apply_pg(conn, schema)  # without the option first: no foreign keys
    fk_query = (
        "SELECT conrelid::regclass::text, conname, confdeltype, confrelid::regclass::text FROM pg_constraint "
        "WHERE contype = 'f' AND connamespace = %s::regnamespace AND confrelid = %s::regclass"
    )
    users = f'"{schema}".users'
    assert run(conn, fk_query, (schema, users)) == []
    apply_pg(conn, schema, user_foreign_keys=True)
    apply_pg(conn, schema, user_foreign_keys=True)
    found = {(r[0].split(".")[-1], r[1], r[2]) for r in run(conn, fk_query, (schema, users))}
    actions = {"CASCADE": "c", "SET NULL": "n"}
    assert found == {(table, name, actions[action]) for table, name, action in USER_FOREIGN_KEYS}

    # The seed's ON DELETE behaviour.
    (user,) = run(conn, f'INSERT INTO "{schema}".users DEFAULT VALUES RETURNING id::text')[0]
    pg_insert(conn, schema, "credit_balances", {"user_id": user, "balance": 1, "held": 0, "available": 1})
    pg_insert(conn, schema, "audit_logs", {"user_id": user, "action": "admin_adjustment"})
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        pg_insert(conn, schema, "credit_transactions", valid_row("credit_transactions", {}))
    run(conn, f'DELETE FROM "{schema}".users')
    assert run(conn, f'SELECT count(*) FROM "{schema}".credit_balances') == [(0,)]
    assert run(conn, f'SELECT user_id FROM "{schema}".audit_logs') == [(None,)]


@pytest.mark.postgres
def test_postgres_seed_catalog(pg_applied: tuple[PgConn, str]) -> None:
    conn, schema = pg_applied
    rows = run(
        conn,
        f"SELECT name, monthly_price, yearly_price, credits, storage_bytes, queue_count, tier_level "
        f'FROM "{schema}".plans',
    )
    plans = {r[0]: tuple(r[1:]) for r in rows}
    assert plans == SEED_PLANS
    assert all(type(p[0]) is Decimal and str(p[0]).endswith(".00") for p in plans.values())
    features = run(
        conn,
        f'SELECT p.name, f.feature_key, f.enabled FROM "{schema}".plan_features f '
        f'JOIN "{schema}".plans p ON p.id = f.plan_id',
    )
    assert {(r[0], r[1]): r[2] for r in features} == SEED_FEATURES
    assert len(features) == len(SEED_FEATURES)

    # Applying again keeps what the host changed and adds nothing.
    run(conn, f"UPDATE \"{schema}\".plans SET monthly_price = 29.00 WHERE name = 'starter'")
    apply_pg(conn, schema)
    assert run(conn, f"SELECT monthly_price FROM \"{schema}\".plans WHERE name = 'starter'") == [(Decimal("29.00"),)]
    assert run(conn, f'SELECT count(*) FROM "{schema}".plans') == [(4,)]
    assert run(conn, f'SELECT count(*) FROM "{schema}".plan_features') == [(12,)]


@pytest.mark.postgres
def test_postgres_refuses_a_seed_shaped_table(pg: tuple[PgConn, str]) -> None:
    # A table created from the seed (without the ledger's columns) must not be
    # passed over silently by CREATE TABLE IF NOT EXISTS.
    conn, schema = pg
    run(conn, f'CREATE SCHEMA "{schema}"')
    run(
        conn,
        f'CREATE TABLE "{schema}".credit_transactions (id UUID PRIMARY KEY, user_id UUID NOT NULL, '
        "amount INT NOT NULL, type VARCHAR(30) NOT NULL, description VARCHAR(500), reference_id UUID, "
        "reference_type VARCHAR(50), balance_after INT NOT NULL, created_at TIMESTAMP NOT NULL DEFAULT NOW())",
    )
    with pytest.raises(psycopg.errors.UndefinedColumn, match="reference_label"):
        apply_pg(conn, schema)
    assert pg_tables(conn, schema) == {"credit_transactions"}  # the whole script rolled back


@pytest.mark.postgres
def test_postgres_and_sqlite_have_the_same_columns(pg_applied: tuple[PgConn, str], tmp_path: Path) -> None:
    conn, schema = pg_applied
    lite = open_sqlite(tmp_path / "ledger.sqlite3")
    lite.executescript(sqlite_ddl())
    for table in TABLES:
        assert sqlite_columns(lite, table) == pg_columns(conn, schema, table), table
    lite.close()


# SQLite ----------------------------------------------------------------------


@pytest.fixture
def lite(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = open_sqlite(tmp_path / "ledger.sqlite3")
    conn.executescript(sqlite_ddl())
    yield conn
    conn.close()


def lite_insert(conn: sqlite3.Connection, table: str, row: Row) -> None:
    conn.execute(insert_sql(table, row, "?"), tuple(row.values()))


def lite_context(conn: sqlite3.Connection) -> dict[str, str]:
    ctx = {"plan_id": conn.execute("SELECT id FROM plans WHERE name = 'starter'").fetchone()[0], "subscription_id": ""}
    sub = valid_row("subscriptions", ctx) | {"id": str(uuid.uuid4())}
    lite_insert(conn, "subscriptions", sub)
    return ctx | {"subscription_id": sub["id"]}


def test_sqlite_ddl_applies_twice(tmp_path: Path) -> None:
    conn = open_sqlite(tmp_path / "ledger.sqlite3")
    conn.executescript(sqlite_ddl())
    conn.executescript(sqlite_ddl())
    assert sqlite_names(conn, "table") == set(TABLES)
    assert sqlite_names(conn, "index") == INDEX_NAMES
    assert sqlite_names(conn, "trigger") == {f"trg_{t}_updated_at" for t in UPDATED_AT_TABLES}
    assert conn.execute("SELECT count(*) FROM plans").fetchone() == (4,)
    assert conn.execute("SELECT count(*) FROM plan_features").fetchone() == (12,)
    assert conn.execute("SELECT count(*) FROM ledger_schema_version").fetchone() == (0,)
    conn.close()


def test_sqlite_partial_indexes(lite: sqlite3.Connection) -> None:
    def index_sql(name: str) -> str:
        return str(lite.execute("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0])

    assert " ".join(index_sql("idx_subscriptions_active").split()).endswith(
        "ON subscriptions(user_id) WHERE status IN ('active', 'trialing')"
    )
    assert index_sql("idx_credit_transactions_user_created").endswith("(user_id, created_at DESC)")
    assert lite.execute("PRAGMA index_info(idx_credit_transactions_user_created)").fetchall()[1][2] == "created_at"


@pytest.mark.parametrize("recursive_triggers", [False, True])
def test_sqlite_updated_at_trigger(lite: sqlite3.Connection, recursive_triggers: bool) -> None:
    lite.execute(f"PRAGMA recursive_triggers = {'ON' if recursive_triggers else 'OFF'}")
    ctx = lite_context(lite)
    sub = valid_row("subscriptions", ctx) | {"id": str(uuid.uuid4()), "updated_at": OLD}
    lite_insert(lite, "subscriptions", sub)
    balance = valid_row("credit_balances", ctx) | {"updated_at": OLD}
    lite_insert(lite, "credit_balances", balance)
    lite.execute("UPDATE plans SET updated_at = ?", (OLD,))
    assert lite.execute("SELECT DISTINCT updated_at FROM plans").fetchall() == [(OLD,)]

    lite.execute("UPDATE subscriptions SET status = 'paused' WHERE id = ?", (sub["id"],))
    # As in PostgreSQL, an explicit updated_at next to another column is overridden.
    lite.execute(
        "UPDATE credit_balances SET held = 0, available = 100, updated_at = ? WHERE user_id = ?",
        (OLD, balance["user_id"]),
    )
    lite.execute("UPDATE plans SET is_active = 0 WHERE name = 'enterprise'")

    now = naive_utc_now()
    for table, where, value in (
        ("subscriptions", "id = ?", sub["id"]),
        ("credit_balances", "user_id = ?", balance["user_id"]),
        ("plans", "name = ?", "enterprise"),
    ):
        (text,) = lite.execute(f"SELECT updated_at FROM {table} WHERE {where}", (value,)).fetchone()
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}", text), text
        assert abs(datetime.fromisoformat(text) - now) < timedelta(minutes=1), table
    # Rows not updated keep their value.
    assert lite.execute("SELECT updated_at FROM plans WHERE name = 'starter'").fetchone() == (OLD,)


def test_sqlite_upsert_keeps_updated_at_on_insert_only(lite: sqlite3.Connection) -> None:
    statement = UPSERT_BALANCE.format(q="", m="?")
    lite.execute(statement, ("u", 1, 1, OLD))
    assert lite.execute("SELECT updated_at FROM credit_balances").fetchall() == [(OLD,)]
    lite.execute(statement, ("u", 2, 2, OLD))
    (text,) = lite.execute("SELECT updated_at FROM credit_balances").fetchone()
    assert abs(datetime.fromisoformat(text) - naive_utc_now()) < timedelta(minutes=1)


def test_sqlite_trigger_watches_every_other_column(lite: sqlite3.Connection) -> None:
    for table in UPDATED_AT_TABLES:
        sql_text = lite.execute("SELECT sql FROM sqlite_master WHERE name = ?", (f"trg_{table}_updated_at",)).fetchone()
        match = re.search(r"AFTER UPDATE OF (.*?) ON ", sql_text[0])
        assert match is not None
        watched = [c.strip() for c in match.group(1).split(",")]
        assert watched == [c for c in sqlite_columns(lite, table) if c != "updated_at"]


@pytest.mark.parametrize("case", BAD_ROWS, ids=case_id)
def test_sqlite_checks_reject(lite: sqlite3.Connection, case: tuple[str, Row]) -> None:
    table, override = case
    row = valid_row(table, lite_context(lite)) | override
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
        lite_insert(lite, table, row)


def test_sqlite_checks_accept(lite: sqlite3.Connection) -> None:
    ctx = lite_context(lite)
    for table, override in GOOD_ROWS:
        lite_insert(lite, table, valid_row(table, ctx) | override)


def test_sqlite_seed_catalog(lite: sqlite3.Connection) -> None:
    rows = lite.execute(
        "SELECT id, name, monthly_price, yearly_price, credits, storage_bytes, queue_count, tier_level FROM plans"
    ).fetchall()
    assert {r[1]: (Decimal(r[2]), Decimal(r[3]), *r[4:]) for r in rows} == SEED_PLANS
    assert {r[1]: r[2] for r in rows} == {"starter": "25.00", "pro": "75.00", "studio": "150.00", "enterprise": "0.00"}
    # The seeded ids are the ledger's own plan ids, so seeded and projected rows agree.
    assert {r[1]: r[0] for r in rows} == {name: str(plan_id_for(name)) for name in SEED_PLANS}
    features = lite.execute(
        "SELECT p.name, f.feature_key, f.enabled FROM plan_features f JOIN plans p ON p.id = f.plan_id"
    ).fetchall()
    assert {(r[0], r[1]): bool(r[2]) for r in features} == SEED_FEATURES
    assert len(features) == len(SEED_FEATURES)


def test_sqlite_defaults(lite: sqlite3.Connection) -> None:
    lite_insert(lite, "credit_transactions", valid_row("credit_transactions", {}))
    (row_id, created_at) = lite.execute("SELECT id, created_at FROM credit_transactions").fetchone()
    assert uuid.UUID(row_id).version == 4
    assert abs(datetime.fromisoformat(created_at) - naive_utc_now()) < timedelta(minutes=1)


def test_sqlite_refuses_a_seed_shaped_table(tmp_path: Path) -> None:
    conn = open_sqlite(tmp_path / "ledger.sqlite3")
    conn.execute("CREATE TABLE credit_reservations (id TEXT PRIMARY KEY, user_id TEXT, job_id TEXT)")
    with pytest.raises(sqlite3.OperationalError, match="no such column"):
        conn.executescript(sqlite_ddl())
    conn.close()
