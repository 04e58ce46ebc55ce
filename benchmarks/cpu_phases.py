"""Where a client process's CPU goes per command, by phase, across processes.

    python benchmarks/cpu_phases.py                 # 1 process, then 16 routed, then 16 at random; ~40 s
    python benchmarks/cpu_phases.py --processes 8   # another count

Each process has its own ``Ledger`` and runs reserve then settle (as
``benchmarks/scaling.py``'s ``many``) on 50 funded accounts: once with one
process; once with N processes each on its own share of the accounts
(routed by account: no account has two writers); once with N processes on
any account at random (every account shared). Per command it prints the
process's CPU and, measured with each thread's own CPU clock around the
phase, the CPU of:

- ``read``: the locked read of a shared account's newer events (lock, query,
  rows), ``WriteLocks.events_after``;
- ``decode``: turning those rows into events (``Mapper.to_domain_event``);
- ``load``: the whole of getting the aggregates a command needs
  (``SealedRepository.get``: the two above, applying the events, the copies);
- ``save``: the whole save (``LedgerApplication.save_all``), and within it
  ``save_round_trip``, the one message that writes the events and commits.

The rest of a command's CPU is the command itself, its receipt and the
client's loop. Not a target: context for docs/performance.md ("What limits
them on this machine"). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import scaling  # noqa: E402  (benchmarks/scaling.py, beside this file)

from ledger import Ledger  # noqa: E402
from ledger.storage import eventstore  # noqa: E402  (the phases are timed where they run)
from ledger.storage.postgres import recorder, writelocks  # noqa: E402

ACCOUNTS = 50
DEFAULT_PROCESSES = 16
DEFAULT_SECONDS = 6.0
START_DELAY_S = 3.0


def timed(owner: Any, name: str, label: str, spent: dict[str, float]) -> None:
    """Wraps ``owner.name`` so that each call adds its thread's CPU time to ``spent[label]``."""
    original = getattr(owner, name)
    clock = time.thread_time

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = clock()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + clock() - started

    setattr(owner, name, wrapper)


def worker(url: str, users: list[str], start_at: float, seconds: float, tag: str, outbox: Any) -> None:
    spent: dict[str, float] = {}
    timed(writelocks.PostgresWriteLocks, "events_after", "read", spent)
    timed(eventstore.SealedRepository, "get", "load", spent)
    timed(eventstore.LedgerApplication, "save_all", "save", spent)
    timed(recorder.LedgerPostgresRecorder, "_insert_in_one_round_trip", "save_round_trip", spent)
    accounts = [uuid.UUID(u) for u in users]
    expires_at = scaling.far_future()
    rng = random.Random(tag)
    with Ledger(url) as ledger:
        timed(ledger.app.mapper, "to_domain_event", "decode", spent)
        for i, user in enumerate(rng.sample(accounts, len(accounts))):  # caught up on every account first
            scaling.reserve_settle(ledger.execute, user, f"{tag}:warm:{i}", expires_at)
        i = 0
        while time.time() < start_at:
            i += 1
            scaling.reserve_settle(ledger.execute, rng.choice(accounts), f"{tag}:pre:{i}", expires_at)
        spent.clear()
        cpu = time.process_time()
        commands = 0
        while time.time() < start_at + seconds:
            i += 1
            commands += scaling.reserve_settle(ledger.execute, rng.choice(accounts), f"{tag}:{i}", expires_at)[1]
        outbox.put({"commands": commands, "cpu_s": time.process_time() - cpu, "spent": spent})


def cell(url: str, users: list[str], processes: int, seconds: float, *, routed: bool) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    outbox = ctx.Queue()
    start_at = time.time() + START_DELAY_S + 0.3 * processes
    tag = uuid.uuid4().hex[:8]
    shares = [users[k::processes] if routed else users for k in range(processes)]
    procs = [
        ctx.Process(target=worker, args=(url, share, start_at, seconds, f"{tag}:{k}", outbox))
        for k, share in enumerate(shares)
    ]
    for p in procs:
        p.start()
    results = [outbox.get(timeout=120 + seconds) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    commands = max(sum(r["commands"] for r in results), 1)
    figures = {"commands_per_s": sum(r["commands"] for r in results) / seconds}
    figures["process_cpu_us"] = sum(r["cpu_s"] for r in results) / commands * 1e6
    for label in ("read", "decode", "load", "save", "save_round_trip"):
        figures[f"{label}_cpu_us"] = sum(r["spent"].get(label, 0.0) for r in results) / commands * 1e6
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=DEFAULT_PROCESSES, help="processes in the two N cells")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="seconds per cell")
    args = parser.parse_args(argv)
    if not 2 <= args.processes <= 64:
        parser.error("--processes takes 2..64")
    base = os.environ.get("LEDGER_TEST_DATABASE_URL", scaling.DEFAULT_DATABASE_URL)
    schema = f"bench_phases_{uuid.uuid4().hex[:12]}"
    url = scaling.schema_url(base, schema, 2)
    figures: dict[str, float] = {}
    load_before = os.getloadavg()[0]
    try:
        users = [uuid.uuid4() for _ in range(ACCOUNTS)]
        scaling.fund(url, users)
        names = [str(u) for u in users]
        cells: list[tuple[str, Callable[[], dict[str, float]]]] = [
            ("1p", lambda: cell(url, names, 1, args.seconds, routed=True)),
            (f"{args.processes}p_routed", lambda: cell(url, names, args.processes, args.seconds, routed=True)),
            (f"{args.processes}p_random", lambda: cell(url, names, args.processes, args.seconds, routed=False)),
        ]
        print(
            f"{'cell':>12} {'per s':>7} {'cpu/c':>7} {'load':>7} {'read':>7} {'decode':>7} "
            f"{'save':>7} {'save rt':>7}  (µs a command)"
        )
        for name, run in cells:
            found = run()
            print(
                f"{name:>12} {found['commands_per_s']:>7,.0f} {found['process_cpu_us']:>7,.0f} "
                f"{found['load_cpu_us']:>7,.0f} "
                f"{found['read_cpu_us']:>7,.0f} {found['decode_cpu_us']:>7,.0f} {found['save_cpu_us']:>7,.0f} "
                f"{found['save_round_trip_cpu_us']:>7,.0f}",
                flush=True,
            )
            figures.update({f"phases_{key}_{name}": round(value, 1) for key, value in found.items()})
    finally:
        with psycopg.connect(scaling.conninfo_of(base), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    figures["phases_load_average_1m"] = round(max(load_before, os.getloadavg()[0]), 2)
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
