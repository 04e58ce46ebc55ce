"""The plan catalog: plans with their terms, revised over time with history kept.

A ``Plan`` aggregate per plan name; every revision is an event, so an auditor
can tell which terms (revision) granted which credits: subscriptions record the
revision they were granted under.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate
from eventsourcing.domain import Snapshot as BaseSnapshot

from ledger.domain.checks import check_optional_text, check_storable, check_text
from ledger.domain.credits import MAX_CREDITS, TOPIC_PREFIX
from ledger.domain.thresholds import plan_thresholds
from ledger.errors import InvalidArgument

PLAN_NS = UUID("5b0f7f4e-8d0c-4c7e-9a53-0c2f1f6a7b10")
#: The seed's plans and plan_features columns.
MAX_PLAN_NAME = 50
MAX_PRICE = Decimal("99999999.99")  # DECIMAL(10, 2)
MAX_INT = 2**31 - 1
MAX_BIGINT = 2**63 - 1
#: How deep a feature's config (JSON) may nest.
MAX_CONFIG_DEPTH = 16
#: How long a provider's name, and its id of a plan, may be.
MAX_PROVIDER_NAME = 50
MAX_PROVIDER_ID = 100


def plan_id_for(name: str) -> UUID:
    return uuid5(PLAN_NS, name)


def check_plan_name(value: object, name: str = "plan") -> str:
    """A plan's name as the catalog takes it: an identifier of at most 50 characters."""
    text = check_text(value, name, MAX_PLAN_NAME, required=True)
    if not text.isidentifier():
        raise InvalidArgument(
            f"{name} {text!r} must be an identifier of at most {MAX_PLAN_NAME} characters", param=name
        )
    return text


@dataclass(frozen=True)
class Feature:
    enabled: bool
    config: dict[str, Any] | None = None


#: The provider whose ids the seed's plans and subscriptions columns hold
#: (``lemon_squeezy_*``), and the keys of its plan ids in ``provider_ids``.
SEED_PROVIDER = "lemon_squeezy"
VARIANT_KEYS = {"monthly": "variant_monthly", "yearly": "variant_yearly"}
#: The compatibility names of those ids (keywords, attributes, the seed's
#: columns and the terms of events stored before provider_ids existed).
_SEED_ALIASES = {
    "lemon_squeezy_variant_id_monthly": VARIANT_KEYS["monthly"],
    "lemon_squeezy_variant_id_yearly": VARIANT_KEYS["yearly"],
}
_UNSET: Any = object()


def provider_ids_of(value: object) -> dict[str, dict[str, str]]:
    """A plain copy of a provider mapping, without the providers that hold no
    id (so that terms with ``{}`` and without the mapping are the same)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"provider_ids must be a mapping, not {type(value).__name__}", param="provider_ids")
    copied: dict[str, dict[str, str]] = {}
    for provider, ids in value.items():
        if not isinstance(ids, Mapping):
            raise InvalidArgument(
                f"provider_ids[{provider!r}] must be a mapping, not {type(ids).__name__}", param="provider_ids"
            )
        if ids:
            copied[provider] = dict(ids)
    return copied


def upcast_terms(terms: dict[str, Any]) -> None:
    """Terms data stored before ``provider_ids``, in place: its
    ``lemon_squeezy_variant_id_*`` become the ``lemon_squeezy`` entry."""
    ids = {key: terms.pop(alias) for alias, key in _SEED_ALIASES.items() if alias in terms}
    mapping = provider_ids_of(terms.get("provider_ids"))
    kept = {key: value for key, value in ids.items() if value is not None}
    if kept:
        mapping[SEED_PROVIDER] = {**mapping.get(SEED_PROVIDER, {}), **kept}
    terms["provider_ids"] = mapping


@dataclass(frozen=True, init=False)
class PlanTerms:
    """What a plan gives, at one revision. Prices are Decimal; storage in bytes.

    ``provider_ids`` holds each payment provider's ids of the plan, by
    provider: ``{"lemon_squeezy": {"variant_monthly": "...", "variant_yearly": "..."}}``.
    The core reads none of them. ``lemon_squeezy_variant_id_monthly`` and
    ``_yearly`` (keywords, positional arguments and attributes) are the
    compatibility names of the ``lemon_squeezy`` entry's two ids.
    """

    name: str
    display_name: str
    monthly_price: Decimal
    yearly_price: Decimal
    credits: int
    storage_bytes: int
    queue_count: int
    tier_level: int
    description: str | None = None
    is_active: bool = True
    features: dict[str, Feature] = field(default_factory=dict)
    provider_ids: dict[str, dict[str, str]] = field(default_factory=dict)

    def __init__(
        self,
        name: str,
        display_name: str,
        monthly_price: Decimal,
        yearly_price: Decimal,
        credits: int,
        storage_bytes: int,
        queue_count: int,
        tier_level: int,
        description: str | None = None,
        lemon_squeezy_variant_id_monthly: str | None = _UNSET,
        lemon_squeezy_variant_id_yearly: str | None = _UNSET,
        is_active: bool = True,
        features: dict[str, Feature] | None = None,
        *,
        provider_ids: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        mapping = provider_ids_of(provider_ids)
        seed = dict(mapping.get(SEED_PROVIDER, {}))
        for key, value in (
            (VARIANT_KEYS["monthly"], lemon_squeezy_variant_id_monthly),
            (VARIANT_KEYS["yearly"], lemon_squeezy_variant_id_yearly),
        ):
            if value is _UNSET:
                continue
            if value is None:
                seed.pop(key, None)
            else:
                seed[key] = value
        if seed:
            mapping[SEED_PROVIDER] = seed
        else:
            mapping.pop(SEED_PROVIDER, None)
        values: dict[str, object] = {
            "name": name,
            "display_name": display_name,
            "monthly_price": monthly_price,
            "yearly_price": yearly_price,
            "credits": credits,
            "storage_bytes": storage_bytes,
            "queue_count": queue_count,
            "tier_level": tier_level,
            "description": description,
            "is_active": is_active,
            "features": {} if features is None else features,
            "provider_ids": mapping,
        }
        for attribute, given in values.items():
            object.__setattr__(self, attribute, given)
        self.__post_init__()

    @property
    def lemon_squeezy_variant_id_monthly(self) -> str | None:
        """The ``lemon_squeezy`` entry's ``variant_monthly`` (compatibility name)."""
        return self.provider_ids.get(SEED_PROVIDER, {}).get(VARIANT_KEYS["monthly"])

    @property
    def lemon_squeezy_variant_id_yearly(self) -> str | None:
        """The ``lemon_squeezy`` entry's ``variant_yearly`` (compatibility name)."""
        return self.provider_ids.get(SEED_PROVIDER, {}).get(VARIANT_KEYS["yearly"])

    def provider_id(self, provider: str, key: str) -> str | None:
        """One of a provider's ids of the plan, or None."""
        return self.provider_ids.get(provider, {}).get(key)

    def __post_init__(self) -> None:
        # The checks every revision ever recorded passes (terms are rebuilt
        # from stored events with them); what the stores can hold is checked
        # when a plan is defined (check_terms).
        name = self.name
        if not isinstance(name, str) or not name or not name.isidentifier() or len(name) > MAX_PLAN_NAME:
            raise InvalidArgument(f"plan name {name!r} must be an identifier of at most 50 characters", param="name")
        for field_name in ("monthly_price", "yearly_price"):
            price = getattr(self, field_name)
            if not _two_places(price):
                raise InvalidArgument(
                    f"plan prices must be Decimal >= 0 with two places, got {price!r}", param=field_name
                )
        for field_name in ("credits", "storage_bytes", "queue_count", "tier_level"):
            value = getattr(self, field_name)
            if type(value) is not int or value < 0:
                raise InvalidArgument(f"plan {field_name} must be an int >= 0, got {value!r}", param=field_name)

    def as_event_data(self) -> dict[str, Any]:
        # Not asdict(self): it would rebuild every config's containers by
        # calling their types, which a defaultdict's (its first argument
        # the factory) refuses with a bare TypeError; features are built here.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["features"] = {k: {"enabled": f.enabled, "config": f.config} for k, f in self.features.items()}
        data["provider_ids"] = {k: dict(ids) for k, ids in self.provider_ids.items()}
        return data

    def canonical_data(self) -> dict[str, Any]:
        """What a command's fingerprint digests of the terms: the shape before
        ``provider_ids`` (the ``lemon_squeezy`` entry's ids under their
        compatibility names), so that keys recorded then still replay; the
        mapping is added only when it holds more than those."""
        data = self.as_event_data()
        mapping = provider_ids_of(data.pop("provider_ids"))
        seed = mapping.pop(SEED_PROVIDER, {})
        for alias, key in _SEED_ALIASES.items():
            data[alias] = seed.pop(key, None)
        if seed:
            mapping[SEED_PROVIDER] = seed
        if mapping:
            data["provider_ids"] = mapping
        return data

    @classmethod
    def from_event_data(cls, data: dict[str, Any]) -> PlanTerms:
        """Terms from event data of either shape (with ``provider_ids``, or
        with the ``lemon_squeezy_variant_id_*`` written before it)."""
        values = dict(data)
        upcast_terms(values)
        values["features"] = {k: Feature(**v) for k, v in data["features"].items()}
        return cls(**values)


def _two_places(price: object) -> bool:
    if not isinstance(price, Decimal) or not price.is_finite() or price < 0:
        return False
    try:
        return price == price.quantize(Decimal("0.01"))
    except InvalidOperation:  # too many digits to have two places
        return False


def check_terms(terms: object) -> PlanTerms:
    """Terms a plan may be defined with: what the plans and plan_features
    tables (and every event store) can hold."""
    if not isinstance(terms, PlanTerms):
        raise InvalidArgument(f"terms must be PlanTerms, not {type(terms).__name__}", param="terms")
    check_text(terms.display_name, "display_name", 100, required=True)
    check_optional_text(terms.description, "description", 10_000)
    _check_provider_ids(terms.provider_ids)
    for field_name in ("monthly_price", "yearly_price"):
        if type(getattr(terms, field_name)) is not Decimal:  # the event store transcodes a Decimal by its exact type
            kind = type(getattr(terms, field_name)).__name__
            raise InvalidArgument(f"{field_name} must be a Decimal, not {kind}", param=field_name)
        if getattr(terms, field_name) > MAX_PRICE:
            raise InvalidArgument(f"{field_name} must be at most {MAX_PRICE}", param=field_name)
    limits = {"credits": MAX_CREDITS, "storage_bytes": MAX_BIGINT, "queue_count": MAX_INT, "tier_level": MAX_INT}
    for field_name, limit in limits.items():
        if getattr(terms, field_name) > limit:
            raise InvalidArgument(f"{field_name} must be at most {limit}", param=field_name)
    if type(terms.is_active) is not bool:
        raise InvalidArgument(f"is_active must be a bool, not {type(terms.is_active).__name__}", param="is_active")
    if not isinstance(terms.features, dict):
        raise InvalidArgument(f"features must be a dict, not {type(terms.features).__name__}", param="features")
    for key, feature in terms.features.items():
        check_text(key, "a feature name", MAX_PLAN_NAME, required=True, param="features")
        if not isinstance(feature, Feature) or type(feature.enabled) is not bool:
            raise InvalidArgument(f"feature {key!r} must be a Feature with enabled a bool", param="features")
        if feature.config is not None:
            if not isinstance(feature.config, dict):
                raise InvalidArgument(f"feature {key!r}: config must be a dict or None", param="features")
            _check_json(feature.config, f"feature {key!r} config", 0)
    plan_thresholds(terms.features)  # the default balance thresholds, when the plan has them
    return terms


def _check_provider_ids(mapping: object) -> None:
    """Provider ids a plan may hold: text keys and ids; the seed's provider's
    variant ids fit its VARCHAR(50) columns, checked under their
    compatibility names."""
    if not isinstance(mapping, dict):
        raise InvalidArgument(f"provider_ids must be a dict, not {type(mapping).__name__}", param="provider_ids")
    seed = mapping.get(SEED_PROVIDER)
    if isinstance(seed, dict):
        for alias, key in _SEED_ALIASES.items():
            check_optional_text(seed.get(key), alias, 50)
    for provider, ids in mapping.items():
        check_text(provider, "a provider name", MAX_PROVIDER_NAME, required=True, param="provider_ids")
        if not isinstance(ids, dict):
            raise InvalidArgument(f"provider_ids[{provider!r}] must be a dict", param="provider_ids")
        for key, value in ids.items():
            check_text(key, f"a key of provider_ids[{provider!r}]", MAX_PLAN_NAME, required=True, param="provider_ids")
            check_text(value, f"provider_ids[{provider!r}][{key!r}]", MAX_PROVIDER_ID, param="provider_ids")


def _check_json(value: object, where: str, depth: int) -> None:
    """A feature config holds JSON that PostgreSQL's jsonb takes: no NaN or
    infinity, no NUL, integers within 64 bits, bounded nesting."""
    if depth > MAX_CONFIG_DEPTH:
        raise InvalidArgument(f"{where} nests deeper than {MAX_CONFIG_DEPTH} levels", param="features")
    if value is None or type(value) is bool:
        return
    if type(value) is int:
        if not -MAX_BIGINT - 1 <= value <= MAX_BIGINT:
            raise InvalidArgument(f"{where} holds an integer beyond 64 bits", param="features")
    elif type(value) is float:
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidArgument(f"{where} holds {value}, which JSON cannot represent", param="features")
    elif isinstance(value, str):
        check_storable(value, where, param="features")
    elif isinstance(value, list | tuple):
        for item in value:
            _check_json(item, where, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgument(f"{where} has a key that is not a str: {key!r}", param="features")
            check_storable(key, where, param="features")
            _check_json(item, where, depth + 1)
    else:
        raise InvalidArgument(f"{where} holds a {type(value).__name__}, which is not JSON", param="features")


def _features(enabled: dict[str, bool]) -> dict[str, Feature]:
    return {k: Feature(v) for k, v in enabled.items()}


GiB = 1024**3

#: The seed's plans and plan_features rows: the default catalog.
DEFAULT_CATALOG: tuple[PlanTerms, ...] = (
    PlanTerms(
        "starter",
        "Starter",
        Decimal("25.00"),
        Decimal("250.00"),
        5000,
        20 * GiB,
        1,
        1,
        features=_features({"sd_models": True, "flux_model": False, "nano_banana_api": False, "lora_training": False}),
    ),
    PlanTerms(
        "pro",
        "Pro",
        Decimal("75.00"),
        Decimal("750.00"),
        15000,
        100 * GiB,
        1,
        2,
        features=_features({"sd_models": True, "flux_model": True, "nano_banana_api": True, "lora_training": False}),
    ),
    PlanTerms(
        "studio",
        "Studio",
        Decimal("150.00"),
        Decimal("1500.00"),
        30000,
        200 * GiB,
        3,
        3,
        features=_features({"sd_models": True, "flux_model": True, "nano_banana_api": True, "lora_training": True}),
    ),
    PlanTerms("enterprise", "Enterprise", Decimal("0.00"), Decimal("0.00"), 0, 0, 0, 4),
)

#: No subscription: the seed's users.tier default.
FREE_PLAN = PlanTerms("free", "Free", Decimal("0.00"), Decimal("0.00"), 0, 0, 1, 0)


class Plan(Aggregate, created_event_name="Defined"):
    """A plan and the history of its terms."""

    TOPIC = f"{TOPIC_PREFIX}:Plan"

    class Event(Aggregate.Event):
        TOPIC = f"{TOPIC_PREFIX}:Plan.Event"

    class Defined(Aggregate.Created):
        TOPIC = f"{TOPIC_PREFIX}:Plan.Defined"
        #: Version 2: the terms hold ``provider_ids``; version 1 terms had
        #: ``lemon_squeezy_variant_id_monthly`` and ``_yearly``.
        class_version = 2
        terms: dict[str, Any]
        actor: str | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            upcast_terms(state["terms"])

    class Snapshot(BaseSnapshot):
        TOPIC = f"{TOPIC_PREFIX}:Plan.Snapshot"

    def __init__(self, terms: dict[str, Any], actor: str | None) -> None:
        self.terms_data = terms
        self.revision = 1

    class Revised(Event):
        TOPIC = f"{TOPIC_PREFIX}:Plan.Revised"
        #: Version 2: as Defined.
        class_version = 2
        terms: dict[str, Any]
        actor: str | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            upcast_terms(state["terms"])

        def apply(self, plan: Plan) -> None:
            plan.terms_data = self.terms
            plan.revision += 1

    @property
    def terms(self) -> PlanTerms:
        return PlanTerms.from_event_data(self.terms_data)

    def __deepcopy__(self, memo: dict[int, Any]) -> Plan:
        # The command cache hands out a copy per command: a generic deepcopy
        # of the terms cost a webhook delivery 0.3 ms. Revised replaces
        # terms_data, never changes it in place, so copies can share it.
        copied = object.__new__(type(self))
        copied.__dict__.update(self.__dict__)
        copied._pending_events = list(self._pending_events)
        return copied
