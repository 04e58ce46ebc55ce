"""A FastAPI service on the ledger: its endpoints await an ``AsyncLedger``, and
the Lemon Squeezy webhook endpoint runs in the same application, on the same
ledger, the same connection pool and the same bound on worker threads.

    pip install fastapi uvicorn
    export LEDGER_URL=postgresql://app@db/pingvas?schema=pingvas_prod
    export LEMONSQUEEZY_SIGNING_SECRET=...            # the webhook's signing secret
    export LEMONSQUEEZY_PLAN_VARIANTS=starter=1001/1002,pro=2001/2002,studio=3001/3002
    export LEMONSQUEEZY_CREDIT_PACKS=9001=1000,9002=5000
    uvicorn --factory examples.fastapi_service:create_app

The lifespan opens the ledger (in a worker thread: opening connects), builds
the webhook adapter on it and keeps both on ``app.state``; at shutdown it
closes the ledger after the calls in flight have finished. The endpoints:

- ``POST /jobs``: reserve the job's estimated credits (402 when the user
  cannot afford them);
- ``POST /jobs/{job_id}/settle`` and ``/release``: charge the actual credits,
  or free the hold;
- ``GET /users/{user_id}/balance``;
- ``POST /webhooks/lemonsqueezy``: Lemon Squeezy's deliveries.

Every ledger error becomes a JSON answer ``{"code", "message", "param"}``
with a status of its kind. Each request's idempotency key comes from the job,
so a client's retry of a request that timed out is the same command.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints'
# annotations at run time.

import contextlib
import os
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Annotated, Any
from uuid import UUID

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from adapters.lemonsqueezy import LemonSqueezy, WebhookApp
from ledger import (
    AsyncLedger,
    Clock,
    ConcurrencyExhausted,
    CreditPolicy,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidArgument,
    Ledger,
    LedgerClosed,
    LedgerError,
    ReservationClosed,
    UnknownAccount,
    UnknownReservation,
)

try:  # run as a module (uvicorn, the tests) or as a script from examples/
    from examples.lemonsqueezy_starlette import credit_packs, define_plans, plan_variants
except ImportError:  # pragma: no cover
    from lemonsqueezy_starlette import credit_packs, define_plans, plan_variants  # type: ignore[no-redef]

#: How long a job's hold lasts if it is neither settled nor released.
HOLD = timedelta(hours=1)


class ReserveRequest(BaseModel):
    user_id: UUID
    job_id: UUID
    estimated_credits: int = Field(gt=0)


class SettleRequest(BaseModel):
    reservation_id: UUID
    actual_credits: int = Field(ge=0)


class ReleaseRequest(BaseModel):
    reservation_id: UUID
    reason: str = "job cancelled"


async def get_ledger(request: Request) -> AsyncLedger:
    """The application's ledger, opened by the lifespan. (A coroutine: FastAPI
    runs a plain function dependency in a worker thread.)"""
    ledger: AsyncLedger = request.app.state.ledger
    return ledger


LedgerDep = Annotated[AsyncLedger, Depends(get_ledger)]


class LemonSqueezyEndpoint:
    """The webhook endpoint the lifespan built (``app.state.webhook``), as an
    ASGI application routed before it exists."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await scope["app"].state.webhook(scope, receive, send)


#: The HTTP status of each kind of ledger error (any other: 400).
STATUS = (
    (LedgerClosed, 503),
    (ConcurrencyExhausted, 503),
    (InsufficientCredits, 402),
    (UnknownAccount, 404),
    (UnknownReservation, 404),
    (ReservationClosed, 409),
    (IdempotencyConflict, 409),
    (InvalidArgument, 422),
)


def ledger_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LedgerError)
    status = next((code for kind, code in STATUS if isinstance(exc, kind)), 400)
    return JSONResponse({"code": exc.code, "message": str(exc), "param": exc.param}, status_code=status)


def build_adapter(ledger: Ledger, secret: str, variants: str | None, packs: str | None) -> LemonSqueezy:
    """Defines the plans of the variants and returns the webhook adapter
    (blocking: it writes and reads the store)."""
    define_plans(ledger, plan_variants(variants))
    return LemonSqueezy(
        ledger,
        signing_secret=secret,
        test_mode=os.environ.get("LEMONSQUEEZY_TEST_MODE", "") in ("1", "true", "yes"),
        credit_packs=credit_packs(packs),
    )


def create_app(
    url: str | None = None,
    *,
    secret: str | None = None,
    variants: str | None = None,
    packs: str | None = None,
    clock: Clock | None = None,
    max_concurrency: int | None = None,
) -> FastAPI:
    """The application (``uvicorn --factory``). Unset arguments come from the
    environment: ``LEDGER_URL``, ``LEMONSQUEEZY_SIGNING_SECRET``,
    ``LEMONSQUEEZY_PLAN_VARIANTS``, ``LEMONSQUEEZY_CREDIT_PACKS``.
    ``max_concurrency``: ledger calls at once (default: the pool's size)."""
    ledger_url = url or os.environ.get("LEDGER_URL", "sqlite:///pingvas-ledger.sqlite3")
    signing_secret = secret if secret is not None else os.environ.get("LEMONSQUEEZY_SIGNING_SECRET", "")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Lemon Squeezy's invoices renew subscriptions: the ledger's tick must not.
        policy = CreditPolicy(auto_renew=False)
        async with AsyncLedger.open(
            ledger_url, clock=clock, credit_policy=policy, max_concurrency=max_concurrency
        ) as ledger:
            adapter = await ledger.run_sync(build_adapter, ledger.ledger, signing_secret, variants, packs)
            app.state.ledger = ledger
            # The deliveries run as the ledger's calls: one bound with the API's (the pool's
            # size), and the shutdown waits for them too.
            app.state.webhook = WebhookApp(adapter, runner=ledger.run_sync)
            yield
        # Here every call has finished and the store is closed.

    app = FastAPI(lifespan=lifespan)
    app.add_exception_handler(LedgerError, ledger_error)
    # A route, not a mount: a mount answers its path without a trailing slash with a redirect.
    app.add_route("/webhooks/lemonsqueezy", LemonSqueezyEndpoint(), methods=["POST"])

    @app.post("/jobs")
    async def reserve(job: ReserveRequest, ledger: LedgerDep) -> dict[str, Any]:
        receipt = await ledger.reserve(
            job.user_id, job.job_id, job.estimated_credits, key=f"job:{job.job_id}:reserve", expires_in=HOLD
        )
        return {
            "reservation_id": str(receipt.reservation_id),
            "available_credits": receipt.available_credits,
            "replayed": receipt.replayed,
        }

    @app.post("/jobs/{job_id}/settle")
    async def settle(job_id: UUID, body: SettleRequest, ledger: LedgerDep) -> dict[str, Any]:
        receipt = await ledger.settle(body.reservation_id, body.actual_credits, key=f"job:{job_id}:settle")
        return {"balance_credits": receipt.balance_credits, "replayed": receipt.replayed}

    @app.post("/jobs/{job_id}/release")
    async def release(job_id: UUID, body: ReleaseRequest, ledger: LedgerDep) -> dict[str, Any]:
        receipt = await ledger.release(body.reservation_id, body.reason, key=f"job:{job_id}:release")
        return {"available_credits": receipt.available_credits, "replayed": receipt.replayed}

    @app.get("/users/{user_id}/balance")
    async def balance(user_id: UUID, ledger: LedgerDep) -> dict[str, Any]:
        b = await ledger.balance(user_id)
        return {
            "balance_credits": b.balance_credits,
            "held_credits": b.held_credits,
            "available_credits": b.available_credits,
        }

    return app


def main(url: str) -> None:
    """Runs the application in process against ``url``: a credit pack bought
    through a signed webhook, then jobs reserved and settled at once by many
    requests, then a clean shutdown."""
    import json
    import uuid

    import anyio
    import httpx

    from adapters.lemonsqueezy import sign

    secret = "whsec_example_fastapi"
    user = uuid.UUID("6f1c2b9e-4d3a-4b8e-9c71-2a5e8f0d1c33")
    order = {
        "meta": {"event_name": "order_created", "webhook_id": str(uuid.uuid4()), "custom_data": {"user_id": str(user)}},
        "data": {
            "type": "orders",
            "id": "660002",
            "attributes": {
                "customer_id": 770001,
                "status": "paid",
                "total": 1000,
                "refunded": False,
                "refunded_amount": 0,
                "first_order_item": {"variant_id": 9001, "quantity": 1},
                "created_at": "2030-02-17T09:00:00.000000Z",
                "updated_at": "2030-02-17T09:00:00.000000Z",
            },
        },
    }
    body = json.dumps(order).encode()

    async def run() -> None:
        # Four calls at once: the twelve jobs of one account take turns rather than all retry each other.
        app = create_app(url, secret=secret, variants="starter=1001/1002", packs="9001=1000", max_concurrency=4)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
                delivered = await client.post(
                    "/webhooks/lemonsqueezy", content=body, headers={"X-Signature": sign(body, secret)}
                )
                print("webhook", delivered.status_code, delivered.json()["processing"])
                jobs = [uuid.uuid4() for _ in range(12)]
                holds: dict[uuid.UUID, str] = {}

                async def reserve(job_id: uuid.UUID) -> None:
                    answer = await client.post(
                        "/jobs", json={"user_id": str(user), "job_id": str(job_id), "estimated_credits": 100}
                    )
                    if answer.status_code == 200:
                        holds[job_id] = answer.json()["reservation_id"]
                    else:
                        print("refused", answer.status_code, answer.json()["code"])

                async def settle(job_id: uuid.UUID) -> None:
                    body = {"reservation_id": holds[job_id], "actual_credits": 60}
                    (await client.post(f"/jobs/{job_id}/settle", json=body)).raise_for_status()

                async with anyio.create_task_group() as tasks:  # twelve jobs at once, credits for ten
                    for job_id in jobs:
                        tasks.start_soon(reserve, job_id)
                print("reserved", len(holds))
                async with anyio.create_task_group() as tasks:
                    for job_id in holds:
                        tasks.start_soon(settle, job_id)
                print("balance", (await client.get(f"/users/{user}/balance")).json())
        print("closed", app.state.ledger.closed)

    anyio.run(run)


if __name__ == "__main__":
    main(os.environ.get("LEDGER_URL", "memory://"))
