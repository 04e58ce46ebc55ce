"""The fast paths a bulk batch takes give exactly what the generic ones give.
The ledger's transcoder (``LedgerTranscoder``) writes the bytes eventsourcing's
own ``JSONTranscoder`` writes, for every stored event and snapshot (stored
events live forever, and snapshot seals digest these bytes); ids derived from
keys are the ``uuid.uuid5`` of their namespaces."""

from __future__ import annotations

import copy
import importlib.util
import json
import pickle
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any
from uuid import RFC_4122, UUID, uuid4, uuid5

import pytest
from eventsourcing.persistence import JSONTranscoder, Mapper, StoredEvent, TranscodingNotRegisteredError

from ledger import InvariantViolation, Ledger
from ledger.domain.credits import (
    ACCOUNT_NS,
    ENTRY_NS,
    EXPIRATION_NS,
    RECORD_NS,
    Block,
    CreditAccount,
    CreditKind,
    account_id_for,
    entry_id_for,
    expiration_entry_id,
    record_id_for,
)
from ledger.domain.holds import Hold
from ledger.storage.transcoding import LedgerTranscoder

FIXTURES = Path(__file__).parent / "fixtures"


def _builder(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, FIXTURES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reference(ledger: Ledger) -> Mapper[UUID]:
    """eventsourcing's own mapper and transcoder, with the ledger's transcodings."""
    transcoder = JSONTranscoder()
    ledger.app.register_transcodings(transcoder)
    return Mapper(transcoder=transcoder)


def _stored(ledger: Ledger) -> list[StoredEvent]:
    """Every event and snapshot in the store."""
    events = list(ledger.app.recorder.select_notifications(start=1, limit=100_000))
    snapshots: list[StoredEvent] = []
    assert ledger.app.snapshots is not None
    for aggregate_id in dict.fromkeys(e.originator_id for e in events):
        snapshots.extend(ledger.app.snapshots.recorder.select_events(aggregate_id))
    return [*events, *snapshots]


def _assert_same_bytes(ledger: Ledger, stored: list[StoredEvent]) -> set[str]:
    reference = _reference(ledger)
    mapper = ledger.app.mapper
    for s in stored:
        event = mapper.to_domain_event(s)
        ours = mapper.to_stored_event(event)
        theirs = reference.to_stored_event(event)
        assert ours.state == theirs.state, s.topic
        assert ours.topic == theirs.topic
    return {s.topic for s in stored}


def test_the_ledger_encodes_with_its_own_transcoder(ledger: Ledger) -> None:
    assert type(ledger.app.mapper.transcoder) is LedgerTranscoder


@pytest.mark.parametrize("builder", ["make_stored_events", "make_priced_holds"])
def test_what_the_ledger_stores_is_what_eventsourcing_would_store(builder: str) -> None:
    ledger, _ = _builder(builder).build()
    with ledger:
        stored = _stored(ledger)
        reference = _reference(ledger)
        for s in stored:
            # The bytes in the store, written by the ledger's transcoder, are
            # eventsourcing's encoding of the event they decode to.
            assert reference.to_stored_event(ledger.app.mapper.to_domain_event(s)).state == s.state, s.topic
        topics = _assert_same_bytes(ledger, stored)
    if builder == "make_stored_events":  # the history that passes the snapshot interval
        assert "pingvas.ledger:CreditAccount.Snapshot" in topics
    assert len(topics) >= 10


@pytest.mark.parametrize("fixture", ["stored_events_v0_1.json", "stored_events_priced_holds.json"])
def test_events_an_earlier_version_wrote_encode_as_eventsourcing_encodes_them(fixture: str) -> None:
    rows = json.loads((FIXTURES / fixture).read_text())["rows"]
    stored = [
        StoredEvent(UUID(r["originator_id"]), r["originator_version"], r["topic"], r["state"].encode()) for r in rows
    ]
    with Ledger("memory://") as ledger:
        topics = _assert_same_bytes(ledger, stored)
    assert len(topics) == len({r["topic"] for r in rows})


def test_unusual_values_encode_as_eventsourcing_encodes_them() -> None:
    ours = LedgerTranscoder()
    theirs = JSONTranscoder()
    with Ledger("memory://") as ledger:
        ledger.app.register_transcodings(ours)
        ledger.app.register_transcodings(theirs)
    now = datetime(2026, 3, 1, 12, 30, 0, 123456, tzinfo=UTC)
    block = Block("b", "purchase", 10, 7, now, None, 3)
    hold = Hold(str(uuid4()), "job", 5, now, now + timedelta(hours=1), [["b", 5]])
    states: list[Any] = [
        'top-level text \u00e9\u2603 "quoted" \\ \n',
        {"text": 'caf\u00e9 \u2603 \U0001f600 \x00 \t "q" \\', "float": 1.5, "big": 10**30, "neg": -0.0},
        {"bool": True, "none": None, "list": [1, "a", [now, uuid4()]], "tuple": (1, 2), "decimal": Decimal("0.20")},
        {"nested": {"id": uuid4(), "at": now, "deeper": {"at": now + timedelta(microseconds=1)}}},
        {"naive": datetime(2026, 1, 1), "offset": datetime.fromisoformat("2026-01-01T00:00:00+05:30")},
        {"block": block, "hold": hold, "blocks": [block, block]},
        {"floats": [float("inf"), float("-inf"), 1e-310, 3.141592653589793]},
        {1: "int key", 2.5: "float key", False: "bool key", None: "none key"},
        [],
        {},
    ]
    for state in states:
        assert ours.encode(state) == theirs.encode(state), state
    # Many distinct times, and times freed and made again (their ids reused):
    # each is encoded as itself, never as a time seen before.
    for n in range(300):
        at = now + timedelta(seconds=n)
        assert ours.encode({"at": at, "again": at}) == theirs.encode({"at": at, "again": at})
        del at  # freed once the transcoder lets go of it: a later time may take its id


def test_unregistered_types_are_refused_as_eventsourcing_refuses_them() -> None:
    class OtherUUID(UUID):
        pass

    ours = LedgerTranscoder()
    with Ledger("memory://") as ledger:
        ledger.app.register_transcodings(ours)
    for value in (object(), OtherUUID(int=1), {1, 2}):
        with pytest.raises(TranscodingNotRegisteredError):
            ours.encode({"value": value})


def test_ids_derived_from_keys_are_uuid5s_of_their_namespaces() -> None:
    names = ["", "k", "bench:renew:2026-01:" + str(uuid4()), "caf\u00e9 \u2603 \U0001f600", "x" * 10_000]
    names += [str(uuid4()) for _ in range(200)]
    for name in names:
        assert entry_id_for(name) == uuid5(ENTRY_NS, name)
        assert record_id_for(name) == uuid5(RECORD_NS, name)
        assert expiration_entry_id(UUID(int=7), len(name)) == uuid5(EXPIRATION_NS, f"{UUID(int=7)}:{len(name)}")
        user = uuid4()
        assert account_id_for.__wrapped__(user) == uuid5(ACCOUNT_NS, user.hex)
        derived, reference = entry_id_for(name), uuid5(ENTRY_NS, name)
        assert (derived.version, derived.variant, derived.is_safe) == (5, RFC_4122, reference.is_safe)
        assert (str(derived), repr(derived), hash(derived)) == (str(reference), repr(reference), hash(reference))
        assert type(derived) is UUID and pickle.loads(pickle.dumps(derived)) == reference
        assert copy.deepcopy(derived) == reference and derived.bytes == reference.bytes


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _granted_account(grants: int) -> CreditAccount:
    account = CreditAccount._create(CreditAccount.Opened, id=uuid4(), user_id=uuid4(), timestamp=T0)
    for n in range(grants):
        account.grant(
            entry_id=uuid4(), amount=10 + n, kind=CreditKind.BONUS, description="", reference_type=None,
            reference_id=None, expires_at=T0 + timedelta(days=n) if n % 2 else None, actor=None, key=f"k{n}", now=T0,
        )  # fmt: skip
    return account


def _swap_first_two(account: CreditAccount) -> None:
    account._order[0], account._order[1] = account._order[1], account._order[0]


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda a: setattr(a, "balance", a.balance + 1),
        lambda a: setattr(a, "balance", -1),
        lambda a: setattr(a, "debt", 1),
        lambda a: setattr(a, "debt", -1),
        lambda a: setattr(a, "credit_limit", -1),
        lambda a: setattr(a, "credit_limit", 10**10),
        lambda a: setattr(a, "_held", 1),
        lambda a: a._marked.update({next(iter(a.blocks)): 1}),
        lambda a: setattr(a._order[0], "remaining", 0),
        lambda a: setattr(a._order[0], "remaining", a._order[0].granted + 1),
        lambda a: a._order.pop(),
        lambda a: a._order.append(a._order[0]),
        lambda a: a._order.__setitem__(1, a._order[0]),
        _swap_first_two,
        lambda a: a._order.__setitem__(0, Block(**{**vars(a._order[0])})),  # not the block of its id
        lambda a: a.blocks.pop(a._order[0].block_id),
    ],
)
def test_accounts_without_holds_are_checked_in_full_when_anything_is_off(corrupt: Any) -> None:
    account = _granted_account(3)
    assert account._holds_without_holds()
    account.check_invariants()
    corrupt(account)
    assert not account._holds_without_holds()
    with pytest.raises(InvariantViolation):
        account.check_invariants()


def test_accounts_with_holds_or_without_blocks_are_checked_in_full() -> None:
    empty = _granted_account(0)
    assert empty._holds_without_holds()  # no blocks, nothing held: consistent
    empty.check_invariants()
    held = _granted_account(2)
    held.reserve(reservation_id=uuid4(), job_id=uuid4(), amount=5, expires_at=T0 + timedelta(hours=1), key="r", now=T0)
    assert not held._holds_without_holds()
    held.check_invariants()
