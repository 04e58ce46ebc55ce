"""Properties of pricing (hypothesis), on random books and parameters: a
price is a whole number of credits, never below the minimum, the exact
price rounded up, the sum of its breakdown, and monotone in every numeric
parameter (every rule is)."""

from __future__ import annotations

from decimal import ROUND_CEILING, Context, Decimal, localcontext
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ledger import MAX_CREDITS, InvalidArgument, JobParam, JobPrice, PriceBook, PriceRule, RuleMode
from ledger.domain.pricing import DEFAULT_PRICE_BOOK, ParamKind, check_price_book, hold_credits

NUMERIC = ("a", "b", "c")
CHOICES = ("x", "y", "z")

#: Lines are exact: summing them needs the digits they have, not the default 28.
EXACT = Context(prec=10_000)


def total(lines: Any) -> Decimal:
    with localcontext(EXACT):
        return sum((line.credits for line in lines), Decimal(0))


rates = st.decimals(min_value=0, max_value=5, places=3)
small = st.decimals(min_value=0, max_value=20, places=2)


@st.composite
def rules(draw: st.DrawFn) -> PriceRule:
    mode = draw(st.sampled_from(RuleMode))
    if draw(st.booleans()):
        options = {c: draw(st.decimals(min_value=0, max_value=3, places=2)) for c in CHOICES}
        return PriceRule("pick", mode, ("choice",), options=options)
    params = tuple(draw(st.lists(st.sampled_from(NUMERIC), min_size=1, max_size=2)))
    return PriceRule("r", mode, params, draw(rates), draw(small), draw(st.decimals(min_value=0, max_value=2, places=2)))


@st.composite
def books(draw: st.DrawFn) -> PriceBook:
    params = (
        JobParam.integer("a", 0, 50, default=draw(st.integers(0, 50))),
        JobParam.number("b", 0, 10, default=draw(st.decimals(min_value=0, max_value=10, places=1))),
        JobParam.integer("c", 1, 8, default=1),
        JobParam.choice("choice", CHOICES, default="x"),
    )
    drawn = draw(st.lists(rules(), max_size=6))
    labelled = tuple(
        PriceRule(f"{rule.label}{index}", rule.mode, rule.params, rule.rate, rule.included, rule.scale, rule.options)
        for index, rule in enumerate(drawn)
    )
    multipliers = draw(st.dictionaries(st.sampled_from(("pro", "studio")), st.decimals(0, 3, places=2), max_size=2))
    job = JobPrice(draw(st.decimals(min_value=0, max_value=50, places=2)), params, labelled, draw(st.integers(1, 20)))
    return PriceBook(jobs={"job": job}, plan_multipliers=multipliers)


@st.composite
def job_params(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "a": draw(st.integers(0, 50)),
        "b": draw(
            st.one_of(
                # From 1e-6: a float's shortest repr then has at most 22 places,
                # within the 24 a number parameter may have.
                st.decimals(min_value=0, max_value=10, places=3),
                st.floats(1e-6, 10),
                st.just(0.0),
                st.integers(0, 10),
            )
        ),
        "c": draw(st.integers(1, 8)),
        "choice": draw(st.sampled_from(CHOICES)),
    }


plans = st.sampled_from((None, "pro", "studio", "starter"))


def definable(book: PriceBook) -> bool:
    """Whether the book may be defined (a random one may price beyond MAX_CREDITS)."""
    try:
        check_price_book(book)
    except InvalidArgument:
        return False
    return True


@settings(max_examples=150, deadline=None)
@given(books(), job_params(), plans)
def test_a_price_is_whole_at_least_the_minimum_rounded_up_and_its_lines_add_up(
    book: PriceBook, params: dict[str, Any], plan: str | None
) -> None:
    assume(definable(book))
    priced = book.price("job", params, plan)
    minimum = book.jobs["job"].minimum_credits
    assert type(priced.credits) is int and 1 <= minimum <= priced.credits <= MAX_CREDITS
    assert priced.credits == max(minimum, int(priced.exact_credits.to_integral_value(rounding=ROUND_CEILING)))
    assert priced.exact_credits <= priced.credits
    if priced.credits > minimum:
        assert priced.credits - priced.exact_credits < 1
    assert total(priced.lines) == priced.credits
    assert priced.plan_multiplier == book.plan_multipliers.get(plan, Decimal(1)) if plan else Decimal(1)


@settings(max_examples=150, deadline=None)
@given(books(), job_params(), st.sampled_from(NUMERIC), st.integers(0, 10), plans)
def test_a_price_never_falls_when_a_numeric_parameter_rises(
    book: PriceBook, params: dict[str, Any], name: str, more: int, plan: str | None
) -> None:
    assume(definable(book))
    declared = {p.name: p for p in book.jobs["job"].params}[name]
    assert declared.kind is not ParamKind.CHOICE
    higher = dict(params)
    higher[name] = min(Decimal(str(params[name])) + more, declared.maximum)
    if declared.kind is ParamKind.INT:
        higher[name] = int(higher[name])
    low, high = book.price("job", params, plan), book.price("job", higher, plan)
    assert high.exact_credits >= low.exact_credits
    assert high.credits >= low.credits


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(sorted(DEFAULT_PRICE_BOOK.jobs)),
    st.integers(64, 4096),
    st.integers(64, 4096),
    st.integers(1, 150),
    st.integers(1, 16),
    st.sampled_from(("sd-1", "sd-2", "sdxl", "flux")),
)
def test_the_default_book_prices_every_job_within_bounds(
    job_type: str, width: int, height: int, steps: int, batch: int, model: str
) -> None:
    params = {"width": width, "height": height, "steps": steps, "batch_size": batch, "base_model": model, "scale": 2}
    priced = DEFAULT_PRICE_BOOK.price(job_type, params)
    assert 1 <= priced.credits <= MAX_CREDITS
    assert total(priced.lines) == priced.credits


@given(st.integers(1, 10_000), st.decimals(min_value=0, max_value=10, places=6))
def test_a_hold_is_the_quote_with_its_margin_rounded_up(quoted: int, margin: Decimal) -> None:
    held = hold_credits(quoted, margin)
    exact = quoted * (1 + margin)
    assert held >= exact > held - 1
    assert held >= quoted
