"""Signing the notifications ``python -m ledger notify`` posts, and checking
them at the receiving end (``verify_signature``). No HTTP client here: a
host's web app imports this without httpx.

The signature is HMAC-SHA256, keyed with the shared secret, over the
timestamp header's value, a full stop, and the raw request body:
``hex(hmac_sha256(secret, f"{timestamp}.".encode() + body))``, sent as
``Pingvas-Signature: v1=<hex>``. The timestamp (whole Unix seconds) is sent
as ``Pingvas-Timestamp``; a receiver refuses one too far from its own clock,
so a captured request cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from ledger.errors import InvalidArgument, InvalidSignature

SIGNATURE_HEADER = "Pingvas-Signature"
TIMESTAMP_HEADER = "Pingvas-Timestamp"
ID_HEADER = "Pingvas-Notification-Id"
TYPE_HEADER = "Pingvas-Notification-Type"
#: How far a timestamp may be from the receiver's clock, by default.
DEFAULT_TOLERANCE_S = 300
#: The shortest secret the sender and ``verify_signature`` take.
MIN_SECRET_BYTES = 16
#: A Unix time in whole seconds has 10 digits until the year 2286.
MAX_TIMESTAMP_DIGITS = 12
_SCHEME = "v1="


def _key(secret: str | bytes) -> bytes:
    key = secret.encode() if isinstance(secret, str) else secret
    if not isinstance(key, bytes) or len(key) < MIN_SECRET_BYTES:
        raise InvalidArgument(f"the signing secret must be at least {MIN_SECRET_BYTES} bytes", param="secret")
    return key


def sign(secret: str | bytes, body: bytes, timestamp: int) -> str:
    """The ``Pingvas-Signature`` header's value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(_key(secret), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return _SCHEME + digest


def signed_headers(secret: str | bytes, body: bytes, *, now_s: float | None = None) -> dict[str, str]:
    """The timestamp and signature headers for ``body``, stamped now."""
    timestamp = int(time.time() if now_s is None else now_s)
    return {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: sign(secret, body, timestamp)}


def verify_signature(
    secret: str | bytes,
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now_s: float | None = None,
) -> None:
    """Checks a notification's signature over the raw ``body`` as received,
    and that its ``timestamp`` header is within ``tolerance_s`` of now.
    Raises InvalidSignature (``reason`` says which check failed); returns None when it holds."""
    key = _key(secret)
    # ASCII digits, and few of them: str.isdigit alone takes "²", which int()
    # refuses, and a few thousand digits exceed int()'s limit. Either raised
    # ValueError, which a receiver catching InvalidSignature answers with a 500.
    digits = timestamp.strip() if isinstance(timestamp, str) else ""
    if not (digits.isascii() and digits.isdigit() and len(digits) <= MAX_TIMESTAMP_DIGITS):
        raise InvalidSignature("missing_timestamp", "the timestamp header is missing or not whole seconds")
    stamp = int(digits)
    now = time.time() if now_s is None else now_s
    if abs(now - stamp) > tolerance_s:
        raise InvalidSignature(
            "stale_timestamp", f"the timestamp is {abs(now - stamp):.0f} s from now, more than {tolerance_s} s"
        )
    if not signature:
        raise InvalidSignature("missing_signature", "the signature header is missing")
    expected = hmac.new(key, f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    # The header may carry several signatures (a secret being rotated), comma separated.
    # compare_digest raises TypeError on a non-ASCII str: such a part cannot match anyway.
    given = [
        part.strip()[len(_SCHEME) :]
        for part in signature.split(",")
        if part.strip().startswith(_SCHEME) and part.isascii()
    ]
    if not any(hmac.compare_digest(expected, g) for g in given):
        raise InvalidSignature("mismatch", "the signature does not match the body and timestamp")
