"""The credit account and the command record, with their events.

``CreditAccount`` is the authority for an account's balance, its credit blocks
and its open holds: its own events reserve, settle and release a hold. The rest
of a hold's life (its ``Hold`` state, statuses, ``HoldRecord`` and close rules)
is in ``ledger.domain.holds``. ``CommandRecord`` remembers an idempotency key;
it is saved in the same transaction as the command's own events.

Stored events live forever: every event class carries an explicit ``TOPIC``
that does not depend on where the class lives in the code, and a
``class_version`` with ``upcast_vN_vN+1`` methods when its shape changes.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from functools import lru_cache
from itertools import pairwise
from typing import Any
from uuid import UUID, SafeUUID

from eventsourcing.domain import Aggregate
from eventsourcing.domain import Snapshot as BaseSnapshot

from ledger.domain.holds import EXPIRED_REASON, Hold, due
from ledger.domain.thresholds import (
    DEPLETED,
    Threshold,
    crossings,
    initially_fired,
    thresholds_data,
    thresholds_from_data,
)
from ledger.domain.topics import TOPIC_PREFIX as TOPIC_PREFIX  # re-exported for the modules that import it from here
from ledger.errors import (
    AccountLimitReached,
    InsufficientCredits,
    InvalidAmount,
    InvalidArgument,
    InvariantViolation,
    UnknownReservation,
)

# Namespaces for ids derived from idempotency keys: a retry derives the same ids.
ACCOUNT_NS = UUID("5b0f7f4e-8d0c-4c7e-9a53-0c2f1f6a7b01")
RECORD_NS = UUID("5b0f7f4e-8d0c-4c7e-9a53-0c2f1f6a7b02")
ENTRY_NS = UUID("5b0f7f4e-8d0c-4c7e-9a53-0c2f1f6a7b04")
# Separate from ENTRY_NS so that no caller's key can derive an expiration's id.
EXPIRATION_NS = UUID("5b0f7f4e-8d0c-4c7e-9a53-0c2f1f6a7b05")
_ACCOUNT_NS_BYTES = ACCOUNT_NS.bytes
_RECORD_NS_BYTES = RECORD_NS.bytes
_ENTRY_NS_BYTES = ENTRY_NS.bytes
_EXPIRATION_NS_BYTES = EXPIRATION_NS.bytes

#: The largest balance and the largest single amount: the seed stores credits in
#: PostgreSQL ``INT`` columns (``amount``, ``balance_after``).
MAX_CREDITS = 2_147_483_647

#: The largest credit limit an account may have (docs/credit-limits.md): the
#: balance may go as low as minus the limit, and balance + limit must stay
#: within MAX_CREDITS so that the available credits fit the same columns.
MAX_CREDIT_LIMIT = 1_000_000_000


class CreditKind(StrEnum):
    """What a posted balance change was. The values are the seed's
    ``credit_transactions.type`` values plus ``purchase`` and ``expiration``."""

    SUBSCRIPTION_GRANT = "subscription_grant"
    SUBSCRIPTION_RENEW = "subscription_renew"
    PURCHASE = "purchase"
    BONUS = "bonus"
    REFUND = "refund"
    ADMIN_ADJUSTMENT = "admin_adjustment"
    API_USE = "api_use"
    GENERATION_USE = "generation_use"
    EXPIRATION = "expiration"


GRANT_KINDS = frozenset(
    {
        CreditKind.SUBSCRIPTION_GRANT,
        CreditKind.SUBSCRIPTION_RENEW,
        CreditKind.PURCHASE,
        CreditKind.BONUS,
        CreditKind.REFUND,
        CreditKind.ADMIN_ADJUSTMENT,
    }
)
SPEND_KINDS = frozenset({CreditKind.API_USE, CreditKind.GENERATION_USE, CreditKind.REFUND})

#: What one account may have live at once (docs/decisions.md, "An account
#: has at most 1,000 live blocks and 1,000 open holds"): every command's work,
#: the account's memory and its snapshots
#: grow with these, never with the history of spent and lapsed blocks or
#: closed holds. A grant past the first, or a reserve past the second, raises
#: AccountLimitReached; replaying stored events never does.
MAX_LIVE_BLOCKS = 1_000
MAX_OPEN_HOLDS = 1_000


_new_uuid = object.__new__
_set_attribute = object.__setattr__  # UUID's own __setattr__ refuses: UUIDs are immutable
#: What ``UUID(bytes=…, version=5)`` clears and sets in the int of a name-based UUID.
_NOT_VARIANT_VERSION = ~((0xC000 << 48) | (0xF000 << 64))
_RFC_4122_VERSION_5 = (0x8000 << 48) | (5 << 76)


def _uuid5(namespace: bytes, name: str) -> UUID:
    """``uuid.uuid5`` of the namespace with these bytes: the same UUID at half
    its cost (a batch of 10,000 grants derives 20,000 ids). uuid5 goes
    through ``UUID(bytes=…, version=5)``, whose checks cost more than the
    digest; this sets the variant and version bits as it does, then the two
    attributes ``UUID.__init__`` ends by setting."""
    digest = hashlib.sha1(namespace + name.encode("utf-8")).digest()
    derived = _new_uuid(UUID)
    _set_attribute(derived, "int", (int.from_bytes(digest[:16]) & _NOT_VARIANT_VERSION) | _RFC_4122_VERSION_5)
    _set_attribute(derived, "is_safe", SafeUUID.unknown)
    return derived


@lru_cache(maxsize=65_536)  # derived several times per command; uuid5 hashes
def account_id_for(user_id: UUID) -> UUID:
    return _uuid5(_ACCOUNT_NS_BYTES, user_id.hex)


def record_id_for(key: str) -> UUID:
    # Not cached, as account ids are: a key's record id is derived once per
    # command (more only on a replay), and a cache kept 65,536 keys alive.
    return _uuid5(_RECORD_NS_BYTES, key)


def entry_id_for(key: str) -> UUID:
    return _uuid5(_ENTRY_NS_BYTES, key)


def expiration_entry_id(account_id: UUID, version: int) -> UUID:
    return _uuid5(_EXPIRATION_NS_BYTES, f"{account_id}:{version}")


@dataclass
class Block:
    """Unspent credits from one grant. ``seq`` orders non-expiring blocks oldest first."""

    block_id: str
    kind: str
    granted: int
    remaining: int
    granted_at: datetime
    expires_at: datetime | None
    seq: int


# ---------------------------------------------------------------- pure leaves


def draw_key(block: Block) -> tuple[bool, datetime, int]:
    """A block's place in the draw order; unique per account (``seq`` is)."""
    return (block.expires_at is None, block.expires_at or block.granted_at, block.seq)


def draw_order(blocks: Iterable[Block]) -> list[Block]:
    """Soonest-expiring blocks first, then non-expiring blocks oldest first."""
    return sorted(blocks, key=draw_key)


def earmarks(holds: Iterable[Hold]) -> dict[str, int]:
    marked: dict[str, int] = {}
    for hold in holds:
        for block_id, credits in hold.allocations:
            marked[block_id] = marked.get(block_id, 0) + credits
    return marked


def free_credits(blocks: Mapping[str, Block], holds: Iterable[Hold], now: datetime) -> list[tuple[str, int]]:
    """Unearmarked credits per live block, in draw order. Lapsed blocks give none."""
    marked = earmarks(holds)
    free = []
    for block in draw_order(blocks.values()):
        if block.expires_at is not None and block.expires_at <= now:
            continue
        credits = block.remaining - marked.get(block.block_id, 0)
        if credits > 0:
            free.append((block.block_id, credits))
    return free


def take(amount: int, sources: Iterable[tuple[str, int]]) -> list[list[Any]] | None:
    """Takes ``amount`` from ``sources`` in order; None when they fall short."""
    draws: list[list[Any]] = []
    wanted = amount
    for block_id, credits in sources:
        if wanted == 0:
            break
        part = min(credits, wanted)
        draws.append([block_id, part])
        wanted -= part
    return draws if wanted == 0 else None


def take_upto(amount: int, sources: Iterable[tuple[str, int]]) -> tuple[list[list[Any]], int]:
    """Takes up to ``amount`` from ``sources`` in order: the draws and the
    credits they fell short by (0 when the sources cover ``amount``)."""
    draws: list[list[Any]] = []
    wanted = amount
    for block_id, credits in sources:
        if wanted == 0:
            break
        part = min(credits, wanted)
        draws.append([block_id, part])
        wanted -= part
    return draws, wanted


def drawn(draws: Iterable[list[Any]]) -> int:
    """The credits a list of draws (or a hold's allocations) takes from blocks."""
    return sum(credits for _, credits in draws)


def merge_draws(*parts: list[list[Any]]) -> list[list[Any]]:
    merged: dict[str, int] = {}
    for part in parts:
        for block_id, credits in part:
            merged[block_id] = merged.get(block_id, 0) + credits
    return [[block_id, credits] for block_id, credits in merged.items()]


def _copied(obj: Any) -> Any:
    copied = object.__new__(type(obj))
    copied.__dict__.update(obj.__dict__)
    return copied


def _copied_hold(hold: Hold) -> Hold:
    copied: Hold = _copied(hold)
    copied.allocations = [list(a) for a in hold.allocations]
    return copied


# ----------------------------------------------------------------- aggregates


class CreditAccount(Aggregate, created_event_name="Opened"):
    """One user's credits: balance, blocks, and open holds."""

    TOPIC = f"{TOPIC_PREFIX}:CreditAccount"

    class Event(Aggregate.Event):
        TOPIC = f"{TOPIC_PREFIX}:CreditAccount.Event"

    class Opened(Aggregate.Created):
        TOPIC = f"{TOPIC_PREFIX}:CreditAccount.Opened"
        user_id: UUID

    class Snapshot(BaseSnapshot):
        """The account's state at a version. It stores what the events say
        (balance, blocks, holds, next_seq), never what is derived from it:
        the derived parts are rebuilt on restore, so a snapshot is as small
        as the live blocks and holds, and the stored shape never changes."""

        TOPIC = f"{TOPIC_PREFIX}:CreditAccount.Snapshot"

        @classmethod
        def take(cls, aggregate: Any) -> Any:
            snapshot = super().take(aggregate)
            for name in CreditAccount.DERIVED:
                snapshot.state.pop(name, None)
            for name in CreditAccount.UNLESS_ZERO:
                if snapshot.state.get(name) == 0:
                    # An account without a limit or debt keeps the shape of a
                    # snapshot taken before limits existed.
                    del snapshot.state[name]
            return snapshot

        def mutate(self, _: None) -> Any:
            account = super().mutate(None)
            if isinstance(account, CreditAccount):
                account.rebuild_derived()
            return account

    #: Attributes derived from blocks and holds: kept current by the events'
    #: ``apply`` so that a command costs what is live, not a re-sort and
    #: re-sum of every block and hold each time; rebuilt on restore.
    DERIVED = ("_order", "_marked", "_held")
    #: Stored in a snapshot only when not 0 (their class attributes are the default).
    UNLESS_ZERO = ("credit_limit", "debt")

    #: How far below zero the balance may go (``LimitSet``); 0 unless set. A
    #: class attribute too, so that an account restored from a snapshot taken
    #: before limits existed has none.
    credit_limit = 0
    #: Credits spent beyond the blocks (docs/credit-limits.md): the balance is
    #: the blocks' remainders minus the debt. Grants repay it first (``Repaid``).
    debt = 0

    #: Balance thresholds (ledger.domain.thresholds), as event data. An
    #: account is watched only once its host or its plan gave it thresholds
    #: (an empty list: depletion only); until then it records no crossing.
    #: Class attributes give accounts restored from snapshots taken before
    #: thresholds existed their values; events replace them, never change them in place.
    #: The host's thresholds; None: the plan's.
    host_thresholds: list[dict[str, int]] | None = None
    #: The plan's default thresholds; None: the plan has none (feature ``balance_notifications``).
    plan_thresholds: list[dict[str, int]] | None = None
    #: The credits granted for the current period (the base of percentages).
    period_grant = 0
    #: The thresholds that fired and have not re-armed (ids; "depleted" too).
    fired: tuple[str, ...] | list[str] = ()

    def __init__(self, user_id: UUID) -> None:
        self.user_id = user_id
        self.balance = 0
        self.blocks: dict[str, Block] = {}
        self.holds: dict[str, Hold] = {}
        self.next_seq = 0
        self.credit_limit = 0
        self.debt = 0
        # The derived attributes of no blocks and no holds (rebuild_derived).
        self._order: list[Block] = []
        self._marked: dict[str, int] = {}
        self._held = 0

    def rebuild_derived(self) -> None:
        #: The blocks in draw order (same objects as in ``blocks``).
        self._order = draw_order(self.blocks.values())
        #: Credits earmarked per block by the open holds.
        self._marked = {b: c for b, c in earmarks(self.holds.values()).items() if c}
        #: Credits held by the open holds.
        self._held = sum(h.amount for h in self.holds.values())

    # -- events ---------------------------------------------------------------

    class Granted(Event):
        TOPIC = f"{TOPIC_PREFIX}:CreditAccount.Granted"
        entry_id: UUID
        amount: int
        kind: str
        description: str
        reference_type: str | None
        reference_id: str | None
        expires_at: datetime | None
        actor: str | None
        key: str

        def apply(self, account: CreditAccount) -> None:
            block = Block(
                block_id=str(self.entry_id),
                kind=self.kind,
                granted=self.amount,
                remaining=self.amount,
                granted_at=self.timestamp,
                expires_at=self.expires_at,
                seq=account.next_seq,
            )
            account.add_block(block)
            account.next_seq += 1
            account.balance += self.amount

    class Debited(Event):
        TOPIC = f"{TOPIC_PREFIX}:CreditAccount.Debited"
        entry_id: UUID
        amount: int
        kind: str
        description: str
        reference_type: str | None
        reference_id: str | None
        actor: str | None
        draws: list[list[Any]]
        key: str

        def apply(self, account: CreditAccount) -> None:
            # What the draws fall short of the amount by was spent on credit.
            account.draw(self.draws)
            account.debt += self.amount - drawn(self.draws)
            account.balance -= self.amount

    class Reserved(Event):
        TOPIC = f"{TOPIC_PREFIX}:CreditAccount.Reserved"
        reservation_id: UUID
        job_id: UUID
        amount: int
        expires_at: datetime
        allocations: list[list[Any]]
        key: str

        def apply(self, account: CreditAccount) -> None:
            rid = str(self.reservation_id)
            account.open(
                Hold(
                    reservation_id=rid,
                    job_id=str(self.job_id),
                    amount=self.amount,
                    reserved_at=self.timestamp,
                    expires_at=self.expires_at,
                    allocations=[list(a) for a in self.allocations],
                )
            )

    class Settled(Event):
        TOPIC = f"{TOPIC_PREFIX}:CreditAccount.Settled"
        reservation_id: UUID
        entry_id: UUID
        amount: int
        draws: list[list[Any]]
        key: str

        def apply(self, account: CreditAccount) -> None:
            account.close(str(self.reservation_id))
            account.draw(self.draws)
            account.debt += self.amount - drawn(self.draws)
            account.balance -= self.amount

    class Released(Event):
        TOPIC = f"{TOPIC_PREFIX}:CreditAccount.Released"
        reservation_id: UUID
        reason: str
        key: str | None

        def apply(self, account: CreditAccount) -> None:
            account.close(str(self.reservation_id))

    class Expired(Event):
        TOPIC = f"{TOPIC_PREFIX}:CreditAccount.Expired"
        entry_id: UUID
        block_id: UUID
        amount: int

        def apply(self, account: CreditAccount) -> None:
            account.draw([[str(self.block_id), self.amount]])
            account.balance -= self.amount

    class LimitSet(Event):
        """The account's credit limit became ``limit_credits``."""

        TOPIC = f"{TOPIC_PREFIX}:CreditAccount.LimitSet"
        limit_credits: int
        reason: str
        actor: str
        key: str

        def apply(self, account: CreditAccount) -> None:
            account.credit_limit = self.limit_credits

    class Repaid(Event):
        """Free credits of live blocks paid off debt: the blocks lose what the
        debt loses, so the balance does not change."""

        TOPIC = f"{TOPIC_PREFIX}:CreditAccount.Repaid"
        amount: int
        draws: list[list[Any]]

        def apply(self, account: CreditAccount) -> None:
            account.draw(self.draws)
            account.debt -= self.amount

    # Balance thresholds and their crossings (ledger.domain.thresholds).

    class BalanceThresholdsSet(Event):
        """The host set the account's thresholds (None: back to the plan's)."""

        TOPIC = f"{TOPIC_PREFIX}:CreditAccount.BalanceThresholdsSet"
        thresholds: list[dict[str, int]] | None
        actor: str | None
        key: str

        def apply(self, account: CreditAccount) -> None:
            watched = account.watched()
            account.host_thresholds = None if self.thresholds is None else [dict(t) for t in self.thresholds]
            account.refire(watched)

    class PlanThresholdsAdopted(Event):
        """A period's grant under a plan: its default thresholds and the grant
        that percentages are shares of."""

        TOPIC = f"{TOPIC_PREFIX}:CreditAccount.PlanThresholdsAdopted"
        plan: str
        #: None: the plan has no default thresholds.
        thresholds: list[dict[str, int]] | None
        period_grant_credits: int

        def apply(self, account: CreditAccount) -> None:
            watched = account.watched()
            account.plan_thresholds = None if self.thresholds is None else [dict(t) for t in self.thresholds]
            account.period_grant = self.period_grant_credits
            account.refire(watched)

    class BalanceLow(Event):
        """Available credits fell to a threshold's level or below."""

        TOPIC = f"{TOPIC_PREFIX}:CreditAccount.BalanceLow"
        threshold: str
        level_credits: int
        available_credits: int

        def apply(self, account: CreditAccount) -> None:
            account.fired = (*account.fired, self.threshold)

    class BalanceDepleted(Event):
        """Available credits reached 0 (the floor)."""

        TOPIC = f"{TOPIC_PREFIX}:CreditAccount.BalanceDepleted"
        available_credits: int

        def apply(self, account: CreditAccount) -> None:
            account.fired = (*account.fired, DEPLETED)

    class BalanceRecovered(Event):
        """Available credits rose above a fired threshold's level: it re-arms."""

        TOPIC = f"{TOPIC_PREFIX}:CreditAccount.BalanceRecovered"
        threshold: str
        level_credits: int
        available_credits: int

        def apply(self, account: CreditAccount) -> None:
            account.fired = tuple(i for i in account.fired if i != self.threshold)

    def __deepcopy__(self, memo: dict[int, Any]) -> CreditAccount:
        # The command cache hands out a copy per command; the generic deepcopy
        # cost 0.15 ms a command. Blocks and holds are the only mutable parts.
        # (Copied field by field: dataclasses.replace costs 3 us a block, most
        # of a command's time on an account with 1,000 live blocks.)
        blocks = {k: _copied(b) for k, b in self.blocks.items()}
        return self._copy(blocks, [blocks[b.block_id] for b in self._order])

    def fork(self) -> CreditAccount:
        """A copy for one attempt at a batch (``Unit``): a deepcopy, except
        that the two share their ``Block`` objects, which no event changes in
        place (``draw`` replaces the blocks it draws from), so that neither
        sees the other's changes. A batch of 10,000 commands copies as many
        accounts: copying their blocks was most of that copying, and most of
        the objects the garbage collector walks after the batch."""
        return self._copy(dict(self.blocks), list(self._order))

    def _copy(self, blocks: dict[str, Block], order: list[Block]) -> CreditAccount:
        copied = object.__new__(type(self))
        state = dict(self.__dict__)
        state["blocks"] = blocks
        state["holds"] = {k: _copied_hold(h) for k, h in self.holds.items()}
        state["_order"] = order
        state["_marked"] = dict(self._marked)
        state["_pending_events"] = list(self._pending_events)
        copied.__dict__.update(state)
        return copied

    # -- state helpers ----------------------------------------------------------
    # Events change blocks and holds only through these, which keep the
    # derived attributes current (check_invariants compares them after every
    # command with what they derive from).

    @property
    def held(self) -> int:
        return self._held

    @property
    def available(self) -> int:
        """What the account may spend or hold now: balance - held + credit
        limit. The one definition of available credits; below zero only
        after a limit was lowered below what is in use."""
        return self.balance - self._held + self.credit_limit

    def add_block(self, block: Block) -> None:
        replaced = self.blocks.get(block.block_id)
        if replaced is not None:  # never by the ledger's own events (entry ids are unique)
            self._unorder(replaced)
        self.blocks[block.block_id] = block
        bisect.insort(self._order, block, key=draw_key)

    def _unorder(self, block: Block) -> None:
        at = bisect.bisect_left(self._order, draw_key(block), key=draw_key)
        if at < len(self._order) and self._order[at] is block:
            del self._order[at]
        else:  # not where its key says: check_invariants reports the disorder
            self._order = [b for b in self._order if b is not block]

    def _reorder(self, block: Block, drawn: Block) -> None:
        """Puts ``drawn`` where ``block`` is in the draw order (their keys are the same)."""
        at = bisect.bisect_left(self._order, draw_key(block), key=draw_key)
        if at < len(self._order) and self._order[at] is block:
            self._order[at] = drawn
        else:  # not where its key says: check_invariants reports the disorder
            self._order = [drawn if b is block else b for b in self._order]

    def draw(self, draws: Iterable[list[Any]]) -> None:
        for block_id, credits in draws:
            block = self.blocks[block_id]
            # A new block with the new remainder, never a change in place: a
            # forked account shares its blocks with the one it was forked from.
            drawn: Block = _copied(block)
            drawn.remaining -= credits
            if drawn.remaining == 0:
                del self.blocks[block_id]
                self._unorder(block)
            else:
                self.blocks[block_id] = drawn
                self._reorder(block, drawn)

    def open(self, hold: Hold) -> None:
        if hold.reservation_id in self.holds:  # as for add_block: replaces, as a replay would have it
            self.close(hold.reservation_id)
        self.holds[hold.reservation_id] = hold
        marked = self._marked
        for block_id, credits in hold.allocations:
            if credits:
                marked[block_id] = marked.get(block_id, 0) + credits
        self._held += hold.amount

    def close(self, reservation_id: str) -> None:
        hold = self.holds.pop(reservation_id)
        marked = self._marked
        for block_id, credits in hold.allocations:
            left = marked.get(block_id, 0) - credits
            if left:
                marked[block_id] = left
            else:
                marked.pop(block_id, None)
        self._held -= hold.amount

    def free_in_order(self, now: datetime) -> Iterator[tuple[str, int]]:
        """Unearmarked credits per live block, in draw order, as ``free_credits``
        gives them; lazily, so a draw stops at the blocks it needs."""
        marked = self._marked
        for block in self._order:
            if block.expires_at is not None and block.expires_at <= now:
                continue
            credits = block.remaining - marked.get(block.block_id, 0)
            if credits > 0:
                yield block.block_id, credits

    def free(self, now: datetime) -> list[tuple[str, int]]:
        return list(self.free_in_order(now))

    # -- commands -----------------------------------------------------------------
    # Each command checks, then triggers exactly the events that record its
    # decision (including which blocks it drew from), so a replay never depends
    # on the allocation rules of the code that reads it.

    def apply_due(self, now: datetime) -> None:
        """Releases holds past their expiry, then expires lapsed blocks' free credits."""
        for hold in due(self.holds.values(), now) if self.holds else ():
            self.trigger_event(
                self.Released,
                reservation_id=UUID(hold.reservation_id),
                reason=EXPIRED_REASON,
                key=None,
                timestamp=now,
            )
        # Lapsed blocks lead the draw order (soonest expiry first): the scan
        # stops at the first live one.
        lapsing = []
        for block in self._order:
            if block.expires_at is None or block.expires_at > now:
                break
            free = block.remaining - self._marked.get(block.block_id, 0)
            if free > 0:
                lapsing.append((block.block_id, free))
        for block_id, amount in lapsing:
            self.trigger_event(
                self.Expired,
                entry_id=expiration_entry_id(self.id, self.version + 1),
                block_id=UUID(block_id),
                amount=amount,
                timestamp=now,
            )
        self.repay(now)

    def repay(self, now: datetime) -> None:
        """Pays off debt from the free credits of live blocks, in draw order
        (``Repaid``), so that an account never has both: a grant, a release or
        a settle that frees credits while the account is in debt repays it
        first. Lapsed credits repay nothing (they expire)."""
        if self.debt <= 0:
            return
        draws, short = take_upto(self.debt, self.free_in_order(now))
        if draws:
            self.trigger_event(self.Repaid, amount=self.debt - short, draws=draws, timestamp=now)

    def grant(
        self,
        *,
        entry_id: UUID,
        amount: int,
        kind: CreditKind,
        description: str,
        reference_type: str | None,
        reference_id: str | None,
        expires_at: datetime | None,
        actor: str | None,
        key: str,
        now: datetime,
    ) -> None:
        if self.balance + amount + self.credit_limit > MAX_CREDITS:
            raise InvalidAmount(
                f"granting {amount} would take the balance of user {self.user_id} "
                f"past the limit of {MAX_CREDITS} credits"
                + (f" (less its credit limit of {self.credit_limit})" if self.credit_limit else "")
            )
        if expires_at is not None and expires_at <= now:
            raise InvalidArgument(
                f"expires_at {expires_at.isoformat()} is not later than now ({now.isoformat()}): "
                "the grant would lapse at once",
                param="expires_at",
            )
        if len(self.blocks) >= MAX_LIVE_BLOCKS:
            raise AccountLimitReached(self.user_id, "live credit blocks", MAX_LIVE_BLOCKS)
        self.trigger_event(
            self.Granted,
            entry_id=entry_id,
            amount=amount,
            kind=str(kind),
            description=description,
            reference_type=reference_type,
            reference_id=reference_id,
            expires_at=expires_at,
            actor=actor,
            key=key,
            timestamp=now,
        )
        self.repay(now)

    def debit(
        self,
        *,
        entry_id: UUID,
        amount: int,
        kind: CreditKind,
        description: str,
        reference_type: str | None,
        reference_id: str | None,
        actor: str | None,
        key: str,
        now: datetime,
    ) -> None:
        draws = self._on_account(amount, now)
        self.trigger_event(
            self.Debited,
            entry_id=entry_id,
            amount=amount,
            kind=str(kind),
            description=description,
            reference_type=reference_type,
            reference_id=reference_id,
            actor=actor,
            draws=draws,
            key=key,
            timestamp=now,
        )

    def claw_back(
        self,
        *,
        entry_id: UUID,
        wanted: int,
        block_id: str | None,
        from_other_credits: bool,
        description: str,
        reference_type: str | None,
        reference_id: str | None,
        key: str,
        now: datetime,
    ) -> int:
        """Takes back up to ``wanted`` credits after a refund: the refunded
        grant's own block first (``block_id``), then, if allowed, any other
        unearmarked credits. Spent, held and lapsed credits are not taken, so
        this never refuses; it returns how many credits it took."""
        if wanted <= 0:
            raise InvalidAmount(f"a claw back must want a positive number of credits, got {wanted}")
        free = self.free(now)
        sources = [s for s in free if s[0] == block_id]
        if from_other_credits:
            sources += [s for s in free if s[0] != block_id]
        taken = min(wanted, sum(credits for _, credits in sources))
        if taken == 0:
            return 0
        draws = take(taken, sources)
        if draws is None:  # cannot happen: taken is at most what the sources hold
            raise InvariantViolation(f"claw back of {taken} credits found fewer in its sources")
        self.trigger_event(
            self.Debited,
            entry_id=entry_id,
            amount=taken,
            kind=str(CreditKind.REFUND),
            description=description,
            reference_type=reference_type,
            reference_id=reference_id,
            actor=None,
            draws=draws,
            key=key,
            timestamp=now,
        )
        return taken

    def reserve(
        self, *, reservation_id: UUID, job_id: UUID, amount: int, expires_at: datetime, key: str, now: datetime
    ) -> None:
        if expires_at <= now:
            raise InvalidArgument(
                f"expires_at {expires_at.isoformat()} is not later than now ({now.isoformat()}): "
                "the hold would lapse at once",
                param="expires_at",
            )
        if len(self.holds) >= MAX_OPEN_HOLDS:
            raise AccountLimitReached(self.user_id, "open holds", MAX_OPEN_HOLDS)
        # Beyond the free credits, the hold is on credit (its allocations sum
        # to less than its amount).
        allocations = self._on_account(amount, now)
        self.trigger_event(
            self.Reserved,
            reservation_id=reservation_id,
            job_id=job_id,
            amount=amount,
            expires_at=expires_at,
            allocations=allocations,
            key=key,
            timestamp=now,
        )

    def open_hold(self, reservation_id: UUID) -> Hold:
        try:
            return self.holds[str(reservation_id)]
        except KeyError:
            raise UnknownReservation(reservation_id, self.user_id) from None

    def settle(self, *, reservation_id: UUID, entry_id: UUID, actual: int, key: str, now: datetime) -> None:
        hold = self.open_hold(reservation_id)
        backed = drawn(hold.allocations)
        if actual <= backed:
            draws = take(actual, ((b, c) for b, c in hold.allocations))
            assert draws is not None  # at most what the allocations sum to
        else:
            # The hold's earmarks, then free credits, then credit: within
            # the hold's amount that credit was held already; the extra must
            # be available.
            extra = actual - hold.amount
            if extra > 0 and extra > self.available:
                raise InsufficientCredits(self.user_id, extra, self.available)
            more, _ = take_upto(actual - backed, self.free_in_order(now))
            draws = merge_draws(hold.allocations, more)
        self.trigger_event(
            self.Settled,
            reservation_id=reservation_id,
            entry_id=entry_id,
            amount=actual,
            draws=draws,
            key=key,
            timestamp=now,
        )
        self.repay(now)

    def release(self, *, reservation_id: UUID, reason: str, key: str, now: datetime) -> None:
        self.open_hold(reservation_id)
        self.trigger_event(self.Released, reservation_id=reservation_id, reason=reason, key=key, timestamp=now)
        self.repay(now)

    def _on_account(self, amount: int, now: datetime) -> list[list[Any]]:
        """The draws for a debit or a hold of ``amount``: free credits in draw
        order, and beyond them credit, down to the floor of minus the credit
        limit (InsufficientCredits past it)."""
        if amount > self.available:
            raise InsufficientCredits(self.user_id, amount, self.available)
        draws, short = take_upto(amount, self.free_in_order(now))
        if short > self.credit_limit:  # cannot happen: available counts the free credits
            raise InvariantViolation(f"a draw of {amount} credits fell {short} short of the free credits")
        return draws

    def set_limit(self, *, limit_credits: int, reason: str, actor: str, key: str, now: datetime) -> None:
        """Sets the credit limit. Lowering it below what is in use is allowed:
        new debits are then refused until the account is back above the floor."""
        if self.balance + limit_credits > MAX_CREDITS:
            raise InvalidAmount(
                f"a credit limit of {limit_credits} with the balance of {self.balance} of user {self.user_id} "
                f"would put the available credits past {MAX_CREDITS}",
                param="limit_credits",
            )
        self.trigger_event(
            self.LimitSet, limit_credits=limit_credits, reason=reason, actor=actor, key=key, timestamp=now
        )

    # -- balance thresholds ---------------------------------------------------------

    def watched(self) -> bool:
        """Whether crossings are recorded: the host or the plan gave thresholds."""
        return self.host_thresholds is not None or self.plan_thresholds is not None

    def thresholds(self) -> tuple[Threshold, ...]:
        """The thresholds in force besides depletion: the host's when set, else the plan's."""
        data = self.plan_thresholds if self.host_thresholds is None else self.host_thresholds
        return thresholds_from_data(data) if data else ()

    def refire(self, watched_before: bool) -> None:
        """The fired set after the thresholds or their base changed
        (``initially_fired``): changing thresholds never notifies by itself;
        an account watched from now on starts depleted when it is at 0."""
        if not self.watched():
            self.fired = ()
            return
        previously = self.fired if watched_before else ((DEPLETED,) if self.available <= 0 else ())
        self.fired = initially_fired(self.thresholds(), self.period_grant, previously, self.available)

    def set_balance_thresholds(
        self, thresholds: tuple[Threshold, ...] | None, *, actor: str | None, key: str, now: datetime
    ) -> None:
        self.trigger_event(
            self.BalanceThresholdsSet,
            thresholds=None if thresholds is None else thresholds_data(thresholds),
            actor=actor,
            key=key,
            timestamp=now,
        )

    def adopt_plan_thresholds(
        self, *, plan: str, thresholds: tuple[Threshold, ...] | None, period_grant_credits: int, now: datetime
    ) -> None:
        """Records a plan's default thresholds (None: it has none) and the
        period's grant, when they differ from the account's. An account that
        neither its host nor its plan watches records nothing."""
        data = None if thresholds is None else thresholds_data(thresholds)
        if data is None and not self.watched():
            return
        current = None if self.plan_thresholds is None else list(self.plan_thresholds)
        if current == data and self.period_grant == period_grant_credits:
            return
        self.trigger_event(
            self.PlanThresholdsAdopted,
            plan=plan,
            thresholds=data,
            period_grant_credits=period_grant_credits,
            timestamp=now,
        )

    def cross_thresholds(self, now: datetime) -> None:
        """Records the crossings of the account's state now: run once per
        transaction, after its commands (``Unit.pending``). Decided from
        ``available`` alone."""
        if self.host_thresholds is None and self.plan_thresholds is None:
            return  # not watched: the common case costs two attribute reads
        available = self.available
        fired = self.fired
        for crossing in crossings(self.thresholds(), self.period_grant, fired, available):
            if crossing.fired and crossing.threshold is None:
                self.trigger_event(self.BalanceDepleted, available_credits=available, timestamp=now)
            elif crossing.fired:
                self.trigger_event(
                    self.BalanceLow,
                    threshold=crossing.threshold_id,
                    level_credits=crossing.level_credits,
                    available_credits=available,
                    timestamp=now,
                )
            else:
                self.trigger_event(
                    self.BalanceRecovered,
                    threshold=crossing.threshold_id,
                    level_credits=crossing.level_credits,
                    available_credits=available,
                    timestamp=now,
                )

    # -- invariants ---------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raises InvariantViolation when the state is inconsistent. Runs after every command."""
        if self._holds_without_holds():
            return
        problems = []
        if not 0 <= self.credit_limit <= MAX_CREDIT_LIMIT:
            problems.append(f"credit limit {self.credit_limit} outside 0..{MAX_CREDIT_LIMIT}")
        if self.debt < 0:
            problems.append(f"debt {self.debt} < 0")
        if self.balance != sum(b.remaining for b in self.blocks.values()) - self.debt:
            problems.append(f"balance {self.balance} != sum of block remainders - debt {self.debt}")
        held = sum(h.amount for h in self.holds.values())
        if held < 0:
            problems.append(f"held {held} < 0")
        unbacked = held - sum(drawn(h.allocations) for h in self.holds.values())
        if self.debt == 0 and unbacked == 0 and self.balance - held < 0:
            # On credit, available may be below zero after the limit was
            # lowered; the commands refuse any debit that would take it there.
            problems.append(f"available {self.balance - held} < 0")
        for block in self.blocks.values():
            if not 0 < block.remaining <= block.granted:
                problems.append(f"block {block.block_id} remainder {block.remaining} outside (0, {block.granted}]")
        marks = earmarks(self.holds.values())
        for block_id, credits in marks.items():
            marked = self.blocks.get(block_id)
            if marked is None or credits > marked.remaining:
                problems.append(f"block {block_id} earmarks {credits} credits it does not have")
        for hold in self.holds.values():
            if not 0 <= drawn(hold.allocations) <= hold.amount:
                problems.append(f"hold {hold.reservation_id} allocations sum outside 0..{hold.amount}")
        if self.debt > 0:
            unmarked = [b.block_id for b in self.blocks.values() if b.remaining > marks.get(b.block_id, 0)]
            if unmarked:
                problems.append(f"debt {self.debt} beside free credits in blocks {', '.join(unmarked[:3])}")
        problems.extend(self._derived_problems(held, marks))
        if problems:
            raise InvariantViolation(f"account of user {self.user_id}: " + "; ".join(problems))

    def _holds_without_holds(self) -> bool:
        """Whether an account without holds (most accounts, after most
        commands) meets every invariant ``check_invariants`` checks, in one
        pass over its blocks; False when it has holds or any check fails, and
        ``check_invariants`` then checks (and names the problems) in full.
        Without holds, nothing is held, allocated or earmarked."""
        if self.holds or self._held != 0 or self._marked:
            return False
        if not 0 <= self.credit_limit <= MAX_CREDIT_LIMIT or self.debt != 0:
            return False  # a debt: there is a problem exactly when there is a block (all have credits)
        blocks = self.blocks
        order = self._order
        if len(order) != len(blocks):
            return False
        remainders = 0
        before: tuple[bool, datetime, int] | None = None
        for block in order:
            remaining = block.remaining
            if not 0 < remaining <= block.granted or blocks.get(block.block_id) is not block:
                return False
            key = draw_key(block)
            if before is not None and not before < key:
                return False
            before = key
            remainders += remaining
        # Every block is in the order once (as many, each the block of its id).
        return self.balance == remainders and self.balance >= 0

    def _derived_problems(self, held: int, marks: dict[str, int]) -> list[str]:
        """Where the derived attributes disagree with what they derive from."""
        problems = []
        if self._held != held:
            problems.append(f"running held {self._held} != {held} held by the open holds")
        if self._marked != {b: c for b, c in marks.items() if c}:
            problems.append("running earmarks differ from the open holds' allocations")
        order = self._order
        in_order = len(order) < 2 or all(a < b for a, b in pairwise(map(draw_key, order)))
        blocks = self.blocks
        if len(order) != len(blocks) or not in_order or any(blocks.get(b.block_id) is not b for b in order):
            problems.append("the draw order is not the blocks in draw order")
        return problems


class CommandRecord(Aggregate, created_event_name="Recorded"):
    """An idempotency key, the fingerprint of the command it was first used
    for, and that command's receipt."""

    TOPIC = f"{TOPIC_PREFIX}:CommandRecord"

    class Event(Aggregate.Event):
        TOPIC = f"{TOPIC_PREFIX}:CommandRecord.Event"

    class Recorded(Aggregate.Created):
        TOPIC = f"{TOPIC_PREFIX}:CommandRecord.Recorded"
        key: str
        command: str
        fingerprint: str
        receipt: dict[str, Any]
        #: The command's canonical arguments (``Command.arguments``); None in
        #: records written before they were kept.
        arguments: dict[str, Any] | None = None

    class Snapshot(BaseSnapshot):
        TOPIC = f"{TOPIC_PREFIX}:CommandRecord.Snapshot"

    def __init__(
        self, key: str, command: str, fingerprint: str, receipt: dict[str, Any], arguments: dict[str, Any] | None = None
    ) -> None:
        self.key = key
        self.command = command
        self.fingerprint = fingerprint
        self.receipt = receipt
        self.arguments = arguments
