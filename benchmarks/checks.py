"""``Ledger.check`` throughput on PostgreSQL.

    python benchmarks/checks.py            # full run
    python benchmarks/checks.py --quick    # smaller counts, a smoke test

``check_per_s``: checks of a metered feature and of credits together
(``check(user, feature=…, credits=…)``), the call a web handler makes before it
enqueues a job, over ``--users`` subscribed users in turn, on the cache a
``Ledger`` keeps (every user's state read once before the timing, as a
serving process would have it), with the default ``max_age_s`` on the system
clock (once a second a check reads the log's new events). In one thread, in
process. Target >= 20,000.

Context figures: ``check_uncached_per_s`` (the same checks with
``max_age_s=0``: every check reads the user's state from the server; the cost
of a cache miss), ``record_use_per_s`` (``check(…, record_use_key=…)``, which
records a use: one transaction each), the counts, ``elapsed_s`` and
``load_average_1m``. The last line printed is one JSON object.
Every run uses a fresh ``bench_chk_<hex>`` schema on the server named by
LEDGER_TEST_DATABASE_URL and drops it at the end, also on error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ledger import DEFAULT_CATALOG, Feature, Ledger, PlanTerms

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
TARGET_CHECKS_PER_S = 20_000.0
FULL = {"users": 1_000, "checks": 200_000, "uncached": 1_000, "record_uses": 300}
QUICK = {"users": 100, "checks": 20_000, "uncached": 200, "record_uses": 50}

#: A plan with a metered feature (uses per period in plan_features.config).
METERED = PlanTerms(
    "bench_metered",
    "Bench metered",
    Decimal("10.00"),
    Decimal("100.00"),
    5_000,
    10 * 1024**3,
    2,
    1,
    features={"api_calls": Feature(True, {"uses_per_period": 1_000_000}), "sd_models": Feature(True)},
)


def schema_url(base: str, schema: str) -> str:
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}schema={schema}"


def drop_schema(base: str, schema: str) -> None:
    conninfo = base.split("?", 1)[0]
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _rate(count: int, started: float) -> float:
    return round(count / (time.perf_counter() - started), 1)


def run(base: str, schema: str, counts: dict[str, int], echo: Callable[[str], None]) -> dict[str, Any]:
    """Measures on ``schema`` (created here; the caller drops it)."""
    users = [uuid.UUID(int=i + 1) for i in range(counts["users"])]
    # The system clock: past the default max_age_s (1 s) a check reads the
    # log's new events (one read for every user), as in service.
    with Ledger(schema_url(base, schema)) as ledger:
        for terms in DEFAULT_CATALOG:
            ledger.define_plan(terms)
        ledger.define_plan(METERED)
        for user in users:
            ledger.start_subscription(user, METERED.name, key=f"bench:start:{user}")
        echo(f"{len(users):,} users subscribed to {METERED.name}")

        for user in users:  # warm: each user's state read once, as a serving process has it
            assert ledger.check(user, feature="api_calls", credits=100).allowed
        n = counts["checks"]
        started = time.perf_counter()
        for i in range(n):
            result = ledger.check(users[i % len(users)], feature="api_calls", credits=100)
        check_per_s = _rate(n, started)
        assert result.allowed
        echo(f"check_per_s {check_per_s:,.0f} ({n:,} checks on cached state)")

        n = counts["uncached"]
        started = time.perf_counter()
        for i in range(n):
            ledger.check(users[i % len(users)], feature="api_calls", credits=100, max_age_s=0)
        uncached_per_s = _rate(n, started)
        echo(f"check_uncached_per_s {uncached_per_s:,.0f} ({n:,} checks, each reading the server)")

        n = counts["record_uses"]
        started = time.perf_counter()
        for i in range(n):
            recorded = ledger.check(
                users[i % len(users)], feature="api_calls", credits=100, record_use_key=f"bench:use:{i}"
            )
            assert recorded.use_recorded
        record_use_per_s = _rate(n, started)
        echo(f"record_use_per_s {record_use_per_s:,.0f} ({n:,} checks recording a use)")
    return {
        "check_per_s": check_per_s,
        "check_uncached_per_s": uncached_per_s,
        "record_use_per_s": record_use_per_s,
        "check_users": len(users),
        "checks": counts["checks"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, a smoke test")
    parser.add_argument("--users", type=int, default=None, help="subscribed users checked in turn")
    args = parser.parse_args(argv)
    counts = dict(QUICK if args.quick else FULL)
    if args.users is not None:
        if not 1 <= args.users <= 100_000:
            parser.error("--users must be within 1..100000")
        counts["users"] = args.users
    base = os.environ.get("LEDGER_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)
    schema = f"bench_chk_{uuid.uuid4().hex[:12]}"
    started = time.perf_counter()
    try:
        figures = run(base, schema, counts, print)
    finally:
        drop_schema(base, schema)
    figures["elapsed_s"] = round(time.perf_counter() - started, 1)
    figures["load_average_1m"] = round(os.getloadavg()[0], 2)
    met = figures["check_per_s"] >= TARGET_CHECKS_PER_S
    print(f"{'ok' if met else '!!'} check_per_s >= {TARGET_CHECKS_PER_S:,.0f}: {figures['check_per_s']:,.0f}")
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
