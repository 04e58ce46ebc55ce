"""Opening a store as configured: ``create=False`` creates nothing, the URL
passes libpq's connection options through (a list of them), ``repr`` hides
secrets, and a lock timeout on the events table is raised at once."""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit
from uuid import uuid4

import psycopg
import pytest
from eventsourcing.persistence import OperationalError

from ledger import ConfigurationError, Ledger
from ledger.storage.config import LIBPQ_OPTIONS, parse_url, redact
from tests.conftest import pg_base_url


def _schema_exists(schema: str) -> bool:
    with psycopg.connect(pg_base_url(), autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", [schema]).fetchone() is not None


def _schema_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["schema"][0]


# ------------------------------------------------------------ create=False


def test_create_false_refuses_a_missing_sqlite_store_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "typo" / "ledger.sqlite3"
    with pytest.raises(ConfigurationError, match="does not exist"):
        Ledger(f"sqlite:///{path}", create=False)
    assert not path.parent.exists()
    with pytest.raises(ConfigurationError, match="is a directory"):
        Ledger(f"sqlite:///{tmp_path}", create=False)
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(ConfigurationError, match="not a ledger store"):
        Ledger(f"sqlite:///{other}", create=False)
    text = tmp_path / "notes.txt"
    text.write_text("not a database, but long enough to look like one " * 20)
    with pytest.raises(ConfigurationError, match="not a ledger store"):
        Ledger(f"sqlite:///{text}", create=False)
    Ledger(f"sqlite:///{path}").close()  # create=True (the default) creates it
    with Ledger(f"sqlite:///{path}", create=False) as ledger:
        assert ledger.app.recorder.max_notification_id() in (None, 0)


def test_a_sqlite_folder_that_cannot_be_made_is_a_configuration_error(tmp_path: Path) -> None:
    """Not the OSError of mkdir, which the commands showed as a traceback."""
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigurationError, match=r"cannot create the folder .*a-file"):
        Ledger(f"sqlite:///{tmp_path / 'a-file' / 'ledger.sqlite3'}")
    # A store that cannot be opened is named by its URL, not only "sqlite".
    with pytest.raises(ConfigurationError, match=re.escape(f"cannot open ledger store sqlite:///{tmp_path}: ")):
        Ledger(f"sqlite:///{tmp_path}")


@pytest.mark.postgres
def test_create_false_refuses_a_missing_postgres_schema_and_creates_nothing(pg_url: str) -> None:
    schema = _schema_of(pg_url)
    with pytest.raises(ConfigurationError, match=f"no table {schema}.ledger_events"):
        Ledger(pg_url, create=False)
    assert not _schema_exists(schema)
    Ledger(pg_url).close()
    with Ledger(pg_url, create=False) as ledger:
        assert ledger.app.recorder.max_notification_id() in (None, 0)


def test_create_false_opens_memory_and_checks_its_type() -> None:
    Ledger("memory://", create=False).close()
    with pytest.raises(ValueError, match="create must be a bool"):
        Ledger("memory://", create="no")  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_table_require_store_looks_for_is_the_one_eventsourcing_creates(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'l.sqlite3'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    with Ledger(url) as ledger:
        assert ledger.app.recorder.events_table_name.split(".")[-1] == ledger.backend.events_table  # type: ignore[attr-defined]


# ------------------------------------------------------------ repr


def test_repr_shows_the_url_without_secrets(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    with Ledger(url) as ledger:
        assert repr(ledger) == f"Ledger({url!r})"
    assert redact("sqlite:////abs/path.sqlite3") == "sqlite:////abs/path.sqlite3"
    secret = "postgresql://ledger:s3cr%40t@db.internal:5432/pingvas?schema=p&sslkey=/k.key&sslpassword=k3y"
    shown = redact(secret)
    assert "s3cr" not in shown and "k3y" not in shown
    assert shown == "postgresql://ledger:***@db.internal:5432/pingvas?schema=p&sslkey=/k.key&sslpassword=***"
    assert "s3cr" not in repr(parse_url(secret)) and "k3y" not in repr(parse_url(secret))


@pytest.mark.postgres
def test_repr_of_a_postgres_ledger_hides_its_password(pg_url: str) -> None:
    # The test server trusts local connections: the password is not checked.
    url = pg_url.replace("postgresql://postgres@", "postgresql://postgres:hunter2@", 1)
    assert url != pg_url
    with Ledger(url) as ledger:
        assert "hunter2" not in repr(ledger) and ":***@" in repr(ledger)


# ------------------------------------------------------------ libpq options


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("sslmod=require", "unknown PostgreSQL URL options \\['sslmod'\\]"),
        ("options=-csearch_path%3Dother", "unknown PostgreSQL URL options \\['options'\\]"),
        ("client_encoding=latin1", "unknown"),
        ("service=prod", "unknown"),
        ("replication=database", "unknown"),
        ("sslmode=bogus", "sslmode='bogus' must be one of"),
        ("target_session_attrs=whatever", "target_session_attrs"),
        ("connect_timeout=0", "connect_timeout must be 1..600"),
        ("connect_timeout=soon", "connect_timeout must be 1..600"),
        ("keepalives_idle=-1", "keepalives_idle must be a whole number"),
    ],
)
def test_unknown_or_bad_libpq_options_are_refused(query: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_url(f"postgresql://u@db.internal/pingvas?{query}")


def test_libpq_options_reach_the_connection_string() -> None:
    config = parse_url(
        "postgresql://u@db.internal/pingvas?schema=p&sslmode=verify-full&sslrootcert=/etc/ca.pem"
        "&application_name=billing&target_session_attrs=read-write&connect_timeout=7"
    )
    conninfo = psycopg.conninfo.conninfo_to_dict(config.conninfo())
    assert conninfo["sslmode"] == "verify-full" and conninfo["sslrootcert"] == "/etc/ca.pem"
    assert (conninfo["application_name"], conninfo["target_session_attrs"]) == ("billing", "read-write")
    assert config.connect_kwargs() == {}  # the URL's connect_timeout rules
    assert parse_url("postgresql://u@db/pingvas").connect_kwargs() == {"connect_timeout": 30}
    assert {"sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout", "application_name"} <= LIBPQ_OPTIONS


@pytest.mark.postgres
def test_libpq_options_reach_every_pool_the_ledger_opens(pg_url: str) -> None:
    name = f"ledger-test-{uuid4().hex[:8]}"
    url = f"{pg_url}&application_name={name}&sslmode=prefer&keepalives_idle=30"
    with Ledger(url, sync_views=True) as ledger:
        ledger.grant(uuid4(), 1, "bonus", key="k")
        with ledger.app.recorder.datastore.get_connection() as conn:  # type: ignore[attr-defined]
            assert conn.execute("SELECT current_setting('application_name')").fetchone()["current_setting"] == name
        aside = ledger.backend.view_store_aside(ledger.app)
        try:
            with aside.datastore.get_connection() as conn:  # type: ignore[attr-defined]
                row = conn.execute("SELECT current_setting('application_name')").fetchone()
            assert row["current_setting"] == name
        finally:
            ledger.views.drop_aside(aside)


@pytest.mark.postgres
def test_sslmode_require_is_passed_to_libpq(pg_url: str) -> None:
    """The test server offers no TLS: libpq refusing to go on without it
    proves the option reached the connection."""
    with psycopg.connect(pg_base_url()) as conn:
        ssl = conn.execute("SHOW ssl").fetchone()
    if ssl is not None and ssl[0] == "on":
        pytest.skip("this server offers TLS")
    with pytest.raises(ConfigurationError, match="SSL"):
        Ledger(f"{pg_url}&sslmode=require")


@pytest.mark.postgres
def test_a_connection_limit_reached_at_open_is_named(pg_url: str) -> None:
    """The pool's timeout alone ("couldn't get a connection") hides why: the
    server refuses the role any connection past its limit, and the open's
    advisory-lock connection is the one it allows."""
    role = f"ledger_test_limit_{uuid4().hex[:8]}"
    schema = parse_qs(urlsplit(pg_url).query)["schema"][0]
    with psycopg.connect(pg_base_url(), autocommit=True) as admin:
        database = admin.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'limit-test' CONNECTION LIMIT 1")
        admin.execute(f'GRANT CREATE ON DATABASE "{database}" TO {role}')
        admin.execute(f'CREATE SCHEMA "{schema}" AUTHORIZATION {role}')
        try:
            parts = urlsplit(pg_url)
            url = parts._replace(netloc=f"{role}:limit-test@{parts.hostname}:{parts.port or 5432}").geturl()
            with pytest.raises(ConfigurationError, match=f'too many connections for role "{role}"'):
                Ledger(f"{url}&pool_timeout_s=1")
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
            admin.execute(f'REVOKE CREATE ON DATABASE "{database}" FROM {role}')
            admin.execute(f"DROP ROLE {role}")


@pytest.mark.postgres
def test_a_role_without_create_on_the_database_gets_a_configuration_error(pg_url: str) -> None:
    """CREATE SCHEMA IF NOT EXISTS checks the privilege before it looks for
    the schema, so such a role cannot open even a schema it owns: the error
    is the ledger's, naming the schema, with psycopg's as its cause."""
    role = f"ledger_test_nocreate_{uuid4().hex[:8]}"
    schema = parse_qs(urlsplit(pg_url).query)["schema"][0]
    parts = urlsplit(pg_url)
    url = parts._replace(netloc=f"{role}:nocreate-test@{parts.hostname}:{parts.port or 5432}").geturl()
    with psycopg.connect(pg_base_url(), autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'nocreate-test'")
        try:
            with pytest.raises(ConfigurationError, match=f"cannot create schema '{schema}': permission denied") as new:
                Ledger(url)
            assert isinstance(new.value.__cause__, psycopg.errors.InsufficientPrivilege)
            assert not _schema_exists(schema)
            admin.execute(f'CREATE SCHEMA "{schema}" AUTHORIZATION {role}')
            with pytest.raises(ConfigurationError, match="cannot create schema"):
                Ledger(url)  # its own schema: the privilege is checked on every open
        finally:
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            admin.execute(f"DROP ROLE {role}")


# ------------------------------------------------------------ lock timeout


@pytest.mark.postgres
@pytest.mark.slow
def test_a_lock_timeout_is_raised_at_once_not_retried(pg_url: str) -> None:
    """The events table's lock timeout is 10 s: a save that waited it out is
    raised then, not sent again nine more times (about 100 s)."""
    user = uuid4()
    with Ledger(pg_url) as ledger:
        ledger.grant(user, 10, "bonus", key="before")
        head = ledger.app.recorder.max_notification_id()
        table = f'"{_schema_of(pg_url)}"."ledger_events"'
        holder = psycopg.connect(pg_base_url())
        holder.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
        released = threading.Timer(40, holder.rollback)  # a safety net, should the test hang
        released.start()
        try:
            started = time.monotonic()
            with pytest.raises(OperationalError, match="lock timeout"):
                ledger.grant(user, 10, "bonus", key="during")
            waited = time.monotonic() - started
        finally:
            released.cancel()
            holder.rollback()
            holder.close()
        assert 9 < waited < 25, waited
        assert ledger.app.recorder.max_notification_id() == head
        assert not ledger.grant(user, 10, "bonus", key="during").replayed  # nothing was recorded
