"""The retrieval math of CDPAE, in numpy.

This is the one implementation of the kNN marginal-probability similarity
(docs/method.md in the design notes, "Exact decomposition"); the evaluator
(`training/`) and the service (`app/`) both import it, so what is evaluated is
what is served. No torch here: the service image carries none.

Notation (method.md):
- the training pool holds 2N unit vectors u_a: rows 0..N-1 are the training
  images, rows N..2N-1 the training texts; row i and row i+N are one pair;
- Z(x, y) = (1 + cos(x, y)) / 2;
- an item x (query or gallery item) is coded by its k nearest training items
  P(x), their weights w_x(a) = Z(x, e_a) / sum_b Z(x, e_b), and the dense mean
  m_x = sum_a w_x(a) u_a;
- S(q, g) = 1/2 + 1/2 m_q.m_g + s_q.t_g, with
  s_q(a) = w_q(a) (1 - c_obj(a)) and t_g(a) = w_g(partner(a)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

# Below this norm a vector is treated as zero instead of being divided by ~0.
_NORM_FLOOR = 1e-12
# Pools of at most this many items keep their Gram matrix (4 (2N)^2 bytes: 76 MB for the
# Wikipedia pool of 4,346, 144 MB at this cap): a query's profile is then a weighted sum of
# its k Gram rows, 0.12 ms instead of 1.17 ms for one pass over the (2N, C) units
# (docs/service.md, "Where a knn query's time goes").
GRAM_MAX_POOL = 6000
# Up to this many items are coded by gathering their neighbours' units, more through a CSR
# product. Both sum each code's k terms in float64 in neighbour order, so they agree bit for
# bit (tests/test_retrieval.py); the product needs the units in float64, which scipy casts
# per call (3.2 ms on the Wikipedia pool) and which a float64 copy kept for it would cost
# 36 MB in every process. Measured crossover: 16 items 1.8 ms gathered, 3.8 ms by the product.
GATHER_MAX_ITEMS = 16


def pool_id_dtype(pool_size: int) -> np.dtype:
    """The narrowest integer type that holds every pool item's index: uint16 while the pool
    has at most 65,536 items (Wikipedia's has 4,346), int32 above. A gallery keeps k of them
    per item (k = 100: 200 B instead of 400, 40 MB at 200k items); they are only indices, so
    every score is the same whatever their type."""
    return np.dtype(np.uint16) if pool_size <= 1 << 16 else np.dtype(np.int32)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32; an all-zero row stays zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, _NORM_FLOOR)).astype(np.float32, copy=False)


def z_from_cosine_distance(distance: np.ndarray) -> np.ndarray:
    """Z = (1 + cos) / 2 from hnswlib's cosine-space distance 1 - cos."""
    return np.clip(1.0 - np.asarray(distance, dtype=np.float32) / 2.0, 0.0, 1.0)


@dataclass(frozen=True)
class TrainingPool:
    """The 2N unit-normalised training embeddings, images first, then texts."""

    units: np.ndarray  # (2N, C) float32, rows of unit norm

    def __post_init__(self) -> None:
        if self.units.ndim != 2 or self.units.shape[0] % 2:
            raise ValueError(
                f"training pool must be a (2N, C) matrix, got shape {self.units.shape}"
            )

    @property
    def n_pairs(self) -> int:
        return self.units.shape[0] // 2

    @property
    def size(self) -> int:
        return self.units.shape[0]

    @property
    def dim(self) -> int:
        return self.units.shape[1]

    def partner(self, index: np.ndarray) -> np.ndarray:
        """The other half of each item's pair (image i <-> text i)."""
        # As intp: a gallery's uint16 ids (pool_id_dtype) would wrap past 65,535 otherwise.
        return (np.asarray(index, dtype=np.intp) + self.n_pairs) % self.size

    @cached_property
    def _principal_directions(self) -> np.ndarray:
        """(C, C) orthonormal principal directions of the units (uncentred), strongest first;
        an SVD of ~1 s on the Wikipedia pool, so computed once per pool."""
        _, _, vt = np.linalg.svd(self.units.astype(np.float64), full_matrices=False)
        return np.ascontiguousarray(vt.T, dtype=np.float32)

    def principal_basis(self, dim: int) -> np.ndarray | None:
        """(C, dim) top principal directions, or None when dim is 0 or not below C."""
        if dim <= 0 or dim >= self.dim:
            return None
        return np.ascontiguousarray(self._principal_directions[:, :dim])

    @cached_property
    def gram(self) -> np.ndarray | None:
        """u_a . u_b for every pair of pool items, (2N, 2N) float32; None above GRAM_MAX_POOL."""
        if self.size > GRAM_MAX_POOL:
            return None
        # On one BLAS thread whatever the process's setting: OpenBLAS's sgemm rounds some
        # entries 1 ulp differently with more threads, and every process that serves or
        # evaluates a bundle (front end, single process, `cdpae evaluate`) must hold the same
        # matrix, or they rank near-ties differently.
        with threadpool_limits(limits=1, user_api="blas"):
            return self.units @ self.units.T

    @cached_property
    def pair_constants(self) -> np.ndarray:
        """c_j = (1 + u_img_j . u_txt_j) / 2 for each training pair j, shape (N,)."""
        n = self.n_pairs
        dots = np.einsum("ij,ij->i", self.units[:n], self.units[n:], dtype=np.float64)
        return ((1.0 + dots) / 2.0).astype(np.float32)

    @cached_property
    def pair_correction(self) -> np.ndarray:
        """1 - c_obj(a) for every pool item a, shape (2N,): what a same-object pair adds."""
        correction = 1.0 - self.pair_constants
        return np.concatenate([correction, correction])

    def exact_neighbours(self, query_units: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force k nearest pool items by Z: (ids, Z), each (n, k), best first."""
        # einsum, not BLAS: OpenBLAS's sgemm rounds a row's dot products differently with the
        # batch's size (1 ulp, seen on this project's machine), so an item embedded alone,
        # at a load or in a shard would get other weights. einsum sums each pair in one order.
        cos = np.einsum("qc,pc->qp", np.asarray(query_units, dtype=np.float32), self.units)
        k = min(k, self.size)
        top = np.argpartition(-cos, k - 1, axis=1)[:, :k]
        top_cos = np.take_along_axis(cos, top, axis=1)
        order = np.argsort(-top_cos, axis=1, kind="stable")
        ids = np.take_along_axis(top, order, axis=1)
        z = (1.0 + np.take_along_axis(top_cos, order, axis=1)) / 2.0
        return ids.astype(np.int64), z.astype(np.float32)


@dataclass(frozen=True, eq=False)
class ItemCodes:
    """What the kNN marginal similarity needs of each item.

    neighbours: (n, k) ids of the k nearest training items P(x)
    weights:    (n, k) w_x over P(x), each row summing to 1
    dense:      (n, C) m_x, the weighted mean of the item's neighbours' unit vectors, computed
                on first use: with the pool's Gram matrix an exact search never needs it, and
                skipping it is 0.1-0.2 ms of a one-query knn search (docs/service.md)
    """

    neighbours: np.ndarray
    weights: np.ndarray
    # What m_x is computed from: the pool and w_x before rounding to float32 (m_x is summed
    # in float64). None in codes made with_dense, whose m_x came computed.
    pool: TrainingPool | None = field(repr=False)
    weights64: np.ndarray | None = field(repr=False)

    @classmethod
    def with_dense(
        cls, neighbours: np.ndarray, weights: np.ndarray, dense: np.ndarray
    ) -> ItemCodes:
        """Codes whose m_x is already computed, with no pool to compute it from."""
        codes = cls(neighbours, weights, None, None)
        codes.__dict__["dense"] = dense  # where cached_property keeps it
        return codes

    def __reduce__(self) -> tuple[object, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        # The cluster's front end pickles query batches to every shard (Ray): they get m_x
        # computed, not the pool it is computed from (93 MB with its Gram matrix).
        return (ItemCodes.with_dense, (self.neighbours, self.weights, self.dense))

    def __len__(self) -> int:
        return self.neighbours.shape[0]

    @cached_property
    def dense(self) -> np.ndarray:
        assert self.pool is not None and self.weights64 is not None  # else made with_dense
        ids, weights = self.neighbours, self.weights64
        n, k = ids.shape
        if n <= GATHER_MAX_ITEMS:
            # (n, k, C) products summed over k, in neighbour order
            dense = (weights[:, :, None] * self.pool.units[ids]).sum(axis=1)
        else:
            # m_x = W_x U as a sparse product: the gather above would materialise an (n, k, C)
            # array (3 GB for 4096 items at k=100, C=1024). scipy casts the units to float64
            # for it, which a batch amortises.
            w_sparse = sp.csr_matrix(
                (weights.ravel(), ids.ravel(), np.arange(0, n * k + 1, k)),
                shape=(n, self.pool.size),
            )
            dense = w_sparse @ self.pool.units
        return dense.astype(np.float32)

    def part(self, rows: slice) -> ItemCodes:
        """The codes of some rows: their m_x sliced from the batch's if that was computed,
        else computed by the part on first use (a row's m_x is the same alone or in any
        batch: tests/test_retrieval.py)."""
        weights64 = None if self.weights64 is None else self.weights64[rows]
        part = ItemCodes(self.neighbours[rows], self.weights[rows], self.pool, weights64)
        if "dense" in self.__dict__:  # computed (always, in codes made with_dense)
            part.__dict__["dense"] = self.dense[rows]
        return part


def neighbour_weights(neighbour_z: np.ndarray) -> np.ndarray:
    """w_x(a) = Z(x, e_a) / sum_b Z(x, e_b) over each row's k neighbours, (n, k) float64."""
    z = np.asarray(neighbour_z, dtype=np.float64)
    # Z is in [0, 1]; a row of zeros only happens for exact antipodes, so keep it finite.
    return z / np.maximum(z.sum(axis=1, keepdims=True), _NORM_FLOOR)


def item_codes(pool: TrainingPool, neighbour_ids: np.ndarray, neighbour_z: np.ndarray) -> ItemCodes:
    """Code items from their k nearest training items and Z similarities to them."""
    weights = neighbour_weights(neighbour_z)
    return ItemCodes(
        neighbours=np.asarray(neighbour_ids, dtype=np.int64),
        weights=weights.astype(np.float32),
        pool=pool,
        weights64=weights,
    )


def cosine_scores(query_units: np.ndarray, gallery_units: np.ndarray) -> np.ndarray:
    """Plain cosine similarity of unit vectors, shape (Q, G), float32.

    einsum without optimisation sums each row in one fixed order, whichever rows come with
    it: a BLAS product's blocking depends on the matrix shape, so a gallery split across
    shards would score its items differently in the last bits and reorder near-ties.
    """
    return np.einsum(
        "qc,gc->qg",
        np.asarray(query_units, dtype=np.float32),
        np.asarray(gallery_units, dtype=np.float32),
        optimize=False,
    )


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores of each row, best first, shape (Q, min(k, G))."""
    scores = np.atleast_2d(scores)
    k = min(k, scores.shape[1])
    if k == scores.shape[1]:
        return np.argsort(-scores, axis=1, kind="stable")
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def average_precision(
    scores: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    r: int | None = 50,
) -> np.ndarray:
    """AP@R of every query (r=None: over the whole ranking), shape (Q,).

    AP@R = sum_{j<=R} rel_j precision@j / sum_{j<=R} rel_j, and 0 when no
    relevant item is in the top R (method.md, "Evaluation").
    """
    depth = scores.shape[1] if r is None else min(r, scores.shape[1])
    ranked = top_k(scores, depth)
    relevant = np.asarray(gallery_labels)[ranked] == np.asarray(query_labels)[:, None]
    hits = np.cumsum(relevant, axis=1)
    precision = hits / np.arange(1, depth + 1)
    n_relevant = relevant.sum(axis=1)
    summed = (precision * relevant).sum(axis=1)
    return np.where(n_relevant > 0, summed / np.maximum(n_relevant, 1), 0.0)


def mean_average_precision(
    scores: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    r: int | None = 50,
) -> float:
    """MAP@R over all queries (r=None: MAP over the full ranking)."""
    return float(average_precision(scores, query_labels, gallery_labels, r).mean())


# --- The same similarity in "pool profile" form, for serving large galleries --------------
#
# Since w_g sums to 1 and m_g = sum_b w_g(b) u_b, both terms of S(q, g) are linear in w_g:
#   m_q.m_g = sum_b w_g(b) (u_b.m_q)      and      s_q.t_g = sum_b w_g(b) s_q(partner(b)),
# so S(q, g) = sum_{b in P(g)} w_g(b) v_q(b) with the query's profile over the pool
#   v_q(b) = 1/2 (1 + u_b.m_q) + s_q(partner(b))   (= sum_a w_q(a) h(a, b), row q of W_q H).
# A gallery item is then its k neighbours and weights only (8k bytes instead of 4C), and
# scoring it costs k multiply-adds. Exact, not an approximation: tests check it against
# method.md's dense + sparse form and the literal formula (tests/support/reference.py).


def query_profile(pool: TrainingPool, query: ItemCodes) -> np.ndarray:
    """v_q over the 2N pool items for each query, shape (Q, 2N), float32.

    u_b.m_q = sum_a w_q(a) u_a.u_b: with the pool's Gram matrix that is k of its rows
    weighted (k x 2N multiply-adds), without it one pass over all units (C x 2N).
    """
    gram = pool.gram
    if gram is None:
        dots = query.dense.astype(np.float32) @ pool.units.T
    else:
        dots = np.empty((len(query), pool.size), dtype=np.float32)
        for i in range(len(query)):
            dots[i] = query.weights[i] @ gram[query.neighbours[i]]
    profile = 0.5 * (1.0 + dots)
    # s_q(a) = w_q(a) (1 - c_obj(a)) lands on b = partner(a); a query's k neighbours are
    # distinct, so are their partners, and a plain fancy-index += is exact.
    rows = np.arange(len(query))[:, None]
    profile[rows, pool.partner(query.neighbours)] += (
        query.weights * pool.pair_correction[query.neighbours]
    )
    return profile.astype(np.float32, copy=False)


def gallery_weight_matrix(
    pool: TrainingPool, neighbours: np.ndarray, weights: np.ndarray
) -> sp.csr_matrix:
    """W_g as a (G, 2N) CSR matrix: row g holds w_g over its k neighbours P(g)."""
    g, k = neighbours.shape
    indptr = np.arange(0, g * k + 1, k, dtype=np.int64)
    return sp.csr_matrix(
        (
            np.ascontiguousarray(weights, dtype=np.float32).ravel(),
            np.ascontiguousarray(neighbours, dtype=np.int32).ravel(),
            indptr,
        ),
        shape=(g, pool.size),
    )


def profile_scores(profile: np.ndarray, gallery_weights: sp.csr_matrix) -> np.ndarray:
    """S(q, g) = W_g v_q for every query x gallery item, shape (Q, G), float32.

    THE scoring kernel of the kNN similarity: the evaluator, the single process (exact and
    approximate paths) and the shards all score through it. A CSR product sums each row's k
    terms in stored order, whatever other rows are in the matrix, so a gallery split into
    slices scores every item bit for bit as the whole gallery does.
    """
    return np.asarray((gallery_weights @ np.atleast_2d(profile).T).T, dtype=np.float32)


def knn_scores(pool: TrainingPool, query: ItemCodes, gallery: ItemCodes) -> np.ndarray:
    """S(q, g) for coded queries against coded gallery items, (Q, G): what `cdpae evaluate`
    ranks by, through the same two steps as the service (profile, then the kernel above)."""
    weights = gallery_weight_matrix(pool, gallery.neighbours, gallery.weights)
    return profile_scores(query_profile(pool, query), weights)


def top_k_by_id(scores: np.ndarray, ids: Sequence[str | None], k: int) -> np.ndarray:
    """Positions of the k best of one row of scores, best first, equal scores by id.

    Breaking ties by id (not by position) makes the order independent of where items sit in
    memory, so one process and any number of shards rank a gallery the same way.
    """
    n = len(scores)
    k = min(k, n)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if k < n:
        threshold = np.partition(scores, n - k)[n - k]
        candidates = np.flatnonzero(scores >= threshold)
    else:
        candidates = np.arange(n)
    # ids[i] is None only for a dead slot, which scores -inf and never ties a live item.
    ranked = sorted(candidates.tolist(), key=lambda i: (-scores[i], ids[i] or ""))
    return np.asarray(ranked[:k], dtype=np.int64)
