"""``audit``: replays the whole event store and checks it, and the read models.

The replay reads the notification log a page at a time, decodes each event
once, and hands it to every check that reads its class. Memory holds a page of
events, the per-account state of the accounts seen, and the events of the
transaction in flight; never the whole log.

The views are compared as of their own position ``V`` (read when the audit
starts): the replay runs to ``V``, the checks compare what needs the state at
``V`` (balances, open holds), and the replay goes on to the head with the
views left alone.

Resuming: a run given a checkpoint file writes its state there every
``checkpoint_every`` events, at a transaction boundary, and at the end. A later
run with ``from_position=N`` and the same file starts after position ``N``
from that state, which must have been written at ``N``. The state holds only
while the events up to ``N`` are unchanged since the checkpoint: the resumed
run hashes them afresh and compares the link with the checkpoint's (a
``checkpoint`` finding if they differ), so the report's history digest is
always the head of the history as stored. The checks' state in the file is
trusted as it stands: keep the file out of the reach of those who can write
the database.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eventsourcing.domain import CanInitAggregate
from eventsourcing.utils import resolve_topic

from ledger.audit.base import AuditContext, Check, CheckFactory, Finding, Findings, Handler
from ledger.audit.checks.credits import AccountCheck, CommandCheck, SnapshotAuditCheck
from ledger.audit.checks.subscriptions import SubscriptionCheck
from ledger.audit.checks.views import ViewsCheck
from ledger.audit.digest import Chain, ProgressCallback, stored_events
from ledger.errors import InvalidArgument

if TYPE_CHECKING:
    from ledger.application.facade import Ledger

#: Events read per query.
PAGE_EVENTS = 1_000
DEFAULT_CHECKPOINT_EVERY = 100_000
CHECKPOINT_FORMAT = "pingvas-ledger-audit-checkpoint/1"

#: Per event class, the names its state must have and the names it may have.
_SHAPES: dict[type, tuple[frozenset[str], frozenset[str]] | None] = {}


def _shape(cls: type) -> tuple[frozenset[str], frozenset[str]] | None:
    if not dataclasses.is_dataclass(cls):
        return None
    fields = dataclasses.fields(cls)
    required = frozenset(
        f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    return required, frozenset(f.name for f in fields)


def misfit(event: Any) -> str | None:
    """Why a decoded event's state does not fit its class, or None.

    The mapper builds an event from whatever state is stored under its
    topic, so an edited topic (a ``Debited`` relabelled ``Granted``) or a
    state with a field removed decodes without complaint and fails only when
    a check reads the missing field."""
    cls = type(event)
    if cls not in _SHAPES:
        _SHAPES[cls] = _shape(cls)
    shape = _SHAPES[cls]
    if shape is None:
        return None
    required, allowed = shape
    names = vars(event).keys()
    if names != allowed:
        missing, extra = sorted(required - names), sorted(names - allowed)
        if missing or extra:
            why = [f"no {', '.join(missing)}"] if missing else []
            if extra:
                why.append(f"{', '.join(extra)} not fields of it")
            return f"its state does not fit {cls.__qualname__}: {'; '.join(why)}"
    stamp = event.timestamp
    if type(stamp) is not datetime or stamp.utcoffset() != _UTC_OFFSET:
        # The handlers compare and convert times: text or a naive time would
        # crash them, or the views' comparison after them.
        return f"its timestamp {stamp!r} is not a time in UTC"
    if isinstance(event, CanInitAggregate) and not _creates(cls, event.originator_topic):
        return (
            f"its originator_topic {event.originator_topic!r} is not the aggregate a {cls.__qualname__} creates: "
            "the ledger cannot load it"
        )
    return None


_UTC_OFFSET = timedelta(0)

#: Per (created event class, originator topic): whether the topic names the aggregate the class creates.
_CREATES: dict[tuple[type, Any], bool] = {}


def _creates(cls: type, topic: Any) -> bool:
    """Whether ``topic``, a created event's ``originator_topic``, names the
    aggregate whose created event ``cls`` is: the ledger builds the
    aggregate that topic names from the event (an account's ``Opened``
    relabelled a ``CommandRecord`` cannot be loaded)."""
    found = _CREATES.get((cls, topic)) if isinstance(topic, str) else False
    if found is None:
        try:
            aggregate = resolve_topic(topic)
        except Exception:  # a topic that names nothing importable
            aggregate = None
        found = _CREATES[(cls, topic)] = isinstance(aggregate, type) and getattr(aggregate, cls.__name__, None) is cls
    return found


#: Checks added by other parts of the ledger (one more aggregate, one more check).
_REGISTERED: list[CheckFactory] = []


def register_check(factory: CheckFactory) -> None:
    """Adds a check to every audit that does not name its own."""
    if factory not in _REGISTERED:
        _REGISTERED.append(factory)


def default_checks(*, compare_views: bool = True) -> list[CheckFactory]:
    """The account check first (others read its state), the views check last."""
    checks: list[CheckFactory] = [AccountCheck, CommandCheck, SnapshotAuditCheck, SubscriptionCheck, *_REGISTERED]
    if compare_views:
        checks.append(ViewsCheck)
    return checks


@dataclass
class AuditReport:
    """What an audit found, with the figures an auditor quotes."""

    store: str
    from_position: int
    head: int
    views_position: int | None
    events: int
    events_total: int
    elapsed_s: float
    digest: str
    checks: dict[str, str]
    summary: dict[str, Any]
    findings: list[Finding]
    finding_counts: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def findings_total(self) -> int:
        return sum(self.finding_counts.values())

    @property
    def ok(self) -> bool:
        return self.findings_total == 0

    @property
    def events_per_s(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "store": self.store,
            "from_position": self.from_position,
            "head": self.head,
            "views_position": self.views_position,
            "events": self.events,
            "events_total": self.events_total,
            "elapsed_s": round(self.elapsed_s, 3),
            "events_per_s": round(self.events_per_s, 1),
            "digest": self.digest,
            "checks": self.checks,
            "summary": self.summary,
            "findings_total": self.findings_total,
            "finding_counts": self.finding_counts,
            "findings": [f.to_dict() for f in self.findings],
            "notes": self.notes,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def render(self) -> str:
        """The report for people."""
        s = self.summary
        credits = s.get("credits", {})
        lines = [
            f"pingvas-ledger audit of a {self.store} store: positions {self.from_position + 1}..{self.head}",
            f"replayed {self.events:,} events in {self.elapsed_s:.1f} s ({self.events_per_s:,.0f} events/s)",
            f"accounts {s.get('accounts', 0):,}, postings {s.get('postings', 0):,}, open holds "
            f"{s.get('open_holds', 0):,}, command records {s.get('command_records', 0):,}",
        ]
        if credits:
            lines.append(
                f"credits: granted {credits['granted']:,}, debited {credits['debited']:,}, settled "
                f"{credits['settled']:,}, expired {credits['expired']:,}; balance {credits['balance']:,}, "
                f"held {credits['held']:,}"
            )
        if "subscriptions" in s:
            lines.append(f"subscriptions {s['subscriptions']:,}, rows compared {s.get('subscriptions_compared', 0):,}")
        if self.views_position is not None:
            compared = ", ".join(f"{t} {n:,}" for t, n in s.get("views_rows_compared", {}).items())
            lines.append(f"views compared as of position {self.views_position}: rows {compared}")
        lines.append(f"history digest: {self.digest}")
        lines.extend(f"checked: {name}: {covers}" for name, covers in self.checks.items())
        lines.extend(f"note: {note}" for note in self.notes)
        if self.ok:
            lines.append("result: PASSED, no findings")
            return "\n".join(lines)
        lines.append(f"{self.findings_total} findings:")
        lines.extend(f"  {finding}" for finding in self.findings)
        if self.findings_total > len(self.findings):
            lines.append(f"  ... and {self.findings_total - len(self.findings)} more")
        counts = ", ".join(f"{check} {n}" for check, n in sorted(self.finding_counts.items()))
        lines.append(f"result: FAILED ({counts})")
        return "\n".join(lines)


class _Replay:
    """Feeds the events to the checks, page by page."""

    def __init__(
        self,
        ctx: AuditContext,
        checks: Sequence[Check],
        *,
        page_events: int,
        progress: ProgressCallback | None,
        checkpoint: Path | None,
        checkpoint_every: int,
    ) -> None:
        self.ctx = ctx
        self.checks = checks
        self.page_events = page_events
        self.progress = progress
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.chain = Chain()
        self.events = 0
        self.since_checkpoint = 0
        self.window_at: datetime | None = None
        table: dict[type, list[Handler]] = {}
        for check in checks:
            for cls, handler in check.handlers().items():
                table.setdefault(cls, []).append(handler)
        self.table = {cls: tuple(handlers) for cls, handlers in table.items()}
        self.boundaries = [c.boundary for c in checks if type(c).boundary is not Check.boundary]

    def run(self, after: int, stop: int) -> None:
        app = self.ctx.ledger.app
        decode = app.mapper.to_domain_event
        table, chain, boundaries = self.table, self.chain, self.boundaries
        window_at = self.window_at
        last = after
        for page in stored_events(app, after, stop, self.page_events):
            for notification in page:
                try:
                    event: Any = decode(notification)
                    why = misfit(event)
                except Exception as exc:  # an edited state or topic: report it, replay the rest
                    why = f"{type(exc).__name__}: {exc}"
                if why is not None:
                    self._undecodable(notification, "cannot be read", why)
                    event = None
                if event is not None and event.timestamp != window_at:
                    for boundary in boundaries:
                        boundary()
                    window_at = event.timestamp
                    if self.since_checkpoint >= self.checkpoint_every and last > self.ctx.from_position:
                        self.write_checkpoint(last)
                chain.add(notification)
                if event is not None:
                    try:
                        for handler in table.get(type(event), ()):
                            handler(notification.id, event)
                    except Exception as exc:  # a value of the wrong type: a null key, text for an amount
                        self._undecodable(notification, "cannot be checked", f"{type(exc).__name__}: {exc}")
                last = notification.id
                self.since_checkpoint += 1
            self.events += len(page)
            self.ctx.position = last
            if self.progress is not None:
                self.progress(last, self.ctx.head)
        self.window_at = window_at

    def _undecodable(self, notification: Any, what: str, why: str) -> None:
        self.ctx.findings.add(
            "decode",
            notification.id,
            f"event {notification.originator_id} v{notification.originator_version}",
            f"{what} ({notification.topic}): {why}",
        )

    def write_checkpoint(self, position: int) -> None:
        if self.checkpoint is None:
            return
        self.ctx.position = position
        state = {
            "format": CHECKPOINT_FORMAT,
            "position": position,
            "written_at": datetime.now(UTC).isoformat(),
            "store": self.ctx.ledger.config.backend,
            "chain": {"position": self.chain.position, "digest": self.chain.digest.hex(), "events": self.chain.events},
            "findings": self.ctx.findings.save(),
            "checks": {check.name: check.save() for check in self.checks},
        }
        temporary = self.checkpoint.with_name(self.checkpoint.name + ".tmp")
        temporary.write_text(json.dumps(state, default=str))
        os.replace(temporary, self.checkpoint)  # atomic: a crash leaves the previous checkpoint
        self.since_checkpoint = 0

    def restore(self, path: Path) -> None:
        state = json.loads(path.read_text())
        if state.get("format") != CHECKPOINT_FORMAT:
            raise InvalidArgument(f"{path} is not an audit checkpoint")
        if state["position"] != self.ctx.from_position:
            raise InvalidArgument(
                f"checkpoint {path} was written at position {state['position']}, not {self.ctx.from_position}: "
                f"resume with --from-position {state['position']}"
            )
        if state["store"] != self.ctx.ledger.config.backend:
            raise InvalidArgument(f"checkpoint {path} is of a {state['store']} store")
        saved = state["checks"]
        for check in self.checks:
            if check.name not in saved:
                raise InvalidArgument(f"checkpoint {path} has no state for the {check.name} check")
        for check in self.checks:
            check.restore(saved[check.name])
        self.ctx.findings.restore(state["findings"])
        chain = state["chain"]
        saved = Chain(int(chain["position"]), bytes.fromhex(chain["digest"]), int(chain["events"]))
        self.chain = self._prove(path, saved)

    def _prove(self, path: Path, saved: Chain) -> Chain:
        """The chain over the events up to the resume position as they are
        now, hashed afresh: the checkpoint's state is the replay of the events
        its link covers, so a link that differs (events edited, deleted or
        inserted since it was written, or the file edited) is a finding, and
        the report's digest is always the head of the stored history."""
        position = self.ctx.from_position
        chain = Chain()
        for page in stored_events(self.ctx.ledger.app, 0, position, self.page_events):
            for notification in page:
                chain.add(notification)
        if (chain.position, chain.digest, chain.events) != (saved.position, saved.digest, saved.events):
            self.ctx.findings.add(
                "checkpoint",
                position,
                f"checkpoint {path}",
                f"the events up to position {position} hash to {chain.head()} ({chain.events} events), the "
                f"checkpoint was written over {saved.head()} ({saved.events} events): the history changed since "
                "the checkpoint was written, or the file was edited; the state it holds is not the replay of "
                "these events, so audit from the start",
            )
        return chain


def audit(
    ledger: Ledger,
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
    """Replays every event after ``from_position`` and checks the ledger and
    its read models. ``checkpoint`` names a file to save progress to (and,
    with ``from_position``, to resume from)."""
    started = time.perf_counter()
    _check_arguments(from_position, checkpoint, checkpoint_every, max_findings, page_events)
    head = ledger.app.recorder.max_notification_id() or 0
    if from_position > head:
        raise InvalidArgument(f"from_position {from_position} is past the log's head {head}")
    ctx = AuditContext(ledger, Findings(max_findings), from_position, head, None, position=from_position)
    views_position = _views_position(ctx, compare_views)
    ctx.views_position = views_position
    factories = list(checks) if checks is not None else default_checks(compare_views=views_position is not None)
    built = [factory(ctx) for factory in factories]
    path = Path(checkpoint) if checkpoint is not None else None
    replay = _Replay(
        ctx, built, page_events=page_events, progress=progress, checkpoint=path, checkpoint_every=checkpoint_every
    )
    try:
        if from_position:
            assert path is not None
            replay.restore(path)
        _replay_all(replay, built, from_position, views_position, head)
    finally:
        for check in built:
            check.close()
    return _report(ctx, built, replay, time.perf_counter() - started)


def _replay_all(
    replay: _Replay, checks: Sequence[Check], from_position: int, views_position: int | None, head: int
) -> None:
    """To the views' position, the comparisons that need its state, then on to the head."""
    if views_position is not None and views_position >= from_position:
        replay.run(from_position, views_position)
        for check in checks:
            check.at_views()
        replay.run(views_position, head)
    else:
        replay.run(from_position, head)
    for check in checks:
        check.finish()
    replay.write_checkpoint(head)


def _check_arguments(
    from_position: int,
    checkpoint: str | os.PathLike[str] | None,
    checkpoint_every: int,
    max_findings: int,
    page_events: int,
) -> None:
    if type(from_position) is not int or from_position < 0:
        raise InvalidArgument(f"from_position must be an int >= 0, got {from_position!r}", param="from_position")
    if checkpoint is not None and (not isinstance(checkpoint, str | os.PathLike) or "\x00" in os.fspath(checkpoint)):
        raise InvalidArgument(
            f"checkpoint must be a file path (str or PathLike), got {checkpoint!r}", param="checkpoint"
        )
    if from_position and (checkpoint is None or not Path(checkpoint).is_file()):
        raise InvalidArgument("resuming from a position needs the checkpoint file a previous run wrote there")
    if type(checkpoint_every) is not int or checkpoint_every < 1:
        raise InvalidArgument(f"checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
    if type(max_findings) is not int or max_findings < 1:
        raise InvalidArgument(f"max_findings must be an int >= 1, got {max_findings!r}")
    if type(page_events) is not int or not 1 <= page_events <= 10_000:
        raise InvalidArgument(f"page_events must be within 1..10000, got {page_events!r}")


def _views_position(ctx: AuditContext, compare_views: bool) -> int | None:
    """The position to compare the views at, or None to leave them alone."""
    if not compare_views:
        return None
    position = ctx.ledger.views.position()
    if position > ctx.head:
        ctx.findings.add(
            "view",
            position,
            "views",
            f"the views were projected up to position {position}, past the log's head {ctx.head}: "
            "they include events the store no longer has",
        )
        return ctx.head
    if position < ctx.from_position:
        ctx.notes.append(
            f"views not compared: they are at position {position}, before the resume position {ctx.from_position}"
        )
        return None
    if position < ctx.head:
        _check_not_stalled(ctx, position)
        ctx.notes.append(f"the views lag: compared as of position {position}; events after it are checked only")
    return position


def _check_not_stalled(ctx: AuditContext, position: int) -> None:
    """Lagging views may only be behind, or stalled at an event the projector
    cannot write, which no amount of waiting cures: that is a finding."""
    stalled = ctx.ledger.views.projector.stalled()
    if stalled is None:
        return
    cause = stalled.cause
    ctx.findings.add(
        "view",
        stalled.position,
        f"event {stalled.originator_id} v{stalled.originator_version}",
        f"the views are stalled here: the projector cannot write this event ({stalled.topic}): "
        f"{type(cause).__name__}: {cause}; they stay at position {position} until the cause is fixed",
    )


def _report(ctx: AuditContext, checks: Sequence[Check], replay: _Replay, elapsed_s: float) -> AuditReport:
    summary: dict[str, Any] = {}
    for check in checks:
        summary.update(check.summary())
    return AuditReport(
        store=ctx.ledger.config.backend,
        from_position=ctx.from_position,
        head=ctx.head,
        views_position=ctx.views_position,
        events=replay.events,
        events_total=replay.chain.events,
        elapsed_s=elapsed_s,
        digest=str(replay.chain.head()),
        checks={check.name: check.covers for check in checks},
        summary=summary,
        findings=list(ctx.findings),
        finding_counts=dict(ctx.findings.counts),
        notes=list(ctx.notes),
    )


def checkpoint_position(path: str | os.PathLike[str]) -> int:
    """The position a checkpoint file was written at."""
    state: Mapping[str, Any] = json.loads(Path(path).read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise InvalidArgument(f"{path} is not an audit checkpoint")
    return int(state["position"])
