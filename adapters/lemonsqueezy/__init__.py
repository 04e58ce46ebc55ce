"""Lemon Squeezy for the ledger: verified, idempotent webhook ingestion that
drives subscriptions and credits, a reconciler over the REST API, and an ASGI
endpoint. See ``docs/lemonsqueezy.md``.

    from adapters.lemonsqueezy import LemonSqueezy, WebhookApp
    adapter = LemonSqueezy(ledger, signing_secret=os.environ["LEMONSQUEEZY_SIGNING_SECRET"])
    app = WebhookApp(adapter)            # the endpoint of a route (docs/lemonsqueezy.md)
"""

from adapters.webhooks import IngestResult, WebhookApp

from ._adapter import SOURCE, LemonSqueezy, Processor, RetryReport
from ._client import LemonSqueezyApiError, LemonSqueezyClient, TokenBucket
from ._effects import RefundPolicy
from ._reconcile import Reconciler, ReconcileReport
from ._signature import sign, verify

__all__ = [
    "SOURCE",
    "IngestResult",
    "LemonSqueezy",
    "LemonSqueezyApiError",
    "LemonSqueezyClient",
    "Processor",
    "ReconcileReport",
    "Reconciler",
    "RefundPolicy",
    "RetryReport",
    "TokenBucket",
    "WebhookApp",
    "sign",
    "verify",
]
