"""Tampering with stored snapshots, behind the ledger's back, with raw SQL.

A snapshot is a cache of an account's events: an edited one must not move
money (``balance()`` and ``spend()`` do not use it), and ``audit`` and
``verify`` must name it. SQLite (``stored_snapshots``) and PostgreSQL
(``ledger_snapshots``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest

from ledger import (
    Auditor,
    BatchRejected,
    DigestHead,
    InsufficientCredits,
    Ledger,
    ManualClock,
    SpendCredits,
)
from ledger.domain.credits import account_id_for
from ledger.storage.sealing import sealed
from tests.conftest import START
from tests.test_audit_tamper import RawEvents

FORGED = 1_000_000


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'snapshots.sqlite3'}"
    url: str = request.getfixturevalue("pg_url")
    return url


class RawSnapshots(RawEvents):
    """The snapshot table, reached around the ledger."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.snapshots = (
            self.table.replace("ledger_events", "ledger_snapshots") if self.postgres else "stored_snapshots"
        )
        self.key = "%s" if self.postgres else "?"

    def _id(self, aggregate_id: UUID) -> Any:
        return aggregate_id if self.postgres else aggregate_id.hex

    def newest(self, aggregate_id: UUID) -> tuple[int, dict[str, Any]]:
        rows = self.sql(
            f"SELECT originator_version, state FROM {self.snapshots} WHERE originator_id = %s "
            "ORDER BY originator_version DESC",
            self._id(aggregate_id),
        )
        assert rows, "the story should have made a snapshot"
        version, state = rows[0]
        return int(version), json.loads(bytes(state))

    def versions(self, aggregate_id: UUID) -> list[int]:
        rows = self.sql(
            f"SELECT originator_version FROM {self.snapshots} WHERE originator_id = %s ORDER BY originator_version",
            self._id(aggregate_id),
        )
        return [int(v) for (v,) in rows]

    def write(self, aggregate_id: UUID, version: int, state: dict[str, Any], *, new_version: int | None = None) -> None:
        self.sql(
            f"UPDATE {self.snapshots} SET state = %s, originator_version = %s "
            "WHERE originator_id = %s AND originator_version = %s",
            json.dumps(state, separators=(",", ":")).encode(),
            new_version if new_version is not None else version,
            self._id(aggregate_id),
            version,
        )


@contextmanager
def raw_snapshots(url: str) -> Iterator[RawSnapshots]:
    raw = RawSnapshots(url)
    try:
        yield raw
    finally:
        raw.close()


def forge(state: dict[str, Any]) -> str:
    """Adds FORGED credits to the balance and to one block (granted and
    remaining, so the account's own invariants still hold); returns the block."""
    state["state"]["balance"] += FORGED
    block_id, block = next(iter(state["state"]["blocks"].items()))
    block["_data_"]["remaining"] += FORGED
    block["_data_"]["granted"] += FORGED
    return str(block_id)


def story(url: str) -> tuple[UUID, DigestHead]:
    """An account of 1,000 credits with 130 events (a snapshot at version 100):
    880 credits after 120 spends and a reserve; and the digest of it all."""
    clock = ManualClock(START)
    user = uuid4()
    with Ledger(url, clock=clock) as ledger:
        ledger.grant(user, 1_000, "purchase", key="grant")
        ledger.execute_batch([SpendCredits(key=f"spend:{i}", user_id=user, amount_credits=1) for i in range(120)])
        for i in range(8):
            ledger.spend(user, 1, key=f"later:{i}")
        assert ledger.balance(user).balance_credits == 872
    with Auditor(url) as auditor:
        result = auditor.digest(every=50)
        assert result.ok and auditor.audit().ok
        assert auditor.verify(result.head).ok
    return user, result.head


def snapshot_findings(url: str) -> list[str]:
    with Auditor(url) as auditor:
        report = auditor.audit()
    return [f"{f.subject}: {f.message}" for f in report.findings if f.check == "snapshot"]


def test_an_edited_snapshot_moves_no_money(durable_url: str, caplog: pytest.LogCaptureFixture) -> None:
    user, head = story(durable_url)
    with raw_snapshots(durable_url) as raw:
        version, state = raw.newest(account_id_for(user))
        assert version == 100
        block_id = forge(state)
        raw.write(account_id_for(user), version, state)

    with caplog.at_level(logging.WARNING, logger="ledger.snapshots"), Ledger(durable_url) as ledger:
        balance = ledger.balance(user)
        assert (balance.balance_credits, balance.available_credits) == (872, 872)
        assert max(b.remaining_credits for b in balance.blocks) == 872
        with pytest.raises(InsufficientCredits):
            ledger.spend(user, 900_000, key="steal")
        with pytest.raises(BatchRejected) as rejected:  # a batch loads accounts in bulk: same check
            ledger.execute_batch([SpendCredits(key="steal:batch", user_id=user, amount_credits=900_000)])
        assert isinstance(rejected.value.cause, InsufficientCredits)
        assert len(ledger.history(user, limit=1_000)) == 130  # nothing recorded
    warnings = [r.getMessage() for r in caplog.records if r.name == "ledger.snapshots"]
    assert warnings and all("version 100 not used" in w and "seal does not match" in w for w in warnings)

    findings = snapshot_findings(durable_url)
    assert len(findings) == 1
    assert f"user {user}" in findings[0] and "version 100" in findings[0]
    assert "balance 1000902 (the events say 902)" in findings[0] and block_id in findings[0]
    with Auditor(durable_url) as auditor:
        verified = auditor.verify(head)
    assert verified.history_intact and not verified.ok  # the events are intact; the snapshot is not
    assert [(p.user_id, p.version) for p in verified.snapshot_problems] == [(user, 100)]
    assert any("differ from their events" in line for line in verified.describe())


def test_the_next_command_replaces_a_refused_snapshot(durable_url: str) -> None:
    user, _ = story(durable_url)
    account_id = account_id_for(user)
    with raw_snapshots(durable_url) as raw:
        version, state = raw.newest(account_id)
        forge(state)
        raw.write(account_id, version, state)
    with Ledger(durable_url) as ledger:
        assert ledger.spend(user, 2, key="after").balance_credits == 870
    with raw_snapshots(durable_url) as raw:
        assert raw.versions(account_id) == [100, 131]  # a sealed snapshot of the replayed state
    with Ledger(durable_url) as ledger:
        assert ledger.balance(user).balance_credits == 870
        assert account_id not in ledger.app.unsealed  # the new one is used


def test_a_resealed_snapshot_is_still_named_by_audit_and_verify(durable_url: str) -> None:
    """The seal is unkeyed: whoever can write the table can recompute it
    (docs/auditing.md). The replay in audit and verify still names it."""
    user, head = story(durable_url)
    account_id = account_id_for(user)
    with Ledger(durable_url) as ledger, raw_snapshots(durable_url) as raw:
        version, state = raw.newest(account_id)
        forge(state)
        raw.write(account_id, version, state)
        stored = ledger.app.snapshots.recorder.select_events(account_id, gt=version - 1, lte=version)  # type: ignore[union-attr]
        (event_at,) = ledger.app.recorder.select_events(account_id, gt=version - 1, lte=version)
        forged = ledger.app.mapper.to_domain_event(stored[0])
        resealed = ledger.app.mapper.to_stored_event(sealed(ledger.app.mapper.transcoder, forged, event_at))
        raw.write(account_id, version, json.loads(resealed.state))
    findings = snapshot_findings(durable_url)
    assert len(findings) == 1 and "balance 1000902 (the events say 902)" in findings[0]
    with Auditor(durable_url) as auditor:
        assert [p.version for p in auditor.verify(head).snapshot_problems] == [100]


def test_a_snapshot_moved_past_the_events_is_not_used(durable_url: str) -> None:
    user, _ = story(durable_url)
    account_id = account_id_for(user)
    with raw_snapshots(durable_url) as raw:
        version, state = raw.newest(account_id)
        forge(state)
        raw.write(account_id, version, state, new_version=500)
    with Ledger(durable_url) as ledger:
        assert ledger.balance(user).balance_credits == 872
        assert ledger.spend(user, 2, key="after").balance_credits == 870  # version 131, not 501
        assert ledger.history(user, after_version=130)[0].version == 131
    findings = snapshot_findings(durable_url)
    assert any("version 500" in f and "events that do not exist" in f for f in findings)


def test_a_snapshot_without_a_seal_is_replayed_and_passes_the_audit(durable_url: str) -> None:
    """As stored before snapshots were sealed: not used, but not a finding
    while its state is the events' state."""
    user, head = story(durable_url)
    account_id = account_id_for(user)
    with raw_snapshots(durable_url) as raw:
        version, state = raw.newest(account_id)
        del state["seal"]
        raw.write(account_id, version, state)
    with Ledger(durable_url) as ledger:
        assert ledger.balance(user).balance_credits == 872
        assert account_id in ledger.app.unsealed
    with Auditor(durable_url) as auditor:
        report = auditor.audit()
        assert report.ok, report.render()
        assert any("carry no seal" in note for note in report.notes)
        assert auditor.verify(head).ok


def test_a_snapshot_over_a_broken_stream_is_named_not_a_crash(durable_url: str) -> None:
    """An event deleted below the snapshot: the audit and verify still run;
    the snapshot is named as one that cannot be checked (and the deletion by
    the other checks)."""
    user, head = story(durable_url)
    account_id = account_id_for(user)
    with raw_snapshots(durable_url) as raw:
        [(position,)] = raw.sql(
            "SELECT {id} FROM {t} WHERE originator_id = %s AND originator_version = 50", raw._id(account_id)
        )
        raw.delete(position)
    findings = snapshot_findings(durable_url)
    assert len(findings) == 1 and "version 100" in findings[0] and "cannot be replayed" in findings[0]
    with Auditor(durable_url) as auditor:
        verified = auditor.verify(head)
    assert not verified.history_intact
    assert [p.version for p in verified.snapshot_problems] == [100]
