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

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp

# Below this norm a vector is treated as zero instead of being divided by ~0.
_NORM_FLOOR = 1e-12


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
        return (np.asarray(index) + self.n_pairs) % self.size

    @cached_property
    def units64(self) -> np.ndarray:
        """The units in float64, kept once: codes accumulate in float64."""
        return self.units.astype(np.float64)

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
        cos = np.asarray(query_units, dtype=np.float32) @ self.units.T
        k = min(k, self.size)
        top = np.argpartition(-cos, k - 1, axis=1)[:, :k]
        top_cos = np.take_along_axis(cos, top, axis=1)
        order = np.argsort(-top_cos, axis=1, kind="stable")
        ids = np.take_along_axis(top, order, axis=1)
        z = (1.0 + np.take_along_axis(top_cos, order, axis=1)) / 2.0
        return ids.astype(np.int64), z.astype(np.float32)


@dataclass(frozen=True)
class ItemCodes:
    """What the kNN marginal similarity needs of each item.

    dense:      (n, C) m_x, the weighted mean of the item's neighbours' unit vectors
    neighbours: (n, k) ids of the k nearest training items P(x)
    weights:    (n, k) w_x over P(x), each row summing to 1
    """

    dense: np.ndarray
    neighbours: np.ndarray
    weights: np.ndarray

    def __len__(self) -> int:
        return self.dense.shape[0]


def item_codes(pool: TrainingPool, neighbour_ids: np.ndarray, neighbour_z: np.ndarray) -> ItemCodes:
    """Code items from their k nearest training items and Z similarities to them."""
    ids = np.asarray(neighbour_ids, dtype=np.int64)
    z = np.asarray(neighbour_z, dtype=np.float64)
    # Z is in [0, 1]; a row of zeros only happens for exact antipodes, so keep it finite.
    weights = z / np.maximum(z.sum(axis=1, keepdims=True), _NORM_FLOOR)
    # m_x = W_x U as a sparse product: gathering pool.units[ids] first would materialise an
    # (n, k, C) array (3 GB for 4096 items at k=100, C=1024).
    n, k = ids.shape
    w_sparse = sp.csr_matrix(
        (weights.ravel(), ids.ravel(), np.arange(0, n * k + 1, k)), shape=(n, pool.size)
    )
    dense = w_sparse @ pool.units64
    return ItemCodes(
        dense=dense.astype(np.float32),
        neighbours=ids,
        weights=weights.astype(np.float32),
    )


def query_sparse_matrix(pool: TrainingPool, query: ItemCodes) -> sp.csr_matrix:
    """s_q for each query as a row of a (Q, 2N) sparse matrix: s_q(a) = w_q(a) (1 - c_obj(a))."""
    n, k = query.neighbours.shape
    values = query.weights * pool.pair_correction[query.neighbours]
    indptr = np.arange(0, n * k + 1, k)
    return sp.csr_matrix((values.ravel(), query.neighbours.ravel(), indptr), shape=(n, pool.size))


def gallery_sparse_matrix(pool: TrainingPool, gallery: ItemCodes) -> sp.csr_matrix:
    """t_g for each gallery item as a column of a (2N, G) sparse matrix.

    t_g(a) = w_g(partner(a)): gallery item g, having b among its neighbours with
    weight w, is reached by a query through b's pair partner. Stored row-major by
    training item, so it doubles as the inverted list training item -> gallery items.
    """
    g, k = gallery.neighbours.shape
    rows = pool.partner(gallery.neighbours).ravel()
    cols = np.repeat(np.arange(g), k)
    return sp.csr_matrix((gallery.weights.ravel(), (rows, cols)), shape=(pool.size, g))


def marginal_scores(
    pool: TrainingPool,
    query: ItemCodes,
    gallery_dense: np.ndarray,
    gallery_sparse: sp.csr_matrix,
) -> np.ndarray:
    """Exact S(q, g) in method.md's dense + sparse form, shape (Q, G), float32.

    The service and the evaluator score with the equivalent pool-profile form
    below (query_profile / gallery_weight_matrix / profile_scores), which stores
    8k bytes per gallery item instead of 4C; this form is kept as the documented
    decomposition the tests check both against.

    gallery_dense is the (G, C) stack of m_g; gallery_sparse is
    `gallery_sparse_matrix` of the same items (columns in the same order).
    """
    dense = query.dense @ np.asarray(gallery_dense, dtype=np.float32).T
    sparse = (query_sparse_matrix(pool, query) @ gallery_sparse).toarray()
    return (0.5 + 0.5 * dense + sparse).astype(np.float32)


def cosine_scores(query_units: np.ndarray, gallery_units: np.ndarray) -> np.ndarray:
    """Plain cosine similarity of unit vectors, shape (Q, G)."""
    return np.asarray(query_units, dtype=np.float32) @ np.asarray(gallery_units, dtype=np.float32).T


def literal_marginal_scores(pool: TrainingPool, query: ItemCodes, gallery: ItemCodes) -> np.ndarray:
    """S(q, g) computed the literal dense way of method.md: W_q H W_g^T.

    H is the full (2N, 2N) matrix h(a, b), so this costs O(N^2) memory. It exists
    only as the reference the served path is checked and benchmarked against.
    """
    n = pool.size
    w_q = np.zeros((len(query), n))
    np.put_along_axis(w_q, query.neighbours, query.weights, axis=1)
    w_g = np.zeros((len(gallery), n))
    np.put_along_axis(w_g, gallery.neighbours, gallery.weights, axis=1)
    units = pool.units.astype(np.float64)
    h = (1.0 + units @ units.T) / 2.0
    rows = np.arange(n)
    h[rows, pool.partner(rows)] = 1.0  # the image and text of one pair: the same object
    np.fill_diagonal(h, 1.0)
    return w_q @ h @ w_g.T


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
# scoring it costs k multiply-adds. Exact, not an approximation: the test checks it against
# marginal_scores and the literal formula.


def query_profile(pool: TrainingPool, query: ItemCodes) -> np.ndarray:
    """v_q over the 2N pool items for each query, shape (Q, 2N), float32."""
    profile = 0.5 * (1.0 + query.dense.astype(np.float32) @ pool.units.T)
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
    """S(q, g) = W_g v_q for every query x gallery item, shape (Q, G), float32."""
    return np.asarray((gallery_weights @ profile.T).T, dtype=np.float32)


def profile_scores_rows(
    profile: np.ndarray, neighbours: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """S(q, g) of ONE query profile (2N,) for a few items given as (n, k) rows: shape (n,)."""
    return np.einsum("nk,nk->n", weights, profile[neighbours], dtype=np.float32)
