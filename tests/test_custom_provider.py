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
)
from ledger import MAX_CREDITS, CreditKind, InvalidArgument, Ledger, Receipt, UnknownAccount
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
