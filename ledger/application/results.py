"""What commands and queries return: receipts, balances and their blocks,
holds, account events, views of plans and subscriptions, and what a user is
entitled to (the rule itself is the domain's: ``domain.entitlements``). All
are frozen pydantic models, public through ``ledger``."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, InstanceOf

from ledger.domain.credits import CreditAccount, CreditKind
from ledger.domain.entitlements import entitled
from ledger.domain.plans import FREE_PLAN, PlanTerms
from ledger.domain.pricing import PriceBook
from ledger.domain.subscriptions import Subscription

M = TypeVar("M", bound=BaseModel)


def assembled(cls: type[M], state: dict[str, Any], fields_set: set[str]) -> M:
    """A model of ``cls`` whose ``__dict__`` is ``state`` (every field, in
    declaration order, values already checked) and whose fields set is
    ``fields_set``: what ``model_construct`` makes, without its per-field
    pass. For results built on hot paths (receipts, checks, quotes) from
    state the ledger checked itself; the one place that sets pydantic's
    internals by hand."""
    model = cls.__new__(cls)
    object.__setattr__(model, "__dict__", state)
    object.__setattr__(model, "__pydantic_fields_set__", fields_set)
    object.__setattr__(model, "__pydantic_extra__", None)
    object.__setattr__(model, "__pydantic_private__", None)
    return model


class _View(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Receipt(_View):
    """The result of a command. A retry with the same key returns the first
    receipt again, with ``replayed`` set."""

    key: str
    command: str
    #: The account's user (None for catalog commands such as define_plan).
    user_id: UUID | None
    #: The posted balance change (credit_transactions.id), when the command posted one.
    entry_id: UUID | None = None
    reservation_id: UUID | None = None
    subscription_id: UUID | None = None
    #: Signed change to the balance made by this command (0 for reserve and release).
    amount_credits: int
    balance_credits: int
    held_credits: int
    available_credits: int
    recorded_at: datetime
    replayed: bool = False
    #: Where the command's events sit in the event log (None for a replay):
    #: ``ledger.views.wait(position)`` waits until the read models include it.
    position: int | None = None


class HoldReceipt(Receipt):
    """The receipt of a command on a hold (reserve, reserve_for_job, settle,
    release): ``reservation_id`` names the hold, always."""

    reservation_id: UUID


def receipt_class(reservation_id: UUID | None) -> type[Receipt]:
    """The receipt class for a command's outcome: a hold's, or the plain one."""
    return Receipt if reservation_id is None else HoldReceipt


class CreditBlock(_View):
    """Credits from one grant that are still unspent."""

    block_id: UUID
    kind: CreditKind
    granted_credits: int
    remaining_credits: int
    granted_at: datetime
    expires_at: datetime | None


class Balance(_View):
    user_id: UUID
    #: Below zero when the account spent on credit (docs/credit-limits.md).
    balance_credits: int
    held_credits: int
    #: balance - held + credit limit: what may be spent or held now.
    available_credits: int
    blocks: tuple[CreditBlock, ...]
    as_of: datetime
    #: How far below zero the balance may go (``Ledger.set_credit_limit``).
    credit_limit_credits: int = 0


#: ``HoldStatus``'s values, as a hold's view shows them.
ReservationStatus = Literal["reserved", "settled", "released"]


class Reservation(_View):
    """A hold as recorded: reserved, then settled or released once."""

    reservation_id: UUID
    user_id: UUID
    job_id: UUID
    amount_credits: int
    expires_at: datetime
    reserved_at: datetime
    status: ReservationStatus
    settled_credits: int | None = None
    release_reason: str | None = None
    closed_at: datetime | None = None
    #: The quote that sized the hold (``reserve_for_job``), with the price
    #: book revision that priced it; None for a hold of a given amount.
    quote: Quote | None = None
    #: The margin the hold adds to the quote (``0.1``: 10%), with ``quote``.
    safety_margin: Decimal | None = None


class AccountEvent(_View):
    """One recorded event of a credit account, decoded."""

    user_id: UUID
    version: int
    type: str
    recorded_at: datetime
    data: dict[str, Any]


class PlanView(_View):
    name: str
    display_name: str
    revision: int
    monthly_price: Decimal
    yearly_price: Decimal
    credits: int
    storage_bytes: int
    queue_count: int
    tier_level: int
    is_active: bool
    #: The ``lemon_squeezy`` entry of ``provider_ids``, under its compatibility names.
    lemon_squeezy_variant_id_monthly: str | None
    lemon_squeezy_variant_id_yearly: str | None
    features: dict[str, bool]
    #: Each payment provider's ids of the plan (PlanTerms.provider_ids).
    provider_ids: dict[str, dict[str, str]] = {}


class SubscriptionView(_View):
    subscription_id: UUID
    user_id: UUID
    plan: str
    plan_revision: int
    billing_cycle: str
    status: str
    current_period_start: datetime
    current_period_end: datetime
    trial_ends_at: datetime | None
    cancelled_at: datetime | None
    cancel_reason: str | None
    cancel_at_period_end: bool
    #: The subscription's ids when Lemon Squeezy bills it (compatibility names).
    lemon_squeezy_subscription_id: str | None
    lemon_squeezy_customer_id: str | None
    #: The payment provider that bills it, and its ids there.
    provider: str | None = None
    provider_subscription_id: str | None = None
    provider_customer_id: str | None = None


class Entitlements(_View):
    """What a user may use now. No live subscription means the free tier; a
    cancelled subscription keeps its plan until its period ends."""

    user_id: UUID
    plan: str
    tier_level: int
    features: dict[str, bool]
    credits_per_period: int
    storage_bytes: int
    queue_count: int
    status: str
    until: datetime | None
    as_of: datetime


def plan_view(terms: PlanTerms, revision: int) -> PlanView:
    return PlanView(
        name=terms.name,
        display_name=terms.display_name,
        revision=revision,
        monthly_price=terms.monthly_price,
        yearly_price=terms.yearly_price,
        credits=terms.credits,
        storage_bytes=terms.storage_bytes,
        queue_count=terms.queue_count,
        tier_level=terms.tier_level,
        is_active=terms.is_active,
        lemon_squeezy_variant_id_monthly=terms.lemon_squeezy_variant_id_monthly,
        lemon_squeezy_variant_id_yearly=terms.lemon_squeezy_variant_id_yearly,
        features={k: f.enabled for k, f in terms.features.items()},
        provider_ids={provider: dict(ids) for provider, ids in terms.provider_ids.items()},
    )


def subscription_view(s: Subscription) -> SubscriptionView:
    return SubscriptionView(
        subscription_id=s.id,
        user_id=s.user_id,
        plan=s.plan,
        plan_revision=s.plan_revision,
        billing_cycle=s.billing_cycle,
        status=s.status,
        current_period_start=s.period_start,
        current_period_end=s.period_end,
        trial_ends_at=s.trial_ends_at,
        cancelled_at=s.cancelled_at,
        cancel_reason=s.cancel_reason,
        cancel_at_period_end=s.cancel_at_period_end,
        lemon_squeezy_subscription_id=s.lemon_squeezy_subscription_id,
        lemon_squeezy_customer_id=s.lemon_squeezy_customer_id,
        provider=s.provider,
        provider_subscription_id=s.provider_subscription_id,
        provider_customer_id=s.provider_customer_id,
    )


def entitlements_for(user_id: UUID, s: Subscription | None, terms: PlanTerms | None, now: datetime) -> Entitlements:
    if s is None or terms is None or not entitled(s, now):
        return _free(user_id, now, s)
    return Entitlements(
        user_id=user_id,
        plan=terms.name,
        tier_level=terms.tier_level,
        features={k: f.enabled for k, f in terms.features.items()},
        credits_per_period=terms.credits,
        storage_bytes=terms.storage_bytes,
        queue_count=terms.queue_count,
        status=s.status,
        until=s.period_end,
        as_of=now,
    )


def _free(user_id: UUID, now: datetime, s: Subscription | None) -> Entitlements:
    status: Any = s.status if s is not None else "none"
    return Entitlements(
        user_id=user_id,
        plan=FREE_PLAN.name,
        tier_level=FREE_PLAN.tier_level,
        features={},
        credits_per_period=0,
        storage_bytes=FREE_PLAN.storage_bytes,
        queue_count=FREE_PLAN.queue_count,
        status=status,
        until=None,
        as_of=now,
    )


def credit_blocks(account: CreditAccount | None) -> tuple[CreditBlock, ...]:
    """An account's live blocks as ``CreditBlock``s, oldest grant first."""
    if account is None:
        return ()
    return tuple(
        CreditBlock(
            block_id=UUID(b.block_id),
            kind=CreditKind(b.kind),
            granted_credits=b.granted,
            remaining_credits=b.remaining,
            granted_at=b.granted_at,
            expires_at=b.expires_at,
        )
        for b in sorted(account.blocks.values(), key=lambda b: b.seq)
    )


# ---------------------------------------------------------------- pricing


#: ``LineKind``'s values, as a quote's breakdown shows them.
QuoteLineKind = Literal["base", "add", "multiply", "plan", "rounding", "minimum"]


class QuoteLine(_View):
    """One line of a quote's breakdown: the credits it adds (exact; the lines
    add up to the quote's ``credits``), and the rule's quantity (``add`` and
    ``multiply`` lines of numeric rules) or factor (``multiply`` and ``plan``)."""

    label: str
    kind: QuoteLineKind
    credits: Decimal
    quantity: Decimal | None = None
    factor: Decimal | None = None


class Quote(_View):
    """What a job costs a user: whole ``credits`` (what the seed's
    ``generation_jobs.estimated_credits`` holds), the breakdown, and the
    price book revision that priced it."""

    user_id: UUID
    job_type: str
    credits: int
    #: The price before rounding up and the minimum.
    exact_credits: Decimal
    breakdown: tuple[QuoteLine, ...]
    #: The parameters as priced: those the book declares, defaults filled in.
    params: dict[str, int | Decimal | str]
    price_revision: int
    #: The user's plan when the book has plan multipliers (else None).
    plan: str | None
    plan_multiplier: Decimal
    quoted_at: datetime


class PriceBookRevision(_View):
    """One revision of the price book."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    revision: int
    defined_at: datetime
    actor: str | None
    book: InstanceOf[PriceBook]


Reservation.model_rebuild()
