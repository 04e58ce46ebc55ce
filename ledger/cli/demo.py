"""``python -m ledger demo``: a readable story of one account."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID

from ledger.application.facade import Ledger
from ledger.application.results import Balance, QuoteLine, Receipt
from ledger.clock import ManualClock
from ledger.domain.thresholds import Threshold
from ledger.errors import ConfigurationError, LedgerError
from ledger.views.outbox import Notification

DEMO_START = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
DEMO_USER = UUID("00000000-0000-4000-8000-00000000a11c")


def _line(balance: Balance | Receipt) -> str:
    if isinstance(balance, Balance):
        b, h, a = balance.balance_credits, balance.held_credits, balance.available_credits
    else:
        b, h, a = balance.balance_credits, balance.held_credits, balance.available_credits
    return f"balance {b:>6}  held {h:>5}  available {a:>6}"


def _quote_line(line: QuoteLine) -> str:
    # A line's credits are what it adds, so a multiply line shows its factor
    # beside them: "resolution multiply 2.5" read as a factor of 2.5.
    if line.kind == "base":
        return f"{line.label} {line.credits}"
    if line.factor is not None:
        return f"{line.label} x{line.factor} (+{line.credits})"
    return f"{line.label} +{line.credits}"


def run_demo(url: str, echo: Callable[[str], None] = print) -> Balance:
    clock = ManualClock(DEMO_START)
    user = DEMO_USER
    job_a = UUID("00000000-0000-4000-8000-0000000000a1")
    job_b = UUID("00000000-0000-4000-8000-0000000000b2")
    job_c = UUID("00000000-0000-4000-8000-0000000000c3")

    def step(what: str, receipt: Receipt) -> Receipt:
        echo(f"{clock.now():%Y-%m-%d %H:%M}  {what:<56} {_line(receipt)}")
        return receipt

    with Ledger(url, clock=clock) as ledger:
        # The story's ids, keys and clock are fixed: on a store that already
        # holds events (an earlier run) its commands would replay receipts of
        # another moment, and its ticks act on every subscription there.
        recorded = ledger.app.recorder.max_notification_id() or 0
        if recorded:
            raise ConfigurationError(
                f"the demo tells its story on an empty store; {ledger.url} already holds {recorded} events "
                "(an earlier demo?). Give a new path, or no --url for a fresh temporary file"
            )
        echo(f"Ledger at {ledger.url}; account of user {user}\n")
        step(
            "starter plan grants 5000 credits, expiring in 30 days",
            ledger.grant(
                user,
                5000,
                "subscription_grant",
                key="demo:grant:starter:2026-03",
                description="Starter plan, March",
                expires_at=DEMO_START + timedelta(days=30),
            ),
        )
        step(
            "credit pack purchase: 1000 credits, never expire",
            ledger.grant(user, 1000, "purchase", key="demo:order:1001", description="Credit pack 1000"),
        )
        step(
            "welcome bonus: 200 credits",
            ledger.grant(user, 200, "bonus", key="demo:bonus:welcome", description="Welcome bonus"),
        )

        clock.advance(timedelta(hours=1))
        hold_a = step(
            "job A queued: reserve 300 estimated credits",
            ledger.reserve(user, job_a, 300, clock.now() + timedelta(hours=1), key=f"job:{job_a}:reserve"),
        )
        hold_b = step(
            "job B queued: reserve 800 estimated credits",
            ledger.reserve(user, job_b, 800, clock.now() + timedelta(hours=1), key=f"job:{job_b}:reserve"),
        )
        clock.advance(timedelta(minutes=5))
        assert hold_a.reservation_id and hold_b.reservation_id
        step(
            "job A completed: settle 240 actual credits",
            ledger.settle(hold_a.reservation_id, 240, key=f"job:{job_a}:settle"),
        )
        again = ledger.settle(hold_a.reservation_id, 240, key=f"job:{job_a}:settle")
        echo(f"{'':18}the worker retries the settle: replayed={again.replayed}, nothing charged twice")
        step(
            "job B failed: release the hold",
            ledger.release(hold_b.reservation_id, "job failed: out of memory", key=f"job:{job_b}:release"),
        )
        try:
            ledger.settle(hold_b.reservation_id, 800, key=f"job:{job_b}:settle")
        except LedgerError as exc:
            echo(f"{'':18}a late settle of job B is refused: {type(exc).__name__}: {exc}")

        step("API call: spend 150 credits", ledger.spend(user, 150, key="demo:api:1", description="upscale API"))
        hold_c = step(
            "job C queued: reserve 500, hold for 2 hours",
            ledger.reserve(user, job_c, 500, clock.now() + timedelta(hours=2), key=f"job:{job_c}:reserve"),
        )
        step(
            "support adjusts: -50 credits (duplicate refund)",
            ledger.adjust(user, -50, "duplicate refund reversed", "support:kim", key="demo:adjust:1"),
        )
        try:
            ledger.spend(user, 999_999, key="demo:api:too-much")
        except LedgerError as exc:
            echo(f"{'':18}an oversized spend is refused: {type(exc).__name__}: {exc}")

        clock.advance(timedelta(hours=3))
        released = ledger.expire_holds()
        echo(
            f"{clock.now():%Y-%m-%d %H:%M}  {'hold sweep: job C never reported back':<56} {_line(ledger.balance(user))}"
        )
        echo(f"{'':18}{released} event(s) recorded; job C's hold is {ledger.reservation(hold_c.reservation_id).status}")  # type: ignore[arg-type]

        clock.set(DEMO_START + timedelta(days=30, hours=1))
        ledger.record_due([user])
        final = ledger.balance(user)
        echo(f"{clock.now():%Y-%m-%d %H:%M}  {'the starter grant lapses; its remainder expires':<56} {_line(final)}")

        echo("\nHistory:")
        for event in ledger.history(user):
            amount = event.data.get("amount")
            detail = f"{amount:>6}" if isinstance(amount, int) else " " * 6
            echo(
                f"  v{event.version:<3} {event.recorded_at:%Y-%m-%d %H:%M}  {event.type:<9} {detail}  "
                f"{event.data.get('kind') or event.data.get('reason') or ''}"
            )
        echo("\nOpen credit blocks:")
        for block in final.blocks:
            echo(
                f"  {block.kind:<18} {block.remaining_credits:>6} of {block.granted_credits:<6} "
                f"expires {block.expires_at:%Y-%m-%d}"
                if block.expires_at
                else f"  {block.kind:<18} {block.remaining_credits:>6} of {block.granted_credits:<6} never expires"
            )
        echo("")
        run_subscription_demo(ledger, clock, echo)
        echo("")
        run_pricing_demo(ledger, clock, echo)
        return final


def run_subscription_demo(ledger: Ledger, clock: ManualClock, echo: Callable[[str], None]) -> None:
    """A second user subscribes, upgrades, renews, cancels and expires."""
    user = UUID("00000000-0000-4000-8000-0000000000b0")
    ledger.install_default_catalog()
    echo(f"Subscription of user {user}\n")

    def step(what: str, receipt: Receipt) -> None:
        e = ledger.entitlements(user)
        effect = f"{receipt.amount_credits:+d}" if receipt.amount_credits else "     0"
        echo(
            f"{clock.now():%Y-%m-%d}  {what:<44} credits {effect:>7}  balance {ledger.balance(user).balance_credits:>6}"
            f"  plan {e.plan:<8} {e.status}"
        )

    started = ledger.start_subscription(user, "starter", key="demo:sub:start", trial_days=7)
    sid = started.subscription_id
    assert sid is not None
    step("starts a 7-day Starter trial", started)
    clock.advance(timedelta(days=7))
    ledger.tick()
    step("trial ends: first paid month (tick)", _last(ledger, sid))
    clock.advance(timedelta(days=10))
    step("upgrades to Pro: the full difference", ledger.change_plan(sid, "pro", key="demo:sub:upgrade"))
    ledger.spend(user, 4000, key="demo:sub:use", description="a month of generations")
    clock.set(ledger.subscription(sid).current_period_end)
    ledger.tick()
    step("renews: unused credits lapse, new month", _last(ledger, sid))
    clock.advance(timedelta(days=3))
    step(
        "cancels at period end: keeps Pro until then",
        ledger.cancel_subscription(sid, key="demo:sub:cancel", reason="switching tools"),
    )
    clock.set(ledger.subscription(sid).current_period_end)
    ledger.tick()
    step("period ends: expired, back to free", _last(ledger, sid))


def run_pricing_demo(ledger: Ledger, clock: ManualClock, echo: Callable[[str], None]) -> None:
    """A third user: a quoted job, a check refused for lack of credits, a
    credit limit, and a low-balance notification read from the outbox."""
    user = UUID("00000000-0000-4000-8000-0000000000c0")
    job = UUID("00000000-0000-4000-8000-0000000000d4")
    echo(f"Priced jobs, checks, a credit limit and notifications for user {user}\n")

    def row(what: str, receipt: Receipt) -> None:
        echo(f"  {what:<46} {_line(receipt)}")

    ledger.install_default_price_book()
    ledger.grant(user, 100, "purchase", key="demo:c:order:1", description="Credit pack 100")
    ledger.set_balance_thresholds(user, [Threshold.credits(20)], key="demo:c:thresholds")
    outbox = ledger.outbox("demo", types=["balance.low", "balance.depleted", "balance.recovered"])
    outbox.commit(outbox.position(), outbox.head())  # the demo's consumer starts from now

    params = {"width": 1024, "height": 1536, "steps": 40, "batch_size": 2}
    quote = ledger.quote(user, "text_to_image", params)
    lines = ", ".join(_quote_line(line) for line in quote.breakdown)
    echo(f"  quote text_to_image {params}: {quote.credits} credits (price book revision {quote.price_revision})")
    echo(f"    breakdown: {lines}")
    held = ledger.reserve_for_job(
        user,
        "text_to_image",
        params,
        job_id=job,
        key=f"job:{job}:reserve",
        expires_in=timedelta(hours=1),
        safety_margin=Decimal("0.2"),
    )
    row(f"reserve_for_job, a 20% margin: holds {held.held_credits}", held)
    assert held.reservation_id is not None
    settled = ledger.settle(held.reservation_id, quote.credits, key=f"job:{job}:settle")
    row(f"the job ran: settled for the quoted {quote.credits}", settled)

    refused = ledger.check(user, credits=500)
    echo(f"  check(credits=500): allowed={refused.allowed}, {refused.reason}: {refused.message}")
    limited = ledger.set_credit_limit(user, 500, "postpaid contract", "finance:ana", key="demo:c:limit")
    row("finance sets a credit limit of 500", limited)
    allowed = ledger.check(user, credits=500)
    echo(f"  check(credits=500): allowed={allowed.allowed}")
    spent = ledger.spend(user, 570, key="demo:c:batch-render", description="batch render on credit")
    row("a batch render spends 570, on credit", spent)
    spent = ledger.spend(user, 15, key="demo:c:upscale", description="upscale")
    row("an upscale spends the last 15", spent)
    try:
        ledger.spend(user, 1, key="demo:c:one-more")
    except LedgerError as exc:
        echo(f"  at the floor a spend is refused: {type(exc).__name__}: {exc}")

    def show(notification: Notification) -> None:
        level = notification.data.get("level_credits")
        at = f" (threshold {level})" if level is not None else ""
        echo(f"  outbox: {notification.type}{at}, available {notification.data.get('available_credits')}")

    outbox.consume(show)


def _last(ledger: Ledger, subscription_id: UUID) -> Receipt:
    """The receipt-like summary of the latest subscription change (made by tick)."""
    s = ledger.subscription(subscription_id)
    granted = 0
    for event in reversed(ledger.history(s.user_id)):
        if event.type == "granted" and event.data.get("reference_id") == str(subscription_id):
            granted = int(event.data["amount"]) if event.recorded_at == ledger.clock.now() else 0
            break
    b = ledger.balance(s.user_id)
    return Receipt(
        key="tick",
        command="tick",
        user_id=s.user_id,
        amount_credits=granted,
        balance_credits=b.balance_credits,
        held_credits=b.held_credits,
        available_credits=b.available_credits,
        recorded_at=ledger.clock.now(),
    )
