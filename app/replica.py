"""One copy of one modality's gallery in memory, kept equal to the store.

A `GalleryReplica` is what the single process holds twice (image and text) and what each
shard of a cluster holds once (its slice: `shard=(index, count)`): the in-memory
app.gallery.Gallery, where it stands in the store's change log, how to load it, how to catch
up, and which search path (exact, or the certified approximate one) answers a query. One
implementation for both, so a shard ranks its slice exactly as the single process ranks the
whole gallery.

Loading reads the replica's snapshot (app.snapshot: its arrays and ANN indexes as local
files) when there is one of this store and bundle, and catches up from where it was taken.
Otherwise it loads from the store, using the derived data stored for this bundle (neighbour
codes, weights, unit embeddings); items without it (first start, a new bundle) are embedded
once and it is written back. A snapshot is written at shutdown (Engine.close) and when the
background ANN build has finished.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from app import snapshot
from app.ann import AnnParams
from app.bundle import Bundle, Modality
from app.gallery import Gallery, Hit, QueryBatch, SearchMode, Similarity
from app.memory import release_freed_memory
from app.metadata_index import canonical_json
from app.snapshot import SnapshotInfo, SnapshotMismatch, SnapshotOrigin
from app.store import Derived, GalleryStore, StoredItem
from app.store.base import Shard
from app.validation import finite_embeddings

log = logging.getLogger("cdpae.engine")

_LOAD_CHUNK = 4096


def derive(
    bundle: Bundle, modality: Modality, features: np.ndarray, num_threads: int = 1
) -> Derived:
    """What a gallery keeps of an item: its unit embedding, k neighbours and weights.

    Not m_g (the codes' dense part, a quarter of the embedding time, computed only when
    asked for): the ANN index derives it when it is built. Raises InvalidInput naming the row
    whose embedding is not finite.
    """
    units = finite_embeddings(bundle.embed(modality, features), modality, "items[{i}].vector")
    codes = bundle.codes(units, num_threads=num_threads)
    return Derived(codes.neighbours.astype(np.int32), codes.weights, units)


class GalleryReplica:
    """One modality's gallery (or one shard's slice of it) in memory, following the store."""

    def __init__(
        self,
        bundle: Bundle,
        store: GalleryStore,
        modality: Modality,
        bundle_key: str,
        *,
        ann_params: AnnParams | None = None,
        ann_min_items: int = 50_000,
        shard: Shard | None = None,
        snapshot_dir: Path | None = None,
    ) -> None:
        self.bundle = bundle
        self.store = store
        self.modality = modality
        self.bundle_key = bundle_key
        self.ann_params = ann_params or AnnParams()
        self.ann_min_items = ann_min_items
        self.shard = shard
        self.gallery = self._new_gallery()
        # One writer at a time, so the store and memory see this copy's writes in one order.
        self.writer = threading.Lock()
        self.applied = 0  # the change log position this copy has applied up to
        self.snapshot_dir = snapshot_dir  # None: no snapshots
        self.snapshot: SnapshotInfo | None = None  # the last one loaded or written
        self.loaded_from: str | None = None  # "snapshot" or "store", once loaded

    def __len__(self) -> int:
        return len(self.gallery)

    # --- loading and catching up -------------------------------------------------------------

    def load(self) -> int:
        """Fill the gallery from its snapshot or from the store; how many items had to be
        embedded."""
        if self.snapshot_dir is not None and self._load_snapshot():
            self.loaded_from = "snapshot"
            release_freed_memory()
            return 0
        self.loaded_from = "store"
        started = time.perf_counter()
        embedded = 0
        # Read before the items: what commits during the load is caught up afterwards.
        self.applied = self.store.last_seq()
        expected = self._expected_items()
        with self.gallery.lock.write():  # room for everything at once: no doubling copies
            self.gallery.reserve(expected + 1024)
            if self._large_enough_for_ann(expected):
                # It will be indexed: 16-bit ids from the start, not an int32 copy to convert
                # (which a first start at 200k kept ~50 MB more of).
                self.gallery.compact_neighbour_ids()
        for chunk in self.store.iter_items(
            self.modality, chunk=_LOAD_CHUNK, bundle_key=self.bundle_key, shard=self.shard
        ):
            embedded += self._apply_items(chunk, write_back=True)
            if len(self.gallery) % (16 * _LOAD_CHUNK) < _LOAD_CHUNK:
                log.info("%s: %d items loaded", self.name, len(self.gallery))
        log.info(
            "%s: %d items in %.1f s (%d embedded, the rest loaded)",
            self.name,
            len(self.gallery),
            time.perf_counter() - started,
            embedded,
        )
        release_freed_memory()  # the decoded rows are garbage now: don't keep their peak
        if self.wants_ann():
            self._start_background_ann()  # the snapshot is written when they are built
        else:
            self._snapshot_quietly()  # so that even a crash-restart need not do this again
        return embedded

    def _start_background_ann(self) -> None:
        # Ready without them: searches take the exact path until they are built. Once built,
        # they are worth keeping: a snapshot saves the next start from building them again.
        self.gallery.start_background_ann(self.ann_params, on_built=self._after_ann_built)

    def _after_ann_built(self) -> None:
        release_freed_memory()  # the row chunks the build copied
        self._snapshot_quietly()

    # --- snapshots ---------------------------------------------------------------------------

    def _new_gallery(self) -> Gallery:
        encoder = self.bundle.encoders[self.modality]
        embed = partial(self.bundle.embed, self.modality)
        return Gallery(self.modality, self.bundle.pool, self.bundle.knn_k, embed, encoder.input_dim)

    @property
    def snapshot_name(self) -> str:
        if self.shard is None:
            return self.modality
        return f"{self.modality}-shard-{self.shard[0]}-of-{self.shard[1]}"

    def _snapshot_origin(self) -> SnapshotOrigin:
        store_id = self.store.get_meta("store_id")
        if store_id is None:
            raise SnapshotMismatch("the store has no store_id")
        return SnapshotOrigin(
            self.snapshot_name, self.bundle_key, store_id, self.bundle.knn_k, self.bundle.pool.dim
        )

    def _load_snapshot(self) -> bool:
        """Load the snapshot and catch up from it; False (and nothing changed) if there is no
        usable one."""
        assert self.snapshot_dir is not None
        started = time.perf_counter()
        try:
            manifest = snapshot.read_manifest(self.snapshot_dir, self._snapshot_origin())
            seq, signature = int(manifest["seq"]), manifest["seq_signature"]
            if seq > self.store.last_seq() or self.store.change_signature(seq) != signature:
                raise SnapshotMismatch(
                    f"change {seq} is not the store's (the store was restored or replaced)"
                )
            gallery = self._new_gallery()
            with gallery.lock.write():
                has_ann = snapshot.load(self.snapshot_dir, manifest, gallery, self.ann_params)
        except SnapshotMismatch as exc:
            log.info("%s: loading from the store, not a snapshot: %s", self.name, exc)
            return False
        except Exception:  # a damaged file: the store is the truth
            log.warning("%s: snapshot unreadable, loading from the store", self.name, exc_info=True)
            return False
        read = time.perf_counter() - started
        self.gallery, self.applied = gallery, seq
        self.snapshot = SnapshotInfo(seq, signature, len(gallery), has_ann, self.snapshot_dir)
        if self.wants_ann():  # before catching up, which would otherwise build them inline
            self._start_background_ann()
        caught_up = self.catch_up()
        log.info(
            "%s: %d items from the snapshot at change %d in %.1f s (ANN indexes %s), "
            "then %d changes caught up in %.1f s",
            self.name,
            manifest["items"],
            seq,
            read,
            "loaded" if has_ann else "not in it",
            caught_up,
            time.perf_counter() - started - read,
        )
        return True

    def save_snapshot(self) -> SnapshotInfo | None:
        """Write this copy's snapshot (None without a snapshot_dir). Writes to memory wait
        meanwhile (seconds at 1M items); searches go on. Nothing is written when the last
        snapshot is already at the current position (with the ANN indexes, if built)."""
        if self.snapshot_dir is None:
            return None
        started = time.perf_counter()
        with self.writer:
            # The snapshot's seq must be what its arrays reflect. The store's last_seq is not
            # that even with a single writer (SQLite): a change committed whose put into
            # memory then failed would be claimed and never caught up after a restart. So
            # catch up (idempotent: re-applies this process's own writes since the last one)
            # and record what has been applied, as with a shared store.
            self._catch_up_locked()
            seq = self.applied
            origin = self._snapshot_origin()
            signature = self.store.change_signature(seq)
            gallery = self.gallery
            with gallery.lock.read():
                with_ann = gallery.ann is not None and not gallery.building_ann
                last = self.snapshot
                if (
                    last is not None
                    and (last.has_ann or not with_ann)
                    and not self._changed_since(last.seq)
                ):
                    return last
                self.snapshot = snapshot.save(
                    self.snapshot_dir,
                    origin,
                    gallery,
                    seq,
                    signature,
                    self.ann_params if with_ann else None,
                )
        log.info(
            "%s: snapshot of %d items at change %d written in %.1f s",
            self.name,
            self.snapshot.items,
            seq,
            time.perf_counter() - started,
        )
        return self.snapshot

    def _changed_since(self, seq: int) -> bool:
        """Whether the store has a change of this copy's slice after `seq` (changes of the
        other modality or of other slices don't make a snapshot stale)."""
        return bool(self.store.changes_since(self.modality, seq, limit=1, shard=self.shard))

    def _snapshot_quietly(self) -> None:
        """save_snapshot from a background thread: a failure is logged, never raised."""
        try:
            self.save_snapshot()
        except Exception:
            log.warning("%s: writing the snapshot failed", self.name, exc_info=True)

    @property
    def name(self) -> str:
        if self.shard is None:
            return f"{self.modality} gallery"
        return f"{self.modality} shard {self.shard[0]}/{self.shard[1]}"

    def _expected_items(self) -> int:
        total = self.store.count(self.modality)
        return total if self.shard is None else total // self.shard[1] + 1

    def _apply_items(self, items: Sequence[StoredItem], write_back: bool) -> int:
        """Put items into memory, embedding those without stored derived data; how many were
        embedded. write_back: store what was computed (the load; catching up leaves it to the
        copy that wrote the item)."""
        k, dim = self.bundle.knn_k, self.bundle.pool.dim
        derived = Derived(
            np.empty((len(items), k), dtype=np.int32),
            np.empty((len(items), k), dtype=np.float32),
            np.empty((len(items), dim), dtype=np.float32),
        )
        stored = [i for i, it in enumerate(items) if it.derived is not None]
        if stored:
            derived.assign(stored, Derived.decode([items[i].derived or b"" for i in stored], k))
        missing = [i for i, it in enumerate(items) if it.derived is None]
        features = np.stack([it.vector for it in items])
        if missing:
            # Bulk work: let hnswlib use every core for the training-pool kNN.
            computed = derive(self.bundle, self.modality, features[missing], os.cpu_count() or 1)
            if write_back:
                self.store.put_derived(
                    self.bundle_key, self.modality, [items[i].id for i in missing], computed
                )
            derived.assign(missing, computed)
        metadata_json = [canonical_json(it.metadata) for it in items]
        # While loading, the ANN indexes are built once at the end (in the background).
        self.put(
            [it.id for it in items], features, derived, metadata_json, build_ann=not write_back
        )
        return len(missing)

    def catch_up(self, target: int = 0) -> int:
        """Apply the store's changes (of this copy's slice) after the last one applied; how
        many were applied. Afterwards the copy reflects every change up to at least `target`,
        a sequence number the caller read after that change committed.

        Under the writer lock, so a local write and a caught-up change never interleave: each
        change is applied as the item's state now (present or gone), which is idempotent and
        converges whatever the order of notifications.
        """
        with self.writer:
            applied = self._catch_up_locked()
            # Sequence numbers are assigned in commit order (app/store/postgres.py), so once
            # nothing of this slice follows `applied`, nothing of it is missing up to `target`
            # either: changes of other slices between the two don't concern this copy.
            self.applied = max(self.applied, target)
        return applied

    def _catch_up_locked(self) -> int:
        applied = 0
        while True:
            changes = self.store.changes_since(
                self.modality, self.applied, bundle_key=self.bundle_key, shard=self.shard
            )
            if not changes:
                return applied
            latest: dict[str, StoredItem | None] = {c.id: c.item for c in changes}
            present = [item for item in latest.values() if item is not None]
            if present:
                self._apply_items(present, write_back=False)
            for item_id, item in latest.items():
                if item is None:
                    self.remove(item_id)
            self.applied = changes[-1].seq
            applied += len(changes)

    # --- changes to memory -------------------------------------------------------------------

    def put(
        self,
        ids: Sequence[str],
        features: np.ndarray,
        derived: Derived,
        metadata_json: Sequence[str],
        build_ann: bool = True,
    ) -> None:
        """Insert or replace items in memory; builds the ANN indexes (synchronously) when the
        gallery has just grown past ann_min_items and build_ann is set."""
        with self.gallery.lock.write():
            self.gallery.put(ids, features, derived, metadata_json)
            if build_ann and self.wants_ann():
                self.gallery.build_ann(self.ann_params)

    def remove(self, item_id: str) -> bool:
        with self.gallery.lock.write():
            return self.gallery.remove(item_id)

    def _large_enough_for_ann(self, items: int) -> bool:
        return bool(self.ann_min_items) and items >= self.ann_min_items

    def wants_ann(self) -> bool:
        gallery = self.gallery
        big = self._large_enough_for_ann(len(gallery))
        return big and gallery.ann is None and not gallery.building_ann

    # --- search ------------------------------------------------------------------------------

    def search(
        self,
        queries: QueryBatch,
        k: int,
        similarity: Similarity,
        flt: dict[str, object] | None = None,
        mode: SearchMode = "auto",
    ) -> tuple[list[list[Hit]], list[str]]:
        """The top k of this copy for each query, best first (ties by id), and the path each
        answer took (exact, approximate, uncertified)."""
        gallery = self.gallery
        # Filters take the exact path over the matching rows (top_k hits whenever that many
        # match).
        approximate = not flt and not self.searches_exactly(mode)
        if approximate and gallery.ann is None and not gallery.building_ann:
            with gallery.lock.write():
                if gallery.ann is None and not gallery.building_ann:
                    gallery.build_ann(self.ann_params)
        with gallery.lock.read():
            if approximate and gallery.ann is not None:
                return gallery.search_approximate(queries, k, similarity)
            return gallery.search_exact(queries, k, similarity, flt), ["exact"] * len(queries)

    def searches_exactly(self, mode: SearchMode) -> bool:
        """Whether a search without a filter takes the exact path: small galleries do unless a
        request asks for the approximate path."""
        if mode != "auto":
            return mode == "exact"
        return not self.ann_min_items or len(self.gallery) < self.ann_min_items

    def stats(self) -> tuple[str, int, int, bool]:
        """(modality, items, bytes of arrays and indexes, ANN being built)."""
        gallery = self.gallery
        return self.modality, len(gallery), gallery.nbytes(), gallery.building_ann
