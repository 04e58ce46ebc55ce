"""Lemon Squeezy for the ledger: verified, idempotent webhook ingestion that
drives subscriptions and credits, a reconciler over the REST API, and an ASGI
endpoint. See ``docs/lemonsqueezy.md``.

    from adapters.lemonsqueezy import LemonSqueezy, WebhookApp
    adapter = LemonSqueezy(ledger, signing_secret=os.environ["LEMONSQUEEZY_SIGNING_SECRET"])
    app.add_route("/webhooks/lemonsqueezy", WebhookApp(adapter), methods=["POST"])  # Starlette, FastAPI

A route, not a mount: Starlette answers a mount's own path (no trailing
slash) with a 307 redirect, and a redirected delivery is not received.
``examples/lemonsqueezy_starlette.py`` is a whole application.
"""

from adapters.webhooks import IngestResult, RefundPolicy, RetryReport, WebhookApp

from ._adapter import SOURCE, Customer, LemonSqueezy, LinkReport, Processor, UserResolver
from ._client import LemonSqueezyApiError, LemonSqueezyClient, TokenBucket
from ._effects import CustomerLinked
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
