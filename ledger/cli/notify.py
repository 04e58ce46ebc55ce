"""``python -m ledger notify``: delivers the notification outbox to a host's
endpoint as signed HTTP POSTs (docs/notifications.md, docs/operations.md)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from uuid import UUID

import click

from ledger.cli.common import URL_HELP, _url

SECRET_ENV = "LEDGER_NOTIFY_SECRET"


@click.command()
@click.option(
    "--url",
    "target",
    default=None,
    envvar="LEDGER_NOTIFY_URL",
    show_envvar=True,
    help="The host's endpoint the notifications are POSTed to, e.g. https://app.example/hooks/ledger.",
)
@click.option("--ledger-url", default=None, help=URL_HELP)
@click.option(
    "--secret",
    envvar=SECRET_ENV,
    show_envvar=True,
    default=None,
    help="The signing secret (at least 16 bytes); prefer the environment variable.",
)
@click.option("--consumer", default="notify", show_default=True, help="The outbox consumer whose position is kept.")
@click.option("--type", "types", multiple=True, help="Only this notification type (repeatable; default all).")
@click.option(
    "--max-attempts",
    default=8,
    show_default=True,
    type=click.IntRange(1, 100),
    help="Tries per notification before it is dead-lettered.",
)
@click.option(
    "--backoff-s",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0, 3600),
    help="The wait after the first failed try; doubled after each next one.",
)
@click.option(
    "--backoff-max-s",
    default=60.0,
    show_default=True,
    type=click.FloatRange(0, 3600),
    help="The longest wait between tries.",
)
@click.option(
    "--timeout-s",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.1, 3600),
    help="How long one POST may take in all (one deadline, not a bound on each read).",
)
@click.option(
    "--poll-s",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0.01, 60),
    help="How often to look for new notifications when none arrive (PostgreSQL is woken by commits).",
)
@click.option("--once", is_flag=True, help="Deliver what is pending, then exit (a cron job).")
@click.option(
    "--standby",
    is_flag=True,
    help="While another notifier delivers this consumer, wait to take over (a hot standby) instead of exiting.",
)
@click.option("--list-dead", is_flag=True, help="List the consumer's dead letters as JSON lines, then exit.")
@click.option(
    "--redrive",
    "redrive_ids",
    multiple=True,
    metavar="ID",
    help="Deliver this dead letter again, then exit (repeatable; 'all' for every one).",
)
def notify(
    target: str | None,
    ledger_url: str | None,
    secret: str | None,
    consumer: str,
    types: tuple[str, ...],
    max_attempts: int,
    backoff_s: float,
    backoff_max_s: float,
    timeout_s: float,
    poll_s: float,
    once: bool,
    standby: bool,
    list_dead: bool,
    redrive_ids: tuple[str, ...],
) -> None:
    """Deliver balance notifications and business events to a host as signed POSTs, until SIGTERM or SIGINT."""
    from ledger.application.facade import Ledger
    from ledger.application.notify import Notifier, RetryPolicy
    from ledger.errors import ConsumerBusy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("ledger.notify")
    with Ledger(_url(ledger_url), create=False) as ledger:
        outbox = ledger.outbox(consumer, types=types or None)
        if list_dead:
            for letter in outbox.all_dead_letters():
                row = {k: str(v) if isinstance(v, UUID) else v for k, v in letter.__dict__.items()}
                click.echo(json.dumps(row, default=str, sort_keys=True))
            return
        if target is None:
            raise click.UsageError("--url (the endpoint) is required, or set LEDGER_NOTIFY_URL")
        if not secret:
            raise click.UsageError(f"--secret is required, or set {SECRET_ENV}")
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        policy = RetryPolicy(
            max_attempts=max_attempts, backoff_base_s=backoff_s, backoff_max_s=backoff_max_s, timeout_s=timeout_s
        )
        with Notifier(outbox, target, secret, policy=policy, stop=stop) as notifier:
            if standby:
                log.info("standing by for the lease of consumer %r", consumer)
            if not notifier.claim(wait=standby):
                return  # stopped while standing by
            if redrive_ids:
                ids = None if "all" in redrive_ids else [_id(i) for i in redrive_ids]
                report = notifier.redrive(ids)
                click.echo(f"redelivered {report.delivered}; still dead {report.dead}")
                sys.exit(1 if report.dead else 0)
            if once:
                total = 0
                dead = 0
                while not stop.is_set():
                    report = notifier.run_once(limit=500)
                    total += report.delivered
                    dead += report.dead
                    if not report.delivered and not report.dead:
                        break
                click.echo(f"delivered {total}; dead-lettered {dead}; position {outbox.position()}")
                return
            wake = ledger.backend.commit_waiter(ledger.app, stop)
            while True:
                log.info("delivering from position %d of consumer %r to %s", outbox.position(), consumer, target)
                try:
                    report = notifier.run(poll_s=poll_s, limit=500, wake=wake)
                    break
                except ConsumerBusy:
                    # The lease was lost (its connection ended) and another
                    # notifier took it meanwhile.
                    if not standby:
                        raise
                    log.warning("another notifier took consumer %r; standing by", consumer)
                    if not notifier.claim(wait=True):
                        return
            log.info(
                "stopped at position %d: delivered %d, dead-lettered %d",
                outbox.position(),
                report.delivered,
                report.dead,
            )


def _id(value: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a notification id", param_hint="--redrive") from None
