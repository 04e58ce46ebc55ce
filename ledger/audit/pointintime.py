"""Point in time: an account's balance at any instant, and statements.

Both fold the account's own events, oldest first, up to the instant asked
about, with the domain's own ``apply`` methods: the answer is the state the
ledger had *recorded* then, exactly what ``credit_transactions.balance_after``
and ``credit_balances`` showed at that moment. (``Ledger.balance()`` differs
in one way: it also leaves out, in memory, holds past their expiry and lapsed
credits that no sweep or command has recorded yet.)

An instant covers every event recorded at or before it. The fold stops at the
first event recorded later, so it reads a prefix of the account's history:
within an account, events never go back in time (each command reads the
clock after the one before it committed; the audit reports any that do).

A statement covers the period ``(start, end]``: its opening balance is the
balance at ``start``, its closing balance the balance at ``end``, and the
statements of consecutive periods chain without overlap.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from ledger.application.results import Balance, _View, credit_blocks
from ledger.clock import require_utc
from ledger.domain.checks import check_uuid
from ledger.domain.credits import CreditAccount, CreditKind, account_id_for
from ledger.errors import InvalidArgument, UnknownAccount

if TYPE_CHECKING:
    from ledger.application.facade import Ledger

#: Events read per query while folding an account.
FOLD_PAGE = 1_000


class StatementEntry(_View):
    """One posting: a row of ``credit_transactions``, as the events say."""

    version: int
    recorded_at: datetime
    entry_id: UUID
    type: str
    amount_credits: int
    balance_after: int
    held_after: int
    description: str | None = None
    reference_type: str | None = None
    reference: str | None = None
    key: str | None = None


class StatementHoldEvent(_View):
    """A hold reserved or closed during the period (it moves held credits)."""

    version: int
    recorded_at: datetime
    reservation_id: UUID
    event: str  # "reserved", "settled" or "released"
    amount_credits: int  # the credits the hold held
    settled_credits: int | None = None
    reason: str | None = None
    held_after: int


class StatementHold(_View):
    """A hold open at one end of the period."""

    reservation_id: UUID
    job_id: UUID
    amount_credits: int
    reserved_at: datetime
    expires_at: datetime


class Statement(_View):
    """An account's statement for the period ``(start, end]``."""

    user_id: UUID
    start: datetime
    end: datetime
    opening_balance_credits: int
    opening_held_credits: int
    closing_balance_credits: int
    closing_held_credits: int
    credits_in: int
    credits_out: int
    entries: tuple[StatementEntry, ...]
    hold_events: tuple[StatementHoldEvent, ...]
    opening_holds: tuple[StatementHold, ...]
    closing_holds: tuple[StatementHold, ...]
    #: The account's credit limit at either end (docs/credit-limits.md): a
    #: balance below zero is spent on credit, down to minus the limit.
    opening_credit_limit_credits: int = 0
    closing_credit_limit_credits: int = 0

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2)

    def to_csv(self) -> str:
        """One table: the opening line, holds open at the start, entries and
        hold events in order, the closing line, holds open at the end."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in self.csv_rows():
            writer.writerow(["" if row.get(c) is None else _csv_value(row[c]) for c in CSV_COLUMNS])
        return out.getvalue()

    def csv_rows(self) -> Iterator[dict[str, Any]]:
        yield {
            "record": "opening",
            "recorded_at": self.start,
            "balance_after": self.opening_balance_credits,
            "held_after": self.opening_held_credits,
        }
        for hold in self.opening_holds:
            yield _hold_row("open_at_start", hold)
        lines: list[tuple[int, dict[str, Any]]] = [(e.version, _entry_row(e)) for e in self.entries]
        lines.extend((h.version, _hold_event_row(h)) for h in self.hold_events)
        for _, row in sorted(lines, key=lambda line: line[0]):
            yield row
        yield {
            "record": "closing",
            "recorded_at": self.end,
            "balance_after": self.closing_balance_credits,
            "held_after": self.closing_held_credits,
        }
        for hold in self.closing_holds:
            yield _hold_row("open_at_end", hold)


CSV_COLUMNS = (
    "record",
    "recorded_at",
    "version",
    "entry_id",
    "type",
    "amount_credits",
    "balance_after",
    "held_after",
    "description",
    "reference_type",
    "reference",
    "key",
    "reservation_id",
    "job_id",
    "expires_at",
    "settled_credits",
    "reason",
)


def _csv_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _entry_row(e: StatementEntry) -> dict[str, Any]:
    return {"record": "entry", **e.model_dump()}


def _hold_event_row(h: StatementHoldEvent) -> dict[str, Any]:
    return {
        "record": "hold",
        "recorded_at": h.recorded_at,
        "version": h.version,
        "type": h.event,
        "amount_credits": h.amount_credits,
        "held_after": h.held_after,
        "reservation_id": h.reservation_id,
        "settled_credits": h.settled_credits,
        "reason": h.reason,
    }


def _hold_row(record: str, hold: StatementHold) -> dict[str, Any]:
    return {
        "record": record,
        "recorded_at": hold.reserved_at,
        "amount_credits": hold.amount_credits,
        "reservation_id": hold.reservation_id,
        "job_id": hold.job_id,
        "expires_at": hold.expires_at,
    }


# ------------------------------------------------------------------------ folding


def account_events(ledger: Ledger, user_id: UUID) -> Iterator[Any]:
    """The account's events, oldest first, decoded a page at a time."""
    account_id = account_id_for(check_uuid(user_id, "user_id"))
    after = 0
    while True:
        page = ledger.app.recorder.select_events(account_id, gt=after or None, limit=FOLD_PAGE)
        for stored in page:
            yield ledger.app.mapper.to_domain_event(stored)
        if len(page) < FOLD_PAGE:
            return
        after = page[-1].originator_version


def fold(ledger: Ledger, user_id: UUID, until: datetime) -> CreditAccount | None:
    """The account as recorded at ``until`` (None if it opened later)."""
    account: CreditAccount | None = None
    seen = False
    for event in account_events(ledger, user_id):
        seen = True
        if event.timestamp > until:
            break
        account = event.mutate(account)
    if not seen:
        raise UnknownAccount(user_id)
    return account


def balance_at(ledger: Ledger, user_id: UUID, as_of: datetime) -> Balance:
    """The account's balance, held and available credits and unspent blocks as
    recorded at ``as_of`` (zero before the account opened)."""
    moment = require_utc(as_of, "as_of")
    account = fold(ledger, user_id, moment)
    if account is None:
        return Balance(user_id=user_id, balance_credits=0, held_credits=0, available_credits=0, blocks=(), as_of=moment)
    return Balance(
        user_id=user_id,
        balance_credits=account.balance,
        held_credits=account.held,
        available_credits=account.available,
        blocks=credit_blocks(account),
        as_of=moment,
        credit_limit_credits=account.credit_limit,
    )


def _open_holds(account: CreditAccount | None) -> tuple[StatementHold, ...]:
    if account is None:
        return ()
    return tuple(
        StatementHold(
            reservation_id=UUID(h.reservation_id),
            job_id=UUID(h.job_id),
            amount_credits=h.amount,
            reserved_at=h.reserved_at,
            expires_at=h.expires_at,
        )
        for h in sorted(account.holds.values(), key=lambda h: (h.reserved_at, h.reservation_id))
    )


def _entry(event: Any, account: CreditAccount, hold: Any) -> StatementEntry | None:
    """The posting an event made (as its ``credit_transactions`` row shows it), if any."""
    if isinstance(event, CreditAccount.Granted | CreditAccount.Debited):
        sign = 1 if isinstance(event, CreditAccount.Granted) else -1
        fields: dict[str, Any] = {
            "type": event.kind,
            "amount_credits": sign * event.amount,
            "description": event.description or None,
            "reference_type": event.reference_type,
            "reference": event.reference_id,
            "key": event.key,
        }
    elif isinstance(event, CreditAccount.Settled):
        fields = {
            "type": CreditKind.GENERATION_USE.value,
            "amount_credits": -event.amount,
            "reference_type": "generation_job",
            "reference": hold.job_id if hold is not None else None,
            "key": event.key,
        }
    elif isinstance(event, CreditAccount.Expired):
        fields = {
            "type": CreditKind.EXPIRATION.value,
            "amount_credits": -event.amount,
            "description": "unused credits lapsed",
            "reference_type": "credit_block",
            "reference": str(event.block_id),
        }
    else:
        return None
    return StatementEntry(
        version=event.originator_version,
        recorded_at=event.timestamp,
        entry_id=event.entry_id,
        balance_after=account.balance,
        held_after=account.held,
        **fields,
    )


def _hold_event(event: Any, account: CreditAccount, hold: Any) -> StatementHoldEvent | None:
    """The hold an event reserved or closed, if any."""
    common = {
        "version": event.originator_version,
        "recorded_at": event.timestamp,
        "held_after": account.held,
    }
    if isinstance(event, CreditAccount.Reserved):
        return StatementHoldEvent(
            **common, reservation_id=event.reservation_id, event="reserved", amount_credits=event.amount
        )
    if isinstance(event, CreditAccount.Settled):
        return StatementHoldEvent(
            **common,
            reservation_id=event.reservation_id,
            event="settled",
            amount_credits=hold.amount if hold is not None else 0,
            settled_credits=event.amount,
        )
    if isinstance(event, CreditAccount.Released):
        return StatementHoldEvent(
            **common,
            reservation_id=event.reservation_id,
            event="released",
            amount_credits=hold.amount if hold is not None else 0,
            reason=event.reason,
        )
    return None


def statement(ledger: Ledger, user_id: UUID, start: datetime, end: datetime) -> Statement:
    """The account's statement for ``(start, end]``: opening balance, every
    posting with the balance after it, hold events, closing balance, and the
    holds open at either end."""
    start = require_utc(start, "start")
    end = require_utc(end, "end")
    if end < start:
        raise InvalidArgument(f"a statement's end ({end.isoformat()}) is before its start ({start.isoformat()})")
    account: CreditAccount | None = None
    opening: tuple[int, int, tuple[StatementHold, ...], int] | None = None
    entries: list[StatementEntry] = []
    hold_events: list[StatementHoldEvent] = []
    seen = False
    for event in account_events(ledger, user_id):
        seen = True
        if event.timestamp > end:
            break
        if event.timestamp > start and opening is None:
            opening = _state(account)  # the first event of the period: the state before it opens it
        hold = account.holds.get(str(getattr(event, "reservation_id", ""))) if account is not None else None
        account = event.mutate(account)
        assert account is not None
        # Every event after the one that opened the period is in it, even one
        # stamped a little earlier (two writers' clocks): the balance at
        # ``start`` left it out, so the period's entries must list it.
        if opening is not None:
            entry = _entry(event, account, hold)
            if entry is not None:
                entries.append(entry)
            hold_line = _hold_event(event, account, hold)
            if hold_line is not None:
                hold_events.append(hold_line)
    if not seen:
        raise UnknownAccount(user_id)
    closing = _state(account)
    opening = opening or closing
    return Statement(
        user_id=user_id,
        start=start,
        end=end,
        opening_balance_credits=opening[0],
        opening_held_credits=opening[1],
        closing_balance_credits=closing[0],
        closing_held_credits=closing[1],
        credits_in=sum(e.amount_credits for e in entries if e.amount_credits > 0),
        credits_out=-sum(e.amount_credits for e in entries if e.amount_credits < 0),
        entries=tuple(entries),
        hold_events=tuple(hold_events),
        opening_holds=opening[2],
        closing_holds=closing[2],
        opening_credit_limit_credits=opening[3],
        closing_credit_limit_credits=closing[3],
    )


def _state(account: CreditAccount | None) -> tuple[int, int, tuple[StatementHold, ...], int]:
    if account is None:
        return 0, 0, (), 0
    return account.balance, account.held, _open_holds(account), account.credit_limit
