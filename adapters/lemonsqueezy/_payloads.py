"""Reading webhook bodies: limits, strict JSON, and pydantic models of the
parts of Lemon Squeezy's events the ledger uses.

Models ignore fields they do not name (Lemon Squeezy adds fields over time)
and are strict about the ones they do: an id must be an integer, a time an
ISO-8601 string with a zone, a status one of the documented values. A few
shapes of Lemon Squeezy's earlier documentation are read as they meant:
``"refunded": null`` is not refunded, and an invoice may lack ``customer_id``
(its subscription says whose it is). ``data.id`` must be a positive integer
for the resource types the ledger applies (:data:`APPLIED_TYPES`), and is
read in its canonical form (``000770051`` is ``770051``); another type's
event is stored whatever its id looks like, and not applied.

Two levels of failure:

* :class:`MalformedBody`: the body is not a Lemon Squeezy event at all (too
  large, not UTF-8 JSON, too deeply nested, no ``meta.event_name`` or no
  ``data`` object). It is rejected and nothing is stored.
* pydantic's ``ValidationError`` from :func:`subscription_of`,
  :func:`invoice_of` or :func:`order_of`: a signed, well-formed event whose
  attributes the ledger cannot use. It is stored and fails processing with the
  reason, so that nothing Lemon Squeezy signed is ever lost.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
)

from adapters.webhooks import Malformed

#: Lemon Squeezy's bodies are a few kilobytes; anything near this is hostile.
MAX_BODY_BYTES = 1024 * 1024
#: Their JSON nests five or six levels deep.
MAX_DEPTH = 32
#: Ids are integers; bigger ones do not fit PostgreSQL's BIGINT and are not ids.
MAX_ID = 2**53
#: Money in cents; a trillion dollars is not a real invoice.
MAX_CENTS = 10**14
MAX_QUANTITY = 10_000
#: The columns the delivery is stored in (webhook_events.event_type, event_id).
MAX_EVENT_NAME = 50
MAX_WEBHOOK_ID = 100
#: The ``data.type`` values the adapter applies; their ids are Lemon Squeezy's integers.
APPLIED_TYPES = frozenset({"subscriptions", "subscription-invoices", "orders"})
#: Digits (an applied type's id, at most 32 of them).
_DIGITS = re.compile(r"[0-9]{1,32}")

_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
#: Escapes that decode to U+0000 or to a surrogate: only bodies with one need
#: the walk over every string (PHP writes emoji as surrogate pairs).
_SUSPECT_ESCAPES = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")
_NOT_BRACKETS = re.compile(rb"[^\[\]{}]+")


class MalformedBody(Malformed):
    """The body is not a Lemon Squeezy event; ``str(exc)`` says why."""


# ----------------------------------------------------------------------- JSON


def _reject_constant(name: str) -> Any:
    raise MalformedBody(f"{name} is not valid JSON")


#: A number with a fraction or an exponent: at most this long, and its
#: decimal exponent within this bound. Lemon Squeezy's numbers are cents and
#: ids; PostgreSQL's jsonb refuses an exponent beyond about -16,383 or
#: +131,071, and a double overflows past 1e308, so a body that passed the
#: signature with such a number could never be stored: it is refused (400)
#: at once rather than failing (500) on every retry.
MAX_NUMBER_CHARS = 100
MAX_NUMBER_EXPONENT = 1_000


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or len(text) > MAX_NUMBER_CHARS:
        raise MalformedBody(f"number {text[:20]} is out of range")
    exponent = Decimal(text).as_tuple().exponent
    if not isinstance(exponent, int) or not -MAX_NUMBER_EXPONENT <= exponent <= MAX_NUMBER_EXPONENT:
        raise MalformedBody(f"number {text[:20]} is out of range (its exponent is beyond ±{MAX_NUMBER_EXPONENT})")
    return value


def too_deep(raw: bytes, max_depth: int) -> bool:
    """Whether arrays and objects nest deeper than ``max_depth``, strings
    skipped. A body with fewer brackets than that cannot be (the usual case,
    decided by two C counts); otherwise C regexes strip the strings and the
    loop stops at the first level too deep, so a hostile body cannot make
    this slow."""
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return False
    brackets = _NOT_BRACKETS.sub(b"", _STRINGS.sub(b'""', raw))
    depth = 0
    for byte in brackets:
        depth += 1 if byte in b"[{" else -1
        if depth > max_depth:
            return True
    return False


def _check_strings(value: Any) -> None:
    # PostgreSQL's jsonb refuses U+0000 and lone surrogates cannot be encoded
    # as UTF-8: a body with either could be verified but never stored.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                raise MalformedBody("strings must not contain U+0000")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise MalformedBody("strings must not contain lone surrogate escapes") from None


def parse_json(raw: bytes, *, max_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """The body as a JSON object, or MalformedBody."""
    if len(raw) > max_bytes:
        raise MalformedBody(f"body is {len(raw)} bytes; at most {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedBody("body is not UTF-8") from None
    if too_deep(raw, max_depth):
        raise MalformedBody(f"JSON nests deeper than {max_depth} levels")
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except MalformedBody:
        raise
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers longer than Python's
        # 4,300-digit limit.
        raise MalformedBody(f"body is not JSON: {str(exc)[:120]}") from None
    if not isinstance(value, dict):
        raise MalformedBody(f"body is a JSON {type(value).__name__}, not an object")
    if _SUSPECT_ESCAPES.search(raw):
        _check_strings(value)
    return value


# ------------------------------------------------------------------- envelope


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


def _custom_data(value: Any) -> Any:
    # PHP encodes an empty associative array as [], and a list as a JSON
    # array: custom data that is not a key-value object names no user, and
    # reads as none (a signed delivery is stored, not refused for it).
    return value if isinstance(value, dict) else None


def is_test_flag(value: Any) -> bool:
    """Whether a ``test_mode`` value calls the event a test: any value but
    absent (None here), null or false. Lemon Squeezy sends booleans; another
    value is read as a test, so that a live adapter never applies it."""
    return value is not None and value is not False


class Meta(_Model):
    event_name: Annotated[str, Field(min_length=1, max_length=MAX_EVENT_NAME, pattern=r"^[a-z][a-z0-9_]*$")]
    webhook_id: Annotated[str, Field(min_length=1, max_length=MAX_WEBHOOK_ID)] | None = None
    #: Any JSON value: see ``is_test_flag`` (a boolean in practice).
    test_mode: Any = False
    custom_data: Annotated[dict[str, Any] | None, BeforeValidator(_custom_data)] = None


class Resource(_Model):
    """A JSON:API resource object, as in the body's ``data`` and in the REST API.

    Any printable id (no spaces, at most 100 characters) for a type the ledger
    does not apply, so that a new kind of event is stored, not refused; a
    positive integer, canonical, for the types it applies."""

    type: Annotated[str, Field(min_length=1, max_length=50)]
    id: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[\x21-\x7e]+$")]
    attributes: dict[str, Any]

    @field_validator("id", mode="before")
    @classmethod
    def _id_as_text(cls, value: Any) -> Any:
        # JSON:API ids are strings; accept a bare integer id too.
        return str(value) if type(value) is int and value > 0 else value

    @field_validator("id", mode="after")
    @classmethod
    def _applied_ids_are_integers(cls, value: str, info: ValidationInfo) -> str:
        """An applied type's id is Lemon Squeezy's integer, in its canonical
        decimal form: ``000770051`` is order 770051 (not another order that
        would be credited again), and 0 is no id."""
        if info.data.get("type") not in APPLIED_TYPES:
            return value
        if not _DIGITS.fullmatch(value) or int(value) == 0:
            raise ValueError(
                f"a {info.data.get('type')} id must be 1 to 32 digits (a positive integer), got {value[:40]!r}"
            )
        return str(int(value))


class Envelope(_Model):
    meta: Meta
    data: Resource

    @property
    def test_mode(self) -> bool:
        """Whether the event is a test-mode one: ``meta.test_mode`` or the
        object's own ``attributes.test_mode`` (any value but absent, null or
        false). A live adapter never applies what either calls a test."""
        return is_test_flag(self.meta.test_mode) or is_test_flag(self.data.attributes.get("test_mode"))

    @property
    def custom_user_id(self) -> str | None:
        """``meta.custom_data.user_id`` as sent: checkouts pass strings."""
        found = (self.meta.custom_data or {}).get("user_id")
        return found if isinstance(found, str) else None

    @property
    def has_custom_user_id(self) -> bool:
        return "user_id" in (self.meta.custom_data or {})


def envelope_of(payload: dict[str, Any]) -> Envelope:
    """The event's meta and data, or MalformedBody saying which part is missing."""
    meta, data = payload.get("meta"), payload.get("data")
    if not isinstance(meta, dict) or "event_name" not in meta:
        raise MalformedBody("not a Lemon Squeezy event: no meta.event_name")
    if not isinstance(data, dict):
        raise MalformedBody("not a Lemon Squeezy event: no data object")
    from pydantic import ValidationError

    try:
        return Envelope.model_validate(payload)
    except ValidationError as exc:
        raise MalformedBody(f"not a Lemon Squeezy event: {_first_error(exc)}") from None


def _first_error(exc: Any) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {error['msg']}"


def describe_error(exc: Any) -> str:
    """A one-line reason for a ValidationError, naming every bad field (at most five)."""
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"])
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


# ------------------------------------------------------------ attribute types


def parse_time(value: Any) -> datetime:
    if not isinstance(value, str) or len(value) > 40:
        raise ValueError("must be an ISO-8601 date-time string")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError("must carry a time zone (Lemon Squeezy sends UTC with Z)")
    if not 2000 <= parsed.year <= 2200:
        raise ValueError("year out of range")
    # Lemon Squeezy's updated_at has one-second precision in practice; the
    # ledger compares snapshots by the second.
    return parsed.astimezone(UTC).replace(microsecond=0)


def _null_is_false(value: Any) -> Any:
    # Early documented order and invoice shapes carry "refunded": null.
    return False if value is None else value


Time = Annotated[datetime, BeforeValidator(parse_time)]
#: ``refunded``: a JSON boolean, or null (not refunded).
Refunded = Annotated[StrictBool, BeforeValidator(_null_is_false)]
Id = Annotated[StrictInt, Field(ge=1, le=MAX_ID)]
Cents = Annotated[StrictInt, Field(ge=0, le=MAX_CENTS)]


class Pause(_Model):
    mode: Literal["void", "free"]
    resumes_at: Time | None = None


SubscriptionStatus = Literal["on_trial", "active", "paused", "past_due", "unpaid", "cancelled", "expired"]


class SubscriptionAttributes(_Model):
    customer_id: Id
    order_id: Id | None = None
    variant_id: Id
    status: SubscriptionStatus
    cancelled: StrictBool = False
    pause: Pause | None = None
    trial_ends_at: Time | None = None
    renews_at: Time | None = None
    ends_at: Time | None = None
    created_at: Time
    updated_at: Time
    test_mode: StrictBool = False
    #: The subscription this one replaces: the customer switched product
    #: through a new subscription, and the old one is cancelled.
    migration_from_subscription_id: Id | None = None


InvoiceStatus = Literal["pending", "paid", "void", "refunded", "partial_refund"]


class InvoiceAttributes(_Model):
    subscription_id: Id
    #: Absent from early documented invoices; the subscription names the user.
    customer_id: Id | None = None
    billing_reason: Literal["initial", "renewal", "updated"]
    status: InvoiceStatus
    currency: Annotated[str, Field(min_length=3, max_length=3)] = "USD"
    total: Cents
    refunded: Refunded = False
    refunded_amount: Cents = 0
    created_at: Time
    updated_at: Time
    test_mode: StrictBool = False


class OrderItem(_Model):
    variant_id: Id
    quantity: Annotated[StrictInt, Field(ge=1, le=MAX_QUANTITY)] = 1


OrderStatus = Literal["pending", "failed", "paid", "refunded", "partial_refund", "fraudulent"]


class OrderAttributes(_Model):
    customer_id: Id
    status: OrderStatus
    currency: Annotated[str, Field(min_length=3, max_length=3)] = "USD"
    total: Cents
    refunded: Refunded = False
    refunded_amount: Cents = 0
    first_order_item: OrderItem
    created_at: Time
    updated_at: Time
    test_mode: StrictBool = False


def subscription_of(data: Resource) -> SubscriptionAttributes:
    return SubscriptionAttributes.model_validate(data.attributes)


def invoice_of(data: Resource) -> InvoiceAttributes:
    return InvoiceAttributes.model_validate(data.attributes)


def order_of(data: Resource) -> OrderAttributes:
    return OrderAttributes.model_validate(data.attributes)
