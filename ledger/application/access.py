"""``check``: may this user do this now? And ``RecordUse``, the command that
counts a use of a metered feature exactly once.

A check answers from the user's entitlements (the plan in force, its features,
queue and storage), the feature's limit on uses per period (its
``plan_features.config``, ``domain.usage``) and the account's available credits,
and records nothing. It is advisory: it reads a cached copy of that state,
dropped at once by every command this ``Ledger`` records, dropped by other
writers' events once a check finds that the log was last read more than
``max_age_s`` ago (default DEFAULT_MAX_AGE_S: one indexed read of the log's new
events for every user, ``_poll``), and never kept past a moment at which the
state changes by itself (a hold's or a block's expiry, the end of the
subscription's period). What is enforced is enforced by the commands: a spend
or a reserve refuses what the account cannot cover, ``RecordUse`` refuses a use
beyond the limit, each on the state it is committed against.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar, Literal
from uuid import UUID

from eventsourcing.persistence import Notification, Recording
from pydantic import BaseModel, ConfigDict

from ledger.application.commands import Command, UnitOfWork
from ledger.application.results import Receipt, assembled
from ledger.domain.checks import check_amount, check_key, check_user_id
from ledger.domain.credits import CreditAccount, account_id_for
from ledger.domain.plans import FREE_PLAN, MAX_BIGINT, MAX_INT, Plan, PlanTerms, plan_id_for
from ledger.domain.subscriptions import SubscriberSlot, Subscription, slot_id_for
from ledger.domain.usage import (
    UsageCounter,
    UsageLimit,
    check_feature_name,
    check_uses,
    counter_id_for,
    feature_refusal,
    plan_in_force,
    usage_limit_of,
    usage_period,
    uses_left,
)
from ledger.errors import FeatureNotEntitled, InvalidArgument, UnknownFeature, UseLimitReached
from ledger.storage.eventstore import LedgerApplication
from ledger.storage.streams import StreamReader

#: How old the state a check reads may be, by default (seconds).
DEFAULT_MAX_AGE_S = 1.0
#: The most a caller may let it be.
MAX_AGE_LIMIT_S = 3600.0
#: How often a feature name that no plan read so far carries makes the
#: catalog be read again, at most (seconds).
FEATURE_RESCAN_S = 60.0
_FEATURE_RESCAN = timedelta(seconds=FEATURE_RESCAN_S)
#: Events per read of the log when polling, and the most pages one poll reads
#: before it drops the whole cache instead.
POLL_PAGE = 1_000
MAX_POLL_PAGES = 20
#: Users whose state the cache keeps; past it the cache starts afresh.
MAX_CACHED_USERS = 100_000

#: Why a check says no. ``subscription_inactive``: the user's subscription is
#: not in force (expired, paused without service) and the free tier lacks the
#: feature; ``feature_not_in_plan``: the plan in force does not have it or
#: has it disabled; ``use_limit_reached``: the period's uses are spent;
#: ``queue_full``: as many jobs queued as the plan's ``queue_count``;
#: ``storage_full``: the storage asked for exceeds the plan's
#: ``storage_bytes``; ``insufficient_credits``: available credits fall short.
CheckReason = Literal[
    "subscription_inactive",
    "feature_not_in_plan",
    "use_limit_reached",
    "queue_full",
    "storage_full",
    "insufficient_credits",
]


class CheckResult(BaseModel):
    """A check's answer, with the figures it was decided on. ``bool(result)``
    is ``result.allowed``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    user_id: UUID
    allowed: bool
    #: Why not (None when allowed); the first rule that failed, in the order
    #: feature, uses, queue, storage, credits.
    reason: CheckReason | None = None
    message: str | None = None
    #: The plan in force (``free`` without one) and the subscription's status (``none`` without one).
    plan: str
    status: str
    feature: str | None = None
    #: The credits asked about, and the account's available credits.
    requested_credits: int | None = None
    available_credits: int
    #: The feature's limit on uses per period (None: not limited), the uses
    #: counted in the current period, what is left, and the period.
    use_limit: int | None = None
    uses: int | None = None
    uses_left: int | None = None
    period: str | None = None
    period_start: datetime | None = None
    period_end: datetime | None = None
    #: The plan's queue and storage, and what the caller said is in use.
    queue_count: int
    queued_jobs: int | None = None
    storage_bytes: int
    storage_used_bytes: int | None = None
    #: With ``record_use_key``: whether the use is recorded, and whether it
    #: was recorded before under that key (a retry).
    use_recorded: bool = False
    replayed: bool = False
    #: When the check was decided, and when the state it read was read.
    as_of: datetime
    state_as_of: datetime

    def __bool__(self) -> bool:
        return self.allowed


@dataclass(frozen=True)
class RecordUse(Command):
    """Counts ``uses`` uses of a metered feature in the current period, once
    per key; refuses (FeatureNotEntitled, UseLimitReached) what the plan in
    force does not give, deciding on the state it commits against."""

    name: ClassVar[str] = "record_use"
    user_id: UUID = field(kw_only=True)
    feature: str = field(kw_only=True)
    uses: int = field(default=1, kw_only=True)

    def __post_init__(self) -> None:
        self._normalise("key", check_key(self.key))
        self._normalise("user_id", check_user_id(self.user_id))
        self._normalise("feature", check_feature_name(self.feature))
        check_uses(self.uses)

    def reads(self) -> tuple[list[UUID], list[UUID]]:
        return [slot_id_for(self.user_id)], []

    def apply(self, unit: UnitOfWork) -> Receipt:
        # Read fresh from the store (prefetch), not from the command cache:
        # the entitlement must be the one in force, whoever changed it.
        user, now = self.user_id, unit.now
        unit.prefetch([slot_id_for(user)])
        slot = unit.aggregate(slot_id_for(user), SubscriberSlot)
        s: Subscription | None = None
        terms: PlanTerms | None = None
        shown = _shown_subscription(slot)
        if shown is not None:
            unit.prefetch([shown])
            s = unit.aggregate(shown, Subscription)
        if s is not None:
            unit.prefetch([plan_id_for(s.plan)])
            plan = unit.aggregate(plan_id_for(s.plan), Plan)
            terms = plan.terms if plan is not None else None
        in_force = plan_in_force(s, terms, now)
        refusal = feature_refusal(user, self.feature, s, in_force, FREE_PLAN)
        if refusal is not None:
            raise refusal
        plan_terms = in_force or FREE_PLAN
        limit = usage_limit_of(
            plan_terms.features[self.feature].config, f"plan {plan_terms.name}, feature {self.feature!r}"
        )
        period = usage_period(limit, s if in_force is not None else None, now)
        counter_id = counter_id_for(user, self.feature, period[0])
        unit.prefetch([counter_id])
        counter = unit.aggregate(counter_id, UsageCounter)
        if counter is None:
            counter = UsageCounter.open(user, self.feature, period, now)
            unit.add(counter)
        counter.use(self.uses, limit.uses_per_period, key=self.key, now=now)
        return unit.finish(self, user, amount=0)


@dataclass
class _State:
    """What a check reads of one user, as read at ``loaded_at``."""

    loaded_at: datetime
    #: The first moment at which the state changes by itself (an expiry, a period's end).
    changes_at: datetime | None
    catalog: int
    available: int
    subscription: Subscription | None
    terms: PlanTerms | None
    #: Uses counted per (feature, period start).
    counters: dict[tuple[str, datetime], int] = field(default_factory=dict)
    #: The plan in force as of ``loaded_at`` (None: the free tier). It can
    #: change by itself only at ``changes_at`` (a cancelled period's end).
    in_force: PlanTerms | None = None
    #: Per feature: why the plan in force refuses it (None), or its limit.
    features: dict[str, FeatureNotEntitled | UsageLimit] = field(default_factory=dict)

    def feature(self, user: UUID, feature: str) -> FeatureNotEntitled | UsageLimit:
        decided = self.features.get(feature)
        if decided is None:
            plan = self.in_force or FREE_PLAN
            decided = feature_refusal(user, feature, self.subscription, self.in_force, FREE_PLAN) or usage_limit_of(
                plan.features[feature].config, f"plan {plan.name}, feature {feature!r}"
            )
            self.features[feature] = decided
        return decided


class Checks:
    """Checks against a cache of the users' state, and the record of uses.
    Safe to share across threads."""

    def __init__(
        self,
        app: LedgerApplication,
        reader: StreamReader,
        now: Callable[[], datetime],
        execute: Callable[[Command], Receipt],
        find_record: Callable[[str], object | None],
        scan: Callable[[list[str]], Iterator[Any]],
    ) -> None:
        self.reader = reader
        self._app = app
        self._now = now
        self._execute = execute
        self._find_record = find_record
        self._scan = scan
        self._users: dict[UUID, _State] = {}
        #: Aggregate ids a cached state was read from, and whose state that is.
        self._deps: dict[UUID, UUID] = {}
        #: Bumped by every save that touches a cached (or loading) state: a
        #: load that saw it change does not cache what it read.
        self._changes = 0
        #: Bumped by every save of a plan: every cached state's terms are dropped.
        self._catalog = 0
        self._features: frozenset[str] | None = None
        self._features_read: tuple[int, datetime] | None = None
        self._lock = threading.Lock()
        #: The log position up to which other writers' events have been read
        #: (``_poll``), and when.
        self._poll_lock = threading.Lock()
        self._position = app.recorder.max_notification_id() or 0
        self._polled_at: datetime | None = None
        app.save_listeners.append(self._saved)

    # -- the cache -----------------------------------------------------------------

    def _saved(self, recordings: Sequence[Recording[UUID]]) -> None:
        """This ledger's saves: what they change is dropped at once."""
        self._invalidate([r.notification for r in recordings])

    def _invalidate(self, notifications: Sequence[Notification]) -> None:
        with self._lock:
            for notification in notifications:
                user = self._deps.get(UUID(str(notification.originator_id)))
                if user is not None:
                    self._users.pop(user, None)
                    self._changes += 1
                if notification.topic.startswith(_PLAN_TOPICS):
                    self._catalog += 1
                    self._changes += 1

    def _poll(self, now: datetime, max_age: timedelta) -> datetime:
        """Reads the events recorded since the last poll (by any writer) and
        drops the cached state they change: one indexed read of the log for
        every user, at most every ``max_age``. Returns when it last polled."""
        with self._poll_lock:
            polled = self._polled_at
            if polled is not None and polled <= now < polled + max_age:
                return polled  # another thread just polled
            recorder = self._app.recorder
            start = self._position + 1
            for _ in range(MAX_POLL_PAGES):
                page = recorder.select_notifications(start=start, limit=POLL_PAGE)
                if page:
                    self._invalidate(page)
                    start = page[-1].id + 1
                if len(page) < POLL_PAGE:
                    break
            else:  # far behind (a bulk import): start afresh from the head
                self.forget()
                start = (recorder.max_notification_id() or 0) + 1
            self._position = start - 1
            self._polled_at = now
            return now

    def forget(self) -> None:
        """Drops every cached state: the next check of each user reads afresh."""
        with self._lock:
            self._users.clear()
            self._deps.clear()
            self._changes += 1

    def _state(self, user: UUID, now: datetime, max_age: timedelta) -> tuple[_State, datetime]:
        """The user's state, known current at the time returned with it."""
        if not max_age:
            return self._load(user, now), now
        polled = self._polled_at
        if polled is None or not polled <= now < polled + max_age:
            polled = self._poll(now, max_age)
        state = self._users.get(user)
        if (
            state is not None
            and state.catalog == self._catalog
            and state.loaded_at <= now
            and (state.changes_at is None or now < state.changes_at)
        ):
            return state, max(state.loaded_at, polled)
        return self._load(user, now), now

    def _watch(self, user: UUID, *ids: UUID) -> int:
        with self._lock:
            if len(self._deps) > 4 * MAX_CACHED_USERS:
                self._users.clear()
                self._deps.clear()
                self._changes += 1
            for aggregate_id in ids:
                self._deps[aggregate_id] = user
            return self._changes

    def _load(self, user: UUID, now: datetime) -> _State:
        account_id, slot_id = account_id_for(user), slot_id_for(user)
        mark = self._watch(user, account_id, slot_id)
        catalog = self._catalog
        found = self.reader.load([account_id, slot_id])
        account = found.get(account_id)
        available, changes_at = 0, None
        if isinstance(account, CreditAccount):
            account.apply_due(now)  # in memory only: a check records nothing
            available = account.available
            changes_at = _next_change(account, now)
        slot = found.get(slot_id)
        s: Subscription | None = None
        terms: PlanTerms | None = None
        shown = _shown_subscription(slot) if isinstance(slot, SubscriberSlot) else None
        if shown is not None:
            mark = min(mark, self._watch(user, shown))
            loaded = self.reader.load([shown]).get(shown)
            s = loaded if isinstance(loaded, Subscription) else None
        if s is not None:
            plan = self.reader.load([plan_id_for(s.plan)], snapshots=False).get(plan_id_for(s.plan))
            terms = plan.terms if isinstance(plan, Plan) else None
            if terms is not None:
                self._learn(terms)
            ends = [t for t in (s.period_end, s.trial_ends_at) if t is not None and t > now]
            changes_at = min([*ends, *([changes_at] if changes_at else [])], default=changes_at)
        state = _State(now, changes_at, catalog, available, s, terms, in_force=plan_in_force(s, terms, now))
        with self._lock:
            if self._changes == mark and self._catalog == catalog:
                if len(self._users) >= MAX_CACHED_USERS:
                    self._users.pop(next(iter(self._users)))
                self._users[user] = state
        return state

    def _uses(self, user: UUID, state: _State, feature: str, period_start: datetime) -> int:
        counted = state.counters.get((feature, period_start))
        if counted is None:
            counter_id = counter_id_for(user, feature, period_start)
            mark = self._watch(user, counter_id)
            counter = self.reader.load([counter_id], snapshots=False).get(counter_id)
            counted = counter.uses if isinstance(counter, UsageCounter) else 0
            with self._lock:
                if self._changes == mark:
                    state.counters[(feature, period_start)] = counted
        return counted

    # -- features --------------------------------------------------------------------

    def known_features(self) -> frozenset[str]:
        """The features any plan in the catalog names (its current terms), and the free tier's."""
        latest: dict[UUID, dict[str, Any]] = {}
        for event in self._scan([Plan.Defined.TOPIC, Plan.Revised.TOPIC]):
            latest[event.originator_id] = event.terms
        names = set(FREE_PLAN.features)
        for terms in latest.values():
            names.update(terms.get("features") or {})
        return frozenset(names)

    def _require_known(self, feature: str, now: datetime) -> None:
        """Raises UnknownFeature for a name no plan carries. The catalog is
        read when first needed, at once after this ledger saves a plan, and
        again for a name not among those read at most every
        FEATURE_RESCAN_S (a read of the catalog scans the log's plan events;
        a stream of misspelt names must not repeat it)."""
        known, read = self._features, self._features_read
        if known is not None and feature in known:
            return
        fresh = read is not None and read[0] == self._catalog and read[1] <= now < read[1] + _FEATURE_RESCAN
        if known is None or not fresh:
            catalog = self._catalog
            known = self.known_features()
            self._features, self._features_read = known, (catalog, now)
        if feature not in known:
            raise UnknownFeature(feature, tuple(sorted(known)))

    def _learn(self, terms: PlanTerms) -> None:
        """Adds the features of terms a state was read with (a plan another
        process defined shows here before a rescan)."""
        known = self._features
        if known is not None and not known.issuperset(terms.features):
            self._features = known.union(terms.features)

    # -- checks ----------------------------------------------------------------------

    def check(
        self,
        user_id: object,
        *,
        feature: object = None,
        credits: object = None,
        uses: object = 1,
        queued_jobs: object = None,
        storage_used_bytes: object = None,
        record_use_key: object = None,
        max_age_s: object = None,
    ) -> CheckResult:
        user = user_id if type(user_id) is UUID and user_id.int else check_user_id(user_id)
        known = self._features
        if feature is None:
            name = None
        elif type(feature) is str and known is not None and feature in known:
            name = feature  # a name a plan carries: checked when the plan was defined
        else:
            name = check_feature_name(feature)
        wanted = None if credits is None else check_amount(credits, "credits")
        count = 1 if type(uses) is int and uses == 1 else check_uses(uses)
        jobs = None if queued_jobs is None else _bounded_int(queued_jobs, "queued_jobs", MAX_INT)
        storage = (
            None if storage_used_bytes is None else _bounded_int(storage_used_bytes, "storage_used_bytes", MAX_BIGINT)
        )
        key = None if record_use_key is None else check_key(record_use_key)
        age = _max_age(max_age_s)
        if name is None and wanted is None and jobs is None and storage is None:
            raise InvalidArgument(
                "give what to check: feature, credits, queued_jobs or storage_used_bytes", param="feature"
            )
        if key is not None and name is None:
            raise InvalidArgument("record_use_key records a use of a feature: give feature too", param="feature")
        now = self._now()
        if name is not None:
            self._require_known(name, now)
        if key is None:
            state, known_at = self._state(user, now, age)
            return self._decide(user, state, now, name, wanted, count, jobs, storage, known_at)
        assert name is not None
        return self._check_and_record(user, now, name, wanted, count, jobs, storage, key)

    def _check_and_record(
        self,
        user: UUID,
        now: datetime,
        feature: str,
        credits: int | None,
        uses: int,
        jobs: int | None,
        storage: int | None,
        key: str,
    ) -> CheckResult:
        state = self._load(user, now)
        result = self._decide(user, state, now, feature, credits, uses, jobs, storage)
        if not result.allowed and self._find_record(key) is None:
            return result  # refused, and not recorded before under this key
        try:
            receipt = self._execute(RecordUse(key=key, user_id=user, feature=feature, uses=uses))
        except (FeatureNotEntitled, UseLimitReached) as exc:
            # Another writer took the last use (or the plan changed) after
            # the read: the command's decision, on the committed state, stands.
            now = self._now()
            fresh = self._decide(user, self._load(user, now), now, feature, credits, uses, jobs, storage)
            if isinstance(exc, FeatureNotEntitled):
                refusal = {"reason": exc.reason, "message": exc.detail}
            else:
                refusal = {
                    "reason": "use_limit_reached",
                    "message": f"{feature!r} used {exc.used} of {exc.limit} times this period "
                    f"(until {exc.period_end.isoformat()})",
                }
            return fresh.model_copy(update={"allowed": False, **refusal})
        # The figures after it: the state just read, with the counter read again.
        if result.period_start is not None:
            state.counters.pop((feature, result.period_start), None)
        after = self._decide(user, state, now, feature, credits, 0, jobs, storage)
        return after.model_copy(
            update={"allowed": True, "reason": None, "message": None, "use_recorded": True,
                    "replayed": receipt.replayed}
        )  # fmt: skip

    def _decide(
        self,
        user: UUID,
        state: _State,
        now: datetime,
        feature: str | None,
        credits: int | None,
        uses: int,
        jobs: int | None,
        storage: int | None,
        known_at: datetime | None = None,
    ) -> CheckResult:
        s = state.subscription
        in_force = state.in_force
        plan = in_force or FREE_PLAN
        reason: str | None = None
        message: str | None = None
        limit: int | None = None
        used = left = period = start = end = None
        if feature is not None:
            decided = state.feature(user, feature)
            if isinstance(decided, FeatureNotEntitled):
                reason, message = decided.reason, decided.detail
            else:
                start, end = usage_period(decided, s if in_force is not None else None, now)
                used = self._uses(user, state, feature, start)
                limit, period = decided.uses_per_period, decided.period
                left = uses_left(limit, used)
                if limit is not None and used + uses > limit:
                    reason = "use_limit_reached"
                    message = f"{feature!r} used {used} of {limit} times this period (until {end.isoformat()})"
        if reason is None and jobs is not None and jobs >= plan.queue_count:
            reason, message = (
                "queue_full",
                f"{jobs} jobs queued; the {plan.name} plan runs {plan.queue_count} at a time",
            )
        if reason is None and storage is not None and storage > plan.storage_bytes:
            reason = "storage_full"
            message = f"{storage} bytes exceed the {plan.name} plan's {plan.storage_bytes} bytes of storage"
        if reason is None and credits is not None and state.available < credits:
            reason = "insufficient_credits"
            message = f"{state.available} credits available, {credits} needed"
        return _result(
            {
                "user_id": user,
                "allowed": reason is None,
                "reason": reason,
                "message": message,
                "plan": plan.name,
                "status": "none" if s is None else str(s.status),
                "feature": feature,
                "requested_credits": credits,
                "available_credits": state.available,
                "use_limit": limit,
                "uses": used,
                "uses_left": left,
                "period": period,
                "period_start": start,
                "period_end": end,
                "queue_count": plan.queue_count,
                "queued_jobs": jobs,
                "storage_bytes": plan.storage_bytes,
                "storage_used_bytes": storage,
                "use_recorded": False,
                "replayed": False,
                "as_of": now,
                "state_as_of": state.loaded_at if known_at is None else known_at,
            }
        )

    def record_use(self, user_id: object, feature: object, *, key: object, uses: object = 1) -> Receipt:
        command = RecordUse(key=key, user_id=user_id, feature=feature, uses=uses)  # type: ignore[arg-type]
        self._require_known(command.feature, self._now())
        return self._execute(command)


_PLAN_TOPICS = f"{Plan.TOPIC}."
_RESULT_FIELDS = frozenset(CheckResult.model_fields)


def _result(values: dict[str, Any]) -> CheckResult:
    """A CheckResult of checked values (every field, in declaration order),
    as ``model_construct`` makes one, minus its per-field pass: that pass was
    half of a cached check's cost. tests/test_checks.py compares the two."""
    return assembled(CheckResult, values, set(_RESULT_FIELDS))


def _shown_subscription(slot: SubscriberSlot | None) -> UUID | None:
    """The subscription a check decides by: the live one, else the one that
    expired last (its status says why the plan is not in force)."""
    if slot is None:
        return None
    return slot.live if slot.live is not None else getattr(slot, "last", None)


def _next_change(account: CreditAccount, now: datetime) -> datetime | None:
    """When the account next changes by itself: the first hold's or block's
    expiry after ``now``. A block that has lapsed but is earmarked by an open
    hold stays until the hold closes, which the hold's own expiry bounds; its
    past expiry would end the cached state before it was ever used."""
    moments = [h.expires_at for h in account.holds.values()]
    moments.extend(b.expires_at for b in account.blocks.values() if b.expires_at is not None)
    return min((t for t in moments if t > now), default=None)


def _bounded_int(value: object, name: str, limit: int) -> int:
    if type(value) is not int or not 0 <= value <= limit:
        raise InvalidArgument(f"{name} must be an int within 0..{limit}, got {value!r}", param=name)
    return value


_DEFAULT_MAX_AGE = timedelta(seconds=DEFAULT_MAX_AGE_S)


def _max_age(value: object) -> timedelta:
    if value is None:
        return _DEFAULT_MAX_AGE
    if type(value) not in (int, float) or not 0 <= value <= MAX_AGE_LIMIT_S:  # type: ignore[operator]
        raise InvalidArgument(
            f"max_age_s must be a number within 0..{MAX_AGE_LIMIT_S:g}, got {value!r}", param="max_age_s"
        )
    return timedelta(seconds=float(value))  # type: ignore[arg-type]
