"""Cosine's approximate path: an inverted file over the gallery's own projections.

The gallery already keeps every cosine item as P u_g, its projection onto the pool's top
principal directions, and |r_g| = |u_g - P u_g| (app.projection). This index adds no second
copy of them (an HNSW index did: ~0.66 KB per item): only k-means centroids of the P u_g,
and per item the cluster it belongs to (4 bytes). Per cluster c it keeps the radius
rad_c = max |P u_g - centroid_c| and the largest residual res_c of its members, so for every
member g (Cauchy-Schwarz twice):
    u_q.u_g = Pu_q.Pu_g + r_q.r_g <= Pu_q.centroid_c + |Pu_q| rad_c + |r_q| res_c.
A query visits the clusters with the highest such bound first, until `probes` clusters'
worth of items are in hand; they are rescored exactly (app.gallery), and the bound of the
best cluster not visited bounds every item left out: below the k-th exact score, the
answer is certified.

Why not HNSW: on 1M Wikipedia-like texts (bench_service's synthetic gallery, tight clusters
of near-copies) HNSW's cosine recall@10 was 0.978 at 24.7 ms p50; a prototype of this
index reached 0.993 scanning 64 clusters of 4,096 (docs/service.md).

Changes: an added (or replaced) row is assigned to its nearest centroid and lands in
`pending`, which every query scans in full, until there are enough of them to re-sort the
members by cluster. A removed row drops out of its cluster's count; its stale entry in the
sorted members is skipped by the gallery's `alive` check. Radii only grow, so they stay
bounds. Callers hold the gallery's lock: read for queries, write for changes.
"""

from __future__ import annotations

import numpy as np

from app.ann import Candidates
from app.projection import ROUNDING_SLACK, Projection

# Clusters per sqrt(items) at build: 4,000 clusters of 250 items at 1M. In the prototype at
# 1M, 1,024 clusters needed twice the scanned items of 4,096 for the same recall.
CLUSTERS_PER_SQRT_ITEM = 4
KMEANS_ITERATIONS = 8
# k-means runs on a sample of this many items per cluster (the assignment covers them all).
KMEANS_SAMPLE_PER_CLUSTER = 32
# Pending rows are folded into the sorted members when they reach this share of the items.
PENDING_SHARE = 1 / 32


def cluster_count(items: int) -> int:
    return int(max(16, round(CLUSTERS_PER_SQRT_ITEM * np.sqrt(max(items, 1)))))


def kmeans_sample(live_rows: np.ndarray, seed: int = 0) -> tuple[np.ndarray, int]:
    """(the rows k-means is fitted on, ascending; the number of clusters) for a gallery."""
    n_clusters = cluster_count(len(live_rows))
    size = min(len(live_rows), KMEANS_SAMPLE_PER_CLUSTER * n_clusters)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(live_rows, size, replace=False)), n_clusters


def _nearest(points: np.ndarray, centroids: np.ndarray, half_norms2: np.ndarray) -> np.ndarray:
    """Each point's nearest centroid (Euclidean): argmax of x.c - |c|^2 / 2, in chunks."""
    out = np.empty(len(points), dtype=np.int32)
    for start in range(0, len(points), 32768):
        dots = points[start : start + 32768] @ centroids.T
        dots -= half_norms2
        out[start : start + 32768] = np.argmax(dots, axis=1)
    return out


class ClusterIndex:
    """k-means clusters of a gallery's projected cosine items; label = gallery row."""

    def __init__(
        self, projection: Projection, centroids: np.ndarray, capacity: int, probes: int
    ) -> None:
        self.projection = projection
        self.probes = probes
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        n_clusters = len(self.centroids)
        self._half_norms2 = 0.5 * np.einsum("cd,cd->c", self.centroids, self.centroids)
        self.radius = np.zeros(n_clusters, dtype=np.float32)
        self.max_residual = np.zeros(n_clusters, dtype=np.float32)
        self.count = np.zeros(n_clusters, dtype=np.int64)  # live members
        self.cluster_of = np.full(max(capacity, 16), -1, dtype=np.int32)
        self.members = np.empty(0, dtype=np.int32)  # rows sorted by cluster at the last sort
        self.offsets = np.zeros(n_clusters + 1, dtype=np.int64)
        self.pending: set[int] = set()

    @classmethod
    def fit(
        cls,
        projection: Projection,
        sample: np.ndarray,
        n_clusters: int,
        capacity: int,
        probes: int,
        seed: int = 0,
    ) -> ClusterIndex:
        """An empty index whose centroids are k-means of `sample` (projected items); add the
        gallery's rows to it, then `sort_members`."""
        n_clusters = min(n_clusters, max(len(sample), 1))
        rng = np.random.default_rng(seed)
        centroids = np.array(sample[rng.choice(len(sample), n_clusters, replace=False)])
        for _ in range(KMEANS_ITERATIONS):
            half = 0.5 * np.einsum("cd,cd->c", centroids, centroids)
            nearest = _nearest(sample, centroids, half)
            sums = np.zeros(centroids.shape, dtype=np.float64)
            np.add.at(sums, nearest, sample)
            sizes = np.bincount(nearest, minlength=n_clusters)
            filled = sizes > 0  # an empty cluster keeps its centroid
            centroids[filled] = (sums[filled] / sizes[filled, None]).astype(np.float32)
        return cls(projection, centroids, capacity, probes)

    @classmethod
    def restore(
        cls,
        projection: Projection,
        centroids: np.ndarray,
        radius: np.ndarray,
        max_residual: np.ndarray,
        cluster_of: np.ndarray,
        capacity: int,
        probes: int,
    ) -> ClusterIndex:
        """The index `state` saved (app.snapshot): its members are re-sorted from cluster_of."""
        index = cls(projection, centroids, max(capacity, len(cluster_of)), probes)
        index.radius[:] = radius
        index.max_residual[:] = max_residual
        index.cluster_of[: len(cluster_of)] = cluster_of
        assigned = cluster_of[cluster_of >= 0]
        index.count[:] = np.bincount(assigned, minlength=len(index.centroids))
        index.sort_members()
        return index

    def state(self, n_rows: int) -> dict[str, np.ndarray]:
        """What `restore` needs, for rows [0, n_rows)."""
        return {
            "centroids": self.centroids,
            "radius": self.radius,
            "max_residual": self.max_residual,
            "cluster_of": self.cluster_of[:n_rows],
        }

    # --- changes (under the gallery's write lock) -----------------------------------------

    def add(self, rows: np.ndarray, projected: np.ndarray, residual: np.ndarray) -> None:
        """Add or replace rows, given their projections and residual norms."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        needed = int(rows.max()) + 1
        if needed > len(self.cluster_of):
            grown = np.full(max(needed, 2 * len(self.cluster_of)), -1, dtype=np.int32)
            grown[: len(self.cluster_of)] = self.cluster_of
            self.cluster_of = grown
        self._unassign(rows)
        projected = np.asarray(projected, dtype=np.float32)
        nearest = _nearest(projected, self.centroids, self._half_norms2)
        distance = np.linalg.norm(projected - self.centroids[nearest], axis=1)
        np.maximum.at(self.radius, nearest, distance.astype(np.float32))
        np.maximum.at(self.max_residual, nearest, np.asarray(residual, dtype=np.float32))
        np.add.at(self.count, nearest, 1)
        self.cluster_of[rows] = nearest
        self.pending.update(rows.tolist())
        if len(self.pending) > max(1024, PENDING_SHARE * int(self.count.sum())):
            self.sort_members()

    def remove(self, row: int) -> None:
        self._unassign(np.array([row], dtype=np.int64))
        self.pending.discard(row)

    def _unassign(self, rows: np.ndarray) -> None:
        rows = rows[rows < len(self.cluster_of)]
        old = self.cluster_of[rows]
        np.subtract.at(self.count, old[old >= 0], 1)
        self.cluster_of[rows] = -1

    def sort_members(self) -> None:
        """Members sorted by cluster, pending rows included (O(n log n): amortised by
        PENDING_SHARE)."""
        assigned = np.flatnonzero(self.cluster_of >= 0)
        clusters = self.cluster_of[assigned]
        order = np.argsort(clusters, kind="stable")
        self.members = assigned[order].astype(np.int32)
        self.offsets = np.searchsorted(clusters[order], np.arange(len(self.centroids) + 1))
        self.pending = set()

    def nbytes(self) -> int:
        return (
            self.centroids.nbytes
            + self.radius.nbytes
            + self.max_residual.nbytes
            + self.count.nbytes
            + self.cluster_of.nbytes
            + self.members.nbytes
            + self.offsets.nbytes
        )

    # --- reads (under the gallery's read lock) --------------------------------------------

    def candidates(self, query_unit: np.ndarray, size: int) -> Candidates:
        """Rows of the clusters with the highest bound until `size` items are in hand, every
        pending row, and the bound of the best cluster left out."""
        projected, residual = self.projection.project(query_unit[None, :])
        query = projected[0]
        bound = (
            self.centroids @ query
            + float(np.linalg.norm(query)) * self.radius
            + float(residual[0]) * self.max_residual
            + ROUNDING_SLACK
        )
        bound[self.count == 0] = -np.inf  # an empty cluster bounds nothing
        visit = np.argsort(-bound, kind="stable")
        covered = np.cumsum(self.count[visit])
        taken = min(int(np.searchsorted(covered, size)) + 1, len(visit))
        picked = visit[:taken]
        parts = [self.members[self.offsets[c] : self.offsets[c + 1]] for c in picked.tolist()]
        if self.pending:
            parts.append(np.fromiter(self.pending, dtype=np.int32, count=len(self.pending)))
        rows = np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)
        # Ascending: the caller gathers these rows' projections, ~20% faster in order. unique:
        # a pending row may also sit in a cluster it was sorted into before.
        rows = np.unique(rows) if self.pending else np.sort(rows)
        # A stale entry (a row removed, or moved to another cluster, since the last sort).
        rows = rows[self.cluster_of[rows] >= 0].astype(np.int64)
        outside = float(bound[visit[taken]]) if taken < len(visit) else -np.inf
        return Candidates(rows, outside)

    def search_sizes(self, n_live: int, k: int) -> tuple[int, int]:
        """One pass over `probes` clusters' worth of items: widening would double the cost
        of most queries at 1M for a certificate, not for recall (docs/service.md)."""
        size = min(max(2 * k, self.probes * n_live // len(self.centroids)), n_live)
        return size, size
