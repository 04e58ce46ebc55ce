"""Receiving a delivery: signature, limits, storing once, and what is never stored."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.lemonsqueezy import LemonSqueezy, sign, verify
from adapters.lemonsqueezy._adapter import DEFAULT_STALE_AFTER_S
from adapters.lemonsqueezy._payloads import MAX_BODY_BYTES, MalformedBody, parse_json
from ledger import ConfigurationError, CreditPolicy, InvalidArgument, Ledger
from ledger.storage.eventstore import LedgerApplication
from tests.conftest import fresh_pg_schema
from tests.lemonsqueezy_support import (
    FIXTURES,
    PACKS,
    R1,
    SECRET,
    USER,
    Builder,
    StoryClock,
    adapter_for,
    headers_for,
    open_ledger,
    php_json,
    template,
)
from tests.lemonsqueezy_support import START as STORY_START

SEC = timedelta(seconds=1)


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    with open_ledger(ledger_url, StoryClock(STORY_START)) as opened:
        yield opened


@pytest.fixture
def adapter(ledger: Ledger) -> LemonSqueezy:
    return adapter_for(ledger)


def rows(adapter: LemonSqueezy) -> list[Any]:
    return adapter.inbox.listing(status=None, limit=10_000)


# ------------------------------------------------------------------ signature


def test_fixture_bodies_are_signed_over_their_exact_bytes() -> None:
    body = (FIXTURES / "subscription_created.json").read_bytes()
    assert b"https:\\/\\/api.lemonsqueezy.com" in body and b"\\u00eb" in body  # PHP's encoding, as sent
    signature = sign(body, SECRET)
    assert verify(body, signature, SECRET)
    assert verify(body, signature.upper(), SECRET)  # the same digest in uppercase hex
    reencoded = json.dumps(json.loads(body), separators=(",", ":")).encode()  # what a re-serialiser would send
    assert not verify(reencoded, signature, SECRET)
    assert not verify(body, signature, SECRET + "x")
    assert not verify(body, None, SECRET)
    assert not verify(body, "é" * 64, SECRET)
    assert not verify(body, signature[:-1], SECRET)


@pytest.mark.parametrize("secret", ["", None, "short", "x" * 41, "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9." * 20])
def test_no_secret_is_a_configuration_error(ledger: Ledger, secret: Any) -> None:
    with pytest.raises(ConfigurationError, match="signing secret"):
        LemonSqueezy(ledger, signing_secret=secret)


@pytest.mark.parametrize("length", [6, 40])
def test_secrets_of_the_lengths_lemon_squeezy_takes_are_accepted(ledger: Ledger, length: int) -> None:
    secret = "s" * length
    adapter = LemonSqueezy(ledger, signing_secret=secret, credit_packs=PACKS)
    body = (FIXTURES / "order_created.json").read_bytes()
    assert adapter.ingest(body, headers_for(body, secret)).http_status == 200


def test_an_api_key_given_as_the_secret_is_named() -> None:
    with pytest.raises(ConfigurationError, match=r"6 to 40 characters.*got 740.*API key"):
        sign(b"{}", "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9." * 20)


def test_a_ledger_that_renews_by_itself_is_refused(ledger_url: str) -> None:
    with Ledger(ledger_url) as ledger, pytest.raises(ConfigurationError, match="auto_renew=False"):
        LemonSqueezy(ledger, signing_secret=SECRET)


def test_credit_packs_are_checked(ledger: Ledger) -> None:
    with pytest.raises(ConfigurationError, match="both credit packs and plan variants"):
        LemonSqueezy(ledger, signing_secret=SECRET, credit_packs={"1001": 100})
    with pytest.raises(ConfigurationError, match="digits"):
        LemonSqueezy(ledger, signing_secret=SECRET, credit_packs={"pack": 100})
    with pytest.raises(ConfigurationError, match="credits"):
        LemonSqueezy(ledger, signing_secret=SECRET, credit_packs={"9001": 0})


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "no X-Signature"),
        ({"X-Signature": "0" * 64}, "not the HMAC"),
        ({"X-Signature": "zz"}, "not the HMAC"),
        ({"x-signature": sign(b"other body", SECRET)}, "not the HMAC"),
    ],
)
def test_a_bad_signature_is_rejected_and_nothing_stored(
    adapter: LemonSqueezy, headers: dict[str, str], reason: str
) -> None:
    body = (FIXTURES / "order_created.json").read_bytes()
    result = adapter.ingest(body, headers)
    assert (result.status, result.http_status) == ("rejected", 401)
    assert reason in result.reason
    assert rows(adapter) == []


def test_headers_are_matched_case_insensitively(adapter: LemonSqueezy) -> None:
    body = (FIXTURES / "order_created.json").read_bytes()
    result = adapter.ingest(body, {"X-SIGNATURE": sign(body, SECRET)})
    assert result.status == "stored"


@pytest.mark.parametrize(
    ("body", "headers", "param"),
    [
        ("text, not bytes", None, "raw_body"),
        (12_345, None, "raw_body"),
        (b"{}", [(b"x-signature", b"00")], "headers"),  # an ASGI scope's raw headers
        (b"{}", {"x-signature": b"00"}, "headers"),
        (b"{}", {b"x-signature": "00"}, "headers"),
        (b"{}", {None: "00"}, "headers"),
        (b"{}", "x-signature: 00", "headers"),
        (b"{}", {f"x-{i}": "" for i in range(1_001)}, "headers"),
    ],
)
def test_a_host_that_passes_other_than_bytes_and_text_headers_gets_invalid_argument(
    adapter: LemonSqueezy, body: Any, headers: Any, param: str
) -> None:
    body = (FIXTURES / "order_created.json").read_bytes() if body is None else body
    if headers is None:
        headers = {"X-Signature": sign(b"", SECRET)}
    with pytest.raises(InvalidArgument) as raised:
        adapter.ingest(body, headers)
    assert raised.value.param == param
    assert rows(adapter) == []
    # The adapter works on afterwards.
    good = (FIXTURES / "order_created.json").read_bytes()
    assert adapter.ingest(bytearray(good), {"X-Signature": sign(good, SECRET)}).status == "stored"


# ---------------------------------------------------------- malformed bodies


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not JSON"),
        (b"not json", "not JSON"),
        (b'{"meta": {"event_name": "order_created"}', "not JSON"),
        (b"[1, 2]", "JSON list, not an object"),
        (b'{"data": {}}', "no meta.event_name"),
        (b'{"meta": {"event_name": "order_created"}}', "no data object"),
        (b'{"meta": {"event_name": "order_created"}, "data": []}', "no data object"),
        (b'{"meta": {"event_name": 5}, "data": {"type": "orders", "id": "1", "attributes": {}}}', "event_name"),
        (
            b'{"meta": {"event_name": "Bad Name"}, "data": {"type": "orders", "id": "1", "attributes": {}}}',
            "event_name",
        ),
        (b'{"meta": {"event_name": "order_created"}, "data": {"type": "orders", "id": "x1", "attributes": {}}}', "id"),
        (b'{"meta": {"event_name": "order_created"}, "data": {"type": "orders", "id": "1"}}', "attributes"),
        (
            b'{"meta": {"event_name": "x", "webhook_id": ""}, "data": {"type": "o", "id": "1", "attributes": {}}}',
            "webhook_id",
        ),
        (b'{"a": NaN}', "NaN is not valid JSON"),
        (b'{"a": 1e999}', "out of range"),
        (b'{"a": ' + b"9" * 5000 + b"}", "not JSON"),
        (b'{"a": "\\u0000"}', "U+0000"),
        (b'{"a": "\\udc00"}', "lone surrogate"),
        (b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", "nests deeper than 32"),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
)
def test_a_malformed_body_is_rejected_with_a_clear_reason(adapter: LemonSqueezy, body: bytes, reason: str) -> None:
    result = adapter.ingest(body, headers_for(body))
    assert (result.status, result.http_status) == ("rejected", 400), result
    assert reason in result.reason, result.reason
    assert rows(adapter) == []


def test_a_body_over_the_limit_is_rejected_before_it_is_read_as_json(adapter: LemonSqueezy) -> None:
    body = b'{"meta": {}, "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'
    result = adapter.ingest(body, headers_for(body))
    assert (result.status, result.http_status) == ("rejected", 413)
    assert rows(adapter) == []


def test_nesting_inside_strings_is_not_nesting() -> None:
    assert parse_json(b'{"a": "' + b"[{" * 100 + b'"}')["a"].startswith("[{")
    with pytest.raises(MalformedBody):
        parse_json(b"[" * 33 + b"]" * 33)
    assert parse_json(b'{"e": "\\ud83d\\ude00"}') == {"e": "\U0001f600"}  # a pair is fine


# ------------------------------------------------------------------- storing


def test_a_delivery_is_stored_once_and_a_redelivery_recognised(adapter: LemonSqueezy) -> None:
    body = (FIXTURES / "order_created.json").read_bytes()
    first = adapter.ingest(body, headers_for(body))
    again = adapter.ingest(body, headers_for(body))
    assert (first.status, first.http_status, first.processing) == ("stored", 200, "processed")
    assert (again.status, again.http_status, again.event_row_id) == ("duplicate", 200, first.event_row_id)
    (row,) = rows(adapter)
    assert (row.event_type, row.event_id, row.status, row.attempts) == (
        "order_created",
        "2a6f5e4d-3c2b-41a0-8f9e-8d7c6b5a4938",
        "processed",
        1,
    )
    assert row.payload == json.loads(body)  # the whole event, unknown fields included
    assert row.processed_at is not None and row.error_message is None


def test_same_webhook_id_other_bytes_and_same_bytes_are_both_duplicates(adapter: LemonSqueezy) -> None:
    payload = template("order_created")
    body = php_json(payload)
    adapter.ingest(body, headers_for(body))
    payload["data"]["attributes"]["user_name"] = "someone else"  # same meta.webhook_id
    changed = php_json(payload)
    assert adapter.ingest(changed, headers_for(changed)).status == "duplicate"
    payload["meta"].pop("webhook_id")  # no webhook id: recognised by the body alone
    bare = php_json(payload)
    assert adapter.ingest(bare, headers_for(bare)).status == "stored"
    assert adapter.ingest(bare, headers_for(bare)).status == "duplicate"
    assert len(rows(adapter)) == 2


def test_an_unknown_event_is_stored_and_marked_processed(adapter: LemonSqueezy) -> None:
    body = (FIXTURES / "license_key_created.json").read_bytes()
    result = adapter.ingest(body, headers_for(body))
    assert (result.status, result.processing) == ("stored", "processed")
    assert "not used by the ledger" in result.reason
    assert rows(adapter)[0].error_message.startswith("note: ")


def test_a_test_mode_event_on_a_live_adapter_is_stored_and_not_applied(adapter: LemonSqueezy, ledger: Ledger) -> None:
    payload = template("order_created")
    payload["meta"]["test_mode"] = True
    payload["data"]["attributes"]["first_order_item"]["variant_id"] = 9001
    body = php_json(payload)
    result = adapter.ingest(body, headers_for(body))
    assert (result.status, result.http_status, result.processing) == ("stored", 200, "ignored")
    (row,) = rows(adapter)
    assert (row.status, row.attempts, row.test_mode) == ("received", 0, True)
    assert row.error_message == "ignored: a test-mode event, and this adapter is in live mode"
    assert adapter.retry_failed().attempted == 0  # never retried by a live adapter
    with pytest.raises(Exception, match="no credit account"):
        ledger.balance(UUID(payload["meta"]["custom_data"]["user_id"]))


def test_a_delivery_that_cannot_be_stored_is_a_500(adapter: LemonSqueezy, monkeypatch: pytest.MonkeyPatch) -> None:
    def down(**_: Any) -> Any:
        raise ConnectionError("database unreachable")

    monkeypatch.setattr(adapter.inbox, "put", down)
    body = (FIXTURES / "order_created.json").read_bytes()
    result = adapter.ingest(body, headers_for(body))
    assert (result.status, result.http_status) == ("error", 500)
    assert "could not store" in result.reason


def test_an_outcome_that_cannot_be_recorded_is_a_500_and_the_retry_a_duplicate(
    adapter: LemonSqueezy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database went away after the row was written: the row may not be
    on disk (the insert commits asynchronously on PostgreSQL), so Lemon
    Squeezy is asked to try again. Its retry finds the row, and ``webhooks
    retry`` applies it."""

    def down(*_: Any, **__: Any) -> Any:
        raise ConnectionError("database went away")

    monkeypatch.setattr(adapter.inbox, "finish", down)
    monkeypatch.setattr(adapter.inbox, "durable", down)
    body = (FIXTURES / "order_created.json").read_bytes()
    result = adapter.ingest(body, headers_for(body))
    assert (result.status, result.http_status, result.processing) == ("error", 500, "pending")
    monkeypatch.undo()
    assert rows(adapter)[0].status == "received"
    assert adapter.ingest(body, headers_for(body)).status == "duplicate"


def test_an_outcome_that_cannot_be_recorded_for_a_row_on_disk_is_a_200(
    adapter: LemonSqueezy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the outcome's write failed and the row is confirmed on disk: the
    delivery is stored (200), and ``webhooks retry`` applies it later."""

    def down(*_: Any, **__: Any) -> Any:
        raise ConnectionError("database went away")

    monkeypatch.setattr(adapter.inbox, "finish", down)
    body = (FIXTURES / "order_created.json").read_bytes()
    result = adapter.ingest(body, headers_for(body))
    assert (result.status, result.http_status, result.processing) == ("stored", 200, "pending")
    assert "webhooks retry" in result.reason
    monkeypatch.undo()
    assert rows(adapter)[0].status == "received"


def test_two_copies_at_once_store_one_row(durable_url: str, tmp_path: Any) -> None:
    """Concurrent duplicates (Lemon Squeezy's retry racing a slow first try)."""
    with open_ledger(durable_url, StoryClock(STORY_START)) as ledger:
        adapter = adapter_for(ledger)
        bodies = []
        for i in range(6):
            payload = template("order_created")
            payload["meta"]["webhook_id"] = f"race-{i}"
            bodies.append(php_json(payload))
        results: list[Any] = []
        for body in bodies:
            barrier = threading.Barrier(4)

            def send(b: bytes = body, barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                results.append(adapter.ingest(b, headers_for(b)))

            threads = [threading.Thread(target=send) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert all(r.http_status == 200 for r in results), [r for r in results if r.http_status != 200]
        assert sum(r.status == "stored" for r in results) == len(bodies)
        assert sum(r.status == "duplicate" for r in results) == 3 * len(bodies)
        assert len(adapter.inbox.listing(status=None, limit=100)) == len(bodies)


# ------------------------------------------------------------ hostile bodies


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    _containers,
    max_leaves=12,
)
_FIELDS = {
    "subscription_created": ["variant_id", "customer_id", "status", "renews_at", "updated_at", "pause", "cancelled"],
    "subscription_payment_success": ["subscription_id", "billing_reason", "status", "total", "refunded_amount"],
    "order_created": ["first_order_item", "status", "total", "customer_id", "refunded_amount"],
}


@st.composite
def hostile(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["mutated", "truncated", "deep", "huge", "unknown", "noise", "meta"]))
    name = draw(st.sampled_from(sorted(_FIELDS)))
    payload = template(name)
    payload["meta"]["webhook_id"] = draw(st.uuids()).hex
    if kind == "mutated":
        field = draw(st.sampled_from(_FIELDS[name]))
        payload["data"]["attributes"][field] = draw(_json)
    elif kind == "truncated":
        body = php_json(payload)
        return body[: draw(st.integers(0, len(body) - 1))]
    elif kind == "deep":
        depth = draw(st.integers(20, 200))
        payload["data"]["attributes"]["extra"] = json.loads("[" * depth + "]" * depth)
    elif kind == "huge":
        field = draw(st.sampled_from(_FIELDS[name]))
        digits = draw(st.integers(15, 5000))
        body = php_json(payload)
        marker = f'"{field}":'.encode()
        start = body.index(marker) + len(marker)
        end = start + next(i for i, c in enumerate(body[start:]) if c in b",}")
        return body[:start] + b"9" * digits + body[end:]
    elif kind == "unknown":
        payload["meta"]["event_name"] = draw(st.from_regex(r"\A[a-z][a-z0-9_]{0,60}\Z"))
        payload["data"]["type"] = draw(st.text(max_size=60))
    elif kind == "meta":
        payload["meta"][draw(st.sampled_from(["custom_data", "test_mode", "event_name", "webhook_id"]))] = draw(_json)
    else:
        return draw(st.binary(max_size=300))
    return php_json(payload)


@pytest.fixture(scope="module", params=["memory", pytest.param("postgres", marks=pytest.mark.postgres)])
def hostile_adapter(request: pytest.FixtureRequest) -> Iterator[LemonSqueezy]:
    # PostgreSQL too: there the body is stored as received and parsed into
    # jsonb by the server, which must refuse nothing the parser let through.
    if request.param == "memory":
        with open_ledger("memory://", StoryClock(STORY_START)) as ledger:
            yield adapter_for(ledger)
        return
    for url in fresh_pg_schema():
        with open_ledger(url, StoryClock(STORY_START)) as ledger:
            yield adapter_for(ledger)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=hostile())
def test_hostile_bodies_get_a_clear_result_and_never_a_half_event(hostile_adapter: LemonSqueezy, body: bytes) -> None:
    adapter = hostile_adapter
    before = len(rows(adapter))
    result = adapter.ingest(body, headers_for(body))
    after = rows(adapter)
    assert result.reason
    if result.status == "rejected":
        assert result.http_status in (400, 413)
        assert len(after) == before
        return
    assert result.status in ("stored", "duplicate") and result.http_status == 200, result
    row = next(r for r in after if r.row_id == result.event_row_id)
    if result.status == "stored":
        # Whole, as received. PostgreSQL keeps the body's numbers as jsonb
        # numerics, the decimals the text spells: 5.780915466609458e+16 reads
        # back as the integer 57809154666094580, not as that binary float.
        if adapter.ledger.config.backend == "postgresql":
            assert _as_decimals(row.payload) == _as_decimals(json.loads(body))
        else:
            assert row.payload == json.loads(body)
        assert len(after) == before + 1
        assert result.processing in ("processed", "failed", "held", "ignored")
        assert row.status in ("processed", "failed", "received")
        if row.status == "failed":
            assert row.error_message


def _as_decimals(value: Any) -> Any:
    """The JSON value with every number as the decimal it prints as (bools left alone)."""
    if isinstance(value, dict):
        return {k: _as_decimals(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_decimals(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Decimal(repr(value))
    return value


def test_a_signed_event_with_unusable_attributes_is_kept_as_failed(adapter: LemonSqueezy) -> None:
    payload = template("subscription_created")
    payload["data"]["attributes"]["variant_id"] = "1001x"
    payload["data"]["attributes"]["renews_at"] = 12
    body = php_json(payload)
    result = adapter.ingest(body, headers_for(body))
    assert (result.status, result.http_status, result.processing) == ("stored", 200, "failed")
    assert result.reason.startswith("invalid subscriptions attributes: variant_id: ")
    assert "renews_at" in result.reason
    (row,) = rows(adapter)
    assert (row.status, row.attempts, row.processed_at) == ("failed", 1, None)
    adapter.retry_failed()
    assert rows(adapter)[0].attempts == 2  # still failing, counted, kept


def test_a_credit_pack_quantity_multiplies_and_auto_renew_policy_is_respected(ledger: Ledger) -> None:
    adapter = adapter_for(ledger)
    payload = template("order_created")
    payload["data"]["attributes"]["first_order_item"].update(variant_id=9001, quantity=3)
    body = php_json(payload)
    assert adapter.ingest(body, headers_for(body)).processing == "processed"
    user = UUID(payload["meta"]["custom_data"]["user_id"])
    assert ledger.balance(user).balance_credits == 3000
    assert ledger.credit_policy == CreditPolicy(auto_renew=False)


@pytest.mark.parametrize(
    "extra",
    [
        10**100,  # beyond BIGINT, fine in jsonb
        -(2**70),
        1.5e300,
        "\U0001f34b Zoë \u2014 \\/ \u00a0",  # an emoji (a surrogate pair in PHP's JSON) and more
        json.loads("[" * 28 + "]" * 28),  # as deep as allowed, with the envelope around it
        {"": None, "k" * 200: [True, False, {}]},
        "x" * 100_000,
    ],
    ids=["huge-int", "negative-huge-int", "big-float", "unicode", "deep", "odd-keys", "long-string"],
)
def test_unusual_but_valid_bodies_are_stored_whole_on_every_backend(adapter: LemonSqueezy, extra: Any) -> None:
    payload = template("license_key_created")
    payload["data"]["attributes"]["extra"] = extra
    body = php_json(payload)
    result = adapter.ingest(body, headers_for(body))
    assert (result.status, result.http_status, result.processing) == ("stored", 200, "processed"), result
    (row,) = rows(adapter)
    # jsonb keeps numbers as numeric: 1.5e300 comes back as the equal integer.
    assert by_value(row.payload) == by_value(json.loads(body))


def by_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: by_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [by_value(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Decimal(repr(value))
    return value


def test_a_delivery_is_on_disk_before_it_is_answered(adapter: LemonSqueezy, monkeypatch: pytest.MonkeyPatch) -> None:
    """The row is committed without waiting for the disk (PostgreSQL); what
    follows it must then flush: the ledger's commit of its effects, or else
    the commit of its outcome."""
    flushes: list[bool] = []
    finish = adapter.inbox.finish

    def spy(*args: Any, **kwargs: Any) -> Any:
        flushes.append(kwargs.get("flush", False))
        return finish(*args, **kwargs)

    monkeypatch.setattr(adapter.inbox, "finish", spy)
    pack = template("order_created")
    body = php_json(pack)
    adapter.ingest(body, headers_for(body))  # applied: the ledger's commit flushed
    pack["meta"]["webhook_id"] = "resent-1"
    resent = php_json(pack)
    adapter.ingest(resent, headers_for(resent))  # a replay commits nothing: the outcome flushes
    unknown = (FIXTURES / "license_key_created.json").read_bytes()
    adapter.ingest(unknown, headers_for(unknown))  # no ledger command
    held = (FIXTURES / "subscription_payment_success.json").read_bytes()
    adapter.ingest(held, headers_for(held))  # held: nothing committed
    assert flushes == [False, True, True, True]


@pytest.mark.postgres
def test_on_postgresql_the_insert_commits_asynchronously(pg_url: str) -> None:
    from psycopg.pq import TransactionStatus

    from adapters.lemonsqueezy import SOURCE
    from adapters.webhooks.inbox import _COLUMNS, _PG_FINISH, _PG_PUT

    with open_ledger(pg_url, StoryClock(STORY_START)) as ledger:
        inbox = adapter_for(ledger).inbox
        with inbox._transaction() as t:
            # Each statement is its own transaction (autocommit): the
            # setting made with set_config(..., true) holds until that
            # transaction's commit, which reads it, and no longer.
            assert t.tx.curs.connection.info.transaction_status == TransactionStatus.IDLE
            local = (
                "SELECT current_setting('synchronous_commit') "
                "FROM (SELECT set_config('synchronous_commit', %s, true)) s"
            )
            assert t.tx.fetchall(local, ["off"]) == [("off",)]
            assert t.tx.fetchall("SHOW synchronous_commit") == [("on",)]
            row = [UUID(int=7), SOURCE, "order_created", "w-1", '{"a": 1}', "0" * 64, False, STORY_START, None]
            key = [SOURCE, "0" * 64, "w-1"]
            found = t.tx.fetchall(_PG_PUT.format(t=t.table), [*row, *key, *key])
            assert found[0][2] is True  # inserted, and committed: no transaction is left open
            assert t.tx.curs.connection.info.transaction_status == TransactionStatus.IDLE
            assert t.tx.fetchall("SHOW synchronous_commit") == [("on",)]
        for mode in ("off", "on"):
            with inbox._transaction() as t:
                statement = _PG_FINISH.format(t=t.table, columns=_COLUMNS, clauses="error_message LIKE %s")
                values = [mode, "processed", None, STORY_START, 1, UUID(int=7), SOURCE, "held: -:%", 5]
                assert t.tx.fetchall(statement, values) == []
                assert t.tx.curs.connection.info.transaction_status == TransactionStatus.IDLE
        (row,) = inbox.listing(status="processed", limit=5)
        assert row.attempts == 2


# ------------------------------------------------ shapes from earlier docs


def _without(body: bytes, *names: str, **values: Any) -> bytes:
    """The body with attributes removed or set (PHP-encoded again)."""
    payload = json.loads(body)
    attributes = payload["data"]["attributes"]
    for name in names:
        del attributes[name]
    attributes.update(values)
    return php_json(payload)


def test_refunded_null_reads_as_not_refunded(adapter: LemonSqueezy, ledger: Ledger) -> None:
    """Early documented orders and invoices carry ``"refunded": null``."""
    b = Builder()
    order = _without(
        b.order_event("order_created", "660002", variant="9001", total=1000, at=STORY_START), refunded=None
    )
    created = b.subscription_event("subscription_created", updated=STORY_START, renews_at=R1)
    invoice = b.invoice_event(
        "subscription_payment_success",
        "550001",
        reason="initial",
        status="paid",
        created=STORY_START + SEC,
        updated=STORY_START + 2 * SEC,
        total=2500,
    )
    for body in (order, created, _without(invoice, refunded=None)):
        result = adapter.ingest(body, headers_for(body))
        assert (result.http_status, result.processing) == (200, "processed"), result
    assert ledger.balance(USER).balance_credits == 1000 + 5000


def test_an_invoice_without_customer_id_finds_its_user_through_the_subscription(
    adapter: LemonSqueezy, ledger: Ledger
) -> None:
    """Early documented invoices have no customer_id. Without custom data
    either, the invoice waits for its subscription, which names the user,
    and goes through when the subscription arrives."""
    b = Builder()
    invoice = b.invoice_event(
        "subscription_payment_success",
        "550001",
        reason="initial",
        status="paid",
        created=STORY_START + SEC,
        updated=STORY_START + 2 * SEC,
        total=2500,
    )
    payload = json.loads(_without(invoice, "customer_id"))
    del payload["meta"]["custom_data"]
    bare = php_json(payload)
    held = adapter.ingest(bare, headers_for(bare))
    assert (held.http_status, held.processing) == (200, "held")
    assert held.reason.startswith("held: subscription 880001: ")
    created = b.subscription_event("subscription_created", updated=STORY_START, renews_at=R1)
    assert adapter.ingest(created, headers_for(created)).processing == "processed"
    assert ledger.balance(USER).balance_credits == 5000  # the held invoice, released by its subscription
    assert {r.event_type: r.status for r in rows(adapter)} == {
        "subscription_payment_success": "processed",
        "subscription_created": "processed",
    }


def test_only_the_applied_types_need_numeric_ids(adapter: LemonSqueezy) -> None:
    """A resource type the ledger does not apply is stored whatever its id
    looks like (a future type may use other ids); the ones it applies must
    carry Lemon Squeezy's integer ids."""
    future = php_json(
        {
            "meta": {"event_name": "affiliate_activated", "webhook_id": "w-future-1"},
            "data": {"type": "affiliates", "id": "aff_01HZX3K9Q2", "attributes": {"status": "active"}},
        }
    )
    result = adapter.ingest(future, headers_for(future))
    assert (result.status, result.http_status, result.processing) == ("stored", 200, "processed"), result
    assert "not used by the ledger" in result.reason
    for kind in ("subscriptions", "subscription-invoices", "orders"):
        body = php_json(
            {"meta": {"event_name": "x_event"}, "data": {"type": kind, "id": "aff_01HZX3K9Q2", "attributes": {}}}
        )
        refused = adapter.ingest(body, headers_for(body))
        assert (refused.http_status, refused.status) == (400, "rejected")
        assert f"a {kind} id must be 1 to 32 digits" in refused.reason
    spaced = php_json({"meta": {"event_name": "x_event"}, "data": {"type": "x", "id": "a b", "attributes": {}}})
    assert adapter.ingest(spaced, headers_for(spaced)).http_status == 400
    assert [r.event_type for r in rows(adapter)] == ["affiliate_activated"]


# ------------------------------------------------------------------ retries


def _down(self: LedgerApplication, objs: Any) -> Any:
    raise ConnectionError("injected: the database connection was lost")


def test_deliveries_that_fail_for_good_do_not_starve_newer_ones(
    adapter: LemonSqueezy, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two old deliveries that always fail (another product's variant) and a
    newer one failed by an outage: a retry of 2 at a time reaches the newer
    one on the next run, and every run after goes on reaching them all."""
    clock = ledger.clock
    assert isinstance(clock, StoryClock)
    for i in range(2):
        clock.set(STORY_START + i * SEC)
        other = Builder(subscription=str(990000 + i), customer=990000 + i, user=uuid4())
        body = other.subscription_event("subscription_created", updated=STORY_START, variant="4242", renews_at=R1)
        assert adapter.ingest(body, headers_for(body)).processing == "failed"
    clock.set(STORY_START + 10 * SEC)
    monkeypatch.setattr(LedgerApplication, "save_all", _down)
    pack = Builder().order_event("order_created", "660002", variant="9001", total=1000, at=STORY_START)
    assert adapter.ingest(pack, headers_for(pack)).processing == "failed"
    monkeypatch.undo()

    def attempts() -> dict[str, tuple[str, int]]:
        return {
            str(r.payload["data"]["id"]): (r.status, r.attempts) for r in adapter.inbox.listing(status=None, limit=10)
        }

    first = adapter.processor.retry(limit=2)
    assert (first.attempted, first.processed) == (2, 0)  # the two oldest, tried once each so far
    assert attempts() == {"990000": ("failed", 2), "990001": ("failed", 2), "660002": ("failed", 1)}
    second = adapter.processor.retry(limit=2)
    assert second.processed == 1
    assert attempts()["660002"] == ("processed", 2)
    assert ledger.balance(USER).balance_credits == 1000
    for _ in range(3):
        adapter.processor.retry(limit=1)
    counts = [n for status, n in attempts().values() if status == "failed"]
    assert max(counts) - min(counts) <= 1  # tried in turn, not the oldest over and over


def test_a_delivery_left_received_is_retried_after_the_staleness_delay_first(
    adapter: LemonSqueezy, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ledger.clock
    assert isinstance(clock, StoryClock)
    other = Builder(subscription="990000", customer=990000, user=uuid4())
    failing = other.subscription_event("subscription_created", updated=STORY_START, variant="4242", renews_at=R1)
    assert adapter.ingest(failing, headers_for(failing)).processing == "failed"

    def stopped(*_: Any, **__: Any) -> Any:
        raise ConnectionError("the process stopped")

    monkeypatch.setattr(adapter.inbox, "finish", stopped)
    pack = Builder().order_event("order_created", "660002", variant="9001", total=1000, at=STORY_START)
    assert adapter.ingest(pack, headers_for(pack)).processing == "pending"
    monkeypatch.undo()
    assert ledger.balance(USER).balance_credits == 1000  # applied; only its outcome was not recorded
    report = adapter.processor.retry(limit=1)
    assert report.messages[0][1] == "subscription_created"  # the received row is not stale yet
    clock.set(STORY_START + timedelta(seconds=DEFAULT_STALE_AFTER_S + 1))
    seen: list[tuple[str, str]] = []
    report = adapter.processor.retry(
        limit=1, progress=lambda row, outcome: seen.append((row.event_type, outcome.status))
    )
    # Never tried, so before the row that keeps failing; then, as it made
    # progress, a second pass takes that one.
    assert seen == [("order_created", "processed"), ("subscription_created", "failed")]
    (row,) = [r for r in rows(adapter) if r.event_type == "order_created"]
    assert (row.status, row.attempts) == ("processed", 1)
    assert ledger.balance(USER).balance_credits == 1000  # nothing twice
