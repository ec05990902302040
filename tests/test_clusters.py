"""Cosine's inverted file (app.clusters) on the real Wikipedia bundle.

Its bound must cover every live item it leaves out, after adds, replacements, deletions and
slot reuse (the rows still pending a sort included), and after a snapshot's restore; answers
it certifies must be the exact ones, bit for bit.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from app.ann import AnnParams
from app.bundle import load_bundle
from app.clusters import ClusterIndex
from app.gallery import Gallery, QueryBatch
from app.knn_certificate import ClusterWeightCaps
from app.replica import derive
from app.retrieval import cosine_scores


@pytest.fixture(scope="module")
def bundle(wikipedia_bundle):
    return load_bundle(wikipedia_bundle)


def _near_copies(texts: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Texts drawn around real ones (bench_service's synthetic gallery, in small)."""
    base = texts[rng.integers(0, len(texts), size=n)]
    noisy = np.clip(base + 0.1 * texts.std(axis=0) * rng.normal(size=base.shape), 0, None)
    return (noisy / np.maximum(noisy.sum(axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _changed_gallery(bundle) -> tuple[Gallery, np.ndarray]:
    """A clustered gallery of 4,000 texts, then changed: rows removed, replaced, reused and
    added, fewer than a re-sort needs (so they stay pending). Returns it and image queries."""
    default = bundle.default_gallery()
    rng = np.random.default_rng(5)
    features = _near_copies(default.features["text"], 4000, rng)
    gallery = Gallery(
        "text", bundle.pool, bundle.knn_k, partial(bundle.embed, "text"), features.shape[1]
    )
    ids = [f"t{i}" for i in range(len(features))]
    gallery.put(ids, features, derive(bundle, "text", features), ["{}"] * len(ids))
    gallery.build_cosine_clusters(AnnParams())
    for i in range(0, 4000, 9):
        gallery.remove(f"t{i}")
    replaced = _near_copies(default.features["text"], 100, rng)
    gallery.put(ids[1:201:2], replaced, derive(bundle, "text", replaced), ["{}"] * 100)
    fresh = _near_copies(default.features["text"], 300, rng)  # reuses the freed slots first
    fresh_ids = [f"new{i}" for i in range(300)]
    gallery.put(fresh_ids, fresh, derive(bundle, "text", fresh), ["{}"] * 300)
    queries = bundle.embed("image", default.features["image"][:60])
    return gallery, queries


def _check_bound(index: ClusterIndex, queries: np.ndarray, live: np.ndarray, exact) -> None:
    """Every live item an index leaves out scores at most its outside bound, for several
    candidate list sizes; the bound is below the best score often (else it says nothing)."""
    binding = 0
    for size in (200, 1000, 3000):
        for q, query in enumerate(queries):
            found = index.candidates(query, size)
            assert set(found.rows.tolist()) <= set(live.tolist())  # no dead row
            assert set(index.pending) <= set(found.rows.tolist())
            assert len(found.rows) >= size
            left_out = ~np.isin(live, found.rows)
            assert np.all(exact[q, left_out] <= found.outside_dot)
            binding += found.outside_dot < exact[q].max()
    assert binding > len(queries)


def test_the_bound_covers_every_live_item_left_out(bundle):
    gallery, queries = _changed_gallery(bundle)
    clusters = gallery.cosine_clusters
    assert clusters is not None and clusters.pending  # the changes are not sorted in yet
    live = np.flatnonzero(gallery.alive[: gallery.n_rows])
    exact = cosine_scores(queries, bundle.embed("text", gallery.features[live]))
    _check_bound(clusters, queries, live, exact)
    # A snapshot's restore (app.snapshot) is the index with its pending rows sorted in.
    restored = ClusterIndex.restore(
        gallery.projection,
        capacity=gallery.capacity,
        probes=clusters.probes,
        **clusters.state(gallery.n_rows),
    )
    clusters.sort_members()
    assert not clusters.pending
    for query in queries:
        found, again = clusters.candidates(query, 1000), restored.candidates(query, 1000)
        assert again.rows.tolist() == found.rows.tolist()
        assert again.outside_dot == found.outside_dot
    _check_bound(restored, queries, live, exact)


def test_certified_cosine_answers_are_the_exact_ones(bundle):
    gallery, queries = _changed_gallery(bundle)
    gallery.cosine_clusters.probes = 32  # of 253 clusters: 7 of 60 answers certified
    batch = QueryBatch(queries)
    approximate, paths = gallery.search_approximate(batch, 10, "cosine")
    exact = gallery.search_exact(batch, 10, "cosine")
    assert "approximate" in paths and "uncertified" in paths
    recall = []
    for hits, truth, path in zip(approximate, exact, paths, strict=True):
        if path == "approximate":
            assert hits == truth  # ids, scores (bitwise) and order
        recall.append(len({h.id for h in hits} & {h.id for h in truth}) / 10)
    assert np.mean(recall) >= 0.9


def test_sparse_cluster_caps_equal_the_dense_maxima(bundle):
    """The knn certificate's per-cluster caps, kept as sorted keys (app.knn_certificate),
    hold exactly the largest weight each cluster's members gave each pool item, however the
    rows arrive: in one bulk add, one by one, or again with other weights (never lowered)."""
    gallery, queries = _changed_gallery(bundle)
    clusters, pool = gallery.cosine_clusters, gallery.pool
    live = np.flatnonzero(gallery.alive[: gallery.n_rows])
    dense = np.zeros((pool.size, len(clusters.centroids)), dtype=np.float32)
    caps = ClusterWeightCaps(clusters, pool.size)
    rng = np.random.default_rng(9)
    for step, rows in enumerate(np.array_split(rng.permutation(live), 7)):
        neighbours, weights = gallery.neighbours[rows], gallery.weights[rows]
        if step % 2:  # the same rows again, some weights larger, some smaller
            weights = weights * rng.uniform(0.5, 1.5, size=weights.shape).astype(np.float32)
        for chunk in np.array_split(np.arange(len(rows)), 1 if step < 3 else 40):
            caps.add(rows[chunk], neighbours[chunk], weights[chunk])
        members = np.repeat(clusters.cluster_of[rows], neighbours.shape[1])
        np.maximum.at(dense, (neighbours.ravel(), members), weights.ravel())
    b, c = np.indices(dense.shape)
    assert np.array_equal(caps.caps(b, c), dense)
    assert len(caps.values) == np.count_nonzero(dense) < dense.size / 4  # sparse indeed
    codes = bundle.codes(queries)
    for nb, w in zip(codes.neighbours, codes.weights, strict=True):
        sparse = w.astype(np.float64) * pool.pair_correction[nb]
        reference = sparse @ dense[pool.partner(nb)].astype(np.float64)
        sums = caps.sums(pool, nb, w)
        assert np.all(reference <= sums) and np.allclose(sums, reference, rtol=1e-4)
