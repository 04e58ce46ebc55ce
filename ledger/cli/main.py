"""``python -m ledger``: the command line."""

from __future__ import annotations

import json
import logging
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click

from ledger.cli import audit as audit_commands
from ledger.cli.common import URL_HELP, LedgerGroup, _url
from ledger.errors import InvalidArgument, LedgerError, TimeInFuture

#: The environment variables the core's commands read, for ``--help``. A
#: provider's commands name theirs in their own help (``webhooks --help``).
ENVIRONMENT = (
    (
        "LEDGER_URL",
        "the ledger URL: --url, or --ledger-url where --url is an endpoint (default sqlite:///pingvas-ledger.sqlite3)",
    ),
    ("LEDGER_NOTIFY_URL", "notify: the host's endpoint (--url)"),
    ("LEDGER_NOTIFY_SECRET", "notify: the signing secret (--secret)"),
)


def _epilog() -> str:
    width = max(len(name) for name, _ in ENVIRONMENT)
    # \b: click keeps the lines of this paragraph as they are.
    lines = [f"  {n:<{width}}  {what}" for n, what in ENVIRONMENT]
    return "\b\nEnvironment variables:\n" + "\n".join(lines) + "\n\nProvider commands list theirs in their own --help."


def _version() -> str:
    from ledger import __version__

    return __version__


@click.group(cls=LedgerGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_epilog())
@click.version_option(_version(), "--version", "-V", prog_name="pingvas-ledger", message="%(prog)s %(version)s")
def cli() -> None:
    """pingvas-ledger: an event-sourced credit ledger."""


@cli.command()
@click.option("--url", default=None, help="Ledger URL (default: a new SQLite file in a temporary folder).")
def demo(url: str | None) -> None:
    """Tell the story of one account: grants, holds, settle, release, expiry."""
    from ledger.cli.demo import run_demo

    if url is None:
        folder = Path(tempfile.mkdtemp(prefix="pingvas-ledger-demo-"))
        url = f"sqlite:///{folder / 'ledger.sqlite3'}"
        run_demo(url, echo=click.echo)
        # Kept for the other commands to look at, so said: each run leaves a
        # folder of its own behind.
        click.echo(
            f"\nThe demo's store is kept in {folder} (try: python -m ledger audit --url {url}); delete it when done."
        )
    else:
        run_demo(url, echo=click.echo)


@cli.command()
@click.option("--schema", "schema_name", default=None, help="PostgreSQL schema (default public; PostgreSQL only).")
@click.option("--dialect", type=click.Choice(["postgresql", "sqlite"]), default="postgresql", show_default=True)
@click.option(
    "--user-foreign-keys", is_flag=True, help="Reference the host's users(id) from user_id columns (PostgreSQL only)."
)
def schema(schema_name: str | None, dialect: str, user_foreign_keys: bool) -> None:
    """Print the DDL of the tables the library owns (for a host's migration)."""
    from ledger.storage.factory import backend_class
    from ledger.views.registry import schema_tables

    if dialect == "sqlite":
        # Options the SQLite DDL has no use for are refused, not ignored.
        given = [
            name for name, value in (("--schema", schema_name), ("--user-foreign-keys", user_foreign_keys)) if value
        ]
        if given:
            raise click.UsageError(
                f"{' and '.join(given)}: PostgreSQL only; the SQLite DDL has no schemas or host tables"
            )
    ddl = backend_class(dialect).ddl(schema_tables(), schema_name or "public", user_foreign_keys=user_foreign_keys)
    click.echo(ddl)


@cli.command()
@click.option("--url", default=None, help=URL_HELP)
@click.option("--user-foreign-keys", is_flag=True, help="Reference the host's users(id) from user_id columns.")
def migrate(url: str | None, user_foreign_keys: bool) -> None:
    """Create the library's tables if missing, and record the schema version."""
    from ledger.application.facade import Ledger

    with Ledger(_url(url)) as ledger:
        version = ledger.views.migrate(user_foreign_keys=user_foreign_keys)
        click.echo(f"schema version {version} is in place")


@cli.command()
@click.option("--url", default=None, help=URL_HELP)
@click.option("--poll-s", default=1.0, show_default=True, help="Polling interval when no notification arrives.")
@click.option("--sync-user-credits", is_flag=True, help="Keep users.credits equal to the balance.")
@click.option("--sync-user-tier", is_flag=True, help="Keep users.tier and users.storage_quota on the entitled plan.")
@click.option("--lag-every-s", default=10.0, show_default=True, help="How often to log the lag.")
def project(url: str | None, poll_s: float, sync_user_credits: bool, sync_user_tier: bool, lag_every_s: float) -> None:
    """Keep the read models current until SIGTERM or SIGINT."""
    from ledger.application.facade import Ledger

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("ledger.projector")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with Ledger(_url(url), sync_user_credits=sync_user_credits, sync_user_tier=sync_user_tier) as ledger:
        views = ledger.views
        wake = ledger.backend.commit_waiter(ledger.app, stop)
        last_log = [0.0]

        def on_lag(position: int, head: int) -> None:
            now = time.monotonic()
            if now - last_log[0] >= lag_every_s:
                log.info("position %d, head %d, lag %d events", position, head, head - position)
                last_log[0] = now

        log.info("projecting from position %d", views.position())
        views.projector.follow(stop, poll_s=poll_s, wake=wake, on_lag=on_lag)
        log.info("stopped at position %d", views.position())


@cli.command()
@click.option("--url", default=None, help=URL_HELP)
@click.option(
    "--verify",
    is_flag=True,
    help="Bring the live views up to date, compare them with a rebuild, print every differing row; swap nothing.",
)
@click.option("--sync-user-credits", is_flag=True, help="As the projector runs: keep users.credits in step.")
@click.option("--sync-user-tier", is_flag=True, help="As the projector runs: keep users.tier and storage_quota.")
@audit_commands.failure_is_an_error
def rebuild(url: str | None, verify: bool, sync_user_credits: bool, sync_user_tier: bool) -> None:
    """Replay the event store into fresh view tables, then swap them in."""
    from ledger.application.facade import Ledger

    with Ledger(_url(url), sync_user_credits=sync_user_credits, sync_user_tier=sync_user_tier, create=False) as ledger:
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
                # Live views past the log's head claim events the store no longer
                # has (a tail deleted, or the tracking row moved on): their rows
                # may equal the rebuild's, but the projector skips every event
                # recorded up to that position.
                past = until is not None and aside.position() < until
                if past:
                    click.echo(
                        f"the live views are at position {until}, past the log's head {aside.position()}: "
                        "the projector skips the events recorded up to it"
                    )
                if total or stuck is not None or past:
                    sys.exit(1)
            else:
                views.swap_in(aside)
                click.echo(f"rebuilt views swapped in at position {aside.position()}")
        finally:
            views.drop_aside(aside)


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
@click.option(
    "--now",
    "now_iso",
    default=None,
    metavar="ISO-8601",
    help="Act as of this time (no zone means UTC; default: now). At most a minute ahead of the clock.",
)
@click.option("--no-auto-renew", is_flag=True, help="Leave renewals to the payment provider's webhooks.")
def tick(url: str | None, now_iso: str | None, no_auto_renew: bool) -> None:
    """Perform what falls due: trial ends, renewals, expiries, stale holds, lapsed credits."""
    from ledger.application.facade import Ledger
    from ledger.cli.audit import parse_moment
    from ledger.domain.subscriptions import CreditPolicy

    try:
        # The auditor's rule for every time the CLI reads: no zone means UTC.
        now = parse_moment(now_iso) if now_iso is not None else None
    except InvalidArgument as exc:
        raise click.BadParameter(str(exc), param_hint="--now") from None
    # A scheduler's tick on a mistyped path must not create an empty store
    # and report that nothing was due.
    with Ledger(_url(url), credit_policy=CreditPolicy(auto_renew=not no_auto_renew), create=False) as ledger:
        try:
            done = ledger.tick(now)
        except TimeInFuture as exc:
            raise click.BadParameter(
                f"{exc.moment.isoformat()} is {exc.ahead} ahead of this machine's clock "
                f"({exc.clock_now.isoformat()}); tick acts as of now or an earlier time, never the future",
                param_hint="--now",
            ) from None
        click.echo(
            f"subscription changes: {done['subscriptions']}; hold releases and expirations: {done['holds_and_lapses']}"
        )


def main() -> None:
    try:
        cli(standalone_mode=True)
    except LedgerError as exc:
        click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(2)


for _command in audit_commands.COMMANDS:
    cli.add_command(_command)


def _add_notify() -> None:
    from ledger.cli.notify import notify

    cli.add_command(notify)


_add_notify()
