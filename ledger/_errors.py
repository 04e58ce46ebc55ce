"""The ledger's error hierarchy.

Every error a caller can provoke is a :class:`LedgerError`. When one is raised,
nothing was recorded: commands validate and run in memory before anything is
written, and a failed write is all-or-nothing.
"""

from __future__ import annotations

from uuid import UUID


class LedgerError(Exception):
    """Base class of every error the ledger raises on purpose."""


class InvalidArgument(LedgerError, ValueError):
    """An argument has the wrong type or an impossible value."""


class InvalidAmount(InvalidArgument):
    """An amount of credits is not a positive whole number (``int`` > 0)."""


class InsufficientCredits(LedgerError):
    """The account's available credits (balance minus held) do not cover a debit."""

    def __init__(self, user_id: UUID, requested_credits: int, available_credits: int) -> None:
        self.user_id = user_id
        self.requested_credits = requested_credits
        self.available_credits = available_credits
        super().__init__(f"account {user_id} has {available_credits} credits available, {requested_credits} requested")


class AccountLimitReached(LedgerError):
    """The account already has as many live credit blocks, or open holds, as
    one account may have (``limit``); nothing was recorded. Live blocks are
    the unspent, unexpired grants; spent and lapsed ones do not count."""

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

    def __init__(self, user_id: UUID) -> None:
        self.user_id = user_id
        super().__init__(f"no credit account for user {user_id}; grant credits to open one")


class UnknownReservation(LedgerError, LookupError):
    """No hold with this reservation id exists (for this user, when one was named)."""

    def __init__(self, reservation_id: UUID, user_id: UUID | None = None) -> None:
        self.reservation_id = reservation_id
        self.user_id = user_id
        owner = f" on the account of user {user_id}" if user_id else ""
        super().__init__(f"no reservation {reservation_id}{owner}")


class ReservationClosed(LedgerError):
    """The hold was already settled or released; a hold closes exactly once."""

    def __init__(self, reservation_id: UUID, status: str) -> None:
        self.reservation_id = reservation_id
        self.status = status
        super().__init__(f"reservation {reservation_id} is already {status}")


class IdempotencyConflict(LedgerError):
    """An idempotency key was used before with different arguments."""

    def __init__(self, key: str, recorded_command: str, command: str) -> None:
        self.key = key
        super().__init__(
            f"idempotency key {key!r} was first used for {recorded_command}; it cannot be reused for {command}"
        )


class ConcurrencyExhausted(LedgerError):
    """Optimistic-concurrency retries ran out while other writers kept winning."""

    def __init__(self, attempts: int) -> None:
        self.attempts = attempts
        super().__init__(
            f"gave up after {attempts} attempts: the account kept changing under "
            "concurrent writers; nothing was recorded, retry the command"
        )


class BatchRejected(LedgerError):
    """One command of a batch failed, so the whole batch recorded nothing."""

    def __init__(self, index: int, cause: LedgerError) -> None:
        self.index = index
        self.cause = cause
        super().__init__(f"command {index} of the batch failed, nothing recorded: {cause}")


class ConfigurationError(LedgerError):
    """The ledger cannot be opened as configured (bad URL, missing settings)."""


class InvariantViolation(LedgerError, AssertionError):
    """An internal invariant broke. This is a bug; the state change was refused."""


class ViewsBehind(LedgerError):
    """The command was recorded, but bringing the read models up to date
    (``sync_views``) failed. ``receipt`` is the command's receipt; the views
    catch up on the next successful projection."""

    def __init__(self, receipt: object, cause: BaseException) -> None:
        self.receipt = receipt
        self.cause = cause
        super().__init__(f"recorded, but the read models could not catch up: {type(cause).__name__}: {cause}")
