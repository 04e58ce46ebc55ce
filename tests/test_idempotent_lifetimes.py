"""A retry is the same command: lifetimes given as ``expires_in`` count from
when the command is recorded, so a worker's retry replays where a recomputed
``expires_at`` conflicts; and a conflict names the arguments that differ."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import StoredEvent

from ledger import (
    BatchRejected,
    GrantCredits,
    IdempotencyConflict,
    InvalidArgument,
    Ledger,
    ManualClock,
    ReserveCredits,
)

ROOT = Path(__file__).resolve().parent.parent
USER = UUID("00000000-0000-4000-8000-000000000001")  # the fixture's user
HOUR = timedelta(hours=1)


def _readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    use = text.split("## Use", 1)[1]
    match = re.search(r"```python\n(.*?)```", use, re.S)
    assert match, "README.md has no python snippet under ## Use"
    return match.group(1)


def test_the_readme_snippet_runs_twice_against_one_sqlite_file(tmp_path: Path) -> None:
    snippet = _readme_snippet()
    assert 'Ledger("sqlite:///ledger.sqlite3")' in snippet  # the file the two runs share
    runs = [
        subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stdout + run.stderr
    first, second = (re.sub(r"as_of=.*", "", run.stdout) for run in runs)
    assert first == second
    assert "balance_credits=4760 held_credits=0 available_credits=4760" in first
    assert (tmp_path / "ledger.sqlite3").exists()


# ------------------------------------------------------------ expires_in


def test_a_retried_reserve_with_expires_in_replays_the_first_hold(ledger: Ledger, clock: ManualClock) -> None:
    user, job = uuid4(), uuid4()
    ledger.grant(user, 1000, "bonus", key=f"{user}:grant")
    first = ledger.reserve(user, job, 300, expires_in=HOUR, key=f"job:{job}:reserve")
    clock.advance(timedelta(seconds=42))  # the worker timed out and retries
    again = ledger.reserve(user, job, 300, expires_in=HOUR, key=f"job:{job}:reserve")
    assert (again.replayed, again.reservation_id, again.held_credits) == (True, first.reservation_id, 300)
    assert first.reservation_id is not None
    hold = ledger.reservation(first.reservation_id)
    assert hold.expires_at == first.recorded_at + HOUR
    # The event keeps the absolute time, as events always have.
    (reserved,) = [e for e in ledger.history(user) if e.type == "reserved"]
    assert reserved.data["expires_at"] == first.recorded_at + HOUR
    clock.advance(HOUR)
    assert ledger.expire_holds() == 1


def test_a_retried_grant_with_expires_in_replays_and_its_block_lapses_on_time(
    ledger: Ledger, clock: ManualClock
) -> None:
    user = uuid4()
    first = ledger.grant(user, 5000, "subscription_grant", key="invoice:1", expires_in=timedelta(days=30))
    clock.advance(timedelta(minutes=5))
    again = ledger.grant(user, 5000, "subscription_grant", key="invoice:1", expires_in=timedelta(days=30))
    assert again.replayed and again.entry_id == first.entry_id
    (block,) = ledger.balance(user).blocks
    assert block.expires_at == first.recorded_at + timedelta(days=30)
    clock.set(first.recorded_at + timedelta(days=30))
    assert ledger.balance(user).balance_credits == 0


def test_the_absolute_form_still_works_and_a_recomputed_one_conflicts_naming_expires_at(
    ledger: Ledger, clock: ManualClock
) -> None:
    user, job = uuid4(), uuid4()
    ledger.grant(user, 1000, "bonus", key=f"{user}:grant")
    at = clock.now() + HOUR
    ledger.reserve(user, job, 300, at, key="job:reserve")
    assert ledger.reserve(user, job, 300, at, key="job:reserve").replayed  # a fixed instant retries fine
    clock.advance(timedelta(seconds=3))
    head = ledger.app.recorder.max_notification_id()
    with pytest.raises(IdempotencyConflict) as raised:
        ledger.reserve(user, job, 300, clock.now() + HOUR, key="job:reserve")
    assert raised.value.fields == ("expires_at",)
    assert "differing: expires_at" in str(raised.value) and "expires_in" in str(raised.value)
    with pytest.raises(IdempotencyConflict) as raised:
        ledger.reserve(user, job, 300, expires_in=HOUR, key="job:reserve")
    assert raised.value.fields == ("expires_at", "expires_in")
    with pytest.raises(IdempotencyConflict) as raised:
        ledger.spend(user, 300, key="job:reserve")
    assert raised.value.fields is not None and {"command", "kind"} <= set(raised.value.fields)
    assert (raised.value.recorded_command, raised.value.command) == ("reserve", "spend")
    assert ledger.app.recorder.max_notification_id() == head


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"expires_in": timedelta(0)}, "positive"),
        ({"expires_in": -HOUR}, "positive"),
        ({"expires_in": timedelta(days=40_000)}, "at most"),
        ({"expires_in": 3600}, "timedelta"),
        ({"expires_in": HOUR, "expires_at": datetime(2027, 1, 1, tzinfo=UTC)}, "not both|exactly one"),
    ],
)
def test_bad_lifetimes_are_refused_before_anything_runs(given: dict[str, object], message: str) -> None:
    user = uuid4()
    with pytest.raises(InvalidArgument, match=message):
        GrantCredits(key="g", user_id=user, amount_credits=1, kind="bonus", **given)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=message):
        ReserveCredits(key="r", user_id=user, job_id=uuid4(), amount_credits=1, **given)  # type: ignore[arg-type]


def test_a_lifetime_past_the_last_time_the_ledger_takes_is_refused(ledger_url: str) -> None:
    clock = ManualClock(datetime(8950, 1, 1, tzinfo=UTC))
    with Ledger(ledger_url, clock=clock) as ledger, pytest.raises(InvalidArgument, match="the last time the ledger"):
        ledger.grant(uuid4(), 1, "bonus", key="late", expires_in=timedelta(days=36_500))


def test_a_hold_needs_a_lifetime(ledger: Ledger) -> None:
    user = uuid4()
    ledger.grant(user, 10, "bonus", key=f"{user}:g")
    with pytest.raises(InvalidArgument, match="exactly one"):
        ledger.reserve(user, uuid4(), 5, key=f"{user}:r")


def test_absolute_commands_keep_the_fingerprints_earlier_versions_recorded() -> None:
    """``expires_in`` is an ADDED field: at its default the digests are those
    version 0.1 computed, so keys recorded then still replay."""
    user, job = UUID("00000000-0000-4000-8000-000000000001"), UUID("00000000-0000-4000-8000-0000000000b2")
    at = datetime(2026, 1, 1, 1, tzinfo=UTC)
    reserve = ReserveCredits(key="k", user_id=user, job_id=job, amount_credits=300, expires_at=at)
    assert reserve.fingerprint == "f45a365b460d86df9eb18b3d66bfd480ae02815f439b03e502a0eaf043e8fc8d"
    grant = GrantCredits(key="k", user_id=user, amount_credits=5000, kind="subscription_grant", expires_at=at)
    assert grant.fingerprint == "8bb4e7241b21da75713b9b0264e88cd517f9c6c7ef0d7e14a667698ad9a5737e"
    relative = ReserveCredits(key="k", user_id=user, job_id=job, amount_credits=300, expires_in=HOUR)
    assert relative.arguments["expires_in"] == "PT3600S" and relative.fingerprint != reserve.fingerprint


# ------------------------------------------------ which arguments differ


def test_the_record_keeps_the_arguments_and_a_conflict_names_what_differs(ledger: Ledger) -> None:
    user = uuid4()
    command = GrantCredits(key="promo", user_id=user, amount_credits=10, kind="bonus", description="welcome")
    ledger.execute(command)
    record = ledger.engine.find_record("promo")
    assert record is not None and record.arguments == command.arguments
    with pytest.raises(IdempotencyConflict) as raised:
        ledger.grant(user, 20, "bonus", key="promo", description="welcome!")
    assert raised.value.fields == ("amount_credits", "description")
    assert "differing: amount_credits, description" in str(raised.value)


def test_two_commands_of_one_batch_with_one_key_name_what_differs(ledger: Ledger) -> None:
    user = uuid4()
    with pytest.raises(IdempotencyConflict) as raised:
        ledger.execute_batch(
            [
                GrantCredits(key="same", user_id=user, amount_credits=10, kind="bonus"),
                GrantCredits(key="same", user_id=user, amount_credits=10, kind="purchase"),
            ]
        )
    assert raised.value.fields == ("kind",)


def test_a_batch_against_a_recorded_key_names_what_differs(ledger: Ledger) -> None:
    user = uuid4()
    ledger.grant(user, 10, "bonus", key="first")
    with pytest.raises(BatchRejected) as raised:
        ledger.execute_batch(
            [
                GrantCredits(key="other", user_id=user, amount_credits=1, kind="bonus"),
                GrantCredits(key="first", user_id=uuid4(), amount_credits=10, kind="bonus"),
            ]
        )
    assert isinstance(raised.value.cause, IdempotencyConflict) and raised.value.cause.fields == ("user_id",)


def test_a_key_recorded_by_version_0_1_replays_and_its_conflict_says_the_fields_are_unknown(ledger: Ledger) -> None:
    rows = json.loads((ROOT / "tests" / "fixtures" / "stored_events_v0_1.json").read_text())["rows"]
    ledger.app.recorder.insert_events(
        [
            StoredEvent(UUID(r["originator_id"]), r["originator_version"], r["topic"], r["state"].encode())
            for r in rows
            if r["table"] == "events"
        ]
    )
    record = ledger.engine.find_record("fx:g2")
    assert record is not None and record.arguments is None  # written before arguments were kept
    assert ledger.grant(USER, 500, "purchase", key="fx:g2").replayed
    with pytest.raises(IdempotencyConflict) as raised:
        ledger.grant(USER, 501, "purchase", key="fx:g2")
    assert raised.value.fields is None
    assert "unknown" in str(raised.value) and "earlier version" in str(raised.value)
