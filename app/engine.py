"""The search engine: the bundle, the durable store and the two in-memory galleries.

What is left here is the order of things: loading the galleries from the store, the
store-then-memory write order, and search dispatch (embed the queries once, pick the exact
or the certified approximate path of app.gallery). No HTTP: bad input raises
app.validation.InvalidInput, which app/errors.py maps to 422.

A write commits to the store first and only then updates memory under the gallery's write
lock, so an acknowledged write is visible to every search that starts after it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from app.ann import AnnParams
from app.bundle import MANIFEST, MODALITIES, Bundle, Modality, sha256_of
from app.gallery import Gallery, Hit, QueryBatch, SearchMode, Similarity
from app.retrieval import neighbour_weights, query_profile
from app.store import Derived, GalleryStore, StoredItem
from app.validation import feature_matrix, finite_embeddings

if TYPE_CHECKING:
    from app.store.changes import ChangeFollower

log = logging.getLogger("cdpae.engine")

_EMBED_CHUNK = 4096


class Engine:
    """The bundle, the durable store and the two in-memory galleries."""

    def __init__(
        self,
        bundle: Bundle,
        store: GalleryStore,
        *,
        ann_params: AnnParams | None = None,
        ann_min_items: int = 50_000,
    ) -> None:
        self.bundle = bundle
        self.store = store
        self.ann_params = ann_params or AnnParams()
        self.ann_min_items = ann_min_items
        self.galleries: dict[Modality, Gallery] = {
            m: Gallery(m, bundle.pool, bundle.knn_k) for m in MODALITIES
        }
        # One writer per modality at a time, so the store and memory see writes in one order.
        self._writers = {m: threading.Lock() for m in MODALITIES}
        # The bundle's identity: derived data in the store is keyed by it.
        self.bundle_key = sha256_of(bundle.path / MANIFEST)
        self._applied: dict[Modality, int] = dict.fromkeys(MODALITIES, 0)  # change log position
        self.follower: ChangeFollower | None = None  # following a shared store
        self._paths_lock = threading.Lock()  # searches in several threads count paths
        self._search_paths: Counter[str] = Counter()  # exact / approximate / uncertified

    @property
    def name(self) -> str:
        return self.bundle.path.name

    def input_dim(self, modality: Modality) -> int:
        return self.bundle.manifest.input_dims[modality]

    @property
    def search_paths(self) -> dict[str, int]:
        """Queries answered by each path so far (a copy)."""
        with self._paths_lock:
            return dict(self._search_paths)

    def _count_paths(self, paths: Sequence[str]) -> None:
        with self._paths_lock:
            self._search_paths.update(paths)

    # --- loading ------------------------------------------------------------------------------

    def seed_if_empty(self) -> bool:
        """First start: fill the store from the bundle's default gallery (once, ever)."""
        if self.store.get_meta("seeded") is not None:
            return False
        default = self.bundle.default_gallery()
        items = {
            m: [
                (str(i), default.features[m][n], {"category": str(c)})
                for n, (i, c) in enumerate(zip(default.ids, default.categories, strict=True))
            ]
            for m in MODALITIES
        }
        seeded = self.store.seed(items, marker=f"{self.bundle.manifest.dataset}")
        if seeded:
            log.info("seeded the gallery with %d default items per modality", len(default.ids))
        return seeded

    def load(self) -> None:
        """Rebuild the in-memory galleries from the store (startup), then follow it.

        Items whose derived data for this bundle is stored are loaded as they are; the others
        (first start, a new bundle) are embedded once and their derived data written back.
        """
        embedded_total = 0
        for modality in MODALITIES:
            gallery = self.galleries[modality]
            started = time.perf_counter()
            embedded = 0
            # Read before the items: what commits during the load is caught up afterwards.
            self._applied[modality] = self.store.last_seq()
            with gallery.lock.write():  # room for everything at once: no doubling copies
                gallery.reserve(self.store.count(modality) + 1024)
            for chunk in self.store.iter_items(
                modality, chunk=_EMBED_CHUNK, bundle_key=self.bundle_key
            ):
                embedded += self._apply_items(gallery, modality, chunk, write_back=True)
                if len(gallery) % (16 * _EMBED_CHUNK) < _EMBED_CHUNK:
                    log.info("%s gallery: %d items loaded", modality, len(gallery))
            log.info(
                "%s gallery: %d items in %.1f s (%d embedded, the rest loaded)",
                modality,
                len(gallery),
                time.perf_counter() - started,
                embedded,
            )
            embedded_total += embedded
            if self._wants_ann(gallery):
                # Ready without them: searches take the exact path until they are built.
                threading.Thread(
                    target=gallery.build_ann_in_background,
                    args=(self.ann_params,),
                    name=f"ann-{modality}",
                    daemon=True,
                ).start()
        if embedded_total:
            # Every item now has this bundle's derived data: other bundles' can go.
            self.store.drop_derived_except(self.bundle_key)
        if getattr(self.store, "shared", False):
            self._follow()

    def _apply_items(
        self, gallery: Gallery, modality: Modality, items: Sequence[StoredItem], write_back: bool
    ) -> int:
        """Put items into memory, embedding those without stored derived data; how many were
        embedded. write_back: store what was computed (the load; a follower leaves it to the
        replica that wrote the item)."""
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
        if missing:
            features = np.stack([items[i].vector for i in missing])
            # Bulk work: let hnswlib use every core for the training-pool kNN.
            computed = self._derive(modality, features, num_threads=os.cpu_count() or 1)
            if write_back:
                self.store.put_derived(
                    self.bundle_key, modality, [items[i].id for i in missing], computed
                )
            derived.assign(missing, computed)
        with gallery.lock.write():
            gallery.put(
                [it.id for it in items],
                derived,
                [json.dumps(it.metadata, sort_keys=True) for it in items],
            )
        return len(missing)

    def _derive(self, modality: Modality, features: np.ndarray, num_threads: int = 1) -> Derived:
        units = self._embed(modality, features, "items[{i}].vector")
        # A gallery item needs its neighbours and weights, not m_g (item_codes' dense part,
        # a quarter of the embedding time): the ANN index derives m_g when it is built.
        ids, z = self.bundle.neighbours(units, num_threads=num_threads)
        weights = neighbour_weights(z).astype(np.float32)
        return Derived(ids.astype(np.int32), weights, units)

    # --- following a shared store -------------------------------------------------------------

    def _follow(self) -> None:
        url = getattr(self.store, "url", None)
        if url is None or self.follower is not None:
            return
        # psycopg comes with the `cluster` extra: the SQLite-only service image has none.
        from app.store.changes import ChangeFollower

        self.follower = ChangeFollower(url, self.catch_up)
        self.follower.start()

    @property
    def stale(self) -> str | None:
        """Why the galleries may lag the store (it can't be reached), or None."""
        return None if self.follower is None else self.follower.error

    def catch_up(self) -> int:
        """Apply the store's changes after the last one applied; how many were applied.

        Under each modality's writer lock, so a local write and a caught-up change never
        interleave: each change is applied as the item's state now (present or gone), which
        is idempotent and converges whatever the order of notifications.
        """
        applied = 0
        for modality in MODALITIES:
            gallery = self.galleries[modality]
            with self._writers[modality]:
                while True:
                    changes = self.store.changes_since(
                        modality, self._applied[modality], bundle_key=self.bundle_key
                    )
                    if not changes:
                        break
                    latest: dict[str, StoredItem | None] = {c.id: c.item for c in changes}
                    present = [item for item in latest.values() if item is not None]
                    if present:
                        self._apply_items(gallery, modality, present, write_back=False)
                    gone = [i for i, item in latest.items() if item is None]
                    if gone:
                        with gallery.lock.write():
                            for item_id in gone:
                                gallery.remove(item_id)
                    self._applied[modality] = changes[-1].seq
                    applied += len(changes)
                    if self._wants_ann(gallery):
                        with gallery.lock.write():
                            gallery.build_ann(self.ann_params)
        return applied

    def close(self) -> None:
        if self.follower is not None:
            self.follower.stop()

    def _wants_ann(self, gallery: Gallery) -> bool:
        big = bool(self.ann_min_items) and len(gallery) >= self.ann_min_items
        return big and gallery.ann is None and not gallery.building_ann

    # --- validation ---------------------------------------------------------------------------

    def _embed(self, modality: Modality, features: np.ndarray, field: str) -> np.ndarray:
        return finite_embeddings(self.bundle.embed(modality, features), modality, field)

    def check_vectors(
        self, modality: Modality, rows: Sequence[Sequence[float]], field: str
    ) -> np.ndarray:
        """Raw feature rows -> (n, d) float32, or InvalidInput naming the bad row."""
        what = f"{modality} features of bundle '{self.name}'"
        return feature_matrix(rows, self.input_dim(modality), what, field)

    # --- search -------------------------------------------------------------------------------

    def embed_queries(
        self, query_modality: Modality, features: np.ndarray, similarity: Similarity
    ) -> QueryBatch:
        """Embed once; for knn also the codes and the profile over the training pool."""
        units = self._embed(query_modality, features, "vectors[{i}]")
        if similarity != "knn":
            return QueryBatch(units)
        codes = self.bundle.codes(units)
        return QueryBatch(units, codes, query_profile(self.bundle.pool, codes))

    def search(
        self,
        query_modality: Modality,
        features: np.ndarray,
        k: int,
        similarity: Similarity = "knn",
        flt: dict[str, object] | None = None,
        mode: SearchMode = "auto",
    ) -> list[list[Hit]]:
        """Top k of the other modality's gallery for each query row, best first."""
        gallery = self.galleries["text" if query_modality == "image" else "image"]
        queries = self.embed_queries(query_modality, features, similarity)
        # Filters take the exact path over the matching rows (top_k hits whenever that many
        # match); so do small galleries unless a request asks for the approximate path.
        approximate = not flt and (
            mode == "approximate"
            or (mode == "auto" and bool(self.ann_min_items) and len(gallery) >= self.ann_min_items)
        )
        if approximate and gallery.ann is None and not gallery.building_ann:
            with gallery.lock.write():
                if gallery.ann is None and not gallery.building_ann:
                    gallery.build_ann(self.ann_params)
        with gallery.lock.read():
            if approximate and gallery.ann is not None:
                results, paths = gallery.search_approximate(queries, k, similarity)
                self._count_paths(paths)
                return results
            self._count_paths(["exact"] * len(queries))
            return gallery.search_exact(queries, k, similarity, flt)

    # --- writes -------------------------------------------------------------------------------

    def upsert(
        self, modality: Modality, ids: Sequence[str], features: np.ndarray, metadata: Sequence[dict]
    ) -> int:
        """Embed (outside any lock), commit to the store with the derived data, then update
        memory (read-your-writes on this replica). Returns the count."""
        derived = self._derive(modality, features)
        gallery = self.galleries[modality]
        metadata_json = [json.dumps(m, sort_keys=True) for m in metadata]
        with self._writers[modality]:
            rows = list(zip(ids, features, metadata, strict=True))
            self.store.upsert(modality, rows, derived, self.bundle_key)
            with gallery.lock.write():
                gallery.put(ids, derived, metadata_json)
                if self._wants_ann(gallery):
                    gallery.build_ann(self.ann_params)
                return len(gallery)

    def delete(self, modality: Modality, item_id: str) -> int | None:
        """Delete one item; the new count, or None if it was not there."""
        gallery = self.galleries[modality]
        with self._writers[modality]:
            if not self.store.delete(modality, item_id):
                return None
            with gallery.lock.write():
                gallery.remove(item_id)
                return len(gallery)

    def get(self, modality: Modality, item_id: str) -> StoredItem | None:
        return self.store.get(modality, item_id)

    def count(self, modality: Modality) -> int:
        return len(self.galleries[modality])
