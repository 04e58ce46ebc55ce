"""Bodies as Lemon Squeezy really sends them (``tests/fixtures/lemonsqueezy/``:
no ``meta.custom_data``, snapshots of one second, a product switch through a
new subscription), replayed in every order or many random ones; the host
saying who a customer is (a resolver, a link); a host adopting the ledger
mid-life through ``reconcile``; and the signed bodies that can never be
stored or must never be applied."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit
from uuid import UUID

import httpx
import pytest
from click.testing import CliRunner

from adapters.lemonsqueezy import Customer, CustomerLinked, LemonSqueezy, LemonSqueezyClient, Reconciler
from adapters.lemonsqueezy._state import ledger_subscription_id
from ledger import InvalidArgument, Ledger, audit
from tests.lemonsqueezy_support import (
    FIXTURES,
    PACKS,
    R1,
    R2,
    SECRET,
    START,
    USER,
    Builder,
    StoryClock,
    adapter_for,
    headers_for,
    history_in_order,
    open_ledger,
    php_json,
    table,
    template,
)
from tests.test_lemonsqueezy_story import stores  # noqa: F401  (the fixture: fresh stores of each backend)

ANA = UUID("0b5f3a7e-2c4d-4e6f-8a9b-1c2d3e4f5a01")
BEN = UUID("0b5f3a7e-2c4d-4e6f-8a9b-1c2d3e4f5a02")
USERS = {"ana.lima@example.com": ANA, "ben.okafor@example.com": BEN}
API = "https://api.lemonsqueezy.com/v1"

TIE = ["tie_order_created", "tie_subscription_created", "tie_subscription_updated", "tie_subscription_payment_success"]
MIGRATION = [
    "migration_old_subscription_created",
    "migration_old_subscription_payment_success",
    "migration_old_subscription_renewed",
    "migration_old_subscription_renewal_payment_success",
    "migration_new_subscription_created",
    "migration_new_subscription_payment_success",
    "migration_old_subscription_cancelled",
    "migration_old_subscription_updated_cancelled",
    "migration_old_subscription_expired",
]
#: Before either story: every invoice is young (held for its snapshot, not applied blind), nothing has lapsed.
BEFORE = datetime(2030, 2, 1, tzinfo=UTC)
AFTER = datetime(2030, 6, 1, tzinfo=UTC)


def body(name: str) -> bytes:
    """A fixture's exact bytes, as Lemon Squeezy signed them."""
    return (FIXTURES / f"{name}.json").read_bytes()


class Resolver:
    """The host's answer to "who is this customer?", by email; counts the questions."""

    def __init__(self, users: dict[str, UUID] | None = None) -> None:
        self.users = dict(USERS if users is None else users)
        self.asked: list[str] = []

    def __call__(self, customer: Customer) -> UUID | None:
        self.asked.append(customer.customer_id)
        return self.users.get(customer.email or "")


def with_custom_data(raw: bytes) -> bytes:
    """The body as a checkout that passed the user would have sent it."""
    payload = json.loads(raw)
    email = payload["data"]["attributes"]["user_email"]
    payload["meta"]["custom_data"] = {"user_id": str(USERS[email])}
    return php_json(payload)


def replay(url: str, names: list[str], order: tuple[int, ...], *, who: str = "resolver") -> dict[str, Any]:
    """Delivers the fixtures in ``order`` with the ledger's clock before the
    story, runs what was held, and returns what must not depend on the order.
    ``who``: the host's resolver says who the customer is, or (as a checkout
    with custom data) each body does."""
    clock = StoryClock(BEFORE)
    ledger = open_ledger(url, clock)
    try:
        resolver = Resolver()
        adapter = adapter_for(ledger, resolve_user=resolver if who == "resolver" else None)
        for i in order:
            raw = body(names[i]) if who == "resolver" else with_custom_data(body(names[i]))
            result = adapter.ingest(raw, headers_for(raw))
            assert result.http_status == 200, result
        for _ in range(3):
            if not adapter.inbox.counts().get("failed"):
                break
            adapter.retry_failed()
        assert not adapter.inbox.counts().get("failed"), adapter.inbox.listing(status="failed", limit=5)
        state = end_state(ledger)
        state["asked"] = sorted(set(resolver.asked))
        assert len(resolver.asked) == len(set(resolver.asked)), "the resolver is asked once per customer"
        assert audit(ledger).findings == []
        return state
    finally:
        ledger.close()


def end_state(ledger: Ledger) -> dict[str, Any]:
    ledger.views.catch_up()
    sids = [UUID(str(r[0])) for r in table(ledger, "subscriptions", "id", ())]
    return {
        "subscriptions": table(ledger, "subscriptions", "id", ("created_at", "updated_at")),
        "snapshots": table(ledger, "subscription_snapshots", "subscription_id", ()),
        "history": [history_in_order(ledger, sid) for sid in sorted(sids)],
        "credits": table(
            ledger, "credit_transactions", "log_position", ("id", "balance_after", "created_at", "log_position")
        ),
        "balances": {user: ledger.balance(user).balance_credits for user in (ANA, BEN) if _has_account(ledger, user)},
        "plans": {user: ledger.entitlements(user).plan for user in (ANA, BEN)},
    }


def _has_account(ledger: Ledger, user: UUID) -> bool:
    try:
        ledger.balance(user)
    except LookupError:
        return False
    return True


def orders(n: int, *, every: bool, count: int, seed: int) -> list[tuple[int, ...]]:
    if every:
        return list(itertools.permutations(range(n)))
    rng = random.Random(seed)
    picked = [tuple(range(n)), tuple(reversed(range(n)))]
    while len(picked) < count:
        order = list(range(n))
        rng.shuffle(order)
        picked.append(tuple(order))
    return picked


# ------------------------------------------------------------- the stories


@pytest.mark.parametrize("who", ["resolver", "custom_data"])
def test_a_created_and_an_updated_of_one_second_end_the_same_in_every_order(
    stores: Callable[[], str],  # noqa: F811
    who: str,
) -> None:
    url = stores()
    every = url == "memory://"
    picked = orders(len(TIE), every=every, count=6, seed=11)
    results = [replay(url if n == 0 else stores(), TIE, order, who=who) for n, order in enumerate(picked)]
    for result in results[1:]:
        assert result == results[0]
    state = results[0]
    # The period is the real one (renews_at a month on), never the zero-length one.
    row = state["subscriptions"][0]
    assert "active" in row and datetime(2030, 4, 10, 8, 15, 42) in [_naive(v) for v in row]
    assert [c[1] for c in state["credits"]] == [15000]  # Pro's initial invoice, once
    assert state["plans"][ANA] == "pro"
    assert state["asked"] == (["770201"] if who == "resolver" else [])


@pytest.mark.parametrize(
    "refunds", [["tie_order_refunded"], ["tie_order_refunded", "tie_subscription_payment_refunded"]]
)
def test_a_refunded_first_payment_is_clawed_back_once_in_any_order(
    stores: Callable[[], str],  # noqa: F811
    refunds: list[str],
) -> None:
    """The checkout's first payment refunded as its order (order_refunded),
    alone or with the initial invoice's own refund: Pro's 15,000 credits
    are granted once and clawed back once, in any order of arrival."""
    url = stores()
    names = TIE + refunds
    picked = orders(len(names), every=False, count=8 if url == "memory://" else 3, seed=23)
    results = [replay(url if n == 0 else stores(), names, order) for n, order in enumerate(picked)]
    for result in results[1:]:
        assert result == results[0]
    assert sorted(c[1] for c in results[0]["credits"]) == [-15000, 15000]
    assert results[0]["balances"] == {ANA: 0}


@pytest.mark.parametrize("who", ["resolver", "custom_data"])
def test_a_product_switch_through_a_new_subscription_in_any_order(
    stores: Callable[[], str],  # noqa: F811
    who: str,
) -> None:
    """Ben moves from Starter to Studio: Lemon Squeezy creates a new
    subscription naming the old one (``migration_from_subscription_id``) and
    cancels the old one with a month left. Whatever the order, the new plan
    and its credits are his, and the old one ends when the new one began and
    grants no more."""
    url = stores()
    count = 40 if url == "memory://" else 4
    picked = orders(len(MIGRATION), every=False, count=count, seed=5)
    results = [replay(url if n == 0 else stores(), MIGRATION, order, who=who) for n, order in enumerate(picked)]
    for result in results[1:]:
        assert result == results[0]
    state = results[0]
    assert state["plans"][BEN] == "studio"
    # Starter's first month and its renewal, then Studio's first month; nothing more from the old one.
    assert sorted(c[1] for c in state["credits"]) == [5000, 5000, 30000]
    assert state["balances"][BEN] == 40000
    old, new = (_row(state, "880301"), _row(state, "880302"))
    assert "expired" in old and "active" in new
    assert datetime(2030, 3, 12, 14, 20, 5) in [_naive(v) for v in old]  # ended when the new one began
    assert state["asked"] == (["770301"] if who == "resolver" else [])


def test_the_new_plan_is_the_customers_as_soon_as_the_switch_arrives(ledger: Ledger, clock: StoryClock) -> None:
    """Not a month later, when the old subscription expires."""
    adapter = adapter_for(ledger)
    for name in MIGRATION[:4]:  # the old subscription's life so far
        clock.set(datetime(2030, 3, 2, 12, tzinfo=UTC))
        assert send(adapter, with_custom_data(body(name))).processing == "processed", name
    clock.set(datetime(2030, 3, 12, 14, 21, tzinfo=UTC))
    for name in ("migration_new_subscription_created", "migration_new_subscription_payment_success"):
        result = send(adapter, with_custom_data(body(name)))
        assert result.processing == "processed", result
    assert ledger.entitlements(BEN).plan == "studio"
    assert ledger.subscription_of(BEN).lemon_squeezy_subscription_id == "880302"  # type: ignore[union-attr]
    assert ledger.balance(BEN).balance_credits == 5000 + 30000  # the old period's, and the new plan's
    old = ledger.subscription(ledger_subscription_id("880301"))
    assert old.status == "expired"
    for name in ("migration_old_subscription_cancelled", "migration_old_subscription_updated_cancelled"):
        assert send(adapter, with_custom_data(body(name))).processing == "processed"
    clock.set(datetime(2030, 4, 2, 11, 1, tzinfo=UTC))
    send(adapter, with_custom_data(body("migration_old_subscription_expired")))
    ledger.views.catch_up()
    row = next(r for r in table(ledger, "subscriptions", "id", ()) if "880301" in r)
    assert datetime(2030, 3, 12, 14, 20, 5) in [_naive(v) for v in row]  # ended at the switch, not on 2 April
    assert ledger.entitlements(BEN).plan == "studio"


def _row(state: dict[str, Any], ls_id: str) -> tuple[Any, ...]:
    return next(r for r in state["subscriptions"] if ls_id in r)


def _naive(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value
    return value


# --------------------------------------------------------- who a customer is


@pytest.fixture
def clock() -> StoryClock:
    return StoryClock(BEFORE)


@pytest.fixture
def ledger(ledger_url: str, clock: StoryClock) -> Iterator[Ledger]:
    with open_ledger(ledger_url, clock) as opened:
        yield opened


def send(adapter: LemonSqueezy, name_or_body: str | bytes) -> Any:
    raw = body(name_or_body) if isinstance(name_or_body, str) else name_or_body
    return adapter.ingest(raw, headers_for(raw))


def test_without_custom_data_the_deliveries_wait_for_a_link_and_run_as_soon_as_it_exists(ledger: Ledger) -> None:
    adapter = adapter_for(ledger)
    results = [send(adapter, name) for name in TIE]
    assert [r.processing for r in results] == ["processed", "held", "held", "held"]
    assert "held: customer 770201" in results[1].reason
    report = adapter.link_customer("770201", ANA)
    assert report.linked and report.released.processed == 3 and report.released.failed == 0
    assert ledger.balance(ANA).balance_credits == 15000
    assert ledger.entitlements(ANA).plan == "pro"
    again = adapter.link_customer(770201, ANA)  # the same link again: nothing new
    assert not again.linked and again.released.attempted == 0
    with pytest.raises(CustomerLinked, match="is linked to user"):
        adapter.link_customer("770201", BEN)
    with pytest.raises(InvalidArgument, match="nil UUID"):
        adapter.link_customer("770299", UUID(int=0))
    with pytest.raises(InvalidArgument, match="positive integer"):
        adapter.link_customer("cus_1", ANA)


def test_the_resolver_is_asked_once_per_customer_and_remembered(ledger: Ledger) -> None:
    resolver = Resolver()
    adapter = adapter_for(ledger, resolve_user=resolver)
    assert [send(adapter, name).processing for name in TIE] == ["processed"] * 4
    assert resolver.asked == ["770201"]
    # Remembered in the ledger: another adapter (another process) does not ask again.
    other = Resolver()
    second = adapter_for(ledger, resolve_user=other)
    pack = template("order_created")
    pack["meta"].pop("custom_data")
    pack["meta"]["webhook_id"] = "c2f1a8e0-6d2b-4b6f-9d1e-0a1b2c3d4e5f"
    pack["data"]["attributes"].update(customer_id=770201, user_email="ana.lima@example.com")
    assert send(second, php_json(pack)).processing == "processed"
    assert other.asked == []
    assert ledger.balance(ANA).balance_credits == 15000 + PACKS["9001"]


def test_a_resolver_that_does_not_know_holds_and_one_that_fails_is_retried(ledger: Ledger) -> None:
    calls: list[str] = []

    def flaky(customer: Customer) -> UUID | None:
        calls.append(customer.customer_id)
        if len(calls) <= 2:
            raise ConnectionError("the host's user database is down")
        return None if len(calls) == 3 else ANA

    adapter = adapter_for(ledger, resolve_user=flaky)
    failed = send(adapter, "tie_subscription_updated")
    assert failed.processing == "held" and "resolve_user raised ConnectionError" in failed.reason
    assert len(calls) == 2  # a delivery held at ingest is attempted once more once recorded held
    assert adapter.retry_failed().held == 1  # not known yet: still held
    assert adapter.retry_failed().processed == 1
    assert ledger.entitlements(ANA).plan == "pro"
    nil = adapter_for(ledger, resolve_user=lambda c: UUID(int=0))
    pack = template("order_created")
    pack["meta"].pop("custom_data")
    pack["data"]["attributes"]["customer_id"] = 770999
    assert "nil UUID" in send(nil, php_json(pack)).reason


def test_the_link_command(durable_url: str, clock: StoryClock) -> None:
    from ledger.cli.main import cli

    with open_ledger(durable_url, clock) as ledger:
        adapter = adapter_for(ledger)
        assert [send(adapter, name).processing for name in TIE[1:]] == ["held"] * 3
    packs = ",".join(f"{k}={v}" for k, v in PACKS.items())
    result = CliRunner().invoke(
        cli,
        ["webhooks", "link", "770201", str(ANA), "--url", durable_url, "--secret", SECRET],
        env={"LEMONSQUEEZY_CREDIT_PACKS": packs},
    )
    assert result.exit_code == 0, result.output
    assert f"customer 770201 linked to user {ANA}; held deliveries run: 3 (processed 3" in result.output
    with open_ledger(durable_url, clock) as ledger:
        assert ledger.balance(ANA).balance_credits == 15000
    refused = CliRunner().invoke(
        cli, ["webhooks", "link", "770201", str(BEN), "--url", durable_url, "--secret", SECRET]
    )
    assert refused.exit_code == 1 and "CustomerLinked" in refused.output
    bad = CliRunner().invoke(cli, ["webhooks", "link", "770201", "nobody", "--url", durable_url, "--secret", SECRET])
    assert bad.exit_code == 2 and "is not a UUID" in bad.output


# ---------------------------------------------- bodies never stored or applied


def signed(payload_text: str) -> tuple[bytes, dict[str, str]]:
    raw = payload_text.encode()
    return raw, headers_for(raw)


@pytest.mark.parametrize("number", ["1e-20000", "0e-20000", "1e400", "1.5e1001", "2e-1001", "0." + "1" * 200])
def test_a_number_that_cannot_be_stored_is_refused_not_retried_for_ever(ledger: Ledger, number: str) -> None:
    adapter = adapter_for(ledger)
    text = body("order_created").decode().replace('"tax_rate":"0.00"', f'"tax_rate":{number}')
    assert number in text
    result = adapter.ingest(*signed(text))
    assert (result.http_status, result.status) == (400, "rejected"), result
    assert "out of range" in result.reason
    assert adapter.inbox.counts() == {}  # nothing stored


def test_an_ordinary_fraction_is_stored(ledger: Ledger) -> None:
    # Within the bounds, jsonb stores what a double can hold, and tiny ones too.
    adapter = adapter_for(ledger)
    numbers = '"tax_rate":0.21,"weight":1.5e-3,"tiny":1e-400,"big":1e300'
    text = body("order_created").decode().replace('"tax_rate":"0.00"', numbers)
    result = adapter.ingest(*signed(text))
    assert (result.http_status, result.processing) == (200, "processed"), result


def test_any_test_mode_true_makes_the_event_a_test_one(ledger: Ledger) -> None:
    adapter = adapter_for(ledger)  # live
    payload = template("order_created")
    payload["meta"]["test_mode"] = False
    payload["data"]["attributes"]["test_mode"] = True
    result = send(adapter, php_json(payload))
    assert result.processing == "ignored" and "a test-mode event" in result.reason
    row = adapter.inbox.get(result.event_row_id)  # type: ignore[arg-type]
    assert row is not None and row.test_mode
    with pytest.raises(LookupError):
        ledger.balance(UUID(payload["meta"]["custom_data"]["user_id"]))  # nothing granted
    tester = adapter_for(ledger, test_mode=True)
    assert tester.retry_failed().attempted == 0  # ignored rows are never retried


@pytest.mark.parametrize("flag", ["true", 1, "false", 0, [], {}])
def test_a_test_mode_flag_that_is_not_a_boolean_is_stored_as_a_test_event(ledger: Ledger, flag: Any) -> None:
    """Lemon Squeezy sends JSON booleans; any other ``meta.test_mode`` but
    null is read as the object's flag is (any value but absent, null or
    false: a test), so a live adapter stores it and never applies it,
    instead of refusing a signed delivery (which Lemon Squeezy would give up
    on after its retries)."""
    adapter = adapter_for(ledger)  # live
    payload = template("order_created")
    payload["meta"]["test_mode"] = flag
    result = send(adapter, php_json(payload))
    assert (result.status, result.processing) == ("stored", "ignored")
    row = adapter.inbox.get(result.event_row_id)
    assert row is not None and row.test_mode
    with pytest.raises(LookupError):
        ledger.balance(UUID(payload["meta"]["custom_data"]["user_id"]))


def test_a_null_test_mode_is_live(ledger: Ledger) -> None:
    adapter = adapter_for(ledger)
    payload = template("order_created")
    payload["meta"]["test_mode"] = None
    assert send(adapter, php_json(payload)).processing == "processed"
    assert ledger.balance(UUID(payload["meta"]["custom_data"]["user_id"])).balance_credits == 1000


@pytest.mark.parametrize("custom", ["6f1c2b9e-4d3a-4b8e-9c71-2a5e8f0d1c33", ["x"], 5, True])
def test_custom_data_that_is_not_an_object_is_stored_and_carries_no_user(ledger: Ledger, custom: Any) -> None:
    """A checkout's custom data that is not a key-value object (PHP writes a
    list as a JSON array) names no user: the delivery is stored and finds
    its user as one without custom data does, here held for the customer."""
    adapter = adapter_for(ledger)
    payload = template("order_created")
    payload["meta"]["custom_data"] = custom
    result = send(adapter, php_json(payload))
    assert (result.status, result.processing) == ("stored", "held")
    assert result.reason is not None and result.reason.startswith("held: customer 770001")
    adapter.link_customer(770001, USER)
    assert ledger.balance(USER).balance_credits == 1000


def test_an_order_id_with_leading_zeros_is_the_same_order(ledger: Ledger) -> None:
    adapter = adapter_for(ledger)
    payload = template("order_created")
    user = UUID(payload["meta"]["custom_data"]["user_id"])
    first = send(adapter, php_json(payload))
    padded = json.loads(json.dumps(payload))
    padded["data"]["id"] = "000" + payload["data"]["id"]
    padded["meta"]["webhook_id"] = "9e8d7c6b-5a49-4382-8716-0f1e2d3c4b5a"
    second = send(adapter, php_json(padded))
    assert first.processing == second.processing == "processed"
    assert ledger.balance(user).balance_credits == PACKS["9001"]  # credited once
    assert "applied before" in second.reason
    zero = json.loads(json.dumps(payload))
    zero["data"]["id"] = "000"
    assert send(adapter, php_json(zero)).http_status == 400


def test_the_nil_uuid_as_custom_data_is_refused(ledger: Ledger) -> None:
    adapter = adapter_for(ledger)
    payload = template("order_created")
    payload["meta"]["custom_data"]["user_id"] = str(UUID(int=0))
    result = send(adapter, php_json(payload))
    assert result.processing == "failed" and "nil UUID" in result.reason


# ------------------------------------------------- adopting the ledger mid-life


NOW = datetime(2030, 6, 20, 12, 0, tzinfo=UTC)


def _subscription(sid: int, customer: int, email: str, **attributes: Any) -> dict[str, Any]:
    resource: dict[str, Any] = template("subscription_created")["data"]
    resource["id"] = str(sid)
    resource["attributes"].update(customer_id=customer, user_email=email, **attributes)
    return resource


def _invoice(iid: int, sid: int, customer: int, reason: str, created: datetime, status: str = "paid") -> dict[str, Any]:
    resource: dict[str, Any] = template("subscription_payment_success")["data"]
    resource["id"] = str(iid)
    at = created.strftime("%Y-%m-%dT%H:%M:%S.000000Z")
    resource["attributes"].update(
        subscription_id=sid, customer_id=customer, billing_reason=reason, status=status, created_at=at, updated_at=at
    )
    return resource


def _at(moment: datetime | None) -> str | None:
    return None if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%S.000000Z")


def store_of_a_business_already_running() -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """A store's subscriptions as ``GET /v1/subscriptions`` lists them, their
    invoices (newest first, as the API lists them), and what each subscriber
    must hold after reconciling: the current period's credits."""
    day = timedelta(days=1)
    subs, invoices, expected = [], [], {}
    people = {
        # monthly Starter, renewed ten days ago (and every month before)
        "m@example.com": (881001, 771001, "1001", "active", datetime(2030, 7, 10, 9, tzinfo=UTC), None, 5000),
        # yearly Pro, renewed in November: its invoice is older than the window
        "y@example.com": (881002, 771002, "2002", "active", datetime(2030, 11, 1, 9, tzinfo=UTC), None, 15000),
        # monthly Studio, cancelled, its paid period still running
        "c@example.com": (881003, 771003, "3001", "cancelled", datetime(2030, 7, 5, 9, tzinfo=UTC), "end", 30000),
        # ended in May: nothing
        "e@example.com": (881004, 771004, "1001", "expired", None, datetime(2030, 5, 1, 9, tzinfo=UTC), 0),
        # in dunning: the renewal failed, the period it would pay is unpaid
        "p@example.com": (881005, 771005, "1001", "past_due", datetime(2030, 6, 18, 9, tzinfo=UTC), None, 0),
    }
    for email, (sid, customer, variant, status, renews, ends, credits) in people.items():
        yearly = variant == "2002"
        period_end = renews or ends
        assert period_end is not None
        cycle = 365 if yearly else 30
        created = period_end - (4 if not yearly else 2) * cycle * day
        attributes: dict[str, Any] = {
            "variant_id": int(variant),
            "status": status,
            "cancelled": status in ("cancelled", "expired"),
            "renews_at": _at(renews if status != "expired" else None),
            "ends_at": _at(renews if ends == "end" else ends if isinstance(ends, datetime) else None),
            "created_at": _at(created),
            "updated_at": _at(NOW - 3 * day),
        }
        subs.append(_subscription(sid, customer, email, **attributes))
        # Every period's paid invoice, the first one "initial".
        paid_at = created
        n = 0
        while paid_at < NOW and (status != "expired" or paid_at < period_end):
            reason = "initial" if n == 0 else "renewal"
            failed = status == "past_due" and paid_at + cycle * day > NOW
            invoices.append(
                _invoice(551000 + sid % 1000 * 20 + n, sid, customer, reason, paid_at, "pending" if failed else "paid")
            )
            paid_at += cycle * day
            n += 1
        expected[email] = credits
    invoices.sort(key=lambda r: r["attributes"]["created_at"], reverse=True)
    return subs, invoices, expected


def api(subs: list[dict[str, Any]], invoices: list[dict[str, Any]]) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        url = urlsplit(str(request.url))
        query = parse_qs(url.query)
        kind = url.path.rsplit("/", 1)[-1]
        items = subs if kind == "subscriptions" else invoices
        if "filter[status]" in query:
            items = [i for i in items if i["attributes"]["status"] == query["filter[status]"][0]]
        if "filter[subscription_id]" in query:
            items = [i for i in items if str(i["attributes"]["subscription_id"]) == query["filter[subscription_id]"][0]]
        return httpx.Response(
            200, json={"meta": {"page": {"currentPage": 1, "lastPage": 1}}, "links": {}, "data": items}
        )

    return handler


def test_reconcile_on_a_fresh_ledger_starts_from_the_providers_present(ledger: Ledger, clock: StoryClock) -> None:
    subs, invoices, expected = store_of_a_business_already_running()
    users = {email: UUID(int=0x1000 + i) for i, email in enumerate(expected)}
    adapter = adapter_for(ledger, resolve_user=Resolver(users))
    clock.set(NOW)
    client = LemonSqueezyClient("k", transport=httpx.MockTransport(api(subs, invoices)), sleep=lambda s: None)
    with client:
        report = Reconciler(adapter.processor, client).run()
    assert report.problems == [], report.problems
    for email, credits in expected.items():
        held = ledger.balance(users[email]).balance_credits if credits else _balance_or_zero(ledger, users[email])
        assert held == credits, (email, held, credits)
    plans = {email: ledger.entitlements(users[email]).plan for email in expected}
    assert plans == {
        "m@example.com": "starter",
        "y@example.com": "pro",
        "c@example.com": "studio",
        "e@example.com": "free",
        "p@example.com": "starter",
    }
    with LemonSqueezyClient("k", transport=httpx.MockTransport(api(subs, invoices)), sleep=lambda s: None) as again_:
        again = Reconciler(adapter.processor, again_).run()
    assert again.changes == []  # once
    assert audit(ledger).findings == []


def _balance_or_zero(ledger: Ledger, user: UUID) -> int:
    try:
        return ledger.balance(user).balance_credits
    except LookupError:
        return 0


def test_the_api_is_asked_for_the_invoices_of_a_yearly_period_only(ledger: Ledger, clock: StoryClock) -> None:
    subs, invoices, _ = store_of_a_business_already_running()
    seen: list[dict[str, list[str]]] = []
    handler = api(subs, invoices)

    def counting(request: httpx.Request) -> httpx.Response:
        seen.append(parse_qs(urlsplit(str(request.url)).query))
        return handler(request)

    adapter = adapter_for(ledger, resolve_user=Resolver({}))
    clock.set(NOW)
    with LemonSqueezyClient("k", transport=httpx.MockTransport(counting), sleep=lambda s: None) as client:
        Reconciler(adapter.processor, client).run()
    by_subscription = [q["filter[subscription_id]"] for q in seen if "filter[subscription_id]" in q]
    assert by_subscription == [["881002"]]  # the one live subscription whose period began before the window


def dunning_story() -> list[bytes]:
    """A renewal, then a failed charge: the payment_failed invoice and the
    past_due snapshot whose renews_at is the next retry, not a period end."""
    b = Builder()
    sec, day = timedelta(seconds=1), timedelta(days=1)
    return [
        b.subscription_event("subscription_created", updated=START, renews_at=R1),
        b.subscription_event("subscription_updated", updated=R1 + 3 * sec, renews_at=R2),
        b.invoice_event(
            "subscription_payment_success",
            "550002",
            reason="renewal",
            status="paid",
            created=R1,
            updated=R1 + sec,
            total=2500,
        ),
        b.invoice_event(
            "subscription_payment_failed",
            "550003",
            reason="renewal",
            status="pending",
            created=R2,
            updated=R2 + sec,
            total=2500,
        ),
        b.subscription_event("subscription_updated", updated=R2 + 3 * sec, status="past_due", renews_at=R2 + 3 * day),
    ]


def test_a_failed_renewal_ends_the_same_in_every_order(stores: Callable[[], str]) -> None:  # noqa: F811
    """Whatever arrives first, the subscription is past_due with the period
    the renewal paid for (February to March), and so are its snapshots and
    its history; before the fix a past_due arriving after a newer snapshot
    took that one's period."""
    deliveries = dunning_story()
    url = stores()
    picked = orders(len(deliveries), every=url == "memory://", count=6, seed=3)
    results = []
    for n, order in enumerate(picked):
        clock = StoryClock(START - timedelta(hours=1))
        with open_ledger(url if n == 0 else stores(), clock) as ledger:
            adapter = adapter_for(ledger)
            for i in order:
                assert adapter.ingest(deliveries[i], headers_for(deliveries[i])).http_status == 200
            for _ in range(3):
                adapter.retry_failed()
            assert not adapter.inbox.counts().get("failed")
            ledger.views.catch_up()
            view = ledger.subscription(ledger_subscription_id("880001"))
            results.append(
                {
                    "view": (view.status, view.current_period_start, view.current_period_end),
                    "snapshots": table(ledger, "subscription_snapshots", "subscription_id", ()),
                    "history": history_in_order(ledger, ledger_subscription_id("880001")),
                    "balance": ledger.balance(USER).balance_credits,
                }
            )
    for result in results[1:]:
        assert result == results[0]
    assert results[0]["view"] == ("past_due", R1, R2)
    assert results[0]["balance"] == 5000  # the renewal's; the failed charge grants nothing
    past_due = [json.loads(r[4]) for r in results[0]["history"] if r[1] == "past_due"]
    assert [(d["period_start"], d["period_end"]) for d in past_due] == [(R1.isoformat(), R2.isoformat())]


def test_a_rest_object_is_applied_only_by_an_adapter_of_its_own_mode(ledger: Ledger) -> None:
    live = json.loads(body("tie_subscription_updated"))["data"]
    test = json.loads(json.dumps(live))
    test["attributes"]["test_mode"] = True
    live_adapter = adapter_for(ledger, resolve_user=Resolver())
    test_adapter = adapter_for(ledger, test_mode=True, resolve_user=Resolver())
    assert test_adapter.processor.apply_resource(live).status == "ignored"
    assert live_adapter.processor.apply_resource(test).status == "ignored"
    assert live_adapter.processor.apply_resource(live).status == "processed"
