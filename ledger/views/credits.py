"""Read models: each ``View`` turns a page of events into rows.

A view names the event topics it reads and the tables it owns, and writes a
page inside the projector's transaction (rows and tracking position commit
together). Adding a view is one subclass, registered in ``DEFAULT_VIEWS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from uuid import UUID

from ledger.domain.credits import CreditAccount
from ledger.errors import InvariantViolation
from ledger.storage.viewstore import ViewTx

#: The seed's word for a released hold, kept in credit_reservations.status.
RELEASED_STATUS = "refunded"

RESERVATION_COLUMNS = (
    "id",
    "user_id",
    "job_id",
    "reserved_amount",
    "status",
    "created_at",
    "expires_at",
    "idempotency_key",
)
TRANSACTION_COLUMNS = (
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
    "log_position",
)


class View(ABC):
    """A read model fed by the projector."""

    name: ClassVar[str]
    topics: ClassVar[tuple[str, ...]]
    #: Tables the view owns, each with the columns that order its rows and the
    #: columns left out of checksums because a trigger or clock writes them.
    tables: ClassVar[dict[str, tuple[str, tuple[str, ...]]]]

    @abstractmethod
    def process(self, events: Sequence[tuple[int, Any]], tx: ViewTx) -> None:
        """Writes the rows for ``events``, (log position, event) pairs in log
        order, using ``tx``."""


def _as_uuid(value: str | None) -> UUID | None:
    if value is None:
        return None
    try:
        return UUID(value)
    except ValueError:
        return None


@dataclass
class _Balance:
    user_id: UUID
    balance: int
    held: int
    changed_at: Any = None

    def row(self) -> list[Any]:
        return [self.user_id, self.balance, self.held, self.balance - self.held, self.changed_at]


@dataclass
class _Page:
    accounts: dict[UUID, UUID] = field(default_factory=dict)  # account id -> user id
    new_accounts: list[list[Any]] = field(default_factory=list)
    holds: dict[UUID, tuple[UUID, int]] = field(default_factory=dict)  # reservation -> (job, amount)
    balances: dict[UUID, _Balance] = field(default_factory=dict)
    transactions: list[list[Any]] = field(default_factory=list)
    reservations: list[list[Any]] = field(default_factory=list)
    closes: list[list[Any]] = field(default_factory=list)


class CreditView(View):
    """credit_transactions (with a running balance_after), credit_reservations,
    credit_balances, and, when the host opts in, users.credits."""

    name = "credits"
    topics = tuple(
        cls.TOPIC
        for cls in (
            CreditAccount.Opened,
            CreditAccount.Granted,
            CreditAccount.Debited,
            CreditAccount.Reserved,
            CreditAccount.Settled,
            CreditAccount.Released,
            CreditAccount.Expired,
        )
    )
    tables: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {
        "credit_accounts": ("account_id", ()),
        "credit_transactions": ("log_position", ()),
        "credit_reservations": ("created_at, id", ()),
        "credit_balances": ("user_id", ("updated_at",)),
    }

    def __init__(self, *, sync_user_credits: bool = False) -> None:
        self.sync_user_credits = sync_user_credits

    def process(self, events: Sequence[tuple[int, Any]], tx: ViewTx) -> None:
        page = _Page()
        self._load([e for _, e in events], tx, page)
        for position, event in events:
            self._apply(position, event, page)
        self._write(tx, page)

    # -- reading what the page needs, a query per kind --------------------------

    def _load(self, events: Sequence[Any], tx: ViewTx, page: _Page) -> None:
        known: set[UUID] = set()
        wanted_holds: set[UUID] = set()
        reserved_here: set[UUID] = set()
        for event in events:
            if isinstance(event, CreditAccount.Opened):
                page.accounts[event.originator_id] = event.user_id
            known.add(event.originator_id)
            if isinstance(event, CreditAccount.Reserved):
                reserved_here.add(event.reservation_id)
            elif (
                isinstance(event, CreditAccount.Settled | CreditAccount.Released)
                and event.reservation_id not in reserved_here
            ):
                wanted_holds.add(event.reservation_id)
        missing = [a for a in known if a not in page.accounts]
        if missing:
            rows = tx.fetchall(
                f"SELECT account_id, user_id FROM credit_accounts WHERE account_id IN ({tx.in_list(len(missing))})",
                missing,
            )
            page.accounts.update({_uuid(a): _uuid(u) for a, u in rows})
        if wanted_holds:
            rows = tx.fetchall(
                "SELECT id, job_id, reserved_amount FROM credit_reservations "
                f"WHERE status = 'reserved' AND id IN ({tx.in_list(len(wanted_holds))})",
                list(wanted_holds),
            )
            page.holds.update({_uuid(r): (_uuid(j), amount) for r, j, amount in rows})
        users = list(set(page.accounts.values()))
        if users:
            rows = tx.fetchall(
                f"SELECT user_id, balance, held FROM credit_balances WHERE user_id IN ({tx.in_list(len(users))})",
                users,
            )
            for user_id, balance, held in rows:
                page.balances[_uuid(user_id)] = _Balance(_uuid(user_id), balance, held)

    # -- turning events into rows ------------------------------------------------------

    def _apply(self, position: int, event: Any, page: _Page) -> None:
        try:
            user_id = page.accounts[event.originator_id]
        except KeyError:
            raise InvariantViolation(f"event of unknown account {event.originator_id}") from None
        balance = page.balances.setdefault(user_id, _Balance(user_id, 0, 0))
        balance.changed_at = event.timestamp
        if isinstance(event, CreditAccount.Opened):
            page.new_accounts.append([event.originator_id, user_id, event.timestamp])
        elif isinstance(event, CreditAccount.Granted | CreditAccount.Debited):
            signed = event.amount if isinstance(event, CreditAccount.Granted) else -event.amount
            balance.balance += signed
            page.transactions.append(
                self._transaction(
                    position,
                    event,
                    user_id,
                    signed,
                    event.kind,
                    balance.balance,
                    event.description,
                    event.reference_type,
                    event.reference_id,
                )
            )
        elif isinstance(event, CreditAccount.Reserved):
            balance.held += event.amount
            page.holds[event.reservation_id] = (event.job_id, event.amount)
            page.reservations.append(
                [
                    event.reservation_id,
                    user_id,
                    event.job_id,
                    event.amount,
                    "reserved",
                    event.timestamp,
                    event.expires_at,
                    event.key,
                ]
            )
        elif isinstance(event, CreditAccount.Settled):
            job_id, held = self._hold(page, event.reservation_id)
            balance.held -= held
            balance.balance -= event.amount
            page.closes.append(["settled", event.amount, event.timestamp, None, event.reservation_id])
            page.transactions.append(
                self._transaction(
                    position,
                    event,
                    user_id,
                    -event.amount,
                    "generation_use",
                    balance.balance,
                    "",
                    "generation_job",
                    str(job_id),
                )
            )
        elif isinstance(event, CreditAccount.Released):
            _, held = self._hold(page, event.reservation_id)
            balance.held -= held
            page.closes.append([RELEASED_STATUS, None, event.timestamp, event.reason, event.reservation_id])
        elif isinstance(event, CreditAccount.Expired):
            balance.balance -= event.amount
            row = self._transaction(
                position,
                event,
                user_id,
                -event.amount,
                "expiration",
                balance.balance,
                "unused credits lapsed",
                "credit_block",
                str(event.block_id),
            )
            page.transactions.append(row)
        if balance.balance < 0 or balance.held < 0 or balance.balance < balance.held:
            raise InvariantViolation(f"view balance of user {user_id} went negative at {event.originator_version}")

    @staticmethod
    def _hold(page: _Page, reservation_id: UUID) -> tuple[UUID, int]:
        try:
            return page.holds.pop(reservation_id)
        except KeyError:
            raise InvariantViolation(f"reservation {reservation_id} closed but never open in the view") from None

    @staticmethod
    def _transaction(
        position: int,
        event: Any,
        user_id: UUID,
        amount: int,
        kind: str,
        balance_after: int,
        description: str,
        reference_type: str | None,
        reference: str | None,
    ) -> list[Any]:
        return [
            event.entry_id,
            user_id,
            amount,
            kind,
            description or None,
            _as_uuid(reference),
            reference_type,
            reference,
            balance_after,
            event.timestamp,
            getattr(event, "key", None),
            position,
        ]

    # -- writing, a statement per kind ---------------------------------------------------

    def _write(self, tx: ViewTx, page: _Page) -> None:
        tx.insert_rows("credit_accounts", ("account_id", "user_id", "opened_at"), page.new_accounts)
        tx.insert_rows("credit_reservations", RESERVATION_COLUMNS, page.reservations)
        tx.insert_rows("credit_transactions", TRANSACTION_COLUMNS, page.transactions)
        tx.executemany(
            "UPDATE credit_reservations SET status = %s, settled_amount = %s, settled_at = %s, "
            "release_reason = %s WHERE id = %s AND status = 'reserved'",
            page.closes,
        )
        rows = [b.row() for b in page.balances.values() if b.changed_at is not None]
        tx.executemany(
            "INSERT INTO credit_balances (user_id, balance, held, available, updated_at) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (user_id) DO UPDATE SET balance = excluded.balance, held = excluded.held, "
            "available = excluded.available, updated_at = excluded.updated_at",
            rows,
        )
        if self.sync_user_credits:
            tx.executemany("UPDATE users SET credits = %s WHERE id = %s", [[r[1], r[0]] for r in rows])


def _uuid(value: Any) -> UUID:
    return value if isinstance(value, UUID) else UUID(str(value))
