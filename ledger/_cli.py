"""``python -m ledger``: the command line."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click

from ._errors import LedgerError

URL_HELP = "Ledger URL (default: $LEDGER_URL, else sqlite:///pingvas-ledger.sqlite3)."


def _url(url: str | None) -> str:
    from ._ledger import DEFAULT_URL

    return url or os.environ.get("LEDGER_URL") or DEFAULT_URL


@click.group()
def cli() -> None:
    """pingvas-ledger: an event-sourced credit ledger."""


@cli.command()
@click.option("--url", default=None, help="Ledger URL (default: a new SQLite file in a temporary folder).")
def demo(url: str | None) -> None:
    """Tell the story of one account: grants, holds, settle, release, expiry."""
    from ._demo import run_demo

    if url is None:
        folder = Path(tempfile.mkdtemp(prefix="pingvas-ledger-demo-"))
        url = f"sqlite:///{folder / 'ledger.sqlite3'}"
    run_demo(url, echo=click.echo)


@cli.command()
@click.option("--schema", "schema_name", default="public", show_default=True, help="PostgreSQL schema.")
@click.option("--dialect", type=click.Choice(["postgresql", "sqlite"]), default="postgresql", show_default=True)
@click.option("--user-foreign-keys", is_flag=True, help="Reference the host's users(id) from user_id columns.")
def schema(schema_name: str, dialect: str, user_foreign_keys: bool) -> None:
    """Print the DDL of the tables the library owns (for a host's migration)."""
    from ._schema import postgres_ddl, sqlite_ddl

    click.echo(
        postgres_ddl(schema_name, user_foreign_keys=user_foreign_keys) if dialect == "postgresql" else sqlite_ddl()
    )


@cli.command()
@click.option("--url", default=None, help=URL_HELP)
@click.option("--user-foreign-keys", is_flag=True, help="Reference the host's users(id) from user_id columns.")
def migrate(url: str | None, user_foreign_keys: bool) -> None:
    """Create the library's tables if missing, and record the schema version."""
    from ._ledger import Ledger

    with Ledger(_url(url)) as ledger:
        version = ledger.views.store.migrate(user_foreign_keys=user_foreign_keys)
        click.echo(f"schema version {version} is in place")


@cli.command()
@click.option("--url", default=None, help=URL_HELP)
@click.option("--poll-s", default=1.0, show_default=True, help="Polling interval when no notification arrives.")
@click.option("--sync-user-credits", is_flag=True, help="Keep users.credits equal to the balance.")
@click.option("--sync-user-tier", is_flag=True, help="Keep users.tier and users.storage_quota on the entitled plan.")
@click.option("--lag-every-s", default=10.0, show_default=True, help="How often to log the lag.")
def project(url: str | None, poll_s: float, sync_user_credits: bool, sync_user_tier: bool, lag_every_s: float) -> None:
    """Keep the read models current until SIGTERM or SIGINT."""
    from ._ledger import Ledger

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("ledger.projector")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with Ledger(_url(url), sync_user_credits=sync_user_credits, sync_user_tier=sync_user_tier) as ledger:
        views = ledger.views
        wake = _listener(ledger, stop)
        last_log = [0.0]

        def on_lag(position: int, head: int) -> None:
            now = time.monotonic()
            if now - last_log[0] >= lag_every_s:
                log.info("position %d, head %d, lag %d events", position, head, head - position)
                last_log[0] = now

        log.info("projecting from position %d", views.position())
        views.projector.follow(stop, poll_s=poll_s, wake=wake, on_lag=on_lag)
        log.info("stopped at position %d", views.position())


def _listener(ledger: Any, stop: threading.Event) -> Any:
    """LISTEN on the event table's channel; None (polling) off PostgreSQL."""
    if ledger.config.backend != "postgresql":
        return None
    import psycopg

    channel = ledger.app.recorder.channel_name
    conn = psycopg.connect(ledger.config.conninfo(), autocommit=True)
    conn.execute(f'LISTEN "{channel}"')

    def wake(timeout_s: float) -> None:
        if stop.is_set():
            return
        for _ in conn.notifies(timeout=timeout_s, stop_after=1):
            break

    return wake


@cli.command()
@click.option("--url", default=None, help=URL_HELP)
@click.option(
    "--verify",
    is_flag=True,
    help="Bring the live views up to date, compare them with a rebuild, print every differing row; swap nothing.",
)
@click.option("--sync-user-credits", is_flag=True, help="As the projector runs: keep users.credits in step.")
@click.option("--sync-user-tier", is_flag=True, help="As the projector runs: keep users.tier and storage_quota.")
def rebuild(url: str | None, verify: bool, sync_user_credits: bool, sync_user_tier: bool) -> None:
    """Replay the event store into fresh view tables, then swap them in."""
    from ._ledger import Ledger
    from ._readmodels import drop_aside

    with Ledger(_url(url), sync_user_credits=sync_user_credits, sync_user_tier=sync_user_tier) as ledger:
        views = ledger.views
        head = views.projector.head()
        with click.progressbar(length=max(head, 1), label="replaying events", file=sys.stderr) as bar:
            seen = [0]

            def progress(p: Any) -> None:
                bar.update(p.position - seen[0])
                seen[0] = p.position

            until = None
            stuck = None
            if verify:
                stuck = _bring_up_to_date(views)  # then the rebuild stops at the same place
                until = views.position()
            aside = views.build_aside(progress, until=until)
        try:
            sums = views.checksums(aside)
            for table, (count, digest) in sums.items():
                click.echo(f"{table:<24} {count:>10} rows  sha256 {digest}")
            if verify:
                found = views.verify(aside)
                for table, rows in found.items():
                    for sign, row in rows:
                        click.echo(f"{sign} {table} {json.dumps(row, default=str)}")
                total = sum(len(r) for r in found.values())
                click.echo("live tables equal the rebuild" if total == 0 else f"{total} differing rows")
                if stuck is not None:
                    click.echo(f"the live views cannot move past position {until}: {stuck}")
                if total or stuck is not None:
                    sys.exit(1)
            else:
                views.swap_in(aside)
                click.echo(f"rebuilt views swapped in at position {aside.position()}")
        finally:
            drop_aside(ledger.config, aside)


def _bring_up_to_date(views: Any) -> str | None:
    """Catches the live views up; None, or why they cannot be. Views that
    cannot catch up (rows already past their position, an event they cannot
    write) are compared as they are: the differing rows say what is wrong."""
    from eventsourcing.persistence import PersistenceError

    try:
        views.catch_up()
    except (PersistenceError, LedgerError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@cli.command()
@click.option("--url", default=None, help=URL_HELP)
@click.option("--now", "now_iso", default=None, help="Act as of this ISO-8601 UTC time (default: now).")
@click.option("--no-auto-renew", is_flag=True, help="Leave renewals to the payment provider's webhooks.")
def tick(url: str | None, now_iso: str | None, no_auto_renew: bool) -> None:
    """Perform what falls due: trial ends, renewals, expiries, stale holds, lapsed credits."""
    from datetime import UTC, datetime

    from ._ledger import Ledger
    from ._subscriptions import CreditPolicy

    now = datetime.fromisoformat(now_iso).astimezone(UTC) if now_iso else None
    with Ledger(_url(url), credit_policy=CreditPolicy(auto_renew=not no_auto_renew)) as ledger:
        done = ledger.tick(now)
        click.echo(
            f"subscription changes: {done['subscriptions']}; hold releases and expirations: {done['holds_and_lapses']}"
        )


def main() -> None:
    try:
        cli(standalone_mode=True)
    except LedgerError as exc:
        click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(2)


from adapters.lemonsqueezy import _cli as _lemonsqueezy_cli  # noqa: E402,F401

from . import _cli_audit  # noqa: E402,F401
