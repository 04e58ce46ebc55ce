"""The public facade: ``Ledger``, opened from a URL."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from ._app import MAX_BATCH_COMMANDS, Engine, LedgerApplication
from ._billing import (
    ActivateSubscription,
    CancelSubscription,
    ChangePlan,
    DefinePlan,
    ExpireSubscription,
    MarkPastDue,
    PauseSubscription,
    RecoverSubscription,
    RenewSubscription,
    ResumeSubscription,
    StartSubscription,
    UnpauseSubscription,
    due_changes,
)
from ._clock import Clock, SystemClock, require_utc
from ._domain import CreditAccount, Reservation, account_id_for
from ._entitlements import Entitlements, PlanView, SubscriptionView, entitlements_for, plan_view, subscription_view
from ._errors import ConfigurationError, InvalidArgument, UnknownAccount, UnknownReservation, ViewsBehind
from ._plans import DEFAULT_CATALOG, Plan, PlanTerms, plan_id_for
from ._readmodels import Views
from ._storage import StoreConfig, parse_url
from ._streams import stream_reader
from ._subscriptions import (
    CreditPolicy,
    InvalidTransition,
    SubscriberSlot,
    Subscription,
    UnknownPlan,
    UnknownSubscription,
    pause_mode_of,
    slot_id_for,
)
from ._types import (
    AccountEvent,
    AdjustCredits,
    Balance,
    Command,
    CreditBlock,
    CreditKind,
    GrantCredits,
    Receipt,
    ReleaseReservation,
    ReserveCredits,
    SettleReservation,
    SpendCredits,
    check_uuid,
)
from ._types import Reservation as ReservationView

DEFAULT_URL = "sqlite:///pingvas-ledger.sqlite3"
MAX_HISTORY_PAGE = 10_000
SWEEP_PAGE = 1_000
#: Changes one tick makes to one subscription: renewals of missed periods.
MAX_DUE_PER_TICK = 24


class Ledger:
    """An event-sourced credit ledger.

    >>> from uuid import UUID
    >>> ledger = Ledger("memory://")
    >>> alice = UUID(int=1)
    >>> ledger.grant(alice, 100, "bonus", key="welcome:alice").balance_credits
    100
    >>> ledger.balance(alice).available_credits
    100
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        clock: Clock | None = None,
        max_attempts: int = 16,
        sync_views: bool = False,
        sync_user_credits: bool = False,
        sync_user_tier: bool = False,
        credit_policy: CreditPolicy | None = None,
    ) -> None:
        """``sync_views``: every command brings the read models up to date in
        this process before it returns (read-your-writes for the embedded
        default). ``sync_user_credits``: the views keep ``users.credits`` equal
        to the balance (the host's table must exist); ``sync_user_tier``: the
        views keep ``users.tier`` and ``users.storage_quota`` on the user's
        entitled plan. ``credit_policy``: how
        subscription changes move credits (default: full upgrade difference,
        subscription credits expire at the end of their period)."""
        if type(max_attempts) is not int or not 1 <= max_attempts <= 100:
            raise InvalidArgument(f"max_attempts must be an int within 1..100, got {max_attempts!r}")
        self.config: StoreConfig = parse_url(url)
        self.clock: Clock = clock or SystemClock()
        if self.config.backend == "sqlite":
            assert self.config.sqlite_path is not None
            self.config.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        with _schema_lock(self.config):
            try:
                self.app = LedgerApplication(env=self.config.eventsourcing_env())
            except Exception as exc:  # eventsourcing raises OSError and driver errors here
                raise ConfigurationError(f"cannot open ledger store {self.config.backend}: {exc}") from exc
        self.sync_views = sync_views
        self.sync_user_credits = sync_user_credits
        self.sync_user_tier = sync_user_tier
        self._views: Views | None = None
        self.credit_policy = credit_policy or CreditPolicy()
        self.engine = Engine(
            self.app,
            self.clock,
            stream_reader(self.app, self.config.backend),
            max_attempts=max_attempts,
            policy=self.credit_policy,
        )

    # -- lifecycle --------------------------------------------------------------

    def _sync_views(self, result: object) -> None:
        """With ``sync_views``, brings the read models up to date. The command
        is already recorded: a failure here says so, with its result."""
        if not self.sync_views:
            return
        try:
            self.views.catch_up()
        except Exception as exc:
            raise ViewsBehind(result, exc) from exc

    @property
    def views(self) -> Views:
        """The read models (credit_transactions, credit_reservations, …)."""
        if self._views is None:
            self._views = Views(
                self.app, self.config, sync_user_credits=self.sync_user_credits, sync_user_tier=self.sync_user_tier
            )
        return self._views

    def close(self) -> None:
        if self._views is not None:
            self._views.close()
        self.app.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands -----------------------------------------------------------------

    def execute(self, command: Command) -> Receipt:
        """Runs one command; a retry with the same key returns the first receipt."""
        receipt = self.engine.execute([command], single=True)[0]
        self._sync_views(receipt)
        return receipt

    def execute_batch(self, commands: Sequence[Command]) -> list[Receipt]:
        """Runs up to 10,000 commands in one transaction: all of them, or none."""
        receipts = self.engine.execute(list(commands))
        self._sync_views(receipts)
        return receipts

    def grant(
        self,
        user_id: UUID,
        amount_credits: int,
        kind: CreditKind | str,
        *,
        key: str,
        description: str = "",
        reference_type: str | None = None,
        reference_id: str | None = None,
        expires_at: datetime | None = None,
    ) -> Receipt:
        """Adds credits; with ``expires_at`` they form a block that lapses then."""
        return self.execute(
            GrantCredits(
                key=key,
                user_id=user_id,
                amount_credits=amount_credits,
                kind=kind,  # type: ignore[arg-type]  # validated into CreditKind
                description=description,
                reference_type=reference_type,
                reference_id=reference_id,
                expires_at=expires_at,
            )
        )

    def spend(
        self,
        user_id: UUID,
        amount_credits: int,
        *,
        key: str,
        kind: CreditKind | str = CreditKind.API_USE,
        description: str = "",
        reference_type: str | None = None,
        reference_id: str | None = None,
    ) -> Receipt:
        """Debits available credits at once."""
        return self.execute(
            SpendCredits(
                key=key,
                user_id=user_id,
                amount_credits=amount_credits,
                kind=kind,  # type: ignore[arg-type]
                description=description,
                reference_type=reference_type,
                reference_id=reference_id,
            )
        )

    def reserve(self, user_id: UUID, job_id: UUID, amount_credits: int, expires_at: datetime, *, key: str) -> Receipt:
        """Holds credits for a job; ``receipt.reservation_id`` names the hold."""
        return self.execute(
            ReserveCredits(
                key=key, user_id=user_id, job_id=job_id, amount_credits=amount_credits, expires_at=expires_at
            )
        )

    def settle(self, reservation_id: UUID, actual_credits: int, *, key: str, user_id: UUID | None = None) -> Receipt:
        """Charges ``actual_credits`` for a hold and frees the rest of it."""
        return self.execute(
            SettleReservation(key=key, reservation_id=reservation_id, actual_credits=actual_credits, user_id=user_id)
        )

    def release(self, reservation_id: UUID, reason: str, *, key: str, user_id: UUID | None = None) -> Receipt:
        """Frees a hold without charging it."""
        return self.execute(ReleaseReservation(key=key, reservation_id=reservation_id, reason=reason, user_id=user_id))

    def adjust(self, user_id: UUID, delta_credits: int, reason: str, actor: str, *, key: str) -> Receipt:
        """An admin adjustment of either sign; never takes the balance below held credits."""
        return self.execute(
            AdjustCredits(key=key, user_id=user_id, delta_credits=delta_credits, reason=reason, actor=actor)
        )

    def expire_holds(self, now: datetime | None = None) -> int:
        """Releases every hold whose ``expires_at`` has passed, and records the
        expiry of lapsed credits on those accounts. Returns the number of account
        events recorded (releases and expirations). For a scheduler; safe to run
        concurrently and repeatedly."""
        moment = self.clock.now() if now is None else require_utc(now, "now")
        due = sorted({user_id for user_id, expires_at in self._open_holds() if expires_at <= moment})
        recorded = 0
        for start in range(0, len(due), SWEEP_PAGE):
            recorded += self.engine.sweep(due[start : start + SWEEP_PAGE], moment)
        self._sync_views(recorded)
        return recorded

    def record_due(self, user_ids: Sequence[UUID], now: datetime | None = None) -> int:
        """Records due hold releases and lapsed credit blocks for these accounts
        (at most 10,000) in one transaction; returns the number of account
        events recorded (releases and expirations)."""
        moment = self.clock.now() if now is None else require_utc(now, "now")
        if len(user_ids) > MAX_BATCH_COMMANDS:
            raise InvalidArgument(f"at most {MAX_BATCH_COMMANDS} accounts per call")
        recorded = self.engine.sweep([check_uuid(u, "user_id") for u in user_ids], moment)
        self._sync_views(recorded)
        return recorded

    def _open_holds(self) -> Iterator[tuple[UUID, datetime]]:
        # Reads the reservation events from the notification log. Bounded pages;
        # memory grows with the number of open holds only.
        open_holds: dict[UUID, tuple[UUID, datetime]] = {}
        for event in self._scan([Reservation.Reserved.TOPIC, Reservation.Closed.TOPIC]):
            if isinstance(event, Reservation.Reserved):
                open_holds[event.originator_id] = (event.user_id, event.expires_at)
            else:
                open_holds.pop(event.originator_id, None)
        yield from open_holds.values()

    # -- queries --------------------------------------------------------------------

    def _fresh(self, aggregate_id: UUID, *, snapshots: bool = True) -> Any:
        # Queries read the store, not the command cache, so that writes made by
        # other processes show at once.
        return self.engine.reader.load([aggregate_id], snapshots=snapshots).get(aggregate_id)

    def _account(self, user_id: UUID) -> CreditAccount:
        account = self._fresh(account_id_for(check_uuid(user_id, "user_id")))
        if not isinstance(account, CreditAccount):
            raise UnknownAccount(user_id)
        return account

    def balance(self, user_id: UUID) -> Balance:
        """Balance, held and available credits and the open blocks, as of now.
        Holds past their expiry and lapsed credits are left out even before a
        sweep records them."""
        account = self._account(user_id)
        now = self.clock.now()
        account.apply_due(now)  # in memory only: a query records nothing
        blocks = tuple(
            CreditBlock(
                block_id=UUID(b.block_id),
                kind=CreditKind(b.kind),
                granted_credits=b.granted,
                remaining_credits=b.remaining,
                granted_at=b.granted_at,
                expires_at=b.expires_at,
            )
            for b in sorted(account.blocks.values(), key=lambda b: b.seq)
        )
        return Balance(
            user_id=user_id,
            balance_credits=account.balance,
            held_credits=account.held,
            available_credits=account.available,
            blocks=blocks,
            as_of=now,
        )

    def reservation(self, reservation_id: UUID) -> ReservationView:
        """A hold as recorded: reserved, settled or released."""
        r = self._fresh(check_uuid(reservation_id, "reservation_id"), snapshots=False)
        if not isinstance(r, Reservation):
            raise UnknownReservation(reservation_id)
        return ReservationView(
            reservation_id=r.id,
            user_id=r.user_id,
            job_id=r.job_id,
            amount_credits=r.amount,
            expires_at=r.expires_at,
            reserved_at=r.created_on,
            status=r.status,  # type: ignore[arg-type]
            settled_credits=r.settled_credits,
            release_reason=r.release_reason,
            closed_at=r.closed_at,
        )

    def history(self, user_id: UUID, *, after_version: int = 0, limit: int = 1_000) -> list[AccountEvent]:
        """The account's recorded events, oldest first, a page at a time."""
        if type(limit) is not int or not 1 <= limit <= MAX_HISTORY_PAGE:
            raise InvalidArgument(f"limit must be within 1..{MAX_HISTORY_PAGE}, got {limit!r}")
        if type(after_version) is not int or after_version < 0:
            raise InvalidArgument(f"after_version must be an int >= 0, got {after_version!r}")
        self._account(user_id)
        events = self.app.events.get(account_id_for(user_id), gt=after_version or None, limit=limit)
        return [_describe(user_id, e) for e in events]

    # -- plans and subscriptions -----------------------------------------------------

    def define_plan(self, terms: PlanTerms, *, key: str | None = None, actor: str | None = None) -> Receipt:
        """Adds a plan to the catalog or revises it; same terms change nothing."""
        if key is None:
            # Keyed by the revision it makes: the same terms as the current ones
            # replay the current revision; other terms (earlier ones too) make
            # the next one.
            digest = hashlib.sha256(repr(terms.as_event_data()).encode()).hexdigest()[:16]
            current = self._fresh(plan_id_for(terms.name), snapshots=False)
            revision = 1
            if isinstance(current, Plan):
                revision = current.revision + (0 if current.terms_data == terms.as_event_data() else 1)
            key = f"plan:{terms.name}:revision:{revision}:{digest}"
        return self.execute(DefinePlan(key=key, terms=terms, actor=actor))

    def install_default_catalog(self) -> list[Receipt]:
        """The seed's plans (starter, pro, studio, enterprise), once."""
        return [self.define_plan(terms) for terms in DEFAULT_CATALOG]

    def plan(self, name: str) -> PlanView:
        plan = self._fresh(plan_id_for(name), snapshots=False)
        if not isinstance(plan, Plan):
            raise UnknownPlan(name)
        return plan_view(plan.terms, plan.revision)

    def plan_history(self, name: str) -> list[PlanView]:
        """Every revision of a plan's terms, oldest first."""
        self.plan(name)
        views = []
        for revision, event in enumerate(self.app.events.get(plan_id_for(name)), start=1):
            views.append(plan_view(PlanTerms.from_event_data(event.terms), revision))  # type: ignore[attr-defined]
        return views

    def start_subscription(
        self,
        user_id: UUID,
        plan: str,
        *,
        key: str,
        billing_cycle: str = "monthly",
        trial_days: int = 0,
        lemon_squeezy_subscription_id: str | None = None,
        lemon_squeezy_customer_id: str | None = None,
        actor: str | None = None,
    ) -> Receipt:
        """Starts a trial (``trial_days``) or a paid period, granting the plan's credits."""
        return self.execute(
            StartSubscription(
                key=key,
                user_id=user_id,
                plan=plan,
                billing_cycle=billing_cycle,  # type: ignore[arg-type]  # validated
                trial_days=trial_days,
                lemon_squeezy_subscription_id=lemon_squeezy_subscription_id,
                lemon_squeezy_customer_id=lemon_squeezy_customer_id,
                actor=actor,
            )
        )

    def change_plan(
        self, subscription_id: UUID, plan: str, *, key: str, actor: str | None = None, reason: str | None = None
    ) -> Receipt:
        return self.execute(ChangePlan(key=key, subscription_id=subscription_id, plan=plan, actor=actor, reason=reason))

    def activate_subscription(self, subscription_id: UUID, *, key: str) -> Receipt:
        return self.execute(ActivateSubscription(key=key, subscription_id=subscription_id))

    def renew_subscription(self, subscription_id: UUID, *, key: str) -> Receipt:
        return self.execute(RenewSubscription(key=key, subscription_id=subscription_id))

    def mark_past_due(self, subscription_id: UUID, *, key: str) -> Receipt:
        return self.execute(MarkPastDue(key=key, subscription_id=subscription_id))

    def recover_subscription(self, subscription_id: UUID, *, key: str) -> Receipt:
        return self.execute(RecoverSubscription(key=key, subscription_id=subscription_id))

    def cancel_subscription(
        self,
        subscription_id: UUID,
        *,
        key: str,
        at_period_end: bool = True,
        reason: str | None = None,
        actor: str | None = None,
    ) -> Receipt:
        return self.execute(
            CancelSubscription(
                key=key, subscription_id=subscription_id, at_period_end=at_period_end, reason=reason, actor=actor
            )
        )

    def resume_subscription(self, subscription_id: UUID, *, key: str) -> Receipt:
        return self.execute(ResumeSubscription(key=key, subscription_id=subscription_id))

    def pause_subscription(self, subscription_id: UUID, *, key: str, mode: str = "void") -> Receipt:
        """Pauses an active subscription: ``mode="void"`` (no service: the
        user is on the free tier until unpaused) or ``"free"`` (the service
        continues unpaid: the plan stays entitled). No credits either way."""
        return self.execute(PauseSubscription(key=key, subscription_id=subscription_id, mode=pause_mode_of(mode)))

    def unpause_subscription(self, subscription_id: UUID, *, key: str) -> Receipt:
        return self.execute(UnpauseSubscription(key=key, subscription_id=subscription_id))

    def expire_subscription(self, subscription_id: UUID, *, key: str, reason: str = "period ended") -> Receipt:
        return self.execute(ExpireSubscription(key=key, subscription_id=subscription_id, reason=reason))

    def subscription(self, subscription_id: UUID) -> SubscriptionView:
        s = self._fresh(check_uuid(subscription_id, "subscription_id"))
        if not isinstance(s, Subscription):
            raise UnknownSubscription(subscription_id)
        return subscription_view(s)

    def _live_subscription(self, user_id: UUID) -> Subscription | None:
        slot = self._fresh(slot_id_for(check_uuid(user_id, "user_id")), snapshots=False)
        if not isinstance(slot, SubscriberSlot) or slot.live is None:
            return None
        s = self._fresh(slot.live)
        return s if isinstance(s, Subscription) else None

    def subscription_of(self, user_id: UUID) -> SubscriptionView | None:
        """The user's live subscription, if any."""
        s = self._live_subscription(user_id)
        return None if s is None else subscription_view(s)

    def entitlements(self, user_id: UUID) -> Entitlements:
        """Plan, features, credits per period, storage and queues the user has now."""
        s = self._live_subscription(user_id)
        now = self.clock.now()
        terms = None
        if s is not None:
            plan = self._fresh(plan_id_for(s.plan), snapshots=False)
            terms = plan.terms if isinstance(plan, Plan) else None
        return entitlements_for(user_id, s, terms, now)

    def tick(self, now: datetime | None = None) -> dict[str, int]:
        """Performs what falls due: trial ends and renewals (when the policy
        auto-renews), expiries at period end, stale holds, lapsed credits.
        Safe to run repeatedly and concurrently: every change is keyed."""
        moment = self.clock.now() if now is None else require_utc(now, "now")
        done = {"subscriptions": 0, "holds_and_lapses": 0}
        for chunk in _chunks(sorted(self._live_subscription_ids()), SWEEP_PAGE):
            for s in self.engine.reader.load(chunk).values():
                done["subscriptions"] += self._catch_up_subscription(s, moment)
        done["holds_and_lapses"] = self.expire_holds(moment)
        lapsing = sorted(self._users_with_lapsed_grants(moment))
        for chunk in _chunks(lapsing, SWEEP_PAGE):
            done["holds_and_lapses"] += self.engine.sweep(chunk, moment)
        self._sync_views(done)
        return done

    def _catch_up_subscription(self, s: Subscription, now: datetime) -> int:
        """Performs a subscription's due changes one at a time: a tick that ran
        late renews each missed period (at most MAX_DUE_PER_TICK). Counts only
        the changes this tick recorded: a replayed receipt is one another tick
        (running at the same time) recorded under the same key."""
        changes = 0
        for _ in range(MAX_DUE_PER_TICK):
            due = due_changes(s, now, auto_renew=self.credit_policy.auto_renew)
            if not due:
                break
            try:
                # As of the tick's moment, which may differ from the clock's.
                receipts = self.engine.execute(due, single=True, now=now)
            except InvalidTransition:
                break  # changed meanwhile (another tick, a webhook)
            changes += sum(1 for r in receipts if not r.replayed)
            fresh = self._fresh(s.id)
            if not isinstance(fresh, Subscription):
                break
            s = fresh
        return changes

    def _scan(self, topics: list[str]) -> Iterator[Any]:
        start = 1
        while True:
            page = self.app.recorder.select_notifications(start=start, limit=SWEEP_PAGE, topics=topics)
            for notification in page:
                yield self.app.mapper.to_domain_event(notification)
            if len(page) < SWEEP_PAGE:
                return
            start = page[-1].id + 1

    def _live_subscription_ids(self) -> set[UUID]:
        live: set[UUID] = set()
        for event in self._scan([Subscription.Started.TOPIC, Subscription.Expired.TOPIC]):
            if isinstance(event, Subscription.Started):
                live.add(event.originator_id)
            else:
                live.discard(event.originator_id)
        return live

    def _users_with_lapsed_grants(self, now: datetime) -> set[UUID]:
        # Accounts whose expiring grants have lapsed; recording is a no-op for
        # those already recorded. Reads the grants in pages from the log.
        accounts = {
            e.originator_id
            for e in self._scan([CreditAccount.Granted.TOPIC])
            if e.expires_at is not None and e.expires_at <= now
        }
        users = set()
        for event in self._scan([CreditAccount.Opened.TOPIC]):
            if event.originator_id in accounts:
                users.add(event.user_id)
        return users


def _chunks(items: Sequence[UUID], size: int) -> Iterator[list[UUID]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _describe(user_id: UUID, event: Any) -> AccountEvent:
    data = {
        k: v
        for k, v in vars(event).items()
        if k not in ("originator_id", "originator_version", "timestamp", "originator_topic")
    }
    return AccountEvent(
        user_id=user_id,
        version=event.originator_version,
        type=type(event).__name__.lower(),
        recorded_at=event.timestamp,
        data=data,
    )


# Any fixed number: the key of the advisory lock that serialises table creation.
_DDL_LOCK_KEY = 0x70696E6776


@contextmanager
def _schema_lock(config: StoreConfig) -> Iterator[None]:
    """On PostgreSQL, creates the schema if missing and holds an advisory lock
    while the tables are created: concurrent ``CREATE TABLE IF NOT EXISTS`` in
    several processes otherwise fails with "tuple concurrently updated"."""
    if config.backend != "postgresql":
        yield
        return
    try:
        conn = psycopg.connect(config.conninfo(), connect_timeout=round(config.pool_timeout_s), autocommit=True)
    except psycopg.Error as exc:
        raise ConfigurationError(f"cannot reach PostgreSQL at {config.pg_host}:{config.pg_port}: {exc}") from exc
    with conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_DDL_LOCK_KEY,))
        try:
            try:
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(config.pg_schema)))
            except psycopg.Error as exc:
                raise ConfigurationError(f"cannot create schema {config.pg_schema!r}: {exc}") from exc
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_DDL_LOCK_KEY,))
