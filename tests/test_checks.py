"""``check`` and ``record_use``: entitlements, limits on uses, credits; a
check records nothing; a use counts once per key and never past the limit,
whoever writes it."""

from __future__ import annotations

import pickle
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import (
    CheckResult,
    Feature,
    FeatureNotEntitled,
    IdempotencyConflict,
    InvalidAmount,
    InvalidArgument,
    Ledger,
    ManualClock,
    PlanTerms,
    RecordUse,
    UnknownFeature,
    UseLimitReached,
)
from ledger.domain.usage import MAX_USES_PER_PERIOD, calendar_month

GiB = 1024**3
USER = UUID("7d1f3c2a-0b4e-4c6d-9a8b-1e2f3a4b5c6d")

METERED = PlanTerms(
    "metered",
    "Metered",
    Decimal("10.00"),
    Decimal("100.00"),
    1000,
    10 * GiB,
    2,
    1,
    features={
        "api_calls": Feature(True, {"uses_per_period": 2}),
        "exports": Feature(True, {"uses_per_period": 3, "period": "calendar_month"}),
        "sd_models": Feature(True),
        "lora_training": Feature(False),
    },
)


def _log_head(ledger: Ledger) -> int:
    return ledger.app.recorder.max_notification_id() or 0


@pytest.fixture
def metered(ledger: Ledger) -> Ledger:
    ledger.install_default_catalog()
    ledger.define_plan(METERED)
    return ledger


def _subscribe(ledger: Ledger, plan: str = "metered", user: UUID = USER) -> UUID:
    receipt = ledger.start_subscription(user, plan, key=f"start:{user}:{plan}")
    assert receipt.subscription_id is not None
    return receipt.subscription_id


# -- entitlements ------------------------------------------------------------------


def test_no_subscription_is_the_free_tier(metered: Ledger) -> None:
    refused = metered.check(USER, feature="sd_models")
    assert not refused
    assert (refused.reason, refused.plan, refused.status) == ("feature_not_in_plan", "free", "none")
    assert "free plan" in (refused.message or "")
    # Credits alone need no plan; a user with no account has none available.
    short = metered.check(USER, credits=1)
    assert (short.allowed, short.reason, short.available_credits) == (False, "insufficient_credits", 0)
    metered.grant(USER, 50, "bonus", key="bonus:1")
    ok = metered.check(USER, credits=50)
    assert ok.allowed and ok.reason is None and ok.available_credits == 50 and ok.requested_credits == 50
    assert not metered.check(USER, credits=51)


def test_a_plan_feature_disabled_or_absent_is_refused(metered: Ledger) -> None:
    _subscribe(metered)
    assert metered.check(USER, feature="sd_models").allowed
    disabled = metered.check(USER, feature="lora_training")
    assert (disabled.allowed, disabled.reason, disabled.plan) == (False, "feature_not_in_plan", "metered")
    assert "disabled" in (disabled.message or "")
    absent = metered.check(USER, feature="flux_model")  # the catalog knows it; this plan does not have it
    assert (absent.reason, absent.plan) == ("feature_not_in_plan", "metered")


def test_past_due_keeps_the_plan_and_expired_loses_it(metered: Ledger) -> None:
    sub = _subscribe(metered)
    metered.mark_past_due(sub, key="past-due")
    grace = metered.check(USER, feature="sd_models")
    assert (grace.allowed, grace.status, grace.plan) == (True, "past_due", "metered")
    metered.expire_subscription(sub, key="expire")
    gone = metered.check(USER, feature="sd_models")
    assert (gone.allowed, gone.reason, gone.plan, gone.status) == (False, "subscription_inactive", "free", "expired")
    with pytest.raises(FeatureNotEntitled) as caught:
        metered.record_use(USER, "api_calls", key="use:after-expiry")
    assert caught.value.reason == "subscription_inactive"


def test_queue_and_storage_against_the_plan(metered: Ledger) -> None:
    _subscribe(metered)  # queue_count 2, 10 GiB
    assert metered.check(USER, queued_jobs=1).allowed
    full = metered.check(USER, queued_jobs=2)
    assert (full.reason, full.queue_count, full.queued_jobs) == ("queue_full", 2, 2)
    assert metered.check(USER, storage_used_bytes=10 * GiB).allowed
    over = metered.check(USER, storage_used_bytes=10 * GiB + 1)
    assert (over.reason, over.storage_bytes) == ("storage_full", 10 * GiB)


def test_the_first_failing_rule_is_the_reason_and_every_figure_is_reported(metered: Ledger) -> None:
    _subscribe(metered)  # grants 1000 credits
    metered.record_use(USER, "api_calls", key="u1")
    metered.record_use(USER, "api_calls", key="u2")
    result = metered.check(USER, feature="api_calls", credits=5000, queued_jobs=9)
    assert result.reason == "use_limit_reached"
    assert (result.use_limit, result.uses, result.uses_left) == (2, 2, 0)
    assert result.available_credits == 1000 and result.requested_credits == 5000


# -- limits on uses ------------------------------------------------------------------


def test_uses_count_once_per_key_up_to_the_limit(metered: Ledger) -> None:
    sub = _subscribe(metered)
    first = metered.check(USER, feature="api_calls")
    assert (first.allowed, first.use_limit, first.uses, first.uses_left, first.period) == (
        True, 2, 0, 2, "subscription",
    )  # fmt: skip
    view = metered.subscription(sub)
    assert (first.period_start, first.period_end) == (view.current_period_start, view.current_period_end)
    receipt = metered.record_use(USER, "api_calls", key="job:1:use")
    assert receipt.command == "record_use" and not receipt.replayed and receipt.amount_credits == 0
    assert metered.record_use(USER, "api_calls", key="job:1:use").replayed  # a retry counts nothing
    assert metered.check(USER, feature="api_calls").uses == 1
    metered.record_use(USER, "api_calls", key="job:2:use")
    spent = metered.check(USER, feature="api_calls")
    assert (spent.allowed, spent.reason, spent.uses, spent.uses_left) == (False, "use_limit_reached", 2, 0)
    head = _log_head(metered)
    with pytest.raises(UseLimitReached) as caught:
        metered.record_use(USER, "api_calls", key="job:3:use")
    assert (caught.value.limit, caught.value.used, caught.value.requested) == (2, 2, 1)
    assert _log_head(metered) == head  # refused: nothing recorded
    # A retry of a recorded key still replays when the limit is reached.
    assert metered.record_use(USER, "api_calls", key="job:2:use").replayed
    with pytest.raises(IdempotencyConflict):
        metered.record_use(USER, "exports", key="job:2:use")


def test_uses_beyond_the_limit_in_one_command_are_refused(metered: Ledger) -> None:
    _subscribe(metered)
    with pytest.raises(UseLimitReached):
        metered.record_use(USER, "api_calls", key="batch", uses=3)
    metered.record_use(USER, "api_calls", key="batch-of-two", uses=2)
    assert metered.check(USER, feature="api_calls").uses_left == 0
    assert not metered.check(USER, feature="exports", uses=4)
    assert metered.check(USER, feature="exports", uses=3)


def test_a_new_subscription_period_starts_a_new_count(metered: Ledger, clock: ManualClock) -> None:
    sub = _subscribe(metered)
    metered.record_use(USER, "api_calls", key="u1", uses=2)
    assert not metered.check(USER, feature="api_calls")
    clock.set(metered.subscription(sub).current_period_end - timedelta(hours=1))
    old_end = metered.subscription(sub).current_period_end
    metered.renew_subscription(sub, key="renew:1")  # ahead of the period's end
    early = metered.check(USER, feature="api_calls")
    assert (early.allowed, early.uses, early.period_end) == (False, 2, old_end)  # the old period is in force
    clock.set(old_end)
    renewed = metered.check(USER, feature="api_calls")
    assert (renewed.allowed, renewed.uses, renewed.uses_left) == (True, 0, 2)
    assert renewed.period_start == metered.subscription(sub).current_period_start


def test_a_calendar_month_limit_counts_by_the_utc_month(metered: Ledger, clock: ManualClock) -> None:
    clock.set(datetime(2026, 3, 31, 23, 0, tzinfo=UTC))
    _subscribe(metered)
    metered.record_use(USER, "exports", key="e1", uses=3)
    march = metered.check(USER, feature="exports")
    assert (march.allowed, march.period, march.period_start, march.period_end) == (
        False, "calendar_month", datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC),
    )  # fmt: skip
    clock.advance(timedelta(hours=2))  # 1 April, still the same subscription period
    april = metered.check(USER, feature="exports")
    assert (april.allowed, april.uses, april.period_start) == (True, 0, datetime(2026, 4, 1, tzinfo=UTC))
    assert calendar_month(datetime(2026, 12, 15, tzinfo=UTC)) == (
        datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC),
    )  # fmt: skip


def test_an_unlimited_feature_counts_uses_without_a_limit(metered: Ledger) -> None:
    _subscribe(metered)
    metered.record_use(USER, "sd_models", key="sd:1", uses=5)
    result = metered.check(USER, feature="sd_models")
    assert (result.allowed, result.use_limit, result.uses, result.uses_left) == (True, None, 5, None)


# -- a check records nothing ------------------------------------------------------------


def test_a_check_without_a_use_to_record_records_nothing(metered: Ledger) -> None:
    _subscribe(metered)
    metered.reserve(USER, uuid4(), 100, key="hold", expires_in=timedelta(hours=1))
    head = _log_head(metered)
    events = [e.type for e in metered.history(USER)]
    for kwargs in (
        {"feature": "api_calls"},
        {"feature": "lora_training"},
        {"credits": 10},
        {"credits": 10_000},
        {"feature": "sd_models", "credits": 1, "queued_jobs": 0, "storage_used_bytes": 1},
    ):
        metered.check(USER, max_age_s=0, **kwargs)
    metered.check(uuid4(), credits=1)  # no account, no slot: nothing is opened either
    assert _log_head(metered) == head
    assert [e.type for e in metered.history(USER)] == events


def test_check_with_a_key_records_the_use_once(metered: Ledger) -> None:
    _subscribe(metered)
    first = metered.check(USER, feature="api_calls", record_use_key="job:7:use")
    assert (first.allowed, first.use_recorded, first.replayed, first.uses, first.uses_left) == (True, True, False, 1, 1)
    again = metered.check(USER, feature="api_calls", record_use_key="job:7:use")
    assert (again.allowed, again.use_recorded, again.replayed, again.uses) == (True, True, True, 1)
    metered.check(USER, feature="api_calls", record_use_key="job:8:use")
    head = _log_head(metered)
    refused = metered.check(USER, feature="api_calls", record_use_key="job:9:use")
    assert (refused.allowed, refused.reason, refused.use_recorded) == (False, "use_limit_reached", False)
    # A retry of a use recorded before the limit was reached is still the first answer.
    retried = metered.check(USER, feature="api_calls", record_use_key="job:8:use")
    assert (retried.allowed, retried.replayed, retried.uses_left) == (True, True, 0)
    assert _log_head(metered) == head


def test_a_check_refused_for_credits_records_no_use(metered: Ledger) -> None:
    _subscribe(metered)  # 1000 credits
    head = _log_head(metered)
    refused = metered.check(USER, feature="api_calls", credits=1001, record_use_key="job:big:use")
    assert (refused.allowed, refused.reason, refused.use_recorded) == (False, "insufficient_credits", False)
    assert _log_head(metered) == head
    assert metered.check(USER, feature="api_calls").uses == 0


# -- the cache and its staleness ---------------------------------------------------------


def test_this_ledgers_commands_show_at_once(metered: Ledger) -> None:
    metered.grant(USER, 100, "bonus", key="g1")
    assert metered.check(USER, credits=100).allowed
    metered.spend(USER, 1, key="s1")
    assert metered.check(USER, credits=100).reason == "insufficient_credits"
    hold = metered.reserve(USER, uuid4(), 50, key="r1", expires_in=timedelta(hours=1))
    assert metered.check(USER, credits=1).available_credits == 49
    assert hold.reservation_id is not None
    metered.release(hold.reservation_id, "cancelled", key="rel1")
    assert metered.check(USER, credits=1).available_credits == 99
    # A plan revision shows at once too.
    _subscribe(metered)
    assert metered.check(USER, feature="api_calls").use_limit == 2
    features = dict(METERED.features, api_calls=Feature(True, {"uses_per_period": 5}))
    metered.define_plan(PlanTerms(**{**_terms_fields(METERED), "features": features}))
    assert metered.check(USER, feature="api_calls").use_limit == 5


def test_the_cache_ends_at_an_expiry_whatever_max_age(metered: Ledger, clock: ManualClock) -> None:
    metered.grant(USER, 100, "bonus", key="g1")
    metered.reserve(USER, uuid4(), 60, key="r1", expires_in=timedelta(minutes=10))
    metered.grant(USER, 20, "bonus", key="g2", expires_in=timedelta(minutes=30))
    assert metered.check(USER, credits=1, max_age_s=3600).available_credits == 60
    clock.advance(timedelta(minutes=10))
    assert metered.check(USER, credits=1, max_age_s=3600).available_credits == 120  # the hold lapsed
    clock.advance(timedelta(minutes=20))
    assert metered.check(USER, credits=1, max_age_s=3600).available_credits == 100  # the block lapsed


def test_a_lapsed_block_a_hold_keeps_does_not_end_the_cache(
    metered: Ledger, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block's remainder stays in the balance until the hold closes; the
    state after the lapse is cached like any other, until the hold expires."""
    metered.grant(USER, 100, "bonus", key="g1", expires_in=timedelta(minutes=10))
    metered.reserve(USER, uuid4(), 60, key="r1", expires_in=timedelta(hours=1))
    clock.advance(timedelta(minutes=20))
    assert metered.check(USER, credits=1, max_age_s=3600).available_credits == 0
    loads = _count_loads(metered, monkeypatch)
    clock.advance(timedelta(minutes=1))
    assert metered.check(USER, credits=1, max_age_s=3600).available_credits == 0
    assert loads == []  # cached: nothing has changed since the lapse
    clock.advance(timedelta(hours=1))
    assert metered.check(USER, credits=1, max_age_s=3600).available_credits == 0  # the hold lapsed too
    assert metered.balance(USER).balance_credits == 0


def test_another_ledgers_writes_show_within_max_age(durable_url: str) -> None:
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    with Ledger(durable_url, clock=clock) as writer, Ledger(durable_url, clock=clock) as reader:
        writer.grant(USER, 100, "bonus", key="g1")
        assert reader.check(USER, credits=100).allowed
        writer.spend(USER, 40, key="s1")
        stale = reader.check(USER, credits=100)
        assert stale.allowed and stale.available_credits == 100  # cached: advisory
        assert stale.state_as_of == clock.now()
        assert not reader.check(USER, credits=100, max_age_s=0)  # fresh on request
        writer.spend(USER, 10, key="s2")
        assert reader.check(USER, credits=1).available_credits == 60
        clock.advance(timedelta(seconds=1.5))  # past the default max_age_s of 1 s
        assert reader.check(USER, credits=1).available_credits == 50
        # The spend, not the check, enforces.
        with pytest.raises(Exception, match="available"):
            reader.spend(USER, 51, key="s3")


# -- two writers of the last use -------------------------------------------------------


def test_concurrent_writers_of_the_last_use_only_one_wins(durable_url: str) -> None:
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    with Ledger(durable_url, clock=clock) as setup:
        setup.install_default_catalog()
        setup.define_plan(METERED)
        _subscribe(setup)
        setup.record_use(USER, "api_calls", key="first")  # one of two left
    writers = 4
    ledgers = [Ledger(durable_url, clock=clock) for _ in range(writers)]
    for ledger in ledgers:  # warm: each has read the counter before the race
        assert ledger.check(USER, feature="api_calls").uses_left == 1
    barrier = threading.Barrier(writers)
    outcomes: list[str] = []

    def race(i: int) -> None:
        barrier.wait()
        try:
            result = ledgers[i].check(USER, feature="api_calls", record_use_key=f"race:{i}")
            outcomes.append("won" if result.use_recorded else str(result.reason))
        except Exception as exc:  # pragma: no cover - reported by the assertion below
            outcomes.append(repr(exc))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert sorted(outcomes) == ["use_limit_reached"] * (writers - 1) + ["won"]
        final = ledgers[0].check(USER, feature="api_calls", max_age_s=0)
        assert (final.uses, final.uses_left) == (2, 0)
    finally:
        for ledger in ledgers:
            ledger.close()


def test_concurrent_record_use_threads_on_one_ledger(durable_url: str) -> None:
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    with Ledger(durable_url, clock=clock) as ledger:
        ledger.define_plan(METERED)
        _subscribe(ledger)
        results: list[str] = []
        barrier = threading.Barrier(6)

        def use(i: int) -> None:
            barrier.wait()
            try:
                ledger.record_use(USER, "exports", key=f"export:{i}")
                results.append("ok")
            except UseLimitReached:
                results.append("refused")

        threads = [threading.Thread(target=use, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(results) == ["ok"] * 3 + ["refused"] * 3
        assert ledger.check(USER, feature="exports", max_age_s=0).uses == 3


# -- errors --------------------------------------------------------------------------


def test_unknown_features_and_bad_arguments_are_typed_errors(metered: Ledger) -> None:
    with pytest.raises(UnknownFeature) as unknown:
        metered.check(USER, feature="flux_modle")
    assert unknown.value.code == "unknown_feature" and "flux_model" in unknown.value.known
    with pytest.raises(UnknownFeature):
        metered.record_use(USER, "flux_modle", key="k")
    bad: list[tuple[dict[str, object], str]] = [
        ({}, "feature"),
        ({"feature": ""}, "feature"),
        ({"feature": 3}, "feature"),
        ({"feature": "x" * 51}, "feature"),
        ({"credits": 0}, "credits"),
        ({"credits": True}, "credits"),
        ({"credits": 1.5}, "credits"),
        ({"credits": 1, "uses": 0}, "uses"),
        ({"queued_jobs": -1}, "queued_jobs"),
        ({"storage_used_bytes": "1"}, "storage_used_bytes"),
        ({"credits": 1, "max_age_s": -1}, "max_age_s"),
        ({"credits": 1, "max_age_s": True}, "max_age_s"),
        ({"credits": 1, "record_use_key": "k"}, "feature"),
        ({"feature": "sd_models", "record_use_key": " k"}, "key"),
    ]
    for kwargs, param in bad:
        with pytest.raises(InvalidArgument) as caught:
            metered.check(USER, **kwargs)  # type: ignore[arg-type]
        assert caught.value.param == param, kwargs
    with pytest.raises(InvalidAmount):
        metered.check(USER, credits=-5)
    with pytest.raises(InvalidArgument) as caught:
        metered.check("not-a-uuid", credits=1)  # type: ignore[arg-type]
    assert caught.value.param == "user_id"
    with pytest.raises(InvalidArgument) as caught:
        RecordUse(key="k", user_id=USER, feature="api_calls", uses=MAX_USES_PER_PERIOD + 1)
    assert caught.value.param == "uses"


def test_a_plan_with_a_limit_the_ledger_cannot_count_is_refused(ledger: Ledger) -> None:
    for config in ({"uses_per_period": -1}, {"uses_per_period": "10"}, {"uses_per_period": 5, "period": "week"}):
        terms = PlanTerms(**{**_terms_fields(METERED), "features": {"api_calls": Feature(True, config)}})
        with pytest.raises(InvalidArgument) as caught:
            ledger.define_plan(terms)
        assert caught.value.param == "features"


def test_errors_and_results_survive_pickling(metered: Ledger) -> None:
    _subscribe(metered)
    metered.record_use(USER, "api_calls", key="u", uses=2)
    with pytest.raises(UseLimitReached) as caught:
        metered.record_use(USER, "api_calls", key="u2")
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (copy.code, copy.limit, copy.feature, str(copy)) == ("use_limit_reached", 2, "api_calls", str(caught.value))
    result = metered.check(USER, feature="api_calls")
    assert isinstance(result, CheckResult)
    assert CheckResult.model_validate(result.model_dump()) == result


def _terms_fields(terms: PlanTerms) -> dict[str, Any]:
    return {
        "name": terms.name,
        "display_name": terms.display_name,
        "monthly_price": terms.monthly_price,
        "yearly_price": terms.yearly_price,
        "credits": terms.credits,
        "storage_bytes": terms.storage_bytes,
        "queue_count": terms.queue_count,
        "tier_level": terms.tier_level,
        "features": terms.features,
    }


def test_a_result_is_the_model_pydantic_would_build(metered: Ledger) -> None:
    _subscribe(metered)
    for kwargs in ({"feature": "api_calls", "credits": 5}, {"feature": "lora_training"}, {"credits": 10**6}):
        result = metered.check(USER, **kwargs)
        built = CheckResult.model_construct(**result.model_dump())
        assert result == built and repr(result) == repr(built)
        assert result.model_dump_json() == built.model_dump_json()
        assert CheckResult.model_validate_json(result.model_dump_json()) == result
        assert result.model_fields_set == built.model_fields_set
        with pytest.raises(Exception, match="frozen"):
            result.allowed = not result.allowed
        assert result.model_copy(update={"allowed": False}).allowed is False


def test_the_audit_finds_nothing_wrong_with_recorded_uses(metered: Ledger) -> None:
    from ledger import audit

    _subscribe(metered)
    metered.record_use(USER, "api_calls", key="a1")
    metered.check(USER, feature="api_calls", record_use_key="a2")
    metered.record_use(USER, "sd_models", key="a3", uses=7)
    metered.record_use(USER, "api_calls", key="a1")  # a replay
    metered.views.catch_up()
    report = audit(metered)
    assert report.findings == [], report.findings


def test_a_use_recorded_by_another_ledger_shows_after_max_age(durable_url: str) -> None:
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    with Ledger(durable_url, clock=clock) as writer, Ledger(durable_url, clock=clock) as reader:
        writer.define_plan(METERED)
        _subscribe(writer)
        assert reader.check(USER, feature="api_calls").uses_left == 2
        writer.record_use(USER, "api_calls", key="w1", uses=2)
        assert reader.check(USER, feature="api_calls").uses_left == 2  # cached
        # The command decides on the store, not on the reader's cache.
        with pytest.raises(UseLimitReached):
            reader.record_use(USER, "api_calls", key="r1")
        # ... and the refusal dropped nothing it should not have; a fresh read agrees.
        assert reader.check(USER, feature="api_calls", max_age_s=0).uses_left == 0
        clock.advance(timedelta(seconds=2))
        assert not reader.check(USER, feature="api_calls")


def test_a_plan_change_moves_the_feature_and_limit_at_once(metered: Ledger) -> None:
    sub = _subscribe(metered, "starter")
    assert metered.check(USER, feature="flux_model").reason == "feature_not_in_plan"
    metered.change_plan(sub, "pro", key="upgrade")
    upgraded = metered.check(USER, feature="flux_model")
    assert (upgraded.allowed, upgraded.plan) == (True, "pro")


def test_a_void_pause_is_inactive_and_a_free_pause_keeps_the_plan(metered: Ledger) -> None:
    sub = _subscribe(metered)
    metered.pause_subscription(sub, key="pause", mode="void")
    paused = metered.check(USER, feature="sd_models")
    assert (paused.reason, paused.status, paused.plan) == ("subscription_inactive", "paused", "free")
    metered.unpause_subscription(sub, key="unpause")
    metered.pause_subscription(sub, key="pause-free", mode="free")
    assert metered.check(USER, feature="sd_models").allowed


def test_a_cancelled_subscription_keeps_its_plan_until_the_period_ends(metered: Ledger, clock: ManualClock) -> None:
    sub = _subscribe(metered)
    metered.cancel_subscription(sub, key="cancel")
    end = metered.subscription(sub).current_period_end
    assert metered.check(USER, feature="sd_models", max_age_s=3600).allowed
    clock.set(end)  # the cached state ends with the period, whatever max_age_s
    ended = metered.check(USER, feature="sd_models", max_age_s=3600)
    assert (ended.allowed, ended.reason, ended.status) == (False, "subscription_inactive", "cancelled")


def test_record_use_in_a_batch_is_all_or_nothing(metered: Ledger) -> None:
    from ledger import BatchRejected, GrantCredits

    _subscribe(metered)
    head = _log_head(metered)
    with pytest.raises(BatchRejected) as caught:
        metered.execute_batch(
            [
                GrantCredits(key="b-grant", user_id=USER, amount_credits=5, kind="bonus"),  # type: ignore[arg-type]
                RecordUse(key="b1", user_id=USER, feature="api_calls", uses=2),
                RecordUse(key="b2", user_id=USER, feature="api_calls"),
            ]
        )
    assert isinstance(caught.value.cause, UseLimitReached) and caught.value.index == 2
    assert _log_head(metered) == head
    receipts = metered.execute_batch([RecordUse(key="b1", user_id=USER, feature="api_calls", uses=2)])
    assert receipts[0].command == "record_use"
    assert metered.check(USER, feature="api_calls").uses == 2


def test_a_feature_another_ledger_defines_is_known_after_the_rescan_interval(
    durable_url: str,
) -> None:
    from ledger.application.access import FEATURE_RESCAN_S

    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    with Ledger(durable_url, clock=clock) as admin, Ledger(durable_url, clock=clock) as web:
        admin.install_default_catalog()
        with pytest.raises(UnknownFeature):
            web.check(USER, feature="api_calls")
        admin.define_plan(METERED)  # another process adds the feature
        with pytest.raises(UnknownFeature):
            web.check(USER, feature="api_calls")  # not read again yet: misspelt names cost no scan
        clock.advance(timedelta(seconds=FEATURE_RESCAN_S))
        assert web.check(USER, feature="api_calls").reason == "feature_not_in_plan"
        # A plan defined here is known at once.
        web.define_plan(PlanTerms(**{**_terms_fields(METERED), "name": "local", "features": {"x_y": Feature(True)}}))
        assert web.check(USER, feature="x_y").reason == "feature_not_in_plan"


# -- against a reference model -----------------------------------------------------------


_STEP = st.tuples(
    st.sampled_from(["record", "check_record", "check", "advance"]),
    st.integers(min_value=0, max_value=5),  # the key's number: small, so keys repeat
    st.integers(min_value=1, max_value=3),  # uses
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(_STEP, max_size=25))
def test_uses_follow_the_reference_model(steps: list[tuple[str, int, int]]) -> None:
    """Random uses, retries and checks: the count is the sum of the distinct
    keys' accepted uses, never above the limit; a check records nothing."""
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    limit = 4
    terms = PlanTerms(
        **{**_terms_fields(METERED), "features": {"api_calls": Feature(True, {"uses_per_period": limit})}}
    )
    with Ledger("memory://", clock=clock) as ledger:
        ledger.define_plan(terms)
        _subscribe(ledger)
        accepted: dict[str, int] = {}  # key -> uses counted under it
        refused_keys: set[str] = set()
        for action, n, uses in steps:
            key = f"k{n}:{uses}"  # a key always carries the same uses: no IdempotencyConflict
            counted = sum(accepted.values())
            if action == "advance":
                clock.advance(timedelta(seconds=3))  # within the period: the count stands
                continue
            if action == "check":
                head = _log_head(ledger)
                result = ledger.check(USER, feature="api_calls", uses=uses)
                assert result.uses == counted and result.uses_left == limit - counted
                assert result.allowed == (counted + uses <= limit)
                assert _log_head(ledger) == head
                continue
            fits = key in accepted or counted + uses <= limit
            if action == "record":
                try:
                    receipt = ledger.record_use(USER, "api_calls", key=key, uses=uses)
                except UseLimitReached:
                    assert not fits
                    refused_keys.add(key)
                else:
                    assert fits and receipt.replayed == (key in accepted)
                    accepted[key] = uses
            else:
                result = ledger.check(USER, feature="api_calls", uses=uses, record_use_key=key)
                assert result.allowed == fits and result.use_recorded == fits
                if fits:
                    assert result.replayed == (key in accepted)
                    accepted[key] = uses
            total = sum(accepted.values())
            assert total <= limit
            assert ledger.check(USER, feature="api_calls", max_age_s=0).uses == total


def _count_loads(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    loads: list[int] = []
    reader = ledger.checks.reader
    original = reader.load

    def counting(ids: Any, **kwargs: Any) -> Any:
        loads.append(len(ids))
        return original(ids, **kwargs)

    monkeypatch.setattr(reader, "load", counting)
    return loads


def test_unchanged_state_is_kept_past_max_age_and_changed_state_is_read_again(
    durable_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After max_age_s a check reads the log's new events (one read for all
    users), not every user's state again."""
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    other = UUID(int=77)
    with Ledger(durable_url, clock=clock) as writer, Ledger(durable_url, clock=clock) as reader:
        writer.grant(USER, 100, "bonus", key="g1")
        writer.grant(other, 100, "bonus", key="g2")
        assert reader.check(USER, credits=1).available_credits == 100
        assert reader.check(other, credits=1).available_credits == 100
        loads = _count_loads(reader, monkeypatch)
        clock.advance(timedelta(seconds=5))
        writer.spend(other, 30, key="s1")
        assert reader.check(USER, credits=1).available_credits == 100
        assert loads == []  # nothing of USER changed: the cached state stands
        assert reader.check(other, credits=1).available_credits == 70  # the poll dropped it
        assert loads != []
        kept = reader.check(USER, credits=1)
        assert kept.state_as_of == clock.now()  # known current as of the poll


def test_a_poll_far_behind_drops_the_whole_cache(durable_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from ledger.application import access

    monkeypatch.setattr(access, "POLL_PAGE", 2)
    monkeypatch.setattr(access, "MAX_POLL_PAGES", 1)
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    with Ledger(durable_url, clock=clock) as writer, Ledger(durable_url, clock=clock) as reader:
        writer.grant(USER, 100, "bonus", key="g1")
        assert reader.check(USER, credits=1).available_credits == 100
        for i in range(5):
            writer.grant(UUID(int=1000 + i), 1, "bonus", key=f"other:{i}")
        writer.spend(USER, 10, key="s1")
        clock.advance(timedelta(seconds=2))
        assert reader.check(USER, credits=1).available_credits == 90
        writer.spend(USER, 10, key="s2")  # the next poll starts from the head it jumped to
        clock.advance(timedelta(seconds=2))
        assert reader.check(USER, credits=1).available_credits == 80


def test_a_plan_change_keeps_the_periods_count_under_the_new_limit(metered: Ledger) -> None:
    plus = PlanTerms(
        **{
            **_terms_fields(METERED),
            "name": "metered_plus",
            "tier_level": 2,
            "features": {"api_calls": Feature(True, {"uses_per_period": 5})},
        }
    )
    metered.define_plan(plus)
    sub = _subscribe(metered)
    metered.record_use(USER, "api_calls", key="u", uses=2)
    assert not metered.check(USER, feature="api_calls")
    metered.change_plan(sub, "metered_plus", key="upgrade")
    after = metered.check(USER, feature="api_calls")
    assert (after.allowed, after.plan, after.use_limit, after.uses, after.uses_left) == (True, "metered_plus", 5, 2, 3)
    metered.record_use(USER, "api_calls", key="u2", uses=3)
    with pytest.raises(UseLimitReached):
        metered.record_use(USER, "api_calls", key="u3")


def test_checks_racing_this_ledgers_writes_end_on_the_written_state(durable_url: str) -> None:
    """Checks in some threads, spends in others, one Ledger: once the writes
    are done, every cached answer is the committed one (no load that raced a
    write kept what it read)."""
    users = [UUID(int=500 + i) for i in range(3)]
    with Ledger(durable_url) as ledger:
        for user in users:
            ledger.grant(user, 1_000, "bonus", key=f"race-grant:{user}")
        stop = threading.Event()
        errors: list[BaseException] = []

        def spend(user: UUID) -> None:
            try:
                for i in range(15):
                    ledger.spend(user, 1, key=f"race-spend:{user}:{i}")
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        def check() -> None:
            try:
                while not stop.is_set():
                    for user in users:
                        ledger.check(user, credits=1)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        checkers = [threading.Thread(target=check) for _ in range(2)]
        spenders = [threading.Thread(target=spend, args=(u,)) for u in users]
        for t in [*checkers, *spenders]:
            t.start()
        for t in spenders:
            t.join(timeout=120)
        stop.set()
        for t in checkers:
            t.join(timeout=60)
        assert errors == []
        for user in users:
            assert ledger.check(user, credits=1).available_credits == 985
            assert ledger.balance(user).available_credits == 985


# -- stored events live forever ------------------------------------------------------------

#: A counter's events as this version stores them: later versions must load them.
STORED_COUNTER = [
    (
        "pingvas.ledger:UsageCounter.Opened",
        b'{"timestamp":{"_type_":"datetime_iso","_data_":"2026-01-01T00:00:00+00:00"},'
        b'"originator_topic":"pingvas.ledger:UsageCounter",'
        b'"user_id":{"_type_":"uuid_hex","_data_":"7d1f3c2a0b4e4c6d9a8b1e2f3a4b5c6d"},"feature":"api_calls",'
        b'"period_start":{"_type_":"datetime_iso","_data_":"2026-01-01T00:00:00+00:00"},'
        b'"period_end":{"_type_":"datetime_iso","_data_":"2026-02-01T00:00:00+00:00"}}',
    ),
    (
        "pingvas.ledger:UsageCounter.Used",
        b'{"timestamp":{"_type_":"datetime_iso","_data_":"2026-01-01T00:00:00+00:00"},'
        b'"uses":2,"key":"use:1","limit":2}',
    ),
]


def test_usage_counter_topics_are_explicit_and_stored_counters_load(ledger: Ledger) -> None:
    from eventsourcing.persistence import StoredEvent

    from ledger.domain.usage import UsageCounter, counter_id_for

    classes = [UsageCounter, *(v for v in vars(UsageCounter).values() if isinstance(v, type))]
    own = [
        vars(k)["TOPIC"]
        for cls in classes
        for k in cls.__mro__[:2]
        if k.__qualname__ == cls.__qualname__ and "TOPIC" in vars(k)
    ]
    assert sorted(set(own)) == [
        "pingvas.ledger:UsageCounter",
        "pingvas.ledger:UsageCounter.Event",
        "pingvas.ledger:UsageCounter.Opened",
        "pingvas.ledger:UsageCounter.Snapshot",
        "pingvas.ledger:UsageCounter.Used",
    ]
    counter_id = counter_id_for(USER, "api_calls", datetime(2026, 1, 1, tzinfo=UTC))
    assert counter_id == UUID("33e8e802-2ade-53b0-9429-c1adb279fbc5")  # ids derive from user, feature, period
    stored = [
        StoredEvent(originator_id=counter_id, originator_version=v, topic=topic, state=state)
        for v, (topic, state) in enumerate(STORED_COUNTER, start=1)
    ]
    ledger.app.recorder.insert_events(stored)
    ledger.define_plan(METERED)
    _subscribe(ledger)  # its period starts at the clock's 2026-01-01, the stored counter's
    result = ledger.check(USER, feature="api_calls")
    assert (result.uses, result.allowed, result.reason) == (2, False, "use_limit_reached")
