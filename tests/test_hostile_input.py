"""Bad input gets a LedgerError that says what and why, names the argument,
and records nothing; input the ledger accepts can always be projected.

The last test throws hostile values (wrong types, edge datetimes, NUL and lone
surrogates, UUID and str subclasses, huge ints, bools) at every public method
of ``Ledger`` on every backend."""

from __future__ import annotations

import inspect
import pickle
import re
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ledger as package
from adapters.lemonsqueezy import _effects as lemonsqueezy_effects
from ledger import (
    DEFAULT_CATALOG,
    DEFAULT_PRICE_BOOK,
    AdjustCredits,
    ConfigurationError,
    CreditKind,
    DefinePlan,
    Feature,
    GrantCredits,
    InvalidAmount,
    InvalidArgument,
    Ledger,
    LedgerError,
    ManualClock,
    PlanTerms,
    SyncSubscription,
)
from ledger.domain.plans import plan_id_for
from ledger.domain.subscriptions import subscription_id_for

DOCS = Path(__file__).resolve().parent.parent / "docs"
BAD_TEXT = {"NUL": "a\x00b", "lone surrogate": "a\ud800b"}
SUBSCRIPTION = UUID(int=77)
#: Keys valid calls draw from: few enough that subscriptions started under one
#: are found again by the subscription methods (and keys get reused).
KEYS = [f"k{i}" for i in range(40)]
PRO = next(t for t in DEFAULT_CATALOG if t.name == "pro")


class UserId(UUID):
    """A UUID subclass, as an ORM or a typed-id library hands out."""


class Text(str):
    """A str subclass."""


class Price(Decimal):
    """A Decimal subclass, as a money library hands out."""


def _head(ledger: Ledger) -> int:
    return ledger.app.recorder.max_notification_id() or 0


def _sync(text: str, **fields: Any) -> Any:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    values: dict[str, Any] = {
        "key": "sync",
        "subscription_id": SUBSCRIPTION,
        "user_id": UUID(int=1),
        "plan": "pro",
        "billing_cycle": "monthly",
        "status": "active",
        "period_start": now,
        "period_end": now + timedelta(days=30),
        "source_updated_at": now,
        **fields,
    }
    return SyncSubscription(**values)


def _terms(**fields: Any) -> PlanTerms:
    return replace(PRO, **fields)


#: Every text argument of every command: (what, the call given a bad text).
TEXT_ARGUMENTS: list[tuple[str, Callable[[Ledger, str], object]]] = [
    ("key", lambda lg, t: lg.grant(UUID(int=1), 1, "bonus", key=t)),
    ("description", lambda lg, t: lg.grant(UUID(int=1), 1, "bonus", key="k", description=t)),
    ("reference_type", lambda lg, t: lg.grant(UUID(int=1), 1, "bonus", key="k", reference_type=t)),
    ("reference_id", lambda lg, t: lg.grant(UUID(int=1), 1, "bonus", key="k", reference_id=t)),
    (
        "actor",
        lambda lg, t: lg.execute(
            GrantCredits(key="k", user_id=UUID(int=1), amount_credits=1, kind=CreditKind.BONUS, actor=t)
        ),
    ),
    ("description", lambda lg, t: lg.spend(UUID(int=1), 1, key="k", description=t)),
    ("reference_type", lambda lg, t: lg.spend(UUID(int=1), 1, key="k", reference_type=t)),
    ("reference_id", lambda lg, t: lg.spend(UUID(int=1), 1, key="k", reference_id=t)),
    ("reason", lambda lg, t: lg.release(UUID(int=5), t, key="k")),
    ("reason", lambda lg, t: lg.adjust(UUID(int=1), 1, t, "admin", key="k")),
    ("actor", lambda lg, t: lg.adjust(UUID(int=1), 1, "why", t, key="k")),
    ("plan", lambda lg, t: lg.start_subscription(UUID(int=1), t, key="k")),
    (
        "lemon_squeezy_subscription_id",
        lambda lg, t: lg.start_subscription(UUID(int=1), "pro", key="k", lemon_squeezy_subscription_id=t),
    ),
    (
        "lemon_squeezy_customer_id",
        lambda lg, t: lg.start_subscription(UUID(int=1), "pro", key="k", lemon_squeezy_customer_id=t),
    ),
    ("actor", lambda lg, t: lg.start_subscription(UUID(int=1), "pro", key="k", actor=t)),
    ("plan", lambda lg, t: lg.change_plan(SUBSCRIPTION, t, key="k")),
    ("actor", lambda lg, t: lg.change_plan(SUBSCRIPTION, "studio", key="k", actor=t)),
    ("reason", lambda lg, t: lg.change_plan(SUBSCRIPTION, "studio", key="k", reason=t)),
    ("reason", lambda lg, t: lg.cancel_subscription(SUBSCRIPTION, key="k", reason=t)),
    ("actor", lambda lg, t: lg.cancel_subscription(SUBSCRIPTION, key="k", actor=t)),
    ("reason", lambda lg, t: lg.expire_subscription(SUBSCRIPTION, key="k", reason=t)),
    ("key", lambda lg, t: lg.renew_subscription(SUBSCRIPTION, key=t)),
    ("actor", lambda lg, t: lg.define_plan(PRO, actor=t)),
    ("key", lambda lg, t: lg.define_plan(PRO, key=t)),
    ("display_name", lambda lg, t: lg.define_plan(_terms(display_name=t))),
    ("description", lambda lg, t: lg.define_plan(_terms(description=t))),
    ("lemon_squeezy_variant_id_monthly", lambda lg, t: lg.define_plan(_terms(lemon_squeezy_variant_id_monthly=t))),
    ("features", lambda lg, t: lg.define_plan(_terms(features={t: Feature(True)}))),
    ("features", lambda lg, t: lg.define_plan(_terms(features={"x": Feature(True, {"note": [t]})}))),
    ("plan", lambda lg, t: lg.execute(_sync(t, plan=t))),
    ("external_id", lambda lg, t: lg.execute(_sync(t, external_id=t))),
    ("customer_id", lambda lg, t: lg.execute(_sync(t, customer_id=t))),
    ("name", lambda lg, t: lg.plan(t)),
    ("name", lambda lg, t: lg.plan_history(t)),
]


@pytest.mark.parametrize("bad", sorted(BAD_TEXT))
def test_every_text_argument_refuses_nul_and_lone_surrogates(ledger: Ledger, bad: str) -> None:
    ledger.install_default_catalog()
    ledger.grant(UUID(int=1), 100, "bonus", key="funds")
    head = _head(ledger)
    for param, call in TEXT_ARGUMENTS:
        with pytest.raises(InvalidArgument) as info:
            call(ledger, BAD_TEXT[bad])
        assert info.value.param == param, (param, info.value)
        assert bad in str(info.value) and type(info.value) is InvalidArgument
    assert _head(ledger) == head  # nothing recorded
    ledger.views.catch_up()


def test_text_in_any_language_is_recorded_and_projected(ledger: Ledger) -> None:
    user = UUID(int=1)
    text = "크레딧 충전 🎉 — naïve ÆØÅ"
    ledger.grant(user, 10, "bonus", key=f"{text}:1", description=text, reference_id=text)
    ledger.adjust(user, 1, text, text, key=f"{text}:2")
    ledger.views.catch_up()
    with ledger.views.store.transaction() as tx:
        rows = tx.fetchall("SELECT description FROM credit_transactions ORDER BY log_position")
    assert rows == [(text,), (text,)]


def test_edge_datetimes_are_refused_not_overflowed(ledger: Ledger, clock: ManualClock) -> None:
    user = UUID(int=1)
    ledger.grant(user, 100, "bonus", key="funds")
    head = _head(ledger)
    edges = [
        datetime.max.replace(tzinfo=UTC),
        datetime.max.replace(tzinfo=timezone(timedelta(hours=-1))),  # past the end once converted to UTC
        datetime.min.replace(tzinfo=timezone(timedelta(hours=1))),  # before the start once converted
        datetime.min.replace(tzinfo=UTC),
        datetime(9000, 1, 1, tzinfo=UTC),  # where addition of periods could reach the end of the range
        datetime(1969, 12, 31, 23, 59, tzinfo=UTC),
    ]
    for moment in edges:
        for name, call in [
            ("expires_at", lambda m: ledger.grant(user, 1, "bonus", key="g", expires_at=m)),
            ("expires_at", lambda m: ledger.reserve(user, uuid4(), 1, m, key="r")),
            ("now", lambda m: ledger.tick(m)),
            ("now", lambda m: ledger.expire_holds(m)),
            ("now", lambda m: ledger.record_due([user], m)),
            ("period_end", lambda m: _sync("", period_end=m)),
            ("moment", lambda m: ManualClock(clock.now()).set(m)),
            ("start", lambda m: ManualClock(m)),
        ]:
            with pytest.raises(InvalidArgument, match="outside the times the ledger takes") as info:
                call(moment)
            assert info.value.param == name
    with pytest.raises(InvalidArgument, match="passes"):
        ManualClock(clock.now()).advance(timedelta.max)
    assert _head(ledger) == head


def test_a_grant_that_would_lapse_at_once_is_about_expires_at_not_the_amount(
    ledger: Ledger, clock: ManualClock
) -> None:
    with pytest.raises(InvalidArgument) as info:
        ledger.grant(UUID(int=1), 5, "bonus", key="late", expires_at=clock.now() - timedelta(days=1))
    assert not isinstance(info.value, InvalidAmount)
    assert (info.value.code, info.value.param) == ("invalid_argument", "expires_at")
    assert "expires_at" in str(info.value) and "lapse" in str(info.value)


def test_subclasses_of_uuid_and_str_are_stored_as_plain_values(ledger: Ledger) -> None:
    user = UserId(int=9)
    receipt = ledger.grant(user, 10, Text("bonus"), key=Text("typed-ids"), description=Text("typed"))
    assert receipt.balance_credits == 10 and type(receipt.user_id) is UUID
    command = AdjustCredits(key=Text("a"), user_id=user, delta_credits=1, reason=Text("r"), actor=Text("x"))
    assert type(command.user_id) is UUID and {type(command.key), type(command.reason), type(command.actor)} == {str}
    ledger.execute(command)
    assert ledger.balance(UUID(int=9)).balance_credits == 11
    hold = ledger.reserve(user, UserId(int=10), 2, datetime(2027, 1, 1, tzinfo=UTC), key="typed-hold")
    assert hold.reservation_id is not None
    ledger.release(UserId(bytes=hold.reservation_id.bytes), "done", key="typed-release", user_id=user)
    ledger.views.catch_up()
    assert [e.type for e in ledger.history(user)][-2:] == ["reserved", "released"]


def test_batches_and_sweeps_take_any_iterable_and_refuse_the_rest(ledger: Ledger) -> None:
    users = [uuid4() for _ in range(3)]
    receipts = ledger.execute_batch(
        GrantCredits(key=f"{u}:g", user_id=u, amount_credits=5, kind=CreditKind.BONUS) for u in users
    )
    assert [r.balance_credits for r in receipts] == [5, 5, 5]
    assert ledger.record_due(u for u in users) == 0
    assert ledger.record_due(tuple(users)) == 0 and ledger.record_due(set(users)) == 0
    assert ledger.execute_batch(()) == []
    head = _head(ledger)
    single = GrantCredits(key="one", user_id=users[0], amount_credits=1, kind=CreditKind.BONUS)
    for bad, message in [(None, "not NoneType"), (5, "not int"), ("keys", "not str"), (single, "execute()")]:
        with pytest.raises(InvalidArgument, match=re.escape(message)) as info:
            ledger.execute_batch(bad)  # type: ignore[arg-type]
        assert info.value.param == "commands"
    for not_ids in (None, users[0], "user", {users[0]: 1}):
        with pytest.raises(InvalidArgument) as info:
            ledger.record_due(not_ids)  # type: ignore[arg-type]
        assert info.value.param == "user_ids"
    with pytest.raises(InvalidArgument, match="at most 10000"):
        ledger.record_due(uuid4() for _ in range(10_001))
    with pytest.raises(InvalidArgument, match="user_ids must be a UUID"):
        ledger.record_due([users[0], "not-a-uuid"])  # type: ignore[list-item]
    assert _head(ledger) == head


def test_an_audit_checkpoint_must_be_a_path(ledger: Ledger) -> None:
    for bad in ("audit\x00.json", 5):
        with pytest.raises(InvalidArgument) as info:
            package.audit(ledger, checkpoint=bad)  # type: ignore[arg-type]
        assert info.value.param == "checkpoint"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://[::1/db",
        "postgresql://user:secret@[::1/db",
        "postgresql://user@host:99999/db",
        "postgresql://user@host:port/db",
        "sqlite://[host/file",
        "postgresql://host/db?schema=a\x00",
        "memory://\ud800",
    ],
)
def test_a_malformed_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Ledger(url)
    assert "secret" not in str(info.value)


def test_plan_terms_the_stores_cannot_hold_are_refused(ledger: Ledger) -> None:
    head = _head(ledger)
    for param, terms in [
        ("monthly_price", lambda: _terms(monthly_price=Decimal("NaN"))),
        ("monthly_price", lambda: _terms(monthly_price=Decimal("1e40"))),
        ("yearly_price", lambda: _terms(yearly_price=Price("100.00"))),
        ("yearly_price", lambda: _terms(yearly_price=Decimal("100000000.00"))),
        ("credits", lambda: _terms(credits=2**31)),
        ("storage_bytes", lambda: _terms(storage_bytes=2**63)),
        ("is_active", lambda: _terms(is_active=1)),
        ("features", lambda: _terms(features={"x": Feature(True, {"n": float("nan")})})),
        ("features", lambda: _terms(features={"x": Feature(True, {"n": 2**64})})),
        ("features", lambda: _terms(features={"x": Feature(True, {"n": object()})})),
        ("features", lambda: _terms(features={"x": Feature("yes")})),  # type: ignore[arg-type]
        ("name", lambda: _terms(name=5)),
        ("terms", lambda: "pro"),
    ]:
        with pytest.raises(InvalidArgument) as info:
            ledger.define_plan(terms())  # type: ignore[arg-type]
        assert info.value.param == param, (param, info.value)
    assert _head(ledger) == head
    with pytest.raises(InvalidArgument):
        DefinePlan(key="k", terms=_terms(credits=2**40))


# -- the errors themselves ---------------------------------------------------------------


def _error_classes() -> list[type[LedgerError]]:
    seen: list[type[LedgerError]] = []
    todo: list[type[LedgerError]] = [LedgerError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


def test_every_error_has_its_own_documented_code() -> None:
    assert lemonsqueezy_effects.Held.code == "held"  # the adapter's errors are loaded
    classes = _error_classes()
    codes = {cls: cls.__dict__.get("code") for cls in classes}
    missing = [cls.__name__ for cls, code in codes.items() if code is None]
    assert not missing, f"errors without their own code: {missing}"
    assert len(set(codes.values())) == len(codes), "codes must be unique"
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", str(code)) for code in codes.values())
    table = (DOCS / "errors.md").read_text()
    for cls, code in codes.items():
        assert f"`{code}`" in table, f"{cls.__name__}'s code {code!r} is not in docs/errors.md"


def test_public_errors_show_as_ledger_names_and_survive_pickling() -> None:
    user = UUID(int=1)
    for name in package.__all__:
        obj = getattr(package, name)
        if isinstance(obj, type) and issubclass(obj, LedgerError):
            assert obj.__module__ == "ledger", name
            assert f"<class 'ledger.{name}'>" == repr(obj)
    errors: list[LedgerError] = [
        package.InsufficientCredits(user, 5, 3),
        package.UnknownAccount(user),
        package.UnknownReservation(UUID(int=2), user),
        package.ReservationClosed(UUID(int=2), "settled"),
        package.IdempotencyConflict("k", "grant", "spend"),
        package.ConcurrencyExhausted(3),
        package.BatchRejected(1, InvalidArgument("description is bad", param="description")),
        package.InvalidTransition(UUID(int=3), "active", "renew", "too early"),
        package.SubscriptionExists(user, UUID(int=3)),
        package.UnknownPlan("gold"),
        package.InvalidArgument("limit must be within 1..10000", param="limit"),
        package.ViewsStalled(7, "topic", UUID(int=4), 2, ValueError("bad")),
    ]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error) and repr(copy) == repr(error)
        assert vars(copy).keys() == vars(error).keys() and (copy.code, copy.param) == (error.code, error.param)
    batch = pickle.loads(pickle.dumps(errors[6]))
    assert batch.param == "description" and batch.cause.param == "description"
    assert (errors[0].code, errors[0].param, errors[1].param) == ("insufficient_credits", None, "user_id")
    assert repr(errors[1]) == f"UnknownAccount('no credit account for user {user}; grant credits to open one')"


# -- hostile values at every public method ------------------------------------------------


HOSTILE: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**31,
    2**63,
    2**100,
    -(2**100),
    1.5,
    float("nan"),
    float("inf"),
    Decimal("NaN"),
    Decimal("1e1000"),
    "",
    " ",
    "a\x00b",
    "\ud800",
    "\udfff tail",
    "x" * 20_000,
    b"bytes",
    [],
    {},
    object(),
    UserId(int=1),
    UUID(int=0),
    datetime(2026, 6, 1),  # naive
    datetime.max.replace(tzinfo=UTC),
    datetime.max.replace(tzinfo=timezone(timedelta(hours=-23))),
    datetime.min.replace(tzinfo=timezone(timedelta(hours=23))),
    datetime.min.replace(tzinfo=UTC),
    date(2026, 6, 1),
    timedelta(days=1),
    Text("bonus"),
    Text("a\x00"),
    [UUID(int=1), "x"],
    [None],
    PRO,
    replace(PRO, credits=2**40),
    GrantCredits(key="hostile", user_id=UUID(int=1), amount_credits=1, kind="bonus"),  # type: ignore[arg-type]
]

#: Methods that end or expose the ledger rather than take input.
NOT_COMMANDS = {"close", "views"}
METHODS = sorted(
    name
    for name, member in inspect.getmembers(Ledger)
    if not name.startswith("_") and name not in NOT_COMMANDS and callable(member)
)


def _valid(param: str, now: datetime) -> st.SearchStrategy[Any]:
    users = st.sampled_from([UUID(int=1), UUID(int=2), UUID(int=3)])
    later = st.integers(1, 500_000).map(lambda minutes: now + timedelta(minutes=minutes))
    text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
    return {
        "user_id": users,
        "job_id": st.uuids(),
        "reservation_id": st.uuids(),
        "subscription_id": st.sampled_from([SUBSCRIPTION, *map(subscription_id_for, KEYS)]),
        "amount_credits": st.integers(1, 50),
        "actual_credits": st.integers(1, 50),
        "delta_credits": st.integers(-20, 20).filter(bool),
        "kind": st.sampled_from(["bonus", "purchase", "api_use", "refund"]),
        "key": st.sampled_from(KEYS) | st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1),
        "expires_at": later,
        "now": st.none() | later,
        "plan": st.sampled_from(["starter", "pro", "studio"]),
        "name": st.sampled_from(["starter", "pro", "nope"]),
        "terms": st.sampled_from(DEFAULT_CATALOG),
        "commands": st.lists(
            st.builds(
                GrantCredits,
                key=st.uuids().map(str),
                user_id=users,
                amount_credits=st.integers(1, 9),
                kind=st.just("bonus"),
            ),
            max_size=3,
        ),
        "command": st.builds(
            GrantCredits, key=st.uuids().map(str), user_id=users, amount_credits=st.just(1), kind=st.just("bonus")
        ),
        "user_ids": st.lists(users, max_size=3),
        "limit": st.integers(1, 100),
        "after_version": st.integers(0, 5),
        "mode": st.sampled_from(["void", "free"]),
        "billing_cycle": st.sampled_from(["monthly", "yearly"]),
        "trial_days": st.integers(0, 30),
        "at_period_end": st.booleans(),
        "job_type": st.sampled_from(["text_to_image", "upscale", "nope"]),
        "params": st.fixed_dictionaries(
            {}, optional={"steps": st.integers(-5, 200), "width": st.integers(0, 5000), "scale": st.floats(0, 9)}
        ),
        "safety_margin": st.decimals(min_value=0, max_value=2, places=2),
        "book": st.just(DEFAULT_PRICE_BOOK),
        "fresh": st.booleans(),
    }.get(param, st.none() | text)


@st.composite
def calls(draw: st.DrawFn, now: datetime) -> tuple[str, dict[str, Any]]:
    name = draw(st.sampled_from(METHODS))
    parameters = [p for p in inspect.signature(getattr(Ledger, name)).parameters.values() if p.name != "self"]
    arguments = {}
    for p in parameters:
        if p.default is not inspect.Parameter.empty and draw(st.booleans()):
            continue  # left at its default
        hostile = draw(st.integers(0, 2)) == 0
        arguments[p.name] = draw(st.sampled_from(HOSTILE) if hostile else _valid(p.name, now))
    return name, arguments


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_hostile_values_at_every_method_raise_only_ledger_errors(
    ledger: Ledger, clock: ManualClock, data: st.DataObject
) -> None:
    if not ledger.app.recorder.max_notification_id():
        ledger.install_default_catalog()
        ledger.grant(UUID(int=1), 1_000, "bonus", key="funds")
    name, arguments = data.draw(calls(clock.now()), label="call")
    head = _head(ledger)
    try:
        getattr(ledger, name)(**arguments)
    except LedgerError as exc:
        assert str(exc), f"{type(exc).__name__} without a message"
        assert _head(ledger) == head, f"{name} raised {exc!r} but recorded events"
    ledger.views.catch_up()  # whatever was accepted can be projected


def test_a_providers_subscription_id_names_one_subscription(ledger: Ledger, clock: ManualClock) -> None:
    """A second subscription under a provider's id another one has is refused
    when commanded; accepted, its Started event would stall the read models
    on the unique index of subscriptions.lemon_squeezy_subscription_id."""
    ledger.install_default_catalog()
    first = ledger.start_subscription(UUID(int=1), "pro", key="first", lemon_squeezy_subscription_id="42")
    ledger.start_subscription(
        UUID(int=2), "pro", key="other-provider", provider="paddle", provider_subscription_id="42"
    )
    now = clock.now()
    head = _head(ledger)
    for param, call in [
        (
            "lemon_squeezy_subscription_id",
            lambda: ledger.start_subscription(UUID(int=3), "pro", key="second", lemon_squeezy_subscription_id="42"),
        ),
        (
            "provider_subscription_id",
            lambda: ledger.start_subscription(
                UUID(int=3), "pro", key="third", provider="lemon_squeezy", provider_subscription_id="42"
            ),
        ),
        (
            "external_id",
            lambda: ledger.execute(
                _sync(
                    "",
                    key="sync",
                    subscription_id=uuid4(),
                    user_id=UUID(int=4),
                    period_start=now,
                    period_end=now + timedelta(days=30),
                    source_updated_at=now,
                    external_id="42",
                )
            ),
        ),
    ]:
        with pytest.raises(InvalidArgument, match="names one subscription") as info:
            call()
        assert info.value.param == param and str(first.subscription_id) in str(info.value)
    # Within one batch, the second of two starts under one id is the bad command.
    with pytest.raises(package.BatchRejected) as batch:
        ledger.execute_batch(
            package.StartSubscription(
                key=f"batch:{n}", user_id=UUID(int=5 + n), plan="pro", provider="paddle", provider_subscription_id="43"
            )
            for n in range(2)
        )
    assert (batch.value.index, batch.value.param, type(batch.value.cause)) == (
        1,
        "provider_subscription_id",
        InvalidArgument,
    )
    assert _head(ledger) == head
    # The same subscription synced again under its own id is not a second one.
    ledger.execute(
        _sync(
            "",
            key="again",
            subscription_id=first.subscription_id,
            user_id=UUID(int=1),
            period_start=now,
            period_end=now + timedelta(days=30),
            source_updated_at=now,
            external_id="42",
        )
    )
    ledger.views.catch_up()
    with ledger.views.store.transaction() as tx:
        assert tx.fetchall("SELECT count(*) FROM subscriptions WHERE lemon_squeezy_subscription_id = '42'") == [(1,)]


def test_one_bad_command_in_a_full_batch_is_named_by_its_position(ledger: Ledger) -> None:
    ledger.grant(UUID(int=1), 10, "bonus", key="funds")
    head = _head(ledger)

    def batch(bad: object) -> list[Any]:
        commands: list[Any] = [
            GrantCredits(key=f"g{i}", user_id=UUID(int=100 + i), amount_credits=1, kind=CreditKind.BONUS)
            for i in range(9_999)
        ]
        commands.insert(5_000, bad)
        return commands

    with pytest.raises(InvalidArgument, match="not a ledger command: str, at index 5000 of the batch") as info:
        ledger.execute_batch(batch("grant"))
    assert info.value.param == "commands"
    with pytest.raises(InvalidArgument, match=r"not a ledger command: str$") as info:
        ledger.execute("grant")  # type: ignore[arg-type]
    assert info.value.param == "command"
    conflicting = GrantCredits(key="funds", user_id=UUID(int=1), amount_credits=11, kind=CreditKind.BONUS)
    with pytest.raises(package.BatchRejected) as rejected:
        ledger.execute_batch(batch(conflicting))
    assert (rejected.value.index, rejected.value.param, rejected.value.cause.code) == (
        5_000,
        "key",
        "idempotency_conflict",
    )
    assert _head(ledger) == head
    assert ledger.execute_batch(batch(conflicting)[:10])[-1].balance_credits == 1  # the ledger goes on
    ledger.views.catch_up()


def test_a_feature_config_built_of_dict_subclasses_is_defined_and_read_back(ledger: Ledger) -> None:
    from collections import OrderedDict, defaultdict

    limits: defaultdict[str, int] = defaultdict(int, daily=5)
    terms = _terms(features={**PRO.features, "x": Feature(True, {"limits": limits, "order": OrderedDict(a=1)})})
    assert ledger.define_plan(terms).command == "define_plan"
    stored = ledger.read_aggregate(plan_id_for("pro"), snapshots=False)
    assert stored.terms.features["x"].config == {"limits": {"daily": 5}, "order": {"a": 1}}
    ledger.define_plan(terms)  # the same terms again: no revision
    assert ledger.plan("pro").revision == 1 and ledger.plan("pro").features["x"] is True
    ledger.views.catch_up()
