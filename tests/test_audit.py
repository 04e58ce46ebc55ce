"""The audit on every backend: a clean ledger passes; each planted defect in
the read models is found and named; resuming from a checkpoint gives the same
answer as one run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from ledger import Auditor, AuditReport, Ledger, ManualClock, audit
from ledger.audit.base import AuditContext, Check
from ledger.audit.runner import checkpoint_position
from ledger.domain.credits import CreditAccount
from tests.conftest import START

HOUR = timedelta(hours=1)


def story(ledger: Ledger, clock: ManualClock) -> dict[str, UUID]:
    """Every kind of event: grants (one expiring), spend, adjustments, holds
    settled (within and beyond what they held), released, expired, and lapsed credits."""
    alice, bob = uuid4(), uuid4()
    ledger.grant(
        alice,
        500,
        "subscription_grant",
        key=f"{alice}:g",
        expires_at=clock.now() + 24 * HOUR,
        reference_type="invoice",
        reference_id="3420871",
    )
    ledger.grant(alice, 100, "bonus", key=f"{alice}:b")
    ledger.grant(bob, 50, "purchase", key=f"{bob}:p", reference_id=str(uuid4()), reference_type="order")
    settled = ledger.reserve(alice, uuid4(), 200, clock.now() + 2 * HOUR, key=f"{alice}:r1")
    ledger.settle(settled.reservation_id, 150, key=f"{alice}:s1")  # type: ignore[arg-type]
    released = ledger.reserve(alice, uuid4(), 100, clock.now() + 2 * HOUR, key=f"{alice}:r2")
    ledger.release(released.reservation_id, "cancelled", key=f"{alice}:rel")  # type: ignore[arg-type]
    ledger.reserve(alice, uuid4(), 30, clock.now() + HOUR, key=f"{alice}:r3")
    ledger.spend(bob, 20, key=f"{bob}:api")
    ledger.adjust(bob, -5, "correction", "admin:kim", key=f"{bob}:adj")
    extra = ledger.reserve(bob, uuid4(), 10, clock.now() + HOUR, key=f"{bob}:r4")
    ledger.settle(extra.reservation_id, 12, key=f"{bob}:s4", user_id=bob)  # type: ignore[arg-type]
    clock.advance(25 * HOUR)
    ledger.expire_holds()
    ledger.record_due([alice])
    ledger.adjust(alice, 40, "goodwill", "admin:kim", key=f"{alice}:adj")
    ledger.views.catch_up()
    return {
        "alice": alice,
        "bob": bob,
        "settled": settled.reservation_id,  # type: ignore[dict-item]
        "released": released.reservation_id,  # type: ignore[dict-item]
    }


def checks_named(report: AuditReport) -> set[str]:
    return {f.check for f in report.findings}


def assert_names(report: AuditReport, check: str, *fragments: str) -> None:
    """Some finding of ``check`` mentions every fragment."""
    for finding in report.findings:
        text = f"{finding.subject} {finding.message} {finding.position}"
        if finding.check == check and all(f in text for f in fragments):
            return
    raise AssertionError(f"no {check} finding naming {fragments}:\n{report.render()}")


def test_a_clean_ledger_passes(ledger: Ledger, clock: ManualClock) -> None:
    users = story(ledger, clock)
    report = audit(ledger)
    assert report.ok, report.render()
    assert report.events == report.head == ledger.app.recorder.max_notification_id()
    assert report.views_position == report.head
    assert report.summary["accounts"] == 2
    credits = report.summary["credits"]
    balances = sum(ledger.balance(u).balance_credits for u in (users["alice"], users["bob"]))
    assert credits["balance"] == balances
    assert credits["granted"] - credits["debited"] - credits["settled"] - credits["expired"] == balances
    assert report.summary["views_rows_compared"]["credit_transactions"] == report.summary["postings"]
    assert "PASSED" in report.render()
    assert json.loads(report.to_json())["ok"] is True


def test_an_empty_ledger_passes(ledger: Ledger) -> None:
    report = audit(ledger)
    assert report.ok and report.events == 0 and report.digest.startswith("0:")


def test_an_edited_view_row_is_named(ledger: Ledger, clock: ManualClock) -> None:
    story(ledger, clock)
    with ledger.views.store.transaction() as tx:
        tx.execute("UPDATE credit_transactions SET description = 'edited by hand' WHERE amount = -20")
        [(row_id, position)] = tx.fetchall("SELECT id, log_position FROM credit_transactions WHERE amount = -20")
    report = audit(ledger)
    assert not report.ok
    assert_names(report, "view", str(row_id), "description", "edited by hand", str(position))
    assert checks_named(report) == {"view"}


def test_a_broken_balance_after_is_named(ledger: Ledger, clock: ManualClock) -> None:
    users = story(ledger, clock)
    with ledger.views.store.transaction() as tx:
        tx.execute("UPDATE credit_transactions SET balance_after = 999 WHERE amount = -20")
        [(position,)] = tx.fetchall("SELECT log_position FROM credit_transactions WHERE amount = -20")
    report = audit(ledger)
    assert not report.ok
    assert_names(report, "chain", str(users["bob"]), "999", str(position))
    assert_names(report, "view", "balance_after is 999", str(position))


def test_a_hold_closed_twice_in_the_views_is_named(ledger: Ledger, clock: ManualClock) -> None:
    users = story(ledger, clock)
    store = ledger.views.store
    with store.transaction() as tx:
        # A second settlement row for the hold that was settled, at the
        # position of a later event that posted nothing.
        [row] = tx.fetchall(
            "SELECT user_id, reference_id, reference_label, balance_after, created_at, log_position "
            "FROM credit_transactions WHERE type = 'generation_use' AND amount = -150"
        )
        user, job, label, balance_after, created_at, position = row
        tx.execute(
            "INSERT INTO credit_transactions (id, user_id, amount, type, reference_id, reference_type, "
            "reference_label, balance_after, created_at, log_position) "
            "VALUES (%s, %s, -150, 'generation_use', %s, 'generation_job', %s, %s, %s, %s)",
            [str(uuid4()), user, job, label, balance_after - 150, created_at, position + 1],
        )
        # And the released hold's row says settled.
        tx.execute(
            "UPDATE credit_reservations SET status = 'settled', settled_amount = 100 WHERE id = %s",
            [str(users["released"])],
        )
    report = audit(ledger)
    assert_names(report, "view", "charges job", label, "settled twice", str(position + 1))
    assert_names(report, "view", str(users["released"]), "status is 'settled'", "refunded")


def _forge_transaction(ledger: Ledger, user: UUID, log_position: int, when: object) -> UUID:
    """A credit_transactions row no event produced, at ``log_position``."""
    forged = uuid4()
    with ledger.views.store.transaction() as tx:
        tx.execute(
            "INSERT INTO credit_transactions (id, user_id, amount, type, balance_after, created_at, log_position) "
            "VALUES (%s, %s, 1000000, 'bonus', 1000000, %s, %s)",
            [str(forged), str(user), when, log_position],
        )
    return forged


@pytest.mark.parametrize("log_position", [0, -1])
def test_a_row_before_the_first_position_is_named(ledger: Ledger, clock: ManualClock, log_position: int) -> None:
    # Say a row carried over from the seed's own credit_transactions, given
    # log_position 0 when the host added the ledger's columns by hand.
    users = story(ledger, clock)
    forged = _forge_transaction(ledger, users["bob"], log_position, clock.now())
    report = audit(ledger)
    assert not report.ok
    assert_names(report, "view", str(forged), "not produced by any event", str(users["bob"]))


@pytest.mark.parametrize("where", ["far past the head", "at an event the views have not projected"])
def test_a_row_past_the_views_position_is_named(ledger: Ledger, clock: ManualClock, where: str) -> None:
    users = story(ledger, clock)
    if where == "far past the head":
        position = 1_000_000
    else:
        ledger.grant(users["bob"], 10, "bonus", key=f"{users['bob']}:late")  # recorded, not projected
        position = ledger.app.recorder.max_notification_id()
    assert position > ledger.views.position()
    forged = _forge_transaction(ledger, users["bob"], position, clock.now())
    report = audit(ledger)
    assert not report.ok
    assert_names(report, "view", str(forged), "past the views' position", str(position), str(users["bob"]))
    assert checks_named(report) == {"view"}


def test_rows_a_projector_writes_during_the_audit_are_not_taken_for_forgeries(
    ledger: Ledger, clock: ManualClock
) -> None:
    story(ledger, clock)
    ledger.grant(uuid4(), 10, "bonus", key=f"{uuid4()}:late")  # recorded, not projected yet
    found_at = ledger.views.position()
    report = audit(ledger, page_events=1, progress=lambda position, head: ledger.views.catch_up())
    # (Other tables can differ from what the audit read: audit a quiet store.)
    assert not [f for f in report.findings if "past the views' position" in f.message], report.render()
    assert report.views_position == found_at < report.head
    assert any(f"moved from position {found_at} to {report.head}" in note for note in report.notes)


def test_many_rows_past_the_views_position_are_counted(ledger: Ledger, clock: ManualClock) -> None:
    from ledger.audit.checks.views import MAX_NAMED_EXTRAS

    users = story(ledger, clock)
    for n in range(MAX_NAMED_EXTRAS + 3):
        _forge_transaction(ledger, users["alice"], 1_000_000 + n, clock.now())
    report = audit(ledger)
    named = [f for f in report.findings if "past the views' position" in f.message and f.position is not None]
    assert len(named) == MAX_NAMED_EXTRAS
    assert_names(report, "view", "3 more rows past the views' position")


def test_edited_balances_and_missing_rows_are_named(ledger: Ledger, clock: ManualClock) -> None:
    users = story(ledger, clock)
    with ledger.views.store.transaction() as tx:
        tx.execute(
            "UPDATE credit_balances SET balance = balance + 7, available = available + 7 WHERE user_id = %s",
            [str(users["alice"])],
        )
        tx.execute("DELETE FROM credit_reservations WHERE id = %s", [str(users["settled"])])
        tx.execute("DELETE FROM credit_transactions WHERE amount = -5")
    report = audit(ledger)
    assert_names(report, "view", str(users["alice"]), "credit_balances says balance")
    assert_names(report, "view", str(users["settled"]), "no credit_reservations row")
    assert_names(report, "view", str(users["bob"]), "no credit_transactions row", "-5")


def test_lagging_views_are_compared_at_their_own_position(ledger: Ledger, clock: ManualClock) -> None:
    story(ledger, clock)
    ledger.grant(uuid4(), 10, "bonus", key=f"{uuid4()}:late")  # recorded, not projected
    report = audit(ledger)
    assert report.ok, report.render()
    assert report.views_position is not None and report.views_position < report.head
    assert any("lag" in note for note in report.notes)


def test_the_views_can_be_left_alone(ledger: Ledger, clock: ManualClock) -> None:
    story(ledger, clock)
    with ledger.views.store.transaction() as tx:
        tx.execute("UPDATE credit_transactions SET balance_after = 999")
    report = audit(ledger, compare_views=False)
    assert report.ok and "view" not in report.checks and report.views_position is None


class _Stop(Exception):
    """Ends a run from its progress callback, as a crash would."""


def _stop_at(path: Path, position: int) -> None:
    if path.exists() and checkpoint_position(path) >= position:
        raise _Stop


@pytest.fixture
def interrupted_checkpoint(ledger: Ledger, clock: ManualClock, tmp_path: Path) -> Iterator[tuple[Path, int]]:
    story(ledger, clock)
    path = tmp_path / "cp.json"
    # Checkpoints at every transaction boundary; the run "crashes" after the first.
    with pytest.raises(_Stop):
        audit(ledger, checkpoint=path, checkpoint_every=1, page_events=2, progress=lambda p, h: _stop_at(path, 1))
    yield path, checkpoint_position(path)


def test_a_run_interrupted_resumes_where_it_saved(ledger: Ledger, interrupted_checkpoint: tuple[Path, int]) -> None:
    path, position = interrupted_checkpoint
    assert 0 < position < ledger.app.recorder.max_notification_id()
    whole = audit(ledger)
    resumed = audit(ledger, from_position=position, checkpoint=path)
    assert resumed.ok, resumed.render()
    assert (resumed.digest, resumed.summary) == (whole.digest, whole.summary)


def test_a_defect_after_the_checkpoint_is_found_on_resume(
    ledger: Ledger, interrupted_checkpoint: tuple[Path, int]
) -> None:
    path, position = interrupted_checkpoint
    with ledger.views.store.transaction() as tx:
        tx.execute("UPDATE credit_transactions SET amount = amount - 1 WHERE log_position > %s", [position])
    resumed = audit(ledger, from_position=position, checkpoint=path)
    assert "chain" in checks_named(resumed) and "view" in checks_named(resumed)


def test_a_checkpoint_of_another_position_is_refused(ledger: Ledger, interrupted_checkpoint: tuple[Path, int]) -> None:
    path, position = interrupted_checkpoint
    with pytest.raises(ValueError, match=f"--from-position {position}"):
        audit(ledger, from_position=position + 1, checkpoint=path)


def test_a_check_is_one_more_class(ledger: Ledger, clock: ManualClock) -> None:
    """The seam a new aggregate's audit plugs into: handlers by event class."""
    story(ledger, clock)

    class NoBigGrants(Check):
        name = "big"
        covers = "no grant over 400 credits"

        def __init__(self, ctx: AuditContext) -> None:
            super().__init__(ctx)
            self.grants = 0

        def handlers(self) -> dict[type, object]:  # type: ignore[override]
            return {CreditAccount.Granted: self.granted}

        def granted(self, position: int, event: CreditAccount.Granted) -> None:
            self.grants += 1
            if event.amount > 400:
                self.report(position, f"account {event.originator_id}", f"grant of {event.amount}")

        def summary(self) -> dict[str, int]:
            return {"grants": self.grants}

    report = Auditor(ledger).audit(checks=[NoBigGrants])
    assert report.summary == {"grants": 4}
    assert [f.message for f in report.findings] == ["grant of 500"]


def test_text_in_an_integer_column_is_named_not_a_crash(tmp_path: Path) -> None:
    """SQLite keeps text written into an INTEGER column; the chain check then
    died adding it to the running balance."""
    clock = ManualClock(START)
    with Ledger(f"sqlite:///{tmp_path / 'text.sqlite3'}", clock=clock) as ledger:
        story(ledger, clock)
        with ledger.views.store.transaction() as tx:
            tx.execute("UPDATE credit_transactions SET amount = 'abc' WHERE amount = -20")
            [(row_id, position)] = tx.fetchall("SELECT id, log_position FROM credit_transactions WHERE amount = 'abc'")
        report = audit(ledger)
    assert not report.ok
    assert_names(report, "view", str(row_id), "amount 'abc'", "not both whole numbers", str(position))
    assert_names(report, "view", "amount is 'abc', the events say -20", str(position))
    assert "decode" not in checks_named(report) and "chain" not in checks_named(report)
