"""The bulk path of execute_batch: cached accounts read with one read of only
their new events, command records saved as events (not cached), the cheaper
arguments and receipts equal to what they replace, and the garbage
collector's pause."""

from __future__ import annotations

import gc
import json
import threading
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from uuid import UUID, uuid4

import pytest

from ledger import (
    DEFAULT_CATALOG,
    AdjustCredits,
    BatchRejected,
    BillingCycle,
    CreditKind,
    DefinePlan,
    GrantCredits,
    Ledger,
    ManualClock,
    Receipt,
    ReserveCredits,
    SettleReservation,
    SpendCredits,
    StartSubscription,
)
from ledger.application import gcpause
from ledger.application.commands import ADDED_FIELD, Command, _canonical, _json_default
from ledger.application.unit import built_receipt, positioned
from ledger.domain.credits import account_id_for, record_id_for


def grants(users: list[UUID], tag: str, amount: int = 10) -> list[GrantCredits]:
    return [GrantCredits(key=f"{tag}:{u}", user_id=u, amount_credits=amount, kind=CreditKind.BONUS) for u in users]


class Reads:
    """Counts the store reads of a ledger's batch reader."""

    def __init__(self, ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
        reader = ledger.engine.reader
        self.after: list[dict[UUID, int]] = []
        self.loaded: list[list[UUID]] = []
        events_after, load = reader.events_after, reader.load

        def counted_after(after: dict[UUID, int]) -> Any:
            self.after.append(dict(after))
            return events_after(after)

        def counted_load(ids: Any, **kwargs: Any) -> Any:
            self.loaded.append(list(ids))
            return load(ids, **kwargs)

        monkeypatch.setattr(reader, "events_after", counted_after)
        monkeypatch.setattr(reader, "load", counted_load)


def test_a_batch_reads_cached_accounts_once_with_only_their_new_events(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = [uuid4() for _ in range(30)]
    ledger.execute_batch(grants(users, "open"))
    reads = Reads(ledger, monkeypatch)
    receipts = ledger.execute_batch(grants(users, "again"))
    # One read of the events after each cached account's version (none), no full load.
    assert reads.loaded == []
    (after,) = reads.after
    assert after == {account_id_for(u): 2 for u in users}
    assert [r.balance_credits for r in receipts] == [20] * len(users)
    for rounds in range(3, 6):  # round after round: still one read, of the new events only
        reads.after.clear()
        ledger.execute_batch(grants(users, f"round{rounds}"))
        assert reads.loaded == [] and len(reads.after) == 1
        assert set(reads.after[0].values()) == {rounds}
    assert ledger.balance(users[0]).balance_credits == 50


def test_a_batch_fast_forwards_accounts_another_writer_moved_on(
    durable_url: str, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's writes are read as new events on top of the cached
    copy: the batch does not clash and reload."""
    users = [uuid4() for _ in range(20)]
    with Ledger(durable_url, clock=clock) as mine, Ledger(durable_url, clock=clock) as other:
        mine.execute_batch(grants(users, "open"))  # cached here
        other.execute_batch([SpendCredits(key=f"spend:{u}", user_id=u, amount_credits=3) for u in users[:5]])
        other.execute_batch(grants(users[5:10], "other", amount=7))
        saves = [0]
        save_all = mine.app.save_all

        def counted(objs: Any) -> Any:
            saves[0] += 1
            return save_all(objs)

        monkeypatch.setattr(mine.app, "save_all", counted)
        receipts = mine.execute_batch(grants(users, "mine"))
        assert saves[0] == 1  # no clash, no second attempt
        assert [r.balance_credits for r in receipts] == [17] * 5 + [27] * 5 + [20] * 10
        for u, r in zip(users, receipts, strict=True):
            assert other.balance(u).balance_credits == r.balance_credits


def test_a_rejected_batch_leaves_the_cached_accounts_as_recorded(ledger: Ledger) -> None:
    users = [uuid4() for _ in range(5)]
    ledger.execute_batch(grants(users, "open"))
    with pytest.raises(BatchRejected):
        ledger.execute_batch(
            [*grants(users, "more"), SpendCredits(key="too-much", user_id=users[0], amount_credits=1_000)]
        )
    receipts = ledger.execute_batch(grants(users, "after"))
    assert [r.balance_credits for r in receipts] == [20] * 5
    assert ledger.balance(users[0]).balance_credits == 20


def test_command_records_are_saved_as_events_and_kept_out_of_the_cache(ledger: Ledger) -> None:
    users = [uuid4() for _ in range(10)]
    batch = grants(users, "g")
    first = ledger.execute_batch(batch)
    cache = ledger.app.repository.cache
    assert cache is not None
    for c in batch:
        with pytest.raises(KeyError):
            cache.get(record_id_for(c.key))
    again = ledger.execute_batch(batch)  # a retry replays every key from its record
    assert all(r.replayed for r in again)
    assert [r.model_dump(exclude={"replayed", "position"}) for r in again] == [
        r.model_dump(exclude={"replayed", "position"}) for r in first
    ]
    stored = ledger.app.recorder.select_events(record_id_for(batch[0].key))
    assert [e.topic for e in stored] == ["pingvas.ledger:CommandRecord.Recorded"]
    assert json.loads(stored[0].state)["originator_topic"] == "pingvas.ledger:CommandRecord"


def sample_commands(clock: ManualClock) -> list[Any]:
    user = uuid4()
    return [
        GrantCredits(key="a", user_id=user, amount_credits=5, kind=CreditKind.PURCHASE),
        GrantCredits(
            key="b",
            user_id=user,
            amount_credits=5,
            kind="subscription_renew",  # type: ignore[arg-type]
            expires_at=clock.now() + timedelta(days=3),
            reference_type="subscription",
            reference_id="2026-02",
            description="renewal",
        ),
        GrantCredits(key="c", user_id=user, amount_credits=5, kind=CreditKind.BONUS, expires_in=timedelta(hours=2)),
        SpendCredits(key="d", user_id=user, amount_credits=1, description="a job"),
        ReserveCredits(
            key="e", user_id=user, job_id=uuid4(), amount_credits=2, expires_at=clock.now() + timedelta(minutes=5)
        ),
        SettleReservation(key="f", reservation_id=uuid4(), actual_credits=1, user_id=user),
        DefinePlan(key="g", terms=DEFAULT_CATALOG[0], actor="ops"),  # a nested value: the JSON round trip
        StartSubscription(
            key="h", user_id=user, plan=DEFAULT_CATALOG[0].name, billing_cycle=BillingCycle.YEARLY, trial_days=3
        ),
    ]


def test_arguments_are_the_canonical_texts_json_values(clock: ManualClock) -> None:
    for command in sample_commands(clock):
        decoded = json.loads(command._canonical_text)
        arguments = command.arguments
        assert arguments == decoded
        assert list(arguments) == list(decoded)  # the same order: sorted
        assert [type(v) for v in arguments.values()] == [type(v) for v in decoded.values()]
        arguments["command"] = "edited"  # a fresh dict each time
        assert command.arguments == decoded


def _canonical_text_as_first_written(command: Command) -> str:
    """The canonical text as ``Command`` first computed it: every field but
    the key and the hints through ``_canonical``, then ``json.dumps``."""
    body = {}
    for f in fields(command):
        value = getattr(command, f.name)
        if f.name == "key" or f.name in command.hints or (f.metadata.get(ADDED_FIELD) and value == f.default):
            continue
        body[f.name] = _canonical(value)
    return json.dumps({"command": command.name, **body}, sort_keys=True, default=_json_default)


def test_canonical_texts_are_those_json_dumps_writes(clock: ManualClock) -> None:
    now = clock.now()
    commands: list[Command] = [
        *sample_commands(clock),
        GrantCredits(
            key="k", user_id=uuid4(), amount_credits=7, kind=CreditKind.PURCHASE, description="caf\u00e9 \u2603 \"q\"",
            reference_type="order", reference_id="\U0001f600", expires_at=now + timedelta(days=3), actor="admin:x",
        ),
        GrantCredits(key="k", user_id=uuid4(), amount_credits=7, kind=CreditKind.BONUS, expires_in=timedelta(0, 1, 5)),
        SpendCredits(key="s", user_id=uuid4(), amount_credits=3, kind=CreditKind.GENERATION_USE, description="\t\n"),
        AdjustCredits(key="a", user_id=uuid4(), delta_credits=-4, reason="r\u00e9", actor="admin:y"),
    ]  # fmt: skip
    for command in commands:
        if type(command)._canonical_text is not Command._canonical_text:
            continue  # a command with its own canonical text (ReserveForJob's digests its parameters)
        assert command._canonical_text == _canonical_text_as_first_written(command), type(command).__name__


def test_the_fingerprint_of_a_grant_is_unchanged() -> None:
    """A fingerprint is stored with every key; it must never change."""
    grant = GrantCredits(
        key="k",
        user_id=UUID("6a1c3a4e-56a4-4ac7-9e36-31a1b5f7b1a0"),
        amount_credits=500,
        kind=CreditKind.SUBSCRIPTION_RENEW,
        reference_type="subscription",
        reference_id="2026-02",
    )
    assert grant._canonical_text == (
        '{"actor": null, "amount_credits": 500, "command": "grant", "description": "", "expires_at": null, '
        '"kind": "subscription_renew", "reference_id": "2026-02", "reference_type": "subscription", '
        '"user_id": "6a1c3a4e-56a4-4ac7-9e36-31a1b5f7b1a0"}'
    )
    assert grant.fingerprint == "3f078616d823e861627369476bc5b297ccb4be643d625da965e507f25230fb7b"
    user = grant.user_id
    lasting = GrantCredits(
        key="k", user_id=user, amount_credits=5, kind=CreditKind.BONUS, expires_in=timedelta(hours=2)
    )
    assert lasting.fingerprint == "b130e5539bcea552c1196a2fd0ef0291e8e002c34ca8c8d0c63c4635bf35fc0c"
    until = GrantCredits(
        key="k", user_id=user, amount_credits=5, kind=CreditKind.BONUS, expires_at=datetime(2026, 3, 1, tzinfo=UTC)
    )
    assert until.fingerprint == "6ebff02ff13d468d62f5c4b3cfb4703a80e1c07807cb9a6225e3446cd58e3f92"


def test_built_receipts_equal_pydantics_own(clock: ManualClock) -> None:
    values: dict[str, Any] = {
        "key": "k",
        "command": "grant",
        "user_id": uuid4(),
        "entry_id": uuid4(),
        "reservation_id": None,
        "amount_credits": 5,
        "balance_credits": 5,
        "held_credits": 0,
        "available_credits": 5,
        "recorded_at": clock.now(),
        "replayed": False,
    }
    mine, theirs = built_receipt(values), Receipt.model_construct(**values)
    assert mine == theirs and repr(mine) == repr(theirs)
    assert mine.model_fields_set == theirs.model_fields_set
    assert mine.model_dump_json() == theirs.model_dump_json()
    placed, copied = positioned(mine, 42), theirs.model_copy(update={"position": 42})
    assert placed == copied and placed.model_fields_set == copied.model_fields_set and hash(placed) == hash(copied)
    assert mine.position is None  # the original is left as it was
    with pytest.raises(AssertionError, match="without"):
        built_receipt({k: v for k, v in values.items() if k != "balance_credits"})
    with pytest.raises(AssertionError, match="unknown"):
        built_receipt({**values, "extra": 1})


@dataclass(frozen=True)
class WatchedGrant(GrantCredits):
    """A grant that notes whether the collector runs while it is applied."""

    name: ClassVar[str] = "grant"
    seen: ClassVar[list[bool]] = []

    def apply(self, unit: Any) -> Receipt:
        WatchedGrant.seen.append(gc.isenabled())
        return super().apply(unit)


def test_the_collector_is_paused_during_a_large_batch_only(ledger: Ledger) -> None:
    assert gc.isenabled()
    users = [uuid4() for _ in range(gcpause.GC_PAUSE_MIN_COMMANDS)]
    WatchedGrant.seen.clear()
    ledger.execute_batch(
        [WatchedGrant(key=f"w:{u}", user_id=u, amount_credits=1, kind=CreditKind.BONUS) for u in users]
    )
    assert set(WatchedGrant.seen) == {False} and gc.isenabled()
    WatchedGrant.seen.clear()
    ledger.execute_batch(
        [WatchedGrant(key=f"v:{u}", user_id=u, amount_credits=1, kind=CreditKind.BONUS) for u in users[:3]]
    )
    assert WatchedGrant.seen == [True, True, True]
    WatchedGrant.seen.clear()
    with pytest.raises(BatchRejected):  # resumed after a failure too
        ledger.execute_batch(
            [
                *(WatchedGrant(key=f"x:{u}", user_id=u, amount_credits=1, kind=CreditKind.BONUS) for u in users),
                SpendCredits(key="x:too-much", user_id=users[0], amount_credits=10_000),
            ]
        )
    assert set(WatchedGrant.seen) == {False} and gc.isenabled()


def test_a_host_that_disabled_the_collector_keeps_it_disabled() -> None:
    gc.disable()
    try:
        with gcpause.collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_overlapping_pauses_resume_when_the_last_ends() -> None:
    assert gc.isenabled()
    inside, leave = threading.Event(), threading.Event()

    def other() -> None:
        with gcpause.collector_paused():
            inside.set()
            leave.wait(5)

    thread = threading.Thread(target=other)
    with gcpause.collector_paused():
        thread.start()
        assert inside.wait(5)
    assert not gc.isenabled() and gcpause.paused()  # the other batch still runs
    leave.set()
    thread.join()
    assert gc.isenabled() and not gcpause.paused()
    with gcpause.collector_paused(active=False):
        assert gc.isenabled()


def test_the_read_of_new_events_is_chunked(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    from ledger.application import unit

    monkeypatch.setattr(unit, "CHUNK_IDS", 7)
    users = [uuid4() for _ in range(30)]
    ledger.execute_batch(grants(users, "open"))
    reads = Reads(ledger, monkeypatch)
    receipts = ledger.execute_batch(grants(users, "again"))
    assert [len(a) for a in reads.after] == [7, 7, 7, 7, 2]
    assert reads.loaded == [] and [r.balance_credits for r in receipts] == [20] * 30
