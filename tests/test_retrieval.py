"""The retrieval math against simple full-matrix versions written here."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from app.retrieval import (
    TrainingPool,
    average_precision,
    cosine_scores,
    item_codes,
    knn_scores,
    mean_average_precision,
    pool_id_dtype,
    top_k,
    top_k_by_id,
    unit_rows,
)
from tests.support.reference import dense_plus_sparse_scores, literal_code_scores, literal_scores


@pytest.mark.parametrize("k", [1, 3, 8])
def test_served_and_dense_plus_sparse_forms_equal_the_literal_formula(k):
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
    served = knn_scores(pool, q_codes, g_codes)

    expected = literal_scores(train, queries, gallery, k)
    np.testing.assert_allclose(served, expected, atol=2e-6)
    np.testing.assert_allclose(
        dense_plus_sparse_scores(pool, q_codes, g_codes), expected, atol=2e-6
    )
    np.testing.assert_allclose(literal_code_scores(pool, q_codes, g_codes), expected, atol=2e-6)
    assert (np.argsort(-served, axis=1) == np.argsort(-expected, axis=1)).all()


def test_query_that_is_a_training_item_gets_pair_bonus():
    # With k=1 a query equal to training image j and a gallery item equal to
    # training text j are "the same object": S must be exactly 1.
    rng = np.random.default_rng(0)
    train = rng.normal(size=(10, 4))
    pool = TrainingPool(unit_rows(train))
    q = item_codes(pool, *pool.exact_neighbours(pool.units[[2]], 1))
    g = item_codes(pool, *pool.exact_neighbours(pool.units[[7]], 1))
    assert knn_scores(pool, q, g)[0, 0] == pytest.approx(1.0, abs=1e-6)
    assert dense_plus_sparse_scores(pool, q, g)[0, 0] == pytest.approx(1.0, abs=1e-6)


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


def test_pool_ids_fit_their_type_and_partners_do_not_wrap():
    # The largest pool with 16-bit ids: its last item's partner must not wrap around 2^16.
    pool = TrainingPool(np.ones((1 << 16, 2), dtype=np.float32))
    ids = np.array([0, 32767, 32768, 65535], dtype=pool_id_dtype(pool.size))
    assert ids.dtype == np.uint16
    np.testing.assert_array_equal(pool.partner(ids), [32768, 65535, 0, 32767])
    assert pool_id_dtype((1 << 16) + 2) == np.int32
    assert pool_id_dtype(4346) == np.uint16


def test_pool_rejects_odd_size():
    with pytest.raises(ValueError, match="2N"):
        TrainingPool(np.zeros((3, 2), dtype=np.float32))


def test_top_k_by_id_breaks_ties_by_id_not_position():
    scores = np.array([0.5, 0.9, 0.5, 0.5, 0.1], dtype=np.float32)
    ids = ["d", "a", "b", "c", "e"]
    assert top_k_by_id(scores, ids, 3).tolist() == [1, 2, 3]  # a, then b and c (tied), not d
    assert top_k_by_id(scores, ids, 10).tolist() == [1, 2, 3, 0, 4]
    assert top_k_by_id(scores, ids, 0).tolist() == []


def test_scoring_is_bitwise_equal_on_any_split_of_the_gallery():
    """The float-summation trap: a BLAS product's summation order depends on the matrix shape,
    so shards scoring slices would differ from one process in the last bits."""
    rng = np.random.default_rng(5)
    pool = TrainingPool(unit_rows(rng.normal(size=(200, 64))))
    queries = item_codes(pool, *pool.exact_neighbours(unit_rows(rng.normal(size=(3, 64))), 20))
    gallery = item_codes(pool, *pool.exact_neighbours(unit_rows(rng.normal(size=(999, 64))), 20))
    units = unit_rows(rng.normal(size=(999, 64)))
    whole = knn_scores(pool, queries, gallery)
    whole_cos = cosine_scores(queries.dense, units)
    for cut in ([0, 1, 999], [0, 333, 666, 999], [0, 7, 500, 998, 999]):
        for lo, hi in itertools.pairwise(cut):
            part = gallery.part(slice(lo, hi))
            assert (knn_scores(pool, queries, part) == whole[:, lo:hi]).all()
            assert (cosine_scores(queries.dense, units[lo:hi]) == whole_cos[:, lo:hi]).all()


def test_query_profile_is_the_same_with_and_without_the_gram_matrix(monkeypatch):
    import app.retrieval as retrieval

    rng = np.random.default_rng(3)
    img = rng.normal(size=(40, 16))
    units = unit_rows(np.vstack([img, img + 0.3 * rng.normal(size=img.shape)]))
    queries = unit_rows(rng.normal(size=(5, 16)))
    with_gram = TrainingPool(units)
    assert with_gram.gram is not None
    codes = item_codes(with_gram, *with_gram.exact_neighbours(queries, 7))
    monkeypatch.setattr(retrieval, "GRAM_MAX_POOL", 10)
    without = TrainingPool(units)
    assert without.gram is None
    np.testing.assert_allclose(
        retrieval.query_profile(with_gram, codes),
        retrieval.query_profile(without, codes),
        atol=1e-6,
    )


_PROFILES = """
import sys
import numpy as np
from app.bundle import load_bundle
from app.retrieval import query_profile
bundle = load_bundle(sys.argv[1])
images = bundle.default_gallery().features["image"].astype(np.float32)
profile = query_profile(bundle.pool, bundle.codes(bundle.embed("image", images)))
sys.stdout.buffer.write(profile.tobytes())
"""


def test_query_profiles_are_bitwise_equal_whatever_the_blas_thread_count(wikipedia_bundle):
    """The front end and a single process (or `cdpae evaluate`) may run with different BLAS
    thread counts; the pool's Gram matrix built on two threads made 26k of 3M profile values
    1 ulp apart on the Wikipedia bundle, which flipped near-ties."""
    profiles = [
        subprocess.run(
            [sys.executable, "-c", _PROFILES, str(wikipedia_bundle)],
            env={**os.environ, "OPENBLAS_NUM_THREADS": threads},
            check=True,
            capture_output=True,
        ).stdout
        for threads in ("1", "2")
    ]
    assert len(profiles[0]) > 0
    assert profiles[0] == profiles[1]


def test_codes_gathered_and_by_sparse_product_are_bitwise_equal(wikipedia_bundle):
    """A few items are coded by gathering their neighbours' units, batches by a CSR product
    (app.retrieval.GATHER_MAX_ITEMS): an item must get the same code alone, in a small batch
    and in a large one, equal to m_x = W_x U summed in float64."""
    import scipy.sparse as sp

    from app.bundle import load_bundle
    from app.retrieval import GATHER_MAX_ITEMS, neighbour_weights

    bundle = load_bundle(wikipedia_bundle, for_queries=False)
    pool = bundle.pool
    features = bundle.default_gallery().features["text"][:300]
    ids, z = bundle.neighbours(bundle.embed("text", features))
    batch = item_codes(pool, ids, z)
    n, k = ids.shape
    weights = sp.csr_matrix(
        (neighbour_weights(z).ravel(), ids.ravel(), np.arange(0, n * k + 1, k)),
        shape=(n, pool.size),
    )
    product = weights @ pool.units.astype(np.float64)
    assert np.array_equal(batch.dense, product.astype(np.float32))
    for rows in (slice(0, 1), slice(7, 7 + GATHER_MAX_ITEMS), slice(40, 41 + GATHER_MAX_ITEMS)):
        part = item_codes(pool, ids[rows], z[rows])
        assert np.array_equal(part.dense, batch.dense[rows])
        assert np.array_equal(part.weights, batch.weights[rows])
        # a part of a batch whose m_x was not computed computes its own on first use;
        # one of a batch whose m_x was computed slices it
        assert np.array_equal(item_codes(pool, ids, z).part(rows).dense, batch.dense[rows])
        assert np.array_equal(batch.part(rows).dense, batch.dense[rows])


def test_codes_pickle_with_their_dense_part_and_without_the_pool(wikipedia_bundle):
    """Ray pickles a query batch to every shard: the codes go with m_x computed, not with
    the training pool (and its Gram matrix) m_x is computed from."""
    import pickle

    from app.bundle import load_bundle

    bundle = load_bundle(wikipedia_bundle)
    _ = bundle.pool.gram
    codes = bundle.codes(bundle.embed("image", bundle.default_gallery().features["image"][:3]))
    payload = pickle.dumps(codes)
    arrays = codes.neighbours.nbytes + codes.weights.nbytes + codes.dense.nbytes
    assert len(payload) < arrays + 4096
    sent = pickle.loads(payload)
    assert sent.pool is None
    for name in ("neighbours", "weights", "dense"):
        assert np.array_equal(getattr(sent, name), getattr(codes, name))
    assert np.array_equal(sent.part(slice(1, 2)).dense, codes.dense[1:2])
