"""The credit read model: credit_accounts, credit_transactions (with a
running balance_after), credit_reservations and credit_balances, with their
DDL, and, when the host opts in, users.credits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from uuid import UUID

from ledger.domain.credits import MAX_CREDIT_LIMIT, CreditAccount
from ledger.errors import InvariantViolation
from ledger.storage.ddl import Table
from ledger.storage.viewstore import ViewTx
from ledger.views.base import View, ViewOptions

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
    credit_limit: int = 0

    def row(self) -> list[Any]:
        available = self.balance - self.held + self.credit_limit
        return [self.user_id, self.balance, self.held, available, self.changed_at, self.credit_limit]


@dataclass
class _Page:
    accounts: dict[UUID, UUID] = field(default_factory=dict)  # account id -> user id
    new_accounts: list[list[Any]] = field(default_factory=list)
    holds: dict[UUID, tuple[UUID, int]] = field(default_factory=dict)  # reservation -> (job, amount)
    balances: dict[UUID, _Balance] = field(default_factory=dict)
    transactions: list[list[Any]] = field(default_factory=list)
    reservations: list[list[Any]] = field(default_factory=list)
    closes: list[list[Any]] = field(default_factory=list)


_CREDIT_TYPES = (
    "'subscription_grant', 'subscription_renew', 'generation_use', 'api_use',\n"
    "        'refund', 'admin_adjustment', 'bonus', 'purchase', 'expiration'"
)

CREDIT_TRANSACTIONS = Table(
    "credit_transactions",
    postgres="""
-- 7. credit_transactions
CREATE TABLE IF NOT EXISTS {S}.credit_transactions (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID NOT NULL,  -- seed: REFERENCES users(id) ON DELETE CASCADE (opt-in: user_foreign_keys)
    amount INT NOT NULL,  -- positive: credit, negative: debit
    type VARCHAR(30) NOT NULL,
    -- subscription_grant, subscription_renew, generation_use, api_use,
    -- refund, admin_adjustment, bonus; ledger deviation 1: purchase, expiration
    description VARCHAR(500),
    reference_id UUID,  -- related entity id (job_id, subscription_id, ...)
    reference_type VARCHAR(50),  -- generation_job, subscription, ...
    balance_after INT NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT NOW(),
    -- ledger deviation 1: the caller's reference as given ('invoice:3420871');
    -- reference_id is a UUID and payment references are not
    reference_label VARCHAR(100),
    -- ledger deviation 1: the idempotency key of the command that posted the row
    idempotency_key VARCHAR(200),
    -- ledger deviation 11: the event's position in the event log. Rows posted at
    -- the same instant are ordered by it; balance_after chains in this order.
    log_position BIGINT NOT NULL,

    -- ledger deviation 1: a CHECK on type
    CONSTRAINT chk_credit_transactions_type CHECK (type IN (
        {CREDIT_TYPES}))
);
""".replace("{CREDIT_TYPES}", _CREDIT_TYPES),
    postgres_after="""
CREATE INDEX IF NOT EXISTS idx_credit_transactions_user ON {S}.credit_transactions(user_id);
CREATE INDEX IF NOT EXISTS idx_credit_transactions_created ON {S}.credit_transactions(created_at);
CREATE INDEX IF NOT EXISTS idx_credit_transactions_type ON {S}.credit_transactions(type);
-- index strategy: a user's transactions, newest first
CREATE INDEX IF NOT EXISTS idx_credit_transactions_user_created
ON {S}.credit_transactions(user_id, created_at DESC);

-- ledger deviation 11: a user's postings in log order (the balance_after chain)
CREATE UNIQUE INDEX IF NOT EXISTS uq_credit_transactions_user_position
ON {S}.credit_transactions(user_id, log_position);
""",
    sqlite="""
-- 7. credit_transactions
CREATE TABLE IF NOT EXISTS credit_transactions (
    id TEXT NOT NULL PRIMARY KEY DEFAULT {UUID},
    user_id TEXT NOT NULL,
    amount INTEGER NOT NULL,
    type TEXT NOT NULL,
    description TEXT,  -- VARCHAR(500)
    reference_id TEXT,  -- UUID
    reference_type TEXT,
    balance_after INTEGER NOT NULL,
    created_at TEXT NOT NULL DEFAULT ({NOW}),
    -- ledger deviation 1
    reference_label TEXT,  -- VARCHAR(100)
    idempotency_key TEXT,  -- VARCHAR(200)
    log_position INTEGER NOT NULL,  -- ledger deviation 11

    -- ledger deviation 1
    CONSTRAINT chk_credit_transactions_type CHECK (type IN (
        {CREDIT_TYPES}))
);
""".replace("{CREDIT_TYPES}", _CREDIT_TYPES),
    sqlite_after="""
CREATE INDEX IF NOT EXISTS idx_credit_transactions_user ON credit_transactions(user_id);
CREATE INDEX IF NOT EXISTS idx_credit_transactions_created ON credit_transactions(created_at);
CREATE INDEX IF NOT EXISTS idx_credit_transactions_type ON credit_transactions(type);
CREATE INDEX IF NOT EXISTS idx_credit_transactions_user_created
ON credit_transactions(user_id, created_at DESC);

CREATE UNIQUE INDEX IF NOT EXISTS uq_credit_transactions_user_position
ON credit_transactions(user_id, log_position);
""",
    guard=("reference_label", "idempotency_key", "log_position"),
    user_foreign_key=("fk_credit_transactions_user", "CASCADE"),
)

CREDIT_RESERVATIONS = Table(
    "credit_reservations",
    postgres="""
-- 8. credit_reservations
CREATE TABLE IF NOT EXISTS {S}.credit_reservations (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID NOT NULL,  -- seed: REFERENCES users(id) ON DELETE CASCADE (opt-in: user_foreign_keys)
    job_id UUID NOT NULL,
    reserved_amount INT NOT NULL,
    status VARCHAR(20) NOT NULL DEFAULT 'reserved',
    -- reserved, settled, refunded ('refunded' is the seed's word for a released hold)
    settled_amount INT,
    created_at TIMESTAMP NOT NULL DEFAULT NOW(),
    settled_at TIMESTAMP,
    -- ledger deviation 2: holds expire; a released hold records why
    expires_at TIMESTAMP NOT NULL,
    release_reason TEXT,
    idempotency_key VARCHAR(200),

    -- ledger deviation 2: a CHECK on status
    CONSTRAINT chk_credit_reservations_status CHECK (status IN ('reserved', 'settled', 'refunded'))
);
""",
    postgres_after="""
CREATE INDEX IF NOT EXISTS idx_credit_reservations_user ON {S}.credit_reservations(user_id);
CREATE INDEX IF NOT EXISTS idx_credit_reservations_job ON {S}.credit_reservations(job_id);
CREATE INDEX IF NOT EXISTS idx_credit_reservations_status ON {S}.credit_reservations(status);
""",
    sqlite="""
-- 8. credit_reservations
CREATE TABLE IF NOT EXISTS credit_reservations (
    id TEXT NOT NULL PRIMARY KEY DEFAULT {UUID},
    user_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    reserved_amount INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'reserved',
    settled_amount INTEGER,
    created_at TEXT NOT NULL DEFAULT ({NOW}),
    settled_at TEXT,
    -- ledger deviation 2
    expires_at TEXT NOT NULL,
    release_reason TEXT,
    idempotency_key TEXT,

    -- ledger deviation 2
    CONSTRAINT chk_credit_reservations_status CHECK (status IN ('reserved', 'settled', 'refunded'))
);
""",
    sqlite_after="""
CREATE INDEX IF NOT EXISTS idx_credit_reservations_user ON credit_reservations(user_id);
CREATE INDEX IF NOT EXISTS idx_credit_reservations_job ON credit_reservations(job_id);
CREATE INDEX IF NOT EXISTS idx_credit_reservations_status ON credit_reservations(status);
""",
    guard=("expires_at", "release_reason", "idempotency_key"),
    user_foreign_key=("fk_credit_reservations_user", "CASCADE"),
)

CREDIT_ACCOUNTS = Table(
    "credit_accounts",
    postgres="""
-- ledger deviation 10: a table the seed does not have. Events name an
-- account by its own id; this maps it to the user once, when it is opened.
CREATE TABLE IF NOT EXISTS {S}.credit_accounts (
    account_id UUID PRIMARY KEY,
    user_id UUID NOT NULL UNIQUE,
    opened_at TIMESTAMP NOT NULL
);
""",
    sqlite="""
-- ledger deviation 10: account id -> user id, written when an account opens.
CREATE TABLE IF NOT EXISTS credit_accounts (
    account_id TEXT NOT NULL PRIMARY KEY,
    user_id TEXT NOT NULL UNIQUE,
    opened_at TEXT NOT NULL
);
""",
)

CREDIT_BALANCES = Table(
    "credit_balances",
    postgres="""
-- ledger deviation 3: a table the seed does not have. One row per account:
-- the balance, the credits held by open reservations, and what is available.
-- Schema version 3 (ledger deviation 13): credit_limit, how far below zero
-- the balance may go; available = balance - held + credit_limit.
CREATE TABLE IF NOT EXISTS {S}.credit_balances (
    user_id UUID PRIMARY KEY,  -- opt-in: REFERENCES users(id) ON DELETE CASCADE
    balance INT NOT NULL,
    held INT NOT NULL,
    available INT NOT NULL,
    updated_at TIMESTAMP NOT NULL DEFAULT NOW(),
    credit_limit INT NOT NULL DEFAULT 0,

    CONSTRAINT chk_credit_balances CHECK (
        held >= 0 AND credit_limit >= 0 AND available = balance - held + credit_limit)
);
""",
    postgres_after="""
-- ledger deviation 13: a table of schema version 2 gains credit_limit and the
-- CHECK that lets the balance go below zero (idempotent).
ALTER TABLE {S}.credit_balances ADD COLUMN IF NOT EXISTS credit_limit INT NOT NULL DEFAULT 0;
ALTER TABLE {S}.credit_balances DROP CONSTRAINT IF EXISTS chk_credit_balances;
ALTER TABLE {S}.credit_balances ADD CONSTRAINT chk_credit_balances CHECK (
    held >= 0 AND credit_limit >= 0 AND available = balance - held + credit_limit);
""",
    sqlite="""
-- ledger deviation 3: one row per account
-- ledger deviation 13 (schema version 3): credit_limit
CREATE TABLE IF NOT EXISTS credit_balances (
    user_id TEXT NOT NULL PRIMARY KEY,
    balance INTEGER NOT NULL,
    held INTEGER NOT NULL,
    available INTEGER NOT NULL,
    updated_at TEXT NOT NULL DEFAULT ({NOW}),
    credit_limit INTEGER NOT NULL DEFAULT 0,

    CONSTRAINT chk_credit_balances CHECK (
        held >= 0 AND credit_limit >= 0 AND available = balance - held + credit_limit)
);
""",
    sqlite_after="""
-- ledger deviation 13: SQLite cannot change a CHECK in place, so the table is
-- copied into the version 3 shape (credit_limit is what available says beyond
-- balance - held: 0 in a table of version 2). Idempotent.
CREATE TABLE IF NOT EXISTS credit_balances_v3 (
    user_id TEXT NOT NULL PRIMARY KEY,
    balance INTEGER NOT NULL,
    held INTEGER NOT NULL,
    available INTEGER NOT NULL,
    updated_at TEXT NOT NULL DEFAULT ({NOW}),
    credit_limit INTEGER NOT NULL DEFAULT 0,

    CONSTRAINT chk_credit_balances CHECK (
        held >= 0 AND credit_limit >= 0 AND available = balance - held + credit_limit)
);
INSERT INTO credit_balances_v3 (user_id, balance, held, available, updated_at, credit_limit)
SELECT user_id, balance, held, available, updated_at, available - balance + held FROM credit_balances;
DROP TABLE credit_balances;
ALTER TABLE credit_balances_v3 RENAME TO credit_balances;
""",
    updated_at=True,
    user_foreign_key=("fk_credit_balances_user", "CASCADE"),
)


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
            CreditAccount.LimitSet,
        )
    )
    tables: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {
        "credit_accounts": ("account_id", ()),
        "credit_transactions": ("log_position", ()),
        "credit_reservations": ("created_at, id", ()),
        "credit_balances": ("user_id", ("updated_at",)),
    }
    ddl = (CREDIT_TRANSACTIONS, CREDIT_RESERVATIONS, CREDIT_ACCOUNTS, CREDIT_BALANCES)

    def __init__(self, *, sync_user_credits: bool = False) -> None:
        self.sync_user_credits = sync_user_credits

    @classmethod
    def create(cls, options: ViewOptions) -> CreditView:
        return cls(sync_user_credits=options.sync_user_credits)

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
            where, params = tx.where_in("account_id", missing)
            rows = tx.fetchall(f"SELECT account_id, user_id FROM credit_accounts WHERE {where}", params)
            page.accounts.update({_uuid(a): _uuid(u) for a, u in rows})
        if wanted_holds:
            where, params = tx.where_in("id", list(wanted_holds))
            rows = tx.fetchall(
                f"SELECT id, job_id, reserved_amount FROM credit_reservations WHERE status = 'reserved' AND {where}",
                params,
            )
            page.holds.update({_uuid(r): (_uuid(j), amount) for r, j, amount in rows})
        users = list(set(page.accounts.values()))
        if users:
            where, params = tx.where_in("user_id", users)
            rows = tx.fetchall(
                f"SELECT user_id, balance, held, credit_limit FROM credit_balances WHERE {where}", params
            )
            for user_id, balance, held, credit_limit in rows:
                page.balances[_uuid(user_id)] = _Balance(_uuid(user_id), balance, held, credit_limit=credit_limit)

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
        elif isinstance(event, CreditAccount.LimitSet):
            balance.credit_limit = event.limit_credits
        if balance.held < 0 or balance.balance < -MAX_CREDIT_LIMIT or balance.credit_limit < 0:
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
        tx.update_rows(
            "credit_reservations",
            ("status", "settled_amount", "settled_at", "release_reason"),
            "id",
            page.closes,
            where=[("status", "reserved")],
        )
        rows = [b.row() for b in page.balances.values() if b.changed_at is not None]
        tx.upsert_rows(
            "credit_balances",
            ("user_id", "balance", "held", "available", "updated_at", "credit_limit"),
            "user_id",
            rows,
        )
        if self.sync_user_credits:
            tx.executemany("UPDATE users SET credits = %s WHERE id = %s", [[r[1], r[0]] for r in rows])


def _uuid(value: Any) -> UUID:
    return value if isinstance(value, UUID) else UUID(str(value))
