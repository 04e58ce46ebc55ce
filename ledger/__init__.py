"""pingvas-ledger: an event-sourced credit ledger.

The public surface is re-exported here; everything else is private.
"""

from ._clock import Clock, ManualClock, SystemClock
from ._errors import (
    BatchRejected,
    ConcurrencyExhausted,
    ConfigurationError,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidAmount,
    InvalidArgument,
    InvariantViolation,
    LedgerError,
    ReservationClosed,
    UnknownAccount,
    UnknownReservation,
)
from ._ledger import DEFAULT_URL, Ledger
from ._types import (
    MAX_CREDITS,
    AccountEvent,
    AdjustCredits,
    Balance,
    Command,
    CreditBlock,
    CreditKind,
    GrantCredits,
    Receipt,
    ReleaseReservation,
    Reservation,
    ReserveCredits,
    SettleReservation,
    SpendCredits,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_URL",
    "MAX_CREDITS",
    "AccountEvent",
    "AdjustCredits",
    "Balance",
    "BatchRejected",
    "Clock",
    "Command",
    "ConcurrencyExhausted",
    "ConfigurationError",
    "CreditBlock",
    "CreditKind",
    "GrantCredits",
    "IdempotencyConflict",
    "InsufficientCredits",
    "InvalidAmount",
    "InvalidArgument",
    "InvariantViolation",
    "Ledger",
    "LedgerError",
    "ManualClock",
    "Receipt",
    "ReleaseReservation",
    "Reservation",
    "ReservationClosed",
    "ReserveCredits",
    "SettleReservation",
    "SpendCredits",
    "SystemClock",
    "UnknownAccount",
    "UnknownReservation",
]
