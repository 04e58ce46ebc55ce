"""Opening a store from a URL.

``sqlite:///path/to/file`` (the embedded default), ``postgresql://user@host:port/db``
and ``memory://``. PostgreSQL takes the seed's pool settings unless the URL's
query says otherwise:
``?schema=pingvas_dev&pool_size=5&max_overflow=10&pool_timeout_s=30&recycle_s=1800&pre_ping=true``,
and ``pre_ping_window_s=0.5``: a connection handed out that recently is not
pinged again (0 pings on every checkout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

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

    def conninfo(self) -> str:
        """A psycopg connection string for this store's PostgreSQL database."""
        if self.backend != "postgresql":
            raise ConfigurationError(f"{self.backend} store has no PostgreSQL connection")
        from psycopg.conninfo import make_conninfo  # psycopg loads only for PostgreSQL

        parts = {"host": self.pg_host, "port": str(self.pg_port), "dbname": self.pg_dbname, "user": self.pg_user}
        if self.pg_password:
            parts["password"] = self.pg_password
        return make_conninfo(**parts)  # escapes quotes and backslashes


def check_identifier(name: str, what: str) -> str:
    if not name or len(name) > 63 or not set(name) <= _IDENTIFIER_CHARS or name[0].isdigit():
        raise ConfigurationError(f"{what} {name!r} must be a lowercase SQL identifier (a-z, 0-9, _; at most 63)")
    if name.startswith("pg_"):
        raise ConfigurationError(f"{what} {name!r}: names starting with pg_ are reserved by PostgreSQL")
    return name


def redact(url: str) -> str:
    """The URL with its password replaced, for messages and logs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not parseable: show no more than its scheme
        return f"{url.partition('://')[0]}://…"
    if password is None:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


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
    known = {"schema", "pool_size", "max_overflow", "pool_timeout_s", "recycle_s", "pre_ping", "pre_ping_window_s"}
    unknown = set(query) - known
    if unknown:
        raise ConfigurationError(f"unknown PostgreSQL URL options {sorted(unknown)}; known: {sorted(known)}")
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
