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

import numpy as np

from app.ann import AnnParams
from app.bundle import MODALITIES, Bundle, Modality
from app.gallery import Gallery, Hit, QueryBatch, SearchMode, Similarity
from app.gallery_store import GalleryStore, StoredItem
from app.retrieval import ItemCodes, query_profile
from app.validation import feature_matrix, finite_embeddings

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
        """Rebuild the in-memory galleries from the store (startup)."""
        for modality in MODALITIES:
            gallery = self.galleries[modality]
            started = time.perf_counter()
            with gallery.lock.write():  # room for everything at once: no doubling copies
                gallery.reserve(self.store.count(modality) + 1024)
            for chunk in self.store.iter_items(modality, chunk=_EMBED_CHUNK):
                self._apply_put(gallery, modality, chunk)
                if len(gallery) % (16 * _EMBED_CHUNK) < _EMBED_CHUNK:
                    log.info("%s gallery: %d items loaded", modality, len(gallery))
            log.info(
                "%s gallery: %d items in %.1f s",
                modality,
                len(gallery),
                time.perf_counter() - started,
            )
            if self._wants_ann(gallery):
                with gallery.lock.write():
                    gallery.build_ann(self.ann_params)

    def _apply_put(self, gallery: Gallery, modality: Modality, items: Sequence[StoredItem]) -> None:
        features = np.stack([it.vector for it in items])
        # Bulk work at startup: let hnswlib use every core for the training-pool kNN.
        units, codes = self._codes(modality, features, num_threads=os.cpu_count() or 1)
        with gallery.lock.write():
            gallery.put(
                [it.id for it in items],
                codes,
                units,
                [json.dumps(it.metadata, sort_keys=True) for it in items],
            )

    def _codes(
        self, modality: Modality, features: np.ndarray, num_threads: int = 1
    ) -> tuple[np.ndarray, ItemCodes]:
        units = self._embed(modality, features, "items[{i}].vector")
        return units, self.bundle.codes(units, num_threads=num_threads)

    def _wants_ann(self, gallery: Gallery) -> bool:
        return (
            gallery.ann is None and bool(self.ann_min_items) and len(gallery) >= self.ann_min_items
        )

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
        if approximate and gallery.ann is None:
            with gallery.lock.write():
                if gallery.ann is None:
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
        """Embed (outside any lock), commit to the store, then update memory. Returns the count."""
        units, codes = self._codes(modality, features)
        gallery = self.galleries[modality]
        metadata_json = [json.dumps(m, sort_keys=True) for m in metadata]
        with self._writers[modality]:
            self.store.upsert(modality, list(zip(ids, features, metadata, strict=True)))
            with gallery.lock.write():
                gallery.put(ids, codes, units, metadata_json)
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
