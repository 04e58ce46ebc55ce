"""The long-running projector: exactly once through SIGKILL and restart while
commands keep arriving (PostgreSQL) and part way through a backlog (SQLite and
PostgreSQL), and a clean stop on SIGTERM."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from uuid import uuid4

import pytest

from ledger import InsufficientCredits, Ledger

FAR = datetime(2099, 1, 1, tzinfo=UTC)


def _start_projector(url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ledger", "project", "--url", url, "--poll-s", "0.05", "--lag-every-s", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _write_commands(url: str, stop: threading.Event, counter: list[int]) -> None:
    users = [uuid4() for _ in range(5)]
    with Ledger(url) as ledger:
        for u in users:
            ledger.grant(u, 1_000_000, "bonus", key=f"{u}:fund")
        i = 0
        while not stop.is_set() and i < 20_000:
            user = users[i % len(users)]
            try:
                hold = ledger.reserve(user, uuid4(), 10, FAR, key=f"{user}:r{i}")
                if i % 3:
                    ledger.settle(hold.reservation_id, 7, key=f"{user}:s{i}", user_id=user)
                else:
                    ledger.release(hold.reservation_id, "job failed", key=f"{user}:x{i}", user_id=user)
                ledger.spend(user, 1, key=f"{user}:a{i}")
            except InsufficientCredits:
                pass
            i += 1
            counter[0] = i


@pytest.mark.postgres
def test_sigkilled_projector_resumes_exactly_once(pg_url: str) -> None:
    with Ledger(pg_url) as ledger:
        ledger.views.migrate()
    stop = threading.Event()
    counter = [0]
    writer = threading.Thread(target=_write_commands, args=(pg_url, stop, counter))
    writer.start()
    rng = random.Random(20261124)
    try:
        for _ in range(6):
            projector = _start_projector(pg_url)
            time.sleep(rng.uniform(0.5, 1.5))
            os.kill(projector.pid, signal.SIGKILL)
            projector.wait(timeout=30)
            assert projector.returncode == -signal.SIGKILL
    finally:
        stop.set()
        writer.join(timeout=120)
    assert counter[0] > 50, "commands kept arriving during the kills"

    projector = _start_projector(pg_url)
    with Ledger(pg_url) as ledger:
        views = ledger.views
        head = views.projector.head()
        deadline = time.monotonic() + 120
        while views.position() < head and time.monotonic() < deadline:
            time.sleep(0.1)
        projector.send_signal(signal.SIGTERM)
        output = projector.communicate(timeout=60)[0].decode()
        assert projector.returncode == 0, output
        assert "stopped at position" in output and "lag" in output
        assert views.position() >= head
        aside = views.build_aside(until=views.position())
        try:
            assert {t: d for t, d in views.verify(aside).items() if d} == {}
            assert views.checksums(aside) == views.checksums()
        finally:
            ledger.views.drop_aside(aside)


def test_a_projector_killed_in_the_middle_of_a_backlog_resumes_exactly_once(durable_url: str) -> None:
    # A backlog of pages to catch up, the projector killed while it is part
    # way through (a page's transaction in flight or between two), restarted.
    users = [uuid4() for _ in range(10)]
    with Ledger(durable_url) as ledger:
        ledger.views.migrate()
        for u in users:
            ledger.grant(u, 1_000_000, "bonus", key=f"{u}:fund")
        for i in range(1_500):
            user = users[i % len(users)]
            hold = ledger.reserve(user, uuid4(), 10, FAR, key=f"r{i}")
            if i % 2:
                ledger.settle(hold.reservation_id, 7, key=f"s{i}", user_id=user)
            else:
                ledger.release(hold.reservation_id, "job failed", key=f"x{i}", user_id=user)
            ledger.spend(user, 1, key=f"a{i}")
        views = ledger.views
        head = views.projector.head()
        kills = 0
        for _ in range(3):
            before = views.position()
            projector = _start_projector(durable_url)
            deadline = time.monotonic() + 60
            while views.position() == before and time.monotonic() < deadline:
                time.sleep(0.005)  # until its first page is committed: the next is under way
            os.kill(projector.pid, signal.SIGKILL)
            projector.wait(timeout=30)
            kills += views.position() < head
        assert kills > 0, "the projector was killed before it caught up"
        projector = _start_projector(durable_url)
        deadline = time.monotonic() + 120
        while views.position() < head and time.monotonic() < deadline:
            time.sleep(0.05)
        projector.send_signal(signal.SIGTERM)
        projector.communicate(timeout=60)
        assert views.position() >= head
        with views.store.transaction() as tx:
            counted = tx.fetchall("SELECT COUNT(*), COUNT(DISTINCT log_position) FROM credit_transactions", [])
        assert counted == [(10 + 750 + 1_500, 10 + 750 + 1_500)]  # grants, settles, spends: each once
        aside = views.build_aside(until=views.position())
        try:
            assert {t: d for t, d in views.verify(aside).items() if d} == {}
        finally:
            views.drop_aside(aside)
