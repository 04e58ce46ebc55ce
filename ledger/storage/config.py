"""Opening a store from a URL.

``sqlite:///path/to/file`` (the embedded default), ``postgresql://user@host:port/db``
and ``memory://``. PostgreSQL takes the seed's pool settings unless the URL's
query says otherwise:
``?schema=pingvas_dev&pool_size=5&max_overflow=10&pool_timeout_s=30&recycle_s=1800&pre_ping=true``,
and ``pre_ping_window_s=0.5``: a connection handed out that recently is not
pinged again (0 pings on every checkout). libpq's connection options
(``sslmode``, ``sslrootcert``, ``connect_timeout``, ``application_name``,
``target_session_attrs``, … : ``LIBPQ_OPTIONS``) are passed through to every
connection the ledger opens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, parse_qsl, unquote, urlencode, urlsplit

from ledger.errors import ConfigurationError

# The seed's connection-pool settings (SQLAlchemy QueuePool in the seed's service).
SEED_POOL_SIZE = 5
SEED_MAX_OVERFLOW = 10
SEED_POOL_TIMEOUT_S = 30.0
SEED_RECYCLE_S = 1800.0
SEED_PRE_PING = True
#: A connection handed out this recently is not pinged again (see PingWindow).
PRE_PING_WINDOW_S = 0.5

_IDENTIFIER_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_")

#: The ledger's own options of a PostgreSQL URL's query string.
LEDGER_OPTIONS = frozenset(
    {"schema", "pool_size", "max_overflow", "pool_timeout_s", "recycle_s", "pre_ping", "pre_ping_window_s"}
)
#: libpq connection options a PostgreSQL URL may carry, passed to every
#: connection. Left out: the URL's own parts (host, port, dbname, user,
#: password), ``options`` and ``client_encoding`` (they change session
#: settings the ledger's statements rely on: search_path, the encoding),
#: ``service`` (a service file may name another server or database than the
#: URL), ``replication`` and the deprecated ``requiressl``.
LIBPQ_OPTIONS = frozenset(
    {
        "application_name",
        "channel_binding",
        "connect_timeout",
        "fallback_application_name",
        "gssdelegation",
        "gssencmode",
        "gsslib",
        "hostaddr",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "krbsrvname",
        "load_balance_hosts",
        "passfile",
        "require_auth",
        "requirepeer",
        "ssl_max_protocol_version",
        "ssl_min_protocol_version",
        "sslcert",
        "sslcertmode",
        "sslcompression",
        "sslcrl",
        "sslcrldir",
        "sslkey",
        "sslmode",
        "sslnegotiation",
        "sslpassword",
        "sslrootcert",
        "sslsni",
        "target_session_attrs",
        "tcp_user_timeout",
    }
)
#: Options whose values are checked when the URL is read (libpq checks the
#: others when it connects).
_CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby", "prefer-standby"),
    "keepalives": ("0", "1"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "load_balance_hosts": ("disable", "random"),
}
_WHOLE_SECONDS = ("keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout")
#: Query parameters whose values are secrets: shown as *** in messages.
_SECRET_OPTIONS = frozenset({"password", "sslpassword"})


@dataclass(frozen=True)
class StoreConfig:
    backend: Literal["sqlite", "postgresql", "memory"]
    sqlite_path: Path | None = None
    pg_host: str = "127.0.0.1"
    pg_port: int = 5432
    pg_dbname: str = ""
    pg_user: str = ""
    pg_password: str = field(default="", repr=False)
    pg_schema: str = "public"
    pool_size: int = SEED_POOL_SIZE
    max_overflow: int = SEED_MAX_OVERFLOW
    pool_timeout_s: float = SEED_POOL_TIMEOUT_S
    recycle_s: float = SEED_RECYCLE_S
    pre_ping: bool = SEED_PRE_PING
    pre_ping_window_s: float = PRE_PING_WINDOW_S
    #: libpq connection options from the URL (``LIBPQ_OPTIONS``), sorted.
    pg_options: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def conninfo(self) -> str:
        """A psycopg connection string for this store's PostgreSQL database."""
        if self.backend != "postgresql":
            raise ConfigurationError(f"{self.backend} store has no PostgreSQL connection")
        from psycopg.conninfo import make_conninfo  # psycopg loads only for PostgreSQL

        parts = {"host": self.pg_host, "port": str(self.pg_port), "dbname": self.pg_dbname, "user": self.pg_user}
        if self.pg_password:
            parts["password"] = self.pg_password
        parts.update(self.pg_options)
        return make_conninfo(**parts)  # escapes quotes and backslashes

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a connection the ledger opens itself: the
        URL's connect_timeout, or else the pool's timeout as the connect
        timeout."""
        if any(name == "connect_timeout" for name, _ in self.pg_options):
            return {}
        return {"connect_timeout": round(self.pool_timeout_s)}


def check_identifier(name: str, what: str) -> str:
    if not name or len(name) > 63 or not set(name) <= _IDENTIFIER_CHARS or name[0].isdigit():
        raise ConfigurationError(f"{what} {name!r} must be a lowercase SQL identifier (a-z, 0-9, _; at most 63)")
    if name.startswith("pg_"):
        raise ConfigurationError(f"{what} {name!r}: names starting with pg_ are reserved by PostgreSQL")
    return name


def redact(url: str) -> str:
    """The URL with its password (and any ``password`` or ``sslpassword``
    option) replaced, for messages, logs and reprs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not even a URL: show nothing that could be a secret
        return "<unparsable URL>"
    query = parse_qsl(parts.query, keep_blank_values=True)
    secret_query = any(name in _SECRET_OPTIONS for name, _ in query)
    if password is None and not secret_query:
        return url  # as given: urlunsplit would turn sqlite://// into sqlite://
    if password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{password}@", ":***@", 1))
    if secret_query:
        shown = [(name, "***" if name in _SECRET_OPTIONS else value) for name, value in query]
        parts = parts._replace(query=urlencode(shown, safe="*/:,"))
    return parts.geturl()


def parse_url(url: str) -> StoreConfig:
    if not isinstance(url, str) or "://" not in url:
        shown = redact(url) if isinstance(url, str) else type(url).__name__
        raise ConfigurationError(f"not a ledger URL: {shown!r}; use sqlite:///path, postgresql://… or memory://")
    if "\x00" in url or (not url.isascii() and _not_utf8(url)):
        raise ConfigurationError("a ledger URL must not contain NUL characters or lone surrogates")
    try:
        return _parse(url)
    except ValueError as exc:  # urllib's own refusals: a bad port, an unclosed [IPv6] host
        raise ConfigurationError(f"malformed ledger URL {redact(url)!r}: {exc}") from None


def _not_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _parse(url: str) -> StoreConfig:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        return StoreConfig(backend="memory")
    if scheme == "sqlite":
        if parts.netloc:
            raise ConfigurationError(f"sqlite URLs take three slashes: sqlite:///path (got {redact(url)!r})")
        path = unquote(parts.path)
        if path.startswith("/") and not path.startswith("//"):
            path = path[1:] or ""
        if not path or path == ":memory:":
            raise ConfigurationError("sqlite URLs need a file path; use memory:// for an in-memory ledger")
        return StoreConfig(backend="sqlite", sqlite_path=Path(path))
    if scheme in ("postgresql", "postgres"):
        return _parse_postgres(url)
    raise ConfigurationError(f"unsupported ledger URL scheme {scheme!r}; use sqlite, postgresql or memory")


def _parse_postgres(url: str) -> StoreConfig:
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = set(query) - LEDGER_OPTIONS - LIBPQ_OPTIONS
    if unknown:
        raise ConfigurationError(
            f"unknown PostgreSQL URL options {sorted(unknown)}; known: the ledger's {sorted(LEDGER_OPTIONS)} "
            f"and libpq's {sorted(LIBPQ_OPTIONS)}"
        )
    pg_options = _libpq_options({k: v for k, v in query.items() if k in LIBPQ_OPTIONS})
    dbname = unquote(parts.path.lstrip("/"))
    if not dbname:
        raise ConfigurationError(f"PostgreSQL URL names no database: {redact(url)!r}")
    try:
        config = StoreConfig(
            backend="postgresql",
            pg_host=parts.hostname or "127.0.0.1",
            pg_port=parts.port or 5432,
            pg_dbname=dbname,
            pg_user=unquote(parts.username or "postgres"),
            pg_password=unquote(parts.password or ""),
            pg_schema=check_identifier(query.get("schema", "public"), "schema"),
            pool_size=int(query.get("pool_size", SEED_POOL_SIZE)),
            max_overflow=int(query.get("max_overflow", SEED_MAX_OVERFLOW)),
            pool_timeout_s=float(query.get("pool_timeout_s", SEED_POOL_TIMEOUT_S)),
            recycle_s=float(query.get("recycle_s", SEED_RECYCLE_S)),
            pre_ping=query.get("pre_ping", "true").lower() in ("1", "true", "yes", "y", "on"),
            pre_ping_window_s=float(query.get("pre_ping_window_s", PRE_PING_WINDOW_S)),
            pg_options=pg_options,
        )
    except ValueError as exc:
        raise ConfigurationError(f"bad PostgreSQL URL option in {redact(url)!r}: {exc}") from None
    if not (1 <= config.pool_size <= 100 and 0 <= config.max_overflow <= 100):
        raise ConfigurationError("pool_size must be 1..100 and max_overflow 0..100")
    if not (1 <= config.pool_timeout_s <= 600 and 60 <= config.recycle_s <= 86_400):
        raise ConfigurationError("pool_timeout_s must be 1..600 and recycle_s 60..86400")
    if not 0 <= config.pre_ping_window_s <= 60:
        raise ConfigurationError("pre_ping_window_s must be 0..60 (0: ping on every checkout)")
    return config


def _libpq_options(given: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The libpq options of a URL, checked where a wrong value would
    otherwise surface only at the first connection."""
    for name, value in given.items():
        choices = _CHOICES.get(name)
        if choices is not None and value not in choices:
            raise ConfigurationError(f"PostgreSQL URL option {name}={value!r} must be one of {', '.join(choices)}")
        if name == "connect_timeout" and not (value.isdigit() and 1 <= int(value) <= 600):
            # libpq reads 0 (and nonsense) as "wait for ever".
            raise ConfigurationError(f"PostgreSQL URL option connect_timeout must be 1..600 seconds, got {value!r}")
        if name in _WHOLE_SECONDS and not value.isdigit():
            raise ConfigurationError(f"PostgreSQL URL option {name} must be a whole number >= 0, got {value!r}")
    options = tuple(sorted(given.items()))
    import psycopg  # loaded only for PostgreSQL URLs
    from psycopg.conninfo import make_conninfo

    try:
        make_conninfo(**dict(options))  # libpq's own parse: an option this libpq does not know
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(f"PostgreSQL URL options refused by libpq {psycopg.pq.version()}: {exc}") from None
    return options
