"""Balance thresholds and the notification outbox, on every backend: one
notification per crossing (at or below a level, re-armed above it), from
available credits; thresholds absolute, as a share of the period's grant,
from the host or the plan; the outbox's consumer positions, at-least-once
hand-over, dead letters; and the signature a receiver checks."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import StoredEvent

from ledger import (
    DEFAULT_CATALOG,
    ConcurrencyExhausted,
    Feature,
    InsufficientCredits,
    InvalidArgument,
    InvalidSignature,
    Ledger,
    ManualClock,
    Notification,
    Outbox,
    OutboxMoved,
    PlanTerms,
    Threshold,
    UnknownAccount,
    verify_signature,
)
from ledger.application.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, signed_headers
from ledger.domain.credits import account_id_for
from ledger.storage.eventstore import SNAPSHOT_INTERVAL_EVENTS

USER = UUID(int=0xA11CE)
SECRET = "whsec-test-0123456789abcdef"


def crossings(ledger: Ledger, user: UUID) -> list[tuple[str, str, int]]:
    """(type, threshold, available) of the account's threshold events, in order."""
    found = []
    for event in ledger.history(user, limit=10_000):
        if event.type in ("balancelow", "balancerecovered"):
            found.append((event.type, event.data["threshold"], event.data["available_credits"]))
        elif event.type == "balancedepleted":
            found.append((event.type, "depleted", event.data["available_credits"]))
    return found


def test_one_low_per_downward_crossing_rearmed_only_above_the_level(ledger: Ledger) -> None:
    ledger.grant(USER, 100, "purchase", key="g1")
    ledger.set_balance_thresholds(USER, [Threshold.credits(50)], key="t1")
    assert crossings(ledger, USER) == []  # setting thresholds never notifies
    ledger.spend(USER, 30, key="s1")  # 70
    ledger.spend(USER, 20, key="s2")  # 50: at the level is a crossing
    ledger.spend(USER, 10, key="s3")  # 40: still low, no second notification
    ledger.grant(USER, 10, "bonus", key="g2")  # 50: not above the level, not re-armed
    ledger.spend(USER, 1, key="s4")  # 49
    assert crossings(ledger, USER) == [("balancelow", "credits:50", 50)]
    ledger.grant(USER, 2, "bonus", key="g3")  # 51: above, re-armed
    ledger.spend(USER, 1, key="s5")  # 50: fires again
    ledger.spend(USER, 50, key="s6")  # 0: depleted
    assert crossings(ledger, USER) == [
        ("balancelow", "credits:50", 50),
        ("balancerecovered", "credits:50", 51),
        ("balancelow", "credits:50", 50),
        ("balancedepleted", "depleted", 0),
    ]
    # A retry of the spend that crossed records nothing more.
    assert ledger.spend(USER, 50, key="s6").replayed
    assert len(crossings(ledger, USER)) == 4
    state = ledger.balance_thresholds(USER)
    assert state.source == "host"
    assert [(s.threshold, s.level_credits, s.fired) for s in state.states] == [
        ("credits:50", 50, True),
        ("depleted", 0, True),
    ]


def test_one_debit_across_several_levels_fires_each_once_highest_first(ledger: Ledger) -> None:
    ledger.grant(USER, 1_000, "purchase", key="g")
    ledger.set_balance_thresholds(USER, [{"credits": 100}, {"credits": 500}, {"credits": 250}], key="t")
    ledger.spend(USER, 1_000, key="all")
    assert crossings(ledger, USER) == [
        ("balancelow", "credits:500", 0),
        ("balancelow", "credits:250", 0),
        ("balancelow", "credits:100", 0),
        ("balancedepleted", "depleted", 0),
    ]
    ledger.grant(USER, 300, "purchase", key="back")
    assert crossings(ledger, USER)[4:] == [
        ("balancerecovered", "depleted", 300),
        ("balancerecovered", "credits:100", 300),
        ("balancerecovered", "credits:250", 300),
    ]


def test_holds_count_against_available_and_closing_them_rearms(ledger: Ledger, clock: ManualClock) -> None:
    ledger.grant(USER, 100, "purchase", key="g")
    ledger.set_balance_thresholds(USER, [Threshold.credits(20)], key="t")
    hold = ledger.reserve(USER, uuid4(), 90, key="r", expires_in=timedelta(minutes=5))
    assert crossings(ledger, USER) == [("balancelow", "credits:20", 10)]
    assert hold.reservation_id is not None
    ledger.release(hold.reservation_id, "job cancelled", key="rel")
    assert crossings(ledger, USER)[-1] == ("balancerecovered", "credits:20", 100)
    # A hold the sweep releases re-arms in the sweep's transaction.
    ledger.reserve(USER, uuid4(), 100, key="r2", expires_in=timedelta(minutes=5))
    clock.advance(timedelta(minutes=6))
    assert ledger.expire_holds() == 1  # releases and expirations: crossings are not counted
    assert crossings(ledger, USER)[-4:] == [
        ("balancelow", "credits:20", 0),
        ("balancedepleted", "depleted", 0),
        ("balancerecovered", "depleted", 100),
        ("balancerecovered", "credits:20", 100),
    ]


def test_a_refused_command_records_no_crossing(ledger: Ledger) -> None:
    ledger.grant(USER, 10, "purchase", key="g")
    ledger.set_balance_thresholds(USER, [Threshold.credits(5)], key="t")
    with pytest.raises(InsufficientCredits):
        ledger.spend(USER, 11, key="too-much")
    assert crossings(ledger, USER) == []


def test_unwatched_accounts_record_nothing(ledger: Ledger) -> None:
    ledger.grant(USER, 10, "purchase", key="g")
    ledger.spend(USER, 10, key="s")
    assert crossings(ledger, USER) == []
    state = ledger.balance_thresholds(USER)
    assert (state.source, state.thresholds, state.states) == ("none", [], [])
    # An empty list watches depletion only.
    ledger.set_balance_thresholds(USER, [], key="t")
    assert crossings(ledger, USER) == []  # already at 0: starts depleted
    ledger.grant(USER, 5, "bonus", key="g2")
    ledger.spend(USER, 5, key="s2")
    assert crossings(ledger, USER) == [("balancerecovered", "depleted", 5), ("balancedepleted", "depleted", 0)]


@pytest.mark.parametrize(
    "bad",
    [
        [{"percent": 0}],
        [{"percent": 101}],
        [{"credits": 0}],
        [{"credits": 1.5}],
        [{"credits": True}],
        [{"credits": 5}, {"credits": 5}],
        [{"credits": n} for n in range(1, 12)],
        [{"credits": 5, "percent": 5}],
        [{"minutes": 5}],
        "credits:5",
        [5],
    ],
)
def test_bad_thresholds_are_refused_before_anything_is_recorded(ledger: Ledger, bad: object) -> None:
    with pytest.raises(InvalidArgument) as raised:
        ledger.set_balance_thresholds(USER, bad, key="t")  # type: ignore[arg-type]
    assert raised.value.param == "thresholds"
    with pytest.raises(UnknownAccount):
        ledger.balance(USER)


def _watched_plan(thresholds: list[dict[str, int]], credits: int = 1_000) -> PlanTerms:
    base = next(t for t in DEFAULT_CATALOG if t.name == "pro")
    features = {**base.features, "balance_notifications": Feature(True, {"thresholds": thresholds})}
    return replace_terms(base, name="watched", credits=credits, features=features)


def replace_terms(terms: PlanTerms, **changes: object) -> PlanTerms:
    data = terms.as_event_data()
    data.update(changes)
    data["features"] = {k: {"enabled": f.enabled, "config": f.config} for k, f in data["features"].items()}
    return PlanTerms.from_event_data(data)


def test_plan_defaults_and_percentages_of_the_period_grant(ledger: Ledger, clock: ManualClock) -> None:
    ledger.define_plan(_watched_plan([{"percent": 20}, {"credits": 900}]))
    started = ledger.start_subscription(USER, "watched", key="sub")
    assert started.subscription_id is not None
    state = ledger.balance_thresholds(USER)
    assert (state.source, state.period_grant_credits) == ("plan", 1_000)
    assert [(s.threshold, s.level_credits) for s in state.states] == [
        ("credits:900", 900),
        ("percent:20", 200),
        ("depleted", 0),
    ]
    ledger.spend(USER, 800, key="s1")  # 200 = 20 % of 1,000
    assert crossings(ledger, USER) == [("balancelow", "credits:900", 200), ("balancelow", "percent:20", 200)]
    # The host's thresholds replace the plan's; None returns to them.
    ledger.set_balance_thresholds(USER, [Threshold.percent(50)], key="host")
    assert ledger.balance_thresholds(USER).source == "host"
    assert ledger.balance_thresholds(USER).states[0].fired  # 200 is at or below 500: starts fired, silently
    ledger.set_balance_thresholds(USER, None, key="back")
    back = ledger.balance_thresholds(USER)
    assert back.source == "plan" and [s.fired for s in back.states] == [True, True, False]
    assert len(crossings(ledger, USER)) == 2
    # The next period's grant re-bases percentages and re-arms what it lifts above.
    clock.advance(timedelta(days=32))
    ledger.renew_subscription(started.subscription_id, key="renew")
    assert crossings(ledger, USER)[2:] == [
        ("balancerecovered", "percent:20", 1_000),
        ("balancerecovered", "credits:900", 1_000),
    ]


def test_a_plan_feature_with_bad_thresholds_is_refused(ledger: Ledger) -> None:
    with pytest.raises(InvalidArgument) as raised:
        ledger.define_plan(_watched_plan([{"percent": 250}]))
    assert raised.value.param == "thresholds"


def test_concurrent_writers_cross_each_threshold_once(durable_url: str) -> None:
    with Ledger(durable_url) as setup:
        setup.grant(USER, 120, "purchase", key="g")
        setup.set_balance_thresholds(USER, [Threshold.credits(60), Threshold.credits(20)], key="t")
    errors: list[BaseException] = []

    def spender(worker: int) -> None:
        with Ledger(durable_url) as mine:
            for i in range(20):
                key = f"w{worker}:{i}"
                while True:
                    try:
                        mine.spend(USER, 2, key=key)
                        break
                    except ConcurrencyExhausted:
                        continue  # the same key again: at most once
                    except BaseException as exc:
                        errors.append(exc)
                        return

    threads = [threading.Thread(target=spender, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with Ledger(durable_url) as check:
        assert check.balance(USER).available_credits == 0
        seen = [(kind, threshold) for kind, threshold, _ in crossings(check, USER)]
        assert seen == [("balancelow", "credits:60"), ("balancelow", "credits:20"), ("balancedepleted", "depleted")]


# -- the outbox --------------------------------------------------------------------------


def test_outbox_payloads_in_log_order(ledger: Ledger) -> None:
    ledger.grant(USER, 100, "purchase", key="g", reference_type="order", reference_id="o-1")
    ledger.set_balance_thresholds(USER, [Threshold.credits(50)], key="t")
    hold = ledger.reserve(USER, UUID(int=9), 60, key="r", expires_in=timedelta(minutes=5))
    assert hold.reservation_id is not None
    ledger.settle(hold.reservation_id, 60, key="settle")
    outbox = ledger.outbox()
    pending = outbox.pending()
    assert [n.type for n in pending] == ["credits.granted", "hold.opened", "balance.low", "hold.settled"]
    assert [n.position for n in pending] == sorted(n.position for n in pending)
    assert all(n.user_id == USER for n in pending)
    assert len({n.id for n in pending}) == 4
    payload = pending[2].payload()
    assert set(payload) == {"id", "type", "user_id", "occurred_at", "position", "schema", "data"}
    assert payload["data"] == {"threshold": "credits:50", "level_credits": 50, "available_credits": 40}
    assert payload["occurred_at"].endswith("Z") and payload["user_id"] == str(USER)
    granted = pending[0].data
    assert (granted["amount_credits"], granted["kind"], granted["reference_id"]) == (100, "purchase", "o-1")
    assert pending[1].data["job_id"] == str(UUID(int=9)) and pending[1].data["amount_credits"] == 60
    # The same notification has the same id and body however often it is read.
    again = ledger.outbox("another").pending()
    assert [n.body() for n in again] == [n.body() for n in pending]
    # A type filter.
    assert [n.type for n in ledger.outbox("lows", types=["balance.low"]).pending()] == ["balance.low"]
    with pytest.raises(InvalidArgument):
        ledger.outbox("x", types=["balance.lowish"])


def test_subscription_changes_reach_the_outbox(ledger: Ledger) -> None:
    ledger.install_default_catalog()
    started = ledger.start_subscription(USER, "pro", key="sub")
    assert started.subscription_id is not None
    ledger.change_plan(started.subscription_id, "studio", key="up")
    changes = [n for n in ledger.outbox().pending() if n.type == "subscription.changed"]
    assert [n.data["change"] for n in changes] == ["started", "plan_changed"]
    assert all(n.user_id == USER for n in changes)
    assert changes[1].data["subscription_id"] == str(started.subscription_id)
    assert changes[1].data["details"]["to_plan"] == "studio"


def test_consume_is_at_least_once_and_resumable(ledger: Ledger) -> None:
    for i in range(5):
        ledger.grant(USER, 10, "bonus", key=f"g{i}")
    outbox = ledger.outbox("mailer")
    handled: list[Notification] = []

    def flaky(n: Notification) -> None:
        handled.append(n)
        if len(handled) == 3:
            raise RuntimeError("mail server down")

    with pytest.raises(RuntimeError):
        outbox.consume(flaky)
    assert outbox.position() == handled[1].position  # the third was not finished
    assert outbox.consume(handled.append) == 3
    assert [n.data["entry_id"] for n in handled][2:] == [n.data["entry_id"] for n in handled][2:]
    assert len({n.id for n in handled}) == 5 and len(handled) == 6  # the failed one came again
    assert outbox.pending() == [] and outbox.consume(handled.append) == 0
    assert outbox.lag() == 0  # past the key records after the last notification too
    # Another consumer has its own position.
    assert len(ledger.outbox("billing").pending()) == 5


def test_positions_survive_a_restart_and_a_stale_move_is_refused(durable_url: str) -> None:
    with Ledger(durable_url) as first:
        for i in range(3):
            first.grant(USER, 10, "bonus", key=f"g{i}")
        outbox = first.outbox("mailer")
        one = outbox.pending(limit=1)[0]
        outbox.commit(0, one.position)
    with Ledger(durable_url) as second:
        again: Outbox = second.outbox("mailer")
        assert again.position() == one.position
        assert len(again.pending()) == 2
        with pytest.raises(OutboxMoved):
            again.commit(0, one.position + 1)  # read from 0, but the position moved on
        with pytest.raises(InvalidArgument):
            again.commit(one.position, 0)
        assert again.position() == one.position


def test_dead_letters_are_durable_and_listed(ledger: Ledger) -> None:
    ledger.grant(USER, 10, "bonus", key="g")
    outbox = ledger.outbox("hooks")
    n = outbox.pending()[0]
    with outbox.advancing(0, n.position) as tx:
        outbox.bury(tx, n, attempts=8, error="HTTP 500")
    [letter] = outbox.dead_letters()
    assert (letter.notification_id, letter.position, letter.attempts, letter.status) == (n.id, n.position, 8, "dead")
    assert outbox.at(letter.position) == n
    outbox.mark_redelivered(n.id)
    assert outbox.dead_letters() == [] and outbox.dead_letters(status="all")[0].status == "redelivered"
    assert ledger.outbox("other").dead_letters(status="all") == []


# -- signatures ----------------------------------------------------------------------------


def test_verify_signature_accepts_what_was_signed_and_refuses_the_rest() -> None:
    body = b'{"id":"x"}'
    headers = signed_headers(SECRET, body, now_s=1_000_000)
    stamp, signature = headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER]
    verify_signature(SECRET, body, stamp, signature, now_s=1_000_100)
    verify_signature(SECRET.encode(), body, stamp, f"v1=00, {signature}", now_s=1_000_000)  # rotation: any matches
    cases = [
        ("mismatch", dict(body=body + b" ")),
        ("mismatch", dict(secret="another-secret-0123456789")),
        ("mismatch", dict(signature=sign(SECRET, body, 999_999))),
        ("stale_timestamp", dict(now_s=1_000_301)),
        ("missing_timestamp", dict(timestamp=None)),
        ("missing_timestamp", dict(timestamp="12.5")),
        ("missing_signature", dict(signature="")),
        # Hostile header values are refused as such, never a ValueError or TypeError.
        ("missing_timestamp", dict(timestamp="\u00b2")),
        ("missing_timestamp", dict(timestamp="1" * 5_000)),
        ("missing_timestamp", dict(timestamp="\u0661\u0660\u0660\u0660\u0660\u0660\u0660")),
        ("mismatch", dict(signature="v1=\u00e9")),
    ]
    for reason, change in cases:
        args: dict[str, object] = {
            "secret": SECRET,
            "body": body,
            "timestamp": stamp,
            "signature": signature,
            "now_s": 1_000_000,
            **change,
        }
        with pytest.raises(InvalidSignature) as raised:
            verify_signature(
                args["secret"],  # type: ignore[arg-type]
                args["body"],  # type: ignore[arg-type]
                args["timestamp"],  # type: ignore[arg-type]
                args["signature"],  # type: ignore[arg-type]
                now_s=args["now_s"],  # type: ignore[arg-type]
            )
        assert raised.value.reason == reason, change
        assert raised.value.code == "invalid_signature"
    with pytest.raises(InvalidArgument):
        verify_signature("short", body, stamp, signature)


def test_threshold_values() -> None:
    assert Threshold.credits(5).id == "credits:5" and Threshold.percent(10).level(999) == 99
    assert Threshold.percent(10).level(0) is None
    assert Threshold.from_data({"percent": 7}) == Threshold.percent(7)


#: The account of tests/fixtures/stored_events_v0_1.json (see tests/test_event_compatibility.py).
STORED_USER = UUID("00000000-0000-4000-8000-000000000001")


def load_v0_1_fixture(ledger: Ledger, *, with_snapshots: bool) -> dict[str, Any]:
    """The events (and snapshots) version 0.1 wrote, inserted as they were stored."""
    data = json.loads((Path(__file__).parent / "fixtures" / "stored_events_v0_1.json").read_text())

    def stored(table: str) -> list[StoredEvent]:
        return [
            StoredEvent(UUID(r["originator_id"]), r["originator_version"], r["topic"], r["state"].encode())
            for r in data["rows"]
            if r["table"] == table
        ]

    ledger.app.recorder.insert_events(stored("events"))
    if with_snapshots:
        assert ledger.app.snapshots is not None
        ledger.app.snapshots.recorder.insert_events(stored("snapshots"))
    return dict(data["expected"])


@pytest.mark.parametrize("with_snapshots", [True, False])
def test_accounts_stored_before_thresholds_load_unwatched_and_can_be_watched(
    ledger: Ledger, with_snapshots: bool
) -> None:
    expected = load_v0_1_fixture(ledger, with_snapshots=with_snapshots)
    assert ledger.balance_thresholds(STORED_USER).source == "none"
    ledger.spend(STORED_USER, 1, key="watched:unwatched-spend")
    assert crossings(ledger, STORED_USER) == []
    available = ledger.balance(STORED_USER).available_credits
    assert available > 2
    ledger.set_balance_thresholds(STORED_USER, [Threshold.credits(available - 2)], key="watched:set")
    ledger.spend(STORED_USER, 1, key="watched:s1")
    ledger.spend(STORED_USER, 1, key="watched:s2")
    ledger.spend(STORED_USER, 1, key="watched:s3")
    assert crossings(ledger, STORED_USER) == [("balancelow", f"credits:{available - 2}", available - 2)]
    assert len(ledger.history(STORED_USER, limit=10_000)) == expected["events"] + 6


def test_threshold_state_survives_snapshots_and_reopening(durable_url: str) -> None:
    spends = SNAPSHOT_INTERVAL_EVENTS + 5
    with Ledger(durable_url) as ledger:
        ledger.grant(USER, 10_000, "purchase", key="g")
        ledger.set_balance_thresholds(USER, [Threshold.credits(9_950), Threshold.credits(10)], key="t")
        for i in range(spends):
            ledger.spend(USER, 1, key=f"s{i}")
        assert ledger.app.snapshots is not None
        assert ledger.app.snapshots.recorder.select_events(account_id_for(USER), desc=True, limit=1)
    with Ledger(durable_url) as reopened:
        state = reopened.balance_thresholds(USER)
        assert state.available_credits == 10_000 - spends
        assert [(s.threshold, s.fired) for s in state.states] == [
            ("credits:9950", True),
            ("credits:10", False),
            ("depleted", False),
        ]
        reopened.spend(USER, state.available_credits - 10, key="down")
        assert [(kind, t) for kind, t, _ in crossings(reopened, USER)] == [
            ("balancelow", "credits:9950"),
            ("balancelow", "credits:10"),
        ]


def test_a_plan_stored_with_a_config_the_feature_refuses_gives_no_defaults(ledger: Ledger) -> None:
    from ledger.domain.plans import Plan, plan_id_for

    terms = _watched_plan([{"percent": 10}])
    data = terms.as_event_data()
    data["features"]["balance_notifications"]["config"] = {"thresholds": [{"percent": 500}]}
    # As a store written before the feature was checked holds it.
    ledger.app.save(Plan._create(Plan.Defined, id=plan_id_for("watched"), terms=data, actor=None))
    ledger.set_balance_thresholds(USER, [Threshold.credits(10)], key="t")
    started = ledger.start_subscription(USER, "watched", key="sub")
    assert started.balance_credits == 1_000
    state = ledger.balance_thresholds(USER)
    assert (state.source, state.period_grant_credits) == ("host", 1_000)
