"""The price book: quotes, its revisions, and holds sized by a quote, on every backend."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest

from ledger import (
    DEFAULT_PRICE_BOOK,
    MAX_CREDITS,
    BatchRejected,
    DefinePriceBook,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidAmount,
    InvalidArgument,
    InvalidJobParameter,
    JobParam,
    JobPrice,
    Ledger,
    ManualClock,
    PriceBook,
    PriceRule,
    ReserveForJob,
    RuleMode,
    StartSubscription,
    UnknownAccount,
    UnknownJobType,
    audit,
)
from ledger.domain.pricing import PRICE_BOOK_ID

ALICE = UUID(int=1)
BOB = UUID(int=2)
JOB = UUID(int=100)
HOUR = timedelta(hours=1)


def small_book(*, base: int = 10, multipliers: dict[str, Decimal] | None = None) -> PriceBook:
    return PriceBook(
        jobs={
            "render": JobPrice(
                Decimal(base),
                (
                    JobParam.integer("steps", 1, 100, default=20),
                    JobParam.integer("batch_size", 1, 8, default=1),
                    JobParam.choice("quality", ("draft", "final"), default="final"),
                ),
                (
                    PriceRule.per_unit("steps", Decimal("0.5"), included=20),
                    PriceRule.factor("batch_size", ("batch_size",), included=1),
                    PriceRule.by_choice("quality", {"draft": Decimal("0.5"), "final": Decimal(1)}),
                ),
                minimum_credits=3,
            )
        },
        plan_multipliers=multipliers or {},
    )


def events(ledger: Ledger) -> int:
    return ledger.app.recorder.max_notification_id() or 0


# ------------------------------------------------------------------ quotes


def test_the_default_book_prices_every_seed_job_type(ledger: Ledger) -> None:
    ledger.install_default_price_book()
    expected = {"text_to_image": 4, "image_to_image": 4, "inpaint": 5, "upscale": 5, "workflow": 8}
    for job_type, credits in expected.items():
        quote = ledger.quote(ALICE, job_type, {})
        assert (quote.job_type, quote.credits, quote.price_revision) == (job_type, credits, 1)
        assert sum(line.credits for line in quote.breakdown) == quote.credits
    quote = ledger.quote(
        ALICE, "text_to_image", {"steps": 50, "width": 2048, "height": 1024, "batch_size": 2, "base_model": "flux"}
    )
    # (4 + 20 steps x 0.1) x 2 (twice the area) x 2 (batch) x 2 (flux)
    assert quote.credits == 48
    assert [(line.label, line.credits) for line in quote.breakdown] == [
        ("base", 4),
        ("steps", 2),
        ("resolution", 6),
        ("batch_size", 12),
        ("base_model", 24),
    ]
    assert quote.params == {"width": 2048, "height": 1024, "steps": 50, "batch_size": 2, "base_model": "flux"}
    assert quote.plan is None and quote.plan_multiplier == 1


def test_a_quote_rounds_up_applies_the_minimum_and_ignores_undeclared_parameters(ledger: Ledger) -> None:
    ledger.define_price_book(small_book())
    quote = ledger.quote(ALICE, "render", {"steps": 21, "prompt": "a cat" * 1000, "seed": 7})
    assert (quote.exact_credits, quote.credits) == (Decimal("10.5"), 11)
    assert quote.breakdown[-1].kind == "rounding" and quote.breakdown[-1].credits == Decimal("0.5")
    assert "prompt" not in quote.params
    cheap = ledger.quote(ALICE, "render", {"steps": 1, "quality": "draft"})
    assert (cheap.exact_credits, cheap.credits) == (5, 5)
    with ledger_at_base(ledger, 1):
        low = ledger.quote(ALICE, "render", {"quality": "draft"}, fresh=True)
        assert (low.exact_credits, low.credits) == (Decimal("0.5"), 3)
        assert [line.kind for line in low.breakdown][-2:] == ["rounding", "minimum"]
        assert sum(line.credits for line in low.breakdown) == 3


@contextmanager
def ledger_at_base(ledger: Ledger, base: int) -> Iterator[None]:
    """The small book with another base, restored on exit."""
    ledger.define_price_book(small_book(base=base))
    try:
        yield
    finally:
        ledger.define_price_book(small_book())


def test_a_quote_records_nothing(ledger: Ledger) -> None:
    ledger.define_price_book(small_book(multipliers={"pro": Decimal("0.8")}))
    before = events(ledger)
    for _ in range(3):
        ledger.quote(ALICE, "render", {"steps": 40})
        ledger.quote(BOB, "render", {}, fresh=True)
    with pytest.raises(InvalidJobParameter):
        ledger.quote(ALICE, "render", {"steps": 0})
    assert events(ledger) == before


@pytest.mark.parametrize(
    ("params", "parameter", "words"),
    [
        ({"steps": 0}, "steps", "within 1..100"),
        ({"steps": 101}, "steps", "within 1..100"),
        ({"steps": "30"}, "steps", "must be a number"),
        ({"steps": True}, "steps", "must be a number"),
        ({"steps": 2.5}, "steps", "whole number"),
        ({"steps": float("nan")}, "steps", "must be a number"),
        ({"quality": "best"}, "quality", "one of draft, final"),
        ({"batch_size": [2]}, "batch_size", "must be a number"),
    ],
)
def test_an_invalid_parameter_is_named(ledger: Ledger, params: dict[str, Any], parameter: str, words: str) -> None:
    ledger.define_price_book(small_book())
    with pytest.raises(InvalidJobParameter) as caught:
        ledger.quote(ALICE, "render", params)
    assert (caught.value.parameter, caught.value.param, caught.value.job_type) == (
        parameter,
        f"params.{parameter}",
        "render",
    )
    assert caught.value.code == "invalid_job_parameter" and isinstance(caught.value, InvalidArgument)
    assert words in str(caught.value)


def test_a_required_parameter_and_a_whole_float(ledger: Ledger) -> None:
    book = PriceBook(jobs={"clip": JobPrice(Decimal(1), (JobParam.number("seconds", 0, 600),), (
        PriceRule.per_unit("seconds", Decimal("0.25")),))})  # fmt: skip
    ledger.define_price_book(book)
    with pytest.raises(InvalidJobParameter, match="'seconds' is required"):
        ledger.quote(ALICE, "clip", {})
    assert ledger.quote(ALICE, "clip", {"seconds": 10.5}).exact_credits == Decimal("3.625")
    assert ledger.quote(ALICE, "clip", {"seconds": Decimal("2")}).credits == 2
    ledger.define_price_book(small_book())
    assert ledger.quote(ALICE, "render", {"steps": 22.0}).credits == 11  # a whole float is a whole number


def test_an_unknown_job_type_and_no_book(ledger: Ledger) -> None:
    with pytest.raises(UnknownJobType, match="no price book is defined yet") as caught:
        ledger.quote(ALICE, "text_to_image", {})
    assert (caught.value.code, caught.value.param) == ("unknown_job_type", "job_type")
    assert ledger.price_book() is None and ledger.price_book_history() == []
    ledger.define_price_book(small_book())
    with pytest.raises(UnknownJobType, match="prices render") as caught:
        ledger.quote(ALICE, "text_to_image", {})
    assert caught.value.known == ("render",)
    with pytest.raises(InvalidArgument, match="params must be a mapping"):
        ledger.quote(ALICE, "render", [("steps", 3)])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        ledger.quote(UUID(int=0), "render", {})


# ---------------------------------------------------------------- the book


def test_revisions_are_kept_and_the_same_book_changes_nothing(ledger: Ledger) -> None:
    first = ledger.define_price_book(small_book(), actor="ops:lee")
    assert ledger.define_price_book(small_book(), actor="ops:kim").replayed
    ledger.define_price_book(small_book(base=12))
    current = ledger.price_book()
    assert current is not None and current.revision == 2 and current.book == small_book(base=12)
    history = ledger.price_book_history()
    assert [(r.revision, r.actor, r.book) for r in history] == [
        (1, "ops:lee", small_book()),
        (2, None, small_book(base=12)),
    ]
    assert ledger.quote(ALICE, "render", {}).price_revision == 2
    # Back to the first book: a third revision, not the first again.
    ledger.define_price_book(small_book())
    assert [r.revision for r in ledger.price_book_history()] == [1, 2, 3]
    assert ledger.quote(ALICE, "render", {}).credits == 10
    assert first.command == "define_price_book"


def test_define_with_a_key_is_idempotent(ledger: Ledger) -> None:
    ledger.define_price_book(small_book(), key="prices-2026-01")
    assert ledger.define_price_book(small_book(), key="prices-2026-01").replayed
    with pytest.raises(IdempotencyConflict) as caught:
        ledger.define_price_book(small_book(base=11), key="prices-2026-01")
    assert caught.value.fields == ("book",)
    assert [r.revision for r in ledger.price_book_history()] == [1]


def _job(**changes: Any) -> PriceBook:
    job = small_book().jobs["render"]
    return PriceBook(jobs={"render": replace(job, **changes)})


@pytest.mark.parametrize(
    ("book", "words"),
    [
        (PriceBook(jobs={}), "at least one job type"),
        (PriceBook(jobs={"text to image": small_book().jobs["render"]}), "must be an identifier"),
        (PriceBook(jobs={f"j{i}": small_book().jobs["render"] for i in range(65)}), "at most 64 job types"),
        (_job(minimum_credits=0), "minimum_credits"),
        (_job(base_credits=Decimal("-1")), "base_credits"),
        (_job(base_credits=Decimal("NaN")), "finite Decimal"),
        (_job(base_credits=4), "finite Decimal"),
        (_job(rules=tuple(PriceRule.per_unit("steps", 1, label=f"r{i}") for i in range(33))), "at most 32"),
        (_job(rules=(PriceRule.per_unit("width", 1),)), "does not declare"),
        (_job(rules=(PriceRule.per_unit("quality", 1),)), "a choice; give it options"),
        (_job(rules=(PriceRule.by_choice("quality", {"draft": 1}),)), "every choice"),
        (_job(rules=(PriceRule.per_unit("steps", 1, label="base"),)), "reserved"),
        (_job(rules=(PriceRule.per_unit("steps", -1),)), "rate"),
        (_job(params=(JobParam.integer("steps", 1, 100), JobParam.integer("steps", 1, 5))), "declared twice"),
        (_job(params=(JobParam.integer("steps", 5, 1),)), "maximum"),
        (_job(params=(JobParam.integer("steps", 1, 10**10),)), "maximum"),
        (_job(params=(JobParam.integer("steps", 1, 100, default=500),)), "default"),
        (_job(params=(JobParam.choice("quality", ()),)), "1..64 choices"),
        (_job(params=(JobParam.choice("quality", ("a",), default="b"),)), "not one of its choices"),
        (
            _job(rules=(PriceRule.factor("steps_squared", ("steps", "steps", "steps", "steps"), rate=10**6),)),
            "dearest job",
        ),
        (PriceBook(jobs=small_book().jobs, plan_multipliers={"pro": Decimal("101")}), "plan_multipliers"),
        (PriceBook(jobs=small_book().jobs, plan_multipliers={"pro": Decimal("0.1234567")}), "at most 6 places"),
        (PriceBook(jobs=small_book().jobs, description="\x00"), "NUL"),
    ],
)
def test_a_bad_book_is_refused_and_records_nothing(ledger: Ledger, book: PriceBook, words: str) -> None:
    before = events(ledger)
    with pytest.raises(InvalidArgument, match=words):
        ledger.define_price_book(book)
    with pytest.raises(InvalidArgument, match=words):
        DefinePriceBook(key="k", book=book)
    assert events(ledger) == before
    with pytest.raises(InvalidArgument, match="book must be a PriceBook"):
        ledger.define_price_book({"jobs": {}})  # type: ignore[arg-type]


@pytest.mark.parametrize("number", [Decimal("1E-999999"), Decimal("-1E-100001")])
def test_a_number_too_fine_for_a_book_is_refused_not_trapped_when_built(ledger: Ledger, number: Decimal) -> None:
    """Building the book shows its numbers tidied; a number below the exact
    context's range must reach check_price_book, not trap while being built."""
    before = events(ledger)
    choice = PriceRule.by_choice("quality", {"draft": number, "final": 1})
    params = (JobParam.integer("steps", 1, 100), JobParam.choice("quality", ("draft", "final")))
    for book in (lambda: _job(base_credits=number), lambda: _job(params=params, rules=(choice,))):
        with pytest.raises(InvalidArgument, match="places"):
            ledger.define_price_book(book())
    assert events(ledger) == before


def test_plan_multipliers_follow_the_users_live_plan(ledger: Ledger, clock: ManualClock) -> None:
    ledger.install_default_catalog()
    ledger.define_price_book(
        small_book(multipliers={"pro": Decimal("0.8"), "studio": Decimal("0.5"), "free": Decimal(2)})
    )
    assert (ledger.quote(ALICE, "render", {}).plan, ledger.quote(ALICE, "render", {}).credits) == ("free", 20)
    sid = ledger.start_subscription(ALICE, "pro", key="alice-pro").subscription_id
    assert sid is not None
    quote = ledger.quote(ALICE, "render", {})
    assert (quote.plan, quote.plan_multiplier, quote.credits) == ("pro", Decimal("0.8"), 8)
    assert quote.breakdown[-1].label == "plan:pro" and quote.breakdown[-1].factor == Decimal("0.8")
    # A change this process records shows at once.
    ledger.change_plan(sid, "studio", key="alice-studio")
    assert ledger.quote(ALICE, "render", {}).credits == 5
    ledger.cancel_subscription(sid, key="alice-cancel", at_period_end=False)
    assert ledger.quote(ALICE, "render", {}).plan == "free"
    # A plan the book does not name pays 1.
    ledger.start_subscription(BOB, "starter", key="bob-starter")
    assert ledger.quote(BOB, "render", {}).plan_multiplier == 1


def test_a_price_floored_by_the_minimum_is_never_below_it_whatever_the_plan(ledger: Ledger) -> None:
    ledger.install_default_catalog()
    ledger.define_price_book(small_book(multipliers={"pro": Decimal(0)}))
    ledger.start_subscription(ALICE, "pro", key="alice-pro")
    quote = ledger.quote(ALICE, "render", {})
    assert (quote.exact_credits, quote.credits) == (0, 3)


# ----------------------------------------------------------- reserve_for_job


def test_reserve_for_job_holds_the_quote_plus_the_margin_and_records_it(ledger: Ledger) -> None:
    ledger.define_price_book(small_book())
    ledger.grant(ALICE, 100, "bonus", key="g")
    quote = ledger.quote(ALICE, "render", {"steps": 30})
    receipt = ledger.reserve_for_job(
        ALICE, "render", {"steps": 30, "prompt": "a cat"}, job_id=JOB, key="job-1", expires_in=HOUR,
        safety_margin=Decimal("0.1"),
    )  # fmt: skip
    assert quote.credits == 15
    assert (receipt.command, receipt.held_credits, receipt.available_credits) == ("reserve_for_job", 17, 83)
    assert receipt.reservation_id is not None
    hold = ledger.reservation(receipt.reservation_id)
    assert (hold.amount_credits, hold.safety_margin, hold.job_id) == (17, Decimal("0.1"), JOB)
    assert hold.quote is not None
    assert hold.quote.model_dump(exclude={"quoted_at"}) == quote.model_dump(exclude={"quoted_at"})
    assert hold.quote.quoted_at == hold.reserved_at
    # A later revision leaves the hold's price as it was.
    ledger.define_price_book(small_book(base=20))
    settled = ledger.settle(receipt.reservation_id, 16, key="job-1:settle")
    assert settled.balance_credits == 84
    closed = ledger.reservation(receipt.reservation_id)
    assert closed.status == "settled" and closed.quote is not None and closed.quote.price_revision == 1
    # A plain hold has no quote.
    plain = ledger.reserve(ALICE, JOB, 5, key="plain", expires_in=HOUR)
    assert plain.reservation_id is not None
    assert ledger.reservation(plain.reservation_id).quote is None
    report = audit(ledger)
    assert report.findings == [], report.findings


def test_a_retry_replays_and_other_parameters_conflict(ledger: Ledger) -> None:
    ledger.define_price_book(small_book())
    ledger.grant(ALICE, 100, "bonus", key="g")
    first = ledger.reserve_for_job(ALICE, "render", {"steps": 30}, job_id=JOB, key="job-1", expires_in=HOUR)
    again = ledger.reserve_for_job(ALICE, "render", {"steps": 30}, job_id=JOB, key="job-1", expires_in=HOUR)
    assert again.replayed and again.reservation_id == first.reservation_id and again.held_credits == 15
    with pytest.raises(IdempotencyConflict) as caught:
        ledger.reserve_for_job(ALICE, "render", {"steps": 31}, job_id=JOB, key="job-1", expires_in=HOUR)
    assert caught.value.fields == ("params_sha256",)
    # A retry after the book changed replays the first price.
    ledger.define_price_book(small_book(base=50))
    assert ledger.reserve_for_job(ALICE, "render", {"steps": 30}, job_id=JOB, key="job-1", expires_in=HOUR).replayed
    assert ledger.balance(ALICE).held_credits == 15


def test_a_refused_reserve_for_job_records_nothing(ledger: Ledger) -> None:
    ledger.define_price_book(small_book())
    with pytest.raises(UnknownAccount):
        ledger.reserve_for_job(ALICE, "render", {}, job_id=JOB, key="j", expires_in=HOUR)
    ledger.grant(ALICE, 12, "bonus", key="g")
    before = events(ledger)
    with pytest.raises(InsufficientCredits) as short:
        ledger.reserve_for_job(ALICE, "render", {"batch_size": 2}, job_id=JOB, key="j", expires_in=HOUR)
    assert (short.value.requested_credits, short.value.available_credits) == (20, 12)
    with pytest.raises(InvalidJobParameter):
        ledger.reserve_for_job(ALICE, "render", {"steps": 500}, job_id=JOB, key="j", expires_in=HOUR)
    with pytest.raises(UnknownJobType):
        ledger.reserve_for_job(ALICE, "paint", {}, job_id=JOB, key="j", expires_in=HOUR)
    with pytest.raises(InsufficientCredits):  # the margin is what does not fit
        ledger.reserve_for_job(ALICE, "render", {}, job_id=JOB, key="j", expires_in=HOUR, safety_margin=Decimal("0.3"))
    assert events(ledger) == before
    # The same key works once the call is right.
    assert ledger.reserve_for_job(ALICE, "render", {}, job_id=JOB, key="j", expires_in=HOUR).held_credits == 10


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"safety_margin": Decimal("-0.1")}, "safety_margin"),
        ({"safety_margin": Decimal("10.5")}, "safety_margin"),
        ({"safety_margin": 0.1}, "safety_margin"),
        ({"job_type": "text to image"}, "job_type"),
        ({"params": ["steps"]}, "params"),
        ({"params": {"x": float("inf")}}, "params"),
        ({"params": {"x": object()}}, "params"),
        ({"params": {1: 2}}, "params"),
        ({"params": {"prompt": "x" * 70_000}}, "params"),
        ({"expires_in": None}, "expires_at"),
        ({"job_id": "job-1"}, "job_id"),
    ],
)
def test_reserve_for_job_checks_its_arguments(changes: dict[str, Any], param: str) -> None:
    arguments: dict[str, Any] = {
        "key": "k", "user_id": ALICE, "job_id": JOB, "job_type": "render", "params": {}, "expires_in": HOUR,
    }  # fmt: skip
    with pytest.raises(InvalidArgument) as caught:
        ReserveForJob(**{**arguments, **changes})
    assert caught.value.param == param


def test_params_may_be_any_mapping(ledger: Ledger) -> None:
    from types import MappingProxyType

    ledger.define_price_book(small_book())
    ledger.grant(ALICE, 100, "bonus", key="g")
    frozen = MappingProxyType({"steps": 30})
    assert ledger.quote(ALICE, "render", frozen).credits == ledger.quote(ALICE, "render", {"steps": 30}).credits
    first = ledger.reserve_for_job(ALICE, "render", frozen, job_id=JOB, key="j", expires_in=HOUR)
    assert ledger.reserve_for_job(ALICE, "render", {"steps": 30}, job_id=JOB, key="j", expires_in=HOUR).replayed
    assert first.held_credits == 15


def test_a_decimal_subclass_is_refused_by_its_type(ledger: Ledger) -> None:
    class Money(Decimal):
        pass

    with pytest.raises(InvalidArgument, match=r"safety_margin must be a finite Decimal, not Money\('0.1'\)"):
        ReserveForJob(
            key="k",
            user_id=ALICE,
            job_id=JOB,
            job_type="render",
            params={},
            expires_in=HOUR,
            safety_margin=Money("0.1"),
        )
    book = PriceBook(jobs=small_book().jobs, plan_multipliers={"pro": Money("0.9")})
    with pytest.raises(InvalidArgument, match=r"must be a finite Decimal, not Money\('0.9'\)"):
        ledger.define_price_book(book)


@pytest.mark.parametrize("value", [b"x", bytearray(b"x"), object(), {1, 2}, 1j])
def test_a_parameter_that_is_not_json_is_named_by_its_type(value: object) -> None:
    with pytest.raises(InvalidArgument, match=f"{type(value).__name__} is not a JSON value") as caught:
        ReserveForJob(key="k", user_id=ALICE, job_id=JOB, job_type="render", params={"x": [value]}, expires_in=HOUR)
    assert caught.value.param == "params" and "ircular" not in str(caught.value)


def test_a_margin_beyond_what_a_hold_holds_is_refused(ledger: Ledger) -> None:
    book = PriceBook(jobs={"big": JobPrice(Decimal(MAX_CREDITS // 2))})
    ledger.define_price_book(book)
    ledger.grant(ALICE, MAX_CREDITS, "bonus", key="g")
    with pytest.raises(InvalidAmount) as caught:
        ledger.reserve_for_job(ALICE, "big", {}, job_id=JOB, key="j", expires_in=HOUR, safety_margin=Decimal(2))
    assert caught.value.param == "safety_margin"


def test_a_batch_prices_with_the_plan_it_starts(ledger: Ledger) -> None:
    ledger.install_default_catalog()
    ledger.define_price_book(small_book(multipliers={"pro": Decimal("0.5")}))
    receipts = ledger.execute_batch(
        [
            StartSubscription(key="alice-pro", user_id=ALICE, plan="pro"),
            ReserveForJob(key="job-1", user_id=ALICE, job_id=JOB, job_type="render", params={}, expires_in=HOUR),
        ]
    )
    assert receipts[1].held_credits == 5  # pro's 0.5 of 10
    with pytest.raises(BatchRejected) as caught:
        ledger.execute_batch(
            [ReserveForJob(key="job-2", user_id=BOB, job_id=JOB, job_type="render", params={}, expires_in=HOUR)]
        )
    assert isinstance(caught.value.cause, UnknownAccount)


def test_a_reserve_prices_the_users_plan_as_stored(durable_url: str, clock: ManualClock) -> None:
    """Another process changed the plan and the book: a reserve prices from
    the store's state, while a quote may trust its cache for up to a second."""
    with Ledger(durable_url, clock=clock) as ours, Ledger(durable_url, clock=clock) as theirs:
        ours.install_default_catalog()
        ours.define_price_book(small_book(multipliers={"pro": Decimal("0.5")}))
        sid = ours.start_subscription(ALICE, "starter", key="alice-starter").subscription_id
        assert sid is not None
        assert ours.quote(ALICE, "render", {}).credits == 10
        theirs.change_plan(sid, "pro", key="alice-pro")
        assert ours.quote(ALICE, "render", {}, fresh=True).credits == 5
        receipt = ours.reserve_for_job(ALICE, "render", {}, job_id=JOB, key="job-1", expires_in=HOUR)
        assert receipt.held_credits == 5
        theirs.define_price_book(small_book(base=40, multipliers={"pro": Decimal("0.5")}))
        ours._prices.max_age_s = 0  # the second has passed
        assert ours.quote(ALICE, "render", {}).credits == 20
        receipt = ours.reserve_for_job(ALICE, "render", {}, job_id=JOB, key="job-2", expires_in=HOUR)
        assert receipt.held_credits == 20 + 5
        assert receipt.reservation_id is not None
        hold = theirs.reservation(receipt.reservation_id)
        assert hold.quote is not None and (hold.quote.price_revision, hold.quote.plan) == (2, "pro")


def test_the_price_book_record_is_one_aggregate(ledger: Ledger) -> None:
    ledger.install_default_price_book()
    ledger.install_default_price_book()
    assert len(list(ledger.app.events.get(PRICE_BOOK_ID))) == 1
    current = ledger.price_book()
    assert current is not None and current.book == DEFAULT_PRICE_BOOK
    assert RuleMode.ADD == "add"


# ------------------------------------------------------------------ auditing


def test_the_audit_names_a_priced_hold_whose_record_does_not_add_up() -> None:
    """A hold's recorded price is checked by the audit: lines, rounding, margin."""
    import json

    from eventsourcing.persistence import StoredEvent

    from ledger.domain.holds import HoldRecord

    with Ledger("memory://") as ledger:
        ledger.define_price_book(small_book())
        ledger.grant(ALICE, 100, "bonus", key="g")
        ledger.reserve_for_job(ALICE, "render", {"steps": 30}, job_id=JOB, key="job-1", expires_in=HOUR)
        assert audit(ledger).findings == []
        stored = list(ledger.app.recorder.select_notifications(start=1, limit=1_000))
    with Ledger("memory://") as copy:
        rows = []
        for n in stored:
            state = n.state
            if n.topic == HoldRecord.Reserved.TOPIC:
                value = json.loads(state)
                assert value["price"]["credits"] == 15
                value["price"]["credits"] = 14  # the hold's 15 credits, recorded as a 14-credit quote
                state = json.dumps(value).encode()
            rows.append(StoredEvent(n.originator_id, n.originator_version, n.topic, state))
        copy.app.recorder.insert_events(rows)
        messages = [f.message for f in audit(copy, compare_views=False).findings]
        assert any("priced hold: its breakdown adds up to 15, not its 14 credits" in m for m in messages), messages


def test_price_problems_are_named() -> None:
    from ledger.domain.pricing import price_problem

    book = small_book()
    priced = book.price("render", {"steps": 21})
    from ledger.application.pricing import price_record

    record = price_record(priced, 1, Decimal("0.5"))
    assert price_problem(record, 17) is None  # 11 x 1.5 = 16.5, up to 17
    assert price_problem(record, 16) == "it holds 16 credits; 11 with a margin of 0.5 is 17"
    assert "below its exact price" in str(price_problem({**record, "exact_credits": Decimal("11.5")}, 17))
    assert "cannot be read" in str(price_problem({"credits": 1}, 1))


def test_a_number_parameter_is_bounded_in_places_and_shown_short(ledger: Ledger) -> None:
    book = PriceBook(jobs={"clip": JobPrice(Decimal(1), (JobParam.number("seconds", 0, 600, default=1),), (
        PriceRule.per_unit("seconds", Decimal("0.25")),), )})  # fmt: skip
    ledger.define_price_book(book)
    with pytest.raises(InvalidJobParameter, match="more than 24 decimal places"):
        ledger.quote(ALICE, "clip", {"seconds": Decimal("1E-30")})
    with pytest.raises(InvalidJobParameter) as caught:
        ledger.quote(ALICE, "clip", {"seconds": "x" * 10_000})
    assert len(str(caught.value)) < 200
    with pytest.raises(InvalidArgument, match="places"):
        ledger.define_price_book(PriceBook(jobs={"clip": replace(book.jobs["clip"], base_credits=Decimal("1E-30"))}))
    rule = PriceRule.factor("huge", ("seconds",), scale=Decimal("1E+20"))
    with pytest.raises(InvalidArgument, match="scale"):
        ledger.define_price_book(PriceBook(jobs={"clip": replace(book.jobs["clip"], rules=(rule,))}))


def test_two_processes_revising_the_book_make_two_revisions(durable_url: str, clock: ManualClock) -> None:
    """A revision made from a stale copy of the book clashes in the store and
    is made again on the fresh one: no revision is lost or doubled."""
    with Ledger(durable_url, clock=clock) as ours, Ledger(durable_url, clock=clock) as theirs:
        ours.define_price_book(small_book())
        assert theirs.quote(ALICE, "render", {}).credits == 10  # theirs has read revision 1
        theirs.define_price_book(small_book(base=11), key="theirs")
        ours.define_price_book(small_book(base=12), key="ours")  # from ours' copy of revision 1
        assert [(r.revision, r.book.jobs["render"].base_credits) for r in theirs.price_book_history()] == [
            (1, 10),
            (2, 11),
            (3, 12),
        ]
        assert ours.quote(ALICE, "render", {}).credits == 12
        assert theirs.quote(ALICE, "render", {}, fresh=True).credits == 12
