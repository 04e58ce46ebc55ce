"""Balance thresholds: what an account's low-balance notifications fire at.

A threshold is absolute (``Threshold.credits(500)``: at or below 500 available
credits) or relative (``Threshold.percent(10)``: at or below 10 % of the
current period's grant, rounded down to whole credits). Every account also
has the built-in depletion threshold at 0 available credits: available credits
are ``CreditAccount.available`` (balance - held, plus the credit limit where
one is set), whose floor is 0, so "depleted" is "at the floor".

The crossing rule (``crossings``) is pure: given the thresholds' levels, the
ones that have fired and not re-armed, and the available credits after a
transaction, it says which fire (downward: available at or below the level,
and armed) and which re-arm (available above the level again). The account
records each as an event in the same transaction, so each crossing is
recorded once. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ledger.errors import InvalidArgument

#: The most thresholds one account (or plan) may carry besides depletion.
MAX_THRESHOLDS = 10
#: The largest absolute threshold (the seed's INT credits).
MAX_THRESHOLD_CREDITS = 2_147_483_647
#: The id of the built-in threshold at 0 available credits.
DEPLETED = "depleted"
#: The plan feature whose ``config["thresholds"]`` holds a plan's default
#: thresholds (the seed's ``plan_features.config``).
PLAN_FEATURE = "balance_notifications"


@dataclass(frozen=True, order=True)
class Threshold:
    """One low-balance threshold: ``kind`` is ``"credits"`` or ``"percent"``."""

    kind: str
    value: int

    def __post_init__(self) -> None:
        if self.kind not in ("credits", "percent"):
            raise InvalidArgument(f"a threshold is credits or percent, got {self.kind!r}", param="thresholds")
        if type(self.value) is not int:
            raise InvalidArgument(
                f"a {self.kind} threshold must be an int, got {type(self.value).__name__}", param="thresholds"
            )
        top = 100 if self.kind == "percent" else MAX_THRESHOLD_CREDITS
        if not 1 <= self.value <= top:
            raise InvalidArgument(
                f"a {self.kind} threshold must be within 1..{top}, got {self.value}", param="thresholds"
            )

    @classmethod
    def credits(cls, credits: int) -> Threshold:
        """Fires when available credits fall to ``credits`` or below."""
        return cls("credits", credits)

    @classmethod
    def percent(cls, percent: int) -> Threshold:
        """Fires when available credits fall to ``percent`` % of the current
        period's grant (rounded down) or below; inactive without a grant."""
        return cls("percent", percent)

    @property
    def id(self) -> str:
        """Stable name: ``credits:500``, ``percent:10``."""
        return f"{self.kind}:{self.value}"

    def level(self, period_grant_credits: int) -> int | None:
        """The available credits at or below which it fires; None when a
        percentage has no period grant to be a share of."""
        if self.kind == "credits":
            return self.value
        if period_grant_credits <= 0:
            return None
        return self.value * period_grant_credits // 100

    def as_data(self) -> dict[str, int]:
        return {self.kind: self.value}

    @classmethod
    def from_data(cls, data: object) -> Threshold:
        """``{"credits": 500}`` or ``{"percent": 10}`` (or a Threshold)."""
        if isinstance(data, Threshold):
            return data
        if not isinstance(data, Mapping) or len(data) != 1:
            raise InvalidArgument(
                f'a threshold is {{"credits": N}} or {{"percent": N}}, got {data!r}', param="thresholds"
            )
        ((kind, value),) = data.items()
        return cls(str(kind), value)


def check_thresholds(values: object) -> tuple[Threshold, ...]:
    """Thresholds as an account or plan takes them: at most ten, no
    duplicates, kept highest level first (credits before percentages)."""
    if isinstance(values, str | bytes | Mapping) or not isinstance(values, Iterable):
        raise InvalidArgument("thresholds must be a list of thresholds", param="thresholds")
    items = list(values)
    if len(items) > MAX_THRESHOLDS:
        raise InvalidArgument(f"at most {MAX_THRESHOLDS} thresholds, got {len(items)}", param="thresholds")
    parsed = [Threshold.from_data(v) for v in items]
    if len(set(parsed)) != len(parsed):
        raise InvalidArgument("thresholds must not repeat", param="thresholds")
    return tuple(sorted(parsed, key=lambda t: (t.kind, -t.value)))


def thresholds_data(thresholds: Sequence[Threshold]) -> list[dict[str, int]]:
    return [t.as_data() for t in thresholds]


def thresholds_from_data(data: Iterable[Any]) -> tuple[Threshold, ...]:
    return tuple(Threshold.from_data(d) for d in data)


def plan_thresholds(features: Mapping[str, Any]) -> tuple[Threshold, ...] | None:
    """A plan's default thresholds from its features: the feature
    ``balance_notifications``, enabled, with ``config["thresholds"]`` (none
    or an empty list: depletion only). None when the plan has no such feature."""
    feature = features.get(PLAN_FEATURE)
    if feature is None or not getattr(feature, "enabled", False):
        return None
    config = getattr(feature, "config", None) or {}
    return check_thresholds(config.get("thresholds", []))


@dataclass(frozen=True)
class Crossing:
    """One threshold changing state: ``fired`` (downward) or re-armed."""

    threshold_id: str
    threshold: Threshold | None  # None: depletion
    level_credits: int
    fired: bool


def levels(thresholds: Sequence[Threshold], period_grant_credits: int) -> list[tuple[str, Threshold | None, int]]:
    """(id, threshold, level) of every active threshold and of depletion,
    highest level first."""
    found: list[tuple[str, Threshold | None, int]] = []
    for t in thresholds:
        level = t.level(period_grant_credits)
        if level is not None:
            found.append((t.id, t, level))
    found.sort(key=lambda x: -x[2])
    found.append((DEPLETED, None, 0))
    return found


def crossings(
    thresholds: Sequence[Threshold], period_grant_credits: int, fired: Iterable[str], available: int
) -> list[Crossing]:
    """What changes at ``available`` credits: each armed threshold whose level
    ``available`` is at or below fires (highest level first, depletion last);
    each fired one whose level ``available`` is above re-arms (depletion
    first, lowest level next)."""
    down = set(fired)
    fires: list[Crossing] = []
    rearms: list[Crossing] = []
    for threshold_id, threshold, level in levels(thresholds, period_grant_credits):
        if threshold_id not in down and available <= level:
            fires.append(Crossing(threshold_id, threshold, level, True))
        elif threshold_id in down and available > level:
            rearms.append(Crossing(threshold_id, threshold, level, False))
    return fires + rearms[::-1]


def initially_fired(
    thresholds: Sequence[Threshold], period_grant_credits: int, previously: Iterable[str], available: int
) -> tuple[str, ...]:
    """The fired set when an account's thresholds change: a threshold kept
    keeps its state; a new one starts fired when available is already at or
    below it (so setting a threshold never notifies by itself). Depletion keeps its state."""
    before = set(previously)
    result = {DEPLETED} & before
    for t in thresholds:
        level = t.level(period_grant_credits)
        if t.id in before or (level is not None and available <= level):
            result.add(t.id)
    return tuple(sorted(result))
