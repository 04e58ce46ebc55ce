"""Throughput and latency figures for the ledger on PostgreSQL.

    python benchmarks/run.py            # full run (a few minutes at most)
    python benchmarks/run.py --quick    # smaller counts, a smoke test

Prints human-readable figures as it goes; the last line is one JSON object
(see benchmarks/README.md). Every run uses a fresh schema on the server named
by LEDGER_TEST_DATABASE_URL and drops it at the end, also on error.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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

from ledger import (
    CreditKind,
    GrantCredits,
    Ledger,
    ReserveCredits,
    SettleReservation,
    SpendCredits,
)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
MAX_BATCH = 10_000  # Ledger.execute_batch takes at most this many commands
# Renewals per execute_batch call: the ledger's maximum. (Before commit 788496d
# a save this large could hang for ever in psycopg's pipeline mode; the
# watchdog below turns such a hang into an error. --renew-batch overrides.)
DEFAULT_RENEW_BATCH = MAX_BATCH
DEFAULT_TIMEOUT_S = 280.0
ADMIN_APP_NAME = "ledger-bench-admin"

# Targets: a figure is "met" when the check holds.
TARGET_COMMANDS_VS_RAW = 0.4
TARGET_BULK_GRANTS_PER_S = 10_000.0
TARGET_LOAD_RATIO = 2.0


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

    @classmethod
    def full(cls) -> Sizes:
        return cls(
            warmup_commands=100,
            commands=1_000,
            raw_rows=1_000,
            bulk_accounts=10_000,
            open_batch=5_000,
            renew_batch=DEFAULT_RENEW_BATCH,
            renew_rounds=2,
            big_history_events=100_000,
            history_batch=5_000,
            load_repeats=20,
            statement_sample=20,
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
            renew_rounds=2,
            big_history_events=5_000,
            history_batch=1_000,
            load_repeats=10,
            statement_sample=10,
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
        self._thread = threading.Thread(target=self._watch, name="bench-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def check(self) -> None:
        if self.fired.is_set():
            raise TimeoutError(f"benchmark run exceeded {self.deadline_s:.0f} s")

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


def bulk_grants_per_s(ledger: Ledger, users: list[UUID], batch: int, rounds: int) -> float:
    """``rounds`` renewal runs (one grant per existing account each), ``batch``
    grants per execute_batch call; the rate over all rounds."""
    total = 0.0
    for n in range(rounds):
        batches = renewal_batches(users, batch, f"2026-{n + 2:02d}")  # built outside the timing
        start = time.perf_counter()
        for commands in batches:
            ledger.execute_batch(commands)
        elapsed = time.perf_counter() - start
        total += elapsed
        say(
            f"renewal round {n + 1}: {len(users):,} grants to existing accounts (batches of {batch:,}) "
            f"in {elapsed:.2f} s -> {len(users) / elapsed:,.0f} grants/s"
        )
    rate = rounds * len(users) / total
    say(f"renewal grants over {rounds} round(s): {rate:,.0f} grants/s")
    return rate


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
            f"load_ms_100k_events <= {TARGET_LOAD_RATIO:g} x load_ms_10_events",
            figures["load_ms_100k_events"] <= TARGET_LOAD_RATIO * figures["load_ms_10_events"],
            f"{figures['load_ms_100k_events']:.2f} vs {figures['load_ms_10_events']:.2f} ms",
        ),
    ]
    say("targets:")
    for label, met, value in checks:
        say(f"  {'met   ' if met else 'MISSED'}  {label}  ({value})")


def measure(ledger: Ledger, schema: str, sizes: Sizes, check: Callable[[], None]) -> dict[str, float]:
    with timed("raw baseline", check):
        raw = raw_insert_commit_per_s(ledger.config.conninfo(), schema, sizes.raw_rows, sizes.warmup_commands)
    with timed("commands", check):
        cmds = commands_per_s(ledger, sizes.commands, sizes.warmup_commands, hint=True)
        cmds_nohint = commands_per_s(ledger, sizes.commands, sizes.warmup_commands, hint=False)
        stmts = statements_per_command(ledger, sizes.statement_sample)
    say(f"commands_vs_raw: {cmds / raw:.2f}")
    users = [uuid.uuid4() for _ in range(sizes.bulk_accounts)]
    with timed("bulk", check):
        opened = open_accounts(ledger, users, sizes.open_batch)
        bulk = bulk_grants_per_s(ledger, users, sizes.renew_batch, sizes.renew_rounds)
    with timed("loads", check):
        ms_small, ms_big = load_times(ledger, sizes.big_history_events, sizes.history_batch, sizes.load_repeats)
    return {
        "commands_per_s": round(cmds, 1),
        "raw_insert_commit_per_s": round(raw, 1),
        "commands_vs_raw": round(cmds / raw, 3),
        "bulk_grants_per_s": round(bulk, 1),
        "load_ms_10_events": round(ms_small, 3),
        "load_ms_100k_events": round(ms_big, 3),
        # Context, not targets:
        "commands_per_s_without_hint": round(cmds_nohint, 1),
        "sql_statements_per_command": round(stmts, 2),
        "bulk_open_accounts_per_s": round(opened, 1),
        "renew_batch": sizes.renew_batch,
        "big_history_events": sizes.big_history_events,
    }


def run(sizes: Sizes, timeout_s: float) -> dict[str, float]:
    """Measures everything on a fresh schema; drops it afterwards, also on error."""
    base = base_url()
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    app_name = f"ledger-{schema}"
    os.environ["PGAPPNAME"] = app_name  # tags the ledger's pooled connections for the watchdog
    say(f"PostgreSQL {admin_conninfo(base)}, schema {schema}; load average {load_average():.2f}")
    started = time.perf_counter()
    watchdog = Watchdog(base, app_name, timeout_s)
    watchdog.start()
    try:
        with Ledger(ledger_url(base, schema)) as ledger:
            figures = measure(ledger, schema, sizes, watchdog.check)
    except Exception:
        if watchdog.fired.is_set():
            say(f"!! aborted by the watchdog after {timeout_s:.0f} s (a call hung or the run was too slow)")
        raise
    finally:
        watchdog.stop()
        with timed("drop schema"):
            drop_schema(base, schema)
        say(f"elapsed: {time.perf_counter() - started:.1f} s; load average {load_average():.2f}")
    figures["elapsed_s"] = round(time.perf_counter() - started, 1)
    figures["load_average_1m"] = round(load_average(), 2)
    return figures


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
    args = parser.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes.full()
    if args.renew_batch is not None:
        if not 1 <= args.renew_batch <= MAX_BATCH:
            parser.error(f"--renew-batch must be within 1..{MAX_BATCH}")
        sizes = replace(sizes, renew_batch=args.renew_batch)
    if args.quick:
        say(f"quick mode: load_ms_100k_events is measured on {sizes.big_history_events:,} events")
    figures = run(sizes, args.timeout)
    report_targets(figures)
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
