"""Webhook signatures: the lowercase hex HMAC-SHA256 of the raw request body,
keyed with the webhook's signing secret, in the ``X-Signature`` header.

The digest is taken over the exact bytes received. Lemon Squeezy encodes its
bodies with PHP's ``json_encode`` (``\\/`` for ``/``, ``\\uXXXX`` for non-ASCII);
parsing and re-serialising would change the bytes and break the signature.

>>> body = b'{"meta":{"event_name":"order_created"},"data":{"links":{"self":"https:\\/\\/x"}}}'
>>> signature = sign(body, "whsec")
>>> verify(body, signature, "whsec"), verify(body + b" ", signature, "whsec")
(True, False)
"""

from __future__ import annotations

import hashlib
import hmac

from ledger import ConfigurationError

SIGNATURE_HEADER = "x-signature"
#: Lemon Squeezy's webhook form takes a signing secret of 6 to 40
#: characters: a value outside that range cannot be the webhook's secret (a
#: longer one is most often the API key, given in its place).
MIN_SECRET_LENGTH = 6
MAX_SECRET_LENGTH = 40
_HEX_DIGEST_LENGTH = 64


def check_secret(secret: object) -> bytes:
    """The secret as bytes; a missing or empty secret is a configuration
    error, never "accept everything"."""
    if not isinstance(secret, str) or not secret:
        raise ConfigurationError("a Lemon Squeezy signing secret is required (the webhook's 'Signing secret')")
    if not MIN_SECRET_LENGTH <= len(secret) <= MAX_SECRET_LENGTH:
        hint = " (an API key is not the webhook's signing secret)" if len(secret) > MAX_SECRET_LENGTH else ""
        raise ConfigurationError(
            f"the signing secret must be {MIN_SECRET_LENGTH} to {MAX_SECRET_LENGTH} characters, as Lemon Squeezy's "
            f"webhook form takes it, got {len(secret)}{hint}"
        )
    return secret.encode("utf-8")


def sign(body: bytes, secret: str) -> str:
    """The ``X-Signature`` value Lemon Squeezy would send for ``body``."""
    return hmac.new(check_secret(secret), body, hashlib.sha256).hexdigest()


def verify(body: bytes, signature: str | None, secret: str) -> bool:
    """Whether ``signature`` is the signature of ``body``, compared in
    constant time. Malformed signatures (wrong length, not hex, not ASCII)
    never verify."""
    key = check_secret(secret)
    return verify_with_key(body, signature, key)


def verify_with_key(body: bytes, signature: str | None, key: bytes) -> bool:
    if signature is None:
        return False
    candidate = signature.strip()
    if len(candidate) != _HEX_DIGEST_LENGTH or not candidate.isascii():
        return False
    expected = hmac.new(key, body, hashlib.sha256).hexdigest()
    # Lowercase hex is what Lemon Squeezy sends; uppercase hex is the same digest.
    return hmac.compare_digest(expected.encode("ascii"), candidate.lower().encode("ascii"))
