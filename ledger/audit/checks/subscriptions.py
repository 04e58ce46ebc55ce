"""The audit's check of subscriptions: each subscription's history follows
the lifecycle's transitions, the credits each change promised were posted
on the user's account in the same transaction, at most one subscription holds
a user's slot, and the ``subscriptions`` table agrees with the replay.

What the commands allow, and so what the history may show:

- ``Activated``: trialing to active; ``Renewed``: active or past_due to active,
  its period starting where the previous one ended; ``StatusChanged``: past_due
  (from active), recovered (from past_due), paused (from active), unpaused
  (from paused), resumed (from cancelled at period end, before that end);
  ``Cancelled``: from trialing, active, past_due or paused; ``Expired``: from any
  live status, and from cancelled at period end only once the period is over.
- ``Synced`` applies the payment provider's view, from any status, and a
  plan change may come with it: those two are checked for consistency only.
  Which snapshot wins is the provider's order of them all
  (``provider_states``: a late one may restate the state, an end is final),
  not the order of the events, so no order between snapshots is checked.
  ``Superseded`` (a snapshot that does not count, kept for the history)
  changes nothing.

Memory: per subscription its status, plan and period; per user its slot.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from ledger.audit.base import AuditContext, Check, Handler
from ledger.audit.checks.credits import TIME_SLACK
from ledger.domain.credits import CreditAccount
from ledger.domain.subscriptions import Status, SubscriberSlot, Subscription, slot_id_for

LIVE = frozenset(s.value for s in Status if s != Status.EXPIRED)
STATUSES = frozenset(s.value for s in Status)
#: StatusChanged.change -> (the statuses it may come from, the status it leads to)
STATUS_CHANGES: dict[str, tuple[frozenset[str], str]] = {
    "past_due": (frozenset({Status.ACTIVE}), Status.PAST_DUE),
    "recovered": (frozenset({Status.PAST_DUE}), Status.ACTIVE),
    "paused": (frozenset({Status.ACTIVE}), Status.PAUSED),
    "unpaused": (frozenset({Status.PAUSED}), Status.ACTIVE),
    "resumed": (frozenset({Status.CANCELLED}), Status.ACTIVE),
}
CANCELLABLE = frozenset({Status.TRIALING, Status.ACTIVE, Status.PAST_DUE, Status.PAUSED})
LOOKUP_IDS = 500


class _Sub:
    __slots__ = (
        "at",
        "at_period_end",
        "period_end",
        "period_start",
        "plan",
        "position",
        "source_at",
        "status",
        "user",
        "version",
    )

    def __init__(self, event: Any, position: int) -> None:
        self.user: UUID = event.user_id
        self.plan: str = event.plan
        self.status: str = event.status
        self.period_start: datetime = event.period_start
        self.period_end: datetime = event.period_end
        self.at_period_end = False
        self.version = 1
        self.at: datetime = event.timestamp
        self.position = position  # where it started
        self.source_at: datetime | None = None  # the provider's time of the snapshot applied last


class SubscriptionCheck(Check):
    name = "subscription"
    covers = (
        "every subscription's history follows the lifecycle's transitions, the credits each change promised "
        "were posted with it, a user's slot holds at most one live subscription, and the subscriptions table "
        "agrees with the replay"
    )

    def __init__(self, ctx: AuditContext) -> None:
        super().__init__(ctx)
        self.subs: dict[UUID, _Sub] = {}
        self.slots: dict[UUID, tuple[UUID, UUID | None]] = {}  # slot -> its user, the subscription in it
        self.slot_versions: dict[UUID, int] = {}
        self.named: dict[UUID, tuple[int, UUID]] = {}  # this transaction: subscription -> a slot naming it
        self.promised: dict[UUID, tuple[int, int]] = {}  # this transaction: subscription -> (position, credits)
        self.posted: dict[UUID, int] = {}
        self.touched: set[UUID] = set()
        self.compared = 0

    def handlers(self) -> Mapping[type, Handler]:
        return {
            Subscription.Started: self.started,
            Subscription.Activated: self.activated,
            Subscription.Renewed: self.renewed,
            Subscription.PlanChanged: self.plan_changed,
            Subscription.StatusChanged: self.status_changed,
            Subscription.Cancelled: self.cancelled,
            Subscription.Expired: self.expired,
            Subscription.Synced: self.synced,
            Subscription.Superseded: self.superseded,
            SubscriberSlot.Opened: self.slot_opened,
            SubscriberSlot.Taken: self.slot_taken,
            SubscriberSlot.Freed: self.slot_freed,
            CreditAccount.Granted: self.granted,
        }

    # -- helpers -----------------------------------------------------------------

    def _sub(self, position: int, event: Any) -> _Sub | None:
        """The event's subscription, after checking version and time."""
        sub = self.subs.get(event.originator_id)
        subject = f"subscription {event.originator_id}"
        if sub is None:
            self.report(position, subject, f"{type(event).__name__} of a subscription never started")
            return None
        if event.originator_version != sub.version + 1:
            self.report(position, subject, f"version {event.originator_version} follows version {sub.version}")
        if event.timestamp < sub.at - TIME_SLACK:
            self.report(position, subject, f"recorded at {event.timestamp.isoformat()}, before an earlier event")
        sub.version, sub.at = event.originator_version, max(sub.at, event.timestamp)
        self.touched.add(event.originator_id)
        return sub

    def _from(self, position: int, event: Any, sub: _Sub, allowed: frozenset[str], change: str) -> None:
        if sub.status not in allowed:
            self.report(
                position,
                f"subscription {event.originator_id}",
                f"{change} from {sub.status}: allowed only from {', '.join(sorted(allowed))}",
            )

    def _promise(self, position: int, event: Any) -> None:
        if event.granted_credits:
            earlier = self.promised.get(event.originator_id, (position, 0))[1]
            self.promised[event.originator_id] = (position, earlier + event.granted_credits)

    # -- subscription events --------------------------------------------------------

    def started(self, position: int, event: Any) -> None:
        subject = f"subscription {event.originator_id}"
        if event.originator_id in self.subs or event.originator_version != 1:
            self.report(position, subject, "started twice")
        if event.status not in STATUSES:
            self.report(position, subject, f"started with unknown status {event.status!r}")
        if event.period_end < event.period_start:
            self.report(position, subject, "its period ends before it starts")
        self.subs[event.originator_id] = _Sub(event, position)
        self.touched.add(event.originator_id)
        self._promise(position, event)

    def activated(self, position: int, event: Any) -> None:
        if (sub := self._sub(position, event)) is None:
            return
        self._from(position, event, sub, frozenset({Status.TRIALING}), "activated")
        sub.status, sub.period_start, sub.period_end = Status.ACTIVE, event.period_start, event.period_end
        self._promise(position, event)

    def renewed(self, position: int, event: Any) -> None:
        if (sub := self._sub(position, event)) is None:
            return
        self._from(position, event, sub, frozenset({Status.ACTIVE, Status.PAST_DUE}), "renewed")
        if event.period_start != sub.period_end:
            self.report(
                position,
                f"subscription {event.originator_id}",
                f"renewed from {event.period_start.isoformat()}, but the period ended {sub.period_end.isoformat()}",
            )
        sub.status, sub.period_start, sub.period_end = Status.ACTIVE, event.period_start, event.period_end
        self._promise(position, event)

    def plan_changed(self, position: int, event: Any) -> None:
        if (sub := self._sub(position, event)) is None:
            return
        subject = f"subscription {event.originator_id}"
        if event.from_plan != sub.plan or event.to_plan == event.from_plan:
            self.report(position, subject, f"plan changed from {event.from_plan} to {event.to_plan}; it was {sub.plan}")
        if event.granted_credits and (
            event.change != "upgraded" or sub.status not in {"active", "trialing", "past_due"}
        ):
            self.report(position, subject, f"{event.change} while {sub.status} granted {event.granted_credits} credits")
        sub.plan = event.to_plan
        self._promise(position, event)

    def status_changed(self, position: int, event: Any) -> None:
        if (sub := self._sub(position, event)) is None:
            return
        subject = f"subscription {event.originator_id}"
        rule = STATUS_CHANGES.get(event.change)
        if rule is None or rule[1] != event.status:
            self.report(position, subject, f"unknown change {event.change!r} to {event.status!r}")
        else:
            self._from(position, event, sub, rule[0], event.change)
        if event.change == "resumed" and (not sub.at_period_end or event.timestamp >= sub.period_end):
            self.report(position, subject, "resumed, but it was not cancelled at a period end still to come")
        if event.change == "resumed":
            sub.at_period_end = False
        sub.status = event.status

    def cancelled(self, position: int, event: Any) -> None:
        if (sub := self._sub(position, event)) is None:
            return
        self._from(position, event, sub, CANCELLABLE, "cancelled")
        sub.status, sub.at_period_end = Status.CANCELLED, event.at_period_end

    def expired(self, position: int, event: Any) -> None:
        if (sub := self._sub(position, event)) is None:
            return
        self._from(position, event, sub, LIVE, "expired")
        if sub.status == Status.CANCELLED and sub.at_period_end and event.timestamp < sub.period_end:
            self.report(
                position,
                f"subscription {event.originator_id}",
                f"expired before the period it was paid for ended ({sub.period_end.isoformat()})",
            )
        sub.status = Status.EXPIRED

    def synced(self, position: int, event: Any) -> None:
        if (sub := self._sub(position, event)) is None:
            return
        if event.status not in STATUSES or event.period_end < event.period_start:
            self.report(position, f"subscription {event.originator_id}", "synced to an impossible state")
        sub.status, sub.period_start, sub.period_end = event.status, event.period_start, event.period_end
        sub.at_period_end = event.cancel_at_period_end
        sub.source_at = event.source_updated_at

    def superseded(self, position: int, event: Any) -> None:
        # Changes nothing; it is kept for the history.
        if self._sub(position, event) is None:
            return
        if event.status not in STATUSES or event.period_end < event.period_start:
            self.report(position, f"subscription {event.originator_id}", "kept an impossible snapshot")

    # -- slots ----------------------------------------------------------------------

    def slot_opened(self, position: int, event: Any) -> None:
        if event.originator_id != slot_id_for(event.user_id) or event.originator_id in self.slots:
            self.report(position, f"user {event.user_id}", "a second subscriber slot, or one not the user's")
        self.slots[event.originator_id] = (event.user_id, None)
        self.slot_versions[event.originator_id] = event.originator_version

    def _slot(self, position: int, event: Any) -> tuple[UUID, UUID | None] | None:
        slot = self.slots.get(event.originator_id)
        if slot is None:
            self.report(position, f"slot {event.originator_id}", "event of a slot never opened")
        version = self.slot_versions.get(event.originator_id, 0)
        if event.originator_version != version + 1:
            self.report(
                position, f"slot {event.originator_id}", f"version {event.originator_version} follows {version}"
            )
        self.slot_versions[event.originator_id] = event.originator_version
        # A slot is saved before the subscription it names (same transaction):
        # whose subscription it names is checked at the transaction's end.
        self.named[event.subscription_id] = (position, event.originator_id)
        return slot

    def slot_taken(self, position: int, event: Any) -> None:
        slot = self._slot(position, event)
        if slot is None:
            return
        user, live = slot
        if live is not None:
            self.report(
                position,
                f"user {user}",
                f"subscription {event.subscription_id} took the slot while {live} held it: two live subscriptions",
            )
        self.slots[event.originator_id] = (user, event.subscription_id)

    def slot_freed(self, position: int, event: Any) -> None:
        slot = self._slot(position, event)
        if slot is None:
            return
        user, live = slot
        if live != event.subscription_id:
            self.report(
                position, f"user {user}", f"freed subscription {event.subscription_id}, which did not hold the slot"
            )
        self.slots[event.originator_id] = (user, None)

    # -- credits ----------------------------------------------------------------------

    def granted(self, position: int, event: Any) -> None:
        key = event.key
        if not key.startswith("subscription:"):
            return
        try:
            subscription_id = UUID(key.split(":")[1])
        except (IndexError, ValueError):
            return
        self.posted[subscription_id] = self.posted.get(subscription_id, 0) + event.amount

    def boundary(self) -> None:
        for subscription_id in self.promised.keys() | self.posted.keys():
            position, promised = self.promised.get(subscription_id, (None, 0))
            posted = self.posted.get(subscription_id, 0)
            if promised != posted:
                self.report(
                    position,
                    f"subscription {subscription_id}",
                    f"its changes promised {promised} credits; the same transaction granted {posted}",
                )
        for subscription_id, (position, slot_id) in self.named.items():
            named = self.subs.get(subscription_id)
            if named is None or slot_id_for(named.user) != slot_id:
                self.report(position, f"slot {slot_id}", f"names subscription {subscription_id}, not its user's")
        for subscription_id in self.touched:
            sub = self.subs[subscription_id]
            _, live = self.slots.get(slot_id_for(sub.user), (sub.user, None))
            if sub.status == Status.EXPIRED and live == subscription_id:
                self.report(None, f"subscription {subscription_id}", "expired but still holds its user's slot")
        self.promised, self.posted, self.touched, self.named = {}, {}, set(), {}

    def finish(self) -> None:
        self.boundary()

    # -- the subscriptions table -------------------------------------------------------

    def at_views(self) -> None:
        views_check = self.ctx.shared.get("views_check")
        if views_check is None or self.ctx.views_position is None:
            return
        ids = [i for i, s in self.subs.items() if s.position <= self.ctx.views_position]
        for start in range(0, len(ids), LOOKUP_IDS):
            self._compare(views_check, ids[start : start + LOOKUP_IDS])
        live = views_check.fetch(f"SELECT COUNT(*) FROM {views_check.table('subscriptions')}", [])[0][0]
        if live != len(ids):
            self.report(None, "subscriptions", f"{live} rows for {len(ids)} subscriptions", check="view")

    def _compare(self, views_check: Any, ids: list[UUID]) -> None:
        rows = views_check.fetch_by_ids(
            f"SELECT s.id, s.user_id, p.name, s.status, s.current_period_start, s.current_period_end "
            f"FROM {views_check.table('subscriptions')} s LEFT JOIN {views_check.table('plans')} p "
            f"ON p.id = s.plan_id WHERE s.id",
            [views_check.db_id(i) for i in ids],
        )
        by_id = {UUID(str(row[0])): row for row in rows}
        for subscription_id in ids:
            self.compared += 1
            sub = self.subs[subscription_id]
            row = by_id.get(subscription_id)
            subject = f"subscription {subscription_id}"
            if row is None:
                self.report(None, subject, "no subscriptions row", check="view")
                continue
            expected = (str(sub.user), sub.plan, str(sub.status), _naive(sub.period_start), _naive(sub.period_end))
            live = (str(row[1]), row[2], row[3], _naive(row[4]), _naive(row[5]))
            if live != expected:
                self.report(None, subject, f"subscriptions row says {live}, the events say {expected}", check="view")

    def summary(self) -> dict[str, Any]:
        return {"subscriptions": len(self.subs), "subscriptions_compared": self.compared}

    def save(self) -> dict[str, Any]:
        return {
            "subs": {
                str(i): [
                    str(s.user),
                    s.plan,
                    s.status,
                    s.period_start.isoformat(),
                    s.period_end.isoformat(),
                    s.at_period_end,
                    s.version,
                    s.at.isoformat(),
                    s.position,
                ]
                for i, s in self.subs.items()
            },
            "slots": {str(slot): [str(user), str(live) if live else None] for slot, (user, live) in self.slots.items()},
            "slot_versions": {str(slot): v for slot, v in self.slot_versions.items()},
            "compared": self.compared,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self.subs = {}
        for key, (user, plan, status, start, end, at_end, version, at, position) in state["subs"].items():
            sub = _Sub.__new__(_Sub)
            sub.user, sub.plan, sub.status = UUID(user), plan, status
            sub.period_start, sub.period_end = datetime.fromisoformat(start), datetime.fromisoformat(end)
            sub.at_period_end, sub.version, sub.at, sub.position = at_end, version, datetime.fromisoformat(at), position
            self.subs[UUID(key)] = sub
        self.slots = {
            UUID(slot): (UUID(user), UUID(live) if live else None) for slot, (user, live) in state["slots"].items()
        }
        self.slot_versions = {UUID(slot): int(v) for slot, v in state["slot_versions"].items()}
        self.compared = int(state["compared"])


def _naive(value: Any) -> Any:
    """Datetimes as naive UTC text, however the backend returned them."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime) and value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat(sep=" ") if isinstance(value, datetime) else value
