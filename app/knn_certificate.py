"""The knn certificate: a bound of the score of every item a candidate list left out.

S(q, g) = 1/2 + 1/2 m_q.m_g + s_q.t_g (method.md). The candidate source (app.ann's HNSW
index) bounds m_q.m_g of the items it did not return; this module bounds the sparse term
s_q.t_g = sum_a s_q(a) w_g(partner(a)), where w_g sums to 1 and has k non-zeros:
- over the whole gallery, with W(b) the largest w_g(b) any item gives pool item b: the most
  the sum can be is a fractional knapsack, the largest s_q(a) filled first, each up to
  its cap W(partner(a)), until the weights reach 1 (`sparse_term_bound`);
- per cluster c of the gallery (the cosine clusters, app.clusters: items with close
  embeddings have close training neighbours, so a cluster's members use ~3 % of the pool),
  with W_c(b) the largest w_g(b) among its members: sum_b s_q(b) W_c(b) bounds every member
  (`ClusterWeightCaps`). Only the clusters with a member outside the candidates count.
The sparse term of an item far from the query is ~0 (it shares no neighbour with the query's
partners) while the gallery-wide bound charges it ~0.002, as much as the gap between the
10th score and the next candidate. On 1M Wikipedia-like items, with 4,000 candidates, the
gallery-wide knapsack certified 68 % of the answers, the true sparse terms would certify 96 %
(docs/service.md); the per-cluster caps are what gets close to the latter.
"""

from __future__ import annotations

import numpy as np

from app.ann import Candidates
from app.clusters import ClusterIndex
from app.retrieval import TrainingPool


def sparse_term_bound(
    pool: TrainingPool,
    query_neighbours: np.ndarray,
    query_weights: np.ndarray,
    weight_caps: np.ndarray,
) -> float:
    """An upper bound of s_q.t_g over every gallery item g, given `weight_caps[b]` = W(b).

    s_q(a) = w_q(a) (1 - c_obj(a)) meets w_g at b = partner(a). Greedy is optimal for a
    fractional knapsack: the largest s_q(a) take all the weight their caps allow until the
    weights sum to 1.
    """
    sparse = query_weights.astype(np.float64) * pool.pair_correction[query_neighbours]
    order = np.argsort(-sparse, kind="stable")
    caps = weight_caps[pool.partner(query_neighbours[order])].astype(np.float64)
    # Weight given to each s_q(a), largest first: its cap, or what is left of the 1.
    given = np.minimum(caps, np.clip(1.0 - (np.cumsum(caps) - caps), 0.0, None))
    return float(given @ sparse[order])


class ClusterWeightCaps:
    """W_c(b) for each cluster c of a ClusterIndex and pool item b. Never lowered: a removed
    or moved member leaves its cluster's caps as they were, which still bound the rest.
    Callers hold the gallery's lock (read for `sums`/`open_clusters`, write for `add`).

    Stored sparse: a cluster's members share most of their training neighbours, so ~3 % of
    the (pool item, cluster) pairs have a cap at all (as a dense float32 matrix: 31 MB at
    200k items, 70 MB at 1M). The caps are the values of the sorted keys b * clusters + c,
    which is a CSR matrix's layout (row b's caps are one contiguous run) without its indptr,
    so a write can insert a pair by a binary search.
    """

    def __init__(self, clusters: ClusterIndex, pool_size: int) -> None:
        self.clusters = clusters
        self.n_clusters = len(clusters.centroids)
        self.pool_size = pool_size
        self.keys = np.zeros(0, dtype=np.int64)  # sorted, distinct b * n_clusters + c
        self.values = np.zeros(0, dtype=np.float32)  # W_c(b) of each key

    def add(self, rows: np.ndarray, neighbours: np.ndarray, weights: np.ndarray) -> None:
        """Rows already added to the clusters, with their neighbours and weights."""
        clusters = self.clusters.cluster_of[np.asarray(rows, dtype=np.int64)]
        k = neighbours.shape[1]
        keys = np.asarray(neighbours, dtype=np.int64).ravel() * self.n_clusters + np.repeat(
            clusters, k
        )
        if not len(keys):
            return
        order = np.argsort(keys)
        keys = keys[order]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        largest = np.maximum.reduceat(np.asarray(weights, dtype=np.float32).ravel()[order], starts)
        keys = keys[starts]
        at = np.searchsorted(self.keys, keys)
        known = at < len(self.keys)
        known[known] = self.keys[at[known]] == keys[known]
        self.values[at[known]] = np.maximum(self.values[at[known]], largest[known])
        self.keys = np.insert(self.keys, at[~known], keys[~known])
        self.values = np.insert(self.values, at[~known], largest[~known])

    def caps(self, pool_items: np.ndarray, clusters: np.ndarray) -> np.ndarray:
        """W_c(b) for each pair (pool_items[i], clusters[i]) (0 where none is stored)."""
        keys = np.asarray(pool_items, dtype=np.int64) * self.n_clusters + clusters
        if not len(self.keys):
            return np.zeros(keys.shape, dtype=np.float32)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[at] == keys, self.values[at], np.float32(0.0))

    def sums(
        self, pool: TrainingPool, query_neighbours: np.ndarray, query_weights: np.ndarray
    ) -> np.ndarray:
        """sum_a s_q(a) W_c(partner(a)) for every cluster c, float64, rounded up by what the
        served scores' float32 arithmetic can add to a member's sparse term (s_q rounded to
        float32, then k products and sums: 2^-24 of the total each, k 2^-23 covers them)."""
        sparse = query_weights.astype(np.float64) * pool.pair_correction[query_neighbours]
        first = pool.partner(query_neighbours).astype(np.int64) * self.n_clusters
        lo = np.searchsorted(self.keys, first)
        runs = np.searchsorted(self.keys, first + self.n_clusters) - lo
        # The positions of every partner's caps, run after run.
        run_starts = np.repeat(lo - (np.cumsum(runs) - runs), runs)
        at = run_starts + np.arange(int(runs.sum()))
        sums = np.bincount(
            self.keys[at] - np.repeat(first, runs),
            weights=self.values[at] * np.repeat(sparse, runs),
            minlength=self.n_clusters,
        )
        return sums * (1.0 + len(query_neighbours) * 2.0**-23)

    def open_clusters(self, rows: np.ndarray) -> np.ndarray:
        """Whether each cluster has a live member that is not among `rows` (live, distinct)."""
        inside = np.bincount(self.clusters.cluster_of[rows], minlength=self.n_clusters)
        return inside < self.clusters.count

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class KnnCertificate:
    """Whether every item outside a knn candidate list scores below a threshold, for one
    query (app.ann.certified_top_k asks it once per candidate list it tries)."""

    def __init__(
        self,
        pool: TrainingPool,
        query_neighbours: np.ndarray,
        query_weights: np.ndarray,
        weight_caps: np.ndarray,
        cluster_caps: ClusterWeightCaps | None,
    ) -> None:
        self.pool = pool
        self.neighbours = query_neighbours
        self.weights = query_weights
        self.sparse = sparse_term_bound(pool, query_neighbours, query_weights, weight_caps)
        self.cluster_caps = cluster_caps
        self._cluster_sparse: np.ndarray | None = None  # computed when first needed

    def __call__(self, found: Candidates, threshold: float) -> bool:
        dense = 0.5 + 0.5 * found.outside_dot
        if dense + self.sparse < threshold:  # the cheap gallery-wide bound is enough
            return True
        if self.cluster_caps is None:
            return False
        if self._cluster_sparse is None:
            sums = self.cluster_caps.sums(self.pool, self.neighbours, self.weights)
            self._cluster_sparse = np.minimum(sums, self.sparse)
        left_out = self.cluster_caps.open_clusters(found.rows)
        if not left_out.any():
            return True  # every live item is a candidate, scored exactly
        return dense + float(self._cluster_sparse[left_out].max()) < threshold
