"""Every view the ledger runs, and every table it creates, in one place.

A new view is two files: its module (a ``View`` subclass with its ``topics``,
``tables``, ``ddl`` and ``process``; see ``ledger/views/base.py``) and its line
in :data:`VIEWS`. Its tables are then created by ``migrate``, printed by
``python -m ledger schema``, rebuilt by ``rebuild`` and checked by
``rebuild --verify``; a store that lacks them is migrated at its next open.
"""

from __future__ import annotations

from ledger.storage.ddl import Table
from ledger.views.base import View, ViewOptions
from ledger.views.credits import CreditView
from ledger.views.inbox import WEBHOOK_EVENTS
from ledger.views.outbox import DEAD_LETTERS, NOTIFICATION_CONSUMERS
from ledger.views.subscriptions import SubscriptionView

__all__ = ["OTHER_TABLES", "VIEWS", "default_views", "schema_tables"]

#: Every view, in the order the projector hands each page to them.
VIEWS: tuple[type[View], ...] = (
    CreditView,
    SubscriptionView,
)

#: The tables the library creates that no view writes: the payment
#: providers' inbox (``ledger/views/inbox.py``) and the notification outbox's
#: consumer positions and dead letters (``ledger/views/outbox.py``). The schema-version table is
#: storage's (``ledger.storage.ddl.SCHEMA_VERSION_TABLE``).
OTHER_TABLES: tuple[Table, ...] = (WEBHOOK_EVENTS, NOTIFICATION_CONSUMERS, DEAD_LETTERS)


def default_views(*, sync_user_credits: bool = False, sync_user_tier: bool = False) -> list[View]:
    """One of each registered view, configured as the host asked."""
    options = ViewOptions(sync_user_credits=sync_user_credits, sync_user_tier=sync_user_tier)
    return [view.create(options) for view in VIEWS]


def schema_tables() -> tuple[Table, ...]:
    """The DDL of every table the library creates but the schema-version
    table, in creation order: each view's, in registry order, then the others."""
    return (*(table for view in VIEWS for table in view.ddl), *OTHER_TABLES)
