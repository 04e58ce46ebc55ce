"""Lemon Squeezy webhook throughput on PostgreSQL.

    python benchmarks/webhooks.py            # full run
    python benchmarks/webhooks.py --quick    # smaller counts, a smoke test

``webhooks_per_s``: signed deliveries verified, stored in webhook_events and
applied to the ledger (a subscription_created snapshot, then its initial
invoice's subscription_payment_success, which grants the plan's credits), by
``--workers`` threads calling ``LemonSqueezy.ingest`` as an ASGI server's
worker threads would. Target >= 300.

``duplicate_webhooks_per_s``: the same deliveries again (same webhook ids),
recognised as redeliveries by webhook_events' unique indexes. Target >= 2,000.

Context figures: the same two with one thread (``*_sequential``), the
workers, how many commands shared a ledger transaction (group commit), the
counts, ``elapsed_s`` and ``load_average_1m`` (other work on the machine
changes every figure). ``--no-pre-ping`` opens the ledger with
``pre_ping=false`` instead of the seed's default (the pool then skips a round
trip per connection checkout, six or so per delivery). The last line printed
is one JSON object.
Every run uses a fresh ``bench_ls_<hex>`` schema on the server named by
LEDGER_TEST_DATABASE_URL and drops it at the end, also on error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.lemonsqueezy import LemonSqueezy, sign
from ledger import DEFAULT_CATALOG, CreditPolicy, Ledger

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
TARGET_WEBHOOKS_PER_S = 300.0
TARGET_DUPLICATES_PER_S = 2_000.0
#: Threads calling ingest at once, as an ASGI server's worker threads would.
DEFAULT_WORKERS = 8
SECRET = "whsec_benchmark_5b2e"
VARIANTS = {"starter": ("1001", "1002"), "pro": ("2001", "2002"), "studio": ("3001", "3002")}
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "lemonsqueezy"


def php_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).replace("/", "\\/").encode()


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000000Z")


def customer_bodies(index: int, at: datetime) -> list[bytes]:
    """A new customer's subscription_created and initial invoice, as Lemon Squeezy sends them."""
    sub = json.loads((FIXTURES / "subscription_created.json").read_bytes())
    inv = json.loads((FIXTURES / "subscription_payment_success.json").read_bytes())
    user = str(uuid.uuid4())
    sid, customer = 10_000_000 + index, 20_000_000 + index
    for payload in (sub, inv):
        payload["meta"]["webhook_id"] = str(uuid.uuid4())
        payload["meta"]["custom_data"] = {"user_id": user}
    sub["data"]["id"] = str(sid)
    sub["data"]["attributes"].update(
        customer_id=customer, created_at=iso(at), updated_at=iso(at), renews_at=iso(at + timedelta(days=31))
    )
    inv["data"]["id"] = str(30_000_000 + index)
    inv["data"]["attributes"].update(
        subscription_id=sid,
        customer_id=customer,
        created_at=iso(at + timedelta(seconds=1)),
        updated_at=iso(at + timedelta(seconds=2)),
    )
    return [php_json(sub), php_json(inv)]


def deliver(adapter: LemonSqueezy, groups: Sequence[Sequence[bytes]], workers: int, expect: str) -> float:
    """Delivers each group's bodies in order, groups spread over threads; returns deliveries a second."""
    failures: list[str] = []

    def run(group: Sequence[bytes]) -> None:
        for body in group:
            result = adapter.ingest(body, {"X-Signature": sign(body, SECRET)})
            if result.status != expect or result.processing not in (None, "processed"):
                failures.append(f"{result.status}/{result.processing}: {result.reason}")

    count = sum(len(g) for g in groups)
    started = time.perf_counter()
    if workers == 1:
        for group in groups:
            run(group)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(run, groups))
    elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit(f"{len(failures)} deliveries went wrong, first: {failures[0]}")
    return count / elapsed


def schema_url(base: str, schema: str, pool_size: int, pre_ping: bool = True) -> str:
    sep = "&" if "?" in base else "?"
    ping = "" if pre_ping else "&pre_ping=false"
    return f"{base}{sep}schema={schema}&pool_size={pool_size}&max_overflow={pool_size}{ping}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, a smoke test")
    parser.add_argument("--customers", type=int, default=None, help="customers (two deliveries each)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="threads delivering at once")
    parser.add_argument("--timeout", type=float, default=280.0, help="abort a run that hangs (seconds)")
    parser.add_argument(
        "--no-pre-ping", action="store_true", help="the ledger URL's pre_ping=false (default: the seed's true)"
    )
    args = parser.parse_args(argv)
    customers = args.customers or (150 if args.quick else 1_000)
    base = os.environ.get("LEDGER_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)
    schema = f"bench_ls_{uuid.uuid4().hex[:12]}"
    watchdog = threading.Timer(args.timeout, lambda: os._exit(3))
    watchdog.daemon = True
    watchdog.start()
    started = time.perf_counter()
    try:
        figures = run(base, schema, customers, args.workers, print, pre_ping=not args.no_pre_ping)
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        watchdog.cancel()
    figures["elapsed_s"] = round(time.perf_counter() - started, 2)
    # Other work on the machine changes every figure: say how busy it was.
    figures["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(figures))
    return 0


def run(
    base: str, schema: str, customers: int, workers: int, echo: Callable[[str], None], *, pre_ping: bool = True
) -> dict[str, Any]:
    url = schema_url(base, schema, workers + 2, pre_ping)
    with Ledger(url, credit_policy=CreditPolicy(auto_renew=False)) as ledger:
        for terms in DEFAULT_CATALOG:
            monthly, yearly = VARIANTS.get(terms.name, (None, None))
            ledger.define_plan(
                replace(terms, lemon_squeezy_variant_id_monthly=monthly, lemon_squeezy_variant_id_yearly=yearly)
            )
        adapter = LemonSqueezy(ledger, signing_secret=SECRET)
        now = datetime.now(UTC).replace(microsecond=0)
        warmup = [customer_bodies(i, now) for i in range(20)]
        deliver(adapter, warmup, 1, "stored")
        sequential = [customer_bodies(100 + i, now) for i in range(max(20, customers // 5))]
        concurrent = [customer_bodies(10_000 + i, now) for i in range(customers)]
        count = sum(len(g) for g in concurrent)

        seq = deliver(adapter, sequential, 1, "stored")
        echo(f"webhooks, 1 thread:                {seq:8.0f} deliveries/s ({2 * len(sequential)} deliveries)")
        per_s = deliver(adapter, concurrent, workers, "stored")
        echo(f"webhooks, {workers} threads:               {per_s:8.0f} deliveries/s ({count} deliveries)")
        dup_seq = deliver(adapter, sequential, 1, "duplicate")
        echo(f"duplicates, 1 thread:              {dup_seq:8.0f} deliveries/s")
        dup_per_s = deliver(adapter, concurrent, workers, "duplicate")
        echo(f"duplicates, {workers} threads:             {dup_per_s:8.0f} deliveries/s")

        group = adapter.processor.group.stats
        if group.shared_batches:
            echo(f"group commit: {group.shared_commands} commands in {group.shared_batches} shared transactions")
        counts = adapter.inbox.counts()
        granted = ledger.balance(uuid.UUID(json.loads(concurrent[0][0])["meta"]["custom_data"]["user_id"]))
        assert granted.balance_credits == 5000, granted
        echo(f"webhook_events: {counts}")
        return {
            "webhooks_per_s": round(per_s, 1),
            "duplicate_webhooks_per_s": round(dup_per_s, 1),
            "webhooks_per_s_sequential": round(seq, 1),
            "duplicate_webhooks_per_s_sequential": round(dup_seq, 1),
            "webhooks_met": per_s >= TARGET_WEBHOOKS_PER_S,
            "duplicates_met": dup_per_s >= TARGET_DUPLICATES_PER_S,
            "workers": workers,
            "pre_ping": pre_ping,
            "deliveries": count,
            "stored_rows": sum(counts.values()),
            "commands_per_shared_transaction": (
                round(group.shared_commands / group.shared_batches, 1) if group.shared_batches else 1.0
            ),
        }


if __name__ == "__main__":
    sys.exit(main())
