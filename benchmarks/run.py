"""Throughput and latency figures for the ledger on PostgreSQL.

    python benchmarks/run.py            # full run (a few minutes at most)
    python benchmarks/run.py --quick    # smaller counts, a smoke test

Prints human-readable figures as it goes; the last line is one JSON object
(see benchmarks/README.md). Every run uses a fresh schema on the server named
by LEDGER_TEST_DATABASE_URL and drops it at the end, also on error.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import psycopg
from psycopg import sql

# Measure the ledger of this checkout, not whatever copy is installed: run as a
# script, sys.path starts with benchmarks/, and an editable install may point at
# another working tree. The ledger's path is printed at the start of a run.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import checks as check_bench  # noqa: E402  (benchmarks/checks.py, beside this file)
import notify as notify_bench  # noqa: E402  (benchmarks/notify.py, beside this file)
import pricing as pricing_bench  # noqa: E402  (benchmarks/pricing.py, beside this file)
import scaling as scaling_bench  # noqa: E402  (benchmarks/scaling.py, beside this file)
import webhooks as webhook_bench  # noqa: E402  (benchmarks/webhooks.py, beside this file)

import ledger as ledger_package  # noqa: E402
from ledger import (  # noqa: E402
    AccountLimitReached,
    BatchRejected,
    CreditKind,
    GrantCredits,
    Ledger,
    ManualClock,
    Receipt,
    ReserveCredits,
    SettleReservation,
    SpendCredits,
)
from ledger.domain.credits import MAX_LIVE_BLOCKS, account_id_for  # noqa: E402
from ledger.views.credits import CreditView  # noqa: E402

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
MAX_BATCH = 10_000  # Ledger.execute_batch takes at most this many commands
# Renewals per execute_batch call: the ledger's maximum. (Before commit 788496d
# a save this large could hang for ever in psycopg's pipeline mode; the
# watchdog below turns such a hang into an error. --renew-batch overrides.)
DEFAULT_RENEW_BATCH = MAX_BATCH
DEFAULT_TIMEOUT_S = 600.0
TIME_BUDGET_S = 300.0  # a full run should take at most this long on a quiet 2-core machine
ADMIN_APP_NAME = "ledger-bench-admin"

# Targets: a figure is "met" when the check holds.
TARGET_COMMANDS_VS_RAW = 0.4
TARGET_BULK_GRANTS_PER_S = 10_000.0
TARGET_LOAD_RATIO = 2.0
TARGET_REBUILD_VS_DECODE = 0.35
TARGET_BULK_LAST_VS_FIRST = 0.9  # the last renewal round within 10% of the first
TARGET_REBUILD_PEAK_RSS_MB = 300.0
TARGET_HISTORY_RATIO = 2.0  # an account's command and snapshot vs one without the history

# The churned account: its live blocks (non-expiring, never drawn by the
# churn), and the grants per round of churn (a third spent, a third reserved
# and settled, a third left to lapse; under the live-block bound).
KEPT_BLOCKS = 10
CHURN_ROUND = 900

# The read-model phase: notifications per select_notifications page when
# decoding: the live projector's page (a rebuild reads pages of
# ledger.views.runner.REBUILD_PAGE_EVENTS, 5,000 since commit 86e9e7a).
DECODE_PAGE = 1_000


@dataclass(frozen=True)
class Sizes:
    """How much work each figure does."""

    warmup_commands: int
    commands: int
    raw_rows: int
    bulk_accounts: int
    open_batch: int
    renew_batch: int
    renew_rounds: int
    big_history_events: int
    history_batch: int
    load_repeats: int
    statement_sample: int
    log_events: int
    log_users: int
    webhook_customers: int
    many_grants: int
    account_repeats: int
    scaling_clients: tuple[int, ...] = scaling_bench.CLIENTS
    scaling_cell_s: float = scaling_bench.CELL_S

    @classmethod
    def full(cls) -> Sizes:
        return cls(
            warmup_commands=100,
            commands=1_000,
            raw_rows=1_000,
            bulk_accounts=10_000,
            open_batch=5_000,
            renew_batch=DEFAULT_RENEW_BATCH,
            renew_rounds=3,
            big_history_events=100_000,
            history_batch=5_000,
            load_repeats=20,
            statement_sample=20,
            log_events=1_000_000,
            log_users=60_000,
            webhook_customers=1_000,
            many_grants=10_000,
            account_repeats=50,
        )

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            warmup_commands=20,
            commands=200,
            raw_rows=200,
            bulk_accounts=1_000,
            open_batch=500,
            renew_batch=500,
            renew_rounds=3,
            big_history_events=5_000,
            history_batch=1_000,
            load_repeats=10,
            statement_sample=10,
            log_events=30_000,
            log_users=1_000,
            webhook_customers=150,
            many_grants=2_000,
            account_repeats=20,
            scaling_clients=scaling_bench.QUICK_CLIENTS,
            scaling_cell_s=scaling_bench.QUICK_CELL_S,
        )


def say(text: str) -> None:
    print(text, flush=True)


@contextmanager
def timed(label: str, before: Callable[[], None] | None = None) -> Iterator[None]:
    """Prints how long a phase took; ``before`` runs first (the watchdog's check)."""
    if before is not None:
        before()
    start = time.perf_counter()
    try:
        yield
    finally:
        say(f"  [{label}: {time.perf_counter() - start:.2f} s]")


# ------------------------------------------------------------------ set-up


def base_url() -> str:
    return os.environ.get("LEDGER_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)


def ledger_url(base: str, schema: str) -> str:
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}schema={schema}"


def admin_conninfo(base: str) -> str:
    """The server URL without the ledger's own query options (libpq rejects them)."""
    return urlsplit(base)._replace(query="", fragment="").geturl()


def admin_connect(base: str) -> psycopg.Connection[Any]:
    return psycopg.connect(admin_conninfo(base), autocommit=True, connect_timeout=10, application_name=ADMIN_APP_NAME)


def drop_schema(base: str, schema: str) -> None:
    with admin_connect(base) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


class Watchdog:
    """Aborts a run that overruns its deadline. Every connection of the run
    carries ``app_name`` (via PGAPPNAME). Past the deadline the watchdog
    terminates, once a second, those server sessions that have been busy on
    one statement for over 2 s (a hung pipelined INSERT shows as "active",
    waiting on ClientRead), so a blocked call fails; the next phase refuses to
    start. Either way the clean-up in ``run`` drops the schema."""

    def __init__(self, base: str, app_name: str, deadline_s: float) -> None:
        self.base = base
        self.app_name = app_name
        self.deadline_s = deadline_s
        self.fired = threading.Event()
        self._done = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="bench-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def check(self) -> None:
        if self.fired.is_set():
            raise TimeoutError(f"benchmark run exceeded {self.deadline_s:.0f} s")

    def remaining(self) -> float:
        """Seconds left before the deadline (at least 0)."""
        return max(0.0, self.deadline_s - (time.monotonic() - self._started))

    def _watch(self) -> None:
        if self._done.wait(self.deadline_s):
            return
        self.fired.set()
        say(f"!! watchdog: run exceeded {self.deadline_s:.0f} s; aborting")
        while not self._done.is_set():
            try:
                with admin_connect(self.base) as conn:
                    killed = conn.execute(
                        "SELECT pid, left(query, 60), pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = %s AND state = 'active' "
                        "AND query_start < now() - interval '2 seconds'",
                        (self.app_name,),
                    ).fetchall()
                for pid, query, _ in killed:
                    say(f"!! watchdog: terminated session {pid} stuck on: {query}")
            except psycopg.Error as exc:
                say(f"!! watchdog: {exc}")
            self._done.wait(1.0)


def load_average() -> float:
    """The 1-minute load average (other work on the machine skews every figure)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def far_future() -> datetime:
    return datetime.now(UTC) + timedelta(days=1)


# ----------------------------------------------------------------- figures


def raw_insert_commit_per_s(conninfo: str, schema: str, rows: int, warmup: int) -> float:
    """Single-row INSERT then COMMIT, one connection, autocommit off."""
    table = sql.Identifier(schema, "raw_insert_bench")
    with psycopg.connect(conninfo, autocommit=False) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (id BIGSERIAL PRIMARY KEY, payload TEXT NOT NULL)").format(table))
        conn.commit()
        insert = sql.SQL("INSERT INTO {} (payload) VALUES (%s)").format(table)

        def one(i: int) -> None:
            conn.execute(insert, (f"row {i}",))
            conn.commit()

        for i in range(warmup):
            one(i)
        start = time.perf_counter()
        for i in range(rows):
            one(warmup + i)
        elapsed = time.perf_counter() - start
    rate = rows / elapsed
    say(f"raw insert+commit: {rows} rows in {elapsed:.2f} s -> {rate:,.0f} rows/s")
    return rate


def reserve_settle_pairs(ledger: Ledger, user_id: UUID, tag: str, pairs: int, *, hint: bool) -> None:
    """Reserve 10 credits, then settle that hold for 7; ``pairs`` times."""
    expires_at = far_future()
    for i in range(pairs):
        receipt = ledger.execute(
            ReserveCredits(
                key=f"bench:{tag}:reserve:{i}",
                user_id=user_id,
                job_id=uuid.uuid4(),
                amount_credits=10,
                expires_at=expires_at,
            )
        )
        assert receipt.reservation_id is not None
        ledger.execute(
            SettleReservation(
                key=f"bench:{tag}:settle:{i}",
                reservation_id=receipt.reservation_id,
                actual_credits=7,
                user_id=user_id if hint else None,
            )
        )


def fund_account(ledger: Ledger, user_id: UUID, tag: str, credits: int) -> None:
    ledger.execute(
        GrantCredits(key=f"bench:{tag}:fund", user_id=user_id, amount_credits=credits, kind=CreditKind.PURCHASE)
    )


def commands_per_s(ledger: Ledger, commands: int, warmup: int, *, hint: bool) -> float:
    """Alternating reserve and settle on one funded account, one thread."""
    tag = "cmd-hint" if hint else "cmd-nohint"
    user_id = uuid.uuid4()
    fund_account(ledger, user_id, tag, 10 * (commands + warmup) + 1_000)
    reserve_settle_pairs(ledger, user_id, f"{tag}-warm", max(1, warmup // 2), hint=hint)
    pairs = commands // 2
    start = time.perf_counter()
    reserve_settle_pairs(ledger, user_id, tag, pairs, hint=hint)
    elapsed = time.perf_counter() - start
    rate = 2 * pairs / elapsed
    how = "settle with user_id hint" if hint else "settle without user_id hint"
    say(
        f"reserve/settle ({how}): {2 * pairs} commands in {elapsed:.2f} s "
        f"-> {rate:,.0f} commands/s ({1000 * elapsed / (2 * pairs):.2f} ms each)"
    )
    return rate


class StatementCounter:
    """Counts the SQL statements psycopg sends while active (this process only)."""

    def __init__(self) -> None:
        self.count = 0

    @contextmanager
    def counting(self) -> Iterator[None]:
        cursor_cls: Any = psycopg.Cursor
        original_execute: Callable[..., Any] = cursor_cls.execute
        original_executemany: Callable[..., Any] = cursor_cls.executemany

        def execute(cur: Any, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return original_execute(cur, *args, **kwargs)

        def executemany(cur: Any, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return original_executemany(cur, *args, **kwargs)

        cursor_cls.execute = execute
        cursor_cls.executemany = executemany
        try:
            yield
        finally:
            cursor_cls.execute = original_execute
            cursor_cls.executemany = original_executemany


def statements_per_command(ledger: Ledger, commands: int) -> float:
    """SQL statements (including pool pings) per reserve/settle command. Untimed."""
    user_id = uuid.uuid4()
    fund_account(ledger, user_id, "stmt", 10 * commands + 1_000)
    counter = StatementCounter()
    with counter.counting():
        reserve_settle_pairs(ledger, user_id, "stmt", commands // 2, hint=True)
    per_command = counter.count / (2 * (commands // 2))
    say(f"SQL statements per reserve/settle command (incl. pool pings): {per_command:.1f}")
    return per_command


def open_accounts(ledger: Ledger, users: list[UUID], batch: int) -> float:
    """Opens each account with one grant, through execute_batch; returns accounts/s."""
    start = time.perf_counter()
    for offset in range(0, len(users), batch):
        ledger.execute_batch(
            [
                GrantCredits(
                    key=f"bench:open:{u}",
                    user_id=u,
                    amount_credits=100,
                    kind=CreditKind.SUBSCRIPTION_GRANT,
                )
                for u in users[offset : offset + batch]
            ]
        )
    elapsed = time.perf_counter() - start
    rate = len(users) / elapsed
    say(f"opened {len(users):,} accounts (batches of {batch:,}) in {elapsed:.2f} s -> {rate:,.0f} accounts/s")
    return rate


def renewal_batches(users: list[UUID], batch: int, period: str) -> list[list[GrantCredits]]:
    expires_at = datetime.now(UTC) + timedelta(days=31)
    return [
        [
            GrantCredits(
                key=f"bench:renew:{period}:{u}",
                user_id=u,
                amount_credits=500,
                kind=CreditKind.SUBSCRIPTION_RENEW,
                expires_at=expires_at,
                reference_type="subscription",
                reference_id=period,
            )
            for u in users[offset : offset + batch]
        ]
        for offset in range(0, len(users), batch)
    ]


def bulk_grants_per_s(ledger: Ledger, users: list[UUID], batch: int, rounds: int) -> tuple[float, list[float]]:
    """``rounds`` renewal runs (one grant per existing account each), ``batch``
    grants per execute_batch call; the rate over all rounds, and each round's."""
    total = 0.0
    rates: list[float] = []
    for n in range(rounds):
        batches = renewal_batches(users, batch, f"2026-{n + 2:02d}")  # built outside the timing
        start = time.perf_counter()
        cpu = time.process_time()
        for commands in batches:
            ledger.execute_batch(commands)
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
        total += elapsed
        rates.append(len(users) / elapsed)
        say(
            f"renewal round {n + 1}: {len(users):,} grants to existing accounts (batches of {batch:,}) "
            f"in {elapsed:.2f} s ({cpu:.2f} s of client CPU) -> {len(users) / elapsed:,.0f} grants/s; "
            f"load average {load_average():.2f}"
        )
    rate = rounds * len(users) / total
    say(f"renewal grants over {rounds} round(s): {rate:,.0f} grants/s; last round vs first {rates[-1] / rates[0]:.2f}")
    return rate, rates


def bulk_figures(ledger: Ledger, sizes: Sizes) -> dict[str, float]:
    """Opens ``sizes.bulk_accounts`` accounts, then renews them round after round."""
    users = [uuid.uuid4() for _ in range(sizes.bulk_accounts)]
    opened = open_accounts(ledger, users, sizes.open_batch)
    bulk, rates = bulk_grants_per_s(ledger, users, sizes.renew_batch, sizes.renew_rounds)
    return {
        "bulk_grants_per_s": round(bulk, 1),
        "bulk_open_accounts_per_s": round(opened, 1),
        # Context: a round must not be slower than the one before it replayed.
        "bulk_first_round_grants_per_s": round(rates[0], 1),
        "bulk_last_round_grants_per_s": round(rates[-1], 1),
        "bulk_last_vs_first_round": round(rates[-1] / rates[0], 3),
    }


def build_history(ledger: Ledger, user_id: UUID, events: int, batch: int, tag: str) -> None:
    """Gives the account exactly ``events`` events: Opened, one Granted, then
    spends of 1 credit (so the account holds a single block throughout)."""
    spends = events - 2
    assert spends >= 0
    commands: list[GrantCredits | SpendCredits] = [
        GrantCredits(key=f"bench:{tag}:grant", user_id=user_id, amount_credits=spends + 1_000, kind=CreditKind.PURCHASE)
    ]
    commands.extend(
        SpendCredits(key=f"bench:{tag}:spend:{i}", user_id=user_id, amount_credits=1) for i in range(spends)
    )
    for offset in range(0, len(commands), batch):
        ledger.execute_batch(commands[offset : offset + batch])
    version = ledger.history(user_id, after_version=events - 1, limit=10)[-1].version
    assert version == events, f"expected {events} events, the account has {version}"


def median_load_ms(ledger: Ledger, user_id: UUID, repeats: int) -> float:
    for _ in range(2):  # warm-up: prepared statements, pool
        ledger.balance(user_id)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        ledger.balance(user_id)
        samples.append(1000 * (time.perf_counter() - start))
    return statistics.median(samples)


def load_times(ledger: Ledger, big_events: int, batch: int, repeats: int) -> tuple[float, float]:
    """Median ms of ledger.balance() for a 10-event and a ``big_events`` account."""
    small, big = uuid.uuid4(), uuid.uuid4()
    build_history(ledger, small, 10, batch, "small")
    start = time.perf_counter()
    build_history(ledger, big, big_events, batch, "big")
    elapsed = time.perf_counter() - start
    say(
        f"built a {big_events:,}-event history (batches of {batch:,}) in {elapsed:.2f} s "
        f"-> {(big_events - 1) / elapsed:,.0f} commands/s"
    )
    ms_small = median_load_ms(ledger, small, repeats)
    ms_big = median_load_ms(ledger, big, repeats)
    say(f"load (balance) median of {repeats}: 10 events {ms_small:.2f} ms, {big_events:,} events {ms_big:.2f} ms")
    return ms_small, ms_big


# ------------------------------------------------------- bounded accounts


def kept_grants(user: UUID, tag: str) -> list[GrantCredits]:
    """The blocks that stay live: 1,000 credits each, non-expiring, so the
    churn's expiring blocks are drawn before them."""
    return [
        GrantCredits(key=f"bench:{tag}:keep:{i}", user_id=user, amount_credits=1_000, kind=CreditKind.PURCHASE)
        for i in range(KEPT_BLOCKS)
    ]


def churn_round(ledger: Ledger, clock: ManualClock, user: UUID, grants: int, tag: str) -> None:
    """``grants`` grants of 10 credits expiring in 30 s; a third of them spent,
    a third reserved and then settled (closed holds), and the clock moved on
    2 minutes so the last third lapse (recorded by the next command)."""
    expires_at = clock.now() + timedelta(seconds=30)
    third = grants // 3
    first: list[GrantCredits | SpendCredits | ReserveCredits] = [
        GrantCredits(
            key=f"bench:{tag}:g:{i}", user_id=user, amount_credits=10, kind=CreditKind.PURCHASE, expires_at=expires_at
        )
        for i in range(grants)
    ]
    first.extend(SpendCredits(key=f"bench:{tag}:s:{i}", user_id=user, amount_credits=10) for i in range(third))
    first.extend(
        ReserveCredits(
            key=f"bench:{tag}:r:{i}",
            user_id=user,
            job_id=uuid.uuid4(),
            amount_credits=10,
            expires_at=clock.now() + timedelta(seconds=60),
        )
        for i in range(third)
    )
    receipts = ledger.execute_batch(first)
    settles = []
    for i, reserved in enumerate(receipts[grants + third :]):
        assert reserved.reservation_id is not None
        settles.append(
            SettleReservation(
                key=f"bench:{tag}:settle:{i}", reservation_id=reserved.reservation_id, actual_credits=10, user_id=user
            )
        )
    ledger.execute_batch(settles)
    clock.advance(timedelta(minutes=2))


def churned_account(url: str, user: UUID, grants: int) -> float:
    """Gives ``user`` ``grants`` grants, all but KEPT_BLOCKS of them spent or
    lapsed, with closed holds between; returns the seconds it took. A ledger
    of its own whose clock runs from a day ago, so that blocks lapse without
    waiting and every event is older than the measurements that follow."""
    clock = ManualClock(datetime.now(UTC) - timedelta(days=1))
    start = time.perf_counter()
    with Ledger(url, clock=clock) as builder:
        builder.execute_batch(kept_grants(user, "churned"))
        done = KEPT_BLOCKS
        round_no = 0
        while done < grants:
            count = min(CHURN_ROUND, grants - done)
            churn_round(builder, clock, user, count, f"churn:{round_no}")
            done += count
            round_no += 1
        builder.spend(user, 1, key="bench:churned:lapse")  # records the last round's lapses
    return time.perf_counter() - start


def snapshot_bytes(ledger: Ledger, user: UUID) -> int:
    """The size of a snapshot of the account as it is now, as stored."""
    account_id = account_id_for(user)
    ledger.app.take_snapshot(account_id)
    assert ledger.app.snapshots is not None
    return len(ledger.app.snapshots.recorder.select_events(account_id, desc=True, limit=1)[0].state)


def stored_bytes(ledger: Ledger, user: UUID) -> tuple[int, int, int]:
    """(events, bytes of its events, bytes of all its snapshots) of the account."""
    account_id = account_id_for(user)
    schema = ledger.config.pg_schema
    with admin_connect(base_url()) as conn:
        events, event_bytes = conn.execute(
            sql.SQL("SELECT count(*), coalesce(sum(length(state)), 0) FROM {} WHERE originator_id = %s").format(
                sql.Identifier(schema, "ledger_events")
            ),
            (account_id,),
        ).fetchone() or (0, 0)
        (snapshots_bytes,) = conn.execute(
            sql.SQL("SELECT coalesce(sum(length(state)), 0) FROM {} WHERE originator_id = %s").format(
                sql.Identifier(schema, "ledger_snapshots")
            ),
            (account_id,),
        ).fetchone() or (0,)
    return int(events), int(event_bytes), int(snapshots_bytes)


def reserve_and_spend_ms(ledger: Ledger, users: dict[str, UUID], repeats: int) -> dict[str, float]:
    """Median ms of a reserve and a spend, one after the other, on each
    account. The accounts take turns, in an order that rotates, so load on
    the machine and the first-in-a-round cost hit all alike."""
    expires_at = far_future()
    names = list(users)
    samples: dict[str, list[float]] = {name: [] for name in names}
    warmups = 5  # statements, pool, cache
    for i in range(repeats + warmups):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            ledger.reserve(users[name], uuid.uuid4(), 5, expires_at, key=f"bench:account:{name}:reserve:{i}")
            ledger.spend(users[name], 5, key=f"bench:account:{name}:spend:{i}")
            if i >= warmups:
                samples[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(found) for name, found in samples.items()}


def account_figures(ledger: Ledger, url: str, sizes: Sizes) -> dict[str, float]:
    """An account with ``many_grants`` grants, nearly all spent or lapsed,
    against one with 10 grants; and an account at the live-block bound."""
    churned, small, full = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    build_s = churned_account(url, churned, sizes.many_grants)
    events, event_bytes, all_snapshot_bytes = stored_bytes(ledger, churned)
    say(
        f"an account given {sizes.many_grants:,} grants ({KEPT_BLOCKS} kept, the rest spent, settled from holds "
        f"or lapsed): {build_s:.2f} s, {events:,} events ({event_bytes:,} bytes), its snapshots {all_snapshot_bytes:,} "
        "bytes in all"
    )
    ledger.execute_batch(kept_grants(small, "ten-grants"))
    start = time.perf_counter()
    ledger.execute_batch(
        [
            GrantCredits(key=f"bench:full:{i}", user_id=full, amount_credits=1_000, kind=CreditKind.PURCHASE)
            for i in range(MAX_LIVE_BLOCKS)
        ]
    )
    full_s = time.perf_counter() - start
    start = time.perf_counter()
    try:  # the shape that took 46 s before the bound: refused at the first grant past it
        ledger.execute_batch(
            [
                GrantCredits(key=f"bench:over:{i}", user_id=full, amount_credits=1, kind=CreditKind.PURCHASE)
                for i in range(sizes.many_grants)
            ]
        )
        raise AssertionError("a grant past the live-block bound was accepted")
    except BatchRejected as rejected:
        assert isinstance(rejected.cause, AccountLimitReached)
    refused_ms = 1000 * (time.perf_counter() - start)
    bytes_churned, bytes_small = snapshot_bytes(ledger, churned), snapshot_bytes(ledger, small)
    ms = reserve_and_spend_ms(ledger, {"churned": churned, "small": small, "full": full}, sizes.account_repeats)
    say(
        f"reserve + spend, median of {sizes.account_repeats}: {ms['churned']:.2f} ms on the account given "
        f"{sizes.many_grants:,} grants, {ms['small']:.2f} ms on one given 10, {ms['full']:.2f} ms on one with "
        f"{MAX_LIVE_BLOCKS:,} live blocks"
    )
    say(
        f"snapshot bytes: {bytes_churned:,} for the account given {sizes.many_grants:,} grants, "
        f"{bytes_small:,} for the one given 10 (both with {KEPT_BLOCKS} live blocks)"
    )
    say(
        f"{MAX_LIVE_BLOCKS:,} grants to one account in one batch: {full_s:.2f} s; {sizes.many_grants:,} more in "
        f"one batch refused (AccountLimitReached) in {refused_ms:.0f} ms"
    )
    return {
        "reserve_ms_10k_open_blocks": round(ms["churned"], 3),
        "reserve_ms_10_grants": round(ms["small"], 3),
        "snapshot_bytes_10k_grants": bytes_churned,
        "snapshot_bytes_10_grants": bytes_small,
        # Context, not targets:
        "many_grants": sizes.many_grants,
        "many_grants_build_s": round(build_s, 2),
        "many_grants_events": events,
        "many_grants_event_bytes": event_bytes,
        "many_grants_all_snapshot_bytes": all_snapshot_bytes,
        "reserve_ms_1k_live_blocks": round(ms["full"], 3),
        "grants_1k_live_blocks_s": round(full_s, 2),
        "grants_past_bound_refused_ms": round(refused_ms, 1),
    }


# -------------------------------------------------------------- read models


def fill_log(ledger: Ledger, target_events: int, user_count: int, batch: int) -> tuple[int, float]:
    """Tops the event log up to at least ``target_events`` notifications through
    ``execute_batch``; returns (events added, seconds).

    ``user_count`` users, in rounds; per user and round a grant, a spend and a
    reserve in one batch, then the settle of that hold (with the ``user_id``
    hint) and a second spend in the next. A command records its account's event
    plus a CommandRecord event; a reserve and a settle also record an event of
    the HoldRecord aggregate. So 12 events per user and round (13 the first
    time: the account's Opened), of which 5 (6) are CreditAccount events, the
    ones the views project."""
    users = [uuid.uuid4() for _ in range(user_count)]
    per_batch = max(1, batch // 3)  # the first batch of a pair has 3 commands per user
    expires_at = far_future()
    head = ledger.app.recorder.max_notification_id() or 0
    first_head = head
    start = time.perf_counter()
    round_no = 0
    while head < target_events:
        round_no += 1
        for offset in range(0, len(users), per_batch):
            if head >= target_events:
                break
            chunk = users[offset : offset + per_batch]
            first: list[GrantCredits | SpendCredits | ReserveCredits] = []
            for u in chunk:
                tag = f"bench:log:{round_no}:{u}"
                first.append(GrantCredits(key=f"{tag}:grant", user_id=u, amount_credits=100, kind=CreditKind.PURCHASE))
                first.append(SpendCredits(key=f"{tag}:spend", user_id=u, amount_credits=10))
                first.append(
                    ReserveCredits(
                        key=f"{tag}:reserve",
                        user_id=u,
                        job_id=uuid.uuid4(),
                        amount_credits=20,
                        expires_at=expires_at,
                    )
                )
            receipts = ledger.execute_batch(first)
            second: list[SettleReservation | SpendCredits] = []
            for u, reserved in zip(chunk, receipts[2::3], strict=True):
                assert reserved.reservation_id is not None
                tag = f"bench:log:{round_no}:{u}"
                second.append(
                    SettleReservation(
                        key=f"{tag}:settle", reservation_id=reserved.reservation_id, actual_credits=15, user_id=u
                    )
                )
                second.append(SpendCredits(key=f"{tag}:spend2", user_id=u, amount_credits=5))
            head = last_position(ledger.execute_batch(second))
    return head - first_head, time.perf_counter() - start


def last_position(receipts: list[Receipt]) -> int:
    position = receipts[-1].position
    assert position is not None
    return position


def log_counts(ledger: Ledger, topics: list[str]) -> tuple[int, int, int]:
    """Events in the log; how many carry one of ``topics``; how many are
    CreditAccount events (the CreditView's topics)."""
    recorder: Any = ledger.app.recorder
    table = sql.Identifier(recorder.datastore.schema, recorder.events_table_name)
    query = sql.SQL(
        "SELECT count(*), count(*) FILTER (WHERE topic = ANY(%s)), count(*) FILTER (WHERE topic = ANY(%s)) FROM {}"
    ).format(table)
    with psycopg.connect(ledger.config.conninfo()) as conn:
        row = conn.execute(query, (topics, list(CreditView.topics))).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def events_table_statistics(ledger: Ledger, *, analyze: bool) -> bool:
    """Says whether the planner has statistics for the events table (it reads
    pages of the log by notification id and topic; without statistics a page of
    5,000 can be planned as a scan of the whole rest of the log), and with
    ``analyze`` first runs ANALYZE on it, as autovacuum would in time. Returns
    whether the table has statistics."""
    recorder: Any = ledger.app.recorder
    schema, table = recorder.datastore.schema, recorder.events_table_name
    with psycopg.connect(ledger.config.conninfo(), autocommit=True) as conn:
        if analyze:
            conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(schema, table)))
        row = conn.execute(
            "SELECT c.reltuples, current_setting('autovacuum') FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
            (schema, table),
        ).fetchone()
    assert row is not None
    reltuples, autovacuum = float(row[0]), str(row[1])
    analyzed = reltuples >= 0
    state = f"about {reltuples:,.0f} rows" if analyzed else "none (never analyzed)"
    how = " after ANALYZE (--analyze)" if analyze else ""
    say(f"planner statistics of {table}{how}: {state}; autovacuum is {autovacuum} on this server")
    return analyzed


def drop_rebuild_schemas(base: str, schema: str) -> None:
    """Drops the schemas ``Views.build_aside`` made for this run's schema and
    left behind (the rebuild child drops its own unless it dies): their names
    start with ``<schema>_rebuild``."""
    prefix = f"{schema}_rebuild"
    with admin_connect(base) as conn:
        names = [
            row[0]
            for row in conn.execute(
                "SELECT nspname FROM pg_namespace WHERE left(nspname, %s) = %s", (len(prefix), prefix)
            )
        ]
        for name in names:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


CHILD_URL_ENV = "LEDGER_BENCH_CHILD_URL"  # the ledger URL, kept off the command line
PIPELINED_REBUILD_ENV = "LEDGER_BENCH_PIPELINED_REBUILD"  # set: the rebuild child pipelines (a thread reads ahead)
PROFILE_ENV = "LEDGER_BENCH_PROFILE_REBUILD"  # --profile-rebuild: where the child writes its cProfile stats


def status_kb(field: str, pid: int | str = "self") -> int | None:
    """A memory figure (kB) from /proc/<pid>/status (Linux), or None."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def own_peak_rss_kb() -> int:
    """This process's peak resident memory in kB.

    VmHWM, the high-water mark of the process's own address space, on Linux.
    Not ``ru_maxrss``: Linux carries a parent's peak RSS over into a child it
    spawns (fork and exec both keep it), so a child's ``ru_maxrss``, and the
    parent's ``RUSAGE_CHILDREN`` figure, are at least the parent's RSS at the
    time (179 MiB after filling the log, while the rebuild itself peaks lower).
    Elsewhere ``ru_maxrss`` is the fallback: an upper bound."""
    hwm = status_kb("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss // 1024 if sys.platform == "darwin" else maxrss  # bytes on macOS


def child_rebuild(url: str) -> dict[str, Any]:
    """In a fresh process: ``Views.build_aside()`` over the whole log, timed;
    the aside tables are dropped afterwards."""
    with Ledger(url) as ledger:
        views = ledger.views
        head = views.projector.head()
        projected = [0]

        def progress(p: Any) -> None:
            projected[0] = p.events

        profile_path = os.environ.get(PROFILE_ENV)
        profiler = cProfile.Profile() if profile_path else None
        cpu = time.process_time()
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        aside = views.build_aside(progress, pipelined=bool(os.environ.get(PIPELINED_REBUILD_ENV)))
        if profiler is not None:
            profiler.disable()
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
        try:
            position = aside.position()
        finally:
            ledger.views.drop_aside(aside)
    if profiler is not None and profile_path:
        profiler.dump_stats(profile_path)
        print(f"cProfile of Views.build_aside() written to {profile_path}; the top 30 by own time:", file=sys.stderr)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(30)
    return {
        "events": projected[0],
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "head": head,
        "position": position,
        "peak_rss_kb": own_peak_rss_kb(),
    }


def child_decode(url: str) -> dict[str, Any]:
    """In a fresh process: the same events read and decoded with the recorder
    alone, a page of DECODE_PAGE at a time, no writes."""
    with Ledger(url) as ledger:
        topics = ledger.views.projector.topics
        recorder, mapper = ledger.app.recorder, ledger.app.mapper
        count = 0
        position = 1
        cpu = time.process_time()
        start = time.perf_counter()
        while True:
            page = recorder.select_notifications(position, limit=DECODE_PAGE, topics=topics)
            events = [(n.id, mapper.to_domain_event(n)) for n in page]
            count += len(events)
            if len(page) < DECODE_PAGE:
                break
            position = page[-1].id + 1
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
    return {
        "events": count,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "peak_rss_kb": own_peak_rss_kb(),
    }


CHILDREN: dict[str, Callable[[str], dict[str, Any]]] = {"rebuild": child_rebuild, "decode": child_decode}


def run_child(mode: str, url: str, timeout_s: float) -> dict[str, Any]:
    """Runs ``mode`` in a fresh interpreter (this file, ``--child``); its stdout's
    last line is a JSON object. Its connections inherit PGAPPNAME (the watchdog).
    While it runs, its RSS is sampled every 0.1 s from outside (Linux), a check
    on the peak it reports itself."""
    started = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--child", mode],
        env={**os.environ, CHILD_URL_ENV: url},
        stdout=subprocess.PIPE,
        text=True,
    )
    sampled_kb = 0
    while True:
        sampled_kb = max(sampled_kb, status_kb("VmRSS", proc.pid) or 0)
        try:
            out, _ = proc.communicate(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                proc.kill()
                proc.communicate()
                raise
    if proc.returncode != 0:
        raise RuntimeError(f"the {mode} child process failed with exit code {proc.returncode}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - started
    result["sampled_rss_kb"] = sampled_kb
    return result


def decode_once(url: str, expected: int, watchdog: Watchdog, when: str) -> dict[str, Any]:
    with timed(f"decode {when} (child process)", watchdog.check):
        decode = run_child("decode", url, watchdog.remaining() + 60)
    say(
        f"decode {when} (select_notifications + to_domain_event): {decode['events']:,} events in "
        f"{decode['seconds']:.2f} s -> {decode['events'] / decode['seconds']:,.0f} events/s, "
        f"{decode['cpu_seconds']:.2f} s of CPU; peak RSS {decode['peak_rss_kb'] / 1024:,.1f} MiB"
    )
    if decode["events"] != expected:
        say(f"!! decoded {decode['events']:,} events, the log holds {expected:,}")
    return decode


def read_model_figures(
    ledger: Ledger, url: str, sizes: Sizes, watchdog: Watchdog, *, analyze: bool
) -> dict[str, float]:
    """Fills the log to ``sizes.log_events``, then rebuilds the views from it in
    a child process, and decodes the same events in another, before the rebuild
    and again after it."""
    topics = ledger.views.projector.topics
    with timed("fill log", watchdog.check):
        added, seconds = fill_log(ledger, sizes.log_events, sizes.log_users, MAX_BATCH)
        log_events, projectable, credit_events = log_counts(ledger, topics)
    fill_rate = added / seconds if added else 0.0
    say(
        f"filled the log: {added:,} events in {seconds:.2f} s -> {fill_rate:,.0f} events/s "
        f"({sizes.log_users:,} users, batches of up to {MAX_BATCH:,} commands)"
    )
    say(
        f"log: {log_events:,} events, of which the views project {projectable:,} "
        f"({credit_events:,} CreditAccount events; the other {log_events - projectable:,} events are "
        "command records and reservations)"
    )
    with timed("events table statistics", watchdog.check):
        analyzed = events_table_statistics(ledger, analyze=analyze)
    decodes = [decode_once(url, projectable, watchdog, "before the rebuild")]
    with timed("rebuild (child process)", watchdog.check):
        rebuild = run_child("rebuild", url, watchdog.remaining() + 60)
    rebuild_rate = rebuild["events"] / rebuild["seconds"]
    rss_mb = rebuild["peak_rss_kb"] / 1024
    say(
        f"rebuild (Views.build_aside): {rebuild['events']:,} events projected in {rebuild['seconds']:.2f} s "
        f"-> {rebuild_rate:,.0f} events/s, {rebuild['cpu_seconds']:.2f} s of CPU in the process (which took "
        f"{rebuild['process_seconds']:.2f} s with start-up and clean-up); peak RSS {rss_mb:,.1f} MiB "
        f"(sampled from outside: {rebuild['sampled_rss_kb'] / 1024:,.1f} MiB)"
    )
    if rebuild["events"] != projectable:
        say(f"!! the rebuild projected {rebuild['events']:,} events, the log holds {projectable:,}")
    decodes.append(decode_once(url, projectable, watchdog, "after the rebuild"))
    # The faster decode is the baseline: a burst of outside load during one
    # decode cannot flatter the ratio.
    decode = min(decodes, key=lambda d: d["seconds"])
    decode_rate = decode["events"] / decode["seconds"]
    say(f"rebuild_vs_decode: {rebuild_rate / decode_rate:.3f} (against the faster decode)")
    return {
        "rebuild_events_per_s": round(rebuild_rate, 1),
        "raw_decode_events_per_s": round(decode_rate, 1),
        "rebuild_vs_decode": round(rebuild_rate / decode_rate, 3),
        "rebuild_peak_rss_mb": round(rss_mb, 1),
        # Context, not targets:
        "log_events": log_events,
        "projected_events": rebuild["events"],
        "rebuild_s": round(rebuild["seconds"], 2),
        "rebuild_cpu_s": round(rebuild["cpu_seconds"], 2),
        "decode_s": round(decode["seconds"], 2),
        "decode_cpu_s": round(decode["cpu_seconds"], 2),
        "fill_log_events_per_s": round(fill_rate, 1),
        "events_table_analyzed": int(analyzed),
    }


# -------------------------------------------------------------------- main


def report_targets(figures: dict[str, float]) -> None:
    checks = [
        (
            f"commands_vs_raw >= {TARGET_COMMANDS_VS_RAW}",
            figures["commands_vs_raw"] >= TARGET_COMMANDS_VS_RAW,
            f"{figures['commands_vs_raw']:.2f}",
        ),
        (
            f"bulk_grants_per_s >= {TARGET_BULK_GRANTS_PER_S:,.0f}",
            figures["bulk_grants_per_s"] >= TARGET_BULK_GRANTS_PER_S,
            f"{figures['bulk_grants_per_s']:,.0f}",
        ),
        (
            f"bulk_last_vs_first_round >= {TARGET_BULK_LAST_VS_FIRST:g}",
            figures["bulk_last_vs_first_round"] >= TARGET_BULK_LAST_VS_FIRST,
            f"{figures['bulk_last_round_grants_per_s']:,.0f} vs {figures['bulk_first_round_grants_per_s']:,.0f}",
        ),
        (
            f"load_ms_100k_events <= {TARGET_LOAD_RATIO:g} x load_ms_10_events",
            figures["load_ms_100k_events"] <= TARGET_LOAD_RATIO * figures["load_ms_10_events"],
            f"{figures['load_ms_100k_events']:.2f} vs {figures['load_ms_10_events']:.2f} ms",
        ),
        (
            f"reserve_ms_10k_open_blocks <= {TARGET_HISTORY_RATIO:g} x reserve_ms_10_grants",
            figures["reserve_ms_10k_open_blocks"] <= TARGET_HISTORY_RATIO * figures["reserve_ms_10_grants"],
            f"{figures['reserve_ms_10k_open_blocks']:.2f} vs {figures['reserve_ms_10_grants']:.2f} ms "
            f"({figures['many_grants']:,} grants)",
        ),
        (
            f"snapshot_bytes_10k_grants <= {TARGET_HISTORY_RATIO:g} x snapshot_bytes_10_grants",
            figures["snapshot_bytes_10k_grants"] <= TARGET_HISTORY_RATIO * figures["snapshot_bytes_10_grants"],
            f"{figures['snapshot_bytes_10k_grants']:,} vs {figures['snapshot_bytes_10_grants']:,} bytes",
        ),
        (
            f"rebuild_vs_decode >= {TARGET_REBUILD_VS_DECODE}",
            figures["rebuild_vs_decode"] >= TARGET_REBUILD_VS_DECODE,
            f"{figures['rebuild_vs_decode']:.3f}: {figures['rebuild_events_per_s']:,.0f} vs "
            f"{figures['raw_decode_events_per_s']:,.0f} events/s",
        ),
        (
            f"webhooks_per_s >= {webhook_bench.TARGET_WEBHOOKS_PER_S:,.0f}",
            figures["webhooks_per_s"] >= webhook_bench.TARGET_WEBHOOKS_PER_S,
            f"{figures['webhooks_per_s']:,.0f} ({figures['webhooks_vs_raw']:.2f} x the raw commit rate)",
        ),
        (
            f"duplicate_webhooks_per_s >= {webhook_bench.TARGET_DUPLICATES_PER_S:,.0f}",
            figures["duplicate_webhooks_per_s"] >= webhook_bench.TARGET_DUPLICATES_PER_S,
            f"{figures['duplicate_webhooks_per_s']:,.0f}",
        ),
        (
            f"rebuild_peak_rss_mb < {TARGET_REBUILD_PEAK_RSS_MB:g}",
            figures["rebuild_peak_rss_mb"] < TARGET_REBUILD_PEAK_RSS_MB,
            f"{figures['rebuild_peak_rss_mb']:,.0f} MiB over {figures['projected_events']:,.0f} projected events",
        ),
        (
            f"quote_per_s >= {pricing_bench.TARGET_QUOTES_PER_S:,.0f}",
            figures["quote_per_s"] >= pricing_bench.TARGET_QUOTES_PER_S,
            f"{figures['quote_per_s']:,.0f} ({figures['quote_per_s_fresh']:,.0f} fresh from the store)",
        ),
    ]
    checks.append(
        (
            f"check_per_s >= {check_bench.TARGET_CHECKS_PER_S:,.0f}",
            figures["check_per_s"] >= check_bench.TARGET_CHECKS_PER_S,
            f"{figures['check_per_s']:,.0f} (uncached {figures['check_uncached_per_s']:,.0f})",
        )
    )
    if "notify_lag_ms_p99" in figures:
        checks.append(
            (
                f"notify_lag_ms_p99 < {notify_bench.TARGET_LAG_MS_P99:g}",
                figures["notify_lag_ms_p99"] < notify_bench.TARGET_LAG_MS_P99,
                f"{figures['notify_lag_ms_p99']:.0f} ms at {figures['notify_commands_per_s']:.0f} commands/s",
            )
        )
    say("targets:")
    for label, met, value in checks:
        say(f"  {'met   ' if met else 'MISSED'}  {label}  ({value})")


def measure(
    ledger: Ledger, url: str, schema: str, sizes: Sizes, watchdog: Watchdog, *, analyze: bool
) -> dict[str, float]:
    check = watchdog.check
    with timed("raw baseline", check):
        raw = raw_insert_commit_per_s(ledger.config.conninfo(), schema, sizes.raw_rows, sizes.warmup_commands)
    with timed("commands", check):
        cmds = commands_per_s(ledger, sizes.commands, sizes.warmup_commands, hint=True)
        cmds_nohint = commands_per_s(ledger, sizes.commands, sizes.warmup_commands, hint=False)
        stmts = statements_per_command(ledger, sizes.statement_sample)
    say(f"commands_vs_raw: {cmds / raw:.2f}")
    with timed("bulk", check):
        bulk = bulk_figures(ledger, sizes)
    with timed("loads", check):
        ms_small, ms_big = load_times(ledger, sizes.big_history_events, sizes.history_batch, sizes.load_repeats)
    with timed("accounts", check):
        accounts = account_figures(ledger, url, sizes)
    return {
        "commands_per_s": round(cmds, 1),
        "raw_insert_commit_per_s": round(raw, 1),
        "commands_vs_raw": round(cmds / raw, 3),
        **bulk,
        "load_ms_10_events": round(ms_small, 3),
        "load_ms_100k_events": round(ms_big, 3),
        # Context, not targets:
        "commands_per_s_without_hint": round(cmds_nohint, 1),
        "sql_statements_per_command": round(stmts, 2),
        "renew_batch": sizes.renew_batch,
        "big_history_events": sizes.big_history_events,
        **accounts,
        **read_model_figures(ledger, url, sizes, watchdog, analyze=analyze),
    }


@dataclass
class Run:
    """A run's fresh schema, its ledger URL and its watchdog (``fresh_run``)."""

    base: str
    schema: str
    url: str
    watchdog: Watchdog


@contextmanager
def fresh_run(timeout_s: float, heading: str, figures: dict[str, float]) -> Iterator[Run]:
    """A fresh schema and a watchdog for one run; afterwards, also on error,
    the schema (and any rebuild's) is dropped, and ``figures`` gets the
    elapsed time and the load average."""
    base = base_url()
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    app_name = f"ledger-{schema}"
    os.environ["PGAPPNAME"] = app_name  # tags the ledger's pooled connections for the watchdog
    say(f"ledger {os.path.dirname(ledger_package.__file__)}; PostgreSQL {admin_conninfo(base)}, schema {schema}")
    say(f"{heading}load average {load_average():.2f}")
    started = time.perf_counter()
    watchdog = Watchdog(base, app_name, timeout_s)
    watchdog.start()
    try:
        yield Run(base, schema, ledger_url(base, schema), watchdog)
    except Exception:
        if watchdog.fired.is_set():
            say(f"!! aborted by the watchdog after {timeout_s:.0f} s (a call hung or the run was too slow)")
        raise
    finally:
        watchdog.stop()
        with timed("drop schema"):
            drop_rebuild_schemas(base, schema)
            drop_schema(base, schema)
        say(f"elapsed: {time.perf_counter() - started:.1f} s; load average {load_average():.2f}")
    figures["elapsed_s"] = round(time.perf_counter() - started, 1)
    figures["load_average_1m"] = round(load_average(), 2)


def run(sizes: Sizes, timeout_s: float, *, analyze: bool = False) -> dict[str, float]:
    """Measures everything on a fresh schema; drops it afterwards, also on error."""
    figures: dict[str, float] = {}
    with fresh_run(timeout_s, "", figures) as r:
        with Ledger(r.url) as ledger:
            figures.update(measure(ledger, r.url, r.schema, sizes, r.watchdog, analyze=analyze))
        figures.update(webhook_figures(r.base, sizes, figures["raw_insert_commit_per_s"], r.watchdog))
        figures.update(check_figures(r.base, sizes, r.watchdog))
        figures.update(scaling_figures(r.base, sizes, r.watchdog))
        figures.update(pricing_figures(r.base, sizes, r.watchdog))
        figures.update(notify_figures(r.base, sizes, r.watchdog))
    return figures


def notify_figures(base: str, sizes: Sizes, watchdog: Watchdog) -> dict[str, Any]:
    """benchmarks/notify.py's figures (commit to delivery through ``python -m
    ledger notify``), on a schema of their own; the quick run measures 5 s."""
    schema = f"bench_notify_{uuid.uuid4().hex[:12]}"
    seconds = 5.0 if sizes.commands < Sizes.full().commands else 20.0
    try:
        with timed("notify", watchdog.check):
            found = notify_bench.run(base, schema, seconds, notify_bench.DEFAULT_RATE, say)
    finally:
        drop_schema(base, schema)
    return {k: v for k, v in found.items() if k.startswith("notify_") and k != "notify_met"}


#: The groups of figures ``--only`` can run by themselves.
FIGURE_GROUPS = ("bulk", "rebuild")


def run_only(sizes: Sizes, timeout_s: float, groups: set[str], *, analyze: bool = False) -> dict[str, float]:
    """Only some groups of figures (``--only``), on a fresh schema dropped
    afterwards. ``rebuild`` also rebuilds with the pipeline (a thread reading
    ahead), for a comparison from the same run (``rebuild_pipelined_vs_decode``)."""
    figures: dict[str, float] = {}
    with fresh_run(timeout_s, f"only {', '.join(sorted(groups))}; ", figures) as r, Ledger(r.url) as ledger:
        if "bulk" in groups:
            with timed("bulk", r.watchdog.check):
                figures.update(bulk_figures(ledger, sizes))
        if "rebuild" in groups:
            figures.update(read_model_figures(ledger, r.url, sizes, r.watchdog, analyze=analyze))
            figures.update(pipelined_rebuild_figures(r.url, figures["raw_decode_events_per_s"], r.watchdog))
    return figures


def pipelined_rebuild_figures(url: str, decode_per_s: float, watchdog: Watchdog) -> dict[str, float]:
    """The same rebuild with the pipeline, in a child process of its own."""
    os.environ[PIPELINED_REBUILD_ENV] = "1"
    try:
        with timed("rebuild with the pipeline (child process)", watchdog.check):
            piped = run_child("rebuild", url, watchdog.remaining() + 60)
    finally:
        del os.environ[PIPELINED_REBUILD_ENV]
    rate = piped["events"] / piped["seconds"]
    say(
        f"rebuild with the pipeline: {piped['events']:,} events in {piped['seconds']:.2f} s "
        f"-> {rate:,.0f} events/s; peak RSS {piped['peak_rss_kb'] / 1024:,.1f} MiB"
    )
    return {
        "rebuild_pipelined_events_per_s": round(rate, 1),
        "rebuild_pipelined_vs_decode": round(rate / decode_per_s, 3),
        "rebuild_pipelined_peak_rss_mb": round(piped["peak_rss_kb"] / 1024, 1),
    }


def webhook_figures(base: str, sizes: Sizes, raw_per_s: float, watchdog: Watchdog) -> dict[str, Any]:
    """benchmarks/webhooks.py's figures (Lemon Squeezy deliveries), on a
    schema of their own, with the same run's raw commit rate beside them."""
    schema = f"bench_ls_{uuid.uuid4().hex[:12]}"
    try:
        with timed("webhooks", watchdog.check):
            found = webhook_bench.run(base, schema, sizes.webhook_customers, webhook_bench.DEFAULT_WORKERS, say)
    finally:
        drop_schema(base, schema)
    per_s, duplicates_per_s = found["webhooks_per_s"], found["duplicate_webhooks_per_s"]
    return {
        "webhooks_per_s": per_s,
        "duplicate_webhooks_per_s": duplicates_per_s,
        # Context: a delivery's durable writes against the same run's baseline.
        "webhooks_vs_raw": round(per_s / raw_per_s, 3),
        "webhooks_per_s_sequential": found["webhooks_per_s_sequential"],
        "webhook_commands_per_shared_transaction": found["commands_per_shared_transaction"],
    }


def check_figures(base: str, sizes: Sizes, watchdog: Watchdog) -> dict[str, Any]:
    """benchmarks/checks.py's figures (``Ledger.check``), on a schema of their own."""
    schema = f"bench_chk_{uuid.uuid4().hex[:12]}"
    counts = check_bench.QUICK if sizes.commands <= Sizes.quick().commands else check_bench.FULL
    try:
        with timed("checks", watchdog.check):
            found = check_bench.run(base, schema, dict(counts), say)
    finally:
        drop_schema(base, schema)
    return {name: found[name] for name in ("check_per_s", "check_uncached_per_s", "record_use_per_s")}


def scaling_figures(base: str, sizes: Sizes, watchdog: Watchdog) -> dict[str, float]:
    """benchmarks/scaling.py's figures (1 to 16 clients, processes and
    threads), on a schema of their own."""
    schema = f"bench_scaling_{uuid.uuid4().hex[:12]}"
    try:
        with timed("scaling", watchdog.check):
            return scaling_bench.run(base, schema, say, clients=sizes.scaling_clients, cell_s=sizes.scaling_cell_s)
    finally:
        drop_schema(base, schema)


def pricing_figures(base: str, sizes: Sizes, watchdog: Watchdog) -> dict[str, Any]:
    """benchmarks/pricing.py's figures (quotes in process, a hold sized by a
    quote), on a schema of their own."""
    schema = f"bench_price_{uuid.uuid4().hex[:12]}"
    quick = sizes.commands < Sizes.full().commands
    try:
        with timed("pricing", watchdog.check):
            return pricing_bench.run(
                ledger_url(base, schema), say, quotes=2_000 if quick else 20_000, repeats=10 if quick else 50
            )
    finally:
        drop_schema(base, schema)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ledger benchmarks on PostgreSQL (LEDGER_TEST_DATABASE_URL).")
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke test")
    parser.add_argument(
        "--renew-batch",
        type=int,
        default=None,
        help=f"renewal grants per execute_batch call (default {DEFAULT_RENEW_BATCH:,}; at most {MAX_BATCH:,})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"abort the run after this many seconds (default {DEFAULT_TIMEOUT_S:.0f})",
    )
    parser.add_argument(
        "--profile-rebuild",
        metavar="FILE",
        default=None,
        help="run the rebuild under cProfile, write the stats to FILE and print the top functions "
        "(slows the rebuild: its figures are then not comparable)",
    )
    parser.add_argument(
        "--analyze",
        action="store_true",
        help="ANALYZE the events table before the rebuild, as autovacuum would in time (off by default: "
        "the run measures the server as it is)",
    )
    parser.add_argument(
        "--log-events",
        type=int,
        default=None,
        help="fill the event log to about this many events for the rebuild figures (default 1,000,000; 30,000 "
        "under --quick)",
    )
    parser.add_argument(
        "--only",
        metavar="GROUPS",
        default=None,
        help=f"run only these groups of figures, comma-separated ({', '.join(FIGURE_GROUPS)}); no targets report",
    )
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:  # a child process of run_child
        print(json.dumps(CHILDREN[args.child](os.environ[CHILD_URL_ENV])), flush=True)
        return 0
    sizes = Sizes.quick() if args.quick else Sizes.full()
    if args.renew_batch is not None:
        if not 1 <= args.renew_batch <= MAX_BATCH:
            parser.error(f"--renew-batch must be within 1..{MAX_BATCH}")
        sizes = replace(sizes, renew_batch=args.renew_batch)
    if args.quick:
        say(
            f"quick mode: load_ms_100k_events is measured on {sizes.big_history_events:,} events, "
            f"reserve_ms_10k_open_blocks and snapshot_bytes_10k_grants on {sizes.many_grants:,} grants, "
            f"the rebuild on a log of about {sizes.log_events:,}"
        )
    if args.profile_rebuild:
        os.environ[PROFILE_ENV] = os.path.abspath(args.profile_rebuild)
        say("!! --profile-rebuild: the rebuild runs under cProfile; rebuild_events_per_s is not comparable")
    if args.log_events is not None:
        if not 1_000 <= args.log_events <= 10_000_000:
            parser.error("--log-events must be within 1,000..10,000,000")
        sizes = replace(
            sizes, log_events=args.log_events, log_users=min(sizes.log_users, max(1_000, args.log_events // 17))
        )
    if args.only is not None:
        groups = {g.strip() for g in args.only.split(",") if g.strip()}
        if not groups or not groups <= set(FIGURE_GROUPS):
            parser.error(f"--only takes groups out of {', '.join(FIGURE_GROUPS)}")
        print(json.dumps(run_only(sizes, args.timeout, groups, analyze=args.analyze)), flush=True)
        return 0
    figures = run(sizes, args.timeout, analyze=args.analyze)
    report_targets(figures)
    if not args.quick and figures["elapsed_s"] > TIME_BUDGET_S:
        say(f"!! the run took {figures['elapsed_s']:.0f} s, over the {TIME_BUDGET_S:.0f} s budget")
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
