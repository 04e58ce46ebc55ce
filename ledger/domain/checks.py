"""Checks of the values a command takes, at the boundary: each returns the
value as the ledger stores it (a plain ``str``, a plain ``UUID``) or raises
InvalidArgument (InvalidAmount for credits) naming the argument. Pure."""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from ledger.domain.credits import MAX_CREDITS, CreditKind
from ledger.errors import InvalidAmount, InvalidArgument

MAX_KEY_LENGTH = 200
MAX_TEXT_LENGTH = 500  # the seed's credit_transactions.description is VARCHAR(500)
MAX_LABEL_LENGTH = 100


def check_amount(value: object, name: str = "amount_credits") -> int:
    # bool is an int subclass; True credits is a bug, not one credit.
    if type(value) is not int:
        raise InvalidAmount(f"{name} must be a whole number of credits (int), not {type(value).__name__}", param=name)
    if value <= 0:
        raise InvalidAmount(f"{name} must be greater than zero, got {value}", param=name)
    if value > MAX_CREDITS:
        raise InvalidAmount(f"{name} must be at most {MAX_CREDITS}, got {value}", param=name)
    return value


def check_uuid(value: object, name: str) -> UUID:
    """``value`` as a plain ``UUID``: a subclass is copied, since the event
    store transcodes values by their exact type."""
    if not isinstance(value, UUID):
        raise InvalidArgument(f"{name} must be a UUID, not {type(value).__name__}", param=name)
    return value if type(value) is UUID else UUID(int=value.int)


def check_user_id(value: object, name: str = "user_id") -> UUID:
    """A user's id: a UUID, and not the nil UUID, which is nobody's (it is
    what an unset or zeroed id reads as, and would pool every such caller's
    credits in one account)."""
    user = check_uuid(value, name)
    if user.int == 0:
        raise InvalidArgument(f"{name} must not be the nil UUID {user}: no user has it", param=name)
    return user


def check_storable(text: str, name: str, *, param: str | None = None) -> str:
    """Refuses text that a PostgreSQL text column (UTF-8) cannot hold: a NUL
    character, or a lone surrogate (which is not Unicode text at all)."""
    nul = text.find("\x00")
    if nul >= 0:
        raise InvalidArgument(
            f"{name} contains a NUL character (at index {nul}): PostgreSQL text cannot store it", param=param or name
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(
            f"{name} contains a lone surrogate ({text[exc.start]!r} at index {exc.start}): "
            "it is not valid Unicode and cannot be stored as UTF-8",
            param=param or name,
        ) from None
    return text


def check_text(value: object, name: str, max_length: int, *, required: bool = False, param: str | None = None) -> str:
    """``value`` as a plain ``str`` that every store can hold. ``param``: the
    argument to name in the error, when ``name`` describes a part of one."""
    param = param or name
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a str, not {type(value).__name__}", param=param)
    text = str.__str__(value)  # a plain str: a subclass's behaviour must not reach the store
    if len(text) > max_length:
        raise InvalidArgument(f"{name} is {len(text)} characters long; at most {max_length}", param=param)
    if required and not text.strip():
        raise InvalidArgument(f"{name} must not be empty", param=param)
    return check_storable(text, name, param=param)


def check_optional_text(value: object, name: str, max_length: int) -> str | None:
    return None if value is None else check_text(value, name, max_length)


def check_key(value: object) -> str:
    key = check_text(value, "key", MAX_KEY_LENGTH, required=True)
    if key != key.strip() or not key.isprintable():
        raise InvalidArgument(f"key {key!r} must be printable with no surrounding whitespace", param="key")
    return key


def check_kind(value: object, allowed: frozenset[CreditKind], command: str) -> CreditKind:
    try:
        kind = CreditKind(value) if isinstance(value, str) else None
    except ValueError:
        kind = None
    if kind not in allowed:
        names = ", ".join(sorted(allowed))
        raise InvalidArgument(f"{command} kind must be one of {names}; got {value!r}", param="kind")
    return kind


#: The longest lifetime ``expires_in`` may give a grant or a hold.
MAX_EXPIRES_IN = timedelta(days=36_525)  # a hundred years


def check_expires_in(value: object) -> timedelta:
    if not isinstance(value, timedelta):
        raise InvalidArgument(f"expires_in must be a timedelta, not {type(value).__name__}", param="expires_in")
    if value <= timedelta(0):
        raise InvalidArgument(f"expires_in must be a positive duration, got {value}", param="expires_in")
    if value > MAX_EXPIRES_IN:
        raise InvalidArgument(f"expires_in must be at most {MAX_EXPIRES_IN.days} days, got {value}", param="expires_in")
    return value
