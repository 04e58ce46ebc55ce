"""Stateful property test: random subscription lifecycles over simulated
months, on every backend, checked step by step against a reference model.

The model keeps the user's subscriptions (status, plan, period, what the
history must show) and credit blocks, and knows the credit policy of the run
(drawn at random: upgrade full | prorated | none, expire | rollover with or
without a cap, auto_renew on or off). Every command is tried whether or not the
model allows it: an allowed one must do exactly what the model predicts, a
refused one must raise and record nothing. After every step: the subscription
credits granted equal what the policy promises, the balance is the model's, and
``entitlements()`` matches the model's status at that instant. At teardown:
the ``subscription_history`` rows are the transitions the model recorded, and
a rebuild of the views equals the live tables.

The model says what the code should do.
Memory gets a new store per run; SQLite and PostgreSQL share one store per
test, so every run uses a fresh user and keys, and leaves no live subscription
behind (tick() acts on every subscription in the store).
"""

from __future__ import annotations

import calendar
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from uuid import UUID, uuid4

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ledger import (
    DEFAULT_CATALOG,
    CreditPolicy,
    InvalidTransition,
    Ledger,
    LedgerError,
    ManualClock,
    Receipt,
    SubscriptionExists,
    UnknownAccount,
)
from ledger.application.facade import MAX_DUE_PER_TICK
from ledger.views.subscriptions import row_id

START = datetime(2026, 1, 1, tzinfo=UTC)
TERMS = {t.name: t for t in DEFAULT_CATALOG}
RENEWAL_WINDOW = timedelta(days=3)
SUBSCRIPTION_KINDS = ("subscription_grant", "subscription_renew")
LIVE_FOR_PLAN = ("trialing", "active", "past_due")


def _settings(examples: int, steps: int) -> settings:
    return settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, suppress_health_check=list(HealthCheck)
    )


#: Per backend; the whole file runs in about 20 seconds.
SETTINGS = {"memory": _settings(80, 50), "sqlite": _settings(12, 30), "postgres": _settings(6, 30)}

policies = st.builds(
    CreditPolicy,
    upgrade=st.sampled_from(["full", "prorated", "none"]),
    expiry=st.sampled_from(["expire", "rollover"]),
    rollover_cap_credits=st.sampled_from([None, 6000, 20000]),
    auto_renew=st.booleans(),
)
plans = st.sampled_from(sorted(TERMS))
trials = st.sampled_from([0, 0, 3, 14])
cycles = st.sampled_from(["monthly"] * 3 + ["yearly"])
#: Status changes: (allowed from, leaves, history change type).
STATUS_CHANGES = {
    "pause": ("active", "paused", "paused"),
    "unpause": ("paused", "active", "unpaused"),
    "mark past due": ("active", "past_due", "past_due"),
    "recover": ("past_due", "active", "recovered"),
}
TRANSITIONS = ["start", "activate", "renew", "cancel at period end", "cancel now", "resume", "expire", *STATUS_CHANGES]
steps = st.sampled_from([timedelta(hours=1), timedelta(hours=12), timedelta(days=1), timedelta(days=3)])
steps |= st.sampled_from([timedelta(days=8), timedelta(days=16), timedelta(days=31)])


def next_cycle(moment: datetime, cycle: str) -> datetime:
    """The same day a month (or a year) later, or that month's last day."""
    months = 1 if cycle == "monthly" else 12
    years, month0 = divmod(moment.month - 1 + months, 12)
    year, month = moment.year + years, month0 + 1
    return moment.replace(year=year, month=month, day=min(moment.day, calendar.monthrange(year, month)[1]))


# ------------------------------------------------------------------ the model


@dataclass
class Block:
    kind: str
    remaining: int
    expires_at: datetime | None
    granted_at: datetime
    seq: int


@dataclass
class Change:
    version: int
    change_type: str
    at: datetime
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sub:
    id: UUID
    plan: str
    cycle: str
    status: str
    period_start: datetime
    period_end: datetime
    started_at: datetime
    cancel_at_period_end: bool = False
    before_cancel: str | None = None
    changes: list[Change] = field(default_factory=list)

    def record(self, change_type: str, at: datetime, **details: Any) -> None:
        version = self.changes[-1].version + 1 if self.changes else 1
        self.changes.append(Change(version, change_type, at, details))


@dataclass
class Model:
    policy: CreditPolicy
    subs: list[Sub] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    #: Subscription grants, oldest first: (kind, credits, expires_at).
    grants: list[tuple[str, int, datetime | None]] = field(default_factory=list)
    used_keys: set[tuple[Any, ...]] = field(default_factory=set)
    next_seq: int = 0

    @property
    def last(self) -> Sub | None:
        return self.subs[-1] if self.subs else None

    @property
    def live(self) -> Sub | None:
        last = self.last
        return last if last is not None and last.status != "expired" else None

    def alive(self, now: datetime) -> list[Block]:
        return [b for b in self.blocks if b.remaining > 0 and (b.expires_at is None or b.expires_at > now)]

    def balance(self, now: datetime) -> int:
        return sum(b.remaining for b in self.alive(now))

    def grant(self, kind: str, amount: int, expires_at: datetime | None, now: datetime, key: tuple[Any, ...]) -> int:
        """Credits granted once per key; nothing for nothing."""
        if amount <= 0 or key in self.used_keys:
            return 0
        self.used_keys.add(key)
        self.blocks.append(Block(kind, amount, expires_at, now, self.next_seq))
        self.next_seq += 1
        if kind in SUBSCRIPTION_KINDS:
            self.grants.append((kind, amount, expires_at))
        return amount

    def period_grant(self, sub: Sub, kind: str, end: datetime, now: datetime, key: tuple[Any, ...]) -> int:
        """A period's credits by the policy, once per business event ``key``."""
        amount = TERMS[sub.plan].credits
        expires_at: datetime | None = end
        if self.policy.expiry == "rollover":
            expires_at = None
            cap = self.policy.rollover_cap_credits
            if cap is not None:
                unspent = sum(b.remaining for b in self.alive(now) if b.kind in SUBSCRIPTION_KINDS)
                amount = min(amount, max(0, cap - unspent))
        return self.grant(kind, amount, expires_at, now, key)

    def upgrade_credits(self, sub: Sub, plan: str, now: datetime) -> int:
        difference = max(0, TERMS[plan].credits - TERMS[sub.plan].credits)
        if self.policy.upgrade == "prorated":
            left = max(timedelta(0), sub.period_end - now)
            difference = difference * left // (sub.period_end - sub.period_start)
        elif self.policy.upgrade == "none":
            difference = 0
        if (sub.id, "upgrade", plan, sub.period_start) in self.used_keys:
            return 0
        return difference

    def spend(self, amount: int, now: datetime) -> None:
        order = sorted(
            self.alive(now), key=lambda b: (b.expires_at is None, b.expires_at or b.granted_at, b.seq)
        )  # soonest-expiring first, then the oldest
        for block in order:
            part = min(amount, block.remaining)
            block.remaining -= part
            amount -= part
        assert amount == 0


# ------------------------------------------------------------------ the machine


class SubscriptionMachine(RuleBasedStateMachine):
    url: ClassVar[str] = "memory://"

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock(START)
        self.user = uuid4()
        self.prefix = f"lifecycle-{uuid4().hex[:12]}"
        self.count = 0
        self._ledger: Ledger | None = None
        self._model: Model | None = None
        #: False from the start of a step until the invariant passed after it:
        #: teardown checks only a run whose every step succeeded, so that a
        #: step's own failure is the one reported.
        self.settled = True

    @property
    def ledger(self) -> Ledger:
        assert self._ledger is not None
        return self._ledger

    @property
    def model(self) -> Model:
        assert self._model is not None
        return self._model

    @property
    def now(self) -> datetime:
        return self.clock.now()

    def key(self, what: str) -> str:
        self.count += 1
        return f"{self.prefix}:{what}:{self.count}"

    @initialize(policy=policies, plan=plans, trial_days=trials, cycle=cycles)
    def open(self, policy: CreditPolicy, plan: str, trial_days: int, cycle: str) -> None:
        self.settled = False
        self._ledger = Ledger(self.url, clock=self.clock, credit_policy=policy)
        self.ledger.install_default_catalog()
        self._model = Model(policy)
        self.start(plan, trial_days, cycle)

    # -- running commands ----------------------------------------------------------

    def footprint(self) -> tuple[Any, ...]:
        last = self.model.last
        try:
            events = len(self.ledger.history(self.user, limit=10_000))
        except UnknownAccount:
            events = -1
        return (
            self.ledger.app.recorder.max_notification_id(),
            events,
            None if last is None else self.ledger.subscription(last.id),
        )

    def attempt(
        self, allowed: bool, call: Callable[[str], Receipt], what: str, error: type[LedgerError] = InvalidTransition
    ) -> Receipt | None:
        """Runs ``call``; when the model refuses it, expects ``error`` and no trace."""
        key = self.key(what)
        if allowed:
            return call(key)
        before = self.footprint()
        try:
            receipt = call(key)
        except error:
            assert self.footprint() == before, f"refused {what} recorded something"
            assert self.ledger.engine.find_record(key) is None
            return None
        raise AssertionError(f"{what} was allowed: {receipt}; the model refuses it")

    def target(self) -> Sub | None:
        """The subscription commands are tried on: the live one, else the last."""
        return self.model.live or self.model.last

    # -- rules: starting ---------------------------------------------------------------

    @precondition(lambda self: self._model is not None and self._model.live is None)
    @rule(plan=plans, trial_days=trials, cycle=cycles)
    def start(self, plan: str, trial_days: int, cycle: str) -> None:
        self.settled = False
        now = self.now
        receipt = self.ledger.start_subscription(
            self.user, plan, key=self.key("start"), trial_days=trial_days, billing_cycle=cycle
        )
        assert receipt.subscription_id is not None
        end = now + timedelta(days=trial_days) if trial_days else next_cycle(now, cycle)
        sub = Sub(receipt.subscription_id, plan, cycle, "trialing" if trial_days else "active", now, end, now)
        self.model.subs.append(sub)
        granted = self.model.period_grant(sub, "subscription_grant", end, now, (sub.id, "start"))
        assert receipt.amount_credits == granted
        sub.record("trial_started" if trial_days else "created", now)

    # -- rules: lifecycle changes -------------------------------------------------------------

    def allowed(self, sub: Sub, name: str) -> bool | None:
        """Whether the model allows ``name`` on ``sub`` now."""
        now, status = self.now, sub.status
        if name == "start":
            return False  # only tried while a subscription is live: the start rule covers the rest
        if name == "activate":
            return status == "trialing"
        if name == "renew":
            return status in ("active", "past_due") and now >= sub.period_end - RENEWAL_WINDOW
        if name in ("cancel at period end", "cancel now"):
            return status in ("trialing", "active", "past_due", "paused")
        if name == "resume":
            allowed = status == "cancelled" and sub.cancel_at_period_end and now < sub.period_end
            return allowed
        if name == "expire":
            return status in ("trialing", "active", "past_due", "paused") or (
                status == "cancelled" and now >= sub.period_end
            )
        source, _, _ = STATUS_CHANGES[name]
        return status == source

    @rule(name=st.sampled_from(TRANSITIONS), prefer_allowed=st.booleans(), data=st.data())
    def transition(self, name: str, prefer_allowed: bool, data: st.DataObject) -> None:
        """One lifecycle command: half the time one the model allows, else any (likely refused)."""
        self.settled = False
        sub = self.target()
        if sub is None:
            return
        choices = [n for n in TRANSITIONS if self.allowed(sub, n)]
        if prefer_allowed and choices:
            name = data.draw(st.sampled_from(choices), label="allowed")
        allowed = self.allowed(sub, name)
        if allowed is None:
            return
        if name == "start":
            if self.model.live is not None:
                start = self.ledger.start_subscription
                self.attempt(False, lambda k: start(self.user, "pro", key=k), name, SubscriptionExists)
            return
        call: Callable[[str], Receipt] = {
            "activate": lambda k: self.ledger.activate_subscription(sub.id, key=k),
            "renew": lambda k: self.ledger.renew_subscription(sub.id, key=k),
            "cancel at period end": lambda k: self.ledger.cancel_subscription(sub.id, key=k, reason="too expensive"),
            "cancel now": lambda k: self.ledger.cancel_subscription(sub.id, key=k, at_period_end=False),
            "resume": lambda k: self.ledger.resume_subscription(sub.id, key=k),
            "expire": lambda k: self.ledger.expire_subscription(sub.id, key=k),
            "pause": lambda k: self.ledger.pause_subscription(sub.id, key=k),
            "unpause": lambda k: self.ledger.unpause_subscription(sub.id, key=k),
            "mark past due": lambda k: self.ledger.mark_past_due(sub.id, key=k),
            "recover": lambda k: self.ledger.recover_subscription(sub.id, key=k),
        }[name]
        receipt = self.attempt(allowed, call, name)
        if receipt is None:
            return
        now = self.now
        granted = 0
        if name == "activate":
            granted = self._activate(sub)
        elif name == "renew":
            granted = self._renew(sub)
        elif name.startswith("cancel"):
            at_period_end = name == "cancel at period end"
            sub.before_cancel, sub.status, sub.cancel_at_period_end = sub.status, "cancelled", at_period_end
            reason = "too expensive" if at_period_end else None
            sub.record("cancelled", now, at_period_end=at_period_end, reason=reason)
            if not at_period_end:
                sub.status = "expired"
                sub.record("expired", now, reason="cancelled immediately")
        elif name == "resume":
            assert sub.before_cancel is not None
            sub.status, sub.cancel_at_period_end = sub.before_cancel, False  # as before the cancel
            sub.record("resumed", now)
        elif name == "expire":
            sub.status = "expired"
            sub.record("expired", now, reason="period ended")
        else:
            _, sub.status, change = STATUS_CHANGES[name]
            sub.record(change, now)
        assert receipt.amount_credits == granted
        assert receipt.subscription_id == sub.id

    def _activate(self, sub: Sub) -> int:
        now = self.now
        sub.status, sub.period_start, sub.period_end = "active", now, next_cycle(now, sub.cycle)
        granted = self.model.period_grant(sub, "subscription_grant", sub.period_end, now, (sub.id, "activate"))
        sub.record("activated", now)
        return granted

    def _renew(self, sub: Sub) -> int:
        start, end = sub.period_end, next_cycle(sub.period_end, sub.cycle)
        granted = 0
        if self.model.policy.expiry == "rollover" or end > self.now:  # an ended period's credits would lapse unused
            granted = self.model.period_grant(sub, "subscription_renew", end, self.now, (sub.id, "renew", start))
        sub.status, sub.period_start, sub.period_end = "active", start, end
        sub.record("renewed", self.now)
        return granted

    @rule(plan=plans)
    def change_plan(self, plan: str) -> None:
        self.settled = False
        sub = self.target()
        if sub is None:
            return
        allowed = sub.status in LIVE_FOR_PLAN and plan != sub.plan
        upgrade = TERMS[plan].tier_level > TERMS[sub.plan].tier_level
        credits = self.model.upgrade_credits(sub, plan, self.now) if allowed and upgrade else 0
        if credits and self.model.policy.expiry == "expire" and sub.period_end <= self.now:
            credits = 0  # the period is over: an upgrade grant would lapse at once, so none is made
        receipt = self.attempt(allowed, lambda k: self.ledger.change_plan(sub.id, plan, key=k), f"to {plan}")
        if receipt is None:
            return
        expires = None if self.model.policy.expiry == "rollover" else sub.period_end
        key = (sub.id, "upgrade", plan, sub.period_start)
        granted = self.model.grant("subscription_grant", credits, expires, self.now, key)
        assert receipt.amount_credits == granted
        sub.record("upgraded" if upgrade else "downgraded", self.now, **{"from": sub.plan, "to": plan})
        sub.plan = plan

    # -- rules: credits and time ------------------------------------------------------------

    @rule(spend=st.booleans(), amount=st.integers(1, 5000), share=st.floats(0.1, 1.0))
    def credits(self, spend: bool, amount: int, share: float) -> None:
        """A bonus (never expires, outside the rollover cap), or spending a share of the balance."""
        self.settled = False
        if not spend:
            self.ledger.grant(self.user, amount, "bonus", key=self.key("bonus"))
            self.model.grant("bonus", amount, None, self.now, ("bonus", self.count))
            return
        amount = int(self.model.balance(self.now) * share)
        if amount > 0:
            self.ledger.spend(self.user, amount, key=self.key("spend"))
            self.model.spend(amount, self.now)

    @rule(which=st.sampled_from(["advance", "tick", "days pass"]), step=steps, days=st.integers(1, 31))
    def time_passes(self, which: str, step: timedelta, days: int) -> None:
        """The clock moves on, tick runs, or both (a scheduler's day)."""
        self.settled = False
        if which != "tick":
            self.advance(step if which == "advance" else timedelta(days=days))
        if which != "advance":
            self.tick()

    def advance(self, step: timedelta) -> None:
        self.clock.advance(step)

    def tick(self) -> None:
        """What falls due, one change at a time: a late tick renews every missed
        period, at most MAX_DUE_PER_TICK of them."""
        sub, now, due = self.model.live, self.now, 0
        auto = self.model.policy.auto_renew
        while sub is not None and due < MAX_DUE_PER_TICK:
            if sub.status == "trialing" and sub.period_end <= now and auto:
                self._activate(sub)
            elif sub.status == "active" and sub.period_end <= now and auto:
                self._renew(sub)
            elif sub.status == "cancelled" and sub.period_end <= now:
                sub.status = "expired"
                sub.record("expired", now, reason="period ended")
            else:
                break
            due += 1
        assert self.ledger.tick()["subscriptions"] == due

    # -- after every step ---------------------------------------------------------------

    @invariant()
    def ledger_matches_model(self) -> None:
        if self._model is None:
            return
        now, live = self.now, self.model.live
        e = self.ledger.entitlements(self.user)
        if live is None:
            expected: tuple[Any, ...] = ("free", "none", None)
        elif live.status == "paused" or (
            live.status == "cancelled" and (now >= live.period_end or live.before_cancel == "paused")
        ):
            expected = ("free", live.status, None)
        else:
            expected = (live.plan, live.status, live.period_end)
        assert (e.plan, e.status, e.until) == expected
        terms = TERMS.get(e.plan)
        if terms is not None:
            assert (e.tier_level, e.credits_per_period, e.storage_bytes, e.queue_count) == (
                terms.tier_level,
                terms.credits,
                terms.storage_bytes,
                terms.queue_count,
            )
            assert e.features == {k: f.enabled for k, f in terms.features.items()}
        seen = self.ledger.subscription_of(self.user)
        if live is None:
            assert seen is None
        else:
            assert seen is not None
            assert (seen.subscription_id, seen.plan, seen.status, seen.current_period_start) == (
                live.id,
                live.plan,
                live.status,
                live.period_start,
            )
            assert (seen.current_period_end, seen.cancel_at_period_end) == (live.period_end, live.cancel_at_period_end)
        try:
            events = self.ledger.history(self.user, limit=10_000)
            balance = self.ledger.balance(self.user).balance_credits
        except UnknownAccount:
            events, balance = [], 0
        granted = [
            (e.data["kind"], e.data["amount"], e.data["expires_at"])
            for e in events
            if e.type == "granted" and e.data["kind"] in SUBSCRIPTION_KINDS
        ]
        assert granted == self.model.grants
        assert balance == self.model.balance(now)
        self.settled = True

    def teardown(self) -> None:
        if self._ledger is None:
            return
        try:
            if self._model is not None and self.settled:
                self.end_live_subscription()
                self.check_history_and_rebuild()
        finally:
            self.ledger.close()

    def end_live_subscription(self) -> None:
        """Later runs on a shared store tick every live subscription: leave none."""
        sub = self.model.live
        if sub is None:
            return
        if sub.status == "cancelled" and self.now < sub.period_end:
            self.clock.set(sub.period_end)
        self.ledger.expire_subscription(sub.id, key=self.key("teardown"))
        sub.status = "expired"
        sub.record("expired", self.now, reason="period ended")

    def check_history_and_rebuild(self) -> None:
        views = self.ledger.views
        views.catch_up()
        store = views.store
        columns = store.columns("subscription_history")
        found: dict[str, dict[str, Any]] = {}
        for values in store.rows("subscription_history", "changed_at, id"):
            found_row = dict(zip(columns, values, strict=True))
            found[found_row["id"]] = found_row
        for sub in self.model.subs:
            ids = {str(row_id("history", sub.id, c.version)): c for c in sub.changes}
            mine = {k: v for k, v in found.items() if v["subscription_id"] == str(sub.id)}
            assert set(mine) == set(ids), f"history of {sub.id}: rows {len(mine)}, transitions {len(ids)}"
            for row_key, change in ids.items():
                row = mine[row_key]
                assert row["change_type"] == change.change_type
                assert row["changed_at"] == change.at.replace(tzinfo=None).isoformat(sep=" ")
                details = json.loads(row["details"])
                assert details["period_end"] is not None
                for name, value in change.details.items():
                    assert details[name] == value, f"{change}: {details}"
        aside = views.build_aside(until=views.position())
        try:
            assert all(not rows for rows in views.verify(aside).values())
        finally:
            self.ledger.views.drop_aside(aside)


def machine_for(url: str) -> type[SubscriptionMachine]:
    return type("SubscriptionMachine", (SubscriptionMachine,), {"url": url})


def test_random_lifecycles_match_the_model(ledger_url: str, request: pytest.FixtureRequest) -> None:
    backend = request.node.callspec.params["ledger_url"]
    run_state_machine_as_test(machine_for(ledger_url), settings=SETTINGS[backend])  # type: ignore[no-untyped-call]
