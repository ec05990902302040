"""The shared gallery store: PostgreSQL through psycopg 3 and its connection pool.

Same interface and semantics as app.store.sqlite (app.store.base). What sharing adds:
- Sequence numbers in commit order. Every write transaction first takes one transaction-level
  advisory lock, so writers commit one at a time and a change's number (from a sequence,
  taken under that lock) is larger than every number committed before it. Without it, two
  concurrent transactions can take 7 and 8 and commit 8 first; a follower that read 8 and
  then asks for `seq > 8` never sees 7. A durable write costs a few ms here (3.8 ms
  measured), so one writer at a time is no bottleneck for a gallery.
- NOTIFY on the channel `cdpae_changes` with every commit, so followers wake up at once
  (app.store.changes); they poll as well, so a missed notification only delays them.
- Migrations run under a session advisory lock, so replicas that start together migrate once.
A connection that fails (the server down or restarting) raises StoreUnavailableError; the
pool replaces broken connections by itself once the server is back.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import psycopg
from psycopg_pool import ConnectionPool

from app.store.base import (
    Change,
    Derived,
    ItemRow,
    Shard,
    StoredItem,
    StoreUnavailableError,
    id_hash,
)

SCHEMA_VERSION = 2
NOTIFY_CHANNEL = "cdpae_changes"
_WRITE_LOCK = 0x6364_7061_6501  # pg_advisory_xact_lock key: one writer at a time
_MIGRATE_LOCK = 0x6364_7061_6502

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS items (
        modality TEXT NOT NULL,
        id       TEXT NOT NULL,
        vector   BYTEA NOT NULL,
        metadata TEXT NOT NULL,
        id_hash  BIGINT NOT NULL,
        seq      BIGINT NOT NULL,
        PRIMARY KEY (modality, id))""",
    "CREATE SEQUENCE IF NOT EXISTS change_seq",
    """CREATE TABLE IF NOT EXISTS changes (
        seq      BIGINT PRIMARY KEY,
        modality TEXT NOT NULL,
        id       TEXT NOT NULL,
        id_hash  BIGINT NOT NULL,
        kind     TEXT NOT NULL CHECK (kind IN ('put', 'delete')))""",
    "CREATE INDEX IF NOT EXISTS changes_by_modality ON changes (modality, seq)",
    """CREATE TABLE IF NOT EXISTS derived (
        bundle_key TEXT NOT NULL,
        modality   TEXT NOT NULL,
        id         TEXT NOT NULL,
        codes      BYTEA NOT NULL,
        PRIMARY KEY (bundle_key, modality, id))""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # Version 2: writes drop the derived data of the item they replace or delete by
    # (modality, id); without this index each such DELETE scanned the table (app.store.sqlite).
    "CREATE INDEX IF NOT EXISTS derived_by_item ON derived (modality, id)",
]


def _item(item_id: str, blob: bytes, metadata: str, derived: bytes | None = None) -> StoredItem:
    vector = np.frombuffer(bytes(blob), dtype="<f4").astype(np.float32)
    codes = None if derived is None else bytes(derived)
    return StoredItem(id=item_id, vector=vector, metadata=json.loads(metadata), derived=codes)


def _shard_clause(shard: Shard | None, column: str) -> tuple[str, tuple[int, ...]]:
    if shard is None:
        return "", ()
    index, count = shard
    return f" AND {column} %% %s = %s", (count, index)


class PostgresStore:
    """The gallery in a PostgreSQL database shared by every replica and shard."""

    shared = True  # others write too: follow the change log (app.store.changes)

    def __init__(self, url: str, *, pool_size: int = 4, timeout: float = 2.0) -> None:
        self.url = url
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            timeout=timeout,
            kwargs={"connect_timeout": max(1, int(timeout))},
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=timeout)
        except Exception as exc:  # psycopg_pool.PoolTimeout: nothing answered
            self._pool.close()
            raise StoreUnavailableError(f"can't reach the gallery database: {exc}") from exc
        self._migrate()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection in a transaction; database failures become
        StoreUnavailableError (the transaction rolled back: nothing written)."""
        try:
            with self._pool.connection() as conn, conn.transaction():
                yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise StoreUnavailableError(str(exc).strip() or type(exc).__name__) from exc
        except Exception as exc:
            if type(exc).__name__ == "PoolTimeout":
                raise StoreUnavailableError(f"no database connection: {exc}") from exc
            raise

    def _migrate(self) -> None:
        with self._connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )
            # This database's identity (see app.store.sqlite): snapshots check it.
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('store_id', %s) ON CONFLICT DO NOTHING",
                (uuid.uuid4().hex,),
            )

    def close(self) -> None:
        self._pool.close()

    # --- writes -------------------------------------------------------------------------------

    @staticmethod
    def _begin_write(conn: psycopg.Connection) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))

    @staticmethod
    def _log(conn: psycopg.Connection, modality: str, item_id: str, kind: str) -> int:
        row = conn.execute(
            "INSERT INTO changes (seq, modality, id, id_hash, kind) "
            "VALUES (nextval('change_seq'), %s, %s, %s, %s) RETURNING seq",
            (modality, item_id, id_hash(item_id), kind),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def _put(
        self,
        conn: psycopg.Connection,
        modality: str,
        items: Sequence[ItemRow],
        derived: Derived | None,
        bundle_key: str | None,
    ) -> int:
        seq = 0
        for i, (item_id, vector, metadata) in enumerate(items):
            seq = self._log(conn, modality, item_id, "put")
            blob = np.ascontiguousarray(vector, dtype="<f4").tobytes()
            conn.execute(
                "INSERT INTO items (modality, id, vector, metadata, id_hash, seq) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (modality, id) DO UPDATE SET "
                "vector = excluded.vector, metadata = excluded.metadata, seq = excluded.seq",
                (modality, item_id, blob, json.dumps(metadata, sort_keys=True),
                 id_hash(item_id), seq),
            )  # fmt: skip
            conn.execute("DELETE FROM derived WHERE modality = %s AND id = %s", (modality, item_id))
            if derived is not None and bundle_key is not None:
                conn.execute(
                    "INSERT INTO derived (bundle_key, modality, id, codes) VALUES (%s, %s, %s, %s)",
                    (bundle_key, modality, item_id, derived.encode(i)),
                )
        conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, modality))
        return seq

    def upsert(
        self,
        modality: str,
        items: Sequence[ItemRow],
        derived: Derived | None = None,
        bundle_key: str | None = None,
    ) -> int:
        for _, _, metadata in items:
            json.dumps(metadata)  # a bad value fails here, with nothing written
        with self._connection() as conn:
            self._begin_write(conn)
            return self._put(conn, modality, items, derived, bundle_key)

    def delete(self, modality: str, item_id: str) -> int | None:
        with self._connection() as conn:
            self._begin_write(conn)
            cursor = conn.execute(
                "DELETE FROM items WHERE modality = %s AND id = %s", (modality, item_id)
            )
            if cursor.rowcount == 0:
                return None
            conn.execute("DELETE FROM derived WHERE modality = %s AND id = %s", (modality, item_id))
            seq = self._log(conn, modality, item_id, "delete")
            conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, modality))
            return seq

    def put_derived(
        self, bundle_key: str, modality: str, ids: Sequence[str], derived: Derived
    ) -> None:
        with self._connection() as conn, conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO derived (bundle_key, modality, id, codes) "
                "SELECT %s, %s, %s, %s WHERE EXISTS "
                "(SELECT 1 FROM items WHERE modality = %s AND id = %s) "
                "ON CONFLICT (bundle_key, modality, id) DO UPDATE SET codes = excluded.codes",
                [
                    (bundle_key, modality, item_id, derived.encode(i), modality, item_id)
                    for i, item_id in enumerate(ids)
                ],
            )

    def drop_derived_except(self, bundle_key: str) -> None:
        with self._connection() as conn:
            conn.execute("DELETE FROM derived WHERE bundle_key <> %s", (bundle_key,))

    def seed(self, items_by_modality: dict[str, Sequence[ItemRow]], marker: str) -> bool:
        with self._connection() as conn:
            self._begin_write(conn)
            if conn.execute("SELECT 1 FROM meta WHERE key = 'seeded'").fetchone():
                return False
            for modality, items in items_by_modality.items():
                self._put(conn, modality, items, None, None)
            conn.execute("INSERT INTO meta (key, value) VALUES ('seeded', %s)", (marker,))
            return True

    # --- reads --------------------------------------------------------------------------------

    def get(self, modality: str, item_id: str) -> StoredItem | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT id, vector, metadata FROM items WHERE modality = %s AND id = %s",
                (modality, item_id),
            ).fetchone()
        return None if row is None else _item(*row)

    def count(self, modality: str) -> int:
        with self._connection() as conn:
            row = conn.execute("SELECT COUNT(*) FROM items WHERE modality = %s", (modality,))
            (n,) = row.fetchone() or (0,)
        return int(n)

    def iter_items(
        self,
        modality: str,
        chunk: int = 8192,
        *,
        bundle_key: str | None = None,
        shard: Shard | None = None,
    ) -> Iterator[list[StoredItem]]:
        """All items of a modality in the order they were first written, in chunks."""
        where, params = _shard_clause(shard, "i.id_hash")
        last = ""
        while True:  # keyset pagination by id: each chunk is one short query
            with self._connection() as conn:
                rows = conn.execute(
                    "SELECT i.id, i.vector, i.metadata, d.codes FROM items i "
                    "LEFT JOIN derived d ON d.bundle_key = %s AND d.modality = i.modality "
                    "AND d.id = i.id "
                    f"WHERE i.modality = %s AND i.id > %s{where} ORDER BY i.id LIMIT %s",
                    (bundle_key, modality, last, *params, chunk),
                ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [_item(*r) for r in rows]

    def last_seq(self) -> int:
        with self._connection() as conn:
            row = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()
        return int(row[0]) if row else 0

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
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT c.seq, c.id, c.kind, i.vector, i.metadata, d.codes FROM changes c "
                "LEFT JOIN items i ON i.modality = c.modality AND i.id = c.id "
                "LEFT JOIN derived d ON d.bundle_key = %s AND d.modality = c.modality "
                "AND d.id = c.id "
                f"WHERE c.modality = %s AND c.seq > %s{where} ORDER BY c.seq LIMIT %s",
                (bundle_key, modality, seq, *params, limit),
            ).fetchall()
        return [
            Change(
                seq=int(s),
                modality=modality,
                id=item_id,
                kind=kind,
                item=None if blob is None else _item(item_id, blob, metadata, codes),
            )
            for s, item_id, kind, blob, metadata, codes in rows
        ]

    def change_signature(self, seq: int) -> str | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT modality, kind, id FROM changes WHERE seq = %s", (seq,)
            ).fetchone()
        return None if row is None else ":".join(row)

    def get_meta(self, key: str) -> str | None:
        with self._connection() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
        return None if row is None else str(row[0])
