"""An event the read models cannot hold, written straight into the store past
every command check (as an old version, a bug or an edit might have): the
projector stops at it with an error that names it, the events before it are
projected, and the audit reports the stall instead of passing."""

from __future__ import annotations

import logging
import threading
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import StoredEvent

from ledger import Ledger, ManualClock, ViewsBehind, ViewsStalled, audit
from ledger.domain.credits import CreditAccount, account_id_for

GRANTED = CreditAccount.Granted.TOPIC


def _grant_past_the_checks(ledger: Ledger, clock: ManualClock, user: UUID, **fields: Any) -> tuple[int, int]:
    """Records a Granted event through the aggregate, bypassing the command's
    validation; returns its position and the account's version."""
    account: Any = ledger.app.repository.get(account_id_for(user))
    values = {"amount": 5, "description": "", **fields}
    account.trigger_event(
        CreditAccount.Granted,
        entry_id=uuid4(),
        kind="bonus",
        reference_type=None,
        reference_id=None,
        expires_at=None,
        actor=None,
        key=f"{user}:past-the-checks",
        timestamp=clock.now(),
        **values,
    )
    ledger.app.save(account)
    return _position_of(ledger, account_id_for(user), account.version), account.version


def _position_of(ledger: Ledger, originator_id: UUID, version: int) -> int:
    for n in ledger.app.recorder.select_notifications(start=1, limit=10_000):
        if n.originator_id == originator_id and n.originator_version == version:
            return n.id
    raise AssertionError("event not found")


def _rows(ledger: Ledger, user: UUID) -> list[tuple[Any, ...]]:
    with ledger.views.store.transaction() as tx:
        return tx.fetchall("SELECT amount FROM credit_transactions WHERE user_id = %s ORDER BY log_position", [user])


def _assert_stalled_at(ledger: Ledger, position: int, originator: UUID, version: int) -> ViewsStalled:
    with pytest.raises(ViewsStalled) as info:
        ledger.views.catch_up()
    stalled = info.value
    assert (stalled.position, stalled.topic, stalled.originator_id, stalled.originator_version) == (
        position,
        GRANTED,
        originator,
        version,
    )
    assert f"position {position}" in str(stalled) and GRANTED in str(stalled) and str(originator) in str(stalled)
    assert stalled.code == "views_stalled"
    return stalled


def test_an_event_no_store_can_write_stalls_the_views_at_it(
    ledger: Ledger, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    before, poisoned, after = uuid4(), uuid4(), uuid4()
    ledger.grant(before, 10, "bonus", key=f"{before}:g")
    ledger.grant(poisoned, 10, "bonus", key=f"{poisoned}:g")
    # Beyond every view store's integers: PostgreSQL INT, SQLite's 64 bits.
    position, version = _grant_past_the_checks(ledger, clock, poisoned, amount=2**70)
    ledger.grant(after, 10, "bonus", key=f"{after}:g")

    with caplog.at_level(logging.ERROR, logger="ledger.projector"):
        stalled = _assert_stalled_at(ledger, position, account_id_for(poisoned), version)
    assert any(r.levelno == logging.ERROR and f"position {position}" in r.getMessage() for r in caplog.records)
    # Everything before the event is projected, nothing after it.
    assert position - 2 <= ledger.views.position() < position
    assert _rows(ledger, before) == [(10,)] and _rows(ledger, poisoned) == [(10,)] and _rows(ledger, after) == []
    # The next attempt stops at the same event, again with its name.
    assert _assert_stalled_at(ledger, position, account_id_for(poisoned), version).position == stalled.position

    report = audit(ledger)
    assert not report.ok and "PASSED" not in report.render()
    found = [f for f in report.findings if f.check == "view" and f.position == position]
    assert found and "stalled" in found[0].message and GRANTED in found[0].message
    assert ledger.views.position() < position  # the audit wrote nothing


def test_commands_of_a_sync_views_ledger_say_the_views_are_stalled(ledger: Ledger, clock: ManualClock) -> None:
    user = uuid4()
    ledger.grant(user, 10, "bonus", key=f"{user}:g")
    position, _ = _grant_past_the_checks(ledger, clock, user, amount=2**70)
    ledger.sync_views = True
    other = uuid4()
    with pytest.raises(ViewsBehind) as info:
        ledger.grant(other, 1, "bonus", key=f"{other}:g")
    assert isinstance(info.value.cause, ViewsStalled) and info.value.cause.position == position
    assert ledger.balance(other).balance_credits == 1  # the command was recorded


def test_a_following_projector_stops_at_the_event_instead_of_retrying_for_ever(
    ledger: Ledger, clock: ManualClock
) -> None:
    user = uuid4()
    ledger.grant(user, 10, "bonus", key=f"{user}:g")
    position, _ = _grant_past_the_checks(ledger, clock, user, amount=2**70)
    stop = threading.Event()
    with pytest.raises(ViewsStalled) as info:
        ledger.views.projector.follow(stop, poll_s=0.01)
    assert info.value.position == position and not stop.is_set()


def test_an_event_that_does_not_decode_stalls_the_views_at_it(ledger: Ledger) -> None:
    user = uuid4()
    ledger.grant(user, 10, "bonus", key=f"{user}:g")
    broken = uuid4()
    ledger.app.recorder.insert_events([StoredEvent(broken, 1, GRANTED, b"{not json")])
    position = ledger.app.recorder.max_notification_id()
    with pytest.raises(ViewsStalled) as info:
        ledger.views.catch_up()
    assert (info.value.position, info.value.originator_id, info.value.originator_version) == (position, broken, 1)
    assert _rows(ledger, user) == [(10,)]
    findings = [f for f in audit(ledger).findings if f.check == "view"]
    assert any(f.position == position and "stalled" in f.message for f in findings)


def test_lagging_views_that_can_catch_up_are_not_a_finding(ledger: Ledger) -> None:
    user = uuid4()
    ledger.grant(user, 10, "bonus", key=f"{user}:g")
    report = audit(ledger)
    assert report.ok, report.render()
    assert any("lag" in note for note in report.notes)
    assert ledger.views.position() == 0  # trying the events wrote nothing
    ledger.views.catch_up()
    assert _rows(ledger, user) == [(10,)]


@pytest.mark.postgres
def test_a_nul_written_past_the_checks_stalls_the_postgresql_views(pg_url: str, clock: ManualClock) -> None:
    """The issue's case: PostgreSQL text cannot hold NUL. The command refuses
    it now; one already in the store stops the projector with its name."""
    with Ledger(pg_url, clock=clock) as ledger:
        user = uuid4()
        ledger.grant(user, 10, "bonus", key=f"{user}:g")
        position, version = _grant_past_the_checks(ledger, clock, user, description="a\x00b")
        stalled = _assert_stalled_at(ledger, position, account_id_for(user), version)
        assert "NUL" in str(stalled.cause)
        finding = [f for f in audit(ledger).findings if f.check == "view" and f.position == position]
        assert finding and "NUL" in finding[0].message
