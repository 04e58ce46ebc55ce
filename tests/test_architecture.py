"""The shape the layering promises, as a user meets it: an embedded user's
``import ledger`` loads no PostgreSQL driver, and the command line's help
loads no payment provider. (The import contracts themselves run in CI as
``lint-imports``; these check what they cannot: what a process loads.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _modules_after(code: str) -> list[str]:
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return loaded


def test_import_ledger_loads_no_database_driver_or_provider() -> None:
    loaded = _modules_after("import ledger")
    assert not [m for m in loaded if m.split(".")[0] in ("psycopg", "psycopg_pool", "httpx", "adapters")]


@pytest.mark.parametrize("url", ["memory://", "sqlite:///{tmp}/ledger.sqlite3"])
def test_an_embedded_ledger_loads_no_postgresql_driver(url: str, tmp_path: object) -> None:
    code = f"import ledger\nledger.Ledger({url.format(tmp=tmp_path)!r}).close()"
    loaded = _modules_after(code)
    assert "psycopg" not in loaded
    assert "eventsourcing.postgres" not in loaded


def test_cli_help_imports_no_provider() -> None:
    code = (
        "import sys\nfrom ledger.cli.main import cli\n"
        "try:\n    cli(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass"
    )
    loaded = _modules_after(code)
    assert not [m for m in loaded if m.split(".")[0] in ("adapters", "httpx", "psycopg")]


def test_cli_lists_provider_commands_from_entry_points() -> None:
    out = subprocess.run([sys.executable, "-m", "ledger", "--help"], capture_output=True, text=True, check=True)
    assert "webhooks" in out.stdout and "(provided by adapters.lemonsqueezy: see its --help)" in out.stdout
    listed = subprocess.run(
        [sys.executable, "-m", "ledger", "webhooks", "--help"], capture_output=True, text=True, check=True
    )
    assert "send" in listed.stdout and "retry" in listed.stdout


def test_a_provider_command_that_cannot_be_imported_is_a_clear_error() -> None:
    # An entry point whose module is missing (another distribution's package
    # shadowing ``adapters``, say): the command says so, the rest still works.
    code = (
        "from importlib.metadata import EntryPoint\n"
        "from ledger.cli.main import cli\n"
        "point = EntryPoint('ghost', 'no_such_provider.cli:ghost', 'pingvas_ledger.cli')\n"
        "cli.__dict__['_registered'] = {'ghost': point}\n"
        "cli(['ghost'], standalone_mode=True)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1
    assert "no_such_provider.cli:ghost, which cannot be imported" in out.stderr


def test_receiving_lemon_squeezy_webhooks_loads_no_http_client() -> None:
    # The REST client (httpx) loads only when the reconciler or client is named.
    loaded = _modules_after("import adapters.lemonsqueezy\nfrom adapters.lemonsqueezy import LemonSqueezy, WebhookApp")
    assert "httpx" not in loaded
    loaded = _modules_after("from adapters.lemonsqueezy import Reconciler")
    assert "httpx" in loaded
