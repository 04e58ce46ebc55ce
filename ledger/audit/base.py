"""The pieces every audit check shares: findings, the check interface, and the
context a check runs in.

A check is one class: it names the event classes it reads (``handlers``), is
told when the replay reaches the read models' position (``at_views``) and the
end (``finish``), and can save and restore its state for a resumed run. New
aggregates (subscriptions, say) get audited by adding one more check; the
replay loop does not change.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ledger.application.facade import Ledger

#: A handler gets an event's position in the log and the decoded event.
Handler = Callable[[int, Any], None]


@dataclass(frozen=True)
class Finding:
    """One thing the audit found wrong.

    ``check`` names the rule (``balance``, ``view``, ``key``, ...), ``position``
    the event (notification id) or view row position it was found at, when
    there is one, and ``subject`` what it is about (``user <id>``,
    ``reservation <id>``, ``credit_transactions row <id>``)."""

    check: str
    position: int | None
    subject: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = f"position {self.position}" if self.position is not None else "-"
        return f"[{self.check}] {where}, {self.subject}: {self.message}"


class Findings:
    """Collects findings: every one is counted, the first ``limit`` are kept."""

    def __init__(self, limit: int = 1_000) -> None:
        self.limit = limit
        self.kept: list[Finding] = []
        self.counts: Counter[str] = Counter()

    def add(self, check: str, position: int | None, subject: str, message: str) -> None:
        self.counts[check] += 1
        if len(self.kept) < self.limit:
            self.kept.append(Finding(check, position, subject, message))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __iter__(self) -> Iterator[Finding]:
        return iter(self.kept)

    def save(self) -> dict[str, Any]:
        return {"kept": [f.to_dict() for f in self.kept], "counts": dict(self.counts)}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.kept = [Finding(**f) for f in state["kept"]][: self.limit]
        self.counts = Counter({k: int(v) for k, v in state["counts"].items()})


@dataclass
class AuditContext:
    """What the checks of one audit run share."""

    ledger: Ledger
    findings: Findings
    #: Replay covers the events after ``from_position`` up to ``head``.
    from_position: int
    head: int
    #: The read models' position, or None when the views are not compared.
    views_position: int | None
    #: Remarks that are not findings (what was skipped and why).
    notes: list[str] = field(default_factory=list)
    #: Shared state, by name: the account check publishes its accounts here.
    shared: dict[str, Any] = field(default_factory=dict)
    #: The last position replayed; kept current at page ends and checkpoints.
    position: int = 0


class Check:
    """One audit rule set. Every hook has a default; a check overrides what it needs."""

    name: ClassVar[str]
    #: What the check covers, for the report.
    covers: ClassVar[str]

    def __init__(self, ctx: AuditContext) -> None:
        self.ctx = ctx

    def report(self, position: int | None, subject: str, message: str, *, check: str | None = None) -> None:
        self.ctx.findings.add(check or self.name, position, subject, message)

    def handlers(self) -> Mapping[type, Handler]:
        """The event classes this check reads, each with its handler."""
        return {}

    def boundary(self) -> None:
        """The events of one transaction are over. A transaction's events share
        a timestamp and sit together in the log, so the replay calls this when
        the timestamp changes (two transactions at one instant count as one)."""

    def at_views(self) -> None:
        """The replay has reached the read models' position (and no further)."""

    def finish(self) -> None:
        """The replay has reached the head."""

    def close(self) -> None:
        """The audit is over, finished or not: release what the check holds open."""

    def save(self) -> dict[str, Any]:
        """State to resume from, JSON-serialisable."""
        return {}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Takes back what :meth:`save` returned."""

    def summary(self) -> dict[str, Any]:
        """Figures for the report."""
        return {}


#: A factory of checks: the check class itself, or anything that builds one from a context.
CheckFactory = Callable[[AuditContext], Check]
