"""Lemon Squeezy for the ledger: verified, idempotent webhook ingestion that
drives subscriptions and credits, a reconciler over the REST API, and an ASGI
endpoint. See ``docs/lemonsqueezy.md``.

    from adapters.lemonsqueezy import LemonSqueezy, WebhookApp
    adapter = LemonSqueezy(ledger, signing_secret=os.environ["LEMONSQUEEZY_SIGNING_SECRET"])
    app = WebhookApp(adapter)            # mount under /webhooks/lemonsqueezy
"""

from ._adapter import Customer, IngestResult, LemonSqueezy, LinkReport, Processor, RetryReport, UserResolver
from ._asgi import WebhookApp
from ._client import LemonSqueezyApiError, LemonSqueezyClient, TokenBucket
from ._effects import CustomerLinked, RefundPolicy
from ._inbox import SOURCE
from ._reconcile import Reconciler, ReconcileReport
from ._signature import sign, verify

__all__ = [
    "SOURCE",
    "Customer",
    "CustomerLinked",
    "IngestResult",
    "LemonSqueezy",
    "LemonSqueezyApiError",
    "LemonSqueezyClient",
    "LinkReport",
    "Processor",
    "ReconcileReport",
    "Reconciler",
    "RefundPolicy",
    "RetryReport",
    "TokenBucket",
    "UserResolver",
    "WebhookApp",
    "sign",
    "verify",
]
