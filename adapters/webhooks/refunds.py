"""What a refund takes back: a policy any provider's refund effects follow."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RefundPolicy:
    """What a refund does to the credits the refunded payment granted.

    The refunded share of the payment's total, applied to the credits it
    granted and rounded down, is clawed back: first from that grant's own
    unspent credits, then (``from_other_credits``) from the account's other
    available credits in the ledger's draw order. Held credits are never
    taken and the balance never goes below zero; what cannot be taken is
    recorded as the payment's shortfall. ``claw_back=False`` records refunds
    and takes nothing."""

    claw_back: bool = True
    from_other_credits: bool = True
