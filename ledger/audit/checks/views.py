"""The audit's comparison of the live read models with the replay.

``credit_transactions`` is compared as a stream: the replay derives one row
per posting in log order, and the live rows are read in ``log_position``
order beside it, a page at a time, so neither side is held in memory. The
same pass checks that each user's ``balance_after`` chains (previous plus
amount) and sums the amounts per user.

``credit_reservations`` rows are looked up by id in batches: a hold's row is
final when the replay sees it close, and the holds still open when the replay
reaches the views' position are compared then. ``credit_balances`` and
``credit_accounts`` are compared with the per-account state at that position.

The live views are compared as of their own position (the projector's
tracking row), read when the audit starts; events after it are replayed and
checked but not compared. A projector writing during the audit can make rows
differ from what the audit read; audit a quiet store, or re-run to confirm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from ledger.audit.base import AuditContext, Check
from ledger.audit.checks.credits import Account, OpenHold, shared_accounts
from ledger.domain.credits import account_id_for
from ledger.storage.viewstore import TRACKED_APPLICATION, ViewStore, normalise
from ledger.views.credits import _as_uuid

TX_COLUMNS = (
    "log_position",
    "id",
    "user_id",
    "amount",
    "type",
    "description",
    "reference_id",
    "reference_type",
    "reference_label",
    "balance_after",
    "created_at",
    "idempotency_key",
)
RESERVATION_COLUMNS = (
    "id",
    "user_id",
    "job_id",
    "reserved_amount",
    "status",
    "settled_amount",
    "created_at",
    "settled_at",
    "expires_at",
    "release_reason",
    "idempotency_key",
)
PAGE_ROWS = 5_000
LOOKUP_IDS = 500
#: Rows named as extra per table before the rest are only counted.
MAX_NAMED_EXTRAS = 100


class ViewsCheck(Check):
    name = "view"
    covers = (
        "the live credit_transactions (with an unbroken balance_after chain per user), credit_reservations, "
        "credit_balances and credit_accounts equal what the replay produces, as of the views' position"
    )

    def __init__(self, ctx: AuditContext) -> None:
        super().__init__(ctx)
        self.store: ViewStore = ctx.ledger.views.store
        self.accounts = shared_accounts(ctx)
        self.until = ctx.views_position if ctx.views_position is not None else -1
        # The tracking position as the audit found it (``until`` is cut to the head).
        self._found_at = self.store.position() if ctx.views_position is not None else -1
        # Expected values in the representation the store returns them in, and
        # live user ids keyed as cheaply as the store allows.
        self._id: Callable[[Any], Any] = self.store.stored_id
        self._time: Callable[[datetime], Any] = self.store.stored_time
        self._user_key: Callable[[Any], Any] = self.store.id_key
        self._last_time: datetime | None = None
        self._last_created: Any = None
        self.chain: dict[Any, list[int]] = {}  # user -> [last balance_after, sum of amounts], live rows
        self.reserved = 0  # holds the views should have a row for
        self.pending: list[tuple[Any, ...]] = []  # expected reservation rows to look up
        self.compared = {"credit_transactions": 0, "credit_reservations": 0, "credit_balances": 0}
        self.extras = 0
        self.compared_at: int | None = None  # the position the views were compared at, once done
        self._rows: Iterator[tuple[Any, ...]] | None = None
        self._row: tuple[Any, ...] | None = None
        ctx.shared["views_check"] = self  # other checks compare their tables through it
        account_check = ctx.shared.get("account_check")
        if account_check is not None:
            account_check.sink = self

    # -- credit_transactions, streamed --------------------------------------------------

    def _live_transactions(self, after: int) -> Iterator[tuple[Any, ...]]:
        """The live rows in (after, until], in log order, streamed by one query.

        No index has ``log_position`` first (only ``(user_id, log_position)``),
        so paging with a keyset would sort the table once per page: one sorted
        query read through a cursor sorts it once."""
        # From the start of the log, no lower bound: a row at position 0 or
        # below (one a host wrote by hand, say, carried over from the seed's
        # table) is one no event produced, and must be read to be reported.
        lower, params = ("log_position > %s AND ", [after, self.until]) if after > 0 else ("", [self.until])
        query = (
            f"SELECT {', '.join(TX_COLUMNS)} FROM {self.table('credit_transactions')} "
            f"WHERE {lower}log_position <= %s ORDER BY log_position, id"
        )
        return self.store.stream(query, params, page_rows=PAGE_ROWS)

    def db_id(self, value: UUID) -> Any:
        """An id as the view store takes and returns it."""
        return self._id(value)

    def table(self, name: str) -> str:
        return self.store.qualified(name)

    def fetch(self, statement: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self.store.read(statement, params)

    def fetch_by_ids(self, select_where_id: str, ids: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Rows whose id is one of ``ids`` (as the store represents them);
        ``select_where_id`` ends with the id column to match."""
        return self.store.read_by_ids(select_where_id, ids)

    def _peek(self) -> tuple[Any, ...] | None:
        if self._rows is None:
            self._rows = self._live_transactions(self.ctx.from_position)
            self._row = next(self._rows, None)
        return self._row

    def _take(self) -> tuple[Any, ...]:
        """The current live row, chain-checked; moves to the next."""
        row = self._row
        assert row is not None and self._rows is not None
        self._row = next(self._rows, None)
        amount, balance_after = row[3], row[9]
        self.compared["credit_transactions"] += 1
        if type(amount) is not int or type(balance_after) is not int:
            # SQLite keeps whatever is written into an INTEGER column: no chain to follow.
            self.report(
                row[0],
                f"user {row[2]}",
                f"credit_transactions row {row[1]}: amount {amount!r} and balance_after {balance_after!r} "
                "are not both whole numbers",
            )
            if type(balance_after) is int:  # the next row follows from it
                self._link(row[2])[0] = balance_after
            return row
        link = self._link(row[2])
        if balance_after != link[0] + amount:
            self.report(
                row[0],
                f"user {row[2]}",
                f"credit_transactions row {row[1]}: balance_after {balance_after} does not follow the previous "
                f"row's {link[0]} {amount:+d}: the chain is broken",
                check="chain",
            )
        # Go on from the value the chain implies: one edited balance_after is one finding.
        link[0] += amount
        link[1] += amount
        return row

    def _link(self, user_id: Any) -> list[int]:
        """The user's running ``[balance_after, sum of amounts]``."""
        link = self.chain.get(self._user_key(user_id))
        if link is None:
            link = self.chain[self._user_key(user_id)] = [0, 0]
        return link

    def posting(
        self,
        position: int,
        account: Account,
        event: Any,
        amount: int,
        kind: str,
        description: str,
        reference_type: str | None,
        reference: str | None,
        key: str | None,
    ) -> None:
        if position > self.until:
            return
        row = self._peek()
        while row is not None and row[0] < position:
            self._extra(self._take())
            row = self._row
        reference_id = _as_uuid(reference)
        expected = (
            position,
            self._id(event.entry_id),
            self._id(account.user_id),
            amount,
            kind,
            description or None,
            self._id(reference_id) if reference_id is not None else None,
            reference_type,
            reference,
            account.balance,
            self._created_at(event.timestamp),
            key,
        )
        if row is None or row[0] != position:
            self.report(
                position,
                account.subject,
                f"no credit_transactions row for the {kind} of {amount:+d} credits (entry {event.entry_id})",
            )
            return
        row = self._take()
        if row != expected:
            self._differs("credit_transactions", TX_COLUMNS, position, account.subject, row, expected)
        while self._row is not None and self._row[0] == position:
            self._extra(self._take())

    def _created_at(self, timestamp: datetime) -> Any:
        # A transaction's postings share one timestamp: convert it once.
        if timestamp != self._last_time:
            self._last_time, self._last_created = timestamp, self._time(timestamp)
        return self._last_created

    def _extra(self, row: tuple[Any, ...]) -> None:
        self.extras += 1
        if self.extras > MAX_NAMED_EXTRAS:
            self.report(row[0], f"user {row[2]}", "another credit_transactions row no event produced")
            return
        settles = ""
        if row[4] == "generation_use" and row[7] == "generation_job":
            settles = f"; it charges job {row[8]} again (a hold settled twice?)"
        self.report(
            row[0],
            f"user {row[2]}",
            f"credit_transactions row {row[1]} ({row[4]}, {_signed(row[3])} credits, balance_after {row[9]}) "
            f"is not produced by any event{settles}",
        )

    def _drain(self, upto: int) -> None:
        """Live rows up to ``upto`` still unread matched no posting."""
        while (row := self._peek()) is not None and row[0] <= upto:
            self._extra(self._take())

    def _past_the_views(self) -> None:
        """Rows whose ``log_position`` is past the views' position: the
        projector has projected no event there, so nothing accounts for them.

        The bound is the tracking position read in the same statement as the
        rows, so a projector committing pages during the audit (its rows and
        its position together) is not taken for a forger; what it wrote after
        the position the audit compared at is noted, not compared."""
        moved_to = self.store.position()
        if moved_to > max(self.until, self._found_at):
            self.ctx.notes.append(
                f"the views moved from position {self._found_at} to {moved_to} during the audit: "
                "the rows in between were not compared; audit a quiet store, or re-run"
            )
        past = (
            f"FROM {self.table('credit_transactions')} WHERE log_position > %s AND log_position > COALESCE("
            f"(SELECT MAX(notification_id) FROM {self.table(self._tracking_table())} WHERE application_name = %s), 0)"
        )
        params = [self.until, TRACKED_APPLICATION]
        rows = self.fetch(
            f"SELECT {', '.join(TX_COLUMNS)} {past} ORDER BY log_position, id LIMIT {MAX_NAMED_EXTRAS}", params
        )
        for row in rows:
            self.extras += 1
            self.report(
                row[0],
                f"user {row[2]}",
                f"credit_transactions row {row[1]} ({row[4]}, {row[3]:+d} credits, balance_after {row[9]}) is at "
                f"log position {row[0]}, past the views' position {self.until}: no projected event accounts for it",
            )
        if len(rows) == MAX_NAMED_EXTRAS:
            more = self.fetch(f"SELECT COUNT(*) {past}", params)[0][0] - len(rows)
            if more > 0:
                self.extras += more
                self.report(
                    None,
                    "credit_transactions",
                    f"{more} more rows past the views' position {self.until} that no projected event accounts for",
                )

    def _tracking_table(self) -> str:
        return self.ctx.ledger.backend.tracking_table

    def _close_stream(self) -> None:
        if self._rows is not None and hasattr(self._rows, "close"):
            self._rows.close()  # ends the cursor's transaction now, not at garbage collection
        self._rows, self._row = iter(()), None

    def _differs(
        self,
        table: str,
        columns: Sequence[str],
        position: int | None,
        subject: str,
        live: Sequence[Any],
        expected: Sequence[Any],
    ) -> None:
        diffs = [
            f"{column} is {normalise(a)!r}, the events say {normalise(b)!r}"
            for column, a, b in zip(columns, live, expected, strict=True)
            if a != b
        ]
        self.report(position, subject, f"{table} row {normalise(expected[columns.index('id')])}: " + "; ".join(diffs))

    # -- credit_reservations, looked up in batches -------------------------------------------

    def _reservation(
        self,
        reservation_id: UUID,
        account: Account,
        hold: OpenHold,
        status: str,
        settled: int | None,
        closed_at: datetime | None,
        reason: str | None,
    ) -> tuple[Any, ...]:
        job_id, amount, expires_at, reserved_at, key = hold
        return (
            self._id(reservation_id),
            self._id(account.user_id),
            self._id(job_id),
            amount,
            status,
            settled,
            self._time(reserved_at),
            self._time(closed_at) if closed_at is not None else None,
            self._time(expires_at),
            reason,
            key,
        )

    def hold_opened(self, position: int, account: Account, reservation_id: UUID, hold: OpenHold) -> None:
        if position <= self.until:
            self.reserved += 1

    def hold_closed(
        self,
        position: int,
        account: Account,
        reservation_id: UUID,
        hold: OpenHold,
        status: str,
        settled: int | None,
        closed_at: datetime,
        reason: str | None,
    ) -> None:
        if position > self.until:
            return
        self.pending.append(self._reservation(reservation_id, account, hold, status, settled, closed_at, reason))
        if len(self.pending) >= LOOKUP_IDS:
            self._look_up()

    def _look_up(self) -> None:
        expected_rows, self.pending = self.pending, []
        if not expected_rows:
            return
        live = self.fetch_by_ids(
            f"SELECT {', '.join(RESERVATION_COLUMNS)} FROM {self.table('credit_reservations')} WHERE id",
            [row[0] for row in expected_rows],
        )
        by_id = {row[0]: row for row in live}
        for expected in expected_rows:
            self.compared["credit_reservations"] += 1
            row = by_id.get(expected[0])
            subject = f"reservation {expected[0]}"
            if row is None:
                self.report(None, subject, f"no credit_reservations row (the events say {expected[4]})")
            elif row != expected:
                self._differs("credit_reservations", RESERVATION_COLUMNS, None, subject, row, expected)

    def _count_reservations(self) -> None:
        live = self.fetch(f"SELECT COUNT(*) FROM {self.table('credit_reservations')}", [])[0][0]
        if live <= self.reserved:
            return  # missing rows were named by the look-ups
        # More rows than holds: name those with no Reservation in the event store.
        reader = self.ctx.ledger.engine.reader
        named = 0
        for ids in self._pages("credit_reservations", "id"):
            known = reader.events_after({UUID(str(i)): 0 for i in ids})
            for reservation_id in ids:
                if UUID(str(reservation_id)) not in known and named < MAX_NAMED_EXTRAS:
                    named += 1
                    self.report(
                        None, f"reservation {reservation_id}", "credit_reservations row for a hold no event records"
                    )
        if named == 0:
            self.report(None, "credit_reservations", f"{live} rows for {self.reserved} holds")

    def _pages(self, table: str, column: str, columns: str | None = None) -> Iterator[list[Any]]:
        """A table's rows (or one column of them) in pages, keyset by ``column``."""
        select = f"SELECT {columns or column} FROM {self.table(table)}"
        rows = self.fetch(f"{select} ORDER BY {column} LIMIT {PAGE_ROWS}", [])
        while rows:
            yield [row[0] for row in rows] if columns is None else rows
            if len(rows) < PAGE_ROWS:
                return
            rows = self.fetch(f"{select} WHERE {column} > %s ORDER BY {column} LIMIT {PAGE_ROWS}", [rows[-1][0]])

    # -- per account, at the views' position ----------------------------------------------

    def _account_of(self, user_id: Any) -> Account | None:
        try:
            account = self.accounts.get(account_id_for(UUID(str(user_id))).int)
        except ValueError:
            return None
        return account if account is not None and account.opened_position <= self.until else None

    def _compare_balances(self) -> None:
        seen: set[UUID] = set()
        columns = "user_id, balance, held, available, credit_limit"
        for rows in self._pages("credit_balances", "user_id", columns):
            for user_id, balance, held, available, credit_limit in rows:
                self.compared["credit_balances"] += 1
                account = self._account_of(user_id)
                if account is None:
                    self.report(None, f"user {user_id}", "credit_balances row for an account no event opened")
                    continue
                seen.add(account.account_id)
                expected = (account.balance, account.held, account.available, account.credit_limit)
                if (balance, held, available, credit_limit) != expected:
                    self.report(
                        None,
                        account.subject,
                        f"credit_balances says balance {balance}, held {held}, available {available}, "
                        f"credit limit {credit_limit}; the events say {expected[0]}, {expected[1]}, "
                        f"{expected[2]}, {expected[3]}",
                    )
                link = self.chain.get(self._user_key(user_id))
                total = link[1] if link is not None else 0
                if balance != total:
                    self.report(
                        None,
                        account.subject,
                        f"credit_balances says balance {balance}, the user's credit_transactions sum to {total}",
                    )
        for account in self.accounts.values():
            if account.account_id not in seen and account.user_id is not None and account.opened_position <= self.until:
                self.report(None, account.subject, "no credit_balances row")

    def _compare_accounts(self) -> None:
        seen: set[UUID] = set()
        for rows in self._pages("credit_accounts", "account_id", "account_id, user_id, opened_at"):
            for account_id, user_id, opened_at in rows:
                account = self._account_of(user_id)
                if account is None or str(account.account_id) != str(account_id):
                    self.report(None, f"user {user_id}", f"credit_accounts row {account_id} for no account opened so")
                    continue
                seen.add(account.account_id)
                if opened_at != self._time(account.opened_at):
                    self.report(
                        None,
                        account.subject,
                        f"credit_accounts says opened at {normalise(opened_at)}, "
                        f"the events say {normalise(self._time(account.opened_at))}",
                    )
        for account in self.accounts.values():
            if account.account_id not in seen and account.user_id is not None and account.opened_position <= self.until:
                self.report(None, account.subject, "no credit_accounts row")

    # -- hooks ---------------------------------------------------------------------------

    def at_views(self) -> None:
        if self.until < 0:
            return
        self._drain(self.until)
        self._close_stream()
        self._past_the_views()
        for account in self.accounts.values():
            for reservation_id, hold in account.holds.items():
                self.pending.append(self._reservation(reservation_id, account, hold, "reserved", None, None, None))
                if len(self.pending) >= LOOKUP_IDS:
                    self._look_up()
        self._look_up()
        self._count_reservations()
        self._compare_balances()
        self._compare_accounts()
        self.compared_at = self.until
        self.until = -1  # compared: later events are past the views

    def close(self) -> None:
        self._close_stream()

    def save(self) -> dict[str, Any]:
        # Everything up to the checkpoint is settled first, so a resumed run
        # starts with no rows in flight.
        compared_to = min(self.ctx.position, self.until)
        if self.until >= 0:
            self._drain(compared_to)
            self._look_up()
        return {
            "compared_to": compared_to,
            "compared_at": self.compared_at,
            "chain": {str(UUID(int=u)) if isinstance(u, int) else u: v for u, v in self.chain.items()},
            "reserved": self.reserved,
            "extras": self.extras,
            "compared": self.compared,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self.chain = {self._user_key(self._id(UUID(u))): [int(v[0]), int(v[1])] for u, v in state["chain"].items()}
        self.reserved = int(state["reserved"])
        self.extras = int(state["extras"])
        self.compared = {table: int(n) for table, n in state["compared"].items()}
        self.compared_at = state["compared_at"]
        if self.compared_at is not None:
            self.ctx.notes.append(f"views compared at position {self.compared_at}, before the checkpoint")
            self.until = -1
        elif int(state["compared_to"]) != self.ctx.from_position and self.until >= 0:
            self.ctx.notes.append(
                f"views not compared: the checkpoint's run compared them only up to position {state['compared_to']}"
            )
            self.until = -1

    def summary(self) -> dict[str, Any]:
        return {"views_rows_compared": dict(self.compared)}


def _signed(credits: Any) -> str:
    """A row's amount as ``+5``/``-5``, or as stored when it is not a number."""
    return f"{credits:+d}" if type(credits) is int else repr(credits)
