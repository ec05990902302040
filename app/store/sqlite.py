"""The embedded gallery store: one SQLite file, WAL journal, synchronous=FULL.

An acknowledged upsert or delete is committed (and fsynced) before the API answers, so it
survives `kill -9`. Every batch is one transaction: all or nothing. The interface and what
it keeps (items, change log, derived data) are app.store.base's.

Schema versions: 1 had `items` and `meta` only; 2 adds the id hash and sequence number of
each item, the change log and derived data; 3 indexes derived data by item. Opening an older
file migrates it in place (one transaction) and keeps every item.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from app.store.base import (
    Change,
    Derived,
    ItemRow,
    Shard,
    StoredItem,
    StoreFullError,
    id_hash,
)

STORE_FILE = "gallery.sqlite3"
SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    modality TEXT NOT NULL,
    id       TEXT NOT NULL,
    vector   BLOB NOT NULL,   -- raw features, float32 little-endian
    metadata TEXT NOT NULL,   -- JSON object
    id_hash  INTEGER,         -- app.store.base.id_hash: shard filters
    seq      INTEGER,         -- the change that wrote this state
    PRIMARY KEY (modality, id)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS changes (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    modality TEXT NOT NULL,
    id       TEXT NOT NULL,
    id_hash  INTEGER NOT NULL,
    kind     TEXT NOT NULL CHECK (kind IN ('put', 'delete'))
);
CREATE INDEX IF NOT EXISTS changes_by_modality ON changes (modality, seq);
CREATE TABLE IF NOT EXISTS derived (
    bundle_key TEXT NOT NULL,
    modality   TEXT NOT NULL,
    id         TEXT NOT NULL,
    codes      BLOB NOT NULL,  -- app.store.base.Derived.encode
    PRIMARY KEY (bundle_key, modality, id)
);
-- A write drops every bundle's derived data of the item it replaces or deletes: without
-- this index each such DELETE scanned the whole table (100 upserts took 8-9 s at 200k items).
CREATE INDEX IF NOT EXISTS derived_by_item ON derived (modality, id);
"""


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def _item(item_id: str, blob: bytes, metadata: str, derived: bytes | None = None) -> StoredItem:
    vector = np.frombuffer(blob, dtype="<f4").astype(np.float32)
    return StoredItem(id=item_id, vector=vector, metadata=json.loads(metadata), derived=derived)


def _shard_clause(shard: Shard | None, column: str) -> tuple[str, tuple[int, ...]]:
    if shard is None:
        return "", ()
    index, count = shard
    return f" AND {column} % ? = ?", (count, index)


class SqliteStore:
    """Items per modality, keyed by id. Thread-safe: one connection behind a lock."""

    shared = False  # one process owns the file: nobody else writes behind its back

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
            self._migrate()

    def _migrate(self) -> None:
        with self._transaction():
            old_items = self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'items'"
            ).fetchone()
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(items)")}
            if old_items and "seq" not in columns:  # version 1: add the new columns
                self._db.execute("ALTER TABLE items ADD COLUMN id_hash INTEGER")
                self._db.execute("ALTER TABLE items ADD COLUMN seq INTEGER")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            missing = self._db.execute(
                "SELECT rowid, id FROM items WHERE id_hash IS NULL"
            ).fetchall()
            self._db.executemany(
                "UPDATE items SET id_hash = ?, seq = 0 WHERE rowid = ?",
                [(id_hash(item_id), rowid) for rowid, item_id in missing],
            )
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )
            # This store's identity: a snapshot (app.snapshot) taken of another store, or
            # of this directory before it was wiped and recreated, must not be applied.
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('store_id', ?) ON CONFLICT DO NOTHING",
                (uuid.uuid4().hex,),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- writes -------------------------------------------------------------------------------

    def _log(self, modality: str, item_id: str, kind: str) -> int:
        cursor = self._db.execute(
            "INSERT INTO changes (modality, id, id_hash, kind) VALUES (?, ?, ?, ?)",
            (modality, item_id, id_hash(item_id), kind),
        )
        return int(cursor.lastrowid or 0)

    def _put(
        self,
        modality: str,
        items: Sequence[ItemRow],
        derived: Derived | None,
        bundle_key: str | None,
    ) -> int:
        seq = 0
        for i, (item_id, vector, metadata) in enumerate(items):
            seq = self._log(modality, item_id, "put")
            self._db.execute(
                "INSERT INTO items (modality, id, vector, metadata, id_hash, seq) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (modality, id) DO UPDATE SET "
                "vector = excluded.vector, metadata = excluded.metadata, seq = excluded.seq",
                (modality, item_id, _blob(vector), json.dumps(metadata, sort_keys=True),
                 id_hash(item_id), seq),
            )  # fmt: skip
            # Derived data of other bundles describes the old vector: it goes.
            self._db.execute(
                "DELETE FROM derived WHERE modality = ? AND id = ?", (modality, item_id)
            )
            if derived is not None and bundle_key is not None:
                self._db.execute(
                    "INSERT INTO derived (bundle_key, modality, id, codes) VALUES (?, ?, ?, ?)",
                    (bundle_key, modality, item_id, derived.encode(i)),
                )
        return seq

    def upsert(
        self,
        modality: str,
        items: Sequence[ItemRow],
        derived: Derived | None = None,
        bundle_key: str | None = None,
    ) -> int:
        # Serialise metadata before the transaction: a bad value fails with nothing written.
        for _, _, metadata in items:
            json.dumps(metadata)
        with self._lock, self._transaction():
            return self._put(modality, items, derived, bundle_key)

    def delete(self, modality: str, item_id: str) -> int | None:
        with self._lock, self._transaction():
            cursor = self._db.execute(
                "DELETE FROM items WHERE modality = ? AND id = ?", (modality, item_id)
            )
            if cursor.rowcount == 0:
                return None
            self._db.execute(
                "DELETE FROM derived WHERE modality = ? AND id = ?", (modality, item_id)
            )
            return self._log(modality, item_id, "delete")

    def put_derived(
        self, bundle_key: str, modality: str, ids: Sequence[str], derived: Derived
    ) -> None:
        with self._lock, self._transaction():
            self._db.executemany(
                "INSERT INTO derived (bundle_key, modality, id, codes) "
                "SELECT ?, ?, ?, ? WHERE EXISTS "
                "(SELECT 1 FROM items WHERE modality = ? AND id = ?) "
                "ON CONFLICT (bundle_key, modality, id) DO UPDATE SET codes = excluded.codes",
                [
                    (bundle_key, modality, item_id, derived.encode(i), modality, item_id)
                    for i, item_id in enumerate(ids)
                ],
            )

    def drop_derived_except(self, bundle_key: str) -> None:
        with self._lock, self._transaction():
            self._db.execute("DELETE FROM derived WHERE bundle_key != ?", (bundle_key,))

    def seed(self, items_by_modality: dict[str, Sequence[ItemRow]], marker: str) -> bool:
        with self._lock, self._transaction():
            if self._db.execute("SELECT 1 FROM meta WHERE key = 'seeded'").fetchone():
                return False
            for modality, items in items_by_modality.items():
                self._put(modality, items, None, None)
            self._db.execute("INSERT INTO meta (key, value) VALUES ('seeded', ?)", (marker,))
            return True

    # --- reads --------------------------------------------------------------------------------

    def get(self, modality: str, item_id: str) -> StoredItem | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, vector, metadata FROM items WHERE modality = ? AND id = ?",
                (modality, item_id),
            ).fetchone()
        return None if row is None else _item(*row)

    def count(self, modality: str) -> int:
        with self._lock:
            (n,) = self._db.execute(
                "SELECT COUNT(*) FROM items WHERE modality = ?", (modality,)
            ).fetchone()
        return int(n)

    def iter_items(
        self,
        modality: str,
        chunk: int = 8192,
        *,
        bundle_key: str | None = None,
        shard: Shard | None = None,
    ) -> Iterator[list[StoredItem]]:
        """All items of a modality in insertion order (rowid), in chunks."""
        where, params = _shard_clause(shard, "i.id_hash")
        last = -1
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT i.rowid, i.id, i.vector, i.metadata, d.codes FROM items i "
                    "LEFT JOIN derived d ON d.bundle_key = ? AND d.modality = i.modality "
                    "AND d.id = i.id "
                    f"WHERE i.modality = ? AND i.rowid > ?{where} ORDER BY i.rowid LIMIT ?",
                    (bundle_key, modality, last, *params, chunk),
                ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [_item(*r[1:]) for r in rows]

    def last_seq(self) -> int:
        with self._lock:
            (seq,) = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()
        return int(seq)

    def changes_since(
        self,
        modality: str,
        seq: int,
        limit: int = 10_000,
        *,
        bundle_key: str | None = None,
        shard: Shard | None = None,
    ) -> list[Change]:
        where, params = _shard_clause(shard, "c.id_hash")
        with self._lock:
            rows = self._db.execute(
                "SELECT c.seq, c.id, c.kind, i.vector, i.metadata, d.codes FROM changes c "
                "LEFT JOIN items i ON i.modality = c.modality AND i.id = c.id "
                "LEFT JOIN derived d ON d.bundle_key = ? AND d.modality = c.modality "
                "AND d.id = c.id "
                f"WHERE c.modality = ? AND c.seq > ?{where} ORDER BY c.seq LIMIT ?",
                (bundle_key, modality, seq, *params, limit),
            ).fetchall()
        return [
            Change(
                seq=s,
                modality=modality,
                id=item_id,
                kind=kind,
                item=None if blob is None else _item(item_id, blob, metadata, codes),
            )
            for s, item_id, kind, blob, metadata, codes in rows
        ]

    def change_signature(self, seq: int) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT modality, kind, id FROM changes WHERE seq = ?", (seq,)
            ).fetchone()
        return None if row is None else ":".join(row)

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


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
