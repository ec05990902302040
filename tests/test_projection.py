"""Cosine from the compact form (app.projection) ranks exactly as from full unit embeddings.

Real bundle, real encoders: the projection bound holds for every (query, item) pair, and a
gallery that keeps only projections, residual norms and raw features returns the same top k,
with the same float32 scores bit for bit, as a scan of the full unit embeddings.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from app.bundle import load_bundle
from app.gallery import Gallery, QueryBatch
from app.projection import ROUNDING_SLACK, Projection
from app.replica import derive
from app.retrieval import cosine_scores, top_k_by_id


@pytest.fixture(scope="module")
def bundle(wikipedia_bundle):
    return load_bundle(wikipedia_bundle)


def test_the_projection_bounds_every_cosine(bundle):
    gallery = bundle.default_gallery()
    items = bundle.embed("text", gallery.features["text"])
    queries = bundle.embed("image", gallery.features["image"][:100])
    projection = Projection.of(bundle.pool)
    p_items, r_items = projection.project(items)
    p_queries, r_queries = projection.project(queries)
    exact = cosine_scores(queries, items)
    approx = cosine_scores(p_queries, p_items)
    slack = r_queries[:, None] * r_items[None, :] + ROUNDING_SLACK
    assert np.all(np.abs(exact - approx) <= slack)
    assert float(r_items.max()) < 0.5  # else the bound would prune nothing


@pytest.mark.parametrize("k", [1, 10, 100])
def test_compact_cosine_ranks_like_full_embeddings(bundle, k):
    rng = np.random.default_rng(3)
    n = 3000
    features = np.abs(rng.normal(size=(n, bundle.manifest.input_dims["text"]))).astype(np.float32)
    features[1500:1520] = features[:20]  # exact ties, broken by id
    ids = [f"t{i:05d}" for i in range(n)]
    derived = derive(bundle, "text", features)
    embed = partial(bundle.embed, "text")
    gallery = Gallery("text", bundle.pool, bundle.knn_k, embed, features.shape[1])
    gallery.put(ids, features, derived, ["{}"] * n)
    gallery.remove("t00007")  # a dead row must never come back
    units = derive(bundle, "image", rng.normal(size=(20, 128)).astype(np.float32)).units
    hits = gallery.search_exact(QueryBatch(units), k, "cosine")
    full = cosine_scores(units, derived.units)
    full[:, 7] = -np.inf
    for q in range(len(units)):
        best = top_k_by_id(full[q], ids, k)
        assert [h.id for h in hits[q]] == [ids[i] for i in best.tolist()]
        assert [h.score for h in hits[q]] == full[q, best].tolist()  # bitwise
