"""The examples run as written."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_backend_service_example(ledger_url: str) -> None:
    module = runpy.run_path(str(ROOT / "examples" / "backend_service.py"))
    module["main"](ledger_url)


def test_demo_tells_the_whole_story(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ledger", "demo", "--url", f"sqlite:///{tmp_path / 'demo.sqlite3'}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    for expected in (
        "grants 5000",
        "reserve 300",
        "settle 240",
        "replayed=True",
        "release the hold",
        "ReservationClosed",
        "InsufficientCredits",
        "hold sweep",
        "expired",
        "balance   1200",
        "7-day Starter trial",
        "upgrades to Pro",
        "credits  +10000",
        "renews",
        "back to free",
        "price book revision 1",
        "resolution x1.5 (+2.5)",  # a multiply line: its factor, then the credits it adds
        "insufficient_credits",
        "credit limit of 500",
        "outbox: balance.low",
    ):
        assert expected in out, expected


@pytest.mark.parametrize("args", [["demo", "--help"], ["--help"]])
def test_cli_help(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "ledger", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Usage" in result.stdout


def test_fastapi_service_example(ledger_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = runpy.run_path(str(ROOT / "examples" / "fastapi_service.py"))
    module["main"](ledger_url)
    out = capsys.readouterr().out
    assert "webhook 200 processed" in out
    assert out.count("refused 402 insufficient_credits") == 2 and "reserved 10" in out
    assert "'balance_credits': 400, 'held_credits': 0, 'available_credits': 400" in out
    assert "closed True" in out


def test_demo_prices_checks_limits_and_notifies(ledger_url: str) -> None:
    """The demo's third story on every backend: a quoted job held and settled,
    a check refused for lack of credits, a credit limit, and one low-balance
    and one depletion notification read from the outbox."""
    from ledger.cli.demo import run_demo

    lines: list[str] = []
    run_demo(ledger_url, echo=lines.append)
    out = "\n".join(lines)
    assert "15 credits (price book revision 1)" in out
    assert "reserve_for_job, a 20% margin: holds 18" in out
    assert "check(credits=500): allowed=False, insufficient_credits" in out
    assert "check(credits=500): allowed=True" in out
    assert "balance   -500  held     0  available      0" in out
    notified = [line.strip() for line in lines if line.strip().startswith("outbox:")]
    assert notified == [
        "outbox: balance.low (threshold 20), available 15",
        "outbox: balance.depleted (threshold 0), available 0",
    ]
