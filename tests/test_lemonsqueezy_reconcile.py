"""The REST client (rate limit, retries, pages) and the reconciler, against
``httpx.MockTransport`` answers shaped like Lemon Squeezy's API."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from click.testing import CliRunner

from adapters.lemonsqueezy import LemonSqueezyApiError, LemonSqueezyClient, Reconciler, TokenBucket
from adapters.lemonsqueezy._client import retry_after_s
from ledger import Ledger
from tests.lemonsqueezy_support import R1, START, USER, Builder, StoryClock, adapter_for, headers_for, open_ledger

API = "https://api.lemonsqueezy.com/v1"
SEC = timedelta(seconds=1)


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def client_for(handler: Callable[[httpx.Request], httpx.Response], fake: FakeTime, **kw: Any) -> LemonSqueezyClient:
    bucket = TokenBucket(5.0, 10, clock=fake.clock, sleep=fake.sleep)
    return LemonSqueezyClient(
        "test-key-123", transport=httpx.MockTransport(handler), bucket=bucket, sleep=fake.sleep, **kw
    )


def page(kind: str, items: list[dict[str, Any]], number: int, last: int, extra: str = "") -> dict[str, Any]:
    """A list answer: JSON:API data, links (URL-encoded, next only if there is one) and meta.page."""

    def link(n: int) -> str:
        return f"{API}/{kind}?{extra}page%5Bnumber%5D={n}&page%5Bsize%5D=100"

    links = {"first": link(1), "last": link(last)}
    if number < last:
        links["next"] = link(number + 1)
    if number > 1:
        links["prev"] = link(number - 1)
    meta = {"currentPage": number, "from": 1, "lastPage": last, "perPage": 100, "to": len(items), "total": len(items)}
    return {"meta": {"page": meta}, "jsonapi": {"version": "1.0"}, "links": links, "data": items}


def resource(body: bytes) -> dict[str, Any]:
    """The ``data`` of a webhook body: the same resource object the API returns."""
    data: dict[str, Any] = json.loads(body)["data"]
    return data


# ------------------------------------------------------------------- client


def test_pages_are_followed_through_links_next_with_the_api_headers() -> None:
    fake, seen = FakeTime(), []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        number = int(parse_qs(urlsplit(str(request.url)).query)["page[number]"][0])
        items = [{"type": "subscriptions", "id": str(number * 10 + i), "attributes": {}} for i in range(3)]
        return httpx.Response(200, json=page("subscriptions", items, number, 3, "filter%5Bstore_id%5D=41205&"))

    with client_for(handler, fake) as client:
        ids = [r["id"] for r in client.subscriptions(store_id="41205")]
    assert ids == ["10", "11", "12", "20", "21", "22", "30", "31", "32"]
    first = seen[0]
    assert first.headers["authorization"] == "Bearer test-key-123"
    assert first.headers["accept"] == "application/vnd.api+json"
    query = parse_qs(urlsplit(str(first.url)).query)
    assert query == {"filter[store_id]": ["41205"], "page[number]": ["1"], "page[size]": ["100"]}
    assert "test-key-123" not in repr(client)


def test_a_429_waits_for_retry_after_and_5xx_back_off_a_bounded_number_of_times() -> None:
    fake, answers = FakeTime(), iter([429, 503, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        status = next(answers)
        if status == 429:
            return httpx.Response(
                429, headers={"Retry-After": "7"}, json={"errors": [{"detail": "Too Many Attempts."}]}
            )
        if status == 503:
            return httpx.Response(503, text="unavailable")
        return httpx.Response(200, json=page("subscriptions", [], 1, 1))

    with client_for(handler, fake) as client:
        assert list(client.subscriptions()) == []
    assert fake.slept[0] == 7.0  # Retry-After honoured
    assert 2.0 <= fake.slept[1] <= 3.0  # then exponential backoff (2 ** attempt, plus jitter)

    fake = FakeTime()
    failing = client_for(lambda r: httpx.Response(500), fake, max_retries=3)
    with failing, pytest.raises(LemonSqueezyApiError, match="answered 500 after 4 attempts"):
        list(failing.subscriptions())
    assert len(fake.slept) == 3 and max(fake.slept) <= 60


def test_errors_say_what_the_api_said() -> None:
    fake = FakeTime()
    answer = {"jsonapi": {"version": "1.0"}, "errors": [{"detail": "Unauthenticated.", "status": "401"}]}
    client = client_for(lambda r: httpx.Response(401, json=answer), fake)
    with client, pytest.raises(LemonSqueezyApiError, match="answered 401: Unauthenticated") as caught:
        list(client.subscription_invoices())
    assert caught.value.status_code == 401


def test_links_off_the_api_host_are_not_followed_and_pages_are_bounded() -> None:
    fake = FakeTime()
    evil = {"links": {"next": "https://evil.example/steal"}, "data": []}
    client = client_for(lambda r: httpx.Response(200, json=evil), fake)
    with client, pytest.raises(LemonSqueezyApiError, match=r"refusing to follow a link off api\.lemonsqueezy\.com"):
        list(client.subscriptions())

    def endless(request: httpx.Request) -> httpx.Response:
        number = int(parse_qs(urlsplit(str(request.url)).query)["page[number]"][0])
        return httpx.Response(200, json=page("subscriptions", [], number, 10_000))

    bounded = client_for(endless, FakeTime())
    with bounded, pytest.raises(LemonSqueezyApiError, match="more than 5 pages"):
        list(bounded.subscriptions(max_pages=5))


def test_the_token_bucket_keeps_under_300_a_minute() -> None:
    fake = FakeTime()
    bucket = TokenBucket(300 / 60, 10, clock=fake.clock, sleep=fake.sleep)
    start = fake.now
    for _ in range(310):
        bucket.take()
    assert fake.now - start >= 60.0  # 10 at once, then 5 a second
    assert retry_after_s("12") == 12.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_s("soon") is None


def test_a_429_without_retry_after_waits_out_the_window_before_giving_up() -> None:
    """No Retry-After: short backoffs first, and the last retry a whole
    window (60 s) after the first 429, so the quota is back; bounded."""
    fake, waits = FakeTime(), []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        fake.sleep(seconds)

    limited = {"errors": [{"status": "429", "title": "Too Many Requests"}]}
    client = LemonSqueezyClient(
        "k",
        transport=httpx.MockTransport(lambda r: httpx.Response(429, json=limited)),
        bucket=TokenBucket(5.0, 10, clock=fake.clock, sleep=fake.sleep),
        sleep=sleep,
        clock=fake.clock,
    )
    start = fake.now
    with client, pytest.raises(LemonSqueezyApiError, match=r"rate limited \(429\) after 6 attempts") as caught:
        client.get(f"{API}/subscriptions")
    assert caught.value.status_code == 429
    assert len(waits) == 5 and waits[:4] == sorted(waits[:4]) and waits[0] < 2
    assert 61 <= sum(waits) <= 63 and fake.now - start <= 63

    answers = iter([429, 429, 429, 429, 429, 200])  # the quota is back after the window
    fake, waits = FakeTime(), []
    recovered = LemonSqueezyClient(
        "k",
        transport=httpx.MockTransport(
            lambda r: httpx.Response(next(answers), json={"data": {"type": "subscriptions", "id": "1"}})
        ),
        bucket=TokenBucket(5.0, 10, clock=fake.clock, sleep=fake.sleep),
        sleep=sleep,
        clock=fake.clock,
    )
    with recovered:
        assert recovered.get(f"{API}/subscriptions/1")["data"]["id"] == "1"
    assert sum(waits) >= 61


def test_few_requests_remaining_slow_the_next_request_down() -> None:
    fake, remaining = FakeTime(), iter(["120", "3", "0", "250"])

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"X-Ratelimit-Limit": "300", "X-Ratelimit-Remaining": next(remaining)}
        return httpx.Response(200, headers=headers, json={"data": []})

    client = client_for(handler, fake, clock=fake.clock)
    with client:
        for _ in range(4):
            client.get(f"{API}/subscriptions")
    # 120 left: no wait; 3 left: 3 requests short of 6, a fifth of a second each; 0 left: 6.
    assert fake.slept == pytest.approx([0.6, 1.2])


def test_the_default_bucket_stays_within_300_in_any_minute() -> None:
    fake = FakeTime()
    client = LemonSqueezyClient(
        "k", transport=httpx.MockTransport(lambda r: httpx.Response(200)), sleep=fake.sleep, clock=fake.clock
    )
    with client:
        for _ in range(301):
            client.bucket.take()
    assert fake.now - 1000.0 >= 60.0  # the burst of 10 included


def test_pages_keep_the_filters_when_links_next_drops_them() -> None:
    fake, seen = FakeTime(), []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(parse_qs(urlsplit(str(request.url)).query))
        number = int(seen[-1]["page[number]"][0])
        links: dict[str, str] = {"first": f"{API}/subscription-invoices?page%5Bnumber%5D=1"}
        if number < 3:  # a next link without the filters or the page size
            links["next"] = f"{API}/subscription-invoices?page%5Bnumber%5D={number + 1}"
        items = [{"type": "subscription-invoices", "id": str(number), "attributes": {}}]
        return httpx.Response(200, json={"meta": {"page": {"currentPage": number}}, "links": links, "data": items})

    with client_for(handler, fake) as client:
        ids = [r["id"] for r in client.subscription_invoices(store_id="41205", status="refunded")]
    assert ids == ["1", "2", "3"]
    for number, query in enumerate(seen, 1):
        assert query == {
            "filter[store_id]": ["41205"],
            "filter[status]": ["refunded"],
            "page[number]": [str(number)],
            "page[size]": ["100"],
        }


def test_a_links_next_that_changes_a_filter_or_repeats_a_page_is_an_error() -> None:
    def changing(request: httpx.Request) -> httpx.Response:
        other = f"{API}/subscriptions?filter%5Bstore_id%5D=999&page%5Bnumber%5D=2&page%5Bsize%5D=100"
        return httpx.Response(200, json={"links": {"next": other}, "data": []})

    with (
        client_for(changing, FakeTime()) as client,
        pytest.raises(LemonSqueezyApiError, match=r"changes filter\[store_id\]"),
    ):
        list(client.subscriptions(store_id="41205"))

    def stuck(request: httpx.Request) -> httpx.Response:
        again = f"{API}/subscriptions?page%5Bnumber%5D=2&page%5Bsize%5D=100"
        return httpx.Response(200, json={"links": {"next": again}, "data": []})

    with client_for(stuck, FakeTime()) as client, pytest.raises(LemonSqueezyApiError, match="repeats a page"):
        list(client.subscriptions())


# --------------------------------------------------------------- reconciler


@pytest.fixture
def clock() -> StoryClock:
    return StoryClock(START)


@pytest.fixture
def ledger(ledger_url: str, clock: StoryClock) -> Iterator[Ledger]:
    with open_ledger(ledger_url, clock) as opened:
        yield opened


def api(
    subscriptions: list[dict[str, Any]], invoices: list[dict[str, Any]], orders: list[dict[str, Any]] | None = None
) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        kind = urlsplit(str(request.url)).path.rsplit("/", 1)[-1]
        items = {"subscriptions": subscriptions, "subscription-invoices": invoices, "orders": orders or []}[kind]
        status = parse_qs(urlsplit(str(request.url)).query).get("filter[status]")
        if status:  # as the API filters
            items = [item for item in items if item["attributes"]["status"] == status[0]]
        return httpx.Response(200, json=page(kind, items, 1, 1))

    return handler


def test_reconcile_applies_newer_snapshots_and_grants_paid_invoices_never_granted(
    ledger: Ledger, clock: StoryClock
) -> None:
    adapter = adapter_for(ledger)
    b = Builder()
    first = b.subscription_event("subscription_created", updated=START, renews_at=R1)
    assert adapter.ingest(first, headers_for(first)).processing == "processed"
    # Lost deliveries: the initial invoice, the renewal, and a cancellation.
    initial = b.initial_invoice_event()
    renewal = b.invoice_event(
        "subscription_payment_success",
        "550002",
        reason="renewal",
        status="paid",
        created=R1,
        updated=R1 + SEC,
        total=2500,
    )
    now = b.subscription_event(
        "subscription_cancelled",
        updated=R1 + 3 * SEC,
        status="cancelled",
        renews_at=R1 + timedelta(days=28),
        ends_at=R1 + timedelta(days=28),
        cancelled=True,
    )
    stranger = Builder(user=None, subscription="880077", customer=779999)
    unknown = stranger.subscription_event("subscription_created", updated=START, renews_at=R1)
    clock.set(R1 + timedelta(days=2))
    lines: list[str] = []
    handler = api([resource(now), resource(unknown)], [resource(renewal), resource(initial)])
    with client_for(handler, FakeTime()) as client:
        report = Reconciler(adapter.processor, client).run(echo=lines.append)
    assert report.subscriptions_seen == 2 and report.invoices_seen == 2
    assert report.changes == [
        "subscription 880001: applied the current snapshot",
        f"invoice 550002: granted 5000 credits to user {USER}",
    ]
    assert report.notes == [
        "invoice 550001: the paid period ended at 2030-02-05T10:00:01+00:00 before the payment was processed; "
        "nothing granted"
    ]
    assert lines == [report.changes[0], report.problems[0], report.changes[1], report.notes[0]]
    assert any("880077: not applied: held: customer 779999" in p for p in report.problems)
    assert ledger.subscription_of(USER).status == "cancelled"  # type: ignore[union-attr]
    assert ledger.balance(USER).balance_credits == 5000  # the renewal; the initial period had ended
    with client_for(handler, FakeTime()) as client:  # again: nothing left to change
        again = Reconciler(adapter.processor, client).run()
    assert again.changes == []


def test_reconcile_stops_at_invoices_older_than_the_window(ledger: Ledger, clock: StoryClock) -> None:
    adapter = adapter_for(ledger)
    b = Builder()
    invoices = [
        resource(
            b.invoice_event(
                "subscription_payment_success",
                str(550100 - i),
                reason="renewal",
                status="paid",
                created=R1 - timedelta(days=20 * i),
                updated=R1,
                total=2500,
            )
        )
        for i in range(5)
    ]
    clock.set(R1 + SEC)
    with client_for(api([], invoices), FakeTime()) as client:
        report = Reconciler(adapter.processor, client, since_days=45).run()
    assert report.invoices_seen == 3  # 0, 20 and 40 days old


@pytest.mark.parametrize(("since_days", "old"), [(45, 0), (1, 1)])
def test_reconcile_claws_back_refunds_of_invoices_older_than_the_window(
    ledger: Ledger, clock: StoryClock, since_days: int, old: int
) -> None:
    """A refund whose webhook was lost is found by ``filter[status]`` however
    old the invoice (the list is newest first, and the window stops at it);
    an invoice in the window is checked once."""
    adapter = adapter_for(ledger)
    b = Builder()
    created = b.subscription_event("subscription_created", updated=START, renews_at=R1)
    paid = b.initial_invoice_event()
    for body in (created, paid):
        assert adapter.ingest(body, headers_for(body)).processing == "processed"
    assert ledger.balance(USER).balance_credits == 5000
    refund = b.invoice_event(
        "subscription_payment_refunded",
        "550001",
        reason="initial",
        status="partial_refund",
        created=START + SEC,
        updated=START + timedelta(days=2),
        total=2500,
        refunded_amount=1000,
    )
    clock.set(START + timedelta(days=3))
    queries: list[dict[str, list[str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        query = parse_qs(urlsplit(str(request.url)).query)
        queries.append(query)
        kind = urlsplit(str(request.url)).path.rsplit("/", 1)[-1]
        if kind == "subscriptions":
            items = [resource(created)]
        elif kind == "orders":
            items = []
        else:
            status = query.get("filter[status]", [None])[0]
            items = [] if status == "refunded" else [resource(refund)]  # in the unfiltered list too
        return httpx.Response(200, json=page(kind, items, 1, 1))

    with client_for(handler, FakeTime()) as client:
        report = Reconciler(adapter.processor, client, store_id="41205", since_days=since_days).run()
    assert (report.invoices_seen, report.old_refunds_seen) == (1, old)
    assert report.changes == [f"invoice 550001: clawed back 2000 credits from user {USER}"]
    assert ledger.balance(USER).balance_credits == 3000  # 40 % of 5000 back
    statuses = [q.get("filter[status]") for q in queries]
    # Then the orders (no status filter), and with a one-day window, the
    # current period began before it: its invoices are asked for too.
    assert statuses == [None, None, ["refunded"], ["partial_refund"], None, *([None] if since_days == 1 else [])]
    assert all(q["filter[store_id]"] == ["41205"] for q in queries)
    with client_for(handler, FakeTime()) as client:  # again: nothing left to change
        assert Reconciler(adapter.processor, client, store_id="41205", since_days=since_days).run().changes == []


def test_reconcile_finds_lost_order_refunds_however_old_and_lost_pack_orders(ledger: Ledger, clock: StoryClock) -> None:
    """Orders have no status filter: every order is read, newest first. A
    pack bought and refunded long ago, and a subscription's checkout order
    refunded (its initial invoice's credits), whose order_refunded webhooks
    were lost, are clawed back; a pack bought in the window whose
    order_created was lost is granted; another product's order and a pack's
    old unrefunded order are left alone."""
    adapter = adapter_for(ledger)
    b = Builder()
    for body in (
        b.order_event("order_created", "660002", variant="9001", total=1000, at=START),  # 1,000 credits
        b.subscription_event("subscription_created", updated=START, renews_at=R1),
        b.initial_invoice_event(),  # 5,000 credits
        b.order_event("order_created", "660003", variant="9002", total=4000, at=START + SEC),  # 5,000 credits
    ):
        assert adapter.ingest(body, headers_for(body)).processing == "processed"
    assert ledger.balance(USER).balance_credits == 11000
    later = START + timedelta(days=20)  # the window below is 10 days: the refunded orders are older
    clock.set(later)

    def refunded(order_id: str, variant: str, total: int, at: datetime) -> bytes:
        return b.order_event(
            "order_refunded",
            order_id,
            variant=variant,
            total=total,
            at=at,
            status="refunded",
            refunded=True,
            refunded_amount=total,
            updated=later - timedelta(days=1),
        )

    orders = [
        b.order_event("order_created", "660009", variant="9001", total=1000, at=later - timedelta(days=2)),  # lost
        b.order_event("order_created", "660008", variant="777", total=500, at=later - timedelta(days=3)),
        refunded("660003", "9002", 4000, START + SEC),
        b.order_event(
            "order_refunded",
            "660002",
            variant="9001",
            total=1000,
            at=START,
            status="partial_refund",
            refunded_amount=400,
            updated=later - timedelta(days=1),
        ),
        refunded("660001", "1001", 2500, START),
    ]
    handler = api([], [], [resource(o) for o in orders])
    with client_for(handler, FakeTime()) as client:
        report = Reconciler(adapter.processor, client, since_days=10).run()
    assert (report.orders_seen, report.orders_checked) == (5, 4)
    assert report.changes == [
        f"order 660009: granted 1000 credits to user {USER}",
        f"order 660003: clawed back 5000 credits from user {USER}",
        f"order 660002: clawed back 400 credits from user {USER}",
        f"order 660001: clawed back 5000 credits from user {USER}",
    ]
    assert report.problems == []
    assert ledger.balance(USER).balance_credits == 11000 + 1000 - 5000 - 400 - 5000
    with client_for(handler, FakeTime()) as client:  # again: nothing left to change
        assert Reconciler(adapter.processor, client, since_days=10).run().changes == []


def test_the_reconcile_command(durable_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    from adapters.lemonsqueezy import _client
    from ledger.cli.main import cli

    with open_ledger(durable_url, StoryClock(START)) as ledger:
        adapter = adapter_for(ledger)
        b = Builder()
        first = b.subscription_event("subscription_created", updated=START, renews_at=R1)
        adapter.ingest(first, headers_for(first))
    newer = b.subscription_event("subscription_updated", updated=START + SEC, variant="2001", renews_at=R1)
    handler = api([resource(newer)], [])
    original = _client.LemonSqueezyClient

    def mocked(api_key: str, **kw: Any) -> LemonSqueezyClient:
        return original(api_key, transport=httpx.MockTransport(handler), **kw)

    monkeypatch.setattr(_client, "LemonSqueezyClient", mocked)
    result = CliRunner().invoke(cli, ["reconcile", "--url", durable_url, "--api-key", "k"])
    assert result.exit_code == 0, result.output
    assert "subscription 880001: applied the current snapshot" in result.output
    assert (
        "1 subscriptions and 0 invoices checked (0 of them older refunds), 0 of 0 orders: "
        "1 changed, 0 noted, 0 not applied" in result.output
    )
