"""Point-in-time balances and statements: equal to a slow reference fold over
the account's recorded events at random instants (hypothesis), exported as
CSV and JSON, and the same from the Python API and the CLI."""

from __future__ import annotations

import csv
import io
import itertools
import json
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import (
    AccountEvent,
    Auditor,
    InsufficientCredits,
    InvalidArgument,
    Ledger,
    LedgerError,
    ManualClock,
    UnknownAccount,
)
from tests.conftest import START, SetClock

MINUTE = timedelta(minutes=1)

# ------------------------------------------------------------------ the reference


def reference(events: Sequence[AccountEvent], at: datetime) -> tuple[int, int]:
    """Balance and held credits from every event recorded at or before ``at``:
    the plainest fold there is, over ``Ledger.history``."""
    balance = held = 0
    holds: dict[Any, int] = {}
    for event in events:
        if event.recorded_at > at:
            continue
        data = event.data
        if event.type == "granted":
            balance += data["amount"]
        elif event.type in ("debited", "expired"):
            balance -= data["amount"]
        elif event.type == "reserved":
            holds[data["reservation_id"]] = data["amount"]
            held += data["amount"]
        elif event.type == "settled":
            balance -= data["amount"]
            held -= holds.pop(data["reservation_id"])
        elif event.type == "released":
            held -= holds.pop(data["reservation_id"])
    return balance, held


POSTINGS = {"granted": 1, "debited": -1, "settled": -1, "expired": -1}


# ------------------------------------------------------------------ random histories

operation = st.one_of(
    st.tuples(st.just("grant"), st.integers(1, 500), st.sampled_from([None, 30, 90, 600])),
    st.tuples(st.just("spend"), st.integers(1, 200), st.none()),
    st.tuples(st.just("reserve"), st.integers(1, 200), st.sampled_from([20, 60, 240])),
    st.tuples(st.just("settle"), st.integers(1, 250), st.none()),
    st.tuples(st.just("release"), st.just(0), st.none()),
    st.tuples(st.just("adjust"), st.integers(-100, 100).filter(bool), st.none()),
    st.tuples(st.just("sweep"), st.just(0), st.none()),
)
histories = st.lists(st.tuples(st.integers(0, 120), operation), min_size=1, max_size=25)


def run_history(ledger: Ledger, clock: ManualClock, user: UUID, steps: list[tuple[int, Any]]) -> None:
    """Runs the operations a minute-multiple apart; refused ones are skipped."""
    holds: list[UUID] = []
    ledger.grant(user, 100, "purchase", key=f"{user}:open")
    for n, (wait, (op, amount, minutes)) in enumerate(steps):
        clock.advance(wait * MINUTE)
        key = f"{user}:{n}"
        try:
            if op == "grant":
                expires = clock.now() + minutes * MINUTE if minutes else None
                ledger.grant(user, amount, "bonus", key=key, expires_at=expires)
            elif op == "spend":
                ledger.spend(user, amount, key=key)
            elif op == "reserve":
                receipt = ledger.reserve(user, uuid4(), amount, clock.now() + minutes * MINUTE, key=key)
                holds.append(receipt.reservation_id)  # type: ignore[arg-type]
            elif op in ("settle", "release") and holds:
                hold = holds.pop(0)
                if op == "settle":
                    ledger.settle(hold, amount, key=key, user_id=user)
                else:
                    ledger.release(hold, "cancelled", key=key, user_id=user)
            elif op == "adjust":
                ledger.adjust(user, amount, "correction", "admin:test", key=key)
            elif op == "sweep":
                ledger.record_due([user])
        except (InsufficientCredits, LedgerError):
            continue  # refused: nothing recorded


def check_instants(ledger: Ledger, user: UUID, instants: list[int]) -> None:
    events = ledger.history(user, limit=10_000)
    auditor = Auditor(ledger)
    for minutes in instants:
        at = START + minutes * MINUTE
        got = auditor.balance(user, as_of=at)
        assert (got.balance_credits, got.held_credits) == reference(events, at), at
        assert got.available_credits == got.balance_credits - got.held_credits
        assert sum(b.remaining_credits for b in got.blocks) == got.balance_credits
    for start_minutes, end_minutes in itertools.pairwise(instants):
        start, end = sorted((START + start_minutes * MINUTE, START + end_minutes * MINUTE))
        check_statement(auditor.statement(user, start, end), events, start, end)


def check_statement(s: Any, events: Sequence[AccountEvent], start: datetime, end: datetime) -> None:
    assert (s.opening_balance_credits, s.opening_held_credits) == reference(events, start)
    assert (s.closing_balance_credits, s.closing_held_credits) == reference(events, end)
    expected = [
        (e.version, POSTINGS[e.type] * e.data["amount"])
        for e in events
        if e.type in POSTINGS and start < e.recorded_at <= end
    ]
    assert [(e.version, e.amount_credits) for e in s.entries] == expected
    running = s.opening_balance_credits
    for entry in s.entries:
        running += entry.amount_credits
        assert entry.balance_after == running
    assert running == s.closing_balance_credits
    assert s.credits_in - s.credits_out == s.closing_balance_credits - s.opening_balance_credits
    assert sum(h.amount_credits for h in s.closing_holds) == s.closing_held_credits
    assert sum(h.amount_credits for h in s.opening_holds) == s.opening_held_credits


def test_point_in_time_equals_a_reference_fold(ledger_url: str) -> None:
    examples = 40 if ledger_url == "memory://" else 8

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(steps=histories, instants=st.lists(st.integers(-10, 25 * 125), min_size=2, max_size=8))
    def prop(steps: list[tuple[int, Any]], instants: list[int]) -> None:
        clock = ManualClock(START)
        with Ledger(ledger_url, clock=clock) as ledger:
            user = uuid4()
            run_history(ledger, clock, user, steps)
            # Every instant an event was recorded at, and the random ones.
            recorded = {int((e.recorded_at - START) / MINUTE) for e in ledger.history(user, limit=10_000)}
            check_instants(ledger, user, sorted(set(instants) | recorded))

    prop()


# ------------------------------------------------------------------ a worked statement


def march(ledger: Ledger, clock: ManualClock) -> tuple[UUID, UUID]:
    user = uuid4()
    ledger.grant(user, 1_000, "purchase", key=f"{user}:order")  # 2026-01-01 00:00
    clock.advance(timedelta(days=1))
    kept = ledger.reserve(user, uuid4(), 200, clock.now() + timedelta(days=30), key=f"{user}:job-1")
    clock.advance(timedelta(days=1))
    ledger.spend(user, 150, key=f"{user}:api", description="API calls")  # 2026-01-03
    clock.advance(timedelta(days=1))
    ledger.settle(kept.reservation_id, 120, key=f"{user}:job-1-done", user_id=user)  # type: ignore[arg-type]
    late = ledger.reserve(user, uuid4(), 50, clock.now() + timedelta(days=30), key=f"{user}:job-2")
    return user, late.reservation_id  # type: ignore[return-value]


def test_a_statement_has_opening_entries_holds_and_closing(ledger: Ledger, clock: ManualClock) -> None:
    user, late = march(ledger, clock)
    s = Auditor(ledger).statement(user, START + timedelta(hours=12), START + timedelta(days=5))
    assert (s.opening_balance_credits, s.opening_held_credits) == (1_000, 0)
    assert [(e.type, e.amount_credits, e.balance_after) for e in s.entries] == [
        ("api_use", -150, 850),
        ("generation_use", -120, 730),
    ]
    assert s.entries[0].description == "API calls"
    assert [(h.event, h.amount_credits, h.settled_credits) for h in s.hold_events] == [
        ("reserved", 200, None),
        ("settled", 200, 120),
        ("reserved", 50, None),
    ]
    assert s.opening_holds == () and [h.reservation_id for h in s.closing_holds] == [late]
    assert (s.closing_balance_credits, s.closing_held_credits, s.credits_in, s.credits_out) == (730, 50, 0, 270)
    # The period is (start, end]: the next one starts where this one ends.
    after = Auditor(ledger).statement(user, s.end, s.end + timedelta(days=1))
    assert after.opening_balance_credits == s.closing_balance_credits and after.entries == ()
    assert [h.reservation_id for h in after.opening_holds] == [late]


def test_statements_export_as_csv_and_json(ledger: Ledger, clock: ManualClock) -> None:
    user, _ = march(ledger, clock)
    s = Auditor(ledger).statement(user, START - timedelta(days=1), START + timedelta(days=5))
    rows = list(csv.DictReader(io.StringIO(s.to_csv())))
    assert [r["record"] for r in rows] == [
        "opening",
        "entry",
        "hold",
        "entry",
        "entry",
        "hold",
        "hold",
        "closing",
        "open_at_end",
    ]
    assert [int(r["amount_credits"]) for r in rows if r["record"] == "entry"] == [1_000, -150, -120]
    assert rows[-2]["balance_after"] == "730"
    data = json.loads(s.to_json())
    assert data["closing_balance_credits"] == 730 and len(data["entries"]) == 3
    assert type(s).model_validate(data) == s


def test_an_event_stamped_before_the_one_it_follows_is_in_the_next_statement(ledger_url: str) -> None:
    """Within the audit's slack a later version may carry an earlier time. The
    fold stops at the first event recorded later than an instant, so such an
    event belongs to the period after it: listed there, and the statements
    still reconcile and chain."""
    clock = SetClock(START)
    user = uuid4()
    with Ledger(ledger_url, clock=clock) as ledger:
        ledger.grant(user, 100, "purchase", key=f"{user}:grant")
        clock.moment = START + 10 * MINUTE
        ledger.spend(user, 10, key=f"{user}:spend-1")
        clock.moment = START + 9 * MINUTE  # a writer whose clock read a minute earlier
        ledger.spend(user, 20, key=f"{user}:spend-2")
        clock.moment = START + 20 * MINUTE
        ledger.spend(user, 1, key=f"{user}:spend-3")
        auditor = Auditor(ledger)
        assert auditor.audit().findings == []
        cut = START + 9 * MINUTE + timedelta(seconds=30)
        first = auditor.statement(user, START - MINUTE, cut)
        second = auditor.statement(user, cut, START + 30 * MINUTE)
        assert [e.amount_credits for e in first.entries] == [100]
        assert [e.amount_credits for e in second.entries] == [-10, -20, -1]
        for s in (first, second):
            assert s.opening_balance_credits + sum(e.amount_credits for e in s.entries) == s.closing_balance_credits
        assert first.closing_balance_credits == second.opening_balance_credits == 100
        assert second.closing_balance_credits == ledger.balance(user).balance_credits == 69


def test_balance_before_the_account_opened_is_zero(ledger: Ledger, clock: ManualClock) -> None:
    user, _ = march(ledger, clock)
    before = Auditor(ledger).balance(user, as_of=START - timedelta(seconds=1))
    assert (before.balance_credits, before.held_credits, before.blocks) == (0, 0, ())
    assert Auditor(ledger).balance(user, as_of=START).balance_credits == 1_000


def test_bad_questions_are_refused(ledger: Ledger, clock: ManualClock) -> None:
    user, _ = march(ledger, clock)
    auditor = Auditor(ledger)
    with pytest.raises(UnknownAccount):
        auditor.balance(uuid4(), as_of=START)
    with pytest.raises(InvalidArgument):
        auditor.statement(user, START + timedelta(days=2), START)
    with pytest.raises(InvalidArgument):
        auditor.balance(user, as_of=datetime(2026, 1, 1))  # no zone


# ------------------------------------------------------------------ the CLI says the same


def ledger_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ledger", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'pit.sqlite3'}"
    url: str = request.getfixturevalue("pg_url")
    return url


def test_the_cli_gives_the_same_numbers(durable_url: str, tmp_path: Path) -> None:
    clock = ManualClock(START)
    with Ledger(durable_url, clock=clock) as ledger:
        user, _ = march(ledger, clock)
        auditor = Auditor(ledger)
        as_of = START + timedelta(days=2, hours=1)
        balance = auditor.balance(user, as_of=as_of)
        s = auditor.statement(user, START, START + timedelta(days=5))
    out = ledger_cli("balance", "--url", durable_url, "--user", str(user), "--as-of", as_of.isoformat(), "--json")
    assert out.returncode == 0, out.stderr
    assert type(balance).model_validate_json(out.stdout) == balance
    text = ledger_cli("balance", "--url", durable_url, "--user", str(user), "--as-of", "2026-01-03T01:00:00Z")
    assert "balance 850, held 200, available 650" in text.stdout
    common = ["statement", "--url", durable_url, "--user", str(user), "--start", "2026-01-01", "--end", "2026-01-06"]
    assert ledger_cli(*common, "--format", "json").stdout == s.to_json() + "\n"
    assert ledger_cli(*common, "--format", "csv").stdout == s.to_csv()
    written = tmp_path / "statement.csv"
    assert ledger_cli(*common, "--format", "csv", "--output", str(written)).returncode == 0
    assert written.read_text() == s.to_csv()
    human = ledger_cli(*common).stdout
    assert "opening balance 1000" in human and "closing balance 730 (held 50)" in human and "api_use" in human
    unknown = ledger_cli("balance", "--url", durable_url, "--user", str(uuid4()), "--as-of", "2026-01-02")
    assert unknown.returncode == 2 and "UnknownAccount" in unknown.stderr
