"""The webhook endpoint over HTTP, through httpx's ASGI transport."""

from __future__ import annotations

import runpy
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from adapters.lemonsqueezy import LemonSqueezy, WebhookApp
from ledger import Ledger
from tests.lemonsqueezy_support import (
    FIXTURES,
    PACKS,
    SECRET,
    START,
    USER,
    VARIANTS,
    StoryClock,
    adapter_for,
    headers_for,
    open_ledger,
)

ROOT = Path(__file__).resolve().parent.parent
URL = "http://testserver/webhooks/lemonsqueezy"


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    with open_ledger(ledger_url, StoryClock(START)) as opened:
        yield opened


@pytest.fixture
def adapter(ledger: Ledger) -> LemonSqueezy:
    return adapter_for(ledger)


def post_all(app: Any, requests: list[dict[str, Any]]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport) as client:
            return [await client.request(**r) for r in requests]

    return anyio.run(run)


def post(body: bytes, headers: dict[str, str] | None = None) -> dict[str, Any]:
    return {"method": "POST", "url": URL, "content": body, "headers": headers_for(body) if headers is None else headers}


def test_status_codes(adapter: LemonSqueezy) -> None:
    body = (FIXTURES / "order_created.json").read_bytes()
    stored, duplicate, unsigned, malformed, get = post_all(
        WebhookApp(adapter),
        [
            post(body),
            post(body),
            post(body, {"X-Signature": "0" * 64}),
            post(b"{not json", None),
            {"method": "GET", "url": URL},
        ],
    )
    assert stored.status_code == 200 and stored.json()["status"] == "stored"
    assert stored.json()["processing"] == "processed"
    assert duplicate.status_code == 200 and duplicate.json()["status"] == "duplicate"
    assert duplicate.json()["id"] == stored.json()["id"]
    assert unsigned.status_code == 401
    assert malformed.status_code == 400 and "not JSON" in malformed.json()["reason"]
    assert get.status_code == 405 and get.headers["allow"] == "POST"
    assert len(adapter.inbox.listing(status=None, limit=10)) == 1


def test_a_failed_processing_is_still_a_200_so_lemon_squeezy_stops_retrying(adapter: LemonSqueezy) -> None:
    body = (FIXTURES / "subscription_payment_success.json").read_bytes()  # its subscription is unknown: held
    (response,) = post_all(WebhookApp(adapter), [post(body)])
    assert response.status_code == 200
    assert response.json()["processing"] == "held"


def test_oversized_bodies_are_413_declared_or_streamed(ledger: Ledger) -> None:
    adapter = LemonSqueezy(ledger, signing_secret=SECRET, max_body_bytes=2048)
    big = b"{" + b" " * 4096 + b"}"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b" " * 512

    declared, streamed = post_all(
        WebhookApp(adapter),
        [post(big), {"method": "POST", "url": URL, "content": chunks(), "headers": {"X-Signature": "0" * 64}}],
    )
    assert declared.status_code == 413 and streamed.status_code == 413
    assert adapter.inbox.listing(status=None, limit=10) == []


def test_a_store_that_is_down_is_a_500(adapter: LemonSqueezy, monkeypatch: pytest.MonkeyPatch) -> None:
    def down(**_: Any) -> Any:
        raise ConnectionError("database unreachable")

    monkeypatch.setattr(adapter.inbox, "put", down)
    body = (FIXTURES / "order_created.json").read_bytes()
    (response,) = post_all(WebhookApp(adapter), [post(body)])
    assert response.status_code == 500
    assert response.json()["status"] == "error"


def test_lifespan_and_other_scopes(adapter: LemonSqueezy) -> None:
    app = WebhookApp(adapter)
    sent: list[dict[str, Any]] = []
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: Any) -> None:
        sent.append(message)

    anyio.run(app, {"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    with pytest.raises(RuntimeError, match="websocket"):
        anyio.run(app, {"type": "websocket"}, receive, send)


def test_the_example_is_importable_and_mounts_the_endpoint(ledger_url: str) -> None:
    example = runpy.run_path(str(ROOT / "examples" / "lemonsqueezy_starlette.py"))
    assert example["credit_packs"]("9001=1000, 9002=5000") == {"9001": 1000, "9002": 5000}
    with open_ledger(ledger_url, StoryClock(START)) as ledger:
        endpoint = example["webhook_app"](ledger, SECRET)
        body = (FIXTURES / "order_created.json").read_bytes()
        (response,) = post_all(endpoint, [post(body)])
        assert response.status_code == 200
        # Starlette is in the test extras: the example runs against the
        # release pip installs, mounted as a host would mount it.
        app = example["create_app"](ledger, SECRET)
        at_path = {**post(body), "url": "http://testserver/webhooks/lemonsqueezy"}
        (mounted,) = post_all(app, [at_path])  # the exact URL given to Lemon Squeezy: no redirect
        assert mounted.status_code == 200 and mounted.json()["status"] == "duplicate"
        closed: list[bool] = []
        ledger.close = lambda: closed.append(True)  # type: ignore[method-assign]
        _lifespan(app)
        assert closed == [True]  # the application's shutdown closes the ledger


def test_the_example_configured_from_the_environment_applies_the_repositorys_fixtures(
    durable_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started as ``uvicorn --factory`` starts it: everything from the environment."""
    monkeypatch.setenv("LEDGER_URL", durable_url)
    monkeypatch.setenv("LEMONSQUEEZY_SIGNING_SECRET", SECRET)
    monkeypatch.setenv("LEMONSQUEEZY_PLAN_VARIANTS", ",".join(f"{p}={m}/{y}" for p, (m, y) in VARIANTS.items()))
    monkeypatch.setenv("LEMONSQUEEZY_CREDIT_PACKS", ",".join(f"{v}={c}" for v, c in PACKS.items()))
    example = runpy.run_path(str(ROOT / "examples" / "lemonsqueezy_starlette.py"))
    app = example["create_app"]()
    names = ["subscription_created", "subscription_payment_success", "order_created", "license_key_created"]
    try:
        responses = post_all(app, [post((FIXTURES / f"{name}.json").read_bytes()) for name in names])
    finally:
        _lifespan(app)  # closes the example's ledger
    assert [(r.status_code, r.json()["processing"]) for r in responses] == [(200, "processed")] * 4, [
        r.json() for r in responses
    ]
    with Ledger(durable_url) as ledger:
        subscription = ledger.subscription_of(USER)
        assert subscription is not None and (subscription.plan, subscription.status) == ("starter", "active")
        assert ledger.balance(USER).balance_credits == 5000 + 1000  # the invoice's period, and the pack
        assert ledger.plan("pro").lemon_squeezy_variant_id_yearly == "2002"


def test_the_examples_plan_variants_are_read_strictly() -> None:
    example = runpy.run_path(str(ROOT / "examples" / "lemonsqueezy_starlette.py"))
    plan_variants = example["plan_variants"]
    assert plan_variants(" starter=1001/1002, studio=3001/ ,pro=/2002") == {
        "starter": ("1001", "1002"),
        "studio": ("3001", None),
        "pro": (None, "2002"),
    }
    assert plan_variants("") == {}
    for bad in ("starter", "gold=1/2", "starter=/", "starter:1001"):
        with pytest.raises(ValueError, match="LEMONSQUEEZY_PLAN_VARIANTS"):
            plan_variants(bad)


def test_the_endpoint_is_routed_as_its_docstrings_say_not_mounted(adapter: LemonSqueezy) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    import adapters.lemonsqueezy as package

    for doc in (package.__doc__, WebhookApp.__doc__):
        assert doc is not None and 'add_route("/webhooks/lemonsqueezy", WebhookApp(adapter)' in " ".join(doc.split())
    # What they advise, tried: the route answers the URL given to Lemon Squeezy, a mount redirects it.
    routed = Starlette()
    routed.add_route("/webhooks/lemonsqueezy", WebhookApp(adapter), methods=["POST"])
    mounted = Starlette(routes=[Mount("/webhooks/lemonsqueezy", WebhookApp(adapter))])
    body = (FIXTURES / "order_created.json").read_bytes()
    (answered,) = post_all(routed, [post(body)])
    (redirected,) = post_all(mounted, [post(body)])
    assert answered.status_code == 200 and answered.json()["processing"] == "processed"
    assert redirected.status_code == 307 and redirected.headers["location"].endswith("/webhooks/lemonsqueezy/")


def _lifespan(app: Any) -> None:
    """Runs an application's startup and shutdown, as an ASGI server does."""
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    anyio.run(app, {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"], sent


def test_simultaneous_copies_through_http_store_one_row(durable_url: str) -> None:
    with open_ledger(durable_url, StoryClock(START)) as ledger:
        adapter = adapter_for(ledger)
        body = (FIXTURES / "order_created.json").read_bytes()

        async def run() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app=WebhookApp(adapter, max_concurrency=4))
            async with httpx.AsyncClient(transport=transport) as client:
                responses: list[httpx.Response] = []

                async def one() -> None:
                    responses.append(await client.post(URL, content=body, headers=headers_for(body)))

                async with anyio.create_task_group() as group:
                    for _ in range(12):
                        group.start_soon(one)
                return responses

        responses = anyio.run(run)
        assert [r.status_code for r in responses] == [200] * 12
        assert sorted(r.json()["status"] for r in responses) == ["duplicate"] * 11 + ["stored"]
        assert len({r.json()["id"] for r in responses}) == 1
        assert len(adapter.inbox.listing(status=None, limit=10)) == 1
