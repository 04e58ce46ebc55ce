"""The pool's pre-ping window, and that commands survive connections the
server dropped (a restart, a failover), inside and outside the window."""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg
import pytest

from ledger import ConfigurationError, GrantCredits, Ledger, SpendCredits
from ledger.storage.config import PRE_PING_WINDOW_S, parse_url
from ledger.storage.postgres.backend import DDL_LOCK_KEY
from ledger.storage.postgres.recorder import PingWindow
from tests.conftest import pg_base_url


class Conn:
    """Stands in for a pooled connection (the window keeps weak references)."""


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_a_connection_is_pinged_unless_handed_out_within_the_window() -> None:
    pinged: list[Any] = []
    clock = Clock()
    window = PingWindow(0.5, pinged.append, clock)
    first, second = Conn(), Conn()
    window(first)  # never seen: pinged
    clock.now_s += 0.4
    window(first)  # handed out 0.4 s ago: not pinged
    window(second)  # another connection is pinged on its own account
    clock.now_s += 0.5
    window(first)  # 0.5 s since its last checkout: pinged again
    assert pinged == [first, second, first]
    assert window.pings == 3


def test_a_failed_ping_leaves_the_connection_unmarked() -> None:
    def dead(conn: Any) -> None:
        raise psycopg.OperationalError("server closed the connection")

    window = PingWindow(0.5, dead, Clock())
    conn = Conn()
    for _ in range(2):  # the pool discards it; were it offered again, it would be pinged again
        with pytest.raises(psycopg.OperationalError):
            window(conn)
    assert window.pings == 2


@pytest.mark.parametrize("window_s", [-0.1, 61.0])
def test_a_window_out_of_bounds_is_refused(window_s: float) -> None:
    with pytest.raises(ValueError, match=r"0\.\.60"):
        PingWindow(window_s, lambda conn: None)
    with pytest.raises(ConfigurationError, match="pre_ping_window_s"):
        parse_url(f"postgresql://u@h/db?pre_ping_window_s={window_s}")


def test_the_url_sets_the_window() -> None:
    assert parse_url("postgresql://u@h/db").pre_ping_window_s == PRE_PING_WINDOW_S
    assert parse_url("postgresql://u@h/db?pre_ping_window_s=0").pre_ping_window_s == 0


def _terminate(app_name: str) -> int:
    with psycopg.connect(pg_base_url(), autocommit=True, application_name="ledger-pool-test-admin") as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", [app_name]
        ).fetchall()
    return len(rows)


@pytest.mark.postgres
@pytest.mark.parametrize("window_s", [0.0, 0.5])
def test_commands_survive_connections_the_server_dropped(
    pg_url: str, window_s: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    app_name = f"ledger-pool-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("PGAPPNAME", app_name)  # tags the pool's connections
    user = uuid.uuid4()
    # One connection: when every pooled connection is dead, psycopg_pool
    # backs off between failed checks (1 s, 2 s, 4 s, ...): a server restart
    # stalls a pool of n connections for about 2^n seconds at worst.
    url = f"{pg_url}&pool_size=1&max_overflow=0&pre_ping_window_s={window_s}"
    with Ledger(url) as ledger:
        assert (ledger.app.ping_window is None) == (window_s == 0)
        ledger.execute(GrantCredits(key="g", user_id=user, amount_credits=100, kind="bonus"))
        for round_ in range(2):
            # Inside the window (at once) the dead connection fails its
            # statement and the read or save is retried on a new one; after
            # it, the ping finds it dead first.
            assert _terminate(app_name) > 0
            if round_ == 1:
                time.sleep(window_s + 0.1)
            receipt = ledger.execute(SpendCredits(key=f"s{round_}", user_id=user, amount_credits=10))
            assert receipt.balance_credits == 90 - 10 * round_
        assert ledger.balance(user).balance_credits == 80


@pytest.mark.postgres
def test_a_ledger_opens_when_the_server_ends_the_connection_holding_the_table_lock(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server ends the connection that holds the table-creation lock
    (a failover, an administrator) while the store opens on the pool's own
    connections: the lock went with that connection, so the ledger opens."""
    from ledger.application import facade

    opened = facade.LedgerApplication

    def open_then_lose_the_lock_connection(*args: Any, **kwargs: Any) -> Any:
        app = opened(*args, **kwargs)
        with psycopg.connect(pg_base_url(), autocommit=True) as admin:
            [(ended,)] = admin.execute(
                "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' "
                "AND pid <> pg_backend_pid() AND granted AND (classid::int8 << 32 | objid::int8) = %s",
                [DDL_LOCK_KEY],
            ).fetchall()
        assert ended == 1
        return app

    monkeypatch.setattr(facade, "LedgerApplication", open_then_lose_the_lock_connection)
    user = uuid.uuid4()
    with Ledger(pg_url) as ledger:
        assert ledger.grant(user, 10, "bonus", key="g").balance_credits == 10
