"""Shared pieces of the Lemon Squeezy tests: PHP-encoded bodies built from the
fixtures in ``tests/fixtures/lemonsqueezy/``, one customer's whole story, a
clock the tests can set, and the normalised state the story compares."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid5

import psycopg
import pytest

from adapters.lemonsqueezy import LemonSqueezy, sign
from ledger import DEFAULT_CATALOG, CreditPolicy, Ledger
from ledger.domain.subscriptions import Subscription
from tests.conftest import pg_base_url, require_postgres

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "lemonsqueezy"
SECRET = "whsec_pingvas_test_4f2a9c"
USER = UUID("6f1c2b9e-4d3a-4b8e-9c71-2a5e8f0d1c33")
SUBSCRIPTION = "880001"
CUSTOMER = 770001
#: plan -> (monthly variant, yearly variant)
VARIANTS = {"starter": ("1001", "1002"), "pro": ("2001", "2002"), "studio": ("3001", "3002")}
PACKS = {"9001": 1000, "9002": 5000}
WEBHOOK_NS = UUID("7d1f0c52-2f6e-4d1e-9b1a-3c0e5a9d2b77")

START = datetime(2030, 1, 5, 10, 0, 0, tzinfo=UTC)
R1 = datetime(2030, 2, 5, 10, 0, 0, tzinfo=UTC)
PLAN_CHANGE = datetime(2030, 2, 15, 12, 0, 0, tzinfo=UTC)
PACK_AT = datetime(2030, 2, 17, 9, 0, 0, tzinfo=UTC)
R2 = datetime(2030, 3, 5, 10, 0, 0, tzinfo=UTC)
R3 = datetime(2030, 4, 5, 10, 0, 0, tzinfo=UTC)
R4 = datetime(2030, 5, 5, 10, 0, 0, tzinfo=UTC)
#: After the story: every subscription credit has lapsed by then.
END = datetime(2030, 5, 6, 0, 0, 0, tzinfo=UTC)
#: A time before the story: nothing has lapsed yet, every invoice is young.
BEFORE = START - timedelta(hours=1)


#: Makes a fresh, empty store of one backend each time it is called.
Stores = Callable[[], str]


def store_factory(backend: str, tmp_path_factory: pytest.TempPathFactory, prefix: str) -> Iterator[Stores]:
    """Yields a factory of fresh, empty stores of ``backend`` (memory,
    sqlite or postgres), named with ``prefix``; drops the PostgreSQL schemas
    it made afterwards. For the fixtures whose runs and baselines each get
    a store."""
    schemas: list[str] = []

    def new() -> str:
        if backend == "memory":
            return "memory://"
        if backend == "sqlite":
            return f"sqlite:///{tmp_path_factory.mktemp(prefix) / 'ledger.sqlite3'}"
        require_postgres()
        schemas.append(f"test_{prefix}_{uuid.uuid4().hex[:12]}")
        base = pg_base_url()
        return f"{base}{'&' if '?' in base else '?'}schema={schemas[-1]}"

    yield new
    if schemas:
        with psycopg.connect(pg_base_url(), autocommit=True) as conn:
            for schema in schemas:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def php_json(value: Any) -> bytes:
    """JSON as PHP's json_encode writes it: compact, \\uXXXX for non-ASCII, \\/ for /."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).replace("/", "\\/").encode()


def template(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_bytes())
    return loaded


def headers_for(body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Signature": sign(body, secret)}


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%S.000000Z")


class StoryClock:
    """A clock the test sets to any moment, backwards too."""

    def __init__(self, now: datetime) -> None:
        self.moment = now

    def now(self) -> datetime:
        return self.moment

    def set(self, moment: datetime) -> None:
        self.moment = moment


def open_ledger(url: str, clock: Any, **kwargs: Any) -> Ledger:
    """A ledger as the adapter needs it, with the catalog's Lemon Squeezy variants."""
    ledger = Ledger(
        url, clock=clock, credit_policy=kwargs.pop("credit_policy", CreditPolicy(auto_renew=False)), **kwargs
    )
    for terms in DEFAULT_CATALOG:
        monthly, yearly = VARIANTS.get(terms.name, (None, None))
        ledger.define_plan(
            replace(terms, lemon_squeezy_variant_id_monthly=monthly, lemon_squeezy_variant_id_yearly=yearly)
        )
    return ledger


def adapter_for(ledger: Ledger, **kwargs: Any) -> LemonSqueezy:
    return LemonSqueezy(ledger, signing_secret=SECRET, credit_packs=kwargs.pop("credit_packs", PACKS), **kwargs)


# --------------------------------------------------------------------- bodies


@dataclass(frozen=True)
class Delivery:
    """One webhook request: when it is sent, and its exact bytes."""

    at: datetime
    name: str
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.body)
        return loaded

    def resent(self, salt: str) -> Delivery:
        """The same event under a new webhook id, as a dashboard resend sends it."""
        payload = self.payload
        payload["meta"]["webhook_id"] = str(uuid5(WEBHOOK_NS, f"{salt}:{payload['meta']['webhook_id']}"))
        return replace(self, body=php_json(payload))


@dataclass
class Builder:
    """Bodies shaped like the fixtures, with the fields the story varies."""

    user: UUID | None = USER
    subscription: str = SUBSCRIPTION
    customer: int = CUSTOMER
    test_mode: bool = False
    #: Added to order and invoice ids: several customers' stories side by side.
    offset: int = 0
    counter: list[int] = field(default_factory=lambda: [0])

    def oid(self, base: str) -> str:
        return str(int(base) + self.offset)

    def _meta(self, event: str, payload: dict[str, Any]) -> None:
        self.counter[0] += 1
        meta = payload["meta"]
        meta["event_name"] = event
        meta["test_mode"] = self.test_mode
        meta["webhook_id"] = str(uuid5(WEBHOOK_NS, f"{event}:{self.subscription}:{self.counter[0]}"))
        if self.user is None:
            meta.pop("custom_data", None)
        else:
            meta["custom_data"] = {"user_id": str(self.user)}

    def subscription_event(
        self,
        event: str,
        *,
        updated: datetime,
        status: str = "active",
        variant: str = "1001",
        renews_at: datetime | None,
        ends_at: datetime | None = None,
        cancelled: bool = False,
        pause: dict[str, Any] | None = None,
        trial_ends_at: datetime | None = None,
        created: datetime = START,
    ) -> bytes:
        payload = copy.deepcopy(template("subscription_created"))
        self._meta(event, payload)
        data = payload["data"]
        data["id"] = self.subscription
        a = data["attributes"]
        a.update(
            customer_id=self.customer,
            variant_id=int(variant),
            status=status,
            status_formatted=status.replace("_", " ").title(),
            cancelled=cancelled,
            pause=pause,
            trial_ends_at=iso(trial_ends_at),
            renews_at=iso(renews_at),
            ends_at=iso(ends_at),
            created_at=iso(created),
            updated_at=iso(updated),
            test_mode=self.test_mode,
        )
        a["first_subscription_item"]["subscription_id"] = int(self.subscription)
        return php_json(payload)

    def invoice_event(
        self,
        event: str,
        invoice_id: str,
        *,
        reason: str,
        status: str,
        created: datetime,
        updated: datetime,
        total: int,
        refunded_amount: int = 0,
        refunded: bool = False,
    ) -> bytes:
        payload = copy.deepcopy(template("subscription_payment_success"))
        self._meta(event, payload)
        data = payload["data"]
        data["id"] = invoice_id
        data["attributes"].update(
            subscription_id=int(self.subscription),
            customer_id=self.customer,
            billing_reason=reason,
            status=status,
            status_formatted=status.replace("_", " ").title(),
            total=total,
            subtotal=total,
            total_usd=total,
            refunded=refunded,
            refunded_amount=refunded_amount,
            refunded_amount_usd=refunded_amount,
            created_at=iso(created),
            updated_at=iso(updated),
            test_mode=self.test_mode,
        )
        return php_json(payload)

    def initial_invoice_event(self) -> bytes:
        """The subscription's first invoice, paid a second after START (Starter's 25.00)."""
        second = timedelta(seconds=1)
        return self.invoice_event(
            "subscription_payment_success",
            "550001",
            reason="initial",
            status="paid",
            created=START + second,
            updated=START + 2 * second,
            total=2500,
        )

    def order_event(
        self,
        event: str,
        order_id: str,
        *,
        variant: str,
        total: int,
        at: datetime,
        status: str = "paid",
        refunded_amount: int = 0,
        refunded: bool = False,
        updated: datetime | None = None,
        quantity: int = 1,
    ) -> bytes:
        payload = copy.deepcopy(template("order_created"))
        self._meta(event, payload)
        data = payload["data"]
        data["id"] = order_id
        a = data["attributes"]
        a.update(
            customer_id=self.customer,
            status=status,
            total=total,
            subtotal=total,
            refunded=refunded,
            refunded_amount=refunded_amount,
            created_at=iso(at),
            updated_at=iso(updated or at),
            test_mode=self.test_mode,
        )
        a["first_order_item"].update(variant_id=int(variant), order_id=int(order_id), quantity=quantity)
        return php_json(payload)


def story(builder: Builder | None = None) -> list[Delivery]:
    """One customer's whole story, in the order Lemon Squeezy sends it."""
    b = builder or Builder()
    s = 1  # seconds
    sec = timedelta(seconds=s)
    out: list[Delivery] = []

    def add(at: datetime, name: str, body: bytes) -> None:
        out.append(Delivery(at, name, body))

    def snap(event: str, updated: datetime, **kw: Any) -> bytes:
        return b.subscription_event(event, updated=updated, **kw)

    may, apr, mar = datetime(2030, 5, 5, 10, tzinfo=UTC), R3, R2
    # Checkout: the subscription's order (no credits), the subscription, its first invoice.
    add(
        START + sec,
        "order_created",
        b.order_event("order_created", b.oid("660001"), variant="1001", total=2500, at=START),
    )
    add(START + 2 * sec, "subscription_created", snap("subscription_created", START, renews_at=R1))
    add(
        START + 3 * sec,
        "subscription_payment_success",
        b.invoice_event(
            "subscription_payment_success",
            b.oid("550001"),
            reason="initial",
            status="paid",
            created=START + sec,
            updated=START + 2 * sec,
            total=2500,
        ),
    )
    add(START + 5 * sec, "subscription_updated", snap("subscription_updated", START + 4 * sec, renews_at=R1))
    # First renewal.
    add(
        R1 + 2 * sec,
        "subscription_payment_success",
        b.invoice_event(
            "subscription_payment_success",
            b.oid("550002"),
            reason="renewal",
            status="paid",
            created=R1,
            updated=R1 + sec,
            total=2500,
        ),
    )
    add(R1 + 4 * sec, "subscription_updated", snap("subscription_updated", R1 + 3 * sec, renews_at=mar))
    # Upgrade to Pro with a proration invoice (Lemon Squeezy sends subscription_plan_changed and
    # subscription_updated with the same snapshot).
    p = PLAN_CHANGE
    add(p + sec, "subscription_plan_changed", snap("subscription_plan_changed", p, variant="2001", renews_at=mar))
    add(p + sec, "subscription_updated", snap("subscription_updated", p, variant="2001", renews_at=mar))
    add(
        p + 3 * sec,
        "subscription_payment_success",
        b.invoice_event(
            "subscription_payment_success",
            b.oid("550003"),
            reason="updated",
            status="paid",
            created=p + sec,
            updated=p + 2 * sec,
            total=3226,
        ),
    )
    add(p + 5 * sec, "subscription_updated", snap("subscription_updated", p + 4 * sec, variant="2001", renews_at=mar))
    # A credit pack bought and refunded, and one kept.
    add(
        PACK_AT,
        "order_created",
        b.order_event("order_created", b.oid("660002"), variant="9001", total=1000, at=PACK_AT),
    )
    refunded_at = PACK_AT + timedelta(days=1)
    add(
        refunded_at,
        "order_refunded",
        b.order_event(
            "order_refunded",
            b.oid("660002"),
            variant="9001",
            total=1000,
            at=PACK_AT,
            status="refunded",
            refunded_amount=1000,
            refunded=True,
            updated=refunded_at,
        ),
    )
    kept = PACK_AT + timedelta(days=2)
    add(kept, "order_created", b.order_event("order_created", b.oid("660003"), variant="9002", total=4000, at=kept))
    # A failed renewal, past_due, then recovered by a retry of the charge.
    add(
        R2 + 2 * sec,
        "subscription_payment_failed",
        b.invoice_event(
            "subscription_payment_failed",
            b.oid("550004"),
            reason="renewal",
            status="pending",
            created=R2,
            updated=R2 + sec,
            total=7500,
        ),
    )
    add(
        R2 + 4 * sec,
        "subscription_updated",
        snap("subscription_updated", R2 + 3 * sec, status="past_due", variant="2001", renews_at=mar),
    )
    recovered = R2 + timedelta(days=3)
    add(
        recovered,
        "subscription_payment_recovered",
        b.invoice_event(
            "subscription_payment_recovered",
            b.oid("550004"),
            reason="renewal",
            status="paid",
            created=R2,
            updated=recovered - sec,
            total=7500,
        ),
    )
    add(
        recovered + 2 * sec,
        "subscription_updated",
        snap("subscription_updated", recovered + sec, variant="2001", renews_at=apr),
    )
    # Second renewal.
    add(
        R3 + 2 * sec,
        "subscription_payment_success",
        b.invoice_event(
            "subscription_payment_success",
            b.oid("550005"),
            reason="renewal",
            status="paid",
            created=R3,
            updated=R3 + sec,
            total=7500,
        ),
    )
    add(R3 + 4 * sec, "subscription_updated", snap("subscription_updated", R3 + 3 * sec, variant="2001", renews_at=may))
    # Pause, unpause, cancel, resume, cancel again, expiry.
    day = timedelta(days=1)
    void = {"mode": "void", "resumes_at": None}
    add(
        R3 + 5 * day,
        "subscription_paused",
        snap("subscription_paused", R3 + 5 * day, status="paused", variant="2001", renews_at=may, pause=void),
    )
    add(
        R3 + 8 * day,
        "subscription_unpaused",
        snap("subscription_unpaused", R3 + 8 * day, variant="2001", renews_at=may),
    )
    for event in ("subscription_cancelled", "subscription_updated"):
        add(
            R3 + 10 * day,
            event,
            snap(event, R3 + 10 * day, status="cancelled", variant="2001", renews_at=may, ends_at=may, cancelled=True),
        )
    add(
        R3 + 12 * day,
        "subscription_resumed",
        snap("subscription_resumed", R3 + 12 * day, variant="2001", renews_at=may),
    )
    add(
        R3 + 15 * day,
        "subscription_cancelled",
        snap(
            "subscription_cancelled",
            R3 + 15 * day,
            status="cancelled",
            variant="2001",
            renews_at=may,
            ends_at=may,
            cancelled=True,
        ),
    )
    add(
        may + sec,
        "subscription_expired",
        snap(
            "subscription_expired", may, status="expired", variant="2001", renews_at=None, ends_at=may, cancelled=True
        ),
    )
    return out


# -------------------------------------------------------------- the state


def history_in_order(ledger: Ledger, subscription_id: UUID) -> list[tuple[Any, ...]]:
    """subscription_history rows of a subscription, whole (ids and times
    included), in the order of their times. A subscription Lemon Squeezy
    drives gets its rows from the snapshots' own times, so they do not depend
    on when, or in what order, the snapshots were processed."""
    store = ledger.views.store
    columns = store.columns("subscription_history")
    ordered = []
    for r in store.rows("subscription_history", "changed_at, id"):
        if str(r[columns.index("subscription_id")]) != str(subscription_id):
            continue
        details = r[columns.index("details")]
        details = json.loads(details) if isinstance(details, str) else details
        ordered.append(
            (
                str(r[columns.index("changed_at")]),
                r[columns.index("change_type")],
                r[columns.index("from_plan_id")],
                r[columns.index("to_plan_id")],
                json.dumps(details, sort_keys=True),
                str(r[columns.index("id")]),
            )
        )
    return ordered


def table(ledger: Ledger, name: str, order_by: str, skip: tuple[str, ...]) -> list[tuple[Any, ...]]:
    store = ledger.views.store
    columns = store.columns(name)
    keep = [i for i, c in enumerate(columns) if c not in skip]
    return sorted(tuple(row[i] for i in keep) for row in store.rows(name, order_by))


def view_tables(ledger: Ledger) -> dict[str, list[tuple[Any, ...]]]:
    """The billing read models' rows, without what depends on when the ledger ran (ids, times, positions)."""
    return {
        "subscriptions": table(ledger, "subscriptions", "id", ("created_at", "updated_at")),
        "snapshots": table(ledger, "subscription_snapshots", "subscription_id", ()),
        "credit_transactions": table(
            ledger, "credit_transactions", "log_position", ("id", "balance_after", "created_at", "log_position")
        ),
        "credit_balances": table(ledger, "credit_balances", "user_id", ("updated_at",)),
    }


def refunds_summed(found: dict[str, Any]) -> dict[str, Any]:
    """A refund seen in steps is one clawback per step seen (a larger one
    first makes the smaller add nothing): only the total per payment is
    order-independent (docs/lemonsqueezy.md, *Order, duplicates, failures*)."""
    found = dict(found)
    refunds: dict[tuple[Any, ...], int] = {}
    movements = []
    for row in found.pop("credit_transactions"):
        if row[2] == "refund":  # user, amount, kind, description, ..., reference type, reference id, key
            refunds[row[5:7]] = refunds.get(row[5:7], 0) + row[1]
        else:
            movements.append(row)
    found["credit_transactions"] = sorted(movements)
    found["refunds"] = refunds
    return found


def final_state(ledger: Ledger, user: UUID = USER) -> dict[str, Any]:
    """What must be identical however the deliveries arrived: the subscription
    as Lemon Squeezy's snapshots describe it (its cancel, pause and end times
    the provider's), every snapshot kept, every credit movement (ids of
    expirations, running balances and times depend on when the ledger ran),
    and the balance."""
    ledger.tick(END, allow_future=True)  # the story ends ahead of its clock
    ledger.views.catch_up()
    sid = next(iter(_subscriptions(ledger)))
    balance = ledger.balance(user)
    return {
        **view_tables(ledger),
        "balance": (balance.balance_credits, balance.held_credits, balance.available_credits),
        "blocks": sorted((b.kind, b.granted_credits, b.remaining_credits, b.expires_at) for b in balance.blocks),
        "history_changes": history_in_order(ledger, sid),
    }


def _subscriptions(ledger: Ledger) -> Iterator[UUID]:
    for notification in ledger.app.recorder.select_notifications(
        start=1, limit=10_000, topics=[Subscription.Started.TOPIC]
    ):
        originator = notification.originator_id
        yield originator if isinstance(originator, UUID) else UUID(str(originator))


def is_subsequence(short: list[Any], long: list[Any]) -> bool:
    remaining = iter(long)
    return all(any(item == other for other in remaining) for item in short)
