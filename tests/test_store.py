"""The SQLite gallery store: durable settings, all-or-nothing batches, insertion order."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from app.gallery_store import GalleryStore


def test_store_roundtrip_order_and_pragmas(tmp_path):
    store = GalleryStore(tmp_path)
    v = np.arange(4, dtype=np.float32)
    store.upsert("image", [("b", v, {"x": 1}), ("a", v + 1, {})])
    store.upsert("image", [("b", v * 2, {"x": 2})])  # replace keeps its place
    assert store.count("image") == 2 and store.count("text") == 0
    got = store.get("image", "b")
    assert got.metadata == {"x": 2}
    np.testing.assert_array_equal(got.vector, v * 2)
    assert [i.id for chunk in store.iter_items("image", chunk=1) for i in chunk] == ["b", "a"]
    assert store.delete("image", "b") and not store.delete("image", "b")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()
    reopened = GalleryStore(tmp_path)
    assert [i.id for chunk in reopened.iter_items("image") for i in chunk] == ["a"]
    reopened.close()


def test_failed_batch_writes_nothing(tmp_path):
    store = GalleryStore(tmp_path)
    v = np.ones(3, dtype=np.float32)
    with pytest.raises(TypeError):  # the second item's metadata can't be serialised
        store.upsert("text", [("ok", v, {}), ("bad", v, {"x": object()})])
    store.upsert("text", [("ok", v, {})])
    with pytest.raises(sqlite3.IntegrityError):  # fails inside the transaction, after "new"
        store.upsert("text", [("new", v, {}), (None, v, {})])  # type: ignore[list-item]
    assert store.count("text") == 1 and store.get("text", "new") is None
    store.close()


def test_seed_happens_once(tmp_path):
    store = GalleryStore(tmp_path)
    items = {"image": [("p", np.zeros(2, np.float32), {})], "text": []}
    assert store.seed(items, "demo")
    store.delete("image", "p")
    assert not store.seed(items, "demo")  # an emptied gallery stays empty
    assert store.count("image") == 0 and store.get_meta("seeded") == "demo"
    store.close()
