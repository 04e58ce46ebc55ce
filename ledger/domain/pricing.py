"""The price book: what a job costs in whole credits, from its type and its
parameters. Pure: no I/O.

A :class:`PriceBook` prices each job type (:class:`JobPrice`) from a base
cost and rules over the job's parameters (:class:`PriceRule`), declared with
their bounds (:class:`JobParam`). A job's price is, exactly in ``Decimal``::

    (base + the add rules) x the multiply rules x the plan's multiplier

rounded up to whole credits, and never below the job type's minimum. Every
step is a line of the breakdown, and the lines add up to the price exactly.

The book is revised over time with its history kept: a ``PriceBookRecord``
aggregate whose every revision is an event, so that a hold priced from it
(``ReserveForJob``) can name the revision that priced it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import (
    ROUND_CEILING,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
    localcontext,
)
from enum import StrEnum
from typing import Any, NamedTuple
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate
from eventsourcing.domain import Snapshot as BaseSnapshot

from ledger.domain.checks import check_optional_text, check_text
from ledger.domain.credits import MAX_CREDITS
from ledger.domain.topics import TOPIC_PREFIX
from ledger.errors import InvalidArgument, InvalidJobParameter, InvariantViolation, UnknownJobType

PRICE_NS = UUID("5b0f7f4e-8d0c-4c7e-9a53-0c2f1f6a7b20")
#: The one price book's aggregate id.
PRICE_BOOK_ID = uuid5(PRICE_NS, "price_book")

#: Limits of a book, checked when it is defined (``check_price_book``).
MAX_JOB_TYPES = 64
MAX_PARAMS = 32  # declared parameters per job type
MAX_RULES = 32  # rules per job type
MAX_RULE_PARAMS = 4  # parameters multiplied into one rule's quantity
MAX_OPTIONS = 64  # values of a choice parameter
MAX_PLAN_MULTIPLIERS = 64
MAX_NAME = 50  # job types, parameters, labels, plans: identifiers (the seed's VARCHAR(50))
MAX_CHOICE = 100  # length of a choice value
MAX_DESCRIPTION = 10_000
#: The largest bound a numeric parameter may declare.
MAX_PARAM_VALUE = Decimal(10**9)
#: The largest plan multiplier.
MAX_MULTIPLIER = Decimal(100)
#: Significant digits of any number in a book (rates, bounds, factors).
MAX_DIGITS = 24
#: Decimal places of any number in a book, or of a number parameter.
MAX_PLACES = 24
#: Decimal places of a plan multiplier or a safety margin.
MAX_FACTOR_PLACES = 6

ZERO = Decimal(0)
ONE = Decimal(1)

# Prices are sums and products of bounded numbers: exact at this precision
# (a book has at most MAX_RULES rules of numbers of MAX_DIGITS digits). An
# inexact step would be a bug, so it raises instead of rounding silently.
_EXACT = Context(prec=20_000, Emax=100_000, Emin=-100_000, traps=[Inexact, InvalidOperation, DivisionByZero, Overflow])


class ParamKind(StrEnum):
    """What a job parameter holds: a whole number, any number, or one of a set of names."""

    INT = "int"
    NUMBER = "number"
    CHOICE = "choice"


class RuleMode(StrEnum):
    """How a rule changes the price: ``add`` credits, or ``multiply`` the sum so far."""

    ADD = "add"
    MULTIPLY = "multiply"


@dataclass(frozen=True)
class JobParam:
    """A parameter a job type is priced by, with its bounds. ``default`` is
    used when the job's parameters leave it out (or give ``null``); without a
    default it is required. Numbers lie within ``minimum..maximum``
    (``minimum`` at least 0); a choice is one of ``choices``."""

    name: str
    kind: ParamKind
    minimum: Decimal = ZERO
    maximum: Decimal = ZERO
    default: int | Decimal | str | None = None
    choices: tuple[str, ...] = ()
    #: A whole number's bounds as ints (derived: the common case is checked without Decimal).
    _int_bounds: tuple[int, int] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.kind is ParamKind.INT and isinstance(self.minimum, Decimal) and isinstance(self.maximum, Decimal):
            try:
                if self.minimum.is_finite() and self.maximum.is_finite():
                    object.__setattr__(self, "_int_bounds", (int(self.minimum), int(self.maximum)))
            except (ValueError, ArithmeticError):  # pragma: no cover - refused by check_price_book
                pass

    @classmethod
    def integer(cls, name: str, minimum: int, maximum: int, *, default: int | None = None) -> JobParam:
        return cls(name, ParamKind.INT, Decimal(minimum), Decimal(maximum), default)

    @classmethod
    def number(
        cls, name: str, minimum: Decimal | int, maximum: Decimal | int, *, default: Decimal | int | None = None
    ) -> JobParam:
        return cls(
            name,
            ParamKind.NUMBER,
            Decimal(minimum),
            Decimal(maximum),
            None if default is None else Decimal(default),
        )

    @classmethod
    def choice(cls, name: str, choices: tuple[str, ...] | list[str], *, default: str | None = None) -> JobParam:
        return cls(name, ParamKind.CHOICE, default=default, choices=tuple(choices))

    def read(self, job_type: str, params: Mapping[str, Any]) -> int | Decimal | str:
        """This parameter's value in ``params``, checked (InvalidJobParameter naming it)."""
        value = params.get(self.name)
        if value is None:
            if self.default is None:
                raise InvalidJobParameter(job_type, self.name, "is required")
            return self.default
        bounds = self._int_bounds
        if bounds is not None and type(value) is int and bounds[0] <= value <= bounds[1]:
            return value
        if self.kind is ParamKind.CHOICE:
            if type(value) is not str or value not in self.choices:
                raise InvalidJobParameter(
                    job_type, self.name, f"must be one of {', '.join(self.choices)}; got {_shown(value)}"
                )
            return value
        number = _number(value)
        if number is None:
            raise InvalidJobParameter(job_type, self.name, f"must be a number, not {type(value).__name__}")
        if self.kind is ParamKind.INT:
            if number != number.to_integral_value():
                raise InvalidJobParameter(job_type, self.name, f"must be a whole number; got {_shown(value)}")
            if not self.minimum <= number <= self.maximum:
                raise InvalidJobParameter(
                    job_type, self.name, f"must be within {self.minimum}..{self.maximum}; got {_shown(value)}"
                )
            return int(number)
        if not self.minimum <= number <= self.maximum:
            raise InvalidJobParameter(
                job_type, self.name, f"must be within {self.minimum}..{self.maximum}; got {_shown(value)}"
            )
        exponent = number.as_tuple().exponent
        if isinstance(exponent, int) and exponent < -MAX_PLACES:
            raise InvalidJobParameter(job_type, self.name, f"has more than {MAX_PLACES} decimal places")
        return number


def _shown(value: object) -> str:
    """A caller's value as an error message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _number(value: object) -> Decimal | None:
    """A JSON number as an exact Decimal (a float by its shortest repr), or None."""
    if type(value) is int:
        return Decimal(value)
    if type(value) is float:
        if value != value or value in (float("inf"), float("-inf")):
            return None
        return Decimal(repr(value))
    if type(value) is Decimal:
        return value if value.is_finite() else None
    return None


@dataclass(frozen=True)
class PriceRule:
    """One rule of a job type's price, shown as one line of a quote's breakdown.

    A numeric rule's quantity is the product of its ``params`` times
    ``scale``, above ``included``: ``q = max(0, product x scale - included)``.
    ``add`` adds ``rate x q`` credits; ``multiply`` multiplies the sum so
    far by ``1 + rate x q`` (so ``batch_size`` with ``included=1`` multiplies
    by the batch size). A choice rule (``options``) reads one choice
    parameter and adds, or multiplies by, the value of the option chosen.
    """

    label: str
    mode: RuleMode
    params: tuple[str, ...]
    rate: Decimal = ONE
    included: Decimal = ZERO
    scale: Decimal = ONE
    options: Mapping[str, Decimal] | None = None

    @classmethod
    def per_unit(
        cls, param: str, credits: Decimal | int, *, included: Decimal | int = 0, label: str | None = None
    ) -> PriceRule:
        """Adds ``credits`` per unit of ``param`` above ``included``."""
        return cls(label or param, RuleMode.ADD, (param,), Decimal(credits), Decimal(included))

    @classmethod
    def factor(
        cls,
        label: str,
        params: tuple[str, ...] | list[str],
        *,
        rate: Decimal | int = 1,
        included: Decimal | int = 0,
        scale: Decimal | int = 1,
    ) -> PriceRule:
        """Multiplies by ``1 + rate x max(0, product(params) x scale - included)``."""
        return cls(label, RuleMode.MULTIPLY, tuple(params), Decimal(rate), Decimal(included), Decimal(scale))

    @classmethod
    def by_choice(
        cls,
        param: str,
        options: Mapping[str, Decimal | int],
        *,
        mode: RuleMode = RuleMode.MULTIPLY,
        label: str | None = None,
    ) -> PriceRule:
        """Adds, or multiplies by, the value of the option ``param`` names."""
        return cls(label or param, RuleMode(mode), (param,), options={k: Decimal(v) for k, v in options.items()})


@dataclass(frozen=True)
class JobPrice:
    """The price of one job type: ``base_credits`` (Decimal), the rules over
    its declared ``params``, and the least it costs (``minimum_credits``, at
    least 1: every job costs a credit, as every settle charges one)."""

    base_credits: Decimal
    params: tuple[JobParam, ...] = ()
    rules: tuple[PriceRule, ...] = ()
    minimum_credits: int = 1
    #: The rules in the order they apply (derived, not compared or stored).
    #: Each with whether its quantity, and its rate times it, need no tidying
    #: (whole numbers), and its options as shown.
    _ordered: tuple[tuple[_Step, ...], tuple[_Step, ...]] = field(
        init=False, repr=False, compare=False, default=((), ())
    )
    #: ``base_credits`` as the breakdown shows it (derived).
    _base_shown: Decimal = field(init=False, repr=False, compare=False, default=ZERO)

    def __post_init__(self) -> None:
        # The rules in the order they apply: every add, then every multiply.
        rules = self.rules if isinstance(self.rules, tuple) else ()
        kinds = (
            {getattr(p, "name", None): getattr(p, "kind", None) for p in self.params}
            if isinstance(self.params, tuple)
            else {}
        )
        steps = [_step(r, kinds) for r in rules if isinstance(r, PriceRule)]
        adds = tuple(step for step in steps if step[0].mode is RuleMode.ADD)
        object.__setattr__(self, "_ordered", (adds, tuple(step for step in steps if step not in adds)))
        if _tidiable(self.base_credits):
            object.__setattr__(self, "_base_shown", tidy(self.base_credits))


#: A rule as pricing applies it: the rule, whether its quantity is always a
#: whole number with no trailing zeros to drop, whether its rate times that
#: is too, and its options as a breakdown shows them.
_Step = tuple[PriceRule, bool, bool, Mapping[str, Decimal] | None]


def _whole(value: object) -> bool:
    if not isinstance(value, Decimal) or not value.is_finite():
        return False
    exponent = value.as_tuple().exponent
    return isinstance(exponent, int) and exponent >= 0


def _tidiable(value: object) -> bool:
    """Whether ``tidy`` takes ``value`` as it is built. A number with more
    places than a book may have (``1E-999999``) is left as given, since tidying
    it would trap in the exact context: check_price_book refuses it, naming
    where it is."""
    if not isinstance(value, Decimal) or not value.is_finite():
        return False
    exponent = value.as_tuple().exponent
    return isinstance(exponent, int) and exponent >= -MAX_PLACES


def _step(rule: PriceRule, kinds: Mapping[Any, Any]) -> _Step:
    whole = (
        isinstance(rule.params, tuple)
        and all(kinds.get(name) is ParamKind.INT for name in rule.params)
        and _whole(rule.scale)
        and _whole(rule.included)
    )
    shown = None
    if isinstance(rule.options, Mapping):
        shown = {k: tidy(v) if _tidiable(v) else v for k, v in rule.options.items()}
    return (rule, whole, whole and _whole(rule.rate), shown)


@dataclass(frozen=True)
class PriceBook:
    """What every job type costs, and each plan's multiplier (plans not named pay ``1``)."""

    jobs: Mapping[str, JobPrice]
    plan_multipliers: Mapping[str, Decimal] = field(default_factory=dict)
    description: str | None = None

    # -- event data ------------------------------------------------------------

    def as_event_data(self) -> dict[str, Any]:
        """The book as stored in its revision's event (and digested by the
        command's fingerprint): plain dicts, lists, ints, Decimals and str."""
        return {
            "jobs": {name: _job_data(job) for name, job in self.jobs.items()},
            "plan_multipliers": dict(self.plan_multipliers),
            "description": self.description,
        }

    def canonical_data(self) -> dict[str, Any]:
        return self.as_event_data()

    @classmethod
    def from_event_data(cls, data: Mapping[str, Any]) -> PriceBook:
        jobs = {}
        for name, job in data["jobs"].items():
            jobs[name] = JobPrice(
                base_credits=Decimal(job["base_credits"]),
                minimum_credits=job["minimum_credits"],
                params=tuple(
                    JobParam(
                        p["name"],
                        ParamKind(p["kind"]),
                        Decimal(p["minimum"]),
                        Decimal(p["maximum"]),
                        _default_from_data(p["kind"], p["default"]),
                        tuple(p["choices"]),
                    )
                    for p in job["params"]
                ),
                rules=tuple(
                    PriceRule(
                        r["label"],
                        RuleMode(r["mode"]),
                        tuple(r["params"]),
                        Decimal(r["rate"]),
                        Decimal(r["included"]),
                        Decimal(r["scale"]),
                        None if r["options"] is None else {k: Decimal(v) for k, v in r["options"].items()},
                    )
                    for r in job["rules"]
                ),
            )
        return cls(
            jobs=jobs,
            plan_multipliers={k: Decimal(v) for k, v in data["plan_multipliers"].items()},
            description=data.get("description"),
        )

    # -- pricing -----------------------------------------------------------------

    def multiplier_for(self, plan: str | None) -> Decimal:
        """The plan's multiplier: 1 for a plan the book does not name (and for no plan)."""
        if plan is None:
            return ONE
        return self.plan_multipliers.get(plan, ONE)

    def price(self, job_type: str, params: Mapping[str, Any], plan: str | None = None) -> Priced:
        """What a job costs: raises UnknownJobType for a type the book does
        not price and InvalidJobParameter (naming it) for a parameter outside
        its declaration. Parameters the book does not declare are not read."""
        job = self.jobs.get(job_type) if type(job_type) is str else None
        if job is None:
            raise UnknownJobType(job_type, tuple(self.jobs))
        if not isinstance(params, Mapping):
            raise InvalidArgument(f"params must be a mapping, not {type(params).__name__}", param="params")
        values = {p.name: p.read(job_type, params) for p in job.params}
        return _price(job, job_type, values, plan, self.multiplier_for(plan))


def _default_from_data(kind: str, value: Any) -> int | Decimal | str | None:
    if value is None or kind != ParamKind.NUMBER:
        return value  # type: ignore[no-any-return]
    return Decimal(value)


def _job_data(job: JobPrice) -> dict[str, Any]:
    return {
        "base_credits": job.base_credits,
        "minimum_credits": job.minimum_credits,
        "params": [
            {
                "name": p.name,
                "kind": str(p.kind),
                "minimum": p.minimum,
                "maximum": p.maximum,
                "default": p.default,
                "choices": list(p.choices),
            }
            for p in job.params
        ],
        "rules": [
            {
                "label": r.label,
                "mode": str(r.mode),
                "params": list(r.params),
                "rate": r.rate,
                "included": r.included,
                "scale": r.scale,
                "options": None if r.options is None else dict(r.options),
            }
            for r in job.rules
        ],
    }


# ------------------------------------------------------------------ the price


class LineKind(StrEnum):
    """What a line of a quote's breakdown is."""

    BASE = "base"
    ADD = "add"
    MULTIPLY = "multiply"
    PLAN = "plan"
    ROUNDING = "rounding"
    MINIMUM = "minimum"


class Line(NamedTuple):
    """One step of a price: what it adds to the credits (exact), and the
    quantity or factor it was computed from."""

    label: str
    kind: LineKind
    credits: Decimal
    quantity: Decimal | None = None
    factor: Decimal | None = None


@dataclass(frozen=True)
class Priced:
    """A job's price: whole ``credits``, the exact price before rounding
    (``exact_credits``), the lines (which add up to ``credits``), the
    parameters as priced (defaults filled in) and the plan multiplier."""

    job_type: str
    credits: int
    exact_credits: Decimal
    lines: tuple[Line, ...]
    params: dict[str, int | Decimal | str]
    plan: str | None
    plan_multiplier: Decimal


def tidy(value: Decimal) -> Decimal:
    """The same number without trailing zeros (``2`` for ``2.000``, ``0.5`` for ``0.50``)."""
    if value is ZERO or value is ONE:
        return value
    integral = value.to_integral_value()
    return integral if integral == value else value.normalize(_EXACT)


def _tidy_or_none(value: Decimal | None) -> Decimal | None:
    return None if value is None else tidy(value)


def _quantity(rule: PriceRule, values: Mapping[str, int | Decimal | str]) -> Decimal:
    product = rule.scale
    for name in rule.params:
        product = product * values[name]  # type: ignore[operator]  # numeric, checked when defined
    excess = product - rule.included
    return excess if excess > ZERO else ZERO


def _price(
    job: JobPrice, job_type: str, values: dict[str, int | Decimal | str], plan: str | None, multiplier: Decimal
) -> Priced:
    new_line = Line._make
    try:
        with localcontext(_EXACT):
            total = job.base_credits
            lines = [new_line(("base", LineKind.BASE, job._base_shown, None, None))]
            adds, multiplies = job._ordered
            for rule, whole, whole_rate, shown in adds:
                if shown is not None:
                    choice = values[rule.params[0]]
                    added = rule.options[choice]  # type: ignore[index]  # a choice: a str
                    lines.append(new_line((rule.label, LineKind.ADD, shown[choice], None, None)))  # type: ignore[index]
                else:
                    quantity = _quantity(rule, values)
                    added = ZERO if quantity is ZERO else rule.rate * quantity
                    lines.append(
                        new_line(
                            (
                                rule.label,
                                LineKind.ADD,
                                added if whole_rate else tidy(added),
                                quantity if whole else tidy(quantity),
                                None,
                            )
                        )
                    )
                total += added
            for rule, whole, _, shown in multiplies:
                if shown is not None:
                    choice = values[rule.params[0]]
                    factor = rule.options[choice]  # type: ignore[index]
                    factor_shown = shown[choice]  # type: ignore[index]
                    quantity_shown = None
                else:
                    quantity = _quantity(rule, values)
                    factor = ONE if quantity is ZERO else ONE + rule.rate * quantity
                    factor_shown = tidy(factor)
                    quantity_shown = quantity if whole else tidy(quantity)
                added = ZERO if factor == ONE else total * factor - total
                total += added
                lines.append(new_line((rule.label, LineKind.MULTIPLY, tidy(added), quantity_shown, factor_shown)))
            if multiplier != ONE:
                added = total * multiplier - total
                total += added
                lines.append(new_line((f"plan:{plan}", LineKind.PLAN, tidy(added), None, tidy(multiplier))))
            exact = total
            credits = int(exact.to_integral_value(rounding=ROUND_CEILING))
            if credits != exact:
                lines.append(new_line(("rounding", LineKind.ROUNDING, tidy(Decimal(credits) - exact), None, None)))
            if credits < job.minimum_credits:
                lines.append(
                    new_line(("minimum", LineKind.MINIMUM, Decimal(job.minimum_credits - credits), None, None))
                )
                credits = job.minimum_credits
    except (Inexact, InvalidOperation, Overflow, DivisionByZero) as exc:  # pragma: no cover - bounded by the checks
        raise InvariantViolation(f"pricing {job_type!r} was not exact: {type(exc).__name__}") from exc
    if not 1 <= credits <= MAX_CREDITS:
        raise InvariantViolation(f"{job_type!r} priced at {credits} credits, outside 1..{MAX_CREDITS}")
    return Priced(job_type, credits, tidy(exact), tuple(lines), values, plan, multiplier)


def price_problem(price: Mapping[str, Any], held_credits: int) -> str | None:
    """What is wrong with a hold's recorded price (``HoldRecord.price``), or
    None: its lines must add up to its credits, the credits be at least its
    exact price rounded up, and the hold the credits with its margin."""
    try:
        with localcontext(_EXACT):
            lines = sum((Decimal(line["credits"]) for line in price["lines"]), ZERO)
            credits, exact, margin = price["credits"], Decimal(price["exact_credits"]), Decimal(price["safety_margin"])
            if lines != credits:
                return f"its breakdown adds up to {lines}, not its {credits} credits"
            if credits < exact.to_integral_value(rounding=ROUND_CEILING):
                return f"its {credits} credits are below its exact price {exact} rounded up"
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        return f"its price cannot be read: {type(exc).__name__}: {exc}"
    expected = hold_credits(credits, margin)
    if held_credits != expected:
        return f"it holds {held_credits} credits; {credits} with a margin of {margin} is {expected}"
    return None


def hold_credits(quoted: int, safety_margin: Decimal) -> int:
    """A hold for a quote with a safety margin (a fraction: ``0.1`` is 10%),
    rounded up to whole credits."""
    with localcontext(_EXACT):
        return int((Decimal(quoted) * (ONE + safety_margin)).to_integral_value(rounding=ROUND_CEILING))


# ---------------------------------------------------------------- the checks


def check_identifier(value: object, name: str, param: str = "book") -> str:
    text = check_text(value, name, MAX_NAME, required=True, param=param)
    if not text.isidentifier():
        raise InvalidArgument(f"{name} {text!r} must be an identifier of at most {MAX_NAME} characters", param=param)
    return text


def check_job_type(value: object) -> str:
    """A job type's name as ``quote`` and ``reserve_for_job`` take it."""
    return check_identifier(value, "job_type", "job_type")


def _given(value: object) -> str:
    """A refused value as a message shows it: a Decimal subclass by its type,
    since its repr reads as the plain Decimal it is refused for not being."""
    if isinstance(value, Decimal) and type(value) is not Decimal:
        return f"{type(value).__name__}({str(value)!r})"
    return repr(value)


def _check_decimal(value: object, where: str, *, low: Decimal = ZERO, high: Decimal | None = None) -> Decimal:
    if not isinstance(value, Decimal) or type(value) is not Decimal or not value.is_finite():
        raise InvalidArgument(f"{where} must be a finite Decimal, not {_given(value)}", param="book")
    shape = value.as_tuple()
    if len(shape.digits) > MAX_DIGITS or (isinstance(shape.exponent, int) and shape.exponent < -MAX_PLACES):
        raise InvalidArgument(
            f"{where} has more than {MAX_DIGITS} significant digits or {MAX_PLACES} places: {value}", param="book"
        )
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise InvalidArgument(f"{where} must be {bound}, got {value}", param="book")
    return value


def check_factor(value: object, name: str, high: Decimal) -> Decimal:
    """A plan multiplier or a safety margin: a Decimal within 0..high, at most 6 places."""
    if type(value) is not Decimal or not value.is_finite():
        raise InvalidArgument(f"{name} must be a finite Decimal, not {_given(value)}", param=name)
    exponent = value.as_tuple().exponent
    if not ZERO <= value <= high or (isinstance(exponent, int) and exponent < -MAX_FACTOR_PLACES):
        raise InvalidArgument(
            f"{name} must be a Decimal within 0..{high} with at most {MAX_FACTOR_PLACES} places, got {value}",
            param=name,
        )
    return value


def check_price_book(book: object) -> PriceBook:
    """A book that may be defined: names, bounds, the limits on counts, rules
    that read declared parameters of the right kind, and a most expensive job
    (every parameter at its maximum, the dearest choices and plan) within
    ``MAX_CREDITS``, so that no quote can exceed what a hold may hold."""
    if not isinstance(book, PriceBook):
        raise InvalidArgument(f"book must be a PriceBook, not {type(book).__name__}", param="book")
    if not isinstance(book.jobs, Mapping) or not book.jobs:
        raise InvalidArgument("a price book prices at least one job type", param="book")
    if len(book.jobs) > MAX_JOB_TYPES:
        raise InvalidArgument(f"a price book prices at most {MAX_JOB_TYPES} job types", param="book")
    check_optional_text(book.description, "description", MAX_DESCRIPTION)
    if not isinstance(book.plan_multipliers, Mapping) or len(book.plan_multipliers) > MAX_PLAN_MULTIPLIERS:
        raise InvalidArgument(
            f"plan_multipliers must be a mapping of at most {MAX_PLAN_MULTIPLIERS} plans", param="book"
        )
    for plan, multiplier in book.plan_multipliers.items():
        check_identifier(plan, "a plan name in plan_multipliers")
        try:
            check_factor(multiplier, f"plan_multipliers[{plan!r}]", MAX_MULTIPLIER)
        except InvalidArgument as exc:
            raise InvalidArgument(str(exc), param="book") from None
    dearest_plan = max([ONE, *book.plan_multipliers.values()])
    for job_type, job in book.jobs.items():
        check_identifier(job_type, "a job type")
        _check_job(job_type, job, dearest_plan)
    return book


def _check_job(job_type: str, job: object, dearest_plan: Decimal) -> None:
    where = f"job type {job_type!r}"
    if not isinstance(job, JobPrice):
        raise InvalidArgument(f"{where} must be a JobPrice, not {type(job).__name__}", param="book")
    _check_decimal(job.base_credits, f"{where}: base_credits", high=Decimal(MAX_CREDITS))
    if type(job.minimum_credits) is not int or not 1 <= job.minimum_credits <= MAX_CREDITS:
        raise InvalidArgument(f"{where}: minimum_credits must be an int within 1..{MAX_CREDITS}", param="book")
    if not isinstance(job.params, tuple) or len(job.params) > MAX_PARAMS:
        raise InvalidArgument(f"{where}: params must be a tuple of at most {MAX_PARAMS} JobParams", param="book")
    if not isinstance(job.rules, tuple) or len(job.rules) > MAX_RULES:
        raise InvalidArgument(f"{where}: rules must be a tuple of at most {MAX_RULES} PriceRules", param="book")
    declared: dict[str, JobParam] = {}
    for param in job.params:
        _check_param(where, param)
        if param.name in declared:
            raise InvalidArgument(f"{where}: parameter {param.name!r} is declared twice", param="book")
        declared[param.name] = param
    labels: set[str] = set()
    for index, rule in enumerate(job.rules):
        _check_rule(f"{where}: rules[{index}]", rule, declared)
        if rule.label in labels or rule.label in ("base", "rounding", "minimum"):
            raise InvalidArgument(f"{where}: rule label {rule.label!r} is used twice or reserved", param="book")
        labels.add(rule.label)
    # The dearest job this type can be: every rule is monotone, so it is at
    # the parameters' maxima, the dearest option of each choice, the dearest plan.
    dearest: dict[str, int | Decimal | str] = {}
    for param in job.params:
        dearest[param.name] = param.maximum if param.kind is not ParamKind.CHOICE else param.choices[0]
    with localcontext(_EXACT):
        total = job.base_credits
        factor = dearest_plan
        for rule in job.rules:
            if rule.options is not None:
                value = max(rule.options.values())
            else:
                value = rule.rate * _quantity(rule, dearest) if rule.mode is RuleMode.ADD else ZERO
                if rule.mode is RuleMode.MULTIPLY:
                    value = ONE + rule.rate * _quantity(rule, dearest)
            if rule.mode is RuleMode.ADD:
                total += value
            else:
                factor *= value
        if total * factor > MAX_CREDITS:
            raise InvalidArgument(
                f"{where}: its dearest job (every parameter at its maximum) costs {(total * factor):.0f} credits, "
                f"more than {MAX_CREDITS}; lower the maxima or the rates",
                param="book",
            )


def _check_param(where: str, param: object) -> None:
    if not isinstance(param, JobParam):
        raise InvalidArgument(f"{where}: a parameter must be a JobParam, not {type(param).__name__}", param="book")
    check_identifier(param.name, f"{where}: a parameter name")
    at = f"{where}: parameter {param.name!r}"
    if not isinstance(param.kind, ParamKind):
        raise InvalidArgument(f"{at}: kind must be a ParamKind", param="book")
    if param.kind is ParamKind.CHOICE:
        if not isinstance(param.choices, tuple) or not 1 <= len(param.choices) <= MAX_OPTIONS:
            raise InvalidArgument(f"{at}: a choice has 1..{MAX_OPTIONS} choices", param="book")
        for choice in param.choices:
            check_text(choice, f"{at}: a choice", MAX_CHOICE, required=True, param="book")
        if len(set(param.choices)) != len(param.choices):
            raise InvalidArgument(f"{at}: a choice is listed twice", param="book")
        if param.default is not None and param.default not in param.choices:
            raise InvalidArgument(f"{at}: default {param.default!r} is not one of its choices", param="book")
        return
    if param.choices:
        raise InvalidArgument(f"{at}: only a choice has choices", param="book")
    _check_decimal(param.minimum, f"{at}: minimum", high=MAX_PARAM_VALUE)
    _check_decimal(param.maximum, f"{at}: maximum", low=param.minimum, high=MAX_PARAM_VALUE)
    if param.kind is ParamKind.INT and (
        param.minimum != param.minimum.to_integral_value() or param.maximum != param.maximum.to_integral_value()
    ):
        raise InvalidArgument(f"{at}: the bounds of a whole number are whole", param="book")
    if param.default is not None:
        default = param.default
        if param.kind is ParamKind.INT and (type(default) is not int or not param.minimum <= default <= param.maximum):
            raise InvalidArgument(f"{at}: default must be an int within its bounds", param="book")
        if param.kind is ParamKind.NUMBER:
            _check_decimal(default, f"{at}: default", low=param.minimum, high=param.maximum)


def _check_rule(where: str, rule: object, declared: Mapping[str, JobParam]) -> None:
    if not isinstance(rule, PriceRule):
        raise InvalidArgument(f"{where} must be a PriceRule, not {type(rule).__name__}", param="book")
    check_identifier(rule.label, f"{where}: label")
    if not isinstance(rule.mode, RuleMode):
        raise InvalidArgument(f"{where}: mode must be a RuleMode", param="book")
    if not isinstance(rule.params, tuple) or not 1 <= len(rule.params) <= MAX_RULE_PARAMS:
        raise InvalidArgument(f"{where}: a rule reads 1..{MAX_RULE_PARAMS} parameters", param="book")
    for name in rule.params:
        if name not in declared:
            raise InvalidArgument(f"{where} reads {name!r}, which the job type does not declare", param="book")
    if rule.options is not None:
        if len(rule.params) != 1 or declared[rule.params[0]].kind is not ParamKind.CHOICE:
            raise InvalidArgument(f"{where}: a rule with options reads one choice parameter", param="book")
        if not isinstance(rule.options, Mapping) or set(rule.options) != set(declared[rule.params[0]].choices):
            raise InvalidArgument(f"{where}: options must price every choice of {rule.params[0]!r}", param="book")
        for option, value in rule.options.items():
            _check_decimal(value, f"{where}: option {option!r}", high=Decimal(MAX_CREDITS))
        return
    for name in rule.params:
        if declared[name].kind is ParamKind.CHOICE:
            raise InvalidArgument(f"{where} multiplies {name!r}, a choice; give it options", param="book")
    _check_decimal(rule.rate, f"{where}: rate", high=Decimal(MAX_CREDITS))
    _check_decimal(rule.included, f"{where}: included", high=MAX_PARAM_VALUE**MAX_RULE_PARAMS)
    _check_decimal(rule.scale, f"{where}: scale", high=MAX_PARAM_VALUE)


# --------------------------------------------------------------- the default book


def _image_params(*, max_side: int = 4096) -> tuple[JobParam, ...]:
    return (
        JobParam.integer("width", 64, max_side, default=1024),
        JobParam.integer("height", 64, max_side, default=1024),
        JobParam.integer("steps", 1, 150, default=30),
        JobParam.integer("batch_size", 1, 16, default=1),
        JobParam.choice("base_model", ("sd-1", "sd-2", "sdxl", "flux"), default="sdxl"),
    )


#: A 1024 x 1024 image's area as the unit of resolution (1 / 1024²).
PER_1024_SQUARE = Decimal(1) / Decimal(1024 * 1024)


def _image_rules() -> tuple[PriceRule, ...]:
    return (
        PriceRule.per_unit("steps", Decimal("0.1"), included=30),
        PriceRule.factor("resolution", ("width", "height"), scale=PER_1024_SQUARE, included=1),
        PriceRule.factor("batch_size", ("batch_size",), included=1),
        PriceRule.by_choice(
            "base_model", {"sd-1": Decimal("0.5"), "sd-2": Decimal("0.5"), "sdxl": Decimal(1), "flux": Decimal(2)}
        ),
    )


#: The default book: the seed's job types (``generation_jobs.job_type``).
#: The seed carries no prices; these are a starting point a host revises.
DEFAULT_PRICE_BOOK = PriceBook(
    jobs={
        "text_to_image": JobPrice(Decimal(4), _image_params(), _image_rules()),
        "image_to_image": JobPrice(Decimal(4), _image_params(), _image_rules()),
        "inpaint": JobPrice(Decimal(5), _image_params(), _image_rules()),
        "upscale": JobPrice(
            Decimal(1),
            (
                JobParam.integer("width", 64, 8192, default=1024),
                JobParam.integer("height", 64, 8192, default=1024),
                JobParam.number("scale", 1, 8, default=2),
            ),
            (
                PriceRule(
                    "output_resolution", RuleMode.ADD, ("width", "height", "scale", "scale"), scale=PER_1024_SQUARE
                ),
            ),
        ),
        "workflow": JobPrice(Decimal(8), _image_params(), _image_rules()),
    },
    description="The seed's job types (generation_jobs.job_type) with the library's starting prices.",
)


# ------------------------------------------------------------------ the record


class PriceBookRecord(Aggregate, created_event_name="Defined"):
    """The price book and the history of its revisions: revision ``n`` is the
    book of the aggregate's ``n``-th event."""

    TOPIC = f"{TOPIC_PREFIX}:PriceBook"

    class Event(Aggregate.Event):
        TOPIC = f"{TOPIC_PREFIX}:PriceBook.Event"

    class Defined(Aggregate.Created):
        TOPIC = f"{TOPIC_PREFIX}:PriceBook.Defined"
        book: dict[str, Any]
        actor: str | None

    class Snapshot(BaseSnapshot):
        TOPIC = f"{TOPIC_PREFIX}:PriceBook.Snapshot"

    def __init__(self, book: dict[str, Any], actor: str | None) -> None:
        self.book_data = book
        self.revision = 1
        self.actor = actor

    class Revised(Event):
        TOPIC = f"{TOPIC_PREFIX}:PriceBook.Revised"
        book: dict[str, Any]
        actor: str | None

        def apply(self, record: PriceBookRecord) -> None:
            record.book_data = self.book
            record.revision += 1
            record.actor = self.actor
            record.__dict__.pop("_book", None)

    @property
    def book(self) -> PriceBook:
        """The current revision's book, parsed once per loaded record."""
        parsed = self.__dict__.get("_book")
        if parsed is None:
            parsed = self.__dict__["_book"] = PriceBook.from_event_data(self.book_data)
        assert isinstance(parsed, PriceBook)
        return parsed

    def __deepcopy__(self, memo: dict[int, Any]) -> PriceBookRecord:
        # The command cache hands out a copy per command; Revised replaces
        # book_data, never changes it in place, so copies share it (and its
        # parsed book).
        copied = object.__new__(type(self))
        copied.__dict__.update(self.__dict__)
        copied._pending_events = list(self._pending_events)
        return copied
