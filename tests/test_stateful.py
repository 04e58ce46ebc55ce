"""Stateful property test: random command sequences against a real ``Ledger``,
checked step by step against a small reference model written here.

The model is plain Python and keeps, per account, the state the ledger has
*recorded*: credit blocks (remaining credits, expiry, grant order) and open
holds (amount, expiry, which block credits they earmark), and its credit
limit with the debt spent on credit beyond the blocks (docs/credit-limits.md:
a hold beyond the free credits earmarks less than it holds, free credits repay
debt at once, and credit in use never exceeds the limit except after the limit
was lowered below it, until it is back within). Due effects (expired
holds, lapsed credits) are recorded only when a command or a sweep touches the
account, while ``balance()`` applies them in memory; the model does the same,
so it can also predict exactly what ``expire_holds()`` records.

Every backend runs the same machine. Memory gets a new store per run; SQLite
and PostgreSQL share one store per test, so each run uses fresh user ids and a
fresh idempotency-key prefix, and sweeps its leftover holds when it ends.
"""

from __future__ import annotations

import contextlib
from copy import deepcopy
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal
from uuid import UUID, uuid4

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ledger import (
    CreditKind,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidArgument,
    Ledger,
    LedgerError,
    ManualClock,
    Receipt,
    ReservationClosed,
    Threshold,
    UnknownAccount,
    UnknownReservation,
)

START = datetime(2026, 1, 1, tzinfo=UTC)
#: Past every hold a run can open (runs span at most a few years): the sweep at
#: the end of a run closes them all, so later runs sharing the store see none.
FAR_FUTURE = datetime(2100, 1, 1, tzinfo=UTC)
N_USERS = 3

SETTINGS = settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

Op = Literal["grant", "spend", "reserve", "settle", "release", "adjust", "limit"]
OPS: list[Op] = ["grant", "spend", "reserve", "settle", "release", "adjust", "limit"]
#: Commands whose user_id only routes the command and is not part of its arguments.
ROUTED: frozenset[str] = frozenset({"settle", "release"})
#: Commands that post a balance change and so name an entry in their receipt.
POSTING: frozenset[str] = frozenset({"grant", "spend", "settle", "adjust"})
#: The commands' own names where the test's short name differs.
COMMAND_NAMES = {"limit": "set_credit_limit"}
#: Receipt fields a replay does not repeat: it says it is one, and it recorded
#: nothing, so it has no log position of its own (where the receipt has one).
REPLAY_DIFFERS = {"replayed", "position"}

GRANT_KINDS = [
    CreditKind.SUBSCRIPTION_GRANT,
    CreditKind.SUBSCRIPTION_RENEW,
    CreditKind.PURCHASE,
    CreditKind.BONUS,
    CreditKind.REFUND,
    CreditKind.ADMIN_ADJUSTMENT,
]
SPEND_KINDS = [CreditKind.API_USE, CreditKind.GENERATION_USE, CreditKind.REFUND]
# Whole hours, like the clock steps, so deadlines often land exactly on "now"
# (a deadline equal to now has passed) and several blocks share one deadline.
GRANT_TTLS = [timedelta(hours=h) for h in (-1, 0, 1, 6, 24, 48, 24 * 7, 24 * 30)]
HOLD_TTLS = [timedelta(minutes=m) for m in (-60, 0, 30, 60, 6 * 60, 24 * 60, 3 * 24 * 60, 7 * 24 * 60)]
REASONS = ["job cancelled", "worker lost", "user aborted"]

users = st.integers(0, N_USERS - 1)
#: Grants run larger than debits so that accounts carry credits for a while.
grant_amounts = st.integers(1, 200)
amounts = st.integers(1, 80)
#: None asks for a fresh key; an int picks a key an earlier command failed with,
#: which must still be free because a failed command records nothing.
key_picks = st.none() | st.integers(0, 20)
#: Which hold a settle or release targets; mostly open ones, as those can succeed.
holds = st.sampled_from(["open", "open", "open", "any", "unknown"])


# ------------------------------------------------------------------ commands


@dataclass(frozen=True)
class Call:
    """One command as the test issued it, kept so it can be issued again."""

    op: Op
    key: str
    #: The account for grant/spend/reserve/adjust; the optional routing hint for settle/release.
    user_id: UUID | None = None
    #: amount_credits, actual_credits or (signed) delta_credits.
    amount: int = 0
    kind: CreditKind | None = None
    expires_at: datetime | None = None
    job_id: UUID | None = None
    reservation_id: UUID | None = None
    reason: str = ""

    def arguments(self) -> tuple[Any, ...]:
        """What makes two uses of a key "the same command": everything but the
        key itself and the routing hint."""
        user = None if self.op in ROUTED else self.user_id
        return (self.op, user, self.amount, self.kind, self.expires_at, self.job_id, self.reservation_id, self.reason)

    def invoke(self, ledger: Ledger) -> Receipt:
        if self.op == "settle":
            assert self.reservation_id is not None
            return ledger.settle(self.reservation_id, self.amount, key=self.key, user_id=self.user_id)
        if self.op == "release":
            assert self.reservation_id is not None
            return ledger.release(self.reservation_id, self.reason, key=self.key, user_id=self.user_id)
        assert self.user_id is not None
        if self.op == "grant":
            assert self.kind is not None
            return ledger.grant(self.user_id, self.amount, self.kind, key=self.key, expires_at=self.expires_at)
        if self.op == "spend":
            assert self.kind is not None
            return ledger.spend(self.user_id, self.amount, key=self.key, kind=self.kind)
        if self.op == "reserve":
            assert self.job_id is not None and self.expires_at is not None
            return ledger.reserve(self.user_id, self.job_id, self.amount, self.expires_at, key=self.key)
        if self.op == "limit":
            return ledger.set_credit_limit(self.user_id, self.amount, self.reason, "stateful-test", key=self.key)
        return ledger.adjust(self.user_id, self.amount, self.reason, "stateful-test", key=self.key)


# --------------------------------------------------------------------- model


@dataclass
class ModelBlock:
    kind: CreditKind
    granted: int
    remaining: int
    granted_at: datetime
    expires_at: datetime | None

    def lapsed(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now


@dataclass
class ModelHold:
    amount: int
    expires_at: datetime
    #: (block id, credits) earmarked by the hold, in the order they were taken.
    allocations: list[tuple[UUID, int]]


def take_upto(amount: int, sources: list[tuple[UUID, int]]) -> tuple[list[tuple[UUID, int]], int]:
    """Takes up to ``amount`` credits from ``sources``; the draws and what they fell short by."""
    draws = []
    for block_id, credits in sources:
        if amount == 0:
            break
        part = min(amount, credits)
        draws.append((block_id, part))
        amount -= part
    return draws, amount


def take(amount: int, sources: list[tuple[UUID, int]]) -> list[tuple[UUID, int]] | None:
    """Takes ``amount`` credits from ``sources`` front to back; None if they fall short."""
    draws = []
    for block_id, credits in sources:
        if amount == 0:
            break
        part = min(amount, credits)
        draws.append((block_id, part))
        amount -= part
    return draws if amount == 0 else None


@dataclass
class ModelAccount:
    #: Insertion order is grant order (block ids are the grants' entry ids).
    blocks: dict[UUID, ModelBlock] = field(default_factory=dict)
    holds: dict[UUID, ModelHold] = field(default_factory=dict)
    limit: int = 0
    #: Credits spent on credit, beyond the blocks.
    debt: int = 0
    #: The last limit change left more credit in use than the limit allows.
    lowered: bool = False

    @property
    def balance(self) -> int:
        return sum(b.remaining for b in self.blocks.values()) - self.debt

    @property
    def held(self) -> int:
        return sum(h.amount for h in self.holds.values())

    @property
    def available(self) -> int:
        return self.balance - self.held + self.limit

    @property
    def in_use(self) -> int:
        """Credit in use: debt, and what holds hold beyond their earmarks."""
        return self.debt + sum(h.amount - sum(c for _, c in h.allocations) for h in self.holds.values())

    def repay(self, now: datetime) -> int:
        """Free credits of live blocks pay off debt; returns the events that records (0 or 1)."""
        if self.debt == 0:
            return 0
        draws, short = take_upto(self.debt, self.free(now))
        self.draw(draws)
        self.debt = short
        return 1 if draws else 0

    def earmarked(self, block_id: UUID) -> int:
        return sum(credits for h in self.holds.values() for b, credits in h.allocations if b == block_id)

    def free(self, now: datetime) -> list[tuple[UUID, int]]:
        """Unearmarked credits of live blocks in the order debits use them."""
        live = [(bid, b) for bid, b in self.blocks.items() if not b.lapsed(now)]
        deadlines = {bid: b.expires_at for bid, b in live if b.expires_at is not None}
        # Soonest deadline first; sorted() is stable, so blocks sharing a
        # deadline keep grant order, and non-expiring blocks follow oldest first.
        expiring = sorted((item for item in live if item[0] in deadlines), key=lambda item: deadlines[item[0]])
        forever = [item for item in live if item[0] not in deadlines]
        sources = [(bid, b.remaining - self.earmarked(bid)) for bid, b in [*expiring, *forever]]
        return [(bid, credits) for bid, credits in sources if credits > 0]

    def draw(self, draws: list[tuple[UUID, int]]) -> None:
        for block_id, credits in draws:
            block = self.blocks[block_id]
            block.remaining -= credits
            assert block.remaining >= 0, "model bug: overdrew a block"
            if block.remaining == 0:
                del self.blocks[block_id]

    def apply_due(self, now: datetime) -> tuple[list[UUID], int]:
        """Releases holds past their deadline, then lapses the unearmarked rest
        of blocks past theirs. Returns the released holds and how many blocks lapsed."""
        released = [rid for rid, hold in self.holds.items() if hold.expires_at <= now]
        for rid in released:
            del self.holds[rid]
        lapsed = 0
        for block_id, block in list(self.blocks.items()):
            # Credits a live hold still earmarks stay until that hold closes.
            lapsing = block.remaining - self.earmarked(block_id) if block.lapsed(now) else 0
            if lapsing > 0:
                self.draw([(block_id, lapsing)])
                lapsed += 1
        return released, lapsed + self.repay(now)


@dataclass
class HoldRecord:
    """What ``ledger.reservation()`` should report for a hold."""

    owner: UUID
    amount: int
    status: str = "reserved"
    settled_credits: int | None = None
    release_reason: str | None = None


@dataclass
class Refused:
    error: type[LedgerError]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Replayed:
    receipt: Receipt


@dataclass
class Applied:
    owner: UUID
    #: The account after the command, without the block or hold it creates
    #: (their ids come from the receipt).
    account: ModelAccount
    amount: int
    released: list[UUID]
    new_block: ModelBlock | None = None
    new_hold: ModelHold | None = None
    closed: tuple[UUID, HoldRecord] | None = None
    #: Set once the ledger has run the command.
    receipt: Receipt | None = None


class Model:
    def __init__(self) -> None:
        #: Recorded state per opened account.
        self.accounts: dict[UUID, ModelAccount] = {}
        #: Every hold ever opened, in order, with its recorded outcome.
        self.reservations: dict[UUID, HoldRecord] = {}
        #: Idempotency keys (global across users) -> first call and its receipt.
        self.used: dict[str, tuple[Call, Receipt]] = {}

    def effective(self, user: UUID, now: datetime) -> tuple[ModelAccount, list[UUID]]:
        """The account as a command at ``now`` sees it, after due effects."""
        account = deepcopy(self.accounts.get(user) or ModelAccount())
        released, _ = account.apply_due(now)
        return account, released

    def predict(self, call: Call, now: datetime) -> Refused | Replayed | Applied:
        if call.key in self.used:
            first, receipt = self.used[call.key]
            if first.arguments() == call.arguments():
                return Replayed(receipt)
            return Refused(IdempotencyConflict, {"key": call.key})
        if call.op in ("settle", "release"):
            return self._close(call, now)
        user = call.user_id
        assert user is not None
        opens = call.op in ("grant", "limit") or (call.op == "adjust" and call.amount > 0)
        if not opens and user not in self.accounts:
            return Refused(UnknownAccount, {"user_id": user})
        account, released = self.effective(user, now)
        if call.op == "limit":
            account.limit = call.amount
            account.lowered = account.in_use > account.limit
            return Applied(user, account, 0, released)
        if opens:
            kind = call.kind if call.op == "grant" else CreditKind.ADMIN_ADJUSTMENT
            assert kind is not None
            if call.expires_at is not None and call.expires_at <= now:
                return Refused(InvalidArgument, {"param": "expires_at"})
            block = ModelBlock(kind, call.amount, call.amount, now, call.expires_at)
            return Applied(user, account, call.amount, released, new_block=block)
        if call.op == "reserve":
            assert call.expires_at is not None
            if call.expires_at <= now:
                return Refused(InvalidArgument, {"param": "expires_at"})
            if call.amount > account.available:
                return Refused(InsufficientCredits, self._short(user, call.amount, account))
            allocations, _ = take_upto(call.amount, account.free(now))  # the rest on credit
            return Applied(user, account, 0, released, new_hold=ModelHold(call.amount, call.expires_at, allocations))
        # spend, or adjust downwards
        amount = abs(call.amount)
        if amount > account.available:
            return Refused(InsufficientCredits, self._short(user, amount, account))
        draws, short = take_upto(amount, account.free(now))
        account.draw(draws)
        account.debt += short
        return Applied(user, account, -amount, released)

    def _close(self, call: Call, now: datetime) -> Refused | Applied:
        rid = call.reservation_id
        assert rid is not None
        if call.user_id is not None:
            owner = call.user_id
            if owner not in self.accounts:
                return Refused(UnknownAccount, {"user_id": owner})
        elif rid in self.reservations:
            owner = self.reservations[rid].owner
        else:
            return Refused(UnknownReservation, {"reservation_id": rid, "user_id": None})
        account, released = self.effective(owner, now)
        hold = account.holds.get(rid)
        record = self.reservations.get(rid)
        if hold is None:
            if record is None or record.owner != owner:
                return Refused(UnknownReservation, {"reservation_id": rid, "user_id": owner})
            # A hold that lapsed unrecorded is released by this very command first.
            status = "released" if rid in released else record.status
            assert status != "reserved", "model bug: an open hold missing from its account"
            return Refused(ReservationClosed, {"reservation_id": rid, "status": status})
        if call.op == "release":
            del account.holds[rid]
            closed = HoldRecord(owner, hold.amount, "released", release_reason=call.reason)
            return Applied(owner, account, 0, released, closed=(rid, closed))
        actual = call.amount
        backed = sum(c for _, c in hold.allocations)
        short = 0
        if actual <= backed:
            draws = take(actual, hold.allocations)
            assert draws is not None
        else:
            # The extra must be available; it and the part the hold held on
            # credit come from free credits (the hold's own earmarks are not
            # free), then from credit.
            extra = actual - hold.amount
            if extra > 0 and extra > account.available:
                return Refused(InsufficientCredits, self._short(owner, extra, account))
            more, short = take_upto(actual - backed, account.free(now))
            draws = [*hold.allocations, *more]
        del account.holds[rid]
        account.draw(draws)
        account.debt += short
        closed = HoldRecord(owner, hold.amount, "settled", settled_credits=actual)
        return Applied(owner, account, -actual, released, closed=(rid, closed))

    @staticmethod
    def _short(user: UUID, requested: int, account: ModelAccount) -> dict[str, Any]:
        return {"user_id": user, "requested_credits": requested, "available_credits": account.available}

    def commit(self, call: Call, applied: Applied, receipt: Receipt, now: datetime) -> set[UUID]:
        """Records a successful command; returns the holds whose record changed."""
        account = applied.account
        changed = set(applied.released)
        if applied.new_block is not None:
            assert receipt.entry_id is not None and receipt.entry_id not in account.blocks
            account.blocks[receipt.entry_id] = applied.new_block
        if applied.new_hold is not None:
            rid = receipt.reservation_id
            assert rid is not None and rid not in self.reservations, f"reserve returned a known id {rid}"
            account.holds[rid] = applied.new_hold
            self.reservations[rid] = HoldRecord(applied.owner, applied.new_hold.amount)
            changed.add(rid)
        # The ledger settles due effects again after the command: credits of a
        # lapsed block that a settle or release un-earmarked lapse right away.
        again, _ = account.apply_due(now)
        changed.update(again)
        for rid in [*applied.released, *again]:
            self.reservations[rid] = replace(self.reservations[rid], status="released", release_reason="expired")
        if applied.closed is not None:
            rid, record = applied.closed
            self.reservations[rid] = record
            changed.add(rid)
        if call.op != "limit":
            # A debit leaves available at or above zero: within the limit.
            assert (
                account.available >= 0
                or call.op in ("grant", "release")
                or applied.amount >= 0
                or (call.op == "settle" and applied.closed is not None and -applied.amount <= applied.closed[1].amount)
            ), f"{call} left available {account.available}"
        if account.in_use <= account.limit:
            account.lowered = False
        self.accounts[applied.owner] = account
        self.used[call.key] = (call, receipt)
        return changed

    def expire_holds(self, now: datetime) -> tuple[int, set[UUID]]:
        """The sweep: records due effects on every account with a due open hold."""
        events = 0
        changed: set[UUID] = set()
        for account in self.accounts.values():
            if not any(h.expires_at <= now for h in account.holds.values()):
                continue
            released, lapsed = account.apply_due(now)
            events += len(released) + lapsed
            for rid in released:
                self.reservations[rid] = replace(self.reservations[rid], status="released", release_reason="expired")
            changed.update(released)
        return events, changed


# ------------------------------------------------------------------- machine


class LedgerMachine(RuleBasedStateMachine):
    url: ClassVar[str] = "memory://"

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock(START)
        self.ledger = Ledger(self.url, clock=self.clock)
        self.shared_store = not self.url.startswith("memory:")
        # Fresh per run: runs on a shared store must not see each other's accounts or keys.
        self.prefix = f"stateful-{uuid4().hex[:12]}"
        self.users = [uuid4() for _ in range(N_USERS)]
        self.model = Model()
        self.next_key = 0
        self.free_keys: list[str] = []
        #: Holds whose expected record changed since the last invariant check.
        self.dirty: set[UUID] = set()
        #: Balance thresholds: the watched accounts' credit levels, the
        #: thresholds the reference model has fired, and the crossing events
        #: it expects, per (user, event type, threshold id).
        self.levels: dict[UUID, list[int]] = {}
        self.fired: dict[UUID, set[str]] = {}
        self.crossings: dict[tuple[UUID, str, str], int] = {}
        self.threshold_calls: list[tuple[UUID, list[Threshold], str]] = []

    def teardown(self) -> None:
        try:
            if self.shared_store:
                # Close this run's holds so the next run's expire_holds() counts only its own.
                with contextlib.suppress(LedgerError):
                    self.ledger.expire_holds(now=FAR_FUTURE, allow_future=True)
        finally:
            self.ledger.close()

    # -- helpers -----------------------------------------------------------------

    def key(self, pick: int | None, op: str) -> str:
        if pick is not None and self.free_keys:
            return self.free_keys[pick % len(self.free_keys)]
        self.next_key += 1
        return f"{self.prefix}:{op}:{self.next_key}"

    def run(self, call: Call) -> Refused | Replayed | Applied:
        """Issues ``call`` and checks the outcome against the model's prediction."""
        now = self.clock.now()
        expected = self.model.predict(call, now)
        try:
            receipt = call.invoke(self.ledger)
        except LedgerError as exc:
            assert isinstance(expected, Refused), f"{call} raised {exc!r}; the model expected {expected}"
            assert type(exc) is expected.error, f"{call} raised {exc!r}; the model expected {expected}"
            for name, value in expected.attrs.items():
                assert getattr(exc, name) == value, f"{exc!r}: {name} is {getattr(exc, name)!r}, expected {value!r}"
            if call.key not in self.model.used and call.key not in self.free_keys:
                self.free_keys.append(call.key)
            self.check_unchanged(call)
            return expected
        assert not isinstance(expected, Refused), f"{call} returned {receipt}; the model expected {expected}"
        if isinstance(expected, Replayed):
            first = expected.receipt
            same = receipt.model_dump(exclude=REPLAY_DIFFERS) == first.model_dump(exclude=REPLAY_DIFFERS)
            assert same and receipt.replayed, f"{call}: replay {receipt}, first {first}"
            self.check_unchanged(call)
            return expected
        expected.receipt = receipt
        self.dirty |= self.model.commit(call, expected, receipt, now)
        self.cross(expected.owner)
        if call.key in self.free_keys:
            self.free_keys.remove(call.key)
        account = self.model.accounts[expected.owner]
        seen = (
            receipt.replayed,
            receipt.key,
            receipt.command,
            receipt.user_id,
            receipt.amount_credits,
            receipt.balance_credits,
            receipt.held_credits,
            receipt.available_credits,
            receipt.recorded_at,
            receipt.entry_id is not None,
        )
        assert seen == (
            False,
            call.key,
            COMMAND_NAMES.get(call.op, call.op),
            expected.owner,
            expected.amount,
            account.balance,
            account.held,
            account.available,
            now,
            call.op in POSTING,
        ), f"{call}: receipt {receipt}, model account {account}"
        if call.op in ROUTED:
            assert receipt.reservation_id == call.reservation_id
        elif call.op != "reserve":
            assert receipt.reservation_id is None
        return expected

    def check_unchanged(self, call: Call) -> None:
        """After a refusal or a replay: the accounts the call named are as the model has them."""
        involved = {call.user_id}
        record = self.model.reservations.get(call.reservation_id) if call.reservation_id else None
        if record is not None:
            involved.add(record.owner)
        for user in sorted(u for u in involved if u is not None):
            self.check_account(user)

    def check_account(self, user: UUID) -> None:
        if user not in self.model.accounts:
            with pytest.raises(UnknownAccount):
                self.ledger.balance(user)
            return
        now = self.clock.now()
        expected, _ = self.model.effective(user, now)
        seen = self.ledger.balance(user)
        assert (seen.balance_credits, seen.held_credits, seen.available_credits) == (
            expected.balance,
            expected.held,
            expected.available,
        ), f"user {user}: ledger {seen}, model {expected}"
        assert seen.credit_limit_credits == expected.limit
        # No balance below minus the limit, ever: credit in use stays within
        # the limit unless the limit was lowered below it since.
        assert expected.in_use <= expected.limit or expected.lowered, f"user {user}: model {expected}"
        if not expected.lowered:
            assert seen.available_credits >= 0, f"user {user}: ledger {seen}"
            assert seen.balance_credits - seen.held_credits >= -seen.credit_limit_credits
        assert seen.as_of == now
        assert [
            (b.block_id, b.kind, b.granted_credits, b.remaining_credits, b.granted_at, b.expires_at)
            for b in seen.blocks
        ] == [
            (bid, b.kind, b.granted, b.remaining, b.granted_at, b.expires_at) for bid, b in expected.blocks.items()
        ], f"user {user}: ledger blocks {seen.blocks}, model {expected.blocks}"

    def open_holds(self) -> list[UUID]:
        now = self.clock.now()
        return [
            rid
            for account in self.model.accounts.values()
            for rid, hold in account.holds.items()
            if hold.expires_at > now
        ]

    def pick_hold(self, which: str, pick: int) -> UUID:
        """An open hold, any hold ever opened (most are closed), or an id nobody reserved."""
        candidates = (self.open_holds() if which == "open" else []) or list(self.model.reservations)
        if which == "unknown" or not candidates:
            return uuid4()
        return candidates[pick % len(candidates)]

    def used_call(self, op: Op, pick: int) -> Call:
        """An earlier successful call, of the given command if there is one (the
        key space is mostly grants and holds; settles and releases are rarer)."""
        calls = [call for call, _ in self.model.used.values()]
        calls = [call for call in calls if call.op == op] or calls
        return calls[pick % len(calls)]

    def hint_for(self, rid: UUID, hint: str) -> UUID | None:
        if hint == "none":
            return None
        record = self.model.reservations.get(rid)
        owner = record.owner if record else self.users[0]
        if hint == "owner":
            return owner
        # Another user of the run: it may or may not have an account.
        return self.users[(self.users.index(owner) + 1) % N_USERS]

    # -- rules -------------------------------------------------------------------

    @initialize(
        opened=st.lists(users, unique=True),
        amount=st.integers(50, 300),
        ttl=st.sampled_from(GRANT_TTLS[2:]),
        limited=st.lists(users, unique=True, max_size=2),
        limit=st.integers(1, 150),
        shares=st.lists(
            st.lists(st.integers(5, 110), min_size=1, max_size=3) | st.just([]) | st.none(),
            min_size=N_USERS,
            max_size=N_USERS,
        ),
    )
    def open_accounts(
        self,
        opened: list[int],
        amount: int,
        ttl: timedelta,
        limited: list[int],
        limit: int,
        shares: list[list[int] | None],
    ) -> None:
        """Starts some accounts with credits, one expiring and one not, so that
        spends and holds mostly succeed, and gives some a credit limit, so that
        spends and holds go on credit; the other accounts stay unopened.
        Opened accounts with ``shares`` are watched: credit thresholds at those
        percentages of their opening credits, a percentage threshold (inactive:
        no subscription grant) and depletion."""
        for user in limited:
            self.run(Call("limit", self.key(None, "open-limit"), self.users[user], limit, reason="enterprise"))
        for user in opened:
            self.run(Call("grant", self.key(None, "open"), self.users[user], amount, CreditKind.PURCHASE))
            expires_at = self.clock.now() + ttl
            self.run(Call("grant", self.key(None, "open"), self.users[user], amount, CreditKind.BONUS, expires_at))
            chosen = shares[user]
            if chosen is not None:
                self.watch(self.users[user], sorted({max(1, 2 * amount * share // 100) for share in chosen}))

    def watch(self, user: UUID, levels: list[int]) -> None:
        thresholds = [Threshold.credits(level) for level in levels] + [Threshold.percent(10)]
        key = self.key(None, "thresholds")
        self.ledger.set_balance_thresholds(user, thresholds, key=key)
        self.threshold_calls.append((user, thresholds, key))
        # Setting thresholds never notifies: those at or above available start fired.
        available = self.model.accounts[user].available
        self.levels[user] = sorted(levels, reverse=True)
        self.fired[user] = {f"credits:{level}" for level in levels if available <= level}
        if available <= 0:
            self.fired[user].add("depleted")

    def cross(self, user: UUID) -> None:
        """The reference rule, after a transaction on ``user``'s account: each
        armed threshold at or above available fires once; each fired one below
        available re-arms."""
        if user not in self.levels:
            return
        available = self.model.accounts[user].available
        fired = self.fired[user]
        for threshold, level in [*((f"credits:{lv}", lv) for lv in self.levels[user]), ("depleted", 0)]:
            if threshold not in fired and available <= level:
                kind = "balancedepleted" if threshold == "depleted" else "balancelow"
                fired.add(threshold)
            elif threshold in fired and available > level:
                kind = "balancerecovered"
                fired.discard(threshold)
            else:
                continue
            at = (user, kind, threshold)
            self.crossings[at] = self.crossings.get(at, 0) + 1

    @rule(
        user=users,
        amount=grant_amounts,
        kind=st.sampled_from(GRANT_KINDS),
        ttl=st.none() | st.sampled_from(GRANT_TTLS),
        pick=key_picks,
    )
    def grant(self, user: int, amount: int, kind: CreditKind, ttl: timedelta | None, pick: int | None) -> None:
        expires_at = None if ttl is None else self.clock.now() + ttl
        self.run(Call("grant", self.key(pick, "grant"), self.users[user], amount, kind, expires_at))

    @rule(user=users, amount=amounts, kind=st.sampled_from(SPEND_KINDS), pick=key_picks)
    def spend(self, user: int, amount: int, kind: CreditKind, pick: int | None) -> None:
        self.run(Call("spend", self.key(pick, "spend"), self.users[user], amount, kind))

    @rule(user=users, amount=amounts, ttl=st.sampled_from(HOLD_TTLS), pick=key_picks)
    def reserve(self, user: int, amount: int, ttl: timedelta, pick: int | None) -> None:
        self.run(self.reserve_call(self.users[user], amount, ttl, self.key(pick, "reserve")))

    def reserve_call(self, user: UUID, amount: int, ttl: timedelta, key: str) -> Call:
        return Call("reserve", key, user, amount, expires_at=self.clock.now() + ttl, job_id=uuid4())

    @rule(
        which=holds,
        pick=st.integers(0, 50),
        how=st.sampled_from(["below", "equal", "above"]),
        delta=st.integers(1, 100),
        hint=st.sampled_from(["none", "owner", "other"]),
        key=key_picks,
    )
    def settle(self, which: str, pick: int, how: str, delta: int, hint: str, key: int | None) -> None:
        rid = self.pick_hold(which, pick)
        record = self.model.reservations.get(rid)
        reserved = record.amount if record else delta
        actual = {"below": max(1, reserved - delta), "equal": reserved, "above": reserved + delta}[how]
        call = Call("settle", self.key(key, "settle"), self.hint_for(rid, hint), actual, reservation_id=rid)
        self.run(call)

    @rule(
        which=holds,
        pick=st.integers(0, 50),
        reason=st.sampled_from(REASONS),
        hint=st.sampled_from(["none", "owner", "other"]),
        key=key_picks,
    )
    def release(self, which: str, pick: int, reason: str, hint: str, key: int | None) -> None:
        rid = self.pick_hold(which, pick)
        call = Call("release", self.key(key, "release"), self.hint_for(rid, hint), reservation_id=rid, reason=reason)
        self.run(call)

    @rule(user=users, amount=amounts, negative=st.booleans(), pick=key_picks)
    def adjust(self, user: int, amount: int, negative: bool, pick: int | None) -> None:
        delta = -amount if negative else amount
        self.run(Call("adjust", self.key(pick, "adjust"), self.users[user], delta, reason="support ticket"))

    @rule(user=users, limit=st.sampled_from([0, 0, 20, 50, 100]) | st.integers(0, 200), pick=key_picks)
    def set_credit_limit(self, user: int, limit: int, pick: int | None) -> None:
        self.run(Call("limit", self.key(pick, "limit"), self.users[user], limit, reason="credit review"))

    # Mostly within a day, so holds (which last up to a week) often outlive a
    # step; sometimes weeks, so blocks lapse and every hold expires.
    @rule(hours=st.integers(1, 24) | st.integers(1, 24 * 21))
    def advance_clock(self, hours: int) -> None:
        self.clock.advance(timedelta(hours=hours))

    @rule()
    def expire_holds(self) -> None:
        now = self.clock.now()
        swept = [u for u, a in self.model.accounts.items() if any(h.expires_at <= now for h in a.holds.values())]
        expected, changed = self.model.expire_holds(now)
        assert self.ledger.expire_holds() == expected
        self.dirty |= changed
        for user in swept:
            self.cross(user)

    @precondition(lambda self: bool(self.model.used))
    @rule(op=st.sampled_from(OPS), pick=st.integers(0, 200), toggle_hint=st.booleans())
    def retry(self, op: Op, pick: int, toggle_hint: bool) -> None:
        """The same key and arguments again: the first receipt comes back."""
        first = self.used_call(op, pick)
        call = first
        if toggle_hint and first.op in ROUTED:
            # The routing hint is not an argument: with or without it, it is a retry.
            assert first.reservation_id is not None
            owner = self.model.reservations[first.reservation_id].owner
            call = replace(first, user_id=None if first.user_id else owner)
        assert isinstance(self.run(call), Replayed)

    @precondition(lambda self: bool(self.model.used))
    @rule(op=st.sampled_from(OPS), pick=st.integers(0, 200), variant=st.integers(0, 3), user=users)
    def reuse_key(self, op: Op, pick: int, variant: int, user: int) -> None:
        """A used key with other arguments (possibly another command or user) is refused."""
        first = self.used_call(op, pick)
        key, owner = first.key, self.users[user]
        if variant == 0:
            if first.op == "release":
                call = replace(first, reason=first.reason + " again")
            elif first.op == "adjust":
                call = replace(first, amount=first.amount - 1 if first.amount < 0 else first.amount + 1)
            else:
                call = replace(first, amount=first.amount + 1)
        elif variant == 1:
            call = Call("grant", key, owner, 1, CreditKind.BONUS)
        elif variant == 2:
            call = Call("spend", key, owner, 1, CreditKind.API_USE)
        else:
            call = self.reserve_call(owner, 1, timedelta(hours=1), key)
        if call.arguments() == first.arguments():
            call = replace(call, amount=call.amount + 1)
        outcome = self.run(call)
        assert isinstance(outcome, Refused) and outcome.error is IdempotencyConflict

    @rule(
        who=st.lists(users, min_size=1, max_size=N_USERS, unique=True),
        before=amounts,
        granted=grant_amounts,
        after=amounts,
        ttl=st.none() | st.sampled_from(GRANT_TTLS[2:]),
        hold_ttl=st.sampled_from(HOLD_TTLS[2:]),
    )
    def holds_race_grants(
        self, who: list[int], before: int, granted: int, after: int, ttl: timedelta | None, hold_ttl: timedelta
    ) -> None:
        """Reserves just before and just after grants on a few users, at one instant:
        the later hold may only be covered by (and earmark) the fresh grant."""
        accounts = [self.users[i] for i in who]
        expires_at = None if ttl is None else self.clock.now() + ttl
        for user in accounts:
            self.run(self.reserve_call(user, before, hold_ttl, self.key(None, "race-reserve")))
        for user in accounts:
            self.run(Call("grant", self.key(None, "race-grant"), user, granted, CreditKind.PURCHASE, expires_at))
        for user in accounts:
            self.run(self.reserve_call(user, after, hold_ttl, self.key(None, "race-reserve")))

    @rule(
        user=users,
        amount=amounts,
        spill=st.integers(0, 40),
        block_hours=st.integers(1, 48),
        hold_hours=st.integers(1, 48),
        wait=st.integers(0, 47),
        close=st.sampled_from(["below", "equal", "above", "release", "leave"]),
    )
    def hold_outlives_block(
        self, user: int, amount: int, spill: int, block_hours: int, hold_hours: int, wait: int, close: str
    ) -> None:
        """A hold that outlives a block it earmarks: the block's deadline passes
        (possibly exactly now) while the hold keeps its credits, and closing the
        hold must lapse whatever it leaves of that block at once. With ``spill``
        the hold also earmarks other blocks, so a partial settle shows which
        block it drew first."""
        owner = self.users[user]
        block_ttl = timedelta(hours=block_hours)
        expires_at = self.clock.now() + block_ttl
        self.run(Call("grant", self.key(None, "short-grant"), owner, amount, CreditKind.BONUS, expires_at))
        hold_ttl = block_ttl + timedelta(hours=hold_hours)
        hold = self.run(self.reserve_call(owner, amount + spill, hold_ttl, self.key(None, "long-hold")))
        self.clock.advance(block_ttl + timedelta(hours=wait % hold_hours))
        if close == "leave" or not isinstance(hold, Applied):
            return
        assert hold.receipt is not None and hold.receipt.reservation_id is not None
        rid = hold.receipt.reservation_id
        if close == "release":
            self.run(Call("release", self.key(None, "release"), reservation_id=rid, reason="job cancelled"))
        else:
            reserved = amount + spill
            actual = {"below": max(1, reserved // 2), "equal": reserved, "above": reserved + 1}[close]
            self.run(Call("settle", self.key(None, "settle"), amount=actual, reservation_id=rid))

    @precondition(lambda self: bool(self.levels))
    @rule(pick=st.integers(0, 10), edge=st.sampled_from([-1, 0, 1]), drain=st.booleans())
    def spend_to_a_threshold(self, pick: int, edge: int, drain: bool) -> None:
        """Spends a watched account down to just above, exactly at, or just
        below one of its levels (or to 0): the boundaries of the crossing rule."""
        watched = sorted(self.levels)
        user = watched[pick % len(watched)]
        levels = self.levels[user]
        target = 0 if drain or not levels else max(0, levels[pick % len(levels)] + edge)
        now = self.clock.now()
        available = self.model.effective(user, now)[0].available
        if available > target:
            self.run(Call("spend", self.key(None, "to-threshold"), user, available - target, CreditKind.API_USE))

    @precondition(lambda self: bool(self.threshold_calls))
    @rule(pick=st.integers(0, 10))
    def retry_thresholds(self, pick: int) -> None:
        """Setting thresholds again under the same key records nothing."""
        user, thresholds, key = self.threshold_calls[pick % len(self.threshold_calls)]
        assert self.ledger.set_balance_thresholds(user, thresholds, key=key).replayed

    @precondition(lambda self: self.shared_store)
    @rule()
    def reopen(self) -> None:
        """A new Ledger on the same store sees the same recorded state."""
        self.ledger.close()
        self.ledger = Ledger(self.url, clock=self.clock)

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def ledger_matches_model(self) -> None:
        for user in self.users:
            self.check_account(user)
        for rid in sorted(self.dirty):
            record = self.model.reservations[rid]
            seen = self.ledger.reservation(rid)
            assert (seen.user_id, seen.amount_credits, seen.status, seen.settled_credits, seen.release_reason) == (
                record.owner,
                record.amount,
                record.status,
                record.settled_credits,
                record.release_reason,
            ), f"reservation {rid}: ledger {seen}, model {record}"
        self.dirty.clear()

    @invariant()
    def one_notification_per_crossing(self) -> None:
        for user, levels in self.levels.items():
            seen: dict[tuple[UUID, str, str], int] = {}
            for event in self.ledger.history(user, limit=10_000):
                if event.type in ("balancelow", "balancerecovered"):
                    at = (user, event.type, event.data["threshold"])
                elif event.type == "balancedepleted":
                    at = (user, event.type, "depleted")
                else:
                    continue
                seen[at] = seen.get(at, 0) + 1
            expected = {at: n for at, n in self.crossings.items() if at[0] == user}
            assert seen == expected, f"user {user} (levels {levels}): ledger crossings {seen}, model {expected}"
            state = self.ledger.balance_thresholds(user)
            assert {s.threshold for s in state.states if s.fired} == self.fired[user]


def machine_for(url: str) -> type[LedgerMachine]:
    """A machine class bound to one store URL."""
    return type("LedgerMachine", (LedgerMachine,), {"url": url})


def test_ledger_matches_reference_model(ledger_url: str) -> None:
    run_state_machine_as_test(machine_for(ledger_url), settings=SETTINGS)  # type: ignore[no-untyped-call]
