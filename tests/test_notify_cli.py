"""``notify`` against a real local HTTP receiver (an ``http.server`` thread)
that verifies every signature and fails for a while before it recovers:
every notification arrives at least once, in order per account; what keeps
failing is dead-lettered, listed and re-driven."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from ledger import InvalidSignature, Ledger, Notifier, RetryPolicy, Threshold, verify_signature
from ledger.application.signing import ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER

SECRET = "whsec-notify-test-0123456789"
USERS = [UUID(int=i + 1) for i in range(3)]
ROOT = Path(__file__).resolve().parent.parent


class Receiver:
    """A host's endpoint: answers 503 to the first ``fail_first`` requests and
    always to notification ids in ``refuse``; otherwise verifies the signature
    and keeps the payload."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.refuse: set[str] = set()
        self.requests = 0
        self.received: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.requests += 1
                    failing = receiver.requests <= receiver.fail_first
                    refused = self.headers[ID_HEADER] in receiver.refuse
                    try:
                        verify_signature(SECRET, body, self.headers[TIMESTAMP_HEADER], self.headers[SIGNATURE_HEADER])
                        valid = True
                    except InvalidSignature:
                        receiver.bad_signatures += 1
                        valid = False
                    if valid and not failing and not refused:
                        payload = json.loads(body)
                        assert payload["id"] == self.headers[ID_HEADER]
                        receiver.received.append(payload)
                status = 401 if not valid else 503 if failing or refused else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/ledger"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=4)
    yield r
    r.close()


def story(ledger: Ledger) -> None:
    """Grants, thresholds crossed and re-armed, holds opened and closed, on three accounts, interleaved."""
    for u in USERS:
        ledger.grant(u, 100, "purchase", key=f"g:{u}")
        ledger.set_balance_thresholds(u, [Threshold.credits(40)], key=f"t:{u}")
    for round_ in range(3):
        for u in USERS:
            hold = ledger.reserve(u, UUID(int=1000 + round_), 30, key=f"r:{u}:{round_}", expires_in=timedelta(hours=1))
            assert hold.reservation_id is not None
            ledger.settle(hold.reservation_id, 30, key=f"s:{u}:{round_}")
    for u in USERS:
        ledger.spend(u, 10, key=f"drain:{u}")  # to 0: depleted
        ledger.grant(u, 50, "bonus", key=f"g2:{u}")  # re-armed


def check_delivered(ledger: Ledger, receiver: Receiver) -> None:
    expected = ledger.outbox("expected").pending(limit=1_000)
    assert {"balance.low", "balance.depleted", "balance.recovered", "hold.opened", "hold.settled"} <= {
        n.type for n in expected
    }
    got_ids = [p["id"] for p in receiver.received]
    assert {str(n.id) for n in expected} <= set(got_ids)  # every one at least once
    for user in USERS:
        mine = [p["position"] for p in receiver.received if p["user_id"] == str(user)]
        first_seen = list(dict.fromkeys(mine))
        assert first_seen == sorted(first_seen)  # in order per account
        assert first_seen == [n.position for n in expected if n.user_id == user]
    assert receiver.bad_signatures == 0


def test_notifier_delivers_through_a_failing_receiver(ledger_url: str, receiver: Receiver) -> None:
    with Ledger(ledger_url) as ledger:
        story(ledger)
        policy = RetryPolicy(max_attempts=6, backoff_base_s=0.01, backoff_max_s=0.05)
        with Notifier(ledger.outbox("hooks"), receiver.url, SECRET, policy=policy) as notifier:
            total = 0
            while (report := notifier.run_once(limit=7)).delivered:
                total += report.delivered
                assert report.dead == 0
        assert receiver.requests == total + 4  # four failures, each retried
        check_delivered(ledger, receiver)
        assert ledger.outbox("hooks").pending() == [] and ledger.outbox("hooks").lag() == 0


def test_notifier_dead_letters_then_redrives(ledger_url: str, receiver: Receiver) -> None:
    receiver.fail_first = 0
    with Ledger(ledger_url) as ledger:
        story(ledger)
        outbox = ledger.outbox("hooks")
        poisoned = outbox.pending(limit=1_000)[5]
        receiver.refuse.add(str(poisoned.id))
        policy = RetryPolicy(max_attempts=3, backoff_base_s=0.0, backoff_max_s=0.0)
        with Notifier(outbox, receiver.url, SECRET, policy=policy) as notifier:
            report = notifier.run_once(limit=1_000)
            assert (report.dead, report.attempts) == (1, report.delivered + 3)
            [letter] = outbox.dead_letters()
            assert (letter.notification_id, letter.attempts, letter.last_error) == (poisoned.id, 3, "HTTP 503: ")
            assert str(poisoned.id) not in {p["id"] for p in receiver.received}
            assert notifier.redrive().dead == 1  # still refused: stays dead
            assert outbox.dead_letters()[0].attempts == 6
            receiver.refuse.clear()
            assert notifier.redrive([poisoned.id]).delivered == 1
        assert outbox.dead_letters() == []
        assert receiver.received[-1]["id"] == str(poisoned.id)  # re-driven after the later ones
        assert {str(n.id) for n in ledger.outbox("all").pending(limit=1_000)} == {p["id"] for p in receiver.received}


def _notify(url: str, *args: str, secret: str | None = SECRET) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LEDGER_URL": url}
    env.pop("LEDGER_NOTIFY_SECRET", None)
    if secret is not None:
        env["LEDGER_NOTIFY_SECRET"] = secret
    return subprocess.run(
        [sys.executable, "-m", "ledger", "notify", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_the_cli_delivers_lists_dead_letters_and_redrives(durable_url: str, receiver: Receiver) -> None:
    with Ledger(durable_url) as ledger:
        story(ledger)
    done = _notify(durable_url, "--url", receiver.url, "--once", "--backoff-s", "0.01", "--max-attempts", "6")
    assert done.returncode == 0, done.stderr
    assert "dead-lettered 0" in done.stdout
    with Ledger(durable_url) as ledger:
        check_delivered(ledger, receiver)
        assert ledger.outbox("notify").pending() == []
        # More commits later: only those are sent.
        ledger.spend(USERS[0], 45, key="later")
        fresh = ledger.outbox("notify").pending()
        poisoned = fresh[-1]
    assert [n.type for n in fresh] == ["balance.low"]
    before = len(receiver.received)
    receiver.refuse.add(str(poisoned.id))
    dead = _notify(durable_url, "--url", receiver.url, "--once", "--backoff-s", "0", "--max-attempts", "2")
    assert dead.returncode == 0 and "dead-lettered 1" in dead.stdout, dead.stderr
    assert len(receiver.received) == before
    listed = _notify(durable_url, "--list-dead", secret=None)
    assert json.loads(listed.stdout)["notification_id"] == str(poisoned.id)
    receiver.refuse.clear()
    redriven = _notify(durable_url, "--url", receiver.url, "--redrive", "all")
    assert redriven.returncode == 0 and "redelivered 1" in redriven.stdout, redriven.stderr
    assert receiver.received[-1]["id"] == str(poisoned.id)
    assert _notify(durable_url, "--list-dead", secret=None).stdout == ""


def test_the_cli_refuses_to_run_without_a_secret_or_endpoint(durable_url: str) -> None:
    with Ledger(durable_url):
        pass
    no_secret = _notify(durable_url, "--url", "http://127.0.0.1:9/", "--once", secret=None)
    assert no_secret.returncode == 2 and "LEDGER_NOTIFY_SECRET" in no_secret.stderr
    no_url = _notify(durable_url, "--once")
    assert no_url.returncode == 2 and "--url" in no_url.stderr
    short = _notify(durable_url, "--url", "http://127.0.0.1:9/", "--once", secret="short")
    assert short.returncode != 0 and "16 bytes" in short.stderr


def test_the_long_running_notifier_stops_cleanly(durable_url: str, receiver: Receiver) -> None:
    receiver.fail_first = 0
    with Ledger(durable_url) as ledger:
        story(ledger)
        want = len(ledger.outbox("expected").pending(limit=1_000))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LEDGER_URL": durable_url, "LEDGER_NOTIFY_SECRET": SECRET}
    process = subprocess.Popen(
        [sys.executable, "-m", "ledger", "notify", "--url", receiver.url, "--poll-s", "0.05"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = 60.0
        start = time.monotonic()
        while len(receiver.received) < want and time.monotonic() - start < deadline:
            time.sleep(0.05)
        with Ledger(durable_url) as ledger:
            ledger.spend(USERS[1], 45, key="while-running")
        while len(receiver.received) < want + 1 and time.monotonic() - start < deadline:
            time.sleep(0.05)
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert len(receiver.received) == want + 1  # the spend's balance.low (debits are not notified)
    assert receiver.received[-1]["type"] == "balance.low"
    assert "stopped at position" in err


class EndlessBody(BaseHTTPRequestHandler):
    """Answers every POST with ``status`` and a chunked body that never ends,
    one small chunk at a time, each well within the notifier's timeout."""

    protocol_version = "HTTP/1.1"
    status = 200

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(self.status)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while True:
                self.wfile.write(b"1\r\nx\r\n")
                self.wfile.flush()
                time.sleep(0.02)
        except OSError:
            return  # the notifier hung up

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("status", [200, 500])
def test_an_endless_answer_body_does_not_hold_the_notifier(status: int) -> None:
    handler = type("Handler", (EndlessBody,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Ledger("memory://") as ledger:
            ledger.grant(USERS[0], 100, "purchase", key="g")
            policy = RetryPolicy(max_attempts=1, timeout_s=0.5)
            url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
            with Notifier(ledger.outbox("hooks"), url, SECRET, policy=policy) as notifier:
                reports: list[Any] = []
                worker = threading.Thread(target=lambda: reports.append(notifier.run_once()), daemon=True)
                worker.start()
                worker.join(timeout=15)
                assert not worker.is_alive(), "the notifier is still reading the answer's body"
                notifier.stop.set()
            [report] = reports
            if status == 200:
                assert (report.delivered, report.dead) == (1, 0)  # the status is the answer
            else:
                assert (report.delivered, report.dead) == (0, 1)
                [letter] = ledger.outbox("hooks").dead_letters()
                assert letter.last_error.startswith("HTTP 500: x")
    finally:
        server.shutdown()
        server.server_close()


def test_redrive_all_and_list_dead_reach_past_a_thousand_dead_letters(durable_url: str) -> None:
    receiver = Receiver(fail_first=10**6)
    try:
        with Ledger(durable_url) as ledger:
            for i in range(1_001):
                ledger.grant(UUID(int=100 + i), 1, "purchase", key=f"g:{i}")
            outbox = ledger.outbox("hooks")
            policy = RetryPolicy(max_attempts=1)
            with Notifier(outbox, receiver.url, SECRET, policy=policy) as notifier:
                assert notifier.run_once(limit=1_000).dead == 1_000
                assert notifier.run_once(limit=1_000).dead == 1
                listed = _notify(durable_url, "--consumer", "hooks", "--list-dead")
                assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 1_001
                receiver.fail_first = 0
                assert notifier.redrive().delivered == 1_001
            assert outbox.dead_letters() == []
            paged = [d.position for d in outbox.all_dead_letters(status="redelivered", page=7)]
            assert len(paged) == 1_001 and paged == sorted(set(paged))
    finally:
        receiver.close()


class DrippingReceiver:
    """A receiver on a plain socket server (a thread) that reads each POST
    and then drips its answer one byte at a time, every ``every_s`` (well
    within the read timeout, so no single read ever times out): ``head``
    drips a status line and a header that never end; ``body`` sends a 500's
    head at once, then a long body a byte at a time."""

    def __init__(self, part: str, every_s: float) -> None:
        self.part = part
        self.every_s = every_s
        self.stopped = threading.Event()
        self.handlers: list[threading.Thread] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.05)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.getsockname()[1]}/hooks"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            handler = threading.Thread(target=self._drip, args=(conn,), daemon=True)
            self.handlers.append(handler)
            handler.start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            received = b""
            while b"\r\n\r\n" not in received:
                received += conn.recv(65536)
            if self.part == "head":
                answer = b"HTTP/1.1 200 OK\r\nX-Drip: " + b"x" * 100_000
            else:
                conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 100000\r\n\r\n")
                answer = b"y" * 100_000
            try:
                for i in range(len(answer)):
                    if self.stopped.wait(self.every_s):
                        return
                    conn.sendall(answer[i : i + 1])
            except OSError:
                return  # the notifier hung up

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        for handler in self.handlers:
            handler.join()
        self.server.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts open descriptors in /proc")
@pytest.mark.parametrize("part", ["head", "body"])
def test_a_dripping_receiver_cannot_hold_a_post_past_its_deadline(part: str) -> None:
    timeout_s = 1.0
    threads, fds = threading.active_count(), _open_fds()
    receiver = DrippingReceiver(part, every_s=0.3 if part == "head" else 0.8)
    try:
        with Ledger("memory://") as ledger:
            ledger.grant(USERS[0], 100, "purchase", key="g")
            policy = RetryPolicy(max_attempts=2, backoff_base_s=0.0, backoff_max_s=0.0, timeout_s=timeout_s)
            with Notifier(ledger.outbox("hooks"), receiver.url, SECRET, policy=policy) as notifier:
                reports: list[Any] = []
                started = time.monotonic()
                worker = threading.Thread(target=lambda: reports.append(notifier.run_once()), daemon=True)
                worker.start()
                worker.join(timeout=30)
                elapsed = time.monotonic() - started
                assert not worker.is_alive(), "a dripping answer holds the notifier"
            [report] = reports
            assert (report.delivered, report.dead, report.attempts) == (0, 1, 2)  # each try failed, then dead
            assert elapsed < 2 * (timeout_s + 0.3), f"two tries took {elapsed:.2f} s"
            [letter] = ledger.outbox("hooks").dead_letters()
            if part == "head":
                assert "deadline" in letter.last_error, letter.last_error
            else:
                assert letter.last_error.startswith("HTTP 500: y"), letter.last_error
        receiver.close()
        assert threading.active_count() == threads  # no watchdog left behind
        assert _open_fds() == fds  # nor a socket
    finally:
        receiver.close()
