"""The durable gallery: app.store.base's interface, a SQLite and a PostgreSQL store."""

from __future__ import annotations

from pathlib import Path

from app.store.base import (
    Change,
    Derived,
    GalleryStore,
    StoredItem,
    StoreFullError,
    StoreUnavailableError,
    shard_of,
)
from app.store.sqlite import STORE_FILE, SqliteStore

__all__ = [
    "STORE_FILE",
    "Change",
    "Derived",
    "GalleryStore",
    "SqliteStore",
    "StoreFullError",
    "StoreUnavailableError",
    "StoredItem",
    "open_store",
    "shard_of",
]


def open_store(store: str | None, data_dir: Path) -> GalleryStore:
    """`postgresql://...`: the shared PostgreSQL store; None: the SQLite file under data_dir."""
    if store and store.startswith(("postgresql://", "postgres://")):
        from app.store.postgres import PostgresStore  # psycopg is the `cluster` extra

        return PostgresStore(store)
    if store:
        raise ValueError(
            f"--store must be a postgresql://USER@HOST:PORT/DB URL (or unset for SQLite under "
            f"--data-dir), got {store!r}"
        )
    return SqliteStore(data_dir)
