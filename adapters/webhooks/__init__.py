"""The provider-neutral webhook kit: what every payment provider's adapter
shares, so that a provider's own package keeps only what is its own
(signature format, payload shapes, status mapping, REST client, reconciler).

- ``Provider``: what a provider supplies (its ``source``, signature check,
  body parsing, and the mapping of an event to ledger commands).
- ``Pipeline``: a provider's deliveries from the request to the ledger:
  verify, store, apply once, record the outcome, release held deliveries,
  retry failed ones (``Outcome``, ``RetryReport``, ``Held``, ``Event``).
- ``Inbox``: deliveries stored in ``webhook_events`` before anything else
  happens, recognised when redelivered, with their outcomes.
- ``WebhookApp``: the endpoint as a plain ASGI application over a ``Receiver``.
- ``IngestResult``: what became of one delivery, and the HTTP status to answer.
- ``RefundPolicy``: what a refund claws back.
- ``ApiClient``, ``TokenBucket``: a rate-limited HTTP client with bounded
  retries (429 and ``Retry-After``, 5xx, transport errors) and bounded pages.

It uses only ``ledger``'s public names and ``ledger.extension``.
See ``docs/webhooks.md``.
"""

from .asgi import Receiver, Runner, WebhookApp
from .inbox import HELD_PREFIX, IGNORED_PREFIX, NOTE_PREFIX, REFUSED_PREFIX, Inbox, InboxRow, Stored
from .pipeline import (
    DEFAULT_STALE_AFTER_S,
    Event,
    Execute,
    Held,
    Malformed,
    Outcome,
    Pipeline,
    Provider,
    RetryReport,
    attempt,
    header,
    sealed_bytes,
)
from .refunds import RefundPolicy
from .results import IngestResult

__all__ = [
    "DEFAULT_STALE_AFTER_S",
    "HELD_PREFIX",
    "IGNORED_PREFIX",
    "NOTE_PREFIX",
    "REFUSED_PREFIX",
    "Event",
    "Execute",
    "Held",
    "Inbox",
    "InboxRow",
    "IngestResult",
    "Malformed",
    "Outcome",
    "Pipeline",
    "Provider",
    "Receiver",
    "Runner",
    "RefundPolicy",
    "RetryReport",
    "Stored",
    "WebhookApp",
    "attempt",
    "header",
    "sealed_bytes",
]
