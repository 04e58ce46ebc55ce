"""The processing pipeline every provider shares, and what a provider supplies.

A delivery goes: verify (the provider's signature check over the raw body and
headers) -> parse (the provider's: event name, id, test mode, payload) ->
store in ``webhook_events`` (once; a redelivery is recognised as a duplicate)
-> apply (the provider maps the event to ledger commands, run through group
commit, or to an outcome) -> record the outcome. A delivery that cannot run
yet raises :class:`Held` naming what it waits for (``subscription 123``); an
outcome's ``releases`` names what it brought, and the deliveries held for
that run at once. ``Pipeline.retry`` runs the failed and stalled ones again.

A stored row is applied again only if it is a delivery the provider signed:
at ingest, once the signature verified, the row gets the provider's keyed
``seal`` of its payload; a row read back (a retry, a held delivery released)
whose seal is missing or wrong is refused (``failed``, ``refused: ...``) and
never applied. Whoever can write ``webhook_events`` cannot forge a seal
without the provider's secret.

A provider implements :class:`Provider`; ``Pipeline(ledger, provider)`` is
then its webhook receiver (``WebhookApp(pipeline)``), retry loop and inbox.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import Any, Literal, Protocol
from uuid import UUID

from ledger import Command, ConfigurationError, GroupCommit, InvalidArgument, Ledger, LedgerError, Receipt

from .inbox import HELD_PREFIX, IGNORED_PREFIX, NOTE_PREFIX, REFUSED_PREFIX, Inbox, InboxRow
from .results import IngestResult

log = logging.getLogger("adapters.webhooks")

#: Deliveries a processed event runs again because they waited for it.
MAX_RELEASED = 25
#: A ``received`` row older than this was left by a process that stopped.
DEFAULT_STALE_AFTER_S = 300
MAX_RETRY_BATCH = 5_000
RETRY_PASSES = 3
#: How many held deliveries ``run_held`` runs at once, at most (the rest: ``retry``).
MAX_RELEASED_AT_ONCE = 500


class Held(LedgerError):
    """The command cannot run yet; ``waits_for`` names what it waits for
    (``subscription 123``, ``customer 45``). The delivery is kept ``failed``
    with ``held: <waits_for>: <why>`` until an outcome ``releases`` it."""

    code = "held"

    def __init__(self, waits_for: str, why: str) -> None:
        self.waits_for = waits_for
        super().__init__(f"{waits_for}: {why}")


class Malformed(ValueError):
    """The body (or a stored payload) is not an event of the provider; ``str(exc)`` says why."""


@dataclass(frozen=True)
class Event:
    """A delivery as its provider parsed it. ``payload`` is stored in
    ``webhook_events`` (it is the JSON of the raw body); ``parsed`` is the
    provider's own typed form, handed back to its ``apply``."""

    name: str
    event_id: str | None
    test_mode: bool
    payload: dict[str, Any]
    parsed: Any = None


@dataclass(frozen=True)
class Outcome:
    """What processing one event did. ``releases`` names what deliveries held
    for it wait on (``subscription 123``); the counts are the credits moved."""

    status: Literal["processed", "failed", "held", "ignored"]
    message: str | None = None
    releases: tuple[str, ...] = ()
    #: The ledger committed the effects (a synchronous commit after the row's).
    committed: bool = False
    applied: bool = False
    replayed: bool = False
    granted: int = 0
    clawed: int = 0
    user_id: UUID | None = None


@dataclass
class RetryReport:
    attempted: int = 0
    processed: int = 0
    failed: int = 0
    held: int = 0
    ignored: int = 0
    messages: list[tuple[UUID, str, str]] = field(default_factory=list)

    def add(self, row: InboxRow, outcome: Outcome) -> None:
        self.attempted += 1
        setattr(self, outcome.status, getattr(self, outcome.status) + 1)
        if outcome.status != "processed" and outcome.message:
            self.messages.append((row.row_id, row.event_type, outcome.message))


#: Runs one command through the pipeline's group commit.
Execute = Callable[[Command], Receipt]


class Provider(Protocol):
    """What a payment provider supplies to the pipeline."""

    #: Its ``webhook_events.source``: 1..50 letters, digits and ``_``.
    source: str
    #: Its name in messages ("Lemon Squeezy").
    title: str
    #: Bodies larger than this are refused with 413.
    max_body_bytes: int

    def verify(self, raw_body: bytes, headers: Mapping[str, str]) -> str | None:
        """None when the delivery is authentic, else why not (answered 401,
        nothing stored). Header names may come in any case."""
        ...

    def parse(self, raw_body: bytes) -> Event:
        """The verified body as an event; raises Malformed (answered 400, nothing stored)."""
        ...

    def load(self, payload: dict[str, Any]) -> Event:
        """A stored payload as an event again (for retries); raises Malformed."""
        ...

    def apply(self, event: Event, execute: Execute) -> Outcome:
        """Applies the event: runs its ledger commands through ``execute`` and
        says what became of it. Raises Held when it must wait for something,
        a LedgerError when the ledger refuses it (the delivery fails)."""
        ...

    def order(self, row: InboxRow) -> Any:
        """A sort key: held and retried deliveries run in this order (the
        provider's own time of the change, say)."""
        ...

    def seal(self, data: bytes) -> str | None:
        """A keyed digest of ``data`` (``sealed_bytes`` of a stored payload)
        that only the holder of the provider's secret can compute: the
        HMAC-SHA256 under the signing secret, say, in hex. None when the
        provider has no secret (then it can neither ingest nor retry)."""
        ...


#: Whole numbers from here on may not fit a float exactly.
_EXACT_FLOAT_INTS = 2**53
#: A key no stored payload has (ingest refuses a body with a NUL).
_BIG_NUMBER_KEY = "\x00number"


def _numbers_as_read_back(value: Any) -> Any:
    """``value`` with its numbers written as both sides of a round trip
    through jsonb agree: jsonb keeps a number's value, not its spelling, and
    gives ``1e2`` back as ``100`` (an int once decoded) where the body as
    received decodes to ``100.0``; so whole floats are ints. Past 2**53 a
    whole float is the nearest double (``1e23`` decodes to
    99999999999999991611392) while jsonb gives back the decimal the body
    spelled (100000000000000000000000): such a number, float or int, is its
    shortest decimal (``1E+23``), under a key no payload has."""
    kind = type(value)
    if kind is float:
        if not value.is_integer():
            return value
        if abs(value) < _EXACT_FLOAT_INTS:
            return int(value)
        return {_BIG_NUMBER_KEY: str(Decimal(repr(value)).normalize())}
    if kind is int:
        return value if abs(value) < _EXACT_FLOAT_INTS else {_BIG_NUMBER_KEY: str(Decimal(value).normalize())}
    if kind is dict:
        return {k: _numbers_as_read_back(v) for k, v in value.items()}
    if kind is list:
        return [_numbers_as_read_back(v) for v in value]
    return value


def sealed_bytes(source: str, payload: dict[str, Any]) -> bytes:
    """What a row's seal covers: its ``source`` and its payload, in one
    encoding whatever the backend made of the body (jsonb drops spacing and
    key order and respells numbers), so that the payload read back from
    either backend gives the bytes sealed at ingest: sorted keys, no spaces,
    whole numbers as ints. (json's C encoder: a walk in Python per value
    cost 120 to 160 µs a delivery.)"""
    text = json.dumps(
        [source, _numbers_as_read_back(payload)], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return text.encode("utf-8", "surrogatepass")


def attempt(run: Callable[[], Outcome]) -> Outcome:
    """``run()``, with Held and LedgerError as the outcomes they mean."""
    try:
        return run()
    except Held as exc:
        return Outcome("held", f"{HELD_PREFIX}{exc}")
    except LedgerError as exc:
        return Outcome("failed", f"{type(exc).__name__}: {exc}")


def header(headers: Mapping[str, str], name: str) -> str | None:
    """The value of header ``name``, whatever the case of its key."""
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def rejected(http_status: int, reason: str) -> IngestResult:
    return IngestResult(status="rejected", http_status=http_status, reason=reason)


#: Headers a request may carry into ``ingest`` (servers cap them far lower).
MAX_HEADERS = 1_000


def _request_body(raw_body: object) -> bytes:
    if not isinstance(raw_body, bytes | bytearray | memoryview):
        raise InvalidArgument(
            f"raw_body must be the request body's bytes, not {type(raw_body).__name__}", param="raw_body"
        )
    return bytes(raw_body)


def _check_headers(headers: object) -> None:
    """The headers as a mapping of text to text: an ASGI scope's raw list of
    byte pairs, or bytes values, would otherwise fail deep in a provider's
    signature check with an error that does not say what was wrong."""
    if not isinstance(headers, Mapping):
        raise InvalidArgument(
            f"headers must be a mapping of header names to values, not {type(headers).__name__}", param="headers"
        )
    if len(headers) > MAX_HEADERS:
        raise InvalidArgument(f"{len(headers)} headers; at most {MAX_HEADERS}", param="headers")
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidArgument(
                f"headers must map str to str, not {type(name).__name__} to {type(value).__name__} "
                "(decode an ASGI scope's raw headers as latin-1)",
                param="headers",
            )


class Pipeline:
    """A provider's deliveries, from the request to the ledger: ``ingest``
    (the ASGI app's receiver), ``process``, ``retry`` and ``run_held``.

    ``test_mode``: apply test-mode events (and ignore live ones) instead of
    the reverse. ``stale_after_s``: a delivery left ``received`` this long
    was left by a process that stopped; ``retry`` runs it."""

    def __init__(
        self,
        ledger: Ledger,
        provider: Provider,
        *,
        test_mode: bool = False,
        stale_after_s: int = DEFAULT_STALE_AFTER_S,
    ) -> None:
        if type(stale_after_s) is not int or not 10 <= stale_after_s <= 86_400:
            raise ConfigurationError("stale_after_s must be an int of 10..86400")
        if not callable(getattr(provider, "seal", None)):
            raise ConfigurationError(
                f"the provider {type(provider).__name__} has no seal(data): stored deliveries could not be "
                "told from rows written by hand (docs/webhooks.md)"
            )
        self.ledger = ledger
        self.provider = provider
        self.inbox = Inbox(ledger, provider.source)
        #: Concurrent deliveries' commands share ledger transactions: the
        #: ledger's own group commit, shared with its other callers.
        self.group: GroupCommit = ledger.group_commit
        self.test_mode = bool(test_mode)
        self.stale_after_s = stale_after_s
        #: What the ASGI app reads at most (the provider's limit).
        self.max_body_bytes = provider.max_body_bytes

    # -- a delivery --------------------------------------------------------------

    def ingest(self, raw_body: bytes, headers: Mapping[str, str]) -> IngestResult:
        """Verifies, stores and applies one delivery. Never raises for
        anything a sender can put in a request; a host that passes something
        other than the body's bytes and its headers as text gets
        ``InvalidArgument``, and nothing is stored."""
        raw = _request_body(raw_body)
        _check_headers(headers)
        limit = self.provider.max_body_bytes
        if len(raw) > limit:
            return rejected(413, f"body is {len(raw)} bytes; at most {limit}")
        refused = self.provider.verify(raw, headers)
        if refused is not None:
            log.warning("rejected a %s webhook delivery: %s", self.provider.title, refused)
            return rejected(401, refused)
        try:
            event = self.provider.parse(raw)
        except Malformed as exc:
            return rejected(400, str(exc))
        return self._store_and_apply(raw, event)

    def _store_and_apply(self, raw: bytes, event: Event) -> IngestResult:
        """Stores the whole event as received (unknown fields included), then applies it."""
        try:
            text: str | None = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        try:
            stored = self.inbox.put(
                event_type=event.name,
                event_id=event.event_id,
                payload=event.payload,
                payload_sha256=hashlib.sha256(raw).hexdigest(),
                test_mode=event.test_mode,
                now=self.ledger.clock.now(),
                payload_text=text,
                seal=self.provider.seal(sealed_bytes(self.provider.source, event.payload)),
            )
        except Exception as exc:
            log.exception("could not store a %s delivery", self.provider.title)
            return IngestResult(
                status="error", http_status=500, reason=f"could not store the delivery: {type(exc).__name__}"
            )
        if stored.duplicate:
            return IngestResult(
                status="duplicate",
                http_status=200,
                reason=f"already received (row {stored.row_id}, {stored.status})",
                event_row_id=stored.row_id,
                event_name=event.name,
            )
        row = InboxRow(
            row_id=stored.row_id,
            event_type=event.name,
            event_id=event.event_id,
            payload=event.payload,
            status="received",
            error_message=None,
            attempts=0,
            test_mode=event.test_mode,
            created_at=None,
            processed_at=None,
        )
        try:
            outcome = self.process(row, event=event, fresh=True)
        except Exception as exc:
            # The outcome could not be recorded (the database went away). If
            # the row is on disk, the delivery is stored: 200, and ``retry``
            # applies it. If that cannot be confirmed, the provider must try
            # again (500); if the row survived, its retry is a duplicate.
            log.exception("processing stored delivery %s failed", stored.row_id)
            if self._durable(stored.row_id):
                return IngestResult(
                    status="stored",
                    http_status=200,
                    reason=f"stored; its outcome could not be recorded ({type(exc).__name__}): "
                    "`webhooks retry` applies it",
                    event_row_id=stored.row_id,
                    event_name=event.name,
                    processing="pending",
                )
            return IngestResult(
                status="error",
                http_status=500,
                reason=f"stored, but the outcome could not be recorded: {type(exc).__name__}",
                event_row_id=stored.row_id,
                event_name=event.name,
                processing="pending",
            )
        return IngestResult(
            status="stored",
            http_status=200,
            reason=outcome.message or "stored and applied",
            event_row_id=stored.row_id,
            event_name=event.name,
            processing=outcome.status,
        )

    def _durable(self, row_id: UUID) -> bool:
        try:
            return self.inbox.durable(row_id)
        except Exception:
            log.exception("could not confirm that delivery %s is stored", row_id)
            return False

    # -- processing --------------------------------------------------------------

    def process(
        self,
        row: InboxRow,
        *,
        release: bool = True,
        event: Event | None = None,
        fresh: bool = False,
        unsealed: bool = False,
    ) -> Outcome:
        """Applies one stored delivery and records the outcome; never raises
        for a bad delivery (the row says what went wrong). Then runs the
        deliveries that were held for what this one brought. ``event``: the
        row's payload already parsed (by ingest); without it the row is read
        back, and applied only if its seal checks (``unsealed``: also a row
        without a seal, stored before seals). ``fresh``: the row was just
        stored, and must be on disk when this returns (see inbox)."""
        outcome = self._outcome(row, event, unsealed)
        self._record(row, outcome, release=release, flush=fresh and not outcome.committed)
        if outcome.status == "held" and fresh:
            # What it waits for may have been processed, by another thread or
            # process, after this delivery was applied and before it was
            # recorded as held: that one looked for the deliveries held for
            # it and did not find this one. Applied once more, now that it is
            # recorded, it goes through (or that one finds it, whichever
            # comes later), instead of waiting for ``retry``.
            again = self._outcome(row, event, unsealed)
            if again.status != "held":
                self._record(row, again, release=release, flush=False)
                return again
        return outcome

    def _record(self, row: InboxRow, outcome: Outcome, *, release: bool, flush: bool) -> None:
        """Records the outcome on the row, and runs what was held for what it brought."""
        now = self.ledger.clock.now()
        if outcome.status == "ignored":
            self.inbox.finish(
                row.row_id, status="received", message=outcome.message, now=now, attempted=False, flush=flush
            )
        elif outcome.status == "processed":
            message = None if outcome.message is None else NOTE_PREFIX + outcome.message
            waiting = self.inbox.finish(
                row.row_id,
                status="processed",
                message=message,
                now=now,
                flush=flush,
                then_held=outcome.releases if release else (),
                held_limit=MAX_RELEASED,
            )
            if waiting:
                self._release(waiting)
        else:
            self.inbox.finish(row.row_id, status="failed", message=outcome.message, now=now, flush=flush)

    def _refusal(self, row: InboxRow, unsealed: bool) -> Outcome | None:
        """Why a row read back must not be applied (an outcome ``failed``), or
        None when its seal shows that the provider signed it."""
        title = self.provider.title
        if row.seal is None:
            if unsealed:
                log.warning("applying %s delivery %s, which has no seal (unsealed=True)", title, row.row_id)
                return None
            log.warning("refused %s delivery %s: it has no seal", title, row.row_id)
            return Outcome(
                "failed",
                f"{REFUSED_PREFIX}no seal: stored before schema version 4, or not by the pipeline; "
                "not applied (retry with unsealed=True applies such rows)",
            )
        expected = self._seal(row.payload)
        if not hmac.compare_digest(expected.encode("utf-8"), row.seal.encode("utf-8", "surrogatepass")):
            log.warning("refused %s delivery %s: its seal does not match its payload", title, row.row_id)
            return Outcome(
                "failed", f"{REFUSED_PREFIX}the seal does not match the payload: not a delivery {title} signed"
            )
        return None

    def _outcome(self, row: InboxRow, event: Event | None, unsealed: bool = False) -> Outcome:
        if event is None:
            refused = self._refusal(row, unsealed)
            if refused is not None:
                return refused
            try:
                event = self.provider.load(row.payload)
            except Malformed as exc:
                return Outcome("failed", f"stored payload is not a {self.provider.title} event: {exc}")
        if event.test_mode != self.test_mode:
            mode = "test" if event.test_mode else "live"
            mine = "test" if self.test_mode else "live"
            return Outcome("ignored", f"{IGNORED_PREFIX}a {mode}-mode event, and this adapter is in {mine} mode")
        parsed = event
        try:
            return attempt(lambda: self.provider.apply(parsed, self.group.execute))
        except Exception as exc:  # a bug or an outage: keep the delivery, say what happened
            log.exception("processing %s delivery %s failed", self.provider.title, row.row_id)
            return Outcome("failed", f"{type(exc).__name__}: {exc}")

    # -- held deliveries and retries --------------------------------------------

    def _seal(self, payload: dict[str, Any]) -> str:
        """The seal a stored row of ``payload`` must carry; without the
        provider's secret there is none to check against."""
        seal = self.provider.seal(sealed_bytes(self.provider.source, payload))
        if seal is None:
            raise ConfigurationError(
                f"{self.provider.title}: stored deliveries are applied again only once their seals are "
                "checked, which takes the signing secret; give it"
            )
        return seal

    def _require_seals(self) -> None:
        # Before any row is touched: without the secret no seal can be
        # checked, and every row would be refused.
        self._seal({})

    def _release(self, rows: list[InboxRow]) -> None:
        """Runs the deliveries that were held for what was just processed
        (and, in turn, those held for them), at most MAX_RELEASED in all."""
        budget, done = MAX_RELEASED, set()
        while rows and budget > 0:
            queue: list[str] = []
            for row in rows[:budget]:
                if row.row_id in done:
                    continue
                done.add(row.row_id)
                budget -= 1
                outcome = self.process(row, release=False)
                if outcome.status == "processed":
                    queue.extend(outcome.releases)
            rows = [r for r in self.inbox.held(queue, limit=budget) if r.row_id not in done] if budget > 0 else []

    def run_held(self, waits_for: list[str], report: RetryReport, *, limit: int = MAX_RELEASED_AT_ONCE) -> None:
        """Runs the deliveries held for ``waits_for`` (``customer 45``, when
        the host has just said who that is), and those held for what they
        bring, until none is left (at most ``limit``). Rows without a valid
        seal are refused, as by ``retry``."""
        self._require_seals()
        done: set[UUID] = set()
        while waits_for and len(done) < limit:
            rows = [r for r in self.inbox.held(waits_for, limit=limit) if r.row_id not in done]
            rows = [r for r in rows if r.test_mode == self.test_mode][: limit - len(done)]
            rows.sort(key=self.provider.order)
            waits_for = []
            for row in rows:
                done.add(row.row_id)
                outcome = self.process(row, release=False)
                report.add(row, outcome)
                if outcome.status == "processed":
                    waits_for.extend(outcome.releases)

    def retry(
        self,
        *,
        limit: int = 500,
        progress: Callable[[InboxRow, Outcome], None] | None = None,
        unsealed: bool = False,
    ) -> RetryReport:
        """Reprocesses failed deliveries (and ones left ``received`` by a
        stopped process for ``stale_after_s``): each pass takes the ``limit``
        due deliveries tried the fewest times (see ``Inbox.due``, so that
        deliveries failing for good never starve newer ones) and applies them
        in the provider's order; up to RETRY_PASSES passes while one
        processes something, so that a delivery held for another one in the
        batch goes through. A row whose seal is missing or wrong is refused
        (``failed``, ``refused: ...``), never applied; ``unsealed=True``
        applies the rows without a seal (stored before schema version 4),
        each with a logged warning."""
        if type(limit) is not int or not 1 <= limit <= MAX_RETRY_BATCH:
            raise InvalidArgument(f"limit must be an int of 1..{MAX_RETRY_BATCH}")
        self._require_seals()
        report = RetryReport()
        for _ in range(RETRY_PASSES):
            stale_before = self.ledger.clock.now() - timedelta(seconds=self.stale_after_s)
            rows = self.inbox.due(test_mode=self.test_mode, stale_before=stale_before, limit=limit)
            rows.sort(key=self.provider.order)
            progressed = False
            for row in rows:
                outcome = self.process(row, release=False, unsealed=unsealed)
                progressed |= outcome.status == "processed"
                report.add(row, outcome)
                if progress is not None:
                    progress(row, outcome)
            if not progressed:
                break
        return report
