"""Bulk loading (StreamReader) gives exactly what eventsourcing's repository
gives, one aggregate at a time: from a snapshot and the events after it, from
events alone, and nothing for ids that do not exist. On every backend."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import pg_base_url

from ledger import Command, CreditKind, GrantCredits, Ledger, SpendCredits
from ledger.domain.credits import CreditAccount, account_id_for
from ledger.storage.postgres.streams import PostgresReader


def test_bulk_loads_equal_the_repositorys(ledger_url: str) -> None:
    with Ledger(ledger_url) as ledger:
        short, long_, absent = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        ledger.execute(GrantCredits(key="short", user_id=short, amount_credits=5, kind=CreditKind.BONUS))
        # Enough events for snapshots (every 100), and some after the last one.
        batch: list[Command] = [GrantCredits(key="long", user_id=long_, amount_credits=1_000, kind=CreditKind.BONUS)]
        batch += [SpendCredits(key=f"spend-{i}", user_id=long_, amount_credits=1) for i in range(230)]
        ledger.execute_batch(batch)
        ids = [account_id_for(u) for u in (short, long_, absent)]
        assert ledger.app.snapshots is not None
        snapshot_versions = [e.originator_version for e in ledger.app.snapshots.recorder.select_events(ids[1])]
        assert snapshot_versions and max(snapshot_versions) < ledger.app.repository.get(ids[1]).version
        loaded = ledger.backend.stream_reader(ledger.app).load(ids)
        assert set(loaded) == set(ids[:2])
        for account_id in ids[:2]:
            bulk, single = loaded[account_id], ledger.app.repository.get(account_id)  # type: ignore[var-annotated]
            assert isinstance(bulk, CreditAccount) and isinstance(single, CreditAccount)
            assert (bulk.version, bulk.balance, bulk.held) == (single.version, single.balance, single.held)
            assert bulk.blocks == single.blocks
        assert loaded[ids[1]].balance == 1_000 - 230


@pytest.mark.postgres
def test_bulk_reads_probe_the_index_per_id_whatever_the_tables_size(pg_url: str) -> None:
    """A batch's bulk reads find each id's rows through the index (a nested
    loop over the ids), never by a merge or hash join over the whole events
    table, whose cost would grow with the table; and the planner's guess
    without statistics does not get them JIT-compiled."""
    with Ledger(pg_url) as ledger:
        users = [uuid.uuid4() for _ in range(3_000)]
        ledger.execute_batch(
            GrantCredits(key=f"g:{u}", user_id=u, amount_credits=5, kind=CreditKind.BONUS) for u in users
        )
        reader = ledger.backend.stream_reader(ledger.app)
        assert isinstance(reader, PostgresReader)
        ids = [account_id_for(u) for u in users[:2_000]]
        selects = [reader.events_after_select(dict.fromkeys(ids, 1)), reader.snapshots_and_events_select(ids)]
        with psycopg.connect(pg_base_url(), autocommit=True) as conn:
            for select in selects:
                conn.execute("BEGIN; SET LOCAL jit = off")
                row = conn.execute(f"EXPLAIN (FORMAT JSON) {select}").fetchone()
                conn.execute("ROLLBACK")
                assert row is not None
                scans = list(_scans_of(row[0][0]["Plan"], "ledger_events"))
                assert scans, row[0]
                for scan in scans:
                    # An index probe by the id (the whole index scanned has no condition).
                    condition = scan.get("Index Cond") or scan.get("Recheck Cond") or ""
                    assert scan["Node Type"] in ("Index Scan", "Bitmap Heap Scan", "Index Only Scan"), scan
                    assert "originator_id = " in condition, scan
        # And they read what they should: the grant after each Opened.
        found = reader.events_after(dict.fromkeys(ids, 1))
        assert set(found) == set(ids) and {len(v) for v in found.values()} == {1}
        snapshots, streams = reader.snapshots_and_events(ids[:5])
        assert snapshots == {} and [len(streams[i]) for i in ids[:5]] == [2] * 5


def _scans_of(plan: dict[str, Any], table: str) -> Iterator[dict[str, Any]]:
    """The nodes of an EXPLAIN (FORMAT JSON) plan that read ``table``."""
    if plan.get("Relation Name") == table:
        yield plan
    for child in plan.get("Plans", []):
        yield from _scans_of(child, table)
