"""Bulk loading (StreamReader) gives exactly what eventsourcing's repository
gives, one aggregate at a time: from a snapshot and the events after it, from
events alone, and nothing for ids that do not exist. On every backend."""

from __future__ import annotations

import uuid

from ledger import Command, CreditKind, GrantCredits, Ledger, SpendCredits
from ledger.domain.credits import CreditAccount, account_id_for


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
