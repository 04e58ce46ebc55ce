"""The public facade: ``Ledger``, opened from a URL."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from ledger.application.access import CheckResult, Checks
from ledger.application.billing import (
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
from ledger.application.commands import AdjustCredits, Command, GrantCredits, SpendCredits
from ledger.application.group import GroupCommit, GroupCommitPolicy
from ledger.application.holds import ReleaseReservation, ReserveCredits, SettleReservation, due_holders
from ledger.application.limits import SetCreditLimit
from ledger.application.pricing import (
    DefinePriceBook,
    PriceCache,
    ReserveForJob,
    recorded_quote,
    revisions,
)
from ledger.application.results import (
    AccountEvent,
    Balance,
    Entitlements,
    HoldReceipt,
    PlanView,
    PriceBookRevision,
    Quote,
    Receipt,
    Reservation,
    SubscriptionView,
    credit_blocks,
    entitlements_for,
    plan_view,
    subscription_view,
)
from ledger.application.sharing import (
    DEFAULT_REPLY_TIMEOUT_S,
    SharedGroupCommit,
    SharingStats,
    check_reply_timeout,
    check_share_path,
    identity_of,
)
from ledger.application.thresholds import BalanceThresholds, SetBalanceThresholds, parse_thresholds, thresholds_of
from ledger.application.unit import MAX_BATCH_COMMANDS, Engine
from ledger.clock import FUTURE_TOLERANCE, Clock, SystemClock, moment_for
from ledger.domain.checks import check_key, check_user_id, check_uuid
from ledger.domain.credits import CreditAccount, CreditKind, account_id_for
from ledger.domain.holds import HoldRecord
from ledger.domain.plans import DEFAULT_CATALOG, Plan, PlanTerms, check_plan_name, check_terms, plan_id_for
from ledger.domain.pricing import DEFAULT_PRICE_BOOK, PRICE_BOOK_ID, PriceBook, PriceBookRecord, check_price_book
from ledger.domain.subscriptions import (
    CreditPolicy,
    InvalidTransition,
    SubscriberSlot,
    Subscription,
    UnknownPlan,
    UnknownSubscription,
    pause_mode_of,
    slot_id_for,
)
from ledger.domain.thresholds import Threshold
from ledger.errors import (
    ConfigurationError,
    InvalidArgument,
    UnknownAccount,
    UnknownReservation,
    ViewsBehind,
    ViewsCorrupt,
)
from ledger.storage.base import Backend
from ledger.storage.config import StoreConfig, parse_url, redact
from ledger.storage.eventstore import LedgerApplication
from ledger.storage.factory import open_backend
from ledger.storage.freshness import CommandStats
from ledger.views.outbox import Outbox
from ledger.views.runner import Views

log = logging.getLogger("ledger.views")

DEFAULT_URL = "sqlite:///pingvas-ledger.sqlite3"
#: The environment variable a command line or a service reads its ledger URL from.
URL_ENV = "LEDGER_URL"
MAX_HISTORY_PAGE = 10_000
#: Versions are stored as 64-bit integers.
MAX_VERSION = 2**63 - 1
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
        create: bool = True,
        group_commit: GroupCommitPolicy | bool = False,
        share_group_commit: str | os.PathLike[str] | None = None,
        share_reply_timeout_s: float = DEFAULT_REPLY_TIMEOUT_S,
    ) -> None:
        """``sync_views``: every command brings the read models up to date in
        this process before it returns (read-your-writes for the embedded
        default). ``sync_user_credits``: the views keep ``users.credits`` equal
        to the balance (the host's table must exist); ``sync_user_tier``: the
        views keep ``users.tier`` and ``users.storage_quota`` on the user's
        entitled plan. ``credit_policy``: how
        subscription changes move credits (default: full upgrade difference,
        subscription credits expire at the end of their period).
        ``create=False``: open only a store that exists (a mistyped path
        raises ConfigurationError instead of creating an empty store).
        ``group_commit``: ``True`` or a ``GroupCommitPolicy`` runs ``execute``
        and the command methods through ``group_commit``, so that concurrent
        callers' commands share transactions (docs/group-commit.md).
        ``share_group_commit``: a socket path (in a directory only this user
        writes); the processes of one host that open the same store with the
        same path share one group commit: one of them runs every process's
        commands (``ledger.application.sharing``, docs/group-commit.md). A
        sent command whose reply takes longer than ``share_reply_timeout_s``
        runs in its own process instead."""
        if type(max_attempts) is not int or not 1 <= max_attempts <= 100:
            raise InvalidArgument(
                f"max_attempts must be an int within 1..100, got {max_attempts!r}", param="max_attempts"
            )
        if not isinstance(group_commit, bool | GroupCommitPolicy):
            raise InvalidArgument(
                f"group_commit must be a bool or a GroupCommitPolicy, not {type(group_commit).__name__}",
                param="group_commit",
            )
        share_path = None if share_group_commit is None else check_share_path(share_group_commit)
        reply_timeout_s = check_reply_timeout(share_reply_timeout_s)
        if share_path is not None and not (clock is None or type(clock) is SystemClock):
            raise InvalidArgument(
                "share_group_commit runs commands in another process, on its clock: it takes the system clock only",
                param="clock",
            )
        _check_options(clock, credit_policy, sync_views=sync_views, sync_user_credits=sync_user_credits,
                       sync_user_tier=sync_user_tier, create=create)  # fmt: skip
        self.config: StoreConfig = parse_url(url)
        self.url = redact(url)
        self.backend: Backend = open_backend(self.config)
        store_identity = self.backend.identity()
        if share_path is not None and store_identity is None:
            raise ConfigurationError(
                f"share_group_commit needs a store that processes share: {self.config.backend} is one process's"
            )
        self.clock: Clock = clock or SystemClock()
        if not create:
            self.backend.require_store()
        with self.backend.opening():
            try:
                self.app = LedgerApplication(env=self.backend.eventsourcing_env())
            except Exception as exc:  # eventsourcing raises OSError and driver errors here
                # Named by its URL (secrets hidden), not just its kind: the
                # default URL is a file in whatever directory the command ran.
                why = self.backend.why_opening_failed(exc)
                raise ConfigurationError(f"cannot open ledger store {self.url}: {exc}{why}") from exc
        self.backend.opened(self.app)
        self.app.write_locks = self.backend.write_locks(self.app)
        self.sync_views = sync_views
        self.sync_user_credits = sync_user_credits
        self.sync_user_tier = sync_user_tier
        self._views: Views | None = None
        self._checks: Checks | None = None
        self.credit_policy = credit_policy or CreditPolicy()
        self.engine = Engine(
            self.app,
            self.clock,
            self.backend.stream_reader(self.app),
            max_attempts=max_attempts,
            policy=self.credit_policy,
        )
        #: Whether ``execute`` goes through ``group_commit``.
        self.grouped = group_commit is not False
        self._group = GroupCommit(
            self.engine,
            group_commit if isinstance(group_commit, GroupCommitPolicy) else None,
            after_batch=self._sync_views,
        )
        self._shared: SharedGroupCommit | None = None
        if share_path is not None:
            self.grouped = True
            try:
                self._shared = SharedGroupCommit(
                    share_path,
                    self._group,
                    self._sharing_identity(store_identity, max_attempts),
                    reply_timeout_s=reply_timeout_s,
                )
            except BaseException:
                self.app.close()  # the store is open: a refused path must not leave its connections behind
                raise

    def __repr__(self) -> str:
        return f"Ledger({self.url!r})"

    # -- lifecycle --------------------------------------------------------------

    def _sync_views(self, result: object) -> None:
        """With ``sync_views``, brings the read models up to date. The command
        is already recorded: a failure here says so, with its result."""
        if not self.sync_views:
            return
        # The log's head now is at or past the command's own events: the
        # views must reach it, whoever projects them. Another process's
        # projector may well get there first; only views short of it are
        # behind.
        target = self.app.recorder.max_notification_id() or 0
        try:
            self.views.catch_up(until=target)
        except Exception as exc:
            try:
                reached = self.views.position() >= target
            except ViewsCorrupt:
                reached = False  # no position to tell: the views are behind, the command is recorded
            if reached:
                log.warning("views reached position %d though this catch-up failed: %s", target, exc)
                return
            raise ViewsBehind(result, exc) from exc

    @property
    def views(self) -> Views:
        """The read models (credit_transactions, credit_reservations, …)."""
        if self._views is None:
            self._views = Views(
                self.app, self.backend, sync_user_credits=self.sync_user_credits, sync_user_tier=self.sync_user_tier
            )
        return self._views

    @property
    def group_commit(self) -> GroupCommit:
        """This ledger's group commit: concurrent commands share transactions
        through it (with the policy the ledger was opened with, or the
        default one). ``execute`` uses it when the ledger was opened with
        ``group_commit``; a host may use it either way."""
        return self._group

    def _sharing_identity(self, store: object, max_attempts: int) -> bytes:
        """What the processes sharing group commit must agree on: the store, and what a command runs under."""
        options = (self.sync_views, self.sync_user_credits, self.sync_user_tier, self.credit_policy, max_attempts)
        return identity_of(store, options)

    def sharing_stats(self) -> SharingStats | None:
        """With ``share_group_commit``, what this process sent, served and ran
        itself so far, and whether it serves now; otherwise None."""
        return None if self._shared is None else self._shared.stats

    def close(self) -> None:
        if self._shared is not None:
            self._shared.close()
        self._group.close()
        if self._views is not None:
            self._views.close()
        self.app.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands -----------------------------------------------------------------

    def execute(self, command: Command) -> Receipt:
        """Runs one command; a retry with the same key returns the first receipt.
        With ``group_commit``, in a transaction shared with other threads' commands."""
        if self._shared is not None:
            return self._shared.execute(command)
        if self.grouped:
            return self.group_commit.execute(command)
        receipt = self.engine.execute([command], single=True)[0]
        self._sync_views(receipt)
        return receipt

    def execute_batch(self, commands: Iterable[Command]) -> list[Receipt]:
        """Runs up to 10,000 commands (a list, tuple, generator, …) in one
        transaction: all of them, or none."""
        receipts = self.engine.execute(_bounded(commands, "commands", "commands", MAX_BATCH_COMMANDS))
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
        expires_in: timedelta | None = None,
    ) -> Receipt:
        """Adds credits; with ``expires_at`` (or ``expires_in``, counted from
        when the grant is recorded, so that a retry is the same command) they
        form a block that lapses then."""
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
                expires_in=expires_in,
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

    def reserve(
        self,
        user_id: UUID,
        job_id: UUID,
        amount_credits: int,
        expires_at: datetime | None = None,
        *,
        key: str,
        expires_in: timedelta | None = None,
    ) -> HoldReceipt:
        """Holds credits for a job until ``expires_at``, or for ``expires_in``
        from when the hold is recorded (a worker's retry is then the same
        command); ``receipt.reservation_id`` names the hold."""
        return self._on_hold(
            ReserveCredits(
                key=key,
                user_id=user_id,
                job_id=job_id,
                amount_credits=amount_credits,
                expires_at=expires_at,
                expires_in=expires_in,
            )
        )

    def settle(
        self, reservation_id: UUID, actual_credits: int, *, key: str, user_id: UUID | None = None
    ) -> HoldReceipt:
        """Charges ``actual_credits`` for a hold and frees the rest of it."""
        return self._on_hold(
            SettleReservation(key=key, reservation_id=reservation_id, actual_credits=actual_credits, user_id=user_id)
        )

    def release(self, reservation_id: UUID, reason: str, *, key: str, user_id: UUID | None = None) -> HoldReceipt:
        """Frees a hold without charging it."""
        return self._on_hold(ReleaseReservation(key=key, reservation_id=reservation_id, reason=reason, user_id=user_id))

    def _on_hold(self, command: Command) -> HoldReceipt:
        """``execute(command)`` for a command on a hold, typed as what it
        returns: a receipt that names the hold."""
        receipt = self.execute(command)
        assert isinstance(receipt, HoldReceipt), receipt
        return receipt

    def adjust(self, user_id: UUID, delta_credits: int, reason: str, actor: str, *, key: str) -> Receipt:
        """An admin adjustment of either sign; never takes the balance below held credits."""
        return self.execute(
            AdjustCredits(key=key, user_id=user_id, delta_credits=delta_credits, reason=reason, actor=actor)
        )

    def set_credit_limit(self, user_id: UUID, limit_credits: int, reason: str, actor: str, *, key: str) -> Receipt:
        """Lets the balance go below zero, down to ``-limit_credits``: spends,
        reserves and over-settles may then use credit (available credits are
        balance - held + limit). 0 removes the limit; a limit below what is
        in use refuses new debits until the account is back above the floor.
        Opens the account if the user has none."""
        return self.execute(
            SetCreditLimit(key=key, user_id=user_id, limit_credits=limit_credits, reason=reason, actor=actor)
        )

    def expire_holds(self, now: datetime | None = None, *, allow_future: bool = False) -> int:
        """Releases every hold whose ``expires_at`` has passed, and records the
        expiry of lapsed credits on those accounts. Returns the number of account
        events recorded (releases and expirations). For a scheduler; safe to run
        concurrently and repeatedly. ``now`` may not lie more than a minute
        ahead of the clock (``TimeInFuture``) unless ``allow_future``."""
        moment = moment_for(now, self.clock, allow_future=allow_future)
        due = due_holders(self.scan, moment)
        recorded = 0
        for start in range(0, len(due), SWEEP_PAGE):
            recorded += self.engine.sweep(due[start : start + SWEEP_PAGE], moment)
        self._sync_views(recorded)
        return recorded

    def record_due(self, user_ids: Iterable[UUID], now: datetime | None = None, *, allow_future: bool = False) -> int:
        """Records due hold releases and lapsed credit blocks for these accounts
        (any iterable of at most 10,000 user ids) in one transaction; returns
        the number of account events recorded (releases and expirations).
        ``now`` as for ``expire_holds``."""
        moment = moment_for(now, self.clock, allow_future=allow_future)
        users = _bounded(user_ids, "user_ids", "user ids", MAX_BATCH_COMMANDS)
        recorded = self.engine.sweep([check_uuid(u, "user_ids") for u in users], moment)
        self._sync_views(recorded)
        return recorded

    # -- queries --------------------------------------------------------------------

    def read_aggregate(self, aggregate_id: UUID, *, snapshots: bool = True) -> Any:
        """The current state of any aggregate in the store (a provider's own
        ones too), or None. Read fresh, not from the command cache, so that
        writes made by other processes show at once. Extension API."""
        aggregate_id = check_uuid(aggregate_id, "aggregate_id")
        if type(snapshots) is not bool:
            raise InvalidArgument(f"snapshots must be a bool, not {type(snapshots).__name__}", param="snapshots")
        return self.engine.reader.load([aggregate_id], snapshots=snapshots).get(aggregate_id)

    def _account(self, user_id: UUID) -> CreditAccount:
        account = self.read_aggregate(account_id_for(check_uuid(user_id, "user_id")))
        if not isinstance(account, CreditAccount):
            raise UnknownAccount(user_id)
        return account

    def balance(self, user_id: UUID) -> Balance:
        """Balance, held and available credits, the credit limit and the open blocks, as of now.
        Holds past their expiry and lapsed credits are left out even before a
        sweep records them."""
        account = self._account(user_id)
        now = self.clock.now()
        account.apply_due(now)  # in memory only: a query records nothing
        return Balance(
            user_id=user_id,
            balance_credits=account.balance,
            held_credits=account.held,
            available_credits=account.available,
            blocks=credit_blocks(account),
            as_of=now,
            credit_limit_credits=account.credit_limit,
        )

    def reservation(self, reservation_id: UUID) -> Reservation:
        """A hold as recorded: reserved, settled or released."""
        r = self.read_aggregate(check_uuid(reservation_id, "reservation_id"), snapshots=False)
        if not isinstance(r, HoldRecord):
            raise UnknownReservation(reservation_id)
        return Reservation(
            reservation_id=r.id,
            user_id=r.user_id,
            job_id=r.job_id,
            amount_credits=r.amount,
            expires_at=r.expires_at,
            reserved_at=r.created_on,
            status=str(r.status),  # type: ignore[arg-type]  # a HoldStatus value
            settled_credits=r.settled_credits,
            release_reason=r.release_reason,
            closed_at=r.closed_at,
            quote=None if r.price is None else recorded_quote(r.price, r.user_id, r.created_on),
            safety_margin=None if r.price is None else r.price["safety_margin"],
        )

    def history(self, user_id: UUID, *, after_version: int = 0, limit: int = 1_000) -> list[AccountEvent]:
        """The account's recorded events, oldest first, a page at a time."""
        if type(limit) is not int or not 1 <= limit <= MAX_HISTORY_PAGE:
            raise InvalidArgument(f"limit must be within 1..{MAX_HISTORY_PAGE}, got {limit!r}", param="limit")
        if type(after_version) is not int or not 0 <= after_version <= MAX_VERSION:
            raise InvalidArgument(
                f"after_version must be an int within 0..{MAX_VERSION}, got {after_version!r}", param="after_version"
            )
        user_id = self._account(user_id).user_id
        events = self.app.events.get(account_id_for(user_id), gt=after_version or None, limit=limit)
        return [_describe(user_id, e) for e in events]

    # -- plans and subscriptions -----------------------------------------------------

    def define_plan(self, terms: PlanTerms, *, key: str | None = None, actor: str | None = None) -> Receipt:
        """Adds a plan to the catalog or revises it; same terms change nothing."""
        check_terms(terms)
        if key is not None:
            key = check_key(key)
        else:
            current = self.read_aggregate(plan_id_for(terms.name), snapshots=False)
            now = (current.revision, current.terms_data) if isinstance(current, Plan) else None
            key = revision_key(f"plan:{terms.name}", terms.as_event_data(), now)
        return self.execute(DefinePlan(key=key, terms=terms, actor=actor))

    def install_default_catalog(self) -> list[Receipt]:
        """The seed's plans (starter, pro, studio, enterprise), once."""
        return [self.define_plan(terms) for terms in DEFAULT_CATALOG]

    def plan(self, name: str) -> PlanView:
        name = check_plan_name(name, "name")
        plan = self.read_aggregate(plan_id_for(name), snapshots=False)
        if not isinstance(plan, Plan):
            raise UnknownPlan(name)
        return plan_view(plan.terms, plan.revision)

    def plan_history(self, name: str) -> list[PlanView]:
        """Every revision of a plan's terms, oldest first."""
        name = check_plan_name(name, "name")
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
        provider: str | None = None,
        provider_subscription_id: str | None = None,
        provider_customer_id: str | None = None,
    ) -> Receipt:
        """Starts a trial (``trial_days``) or a paid period, granting the plan's
        credits. ``provider``, ``provider_subscription_id`` and
        ``provider_customer_id``: the payment provider that bills it and its
        ids there; ``lemon_squeezy_subscription_id`` and
        ``lemon_squeezy_customer_id`` are the same for Lemon Squeezy."""
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
                provider=provider,
                provider_subscription_id=provider_subscription_id,
                provider_customer_id=provider_customer_id,
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
        s = self.read_aggregate(check_uuid(subscription_id, "subscription_id"))
        if not isinstance(s, Subscription):
            raise UnknownSubscription(subscription_id)
        return subscription_view(s)

    def _live_subscription(self, user_id: UUID) -> Subscription | None:
        slot = self.read_aggregate(slot_id_for(check_uuid(user_id, "user_id")), snapshots=False)
        if not isinstance(slot, SubscriberSlot) or slot.live is None:
            return None
        s = self.read_aggregate(slot.live)
        return s if isinstance(s, Subscription) else None

    def subscription_of(self, user_id: UUID) -> SubscriptionView | None:
        """The user's live subscription, if any."""
        s = self._live_subscription(user_id)
        return None if s is None else subscription_view(s)

    def entitlements(self, user_id: UUID) -> Entitlements:
        """Plan, features, credits per period, storage and queues the user has now."""
        user_id = check_uuid(user_id, "user_id")
        s = self._live_subscription(user_id)
        now = self.clock.now()
        terms = None
        if s is not None:
            plan = self.read_aggregate(plan_id_for(s.plan), snapshots=False)
            terms = plan.terms if isinstance(plan, Plan) else None
        return entitlements_for(user_id, s, terms, now)

    @property
    def checks(self) -> Checks:
        """What ``check`` and ``record_use`` run on: its cache of the users'
        state (``checks.forget()`` drops it)."""
        if self._checks is None:
            self._checks = Checks(
                self.app, self.engine.reader, self.clock.now, self.execute, self.engine.find_record, self.scan
            )
        return self._checks

    def check(
        self,
        user_id: UUID,
        *,
        feature: str | None = None,
        credits: int | None = None,
        uses: int = 1,
        queued_jobs: int | None = None,
        storage_used_bytes: int | None = None,
        record_use_key: str | None = None,
        max_age_s: float | None = None,
    ) -> CheckResult:
        """May the user do this now? From the plan in force (``feature``, its
        limit on ``uses`` per period, ``queued_jobs`` against the plan's queue,
        ``storage_used_bytes`` against its storage) and the available credits
        (``credits``). Records nothing, and reads state at most ``max_age_s``
        old (default 1 s; this ledger's own commands show at once): advisory,
        the spend or reserve enforces. With ``record_use_key``, an allowed
        check also records the use (``record_use``), once per key."""
        return self.checks.check(
            user_id,
            feature=feature,
            credits=credits,
            uses=uses,
            queued_jobs=queued_jobs,
            storage_used_bytes=storage_used_bytes,
            record_use_key=record_use_key,
            max_age_s=max_age_s,
        )

    def record_use(self, user_id: UUID, feature: str, *, key: str, uses: int = 1) -> Receipt:
        """Counts ``uses`` uses of a feature in the current period, once per
        key; refuses a use beyond the plan's limit (UseLimitReached) or of a
        feature the plan in force does not give (FeatureNotEntitled)."""
        return self.checks.record_use(user_id, feature, key=key, uses=uses)

    def tick(self, now: datetime | None = None, *, allow_future: bool = False) -> dict[str, int]:
        """Performs what falls due: trial ends and renewals (when the policy
        auto-renews), expiries at period end, stale holds, lapsed credits.
        Safe to run repeatedly and concurrently: every change is keyed.
        ``now`` may not lie more than a minute ahead of the clock
        (``TimeInFuture``) unless ``allow_future`` (simulations)."""
        moment = moment_for(now, self.clock, allow_future=allow_future)
        done = {"subscriptions": 0, "holds_and_lapses": 0}
        for chunk in _chunks(sorted(self._live_subscription_ids()), SWEEP_PAGE):
            for s in self.engine.reader.load(chunk).values():
                done["subscriptions"] += self._catch_up_subscription(s, moment)
        done["holds_and_lapses"] = self.expire_holds(moment, allow_future=True)  # checked above
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
                receipts = self.engine.execute(due, single=True, now=self._recorded_no_earlier(s, now))
            except InvalidTransition:
                break  # changed meanwhile (another tick, a webhook)
            changes += sum(1 for r in receipts if not r.replayed)
            fresh = self.read_aggregate(s.id)
            if not isinstance(fresh, Subscription):
                break
            s = fresh
        return changes

    def _recorded_no_earlier(self, s: Subscription, now: datetime) -> datetime:
        """When a tick as of ``now`` records a change that was due by then: at
        ``now``, or at the latest event of the subscription or of its user's
        account if that is later. A tick as of an earlier moment than the
        clock's may come after commands recorded since, and an aggregate's
        events follow the clock (the audit's ``time`` check allows its 60
        seconds of slack, so a moment within them needs no read)."""
        if now >= self.clock.now() - FUTURE_TOLERANCE:
            return now
        account = self.read_aggregate(account_id_for(s.user_id))
        latest = [s.modified_on, *([account.modified_on] if isinstance(account, CreditAccount) else [])]
        return max(now, *latest)

    def scan(self, topics: list[str]) -> Iterator[Any]:
        """Every recorded event with one of these topics, decoded, in log
        order, read a page at a time (memory stays bounded). Extension API."""
        if not isinstance(topics, list | tuple) or not all(isinstance(topic, str) for topic in topics):
            raise InvalidArgument("topics must be a list of topic strings", param="topics")
        return self._pages(list(topics))

    def _pages(self, topics: list[str]) -> Iterator[Any]:
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
        for event in self.scan([Subscription.Started.TOPIC, Subscription.Expired.TOPIC]):
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
            for e in self.scan([CreditAccount.Granted.TOPIC])
            if e.expires_at is not None and e.expires_at <= now
        }
        users = set()
        for event in self.scan([CreditAccount.Opened.TOPIC]):
            if event.originator_id in accounts:
                users.add(event.user_id)
        return users

    # -- costs ---------------------------------------------------------------------

    def command_stats(self) -> CommandStats:
        """Counts since this ``Ledger`` was opened: command batches, attempts at
        saving them, clashes with other writers, ``ConcurrencyExhausted``
        raised, and how the aggregates they read were loaded (rebuilt from the
        store, fast-forwarded from the cache, or served from it). Subtract an
        earlier reading with ``CommandStats.since``."""
        return self.app.command_stats()

    # -- pricing -------------------------------------------------------------------------

    @property
    def _prices(self) -> PriceCache:
        """The price book and users' plans as quotes read them (made on first use)."""
        cache: PriceCache | None = self.__dict__.get("_price_cache")
        if cache is None:
            cache = self.__dict__["_price_cache"] = PriceCache(
                lambda aggregate_id: self.read_aggregate(aggregate_id, snapshots=False), self.app.repository.cache
            )
        return cache

    def define_price_book(self, book: PriceBook, *, key: str | None = None, actor: str | None = None) -> Receipt:
        """Defines the price book or revises it; the same book as the current one changes nothing."""
        check_price_book(book)
        if key is not None:
            key = check_key(key)
        else:
            current = self.read_aggregate(PRICE_BOOK_ID, snapshots=False)
            now = (current.revision, current.book_data) if isinstance(current, PriceBookRecord) else None
            key = revision_key("price_book", book.as_event_data(), now)
        return self.execute(DefinePriceBook(key=key, book=book, actor=actor))

    def install_default_price_book(self) -> Receipt:
        """The seed's job types with the library's starting prices (``DEFAULT_PRICE_BOOK``), once."""
        return self.define_price_book(DEFAULT_PRICE_BOOK)

    def price_book(self) -> PriceBookRevision | None:
        """The price book's current revision, read from the store; None before one is defined."""
        history = self.price_book_history()
        return history[-1] if history else None

    def price_book_history(self) -> list[PriceBookRevision]:
        """Every revision of the price book, oldest first."""
        return revisions(list(self.app.events.get(PRICE_BOOK_ID)))

    def quote(self, user_id: UUID, job_type: str, params: Mapping[str, Any], *, fresh: bool = False) -> Quote:
        """What a job of ``job_type`` with ``params`` costs the user now, in
        whole credits, with its breakdown and the price book revision used.
        Records nothing. Reads the book (and the user's plan, when the book
        has plan multipliers) from memory, at most a second old
        (``fresh=True`` reads the store). Raises UnknownJobType and
        InvalidJobParameter (naming the parameter)."""
        user_id = check_user_id(user_id)
        if type(fresh) is not bool:
            raise InvalidArgument(f"fresh must be a bool, not {type(fresh).__name__}", param="fresh")
        return self._prices.quote(user_id, job_type, params, self.clock.now(), fresh=fresh)

    def reserve_for_job(
        self,
        user_id: UUID,
        job_type: str,
        params: Mapping[str, Any],
        *,
        job_id: UUID,
        key: str,
        expires_at: datetime | None = None,
        expires_in: timedelta | None = None,
        safety_margin: Decimal = Decimal(0),
    ) -> HoldReceipt:
        """Holds credits for a job, sized by its quote plus ``safety_margin``
        (a fraction: ``Decimal("0.1")`` is 10%), rounded up; the hold records
        the quote and the price book revision (``reservation(...).quote``).
        Settle and release it as any hold."""
        command = ReserveForJob(
            key=key,
            user_id=user_id,
            job_id=job_id,
            job_type=job_type,
            params=params,
            safety_margin=safety_margin,
            expires_at=expires_at,
            expires_in=expires_in,
        )
        self._prices.record()  # brings the command cache's book up to the quotes' (at most a second old)
        return self._on_hold(command)

    # -- balance thresholds and the notification outbox (docs/notifications.md) ------

    def set_balance_thresholds(
        self,
        user_id: UUID,
        thresholds: Iterable[Threshold | Mapping[str, int]] | None,
        *,
        key: str,
        actor: str | None = None,
    ) -> Receipt:
        """Sets the account's low-balance thresholds (``Threshold.credits(500)``,
        ``Threshold.percent(10)`` or ``{"credits": 500}``); ``None`` returns it to
        its plan's defaults. Depletion (0 available) is always watched."""
        return self.execute(
            SetBalanceThresholds(key=key, user_id=user_id, thresholds=parse_thresholds(thresholds), actor=actor)
        )

    def balance_thresholds(self, user_id: UUID) -> BalanceThresholds:
        """The account's thresholds in force, their levels and which have fired."""
        account = self._account(user_id)
        account.apply_due(self.clock.now())  # in memory only, as balance()
        return thresholds_of(account)

    def outbox(self, name: str = "default", *, types: Iterable[str] | None = None) -> Outbox:
        """The notification outbox as consumer ``name`` sees it (its own
        position), for the notification ``types`` given (default: all)."""
        return Outbox(
            self.app,
            self.views.store,
            name,
            types=types,
            leases=lambda consumer: self.backend.take_consumer_lease(self.app, consumer),
        )


def revision_key(prefix: str, data: Any, current: tuple[int, Any] | None) -> str:
    """The key of a catalog definition given without one (a plan's terms, the
    price book): keyed by the revision it makes, so the same data as the
    current revision (``current``: its number and data) replays it, and other
    data (earlier revisions' too) makes the next one. Stored keys have this
    shape: ``{prefix}:revision:{n}:{digest}``."""
    digest = hashlib.sha256(repr(data).encode()).hexdigest()[:16]
    revision = 1 if current is None else current[0] + (0 if current[1] == data else 1)
    return f"{prefix}:revision:{revision}:{digest}"


def resolve_url(url: str | None = None) -> str:
    """The URL to open: ``url`` when given, else ``$LEDGER_URL``, else
    :data:`DEFAULT_URL` (the embedded SQLite file)."""
    return url or os.environ.get(URL_ENV) or DEFAULT_URL


def _bounded(items: object, name: str, what: str, limit: int) -> list[Any]:
    """The first ``limit`` items of any iterable as a list; reading one more
    tells a longer one apart without reading all of it."""
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable):
        hint = " (execute() runs one command)" if isinstance(items, Command) else ""
        raise InvalidArgument(f"{name} must be an iterable of {what}, not {type(items).__name__}{hint}", param=name)
    taken = list(itertools.islice(items, limit + 1))
    if len(taken) > limit:
        raise InvalidArgument(f"at most {limit} {what} per call", param=name)
    return taken


def _check_options(clock: object, credit_policy: object, **flags: object) -> None:
    if clock is not None and not callable(getattr(clock, "now", None)):
        raise InvalidArgument(f"clock must have a now() method, not be a {type(clock).__name__}", param="clock")
    if credit_policy is not None and not isinstance(credit_policy, CreditPolicy):
        raise InvalidArgument(
            f"credit_policy must be a CreditPolicy, not {type(credit_policy).__name__}", param="credit_policy"
        )
    for name, value in flags.items():
        if type(value) is not bool:
            raise InvalidArgument(f"{name} must be a bool, not {type(value).__name__}", param=name)


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
