"""Snapshots (app/snapshot.py): a restart reads the gallery from local files and catches up;
what it then serves is exactly what a load from the store serves. A snapshot that does not
belong to the store, the bundle or the format, or is damaged, is not used."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from app.ann import AnnParams
from app.bundle import load_bundle
from app.engine import Engine
from app.store import SqliteStore

ANN = AnnParams(
    hnsw=AnnParams().hnsw.model_copy(update={"M": 8, "ef_construction": 40}), candidates=64
)


def _items(n: int, rng: np.random.Generator, prefix: str):
    ids = [f"{prefix}-{i}" for i in range(n)]
    features = rng.normal(size=(n, 8)).astype(np.float32)
    return ids, features, [{"category": f"c{i % 5}", "n": i} for i in range(n)]


def _engine(bundle, store, snapshot_dir, ann=ANN) -> Engine:
    engine = Engine(bundle, store, ann_params=ann, ann_min_items=500, snapshot_dir=snapshot_dir)
    engine.seed_if_empty()
    engine.load()
    return engine


def _answers(engine: Engine) -> list:
    """Everything a client can see: counts, and rankings by every path, with and without
    a filter (ids and scores; equal means equal to the bit)."""
    rng = np.random.default_rng(7)
    queries = rng.normal(size=(12, 16)).astype(np.float32)
    seen: list = [engine.count("text"), engine.count("image")]
    for similarity in ("knn", "cosine"):
        for mode in ("exact", "approximate"):
            for hits in engine.search("image", queries, 20, similarity, mode=mode):
                seen.append([(h.id, h.score, h.metadata_json) for h in hits])
        for hits in engine.search("image", queries, 20, similarity, {"category": "c3"}):
            seen.append([(h.id, h.score) for h in hits])
    return seen


def _wait_for_indexes(engine: Engine) -> None:
    import time

    deadline = time.monotonic() + 60
    for replica in engine.replicas.values():
        while replica.gallery.building_ann and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.fixture
def bundle(synthetic_bundle):
    return load_bundle(synthetic_bundle)


def test_restart_from_a_snapshot_serves_what_a_load_from_the_store_serves(
    store_factory, bundle, tmp_path
):
    snapshots = tmp_path / "snapshots"
    rng = np.random.default_rng(3)
    store = store_factory()
    first = _engine(bundle, store, snapshots)
    first.upsert("text", *_items(2000, rng, "t"))  # past ann_min_items: indexes built
    for i in range(0, 2000, 9):
        first.delete("text", f"t-{i}")
    first.upsert("text", *_items(50, rng, "t"))  # replaced: new vectors and metadata
    assert first.replicas["text"].gallery.neighbours.dtype == np.uint16  # indexes built inline
    first.close()  # writes the snapshots
    assert first.replicas["text"].snapshot is not None
    assert first.replicas["text"].snapshot.has_ann

    # Changes the snapshot has not seen (another replica's, or made after a crash): new items
    # without derived data, replacements, and deletes of items the snapshot holds.
    later = _items(30, rng, "late")
    store.upsert("text", list(zip(*later, strict=True)))
    store.upsert("text", list(zip(*_items(5, rng, "t"), strict=True)))
    for i in (1, 2, 3, 500):
        store.delete("text", f"t-{i}")

    restarted = _engine(bundle, store_factory(), snapshots)
    replica = restarted.replicas["text"]
    assert replica.loaded_from == "snapshot"
    # The indexes came with it: no background build.
    assert replica.gallery.ann is not None and not replica.gallery.building_ann
    from_store = _engine(bundle, store_factory(), None)
    _wait_for_indexes(from_store)
    assert from_store.replicas["text"].loaded_from == "store"
    assert _answers(restarted) == _answers(from_store)
    assert restarted.count("text") == store.count("text")
    # Galleries with ANN indexes keep 16-bit neighbour ids (built or read back), the small
    # image gallery, scanned exactly, int32 (Gallery.compact_neighbour_ids).
    assert replica.gallery.neighbours.dtype == np.uint16
    assert from_store.replicas["text"].gallery.neighbours.dtype == np.uint16
    assert restarted.replicas["image"].gallery.ann is None
    assert restarted.replicas["image"].gallery.neighbours.dtype == np.int32
    # The knn certificate's weight caps are not saved but derived again: every live row's
    # weights must be within them (app.ann.sparse_term_bound).
    gallery = replica.gallery
    live = np.flatnonzero(gallery.alive[: gallery.n_rows])
    assert len(live) and gallery.weight_caps.max() > 0
    assert (gallery.weights[live] <= gallery.weight_caps[gallery.neighbours[live]]).all()
    assert gallery.cluster_caps is not None and gallery.cosine_clusters is not None
    members = gallery.cosine_clusters.cluster_of[live][:, None]
    assert (
        gallery.weights[live] <= gallery.cluster_caps.caps(gallery.neighbours[live], members)
    ).all()
    gone = {h.id for h in restarted.search("image", np.ones((1, 16), np.float32), 5000)[0]}
    assert not {"t-1", "t-2", "t-3", "t-500"} & gone
    assert {f"late-{i}" for i in range(30)} <= gone
    restarted.close()
    from_store.close()


def test_nothing_is_rewritten_when_nothing_changed(store_factory, bundle, tmp_path):
    snapshots = tmp_path / "snapshots"
    store = store_factory()
    _engine(bundle, store, snapshots).close()
    written = {p.name: p.stat().st_mtime_ns for p in snapshots.iterdir()}
    _engine(bundle, store_factory(), snapshots).close()  # read it, changed nothing
    assert {p.name: p.stat().st_mtime_ns for p in snapshots.iterdir()} == written
    again = _engine(bundle, store_factory(), snapshots)
    again.upsert("image", ["new"], np.zeros((1, 16), np.float32), [{}])
    again.close()
    assert (snapshots / "image.json").stat().st_mtime_ns != written["image.json"]
    assert (snapshots / "text.json").stat().st_mtime_ns == written["text.json"]
    # one generation per gallery stays on disk, not one per restart
    assert len([p for p in snapshots.iterdir() if p.is_dir()]) == 2


def test_a_snapshot_of_another_store_is_not_used(bundle, tmp_path, caplog):
    snapshots = tmp_path / "snapshots"
    rng = np.random.default_rng(5)
    store = SqliteStore(tmp_path / "a")
    engine = _engine(bundle, store, snapshots)
    engine.upsert("text", *_items(40, rng, "a"))
    engine.close()
    store.close()
    # A new store in the same place (the data dir wiped): same seed, same sequence numbers.
    shutil.rmtree(tmp_path / "a")
    caplog.set_level(logging.INFO, logger="cdpae.engine")
    fresh = _engine(bundle, SqliteStore(tmp_path / "a"), snapshots)
    assert fresh.replicas["text"].loaded_from == "store"
    assert "taken with another store_id" in caplog.text
    assert fresh.count("text") == 30  # the seeded default gallery only


def test_a_store_restored_from_an_older_backup_does_not_take_a_newer_snapshot(
    bundle, tmp_path, caplog
):
    snapshots = tmp_path / "snapshots"
    rng = np.random.default_rng(6)
    store = SqliteStore(tmp_path / "db")
    engine = _engine(bundle, store, snapshots)
    backup = tmp_path / "backup.sqlite3"
    with sqlite3.connect(backup) as target:
        store._db.backup(target)  # the store as it was before the next writes
    engine.upsert("text", *_items(40, rng, "kept"))
    engine.close()  # snapshot taken after the 40 writes
    store.close()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / "db" / f"gallery.sqlite3{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, tmp_path / "db" / "gallery.sqlite3")
    restored = SqliteStore(tmp_path / "db")
    # Other writes after the restore: the change log is as long again, with other changes.
    restored.upsert("text", list(zip(*_items(45, rng, "other"), strict=True)))
    caplog.set_level(logging.INFO, logger="cdpae.engine")
    engine = _engine(bundle, restored, snapshots)
    assert engine.replicas["text"].loaded_from == "store"
    assert "is not the store's" in caplog.text
    hits = engine.search("image", np.ones((1, 16), np.float32), 1000)[0]
    ids = {h.id for h in hits}
    assert not {f"kept-{i}" for i in range(40)} & ids  # what the backup never had
    assert {f"other-{i}" for i in range(45)} <= ids


@pytest.mark.parametrize("damage", ["truncated", "garbled", "missing"])
def test_a_damaged_snapshot_is_not_used(bundle, tmp_path, caplog, damage):
    snapshots = tmp_path / "snapshots"
    rng = np.random.default_rng(8)
    store = SqliteStore(tmp_path / "db")
    engine = _engine(bundle, store, snapshots)
    engine.upsert("text", *_items(40, rng, "x"))
    engine.close()
    generation = next(p for p in snapshots.iterdir() if p.is_dir() and p.name.startswith("text"))
    if damage == "truncated":
        projected = generation / "projected.npy"
        projected.write_bytes(projected.read_bytes()[:-100])
    elif damage == "garbled":  # the right size, not JSON any more
        rows = generation / "rows.json"
        rows.write_bytes(b"\x00" * rows.stat().st_size)
    else:
        (generation / "alive.npy").unlink()
    caplog.set_level(logging.INFO, logger="cdpae.engine")
    again = _engine(bundle, store, snapshots)
    assert again.replicas["text"].loaded_from == "store"
    assert again.replicas["image"].loaded_from == "snapshot"  # its snapshot was not damaged
    assert again.count("text") == 70
    assert _answers(again) == _answers(_engine(bundle, store, None))


def test_indexes_saved_with_other_hnsw_parameters_are_rebuilt(bundle, tmp_path):
    snapshots = tmp_path / "snapshots"
    rng = np.random.default_rng(9)
    store = SqliteStore(tmp_path / "db")
    engine = _engine(bundle, store, snapshots)
    engine.upsert("text", *_items(800, rng, "y"))
    engine.close()
    other = replace(ANN, hnsw=ANN.hnsw.model_copy(update={"M": 12}))
    again = _engine(bundle, store, snapshots, ann=other)
    replica = again.replicas["text"]
    assert replica.loaded_from == "snapshot"
    assert replica.snapshot is not None and not replica.snapshot.has_ann
    _wait_for_indexes(again)
    assert replica.gallery.ann is not None
    assert replica.gallery.ann.params.hnsw.M == 12
    assert replica.gallery.ann.index.M == 12
    # ...and the rebuilt indexes are saved in their turn (with ANN this time), just after
    # the build is marked done.
    deadline = time.monotonic() + 30
    while not replica.snapshot.has_ann and time.monotonic() < deadline:
        time.sleep(0.05)
    assert replica.snapshot.has_ann


def _older_snapshot(bundle, tmp_path, items, edit) -> tuple[SqliteStore, Path]:
    """The store and snapshot directory of a text gallery of `items` (_items) saved with its
    ANN indexes, the snapshot then made what an older writer left: edit(manifest, generation)
    changes its manifest (and files)."""
    snapshots = tmp_path / "snapshots"
    store = SqliteStore(tmp_path / "db")
    engine = _engine(bundle, store, snapshots)
    engine.upsert("text", *items)
    engine.close()
    pointer = snapshots / "text.json"
    manifest = json.loads(pointer.read_text())
    assert manifest["ann"] is not None
    edit(manifest, snapshots / manifest["generation"])
    pointer.write_text(json.dumps(manifest))
    return store, snapshots


def test_a_snapshot_from_before_the_cosine_clusters_is_used_and_clustered(bundle, tmp_path):
    """Snapshots written before cosine's inverted file (app.clusters) hold the arrays and
    the knn index but no clusters: they are still read, and the clusters fitted on load."""

    def without_clusters(manifest: dict, generation: Path) -> None:
        del manifest["ann"]["cosine_clusters"]
        for name in [name for name in manifest["files"] if name.startswith("cosine-")]:
            del manifest["files"][name]
            (generation / name).unlink()

    store, snapshots = _older_snapshot(
        bundle, tmp_path, _items(1500, np.random.default_rng(4), "o"), without_clusters
    )
    again = _engine(bundle, store, snapshots)
    replica = again.replicas["text"]
    assert replica.loaded_from == "snapshot"
    assert replica.gallery.cosine_clusters is not None and not replica.gallery.building_ann
    from_store = _engine(bundle, SqliteStore(tmp_path / "db"), None)
    _wait_for_indexes(from_store)
    assert _answers(again) == _answers(from_store)


def _flat(params: dict) -> dict:
    """AnnParams as snapshots recorded them before app.hnsw: M and ef_construction beside the
    rest ({"M": .., "ef_construction": .., "candidates": .., ...})."""
    hnsw = params.pop("hnsw")
    return {"M": hnsw["M"], "ef_construction": hnsw["ef_construction"], **params}


@pytest.mark.parametrize(
    ("saved", "kept"),
    [
        (_flat, True),
        (lambda params: {**_flat(params), "M": 12}, False),
        (lambda params: {**_flat(params), "ef_construction": 41}, False),
        (lambda params: {**params, "hnsw": "unreadable"}, False),
        (lambda params: "unreadable", False),
    ],
    ids=["flat", "flat-other-M", "flat-other-ef-construction", "bad-hnsw", "bad-params"],
)
def test_knn_params_recorded_flat_or_unreadable_are_compared_never_fatal(
    bundle, tmp_path, saved, kept
):
    """A snapshot from before app.hnsw records the knn index's params flat: its index (always
    of space l2) is used when M, ef_construction and dim match the service's, rebuilt when they
    don't. Params that can't be read mean a rebuild too, not a failed load."""

    def recorded_so(manifest: dict, generation: Path) -> None:
        assert manifest["ann"]["params"]["hnsw"] == ANN.hnsw.model_dump()  # nested now
        manifest["ann"]["params"] = saved(manifest["ann"]["params"])

    store, snapshots = _older_snapshot(
        bundle, tmp_path, _items(800, np.random.default_rng(5), "f"), recorded_so
    )
    again = _engine(bundle, store, snapshots)
    replica = again.replicas["text"]
    assert replica.loaded_from == "snapshot"
    assert replica.snapshot is not None and replica.snapshot.has_ann == kept
    if kept:  # the saved index, no background build
        assert replica.gallery.ann is not None and not replica.gallery.building_ann
    _wait_for_indexes(again)
    assert replica.gallery.ann is not None
    assert (replica.gallery.ann.index.M, replica.gallery.ann.index.ef_construction) == (8, 40)
    from_store = _engine(bundle, SqliteStore(tmp_path / "db"), None)
    _wait_for_indexes(from_store)
    assert _answers(again) == _answers(from_store)


def test_a_restarted_shard_reads_its_snapshot_and_catches_up(
    synthetic_bundle, postgres_url, tmp_path
):
    """A shard (as Ray restarts it: the constructor again) reads the snapshot it wrote after
    its load, catches up on the writes since, and ranks its slice as a load from the store."""
    from app.bundle import MANIFEST, sha256_of
    from app.cluster.shard import GalleryShard, ShardConfig
    from app.gallery import QueryBatch
    from app.store import open_store

    store = open_store(postgres_url, tmp_path)
    rng = np.random.default_rng(11)
    store.upsert("text", list(zip(*_items(400, rng, "s"), strict=True)))
    config = ShardConfig(
        bundle=str(synthetic_bundle),
        bundle_key=sha256_of(synthetic_bundle / MANIFEST),
        store_url=postgres_url,
        modality="text",
        index=1,
        count=3,
        ann_params=ANN,
        ann_min_items=0,
        snapshot_dir=str(tmp_path / "node-snapshots"),
    )
    first = GalleryShard(config)
    assert first.replica.snapshot is not None  # written after the load from the store
    first.follower.stop()
    store.upsert("text", list(zip(*_items(60, rng, "after"), strict=True)))  # while it's down
    store.delete("text", "s-7")
    store.delete("text", "s-8")
    restarted = GalleryShard(config)
    from_store = GalleryShard(replace(config, snapshot_dir=None))
    try:
        assert restarted.replica.loaded_from == "snapshot"
        assert from_store.replica.loaded_from == "store"
        units = rng.normal(size=(5, 12)).astype(np.float32)
        units /= np.linalg.norm(units, axis=1, keepdims=True)
        queries = QueryBatch(units)
        assert restarted.count() == from_store.count()
        got = restarted.search(queries, 50, "cosine", None, "exact")
        want = from_store.search(queries, 50, "cosine", None, "exact")
        assert got == want
        ids = {h.id for hits in got[0] for h in hits}
        assert not {"s-7", "s-8"} & ids
    finally:
        restarted.follower.stop()
        from_store.follower.stop()
        store.close()


def test_a_snapshot_write_that_fails_leaves_the_previous_one(bundle, tmp_path, monkeypatch):
    """A full disk halfway through: no half-written generation, the previous snapshot stays
    in force and the next start reads it (and catches up on what it lacks)."""
    import errno

    import app.snapshot

    snapshots = tmp_path / "snapshots"
    store = SqliteStore(tmp_path / "db")
    engine = _engine(bundle, store, snapshots)  # the snapshot written after the load
    before = sorted(p.name for p in snapshots.iterdir())
    engine.upsert("text", *_items(10, np.random.default_rng(2), "z"))
    writes = {"n": 0}
    real_save = np.save

    def failing_save(*args, **kwargs):
        writes["n"] += 1
        if writes["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(app.snapshot.np, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        engine.replicas["text"].save_snapshot()
    monkeypatch.undo()
    assert sorted(p.name for p in snapshots.iterdir()) == before
    again = _engine(bundle, store, snapshots)
    assert again.replicas["text"].loaded_from == "snapshot"
    assert again.count("text") == 40


def test_the_directory_is_fsynced_before_and_after_the_pointer_is_switched(
    bundle, tmp_path, monkeypatch
):
    """Only the order of the calls can be checked here (a power loss can't be): the
    directory entry of the new generation is fsynced before the pointer names it, and the
    pointer's rename is fsynced after it."""
    import app.snapshot

    snapshots = tmp_path / "snapshots"
    engine = _engine(bundle, SqliteStore(tmp_path / "db"), snapshots)
    engine.upsert("text", *_items(10, np.random.default_rng(4), "f"))
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = app.snapshot._fsync, app.snapshot.os.replace

    def fsync(path):
        events.append(("fsync", str(path)))
        real_fsync(path)

    def replace(source, target):
        events.append(("replace", str(target)))
        real_replace(source, target)

    monkeypatch.setattr(app.snapshot, "_fsync", fsync)
    monkeypatch.setattr(app.snapshot.os, "replace", replace)
    info = engine.replicas["text"].save_snapshot()
    monkeypatch.undo()
    assert info is not None
    switch = events.index(("replace", str(snapshots / "text.json")))
    directory = ("fsync", str(snapshots))
    assert directory in events[:switch]  # the generation's entry, before the pointer
    assert directory in events[switch + 1 :]  # the pointer's rename
    assert events.index(("fsync", str(info.path))) < switch
    assert _engine(bundle, SqliteStore(tmp_path / "db"), snapshots).count("text") == 40


def test_a_save_removes_its_own_leftovers_and_nothing_of_other_snapshots(bundle, tmp_path):
    """A crash mid-write leaves a temporary pointer or an unreferenced generation behind: the
    next save of that snapshot removes them; other galleries' and shards' files stay."""
    snapshots = tmp_path / "snapshots"
    engine = _engine(bundle, SqliteStore(tmp_path / "db"), snapshots)
    engine.upsert("text", *_items(10, np.random.default_rng(12), "l"))
    before = {p.name for p in snapshots.iterdir()}
    stale_pointer = snapshots / ".text.json.0123abcd"
    stale_pointer.write_text('{"half": ')
    stale_generation = snapshots / "text.0123456789ab"
    stale_generation.mkdir()
    (stale_generation / "projected.npy").write_bytes(b"half")
    others = [
        snapshots / ".text-shard-1-of-2.json.0123abcd",  # another shard's, mid-write
        snapshots / ".image.json.89abcdef",
        snapshots / "text-shard-1-of-2.json",
    ]
    for path in others:
        path.write_text("{}")
    other_generations = [snapshots / "text-shard-1-of-2.0123456789ab", snapshots / "image.x"]
    for path in other_generations:
        path.mkdir()
    info = engine.replicas["text"].save_snapshot()
    assert info is not None
    assert not stale_pointer.exists() and not stale_generation.exists()
    assert all(p.exists() for p in others + other_generations)
    texts = {p.name for p in snapshots.iterdir() if p.name.startswith("text.")}
    assert texts == {"text.json", info.path.name}
    assert {p.name for p in snapshots.iterdir() if p.name.startswith("image")} == {
        name for name in before if name.startswith("image")
    } | {"image.x"}


def test_a_snapshot_claims_only_what_its_arrays_hold_with_a_single_writer(bundle, tmp_path):
    """SQLite (one writer): a change committed to the store but not put into memory (as when
    the put after the commit fails) is caught up before the snapshot is written, not claimed
    by its seq and lost to every restart that reads it."""
    snapshots = tmp_path / "snapshots"
    store = SqliteStore(tmp_path / "db")
    engine = _engine(bundle, store, snapshots)
    replica = engine.replicas["text"]
    ids, features, metadata = _items(3, np.random.default_rng(13), "unapplied")
    store.upsert("text", list(zip(ids, features, metadata, strict=True)))  # memory: not told
    info = replica.save_snapshot()
    assert info is not None and info.seq == replica.applied == store.last_seq()
    engine.close()
    store.close()
    again = _engine(bundle, SqliteStore(tmp_path / "db"), snapshots)
    assert again.replicas["text"].loaded_from == "snapshot"
    assert again.count("text") == 33
    hits = again.search("image", np.ones((1, 16), np.float32), 100)[0]
    assert set(ids) <= {h.id for h in hits}
