"""How throughput grows with clients, on PostgreSQL.

    python benchmarks/scaling.py            # 1, 2, 4, 8, 16 clients; about 1.5 minutes
    python benchmarks/scaling.py --quick    # 1 and 16 clients, short cells: a smoke test

In one run, at each number of clients, for processes (each its own ``Ledger``)
and for threads (sharing one ``Ledger`` in one process), three workloads:

- ``many``: reserve 10 credits, then settle that hold for 7 (with the
  ``user_id`` hint), on a random one of 50 funded accounts;
- ``hot``: the same on one funded account;
- ``raw``: one psycopg connection per client inserting one row and committing:
  the server's floor for one durable write;
- ``raw_locked`` (processes only): a reserve's save written by hand, with no
  ledger: one message that locks a copy of the events table (``LOCK TABLE …
  IN EXCLUSIVE MODE``, as every save to an eventsourcing events table does),
  NOTIFYs, inserts three event rows of a reserve's size and commits. Its rate
  is the ceiling of the ledger's commands across processes, whatever the
  client does.

Per cell it prints commands (or rows) per second, p50 and p99 latency of one
command, the clash rate (saves refused because another writer got there
first, over attempts), reloads per command (accounts rebuilt from the store,
and cached ones fast-forwarded), the events those fast-forwards replayed per
command (other processes' events: with commands routed at random, about one
per process for each event a command writes), and ``ConcurrencyExhausted``
raised. Counts start once every client of the cell is warm: each worker has
first caught up on every account of the cell (``catch_up_order``). The last
line is one JSON object (see benchmarks/README.md); ``benchmarks/run.py``
merges the same figures into its own.

The client is whatever ``--executor module:function`` builds from an open
``Ledger`` (default: the ``Ledger`` itself). It must have ``execute(command)``;
``command_stats()`` (for the clash and reload figures) and ``close()`` are
used when it has them. Threads share one executor, so an executor that groups
concurrent commands into shared transactions is measured by the same cells.
``scaling:grouped`` runs the commands through the ledger's group commit.
``scaling:evicting`` and ``scaling:forwarding`` are the two cache policies the
ledger's was chosen against (docs/decisions.md, "Cached accounts are
fast-forwarded once shared"), and ``scaling:unlocked`` the ledger without its
write locks (docs/decisions.md, "Hot accounts are locked, not retried"), for
comparison.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import multiprocessing
import os
import queue as queue_module
import random
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from ledger import (  # noqa: E402
    CommandStats,
    ConcurrencyExhausted,
    CreditKind,
    GrantCredits,
    Ledger,
    LedgerError,
    ReserveCredits,
    SettleReservation,
    SpendCredits,
)
from ledger.storage.writelocks import WriteLocks  # noqa: E402  (``unlocked`` puts back the lock-free default)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_EXECUTOR = "scaling:plain"
CLIENTS = (1, 2, 4, 8, 16)
QUICK_CLIENTS = (1, 16)
CELL_S = 2.0
QUICK_CELL_S = 0.6
MANY_ACCOUNTS = 50
FUNDING = 2_000_000_000  # credits per account: far more than any run spends
WORKLOADS = ("raw", "raw_locked", "many", "hot")
#: ``raw_locked``'s rows: a reserve writes three events of about this size.
RAW_LOCKED_ROWS = 3
RAW_LOCKED_STATE_BYTES = 250
#: Workloads that run in process cells only (what they measure is the server's).
PROCESS_ONLY = ("raw_locked",)
MODES = ("p", "t")  # processes, threads
#: Processes sharing one group commit (``share_group_commit``): the commands' workloads only.
SHARED_MODE = "s"
COMMANDS = ("many", "hot")
ALL_MODES = (*MODES, SHARED_MODE)
#: A settle that ran out of attempts is tried again (same key) so that no hold is left open.
SETTLE_TRIES = 5
#: From the moment every client is warm to the cell's start: time to tell them all.
START_DELAY_S = 0.1
#: Warm-up commands per client before each cell's clock starts (caches, pools, prepared statements).
WARMUP_PAIRS = 2
#: Passes over every account when a client process starts (``warm_up``).
WARMUP_PASSES = 2

#: The two-Ledger figure: turns each, and the account's events before them.
ALTERNATING_ROUNDS = 200
QUICK_ALTERNATING_ROUNDS = 50
ALTERNATING_HISTORY = 150

#: Figures kept to four places (the rest to one).
ROUNDED_FINE = frozenset(
    {
        "clash_rate",
        "full_loads_per_command",
        "fastforwards_per_command",
        "fastforward_events_per_command",
        "machine_busy",
    }
)

TARGET_MANY_VS_RAW = 0.4
TARGET_HOT_VS_RAW = 0.2
TARGET_P99_MS_HOT = 50.0


def say(text: str) -> None:
    print(text, flush=True)


def plain(ledger: Ledger) -> Ledger:
    """The default client: the ``Ledger`` itself."""
    return ledger


def evicting(ledger: Ledger) -> Ledger:
    """For comparison: the cache as it was before fast-forwarding, trusted
    until a clash or refusal, which evicts the aggregates (the retry rebuilds
    them from the store)."""
    ledger.app.refresh = ledger.app.evict  # type: ignore[method-assign]
    ledger.app.recheck = ledger.app.evict  # type: ignore[method-assign]
    return ledger


def unlocked(ledger: Ledger) -> Ledger:
    """For comparison: no write locks; every command optimistic, a hot
    account's writers clash and retry."""
    ledger.app.write_locks = WriteLocks(ledger.app.recorder)
    return ledger


def forwarding(ledger: Ledger) -> Ledger:
    """For comparison: every cached aggregate fast-forwarded before every use
    (eventsourcing's own policy), whatever the clashes."""
    ledger.app.repository.freshness.is_shared = lambda aggregate_id: True  # type: ignore[method-assign]
    return ledger


class Grouped:
    """The ledger's commands through its group commit (``Ledger.group_commit``):
    threads sharing this client share transactions."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.execute = ledger.group_commit.execute

    def command_stats(self) -> Any:
        return self.ledger.command_stats()

    def close(self) -> None:
        self.ledger.close()


def grouped(ledger: Ledger) -> Grouped:
    """Concurrent commands share transactions (docs/group-commit.md)."""
    return Grouped(ledger)


def load_executor(path: str) -> Callable[[Ledger], Any]:
    """``module:function`` to the function (``scaling:plain`` is this file's)."""
    module_name, _, name = path.partition(":")
    if not name:
        raise SystemExit(f"--executor must be module:function, not {path!r}")
    module = sys.modules[__name__] if module_name in ("scaling", __name__) else importlib.import_module(module_name)
    factory = getattr(module, name)
    if not callable(factory):
        raise SystemExit(f"--executor {path!r} is not callable")
    return factory  # type: ignore[no-any-return]


def schema_url(base: str, schema: str, pool_size: int) -> str:
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}schema={schema}&pool_size={pool_size}&max_overflow=0"


def conninfo_of(base: str) -> str:
    parts = urlsplit(base)
    return parts._replace(query="").geturl()


def far_future() -> datetime:
    return datetime.now(UTC) + timedelta(days=2)


# ------------------------------------------------------------------ cells


@dataclass(frozen=True)
class Task:
    workload: str
    clients: int  # threads in this worker (1 for a process cell)
    duration_s: float
    tag: str
    users: tuple[str, ...]  # the accounts to draw from
    table: str  # the raw workload's scratch table
    events_table: str = ""  # raw_locked's copy of the events table
    #: Whether the first client catches up on every account first (not when
    #: the processes share a group commit: the serving process's cache is
    #: the one used, and every command keeps it current).
    catch_up: bool = True


@dataclass
class ClientResult:
    ops: int = 0  # inside the cell's window
    #: Every command this client ran once warm, the one past the window
    #: too: what the clash and load counts are divided by.
    commands: int = 0
    latencies_ms: list[float] | None = None
    exhausted: int = 0
    errors: int = 0
    first_error: str = ""


def stats_of(executor: Any, ledger: Ledger) -> CommandStats:
    reader = getattr(executor, "command_stats", None) or ledger.command_stats
    found = reader()
    return found if isinstance(found, CommandStats) else ledger.command_stats()


def reserve_settle(execute: Callable[[Any], Any], user: uuid.UUID, key: str, expires_at: datetime) -> tuple[int, int]:
    """One reserve and its settle; (ConcurrencyExhausted raised, commands done)."""
    exhausted = 0
    try:
        receipt = execute(
            ReserveCredits(key=f"{key}:r", user_id=user, job_id=uuid.uuid4(), amount_credits=10, expires_at=expires_at)
        )
    except ConcurrencyExhausted:
        return 1, 0
    for _ in range(SETTLE_TRIES):
        try:
            execute(
                SettleReservation(key=f"{key}:s", reservation_id=receipt.reservation_id, actual_credits=7, user_id=user)
            )
            return exhausted, 2
        except ConcurrencyExhausted:
            exhausted += 1
    return exhausted, 1


def catch_up_order(users: Sequence[uuid.UUID], rng: random.Random) -> list[uuid.UUID]:
    """One reserve/settle on each of the cell's accounts, in an order of the
    client's own, before the cell's clock starts. A worker process that sat
    out the cells before this one (the 16-process cell's last twelve sat out
    the 1-, 2-, 4- and 8-process ones) holds copies of the accounts that are
    thousands of events old; without this pass it would replay them inside
    the measured window, which no worker that has been running does (it
    measured as a third of the 16-process cell's throughput). The cells
    measure the steady state."""
    order = list(users)
    rng.shuffle(order)
    return order


def run_client(task: Task, n: int, executor: Any, conninfo: str, warm: Callable[[], float]) -> ClientResult:
    """One client: warms up, calls ``warm()`` (which returns the cell's start,
    a ``time.time()``, once every client of the cell is warm), then works
    until the cell's end."""
    result = ClientResult(latencies_ms=[])
    assert result.latencies_ms is not None
    latencies = result.latencies_ms
    rng = random.Random(f"{task.tag}:{n}")
    users = [uuid.UUID(u) for u in task.users]
    expires_at = far_future()
    conn = None
    table = sql.Identifier(*task.table.split("."))
    if task.workload == "raw":
        conn = psycopg.connect(conninfo, autocommit=False)
        insert = sql.SQL("INSERT INTO {} (payload) VALUES (%s)").format(table)
        for i in range(3):
            conn.execute(insert, (f"warm {n} {i}",))
            conn.commit()
    elif task.workload == "raw_locked":
        conn = psycopg.connect(conninfo, autocommit=True)
        events = sql.Identifier(*task.events_table.split("."))
        state = "\\x" + "ab" * RAW_LOCKED_STATE_BYTES

        def one_message() -> bytes:
            rows = ", ".join(
                f"('{uuid.uuid4()}'::uuid, 1, 'ledger.domain.credits:CreditAccount.Reserved', '{state}'::bytea)"
                for _ in range(RAW_LOCKED_ROWS)
            )
            save = sql.SQL(
                "BEGIN; SET LOCAL lock_timeout = '10s'; LOCK TABLE {} IN EXCLUSIVE MODE; NOTIFY scaling_raw_locked; "
                "INSERT INTO {} (originator_id, originator_version, topic, state) VALUES "
            ).format(events, events)
            return (save.as_string(conn) + rows + " RETURNING notification_id; COMMIT").encode()

        for _ in range(3):
            conn.execute(one_message())
    else:
        # The first client of each worker catches up on every account of the
        # cell (``catch_up_order``); the others warm up on a few.
        caught_up = n == 0 and task.catch_up
        order = catch_up_order(users, rng) if caught_up else [rng.choice(users) for _ in range(WARMUP_PAIRS)]
        for i, user in enumerate(order):
            result.commands += reserve_settle(executor.execute, user, f"{task.tag}:{n}:warm{i}", expires_at)[1]
    start_at = warm()
    result.commands = 0  # the warm-up's are not the cell's (nor are its loads: see run_task)
    time.sleep(max(0.0, start_at - time.time()))
    end = time.perf_counter() + (start_at + task.duration_s - time.time())
    i = 0
    try:
        while True:
            started = time.perf_counter()
            if started >= end:
                break
            i += 1
            try:
                if task.workload == "raw_locked":
                    conn.execute(one_message())  # type: ignore[union-attr]
                    done, exhausted = 1, 0
                elif conn is not None:
                    conn.execute(insert, (f"row {n} {i}",))
                    conn.commit()
                    done, exhausted = 1, 0
                else:
                    exhausted, done = reserve_settle(
                        executor.execute, rng.choice(users), f"{task.tag}:{n}:{i}", expires_at
                    )
            except LedgerError as exc:
                result.errors += 1
                result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"
                continue
            finished = time.perf_counter()
            result.commands += done
            result.exhausted += exhausted
            if finished <= end:
                result.ops += done
                # A pair is two commands: each is charged half the pair's time.
                per = (finished - started) * 1000 / max(done, 1)
                latencies.extend([per] * done)
    finally:
        if conn is not None:
            conn.close()
    return result


def run_task(task: Task, executor: Any, ledger: Ledger, conninfo: str, start: Callable[[], float]) -> dict[str, Any]:
    """A worker's share of a cell: ``task.clients`` threads (or this thread
    alone). ``start()`` tells the parent this worker is warm and returns the
    cell's start."""
    # The counts from the moment every client is warm: the warm-up's loads
    # and fast-forwards are not the cell's.
    before = CommandStats()
    cpu_before = 0.0

    def warmed() -> float:
        nonlocal before, cpu_before
        before = stats_of(executor, ledger)
        cpu_before = time.process_time()
        return start()

    if task.clients == 1:
        results = [run_client(task, 0, executor, conninfo, warmed)]
    else:
        results = [ClientResult() for _ in range(task.clients)]
        all_warm = threading.Barrier(task.clients + 1)
        go = threading.Event()
        start_at = [0.0]

        def warm() -> float:
            all_warm.wait()
            go.wait()
            return start_at[0]

        def one(n: int) -> None:
            results[n] = run_client(task, n, executor, conninfo, warm)

        threads = [threading.Thread(target=one, args=(n,)) for n in range(task.clients)]
        for t in threads:
            t.start()
        all_warm.wait()
        start_at[0] = warmed()
        go.set()
        for t in threads:
            t.join()
    cpu_s = time.process_time() - cpu_before  # every thread of this process: the client's whole CPU
    spent = stats_of(executor, ledger).since(before)
    return {
        "cpu_s": cpu_s,
        "ops": sum(r.ops for r in results),
        "commands": sum(r.commands for r in results),
        "latencies_ms": [x for r in results for x in (r.latencies_ms or [])],
        "exhausted": sum(r.exhausted for r in results),
        "errors": sum(r.errors for r in results),
        "first_error": next((r.first_error for r in results if r.first_error), ""),
        "stats": vars(spent) if not task.workload.startswith("raw") else {},
    }


# ---------------------------------------------------------------- workers


def warm_up(executor: Any, users: Sequence[str], passes: int = WARMUP_PASSES) -> None:
    """``WARMUP_PASSES`` reserve/settles on each account, each pass in an
    order of this process's own: the client has then loaded each account and
    met its other writers, as a worker that has been up for a while has (the
    first command on an account another process wrote since clashes once, and
    then the account is fast-forwarded before use: see docs/performance.md).
    One pass is not enough: the processes that go first on an account meet
    no one. The cells measure the steady state after that."""
    rng = random.Random(os.getpid())
    tag = f"warm:{uuid.uuid4().hex[:8]}"
    for p in range(passes):
        order = list(users)
        rng.shuffle(order)
        for k, user in enumerate(order):
            reserve_settle(executor.execute, uuid.UUID(user), f"{tag}:{p}:{k}", far_future())


def worker_main(
    url: str,
    threads_url: str,
    conninfo: str,
    executor_path: str,
    warm: Sequence[str],
    inbox: Any,
    outbox: Any,
    share_path: str | None = None,
) -> None:
    """A client process: opens its Ledger (and, on request, a threads' Ledger)
    once, runs one reserve/settle on every account, as a worker that has been
    up for a while would have (``warm_up``), then runs tasks until told to stop."""
    try:
        factory = load_executor(executor_path)
        # With share_path, the processes share one group commit (docs/group-commit.md).
        ledger = Ledger(url) if share_path is None else Ledger(url, share_group_commit=share_path)
        executor = factory(ledger)
        # Sharing, the serving process's cache is the one commands use, and
        # one pass of every process's commands loads it.
        warm_up(executor, warm, WARMUP_PASSES if share_path is None else 1)
        shared: tuple[Ledger, Any] | None = None
        outbox.put(("ready", None))
        while True:
            message = inbox.get()
            if message is None:
                break
            task: Task = message

            def start() -> float:
                outbox.put(("warm", None))
                start_at = inbox.get()
                assert isinstance(start_at, float)
                return start_at

            if task.clients > 1:  # a threads cell: one Ledger shared by every thread
                if shared is None:
                    shared_ledger = Ledger(threads_url)
                    shared = (shared_ledger, factory(shared_ledger))
                    warm_up(shared[1], warm)
                outbox.put(("done", run_task(task, shared[1], shared[0], conninfo, start)))
            else:
                outbox.put(("done", run_task(task, executor, ledger, conninfo, start)))
        for opened, client in [(ledger, executor), *([shared] if shared else [])]:
            close = getattr(client, "close", None)
            if client is not opened and callable(close):
                close()
            opened.close()
    except Exception as exc:  # reported to the parent, which stops the run
        outbox.put(("error", f"{type(exc).__name__}: {exc}"))


class Workers:
    """Client processes, started once and reused by every cell."""

    def __init__(
        self,
        count: int,
        url: str,
        threads_url: str,
        conninfo: str,
        executor_path: str,
        warm: Sequence[str],
        *,
        share_path: str | None = None,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.inboxes = [ctx.Queue() for _ in range(count)]
        self.outbox = ctx.Queue()
        self.procs = [
            ctx.Process(
                target=worker_main,
                args=(url, threads_url, conninfo, executor_path, list(warm), inbox, self.outbox, share_path),
                daemon=True,
            )
            for inbox in self.inboxes
        ]
        for p in self.procs:
            p.start()
        for _ in self.procs:
            self._receive("ready", 120.0)

    def _receive(self, kind: str, timeout_s: float) -> Any:
        try:
            got, payload = self.outbox.get(timeout=timeout_s)
        except queue_module.Empty:
            raise SystemExit(f"a client process sent nothing for {timeout_s:.0f} s") from None
        if got == "error":
            raise SystemExit(f"a client process failed: {payload}")
        assert got == kind, got
        return payload

    def run(self, tasks: list[Task], timeout_s: float) -> tuple[list[dict[str, Any]], tuple[float, float] | None]:
        """Hands out the tasks; once every worker is warm, starts them all at
        once. Returns each worker's results, and the machine's (busy, all) CPU
        seconds from the start until the last worker was done (when known)."""
        inboxes = self.inboxes[: len(tasks)]
        for inbox, task in zip(inboxes, tasks, strict=True):
            inbox.put(task)
        for _ in tasks:
            self._receive("warm", timeout_s)
        start_at = time.time() + START_DELAY_S
        for inbox in inboxes:
            inbox.put(start_at)
        time.sleep(max(0.0, start_at - time.time()))
        cpu_before = machine_cpu_s()
        results = [self._receive("done", timeout_s) for _ in tasks]
        cpu_after = machine_cpu_s()
        if cpu_before is None or cpu_after is None:
            return results, None
        return results, (cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1])

    def stop(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


# ------------------------------------------------------------------ a run


def machine_cpu_s() -> tuple[float, float] | None:
    """(busy, all) CPU seconds of the whole machine so far, from /proc/stat
    (Linux); None elsewhere."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle and iowait
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def cell_figures(
    parts: list[dict[str, Any]], duration_s: float, machine: tuple[float, float] | None = None
) -> dict[str, float]:
    """One cell's figures; ``machine`` is the machine's (busy, all) CPU
    seconds over the cell, when known."""
    latencies = [x for p in parts for x in p["latencies_ms"]]
    ops = sum(p["ops"] for p in parts)
    stats = [CommandStats(**p["stats"]) for p in parts if p["stats"]]
    total = sum(stats, CommandStats())
    commands = max(sum(p["commands"] for p in parts), 1)
    return {
        "per_s": ops / duration_s,
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "clash_rate": total.clashes / total.attempts if total.attempts else 0.0,
        "full_loads_per_command": total.full_loads / commands,
        "fastforwards_per_command": total.fastforwards / commands,
        "fastforward_events_per_command": total.fastforward_events / commands,
        "exhausted": float(sum(p["exhausted"] for p in parts)),
        "errors": float(sum(p["errors"] for p in parts)),
        **cpu_figures(parts, commands, machine),
    }


def cpu_figures(parts: list[dict[str, Any]], commands: int, machine: tuple[float, float] | None) -> dict[str, float]:
    """Where a cell's CPU went, per command: the clients' (their processes'
    CPU from warm to done), and the rest of the machine's busy CPU (the
    PostgreSQL backends, chiefly; anything else running shows here too), and
    how busy the machine was. Without /proc/stat only the clients' is known."""
    client_s = sum(p.get("cpu_s", 0.0) for p in parts)
    found = {"client_cpu_us_per_command": client_s / commands * 1e6}
    if machine is not None and machine[1] > 0:
        busy_s, all_s = machine
        found["other_cpu_us_per_command"] = max(0.0, busy_s - client_s) / commands * 1e6
        found["machine_busy"] = busy_s / all_s
    return found


def names(mode: str, clients: int, workload: str) -> dict[str, str]:
    """The JSON names of one cell's figures."""
    cell = f"{clients}{mode}"
    per_s = {
        "raw": f"raw_insert_commit_per_s_{cell}",
        "raw_locked": f"raw_locked_save_per_s_{cell}",
    }.get(workload, f"commands_per_s_{cell}_{workload}")
    return {
        "per_s": per_s,
        "p50_ms": f"p50_ms_{cell}_{workload}",
        "p99_ms": f"p99_ms_{cell}_{workload}",
        "clash_rate": f"clash_rate_{cell}_{workload}",
        "full_loads_per_command": f"full_loads_per_command_{cell}_{workload}",
        "fastforwards_per_command": f"fastforwards_per_command_{cell}_{workload}",
        "fastforward_events_per_command": f"fastforward_events_per_command_{cell}_{workload}",
        "exhausted": f"concurrency_exhausted_{cell}_{workload}",
        "errors": f"errors_{cell}_{workload}",
        "client_cpu_us_per_command": f"client_cpu_us_per_command_{cell}_{workload}",
        "other_cpu_us_per_command": f"other_cpu_us_per_command_{cell}_{workload}",
        "machine_busy": f"machine_busy_{cell}_{workload}",
    }


def alternating(url: str, policy: Callable[[Ledger], Any], rounds: int, history: int) -> dict[str, float]:
    """Two Ledgers (as two processes) take turns spending 1 credit on one
    account with ``history`` events: each command starts from a copy the
    other Ledger has just made stale. Per command: time, clash rate, rebuilds."""
    user = uuid.uuid4()
    with Ledger(url) as a, Ledger(url) as b:
        clients = [policy(a), policy(b)]
        b.execute_batch(
            GrantCredits(key=f"alt:{user}:{i}", user_id=user, amount_credits=10, kind=CreditKind.PURCHASE)
            for i in range(history)
        )
        for k, client in enumerate(clients):  # both have loaded the account
            client.execute(SpendCredits(key=f"alt:{user}:warm{k}", user_id=user, amount_credits=1))
        before = [stats_of(c, ledger) for c, ledger in zip(clients, (a, b), strict=True)]
        started = time.perf_counter()
        for i in range(rounds):
            for k, client in enumerate(clients):
                client.execute(SpendCredits(key=f"alt:{user}:{i}:{k}", user_id=user, amount_credits=1))
        elapsed = time.perf_counter() - started
        spent = sum(
            (stats_of(c, ledger).since(x) for c, ledger, x in zip(clients, (a, b), before, strict=True)),
            CommandStats(),
        )
    commands = 2 * rounds
    return {
        "ms_per_command": 1000 * elapsed / commands,
        "clash_rate": spent.clashes / max(spent.attempts, 1),
        "full_loads_per_command": spent.full_loads / commands,
        "fastforwards_per_command": spent.fastforwards / commands,
    }


def fund(url: str, users: Sequence[uuid.UUID]) -> None:
    with Ledger(url) as ledger:
        ledger.execute_batch(
            GrantCredits(key=f"scaling:fund:{u}", user_id=u, amount_credits=FUNDING, kind=CreditKind.PURCHASE)
            for u in users
        )


HEADER = (
    f"{'cell':>6} {'workload':>8} {'per s':>9} {'p50 ms':>8} {'p99 ms':>8} {'clash':>6} "
    f"{'loads/c':>8} {'ffwd/c':>7} {'ffev/c':>7} {'exhaust':>7} {'cli µs/c':>8} {'oth µs/c':>8} {'busy':>5}"
)


@dataclass
class Cells:
    """Runs one mode's cells and records their figures."""

    figures: dict[str, float]
    counts: Sequence[int]
    duration: float
    warm: list[str]
    hot: str
    table: str
    events_table: str
    echo: Callable[[str], None]

    def run(self, workers: Workers, mode: str, only: Sequence[str] = WORKLOADS) -> None:
        for n in self.counts:
            for workload in WORKLOADS:
                if (mode != "p" and workload in PROCESS_ONLY) or (mode == SHARED_MODE and workload not in COMMANDS):
                    continue
                if workload not in only:
                    continue
                if mode == SHARED_MODE and workload == "hot" and n != max(self.counts):
                    continue  # its target is at the most processes; the cells' time is budgeted
                self.cell(workers, mode, n, workload)

    def cell(self, workers: Workers, mode: str, n: int, workload: str) -> None:
        users = tuple(self.warm[:MANY_ACCOUNTS]) if workload == "many" else (self.hot,)
        tag = f"sc:{uuid.uuid4().hex[:10]}"
        duration = self.duration
        if mode == "t":
            tasks = [Task(workload, n, duration, tag, users, self.table, self.events_table)]
        else:  # one process per client
            tasks = [
                Task(workload, 1, duration, f"{tag}:{k}", users, self.table, self.events_table, mode != SHARED_MODE)
                for k in range(n)
            ]
        parts, machine = workers.run(tasks, timeout_s=60 + 4 * duration)
        cell = cell_figures(parts, duration, machine)
        for key, name in names(mode, n, workload).items():
            if key in cell:
                self.figures[name] = round(cell[key], 4 if key in ROUNDED_FINE else 1)
        first_error = next((p["first_error"] for p in parts if p["first_error"]), "")
        self.echo(
            f"{n:>5}{mode} {workload:>8} {cell['per_s']:>9,.0f} {cell['p50_ms']:>8.2f} "
            f"{cell['p99_ms']:>8.2f} {cell['clash_rate']:>6.1%} {cell['full_loads_per_command']:>8.3f} "
            f"{cell['fastforwards_per_command']:>7.3f} {cell['fastforward_events_per_command']:>7.2f} "
            f"{cell['exhausted']:>7.0f} {cell['client_cpu_us_per_command']:>8,.0f} "
            f"{cell.get('other_cpu_us_per_command', 0.0):>8,.0f} {cell.get('machine_busy', 0.0):>5.0%}"
            + (f"  errors {cell['errors']:.0f}, first: {first_error}" if first_error else "")
        )


def run(
    base: str,
    schema: str,
    echo: Callable[[str], None] = say,
    *,
    quick: bool = False,
    clients: Sequence[int] | None = None,
    cell_s: float | None = None,
    executor: str = DEFAULT_EXECUTOR,
    modes: Sequence[str] = ALL_MODES,
) -> dict[str, float]:
    """Every cell on a fresh ``schema`` (the caller drops it). Returns the figures by JSON name."""
    counts = tuple(clients or (QUICK_CLIENTS if quick else CLIENTS))
    duration = cell_s or (QUICK_CELL_S if quick else CELL_S)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    conninfo = conninfo_of(base)
    url = schema_url(base, schema, 2)
    threads_url = schema_url(base, schema, max(counts))
    many = [uuid.uuid4() for _ in range(MANY_ACCOUNTS)]
    hot = uuid.uuid4()
    fund(url, [*many, hot])
    figures: dict[str, float] = {}
    table = f"{schema}.scaling_raw"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE TABLE {} (id BIGSERIAL PRIMARY KEY, payload TEXT NOT NULL)").format(
                sql.Identifier(schema, "scaling_raw")
            )
        )
        # The events table's columns, key and notification ids (as eventsourcing creates it).
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (originator_id uuid NOT NULL, originator_version bigint NOT NULL, topic text, "
                "state bytea, notification_id bigserial, PRIMARY KEY (originator_id, originator_version)); "
                "CREATE UNIQUE INDEX ON {} (notification_id)"
            ).format(sql.Identifier(schema, "scaling_events"), sql.Identifier(schema, "scaling_events"))
        )
    events_table = f"{schema}.scaling_events"
    rounds = QUICK_ALTERNATING_ROUNDS if quick or duration < CELL_S else ALTERNATING_ROUNDS
    for label, policy in (("", plain), ("_evicting", evicting)):
        found = alternating(url, policy, rounds, ALTERNATING_HISTORY)
        for key, value in found.items():
            figures[f"alternating_{key}{label}"] = round(value, 4 if key != "ms_per_command" else 3)
    echo(
        f"two Ledgers taking turns on one {ALTERNATING_HISTORY}-event account ({rounds} rounds): "
        f"{figures['alternating_ms_per_command']:.2f} ms a command, clash rate "
        f"{figures['alternating_clash_rate']:.0%}, rebuilds {figures['alternating_full_loads_per_command']:.2f} "
        f"and fast-forwards {figures['alternating_fastforwards_per_command']:.2f} a command; evicting "
        f"instead: {figures['alternating_ms_per_command_evicting']:.2f} ms, clash rate "
        f"{figures['alternating_clash_rate_evicting']:.0%}, rebuilds "
        f"{figures['alternating_full_loads_per_command_evicting']:.2f} a command"
    )
    warm = [str(u) for u in [*many, hot]]
    echo(f"scaling: {max(counts)} client processes ({executor}), cells of {duration:.1f} s, clients {counts}")
    echo(HEADER)
    cells = Cells(figures, counts, duration, warm, str(hot), table, events_table, echo)
    workers = Workers(max(counts), url, threads_url, conninfo, executor, warm)
    try:
        for mode in MODES:
            if mode in modes:
                cells.run(workers, mode)
            elif mode == "p":  # the baseline every target is measured against
                cells.run(workers, mode, only=("raw",))
    finally:
        workers.stop()
    if SHARED_MODE in modes:
        # Processes sharing one group commit (docs/group-commit.md): fresh
        # workers, each opening its Ledger with share_group_commit.
        shared_started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ledger-share-") as directory:
            share_path = os.path.join(directory, "ledger.sock")
            workers = Workers(max(counts), url, threads_url, conninfo, executor, warm, share_path=share_path)
            try:
                cells.run(workers, SHARED_MODE)
            finally:
                workers.stop()
        figures["scaling_shared_elapsed_s"] = round(time.perf_counter() - shared_started, 1)
    top = max(counts)
    for mode in ALL_MODES:
        if f"concurrency_exhausted_{top}{mode}_many" not in figures:
            continue
        figures[f"concurrency_exhausted_{top}{mode}"] = (
            figures[f"concurrency_exhausted_{top}{mode}_many"] + figures[f"concurrency_exhausted_{top}{mode}_hot"]
        )
    figures["scaling_cell_s"] = duration
    figures["scaling_elapsed_s"] = round(time.perf_counter() - started, 1)
    figures["scaling_load_average_1m"] = round(max(load_before, os.getloadavg()[0]), 2)
    report_targets(figures, counts, echo)
    return figures


def report_targets(figures: dict[str, float], counts: Sequence[int], echo: Callable[[str], None]) -> None:
    """The issue's targets, for processes that each run their own commands
    (``p``) and, when measured, for processes sharing one group commit (``s``)."""
    top = max(counts)
    raw = figures[f"raw_insert_commit_per_s_{top}p"]
    for mode, what in (
        ("p", "each process running its own commands"),
        (SHARED_MODE, "the processes sharing one group commit"),
    ):
        if f"commands_per_s_{top}{mode}_many" not in figures:
            continue
        many = [figures[f"commands_per_s_{n}{mode}_many"] for n in counts]
        hot = figures[f"commands_per_s_{top}{mode}_hot"]
        exhausted = figures[f"concurrency_exhausted_{top}{mode}"]
        p99 = figures[f"p99_ms_{top}{mode}_hot"]
        checks = [
            (
                f"commands_per_s_{top}{mode}_many >= {TARGET_MANY_VS_RAW} x raw_insert_commit_per_s_{top}p",
                many[-1] >= TARGET_MANY_VS_RAW * raw,
                f"{many[-1]:,.0f} vs {raw:,.0f}: {many[-1] / raw:.2f}",
            ),
            (
                f"commands_per_s_N{mode}_many never lower than with fewer processes",
                all(b >= a for a, b in itertools.pairwise(many)),
                " -> ".join(f"{x:,.0f}" for x in many),
            ),
            (
                f"commands_per_s_{top}{mode}_hot >= {TARGET_HOT_VS_RAW} x raw_insert_commit_per_s_{top}p",
                hot >= TARGET_HOT_VS_RAW * raw,
                f"{hot:,.0f} vs {raw:,.0f}: {hot / raw:.2f}",
            ),
            (f"concurrency_exhausted_{top}{mode} == 0", exhausted == 0, f"{exhausted:.0f}"),
            (f"p99_ms_{top}{mode}_hot <= {TARGET_P99_MS_HOT:.0f}", p99 <= TARGET_P99_MS_HOT, f"{p99:.1f} ms"),
        ]
        echo(f"scaling targets, {what}:")
        for label, met, value in checks:
            echo(f"  {'met   ' if met else 'MISSED'}  {label}  ({value})")
        locked = figures.get(f"raw_locked_save_per_s_{top}p")
        if locked:
            echo(
                f"  context: a reserve's save written by hand, under the events table's lock, commits "
                f"{locked:,.0f}/s at {top} processes; many reaches {many[-1] / locked:.2f} of that, "
                f"hot {hot / locked:.2f}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 and 16 clients, short cells: a smoke test")
    parser.add_argument("--clients", default=None, help="comma-separated client counts (default 1,2,4,8,16)")
    parser.add_argument("--cell-s", type=float, default=None, help=f"seconds per cell (default {CELL_S})")
    parser.add_argument(
        "--modes",
        default=",".join(ALL_MODES),
        help="comma-separated cells to run: p (processes), t (threads), s (processes sharing one group commit); "
        "the raw process cells run whatever is chosen (default p,t,s)",
    )
    parser.add_argument(
        "--executor",
        default=DEFAULT_EXECUTOR,
        help="module:function building the client from an open Ledger (default: the Ledger itself)",
    )
    args = parser.parse_args(argv)
    clients = tuple(int(c) for c in args.clients.split(",")) if args.clients else None
    if clients is not None and (not clients or any(not 1 <= c <= 64 for c in clients)):
        parser.error("--clients takes counts within 1..64")
    modes = tuple(args.modes.split(","))
    if not modes or not set(modes) <= set(ALL_MODES):
        parser.error(f"--modes takes some of {','.join(ALL_MODES)}")
    base = os.environ.get("LEDGER_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)
    schema = f"bench_scaling_{uuid.uuid4().hex[:12]}"
    say(f"PostgreSQL {conninfo_of(base)}, schema {schema}; load average {os.getloadavg()[0]:.2f}")
    try:
        figures = run(base, schema, quick=args.quick, clients=clients, cell_s=args.cell_s, executor=args.executor,
                      modes=modes)  # fmt: skip
    finally:
        with psycopg.connect(conninfo_of(base), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    say(f"elapsed: {figures['scaling_elapsed_s']:.1f} s; load average {os.getloadavg()[0]:.2f}")
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
