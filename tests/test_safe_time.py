"""A caller's ``now`` cannot push the ledger into the future by accident:
``tick``, ``expire_holds`` and ``record_due`` refuse one more than a minute
ahead of the ledger's clock unless told it is a simulation, and ``tick --now``
says what is wrong with a time it cannot use instead of a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from ledger import Auditor, InvalidArgument, Ledger, LedgerError, ManualClock, TimeInFuture
from ledger.clock import FUTURE_TOLERANCE
from tests.conftest import SetClock

DAY = timedelta(days=1)


def _story(ledger: Ledger, clock: ManualClock) -> UUID:
    """An account with a 30-day grant and a one-hour hold."""
    user = uuid4()
    ledger.grant(user, 500, "subscription_grant", key=f"{user}:grant", expires_at=clock.now() + 30 * DAY)
    ledger.reserve(user, uuid4(), 100, clock.now() + timedelta(hours=1), key=f"{user}:hold")
    return user


def _head(ledger: Ledger) -> int:
    return ledger.app.recorder.max_notification_id() or 0


SWEEPS: dict[str, Callable[[Ledger, UUID, datetime], object]] = {
    "tick": lambda ledger, user, now: ledger.tick(now),
    "expire_holds": lambda ledger, user, now: ledger.expire_holds(now),
    "record_due": lambda ledger, user, now: ledger.record_due([user], now),
}


@pytest.mark.parametrize("sweep", sorted(SWEEPS))
def test_a_now_a_year_ahead_is_refused_and_records_nothing(ledger: Ledger, clock: ManualClock, sweep: str) -> None:
    user = _story(ledger, clock)
    head = _head(ledger)
    later = clock.now() + 365 * DAY
    with pytest.raises(TimeInFuture) as raised:
        SWEEPS[sweep](ledger, user, later)
    assert isinstance(raised.value, InvalidArgument) and isinstance(raised.value, LedgerError)
    assert (raised.value.moment, raised.value.clock_now) == (later, clock.now())
    assert "365 days" in str(raised.value) and "allow_future" in str(raised.value)
    assert _head(ledger) == head
    balance = ledger.balance(user)
    assert (balance.balance_credits, balance.held_credits) == (500, 100)


@pytest.mark.parametrize("sweep", sorted(SWEEPS))
def test_a_now_within_the_tolerance_or_in_the_past_is_accepted(ledger: Ledger, clock: ManualClock, sweep: str) -> None:
    user = _story(ledger, clock)
    clock.advance(timedelta(hours=1))  # the hold is due
    SWEEPS[sweep](ledger, user, clock.now() - timedelta(minutes=30))  # not due yet then: nothing
    assert ledger.history(user)[-1].type == "reserved"
    SWEEPS[sweep](ledger, user, clock.now() + FUTURE_TOLERANCE)
    assert ledger.history(user)[-1].type == "released"


def test_a_tick_as_of_an_earlier_moment_records_nothing_before_what_is_recorded(
    ledger: Ledger, clock: ManualClock
) -> None:
    """A renewal due by the earlier moment is made, but the account recorded a
    spend since: the renewal and its grant are stamped no earlier than that,
    so the account's events follow the clock and the audit finds nothing."""
    ledger.install_default_catalog()
    user = uuid4()
    sid = ledger.start_subscription(user, "starter", key=f"{user}:start").subscription_id
    ledger.grant(user, 100, "purchase", key=f"{user}:purchase")
    period_end = ledger.subscription(sid).current_period_end
    clock.set(period_end + 9 * DAY)
    ledger.spend(user, 10, key=f"{user}:spend")  # records the period's lapse, renews nothing
    assert ledger.tick(period_end)["subscriptions"] == 1  # as of the period's end
    renewed = ledger.subscription(sid)
    assert renewed.current_period_start == period_end and renewed.status == "active"
    grant = ledger.history(user)[-1]
    assert (grant.type, grant.data["kind"], grant.recorded_at) == ("granted", "subscription_renew", clock.now())
    assert Auditor(ledger).audit().findings == []
    other = uuid4()  # nothing recorded after the earlier moment: the tick stamps it then
    sid = ledger.start_subscription(other, "starter", key=f"{other}:start").subscription_id
    other_end = ledger.subscription(sid).current_period_end
    clock.set(other_end + DAY)
    ledger.tick(other_end)
    assert ledger.history(other)[-1].recorded_at == other_end


def test_a_simulation_opts_in_to_a_future_now(ledger: Ledger, clock: ManualClock) -> None:
    user = _story(ledger, clock)
    assert ledger.tick(clock.now() + 31 * DAY, allow_future=True)["holds_and_lapses"] == 2
    assert ledger.balance(user).balance_credits == 0  # the hold released, then the grant lapsed
    with pytest.raises(InvalidArgument, match="allow_future must be a bool"):
        ledger.expire_holds(clock.now(), allow_future="yes")  # type: ignore[arg-type]


def test_a_naive_now_is_refused(ledger: Ledger, clock: ManualClock) -> None:
    with pytest.raises(InvalidArgument, match="timezone-aware"):
        ledger.tick(datetime(2026, 1, 1))


def test_a_clock_that_reads_naive_is_refused_and_records_nothing(ledger_url: str) -> None:
    """A naive reading would be stored as event timestamps that no aware time
    can be compared with: the audit and balances at an instant would fail for
    good once a correct clock recorded after it."""
    clock = SetClock(datetime(2026, 1, 1, 12))
    with Ledger(ledger_url, clock=clock) as ledger:
        user = uuid4()
        with pytest.raises(InvalidArgument, match="timezone-aware"):
            ledger.grant(user, 100, "purchase", key=f"{user}:grant")
        assert _head(ledger) == 0


def test_a_clock_in_another_zone_records_utc(ledger_url: str) -> None:
    berlin = timezone(timedelta(hours=1))
    clock = SetClock(datetime(2026, 1, 1, 12, tzinfo=berlin))
    with Ledger(ledger_url, clock=clock) as ledger:
        user = uuid4()
        receipt = ledger.grant(user, 100, "purchase", key=f"{user}:grant", expires_in=timedelta(hours=1))
        assert receipt.recorded_at.tzinfo is UTC and receipt.recorded_at == datetime(2026, 1, 1, 11, tzinfo=UTC)
        assert {e.recorded_at.tzinfo for e in ledger.history(user)} == {UTC}
        (block,) = ledger.balance(user).blocks
        assert block.expires_at is not None and block.expires_at.tzinfo is UTC


# ------------------------------------------------------------ tick --now


def _tick(url: str, *args: str, tz: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TZ": tz} if tz else None
    return subprocess.run(
        [sys.executable, "-m", "ledger", "tick", "--url", url, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.fixture
def store(tmp_path: Path) -> tuple[str, UUID, datetime]:
    """A SQLite store on the system clock's recent past: a hold that expired
    an hour ago. The CLI runs on the system clock."""
    real_now = datetime.now(UTC).replace(microsecond=0)
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    with Ledger(url, clock=ManualClock(real_now - timedelta(hours=2))) as ledger:
        user = uuid4()
        ledger.grant(user, 500, "bonus", key="grant")
        ledger.reserve(user, uuid4(), 100, real_now - timedelta(hours=1), key="hold")
    return url, user, real_now


@pytest.mark.parametrize("text", ["tomorrow", "2026-13-01", "9999-12-31T23:00:00-05:00", ""])
def test_tick_now_that_is_not_a_time_is_a_usage_error(store: tuple[str, UUID, datetime], text: str) -> None:
    result = _tick(store[0], "--now", text)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Invalid value for --now" in result.stderr and "Traceback" not in result.stderr


def test_tick_now_in_the_future_is_refused_and_records_nothing(store: tuple[str, UUID, datetime]) -> None:
    url, user, real_now = store
    result = _tick(url, "--now", (real_now + 29 * DAY).isoformat())
    assert result.returncode == 2, result.stdout + result.stderr
    assert "ahead of this machine's clock" in result.stderr and "Traceback" not in result.stderr
    with Ledger(url) as ledger:
        assert ledger.history(user)[-1].type == "reserved"


def test_tick_now_without_a_zone_is_utc_whatever_the_local_zone(store: tuple[str, UUID, datetime]) -> None:
    url, user, real_now = store
    naive = (real_now - timedelta(minutes=30)).replace(tzinfo=None).isoformat()
    # Read as local time in UTC-5 it would lie hours ahead and be refused.
    result = _tick(url, "--now", naive, tz="Etc/GMT+5")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hold releases and expirations: 1" in result.stdout
    with Ledger(url) as ledger:
        released = ledger.history(user)[-1]
    assert released.type == "released"
    assert released.recorded_at == real_now - timedelta(minutes=30)
