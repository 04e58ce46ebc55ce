"""A writer process killed with SIGKILL in the middle of its commands, and of
an ``execute_batch``: every command it reported done is recorded once, with
the receipt it reported; the command in flight is recorded entirely or not
at all, so running the whole stream again under the same keys gives each
key one outcome; the audit finds nothing and the views match a rebuild."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent

#: Prints ``key value`` as each command returns. Every key's arguments are
#: derived from the key, so a second run is a retry of the same commands.
WRITER = textwrap.dedent(
    """
    import sys
    from datetime import UTC, datetime
    from uuid import NAMESPACE_URL, uuid5
    from ledger import GrantCredits, Ledger

    url, mode = sys.argv[1], sys.argv[2]
    def user(i):
        return uuid5(NAMESPACE_URL, f"user{i}")
    def done(receipt, value):
        print(receipt.key, value, flush=True)
    with Ledger(url) as ledger:
        if mode == "batches":
            for b in range(20):
                batch = [GrantCredits(key=f"b{b}:{j}", user_id=user(j), amount_credits=5, kind="bonus")
                         for j in range(500)]
                receipts = ledger.execute_batch(batch)
                done(receipts[0], f"{len(receipts)}:{receipts[-1].entry_id}")
        else:
            for i in range(5):
                done(ledger.grant(user(i), 10**6, "bonus", key=f"fund{i}"), "-")
            for i in range(5, 100_000):
                hold = ledger.reserve(user(i % 5), uuid5(NAMESPACE_URL, f"job{i}"), 10,
                                      datetime(2099, 1, 1, tzinfo=UTC), key=f"r{i}")
                done(hold, hold.reservation_id)
                if i % 3:
                    done(ledger.settle(hold.reservation_id, 7, key=f"s{i}", user_id=user(i % 5)), "-")
                else:
                    done(ledger.release(hold.reservation_id, "failed", key=f"x{i}", user_id=user(i % 5)), "-")
                done(ledger.grant(user(i % 5), 3, "bonus", key=f"g{i}"), "-")
                if i == int(sys.argv[3]):
                    break
    print("finished", flush=True)
    """
)


def _run(url: str, mode: str, last: int, tmp: Path, *, kill_after_lines: int | None) -> list[str]:
    """The writer's lines; with ``kill_after_lines``, SIGKILLed once it has printed that many."""
    out = tmp / f"out-{time.monotonic_ns()}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with out.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-c", WRITER, url, mode, str(last)], stdout=sink, env=env)
        if kill_after_lines is not None:
            deadline = time.monotonic() + 120
            while len(out.read_text().splitlines()) < kill_after_lines and proc.poll() is None:
                assert time.monotonic() < deadline, "the writer made no progress"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=300)
    lines = out.read_text().splitlines()
    if kill_after_lines is None:
        assert proc.returncode == 0 and lines[-1] == "finished"
    else:
        assert proc.returncode == -signal.SIGKILL, "the writer finished before it was killed"
    return [line for line in lines if line != "finished"]


def _audit(url: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "ledger", "audit", "--url", url, "--quiet"], capture_output=True, text=True, env=env
    )


@pytest.mark.parametrize("mode", ["commands", "batches"])
def test_a_killed_writer_leaves_each_command_recorded_once_or_not_at_all(
    durable_url: str, tmp_path: Path, mode: str
) -> None:
    with Ledger(durable_url) as ledger:
        ledger.views.migrate()
    # Killed twice, mid-stream: the second run replays the first's commands and goes on.
    reported: dict[str, str] = {}
    for lines in (30, 90) if mode == "commands" else (2, 4):
        for line in _run(durable_url, mode, 200, tmp_path, kill_after_lines=lines):
            key, value = line.split(" ", 1)
            assert reported.setdefault(key, value) == value, f"{key} reported two outcomes"
    again = dict(line.split(" ", 1) for line in _run(durable_url, mode, 200, tmp_path, kill_after_lines=None))
    assert {k: again.get(k) for k in reported} == reported  # the same receipts, replayed

    audit = _audit(durable_url)
    assert audit.returncode == 0 and "PASSED, no findings" in audit.stdout, audit.stdout + audit.stderr
    with Ledger(durable_url) as ledger:
        views = ledger.views
        views.catch_up()
        with views.store.transaction() as tx:
            [(rows,)] = tx.fetchall("SELECT COUNT(*) FROM credit_transactions")
            [(total,)] = tx.fetchall("SELECT SUM(balance) FROM credit_balances")
        if mode == "batches":
            assert (rows, total) == (20 * 500, 20 * 500 * 5)
        else:  # 5 funds; from 5 to 200: a settle of 7 on two holds in three, and a grant of 3 each
            settled = sum(1 for i in range(5, 201) if i % 3)
            assert rows == 5 + settled + 196
            assert total == 5 * 10**6 - 7 * settled + 3 * 196
        aside = views.build_aside(until=views.position())
        try:
            assert {t: d for t, d in views.verify(aside).items() if d} == {}
        finally:
            views.drop_aside(aside)
