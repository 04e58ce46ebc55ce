"""One notifier per outbox consumer: the second one is refused before it
sends anything (``ConsumerBusy``, exit 2 from the CLI), or with
``--standby`` waits and takes over when the first ends, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from ledger import ConsumerBusy, Ledger, Notifier, RetryPolicy
from tests.test_notify_cli import ROOT, SECRET, USERS, Receiver, check_delivered, story

FAST = RetryPolicy(max_attempts=3, backoff_base_s=0.0, backoff_max_s=0.0)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_second_notifier_of_a_consumer_is_refused_and_sends_nothing(ledger_url: str, receiver: Receiver) -> None:
    with Ledger(ledger_url) as ledger:
        story(ledger)
        first = Notifier(ledger.outbox("hooks"), receiver.url, SECRET, policy=FAST)
        second = Notifier(ledger.outbox("hooks"), receiver.url, SECRET, policy=FAST)
        try:
            assert first.run_once(limit=5).delivered == 5
            sent = receiver.requests
            with pytest.raises(ConsumerBusy) as refused:
                second.run_once(limit=1_000)
            assert refused.value.consumer == "hooks" and refused.value.code == "consumer_busy"
            with pytest.raises(ConsumerBusy):
                second.redrive()
            assert receiver.requests == sent  # nothing went out
            elsewhere = Receiver()
            try:
                with Notifier(ledger.outbox("audit"), elsewhere.url, SECRET, policy=FAST) as other:
                    assert other.run_once(limit=1).delivered == 1  # another consumer is its own
            finally:
                elsewhere.close()

            # A standby waits until the holder closes, then delivers the rest.
            took_over = threading.Event()

            def stand_by() -> None:
                if second.claim(wait=True, poll_s=0.02):
                    took_over.set()

            standby = threading.Thread(target=stand_by)
            standby.start()
            time.sleep(0.2)
            assert not took_over.is_set()
            first.close()
            standby.join(timeout=30)
            assert took_over.is_set()
            while second.run_once(limit=1_000).delivered:
                pass
        finally:
            first.close()
            second.close()
        # Handed over at a committed position: each one exactly once, in order.
        assert [p["id"] for p in receiver.received] == [str(n.id) for n in ledger.outbox("x").pending(1_000)]


def test_a_standby_stopped_while_waiting_claims_nothing(ledger_url: str, receiver: Receiver) -> None:
    with Ledger(ledger_url) as ledger, Notifier(ledger.outbox("hooks"), receiver.url, SECRET) as holder:
        holder.claim()
        stop = threading.Event()
        standby = Notifier(ledger.outbox("hooks"), receiver.url, SECRET, stop=stop)
        threading.Timer(0.1, stop.set).start()
        assert standby.claim(wait=True, poll_s=0.02) is False
        standby.close()


def _notify(url: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LEDGER_URL": url, "LEDGER_NOTIFY_SECRET": SECRET}
    return subprocess.Popen(
        [sys.executable, "-m", "ledger", "notify", *args], env=env, stderr=subprocess.PIPE, text=True
    )


def test_the_cli_refuses_a_second_notifier_and_a_standby_takes_over_from_a_killed_one(
    durable_url: str, receiver: Receiver
) -> None:
    with Ledger(durable_url) as ledger:
        story(ledger)
        want = len(ledger.outbox("expected").pending(limit=1_000))
    running = _notify(durable_url, "--url", receiver.url, "--poll-s", "0.05")
    standby: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: len(receiver.received) >= want, "the first notifier's deliveries")
        second = _notify(durable_url, "--url", receiver.url, "--once")
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2 and "ConsumerBusy" in err and "'notify'" in err, err
        standby = _notify(durable_url, "--url", receiver.url, "--poll-s", "0.05", "--standby")
        time.sleep(1.0)
        assert standby.poll() is None and len(receiver.received) == want  # waiting, sending nothing
        running.send_signal(signal.SIGKILL)
        running.wait(timeout=30)
        with Ledger(durable_url) as ledger:
            ledger.spend(USERS[2], 45, key="after-the-kill")  # a balance.low for the standby to send
        wait_for(lambda: len({p["id"] for p in receiver.received}) >= want + 1, "the standby's delivery")
    finally:
        running.kill()
        running.wait(timeout=30)
        if standby is not None:
            standby.terminate()
            _, err = standby.communicate(timeout=30)
            assert standby.returncode == 0, err
            assert "standing by" in err
    with Ledger(durable_url) as ledger:
        check_delivered(ledger, receiver)
    assert receiver.received[-1]["type"] == "balance.low"
