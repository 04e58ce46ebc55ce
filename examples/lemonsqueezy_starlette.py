"""The Lemon Squeezy webhook endpoint in a Starlette (or FastAPI) application.

    pip install starlette uvicorn
    export LEMONSQUEEZY_SIGNING_SECRET=...            # the webhook's signing secret
    export LEDGER_URL=postgresql://app@db/pingvas?schema=pingvas_prod
    export LEMONSQUEEZY_CREDIT_PACKS=9001=1000,9002=5000
    uvicorn --factory examples.lemonsqueezy_starlette:create_app

Then point the webhook in Lemon Squeezy (Settings » Webhooks) at
``https://<host>/webhooks/lemonsqueezy``. With FastAPI it is the same route:
``api.add_route("/webhooks/lemonsqueezy", webhook_app(ledger), methods=["POST"])``.

The endpoint itself needs no framework: ``webhook_app`` is plain ASGI, and is
all this module uses when Starlette is not installed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from adapters.lemonsqueezy import LemonSqueezy, WebhookApp
from ledger import CreditPolicy, Ledger


def open_ledger(url: str | None = None) -> Ledger:
    # Lemon Squeezy's invoices renew subscriptions: the ledger's tick must not.
    return Ledger(
        url or os.environ.get("LEDGER_URL", "sqlite:///pingvas-ledger.sqlite3"),
        credit_policy=CreditPolicy(auto_renew=False),
    )


def credit_packs(text: str | None = None) -> dict[str, int]:
    """``9001=1000,9002=5000``: credit pack variants and the credits each grants."""
    packs = {}
    for pair in (text if text is not None else os.environ.get("LEMONSQUEEZY_CREDIT_PACKS", "")).split(","):
        if pair.strip():
            variant, _, credits = pair.partition("=")
            packs[variant.strip()] = int(credits)
    return packs


def webhook_app(ledger: Ledger, secret: str | None = None) -> WebhookApp:
    """The plain ASGI endpoint."""
    adapter = LemonSqueezy(
        ledger,
        signing_secret=secret if secret is not None else os.environ.get("LEMONSQUEEZY_SIGNING_SECRET", ""),
        test_mode=os.environ.get("LEMONSQUEEZY_TEST_MODE", "") in ("1", "true", "yes"),
        credit_packs=credit_packs(),
    )
    return WebhookApp(adapter)


def create_app(ledger: Ledger | None = None, secret: str | None = None) -> Any:
    """A Starlette application with the endpoint mounted (``uvicorn --factory``).
    The ledger is closed when the application shuts down."""
    try:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route
    except ImportError as exc:  # the endpoint works without it: see webhook_app
        raise RuntimeError("this example needs Starlette: pip install starlette uvicorn") from exc

    ledger = ledger or open_ledger()

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            ledger.close()

    return Starlette(
        routes=[
            Route("/healthz", health),
            # A Route, not a Mount: a Mount answers the URL without a trailing
            # slash with a redirect, which a webhook sender does not follow.
            Route("/webhooks/lemonsqueezy", webhook_app(ledger, secret), methods=["POST"]),
        ],
        lifespan=lifespan,
    )
