"""What every command of ``python -m ledger`` shares: the ``--url`` option's
help and default, and the group that finds the commands payment providers
register.

A provider adds commands through the entry point group ``pingvas_ledger.cli``
(``name = "package.module:click_command"``). They are imported only when one
of them runs, so ``python -m ledger --help`` and the core's own commands never
import a provider, its HTTP client or its optional dependencies.
"""

from __future__ import annotations

import itertools
from functools import cached_property
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import click

#: The entry point group through which providers register commands.
ENTRY_POINT_GROUP = "pingvas_ledger.cli"

URL_HELP = "Ledger URL (default: $LEDGER_URL, else sqlite:///pingvas-ledger.sqlite3)."


def _url(url: str | None) -> str:
    from ledger.application.facade import resolve_url
    from ledger.errors import ConfigurationError
    from ledger.storage.config import parse_url

    resolved = resolve_url(url)
    # Every memory:// ledger is a store of its own: a command would open an
    # empty one, audit it as PASSED, find nothing due, and keep nothing.
    if parse_url(resolved).backend == "memory":
        raise ConfigurationError(
            "memory:// is a store of one ledger object only: this command would start from an empty ledger "
            "and keep nothing; give a sqlite:/// or postgresql:// URL (--url or LEDGER_URL)"
        )
    return resolved


class LedgerGroup(click.Group):
    """A command group whose built-in commands are added as usual and whose
    provider commands load from their entry points on first use."""

    @cached_property
    def _registered(self) -> dict[str, EntryPoint]:
        found: dict[str, EntryPoint] = {}
        for point in entry_points(group=ENTRY_POINT_GROUP):
            found.setdefault(point.name, point)  # the first installed wins
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx)) | set(self._registered)
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        point = self._registered.get(cmd_name)
        if point is None:
            return None
        try:
            loaded: Any = point.load()
        except ImportError as exc:
            raise click.ClickException(
                f"the {cmd_name!r} command comes from {point.value}, which cannot be imported: {exc}. "
                "Is the provider's package installed (and not shadowed by another distribution's package)?"
            ) from exc
        if not isinstance(loaded, click.Command):
            raise click.ClickException(f"entry point {point.value} is not a click command")
        self.add_command(loaded, cmd_name)
        return loaded

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Built-in commands show their own short help; a provider's command is
        # named with where it comes from, which needs no import.
        rows = []
        for name in self.list_commands(ctx):
            command = super().get_command(ctx, name)
            if command is not None:
                if not command.hidden:
                    rows.append((name, command.get_short_help_str(formatter.width)))
            else:
                rows.append((name, f"(provided by {_public_package(self._registered[name].value)}: see its --help)"))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _public_package(entry_point_value: str) -> str:
    """The package an entry point's command comes from, as its users import
    it: ``adapters.lemonsqueezy._cli:webhooks`` is ``adapters.lemonsqueezy``
    (its private modules are no one's business in a help screen)."""
    module = entry_point_value.partition(":")[0].strip()
    parts = module.split(".")
    public = list(itertools.takewhile(lambda part: not part.startswith("_"), parts))
    return ".".join(public) or module
