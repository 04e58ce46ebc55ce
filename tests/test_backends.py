"""The storage seam's contract: what every backend must prove, written once.

``BackendContract`` holds the properties; each backend subclasses it and says
only how to open a ledger of its kind (eventsourcing's style of abstract test
cases). A new backend passes when its subclass here passes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit, urlunsplit

import pytest
from eventsourcing.persistence import IntegrityError

from ledger import ConfigurationError, GrantCredits, Ledger, SpendCredits
from ledger.domain.credits import CreditAccount, CreditKind, account_id_for
from ledger.storage.base import Backend
from ledger.storage.config import parse_url
from ledger.storage.digests import ENTRY, Segment
from ledger.storage.factory import backend_class, open_backend
from ledger.storage.viewstore import ViewStore
from ledger.views.registry import schema_tables
from tests.conftest import fresh_pg_schema

#: The tables the library owns, by their seed names (and its own additions).
OWNED_TABLES = (
    "plans",
    "plan_features",
    "subscriptions",
    "subscription_history",
    "credit_transactions",
    "credit_reservations",
    "webhook_events",
    "audit_logs",
    "credit_balances",
    "credit_accounts",
    "ledger_schema_version",
)


class BackendContract:
    """Properties every backend proves. Subclasses set ``name`` and ``url``."""

    name: ClassVar[str]

    @pytest.fixture
    def url(self, tmp_path: Path) -> Iterator[str]:
        raise NotImplementedError

    @pytest.fixture
    def ledger(self, url: str) -> Iterator[Ledger]:
        with Ledger(url) as opened:
            yield opened

    def test_the_url_chooses_this_backend(self, ledger: Ledger) -> None:
        assert isinstance(ledger.backend, Backend)
        assert ledger.backend.name == self.name == ledger.config.backend
        assert type(open_backend(ledger.config)) is type(ledger.backend)

    def test_reopening_sees_what_was_recorded(self, url: str) -> None:
        user = uuid.uuid4()
        with Ledger(url) as first:
            first.grant(user, 50, "bonus", key="reopen")
            if self.name == "memory":
                assert first.balance(user).balance_credits == 50
                return  # nothing outlives the ledger in memory
        with Ledger(url) as second:
            assert second.balance(user).balance_credits == 50

    def test_bulk_reads_equal_the_repository(self, ledger: Ledger) -> None:
        users = [uuid.uuid4() for _ in range(3)]
        batch = [GrantCredits(key=f"g-{u}", user_id=u, amount_credits=500, kind=CreditKind.BONUS) for u in users]
        batch += [SpendCredits(key=f"s-{i}", user_id=users[0], amount_credits=1) for i in range(150)]
        ledger.execute_batch(batch)
        ids = [account_id_for(u) for u in users] + [uuid.uuid4()]
        loaded = ledger.backend.stream_reader(ledger.app).load(ids)
        assert set(loaded) == set(ids[:3])
        for account_id in ids[:3]:
            single = ledger.app.repository.get(account_id)
            assert isinstance(single, CreditAccount)
            assert (loaded[account_id].version, loaded[account_id].balance) == (single.version, single.balance)

    def test_a_view_page_and_its_position_commit_together(self, ledger: Ledger) -> None:
        store = ledger.views.store
        start = store.position()
        with store.transaction() as tx:
            tx.execute("INSERT INTO ledger_schema_version (version, applied_at) VALUES (%s, %s)", [900, "2026-01-01"])
            tx.track(start + 1_000)
        assert store.position() == start + 1_000
        # A page at a position not past the recorded one is refused, rows and all.
        with pytest.raises(IntegrityError), store.transaction() as tx:
            tx.execute("INSERT INTO ledger_schema_version (version, applied_at) VALUES (%s, %s)", [901, "2026-01-01"])
            tx.track(start + 1_000)
        with store.transaction() as tx:
            versions = {r[0] for r in tx.fetchall("SELECT version FROM ledger_schema_version", [])}
        assert 900 in versions and 901 not in versions

    def test_single_statements_on_a_qualified_table(self, ledger: Ledger) -> None:
        store = ledger.views.store
        table = store.qualified("ledger_schema_version")
        with store.statements() as tx:
            tx.execute(f"INSERT INTO {table} (version, applied_at) VALUES (%s, %s)", [902, "2026-01-01"])
        with store.statements() as tx:
            assert tx.fetchall(f"SELECT version FROM {table} WHERE version = %s", [902]) == [(902,)]

    def test_a_rebuild_aside_starts_empty_swaps_in_and_is_dropped(self, ledger: Ledger) -> None:
        user = uuid.uuid4()
        ledger.grant(user, 70, "bonus", key="aside")
        ledger.views.catch_up()
        aside = ledger.views.build_aside()
        try:
            assert aside.position() == ledger.views.position()
            assert ledger.views.checksums(aside) == ledger.views.checksums()
            with ledger.views.store.transaction() as tx:  # the live rows drift
                tx.execute("DELETE FROM credit_transactions")
            ledger.views.swap_in(aside)
            assert ledger.views.checksums(aside) == ledger.views.checksums()
        finally:
            ledger.views.drop_aside(aside)
        assert not self.aside_exists(ledger, aside)

    def aside_exists(self, ledger: Ledger, aside: ViewStore) -> bool:
        raise NotImplementedError

    def test_the_ddl_creates_every_owned_table(self) -> None:
        ddl = backend_class("postgresql" if self.name == "postgresql" else "sqlite").ddl(schema_tables(), "pingvas_dev")
        for table in OWNED_TABLES:
            assert f"{table} (" in ddl or f"{table}(" in ddl, table

    def test_the_digest_store_keeps_segments_by_index(self, ledger: Ledger) -> None:
        store = ledger.backend.digest_store(ledger.app)
        assert store.last() is None and list(store.segments()) == []
        at = datetime(2026, 1, 1, tzinfo=UTC)
        first = Segment(0, 2, 1, 2, 0, "aa" * 32, ENTRY.pack(1, b"12345678") + ENTRY.pack(2, b"abcdefgh"), at)
        second = Segment(1, 1, 3, 3, 2, "bb" * 32, ENTRY.pack(3, b"ABCDEFGH"), at)
        store.put([first, second])
        store.put([replace(second, digest="cc" * 32)])  # replaced by index, not added
        assert [s.index for s in store.segments()] == [0, 1]
        assert [s.digest for s in store.segments(1)] == ["cc" * 32]
        last = store.last()
        assert last is not None and (last.index, list(last.entries())) == (1, [(3, b"ABCDEFGH")])
        assert [list(s.entries()) for s in store.segments(0)][:1] == [[(1, b"12345678"), (2, b"abcdefgh")]]

    def test_a_projector_waits_for_commits_or_polls(self, ledger: Ledger) -> None:
        stop = threading.Event()
        wake = ledger.backend.commit_waiter(ledger.app, stop)
        if wake is None:
            return  # this backend is polled
        writer = threading.Timer(0.2, lambda: ledger.grant(uuid.uuid4(), 1, "bonus", key="wake"))
        writer.start()
        started = time.monotonic()
        wake(10.0)
        writer.join()
        assert time.monotonic() - started < 5.0

    def test_one_holder_at_a_time_of_a_consumer_lease(self, ledger: Ledger, url: str) -> None:
        backend = ledger.backend
        first = backend.take_consumer_lease(ledger.app, "hooks")
        assert first is not None and first.held()
        assert backend.take_consumer_lease(ledger.app, "hooks") is None  # in this process too
        other = backend.take_consumer_lease(ledger.app, "hooks-2")  # another consumer is free
        assert other is not None
        if self.name != "memory":  # another ledger on the same store: another process's view
            with Ledger(url) as second:
                assert second.backend.take_consumer_lease(second.app, "hooks") is None
        first.release()
        assert not first.held()
        again = backend.take_consumer_lease(ledger.app, "hooks")
        assert again is not None
        again.release()
        other.release()

    def test_a_killed_holder_lets_its_consumer_lease_go(self, url: str) -> None:
        if self.name == "memory":
            return  # a memory store ends with its process: nobody else could take the lease
        holder = subprocess.Popen(
            [sys.executable, "-c", LEASE_HOLDER, url],
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)),
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            with Ledger(url) as ledger:
                assert ledger.backend.take_consumer_lease(ledger.app, "hooks") is None
                holder.send_signal(signal.SIGKILL)
                holder.wait(timeout=30)
                deadline = time.monotonic() + 10
                lease = None
                while lease is None and time.monotonic() < deadline:
                    lease = ledger.backend.take_consumer_lease(ledger.app, "hooks")
                    time.sleep(0.05)
                assert lease is not None, "the killed holder's lease was never let go"
                lease.release()
        finally:
            holder.kill()
            holder.wait(timeout=30)


#: Takes consumer "hooks"'s lease, says so, then sleeps until killed.
LEASE_HOLDER = """
import sys, time
from ledger import Ledger
with Ledger(sys.argv[1]) as ledger:
    lease = ledger.backend.take_consumer_lease(ledger.app, "hooks")
    print("held" if lease is not None else "busy", flush=True)
    time.sleep(600)
"""


class TestMemoryBackend(BackendContract):
    name = "memory"

    @pytest.fixture
    def url(self, tmp_path: Path) -> Iterator[str]:
        yield "memory://"

    def aside_exists(self, ledger: Ledger, aside: ViewStore) -> bool:
        return False  # a closed in-memory database is gone with its last connection

    def test_a_projector_is_polled(self, ledger: Ledger) -> None:
        assert ledger.backend.commit_waiter(ledger.app, threading.Event()) is None


class TestSQLiteBackend(BackendContract):
    name = "sqlite"

    @pytest.fixture
    def url(self, tmp_path: Path) -> Iterator[str]:
        yield f"sqlite:///{tmp_path / 'deep' / 'folder' / 'ledger.sqlite3'}"

    def aside_exists(self, ledger: Ledger, aside: ViewStore) -> bool:
        return Path(aside.path).exists()  # type: ignore[attr-defined]

    def test_views_live_in_a_file_beside_the_events(self, ledger: Ledger, tmp_path: Path) -> None:
        ledger.views.catch_up()
        folder = tmp_path / "deep" / "folder"
        assert sorted(p.name for p in folder.iterdir() if p.suffix == ".sqlite3")[:2] == [
            "ledger.sqlite3",
            "ledger.views.sqlite3",
        ]


@pytest.mark.postgres
class TestPostgresBackend(BackendContract):
    name = "postgresql"

    @pytest.fixture
    def url(self, tmp_path: Path) -> Iterator[str]:
        yield from fresh_pg_schema()

    def aside_exists(self, ledger: Ledger, aside: ViewStore) -> bool:
        import psycopg

        with psycopg.connect(ledger.config.conninfo()) as conn:
            row = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", [aside.schema]).fetchone()  # type: ignore[attr-defined]
        return bool(row and row[0])

    def test_a_projector_is_woken_by_listen(self, ledger: Ledger) -> None:
        assert ledger.backend.commit_waiter(ledger.app, threading.Event()) is not None


class SilentServer:
    """A TCP server (a thread) that accepts every connection and never says a word."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.accepted: list[socket.socket] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                self.accepted.append(self.sock.accept()[0])
            except TimeoutError:
                continue

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.mark.postgres
@pytest.mark.parametrize("option", ["pool_timeout_s=2", "connect_timeout=2"])
def test_a_listen_connection_to_a_server_that_never_answers_times_out(pg_url: str, option: str) -> None:
    """The projector's LISTEN connection has the connect timeout of the
    ledger's other connections (the URL's connect_timeout, else the pool's
    timeout): a server that accepts and never answers is a ConfigurationError
    (the projector's exit 2), not a projector hung at its start."""
    url = pg_url
    with Ledger(url) as ledger:
        server = SilentServer()
        try:
            parts = urlsplit(url)
            silent_url = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{server.port}"))
            silent = open_backend(parse_url(f"{silent_url}&{option}"))
            outcome: list[BaseException | object] = []

            def listen() -> None:
                try:
                    outcome.append(silent.commit_waiter(ledger.app, threading.Event()))
                except BaseException as exc:
                    outcome.append(exc)

            started = time.monotonic()
            worker = threading.Thread(target=listen, daemon=True)
            worker.start()
            worker.join(timeout=20)
            assert not worker.is_alive(), "LISTEN's connection waits for ever on a silent server"
            assert time.monotonic() - started < 10
            [error] = outcome
            assert isinstance(error, ConfigurationError), error
            assert f"127.0.0.1:{server.port}" in str(error) and "LISTEN" in str(error)
        finally:
            server.close()
