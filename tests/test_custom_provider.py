"""A payment provider written outside the package, through the public seams
only: ``ledger``, ``ledger.extension`` and ``adapters.webhooks``.

"Acme" signs its bodies with an HMAC-SHA256 in ``Acme-Signature`` and sends
two events: ``order.paid`` grants credits, ``order.refunded`` takes them
back, and a refund that arrives before its payment is held until the payment
is applied. Its commands are its own ``Command`` subclasses. The kit stores
each delivery once, recognises redeliveries, applies each once, refuses a bad
signature with nothing stored, releases held deliveries and serves the ASGI
endpoint; on every backend. No file under ``ledger/`` knows of Acme.
"""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar
from uuid import UUID, uuid4

import anyio
import httpx
import pytest

from adapters.webhooks import (
    Event,
    Execute,
    Held,
    InboxRow,
    Malformed,
    Outcome,
    Pipeline,
    Provider,
    WebhookApp,
    header,
    sealed_bytes,
)
from ledger import (
    MAX_CREDITS,
    ConfigurationError,
    CreditKind,
    InvalidArgument,
    Ledger,
    ManualClock,
    Receipt,
    UnknownAccount,
)
from ledger.extension import Command, UnitOfWork, check_key, check_user_id, entry_id_for

SECRET = b"acme-webhook-secret"
SIGNATURE_HEADER = "Acme-Signature"


# ---------------------------------------------------------------- the provider


def paid_key(order: str) -> str:
    return f"acme:order:{order}:paid"


@dataclass(frozen=True)
class AcmeGrant(Command):
    """Grants an Acme order's credits."""

    name: ClassVar[str] = "acme_grant"
    user_id: UUID = field(kw_only=True)
    credits: int = field(kw_only=True)
    order: str = field(kw_only=True)

    def __post_init__(self) -> None:
        check_key(self.key)
        check_user_id(self.user_id)
        if type(self.credits) is not int or not 1 <= self.credits <= MAX_CREDITS:
            raise InvalidArgument(f"an Acme order grants 1..{MAX_CREDITS} credits, got {self.credits!r}")

    def apply(self, unit: UnitOfWork) -> Receipt:
        account = unit.account(self.user_id, open_missing=True)
        entry_id = entry_id_for(self.key)
        account.grant(
            entry_id=entry_id,
            amount=self.credits,
            kind=CreditKind.PURCHASE,
            description=f"Acme order {self.order}",
            reference_type="acme_order",
            reference_id=self.order,
            expires_at=None,
            actor=None,
            key=self.key,
            now=unit.now,
        )
        return unit.done(self, account, amount=self.credits, entry_id=entry_id)


@dataclass(frozen=True)
class AcmeRefund(Command):
    """Takes back what an Acme order granted; held until the order's payment is applied."""

    name: ClassVar[str] = "acme_refund"
    user_id: UUID = field(kw_only=True)
    credits: int = field(kw_only=True)
    order: str = field(kw_only=True)

    def apply(self, unit: UnitOfWork) -> Receipt:
        if not unit.recorded(paid_key(self.order)):
            raise Held(f"order {self.order}", "its payment was not applied yet")
        taken = unit.claw_back_once(
            self.user_id,
            self.credits,
            key=f"{self.key}:claw",
            block_id=str(entry_id_for(paid_key(self.order))),
            from_other_credits=False,
            reference_type="acme_order",
            reference_id=self.order,
            description=f"Acme order {self.order} refunded",
        )
        return unit.finish(self, self.user_id, amount=-taken)


@dataclass(frozen=True)
class AcmeOrder:
    user: UUID
    credits: int
    order: str


class Acme:
    """The whole provider: what ``adapters.webhooks.Provider`` asks for."""

    source = "acme"
    title = "Acme"
    max_body_bytes = 4096

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    def verify(self, raw_body: bytes, headers: Mapping[str, str]) -> str | None:
        signature = header(headers, SIGNATURE_HEADER)
        if signature is None:
            return f"no {SIGNATURE_HEADER} header"
        expected = hmac.new(self.secret, raw_body, hashlib.sha256).hexdigest()
        return None if hmac.compare_digest(signature, expected) else f"{SIGNATURE_HEADER} does not match the body"

    def parse(self, raw_body: bytes) -> Event:
        try:
            payload = json.loads(raw_body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Malformed(f"not JSON: {exc}") from None
        return self.load(payload)

    def load(self, payload: Any) -> Event:
        try:
            data = payload["data"]
            order = AcmeOrder(UUID(data["user"]), int(data["credits"]), str(data["order"]))
            return Event(str(payload["type"]), str(payload["id"]), not payload["live"], payload, order)
        except (KeyError, TypeError, ValueError) as exc:
            raise Malformed(f"not an Acme event: {type(exc).__name__}: {exc}") from None

    def apply(self, event: Event, execute: Execute) -> Outcome:
        order: AcmeOrder = event.parsed
        if event.name == "order.paid":
            receipt = execute(
                AcmeGrant(key=paid_key(order.order), user_id=order.user, credits=order.credits, order=order.order)
            )
            releases: tuple[str, ...] = (f"order {order.order}",)
        elif event.name == "order.refunded":
            receipt = execute(
                AcmeRefund(
                    key=f"acme:order:{order.order}:refunded",
                    user_id=order.user,
                    credits=order.credits,
                    order=order.order,
                )
            )
            releases = ()
        else:
            return Outcome("processed", f"{event.name} is not used by the ledger")
        return Outcome(
            "processed",
            "applied before; nothing changed" if receipt.replayed else None,
            releases,
            committed=not receipt.replayed,
            applied=not receipt.replayed,
            replayed=receipt.replayed,
            user_id=receipt.user_id,
        )

    def order(self, row: InboxRow) -> str:
        created = row.payload.get("created")
        return created if isinstance(created, str) else ""

    def seal(self, data: bytes) -> str | None:
        return hmac.new(self.secret, data, hashlib.sha256).hexdigest()


# --------------------------------------------------------------------- helpers


def body(kind: str, user: UUID, *, order: str = "7", credits: int = 40, event_id: str | None = None) -> bytes:
    payload = {
        "id": event_id or uuid4().hex,
        "type": kind,
        "live": True,
        "created": "2026-01-01T00:00:00Z",
        "data": {"user": str(user), "credits": credits, "order": order},
    }
    return json.dumps(payload).encode()


def signed(raw: bytes, secret: bytes = SECRET) -> dict[str, str]:
    return {SIGNATURE_HEADER.lower(): hmac.new(secret, raw, hashlib.sha256).hexdigest()}


def pipeline(ledger: Ledger) -> Pipeline:
    provider: Provider = Acme(SECRET)  # type-checked against the protocol
    return Pipeline(ledger, provider)


def available(ledger: Ledger, user: UUID) -> int:
    return ledger.balance(user).available_credits


# ----------------------------------------------------------------------- tests


def test_a_delivery_is_stored_once_and_applied_once(ledger: Ledger) -> None:
    acme, user = pipeline(ledger), uuid4()
    raw = body("order.paid", user, event_id="evt_1")

    first = acme.ingest(raw, signed(raw))
    assert (first.status, first.http_status, first.processing) == ("stored", 200, "processed")
    assert available(ledger, user) == 40

    again = acme.ingest(raw, signed(raw))  # the same body redelivered
    assert (again.status, again.http_status, again.event_row_id) == ("duplicate", 200, first.event_row_id)
    resent = body("order.paid", user, event_id="evt_1", credits=41)  # the same event id, another body
    assert acme.ingest(resent, signed(resent)).status == "duplicate"
    assert available(ledger, user) == 40

    # The same order in a new event: stored, and the command's key replays.
    other = body("order.paid", user, event_id="evt_2")
    replayed = acme.ingest(other, signed(other))
    assert (replayed.status, replayed.processing) == ("stored", "processed")
    assert "applied before" in replayed.reason
    assert available(ledger, user) == 40
    assert acme.inbox.counts() == {"processed": 2}
    row = acme.inbox.get(first.event_row_id) if first.event_row_id else None
    assert row is not None and (row.event_type, row.event_id, row.status) == ("order.paid", "evt_1", "processed")


def test_a_bad_signature_or_body_is_refused_and_nothing_is_stored(ledger: Ledger) -> None:
    acme, user = pipeline(ledger), uuid4()
    raw = body("order.paid", user)

    forged = acme.ingest(raw, signed(raw, b"someone-else"))
    assert (forged.status, forged.http_status) == ("rejected", 401)
    unsigned = acme.ingest(raw, {})
    assert (unsigned.http_status, unsigned.reason) == (401, "no Acme-Signature header")
    garbage = b'{"id": "x"'
    assert acme.ingest(garbage, signed(garbage)).http_status == 400
    huge = b" " * 5000
    assert acme.ingest(huge, signed(huge)).http_status == 413

    assert acme.inbox.counts() == {}
    with pytest.raises(UnknownAccount):  # nothing reached the ledger either
        ledger.balance(user)


def test_a_refund_before_its_payment_is_held_then_released(ledger: Ledger) -> None:
    acme, user = pipeline(ledger), uuid4()
    refund = body("order.refunded", user, order="9", credits=40)
    held = acme.ingest(refund, signed(refund))
    assert (held.status, held.processing) == ("stored", "held")
    assert acme.inbox.counts() == {"failed": 1}

    paid = body("order.paid", user, order="9", credits=40)
    assert acme.ingest(paid, signed(paid)).processing == "processed"
    # The payment released the refund: both applied, the credits taken back.
    assert acme.inbox.counts() == {"processed": 2}
    assert available(ledger, user) == 0
    assert acme.retry().attempted == 0


def test_test_mode_events_are_stored_and_not_applied(ledger: Ledger) -> None:
    acme, user = pipeline(ledger), uuid4()
    payload = json.loads(body("order.paid", user))
    payload["live"] = False
    raw = json.dumps(payload).encode()
    result = acme.ingest(raw, signed(raw))
    assert (result.status, result.processing) == ("stored", "ignored")
    assert acme.inbox.counts() == {"received": 1}


def test_the_asgi_endpoint_serves_the_provider(ledger: Ledger) -> None:
    app, user = WebhookApp(pipeline(ledger)), uuid4()
    raw = body("order.paid", user)

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://acme.test") as client:
            return [
                await client.post("/webhooks/acme", content=raw, headers=signed(raw)),
                await client.post("/webhooks/acme", content=raw, headers=signed(raw)),
                await client.post("/webhooks/acme", content=raw, headers=signed(raw, b"forged")),
                await client.get("/webhooks/acme"),
            ]

    stored, duplicate, forged, get = anyio.run(run)
    assert (stored.status_code, stored.json()["status"], stored.json()["processing"]) == (200, "stored", "processed")
    assert (duplicate.status_code, duplicate.json()["status"]) == (200, "duplicate")
    assert (forged.status_code, forged.json()["status"]) == (401, "rejected")
    assert get.status_code == 405
    assert available(ledger, user) == 40


def test_the_provider_needs_no_change_under_ledger() -> None:
    """This file imports only the public seams, and the core names no Acme."""
    allowed = {"ledger", "ledger.extension", "adapters.webhooks"}
    tree = ast.parse(Path(__file__).read_text())
    imported = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("ledger", "adapters")
    }
    imported |= {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name.split(".")[0] in ("ledger", "adapters")
    }
    assert imported <= allowed, imported - allowed
    core = Path(__file__).resolve().parent.parent / "ledger"
    naming = [
        p
        for p in core.rglob("*")
        if p.is_file() and p.suffix in (".py", ".sql", ".toml") and b"acme" in p.read_bytes().lower()
    ]
    assert naming == []


# ------------------------------------------------------- rows written by hand


def write_row(acme: Pipeline, raw: bytes, *, status: str, seal: str | None) -> UUID:
    """A row as whoever can write webhook_events can put there, bypassing the
    signature check."""
    event = acme.provider.parse(raw)
    now = acme.ledger.clock.now()
    stored = acme.inbox.put(
        event_type=event.name,
        event_id=event.event_id,
        payload=event.payload,
        payload_sha256=hashlib.sha256(raw).hexdigest(),
        test_mode=event.test_mode,
        now=now,
        payload_text=raw.decode(),
        seal=seal,
    )
    if status == "failed":
        acme.inbox.finish(stored.row_id, status="failed", message="boom", now=now)
    return stored.row_id


def test_a_row_written_by_hand_is_refused_and_never_applied(ledger: Ledger, clock: ManualClock) -> None:
    acme, user = pipeline(ledger), uuid4()
    genuine = body("order.paid", user, order="1", credits=5)
    seal = acme.ingest(genuine, signed(genuine)).event_row_id
    genuine_seal = acme.inbox.get(seal).seal if seal else None
    assert genuine_seal is not None

    unsealed = write_row(acme, body("order.paid", user, order="2", credits=1000), status="failed", seal=None)
    wrong = write_row(acme, body("order.paid", user, order="3", credits=1000), status="received", seal="0" * 64)
    # A genuine row's seal on another payload.
    copied = write_row(acme, body("order.paid", user, order="4", credits=1000), status="failed", seal=genuine_seal)
    clock.advance(timedelta(hours=1))  # the received row is stale: retry takes it

    report = acme.retry()
    assert (report.attempted, report.processed, report.failed) == (3, 0, 3)
    assert available(ledger, user) == 5
    for row_id, why in [(unsealed, "no seal"), (wrong, "does not match"), (copied, "does not match")]:
        row = acme.inbox.get(row_id)
        assert row is not None and row.status == "failed"
        assert row.error_message is not None and row.error_message.startswith("refused: ") and why in row.error_message

    # Rows stored before seals are applied only when asked, with a warning;
    # a wrong seal never is.
    assert acme.retry(unsealed=True).processed == 1
    assert available(ledger, user) == 1005
    assert acme.inbox.counts() == {"failed": 2, "processed": 2}


def test_a_held_row_written_by_hand_is_not_released(ledger: Ledger) -> None:
    acme, user = pipeline(ledger), uuid4()
    forged = write_row(acme, body("order.paid", user, order="8", credits=900), status="failed", seal=None)
    with acme.inbox._transaction() as t:  # held for a payment that will arrive
        t.tx.execute(f"UPDATE {t.table} SET error_message = %s WHERE id = %s", ["held: order 5: forged", forged])
    acme.group.execute(AcmeGrant(key="seed", user_id=user, credits=1, order="0"))
    paid = body("order.paid", user, order="5", credits=40)
    assert acme.ingest(paid, signed(paid)).processing == "processed"
    row = acme.inbox.get(forged)
    assert row is not None and row.status == "failed" and (row.error_message or "").startswith("refused: ")
    assert available(ledger, user) == 41


def test_a_genuine_failed_delivery_is_retried_and_applied(ledger: Ledger) -> None:
    acme, user = pipeline(ledger), uuid4()
    # Spacing, key order and numbers as a sender may spell them: jsonb keeps
    # none of them (1e2 comes back as 100), and the seal still checks.
    raw = (
        '{"type": "order.refunded",  "id": "evt_r", "live": true, "created": "2026-01-01T00:00:00Z", '
        f'"extra": {{"n": 1e2, "f": 1.10, "z": -0.0, "big": 12345678901234567890, "s": "\u00e9\u2603", '
        '"past_doubles": [1e23, 5.780915466609458e+16, 1.5e300, 12345678901234567890.0]}, '
        f'"data": {{"user": "{user}", "credits": 40, "order": "6"}}}}'
    ).encode()
    assert acme.ingest(raw, signed(raw)).processing == "held"
    acme.group.execute(AcmeGrant(key=paid_key("6"), user_id=user, credits=40, order="6"))
    assert available(ledger, user) == 40

    report = acme.retry()
    assert (report.attempted, report.processed) == (1, 1)
    assert available(ledger, user) == 0


def test_sealed_bytes_do_not_depend_on_how_a_number_or_key_order_is_spelled() -> None:
    one = sealed_bytes("acme", json.loads('{"b": 1e2, "a": [1.10, -0.0, "x"]}'))
    assert one == sealed_bytes("acme", {"a": [1.1, 0, "x"], "b": 100})
    assert one != sealed_bytes("other", {"a": [1.1, 0, "x"], "b": 100})
    assert one != sealed_bytes("acme", {"a": [1.1, 0, "x"], "b": 101})
    # Past 2**53 the body's 1e23 decodes to the nearest double, and jsonb
    # gives back the digits the body spelled: one number to the seal.
    assert sealed_bytes("acme", json.loads('{"n": 1e23}')) == sealed_bytes("acme", {"n": 10**23})
    assert sealed_bytes("acme", {"n": 10**23}) != sealed_bytes("acme", {"n": 10**23 + 1})
    assert sealed_bytes("acme", {"n": 10**23}) != sealed_bytes("acme", {"n": "1E+23"})


def test_retry_needs_the_secret_and_a_provider_needs_a_seal(ledger: Ledger) -> None:
    class Keyless(Acme):
        def seal(self, data: bytes) -> str | None:
            return None

    with pytest.raises(ConfigurationError, match="signing secret"):
        Pipeline(ledger, Keyless(SECRET)).retry()

    class Unsealing(Acme):
        seal = None  # type: ignore[assignment]

    with pytest.raises(ConfigurationError, match="no seal"):
        Pipeline(ledger, Unsealing(SECRET))


def test_a_store_of_schema_version_3_gains_seals_and_its_unsealed_rows_wait_for_unsealed(durable_url: str) -> None:
    user, raw = uuid4(), body("order.paid", uuid4(), order="11", credits=30)
    payload = json.loads(raw)
    payload["data"]["user"] = str(user)
    with Ledger(durable_url) as ledger:
        store = ledger.views.store
        with store.transaction() as tx:  # back to version 3: no seal column
            tx.execute("ALTER TABLE webhook_events DROP COLUMN seal")
            tx.execute("DELETE FROM ledger_schema_version")
            tx.execute("INSERT INTO ledger_schema_version (version) VALUES (3)")
            tx.execute(
                "INSERT INTO webhook_events (id, source, event_type, event_id, payload, status, error_message, "
                "payload_sha256, test_mode, attempts, created_at) "
                "VALUES (%s, 'acme', 'order.paid', 'evt_old', %s, 'failed', 'boom', %s, FALSE, 1, %s)",
                [uuid4(), json.dumps(payload), "a" * 64, ledger.clock.now()],
            )
        assert "seal" not in store.columns("webhook_events")
    with Ledger(durable_url) as ledger:
        acme = pipeline(ledger)  # opens the views: the store is migrated
        assert "seal" in ledger.views.store.columns("webhook_events")
        with ledger.views.store.transaction() as tx:
            assert max(v for (v,) in tx.fetchall("SELECT version FROM ledger_schema_version")) >= 4
        assert acme.retry().processed == 0
        (row,) = acme.inbox.listing(status="failed", limit=5)
        assert row.seal is None and (row.error_message or "").startswith("refused: no seal")
        assert acme.retry(unsealed=True).processed == 1
        assert available(ledger, user) == 30
        # New deliveries are sealed and retried as before.
        fresh = body("order.paid", user, order="12", credits=5)
        stored = acme.ingest(fresh, signed(fresh))
        assert stored.event_row_id is not None and (acme.inbox.get(stored.event_row_id) or row).seal is not None
