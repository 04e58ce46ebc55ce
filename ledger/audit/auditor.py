"""``Auditor``: the auditor's toolkit over one ledger, in one object.

>>> from datetime import UTC, datetime
>>> from uuid import UUID
>>> from ledger import Auditor, Ledger, ManualClock
>>> ledger = Ledger("memory://", clock=ManualClock(datetime(2026, 3, 1, tzinfo=UTC)))
>>> _ = ledger.grant(UUID(int=1), 100, "purchase", key="order-1")
>>> auditor = Auditor(ledger)
>>> auditor.audit().ok
True
>>> auditor.balance(UUID(int=1), as_of=datetime(2026, 3, 1, tzinfo=UTC)).balance_credits
100
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

from ledger.application.facade import Ledger
from ledger.application.results import Balance
from ledger.audit.base import CheckFactory
from ledger.audit.digest import SEGMENT_EVENTS, DigestHead, DigestResult, ProgressCallback, VerifyResult, digest, verify
from ledger.audit.pointintime import Statement, balance_at, statement
from ledger.audit.runner import DEFAULT_CHECKPOINT_EVERY, PAGE_EVENTS, AuditReport, audit


class Auditor:
    """Replays, point-in-time answers and tamper evidence for one ledger.

    ``Auditor(ledger)`` uses a ledger the caller owns; ``Auditor(url)`` opens
    one and closes it with :meth:`close` (or ``with``)."""

    def __init__(self, ledger: Ledger | str) -> None:
        self._owned = isinstance(ledger, str)
        # As the auditor's commands do: a mistyped URL is an error, not an
        # empty store created on the spot that audits as PASSED and digests
        # to a head of position 0.
        self.ledger = Ledger(ledger, create=False) if isinstance(ledger, str) else ledger

    def close(self) -> None:
        if self._owned:
            self.ledger.close()

    def __enter__(self) -> Auditor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def audit(
        self,
        *,
        from_position: int = 0,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        compare_views: bool = True,
        checks: Sequence[CheckFactory] | None = None,
        max_findings: int = 1_000,
        page_events: int = PAGE_EVENTS,
        progress: ProgressCallback | None = None,
    ) -> AuditReport:
        """Replays the event store and checks the ledger and its views; see :func:`ledger.audit`."""
        return audit(
            self.ledger,
            from_position=from_position,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            compare_views=compare_views,
            checks=checks,
            max_findings=max_findings,
            page_events=page_events,
            progress=progress,
        )

    def balance(self, user_id: UUID, as_of: datetime) -> Balance:
        """The balance as recorded at ``as_of`` (every event at or before it)."""
        return balance_at(self.ledger, user_id, as_of)

    def statement(self, user_id: UUID, start: datetime, end: datetime) -> Statement:
        """The account's statement for the period ``(start, end]``."""
        return statement(self.ledger, user_id, start, end)

    def digest(
        self,
        *,
        every: int = SEGMENT_EVENTS,
        incremental: bool = False,
        expect: DigestHead | str | None = None,
        progress: ProgressCallback | None = None,
    ) -> DigestResult:
        """The head of the hash chain over the event log; anchors it in
        ``ledger_digests``. ``expect``: the last head kept outside, which the
        chain must pass through (nothing is anchored otherwise)."""
        return digest(self.ledger, every=every, incremental=incremental, expect=expect, progress=progress)

    def verify(self, head: DigestHead | str, *, progress: ProgressCallback | None = None) -> VerifyResult:
        """Proves the history up to ``head`` (``POSITION:HASH``) unchanged, or names what changed."""
        return verify(self.ledger, head, progress=progress)

    def __repr__(self) -> str:
        return f"Auditor({self.ledger.config.backend} ledger)"
