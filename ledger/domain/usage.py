"""Metered plan features: uses per period, each counted exactly once.

A plan feature's ``config`` (the seed's ``plan_features.config``) may carry a
limit on uses::

    {"uses_per_period": 100}                              # the subscription's period
    {"uses_per_period": 100, "period": "calendar_month"}  # the UTC calendar month

``period`` is ``"subscription"`` (the default: the subscription's current
period, ``current_period_start`` to ``current_period_end``; the UTC calendar
month for a user on no subscription) or ``"calendar_month"``. A feature with
no ``uses_per_period`` is not limited; its uses are still counted, up to
MAX_USES_PER_PERIOD.

Uses are counted by a ``UsageCounter``: one aggregate per user, feature and
period, whose id derives from the three, so a new period starts a new count by
construction, a stream never holds more than one period's uses, and two
writers of the last use of a period clash on the same aggregate (the store
takes one, the other is decided again and refused). Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate
from eventsourcing.domain import Snapshot as BaseSnapshot

from ledger.domain.checks import check_text
from ledger.domain.entitlements import entitled
from ledger.domain.plans import MAX_PLAN_NAME, PlanTerms
from ledger.domain.subscriptions import Subscription
from ledger.domain.topics import TOPIC_PREFIX
from ledger.errors import (
    ConfigurationError,
    FeatureNotEntitled,
    InvalidArgument,
    InvariantViolation,
    UseLimitReached,
)

USAGE_NS = UUID("5b0f7f4e-8d0c-4c7e-9a53-0c2f1f6a7c01")
#: The most uses one counter takes in a period (limited or not): a counter's
#: stream stays bounded, and the most a single command may count.
MAX_USES_PER_PERIOD = 1_000_000
#: The config keys of a limit, and the periods a limit may count over.
USES_KEY = "uses_per_period"
PERIOD_KEY = "period"
SUBSCRIPTION_PERIOD = "subscription"
CALENDAR_MONTH = "calendar_month"
PERIODS = (SUBSCRIPTION_PERIOD, CALENDAR_MONTH)


@dataclass(frozen=True)
class UsageLimit:
    """A feature's limit on uses: ``uses_per_period`` (None: not limited)
    over ``period``."""

    uses_per_period: int | None
    period: str


UNLIMITED = UsageLimit(None, SUBSCRIPTION_PERIOD)


def usage_limit_of(config: object, where: str = "feature") -> UsageLimit:
    """The limit a feature's config carries. A config that does not hold a
    valid limit raises ConfigurationError (from stored terms) naming
    ``where``; ``check_usage_config`` raises InvalidArgument for the same
    when a plan is defined."""
    if config is None:
        return UNLIMITED
    if not isinstance(config, dict):
        raise ConfigurationError(f"{where}: config must be a JSON object, not {type(config).__name__}")
    uses = config.get(USES_KEY)
    period = config.get(PERIOD_KEY, SUBSCRIPTION_PERIOD)
    if uses is not None and (type(uses) is not int or not 0 <= uses <= MAX_USES_PER_PERIOD):
        raise ConfigurationError(f"{where}: {USES_KEY} must be an int within 0..{MAX_USES_PER_PERIOD}, got {uses!r}")
    if period not in PERIODS:
        raise ConfigurationError(f"{where}: {PERIOD_KEY} must be one of {', '.join(PERIODS)}, got {period!r}")
    return UsageLimit(uses, period)


def check_usage_config(key: str, config: object) -> None:
    """Raises InvalidArgument (param ``features``) when a feature's config
    holds a limit the ledger cannot count by."""
    try:
        usage_limit_of(config, f"feature {key!r}")
    except ConfigurationError as exc:
        raise InvalidArgument(str(exc), param="features") from None


def check_usage_terms(terms: PlanTerms) -> None:
    """Raises InvalidArgument (param ``features``) when a feature of the
    terms holds a limit the ledger cannot count by (DefinePlan runs it)."""
    for key, feature in terms.features.items():
        check_usage_config(key, feature.config)


def check_feature_name(value: object, name: str = "feature") -> str:
    """A feature's name as plans carry it: non-empty text of at most 50
    characters (the seed's ``plan_features.feature_key`` VARCHAR(50))."""
    return check_text(value, name, MAX_PLAN_NAME, required=True)


def check_uses(value: object, name: str = "uses") -> int:
    if type(value) is not int or not 1 <= value <= MAX_USES_PER_PERIOD:
        raise InvalidArgument(f"{name} must be an int within 1..{MAX_USES_PER_PERIOD}, got {value!r}", param=name)
    return value


def calendar_month(now: datetime) -> tuple[datetime, datetime]:
    """The UTC calendar month holding ``now``: its first instant and the next month's."""
    now = now.astimezone(UTC)
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    end = (
        datetime(now.year + 1, 1, 1, tzinfo=UTC)
        if now.month == 12
        else datetime(now.year, now.month + 1, 1, tzinfo=UTC)
    )
    return start, end


def plan_in_force(s: Subscription | None, terms: PlanTerms | None, now: datetime) -> PlanTerms | None:
    """The terms that apply at ``now``: the live subscription's plan when it
    is entitled (``domain.entitlements``), else None (the free tier)."""
    if s is None or terms is None or not entitled(s, now):
        return None
    return terms


def feature_refusal(
    user_id: UUID, feature: str, s: Subscription | None, terms: PlanTerms | None, free: PlanTerms
) -> FeatureNotEntitled | None:
    """Why the plan in force (``terms``, None for the free tier ``free``)
    does not give ``feature``, or None when it does."""
    plan = terms if terms is not None else free
    given = plan.features.get(feature)
    if given is not None and given.enabled:
        return None
    if terms is None and s is not None:
        return FeatureNotEntitled(
            user_id, feature, plan.name, "subscription_inactive",
            f"the {s.plan} subscription is {s.status}: {feature!r} is not available on the free tier",
        )  # fmt: skip
    state = "disabled" if given is not None else "not"
    return FeatureNotEntitled(
        user_id, feature, plan.name, "feature_not_in_plan", f"{feature!r} is {state} in the {plan.name} plan"
    )


def usage_period(limit: UsageLimit, s: Subscription | None, now: datetime) -> tuple[datetime, datetime]:
    """The period uses are counted in at ``now``: the entitled subscription's
    period in force (``s`` is None on the free tier), else the calendar month.
    The period in force is the current one from its start on (until it is
    renewed, even past its end), and the one renewed from before that (a
    renewal recorded ahead of the period's end)."""
    if limit.period == SUBSCRIPTION_PERIOD and s is not None:
        if s.period_start <= now:
            return s.period_start, s.period_end
        prior: datetime | None = getattr(s, "prior_period_start", None)
        if prior is not None and prior <= now:
            return prior, s.period_start
    return calendar_month(now)


def counter_id_for(user_id: UUID, feature: str, period_start: datetime) -> UUID:
    return uuid5(USAGE_NS, f"{user_id}:{feature}:{period_start.astimezone(UTC).isoformat()}")


class UsageCounter(Aggregate, created_event_name="Opened"):
    """The uses of one feature by one user in one period."""

    TOPIC = f"{TOPIC_PREFIX}:UsageCounter"

    class Event(Aggregate.Event):
        TOPIC = f"{TOPIC_PREFIX}:UsageCounter.Event"

    class Opened(Aggregate.Created):
        TOPIC = f"{TOPIC_PREFIX}:UsageCounter.Opened"
        user_id: UUID
        feature: str
        period_start: datetime
        period_end: datetime

    class Snapshot(BaseSnapshot):
        TOPIC = f"{TOPIC_PREFIX}:UsageCounter.Snapshot"

    def __init__(self, user_id: UUID, feature: str, period_start: datetime, period_end: datetime) -> None:
        self.user_id = user_id
        self.feature = feature
        self.period_start = period_start
        self.period_end = period_end
        self.uses = 0

    class Used(Event):
        TOPIC = f"{TOPIC_PREFIX}:UsageCounter.Used"
        uses: int
        #: The idempotency key of the command that counted them.
        key: str
        #: The limit in force when they were counted (None: not limited).
        limit: int | None

        def apply(self, counter: UsageCounter) -> None:
            counter.uses += self.uses

    @classmethod
    def open(cls, user_id: UUID, feature: str, period: tuple[datetime, datetime], now: datetime) -> UsageCounter:
        start, end = period
        return cls._create(
            cls.Opened,
            id=counter_id_for(user_id, feature, start),
            user_id=user_id,
            feature=feature,
            period_start=start,
            period_end=end,
            timestamp=now,
        )

    def use(self, uses: int, limit: int | None, *, key: str, now: datetime) -> None:
        """Counts ``uses`` more, or raises UseLimitReached when they would
        take the period's count past ``limit`` (or past MAX_USES_PER_PERIOD)."""
        ceiling = MAX_USES_PER_PERIOD if limit is None else min(limit, MAX_USES_PER_PERIOD)
        if self.uses + uses > ceiling:
            raise UseLimitReached(self.user_id, self.feature, ceiling, self.uses, uses, self.period_end)
        self.trigger_event(self.Used, uses=uses, key=key, limit=limit, timestamp=now)
        if not 0 <= self.uses <= ceiling:
            raise InvariantViolation(f"usage counter {self.id} holds {self.uses} uses, outside 0..{ceiling}")


def uses_left(limit: int | None, used: int) -> int | None:
    return None if limit is None else max(0, limit - used)


def state_of(value: Any) -> str:
    """A subscription's status as text (``none`` without one)."""
    return "none" if value is None else str(value.status)
