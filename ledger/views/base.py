"""What a view is: a read model fed by the projector, owning its tables.

A view names the event topics it reads, the tables it rebuilds, and the DDL
of every table it writes, and writes a page of events inside the projector's
transaction (rows and tracking position commit together). Adding a view is
one module with a ``View`` subclass, and one line in ``ledger/views/registry.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ledger.storage.ddl import Table
from ledger.storage.viewstore import ViewTx

__all__ = ["View", "ViewOptions"]


@dataclass(frozen=True)
class ViewOptions:
    """The host's choices a view may follow (``Ledger(..., sync_user_credits=...)``)."""

    sync_user_credits: bool = False
    sync_user_tier: bool = False


class View(ABC):
    """A read model fed by the projector."""

    name: ClassVar[str]
    topics: ClassVar[tuple[str, ...]]
    #: Tables the view rebuilds from events, each with the columns that order
    #: its rows and the columns left out of checksums because a trigger or
    #: clock writes them.
    tables: ClassVar[dict[str, tuple[str, tuple[str, ...]]]]
    #: The DDL of every table the view writes, in creation order (a table after
    #: the tables it references): those of ``tables`` and any it only keeps
    #: current (the plan catalog). ``migrate`` creates them.
    ddl: ClassVar[tuple[Table, ...]]

    @classmethod
    def create(cls, options: ViewOptions) -> View:
        """The view as the host configured it."""
        return cls()

    @abstractmethod
    def process(self, events: Sequence[tuple[int, Any]], tx: ViewTx) -> None:
        """Writes the rows for ``events``, (log position, event) pairs in log
        order, using ``tx``."""
