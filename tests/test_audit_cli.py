"""``python -m ledger audit | digest | verify``: reports, exit status, resuming."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from uuid import uuid4

import pytest

from ledger import Ledger, ManualClock
from tests.conftest import START
from tests.test_audit import story
from tests.test_audit_tamper import raw_events


def ledger_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ledger", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    with Ledger(url, clock=ManualClock(START)) as ledger:
        story(ledger, ledger.clock)  # type: ignore[arg-type]
    return url


def test_audit_passes_and_fails_with_the_right_exit_status(durable_url: str) -> None:
    clean = ledger_cli("audit", "--url", durable_url)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "result: PASSED" in clean.stdout and "history digest:" in clean.stdout
    assert "replaying events" in clean.stderr and "replaying events" not in clean.stdout  # progress on stderr
    as_json = json.loads(ledger_cli("audit", "--url", durable_url, "--json", "--quiet").stdout)
    assert as_json["ok"] is True and as_json["findings"] == [] and as_json["head"] == as_json["views_position"]
    with Ledger(durable_url) as ledger, ledger.views.store.transaction() as tx:
        tx.execute("UPDATE credit_transactions SET balance_after = 999 WHERE amount = -20")
    failed = ledger_cli("audit", "--url", durable_url, "--quiet")
    assert failed.returncode == 1
    assert "[chain]" in failed.stdout and "999" in failed.stdout and "result: FAILED" in failed.stdout
    found = json.loads(ledger_cli("audit", "--url", durable_url, "--json", "--quiet").stdout)
    assert found["ok"] is False and found["finding_counts"]["chain"] == 1


def test_audit_resumes_from_a_checkpoint(durable_url: str, tmp_path: Path) -> None:
    checkpoint = tmp_path / "audit.json"
    whole = json.loads(
        ledger_cli("audit", "--url", durable_url, "--json", "--quiet", "--checkpoint", str(checkpoint)).stdout
    )
    saved = json.loads(checkpoint.read_text())
    assert saved["position"] == whole["head"]
    # Nothing new since: resuming at the head replays nothing and agrees.
    again = ledger_cli(
        "audit",
        "--url",
        durable_url,
        "--json",
        "--quiet",
        "--checkpoint",
        str(checkpoint),
        "--from-position",
        str(whole["head"]),
    )
    resumed = json.loads(again.stdout)
    assert resumed["ok"] and resumed["events"] == 0 and resumed["digest"] == whole["digest"]
    assert resumed["summary"]["credits"] == whole["summary"]["credits"]
    # New events are audited on top of the checkpoint.
    with Ledger(durable_url) as ledger:
        ledger.grant(uuid4(), 5, "bonus", key=f"{uuid4()}:later")
        ledger.views.catch_up()
    later = json.loads(
        ledger_cli(
            "audit",
            "--url",
            durable_url,
            "--json",
            "--quiet",
            "--checkpoint",
            str(checkpoint),
            "--from-position",
            str(whole["head"]),
        ).stdout
    )
    assert later["ok"] and later["events"] == 3 and later["summary"]["accounts"] == whole["summary"]["accounts"] + 1
    missing = ledger_cli("audit", "--url", durable_url, "--from-position", "3")
    assert missing.returncode == 2 and "--checkpoint" in missing.stderr


def test_digest_then_verify_names_a_tampered_event(durable_url: str) -> None:
    out = ledger_cli("digest", "--url", durable_url)
    assert out.returncode == 0, out.stderr
    head = out.stdout.strip()
    position, digest = head.split(":")
    assert int(position) > 0 and len(digest) == 64
    assert "anchor segments written" in out.stderr
    ok = ledger_cli("verify", "--url", durable_url, "--digest", head, "--quiet")
    assert ok.returncode == 0 and f"up to position {position} is unchanged" in ok.stdout
    with raw_events(durable_url) as raw:
        spend = raw.position_of("CreditAccount.Debited", 0)
        raw.alter(spend, b'"amount":20', b'"amount":2')
    bad = ledger_cli("verify", "--url", durable_url, "--digest", head, "--quiet")
    assert bad.returncode == 1
    assert "has CHANGED" in bad.stdout and f"position {spend}: altered" in bad.stdout
    as_json = json.loads(ledger_cli("verify", "--url", durable_url, "--digest", head, "--json", "--quiet").stdout)
    assert as_json["history_intact"] is False and as_json["problems"][0]["position"] == spend
    refused = ledger_cli("digest", "--url", durable_url, "--quiet")
    assert refused.returncode == 1 and "NOT anchored" in refused.stdout
    garbage = ledger_cli("verify", "--url", durable_url, "--digest", "12:abc")
    assert garbage.returncode == 2 and "POSITION:HASH" in garbage.stderr


def test_digest_expecting_the_last_head_refuses_a_re_anchored_history(durable_url: str) -> None:
    head = ledger_cli("digest", "--url", durable_url, "--quiet").stdout.strip()
    again = ledger_cli("digest", "--url", durable_url, "--quiet", "--expect", head)
    assert again.returncode == 0 and again.stdout.strip() == head, again.stderr
    with raw_events(durable_url) as raw:
        raw.alter(raw.position_of("CreditAccount.Debited", 0), b'"amount":20', b'"amount":2')
        raw.sql(f"DELETE FROM {raw.digests}")  # the anchors rewritten to match
    refused = ledger_cli("digest", "--url", durable_url, "--quiet", "--expect", head)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"NOT anchored: the history changed since the head {head}" in refused.stdout
    assert f"position {head.split(':')[0]}: head:" in refused.stdout
    both = ledger_cli("digest", "--url", durable_url, "--quiet", "--expect", head, "--incremental")
    assert both.returncode == 2 and "incremental" in both.stderr


def test_a_file_that_cannot_be_written_is_refused_before_the_replay(tmp_path: Path) -> None:
    """An unwritable --checkpoint failed with a traceback after a page of
    events was replayed, an unwritable --output after the statement was made."""
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    with Ledger(url, clock=ManualClock(START)) as ledger:
        story(ledger, ledger.clock)  # type: ignore[arg-type]
    missing = tmp_path / "no-such-folder"
    audited = ledger_cli("audit", "--url", url, "--checkpoint", str(missing / "audit.json"))
    stated = ledger_cli(
        "statement", "--url", url, "--user", str(uuid4()), "--start", "2026-01-01", "--end", "2026-02-01",
        "--output", str(missing / "statement.csv"),
    )  # fmt: skip
    for result, option in ((audited, "--checkpoint"), (stated, "--output")):
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"Invalid value for {option}: cannot write" in result.stderr and "Traceback" not in result.stderr
    assert "replaying" not in audited.stderr and not missing.exists()
    # A file that can be written is not left behind when the store is refused.
    output = tmp_path / "statement.csv"
    typo = ledger_cli(
        "statement", "--url", f"sqlite:///{tmp_path / 'typo.sqlite3'}", "--user", str(uuid4()),
        "--start", "2026-01-01", "--end", "2026-02-01", "--output", str(output),
    )  # fmt: skip
    assert typo.returncode == 2 and not output.exists()


def test_a_command_that_fails_on_the_way_exits_2_not_1(tmp_path: Path) -> None:
    """Exit 1 is a verdict (findings, a changed history, differing rows): an
    audit that died on a store it could not read exited 1 with a traceback. A
    tracking position written outside the ledger is named, not a traceback."""
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    with Ledger(url, clock=ManualClock(START)) as ledger:
        story(ledger, ledger.clock)  # type: ignore[arg-type]
        with ledger.views.store.transaction() as tx:
            tx.execute("UPDATE tracking SET notification_id = 'x' WHERE application_name = 'ledger'")
    for command in (("audit", "--quiet"), ("rebuild", "--verify"), ("project",)):
        result = ledger_cli(*command, "--url", url)
        assert result.returncode == 2, result.stdout + result.stderr
        # A position written outside the ledger is named as such, with its table and value.
        assert "error: ViewsCorrupt: the read models' tracking table tracking holds 'x'" in result.stderr
        assert "Traceback" not in result.stderr, result.stderr
