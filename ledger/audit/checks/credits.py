"""The audit's checks of the ledger's own events.

``AccountCheck`` replays every credit account from its events, independently
of the domain code: versions without gaps, time that never runs backwards,
grants and draws that add up, holds closed at most once and settled within
what they held (or with the extra covered), and no balance or available
balance below the floor at any moment: zero, or minus the account's credit
limit (docs/credit-limits.md). It keeps per account only what the rules
need: balance, held, credit limit, debt, open holds and unspent blocks.

``CommandCheck`` proves every keyed command was applied once. A command's
events, its reservation record and its ``CommandRecord`` are saved in one
transaction, so they sit together in the log with one timestamp; the check
pairs them within that window. A key applied twice would need a second
``CommandRecord`` for the key, which the event store refuses (the record's id
is derived from the key), so a second application shows up as an account
event whose transaction saved no record for its key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

from ledger.audit.base import AuditContext, Check, Handler
from ledger.domain.credits import (
    ENTRY_NS,
    MAX_CREDIT_LIMIT,
    RECORD_NS,
    CommandRecord,
    CreditAccount,
    account_id_for,
    expiration_entry_id,
)
from ledger.domain.holds import RESERVATION_NS, HoldRecord, HoldStatus
from ledger.domain.pricing import price_problem
from ledger.views.credits import RELEASED_STATUS

#: How far an account's event may be recorded before the one preceding it. A
#: command reads the clock, then loads the account: a writer that commits in
#: between makes the next version a little older than the one it follows (and
#: hosts' clocks differ a little). More than this is reported.
TIME_SLACK = timedelta(seconds=60)

#: An open hold: job id, credits held, expires at, reserved at, the reserve key.
OpenHold = tuple[UUID, int, datetime, datetime, str | None]

_CLEAR_VERSION = ~((0xF000 << 64) | (0xC000 << 48))
_SET_VERSION = (5 << 76) | (0x8000 << 48)


def _deriver(namespace: UUID) -> Callable[[str], int]:
    """``uuid5(namespace, name).int`` without building UUIDs (a third of the
    cost; the audit derives an id for every keyed event)."""
    prefix = namespace.bytes

    def derive(name: str) -> int:
        digest = hashlib.sha1(prefix + name.encode(), usedforsecurity=False).digest()
        return int.from_bytes(digest[:16], "big") & _CLEAR_VERSION | _SET_VERSION

    return derive


entry_int_for = _deriver(ENTRY_NS)
record_int_for = _deriver(RECORD_NS)
reservation_int_for = _deriver(RESERVATION_NS)


class Account:
    """What the audit keeps per credit account."""

    __slots__ = (
        "account_id",
        "balance",
        "before",
        "blocks",
        "credit_holds",
        "credit_limit",
        "debt",
        "earmarks",
        "held",
        "holds",
        "lapses",
        "last_at",
        "opened_at",
        "opened_position",
        "user_id",
        "version",
    )

    def __init__(self, account_id: UUID, user_id: UUID | None, opened_at: datetime, opened_position: int) -> None:
        self.account_id = account_id
        self.user_id = user_id
        self.opened_at = opened_at
        self.opened_position = opened_position
        self.version = 0
        self.last_at = opened_at
        self.balance = 0
        self.held = 0
        self.credit_limit = 0
        self.debt = 0  # credits spent beyond the blocks
        self.credit_holds: dict[UUID, int] = {}  # open holds that hold credits on credit -> how many
        self.holds: dict[UUID, OpenHold] = {}
        #: Open hold -> the credits it earmarks per block (its allocations). A
        #: hold restored from a checkpoint written before they were kept has none.
        self.earmarks: dict[UUID, dict[str, int]] = {}
        self.blocks: dict[str, int] = {}  # block id as the events' draws name it -> unspent credits
        self.lapses: dict[str, datetime] = {}  # block id -> expires_at, for blocks that lapse
        #: (balance, held, available) before the event being replayed (not saved: it lives for one event).
        self.before = (0, 0, 0)

    @property
    def available(self) -> int:
        return self.balance - self.held + self.credit_limit

    @property
    def subject(self) -> str:
        return f"user {self.user_id}" if self.user_id is not None else f"account {self.account_id}"

    def save(self) -> dict[str, Any]:
        return {
            "account_id": str(self.account_id),
            "user_id": str(self.user_id) if self.user_id else None,
            "opened_at": self.opened_at.isoformat(),
            "opened_position": self.opened_position,
            "version": self.version,
            "last_at": self.last_at.isoformat(),
            "balance": self.balance,
            "held": self.held,
            "credit_limit": self.credit_limit,
            "debt": self.debt,
            "credit_holds": {str(r): c for r, c in self.credit_holds.items()},
            "holds": {
                str(r): [str(j), a, e.isoformat(), at.isoformat(), k] for r, (j, a, e, at, k) in self.holds.items()
            },
            "earmarks": {str(r): e for r, e in self.earmarks.items()},
            "blocks": self.blocks,
            "lapses": {b: t.isoformat() for b, t in self.lapses.items()},
        }

    @classmethod
    def restore(cls, data: Mapping[str, Any]) -> Account:
        account = cls(
            UUID(data["account_id"]),
            UUID(data["user_id"]) if data["user_id"] else None,
            datetime.fromisoformat(data["opened_at"]),
            int(data["opened_position"]),
        )
        account.version = int(data["version"])
        account.last_at = datetime.fromisoformat(data["last_at"])
        account.balance = int(data["balance"])
        account.held = int(data["held"])
        account.credit_limit = int(data.get("credit_limit", 0))  # saved before limits: none
        account.debt = int(data.get("debt", 0))
        account.credit_holds = {UUID(r): int(c) for r, c in data.get("credit_holds", {}).items()}
        account.holds = {
            UUID(r): (UUID(j), int(a), datetime.fromisoformat(e), datetime.fromisoformat(at), k)
            for r, (j, a, e, at, k) in data["holds"].items()
        }
        account.earmarks = {UUID(r): {b: int(c) for b, c in e.items()} for r, e in data.get("earmarks", {}).items()}
        account.blocks = {b: int(c) for b, c in data["blocks"].items()}
        account.lapses = {b: datetime.fromisoformat(t) for b, t in data["lapses"].items()}
        return account


class ReplaySink(Protocol):
    """Told about every posting and hold the replay derives (the views check)."""

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
    ) -> None: ...

    def hold_opened(self, position: int, account: Account, reservation_id: UUID, hold: OpenHold) -> None: ...

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
    ) -> None: ...


class NullSink:
    def posting(self, *args: Any) -> None:
        return None

    def hold_opened(self, *args: Any) -> None:
        return None

    def hold_closed(self, *args: Any) -> None:
        return None


ACCOUNTS = "accounts"


def shared_accounts(ctx: AuditContext) -> dict[int, Account]:
    """The replayed accounts, by ``account_id.int``: UUID hashes in Python,
    an int in C, and every event looks its account up."""
    accounts: dict[int, Account] = ctx.shared.setdefault(ACCOUNTS, {})
    return accounts


class AccountCheck(Check):
    name = "account"
    covers = (
        "per account: versions without gaps, time order, balance = sum of postings, draws from blocks that "
        "hold the credits, no spend, reserve or over-settle taking the available balance below zero (the balance "
        "below minus the credit limit), debt only when no free credits are left and repaid from live blocks, "
        "holds closed at most once and settled within what they held or with the extra covered"
    )

    def __init__(self, ctx: AuditContext) -> None:
        super().__init__(ctx)
        self.accounts = shared_accounts(ctx)
        self.sink: ReplaySink = NullSink()  # the views check, when it runs, replaces it
        ctx.shared["account_check"] = self
        self.totals = {"granted": 0, "debited": 0, "settled": 0, "expired": 0}
        self.postings = 0

    def handlers(self) -> Mapping[type, Handler]:
        return {
            CreditAccount.Opened: self.opened,
            CreditAccount.Granted: self.granted,
            CreditAccount.Debited: self.debited,
            CreditAccount.Reserved: self.reserved,
            CreditAccount.Settled: self.settled,
            CreditAccount.Released: self.released,
            CreditAccount.Expired: self.expired,
            CreditAccount.LimitSet: self.limit_set,
            CreditAccount.Repaid: self.repaid,
            # Thresholds and their crossings move no credits (ledger.domain.thresholds).
            CreditAccount.BalanceThresholdsSet: self.stepped,
            CreditAccount.PlanThresholdsAdopted: self.stepped,
            CreditAccount.BalanceLow: self.stepped,
            CreditAccount.BalanceDepleted: self.stepped,
            CreditAccount.BalanceRecovered: self.stepped,
        }

    def stepped(self, position: int, event: Any) -> None:
        """An account event that moves no credits: its place in the sequence."""
        self._step(position, event)

    # -- every event ------------------------------------------------------------

    def _step(self, position: int, event: Any) -> Account:
        """The event's account, after checking the event's version and time."""
        account = self.accounts.get(event.originator_id.int)
        if account is None:
            self.report(
                position, f"account {event.originator_id}", "event of an account never opened", check="sequence"
            )
            account = Account(event.originator_id, None, event.timestamp, position)
            account.version = event.originator_version - 1
            self.accounts[event.originator_id.int] = account
        version = event.originator_version
        if version != account.version + 1:
            gap = "events are missing" if version > account.version + 1 else "an event is repeated or out of order"
            self.report(
                position,
                account.subject,
                f"version {version} follows version {account.version}: {gap}",
                check="sequence",
            )
        account.version = version
        account.before = (account.balance, account.held, account.available)
        if event.timestamp < account.last_at - TIME_SLACK:
            self.report(
                position,
                account.subject,
                f"recorded at {event.timestamp.isoformat()}, before an earlier event ({account.last_at.isoformat()})",
                check="time",
            )
        account.last_at = max(account.last_at, event.timestamp)
        return account

    def _never_negative(self, position: int, account: Account) -> None:
        """After a spend or a reserve: available (balance - held + limit) is
        not below zero, so the balance is not below minus the limit."""
        if account.held < 0 or account.available < 0:
            floor = f", below the floor of -{account.credit_limit}" if account.credit_limit else ""
            self.report(
                position,
                account.subject,
                f"balance {account.balance}, held {account.held}, available {account.available}: below zero{floor}",
                check="negative",
            )

    def _on_credit(self, position: int, account: Account, short: int, free: int) -> None:
        """A draw fell ``short`` credits of its amount: that part is debt, which
        the account may take on only once no free credits are left."""
        if short < 0:
            return  # reported by _draw
        if short and free:
            self.report(
                position,
                account.subject,
                f"takes {short} credits on credit with {free} free credits left in its blocks",
                check="negative",
            )
        account.debt += short

    def _free(self, account: Account, at: datetime) -> int:
        """Unspent credits in live blocks that no open hold earmarks (holds'
        earmarks are not kept: a live block's credits beyond held - unbacked)."""
        live = sum(c for b, c in account.blocks.items() if not (b in account.lapses and account.lapses[b] <= at))
        # balance = blocks - debt; held = earmarks + unbacked, and earmarks
        # are in blocks: free >= live - (held - 0). A lower bound is enough
        # to tell that none are left when it is 0.
        return max(0, live - account.held)

    def _draw(
        self,
        position: int,
        account: Account,
        draws: Any,
        amount: int,
        at: datetime,
        *,
        lapsed: bool,
        short: bool = False,
        earmarks: Mapping[str, int] | None = None,
    ) -> int:
        """Takes credits from blocks; ``lapsed`` allows lapsed blocks (a hold's
        earmarks: with ``earmarks``, the hold's, only those), ``short`` draws
        that fall short of ``amount`` (the rest on credit). Returns by how much
        they fell short."""
        total = 0
        blocks = account.blocks
        for block_id, credits in draws:
            total += credits
            remaining = blocks.get(block_id)
            if remaining is None or not 0 < credits <= remaining:
                self.report(
                    position,
                    account.subject,
                    f"draws {credits} credits from block {block_id}, which has {remaining or 0}",
                    check="block",
                )
                if remaining is None:
                    continue
            lapses_at = account.lapses.get(block_id)
            if lapses_at is not None and lapses_at <= at:
                if not lapsed:
                    self.report(
                        position,
                        account.subject,
                        f"draws from block {block_id}, lapsed at {lapses_at.isoformat()}",
                        check="block",
                    )
                elif earmarks is not None and credits > earmarks.get(block_id, 0):
                    # Lapsed credits are the expiry's, but for those a hold earmarked while they were live.
                    self.report(
                        position,
                        account.subject,
                        f"draws {credits} credits from block {block_id}, lapsed at {lapses_at.isoformat()}, "
                        f"which its hold earmarks {earmarks.get(block_id, 0)} of",
                        check="block",
                    )
            remaining -= credits
            if remaining > 0:
                blocks[block_id] = remaining
            else:
                del blocks[block_id]
                account.lapses.pop(block_id, None)
        if total > amount or (total < amount and not short):
            self.report(
                position, account.subject, f"draws total {total} credits for an amount of {amount}", check="block"
            )
        return amount - total

    def _derived(self, position: int, account: Account, what: str, actual: UUID, expected: int) -> None:
        if actual.int != expected:
            self.report(
                position,
                account.subject,
                f"{what} {actual} is not the one its key derives ({UUID(int=expected)})",
                check="key",
            )

    # -- per event type ----------------------------------------------------------

    def opened(self, position: int, event: Any) -> None:
        account_id = event.originator_id
        if account_id.int in self.accounts or event.originator_version != 1:
            self.report(position, f"user {event.user_id}", "account opened twice", check="sequence")
        if account_id != account_id_for(event.user_id):
            self.report(
                position, f"user {event.user_id}", f"account id {account_id} is not the user's", check="sequence"
            )
        account = Account(account_id, event.user_id, event.timestamp, position)
        account.version = event.originator_version
        self.accounts[account_id.int] = account

    def granted(self, position: int, event: Any) -> None:
        account = self._step(position, event)
        amount = event.amount
        block_id = str(event.entry_id)
        if amount <= 0:
            self.report(position, account.subject, f"grant of {amount} credits", check="balance")
        if block_id in account.blocks:
            self.report(position, account.subject, f"block {block_id} granted twice", check="block")
        if event.expires_at is not None:
            if event.expires_at <= event.timestamp:
                self.report(position, account.subject, "grant lapsed when it was recorded", check="block")
            account.lapses[block_id] = event.expires_at
        account.blocks[block_id] = account.blocks.get(block_id, 0) + amount
        account.balance += amount
        self.totals["granted"] += amount
        self.postings += 1
        self._derived(position, account, "entry id", event.entry_id, entry_int_for(event.key))
        self.sink.posting(
            position,
            account,
            event,
            amount,
            event.kind,
            event.description,
            event.reference_type,
            event.reference_id,
            event.key,
        )

    def debited(self, position: int, event: Any) -> None:
        account = self._step(position, event)
        amount = event.amount
        if amount <= 0:
            self.report(position, account.subject, f"debit of {amount} credits", check="balance")
        free = self._free(account, event.timestamp)
        short = self._draw(position, account, event.draws, amount, event.timestamp, lapsed=False, short=True)
        self._on_credit(position, account, short, max(0, free - (amount - short)))
        account.balance -= amount
        self.totals["debited"] += amount
        self.postings += 1
        if short > 0 or event.kind != "refund":
            # A refund's claw back takes free credits only, and is never refused.
            self._never_negative(position, account)
        self._derived(position, account, "entry id", event.entry_id, entry_int_for(event.key))
        self.sink.posting(
            position,
            account,
            event,
            -amount,
            event.kind,
            event.description,
            event.reference_type,
            event.reference_id,
            event.key,
        )

    def reserved(self, position: int, event: Any) -> None:
        account = self._step(position, event)
        reservation_id = event.reservation_id
        amount = event.amount
        if reservation_id in account.holds:
            self.report(position, account.subject, f"hold {reservation_id} reserved twice", check="hold")
            account.held -= account.holds[reservation_id][1]
        if amount <= 0 or event.expires_at <= event.timestamp:
            self.report(
                position,
                account.subject,
                f"hold {reservation_id} of {amount} credits expiring at "
                f"{event.expires_at.isoformat()} was void when reserved",
                check="hold",
            )
        allocated = 0
        for block_id, credits in event.allocations:
            allocated += credits
            if account.blocks.get(block_id, 0) < credits:
                self.report(
                    position,
                    account.subject,
                    f"hold {reservation_id} earmarks {credits} credits of "
                    f"block {block_id}, which has {account.blocks.get(block_id, 0)}",
                    check="block",
                )
        if allocated > amount or (allocated < amount and account.credit_limit == 0):
            # Short of the amount, the rest is held on credit: only with a limit.
            self.report(
                position,
                account.subject,
                f"hold {reservation_id} allocates {allocated} credits for {amount}",
                check="block",
            )
        if allocated < amount:
            account.credit_holds[reservation_id] = amount - allocated
        earmarks: dict[str, int] = {}
        for block_id, credits in event.allocations:
            earmarks[block_id] = earmarks.get(block_id, 0) + credits
        account.earmarks[reservation_id] = earmarks
        hold: OpenHold = (event.job_id, amount, event.expires_at, event.timestamp, event.key)
        account.holds[reservation_id] = hold
        account.held += amount
        self._never_negative(position, account)
        self._derived(position, account, "reservation id", reservation_id, reservation_int_for(event.key))
        self.sink.hold_opened(position, account, reservation_id, hold)

    def _close(self, position: int, account: Account, reservation_id: UUID, how: str) -> OpenHold | None:
        hold = account.holds.pop(reservation_id, None)
        if hold is None:
            self.report(
                position,
                account.subject,
                f"{how} hold {reservation_id}, which is not open on this account "
                "(closed before, or never reserved here)",
                check="hold",
            )
            return None
        account.held -= hold[1]
        account.credit_holds.pop(reservation_id, None)
        account.earmarks.pop(reservation_id, None)
        return hold

    def settled(self, position: int, event: Any) -> None:
        account = self._step(position, event)
        reservation_id = event.reservation_id
        amount = event.amount
        earmarks = account.earmarks.get(reservation_id)
        hold = self._close(position, account, reservation_id, "settles")
        if hold is not None:
            if event.timestamp >= hold[2]:
                self.report(
                    position,
                    account.subject,
                    f"settles hold {reservation_id} after it expired at {hold[2].isoformat()}",
                    check="hold",
                )
            extra = amount - hold[1]
            available = account.available - hold[1]
            if extra > 0 and extra > available:
                self.report(
                    position,
                    account.subject,
                    f"settles {amount} credits on hold {reservation_id} of "
                    f"{hold[1]}: the extra {extra} exceeds the {available} available",
                    check="hold",
                )
        if amount <= 0:
            self.report(position, account.subject, f"settles hold {reservation_id} for {amount} credits", check="hold")
        short = self._draw(
            position, account, event.draws, amount, event.timestamp, lapsed=True, short=True, earmarks=earmarks
        )
        # The hold's earmarks first, then free credits: only then on credit.
        self._on_credit(position, account, short, self._free(account, event.timestamp))
        account.balance -= amount
        self.totals["settled"] += amount
        self.postings += 1
        if hold is None or amount > hold[1]:
            # Within what the hold held, a settle moves nothing below where the
            # hold already had it (the limit may have been lowered since).
            self._never_negative(position, account)
        self._derived(position, account, "entry id", event.entry_id, entry_int_for(event.key))
        if hold is not None:
            self.sink.hold_closed(position, account, reservation_id, hold, "settled", amount, event.timestamp, None)
        job = str(hold[0]) if hold is not None else None
        self.sink.posting(position, account, event, -amount, "generation_use", "", "generation_job", job, event.key)

    def released(self, position: int, event: Any) -> None:
        account = self._step(position, event)
        reservation_id = event.reservation_id
        hold = self._close(position, account, reservation_id, "releases")
        if hold is None:
            return
        if event.key is None and event.timestamp < hold[2]:
            # Only the sweep releases without a key, and only holds that are due.
            self.report(
                position,
                account.subject,
                f"hold {reservation_id} released as expired before its expiry ({hold[2].isoformat()})",
                check="hold",
            )
        self.sink.hold_closed(
            position, account, reservation_id, hold, RELEASED_STATUS, None, event.timestamp, event.reason
        )

    def expired(self, position: int, event: Any) -> None:
        account = self._step(position, event)
        block_id = str(event.block_id)
        lapses_at = account.lapses.get(block_id)
        if lapses_at is None or lapses_at > event.timestamp:
            self.report(
                position, account.subject, f"expires credits of block {block_id}, which had not lapsed", check="block"
            )
        self._draw(position, account, [[block_id, event.amount]], event.amount, event.timestamp, lapsed=True)
        account.balance -= event.amount
        self.totals["expired"] += event.amount
        self.postings += 1
        # An expiry takes free credits only: what the open holds earmark
        # (held, less what they hold on credit) stays in the blocks. (The
        # floor binds debits; credits that lapse are not one.)
        earmarked = account.held - sum(account.credit_holds.values())
        if account.balance + account.debt < earmarked:
            self.report(
                position,
                account.subject,
                f"expires credits open holds earmark: the blocks keep {account.balance + account.debt} credits, "
                f"the holds earmark {earmarked}",
                check="negative",
            )
        expected = expiration_entry_id(account.account_id, event.originator_version).int
        if event.entry_id.int != expected:
            # 0.1 derived expiration ids in the entry namespace; both are genuine.
            expected_v0_1 = entry_int_for(f"expiration:{account.account_id}:{event.originator_version}")
            expected = expected_v0_1 if event.entry_id.int == expected_v0_1 else expected
        self._derived(position, account, "expiration entry id", event.entry_id, expected)
        self.sink.posting(
            position,
            account,
            event,
            -event.amount,
            "expiration",
            "unused credits lapsed",
            "credit_block",
            block_id,
            None,
        )

    def limit_set(self, position: int, event: Any) -> None:
        account = self._step(position, event)
        limit = event.limit_credits
        if type(limit) is not int or not 0 <= limit <= MAX_CREDIT_LIMIT:
            self.report(position, account.subject, f"credit limit set to {limit!r}", check="limit")
            return
        account.credit_limit = limit

    def repaid(self, position: int, event: Any) -> None:
        account = self._step(position, event)
        amount = event.amount
        if not 0 < amount <= account.debt:
            self.report(
                position, account.subject, f"repays {amount} credits of a debt of {account.debt}", check="balance"
            )
        self._draw(position, account, event.draws, amount, event.timestamp, lapsed=False)
        account.debt -= amount

    # -- the end ------------------------------------------------------------------

    def finish(self) -> None:
        for account in self.accounts.values():
            unspent = sum(account.blocks.values())
            if unspent - account.debt != account.balance:
                self.report(
                    None,
                    account.subject,
                    f"balance {account.balance} but its blocks hold {unspent} credits"
                    + (f", less a debt of {account.debt}" if account.debt else ""),
                    check="balance",
                )
            if account.held != sum(h[1] for h in account.holds.values()):
                self.report(
                    None, account.subject, f"held {account.held} but its open holds sum differently", check="balance"
                )
        t = self.totals
        overall = t["granted"] - t["debited"] - t["settled"] - t["expired"]
        balances = sum(a.balance for a in self.accounts.values())
        if overall != balances:
            self.report(None, "all accounts", f"balances sum to {balances}, postings to {overall}", check="balance")

    def summary(self) -> dict[str, Any]:
        return {
            "accounts": len(self.accounts),
            "postings": self.postings,
            "open_holds": sum(len(a.holds) for a in self.accounts.values()),
            "credits": {
                **self.totals,
                "balance": sum(a.balance for a in self.accounts.values()),
                "held": sum(a.held for a in self.accounts.values()),
            },
        }

    def save(self) -> dict[str, Any]:
        return {
            "accounts": [a.save() for a in self.accounts.values()],
            "totals": self.totals,
            "postings": self.postings,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self.accounts.clear()
        for data in state["accounts"]:
            account = Account.restore(data)
            self.accounts[account.account_id.int] = account
        self.totals = {k: int(v) for k, v in state["totals"].items()}
        self.postings = int(state["postings"])


# ---------------------------------------------------------------------- commands

# The account events a command records, as small codes: the window of one
# transaction keeps ints and strings only, which the garbage collector does not
# track (holding a batch's decoded events made the collector a third of the cost).
GRANTED, DEBITED, RESERVED, SETTLED, RELEASED, LIMIT_SET = range(1, 7)
_EVENT_NAMES = {
    GRANTED: "Granted",
    DEBITED: "Debited",
    RESERVED: "Reserved",
    SETTLED: "Settled",
    RELEASED: "Released",
    LIMIT_SET: "LimitSet",
}
_COMMAND_CODES: dict[str, tuple[int, ...]] = {
    "grant": (GRANTED,),
    "spend": (DEBITED,),
    "adjust": (GRANTED, DEBITED),
    "reserve": (RESERVED,),
    "reserve_for_job": (RESERVED,),
    "settle": (SETTLED,),
    "release": (RELEASED,),
    "set_credit_limit": (LIMIT_SET,),
}
_PAIR_FIELDS = {"reserved": ("user", "job", "amount", "expires_at"), "closed": ("status", "settled", "reason")}
_ID_FIELDS = frozenset({"user", "job"})

#: An applied keyed event: position, event code, account id, signed amount, entry id, reservation id.
Applied = tuple[int, int, int, int, int | None, int | None]
#: A record's receipt: position, command, user, amount, entry, reservation, balance, held, available;
#: then what its arguments say of the user, the signed amount and the hold (``_ABSENT`` where they do not).
Said = tuple[int, str, Any, Any, Any, Any, Any, Any, Any, Any, Any, Any]

#: What a record's arguments do not name.
_ABSENT: Any = object()
#: Per command, the argument that is its signed amount as the account event applies it.
_ARGUED_AMOUNT: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "grant": lambda a: a.get("amount_credits", _ABSENT),
    "spend": lambda a: (
        -a["amount_credits"] if type(a.get("amount_credits")) is int else a.get("amount_credits", _ABSENT)
    ),
    "settle": lambda a: (
        -a["actual_credits"] if type(a.get("actual_credits")) is int else a.get("actual_credits", _ABSENT)
    ),
    "adjust": lambda a: a.get("delta_credits", _ABSENT),
}


#: Per command, the terms of its event that its arguments name (besides the user, amount and hold).
_TERMS: dict[str, tuple[str, ...]] = {
    "spend": ("kind", "description", "reference_type", "reference_id"),
    "grant": ("kind", "description", "reference_type", "reference_id", "expires_at", "actor"),
    "reserve": ("amount_credits", "job_id", "expires_at"),
    "set_credit_limit": ("limit_credits", "reason", "actor"),
}


def _text(value: Any) -> Any:
    """A str enum (a kind) as its text; anything else as it is."""
    return str.__str__(value) if isinstance(value, str) else value


def _moment(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _posting_terms(event: Any) -> tuple[Any, ...]:
    return (_text(event.kind), event.description, event.reference_type, event.reference_id)


def _seconds(duration: Any) -> timedelta | None:
    """``PT3600S`` or ``PT1.5S`` (a command's canonical duration) as a timedelta."""
    if not isinstance(duration, str) or not duration.startswith("PT") or not duration.endswith("S"):
        return None
    whole, _, fraction = duration[2:-1].partition(".")
    if not whole.isdigit() or not (fraction == "" or fraction.isdigit()) or len(fraction) > 6:
        return None
    return timedelta(seconds=int(whole), microseconds=int(fraction.ljust(6, "0")) if fraction else 0)


def _argued_terms(command: str, arguments: Mapping[str, Any], at: datetime) -> tuple[Any, ...]:
    """What a record's arguments say of its event's ``_TERMS`` (``_ABSENT`` where they do not): an
    expiry given as a lifetime (``expires_in``) ends that long after the command was recorded."""
    names = _TERMS[command]
    argued = [arguments.get(name, _ABSENT) for name in names]
    if "expires_at" in names and arguments.get("expires_in") is not None:
        lifetime = _seconds(arguments["expires_in"])
        at_end = (at + lifetime).isoformat() if lifetime is not None else arguments["expires_in"]
        argued[names.index("expires_at")] = at_end
    return tuple(argued)


def _argued(command: str, arguments: Any) -> tuple[Any, Any, Any]:
    """What a record's arguments say of the user and the hold (their ids as
    text, as arguments keep them) and the signed amount."""
    if not isinstance(arguments, dict):
        return _ABSENT, _ABSENT, _ABSENT
    amount = _ARGUED_AMOUNT[command](arguments) if command in _ARGUED_AMOUNT else _ABSENT
    return arguments.get("user_id", _ABSENT), amount, arguments.get("reservation_id", _ABSENT)


def _int(value: Any) -> Any:
    """A UUID as its int (how the window compares ids); anything else as it is.
    Receipts written by 0.1 hold ids as text."""
    if isinstance(value, UUID):
        return value.int
    if isinstance(value, str):
        try:
            return UUID(value).int
        except ValueError:
            return value
    return value


def _show_id(value: Any) -> str:
    # Ids travel as 128-bit ints; show them as UUIDs again.
    return str(UUID(int=value)) if isinstance(value, int) else str(value)


class CommandCheck(Check):
    name = "key"
    covers = (
        "every keyed command applied once: each account event with a key is saved with the one CommandRecord "
        "of its key, whose receipt matches; every hold has its HoldRecord, closed once, as the account says"
    )

    def __init__(self, ctx: AuditContext) -> None:
        super().__init__(ctx)
        self.accounts = shared_accounts(ctx)
        self.records = 0
        self.user_texts: dict[int, str] = {}  # account id's int -> its user id as text
        self._clear()

    def _clear(self) -> None:
        # All of this lives for one transaction's events only.
        self.keyed: dict[str, Applied] = {}
        self.unpaired_records: dict[str, Said] = {}
        self.holds: dict[tuple[str, int], tuple[int, tuple[Any, ...], str]] = {}
        self.last_keyed: dict[int, str] = {}  # account id's int -> the last key applied to it
        #: Key -> (balance, held, available) its command left: the state before the next keyed event on its account.
        self.left: dict[str, tuple[int, int, int]] = {}
        self.receipts: dict[str, tuple[int, Any, Any, Any]] = {}  # key -> record position, balance, held, available
        #: Key -> its event's terms (``_TERMS``), as the event says, and as its record's arguments do.
        self.terms: dict[str, tuple[Any, ...]] = {}
        self.argued_terms: dict[str, tuple[Any, ...]] = {}

    def handlers(self) -> Mapping[type, Handler]:
        return {
            CreditAccount.Granted: self.granted,
            CreditAccount.Debited: self.debited,
            CreditAccount.Reserved: self.reserved,
            CreditAccount.Settled: self.settled,
            CreditAccount.Released: self.released,
            CreditAccount.LimitSet: self.limit_set,
            HoldRecord.Reserved: self.reservation_reserved,
            HoldRecord.Closed: self.reservation_closed,
            CommandRecord.Recorded: self.recorded,
        }

    # -- account events ------------------------------------------------------------------

    def granted(self, position: int, event: Any) -> None:
        if event.key is not None:
            self.terms[event.key] = (*_posting_terms(event), _moment(event.expires_at), event.actor)
        self._applied(position, event, GRANTED, event.amount, event.entry_id.int, None)

    def debited(self, position: int, event: Any) -> None:
        if event.key is not None:
            self.terms[event.key] = _posting_terms(event)
        self._applied(position, event, DEBITED, -event.amount, event.entry_id.int, None)

    def reserved(self, position: int, event: Any) -> None:
        reservation = event.reservation_id.int
        if event.key is not None:
            self.terms[event.key] = (event.amount, str(event.job_id), _moment(event.expires_at))
        self._applied(position, event, RESERVED, 0, None, reservation)
        account = self.accounts.get(event.originator_id.int)
        user = account.user_id.int if account is not None and account.user_id is not None else None
        self._pair(
            "reserved", reservation, position, (user, event.job_id.int, event.amount, event.expires_at), "account"
        )

    def settled(self, position: int, event: Any) -> None:
        reservation = event.reservation_id.int
        self._applied(position, event, SETTLED, -event.amount, event.entry_id.int, reservation)
        self._pair("closed", reservation, position, (HoldStatus.SETTLED, event.amount, None), "account")

    def released(self, position: int, event: Any) -> None:
        reservation = event.reservation_id.int
        self._applied(position, event, RELEASED, 0, None, reservation)
        self._pair("closed", reservation, position, (HoldStatus.RELEASED, None, event.reason), "account")

    def limit_set(self, position: int, event: Any) -> None:
        if event.key is not None:
            self.terms[event.key] = (event.limit_credits, event.reason, event.actor)
        self._applied(position, event, LIMIT_SET, 0, None, None)

    # -- keys ---------------------------------------------------------------------

    def _applied(
        self, position: int, event: Any, code: int, amount: int, entry: int | None, reservation: int | None
    ) -> None:
        key = event.key
        if key is None:
            return  # the sweep's releases: no command, no record
        earlier = self.keyed.get(key)
        if earlier is not None:
            self.report(
                position, f"key {key!r}", f"applied twice in one transaction (positions {earlier[0]} and {position})"
            )
        account = event.originator_id.int
        previous = self.last_keyed.get(account)
        replayed = self.accounts.get(account)
        if previous is not None and previous != key and replayed is not None:
            # A batch saves its account events first: the command before this
            # one on the account left what the account held before this event.
            self.left[previous] = replayed.before
        self.last_keyed[account] = key
        applied: Applied = (position, code, account, amount, entry, reservation)
        said = self.unpaired_records.pop(key, None)
        if said is not None:
            self._match(key, applied, said)
        else:
            self.keyed[key] = applied

    def recorded(self, position: int, event: Any) -> None:
        self.records += 1
        key = event.key
        if event.originator_id.int != record_int_for(key) or event.originator_version != 1:
            self.report(
                position,
                f"key {key!r}",
                f"CommandRecord {event.originator_id} v{event.originator_version} is not the key's one record",
            )
        r = event.receipt
        if r.get("key", key) != key or r.get("command", event.command) != event.command:
            self.report(
                position,
                f"key {key!r}",
                f"receipt is of key {r.get('key')!r}, command {r.get('command')!r}: the record is of key {key!r}, "
                f"command {event.command!r}",
            )
        arguments = event.arguments
        if arguments is not None and not isinstance(arguments, dict):  # None: written before they were kept
            self.report(position, f"key {key!r}", f"its arguments are not the command's arguments: {arguments!r}")
        if event.command not in _COMMAND_CODES:
            return  # a command this check does not know: nothing to pair
        if event.command in _TERMS and isinstance(arguments, dict):
            self.argued_terms[key] = _argued_terms(event.command, arguments, event.timestamp)
        said: Said = (
            position,
            event.command,
            _int(r.get("user_id")),
            r.get("amount_credits"),
            _int(r.get("entry_id")),
            _int(r.get("reservation_id")),
            r.get("balance_credits"),
            r.get("held_credits"),
            r.get("available_credits", _ABSENT),
            *_argued(event.command, arguments),
        )
        applied = self.keyed.pop(key, None)
        if applied is not None:
            self._match(key, applied, said)
        else:
            self.unpaired_records[key] = said

    def _match(self, key: str, applied: Applied, said: Said) -> None:
        position, code, account_int, amount, entry, reservation = applied
        record_position, command = said[0], said[1]
        if code not in _COMMAND_CODES[command]:
            self.report(
                record_position,
                f"key {key!r}",
                f"recorded as {command} but applied as {_EVENT_NAMES[code]} at position {position}",
            )
            return
        account = self.accounts.get(account_int)
        user = account.user_id.int if account is not None and account.user_id is not None else None
        if said[2:6] != (user, amount, entry, reservation):
            said_user, said_amount, said_entry, said_hold = said[2:6]
            self.report(
                record_position,
                f"key {key!r}",
                f"receipt says user {_show_id(said_user)}, amount {said_amount}, entry {_show_id(said_entry)}, "
                f"hold {_show_id(said_hold)}; the event at position {position} says user {_show_id(user)}, "
                f"amount {amount}, entry {_show_id(entry)}, hold {_show_id(reservation)}",
            )
        argued_user, argued_amount, argued_hold = said[9:12]
        differ: list[tuple[str, Any, Any]] = []
        if argued_user is not _ABSENT and argued_user != self._user_text(account_int, account):
            differ.append(("user", argued_user, _show_id(user)))
        if argued_amount is not _ABSENT and argued_amount != amount:
            differ.append(("amount", argued_amount, amount))
        if argued_hold is not _ABSENT and argued_hold != (None if reservation is None else str(UUID(int=reservation))):
            differ.append(("hold", argued_hold, _show_id(reservation)))
        self._report_arguments(key, record_position, position, differ)
        self._match_terms(key, command, record_position, position)
        self.receipts[key] = (record_position, said[6], said[7], said[8])

    def _user_text(self, account_int: int, account: Account | None) -> str | None:
        """The account's user id as a command's arguments write it."""
        text = self.user_texts.get(account_int)
        if text is None and account is not None and account.user_id is not None:
            text = self.user_texts[account_int] = str(account.user_id)
        return text

    def _match_terms(self, key: str, command: str, record_position: int, position: int) -> None:
        """An event's terms (a posting's kind, texts and expiry, a hold's size, job and expiry, a
        limit) as its command's arguments say them."""
        argued, terms = self.argued_terms.pop(key, None), self.terms.pop(key, None)
        if argued is None or terms is None or len(terms) != len(_TERMS[command]):
            return  # a command with no terms here, or recorded as one and applied as another (named above)
        differ = [
            (n, a, t) for n, a, t in zip(_TERMS[command], argued, terms, strict=True) if a is not _ABSENT and a != t
        ]
        self._report_arguments(key, record_position, position, differ)

    def _report_arguments(
        self, key: str, record_position: int, position: int, differ: list[tuple[str, Any, Any]]
    ) -> None:
        """Names what a record's arguments say (name, argued, event's) that its event at ``position`` does not."""
        if differ:
            self.report(
                record_position,
                f"key {key!r}",
                f"its arguments say {', '.join(f'{n} {a}' for n, a, _ in differ)}; the event at position {position} "
                f"says {', '.join(f'{n} {e}' for n, _, e in differ)}",
            )

    # -- reservation records ----------------------------------------------------------

    def _pair(self, kind: str, reservation: int, position: int, values: tuple[Any, ...], side: str) -> None:
        other = self.holds.pop((kind, reservation), None)
        if other is None:
            self.holds[(kind, reservation)] = (position, values, side)
            return
        subject = f"reservation {UUID(int=reservation)}"
        if other[2] == side:
            self.report(position, subject, f"{kind} twice (positions {other[0]} and {position})", check="reservation")
        elif other[1] != values:
            account, record = (other, (position, values)) if side == "record" else ((position, values), other)
            show = {name: _show_id if name in _ID_FIELDS else str for name in _PAIR_FIELDS[kind]}
            diffs = "; ".join(
                f"{name}: the account says {show[name](a)} (position {account[0]}), the HoldRecord says "
                f"{show[name](b)} (position {record[0]})"
                for name, a, b in zip(_PAIR_FIELDS[kind], account[1], record[1], strict=True)
                if a != b
            )
            self.report(position, subject, f"{kind}: {diffs}", check="reservation")

    def reservation_reserved(self, position: int, event: Any) -> None:
        if event.originator_version != 1:
            self.report(
                position,
                f"reservation {event.originator_id}",
                f"reserved at version {event.originator_version}",
                check="reservation",
            )
        values = (event.user_id.int, event.job_id.int, event.amount, event.expires_at)
        self._pair("reserved", event.originator_id.int, position, values, "record")
        price = getattr(event, "price", None)
        problem = None if price is None else price_problem(price, event.amount)
        if problem is not None:
            self.report(position, f"reservation {event.originator_id}", f"priced hold: {problem}", check="reservation")

    def reservation_closed(self, position: int, event: Any) -> None:
        if event.originator_version != 2:
            self.report(
                position,
                f"reservation {event.originator_id}",
                f"closed at version {event.originator_version}: a hold closes once, as version 2",
                check="reservation",
            )
        values = (event.status, event.settled_credits, event.release_reason)
        self._pair("closed", event.originator_id.int, position, values, "record")

    # -- transaction boundaries ----------------------------------------------------------

    def boundary(self) -> None:
        """The events of one transaction are over: whatever is unpaired is a finding."""
        for key, applied in self.keyed.items():
            self.report(
                applied[0],
                f"key {key!r}",
                f"{_EVENT_NAMES[applied[1]]} carries the key, but no CommandRecord for it was saved with it: "
                "applied without a record, or applied again",
            )
        for key, said in self.unpaired_records.items():
            self.report(
                said[0],
                f"key {key!r}",
                f"CommandRecord for {said[1]}, but no account event with the key was saved with it",
            )
        for (kind, reservation), (position, _, side) in self.holds.items():
            missing = "HoldRecord" if side == "account" else "account event"
            self.report(
                position,
                f"reservation {UUID(int=reservation)}",
                f"{kind} with no {missing} saved with it",
                check="reservation",
            )
        self._check_receipts()
        self._clear()

    def _check_receipts(self) -> None:
        # A receipt was computed from the state its command left: for the last
        # command on an account in a transaction, the state the transaction
        # left; for one before it, the state before the next keyed event.
        for account_int, key in self.last_keyed.items():
            account = self.accounts.get(account_int)
            if account is not None:
                self.left[key] = (account.balance, account.held, account.available)
        for key, (position, balance, held, available) in self.receipts.items():
            left = self.left.get(key)
            if left is None:
                continue
            if available is _ABSENT:
                available = left[2]  # receipts written by 0.1 may not say
            if (balance, held, available) != left:
                self.report(
                    position,
                    f"key {key!r}",
                    f"receipt says balance {balance}, held {held}, available {available}; the replay says balance "
                    f"{left[0]}, held {left[1]}, available {left[2]}",
                )

    def finish(self) -> None:
        self.boundary()

    def summary(self) -> dict[str, Any]:
        return {"command_records": self.records}

    def save(self) -> dict[str, Any]:
        return {"records": self.records}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.records = int(state["records"])


class SnapshotAuditCheck(Check):
    """Every stored snapshot against the replay of its account's events up to
    its version (``_snapshots.check_snapshots``). Snapshots are not in the
    event log, so this reads them, and the events of the accounts that have
    them, in a pass of its own once the replay is done."""

    name = "snapshot"
    covers = (
        "every stored snapshot equals the replay of its account's events up to its version, and carries the "
        "seal of that state and of the event at that version"
    )

    def __init__(self, ctx: AuditContext) -> None:
        super().__init__(ctx)
        self.found: dict[str, int] = {}

    def finish(self) -> None:
        from ledger.audit.snapshots import check_snapshots

        result = check_snapshots(self.ctx.ledger)
        for problem in result.problems:
            self.report(None, problem.subject, f"snapshot at version {problem.version}: {problem.message}")
        hidden = result.problems_total - len(result.problems)
        if hidden:
            self.ctx.findings.counts[self.name] += hidden
        if result.unsealed:
            self.ctx.notes.append(
                f"{result.unsealed} snapshots carry no seal (written before snapshots were sealed): they match "
                "their events, and the ledger replays the events rather than use them"
            )
        self.found = {"snapshots": result.snapshots, "snapshotted_accounts": result.accounts}

    def summary(self) -> dict[str, Any]:
        return dict(self.found)
