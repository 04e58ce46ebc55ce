"""The one place that chooses the backend: from the URL's scheme to the
backend module that serves it. A backend's module (and its driver: psycopg
for PostgreSQL) is imported only when a ledger of that kind is opened."""

from __future__ import annotations

from ledger.storage.base import Backend
from ledger.storage.config import StoreConfig


def open_backend(config: StoreConfig) -> Backend:
    """The backend for a parsed ledger URL (``ledger.storage.config.parse_url``)."""
    if config.backend == "postgresql":
        from ledger.storage.postgres.backend import PostgresBackend

        return PostgresBackend(config)
    if config.backend == "sqlite":
        from ledger.storage.sqlite.backend import SQLiteBackend

        return SQLiteBackend(config)
    from ledger.storage.memory import MemoryBackend

    return MemoryBackend(config)


def backend_class(dialect: str) -> type[Backend]:
    """The backend whose DDL dialect is named ``dialect`` (``postgresql`` or ``sqlite``)."""
    if dialect == "postgresql":
        from ledger.storage.postgres.backend import PostgresBackend

        return PostgresBackend
    if dialect == "sqlite":
        from ledger.storage.sqlite.backend import SQLiteBackend

        return SQLiteBackend
    raise ValueError(f"no backend speaks {dialect!r}")
