"""Entitlement: whether a subscription's plan applies at a moment."""

from __future__ import annotations

from datetime import datetime

from ledger.domain.subscriptions import PauseMode, Status, Subscription


def entitled(s: Subscription | None, now: datetime) -> bool:
    """Whether a subscription's plan applies at ``now``. Trialing, active, past
    due (a grace while payment is retried), paused in ``free`` mode (the
    service continues unpaid) and cancelled-but-paid-up do; paused in ``void``
    mode and expired do not."""
    if s is None or s.status == Status.EXPIRED:
        return False
    if s.status == Status.PAUSED:
        return s.pause_mode == PauseMode.FREE
    if s.status == Status.CANCELLED:
        # Paid up until the period ends, unless it was cancelled during a void
        # pause (no service then, so none after).
        void_paused = s.status_before_cancel == Status.PAUSED and s.pause_mode != PauseMode.FREE
        return now < s.period_end and not void_paused
    return True
