"""The ledger's error hierarchy.

Every error a caller can provoke is a :class:`LedgerError`. When one is raised,
nothing was recorded: commands validate and run in memory before anything is
written, and a failed write is all-or-nothing.

Every error class has a ``code``, a stable snake_case name for programs (log
fields, API responses, metrics), and every error a ``param``: the name of the
argument it is about, or ``None``. Messages are for people and may be
reworded; codes are not.
"""

# No ``from __future__ import annotations`` here: the public error classes are
# re-exported with ``__module__ = "ledger"``, and string annotations would then
# be resolved in the ``ledger`` namespace by ``typing.get_type_hints``.

from datetime import datetime, timedelta
from typing import Any, ClassVar
from uuid import UUID


class LedgerError(Exception):
    """Base class of every error the ledger raises on purpose."""

    #: A stable, machine-readable name of the error (snake_case).
    code: ClassVar[str] = "ledger_error"
    #: The argument the error is about, when there is one.
    param: str | None = None

    def __init__(self, *args: object, param: str | None = None) -> None:
        super().__init__(*args)
        if param is not None:
            self.param = param

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take other arguments than their message, so the default
        # (calling the class with ``args``) cannot rebuild them: rebuild from
        # the message and the attributes instead, without calling __init__.
        return (_rebuild, (type(self), self.args), self.__dict__)


def _rebuild(cls: type[LedgerError], args: tuple[object, ...]) -> LedgerError:
    return cls.__new__(cls, *args)  # BaseException.__new__ keeps ``args``; pickle then restores the attributes


class InvalidArgument(LedgerError, ValueError):
    """An argument has the wrong type or an impossible value."""

    code = "invalid_argument"


class InvalidAmount(InvalidArgument):
    """An amount of credits is not a positive whole number (``int`` > 0)."""

    code = "invalid_amount"
    param = "amount_credits"


class TimeInFuture(InvalidArgument):
    """A ``now`` given to ``tick()``, ``expire_holds()`` or ``record_due()``
    lies further ahead of the ledger's clock than the tolerance. Recording as
    of it would stamp events in the future and expire credits and holds early;
    the ledger's next command would then be recorded "before" them."""

    code = "time_in_future"

    def __init__(self, name: str, moment: datetime, clock_now: datetime, tolerance: timedelta) -> None:
        self.name = name
        self.moment = moment
        self.clock_now = clock_now
        self.tolerance = tolerance
        super().__init__(
            f"{name} {moment.isoformat()} is {self.ahead} ahead of the ledger's clock "
            f"({clock_now.isoformat()}; at most {tolerance.total_seconds():g} s ahead is accepted): events "
            "would be stamped in the future. Move the ledger's clock instead (ManualClock), or pass "
            "allow_future=True for a simulation",
            param=name,
        )

    @property
    def ahead(self) -> timedelta:
        """How far ``moment`` lies ahead of the clock, to the second."""
        return timedelta(seconds=round((self.moment - self.clock_now).total_seconds()))


class InsufficientCredits(LedgerError):
    """The account's available credits (balance minus held, plus the account's
    credit limit) do not cover a debit. Below zero after a limit was lowered."""

    code = "insufficient_credits"

    def __init__(self, user_id: UUID, requested_credits: int, available_credits: int) -> None:
        self.user_id = user_id
        self.requested_credits = requested_credits
        self.available_credits = available_credits
        super().__init__(f"account {user_id} has {available_credits} credits available, {requested_credits} requested")


class AccountLimitReached(LedgerError):
    """The account already has as many live credit blocks, or open holds, as
    one account may have (``limit``); nothing was recorded. Live blocks are
    the unspent, unexpired grants; spent and lapsed ones do not count."""

    code = "account_limit_reached"

    def __init__(self, user_id: UUID, what: str, limit: int) -> None:
        self.user_id = user_id
        self.what = what
        self.limit = limit
        advice = (
            "spend or let some lapse first, or grant fewer, larger amounts"
            if what == "live credit blocks"
            else "settle or release some first"
        )
        super().__init__(
            f"account of user {user_id} already has {limit:,} {what}, the most one account may have: {advice}"
        )


class UnknownAccount(LedgerError, LookupError):
    """No credit account exists for this user."""

    code = "unknown_account"
    param = "user_id"

    def __init__(self, user_id: UUID) -> None:
        self.user_id = user_id
        super().__init__(f"no credit account for user {user_id}; grant credits to open one")


class UnknownReservation(LedgerError, LookupError):
    """No hold with this reservation id exists (for this user, when one was named)."""

    code = "unknown_reservation"
    param = "reservation_id"

    def __init__(self, reservation_id: UUID, user_id: UUID | None = None) -> None:
        self.reservation_id = reservation_id
        self.user_id = user_id
        owner = f" on the account of user {user_id}" if user_id else ""
        super().__init__(f"no reservation {reservation_id}{owner}")


class ReservationClosed(LedgerError):
    """The hold was already settled or released; a hold closes exactly once."""

    code = "reservation_closed"
    param = "reservation_id"

    def __init__(self, reservation_id: UUID, status: str) -> None:
        self.reservation_id = reservation_id
        self.status = status
        super().__init__(f"reservation {reservation_id} is already {status}")


class IdempotencyConflict(LedgerError):
    """An idempotency key was used before with different arguments.
    ``fields`` names the arguments that differ from its first use (``command``
    among them when the command differs), or is None when the first use was
    recorded by a version that did not keep its arguments."""

    code = "idempotency_conflict"
    param = "key"

    def __init__(self, key: str, recorded_command: str, command: str, fields: tuple[str, ...] | None = None) -> None:
        self.key = key
        self.recorded_command = recorded_command
        self.command = command
        self.fields = fields
        if fields is None:
            differ = "the arguments that differ are unknown (its first use was recorded by an earlier version)"
        else:
            differ = "differing: " + ", ".join(fields)
        hint = ""
        if fields == ("expires_at",):
            hint = "; to retry a command whose expiry is counted from now, give expires_in instead of expires_at"
        super().__init__(
            f"idempotency key {key!r} was first used for {recorded_command}; it cannot be reused for {command} "
            f"({differ}){hint}"
        )


class ConcurrencyExhausted(LedgerError):
    """Optimistic-concurrency retries ran out while other writers kept winning."""

    code = "concurrency_exhausted"

    def __init__(self, attempts: int) -> None:
        self.attempts = attempts
        super().__init__(
            f"gave up after {attempts} attempts: the account kept changing under "
            "concurrent writers; nothing was recorded, retry the command"
        )


class BatchRejected(LedgerError):
    """One command of a batch failed, so the whole batch recorded nothing."""

    code = "batch_rejected"

    def __init__(self, index: int, cause: LedgerError) -> None:
        self.index = index
        self.cause = cause
        super().__init__(f"command {index} of the batch failed, nothing recorded: {cause}")
        # The failing command's argument: ``commands[index]``'s ``param``.
        self.param = cause.param


class ConfigurationError(LedgerError):
    """The ledger cannot be opened as configured (bad URL, missing settings)."""

    code = "configuration_error"


class InvariantViolation(LedgerError, AssertionError):
    """An internal invariant broke. This is a bug; the state change was refused."""

    code = "invariant_violation"


class ViewsBehind(LedgerError):
    """The command was recorded, but bringing the read models up to date
    (``sync_views``) failed. ``receipt`` is the command's receipt; the views
    catch up on the next successful projection."""

    code = "views_behind"

    def __init__(self, receipt: object, cause: BaseException) -> None:
        self.receipt = receipt
        self.cause = cause
        super().__init__(f"recorded, but the read models could not catch up: {type(cause).__name__}: {cause}")


class ViewsStalled(LedgerError):
    """The projector met an event it cannot write into the read models. It
    stops there: the views hold every event before it and none after, until
    the cause is fixed (the event itself stays, as every event does)."""

    code = "views_stalled"

    def __init__(
        self, position: int, topic: str, originator_id: UUID | str, originator_version: int, cause: BaseException
    ) -> None:
        self.position = position
        self.topic = topic
        self.originator_id = originator_id
        self.originator_version = originator_version
        self.cause = cause
        super().__init__(
            f"the read models are stalled at position {position}: event {topic} of {originator_id} "
            f"v{originator_version} cannot be written ({type(cause).__name__}: {cause}); the views stay at "
            "the event before it, so the projection fails on it until the cause is fixed"
        )


class ViewsCorrupt(LedgerError):
    """The read models' tracking table holds a position that is not a whole
    number (text, a fraction, bytes: SQLite keeps what is written into an
    INTEGER column). The ledger never writes one: the table was changed
    outside it, by hand or by a fault. Nothing is projected, compared or
    waited for against it until a rebuild replaces it."""

    code = "views_corrupt"

    def __init__(self, table: str, value: object) -> None:
        self.table = table
        self.value = value
        super().__init__(
            f"the read models' tracking table {table} holds {value!r} as their position, not a whole number: "
            "it was written outside the ledger (tampering or corruption); the event store is not affected, "
            "and python -m ledger rebuild replaces the views and their position"
        )


class UnknownFeature(LedgerError, LookupError):
    """No plan in the catalog names this feature (a typo, or a feature the
    host has not defined in any plan's ``features``)."""

    code = "unknown_feature"
    param = "feature"

    def __init__(self, feature: str, known: tuple[str, ...] = ()) -> None:
        self.feature = feature
        self.known = known
        listed = ", ".join(known[:20]) if known else "none"
        super().__init__(f"no plan names the feature {feature!r} (the catalog's features: {listed})")


class FeatureNotEntitled(LedgerError):
    """The plan in force does not give the feature: it is not in the plan, or
    disabled there (``reason`` ``feature_not_in_plan``), or the user's
    subscription is not in force (``subscription_inactive``: expired, paused
    without service)."""

    code = "feature_not_entitled"
    param = "feature"

    def __init__(self, user_id: UUID, feature: str, plan: str, reason: str, message: str) -> None:
        self.user_id = user_id
        self.feature = feature
        self.plan = plan
        self.reason = reason
        #: The message without the user's id (what a check's result says).
        self.detail = message
        super().__init__(f"user {user_id}: {message}")


class UseLimitReached(LedgerError):
    """Counting these uses would take the feature's uses in the current
    period past the plan's limit; nothing was recorded."""

    code = "use_limit_reached"
    param = "feature"

    def __init__(
        self, user_id: UUID, feature: str, limit: int, used: int, requested: int, period_end: datetime
    ) -> None:
        self.user_id = user_id
        self.feature = feature
        self.limit = limit
        self.used = used
        self.requested = requested
        self.period_end = period_end
        super().__init__(
            f"user {user_id} has used {feature!r} {used} of {limit} times this period; "
            f"{requested} more would exceed the limit (the period ends {period_end.isoformat()})"
        )


class LedgerClosed(LedgerError):
    """A call to an ``AsyncLedger`` that is closing or closed: the call did not
    run, so nothing was recorded by it."""

    code = "ledger_closed"


class UnknownJobType(LedgerError, LookupError):
    """The price book prices no job of this type (or no price book is defined yet)."""

    code = "unknown_job_type"
    param = "job_type"

    def __init__(self, job_type: object, known: tuple[str, ...] = ()) -> None:
        self.job_type = job_type
        self.known = known
        if known:
            hint = f"the price book prices {', '.join(sorted(known))}"
        else:
            hint = "no price book is defined yet: define_price_book() or install_default_price_book()"
        super().__init__(f"no price for job type {job_type!r}; {hint}")


class InvalidJobParameter(InvalidArgument):
    """A job's parameter is missing, of the wrong kind or outside the bounds
    the price book declares for it. ``parameter`` names it; ``param`` is
    ``params.<name>``."""

    code = "invalid_job_parameter"

    def __init__(self, job_type: str, parameter: str, problem: str) -> None:
        self.job_type = job_type
        self.parameter = parameter
        super().__init__(f"{job_type} parameter {parameter!r} {problem}", param=f"params.{parameter}")


class InvalidSignature(LedgerError):
    """A notification's signature does not verify (``verify_signature``):
    ``reason`` is ``missing_timestamp``, ``stale_timestamp``,
    ``missing_signature`` or ``mismatch``."""

    code = "invalid_signature"

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class ConsumerBusy(LedgerError):
    """Another notifier delivers this outbox consumer's notifications (in this
    process or another, on this machine or another): one consumer is
    delivered by one notifier at a time, or every notification would arrive
    twice. Nothing was sent. ``consumer`` names it."""

    code = "consumer_busy"

    def __init__(self, consumer: str) -> None:
        self.consumer = consumer
        super().__init__(
            f"another notifier is delivering consumer {consumer!r}; "
            "run one per consumer (a standby waits for it: --standby, Notifier.claim(wait=True))"
        )
