"""The retrieval math against simple full-matrix versions written here."""

import numpy as np
import pytest

from app.retrieval import (
    TrainingPool,
    average_precision,
    gallery_sparse_matrix,
    item_codes,
    literal_marginal_scores,
    marginal_scores,
    mean_average_precision,
    top_k,
    unit_rows,
)


def _literal_loops(train: np.ndarray, queries: np.ndarray, gallery: np.ndarray, k: int):
    """method.md's formula as written, with Python loops and no shortcuts."""
    n2 = train.shape[0]
    n = n2 // 2

    def z(x, y):
        return (1 + x @ y / (np.linalg.norm(x) * np.linalg.norm(y))) / 2

    def neighbourhood(x):
        sims = np.array([z(x, e) for e in train])
        nearest = np.argsort(-sims, kind="stable")[:k]
        return nearest, sims[nearest] / sims[nearest].sum()

    def h(a, b):
        if a == b or abs(a - b) == n:
            return 1.0
        return z(train[a], train[b])

    out = np.zeros((len(queries), len(gallery)))
    for qi, q in enumerate(queries):
        pq, wq = neighbourhood(q)
        for gi, g in enumerate(gallery):
            pg, wg = neighbourhood(g)
            out[qi, gi] = sum(
                wq[i] * wg[j] * h(a, b) for i, a in enumerate(pq) for j, b in enumerate(pg)
            )
    return out


@pytest.mark.parametrize("k", [1, 3, 8])
def test_dense_plus_sparse_equals_literal_formula(k):
    rng = np.random.default_rng(k)
    n, c = 12, 5
    # Pairs that are close to each other, like a trained common space.
    img = rng.normal(size=(n, c))
    txt = img + 0.3 * rng.normal(size=(n, c))
    train = np.vstack([img, txt])
    queries = rng.normal(size=(4, c))
    gallery = rng.normal(size=(6, c))

    pool = TrainingPool(unit_rows(train))
    q_codes = item_codes(pool, *pool.exact_neighbours(unit_rows(queries), k))
    g_codes = item_codes(pool, *pool.exact_neighbours(unit_rows(gallery), k))
    served = marginal_scores(pool, q_codes, g_codes.dense, gallery_sparse_matrix(pool, g_codes))

    expected = _literal_loops(train, queries, gallery, k)
    np.testing.assert_allclose(served, expected, atol=2e-6)
    np.testing.assert_allclose(literal_marginal_scores(pool, q_codes, g_codes), expected, atol=2e-6)
    assert (np.argsort(-served, axis=1) == np.argsort(-expected, axis=1)).all()


def test_query_that_is_a_training_item_gets_pair_bonus():
    # With k=1 a query equal to training image j and a gallery item equal to
    # training text j are "the same object": S must be exactly 1.
    rng = np.random.default_rng(0)
    train = rng.normal(size=(10, 4))
    pool = TrainingPool(unit_rows(train))
    q = item_codes(pool, *pool.exact_neighbours(pool.units[[2]], 1))
    g = item_codes(pool, *pool.exact_neighbours(pool.units[[7]], 1))
    s = marginal_scores(pool, q, g.dense, gallery_sparse_matrix(pool, g))
    assert s[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_map_known_answer():
    # One query of label 0; ranking puts relevant items at ranks 1, 3 and 4 of 5.
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    gallery_labels = np.array([0, 1, 0, 0, 1])
    ap_all = (1 / 1 + 2 / 3 + 3 / 4) / 3
    assert average_precision(scores, np.array([0]), gallery_labels, r=None)[0] == pytest.approx(
        ap_all
    )
    # Top 2 holds one relevant item at rank 1: AP@2 = 1.
    assert average_precision(scores, np.array([0]), gallery_labels, r=2)[0] == pytest.approx(1.0)
    # A query with no relevant item in the top R scores 0.
    assert average_precision(scores, np.array([2]), gallery_labels, r=3)[0] == 0.0
    two = np.vstack([scores, scores[:, ::-1]])
    expected = (ap_all + (1 / 2 + 2 / 3 + 3 / 5) / 3) / 2
    assert mean_average_precision(two, np.array([0, 0]), gallery_labels, r=None) == pytest.approx(
        expected
    )


def test_top_k_orders_best_first():
    scores = np.array([[0.1, 0.9, 0.5, 0.7]])
    assert top_k(scores, 2).tolist() == [[1, 3]]
    assert top_k(scores, 10).tolist() == [[1, 3, 2, 0]]


def test_pool_rejects_odd_size():
    with pytest.raises(ValueError, match="2N"):
        TrainingPool(np.zeros((3, 2), dtype=np.float32))
