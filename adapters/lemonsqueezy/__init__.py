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

from typing import TYPE_CHECKING, Any

from adapters.webhooks import IngestResult, RefundPolicy, RetryReport, WebhookApp

from ._adapter import SOURCE, Customer, LemonSqueezy, LinkReport, Processor, UserResolver
from ._effects import CustomerLinked
from ._signature import sign, verify

if TYPE_CHECKING:
    from ._client import LemonSqueezyApiError, LemonSqueezyClient, TokenBucket
    from ._reconcile import Reconciler, ReconcileReport

#: The REST client and the reconciler load httpx: they are imported when first
#: named, so a host that only receives webhooks never loads it.
_LAZY = {
    "LemonSqueezyApiError": "._client",
    "LemonSqueezyClient": "._client",
    "TokenBucket": "._client",
    "Reconciler": "._reconcile",
    "ReconcileReport": "._reconcile",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


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
