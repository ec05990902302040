"""The search engine: embeds queries, keeps each modality's gallery in memory, ranks it.

A gallery item is kept as its kNN code over the training pool (k neighbours and
weights; app.retrieval "pool profile" form), its unit embedding (for cosine)
and, for large galleries, its dense m_g in an HNSW index (app.ann). The math is
app.retrieval's; this module only owns the arrays, their growth, and locking.

Concurrency: each gallery has a readers-writer lock. Searches hold it shared
(numpy and hnswlib release the GIL, so they run in parallel); a write holds it
exclusively only for the in-memory update, after the store committed. A write
that has been acknowledged is therefore visible to every search that starts
after it, and hnswlib never sees an add during a query.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from app.ann import AnnIndex, AnnParams, pool_basis
from app.bundle import MODALITIES, Bundle, Modality
from app.errors import ApiError
from app.gallery_store import GalleryStore, StoredItem
from app.retrieval import (
    ItemCodes,
    TrainingPool,
    gallery_weight_matrix,
    profile_scores,
    profile_scores_rows,
    query_profile,
    top_k,
)

log = logging.getLogger("cdpae.engine")

_EMBED_CHUNK = 4096
# The approximate path's first candidate list is at least gallery size / this (4,000 at 1M):
# recall@10 on 1M Wikipedia-like items needs it (docs/service.md).
_ITEMS_PER_CANDIDATE = 250


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True)


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    metadata_json: str


class Gallery:
    """One modality's gallery in memory. Callers hold `lock` (read or write) around use.

    Rows are slots in growable arrays; a deleted row is marked dead and reused by a
    later insert, so row numbers (also the ANN labels) stay stable.
    """

    def __init__(
        self, modality: Modality, pool: TrainingPool, k: int, capacity: int = 1024
    ) -> None:
        self.modality = modality
        self.pool = pool
        self.k = k
        self.lock = RWLock()
        self.n_rows = 0  # rows in use, dead or alive: [0, n_rows)
        self.neighbours = np.zeros((capacity, k), dtype=np.int32)
        self.weights = np.zeros((capacity, k), dtype=np.float32)
        self.units = np.zeros((capacity, pool.dim), dtype=np.float32)
        self.alive = np.zeros(capacity, dtype=bool)
        self.ids: list[str | None] = [None] * capacity
        self.metadata: list[str | None] = [None] * capacity  # canonical JSON
        self.row_of: dict[str, int] = {}
        self.free: list[int] = []
        # metadata key -> canonical value -> rows: the exact-match filter
        self.by_value: dict[str, dict[str, set[int]]] = {}
        self.max_weight = 0.0  # largest w_g(b) ever stored: bounds the sparse term (app.ann)
        self.ann: AnnIndex | None = None

    def __len__(self) -> int:
        return len(self.row_of)

    @property
    def capacity(self) -> int:
        return self.alive.shape[0]

    def nbytes(self) -> int:
        arrays = self.neighbours.nbytes + self.weights.nbytes + self.units.nbytes
        return arrays + self.alive.nbytes + (self.ann.size_bytes() if self.ann else 0)

    def reserve(self, capacity: int) -> None:
        if capacity > self.capacity:
            self._grow(capacity, exact=True)

    def _grow(self, needed: int, exact: bool = False) -> None:
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        if exact:
            capacity = needed
        for name in ("neighbours", "weights", "units", "alive"):
            old = getattr(self, name)
            new = np.zeros((capacity, *old.shape[1:]), dtype=old.dtype)
            new[: self.n_rows] = old[: self.n_rows]
            setattr(self, name, new)
        extra = capacity - len(self.ids)
        self.ids.extend([None] * extra)
        self.metadata.extend([None] * extra)

    def _index_metadata(self, row: int, metadata_json: str, add: bool) -> None:
        for key, value in json.loads(metadata_json).items():
            if isinstance(value, dict | list):
                continue  # only scalar values can be filtered on
            rows = self.by_value.setdefault(key, {}).setdefault(_canonical(value), set())
            if add:
                rows.add(row)
            else:
                rows.discard(row)

    def put(
        self,
        ids: Sequence[str],
        codes: ItemCodes,
        units: np.ndarray,
        metadata_json: Sequence[str],
    ) -> None:
        """Insert or replace items (under the write lock)."""
        rows = np.empty(len(ids), dtype=np.int64)
        for i, item_id in enumerate(ids):
            row = self.row_of.get(item_id)
            if row is not None:
                self._index_metadata(row, self.metadata[row] or "{}", add=False)
            elif self.free:
                row = self.free.pop()
            else:
                if self.n_rows == self.capacity:
                    self._grow(self.n_rows + 1)
                row = self.n_rows
                self.n_rows += 1
            rows[i] = row
            self.row_of[item_id] = row
            self.ids[row] = item_id
            self.metadata[row] = metadata_json[i]
            self._index_metadata(row, metadata_json[i], add=True)
        self.neighbours[rows] = codes.neighbours
        self.weights[rows] = codes.weights
        self.units[rows] = units
        self.alive[rows] = True
        if len(ids):
            self.max_weight = max(self.max_weight, float(codes.weights.max()))
        if self.ann is not None:
            self.ann.put(rows, codes.dense)

    def remove(self, item_id: str) -> bool:
        row = self.row_of.pop(item_id, None)
        if row is None:
            return False
        self._index_metadata(row, self.metadata[row] or "{}", add=False)
        self.alive[row] = False
        self.ids[row] = None
        self.metadata[row] = None
        self.free.append(row)
        if self.ann is not None:
            self.ann.remove(row)
        return True

    def rows_matching(self, flt: dict[str, object]) -> np.ndarray:
        """Live rows whose metadata equals every key=value of the filter, ascending."""
        matched: set[int] | None = None
        for key, value in flt.items():
            rows = self.by_value.get(key, {}).get(_canonical(value), set())
            matched = set(rows) if matched is None else matched & rows
            if not matched:
                return np.empty(0, dtype=np.int64)
        return np.array(sorted(matched or ()), dtype=np.int64)

    def dense_codes(self, rows: np.ndarray) -> np.ndarray:
        """m_g of the given rows, recomputed from their codes (m_g = sum_b w_g(b) u_b)."""
        weights = gallery_weight_matrix(self.pool, self.neighbours[rows], self.weights[rows])
        return np.asarray(weights @ self.pool.units, dtype=np.float32)

    def build_ann(self, params: AnnParams) -> None:
        """Index every live row's m_g (under the write lock); seconds per 10k items."""
        started = time.perf_counter()
        basis = pool_basis(self.pool.units, params.dim)
        ann = AnnIndex(self.pool.dim, max(self.capacity, 16), params, basis)
        live = np.flatnonzero(self.alive[: self.n_rows])
        threads = max(1, min(4, os.cpu_count() or 1))
        for start in range(0, len(live), 16384):
            rows = live[start : start + 16384]
            ann.put(rows, self.dense_codes(rows), num_threads=threads)
            log.info(
                "%s gallery: ANN index %d / %d items", self.modality, start + len(rows), len(live)
            )
        self.ann = ann
        log.info(
            "%s gallery: ANN index of %d items built in %.1f s",
            self.modality,
            len(live),
            time.perf_counter() - started,
        )


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
        self.search_paths: Counter[str] = Counter()  # exact / approximate / uncertified

    @property
    def name(self) -> str:
        return self.bundle.path.name

    def input_dim(self, modality: Modality) -> int:
        return self.bundle.manifest.input_dims[modality]

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
            if self.ann_min_items and len(gallery) >= self.ann_min_items:
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

    # --- validation ---------------------------------------------------------------------------

    def _embed(self, modality: Modality, features: np.ndarray, field: str) -> np.ndarray:
        """Unit embeddings, or a 422 naming the row: finite but huge inputs overflow inside the
        encoder (its z-scoring) to NaN, which ranks nothing and would poison later searches."""
        units = self.bundle.embed(modality, features)
        bad = ~np.isfinite(units).all(axis=1)
        if bad.any():
            raise ApiError(
                422,
                "invalid_request",
                f"the {modality} encoder overflows on these values (too large in magnitude)",
                field=field.format(i=int(np.argmax(bad))),
            )
        return units

    def check_vectors(
        self, modality: Modality, rows: Sequence[Sequence[float]], field: str
    ) -> np.ndarray:
        """Raw feature rows -> (n, d) float32, or a 422 naming the bad row."""
        dim = self.input_dim(modality)
        for i, row in enumerate(rows):
            if len(row) != dim:
                raise ApiError(
                    422,
                    "invalid_request",
                    f"expected {dim} floats ({modality} features of bundle '{self.name}'), "
                    f"got {len(row)}",
                    field=field.format(i=i),
                )
        with np.errstate(over="ignore"):
            matrix = np.asarray(rows, dtype=np.float32).reshape(len(rows), dim)
        # Finite as JSON floats can still overflow float32 (1e39 -> inf).
        bad = ~np.isfinite(matrix)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise ApiError(
                422,
                "invalid_request",
                f"value {rows[i][j]!r} is not finite as float32",
                field=field.format(i=i) + f"[{j}]",
            )
        return matrix

    # --- search -------------------------------------------------------------------------------

    def search(
        self,
        query_modality: Modality,
        features: np.ndarray,
        k: int,
        similarity: str = "knn",
        flt: dict[str, object] | None = None,
        mode: str = "auto",
    ) -> list[list[Hit]]:
        """Top k of the other modality's gallery for each query row, best first."""
        gallery = self.galleries["text" if query_modality == "image" else "image"]
        units = self._embed(query_modality, features, "vectors[{i}]")
        codes = profile = None
        if similarity == "knn":
            codes = self.bundle.codes(units)
            profile = query_profile(self.bundle.pool, codes)
        approximate = (
            similarity == "knn"
            and not flt
            and (
                mode == "approximate"
                or (mode == "auto" and self.ann_min_items and len(gallery) >= self.ann_min_items)
            )
        )
        if approximate and gallery.ann is None:
            with gallery.lock.write():
                if gallery.ann is None:
                    gallery.build_ann(self.ann_params)
        with gallery.lock.read():
            n_live = len(gallery)
            kk = min(k, n_live)
            if kk == 0:
                return [[] for _ in range(len(features))]
            if approximate and gallery.ann is not None and codes is not None:
                return [
                    self._approximate_one(gallery, codes, profile, i, kk)
                    for i in range(len(features))
                ]
            self.search_paths["exact"] += len(features)
            rows = gallery.rows_matching(flt) if flt else None
            if rows is not None and not len(rows):
                return [[] for _ in range(len(features))]
            scores = self._exact_scores(gallery, similarity, units, profile, rows)
            top = top_k(scores, min(kk, scores.shape[1]))
            picked = top if rows is None else rows[top]
            return [
                self._hits(gallery, picked[i], np.take_along_axis(scores[i], top[i], axis=0))
                for i in range(len(features))
            ]

    def _exact_scores(
        self,
        gallery: Gallery,
        similarity: str,
        units: np.ndarray,
        profile: np.ndarray | None,
        rows: np.ndarray | None,
    ) -> np.ndarray:
        """(Q, rows) scores; rows None: every slot [0, n_rows), dead ones at -inf."""
        n = gallery.n_rows
        if similarity == "cosine":
            matrix = gallery.units[:n] if rows is None else gallery.units[rows]
            scores = units @ matrix.T
        else:
            assert profile is not None
            if rows is None:
                weights = gallery_weight_matrix(
                    gallery.pool, gallery.neighbours[:n], gallery.weights[:n]
                )
            else:
                weights = gallery_weight_matrix(
                    gallery.pool, gallery.neighbours[rows], gallery.weights[rows]
                )
            scores = profile_scores(profile, weights)
        if rows is None and len(gallery) < n:
            scores[:, ~gallery.alive[:n]] = -np.inf
        return scores

    def _approximate_one(
        self, gallery: Gallery, codes: ItemCodes, profile: np.ndarray, i: int, kk: int
    ) -> list[Hit]:
        """ANN candidates by m_q.m_g, rescored exactly, widened until certified (app.ann)."""
        ann = gallery.ann
        assert ann is not None
        n_live = len(gallery)
        sparse = codes.weights[i] * self.bundle.pool.pair_correction[codes.neighbours[i]]
        bound = min(float(sparse.max()), float(sparse.sum()) * gallery.max_weight)
        # Larger galleries hold more near-equal items per neighbourhood: start wider.
        size = min(
            max(ann.params.candidates, 2 * kk, n_live // _ITEMS_PER_CANDIDATE),
            n_live,
            ann.params.max_candidates,
        )
        while True:
            try:
                rows, dots, slack = ann.query(codes.dense[i], size)
            except RuntimeError:
                # hnswlib can't fill `size` results (many deleted rows): score exactly.
                self.search_paths["exact"] += 1
                scores = self._exact_scores(gallery, "knn", np.empty(0), profile[i : i + 1], None)
                top = top_k(scores, kk)[0]
                return self._hits(gallery, top, scores[0, top])
            exact = profile_scores_rows(profile[i], gallery.neighbours[rows], gallery.weights[rows])
            order = top_k(exact, kk)[0]
            threshold = exact[order[-1]]
            certified = 0.5 + 0.5 * (float(dots.min()) + slack) + bound < threshold
            if certified or size >= n_live or size >= ann.params.max_candidates:
                path = "approximate" if certified or size >= n_live else "uncertified"
                self.search_paths[path] += 1
                return self._hits(gallery, rows[order], exact[order])
            size = min(2 * size, n_live, ann.params.max_candidates)

    @staticmethod
    def _hits(gallery: Gallery, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
        return [
            Hit(gallery.ids[r] or "", float(s), gallery.metadata[r] or "{}")
            for r, s in zip(rows.tolist(), scores.tolist(), strict=True)
        ]

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
                if (
                    gallery.ann is None
                    and self.ann_min_items
                    and len(gallery) >= self.ann_min_items
                ):
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
