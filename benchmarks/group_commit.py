"""Group commit, measured: threads of one process sharing one ``Ledger``, with
and without ``group_commit``, on PostgreSQL.

    python benchmarks/group_commit.py            # 3 runs of 2 s a cell, the median kept
    python benchmarks/group_commit.py --quick    # 1 run of 1 s a cell, a smoke test

Each thread reserves 1 credit and settles it (two commands), over and over,
for a random one of 50 funded accounts ("many") or for the same one ("hot"),
at 1, 4 and 16 threads; the two modes take turns, cell by cell. Prints ops/s (commands a second), p50/p99 latency of a
command, ``ConcurrencyExhausted`` and other errors per cell, and the group
commit's average batch; the last line is one JSON object. Uses a fresh schema
on the server named by LEDGER_TEST_DATABASE_URL and drops it afterwards.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from ledger import ConcurrencyExhausted, GrantCredits, Ledger, LedgerError  # noqa: E402

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
ACCOUNTS = 50
THREADS = (1, 4, 16)
FAR = datetime(2099, 1, 1, tzinfo=UTC)


def load_average() -> float:
    return os.getloadavg()[0]


def cell(ledger: Ledger, users: list[uuid.UUID], threads: int, seconds: float, tag: str) -> dict[str, Any]:
    stop = time.monotonic() + seconds
    latencies: list[list[float]] = [[] for _ in range(threads)]
    exhausted = [0] * threads
    errors = [0] * threads
    before = ledger.group_commit.stats

    def worker(n: int) -> None:
        rng = random.Random(n)
        mine = latencies[n]
        i = 0
        while time.monotonic() < stop:
            user = users[rng.randrange(len(users))]
            key = f"{tag}:{n}:{i}"
            i += 1
            try:
                t0 = time.perf_counter()
                hold = ledger.reserve(user, uuid.uuid4(), 1, FAR, key=f"{key}:r")
                t1 = time.perf_counter()
                assert hold.reservation_id is not None
                ledger.settle(hold.reservation_id, 1, key=f"{key}:s", user_id=user)
                t2 = time.perf_counter()
                mine.extend((t1 - t0, t2 - t1))
            except ConcurrencyExhausted:
                exhausted[n] += 1
            except LedgerError:
                errors[n] += 1

    started = time.monotonic()
    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.monotonic() - started
    flat = sorted(x for part in latencies for x in part)
    after = ledger.group_commit.stats
    batches = after.batches - before.batches
    carried = after.commands - before.commands
    return {
        "ops_per_s": round(len(flat) / wall, 1),
        "p50_ms": round(statistics.median(flat) * 1000, 2) if flat else None,
        "p99_ms": round(flat[int(len(flat) * 0.99) - 1] * 1000, 2) if flat else None,
        "concurrency_exhausted": sum(exhausted),
        "errors": sum(errors),
        "commands_per_batch": round(carried / batches, 2) if batches else None,
        "load_average": round(load_average(), 2),
    }


def _process(url: str, users: list[str], threads: int, seconds: float, tag: str, start_at: float, out: Any) -> None:
    """One process of a multi-process cell: its own group-committed ledger."""
    with Ledger(url, group_commit=True) as ledger:
        ids = [uuid.UUID(u) for u in users]
        cell(ledger, ids, 2, 0.2, f"{tag}:warm")
        time.sleep(max(0.0, start_at - time.time()))
        figures = cell(ledger, ids, threads, seconds, tag)
        figures["clashes"] = ledger.group_commit.stats.clashes
        out.put(figures)


def processes_cell(
    url: str, users: list[uuid.UUID], processes: int, threads: int, seconds: float, *, routed: bool, tag: str
) -> dict[str, Any]:
    """``processes`` processes of ``threads`` threads each, at once. Routed:
    each process owns its share of the accounts; else every process writes any."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start_at = time.time() + 4.0  # after every process opened its ledger and warmed up
    shares = [users[p::processes] if routed else users for p in range(processes)]
    procs = [
        context.Process(
            target=_process,
            args=(url, [str(u) for u in shares[p]], threads, seconds, f"{tag}:{p}", start_at, out),
        )
        for p in range(processes)
    ]
    for proc in procs:
        proc.start()
    parts = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join()
    return {
        "ops_per_s": round(sum(p["ops_per_s"] for p in parts), 1),
        "p99_ms": max(p["p99_ms"] or 0 for p in parts),
        "concurrency_exhausted": sum(p["concurrency_exhausted"] for p in parts),
        "clashes": sum(p["clashes"] for p in parts),
        "load_average": round(load_average(), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-processes", action="store_true", help="threads of one process only")
    parser.add_argument("--seconds", type=float, default=None, help="per run of a cell (default 2, --quick 1)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per cell, the median kept (default 3, --quick 1)"
    )
    args = parser.parse_args()
    seconds = args.seconds or (1.0 if args.quick else 2.0)
    args.repeats = args.repeats or (1 if args.quick else 3)
    base = os.environ.get("LEDGER_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)
    schema = f"bench_gc_{uuid.uuid4().hex[:10]}"
    sep = "&" if "?" in base else "?"
    url = f"{base}{sep}schema={schema}&pool_size=20&max_overflow=4"
    results: dict[str, Any] = {"load_average_start": round(load_average(), 2)}
    try:
        # Each mode (and the processes' cells) has accounts of its own: a
        # ledger whose cached accounts another one wrote would clash on them.
        accounts = {name: [uuid.uuid4() for _ in range(ACCOUNTS)] for name in ("plain", "group", "processes")}
        with Ledger(url) as setup:
            setup.execute_batch(
                GrantCredits(key=f"fund:{u}", user_id=u, amount_credits=10**9, kind="bonus")  # type: ignore[arg-type]
                for users in accounts.values()
                for u in users
            )
        with Ledger(url) as plain, Ledger(url, group_commit=True) as group:
            ledgers = {"plain": plain, "group": group}
            for mode, ledger in ledgers.items():  # warm the command cache and the pool
                cell(ledger, accounts[mode], 4, 0.3, f"warm:{mode}")
            for shape in ("many", "hot"):
                for threads in THREADS:
                    # The two modes take turns, so that a change of the machine's load hits both.
                    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "group": []}
                    for r in range(args.repeats):
                        for mode, ledger in ledgers.items():
                            chosen = accounts[mode] if shape == "many" else accounts[mode][:1]
                            runs[mode].append(cell(ledger, chosen, threads, seconds, f"{mode}:{shape}:{threads}:{r}"))
                    for mode, figures_of in runs.items():
                        figures = sorted(figures_of, key=lambda f: f["ops_per_s"])[len(figures_of) // 2]
                        results[f"{mode}_{shape}_{threads}t"] = figures
                        print(
                            f"{mode:5} {shape:4} {threads:2} threads: {figures['ops_per_s']:8.1f} commands/s"
                            f"  p50 {figures['p50_ms']} ms  p99 {figures['p99_ms']} ms"
                            f"  exhausted {figures['concurrency_exhausted']}  errors {figures['errors']}"
                            f"  batch {figures['commands_per_batch']}  load {figures['load_average']}",
                            flush=True,
                        )
            if not args.no_processes:
                # Across processes (group commit in each): 2 x 8 threads, the
                # accounts routed to their process or not, and the hot account.
                users = accounts["processes"]
                for name, chosen, routed in (
                    ("routed_many", users, True),
                    ("shared_many", users, False),
                    ("shared_hot", users[:1], False),
                ):
                    figures = processes_cell(url, chosen, 2, 8, seconds, routed=routed, tag=f"p:{name}")
                    results[f"2p_8t_{name}"] = figures
                    print(
                        f"2 processes x 8 threads, {name:11}: {figures['ops_per_s']:8.1f} commands/s"
                        f"  p99 {figures['p99_ms']} ms  clashes {figures['clashes']}"
                        f"  exhausted {figures['concurrency_exhausted']}  load {figures['load_average']}",
                        flush=True,
                    )
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    for shape in ("many", "hot"):
        for threads in THREADS:
            plain = results[f"plain_{shape}_{threads}t"]["ops_per_s"]
            group = results[f"group_{shape}_{threads}t"]["ops_per_s"]
            results[f"group_vs_plain_{shape}_{threads}t"] = round(group / plain, 2) if plain else None
    results["load_average_end"] = round(load_average(), 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
