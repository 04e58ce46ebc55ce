"""The provider-neutral webhook kit: what every payment provider's adapter
shares, so that a provider's own package keeps only what is its own
(signature format, payload shapes, status mapping, REST client, reconciler).

- ``Inbox``: deliveries stored in ``webhook_events`` before anything else
  happens, recognised when redelivered, with their outcomes.
- ``GroupCommit``: concurrent deliveries' commands share ledger transactions.
- ``WebhookApp``: the endpoint as a plain ASGI application over a ``Receiver``.
- ``IngestResult``: what became of one delivery, and the HTTP status to answer.

It uses only ``ledger``'s public names and ``ledger.extension``.
"""

from .asgi import Receiver, WebhookApp
from .group_commit import GroupCommit
from .inbox import HELD_PREFIX, IGNORED_PREFIX, NOTE_PREFIX, Inbox, InboxRow, Stored
from .results import IngestResult

__all__ = [
    "HELD_PREFIX",
    "IGNORED_PREFIX",
    "NOTE_PREFIX",
    "GroupCommit",
    "Inbox",
    "InboxRow",
    "IngestResult",
    "Receiver",
    "Stored",
    "WebhookApp",
]
