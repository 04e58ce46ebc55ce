"""Clocks. The ledger never reads the wall clock directly, so tests and the demo
can run months of expiries and renewals without sleeping."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Protocol

from ledger.errors import InvalidArgument, TimeInFuture

#: How far a ``now`` given to the sweeps and ``tick()`` may lie ahead of the
#: ledger's clock: hosts' clocks differ a little, and the audit accepts an
#: event recorded up to as long before the one preceding it (``TIME_SLACK``).
FUTURE_TOLERANCE = timedelta(seconds=60)


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


class SystemClock:
    """The real time."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock that moves only when told to. Thread-safe; never moves backwards."""

    def __init__(self, start: datetime) -> None:
        self._now = require_utc(start, "start")
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> datetime:
        if not isinstance(delta, timedelta):
            raise InvalidArgument(f"delta must be a timedelta, not {type(delta).__name__}", param="delta")
        if delta < timedelta(0):
            raise InvalidArgument(f"a clock cannot move backwards (delta {delta})", param="delta")
        with self._lock:
            if delta >= LATEST - self._now:
                raise InvalidArgument(f"advancing {self._now.isoformat()} by {delta} passes {LATEST.isoformat()}")
            self._now += delta
            return self._now

    def set(self, moment: datetime) -> datetime:
        moment = require_utc(moment, "moment")
        with self._lock:
            if moment < self._now:
                raise InvalidArgument(f"a clock cannot move backwards ({self._now} to {moment})", param="moment")
            self._now = moment
            return self._now


#: The times the ledger takes: from the Unix epoch to well before the end of
#: ``datetime``'s range, so that adding periods, trials and renewal windows to
#: any of them cannot overflow.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)


def require_utc(value: object, name: str) -> datetime:
    """Returns ``value`` converted to UTC; refuses naive datetimes, non-datetimes
    and times outside EARLIEST..LATEST."""
    if type(value) is datetime and value.tzinfo is UTC:  # the common case, and nothing to convert
        if not EARLIEST <= value < LATEST:
            raise _outside(value, name)
        return value
    if not isinstance(value, datetime):
        raise InvalidArgument(f"{name} must be a datetime, not {type(value).__name__}", param=name)
    try:
        offset = value.utcoffset()
    except (ValueError, TypeError) as exc:  # a tzinfo that returns nonsense
        raise InvalidArgument(f"{name} has an unusable time zone: {exc}", param=name) from None
    if offset is None:
        raise InvalidArgument(f"{name} must be timezone-aware (got naive {value.isoformat()})", param=name)
    # Compared before converting: converting a time at the edge of the range overflows.
    naive = value.replace(tzinfo=None)
    if not EARLIEST.replace(tzinfo=None) + offset <= naive < LATEST.replace(tzinfo=None) + offset:
        raise _outside(value, name)
    moment = value.astimezone(UTC)
    # A plain datetime: a subclass must not reach the event store.
    return datetime(
        moment.year,
        moment.month,
        moment.day,
        moment.hour,
        moment.minute,
        moment.second,
        moment.microsecond,
        tzinfo=UTC,
    )


def _outside(value: datetime, name: str) -> InvalidArgument:
    return InvalidArgument(
        f"{name} {value.isoformat()} is outside the times the ledger takes "
        f"({EARLIEST.isoformat()} to {LATEST.isoformat()})",
        param=name,
    )


def moment_for(now: object, clock: Clock, *, allow_future: bool = False, name: str = "now") -> datetime:
    """The moment a sweep or tick acts as of: the clock's time, or ``now``
    (timezone-aware; converted to UTC). A ``now`` more than
    ``FUTURE_TOLERANCE`` ahead of the clock raises ``TimeInFuture`` unless
    ``allow_future`` (simulations); an earlier one is accepted: it does only
    what was due by then, which is due now as well."""
    if type(allow_future) is not bool:
        raise InvalidArgument(f"allow_future must be a bool, not {type(allow_future).__name__}", param="allow_future")
    current = clock.now()
    if now is None:
        return current
    moment = require_utc(now, name)
    if not allow_future and moment - current > FUTURE_TOLERANCE:
        raise TimeInFuture(name, moment, current, FUTURE_TOLERANCE)
    return moment
