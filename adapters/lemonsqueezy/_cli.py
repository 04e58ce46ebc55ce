"""``python -m ledger webhooks send|retry|list|link`` and ``python -m ledger
reconcile``: registered on the ledger's command line through the
``pingvas_ledger.cli`` entry points in ``pyproject.toml``, and imported only
when one of them runs."""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click
from click.core import ParameterSource

from ledger import ConfigurationError, resolve_url

from ._effects import DEFAULT_HOLD_WINDOW_S

if TYPE_CHECKING:
    from ._adapter import Processor


def _url(url: str | None) -> str:
    resolved = resolve_url(url)
    # As the core's commands: every memory:// ledger is a store of its own, so
    # a command on one would start from an empty ledger and keep nothing.
    if resolved.lower().startswith("memory:"):
        raise ConfigurationError(
            "memory:// is a store of one ledger object only: this command would start from an empty ledger "
            "and keep nothing; give a sqlite:/// or postgresql:// URL (--url or LEDGER_URL)"
        )
    return resolved


MAX_SEND_BYTES = 16 * 1024 * 1024
URL_HELP = "Ledger URL (default: $LEDGER_URL, else sqlite:///pingvas-ledger.sqlite3)."


def _parse_packs(values: tuple[str, ...]) -> dict[str, int]:
    """``VARIANT=CREDITS`` pairs from ``--credit-pack`` and from
    ``$LEMONSQUEEZY_CREDIT_PACKS`` (comma-separated); the options win."""
    pairs = [p for p in os.environ.get("LEMONSQUEEZY_CREDIT_PACKS", "").split(",") if p.strip()]
    packs: dict[str, int] = {}
    for pair in [*pairs, *values]:
        variant, sep, credits = pair.strip().partition("=")
        if not sep or not variant.strip().isdigit() or not credits.strip().isdigit():
            raise click.BadParameter(f"credit packs are VARIANT=CREDITS (digits), got {pair!r}")
        packs[variant.strip()] = int(credits)
    return packs


#: Options that configure the adapter one setting at a time (``--adapter`` gives them all).
_SETTINGS = (
    "test_mode",
    "packs",
    "upgrade",
    "expiry",
    "rollover_cap",
    "claw_back",
    "from_other_credits",
    "hold_window_s",
    "secret",
)


def _adapter_options(fn: Any) -> Any:
    """The options that say how the host's adapter is configured: its factory
    (``--adapter``), or else each setting that decides an effect."""
    options = [
        click.option("--url", default=None, help=URL_HELP),
        click.option(
            "--adapter",
            "factory",
            default=None,
            envvar="LEMONSQUEEZY_ADAPTER",
            show_envvar=True,
            metavar="MODULE:FACTORY",
            help="The host's configuration: FACTORY(url) returns its LemonSqueezy (or Processor) on the ledger "
            "at url, opened as the endpoint opens it. Excludes the options below.",
        ),
        click.option(
            "--secret",
            default=None,
            envvar="LEMONSQUEEZY_SIGNING_SECRET",
            show_envvar=True,
            help="The webhook's signing secret: a stored delivery is applied again only once its seal checks.",
        ),
        click.option(
            "--test-mode",
            is_flag=True,
            envvar="LEMONSQUEEZY_TEST_MODE",
            show_envvar=True,
            help="Apply test-mode events (not live).",
        ),
        click.option(
            "--credit-pack",
            "packs",
            multiple=True,
            metavar="VARIANT=CREDITS",
            help="A credit pack variant (also from $LEMONSQUEEZY_CREDIT_PACKS, comma-separated).",
        ),
        click.option(
            "--upgrade",
            type=click.Choice(["full", "prorated", "none"]),
            default="full",
            show_default=True,
            help="The ledger's upgrade policy (as the webhook endpoint runs it).",
        ),
        click.option(
            "--expiry",
            type=click.Choice(["expire", "rollover"]),
            default="expire",
            show_default=True,
            help="The ledger's credit expiry policy.",
        ),
        click.option(
            "--rollover-cap",
            "rollover_cap",
            default=None,
            type=click.IntRange(0, None),
            metavar="CREDITS",
            help="The ledger's rollover_cap_credits (default: no cap).",
        ),
        click.option(
            "--claw-back/--no-claw-back",
            "claw_back",
            default=True,
            show_default=True,
            help="RefundPolicy.claw_back: whether refunds take credits back.",
        ),
        click.option(
            "--from-other-credits/--from-grant-only",
            "from_other_credits",
            default=True,
            show_default=True,
            help="RefundPolicy.from_other_credits.",
        ),
        click.option(
            "--hold-window-s",
            default=DEFAULT_HOLD_WINDOW_S,
            show_default=True,
            type=click.IntRange(0, 7 * 86_400),
            help="How long an invoice waits for its subscription snapshot.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _load_factory(spec: str) -> Callable[[str], Any]:
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name.isidentifier():
        raise click.BadParameter(f"expected MODULE:FACTORY, got {spec!r}", param_hint="--adapter")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise click.BadParameter(
            f"cannot import {module_name}: {type(exc).__name__}: {exc}", param_hint="--adapter"
        ) from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise click.BadParameter(f"{module_name} has no callable {name}", param_hint="--adapter")
    return cast(Callable[[str], Any], factory)


@contextmanager
def _processor(settings: dict[str, Any], *, create: bool = True) -> Iterator[Processor]:
    """The processor the webhook endpoint runs: the host's factory's, or one
    built from the options. Closes the ledger when done. ``create=False``:
    refuse a store that does not exist, after the options are checked."""
    from adapters.webhooks import RefundPolicy
    from ledger import CreditPolicy, Ledger, LedgerError

    from ._adapter import LemonSqueezy, Processor

    ctx = click.get_current_context()
    url = _url(settings["url"])
    if settings["factory"]:
        given = [
            "/".join([*param.opts, *param.secondary_opts])
            for param in ctx.command.params
            if param.name in _SETTINGS and ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE
        ]
        if given:
            raise click.UsageError(
                f"--adapter gives the whole configuration; drop {', '.join(given)} "
                "(or drop --adapter and give every setting as an option)"
            )
        factory = _load_factory(settings["factory"])
        if not create:
            with Ledger(url, create=False):  # refuses a store that does not exist, creating nothing
                pass
        try:
            built = factory(url)
        except Exception as exc:  # the host's code: say which, and why
            raise click.ClickException(f"--adapter {settings['factory']} failed: {type(exc).__name__}: {exc}") from exc
        processor = built.processor if isinstance(built, LemonSqueezy) else built
        if not isinstance(processor, Processor):
            raise click.ClickException(
                f"--adapter {settings['factory']} returned a {type(built).__name__}, not a LemonSqueezy or Processor"
            )
        with processor.ledger:
            yield processor
        return
    try:
        policy = CreditPolicy(
            upgrade=settings["upgrade"],
            expiry=settings["expiry"],
            rollover_cap_credits=settings["rollover_cap"],
            auto_renew=False,
        )
    except LedgerError as exc:
        raise click.UsageError(str(exc)) from exc
    refunds = RefundPolicy(claw_back=settings["claw_back"], from_other_credits=settings["from_other_credits"])
    packs = _parse_packs(settings["packs"])
    with Ledger(url, credit_policy=policy, create=create) as ledger:
        try:
            processor = Processor(
                ledger,
                test_mode=settings["test_mode"],
                credit_packs=packs,
                refund_policy=refunds,
                hold_window_s=settings["hold_window_s"],
                signing_secret=settings["secret"],
            )
        except LedgerError as exc:
            raise click.UsageError(str(exc)) from exc
        yield processor


#: Every environment variable the Lemon Squeezy commands read, for their ``--help``.
ENVIRONMENT = (
    ("LEDGER_URL", "the ledger URL (default sqlite:///pingvas-ledger.sqlite3)"),
    ("LEMONSQUEEZY_SIGNING_SECRET", "webhooks send, trigger, retry, link: --secret"),
    ("LEMONSQUEEZY_API_KEY", "reconcile --api-key"),
    ("LEMONSQUEEZY_ADAPTER", "webhooks retry, reconcile: --adapter MODULE:FACTORY"),
    ("LEMONSQUEEZY_TEST_MODE", "webhooks retry, reconcile: --test-mode"),
    (
        "LEMONSQUEEZY_CREDIT_PACKS",
        "webhooks retry, reconcile: credit packs, VARIANT=CREDITS,... (before --credit-pack)",
    ),
)


def _epilog() -> str:
    width = max(len(name) for name, _ in ENVIRONMENT)
    # \b: click keeps the lines of this paragraph as they are.
    return "\b\nEnvironment variables:\n" + "\n".join(f"  {n:<{width}}  {what}" for n, what in ENVIRONMENT)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=_epilog())
def webhooks() -> None:
    """Lemon Squeezy webhooks: send or trigger signed test deliveries, retry failed ones, list them, link a
    customer."""


@webhooks.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--secret",
    envvar="LEMONSQUEEZY_SIGNING_SECRET",
    show_envvar=True,
    required=True,
    help="The webhook's signing secret.",
)
@click.option("--url", "target", required=True, help="The webhook endpoint, e.g. http://localhost:8000/webhooks/ls.")
@click.option("--timeout-s", default=30.0, show_default=True)
def send(file: Path, secret: str, target: str, timeout_s: float) -> None:
    """Sign FILE's bytes, exactly as they are, and POST them like Lemon Squeezy does."""
    import httpx

    from ._signature import sign

    body = file.read_bytes()
    if len(body) > MAX_SEND_BYTES:
        raise click.BadParameter(f"{file} is over {MAX_SEND_BYTES} bytes")
    headers = {"Content-Type": "application/json", "X-Signature": sign(body, secret)}
    event = _event_name(body)
    if event:
        headers["X-Event-Name"] = event
    try:
        response = httpx.post(target, content=body, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        click.echo(f"error: could not POST to {target}: {exc}", err=True)
        sys.exit(1)
    click.echo(f"HTTP {response.status_code} {response.text[:2000]}")
    if not response.is_success:
        sys.exit(1)


def _parse_time(value: str | None, name: str) -> Any:
    from datetime import UTC, datetime

    if value is None:
        return datetime.now(UTC).replace(microsecond=0)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO-8601 time", param_hint=name) from None
    if moment.tzinfo is None:
        raise click.BadParameter(f"{value!r} has no time zone (add Z or +00:00)", param_hint=name)
    return moment.astimezone(UTC)


def _lemon_id(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or not 0 < int(value) < 2**53:
        raise click.BadParameter(f"a Lemon Squeezy id is a positive integer, got {value!r}", param_hint=name)
    return int(value)


def _variants(ledger_url: str | None, cycle: str) -> dict[str, Any]:
    """The catalog's plans with a Lemon Squeezy variant of ``cycle``, cheapest first."""
    from ledger import BillingCycle, Ledger, LedgerError

    from ._simulator import plan_variants

    try:
        with Ledger(_url(ledger_url), create=False) as ledger:
            found = plan_variants(ledger)
    except LedgerError as exc:
        # The store's own message names the ledger's --url; here that option is the endpoint.
        raise click.ClickException(
            f"cannot read the plan catalog: {exc}. Name the host's ledger with --ledger-url (or $LEDGER_URL), "
            "or give the variant yourself with --variant and --price-cents"
        ) from exc
    chosen = [v for (_, c), v in found.items() if c == BillingCycle(cycle)]
    return {v.plan: v for v in sorted(chosen, key=lambda v: (v.price_cents, v.plan))}


@webhooks.command()
@click.argument("event", required=False, metavar="EVENT")
@click.option("--story", is_flag=True, help="Send a whole subscription's life instead of one EVENT.")
@click.option("--user", "user_id", required=True, help="The ledger user (a UUID), sent as meta.custom_data.user_id.")
@click.option("--url", "target", default=None, help="The webhook endpoint, e.g. http://localhost:8000/webhooks/ls.")
@click.option(
    "--secret", envvar="LEMONSQUEEZY_SIGNING_SECRET", show_envvar=True, default=None, help="The signing secret."
)
@click.option("--ledger-url", default=None, help="The ledger whose plan catalog gives the variants ($LEDGER_URL).")
@click.option("--plan", default=None, help="The subscription's plan (default: the cheapest with a variant).")
@click.option("--to-plan", default=None, help="--story: the plan changed to (default: the next dearer one).")
@click.option("--cycle", type=click.Choice(["monthly", "yearly"]), default="monthly", show_default=True)
@click.option("--variant", "variant_id", default=None, help="A variant id instead of --plan (no catalog read).")
@click.option("--to-variant", "to_variant_id", default=None, help="--story with --variant: the upgrade's variant.")
@click.option("--price-cents", type=click.IntRange(0, 10**12), default=None, help="With --variant: its price.")
@click.option("--to-price-cents", type=click.IntRange(1, 10**12), default=None, help="With --to-variant: its price.")
@click.option("--pack", "pack_variant", default=None, help="order_created/order_refunded of this credit pack variant.")
@click.option("--total-cents", type=click.IntRange(0, 10**12), default=None, help="The payment's total.")
@click.option("--billing-reason", type=click.Choice(["initial", "renewal", "updated"]), default="initial")
@click.option("--subscription-id", default=None, help="Lemon Squeezy subscription id (default: from --user).")
@click.option("--customer-id", default=None, help="Lemon Squeezy customer id (default: from --user).")
@click.option("--invoice-id", default=None, help="The invoice (to recover or refund one sent before).")
@click.option("--order-id", default=None, help="The order (to refund one sent before).")
@click.option("--at", default=None, help="Lemon Squeezy's time of the event, or the story's start (default: now).")
@click.option("--created-at", default=None, help="The subscription's (or invoice's) created_at (default: --at).")
@click.option("--test-mode", is_flag=True, help="A test-mode event (meta.test_mode and the object's test_mode).")
@click.option("--no-custom-data", is_flag=True, help="Leave out meta.custom_data, as a checkout without it does.")
@click.option("--email", default=None, help="The customer's email (what a resolve_user reads).")
@click.option("--print", "dry_run", is_flag=True, help="Print each delivery's headers and body; send nothing.")
@click.option("--timeout-s", default=30.0, show_default=True)
def trigger(event: str | None, story: bool, **o: Any) -> None:
    """Send realistic, signed Lemon Squeezy deliveries to an endpoint, like `stripe trigger`: one EVENT,
    or with --story a subscription's whole life (checkout, renewals, plan change, failed payment and
    recovery, refund, cancel, expiry). Variants and prices come from the ledger's plan catalog."""
    from uuid import UUID

    from ledger import LedgerError

    from ._simulator import EVENTS, ORDER_EVENTS, Simulator, Variant, send

    if story == (event is not None):
        raise click.UsageError(
            "give one EVENT, or --story" if not story else "--story sends its own events: drop EVENT"
        )
    if event is not None and event not in EVENTS:
        raise click.BadParameter(f"{event!r} is not an event the adapter handles: {', '.join(EVENTS)}")
    if not o["dry_run"] and (not o["target"] or not o["secret"]):
        raise click.UsageError("--url and --secret (or $LEMONSQUEEZY_SIGNING_SECRET) are required, unless --print")
    try:
        user = UUID(o["user_id"])
    except ValueError:
        raise click.BadParameter(f"{o['user_id']!r} is not a UUID", param_hint="--user") from None
    at = _parse_time(o["at"], "--at")
    created = _parse_time(o["created_at"], "--created-at") if o["created_at"] else None
    from ledger import BillingCycle

    cycle = BillingCycle(o["cycle"])

    def given(variant_opt: str, price_opt: str, plan: str) -> Variant:
        variant = _lemon_id(o[variant_opt], f"--{variant_opt.replace('_id', '').replace('_', '-')}")
        assert variant is not None
        price = o[price_opt] if o[price_opt] is not None else 0
        return Variant(variant, plan, cycle, price)

    if o["variant_id"] is not None:
        plan = given("variant_id", "price_cents", o["plan"] or "plan")
        catalog: dict[str, Variant] = {}
    elif event in ORDER_EVENTS and o["pack_variant"] is not None:
        plan, catalog = Variant(0, "pack", cycle, 0), {}
    else:
        catalog = _variants(o["ledger_url"], o["cycle"])
        if not catalog:
            raise click.ClickException(f"no plan of the catalog has a {o['cycle']} Lemon Squeezy variant")
        name = o["plan"] or next(iter(catalog))
        if name not in catalog:
            raise click.BadParameter(f"{name!r} has no {o['cycle']} variant; plans: {', '.join(catalog)}")
        plan = catalog[name]
    if o["pack_variant"] is not None:
        pack = _lemon_id(o["pack_variant"], "--pack")
        assert pack is not None
        plan = Variant(pack, "credit pack", cycle, o["total_cents"] if o["total_cents"] is not None else 1000)
    try:
        simulator = Simulator(
            user,
            customer_id=_lemon_id(o["customer_id"], "--customer-id"),
            subscription_id=_lemon_id(o["subscription_id"], "--subscription-id"),
            test_mode=o["test_mode"],
            custom_data=not o["no_custom_data"],
            email=o["email"],
        )
        if story:
            if o["to_variant_id"] is not None:
                upgrade = given("to_variant_id", "to_price_cents", o["to_plan"] or "upgrade")
            else:
                dearer = [v for v in catalog.values() if v.price_cents > plan.price_cents]
                name = o["to_plan"] or (dearer[0].plan if dearer else None)
                if name is None or name not in catalog:
                    raise click.BadParameter("no dearer plan to change to: give --to-plan", param_hint="--to-plan")
                upgrade = catalog[name]
            deliveries = simulator.story(at, plan, upgrade)
        else:
            assert event is not None
            deliveries = [
                simulator.event(
                    event,
                    plan,
                    at=at,
                    created=created,
                    invoice_id=_lemon_id(o["invoice_id"], "--invoice-id"),
                    order_id=_lemon_id(o["order_id"], "--order-id"),
                    reason=o["billing_reason"],
                    total_cents=o["total_cents"],
                )
            ]
    except LedgerError as exc:
        raise click.UsageError(str(exc)) from exc
    if o["dry_run"]:
        # Each request as sent: its headers, a blank line, its exact body (the bytes the signature is of).
        for delivery in deliveries:
            headers = delivery.headers(o["secret"]) if o["secret"] else {"X-Event-Name": delivery.event_name}
            click.echo(f"POST {o['target'] or '-'}")
            click.echo("".join(f"{name}: {value}\n" for name, value in headers.items()))
            click.echo(delivery.body.decode("ascii") + "\n")
        return
    import httpx

    failed = 0
    try:
        for delivery, status, text in send(deliveries, o["target"], o["secret"], timeout_s=o["timeout_s"]):
            click.echo(f"{delivery.event_name} {delivery.webhook_id} HTTP {status} {text[:2000]}")
            failed += not 200 <= status < 300
    except httpx.HTTPError as exc:
        click.echo(f"error: could not POST to {o['target']}: {exc}", err=True)
        sys.exit(1)
    if failed:
        click.echo(f"{failed} of {len(deliveries)} deliveries were not answered 2xx", err=True)
        sys.exit(1)


def _event_name(body: bytes) -> str | None:
    try:
        name = json.loads(body)["meta"]["event_name"]
    except (ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and name.isprintable() and len(name) <= 50 else None


@webhooks.command()
@_adapter_options
@click.option("--limit", default=500, show_default=True, help="At most this many deliveries per pass.")
@click.option(
    "--unsealed",
    is_flag=True,
    help="Also apply deliveries stored without a seal (before schema version 4), each with a warning.",
)
def retry(limit: int, unsealed: bool, **settings: Any) -> None:
    """Reprocess failed deliveries (and ones a stopped process left received). Deliveries whose seal is
    missing or wrong are refused, not applied."""
    from ledger import ConfigurationError

    with _processor(settings, create=False) as processor:  # nothing to retry in a store that does not exist

        def progress(row: Any, outcome: Any) -> None:
            if outcome.status == "processed":
                what = "processed" + (f" ({outcome.message})" if outcome.message else "")
            else:
                what = outcome.message or outcome.status
            click.echo(f"{row.row_id} {row.event_type}: {what}")

        try:
            report = processor.retry(limit=limit, progress=progress, unsealed=unsealed)
        except ConfigurationError as exc:
            raise click.UsageError(f"{exc} (--secret or $LEMONSQUEEZY_SIGNING_SECRET)") from exc
    click.echo(
        f"retried {report.attempted}: processed {report.processed}, failed {report.failed}, "
        f"held {report.held}, ignored {report.ignored}"
    )


@webhooks.command()
@_adapter_options
@click.argument("customer_id")
@click.argument("user_id")
def link(customer_id: str, user_id: str, **settings: Any) -> None:
    """Link Lemon Squeezy customer CUSTOMER_ID to ledger user USER_ID (a UUID), then apply at once the
    deliveries that were held until the customer's user was known."""
    from uuid import UUID

    from ledger import LedgerError

    try:
        user = UUID(user_id)
    except ValueError:
        raise click.BadParameter(f"{user_id!r} is not a UUID", param_hint="USER_ID") from None
    with _processor(settings) as processor:
        try:
            report = processor.link_customer(customer_id, user)
        except LedgerError as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    for row_id, event_type, message in report.released.messages:
        click.echo(f"{row_id} {event_type}: {message}")
    done = report.released
    state = "linked to" if report.linked else "was already linked to"
    click.echo(
        f"customer {report.customer_id} {state} user {report.user_id}; held deliveries run: {done.attempted} "
        f"(processed {done.processed}, failed {done.failed}, held {done.held})"
    )


@webhooks.command("list")
@click.option("--url", default=None, help=URL_HELP)
@click.option("--status", type=click.Choice(["received", "processed", "failed"]), default=None)
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
def list_(url: str | None, status: str | None, limit: int) -> None:
    """Show the newest deliveries and the count per status."""
    from adapters.webhooks import Inbox
    from ledger import Ledger

    from ._adapter import SOURCE

    with Ledger(_url(url), create=False) as ledger:
        inbox = Inbox(ledger, SOURCE)
        for row in inbox.listing(status=status, limit=limit):
            error = f"  {row.error_message}" if row.error_message else ""
            click.echo(f"{row.created_at} {row.row_id} {row.event_type:<32} {row.status:<9} x{row.attempts}{error}")
        counts = inbox.counts()
    click.echo(", ".join(f"{k} {v}" for k, v in counts.items()) or "no deliveries")


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=_epilog())
@_adapter_options
@click.option(
    "--api-key", envvar="LEMONSQUEEZY_API_KEY", show_envvar=True, required=True, help="A Lemon Squeezy API key."
)
@click.option("--store-id", default=None, help="Only this store's objects.")
@click.option("--since-days", default=45, show_default=True, type=click.IntRange(1, 3660), help="Invoices this recent.")
@click.option("--api-url", default=None, help="The API's base URL (default https://api.lemonsqueezy.com/v1).")
def reconcile(api_key: str, store_id: str | None, since_days: int, api_url: str | None, **settings: Any) -> None:
    """Fetch subscriptions, invoices (recent and refunded) and orders from Lemon Squeezy; bring the ledger in line."""
    from ._client import API_URL, LemonSqueezyApiError, LemonSqueezyClient
    from ._reconcile import Reconciler

    with (
        _processor(settings) as processor,
        LemonSqueezyClient(api_key, base_url=api_url or API_URL) as client,
    ):
        try:
            report = Reconciler(processor, client, store_id=store_id, since_days=since_days).run(echo=click.echo)
        except LemonSqueezyApiError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
    click.echo(
        f"{report.subscriptions_seen} subscriptions and {report.invoices_seen} invoices checked "
        f"({report.old_refunds_seen} of them older refunds), {report.orders_checked} of {report.orders_seen} orders: "
        f"{report.changed} changed, {len(report.notes)} noted, {len(report.problems)} not applied"
    )
