"""pingvas-ledger: an event-sourced credit ledger.

The public surface is re-exported here; everything else is private.
"""

import typing as _typing

from ledger.application.access import CheckReason, CheckResult, RecordUse
from ledger.application.async_ledger import AsyncLedger
from ledger.application.billing import (
    ActivateSubscription,
    CancelSubscription,
    ChangePlan,
    DefinePlan,
    ExpireSubscription,
    MarkPastDue,
    PauseSubscription,
    RecoverSubscription,
    RenewSubscription,
    ResumeSubscription,
    StartSubscription,
    SyncSubscription,
    UnpauseSubscription,
)
from ledger.application.commands import AdjustCredits, Command, GrantCredits, SpendCredits
from ledger.application.facade import DEFAULT_URL, Ledger, resolve_url
from ledger.application.group import GroupCommit, GroupCommitPolicy, GroupCommitStats
from ledger.application.holds import ReleaseReservation, ReserveCredits, SettleReservation
from ledger.application.limits import SetCreditLimit
from ledger.application.notify import DeliveryReport, Notifier, RetryPolicy
from ledger.application.pricing import DefinePriceBook, ReserveForJob
from ledger.application.results import (
    AccountEvent,
    Balance,
    CreditBlock,
    Entitlements,
    HoldReceipt,
    PlanView,
    PriceBookRevision,
    Quote,
    QuoteLine,
    Receipt,
    Reservation,
    SubscriptionView,
)
from ledger.application.sharing import SharingStats
from ledger.application.signing import verify_signature
from ledger.application.thresholds import BalanceThresholds, SetBalanceThresholds, ThresholdState
from ledger.audit.auditor import Auditor
from ledger.audit.base import Finding
from ledger.audit.digest import DigestHead, DigestResult, Tampering, VerifyResult
from ledger.audit.pointintime import Statement, StatementEntry, StatementHold, StatementHoldEvent
from ledger.audit.runner import AuditReport, audit
from ledger.clock import Clock, ManualClock, SystemClock
from ledger.domain.credits import MAX_CREDIT_LIMIT, MAX_CREDITS, CreditKind
from ledger.domain.plans import DEFAULT_CATALOG, FREE_PLAN, Feature, PlanTerms
from ledger.domain.pricing import DEFAULT_PRICE_BOOK, JobParam, JobPrice, ParamKind, PriceBook, PriceRule, RuleMode
from ledger.domain.subscriptions import (
    BillingCycle,
    CreditPolicy,
    InvalidTransition,
    PauseMode,
    SubscriptionExists,
    UnknownPlan,
    UnknownSubscription,
)
from ledger.domain.subscriptions import Status as SubscriptionStatus
from ledger.domain.thresholds import Threshold
from ledger.errors import (
    AccountLimitReached,
    BatchRejected,
    ConcurrencyExhausted,
    ConfigurationError,
    ConsumerBusy,
    FeatureNotEntitled,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidAmount,
    InvalidArgument,
    InvalidJobParameter,
    InvalidSignature,
    InvariantViolation,
    LedgerClosed,
    LedgerError,
    ReservationClosed,
    TimeInFuture,
    UnknownAccount,
    UnknownFeature,
    UnknownJobType,
    UnknownReservation,
    UseLimitReached,
    ViewsBehind,
    ViewsCorrupt,
    ViewsStalled,
)
from ledger.storage.freshness import CommandStats
from ledger.views.outbox import DeadLetter, Notification, Outbox, OutboxMoved

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CATALOG",
    "FREE_PLAN",
    "ActivateSubscription",
    "BillingCycle",
    "CancelSubscription",
    "ChangePlan",
    "CreditPolicy",
    "DefinePlan",
    "Entitlements",
    "ExpireSubscription",
    "Feature",
    "InvalidTransition",
    "MarkPastDue",
    "PauseMode",
    "PauseSubscription",
    "PlanTerms",
    "PlanView",
    "RecoverSubscription",
    "RenewSubscription",
    "ResumeSubscription",
    "StartSubscription",
    "SubscriptionExists",
    "SubscriptionStatus",
    "SubscriptionView",
    "SyncSubscription",
    "UnknownPlan",
    "UnknownSubscription",
    "UnpauseSubscription",
    "ViewsBehind",
    "ViewsCorrupt",
    "ViewsStalled",
    "DEFAULT_URL",
    "MAX_CREDITS",
    "MAX_CREDIT_LIMIT",
    "AccountEvent",
    "AccountLimitReached",
    "AsyncLedger",
    "AdjustCredits",
    "Balance",
    "BatchRejected",
    "Clock",
    "Command",
    "ConcurrencyExhausted",
    "ConfigurationError",
    "ConsumerBusy",
    "CreditBlock",
    "CreditKind",
    "GrantCredits",
    "GroupCommit",
    "GroupCommitPolicy",
    "SharingStats",
    "GroupCommitStats",
    "HoldReceipt",
    "IdempotencyConflict",
    "InsufficientCredits",
    "InvalidAmount",
    "InvalidArgument",
    "InvariantViolation",
    "Ledger",
    "LedgerClosed",
    "LedgerError",
    "ManualClock",
    "Receipt",
    "ReleaseReservation",
    "Reservation",
    "ReservationClosed",
    "ReserveCredits",
    "SetCreditLimit",
    "SettleReservation",
    "SpendCredits",
    "SystemClock",
    "TimeInFuture",
    "UnknownAccount",
    "UnknownReservation",
    "AuditReport",
    "Auditor",
    "DigestHead",
    "DigestResult",
    "Finding",
    "Statement",
    "StatementEntry",
    "StatementHold",
    "StatementHoldEvent",
    "Tampering",
    "VerifyResult",
    "audit",
    "resolve_url",
    "CheckReason",
    "CheckResult",
    "FeatureNotEntitled",
    "RecordUse",
    "UnknownFeature",
    "UseLimitReached",
    "CommandStats",
    # Pricing (docs/pricing.md).
    "DEFAULT_PRICE_BOOK",
    "DefinePriceBook",
    "InvalidJobParameter",
    "JobParam",
    "JobPrice",
    "ParamKind",
    "PriceBook",
    "PriceBookRevision",
    "PriceRule",
    "Quote",
    "QuoteLine",
    "ReserveForJob",
    "RuleMode",
    "UnknownJobType",
]
# Balance thresholds and the notification outbox (docs/notifications.md).
__all__ += [
    "BalanceThresholds",
    "DeadLetter",
    "DeliveryReport",
    "InvalidSignature",
    "Notification",
    "Notifier",
    "Outbox",
    "OutboxMoved",
    "RetryPolicy",
    "SetBalanceThresholds",
    "Threshold",
    "ThresholdState",
    "verify_signature",
]


def _present_as_public() -> None:
    """Names the public classes and functions ``ledger.X`` (in tracebacks,
    reprs and pickles) instead of the private module that defines them.

    A class whose annotations are resolved by name (pydantic models and
    dataclasses, whose modules use postponed annotations) keeps its module:
    ``typing.get_type_hints`` resolves those names in the module that
    ``__module__`` names, and ``ledger`` does not hold them all."""
    for name in __all__:
        obj = globals()[name]
        if not isinstance(obj, type) and not callable(obj):
            continue
        home = getattr(obj, "__module__", "")
        if home == "ledger" or not home.startswith("ledger.") or getattr(obj, "__qualname__", None) != name:
            continue  # pickle finds an object by module and qualified name: only a name exported as itself
        obj.__module__ = "ledger"
        if isinstance(obj, type):
            try:
                _typing.get_type_hints(obj)
            except Exception:  # a name only its own module holds
                obj.__module__ = home


_present_as_public()
