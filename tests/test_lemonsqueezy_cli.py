"""``python -m ledger webhooks send|retry|list``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from adapters.lemonsqueezy import LemonSqueezy, RefundPolicy
from ledger import DEFAULT_CATALOG, Ledger
from ledger.cli.main import cli
from ledger.storage.eventstore import LedgerApplication
from tests.lemonsqueezy_support import (
    FIXTURES,
    R1,
    SECRET,
    START,
    USER,
    Builder,
    StoryClock,
    adapter_for,
    headers_for,
    open_ledger,
)


def ledger_cli(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "ledger", *args], capture_output=True, text=True, timeout=120, check=False, env=env
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


class Endpoint:
    """A local HTTP endpoint that hands every POST to an adapter, as a host would."""

    def __init__(self, adapter: LemonSqueezy | None) -> None:
        self.received: list[tuple[bytes, dict[str, str]]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = dict(self.headers.items())
                endpoint.received.append((body, headers))
                if adapter is None:
                    status, answer = 503, {"status": "error"}
                else:
                    result = adapter.ingest(body, headers)
                    status, answer = result.http_status, {"status": result.status, "reason": result.reason}
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhooks/lemonsqueezy"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Endpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"


def test_send_signs_the_files_exact_bytes_and_posts_them(sqlite_url: str) -> None:
    file = FIXTURES / "order_created.json"
    with open_ledger(sqlite_url, StoryClock(START)) as ledger, Endpoint(adapter_for(ledger)) as endpoint:
        out = ledger_cli("webhooks", "send", str(file), "--secret", SECRET, "--url", endpoint.url).stdout
        again = ledger_cli("webhooks", "send", str(file), "--secret", SECRET, "--url", endpoint.url).stdout
        wrong = ledger_cli(
            "webhooks", "send", str(file), "--secret", "not-the-secret", "--url", endpoint.url, check=False
        )
    assert out.startswith("HTTP 200 ") and '"status": "stored"' in out
    assert '"status": "duplicate"' in again
    assert wrong.returncode == 1 and "HTTP 401" in wrong.stdout
    body, headers = endpoint.received[0]
    assert body == file.read_bytes()  # as is: \\/ escapes and all
    assert headers["X-Signature"] == headers_for(body)["X-Signature"]
    assert headers["X-Event-Name"] == "order_created"
    assert headers["Content-Type"] == "application/json"


def test_send_reports_an_endpoint_that_is_down_or_unreachable() -> None:
    file = FIXTURES / "order_created.json"
    with Endpoint(None) as endpoint:
        down = ledger_cli("webhooks", "send", str(file), "--secret", SECRET, "--url", endpoint.url, check=False)
    assert down.returncode == 1 and down.stdout.startswith("HTTP 503")
    gone = ledger_cli("webhooks", "send", str(file), "--secret", SECRET, "--url", "http://127.0.0.1:9/", check=False)
    assert gone.returncode == 1 and "could not POST" in gone.stderr


def test_retry_reprocesses_failed_deliveries_and_list_shows_them(sqlite_url: str) -> None:
    """A snapshot of a variant the catalog did not list yet fails; once the
    plan lists it, ``webhooks retry`` applies it, and its held invoice."""
    b = Builder()
    with open_ledger(sqlite_url, StoryClock(START)) as ledger:
        adapter = adapter_for(ledger)
        created = b.subscription_event("subscription_created", updated=START, variant="4242", renews_at=R1)
        invoice = b.invoice_event(
            "subscription_payment_success",
            "550001",
            reason="initial",
            status="paid",
            created=START,
            updated=START,
            total=0,
        )
        assert adapter.ingest(created, headers_for(created)).processing == "failed"
        assert adapter.ingest(invoice, headers_for(invoice)).processing == "held"
        ledger.define_plan(replace(DEFAULT_CATALOG[3], lemon_squeezy_variant_id_monthly="4242"))
    listed = ledger_cli("webhooks", "list", "--url", sqlite_url, "--status", "failed").stdout
    assert "UnknownVariant: variant 4242" in listed and "held: subscription 880001" in listed
    assert listed.strip().endswith("failed 2")
    out = ledger_cli("webhooks", "retry", "--url", sqlite_url, "--secret", SECRET, "--credit-pack", "9001=1000").stdout
    assert "retried 2: processed 2, failed 0, held 0, ignored 0" in out
    with open_ledger(sqlite_url, StoryClock(START)) as ledger:
        assert ledger.subscription_of(USER).plan == "enterprise"  # type: ignore[union-attr]
    assert ledger_cli("webhooks", "list", "--url", sqlite_url).stdout.strip().endswith("processed 2")


def test_retry_rejects_a_bad_credit_pack_option(sqlite_url: str) -> None:
    result = ledger_cli("webhooks", "retry", "--url", sqlite_url, "--credit-pack", "pack", check=False)
    assert result.returncode == 2 and "VARIANT=CREDITS" in result.stderr


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("LEMONSQUEEZY_SIGNING_SECRET", "LEMONSQUEEZY_API_KEY", "LEMONSQUEEZY_CREDIT_PACKS"):
        monkeypatch.delenv(name, raising=False)
    yield


def test_commands_need_their_secrets(no_env: None) -> None:
    send = ledger_cli("webhooks", "send", str(FIXTURES / "order_created.json"), "--url", "http://x", check=False)
    assert send.returncode == 2 and "--secret" in send.stderr
    reconcile = ledger_cli("reconcile", check=False)
    assert reconcile.returncode == 2 and "--api-key" in reconcile.stderr


def test_retry_needs_the_signing_secret(sqlite_url: str, no_env: None) -> None:
    """Retries apply a stored delivery only once its seal checks."""
    Ledger(sqlite_url).close()
    retry = ledger_cli("webhooks", "retry", "--url", sqlite_url, check=False)
    assert retry.returncode == 2 and "signing secret" in retry.stderr and "--secret" in retry.stderr


HOST_MODULE = """
from adapters.lemonsqueezy import LemonSqueezy, RefundPolicy
from ledger import CreditPolicy, Ledger


def adapter(url):
    ledger = Ledger(url, credit_policy=CreditPolicy(auto_renew=False))
    return LemonSqueezy(
        ledger,
        signing_secret="whsec_pingvas_test_4f2a9c",  # the endpoint's: retries check seals with it
        credit_packs={"9001": 1000},
        refund_policy=RefundPolicy(claw_back=False),
    )


def not_an_adapter(url):
    return Ledger(url, credit_policy=CreditPolicy(auto_renew=False))
"""


@pytest.fixture
def host_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A host's module, ``pingvas_host_config``, that builds its adapter."""
    folder = tmp_path / "host"
    folder.mkdir()
    (folder / "pingvas_host_config.py").write_text(HOST_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    return folder


def failed_refund(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host that keeps credits on refunds (``claw_back=False``) bought a
    pack; the refund's delivery failed (the database went away)."""
    at = datetime.now(UTC) - timedelta(days=2)  # the command runs on the real clock
    b = Builder()
    with open_ledger(url, StoryClock(at)) as ledger:
        adapter = adapter_for(ledger, refund_policy=RefundPolicy(claw_back=False))
        order = b.order_event("order_created", "660002", variant="9001", total=1000, at=at)
        assert adapter.ingest(order, headers_for(order)).processing == "processed"

        def down(self: LedgerApplication, objs: Any) -> Any:
            raise ConnectionError("injected: the database connection was lost")

        monkeypatch.setattr(LedgerApplication, "save_all", down)
        refund = b.order_event(
            "order_refunded",
            "660002",
            variant="9001",
            total=1000,
            at=at,
            status="refunded",
            refunded_amount=1000,
            refunded=True,
            updated=at + timedelta(days=1),
        )
        assert adapter.ingest(refund, headers_for(refund)).processing == "failed"
        monkeypatch.undo()


@pytest.mark.parametrize(
    ("options", "balance"),
    [
        (["--adapter", "pingvas_host_config:adapter"], 1000),
        (["--secret", SECRET, "--credit-pack", "9001=1000", "--no-claw-back"], 1000),
        (["--secret", SECRET, "--credit-pack", "9001=1000"], 0),  # the options' defaults: not this host's configuration
    ],
    ids=["factory", "options", "defaults"],
)
def test_retry_runs_the_hosts_configuration(
    sqlite_url: str, host_module: Path, monkeypatch: pytest.MonkeyPatch, no_env: None, options: list[str], balance: int
) -> None:
    failed_refund(sqlite_url, monkeypatch)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), str(host_module)])}
    out = ledger_cli("webhooks", "retry", "--url", sqlite_url, *options, env=env).stdout
    assert "retried 1: processed 1, failed 0" in out
    with Ledger(sqlite_url) as ledger:
        assert ledger.balance(USER).balance_credits == balance


def test_the_factory_excludes_the_single_settings_and_must_give_an_adapter(
    sqlite_url: str, host_module: Path, no_env: None
) -> None:
    runner = CliRunner()
    Ledger(sqlite_url).close()  # retry refuses a store that does not exist

    def run(*args: str) -> Any:
        return runner.invoke(cli, ["webhooks", "retry", "--url", sqlite_url, *args])

    both = run("--adapter", "pingvas_host_config:adapter", "--credit-pack", "9001=1000", "--no-claw-back")
    assert both.exit_code == 2
    assert "--adapter gives the whole configuration; drop --credit-pack, --claw-back/--no-claw-back" in both.output
    assert run("--adapter", "pingvas_host_config").exit_code == 2
    assert "expected MODULE:FACTORY" in run("--adapter", "pingvas_host_config").output
    missing = run("--adapter", "pingvas_no_such_module:adapter")
    assert missing.exit_code == 2 and "cannot import pingvas_no_such_module" in missing.output
    assert "has no callable nothing" in run("--adapter", "pingvas_host_config:nothing").output
    wrong = run("--adapter", "pingvas_host_config:not_an_adapter")
    assert wrong.exit_code == 1 and "returned a Ledger, not a LemonSqueezy or Processor" in wrong.output
    rec = runner.invoke(
        cli, ["reconcile", "--url", sqlite_url, "--api-key", "k", "--adapter", "m:f", "--upgrade", "none"]
    )
    assert rec.exit_code == 2 and "drop --upgrade" in rec.output
