"""Clocks. The ledger never reads the wall clock directly, so tests and the demo
can run months of expiries and renewals without sleeping."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Protocol

from ._errors import InvalidArgument, TimeInFuture

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
        if delta < timedelta(0):
            raise InvalidArgument(f"a clock cannot move backwards (delta {delta})")
        with self._lock:
            self._now += delta
            return self._now

    def set(self, moment: datetime) -> datetime:
        moment = require_utc(moment, "moment")
        with self._lock:
            if moment < self._now:
                raise InvalidArgument(f"a clock cannot move backwards ({self._now} to {moment})")
            self._now = moment
            return self._now


def require_utc(value: object, name: str) -> datetime:
    """Returns ``value`` converted to UTC; refuses naive datetimes and non-datetimes."""
    if not isinstance(value, datetime):
        raise InvalidArgument(f"{name} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidArgument(f"{name} must be timezone-aware (got naive {value.isoformat()})")
    return value.astimezone(UTC)


def moment_for(now: object, clock: Clock, *, allow_future: bool = False, name: str = "now") -> datetime:
    """The moment a sweep or tick acts as of: the clock's time, or ``now``
    (timezone-aware; converted to UTC). A ``now`` more than
    ``FUTURE_TOLERANCE`` ahead of the clock raises ``TimeInFuture`` unless
    ``allow_future`` (simulations); an earlier one is accepted: it does only
    what was due by then, which is due now as well."""
    if type(allow_future) is not bool:
        raise InvalidArgument(f"allow_future must be a bool, not {type(allow_future).__name__}")
    current = clock.now()
    if now is None:
        return current
    moment = require_utc(now, name)
    if not allow_future and moment - current > FUTURE_TOLERANCE:
        raise TimeInFuture(name, moment, current, FUTURE_TOLERANCE)
    return moment
