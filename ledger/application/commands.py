"""Commands: the ``Command`` base, the unit of work it runs in
(``UnitOfWork``), and the credit commands that grant, spend and adjust.
Commands validate themselves when built, so bad input fails before anything is
loaded or recorded. The hold commands (reserve, settle, release) live with the
rest of a hold's lifecycle in ``ledger.application.holds``; what commands and
queries return, in ``ledger.application.results``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, overload
from uuid import UUID

from ledger.application.results import Receipt
from ledger.clock import LATEST, require_utc
from ledger.domain.checks import (
    MAX_LABEL_LENGTH,
    MAX_TEXT_LENGTH,
    check_amount,
    check_expires_in,
    check_key,
    check_kind,
    check_optional_text,
    check_text,
    check_user_id,
)
from ledger.domain.credits import GRANT_KINDS, SPEND_KINDS, CreditKind, entry_id_for
from ledger.errors import InvalidAmount, InvalidArgument

if TYPE_CHECKING:
    from ledger.domain.credits import CreditAccount
    from ledger.domain.subscriptions import CreditPolicy, SubscriberSlot
    from ledger.errors import LedgerError

T = TypeVar("T")


class lock_free_cached_property(Generic[T]):
    """``functools.cached_property`` without its lock: on Python 3.11 the
    first read of each instance's value takes a lock shared by every
    instance (3.12 dropped it), four times per command here. Two threads
    that compute a command's value at once compute the same value."""

    def __init__(self, func: Callable[[Any], T]) -> None:
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> lock_free_cached_property[T]: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> T: ...

    def __get__(self, instance: object | None, owner: type | None = None) -> T | lock_free_cached_property[T]:
        if instance is None:
            return self
        value = self.func(instance)
        # Stored where functools' is: later reads find it before this descriptor.
        instance.__dict__[self.name] = value
        return value


def lifetime_end(now: datetime, lifetime: timedelta) -> datetime:
    """``now + lifetime``, within the times the ledger takes (``clock.LATEST``)."""
    if lifetime >= LATEST - now:  # compared as durations: the sum itself may overflow
        raise InvalidArgument(
            f"expires_in {lifetime} from {now.isoformat()} is past {LATEST.isoformat()}, "
            "the last time the ledger takes",
            param="expires_in",
        )
    return now + lifetime


def _duration(value: timedelta) -> str:
    """ISO 8601, exact to the microsecond: ``PT3600S``, ``PT1.5S``."""
    seconds, micros = divmod(value // timedelta(microseconds=1), 1_000_000)
    return f"PT{seconds}.{micros:06d}".rstrip("0") + "S" if micros else f"PT{seconds}S"


#: The last time ``_canonical`` wrote, and its text: a batch's commands
#: often share one (their grants' expiry), and isoformat costs more than the
#: rest of a grant's canonical form. (One tuple, read and replaced whole.)
_last_time: tuple[datetime | None, str] = (None, "")


def _canonical(value: Any) -> Any:
    if isinstance(value, datetime):
        global _last_time
        last = _last_time
        if last[0] is value:
            return last[1]
        text = value.isoformat()
        _last_time = (value, text)
        return text
    if isinstance(value, timedelta):
        return _duration(value)
    if isinstance(value, UUID):
        return str(value)
    return value


def _json_default(value: Any) -> Any:
    canonical_data = getattr(value, "canonical_data", None)
    if callable(canonical_data) and not isinstance(value, type):
        # A value whose fingerprint form differs from its fields (PlanTerms).
        return canonical_data()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, Decimal):
        return str(value)
    return _canonical(value)


#: Exact types ``_canonical`` returns unchanged (a subclass may be anything).
_PLAIN_TYPES = frozenset({str, int, bool, float, type(None)})


def _canonical_json(body: dict[str, Any]) -> str:
    """``json.dumps(body, sort_keys=True, default=_json_default)``: the same
    text, from the C encoder ``json.dumps`` ends in, built here directly (it
    builds an encoder object first, then the C one, per command)."""
    if c_make_encoder is None:
        return json.dumps(body, sort_keys=True, default=_json_default)
    # json.dumps' settings: circular check on, ASCII, ", " and ": ", keys sorted, NaN allowed.
    encode = c_make_encoder({}, _json_default, encode_basestring_ascii, None, ": ", ", ", True, False, True)
    return "".join(encode(body, 0))


#: ``field`` metadata of a keyword field added to a command in a later
#: version, with the default that keeps the command's earlier meaning
#: (``field(default=…, kw_only=True, metadata=ADDED)``): at its default it is
#: left out of the fingerprint, so a key recorded before the field existed
#: still replays instead of raising IdempotencyConflict.
ADDED_FIELD = "pingvas.added_field"
ADDED: Mapping[str, bool] = MappingProxyType({ADDED_FIELD: True})


class UnitOfWork(Protocol):
    """What a command may do while it runs: the one attempt at a batch that it
    shares with the batch's other commands. Everything a command changes is
    saved in one transaction with its key's record, or not at all; after a
    clash the engine reloads and runs the whole batch again, so ``apply`` must
    decide from what it reads here and nothing else.

    This is the ledger's command seam (``ledger.extension``): subscription
    commands and payment providers' commands run through it exactly as the
    credit commands do."""

    #: The moment the attempt runs at (timezone-aware UTC): every event it records carries it.
    now: datetime
    #: How subscription changes move credits.
    policy: CreditPolicy

    def prefetch(self, ids: Iterable[UUID], users: Iterable[UUID | None] = ()) -> None:
        """Reads these aggregates and users' accounts in one bulk read."""

    def account(self, user_id: UUID, *, open_missing: bool = False) -> CreditAccount:
        """The user's credit account, its due holds and lapsed blocks applied;
        ``open_missing`` opens one for a user who has none (else UnknownAccount)."""
        ...

    def aggregate(self, aggregate_id: UUID, cls: type[T]) -> T | None:
        """An aggregate by id, read once per attempt, or None when there is none of that type."""
        ...

    def add(self, aggregate: Any) -> None:
        """Saves a new aggregate (or one read elsewhere) with the attempt."""

    def slot(self, user_id: UUID) -> SubscriberSlot:
        """The user's one-live-subscription slot, opened when missing."""
        ...

    def recorded(self, key: str) -> bool:
        """Whether a command under ``key`` was recorded, in this attempt or before."""
        ...

    def owner_of(self, reservation_id: UUID, hint: UUID | None) -> UUID:
        """The user whose account holds the reservation (``hint`` when given)."""
        ...

    def closed_status(self, account: CreditAccount, reservation_id: UUID) -> LedgerError:
        """Why a hold is not open on ``account``: closed before, or never there."""
        ...

    def grant_once(
        self,
        user_id: UUID,
        amount: int,
        kind: CreditKind,
        *,
        key: str,
        expires_at: datetime | None,
        reference_type: str | None,
        reference_id: str | None,
        description: str,
    ) -> int:
        """Grants credits under a key derived from a business event, once;
        returns the credits granted (0 when the key was recorded before)."""
        ...

    def claw_back_once(
        self,
        user_id: UUID,
        wanted: int,
        *,
        key: str,
        block_id: str | None,
        from_other_credits: bool,
        reference_type: str | None,
        reference_id: str | None,
        description: str,
    ) -> int:
        """Takes back up to ``wanted`` credits after a refund, once; returns the credits taken."""
        ...

    def done(
        self,
        command: Command,
        account: CreditAccount,
        *,
        amount: int,
        entry_id: UUID | None = None,
        reservation_id: UUID | None = None,
    ) -> Receipt:
        """Checks the account's invariants, records the command's key and returns its receipt."""
        ...

    def finish(
        self, command: Command, user_id: UUID | None, *, amount: int, subscription_id: UUID | None = None
    ) -> Receipt:
        """Records the key of a command that posted no credit movement of its
        own (or only through ``grant_once``) and returns its receipt."""
        ...

    def price_hold(self, reservation_id: UUID, price: dict[str, Any]) -> None:
        """Records, on the record of a hold this attempt reserved, the quote
        that sized it and the price book revision it came from."""


#: Per command class: (name, added in a later version, default) of each
#: field its fingerprint covers (``dataclasses.fields`` is slow per call).
_FINGERPRINTED: dict[type, tuple[tuple[str, bool, Any], ...]] = {}


def _fingerprinted_fields(cls: type[Command]) -> tuple[tuple[str, bool, Any], ...]:
    found = _FINGERPRINTED.get(cls)
    if found is None:
        found = _FINGERPRINTED[cls] = tuple(
            (f.name, bool(f.metadata.get(ADDED_FIELD)), f.default)
            for f in fields(cls)
            if f.name != "key" and f.name not in cls.hints
        )
    return found


@dataclass(frozen=True)
class Command:
    """A ledger command: validated arguments, and ``apply``, which runs it in
    a unit of work. ``key`` is the caller's idempotency key; a retry with the
    same key and arguments returns the first receipt, other arguments raise
    IdempotencyConflict."""

    name: ClassVar[str]
    #: Fields that steer routing only and are left out of the fingerprint.
    hints: ClassVar[frozenset[str]] = frozenset()
    key: str

    @lock_free_cached_property
    def _canonical_body(self) -> dict[str, Any]:
        """The command's name and fingerprinted arguments, before JSON encoding."""
        body = {}
        for name, added, default in _fingerprinted_fields(type(self)):
            value = getattr(self, name)
            if not (added and value == default):
                if type(value) in _PLAIN_TYPES:  # most are: none of the types _canonical converts
                    body[name] = value
                elif isinstance(value, str):
                    # A str enum as its text, which is what JSON encodes of it: a
                    # body of plain values is not tracked by the garbage collector.
                    body[name] = str.__str__(value)
                else:
                    body[name] = _canonical(value)
        return {"command": self.name, **body}

    @lock_free_cached_property
    def _canonical_text(self) -> str:
        return _canonical_json(self._canonical_body)

    @lock_free_cached_property
    def _plain_arguments(self) -> dict[str, Any] | None:
        """``arguments`` when every value is a JSON scalar already (as a
        grant's are), built without decoding the canonical text; None when a
        value needs the JSON round trip (a list, a Decimal, a nested value)."""
        plain: dict[str, Any] = {}
        body = self._canonical_body
        for name in sorted(body):
            value = body[name]
            kind = type(value)
            if value is None or kind is str or kind is int or kind is bool:
                plain[name] = value
            elif isinstance(value, str):  # a str enum: JSON keeps its text
                plain[name] = str.__str__(value)
            else:
                return None
        return plain

    @lock_free_cached_property
    def fingerprint(self) -> str:
        """A digest of the command's name and arguments (not its key)."""
        return hashlib.sha256(self._canonical_text.encode()).hexdigest()

    @property
    def arguments(self) -> dict[str, Any]:
        """What the fingerprint digests, as JSON values: the command's name
        and the arguments that make it this command (recorded with its key,
        so that a conflicting reuse can say which of them differ)."""
        plain = self._plain_arguments
        if plain is not None:
            return dict(plain)
        arguments: dict[str, Any] = json.loads(self._canonical_text)
        return arguments

    def reads(self) -> tuple[list[UUID], list[UUID]]:
        """The aggregate ids and the users' accounts ``apply`` will read
        besides the account of its ``user_id`` field, when known in advance:
        a batch reads those of all its commands at once."""
        return [], []

    def apply(self, unit: UnitOfWork) -> Receipt:
        """Runs the command in ``unit``: reads, decides, triggers events, and
        returns ``unit.done(...)`` or ``unit.finish(...)``. Raises a
        LedgerError to refuse; nothing is then recorded."""
        raise NotImplementedError(f"{type(self).__name__} does not define apply()")

    def _normalise(self, name: str, value: object) -> None:
        """Keeps the checked form of a field (a plain str or UUID, a UTC time)."""
        object.__setattr__(self, name, value)


def differing_arguments(recorded: Mapping[str, Any], command: Mapping[str, Any]) -> tuple[str, ...]:
    """The names whose values differ between two commands' ``arguments``.
    Of one command, a name only one side has is a field added later that the
    other left at its default: it differs. Of two commands, a field only one
    of them has differs unless it is None there."""
    same_command = recorded.get("command") == command.get("command")
    missing = object() if same_command else None
    return tuple(
        sorted(name for name in {*recorded, *command} if recorded.get(name, missing) != command.get(name, missing))
    )


@dataclass(frozen=True)
class GrantCredits(Command):
    name: ClassVar[str] = "grant"
    user_id: UUID = field(kw_only=True)
    amount_credits: int = field(kw_only=True)
    kind: CreditKind = field(kw_only=True)
    description: str = field(default="", kw_only=True)
    reference_type: str | None = field(default=None, kw_only=True)
    reference_id: str | None = field(default=None, kw_only=True)
    expires_at: datetime | None = field(default=None, kw_only=True)
    actor: str | None = field(default=None, kw_only=True)
    #: The block's lifetime from the moment the grant is recorded, instead of
    #: ``expires_at``: a retry is then the same command.
    expires_in: timedelta | None = field(default=None, kw_only=True, metadata=ADDED)

    def __post_init__(self) -> None:
        self._normalise("key", check_key(self.key))
        self._normalise("user_id", check_user_id(self.user_id))
        check_amount(self.amount_credits)
        self._normalise("kind", check_kind(self.kind, GRANT_KINDS, "grant"))
        self._normalise("description", check_text(self.description, "description", MAX_TEXT_LENGTH))
        self._normalise("reference_type", check_optional_text(self.reference_type, "reference_type", 50))
        self._normalise("reference_id", check_optional_text(self.reference_id, "reference_id", MAX_LABEL_LENGTH))
        self._normalise("actor", check_optional_text(self.actor, "actor", MAX_LABEL_LENGTH))
        if self.expires_at is not None:
            self._normalise("expires_at", require_utc(self.expires_at, "expires_at"))
        if self.expires_in is not None:
            check_expires_in(self.expires_in)
            if self.expires_at is not None:
                raise InvalidArgument("give expires_at or expires_in, not both", param="expires_in")

    def expiry(self, now: datetime) -> datetime | None:
        """When the block lapses, for a grant recorded at ``now``."""
        return self.expires_at if self.expires_in is None else lifetime_end(now, self.expires_in)

    def apply(self, unit: UnitOfWork) -> Receipt:
        account = unit.account(self.user_id, open_missing=True)
        entry_id = entry_id_for(self.key)
        account.grant(
            entry_id=entry_id,
            amount=self.amount_credits,
            kind=self.kind,
            description=self.description,
            reference_type=self.reference_type,
            reference_id=self.reference_id,
            expires_at=self.expiry(unit.now),
            actor=self.actor,
            key=self.key,
            now=unit.now,
        )
        return unit.done(self, account, amount=self.amount_credits, entry_id=entry_id)


@dataclass(frozen=True)
class SpendCredits(Command):
    name: ClassVar[str] = "spend"
    user_id: UUID = field(kw_only=True)
    amount_credits: int = field(kw_only=True)
    kind: CreditKind = field(default=CreditKind.API_USE, kw_only=True)
    description: str = field(default="", kw_only=True)
    reference_type: str | None = field(default=None, kw_only=True)
    reference_id: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        self._normalise("key", check_key(self.key))
        self._normalise("user_id", check_user_id(self.user_id))
        check_amount(self.amount_credits)
        self._normalise("kind", check_kind(self.kind, SPEND_KINDS, "spend"))
        self._normalise("description", check_text(self.description, "description", MAX_TEXT_LENGTH))
        self._normalise("reference_type", check_optional_text(self.reference_type, "reference_type", 50))
        self._normalise("reference_id", check_optional_text(self.reference_id, "reference_id", MAX_LABEL_LENGTH))

    def apply(self, unit: UnitOfWork) -> Receipt:
        account = unit.account(self.user_id)
        entry_id = entry_id_for(self.key)
        account.debit(
            entry_id=entry_id,
            amount=self.amount_credits,
            kind=self.kind,
            description=self.description,
            reference_type=self.reference_type,
            reference_id=self.reference_id,
            actor=None,
            key=self.key,
            now=unit.now,
        )
        return unit.done(self, account, amount=-self.amount_credits, entry_id=entry_id)


@dataclass(frozen=True)
class AdjustCredits(Command):
    name: ClassVar[str] = "adjust"
    user_id: UUID = field(kw_only=True)
    delta_credits: int = field(kw_only=True)
    reason: str = field(kw_only=True)
    actor: str = field(kw_only=True)

    def __post_init__(self) -> None:
        self._normalise("key", check_key(self.key))
        self._normalise("user_id", check_user_id(self.user_id))
        if type(self.delta_credits) is not int or self.delta_credits == 0:
            raise InvalidAmount(
                f"delta_credits must be a non-zero int, got {self.delta_credits!r}", param="delta_credits"
            )
        check_amount(abs(self.delta_credits), "delta_credits")
        self._normalise("reason", check_text(self.reason, "reason", MAX_TEXT_LENGTH, required=True))
        self._normalise("actor", check_text(self.actor, "actor", MAX_LABEL_LENGTH, required=True))

    def apply(self, unit: UnitOfWork) -> Receipt:
        account = unit.account(self.user_id, open_missing=self.delta_credits > 0)
        entry_id = entry_id_for(self.key)
        amount = abs(self.delta_credits)
        kind = CreditKind.ADMIN_ADJUSTMENT
        if self.delta_credits > 0:
            account.grant(
                entry_id=entry_id, amount=amount, kind=kind, description=self.reason, reference_type=None,
                reference_id=None, expires_at=None, actor=self.actor, key=self.key, now=unit.now,
            )  # fmt: skip
        else:
            account.debit(
                entry_id=entry_id, amount=amount, kind=kind, description=self.reason, reference_type=None,
                reference_id=None, actor=self.actor, key=self.key, now=unit.now,
            )  # fmt: skip
        return unit.done(self, account, amount=self.delta_credits, entry_id=entry_id)
