"""One modality's gallery in memory: rows, slot reuse, the metadata index, its lock.

A gallery item is kept as its kNN code over the training pool (k neighbours and weights;
app.retrieval's "pool profile" form), its cosine embedding in compact form (app.projection)
and, for large galleries, its dense m_g in an HNSW index (app.ann) and its cluster in the
cosine inverted file (app.clusters). The math is app.retrieval's; this
module owns the arrays, their growth, and an exact partial top-k over them that the single
process and each shard of a cluster call alike (so a shard is a Gallery holding a slice).

Concurrency: `lock` is a readers-writer lock. Searches hold it shared (numpy and hnswlib
release the GIL, so they run in parallel); a change holds it exclusively. hnswlib never
sees an add during a query.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np

from app.ann import AnnIndex, AnnParams, Candidates, certified_top_k
from app.clusters import ClusterIndex, kmeans_sample
from app.knn_certificate import ClusterWeightCaps, KnnCertificate
from app.metadata_index import MetadataIndex
from app.projection import ROUNDING_SLACK, Projection, contenders
from app.retrieval import (
    ItemCodes,
    TrainingPool,
    cosine_scores,
    gallery_weight_matrix,
    pool_id_dtype,
    profile_scores,
    top_k_by_id,
)
from app.store.base import Derived

log = logging.getLogger("cdpae.gallery")

Similarity = Literal["knn", "cosine"]
SearchMode = Literal["auto", "exact", "approximate"]
# A gallery's per-row arrays (grown together, saved by app.snapshot).
ARRAYS = ("neighbours", "weights", "projected", "residual", "features", "alive")
# An exact scan scores this many (query, item) pairs at a time at most: a batch of 256
# queries over 200k items would otherwise hold several (Q, G) matrices at once (scores, and
# for cosine the bounds, slacks and contender mask: ~0.7 GB there, ~3.3 GB at 1M). 2^24
# cells are 64 MiB per float32 matrix: above glibc's 32 MiB ceiling for its adaptive mmap
# threshold, so each is mmapped and given back when freed (at 2^23, 32 MiB, they came from
# the heap once the threshold had risen, and 200 MB stayed in its free lists at 200k items).
# A query's scores do not depend on its batch.
SCAN_CELLS = 1 << 24


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


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    metadata_json: str


def merge_hits(parts: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
    """The top k of several partial top-ks (one per shard), in the order one gallery gives:
    best score first, equal scores by id (app.retrieval.top_k_by_id)."""
    return sorted((hit for part in parts for hit in part), key=lambda h: (-h.score, h.id))[:k]


@dataclass(frozen=True)
class QueryBatch:
    """What a gallery needs of a batch of queries: their unit embeddings (cosine) and, for
    knn, their codes and profiles over the training pool (computed once, by the caller)."""

    units: np.ndarray  # (Q, C)
    codes: ItemCodes | None = None  # knn only
    profile: np.ndarray | None = None  # (Q, 2N), knn only

    def __len__(self) -> int:
        return len(self.units)

    def part(self, start: int, stop: int) -> QueryBatch:
        """Queries start..stop-1, as a batch of their own."""
        pick = slice(start, stop)
        codes = None if self.codes is None else self.codes.part(pick)
        profile = None if self.profile is None else self.profile[pick]
        return QueryBatch(self.units[pick], codes, profile)


def _cosine_certifies(found: Candidates, threshold: float) -> bool:
    """The cosine index bounds the score (the cosine) of what it left out itself."""
    return found.outside_dot < threshold


class Gallery:
    """One modality's gallery in memory. Callers hold `lock` (read or write) around use.

    Rows are slots in growable arrays; a deleted row is marked dead and reused by a
    later insert, so row numbers (also the ANN labels) stay stable.
    """

    def __init__(
        self,
        modality: str,
        pool: TrainingPool,
        k: int,
        embed: Callable[[np.ndarray], np.ndarray],
        feature_dim: int,
        capacity: int = 1024,
    ) -> None:
        """`embed`: raw features -> unit embeddings, the bundle's own (app.bundle.Bundle.embed),
        which cosine scoring recomputes for the few items it rescores (app.projection)."""
        self.modality = modality
        self.pool = pool
        self.k = k
        self.embed = embed
        self.projection = Projection.of(pool)
        self.lock = RWLock()
        self.n_rows = 0  # rows in use, dead or alive: [0, n_rows)
        # The k training neighbours of each item: int32, which the exact scan's CSR product
        # takes as it is, until the gallery is large enough for ANN indexes
        # (compact_neighbour_ids).
        self.neighbours = np.zeros((capacity, k), dtype=np.int32)
        self.weights = np.zeros((capacity, k), dtype=np.float32)
        # Cosine items kept compactly (app.projection): P u_g, |u_g - P u_g|, raw features.
        self.projected = np.zeros((capacity, self.projection.width(pool.dim)), dtype=np.float32)
        self.residual = np.zeros(capacity, dtype=np.float32)
        self.features = np.zeros((capacity, feature_dim), dtype=np.float32)
        self.alive = np.zeros(capacity, dtype=bool)
        self.ids: list[str | None] = [None] * capacity
        # canonical JSON, or None where the metadata index spells it back (metadata_json)
        self.metadata: list[str | None] = [None] * capacity
        self.row_of: dict[str, int] = {}
        self.free: list[int] = []
        self.metadata_index = MetadataIndex(capacity)  # the exact-match filter
        # W(b): the largest w_g(b) ever stored for each pool item b, which bounds the sparse
        # term of the knn certificate (app.knn_certificate). Never lowered by a removal: a
        # larger cap is still a bound. Per cosine cluster as well, once there are clusters.
        self.weight_caps = np.zeros(pool.size, dtype=np.float32)
        self.cluster_caps: ClusterWeightCaps | None = None
        self.ann: AnnIndex | None = None  # knn: over the m_g
        self.cosine_clusters: ClusterIndex | None = None  # cosine: over `projected`
        # While indexes are built in the background: the rows changed since the build began.
        self._changed_during_build: set[int] | None = None

    def __len__(self) -> int:
        return len(self.row_of)

    @property
    def capacity(self) -> int:
        return self.alive.shape[0]

    def nbytes(self) -> int:
        arrays = sum(getattr(self, name).nbytes for name in ARRAYS)
        indexes = 0 if self.ann is None else self.ann.size_bytes()
        if self.cosine_clusters is not None:
            indexes += self.cosine_clusters.nbytes()
        if self.cluster_caps is not None:
            indexes += self.cluster_caps.nbytes()
        return arrays + indexes

    # --- changes (under the write lock) ------------------------------------------------------

    def reserve(self, capacity: int) -> None:
        if capacity > self.capacity:
            self._grow(capacity, exact=True)

    def _grow(self, needed: int, exact: bool = False) -> None:
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        if exact:
            capacity = needed
        for name in ARRAYS:
            old = getattr(self, name)
            new = np.zeros((capacity, *old.shape[1:]), dtype=old.dtype)
            new[: self.n_rows] = old[: self.n_rows]
            setattr(self, name, new)
        extra = capacity - len(self.ids)
        self.ids.extend([None] * extra)
        self.metadata.extend([None] * extra)
        self.metadata_index.grow(capacity)

    def put(
        self,
        ids: Sequence[str],
        features: np.ndarray,
        derived: Derived,
        metadata_json: Sequence[str],
    ) -> None:
        """Insert or replace items, given their raw features, kNN codes and unit embeddings."""
        rows = np.empty(len(ids), dtype=np.int64)
        for i, item_id in enumerate(ids):
            row = self.row_of.get(item_id)
            if row is not None:
                self.metadata_index.remove(row)
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
            spelled_back = self.metadata_index.add(row, metadata_json[i])
            self.metadata[row] = None if spelled_back else metadata_json[i]
        self.neighbours[rows] = derived.neighbours
        self.weights[rows] = derived.weights
        projected, residual = self.projection.project(derived.units)
        self.projected[rows] = projected
        self.residual[rows] = residual
        self.features[rows] = features
        self.alive[rows] = True
        np.maximum.at(self.weight_caps, derived.neighbours.ravel(), derived.weights.ravel())
        if self.ann is not None:
            self.ann.put(rows, self.dense_codes(rows))
        if self.cosine_clusters is not None:
            self.cosine_clusters.add(rows, projected, residual)
        if self.cluster_caps is not None:
            self.cluster_caps.add(rows, derived.neighbours, derived.weights)
        if self._changed_during_build is not None:
            self._changed_during_build.update(rows.tolist())

    def derive_weight_caps(self) -> None:
        """W(b) of the live rows, for a gallery whose arrays were filled without `put`."""
        self.weight_caps[:] = 0.0
        live = np.flatnonzero(self.alive[: self.n_rows])
        for start in range(0, len(live), 65536):
            rows = live[start : start + 65536]
            np.maximum.at(
                self.weight_caps, self.neighbours[rows].ravel(), self.weights[rows].ravel()
            )

    def install_cosine_clusters(self, clusters: ClusterIndex) -> None:
        """Clusters holding every live row (built or read from a snapshot), with the knn
        certificate's per-cluster weight caps derived from them (~1 s at 200k items)."""
        caps = ClusterWeightCaps(clusters, self.pool.size)
        live = np.flatnonzero(self.alive[: self.n_rows])
        for start in range(0, len(live), 65536):
            rows = live[start : start + 65536]
            caps.add(rows, self.neighbours[rows], self.weights[rows])
        self.cosine_clusters, self.cluster_caps = clusters, caps

    def remove(self, item_id: str) -> bool:
        row = self.row_of.pop(item_id, None)
        if row is None:
            return False
        self.metadata_index.remove(row)
        self.alive[row] = False
        self.ids[row] = None
        self.metadata[row] = None
        self.free.append(row)
        if self.ann is not None:
            self.ann.remove(row)
        if self.cosine_clusters is not None:
            self.cosine_clusters.remove(row)
        if self._changed_during_build is not None:
            self._changed_during_build.add(row)
        return True

    def compact_neighbour_ids(self) -> None:
        """Keep the neighbour ids in the narrowest type the pool allows (uint16 for pools of
        up to 65,536 items: 200 B less per item at k = 100), under the write lock the caller
        holds. Done when the ANN indexes are installed: a gallery that large is searched
        approximately, and its exact scans (filters, mode=exact) then pay for converting the
        ids for scipy's CSR product (+45 ms at 1M items, ~65 %); a small one, scanned
        exactly on every query, keeps int32 and pays nothing."""
        compact = pool_id_dtype(self.pool.size)
        if self.neighbours.dtype != compact:
            self.neighbours = self.neighbours.astype(compact)

    def build_ann(self, params: AnnParams) -> None:
        """Index every live row's m_g (knn) and cluster its projection (cosine), under the
        write lock the caller holds; logs progress (minutes at 1M items)."""
        self.compact_neighbour_ids()
        self.ann = self._build_knn_index(params)
        self.build_cosine_clusters(params)

    def build_cosine_clusters(self, params: AnnParams) -> None:
        """The cosine clusters of every live row (seconds at 1M items), under the write lock
        the caller holds."""
        clusters = self._fit_clusters(params)
        live = np.flatnonzero(self.alive[: self.n_rows])
        for start in range(0, len(live), 65536):
            rows = live[start : start + 65536]
            clusters.add(rows, self.projected[rows], self.residual[rows])
        clusters.sort_members()
        self.install_cosine_clusters(clusters)

    def _fit_clusters(self, params: AnnParams) -> ClusterIndex:
        """The cosine clusters' centroids, fitted on a sample of the live rows (copied under
        the lock the caller holds: read or write); no rows added yet."""
        started = time.perf_counter()
        sample, n_clusters = kmeans_sample(np.flatnonzero(self.alive[: self.n_rows]))
        fitted = ClusterIndex.fit(
            self.projection,
            self.projected[sample],
            n_clusters,
            max(self.capacity, 16),
            params.cosine_probes,
        )
        log.info(
            "%s gallery: %d cosine clusters fitted on %d items in %.1f s",
            self.modality,
            len(fitted.centroids),
            len(sample),
            time.perf_counter() - started,
        )
        return fitted

    def build_ann_in_background(
        self, params: AnnParams, on_built: Callable[[], None] | None = None
    ) -> None:
        """The same indexes built WITHOUT holding the lock across the build (call it from a
        thread of its own; the caller does not hold the lock): searches and writes go on,
        exact, meanwhile. Rows are copied a chunk at a time under the read lock; rows that
        change after their chunk was copied are re-applied when the indexes are installed."""
        started = time.perf_counter()
        with self.lock.write():
            if self._changed_during_build is None:  # else start_background_ann marked it
                self._changed_during_build = set()
            capacity = max(self.capacity, 16)
        knn = AnnIndex(self.pool.dim, capacity, params, self.pool.principal_basis(params.dim))
        with self.lock.read():  # k-means runs on a copy of a sample of the projections
            cosine = self._fit_clusters(params)
        caps = ClusterWeightCaps(cosine, self.pool.size)
        threads = max(1, min(4, os.cpu_count() or 1))
        start = 0
        while True:
            with self.lock.read():
                end = min(start + 16384, self.n_rows)
                rows = start + np.flatnonzero(self.alive[start:end])
                dense = self.dense_codes(rows)
                projected = self.projected[rows].copy()
                residual = self.residual[rows].copy()
                neighbours = self.neighbours[rows].copy()
                weights = self.weights[rows].copy()
            if start >= end:
                break
            knn.put(rows, dense, num_threads=threads)
            cosine.add(rows, projected, residual)
            caps.add(rows, neighbours, weights)
            start = end
        with self.lock.write():
            changed = np.array(sorted(self._changed_during_build or ()), dtype=np.int64)
            self._changed_during_build = None
            alive = changed[self.alive[changed]] if len(changed) else changed
            for row in changed[~self.alive[changed]].tolist() if len(changed) else []:
                knn.remove(row)
                cosine.remove(row)
            if len(alive):
                knn.put(alive, self.dense_codes(alive))
                cosine.add(alive, self.projected[alive], self.residual[alive])
                caps.add(alive, self.neighbours[alive], self.weights[alive])
            cosine.sort_members()
            self.compact_neighbour_ids()
            self.ann, self.cosine_clusters, self.cluster_caps = knn, cosine, caps
        log.info(
            "%s gallery: ANN indexes of %d items built in the background in %.1f s "
            "(%d rows changed meanwhile)",
            self.modality,
            len(self),
            time.perf_counter() - started,
            len(changed),
        )
        if on_built is not None:
            on_built()

    def start_background_ann(
        self, params: AnnParams, on_built: Callable[[], None] | None = None
    ) -> threading.Thread:
        """build_ann_in_background in a thread of its own, marked as under way before this
        returns: a search that comes right after sees `building_ann` and takes the exact path
        instead of building the indexes itself, synchronously, under the write lock."""
        with self.lock.write():
            if self._changed_during_build is None:
                self._changed_during_build = set()
        thread = threading.Thread(
            target=self.build_ann_in_background,
            args=(params, on_built),
            name=f"ann-{self.modality}",
            daemon=True,
        )
        thread.start()
        return thread

    @property
    def building_ann(self) -> bool:
        return self._changed_during_build is not None

    def _build_knn_index(self, params: AnnParams) -> AnnIndex:
        """The HNSW index of every live row's m_g, logging its progress."""
        started = time.perf_counter()
        basis = self.pool.principal_basis(params.dim)
        index = AnnIndex(self.pool.dim, max(self.capacity, 16), params, basis)
        live = np.flatnonzero(self.alive[: self.n_rows])
        threads = max(1, min(4, os.cpu_count() or 1))
        for start in range(0, len(live), 16384):
            rows = live[start : start + 16384]
            index.put(rows, self.dense_codes(rows), num_threads=threads)
            log.info(
                "%s gallery: knn ANN index %d / %d items",
                self.modality,
                start + len(rows),
                len(live),
            )
        log.info(
            "%s gallery: knn ANN index of %d items built in %.1f s",
            self.modality,
            len(live),
            time.perf_counter() - started,
        )
        return index

    # --- reads (under the read lock) ---------------------------------------------------------

    def metadata_json(self, row: int) -> str:
        """A live row's metadata as canonical JSON: kept as given, or spelled back from the
        metadata index (app.metadata_index)."""
        kept = self.metadata[row]
        return self.metadata_index.spelling(row) if kept is None else kept

    def rows_matching(self, flt: dict[str, object]) -> np.ndarray:
        """Live rows whose metadata equals every key=value of the filter, ascending."""
        return self.metadata_index.rows_matching(flt, self.n_rows)

    def dense_codes(self, rows: np.ndarray) -> np.ndarray:
        """m_g of the given rows, recomputed from their codes (m_g = sum_b w_g(b) u_b)."""
        weights = gallery_weight_matrix(self.pool, self.neighbours[rows], self.weights[rows])
        return np.asarray(weights @ self.pool.units, dtype=np.float32)

    def scores(
        self,
        queries: QueryBatch,
        similarity: Similarity,
        rows: np.ndarray | None = None,
        k: int | None = None,
    ) -> np.ndarray:
        """(Q, rows) exact scores; rows None: every slot [0, n_rows), dead ones at -inf.
        Cosine with k: only the items that can be in a query's top k are sure to be scored
        (app.projection); the others may be -inf."""
        return np.vstack(list(self.score_parts(queries, similarity, rows, k)))

    def score_parts(
        self,
        queries: QueryBatch,
        similarity: Similarity,
        rows: np.ndarray | None = None,
        k: int | None = None,
    ) -> Iterator[np.ndarray]:
        """`scores`, a few queries at a time (SCAN_CELLS), in the queries' order."""
        picked = slice(0, self.n_rows) if rows is None else rows
        n = self.n_rows if rows is None else len(rows)
        step = max(1, SCAN_CELLS // max(n, 1))
        dead = None
        if rows is None and len(self) < self.n_rows:
            dead = ~self.alive[: self.n_rows]
        if similarity == "cosine":
            for start in range(0, len(queries), step):
                units = queries.units[start : start + step]
                yield self._cosine_scores(units, picked, dead, k)
            return
        assert queries.profile is not None, "knn scores need the query profiles"
        weights = gallery_weight_matrix(self.pool, self.neighbours[picked], self.weights[picked])
        for start in range(0, len(queries), step):
            scores = profile_scores(queries.profile[start : start + step], weights)
            if dead is not None:
                scores[:, dead] = -np.inf
            yield scores

    def _cosine_scores(
        self,
        query_units: np.ndarray,
        picked: slice | np.ndarray,
        dead: np.ndarray | None,
        k: int | None,
    ) -> np.ndarray:
        """Cosine scores from the compact form: the projections bound every item, and the
        items that can be in a query's top k are re-embedded and scored exactly."""
        projected = self.projected[picked]
        n = len(projected)
        if k is None or k >= n:
            keep = np.ones((len(query_units), n), dtype=bool)
        else:
            q_projected, q_residual = self.projection.project(query_units)
            approx = cosine_scores(q_projected, projected)
            slack = q_residual[:, None] * self.residual[picked][None, :] + ROUNDING_SLACK
            if dead is not None:
                approx[:, dead] = -np.inf
            keep = contenders(approx, slack, k)
        if dead is not None:
            keep[:, dead] = False
        columns = np.flatnonzero(keep.any(axis=0))
        scores = np.full((len(query_units), n), -np.inf, dtype=np.float32)
        if len(columns):
            # Every score computed is exact, whichever query's contender it was.
            # Under a filter, column j is gallery row picked[j]; without one, row j.
            rows = columns if isinstance(picked, slice) else picked[columns]
            units = self.embed(self.features[rows])
            scores[:, columns] = cosine_scores(query_units, units)
        return scores

    def search_exact(
        self,
        queries: QueryBatch,
        k: int,
        similarity: Similarity,
        flt: dict[str, object] | None = None,
    ) -> list[list[Hit]]:
        """The exact top k of the live rows (matching `flt`) for each query, ties by id."""
        rows = self.rows_matching(flt) if flt else None
        if rows is not None and not len(rows):
            return [[] for _ in range(len(queries))]
        k = min(k, len(self) if rows is None else len(rows))
        if k <= 0:
            return [[] for _ in range(len(queries))]
        # Column j of the scores is row j of the gallery, or rows[j] under a filter.
        ids = self.ids if rows is None else [self.ids[r] for r in rows.tolist()]
        results = []
        for scores in self.score_parts(queries, similarity, rows, k):
            for row_scores in scores:
                best = top_k_by_id(row_scores, ids, k)
                picked = best if rows is None else rows[best]
                results.append(self.hits(picked, row_scores[best]))
        return results

    def search_approximate(
        self, queries: QueryBatch, k: int, similarity: Similarity = "knn"
    ) -> tuple[list[list[Hit]], list[str]]:
        """The top k of each query through the ANN index of `similarity`
        (app.ann.certified_top_k), and the path each answer took: approximate (certified),
        uncertified, or exact (the index could not fill its candidate list)."""
        index = self.ann if similarity == "knn" else self.cosine_clusters
        assert index is not None, f"no {similarity} ANN index: build_ann first"
        k = min(k, len(self))
        if k <= 0:
            return [[] for _ in range(len(queries))], ["exact"] * len(queries)
        if similarity == "knn" and queries.codes is not None:
            # the batch's m_q in one product (256 queries: 26 ms, one by one 34); parts slice it
            _ = queries.codes.dense
        results: list[list[Hit]] = []
        paths: list[str] = []
        for i in range(len(queries)):
            one = queries.part(i, i + 1)
            if similarity == "knn":
                assert one.codes is not None
                query = one.codes.dense[0]
                certifies: Callable[[Candidates, float], bool] = KnnCertificate(
                    self.pool,
                    one.codes.neighbours[0],
                    one.codes.weights[0],
                    self.weight_caps,
                    self.cluster_caps,
                )
            else:
                query, certifies = one.units[0], _cosine_certifies
            found = certified_top_k(
                index,
                query,
                certifies,
                partial(self._rescore, one, similarity, k),
                self.ids,
                k,
                len(self),
            )
            if found is None:
                results.extend(self.search_exact(one, k, similarity))
                paths.append("exact")
            else:
                results.append(self.hits(found.rows, found.scores))
                paths.append(found.path)
        return results, paths

    def _rescore(
        self, one: QueryBatch, similarity: Similarity, k: int, rows: np.ndarray
    ) -> np.ndarray:
        return self.scores(one, similarity, rows, k)[0]

    def hits(self, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
        return [
            Hit(self.ids[r] or "", float(s), self.metadata_json(r))
            for r, s in zip(rows.tolist(), scores.tolist(), strict=True)
        ]
