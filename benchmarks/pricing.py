"""Pricing figures: quotes in process, and a hold sized by a quote.

    python benchmarks/pricing.py            # on memory:// (a quote reads no store when warm)
    python benchmarks/pricing.py --postgres # on a fresh schema of LEDGER_TEST_DATABASE_URL

``quote_per_s``: ``Ledger.quote`` for one subscribed user (plan ``pro``, whose
multiplier the book names, so the user's plan is looked up too), the default
book's ``text_to_image`` with five parameters and a prompt, from one thread,
after a warm-up. Target >= 20,000 (in process: a warm quote reads memory).

Context: ``quote_per_s_no_plan_multipliers`` (the default book: no plan is
looked up), ``quote_per_s_fresh`` (``fresh=True``: the book and the plan read
from the store every time), ``reserve_for_job_ms`` and ``reserve_ms`` (the
median of a ``reserve_for_job`` and of a plain ``reserve`` of the same amount,
each then released, in the same run), ``load_average_1m``. benchmarks/run.py
merges these into its last line; run alone, the last line printed is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ledger import DEFAULT_PRICE_BOOK, Ledger, PriceBook

TARGET_QUOTES_PER_S = 20_000.0
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
PARAMS = {"steps": 40, "width": 1024, "height": 1536, "batch_size": 2, "base_model": "sdxl", "prompt": "a lighthouse"}
HOUR = timedelta(hours=1)


def quotes_per_s(ledger: Ledger, user: UUID, count: int, *, fresh: bool = False) -> float:
    for _ in range(min(count, 1_000)):
        ledger.quote(user, "text_to_image", PARAMS, fresh=fresh)
    started = time.perf_counter()
    for _ in range(count):
        ledger.quote(user, "text_to_image", PARAMS, fresh=fresh)
    return count / (time.perf_counter() - started)


def hold_ms(ledger: Ledger, user: UUID, repeats: int) -> tuple[float, float]:
    """Median ms of reserve_for_job and of a plain reserve of the same amount, alternating."""
    priced: list[float] = []
    plain: list[float] = []
    amount = ledger.quote(user, "text_to_image", PARAMS).credits
    for _ in range(repeats):
        tag = uuid.uuid4().hex[:8]
        started = time.perf_counter()
        receipt = ledger.reserve_for_job(
            user, "text_to_image", PARAMS, job_id=uuid.uuid4(), key=f"bench:{tag}:job", expires_in=HOUR
        )
        priced.append((time.perf_counter() - started) * 1000)
        assert receipt.reservation_id is not None
        ledger.release(receipt.reservation_id, "benchmark", key=f"bench:{tag}:job:release", user_id=user)
        started = time.perf_counter()
        receipt = ledger.reserve(user, uuid.uuid4(), amount, key=f"bench:{tag}:plain", expires_in=HOUR)
        plain.append((time.perf_counter() - started) * 1000)
        assert receipt.reservation_id is not None
        ledger.release(receipt.reservation_id, "benchmark", key=f"bench:{tag}:plain:release", user_id=user)
    return statistics.median(priced), statistics.median(plain)


def run(url: str, echo: Callable[[str], None], *, quotes: int = 20_000, repeats: int = 50) -> dict[str, Any]:
    with Ledger(url) as ledger:
        ledger.install_default_catalog()
        ledger.install_default_price_book()
        user = uuid.uuid4()
        ledger.start_subscription(user, "pro", key=f"bench:{user}:pro")
        plain_per_s = quotes_per_s(ledger, user, quotes)
        echo(f"quotes, default book:              {plain_per_s:8.0f} /s")
        ledger.define_price_book(PriceBook(jobs=DEFAULT_PRICE_BOOK.jobs, plan_multipliers={"pro": Decimal("0.9")}))
        per_s = quotes_per_s(ledger, user, quotes)
        echo(f"quotes, with plan multipliers:     {per_s:8.0f} /s")
        fresh_per_s = quotes_per_s(ledger, user, max(100, quotes // 100), fresh=True)
        echo(f"quotes, fresh from the store:      {fresh_per_s:8.0f} /s")
        priced_ms, plain_ms = hold_ms(ledger, user, repeats)
        echo(f"reserve_for_job {priced_ms:.3f} ms, reserve {plain_ms:.3f} ms (medians)")
    return {
        "quote_per_s": round(per_s, 1),
        "quote_per_s_no_plan_multipliers": round(plain_per_s, 1),
        "quote_per_s_fresh": round(fresh_per_s, 1),
        "reserve_for_job_ms": round(priced_ms, 3),
        "reserve_ms": round(plain_ms, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, a smoke test")
    parser.add_argument("--postgres", action="store_true", help="on PostgreSQL (LEDGER_TEST_DATABASE_URL)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    quotes, repeats = (2_000, 10) if args.quick else (20_000, 50)
    if args.postgres:
        import psycopg
        from psycopg import sql

        base = os.environ.get("LEDGER_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)
        schema = f"bench_price_{uuid.uuid4().hex[:12]}"
        try:
            figures = run(f"{base}{'&' if '?' in base else '?'}schema={schema}", print, quotes=quotes, repeats=repeats)
        finally:
            with psycopg.connect(base, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    else:
        figures = run("memory://", print, quotes=quotes, repeats=repeats)
    figures["elapsed_s"] = round(time.perf_counter() - started, 2)
    figures["load_average_1m"] = round(os.getloadavg()[0], 2)
    met = figures["quote_per_s"] >= TARGET_QUOTES_PER_S
    print(
        f"{'met   ' if met else 'MISSED'}  quote_per_s >= {TARGET_QUOTES_PER_S:,.0f}  ({figures['quote_per_s']:,.0f})"
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
