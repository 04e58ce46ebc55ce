"""``python -m ledger``: the command line."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from ._errors import LedgerError


@click.group()
def cli() -> None:
    """pingvas-ledger: an event-sourced credit ledger."""


@cli.command()
@click.option(
    "--url",
    default=None,
    help="Ledger URL (default: a new SQLite file in a temporary folder).",
)
def demo(url: str | None) -> None:
    """Tell the story of one account: grants, holds, settle, release, expiry."""
    from ._demo import run_demo

    if url is None:
        folder = Path(tempfile.mkdtemp(prefix="pingvas-ledger-demo-"))
        url = f"sqlite:///{folder / 'ledger.sqlite3'}"
    run_demo(url, echo=click.echo)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except LedgerError as exc:
        click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(2)
