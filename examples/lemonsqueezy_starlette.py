"""The Lemon Squeezy webhook endpoint in a Starlette (or FastAPI) application.

    pip install starlette uvicorn
    export LEMONSQUEEZY_SIGNING_SECRET=...            # the webhook's signing secret
    export LEDGER_URL=postgresql://app@db/pingvas?schema=pingvas_prod
    export LEMONSQUEEZY_PLAN_VARIANTS=starter=1001/1002,pro=2001/2002,studio=3001/3002
    export LEMONSQUEEZY_CREDIT_PACKS=9001=1000,9002=5000
    uvicorn --factory examples.lemonsqueezy_starlette:create_app

``LEMONSQUEEZY_PLAN_VARIANTS`` gives the seed's plans (``DEFAULT_CATALOG``:
starter, pro, studio, enterprise) their Lemon Squeezy variant ids, monthly
then yearly (either may be left out: ``studio=3001/``). The plans it names are
defined with the seed's terms and those ids when the application starts
(defining the same terms again changes nothing); a subscription to any other
variant fails with ``UnknownVariant`` until its plan names it. A host with
terms of its own defines its plans itself (``ledger.define_plan``) and leaves
the variable unset.

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
from dataclasses import replace
from typing import Any

from adapters.lemonsqueezy import LemonSqueezy, WebhookApp
from ledger import DEFAULT_CATALOG, CreditPolicy, Ledger


def open_ledger(url: str | None = None) -> Ledger:
    """The ledger, with the plans of ``$LEMONSQUEEZY_PLAN_VARIANTS`` defined."""
    # Lemon Squeezy's invoices renew subscriptions: the ledger's tick must not.
    ledger = Ledger(
        url or os.environ.get("LEDGER_URL", "sqlite:///pingvas-ledger.sqlite3"),
        credit_policy=CreditPolicy(auto_renew=False),
    )
    try:
        define_plans(ledger)
    except BaseException:
        ledger.close()
        raise
    return ledger


def plan_variants(text: str | None = None) -> dict[str, tuple[str | None, str | None]]:
    """``starter=1001/1002,pro=2001/2002``: plan name -> (monthly variant id, yearly variant id)."""
    known = {terms.name for terms in DEFAULT_CATALOG}
    variants: dict[str, tuple[str | None, str | None]] = {}
    for pair in (text if text is not None else os.environ.get("LEMONSQUEEZY_PLAN_VARIANTS", "")).split(","):
        if not pair.strip():
            continue
        name, equals, ids = (part.strip() for part in pair.partition("="))
        monthly, _, yearly = (part.strip() for part in ids.partition("/"))
        if not equals or name not in known or not (monthly or yearly):
            raise ValueError(
                f"LEMONSQUEEZY_PLAN_VARIANTS: {pair.strip()!r} is not <plan>=<monthly id>/<yearly id> "
                f"with a plan of {sorted(known)}"
            )
        variants[name] = (monthly or None, yearly or None)
    return variants


def define_plans(ledger: Ledger, variants: dict[str, tuple[str | None, str | None]] | None = None) -> None:
    """The seed's plans named in ``variants`` (default: ``$LEMONSQUEEZY_PLAN_VARIANTS``), with their variant ids."""
    chosen = plan_variants() if variants is None else variants
    for terms in DEFAULT_CATALOG:
        if terms.name in chosen:
            monthly, yearly = chosen[terms.name]
            ledger.define_plan(
                replace(terms, lemon_squeezy_variant_id_monthly=monthly, lemon_squeezy_variant_id_yearly=yearly)
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
    """A Starlette application with the endpoint routed (``uvicorn --factory``).
    Without ``ledger``, it opens one from the environment (``open_ledger``).
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
