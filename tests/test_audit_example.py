"""examples/auditor.py runs as written: two visits pass, a tampered history fails."""

from __future__ import annotations

import runpy
from datetime import timedelta
from pathlib import Path
from uuid import uuid4

import pytest

from ledger import Auditor, ConfigurationError, Ledger, ManualClock
from tests.conftest import START
from tests.test_audit_tamper import raw_events

ROOT = Path(__file__).resolve().parent.parent


def test_the_auditor_example(tmp_path: Path, capsys: object) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    user = uuid4()
    clock = ManualClock(START)
    with Ledger(url, clock=clock) as ledger:
        ledger.grant(user, 100, "purchase", key=f"{user}:g")
        clock.advance(timedelta(days=2))
        ledger.spend(user, 30, key=f"{user}:s")
        ledger.views.catch_up()
    main = runpy.run_path(str(ROOT / "examples" / "auditor.py"))["main"]
    digests, statements = tmp_path / "digests.txt", tmp_path / "statements"
    args = [
        "--url",
        url,
        "--digests",
        str(digests),
        "--statements",
        str(statements),
        "--start",
        "2026-01-01",
        "--end",
        "2026-02-01",
        str(user),
    ]
    assert main(args) == 0  # first visit: nothing to verify yet
    assert main(args) == 0  # second visit: verifies the first head
    assert len(digests.read_text().splitlines()) == 2
    assert "entry," in (statements / f"{user}.csv").read_text()
    with raw_events(url) as raw:
        raw.alter(raw.position_of("CreditAccount.Debited"), b'"amount":30', b'"amount":3')
    assert main(args) == 1


def test_a_mistyped_url_is_refused_and_keeps_no_head(tmp_path: Path) -> None:
    """An empty store created on the spot audited as PASSED and appended the
    head 0:000… to the digests, which the next visit then verified."""
    typo = tmp_path / "typo.sqlite3"
    with pytest.raises(ConfigurationError, match="does not exist"):
        Auditor(f"sqlite:///{typo}")
    main = runpy.run_path(str(ROOT / "examples" / "auditor.py"))["main"]
    digests = tmp_path / "digests.txt"
    args = ["--url", f"sqlite:///{typo}", "--digests", str(digests), "--start", "2026-01-01", "--end", "2026-02-01"]
    assert main(args) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []
