"""Each view owns its tables' DDL; storage renders what the views layer passes it.

A new view is its module and one line in ``ledger/views/registry.py``; its
tables reach stores that recorded the schema version already, because opening
the views migrates when any registered table is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import pytest

from ledger import Ledger
from ledger.errors import ConfigurationError
from ledger.storage.ddl import SCHEMA_VERSION, SCHEMA_VERSION_TABLE, Table, render_postgres, render_sqlite
from ledger.storage.viewstore import ViewTx
from ledger.views.base import View
from ledger.views.registry import OTHER_TABLES, VIEWS, schema_tables
from ledger.views.schema import TABLES, VIEW_TABLES

#: A view a host or a later release might add, written here, as its module would be.
NOTES = Table(
    "ledger_test_notes",
    postgres="""
CREATE TABLE IF NOT EXISTS {S}.ledger_test_notes (
    user_id UUID PRIMARY KEY,
    note TEXT NOT NULL,
    updated_at TIMESTAMP NOT NULL DEFAULT NOW()
);
""",
    sqlite="""
CREATE TABLE IF NOT EXISTS ledger_test_notes (
    user_id TEXT NOT NULL PRIMARY KEY,
    note TEXT NOT NULL,
    updated_at TEXT NOT NULL DEFAULT ({NOW})
);
""",
    postgres_after="CREATE INDEX IF NOT EXISTS idx_ledger_test_notes_note ON {S}.ledger_test_notes(note);\n",
    sqlite_after="CREATE INDEX IF NOT EXISTS idx_ledger_test_notes_note ON ledger_test_notes(note);\n",
    updated_at=True,
)


class NotesView(View):
    name = "notes"
    topics = ()
    tables: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {"ledger_test_notes": ("user_id", ("updated_at",))}
    ddl = (NOTES,)

    def process(self, events: Sequence[tuple[int, Any]], tx: ViewTx) -> None:
        pass


def test_every_view_declares_the_ddl_of_the_tables_it_rebuilds() -> None:
    for view in VIEWS:
        assert set(view.tables) <= {t.name for t in view.ddl}, view.name
    assert set(VIEW_TABLES) == {table for view in VIEWS for table in view.tables}


def test_every_table_has_one_owner() -> None:
    owned = [t.name for t in schema_tables()]
    assert len(owned) == len(set(owned))
    assert (*owned, SCHEMA_VERSION_TABLE.name) == TABLES
    assert {t.name for t in OTHER_TABLES} == {"webhook_events", "notification_consumers", "notification_dead_letters"}
    with pytest.raises(ConfigurationError, match="declared twice: plans"):
        render_sqlite([*schema_tables(), next(t for t in schema_tables() if t.name == "plans")])


def test_a_new_view_needs_no_storage_edit() -> None:
    # Storage writes the trigger, the qualification and the version table from the declaration alone.
    pg = render_postgres([*schema_tables(), *NotesView.ddl], "pingvas_dev")
    assert 'CREATE TABLE IF NOT EXISTS "pingvas_dev".ledger_test_notes (' in pg
    assert 'CREATE TRIGGER trg_ledger_test_notes_updated_at\n    BEFORE UPDATE ON "pingvas_dev".ledger_test_notes' in pg
    assert pg.index("ledger_test_notes (") < pg.index("ledger_schema_version (")
    lite = render_sqlite([*schema_tables(), *NotesView.ddl])
    assert "AFTER UPDATE OF user_id, note ON ledger_test_notes" in lite


def test_opening_the_views_creates_a_registered_table_that_is_missing(durable_url: str) -> None:
    with Ledger(durable_url) as ledger:
        store = ledger.views.store
        assert {"credit_balances", "webhook_events"} <= store.table_names()
        # A store at the current version that lacks a newly registered view's table.
        assert NOTES.name not in store.table_names()
        store.ensure_schema((*schema_tables(), NOTES))
        assert NOTES.name in store.table_names()
        with store.transaction() as tx:
            assert tx.fetchall("SELECT version FROM ledger_schema_version") == [(SCHEMA_VERSION,)]
            tx.execute("DROP TABLE credit_accounts")
    # A table dropped since: the next open creates it again, though the version is recorded.
    with Ledger(durable_url) as ledger:
        assert "credit_accounts" in ledger.views.store.table_names()
        assert ledger.views.migrate() == SCHEMA_VERSION


#: ``credit_transactions`` as the seed creates it: without the ledger's columns.
SEED_CREDIT_TRANSACTIONS = (
    "CREATE TABLE credit_transactions (id UUID PRIMARY KEY, user_id UUID NOT NULL, amount INT NOT NULL, "
    "type VARCHAR(30) NOT NULL, description VARCHAR(500), reference_id UUID, reference_type VARCHAR(50), "
    "balance_after INT NOT NULL, created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)"
)


def test_migrate_names_a_seed_shaped_table_and_runs_nothing(durable_url: str) -> None:
    with Ledger(durable_url) as ledger:
        store = ledger.views.store
        with store.transaction() as tx:
            tx.execute("DROP TABLE credit_transactions")
            tx.execute(SEED_CREDIT_TRANSACTIONS)
            tx.execute("DROP TABLE credit_accounts")
        with pytest.raises(
            ConfigurationError, match=r"credit_transactions\W* lacks reference_label, idempotency_key, log_position"
        ):
            ledger.views.migrate()
        assert "credit_accounts" not in store.table_names()  # the script did not run
