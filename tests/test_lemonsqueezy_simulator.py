"""The webhook simulator (``python -m ledger webhooks trigger``): signed
deliveries of every event the adapter handles, and a subscription's whole
life (``--story``), sent over real HTTP to a local endpoint (uvicorn serving
``WebhookApp``) that runs the adapter on memory, SQLite and PostgreSQL; the
ledger ends as the story says."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
import uvicorn
from click.testing import CliRunner

from adapters.lemonsqueezy import LemonSqueezy, WebhookApp, verify
from adapters.lemonsqueezy._simulator import EVENTS, Simulator, Variant, plan_variants, send, template
from ledger import BillingCycle, Ledger
from ledger.cli.main import cli
from tests.lemonsqueezy_support import BEFORE, SECRET, START, StoryClock, adapter_for, iso, open_ledger

MONTHLY = BillingCycle.MONTHLY


@dataclass
class Served:
    ledger: Ledger
    adapter: LemonSqueezy
    url: str
    ledger_url: str


def serve(app: Any) -> Iterator[str]:
    """``app`` on 127.0.0.1 (a free port) in a thread, until the test ends."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/webhooks/lemonsqueezy"
    finally:
        server.should_exit = True
        thread.join(20)


@pytest.fixture
def served(ledger_url: str) -> Iterator[Served]:
    # The ledger's clock before the story: every delivery is in its future,
    # so nothing lapses before the test moves time on (tick).
    with open_ledger(ledger_url, StoryClock(BEFORE)) as ledger:
        adapter = adapter_for(ledger)
        for url in serve(WebhookApp(adapter)):
            yield Served(ledger, adapter, url, ledger_url)


def trigger(served: Served, *args: str) -> list[dict[str, Any]]:
    """Runs ``webhooks trigger`` against the endpoint; the answers, parsed."""
    catalog = ["--ledger-url", served.ledger_url] if not served.ledger_url.startswith("memory") else []
    result = CliRunner().invoke(
        cli, ["webhooks", "trigger", *args, "--url", served.url, "--secret", SECRET, *catalog], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    answers = []
    for line in result.output.splitlines():
        event, webhook_id, http, status, text = line.split(" ", 4)
        assert event in EVENTS and UUID(webhook_id) and (http, status) == ("HTTP", "200"), line
        answers.append({"event": event, **json.loads(text)})
    return answers


def variant_options(served: Served, plan: str = "starter") -> list[str]:
    """The plan by name (read from the catalog), or, for memory:// (another
    process cannot open it), by its variant and price."""
    if not served.ledger_url.startswith("memory"):
        return ["--plan", plan]
    v = plan_variants(served.ledger)[(plan, MONTHLY)]
    return ["--variant", str(v.variant_id), "--price-cents", str(v.price_cents)]


# ------------------------------------------------------------------ the story


def test_the_story_ends_with_the_expected_history_and_credits(served: Served) -> None:
    user = uuid4()
    ledger = served.ledger
    if served.ledger_url.startswith("memory"):
        starter, pro = (plan_variants(ledger)[(p, MONTHLY)] for p in ("starter", "pro"))
        extra = ["--variant", str(starter.variant_id), "--price-cents", str(starter.price_cents)]
        extra += ["--to-variant", str(pro.variant_id), "--to-price-cents", str(pro.price_cents)]
    else:
        extra = ["--plan", "starter", "--to-plan", "pro"]
    answers = trigger(served, "--story", "--user", str(user), "--at", iso(START) or "", *extra)
    assert [a["event"] for a in answers] == [
        "order_created",
        "subscription_created",
        "subscription_payment_success",
        "subscription_updated",
        "subscription_payment_success",
        "subscription_updated",
        "subscription_plan_changed",
        "subscription_updated",
        "subscription_payment_success",
        "subscription_updated",
        "subscription_payment_failed",
        "subscription_updated",
        "subscription_payment_recovered",
        "subscription_updated",
        "subscription_payment_success",
        "subscription_updated",
        "subscription_payment_refunded",
        "subscription_cancelled",
        "subscription_updated",
        "subscription_expired",
    ]
    assert {a["status"] for a in answers} == {"stored"}
    # Every delivery applied: the invoices that came before their snapshot were held, then released by it.
    assert served.adapter.inbox.counts() == {"processed": len(answers)}

    starter_credits, pro_credits = ledger.plan("starter").credits, ledger.plan("pro").credits
    subscription = ledger.read_aggregate(_subscription_id(ledger, user))
    assert (subscription.plan, str(subscription.status)) == ("pro", "expired")
    ledger.views.catch_up()
    moves = _credit_moves(ledger, user)
    assert moves == [
        ("subscription_grant", starter_credits),  # the checkout's invoice
        ("subscription_renew", starter_credits),  # the first renewal
        ("subscription_grant", pro_credits - starter_credits),  # the upgrade, full difference
        ("subscription_renew", pro_credits),  # the failed renewal, recovered
        ("subscription_renew", pro_credits),  # the renewal that was refunded...
        ("refund", -pro_credits),  # ... and clawed back
    ], moves
    history = [row[0] for row in _history(ledger, user)]
    assert history[0] == "created" and history[-1] == "expired"
    for change in ("upgraded", "past_due", "recovered", "cancelled"):
        assert change in history, (change, history)
    assert history.index("upgraded") < history.index("past_due") < history.index("recovered")
    assert history.index("recovered") < history.index("cancelled") < history.index("expired")
    # Once the last period has ended, every subscription credit has lapsed.
    ledger.tick(START + timedelta(days=200), allow_future=True)
    assert ledger.balance(user).balance_credits == 0


def test_the_story_is_sent_by_the_library_too_with_consistent_ids_and_dates(served: Served) -> None:
    ledger = served.ledger
    starter, pro = (plan_variants(ledger)[(p, MONTHLY)] for p in ("starter", "pro"))
    simulator = Simulator(uuid4(), test_mode=False)
    story = simulator.story(START, starter, pro)
    assert [d.at for d in story] == sorted(d.at for d in story)
    assert len({d.webhook_id for d in story}) == len(story)
    subscriptions = {d.payload["data"]["id"] for d in story if d.payload["data"]["type"] == "subscriptions"}
    assert subscriptions == {str(simulator.subscription_id)}
    invoices = [d.payload["data"]["attributes"]["subscription_id"] for d in story if "payment" in d.event_name]
    assert set(invoices) == {simulator.subscription_id}
    assert {d.payload["data"]["attributes"]["customer_id"] for d in story} == {simulator.customer_id}
    for delivery in story:
        assert verify(delivery.body, delivery.headers(SECRET)["X-Signature"], SECRET)
        assert b"\\/" in delivery.body and b"https://" not in delivery.body  # PHP's escaped slashes
    answers = list(send(story, served.url, SECRET))
    assert [status for _, status, _ in answers] == [200] * len(story)
    assert served.adapter.inbox.counts() == {"processed": len(story)}


# ----------------------------------------------------------- one event at a time


def test_every_event_the_adapter_handles_can_be_triggered(served: Served) -> None:
    """Each event outside the story, one trigger at a time, changes the
    ledger as Lemon Squeezy's would: a subscription paid, paused, unpaused,
    cancelled, resumed; a credit pack bought and refunded."""
    user = str(uuid4())
    ledger = served.ledger
    plan = variant_options(served)
    t0 = START

    def at(delta: timedelta) -> list[str]:
        return ["--at", iso(t0 + delta) or ""]

    def status() -> str:
        view = ledger.subscription_of(UUID(user))
        assert view is not None
        return view.status

    (created,) = trigger(served, "subscription_created", "--user", user, *plan, *at(timedelta(0)))
    assert created["processing"] == "processed" and status() == "active"
    (paid,) = trigger(
        served, "subscription_payment_success", "--user", user, *plan, "--invoice-id", "5550001",
        "--created-at", iso(t0 + timedelta(seconds=1)) or "", *at(timedelta(seconds=2)),
    )  # fmt: skip
    assert paid["processing"] == "processed"
    starter = ledger.plan("starter").credits
    assert ledger.balance(UUID(user)).balance_credits == starter
    for event, day, expected in (
        ("subscription_paused", 3, "paused"),
        ("subscription_unpaused", 6, "active"),
        ("subscription_cancelled", 9, "cancelled"),
        ("subscription_resumed", 12, "active"),
        ("subscription_updated", 13, "active"),
    ):
        (answer,) = trigger(served, event, "--user", user, *plan, *at(timedelta(days=day)))
        assert answer["processing"] == "processed", answer
        assert status() == expected, event
    (pack,) = trigger(served, "order_created", "--user", user, "--pack", "9001", "--order-id", "6660001")
    assert pack["processing"] == "processed"
    assert ledger.balance(UUID(user)).balance_credits == starter + 1_000
    (refund,) = trigger(served, "order_refunded", "--user", user, "--pack", "9001", "--order-id", "6660001")
    assert refund["processing"] == "processed"
    assert ledger.balance(UUID(user)).balance_credits == starter
    (again,) = trigger(
        served, "subscription_payment_refunded", "--user", user, *plan, "--invoice-id", "5550001",
        "--created-at", iso(t0 + timedelta(seconds=1)) or "", *at(timedelta(days=14)),
    )  # fmt: skip
    assert again["processing"] == "processed"
    assert ledger.balance(UUID(user)).balance_credits == 0
    (expired,) = trigger(served, "subscription_expired", "--user", user, *plan, *at(timedelta(days=40)))
    assert expired["processing"] == "processed"
    assert str(ledger.read_aggregate(_subscription_id(ledger, UUID(user))).status) == "expired"
    assert ledger.subscription_of(UUID(user)) is None  # expired: the user's slot is free
    assert served.adapter.inbox.counts() == {"processed": 11}


def test_print_shows_each_request_and_sends_nothing(served: Served) -> None:
    result = CliRunner().invoke(
        cli,
        ["webhooks", "trigger", "subscription_created", "--user", str(uuid4()), "--variant", "1001", "--print",
         "--secret", SECRET],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    head, _, rest = result.output.partition("\n\n")
    body = rest.strip().encode()
    lines = head.splitlines()
    assert lines[0] == "POST -" and "X-Event-Name: subscription_created" in lines
    signature = next(line.split(": ", 1)[1] for line in lines if line.startswith("X-Signature"))
    assert verify(body, signature, SECRET)
    assert json.loads(body)["data"]["attributes"]["variant_id"] == 1001
    assert served.adapter.inbox.counts() == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give one EVENT, or --story"),
        (["subscription_created", "--story"], "drop EVENT"),
        (["license_key_created"], "not an event the adapter handles"),
        (["order_created", "--variant", "1001"], "--url and --secret"),
        (["order_created", "--variant", "x1", "--print"], "positive integer"),
        (["order_created", "--variant", "1001", "--print", "--at", "2030-01-01T00:00:00"], "no time zone"),
    ],
)
def test_bad_invocations_say_what_is_wrong(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["webhooks", "trigger", "--user", str(uuid4()), *args], env={})
    assert result.exit_code == 2 and message in result.output, result.output


def test_without_a_ledger_to_read_the_variants_from_it_says_which_options_to_give(tmp_path: Path) -> None:
    missing = f"sqlite:///{tmp_path / 'none.sqlite3'}"
    result = CliRunner().invoke(
        cli,
        ["webhooks", "trigger", "subscription_created", "--user", str(uuid4()), "--print", "--ledger-url", missing],
        env={},
    )
    assert result.exit_code == 1, result.output
    assert "cannot read the plan catalog" in result.output
    assert "--ledger-url" in result.output and "--variant and --price-cents" in result.output
    assert not (tmp_path / "none.sqlite3").exists()  # nothing was created


def test_the_templates_ship_with_the_package() -> None:
    for kind, resource in (("subscription", "subscriptions"), ("subscription_invoice", "subscription-invoices"),
                           ("order", "orders")):  # fmt: skip
        assert template(kind)["data"]["type"] == resource


def test_a_variant_without_a_price_of_its_own_is_refused_for_a_story() -> None:
    simulator = Simulator(uuid4())
    plan = Variant(1001, "starter", MONTHLY, 2500)
    with pytest.raises(Exception, match="dearer plan"):
        simulator.story(START, plan, plan)


# ------------------------------------------------------------------ helpers


def _subscription_id(ledger: Ledger, user: UUID) -> UUID:
    """The ledger's id of the user's subscription: the simulator derives its Lemon Squeezy id from the user."""
    from adapters.lemonsqueezy._state import ledger_subscription_id

    return ledger_subscription_id(str(Simulator(user).subscription_id))


def _credit_moves(ledger: Ledger, user: UUID) -> list[tuple[str, int]]:
    store = ledger.views.store
    columns = store.columns("credit_transactions")
    rows = [dict(zip(columns, r, strict=True)) for r in store.rows("credit_transactions", "log_position")]
    return [
        (str(r["type"]), int(r["amount"])) for r in rows if str(r["user_id"]) == str(user) and r["type"] != "expiration"
    ]


def _history(ledger: Ledger, user: UUID) -> list[tuple[str, Any]]:
    store = ledger.views.store
    columns = store.columns("subscription_history")
    rows = [dict(zip(columns, r, strict=True)) for r in store.rows("subscription_history", "changed_at, id")]
    sid = str(_subscription_id(ledger, user))
    return [(str(r["change_type"]), r["changed_at"]) for r in rows if str(r["subscription_id"]) == sid]
