"""The ledger's extension API: what a new command or a payment provider may
build on, besides the public names in ``ledger``. Everything else under
``ledger`` is internal and may change without notice; ``docs/architecture.md``
shows the seams these names form and worked examples of each.

Commands
    A command is a frozen dataclass subclassing :class:`Command`, validated in
    ``__post_init__``, that runs itself in a :class:`UnitOfWork`
    (``apply``) and says what it will read (``reads``). ``Ledger.execute``
    runs it: idempotently by its ``key``, retried on concurrent writers, in one
    transaction with the other commands of its batch. ``ADDED`` marks a field
    added in a later version, so keys recorded before it still replay.

Domain
    The aggregates a command may read or change through the unit of work,
    their id functions, the period arithmetic (``add_cycle``), and the credit
    policy's rules that the core's subscription commands apply too
    (``grant_expiry``, ``rollover_cap``, ``rollover_allowance``,
    ``unspent_subscription_credits``, ``upgrade_grant``, ``prorated``), so a
    provider's grants are the core's.

Audit checks
    ``Check`` (with its ``AuditContext``) is one more check the audit runs;
    ``register_check`` adds it to every audit that names none.

Storage
    ``ViewStore`` and ``ViewTx``: where the read models live. A provider that
    keeps tables of its own (an inbox of deliveries) writes them through
    ``Ledger.views.store``.
"""

from __future__ import annotations

from ledger.application.commands import ADDED, Command, UnitOfWork
from ledger.audit.base import AuditContext, Check
from ledger.audit.runner import register_check
from ledger.domain.checks import (
    MAX_LABEL_LENGTH,
    MAX_TEXT_LENGTH,
    check_key,
    check_optional_text,
    check_text,
    check_user_id,
    check_uuid,
)
from ledger.domain.credits import CreditAccount, account_id_for, entry_id_for, record_id_for
from ledger.domain.plans import Plan, plan_id_for
from ledger.domain.policy import (
    grant_expiry,
    prorated,
    rollover_allowance,
    rollover_cap,
    unspent_subscription_credits,
    upgrade_grant,
)
from ledger.domain.subscriptions import (
    SubscriberSlot,
    Subscription,
    add_cycle,
    slot_id_for,
    subscription_id_for,
)
from ledger.storage.viewstore import ViewStore, ViewTx

__all__ = [
    "ADDED",
    "AuditContext",
    "Check",
    "MAX_LABEL_LENGTH",
    "MAX_TEXT_LENGTH",
    "Command",
    "CreditAccount",
    "Plan",
    "SubscriberSlot",
    "Subscription",
    "UnitOfWork",
    "ViewStore",
    "ViewTx",
    "account_id_for",
    "add_cycle",
    "check_key",
    "check_optional_text",
    "check_text",
    "check_user_id",
    "check_uuid",
    "entry_id_for",
    "grant_expiry",
    "plan_id_for",
    "prorated",
    "record_id_for",
    "register_check",
    "rollover_allowance",
    "rollover_cap",
    "slot_id_for",
    "subscription_id_for",
    "unspent_subscription_credits",
    "upgrade_grant",
]
