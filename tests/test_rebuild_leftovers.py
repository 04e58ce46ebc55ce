"""A rebuild killed mid-way leaves its aside schema (PostgreSQL) or file
(SQLite) behind; the next rebuild drops it. An aside whose rebuild is still
running, in another process, is never touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import uuid4

import psycopg
import pytest

from ledger import GrantCredits, Ledger
from ledger.storage.base import REBUILD_MARK
from ledger.storage.config import StoreConfig, parse_url
from ledger.storage.sqlite.backend import SQLiteBackend
from ledger.views.registry import schema_tables
from tests.conftest import pg_base_url

ROOT = Path(__file__).resolve().parent.parent


def asides(config: StoreConfig) -> set[str]:
    """The rebuild asides that exist now: schemas, or SQLite files (not their leases or WAL)."""
    if config.backend == "postgresql":
        prefix = f"{config.pg_schema[:40]}{REBUILD_MARK}"
        with psycopg.connect(pg_base_url(), autocommit=True) as conn:
            rows = conn.execute("SELECT nspname FROM pg_namespace WHERE left(nspname, %s) = %s", [len(prefix), prefix])
            return {name for (name,) in rows}
    base = Path(SQLiteBackend(config).views_path())
    return {
        str(p)
        for p in base.parent.glob(f"{base.name}{REBUILD_MARK}*")
        if not p.name.endswith(("-wal", "-shm", "-journal", ".lease"))
    }


def rebuild(url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ledger", "rebuild", "--url", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def story(url: str, users: int = 40, grants: int = 2_000) -> None:
    people = [uuid4() for _ in range(users)]
    with Ledger(url) as ledger:
        ledger.execute_batch(
            [
                GrantCredits(key=f"g{n}", user_id=people[n % users], amount_credits=1, kind="bonus")
                for n in range(grants)
            ]
        )


def test_a_killed_rebuilds_aside_is_dropped_by_the_next_rebuild(durable_url: str) -> None:
    config = parse_url(durable_url)
    story(durable_url)
    killed = rebuild(durable_url)
    deadline = time.monotonic() + 120
    while not asides(config) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    killed.send_signal(signal.SIGKILL)  # mid-way: its aside exists and it has not swapped yet
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    (leftover,) = asides(config)
    with Ledger(durable_url) as ledger:
        assert ledger.views.lag() > 0  # the killed rebuild swapped nothing in

    after = rebuild(durable_url)
    out, err = after.communicate(timeout=300)
    assert after.returncode == 0, out + err
    assert "swapped in" in out
    assert f"dropped {leftover}" in err
    assert asides(config) == set()
    if config.backend == "sqlite":
        assert not [p for p in Path(SQLiteBackend(config).views_path()).parent.iterdir() if REBUILD_MARK in p.name]


def test_an_aside_in_use_in_another_process_is_left_alone(durable_url: str) -> None:
    config = parse_url(durable_url)
    story(durable_url, grants=20)
    with Ledger(durable_url) as ledger:
        # This process is rebuilding (its aside open, its lease held) while another runs a whole rebuild.
        running = ledger.backend.view_store_aside(ledger.app)
        try:
            (name,) = asides(config)
            other = rebuild(durable_url)
            out, err = other.communicate(timeout=300)
            assert other.returncode == 0, out + err
            assert "dropped" not in err
            assert asides(config) == {name}
            assert ledger.views.drop_leftover_asides() == []  # nor from this process's other connections
            running.migrate(schema_tables())  # still usable
            assert asides(config) == {name}
        finally:
            ledger.views.drop_aside(running)
        assert asides(config) == set()


def test_a_failed_replay_drops_its_aside(durable_url: str) -> None:
    config = parse_url(durable_url)
    story(durable_url, grants=20)
    with Ledger(durable_url) as ledger:

        def fail(_: object) -> None:
            raise RuntimeError("replay interrupted")

        with pytest.raises(RuntimeError, match="replay interrupted"):
            ledger.views.build_aside(fail)
        assert asides(config) == set()


@pytest.mark.postgres
def test_schemas_sharing_a_long_prefix_keep_their_own_dead_asides(pg_url: str) -> None:
    """Two schemas whose names agree but for their last characters (at most
    63 in all) each clean only their own killed rebuilds' asides, and still
    clean what the names of earlier versions left (the schema's first 40
    characters, the mark, the token)."""
    stem = f"og_{uuid4().hex}".ljust(61, "x")
    urls = [pg_url.replace(parse_url(pg_url).pg_schema, f"{stem}_{side}") for side in "ab"]
    try:
        with Ledger(urls[0]) as a, Ledger(urls[1]) as b:
            dead = a.backend.view_store_aside(a.app)  # then killed: its lease ends, its schema stays
            dead_name = dead.schema  # type: ignore[attr-defined]
            dead.close()
            assert dead.lease is not None
            dead.lease.release()
            assert len(dead_name) <= 63 and dead_name.startswith(stem[:32])
            old_name = f"{stem[:40]}{REBUILD_MARK}{uuid4().hex[:12]}"  # an aside named as before
            with psycopg.connect(pg_base_url(), autocommit=True) as conn:
                conn.execute(f'CREATE SCHEMA "{old_name}"')
            assert b.views.drop_leftover_asides() == [old_name]  # whose it was, that name cannot tell
            assert existing([dead_name]) == {dead_name}  # the other schema's aside is left alone
            assert a.views.drop_leftover_asides() == [dead_name]
            assert existing([dead_name, old_name]) == set()
    finally:
        with psycopg.connect(pg_base_url(), autocommit=True) as conn:
            for url in urls:
                conn.execute(f'DROP SCHEMA IF EXISTS "{parse_url(url).pg_schema}" CASCADE')


def existing(names: list[str]) -> set[str]:
    with psycopg.connect(pg_base_url(), autocommit=True) as conn:
        rows = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)", [names])
        return {name for (name,) in rows}
