"""The auditor's figures on PostgreSQL: a full audit against the raw decode
rate, and its peak memory, over 1,000,000 events.

    python benchmarks/audit.py            # 1,000,000 events (4 to 5 minutes)
    python benchmarks/audit.py --quick    # 50,000 events, a smoke test

Prints figures as it goes; the last line is one JSON object:

- ``raw_decode_events_per_s``: the baseline, in a fresh process: every event
  of the log read a page of 1,000 at a time with
  ``app.recorder.select_notifications`` and decoded with
  ``app.mapper.to_domain_event`` (as benchmarks/run.py does, over all topics:
  the audit reads them all).
- ``audit_events_per_s``: ``ledger.audit(ledger)`` in a fresh process, every
  check on, the views compared (they are projected first).
  ``audit_vs_decode`` is the ratio. Target: >= 0.5 (within 2 x).
- ``audit_peak_rss_mb``: the audit process's peak resident memory
  (``ru_maxrss``). Target: < 300 MB. ``raw_decode_peak_rss_mb`` for context.
- ``digest_events_per_s``: ``python -m ledger digest`` work (hash chain and
  anchors) in a fresh process, for context.
- ``events``, ``accounts``, ``generate_s``, ``project_s``, ``elapsed_s``,
  ``load_average_1m``.

Uses a fresh ``bench_audit_<hex>`` schema on the server named by
LEDGER_TEST_DATABASE_URL and drops it at the end, also on error.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ledger import (  # noqa: E402
    GrantCredits,
    Ledger,
    ManualClock,
    ReserveCredits,
    SettleReservation,
    SpendCredits,
    audit,
)
from ledger.audit.digest import digest  # noqa: E402
from ledger.domain.holds import reservation_id_for  # noqa: E402

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
DECODE_PAGE = 1_000
BATCH = 10_000
#: Events a user's round records, at least: an expiring grant and its record
#: (2), two spends (4), a hold reserved (3) and settled (3); most rounds also
#: record the lapse of an older grant, and the first the account's opening.
EVENTS_PER_ROUND = 12
START = datetime(2026, 1, 1, tzinfo=UTC)
TARGET_AUDIT_VS_DECODE = 0.5
TARGET_PEAK_RSS_MB = 300.0


def say(text: str) -> None:
    print(text, flush=True)


def base_url() -> str:
    return os.environ.get("LEDGER_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)


def with_schema(base: str, schema: str) -> str:
    return f"{base}{'&' if '?' in base else '?'}schema={schema}"


def drop_schema(base: str, schema: str) -> None:
    conninfo = urlsplit(base)._replace(query="", fragment="").geturl()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


# ------------------------------------------------------------------ generating


def round_commands(users: list[UUID], n: int, now: datetime) -> list[Any]:
    """One round for each user: a grant that lapses after two rounds (so older
    grants expire), a spend, a hold settled for less, another spend."""
    commands: list[Any] = []
    for user in users:
        hold_key = f"{user}:r{n}"
        commands += [
            GrantCredits(
                key=f"{user}:g{n}",
                user_id=user,
                amount_credits=100,
                kind="subscription_renew",
                expires_at=now + timedelta(days=2, hours=1),
            ),
            SpendCredits(key=f"{user}:s{n}", user_id=user, amount_credits=10),
            ReserveCredits(
                key=hold_key, user_id=user, job_id=uuid.uuid4(), amount_credits=20, expires_at=now + timedelta(hours=1)
            ),
            SettleReservation(
                key=f"{user}:t{n}", reservation_id=reservation_id_for(hold_key), actual_credits=15, user_id=user
            ),
            SpendCredits(key=f"{user}:x{n}", user_id=user, amount_credits=5),
        ]
    return commands


def generate_part(url: str, users: list[UUID], rounds: int, last_round_users: int) -> int:
    """One worker's users, every round a day apart; returns the events' head."""
    clock = ManualClock(START)
    with Ledger(url, clock=clock) as ledger:
        for n in range(rounds):
            part = users if n < rounds - 1 else users[:last_round_users]
            commands = round_commands(part, n, clock.now())
            for start in range(0, len(commands), BATCH):
                ledger.execute_batch(commands[start : start + BATCH])
            clock.advance(timedelta(days=1))
        return ledger.app.recorder.max_notification_id() or 0


def generate(url: str, events: int, users: int, workers: int) -> float:
    rounds = max(1, -(-events // (users * EVENTS_PER_ROUND)))
    last = max(1, users - (rounds * users * EVENTS_PER_ROUND - events) // EVENTS_PER_ROUND)
    everyone = [uuid.uuid4() for _ in range(users)]
    parts = [everyone[i::workers] for i in range(workers)]
    started = time.perf_counter()
    Ledger(url).close()  # creates the tables once, before the workers race to
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(generate_part, url, p, rounds, max(1, last // workers)) for p in parts]
        for future in futures:
            future.result()
    return time.perf_counter() - started


# ------------------------------------------------------------------ measured in children


def child_decode(url: str) -> dict[str, Any]:
    with Ledger(url) as ledger:
        recorder, mapper = ledger.app.recorder, ledger.app.mapper
        count, position = 0, 1
        started = time.perf_counter()
        while True:
            page = recorder.select_notifications(position, limit=DECODE_PAGE)
            events = [(n.id, mapper.to_domain_event(n)) for n in page]
            count += len(events)
            if len(page) < DECODE_PAGE:
                break
            position = page[-1].id + 1
        elapsed = time.perf_counter() - started
    return {"events": count, "seconds": elapsed, "peak_rss_mb": peak_rss_mb()}


def child_audit(url: str) -> dict[str, Any]:
    with Ledger(url) as ledger:
        started = time.perf_counter()
        report = audit(ledger)
        elapsed = time.perf_counter() - started
    return {
        "events": report.events,
        "seconds": elapsed,
        "peak_rss_mb": peak_rss_mb(),
        "ok": report.ok,
        "findings": report.findings_total,
        "accounts": report.summary["accounts"],
        "views_position": report.views_position,
        "head": report.head,
    }


def child_digest(url: str) -> dict[str, Any]:
    with Ledger(url) as ledger:
        started = time.perf_counter()
        result = digest(ledger)
        elapsed = time.perf_counter() - started
    return {"events": result.head.events, "seconds": elapsed, "peak_rss_mb": peak_rss_mb(), "ok": result.ok}


CHILDREN = {"decode": child_decode, "audit": child_audit, "digest": child_digest}


def in_child(kind: str, url: str) -> dict[str, Any]:
    """Runs one measurement in a fresh interpreter; its last line is JSON."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--url", url], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{out.stdout}\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ------------------------------------------------------------------ the run


def run(events: int, users: int, workers: int) -> dict[str, Any]:
    started = time.perf_counter()
    schema = f"bench_audit_{uuid.uuid4().hex[:10]}"
    base = base_url()
    url = with_schema(base, schema)
    try:
        say(f"generating about {events:,} events for {users:,} users in {workers} processes ...")
        generate_s = generate(url, events, users, workers)
        with Ledger(url) as ledger:
            head = ledger.app.recorder.max_notification_id() or 0
            say(f"  {head:,} events in {generate_s:.1f} s; projecting the read models ...")
            projected = time.perf_counter()
            ledger.views.catch_up()
            project_s = time.perf_counter() - projected
        say(f"  projected in {project_s:.1f} s")
        decode = in_child("decode", url)
        decode_rate = decode["events"] / decode["seconds"]
        say(
            f"raw decode: {decode['events']:,} events in {decode['seconds']:.1f} s = {decode_rate:,.0f} events/s, "
            f"peak RSS {decode['peak_rss_mb']:.0f} MB"
        )
        checked = in_child("audit", url)
        audit_rate = checked["events"] / checked["seconds"]
        say(
            f"audit: {checked['events']:,} events in {checked['seconds']:.1f} s = {audit_rate:,.0f} events/s, "
            f"peak RSS {checked['peak_rss_mb']:.0f} MB, {checked['findings']} findings"
        )
        if not checked["ok"]:
            raise RuntimeError("the audit of a clean ledger found problems")
        hashed = in_child("digest", url)
        digest_rate = hashed["events"] / hashed["seconds"]
        say(f"digest: {hashed['events']:,} events in {hashed['seconds']:.1f} s = {digest_rate:,.0f} events/s")
    finally:
        drop_schema(base, schema)
    figures = {
        "events": head,
        "accounts": checked["accounts"],
        "raw_decode_events_per_s": round(decode_rate, 1),
        "raw_decode_peak_rss_mb": round(decode["peak_rss_mb"], 1),
        "audit_events_per_s": round(audit_rate, 1),
        "audit_peak_rss_mb": round(checked["peak_rss_mb"], 1),
        "audit_vs_decode": round(audit_rate / decode_rate, 3),
        "digest_events_per_s": round(digest_rate, 1),
        "generate_s": round(generate_s, 1),
        "project_s": round(project_s, 1),
        "elapsed_s": round(time.perf_counter() - started, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    met = figures["audit_vs_decode"] >= TARGET_AUDIT_VS_DECODE and figures["audit_peak_rss_mb"] < TARGET_PEAK_RSS_MB
    say(
        f"targets: audit_vs_decode {figures['audit_vs_decode']} (>= {TARGET_AUDIT_VS_DECODE}), peak RSS "
        f"{figures['audit_peak_rss_mb']} MB (< {TARGET_PEAK_RSS_MB:.0f}): {'met' if met else 'NOT met'}"
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50,000 events: a smoke test")
    parser.add_argument("--events", type=int, default=None, help="events to generate (default 1,000,000)")
    parser.add_argument("--users", type=int, default=None, help="accounts (default 10,000; 1,000 with --quick)")
    parser.add_argument("--workers", type=int, default=2, help="processes generating events")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](args.url)))
        return 0
    events = args.events or (50_000 if args.quick else 1_000_000)
    users = args.users or (1_000 if args.quick else 10_000)
    figures = run(events, users, args.workers)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
