"""The durable gallery: one SQLite file, WAL journal, synchronous=FULL.

An acknowledged upsert or delete is committed (and fsynced) before the API
answers, so it survives `kill -9`. Items keep their raw feature vectors so a
new bundle can re-embed them. Every batch is one transaction: all or nothing.

The store is behind this small interface (GalleryStore) so another backend can
be added without touching the routes or the engine.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STORE_FILE = "gallery.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    modality TEXT NOT NULL,
    id       TEXT NOT NULL,
    vector   BLOB NOT NULL,   -- raw features, float32 little-endian
    metadata TEXT NOT NULL,   -- JSON object
    PRIMARY KEY (modality, id)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class StoredItem:
    id: str
    vector: np.ndarray  # raw features, float32
    metadata: dict


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


class GalleryStore:
    """Items per modality, keyed by id. Thread-safe: one connection behind a lock."""

    def __init__(self, data_dir: Path) -> None:
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / STORE_FILE
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: the WAL is fsynced at every commit, so a commit is on disk when it returns.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def upsert(self, modality: str, items: Sequence[tuple[str, np.ndarray, dict]]) -> None:
        """Insert or replace items in one transaction: all of them or none."""
        rows = [(modality, i, _blob(v), json.dumps(m, sort_keys=True)) for i, v, m in items]
        with self._lock, self._transaction():
            self._db.executemany(
                "INSERT INTO items (modality, id, vector, metadata) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (modality, id) DO UPDATE SET "
                "vector = excluded.vector, metadata = excluded.metadata",
                rows,
            )

    def delete(self, modality: str, item_id: str) -> bool:
        """Delete one item; False if it was not there."""
        with self._lock, self._transaction():
            cursor = self._db.execute(
                "DELETE FROM items WHERE modality = ? AND id = ?", (modality, item_id)
            )
            return cursor.rowcount > 0

    def get(self, modality: str, item_id: str) -> StoredItem | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, vector, metadata FROM items WHERE modality = ? AND id = ?",
                (modality, item_id),
            ).fetchone()
        return None if row is None else _item(row)

    def count(self, modality: str) -> int:
        with self._lock:
            (n,) = self._db.execute(
                "SELECT COUNT(*) FROM items WHERE modality = ?", (modality,)
            ).fetchone()
        return int(n)

    def iter_items(self, modality: str, chunk: int = 8192) -> Iterator[list[StoredItem]]:
        """All items of a modality in insertion order (rowid), in chunks."""
        last = -1
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT rowid, id, vector, metadata FROM items "
                    "WHERE modality = ? AND rowid > ? ORDER BY rowid LIMIT ?",
                    (modality, last, chunk),
                ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [_item(r[1:]) for r in rows]

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def seed(
        self, items_by_modality: dict[str, Sequence[tuple[str, np.ndarray, dict]]], marker: str
    ) -> bool:
        """Fill an empty store once, atomically, and remember it; False if already seeded."""
        with self._lock, self._transaction():
            if self._db.execute("SELECT 1 FROM meta WHERE key = 'seeded'").fetchone():
                return False
            for modality, items in items_by_modality.items():
                self._db.executemany(
                    "INSERT OR IGNORE INTO items (modality, id, vector, metadata) "
                    "VALUES (?, ?, ?, ?)",
                    [(modality, i, _blob(v), json.dumps(m, sort_keys=True)) for i, v, m in items],
                )
            self._db.execute("INSERT INTO meta (key, value) VALUES ('seeded', ?)", (marker,))
            return True

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class StoreFullError(Exception):
    """The disk under the store is full: the write was rolled back, nothing changed."""


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (COMMIT's own included)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error as commit_error:
                exc = commit_error
        # A failed COMMIT (disk full) may leave the transaction open: later reads on this one
        # connection would see writes that were never acknowledged, and every later BEGIN fails.
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL":
            raise StoreFullError("the disk under the gallery store is full") from exc
        if exc_type is None:
            raise exc  # the COMMIT error, after the rollback


def _item(row: tuple) -> StoredItem:
    item_id, blob, metadata = row
    return StoredItem(
        id=item_id, vector=np.frombuffer(blob, dtype="<f4").copy(), metadata=json.loads(metadata)
    )
