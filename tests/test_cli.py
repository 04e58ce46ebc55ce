"""The operator commands: schema, migrate, rebuild (with --verify), project."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit
from uuid import uuid4

import psycopg
import pytest

from ledger import Ledger
from ledger.views.schema import SCHEMA_VERSION, SEED_INDEX_NAMES
from tests.conftest import pg_base_url


def ledger_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "ledger", *args], capture_output=True, text=True, timeout=300, check=False
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def _schema_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["schema"][0]


@pytest.mark.postgres
def test_printed_schema_creates_every_seed_index_in_an_empty_schema(pg_url: str) -> None:
    schema = _schema_of(pg_url)
    ddl = ledger_cli("schema", "--schema", schema).stdout
    with psycopg.connect(pg_base_url(), autocommit=True) as conn:
        conn.execute(ddl)
        conn.execute(ddl)  # a migration may run twice
        names = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = %s", [schema])}
    assert names >= SEED_INDEX_NAMES
    assert {"idx_credit_transactions_user_created", "idx_subscriptions_active"} <= names


def test_sqlite_schema_is_printed() -> None:
    assert "CREATE TABLE IF NOT EXISTS credit_transactions" in ledger_cli("schema", "--dialect", "sqlite").stdout


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    url: str = request.getfixturevalue("pg_url")
    return url


def test_migrate_is_idempotent_and_records_the_version(durable_url: str) -> None:
    assert f"schema version {SCHEMA_VERSION}" in ledger_cli("migrate", "--url", durable_url).stdout
    assert f"schema version {SCHEMA_VERSION}" in ledger_cli("migrate", "--url", durable_url).stdout
    with Ledger(durable_url) as ledger, ledger.views.store.transaction() as tx:
        assert tx.fetchall("SELECT version FROM ledger_schema_version") == [(SCHEMA_VERSION,)]


def test_migrate_with_user_foreign_keys_names_a_missing_users_table(durable_url: str) -> None:
    # The flag needs the host's users table beside the read models (and is
    # PostgreSQL only, as for `schema`): a clear error, exit 2, not a traceback
    # or a flag silently ignored.
    result = ledger_cli("migrate", "--url", durable_url, "--user-foreign-keys", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ConfigurationError: user_foreign_keys"), result.stderr
    expected = "PostgreSQL only" if durable_url.startswith("sqlite") else ".users does not exist"
    assert expected in result.stderr, result.stderr


@pytest.mark.postgres
def test_migrate_with_user_foreign_keys_adds_them_once_the_users_table_exists(pg_url: str) -> None:
    schema = _schema_of(pg_url)
    with psycopg.connect(pg_base_url(), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        conn.execute(f'CREATE TABLE "{schema}".users (id UUID PRIMARY KEY)')
    assert f"schema version {SCHEMA_VERSION}" in ledger_cli("migrate", "--url", pg_url, "--user-foreign-keys").stdout
    with psycopg.connect(pg_base_url()) as conn:
        names = {
            r[0]
            for r in conn.execute(
                "SELECT conname FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
                "WHERE n.nspname = %s AND c.contype = 'f'",
                [schema],
            )
        }
    assert "fk_credit_transactions_user" in names


def test_rebuild_prints_checksums_and_verify_finds_an_edited_row(durable_url: str) -> None:
    user = uuid4()
    with Ledger(durable_url, sync_views=True) as ledger:
        ledger.grant(user, 100, "bonus", key=f"{user}:g")
        ledger.spend(user, 30, key=f"{user}:s")
    out = ledger_cli("rebuild", "--url", durable_url).stdout
    assert "credit_transactions" in out and "2 rows" in out and "sha256" in out and "swapped in" in out
    assert "live tables equal the rebuild" in ledger_cli("rebuild", "--verify", "--url", durable_url).stdout
    with Ledger(durable_url) as ledger, ledger.views.store.transaction() as tx:
        tx.execute("UPDATE credit_transactions SET balance_after = 999 WHERE amount = -30")
    result = ledger_cli("rebuild", "--verify", "--url", durable_url, check=False)
    assert result.returncode == 1
    assert "- credit_transactions" in result.stdout and "+ credit_transactions" in result.stdout
    assert "999" in result.stdout
    ledger_cli("rebuild", "--url", durable_url)  # the swap repairs it
    assert ledger_cli("rebuild", "--verify", "--url", durable_url).returncode == 0


def test_verify_lists_the_rows_of_views_whose_position_was_set_back(durable_url: str) -> None:
    users = [uuid4() for _ in range(3)]
    with Ledger(durable_url, sync_views=True) as ledger:
        for user in users:
            ledger.grant(user, 100, "bonus", key=f"{user}:g")
        first_grant_at = ledger.views.position()
        ledger.spend(users[0], 30, key=f"{users[0]}:s")
        with ledger.views.store.transaction() as tx:
            [(position,)] = tx.fetchall("SELECT log_position FROM credit_transactions WHERE amount = -30")
            tracking = "ledger_views_tracking" if ledger.config.backend == "postgresql" else "tracking"
            tx.execute(f"UPDATE {tracking} SET notification_id = %s", [first_grant_at])
    result = ledger_cli("rebuild", "--verify", "--url", durable_url, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # The row the views hold past their position, as it is live and missing from the rebuild.
    (spend,) = [line for line in result.stdout.splitlines() if line.startswith("- credit_transactions")]
    assert '"api_use"' in spend and spend.endswith(f", {position}]")
    # Stopped at the event the set-back position makes it project again
    # (ViewsStalled), naming the database's refusal.
    (stuck,) = [line for line in result.stdout.splitlines() if "cannot move past" in line]
    assert f"cannot move past position {first_grant_at}: " in stuck
    assert "IntegrityError" in stuck or "UniqueViolation" in stuck
    assert "differing rows" in result.stdout


def test_verify_fails_on_views_whose_position_is_past_the_head(durable_url: str) -> None:
    """Rows equal to the rebuild's passed, though the projector then skipped
    every event recorded up to the views' position."""
    user = uuid4()
    with Ledger(durable_url, sync_views=True) as ledger:
        ledger.grant(user, 100, "bonus", key=f"{user}:g")
        head = ledger.views.position()
        with ledger.views.store.transaction() as tx:
            tracking = "ledger_views_tracking" if ledger.config.backend == "postgresql" else "tracking"
            tx.execute(f"UPDATE {tracking} SET notification_id = %s", [head + 50])
    result = ledger_cli("rebuild", "--verify", "--url", durable_url, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "live tables equal the rebuild" in result.stdout
    assert f"the live views are at position {head + 50}, past the log's head {head}" in result.stdout
    ledger_cli("rebuild", "--url", durable_url)  # the swap sets the position back to the head
    assert ledger_cli("rebuild", "--verify", "--url", durable_url).returncode == 0
