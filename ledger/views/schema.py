"""The library's whole DDL, for PostgreSQL and SQLite: the tables of every
registered view (``ledger/views/registry.py``) and of the providers' inbox,
rendered by storage's dialect mechanics (``ledger/storage/ddl.py``).

The tables, columns, defaults, CHECK constraints and indexes are those of the
seed, Pingvas Studio's database schema: its billing and credit tables (plans,
plan_features, subscriptions, subscription_history, credit_transactions,
credit_reservations, webhook_events, audit_logs), their indexes and the
``update_updated_at`` trigger. Where the ledger needs more, the DDL says so in
a ``ledger deviation N`` comment; ``docs/schema.md`` lists every deviation with
its reason. Everything here is pure: functions return text and touch no
database.

>>> ddl = postgres_ddl("pingvas_dev")
>>> 'CREATE TABLE IF NOT EXISTS "pingvas_dev".credit_transactions (' in ddl
True
>>> postgres_ddl("Pingvas")
Traceback (most recent call last):
...
ledger.ConfigurationError: schema 'Pingvas' must be a lowercase SQL identifier (a-z, 0-9, _; at most 63)
"""

from __future__ import annotations

import re

from ledger.storage.ddl import SCHEMA_VERSION, SCHEMA_VERSION_TABLE, render_postgres, render_sqlite
from ledger.views.registry import VIEWS, schema_tables

__all__ = [
    "ADDED_INDEX_NAMES",
    "INDEX_NAMES",
    "SCHEMA_VERSION",
    "SEED_INDEX_NAMES",
    "TABLES",
    "UPDATED_AT_TABLES",
    "USER_FOREIGN_KEYS",
    "VIEW_TABLES",
    "postgres_ddl",
    "sqlite_ddl",
]


def postgres_ddl(schema: str, *, user_foreign_keys: bool = False) -> str:
    """The PostgreSQL DDL of the library's tables in ``schema``, as one script.

    Every name is qualified with ``schema``, which must be a lowercase SQL
    identifier (otherwise :class:`~ledger.ConfigurationError`). With
    ``user_foreign_keys`` the ``user_id`` columns reference ``<schema>.users(id)``
    as in the seed; that table must then exist.
    """
    return render_postgres(schema_tables(), schema, user_foreign_keys=user_foreign_keys)


def sqlite_ddl() -> str:
    """The SQLite DDL of the library's tables, as one script (for ``executescript``)."""
    return render_sqlite(schema_tables())


#: Every table the library creates, in creation order (a table comes after the
#: tables it references).
TABLES: tuple[str, ...] = (*(t.name for t in schema_tables()), SCHEMA_VERSION_TABLE.name)

#: The tables that are read models: rebuilt from the event store, never the
#: source of truth (every registered view's ``tables``).
VIEW_TABLES: tuple[str, ...] = tuple(table for view in VIEWS for table in view.tables)

#: The tables with an ``updated_at`` column, kept current by the
#: ``update_updated_at`` trigger (PostgreSQL) or its emulation (SQLite).
UPDATED_AT_TABLES: tuple[str, ...] = tuple(t.name for t in schema_tables() if t.updated_at)

#: Every index the seed defines on the ledger's tables: those of subscriptions,
#: subscription_history, credit_transactions, credit_reservations,
#: webhook_events and audit_logs and, from its index strategy,
#: ``idx_credit_transactions_user_created`` and ``idx_subscriptions_active``.
SEED_INDEX_NAMES: frozenset[str] = frozenset(
    {
        "idx_subscriptions_user",
        "idx_subscriptions_status",
        "idx_subscriptions_period_end",
        "idx_subscriptions_lemon_squeezy",
        "idx_subscriptions_active",
        "idx_subscription_history_subscription",
        "idx_credit_transactions_user",
        "idx_credit_transactions_created",
        "idx_credit_transactions_type",
        "idx_credit_transactions_user_created",
        "idx_credit_reservations_user",
        "idx_credit_reservations_job",
        "idx_credit_reservations_status",
        "idx_webhook_events_source",
        "idx_webhook_events_status",
        "idx_webhook_events_created",
        "idx_audit_logs_user",
        "idx_audit_logs_action",
        "idx_audit_logs_entity",
        "idx_audit_logs_created",
    }
)

#: The unique indexes the ledger adds (deviations 4, 6 and 11).
ADDED_INDEX_NAMES: frozenset[str] = frozenset(
    {
        "uq_subscriptions_lemon_squeezy",
        "uq_webhook_events_event_id",
        "uq_webhook_events_payload",
        "uq_credit_transactions_user_position",
    }
)

#: Every index name in the scripts (the seed's, the ones the ledger adds, and
#: those of any table the seed does not have).
INDEX_NAMES: frozenset[str] = frozenset(
    re.findall(r"CREATE (?:UNIQUE )?INDEX IF NOT EXISTS (\w+)", postgres_ddl("public"))
)

#: ``user_foreign_keys=True``: (table, constraint name, ON DELETE action). The
#: actions are the seed's; credit_balances is the ledger's own table and
#: follows credit_transactions.
USER_FOREIGN_KEYS: tuple[tuple[str, str, str], ...] = tuple(
    (t.name, *t.user_foreign_key) for t in schema_tables() if t.user_foreign_key is not None
)
