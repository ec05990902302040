"""Reference forms of the kNN marginal similarity, written as docs/method.md states them.

Only tests and benchmarks use these: the service and the evaluator score through
app.retrieval's profile form, and tests check that form against these.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from app.retrieval import ItemCodes, TrainingPool


def _literal(units: np.ndarray, w_q: np.ndarray, w_g: np.ndarray) -> np.ndarray:
    """W_q H W_g^T with H the full (2N, 2N) matrix h(a, b) of method.md, in float64."""
    units = np.asarray(units, dtype=np.float64)
    n = len(units)
    h = (1.0 + units @ units.T) / 2.0
    rows = np.arange(n)
    h[rows, (rows + n // 2) % n] = 1.0  # image j and text j: the same object
    np.fill_diagonal(h, 1.0)
    return w_q @ h @ w_g.T


def literal_scores(
    train_units: np.ndarray, query_units: np.ndarray, gallery_units: np.ndarray, k: int
) -> np.ndarray:
    """S(q, g) = sum_a sum_b w_q(a) w_g(b) h(a, b), from embeddings, as method.md writes it.

    train_units: the 2N training embeddings (images, then texts). The k nearest training
    items are found here by brute force (ties by position), so this checks the service's
    neighbour search as well as its scoring. O(N^2) memory.
    """

    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    t = unit(train_units)

    def weights(x: np.ndarray) -> np.ndarray:
        z = (1 + unit(x) @ t.T) / 2
        w = np.zeros_like(z)
        for i, row in enumerate(z):
            nearest = np.argsort(-row, kind="stable")[:k]
            w[i, nearest] = row[nearest] / row[nearest].sum()
        return w

    return _literal(t, weights(query_units), weights(gallery_units))


def literal_code_scores(pool: TrainingPool, query: ItemCodes, gallery: ItemCodes) -> np.ndarray:
    """The same formula for items already coded (their neighbours and weights given)."""
    w_q = np.zeros((len(query), pool.size))
    np.put_along_axis(w_q, query.neighbours, query.weights, axis=1)
    w_g = np.zeros((len(gallery), pool.size))
    np.put_along_axis(w_g, gallery.neighbours, gallery.weights, axis=1)
    return _literal(pool.units, w_q, w_g)


def query_sparse_matrix(pool: TrainingPool, query: ItemCodes) -> sp.csr_matrix:
    """s_q for each query as a row of a (Q, 2N) sparse matrix: s_q(a) = w_q(a) (1 - c_obj(a))."""
    n, k = query.neighbours.shape
    values = query.weights * pool.pair_correction[query.neighbours]
    indptr = np.arange(0, n * k + 1, k)
    return sp.csr_matrix((values.ravel(), query.neighbours.ravel(), indptr), shape=(n, pool.size))


def gallery_sparse_matrix(pool: TrainingPool, gallery: ItemCodes) -> sp.csr_matrix:
    """t_g of each gallery item as a column of a (2N, G) matrix: t_g(a) = w_g(partner(a))."""
    g, k = gallery.neighbours.shape
    rows = pool.partner(gallery.neighbours).ravel()
    cols = np.repeat(np.arange(g), k)
    return sp.csr_matrix((gallery.weights.ravel(), (rows, cols)), shape=(pool.size, g))


def dense_plus_sparse_scores(
    pool: TrainingPool, query: ItemCodes, gallery: ItemCodes
) -> np.ndarray:
    """S(q, g) = 1/2 + 1/2 m_q.m_g + s_q.t_g: method.md's exact decomposition, (Q, G)."""
    dense = query.dense.astype(np.float64) @ gallery.dense.astype(np.float64).T
    sparse = (query_sparse_matrix(pool, query) @ gallery_sparse_matrix(pool, gallery)).toarray()
    return 0.5 + 0.5 * dense + sparse
