"""Notification lag on PostgreSQL: from a command's commit to the host's
receipt of its notification, with ``python -m ledger notify`` running as its
own process (as in production) and a local HTTP receiver.

    python benchmarks/notify.py            # 20 s at 200 commands/s
    python benchmarks/notify.py --quick    # 5 s

``notify_lag_ms_p99`` (target < 500): the 99th percentile, over every
notification received, of its receipt time minus the time the command that
recorded it returned (its commit). Commands are issued at a steady
``--rate`` (default 200 per second) by one thread: grants (each a
``credits.granted``) and spends on watched accounts (some crossing a
threshold: ``balance.low``, and ``balance.recovered`` on the next grant).
Context figures: p50 and max, the rate achieved, the notifications counted,
``load_average_1m``. The last line printed is one JSON object. Every run
uses a fresh ``bench_notify_<hex>`` schema and drops it at the end.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
from psycopg import sql

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from ledger import Ledger, Threshold  # noqa: E402

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
TARGET_LAG_MS_P99 = 500.0
DEFAULT_RATE = 200.0
SECRET = "bench-notify-secret-0123456789"
USERS = 200


class _Receiver:
    """Keeps each notification's receipt time (wall clock: the notifier is another process)."""

    def __init__(self) -> None:
        self.received: dict[str, tuple[int, float]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a host's server would

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                at = time.time()
                payload = json.loads(body)
                with receiver.lock:
                    receiver.received.setdefault(payload["id"], (payload["position"], at))
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def schema_url(base: str, schema: str) -> str:
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}schema={schema}"


def run(base: str, schema: str, seconds: float, rate: float, echo: Callable[[str], None]) -> dict[str, Any]:
    url = schema_url(base, schema)
    users = [uuid.uuid4() for _ in range(USERS)]
    receiver = _Receiver()
    with Ledger(url) as ledger:
        available = dict.fromkeys(users, 200)
        for u in users:
            ledger.grant(u, 200, "purchase", key=f"open:{u}")
            ledger.set_balance_thresholds(u, [Threshold.credits(100)], key=f"watch:{u}")
        env = {**os.environ, "PYTHONPATH": REPO_ROOT, "LEDGER_NOTIFY_SECRET": SECRET}
        notifier = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ledger",
                "notify",
                "--url",
                receiver.url,
                "--ledger-url",
                url,
                "--consumer",
                "bench",
                "--poll-s",
                "0.05",
            ],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            # The notifier's start-up (imports, pool) and the set-up's
            # notifications are not lag: measuring starts once they are delivered.
            setup_head = ledger.outbox("bench").head()
            deadline = time.monotonic() + 120
            while ledger.outbox("bench").position() < setup_head and time.monotonic() < deadline:
                time.sleep(0.05)
            receiver.received.clear()
            commits: list[tuple[int, float]] = []
            rng = random.Random(7)
            interval = 1.0 / rate
            count = int(seconds * rate)
            start = time.perf_counter()
            for i in range(count):
                due = start + i * interval
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                user = users[rng.randrange(len(users))]
                if i % 2 or not available[user]:
                    receipt = ledger.grant(user, 60, "bonus", key=f"g:{i}")
                else:
                    receipt = ledger.spend(user, min(60, available[user]), key=f"s:{i}")
                available[user] = receipt.available_credits
                if receipt.position is not None:
                    commits.append((receipt.position, time.time()))
            achieved = count / (time.perf_counter() - start)
            head = ledger.outbox("bench").head()
            deadline = time.monotonic() + 60
            outbox = ledger.outbox("bench")
            while outbox.position() < head and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
        finally:
            notifier.terminate()
            notifier.wait(timeout=30)
            receiver.close()
    positions = [p for p, _ in commits]
    lags_ms = []
    for position, received_at in receiver.received.values():
        at = bisect.bisect_left(positions, position)
        if at < len(commits):
            lags_ms.append((received_at - commits[at][1]) * 1000)
    lags_ms.sort()
    p99 = lags_ms[min(len(lags_ms) - 1, int(len(lags_ms) * 0.99))]
    p50 = statistics.median(lags_ms)
    echo(
        f"notify lag: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {lags_ms[-1]:.1f} ms over {len(lags_ms)} notifications "
        f"at {achieved:.0f} commands/s"
    )
    return {
        "notify_lag_ms_p99": round(p99, 1),
        "notify_lag_ms_p50": round(p50, 1),
        "notify_lag_ms_max": round(lags_ms[-1], 1),
        "notify_commands_per_s": round(achieved, 1),
        "notify_notifications": len(lags_ms),
        "notify_met": p99 < TARGET_LAG_MS_P99,
    }


def drop(base: str, schema: str) -> None:
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 s instead of 20 s")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="commands per second")
    args = parser.parse_args(argv)
    base = os.environ.get("LEDGER_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)
    schema = f"bench_notify_{uuid.uuid4().hex[:12]}"
    started = time.perf_counter()
    try:
        figures = run(base, schema, 5.0 if args.quick else 20.0, args.rate, print)
    finally:
        drop(base, schema)
    figures["elapsed_s"] = round(time.perf_counter() - started, 2)
    figures["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
