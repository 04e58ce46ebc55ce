"""Pricing in the application: the commands that define the price book and
reserve a hold sized by a quote, the quote itself, and the cache that makes a
quote a read of memory.

The rules are the domain's (``ledger.domain.pricing``): this module reads
the book and the user's plan, prices, and records what priced a hold on its
``HoldRecord`` (``price_record``), so that settling and auditing can show it.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from decimal import Decimal
from functools import cached_property
from typing import Any, ClassVar
from uuid import UUID

from ledger.application.commands import ADDED_FIELD, Command, UnitOfWork, _canonical, _json_default
from ledger.application.holds import checked_lifetime, hold_expiry
from ledger.application.results import PriceBookRevision, Quote, QuoteLine, Receipt, assembled
from ledger.domain.checks import (
    MAX_LABEL_LENGTH,
    check_amount,
    check_key,
    check_optional_text,
    check_user_id,
    check_uuid,
)
from ledger.domain.entitlements import entitled
from ledger.domain.holds import reservation_id_for
from ledger.domain.plans import FREE_PLAN
from ledger.domain.pricing import (
    PRICE_BOOK_ID,
    Line,
    PriceBook,
    PriceBookRecord,
    Priced,
    check_factor,
    check_job_type,
    check_price_book,
    hold_credits,
)
from ledger.domain.subscriptions import SubscriberSlot, Subscription, slot_id_for
from ledger.errors import InvalidAmount, InvalidArgument, UnknownJobType

#: How long a process trusts the price book, and a user's plan, it read for
#: quotes before reading them again (changes this process records show at
#: once; another process's within this many seconds).
PRICE_CACHE_MAX_AGE_S = 1.0
#: Users whose plan the quote cache keeps (least recently quoted dropped first).
PRICE_CACHE_USERS = 10_000
#: The largest safety margin a hold may add to a quote (10: 1,000%).
MAX_SAFETY_MARGIN = Decimal(10)
#: The most a job's parameters may take as JSON (the command digests them).
MAX_PARAMS_BYTES = 65_536
MAX_PARAMS_DEPTH = 16


# ------------------------------------------------------------------ commands


@dataclass(frozen=True)
class DefinePriceBook(Command):
    """Defines the price book, or revises it (history kept); the same book
    as the current one changes nothing."""

    name: ClassVar[str] = "define_price_book"
    #: Who defines the book is recorded but is not part of what is defined.
    hints: ClassVar[frozenset[str]] = frozenset({"actor"})
    book: PriceBook = field(kw_only=True)
    actor: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        self._normalise("key", check_key(self.key))
        check_price_book(self.book)
        self._normalise("actor", check_optional_text(self.actor, "actor", MAX_LABEL_LENGTH))

    def apply(self, unit: UnitOfWork) -> Receipt:
        data = self.book.as_event_data()
        record = unit.aggregate(PRICE_BOOK_ID, PriceBookRecord)
        if record is None:
            record = PriceBookRecord._create(
                PriceBookRecord.Defined, id=PRICE_BOOK_ID, book=data, actor=self.actor, timestamp=unit.now
            )
            unit.add(record)
        elif record.book_data != data:
            record.trigger_event(PriceBookRecord.Revised, book=data, actor=self.actor, timestamp=unit.now)
        return unit.finish(self, None, amount=0)


def check_params(value: object) -> dict[str, Any]:
    """A job's parameters as a command takes them: a mapping of names to
    JSON values (as the seed's ``generation_jobs.params`` holds), at most
    64 KiB of JSON. Only the parameters the book declares are priced."""
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"params must be a mapping, not {type(value).__name__}", param="params")
    if not all(isinstance(k, str) for k in value):
        raise InvalidArgument("params' names must be str", param="params")
    _check_depth(value, 0)
    params = dict(value)  # any mapping: json encodes only dicts as objects
    try:
        text = json.dumps(params, sort_keys=True, default=_params_default, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"params must hold JSON values only: {exc}", param="params") from None
    if len(text) > MAX_PARAMS_BYTES:
        raise InvalidArgument(
            f"params take {len(text):,} characters as JSON; at most {MAX_PARAMS_BYTES:,}", param="params"
        )
    # The caller's own mapping, copied: floats stay floats (priced by their repr).
    return params


def _params_default(value: Any) -> Any:
    """The fingerprint's form of a parameter value, or TypeError naming its
    type: handed back unchanged (bytes), json would report it as a
    "circular reference" instead."""
    shown = _json_default(value)
    if shown is value:
        raise TypeError(f"{type(value).__name__} is not a JSON value")
    return shown


def _check_depth(value: Any, depth: int) -> None:
    if depth > MAX_PARAMS_DEPTH:
        raise InvalidArgument(f"params nest deeper than {MAX_PARAMS_DEPTH} levels", param="params")
    if isinstance(value, Mapping):
        for item in value.values():
            _check_depth(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_depth(item, depth + 1)


@dataclass(frozen=True)
class ReserveForJob(Command):
    """Reserves a hold sized by the job's quote: the quote's credits plus the
    ``safety_margin`` (a fraction: ``Decimal("0.1")`` holds 10% more),
    rounded up. The hold's record keeps the quote and the price book
    revision that priced it (``Ledger.reservation(...).quote``).

    The job is priced when the command runs, from the book and the user's
    plan as the store holds them then; ``params`` enter the fingerprint as a
    digest, so a retry with the same parameters replays the first receipt."""

    name: ClassVar[str] = "reserve_for_job"
    user_id: UUID = field(kw_only=True)
    job_id: UUID = field(kw_only=True)
    job_type: str = field(kw_only=True)
    params: Mapping[str, Any] = field(kw_only=True)
    safety_margin: Decimal = field(default=Decimal(0), kw_only=True)
    expires_at: datetime | None = field(default=None, kw_only=True)
    expires_in: timedelta | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        self._normalise("key", check_key(self.key))
        self._normalise("user_id", check_user_id(self.user_id))
        self._normalise("job_id", check_uuid(self.job_id, "job_id"))
        self._normalise("job_type", check_job_type(self.job_type))
        self._normalise("params", check_params(self.params))
        check_factor(self.safety_margin, "safety_margin", MAX_SAFETY_MARGIN)
        expires_at = checked_lifetime(self.expires_at, self.expires_in)
        if expires_at is not None:
            self._normalise("expires_at", expires_at)

    @cached_property
    def _canonical_text(self) -> str:
        # As Command's, with the parameters as their digest: the record keeps
        # the arguments, and a job's parameters (a prompt among them) need not
        # be kept to tell a retry from another job.
        body = {
            f.name: _canonical(getattr(self, f.name))
            for f in fields(self)
            if f.name not in ("key", "params")
            and not (f.metadata.get(ADDED_FIELD) and getattr(self, f.name) == f.default)
        }
        body["params_sha256"] = params_digest(self.params)
        return json.dumps({"command": self.name, **body}, sort_keys=True, default=_json_default)

    def expiry(self, now: datetime) -> datetime:
        return hold_expiry(self.expires_at, self.expires_in, now)

    def apply(self, unit: UnitOfWork) -> Receipt:
        record = unit.aggregate(PRICE_BOOK_ID, PriceBookRecord)
        if record is None:
            raise UnknownJobType(self.job_type)
        book = record.book
        plan = plan_in(unit, self.user_id) if book.plan_multipliers else None
        priced = book.price(self.job_type, self.params, plan)
        amount = hold_credits(priced.credits, self.safety_margin)
        if amount > priced.credits:
            try:
                check_amount(amount)
            except InvalidAmount:
                raise InvalidAmount(
                    f"a hold of {priced.credits} credits with a safety margin of {self.safety_margin} is "
                    f"{amount} credits, beyond what a hold may hold",
                    param="safety_margin",
                ) from None
        account = unit.account(self.user_id)
        reservation_id = reservation_id_for(self.key)
        account.reserve(
            reservation_id=reservation_id,
            job_id=self.job_id,
            amount=amount,
            expires_at=self.expiry(unit.now),
            key=self.key,
            now=unit.now,
        )
        unit.price_hold(reservation_id, price_record(priced, record.revision, self.safety_margin))
        return unit.done(self, account, amount=0, reservation_id=reservation_id)


def params_digest(params: Mapping[str, Any]) -> str:
    text = json.dumps(params, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def plan_in(unit: UnitOfWork, user_id: UUID) -> str:
    """The plan the user is entitled to now, read from the store in this
    attempt (not from the command cache: a read that is not written would
    not clash if it were stale); ``free`` without one."""
    slot_id = slot_id_for(user_id)
    unit.prefetch([slot_id])
    slot = unit.aggregate(slot_id, SubscriberSlot)
    if slot is None or slot.live is None:
        return FREE_PLAN.name
    unit.prefetch([slot.live])
    s = unit.aggregate(slot.live, Subscription)
    return s.plan if s is not None and entitled(s, unit.now) else FREE_PLAN.name


# --------------------------------------------------------- quotes and records


def price_record(priced: Priced, revision: int, safety_margin: Decimal) -> dict[str, Any]:
    """What a hold's record keeps of its quote (``HoldRecord.price``)."""
    return {
        "revision": revision,
        "job_type": priced.job_type,
        "params": dict(priced.params),
        "credits": priced.credits,
        "exact_credits": priced.exact_credits,
        "lines": [
            {
                "label": line.label,
                "kind": str(line.kind),
                "credits": line.credits,
                "quantity": line.quantity,
                "factor": line.factor,
            }
            for line in priced.lines
        ],
        "plan": priced.plan,
        "plan_multiplier": priced.plan_multiplier,
        "safety_margin": safety_margin,
    }


_LINE_FIELDS = frozenset(QuoteLine.model_fields)
_QUOTE_FIELDS = frozenset(Quote.model_fields)


#: Lines already made, shared by the quotes that have them (QuoteLine is
#: frozen): most quotes repeat their book's common lines.
_LINES: dict[Line, QuoteLine] = {}
MAX_SHARED_LINES = 4_096


def _line(line: Line) -> QuoteLine:
    made = _LINES.get(line)
    if made is None:
        # A quote is on a web handler's hot path: its models are assembled
        # from values already checked, without pydantic's per-field pass.
        made = assembled(
            QuoteLine,
            {"label": line.label, "kind": line.kind.value, "credits": line.credits, "quantity": line.quantity,
             "factor": line.factor},
            set(_LINE_FIELDS),
        )  # fmt: skip
        if len(_LINES) >= MAX_SHARED_LINES:
            _LINES.clear()
        _LINES[line] = made
    return made


def quote_view(priced: Priced, revision: int, user_id: UUID, at: datetime) -> Quote:
    return assembled(
        Quote,
        {
            "user_id": user_id,
            "job_type": priced.job_type,
            "credits": priced.credits,
            "exact_credits": priced.exact_credits,
            "breakdown": tuple(_line(line) for line in priced.lines),
            "params": dict(priced.params),
            "price_revision": revision,
            "plan": priced.plan,
            "plan_multiplier": priced.plan_multiplier,
            "quoted_at": at,
        },
        set(_QUOTE_FIELDS),
    )


def recorded_quote(price: Mapping[str, Any], user_id: UUID, at: datetime) -> Quote:
    """The quote a hold's record keeps, as a ``Quote``."""
    return Quote(
        user_id=user_id,
        job_type=price["job_type"],
        credits=price["credits"],
        exact_credits=price["exact_credits"],
        breakdown=tuple(QuoteLine(**line) for line in price["lines"]),
        params=dict(price["params"]),
        price_revision=price["revision"],
        plan=price["plan"],
        plan_multiplier=price["plan_multiplier"],
        quoted_at=at,
    )


def revisions(events: list[Any]) -> list[PriceBookRevision]:
    """The price book's revisions from its record's events, oldest first."""
    return [
        PriceBookRevision(
            revision=number,
            defined_at=event.timestamp,
            actor=event.actor,
            book=PriceBook.from_event_data(event.book),
        )
        for number, event in enumerate(events, start=1)
    ]


# ---------------------------------------------------------------- the cache


class PriceCache:
    """The price book and users' plans as quotes read them: from memory,
    read again from the store when older than ``max_age_s``. A change this
    process records shows at once (the command cache holds the newer
    aggregate, whose version is compared); another process's within
    ``max_age_s``. Thread-safe: entries are replaced whole."""

    def __init__(
        self, read: Callable[[UUID], Any], command_cache: Any, max_age_s: float = PRICE_CACHE_MAX_AGE_S
    ) -> None:
        self.read = read
        self.command_cache = command_cache
        self.max_age_s = max_age_s
        self._book: tuple[float, PriceBookRecord | None] | None = None
        #: user -> (read at, plan, slot id, slot version, subscription id, subscription version)
        self._plans: OrderedDict[UUID, tuple[float, str, UUID, int, UUID | None, int]] = OrderedDict()
        self._lock = threading.Lock()

    def _local(self, aggregate_id: UUID) -> Any:
        """The command cache's copy, when it has one (read, never changed)."""
        if self.command_cache is None:
            return None
        try:
            return self.command_cache.get(aggregate_id)
        except KeyError:
            return None

    def record(self, *, fresh: bool = False) -> PriceBookRecord | None:
        """The price book's record, or None when no book is defined."""
        now = time.monotonic()
        entry = self._book
        if not fresh and entry is not None and now - entry[0] < self.max_age_s:
            local = self._local(PRICE_BOOK_ID)
            if isinstance(local, PriceBookRecord) and (entry[1] is None or local.version > entry[1].version):
                self._book = (entry[0], local)
                return local
            return entry[1]
        found = self.read(PRICE_BOOK_ID)
        record = found if isinstance(found, PriceBookRecord) else None
        if record is not None and self.command_cache is not None:
            # Commands then price from the same revision as quotes.
            local = self._local(PRICE_BOOK_ID)
            if not isinstance(local, PriceBookRecord) or local.version < record.version:
                self.command_cache.put(PRICE_BOOK_ID, record)
        self._book = (now, record)
        return record

    def plan(self, user_id: UUID, at: datetime, *, fresh: bool = False) -> str:
        """The plan the user is entitled to at ``at`` (``free`` without one)."""
        now = time.monotonic()
        entry = self._plans.get(user_id)
        if not fresh and entry is not None and now - entry[0] < self.max_age_s and not self._moved(entry):
            return entry[1]
        slot_id = slot_id_for(user_id)
        slot = self.read(slot_id)
        s = self.read(slot.live) if isinstance(slot, SubscriberSlot) and slot.live is not None else None
        s = s if isinstance(s, Subscription) else None
        plan = s.plan if s is not None and entitled(s, at) else FREE_PLAN.name
        with self._lock:
            self._plans[user_id] = (
                now,
                plan,
                slot_id,
                slot.version if isinstance(slot, SubscriberSlot) else 0,
                None if s is None else s.id,
                0 if s is None else s.version,
            )
            self._plans.move_to_end(user_id)
            while len(self._plans) > PRICE_CACHE_USERS:
                self._plans.popitem(last=False)
        return plan

    def _moved(self, entry: tuple[float, str, UUID, int, UUID | None, int]) -> bool:
        """Whether this process recorded a change of the user's slot or subscription since."""
        slot = self._local(entry[2])
        if isinstance(slot, SubscriberSlot) and slot.version > entry[3]:
            return True
        if entry[4] is None:
            return False
        s = self._local(entry[4])
        return isinstance(s, Subscription) and s.version > entry[5]

    def quote(self, user_id: UUID, job_type: str, params: Mapping[str, Any], at: datetime, *, fresh: bool) -> Quote:
        record = self.record(fresh=fresh)
        if record is None:
            raise UnknownJobType(job_type)
        book = record.book
        plan = self.plan(user_id, at, fresh=fresh) if book.plan_multipliers else None
        return quote_view(book.price(job_type, params, plan), record.revision, user_id, at)
