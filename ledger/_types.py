"""Public value types: kinds of credit movement, command objects, and the
read-only views the ledger returns. Commands validate themselves when built, so
bad input fails before anything is loaded or recorded."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from functools import cached_property
from types import MappingProxyType
from typing import Any, ClassVar, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from ._clock import require_utc
from ._errors import InvalidAmount, InvalidArgument

#: The largest balance and the largest single amount: the seed stores credits in
#: PostgreSQL ``INT`` columns (``amount``, ``balance_after``).
MAX_CREDITS = 2_147_483_647
MAX_KEY_LENGTH = 200
MAX_TEXT_LENGTH = 500  # the seed's credit_transactions.description is VARCHAR(500)
MAX_LABEL_LENGTH = 100


class CreditKind(StrEnum):
    """What a posted balance change was. The values are the seed's
    ``credit_transactions.type`` values plus ``purchase`` and ``expiration``."""

    SUBSCRIPTION_GRANT = "subscription_grant"
    SUBSCRIPTION_RENEW = "subscription_renew"
    PURCHASE = "purchase"
    BONUS = "bonus"
    REFUND = "refund"
    ADMIN_ADJUSTMENT = "admin_adjustment"
    API_USE = "api_use"
    GENERATION_USE = "generation_use"
    EXPIRATION = "expiration"


GRANT_KINDS = frozenset(
    {
        CreditKind.SUBSCRIPTION_GRANT,
        CreditKind.SUBSCRIPTION_RENEW,
        CreditKind.PURCHASE,
        CreditKind.BONUS,
        CreditKind.REFUND,
        CreditKind.ADMIN_ADJUSTMENT,
    }
)
SPEND_KINDS = frozenset({CreditKind.API_USE, CreditKind.GENERATION_USE, CreditKind.REFUND})


def check_amount(value: object, name: str = "amount_credits") -> int:
    # bool is an int subclass; True credits is a bug, not one credit.
    if type(value) is not int:
        raise InvalidAmount(f"{name} must be a whole number of credits (int), not {type(value).__name__}")
    if value <= 0:
        raise InvalidAmount(f"{name} must be greater than zero, got {value}")
    if value > MAX_CREDITS:
        raise InvalidAmount(f"{name} must be at most {MAX_CREDITS}, got {value}")
    return value


def check_uuid(value: object, name: str) -> UUID:
    if not isinstance(value, UUID):
        raise InvalidArgument(f"{name} must be a UUID, not {type(value).__name__}")
    return value


def check_user_id(value: object, name: str = "user_id") -> UUID:
    """A user's id: a UUID, and not the nil UUID, which is nobody's (it is
    what an unset or zeroed id reads as, and would pool every such caller's
    credits in one account)."""
    user = check_uuid(value, name)
    if user.int == 0:
        raise InvalidArgument(f"{name} must not be the nil UUID {user}: no user has it")
    return user


def check_text(value: object, name: str, max_length: int, *, required: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a str, not {type(value).__name__}")
    if len(value) > max_length:
        raise InvalidArgument(f"{name} is {len(value)} characters long; at most {max_length}")
    if required and not value.strip():
        raise InvalidArgument(f"{name} must not be empty")
    return value


def check_optional_text(value: object, name: str, max_length: int) -> str | None:
    return None if value is None else check_text(value, name, max_length)


def check_key(value: object) -> str:
    key = check_text(value, "key", MAX_KEY_LENGTH, required=True)
    if key != key.strip() or not key.isprintable():
        raise InvalidArgument(f"key {key!r} must be printable with no surrounding whitespace")
    return key


def _canonical(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    return value


def _json_default(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, Decimal):
        return str(value)
    return _canonical(value)


#: ``field`` metadata of a keyword field added to a command in a later
#: version, with the default that keeps the command's earlier meaning
#: (``field(default=…, kw_only=True, metadata=ADDED)``): at its default it is
#: left out of the fingerprint, so a key recorded before the field existed
#: still replays instead of raising IdempotencyConflict.
ADDED_FIELD = "pingvas.added_field"
ADDED: Mapping[str, bool] = MappingProxyType({ADDED_FIELD: True})


@dataclass(frozen=True)
class Command:
    """A ledger command. ``key`` is the caller's idempotency key."""

    name: ClassVar[str]
    #: Fields that steer routing only and are left out of the fingerprint.
    hints: ClassVar[frozenset[str]] = frozenset()
    key: str

    @cached_property
    def fingerprint(self) -> str:
        """A digest of the command's name and arguments (not its key)."""
        body = {
            f.name: _canonical(getattr(self, f.name))
            for f in fields(self)
            if f.name != "key"
            and f.name not in self.hints
            and not (f.metadata.get(ADDED_FIELD) and getattr(self, f.name) == f.default)
        }
        text = json.dumps({"command": self.name, **body}, sort_keys=True, default=_json_default)
        return hashlib.sha256(text.encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {k: _canonical(v) for k, v in asdict(self).items()}


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

    def __post_init__(self) -> None:
        check_key(self.key)
        check_user_id(self.user_id)
        check_amount(self.amount_credits)
        try:
            kind = CreditKind(self.kind)
        except ValueError:
            kind = None
        if kind not in GRANT_KINDS:
            allowed = ", ".join(sorted(GRANT_KINDS))
            raise InvalidArgument(f"grant kind must be one of {allowed}; got {self.kind!r}")
        object.__setattr__(self, "kind", kind)
        check_text(self.description, "description", MAX_TEXT_LENGTH)
        check_optional_text(self.reference_type, "reference_type", 50)
        check_optional_text(self.reference_id, "reference_id", MAX_LABEL_LENGTH)
        check_optional_text(self.actor, "actor", MAX_LABEL_LENGTH)
        if self.expires_at is not None:
            object.__setattr__(self, "expires_at", require_utc(self.expires_at, "expires_at"))


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
        check_key(self.key)
        check_user_id(self.user_id)
        check_amount(self.amount_credits)
        try:
            kind = CreditKind(self.kind)
        except ValueError:
            kind = None
        if kind not in SPEND_KINDS:
            allowed = ", ".join(sorted(SPEND_KINDS))
            raise InvalidArgument(f"spend kind must be one of {allowed}; got {self.kind!r}")
        object.__setattr__(self, "kind", kind)
        check_text(self.description, "description", MAX_TEXT_LENGTH)
        check_optional_text(self.reference_type, "reference_type", 50)
        check_optional_text(self.reference_id, "reference_id", MAX_LABEL_LENGTH)


@dataclass(frozen=True)
class ReserveCredits(Command):
    name: ClassVar[str] = "reserve"
    user_id: UUID = field(kw_only=True)
    job_id: UUID = field(kw_only=True)
    amount_credits: int = field(kw_only=True)
    expires_at: datetime = field(kw_only=True)

    def __post_init__(self) -> None:
        check_key(self.key)
        check_user_id(self.user_id)
        check_uuid(self.job_id, "job_id")
        check_amount(self.amount_credits)
        object.__setattr__(self, "expires_at", require_utc(self.expires_at, "expires_at"))


@dataclass(frozen=True)
class SettleReservation(Command):
    name: ClassVar[str] = "settle"
    hints: ClassVar[frozenset[str]] = frozenset({"user_id"})
    reservation_id: UUID = field(kw_only=True)
    actual_credits: int = field(kw_only=True)
    #: Optional: the account that holds the reservation, which saves a look-up.
    user_id: UUID | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        check_key(self.key)
        check_uuid(self.reservation_id, "reservation_id")
        check_amount(self.actual_credits, "actual_credits")
        if self.user_id is not None:
            check_user_id(self.user_id)


@dataclass(frozen=True)
class ReleaseReservation(Command):
    name: ClassVar[str] = "release"
    hints: ClassVar[frozenset[str]] = frozenset({"user_id"})
    reservation_id: UUID = field(kw_only=True)
    reason: str = field(kw_only=True)
    user_id: UUID | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        check_key(self.key)
        check_uuid(self.reservation_id, "reservation_id")
        check_text(self.reason, "reason", MAX_TEXT_LENGTH, required=True)
        if self.user_id is not None:
            check_user_id(self.user_id)


@dataclass(frozen=True)
class AdjustCredits(Command):
    name: ClassVar[str] = "adjust"
    user_id: UUID = field(kw_only=True)
    delta_credits: int = field(kw_only=True)
    reason: str = field(kw_only=True)
    actor: str = field(kw_only=True)

    def __post_init__(self) -> None:
        check_key(self.key)
        check_user_id(self.user_id)
        if type(self.delta_credits) is not int or self.delta_credits == 0:
            raise InvalidAmount(f"delta_credits must be a non-zero int, got {self.delta_credits!r}")
        check_amount(abs(self.delta_credits), "delta_credits")
        check_text(self.reason, "reason", MAX_TEXT_LENGTH, required=True)
        check_text(self.actor, "actor", MAX_LABEL_LENGTH, required=True)


AnyCommand = GrantCredits | SpendCredits | ReserveCredits | SettleReservation | ReleaseReservation | AdjustCredits


class _View(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Receipt(_View):
    """The result of a command. A retry with the same key returns the first
    receipt again, with ``replayed`` set."""

    key: str
    command: str
    #: The account's user (None for catalog commands such as define_plan).
    user_id: UUID | None
    #: The posted balance change (credit_transactions.id), when the command posted one.
    entry_id: UUID | None = None
    reservation_id: UUID | None = None
    subscription_id: UUID | None = None
    #: Signed change to the balance made by this command (0 for reserve and release).
    amount_credits: int
    balance_credits: int
    held_credits: int
    available_credits: int
    recorded_at: datetime
    replayed: bool = False
    #: Where the command's events sit in the event log (None for a replay):
    #: ``ledger.views.wait(position)`` waits until the read models include it.
    position: int | None = None


class CreditBlock(_View):
    """Credits from one grant that are still unspent."""

    block_id: UUID
    kind: CreditKind
    granted_credits: int
    remaining_credits: int
    granted_at: datetime
    expires_at: datetime | None


class Balance(_View):
    user_id: UUID
    balance_credits: int
    held_credits: int
    available_credits: int
    blocks: tuple[CreditBlock, ...]
    as_of: datetime


ReservationStatus = Literal["reserved", "settled", "released"]


class Reservation(_View):
    reservation_id: UUID
    user_id: UUID
    job_id: UUID
    amount_credits: int
    expires_at: datetime
    reserved_at: datetime
    status: ReservationStatus
    settled_credits: int | None = None
    release_reason: str | None = None
    closed_at: datetime | None = None


class AccountEvent(_View):
    """One recorded event of a credit account, decoded."""

    user_id: UUID
    version: int
    type: str
    recorded_at: datetime
    data: dict[str, Any]
