"""Runs the examples in docs/*.md as doctests, one test per file."""

from __future__ import annotations

import doctest
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
DOC_FILES = sorted(DOCS.glob("*.md"))


def test_docs_exist() -> None:
    assert DOC_FILES, f"no .md files in {DOCS}"


@pytest.mark.parametrize("path", DOC_FILES, ids=[p.name for p in DOC_FILES])
def test_doc_examples_pass(path: Path) -> None:
    result = doctest.testfile(
        str(path),
        module_relative=False,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        raise_on_error=False,
        verbose=False,
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {path.name} failed"


README = DOCS.parent / "README.md"


def test_the_readme_lists_every_doc() -> None:
    index = README.read_text().split("## Documentation", 1)[1].split("\n## ", 1)[0]
    assert [p.name for p in DOC_FILES if f"`docs/{p.name}`" not in index] == []


def test_the_readme_example_type_checks_under_mypy_strict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The first code a user copies must pass the strictness the library is
    # held to: a hold's receipt names the hold (HoldReceipt), so settling
    # by it needs no cast.
    mypy_api = pytest.importorskip("mypy.api")
    block = README.read_text().split("## Use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    example = tmp_path / "readme_use.py"
    example.write_text(block)
    monkeypatch.chdir(README.parent)  # the project's mypy settings, and its ledger
    out, err, status = mypy_api.run(["--strict", "--cache-dir", str(tmp_path / "cache"), str(example)])
    assert status == 0, out + err


def alembic_recipe() -> str:
    text = (DOCS / "operations.md").read_text()
    return text.split("### In an Alembic migration", 1)[1].split("\n### ", 1)[0]


def test_the_alembic_recipe_records_the_current_schema_version() -> None:
    from ledger.storage.ddl import SCHEMA_VERSION

    recipe = alembic_recipe()
    assert set(re.findall(r"pingvas_ledger_schema_v(\d+)\.sql", recipe)) == {str(SCHEMA_VERSION)}
    assert re.findall(r"pingvas-ledger schema version (\d+)", recipe) == [str(SCHEMA_VERSION)]
    assert re.findall(r"VALUES \((\d+), now\(\)", recipe) == [str(SCHEMA_VERSION)]


@pytest.mark.postgres
def test_the_alembic_recipe_leaves_migrate_nothing_to_record(pg_url: str) -> None:
    """The revision's two statements, run as Alembic would, then `migrate`."""
    from ledger import Ledger
    from ledger.views.schema import SCHEMA_VERSION, postgres_ddl
    from tests.conftest import pg_base_url

    schema = parse_qs(urlsplit(pg_url).query)["schema"][0]
    (insert,) = re.findall(r'op\.execute\(\s*"(INSERT INTO .*?)"\s*"(.*?)"\s*\)', alembic_recipe(), re.S)
    with psycopg.connect(pg_base_url()) as conn, conn.transaction():
        conn.execute(postgres_ddl(schema))
        conn.execute("".join(insert).replace("pingvas_prod.", f'"{schema}".'))
    with Ledger(pg_url) as ledger:
        assert ledger.views.migrate() == SCHEMA_VERSION
        with ledger.views.store.transaction() as tx:
            assert tx.fetchall("SELECT version FROM ledger_schema_version") == [(SCHEMA_VERSION,)]


def test_the_schema_doc_gives_the_current_version_and_no_document_outside_the_repository() -> None:
    from ledger.views.schema import SCHEMA_VERSION, postgres_ddl, sqlite_ddl

    schema_doc = (DOCS / "schema.md").read_text()
    assert f"| `SCHEMA_VERSION` | `{SCHEMA_VERSION}`." in schema_doc
    for name, text in [*((p.name, p.read_text()) for p in DOC_FILES), ("DDL", postgres_ddl("x") + sqlite_ddl())]:
        assert not re.search(r"design document|seed section|sections? \d", text), name


def test_every_public_name_is_documented() -> None:
    import adapters.lemonsqueezy
    import ledger

    # The API reference names every public name itself (the topic pages say
    # more), the Lemon Squeezy adapter's included.
    reference = (DOCS / "api.md").read_text()
    for module in (ledger, adapters.lemonsqueezy):
        missing = [n for n in module.__all__ if not re.search(rf"\b{re.escape(n)}\b", reference)]
        assert missing == [], module.__name__
    for name in ("api.md", "errors.md"):
        assert "not described here yet" not in (DOCS / name).read_text(), name
    errors = (DOCS / "errors.md").read_text()
    for error in ("UnknownPlan", "UnknownSubscription", "SubscriptionExists", "InvalidTransition"):
        assert f"| `{error}` |" in errors, error


def test_every_public_error_has_a_row_in_the_error_table() -> None:
    import adapters.lemonsqueezy
    import ledger

    table = (DOCS / "errors.md").read_text().split("## The error table", 1)[1].split("\n## ", 1)[0]
    exported = [
        name
        for module in (ledger, adapters.lemonsqueezy)
        for name in module.__all__
        if isinstance(getattr(module, name), type) and issubclass(getattr(module, name), Exception)
    ]
    assert [n for n in exported if not re.search(rf"^\| `{n}`( \(Lemon Squeezy adapter\))? \|", table, re.M)] == []


def test_the_concepts_page_lists_every_credit_account_event_with_its_topic() -> None:
    from eventsourcing.domain import DomainEvent

    from ledger.extension import CreditAccount

    table = (DOCS / "concepts.md").read_text().split("Events of `CreditAccount`", 1)[1].split("\n\n", 2)[1]
    events: list[Any] = [  # event classes, each with its TOPIC
        cls
        for name, cls in vars(CreditAccount).items()
        if isinstance(cls, type) and issubclass(cls, DomainEvent) and name not in ("Created", "Event", "Snapshot")
    ]
    rows = [f"| `{cls.__name__}` | `{cls.TOPIC}` |" for cls in events]
    assert [row for row in rows if row not in table] == []
