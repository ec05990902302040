"""The gallery stores, each test against SQLite and a real PostgreSQL server: durability,
all-or-nothing batches, the change log, derived data, shards, migration."""

from __future__ import annotations

import sqlite3
import threading

import numpy as np
import pytest

from app.store import Derived, SqliteStore, shard_of


def _v(x: float, n: int = 4) -> np.ndarray:
    return np.full(n, x, dtype=np.float32)


def _derived_of(store, bundle_key: str) -> dict:
    """id -> the stored derived bytes of bundle_key (None: none stored)."""
    return {it.id: it.derived for c in store.iter_items("text", bundle_key=bundle_key) for it in c}


def test_roundtrip_replace_delete_and_reopen(store_factory):
    store = store_factory()
    v = np.arange(4, dtype=np.float32)
    store.upsert("image", [("b", v, {"x": 1}), ("a", v + 1, {})])
    store.upsert("image", [("b", v * 2, {"x": 2})])
    assert store.count("image") == 2 and store.count("text") == 0
    got = store.get("image", "b")
    assert got.metadata == {"x": 2}
    np.testing.assert_array_equal(got.vector, v * 2)
    assert sorted(i.id for chunk in store.iter_items("image", chunk=1) for i in chunk) == ["a", "b"]
    assert store.delete("image", "b") and store.delete("image", "b") is None
    store.close()
    reopened = store_factory()
    assert [i.id for chunk in reopened.iter_items("image") for i in chunk] == ["a"]


def test_sqlite_is_durable_by_its_settings(tmp_path):
    store = SqliteStore(tmp_path)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()


def test_failed_batch_writes_nothing(store_factory):
    store = store_factory()
    v = _v(1)
    with pytest.raises(TypeError):  # the second item's metadata can't be serialised
        store.upsert("text", [("ok", v, {}), ("bad", v, {"x": object()})])
    store.upsert("text", [("ok", v, {})])
    before = store.last_seq()
    with pytest.raises(AttributeError):  # fails inside the transaction, after "new"
        store.upsert("text", [("new", v, {}), (None, v, {})])  # type: ignore[list-item]
    assert store.count("text") == 1 and store.get("text", "new") is None
    assert store.last_seq() == before  # nor a change in the log


def test_seed_happens_once(store_factory):
    store = store_factory()
    items = {"image": [("p", _v(0, 2), {})], "text": []}
    assert store.seed(items, "demo")
    store.delete("image", "p")
    assert not store.seed(items, "demo")  # an emptied gallery stays empty
    assert store.count("image") == 0 and store.get_meta("seeded") == "demo"


def test_change_log_orders_every_write_and_shows_current_state(store_factory):
    store = store_factory()
    assert store.last_seq() == 0
    s1 = store.upsert("text", [("a", _v(1), {}), ("b", _v(2), {})])
    s2 = store.delete("text", "a")
    s3 = store.upsert("text", [("b", _v(3), {"v": 3})])
    s4 = store.upsert("image", [("a", _v(4), {})])
    assert s1 < s2 < s3 < s4 == store.last_seq()
    changes = store.changes_since("text", 0)
    assert [(c.id, c.kind) for c in changes] == [("a", "put"), ("b", "put"), ("a", "delete"),
                                                 ("b", "put")]  # fmt: skip
    assert changes[0].item is None  # a's current state: gone
    assert changes[-1].item.metadata == {"v": 3}
    assert [c.id for c in store.changes_since("text", s2)] == ["b"]
    assert store.changes_since("image", 0)[0].seq == s4


def test_derived_data_is_kept_per_bundle_and_dropped_with_the_vector(store_factory):
    store = store_factory()
    k, dim = 3, 5
    rng = np.random.default_rng(0)
    derived = Derived(
        rng.integers(0, 100, size=(2, k)).astype(np.int32),
        rng.random((2, k)).astype(np.float32),
        rng.random((2, dim)).astype(np.float32),
    )
    store.upsert("text", [("a", _v(1), {}), ("b", _v(2), {})], derived, "bundle-1")
    loaded = {
        it.id: it for chunk in store.iter_items("text", bundle_key="bundle-1") for it in chunk
    }
    back = Derived.decode([loaded["a"].derived, loaded["b"].derived], k)
    np.testing.assert_array_equal(back.neighbours, derived.neighbours)
    np.testing.assert_array_equal(back.weights, derived.weights)
    np.testing.assert_array_equal(back.units, derived.units)
    # another bundle has none yet; computing it keeps both until the old one is dropped
    assert all(it.derived is None for c in store.iter_items("text", bundle_key="b2") for it in c)
    store.put_derived("b2", "text", ["a", "b", "not-there"], Derived.decode(
        [loaded["a"].derived, loaded["b"].derived, loaded["a"].derived], k))  # fmt: skip
    assert all(it.derived for c in store.iter_items("text", bundle_key="bundle-1") for it in c)
    store.drop_derived_except("b2")
    assert all(
        it.derived is None for c in store.iter_items("text", bundle_key="bundle-1") for it in c
    )
    assert all(it.derived for c in store.iter_items("text", bundle_key="b2") for it in c)
    # a new vector makes every bundle's derived data stale: it goes with the write
    store.upsert("text", [("a", _v(9), {})])
    got = {it.id: it.derived for c in store.iter_items("text", bundle_key="b2") for it in c}
    assert got["a"] is None and got["b"] is not None
    assert store.count("text") == 2  # "not-there" got no row


def test_shards_partition_the_items(store_factory):
    store = store_factory()
    ids = [f"item-{i}" for i in range(60)]
    store.upsert("text", [(i, _v(1), {}) for i in ids])
    seen = []
    for index in range(4):
        part = [it.id for c in store.iter_items("text", shard=(index, 4)) for it in c]
        assert all(shard_of(i, 4) == index for i in part)
        assert {c.id for c in store.changes_since("text", 0, shard=(index, 4))} == set(part)
        seen += part
    assert sorted(seen) == sorted(ids)


def test_concurrent_writers_get_sequence_numbers_in_commit_order(store_factory):
    """A follower reading seq > last must never skip a change that commits later."""
    if store_factory.kind == "sqlite":
        pytest.skip("one SQLite connection serialises its writers anyway")
    stores = [store_factory() for _ in range(3)]
    errors: list[BaseException] = []
    seen: list[int] = []
    stop = threading.Event()

    def write(store, prefix: str) -> None:
        try:
            for i in range(40):
                store.upsert("text", [(f"{prefix}-{i}", _v(i), {})])
        except BaseException as exc:
            errors.append(exc)

    def follow(store) -> None:
        last = 0
        while not stop.is_set():
            for change in store.changes_since("text", last):
                seen.append(change.seq)
                last = change.seq

    follower = threading.Thread(target=follow, args=(stores[0],))
    follower.start()
    writers = [threading.Thread(target=write, args=(s, f"w{n}")) for n, s in enumerate(stores)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    follower.join()
    seen += [c.seq for c in stores[0].changes_since("text", seen[-1] if seen else 0)]
    assert not errors, errors
    assert seen == sorted(set(seen)) and len(seen) == 120  # each once, none skipped


def test_sqlite_file_of_schema_1_is_migrated_without_losing_items(tmp_path):
    path = tmp_path / "gallery.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        """CREATE TABLE items (modality TEXT NOT NULL, id TEXT NOT NULL, vector BLOB NOT NULL,
           metadata TEXT NOT NULL, PRIMARY KEY (modality, id));
           CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
           INSERT INTO meta VALUES ('seeded', 'wikipedia');"""
    )
    db.executemany(
        "INSERT INTO items VALUES (?, ?, ?, ?)",
        [("text", f"t{i}", _v(i).tobytes(), '{"category": "x"}') for i in range(5)],
    )
    db.commit()
    db.close()
    store = SqliteStore(tmp_path)
    assert store.count("text") == 5 and store.get_meta("seeded") == "wikipedia"
    assert store.get_meta("schema_version") == "3"
    np.testing.assert_array_equal(store.get("text", "t3").vector, _v(3))
    parts = [[it.id for c in store.iter_items("text", shard=(i, 2)) for it in c] for i in (0, 1)]
    assert sorted(parts[0] + parts[1]) == [f"t{i}" for i in range(5)]
    seq = store.upsert("text", [("t9", _v(9), {})])
    assert seq == store.last_seq() and store.changes_since("text", 0)[-1].id == "t9"
    store.close()


def test_writes_find_an_items_derived_data_by_index(store_factory):
    """Each write drops the derived data of the items it replaces or deletes by (modality,
    id); the primary key starts with the bundle key, so without its own index that DELETE
    scanned the whole table (100 upserts: 8-9 s at 200k items)."""
    store = store_factory()
    statement = "DELETE FROM derived WHERE modality = 'text' AND id = 'x'"
    if store_factory.kind == "sqlite":
        plan = " ".join(str(r) for r in store._db.execute(f"EXPLAIN QUERY PLAN {statement}"))
    else:
        with store._connection() as conn:
            conn.execute("SET LOCAL enable_seqscan = off")  # a tiny table: force the choice
            plan = " ".join(str(r) for r in conn.execute(f"EXPLAIN {statement}").fetchall())
    assert "derived_by_item" in plan, plan
