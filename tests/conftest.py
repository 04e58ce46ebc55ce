"""Backends for every test: each store must prove the same properties.

``ledger_url`` is parametrised over memory, SQLite and PostgreSQL. PostgreSQL
comes from LEDGER_TEST_DATABASE_URL; each test gets its own fresh schema. When
the server is unreachable the PostgreSQL tests are skipped on a developer's
machine and fail loudly under CI=true.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest

from ledger import Ledger, ManualClock

DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
START = datetime(2026, 1, 1, tzinfo=UTC)


class SetClock:
    """A clock of the caller's own: it returns whatever moment the test set,
    backwards, naive or in another zone too (as a host's clock may)."""

    def __init__(self, moment: datetime) -> None:
        self.moment = moment

    def now(self) -> datetime:
        return self.moment


def pg_base_url() -> str:
    return os.environ.get("LEDGER_TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL)


def _pg_reachable() -> str | None:
    try:
        with psycopg.connect(pg_base_url(), connect_timeout=5):
            return None
    except psycopg.Error as exc:
        return str(exc)


_PG_PROBLEM: list[str | None] = []


def require_postgres() -> None:
    if not _PG_PROBLEM:
        _PG_PROBLEM.append(_pg_reachable())
    problem = _PG_PROBLEM[0]
    if problem is None:
        return
    if IN_CI:
        pytest.fail(f"PostgreSQL is required under CI=true and is unreachable: {problem}", pytrace=False)
    pytest.skip(f"PostgreSQL unreachable: {problem}")


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    # Under CI a skipped PostgreSQL test is a failure, whoever skipped it.
    skipped = call.excinfo is not None and call.excinfo.errisinstance(pytest.skip.Exception)
    if IN_CI and skipped and item.get_closest_marker("postgres") is not None:
        raise AssertionError("a PostgreSQL test was skipped under CI=true")


def fresh_pg_schema() -> Iterator[str]:
    """A ledger URL on a fresh PostgreSQL schema, dropped afterwards."""
    require_postgres()
    schema = f"test_{uuid.uuid4().hex[:12]}"
    base = pg_base_url()
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}schema={schema}"
    with psycopg.connect(base, autocommit=True) as conn:
        # And the rebuild asides a test left (killed or failed rebuilds, on
        # purpose or not): named after the schema, which is unique here.
        asides = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, %s)", [f"{schema}_rebuild_"]
        ).fetchall()
        for (name,) in [*asides, (schema,)]:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from fresh_pg_schema()


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "memory":
        yield "memory://"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.sqlite3'}"
    else:
        yield from fresh_pg_schema()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def durable_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The backends a second connection, thread or process shares: what a test
    of concurrency or of opening a store by its URL needs (``memory://`` is one
    ``Ledger``'s alone)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.sqlite3'}"
    else:
        yield from fresh_pg_schema()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def ledger(ledger_url: str, clock: ManualClock) -> Iterator[Ledger]:
    with Ledger(ledger_url, clock=clock) as opened:
        yield opened
