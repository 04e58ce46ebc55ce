"""AsyncLedger in a FastAPI application as a host runs it
(``examples/fastapi_service.py``): a lifespan opens the ledger, the API's
endpoints reserve and settle from many concurrent requests while the Lemon
Squeezy webhook endpoint in the same app applies deliveries, and the shutdown
lets the calls in flight finish and refuses the rest with a clear answer."""

from __future__ import annotations

import runpy
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import anyio
import httpx
import pytest

from adapters.lemonsqueezy import SOURCE
from adapters.webhooks import Inbox
from ledger import Ledger
from tests.lemonsqueezy_support import PACK_AT, SECRET, Builder, headers_for

ROOT = Path(__file__).resolve().parent.parent
BASE = "http://service"
PACK_CREDITS = 1_000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def create_app() -> Callable[..., Any]:
    factory: Callable[..., Any] = runpy.run_path(str(ROOT / "examples" / "fastapi_service.py"))["create_app"]
    return factory


def pack_order(user: UUID, n: int) -> bytes:
    """A signed-to-be credit pack order of user number ``n``: its own customer and order."""
    builder = Builder(user=user, customer=771_000 + n, subscription=str(881_000 + n))
    return builder.order_event("order_created", str(661_000 + n), variant="9001", total=1000, at=PACK_AT)


async def deliver(client: httpx.AsyncClient, body: bytes) -> httpx.Response:
    return await client.post("/webhooks/lemonsqueezy", content=body, headers=headers_for(body))


def app_for(create_app: Callable[..., Any], url: str, **options: Any) -> Any:
    return create_app(url, secret=SECRET, variants="starter=1001/1002,pro=2001/2002", packs="9001=1000", **options)


@pytest.mark.anyio
async def test_endpoints_and_webhooks_share_one_ledger_under_concurrency(
    ledger_url: str, create_app: Callable[..., Any]
) -> None:
    users = [uuid4() for _ in range(6)]
    orders = [pack_order(user, n) for n, user in enumerate(users)]
    app = app_for(create_app, ledger_url, max_concurrency=6)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client,
    ):
        # Every user's credit pack, delivered twice at once: applied once.
        delivered: list[httpx.Response] = []

        async def send(body: bytes) -> None:
            delivered.append(await deliver(client, body))

        async with anyio.create_task_group() as tasks:
            for body in orders + orders:
                tasks.start_soon(send, body)
        assert all(r.status_code == 200 for r in delivered)
        assert Counter(r.json()["status"] for r in delivered) == Counter(stored=6, duplicate=6)

        # 15 jobs of 100 credits per user at once, with the packs redelivered meanwhile: 10 fit.
        answers: dict[tuple[int, UUID], httpx.Response] = {}

        async def reserve(n: int, job: UUID) -> None:
            body = {"user_id": str(users[n]), "job_id": str(job), "estimated_credits": 100}
            answers[(n, job)] = await client.post("/jobs", json=body)

        async with anyio.create_task_group() as tasks:
            for _ in range(15):  # the users in turn: concurrent writers of one account retry each other
                for n in range(len(users)):
                    tasks.start_soon(reserve, n, uuid4())
            for body in orders:
                tasks.start_soon(send, body)
        assert Counter(r.json()["status"] for r in delivered[12:]) == Counter(duplicate=6)
        by_user = Counter((n, r.status_code) for (n, _), r in answers.items())
        assert by_user == Counter({**{(n, 200): 10 for n in range(6)}, **{(n, 402): 5 for n in range(6)}})
        refused = next(r for r in answers.values() if r.status_code == 402)
        assert refused.json()["code"] == "insufficient_credits"

        # Settle half of the holds, release the others, all at once; a retried settle replays.
        held = [(n, job, r.json()["reservation_id"]) for (n, job), r in answers.items() if r.status_code == 200]
        closed: list[httpx.Response] = []

        async def close_job(n: int, job: UUID, rid: str, settle: bool) -> None:
            if settle:
                closed.append(
                    await client.post(f"/jobs/{job}/settle", json={"reservation_id": rid, "actual_credits": 70})
                )
            else:
                closed.append(await client.post(f"/jobs/{job}/release", json={"reservation_id": rid}))

        async with anyio.create_task_group() as tasks:
            for i, (n, job, rid) in enumerate(held):
                tasks.start_soon(close_job, n, job, rid, i % 2 == 0)
        assert all(r.status_code == 200 for r in closed)
        n, job, rid = held[0]
        again = await client.post(f"/jobs/{job}/settle", json={"reservation_id": rid, "actual_credits": 70})
        assert again.status_code == 200 and again.json()["replayed"] is True
        other = await client.post(f"/jobs/{job}/settle", json={"reservation_id": rid, "actual_credits": 10})
        assert other.status_code == 409 and other.json()["code"] == "idempotency_conflict"

        settled = Counter(n for i, (n, _, _) in enumerate(held) if i % 2 == 0)
        for n, user in enumerate(users):
            balance = (await client.get(f"/users/{user}/balance")).json()
            expected = PACK_CREDITS - 70 * settled[n]
            assert balance == {"balance_credits": expected, "held_credits": 0, "available_credits": expected}
        missing = await client.get(f"/users/{uuid4()}/balance")
        assert missing.status_code == 404 and missing.json()["code"] == "unknown_account"
        ledger = app.state.ledger
        assert ledger.calls_in_flight == 0
        assert Inbox(ledger.ledger, SOURCE).counts() == {"processed": 6}
    assert ledger.closed
    # After the shutdown: a clear answer, nothing run.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        late = await client.get(f"/users/{users[0]}/balance")
        assert late.status_code == 503 and late.json()["code"] == "ledger_closed"
        late_webhook = await deliver(client, pack_order(uuid4(), 99))
        assert late_webhook.status_code == 503 and "closing" in late_webhook.json()["reason"]


@pytest.mark.anyio
async def test_shutdown_with_requests_in_flight_answers_each_truthfully(
    durable_url: str, create_app: Callable[..., Any]
) -> None:
    """Shut down while 60 reservations and 10 deliveries are in flight,
    two calls at a time: each request is answered 200 (recorded) or 503
    ``ledger_closed`` (not run), and the store, reopened, holds exactly what
    was answered 200."""
    users = [uuid4() for _ in range(20)]
    orders = [pack_order(user, n) for n, user in enumerate(users)]
    app = app_for(create_app, durable_url, max_concurrency=2)
    context = app.router.lifespan_context(app)
    await context.__aenter__()
    shut = False
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
            for body in orders[:10]:
                assert (await deliver(client, body)).json()["processing"] == "processed"
            answers: list[tuple[str, httpx.Response]] = []
            done = anyio.Event()

            async def reserve(n: int) -> None:
                body = {"user_id": str(users[n % 10]), "job_id": str(uuid4()), "estimated_credits": 10}
                answers.append(("job", await client.post("/jobs", json=body)))
                if len(answers) >= 5:
                    done.set()

            async def send(body: bytes) -> None:
                answers.append(("webhook", await deliver(client, body)))
                if len(answers) >= 5:
                    done.set()

            async with anyio.create_task_group() as tasks:
                for n in range(60):
                    tasks.start_soon(reserve, n)
                for body in orders[10:]:
                    tasks.start_soon(send, body)
                await done.wait()
                shut = True
                await context.__aexit__(None, None, None)  # while most requests still wait their turn
    finally:
        if not shut:
            await context.__aexit__(None, None, None)
    assert len(answers) == 70
    codes = Counter((kind, r.status_code) for kind, r in answers)
    assert set(codes) <= {("job", 200), ("job", 503), ("webhook", 200), ("webhook", 503)}
    assert codes[("job", 200)] >= 5 and codes[("job", 503)] >= 1
    for kind, r in answers:
        if r.status_code == 503 and kind == "job":
            assert r.json()["code"] == "ledger_closed" and "did not run" in r.json()["message"]
    with Ledger(durable_url) as reopened:
        held = sum(reopened.balance(u).held_credits for u in users[:10])
        assert held == 10 * codes[("job", 200)]
        stored = Inbox(reopened, SOURCE).counts()
        assert stored == {"processed": 10 + codes[("webhook", 200)]}
        funded = [u for u in users[10:] if _has_account(reopened, u)]
        assert len(funded) == codes[("webhook", 200)]


def _has_account(ledger: Ledger, user: UUID) -> bool:
    try:
        return ledger.balance(user).balance_credits == PACK_CREDITS
    except Exception:
        return False
