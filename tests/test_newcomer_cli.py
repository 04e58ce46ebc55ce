"""The command line as a new user meets it: a mistyped store is refused, not
created; the demo does not run twice on one store; reconcile without a
network says so at once; --version, -h and the environment variables; and
options that mean nothing for a dialect are refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import psycopg
import pytest
from click.testing import CliRunner

from adapters.lemonsqueezy._client import LemonSqueezyApiError, LemonSqueezyClient, TokenBucket
from ledger import Ledger, __version__
from ledger.cli.main import cli
from tests.conftest import pg_base_url


def ledger_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ledger", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


USER = "00000000-0000-4000-8000-000000000001"
#: Every command that must not create the store it is pointed at.
REFUSING = {
    "audit": ["audit", "--quiet"],
    "balance": ["balance", "--user", USER, "--as-of", "2026-01-01"],
    "statement": ["statement", "--user", USER, "--start", "2026-01-01", "--end", "2026-02-01"],
    "digest": ["digest", "--quiet"],
    "verify": ["verify", "--quiet", "--digest", "1:" + "0" * 64],
    "tick": ["tick"],
    "rebuild": ["rebuild"],
    "webhooks list": ["webhooks", "list"],
    "webhooks retry": ["webhooks", "retry"],
}


@pytest.mark.parametrize("command", sorted(REFUSING))
def test_a_command_on_a_mistyped_sqlite_path_refuses_and_creates_nothing(tmp_path: Path, command: str) -> None:
    path = tmp_path / "typo" / "ledger.sqlite3"
    result = ledger_cli(*REFUSING[command], "--url", f"sqlite:///{path}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no ledger store at" in result.stderr and "does not exist" in result.stderr
    assert "PASSED" not in result.stdout and "Traceback" not in result.stderr
    assert not path.parent.exists()


MEMORY_REFUSING = {
    **REFUSING,
    "migrate": ["migrate"],
    "project": ["project"],
    "reconcile": ["reconcile", "--api-key", "x"],
    "webhooks link": ["webhooks", "link", "1", USER],
}


@pytest.mark.parametrize("command", sorted(MEMORY_REFUSING))
def test_a_command_on_memory_refuses_it(command: str) -> None:
    """Each memory:// ledger is empty: audit said PASSED, digest anchored 0:000…,
    tick found nothing due, and migrate or project kept nothing."""
    result = ledger_cli(*MEMORY_REFUSING[command], "--url", "memory://")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "memory:// is a store of one ledger object only" in result.stderr
    assert "PASSED" not in result.stdout and "Traceback" not in result.stderr


def test_ledger_url_from_the_environment_is_refused_the_same_way(tmp_path: Path) -> None:
    env_path = tmp_path / "env-typo.sqlite3"
    result = subprocess.run(
        [sys.executable, "-m", "ledger", "audit", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LEDGER_URL": f"sqlite:///{env_path}"},
    )
    assert result.returncode == 2 and "no ledger store" in result.stderr
    assert not env_path.exists()


@pytest.mark.postgres
@pytest.mark.parametrize("command", ["audit", "tick"])
def test_a_command_on_a_mistyped_postgres_schema_refuses_and_creates_nothing(pg_url: str, command: str) -> None:
    schema = parse_qs(urlsplit(pg_url).query)["schema"][0]
    result = ledger_cli(*REFUSING[command], "--url", pg_url)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"no table {schema}.ledger_events" in result.stderr
    with psycopg.connect(pg_base_url()) as conn:
        assert conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", [schema]).fetchone() is None


def test_the_commands_still_work_on_a_store_that_exists(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    Ledger(url).close()
    audit = ledger_cli("audit", "--quiet", "--url", url)
    assert audit.returncode == 0 and "result: PASSED" in audit.stdout
    assert ledger_cli("tick", "--url", url).returncode == 0


# ------------------------------------------------------------ demo


def test_demo_twice_on_one_store_refuses_the_second_run_and_records_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.sqlite3'}"
    first = ledger_cli("demo", "--url", url)
    assert first.returncode == 0, first.stderr
    with Ledger(url) as ledger:
        events = ledger.app.recorder.max_notification_id()
    second = ledger_cli("demo", "--url", url)
    assert second.returncode == 2
    assert "the demo tells its story on an empty store" in second.stderr and f"holds {events} events" in second.stderr
    assert "balance" not in second.stdout  # no story told from another run's receipts
    with Ledger(url) as ledger:
        assert ledger.app.recorder.max_notification_id() == events


def test_demo_without_url_runs_again_and_again() -> None:
    folders = set()
    for _ in range(2):
        run = ledger_cli("demo")
        assert run.returncode == 0
        # The last line names the folder the run leaves behind, and how to look at it.
        last = run.stdout.rstrip().splitlines()[-1]
        assert last.startswith("The demo's store is kept in ") and last.endswith("delete it when done.")
        folder = Path(last.removeprefix("The demo's store is kept in ").split(" (try: ")[0])
        assert (folder / "ledger.sqlite3").is_file() and f"audit --url sqlite:///{folder}/ledger.sqlite3" in last
        folders.add(folder)
        shutil.rmtree(folder)
    assert len(folders) == 2


# ------------------------------------------------------------ reconcile without a network


def test_reconcile_without_a_network_fails_at_once_naming_what_it_tried(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    started = time.monotonic()
    result = ledger_cli("reconcile", "--url", url, "--api-key", "k", "--api-url", "http://127.0.0.1:9/v1")
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cannot connect to http://127.0.0.1:9" in result.stderr
    assert "tried GET http://127.0.0.1:9/v1/subscriptions" in result.stderr
    assert elapsed < 15, elapsed  # it used to back off for 31 s first


class _Recorder:
    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


def _client(handler: Any, waits: _Recorder) -> LemonSqueezyClient:
    bucket = TokenBucket(1000, 100, sleep=waits.sleep)
    return LemonSqueezyClient(
        "k", transport=httpx.MockTransport(handler), sleep=waits.sleep, bucket=bucket, max_backoff_s=1
    )


def test_a_failed_first_connection_is_not_retried() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("[Errno 101] Network is unreachable", request=request)

    waits = _Recorder()
    with _client(handler, waits) as client, pytest.raises(LemonSqueezyApiError, match="cannot connect to https"):
        list(client.subscriptions())
    assert len(calls) == 1 and waits.sleeps == []


def test_a_connection_lost_after_the_api_answered_is_retried() -> None:
    answers = iter([None, "drop", None])

    def handler(request: httpx.Request) -> httpx.Response:
        if next(answers) == "drop":
            raise httpx.ConnectTimeout("timed out", request=request)
        return httpx.Response(200, json={"data": [], "links": {}})

    waits = _Recorder()
    with _client(handler, waits) as client:
        assert list(client.subscriptions()) == []
        assert list(client.subscriptions()) == []  # the drop was retried once
    assert len(waits.sleeps) == 1 and client.requests == 3


def test_the_connect_timeout_is_short_and_checked() -> None:
    with LemonSqueezyClient("k") as client:
        assert client._http.timeout.connect == 10.0 and client._http.timeout.read == 30.0
    with pytest.raises(ValueError, match="connect_timeout_s"):
        LemonSqueezyClient("k", connect_timeout_s=0)


# ------------------------------------------------------------ --version, -h, environment


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str) -> None:
    result = ledger_cli(flag)
    assert result.returncode == 0 and result.stdout.strip() == f"pingvas-ledger {__version__}"


@pytest.mark.parametrize("args", [["-h"], ["tick", "-h"], ["webhooks", "send", "-h"]])
def test_short_help(args: list[str]) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0 and "Usage:" in result.output


def test_help_names_the_environment_variables_the_commands_read() -> None:
    # The core's help names its own and points to the providers' commands,
    # whose help names theirs (the core's help imports no provider).
    top = CliRunner().invoke(cli, ["--help"]).output
    assert "LEDGER_URL" in top and "Provider commands list theirs in their own --help" in top
    for command in (["webhooks"], ["reconcile"]):
        provider = CliRunner().invoke(cli, [*command, "--help"]).output
        for name in (
            "LEDGER_URL",
            "LEMONSQUEEZY_SIGNING_SECRET",
            "LEMONSQUEEZY_API_KEY",
            "LEMONSQUEEZY_ADAPTER",
            "LEMONSQUEEZY_TEST_MODE",
            "LEMONSQUEEZY_CREDIT_PACKS",
        ):
            assert name in provider, (command, name)

    def usage(*args: str) -> str:
        return " ".join(CliRunner().invoke(cli, [*args, "-h"]).output.split())  # unwrapped

    assert "env var: LEMONSQUEEZY_SIGNING_SECRET" in usage("webhooks", "send")
    assert "env var: LEMONSQUEEZY_API_KEY" in usage("reconcile")
    assert "env var: LEMONSQUEEZY_ADAPTER" in usage("webhooks", "retry")
    assert "LEDGER_URL" in usage("audit")


# ------------------------------------------------------------ schema


@pytest.mark.parametrize("given", [["--schema", "foo"], ["--schema", "public"], ["--user-foreign-keys"]])
def test_schema_refuses_postgres_options_for_sqlite(given: list[str]) -> None:
    result = CliRunner().invoke(cli, ["schema", "--dialect", "sqlite", *given])
    assert result.exit_code == 2 and "PostgreSQL only" in result.output and "CREATE TABLE" not in result.output


def test_schema_prints_each_dialect() -> None:
    sqlite = CliRunner().invoke(cli, ["schema", "--dialect", "sqlite"])
    assert sqlite.exit_code == 0 and "CREATE TABLE IF NOT EXISTS credit_transactions" in sqlite.output
    named = CliRunner().invoke(cli, ["schema", "--schema", "foo"])
    assert named.exit_code == 0 and '"foo".credit_transactions' in named.output
    default = CliRunner().invoke(cli, ["schema"])
    assert default.exit_code == 0 and '"public".credit_transactions' in default.output
