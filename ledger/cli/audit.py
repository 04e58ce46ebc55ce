"""The auditor's commands: ``audit``, ``balance``, ``statement``, ``digest``
and ``verify``, registered on ``python -m ledger``.

Exit status: 0 when everything checks out, 1 when the audit has findings or
the history changed, 2 on errors (bad arguments, unreachable store).
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

import click

from ledger.audit.pointintime import Statement, StatementEntry, StatementHoldEvent
from ledger.cli.common import URL_HELP, _url
from ledger.errors import InvalidArgument, LedgerError


def parse_moment(text: str) -> datetime:
    """ISO 8601 (``2026-03-01``, ``2026-03-01T12:00:00Z``, with an offset); no zone means UTC."""
    try:
        moment = datetime.fromisoformat(text)
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except ValueError:
        raise InvalidArgument(f"not an ISO 8601 date or time: {text!r}") from None
    except OverflowError:  # an offset that takes it past year 1 or 9999 in UTC
        raise InvalidArgument(f"{text!r} is outside the range of times in UTC") from None


if TYPE_CHECKING:
    _ParamType = click.ParamType[datetime]
else:  # click before 8.2 has no generic ParamType
    _ParamType = click.ParamType


class _Moment(_ParamType):
    name = "ISO-8601"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_moment(str(value))
        except InvalidArgument as exc:
            self.fail(str(exc), param, ctx)


MOMENT = _Moment()


def _writable(path: Path, option: str) -> None:
    """Refuses a file the command could not write before the work, not after
    it (an audit's checkpoint is first written after a page of events)."""
    existed = path.exists()
    try:
        with path.open("a"):
            pass
    except OSError as exc:
        raise click.BadParameter(f"cannot write {path}: {exc.strerror}", param_hint=option) from None
    if not existed:
        path.unlink()  # the probe leaves nothing behind


@contextmanager
def _progress(label: str, show: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr, fed with (position, head)."""
    if not show:
        yield None
        return
    with click.progressbar(length=1, label=label, file=sys.stderr) as bar:
        seen = [0]

        def update(position: int, head: int) -> None:
            bar.length = max(head, 1)
            bar.update(position - seen[0])
            seen[0] = position

        yield update


Body = TypeVar("Body", bound=Callable[..., None])


def failure_is_an_error(body: Body) -> Body:
    """A command that fails on the way exits 2, as an error. Left to Python
    it exits 1, which these commands use for "findings" or "the history
    changed": a lost connection, or a store edited into a shape the command
    cannot read, must not read as a verdict."""

    @functools.wraps(body)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            body(*args, **kwargs)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, LedgerError):
            raise  # already reported with their own status
        except Exception:
            traceback.print_exc()
            click.echo(f"error: {body.__name__} failed before reaching a result", err=True)
            sys.exit(2)

    return run  # type: ignore[return-value]


@click.command()
@click.option("--url", default=None, help=URL_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--from-position", type=int, default=0, show_default=True, help="Resume after this position.")
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File to save progress to; with --from-position, the file to resume from.",
)
@click.option("--checkpoint-every", type=int, default=100_000, show_default=True, help="Events between checkpoints.")
@click.option("--no-views", is_flag=True, help="Check the events only; leave the read models alone.")
@click.option("--max-findings", type=int, default=1_000, show_default=True, help="Findings listed (all are counted).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@failure_is_an_error
def audit(
    url: str | None,
    as_json: bool,
    from_position: int,
    checkpoint: Path | None,
    checkpoint_every: int,
    no_views: bool,
    max_findings: int,
    quiet: bool,
) -> None:
    """Replay the whole event store and check the ledger and its read models."""
    from ledger.application.facade import Ledger
    from ledger.audit.runner import audit as run_audit

    if from_position and checkpoint is None:
        raise click.UsageError("--from-position needs the --checkpoint file a previous run wrote at that position")
    if checkpoint is not None:
        _writable(checkpoint, "--checkpoint")
    with Ledger(_url(url), create=False) as ledger, _progress("replaying events", not quiet) as progress:
        report = run_audit(
            ledger,
            from_position=from_position,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            compare_views=not no_views,
            max_findings=max_findings,
            progress=progress,
        )
    click.echo(report.to_json() if as_json else report.render())
    sys.exit(0 if report.ok else 1)


@click.command()
@click.option("--url", default=None, help=URL_HELP)
@click.option("--user", "user_id", type=click.UUID, required=True, help="The user's id.")
@click.option("--as-of", type=MOMENT, required=True, help="The instant (ISO 8601; no zone means UTC).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def balance(url: str | None, user_id: UUID, as_of: datetime, as_json: bool) -> None:
    """A user's balance as recorded at an instant."""
    from ledger.application.facade import Ledger
    from ledger.audit.pointintime import balance_at

    with Ledger(_url(url), create=False) as ledger:
        result = balance_at(ledger, user_id, as_of)
    if as_json:
        click.echo(result.model_dump_json(indent=2))
        return
    click.echo(
        f"user {user_id} as of {result.as_of.isoformat()}: balance {result.balance_credits}, "
        f"held {result.held_credits}, available {result.available_credits}"
        + (f", credit limit {result.credit_limit_credits}" if result.credit_limit_credits else "")
    )
    for block in result.blocks:
        expires = block.expires_at.isoformat() if block.expires_at else "never"
        click.echo(
            f"  block {block.block_id} {block.kind.value}: {block.remaining_credits} of "
            f"{block.granted_credits} left, expires {expires}"
        )


@click.command()
@click.option("--url", default=None, help=URL_HELP)
@click.option("--user", "user_id", type=click.UUID, required=True, help="The user's id.")
@click.option("--start", type=MOMENT, required=True, help="The period starts after this instant.")
@click.option("--end", type=MOMENT, required=True, help="The period ends at this instant (included).")
@click.option("--format", "fmt", type=click.Choice(["text", "csv", "json"]), default="text", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="File (default stdout).")
def statement(url: str | None, user_id: UUID, start: datetime, end: datetime, fmt: str, output: Path | None) -> None:
    """A user's statement for the period (START, END]."""
    from ledger.application.facade import Ledger
    from ledger.audit.pointintime import statement as make_statement

    if output is not None:
        _writable(output, "--output")
    with Ledger(_url(url), create=False) as ledger:
        result = make_statement(ledger, user_id, start, end)
    text = result.to_csv() if fmt == "csv" else result.to_json() if fmt == "json" else _statement_text(result)
    if output is None:
        click.echo(text, nl=not text.endswith("\n"))
    else:
        output.write_text(text)


def _entry_line(e: StatementEntry) -> str:
    return (
        f"{e.recorded_at.isoformat()}  v{e.version:<5} {e.type:<20} {e.amount_credits:>+10}  "
        f"balance {e.balance_after:>10}  {e.description or ''}"
    ).rstrip()


def _hold_line(h: StatementHoldEvent) -> str:
    return (
        f"{h.recorded_at.isoformat()}  v{h.version:<5} hold {h.event:<15} {h.amount_credits:>10}  "
        f"held    {h.held_after:>10}  {h.reservation_id}"
    )


def _statement_text(s: Statement) -> str:
    lines = [
        f"statement of user {s.user_id} for ({s.start.isoformat()}, {s.end.isoformat()}]",
        f"opening balance {s.opening_balance_credits} (held {s.opening_held_credits})",
    ]
    lines.extend(
        f"  hold open at start {h.reservation_id}: {h.amount_credits} credits, expires {h.expires_at.isoformat()}"
        for h in s.opening_holds
    )
    rows = [(e.version, _entry_line(e)) for e in s.entries]
    rows.extend((h.version, _hold_line(h)) for h in s.hold_events)
    lines.extend(text for _, text in sorted(rows))
    lines.append(f"closing balance {s.closing_balance_credits} (held {s.closing_held_credits})")
    lines.append(f"credits in {s.credits_in}, out {s.credits_out}")
    lines.extend(
        f"  hold open at end {h.reservation_id}: {h.amount_credits} credits, expires {h.expires_at.isoformat()}"
        for h in s.closing_holds
    )
    return "\n".join(lines)


@click.command()
@click.option("--url", default=None, help=URL_HELP)
@click.option("--every", type=int, default=1_000, show_default=True, help="Events per anchor segment.")
@click.option("--incremental", is_flag=True, help="Trust the stored anchors; hash only the events after them.")
@click.option(
    "--expect",
    default=None,
    metavar="POSITION:HASH",
    help="The last head kept outside: anchor only a history that passes through it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@failure_is_an_error
def digest(url: str | None, every: int, incremental: bool, expect: str | None, as_json: bool, quiet: bool) -> None:
    """Print the head of the hash chain over the event log (POSITION:HASH); keep it outside the database."""
    from ledger.application.facade import Ledger
    from ledger.audit.digest import DigestHead
    from ledger.audit.digest import digest as run_digest

    expected = DigestHead.parse(expect) if expect is not None else None
    with Ledger(_url(url), create=False) as ledger, _progress("hashing events", not quiet) as progress:
        result = run_digest(ledger, every=every, incremental=incremental, expect=expected, progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif result.ok:
        click.echo(str(result.head))
        click.echo(f"{result.head.events} events; {result.segments_written} anchor segments written", err=True)
    else:
        since = f"the head {expected}" if expected is not None else "the last digest"
        click.echo(f"NOT anchored: the history changed since {since} (head now {result.head})")
        for problem in result.problems:
            click.echo(f"  {problem}")
    sys.exit(0 if result.ok else 1)


@click.command()
@click.option("--url", default=None, help=URL_HELP)
@click.option("--digest", "head", required=True, help="The head kept outside the database: POSITION:HASH.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@failure_is_an_error
def verify(url: str | None, head: str, as_json: bool, quiet: bool) -> None:
    """Prove the history up to a digest is unchanged, or name what changed."""
    from ledger.application.facade import Ledger
    from ledger.audit.digest import DigestHead
    from ledger.audit.digest import verify as run_verify

    expected = DigestHead.parse(head)
    with Ledger(_url(url), create=False) as ledger, _progress("hashing events", not quiet) as progress:
        result = run_verify(ledger, expected, progress=progress)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else "\n".join(result.describe()))
    sys.exit(0 if result.ok else 1)


#: The auditor's commands, registered on ``python -m ledger``.
COMMANDS = (audit, balance, statement, digest, verify)
